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

/// One input of a 1x1 convolution over concatenated channels
/// ([`crate::ConvBnAct::forward_concat`]).
#[derive(Clone, Copy, Debug)]
pub enum ConcatInput<'a> {
    /// An NCHW map.
    Map(&'a Tensor),
    /// A map constant over space, `[N, C, 1, 1]`: every pixel holds the same `C` values
    /// (DeepLab's image-pooling branch, whose bilinear resize from 1x1 is a broadcast).
    Constant(&'a Tensor),
}

impl ConcatInput<'_> {
    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        match self {
            ConcatInput::Map(t) | ConcatInput::Constant(t) => t,
        }
    }
}

/// `act(conv1x1(concat(parts), w) * scale + shift)` without building the concatenation: on
/// f32 CPU tensors with AVX-512, per image one product per map accumulating into the output
/// (the weight's columns of that map's channels), the epilogue at the last; constant parts
/// at the front contribute one value per output channel, computed once and written as the
/// products' starting sums. Every element is the same chain of fused multiply-adds over the
/// channels in order as in the product over the concatenation (the product continues a chain
/// exactly across depth blocks), so the result is the same bits. `None` when this does not
/// apply (other devices or types, no AVX-512, a constant after a map, no map), for the caller
/// to concatenate.
pub(crate) fn concat_epilogue(
    parts: &[ConcatInput<'_>],
    w: &Tensor,
    epilogue: &crate::Epilogue,
) -> Result<Option<Tensor>> {
    use candle_core::DType;
    let Some(first_map) = parts.iter().position(|p| matches!(p, ConcatInput::Map(_))) else {
        return Ok(None);
    };
    let Some((scale, shift)) = epilogue.fused_f32(parts[first_map].tensor(), w) else {
        return Ok(None);
    };
    let later_constant = parts[first_map..]
        .iter()
        .any(|p| matches!(p, ConcatInput::Constant(_)));
    let cpu_f32 = parts
        .iter()
        .all(|p| p.tensor().device().is_cpu() && p.tensor().dtype() == DType::F32);
    if later_constant || !cpu_f32 || !crate::cpu::has_avx512() {
        return Ok(None);
    }
    let (cout, _, kh, kw) = w.dims4()?;
    if (kh, kw) != (1, 1) {
        return Ok(None);
    }
    crate::profile::record(
        "conv 1x1 + epilogue over a concatenation",
        || {
            let shapes: Vec<String> = parts
                .iter()
                .map(|p| crate::profile::dims(p.tensor()))
                .collect();
            format!("{} -> {cout}", shapes.join(" + "))
        },
        || concat_products(parts, first_map, w, (scale, shift, epilogue.act)).map(Some),
    )
}

/// [`concat_epilogue`] once it applies: `parts[first_map]` is the first map, every part before
/// it a constant.
fn concat_products(
    parts: &[ConcatInput<'_>],
    first_map: usize,
    w: &Tensor,
    (scale, shift, act): (&[f32], &[f32], crate::Activation),
) -> Result<Tensor> {
    use candle_core::{bail, Storage};
    let (cout, k, _, _) = w.dims4()?;
    let (n, _, h, wd) = parts[first_map].tensor().dims4()?;
    let hw = h * wd;
    let mut channels = Vec::with_capacity(parts.len());
    for p in parts {
        let t = p.tensor();
        let (pn, c, ph, pw) = t.dims4()?;
        let want = match p {
            ConcatInput::Map(_) => (n, h, wd),
            ConcatInput::Constant(_) => (n, 1, 1),
        };
        if (pn, ph, pw) != want {
            bail!(
                "conv1x1 over a concatenation: part {:?} does not fit {:?}",
                t.dims(),
                parts[first_map].tensor().dims()
            )
        }
        channels.push(c);
    }
    if channels.iter().sum::<usize>() != k || scale.len() != cout || shift.len() != cout {
        bail!(
            "conv1x1 over a concatenation: weight {:?} (epilogue of {} channels) does not fit parts of {channels:?} channels",
            w.dims(),
            scale.len()
        )
    }
    let parts: Vec<Tensor> = parts
        .iter()
        .map(|p| p.tensor().contiguous())
        .collect::<Result<_>>()?;
    let w = w.contiguous()?;
    let guards: Vec<_> = parts.iter().map(|t| t.storage_and_layout()).collect();
    fn slice<'a>(s: &'a Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
        match s {
            Storage::Cpu(cs) => crate::cpu::f32_slice("conv1x1 over a concatenation", cs, l),
            _ => bail!("conv1x1 over a concatenation: tensors must be on the CPU"),
        }
    }
    let wg = w.storage_and_layout();
    let wv = slice(&wg.0, wg.1)?;
    let total = n * cout * hw;
    // Every value is written once below (the constants' rows, or the first product): no zero
    // fill.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let k_constants: usize = channels[..first_map].iter().sum();
    for b in 0..n {
        let ob = &mut out.spare_capacity_mut()[b * cout * hw..(b + 1) * cout * hw];
        if first_map > 0 {
            // The constant parts: each output channel's chain over their channels, then every
            // pixel of its row.
            for (o, row) in ob.chunks_exact_mut(hw).enumerate() {
                let mut v = 0f32;
                let mut k0 = 0;
                for (g, &c) in guards[..first_map].iter().zip(&channels) {
                    let p = &slice(&g.0, g.1)?[b * c..(b + 1) * c];
                    let wr = &wv[o * k + k0..o * k + k0 + c];
                    v = wr.iter().zip(p).fold(v, |acc, (a, x)| a.mul_add(*x, acc));
                    k0 += c;
                }
                row.fill(std::mem::MaybeUninit::new(v));
            }
        }
        let mut k0 = k_constants;
        for (i, (g, &c)) in guards.iter().zip(&channels).enumerate().skip(first_map) {
            let data = &slice(&g.0, g.1)?[b * c * hw..(b + 1) * c * hw];
            let last = i + 1 == parts.len();
            let epi = last.then(|| crate::sgemm::RowEpilogue::affine(scale, shift, act));
            // SAFETY: `A` is the weight's columns `k0..k0 + c` (`cout` rows of stride `k`,
            // inside `wv`: `cout * k` values), `B` the part's `c x hw` map, `C` image `b`'s `cout
            // x hw` rows of `out`'s capacity, read only when accumulating onto values written
            // before (the constants' rows or an earlier product); the epilogue has `cout`
            // scales and shifts (`fused_f32` of this weight).
            unsafe {
                crate::sgemm::sgemm_raw_ex(
                    (cout, hw, c),
                    crate::sgemm::RawOperand::rows(wv.as_ptr().add(k0), k),
                    crate::sgemm::RawOperand::rows(data.as_ptr(), hw),
                    (ob.as_mut_ptr() as *mut f32, hw),
                    k0 > 0,
                    epi,
                    crate::cpu::threads(),
                )
            };
            k0 += c;
        }
    }
    // SAFETY: every value of every image was written above.
    unsafe { out.set_len(total) };
    drop(guards);
    Tensor::from_vec(out, (n, cout, h, wd), parts[first_map].device())
}
