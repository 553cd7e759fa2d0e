//! Integration tests of deeplab-backbones: key contracts against timm's state-dict lists and the
//! official DeepLab variable lists, parameter counts, feature sizes at output stride 8/16/32,
//! the official graphs' convolution multiply-adds, the published Multiply-Adds, the train flag
//! reaching every BatchNorm, config serialization, and BatchNorm folding changing no bit.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deeplab_backbones::*;
use deeplab_ops::{scale_dimension, MacCounter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `../shared/reference/<rel>` seen from this crate, if present.
fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipped: {} is absent (reference material lives outside the repo)",
            p.display()
        );
        None
    }
}

/// Builds `cfg` on a fresh VarMap; returns the network and every variable's name and shape.
fn build_on_varmap(cfg: &BackboneConfig) -> Result<(AnyBackbone, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = build(cfg, vb)?;
    Ok((net, varmap))
}

fn shapes(varmap: &VarMap) -> BTreeMap<String, Vec<usize>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

/// Parameters as PyTorch's `model.parameters()` counts them (no BN running statistics).
fn trainable_params(s: &BTreeMap<String, Vec<usize>>) -> usize {
    s.iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(_, d)| d.iter().product::<usize>())
        .sum()
}

fn parse_dims(s: &str) -> Vec<usize> {
    s.trim_matches(|c| c == '[' || c == ']' || c == '(' || c == ')')
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

mod key_contract {
    use super::*;

    /// timm's list (`name\t[shape]\tdtype`) without `num_batches_tracked`.
    fn timm_keys(path: &Path) -> BTreeMap<String, Vec<usize>> {
        let text = std::fs::read_to_string(path).expect("read key list");
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let mut it = l.split('\t');
                let name = it.next()?.to_string();
                let dims = parse_dims(it.next()?);
                (!name.ends_with("num_batches_tracked")).then_some((name, dims))
            })
            .collect()
    }

    fn is_classifier(name: &str) -> bool {
        ["fc.", "head.fc.", "classifier.", "conv_head.", "bn2."]
            .iter()
            .any(|p| name.starts_with(p))
    }

    /// Checks one variant: with the classifier the key set equals timm's and the parameter
    /// count equals the list header's; without it, the same minus the classifier keys.
    fn check(name: &str, expected_params: usize) -> Result<()> {
        let with = BackboneConfig::from_name(name)?.with_classifier(Some(1000));
        let (_, vm) = build_on_varmap(&with)?;
        let ours = shapes(&vm);
        assert_eq!(
            trainable_params(&ours),
            expected_params,
            "{name}: parameter count with classifier"
        );
        let (_, vm) = build_on_varmap(&BackboneConfig::from_name(name)?)?;
        let ours_bare = shapes(&vm);
        assert!(
            ours_bare.keys().all(|k| !is_classifier(k)),
            "{name}: classifier keys without a classifier"
        );
        assert_eq!(
            ours_bare.len() + ours.keys().filter(|k| is_classifier(k)).count(),
            ours.len(),
            "{name}: the classifier adds exactly its own keys"
        );
        let Some(path) = shared(&format!("keys/timm_{name}.keys.txt")) else {
            return Ok(());
        };
        let timm = timm_keys(&path);
        let missing: Vec<_> = timm.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !timm.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, extra {extra:?}"
        );
        for (k, d) in &timm {
            assert_eq!(&ours[k], d, "{name}: shape of {k}");
        }
        let timm_bare: BTreeMap<_, _> = timm
            .into_iter()
            .filter(|(k, _)| !is_classifier(k))
            .collect();
        assert_eq!(ours_bare, timm_bare, "{name}: keys without classifier");
        Ok(())
    }

    // Parameter counts: the headers of timm 1.0.31's lists (`sum(p.numel() for p in
    // model.parameters())`, published for the timm models).
    #[test]
    fn xception41() -> Result<()> {
        check("xception41", 26_969_560)
    }

    #[test]
    fn xception65() -> Result<()> {
        check("xception65", 39_916_312)
    }

    #[test]
    fn xception71() -> Result<()> {
        check("xception71", 42_338_736)
    }

    #[test]
    fn resnet50() -> Result<()> {
        check("resnet50", 25_557_032)
    }

    #[test]
    fn resnet101() -> Result<()> {
        check("resnet101", 44_549_160)
    }

    #[test]
    fn mobilenetv2_100() -> Result<()> {
        check("mobilenetv2_100", 3_504_872)
    }

    #[test]
    fn mobilenetv2_050() -> Result<()> {
        check("mobilenetv2_050", 1_968_680)
    }

    /// The beta variants have no timm list: their names are timm's deep-stem names. Counts:
    /// resnet_v1_101_beta's 42,623,936 backbone parameters as in the official variable list
    /// (checked below); resnet_v1_50_beta derived the same way (timm resnet50 minus its 7x7
    /// stem, plus the three 3x3 stem convs and the 128-channel layer1 input).
    #[test]
    fn resnet_beta() -> Result<()> {
        for (name, params) in [
            ("resnet101_beta", 42_623_936),
            ("resnet50_beta", 23_631_808),
        ] {
            let (_, vm) = build_on_varmap(&BackboneConfig::from_name(name)?)?;
            let s = shapes(&vm);
            assert_eq!(trainable_params(&s), params, "{name}");
            assert_eq!(s["conv1.0.weight"], [64, 3, 3, 3]);
            assert_eq!(s["conv1.3.weight"], [64, 64, 3, 3]);
            assert_eq!(s["conv1.6.weight"], [128, 64, 3, 3]);
            assert_eq!(s["bn1.weight"], [128]);
            assert_eq!(s["layer1.0.downsample.0.weight"], [256, 128, 1, 1]);
            // Stride-2 last units subsample their input: no shortcut weights.
            assert!(!s.contains_key("layer1.2.downsample.0.weight"));
            let (_, vm) =
                build_on_varmap(&BackboneConfig::from_name(name)?.with_classifier(Some(1000)))?;
            assert_eq!(
                trainable_params(&shapes(&vm)),
                params + 2048 * 1000 + 1000,
                "{name} with fc"
            );
        }
        Ok(())
    }

    /// MobileNetV2 at width 0.5 with the official DeepLab rounding: the channel counts of the
    /// published `deeplabv3_257_mv_gpu` TFLite model.
    #[test]
    fn mobilenetv2_050_deeplab_matches_the_tflite_model() -> Result<()> {
        let cfg = BackboneConfig::from_official_variant("mobilenet_v2", 0.5)?;
        let (_, vm) = build_on_varmap(&cfg)?;
        let s = shapes(&vm);
        assert_eq!(s["conv_stem.weight"], [16, 3, 3, 3]);
        assert_eq!(s["blocks.0.0.conv_pw.weight"], [8, 16, 1, 1]);
        assert_eq!(s["blocks.1.0.conv_pwl.weight"], [12, 48, 1, 1]);
        assert_eq!(s["blocks.1.1.conv_dw.weight"], [72, 1, 3, 3]);
        assert_eq!(s["blocks.6.0.conv_pwl.weight"], [160, 480, 1, 1]);
        let Some(path) = shared("tflite/deeplabv3_257_mv_gpu.tensors.tsv") else {
            return Ok(());
        };
        // Every `.../weights` tensor of the MobileNetV2 part, OHWI (depthwise: 1HWC), in
        // official layer order, against our convolutions in the same order.
        let text = std::fs::read_to_string(path).expect("read tsv");
        let mut tflite = BTreeMap::new();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() < 3 || !f[1].starts_with("MobilenetV2/") || !f[1].ends_with("weights") {
                continue;
            }
            // "[np.int32(16), np.int32(3), ...]": the numbers inside the parentheses.
            let d: Vec<usize> = f[2]
                .split(',')
                .filter_map(|t| {
                    t.split_once('(')
                        .and_then(|(_, v)| v.trim_end_matches([')', ']']).parse().ok())
                })
                .collect();
            let v = official_variable(&cfg, f[1]).expect("known official layer");
            // TFLite stores convolutions OHWI and depthwise kernels 1HWC.
            let ours_shape = if v.layout == TfLayout::Depthwise {
                vec![d[3], 1, d[1], d[2]]
            } else {
                vec![d[0], d[3], d[1], d[2]]
            };
            tflite.insert(v.name, ours_shape);
        }
        assert_eq!(
            tflite.len(),
            51,
            "all MobileNetV2 convolutions of the TFLite model"
        );
        for (k, d) in &tflite {
            assert_eq!(s.get(k), Some(d), "{k}");
        }
        Ok(())
    }
}

