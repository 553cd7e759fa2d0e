//! Inference 1x1 convolution with its folded BatchNorm epilogue fused into the matmul's output
//! pass: `act(W · x * scale[o] + shift[o])` without a separate pass over the output.
//!
//! The output columns (pixels) are split into blocks that fit the caches; each block is one
//! single-threaded gemm call (blocks run in parallel) followed by the epilogue on the block
//! while it is still cache-resident. No output buffer is zero-filled first. Forward only: a
//! folded model does not train.

use crate::batch_norm::Activation;
use crate::cpu::{f32_slice, threads};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Columns per block: about two blocks per worker (load balance), at least 256 columns so each
/// gemm call amortizes packing the weights, at most 2048. A block's output stays in the shared
/// last-level cache for the epilogue that follows its gemm.
fn block_columns(cols: usize, workers: usize) -> usize {
    cols.div_ceil(2 * workers.max(1))
        .clamp(256, 2048)
        .div_ceil(16)
        * 16
}

struct PointwiseEpilogue {
    scale: Vec<f32>,
    shift: Vec<f32>,
    act: Activation,
}

impl CustomOp2 for PointwiseEpilogue {
    fn name(&self) -> &'static str {
        "pointwise-conv-epilogue"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (cout, cin_w, kh, kw) = wl.shape().dims4()?;
        if cin_w != cin || kh != 1 || kw != 1 || self.scale.len() != cout {
            bail!(
                "pointwise conv: weight {:?} / epilogue of {} channels do not fit input {:?}",
                wl.dims(),
                self.scale.len(),
                xl.dims()
            )
        }
        let x = f32_slice(self.name(), xs, xl)?;
        let k = f32_slice(self.name(), ws, wl)?;
        let hw = h * w;
        let len = n * cout * hw;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let nb = block_columns(hw, threads());
        let blocks_per_image = hw.div_ceil(nb);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let act = self.act;
        (0..n * blocks_per_image).into_par_iter().for_each(|job| {
            let (b, j0) = (job / blocks_per_image, job % blocks_per_image * nb);
            let cols = nb.min(hw - j0);
            let xb = &x[b * cin * hw..(b + 1) * cin * hw];
            // SAFETY: block `job` writes only rows `o * hw + [j0, j0 + cols)` of image `b`
            // (disjoint between jobs, all inside `out`'s capacity `len`), lhs is the
            // `cout x cin` row-major weight matrix, rhs columns `[j0, j0 + cols)` of the
            // `cin x hw` row-major image. gemm writes every element of the block
            // (read_dst = false), and the epilogue then reads only those.
            let dst = unsafe { out_ptr.get().add(b * cout * hw + j0) };
            unsafe {
                gemm::gemm(
                    cout,
                    cols,
                    cin,
                    dst,
                    1,
                    hw as isize,
                    false,
                    k.as_ptr(),
                    1,
                    cin as isize,
                    xb.as_ptr().add(j0),
                    1,
                    hw as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for o in 0..cout {
                // SAFETY: row `o` of this job's block, written by the gemm above.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(o * hw), cols) };
                let (s, t) = (self.scale[o], self.shift[o]);
                multiversion!(|| match act {
                    Activation::None => row.iter_mut().for_each(|v| *v = v.mul_add(s, t)),
                    Activation::Relu => row.iter_mut().for_each(|v| *v = v.mul_add(s, t).max(0.0)),
                    Activation::Relu6 => row
                        .iter_mut()
                        .for_each(|v| *v = v.mul_add(s, t).clamp(0.0, 6.0)),
                });
            }
        });
        // SAFETY: the jobs above covered every (image, row, column) of the `len` elements.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, cout, h, w))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        bail!("pointwise conv with a folded BatchNorm is inference-only (fold after training)")
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output blocks to rayon workers (see `cpu_fwd`).
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `act(conv1x1(x, w) * scale + shift)` on an f32 CPU tensor in one pass over the output
/// (`w: [Cout, Cin, 1, 1]`, `scale`/`shift`: `Cout` values). Inference only.
pub(crate) fn pointwise_epilogue(
    x: &Tensor,
    w: &Tensor,
    scale: &[f32],
    shift: &[f32],
    act: Activation,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &w.contiguous()?,
        &PointwiseEpilogue {
            scale: scale.to_vec(),
            shift: shift.to_vec(),
            act,
        },
    )
}
