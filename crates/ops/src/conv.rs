//! Dense 2-D convolution with asymmetric padding and correct gradients on non-square inputs.
//!
//! On the CPU (f32, and f16/bf16 through f32) a convolution with one group runs as im2col + one
//! gemm per image: the patch matrix of [`crate::im2col`] is built in chunks of output rows into
//! a reused scratch buffer (at most [`CHUNK_ELEMS`] floats) and multiplied by the weights seen
//! as `[Cout, Cin * kh * kw]`, writing NCHW output directly. The backward pass rebuilds the
//! patch matrix (only the input and weights are kept for it, as with candle's own conv) and
//! runs two matmuls: `dW = dY * cols^T` and `dX = col2im(W^T * dY)`. This is exact for any
//! stride, dilation and asymmetric padding, on any input size.
//!
//! The products are [`crate::sgemm`] calls (the AVX-512 kernel, with a folded BatchNorm epilogue
//! and optionally a residual add fused into the tile stores when given). Two forward paths do
//! less arithmetic: 3x3 stride-1 convolutions (any dilation) with at least 32 channels on both
//! sides run as Winograd F(4x4, 3x3) or F(2x2, 3x3) (`crate::winograd`) where that saves enough
//! multiplies, and other convolutions with more than 15% of their tap reads in the zero padding
//! (large atrous rates on small maps) by output rectangles that skip those taps
//! ([`forward_regions`]). 1x1 stride-1 unpadded convolutions of f32 CPU tensors skip im2col: one
//! product per image (see [`crate::pointwise`]); other devices and dtypes run them as one
//! batched candle matmul. Grouped convolutions, f64 and other devices use candle's conv2d.
//! candle 0.11's conv2d backward derives the transposed convolution's output padding from the
//! height alone, so a strided convolution of an input whose height and width leave different
//! remainders gets a wrong input gradient. That path pads explicitly and then crops the input to
//! exactly the extent the kernel windows cover, so candle's output padding is zero on both axes
//! and its backward is exact. Uncovered rows and columns get zero gradient through the crop.

use crate::batch_norm::epilogue_row;
use crate::cpu::{f32_slice, image_groups, per_image, put_buf, take_buf, threads, Ptr};
use crate::geometry::Conv2dGeometry;
use crate::im2col::{col2im, fill_rows, im2col, tap_major, Patches};
use crate::sgemm::{sgemm_raw, sgemm_raw_ex, RawOperand, RowEpilogue};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::Cell;

/// The largest patch-matrix chunk the forward pass builds at once, in f32 elements (16 MiB):
/// large enough that each gemm has thousands of columns, small enough to stay mostly in the
/// last-level cache between being written and being read, and to bound memory at any size.
const CHUNK_ELEMS: usize = 1 << 22;

