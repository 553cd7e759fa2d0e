//! im2col / col2im: the patch matrix of a 2-D convolution and its adjoint, with fast CPU kernels.
//!
//! `im2col` turns an NCHW input into `[N, Cin * kh * kw, Ho * Wo]`, rows ordered
//! `(cin, ky, kx)`, so that `w.reshape((Cout, Cin * kh * kw))` times the columns of one image is
//! the convolution output of that image, already in NCHW order. Row `(cin, ky, kx)` is the input
//! plane `cin` shifted by the tap's offset and subsampled by the stride: each output row of it is
//! one contiguous copy out of one input row (stride 1) or a strided gather (stride > 1), with the
//! zero border written once and no per-element index arithmetic. `col2im` is the adjoint
//! (scatter-add of the same windows back into the input planes) and is `im2col`'s backward;
//! `im2col` is in turn `col2im`'s backward. Both split their work by input plane across threads.
//!
//! Other devices use the composition of candle ops in [`crate::reference::im2col`].

use crate::cpu::{f32_slice, threads};
use crate::geometry::Conv2dGeometry;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The sizes of one plane's patch matrix.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Patches {
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
    pub kh: usize,
    pub kw: usize,
    sy: usize,
    sx: usize,
    dy: usize,
    dx: usize,
    pt: usize,
    pl: usize,
}

/// Output positions `o` in `[lo, hi)` whose input coordinate `o * s + k * d - p` lies in
/// `[0, input)`, clamped to `[0, out)`.
#[inline(always)]
fn valid_range(k: usize, s: usize, d: usize, p: usize, input: usize, out: usize) -> (usize, usize) {
    let off = k * d;
    let lo = if off >= p { 0 } else { (p - off).div_ceil(s) };
    let hi = if off >= p + input {
        0
    } else {
        (p + input - 1 - off) / s + 1
    };
    let (lo, hi) = (lo.min(out), hi.min(out));
    (lo, hi.max(lo))
}

/// One output channel's weights `src` (`[Cin][taps]`, as stored) copied tap-major into `dst`
/// (`[taps][Cin]`), so each tap's row runs along the input channels. Plain scalar moves:
/// AVX-512 gathers of the strided taps, and stride-`taps` reads into in-order rows, measured
/// slower on Zen 5.
pub(crate) fn tap_major(src: &[f32], taps: usize, dst: &mut [f32]) {
    let cin = src.len() / taps;
    for (c, s) in src.chunks_exact(taps).enumerate() {
        for (t, &v) in s.iter().enumerate() {
            dst[t * cin + c] = v;
        }
    }
}

