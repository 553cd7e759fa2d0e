//! Winograd F(4x4, 3x3) for 3x3 stride-1 convolutions (any dilation, by phases as in the parent
//! module): each 4x4 output tile costs 36 multiplies per channel pair where F(2x2, 3x3) spends
//! 64 on the same outputs and a direct sum 144, so the products shrink another 1.6-1.8x on
//! DeepLab's maps.
//!
//! The interpolation points are 0, 1, -1, 2, -1/2 and infinity: of the point sets with small
//! transform entries, the one with the smallest rounding error (a numpy comparison of 0, ±1, ±2
//! / 0, ±1, ±1/2 / 0, ±1, 2, -1/2 / ...: 2.7e-6 of the output's largest magnitude on a 256-deep
//! sum against 6.9e-6 for Lavin & Gray's 0, ±1, ±2). That is several times the error of a
//! direct f32 sum (on a ResNet layer3 convolution 5.1e-6 against 3.9e-7, test
//! `winograd_accuracy_against_f64`; F(2x2, 3x3) 6.7e-7); `DEEPLAB_WINOGRAD=2` keeps every
//! convolution on F(2x2, 3x3) or direct sums, `DEEPLAB_WINOGRAD=off` on direct sums.
//!
//! Layout and schedule follow F(2x2, 3x3): `U` is `[Cout][36][Cin]`, a block of whole tile rows
//! is transformed into `V` (`[Cin][36][tiles]`, in parallel over channels), the 36 products
//! `M_ξ = U_ξ · V_ξ` run in parallel over `ξ`, and `Y = Aᵀ M A` with the epilogue and residual
//! runs in parallel over output channels. The transforms sweep the whole block: input column
//! `c` of tile `k` is entry `k + c / 4` of array `c mod 4`, and the arrays of the block's tile
//! rows lie end to end, so each step is one vectorizable pass even where a tile row is a few
//! tiles (9 on a 33x33 map).

use super::Axis;
use crate::batch_norm::{epilogue_row, Activation};
use crate::im2col::{tap_major, Patches};
use rayon::prelude::*;

/// `Bᵀ` (input transform) for the points 0, 1, -1, 2, -1/2, ∞ ([`bt`] writes it out).
#[cfg(test)]
const BT: [[f32; 6]; 6] = [
    [1.0, 1.5, -2.0, -1.5, 1.0, 0.0],
    [0.0, -1.0, -2.5, -0.5, 1.0, 0.0],
    [0.0, 1.0, 0.5, -2.5, 1.0, 0.0],
    [0.0, -0.5, -1.0, 0.5, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 1.0, 1.5, -2.0, -1.5, 1.0],
];

/// `Aᵀ` (output transform): the powers 0..4 of the points, and the point at infinity ([`at`]
/// writes it out).
#[cfg(test)]
const AT: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -0.5, 0.0],
    [0.0, 1.0, 1.0, 4.0, 0.25, 0.0],
    [0.0, 1.0, -1.0, 8.0, -0.125, 1.0],
];

