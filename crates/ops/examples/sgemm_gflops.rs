//! GFLOP/s of [`deeplab_ops::sgemm`] against the `gemm` crate (candle's matmul kernel) on the
//! convolution shapes of Xception-65 / ResNet-101 at output stride 16, `C[m x n] = A[m x k] ·
//! B[k x n]` with `m` output channels, `k` input channels (x taps) and `n` pixels.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example sgemm_gflops -- --runs 9`
//!
//! Each shape alternates the two kernels for `--runs` rounds (default 7) and reports the
//! median of each, and whether the results agree to 1e-5 relative.

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
    let threads = rayon::current_num_threads();
    println!("threads: {threads}, runs: {runs}");
    println!("| m x k x n | sgemm GFLOP/s | gemm crate GFLOP/s | ratio | max rel diff |");
    println!("|---|---|---|---|---|");
    for (m, k, n) in [
        (728, 728, 1089),
        (256, 2304, 1089),
        (2048, 1536, 1089),
        (256, 256, 16641),
    ] {
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
            deeplab_ops::sgemm::sgemm((m, n, k), (&a, k), (&b, n), (&mut c1, n), None, threads)?;
            t1.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            // SAFETY: `a` is m x k, `b` k x n and `c2` m x n, all row-major and contiguous.
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
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
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
            "| {m} x {k} x {n} | {g1:.0} | {g2:.0} | {:.2} | {diff:.1e} |",
            g1 / g2
        );
        if diff > 1e-5 {
            return Err(format!("{m}x{k}x{n}: results differ by {diff}").into());
        }
    }
    Ok(())
}
