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

/// Per tile of pixels of one image: the loss sum, the count of kept pixels, and (when `grad`
/// is given) the gradient `softmax - onehot` written for kept pixels.
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
    mut grad: Option<(&mut [f32], f32)>,
) -> std::result::Result<(f64, usize), u32> {
    let mut mx = [f32::NEG_INFINITY; TILE];
    let mut se = [0f32; TILE];
    for ch in 0..c {
        let row = &logits[ch * hw + p0..ch * hw + p0 + len];
        for (m, v) in mx[..len].iter_mut().zip(row) {
            *m = m.max(*v);
        }
    }
    for ch in 0..c {
        let row = &logits[ch * hw + p0..ch * hw + p0 + len];
        for ((s, v), m) in se[..len].iter_mut().zip(row).zip(&mx[..len]) {
            *s += (v - m).exp();
        }
    }
    let mut loss = 0f64;
    let mut kept = 0usize;
    for i in 0..len {
        let y = labels[p0 + i];
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
    if let Some((g, scale)) = grad.as_mut() {
        for ch in 0..c {
            for i in 0..len {
                let y = labels[p0 + i];
                let idx = ch * hw + p0 + i;
                g[idx] = if y == ignore {
                    0.0
                } else {
                    let p = (logits[idx] - mx[i]).exp() / se[i];
                    (p - if y as usize == ch { 1.0 } else { 0.0 }) * *scale
                };
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
                tile(
                    &x[b * c * hw..(b + 1) * c * hw],
                    &y[b * hw..(b + 1) * hw],
                    c,
                    hw,
                    p0,
                    len,
                    self.ignore,
                    None,
                )
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
        let g = logits.apply_op2_no_bwd(
            labels,
            &CrossEntropyBwd {
                ignore: self.ignore,
            },
        )?;
        Ok((Some(g.broadcast_mul(&grad.to_dtype(DType::F32)?)?), None))
    }
}

struct CrossEntropyBwd {
    ignore: u32,
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
        let scale = if kept == 0 { 0.0 } else { 1.0 / kept as f32 };
        let mut out = vec![0f32; n * c * hw];
        let res: std::result::Result<(), u32> = out
            .par_chunks_mut(c * hw)
            .enumerate()
            .try_for_each(|(b, g)| {
                let xb = &x[b * c * hw..(b + 1) * c * hw];
                let yb = &y[b * hw..(b + 1) * hw];
                for p0 in (0..hw).step_by(TILE) {
                    tile(
                        xb,
                        yb,
                        c,
                        hw,
                        p0,
                        TILE.min(hw - p0),
                        self.ignore,
                        Some((g, scale)),
                    )?;
                }
                Ok(())
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
    logits.to_dtype(DType::F32)?.contiguous()?.apply_op2(
        &labels,
        CrossEntropy {
            ignore: ignore_index,
        },
    )
}
