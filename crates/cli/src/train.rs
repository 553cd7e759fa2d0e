//! Training, as the official `research/deeplab/train.py` does it: random scale / crop / flip
//! batches from the data crate's loader, softmax cross-entropy on the logits upsampled to the
//! crop (label 255 ignored), SGD with momentum and weight decay ([`crate::optim`]) under the poly
//! schedule ([`crate::schedule`]), BatchNorm trained (batch statistics, running averages) or
//! frozen.
//!
//! Every `checkpoint_every` steps the run writes, each atomically (temporary file + rename):
//! `checkpoint.safetensors` (all variables, the momentum buffers, the step and the run's
//! options), `model.safetensors` (the canonical weights `deeplab eval` loads, with the classes
//! and the crop in its metadata), and `curves.png` (loss, learning rate, train/val mIoU). Every
//! logged step appends a JSON line to `train.jsonl`. A run is deterministic: the initialization
//! comes from the seed, each batch from `(seed, epoch, index)` (see `deeplab_data::Loader`), and
//! the math runs in a fixed order, so `--resume` continues a run bit for bit. A non-finite loss
//! stops the run with an error before anything is written.
//!
//! BatchNorm momentum: the heads crate builds its ASPP / decoder BatchNorms with the official
//! TensorFlow decay (momentum 3e-4), which leaves the running statistics near their initial
//! values in a run of a few hundred steps. The trainer sets the backbone's momentum in the
//! configuration and, after every step, rescales the head layers' running-statistic update from
//! 3e-4 to the requested momentum (`new = old + (M / 3e-4) * (updated - old)`).

use crate::evaluate::{evaluate, EvalOptions};
use crate::files::{
    self, SaveDType, CLASSES_KEY, EVAL_CROP_KEY, MOMENTUM_PREFIX, STATE_KEY, TRAIN_KEY,
};
use crate::infer::{data_normalization, InferenceOptions, Preprocess};
use crate::init;
use crate::optim::{Sgd, SgdConfig};
use crate::plot::{self, Panel, Series};
use crate::schedule::PolySchedule;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use deeplab_backbones::BackboneConfig;
use deeplab_data::{
    ConfusionMatrix, Dataset, ErrorPolicy, Loader, LoaderConfig, ScaleRange, TrainTransform,
    Transform,
};
use deeplab_heads::{weights::CONFIG_KEY, DeepLabConfig, DeepLabModel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// File names inside the output directory.
pub mod names {
    /// The training checkpoint (weights, optimizer state, step).
    pub const CHECKPOINT: &str = "checkpoint.safetensors";
    /// The canonical weight file.
    pub const MODEL: &str = "model.safetensors";
    /// The JSON-lines log.
    pub const LOG: &str = "train.jsonl";
    /// The curves.
    pub const PLOT: &str = "curves.png";
}

/// Which layout a dataset folder has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// Detect from the folder's content.
    Auto,
    /// PASCAL VOC 2012 layout.
    Voc,
    /// Cityscapes layout.
    Cityscapes,
    /// The custom folder format.
    Folder,
}

/// Opens a dataset split with the given layout (auto-detected with [`DatasetKind::Auto`]).
pub fn open_dataset(
    root: &Path,
    kind: DatasetKind,
    split: Option<&str>,
    policy: ErrorPolicy,
) -> Result<Dataset> {
    let need = |what: &str| -> Result<&str> {
        split.with_context(|| {
            format!(
                "{} is a {what} dataset: name a split with --split",
                root.display()
            )
        })
    };
    let ds = match kind {
        DatasetKind::Auto => Dataset::open(root, split, policy),
        DatasetKind::Voc => {
            Dataset::voc_with(root, need("VOC")?, deeplab_data::VocLabels::Auto, policy)
        }
        DatasetKind::Cityscapes => Dataset::cityscapes_with(
            root,
            need("Cityscapes")?,
            deeplab_data::CityscapesLabels::Auto,
            policy,
        ),
        DatasetKind::Folder => Dataset::folder_with(root, split, policy),
    };
    ds.with_context(|| format!("opening dataset {}", root.display()))
}

