//! Metrics against hand-computed values, including the trimap band on a synthetic square.

use deeplab_data::metrics::{boundary_map, chessboard_distance};
use deeplab_data::{BoundaryDefinition, ConfusionMatrix, TrimapMetric};

/// 20x20, background 0, a 10x10 square of class 1 at rows/cols 5..15.
fn square() -> Vec<u8> {
    let mut gt = vec![0u8; 400];
    for y in 5..15 {
        for x in 5..15 {
            gt[y * 20 + x] = 1;
        }
    }
    gt
}

#[test]
fn trimap_band_on_a_synthetic_square() {
    let gt = square();
    let pred = vec![0u8; 400]; // predicts background everywhere
                               // boundary pixels: the square's outer ring (36) and the 4-neighbours outside it (40)
    let b = boundary_map(&gt, 20, 20, BoundaryDefinition::LabelChange).unwrap();
    assert_eq!(b.iter().filter(|&&v| v).count(), 76);
    let mut t = TrimapMetric::new(2, &[0, 1, 100], BoundaryDefinition::LabelChange).unwrap();
    t.update(&gt, &pred, 20, 20).unwrap();
    let m = t.matrices();
    // w = 0: 40 background + 36 square pixels, all predicted 0
    assert_eq!(m[0].counts(), &[40, 0, 36, 0]);
    // w = 1: outside, rows 3..16 x cols 4..15 union rows 4..15 x cols 3..16 minus the square:
    //   168 + 168 - 144 - 100 = 92; inside, the two outer rings: 100 - 36 = 64
    assert_eq!(m[1].counts(), &[92, 0, 64, 0]);
    // IoU0 = 92 / (92 + 64), IoU1 = 0 -> mIoU = 92/156/2
    let expected = 92.0 / 156.0 / 2.0;
    assert!((t.mean_ious()[1].1 - expected).abs() < 1e-12);
    // a band wider than the image is the whole image
    let mut full = ConfusionMatrix::new(2).unwrap();
    full.update(&gt, &pred).unwrap();
    assert_eq!(m[2], full);
    assert_eq!(full.counts(), &[300, 0, 100, 0]);
}

#[test]
fn trimap_with_the_void_band_definition() {
    // the square surrounded by a 1-pixel void ring (rows/cols 4 and 15), as VOC annotations are
    let mut gt = square();
    for i in 4..16 {
        for (y, x) in [(4, i), (15, i), (i, 4), (i, 15)] {
            gt[y * 20 + x] = 255;
        }
    }
    let mut pred = vec![0u8; 400];
    for y in 7..17 {
        for x in 7..17 {
            pred[y * 20 + x] = 1; // the square shifted by two pixels down-right
        }
    }
    let mut t = TrimapMetric::new(2, &[1], BoundaryDefinition::IgnoreRegion).unwrap();
    t.update(&gt, &pred, 20, 20).unwrap();
    // band: within 1 of the ring (rows/cols 3..=16) minus the 44 void pixels and minus the square's
    // interior beyond depth 1 (rows/cols 6..=13): outside the ring 14x14 - 12x12 = 52 background
    // pixels, inside it the square's outer ring of 36 pixels
    let cm = &t.matrices()[0];
    assert_eq!(cm.total(), 88);
    // background band pixels predicted 1: row 16 cols 7..=16 and col 16 rows 7..=16 -> 10 + 10 - 1
    assert_eq!(cm.count(0, 1), 19);
    assert_eq!(cm.count(0, 0), 33);
    // square ring pixels predicted 1: row 14 cols 7..=14 and col 14 rows 7..=14 -> 8 + 8 - 1
    assert_eq!(cm.count(1, 1), 15);
    assert_eq!(cm.count(1, 0), 21);
    let iou0 = 33.0 / (33.0 + 19.0 + 21.0);
    let iou1 = 15.0 / (15.0 + 21.0 + 19.0);
    assert!((cm.mean_iou() - (iou0 + iou1) / 2.0).abs() < 1e-12);
}

#[test]
fn distance_transform_band_widths_grow_monotonically() {
    let gt = square();
    let b = boundary_map(&gt, 20, 20, BoundaryDefinition::LabelChange).unwrap();
    let d = chessboard_distance(&b, 20, 20);
    let counts: Vec<usize> = (0..6)
        .map(|w| d.iter().filter(|&&v| v <= w).count())
        .collect();
    assert_eq!(counts[0], 76);
    assert_eq!(counts[1], 156);
    assert!(counts.windows(2).all(|p| p[0] <= p[1]));
    // corner (0,0): the nearest boundary pixels are (row 4, col 5) and (row 5, col 4), 5 away
    // ((4,4) is no boundary pixel: its 4-neighbours are all background)
    assert_eq!(d[0], 5);
}

#[test]
fn streaming_equals_one_shot_and_merge() {
    let gt = square();
    let mut pred = vec![0u8; 400];
    for v in pred.iter_mut().skip(150).take(100) {
        *v = 1;
    }
    let mut one = ConfusionMatrix::new(2).unwrap();
    one.update(&gt, &pred).unwrap();
    let mut a = ConfusionMatrix::new(2).unwrap();
    let mut b = ConfusionMatrix::new(2).unwrap();
    a.update(&gt[..200], &pred[..200]).unwrap();
    b.update(&gt[200..], &pred[200..]).unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a, one);
    let s = one.summary();
    assert_eq!(s.pixels, 400);
    assert!((s.mean_iou - one.mean_iou()).abs() < 1e-15);
}
