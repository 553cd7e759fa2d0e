//! Atrous (dilated) depthwise convolution, forward and backward, with a fast CPU kernel.
//!
//! candle runs `conv2d(groups = C)` as C separate tiny convolutions; this op computes one
//! channel plane per task instead. Each plane is copied once into a zero-padded scratch buffer
//! whose columns are split by stride phase, so every kernel tap reads a contiguous slice of
//! the scratch and the inner loops are plain slice arithmetic that LLVM vectorizes (compiled for
//! AVX-512 / AVX2 and selected at run time). 3x3 kernels accumulate all nine taps in registers
//! and store each output once.
//!
//! Weights use PyTorch's layout `[C, 1, kh, kw]` (channel multiplier 1).

use crate::cpu::{f32_slice, has_kernel, threads};
use crate::geometry::{Conv2dGeometry, Padding2d};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Sizes of one plane's convolution and of its padded, phase-split scratch buffer.
#[derive(Clone, Copy, Debug)]
struct Plan {
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    sy: usize,
    sx: usize,
    dy: usize,
    dx: usize,
    pt: usize,
    pl: usize,
    /// Padded rows actually read.
    hp: usize,
    /// Width of each stride-phase column group.
    wq: usize,
}

impl Plan {
    fn new(input: (usize, usize), kernel: (usize, usize), g: &Conv2dGeometry) -> Result<Self> {
        let (ho, wo) = g.output_size(input, kernel)?;
        let hp = (ho - 1) * g.stride.0 + (kernel.0 - 1) * g.dilation.0 + 1;
        let wn = (wo - 1) * g.stride.1 + (kernel.1 - 1) * g.dilation.1 + 1;
        Ok(Self {
            h: input.0,
            w: input.1,
            ho,
            wo,
            kh: kernel.0,
            kw: kernel.1,
            sy: g.stride.0,
            sx: g.stride.1,
            dy: g.dilation.0,
            dx: g.dilation.1,
            pt: g.padding.top,
            pl: g.padding.left,
            hp,
            wq: wn.div_ceil(g.stride.1),
        })
    }

    fn scratch_len(&self) -> usize {
        self.hp * self.sx * self.wq
    }

    /// Offset in the scratch of the `wo` values tap `(ky, kx)` reads for output row `oy`.
    #[inline(always)]
    fn tap_offset(&self, oy: usize, ky: usize, kx: usize) -> usize {
        let r = oy * self.sy + ky * self.dy;
        let c = kx * self.dx;
        (r * self.sx + c % self.sx) * self.wq + c / self.sx
    }

    /// Input coordinate of padded column `j`, if inside the input.
    #[inline(always)]
    fn src_col(&self, j: usize) -> Option<usize> {
        j.checked_sub(self.pl).filter(|&x| x < self.w)
    }

    /// Copies one input plane into the padded phase-split scratch.
    #[inline(always)]
    fn fill(&self, src: &[f32], buf: &mut [f32]) {
        buf.fill(0.0);
        let (lo, hi) = (self.pl, self.pl + self.w);
        for r in 0..self.hp {
            let Some(iy) = r.checked_sub(self.pt).filter(|&y| y < self.h) else {
                continue;
            };
            let row = &src[iy * self.w..(iy + 1) * self.w];
            if self.sx == 1 {
                let end = hi.min(self.wq);
                if end > lo {
                    buf[r * self.wq + lo..r * self.wq + end].copy_from_slice(&row[..end - lo]);
                }
                continue;
            }
            for ph in 0..self.sx {
                let dst = &mut buf[(r * self.sx + ph) * self.wq..(r * self.sx + ph + 1) * self.wq];
                for (q, d) in dst.iter_mut().enumerate() {
                    if let Some(ix) = self.src_col(q * self.sx + ph) {
                        *d = row[ix];
                    }
                }
            }
        }
    }

