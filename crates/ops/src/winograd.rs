//! Winograd convolution (Lavin & Gray 2016) for 3x3 stride-1 convolutions on the CPU in f32:
//! F(2x2, 3x3) here, F(4x4, 3x3) in [`f4`], both run by one driver ([`run`]) that takes a tile
//! size's transforms as a [`Scheme`]. In F(2x2, 3x3) each 2x2 output tile costs 16 multiplies
//! per channel pair instead of 36, so the products shrink 2.25x against im2col + gemm. A dilated
//! convolution is the undilated one on each phase subgrid of its output (`o mod d` per axis):
//! its tiles are 2x2 outputs `d` apart, read 4x4 inputs `d` apart, and the phases' tiles are
//! listed together, so all of them go through the same products ([`Axis`]).
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
//! 3.9e-7 for a direct f32 sum (F(4x4, 3x3): 5.1e-6; test `winograd_accuracy_against_f64`).
//! The folded and unfolded paths both use it, so folding still changes no bit. Which tile a
//! convolution gets is `crate::conv`'s choice (`DEEPLAB_WINOGRAD`, [`max_tile`]).

use crate::batch_norm::{epilogue_row, Activation};
use crate::cpu::{put_buf, take_buf, Ptr};
use crate::im2col::{tap_major, Patches};
use crate::sgemm::{sgemm_raw_ex, RawOperand};
use rayon::prelude::*;

