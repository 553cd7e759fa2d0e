//! Numeric parity with the official TensorFlow DeepLab (`../shared/reference/official/`):
//! the checkpoints are converted, run on `input.npy`, and the logits, upsampled logits,
//! predictions and every named intermediate are compared with the reference dumps.

use crate::common::{npy_nchw, rel_err, shared};
use candle_core::{DType, Device, Tensor};
use deeplab_heads::convert::{convert_file, ConvertOptions};
use deeplab_heads::npy::read_npy;
use deeplab_heads::{DeepLabConfig, DeepLabModel, FoldBatchNorm};
use std::path::Path;

/// Reference intermediate name -> ours, where they differ.
fn our_name(reference: &str) -> &str {
    match reference {
        // D dumps the stride-4 tap under the end-point name.
        "backbone_layer_4_depthwise_output" => "low_level_feature",
        "backbone_input_preprocessed" => "input_normalized",
        other => other,
    }
}

struct Report {
    rows: Vec<(String, f32)>,
    not_compared: Vec<String>,
}

/// Converts `set`'s checkpoint, runs it, and checks everything; returns the measured errors.
fn check_official(set: &str, expected: &DeepLabConfig) -> Option<Report> {
    let dir = shared(
        &format!("official/{set}"),
        &format!("official parity {set}"),
    )?;
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("model.safetensors");
    let conv =
        convert_file(dir.join("model.ckpt"), &out, &ConvertOptions::default()).expect("convert");
    assert_eq!(&conv.config, expected, "inferred configuration of {set}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).expect("meta"))
            .expect("json");
    let n_vars = meta["num_variables"].as_u64().expect("num_variables") as usize;
    assert_eq!(conv.mapping.len(), n_vars, "every variable converted");

    let model = DeepLabModel::load(&out, &Device::Cpu).expect("load");
    // Parameter count: the official graph counts every variable (moving statistics included).
    let count = model.count((129, 129)).expect("count");
    assert_eq!(
        count.params + count.buffers,
        meta["num_params"].as_u64().expect("num_params"),
        "{set}: parameters"
    );

    let raw = npy_nchw(&dir.join("input.npy"));
    let x = model.normalize(&raw).expect("normalize");
    let mut inter = model.forward_with_intermediates(&x).expect("forward");
    inter.insert("input_normalized", &x);

    let mut rows = Vec::new();
    let mut check = |name: &str, ours: &Tensor, reference: &Tensor| {
        let e = rel_err(ours, reference).expect("compare");
        rows.push((name.to_string(), e));
        assert!(
            e <= 1e-4,
            "{set}: {name} differs from the official output by {e:.3e} of its scale"
        );
    };
    check(
        "logits",
        inter.get("logits").expect("logits"),
        &npy_nchw(&dir.join("logits.npy")),
    );
    let up_ref = npy_nchw(&dir.join("logits_upsampled.npy"));
    let up = inter.get("logits_upsampled").expect("upsampled").clone();
    check("logits_upsampled", &up, &up_ref);

    // Intermediates.
    let refs = candle_core::safetensors::load(
        dir.join("intermediates/intermediates.safetensors"),
        &Device::Cpu,
    )
    .expect("intermediates");
    let mut names: Vec<&String> = refs.keys().collect();
    names.sort();
    let mut not_compared = Vec::new();
    for name in names {
        let r = refs[name].permute((0, 3, 1, 2)).expect("nchw");
        match inter.get(our_name(name)) {
            Some(ours) => check(name, ours, &r),
            None => not_compared.push(name.clone()),
        }
    }
    // Only backbone-internal layers may be missing (the backbone exposes its two taps only).
    for n in &not_compared {
        assert!(
            n.starts_with("backbone_"),
            "{set}: intermediate {n} not produced"
        );
    }

    check_predictions(set, &up, &up_ref, &dir.join("predictions.npy"));

    // The same with every BatchNorm folded into its convolution (the inference default).
    let mut folded = model;
    folded.fold_batch_norm().expect("fold");
    let finter = folded
        .forward_with_intermediates(&x)
        .expect("folded forward");
    check(
        "folded: logits",
        finter.get("logits").expect("logits"),
        &npy_nchw(&dir.join("logits.npy")),
    );
    let fup = finter.get("logits_upsampled").expect("upsampled").clone();
    check("folded: logits_upsampled", &fup, &up_ref);
    check_predictions(set, &fup, &up_ref, &dir.join("predictions.npy"));
    // folding changes no arithmetic: every tap is bit-identical to the unfolded model's
    for name in [
        "backbone_features",
        "low_level_feature",
        "aspp_output",
        "logits",
    ] {
        let (a, b) = (finter.get(name), inter.get(name));
        let (a, b) = (a.expect("folded tap"), b.expect("tap"));
        let same = a
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec")
            == b.flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec");
        assert!(
            same,
            "{set}: folded {name} differs from the unfolded model's"
        );
    }
    // a folded model refuses to train
    let e = folded
        .forward_output(&x, true)
        .expect_err("folded model must not train")
        .to_string();
    assert!(e.contains("folded"), "{e}");
    Some(Report { rows, not_compared })
}

/// ≥ 99.9% of the argmax pixels identical, and every differing pixel a near-tie of the
/// reference logits (top-2 gap below 1e-3 of the logits' scale).
fn check_predictions(set: &str, ours: &Tensor, reference: &Tensor, pred_path: &Path) {
    let pred = read_npy(pred_path).expect("predictions");
    let want = pred.to_i64(pred_path).expect("int predictions");
    let got: Vec<u32> = ours
        .argmax(1)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("argmax");
    assert_eq!(got.len(), want.len());
    let (_, c, h, w) = reference.dims4().expect("dims");
    let r: Vec<f32> = reference
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("ref");
    let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut differ = 0;
    for p in 0..h * w {
        if got[p] as i64 != want[p] {
            differ += 1;
            let mut v: Vec<f32> = (0..c).map(|k| r[k * h * w + p]).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            let gap = v[0] - v[1];
            assert!(
                gap <= 1e-3 * scale,
                "{set}: pixel {p} differs (ours {}, official {}) with a top-2 gap of {gap}",
                got[p],
                want[p]
            );
        }
    }
    let same = 1.0 - differ as f64 / (h * w) as f64;
    println!(
        "{set}: {:.4}% of predictions identical ({differ} of {} differ)",
        same * 100.0,
        h * w
    );
    assert!(same >= 0.999, "{set}: only {:.4}% identical", same * 100.0);
}

fn print(set: &str, r: &Report) {
    println!("{set}: max error relative to each tensor's scale");
    for (n, e) in &r.rows {
        println!("  {n:<40} {e:.2e}");
    }
    if !r.not_compared.is_empty() {
        println!(
            "  backbone-internal, not exposed by the backbone: {}",
            r.not_compared.join(", ")
        );
    }
}

#[test]
fn official_mobilenetv2_os16_image_pooling_head() {
    let mut want = DeepLabConfig::mobilenetv2_v3(21);
    want.aspp.separable = false;
    if let Some(r) = check_official("D_mobilenetv2_os16", &want) {
        print("D_mobilenetv2_os16", &r);
    }
}

#[test]
fn official_mobilenetv2_v3plus_separable_os16() {
    let want = DeepLabConfig::mobilenetv2_v3plus(21);
    if let Some(r) = check_official("E_mobilenetv2_v3plus_os16", &want) {
        print("E_mobilenetv2_v3plus_os16", &r);
    }
}

/// The converter writes exactly the checkpoint's values, permuted: for every variable the
/// reader returns, the canonical tensor in the written file holds the same numbers at the
/// converted positions.
#[test]
fn converted_file_holds_the_checkpoint_values() {
    let Some(dir) = shared(
        "official/E_mobilenetv2_v3plus_os16",
        "official checkpoint value check",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("e.safetensors");
    let conv =
        convert_file(dir.join("model.ckpt"), &out, &ConvertOptions::default()).expect("convert");
    let ckpt = deeplab_formats::Checkpoint::open(dir.join("model.ckpt")).expect("open");
    let file = deeplab_heads::weights::read_weights(&out, &Device::Cpu).expect("read");
    for (tf, canonical) in &conv.mapping {
        let info = ckpt.entry(tf).expect("entry");
        let v = ckpt.read_f32(tf).expect("read");
        let t = &file.tensors[canonical];
        let ours: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        match info.shape.as_slice() {
            &[kh, kw, ci, co] if canonical.ends_with("weight") && t.dims()[1] == ci => {
                for (y, x, i, o) in [
                    (0, 0, 0, 0),
                    (kh - 1, kw - 1, ci - 1, co - 1),
                    (kh / 2, kw - 1, ci / 2, co / 3),
                ] {
                    assert_eq!(
                        ours[((o * ci + i) * kh + y) * kw + x],
                        v[((y * kw + x) * ci + i) * co + o],
                        "{tf}"
                    );
                }
            }
            &[kh, kw, c, 1] => {
                for (y, x, ch) in [(0, 0, 0), (kh - 1, kw - 1, c - 1), (kh / 2, 0, c / 2)] {
                    assert_eq!(
                        ours[(ch * kh + y) * kw + x],
                        v[(y * kw + x) * c + ch],
                        "{tf}"
                    );
                }
            }
            &[_] => assert_eq!(ours, v, "{tf}"),
            s => panic!("{tf}: unexpected shape {s:?}"),
        }
        let mut sorted_ours = ours.clone();
        let mut sorted_tf = v.clone();
        sorted_ours.sort_by(f32::total_cmp);
        sorted_tf.sort_by(f32::total_cmp);
        assert_eq!(sorted_ours, sorted_tf, "{tf}: the same multiset of values");
    }
}

/// Official-layout random weights written with the formats crate's checkpoint writer, under
/// names generated here from the official naming scheme (independently of the converter's
/// tables); converted, loaded and run. Needs nothing from ../shared.
#[test]
fn generated_official_checkpoint_converts_and_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = tmp.path().join("model.ckpt");
    let vars = crate::convert::official_mobilenetv2_variables(0.5, 12, true, true, true);
    crate::convert::write_random_checkpoint(&prefix, &vars, 7);
    let out = tmp.path().join("gen.safetensors");
    let conv = convert_file(&prefix, &out, &ConvertOptions::default()).expect("convert");
    assert_eq!(conv.config.backbone.name(), "mobilenetv2_050_deeplab");
    assert_eq!(conv.config.num_classes, 12);
    assert_eq!(conv.config.aspp.atrous_rates, vec![6, 12, 18]);
    assert!(
        conv.config.aspp.separable && conv.config.decoder.as_ref().is_some_and(|d| d.separable)
    );
    assert_eq!(conv.skipped, vec!["global_step".to_string()]);
    let model = DeepLabModel::load(&out, &Device::Cpu).expect("load");
    let x = Tensor::rand(0f32, 255f32, (1, 3, 65, 49), &Device::Cpu).expect("rand");
    let y = model
        .forward_output(&model.normalize(&x).expect("norm"), false)
        .expect("forward");
    assert_eq!(y.upsampled.dims(), &[1, 12, 65, 49]);
    assert_eq!(y.logits.dims(), &[1, 12, 17, 13]);
    let finite = y
        .upsampled
        .to_dtype(DType::F32)
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0));
    assert!(finite
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max")
        .is_finite());

    // Spot-check layouts against the values that were written: the 1x1 logits conv and a
    // depthwise kernel.
    let ckpt = deeplab_formats::Checkpoint::open(&prefix).expect("open");
    let file = deeplab_heads::weights::read_weights(&out, &Device::Cpu).expect("read");
    let w = ckpt.read_f32("logits/semantic/weights").expect("w"); // [1, 1, 256, 12]
    let ours = file.tensors["classifier.weight"]
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("ours");
    for (i, o) in [(0, 0), (255, 11), (100, 5)] {
        assert_eq!(ours[o * 256 + i], w[i * 12 + o]);
    }
    let d = ckpt
        .read_f32("aspp2_depthwise/depthwise_weights")
        .expect("dw"); // [3, 3, C, 1]
    let c = file.tensors["aspp.convs.2.conv_dw.weight"].dims()[0];
    let ours = file.tensors["aspp.convs.2.conv_dw.weight"]
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("ours");
    for (y, x, ch) in [(0, 2, 0), (2, 1, c - 1), (1, 1, 7)] {
        assert_eq!(ours[(ch * 3 + y) * 3 + x], d[(y * 3 + x) * c + ch]);
    }
}

