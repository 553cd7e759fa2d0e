//! Times one dense 3x3 convolution through [`deeplab_ops::conv2d`] (the dispatcher's path for
//! the shape: Winograd F(4x4) on DeepLab's 33x33 to 129x129 maps, unless `DEEPLAB_WINOGRAD`
//! says otherwise), `C -> C` channels on a `S x S` map at rate `R`, TensorFlow SAME padding:
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example conv_time -- 256 33 1 300`
//!
//! (ResNet-101's layer3 3x3; `512 33 2` is layer4's rate-2 one, `64 129 1` layer1's). Prints the
//! minimum and median of the runs in ms; run two builds alternately to compare them.

use candle_core::Device;
use deeplab_ops::reference::seeded_uniform;
use deeplab_ops::{conv2d, Conv2dGeometry};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let [c, s, r, runs] = args[..] else {
        return Err("usage: conv_time CHANNELS SIZE RATE RUNS".into());
    };
    let x = seeded_uniform(&[1, c, s, s], 1, &Device::Cpu)?;
    let w = seeded_uniform(&[c, c, 3, 3], 2, &Device::Cpu)?;
    let geom = Conv2dGeometry::same(3, r);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        drop(conv2d(&x, &w, None, &geom, 1)?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{c} -> {c} 3x3 rate {r} at {s}x{s}: min {:.3} ms, median {:.3} ms over {} runs",
        times[0],
        times[times.len() / 2],
        times.len()
    );
    Ok(())
}
