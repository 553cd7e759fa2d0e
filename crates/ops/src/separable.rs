//! Fused inference separable convolution: a folded 3x3 stride-1 depthwise convolution whose
//! outputs are computed straight into the packed panels of the folded pointwise product that
//! follows it, so the depthwise activation never goes to memory.
//!
//! Unfused, a depthwise layer reads its input plane by plane and writes an output as large,
//! which the pointwise product then reads back and packs block by block: both are passes over
//! memory (MobileNetV2's 960-channel blocks at 65x65 move 16 MB each way). Here the product's
//! packing step ([`crate::sgemm::PackB`]) evaluates the depthwise convolution, its folded
//! BatchNorm and activation for exactly the channels and pixels of the block it needs
//! (`depthwise::Flat`), in the order and with the arithmetic of the depthwise kernel, so the
//! result is the same bits as the two folded layers run one after the other.
//!
//! Taken on f32 CPU tensors with AVX-512 when the depthwise convolution is 3x3, stride 1 and
//! keeps the plane's size (DeepLab's "same" padding at any dilation), or 3x3 at stride 2 and
//! dilation 1 (`depthwise::Flat2`, any padding), with rows of at least 16 output pixels;
//! otherwise (and on other devices) the two layers run separately.

use crate::batch_norm::{Activation, Epilogue};
use crate::cpu::f32_slice;
use crate::Conv2dGeometry;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// What one panel of depthwise outputs costs against one `MR x NR` tile of the product, for
/// splitting the work: 27 masked unaligned loads and 27 FMAs per depth step of a panel against
/// a tile's 24 FMAs, measured at about 6 (Xception-65 on the row-split grid the old estimate
/// of 1.5 picked for 728 x 1089, which computes every panel twice: 11.6% of the pass's cycles
/// in the depthwise packing against 78% in the microkernel over 91 row panels). The grids
/// this moves (Xception-65's 33x33 layers from 2 x 2 jobs to 1 x 4) measured within noise
/// end to end.
const DEPTHWISE_PACK_COST: f64 = 6.0;

/// Depth block and column panels per chunk of the fused product for `m` output channels.
/// Below 256, shallower and wider blocks than the plain product's (128 x 30 panels against
/// 512 x 10, the same 737-960 KiB packed block in L2): each chunk's depthwise outputs also
/// read the input rows `dilation` above and below it, and a wider chunk reads fewer of them
/// twice, while with few output rows the product gains little from deep blocks. With many
/// output rows the product's deep blocks win. Alternating in one process with a throwaway
/// build that switched the blocking per call (2 threads, ms, unfused / fused 512 x 10 / 128 x
/// 30; `examples/separable_time.rs` times the current choice against the unfused layers): 960 -> 160 at 65x65 rate 4 6.54 / 6.27 / 5.56, 576
/// -> 96 rate 2 3.08 / 2.46 / 2.28, 2048 -> 256 at 33x33 rate 6 6.41 / 4.58 / 4.40; 728 ->
/// 728 at 33x33 3.34 / 3.31 / 3.50, 1536 -> 2048 rate 2 19.10 / 18.78 / 20.02, 728 -> 728
/// at 65x65 13.71 / 12.68 / 17.24, 256 -> 256 at 129x129 11.30 / 9.02 / 10.37.
fn blocking(m: usize) -> (usize, usize) {
    if m < 256 {
        (128, 30)
    } else {
        (crate::sgemm::KC_MAX, crate::sgemm::NC_PANELS)
    }
}

/// The depthwise half of a separable convolution: weight `[C, 1, 3, 3]`, its folded epilogue,
/// geometry, and whether it applies a ReLU to its input as it reads it (Xception).
#[derive(Clone, Copy)]
pub struct DepthwisePart<'a> {
    /// Depthwise weight `[C, 1, kh, kw]`.
    pub weight: &'a Tensor,
    /// The folded BatchNorm (and activation) after it.
    pub epilogue: &'a Epilogue,
    /// Stride, dilation and padding.
    pub geom: &'a Conv2dGeometry,
    /// ReLU on the input.
    pub input_relu: bool,
}

