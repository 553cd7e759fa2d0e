//! The TensorFlow checkpoint converter: the official Xception-65 and ResNet-v1-101-beta
//! variable lists map completely onto the models, generated official-layout checkpoints
//! convert (with inference of the head), and corrupt, truncated or foreign checkpoints fail
//! with errors that name the variable and the file.

use crate::common::shared;
use deeplab_backbones::OutputStride;
use deeplab_formats::{CheckpointWriter, DType as TfDType};
use deeplab_heads::convert::{convert_file, plan_conversion, ConvertOptions};
use deeplab_heads::{DeepLabConfig, ModelError};
use std::path::Path;

/// `(name, shape)` from a `variables.txt` (`name<TAB>[a, b]<TAB>dtype`).
fn read_variables(path: &Path) -> Vec<(String, Vec<usize>)> {
    std::fs::read_to_string(path)
        .expect("variables.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let name = f.next().expect("name").to_string();
            let shape: Vec<usize> =
                serde_json::from_str(f.next().expect("shape")).expect("shape json");
            (name, shape)
        })
        .collect()
}

/// Every official variable maps to a canonical tensor the model requests, with the converted
/// shape, and every tensor the model requests is covered.
fn structure_maps_completely(file: &str, config: DeepLabConfig) {
    let Some(path) = shared(
        &format!("official/structure/{file}"),
        &format!("official structure {file}"),
    ) else {
        return;
    };
    let vars = read_variables(&path);
    let keys = config.keys().expect("keys");
    // With the configuration given ...
    let opts = ConvertOptions {
        config: Some(config.clone()),
        ..Default::default()
    };
    let plan = plan_conversion(&vars, &path, &opts).expect("plan with the given config");
    assert_eq!(
        plan.variables.len(),
        vars.len(),
        "{file}: every variable is converted"
    );
    assert_eq!(
        plan.variables.len(),
        keys.len(),
        "{file}: every model tensor is covered"
    );
    for (v, k) in plan.variables.iter().zip(&keys) {
        assert_eq!((&v.canonical, &v.shape), (&k.name, &k.shape));
    }
    // ... and inferred from the variable list alone.
    let opts = ConvertOptions {
        multi_grid: config_multi_grid(&config),
        ..Default::default()
    };
    let inferred = plan_conversion(&vars, &path, &opts).expect("plan with an inferred config");
    assert_eq!(inferred.config, config, "{file}: inferred configuration");
    println!(
        "{file}: {} variables map onto {}",
        vars.len(),
        config.backbone.name()
    );
}

fn config_multi_grid(c: &DeepLabConfig) -> Option<Vec<usize>> {
    match &c.backbone {
        deeplab_backbones::BackboneConfig::ResNet(r) => r.multi_grid.clone(),
        deeplab_backbones::BackboneConfig::Xception(x) => x.multi_grid.clone(),
        _ => None,
    }
}

#[test]
fn official_xception65_variables_map_onto_the_model() {
    structure_maps_completely(
        "A_xception65.variables.txt",
        DeepLabConfig::xception65_v3plus(21),
    );
}

#[test]
fn official_resnet101_beta_variables_map_onto_the_model() {
    structure_maps_completely(
        "C_resnet101beta.variables.txt",
        DeepLabConfig::resnet101_beta_v3plus(21),
    );
}