    /// The inverse of `fill`: accumulates the scratch (a gradient w.r.t. the padded input) into
    /// one input plane.
    #[inline(always)]
    fn unfill(&self, buf: &[f32], dst: &mut [f32]) {
        for r in 0..self.hp {
            let Some(iy) = r.checked_sub(self.pt).filter(|&y| y < self.h) else {
                continue;
            };
            let row = &mut dst[iy * self.w..(iy + 1) * self.w];
            for ph in 0..self.sx {
                let src = &buf[(r * self.sx + ph) * self.wq..(r * self.sx + ph + 1) * self.wq];
                for (q, s) in src.iter().enumerate() {
                    if let Some(ix) = self.src_col(q * self.sx + ph) {
                        row[ix] += *s;
                    }
                }
            }
        }
    }

    /// Forward of one plane from its filled scratch.
    #[inline(always)]
    fn forward(&self, buf: &[f32], k: &[f32], out: &mut [f32]) {
        let wo = self.wo;
        for (oy, orow) in out.chunks_exact_mut(wo).enumerate() {
            if self.kh == 3 && self.kw == 3 {
                let s = |ky, kx| &buf[self.tap_offset(oy, ky, kx)..][..wo];
                let (a0, a1, a2) = (s(0, 0), s(0, 1), s(0, 2));
                let (a3, a4, a5) = (s(1, 0), s(1, 1), s(1, 2));
                let (a6, a7, a8) = (s(2, 0), s(2, 1), s(2, 2));
                for i in 0..wo {
                    let mut v = a0[i] * k[0];
                    v = a1[i].mul_add(k[1], v);
                    v = a2[i].mul_add(k[2], v);
                    v = a3[i].mul_add(k[3], v);
                    v = a4[i].mul_add(k[4], v);
                    v = a5[i].mul_add(k[5], v);
                    v = a6[i].mul_add(k[6], v);
                    v = a7[i].mul_add(k[7], v);
                    orow[i] = a8[i].mul_add(k[8], v);
                }
            } else {
                orow.fill(0.0);
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let a = &buf[self.tap_offset(oy, ky, kx)..][..wo];
                        let kv = k[ky * self.kw + kx];
                        for (o, x) in orow.iter_mut().zip(a) {
                            *o = x.mul_add(kv, *o);
                        }
                    }
                }
            }
        }
    }

    /// Scatters one plane's output gradient into the scratch (gradient w.r.t. padded input).
    #[inline(always)]
    fn backward_input(&self, g: &[f32], k: &[f32], buf: &mut [f32]) {
        let wo = self.wo;
        buf.fill(0.0);
        for (oy, grow) in g.chunks_exact(wo).enumerate() {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let off = self.tap_offset(oy, ky, kx);
                    let kv = k[ky * self.kw + kx];
                    for (d, gv) in buf[off..off + wo].iter_mut().zip(grow) {
                        *d = gv.mul_add(kv, *d);
                    }
                }
            }
        }
    }

    /// Adds one plane's contribution to the weight gradient `dk` (`kh * kw` values, f64).
    /// One pass over the plane per tap, accumulating in 16 f32 lanes, reduced once per plane.
    #[inline(always)]
    fn backward_weight(&self, buf: &[f32], g: &[f32], dk: &mut [f64]) {
        let wo = self.wo;
        let body = wo / 16 * 16;
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let mut acc = [0f32; 16];
                let mut tail = 0f32;
                for (oy, grow) in g.chunks_exact(wo).enumerate() {
                    let a = &buf[self.tap_offset(oy, ky, kx)..][..wo];
                    for (xa, xg) in a[..body]
                        .chunks_exact(16)
                        .zip(grow[..body].chunks_exact(16))
                    {
                        for j in 0..16 {
                            acc[j] = xa[j].mul_add(xg[j], acc[j]);
                        }
                    }
                    for (xa, xg) in a[body..].iter().zip(&grow[body..]) {
                        tail = xa.mul_add(*xg, tail);
                    }
                }
                dk[ky * self.kw + kx] += acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
            }
        }
    }
}