/// The official TF variable lists against [`official_variable`] and the networks.
mod official {
    use super::*;

    /// Maps every backbone variable of an official `variables.txt` to ours, checks the shapes
    /// and that the mapping covers all our variables exactly once.
    fn check(file: &str, scope: &str, cfg: BackboneConfig) -> Result<()> {
        let Some(path) = shared(file) else {
            return Ok(());
        };
        let (_, vm) = build_on_varmap(&cfg)?;
        let ours = shapes(&vm);
        let text = std::fs::read_to_string(path).expect("read variables");
        let mut seen = BTreeMap::new();
        for l in text.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            let mapped = official_variable(&cfg, f[0]);
            if !f[0].starts_with(scope) {
                assert_eq!(mapped, None, "{} is not a backbone variable", f[0]);
                continue;
            }
            let v = mapped.unwrap_or_else(|| panic!("no mapping for {}", f[0]));
            let shape = v.layout.convert_shape(&parse_dims(f[1]));
            assert_eq!(ours.get(&v.name), Some(&shape), "{} -> {}", f[0], v.name);
            assert!(
                seen.insert(v.name.clone(), f[0]).is_none(),
                "{} mapped twice",
                v.name
            );
        }
        let unmapped: Vec<_> = ours.keys().filter(|k| !seen.contains_key(*k)).collect();
        assert!(
            unmapped.is_empty(),
            "{file}: our variables with no official counterpart: {unmapped:?}"
        );
        Ok(())
    }

    #[test]
    fn xception65_matches_the_official_variables() -> Result<()> {
        let cfg = BackboneConfig::from_name("xception65")?;
        check(
            "official/structure/A_xception65.variables.txt",
            "xception_65/",
            cfg,
        )
    }

    #[test]
    fn resnet101_beta_matches_the_official_variables() -> Result<()> {
        let cfg =
            BackboneConfig::from_name("resnet101_beta")?.with_multi_grid(Some(vec![1, 2, 4]))?;
        check(
            "official/structure/C_resnet101beta.variables.txt",
            "resnet_v1_101/",
            cfg,
        )
    }

    #[test]
    fn mobilenetv2_matches_the_official_variables() -> Result<()> {
        for set in ["D_mobilenetv2_os16", "E_mobilenetv2_v3plus_os16"] {
            let cfg = BackboneConfig::from_official_variant("mobilenet_v2", 1.0)?;
            check(
                &format!("official/{set}/variables.txt"),
                "MobilenetV2/",
                cfg,
            )?;
        }
        Ok(())
    }

    /// The multiply-adds of every backbone convolution of an official graph (`graph_facts.txt`:
    /// output N*H*W x kh x kw x Cin-per-group x Cout; atrous ones run as space-to-batch, so
    /// their N*H*W already counts the padded grid) must equal our count at the same input
    /// size: every kernel, channel count, stride and rate agrees.
    fn graph_macs(file: &str, scope: &str) -> Option<(u64, usize)> {
        let text = std::fs::read_to_string(shared(file)?).expect("read graph facts");
        let mut total = 0u64;
        let mut n = 0;
        for l in text.lines().filter(|l| l.starts_with(scope)) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 2 || (f[1] != "Conv2D" && f[1] != "DepthwiseConv2dNative") {
                continue;
            }
            let w_start = l.find("w=(")? + 2;
            let w_end = w_start + l[w_start..].find(')')? + 1;
            let w = parse_dims(&l[w_start..w_end]);
            let out_start = l.rfind("->")? + 2;
            let out = parse_dims(&l[out_start..]);
            let positions = (out[0] * out[1] * out[2]) as u64;
            let per = if f[1] == "Conv2D" {
                w[0] * w[1] * w[2] * w[3]
            } else {
                w[0] * w[1] * w[2]
            };
            total += positions * per as u64;
            n += 1;
        }
        Some((total, n))
    }

    fn check_graph(file: &str, scope: &str, cfg: BackboneConfig, convs: usize) -> Result<()> {
        let Some((official, n)) = graph_macs(file, scope) else {
            return Ok(());
        };
        assert_eq!(n, convs, "{file}: convolutions in the backbone scope");
        let (net, _) = build_on_varmap(&cfg)?;
        let mut c = MacCounter::new();
        net.count_macs((129, 129), &mut c)?;
        assert_eq!(
            c.macs, official,
            "{file}: backbone multiply-adds at 129x129"
        );
        Ok(())
    }

    #[test]
    fn xception65_convolutions_match_the_official_graph() -> Result<()> {
        // 2 stem + 3 x 7 entry + 16 x 6 middle + 7 + 6 exit convolutions.
        check_graph(
            "official/structure/A_xception65.graph_facts.txt",
            "xception_65/",
            BackboneConfig::from_name("xception65")?,
            2 + 21 + 96 + 7 + 6,
        )
    }

    #[test]
    fn resnet101_beta_convolutions_match_the_official_graph() -> Result<()> {
        let cfg = BackboneConfig::ResNet(
            ResNetConfig::resnet101_beta().with_multi_grid(Some(vec![1, 2, 4])),
        );
        // 3 stem + 33 units x 3 + 4 shortcuts.
        check_graph(
            "official/structure/C_resnet101beta.graph_facts.txt",
            "resnet_v1_101/",
            cfg,
            3 + 99 + 4,
        )
    }

    #[test]
    fn mobilenetv2_convolutions_match_the_official_graph() -> Result<()> {
        for set in ["D_mobilenetv2_os16", "E_mobilenetv2_v3plus_os16"] {
            let cfg = BackboneConfig::from_name("mobilenetv2_100")?;
            check_graph(
                &format!("official/{set}/graph_facts.txt"),
                "MobilenetV2/",
                cfg,
                1 + 2 + 16 * 3,
            )?;
        }
        Ok(())
    }
}

