//! Atrous (dilated) depthwise convolution, forward and backward, with a fast CPU kernel, and
//! the fused inference variant `act(conv(relu?(x)) + bias)`.
//!
//! candle runs `conv2d(groups = C)` as C separate tiny convolutions; this op computes runs of
//! channel planes per thread instead, writing an output that is never zero-filled first.
//!
//! - 3x3 at stride 1 (the hot path, any dilation and padding) on AVX-512 reads the input
//!   plane directly: rows outside the plane are skipped and the lanes of each 16-wide load
//!   that fall into the left / right padding are masked off, so there is no padded copy.
//!   Up to eight output rows `dy` apart are computed together, sharing each loaded input
//!   vector between the (up to three) rows whose taps read it, and the next plane is
//!   prefetched while the current one is computed.
//! - Every other case copies each plane once into a zero-padded scratch (zeroed once per
//!   thread; only the input positions are rewritten) whose columns are split by stride phase,
//!   so every tap reads a contiguous slice; AVX-512 loops with a masked last vector, or plain
//!   slice arithmetic that LLVM vectorizes (compiled for AVX2 / baseline, picked at run time).
//!
//! Weights use PyTorch's layout `[C, 1, kh, kw]` (channel multiplier 1).

use crate::batch_norm::Activation;
use crate::cpu::{f32_slice, has_kernel, threads};
use crate::geometry::{Conv2dGeometry, Padding2d};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The per-plane output transform of the forward kernels: the accumulator starts at `init`
/// and each output is stored as `act(acc * scale + shift)`. A plain convolution is
/// `(0, 1, 0)`, a bias `(b, 1, 0)` (exact: `acc * 1 + 0 == acc`), a folded BatchNorm
/// `(0, s, t)`, the very arithmetic of the separate affine pass it replaces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Epi {
    init: f32,
    scale: f32,
    shift: f32,
}

/// Where each channel's [`Epi`] comes from.
#[derive(Clone, Copy, Debug)]
enum ChannelEpi<'a> {
    /// A plain convolution.
    None,
    /// A bias per channel.
    Bias(&'a [f32]),
    /// A folded BatchNorm: scale and shift per channel.
    Affine(&'a [f32], &'a [f32]),
}

impl Epi {
    /// A folded BatchNorm's transform: `act(acc * scale + shift)` from zero.
    pub(crate) fn affine(scale: f32, shift: f32) -> Self {
        Self {
            init: 0.0,
            scale,
            shift,
        }
    }
}

impl ChannelEpi<'_> {
    #[inline(always)]
    fn at(&self, ch: usize) -> Epi {
        match *self {
            ChannelEpi::None => Epi {
                init: 0.0,
                scale: 1.0,
                shift: 0.0,
            },
            ChannelEpi::Bias(b) => Epi {
                init: b[ch],
                scale: 1.0,
                shift: 0.0,
            },
            ChannelEpi::Affine(s, t) => Epi {
                init: 0.0,
                scale: s[ch],
                shift: t[ch],
            },
        }
    }
}