/// Where the initial weights come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitFrom {
    /// Seeded random initialization.
    Random,
    /// ImageNet backbone weights (timm safetensors), the head random.
    Backbone(PathBuf),
    /// A full DeepLab weight file (the classifier is re-initialized when its class count differs).
    Full(PathBuf),
}

/// BatchNorm during training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchNormMode {
    /// Batch statistics, running averages updated with this momentum (PyTorch convention:
    /// `running = (1 - m) * running + m * batch`), scales and shifts trained.
    Train {
        /// The running-average momentum.
        momentum: f64,
    },
    /// Running statistics used and kept, scales and shifts not trained (the whole network runs
    /// in evaluation mode, so ASPP dropout is off too).
    Frozen,
}

/// Everything a training run depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Dataset root.
    pub data: PathBuf,
    /// Dataset layout.
    pub dataset: DatasetKind,
    /// Training split.
    pub train_split: Option<String>,
    /// Validation split (`None`: no validation).
    pub val_split: Option<String>,
    /// Output directory.
    pub out: PathBuf,
    /// The model (its `num_classes` must equal the dataset's).
    pub model: DeepLabConfig,
    /// Initial weights.
    pub init: InitFrom,
    /// Learning-rate schedule; its `total_steps` is the number of training steps.
    pub schedule: PolySchedule,
    /// Optimizer settings.
    pub sgd: SgdConfig,
    /// BatchNorm mode.
    pub bn: BatchNormMode,
    /// Samples per step.
    pub batch_size: usize,
    /// Crop `(height, width)`.
    pub crop: (usize, usize),
    /// Random scale range `(min, max, step)` (step 0: continuous).
    pub scale: (f32, f32, f32),
    /// Random horizontal flips.
    pub flip: bool,
    /// Seed of the initialization and the data order / augmentation.
    pub seed: u64,
    /// Loader threads (does not change the batches).
    pub workers: usize,
    /// Checkpoint interval in steps (the last step always checkpoints).
    pub checkpoint_every: usize,
    /// Validation interval in steps (0: only at the end).
    pub val_every: usize,
    /// Log interval in steps.
    pub log_every: usize,
    /// Stop (with a checkpoint) after this step, to be continued with `--resume`.
    pub stop_after: Option<usize>,
    /// Element type of `model.safetensors`.
    pub save_dtype: SaveDType,
    /// Progress bar on a terminal (a display setting: not recorded in the files).
    #[serde(skip, default)]
    pub progress: bool,
}

impl TrainOptions {
    /// Total training steps.
    pub fn steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        self.schedule.validate().map_err(anyhow::Error::msg)?;
        self.sgd.validate().map_err(anyhow::Error::msg)?;
        self.model
            .validate()
            .map_err(|e| anyhow::anyhow!("model configuration: {e}"))?;
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.batch_size == 1 && matches!(self.bn, BatchNormMode::Train { .. }) {
            bail!("--batch-size 1 cannot train BatchNorm (one value per channel in the image-pooling branch); use --batch-size 2 or more, or --freeze-bn");
        }
        if let BatchNormMode::Train { momentum } = self.bn {
            if !(momentum > 0.0 && momentum <= 1.0) {
                bail!("--bn-momentum {momentum} must be in (0, 1]");
            }
        }
        if self.crop.0 < 17 || self.crop.1 < 17 {
            bail!(
                "--crop {}x{} is too small (at least 17x17)",
                self.crop.0,
                self.crop.1
            );
        }
        if self.checkpoint_every == 0 || self.log_every == 0 {
            bail!("--checkpoint-every and --log-every must be at least 1");
        }
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        Ok(())
    }

    /// The settings that decide the trajectory of the run, which a resumed run must share.
    fn trajectory(&self) -> serde_json::Value {
        serde_json::json!({
            "data": self.data, "dataset": self.dataset, "train_split": self.train_split,
            "model": self.model, "schedule": self.schedule, "sgd": self.sgd, "bn": self.bn,
            "batch_size": self.batch_size, "crop": self.crop, "scale": self.scale,
            "flip": self.flip, "seed": self.seed,
        })
    }
}

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
    /// The run's options.
    pub options: TrainOptions,
}