thread_local! {
    /// The transformed weights `U` of the calling thread's last Winograd convolution (either
    /// tile size), lent out by `transform_weights` and given back by [`give_back_weights`].
    pub(crate) static U_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The input transforms `V` of [`run`].
    static V_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The products `M` of [`run`].
    static M_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Returns transformed weights from `transform_weights` for the thread's next convolution.
pub(crate) fn give_back_weights(u: Vec<f32>) {
    put_buf(&U_BUF, u);
}

/// Defines the [`Scheme`] constant `$name` from the invoking module's `transform_input` and
/// `output_rows`, each run through [`multiversion!`] in a named function (a closure coerced to a
/// function pointer was not inlined into the SIMD variant: its FMAs became libm calls).
macro_rules! scheme {
    ($(#[$doc:meta])* $name:ident, m: $m:expr, tiles_max: $tiles:expr,
     input_scratch: $is:expr, output_scratch: $os:expr) => {
        $(#[$doc])*
        pub(crate) const $name: $crate::winograd::Scheme = $crate::winograd::Scheme {
            m: $m,
            tiles_max: $tiles,
            input_scratch: $is,
            output_scratch: $os,
            input: input_pass,
            output: output_pass,
        };

        /// `transform_input` with the best SIMD set.
        fn input_pass(
            src: &[f32],
            hw: (usize, usize),
            axes: (&Axis, &Axis),
            rows: (usize, usize),
            dst: &mut [f32],
            ld: usize,
            scratch: &mut [f32],
        ) {
            multiversion!(|| transform_input(src, hw, axes, rows, dst, ld, scratch))
        }

        /// `output_rows` with the best SIMD set.
        #[allow(clippy::too_many_arguments)]
        fn output_pass(
            mo: &[f32],
            axes: (&Axis, &Axis),
            rows: (usize, usize),
            wo: usize,
            y: &mut [f32],
            dst: &mut [f32],
            epi: Option<(f32, f32, Activation)>,
            res: Option<&[f32]>,
        ) {
            multiversion!(|| output_rows(mo, axes, rows, wo, y, dst, epi, res))
        }
    };
}

pub(crate) mod f4;

/// The largest Winograd tile the dispatcher may pick: 4 (F(4x4, 3x3) where it saves enough
/// over F(2x2, 3x3)) unless the environment variable `DEEPLAB_WINOGRAD` says `2` (F(2x2, 3x3)
/// at most: its rounding is closer to a direct sum's) or `off` (direct sums only).
pub(crate) fn max_tile() -> usize {
    use std::sync::OnceLock;
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| match std::env::var("DEEPLAB_WINOGRAD").as_deref() {
        Ok("off") | Ok("0") => 0,
        Ok("2") => 2,
        _ => 4,
    })
}

/// The most tiles per block: the block's transformed input (`16 x Cin x tiles`) and products
/// (`16 x Cout x tiles`) are a few MiB for the channel counts of DeepLab's 3x3 convolutions.
const TILES_MAX: usize = 480;

/// The most floats of one block's transformed input (`(m + 2)² x Cin x tiles`): 8 MiB, so a
/// block of an ASPP branch's 2048 input channels holds a few tile rows.
const V_BUDGET: usize = 2 << 20;

/// Whether a convolution can take the Winograd path: a 3x3 kernel, stride 1 (any dilation),
/// and enough channels on both sides for the products to dominate the transforms.
pub(crate) fn eligible(p: &Patches, cin: usize, cout: usize) -> bool {
    p.kh == 3 && p.kw == 3 && p.strides() == (1, 1) && cin >= 32 && cout >= 32
}

/// The multiplies per channel pair of the Winograd path for `p` (16 per tile), to weigh against
/// the direct products (9 per output, fewer when padding taps are skipped).
pub(crate) fn products(p: &Patches) -> usize {
    let (dy, dx) = p.dilations();
    let (pt, pl) = p.pad_top_left();
    16 * Axis::new(2, dy, pt, p.ho).tiles * Axis::new(2, dx, pl, p.wo).tiles
}

/// The output tiles of `m` outputs along one axis (`m` = 2 for F(2x2, 3x3), 4 for F(4x4,
/// 3x3)). With dilation `d` the outputs split into `d` phases (`o mod d`); tile `k` of phase
/// `ph` covers outputs `ph + m d k + d j`, `j = 0..m`, and reads inputs `ph + m d k - pad + d c`,
/// `c = 0..m + 2`: an undilated F(m, 3) tile on that phase's subgrid. Tiles are listed phase by
/// phase. The transforms read a tile row's inputs from `m` arrays per phase (input `c` of tile
/// `k` is entry `k + c / m` of array `c mod m`), each of `tiles + 1` entries.
pub(crate) struct Axis {
    /// Outputs per tile.
    pub(crate) m: usize,
    pub(crate) d: usize,
    pad: usize,
    /// Per phase: (tiles, index of its first tile, offset of its input arrays, which hold
    /// `tiles + 1` entries each).
    pub(crate) phases: Vec<(usize, usize, usize)>,
    pub(crate) tiles: usize,
    /// Entries of each input array over all phases.
    pub(crate) inputs: usize,
}

impl Axis {
    pub(crate) fn new(m: usize, d: usize, pad: usize, out: usize) -> Self {
        let (mut tiles, mut inputs) = (0, 0);
        let phases = (0..d)
            .map(|ph| {
                let count = out.saturating_sub(ph).div_ceil(m * d);
                let entry = (count, tiles, inputs);
                tiles += count;
                inputs += count + 1;
                entry
            })
            .collect();
        Self {
            m,
            d,
            pad,
            phases,
            tiles,
            inputs,
        }
    }

    /// (phase, tile within the phase) of tile `i`.
    pub(crate) fn tile(&self, i: usize) -> (usize, usize) {
        for (ph, &(count, first, _)) in self.phases.iter().enumerate() {
            if i < first + count {
                return (ph, i - first);
            }
        }
        unreachable!("tile {i} of {}", self.tiles)
    }

    /// Input coordinate `c` (0..m + 2) of tile `k` of phase `ph` (negative or past the input in
    /// the padding).
    pub(crate) fn input(&self, ph: usize, k: usize, c: usize) -> isize {
        (ph + self.m * self.d * k + self.d * c) as isize - self.pad as isize
    }

    /// Output coordinate `j` (0..m) of tile `k` of phase `ph` (possibly past the output).
    pub(crate) fn output(&self, ph: usize, k: usize, j: usize) -> usize {
        ph + self.m * self.d * k + self.d * j
    }
}

/// The transformed weights `U`, laid out `[Cout][16][Cin]` (so `U_ξ` is a row-major
/// `Cout x Cin` matrix with row stride `16 * Cin`), from `k: [Cout, Cin, 3, 3]`: the first
/// `cout * 16 * cin` values of the thread's reused buffer (which may be longer; hand it back
/// with [`give_back_weights`]).
pub(crate) fn transform_weights(k: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = take_buf(&U_BUF, cout * 16 * cin);
    u[..cout * 16 * cin]
        .par_chunks_mut(16 * cin)
        .zip(k.par_chunks(cin * 9))
        .for_each_init(
            || vec![0f32; 9 * cin],
            |taps, (dst, src)| {
                // Tap-major, so the transform runs along the input channels.
                tap_major(src, 9, taps);
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

/// `Bᵀ d B` of the tiles in tile rows `[i0, i1)` of one input plane `src` (`h x w`), into
/// `dst` laid out `[16][tiles]` with row stride `ld` (tile `(i - i0) * cols.tiles + j`);
/// `scratch` holds `16 * cols.inputs` values.
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
    // The even and odd input columns of the four input rows of a tile row: for tile `l` of
    // column phase `b`, input columns `c = 0, 1, 2, 3` are `even[l]`, `odd[l]`, `even[l + 1]`,
    // `odd[l + 1]` of that phase's arrays.
    let n = cols.inputs;
    let dx = cols.d;
    let (rows, t) = scratch.split_at_mut(8 * n);
    for i in i0..i1 {
        let (a, k) = rows_axis.tile(i);
        for r in 0..4 {
            let (e, o) = rows[2 * r * n..(2 * r + 2) * n].split_at_mut(n);
            let iy = rows_axis.input(a, k, r);
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
            for (b, &(count, _, off)) in cols.phases.iter().enumerate() {
                let (e, o) = (&mut e[off..off + count + 1], &mut o[off..off + count + 1]);
                // Entries whose even and odd columns both lie inside the row: `[lo, hi)`; the
                // rest read zeros at the edges.
                let first = cols.input(b, 0, 0);
                let step = 2 * dx as isize;
                let lo = if first >= 0 {
                    0
                } else {
                    ((-first) as usize).div_ceil(2 * dx)
                }
                .min(count + 1);
                let last_ok = w as isize - 1 - dx as isize - first;
                let hi = if last_ok < 0 {
                    lo
                } else {
                    (last_ok / step + 1).clamp(lo as isize, (count + 1) as isize) as usize
                };
                for l in (0..lo).chain(hi..count + 1) {
                    let ix = first + step * l as isize;
                    e[l] = at(ix);
                    o[l] = at(ix + dx as isize);
                }
                if lo == hi {
                    continue;
                }
                let start = (first + step * lo as isize) as usize;
                if dx == 1 {
                    let inner = &row[start..start + 2 * (hi - lo)];
                    for ((e, o), pair) in e[lo..hi]
                        .iter_mut()
                        .zip(&mut o[lo..hi])
                        .zip(inner.chunks_exact(2))
                    {
                        *e = pair[0];
                        *o = pair[1];
                    }
                } else {
                    let evens = row[start..].iter().step_by(2 * dx);
                    let odds = row[start + dx..].iter().step_by(2 * dx);
                    for ((e, o), (&ev, &od)) in e[lo..hi]
                        .iter_mut()
                        .zip(&mut o[lo..hi])
                        .zip(evens.zip(odds))
                    {
                        *e = ev;
                        *o = od;
                    }
                }
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
        // (Bᵀ d) B along each column phase's row of tiles.
        let base = (i - i0) * cols.tiles;
        for kk in 0..4 {
            let (e, o) = (
                &t[2 * kk * n..(2 * kk + 1) * n],
                &t[(2 * kk + 1) * n..(2 * kk + 2) * n],
            );
            let out = |j: usize| (4 * kk + j) * ld + base;
            let (d0, rest) = dst[out(0)..].split_at_mut(ld);
            let (d1, rest) = rest.split_at_mut(ld);
            let (d2, rest) = rest.split_at_mut(ld);
            let d3 = &mut rest[..cols.tiles];
            for &(count, first, off) in &cols.phases {
                let (e, o) = (&e[off..off + count + 1], &o[off..off + count + 1]);
                let (d0, d1) = (&mut d0[first..first + count], &mut d1[first..first + count]);
                let (d2, d3) = (&mut d2[first..first + count], &mut d3[first..first + count]);
                for x in 0..count {
                    d0[x] = e[x] - e[x + 1];
                    d1[x] = o[x] + e[x + 1];
                    d2[x] = e[x + 1] - o[x];
                    d3[x] = o[x] - o[x + 1];
                }
            }
        }
    }
}

/// One Winograd tile size's transforms, for [`run`]: F(`m`x`m`, 3x3) transforms `(m + 2)²`
/// positions per tile.
pub(crate) struct Scheme {
    /// Outputs per tile along each axis.
    pub m: usize,
    /// The most tiles per block (the products' column count).
    pub tiles_max: usize,
    /// Scratch floats of one input-transform task, for blocks of `rows` tile rows.
    pub input_scratch: fn(rows: usize, cols: &Axis) -> usize,
    /// Scratch floats of one output-transform task, for blocks of `tiles` tiles, `tw` a row.
    pub output_scratch: fn(tiles: usize, tw: usize) -> usize,
    /// `Bᵀ d B` of a block's tile rows of one input plane (see F(2x2)'s `transform_input`).
    #[allow(clippy::type_complexity)]
    pub input:
        fn(&[f32], (usize, usize), (&Axis, &Axis), (usize, usize), &mut [f32], usize, &mut [f32]),
    /// `Aᵀ M A` of a block's tile rows of one output channel, through the epilogue (see
    /// F(2x2)'s `output_rows`).
    #[allow(clippy::type_complexity)]
    pub output: fn(
        &[f32],
        (&Axis, &Axis),
        (usize, usize),
        usize,
        &mut [f32],
        &mut [f32],
        Option<(f32, f32, Activation)>,
        Option<&[f32]>,
    ),
}

scheme!(
    /// F(2x2, 3x3).
    F2,
    m: 2,
    tiles_max: TILES_MAX,
    input_scratch: |_, cols| 16 * cols.inputs,
    output_scratch: |_, tw| 4 * tw
);

/// The Winograd forward of one image with tile scheme `s`: blocks of whole tile rows (as many as
/// fit [`V_BUDGET`] and `s.tiles_max`), each transformed in parallel over input channels, its
/// `(m + 2)²` products `M_ξ = U_ξ · V_ξ` in parallel over `ξ`, and its outputs transformed
/// in parallel over output channels.
///
/// # Safety
/// `u` holds at least `cout * (m + 2)² * cin` values; `out` must be writable at `cout * ho *
/// wo` elements and not accessed by anyone else during the call; `residual`, if any, holds
/// `cout * ho * wo` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run(
    s: &Scheme,
    x: &[f32],
    (cin, cout): (usize, usize),
    u: &[f32],
    p: &Patches,
    epi: Option<(&[f32], &[f32], Activation)>,
    residual: Option<&[f32]>,
    out: *mut f32,
) {
    let (h, w, ho, wo) = (p.h, p.w, p.ho, p.wo);
    let (pt, pl) = p.pad_top_left();
    let (dy, dx) = p.dilations();
    let (rows_axis, cols) = (Axis::new(s.m, dy, pt, ho), Axis::new(s.m, dx, pl, wo));
    let (th, tw) = (rows_axis.tiles, cols.tiles);
    if th == 0 || tw == 0 {
        return;
    }
    let xis = (s.m + 2) * (s.m + 2);
    let rows_per_block = (s.tiles_max.min(V_BUDGET / (xis * cin)) / tw).max(1);
    let most = rows_per_block.min(th) * tw;
    // Every value of `V` and `M` a block reads is written in the block first (the input
    // transform fills each tile, zeros included; the products write all of `M`'s rows).
    let mut v = take_buf(&V_BUF, cin * xis * most);
    let mut m = take_buf(&M_BUF, cout * xis * most);
    let out = Ptr(out);
    let axes = (&rows_axis, &cols);
    for i0 in (0..th).step_by(rows_per_block) {
        let i1 = (i0 + rows_per_block).min(th);
        let tiles = (i1 - i0) * tw;
        // V: [Cin][ξ][tiles].
        v[..cin * xis * tiles]
            .par_chunks_mut(xis * tiles)
            .enumerate()
            .for_each_init(
                || vec![0f32; (s.input_scratch)(rows_per_block.min(th), &cols)],
                |scratch, (c, dst)| {
                    let src = &x[c * h * w..(c + 1) * h * w];
                    (s.input)(src, (h, w), axes, (i0, i1), dst, tiles, scratch)
                },
            );
        // M_ξ = U_ξ · V_ξ, M laid out [Cout][ξ][tiles].
        let mp = Ptr(m.as_mut_ptr());
        let vr = &v;
        (0..xis).into_par_iter().for_each(|xi| {
            // SAFETY: `U_ξ` is `cout x cin` at offset `ξ * cin`, row stride `xis * cin`; `V_ξ`
            // `cin x tiles` at `ξ * tiles`, stride `xis * tiles`; `M_ξ` `cout x tiles` at
            // `ξ * tiles`, stride `xis * tiles`: rows of different `ξ` never overlap, so the
            // tasks write disjoint elements.
            unsafe {
                sgemm_raw_ex(
                    (cout, tiles, cin),
                    RawOperand::rows(u.as_ptr().add(xi * cin), xis * cin),
                    RawOperand::rows(vr.as_ptr().add(xi * tiles), xis * tiles),
                    (mp.get().add(xi * tiles), xis * tiles),
                    false,
                    None,
                    1,
                )
            }
        });
        // Y = Aᵀ M A per output channel, through the epilogue into the output rows of tile
        // rows `[i0, i1)`.
        let mr = &m;
        (0..cout).into_par_iter().for_each_init(
            || vec![0f32; (s.output_scratch)(most, tw)],
            |y, o| {
                let mo = &mr[o * xis * tiles..(o + 1) * xis * tiles];
                let base = o * ho * wo;
                // SAFETY: channel `o` of the output: inside `out`, and only the rows of this
                // block's tile rows are written, by this task alone (channels are split across
                // tasks, rows across the blocks, which run one after another).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(base), ho * wo) };
                let res = residual.map(|r| &r[base..base + ho * wo]);
                let epi = epi.map(|(s, t, act)| (s[o], t[o], act));
                (s.output)(mo, axes, (i0, i1), wo, y, dst, epi, res)
            },
        );
    }
    put_buf(&V_BUF, v);
    put_buf(&M_BUF, m);
}

/// `Aᵀ M A` of one output channel's tile rows `[i0, i1)` (`mo`: `[16][tiles]`) into its output
/// plane `dst` (`ho x wo`; only those tile rows' output rows are written), through the
/// epilogue; `y` is scratch of `4 * cols.tiles`.
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
    for i in i0..i1 {
        let b = (i - i0) * tw;
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
        let (a, k) = rows_axis.tile(i);
        for (r, (ye, yo)) in [(&*y0, &*y1), (&*y2, &*y3)].into_iter().enumerate() {
            let oy = a + 2 * rows_axis.d * k + rows_axis.d * r;
            if oy >= ho {
                break;
            }
            let row = &mut dst[oy * wo..(oy + 1) * wo];
            write_row(
                row,
                cols,
                ye,
                yo,
                epi,
                res.map(|res| &res[oy * wo..(oy + 1) * wo]),
            );
        }
    }
}

/// One output row from its tiles' two values per column tile (`even[j]` at column
/// `b + 2 d l`, `odd[j]` at `b + 2 d l + d` for tile `j`, tile `l` of column phase `b`), through
/// the epilogue `act(v * s + t (+ r))` when given.
#[inline(always)]
fn write_row(
    dst: &mut [f32],
    cols: &Axis,
    even: &[f32],
    odd: &[f32],
    epi: Option<(f32, f32, Activation)>,
    res: Option<&[f32]>,
) {
    let (d, wo) = (cols.d, dst.len());
    if d == 1 {
        let whole = wo / 2;
        for ((pair, &e), &o) in dst.chunks_exact_mut(2).zip(even).zip(odd) {
            pair[0] = e;
            pair[1] = o;
        }
        if wo % 2 == 1 {
            dst[2 * whole] = even[whole];
        }
    } else {
        for (b, &(count, first, _)) in cols.phases.iter().enumerate() {
            for l in 0..count {
                let ox = b + 2 * d * l;
                dst[ox] = even[first + l];
                if ox + d < wo {
                    dst[ox + d] = odd[first + l];
                }
            }
        }
    }
    if let Some((s, t, act)) = epi {
        epilogue_row(dst, (s, t), act, res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Conv2dGeometry, Padding2d};
    use candle_core::{Device, Tensor};

    /// The Winograd path itself (whatever `conv2d` would pick) against the reference
    /// composition: rates 1-6, different rates per axis, asymmetric padding, maps where a
    /// phase holds a single output, with and without the epilogue and a residual; every
    /// output element written, and no value of the reused work buffers read before it is
    /// written (they start full of NaN).
    #[test]
    fn matches_the_reference_for_any_rate() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let pad = |t, b, l, r| Padding2d {
            top: t,
            bottom: b,
            left: l,
            right: r,
        };
        let cases = [
            ((9, 11), (1, 1), pad(1, 1, 1, 1)),
            ((17, 23), (2, 2), pad(2, 2, 2, 2)),
            ((20, 17), (3, 3), pad(3, 3, 3, 3)),
            ((13, 14), (2, 3), pad(0, 4, 6, 0)),
            ((7, 12), (5, 4), pad(5, 5, 4, 4)),
            ((33, 33), (6, 6), pad(6, 6, 6, 6)),
            ((33, 33), (1, 1), pad(1, 1, 1, 1)),
            ((3, 5), (1, 1), pad(1, 1, 1, 1)),
            ((37, 9), (2, 1), pad(2, 2, 0, 3)),
        ];
        type Transform = fn(&[f32], usize, usize) -> Vec<f32>;
        let paths: [(&str, Transform, &Scheme); 2] = [
            ("F(2x2)", transform_weights, &F2),
            ("F(4x4)", f4::transform_weights, &f4::F4),
        ];
        for (i, ((h, w), dilation, padding)) in cases.into_iter().enumerate() {
            let (cin, cout) = (32, 33);
            let geom = Conv2dGeometry {
                stride: (1, 1),
                dilation,
                padding,
            };
            let x = crate::reference::seeded_uniform(&[1, cin, h, w], 10 + i as u64, &dev)?;
            let k = crate::reference::seeded_uniform(&[cout, cin, 3, 3], 20 + i as u64, &dev)?;
            let want = crate::reference::conv2d(&x, &k, None, &geom)?;
            let p = Patches::new((h, w), (3, 3), &geom)?;
            assert!(eligible(&p, cin, cout));
            let (xs, ks) = (
                x.flatten_all()?.to_vec1::<f32>()?,
                k.flatten_all()?.to_vec1::<f32>()?,
            );
            let res = crate::reference::seeded_uniform(want.dims(), 30 + i as u64, &dev)?;
            let rs = res.flatten_all()?.to_vec1::<f32>()?;
            let scale: Vec<f32> = (0..cout).map(|o| 0.5 + o as f32 / cout as f32).collect();
            let shift: Vec<f32> = (0..cout).map(|o| o as f32 / 10.0 - 1.0).collect();
            for ((name, transform, scheme), with_epilogue) in
                paths.into_iter().flat_map(|f| [(f, false), (f, true)])
            {
                let mut out = vec![f32::NAN; cout * p.ho * p.wo];
                let epi = with_epilogue.then_some((&scale[..], &shift[..], Activation::Relu));
                let r = with_epilogue.then_some(&rs[..]);
                // The reused work buffers full of NaN: a value read before it is written
                // shows in the output.
                for key in [&U_BUF, &V_BUF, &M_BUF] {
                    put_buf(key, vec![f32::NAN; 1 << 20]);
                }
                let u = transform(&ks, cout, cin);
                // SAFETY: `out` holds the whole output, `rs` a residual of the same size.
                unsafe { run(scheme, &xs, (cin, cout), &u, &p, epi, r, out.as_mut_ptr()) };
                let want = if with_epilogue {
                    let s = Tensor::new(&scale[..], &dev)?.reshape((1, cout, 1, 1))?;
                    let t = Tensor::new(&shift[..], &dev)?.reshape((1, cout, 1, 1))?;
                    (want.broadcast_mul(&s)?.broadcast_add(&t)? + &res)?.relu()?
                } else {
                    want.clone()
                };
                assert!(
                    out.iter().all(|v| v.is_finite()),
                    "{name} case {i}: an output element was not written"
                );
                let want = want.flatten_all()?.to_vec1::<f32>()?;
                let scale_max = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let err = out
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale_max,
                    "{name} case {i} ({h}x{w}, rate {dilation:?}, epilogue {with_epilogue}): error {err}"
                );
            }
        }
        Ok(())
    }

    /// Rounding against an f64 computation, relative to the output's largest magnitude, on a
    /// ResNet-like convolution (128 -> 64 channels, Kaiming-scaled weights, inputs in [0, 1) as
    /// after a ReLU): F(2x2, 3x3) within 4x the error of a direct f32 sum, F(4x4, 3x3) within
    /// 16x (prints all three).
    #[test]
    fn accuracy_against_f64() -> candle_core::Result<()> {
        use candle_core::DType;
        let dev = Device::Cpu;
        let (cin, cout, h, w) = (128, 64, 40, 37);
        let x = ((crate::reference::seeded_uniform(&[1, cin, h, w], 61, &dev)? + 1.0)? * 0.5)?;
        let a = (3.0f64 * 2.0 / (9.0 * cin as f64)).sqrt();
        let k = (crate::reference::seeded_uniform(&[cout, cin, 3, 3], 62, &dev)? * a)?;
        let geom = Conv2dGeometry::same(3, 1);
        let exact = crate::reference::conv2d(
            &x.to_dtype(DType::F64)?,
            &k.to_dtype(DType::F64)?,
            None,
            &geom,
        )?
        .flatten_all()?
        .to_vec1::<f64>()?;
        let big = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = |y: &[f32]| {
            y.iter()
                .zip(&exact)
                .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()))
                / big
        };
        let direct = crate::reference::conv2d(&x, &k, None, &geom)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let p = Patches::new((h, w), (3, 3), &geom)?;
        let (xs, ks) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut two = vec![0f32; cout * h * w];
        let mut four = vec![0f32; cout * h * w];
        // SAFETY: each output buffer holds the whole output; no residual.
        unsafe {
            let (u2, u4) = (
                transform_weights(&ks, cout, cin),
                f4::transform_weights(&ks, cout, cin),
            );
            run(&F2, &xs, (cin, cout), &u2, &p, None, None, two.as_mut_ptr());
            run(
                &f4::F4,
                &xs,
                (cin, cout),
                &u4,
                &p,
                None,
                None,
                four.as_mut_ptr(),
            );
        }
        let (e_direct, e2, e4) = (err(&direct), err(&two), err(&four));
        println!(
            "max error / max |y|: direct f32 {e_direct:.2e}, F(2x2) {e2:.2e}, F(4x4) {e4:.2e}"
        );
        assert!(
            e2 <= 4.0 * e_direct.max(1e-8),
            "F(2x2) {e2:.2e} vs {e_direct:.2e}"
        );
        assert!(
            e4 <= 16.0 * e_direct.max(1e-8),
            "F(4x4) {e4:.2e} vs {e_direct:.2e}"
        );
        Ok(())
    }
}
