//! `deeplab eval` prints the per-class table and writes JSON whose numbers are exactly what the
//! data crate computes from the predictions; `deeplab predict` writes the three PNGs and the
//! logits.

use crate::common::fixture;
use deeplab_data::io::{read_mask, RawMask};
use deeplab_data::{BoundaryDefinition, ConfusionMatrix, Dataset, TrimapMetric};
use deeplab_e2e::{deeplab, read_npy_f32, scratch};
use std::path::Path;

fn index_png(path: &Path) -> (u32, u32, Vec<u8>) {
    match read_mask(path).unwrap_or_else(|e| panic!("{e}")) {
        RawMask::Index {
            width,
            height,
            data,
        } => (width, height, data),
        RawMask::Color { .. } => panic!("{} is not an index PNG", path.display()),
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("valid JSON")
}

/// Runs eval (with `preprocess`, or the default) and predict (with the same preprocessing) on
/// the val split and checks eval's table and JSON against the data crate's metrics of predict's
/// label maps.
fn check_eval_matches(preprocess: Option<&str>, expect_protocol: &str) {
    let f = fixture();
    let t = scratch("eval");
    let (data, model) = (f.data.display().to_string(), f.model.display().to_string());
    let json_p = t.path().join("metrics.json");
    let out = t.path().join("eval-out");
    let (jp, op) = (json_p.display().to_string(), out.display().to_string());
    let mut args = vec![
        "eval",
        "--data",
        &data,
        "--weights",
        &model,
        "--json",
        &jp,
        "--out",
        &op,
        "--trimap",
        "1,3",
    ];
    if let Some(p) = preprocess {
        args.extend(["--preprocess", p]);
    }
    let eval = deeplab(&args).ok();

    let ds = Dataset::voc(&f.data, "val").expect("val split");
    let pred_dir = t.path().join("pred");
    let pd = pred_dir.display().to_string();
    let images: Vec<String> = ds
        .entries()
        .iter()
        .map(|e| e.image.display().to_string())
        .collect();
    let mut pargs = vec!["predict", "--weights", &model, "--out", &pd];
    pargs.extend(images.iter().map(String::as_str));
    if let Some(p) = preprocess {
        pargs.extend(["--preprocess", p]);
    } else {
        pargs.extend(["--preprocess", "pad"]);
    }
    deeplab(&pargs).ok();

    let k = ds.num_classes();
    let mut cm = ConfusionMatrix::new(k).expect("matrix");
    let mut trimap =
        TrimapMetric::new(k, &[1, 3], BoundaryDefinition::LabelChange).expect("trimap");
    for (i, e) in ds.entries().iter().enumerate() {
        let sample = ds.load(i).expect("sample");
        let (w, h, pred) = index_png(&pred_dir.join(format!("{}_label.png", e.id)));
        assert_eq!((w, h), sample.label.dimensions(), "{}", e.id);
        cm.update(sample.label.as_slice(), &pred).expect("update");
        trimap
            .update(sample.label.as_slice(), &pred, w as usize, h as usize)
            .expect("trimap update");
        // eval's own saved prediction is the same label map
        let (_, _, saved) = index_png(&out.join(format!("{}.png", e.id)));
        assert_eq!(saved, pred, "{}: eval and predict disagree", e.id);
    }
    let s = cm.summary();
    let names = ds.classes().names();
    // the printed table is the data crate's table
    assert!(
        eval.stdout.contains(&s.to_table(&names)),
        "table mismatch:\n{}\nexpected:\n{}",
        eval.stdout,
        s.to_table(&names)
    );
    assert!(
        eval.stdout.contains("trimap band   1 px"),
        "{}",
        eval.stdout
    );
    for j in [json(&json_p), json(&out.join("metrics.json"))] {
        assert_eq!(j["preprocess"], expect_protocol);
        let matrix: Vec<Vec<u64>> =
            serde_json::from_value(j["confusion_matrix"].clone()).expect("matrix");
        for (r, row) in matrix.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert_eq!(*v, cm.count(r, c), "confusion[{r}][{c}]");
            }
        }
        let close = |key: &str, want: f64| {
            let got = j[key].as_f64().unwrap_or(f64::NAN);
            assert!((got - want).abs() < 1e-12, "{key}: {got} vs {want}");
        };
        close("mean_iou", s.mean_iou);
        close("pixel_accuracy", s.pixel_accuracy);
        close("mean_class_accuracy", s.mean_class_accuracy);
        close("frequency_weighted_iou", s.frequency_weighted_iou);
        assert_eq!(j["pixels"].as_u64(), Some(s.pixels));
        assert_eq!(j["images"].as_u64(), Some(ds.len() as u64));
        for (i, iou) in s.iou.iter().enumerate() {
            match iou {
                Some(v) => assert!((j["iou"][i].as_f64().unwrap_or(f64::NAN) - v).abs() < 1e-12),
                None => assert!(j["iou"][i].is_null()),
            }
        }
        let tm = trimap.mean_ious();
        for (n, (w, m)) in tm.iter().enumerate() {
            assert_eq!(j["trimap"][n]["width"].as_u64(), Some(*w as u64));
            assert!((j["trimap"][n]["mean_iou"].as_f64().unwrap_or(f64::NAN) - m).abs() < 1e-12);
        }
    }
    assert!(out.join("confusion_matrix.png").is_file());
}

