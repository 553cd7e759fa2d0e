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
//!
//! `sgemm_packed` is the same blocked product with `B` produced block by block by the caller
//! instead of copied from a matrix (the fused separable convolution computes its depthwise
//! outputs there, `crate::separable`).
//!
//! `sgemm_pixels` is the same microkernel with the roles of a convolution's operands turned
//! around: `A` the output pixels of a rectangle, read in place from a channels-last image one
//! tap at a time (`PixelRows`), `B` the weights packed once per call (`pack_conv_weights`),
//! `C` pixel-major (the atrous convolutions' rectangle path, `crate::conv`).

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
        let pb = Ptr(b);
        // SAFETY: rows `p0..p0 + kc`, columns `j0..j0 + cols` of `B` are in bounds (the caller's
        // contract, as `blocked` asks only for those); AVX-512F checked above.
        let pack = move |p0, j0, kc, cols, buf: &mut [f32]| unsafe {
            avx512::pack_b(pb.get(), p0, j0, kc, cols, buf)
        };
        // SAFETY: the CPU has AVX-512F; the caller's contract covers the rest.
        unsafe {
            blocked(
                (m, n, k),
                a,
                &pack,
                PACK_COST,
                (KC_MAX, NC_PANELS),
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

/// An `A` operand whose rows are the output pixels of a rectangle and whose depth runs over
/// the input channels of one convolution tap, read in place from a channels-last (NHWC)
/// image: element `(i, c)` is `x[(first + (i / nx) * row_step + (i % nx) * col_step) * cin +
/// c]`, `first` being the pixel the tap reads for the rectangle's first output. With the tap's
/// weights packed ([`pack_conv_weights`]), a convolution over a rectangle is a sum of such
/// products with nothing gathered ([`sgemm_pixels`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PixelRows<'a> {
    /// The image, `cin` values per pixel.
    pub x: &'a [f32],
    /// Input channels.
    pub cin: usize,
    /// Input pixels between consecutive rows of the rectangle.
    pub row_step: usize,
    /// Input pixels between consecutive columns of the rectangle (the stride).
    pub col_step: usize,
    /// The rectangle's width.
    pub nx: usize,
    /// The pixel read for the rectangle's first output.
    pub first: usize,
}

impl PixelRows<'_> {
    /// Checks that every element of an `m`-row operand lies inside `x`.
    fn check(&self, m: usize) -> Result<()> {
        if self.nx == 0 || self.cin == 0 || m == 0 {
            bail!(
                "sgemm: empty pixel operand ({m} rows of {} channels, {} wide)",
                self.cin,
                self.nx
            )
        }
        // The farthest pixel from the first: the last row's last, or the row before's end.
        let (r, cs) = ((m - 1) / self.nx, self.col_step);
        let far = (r * self.row_step + (m - 1) % self.nx * cs)
            .max((r * self.row_step + (self.nx - 1) * cs).saturating_sub(self.row_step));
        let need = (self.first + far + 1) * self.cin;
        if self.x.len() < need {
            bail!(
                "sgemm: pixel rows reach element {need} of an image of {}",
                self.x.len()
            )
        }
        Ok(())
    }
}

/// The length of one tap's packed weights ([`pack_conv_weights`]) for `cin` input and `cout`
/// output channels.
pub(crate) fn packed_len(cin: usize, cout: usize) -> usize {
    cout.div_ceil(NR) * cin * NR
}

