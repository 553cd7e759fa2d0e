//! Winograd F(4x4, 3x3) for 3x3 stride-1 convolutions (any dilation, by phases as in the parent
//! module): each 4x4 output tile costs 36 multiplies per channel pair where F(2x2, 3x3) spends
//! 64 on the same outputs and a direct sum 144, so the products shrink another 1.6-1.8x on
//! DeepLab's maps.
//!
//! The interpolation points are 0, 1, -1, 2, -1/2 and infinity: of the point sets with small
//! transform entries, the one with the smallest rounding error (a numpy comparison of 0, ±1, ±2
//! / 0, ±1, ±1/2 / 0, ±1, 2, -1/2 / ...: 2.7e-6 of the output's largest magnitude on a 256-deep
//! sum against 6.9e-6 for Lavin & Gray's 0, ±1, ±2). That is several times the error of a
//! direct f32 sum (test `winograd_accuracy_against_f64` prints both); `DEEPLAB_WINOGRAD=2` keeps
//! every convolution on F(2x2, 3x3) or direct sums.
//!
//! Layout and schedule follow F(2x2, 3x3): `U` is `[Cout][36][Cin]`, a block of whole tile rows
//! is transformed into `V` (`[Cin][36][tiles]`, in parallel over channels), the 36 products
//! `M_ξ = U_ξ · V_ξ` run in parallel over `ξ`, and `Y = Aᵀ M A` with the epilogue and residual
//! runs in parallel over output channels. The transforms work on whole rows of tiles: input
//! column `c` of tile `k` is entry `k + c / 4` of array `c mod 4`, so every step is a
//! vectorizable sweep along the tile row.

use super::Axis;
use crate::batch_norm::{epilogue_row, Activation};
use crate::cpu::Ptr;
use crate::im2col::Patches;
use crate::sgemm::{sgemm_raw_ex, RawOperand};
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

/// The most floats of one block's transformed input (`36 x Cin x tiles`): 8 MiB.
const V_BUDGET: usize = 2 << 20;

/// The multiplies per channel pair of this path for `p` (36 per tile).
pub(crate) fn products(p: &Patches) -> usize {
    let (dy, dx) = p.dilations();
    let (pt, pl) = p.pad_top_left();
    36 * Axis::new(4, dy, pt, p.ho).tiles * Axis::new(4, dx, pl, p.wo).tiles
}