mod shapes {
    use super::*;

    const STRIDES: [OutputStride; 3] = [OutputStride::Os8, OutputStride::Os16, OutputStride::Os32];

    /// The official feature size of an `input` image at `reduction`.
    fn rule(input: (usize, usize), reduction: usize) -> (usize, usize) {
        let s = 1.0 / reduction as f64;
        (scale_dimension(input.0, s), scale_dimension(input.1, s))
    }

    fn zeros(name: &str, os: OutputStride) -> Result<AnyBackbone> {
        build(
            &BackboneConfig::from_name(name)?.with_output_stride(os),
            VarBuilder::zeros(DType::F32, &Device::Cpu),
        )
    }

    /// Runs a forward pass and checks every feature against `feature_info`, `feature_sizes`
    /// and the `scale_dimension` rule.
    fn check_forward(net: &AnyBackbone, input: (usize, usize)) -> Result<Vec<Tensor>> {
        let x = Tensor::randn(0f32, 1.0, (1, 3, input.0, input.1), &Device::Cpu)?;
        let feats = net.forward_features(&x, false)?;
        let sizes = net.feature_sizes(input)?;
        assert_eq!(feats.len(), net.feature_info().len());
        for ((f, info), size) in feats.iter().zip(net.feature_info()).zip(&sizes) {
            assert_eq!(
                f.dims(),
                &[1, info.channels, size.0, size.1],
                "{}",
                info.module
            );
            assert_eq!(
                *size,
                rule(input, info.reduction),
                "{} at {input:?}",
                info.module
            );
        }
        Ok(feats)
    }

