//! Real PASCAL VOC 2012 samples from ../shared: sizes, classes, palette indices, loaders.

use std::collections::HashSet;

use deeplab_data::classes::voc_color;
use deeplab_data::io::{read_mask, read_rgb_image, RawMask};
use deeplab_data::{
    Dataset, EvalTransform, Loader, LoaderConfig, Normalization, ScaleRange, TrainTransform,
};

use crate::common::shared;

/// (id, width, height, classes present including 255), read off the files independently
/// (`file` for the sizes, a separate PNG decoder for the palette indices).
const VAL_SMALL: [(&str, u32, u32, &[u8]); 12] = [
    ("2007_000033", 500, 366, &[0, 1, 255]),
    ("2007_000042", 500, 335, &[0, 19, 255]),
    ("2007_000061", 500, 333, &[0, 4, 255]),
    ("2007_000123", 500, 375, &[0, 19, 255]),
    ("2007_000129", 334, 500, &[0, 2, 15, 255]),
    ("2007_000175", 500, 332, &[0, 17, 255]),
    ("2007_000187", 500, 375, &[0, 20, 255]),
    ("2007_000323", 500, 375, &[0, 15, 255]),
    ("2007_000332", 500, 333, &[0, 13, 255]),
    ("2007_000346", 500, 375, &[0, 5, 15, 255]),
    ("2007_000452", 500, 375, &[0, 9, 18, 255]),
    ("2007_000464", 375, 500, &[0, 10, 255]),
];

#[test]
fn val_small_sizes_and_classes() {
    let Some(root) = shared("voc2012/val_small", "val_small_sizes_and_classes") else {
        return;
    };
    let ds = Dataset::voc(&root, "val").unwrap();
    assert_eq!(ds.len(), 12);
    assert_eq!(ds.num_classes(), 21);
    for (i, (id, w, h, classes)) in VAL_SMALL.iter().enumerate() {
        let s = ds.load(i).unwrap();
        assert_eq!(&s.id, id);
        assert_eq!(s.image.dimensions(), (*w, *h), "{id}");
        assert_eq!(s.label.dimensions(), (*w, *h), "{id}");
        assert_eq!(s.label.unique_values(), classes.to_vec(), "{id}");
    }
}

#[test]
fn palette_indices_are_read_not_colors() {
    let Some(root) = shared("voc2012/val_small", "palette_indices_are_read_not_colors") else {
        return;
    };
    let mask = root.join("SegmentationClass/2007_000129.png");
    let RawMask::Index { data, width, .. } = read_mask(&mask).unwrap() else {
        panic!("VOC masks are palette PNGs");
    };
    // the image crate expands the palette to RGB: every expanded color is the VOC color of the index
    let rgb = read_rgb_image(&mask).unwrap();
    let mut seen = HashSet::new();
    for (i, &idx) in data.iter().enumerate() {
        let px = rgb.get_pixel(i as u32 % width, i as u32 / width).0;
        assert_eq!(px, voc_color(idx), "pixel {i}");
        seen.insert(idx);
    }
    // person (15) is stored as index 15, drawn as (192, 128, 128)
    assert!(seen.contains(&15) && seen.contains(&2) && seen.contains(&255));
    assert_eq!(voc_color(15), [192, 128, 128]);
}

#[test]
fn val_small_eval_loader_pads_to_513() {
    let Some(root) = shared("voc2012/val_small", "val_small_eval_loader_pads_to_513") else {
        return;
    };
    let ds = Dataset::voc(&root, "val").unwrap();
    let originals: Vec<_> = (0..ds.len()).map(|i| ds.load(i).unwrap()).collect();
    let loader = Loader::new(
        ds,
        LoaderConfig::eval(5, EvalTransform::VOC, Normalization::Official),
    )
    .unwrap();
    let mut n = 0;
    for batch in loader.epoch(0) {
        let b = batch.unwrap();
        assert_eq!((b.height, b.width), (513, 513));
        for k in 0..b.batch_size {
            let orig = &originals[b.indices[k]];
            let (w, h) = orig.label.dimensions();
            assert_eq!(b.valid_sizes[k], (h as usize, w as usize));
            let lab = b.label(k);
            let img = b.image(k);
            for y in [0usize, h as usize - 1, h as usize, 512] {
                for x in [0usize, w as usize - 1, w as usize, 512] {
                    let inside = y < h as usize && x < w as usize;
                    let l = lab[y * 513 + x];
                    if inside {
                        assert_eq!(Some(l), orig.label.get(x as u32, y as u32));
                        let raw = orig.image.get_pixel(x as u32, y as u32).0[0] as f32;
                        assert!((img[y * 513 + x] - (raw * 2.0 / 255.0 - 1.0)).abs() < 1e-6);
                    } else {
                        assert_eq!(l, 255);
                        // the mean pixel 127.5 normalizes to 0 in every channel
                        for c in 0..3 {
                            assert!(img[c * 513 * 513 + y * 513 + x].abs() < 1e-6);
                        }
                    }
                }
            }
            n += 1;
        }
    }
    assert_eq!(n, 12);
}