/// The official DeepLab channel rounding of MobileNetV2 (slim `_make_divisible`, with
/// `divisible_by = 8` at width 1.0 and 1 otherwise), restated here independently of the
/// backbone crate.
fn make_divisible(v: f64, d: usize) -> usize {
    let d = d as f64;
    let mut n = ((v + d / 2.0) / d).floor() * d;
    n = n.max(d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

/// The official variable names and TF shapes of a DeepLab MobileNetV2 model (scope
/// `MobilenetV2`, layers `Conv`, `expanded_conv`, `expanded_conv_1..16`, then the head), plus
/// `global_step`.
pub fn official_mobilenetv2_variables(
    width: f64,
    classes: usize,
    atrous: bool,
    separable: bool,
    decoder: bool,
) -> Vec<(String, Vec<usize>)> {
    let div = if width == 1.0 { 8 } else { 1 };
    let ch = |c: usize| make_divisible(c as f64 * width, div);
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let bn = |v: &mut Vec<(String, Vec<usize>)>, scope: &str, c: usize| {
        for leaf in ["gamma", "beta", "moving_mean", "moving_variance"] {
            v.push((format!("{scope}/BatchNorm/{leaf}"), vec![c]));
        }
    };
    let conv =
        |v: &mut Vec<(String, Vec<usize>)>, scope: &str, k: usize, cin: usize, cout: usize| {
            v.push((format!("{scope}/weights"), vec![k, k, cin, cout]));
            bn(v, scope, cout);
        };
    let dw = |v: &mut Vec<(String, Vec<usize>)>, scope: &str, c: usize| {
        v.push((format!("{scope}/depthwise_weights"), vec![3, 3, c, 1]));
        bn(v, scope, c);
    };
    let mut cin = ch(32);
    conv(&mut v, "MobilenetV2/Conv", 3, 3, cin);
    // (t, c, n) rows of the paper's Table 2; `expanded_conv` is the single t=1 block.
    let rows = [
        (1, 16, 1),
        (6, 24, 2),
        (6, 32, 3),
        (6, 64, 4),
        (6, 96, 3),
        (6, 160, 3),
        (6, 320, 1),
    ];
    let mut k = 0;
    let mut low = 0;
    for (t, c, n) in rows {
        for _ in 0..n {
            let scope = if k == 0 {
                "MobilenetV2/expanded_conv".to_string()
            } else {
                format!("MobilenetV2/expanded_conv_{k}")
            };
            let cout = ch(c);
            let mid = if t == 1 {
                cin
            } else {
                make_divisible((cin * t) as f64, 8)
            };
            if t != 1 {
                conv(&mut v, &format!("{scope}/expand"), 1, cin, mid);
            }
            dw(&mut v, &format!("{scope}/depthwise"), mid);
            conv(&mut v, &format!("{scope}/project"), 1, mid, cout);
            if k == 2 {
                low = mid;
            }
            cin = cout;
            k += 1;
        }
    }
    conv(&mut v, "image_pooling", 1, cin, 256);
    conv(&mut v, "aspp0", 1, cin, 256);
    let branches = if atrous { 3 } else { 0 };
    for i in 1..=branches {
        if separable {
            dw(&mut v, &format!("aspp{i}_depthwise"), cin);
            conv(&mut v, &format!("aspp{i}_pointwise"), 1, cin, 256);
        } else {
            conv(&mut v, &format!("aspp{i}"), 3, cin, 256);
        }
    }
    conv(&mut v, "concat_projection", 1, 256 * (2 + branches), 256);
    if decoder {
        conv(&mut v, "decoder/feature_projection0", 1, low, 48);
        let mut c = 304;
        for j in 0..2 {
            if separable {
                dw(&mut v, &format!("decoder/decoder_conv{j}_depthwise"), c);
                conv(
                    &mut v,
                    &format!("decoder/decoder_conv{j}_pointwise"),
                    1,
                    c,
                    256,
                );
            } else {
                conv(
                    &mut v,
                    &format!("decoder/decoder_conv0/decoder_conv0_{}", j + 1),
                    3,
                    c,
                    256,
                );
            }
            c = 256;
        }
    }
    v.push(("logits/semantic/weights".into(), vec![1, 1, 256, classes]));
    v.push(("logits/semantic/biases".into(), vec![classes]));
    v.push(("global_step".into(), vec![]));
    v
}

/// Writes the variables with seeded random values (BatchNorm variances positive) and an int64
/// `global_step`.
pub fn write_random_checkpoint(prefix: &Path, vars: &[(String, Vec<usize>)], seed: u64) {
    let mut w = CheckpointWriter::create(prefix).expect("writer");
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for (name, shape) in vars {
        if name == "global_step" {
            w.add_raw(name, TfDType::I64, &[], &30000i64.to_le_bytes())
                .expect("global_step");
            continue;
        }
        let n: usize = shape.iter().product();
        let fan_in: usize = shape
            .iter()
            .take(shape.len().saturating_sub(1))
            .product::<usize>()
            .max(1);
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                let r = next();
                if name.ends_with("moving_variance") {
                    0.5 + r.abs()
                } else if name.ends_with("gamma") {
                    1.0 + 0.2 * r
                } else if name.ends_with("weights") {
                    r * (3.0 / fan_in as f32).sqrt()
                } else {
                    0.1 * r
                }
            })
            .collect();
        w.add_f32(name, shape, &vals).expect("add");
    }
    w.finish().expect("finish");
}

