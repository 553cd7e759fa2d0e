//! GFLOP/s of [`deeplab_ops::sgemm`] against the `gemm` crate (candle's matmul kernel) on the
//! convolution shapes of Xception-65 / ResNet-101 at output stride 16 and MobileNetV2 at 8, `C[m x n] = A[m x k] ·
//! B[k x n]` with `m` output channels, `k` input channels (x taps) and `n` pixels, and on the
//! backward products of the same convolutions: `dW = dY · colsᵀ` (`B` column-major, contracted
//! over the pixels) and `dcols = Wᵀ · dY` (`A` column-major).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example sgemm_gflops -- --runs 9`
//! (`--only 960x160x4225` runs the products whose `m`x`k`x`n` contains the text)
//!
//! Each shape alternates the two kernels for `--runs` rounds (default 7) and reports the
//! median of each, and whether the results agree to 1e-5 relative.

use deeplab_ops::sgemm::Operand;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let runs = match args.iter().position(|a| a == "--runs") {
        Some(i) => args
            .get(i + 1)
            .ok_or("--runs needs a number")?
            .parse::<usize>()?
            .max(1),
        None => 7,
    };
    // `--only 960x160` keeps the products whose `m x k x n` contains the text (spaces dropped).
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(args.get(i + 1).ok_or("--only needs a shape")?.clone()),
        None => None,
    };
    let threads = rayon::current_num_threads();
    println!("threads: {threads}, runs: {runs}");
    println!("| product | m x k x n | sgemm GFLOP/s | gemm crate GFLOP/s | ratio | max rel diff |");
    println!("|---|---|---|---|---|---|");
    // (m, k, n, A column-major, B column-major, what)
    for (m, k, n, ta, tb, what) in [
        (728, 728, 1089, false, false, "fwd"),
        (256, 2304, 1089, false, false, "fwd"),
        (2048, 1536, 1089, false, false, "fwd"),
        (256, 256, 16641, false, false, "fwd"),
        // ResNet-101's bottleneck 1x1 convs at 33x33 (conv3 expand, conv1 reduce).
        (1024, 256, 1089, false, false, "fwd"),
        (256, 1024, 1089, false, false, "fwd"),
        // MobileNetV2 at output stride 8 (65x65 maps): small expand / project depths.
        (960, 160, 4225, false, false, "fwd"),
        (160, 960, 4225, false, false, "fwd"),
        (384, 64, 4225, false, false, "fwd"),
        (64, 384, 4225, false, false, "fwd"),
        // ResNet-101's rate-6 ASPP branch by rectangles (all nine taps of 2048 channels for
        // the 21x21 centre, in two row chunks) and one Winograd product of a layer3 3x3 conv
        // (256 channels, 17x17 tiles) and of the decoder's first 3x3 conv (7 of 65 tile rows).
        (256, 18432, 231, false, false, "fwd"),
        (256, 256, 289, false, false, "fwd"),
        (256, 304, 455, false, false, "fwd"),
        (728, 1089, 728, false, true, "dW"),
        (256, 1089, 2304, false, true, "dW"),
        (256, 16641, 256, false, true, "dW"),
        (728, 728, 1089, true, false, "dX"),
        (2304, 256, 1089, true, false, "dX"),
        (256, 256, 16641, true, false, "dX"),
    ] {
        if only
            .as_ref()
            .is_some_and(|o| !format!("{m}x{k}x{n}").contains(o.as_str()))
        {
            continue;
        }
        let seeded = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                    (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let a = seeded(m * k, 1);
        let b = seeded(k * n, 2);
        let mut c1 = vec![0f32; m * n];
        let mut c2 = vec![0f32; m * n];
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        for _ in 0..runs + 1 {
            let t = Instant::now();
            let op = |data, rows, cols, t| {
                if t {
                    Operand::cols(data, rows)
                } else {
                    Operand::rows(data, cols)
                }
            };
            deeplab_ops::sgemm::sgemm_ex(
                (m, n, k),
                op(&a, m, k, ta),
                op(&b, k, n, tb),
                (&mut c1, n),
                false,
                None,
                threads,
            )?;
            t1.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            // (row stride, column stride) of a contiguous operand.
            let st = |rows: usize, cols: usize, t: bool| {
                if t {
                    (1, rows as isize)
                } else {
                    (cols as isize, 1)
                }
            };
            let ((ars, acs), (brs, bcs)) = (st(m, k, ta), st(k, n, tb));
            // SAFETY: `a` is m x k, `b` k x n (contiguous in the stated order) and `c2` m x n
            // row-major.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c2.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    acs,
                    ars,
                    b.as_ptr(),
                    bcs,
                    brs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    if threads > 1 {
                        gemm::Parallelism::Rayon(threads)
                    } else {
                        gemm::Parallelism::None
                    },
                )
            };
            t2.push(t.elapsed().as_secs_f64());
        }
        // The first round warms up.
        t1.remove(0);
        t2.remove(0);
        let scale = c2.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-3);
        let diff = c1
            .iter()
            .zip(&c2)
            .fold(0f32, |s, (x, y)| s.max((x - y).abs()))
            / scale;
        let flop = 2.0 * (m * n * k) as f64;
        let (g1, g2) = (flop / median(t1) / 1e9, flop / median(t2) / 1e9);
        println!(
            "| {what} | {m} x {k} x {n} | {g1:.0} | {g2:.0} | {:.2} | {diff:.1e} |",
            g1 / g2
        );
        if diff > 1e-5 {
            return Err(format!("{m}x{k}x{n}: results differ by {diff}").into());
        }
    }
    Ok(())
}
