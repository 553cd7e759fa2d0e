//! Prints a markdown table of median op times, ours vs candle's own path, measured in one
//! run (warm-up, then the median of `--runs` repetitions; ratios are within the run).
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example op_table -- --runs 7`

use candle_core::Device;
use std::time::Instant;

#[path = "../benches/cases.rs"]
mod cases;

fn median_ms(f: &dyn Fn() -> candle_core::Result<()>, runs: usize) -> candle_core::Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<candle_core::Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let slow_runs = 3.min(runs);
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!("| op | ours (ms) | candle (ms) | speed-up |");
    println!("|---|---:|---:|---:|");
    for case in cases::cases(&dev, true)? {
        let ours = median_ms(&case.ours, runs)?;
        // candle's depthwise backward takes seconds: fewer repetitions.
        let theirs = median_ms(
            &case.candle,
            if case.name.contains("bwd") {
                slow_runs
            } else {
                runs
            },
        )?;
        println!(
            "| {} | {ours:.2} | {theirs:.2} | {:.1}x |",
            case.name,
            theirs / ours
        );
    }
    Ok(())
}
