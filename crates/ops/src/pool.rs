//! Max pooling with explicit padding (padded positions never win), forward and backward.
//!
//! candle's `max_pool2d` has no padding; the ResNet stem needs 3x3 / stride 2 / padding 1.
//! Backward routes each output gradient to the first maximal input of its window, as PyTorch
//! does.

use crate::cpu::f32_slice;
use crate::geometry::Conv2dGeometry;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy)]
struct MaxPool {
    kernel: (usize, usize),
    geom: Conv2dGeometry,
}

impl MaxPool {
    /// Index (within the plane) of the first maximum of output `(oy, ox)`'s window.
    #[inline(always)]
    fn argmax(&self, p: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> usize {
        let g = &self.geom;
        let mut best = usize::MAX;
        let mut bv = f32::NEG_INFINITY;
        for ky in 0..self.kernel.0 {
            let Some(iy) = (oy * g.stride.0 + ky * g.dilation.0)
                .checked_sub(g.padding.top)
                .filter(|&y| y < h)
            else {
                continue;
            };
            for kx in 0..self.kernel.1 {
                let Some(ix) = (ox * g.stride.1 + kx * g.dilation.1)
                    .checked_sub(g.padding.left)
                    .filter(|&x| x < w)
                else {
                    continue;
                };
                let v = p[iy * w + ix];
                if best == usize::MAX || v > bv || (v.is_nan() && !bv.is_nan()) {
                    best = iy * w + ix;
                    bv = v;
                }
            }
        }
        best
    }

    /// The pooled plane `p` (`h x w`) into `o` (`ho x wo`): output `(oy, ox)` is the input at
    /// [`Self::argmax`] (0 for a window wholly in the padding), bit for bit. The columns whose
    /// taps all lie inside the row run tap by tap over a whole output row (no per-tap bounds
    /// checks: each tap's update is a compare-and-select along the row, in window order); the
    /// few edge columns go through `argmax`. With a stride, each input row is first split into
    /// its `stride` phases (every `stride`-th value from each offset), so every tap reads a
    /// contiguous run and the compare-and-selects vectorize (ResNet's 3x3 / 2 stem pool over
    /// 64 planes of 257x257 read its taps with a stride: ~12 ms per pass, ONNX Runtime's 0.4).
    fn forward_plane(&self, p: &[f32], (h, w): (usize, usize), o: &mut [f32], wo: usize) {
        let g = &self.geom;
        let (kh, kw) = self.kernel;
        let (s, d, pl) = (g.stride.1, g.dilation.1, g.padding.left);
        // Interior columns `lo..hi`: `ox * s >= pl` and `ox * s + (kw - 1) * d - pl < w`.
        let lo = pl.div_ceil(s).min(wo);
        let hi = match (w + pl).checked_sub((kw - 1) * d + 1) {
            Some(last) => (last / s + 1).clamp(lo, wo),
            None => lo,
        };
        // The phases of an input row, `pw` values each (phase `r` holds `row[r + s * j]`).
        let pw = w.div_ceil(s);
        let mut phases = if s > 1 {
            vec![0f32; s * pw]
        } else {
            Vec::new()
        };
        for (oy, orow) in o.chunks_exact_mut(wo).enumerate() {
            for ox in (0..lo).chain(hi..wo) {
                let i = self.argmax(p, h, w, oy, ox);
                orow[ox] = if i == usize::MAX { 0.0 } else { p[i] };
            }
            if lo == hi {
                continue;
            }
            let acc = &mut orow[lo..hi];
            let n = acc.len();
            let mut first = true;
            for ky in 0..kh {
                let Some(iy) = (oy * g.stride.0 + ky * g.dilation.0)
                    .checked_sub(g.padding.top)
                    .filter(|&y| y < h)
                else {
                    continue;
                };
                let row = &p[iy * w..(iy + 1) * w];
                if s == 2 {
                    let (even, odd) = phases.split_at_mut(pw);
                    for ((e, od), v) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2))
                    {
                        (*e, *od) = (v[0], v[1]);
                    }
                    if w % 2 == 1 {
                        even[pw - 1] = row[w - 1];
                    }
                } else if s > 2 {
                    for (i, &v) in row.iter().enumerate() {
                        phases[(i % s) * pw + i / s] = v;
                    }
                }
                for kx in 0..kw {
                    // Output column `lo + j` reads `row[base + j * s]`, all inside the row.
                    let base = lo * s + kx * d - pl;
                    let taps = if s == 1 {
                        &row[base..base + n]
                    } else {
                        let at = (base % s) * pw + base / s;
                        &phases[at..at + n]
                    };
                    if first {
                        acc.copy_from_slice(taps);
                        first = false;
                    } else {
                        for (a, &v) in acc.iter_mut().zip(taps) {
                            // `argmax`'s rule: a larger value, or the first NaN, takes over.
                            let take = v > *a || (v.is_nan() && !a.is_nan());
                            *a = if take { v } else { *a };
                        }
                    }
                }
            }
            if first {
                acc.fill(0.0);
            }
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = f32_slice(self.name(), s, l)?;
        let (ho, wo) = self.geom.output_size((h, w), self.kernel)?;
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let p = &x[plane * h * w..(plane + 1) * h * w];
                multiversion!(|| self.forward_plane(p, (h, w), o, wo));
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &MaxPoolBwd(*self))?))
    }
}