/// A convolution's weights `w` (`[cout][cin][taps]`, as stored) packed into `dst` as one `cin x
/// cout` `B` operand of [`sgemm_pixels`] per tap, tap `t`'s from `t * packed_len(cin, cout)`:
/// [`NR`]-column panels of `cin` rows each, `(q * cin + c) * NR + j` the weight of output
/// channel `q * NR + j` for input channel `c` (the last panel's columns past `cout` are left as
/// they are: their products are never stored). One pass over `w`: packing tap by tap read all
/// of it per tap (its taps are adjacent), 9 ms for ResNet-101's 2048 -> 256 ASPP branch.
pub(crate) fn pack_conv_weights(
    w: &[f32],
    (cout, cin, taps): (usize, usize, usize),
    dst: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    let len = packed_len(cin, cout);
    if w.len() != cout * cin * taps || dst.len() < taps * len || cin == 0 || taps == 0 {
        bail!(
            "sgemm: {} weights as {cout} x {cin} x {taps} packed into {} values",
            w.len(),
            dst.len()
        )
    }
    // Jobs of 16 input channels of one panel: each output channel's weights for them are one
    // contiguous read, scattered into 16 rows of every tap's panel.
    const BLOCK: usize = 16;
    let (panels, blocks) = (cout.div_ceil(NR), cin.div_ceil(BLOCK));
    let out = Ptr(dst.as_mut_ptr());
    (0..panels * blocks).into_par_iter().for_each(|job| {
        let (q, c0) = (job / blocks, job % blocks * BLOCK);
        let cb = BLOCK.min(cin - c0);
        let out = out.get();
        for jj in 0..NR.min(cout - q * NR) {
            let o = q * NR + jj;
            let src = &w[(o * cin + c0) * taps..(o * cin + c0 + cb) * taps];
            for (c, tw) in src.chunks_exact(taps).enumerate() {
                for (t, &v) in tw.iter().enumerate() {
                    let at = t * len + (q * cin + c0 + c) * NR + jj;
                    // SAFETY: `at < taps * len <= dst.len()`; jobs write disjoint rows (their
                    // panel's rows `c0..c0 + cb` of each tap).
                    unsafe { *out.add(at) = v };
                }
            }
        }
    });
    Ok(())
}

/// `C[m x n] = A · B`, or `C += A · B` with `accumulate`, for `A` the pixel rows of a
/// rectangle at one tap ([`PixelRows`], depth `cin`) and `B` that tap's weights packed by
/// [`pack_conv_weights`] (`n` output channels): no operand is packed or copied. `C` is
/// `m x n` row-major (pixel-major). Each element is one in-order FMA chain over the channels,
/// continuing from `C` when accumulating. Needs AVX-512 ([`crate::cpu::has_avx512`]).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn sgemm_pixels(
    m: usize,
    a: PixelRows<'_>,
    (b, n): (&[f32], usize),
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    a.check(m)?;
    let cin = a.cin;
    if n == 0 || b.len() < packed_len(cin, n) || c.len() < m * n {
        bail!(
            "sgemm: {m} x {n} pixel product with {} packed weights ({cin} channels) into {}",
            b.len(),
            c.len()
        )
    }
    let g = Grid::new(m, n, threads, PACK_COST);
    let kc_max = depth_block(cin);
    let pc = Ptr(c.as_mut_ptr());
    g.run(threads, |j| {
        let ((i0, i1), (q0, q1)) = g.job(j, m);
        let c = pc;
        let tile = |i: usize| avx512::PixelTile {
            i0: i,
            nx: a.nx,
            row_step: a.row_step * cin,
            col_step: a.col_step * cin,
        };
        for c0 in (0..cin).step_by(kc_max) {
            let kc = kc_max.min(cin - c0);
            let first = c0 == 0 && !accumulate;
            // The rows' pointers are derived from a base passed by value: pointers loaded from
            // memory made LLVM store the 24 accumulators to the stack at every depth step.
            let base = a.x.as_ptr().wrapping_add(a.first * cin + c0);
            for i in (i0..i1).step_by(MR) {
                let r = MR.min(i1 - i);
                for q in q0..q1 {
                    let jj = q * NR;
                    // SAFETY: the tile's rows `i..i + r` and columns `jj..` are this job's
                    // own part of `C` (`m x n`, length checked); the rows of `A` hold `kc`
                    // channels from `c0` inside `x` (checked above); panel `q` holds `cin`
                    // rows of `NR` values (length checked), read from row `c0`.
                    unsafe {
                        avx512::kernel_pixels(
                            kc,
                            (base, &tile(i)),
                            0,
                            r,
                            b.as_ptr().add((q * cin + c0) * NR),
                            c.get().add(i * n + jj),
                            n,
                            NR.min(n - jj),
                            first,
                            None,
                        )
                    }
                }
            }
        }
    });
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