impl Patches {
    pub fn new(input: (usize, usize), kernel: (usize, usize), g: &Conv2dGeometry) -> Result<Self> {
        let (ho, wo) = g.output_size(input, kernel)?;
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
        })
    }

    /// Vertical and horizontal stride.
    pub fn strides(&self) -> (usize, usize) {
        (self.sy, self.sx)
    }

    /// Vertical and horizontal dilation.
    pub fn dilations(&self) -> (usize, usize) {
        (self.dy, self.dx)
    }

    /// Zero rows above and columns left of the input.
    pub fn pad_top_left(&self) -> (usize, usize) {
        (self.pt, self.pl)
    }

    /// Rows per input channel (`kh * kw`).
    pub fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// Writes patch row `t` (tap `(t / kw, t % kw)`) of one input plane `src` (`h * w`),
    /// restricted to output rows `[oy0, oy1)`, into `row` (`(oy1 - oy0) * wo`). Every element
    /// of `row` is written.
    #[inline(always)]
    pub fn fill_tap(&self, src: &[f32], t: usize, oy0: usize, oy1: usize, rows: &mut [f32]) {
        let (w, wo, sx) = (self.w, self.wo, self.sx);
        let (ky, kx) = (t / self.kw, t % self.kw);
        let (ylo, yhi) = valid_range(ky, self.sy, self.dy, self.pt, self.h, self.ho);
        let (xlo, xhi) = valid_range(kx, sx, self.dx, self.pl, w, wo);
        let n = xhi - xlo;
        for (oy, row) in (oy0..oy1).zip(rows.chunks_exact_mut(wo)) {
            if oy < ylo || oy >= yhi || n == 0 {
                row.fill(0.0);
                continue;
            }
            let iy = oy * self.sy + ky * self.dy - self.pt;
            let ix0 = xlo * sx + kx * self.dx - self.pl;
            let srow = &src[iy * w..(iy + 1) * w];
            row[..xlo].fill(0.0);
            row[xhi..].fill(0.0);
            let d = &mut row[xlo..xhi];
            if sx == 1 {
                d.copy_from_slice(&srow[ix0..ix0 + n]);
            } else if sx == 2 {
                // Even elements of pairs: a shuffle LLVM vectorizes, unlike `step_by`.
                let s = &srow[ix0..ix0 + 2 * n - 1];
                for (dv, pair) in d.iter_mut().zip(s.chunks_exact(2)) {
                    *dv = pair[0];
                }
                d[n - 1] = s[2 * n - 2];
            } else {
                let s = &srow[ix0..ix0 + (n - 1) * sx + 1];
                for (dv, sv) in d.iter_mut().zip(s.iter().step_by(sx)) {
                    *dv = *sv;
                }
            }
        }
    }

    /// The share of all `ho * wo * kh * kw` tap reads that fall in the zero padding.
    pub fn padding_share(&self) -> f64 {
        let valid = |segs: Vec<(usize, usize, usize, usize)>| -> usize {
            segs.iter()
                .map(|&(o0, o1, k0, k1)| (o1 - o0) * (k1 - k0))
                .sum()
        };
        let all = self.ho * self.wo * self.taps();
        if all == 0 {
            return 0.0;
        }
        let inside = valid(self.segments(true)) * valid(self.segments(false));
        1.0 - inside as f64 / all as f64
    }

    /// The output positions along one axis (`vertical` or horizontal) split into segments
    /// `(o0, o1, k0, k1)`: every output in `[o0, o1)` reads inside the input exactly for the
    /// taps `[k0, k1)` of that axis (a contiguous range, possibly empty), the others falling
    /// in the padding.
    pub fn segments(&self, vertical: bool) -> Vec<(usize, usize, usize, usize)> {
        let (k, s, d, p, input, out) = if vertical {
            (self.kh, self.sy, self.dy, self.pt, self.h, self.ho)
        } else {
            (self.kw, self.sx, self.dx, self.pl, self.w, self.wo)
        };
        let ranges: Vec<(usize, usize)> = (0..k)
            .map(|t| valid_range(t, s, d, p, input, out))
            .collect();
        let mut cuts: Vec<usize> = ranges.iter().flat_map(|&(lo, hi)| [lo, hi]).collect();
        cuts.extend([0, out]);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2)
            .map(|w| {
                let (o0, o1) = (w[0], w[1]);
                // A tap's valid outputs form one range, and the taps valid at a given output
                // form one range too (the input coordinate grows with the tap index).
                let valid = |&(lo, hi): &(usize, usize)| lo <= o0 && o1 <= hi;
                match ranges.iter().position(valid) {
                    Some(k0) => {
                        let k1 = k0 + ranges[k0..].iter().take_while(|r| valid(r)).count();
                        (o0, o1, k0, k1)
                    }
                    None => (o0, o1, 0, 0),
                }
            })
            .collect()
    }

    /// The input pixels between consecutive output rows and between consecutive output
    /// columns (the addressing of [`crate::sgemm::PixelRows`]).
    pub(crate) fn pixel_steps(&self) -> (usize, usize) {
        (self.sy * self.w, self.sx)
    }

    /// Where in an input plane tap `(ky, kx)` reads for output pixel `(oy, ox)`, which must read
    /// inside the input (as every pixel of a [`Patches::segments`] rectangle does for its taps).
    pub(crate) fn read_offset(&self, (ky, kx): (usize, usize), (oy, ox): (usize, usize)) -> usize {
        let iy = oy * self.sy + ky * self.dy - self.pt;
        let ix = ox * self.sx + kx * self.dx - self.pl;
        iy * self.w + ix
    }

    /// Writes the values tap `(ky, kx)` reads from input plane `src` for the output rectangle
    /// `[y0, y1) x [x0, x1)` into `dst` (row-major, `(y1 - y0) * (x1 - x0)`), every read
    /// inside the input (the rectangle lies in one segment of each axis with that tap valid).
    #[inline(always)]
    pub fn fill_rect(
        &self,
        src: &[f32],
        (ky, kx): (usize, usize),
        (y0, y1): (usize, usize),
        (x0, x1): (usize, usize),
        dst: &mut [f32],
    ) {
        let (sx, n) = (self.sx, x1 - x0);
        for (oy, d) in (y0..y1).zip(dst.chunks_exact_mut(n)) {
            let at = self.read_offset((ky, kx), (oy, x0));
            let s = &src[at..at + (n - 1) * sx + 1];
            if sx == 1 {
                d.copy_from_slice(s);
            } else {
                for (dv, sv) in d.iter_mut().zip(s.iter().step_by(sx)) {
                    *dv = *sv;
                }
            }
        }
    }

    /// The adjoint of [`Patches::fill_tap`] over all output rows and taps, for input rows
    /// `[iy0, iy0 + band.len() / w)` of one plane: adds what the `kh * kw` patch rows `cols`
    /// (`kh * kw` rows of `ho * wo`) read from those input rows into `band`.
    #[inline(always)]
    pub fn scatter_add(&self, cols: &[f32], iy0: usize, band: &mut [f32]) {
        let (w, wo, sx) = (self.w, self.wo, self.sx);
        let rows_in_band = band.len() / w;
        for (t, rows) in cols.chunks_exact(self.ho * wo).enumerate() {
            let (ky, kx) = (t / self.kw, t % self.kw);
            // Output rows whose input row `oy * sy + ky * dy - pt` lands in the band.
            let (ylo, yhi) =
                valid_range(ky, self.sy, self.dy, self.pt + iy0, rows_in_band, self.ho);
            let (xlo, xhi) = valid_range(kx, sx, self.dx, self.pl, w, wo);
            let n = xhi - xlo;
            if n == 0 {
                continue;
            }
            let ix0 = xlo * sx + kx * self.dx - self.pl;
            for oy in ylo..yhi {
                let r = oy * self.sy + ky * self.dy - self.pt - iy0;
                let s = &rows[oy * wo + xlo..oy * wo + xhi];
                let drow = &mut band[r * w..(r + 1) * w];
                if sx == 1 {
                    for (dv, sv) in drow[ix0..ix0 + n].iter_mut().zip(s) {
                        *dv += *sv;
                    }
                } else {
                    let d = &mut drow[ix0..ix0 + (n - 1) * sx + 1];
                    for (dv, sv) in d.iter_mut().step_by(sx).zip(s) {
                        *dv += *sv;
                    }
                }
            }
        }
    }
}

