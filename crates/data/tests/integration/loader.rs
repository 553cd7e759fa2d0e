//! The loader on generated data: seed determinism independent of worker count, per-epoch shuffles,
//! drop_last, variable-size eval batches, tensors.

use std::collections::HashSet;
use std::sync::Arc;

use deeplab_data::loader::sample_rng;
use deeplab_data::{
    Dataset, EvalTransform, Loader, LoaderConfig, Normalization, ScaleRange, TrainTransform,
    Transform,
};

use crate::common::tiny_voc;

fn train_config(seed: u64, workers: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::train(3, Normalization::ImageNet, seed);
    cfg.transform = Transform::Train(
        TrainTransform::new(33, 29)
            .unwrap()
            .with_pad_value(Normalization::ImageNet.mean_pixel()),
    );
    cfg.num_workers = workers;
    cfg.prefetch = 2;
    cfg
}

#[test]
fn seeded_epochs_are_identical_for_any_worker_count() {
    let (_d, root) = tiny_voc(10, 1);
    let ds = Arc::new(Dataset::voc(&root, "train").unwrap());
    let collect = |seed, workers, epoch| -> Vec<_> {
        Loader::new(ds.clone(), train_config(seed, workers))
            .unwrap()
            .epoch(epoch)
            .map(Result::unwrap)
            .collect()
    };
    let a = collect(11, 1, 0);
    let b = collect(11, 3, 0);
    assert_eq!(a, b);
    assert_eq!(a.len(), 3, "10 samples, batches of 3, drop_last");
    let ids: HashSet<String> = a.iter().flat_map(|b| b.ids.clone()).collect();
    assert_eq!(ids.len(), 9);
    // another epoch is another order and other augmentations; another seed too
    let e1 = collect(11, 2, 1);
    assert_ne!(a[0].ids, e1[0].ids);
    let other = collect(12, 2, 0);
    assert_ne!(a, other);
    // each sample is the documented transform under its own RNG stream (seed, epoch, index),
    // normalized; padding (ImageNet mean pixel) normalizes to 0
    let t = TrainTransform::new(33, 29)
        .unwrap()
        .with_pad_value(Normalization::ImageNet.mean_pixel());
    let mut padded_pixels = 0;
    for batch in &a {
        assert_eq!((batch.height, batch.width), (33, 29));
        for k in 0..batch.batch_size {
            let s = ds.load(batch.indices[k]).unwrap();
            let mut rng = sample_rng(11, 0, batch.indices[k]);
            let p = t.sample_params(
                s.image.height() as usize,
                s.image.width() as usize,
                &mut rng,
            );
            let (img, lab) = t.apply_params(&s.image, &s.label, &p).unwrap();
            assert_eq!(batch.label(k), lab.as_slice());
            let mut norm = vec![0.0; img.data.len()];
            img.normalize_into(&Normalization::ImageNet, &mut norm)
                .unwrap();
            assert_eq!(batch.image(k), &norm[..]);
            for y in 0..33 {
                for x in 0..29 {
                    let ry = p.offset_y + y;
                    let rx = p.offset_x + if p.flip { 28 - x } else { x };
                    if ry >= p.scaled_height || rx >= p.scaled_width {
                        padded_pixels += 1;
                        assert_eq!(lab.get(x as u32, y as u32), Some(255));
                        for c in 0..3 {
                            assert!(batch.image(k)[c * 33 * 29 + y * 29 + x].abs() < 1e-5);
                        }
                    }
                }
            }
        }
    }
    assert!(
        padded_pixels > 0,
        "24..40 px images scaled by <= 2 need padding to 33x29 sometimes"
    );
}

#[test]
fn epoch_order_is_a_permutation_and_unshuffled_order_is_sorted() {
    let (_d, root) = tiny_voc(7, 1);
    let ds = Arc::new(Dataset::voc(&root, "train").unwrap());
    let loader = Loader::new(ds.clone(), train_config(3, 2)).unwrap();
    for e in 0..4 {
        let mut o = loader.epoch_order(e);
        o.sort();
        assert_eq!(o, (0..7).collect::<Vec<_>>());
    }
    assert_ne!(loader.epoch_order(0), loader.epoch_order(1));
    let mut cfg = train_config(3, 2);
    cfg.shuffle = false;
    cfg.drop_last = false;
    let l = Loader::new(ds, cfg).unwrap();
    assert_eq!(l.epoch_order(5), (0..7).collect::<Vec<_>>());
    assert_eq!(l.num_batches(), 3);
    let sizes: Vec<usize> = l.epoch(0).map(|b| b.unwrap().batch_size).collect();
    assert_eq!(sizes, vec![3, 3, 1]);
}

