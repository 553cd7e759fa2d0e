//! Single-precision matrix product `C = A · B` with an AVX-512 microkernel and an optional
//! per-row epilogue `act(c * scale[row] + shift[row] (+ residual))` applied while each tile is
//! in registers.
//!
//! `C` is row-major with a row stride and may be a strided view (only its `m x n` elements are
//! written; none is read unless the product accumulates into it, `C += A · B`). `A` and `B` are
//! row-major or column-major ([`Operand`]), so the products of a convolution's backward pass,
//! `dY · colsᵀ` and `Wᵀ · dY`, run on the stored tensors without transposed copies. The product
//! is blocked BLIS-style:
//! the columns are split into jobs of up to [`NC_PANELS`] micro-panels (run in parallel with
//! rayon, and split over rows too when there are few columns), the depth into blocks of at most
//! [`KC_MAX`]. Each job packs its `kc x nc` block of `B` into panels of [`NR`] columns
//! (zero-padded, in L2; a column-major `B` is transposed while packing), then for every
//! [`MR`]-row panel of `A` (read in place, row- or column-major: it stays in L1 across the
//! block's column panels) runs the `MR x NR` microkernel: 24 zmm accumulators,
//! broadcast FMAs, masked loads and stores at the column edge, repeated last row at the row
//! edge (computed, never stored).
//!
//! Every element is the chain of fused multiply-adds over `k = 0, 1, ...` in order, starting
//! from zero (or from `C`'s value when accumulating): a depth block after the first reloads the
//! partial sums from `C` and continues the chain. So the result does not depend on the blocking or the number of threads, and the
//! epilogue `v.mul_add(scale, shift)` then ReLU / ReLU6 gives exactly what
//! [`crate::channel_affine`] gives on the plain product. Without AVX-512 (or with
//! `DEEPLAB_NO_AVX512` set) it calls the `gemm` crate and applies the epilogue after.

use crate::batch_norm::{epilogue_row, Activation};
use crate::cpu::Ptr;
use candle_core::{bail, Result};
use std::cell::Cell;

/// Rows of `A` per microkernel tile.
pub const MR: usize = 8;
/// Columns of `B` per microkernel tile (three 16-lane vectors).
pub const NR: usize = 48;
/// The largest depth block: an `MR x KC_MAX` panel of `A` (16 KiB) stays in L1. (Measured on
/// Zen 5 against 128, 192, 256 and 384: 512 is as fast on the forward shapes and 2-4% faster on
/// the weight-gradient products, whose `C` tiles are reloaded once per depth block.)
pub const KC_MAX: usize = 512;
/// The most column panels per job: a `KC_MAX x NC_PANELS * NR` packed block of `B` (up to
/// 960 KiB) stays in a Zen 5 core's 1 MiB L2 (5 panels measured no faster).
pub const NC_PANELS: usize = 10;

/// The per-output-row epilogue `act(c * scale[row] + shift[row] + residual)` (a folded
/// BatchNorm, optionally a residual branch, and the activation), computed as
/// `c.mul_add(scale, shift)`, plus the residual element, then ReLU / ReLU6: the same bits as
/// [`crate::channel_affine`] without activation, an add and the activation as separate passes.
#[derive(Clone, Copy, Debug)]
pub struct RowEpilogue<'a> {
    /// Multiplier per row of `C` (at least `m` values).
    pub scale: &'a [f32],
    /// Offset per row of `C` (at least `m` values).
    pub shift: &'a [f32],
    /// Activation applied last.
    pub act: Activation,
    /// A matrix added after the affine map, laid out like `C` (element `(i, j)` at
    /// `i * ldc + j`, so at least `(m - 1) * ldc + n` elements): a residual branch.
    pub residual: Option<&'a [f32]>,
}

impl<'a> RowEpilogue<'a> {
    /// `act(c * scale[row] + shift[row])`.
    pub fn affine(scale: &'a [f32], shift: &'a [f32], act: Activation) -> Self {
        Self {
            scale,
            shift,
            act,
            residual: None,
        }
    }
}