    /// Every variant, stride and the three paper-style inputs: the size rule, without running
    /// the network.
    #[test]
    fn feature_sizes_follow_scale_dimension() -> Result<()> {
        for name in BackboneConfig::NAMES {
            for os in STRIDES {
                let net = zeros(name, os)?;
                let red: Vec<usize> = net.feature_info().iter().map(|i| i.reduction).collect();
                assert_eq!(red, [4, os.value()], "{name}");
                assert_eq!(net.feature_index(4)?, 0);
                assert_eq!(net.feature_index(os.value())?, 1);
                assert!(net.feature_index(2).is_err());
                for input in [(513, 513), (257, 257), (321, 481)] {
                    let sizes = net.feature_sizes(input)?;
                    assert_eq!(
                        sizes,
                        [rule(input, 4), rule(input, os.value())],
                        "{name} {os} {input:?}"
                    );
                }
            }
        }
        let net = zeros("xception65", OutputStride::Os16)?;
        assert_eq!(net.feature_sizes((513, 513))?, [(129, 129), (33, 33)]);
        let net = zeros("resnet101", OutputStride::Os8)?;
        assert_eq!(net.feature_sizes((513, 513))?, [(129, 129), (65, 65)]);
        Ok(())
    }

    /// Every variant and stride runs forward on small odd and even inputs.
    #[test]
    fn forward_every_variant_and_stride_on_small_inputs() -> Result<()> {
        for (i, name) in BackboneConfig::NAMES.iter().enumerate() {
            for (j, os) in STRIDES.into_iter().enumerate() {
                let input = if (i + j) % 2 == 0 { (65, 65) } else { (34, 47) };
                let net = zeros(name, os)?;
                check_forward(&net, input)?;
            }
        }
        Ok(())
    }

