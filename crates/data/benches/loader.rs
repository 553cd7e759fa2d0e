//! Loader throughput: images/s of the official training pipeline (decode, random scale 0.5..2.0,
//! pad, 513x513 random crop, flip, normalize, batch) with 2 worker threads, over the 330 real VOC
//! images in `../shared/reference/voc2012/train_subset`, or over generated 500x375-ish scenes when
//! that folder is absent. One iteration is one full epoch (41 batches of 8 = 328 images).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deeplab_data::synthetic::{write_voc, SyntheticConfig};
use deeplab_data::{Dataset, Loader, LoaderConfig, Normalization};

fn open_dataset() -> (Dataset, &'static str, Option<tempfile::TempDir>) {
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/voc2012/train_subset");
    if real.join("ImageSets/Segmentation/train.txt").is_file() {
        if let Ok(ds) = Dataset::voc(&real, "train") {
            return (ds, "voc_train_subset", None);
        }
    }
    println!(
        "loader bench: {} not found; benchmarking 330 generated 375..500 px scenes instead",
        real.display()
    );
    let dir = tempfile::tempdir().expect("temp dir for the generated dataset");
    let cfg = SyntheticConfig {
        num_train: 330,
        num_val: 0,
        min_size: 375,
        max_size: 500,
        ..SyntheticConfig::default()
    };
    write_voc(dir.path(), &cfg).expect("generate the benchmark dataset");
    let ds = Dataset::voc(dir.path(), "train").expect("open the generated dataset");
    (ds, "generated", Some(dir))
}

fn loader_throughput(c: &mut Criterion) {
    let (ds, name, _keep) = open_dataset();
    let mut cfg = LoaderConfig::train(8, Normalization::Official, 0);
    cfg.num_workers = 2;
    cfg.prefetch = 4;
    let loader = Loader::new(ds, cfg).expect("loader config");
    let images = (loader.num_batches() * 8) as u64;
    let epoch = AtomicU64::new(0);
    let mut group = c.benchmark_group("loader");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(40));
    group.throughput(Throughput::Elements(images));
    group.bench_function(format!("cpu/{name}/crop513_aug/2_threads/batch8"), |b| {
        b.iter(|| {
            let e = epoch.fetch_add(1, Ordering::Relaxed);
            let mut n = 0;
            for batch in loader.epoch(e) {
                n += batch.expect("batch").batch_size;
            }
            assert_eq!(n as u64, images);
        })
    });
    group.finish();
}

criterion_group!(benches, loader_throughput);
criterion_main!(benches);