/// A matrix operand of [`sgemm_ex`]: `data` holds the matrix with leading dimension `ld`,
/// row-major (element `(i, j)` at `i * ld + j`) or, when `transposed`, column-major (at
/// `j * ld + i`: the row-major storage of its transpose).
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Distance between consecutive rows (row-major) or columns (column-major).
    pub ld: usize,
    /// Column-major storage.
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with row stride `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            ld,
            transposed: false,
        }
    }

    /// A column-major matrix with column stride `ld` (the transpose of a row-major one).
    pub fn cols(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            ld,
            transposed: true,
        }
    }

    /// Checks that an `rows x cols` matrix fits; `what` names the operand in the error.
    fn check(&self, what: &str, rows: usize, cols: usize) -> Result<()> {
        let (outer, inner) = if self.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if outer == 0 || inner == 0 {
            return Ok(());
        }
        let order = if self.transposed {
            "column-major"
        } else {
            "row-major"
        };
        if self.ld < inner {
            bail!(
                "sgemm: {order} {what} of {rows}x{cols} with leading dimension {} < {inner}",
                self.ld
            )
        }
        let need = (outer - 1) * self.ld + inner;
        if self.data.len() < need {
            bail!(
                "sgemm: {order} {what} of {rows}x{cols} with leading dimension {} needs {need} \
                 elements, has {}",
                self.ld,
                self.data.len()
            )
        }
        Ok(())
    }

    fn raw(&self) -> RawOperand {
        RawOperand {
            ptr: self.data.as_ptr(),
            ld: self.ld,
            transposed: self.transposed,
        }
    }
}

/// An [`Operand`] as a pointer, for the kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawOperand {
    pub ptr: *const f32,
    pub ld: usize,
    pub transposed: bool,
}

impl RawOperand {
    /// A row-major operand.
    pub fn rows(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            ld,
            transposed: false,
        }
    }

    /// A column-major operand.
    pub fn cols(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            ld,
            transposed: true,
        }
    }

    /// The address of element `(i, j)` (never dereferenced here).
    fn at(&self, i: usize, j: usize) -> *const f32 {
        if self.transposed {
            self.ptr.wrapping_add(j * self.ld + i)
        } else {
            self.ptr.wrapping_add(i * self.ld + j)
        }
    }
}

/// A `B` operand gathered from image planes as it is packed, instead of a stored patch
/// matrix: row `p` is input channel `p % cin` at tap `p / cin`, column `j` output pixel `(j /
/// nx, j % nx)` of an output rectangle `nx` wide; element `(p, j)` is
/// `x[(p % cin) * plane + tap_off[p / cin] + (j / nx) * row_step + j % nx]` (`tap_off[t]`:
/// where tap `t` reads the rectangle's first pixel, `row_step`: the input distance between
/// consecutive output rows). The rectangle path of a convolution multiplies by this without
/// writing its patch matrix first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PatchRows<'a> {
    /// The image's input planes.
    pub x: &'a [f32],
    /// Elements per input plane.
    pub plane: usize,
    /// Input channels per tap.
    pub cin: usize,
    /// Input elements between consecutive output rows of the rectangle.
    pub row_step: usize,
    /// The rectangle's width.
    pub nx: usize,
    /// Per tap, the offset (within a plane) of the rectangle's first pixel.
    pub tap_off: &'a [usize],
}

impl PatchRows<'_> {
    /// Checks that every element of a `rows x cols` operand lies inside `x`.
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let taps = rows.div_ceil(self.cin);
        if self.nx == 0 || self.cin == 0 || taps > self.tap_off.len() {
            bail!(
                "sgemm: {rows} patch rows do not fit {} taps of {} channels (rectangle {} wide)",
                self.tap_off.len(),
                self.cin,
                self.nx
            )
        }
        // The farthest pixel: the last column's, or the end of the row before it.
        let r = (cols - 1) / self.nx;
        let last_pixel = (r * self.row_step + (cols - 1) % self.nx)
            .max((r * self.row_step + self.nx - 1).saturating_sub(self.row_step));
        let far = self.tap_off[..taps].iter().max().copied().unwrap_or(0);
        let need = (rows.min(self.cin) - 1) * self.plane + far + last_pixel + 1;
        if self.x.len() < need {
            bail!(
                "sgemm: patch rows reach element {need} of an input of {}",
                self.x.len()
            )
        }
        Ok(())
    }

    /// Row `p`, columns `j0..j0 + dst.len()`, into `dst`.
    #[inline]
    fn gather(&self, p: usize, j0: usize, dst: &mut [f32]) {
        let base = (p % self.cin) * self.plane + self.tap_off[p / self.cin];
        let (mut j, mut k) = (j0, 0);
        while k < dst.len() {
            let (r, c) = (j / self.nx, j % self.nx);
            let run = (self.nx - c).min(dst.len() - k);
            let at = base + r * self.row_step + c;
            dst[k..k + run].copy_from_slice(&self.x[at..at + run]);
            j += run;
            k += run;
        }
    }
}

/// Where the blocked product reads `B` from.
#[derive(Clone, Copy, Debug)]
enum BSource<'a> {
    Matrix(RawOperand),
    Patches(PatchRows<'a>),
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
    dims: (usize, usize, usize),
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    c: (&mut [f32], usize),
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) -> Result<()> {
    sgemm_ex(
        dims,
        Operand::rows(a, lda),
        Operand::rows(b, ldb),
        c,
        false,
        epi,
        threads,
    )
}