thread_local! {
    /// Patch-matrix scratch (the rectangle path's channels-last image with AVX-512) reused
    /// across calls, so repeated convolutions do not page-fault
    /// a fresh buffer in every time. Taken out while in use, so a re-entrant call (a rayon
    /// worker picking up another convolution) just allocates its own.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The rectangle path's packed weights, reused like `SCRATCH`.
    static REGION_WEIGHTS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The rectangle path's pixel-major outputs, reused like `SCRATCH`.
    static REGION_ACC: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Convolution of `(x, w)` with one group on [`forward_f32`]: a `pointwise` one (1x1, stride 1,
/// no padding) reads the input as its patch matrix, any other builds it by im2col; with `epi`, a
/// folded BatchNorm `act(y * scale + shift)` applied at each tile store (inference only).
pub(crate) struct ConvGemm {
    pub geom: Conv2dGeometry,
    pub epi: Option<(Vec<f32>, Vec<f32>, crate::Activation)>,
    pub pointwise: bool,
}

impl ConvGemm {
    /// [`forward_f32`] on the op's storages, with an optional residual (needs `epi`).
    fn forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        let x = f32_slice(name, xs, xl)?;
        let k = f32_slice(name, ws, wl)?;
        let r = match residual {
            Some((rs, rl)) => Some((f32_slice(name, rs, rl)?, rl.shape())),
            None => None,
        };
        let epi = self
            .epi
            .as_ref()
            .map(|(s, t, a)| (s.as_slice(), t.as_slice(), *a));
        let (out, shape) = forward_f32(
            (x, xl.shape()),
            (k, wl.shape()),
            &self.geom,
            epi,
            r,
            self.pointwise,
        )?;
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp2 for ConvGemm {
    fn name(&self) -> &'static str {
        if self.pointwise {
            "pointwise-conv-sgemm"
        } else {
            "conv2d-im2col-gemm"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.epi.is_some() {
            bail!("conv2d with a folded BatchNorm is inference-only (fold after training)")
        }
        let (n, cin, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        if self.pointwise {
            return matmul_conv_grads(
                x,
                w,
                grad,
                |x| x.reshape((n, cin, h * wd)),
                |dx| dx.reshape((n, cin, h, wd)),
            );
        }
        matmul_conv_grads(
            x,
            w,
            grad,
            |x| im2col(x, (kh, kw), &self.geom),
            |dcols| col2im(dcols, (h, wd), (kh, kw), &self.geom),
        )
    }
}

/// The f32 CPU forward of a one-group convolution into a fresh NCHW buffer (returned with its
/// shape): with `pointwise` (a 1x1 stride-1 unpadded kernel) one product per image straight
/// from the input, otherwise im2col chunks of whole output rows, each multiplied into place.
/// `epi` (per-channel scale, shift, activation) and `residual` (a tensor shaped like the output,
/// added before the activation; needs `epi`) are applied at each tile store.
pub(crate) fn forward_f32(
    (x, xs): (&[f32], &Shape),
    (k, ws): (&[f32], &Shape),
    geom: &Conv2dGeometry,
    epi: Option<(&[f32], &[f32], crate::Activation)>,
    residual: Option<(&[f32], &Shape)>,
    pointwise: bool,
) -> Result<(Vec<f32>, Shape)> {
    let (n, cin, h, wd) = xs.dims4()?;
    let (cout, cin_w, kh, kw) = ws.dims4()?;
    if cin_w != cin {
        bail!(
            "conv2d: weight {:?} does not fit input {:?}",
            ws.dims(),
            xs.dims()
        )
    }
    if epi.is_some_and(|(s, t, _)| s.len() != cout || t.len() != cout) {
        bail!(
            "conv2d: epilogue of {:?} channels does not fit weight {:?}",
            epi.map(|(s, _, _)| s.len()),
            ws.dims()
        )
    }
    if pointwise && !geom.is_pointwise((kh, kw)) {
        bail!(
            "pointwise conv: weight {:?} with {geom:?} is not a plain 1x1 convolution",
            ws.dims()
        )
    }
    let p = Patches::new((h, wd), (kh, kw), geom)?;
    let shape = Shape::from((n, cout, p.ho, p.wo));
    if let Some((_, rs)) = residual {
        if rs != &shape || epi.is_none() {
            bail!(
                "conv2d: residual {:?} does not match the output {:?} (or no epilogue to add it in)",
                rs.dims(),
                shape.dims()
            )
        }
    }
    let (kk, l, hw) = (cin * p.taps(), p.ho * p.wo, h * wd);
    let total = n * cout * l;
    if total == 0 || kk == 0 {
        // No input channels: the product is zero, the epilogue still applies.
        let mut out = vec![0f32; total];
        if let (Some((s, t, act)), false) = (epi, out.is_empty()) {
            for (i, row) in out.chunks_mut(l).enumerate() {
                let r = residual.map(|(r, _)| &r[i * l..(i + 1) * l]);
                epilogue_row(row, (s[i % cout], t[i % cout]), act, r);
            }
        }
        return Ok((out, shape));
    }
    // Every element is written by exactly one product: no zero fill.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    // The epilogue of the output rows `[oy0, ..)` of image `b`.
    let epi_at = |b: usize, oy0: usize| {
        epi.map(|(scale, shift, act)| RowEpilogue {
            scale,
            shift,
            act,
            residual: residual.map(|(r, _)| &r[b * cout * l + oy0 * p.wo..]),
        })
    };
    let (regions, direct) = direct_path(&p, pointwise);
    let tile = winograd_tile(&p, (cin, cout), direct);
    if tile > 0 {
        // The transformed weights once for the batch.
        let (u, scheme) = if tile == 4 {
            (
                crate::winograd::f4::transform_weights(k, cout, cin),
                &crate::winograd::f4::F4,
            )
        } else {
            (
                crate::winograd::transform_weights(k, cout, cin),
                &crate::winograd::F2,
            )
        };
        for b in 0..n {
            // SAFETY: image `b`'s `cout * l` outputs lie inside `out`'s capacity, and the
            // residual (same shape as the output) holds image `b`'s values at the same offset;
            // `u` is the scheme's transform of `k`.
            unsafe {
                crate::winograd::run(
                    scheme,
                    &x[b * cin * hw..(b + 1) * cin * hw],
                    (cin, cout),
                    &u,
                    &p,
                    epi,
                    residual.map(|(r, _)| &r[b * cout * l..(b + 1) * cout * l]),
                    out.as_mut_ptr().add(b * cout * l),
                )
            }
        }
        crate::winograd::give_back_weights(u);
    } else if regions {
        forward_regions(
            (x, (n, cin)),
            (k, cout),
            &p,
            epi,
            residual.map(|(r, _)| r),
            &mut out,
        )?;
    } else if pointwise {
        let dst = Ptr(out.as_mut_ptr());
        per_image(n, |b, threads| {
            // SAFETY: `k` is the `cout x cin` row-major weight matrix, image `b` of `x` the
            // `cin x hw` row-major input, and image `b`'s `cout x hw` rows of `out` lie inside
            // its capacity (written by this call alone); the residual slice covers image `b`'s
            // `cout x hw` values.
            unsafe {
                sgemm_raw(
                    (cout, hw, cin),
                    (k.as_ptr(), cin),
                    (x.as_ptr().add(b * cin * hw), hw),
                    (dst.get().add(b * cout * hw), hw),
                    epi_at(b, 0),
                    threads,
                )
            }
        });
    } else {
        // Even chunks of whole output rows, each at most CHUNK_ELEMS (or one row) of columns.
        let chunks = (kk * l).div_ceil(CHUNK_ELEMS).clamp(1, p.ho);
        let rows = p.ho.div_ceil(chunks);
        let mut buf = take_buf(&SCRATCH, kk * rows * p.wo);
        for b in 0..n {
            let xb = &x[b * cin * hw..(b + 1) * cin * hw];
            let ob = out.as_mut_ptr().wrapping_add(b * cout * l);
            for oy0 in (0..p.ho).step_by(rows) {
                let oy1 = (oy0 + rows).min(p.ho);
                let len = (oy1 - oy0) * p.wo;
                let cols = &mut buf[..kk * len];
                fill_rows(xb, &p, oy0, oy1, cols);
                let dst = ob.wrapping_add(oy0 * p.wo);
                // SAFETY: lhs is the `cout x kk` row-major weight matrix (`k.len() == cout *
                // kk`), rhs the `kk x len` row-major chunk just filled, and dst addresses rows
                // `r * l + [0, len)` for r < cout from image `b`'s output offset `oy0 * wo`,
                // inside `out`'s capacity since `oy0 * wo + len <= l`; the residual slice
                // starts at the same offset of the same-shaped residual.
                unsafe {
                    sgemm_raw(
                        (cout, len, kk),
                        (k.as_ptr(), kk),
                        (cols.as_ptr(), len),
                        (dst, l),
                        epi_at(b, oy0),
                        threads(),
                    )
                }
            }
        }
        put_buf(&SCRATCH, buf);
    }
    // SAFETY: the products wrote all `total` elements.
    unsafe { out.set_len(total) };
    Ok((out, shape))
}

/// Copies a rectangle's products (`tmp`: `cout` rows of its pixels, or with `pixel_major` its
/// pixels' rows of `cout` values) into image `b`'s output channels (`l` pixels each, rows `wo`
/// wide) at rows from `r0`, columns `x0..x0 + nx`, through the epilogue and residual.
fn write_rect(
    tmp: &[f32],
    pixel_major: bool,
    (b, r0, x0, nx): (usize, usize, usize, usize),
    (cout, l, wo): (usize, usize, usize),
    epi: Option<(&[f32], &[f32], crate::Activation)>,
    residual: Option<&[f32]>,
    out_ptr: Ptr<*mut f32>,
) {
    use rayon::prelude::*;
    let npx = tmp.len() / cout;
    (0..cout).into_par_iter().for_each(|o| {
        let base = b * cout * l + o * l;
        for yy in 0..npx / nx {
            let at = base + (r0 + yy) * wo + x0;
            // SAFETY: `[at, at + nx)` is row `r0 + yy`, columns `[x0, x0 + nx)` of channel `o`
            // of image `b`: inside the output's capacity and written by this task alone
            // (rectangles and channels do not overlap).
            let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), nx) };
            if pixel_major {
                for (xx, d) in dst.iter_mut().enumerate() {
                    *d = tmp[(yy * nx + xx) * cout + o];
                }
            } else {
                dst.copy_from_slice(&tmp[o * npx + yy * nx..o * npx + (yy + 1) * nx]);
            }
            if let Some((s, t, act)) = epi {
                let r = residual.map(|r| &r[at..at + nx]);
                multiversion!(|| epilogue_row(dst, (s[o], t[o]), act, r));
            }
        }
    });
}

/// The share of a convolution's taps that fall in the zero padding above which
/// [`forward_regions`] skips them (ResNet's ASPP at 33x33: rate 6 23%, 12 43%, 18 60%; a 3x3
/// rate-1 convolution of a 33x33 map: 6%).
const REGIONS_MIN_PADDING: f64 = 0.15;

/// A 3x3 stride-1 convolution runs as Winograd (F(2x2, 3x3) or F(4x4, 3x3)) when that does at
/// most this share of the direct path's multiplies (its transforms cost the rest): undilated
/// and rate-2 convs on DeepLab's maps do 0.45-0.47; ResNet's rate-6 ASPP branch on 33x33 would
/// do 0.69 of the rectangles' and measured slower on Winograd (36-38 vs 34-35 ms in alternating
/// runs: the transforms of 2048 input channels for few tiles), its rates 12 and 18 more than
/// the direct path.
const WINOGRAD_MAX_SHARE: f64 = 0.6;

/// F(4x4, 3x3) replaces F(2x2, 3x3) when it does at most this share of its multiplies: 33x33
/// maps 0.63, 65x65 0.60, 129x129 0.58; ResNet's rate-6 ASPP on 33x33 1.0 (its phases are too
/// short for 4-output tiles). ResNet-101 profile, alternating with `DEEPLAB_WINOGRAD=2`: layer3's
/// 22 convs at 33x33 61-64 -> 53-57 ms, the decoder's two at 129x129 37 / 29 -> 28 / 26 ms,
/// layer4's rate-2 pair 22 -> 19 ms, 65x65 unchanged.
const WINOGRAD4_MAX_SHARE: f64 = 0.8;

/// Whether the direct path skips the padding taps ([`forward_regions`]), and its multiplies per
/// channel pair (to weigh against Winograd's).
fn direct_path(p: &Patches, pointwise: bool) -> (bool, f64) {
    let share = if pointwise { 0.0 } else { p.padding_share() };
    let regions = share > REGIONS_MIN_PADDING;
    let skipped = if regions { share } else { 0.0 };
    (regions, (p.ho * p.wo * p.taps()) as f64 * (1.0 - skipped))
}

/// The Winograd tile for a convolution (0: direct), given the direct path's multiplies per
/// channel pair.
fn winograd_tile(p: &Patches, (cin, cout): (usize, usize), direct: f64) -> usize {
    let max = crate::winograd::max_tile();
    if max == 0 || !crate::winograd::eligible(p, cin, cout) {
        return 0;
    }
    let two = crate::winograd::products(p) as f64;
    let four = crate::winograd::f4::products(p) as f64;
    if max == 4 && four <= WINOGRAD4_MAX_SHARE * two && four < WINOGRAD_MAX_SHARE * direct {
        4
    } else if two < WINOGRAD_MAX_SHARE * direct {
        2
    } else {
        0
    }
}

/// A convolution whose taps often fall in the zero padding (large atrous rates on small maps)
/// without multiplying those zeros: the output is split into rectangles inside which the same
/// taps read inside the input ([`Patches::segments`] of each axis). With AVX-512 the
/// rectangles' pixels multiply the packed weights tap by tap in place
/// ([`forward_regions_nhwc`]); otherwise each rectangle is one product (one per kernel row
/// when only some kernel columns are valid) of the tap-major weights `[Cout, kh, kw, Cin]`
/// restricted to its taps and the patch matrix of just those taps. The rectangle's result goes
/// through the epilogue into `out` (NCHW, written entirely).
fn forward_regions(
    (x, (n, cin)): (&[f32], (usize, usize)),
    (k, cout): (&[f32], usize),
    p: &Patches,
    epi: Option<(&[f32], &[f32], crate::Activation)>,
    residual: Option<&[f32]>,
    out: &mut Vec<f32>,
) -> Result<()> {
    use rayon::prelude::*;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        return forward_regions_nhwc((x, (n, cin)), (k, cout), p, epi, residual, out);
    }
    let (taps, hw, l) = (p.taps(), p.h * p.w, p.ho * p.wo);
    // Tap-major weights: row `o` holds `[ky][kx][cin]`.
    let mut wt = vec![0f32; cout * taps * cin];
    wt.par_chunks_mut(taps * cin)
        .zip(k.par_chunks(cin * taps))
        .for_each(|(dst, src)| tap_major(src, taps, dst));
    let (ys, xs) = (p.segments(true), p.segments(false));
    let mut buf = take_buf(&SCRATCH, 0);
    let mut tmp: Vec<f32> = Vec::new();
    let out_ptr = Ptr(out.as_mut_ptr());
    for b in 0..n {
        let xb = &x[b * cin * hw..(b + 1) * cin * hw];
        for &(y0, y1, ky0, ky1) in &ys {
            for &(x0, x1, kx0, kx1) in &xs {
                let (ntx, nty, nx) = (kx1 - kx0, ky1 - ky0, x1 - x0);
                let kr = nty * ntx * cin;
                // Even row chunks of the rectangle whose patch matrices fit CHUNK_ELEMS (an
                // uneven split left a one-row product of 21 columns for the rate-6 ASPP branch).
                let chunks = (kr * nx * (y1 - y0))
                    .div_ceil(CHUNK_ELEMS)
                    .clamp(1, y1 - y0);
                let rows = (y1 - y0).div_ceil(chunks);
                for r0 in (y0..y1).step_by(rows) {
                    let r1 = (r0 + rows).min(y1);
                    let npx = (r1 - r0) * nx;
                    tmp.clear();
                    tmp.reserve(cout * npx);
                    // Row `(t, c)` of the patch matrix: tap `tap(t)` of input plane `c`.
                    let tap = |t: usize| (ky0 + t / ntx, kx0 + t % ntx);
                    // Whole kernel rows are contiguous in the tap-major weights: one product;
                    // otherwise one per kernel row, accumulated. Part `part` is taps
                    // `part * per..(part + 1) * per`, its weights `A` from its first tap on.
                    let parts = if ntx == p.kw { 1 } else { nty.max(1) };
                    let (kp, per) = (kr / parts, kr / parts / cin);
                    let a_part = |part: usize| {
                        let (ky, kx) = tap(part * per);
                        RawOperand::rows(
                            wt.as_ptr().wrapping_add((ky * p.kw + kx) * cin),
                            taps * cin,
                        )
                    };
                    if buf.len() < kr * npx {
                        buf = vec![0f32; kr * npx];
                    }
                    let cols = &mut buf[..kr * npx];
                    cols.par_chunks_mut(npx)
                        .enumerate()
                        .with_min_len(4096usize.div_ceil(npx))
                        .for_each(|(i, row)| {
                            let (t, c) = (i / cin, i % cin);
                            let src = &xb[c * hw..(c + 1) * hw];
                            p.fill_rect(src, tap(t), (r0, r1), (x0, x1), row);
                        });
                    for part in 0..parts {
                        // SAFETY: `A` is `cout x kp` inside `wt` (row stride `taps * cin`),
                        // `B` the part's `kp` rows of the `kr x npx` patch matrix, `C` the
                        // `cout x npx` `tmp` (capacity reserved; written by the first part,
                        // accumulated by the others).
                        unsafe {
                            sgemm_raw_ex(
                                (cout, npx, kp),
                                a_part(part),
                                RawOperand::rows(cols.as_ptr().wrapping_add(part * kp * npx), npx),
                                (tmp.as_mut_ptr(), npx),
                                part > 0,
                                None,
                                threads(),
                            )
                        }
                    }
                    // SAFETY: the first product wrote all `cout * npx` values.
                    unsafe { tmp.set_len(cout * npx) };
                    write_rect(
                        &tmp,
                        false,
                        (b, r0, x0, nx),
                        (cout, l, p.wo),
                        epi,
                        residual,
                        out_ptr,
                    );
                }
            }
        }
    }
    put_buf(&SCRATCH, buf);
    Ok(())
}

