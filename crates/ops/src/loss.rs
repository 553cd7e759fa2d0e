//! Pixel-wise softmax cross-entropy over NCHW logits with an ignore label, forward and backward.
//!
//! The loss is the mean over the pixels whose label is not the ignore label (255 for VOC and
//! Cityscapes); a batch in which every pixel is ignored has loss 0 and gradient 0, not NaN.
//! A label that is neither a class index nor the ignore label is an error naming the value.

use crate::cpu::f32_slice;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const TILE: usize = 256;

fn labels_u32<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("{op}: labels must be contiguous u32, got {:?}", s.dtype()),
    }
}

/// `e^x` for the softmax terms `x = logit - max <= 0`, to within 2e-7 relative: Cody-Waite
/// reduction `x = n ln 2 + r` and a degree-6 polynomial for `e^r` (Cephes' `expf`
/// coefficients), without branches or calls so that the loops over a tile's pixels
/// vectorize (libm's `expf` is one call per value: the loss was 6% of a MobileNetV2 training
/// step). Inputs below -87 give `e^-87` (~1.6e-38, nothing next to a softmax denominator of
/// at least 1), positive ones `e^0`; NaN stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // `clamp` keeps NaN.
    let x = x.clamp(-87.0, 0.0);
    // Adding 1.5 * 2^23 rounds to an integer, found in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let k = t.to_bits() as i32 - ROUND.to_bits() as i32;
    // ln 2 as 0.693359375 - 2.12194440e-4: n times the first part is exact.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n for n in -126..=0: a normal f32 built from its exponent bits.
    er * f32::from_bits(((k + 127) as u32) << 23)
}

/// Per tile of pixels of one image: the loss sum, the count of kept pixels, and (when `grad`
/// is given) the gradient `(softmax - onehot) * scale` written for every channel of the tile's
/// pixels (zero for ignored pixels). Every loop over the tile's pixels is branch-free (run
/// under [`crate::cpu`]'s `multiversion!` they vectorize).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile(
    logits: &[f32],
    labels: &[u32],
    c: usize,
    hw: usize,
    p0: usize,
    len: usize,
    ignore: u32,
    grad: Option<(&mut [f32], f32)>,
) -> std::result::Result<(f64, usize), u32> {
    let mut mx = [f32::NEG_INFINITY; TILE];
    let mut se = [0f32; TILE];
    for ch in 0..c {
        let row = &logits[ch * hw + p0..ch * hw + p0 + len];
        for (m, v) in mx[..len].iter_mut().zip(row) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    for ch in 0..c {
        let row = &logits[ch * hw + p0..ch * hw + p0 + len];
        for ((s, v), m) in se[..len].iter_mut().zip(row).zip(&mx[..len]) {
            *s += exp_nonpositive(v - m);
        }
    }
    let labels = &labels[p0..p0 + len];
    let mut loss = 0f64;
    let mut kept = 0usize;
    for (i, &y) in labels.iter().enumerate() {
        if y == ignore {
            continue;
        }
        if y as usize >= c {
            return Err(y);
        }
        kept += 1;
        let lse = mx[i] + se[i].ln();
        loss += (lse - logits[y as usize * hw + p0 + i]) as f64;
    }
    if let Some((g, scale)) = grad {
        // Per pixel: `scale / sum` for kept pixels, and the label (`u32::MAX`, no channel, for
        // ignored ones, whose gradient is zero).
        let mut inv = [0f32; TILE];
        let mut label = [u32::MAX; TILE];
        for i in 0..len {
            if labels[i] != ignore {
                inv[i] = scale / se[i];
                label[i] = labels[i];
            }
        }
        let hot = |keep: bool| if keep { scale } else { 0.0 };
        for ch in 0..c {
            let row = &logits[ch * hw + p0..ch * hw + p0 + len];
            let out = &mut g[ch * hw + p0..ch * hw + p0 + len];
            for i in 0..len {
                let e = exp_nonpositive(row[i] - mx[i]);
                let v = e * inv[i] - hot(label[i] == ch as u32);
                out[i] = if label[i] == u32::MAX { 0.0 } else { v };
            }
        }
    }
    Ok((loss, kept))
}

fn count_kept(labels: &[u32], ignore: u32) -> usize {
    labels.par_iter().filter(|&&y| y != ignore).count()
}

struct CrossEntropy {
    ignore: u32,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = ll.shape().dims4()?;
        let hw = h * w;
        let x = f32_slice(self.name(), ls, ll)?;
        let y = labels_u32(self.name(), ys, yl)?;
        let tiles: Vec<(usize, usize)> = (0..n)
            .flat_map(|b| (0..hw).step_by(TILE).map(move |p| (b, p)))
            .collect();
        let parts: std::result::Result<Vec<(f64, usize)>, u32> = tiles
            .par_iter()
            .map(|&(b, p0)| {
                let len = TILE.min(hw - p0);
                multiversion!(|| tile(
                    &x[b * c * hw..(b + 1) * c * hw],
                    &y[b * hw..(b + 1) * hw],
                    c,
                    hw,
                    p0,
                    len,
                    self.ignore,
                    None,
                ))
            })
            .collect();
        let parts = match parts {
            Ok(p) => p,
            Err(v) => bail!(
                "cross_entropy: label {v} is not a class id (0..{c}) nor the ignore label {}",
                self.ignore
            ),
        };
        let (loss, kept) = parts
            .iter()
            .fold((0f64, 0usize), |a, b| (a.0 + b.0, a.1 + b.1));
        let mean = if kept == 0 { 0.0 } else { loss / kept as f64 };
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::profile::record(
            "loss (bwd)",
            || crate::profile::dims(logits),
            || {
                // The loss is a scalar: its gradient scales the op's output in the same pass.
                let upstream = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let g = logits.apply_op2_no_bwd(
                    labels,
                    &CrossEntropyBwd {
                        ignore: self.ignore,
                        upstream,
                    },
                )?;
                Ok((Some(g), None))
            },
        )
    }
}