    /// Full-size forward passes for a subset (debug builds are slow): the paper's crop 513x513
    /// and the odd 321x481 / 257x257 sizes.
    #[test]
    fn forward_at_full_size() -> Result<()> {
        check_forward(&zeros("xception65", OutputStride::Os16)?, (513, 513))?;
        check_forward(&zeros("mobilenetv2_100", OutputStride::Os8)?, (513, 513))?;
        check_forward(&zeros("resnet101_beta", OutputStride::Os16)?, (321, 481))?;
        check_forward(&zeros("resnet50", OutputStride::Os8)?, (257, 257))?;
        check_forward(
            &zeros("mobilenetv2_050_deeplab", OutputStride::Os32)?,
            (257, 257),
        )?;
        Ok(())
    }

    fn min_max(t: &Tensor) -> Result<(f32, f32)> {
        let f = t.flatten_all()?;
        Ok((f.min(0)?.to_scalar()?, f.max(0)?.to_scalar()?))
    }

    /// Where the taps are: Xception's low-level feature is a BatchNorm output before any ReLU
    /// and its final feature follows a ReLU; ResNet-beta's low-level feature is before the
    /// residual add and ReLU, timm ResNet's after; MobileNetV2's is after ReLU6 and its final
    /// feature is a linear projection.
    #[test]
    fn taps_sit_where_the_official_graph_takes_them() -> Result<()> {
        let mut out = BTreeMap::new();
        for name in ["xception41", "resnet50", "resnet50_beta", "mobilenetv2_050"] {
            let (net, _) = build_on_varmap(&BackboneConfig::from_name(name)?)?;
            let f = check_forward(&net, (65, 65))?;
            out.insert(name, (min_max(&f[0])?, min_max(&f[1])?));
        }
        let ((lo, _), (hi_min, _)) = out["xception41"];
        assert!(lo < 0.0 && hi_min >= 0.0);
        let ((lo, _), (hi_min, _)) = out["resnet50_beta"];
        assert!(lo < 0.0 && hi_min >= 0.0);
        let ((lo, _), _) = out["resnet50"];
        assert!(lo >= 0.0);
        let ((lo, hi), (fmin, _)) = out["mobilenetv2_050"];
        assert!(lo >= 0.0 && hi <= 6.0 && fmin < 0.0);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let net = zeros("mobilenetv2_050", OutputStride::Os16)?;
        let x = Tensor::zeros((1, 4, 33, 33), DType::F32, &Device::Cpu)?;
        assert!(net.forward_features(&x, false).is_err());
        let x = Tensor::zeros((3, 33, 33), DType::F32, &Device::Cpu)?;
        assert!(net.forward_features(&x, false).is_err());
        assert!(net.feature_sizes((0, 10)).is_err());
        let x = Tensor::zeros((1, 3, 33, 33), DType::F32, &Device::Cpu)?;
        assert!(net
            .config()
            .with_classifier(None)
            .build(VarBuilder::zeros(DType::F32, &Device::Cpu))
            .is_ok());
        assert!(
            net.forward_classifier(&x, false).is_err(),
            "no classifier was built"
        );
        Ok(())
    }
}