/// `pointwise(depthwise(x))` with both folded epilogues, plus a residual and an activation
/// after it when `residual` is given (`act(pw(dw(x)) * s + t + residual)`; the pointwise
/// epilogue must then have no activation of its own, as in [`Epilogue::conv2d_add`]).
/// Inference only. On f32 CPU tensors with AVX-512 and a 3x3 depthwise convolution at stride 1
/// keeping the size, or at stride 2 and rate 1 (see the module docs), one fused pass; otherwise
/// the two folded layers in turn.
/// Both give the same bits.
pub fn separable_epilogue(
    x: &Tensor,
    dw: DepthwisePart<'_>,
    (pw_weight, pw_epilogue): (&Tensor, &Epilogue),
    residual: Option<(&Tensor, Activation)>,
) -> Result<Tensor> {
    let Some(op) = SeparableFwd::plan(x, &dw, (pw_weight, pw_epilogue), residual)? else {
        let d = dw
            .epilogue
            .depthwise_conv2d(x, dw.weight, dw.geom, dw.input_relu)?;
        let g = Conv2dGeometry::default();
        return match residual {
            Some((r, act)) => pw_epilogue.conv2d_add(&d, pw_weight, &g, r, act),
            None => pw_epilogue.conv2d(&d, pw_weight, &g),
        };
    };
    let cout = pw_weight.dim(0)?;
    crate::profile::record(
        if residual.is_some() {
            "separable + epilogue + add"
        } else {
            "separable + epilogue"
        },
        || {
            format!(
                "s{} d{} {} -> {cout}",
                dw.geom.stride.0,
                dw.geom.dilation.0,
                crate::profile::dims(x)
            )
        },
        || {
            x.contiguous()?.apply_op3_no_bwd(
                &dw.weight.contiguous()?,
                &pw_weight.contiguous()?,
                &op,
            )
        },
    )
}

/// The fused op on `(x, depthwise weight, pointwise weight)`; the epilogues and the residual
/// ride along.
struct SeparableFwd {
    geom: Conv2dGeometry,
    input_relu: bool,
    dw_epi: (Vec<f32>, Vec<f32>, Activation),
    pw_epi: (Vec<f32>, Vec<f32>, Activation),
    residual: Option<Tensor>,
}

impl SeparableFwd {
    /// The fused op for these layers, or `None` when the fused kernel does not apply.
    fn plan(
        x: &Tensor,
        dw: &DepthwisePart<'_>,
        (pw_weight, pw_epilogue): (&Tensor, &Epilogue),
        residual: Option<(&Tensor, Activation)>,
    ) -> Result<Option<Self>> {
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, dw, pw_weight, pw_epilogue, residual);
            return Ok(None);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let (Some(dst), Some(pst)) = (
                dw.epilogue.fused_f32(x, dw.weight),
                pw_epilogue.fused_f32(x, pw_weight),
            ) else {
                return Ok(None);
            };
            let (_, c, h, w) = x.dims4()?;
            let dims = dw.weight.dims();
            let pw_dims = pw_weight.dims();
            let out = dw.geom.output_size((h, w), (3, 3)).ok();
            // Stride 1 keeping the size (any rate), or stride 2 at rate 1; runs of 16 pixels
            // wrap at most once.
            let kernel = match (dw.geom.stride, dw.geom.dilation, out) {
                ((1, 1), _, Some(o)) => o == (h, w) && w >= 16,
                ((2, 2), (1, 1), Some((_, wo))) => wo >= 16,
                _ => false,
            };
            let fits = dims == [c, 1, 3, 3]
                && pw_dims.len() == 4
                && pw_dims[1..] == [c, 1, 1]
                && kernel
                && crate::cpu::has_avx512();
            let residual_ok = residual.is_none_or(|(r, _)| {
                pw_epilogue.act == Activation::None
                    && r.device().is_cpu()
                    && r.dtype() == candle_core::DType::F32
            });
            if !fits || !residual_ok {
                return Ok(None);
            }
            Ok(Some(Self {
                geom: *dw.geom,
                input_relu: dw.input_relu,
                dw_epi: (dst.0.to_vec(), dst.1.to_vec(), dw.epilogue.act),
                pw_epi: (
                    pst.0.to_vec(),
                    pst.1.to_vec(),
                    residual.map_or(pw_epilogue.act, |(_, a)| a),
                ),
                residual: residual.map(|(r, _)| r.clone()),
            }))
        }
    }
}