/// [`forward_regions`] with AVX-512: the weights are packed into the microkernel's panels (a
/// `Cin x Cout` operand per tap), each image goes channels-last, and then tap by tap every
/// rectangle that reads inside the input with that tap adds the product of its pixels' rows,
/// read in place from the channels-last image, by the tap's weights
/// ([`crate::sgemm::sgemm_pixels`]): nothing is gathered per rectangle, and every product has
/// the whole input depth (the patch-matrix path's rectangles were products of 256 rows, each
/// packing its patch rows; ResNet-101's rate 6 / 12 / 18 ASPP branches 34 / 28 / 20 -> 26 / 21 /
/// 17 ms in alternating profiles). Each output is the FMA chain over its rectangle's taps in
/// order, then the channels. The rectangles' outputs (pixel-major) reach `out` transposed,
/// through the epilogue.
#[cfg(target_arch = "x86_64")]
fn forward_regions_nhwc(
    (x, (n, cin)): (&[f32], (usize, usize)),
    (k, cout): (&[f32], usize),
    p: &Patches,
    epi: Option<(&[f32], &[f32], crate::Activation)>,
    residual: Option<&[f32]>,
    out: &mut Vec<f32>,
) -> Result<()> {
    use crate::sgemm::{pack_conv_weights, packed_len, sgemm_pixels, PixelRows};
    let (taps, hw, l) = (p.taps(), p.h * p.w, p.ho * p.wo);
    // The rectangles `(at, (y0, x0, ny, nx), (ky0..ky1, kx0..kx1))`: their pixel-major outputs
    // lie one after another in `acc`, each from its `at`.
    let mut rects = Vec::new();
    let mut at = 0;
    for &(y0, y1, ky0, ky1) in &p.segments(true) {
        for &(x0, x1, kx0, kx1) in &p.segments(false) {
            rects.push((at, (y0, x0, y1 - y0, x1 - x0), (ky0..ky1, kx0..kx1)));
            at += (y1 - y0) * (x1 - x0) * cout;
        }
    }
    let (row_step, col_step) = p.pixel_steps();
    let mut xt = take_buf(&SCRATCH, cin * hw);
    let len = packed_len(cin, cout);
    let mut wt = take_buf(&REGION_WEIGHTS, taps * len);
    pack_conv_weights(k, (cout, cin, taps), &mut wt)?;
    let mut acc = take_buf(&REGION_ACC, l * cout);
    let out_ptr = Ptr(out.as_mut_ptr());
    for b in 0..n {
        channels_last(
            &x[b * cin * hw..(b + 1) * cin * hw],
            cin,
            &mut xt[..cin * hw],
        );
        for t in 0..taps {
            let (ky, kx) = (t / p.kw, t % p.kw);
            let users = rects
                .iter()
                .filter(|(_, _, (kys, kxs))| kys.contains(&ky) && kxs.contains(&kx));
            for (at, (y0, x0, ny, nx), (kys, kxs)) in users {
                let a = PixelRows {
                    x: &xt[..cin * hw],
                    cin,
                    row_step,
                    col_step,
                    nx: *nx,
                    first: p.read_offset((ky, kx), (*y0, *x0)),
                };
                // The rectangle's first tap starts its sums.
                let first = (ky, kx) == (kys.start, kxs.start);
                let c = &mut acc[*at..*at + ny * nx * cout];
                let tap_weights = &wt[t * len..(t + 1) * len];
                // SAFETY: AVX-512 checked by the caller; `sgemm_pixels` checks `A`, the packed
                // weights' length and that `c` holds the `ny * nx x cout` outputs.
                unsafe { sgemm_pixels(ny * nx, a, (tap_weights, cout), c, !first, threads())? };
            }
        }
        for (at, (y0, x0, ny, nx), (kys, kxs)) in &rects {
            let c = &mut acc[*at..*at + ny * nx * cout];
            if kys.is_empty() || kxs.is_empty() {
                // Every tap in the padding: the product is zero.
                c.fill(0.0);
            }
            write_rect(
                c,
                true,
                (b, *y0, *x0, *nx),
                (cout, l, p.wo),
                epi,
                residual,
                out_ptr,
            );
        }
    }
    put_buf(&SCRATCH, xt);
    put_buf(&REGION_WEIGHTS, wt);
    put_buf(&REGION_ACC, acc);
    Ok(())
}

