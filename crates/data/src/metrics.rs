//! Segmentation metrics: a streaming u64 confusion matrix (per-class IoU, mIoU, pixel accuracy, mean
//! class accuracy, frequency-weighted IoU) and the trimap boundary metric of the DeepLab papers.
//!
//! Conventions: rows are ground truth, columns predictions; ground-truth pixels equal to the ignore
//! label (255) are not counted. mIoU follows TensorFlow's `tf.metrics.mean_iou`, which the official
//! evaluation uses: the mean of `TP / (TP + FP + FN)` over the classes whose union `TP + FP + FN` is
//! non-zero (a class that appears in neither ground truth nor prediction is left out; one that
//! appears in only one of them counts as 0).
//!
//! Trimap (DeepLabv3+ Fig. 5, after Kohli et al. 2009): the IoUs computed only over pixels within
//! `w` pixels of a ground-truth boundary, for several band widths `w`.
//! * Boundary pixels ([`BoundaryDefinition::LabelChange`], the default): a pixel whose 4-neighbour
//!   (up, down, left, right) has a different ground-truth value, the ignore label counting as a value
//!   of its own; both sides of an edge are boundary pixels. [`BoundaryDefinition::IgnoreRegion`]
//!   instead takes the ignore-labelled pixels as the boundary, which is what the papers do on VOC,
//!   whose annotations have a void band around every object.
//! * Distance: the chessboard (L-infinity) distance in pixels, computed exactly by a two-pass
//!   8-neighbour distance transform; the band of width `w` is every pixel at distance `<= w` from a
//!   boundary pixel (so it is the dilation of the boundary by a `(2w+1) x (2w+1)` square), and ignore
//!   pixels inside it are still not counted.

use crate::error::{DataError, Result};
use crate::sample::IGNORE_LABEL;