struct MaxPoolBwd(MaxPool);

impl candle_core::CustomOp2 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "max-pool2d-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let x = f32_slice(self.name(), xs, xl)?;
        let g = f32_slice(self.name(), gs, gl)?;
        let (_, _, ho, wo) = gl.shape().dims4()?;
        let mut out = vec![0f32; n * c * h * w];
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, dx)| {
                let p = &x[plane * h * w..(plane + 1) * h * w];
                let gp = &g[plane * ho * wo..(plane + 1) * ho * wo];
                for oy in 0..ho {
                    for ox in 0..wo {
                        let i = self.0.argmax(p, h, w, oy, ox);
                        if i != usize::MAX {
                            dx[i] += gp[oy * wo + ox];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

/// Max pooling of an NCHW tensor over `kernel` windows with stride, dilation and explicit
/// padding; differentiable.
pub fn max_pool2d(x: &Tensor, kernel: (usize, usize), geom: &Conv2dGeometry) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let g = geom;
    if g.padding.top >= kernel.0
        || g.padding.bottom >= kernel.0
        || g.padding.left >= kernel.1
        || g.padding.right >= kernel.1
    {
        bail!(
            "max_pool2d: padding {:?} must be smaller than the kernel {kernel:?}",
            g.padding
        )
    }
    g.output_size((h, w), kernel)?;
    if !x.device().is_cpu() {
        // No GPU kernel: the reference composition runs on any device.
        return crate::reference::max_pool2d(x, kernel, geom);
    }
    let op = MaxPool {
        kernel,
        geom: *geom,
    };
    match x.dtype() {
        DType::F32 => x.contiguous()?.apply_op1(op),
        DType::F16 | DType::BF16 | DType::F64 => x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1(op)?
            .to_dtype(x.dtype()),
        dt => bail!("max_pool2d: unsupported dtype {dt:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Padding2d;

    /// The row-wise forward gives, bit for bit, the value at `argmax` of every window, for
    /// column strides 1, 2 and 3 (rows split into phases), dilations and asymmetric paddings,
    /// with NaNs, signed zeros and ties.
    #[test]
    fn forward_rows_match_argmax() {
        let specials = [f32::NAN, -0.0, 0.0, 1.5, 1.5, -f32::INFINITY];
        for (h, w) in [(9, 11), (8, 8), (1, 5), (5, 2), (13, 31)] {
            for (kernel, stride, dilation, (t, b, l, r)) in [
                ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
                ((3, 3), (1, 1), (1, 1), (0, 0, 0, 0)),
                ((3, 2), (1, 2), (2, 1), (2, 0, 0, 1)),
                ((2, 3), (3, 2), (1, 3), (1, 1, 2, 0)),
                ((3, 3), (2, 3), (1, 1), (1, 0, 1, 2)),
            ] {
                let geom = Conv2dGeometry {
                    stride,
                    dilation,
                    padding: Padding2d {
                        top: t,
                        bottom: b,
                        left: l,
                        right: r,
                    },
                };
                let Ok((ho, wo)) = geom.output_size((h, w), kernel) else {
                    continue;
                };
                let pool = MaxPool { kernel, geom };
                let p: Vec<f32> = (0..h * w)
                    .map(|i| {
                        let z = (i as u32).wrapping_mul(2_654_435_761) >> 7;
                        if z.is_multiple_of(5) {
                            specials[(z / 5) as usize % specials.len()]
                        } else {
                            (z % 1000) as f32 / 100.0 - 5.0
                        }
                    })
                    .collect();
                let mut o = vec![f32::NAN; ho * wo];
                pool.forward_plane(&p, (h, w), &mut o, wo);
                for oy in 0..ho {
                    for ox in 0..wo {
                        let i = pool.argmax(&p, h, w, oy, ox);
                        let want = if i == usize::MAX { 0.0 } else { p[i] };
                        assert_eq!(
                            o[oy * wo + ox].to_bits(),
                            want.to_bits(),
                            "{h}x{w} {kernel:?} {geom:?} at ({oy}, {ox})"
                        );
                    }
                }
            }
        }
    }
}
