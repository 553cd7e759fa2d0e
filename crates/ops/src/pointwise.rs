//! 1x1 stride-1 unpadded convolution as one [`crate::sgemm`] product per image, optionally with
//! a folded BatchNorm epilogue `act(W · x * scale[o] + shift[o])` applied to each output tile
//! while it is still in registers (no separate pass over the output, no zero-filled buffer).
//!
//! The plain convolution (used by [`crate::conv2d`] for f32 CPU tensors) and the folded one run
//! the same product, so folding a BatchNorm changes no bit of the output. The plain one has a
//! backward pass (two candle matmuls of the gradient); the folded one is inference-only.

use crate::batch_norm::Activation;
use crate::cpu::f32_slice;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct Pointwise {
    epi: Option<(Vec<f32>, Vec<f32>, Activation)>,
}

impl CustomOp2 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise-conv-sgemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, kh, kw) = wl.shape().dims4()?;
        if kh != 1 || kw != 1 {
            bail!("pointwise conv: weight {:?} is not 1x1", wl.dims())
        }
        let x = f32_slice(self.name(), xs, xl)?;
        let k = f32_slice(self.name(), ws, wl)?;
        let epi = self
            .epi
            .as_ref()
            .map(|(s, t, a)| (s.as_slice(), t.as_slice(), *a));
        let (out, shape) = crate::conv::forward_f32(
            (x, xl.shape()),
            (k, wl.shape()),
            &crate::Conv2dGeometry::default(),
            epi,
            None,
            true,
        )?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.epi.is_some() {
            bail!("pointwise conv with a folded BatchNorm is inference-only (fold after training)")
        }
        let (n, cin, h, wd) = x.dims4()?;
        crate::conv::matmul_conv_grads(
            x,
            w,
            grad,
            |x| x.reshape((n, cin, h * wd)),
            |dx| dx.reshape((n, cin, h, wd)),
        )
    }
}

/// `conv1x1(x, w)` (stride 1, no padding) on f32 CPU tensors through [`crate::sgemm`], with
/// gradients for both inputs.
pub(crate) fn pointwise(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Pointwise { epi: None })
}

/// `act(conv1x1(x, w) * scale + shift)` on an f32 CPU tensor in one pass over the output
/// (`w: [Cout, Cin, 1, 1]`, `scale`/`shift`: `Cout` values). Inference only; equal bit for bit
/// to [`pointwise`] followed by [`crate::channel_affine`].
pub(crate) fn pointwise_epilogue(
    x: &Tensor,
    w: &Tensor,
    (scale, shift): (&[f32], &[f32]),
    act: Activation,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &w.contiguous()?,
        &Pointwise {
            epi: Some((scale.to_vec(), shift.to_vec(), act)),
        },
    )
}
