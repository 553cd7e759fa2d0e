//! Bilinear resize of NCHW tensors to an arbitrary size, forward and backward.
//!
//! Three coordinate conventions are supported, because the references disagree:
//! TensorFlow DeepLab resizes with `align_corners=True` (every resize in the official graph),
//! PyTorch's `F.interpolate(..., align_corners=False)` and TF2's `half_pixel_centers=True` use
//! half-pixel centres, and TensorFlow's legacy default (TFLite `RESIZE_BILINEAR` with both flags
//! off) maps `dst * in / out` directly.

use crate::cpu::{f32_slice, threads};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// How output pixel coordinates map to input coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    /// `src = dst * (in - 1) / (out - 1)`: corners map to corners (TF DeepLab, `align_corners=True`).
    AlignCorners,
    /// `src = (dst + 0.5) * in / out - 0.5`, clamped at 0 (PyTorch `align_corners=False`).
    HalfPixel,
    /// `src = dst * in / out` (TensorFlow's legacy default: both flags off).
    Asymmetric,
}

impl ResizeMode {
    /// The input coordinate sampled by output coordinate `dst`.
    pub fn source_coord(self, dst: usize, input: usize, output: usize) -> f64 {
        let (d, i, o) = (dst as f64, input as f64, output as f64);
        match self {
            ResizeMode::AlignCorners => {
                if output > 1 {
                    d * (i - 1.0) / (o - 1.0)
                } else {
                    0.0
                }
            }
            ResizeMode::HalfPixel => ((d + 0.5) * i / o - 0.5).max(0.0),
            ResizeMode::Asymmetric => d * i / o,
        }
    }

    /// The mode for a PyTorch-style `align_corners` flag.
    pub fn from_align_corners(align_corners: bool) -> Self {
        if align_corners {
            ResizeMode::AlignCorners
        } else {
            ResizeMode::HalfPixel
        }
    }
}

#[derive(Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    l: f32,
}

fn taps(input: usize, output: usize, mode: ResizeMode) -> Vec<Tap> {
    crate::reference::resize_coords(input, output, mode)
        .into_iter()
        .map(|(i0, i1, l)| Tap { i0, i1, l })
        .collect()
}

struct ResizeFwd {
    size: (usize, usize),
    mode: ResizeMode,
}

