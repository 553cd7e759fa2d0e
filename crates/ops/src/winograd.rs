//! Winograd F(2x2, 3x3) convolution (Lavin & Gray 2016) for 3x3 stride-1 undilated
//! convolutions on the CPU in f32: each 2x2 output tile costs 16 multiplies per channel pair
//! instead of 36, so the products shrink 2.25x against im2col + gemm.
//!
//! With `U = G g Gᵀ` (per output/input channel pair), `V = Bᵀ d B` (per input channel and
//! 4x4 input tile) and `Y = Aᵀ M A` where `M[ξ] = Σ_c U[ξ][o][c] · V[ξ][c][t]`, the 16
//! positions `ξ` of the transformed tile are 16 independent products `U_ξ · V_ξ`
//! (`Cout x Cin` by `Cin x tiles`) on [`crate::sgemm`]. The tiles are processed in blocks of
//! whole tile rows so the transformed block stays in cache; within a block the input transform
//! runs in parallel over channels, the 16 products in parallel over `ξ`, and the output
//! transform, with the folded BatchNorm epilogue and the residual add, over output channels.
//! The transforms run along a row of tiles on the even and odd input columns, so they
//! vectorize. The rounding differs from a direct sum: on a ResNet layer3 convolution the
//! error against an f64 computation is 6.7e-7 of the output's largest magnitude, against
//! 3.9e-7 for a direct f32 sum (test `winograd_accuracy_against_f64`). The folded and unfolded
//! paths both use it, so folding still changes no bit.

use crate::batch_norm::Activation;
use crate::cpu::Ptr;
use crate::im2col::Patches;
use crate::sgemm::{sgemm_raw_ex, RawOperand};
use rayon::prelude::*;

/// The most tiles per block: the block's transformed input (`16 x Cin x tiles`) and products
/// (`16 x Cout x tiles`) are a few MiB for the channel counts of DeepLab's 3x3 convolutions.
const TILES_MAX: usize = 480;

/// Whether a convolution takes the Winograd path: a 3x3 kernel, stride 1, no dilation, and
/// enough channels on both sides for the products to dominate the transforms.
pub(crate) fn eligible(p: &Patches, cin: usize, cout: usize) -> bool {
    p.kh == 3
        && p.kw == 3
        && p.strides() == (1, 1)
        && p.dilations() == (1, 1)
        && cin >= 32
        && cout >= 32
}

/// The transformed weights `U`, laid out `[Cout][16][Cin]` (so `U_ξ` is a row-major
/// `Cout x Cin` matrix with row stride `16 * Cin`), from `k: [Cout, Cin, 3, 3]`.
fn transform_weights(k: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; cout * 16 * cin];
    u.par_chunks_mut(16 * cin)
        .zip(k.par_chunks(cin * 9))
        .for_each_init(
            || vec![0f32; 9 * cin],
            |taps, (dst, src)| {
                // Tap-major copy (`taps[t][c]`) so the transform runs along the input channels;
                // plain scalar moves (AVX-512 gathers of the stride-9 taps are slower on Zen 5).
                for (c, g) in src.chunks_exact(9).enumerate() {
                    for (t, &v) in g.iter().enumerate() {
                        taps[t * cin + c] = v;
                    }
                }
                multiversion!(|| weights_of_channel(dst, taps, cin))
            },
        );
    u
}

/// `U` of one output channel: `dst` (`[16][Cin]`) from its weights in tap-major order
/// (`taps`: `[9][Cin]`).
#[inline(always)]
fn weights_of_channel(dst: &mut [f32], taps: &[f32], cin: usize) {
    let tap = |t: usize| &taps[t * cin..(t + 1) * cin];
    for i in 0..4 {
        // Row i of G g (three vectors over the channels), then that row times Gᵀ.
        let (u, rest) = dst[4 * i * cin..].split_at_mut(cin);
        let (u1, rest) = rest.split_at_mut(cin);
        let (u2, rest) = rest.split_at_mut(cin);
        let u3 = &mut rest[..cin];
        let (t0, t1, t2) = (tap(0), tap(1), tap(2));
        let (t3, t4, t5) = (tap(3), tap(4), tap(5));
        let (t6, t7, t8) = (tap(6), tap(7), tap(8));
        for c in 0..cin {
            let gg = |a: f32, b: f32, d: f32| match i {
                0 => a,
                1 => 0.5 * (a + b + d),
                2 => 0.5 * (a - b + d),
                _ => d,
            };
            let r = [
                gg(t0[c], t3[c], t6[c]),
                gg(t1[c], t4[c], t7[c]),
                gg(t2[c], t5[c], t8[c]),
            ];
            u[c] = r[0];
            u1[c] = 0.5 * (r[0] + r[1] + r[2]);
            u2[c] = 0.5 * (r[0] - r[1] + r[2]);
            u3[c] = r[2];
        }
    }
}