/// The outcome of [`train`].
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Steps completed (the run's total, or `stop_after`).
    pub steps_done: usize,
    /// Step the run started at (non-zero when resumed).
    pub started_at: usize,
    /// Mean loss of the first logged interval of this invocation.
    pub first_loss: Option<f64>,
    /// Mean loss of the last logged interval.
    pub last_loss: Option<f64>,
    /// The last validation mIoU.
    pub val_miou: Option<f64>,
    /// The canonical weight file.
    pub model_path: PathBuf,
    /// The checkpoint.
    pub checkpoint_path: PathBuf,
}

/// The training configuration of `model` for a BatchNorm mode and ASPP dropout: the backbone's
/// BatchNorm momentum set to the requested one.
pub fn training_config(model: &DeepLabConfig, bn: BatchNormMode) -> DeepLabConfig {
    let mut c = model.clone();
    if let BatchNormMode::Train { momentum } = bn {
        match &mut c.backbone {
            BackboneConfig::Xception(x) => x.bn_momentum = momentum,
            BackboneConfig::ResNet(r) => r.bn_momentum = momentum,
            BackboneConfig::MobileNetV2(m) => m.bn_momentum = momentum,
        }
    }
    c
}

/// Saves a checkpoint: every variable, the momentum buffers and the state.
fn save_checkpoint(
    path: &Path,
    config: &DeepLabConfig,
    varmap: &VarMap,
    opt: &Sgd,
    state: &TrainState,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let mut tensors = init::snapshot(varmap)?;
    for (name, t) in opt.momentum_buffers() {
        tensors.insert(format!("{MOMENTUM_PREFIX}{name}"), t.copy()?);
    }
    let mut meta = extra.clone();
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(config)?);
    meta.insert(STATE_KEY.to_string(), serde_json::to_string(state)?);
    let bytes = files::serialize_tensors(&tensors, &meta, SaveDType::F32)?;
    files::write_file_atomically(path, &bytes)
}