#[test]
fn dropping_an_epoch_early_stops_the_workers() {
    let (_d, root) = tiny_voc(12, 1);
    let ds = Arc::new(Dataset::voc(&root, "train").unwrap());
    let loader = Loader::new(ds, train_config(1, 2)).unwrap();
    for _ in 0..5 {
        let mut it = loader.epoch(0);
        let first = it.next().unwrap().unwrap();
        assert_eq!(first.batch_size, 3);
        drop(it); // joins the workers; must not hang
    }
}

#[test]
fn eval_identity_batches_pad_to_the_largest_sample() {
    let (_d, root) = tiny_voc(1, 5);
    let ds = Arc::new(Dataset::voc(&root, "val").unwrap());
    let originals: Vec<_> = (0..5).map(|i| ds.load(i).unwrap()).collect();
    let loader = Loader::new(
        ds,
        LoaderConfig::eval(5, EvalTransform::Identity, Normalization::Official),
    )
    .unwrap();
    let batches: Vec<_> = loader.epoch(0).map(Result::unwrap).collect();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    let max_h = originals
        .iter()
        .map(|s| s.image.height() as usize)
        .max()
        .unwrap();
    let max_w = originals
        .iter()
        .map(|s| s.image.width() as usize)
        .max()
        .unwrap();
    assert_eq!((b.height, b.width), (max_h, max_w));
    for (k, s) in originals.iter().enumerate() {
        let (w, h) = s.image.dimensions();
        assert_eq!(b.valid_sizes[k], (h as usize, w as usize));
        let lab = b.label(k);
        for y in 0..max_h {
            for x in 0..max_w {
                let v = lab[y * max_w + x];
                if y < h as usize && x < w as usize {
                    assert_eq!(Some(v), s.label.get(x as u32, y as u32));
                } else {
                    assert_eq!(v, 255);
                }
            }
        }
    }
}

#[test]
fn batches_become_candle_tensors() {
    let (_d, root) = tiny_voc(4, 1);
    let ds = Dataset::voc(&root, "train").unwrap();
    let mut cfg = train_config(0, 1);
    cfg.transform = Transform::Train(
        TrainTransform::new(17, 19)
            .unwrap()
            .with_scale(ScaleRange {
                min: 0.5,
                max: 1.5,
                step: 0.0,
            })
            .unwrap(),
    );
    cfg.batch_size = 2;
    let b = Loader::new(ds, cfg)
        .unwrap()
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    let (img, lab) = b.to_tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(img.dims(), &[2, 3, 17, 19]);
    assert_eq!(img.dtype(), candle_core::DType::F32);
    assert_eq!(lab.dims(), &[2, 17, 19]);
    assert_eq!(lab.dtype(), candle_core::DType::U32);
    let flat: Vec<u32> = lab.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(flat, b.labels.iter().map(|&v| v as u32).collect::<Vec<_>>());
    let fimg: Vec<f32> = img.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(fimg, b.images);
}

#[test]
fn invalid_loader_configs_are_errors() {
    let (_d, root) = tiny_voc(2, 1);
    let ds = Arc::new(Dataset::voc(&root, "train").unwrap());
    let mut cfg = train_config(0, 1);
    cfg.batch_size = 0;
    assert!(Loader::new(ds.clone(), cfg).is_err());
    let mut cfg = train_config(0, 1);
    cfg.num_workers = 0;
    assert!(Loader::new(ds.clone(), cfg).is_err());
    let mut cfg = train_config(0, 1);
    cfg.normalization = Normalization::MeanStd {
        mean: [0.5; 3],
        std: [0.0; 3],
    };
    assert!(Loader::new(ds, cfg).is_err());
    assert!(TrainTransform::new(0, 5).is_err());
    assert!(TrainTransform::new(5, 5)
        .unwrap()
        .with_scale(ScaleRange {
            min: 2.0,
            max: 1.0,
            step: 0.25
        })
        .is_err());
}