/// The tiles per row of one column phase (the shortest phase's), the length of the transforms'
/// vector sweeps.
pub(crate) fn row_tiles(p: &Patches) -> usize {
    let (_, dx) = p.dilations();
    let (_, pl) = p.pad_top_left();
    let cols = Axis::new(4, dx, pl, p.wo);
    cols.phases
        .iter()
        .map(|&(count, _, _)| count)
        .min()
        .unwrap_or(0)
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
/// with row stride `36 * Cin`) from `k: [Cout, Cin, 3, 3]`. Each `U[ξ]` is a 9-term sum of the
/// taps with coefficients `G[ξ / 6][ty] · G[ξ % 6][tx]` computed in f64 and rounded once.
fn transform_weights(k: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let coef: [[f32; 9]; 36] = std::array::from_fn(|xi| {
        std::array::from_fn(|t| (G[xi / 6][t / 3] * G[xi % 6][t % 3]) as f32)
    });
    let mut u = vec![0f32; cout * 36 * cin];
    u.par_chunks_mut(36 * cin)
        .zip(k.par_chunks(cin * 9))
        .for_each_init(
            || vec![0f32; 9 * cin],
            |taps, (dst, src)| {
                for (c, g) in src.chunks_exact(9).enumerate() {
                    for (t, &v) in g.iter().enumerate() {
                        taps[t * cin + c] = v;
                    }
                }
                multiversion!(|| weights_of_channel(dst, taps, cin, &coef))
            },
        );
    u
}

/// `U` of one output channel: `dst` (`[36][Cin]`) from its tap-major weights (`[9][Cin]`).
#[inline(always)]
fn weights_of_channel(dst: &mut [f32], taps: &[f32], cin: usize, coef: &[[f32; 9]; 36]) {
    for (d, cf) in dst.chunks_exact_mut(cin).zip(coef) {
        d.fill(0.0);
        for (t, &c) in cf.iter().enumerate() {
            if c == 0.0 {
                continue;
            }
            for (d, &g) in d.iter_mut().zip(&taps[t * cin..(t + 1) * cin]) {
                *d = c.mul_add(g, *d);
            }
        }
    }
}

/// `Bᵀ d B` of the tiles in tile rows `[i0, i1)` of one input plane `src` (`h x w`) into `dst`
/// (`[36][tiles]`, row stride `ld`, tile `(i - i0) * cols.tiles + j`); `scratch` holds
/// `48 * cols.inputs` values.
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
    let n = cols.inputs;
    let dx = cols.d;
    // rows[r][j]: input row r of the tile row, array j (columns `c` with `c mod 4 = j`).
    let (rows, t) = scratch.split_at_mut(24 * n);
    for i in i0..i1 {
        let (a, k) = rows_axis.tile(i);
        for r in 0..6 {
            let arrays = &mut rows[4 * r * n..4 * (r + 1) * n];
            let iy = rows_axis.input(a, k, r);
            if iy < 0 || iy >= h as isize {
                arrays.fill(0.0);
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
                        arrays[j * n + off + l] = at(ix + (dx * j) as isize);
                    }
                }
                if lo == hi {
                    continue;
                }
                let start = (first + step * lo as isize) as usize;
                let (a0, rest) = arrays.split_at_mut(n);
                let (a1, rest) = rest.split_at_mut(n);
                let (a2, a3) = rest.split_at_mut(n);
                let span = off + lo..off + hi;
                let dsts = a0[span.clone()]
                    .iter_mut()
                    .zip(&mut a1[span.clone()])
                    .zip(&mut a2[span.clone()])
                    .zip(&mut a3[span]);
                if dx == 1 {
                    let inner = &row[start..start + 4 * (hi - lo)];
                    for ((((e0, e1), e2), e3), q) in dsts.zip(inner.chunks_exact(4)) {
                        (*e0, *e1, *e2, *e3) = (q[0], q[1], q[2], q[3]);
                    }
                } else {
                    for (l, (((e0, e1), e2), e3)) in dsts.enumerate() {
                        let x = start + 4 * dx * l;
                        (*e0, *e1, *e2, *e3) =
                            (row[x], row[x + dx], row[x + 2 * dx], row[x + 3 * dx]);
                    }
                }
            }
        }
        // Bᵀ d down the columns: t[j][kk] = Σ_r Bᵀ[kk][r] rows[r][j].
        for j in 0..4 {
            let src = |r: usize| &rows[(4 * r + j) * n..(4 * r + j + 1) * n];
            let (r0, r1, r2, r3, r4, r5) = (src(0), src(1), src(2), src(3), src(4), src(5));
            let [o0, o1, o2, o3, o4, o5] = slices_mut::<6>(t, n, 6 * j);
            for x in 0..n {
                let v = bt([r0[x], r1[x], r2[x], r3[x], r4[x], r5[x]]);
                (o0[x], o1[x], o2[x], o3[x], o4[x], o5[x]) = (v[0], v[1], v[2], v[3], v[4], v[5]);
            }
        }
        // (Bᵀ d) B along each column phase's row of tiles: V[6 kk + l] = Σ_c Bᵀ[l][c] t[kk][c].
        let base = (i - i0) * cols.tiles;
        for kk in 0..6 {
            let arr = |j: usize| &t[(6 * j + kk) * n..(6 * j + kk + 1) * n];
            let (a0, a1, a2, a3) = (arr(0), arr(1), arr(2), arr(3));
            let mut outs = dst[6 * kk * ld..].chunks_mut(ld);
            let mut out_rows: [&mut [f32]; 6] =
                std::array::from_fn(|_| outs.next().expect("36 rows of V"));
            for &(count, first, off) in &cols.phases {
                let (a4, a5) = (&a0[off + 1..off + count + 1], &a1[off + 1..off + count + 1]);
                let (a0, a1) = (&a0[off..off + count], &a1[off..off + count]);
                let (a2, a3) = (&a2[off..off + count], &a3[off..off + count]);
                let [o0, o1, o2, o3, o4, o5] = out_rows
                    .each_mut()
                    .map(|r| &mut r[base + first..base + first + count]);
                for x in 0..count {
                    let v = bt([a0[x], a1[x], a2[x], a3[x], a4[x], a5[x]]);
                    (o0[x], o1[x], o2[x], o3[x], o4[x], o5[x]) =
                        (v[0], v[1], v[2], v[3], v[4], v[5]);
                }
            }
        }
    }
}

