//! Times the fused separable convolution (`deeplab_ops::separable_epilogue`) against its two
//! folded layers run in turn (depthwise + epilogue, then 1x1 + epilogue) on the models' shapes,
//! alternating the two in one process and reporting the median of each (ms per call).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example separable_time -- --runs 25`
//!
//! Four inputs are used in turn, so each call reads one that is not in the caches (as in a
//! model). The process allocator is mimalloc keeping freed pages, as in the `deeplab` binary.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option index (see `deeplab_cli::alloc`): -1 keeps freed pages.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

use candle_core::{DType, Device, Result, Tensor};
use deeplab_ops::reference::seeded_uniform;
use deeplab_ops::{
    separable_epilogue, Activation, BatchNorm2d, BatchNormConfig, Conv2dGeometry, DepthwisePart,
    Epilogue,
};
use std::time::Instant;

/// A folded BatchNorm + ReLU6 over `c` channels (default statistics: the arithmetic is what
/// is timed).
fn epilogue(c: usize) -> Result<Epilogue> {
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let mut bn =
        BatchNorm2d::new(c, BatchNormConfig::tf_head(), vb)?.with_activation(Activation::Relu6);
    Epilogue::fold(&mut bn, None)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // SAFETY: sets one entry of mimalloc's global option table before any allocation matters.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args: Vec<String> = std::env::args().collect();
    let runs = match args.iter().position(|a| a == "--runs") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| candle_core::Error::msg("--runs needs a number"))?
            .max(1),
        None => 15,
    };
    let dev = Device::Cpu;
    println!("threads: {}, runs: {runs}", rayon::current_num_threads());
    println!("| channels | map | out | stride | rate | two layers (ms) | fused (ms) |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    // (channels, map side, output channels, stride, rate): MobileNetV2 OS8, Xception-65 OS16.
    let shapes = [
        (576, 65, 96, 1, 2),
        (384, 65, 64, 1, 2),
        (960, 65, 160, 1, 4),
        (32, 257, 16, 1, 1),
        (96, 257, 24, 2, 1),
        (728, 33, 728, 1, 1),
        (2048, 33, 256, 1, 6),
    ];
    for (c, side, cout, stride, rate) in shapes {
        let xs: Vec<Tensor> = (0..4)
            .map(|i| seeded_uniform(&[1, c, side, side], i, &dev))
            .collect::<Result<_>>()?;
        let kd = seeded_uniform(&[c, 1, 3, 3], 10, &dev)?;
        let kp = (seeded_uniform(&[cout, c, 1, 1], 11, &dev)? * 0.1)?;
        let (de, pe) = (epilogue(c)?, epilogue(cout)?);
        let geom = Conv2dGeometry::deeplab(3, stride, rate);
        let dw = DepthwisePart {
            weight: &kd,
            epilogue: &de,
            geom: &geom,
            input_relu: false,
        };
        let one = Conv2dGeometry::default();
        let (mut fused, mut apart) = (Vec::new(), Vec::new());
        for r in 0..runs + 1 {
            let t = Instant::now();
            let y = separable_epilogue(&xs[r % 4], dw, (&kp, &pe), None)?;
            let tf = t.elapsed().as_secs_f64();
            drop(y);
            let t = Instant::now();
            let d = de.depthwise_conv2d(&xs[(r + 2) % 4], &kd, &geom, false)?;
            let y = pe.conv2d(&d, &kp, &one)?;
            let ta = t.elapsed().as_secs_f64();
            drop((d, y));
            // The first round warms up.
            if r > 0 {
                fused.push(tf * 1e3);
                apart.push(ta * 1e3);
            }
        }
        println!(
            "| {c} | {side}x{side} | {cout} | {stride} | {rate} | {:.2} | {:.2} |",
            median(apart),
            median(fused)
        );
    }
    Ok(())
}