/// Reads a checkpoint into `varmap` and `opt`; returns its state.
fn load_checkpoint(path: &Path, varmap: &VarMap, opt: &mut Sgd) -> Result<TrainState> {
    let meta = files::read_metadata(path)?;
    let state: TrainState = serde_json::from_str(meta.get(STATE_KEY).with_context(|| {
        format!(
            "{}: not a training checkpoint (no '{STATE_KEY}' metadata)",
            path.display()
        )
    })?)
    .with_context(|| format!("{}: unreadable '{STATE_KEY}' metadata", path.display()))?;
    let tensors = files::read_tensors(path, &Device::Cpu)?;
    for (name, var) in init::sorted_vars(varmap)? {
        let t = tensors.get(&name).with_context(|| {
            format!(
                "{}: checkpoint lacks tensor '{name}' (shape {:?})",
                path.display(),
                var.dims()
            )
        })?;
        if t.dims() != var.dims() {
            bail!(
                "{}: checkpoint tensor '{name}' has shape {:?}, the model needs {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?)?;
    }
    for (name, t) in &tensors {
        if let Some(p) = name.strip_prefix(MOMENTUM_PREFIX) {
            opt.set_momentum_buffer(p, t.to_device(&opt_device(opt))?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
    }
    Ok(state)
}

fn opt_device(opt: &Sgd) -> Device {
    opt.params()
        .first()
        .map_or(Device::Cpu, |p| p.var.device().clone())
}

/// Head BatchNorm running statistics whose update is rescaled (see the module docs).
struct BnRescale {
    vars: Vec<Var>,
    factor: f64,
}

impl BnRescale {
    fn new(varmap: &VarMap, bn: BatchNormMode) -> Result<Option<Self>> {
        let BatchNormMode::Train { momentum } = bn else {
            return Ok(None);
        };
        let built = deeplab_ops::BatchNormConfig::tf_head().momentum;
        if (momentum - built).abs() < 1e-15 {
            return Ok(None);
        }
        let vars = init::sorted_vars(varmap)?
            .into_iter()
            .filter(|(n, _)| {
                !n.starts_with("backbone.")
                    && (n.ends_with(".running_mean") || n.ends_with(".running_var"))
            })
            .map(|(_, v)| v)
            .collect();
        Ok(Some(Self {
            vars,
            factor: momentum / built,
        }))
    }

    fn before(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    fn after(&self, old: &[Tensor]) -> Result<()> {
        for (v, o) in self.vars.iter().zip(old) {
            let cur = v.as_tensor().detach();
            let new = (o + ((cur - o)? * self.factor)?)?;
            // a variance cannot become negative through the extrapolation
            let new = new.maximum(0f64)?;
            v.set(&new)?;
        }
        Ok(())
    }
}

/// Which variables the optimizer updates: everything but the running statistics, and, with
/// frozen BatchNorm, not the BatchNorm scales and shifts either.
pub(crate) fn trainable(varmap: &VarMap, bn: BatchNormMode) -> Result<Vec<(String, Var)>> {
    let all = init::sorted_vars(varmap)?;
    let bn_prefixes: std::collections::HashSet<String> = all
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".running_mean").map(str::to_string))
        .collect();
    Ok(all
        .into_iter()
        .filter(|(n, _)| !(n.ends_with(".running_mean") || n.ends_with(".running_var")))
        .filter(|(n, _)| {
            if bn == BatchNormMode::Frozen {
                let prefix = n.rsplit_once('.').map_or("", |(p, _)| p);
                !bn_prefixes.contains(prefix)
            } else {
                true
            }
        })
        .collect())
}

/// The log lines (raw text and parsed) of steps up to `upto`, so a resumed run keeps the
/// earlier lines byte for byte and drops those written after its checkpoint.
fn read_log(path: &Path, upto: usize) -> Result<Vec<(String, serde_json::Value)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            Some((
                l.to_string(),
                serde_json::from_str::<serde_json::Value>(l).ok()?,
            ))
        })
        .filter(|(_, v)| {
            v.get("step")
                .and_then(|s| s.as_u64())
                .is_some_and(|s| s as usize <= upto)
        })
        .collect())
}

fn write_log(path: &Path, lines: &[(String, serde_json::Value)]) -> Result<()> {
    let mut text = String::new();
    for (l, _) in lines {
        text += l;
        text.push('\n');
    }
    files::write_file_atomically(path, text.as_bytes())
}

