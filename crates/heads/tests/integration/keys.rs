//! Key contracts and shapes of every head configuration, built without weights.
//!
//! The expected head keys are written out here from the documented scheme (not read back from
//! the model); backbone keys are compared with timm's state-dict lists in
//! `../shared/reference/keys/` when present.

use crate::common::shared;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deeplab_backbones::{BackboneConfig, OutputStride};
use deeplab_heads::{
    AsppSettings, DecoderSettings, DeepLabConfig, DeepLabModel, DeepLabV3, DeepLabV3Plus,
};
use deeplab_ops::scale_dimension;

type Keys = Vec<(String, Vec<usize>)>;

fn bn(out: &mut Keys, p: &str, c: usize) {
    for f in ["weight", "bias", "running_mean", "running_var"] {
        out.push((format!("{p}.{f}"), vec![c]));
    }
}

fn conv_bn(out: &mut Keys, p: &str, cin: usize, cout: usize, k: usize) {
    out.push((format!("{p}.conv.weight"), vec![cout, cin, k, k]));
    bn(out, &format!("{p}.bn"), cout);
}

fn separable(out: &mut Keys, p: &str, cin: usize, cout: usize) {
    out.push((format!("{p}.conv_dw.weight"), vec![cin, 1, 3, 3]));
    bn(out, &format!("{p}.bn_dw"), cin);
    out.push((format!("{p}.conv_pw.weight"), vec![cout, cin, 1, 1]));
    bn(out, &format!("{p}.bn_pw"), cout);
}

/// The documented head keys of a configuration whose backbone gives `high` channels at the
/// output stride and `low` at stride 4.
fn expected_head_keys(c: &DeepLabConfig, high: usize, low: usize) -> Keys {
    let mut k = Vec::new();
    let a = c.aspp.channels;
    if c.aspp.image_pooling {
        conv_bn(&mut k, "aspp.pooling", high, a, 1);
    }
    conv_bn(&mut k, "aspp.convs.0", high, a, 1);
    for i in 1..=c.aspp.atrous_rates.len() {
        if c.aspp.separable {
            separable(&mut k, &format!("aspp.convs.{i}"), high, a);
        } else {
            conv_bn(&mut k, &format!("aspp.convs.{i}"), high, a, 3);
        }
    }
    let branches = 1 + usize::from(c.aspp.image_pooling) + c.aspp.atrous_rates.len();
    conv_bn(&mut k, "aspp.project", branches * a, a, 1);
    let mut head = a;
    if let Some(d) = &c.decoder {
        conv_bn(&mut k, "decoder.project", low, d.projection_channels, 1);
        let mut cin = a + d.projection_channels;
        for j in 0..d.num_convs {
            if d.separable {
                separable(&mut k, &format!("decoder.convs.{j}"), cin, d.channels);
            } else {
                conv_bn(&mut k, &format!("decoder.convs.{j}"), cin, d.channels, 3);
            }
            cin = d.channels;
        }
        head = d.channels;
    }
    k.push(("classifier.weight".into(), vec![c.num_classes, head, 1, 1]));
    k.push(("classifier.bias".into(), vec![c.num_classes]));
    k
}

/// Every head variant over a backbone: image pooling on/off, rates none or three, plain or
/// separable, no decoder or 1-3 plain or separable decoder convs.
fn head_variants(backbone: BackboneConfig, classes: usize) -> Vec<DeepLabConfig> {
    let mut v = Vec::new();
    let base = DeepLabConfig::v3(
        backbone,
        classes,
        false,
        deeplab_heads::InputNormalization::Official,
    );
    let rates = base.aspp.atrous_rates.clone();
    for image_pooling in [true, false] {
        for atrous in [true, false] {
            for separable in [false, true] {
                if !atrous && separable {
                    continue;
                }
                let aspp = AsppSettings {
                    channels: 256,
                    atrous_rates: if atrous { rates.clone() } else { vec![] },
                    image_pooling,
                    separable,
                    dropout: 0.1,
                };
                v.push(DeepLabConfig {
                    aspp: aspp.clone(),
                    ..base.clone()
                });
                for num_convs in 1..=3 {
                    for dsep in [false, true] {
                        let decoder = DecoderSettings {
                            num_convs,
                            ..DecoderSettings::paper(dsep)
                        };
                        v.push(DeepLabConfig {
                            aspp: aspp.clone(),
                            decoder: Some(decoder),
                            ..base.clone()
                        });
                    }
                }
            }
        }
    }
    v
}