/// `Bᵀ d B` of the tiles in tile rows `[ty0, ty1)` of one input plane `src` (`h x w`), into
/// `dst` laid out `[16][tiles]` with row stride `ld` (tile `(ty - ty0) * tw + tx`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transform_input(
    src: &[f32],
    (h, w): (usize, usize),
    (pt, pl): (usize, usize),
    tw: usize,
    (ty0, ty1): (usize, usize),
    dst: &mut [f32],
    ld: usize,
    scratch: &mut [f32],
) {
    // Even and odd input columns of the four rows of a tile row: column `2 * tx - pl` is
    // `even[tx]`, `2 * tx + 1 - pl` is `odd[tx]`, for `tx` in `0..=tw`.
    let n = tw + 1;
    let (rows, t) = scratch.split_at_mut(8 * n);
    for ty in ty0..ty1 {
        for r in 0..4 {
            let (e, o) = rows[2 * r * n..(2 * r + 2) * n].split_at_mut(n);
            let iy = (2 * ty + r) as isize - pt as isize;
            if iy < 0 || iy >= h as isize {
                e.fill(0.0);
                o.fill(0.0);
                continue;
            }
            let row = &src[iy as usize * w..(iy as usize + 1) * w];
            let at = |i: isize| {
                if i >= 0 && i < w as isize {
                    row[i as usize]
                } else {
                    0.0
                }
            };
            // Tiles whose two columns are both inside the row: `[lo, hi)`; the rest read
            // zeros at the edges.
            let lo = pl.div_ceil(2).min(n);
            let hi = ((w + pl) / 2).clamp(lo, n);
            for tx in (0..lo).chain(hi..n) {
                let ix = (2 * tx) as isize - pl as isize;
                e[tx] = at(ix);
                o[tx] = at(ix + 1);
            }
            if lo == hi {
                continue;
            }
            let inner = &row[2 * lo - pl..2 * hi - pl];
            for ((e, o), pair) in e[lo..hi]
                .iter_mut()
                .zip(&mut o[lo..hi])
                .zip(inner.chunks_exact(2))
            {
                *e = pair[0];
                *o = pair[1];
            }
        }
        // Bᵀ d, separately on the even and odd columns: rows k of `t` (even then odd).
        let (t, _) = t.split_at_mut(8 * n);
        {
            let row = |r: usize, odd: usize| &rows[(2 * r + odd) * n..(2 * r + odd + 1) * n];
            for odd in 0..2 {
                let (r0, r1, r2, r3) = (row(0, odd), row(1, odd), row(2, odd), row(3, odd));
                for x in 0..n {
                    t[odd * n + x] = r0[x] - r2[x];
                    t[(2 + odd) * n + x] = r1[x] + r2[x];
                    t[(4 + odd) * n + x] = r2[x] - r1[x];
                    t[(6 + odd) * n + x] = r1[x] - r3[x];
                }
            }
        }
        // (Bᵀ d) B along each row of tiles.
        let base = (ty - ty0) * tw;
        for k in 0..4 {
            let (e, o) = (
                &t[2 * k * n..(2 * k + 1) * n],
                &t[(2 * k + 1) * n..(2 * k + 2) * n],
            );
            let out = |j: usize| (4 * k + j) * ld + base;
            let (d0, rest) = dst[out(0)..].split_at_mut(ld);
            let (d1, rest) = rest.split_at_mut(ld);
            let (d2, rest) = rest.split_at_mut(ld);
            let d3 = &mut rest[..tw];
            for x in 0..tw {
                d0[x] = e[x] - e[x + 1];
                d1[x] = o[x] + e[x + 1];
                d2[x] = e[x + 1] - o[x];
                d3[x] = o[x] - o[x + 1];
            }
        }
    }
}