/// Each stage of the head fed the official input of that stage (the reference dump of the
/// previous stage), so its own error is measured without the backbone's accumulated rounding:
/// ASPP from `backbone_features`, the decoder from `aspp_output` and `low_level_feature`, the
/// logits from `decoder_conv1`.
#[test]
fn official_head_stages_in_isolation() {
    let Some(dir) = shared(
        "official/E_mobilenetv2_v3plus_os16",
        "official stage-by-stage parity",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("e.safetensors");
    convert_file(dir.join("model.ckpt"), &out, &ConvertOptions::default()).expect("convert");
    let model = DeepLabModel::load(&out, &Device::Cpu).expect("load");
    let refs = candle_core::safetensors::load(
        dir.join("intermediates/intermediates.safetensors"),
        &Device::Cpu,
    )
    .expect("intermediates");
    let r = |n: &str| {
        refs[n]
            .permute((0, 3, 1, 2))
            .and_then(|t| t.contiguous())
            .expect("nchw")
    };
    let aspp = model
        .aspp()
        .forward_rec(&r("backbone_features"), false, None)
        .expect("aspp");
    let e_aspp = rel_err(&aspp, &r("aspp_output")).expect("err");
    let dec = model
        .decoder()
        .expect("decoder")
        .forward_rec(
            &r("aspp_output"),
            &r("low_level_feature"),
            (129, 129),
            false,
            None,
        )
        .expect("decoder");
    let e_dec = rel_err(&dec, &r("decoder_conv1")).expect("err");
    let logits =
        candle_core::Module::forward(model.classifier(), &r("decoder_conv1")).expect("logits");
    let e_log = rel_err(&logits, &r("logits_conv")).expect("err");
    println!("stage errors: aspp {e_aspp:.2e}, decoder {e_dec:.2e}, logits {e_log:.2e}");
    for (n, e) in [("aspp", e_aspp), ("decoder", e_dec), ("logits", e_log)] {
        assert!(e <= 1e-5, "{n}: {e:.3e}");
    }
}