/// Builds the patch rows of output rows `[oy0, oy1)` for `planes` contiguous input planes of
/// `x` into `dst` (`planes * kh * kw` rows of `(oy1 - oy0) * wo`), one task per row (batched
/// so that each task copies at least a few thousand values).
pub(crate) fn fill_rows(x: &[f32], p: &Patches, oy0: usize, oy1: usize, dst: &mut [f32]) {
    let (hw, taps, len) = (p.h * p.w, p.taps(), (oy1 - oy0) * p.wo);
    dst.par_chunks_mut(len)
        .enumerate()
        .with_min_len(4096usize.div_ceil(len))
        .for_each(|(i, rows)| {
            let (c, t) = (i / taps, i % taps);
            let src = &x[c * hw..(c + 1) * hw];
            multiversion!(|| p.fill_tap(src, t, oy0, oy1, rows))
        });
}

/// `im2col` of a contiguous f32 input `[n, c, h, w]` into a new `[n, c * kh * kw, ho * wo]`
/// buffer.
pub(crate) fn im2col_f32(x: &[f32], planes: usize, p: &Patches) -> Vec<f32> {
    // Zeroed allocations of this size come straight from the OS as zero pages (no memset);
    // `fill_tap` then writes every element once.
    let mut out = vec![0f32; planes * p.taps() * p.ho * p.wo];
    fill_rows(x, p, 0, p.ho, &mut out);
    out
}

fn check_input(op: &str, l: &Layout) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => bail!("{op}: expected an NCHW input, got shape {d:?}"),
    }
}

/// `x [N, C, H, W] -> cols [N, C * kh * kw, Ho * Wo]`.
struct Im2Col {
    kernel: (usize, usize),
    geom: Conv2dGeometry,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = check_input(self.name(), l)?;
        let x = f32_slice(self.name(), s, l)?;
        let p = Patches::new((h, w), self.kernel, &self.geom)?;
        let out = im2col_f32(x, n * c, &p);
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, c * p.taps(), p.ho * p.wo)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(Some(col2im(grad, (h, w), self.kernel, &self.geom)?))
    }
}

/// `cols [N, C * kh * kw, Ho * Wo] -> x [N, C, H, W]`, the adjoint of [`Im2Col`].
struct Col2Im {
    input: (usize, usize),
    kernel: (usize, usize),
    geom: Conv2dGeometry,
}

