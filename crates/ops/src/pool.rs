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
                for oy in 0..ho {
                    for ox in 0..wo {
                        let i = self.argmax(p, h, w, oy, ox);
                        o[oy * wo + ox] = if i == usize::MAX { 0.0 } else { p[i] };
                    }
                }
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