/// `act(v)` for one value.
#[inline(always)]
fn activate(act: Activation, v: f32) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

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

    /// Copies one input plane into the padded phase-split scratch, clamped at 0 when `relu`.
    ///
    /// Only the positions that hold input values are written: the padding of `buf` must be zero
    /// already. Every plane of a plan writes the same positions, so a scratch zeroed once serves
    /// any number of planes.
    #[inline(always)]
    fn fill(&self, src: &[f32], buf: &mut [f32], relu: bool) {
        let rows = self.pt.min(self.hp)..(self.pt + self.h).min(self.hp);
        if self.sx == 1 {
            let end = (self.pl + self.w).min(self.wq);
            if end <= self.pl {
                return;
            }
            let n = end - self.pl;
            for r in rows {
                let row = &src[(r - self.pt) * self.w..][..n];
                let dst = &mut buf[r * self.wq + self.pl..][..n];
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::has_avx512() {
                    // SAFETY: the CPU reports AVX-512F.
                    unsafe { avx512::copy_row(row, dst, relu) };
                    continue;
                }
                if relu {
                    for (d, v) in dst.iter_mut().zip(row) {
                        *d = v.max(0.0);
                    }
                } else {
                    dst.copy_from_slice(row);
                }
            }
            return;
        }
        for r in rows {
            let row = &src[(r - self.pt) * self.w..(r - self.pt + 1) * self.w];
            #[cfg(target_arch = "x86_64")]
            if self.sx == 2 && crate::cpu::has_avx512() {
                let (qe, qo, ne, no) = self.phases2();
                let (p0, p1) = buf[r * 2 * self.wq..(r + 1) * 2 * self.wq].split_at_mut(self.wq);
                let (de, dodd) = if self.pl.is_multiple_of(2) {
                    (p0, p1)
                } else {
                    (p1, p0)
                };
                let (de, dodd) = (&mut de[qe.min(self.wq)..], &mut dodd[qo.min(self.wq)..]);
                // SAFETY: the CPU reports AVX-512F.
                unsafe { avx512::deinterleave(row, &mut de[..ne], &mut dodd[..no], relu) };
                continue;
            }
            for ph in 0..self.sx {
                let dst = &mut buf[(r * self.sx + ph) * self.wq..(r * self.sx + ph + 1) * self.wq];
                // Phase column q holds input column q * sx + ph - pl: the valid q are a range.
                let q0 = self.pl.saturating_sub(ph).div_ceil(self.sx);
                let q1 = (self.pl + self.w)
                    .saturating_sub(ph)
                    .div_ceil(self.sx)
                    .min(self.wq);
                if q1 <= q0 {
                    continue;
                }
                let first = q0 * self.sx + ph - self.pl;
                let cols = row[first..].iter().step_by(self.sx);
                for (d, &v) in dst[q0..q1].iter_mut().zip(cols) {
                    *d = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }

    /// Where a stride-2 scratch row keeps its input row (see `fill`): input column 2m sits in
    /// phase `pl % 2` at `qe + m`, column 2m + 1 in the other phase at `qo + m`, for the `ne`
    /// even and `no` odd columns that fit the scratch: `(qe, qo, ne, no)`.
    #[inline(always)]
    fn phases2(&self) -> (usize, usize, usize, usize) {
        let (qe, qo) = (self.pl / 2, self.pl.div_ceil(2));
        let ne = self.w.div_ceil(2).min(self.wq.saturating_sub(qe));
        let no = (self.w / 2).min(self.wq.saturating_sub(qo));
        (qe, qo, ne, no)
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
            if self.sx == 2 {
                // `fill`'s layout (`phases2`); columns past the scratch were never read and get
                // nothing. Pairs of columns from the two phases, a loop that vectorizes (the
                // generic one below is a strided scalar loop).
                let (qe, qo, ne, no) = self.phases2();
                let (p0, p1) = buf[r * 2 * self.wq..(r + 1) * 2 * self.wq].split_at(self.wq);
                let (se, so) = if self.pl.is_multiple_of(2) {
                    (p0, p1)
                } else {
                    (p1, p0)
                };
                // `no <= ne` (fewer odd columns, and the odd phase starts no earlier).
                let (pairs, _) = row.split_at_mut(2 * no);
                for ((pair, a), b) in pairs
                    .chunks_exact_mut(2)
                    .zip(&se[qe..qe + no])
                    .zip(&so[qo..qo + no])
                {
                    pair[0] += a;
                    pair[1] += b;
                }
                for m in no..ne {
                    row[2 * m] += se[qe + m];
                }
                continue;
            }
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

    /// Offsets of every tap relative to the first tap of output row 0 (row-major taps), and
    /// the scratch distance between consecutive output rows.
    fn taps(&self) -> (Vec<usize>, usize) {
        let rel = (0..self.kh)
            .flat_map(|ky| (0..self.kw).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| self.tap_offset(0, ky, kx))
            .collect();
        (rel, self.sy * self.sx * self.wq)
    }

    /// Forward of one plane from its filled scratch: `act(conv + bias)`, every output written.
    #[inline(always)]
    fn forward(
        &self,
        buf: &[f32],
        taps: &(Vec<usize>, usize),
        k: &[f32],
        bias: Epi,
        act: Activation,
        out: &mut [MaybeUninit<f32>],
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            let (rel, step) = (taps.0.as_slice(), taps.1);
            // SAFETY: the CPU reports AVX-512F.
            unsafe {
                if let Ok(rel9) = <&[usize; 9]>::try_from(rel) {
                    avx512::plane::<9>(buf, rel9, k, step, self.wo, bias, act, out);
                } else {
                    avx512::plane_any(buf, rel, k, step, self.wo, bias, act, out);
                }
            }
            return;
        }
        let _ = taps;
        self.forward_portable(buf, k, bias, act, out)
    }

    /// [`Plan::forward`] in plain Rust (auto-vectorized under `multiversion!`): the path of
    /// CPUs without AVX-512.
    #[inline(always)]
    fn forward_portable(
        &self,
        buf: &[f32],
        k: &[f32],
        bias: Epi,
        act: Activation,
        out: &mut [MaybeUninit<f32>],
    ) {
        let wo = self.wo;
        let mut acc = if self.kh == 3 && self.kw == 3 {
            Vec::new()
        } else {
            vec![0f32; wo]
        };
        for (oy, orow) in out.chunks_exact_mut(wo).enumerate() {
            if self.kh == 3 && self.kw == 3 {
                let s = |ky, kx| &buf[self.tap_offset(oy, ky, kx)..][..wo];
                let (a0, a1, a2) = (s(0, 0), s(0, 1), s(0, 2));
                let (a3, a4, a5) = (s(1, 0), s(1, 1), s(1, 2));
                let (a6, a7, a8) = (s(2, 0), s(2, 1), s(2, 2));
                for i in 0..wo {
                    let mut v = a0[i].mul_add(k[0], bias.init);
                    v = a1[i].mul_add(k[1], v);
                    v = a2[i].mul_add(k[2], v);
                    v = a3[i].mul_add(k[3], v);
                    v = a4[i].mul_add(k[4], v);
                    v = a5[i].mul_add(k[5], v);
                    v = a6[i].mul_add(k[6], v);
                    v = a7[i].mul_add(k[7], v);
                    orow[i].write(activate(
                        act,
                        a8[i].mul_add(k[8], v).mul_add(bias.scale, bias.shift),
                    ));
                }
            } else {
                acc.fill(bias.init);
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let a = &buf[self.tap_offset(oy, ky, kx)..][..wo];
                        let kv = k[ky * self.kw + kx];
                        for (o, x) in acc.iter_mut().zip(a) {
                            *o = x.mul_add(kv, *o);
                        }
                    }
                }
                for (o, &v) in orow.iter_mut().zip(&acc) {
                    o.write(activate(act, v.mul_add(bias.scale, bias.shift)));
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
        if (self.kh, self.kw) == (3, 3) {
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::has_avx512() {
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA.
                return unsafe { self.backward_weight_9_avx512(buf, g, dk) };
            }
        }
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

    /// [`Plan::backward_weight`] for 3x3 kernels with AVX-512 intrinsics: each gradient vector
    /// is loaded once and feeds nine independent accumulators (one per tap) instead of one
    /// latency-bound FMA chain per pass over the plane. A row's last `wo % 16` columns are one
    /// masked vector (zeros past the row), so a 21-wide plane costs two vectors per row, not
    /// one vector and five scalar FMA chains.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn backward_weight_9_avx512(&self, buf: &[f32], g: &[f32], dk: &mut [f64]) {
        use std::arch::x86_64::*;
        let wo = self.wo;
        let body = wo / 16 * 16;
        let rest: __mmask16 = (1u32 << (wo - body)).wrapping_sub(1) as __mmask16;
        let mut acc = [_mm512_setzero_ps(); 9];
        // `tap_offset` is linear in the output row: the taps' offsets at row 0, plus a step.
        let base: [usize; 9] = std::array::from_fn(|t| self.tap_offset(0, t / 3, t % 3));
        let step = self.tap_offset(1, 0, 0) - self.tap_offset(0, 0, 0);
        for (oy, grow) in g.chunks_exact(wo).enumerate() {
            let rows: [&[f32]; 9] = std::array::from_fn(|t| &buf[base[t] + oy * step..][..wo]);
            for j0 in (0..body).step_by(16) {
                // SAFETY: `j0 + 16 <= body <= wo`, the length of `grow` and of every row.
                unsafe {
                    let gv = _mm512_loadu_ps(grow.as_ptr().add(j0));
                    for (acc, row) in acc.iter_mut().zip(&rows) {
                        let a = _mm512_loadu_ps(row.as_ptr().add(j0));
                        *acc = _mm512_fmadd_ps(a, gv, *acc);
                    }
                }
            }
            if rest != 0 {
                // SAFETY: the mask's lanes are `body..wo`, inside `grow` and every row; masked
                // lanes are not read.
                unsafe {
                    let gv = _mm512_maskz_loadu_ps(rest, grow.as_ptr().add(body));
                    for (acc, row) in acc.iter_mut().zip(&rows) {
                        let a = _mm512_maskz_loadu_ps(rest, row.as_ptr().add(body));
                        *acc = _mm512_fmadd_ps(a, gv, *acc);
                    }
                }
            }
        }
        for (d, acc) in dk.iter_mut().zip(&acc) {
            let mut lanes = [0f32; 16];
            // SAFETY: a store of one vector into a 16-value array.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *acc) };
            *d += lanes.iter().map(|&v| v as f64).sum::<f64>();
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

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{Flat, Flat2};

/// A scratch-free forward kernel on one plane: `(plane, next plane's input or empty, its
/// weights, its epilogue, its output)`.
#[cfg(target_arch = "x86_64")]
type PlaneKernel<'a> = dyn Fn(usize, &[f32], &[f32], Epi, &mut [MaybeUninit<f32>]) + Sync + 'a;

/// The forward on contiguous f32 data: `act(conv(input_relu ? relu(x) : x, k) + bias[c])` for
/// `n x c` planes, split into a few contiguous runs of planes per thread, each with one scratch
/// (or none, with the AVX-512 kernels of 3x3 stride-1 and stride-2 convolutions).
fn forward_cpu(
    x: &[f32],
    k: &[f32],
    bias: ChannelEpi,
    (n, c): (usize, usize),
    p: &Plan,
    input_relu: bool,
    act: Activation,
) -> Vec<f32> {
    let (in_len, out_len, k_len) = (p.h * p.w, p.ho * p.wo, p.kh * p.kw);
    let planes = n * c;
    let len = planes * out_len;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    let per = planes.div_ceil(threads() * 4).max(1);
    // The scratch-free kernels: `kernel(plane, next plane's input or empty, its weights, its
    // epilogue, its output)` on every plane, in parallel tasks of `per` planes.
    #[cfg(target_arch = "x86_64")]
    let mut direct = |kernel: &PlaneKernel| {
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(per * out_len)
            .enumerate()
            .for_each(|(task, chunk)| {
                let count = chunk.len() / out_len;
                for (i, o) in chunk.chunks_exact_mut(out_len).enumerate() {
                    let plane = task * per + i;
                    let ch = plane % c;
                    let next = if i + 1 < count {
                        &x[(plane + 1) * in_len..][..in_len]
                    } else {
                        &[]
                    };
                    kernel(plane, next, &k[ch * k_len..][..k_len], bias.at(ch), o);
                }
            });
        // SAFETY: the kernels write every value of every plane.
        unsafe { out.set_len(len) };
    };
    #[cfg(target_arch = "x86_64")]
    let src = |plane: usize| &x[plane * in_len..][..in_len];
    #[cfg(target_arch = "x86_64")]
    if p.kh == 3 && p.kw == 3 && p.sy == 1 && p.sx == 1 && crate::cpu::has_avx512() {
        let d = avx512::Direct::new((p.h, p.w), (p.ho, p.wo), (p.pt, p.pl), (p.dy, p.dx));
        // SAFETY: the CPU reports AVX-512F.
        direct(&|plane, next, kk, b, o| unsafe {
            d.plane(src(plane), next, kk, b, input_relu, act, o)
        });
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if p.kh == 3
        && p.kw == 3
        && (p.sy, p.sx) == (2, 2)
        && (p.dy, p.dx) == (1, 1)
        && crate::cpu::has_avx512()
    {
        let d = avx512::Direct2::new((p.h, p.w), (p.ho, p.wo), (p.pt, p.pl));
        // SAFETY: the CPU reports AVX-512F.
        direct(&|plane, _, kk, b, o| unsafe { d.plane(src(plane), kk, b, input_relu, act, o) });
        return out;
    }
    let taps = p.taps();
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(per * out_len)
        .enumerate()
        .for_each(|(task, chunk)| {
            // Zeroed once: `fill` only ever writes the input positions.
            let mut buf = vec![0f32; p.scratch_len()];
            for (i, o) in chunk.chunks_exact_mut(out_len).enumerate() {
                let plane = task * per + i;
                let ch = plane % c;
                let src = &x[plane * in_len..][..in_len];
                let kk = &k[ch * k_len..][..k_len];
                let b = bias.at(ch);
                multiversion!(|| {
                    p.fill(src, &mut buf, input_relu);
                    p.forward(&buf, &taps, kk, b, act, o);
                })
            }
        });
    // SAFETY: `forward` wrote every value of every plane (each row of each plane, in full).
    unsafe { out.set_len(len) };
    out
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
        let out = forward_cpu(x, k, ChannelEpi::None, (n, c), &p, false, Activation::None);
        Ok((CpuStorage::F32(out), Shape::from((n, c, p.ho, p.wo))))
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
        crate::profile::record(
            "depthwise (bwd)",
            || crate::profile::dims(x),
            || {
                let (dx, dw) = depthwise_grads(x, w, grad, &self.geom, false)?;
                Ok((Some(dx), Some(dw)))
            },
        )
    }
}

/// The input and weight gradients of `depthwise_conv2d(input_relu ? relu(x) : x, w)` for the
/// output gradient `grad`, on the CPU kernels: with `input_relu` the weight gradient reads
/// `relu(x)` (clamped as the kernel copies its input) and the input gradient is masked by
/// `x > 0` in one pass, so no `relu(x)` tensor is kept or rebuilt.
fn depthwise_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    g: &Conv2dGeometry,
    input_relu: bool,
) -> Result<(Tensor, Tensor)> {
    let grad = grad.contiguous()?;
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
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
            input_relu,
        },
    )?;
    let dx = if input_relu {
        crate::batch_norm::activation_grad(Activation::Relu, &dx, x)?
    } else {
        dx
    };
    Ok((dx, dw))
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
        let per = (n * c).div_ceil(threads() * 4).max(1);
        out.par_chunks_mut(per * h * w)
            .enumerate()
            .for_each(|(task, chunk)| {
                let mut buf = vec![0f32; p.scratch_len()];
                for (i, dx) in chunk.chunks_exact_mut(h * w).enumerate() {
                    let plane = task * per + i;
                    let ch = plane % c;
                    let gp = &g[plane * ho * wo..(plane + 1) * ho * wo];
                    let kk = &k[ch * kh * kw..(ch + 1) * kh * kw];
                    multiversion!(|| {
                        p.backward_input(gp, kk, &mut buf);
                        p.unfill(&buf, dx);
                    })
                }
            });
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
    /// The forward read `relu(x)`: the input is clamped at zero as it is copied in.
    input_relu: bool,
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
        let per = c.div_ceil(threads() * 4).max(1);
        out.par_chunks_mut(per * kk)
            .enumerate()
            .for_each(|(task, chunk)| {
                // Zeroed once: `fill` only ever writes the input positions.
                let mut buf = vec![0f32; p.scratch_len()];
                for (i, dk) in chunk.chunks_exact_mut(kk).enumerate() {
                    let ch = task * per + i;
                    let mut acc = vec![0f64; kk];
                    for b in 0..n {
                        let plane = b * c + ch;
                        let src = &x[plane * h * w..(plane + 1) * h * w];
                        let gp = &g[plane * ho * wo..(plane + 1) * ho * wo];
                        multiversion!(|| {
                            p.fill(src, &mut buf, self.input_relu);
                            p.backward_weight(&buf, gp, &mut acc);
                        })
                    }
                    for (d, a) in dk.iter_mut().zip(&acc) {
                        *d = *a as f32;
                    }
                }
            });
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
        if self.input_relu {
            bail!("depthwise_conv2d backward: the input-ReLU weight gradient is CPU-only")
        }
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

/// Inference forward `act(conv(input_relu ? relu(x) : x, w) + bias[c])` in one pass, on
/// `(x, weight, bias)`.
pub(crate) struct DwFused {
    pub geom: Conv2dGeometry,
    pub input_relu: bool,
    pub act: Activation,
}

impl CustomOp3 for DwFused {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-fused"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w, kh, kw) = check_shapes(xl, wl)?;
        let x = f32_slice(self.name(), xs, xl)?;
        let k = f32_slice(self.name(), ws, wl)?;
        let b = f32_slice(self.name(), bs, bl)?;
        if b.len() != c {
            bail!(
                "depthwise_conv2d_fused: bias {:?} does not fit {c} channels",
                bl.dims()
            )
        }
        let p = Plan::new((h, w), (kh, kw), &self.geom)?;
        let out = forward_cpu(
            x,
            k,
            ChannelEpi::Bias(b),
            (n, c),
            &p,
            self.input_relu,
            self.act,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, p.ho, p.wo))))
    }

    /// The chain rule through the activation, the convolution and the input ReLU, on
    /// [`depthwise_conv2d`]'s backward kernels.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::record(
            "depthwise (bwd)",
            || crate::profile::dims(x),
            || {
                // The op only runs on f32 CPU tensors (`depthwise_conv2d_fused` converts other dtypes
                // and composes candle ops on other devices). One pass each: the activation's mask, the
                // two depthwise gradients (the input ReLU applied inside them), and the bias sum when
                // the bias is trained.
                let g = crate::batch_norm::activation_grad(self.act, grad, res)?;
                let (dx, dw) = depthwise_grads(x, w, &g, &self.geom, self.input_relu)?;
                let db = if bias.track_op() {
                    Some(g.sum((0, 2, 3))?)
                } else {
                    None
                };
                Ok((Some(dx), Some(dw), db))
            },
        )
    }
}