#[test]
fn generated_checkpoints_infer_their_head() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The model-zoo MobileNetV2 head (image pooling + 1x1, no decoder) at width 1.0.
    let prefix = tmp.path().join("d.ckpt");
    write_random_checkpoint(
        &prefix,
        &official_mobilenetv2_variables(1.0, 21, false, false, false),
        1,
    );
    let out = tmp.path().join("d.safetensors");
    let opts = ConvertOptions {
        eval_output_stride: Some(OutputStride::Os8),
        ..Default::default()
    };
    let conv = convert_file(&prefix, &out, &opts).expect("convert");
    let mut want = DeepLabConfig::mobilenetv2_v3(21);
    want.eval_output_stride = Some(OutputStride::Os8);
    assert_eq!(conv.config, want);
    let back = deeplab_heads::weights::read_config(&out).expect("config from the header");
    assert_eq!(back, want);
    assert!(
        deeplab_heads::DeepLabModel::load_with(&out, &candle_core::Device::Cpu, |c| c.for_eval())
            .is_ok()
    );

    // Plain (slim.repeat-named) decoder and plain atrous ASPP, OS8 rates given.
    let prefix = tmp.path().join("p.ckpt");
    write_random_checkpoint(
        &prefix,
        &official_mobilenetv2_variables(0.5, 5, true, false, true),
        2,
    );
    let opts = ConvertOptions {
        output_stride: Some(OutputStride::Os8),
        atrous_rates: Some(vec![12, 24, 36]),
        ..Default::default()
    };
    let conv = convert_file(&prefix, tmp.path().join("p.safetensors"), &opts).expect("convert");
    let d = conv.config.decoder.as_ref().expect("decoder");
    assert!(!d.separable && d.num_convs == 2 && !conv.config.aspp.separable);
    assert_eq!(conv.config.output_stride(), OutputStride::Os8);
    assert!(conv.mapping.iter().any(|(tf, c)| tf
        == "decoder/decoder_conv0/decoder_conv0_2/weights"
        && c == "decoder.convs.1.conv.weight"));

    // Wrong number of rates is a configuration error naming the checkpoint.
    let opts = ConvertOptions {
        atrous_rates: Some(vec![6, 12]),
        ..Default::default()
    };
    let e = convert_file(&prefix, tmp.path().join("x.safetensors"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.ckpt") && e.contains("atrous"), "{e}");
    assert!(
        !tmp.path().join("x.safetensors").exists(),
        "nothing written on failure"
    );
}

#[test]
fn unknown_and_misshaped_variables_name_the_variable_and_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut vars = official_mobilenetv2_variables(1.0, 21, false, false, false);
    vars.push(("aspp0/extra_thing/weights".into(), vec![1, 1, 320, 256]));
    let prefix = tmp.path().join("unk.ckpt");
    write_random_checkpoint(&prefix, &vars, 3);
    let e = convert_file(
        &prefix,
        tmp.path().join("o.safetensors"),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("unk.ckpt")
            && msg.contains("aspp0/extra_thing/weights")
            && msg.contains("unknown"),
        "{msg}"
    );

    let mut vars = official_mobilenetv2_variables(1.0, 21, false, false, false);
    for v in vars.iter_mut() {
        if v.0 == "MobilenetV2/expanded_conv_5/project/weights" {
            v.1 = vec![1, 1, 192, 33];
        }
    }
    let prefix = tmp.path().join("bad.ckpt");
    write_random_checkpoint(&prefix, &vars, 4);
    let msg = convert_file(
        &prefix,
        tmp.path().join("o.safetensors"),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("bad.ckpt") && msg.contains("MobilenetV2/expanded_conv_5/project/weights"),
        "{msg}"
    );

    // A variable missing from the checkpoint.
    let vars: Vec<_> = official_mobilenetv2_variables(1.0, 21, false, false, false)
        .into_iter()
        .filter(|v| v.0 != "concat_projection/BatchNorm/beta")
        .collect();
    let prefix = tmp.path().join("miss.ckpt");
    write_random_checkpoint(&prefix, &vars, 5);
    let msg = convert_file(
        &prefix,
        tmp.path().join("o.safetensors"),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("miss.ckpt") && msg.contains("aspp.project.bn.bias"),
        "{msg}"
    );

    // A checkpoint of something else entirely.
    let prefix = tmp.path().join("other.ckpt");
    write_random_checkpoint(
        &prefix,
        &[("vgg_16/conv1/conv1_1/weights".into(), vec![3, 3, 3, 64])],
        6,
    );
    let msg = convert_file(
        &prefix,
        tmp.path().join("o.safetensors"),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("other.ckpt") && msg.contains("backbone"),
        "{msg}"
    );
}