/// An image's `cin` planes of `plane` values (NCHW) as `plane` pixels of `cin` values
/// (channels-last) in `dst`, in blocks of 64 pixels by 16 channels (a pixel's 16 values one
/// line of `dst`; a channel at a time with a whole-row stride, every write of a block landed
/// in one L1 set, and ResNet-101's 2048-channel 33x33 map took 8 ms instead of ~1).
#[cfg(target_arch = "x86_64")]
fn channels_last(x: &[f32], cin: usize, dst: &mut [f32]) {
    use rayon::prelude::*;
    const PIXELS: usize = 64;
    const CHANNELS: usize = 16;
    let plane = x.len() / cin;
    dst.par_chunks_mut(PIXELS * cin)
        .enumerate()
        .for_each(|(blk, d)| {
            let p0 = blk * PIXELS;
            let np = d.len() / cin;
            for c0 in (0..cin).step_by(CHANNELS) {
                let cb = CHANNELS.min(cin - c0);
                for j in 0..np {
                    let row = &mut d[j * cin + c0..j * cin + c0 + cb];
                    for (c, v) in row.iter_mut().enumerate() {
                        *v = x[(c0 + c) * plane + p0 + j];
                    }
                }
            }
        });
}

/// `act(conv2d(x, w) * scale + shift + residual)` (inference only): the folded convolution
/// whose tile stores also add a residual branch and apply the activation.
struct ConvResidual(ConvGemm);