/// Winograd forward of image `x` (`cin x h x w`) into `out` (`cout x ho x wo`, every element
/// written), with the per-channel epilogue `act(y * scale + shift (+ residual))` when given.
///
/// # Safety
/// `out` must be writable at `cout * ho * wo` elements and not accessed by anyone else during
/// the call; `residual`, if any, holds `cout * ho * wo` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn forward(
    x: &[f32],
    (cin, cout): (usize, usize),
    k: &[f32],
    p: &Patches,
    epi: Option<(&[f32], &[f32], Activation)>,
    residual: Option<&[f32]>,
    out: *mut f32,
) {
    let (h, w, ho, wo) = (p.h, p.w, p.ho, p.wo);
    let (pt, pl) = p.pad_top_left();
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let u = transform_weights(k, cout, cin);
    let rows_per_block = (TILES_MAX / tw).max(1);
    let most = rows_per_block.min(th) * tw;
    let mut v = vec![0f32; cin * 16 * most];
    let mut m = vec![0f32; cout * 16 * most];
    let out = Ptr(out);
    for ty0 in (0..th).step_by(rows_per_block) {
        let ty1 = (ty0 + rows_per_block).min(th);
        let tiles = (ty1 - ty0) * tw;
        // V: [Cin][16][tiles].
        v[..cin * 16 * tiles]
            .par_chunks_mut(16 * tiles)
            .enumerate()
            .for_each_init(
                || vec![0f32; 16 * (tw + 1)],
                |scratch, (c, dst)| {
                    let src = &x[c * h * w..(c + 1) * h * w];
                    multiversion!(|| transform_input(
                        src,
                        (h, w),
                        (pt, pl),
                        tw,
                        (ty0, ty1),
                        dst,
                        tiles,
                        scratch
                    ))
                },
            );
        // M_ξ = U_ξ · V_ξ, M laid out [Cout][16][tiles].
        let mp = Ptr(m.as_mut_ptr());
        let (vr, ur) = (&v, &u);
        (0..16).into_par_iter().for_each(|xi| {
            // SAFETY: `U_ξ` is `cout x cin` at offset `ξ * cin`, row stride `16 * cin`; `V_ξ`
            // `cin x tiles` at `ξ * tiles`, stride `16 * tiles`; `M_ξ` `cout x tiles` at
            // `ξ * tiles`, stride `16 * tiles`: rows of different `ξ` never overlap, so the
            // 16 tasks write disjoint elements.
            unsafe {
                sgemm_raw_ex(
                    (cout, tiles, cin),
                    RawOperand::rows(ur.as_ptr().add(xi * cin), 16 * cin),
                    RawOperand::rows(vr.as_ptr().add(xi * tiles), 16 * tiles),
                    (mp.get().add(xi * tiles), 16 * tiles),
                    false,
                    None,
                    1,
                )
            }
        });
        // Y = Aᵀ M A per output channel, through the epilogue into rows
        // `[2 * ty0, min(2 * ty1, ho))`.
        let mr = &m;
        (0..cout).into_par_iter().for_each_init(
            || vec![0f32; 4 * tw],
            |y, o| {
                let mo = &mr[o * 16 * tiles..(o + 1) * 16 * tiles];
                let base = o * ho * wo;
                // SAFETY: rows `[2 * ty0, min(2 * ty1, ho))` of channel `o`: inside `out`,
                // written by this task alone (channels are split across tasks, rows across
                // blocks).
                let dst = unsafe {
                    let first = (2 * ty0) * wo;
                    let len = (2 * ty1).min(ho) * wo - first;
                    std::slice::from_raw_parts_mut(out.get().add(base + first), len)
                };
                let res = residual.map(|r| &r[base + 2 * ty0 * wo..base + (2 * ty1).min(ho) * wo]);
                let epi = epi.map(|(s, t, act)| (s[o], t[o], act));
                multiversion!(|| output_rows(mo, tiles, tw, wo, y, dst, epi, res));
            },
        );
    }
}