fn check_contract(c: &DeepLabConfig, high: usize, low: usize) {
    let keys = c.keys().expect("keys");
    let head: Keys = keys
        .iter()
        .filter(|k| !k.name.starts_with("backbone."))
        .map(|k| (k.name.clone(), k.shape.clone()))
        .collect();
    let mut want = expected_head_keys(c, high, low);
    let mut got = head.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "head keys of {c:?}");
    // The file-level check accepts exactly this set.
    let mut names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), keys.len(), "duplicate keys");
}

#[test]
fn head_key_contract_for_every_configuration() {
    let backbones = [
        ("mobilenetv2_100", 320, 144),
        ("mobilenetv2_050_deeplab", 160, 72),
        ("xception65", 2048, 256),
        ("resnet101_beta", 2048, 256),
        ("resnet50", 2048, 256),
    ];
    let mut n = 0;
    for (name, high, low) in backbones {
        let b = BackboneConfig::from_name(name).expect("backbone");
        for c in head_variants(b, 21) {
            check_contract(&c, high, low);
            n += 1;
        }
    }
    println!("{n} configurations checked");
}

/// Backbone keys under `backbone.` are timm's state-dict names and shapes (without
/// `num_batches_tracked` and the classifier head).
#[test]
fn backbone_keys_are_timm_names_under_backbone() {
    for (timm, ours) in [
        ("mobilenetv2_100", "mobilenetv2_100"),
        ("xception65", "xception65"),
        ("resnet101", "resnet101"),
    ] {
        let Some(p) = shared(&format!("keys/timm_{timm}.keys.txt"), "timm key comparison") else {
            return;
        };
        let text = std::fs::read_to_string(&p).expect("keys");
        let mut want: Keys = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let mut f = l.split('\t');
                let n = f.next()?.to_string();
                let s: Vec<usize> = serde_json::from_str(f.next()?).ok()?;
                // The ImageNet classifier and MobileNetV2's final 1x1/1280 conv (`conv_head`,
                // top-level `bn2`) are not part of the DeepLab backbone.
                let is_head = ["conv_head.", "bn2.", "classifier.", "head.", "fc."]
                    .iter()
                    .any(|h| n.starts_with(h));
                (!n.ends_with("num_batches_tracked") && !is_head)
                    .then(|| (format!("backbone.{n}"), s))
            })
            .collect();
        let c = DeepLabConfig::v3plus(
            BackboneConfig::from_name(ours).expect("b"),
            21,
            true,
            deeplab_heads::InputNormalization::ImageNet,
        );
        let mut got: Keys = c
            .keys()
            .expect("keys")
            .into_iter()
            .filter(|k| k.name.starts_with("backbone."))
            .map(|k| (k.name, k.shape))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{timm}");
    }
}

/// Output shapes at output strides 8/16/32, with odd and non-square sizes: the low-resolution
/// logits follow the official `scale_dimension` rule, the upsampled ones the input.
#[test]
fn shapes_at_every_output_stride() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let vb = VarBuilder::zeros(DType::F32, &dev);
    let cases: [(&str, &[(usize, usize)]); 3] = [
        ("mobilenetv2_100", &[(513, 513), (257, 257), (321, 481)]),
        ("xception65", &[(97, 129)]),
        ("resnet101_beta", &[(65, 49)]),
    ];
    for (name, sizes) in cases {
        for os in [OutputStride::Os8, OutputStride::Os16, OutputStride::Os32] {
            for decoder in [false, true] {
                let b = BackboneConfig::from_name(name)?.with_output_stride(os);
                let mut c =
                    DeepLabConfig::v3plus(b, 7, true, deeplab_heads::InputNormalization::Official);
                if !decoder {
                    c.decoder = None;
                }
                let model = DeepLabModel::new(&c, vb.clone())?;
                for &(h, w) in sizes {
                    if name != "mobilenetv2_100" && (h, w) != sizes[0] {
                        continue;
                    }
                    let x = Tensor::zeros((1, 3, h, w), DType::F32, &dev)?;
                    let out = model.forward_output(&x, false)?;
                    let s = if decoder {
                        0.25
                    } else {
                        1.0 / os.value() as f64
                    };
                    assert_eq!(
                        out.logits.dims(),
                        &[1, 7, scale_dimension(h, s), scale_dimension(w, s)],
                        "{name} {os} {h}x{w}"
                    );
                    assert_eq!(out.upsampled.dims(), &[1, 7, h, w]);
                }
            }
        }
    }
    Ok(())
}