/// Winograd F(4x4, 3x3) forward of image `x` (`cin x h x w`) into `out` (`cout x ho x wo`,
/// every element written), with the per-channel epilogue `act(y * scale + shift (+ residual))`
/// when given.
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
    let (dy, dx) = p.dilations();
    let (rows_axis, cols) = (Axis::new(4, dy, pt, ho), Axis::new(4, dx, pl, wo));
    let (th, tw) = (rows_axis.tiles, cols.tiles);
    if th == 0 || tw == 0 {
        return;
    }
    let u = transform_weights(k, cout, cin);
    let rows_per_block = (TILES_MAX.min(V_BUDGET / (36 * cin)) / tw).max(1);
    let most = rows_per_block.min(th) * tw;
    let mut v = vec![0f32; cin * 36 * most];
    let mut m = vec![0f32; cout * 36 * most];
    let out = Ptr(out);
    let axes = (&rows_axis, &cols);
    for i0 in (0..th).step_by(rows_per_block) {
        let i1 = (i0 + rows_per_block).min(th);
        let tiles = (i1 - i0) * tw;
        // V: [Cin][36][tiles].
        v[..cin * 36 * tiles]
            .par_chunks_mut(36 * tiles)
            .enumerate()
            .for_each_init(
                || vec![0f32; 48 * cols.inputs],
                |scratch, (c, dst)| {
                    let src = &x[c * h * w..(c + 1) * h * w];
                    multiversion!(|| transform_input(
                        src,
                        (h, w),
                        axes,
                        (i0, i1),
                        dst,
                        tiles,
                        scratch
                    ))
                },
            );
        // M_ξ = U_ξ · V_ξ, M laid out [Cout][36][tiles].
        let mp = Ptr(m.as_mut_ptr());
        let (vr, ur) = (&v, &u);
        (0..36).into_par_iter().for_each(|xi| {
            // SAFETY: `U_ξ` is `cout x cin` at offset `ξ * cin`, row stride `36 * cin`; `V_ξ`
            // `cin x tiles` at `ξ * tiles`, stride `36 * tiles`; `M_ξ` `cout x tiles` at
            // `ξ * tiles`, stride `36 * tiles`: the 36 tasks write disjoint elements.
            unsafe {
                sgemm_raw_ex(
                    (cout, tiles, cin),
                    RawOperand::rows(ur.as_ptr().add(xi * cin), 36 * cin),
                    RawOperand::rows(vr.as_ptr().add(xi * tiles), 36 * tiles),
                    (mp.get().add(xi * tiles), 36 * tiles),
                    false,
                    None,
                    1,
                )
            }
        });
        let mr = &m;
        (0..cout).into_par_iter().for_each_init(
            || vec![0f32; 40 * tw],
            |y, o| {
                let mo = &mr[o * 36 * tiles..(o + 1) * 36 * tiles];
                let base = o * ho * wo;
                // SAFETY: channel `o` of the output: inside `out`, and only the rows of this
                // block's tile rows are written, by this task alone (channels are split across
                // tasks, rows across the blocks, which run one after another).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(base), ho * wo) };
                let res = residual.map(|r| &r[base..base + ho * wo]);
                let epi = epi.map(|(s, t, act)| (s[o], t[o], act));
                multiversion!(|| output_rows(mo, axes, (i0, i1), wo, y, dst, epi, res));
            },
        );
    }
}

/// `Aᵀ M A` of one output channel's tile rows `[i0, i1)` (`mo`: `[36][tiles]`) into its output
/// plane `dst` (`ho x wo`; only those tile rows' output rows are written), through the
/// epilogue; `y` is scratch of `40 * cols.tiles`.
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
    let (z, y) = y.split_at_mut(24 * tw);
    for i in i0..i1 {
        let b = (i - i0) * tw;
        let q = |xi: usize| &mo[xi * tiles + b..xi * tiles + b + tw];
        // z[kk][j] = Σ_l Aᵀ[j][l] M[kk][l]: along each transformed row.
        for kk in 0..6 {
            let (m0, m1, m2) = (q(6 * kk), q(6 * kk + 1), q(6 * kk + 2));
            let (m3, m4, m5) = (q(6 * kk + 3), q(6 * kk + 4), q(6 * kk + 5));
            let [o0, o1, o2, o3] = slices_mut::<4>(z, tw, 4 * kk);
            for x in 0..tw {
                let v = at([m0[x], m1[x], m2[x], m3[x], m4[x], m5[x]]);
                (o0[x], o1[x], o2[x], o3[x]) = (v[0], v[1], v[2], v[3]);
            }
        }
        // y[j][r] = Σ_kk Aᵀ[r][kk] z[kk][j]: output row r of the tile row, column j of each tile.
        for j in 0..4 {
            let zz = |kk: usize| &z[(4 * kk + j) * tw..(4 * kk + j + 1) * tw];
            let (z0, z1, z2, z3, z4, z5) = (zz(0), zz(1), zz(2), zz(3), zz(4), zz(5));
            let [o0, o1, o2, o3] = slices_mut::<4>(y, tw, 4 * j);
            for x in 0..tw {
                let v = at([z0[x], z1[x], z2[x], z3[x], z4[x], z5[x]]);
                (o0[x], o1[x], o2[x], o3[x]) = (v[0], v[1], v[2], v[3]);
            }
        }
        let (a, k) = rows_axis.tile(i);
        for r in 0..4 {
            let oy = rows_axis.output(a, k, r);
            if oy >= ho {
                break;
            }
            let row = &mut dst[oy * wo..(oy + 1) * wo];
            let vals: [&[f32]; 4] =
                std::array::from_fn(|j| &y[(4 * j + r) * tw..(4 * j + r + 1) * tw]);
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