fn check_shapes(x: &Layout, w: &Layout) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (n, c, h, wd) = x.shape().dims4()?;
    let (cw, m, kh, kw) = w.shape().dims4()?;
    if cw != c || m != 1 {
        bail!(
            "depthwise_conv2d: weight {:?} does not fit input {:?} (expected [{c}, 1, kh, kw])",
            w.dims(),
            x.dims()
        )
    }
    Ok((n, c, h, wd, kh, kw))
}

/// Forward op on `(x, weight)`.
struct DwFwd {
    geom: Conv2dGeometry,
}

impl CustomOp2 for DwFwd {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w, kh, kw) = check_shapes(xl, wl)?;
        let x = f32_slice(self.name(), xs, xl)?;
        let k = f32_slice(self.name(), ws, wl)?;
        let p = Plan::new((h, w), (kh, kw), &self.geom)?;
        let (ho, wo) = (p.ho, p.wo);
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo).enumerate().for_each_init(
            || vec![0f32; p.scratch_len()],
            |buf, (plane, o)| {
                let ch = plane % c;
                let src = &x[plane * h * w..(plane + 1) * h * w];
                let kk = &k[ch * kh * kw..(ch + 1) * kh * kw];
                multiversion!(|| {
                    p.fill(src, buf);
                    p.forward(buf, kk, o);
                })
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, h, w, kh, kw) = check_shapes(xl, wl)?;
        let p = Plan::new((h, w), (kh, kw), &self.geom)?;
        crate::cuda::depthwise_fwd(xs, xl, ws, wl, &self.geom, (p.ho, p.wo))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let g = &self.geom;
        let span = ((kh - 1) * g.dilation.0, (kw - 1) * g.dilation.1);
        let p = &g.padding;
        let dx = if g.stride == (1, 1)
            && p.top <= span.0
            && p.bottom <= span.0
            && p.left <= span.1
            && p.right <= span.1
        {
            // Stride 1: the input gradient is a depthwise convolution of the output gradient
            // with the flipped kernel, which runs on the fused forward kernel.
            let flip = |t: &Tensor, dim: usize, len: usize| -> Result<Tensor> {
                let idx: Vec<u32> = (0..len as u32).rev().collect();
                t.index_select(&Tensor::new(idx, t.device())?, dim)
            };
            let wf = flip(&flip(w, 2, kh)?, 3, kw)?.contiguous()?;
            let geom = Conv2dGeometry {
                stride: (1, 1),
                dilation: g.dilation,
                padding: Padding2d {
                    top: span.0 - p.top,
                    bottom: span.0 - p.bottom,
                    left: span.1 - p.left,
                    right: span.1 - p.right,
                },
            };
            grad.apply_op2_no_bwd(&wf, &DwFwd { geom })?
        } else {
            grad.apply_op2_no_bwd(
                &w.contiguous()?,
                &DwBwdInput {
                    geom: *g,
                    input: (h, wd),
                },
            )?
        };
        let dw = grad.apply_op2_no_bwd(
            &x.contiguous()?,
            &DwBwdWeight {
                geom: *g,
                kernel: (kh, kw),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Input gradient for strided convolutions, on `(grad_out, weight)`.
struct DwBwdInput {
    geom: Conv2dGeometry,
    input: (usize, usize),
}

impl CustomOp2 for DwBwdInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-bwd-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, ho, wo) = gl.shape().dims4()?;
        let (_, _, kh, kw) = wl.shape().dims4()?;
        let g = f32_slice(self.name(), gs, gl)?;
        let k = f32_slice(self.name(), ws, wl)?;
        let (h, w) = self.input;
        let p = Plan::new((h, w), (kh, kw), &self.geom)?;
        if (p.ho, p.wo) != (ho, wo) {
            bail!(
                "depthwise_conv2d backward: gradient {:?} does not match output {:?}",
                gl.dims(),
                (p.ho, p.wo)
            )
        }
        let mut out = vec![0f32; n * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each_init(
            || vec![0f32; p.scratch_len()],
            |buf, (plane, dx)| {
                let ch = plane % c;
                let gp = &g[plane * ho * wo..(plane + 1) * ho * wo];
                let kk = &k[ch * kh * kw..(ch + 1) * kh * kw];
                multiversion!(|| {
                    p.backward_input(gp, kk, buf);
                    p.unfill(buf, dx);
                })
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::depthwise_bwd_input(gs, gl, ws, wl, &self.geom, self.input)
    }
}

/// Weight gradient, on `(grad_out, x)`.
struct DwBwdWeight {
    geom: Conv2dGeometry,
    kernel: (usize, usize),
}

impl CustomOp2 for DwBwdWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-bwd-weight"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let (kh, kw) = self.kernel;
        let g = f32_slice(self.name(), gs, gl)?;
        let x = f32_slice(self.name(), xs, xl)?;
        let p = Plan::new((h, w), (kh, kw), &self.geom)?;
        let (ho, wo) = (p.ho, p.wo);
        if gl.dims() != [n, c, ho, wo] {
            bail!(
                "depthwise_conv2d backward: gradient {:?} does not match output {:?}",
                gl.dims(),
                (n, c, ho, wo)
            )
        }
        let kk = kh * kw;
        let mut out = vec![0f32; c * kk];
        let _ = threads();
        out.par_chunks_mut(kk).enumerate().for_each_init(
            || vec![0f32; p.scratch_len()],
            |buf, (ch, dk)| {
                let mut acc = vec![0f64; kk];
                for b in 0..n {
                    let plane = b * c + ch;
                    let src = &x[plane * h * w..(plane + 1) * h * w];
                    let gp = &g[plane * ho * wo..(plane + 1) * ho * wo];
                    multiversion!(|| {
                        p.fill(src, buf);
                        p.backward_weight(buf, gp, &mut acc);
                    })
                }
                for (d, a) in dk.iter_mut().zip(&acc) {
                    *d = *a as f32;
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((c, 1, kh, kw))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::depthwise_bwd_weight(gs, gl, xs, xl, &self.geom, self.kernel)
    }
}

/// Depthwise (per-channel) 2-D convolution of an NCHW tensor with weights `[C, 1, kh, kw]`,
/// any stride, dilation (atrous rate) and explicit padding, with gradients for both inputs.
///
/// f32 runs the fast kernel; f16, bf16 and f64 are computed in f32 and converted back.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use deeplab_ops::{depthwise_conv2d, Conv2dGeometry};
/// let x = Tensor::ones((1, 2, 5, 5), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let y = depthwise_conv2d(&x, &w, &Conv2dGeometry::same(3, 2))?; // rate 2, SAME padding
/// assert_eq!(y.dims(), &[1, 2, 5, 5]);
/// assert_eq!(y.get(0)?.get(0)?.get(2)?.get(2)?.to_scalar::<f32>()?, 9.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, geom: &Conv2dGeometry) -> Result<Tensor> {
    check_shapes(x.layout(), w.layout())?;
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    geom.output_size((h, wd), (kh, kw))?;
    if !has_kernel(x.device()) {
        return crate::reference::depthwise_conv2d(x, w, geom);
    }
    let op = DwFwd { geom: *geom };
    match x.dtype() {
        DType::F32 => x
            .contiguous()?
            .apply_op2(&w.to_dtype(DType::F32)?.contiguous()?, op),
        DType::F16 | DType::BF16 | DType::F64 => {
            let y = x
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op2(&w.to_dtype(DType::F32)?.contiguous()?, op)?;
            y.to_dtype(x.dtype())
        }
        dt => bail!("depthwise_conv2d: unsupported dtype {dt:?}"),
    }
}