/// `G` (weight transform), in f64: row `i` is `(1, a, a²) / Π_{j≠i} (a - a_j)` for point `a`.
const G: [[f64; 3]; 6] = [
    [1.0, 0.0, 0.0],
    [-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
    [1.0 / 3.0, -1.0 / 3.0, 1.0 / 3.0],
    [1.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0],
    [-16.0 / 15.0, 8.0 / 15.0, -4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// The most tiles per block (the products' column count; a tile row of a 129-wide map is 33).
const TILES_MAX: usize = 240;

/// The multiplies per channel pair of this path for `p` (36 per tile).
pub(crate) fn products(p: &Patches) -> usize {
    let (dy, dx) = p.dilations();
    let (pt, pl) = p.pad_top_left();
    36 * Axis::new(4, dy, pt, p.ho).tiles * Axis::new(4, dx, pl, p.wo).tiles
}

/// `Bᵀ x` for one column of a 6x6 input tile (the rows of [`BT`], written out so the zero and
/// ±1 entries cost nothing).
#[inline(always)]
fn bt([x0, x1, x2, x3, x4, x5]: [f32; 6]) -> [f32; 6] {
    [
        1.5f32.mul_add(x1 - x3, x0) + (x4 - 2.0 * x2),
        (-2.5f32).mul_add(x2, x4 - x1) - 0.5 * x3,
        0.5f32.mul_add(x2, x1 + x4) - 2.5 * x3,
        0.5f32.mul_add(x3 - x1, x4 - x2),
        2.0f32.mul_add(x1 - x3, x4 - x2),
        1.5f32.mul_add(x2 - x4, x1 + x5) - 2.0 * x3,
    ]
}

/// `Aᵀ m` for one column of a 6x6 product tile (the rows of [`AT`], written out).
#[inline(always)]
fn at([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (s, d) = (m1 + m2, m1 - m2);
    [
        m0 + s + m3 + m4,
        2.0f32.mul_add(m3, d) - 0.5 * m4,
        4.0f32.mul_add(m3, s) + 0.25 * m4,
        8.0f32.mul_add(m3, d) - 0.125 * m4 + m5,
    ]
}

/// `n`-long consecutive slices of `buf`: `[first, first + K)`.
#[inline(always)]
fn slices_mut<const K: usize>(buf: &mut [f32], n: usize, first: usize) -> [&mut [f32]; K] {
    let mut it = buf[first * n..(first + K) * n].chunks_exact_mut(n);
    std::array::from_fn(|_| it.next().expect("K slices"))
}

/// The transformed weights `U` (`[Cout][36][Cin]`, so `U_ξ` is a row-major `Cout x Cin` matrix
/// with row stride `36 * Cin`) from `k: [Cout, Cin, 3, 3]`: `G g` then `(G g) Gᵀ`, each a sweep
/// along the input channels; the first `cout * 36 * cin` values of the thread's reused buffer,
/// as F(2x2)'s [`super::transform_weights`].
pub(crate) fn transform_weights(k: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    // Every value of the first `cout * 36 * cin` is written below (a buffer reused from the
    // thread's last call may be longer).
    let mut u = crate::cpu::take_buf(&super::U_BUF, cout * 36 * cin);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        u[..cout * 36 * cin]
            .par_chunks_mut(36 * cin)
            .zip(k.par_chunks(cin * 9))
            // SAFETY: `dst` is one output channel's `36 * cin` values of `U`, `src` its
            // `cin * 9` weights; the CPU supports AVX-512F.
            .for_each(|(dst, src)| unsafe { avx512::weights_of_channel(dst, src, cin) });
        return u;
    }
    u[..cout * 36 * cin]
        .par_chunks_mut(36 * cin)
        .zip(k.par_chunks(cin * 9))
        .for_each_init(
            || vec![0f32; 27 * cin],
            |scratch, (dst, src)| {
                let (taps, gg) = scratch.split_at_mut(9 * cin);
                tap_major(src, 9, taps);
                multiversion!(|| weights_of_channel(dst, taps, gg, cin))
            },
        );
    u
}

/// The transforms on AVX-512, each the same operations in the same order as its scalar form
/// (so the same bits): the weight transform ([`weights_of_channel`] on 16 input channels at a
/// time, read in place: no tap-major copy, no scratch), the input transform of undilated
/// convolutions ([`transform_input`]) and the interleave of an undilated output row
/// ([`write_row`]).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Axis, G};
    use std::arch::x86_64::*;

    /// [`G`] in f32 (the scalar form's `v as f32`), as constants.
    const GF: [[f32; 3]; 6] = {
        let mut g = [[0f32; 3]; 6];
        let mut i = 0;
        while i < 6 {
            let mut t = 0;
            while t < 3 {
                g[i][t] = G[i][t] as f32;
                t += 1;
            }
            i += 1;
        }
        g
    };

    /// `Σ c_t v_t` as [`super::combine`] forms it, for a row of [`G`]: its only zero entries
    /// are the first and last rows' (`(1, 0, 0)`, `(0, 0, 1)`, test
    /// `g_zeros_are_the_end_rows`).
    #[inline(always)]
    fn combine(c: [f32; 3], v: [__m512; 3]) -> __m512 {
        // SAFETY (all arms): register arithmetic; AVX-512F is enabled by the caller.
        unsafe {
            if c[1] == 0.0 && c[2] == 0.0 {
                _mm512_mul_ps(_mm512_set1_ps(c[0]), v[0])
            } else if c[0] == 0.0 && c[1] == 0.0 {
                _mm512_mul_ps(_mm512_set1_ps(c[2]), v[2])
            } else {
                let a = _mm512_mul_ps(_mm512_set1_ps(c[0]), v[0]);
                let a = _mm512_fmadd_ps(_mm512_set1_ps(c[1]), v[1], a);
                _mm512_fmadd_ps(_mm512_set1_ps(c[2]), v[2], a)
            }
        }
    }

    /// [`super::bt`] on vectors, operation for operation (the same bits).
    #[inline(always)]
    fn bt(x: [__m512; 6]) -> [__m512; 6] {
        let [x0, x1, x2, x3, x4, x5] = x;
        // SAFETY: register arithmetic; AVX-512F is enabled by the caller.
        unsafe {
            let c = _mm512_set1_ps;
            let (add, sub, mul, fma) =
                (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_fmadd_ps);
            [
                add(fma(c(1.5), sub(x1, x3), x0), sub(x4, mul(c(2.0), x2))),
                sub(fma(c(-2.5), x2, sub(x4, x1)), mul(c(0.5), x3)),
                sub(fma(c(0.5), x2, add(x1, x4)), mul(c(2.5), x3)),
                fma(c(0.5), sub(x3, x1), sub(x4, x2)),
                fma(c(2.0), sub(x1, x3), sub(x4, x2)),
                sub(fma(c(1.5), sub(x2, x4), add(x1, x5)), mul(c(2.0), x3)),
            ]
        }
    }

    /// `dst[4 l + j] = vals[j][l]` for every `4 l + j < dst.len()` (an undilated row of
    /// output tiles, [`super::write_row`]): 16 tiles at a time, the four values interleaved in
    /// 128-bit lanes and the lanes transposed across the four vectors.
    ///
    /// # Safety
    /// Each `vals[j]` holds `dst.len().div_ceil(4)` values; the CPU supports AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave4(dst: &mut [f32], vals: [&[f32]; 4]) {
        let wo = dst.len();
        let tiles = wo.div_ceil(4);
        assert!(
            vals.iter().all(|v| v.len() >= tiles),
            "winograd: too few tile values"
        );
        for l0 in (0..tiles).step_by(16) {
            let m: __mmask16 = ((1u32 << (tiles - l0).min(16)) - 1) as __mmask16;
            // SAFETY: tiles `l0..l0 + 16` of each `vals[j]`, masked to `tiles` (asserted).
            let [a, b, c, d] =
                vals.map(|v| unsafe { _mm512_maskz_loadu_ps(m, v.as_ptr().add(l0)) });
            let (ab_lo, ab_hi) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let (cd_lo, cd_hi) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            let pd = _mm512_castps_pd;
            let ps = _mm512_castpd_ps;
            // `v[k]`: 128-bit lane `q` holds tile `4 q + k`'s four values.
            let v = [
                ps(_mm512_unpacklo_pd(pd(ab_lo), pd(cd_lo))),
                ps(_mm512_unpackhi_pd(pd(ab_lo), pd(cd_lo))),
                ps(_mm512_unpacklo_pd(pd(ab_hi), pd(cd_hi))),
                ps(_mm512_unpackhi_pd(pd(ab_hi), pd(cd_hi))),
            ];
            let s0 = _mm512_shuffle_f32x4::<0x44>(v[0], v[1]);
            let s1 = _mm512_shuffle_f32x4::<0x44>(v[2], v[3]);
            let s2 = _mm512_shuffle_f32x4::<0xee>(v[0], v[1]);
            let s3 = _mm512_shuffle_f32x4::<0xee>(v[2], v[3]);
            let out = [
                _mm512_shuffle_f32x4::<0x88>(s0, s1),
                _mm512_shuffle_f32x4::<0xdd>(s0, s1),
                _mm512_shuffle_f32x4::<0x88>(s2, s3),
                _mm512_shuffle_f32x4::<0xdd>(s2, s3),
            ];
            for (k, o) in out.into_iter().enumerate() {
                let at = 4 * l0 + 16 * k;
                if at >= wo {
                    break;
                }
                let m: __mmask16 = ((1u32 << (wo - at).min(16)) - 1) as __mmask16;
                // SAFETY: outputs `at..at + 16` masked to `wo`.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().add(at), m, o) };
            }
        }
    }

    /// Tiles per group of [`transform_input_d1`]: the 4 x 12 + 2 input columns of 12 tiles
    /// fit four vectors.
    const GROUP: usize = 12;

    /// [`super::transform_input`] for an undilated convolution, 12 tiles of a tile row at a
    /// time: the group's six input rows are loaded as four vectors each (columns outside the
    /// plane masked to zero), `Bᵀ d` is taken down the columns on whole vectors, and each of
    /// its six rows is split into the four column phases by two-source permutes (lanes
    /// `l = 0..12` of phase `j` hold column `4 l + j`; columns `4 l + 4`, `4 l + 5` are phases
    /// 0 and 1 moved down a lane) for `(Bᵀ d) B` across the tiles. The same operations in the
    /// same order as the scalar form, so `V` is the same bits.
    ///
    /// # Safety
    /// As [`super::transform_input`] (`dst` holds rows `0..36` of `ld` values, each with the
    /// block's tiles); the CPU supports AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_input_d1(
        src: &[f32],
        (h, w): (usize, usize),
        (rows_axis, cols): (&Axis, &Axis),
        (i0, i1): (usize, usize),
        dst: &mut [f32],
        ld: usize,
    ) {
        let tw = cols.tiles;
        assert!(
            src.len() >= h * w && dst.len() >= 35 * ld + (i1 - i0) * tw && ld >= (i1 - i0) * tw,
            "winograd input transform: plane or output too small"
        );
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // Phase `j`: lane `l` takes element `4 (l mod 8) + j` of a vector pair.
        let phase: [__m512i; 4] = std::array::from_fn(|j| {
            _mm512_add_epi32(
                _mm512_slli_epi32::<2>(_mm512_and_si512(iota, _mm512_set1_epi32(7))),
                _mm512_set1_epi32(j as i32),
            )
        });
        // `Bᵀ d` of the group: row `kk`, 64 columns.
        let mut t = [[_mm512_setzero_ps(); 4]; 6];
        for i in i0..i1 {
            let base = (i - i0) * tw;
            // The offsets of the tile row's six input rows in the plane (`None`: padding).
            let rows: [Option<isize>; 6] = std::array::from_fn(|r| {
                let iy = rows_axis.input(0, i, r);
                (0..h as isize).contains(&iy).then_some(iy * w as isize)
            });
            for l0 in (0..tw).step_by(GROUP) {
                let col0 = cols.input(0, l0, 0);
                // Lanes of vector `v` whose columns lie inside the row.
                let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                    let c =
                        _mm512_add_epi32(_mm512_set1_epi32((col0 + 16 * v as isize) as i32), iota);
                    _mm512_cmplt_epu32_mask(c, _mm512_set1_epi32(w as i32))
                });
                for (v, &mask) in masks.iter().enumerate() {
                    let x: [__m512; 6] = std::array::from_fn(|r| match rows[r] {
                        Some(row) if mask != 0 => {
                            let at = row + col0 + 16 * v as isize;
                            // SAFETY: the mask keeps the lanes whose columns lie in the row, a
                            // row of the plane.
                            unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_offset(at)) }
                        }
                        _ => _mm512_setzero_ps(),
                    });
                    for (kk, y) in bt(x).into_iter().enumerate() {
                        t[kk][v] = y;
                    }
                }
                let live = (tw - l0).min(GROUP);
                let store: __mmask16 = ((1u32 << live) - 1) as __mmask16;
                for (kk, row) in t.iter().enumerate() {
                    let e: [__m512; 4] = std::array::from_fn(|j| {
                        let lo = _mm512_permutex2var_ps(row[0], phase[j], row[1]);
                        let hi = _mm512_permutex2var_ps(row[2], phase[j], row[3]);
                        _mm512_mask_mov_ps(lo, 0xff00, hi)
                    });
                    // Columns `4 l + 4` and `4 l + 5`: phases 0 and 1 of tile `l + 1`.
                    let down = |v: __m512| {
                        _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                            _mm512_setzero_si512(),
                            _mm512_castps_si512(v),
                        ))
                    };
                    let y = bt([e[0], e[1], e[2], e[3], down(e[0]), down(e[1])]);
                    for (b, y) in y.into_iter().enumerate() {
                        // SAFETY: row `6 kk + b` of `dst`, the group's `live` tiles of tile row
                        // `i` (sizes asserted above).
                        unsafe {
                            _mm512_mask_storeu_ps(
                                dst.as_mut_ptr().add((6 * kk + b) * ld + base + l0),
                                store,
                                y,
                            )
                        };
                    }
                }
            }
        }
    }

    /// `U` of one output channel: `dst` (`[36][Cin]`) from its weights `src` (`[Cin][3][3]`).
    ///
    /// # Safety
    /// `dst` holds `36 * cin` values and `src` `9 * cin`; the CPU supports AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weights_of_channel(dst: &mut [f32], src: &[f32], cin: usize) {
        assert!(dst.len() >= 36 * cin && src.len() >= 9 * cin);
        for c in (0..cin).step_by(16) {
            let n = (cin - c).min(16);
            let m: __mmask16 = ((1u32 << n) - 1) as __mmask16;
            // Channel `c + l`'s nine taps as row `l`, transposed: tap `t` of the 16 channels
            // is row `t`.
            let row = |l: usize| {
                // SAFETY: the nine taps of channel `c + l`, inside `src` for `l < n`.
                unsafe { _mm512_maskz_loadu_ps(0x1ff, src.as_ptr().add(9 * (c + l))) }
            };
            let rows: [__m512; 16] = if n == 16 {
                std::array::from_fn(row)
            } else {
                std::array::from_fn(|l| if l < n { row(l) } else { _mm512_setzero_ps() })
            };
            let taps = crate::sgemm::transpose16(rows);
            for (i, gi) in GF.iter().enumerate() {
                // Row `i` of `G g`: one vector per kernel column.
                let gg: [__m512; 3] =
                    std::array::from_fn(|tx| combine(*gi, [taps[tx], taps[3 + tx], taps[6 + tx]]));
                for (j, gj) in GF.iter().enumerate() {
                    let u = combine(*gj, gg);
                    // SAFETY: row `6 i + j`, channels `c..c + n` (length asserted).
                    unsafe {
                        _mm512_mask_storeu_ps(dst.as_mut_ptr().add((6 * i + j) * cin + c), m, u)
                    };
                }
            }
        }
    }
}