impl Col2Im {
    fn plan(&self, cols: &[usize]) -> Result<(Patches, usize, usize)> {
        let p = Patches::new(self.input, self.kernel, &self.geom)?;
        match *cols {
            [n, rows, len] if rows % p.taps() == 0 && len == p.ho * p.wo => {
                Ok((p, n, rows / p.taps()))
            }
            _ => bail!(
                "col2im: columns {cols:?} do not fit a {:?} kernel over {:?} with {:?} (expected [N, C * {}, {}])",
                self.kernel,
                self.input,
                self.geom,
                p.taps(),
                p.ho * p.wo
            ),
        }
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, n, c) = self.plan(l.dims())?;
        let cols = f32_slice(self.name(), s, l)?;
        let (hw, per) = (p.h * p.w, p.taps() * p.ho * p.wo);
        let mut out = vec![0f32; n * c * hw];
        // Bands of input rows: enough tasks for every thread even with few planes (the stem
        // has three), each band gathering from every tap, so no two tasks write one value.
        let bands = (4 * threads()).div_ceil(n * c).clamp(1, p.h);
        let band_rows = p.h.div_ceil(bands);
        let tasks: Vec<(usize, usize, &mut [f32])> = out
            .chunks_mut(hw)
            .enumerate()
            .flat_map(|(i, plane)| {
                plane
                    .chunks_mut(band_rows * p.w)
                    .enumerate()
                    .map(move |(b, band)| (i, b * band_rows, band))
            })
            .collect();
        tasks.into_par_iter().for_each(|(i, iy0, band)| {
            let src = &cols[i * per..(i + 1) * per];
            multiversion!(|| p.scatter_add(src, iy0, band))
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, p.h, p.w))))
    }

    fn bwd(&self, _cols: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(im2col(grad, self.kernel, &self.geom)?))
    }
}

/// Runs `f` on `x` converted to contiguous f32 and converts the result back to `x`'s dtype.
fn in_f32(x: &Tensor, op: &str, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => f(&x.contiguous()?),
        DType::F16 | DType::BF16 | DType::F64 => {
            f(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())
        }
        dt => bail!("{op}: unsupported dtype {dt:?}"),
    }
}

/// The patch matrix of a 2-D convolution: `x [N, Cin, H, W]` becomes
/// `[N, Cin * kh * kw, Ho * Wo]`, rows ordered `(cin, ky, kx)`, zero where a window reaches into
/// the padding. `w.reshape((Cout, Cin * kh * kw)).matmul(&cols)` of one image is the
/// convolution output `[Cout, Ho * Wo]`. Any stride, dilation and (asymmetric) padding; the
/// gradient is [`col2im`]. f32 runs the CPU kernel; f16, bf16 and f64 go through f32; other
/// devices use [`crate::reference::im2col`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use deeplab_ops::{im2col, Conv2dGeometry};
/// let x = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((1, 1, 2, 3))?;
/// let cols = im2col(&x, (1, 2), &Conv2dGeometry::default())?;
/// assert_eq!(cols.to_vec3::<f32>()?, [[[0., 1., 3., 4.], [1., 2., 4., 5.]]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn im2col(x: &Tensor, kernel: (usize, usize), geom: &Conv2dGeometry) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    geom.output_size((h, w), kernel)?;
    if !x.device().is_cpu() {
        return crate::reference::im2col(x, kernel, geom);
    }
    in_f32(x, "im2col", |x| {
        x.apply_op1(Im2Col {
            kernel,
            geom: *geom,
        })
    })
}

