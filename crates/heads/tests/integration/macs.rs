//! Multiply-adds at 513x513 against the numbers published in the DeepLabv3+ paper (Tables 3
//! and 5) and the model zoo.
//!
//! Convention (from `../shared/README.md`, "How the published multiply-adds were counted"):
//! the published numbers are the TF profiler's FLOPs / 2 of the whole graph at a 513x513 input,
//! batch 1; here every convolution (backbone, each ASPP branch including the image-pooling 1x1,
//! the projection, the decoder and the logits) counts `positions x kh x kw x Cin/group x Cout`,
//! an atrous conv of rate r > 1 on TF's space-to-batch grid (`ceil(H/r)*r` positions per axis).
//! That lands 0.07-0.35% below the published numbers (TF also counts bias adds and element-wise
//! ops). The paper's ResNet-101 OS16 + decoder entry (101.28B) is inconsistent with its own
//! other rows: the decoder adds 21.76B at every output stride (OS8: 276.18 -> 297.92; OS32:
//! 52.43 -> 74.20), so OS16 + decoder is 81.02 + 21.76 = 102.78B, which is what the official
//! graph gives; the test uses 102.78B for that row and says so.

use deeplab_backbones::OutputStride;
use deeplab_heads::DeepLabConfig;

fn at(c: DeepLabConfig, os: OutputStride) -> DeepLabConfig {
    c.with_output_stride(os).expect("output stride")
}

#[test]
fn multiply_adds_match_the_paper_at_513() -> candle_core::Result<()> {
    let x65 = DeepLabConfig::xception65_v3plus(21); // separable ASPP + decoder
    let mut x65_plain = x65.clone();
    x65_plain.aspp.separable = false;
    if let Some(d) = x65_plain.decoder.as_mut() {
        d.separable = false;
    }
    let mut x65_v3 = x65_plain.clone();
    x65_v3.decoder = None;
    let rn = DeepLabConfig::resnet101_beta_v3plus(21);
    let mut rn_v3 = rn.clone();
    rn_v3.decoder = None;
    let mn = DeepLabConfig::mobilenetv2_v3(21);
    use OutputStride::*;
    let rows: Vec<(&str, DeepLabConfig, f64)> = vec![
        (
            "Xception-65 OS16, no decoder",
            at(x65_v3.clone(), Os16),
            68.00,
        ),
        (
            "Xception-65 OS16, decoder",
            at(x65_plain.clone(), Os16),
            89.76,
        ),
        (
            "Xception-65 OS16, separable ASPP + decoder",
            at(x65.clone(), Os16),
            54.17,
        ),
        (
            "Xception-65 OS8, separable ASPP + decoder",
            at(x65.clone(), Os8),
            177.10,
        ),
        (
            "ResNet-101-beta MG(1,2,4) OS16",
            at(rn_v3.clone(), Os16),
            81.02,
        ),
        (
            "ResNet-101-beta MG(1,2,4) OS16 + decoder (paper: 101.28, see module docs)",
            at(rn.clone(), Os16),
            102.78,
        ),
        (
            "ResNet-101-beta MG(1,2,4) OS8",
            at(rn_v3.clone(), Os8),
            276.18,
        ),
        (
            "ResNet-101-beta MG(1,2,4) OS8 + decoder",
            at(rn.clone(), Os8),
            297.92,
        ),
        (
            "ResNet-101-beta MG(1,2,4) OS32",
            at(rn_v3.clone(), Os32),
            52.43,
        ),
        (
            "ResNet-101-beta MG(1,2,4) OS32 + decoder",
            at(rn.clone(), Os32),
            74.20,
        ),
        ("MobileNetV2 OS16 (image pooling + 1x1)", at(mn, Os16), 2.75),
    ];
    let mut failures = Vec::new();
    println!(
        "{:<75} {:>9} {:>9} {:>8}",
        "model at 513x513", "ours (B)", "paper (B)", "diff"
    );
    for (name, cfg, paper) in rows {
        let c = cfg.count((513, 513))?;
        let ours = c.gmacs();
        let diff = (ours - paper) / paper;
        println!(
            "{name:<75} {ours:>9.2} {paper:>9.2} {:>+7.2}%",
            diff * 100.0
        );
        if diff.abs() > 0.01 || diff > 0.0 {
            failures.push(format!("{name}: {ours:.3}B vs {paper}B"));
        }
    }
    assert!(
        failures.is_empty(),
        "more than 1% off, or above the published number: {failures:?}"
    );
    Ok(())
}

/// The decoder's cost does not depend on the output stride (it runs at stride 4; only the
/// logits conv moves from the output-stride map to the stride-4 map), so the "+ decoder"
/// increment is the same at OS8, 16 and 32 within 0.02B; the published rows agree at OS8
/// (21.74B) and OS32 (21.77B), while the paper's 101.28B for ResNet-101 OS16 + decoder gives
/// 20.26B.
#[test]
fn decoder_increment_is_independent_of_the_output_stride() -> candle_core::Result<()> {
    let rn = DeepLabConfig::resnet101_beta_v3plus(21);
    let mut incs = Vec::new();
    for os in [OutputStride::Os8, OutputStride::Os16, OutputStride::Os32] {
        let with = at(rn.clone(), os);
        let mut without = with.clone();
        without.decoder = None;
        incs.push(with.count((513, 513))?.gmacs() - without.count((513, 513))?.gmacs());
    }
    println!("decoder increments at OS8/16/32: {incs:?} (published: 21.74, 20.26, 21.77)");
    for w in incs.windows(2) {
        assert!((w[0] - w[1]).abs() < 0.02, "{incs:?}");
    }
    assert!((incs[0] - 21.76).abs() < 0.05, "{incs:?}");
    Ok(())
}