/// PyTorch-style resizes (align_corners = false): the decoder works at the low-level feature's
/// size and the logits are upsampled with half-pixel centres.
#[test]
fn pytorch_resize_mode() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut c = DeepLabConfig::resnet101_v3plus(3);
    c.backbone = BackboneConfig::from_name("resnet50")?;
    let mut c = c
        .with_multi_grid(Some(vec![1, 2, 4]))
        .map_err(candle_core::Error::msg)?;
    c.align_corners = false;
    let model = DeepLabV3Plus::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let model = DeepLabModel::V3Plus(model);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 70, 50), &dev)?;
    let out = model.forward_output(&x, false)?;
    assert_eq!(out.logits.dims(), &[1, 3, 18, 13]);
    let want =
        deeplab_ops::resize_bilinear(&out.logits, (70, 50), deeplab_ops::ResizeMode::HalfPixel)?;
    assert_eq!(crate::common::rel_err(&out.upsampled, &want)?, 0.0);
    Ok(())
}

/// Training mode: gradients reach every parameter (backbone, ASPP, decoder, classifier), dropout
/// is active, and image pooling at batch size 1 is refused with a clear error.
#[test]
fn training_reaches_every_parameter() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut c = DeepLabConfig::mobilenetv2_v3plus(3);
    c.backbone = BackboneConfig::from_name("mobilenetv2_050")?;
    let model = DeepLabModel::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 33, 41), &dev)?;
    let labels = Tensor::rand(0f32, 3.0, (2, 33, 41), &dev)?
        .floor()?
        .to_dtype(DType::U32)?;
    let logits = model.forward_t(&x, true)?;
    let loss = deeplab_ops::cross_entropy(&logits, &labels, 255)?;
    let grads = loss.backward()?;
    let data = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("lock"))?;
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            continue;
        }
        if grads.get(var.as_tensor()).is_none() {
            missing.push(name.clone());
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    drop(data);
    // Dropout: two training passes differ, evaluation passes do not.
    let a = model.forward_output(&x, true)?.logits;
    let b = model.forward_output(&x, true)?.logits;
    assert!(crate::common::rel_err(&a, &b)? > 0.0);
    let e = model
        .forward_t(&x.narrow(0, 0, 1)?, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch size 1"), "{e}");
    Ok(())
}

/// DeepLabV3 and DeepLabV3Plus refuse the other's configuration; a decoder stride the
/// backbone does not offer is refused at construction.
#[test]
fn constructors_validate() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    assert!(DeepLabV3::new(&DeepLabConfig::mobilenetv2_v3plus(2), vb.clone()).is_err());
    assert!(DeepLabV3Plus::new(&DeepLabConfig::mobilenetv2_v3(2), vb.clone()).is_err());
    let mut c = DeepLabConfig::mobilenetv2_v3plus(2);
    c.decoder.as_mut().expect("decoder").output_stride = 8;
    let e = DeepLabModel::new(&c, vb.clone()).unwrap_err().to_string();
    assert!(e.contains("decoder stride 8"), "{e}");
    let mut c = DeepLabConfig::mobilenetv2_v3plus(0);
    c.num_classes = 0;
    assert!(DeepLabModel::new(&c, vb.clone()).is_err());
    let model = DeepLabModel::new(&DeepLabConfig::mobilenetv2_v3(2), vb).expect("model");
    let bad = Tensor::zeros((1, 4, 33, 33), DType::F32, &Device::Cpu).expect("x");
    assert!(model
        .forward_t(&bad, false)
        .unwrap_err()
        .to_string()
        .contains("[1, 4, 33, 33]"));
}