mod macs {
    use super::*;

    /// ASPP (image pooling, 1x1, three 3x3 at `rates`, projection) and logits without a
    /// decoder, or with the DeepLabv3+ decoder at stride 4, counted like the backbone.
    fn head(
        c: &mut MacCounter,
        f: (usize, usize),
        cin: usize,
        rates: &[usize],
        sep: bool,
        dec: Option<((usize, usize), usize)>,
    ) {
        c.conv((1, 1), (1, 1), cin, 256, (1, 1));
        c.conv(f, (1, 1), cin, 256, (1, 1));
        for &r in rates {
            if sep {
                c.conv(f, (3, 3), 1, cin, (r, r));
                c.conv(f, (1, 1), cin, 256, (1, 1));
            } else {
                c.conv(f, (3, 3), cin, 256, (r, r));
            }
        }
        c.conv(f, (1, 1), 256 * (2 + rates.len()), 256, (1, 1));
        match dec {
            None => c.conv(f, (1, 1), 256, 21, (1, 1)),
            Some((low, low_ch)) => {
                c.conv(low, (1, 1), low_ch, 48, (1, 1));
                for cin in [304, 256] {
                    if sep {
                        c.conv(low, (3, 3), 1, cin, (1, 1));
                        c.conv(low, (1, 1), cin, 256, (1, 1));
                    } else {
                        c.conv(low, (3, 3), cin, 256, (1, 1));
                    }
                }
                c.conv(low, (1, 1), 256, 21, (1, 1));
            }
        }
    }