/// `act(depthwise_conv2d(input_relu ? relu(x) : x, w) + bias[c])` in one pass over the data:
/// the input ReLU is applied while the kernel reads its input, the per-channel bias and the
/// activation when it stores its output. This is the inference path of a depthwise
/// convolution followed by a folded BatchNorm (`w` and `bias` carrying the BN scale and shift)
/// and an optional activation, with the ReLU that Xception's entry and middle flows put before
/// each separable convolution.
///
/// `bias`, when present, has shape `[C]`. Gradients flow to `x`, `w` and `bias` (computed on
/// [`depthwise_conv2d`]'s backward kernels), though the op is meant for inference. Non-CPU
/// devices run the unfused composition (on the GPU depthwise kernel where there is one).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use deeplab_ops::{depthwise_conv2d_fused, Activation, Conv2dGeometry};
/// let x = Tensor::new(&[[[[-1f32, 2.], [3., -4.]]]], &Device::Cpu)?;
/// let w = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[-2.5f32], &Device::Cpu)?;
/// let g = Conv2dGeometry::default();
/// let y = depthwise_conv2d_fused(&x, &w, Some(&b), true, Activation::Relu, &g)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0., 0., 0.5, 0.]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn depthwise_conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    input_relu: bool,
    act: Activation,
    geom: &Conv2dGeometry,
) -> Result<Tensor> {
    check_shapes(x.layout(), w.layout())?;
    let (_, c, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    geom.output_size((h, wd), (kh, kw))?;
    if let Some(b) = bias {
        if b.dims() != [c] {
            bail!(
                "depthwise_conv2d_fused: bias {:?} does not fit input {:?} (expected [{c}])",
                b.dims(),
                x.dims()
            )
        }
    }
    if !x.device().is_cpu() {
        let xr = if input_relu { x.relu()? } else { x.clone() };
        let y = depthwise_conv2d(&xr, w, geom)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, c, 1, 1))?)?,
            None => y,
        };
        return act.apply(&y);
    }
    let op = DwFused {
        geom: *geom,
        input_relu,
        act,
    };
    let f32c = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let b = match bias {
        Some(b) => f32c(b)?,
        None => Tensor::zeros(c, DType::F32, x.device())?,
    };
    match x.dtype() {
        DType::F32 => x.contiguous()?.apply_op3(&f32c(w)?, &b, op),
        DType::F16 | DType::BF16 | DType::F64 => {
            f32c(x)?.apply_op3(&f32c(w)?, &b, op)?.to_dtype(x.dtype())
        }
        dt => bail!("depthwise_conv2d_fused: unsupported dtype {dt:?}"),
    }
}

/// Inference forward with a folded BatchNorm: `act(conv(relu?(x), w) * scale[c] + shift[c])`
/// in one pass (forward only).
struct DwEpilogue {
    geom: Conv2dGeometry,
    input_relu: bool,
    act: Activation,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl CustomOp2 for DwEpilogue {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-epilogue"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w, kh, kw) = check_shapes(xl, wl)?;
        if self.scale.len() != c || self.shift.len() != c {
            bail!(
                "depthwise_conv2d: epilogue of {} / {} channels does not fit input {:?}",
                self.scale.len(),
                self.shift.len(),
                xl.dims()
            )
        }
        let x = f32_slice(self.name(), xs, xl)?;
        let k = f32_slice(self.name(), ws, wl)?;
        let p = Plan::new((h, w), (kh, kw), &self.geom)?;
        let out = forward_cpu(
            x,
            k,
            ChannelEpi::Affine(&self.scale, &self.shift),
            (n, c),
            &p,
            self.input_relu,
            self.act,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, p.ho, p.wo))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        bail!("depthwise conv with a folded BatchNorm is inference-only (fold after training)")
    }
}

/// `act(depthwise_conv2d(relu?(x), w) * scale[c] + shift[c])` on an f32 CPU tensor in one
/// pass: a depthwise conv with its BatchNorm folded in (inference only). Bit-identical to the
/// unfused `depthwise_conv2d` followed by [`crate::channel_affine`].
pub(crate) fn depthwise_epilogue(
    x: &Tensor,
    w: &Tensor,
    (scale, shift): (&[f32], &[f32]),
    input_relu: bool,
    act: Activation,
    geom: &Conv2dGeometry,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &w.contiguous()?,
        &DwEpilogue {
            geom: *geom,
            input_relu,
            act,
            scale: scale.to_vec(),
            shift: shift.to_vec(),
        },
    )
}