/// `out = Σ c_t src_t` over the terms with a nonzero coefficient (none: zeros).
#[inline(always)]
fn combine(out: &mut [f32], terms: [(f32, &[f32]); 3]) {
    let mut first = true;
    for (c, src) in terms {
        if c == 0.0 {
            continue;
        }
        let src = &src[..out.len()];
        if first {
            for (o, &v) in out.iter_mut().zip(src) {
                *o = c * v;
            }
            first = false;
        } else {
            for (o, &v) in out.iter_mut().zip(src) {
                *o = c.mul_add(v, *o);
            }
        }
    }
    if first {
        out.fill(0.0);
    }
}

/// `U` of one output channel: `dst` (`[36][Cin]`) from its tap-major weights `taps`
/// (`[9][Cin]`, tap `3 ty + tx`), through `gg` (`[6][3][Cin]`: `G g`).
#[inline(always)]
fn weights_of_channel(dst: &mut [f32], taps: &[f32], gg: &mut [f32], cin: usize) {
    let g: [[f32; 3]; 6] = G.map(|row| row.map(|v| v as f32));
    let tap = |t: usize| &taps[t * cin..(t + 1) * cin];
    for (i, gi) in g.iter().enumerate() {
        for tx in 0..3 {
            let out = &mut gg[(3 * i + tx) * cin..(3 * i + tx + 1) * cin];
            combine(
                out,
                [(gi[0], tap(tx)), (gi[1], tap(3 + tx)), (gi[2], tap(6 + tx))],
            );
        }
    }
    for i in 0..6 {
        let row = |tx: usize| &gg[(3 * i + tx) * cin..(3 * i + tx + 1) * cin];
        for (j, gj) in g.iter().enumerate() {
            let out = &mut dst[(6 * i + j) * cin..(6 * i + j + 1) * cin];
            combine(out, [(gj[0], row(0)), (gj[1], row(1)), (gj[2], row(2))]);
        }
    }
}