    /// Backbone + head multiply-adds at 513x513 in billions.
    fn total(cfg: BackboneConfig, rates: &[usize], sep: bool, decoder: bool) -> Result<f64> {
        let net = build(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
        let mut c = MacCounter::new();
        net.count_macs((513, 513), &mut c)?;
        let sizes = net.feature_sizes((513, 513))?;
        let dec = decoder.then(|| (sizes[0], net.feature_info()[0].channels));
        head(
            &mut c,
            sizes[1],
            net.feature_info()[1].channels,
            rates,
            sep,
            dec,
        );
        Ok(c.gmacs())
    }

    /// ../shared/README.md: counting every convolution this way lands 0.07-0.35% below the
    /// published numbers (TensorFlow's profiler also counts bias adds and element-wise ops).
    fn assert_published(ours: f64, published: f64, what: &str) {
        let below = (published - ours) / published;
        assert!(
            (0.0007..=0.0035).contains(&below),
            "{what}: {ours:.4}B, published {published}B"
        );
    }

    /// The Multiply-Adds of the paper and model zoo, counted on the official graph (see
    /// ../shared/README.md): our backbone counts plus the head arithmetic above reproduce them.
    #[test]
    fn published_multiply_adds() -> Result<()> {
        let x65 = |os| BackboneConfig::from_name("xception65").map(|c| c.with_output_stride(os));
        assert_published(
            total(x65(OutputStride::Os16)?, &[6, 12, 18], false, false)?,
            68.00,
            "X-65 OS16",
        );
        assert_published(
            total(x65(OutputStride::Os16)?, &[6, 12, 18], false, true)?,
            89.76,
            "X-65 OS16 + decoder",
        );
        assert_published(
            total(x65(OutputStride::Os16)?, &[6, 12, 18], true, true)?,
            54.17,
            "X-65 OS16 separable",
        );
        assert_published(
            total(x65(OutputStride::Os8)?, &[12, 24, 36], true, true)?,
            177.10,
            "X-65 OS8 separable",
        );
        let r101 = |os| {
            BackboneConfig::ResNet(
                ResNetConfig::resnet101_beta()
                    .with_multi_grid(Some(vec![1, 2, 4]))
                    .with_output_stride(os),
            )
        };
        assert_published(
            total(r101(OutputStride::Os16), &[6, 12, 18], false, false)?,
            81.02,
            "R-101 OS16",
        );
        assert_published(
            total(r101(OutputStride::Os8), &[12, 24, 36], false, false)?,
            276.18,
            "R-101 OS8",
        );
        assert_published(
            total(r101(OutputStride::Os8), &[12, 24, 36], false, true)?,
            297.92,
            "R-101 OS8 + dec",
        );
        let mnv2 = BackboneConfig::from_name("mobilenetv2_100")?;
        assert_published(total(mnv2, &[], false, false)?, 2.75, "MobileNetV2 OS16");
        Ok(())
    }
}

mod training {
    use super::*;

    /// `train = true` reaches every BatchNorm: every running statistic moves; `train = false`
    /// moves none.
    #[test]
    fn train_flag_reaches_every_batch_norm() -> Result<()> {
        for name in ["xception41", "resnet50_beta", "resnet50", "mobilenetv2_050"] {
            let (net, vm) = build_on_varmap(&BackboneConfig::from_name(name)?)?;
            let x = Tensor::randn(0f32, 1.0, (2, 3, 49, 49), &Device::Cpu)?;
            let stats = |vm: &VarMap| -> Result<BTreeMap<String, Vec<f32>>> {
                let data = vm.data().lock().expect("varmap lock");
                data.iter()
                    .filter(|(k, _)| k.contains("running_"))
                    .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_vec1::<f32>()?)))
                    .collect()
            };
            let before = stats(&vm)?;
            net.forward_features(&x, false)?;
            assert_eq!(
                stats(&vm)?,
                before,
                "{name}: eval mode must not touch running statistics"
            );
            net.forward_features(&x, true)?;
            let after = stats(&vm)?;
            let unchanged: Vec<_> = before
                .iter()
                .filter(|(k, v)| after[*k] == **v)
                .map(|(k, _)| k)
                .collect();
            assert!(
                unchanged.is_empty(),
                "{name}: running statistics not updated: {unchanged:?}"
            );
        }
        Ok(())
    }
}

mod config {
    use super::*;

    #[test]
    fn configs_round_trip_through_json() -> Result<()> {
        for name in BackboneConfig::NAMES {
            let cfg = BackboneConfig::from_name(name)?
                .with_output_stride(OutputStride::Os8)
                .with_classifier(Some(10));
            let json = serde_json::to_string(&cfg).expect("serialize");
            assert!(json.contains("\"output_stride\":8"), "{json}");
            let back: BackboneConfig = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, cfg);
            let net = build(&back, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
            assert_eq!(net.config(), cfg);
        }
        let json =
            serde_json::to_string(&BackboneConfig::from_name("xception65")?).expect("serialize");
        assert!(
            json.starts_with("{\"family\":\"xception\",\"name\":\"xception65\""),
            "{json}"
        );
        let bad = json.replace("\"output_stride\":16", "\"output_stride\":12");
        assert!(serde_json::from_str::<BackboneConfig>(&bad).is_err());
        Ok(())
    }