/// Explicit AVX-512 loops for the forward: 16 output columns per vector, the row's last
/// partial vector under a mask (no scalar tail), bias and activation applied at the store.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, Epi};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// The first `n` (0..=16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// `dst = relu ? max(src, 0) : src`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy_row(src: &[f32], dst: &mut [f32], relu: bool) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let zero = _mm512_setzero_ps();
        let mut i = 0;
        // SAFETY: every access is within the first `n` values of both slices (the tail masked).
        unsafe {
            while i + 16 <= n {
                let mut v = _mm512_loadu_ps(s.add(i));
                if relu {
                    v = _mm512_max_ps(v, zero);
                }
                _mm512_storeu_ps(d.add(i), v);
                i += 16;
            }
            if i < n {
                let m = lanes(n - i);
                let mut v = _mm512_maskz_loadu_ps(m, s.add(i));
                if relu {
                    v = _mm512_max_ps(v, zero);
                }
                _mm512_mask_storeu_ps(d.add(i), m, v);
            }
        }
    }

    /// `even[m] = src[2m]`, `odd[m] = src[2m + 1]` (clamped at 0 when `relu`) for the `m`
    /// each destination holds; `src` must cover them.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave(src: &[f32], even: &mut [f32], odd: &mut [f32], relu: bool) {
        assert!(
            even.len() <= src.len().div_ceil(2) && odd.len() <= src.len() / 2,
            "deinterleave: {} values cannot fill {} + {}",
            src.len(),
            even.len(),
            odd.len()
        );
        let (ie, io) = {
            let (mut e, mut o) = ([0i32; 16], [0i32; 16]);
            for l in 0..16 {
                e[l] = 2 * l as i32;
                o[l] = 2 * l as i32 + 1;
            }
            // SAFETY: 16 i32 are 64 bytes.
            unsafe {
                (
                    _mm512_loadu_si512(e.as_ptr() as *const _),
                    _mm512_loadu_si512(o.as_ptr() as *const _),
                )
            }
        };
        let zero = _mm512_setzero_ps();
        let n = even.len().max(odd.len());
        let mut m = 0;
        while m < n {
            let left = src.len() - 2 * m;
            let p = src.as_ptr().wrapping_add(2 * m);
            // SAFETY: the masks keep every load inside `src` and every store inside its
            // destination (whose lengths the assert bounds).
            unsafe {
                let lo = _mm512_maskz_loadu_ps(lanes(left.min(16)), p);
                let hi = _mm512_maskz_loadu_ps(
                    lanes(left.saturating_sub(16).min(16)),
                    p.wrapping_add(16),
                );
                let (mut e, mut o) = (
                    _mm512_permutex2var_ps(lo, ie, hi),
                    _mm512_permutex2var_ps(lo, io, hi),
                );
                if relu {
                    e = _mm512_max_ps(e, zero);
                    o = _mm512_max_ps(o, zero);
                }
                let me = lanes(even.len().saturating_sub(m).min(16));
                let mo = lanes(odd.len().saturating_sub(m).min(16));
                _mm512_mask_storeu_ps(even.as_mut_ptr().wrapping_add(m), me, e);
                _mm512_mask_storeu_ps(odd.as_mut_ptr().wrapping_add(m), mo, o);
            }
            m += 16;
        }
    }

    /// Checks that every tap of every output row reads inside `buf`, so the loops below can use
    /// unchecked vector loads.
    fn check(buf: &[f32], rel: &[usize], k: &[f32], step: usize, wo: usize, out_len: usize) {
        let ho = out_len.checked_div(wo).unwrap_or(0);
        let last = rel.iter().max().copied().unwrap_or(0);
        assert!(
            wo > 0
                && out_len == ho * wo
                && k.len() == rel.len()
                && (ho == 0 || (ho - 1) * step + last + wo <= buf.len()),
            "depthwise kernel: scratch of {} too small for {ho}x{wo} outputs",
            buf.len()
        );
    }

    /// Applies `act` to a vector (`A`: 0 none, 1 ReLU, 2 ReLU6).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn activate<const A: u8>(v: __m512) -> __m512 {
        match A {
            0 => v,
            1 => _mm512_max_ps(v, _mm512_setzero_ps()),
            // NaN stays NaN (second operands), as `f32::clamp` keeps it.
            _ => _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(_mm512_setzero_ps(), v)),
        }
    }

    /// `$recv.$method::<A, IR>(args)` with the const parameters of the runtime `act` (0: none,
    /// 1: ReLU, 2: ReLU6) and input ReLU flag `relu`.
    macro_rules! with_flags {
        ($relu:expr, $act:expr, $recv:ident . $method:ident ($($arg:expr),*)) => {
            match ($relu, $act) {
                (false, Activation::None) => $recv.$method::<0, false>($($arg),*),
                (false, Activation::Relu) => $recv.$method::<1, false>($($arg),*),
                (false, Activation::Relu6) => $recv.$method::<2, false>($($arg),*),
                (true, Activation::None) => $recv.$method::<0, true>($($arg),*),
                (true, Activation::Relu) => $recv.$method::<1, true>($($arg),*),
                (true, Activation::Relu6) => $recv.$method::<2, true>($($arg),*),
            }
        };
    }

    /// The mask of the lanes `l < 16` for which `f(l)` holds.
    fn lane_mask(f: impl Fn(usize) -> bool) -> __mmask16 {
        (0..16).fold(0, |m, l| if f(l) { m | 1 << l } else { m })
    }

    /// A 3x3 kernel at stride 1 straight from the input plane, no scratch: the padding is
    /// handled by skipping input rows outside the plane and by masking the lanes of each load
    /// that fall left or right of it. Output rows are register-blocked: the [`ROWS`] rows `oy`,
    /// `oy + dy`, ... read `ROWS + 2` input rows between them, so each loaded vector feeds up
    /// to three accumulators (30 loads per 72 FMAs per 16 columns instead of 72 loads).
    pub(super) struct Direct {
        h: usize,
        w: usize,
        ho: usize,
        wo: usize,
        pt: usize,
        pl: usize,
        dy: usize,
        dx: usize,
        /// Per 16-column output chunk: the lanes tap column `kx` may load (inside the input
        /// row and left of `wo`).
        load: Vec<[__mmask16; 3]>,
        /// Per chunk: the lanes left of `wo`.
        store: Vec<__mmask16>,
    }

    impl Direct {
        /// The plan of a 3x3 stride-1 convolution of an `h x w` plane giving `ho x wo`, with
        /// top / left padding `pt` / `pl` and dilation `(dy, dx)`.
        #[allow(clippy::too_many_arguments)]
        pub(super) fn new(
            (h, w): (usize, usize),
            (ho, wo): (usize, usize),
            (pt, pl): (usize, usize),
            (dy, dx): (usize, usize),
        ) -> Self {
            let chunks = wo.div_ceil(16);
            let lane_ok = |col: usize, kx: usize| {
                col < wo && (col + kx * dx).checked_sub(pl).is_some_and(|ix| ix < w)
            };
            let load = (0..chunks)
                .map(|c| {
                    let m = |kx| lane_mask(|l| lane_ok(16 * c + l, kx));
                    [m(0), m(1), m(2)]
                })
                .collect();
            let store = (0..chunks).map(|c| lanes((wo - 16 * c).min(16))).collect();
            Self {
                h,
                w,
                ho,
                wo,
                pt,
                pl,
                dy,
                dx,
                load,
                store,
            }
        }

        /// `out = act(conv(relu ? max(src, 0) : src, k) + bias)` for one plane, prefetching
        /// `next` (the next plane's input, if any) into L1 along the way.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn plane(
            &self,
            src: &[f32],
            next: &[f32],
            k: &[f32],
            bias: Epi,
            relu: bool,
            act: Activation,
            out: &mut [MaybeUninit<f32>],
        ) {
            assert!(
                src.len() == self.h * self.w && out.len() == self.ho * self.wo && k.len() == 9,
                "depthwise kernel: plane sizes do not match the plan"
            );
            let mut kv = [_mm512_setzero_ps(); 9];
            for (v, &w) in kv.iter_mut().zip(k) {
                *v = _mm512_set1_ps(w);
            }
            let (sp, op) = (src.as_ptr(), out.as_mut_ptr() as *mut f32);
            // About as many cache lines of the next plane per block as there are blocks.
            let per_block = next
                .len()
                .div_ceil(16)
                .div_ceil(self.ho.div_ceil(ROWS).max(1));
            let mut pf = Prefetch {
                lines: next.chunks(16),
                per_block,
            };
            let pf = &mut pf;
            // SAFETY: loads read only input rows inside the plane and, through the masks,
            // only its columns; stores are masked to the `wo` columns of rows below `ho`.
            unsafe { with_flags!(relu, act, self.blocks(sp, op, &kv, bias, pf)) }
        }

        /// Every output row once, in blocks of up to three rows `dy` apart.
        ///
        /// # Safety
        /// As [`Direct::plane`], after its checks.
        #[target_feature(enable = "avx512f")]
        unsafe fn blocks<const A: u8, const IR: bool>(
            &self,
            sp: *const f32,
            op: *mut f32,
            kv: &[__m512; 9],
            bias: Epi,
            pf: &mut Prefetch,
        ) {
            let (dy, ho) = (self.dy, self.ho);
            // SAFETY: every block's rows are below `ho`.
            unsafe {
                for first in 0..dy.min(ho) {
                    let mut oy = first;
                    while oy + (ROWS - 1) * dy < ho {
                        self.block::<ROWS, A, IR>(sp, op, kv, bias, oy);
                        pf.some();
                        oy += ROWS * dy;
                    }
                    // The class's last rows.
                    match ho.saturating_sub(oy).div_ceil(dy) {
                        0 => {}
                        1 => self.block::<1, A, IR>(sp, op, kv, bias, oy),
                        2 => self.block::<2, A, IR>(sp, op, kv, bias, oy),
                        3 => self.block::<3, A, IR>(sp, op, kv, bias, oy),
                        4 => self.block::<4, A, IR>(sp, op, kv, bias, oy),
                        5 => self.block::<5, A, IR>(sp, op, kv, bias, oy),
                        6 => self.block::<6, A, IR>(sp, op, kv, bias, oy),
                        _ => self.block::<7, A, IR>(sp, op, kv, bias, oy),
                    }
                }
            }
        }

        /// Output rows `oy + i dy`, `i < R`, all columns, two 16-column chunks at a time.
        ///
        /// # Safety
        /// As [`Direct::plane`]; `oy + (R - 1) dy < ho`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn block<const R: usize, const A: u8, const IR: bool>(
            &self,
            sp: *const f32,
            op: *mut f32,
            kv: &[__m512; 9],
            bias: Epi,
            oy: usize,
        ) {
            let chunks = self.store.len();
            let mut c = 0;
            // SAFETY: forwarded; chunk indices stay below `chunks`.
            unsafe {
                while c + 1 < chunks {
                    self.cols::<R, 2, A, IR>(sp, op, kv, bias, oy, c);
                    c += 2;
                }
                if c < chunks {
                    self.cols::<R, 1, A, IR>(sp, op, kv, bias, oy, c);
                }
            }
        }

        /// `V` 16-column chunks from chunk `c` of `R` output rows.
        ///
        /// # Safety
        /// As [`Direct::block`]; `c + V <= chunks`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn cols<const R: usize, const V: usize, const A: u8, const IR: bool>(
            &self,
            sp: *const f32,
            op: *mut f32,
            kv: &[__m512; 9],
            bias: Epi,
            oy: usize,
            c: usize,
        ) {
            let load: [[__mmask16; 3]; V] = std::array::from_fn(|v| self.load[c + v]);
            let x = 16 * c;
            let zero = _mm512_setzero_ps();
            let mut acc = [[_mm512_set1_ps(bias.init); V]; R];
            let (sv, tv) = (_mm512_set1_ps(bias.scale), _mm512_set1_ps(bias.shift));
            for j in 0..R + 2 {
                // Input row of tap row `j - i` of output row `oy + i dy`; rows outside the
                // plane are zero padding and contribute nothing.
                let Some(iy) = (oy + j * self.dy)
                    .checked_sub(self.pt)
                    .filter(|&iy| iy < self.h)
                else {
                    continue;
                };
                // SAFETY: `iy < h`, so the row is inside `src`.
                let row = unsafe { sp.add(iy * self.w) };
                for kx in 0..3 {
                    let off = (x + kx * self.dx) as isize - self.pl as isize;
                    for v in 0..V {
                        // The pointer may lie outside the row, but only the mask's lanes,
                        // which are inside it, are read.
                        let p = row.wrapping_offset(off + 16 * v as isize);
                        // SAFETY: masked lanes are inside the row (see `Direct::new`).
                        let mut val = unsafe { _mm512_maskz_loadu_ps(load[v][kx], p) };
                        if IR {
                            val = _mm512_max_ps(val, zero);
                        }
                        for (i, a) in acc.iter_mut().enumerate() {
                            if j >= i && j - i < 3 {
                                a[v] = _mm512_fmadd_ps(val, kv[(j - i) * 3 + kx], a[v]);
                            }
                        }
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                // SAFETY: row `oy + i dy < ho`; the store masks stop at `wo`.
                unsafe {
                    let o = op.add((oy + i * self.dy) * self.wo + x);
                    for (v, &a) in a.iter().enumerate() {
                        _mm512_mask_storeu_ps(
                            o.add(16 * v),
                            self.store[c + v],
                            activate::<A>(_mm512_fmadd_ps(a, sv, tv)),
                        );
                    }
                }
            }
        }
    }

    /// Output rows per register block of [`Direct`] (at most 8: the remainder blocks above
    /// cover up to 7 rows).
    const ROWS: usize = 8;
    const _: () = assert!(ROWS >= 1 && ROWS <= 8);

    /// Output rows per register block of [`Direct2`]: `2 * ROWS2 + 1` input rows feed them.
    const ROWS2: usize = 4;

    /// A 3x3 kernel at stride 2 (dilation 1) straight from the input plane, no scratch: each
    /// 16-column output chunk loads the 33 input columns it reads as three vectors and splits
    /// them into the three taps' even / odd / next-even lanes in registers (two permutes and a
    /// lane shift), instead of first copying the plane into a phase-split scratch. Padding as in
    /// [`Direct`]: input rows outside the plane are skipped, load lanes outside it masked. The
    /// taps are summed in the same order as the scratch kernels (row-major), so the outputs are
    /// the same bits.
    pub(super) struct Direct2 {
        h: usize,
        w: usize,
        ho: usize,
        wo: usize,
        pt: usize,
        pl: usize,
        /// Per 16-column output chunk: the lanes of its three input vectors (columns
        /// `32 c - pl + 16 t + lane`) inside the input row.
        load: Vec<[__mmask16; 3]>,
        /// Per chunk: the lanes left of `wo`.
        store: Vec<__mmask16>,
    }

    impl Direct2 {
        /// The plan of a 3x3 stride-2 convolution of an `h x w` plane giving `ho x wo`, with
        /// top / left padding `pt` / `pl`.
        pub(super) fn new(
            (h, w): (usize, usize),
            (ho, wo): (usize, usize),
            (pt, pl): (usize, usize),
        ) -> Self {
            let chunks = wo.div_ceil(16);
            let load = (0..chunks)
                .map(|c| {
                    let m = |t: usize| {
                        lane_mask(|l| (32 * c + 16 * t + l).checked_sub(pl).is_some_and(|x| x < w))
                    };
                    [m(0), m(1), m(2)]
                })
                .collect();
            let store = (0..chunks).map(|c| lanes((wo - 16 * c).min(16))).collect();
            Self {
                h,
                w,
                ho,
                wo,
                pt,
                pl,
                load,
                store,
            }
        }

        /// `out = act(conv(relu ? max(src, 0) : src, k) + bias)` for one plane.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn plane(
            &self,
            src: &[f32],
            k: &[f32],
            bias: Epi,
            relu: bool,
            act: Activation,
            out: &mut [MaybeUninit<f32>],
        ) {
            assert!(
                src.len() == self.h * self.w && out.len() == self.ho * self.wo && k.len() == 9,
                "depthwise stride-2 kernel: plane sizes do not match the plan"
            );
            let kv: [__m512; 9] = std::array::from_fn(|i| _mm512_set1_ps(k[i]));
            let (sp, op) = (src.as_ptr(), out.as_mut_ptr() as *mut f32);
            // SAFETY: loads read only rows inside the plane and, through the masks, only its
            // columns; stores are masked to the `wo` columns of rows below `ho`.
            unsafe { with_flags!(relu, act, self.rows(sp, op, &kv, bias)) }
        }

        /// Every output row once, in blocks of up to [`ROWS2`] consecutive rows.
        ///
        /// # Safety
        /// As [`Direct2::plane`], after its checks.
        #[target_feature(enable = "avx512f")]
        unsafe fn rows<const A: u8, const IR: bool>(
            &self,
            sp: *const f32,
            op: *mut f32,
            kv: &[__m512; 9],
            bias: Epi,
        ) {
            let mut oy = 0;
            // SAFETY: every block's rows are below `ho`.
            unsafe {
                while oy + ROWS2 <= self.ho {
                    self.block::<ROWS2, A, IR>(sp, op, kv, bias, oy);
                    oy += ROWS2;
                }
                match self.ho - oy {
                    0 => {}
                    1 => self.block::<1, A, IR>(sp, op, kv, bias, oy),
                    2 => self.block::<2, A, IR>(sp, op, kv, bias, oy),
                    _ => self.block::<3, A, IR>(sp, op, kv, bias, oy),
                }
            }
        }

        /// Output rows `oy..oy + R`, all columns.
        ///
        /// # Safety
        /// As [`Direct2::plane`]; `oy + R <= ho`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn block<const R: usize, const A: u8, const IR: bool>(
            &self,
            sp: *const f32,
            op: *mut f32,
            kv: &[__m512; 9],
            bias: Epi,
            oy: usize,
        ) {
            // Lane `i` of the pair (a, b) at 2i (even) and 2i + 1 (odd).
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let zero = _mm512_setzero_ps();
            let (sv, tv) = (_mm512_set1_ps(bias.scale), _mm512_set1_ps(bias.shift));
            for (c, (load, &store)) in self.load.iter().zip(&self.store).enumerate() {
                let mut acc = [_mm512_set1_ps(bias.init); R];
                for j in 0..2 * R + 1 {
                    // Input row of tap row `j - 2i` of output row `oy + i`; rows outside the
                    // plane are zero padding and contribute nothing.
                    let Some(iy) = (2 * oy + j).checked_sub(self.pt).filter(|&iy| iy < self.h)
                    else {
                        continue;
                    };
                    // SAFETY: `iy < h`, so the row is inside the plane.
                    let row = unsafe { sp.add(iy * self.w) };
                    let base = (32 * c) as isize - self.pl as isize;
                    let v: [__m512; 3] = std::array::from_fn(|t| {
                        // The pointer may lie outside the row, but only the mask's lanes,
                        // which are inside it, are read.
                        let p = row.wrapping_offset(base + 16 * t as isize);
                        // SAFETY: masked lanes are inside the row (see `Direct2::new`).
                        let x = unsafe { _mm512_maskz_loadu_ps(load[t], p) };
                        if IR {
                            _mm512_max_ps(x, zero)
                        } else {
                            x
                        }
                    });
                    // Taps kx = 0, 1, 2 of output column 16c + i read input columns
                    // 32c - pl + 2i + kx.
                    let e0 = _mm512_permutex2var_ps(v[0], even, v[1]);
                    let o0 = _mm512_permutex2var_ps(v[0], odd, v[1]);
                    let e1 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                        _mm512_castps_si512(v[2]),
                        _mm512_castps_si512(e0),
                    ));
                    let taps = [e0, o0, e1];
                    for (i, a) in acc.iter_mut().enumerate() {
                        if j >= 2 * i && j - 2 * i < 3 {
                            let ky = j - 2 * i;
                            for (kx, &t) in taps.iter().enumerate() {
                                *a = _mm512_fmadd_ps(t, kv[ky * 3 + kx], *a);
                            }
                        }
                    }
                }
                for (i, &a) in acc.iter().enumerate() {
                    // SAFETY: row `oy + i < ho`; the store mask stops at `wo`.
                    unsafe {
                        _mm512_mask_storeu_ps(
                            op.add((oy + i) * self.wo + 16 * c),
                            store,
                            activate::<A>(_mm512_fmadd_ps(a, sv, tv)),
                        )
                    };
                }
            }
        }
    }

    /// The cache lines of the next plane still to prefetch.
    struct Prefetch<'a> {
        lines: std::slice::Chunks<'a, f32>,
        per_block: usize,
    }

    impl Prefetch<'_> {
        /// Prefetches the next `per_block` lines into L1.
        #[inline(always)]
        fn some(&mut self) {
            for line in self.lines.by_ref().take(self.per_block) {
                // SAFETY: a prefetch is a hint; the address is inside a live slice.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
            }
        }
    }

    /// One plane from the padded scratch with a fixed number of taps `T` (weights kept in
    /// registers): output row `oy` tap `t` reads `wo` contiguous values at `oy * step + rel[t]`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane<const T: usize>(
        buf: &[f32],
        rel: &[usize; T],
        k: &[f32],
        step: usize,
        wo: usize,
        bias: Epi,
        act: Activation,
        out: &mut [MaybeUninit<f32>],
    ) {
        check(buf, rel, k, step, wo, out.len());
        let mut kv = [_mm512_setzero_ps(); T];
        for (v, &w) in kv.iter_mut().zip(k) {
            *v = _mm512_set1_ps(w);
        }
        // SAFETY: bounds checked by `check`; same CPU features.
        unsafe {
            match act {
                Activation::None => rows::<T, 0>(buf, rel, &kv, step, wo, bias, out),
                Activation::Relu => rows::<T, 1>(buf, rel, &kv, step, wo, bias, out),
                Activation::Relu6 => rows::<T, 2>(buf, rel, &kv, step, wo, bias, out),
            }
        }
    }

    /// The loops of [`plane`].
    ///
    /// # Safety
    /// AVX-512F, and the bounds [`check`] asserts.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const T: usize, const A: u8>(
        buf: &[f32],
        rel: &[usize; T],
        kv: &[__m512; T],
        step: usize,
        wo: usize,
        bias: Epi,
        out: &mut [MaybeUninit<f32>],
    ) {
        let ho = out.len() / wo;
        let (bp, op) = (buf.as_ptr(), out.as_mut_ptr() as *mut f32);
        let bv = _mm512_set1_ps(bias.init);
        let (sv, tv) = (_mm512_set1_ps(bias.scale), _mm512_set1_ps(bias.shift));
        let tail = lanes(wo % 16);
        for oy in 0..ho {
            // SAFETY: every load reads within `buf` (row `oy`, tap offsets, `wo` columns) and
            // every store writes within row `oy` of `out`; the last partial vector is masked.
            unsafe {
                let base = bp.add(oy * step);
                let o = op.add(oy * wo);
                let mut x = 0;
                while x + 32 <= wo {
                    let (mut a0, mut a1) = (bv, bv);
                    for t in 0..T {
                        let p = base.add(rel[t] + x);
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p), kv[t], a0);
                        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(16)), kv[t], a1);
                    }
                    _mm512_storeu_ps(o.add(x), activate::<A>(_mm512_fmadd_ps(a0, sv, tv)));
                    _mm512_storeu_ps(o.add(x + 16), activate::<A>(_mm512_fmadd_ps(a1, sv, tv)));
                    x += 32;
                }
                if x + 16 <= wo {
                    let mut a0 = bv;
                    for t in 0..T {
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(base.add(rel[t] + x)), kv[t], a0);
                    }
                    _mm512_storeu_ps(o.add(x), activate::<A>(_mm512_fmadd_ps(a0, sv, tv)));
                    x += 16;
                }
                if x < wo {
                    let mut a0 = bv;
                    for t in 0..T {
                        let v = _mm512_maskz_loadu_ps(tail, base.add(rel[t] + x));
                        a0 = _mm512_fmadd_ps(v, kv[t], a0);
                    }
                    _mm512_mask_storeu_ps(
                        o.add(x),
                        tail,
                        activate::<A>(_mm512_fmadd_ps(a0, sv, tv)),
                    );
                }
            }
        }
    }

    /// [`plane`] for any number of taps (weights broadcast from memory).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane_any(
        buf: &[f32],
        rel: &[usize],
        k: &[f32],
        step: usize,
        wo: usize,
        bias: Epi,
        act: Activation,
        out: &mut [MaybeUninit<f32>],
    ) {
        check(buf, rel, k, step, wo, out.len());
        let ho = out.len() / wo;
        let (bp, op) = (buf.as_ptr(), out.as_mut_ptr() as *mut f32);
        let bv = _mm512_set1_ps(bias.init);
        let (sv, tv) = (_mm512_set1_ps(bias.scale), _mm512_set1_ps(bias.shift));
        let tail = lanes(wo % 16);
        let apply = |v| {
            let v = _mm512_fmadd_ps(v, sv, tv);
            match act {
                Activation::None => activate::<0>(v),
                Activation::Relu => activate::<1>(v),
                Activation::Relu6 => activate::<2>(v),
            }
        };
        for oy in 0..ho {
            // SAFETY: as in `rows`.
            unsafe {
                let base = bp.add(oy * step);
                let o = op.add(oy * wo);
                let mut x = 0;
                while x < wo {
                    let m = if x + 16 <= wo { 0xffff } else { tail };
                    let mut a = bv;
                    for (&r, &w) in rel.iter().zip(k) {
                        let v = _mm512_maskz_loadu_ps(m, base.add(r + x));
                        a = _mm512_fmadd_ps(v, _mm512_set1_ps(w), a);
                    }
                    _mm512_mask_storeu_ps(o.add(x), m, apply(a));
                    x += 16;
                }
            }
        }
    }

    /// The contract of the depthwise packers' `pack` ([`Flat::pack`], [`Flat2::pack`]), checked:
    /// `kc` channel planes of `plane_in` values from `c0` in `x`, their 9 weights in `k`,
    /// pixels `j0..j0 + cols` of the `plane_out` output pixels (`j0` a multiple of 16), and
    /// `buf` holding their `kc` rows of 48-value panels.
    fn check_pack(
        (plane_in, plane_out): (usize, usize),
        x: &[f32],
        k: &[f32],
        (c0, kc): (usize, usize),
        (j0, cols): (usize, usize),
        buf: &[f32],
    ) {
        assert!(
            j0 % 16 == 0
                && j0 + cols <= plane_out
                && x.len() >= (c0 + kc) * plane_in
                && k.len() >= (c0 + kc) * 9
                && buf.len() >= kc * cols.div_ceil(48) * 48,
            "depthwise packer: pixels {j0}+{cols} of {kc} channels from {c0} do not fit"
        );
    }

    /// Prefetches a span of the next channel's plane into L1 a few lines per step of the
    /// current channel: each channel reads its own plane, a separate stream of a few KB the
    /// hardware prefetchers start late, and a burst of ~120 prefetches at once stalled the
    /// loads.
    struct SpreadPrefetch {
        lo: usize,
        hi: usize,
        per_step: usize,
        next: Option<*const f32>,
        line: usize,
    }

    impl SpreadPrefetch {
        /// Values `lo..hi` of the plane, over `steps` steps.
        fn new((lo, hi): (usize, usize), steps: usize) -> Self {
            Self {
                lo,
                hi,
                per_step: hi.saturating_sub(lo).div_ceil(16).div_ceil(steps.max(1)),
                next: None,
                line: 0,
            }
        }

        /// Starts a channel; `next` is the next channel's plane, if any.
        fn channel(&mut self, next: Option<*const f32>) {
            self.next = next.map(|p| p.wrapping_add(self.lo));
            self.line = 0;
        }

        /// The next few lines.
        #[inline(always)]
        fn step(&mut self) {
            let Some(next) = self.next else { return };
            for _ in 0..self.per_step {
                if self.lo + 16 * self.line < self.hi {
                    let at = next.wrapping_add(16 * self.line) as *const i8;
                    // SAFETY: a prefetch is a hint: it never faults nor changes memory.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
                }
                self.line += 1;
            }
        }
    }

    /// A 3x3 stride-1 depthwise convolution whose output keeps the input's size, evaluated
    /// on runs of 16 consecutive pixels of the flattened plane: the form in which a following
    /// pointwise product consumes it (`crate::separable` writes the depthwise outputs straight
    /// into the product's packed panels, so they never go to memory). Tap `t = 3 ky + kx` of
    /// output pixel `f` reads input pixel `f + off[t]`; per 16-pixel vector a mask keeps the
    /// lanes whose tap lies inside the plane (and whose pixel does). The taps are summed in the
    /// same order, from the same initial value, through the same epilogue as [`Direct`], so the
    /// outputs are the same bits.
    pub(crate) struct Flat {
        h: usize,
        w: usize,
        /// Tap `t`'s row offset from its output pixel.
        dy: [i32; 9],
        /// Tap `t`'s column offset from its output pixel.
        dx: [i32; 9],
        /// Tap `t`'s offset in the flattened plane.
        off: [isize; 9],
    }

    impl Flat {
        /// The plan for an `h x w` plane (`w >= 16`) with top / left padding `(pt, pl)` and
        /// dilation `(dy, dx)`, whose output is `h x w` too.
        pub(crate) fn new(
            (h, w): (usize, usize),
            (pt, pl): (usize, usize),
            (dy, dx): (usize, usize),
        ) -> Self {
            assert!(w >= 16, "depthwise packer: rows of {w} < 16 pixels");
            let shift = |k: usize, d: usize, p: usize| (k * d) as i32 - p as i32;
            let dy: [i32; 9] = std::array::from_fn(|t| shift(t / 3, dy, pt));
            let dx: [i32; 9] = std::array::from_fn(|t| shift(t % 3, dx, pl));
            let off = std::array::from_fn(|t| dy[t] as isize * w as isize + dx[t] as isize);
            Self { h, w, dy, dx, off }
        }

        /// The lanes of each tap inside the plane for the 16 pixels from `f`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn masks(&self, f: usize) -> [__mmask16; 9] {
            let hw = self.h * self.w;
            if f >= hw {
                return [0; 9];
            }
            let (y0, x0) = ((f / self.w) as i32, (f % self.w) as i32);
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let wv = _mm512_set1_epi32(self.w as i32);
            let hv = _mm512_set1_epi32(self.h as i32);
            // Lane columns and rows: one wrap at most, as rows hold at least 16 pixels.
            let x = _mm512_add_epi32(_mm512_set1_epi32(x0), iota);
            let wrap = _mm512_cmpge_epi32_mask(x, wv);
            let x = _mm512_mask_sub_epi32(x, wrap, x, wv);
            let y = _mm512_mask_add_epi32(
                _mm512_set1_epi32(y0),
                wrap,
                _mm512_set1_epi32(y0),
                _mm512_set1_epi32(1),
            );
            let live = lanes((hw - f).min(16));
            std::array::from_fn(|t| {
                // `0 <= v < n` as one unsigned compare.
                let cols =
                    _mm512_cmplt_epu32_mask(_mm512_add_epi32(x, _mm512_set1_epi32(self.dx[t])), wv);
                let rows =
                    _mm512_cmplt_epu32_mask(_mm512_add_epi32(y, _mm512_set1_epi32(self.dy[t])), hv);
                live & cols & rows
            })
        }

        /// Channels `c0..c0 + kc` (their input planes at `x`, `hw` values each, weights `k`,
        /// 9 per channel, epilogues `epi`), pixels `j0..j0 + cols`, as the packed panels of a
        /// product's `B` (see `crate::sgemm::PackB`): channel `c0 + p`, pixels `j0 + q * 48..`
        /// at `buf[(q * kc + p) * 48..][..48]`, zero past `cols`.
        ///
        /// # Safety
        /// `x` holds the planes of channels `c0..c0 + kc` (`hw` values each); `j0` is a
        /// multiple of 16 and `j0 + cols <= hw`; `buf` holds `kc * cols.div_ceil(48) * 48`
        /// values; the CPU supports AVX-512F.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(crate) unsafe fn pack(
            &self,
            x: &[f32],
            k: &[f32],
            epi: &dyn Fn(usize) -> Epi,
            (c0, kc): (usize, usize),
            (j0, cols): (usize, usize),
            (relu, act): (bool, Activation),
            buf: &mut [f32],
        ) {
            let hw = self.h * self.w;
            check_pack((hw, hw), x, k, (c0, kc), (j0, cols), buf);
            // SAFETY: the masked loads read only pixels inside channel planes below `c0 + kc`
            // (the masks keep the taps inside the plane), the stores stay in the block's `kc`
            // rows of panels in `buf` (all checked above).
            unsafe { with_flags!(relu, act, self.panels(x, k, epi, (c0, kc), (j0, cols), buf)) }
        }

        /// [`Flat::pack`] with the activation and input ReLU as constants.
        ///
        /// # Safety
        /// As [`Flat::pack`], after its checks.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        unsafe fn panels<const A: u8, const IR: bool>(
            &self,
            x: &[f32],
            k: &[f32],
            epi: &dyn Fn(usize) -> Epi,
            (c0, kc): (usize, usize),
            (j0, cols): (usize, usize),
            buf: &mut [f32],
        ) {
            const PANEL: usize = 48;
            const V: usize = PANEL / 16;
            let hw = self.h * self.w;
            let np = cols.div_ceil(PANEL);
            let end = j0 + cols;
            // The tap masks of the block's vectors, shared by its channels (vectors past its
            // pixels load nothing and are stored as zeros).
            let masks: Vec<[__mmask16; 9]> = (0..np * V)
                .map(|u| {
                    let f = j0 + 16 * u;
                    if f < end {
                        self.masks(f)
                    } else {
                        [0; 9]
                    }
                })
                .collect();
            // The span of a plane the block's taps read, the next channel's prefetched over
            // each channel's panels.
            let lo = (j0 as isize + self.off[0]).max(0) as usize;
            let hi = ((end as isize + self.off[8]).max(0) as usize).min(hw);
            // Panels whose 48 pixels are all in the block and whose taps all lie in rows inside
            // the plane, with the middle column's taps on the pixel itself: their taps need
            // only two masks per vector (the left and right columns'), kept in registers, the
            // middle column loads whole and the panel stores whole.
            let interior: Vec<Option<[[__mmask16; 2]; V]>> = (0..np)
                .map(|q| {
                    let m = &masks[q * V..(q + 1) * V];
                    let inside = j0 + (q + 1) * PANEL <= end
                        && m.iter().all(|m| {
                            (0..9).all(|t| match t % 3 {
                                1 => m[t] == u16::MAX,
                                kx => m[t] == m[3 + kx],
                            })
                        });
                    inside.then(|| std::array::from_fn(|v| [m[v][3], m[v][5]]))
                })
                .collect();
            let mut pf = SpreadPrefetch::new((lo, hi), np);
            for p in 0..kc {
                let ch = c0 + p;
                pf.channel((p + 1 < kc).then(|| x.as_ptr().wrapping_add((ch + 1) * hw)));
                let kv: [__m512; 9] = std::array::from_fn(|t| _mm512_set1_ps(k[ch * 9 + t]));
                let e = epi(ch);
                let (sv, tv) = (_mm512_set1_ps(e.scale), _mm512_set1_ps(e.shift));
                let plane = x.as_ptr().wrapping_add(ch * hw);
                for q in 0..np {
                    let dst = buf.as_mut_ptr().wrapping_add((q * kc + p) * PANEL);
                    let f0 = j0 + q * PANEL;
                    pf.step();
                    let epi = (e.init, sv, tv);
                    if let Some(lr) = &interior[q] {
                        // SAFETY: the panel's taps in the middle column are its own pixels'
                        // rows above and below, inside the plane; the masks keep the other
                        // columns' lanes inside it.
                        let ys = unsafe {
                            self.chains::<A, IR>(plane, f0, &kv, epi, |t, v, src| match t % 3 {
                                1 => _mm512_loadu_ps(src),
                                kx => _mm512_maskz_loadu_ps(lr[v][kx / 2], src),
                            })
                        };
                        for (v, &y) in ys.iter().enumerate() {
                            // SAFETY: panel `q`, row `p` of `buf` (length checked by `pack`).
                            unsafe { _mm512_storeu_ps(dst.add(16 * v), y) };
                        }
                        continue;
                    }
                    // SAFETY: the mask's lanes are taps inside the plane.
                    let ys = unsafe {
                        self.chains::<A, IR>(plane, f0, &kv, epi, |t, v, src| {
                            _mm512_maskz_loadu_ps(masks[q * V + v][t], src)
                        })
                    };
                    for (v, &y) in ys.iter().enumerate() {
                        let f = f0 + 16 * v;
                        let y = _mm512_maskz_mov_ps(lanes(end.saturating_sub(f).min(16)), y);
                        // SAFETY: panel `q`, row `p` of `buf` (length checked by `pack`).
                        unsafe { _mm512_storeu_ps(dst.add(16 * v), y) };
                    }
                }
            }
        }

        /// The depthwise outputs of the 48 pixels from `f0` of one channel (`plane`, weights
        /// `kv`, epilogue `(init, scale, shift)`): the three vectors' FMA chains over the taps
        /// in [`Direct`]'s order from `init` (the input ReLU'd with `IR`), through the
        /// epilogue and activation `A`. `load(t, v, src)` reads tap `t` of vector `v` at `src`.
        ///
        /// # Safety
        /// `load` must be sound for every tap's address (`plane + f0 + 16 v + off[t]`); AVX-512F.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn chains<const A: u8, const IR: bool>(
            &self,
            plane: *const f32,
            f0: usize,
            kv: &[__m512; 9],
            (init, sv, tv): (f32, __m512, __m512),
            load: impl Fn(usize, usize, *const f32) -> __m512,
        ) -> [__m512; 3] {
            let mut acc = [_mm512_set1_ps(init); 3];
            for (t, &k) in kv.iter().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    let src = plane.wrapping_offset((f0 + 16 * v) as isize + self.off[t]);
                    let mut val = load(t, v, src);
                    if IR {
                        val = _mm512_max_ps(val, _mm512_setzero_ps());
                    }
                    *acc = _mm512_fmadd_ps(val, k, *acc);
                }
            }
            acc.map(|a| activate::<A>(_mm512_fmadd_ps(a, sv, tv)))
        }
    }

    /// [`Flat`] for a 3x3 stride-2 depthwise convolution (dilation 1): runs of 16 consecutive
    /// output pixels of the flattened output plane, each input row band loaded as three vectors
    /// and split into the three taps' even / odd / next-even lanes as [`Direct2`] does. A run
    /// that wraps to the next output row is computed once per row and the lanes blended. The
    /// taps are summed in [`Direct2`]'s order from the same initial value through the same
    /// epilogue, input rows outside the plane skipped and columns outside it loaded as zeros, so
    /// the outputs are the same bits.
    pub(crate) struct Flat2 {
        h: usize,
        w: usize,
        ho: usize,
        wo: usize,
        pt: usize,
        pl: usize,
    }

    impl Flat2 {
        /// The plan for an `h x w` plane giving `ho x wo` (`wo >= 16`) with top / left padding
        /// `(pt, pl)`.
        pub(crate) fn new(
            (h, w): (usize, usize),
            (ho, wo): (usize, usize),
            (pt, pl): (usize, usize),
        ) -> Self {
            assert!(
                wo >= 16,
                "depthwise packer: output rows of {wo} < 16 pixels"
            );
            Self {
                h,
                w,
                ho,
                wo,
                pt,
                pl,
            }
        }

        /// As [`Flat::pack`], for output pixels `j0..j0 + cols` of the `ho x wo` output plane
        /// (the input planes are `h x w`).
        ///
        /// # Safety
        /// As [`Flat::pack`] with `j0 + cols <= ho * wo` and `h * w` values per input plane.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(crate) unsafe fn pack(
            &self,
            x: &[f32],
            k: &[f32],
            epi: &dyn Fn(usize) -> Epi,
            (c0, kc): (usize, usize),
            (j0, cols): (usize, usize),
            (relu, act): (bool, Activation),
            buf: &mut [f32],
        ) {
            check_pack(
                (self.h * self.w, self.ho * self.wo),
                x,
                k,
                (c0, kc),
                (j0, cols),
                buf,
            );
            // SAFETY: the loads are masked to columns inside rows inside the channel planes
            // below `c0 + kc`, the stores stay in the block's `kc` rows of panels in `buf`
            // (checked above).
            unsafe { with_flags!(relu, act, self.panels(x, k, epi, (c0, kc), (j0, cols), buf)) }
        }

        /// [`Flat2::pack`] with the activation and input ReLU as constants.
        ///
        /// # Safety
        /// As [`Flat2::pack`], after its checks.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        unsafe fn panels<const A: u8, const IR: bool>(
            &self,
            x: &[f32],
            k: &[f32],
            epi: &dyn Fn(usize) -> Epi,
            (c0, kc): (usize, usize),
            (j0, cols): (usize, usize),
            buf: &mut [f32],
        ) {
            const PANEL: usize = 48;
            let (hw, np, end) = (self.h * self.w, cols.div_ceil(PANEL), j0 + cols);
            let zero = _mm512_setzero_ps();
            // The block's runs of 16 output pixels, shared by its channels: the output row and
            // lane 0's column of each part (one, or two when the run wraps to the next row),
            // the load masks of each part, and the lanes to keep.
            let runs: Vec<Option<Flat2Run>> = (0..np * PANEL / 16)
                .map(|u| {
                    let f = j0 + 16 * u;
                    (f < end).then(|| {
                        let (y0, x0) = (f / self.wo, f % self.wo);
                        let first = self.wo - x0;
                        let wrap = (first < 16 && y0 + 1 < self.ho)
                            .then(|| (first, self.load_masks(-(first as isize))));
                        Flat2Run {
                            y0,
                            x0: x0 as isize,
                            masks: self.load_masks(x0 as isize),
                            wrap,
                            keep: lanes((end - f).min(16)),
                        }
                    })
                })
                .collect();
            // The input rows the block reads, the next channel's prefetched over each channel's
            // runs.
            let lo = ((2 * (j0 / self.wo)).saturating_sub(self.pt) * self.w).min(hw);
            let hi = ((2 * ((end - 1) / self.wo) + 3).saturating_sub(self.pt) * self.w).min(hw);
            let mut pf = SpreadPrefetch::new((lo, hi), runs.len());
            for p in 0..kc {
                let ch = c0 + p;
                pf.channel((p + 1 < kc).then(|| x.as_ptr().wrapping_add((ch + 1) * hw)));
                let kv: [__m512; 9] = std::array::from_fn(|t| _mm512_set1_ps(k[ch * 9 + t]));
                let e = epi(ch);
                let (sv, tv) = (_mm512_set1_ps(e.scale), _mm512_set1_ps(e.shift));
                let plane = x.as_ptr().wrapping_add(ch * hw);
                for (u, run) in runs.iter().enumerate() {
                    pf.step();
                    let dst = buf
                        .as_mut_ptr()
                        .wrapping_add(((u / 3) * kc + p) * PANEL + 16 * (u % 3));
                    let y = match run {
                        Some(r) => {
                            // SAFETY: the masks keep every load inside its row of the plane.
                            let mut acc = unsafe {
                                self.row::<IR>(plane, &kv, e.init, r.y0, (r.x0, &r.masks))
                            };
                            if let Some((first, masks)) = &r.wrap {
                                // Lanes from `first` on are the next row's pixels 0, 1, ...
                                // SAFETY: as above.
                                let next = unsafe {
                                    self.row::<IR>(
                                        plane,
                                        &kv,
                                        e.init,
                                        r.y0 + 1,
                                        (-(*first as isize), masks),
                                    )
                                };
                                acc = _mm512_mask_blend_ps(!lanes(*first), acc, next);
                            }
                            let y = activate::<A>(_mm512_fmadd_ps(acc, sv, tv));
                            _mm512_maskz_mov_ps(r.keep, y)
                        }
                        None => zero,
                    };
                    // SAFETY: panel `u / 3`, row `p`, vector `u % 3` of `buf` (length checked
                    // by `pack`).
                    unsafe { _mm512_storeu_ps(dst, y) };
                }
            }
        }

        /// The lanes inside the input row of the three vectors loaded for output columns
        /// `xs + l`: input columns `2 xs - pl + 16 t + l` for vector `t`.
        fn load_masks(&self, xs: isize) -> [__mmask16; 3] {
            let base = 2 * xs - self.pl as isize;
            std::array::from_fn(|t| {
                lane_mask(|l| (0..self.w as isize).contains(&(base + 16 * t as isize + l as isize)))
            })
        }

        /// The taps of output row `oy` at columns `xs + l` for the 16 lanes `l`, from the
        /// accumulator `init` (lanes whose column is outside `0..wo` get what zero padding and
        /// the row's edge give; the caller keeps only its own lanes); `masks` from
        /// [`Flat2::load_masks`] for `xs`.
        ///
        /// # Safety
        /// `plane` is an `h x w` plane; AVX-512F.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn row<const IR: bool>(
            &self,
            plane: *const f32,
            kv: &[__m512; 9],
            init: f32,
            oy: usize,
            (xs, masks): (isize, &[__mmask16; 3]),
        ) -> __m512 {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let zero = _mm512_setzero_ps();
            let base = 2 * xs - self.pl as isize;
            let mut acc = _mm512_set1_ps(init);
            for ky in 0..3 {
                // Input rows outside the plane are zero padding and contribute nothing.
                let Some(iy) = (2 * oy + ky).checked_sub(self.pt).filter(|&iy| iy < self.h) else {
                    continue;
                };
                let row = plane.wrapping_add(iy * self.w);
                let v: [__m512; 3] = std::array::from_fn(|t| {
                    let p = row.wrapping_offset(base + 16 * t as isize);
                    // SAFETY: the mask keeps the lanes inside the row (`iy < h`).
                    let x = unsafe { _mm512_maskz_loadu_ps(masks[t], p) };
                    if IR {
                        _mm512_max_ps(x, zero)
                    } else {
                        x
                    }
                });
                // Taps kx = 0, 1, 2 of lane l read input columns 2 (xs + l) - pl + kx.
                let e0 = _mm512_permutex2var_ps(v[0], even, v[1]);
                let o0 = _mm512_permutex2var_ps(v[0], odd, v[1]);
                let e1 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                    _mm512_castps_si512(v[2]),
                    _mm512_castps_si512(e0),
                ));
                for (kx, t) in [e0, o0, e1].into_iter().enumerate() {
                    acc = _mm512_fmadd_ps(t, kv[ky * 3 + kx], acc);
                }
            }
            acc
        }
    }

    /// One run of 16 output pixels of a [`Flat2`] block.
    struct Flat2Run {
        /// Output row of lane 0.
        y0: usize,
        /// Output column of lane 0.
        x0: isize,
        /// Load masks for `x0`.
        masks: [__mmask16; 3],
        /// When the run wraps: the lanes left in row `y0` and the load masks of the next row.
        wrap: Option<(usize, [__mmask16; 3])>,
        /// The lanes that are the block's pixels.
        keep: __mmask16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fill` (vectorized for stride 1 and 2) against a per-element copy through `src_col`.
    #[test]
    fn fill_matches_scalar() -> Result<()> {
        for s in [1, 2, 3] {
            for w in [1, 2, 5, 16, 17, 31, 32, 33, 40] {
                for (pl, pr) in [(0, 0), (1, 1), (2, 2), (3, 0), (0, 3)] {
                    for relu in [false, true] {
                        let geom = Conv2dGeometry {
                            stride: (s, s),
                            dilation: (1, 1),
                            padding: Padding2d {
                                top: 1,
                                bottom: 0,
                                left: pl,
                                right: pr,
                            },
                        };
                        let Ok(p) = Plan::new((4, w), (3, 3), &geom) else {
                            continue;
                        };
                        let x: Vec<f32> = (0..4 * w).map(|i| i as f32 - 7.5).collect();
                        let mut buf = vec![0f32; p.scratch_len()];
                        p.fill(&x, &mut buf, relu);
                        for r in 0..p.hp {
                            for ph in 0..p.sx {
                                for q in 0..p.wq {
                                    let want = match (r.checked_sub(p.pt), p.src_col(q * p.sx + ph))
                                    {
                                        (Some(iy), Some(ix)) if iy < p.h => x[iy * w + ix],
                                        _ => 0.0,
                                    };
                                    let want = if relu { want.max(0.0) } else { want };
                                    let got = buf[(r * p.sx + ph) * p.wq + q];
                                    assert_eq!(
                                        got, want,
                                        "s{s} w{w} pl{pl} row {r} phase {ph} col {q}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The AVX-512 loops (where the CPU has them) against the portable ones, plane by plane,
    /// over kernel sizes, strides, dilations, asymmetric padding, widths around multiples of
    /// 16 and every activation.
    #[test]
    fn simd_matches_portable() -> Result<()> {
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
        };
        let pads = [
            Padding2d::uniform(1),
            Padding2d {
                top: 0,
                bottom: 3,
                left: 2,
                right: 0,
            },
        ];
        let (mut checked, mut direct2) = (0, 0);
        for (kh, kw) in [(3, 3), (5, 5), (1, 1), (3, 2)] {
            for s in [1, 2] {
                for d in [1, 2, 5] {
                    for w in [1, 7, 15, 16, 17, 33, 40] {
                        for (pi, padding) in pads.iter().enumerate() {
                            let geom = Conv2dGeometry {
                                stride: (s, s),
                                dilation: (d, d),
                                padding: *padding,
                            };
                            let h = 9 + pi;
                            let Ok(p) = Plan::new((h, w), (kh, kw), &geom) else {
                                continue;
                            };
                            let x: Vec<f32> = (0..h * w).map(|_| rnd()).collect();
                            let k: Vec<f32> = (0..kh * kw).map(|_| rnd()).collect();
                            let taps = p.taps();
                            for (ai, act) in [Activation::None, Activation::Relu, Activation::Relu6]
                                .into_iter()
                                .enumerate()
                            {
                                let relu = ai == 1;
                                // a bias (None, Relu6) or a folded BatchNorm's scale and shift (Relu)
                                let epi = if ai == 1 {
                                    Epi {
                                        init: 0.0,
                                        scale: 1.5,
                                        shift: -0.25,
                                    }
                                } else {
                                    Epi {
                                        init: 0.25,
                                        scale: 1.0,
                                        shift: 0.0,
                                    }
                                };
                                let mut buf = vec![0f32; p.scratch_len()];
                                p.fill(&x, &mut buf, relu);
                                let n = p.ho * p.wo;
                                let mut a = vec![MaybeUninit::new(f32::NAN); n];
                                let mut b = vec![MaybeUninit::new(f32::NAN); n];
                                p.forward(&buf, &taps, &k, epi, act, &mut a);
                                p.forward_portable(&buf, &k, epi, act, &mut b);
                                #[cfg(target_arch = "x86_64")]
                                if (kh, kw, s) == (3, 3, 1) && crate::cpu::has_avx512() {
                                    // The scratch-free kernel that stride-1 3x3 runs on.
                                    let d = avx512::Direct::new(
                                        (h, w),
                                        (p.ho, p.wo),
                                        (p.pt, p.pl),
                                        (d, d),
                                    );
                                    // SAFETY: the CPU reports AVX-512F.
                                    unsafe { d.plane(&x, &x, &k, epi, relu, act, &mut a) };
                                }
                                #[cfg(target_arch = "x86_64")]
                                if (kh, kw, s, d) == (3, 3, 2, 1) && crate::cpu::has_avx512() {
                                    // The scratch-free stride-2 kernel: the same taps in the
                                    // same order as the scratch kernel, so the same bits.
                                    let d2 =
                                        avx512::Direct2::new((h, w), (p.ho, p.wo), (p.pt, p.pl));
                                    let mut c = vec![MaybeUninit::new(f32::NAN); n];
                                    // SAFETY: the CPU reports AVX-512F.
                                    unsafe { d2.plane(&x, &k, epi, relu, act, &mut c) };
                                    for (i, (a, c)) in a.iter().zip(&c).enumerate() {
                                        // SAFETY: initialised above.
                                        let (a, c) = unsafe { (a.assume_init(), c.assume_init()) };
                                        assert!(
                                            a.to_bits() == c.to_bits(),
                                            "stride-2 kernel w{w} {padding:?} {act:?} at {i}: {c} vs {a}"
                                        );
                                    }
                                    direct2 += 1;
                                }
                                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                                    // SAFETY: initialised above.
                                    let (a, b) = unsafe { (a.assume_init(), b.assume_init()) };
                                    assert!(
                                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                        "{kh}x{kw} s{s} d{d} w{w} {padding:?} {act:?} at {i}: {a} vs {b}"
                                    );
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 300, "only {checked} geometries checked");
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            assert!(direct2 >= 30, "only {direct2} stride-2 geometries checked");
        }
        Ok(())
    }
}