/// `Bᵀ d B` of the tiles in tile rows `[i0, i1)` of one input plane `src` (`h x w`) into `dst`
/// (`[36][tiles]`, row stride `ld`, tile `(i - i0) * cols.tiles + j`); `scratch` holds
/// `54 * (i1 - i0) * cols.inputs` values.
///
/// The input arrays of all the block's tile rows are laid end to end, so both passes sweep the
/// whole block at once (a tile row alone is a few tiles on small maps): the second pass also
/// computes one meaningless value at the end of each phase's arrays, which is not copied out.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transform_input(
    src: &[f32],
    (h, w): (usize, usize),
    (rows_axis, cols): (&Axis, &Axis),
    (i0, i1): (usize, usize),
    dst: &mut [f32],
    ld: usize,
    scratch: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if rows_axis.d == 1 && cols.d == 1 && crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is available; the arguments are this function's.
        unsafe { avx512::transform_input_d1(src, (h, w), (rows_axis, cols), (i0, i1), dst, ld) };
        return;
    }
    scalar_input(src, (h, w), (rows_axis, cols), (i0, i1), dst, ld, scratch)
}

/// [`transform_input`] on plain arrays, any dilation (see there).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scalar_input(
    src: &[f32],
    (h, w): (usize, usize),
    (rows_axis, cols): (&Axis, &Axis),
    (i0, i1): (usize, usize),
    dst: &mut [f32],
    ld: usize,
    scratch: &mut [f32],
) {
    let n = cols.inputs;
    let dx = cols.d;
    let tb = i1 - i0;
    let len = tb * n;
    // rows[r][j][ti]: input row r of tile row i0 + ti, array j (columns `c` with `c mod 4 = j`).
    let (rows, rest) = scratch.split_at_mut(24 * len);
    let (t, tmp) = rest.split_at_mut(24 * len);
    for (ti, i) in (i0..i1).enumerate() {
        let (a, k) = rows_axis.tile(i);
        for r in 0..6 {
            let arr = |j: usize| ((4 * r + j) * tb + ti) * n;
            let iy = rows_axis.input(a, k, r);
            if iy < 0 || iy >= h as isize {
                for j in 0..4 {
                    rows[arr(j)..arr(j) + n].fill(0.0);
                }
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
            for (b, &(count, _, off)) in cols.phases.iter().enumerate() {
                // Entry `l` holds columns `first + step l + dx j`, `j = 0..4`; `[lo, hi)` are
                // the entries whose four columns all lie inside the row.
                let first = cols.input(b, 0, 0);
                let step = 4 * dx as isize;
                let lo = if first >= 0 {
                    0
                } else {
                    ((-first) as usize).div_ceil(4 * dx)
                }
                .min(count + 1);
                let last_ok = w as isize - 1 - 3 * dx as isize - first;
                let hi = if last_ok < 0 {
                    lo
                } else {
                    (last_ok / step + 1).clamp(lo as isize, (count + 1) as isize) as usize
                };
                for l in (0..lo).chain(hi..count + 1) {
                    let ix = first + step * l as isize;
                    for j in 0..4 {
                        rows[arr(j) + off + l] = at(ix + (dx * j) as isize);
                    }
                }
                if lo == hi {
                    continue;
                }
                let start = (first + step * lo as isize) as usize;
                let [a0, a1, a2, a3] = std::array::from_fn(|j| arr(j) + off);
                if dx == 1 {
                    let inner = &row[start..start + 4 * (hi - lo)];
                    for (l, q) in (lo..hi).zip(inner.chunks_exact(4)) {
                        rows[a0 + l] = q[0];
                        rows[a1 + l] = q[1];
                        rows[a2 + l] = q[2];
                        rows[a3 + l] = q[3];
                    }
                } else {
                    for l in lo..hi {
                        let x = start + 4 * dx * (l - lo);
                        rows[a0 + l] = row[x];
                        rows[a1 + l] = row[x + dx];
                        rows[a2 + l] = row[x + 2 * dx];
                        rows[a3 + l] = row[x + 3 * dx];
                    }
                }
            }
        }
    }
    // Bᵀ d down the columns: t[j][kk] = Σ_r Bᵀ[kk][r] rows[r][j].
    for j in 0..4 {
        let src = |r: usize| &rows[(4 * r + j) * len..(4 * r + j + 1) * len];
        let (r0, r1, r2, r3, r4, r5) = (src(0), src(1), src(2), src(3), src(4), src(5));
        let [o0, o1, o2, o3, o4, o5] = slices_mut::<6>(t, len, 6 * j);
        for x in 0..len {
            let v = bt([r0[x], r1[x], r2[x], r3[x], r4[x], r5[x]]);
            (o0[x], o1[x], o2[x], o3[x], o4[x], o5[x]) = (v[0], v[1], v[2], v[3], v[4], v[5]);
        }
    }
    // (Bᵀ d) B along the arrays: entry `x` of tile `l` combines entries `x` and `x + 1`.
    let span = len - 1;
    for kk in 0..6 {
        let arr = |j: usize| &t[(6 * j + kk) * len..(6 * j + kk + 1) * len];
        let (a0, a1, a2, a3) = (arr(0), arr(1), arr(2), arr(3));
        let (a4, a5) = (&a0[1..], &a1[1..]);
        {
            let [o0, o1, o2, o3, o4, o5] = slices_mut::<6>(tmp, len, 0);
            for x in 0..span {
                let v = bt([a0[x], a1[x], a2[x], a3[x], a4[x], a5[x]]);
                (o0[x], o1[x], o2[x], o3[x], o4[x], o5[x]) = (v[0], v[1], v[2], v[3], v[4], v[5]);
            }
        }
        for l in 0..6 {
            let from = &tmp[l * len..(l + 1) * len];
            let to = &mut dst[(6 * kk + l) * ld..(6 * kk + l) * ld + tb * cols.tiles];
            for ti in 0..tb {
                for &(count, first, off) in &cols.phases {
                    to[ti * cols.tiles + first..ti * cols.tiles + first + count]
                        .copy_from_slice(&from[ti * n + off..ti * n + off + count]);
                }
            }
        }
    }
}

scheme!(
    /// F(4x4, 3x3) for [`super::run`].
    F4,
    m: 4,
    tiles_max: TILES_MAX,
    input_scratch: |rows, cols| 54 * rows * cols.inputs,
    output_scratch: |tiles, _| 40 * tiles
);

/// `Aᵀ M A` of one output channel's tile rows `[i0, i1)` (`mo`: `[36][tiles]`) into its output
/// plane `dst` (`ho x wo`; only those tile rows' output rows are written), through the
/// epilogue; `y` is scratch of `40` values per tile of the block.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_rows(
    mo: &[f32],
    (rows_axis, cols): (&Axis, &Axis),
    (i0, i1): (usize, usize),
    wo: usize,
    y: &mut [f32],
    dst: &mut [f32],
    epi: Option<(f32, f32, Activation)>,
    res: Option<&[f32]>,
) {
    let tw = cols.tiles;
    let tiles = (i1 - i0) * tw;
    let ho = dst.len() / wo;
    // The two passes sweep the whole block's tiles at once (a tile row alone is short).
    let (z, y) = y.split_at_mut(24 * tiles);
    let q = |xi: usize| &mo[xi * tiles..(xi + 1) * tiles];
    // z[kk][j] = Σ_l Aᵀ[j][l] M[kk][l]: along each transformed row.
    for kk in 0..6 {
        let (m0, m1, m2) = (q(6 * kk), q(6 * kk + 1), q(6 * kk + 2));
        let (m3, m4, m5) = (q(6 * kk + 3), q(6 * kk + 4), q(6 * kk + 5));
        let [o0, o1, o2, o3] = slices_mut::<4>(z, tiles, 4 * kk);
        for x in 0..tiles {
            let v = at([m0[x], m1[x], m2[x], m3[x], m4[x], m5[x]]);
            (o0[x], o1[x], o2[x], o3[x]) = (v[0], v[1], v[2], v[3]);
        }
    }
    // y[j][r] = Σ_kk Aᵀ[r][kk] z[kk][j]: output row r of each tile row, column j of each tile.
    for j in 0..4 {
        let zz = |kk: usize| &z[(4 * kk + j) * tiles..(4 * kk + j + 1) * tiles];
        let (z0, z1, z2, z3, z4, z5) = (zz(0), zz(1), zz(2), zz(3), zz(4), zz(5));
        let [o0, o1, o2, o3] = slices_mut::<4>(y, tiles, 4 * j);
        for x in 0..tiles {
            let v = at([z0[x], z1[x], z2[x], z3[x], z4[x], z5[x]]);
            (o0[x], o1[x], o2[x], o3[x]) = (v[0], v[1], v[2], v[3]);
        }
    }
    for i in i0..i1 {
        let b = (i - i0) * tw;
        let (a, k) = rows_axis.tile(i);
        for r in 0..4 {
            let oy = rows_axis.output(a, k, r);
            if oy >= ho {
                break;
            }
            let row = &mut dst[oy * wo..(oy + 1) * wo];
            let vals: [&[f32]; 4] =
                std::array::from_fn(|j| &y[(4 * j + r) * tiles + b..(4 * j + r) * tiles + b + tw]);
            write_row(row, cols, vals);
            if let Some((s, t, act)) = epi {
                epilogue_row(
                    row,
                    (s, t),
                    act,
                    res.map(|res| &res[oy * wo..(oy + 1) * wo]),
                );
            }
        }
    }
}