impl CustomOp3 for ConvResidual {
    fn name(&self) -> &'static str {
        "conv2d-gemm-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((xs, xl), (ws, wl), Some((rs, rl)))
    }
}

/// Gradients of a convolution computed per image as `y = W2 · cols(x)` with
/// `W2 = w.reshape(Cout, Cin * kh * kw)`: `dW = sum_b dY · cols^T`, `dX = uncols(W2^T · dY)`
/// (`uncols` the adjoint of `cols`). Only what some variable depends on is computed: the
/// stem's input image, for one, needs no gradient. On the CPU in f32 both products are
/// [`crate::sgemm`] calls on the stored tensors (transposed operands read in place, the batch
/// sum accumulated in the weight gradient's FMA chains); elsewhere candle matmuls.
pub(crate) fn matmul_conv_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    cols: impl FnOnce(&Tensor) -> Result<Tensor>,
    uncols: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let n = x.dim(0)?;
    let (cout, cin, kh, kw) = w.dims4()?;
    let (_, _, ho, wo) = grad.dims4()?;
    let g = grad.detach().contiguous()?.reshape((n, cout, ho * wo))?;
    let sgemm = x.device().is_cpu()
        && [x.dtype(), w.dtype(), grad.dtype()]
            .iter()
            .all(|&d| d == DType::F32);
    let dw = if w.track_op() {
        let c = cols(&x.detach())?;
        let dw = if sgemm {
            let c = c.contiguous()?;
            crate::profile::record(
                "conv weight grad (bwd)",
                || format!("{cout}x{} over {n}x{}", c.dim(1).unwrap_or(0), ho * wo),
                || g.apply_op2_no_bwd(&c, &GradWeight),
            )?
        } else {
            let dw = g.matmul(&c.t()?)?;
            if n == 1 {
                dw.squeeze(0)?
            } else {
                dw.sum(0)?
            }
        };
        Some(dw.reshape((cout, cin, kh, kw))?)
    } else {
        None
    };
    let dx = if x.track_op() {
        let w2 = w.detach().reshape((cout, cin * kh * kw))?;
        let dcols = if sgemm {
            let w2 = w2.contiguous()?;
            crate::profile::record(
                "conv input grad (bwd)",
                || format!("{}x{cout} over {n}x{}", cin * kh * kw, ho * wo),
                || w2.apply_op2_no_bwd(&g, &GradInput),
            )?
        } else {
            w2.t()?.broadcast_left(n)?.matmul(&g)?
        };
        Some(uncols(&dcols)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// `sum_b g_b · c_bᵀ` for `g: [n, m, l]` and `c: [n, kk, l]`: a convolution's weight gradient
/// `[m, kk]` from the output gradient and the patch matrices, one sgemm per image accumulating
/// into its image group's partial sum (the batch sum continues each element's FMA chain within
/// a group; with several workers each group is one worker's, see [`image_groups`]), the groups'
/// sums then added in order.
struct GradWeight;

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "conv-weight-grad-sgemm"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m, l) = gl.shape().dims3()?;
        let (nc, kk, lc) = cl.shape().dims3()?;
        if (nc, lc) != (n, l) {
            bail!(
                "conv weight gradient: output gradient {:?} does not fit patches {:?}",
                gl.dims(),
                cl.dims()
            )
        }
        let g = f32_slice(self.name(), gs, gl)?;
        let c = f32_slice(self.name(), cs, cl)?;
        if n == 0 {
            return Ok((CpuStorage::F32(vec![0f32; m * kk]), Shape::from((m, kk))));
        }
        // One partial sum per image group (see `image_groups`), each written by its group's
        // first product and accumulated into by the rest, then added up in group order (the
        // same bits on every run). The product packs its `B` operand (a transposing copy per
        // block) and computes whole 48-column panels: it runs transposed, `c_b · g_bᵀ`
        // (`kk x m`), when that orientation costs less by `product_cost`, and the partial sums
        // are then transposed as they are added up. Each element is the same FMA chain over
        // the pixels either way. Untransposed, the first group's sum is `out` itself.
        let transposed = product_cost(kk, m) < product_cost(m, kk);
        let groups = image_groups(n);
        let threads = if groups.len() == 1 { threads() } else { 1 };
        let size = m * kk;
        let in_out = usize::from(!transposed);
        let mut out: Vec<f32> = Vec::with_capacity(size);
        let mut partial: Vec<f32> = Vec::with_capacity((groups.len() - in_out) * size);
        let dst = (Ptr(out.as_mut_ptr()), Ptr(partial.as_mut_ptr()));
        groups.par_iter().enumerate().for_each(|(gi, images)| {
            let sum = match (gi, transposed) {
                (0, false) => dst.0.get(),
                _ => dst.1.get().wrapping_add((gi - in_out) * size),
            };
            for b in images.clone() {
                let (gb, cb) = (
                    g.as_ptr().wrapping_add(b * m * l),
                    c.as_ptr().wrapping_add(b * kk * l),
                );
                // `g_b · c_bᵀ` (`m x kk`), or transposed `c_b · g_bᵀ` (`kk x m`).
                let (dims, a, bop, ldc) = if transposed {
                    (
                        (kk, m, l),
                        RawOperand::rows(cb, l),
                        RawOperand::cols(gb, l),
                        m,
                    )
                } else {
                    (
                        (m, kk, l),
                        RawOperand::rows(gb, l),
                        RawOperand::cols(cb, l),
                        kk,
                    )
                };
                // SAFETY: image `b` of `g` is an `m x l` row-major matrix and of `c` a `kk x l`
                // row-major one (each also read as the column-major transpose); `sum` is this
                // group's own `m * kk` block of `out` or `partial` (inside its capacity),
                // written by the group's first product and accumulated into by the others.
                unsafe { sgemm_raw_ex(dims, a, bop, (sum, ldc), b > images.start, None, threads) }
            }
        });
        // SAFETY: each group's first product wrote all of its block.
        unsafe { partial.set_len((groups.len() - in_out) * size) };
        if transposed {
            // out[i][j] = sum over groups of partial[j][i], rows of `out` in parallel.
            let parts: Vec<&[f32]> = partial.chunks_exact(size).collect();
            out.spare_capacity_mut()
                .par_chunks_mut(kk)
                .enumerate()
                .for_each(|(i, row)| {
                    for (j, o) in row.iter_mut().enumerate() {
                        let mut v = parts[0][j * m + i];
                        for p in &parts[1..] {
                            v += p[j * m + i];
                        }
                        o.write(v);
                    }
                });
            // SAFETY: every row was written.
            unsafe { out.set_len(size) };
        } else {
            // SAFETY: the first group's product wrote all of `out`.
            unsafe { out.set_len(size) };
            const CHUNK: usize = 1 << 14;
            if !partial.is_empty() {
                out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
                    for p in partial.chunks_exact(size) {
                        for (o, p) in o.iter_mut().zip(&p[i * CHUNK..]) {
                            *o += p;
                        }
                    }
                });
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, kk))))
    }
}