fn plot_records(path: &Path, records: &[serde_json::Value]) -> Result<()> {
    let series = |kind: &str, key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| r.get("type").and_then(|t| t.as_str()) == Some(kind))
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
            .collect()
    };
    let panels = [
        Panel {
            title: "loss".into(),
            series: vec![Series {
                name: "train loss".into(),
                color: [31, 119, 180],
                points: series("train", "loss"),
                markers: false,
            }],
        },
        Panel {
            title: "learning rate".into(),
            series: vec![Series {
                name: "lr".into(),
                color: [255, 127, 14],
                points: series("train", "lr"),
                markers: false,
            }],
        },
        Panel {
            title: "miou".into(),
            series: vec![
                Series {
                    name: "train miou".into(),
                    color: [44, 160, 44],
                    points: series("train", "train_miou"),
                    markers: false,
                },
                Series {
                    name: "val miou".into(),
                    color: [214, 39, 40],
                    points: series("val", "val_miou"),
                    markers: true,
                },
            ],
        },
    ];
    let img = plot::render(&panels, 900);
    deeplab_data::io::save_rgb_png(path, &img)
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs (or, with `resume`, continues) a training run.
pub fn train(opts: &TrainOptions, resume: bool, device: &Device) -> Result<TrainSummary> {
    opts.validate()?;
    let out = &opts.out;
    crate::ensure_writable_dir(out)?;
    let ckpt_path = out.join(names::CHECKPOINT);
    let model_path = out.join(names::MODEL);
    let log_path = out.join(names::LOG);
    let plot_path = out.join(names::PLOT);
    if !resume && (ckpt_path.exists() || log_path.exists()) {
        bail!(
            "{}: the directory already holds a training run; pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    if resume && !ckpt_path.exists() {
        bail!("{}: no checkpoint to resume from", ckpt_path.display());
    }

    let train_ds = Arc::new(open_dataset(
        &opts.data,
        opts.dataset,
        opts.train_split.as_deref(),
        ErrorPolicy::Fail,
    )?);
    if train_ds.num_classes() != opts.model.num_classes {
        bail!(
            "the model has {} classes but the dataset {} has {} ({})",
            opts.model.num_classes,
            opts.data.display(),
            train_ds.num_classes(),
            train_ds.classes().names().join(", ")
        );
    }
    let val_ds = match &opts.val_split {
        Some(s) => Some(Arc::new(open_dataset(
            &opts.data,
            opts.dataset,
            Some(s),
            ErrorPolicy::SkipWithWarning,
        )?)),
        None => None,
    };

    let config = training_config(&opts.model, opts.bn);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = DeepLabModel::new(&config, vb).context("building the model")?;
    let mut opt = Sgd::new(trainable(&varmap, opts.bn)?, opts.sgd).map_err(anyhow::Error::msg)?;
    let bn_rescale = BnRescale::new(&varmap, opts.bn)?;

    let start_step = if resume {
        let state = load_checkpoint(&ckpt_path, &varmap, &mut opt)?;
        let (a, b) = (state.options.trajectory(), opts.trajectory());
        if a != b {
            let diff: Vec<String> = a
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!(
                        "{k} (checkpoint: {v}, now: {})",
                        b.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect();
            bail!(
                "{}: --resume needs the same settings as the run that wrote the checkpoint; different: {}",
                ckpt_path.display(),
                diff.join("; ")
            );
        }
        eprintln!("resuming {} at step {}", ckpt_path.display(), state.step);
        state.step
    } else {
        init::init_seeded(&varmap, opts.seed)?;
        match &opts.init {
            InitFrom::Random => {}
            InitFrom::Backbone(p) => {
                let r = init::load_backbone(&varmap, p)?;
                eprintln!(
                    "loaded {} backbone tensors from {} ({} unused tensors in the file)",
                    r.loaded,
                    p.display(),
                    r.unused.len()
                );
            }
            InitFrom::Full(p) => {
                let r = init::load_full(&varmap, p)?;
                eprintln!("loaded {} tensors from {}", r.loaded, p.display());
                if !r.reinitialized.is_empty() {
                    eprintln!(
                        "re-initialized {} (the file has another number of classes)",
                        r.reinitialized.join(", ")
                    );
                }
            }
        }
        0
    };
    let total = opts.steps();
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    if start_step >= end {
        bail!(
            "{}: the run is already at step {start_step} of {end}; nothing to do",
            ckpt_path.display()
        );
    }

    // data
    let norm = data_normalization(&config.normalization);
    let transform = TrainTransform::new(opts.crop.0, opts.crop.1)?
        .with_scale(ScaleRange {
            min: opts.scale.0,
            max: opts.scale.1,
            step: opts.scale.2,
        })?
        .with_flip(opts.flip)
        .with_pad_value(norm.mean_pixel());
    let mut lcfg = LoaderConfig::train(opts.batch_size, norm, opts.seed);
    lcfg.transform = Transform::Train(transform);
    lcfg.num_workers = opts.workers;
    let loader = Loader::new(Arc::clone(&train_ds), lcfg)?;
    let per_epoch = loader.num_batches();
    if per_epoch == 0 {
        bail!(
            "the training split of {} has {} samples, fewer than --batch-size {}",
            opts.data.display(),
            train_ds.len(),
            opts.batch_size
        );
    }

    // metadata of the saved files
    let mut extra = BTreeMap::new();
    extra.insert(CLASSES_KEY.to_string(), train_ds.classes().to_file_string());
    extra.insert(
        EVAL_CROP_KEY.to_string(),
        format!("{}x{}", opts.crop.0, opts.crop.1),
    );

    let mut records: Vec<serde_json::Value> = Vec::new();
    if resume {
        let lines = read_log(&log_path, start_step)?;
        write_log(&log_path, &lines)?;
        records = lines.into_iter().map(|(_, v)| v).collect();
    }
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;

    let train_flag = matches!(opts.bn, BatchNormMode::Train { .. });
    let k = config.num_classes;
    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(end as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "train {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(start_step as u64);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let say = |msg: String| pb.suspend(|| eprintln!("{msg}"));

    let mut summary = TrainSummary {
        steps_done: start_step,
        started_at: start_step,
        first_loss: None,
        last_loss: None,
        val_miou: None,
        model_path: model_path.clone(),
        checkpoint_path: ckpt_path.clone(),
    };
    let mut last_ckpt = if resume { Some(start_step) } else { None };
    let mut epoch_iter: Option<(u64, deeplab_data::EpochIter)> = None;
    let mut interval_loss = 0f64;
    let mut interval_steps = 0usize;
    let mut interval_images = 0usize;
    let mut interval_cm = ConfusionMatrix::new(k)?;
    let mut interval_start = Instant::now();

    for step in start_step..end {
        let epoch = (step / per_epoch) as u64;
        let pos = step % per_epoch;
        if epoch_iter.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut it = loader.epoch(epoch);
            for skip in 0..pos {
                it.next()
                    .with_context(|| format!("epoch {epoch} ended before batch {skip}"))?
                    .with_context(|| format!("loading epoch {epoch}"))?;
            }
            epoch_iter = Some((epoch, it));
        }
        let batch = epoch_iter
            .as_mut()
            .and_then(|(_, it)| it.next())
            .with_context(|| format!("epoch {epoch} ended early at batch {pos}"))?
            .with_context(|| format!("loading a training batch (epoch {epoch}, batch {pos})"))?;
        let (x, y) = batch.to_tensors(device)?;
        let lr = opts.schedule.lr(step);

        let old_stats = match &bn_rescale {
            Some(r) => Some(r.before()?),
            None => None,
        };
        let out = model
            .forward_output(&x, train_flag)
            .with_context(|| format!("forward pass at step {step}"))?;
        let logits = out.upsampled;
        let loss = deeplab_ops::cross_entropy(&logits, &y, 255)
            .with_context(|| format!("loss at step {step}"))?;
        let loss_v = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            let last = match last_ckpt {
                Some(s) => format!(
                    "the last checkpoint ({}, step {s}) is intact",
                    ckpt_path.display()
                ),
                None => "no checkpoint was written yet".to_string(),
            };
            bail!(
                "training stopped: the loss is {loss_v} at step {} (learning rate {lr:.3e}); {last}; lower --lr or check the data",
                step + 1
            );
        }
        let grads = loss.backward()?;
        opt.step(&grads, lr)?;
        drop(grads);
        if let (Some(r), Some(old)) = (&bn_rescale, &old_stats) {
            r.after(old)?;
        }
        // training mIoU on the crops, from the same forward pass
        let pred = crate::infer::argmax_labels(&logits)?;
        interval_cm.update(&batch.labels, &pred)?;
        interval_loss += loss_v;
        interval_steps += 1;
        interval_images += batch.batch_size;
        let done = step + 1;
        pb.set_position(done as u64);
        summary.steps_done = done;

        if done % opts.log_every == 0 || done == end {
            let secs = interval_start.elapsed().as_secs_f64().max(1e-9);
            let mean = interval_loss / interval_steps as f64;
            let miou = interval_cm.mean_iou();
            let rec = serde_json::json!({
                "type": "train", "step": done, "epoch": epoch, "loss": mean, "lr": lr,
                "train_miou": miou, "pixel_accuracy": interval_cm.pixel_accuracy(),
                "images_per_s": interval_images as f64 / secs,
            });
            writeln!(log_file, "{rec}")
                .with_context(|| format!("writing {}", log_path.display()))?;
            log_file
                .flush()
                .with_context(|| format!("writing {}", log_path.display()))?;
            records.push(rec);
            summary.first_loss.get_or_insert(mean);
            summary.last_loss = Some(mean);
            let msg = format!(
                "step {done}/{total} loss {mean:.4} lr {lr:.3e} train mIoU {:.1}% {:.1} img/s",
                100.0 * miou,
                interval_images as f64 / secs
            );
            pb.set_message(format!("loss {mean:.4} lr {lr:.2e}"));
            say(msg);
            interval_loss = 0.0;
            interval_steps = 0;
            interval_images = 0;
            interval_cm = ConfusionMatrix::new(k)?;
            interval_start = Instant::now();
        }

        let validate_now = (opts.val_every > 0 && done % opts.val_every == 0) || done == total;
        if let (Some(vds), true) = (&val_ds, validate_now) {
            let eval_opts = EvalOptions {
                inference: InferenceOptions::single(Preprocess::Pad(Some(opts.crop))),
                trimap_widths: Vec::new(),
                trimap_definition: Default::default(),
                out_dir: None,
                limit: None,
                progress: false,
            };
            let report = pb.suspend(|| evaluate(&model, Arc::clone(vds), &eval_opts, device))?;
            let s = report.confusion.summary();
            let rec = serde_json::json!({
                "type": "val", "step": done, "val_miou": s.mean_iou,
                "pixel_accuracy": s.pixel_accuracy, "images": report.images,
            });
            writeln!(log_file, "{rec}")
                .with_context(|| format!("writing {}", log_path.display()))?;
            log_file.flush()?;
            records.push(rec);
            summary.val_miou = Some(s.mean_iou);
            say(format!(
                "step {done}/{total} validation mIoU {:.2}% ({} images)",
                100.0 * s.mean_iou,
                report.images
            ));
            interval_start = Instant::now();
        }

        if done % opts.checkpoint_every == 0 || done == end {
            say(format!(
                "step {done}/{total} writing checkpoint {}",
                ckpt_path.display()
            ));
            let state = TrainState {
                step: done,
                options: opts.clone(),
            };
            save_checkpoint(&ckpt_path, &config, &varmap, &opt, &state, &extra)?;
            let mut meta = extra.clone();
            meta.insert(
                TRAIN_KEY.to_string(),
                serde_json::json!({"step": done, "options": opts}).to_string(),
            );
            files::save_model(
                &model_path,
                &config,
                &init::snapshot(&varmap)?,
                &meta,
                opts.save_dtype,
            )?;
            plot_records(&plot_path, &records)?;
            last_ckpt = Some(done);
            interval_start = Instant::now();
        }
    }
    pb.finish_and_clear();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_bn_excludes_scales() -> Result<()> {
        let cfg = DeepLabConfig::mobilenetv2_v3(3);
        let vm = VarMap::new();
        DeepLabModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let all = trainable(&vm, BatchNormMode::Train { momentum: 0.1 })?;
        let frozen = trainable(&vm, BatchNormMode::Frozen)?;
        assert!(all.iter().all(|(n, _)| !n.contains("running_")));
        assert!(all.iter().any(|(n, _)| n == "aspp.project.bn.weight"));
        assert!(!frozen.iter().any(|(n, _)| n == "aspp.project.bn.weight"));
        assert!(frozen.iter().any(|(n, _)| n == "classifier.bias"));
        assert!(frozen.iter().any(|(n, _)| n == "aspp.project.conv.weight"));
        Ok(())
    }
}