/// One output row from its tiles' four values per column tile (`vals[j][l]` at column
/// `b + 4 d l + d j` for tile `l` of column phase `b`).
#[inline(always)]
fn write_row(dst: &mut [f32], cols: &Axis, vals: [&[f32]; 4]) {
    let (d, wo) = (cols.d, dst.len());
    #[cfg(target_arch = "x86_64")]
    if d == 1 && crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is available.
        unsafe { avx512::interleave4(dst, vals) };
        return;
    }
    if d == 1 {
        for (l, quad) in dst.chunks_mut(4).enumerate() {
            for (j, o) in quad.iter_mut().enumerate() {
                *o = vals[j][l];
            }
        }
    } else {
        for (b, &(count, first, _)) in cols.phases.iter().enumerate() {
            for l in 0..count {
                for (j, v) in vals.iter().enumerate() {
                    let ox = cols.output(b, l, j);
                    if ox < wo {
                        dst[ox] = v[first + l];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values in `[-0.5, 0.5)` from a multiplicative hash of the index.
    fn hashed(n: usize) -> Vec<f32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32 - 0.5)
            .collect()
    }

    /// The AVX-512 input transform of undilated convolutions gives the scalar form's bits, on
    /// maps of a few tiles to more than one group of tiles a row, any padding, whole maps and
    /// blocks of tile rows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_input_transform_is_bit_identical() {
        if !crate::cpu::has_avx512() {
            return;
        }
        for (h, w, (pt, pl), (ho, wo)) in [
            (33, 33, (1, 1), (33, 33)),
            (65, 65, (1, 1), (65, 65)),
            (9, 11, (0, 2), (7, 11)),
            (3, 5, (1, 1), (3, 5)),
            (20, 50, (2, 0), (20, 48)),
            (129, 129, (1, 1), (129, 129)),
        ] {
            let (rows_axis, cols) = (Axis::new(4, 1, pt, ho), Axis::new(4, 1, pl, wo));
            let x = hashed(h * w);
            let th = rows_axis.tiles;
            for (i0, i1) in [(0, th), (th / 2, th)] {
                let ld = (i1 - i0) * cols.tiles + 3;
                let mut want = vec![f32::NAN; 36 * ld];
                let mut scratch = vec![0f32; 54 * (i1 - i0) * cols.inputs];
                scalar_input(
                    &x,
                    (h, w),
                    (&rows_axis, &cols),
                    (i0, i1),
                    &mut want,
                    ld,
                    &mut scratch,
                );
                let mut got = vec![f32::NAN; 36 * ld];
                // SAFETY: `got` holds 36 rows of `ld >= (i1 - i0) * tiles` values; AVX-512F.
                unsafe {
                    avx512::transform_input_d1(
                        &x,
                        (h, w),
                        (&rows_axis, &cols),
                        (i0, i1),
                        &mut got,
                        ld,
                    )
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{h}x{w} pad {pt},{pl} tile rows {i0}..{i1}"
                );
            }
        }
    }

    /// The vector interleave of an output row's tiles writes each value where the scalar one
    /// does, on rows of a few to more than 16 tiles, whole and cut.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_row_interleave_matches() {
        if !crate::cpu::has_avx512() {
            return;
        }
        for wo in [1usize, 3, 4, 5, 33, 64, 65, 129] {
            let tiles = wo.div_ceil(4);
            let vals: Vec<Vec<f32>> = (0..4)
                .map(|j| (0..tiles).map(|l| (100 * l + j) as f32).collect())
                .collect();
            let mut got = vec![f32::NAN; wo + 8];
            // SAFETY: each `vals[j]` holds `wo.div_ceil(4)` values; AVX-512F checked above.
            unsafe { avx512::interleave4(&mut got[..wo], std::array::from_fn(|j| &vals[j][..])) };
            let want: Vec<f32> = (0..wo).map(|x| (100 * (x / 4) + x % 4) as f32).collect();
            assert_eq!(got[..wo], want[..], "{wo} columns");
            assert!(
                got[wo..].iter().all(|v| v.is_nan()),
                "{wo} columns: wrote past the row"
            );
        }
    }

    /// The vector weight transform's `combine` relies on these zeros of `G` and no others.
    #[test]
    fn g_zeros_are_the_end_rows() {
        for (i, row) in G.iter().enumerate() {
            let zeros: Vec<usize> = (0..3).filter(|&t| row[t] == 0.0).collect();
            let want = match i {
                0 => vec![1, 2],
                5 => vec![0, 1],
                _ => vec![],
            };
            assert_eq!(zeros, want, "row {i} of G");
        }
    }

    /// The AVX-512 weight transform gives the scalar form's bits, for channel counts that fill
    /// whole vectors and ones that end in a partial one.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_weight_transform_is_bit_identical() {
        if !crate::cpu::has_avx512() {
            return;
        }
        for cin in [1, 7, 16, 33, 64] {
            let k = hashed(9 * cin);
            let (mut taps, mut gg) = (vec![0f32; 9 * cin], vec![0f32; 18 * cin]);
            tap_major(&k, 9, &mut taps);
            let mut want = vec![0f32; 36 * cin];
            weights_of_channel(&mut want, &taps, &mut gg, cin);
            let mut got = vec![f32::NAN; 36 * cin];
            // SAFETY: `got` holds `36 * cin` values, `k` `9 * cin`; AVX-512F checked above.
            unsafe { avx512::weights_of_channel(&mut got, &k, cin) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{cin} input channels");
        }
    }

    /// The written-out transforms are the matrices' rows, and the three matrices compute a 3-tap
    /// correlation: `Aᵀ [(G g) ⊙ (Bᵀ d)] = (Σ_k g_k d_{i+k})_i` for every `g`, `d` (checked in
    /// f64 on the unit vectors).
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn transforms_are_the_points_matrices() {
        for e in 0..6 {
            let x: [f32; 6] = std::array::from_fn(|i| if i == e { 1.0 } else { 0.0 });
            let (b, a) = (bt(x), at(x));
            for r in 0..6 {
                assert_eq!(b[r], BT[r][e], "Bᵀ[{r}][{e}]");
            }
            for r in 0..4 {
                assert_eq!(a[r], AT[r][e], "Aᵀ[{r}][{e}]");
            }
        }
        for k in 0..3 {
            for l in 0..6 {
                for i in 0..4 {
                    let y: f64 = (0..6)
                        .map(|t| AT[i][t] as f64 * G[t][k] * BT[t][l] as f64)
                        .sum();
                    let want = if l == i + k { 1.0 } else { 0.0 };
                    assert!((y - want).abs() < 1e-12, "g{k} d{l} -> y{i}: {y}");
                }
            }
        }
    }
}
