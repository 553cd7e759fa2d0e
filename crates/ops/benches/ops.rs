//! Criterion benchmarks of deeplab-ops against candle's own path, device in the name.
//! Run with `RAYON_NUM_THREADS=2 cargo bench -p deeplab-ops --bench ops`.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};

#[path = "cases.rs"]
mod cases;
#[path = "conv/cases.rs"]
mod conv_cases;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut cases = cases::cases(&dev, true).expect("benchmark setup");
    cases.extend(conv_cases::conv_cases(&dev, true).expect("conv benchmark setup"));
    let mut group = c.benchmark_group("ops");
    group
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3));
    for case in &cases {
        group.bench_function(format!("{}/ours", case.name), |b| {
            b.iter(|| (case.ours)().expect("ours"))
        });
        group.bench_function(format!("{}/candle", case.name), |b| {
            b.iter(|| (case.candle)().expect("candle"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