impl CustomOp3 for SeparableFwd {
    fn name(&self) -> &'static str {
        "separable-conv-fused"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("separable conv", xs, xl)?;
        let kd = f32_slice("separable conv depthwise weight", ds, dl)?;
        let kp = f32_slice("separable conv pointwise weight", ps, pl)?;
        let (n, c, h, w) = xl.shape().dims4()?;
        let (cout, cin, _, _) = pl.shape().dims4()?;
        if dl.shape().dims() != [c, 1, 3, 3] || cin != c {
            bail!(
                "separable conv: weights {:?} and {:?} do not fit input {:?}",
                dl.shape().dims(),
                pl.shape().dims(),
                xl.shape().dims()
            )
        }
        let (ho, wo) = self.geom.output_size((h, w), (3, 3))?;
        let shape = Shape::from((n, cout, ho, wo));
        let residual = self.residual.as_ref().map(|r| r.storage_and_layout());
        let res = match &residual {
            Some((st, l)) => {
                if l.shape() != &shape {
                    bail!(
                        "separable conv: residual {:?} does not match the output {:?}",
                        l.shape().dims(),
                        shape.dims()
                    )
                }
                match &**st {
                    candle_core::Storage::Cpu(cs) => Some(f32_slice("separable residual", cs, l)?),
                    _ => bail!("separable conv: the residual must be on the CPU"),
                }
            }
            None => None,
        };
        let out = self.forward(x, (n, c, h, w), kd, kp, cout, res)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

impl SeparableFwd {
    /// The fused forward on contiguous data: per image one product whose `B` blocks are
    /// depthwise outputs.
    #[cfg(target_arch = "x86_64")]
    fn forward(
        &self,
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        kd: &[f32],
        kp: &[f32],
        cout: usize,
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        use crate::depthwise::{Epi, Flat, Flat2};
        use crate::sgemm::{sgemm_packed, RawOperand, RowEpilogue};
        let g = &self.geom;
        let (ho, wo) = g.output_size((h, w), (3, 3))?;
        let (hw, l) = (h * w, ho * wo);
        let total = n * cout * l;
        let mut out: Vec<f32> = Vec::with_capacity(total);
        if total == 0 {
            return Ok(out);
        }
        /// The depthwise packer of the stride.
        enum Packer {
            Stride1(Flat),
            Stride2(Flat2),
        }
        let pad = (g.padding.top, g.padding.left);
        let packer = if g.stride == (1, 1) {
            Packer::Stride1(Flat::new((h, w), pad, g.dilation))
        } else {
            Packer::Stride2(Flat2::new((h, w), (ho, wo), pad))
        };
        let (ds, dt, dact) = (&self.dw_epi.0, &self.dw_epi.1, self.dw_epi.2);
        let epi = |ch: usize| Epi::affine(ds[ch], dt[ch]);
        let relu = self.input_relu;
        for b in 0..n {
            let xb = &x[b * c * hw..(b + 1) * c * hw];
            let pack = |p0: usize, j0: usize, kc: usize, cols: usize, buf: &mut [f32]| {
                let (c, j) = ((p0, kc), (j0, cols));
                // SAFETY: the product asks for channels `p0..p0 + kc <= c` (its depth) and
                // output pixels `j0..j0 + cols <= ho * wo` (its columns, `j0` a multiple of
                // 48) into a buffer of `kc` rows of its panels; AVX-512 checked by `plan`.
                unsafe {
                    match &packer {
                        Packer::Stride1(f) => f.pack(xb, kd, &epi, c, j, (relu, dact), buf),
                        Packer::Stride2(f) => f.pack(xb, kd, &epi, c, j, (relu, dact), buf),
                    }
                }
            };
            let epilogue = RowEpilogue {
                scale: &self.pw_epi.0,
                shift: &self.pw_epi.1,
                act: self.pw_epi.2,
                residual: residual.map(|r| &r[b * cout * l..(b + 1) * cout * l]),
            };
            // SAFETY: `A` is the `cout x c` row-major pointwise weight (`kp.len() == cout * c`
            // checked by candle's shape), `C` image `b`'s `cout x l` rows inside `out`'s
            // capacity, the epilogue has `cout` scales and shifts and a residual of
            // `cout * l` values; AVX-512 checked by `plan`.
            unsafe {
                sgemm_packed(
                    (cout, l, c),
                    RawOperand::rows(kp.as_ptr(), c),
                    &pack,
                    DEPTHWISE_PACK_COST,
                    blocking(cout),
                    (out.as_mut_ptr().add(b * cout * l), l),
                    Some(epilogue),
                    crate::cpu::threads(),
                )
            }
        }
        // SAFETY: the products wrote all `total` values.
        unsafe { out.set_len(total) };
        Ok(out)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn forward(
        &self,
        _: &[f32],
        _: (usize, usize, usize, usize),
        _: &[f32],
        _: &[f32],
        _: usize,
        _: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        bail!("separable conv: the fused kernel needs x86-64 with AVX-512")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::seeded_uniform;
    use candle_core::Device;

    /// An epilogue with seeded scales around 1 and shifts around 0.
    fn epilogue(c: usize, act: Activation, seed: u64) -> Result<Epilogue> {
        let dev = Device::Cpu;
        let scale = (seeded_uniform(&[c], seed, &dev)? * 0.5)?.affine(1.0, 1.0)?;
        let shift = seeded_uniform(&[c], seed + 1, &dev)?;
        let host = Some((scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?));
        Ok(Epilogue {
            scale,
            shift,
            act,
            host,
        })
    }

    /// The two folded layers run one after the other.
    fn unfused(
        x: &Tensor,
        dw: DepthwisePart<'_>,
        (pw, pe): (&Tensor, &Epilogue),
        residual: Option<(&Tensor, Activation)>,
    ) -> Result<Tensor> {
        let d = dw
            .epilogue
            .depthwise_conv2d(x, dw.weight, dw.geom, dw.input_relu)?;
        let g = Conv2dGeometry::default();
        match residual {
            Some((r, act)) => pe.conv2d_add(&d, pw, &g, r, act),
            None => pe.conv2d(&d, pw, &g),
        }
    }

    /// The fused op gives the bits of the two layers: several depth blocks (600 and 530
    /// channels, shallow and deep blocking), several column jobs and a partial last panel,
    /// dilations 1 / 2 / 4 / 6 with taps in the padding, stride 2 with symmetric and
    /// TensorFlow-SAME padding, input ReLU, every activation, with and without a residual,
    /// batch 2, 1 and 2 threads.
    #[test]
    fn fused_matches_the_two_layers() -> Result<()> {
        if !crate::cpu::has_avx512() {
            eprintln!("skipped: the fused kernel needs AVX-512");
            return Ok(());
        }
        let dev = Device::Cpu;
        // TensorFlow SAME at stride 2 on an odd size: no padding at the top and left.
        let tf_same = Conv2dGeometry {
            stride: (2, 2),
            dilation: (1, 1),
            padding: crate::Padding2d {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1,
            },
        };
        let s2 = Conv2dGeometry::deeplab(3, 2, 1);
        let same = Conv2dGeometry::same;
        // (n, c, h, w, cout, geometry, input relu, dw act, pw act, residual act)
        use Activation::{None as Id, Relu, Relu6};
        #[rustfmt::skip]
        let cases = [
            (2, 37, 13, 21, 20, same(3, 2), true, Id, Relu, None),
            (1, 600, 9, 70, 9, same(3, 4), false, Relu6, Id, Some(Relu)),
            (1, 64, 33, 33, 48, same(3, 1), false, Relu, Relu6, None),
            (2, 24, 5, 17, 16, same(3, 6), true, Relu6, Id, Some(Id)),
            (1, 530, 4, 16, 260, same(3, 2), false, Relu, Id, Some(Relu)),
            // stride 2: output rows of 17, 16 and 18 pixels (runs of 16 wrap or end a row)
            (2, 40, 9, 33, 24, s2, true, Relu6, Id, Some(Id)),
            (1, 70, 7, 33, 12, tf_same, false, Relu, Relu, None),
            (1, 520, 6, 35, 10, s2, false, Id, Relu6, None),
        ];
        for (i, &(n, c, h, w, cout, geom, relu, dact, pact, res)) in cases.iter().enumerate() {
            let (ho, wo) = geom.output_size((h, w), (3, 3))?;
            let s = 10 * i as u64;
            let x = seeded_uniform(&[n, c, h, w], s, &dev)?;
            let kd = seeded_uniform(&[c, 1, 3, 3], s + 1, &dev)?;
            let kp = (seeded_uniform(&[cout, c, 1, 1], s + 2, &dev)? * 0.2)?;
            let de = epilogue(c, dact, s + 3)?;
            let pe = epilogue(cout, pact, s + 5)?;
            let r = seeded_uniform(&[n, cout, ho, wo], s + 7, &dev)?;
            let dw = DepthwisePart {
                weight: &kd,
                epilogue: &de,
                geom: &geom,
                input_relu: relu,
            };
            let residual = res.map(|a| (&r, a));
            assert!(
                SeparableFwd::plan(&x, &dw, (&kp, &pe), residual)?.is_some(),
                "case {i}"
            );
            let want = unfused(&x, dw, (&kp, &pe), residual)?.flatten_all()?;
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(candle_core::Error::wrap)?;
                let got = pool.install(|| separable_epilogue(&x, dw, (&kp, &pe), residual))?;
                assert_eq!(got.dims(), [n, cout, ho, wo]);
                let (g, e) = (got.flatten_all()?.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
                let diff = g.iter().zip(&e).filter(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(diff.count(), 0, "case {i}, {threads} threads");
            }
        }
        Ok(())
    }

    /// Shapes the fused kernel does not take (stride 2 with output rows of 6 pixels, a 5x5
    /// kernel, an activation before the residual, input rows narrower than a vector) run the
    /// two layers.
    #[test]
    fn other_shapes_run_the_two_layers() -> Result<()> {
        let dev = Device::Cpu;
        let x = seeded_uniform(&[1, 8, 12, 12], 1, &dev)?; // 12 < 16 columns
        let kp = seeded_uniform(&[4, 8, 1, 1], 2, &dev)?;
        let de = epilogue(8, Activation::Relu, 3)?;
        let pe = epilogue(4, Activation::None, 4)?;
        let pe_act = epilogue(4, Activation::Relu, 5)?;
        let r = seeded_uniform(&[1, 4, 6, 6], 6, &dev)?;
        let k3 = seeded_uniform(&[8, 1, 3, 3], 7, &dev)?;
        let k5 = seeded_uniform(&[8, 1, 5, 5], 8, &dev)?;
        let (s2, same5, same3) = (
            Conv2dGeometry::deeplab(3, 2, 1),
            Conv2dGeometry::same(5, 1),
            Conv2dGeometry::same(3, 1),
        );
        let part = |weight, geom| DepthwisePart {
            weight,
            epilogue: &de,
            geom,
            input_relu: false,
        };
        let r12 = seeded_uniform(&[1, 4, 12, 12], 9, &dev)?;
        type Case<'a> = (
            DepthwisePart<'a>,
            &'a Epilogue,
            Option<(&'a Tensor, Activation)>,
        );
        let cases: [Case; 4] = [
            (part(&k3, &s2), &pe, Some((&r, Activation::Relu))),
            (part(&k5, &same5), &pe, None),
            (part(&k3, &same3), &pe_act, Some((&r12, Activation::None))),
            (part(&k3, &same3), &pe, Some((&r12, Activation::Relu))),
        ];
        for (i, (dw, e, res)) in cases.into_iter().enumerate() {
            assert!(
                SeparableFwd::plan(&x, &dw, (&kp, e), res)?.is_none(),
                "case {i}"
            );
            let got = separable_epilogue(&x, dw, (&kp, e), res)?.flatten_all()?;
            let want = unfused(&x, dw, (&kp, e), res)?.flatten_all()?;
            assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?, "case {i}");
        }
        Ok(())
    }
}