/// A source of packed `B` blocks for [`sgemm_packed`]: `pack(p0, j0, kc, cols, buf)` writes
/// rows `p0..p0 + kc`, columns `j0..j0 + cols` of `B` as `cols.div_ceil(NR)` panels of `kc`
/// rows of [`NR`] values each (panel `q`, row `p` at `buf[(q * kc + p) * NR..][..NR]`), the
/// last panel's columns past `cols` zero. `j0` is a multiple of `NR`.
pub(crate) type PackB<'a> = dyn Fn(usize, usize, usize, usize, &mut [f32]) + Sync + 'a;

impl Grid {
    /// The split for `threads` workers: one job when single-threaded, else the candidate
    /// (1, `t` or `2t` row ranges by 1, `t`, `2t` or `4t` column ranges, at least `2t` jobs
    /// where the tiles allow, so a worker slowed by a neighbour on the machine can leave jobs to
    /// the others: a 2-job split measured slower than the old grid in a noisy period) whose
    /// busiest worker has the least work, counting each tile by the 16-column vectors it
    /// computes and each packed panel by `pack_cost` ([`PACK_COST`] for a copy), with the
    /// jobs dealt to the workers in contiguous runs (as rayon's splitting of the job range
    /// does when no one steals);
    /// ties go to fewer jobs. An uneven split costs a whole panel row per worker: 23 panels
    /// (1089 columns) in 4 column jobs leave one worker 12 panels and the other 11, 89
    /// panels (4225 columns) in jobs of at most 10 panels give one worker 50 and the other 39.
    fn new(m: usize, n: usize, threads: usize, pack_cost: f64) -> Self {
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
                let cost = g.makespan(n, t, pack_cost);
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

    /// Job `j`'s rows `[i0, i1)` of an `m`-row product and its column panels `[c0, c1)`.
    fn job(&self, j: usize, m: usize) -> ((usize, usize), (usize, usize)) {
        let (r0, r1) = self.row_range(j / self.col_jobs);
        (
            (r0 * MR, (r1 * MR).min(m)),
            self.col_range(j % self.col_jobs),
        )
    }

    /// Runs `job` on every job index, on the rayon pool when `threads > 1` and there is more
    /// than one job.
    fn run(&self, threads: usize, job: impl Fn(usize) + Sync + Send) {
        use rayon::prelude::*;
        let jobs = self.row_jobs * self.col_jobs;
        if threads > 1 && jobs > 1 {
            (0..jobs).into_par_iter().for_each(job);
        } else {
            (0..jobs).for_each(job);
        }
    }

    /// The work of the busiest of `t` workers (see [`Grid::new`]) for `n` columns, in
    /// full-tile units.
    fn makespan(&self, n: usize, t: usize, pack_cost: f64) -> f64 {
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
            (r1 - r0) as f64 * w + pack_cost * (c1 - c0) as f64
        };
        (0..t)
            .map(|w| {
                let (j0, j1) = Self::part(jobs, t, w);
                (j0..j1).map(job).sum::<f64>()
            })
            .fold(0.0, f64::max)
    }
}

/// The depth block of a `k`-deep product: at most [`KC_MAX`], the blocks as even as possible.
fn depth_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC_MAX))
}

/// `C = A · B` (or `C += A · B`) with `B` given by a packer (see [`PackB`]) instead of a
/// stored matrix, then the epilogue: the blocked product of [`sgemm_raw_ex`] with `pack`
/// producing each `kc x nc` block where that one copies it from `B`. `pack_cost` is what
/// packing one panel costs against one `MR x NR` tile of the product (for splitting the work;
/// a copy is [`PACK_COST`]). `blocking` is the largest depth block and the most column panels
/// per packed block (the plain product's are [`KC_MAX`] and [`NC_PANELS`]). A block is
/// produced once per row job, so `pack` must give the same values every time it is asked for
/// the same block. Needs AVX-512 ([`crate::cpu::has_avx512`]).
///
/// # Safety
/// As [`sgemm_raw_ex`] for `A`, `C` and `epi`, with `m, n, k > 0`; `pack` must write the
/// packed block it is asked for into its buffer; the CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_packed(
    (m, n, k): (usize, usize, usize),
    a: RawOperand,
    pack: &PackB<'_>,
    pack_cost: f64,
    blocking: (usize, usize),
    (c, ldc): (*mut f32, usize),
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) {
    // SAFETY: forwarded (this function's contract).
    unsafe {
        blocked(
            (m, n, k),
            a,
            pack,
            pack_cost,
            blocking,
            (c, ldc),
            false,
            epi,
            threads,
        )
    }
}

