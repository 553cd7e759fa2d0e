//! Evaluation of a model on a dataset split: every image through a [`Predictor`], a streaming
//! confusion matrix (mIoU as TensorFlow's `mean_iou`, pixel accuracy, ...) and optionally the
//! trimap boundary metric, colored predictions and a confusion-matrix image, with a progress bar.
//! Bad samples are skipped with a warning and listed in the report.

use crate::infer::{InferenceOptions, Predictor};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use deeplab_data::{
    io::{save_palette_png, save_rgb_png},
    render, BoundaryDefinition, ConfusionMatrix, Dataset, Sample, TrimapMetric,
};
use deeplab_heads::DeepLabModel;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// Evaluation settings.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// How each image is run.
    pub inference: InferenceOptions,
    /// Trimap band widths in pixels (empty: no trimap metric).
    pub trimap_widths: Vec<u32>,
    /// Which pixels form the trimap boundary.
    pub trimap_definition: BoundaryDefinition,
    /// Where to save colored predictions (`<id>.png`, palette PNGs) and `confusion_matrix.png`.
    pub out_dir: Option<PathBuf>,
    /// Evaluate only the first N samples.
    pub limit: Option<usize>,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Confusion matrix over every evaluated pixel.
    pub confusion: ConfusionMatrix,
    /// The trimap metric, when asked for.
    pub trimap: Option<TrimapMetric>,
    /// Class names, in class-id order.
    pub class_names: Vec<String>,
    /// Number of evaluated images.
    pub images: usize,
    /// `(sample id, reason)` of every skipped sample.
    pub skipped: Vec<(String, String)>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl EvalReport {
    /// The per-class table (IoU and accuracy per class, then mIoU, pixel accuracy, ...), and
    /// the trimap mIoU per band width when computed.
    pub fn table(&self) -> String {
        let names: Vec<&str> = self.class_names.iter().map(String::as_str).collect();
        let mut s = self.confusion.summary().to_table(&names);
        if let Some(t) = &self.trimap {
            for (w, m) in t.mean_ious() {
                s += &format!("trimap band {w:>3} px: mIoU {:.2}%\n", 100.0 * m);
            }
        }
        s
    }

    /// Every number as JSON (with `extra` fields merged in at the top level).
    pub fn to_json(&self, extra: serde_json::Value) -> serde_json::Value {
        let s = self.confusion.summary();
        let k = self.confusion.num_classes();
        let matrix: Vec<Vec<u64>> = (0..k)
            .map(|r| (0..k).map(|c| self.confusion.count(r, c)).collect())
            .collect();
        let per_class: Vec<serde_json::Value> = self
            .class_names
            .iter()
            .enumerate()
            .map(|(i, n)| json!({"id": i, "name": n, "iou": s.iou.get(i).copied().flatten(), "accuracy": s.class_accuracy.get(i).copied().flatten()}))
            .collect();
        let mut v = json!({
            "mean_iou": s.mean_iou,
            "pixel_accuracy": s.pixel_accuracy,
            "mean_class_accuracy": s.mean_class_accuracy,
            "frequency_weighted_iou": s.frequency_weighted_iou,
            "pixels": s.pixels,
            "classes": per_class,
            "iou": s.iou,
            "class_accuracy": s.class_accuracy,
            "confusion_matrix": matrix,
            "images": self.images,
            "skipped": self.skipped.iter().map(|(id, r)| json!({"id": id, "reason": r})).collect::<Vec<_>>(),
            "seconds": self.seconds,
        });
        if let Some(t) = &self.trimap {
            v["trimap"] = t
                .mean_ious()
                .into_iter()
                .map(|(w, m)| json!({"width": w, "mean_iou": m}))
                .collect();
        }
        if let (Some(obj), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            for (key, val) in e {
                obj.insert(key, val);
            }
        }
        v
    }
}

/// Spawns a thread that decodes the dataset's samples in order, a few ahead of the consumer.
fn sample_stream(
    dataset: Arc<Dataset>,
    count: usize,
) -> mpsc::Receiver<(usize, deeplab_data::Result<Sample>)> {
    let (tx, rx) = mpsc::sync_channel(4);
    std::thread::spawn(move || {
        for i in 0..count {
            if tx.send((i, dataset.load(i))).is_err() {
                break;
            }
        }
    });
    rx
}

fn progress_bar(len: usize, enabled: bool, what: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

/// Evaluates `model` on `dataset`. The model's class count must equal the dataset's.
pub fn evaluate(
    model: &DeepLabModel,
    dataset: Arc<Dataset>,
    opts: &EvalOptions,
    device: &Device,
) -> Result<EvalReport> {
    let k = dataset.num_classes();
    if model.config().num_classes != k {
        bail!(
            "the model predicts {} classes but the dataset {} has {k} ({}); use weights trained for this dataset",
            model.config().num_classes,
            dataset.root().display(),
            dataset.classes().names().join(", ")
        );
    }
    let predictor = Predictor::new(model, opts.inference.clone(), device)?;
    let palette = dataset.classes().palette();
    if let Some(dir) = &opts.out_dir {
        crate::ensure_writable_dir(dir)?;
    }
    let count = opts.limit.map_or(dataset.len(), |l| l.min(dataset.len()));
    let mut confusion = ConfusionMatrix::new(k)?;
    let mut trimap = if opts.trimap_widths.is_empty() {
        None
    } else {
        Some(TrimapMetric::new(
            k,
            &opts.trimap_widths,
            opts.trimap_definition,
        )?)
    };
    let mut skipped: Vec<(String, String)> = dataset
        .skipped()
        .iter()
        .map(|s| (s.id.clone(), s.error.to_string()))
        .collect();
    let start = Instant::now();
    let pb = progress_bar(count, opts.progress, "eval");
    let mut images = 0usize;
    let rx = sample_stream(Arc::clone(&dataset), count);
    for (i, sample) in rx {
        pb.inc(1);
        let id = dataset.entries()[i].id.clone();
        let sample = match sample {
            Ok(s) => s,
            Err(e) => {
                pb.suspend(|| eprintln!("warning: skipping sample '{id}': {e}"));
                skipped.push((id, e.to_string()));
                continue;
            }
        };
        let pred = predictor
            .predict(&sample.image)
            .with_context(|| format!("sample '{id}' ({})", dataset.entries()[i].image.display()))?;
        let gt = sample.label.as_slice();
        confusion
            .update(gt, pred.label.as_slice())
            .with_context(|| format!("sample '{id}'"))?;
        if let Some(t) = trimap.as_mut() {
            t.update(
                gt,
                pred.label.as_slice(),
                sample.label.width() as usize,
                sample.label.height() as usize,
            )
            .with_context(|| format!("sample '{id}'"))?;
        }
        if let Some(dir) = &opts.out_dir {
            save_palette_png(dir.join(format!("{id}.png")), &pred.label, palette.colors())?;
        }
        images += 1;
    }
    pb.finish_and_clear();
    if images == 0 {
        bail!(
            "no sample of {} could be evaluated ({} skipped)",
            dataset.root().display(),
            skipped.len()
        );
    }
    if let Some(dir) = &opts.out_dir {
        let img = render::confusion_matrix_image(&confusion, &palette, 24)?;
        save_rgb_png(dir.join("confusion_matrix.png"), &img)?;
    }
    Ok(EvalReport {
        confusion,
        trimap,
        class_names: dataset
            .classes()
            .names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        images,
        skipped,
        seconds: start.elapsed().as_secs_f64(),
    })
}
