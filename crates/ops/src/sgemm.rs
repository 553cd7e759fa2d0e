//! Single-precision matrix product `C = A · B` with an AVX-512 microkernel and an optional
//! per-row epilogue `act(c * scale[row] + shift[row])` applied while each tile is in registers.
//!
//! All matrices are row-major with a row stride (leading dimension); `C` may be a strided view
//! (only its `m x n` elements are written, none is read). The product is blocked BLIS-style:
//! the columns are split into jobs of up to [`NC_PANELS`] micro-panels (run in parallel with
//! rayon, and split over rows too when there are few columns), the depth into blocks of at most
//! [`KC_MAX`]. Each job packs its `kc x nc` block of `B` into panels of [`NR`] columns
//! (zero-padded, in L2), then for every [`MR`]-row panel of `A` (read in place: it stays in L1
//! across the block's column panels) runs the `MR x NR` microkernel: 24 zmm accumulators,
//! broadcast FMAs, masked loads and stores at the column edge, repeated last row at the row
//! edge (computed, never stored).
//!
//! Every element is the chain of fused multiply-adds over `k = 0, 1, ...` in order, starting
//! from zero: a depth block after the first reloads the partial sums from `C` and continues the
//! chain. So the result does not depend on the blocking or the number of threads, and the
//! epilogue `v.mul_add(scale, shift)` then ReLU / ReLU6 gives exactly what
//! [`crate::channel_affine`] gives on the plain product. Without AVX-512 (or with
//! `DEEPLAB_NO_AVX512` set) it calls the `gemm` crate and applies the epilogue after.

use crate::batch_norm::Activation;
use candle_core::{bail, Result};
use std::cell::Cell;

/// Rows of `A` per microkernel tile.
pub const MR: usize = 8;
/// Columns of `B` per microkernel tile (three 16-lane vectors).
pub const NR: usize = 48;
/// The largest depth block: an `MR x KC_MAX` panel of `A` (8 KiB) stays in L1.
pub const KC_MAX: usize = 256;
/// The most column panels per job: a `KC_MAX x NC_PANELS * NR` packed block of `B` (480 KiB)
/// stays in a Zen 5 core's 1 MiB L2.
pub const NC_PANELS: usize = 10;

/// The per-output-row epilogue `act(c * scale[row] + shift[row])` (a folded BatchNorm and its
/// activation), computed as `c.mul_add(scale, shift)` then ReLU / ReLU6 like
/// [`crate::channel_affine`].
#[derive(Clone, Copy, Debug)]
pub struct RowEpilogue<'a> {
    /// Multiplier per row of `C` (at least `m` values).
    pub scale: &'a [f32],
    /// Offset per row of `C` (at least `m` values).
    pub shift: &'a [f32],
    /// Activation applied after the affine map.
    pub act: Activation,
}

/// `C[m x n] = A[m x k] · B[k x n]` (row-major, row strides `lda`, `ldb`, `ldc`), then the
/// epilogue on each row if given. `C` is only written. `threads > 1` runs the blocks on the
/// rayon pool; the result is the same bit for bit for any `threads`.
///
/// ```
/// use deeplab_ops::sgemm::sgemm;
/// let a = [1.0, 2.0, 3.0, 4.0]; // 2 x 2
/// let b = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]; // 2 x 3
/// let mut c = [0.0f32; 6];
/// sgemm((2, 3, 2), (&a, 2), (&b, 3), (&mut c, 3), None, 1)?;
/// assert_eq!(c, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sgemm(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) -> Result<()> {
    let need = |rows: usize, cols: usize, ld: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        }
    };
    if (m > 0 && k > 0 && lda < k) || (k > 0 && n > 0 && ldb < n) || (m > 0 && n > 0 && ldc < n) {
        bail!("sgemm: row strides lda {lda} ldb {ldb} ldc {ldc} too small for {m}x{k} · {k}x{n}")
    }
    if a.len() < need(m, k, lda) || b.len() < need(k, n, ldb) || c.len() < need(m, n, ldc) {
        bail!(
            "sgemm: buffers of {} / {} / {} elements too small for {m}x{k} · {k}x{n} \
             with strides {lda} / {ldb} / {ldc}",
            a.len(),
            b.len(),
            c.len()
        )
    }
    if let Some(e) = &epi {
        if e.scale.len() < m || e.shift.len() < m {
            bail!(
                "sgemm: epilogue of {} scales / {} shifts for {m} rows",
                e.scale.len(),
                e.shift.len()
            )
        }
    }
    // SAFETY: the checks above bound every element the product reads and writes.
    unsafe {
        sgemm_raw(
            (m, n, k),
            (a.as_ptr(), lda),
            (b.as_ptr(), ldb),
            (c.as_mut_ptr(), ldc),
            epi,
            threads,
        )
    };
    Ok(())
}