#[test]
fn eval_native_table_and_json_equal_the_data_crate_metrics() {
    check_eval_matches(Some("native"), "native");
}

#[test]
fn eval_default_pads_to_the_trained_crop_and_matches_predict() {
    // the fixture was trained with --crop 65, recorded in the weight file
    check_eval_matches(None, "pad:65x65");
}

#[test]
fn predict_writes_mask_overlay_label_and_logits() {
    let f = fixture();
    let t = scratch("predict");
    let model = f.model.display().to_string();
    let img = f.data.join("JPEGImages").join("val_0000.jpg");
    let out = t.path().join("p");
    let logits = t.path().join("logits.npy");
    let (im, o, l) = (
        img.display().to_string(),
        out.display().to_string(),
        logits.display().to_string(),
    );
    let r = deeplab(&[
        "predict",
        &im,
        "--weights",
        &model,
        "--out",
        &o,
        "--logits",
        &l,
    ])
    .ok();
    assert!(r.stdout.contains("val_0000_mask.png"), "{}", r.stdout);
    let src = deeplab_data::io::read_rgb_image(&img).expect("image");
    let (w, h) = src.dimensions();
    let mask = deeplab_data::image::open(out.join("val_0000_mask.png"))
        .expect("mask PNG")
        .to_rgb8();
    let overlay = deeplab_data::image::open(out.join("val_0000_overlay.png"))
        .expect("overlay PNG")
        .to_rgb8();
    assert_eq!(mask.dimensions(), (w, h));
    assert_eq!(overlay.dimensions(), (w, h));
    let (lw, lh, label) = index_png(&out.join("val_0000_label.png"));
    assert_eq!((lw, lh), (w, h));
    let palette = deeplab_data::synthetic::synthetic_classes().palette();
    for (px, &id) in mask.pixels().zip(&label) {
        assert!(id < 5, "label {id}");
        assert_eq!(
            px.0,
            palette.color(id),
            "the colored mask paints the label's class color"
        );
    }
    // logits: N x classes x H x W at the native size; their argmax is the label map
    let (shape, data) = read_npy_f32(&logits);
    assert_eq!(shape, vec![1, 5, h as usize, w as usize]);
    let plane = (w * h) as usize;
    for (p, &id) in label.iter().enumerate() {
        let best = (0..5)
            .max_by(|&a, &b| data[a * plane + p].total_cmp(&data[b * plane + p]))
            .expect("classes");
        assert_eq!(best as u8, id, "pixel {p}");
    }

    // a directory of images, stretched to 33x33: one logits tensor for all of them
    let dir_out = t.path().join("d");
    let dl = t.path().join("dir.npy");
    let jpegs = f.data.join("JPEGImages");
    let (j, d, dlp) = (
        jpegs.display().to_string(),
        dir_out.display().to_string(),
        dl.display().to_string(),
    );
    deeplab(&[
        "predict",
        &j,
        "--weights",
        &model,
        "--out",
        &d,
        "--resize",
        "33",
        "--logits",
        &dlp,
    ])
    .ok();
    let (shape, _) = read_npy_f32(&dl);
    assert_eq!(shape, vec![12, 5, 33, 33]);
    assert!(dir_out.join("train_0000_overlay.png").is_file());
    let (lw, lh, _) = index_png(&dir_out.join("train_0003_label.png"));
    let (iw, ih) = deeplab_data::io::read_rgb_image(jpegs.join("train_0003.jpg"))
        .expect("image")
        .dimensions();
    assert_eq!(
        (lw, lh),
        (iw, ih),
        "labels are resized back to the image size"
    );
}