/// The AVX-512 blocked product (see the module docs).
///
/// # Safety
/// As [`sgemm_raw_ex`] with `m, n, k > 0`, `pack` writing the packed blocks of `B` it is
/// asked for, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    (m, n, k): (usize, usize, usize),
    a: RawOperand,
    pack: &PackB<'_>,
    pack_cost: f64,
    (kc_limit, nc_panels): (usize, usize),
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
    epi: Option<RowEpilogue<'_>>,
    threads: usize,
) {
    let g = Grid::new(m, n, threads, pack_cost);
    let kc_max = k.div_ceil(k.div_ceil(kc_limit));
    let pc = Ptr(c);
    let pa = Ptr(a);
    g.run(threads, |j| {
        let ((i0, i1), (c0, c1)) = g.job(j, m);
        // Chunks of at most `NC_PANELS` panels, as even as whole panels allow.
        let chunks = (c1 - c0).div_ceil(nc_panels);
        let most = (c1 - c0).div_ceil(chunks);
        let mut buf = crate::cpu::take_buf(&PACK, kc_max * most * NR);
        // Whole-struct uses (not `pa.0`), so the closure captures the `Send` wrappers.
        let (a, c) = (pa.get(), pc);
        for ch in 0..chunks {
            let (q0, q1) = Grid::part(c1 - c0, chunks, ch);
            let (j0, j1) = ((c0 + q0) * NR, ((c0 + q1) * NR).min(n));
            let np = q1 - q0;
            for p0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - p0);
                pack(p0, j0, kc, j1 - j0, &mut buf);
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
                        if !first {
                            // The next tile's partial sums (written a whole depth block ago,
                            // out of L2 by now) head for L1 while this tile runs, so its reload
                            // does not stall its first FMAs (in-process A/B, 2 threads, 40
                            // alternating calls, two runs: 728 x 728 x 1089 +0.3% / +1.8%,
                            // 2048 x 1536 x 1089 +1.2 / +1.7, 728 x 1089 x 728 +1.7 / +1.2;
                            // 256 x 2304 x 1089 0.0 / -0.1). A write prefetch of the tile's own
                            // lines just before their reload (sixth session) came too late to
                            // matter.
                            let (ni, nj, nr) = if q + 1 < np {
                                (i, jj + NR, r)
                            } else {
                                (i + MR, j0, MR.min(i1.saturating_sub(i + MR)))
                            };
                            avx512::prefetch_c(c.0, ldc, ni, nj, nr, NR.min(j1.saturating_sub(nj)));
                        }
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
    });
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::transpose16;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, RawOperand, MR, NR};
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
    pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
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
    /// 16 blocks (16 contiguous depths of 16 columns) transposed in registers into the panels.
    ///
    /// # Safety
    /// Those elements of `b` are readable; `buf` holds at least `kc * cols.div_ceil(NR) * NR`
    /// values; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_b(
        b: RawOperand,
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

    /// Prefetches rows `i0..i0 + rows`, columns `j0..j0 + cols` of `C` (row stride `ldc`) into
    /// L1. Prefetches do not fault, so this is safe for any address.
    #[inline]
    pub(super) fn prefetch_c(
        c: *mut f32,
        ldc: usize,
        i0: usize,
        j0: usize,
        rows: usize,
        cols: usize,
    ) {
        for r in i0..i0 + rows {
            for v in (0..cols).step_by(16) {
                // SAFETY: a prefetch is a hint: it never faults nor changes memory.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + j0 + v) as *const i8)
                }
            }
        }
    }

    /// A tile of rows of a [`super::PixelRows`] operand: row `i` starts at `base + ((i0 + i)
    /// / nx) * row_step + ((i0 + i) % nx) * col_step` (steps in elements).
    #[derive(Clone, Copy)]
    pub(super) struct PixelTile {
        pub i0: usize,
        pub nx: usize,
        pub row_step: usize,
        pub col_step: usize,
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

    /// Expands the body once per listed literal row index of an `MR`-row tile, so each use
    /// of an accumulator row has a constant index.
    macro_rules! unroll_rows {
        ($($i:literal),*; |$v:ident| $body:expr) => {
            const _: () = assert!(MR == [$($i),*].len());
            $({
                let $v: usize = $i;
                $body;
            })*
        };
    }

    /// Defines a microkernel for one storage order of `A`: `$depth` is the step between a
    /// row's consecutive depths (kept as separate functions with literal steps: LLVM keeps
    /// the 24 accumulators in registers only for these simple forms).
    macro_rules! tile_kernel {
        ($(#[$doc:meta])* $name:ident, a: $aty:ty, rows: $rows:expr, depth_step: $depth:expr) => {
            $(#[$doc])*
            ///
            /// One `rows x cols` tile (`rows <= MR`, `cols <= NR`) of `C`: zero (`first`) or the
            /// partial sums in `C`, plus `A[rows x kc] · Bpanel[kc x NR]` as in-order FMA
            /// chains, stored back, through `epi` (scale and shift of the tile's rows,
            /// residual, activation) when given; `a` gives the tile's first element of `A`.
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
                a: $aty,
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
                // Rows past the edge repeat the last row: computed, never stored. (Built whole,
                // with no per-row condition: filling the partial sums in place row by row
                // under `i < rows` made LLVM zero the accumulators on the stack with a
                // `memset` call on every tile, ~2% of MobileNetV2's pass.)
                let mut acc: [[__m512; NV]; MR] = if first {
                    [[_mm512_setzero_ps(); NV]; MR]
                } else {
                    std::array::from_fn(|i| {
                        std::array::from_fn(|v| {
                            // SAFETY: masked to the tile's columns of row `i` (or, past the
                            // edge, of the last row).
                            unsafe {
                                _mm512_maskz_loadu_ps(
                                    masks[v],
                                    c.add(i.min(rows - 1) * ldc + 16 * v),
                                )
                            }
                        })
                    })
                };
                let ap: [*const f32; MR] = $rows(a, lda, rows);
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
                // Row by row with constant indices, so the accumulators stay in registers (a
                // loop over the rows, or a closure taking a row by reference, made LLVM copy
                // them to the stack to index them).
                unroll_rows!(0, 1, 2, 3, 4, 5, 6, 7; |i| if i < rows {
                    for (v, &x) in acc[i].iter().enumerate() {
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
                });
            }
        };
    }

    tile_kernel!(
        /// The microkernel for a row-major `A` (row stride `lda`).
        kernel,
        a: *const f32,
        rows: |a: *const f32, lda: usize, rows: usize| {
            std::array::from_fn(|i| a.wrapping_add(i.min(rows - 1) * lda))
        },
        depth_step: |p, _lda| p
    );
    tile_kernel!(
        /// The microkernel for a column-major `A` (column stride `lda`).
        kernel_t,
        a: *const f32,
        rows: |a: *const f32, _lda: usize, rows: usize| {
            std::array::from_fn(|i| a.wrapping_add(i.min(rows - 1)))
        },
        depth_step: |p, lda| p * lda
    );
    tile_kernel!(
        /// The microkernel for rows of `A` that are a rectangle's pixels ([`PixelTile`]),
        /// each contiguous along the depth (`lda` unused).
        kernel_pixels,
        a: (*const f32, &PixelTile),
        rows: |(base, a): (*const f32, &PixelTile), _lda: usize, rows: usize| {
            let (mut r, mut c) = (a.i0 / a.nx, a.i0 % a.nx);
            std::array::from_fn(|i| {
                let p = base.wrapping_add(r * a.row_step + c * a.col_step);
                if i + 1 < rows {
                    c += 1;
                    if c == a.nx {
                        (r, c) = (r + 1, 0);
                    }
                }
                p
            })
        },
        depth_step: |p, _lda| p
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
            let g = Grid::new(m, n, t, PACK_COST);
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

    /// A convolution's taps as pixel-row products by packed weights give the very bits of
    /// the plain products of the written-out pixel rows and weight matrices, accumulated tap
    /// by tap: a strided rectangle narrower than a tile (tiles cross its rows), two depth
    /// blocks, a partial last panel, 1 and 2 threads. Operands reaching past the image, and
    /// weights of the wrong size, are refused.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pixel_rows_match_the_plain_product() -> Result<()> {
        if !crate::cpu::has_avx512() {
            return Ok(());
        }
        let (h, w, cin, cout, taps) = (17, 17, 600, 70, 3);
        let x: Vec<f32> = (0..h * w * cin)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect();
        let wts: Vec<f32> = (0..cout * cin * taps)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        let mut packed = vec![f32::NAN; taps * packed_len(cin, cout)];
        pack_conv_weights(&wts, (cout, cin, taps), &mut packed)?;
        // A 7-row x 5-column rectangle, columns 2 pixels apart, rows 2 image rows apart; tap
        // `t` reads from pixel `first[t]`.
        let (rows, nx, row_step, col_step) = (7, 5, 2 * w, 2);
        let first = [0, w + 3, 2 * w + 6];
        let m = rows * nx;
        let pixel = |t: usize, i: usize| first[t] + (i / nx) * row_step + (i % nx) * col_step;
        for threads in [1, 2] {
            let mut want = vec![0f32; m * cout];
            let mut got = vec![f32::NAN; m * cout];
            for t in 0..taps {
                let a: Vec<f32> = (0..m)
                    .flat_map(|i| x[pixel(t, i) * cin..(pixel(t, i) + 1) * cin].to_vec())
                    .collect();
                let b: Vec<f32> = (0..cin)
                    .flat_map(|c| (0..cout).map(move |o| (o, c)))
                    .map(|(o, c)| wts[(o * cin + c) * taps + t])
                    .collect();
                sgemm_ex(
                    (m, cout, cin),
                    Operand::rows(&a, cin),
                    Operand::rows(&b, cout),
                    (&mut want, cout),
                    t > 0,
                    None,
                    threads,
                )?;
                let pr = PixelRows {
                    x: &x,
                    cin,
                    row_step,
                    col_step,
                    nx,
                    first: first[t],
                };
                let len = packed_len(cin, cout);
                let bt = (&packed[t * len..(t + 1) * len], cout);
                // SAFETY: AVX-512 checked above.
                unsafe { sgemm_pixels(m, pr, bt, &mut got, t > 0, threads)? };
            }
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "{threads} threads");
        }
        // The farthest element: the last tap's last pixel's last channel.
        let need = (pixel(2, m - 1) + 1) * cin;
        let pr = PixelRows {
            x: &x[..need],
            cin,
            row_step,
            col_step,
            nx,
            first: first[2],
        };
        assert!(pr.check(m).is_ok());
        assert!(PixelRows {
            x: &x[..need - 1],
            ..pr
        }
        .check(m)
        .is_err());
        let mut c = vec![0f32; m * cout];
        let short = (&packed[..packed_len(cin, cout) - 1], cout);
        // SAFETY: AVX-512 checked above.
        assert!(unsafe { sgemm_pixels(m, pr, short, &mut c, false, 1) }.is_err());
        assert!(pack_conv_weights(&wts[1..], (cout, cin, taps), &mut packed).is_err());
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
            let g = Grid::new(m, n, t, PACK_COST);
            let one = Grid::new(m, n, 1, PACK_COST);
            let even = one.makespan(n, 1, PACK_COST) / t as f64;
            let got = g.makespan(n, t, PACK_COST);
            assert!(
                got <= within * even,
                "{m}x{n} on {t}: busiest {got:.1} vs even {even:.1} ({g:?})"
            );
        }
        // A single row panel can only be split by columns; a single column panel by rows.
        assert_eq!(Grid::new(8, 4225, 2, PACK_COST).row_jobs, 1);
        assert_eq!(Grid::new(2048, 40, 2, PACK_COST).col_jobs, 1);
    }
}
