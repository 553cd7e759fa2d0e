//! The published TFLite DeepLabv3 models through the whole command line: `deeplab convert` of
//! the `.tflite` file, then `deeplab predict --logits` with the preprocessing each model expects
//! (`resize:257`, a PIL-bilinear stretch, for the float model; `keep-aspect-pad:513`, long side
//! 513 padded with 128, for the quantized one) must reproduce the TFLite interpreter's argmax
//! maps in `shared/reference/tflite/reference_outputs/`. Skipped (with one line) where
//! `../shared` is absent.

use deeplab_data::io::{read_mask, RawMask};
use deeplab_e2e::{deeplab, read_npy_f32, scratch, workspace_root};
use std::path::{Path, PathBuf};

fn shared() -> Option<PathBuf> {
    let p = workspace_root().join("../shared/reference");
    let ok = p.join("tflite/deeplabv3_257_mv_gpu.tflite").is_file()
        && p.join("voc2012/val_small/JPEGImages").is_dir();
    if !ok {
        eprintln!("skipped: ../shared/reference (TFLite models, VOC val_small) is absent");
    }
    ok.then_some(p)
}

fn index_png(path: &Path) -> Vec<u8> {
    match read_mask(path).unwrap_or_else(|e| panic!("{e}")) {
        RawMask::Index { data, .. } => data,
        RawMask::Color { .. } => panic!("{} is not an index PNG", path.display()),
    }
}

/// Converts `model`, predicts the 12 val_small images with `preprocess`, and returns the
/// fraction of pixels whose argmax (over the valid region `valid(id)`, in network-input
/// coordinates) equals the reference argmax map `<id>_<model>_<suffix>.png`.
fn agreement(root: &Path, model: &str, preprocess: &str, size: usize, suffix: &str) -> f64 {
    let t = scratch("tflite");
    let weights = t.path().join(format!("{model}.safetensors"));
    let (src, w) = (
        root.join("tflite")
            .join(format!("{model}.tflite"))
            .display()
            .to_string(),
        weights.display().to_string(),
    );
    deeplab(&["convert", &src, &w]).ok();
    let images = root.join("voc2012/val_small/JPEGImages");
    let mut ids: Vec<String> = std::fs::read_dir(&images)
        .expect("val_small")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
        })
        .collect();
    ids.sort();
    let logits = t.path().join("logits.npy");
    let out = t.path().join("pred");
    let (l, o) = (logits.display().to_string(), out.display().to_string());
    let paths: Vec<String> = ids
        .iter()
        .map(|id| images.join(format!("{id}.jpg")).display().to_string())
        .collect();
    let mut args = vec![
        "predict",
        "--weights",
        &w,
        "--out",
        &o,
        "--preprocess",
        preprocess,
        "--logits",
        &l,
    ];
    args.extend(paths.iter().map(String::as_str));
    deeplab(&args).ok();
    let (shape, data) = read_npy_f32(&logits);
    assert_eq!(shape, vec![ids.len(), 21, size, size]);
    let plane = size * size;
    let (mut same, mut total) = (0usize, 0usize);
    for (n, id) in ids.iter().enumerate() {
        let reference = index_png(
            &root
                .join("tflite/reference_outputs")
                .join(format!("{id}_{model}_{suffix}.png")),
        );
        assert_eq!(reference.len(), plane);
        let base = n * 21 * plane;
        for (p, &r) in reference.iter().enumerate() {
            let best = (0..21)
                .max_by(|&a, &b| data[base + a * plane + p].total_cmp(&data[base + b * plane + p]))
                .expect("classes");
            same += usize::from(best as u8 == r);
            total += 1;
        }
    }
    same as f64 / total as f64
}

#[test]
fn float_tflite_model_with_resize_257_reproduces_the_interpreter() {
    let Some(root) = shared() else { return };
    let a = agreement(
        &root,
        "deeplabv3_257_mv_gpu",
        "resize:257",
        257,
        "argmax257",
    );
    eprintln!(
        "float 257 model: {:.4}% of pixels agree with the TFLite interpreter",
        100.0 * a
    );
    assert!(a > 0.998, "agreement {a}");
}

#[test]
fn quantized_tflite_model_with_keep_aspect_pad_513_matches_the_interpreter() {
    let Some(root) = shared() else { return };
    let a = agreement(
        &root,
        "deeplabv3_mnv2_pascal_quant",
        "keep-aspect-pad:513",
        513,
        "argmax513",
    );
    // the weights are dequantized and run in f32, the interpreter runs uint8 arithmetic
    eprintln!(
        "quantized 513 model: {:.4}% of pixels agree with the TFLite interpreter",
        100.0 * a
    );
    assert!(a > 0.99, "agreement {a}");
}