/// [`sgemm`] on raw pointers: `C` may be uninitialized memory.
///
/// # Safety
/// `a` must be readable at `i * lda + p` for `i < m`, `p < k`; `b` at `p * ldb + j` for
/// `p < k`, `j < n`; `c` writable at `i * ldc + j` for `i < m`, `j < n`, and no other thread may
/// access those elements of `c` during the call; `epi` must hold at least `m` scales and shifts.
pub(crate) unsafe fn sgemm_raw(
    (m, n, k): (usize, usize, usize),
    (a, lda): (*const f32, usize),
    (b, ldb): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            // SAFETY: row `i` of `C` is writable (caller contract).
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
            row.fill(0.0);
            if let Some(e) = &epi {
                apply_row(row, e.scale[i], e.shift[i], e.act);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: the CPU has AVX-512F; the caller's contract covers the rest.
        unsafe { blocked((m, n, k), (a, lda), (b, ldb), (c, ldc), epi, threads) };
        return;
    }
    // SAFETY: the caller's contract is the gemm crate's for these strides; with
    // read_dst = false the destination is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            false,
            a,
            1,
            lda as isize,
            b,
            1,
            ldb as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            match threads {
                0 | 1 => gemm::Parallelism::None,
                t => gemm::Parallelism::Rayon(t),
            },
        )
    }
    if let Some(e) = &epi {
        for i in 0..m {
            // SAFETY: row `i` of `C`, written by the gemm above.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
            apply_row(row, e.scale[i], e.shift[i], e.act);
        }
    }
}

/// `row = act(row * s + t)`, vectorized for the CPU at hand.
fn apply_row(row: &mut [f32], s: f32, t: f32, act: Activation) {
    multiversion!(|| match act {
        Activation::None => row.iter_mut().for_each(|v| *v = v.mul_add(s, t)),
        Activation::Relu => row.iter_mut().for_each(|v| *v = v.mul_add(s, t).max(0.0)),
        Activation::Relu6 => row
            .iter_mut()
            .for_each(|v| *v = v.mul_add(s, t).clamp(0.0, 6.0)),
    });
}

/// A pointer handed to rayon workers that touch disjoint parts of what it addresses.
#[derive(Clone, Copy)]
struct Ptr<T>(T);
// SAFETY: only used for the disjoint column/row blocks of `blocked`'s jobs and shared reads.
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Ptr<T> {}