/// The relative cost per depth step of a `rows x cols` product whose `B` operand is packed
/// by a transposing copy: the tiles computed (rows in 8-row panels, columns in whole 48-column
/// panels, as [`crate::sgemm`]'s kernel runs them) plus the packing, counted as 64 multiply-adds
/// per packed value (a transposing copy costs a cycle or two per value, a multiply-add a 32nd
/// of one). Measured on MobileNetV2's weight gradients over 4 x 81 x 81 pixels: 21 x 256 and
/// 48 x 144 run ~25% faster transposed, 144 x 24 ~8% slower (the model picks both right;
/// 96 x 16 is a tie in the model and in the measurement).
fn product_cost(rows: usize, cols: usize) -> usize {
    let cols = cols.next_multiple_of(crate::sgemm::NR);
    (rows.next_multiple_of(crate::sgemm::MR) + 64) * cols
}

/// `wᵀ · g_b` for `w: [m, kk]` and each image of `g: [n, m, l]`: the gradient of a
/// convolution's patch matrices `[n, kk, l]` (of its input, for a 1x1 convolution).
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "conv-input-grad-sgemm"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, kk) = wl.shape().dims2()?;
        let (n, mg, l) = gl.shape().dims3()?;
        if mg != m {
            bail!(
                "conv input gradient: weights {:?} do not fit output gradient {:?}",
                wl.dims(),
                gl.dims()
            )
        }
        let w = f32_slice(self.name(), ws, wl)?;
        let g = f32_slice(self.name(), gs, gl)?;
        let len = n * kk * l;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = Ptr(out.as_mut_ptr());
        per_image(n, |b, threads| {
            // SAFETY: `w` is `m x kk` row-major, read as the column-major `kk x m` matrix
            // `wᵀ`; image `b` of `g` is `m x l` row-major; image `b`'s `kk x l` block of `out`
            // lies inside its capacity and is only written (by this call alone).
            unsafe {
                sgemm_raw_ex(
                    (kk, l, m),
                    RawOperand::cols(w.as_ptr(), kk),
                    RawOperand::rows(g.as_ptr().add(b * m * l), l),
                    (dst.get().add(b * kk * l), l),
                    false,
                    None,
                    threads,
                )
            }
        });
        // SAFETY: the products wrote all `len` elements (m = 0 writes zeros).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, kk, l))))
    }
}