/// `C[m x n] = A[m x k] · B[k x n]`, or `C += A · B` with `accumulate`, for row- or
/// column-major `A` and `B`, then the epilogue on each row if given. Each element is one chain
/// of fused multiply-adds over `k` in order, continuing from `C`'s value when accumulating, so
/// summing products over a batch by accumulating gives the same bits for any `threads`.
///
/// ```
/// use deeplab_ops::sgemm::{sgemm_ex, Operand};
/// let g = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 x 3
/// let x = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]; // 2 x 3, used as its transpose
/// let mut c = [1.0f32; 4];
/// // C += G · Xᵀ
/// sgemm_ex((2, 2, 3), Operand::rows(&g, 3), Operand::cols(&x, 3), (&mut c, 2), true, None, 1)?;
/// assert_eq!(c, [5.0, 6.0, 11.0, 12.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sgemm_ex(
    (m, n, k): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    (c, ldc): (&mut [f32], usize),
    accumulate: bool,
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) -> Result<()> {
    a.check("A", m, k)?;
    b.check("B", k, n)?;
    if m > 0 && n > 0 && (ldc < n || c.len() < (m - 1) * ldc + n) {
        bail!(
            "sgemm: C of {m}x{n} with row stride {ldc} does not fit {} elements",
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
        if let Some(r) = e.residual {
            if m > 0 && n > 0 && r.len() < (m - 1) * ldc + n {
                bail!(
                    "sgemm: residual of {} elements does not fit {m}x{n} with row stride {ldc}",
                    r.len()
                )
            }
        }
    }
    // SAFETY: the checks above bound every element the product reads and writes.
    unsafe {
        sgemm_raw_ex(
            (m, n, k),
            a.raw(),
            b.raw(),
            (c.as_mut_ptr(), ldc),
            accumulate,
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
/// access those elements of `c` during the call; `epi` must hold at least `m` scales and shifts
/// and its residual, if any, `(m - 1) * ldc + n` elements.
pub(crate) unsafe fn sgemm_raw(
    dims: (usize, usize, usize),
    (a, lda): (*const f32, usize),
    (b, ldb): (*const f32, usize),
    c: (*mut f32, usize),
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) {
    // SAFETY: the caller's contract, for row-major operands.
    unsafe {
        sgemm_raw_ex(
            dims,
            RawOperand::rows(a, lda),
            RawOperand::rows(b, ldb),
            c,
            false,
            epi,
            threads,
        )
    }
}

/// [`sgemm_ex`] on raw pointers.
///
/// # Safety
/// `a` must be readable at every element `(i, p)`, `i < m`, `p < k`, its layout addresses, `b`
/// at every `(p, j)`, `p < k`, `j < n`; `c` writable (and, with `accumulate`, readable and
/// initialized) at `i * ldc + j` for `i < m`, `j < n`, and no other thread may access those
/// elements of `c` during the call; `epi` must hold at least `m` scales and shifts and its
/// residual, if any, `(m - 1) * ldc + n` elements.
pub(crate) unsafe fn sgemm_raw_ex(
    (m, n, k): (usize, usize, usize),
    a: RawOperand,
    b: RawOperand,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
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
            if !accumulate {
                row.fill(0.0);
            }
            if let Some(e) = &epi {
                apply_row(row, e, i, ldc);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: the CPU has AVX-512F; the caller's contract covers the rest.
        unsafe {
            blocked(
                (m, n, k),
                a,
                BSource::Matrix(b),
                (c, ldc),
                accumulate,
                epi,
                threads,
            )
        };
        return;
    }
    // (row stride, column stride) of an operand for the gemm crate.
    let strides = |o: &RawOperand| {
        if o.transposed {
            (1, o.ld as isize)
        } else {
            (o.ld as isize, 1)
        }
    };
    let ((a_rs, a_cs), (b_rs, b_cs)) = (strides(&a), strides(&b));
    // SAFETY: the caller's contract is the gemm crate's for these strides; the destination is
    // read only when accumulating (alpha = 1 keeps it, beta = 1 adds the product).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.ptr,
            a_cs,
            a_rs,
            b.ptr,
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
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
            apply_row(row, e, i, ldc);
        }
    }
}

/// `C[m x n] = A[m x k] · B[k x n]`, or `C += A · B` with `accumulate`, with `B` gathered from
/// image planes while it is packed ([`PatchRows`]): the same bits as the product with the
/// patch matrix written out. Needs AVX-512 ([`crate::cpu::has_avx512`]): callers without it
/// write the patch matrix and call [`sgemm_raw_ex`].
///
/// # Safety
/// As [`sgemm_raw_ex`] for `a` and `c`; the CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn sgemm_patches(
    (m, n, k): (usize, usize, usize),
    a: RawOperand,
    b: PatchRows<'_>,
    c: (*mut f32, usize),
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    b.check(k, n)?;
    if m == 0 || n == 0 || k == 0 {
        bail!("sgemm: empty patch product {m}x{n}x{k}")
    }
    // SAFETY: the caller's contract for `a`, `c` and the CPU; `b` was checked above.
    unsafe {
        blocked(
            (m, n, k),
            a,
            BSource::Patches(b),
            c,
            accumulate,
            None,
            threads,
        )
    };
    Ok(())
}

/// Row `i` of `C` through the epilogue ([`crate::batch_norm::epilogue_row`]), vectorized for
/// the CPU at hand.
fn apply_row(row: &mut [f32], e: &RowEpilogue<'_>, i: usize, ldc: usize) {
    let res = e.residual.map(|r| &r[i * ldc..i * ldc + row.len()]);
    multiversion!(|| epilogue_row(row, (e.scale[i], e.shift[i]), e.act, res));
}

thread_local! {
    /// Packed-`B` scratch reused across calls; taken while in use, so a re-entrant call just
    /// allocates its own.
    static PACK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// How a product's tiles are split into parallel jobs: `row_jobs x col_jobs` jobs, row-major
/// (job `j` takes row range `j / col_jobs`, column range `j % col_jobs`). Row ranges are
/// whole multiples of [`MR`] rows, column ranges whole [`NR`]-column panels, both as even as
/// the units allow; a job walks its panels in chunks of at most [`NC_PANELS`] (one packed
/// block of `B` each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Grid {
    /// Row panels of `MR` rows (the last may be partial).
    row_panels: usize,
    /// Column panels of `NR` columns (the last may be partial).
    panels: usize,
    row_jobs: usize,
    col_jobs: usize,
}

/// The share of a panel's compute that packing one `B` panel costs (a load and a store per
/// value against one `MR`-row tile of FMAs per depth step): what a split that packs `B`
/// once per row job pays.
const PACK_COST: f64 = 0.5;

impl Grid {
    /// The split for `threads` workers: one job when single-threaded, else the candidate
    /// (1, `t` or `2t` row ranges by 1, `t`, `2t` or `4t` column ranges, at least `2t` jobs
    /// where the tiles allow, so a worker slowed by a neighbour on the machine can leave jobs to
    /// the others: a 2-job split measured slower than the old grid in a noisy period) whose
    /// busiest worker has the least work, counting each tile by the 16-column vectors it
    /// computes and each packed panel by [`PACK_COST`], with the jobs dealt to the workers in
    /// contiguous runs (as rayon's splitting of the job range does when no one steals);
    /// ties go to fewer jobs. An uneven split costs a whole panel row per worker: 23 panels
    /// (1089 columns) in 4 column jobs leave one worker 12 panels and the other 11, 89
    /// panels (4225 columns) in jobs of at most 10 panels give one worker 50 and the other 39.
    fn new(m: usize, n: usize, threads: usize) -> Self {
        let (row_panels, panels) = (m.div_ceil(MR), n.div_ceil(NR));
        let one = Self {
            row_panels,
            panels,
            row_jobs: 1,
            col_jobs: 1,
        };
        let t = threads.max(1);
        if t == 1 {
            return one;
        }
        let mut best = (f64::INFINITY, usize::MAX, one);
        for r in [1, t, 2 * t] {
            for c in [1, t, 2 * t, 4 * t] {
                if r > row_panels || c > panels || r * c < (2 * t).min(row_panels * panels) {
                    continue;
                }
                let g = Self {
                    row_jobs: r,
                    col_jobs: c,
                    ..one
                };
                let cost = g.makespan(n, t);
                if cost < best.0 - 1e-9 || (cost <= best.0 + 1e-9 && r * c < best.1) {
                    best = (cost, r * c, g);
                }
            }
        }
        best.2
    }

    /// `[start, end)` of part `i` of `total` units split evenly into `parts`.
    fn part(total: usize, parts: usize, i: usize) -> (usize, usize) {
        (i * total / parts, (i + 1) * total / parts)
    }

    /// Row panels `[start, end)` of row job `ri`.
    fn row_range(&self, ri: usize) -> (usize, usize) {
        Self::part(self.row_panels, self.row_jobs, ri)
    }

    /// Column panels `[start, end)` of column job `ci`.
    fn col_range(&self, ci: usize) -> (usize, usize) {
        Self::part(self.panels, self.col_jobs, ci)
    }

    /// The work of the busiest of `t` workers (see [`Grid::new`]) for `n` columns, in
    /// full-tile units.
    fn makespan(&self, n: usize, t: usize) -> f64 {
        // Vectors of 16 columns of panel `q` over the vectors of a full panel. (An
        // approximation: the microkernel runs all three vectors' FMAs at the edge too, so an
        // edge panel costs a whole one; counting it whole moves the choice on some shapes,
        // e.g. 960 x 4225 from 4 column jobs to 2 x 2, which has not been measured.)
        let width = |q: usize| {
            let cols = (n - q * NR).min(NR);
            cols.div_ceil(16) as f64 / (NR / 16) as f64
        };
        let jobs = self.row_jobs * self.col_jobs;
        let job = |j: usize| {
            let (r0, r1) = self.row_range(j / self.col_jobs);
            let (c0, c1) = self.col_range(j % self.col_jobs);
            let w: f64 = (c0..c1).map(width).sum();
            (r1 - r0) as f64 * w + PACK_COST * (c1 - c0) as f64
        };
        (0..t)
            .map(|w| {
                let (j0, j1) = Self::part(jobs, t, w);
                (j0..j1).map(job).sum::<f64>()
            })
            .fold(0.0, f64::max)
    }
}

/// The AVX-512 blocked product (see the module docs).
///
/// # Safety
/// As [`sgemm_raw_ex`] with `m, n, k > 0`, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn blocked(
    (m, n, k): (usize, usize, usize),
    a: RawOperand,
    b: BSource<'_>,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) {
    use rayon::prelude::*;
    let g = Grid::new(m, n, threads);
    let kblocks = k.div_ceil(KC_MAX);
    let kc_max = k.div_ceil(kblocks);
    let pc = Ptr(c);
    let (pa, pb) = (Ptr(a), Ptr(b));
    let job = |j: usize| {
        let (ri, ci) = (j / g.col_jobs, j % g.col_jobs);
        let (r0, r1) = g.row_range(ri);
        let (i0, i1) = (r0 * MR, (r1 * MR).min(m));
        let (c0, c1) = g.col_range(ci);
        // Chunks of at most `NC_PANELS` panels, as even as whole panels allow.
        let chunks = (c1 - c0).div_ceil(NC_PANELS);
        let most = (c1 - c0).div_ceil(chunks);
        let mut buf = crate::cpu::take_buf(&PACK, kc_max * most * NR);
        // Whole-struct uses (not `pa.0`), so the closure captures the `Send` wrappers.
        let (a, b, c) = (pa.get(), pb.get(), pc);
        for ch in 0..chunks {
            let (q0, q1) = Grid::part(c1 - c0, chunks, ch);
            let (j0, j1) = ((c0 + q0) * NR, ((c0 + q1) * NR).min(n));
            let np = q1 - q0;
            for p0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - p0);
                // SAFETY: rows `p0..p0 + kc`, columns `j0..j1` of `B` are in bounds (checked by
                // the entry points); AVX-512F (this function's contract).
                unsafe { avx512::pack_b(b, p0, j0, kc, j1 - j0, &mut buf) };
                let first = p0 == 0 && !accumulate;
                let last = p0 + kc == k;
                for i in (i0..i1).step_by(MR) {
                    let r = MR.min(i1 - i);
                    if i + MR < i1 {
                        // The next row panel of `A` heads for L2 while this one is used.
                        let rn = MR.min(i1 - i - MR);
                        avx512::prefetch_a(a, i + MR, p0, rn, kc);
                    }
                    let e = match (&epi, last) {
                        (Some(e), true) => Some(avx512::TileEpilogue {
                            scale: &e.scale[i..i + r],
                            shift: &e.shift[i..i + r],
                            act: e.act,
                            residual: e.residual.map(|res| res.as_ptr().wrapping_add(i * ldc)),
                        }),
                        _ => None,
                    };
                    for q in 0..np {
                        let jj = j0 + q * NR;
                        // SAFETY: the tile's rows `i..i + r` and columns `jj..jj + cols` are this
                        // job's own part of `C`; `A` rows `i..i + r`, columns `p0..p0 + kc` are in
                        // bounds; panel `q` of the packed block holds `kc * NR` values.
                        let kernel = if a.transposed {
                            avx512::kernel_t
                        } else {
                            avx512::kernel
                        };
                        unsafe {
                            kernel(
                                kc,
                                a.at(i, p0),
                                a.ld,
                                r,
                                buf.as_ptr().add(q * kc * NR),
                                c.0.add(i * ldc + jj),
                                ldc,
                                NR.min(j1 - jj),
                                first,
                                e.map(|e| e.at_column(jj)),
                            )
                        }
                    }
                }
            }
        }
        crate::cpu::put_buf(&PACK, buf);
    };
    let jobs = g.row_jobs * g.col_jobs;
    if threads > 1 && jobs > 1 {
        (0..jobs).into_par_iter().for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, BSource, RawOperand, MR, NR};
    use std::arch::x86_64::*;

    const NV: usize = NR / 16;

    /// The first `n` (clamped to 0..=16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// The transpose of a 16 x 16 block held as 16 row vectors: `out[j][i] = rows[i][j]`
    /// (pairs interleaved, then 64-bit pairs, then 128-bit lanes gathered across the four
    /// row groups).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // t[2i] = (a0 b0 a1 b1 | ...), t[2i + 1] = (a2 b2 a3 b3 | ...) for rows a = 2i, b = 2i + 1.
        let t: [__m512; 16] = std::array::from_fn(|x| {
            let (a, b) = (r[x & !1], r[x | 1]);
            if x % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4g + k]: in each 128-bit lane L, rows 4g..4g + 4 at column 4L + k.
        let u: [__m512; 16] = std::array::from_fn(|x| {
            let (g, k) = (x / 4, x % 4);
            let (lo, hi) = (t[4 * g + k / 2], t[4 * g + 2 + k / 2]);
            if k % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(lo, hi)
            } else {
                _mm512_shuffle_ps::<0xEE>(lo, hi)
            }
        });
        // Column 4L + k gathers lane L of u[k], u[4 + k], u[8 + k], u[12 + k].
        let mut out = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let v1 = _mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]);
            let v2 = _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]);
            let w1 = _mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]);
            let w2 = _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]);
            out[k] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
            out[8 + k] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
            out[4 + k] = _mm512_shuffle_f32x4::<0x88>(v2, w2);
            out[12 + k] = _mm512_shuffle_f32x4::<0xDD>(v2, w2);
        }
        out
    }

    /// Packs rows `p0..p0 + kc`, columns `j0..j0 + cols` of `B` into `buf` as consecutive
    /// panels of `NR` columns, each `kc` rows of `NR` values, zero-padded past `cols`. A
    /// row-major `B` is read a row at a time across all the panels; a column-major one in 16 x
    /// 16 blocks (16 contiguous depths of 16 columns) transposed in registers into the panels; a
    /// gathered one ([`super::PatchRows`]) a row at a time through a row buffer.
    ///
    /// # Safety
    /// Those elements of `b` are readable (a gathered `B` checks its own reads); `buf` holds at
    /// least `kc * cols.div_ceil(NR) * NR` values; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_b(
        b: BSource<'_>,
        p0: usize,
        j0: usize,
        kc: usize,
        cols: usize,
        buf: &mut [f32],
    ) {
        let np = cols.div_ceil(NR);
        assert!(buf.len() >= kc * np * NR, "sgemm: packing buffer too small");
        let out = buf.as_mut_ptr();
        // The masks of the last panel's vectors.
        let last: [__mmask16; NV] =
            std::array::from_fn(|v| lanes((cols - (np - 1) * NR).saturating_sub(16 * v)));
        // Depth row `p` of the block, `cols` values from `src`, into row `p` of every panel.
        let panels_row = |src: *const f32, p: usize| {
            for q in 0..np {
                // SAFETY: panel `q` of the `cols` values at `src` (the last panel masked to
                // them, the caller's contract); the destination is panel `q`, row `p` of `buf`
                // (length checked above).
                unsafe {
                    let (s, dst) = (src.add(q * NR), out.add((q * kc + p) * NR));
                    if q + 1 < np {
                        for v in 0..NV {
                            _mm512_storeu_ps(dst.add(16 * v), _mm512_loadu_ps(s.add(16 * v)));
                        }
                    } else {
                        for (v, &mk) in last.iter().enumerate() {
                            let x = _mm512_maskz_loadu_ps(mk, s.add(16 * v));
                            _mm512_storeu_ps(dst.add(16 * v), x);
                        }
                    }
                }
            }
        };
        let b = match b {
            BSource::Matrix(b) => b,
            BSource::Patches(pr) => {
                // Each row's `cols` values gathered into a row buffer (runs of up to the
                // rectangle's width), then copied into the panels.
                let mut row = [0f32; NR * super::NC_PANELS];
                assert!(
                    cols <= row.len(),
                    "sgemm: patch block wider than a packed block"
                );
                for p in 0..kc {
                    pr.gather(p0 + p, j0, &mut row[..cols]);
                    panels_row(row.as_ptr(), p);
                }
                return;
            }
        };
        if !b.transposed {
            // Row by row across all the block's panels: each depth's `cols` values are read
            // as one contiguous run (a row-major `B` is the previous layer's output, cold in
            // the caches: panel by panel, every depth step was a separate 192-byte read
            // 4-17 KB from the last; 64 x 384 x 4225 212-272 -> 244-299 GFLOP/s, 96 x 576 x
            // 4225 252-259 -> 288-298, in-process A/B with cold operands).
            for p in 0..kc {
                panels_row(b.at(p0 + p, j0), p);
            }
            return;
        }
        for q in 0..np {
            let left = cols - q * NR;
            // A column-major `B`, in 16 x 16 blocks: 16 columns of 16 contiguous depths each,
            // transposed in registers into 16 panel rows.
            for v in 0..NV {
                let ncols = left.saturating_sub(16 * v).min(16);
                for pb in (0..kc).step_by(16) {
                    let depth = (kc - pb).min(16);
                    let dm = lanes(depth);
                    let rows: [__m512; 16] = std::array::from_fn(|cc| {
                        if cc < ncols {
                            // SAFETY: column `j0 + q * NR + 16 * v + cc < j0 + cols`,
                            // rows `p0 + pb..p0 + pb + depth` of `B` (masked).
                            unsafe {
                                _mm512_maskz_loadu_ps(dm, b.at(p0 + pb, j0 + q * NR + 16 * v + cc))
                            }
                        } else {
                            _mm512_setzero_ps()
                        }
                    });
                    let t = transpose16(rows);
                    for (i, &row) in t.iter().enumerate().take(depth) {
                        // SAFETY: panel `q`, row `pb + i < kc`, columns `16 * v..16 * v +
                        // 16` of `buf` (length checked above).
                        unsafe { _mm512_storeu_ps(out.add((q * kc + pb + i) * NR + 16 * v), row) };
                    }
                }
            }
        }
    }

    /// Prefetches rows `i0..i0 + rows`, columns `p0..p0 + kc` of `A` into L2. Prefetches do not
    /// fault, so this is safe for any address.
    #[inline]
    pub(super) fn prefetch_a(a: RawOperand, i0: usize, p0: usize, rows: usize, kc: usize) {
        let fetch = |p: *const f32| {
            // SAFETY: a prefetch is a hint: it never faults nor changes memory.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
        };
        if a.transposed {
            // Column `p` holds the panel's rows contiguously: one or two lines.
            for p in p0..p0 + kc {
                fetch(a.at(i0, p));
                fetch(a.at(i0 + rows - 1, p));
            }
        } else {
            for r in i0..i0 + rows {
                for q in (p0..p0 + kc).step_by(16).chain([p0 + kc - 1]) {
                    fetch(a.at(r, q));
                }
            }
        }
    }

    /// A tile's epilogue: the scales and shifts of its rows, the activation, and the address of
    /// the residual element of its first row and column (row stride `ldc`, like `C`).
    #[derive(Clone, Copy)]
    pub(super) struct TileEpilogue<'a> {
        pub scale: &'a [f32],
        pub shift: &'a [f32],
        pub act: Activation,
        pub residual: Option<*const f32>,
    }

    impl TileEpilogue<'_> {
        /// The epilogue of the tile `jj` columns to the right.
        pub fn at_column(self, jj: usize) -> Self {
            Self {
                residual: self.residual.map(|r| r.wrapping_add(jj)),
                ..self
            }
        }
    }

    /// `act(v * s + t (+ r))` on a vector.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn finish(v: __m512, s: f32, t: f32, r: Option<__m512>, act: Activation) -> __m512 {
        let y = _mm512_fmadd_ps(v, _mm512_set1_ps(s), _mm512_set1_ps(t));
        let y = match r {
            Some(r) => _mm512_add_ps(y, r),
            None => y,
        };
        match act {
            Activation::None => y,
            Activation::Relu => _mm512_max_ps(y, _mm512_setzero_ps()),
            Activation::Relu6 => {
                // Operand order: `max`/`min` return their second operand when either is NaN,
                // so a NaN stays NaN, as `f32::clamp` keeps it.
                _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(_mm512_setzero_ps(), y))
            }
        }
    }

    /// Defines a microkernel for one storage order of `A`: `$row` is the step between the
    /// tile's rows, `$depth` between its columns (the two are kept as separate functions with
    /// literal steps: LLVM keeps the 24 accumulators in registers only for these simple forms).
    macro_rules! tile_kernel {
        ($(#[$doc:meta])* $name:ident, row_step: $row:expr, depth_step: $depth:expr) => {
            $(#[$doc])*
            ///
            /// One `rows x cols` tile (`rows <= MR`, `cols <= NR`) of `C`: zero (`first`) or the
            /// partial sums in `C`, plus `A[rows x kc] · Bpanel[kc x NR]` as in-order FMA
            /// chains, stored back, through `epi` (scale and shift of the tile's rows,
            /// residual, activation) when given; `a` is the tile's first element of `A`.
            ///
            /// # Safety
            /// `a` readable at every element `(i, p)`, `i < rows`, `p < kc`, of its layout; `b`
            /// at `p * NR + j` for `p < kc`, `j < NR`; `c` readable (unless `first`) and
            /// writable at `i * ldc + j` for `i < rows`, `j < cols`, and so the residual of
            /// `epi`, if any, readable; `1 <= rows <= MR`, `1 <= cols <= NR`; AVX-512F.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $name(
                kc: usize,
                a: *const f32,
                lda: usize,
                rows: usize,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                cols: usize,
                first: bool,
                epi: Option<TileEpilogue<'_>>,
            ) {
                let masks: [__mmask16; NV] =
                    std::array::from_fn(|v| lanes(cols.saturating_sub(16 * v)));
                if let Some(r) = epi.and_then(|e| e.residual) {
                    // The tile's residual lines head for L1 while the products run, so the
                    // epilogue's loads do not wait on memory (ResNet-101's 33 residual 1x1 convs:
                    // 68 -> 62 ms in alternating profiles).
                    for i in 0..rows {
                        for v in (0..cols).step_by(16) {
                            _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(i * ldc + v) as *const i8);
                        }
                    }
                }
                if first {
                    // The tile's lines of `C` are requested for writing now, so the stores
                    // after the product loop do not each wait for their line (a product with a
                    // short depth and a large `C`, as MobileNetV2's 160 -> 960 expansion at
                    // 65x65, writes 16 MB past the caches; alternating in one process: 960 x
                    // 160 x 4225 276 -> 336-351 GFLOP/s median, 384 x 64 x 4225 188 -> 273,
                    // 1024 x 256 x 1089 329 -> 373, 256 x 256 x 16641 286 -> 322).
                    for i in 0..rows {
                        for v in (0..cols).step_by(16) {
                            _mm_prefetch::<_MM_HINT_ET0>(c.wrapping_add(i * ldc + v) as *const i8);
                        }
                    }
                }
                let mut acc = [[_mm512_setzero_ps(); NV]; MR];
                let row_step: usize = $row(lda);
                // Rows past the edge repeat the last row: computed, never stored.
                let ap: [*const f32; MR] =
                    std::array::from_fn(|i| a.wrapping_add(i.min(rows - 1) * row_step));
                if !first {
                    for (i, acc) in acc.iter_mut().enumerate() {
                        if i < rows {
                            for (v, acc) in acc.iter_mut().enumerate() {
                                // SAFETY: masked to the tile's columns of row `i`.
                                *acc = unsafe {
                                    _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v))
                                };
                            }
                        }
                    }
                }
                for p in 0..kc {
                    // SAFETY: row `p` of the packed panel and column `p` of the tile's rows of
                    // `A`.
                    unsafe {
                        let bp = b.add(p * NR);
                        let bv: [__m512; NV] =
                            std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
                        let off: usize = $depth(p, lda);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let av = _mm512_set1_ps(*ap[i].add(off));
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
                                Some(e) => {
                                    // SAFETY: masked to the tile's columns of row `i`.
                                    let r = e.residual.map(|r| unsafe {
                                        _mm512_maskz_loadu_ps(masks[v], r.add(i * ldc + 16 * v))
                                    });
                                    finish(x, e.scale[i], e.shift[i], r, e.act)
                                }
                                None => x,
                            };
                            // SAFETY: masked to the tile's columns of row `i`.
                            unsafe { _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), masks[v], y) };
                        }
                    }
                }
            }
        };
    }

    tile_kernel!(
        /// The microkernel for a row-major `A` (row stride `lda`).
        kernel,
        row_step: |lda| lda,
        depth_step: |p, _lda| p
    );
    tile_kernel!(
        /// The microkernel for a column-major `A` (column stride `lda`).
        kernel_t,
        row_step: |_lda| 1,
        depth_step: |p, lda| p * lda
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_the_matrix() {
        for (m, n, t) in [
            (1, 1, 1),
            (1, 1, 2),
            (728, 1089, 2),
            (3, 5000, 2),
            (2048, 17, 4),
            (9, 48, 2),
            (960, 4225, 2),
            (64, 4225, 3),
            (256, 289, 2),
        ] {
            let g = Grid::new(m, n, t);
            // Every tile (row panel, column panel) belongs to exactly one job.
            let mut seen = vec![0u8; g.row_panels * g.panels];
            for j in 0..g.row_jobs * g.col_jobs {
                let (r0, r1) = g.row_range(j / g.col_jobs);
                let (c0, c1) = g.col_range(j % g.col_jobs);
                assert!(r0 < r1 && c0 < c1, "{m}x{n}/{t}: empty job {j} of {g:?}");
                for r in r0..r1 {
                    for c in c0..c1 {
                        seen[r * g.panels + c] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{m}x{n}/{t}: {g:?}");
            assert_eq!((g.row_panels, g.panels), (m.div_ceil(MR), n.div_ceil(NR)));
        }
    }

    /// A gathered `B` gives the very bits of the product with the written-out patch matrix,
    /// for depth blocks that cross taps and column ranges that cross rectangle rows, on 1 and
    /// 2 threads, plain and accumulating; an operand reaching past its input is refused.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn patch_rows_match_the_patch_matrix() -> Result<()> {
        if !crate::cpu::has_avx512() {
            return Ok(());
        }
        let (cin, h, w) = (300, 9, 23);
        let x: Vec<f32> = (0..cin * h * w)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect();
        // A 5-row x 17-column rectangle from (1, 2), taps reading at (0, 0), (1, 3), (2, 4).
        let (rows, nx) = (5, 17);
        let tap_off = [w + 2, 2 * w + 5, 3 * w + 6];
        let pr = PatchRows {
            x: &x,
            plane: h * w,
            cin,
            row_step: w,
            nx,
            tap_off: &tap_off,
        };
        let (m, n, k) = (37, rows * nx, 3 * cin);
        let mut bm = vec![0f32; k * n];
        for (p, row) in bm.chunks_exact_mut(n).enumerate() {
            pr.gather(p, 0, row);
        }
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        for (threads, accumulate) in [(1, false), (2, false), (2, true)] {
            let mut want = vec![0.25f32; m * n];
            let mut got = want.clone();
            sgemm_ex(
                (m, n, k),
                Operand::rows(&a, k),
                Operand::rows(&bm, n),
                (&mut want, n),
                accumulate,
                None,
                threads,
            )?;
            // SAFETY: `a` is `m x k`, `got` `m x n`; AVX-512 checked above.
            unsafe {
                sgemm_patches(
                    (m, n, k),
                    RawOperand::rows(a.as_ptr(), k),
                    pr,
                    (got.as_mut_ptr(), n),
                    accumulate,
                    threads,
                )?
            };
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "{threads} threads, accumulate {accumulate}");
        }
        // The last element read: the last channel's last tap, last row, last column.
        let need = (cin - 1) * h * w + tap_off[2] + (rows - 1) * w + nx;
        let (exact, short) = (&x[..need], &x[..need - 1]);
        assert!(PatchRows { x: exact, ..pr }.check(k, n).is_ok());
        assert!(PatchRows { x: short, ..pr }.check(k, n).is_err());
        assert!(pr.check(4 * cin, n).is_err(), "a fourth tap does not exist");
        Ok(())
    }

    /// The busiest worker's share of the tiles stays within a few percent of an even split
    /// on the model's shapes (the previous fixed-size column jobs left 12 of 23 panels to one
    /// of two workers, and 50 of 89).
    #[test]
    fn grid_balances_the_workers() {
        for (m, n, t, within) in [
            (728, 1089, 2, 1.02),
            (1024, 1089, 2, 1.02),
            (256, 1089, 2, 1.03),
            (960, 4225, 2, 1.02),
            (160, 4225, 2, 1.02),
            (256, 16641, 2, 1.02),
            (2048, 1089, 4, 1.03),
        ] {
            let g = Grid::new(m, n, t);
            let one = Grid::new(m, n, 1);
            let even = one.makespan(n, 1) / t as f64;
            let got = g.makespan(n, t);
            assert!(
                got <= within * even,
                "{m}x{n} on {t}: busiest {got:.1} vs even {even:.1} ({g:?})"
            );
        }
        // A single row panel can only be split by columns; a single column panel by rows.
        assert_eq!(Grid::new(8, 4225, 2).row_jobs, 1);
        assert_eq!(Grid::new(2048, 40, 2).col_jobs, 1);
    }
}