/// The gradient of the mean cross-entropy with respect to the logits, times `upstream` (the
/// gradient of whatever consumed the loss with respect to the loss).
struct CrossEntropyBwd {
    ignore: u32,
    upstream: f32,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = ll.shape().dims4()?;
        let hw = h * w;
        let x = f32_slice(self.name(), ls, ll)?;
        let y = labels_u32(self.name(), ys, yl)?;
        let kept = count_kept(y, self.ignore);
        let scale = if kept == 0 {
            0.0
        } else {
            self.upstream / kept as f32
        };
        let mut out = vec![0f32; n * c * hw];
        let res: std::result::Result<(), u32> = out
            .par_chunks_mut(c * hw)
            .enumerate()
            .try_for_each(|(b, g)| {
                let xb = &x[b * c * hw..(b + 1) * c * hw];
                let yb = &y[b * hw..(b + 1) * hw];
                multiversion!(|| {
                    for p0 in (0..hw).step_by(TILE) {
                        tile(
                            xb,
                            yb,
                            c,
                            hw,
                            p0,
                            TILE.min(hw - p0),
                            self.ignore,
                            Some((&mut *g, scale)),
                        )?;
                    }
                    Ok(())
                })
            });
        if let Err(v) = res {
            bail!(
                "cross_entropy: label {v} is not a class id (0..{c}) nor the ignore label {}",
                self.ignore
            )
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

/// Mean softmax cross-entropy of `[N, C, H, W]` logits against `[N, H, W]` labels (any integer
/// dtype), ignoring pixels labelled `ignore_index`. Differentiable w.r.t. the logits.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::zeros((1, 2, 1, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let labels = Tensor::new(&[[[0u8, 255]]], &Device::Cpu)?;
/// let loss = deeplab_ops::cross_entropy(&logits, &labels, 255)?;
/// assert!((loss.to_scalar::<f32>()? - 2f32.ln()).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore_index: u32) -> Result<Tensor> {
    let (n, _, h, w) = logits.dims4()?;
    if labels.dims() != [n, h, w] {
        bail!(
            "cross_entropy: labels {:?} do not match logits {:?} (expected [{n}, {h}, {w}])",
            labels.dims(),
            logits.dims()
        )
    }
    if !logits.device().is_cpu() {
        // No GPU kernel: the reference composition runs on any device.
        return crate::reference::cross_entropy(logits, labels, ignore_index);
    }
    let labels = labels.to_dtype(DType::U32)?.contiguous()?;
    crate::profile::record(
        "loss",
        || crate::profile::dims(logits),
        || {
            logits.to_dtype(DType::F32)?.contiguous()?.apply_op2(
                &labels,
                CrossEntropy {
                    ignore: ignore_index,
                },
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::exp_nonpositive;

    /// The branch-free exponential against f64 `exp` on a dense sweep of `[-87, 0]` (relative
    /// error), its clamps below -87 and above 0, and NaN passing through.
    #[test]
    fn exp_nonpositive_matches_f64() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "largest relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(3.0), 1.0);
        let floor = exp_nonpositive(-87.0);
        assert!(floor > 0.0 && floor < 1.7e-38, "{floor:e}");
        assert_eq!(exp_nonpositive(-1000.0), floor);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), floor);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