/// The adjoint of [`im2col`]: sums the columns `[N, C * kh * kw, Ho * Wo]` back into the input
/// positions they were read from, giving `[N, C, H, W]` for an input of size `input = (H, W)`.
/// Differentiable (its gradient is [`im2col`]). f32 runs the CPU kernel; f16, bf16 and f64 go
/// through f32; other devices use the adjoint composition of candle ops.
pub fn col2im(
    cols: &Tensor,
    input: (usize, usize),
    kernel: (usize, usize),
    geom: &Conv2dGeometry,
) -> Result<Tensor> {
    let op = Col2Im {
        input,
        kernel,
        geom: *geom,
    };
    let (_, n, c) = op.plan(cols.dims())?;
    if !cols.device().is_cpu() {
        // The adjoint of the reference composition, through candle's autograd: the gradient of
        // `sum(im2col(x) * cols)` with respect to `x`.
        let x = candle_core::Var::zeros((n, c, input.0, input.1), cols.dtype(), cols.device())?;
        let y = crate::reference::im2col(x.as_tensor(), kernel, geom)?;
        let grads = (y * cols.detach())?.sum_all()?.backward()?;
        return match grads.get(&x) {
            Some(g) => Ok(g.clone()),
            None => bail!("col2im: no gradient reached the input"),
        };
    }
    in_f32(cols, "col2im", |c| c.apply_op1(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Padding2d;

    #[test]
    fn segments_and_padding_share() -> Result<()> {
        // ResNet's rate-18 ASPP branch on a 33x33 map: rows 0-14 read taps 1-2, rows 15-17
        // only the centre, rows 18-32 taps 0-1; 60% of all tap reads are padding.
        let p = Patches::new((33, 33), (3, 3), &Conv2dGeometry::same(3, 18))?;
        let want = vec![(0, 15, 1, 3), (15, 18, 1, 2), (18, 33, 0, 2)];
        assert_eq!(p.segments(true), want);
        assert_eq!(p.segments(false), want);
        let inside = (15 * 2 + 3 + 15 * 2) as f64 / (33.0 * 3.0);
        assert!((p.padding_share() - (1.0 - inside * inside)).abs() < 1e-12);
        // A rate beyond the map: every output reads only the centre tap.
        let p = Patches::new((9, 7), (3, 3), &Conv2dGeometry::same(3, 12))?;
        assert_eq!(p.segments(true), vec![(0, 9, 1, 2)]);
        assert_eq!(p.segments(false), vec![(0, 7, 1, 2)]);
        assert!((p.padding_share() - 8.0 / 9.0).abs() < 1e-12);
        // Stride 2 with TF fixed padding (1 before and after) on 6 rows: output 0 reads the
        // padding with tap 0, outputs 1 and 2 read inside with every tap.
        let p = Patches::new((6, 6), (3, 3), &Conv2dGeometry::deeplab(3, 2, 1))?;
        assert_eq!(p.segments(true), vec![(0, 1, 1, 3), (1, 3, 0, 3)]);
        // Without padding nothing is skipped.
        let p = Patches::new((8, 8), (3, 3), &Conv2dGeometry::default())?;
        assert_eq!(p.padding_share(), 0.0);
        Ok(())
    }

    #[test]
    fn valid_ranges() {
        // k=0 d=1 p=1 s=1 over 5 inputs, 5 outputs: o=0 reads -1 (pad), o=1..4 read 0..3.
        assert_eq!(valid_range(0, 1, 1, 1, 5, 5), (1, 5));
        // k=2: o reads o+1, valid for o <= 3.
        assert_eq!(valid_range(2, 1, 1, 1, 5, 5), (0, 4));
        // stride 2, pad 1, k=0: o*2-1 >= 0 -> o >= 1; <= 4 -> o <= 2.
        assert_eq!(valid_range(0, 2, 1, 1, 5, 3), (1, 3));
        // Taps entirely in the padding (rate 12 on a 3-wide input): empty ranges.
        assert_eq!(valid_range(2, 1, 12, 12, 3, 3), (0, 0));
        assert_eq!(valid_range(0, 1, 12, 12, 3, 3), (3, 3));
        // The centre tap reads every output.
        assert_eq!(valid_range(1, 1, 12, 12, 3, 3), (0, 3));
    }

    #[test]
    fn hand_computed_patches() -> Result<()> {
        // 1x1x3x3 input 0..9, 2x2 kernel, stride 2, padding bottom/right 1: 2x2 outputs.
        let x = Tensor::arange(0f32, 9., &candle_core::Device::Cpu)?.reshape((1, 1, 3, 3))?;
        let g = Conv2dGeometry {
            stride: (2, 2),
            dilation: (1, 1),
            padding: Padding2d {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1,
            },
        };
        let cols = im2col(&x, (2, 2), &g)?.to_vec3::<f32>()?;
        assert_eq!(
            cols,
            [[
                [0., 2., 6., 8.],
                [1., 0., 7., 0.],
                [3., 5., 0., 0.],
                [4., 0., 0., 0.]
            ]]
        );
        // col2im of all ones counts how many windows read each input.
        let ones = Tensor::ones((1, 4, 4), DType::F32, &candle_core::Device::Cpu)?;
        let back = col2im(&ones, (3, 3), (2, 2), &g)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(back, [1., 1., 1., 1., 1., 1., 1., 1., 1.]);
        Ok(())
    }
}