thread_local! {
    /// Packed-`B` scratch reused across calls; taken while in use, so a re-entrant call just
    /// allocates its own.
    static PACK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The job grid: `(column panels per job, column jobs, rows per job, row jobs)`.
fn grid(m: usize, n: usize, threads: usize) -> (usize, usize, usize, usize) {
    let panels = n.div_ceil(NR);
    let t = threads.max(1);
    let per_job = if t == 1 {
        panels.min(NC_PANELS)
    } else {
        panels.div_ceil(2 * t).clamp(1, NC_PANELS)
    };
    let col_jobs = panels.div_ceil(per_job);
    let row_jobs = if t > 1 && col_jobs < 2 * t {
        (2 * t).div_ceil(col_jobs).min(m.div_ceil(MR))
    } else {
        1
    };
    let rows = m.div_ceil(row_jobs).div_ceil(MR) * MR;
    (per_job, col_jobs, rows, m.div_ceil(rows))
}

/// The AVX-512 blocked product (see the module docs).
///
/// # Safety
/// As [`sgemm_raw`] with `m, n, k > 0`, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn blocked(
    (m, n, k): (usize, usize, usize),
    (a, lda): (*const f32, usize),
    (b, ldb): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) {
    use rayon::prelude::*;
    let (per_job, col_jobs, rows, row_jobs) = grid(m, n, threads);
    let kblocks = k.div_ceil(KC_MAX);
    let kc_max = k.div_ceil(kblocks);
    let (pa, pb, pc) = (Ptr(a), Ptr(b), Ptr(c));
    let job = |j: usize| {
        let (ri, ci) = (j / col_jobs, j % col_jobs);
        let (i0, j0) = (ri * rows, ci * per_job * NR);
        let (i1, j1) = ((i0 + rows).min(m), (j0 + per_job * NR).min(n));
        let np = (j1 - j0).div_ceil(NR);
        let mut buf = PACK.take();
        if buf.len() < kc_max * np * NR {
            buf = vec![0f32; kc_max * per_job * NR];
        }
        let (a, b, c) = (pa, pb, pc);
        for p0 in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - p0);
            // SAFETY: rows `p0..p0 + kc`, columns `j0..j1` of `B` are in bounds.
            unsafe { avx512::pack_b(b.0.add(p0 * ldb + j0), ldb, kc, j1 - j0, &mut buf) };
            let first = p0 == 0;
            let last = p0 + kc == k;
            for i in (i0..i1).step_by(MR) {
                let r = MR.min(i1 - i);
                if i + MR < i1 {
                    // The next row panel of `A` heads for L2 while this one is used.
                    let rn = MR.min(i1 - i - MR);
                    avx512::prefetch_rows(a.0.wrapping_add((i + MR) * lda + p0), lda, rn, kc);
                }
                let e = match (&epi, last) {
                    (Some(e), true) => Some((&e.scale[i..i + r], &e.shift[i..i + r], e.act)),
                    _ => None,
                };
                for q in 0..np {
                    let jj = j0 + q * NR;
                    // SAFETY: the tile's rows `i..i + r` and columns `jj..jj + cols` are this
                    // job's own part of `C`; `A` rows `i..i + r`, columns `p0..p0 + kc` are in
                    // bounds; panel `q` of the packed block holds `kc * NR` values.
                    unsafe {
                        avx512::kernel(
                            kc,
                            a.0.add(i * lda + p0),
                            lda,
                            r,
                            buf.as_ptr().add(q * kc * NR),
                            c.0.add(i * ldc + jj),
                            ldc,
                            NR.min(j1 - jj),
                            first,
                            e,
                        )
                    }
                }
            }
        }
        PACK.set(buf);
    };
    let jobs = col_jobs * row_jobs;
    if threads > 1 && jobs > 1 {
        (0..jobs).into_par_iter().for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, MR, NR};
    use std::arch::x86_64::*;

    const NV: usize = NR / 16;

    /// The first `n` (clamped to 0..=16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// Packs `kc` rows of `cols` columns of `B` (row stride `ldb`) into `buf` as consecutive
    /// panels of `NR` columns, each `kc` rows of `NR` values, zero-padded past `cols`.
    ///
    /// # Safety
    /// `b` readable at `p * ldb + j` for `p < kc`, `j < cols`; `buf` holds at least
    /// `kc * cols.div_ceil(NR) * NR` values; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_b(
        b: *const f32,
        ldb: usize,
        kc: usize,
        cols: usize,
        buf: &mut [f32],
    ) {
        let np = cols.div_ceil(NR);
        assert!(buf.len() >= kc * np * NR, "sgemm: packing buffer too small");
        let out = buf.as_mut_ptr();
        for q in 0..np {
            let left = cols - q * NR;
            let masks: [__mmask16; NV] =
                std::array::from_fn(|v| lanes(left.saturating_sub(16 * v)));
            for p in 0..kc {
                // SAFETY: masked lanes stay inside row `p`'s `cols` columns; the destination
                // is panel `q`, row `p` of `buf` (length checked above).
                unsafe {
                    let src = b.add(p * ldb + q * NR);
                    let dst = out.add((q * kc + p) * NR);
                    for (v, &mk) in masks.iter().enumerate() {
                        _mm512_storeu_ps(
                            dst.add(16 * v),
                            _mm512_maskz_loadu_ps(mk, src.add(16 * v)),
                        );
                    }
                }
            }
        }
    }

    /// Prefetches `rows` rows of `cols` values (row stride `ld`) into L2. Prefetches do not
    /// fault, so this is safe for any address.
    #[inline]
    pub(super) fn prefetch_rows(p: *const f32, ld: usize, rows: usize, cols: usize) {
        for r in 0..rows {
            let row = p.wrapping_add(r * ld);
            for q in (0..cols).step_by(16).chain([cols - 1]) {
                // SAFETY: a prefetch is a hint: it never faults nor changes memory.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(q) as *const i8) };
            }
        }
    }

    /// `act(v * s + t)` on a vector.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn finish(v: __m512, s: f32, t: f32, act: Activation) -> __m512 {
        let y = _mm512_fmadd_ps(v, _mm512_set1_ps(s), _mm512_set1_ps(t));
        match act {
            Activation::None => y,
            Activation::Relu => _mm512_max_ps(y, _mm512_setzero_ps()),
            Activation::Relu6 => {
                _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), _mm512_set1_ps(6.0))
            }
        }
    }

    /// One `rows x cols` tile (`rows <= MR`, `cols <= NR`) of `C`: zero (`first`) or the
    /// partial sums in `C`, plus `A[rows x kc] · Bpanel[kc x NR]` as in-order FMA chains, stored
    /// back, through `epi` (scale and shift of the tile's rows, activation) when given.
    ///
    /// # Safety
    /// `a` readable at `i * lda + p` for `i < rows`, `p < kc`; `b` at `p * NR + j` for `p < kc`,
    /// `j < NR`; `c` readable (unless `first`) and writable at `i * ldc + j` for `i < rows`,
    /// `j < cols`; `1 <= rows <= MR`, `1 <= cols <= NR`; AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: *const f32,
        lda: usize,
        rows: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
        epi: Option<(&[f32], &[f32], Activation)>,
    ) {
        let masks: [__mmask16; NV] = std::array::from_fn(|v| lanes(cols.saturating_sub(16 * v)));
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        // Rows past the edge repeat the last row: computed, never stored.
        let ap: [*const f32; MR] = std::array::from_fn(|i| a.wrapping_add(i.min(rows - 1) * lda));
        if !first {
            for (i, acc) in acc.iter_mut().enumerate() {
                if i < rows {
                    for (v, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: masked to the tile's columns of row `i`.
                        *acc = unsafe { _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v)) };
                    }
                }
            }
        }
        for p in 0..kc {
            // SAFETY: row `p` of the packed panel and column `p` of the tile's rows of `A`.
            unsafe {
                let bp = b.add(p * NR);
                let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap[i].add(p));
                    for (v, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(av, bv[v], *acc);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            if i < rows {
                for (v, &x) in acc.iter().enumerate() {
                    let y = match epi {
                        Some((s, t, act)) => finish(x, s[i], t[i], act),
                        None => x,
                    };
                    // SAFETY: masked to the tile's columns of row `i`.
                    unsafe { _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), masks[v], y) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_the_matrix() {
        for (m, n, t) in [
            (1, 1, 1),
            (728, 1089, 2),
            (3, 5000, 2),
            (2048, 17, 4),
            (9, 48, 2),
        ] {
            let (per_job, col_jobs, rows, row_jobs) = grid(m, n, t);
            assert!((1..=NC_PANELS).contains(&per_job));
            assert!(col_jobs * per_job * NR >= n && (col_jobs - 1) * per_job * NR < n);
            assert!(rows % MR == 0 && rows * row_jobs >= m && (row_jobs - 1) * rows < m);
        }
    }
}
