//! Reference implementations composed of plain candle ops: the oracle for every fast kernel.
//!
//! Each function here computes the same thing as its fast counterpart in this crate using only
//! candle tensor ops whose backward passes candle implements correctly (narrow, pad, reshape,
//! broadcast arithmetic, `index_select`, `matmul`, reductions). They are slow and
//! memory-hungry on purpose: clarity over speed. Tests compare forward values and gradients of
//! the fast kernels against these on random shapes.

use crate::geometry::{Conv2dGeometry, Padding2d};
use crate::resize::ResizeMode;
use candle_core::{bail, DType, Device, Tensor, D};

type Result<T> = candle_core::Result<T>;

/// Pads the two spatial axes of an NCHW tensor with `value`.
pub fn pad2d(x: &Tensor, p: &Padding2d, value: f64) -> Result<Tensor> {
    if p.is_zero() {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    let fill = |rows: usize, cols: usize| -> Result<Tensor> {
        Tensor::full(value, (n, c, rows, cols), x.device())?.to_dtype(x.dtype())
    };
    let mut parts = Vec::new();
    if p.top > 0 {
        parts.push(fill(p.top, w)?);
    }
    parts.push(x.clone());
    if p.bottom > 0 {
        parts.push(fill(p.bottom, w)?);
    }
    let x = Tensor::cat(&parts, 2)?;
    let hp = h + p.top + p.bottom;
    let mut parts = Vec::new();
    if p.left > 0 {
        parts.push(fill(hp, p.left)?);
    }
    parts.push(x);
    if p.right > 0 {
        parts.push(fill(hp, p.right)?);
    }
    Tensor::cat(&parts, 3)
}

/// Elements `start, start + step, ..., start + (count - 1) * step` of `dim`.
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> Result<Tensor> {
    if step == 1 {
        return x.narrow(dim, start, count);
    }
    let avail = x.dim(dim)? - start;
    let want = count * step;
    let t = x.narrow(dim, start, avail.min(want))?;
    let t = if avail < want {
        t.pad_with_zeros(dim, 0, want - avail)?
    } else {
        t
    };
    let mut shape = t.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, step);
    t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// The input window of kernel tap `(ky, kx)`: for every output position, the input value it
/// multiplies with that tap. Shape `[N, C, Ho, Wo]`.
fn tap(
    xp: &Tensor,
    ky: usize,
    kx: usize,
    geom: &Conv2dGeometry,
    out: (usize, usize),
) -> Result<Tensor> {
    let t = strided(xp, 2, ky * geom.dilation.0, out.0, geom.stride.0)?;
    strided(&t, 3, kx * geom.dilation.1, out.1, geom.stride.1)
}

/// Depthwise convolution, weights `[C, 1, kh, kw]`, as a sum over kernel taps.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, geom: &Conv2dGeometry) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (cw, one, kh, kw) = w.dims4()?;
    if cw != c || one != 1 {
        bail!(
            "depthwise weight {:?} does not fit input {:?}",
            w.dims(),
            x.dims()
        )
    }
    let out = geom.output_size((h, wd), (kh, kw))?;
    let xp = pad2d(x, &geom.padding, 0.0)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..kh {
        for kx in 0..kw {
            let wt = w
                .narrow(2, ky, 1)?
                .narrow(3, kx, 1)?
                .reshape((1, c, 1, 1))?;
            let term = tap(&xp, ky, kx, geom, out)?.broadcast_mul(&wt)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty kernel".into()))
}

/// Dense convolution, weights `[Cout, Cin, kh, kw]`, as a sum over taps of matmuls.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: &Conv2dGeometry,
) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, cin_w, kh, kw) = w.dims4()?;
    if cin_w != cin {
        bail!(
            "conv weight {:?} does not fit input {:?}",
            w.dims(),
            x.dims()
        )
    }
    let out = geom.output_size((h, wd), (kh, kw))?;
    let xp = pad2d(x, &geom.padding, 0.0)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..kh {
        for kx in 0..kw {
            let wt = w
                .narrow(2, ky, 1)?
                .narrow(3, kx, 1)?
                .reshape((1, cout, cin))?;
            let xt = tap(&xp, ky, kx, geom, out)?.reshape((n, cin, out.0 * out.1))?;
            let term = wt
                .broadcast_as((n, cout, cin))?
                .contiguous()?
                .matmul(&xt.contiguous()?)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    let mut y = acc.ok_or_else(|| candle_core::Error::Msg("empty kernel".into()))?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, cout, 1))?)?;
    }
    y.reshape((n, cout, out.0, out.1))
}