#[test]
fn train_subset_streams_through_the_loader_with_augmentation() {
    let Some(root) = shared(
        "voc2012/train_subset",
        "train_subset_streams_through_the_loader_with_augmentation",
    ) else {
        return;
    };
    let ds = Dataset::voc(&root, "train").unwrap();
    assert_eq!(ds.len(), 330);
    let mut cfg = LoaderConfig::train(8, Normalization::Official, 2024);
    cfg.num_workers = 2;
    let loader = Loader::new(ds, cfg.clone()).unwrap();
    assert_eq!(loader.num_batches(), 41);
    let start = std::time::Instant::now();
    let mut ids = HashSet::new();
    let mut batches = 0;
    let mut first_two = Vec::new();
    for batch in loader.epoch(0) {
        let b = batch.unwrap();
        assert_eq!((b.batch_size, b.height, b.width), (8, 513, 513));
        assert_eq!(b.images.len(), 8 * 3 * 513 * 513);
        assert!(b.labels.iter().all(|&v| v <= 20 || v == 255));
        assert!(b.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        for id in &b.ids {
            assert!(ids.insert(id.clone()), "{id} twice in one epoch");
        }
        if batches < 2 {
            first_two.push(b);
        }
        batches += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(batches, 41);
    assert_eq!(ids.len(), 328);
    println!(
        "train_subset: 328 augmented 513x513 samples in {secs:.1}s ({:.1} images/s, 2 workers, test profile)",
        328.0 / secs
    );
    // the same seed gives the same batches with a different number of workers
    let mut cfg1 = cfg;
    cfg1.num_workers = 1;
    let again: Vec<_> = Loader::new(Dataset::voc(&root, "train").unwrap(), cfg1)
        .unwrap()
        .epoch(0)
        .take(2)
        .map(Result::unwrap)
        .collect();
    assert_eq!(again, first_two);
    // with the official scales most crops of these ~500x375 images reach into the padding
    let padded = first_two
        .iter()
        .flat_map(|b| (0..b.batch_size).map(move |k| b.label(k).contains(&255)))
        .filter(|&p| p)
        .count();
    assert!(padded > 0);
}

#[test]
fn unscaled_unflipped_crop_is_the_source_region() {
    let Some(root) = shared(
        "voc2012/train_subset",
        "unscaled_unflipped_crop_is_the_source_region",
    ) else {
        return;
    };
    use rand::SeedableRng;
    let ds = Dataset::voc(&root, "train").unwrap();
    let t = TrainTransform::new(321, 321)
        .unwrap()
        .with_scale(ScaleRange::NONE)
        .unwrap()
        .with_flip(false);
    for i in [0, 100, 329] {
        let s = ds.load(i).unwrap();
        let (w, h) = s.image.dimensions();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
        let p = t.sample_params(h as usize, w as usize, &mut rng);
        assert_eq!((p.scaled_height, p.scaled_width), (h as usize, w as usize));
        let (img, lab) = t.apply_params(&s.image, &s.label, &p).unwrap();
        let rgb = img.to_rgb();
        for y in (0..321u32).step_by(7) {
            for x in (0..321u32).step_by(5) {
                let (sy, sx) = (y + p.offset_y as u32, x + p.offset_x as u32);
                if sy < h && sx < w {
                    assert_eq!(rgb.get_pixel(x, y), s.image.get_pixel(sx, sy));
                    assert_eq!(lab.get(x, y), s.label.get(sx, sy));
                } else {
                    assert_eq!(lab.get(x, y), Some(255));
                    assert_eq!(rgb.get_pixel(x, y).0, [128; 3]); // 127.5 rounds to 128
                }
            }
        }
    }
}
