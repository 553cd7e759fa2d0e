//! 1x1 stride-1 unpadded convolution as one [`crate::sgemm`] product per image, optionally with
//! a folded BatchNorm epilogue `act(W · x * scale[o] + shift[o])` applied to each output tile
//! while it is still in registers (no separate pass over the output, no zero-filled buffer).
//!
//! The plain convolution (used by [`crate::conv2d`] for f32 CPU tensors) and the folded one run
//! the same product, so folding a BatchNorm changes no bit of the output. The plain one has a
//! backward pass (two sgemm products of the gradient, see [`crate::conv`]); the folded one is
//! inference-only. Both are the convolution op of [`crate::conv`] told its patch matrix is the
//! input itself.

use crate::batch_norm::Activation;
use crate::conv::ConvGemm;
use crate::Conv2dGeometry;
use candle_core::{Result, Tensor};

/// `conv1x1(x, w)` (stride 1, no padding) on f32 CPU tensors through [`crate::sgemm`], with
/// gradients for both inputs.
pub(crate) fn pointwise(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let op = ConvGemm {
        geom: Conv2dGeometry::default(),
        epi: None,
        pointwise: true,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
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
    let op = ConvGemm {
        geom: Conv2dGeometry::default(),
        epi: Some((scale.to_vec(), shift.to_vec(), act)),
        pointwise: true,
    };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}