/// `act(conv2d(x, w) * scale[o] + shift[o])` as im2col + gemm with the epilogue applied to each
/// chunk while it is in cache, for an f32 CPU convolution with one group (inference only; the
/// result equals the unfused convolution followed by [`crate::channel_affine`] bit for bit).
pub(crate) fn conv_gemm_epilogue(
    x: &Tensor,
    w: &Tensor,
    geom: &Conv2dGeometry,
    (scale, shift): (&[f32], &[f32]),
    act: crate::Activation,
) -> Result<Tensor> {
    let op = ConvGemm {
        geom: *geom,
        epi: Some((scale.to_vec(), shift.to_vec(), act)),
        pointwise: false,
    };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// `act(conv2d(x, w) * scale + shift + residual)` for an f32 CPU convolution with one group,
/// `residual` shaped like the output, in one pass over the output (inference only; the same
/// bits as the folded convolution without activation, an add and the activation).
pub(crate) fn conv_residual_epilogue(
    x: &Tensor,
    w: &Tensor,
    geom: &Conv2dGeometry,
    (scale, shift): (&[f32], &[f32]),
    act: crate::Activation,
    residual: &Tensor,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let op = ConvResidual(ConvGemm {
        geom: *geom,
        epi: Some((scale.to_vec(), shift.to_vec(), act)),
        pointwise: geom.is_pointwise((kh, kw)),
    });
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &residual.contiguous()?, &op)
}

/// [`ConvGemm`] on f32, or through f32 for f16 and bf16.
fn conv_gemm(x: &Tensor, w: &Tensor, geom: &Conv2dGeometry) -> Result<Tensor> {
    let op = ConvGemm {
        geom: *geom,
        epi: None,
        pointwise: false,
    };
    let w32 = w.to_dtype(DType::F32)?.contiguous()?;
    match x.dtype() {
        DType::F32 => x.contiguous()?.apply_op2(&w32, op),
        _ => x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op2(&w32, op)?
            .to_dtype(x.dtype()),
    }
}