#[test]
fn corrupt_and_truncated_checkpoints_fail_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = tmp.path().join("model.ckpt");
    write_random_checkpoint(
        &prefix,
        &official_mobilenetv2_variables(1.0, 21, false, false, false),
        8,
    );
    let data = tmp.path().join("model.ckpt.data-00000-of-00001");
    let index = tmp.path().join("model.ckpt.index");
    let full = std::fs::read(&data).expect("data");
    let idx = std::fs::read(&index).expect("index");
    let out = tmp.path().join("o.safetensors");

    // Truncated data shard: the variable that runs past the end is named, with the file.
    std::fs::write(&data, &full[..full.len() / 2]).expect("truncate");
    let msg = convert_file(&prefix, &out, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.ckpt") && (msg.contains("truncated") || msg.contains("'")),
        "{msg}"
    );

    // A flipped byte in the data: checksum error naming the variable.
    let mut bad = full.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&data, &bad).expect("corrupt");
    let msg = convert_file(&prefix, &out, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("checksum") && msg.contains("variable"),
        "{msg}"
    );

    // Truncated index.
    std::fs::write(&data, &full).expect("restore");
    std::fs::write(&index, &idx[..idx.len() / 3]).expect("truncate index");
    let msg = convert_file(&prefix, &out, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("model.ckpt.index"), "{msg}");
    assert!(!out.exists());

    // Missing checkpoint.
    let msg = convert_file(
        tmp.path().join("nope.ckpt"),
        &out,
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("nope.ckpt"), "{msg}");
    assert!(matches!(
        convert_file(
            tmp.path().join("nope.ckpt"),
            &out,
            &ConvertOptions::default()
        ),
        Err(ModelError::Checkpoint(_))
    ));
}

/// A model-zoo style `.tar.gz` converts as it is.
#[test]
fn tar_gz_archives_convert() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("deeplabv3_test");
    std::fs::create_dir(&dir).expect("dir");
    write_random_checkpoint(
        &dir.join("model.ckpt-30000"),
        &official_mobilenetv2_variables(1.0, 21, false, false, false),
        9,
    );
    let tgz = tmp.path().join("deeplabv3_test.tar.gz");
    let f = std::fs::File::create(&tgz).expect("create");
    let enc = gzip_writer(f);
    let mut tar = tar_builder(enc);
    for name in [
        "model.ckpt-30000.index",
        "model.ckpt-30000.data-00000-of-00001",
    ] {
        tar.append_path_with_name(dir.join(name), format!("deeplabv3_test/{name}"))
            .expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip");
    let out = tmp.path().join("zoo.safetensors");
    let conv = convert_file(&tgz, &out, &ConvertOptions::default()).expect("convert tar.gz");
    assert_eq!(conv.config, DeepLabConfig::mobilenetv2_v3(21));
    assert!(out.exists());

    // Errors about a checkpoint inside an archive name the archive.
    let opts = ConvertOptions {
        atrous_rates: Some(vec![6]),
        ..Default::default()
    };
    let msg = convert_file(&tgz, tmp.path().join("o.safetensors"), &opts)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("deeplabv3_test.tar.gz"), "{msg}");
    let bytes = std::fs::read(&tgz).expect("read");
    let cut = tmp.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let msg = convert_file(
        &cut,
        tmp.path().join("o.safetensors"),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("cut.tar.gz"), "{msg}");
}

fn gzip_writer(f: std::fs::File) -> flate2::write::GzEncoder<std::fs::File> {
    flate2::write::GzEncoder::new(f, flate2::Compression::fast())
}

fn tar_builder<W: std::io::Write>(w: W) -> tar::Builder<W> {
    tar::Builder::new(w)
}