    #[test]
    fn invalid_configs_fail_in_the_constructor() {
        let vb = || VarBuilder::zeros(DType::F32, &Device::Cpu);
        let mut x = XceptionConfig::xception65();
        x.blocks[3].skip = XceptionSkip::Sum;
        x.blocks[3].stride = 2;
        assert!(Xception::new(&x, vb()).is_err());
        let r = ResNetConfig::resnet101().with_multi_grid(Some(vec![1, 2, 0]));
        assert!(ResNet::new(&r, vb()).is_err());
        let m = MobileNetV2Config::with_width(0.0);
        assert!(MobileNetV2::new(&m, vb()).is_err());
        let mut m = MobileNetV2Config::mobilenetv2_100();
        m.stages.truncate(2); // total stride 4: output stride 16 cannot be reached
        assert!(MobileNetV2::new(&m, vb()).is_err());
    }

    #[test]
    fn multi_grid_changes_only_the_last_block_rates() -> Result<()> {
        // Same weights and sizes; different atrous rates show up in the MAC count (rate 2/4/8
        // grids at 9x9 count 10x10 / 12x12 / 16x16 positions).
        let count = |cfg: BackboneConfig| -> Result<u64> {
            let net = build(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
            let mut c = MacCounter::new();
            net.count_macs((129, 129), &mut c)?;
            Ok(c.macs)
        };
        let plain = count(BackboneConfig::ResNet(ResNetConfig::resnet101_beta()))?;
        let mg = count(BackboneConfig::ResNet(
            ResNetConfig::resnet101_beta().with_multi_grid(Some(vec![1, 2, 4])),
        ))?;
        assert!(mg > plain);
        let x = count(BackboneConfig::from_name("xception65")?)?;
        let xmg = count(BackboneConfig::Xception(
            XceptionConfig::xception65().with_multi_grid(Some(vec![1, 2, 4])),
        ))?;
        assert!(xmg > x);
        Ok(())
    }
}

/// Folding every BatchNorm (with the residual adds and activations moved into the epilogues of
/// the convolutions before them) changes no bit of either feature, for each family, with
/// random non-trivial BatchNorm statistics; `resnet50_beta` takes its low-level feature before
/// a residual add, `resnet50` after one.
#[test]
fn folded_backbones_are_bit_identical() -> Result<()> {
    use deeplab_backbones::Backbone;
    use deeplab_ops::FoldBatchNorm;
    for name in ["resnet50", "resnet50_beta", "xception41", "mobilenetv2_100"] {
        let (mut net, varmap) = build_on_varmap(&BackboneConfig::from_name(name)?)?;
        let mut seed = 7u64;
        for (key, var) in varmap.data().lock().expect("varmap").iter() {
            seed += 1;
            // variances and BN scales positive, means and shifts either sign
            let (lo, hi) = if key.ends_with("running_var") || key.ends_with(".weight") {
                (0.5, 1.5)
            } else {
                (-0.5, 0.5)
            };
            if var.rank() != 1 {
                continue;
            }
            let u = deeplab_ops::reference::seeded_uniform(var.dims(), seed, &Device::Cpu)?;
            var.set(&u.affine((hi - lo) / 2.0, (hi + lo) / 2.0)?)?;
        }
        let x = deeplab_ops::reference::seeded_uniform(&[1, 3, 67, 61], 3, &Device::Cpu)?;
        let before = net.forward_features(&x, false)?;
        net.fold_batch_norm()?;
        let after = net.forward_features(&x, false)?;
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f32::to_bits)
                    .collect())
            };
            assert!(
                bits(a)? == bits(b)?,
                "{name}: feature {i} changed by folding"
            );
        }
    }
    Ok(())
}
