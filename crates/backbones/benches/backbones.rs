//! Criterion benchmark: eval-mode forward of every backbone on a 513x513 image (batch 1) at
//! output stride 16 and 8, the paper's training and evaluation settings. Run with
//! `RAYON_NUM_THREADS=2 cargo bench -p deeplab-backbones --bench backbones`; the device is in
//! each benchmark's name and the device is synchronized before the clock is read.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, Criterion};
use deeplab_backbones::{build, Backbone, BackboneConfig, OutputStride};
use std::time::Duration;

fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

fn device_name(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

fn bench(c: &mut Criterion) {
    let dev = device();
    let mut group = c.benchmark_group("backbone_forward_513");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    let names = std::env::var("BACKBONES")
        .map(|s| s.split(',').map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_else(|_| {
            [
                "xception65",
                "resnet101",
                "resnet101_beta",
                "mobilenetv2_100",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        });
    let x = Tensor::randn(0f32, 1.0, (1, 3, 513, 513), &dev).expect("input");
    for name in &names {
        for os in [OutputStride::Os16, OutputStride::Os8] {
            let cfg = BackboneConfig::from_name(name)
                .expect("known backbone")
                .with_output_stride(os);
            let vb = VarBuilder::zeros(DType::F32, &dev);
            let net = build(&cfg, vb).expect("build");
            group.bench_function(
                format!("{name}/os{}/{}", os.value(), device_name(&dev)),
                |b| {
                    b.iter(|| {
                        let f = net.forward_features(&x, false).expect("forward");
                        dev.synchronize().expect("sync");
                        f
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