/// 2-D convolution of an NCHW tensor with weights `[Cout, Cin / groups, kh, kw]`, optional bias
/// `[Cout]`, and any [`Conv2dGeometry`], with gradients for input, weight and bias.
///
/// On the CPU with one group (f32, f16, bf16) it runs as im2col + gemm, for any stride, dilation
/// and asymmetric padding; grouped convolutions, f64 and other devices go through candle's
/// conv2d, which needs equal strides and dilations on both axes.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use deeplab_ops::{conv2d, Conv2dGeometry};
/// let x = Tensor::ones((1, 3, 10, 9), DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((8, 3, 3, 3), DType::F32, &Device::Cpu)?;
/// // TF DeepLab's strided convolution: fixed padding (1, 1), stride 2.
/// let y = conv2d(&x, &w, None, &Conv2dGeometry::deeplab(3, 2, 1), 1)?;
/// assert_eq!(y.dims(), &[1, 8, 5, 5]);
/// assert_eq!(y.get(0)?.get(0)?.get(2)?.get(2)?.to_scalar::<f32>()?, 27.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
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
    let y = if geom.is_pointwise((kh, kw)) && groups == 1 {
        if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
            crate::pointwise::pointwise(x, w)?
        } else {
            let wm = w.reshape((cout, cin))?;
            wm.broadcast_left(n)?
                .matmul(&x.reshape((n, cin, h * wd))?)?
                .reshape((n, cout, h, wd))?
        }
    } else if groups == 1
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        conv_gemm(x, w, geom)?
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Conv2dGeometry;

    /// The dispatcher's Winograd tile on DeepLab's 3x3 shapes: F(4x4) on the 33x33 to 129x129
    /// maps at rates 1 and 2, F(2x2) on tiny maps, neither on the ASPP's large rates, strided
    /// convs or few channels.
    #[test]
    fn winograd_tile_per_shape() -> Result<()> {
        if std::env::var_os("DEEPLAB_WINOGRAD").is_some() {
            return Ok(());
        }
        let tile = |size: usize, rate: usize, stride: usize, (cin, cout)| -> Result<usize> {
            let geom = Conv2dGeometry::deeplab(3, stride, rate);
            let p = Patches::new((size, size), (3, 3), &geom)?;
            Ok(winograd_tile(&p, (cin, cout), direct_path(&p, false).1))
        };
        assert_eq!(tile(129, 1, 1, (304, 256))?, 4);
        assert_eq!(tile(129, 1, 1, (64, 64))?, 4);
        assert_eq!(tile(65, 1, 1, (128, 128))?, 4);
        assert_eq!(tile(33, 1, 1, (256, 256))?, 4);
        assert_eq!(tile(33, 2, 1, (512, 512))?, 4);
        assert_eq!(tile(9, 1, 1, (256, 256))?, 2);
        assert_eq!(tile(33, 6, 1, (2048, 256))?, 0);
        assert_eq!(tile(33, 18, 1, (2048, 256))?, 0);
        assert_eq!(tile(129, 1, 2, (256, 256))?, 0);
        assert_eq!(tile(129, 1, 1, (16, 256))?, 0);
        Ok(())
    }

    /// The per-image products of the 1x1 forward, the input gradient and the batch-summed
    /// weight gradient against f64 sums, on pools of 1, 2 and 3 workers and batches that split
    /// evenly, unevenly and not at all over them (images one per worker, the rest on all
    /// workers; the weight gradient's per-group partial sums added up).
    #[test]
    fn per_image_products_match_plain_sums() -> Result<()> {
        for (m, kk, l) in [(20, 13, 37), (13, 20, 37)] {
            for workers in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(workers)
                    .build()
                    .expect("a rayon pool");
                for n in [1, 2, 3, 5] {
                    let dev = candle_core::Device::Cpu;
                    let uniform = crate::reference::seeded_uniform;
                    let gt = uniform(&[n, m, l], 1, &dev)?;
                    let ct = uniform(&[n, kk, l], 2, &dev)?;
                    let wt = uniform(&[m, kk], 3, &dev)?;
                    let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                    let (g, c, w) = (values(&gt)?, values(&ct)?, values(&wt)?);
                    let (dw, dc, y) = pool.install(|| -> Result<_> {
                        let y = forward_f32(
                            (&c, &Shape::from((n, kk, l, 1))),
                            (&w, &Shape::from((m, kk, 1, 1))),
                            &Conv2dGeometry::same(1, 1),
                            None,
                            None,
                            true,
                        )?
                        .0;
                        Ok((
                            gt.apply_op2_no_bwd(&ct, &GradWeight)?.to_vec2::<f32>()?,
                            wt.apply_op2_no_bwd(&gt, &GradInput)?.to_vec3::<f32>()?,
                            y,
                        ))
                    })?;
                    let what = format!("{m}x{kk}, {workers} workers, {n} images");
                    let close = |a: f32, b: f64, at: &str| {
                        assert!(
                            (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{what}, {at}: {a} vs {b}"
                        )
                    };
                    for i in 0..m {
                        for j in 0..kk {
                            let want: f64 = (0..n * l)
                                .map(|q| {
                                    let (b, p) = (q / l, q % l);
                                    g[(b * m + i) * l + p] as f64 * c[(b * kk + j) * l + p] as f64
                                })
                                .sum();
                            close(dw[i][j], want, &format!("dW[{i}][{j}]"));
                        }
                    }
                    for b in 0..n {
                        for p in 0..l {
                            for j in 0..kk {
                                let want: f64 = (0..m)
                                    .map(|i| w[i * kk + j] as f64 * g[(b * m + i) * l + p] as f64)
                                    .sum();
                                close(dc[b][j][p], want, &format!("dX[{b}][{j}][{p}]"));
                            }
                            for i in 0..m {
                                let want: f64 = (0..kk)
                                    .map(|j| w[i * kk + j] as f64 * c[(b * kk + j) * l + p] as f64)
                                    .sum();
                                close(y[(b * m + i) * l + p], want, &format!("y[{b}][{i}][{p}]"));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
