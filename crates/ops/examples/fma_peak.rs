//! The machine's f32 FMA peak: every thread runs twelve independent chains of AVX-512 fused
//! multiply-adds held in registers (no memory traffic), the ceiling the README's GFLOP/s
//! figures are compared with.
//!
//! `cargo run --release -p deeplab-ops --example fma_peak -- --threads 2`

use std::time::Instant;

/// Fused multiply-adds per chain and thread.
const STEPS: u64 = 200_000_000;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm512_set1_ps(0.999_999_9), _mm512_set1_ps(1e-7));
    let mut acc: [__m512; 12] = std::array::from_fn(|i| _mm512_set1_ps(seed + i as f32));
    for _ in 0..STEPS {
        // Twelve chains with different start values: none can be merged with another.
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    let mut out = [0f32; 16];
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    // SAFETY: one vector stored into a 16-value array.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let threads = match args.iter().position(|a| a == "--threads") {
        Some(i) => args.get(i + 1).ok_or("--threads needs a number")?.parse()?,
        None => std::thread::available_parallelism()?.get(),
    };
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        for t in [1, threads] {
            let start = Instant::now();
            let handles: Vec<_> = (0..t)
                // SAFETY: the CPU reports AVX-512F.
                .map(|i| std::thread::spawn(move || unsafe { chains(i as f32) }))
                .collect();
            let mut check = 0f32;
            for h in handles {
                check += h.join().map_err(|_| "a worker panicked")?;
            }
            let secs = start.elapsed().as_secs_f64();
            let flop = t as f64 * STEPS as f64 * 12.0 * 16.0 * 2.0;
            println!(
                "{t} thread(s): {:.1} GFLOP/s f32 FMA peak (checksum {check:.3e})",
                flop / secs / 1e9
            );
        }
        return Ok(());
    }
    Err("this example needs an x86-64 CPU with AVX-512F".into())
}