/// A `num_classes x num_classes` matrix of pixel counts, rows = ground truth, columns = prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// An empty matrix for `num_classes` classes (1..=255).
    pub fn new(num_classes: usize) -> Result<Self> {
        if !(1..=255).contains(&num_classes) {
            return Err(DataError::Config(format!(
                "confusion matrix needs 1..=255 classes, got {num_classes}"
            )));
        }
        Ok(ConfusionMatrix {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Row-major counts (`counts[gt * num_classes + pred]`).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Pixels with ground truth `gt` predicted as `pred`.
    pub fn count(&self, gt: usize, pred: usize) -> u64 {
        self.counts[gt * self.num_classes + pred]
    }

    /// Adds `n` pixels of ground truth `gt` predicted `pred`.
    pub fn add(&mut self, gt: usize, pred: usize, n: u64) -> Result<()> {
        for (what, v) in [("ground truth", gt), ("prediction", pred)] {
            if v >= self.num_classes {
                return Err(DataError::ClassOutOfRange {
                    what,
                    value: v as u32,
                    num_classes: self.num_classes,
                });
            }
        }
        self.counts[gt * self.num_classes + pred] += n;
        Ok(())
    }

    /// Accumulates one image: `gt` and `pred` are equally long label maps. Ground truth 255 is skipped;
    /// any other ground truth or prediction outside `0..num_classes` is an error (and nothing of the
    /// image is counted).
    pub fn update<P: Copy + Into<u32>>(&mut self, gt: &[u8], pred: &[P]) -> Result<()> {
        self.update_where(gt, pred, |_| true)
    }

    /// Like [`ConfusionMatrix::update`], counting only pixels `i` with `keep(i)`.
    pub fn update_where<P: Copy + Into<u32>>(
        &mut self,
        gt: &[u8],
        pred: &[P],
        keep: impl Fn(usize) -> bool,
    ) -> Result<()> {
        if gt.len() != pred.len() {
            return Err(DataError::LengthMismatch {
                what: "prediction vs ground truth",
                expected: gt.len(),
                actual: pred.len(),
            });
        }
        let k = self.num_classes;
        // validate first so a bad image leaves the matrix untouched
        for (&g, &p) in gt.iter().zip(pred) {
            if g == IGNORE_LABEL {
                continue;
            }
            if g as usize >= k {
                return Err(DataError::ClassOutOfRange {
                    what: "ground truth",
                    value: g as u32,
                    num_classes: k,
                });
            }
            let p: u32 = p.into();
            if p as usize >= k {
                return Err(DataError::ClassOutOfRange {
                    what: "prediction",
                    value: p,
                    num_classes: k,
                });
            }
        }
        for (i, (&g, &p)) in gt.iter().zip(pred).enumerate() {
            if g != IGNORE_LABEL && keep(i) {
                let p: u32 = p.into();
                self.counts[g as usize * k + p as usize] += 1;
            }
        }
        Ok(())
    }

    /// Adds another matrix of the same size (e.g. from another thread).
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<()> {
        if other.num_classes != self.num_classes {
            return Err(DataError::LengthMismatch {
                what: "confusion matrix classes",
                expected: self.num_classes,
                actual: other.num_classes,
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// Total counted pixels.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn row_sum(&self, c: usize) -> u64 {
        self.counts[c * self.num_classes..(c + 1) * self.num_classes]
            .iter()
            .sum()
    }

    fn col_sum(&self, c: usize) -> u64 {
        (0..self.num_classes).map(|r| self.count(r, c)).sum()
    }

    /// Per-class IoU `TP / (TP + FP + FN)`; `None` where the union is empty.
    pub fn iou(&self) -> Vec<Option<f64>> {
        (0..self.num_classes)
            .map(|c| {
                let tp = self.count(c, c);
                let union = self.row_sum(c) + self.col_sum(c) - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over classes with a non-empty union (TF `mean_iou`); 0 when there is none.
    pub fn mean_iou(&self) -> f64 {
        mean_defined(&self.iou())
    }

    /// Correctly classified pixels / counted pixels (0 when nothing was counted).
    pub fn pixel_accuracy(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let diag: u64 = (0..self.num_classes).map(|c| self.count(c, c)).sum();
        diag as f64 / total as f64
    }

    /// Per-class recall `TP / (TP + FN)`; `None` for classes absent from the ground truth.
    pub fn class_accuracy(&self) -> Vec<Option<f64>> {
        (0..self.num_classes)
            .map(|c| {
                let n = self.row_sum(c);
                (n > 0).then(|| self.count(c, c) as f64 / n as f64)
            })
            .collect()
    }

    /// Mean of [`ConfusionMatrix::class_accuracy`] over classes present in the ground truth.
    pub fn mean_class_accuracy(&self) -> f64 {
        mean_defined(&self.class_accuracy())
    }

    /// Frequency-weighted IoU: `sum_c (gt pixels of c / total) * IoU_c`.
    pub fn frequency_weighted_iou(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        self.iou()
            .iter()
            .enumerate()
            .map(|(c, iou)| self.row_sum(c) as f64 / total as f64 * iou.unwrap_or(0.0))
            .sum()
    }

    /// All metrics at once.
    pub fn summary(&self) -> MetricsSummary {
        MetricsSummary {
            mean_iou: self.mean_iou(),
            pixel_accuracy: self.pixel_accuracy(),
            mean_class_accuracy: self.mean_class_accuracy(),
            frequency_weighted_iou: self.frequency_weighted_iou(),
            iou: self.iou(),
            class_accuracy: self.class_accuracy(),
            pixels: self.total(),
        }
    }
}

fn mean_defined(v: &[Option<f64>]) -> f64 {
    let defined: Vec<f64> = v.iter().flatten().copied().collect();
    if defined.is_empty() {
        0.0
    } else {
        defined.iter().sum::<f64>() / defined.len() as f64
    }
}

/// The metrics of a confusion matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSummary {
    /// mIoU over classes with a non-empty union.
    pub mean_iou: f64,
    /// Pixel accuracy.
    pub pixel_accuracy: f64,
    /// Mean per-class accuracy over classes present in the ground truth.
    pub mean_class_accuracy: f64,
    /// Frequency-weighted IoU.
    pub frequency_weighted_iou: f64,
    /// Per-class IoU (`None`: empty union).
    pub iou: Vec<Option<f64>>,
    /// Per-class accuracy (`None`: class absent from the ground truth).
    pub class_accuracy: Vec<Option<f64>>,
    /// Counted pixels.
    pub pixels: u64,
}

impl MetricsSummary {
    /// A plain-text table: one line per class (name, IoU, accuracy), then the overall numbers.
    pub fn to_table(&self, class_names: &[&str]) -> String {
        let fmt = |v: Option<f64>| {
            v.map_or_else(|| "     -".to_string(), |x| format!("{:6.2}", 100.0 * x))
        };
        let width = class_names
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!("{:<width$}  {:>6}  {:>6}\n", "class", "IoU%", "acc%");
        for (i, (iou, acc)) in self.iou.iter().zip(&self.class_accuracy).enumerate() {
            let name = class_names
                .get(i)
                .map_or_else(|| i.to_string(), |n| n.to_string());
            s += &format!("{name:<width$}  {}  {}\n", fmt(*iou), fmt(*acc));
        }
        s += &format!(
            "mIoU {:.2}%  pixel acc {:.2}%  mean class acc {:.2}%  fwIoU {:.2}%  ({} pixels)\n",
            100.0 * self.mean_iou,
            100.0 * self.pixel_accuracy,
            100.0 * self.mean_class_accuracy,
            100.0 * self.frequency_weighted_iou,
            self.pixels
        );
        s
    }
}

/// Which ground-truth pixels form the boundary of the trimap metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BoundaryDefinition {
    /// Pixels with a 4-neighbour of a different value (ignore counts as a value).
    #[default]
    LabelChange,
    /// The ignore-labelled pixels (VOC's void band around objects, as in the DeepLab papers).
    IgnoreRegion,
}

/// Marks the boundary pixels of a `width` x `height` ground-truth map.
pub fn boundary_map(
    gt: &[u8],
    width: usize,
    height: usize,
    def: BoundaryDefinition,
) -> Result<Vec<bool>> {
    if gt.len() != width * height {
        return Err(DataError::LengthMismatch {
            what: "ground truth vs width*height",
            expected: width * height,
            actual: gt.len(),
        });
    }
    Ok(match def {
        BoundaryDefinition::IgnoreRegion => gt.iter().map(|&v| v == IGNORE_LABEL).collect(),
        BoundaryDefinition::LabelChange => {
            let mut b = vec![false; gt.len()];
            for y in 0..height {
                for x in 0..width {
                    let i = y * width + x;
                    let v = gt[i];
                    let differs = (x > 0 && gt[i - 1] != v)
                        || (x + 1 < width && gt[i + 1] != v)
                        || (y > 0 && gt[i - width] != v)
                        || (y + 1 < height && gt[i + width] != v);
                    b[i] = differs;
                }
            }
            b
        }
    })
}

/// Exact chessboard (L-infinity) distance of every pixel to the nearest `true` pixel of `mask`
/// (`u32::MAX` everywhere when `mask` has none): two raster passes over the 8-neighbourhood.
pub fn chessboard_distance(mask: &[bool], width: usize, height: usize) -> Vec<u32> {
    const INF: u32 = u32::MAX;
    let mut d: Vec<u32> = mask.iter().map(|&m| if m { 0 } else { INF }).collect();
    let relax = |d: &mut Vec<u32>, i: usize, j: usize| {
        let cand = d[j].saturating_add(1);
        if cand < d[i] {
            d[i] = cand;
        }
    };
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            if x > 0 {
                relax(&mut d, i, i - 1);
            }
            if y > 0 {
                let up = i - width;
                relax(&mut d, i, up);
                if x > 0 {
                    relax(&mut d, i, up - 1);
                }
                if x + 1 < width {
                    relax(&mut d, i, up + 1);
                }
            }
        }
    }
    for y in (0..height).rev() {
        for x in (0..width).rev() {
            let i = y * width + x;
            if x + 1 < width {
                relax(&mut d, i, i + 1);
            }
            if y + 1 < height {
                let down = i + width;
                relax(&mut d, i, down);
                if x > 0 {
                    relax(&mut d, i, down - 1);
                }
                if x + 1 < width {
                    relax(&mut d, i, down + 1);
                }
            }
        }
    }
    d
}

/// The trimap metric: one confusion matrix per band width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimapMetric {
    widths: Vec<u32>,
    definition: BoundaryDefinition,
    matrices: Vec<ConfusionMatrix>,
}

impl TrimapMetric {
    /// A metric for `num_classes` classes and band widths `widths` (pixels, at least one).
    pub fn new(num_classes: usize, widths: &[u32], definition: BoundaryDefinition) -> Result<Self> {
        if widths.is_empty() {
            return Err(DataError::Config(
                "trimap needs at least one band width".into(),
            ));
        }
        Ok(TrimapMetric {
            widths: widths.to_vec(),
            definition,
            matrices: widths
                .iter()
                .map(|_| ConfusionMatrix::new(num_classes))
                .collect::<Result<_>>()?,
        })
    }

    /// The band widths.
    pub fn widths(&self) -> &[u32] {
        &self.widths
    }

    /// The boundary definition.
    pub fn definition(&self) -> BoundaryDefinition {
        self.definition
    }

    /// The confusion matrix of each band width.
    pub fn matrices(&self) -> &[ConfusionMatrix] {
        &self.matrices
    }

    /// Accumulates one `width` x `height` image.
    pub fn update<P: Copy + Into<u32>>(
        &mut self,
        gt: &[u8],
        pred: &[P],
        width: usize,
        height: usize,
    ) -> Result<()> {
        let boundary = boundary_map(gt, width, height, self.definition)?;
        let dist = chessboard_distance(&boundary, width, height);
        // validate once on a scratch matrix so a bad image changes nothing
        ConfusionMatrix::new(self.matrices[0].num_classes())?.update_where(gt, pred, |_| false)?;
        for (w, cm) in self.widths.iter().zip(self.matrices.iter_mut()) {
            cm.update_where(gt, pred, |i| dist[i] <= *w)?;
        }
        Ok(())
    }

    /// Adds another trimap metric with the same widths.
    pub fn merge(&mut self, other: &TrimapMetric) -> Result<()> {
        if other.widths != self.widths || other.definition != self.definition {
            return Err(DataError::Config(
                "cannot merge trimap metrics with different widths or boundary definitions".into(),
            ));
        }
        for (a, b) in self.matrices.iter_mut().zip(&other.matrices) {
            a.merge(b)?;
        }
        Ok(())
    }

    /// `(width, mIoU)` for each band.
    pub fn mean_ious(&self) -> Vec<(u32, f64)> {
        self.widths
            .iter()
            .zip(&self.matrices)
            .map(|(w, m)| (*w, m.mean_iou()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_matrix() {
        // gt:   0 0 1 1 2 255
        // pred: 0 1 1 1 0 2
        let gt = [0u8, 0, 1, 1, 2, 255];
        let pred = [0u8, 1, 1, 1, 0, 2];
        let mut cm = ConfusionMatrix::new(3).unwrap();
        cm.update(&gt, &pred).unwrap();
        assert_eq!(cm.counts(), &[1, 1, 0, 0, 2, 0, 1, 0, 0]);
        assert_eq!(cm.total(), 5);
        // IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (2 + 3 - 2) = 2/3; IoU2 = 0 / (1 + 0 - 0) = 0
        let iou = cm.iou();
        assert!((iou[0].unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((iou[1].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou[2], Some(0.0));
        assert!((cm.mean_iou() - 1.0 / 3.0).abs() < 1e-12);
        assert!((cm.pixel_accuracy() - 3.0 / 5.0).abs() < 1e-12);
        // acc0 = 1/2, acc1 = 1, acc2 = 0
        assert!((cm.mean_class_accuracy() - 0.5).abs() < 1e-12);
        // fw = 2/5 * 1/3 + 2/5 * 2/3 + 1/5 * 0 = 2/5
        assert!((cm.frequency_weighted_iou() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn classes_with_empty_union_are_left_out_of_miou() {
        let mut cm = ConfusionMatrix::new(4).unwrap();
        cm.update(&[0u8, 1, 1], &[0u32, 1, 0]).unwrap();
        let iou = cm.iou();
        assert_eq!(iou[2], None);
        assert_eq!(iou[3], None);
        // IoU0 = 1/2, IoU1 = 1/2
        assert!((cm.mean_iou() - 0.5).abs() < 1e-12);
        assert_eq!(ConfusionMatrix::new(3).unwrap().mean_iou(), 0.0);
    }

    #[test]
    fn bad_values_are_errors_and_change_nothing() {
        let mut cm = ConfusionMatrix::new(3).unwrap();
        assert!(matches!(
            cm.update(&[0u8, 3], &[0u8, 0]).unwrap_err(),
            DataError::ClassOutOfRange { value: 3, .. }
        ));
        assert!(matches!(
            cm.update(&[0u8, 1], &[0u8, 7]).unwrap_err(),
            DataError::ClassOutOfRange {
                what: "prediction",
                value: 7,
                ..
            }
        ));
        assert!(cm.update(&[0u8], &[0u8, 1]).is_err());
        assert_eq!(cm.total(), 0);
        // a prediction under an ignored pixel is not checked
        cm.update(&[255u8], &[200u8]).unwrap();
        assert_eq!(cm.total(), 0);
        assert!(ConfusionMatrix::new(0).is_err());
        assert!(cm.merge(&ConfusionMatrix::new(2).unwrap()).is_err());
    }

    #[test]
    fn chessboard_distance_is_exact() {
        let (w, h) = (9, 7);
        let mut m = vec![false; w * h];
        m[3 * w + 4] = true;
        m[w + 1] = true;
        let d = chessboard_distance(&m, w, h);
        for y in 0..h {
            for x in 0..w {
                let brute = [(4i64, 3i64), (1, 1)]
                    .iter()
                    .map(|(px, py)| (x as i64 - px).abs().max((y as i64 - py).abs()))
                    .min()
                    .unwrap();
                assert_eq!(d[y * w + x] as i64, brute, "({x},{y})");
            }
        }
        assert!(chessboard_distance(&[false; 4], 2, 2)
            .iter()
            .all(|&v| v == u32::MAX));
    }

    #[test]
    fn summary_table_mentions_classes() {
        let mut cm = ConfusionMatrix::new(2).unwrap();
        cm.update(&[0u8, 1], &[0u8, 1]).unwrap();
        let t = cm.summary().to_table(&["bg", "fg"]);
        assert!(t.contains("fg"));
        assert!(t.contains("mIoU 100.00%"));
    }
}