/// `Aᵀ M A` of one output channel's tile rows (`mo`: `[16][tiles]`, `tw` tiles per row) into
/// its output rows `dst` (`wo` wide; the last tile row may have a single output row), through
/// the epilogue; `y` is scratch of `4 * tw`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_rows(
    mo: &[f32],
    tiles: usize,
    tw: usize,
    wo: usize,
    y: &mut [f32],
    dst: &mut [f32],
    epi: Option<(f32, f32, Activation)>,
    res: Option<&[f32]>,
) {
    let rows = dst.len() / wo;
    for tr in 0..tiles / tw {
        let b = tr * tw;
        let q = |xi: usize| &mo[xi * tiles + b..xi * tiles + b + tw];
        let (y0, rest) = y.split_at_mut(tw);
        let (y1, rest) = rest.split_at_mut(tw);
        let (y2, y3) = rest.split_at_mut(tw);
        // Aᵀ M: s0 = m0 + m1 + m2, s1 = m1 - m2 - m3 (rows of the 4x4 tile); then (.) A on
        // each: [x0 + x1 + x2, x1 - x2 - x3].
        let (m00, m01, m02, m03) = (q(0), q(1), q(2), q(3));
        let (m10, m11, m12, m13) = (q(4), q(5), q(6), q(7));
        let (m20, m21, m22, m23) = (q(8), q(9), q(10), q(11));
        let (m30, m31, m32, m33) = (q(12), q(13), q(14), q(15));
        for x in 0..tw {
            let s0 = [
                m00[x] + m10[x] + m20[x],
                m01[x] + m11[x] + m21[x],
                m02[x] + m12[x] + m22[x],
                m03[x] + m13[x] + m23[x],
            ];
            let s1 = [
                m10[x] - m20[x] - m30[x],
                m11[x] - m21[x] - m31[x],
                m12[x] - m22[x] - m32[x],
                m13[x] - m23[x] - m33[x],
            ];
            y0[x] = s0[0] + s0[1] + s0[2];
            y1[x] = s0[1] - s0[2] - s0[3];
            y2[x] = s1[0] + s1[1] + s1[2];
            y3[x] = s1[1] - s1[2] - s1[3];
        }
        for (a, (ye, yo)) in [(&*y0, &*y1), (&*y2, &*y3)].into_iter().enumerate() {
            let r = 2 * tr + a;
            if r >= rows {
                break;
            }
            let row = &mut dst[r * wo..(r + 1) * wo];
            write_row(row, ye, yo, epi, res.map(|res| &res[r * wo..(r + 1) * wo]));
        }
    }
}

/// Interleaves a row of tile outputs (`even[tx]` at column `2 tx`, `odd[tx]` at `2 tx + 1`)
/// into `dst`, through the epilogue `act(v * s + t (+ r))` when given.
#[inline(always)]
fn write_row(
    dst: &mut [f32],
    even: &[f32],
    odd: &[f32],
    epi: Option<(f32, f32, Activation)>,
    res: Option<&[f32]>,
) {
    let whole = dst.len() / 2;
    for ((pair, &e), &o) in dst.chunks_exact_mut(2).zip(even).zip(odd) {
        pair[0] = e;
        pair[1] = o;
    }
    if dst.len() % 2 == 1 {
        dst[2 * whole] = even[whole];
    }
    let Some((s, t, act)) = epi else { return };
    match (res, act) {
        (None, Activation::None) => dst.iter_mut().for_each(|v| *v = v.mul_add(s, t)),
        (None, Activation::Relu) => dst.iter_mut().for_each(|v| *v = v.mul_add(s, t).max(0.0)),
        (None, Activation::Relu6) => dst
            .iter_mut()
            .for_each(|v| *v = v.mul_add(s, t).clamp(0.0, 6.0)),
        (Some(r), act) => dst
            .iter_mut()
            .zip(r)
            .for_each(|(v, r)| *v = act.scalar(v.mul_add(s, t) + r)),
    }
}
