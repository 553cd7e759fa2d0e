//! Dense 2-D convolution with asymmetric padding and correct gradients on non-square inputs.
//!
//! candle 0.11's conv2d backward derives the transposed convolution's output padding from the
//! height alone, so a strided convolution of an input whose height and width leave different
//! remainders gets a wrong input gradient. This wrapper pads explicitly and then crops the
//! input to exactly the extent the kernel windows cover, so candle's output padding is zero on
//! both axes and its backward is exact. Uncovered rows and columns get zero gradient through
//! the crop. 1x1 stride-1 convolutions run as one batched matmul.

use crate::geometry::Conv2dGeometry;
use candle_core::{bail, Result, Tensor};

/// 2-D convolution of an NCHW tensor with weights `[Cout, Cin / groups, kh, kw]`, optional bias
/// `[Cout]`, and any [`Conv2dGeometry`] (equal strides and dilations on both axes).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: &Conv2dGeometry,
    groups: usize,
) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, cin_g, kh, kw) = w.dims4()?;
    if groups == 0
        || !cin.is_multiple_of(groups)
        || !cout.is_multiple_of(groups)
        || cin_g * groups != cin
    {
        bail!(
            "conv2d: weight {:?} with {groups} groups does not fit input {:?}",
            w.dims(),
            x.dims()
        )
    }
    if let Some(b) = bias {
        if b.dims() != [cout] {
            bail!(
                "conv2d: bias {:?} does not fit {cout} output channels",
                b.dims()
            )
        }
    }
    let (ho, wo) = geom.output_size((h, wd), (kh, kw))?;
    let y = if kh == 1 && kw == 1 && geom.stride == (1, 1) && geom.padding.is_zero() && groups == 1
    {
        let wm = w.reshape((cout, cin))?;
        wm.broadcast_left(n)?
            .matmul(&x.reshape((n, cin, h * wd))?)?
            .reshape((n, cout, h, wd))?
    } else {
        if geom.stride.0 != geom.stride.1 || geom.dilation.0 != geom.dilation.1 {
            bail!("conv2d: candle needs equal strides and dilations on both axes, got {geom:?}")
        }
        let (s, d) = (geom.stride.0, geom.dilation.0);
        let eh = (ho - 1) * s + (kh - 1) * d + 1;
        let ew = (wo - 1) * s + (kw - 1) * d + 1;
        let p = geom.padding;
        let uniform = p.top == p.bottom && p.left == p.right && p.top == p.left;
        if uniform && h + 2 * p.top == eh && wd + 2 * p.top == ew {
            x.conv2d(w, p.top, s, d, groups)?
        } else {
            let xp = crate::reference::pad2d(x, &p, 0.0)?;
            let xp = xp.narrow(2, 0, eh)?.narrow(3, 0, ew)?;
            xp.conv2d(w, 0, s, d, groups)?
        }
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, cout, 1, 1))?),
        None => Ok(y),
    }
}
