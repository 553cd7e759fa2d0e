//! Times the forward pass of a named DeepLab configuration at a square input (random input,
//! zero weights), median of `--runs`: a quick probe for profiling (`perf record`).
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-heads --example forward_time -- xception65 513 3`

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use deeplab_heads::{DeepLabConfig, DeepLabModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("xception65");
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(513);
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cfg = match name {
        "xception65" => DeepLabConfig::xception65_v3plus(21),
        "resnet101" => DeepLabConfig::resnet101_v3plus(21),
        "mobilenetv2" => DeepLabConfig::mobilenetv2_v3(21),
        other => anyhow::bail!("unknown config {other}: xception65, resnet101, mobilenetv2"),
    };
    let dev = Device::Cpu;
    let model = DeepLabModel::new(&cfg, VarBuilder::zeros(DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, size, size), &dev)?;
    let mut times = Vec::new();
    for i in 0..=runs {
        let t = std::time::Instant::now();
        let y = model.forward_output(&x, false)?;
        let _ = y.logits.dims();
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{name} {size}x{size}: median {:.3} s over {runs} runs ({:?})",
        times[times.len() / 2],
        times
    );
    Ok(())
}