/// The patch matrix of a convolution (see [`crate::im2col`]): the kernel taps stacked as
/// `[N, C * kh * kw, Ho * Wo]`, rows ordered `(c, ky, kx)`.
pub fn im2col(x: &Tensor, kernel: (usize, usize), geom: &Conv2dGeometry) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let out = geom.output_size((h, w), kernel)?;
    let xp = pad2d(x, &geom.padding, 0.0)?;
    let mut taps = Vec::with_capacity(kernel.0 * kernel.1);
    for ky in 0..kernel.0 {
        for kx in 0..kernel.1 {
            taps.push(tap(&xp, ky, kx, geom, out)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((n, c * kernel.0 * kernel.1, out.0 * out.1))
}

/// Source index pairs and the weight of the second one, for each output coordinate.
pub(crate) fn resize_coords(
    input: usize,
    output: usize,
    mode: ResizeMode,
) -> Vec<(usize, usize, f32)> {
    (0..output)
        .map(|o| {
            let src = mode.source_coord(o, input, output);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let l = (src - i0 as f64) as f32;
            (i0, i1, l)
        })
        .collect()
}

fn lerp_axis(x: &Tensor, dim: usize, output: usize, mode: ResizeMode) -> Result<Tensor> {
    let input = x.dim(dim)?;
    let coords = resize_coords(input, output, mode);
    let dev = x.device();
    let i0: Vec<u32> = coords.iter().map(|c| c.0 as u32).collect();
    let i1: Vec<u32> = coords.iter().map(|c| c.1 as u32).collect();
    let l: Vec<f32> = coords.iter().map(|c| c.2).collect();
    let mut wshape = vec![1usize; x.rank()];
    wshape[dim] = output;
    let l = Tensor::from_vec(l, wshape, dev)?.to_dtype(x.dtype())?;
    let a = x.index_select(&Tensor::new(i0, dev)?, dim)?;
    let b = x.index_select(&Tensor::new(i1, dev)?, dim)?;
    // a + (b - a) * l
    a.broadcast_add(&(b - &a)?.broadcast_mul(&l)?)
}

/// Bilinear resize of an NCHW tensor to `(h, w)`.
pub fn resize_bilinear(x: &Tensor, size: (usize, usize), mode: ResizeMode) -> Result<Tensor> {
    let t = lerp_axis(x, 2, size.0, mode)?;
    lerp_axis(&t, 3, size.1, mode)
}

/// Training-mode batch normalization: returns the output, the batch mean and the biased batch
/// variance (each `[C]`).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?;
    let inv = (var.clone() + eps)?.sqrt()?.recip()?;
    let y = centered
        .broadcast_mul(&inv)?
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    Ok((y, mean.flatten_all()?, var.flatten_all()?))
}

/// Pixel-wise softmax cross-entropy of NCHW logits against `[N, H, W]` integer labels, averaged
/// over the pixels whose label is not `ignore_index`; 0 when every pixel is ignored.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore_index: u32) -> Result<Tensor> {
    let (n, c, h, w) = logits.dims4()?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let labels = labels.to_dtype(DType::U32)?.reshape((n, 1, h, w))?;
    let keep = labels.ne(ignore_index)?;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?;
    let _ = c;
    let picked = logp.gather(&safe.contiguous()?, 1)?;
    let keepf = keep.to_dtype(logits.dtype())?;
    let total = (picked * &keepf)?.sum_all()?.neg()?;
    let count = keepf.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if count == 0.0 {
        return total.affine(0.0, 0.0);
    }
    total.affine(1.0 / count, 0.0)
}

/// Max pooling with explicit padding (padded positions never win).
pub fn max_pool2d(x: &Tensor, kernel: (usize, usize), geom: &Conv2dGeometry) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let out = geom.output_size((h, w), kernel)?;
    let xp = pad2d(x, &geom.padding, f64::NEG_INFINITY)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..kernel.0 {
        for kx in 0..kernel.1 {
            let t = tap(&xp, ky, kx, geom, out)?;
            acc = Some(match acc {
                None => t,
                Some(a) => a.maximum(&t)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// Global average pooling to `[N, C, 1, 1]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)
}

/// A device-independent helper for tests: a seeded uniform tensor in `[-1, 1)`.
pub fn seeded_uniform(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, device)
}