impl CustomOp1 for ResizeFwd {
    fn name(&self) -> &'static str {
        "resize-bilinear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = self.size;
        let ty = taps(h, ho, self.mode);
        let tx = taps(w, wo, self.mode);
        let mut out = vec![0f32; n * c * ho * wo];
        // Tasks are blocks of output rows of one plane. Each task interpolates horizontally
        // only the input rows its block reads, once, then blends them vertically with a
        // plain vectorizable loop (each input row serves ~ho/h output rows).
        let planes = n * c;
        let blocks_per_plane = (threads() * 4).div_ceil(planes).max(1).min(ho);
        let rows_per_block = ho.div_ceil(blocks_per_plane);
        let chunk = rows_per_block * wo;
        let tasks = out
            .par_chunks_mut(ho * wo)
            .enumerate()
            .flat_map(|(plane, po)| {
                po.par_chunks_mut(chunk.max(1))
                    .enumerate()
                    .map(move |(b, blk)| (plane, b, blk))
            });
        tasks.for_each(|(plane, b, block)| {
            let oy0 = b * rows_per_block;
            let rows = block.len() / wo;
            if rows == 0 {
                return;
            }
            let p = &x[plane * h * w..(plane + 1) * h * w];
            let first = ty[oy0].i0;
            let last = ty[oy0 + rows - 1].i1.max(ty[oy0 + rows - 1].i0);
            let mut hbuf = vec![0f32; (last - first + 1) * wo];
            multiversion!(|| {
                for (k, hrow) in hbuf.chunks_exact_mut(wo).enumerate() {
                    let iy = first + k;
                    lerp_row(&p[iy * w..(iy + 1) * w], &tx, hrow);
                }
                for (r, orow) in block.chunks_exact_mut(wo).enumerate() {
                    let t = ty[oy0 + r];
                    let a = &hbuf[(t.i0 - first) * wo..][..wo];
                    let b = &hbuf[(t.i1 - first) * wo..][..wo];
                    for i in 0..wo {
                        orow[i] = a[i] + (b[i] - a[i]) * t.l;
                    }
                }
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::resize_fwd(s, l, self.size, self.mode)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::profile::record(
            "resize (bwd)",
            || crate::profile::dims(arg),
            || {
                let (_, _, h, w) = arg.dims4()?;
                let op = ResizeBwd {
                    input: (h, w),
                    mode: self.mode,
                };
                Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
            },
        )
    }
}

#[inline(always)]
fn lerp_row(src: &[f32], tx: &[Tap], dst: &mut [f32]) {
    for (d, t) in dst.iter_mut().zip(tx) {
        let a = src[t.i0];
        let b = src[t.i1];
        *d = a + (b - a) * t.l;
    }
}

struct ResizeBwd {
    input: (usize, usize),
    mode: ResizeMode,
}

impl CustomOp1 for ResizeBwd {
    fn name(&self) -> &'static str {
        "resize-bilinear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(self.name(), s, l)?;
        let (n, c, ho, wo) = l.shape().dims4()?;
        let (h, w) = self.input;
        let ty = taps(h, ho, self.mode);
        let tx = taps(w, wo, self.mode);
        // Separably: each output row's gradient is first spread over one input-width row (two
        // scattered adds per value, into a row that stays in L1), which is then added to its
        // two input rows with their weights (whole-row passes that vectorize), instead of four
        // scattered read-modify-writes per value across the plane.
        let mut out = vec![0f32; n * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each_init(
            || vec![0f32; w],
            |row, (plane, dx)| {
                let gp = &g[plane * ho * wo..(plane + 1) * ho * wo];
                multiversion!(|| {
                    for (oy, t) in ty.iter().enumerate() {
                        row.fill(0.0);
                        for (gv, tc) in gp[oy * wo..(oy + 1) * wo].iter().zip(&tx) {
                            row[tc.i0] += gv * (1.0 - tc.l);
                            row[tc.i1] += gv * tc.l;
                        }
                        for (i, f) in [(t.i0, 1.0 - t.l), (t.i1, t.l)] {
                            for (d, r) in dx[i * w..(i + 1) * w].iter_mut().zip(row.iter()) {
                                *d += r * f;
                            }
                        }
                    }
                })
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::resize_bwd(s, l, self.input, self.mode)
    }
}

/// Bilinear resize of an NCHW tensor to `size = (h, w)`, with gradients.
///
/// f32 runs the fast kernel directly; f16/bf16 are computed in f32 and converted back.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use deeplab_ops::{resize_bilinear, ResizeMode};
/// let x = Tensor::arange(0f32, 4.0, &Device::Cpu)?.reshape((1, 1, 2, 2))?;
/// let y = resize_bilinear(&x, (3, 3), ResizeMode::AlignCorners)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn resize_bilinear(x: &Tensor, size: (usize, usize), mode: ResizeMode) -> Result<Tensor> {
    crate::profile::record(
        "resize",
        || format!("{} -> {}x{}", crate::profile::dims(x), size.0, size.1),
        || resize_inner(x, size, mode),
    )
}

fn resize_inner(x: &Tensor, size: (usize, usize), mode: ResizeMode) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if size.0 == 0 || size.1 == 0 || h == 0 || w == 0 {
        bail!(
            "resize_bilinear: cannot resize {:?} to {:?}",
            x.dims(),
            size
        )
    }
    if (h, w) == size {
        return Ok(x.clone());
    }
    if !crate::cpu::has_kernel(x.device()) {
        return crate::reference::resize_bilinear(x, size, mode);
    }
    let op = ResizeFwd { size, mode };
    match x.dtype() {
        DType::F32 => x.contiguous()?.apply_op1(op),
        DType::F16 | DType::BF16 | DType::F64 => x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1(op)?
            .to_dtype(x.dtype()),
        dt => bail!("resize_bilinear: unsupported dtype {dt:?}"),
    }
}
