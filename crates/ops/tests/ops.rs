//! Integration tests of deeplab-ops: every fast op against the plain-candle reference (values
//! and gradients), finite-difference checks, hand-computed values, error cases. Each test body
//! runs on every enabled device.

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use deeplab_ops::reference::{self, seeded_uniform};
use deeplab_ops::*;

/// CPU always; CUDA when the feature is on and a GPU is present.
fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut v = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(d) => v.push(d),
        Err(e) => println!("cuda feature on but no usable GPU ({e}): testing CPU only"),
    }
    v
}

/// Max |a - b| relative to the larger of max |b| and 1e-3.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = b
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .max(1e-3);
    Ok(diff / scale)
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) -> Result<()> {
    let e = rel_err(a, b)?;
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
    Ok(())
}

/// Runs `f` on variables built from `inputs`, backpropagates `sum(f(..) * r)` for a seeded
/// `r`, returns the output and each input's gradient.
fn run_with_grads(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let r = seeded_uniform(y.dims(), 99, y.device())?;
    let loss = (y.to_dtype(DType::F32)? * r)?.sum_all()?;
    let grads = loss.backward()?;
    let gs = vars
        .iter()
        .map(|v| {
            grads
                .get(v)
                .cloned()
                .unwrap_or(v.as_tensor().zeros_like().unwrap())
        })
        .collect();
    Ok((y, gs))
}

fn compare_op(
    inputs: &[Tensor],
    fast: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    slow: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    what: &str,
) -> Result<()> {
    let (yf, gf) = run_with_grads(inputs, fast)?;
    let (ys, gs) = run_with_grads(inputs, slow)?;
    assert_close(&yf, &ys, 1e-4, &format!("{what} forward"))?;
    for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
        assert_close(a, b, 1e-4, &format!("{what} grad of input {i}"))?;
    }
    Ok(())
}

/// Central finite differences of `sum(f(x) * r)` w.r.t. a few elements of input `which`,
/// computed in f64 through the reference-free fast op, against autograd.
fn finite_difference(
    inputs: &[Tensor],
    which: usize,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let (_, grads) = run_with_grads(inputs, f)?;
    let g = grads[which].flatten_all()?.to_vec1::<f32>()?;
    let base = inputs[which].flatten_all()?.to_vec1::<f32>()?;
    let shape = inputs[which].dims().to_vec();
    let dev = inputs[which].device().clone();
    let eval = |vals: &[f32]| -> Result<f64> {
        let mut ins = inputs.to_vec();
        ins[which] = Tensor::from_vec(vals.to_vec(), shape.clone(), &dev)?;
        let y = f(&ins)?;
        let r = seeded_uniform(y.dims(), 99, y.device())?;
        (y.to_dtype(DType::F64)? * r.to_dtype(DType::F64)?)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let eps = 1e-2f32;
    let step = (base.len() / 7).max(1);
    for i in (0..base.len()).step_by(step) {
        let mut p = base.clone();
        p[i] += eps;
        let mut m = base.clone();
        m[i] -= eps;
        let fd = (eval(&p)? - eval(&m)?) / (2.0 * eps as f64);
        let tol = 2e-2 * fd.abs().max(1.0);
        assert!(
            (fd - g[i] as f64).abs() <= tol,
            "finite difference at {i}: fd {fd} vs autograd {}",
            g[i]
        );
    }
    Ok(())
}

#[test]
fn depthwise_matches_reference() -> Result<()> {
    for dev in devices() {
        type DwCase = ((usize, usize, usize, usize), usize, usize, usize, bool);
        let cases: &[DwCase] = &[
            // (input NCHW, kernel, stride, rate, fixed (TF strided) padding instead of SAME)
            ((2, 5, 17, 23), 3, 1, 1, false),
            ((2, 5, 17, 23), 3, 1, 2, false),
            ((2, 3, 17, 23), 3, 1, 4, false),
            ((2, 3, 17, 23), 3, 1, 12, false),
            ((2, 4, 17, 23), 3, 2, 1, true),
            ((2, 4, 18, 23), 3, 2, 2, true),
            ((1, 3, 65, 65), 3, 1, 1, false),
            ((1, 3, 65, 65), 3, 2, 1, true),
            ((2, 3, 10, 9), 5, 1, 1, false),
            ((2, 3, 11, 8), 4, 2, 1, true),
        ];
        for &((n, c, h, w), k, s, r, fixed) in cases {
            let geom = if fixed {
                Conv2dGeometry::deeplab(k, s, r)
            } else {
                Conv2dGeometry::same(k, r)
            };
            let x = seeded_uniform(&[n, c, h, w], 1, &dev)?;
            let wt = seeded_uniform(&[c, 1, k, k], 2, &dev)?;
            let what = format!("depthwise {:?} k{k} s{s} r{r} on {dev:?}", (n, c, h, w));
            compare_op(
                &[x, wt],
                &|t| depthwise_conv2d(&t[0], &t[1], &geom),
                &|t| reference::depthwise_conv2d(&t[0], &t[1], &geom),
                &what,
            )?;
        }
        // Asymmetric padding and no padding.
        for geom in [
            Conv2dGeometry {
                stride: (1, 1),
                dilation: (2, 2),
                padding: Padding2d {
                    top: 0,
                    bottom: 3,
                    left: 1,
                    right: 0,
                },
            },
            Conv2dGeometry {
                stride: (2, 2),
                dilation: (1, 1),
                padding: Padding2d::ZERO,
            },
        ] {
            let x = seeded_uniform(&[2, 3, 13, 12], 3, &dev)?;
            let wt = seeded_uniform(&[3, 1, 3, 3], 4, &dev)?;
            compare_op(
                &[x, wt],
                &|t| depthwise_conv2d(&t[0], &t[1], &geom),
                &|t| reference::depthwise_conv2d(&t[0], &t[1], &geom),
                &format!("depthwise {geom:?}"),
            )?;
        }
    }
    Ok(())
}

/// The fused inference variant against the unfused composition relu -> conv -> + bias -> act,
/// values and gradients (x, w and bias), over strides, dilations, kernels and activations.
#[test]
fn depthwise_fused_matches_composition() -> Result<()> {
    let acts = [Activation::None, Activation::Relu, Activation::Relu6];
    for dev in devices() {
        type FusedCase = ((usize, usize, usize, usize), usize, usize, usize);
        let cases: &[FusedCase] = &[
            // (input NCHW, kernel, stride, rate)
            ((2, 5, 17, 23), 3, 1, 1),
            ((2, 5, 17, 23), 3, 1, 2),
            ((2, 3, 17, 23), 3, 1, 4),
            ((2, 3, 17, 23), 3, 1, 12),
            ((2, 4, 17, 23), 3, 2, 1),
            ((2, 4, 18, 23), 3, 2, 2),
            ((1, 3, 65, 65), 3, 1, 1),
            ((2, 3, 33, 33), 3, 1, 4),
            ((2, 3, 10, 9), 5, 1, 1),
            ((2, 3, 11, 8), 4, 2, 1),
        ];
        for (i, &((n, c, h, w), k, s, r)) in cases.iter().enumerate() {
            let geom = if s == 1 {
                Conv2dGeometry::same(k, r)
            } else {
                Conv2dGeometry::deeplab(k, s, r)
            };
            // Scaled so that ReLU6 clips at both ends.
            let x = (seeded_uniform(&[n, c, h, w], 1 + i as u64, &dev)? * 4.0)?;
            let wt = seeded_uniform(&[c, 1, k, k], 2, &dev)?;
            let b = seeded_uniform(&[c], 3, &dev)?;
            for (j, act) in acts.into_iter().enumerate() {
                let input_relu = (i + j) % 2 == 0;
                let composed = |t: &[Tensor], bias: bool| -> Result<Tensor> {
                    let xr = if input_relu {
                        t[0].relu()?
                    } else {
                        t[0].clone()
                    };
                    let y = reference::depthwise_conv2d(&xr, &t[1], &geom)?;
                    let y = if bias {
                        y.broadcast_add(&t[2].reshape((1, c, 1, 1))?)?
                    } else {
                        y
                    };
                    act.apply(&y)
                };
                let what = format!(
                    "fused depthwise {:?} k{k} s{s} r{r} {act:?} input_relu={input_relu} on {dev:?}",
                    (n, c, h, w)
                );
                compare_op(
                    &[x.clone(), wt.clone(), b.clone()],
                    &|t| depthwise_conv2d_fused(&t[0], &t[1], Some(&t[2]), input_relu, act, &geom),
                    &|t| composed(t, true),
                    &what,
                )?;
                compare_op(
                    &[x.clone(), wt.clone()],
                    &|t| depthwise_conv2d_fused(&t[0], &t[1], None, input_relu, act, &geom),
                    &|t| composed(t, false),
                    &format!("{what} without bias"),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn depthwise_fused_half_precision_and_errors() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded_uniform(&[1, 4, 9, 9], 7, &dev)?;
    let w = seeded_uniform(&[4, 1, 3, 3], 8, &dev)?;
    let b = seeded_uniform(&[4], 9, &dev)?;
    let g = Conv2dGeometry::same(3, 2);
    let y32 = depthwise_conv2d_fused(&x, &w, Some(&b), true, Activation::Relu6, &g)?;
    let y16 = depthwise_conv2d_fused(
        &x.to_dtype(DType::BF16)?,
        &w.to_dtype(DType::BF16)?,
        Some(&b.to_dtype(DType::BF16)?),
        true,
        Activation::Relu6,
        &g,
    )?;
    assert_eq!(y16.dtype(), DType::BF16);
    assert_close(&y16, &y32, 3e-2, "bf16 fused depthwise")?;
    let bad = seeded_uniform(&[5], 9, &dev)?;
    let e = depthwise_conv2d_fused(&x, &w, Some(&bad), false, Activation::None, &g)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[5]") && e.contains("[1, 4, 9, 9]"), "{e}");
    let bad_w = seeded_uniform(&[3, 1, 3, 3], 8, &dev)?;
    assert!(depthwise_conv2d_fused(&x, &bad_w, None, false, Activation::None, &g).is_err());
    Ok(())
}

#[test]
fn depthwise_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    for (s, r) in [(1, 1), (2, 1), (1, 2)] {
        let geom = Conv2dGeometry::deeplab(3, s, r);
        let x = seeded_uniform(&[1, 2, 6, 5], 5, &dev)?;
        let w = seeded_uniform(&[2, 1, 3, 3], 6, &dev)?;
        let f = |t: &[Tensor]| depthwise_conv2d(&t[0], &t[1], &geom);
        finite_difference(&[x.clone(), w.clone()], 0, &f)?;
        finite_difference(&[x, w], 1, &f)?;
    }
    Ok(())
}

#[test]
fn depthwise_half_precision_and_errors() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded_uniform(&[1, 4, 9, 9], 7, &dev)?;
    let w = seeded_uniform(&[4, 1, 3, 3], 8, &dev)?;
    let g = Conv2dGeometry::same(3, 2);
    let y32 = depthwise_conv2d(&x, &w, &g)?;
    let y16 = depthwise_conv2d(&x.to_dtype(DType::BF16)?, &w.to_dtype(DType::BF16)?, &g)?;
    assert_eq!(y16.dtype(), DType::BF16);
    assert_close(&y16, &y32, 3e-2, "bf16 depthwise")?;
    let bad = seeded_uniform(&[3, 1, 3, 3], 8, &dev)?;
    let e = depthwise_conv2d(&x, &bad, &g).unwrap_err().to_string();
    assert!(
        e.contains("[3, 1, 3, 3]") && e.contains("[1, 4, 9, 9]"),
        "{e}"
    );
    let tiny = seeded_uniform(&[1, 4, 2, 2], 7, &dev)?;
    assert!(depthwise_conv2d(&tiny, &w, &Conv2dGeometry::default()).is_err());
    Ok(())
}

#[test]
fn conv2d_strided_gradients_on_non_square_input() -> Result<()> {
    // candle 0.11's own conv2d backward is wrong here (output padding from the height only).
    for dev in devices() {
        for (h, w, k, s, r) in [
            (10, 9, 3, 2, 1),
            (9, 10, 3, 2, 1),
            (11, 8, 1, 2, 1),
            (17, 23, 3, 1, 2),
            (10, 9, 7, 2, 1),
        ] {
            let geom = Conv2dGeometry::deeplab(k, s, r);
            let x = seeded_uniform(&[2, 3, h, w], 9, &dev)?;
            let wt = seeded_uniform(&[4, 3, k, k], 10, &dev)?;
            let b = seeded_uniform(&[4], 11, &dev)?;
            compare_op(
                &[x, wt, b],
                &|t| conv2d(&t[0], &t[1], Some(&t[2]), &geom, 1),
                &|t| reference::conv2d(&t[0], &t[1], Some(&t[2]), &geom),
                &format!("conv2d {h}x{w} k{k} s{s} r{r}"),
            )?;
        }
        // 1x1 pointwise (matmul path).
        let x = seeded_uniform(&[2, 6, 5, 7], 12, &dev)?;
        let wt = seeded_uniform(&[3, 6, 1, 1], 13, &dev)?;
        let g = Conv2dGeometry::default();
        compare_op(
            &[x, wt],
            &|t| conv2d(&t[0], &t[1], None, &g, 1),
            &|t| reference::conv2d(&t[0], &t[1], None, &g),
            "pointwise",
        )?;
    }
    Ok(())
}

#[test]
fn resize_hand_computed_values() -> Result<()> {
    for dev in devices() {
        // 1x3 row [0, 10, 20] -> 5 columns.
        let x = Tensor::new(&[0f32, 10., 20.], &dev)?.reshape((1, 1, 1, 3))?;
        let ac = resize_bilinear(&x, (1, 5), ResizeMode::AlignCorners)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(ac, [0., 5., 10., 15., 20.]);
        // Half-pixel: src = (d + .5) * 3/5 - .5 = -0.2 (clamped 0), 0.4, 1.0, 1.6, 2.2 (-> 2).
        let hp = resize_bilinear(&x, (1, 5), ResizeMode::HalfPixel)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in hp.iter().zip([0., 4., 10., 16., 20.]) {
            assert!((a - b).abs() < 1e-5, "{hp:?}");
        }
        // Asymmetric: src = d * 3/5 = 0, .6, 1.2, 1.8, 2.4.
        let asy = resize_bilinear(&x, (1, 5), ResizeMode::Asymmetric)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in asy.iter().zip([0., 6., 12., 18., 20.]) {
            assert!((a - b).abs() < 1e-5, "{asy:?}");
        }
        // 2x2 -> 3x3 align corners: the centre is the mean of the four corners.
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?.reshape((1, 1, 2, 2))?;
        let y = resize_bilinear(&x, (3, 3), ResizeMode::AlignCorners)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(y, [1., 1.5, 2., 2., 2.5, 3., 3., 3.5, 4.]);
        // 129 -> 513 with align corners lands exactly on every 4th output.
        let x = seeded_uniform(&[1, 2, 129, 129], 3, &dev)?;
        let y = resize_bilinear(&x, (513, 513), ResizeMode::AlignCorners)?;
        let sub = y.narrow(2, 4 * 7, 1)?.narrow(3, 4 * 9, 1)?.flatten_all()?;
        let src = x.narrow(2, 7, 1)?.narrow(3, 9, 1)?.flatten_all()?;
        assert_close(&sub, &src, 1e-6, "align corners grid")?;
    }
    Ok(())
}

#[test]
fn resize_matches_reference() -> Result<()> {
    for dev in devices() {
        for mode in [
            ResizeMode::AlignCorners,
            ResizeMode::HalfPixel,
            ResizeMode::Asymmetric,
        ] {
            for (inp, out) in [
                ((17, 23), (65, 65)),
                ((65, 65), (17, 23)),
                ((9, 9), (33, 31)),
                ((1, 5), (4, 1)),
            ] {
                let x = seeded_uniform(&[2, 3, inp.0, inp.1], 4, &dev)?;
                compare_op(
                    &[x],
                    &|t| resize_bilinear(&t[0], out, mode),
                    &|t| reference::resize_bilinear(&t[0], out, mode),
                    &format!("resize {inp:?}->{out:?} {mode:?}"),
                )?;
            }
        }
        let x = seeded_uniform(&[1, 2, 4, 3], 5, &dev)?;
        finite_difference(&[x], 0, &|t| {
            resize_bilinear(&t[0], (7, 5), ResizeMode::AlignCorners)
        })?;
    }
    Ok(())
}

#[test]
fn batch_norm_train_matches_reference() -> Result<()> {
    for dev in devices() {
        for shape in [[2usize, 5, 17, 23], [2, 3, 65, 65], [4, 2, 1, 1]] {
            let x = (seeded_uniform(&shape, 6, &dev)? * 3.0)?.affine(1.0, 0.5)?;
            let g = seeded_uniform(&[shape[1]], 7, &dev)?;
            let b = seeded_uniform(&[shape[1]], 8, &dev)?;
            compare_op(
                &[x.clone(), g.clone(), b.clone()],
                &|t| Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-3)?.0),
                &|t| Ok(reference::batch_norm_train(&t[0], &t[1], &t[2], 1e-3)?.0),
                &format!("bn train {shape:?}"),
            )?;
            let (_, m, v) = batch_norm_train(&x, &g, &b, 1e-3)?;
            let (_, mr, vr) = reference::batch_norm_train(&x, &g, &b, 1e-3)?;
            assert_close(&m, &mr, 1e-5, "batch mean")?;
            assert_close(&v, &vr, 1e-5, "batch var")?;
            // With the activation fused into the op: candle's relu / clamp after the
            // reference normalization (the shift makes some outputs pass 6 for ReLU6).
            let b6 = (&b + 5.5)?;
            for (act, shift) in [(Activation::Relu, &b), (Activation::Relu6, &b6)] {
                compare_op(
                    &[x.clone(), g.clone(), shift.clone()],
                    &|t| Ok(batch_norm_train_act(&t[0], &t[1], &t[2], 1e-3, act)?.0),
                    &|t| {
                        let y = reference::batch_norm_train(&t[0], &t[1], &t[2], 1e-3)?.0;
                        match act {
                            Activation::Relu6 => y.clamp(0f32, 6f32),
                            _ => y.relu(),
                        }
                    },
                    &format!("bn train + {act:?} {shape:?}"),
                )?;
                let (_, ma, va) = batch_norm_train_act(&x, &g, shift, 1e-3, act)?;
                assert_close(&ma, &mr, 1e-5, "batch mean with activation")?;
                assert_close(&va, &vr, 1e-5, "batch var with activation")?;
            }
        }
        let x = seeded_uniform(&[2, 2, 3, 3], 9, &dev)?;
        let g = seeded_uniform(&[2], 10, &dev)?;
        let b = seeded_uniform(&[2], 11, &dev)?;
        let f = |t: &[Tensor]| Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-3)?.0);
        finite_difference(&[x.clone(), g.clone(), b.clone()], 0, &f)?;
        finite_difference(&[x, g, b], 1, &f)?;
    }
    Ok(())
}

#[test]
fn batch_norm_running_stats_by_hand() -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let bn = BatchNorm2d::new(1, BatchNormConfig::torch().with_momentum(0.25), vb)?;
    // One channel, values 1..=4: mean 2.5, biased var 1.25, unbiased var 5/3.
    let x = Tensor::new(&[1f32, 2., 3., 4.], &dev)?.reshape((1, 1, 2, 2))?;
    let y = bn.forward_t(&x, true)?;
    let inv = 1.0 / (1.25f32 + 1e-5).sqrt();
    let want: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|v| (v - 2.5) * inv).collect();
    for (a, b) in y.flatten_all()?.to_vec1::<f32>()?.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5);
    }
    let rm = bn.running_mean().to_vec1::<f32>()?[0];
    let rv = bn.running_var().to_vec1::<f32>()?[0];
    assert!((rm - 0.25 * 2.5).abs() < 1e-6, "running mean {rm}");
    assert!(
        (rv - (0.75 + 0.25 * 5.0 / 3.0)).abs() < 1e-6,
        "running var {rv}"
    );
    // The running stats live in the VarMap (so checkpoints save them).
    let saved = map
        .data()
        .lock()
        .unwrap()
        .get("running_mean")
        .unwrap()
        .as_tensor()
        .to_vec1::<f32>()?[0];
    assert_eq!(saved, rm);
    // Eval uses the running stats.
    let ye = bn.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
    let inv = 1.0 / (rv + 1e-5).sqrt();
    assert!((ye[0] - (1.0 - rm) * inv).abs() < 1e-5);
    Ok(())
}

#[test]
fn channel_affine_gradients() -> Result<()> {
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        let x = (seeded_uniform(&[2, 3, 5, 4], 12, &Device::Cpu)? * 8.0)?;
        let s = seeded_uniform(&[3], 13, &Device::Cpu)?;
        let b = seeded_uniform(&[3], 14, &Device::Cpu)?;
        compare_op(
            &[x, s, b],
            &|t| channel_affine(&t[0], &t[1], &t[2], act),
            &|t| {
                let y = t[0]
                    .broadcast_mul(&t[1].reshape((1, 3, 1, 1))?)?
                    .broadcast_add(&t[2].reshape((1, 3, 1, 1))?)?;
                act.apply(&y)
            },
            &format!("channel affine {act:?}"),
        )?;
    }
    Ok(())
}

#[test]
fn cross_entropy_with_ignore() -> Result<()> {
    for dev in devices() {
        let logits = (seeded_uniform(&[2, 5, 7, 9], 15, &dev)? * 4.0)?;
        let mut labels: Vec<u8> = (0..2 * 7 * 9).map(|i| (i * 7 % 5) as u8).collect();
        for i in (0..labels.len()).step_by(3) {
            labels[i] = 255;
        }
        let labels = Tensor::from_vec(labels, (2, 7, 9), &dev)?;
        let l2 = labels.clone();
        compare_op(
            std::slice::from_ref(&logits),
            &|t| cross_entropy(&t[0], &labels, 255),
            &|t| reference::cross_entropy(&t[0], &l2, 255),
            "cross entropy",
        )?;
        finite_difference(
            &[logits.narrow(0, 0, 1)?.narrow(2, 0, 2)?.contiguous()?],
            0,
            &|t| cross_entropy(&t[0], &labels.narrow(0, 0, 1)?.narrow(1, 0, 2)?, 255),
        )?;
        // All ignored: loss 0, gradient 0 (not NaN).
        let ign = Tensor::full(255u8, (2, 7, 9), &dev)?;
        let (y, g) = run_with_grads(std::slice::from_ref(&logits), &|t| {
            cross_entropy(&t[0], &ign, 255)
        })?;
        assert_eq!(y.to_dtype(DType::F32)?.to_scalar::<f32>()?, 0.0);
        assert_eq!(g[0].abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        // Unknown class id.
        let bad = Tensor::full(7u8, (2, 7, 9), &dev)?;
        let e = cross_entropy(&logits, &bad, 255).unwrap_err().to_string();
        assert!(e.contains("label 7"), "{e}");
        let e = cross_entropy(&logits, &ign.narrow(1, 0, 3)?, 255)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 3, 9]"), "{e}");
    }
    Ok(())
}

#[test]
fn max_pool_matches_reference() -> Result<()> {
    for dev in devices() {
        for (h, w) in [(17, 23), (10, 9), (65, 65)] {
            let geom = Conv2dGeometry {
                stride: (2, 2),
                dilation: (1, 1),
                padding: Padding2d::uniform(1),
            };
            let x = seeded_uniform(&[2, 3, h, w], 16, &dev)?;
            compare_op(
                &[x],
                &|t| max_pool2d(&t[0], (3, 3), &geom),
                &|t| reference::max_pool2d(&t[0], (3, 3), &geom),
                &format!("max pool {h}x{w}"),
            )?;
        }
        // A window made mostly of padding still picks the real value, negative or not.
        let x = Tensor::new(&[-5f32], &dev)?.reshape((1, 1, 1, 1))?;
        let g = Conv2dGeometry {
            stride: (2, 2),
            dilation: (1, 1),
            padding: Padding2d::uniform(1),
        };
        assert_eq!(
            max_pool2d(&x, (3, 3), &g)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            [-5.0]
        );
    }
    Ok(())
}

#[test]
fn layers_load_timm_names() -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let cfg = SeparableConv2dConfig {
        kernel: 3,
        geom: Conv2dGeometry::deeplab(3, 2, 1),
        act: SeparableActivation::Input,
        bn: BatchNormConfig::tf_backbone(),
    };
    let sep = SeparableConv2d::new(8, 16, &cfg, vb.pp("conv1"))?;
    let mut names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "conv1.bn_dw.bias",
            "conv1.bn_dw.running_mean",
            "conv1.bn_dw.running_var",
            "conv1.bn_dw.weight",
            "conv1.bn_pw.bias",
            "conv1.bn_pw.running_mean",
            "conv1.bn_pw.running_var",
            "conv1.bn_pw.weight",
            "conv1.conv_dw.weight",
            "conv1.conv_pw.weight",
        ]
    );
    let x = seeded_uniform(&[2, 8, 17, 23], 1, &dev)?;
    assert_eq!(sep.forward_t(&x, true)?.dims(), &[2, 16, 9, 12]);
    let conv = Conv2d::new(8, 4, 3, Conv2dGeometry::same(3, 1), true, vb.pp("c"))?;
    assert_eq!(conv.forward(&x)?.dims(), &[2, 4, 17, 23]);
    Ok(())
}

#[test]
fn im2col_matches_reference() -> Result<()> {
    for dev in devices() {
        // (input NCHW, kernel, geometry)
        let asym = Conv2dGeometry {
            stride: (1, 2),
            dilation: (2, 1),
            padding: Padding2d {
                top: 0,
                bottom: 3,
                left: 2,
                right: 0,
            },
        };
        let cases = [
            ((2, 3, 17, 23), (3, 3), Conv2dGeometry::same(3, 1)),
            ((2, 3, 17, 23), (3, 3), Conv2dGeometry::same(3, 4)),
            ((1, 2, 17, 23), (3, 3), Conv2dGeometry::same(3, 12)),
            ((2, 3, 10, 9), (3, 3), Conv2dGeometry::deeplab(3, 2, 1)),
            ((2, 2, 10, 9), (7, 7), Conv2dGeometry::deeplab(7, 2, 1)),
            ((2, 3, 11, 8), (1, 1), Conv2dGeometry::deeplab(1, 2, 1)),
            ((1, 2, 65, 65), (3, 3), Conv2dGeometry::deeplab(3, 2, 2)),
            ((2, 2, 13, 12), (3, 2), asym),
        ];
        for ((n, c, h, w), k, geom) in cases {
            let x = seeded_uniform(&[n, c, h, w], 21, &dev)?;
            compare_op(
                &[x],
                &|t| im2col(&t[0], k, &geom),
                &|t| reference::im2col(&t[0], k, &geom),
                &format!("im2col {:?} k{k:?} {geom:?} on {dev:?}", (n, c, h, w)),
            )?;
        }
        // col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>, and its own
        // gradient is im2col.
        let (x, geom) = (seeded_uniform(&[2, 3, 10, 9], 22, &dev)?, asym);
        let cols = im2col(&x, (3, 2), &geom)?;
        let c = seeded_uniform(cols.dims(), 23, &dev)?;
        let lhs = (&cols * &c)?.sum_all()?.to_scalar::<f32>()?;
        let back = col2im(&c, (10, 9), (3, 2), &geom)?;
        let rhs = (&x * &back)?.sum_all()?.to_scalar::<f32>()?;
        assert!(
            (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
        let (_, g) = run_with_grads(std::slice::from_ref(&c), &|t| {
            col2im(&t[0], (10, 9), (3, 2), &geom)
        })?;
        let r = seeded_uniform(&[2, 3, 10, 9], 99, &dev)?;
        assert_close(&g[0], &im2col(&r, (3, 2), &geom)?, 1e-6, "col2im gradient")?;
        // Column counts that do not fit the geometry are rejected with the shapes.
        let e = col2im(&c.narrow(2, 1, 3)?, (10, 9), (3, 2), &geom)
            .unwrap_err()
            .to_string();
        assert!(e.contains("col2im") && e.contains("(10, 9)"), "{e}");
    }
    let x = seeded_uniform(&[1, 2, 5, 4], 24, &Device::Cpu)?;
    let g = Conv2dGeometry::deeplab(3, 2, 1);
    finite_difference(&[x], 0, &|t| im2col(&t[0], (3, 3), &g))?;
    Ok(())
}

#[test]
fn conv2d_im2col_matches_reference() -> Result<()> {
    // The CPU path is im2col + gemm; forward and the gradients of input, weight and bias
    // against the tap-by-tap reference, on odd sizes, with TF fixed (asymmetric) padding for
    // the strided cases.
    for dev in devices() {
        type ConvCase = (
            (usize, usize, usize, usize),
            usize,
            usize,
            usize,
            usize,
            bool,
        );
        let cases: &[ConvCase] = &[
            // (input NCHW, cout, kernel, stride, rate, fixed padding instead of SAME)
            ((2, 3, 17, 23), 4, 3, 1, 1, false),
            ((2, 3, 17, 23), 4, 3, 2, 1, true),
            ((2, 3, 17, 23), 5, 3, 1, 2, false),
            ((2, 3, 17, 23), 4, 3, 1, 4, false),
            ((2, 2, 17, 23), 3, 3, 1, 12, false),
            ((2, 3, 10, 9), 4, 7, 2, 1, true),
            ((2, 3, 10, 9), 4, 7, 1, 1, false),
            ((2, 5, 10, 9), 6, 1, 2, 1, true),
            // 1x1 stride 1: the per-image sgemm op with its own backward.
            ((2, 5, 10, 9), 6, 1, 1, 1, false),
            ((2, 40, 13, 11), 50, 1, 1, 1, false),
            ((2, 4, 65, 65), 3, 3, 2, 1, true),
            ((1, 3, 65, 65), 4, 7, 2, 1, true),
            ((1, 3, 65, 65), 4, 3, 1, 2, true),
            ((2, 4, 18, 23), 3, 4, 2, 1, true),
            // More patch-matrix elements than one chunk: several gemms per image.
            ((2, 32, 65, 65), 4, 7, 1, 1, false),
            // Padding-heavy atrous convolutions run by output rectangles that skip the taps
            // in the padding (`padding_share` > 0.15): a rate beyond the map (centre tap
            // only), strided with fixed padding, 5x5, and a rectangle whose patch matrix is
            // split into row chunks.
            ((2, 8, 9, 7), 3, 3, 1, 12, false),
            ((1, 6, 33, 31), 5, 3, 2, 6, true),
            ((1, 4, 12, 10), 3, 5, 1, 3, false),
            ((1, 1100, 33, 33), 4, 3, 1, 6, false),
            // 3x3 stride 1 with at least 32 channels on both sides: Winograd F(2x2, 3x3), odd
            // and even sizes, several tile-row blocks.
            ((2, 32, 17, 23), 40, 3, 1, 1, false),
            ((1, 33, 8, 9), 32, 3, 1, 1, false),
            ((1, 64, 65, 66), 48, 3, 1, 1, false),
            // Atrous 3x3 convs with >= 32 channels: Winograd by phases (rate 2, SAME and fixed
            // padding) or, by the multiply count, rectangles (rates 3 and 6 on these maps);
            // `winograd::tests` runs the Winograd path itself at every rate.
            ((2, 32, 17, 23), 32, 3, 1, 2, false),
            ((1, 33, 33, 31), 40, 3, 1, 2, true),
            ((1, 32, 20, 17), 32, 3, 1, 3, false),
            ((1, 48, 33, 33), 32, 3, 1, 6, false),
        ];
        for &((n, c, h, w), cout, k, s, r, fixed) in cases {
            let geom = if fixed {
                Conv2dGeometry::deeplab(k, s, r)
            } else {
                Conv2dGeometry::same(k, r)
            };
            let x = seeded_uniform(&[n, c, h, w], 31, &dev)?;
            let wt = (seeded_uniform(&[cout, c, k, k], 32, &dev)? * 0.5)?;
            let b = seeded_uniform(&[cout], 33, &dev)?;
            let what = format!(
                "conv2d {:?}->{cout} k{k} s{s} r{r} on {dev:?}",
                (n, c, h, w)
            );
            compare_op(
                &[x.clone(), wt.clone(), b.clone()],
                &|t| conv2d(&t[0], &t[1], Some(&t[2]), &geom, 1),
                &|t| reference::conv2d(&t[0], &t[1], Some(&t[2]), &geom),
                &what,
            )?;
            // And against candle's own conv2d where its padding is symmetric.
            if geom.padding.is_symmetric() && geom.padding.top == geom.padding.left {
                let ours = conv2d(&x, &wt, None, &geom, 1)?;
                let theirs = x.conv2d(&wt, geom.padding.top, s, r, 1)?;
                assert_close(&ours, &theirs, 1e-5, &format!("{what} vs candle"))?;
            }
        }
        // Winograd with asymmetric padding (none above, two rows below; two columns left),
        // undilated and with different rates per axis.
        for dilation in [(1, 1), (2, 3)] {
            let geom = Conv2dGeometry {
                padding: Padding2d {
                    top: 0,
                    bottom: 2 * dilation.0,
                    left: 2 * dilation.1,
                    right: 0,
                },
                dilation,
                ..Conv2dGeometry::default()
            };
            let x = seeded_uniform(&[1, 32, 11, 14], 36, &dev)?;
            let wt = (seeded_uniform(&[32, 32, 3, 3], 37, &dev)? * 0.5)?;
            compare_op(
                &[x, wt],
                &|t| conv2d(&t[0], &t[1], None, &geom, 1),
                &|t| reference::conv2d(&t[0], &t[1], None, &geom),
                &format!("winograd conv2d with asymmetric padding, dilation {dilation:?}"),
            )?;
        }
        // Padding wider than the kernel's reach: the outer output rows and columns read only
        // padding (rectangles without a tap), at 1100 channels (two depth blocks) and 5.
        for (c, cout) in [(1100, 4), (5, 3)] {
            let geom = Conv2dGeometry {
                padding: Padding2d {
                    top: 4,
                    bottom: 3,
                    left: 4,
                    right: 5,
                },
                ..Conv2dGeometry::default()
            };
            let x = seeded_uniform(&[1, c, 6, 7], 38, &dev)?;
            let wt = (seeded_uniform(&[cout, c, 3, 3], 39, &dev)? * 0.5)?;
            let b = seeded_uniform(&[cout], 40, &dev)?;
            compare_op(
                &[x, wt, b],
                &|t| conv2d(&t[0], &t[1], Some(&t[2]), &geom, 1),
                &|t| reference::conv2d(&t[0], &t[1], Some(&t[2]), &geom),
                &format!("conv2d {c} -> {cout} with padding beyond the kernel on {dev:?}"),
            )?;
        }
        // An input that needs no gradient (the stem's image) gets none computed; the weight
        // gradient is still right.
        let x = seeded_uniform(&[2, 3, 17, 23], 34, &dev)?;
        let wv = Var::from_tensor(&seeded_uniform(&[4, 3, 7, 7], 35, &dev)?)?;
        let wr = Var::from_tensor(wv.as_tensor())?;
        let geom = Conv2dGeometry::deeplab(7, 2, 1);
        let y = conv2d(&x, wv.as_tensor(), None, &geom, 1)?;
        let r = seeded_uniform(y.dims(), 99, &dev)?;
        let grads = (y * &r)?.sum_all()?.backward()?;
        let yr = reference::conv2d(&x, wr.as_tensor(), None, &geom)?;
        let gref = (yr * &r)?.sum_all()?.backward()?;
        assert_close(
            grads.get(&wv).expect("weight gradient"),
            gref.get(&wr).expect("reference weight gradient"),
            1e-4,
            "weight-only gradient",
        )?;
    }
    Ok(())
}

/// Winograd rounds differently from a direct sum: on a ResNet layer3 convolution (256 -> 256
/// channels, 33x33, Kaiming-scaled weights), where the dispatcher picks F(4x4, 3x3), the error
/// against an f64 computation stays within 16x that of the direct f32 reference composition
/// (prints both; `winograd::tests::accuracy_against_f64` bounds F(2x2, 3x3) by 4x).
#[test]
fn winograd_accuracy_against_f64() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded_uniform(&[1, 256, 33, 33], 51, &dev)?;
    // uniform [-a, a) has standard deviation a / sqrt(3): Kaiming's sqrt(2 / fan_in).
    let a = (3.0f64 * 2.0 / (9.0 * 256.0)).sqrt();
    let w = (seeded_uniform(&[256, 256, 3, 3], 52, &dev)? * a)?;
    let g = Conv2dGeometry::same(3, 1);
    let ours = conv2d(&x, &w, None, &g, 1)?;
    let direct = reference::conv2d(&x, &w, None, &g)?;
    let exact = reference::conv2d(&x.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, None, &g)?;
    let err = |t: &Tensor| -> Result<f64> {
        let d = (t.to_dtype(DType::F64)? - &exact)?
            .abs()?
            .flatten_all()?
            .max(0)?;
        let m = exact.abs()?.flatten_all()?.max(0)?;
        Ok(d.to_scalar::<f64>()? / m.to_scalar::<f64>()?)
    };
    let (e_ours, e_direct) = (err(&ours)?, err(&direct)?);
    println!("max error / max |y|: winograd {e_ours:.2e}, direct f32 {e_direct:.2e}");
    assert!(
        e_ours <= 16.0 * e_direct.max(1e-8),
        "winograd error {e_ours:.2e} vs direct {e_direct:.2e}"
    );
    Ok(())
}

#[test]
fn conv2d_im2col_half_precision_and_errors() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded_uniform(&[1, 4, 9, 11], 41, &dev)?;
    let w = seeded_uniform(&[3, 4, 3, 3], 42, &dev)?;
    let g = Conv2dGeometry::deeplab(3, 2, 1);
    let y32 = conv2d(&x, &w, None, &g, 1)?;
    for dt in [DType::BF16, DType::F16] {
        let y = conv2d(&x.to_dtype(dt)?, &w.to_dtype(dt)?, None, &g, 1)?;
        assert_eq!(y.dtype(), dt);
        assert_close(&y, &y32, 3e-2, &format!("{dt:?} conv2d"))?;
    }
    let e = conv2d(&x, &w.narrow(1, 0, 3)?, None, &g, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[3, 3, 3, 3]") && e.contains("[1, 4, 9, 11]"),
        "{e}"
    );
    let tiny = seeded_uniform(&[1, 4, 2, 2], 43, &dev)?;
    assert!(conv2d(&tiny, &w, None, &Conv2dGeometry::default(), 1).is_err());
    Ok(())
}

/// A VarBuilder over seeded random tensors for every parameter `layer` asks for, with
/// BatchNorm running variances kept positive.
fn random_builder(shapes: &[(&str, Vec<usize>)], seed: u64) -> Result<VarBuilder<'static>> {
    let mut map = std::collections::HashMap::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let t = seeded_uniform(shape, seed + i as u64, &Device::Cpu)?;
        let t = if name.ends_with("running_var") {
            (t.abs()? + 0.5)?
        } else if name.ends_with(".weight") && shape.len() == 1 {
            (t + 1.0)?
        } else {
            t
        };
        map.insert(name.to_string(), t);
    }
    Ok(VarBuilder::from_tensors(map, DType::F32, &Device::Cpu))
}

fn bn_shapes(prefix: &str, c: usize) -> Vec<(String, Vec<usize>)> {
    ["weight", "bias", "running_mean", "running_var"]
        .iter()
        .map(|n| (format!("{prefix}.{n}"), vec![c]))
        .collect()
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

/// Seeded random `conv.weight` (8 -> 12 channels, `k x k`) and `bn.*` (12 channels).
fn conv_bn_builder(k: usize, seed: u64) -> Result<VarBuilder<'static>> {
    let mut shapes = vec![("conv.weight".to_string(), vec![12, 8, k, k])];
    shapes.extend(bn_shapes("bn", 12));
    let shapes: Vec<(&str, Vec<usize>)> = shapes
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    random_builder(&shapes, seed)
}

/// Folding every BatchNorm into its convolution's fused output pass changes no bit of the
/// evaluation-mode output: dense convs (1x1 and k x k, strided, dilated, TF padding) and
/// separable convs in both activation placements, on the fused kernels.
#[test]
fn folded_layers_are_bit_identical() -> Result<()> {
    let x = (seeded_uniform(&[2, 8, 17, 23], 11, &Device::Cpu)? * 3.0)?;
    let convs = [
        (1, Conv2dGeometry::default(), Activation::Relu),
        (3, Conv2dGeometry::deeplab(3, 2, 1), Activation::Relu6),
        (3, Conv2dGeometry::same(3, 2), Activation::None),
        (3, Conv2dGeometry::same(3, 4), Activation::Relu),
    ];
    for (i, (k, geom, act)) in convs.into_iter().enumerate() {
        let vb = conv_bn_builder(k, 20 + 10 * i as u64)?;
        let mut layer = ConvBnAct::new(8, 12, k, geom, BatchNormConfig::tf_head(), act, vb)?;
        let before = layer.forward_t(&x, false)?;
        layer.fold_batch_norm()?;
        let after = layer.forward_t(&x, false)?;
        assert_eq!(
            bits(&before)?,
            bits(&after)?,
            "conv {k}x{k} {geom:?} {act:?}"
        );
        assert!(
            layer.forward_t(&x, true).is_err(),
            "a folded layer must not train"
        );
    }
    for (i, (act, geom)) in [
        (SeparableActivation::Input, Conv2dGeometry::deeplab(3, 2, 1)),
        (SeparableActivation::Input, Conv2dGeometry::same(3, 1)),
        (
            SeparableActivation::AfterEach(Activation::Relu),
            Conv2dGeometry::same(3, 12),
        ),
        (SeparableActivation::None, Conv2dGeometry::same(3, 2)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut shapes = vec![
            ("conv_dw.weight".to_string(), vec![8, 1, 3, 3]),
            ("conv_pw.weight".to_string(), vec![16, 8, 1, 1]),
        ];
        shapes.extend(bn_shapes("bn_dw", 8));
        shapes.extend(bn_shapes("bn_pw", 16));
        let shapes: Vec<(&str, Vec<usize>)> = shapes
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        let vb = random_builder(&shapes, 60 + 10 * i as u64)?;
        let cfg = SeparableConv2dConfig {
            kernel: 3,
            geom,
            act,
            bn: BatchNormConfig::tf_backbone(),
        };
        let mut layer = SeparableConv2d::new(8, 16, &cfg, vb)?;
        let (d0, p0) = layer.forward_parts(&x, false)?;
        layer.fold_batch_norm()?;
        let (d1, p1) = layer.forward_parts(&x, false)?;
        assert_eq!(
            bits(&d0)?,
            bits(&d1)?,
            "separable {act:?} {geom:?}: depthwise part"
        );
        assert_eq!(bits(&p0)?, bits(&p1)?, "separable {act:?} {geom:?}");
        // The whole layer: stride 1 runs the fused separable op.
        let fused = layer.forward_t(&x, false)?;
        assert_eq!(
            bits(&p0)?,
            bits(&fused)?,
            "separable {act:?} {geom:?}: fused"
        );
        let res = seeded_uniform(p0.dims(), 90 + i as u64, &Device::Cpu)?;
        let want = (&p0 + &res)?;
        let got = layer.forward_add(&x, &res, false)?;
        assert_eq!(
            bits(&want)?,
            bits(&got)?,
            "separable {act:?} {geom:?} + residual"
        );
    }
    Ok(())
}

/// A folded 1x1 convolution over a concatenation run without building it
/// (`ConvBnAct::forward_concat`) gives the bits of the unfolded convolution over the
/// concatenated tensor: a constant part in front (broadcast over the pixels, as DeepLab's
/// image pooling), maps after it, depth over one depth block of the plain product (613
/// channels, split at different points), batch 2; only maps; a constant after a map (the
/// concatenating fallback).
#[test]
fn concat_projection_is_bit_identical() -> Result<()> {
    let dev = Device::Cpu;
    let (n, h, w) = (2, 17, 23);
    let constant = seeded_uniform(&[n, 5, 1, 1], 1, &dev)?;
    let a = seeded_uniform(&[n, 8, h, w], 2, &dev)?;
    let b = seeded_uniform(&[n, 600, h, w], 3, &dev)?;
    let cases: [Vec<ConcatInput>; 3] = [
        vec![
            ConcatInput::Constant(&constant),
            ConcatInput::Map(&a),
            ConcatInput::Map(&b),
        ],
        vec![ConcatInput::Map(&b), ConcatInput::Map(&a)],
        vec![ConcatInput::Map(&a), ConcatInput::Constant(&constant)],
    ];
    for (i, parts) in cases.iter().enumerate() {
        let full: Vec<Tensor> = parts
            .iter()
            .map(|p| match p {
                ConcatInput::Map(t) => Ok((*t).clone()),
                ConcatInput::Constant(t) => t.broadcast_as((n, 5, h, w))?.contiguous(),
            })
            .collect::<Result<_>>()?;
        let cat = Tensor::cat(&full, 1)?;
        let cin = cat.dim(1)?;
        let mut shapes = vec![("conv.weight".to_string(), vec![12, cin, 1, 1])];
        shapes.extend(bn_shapes("bn", 12));
        let shapes: Vec<(&str, Vec<usize>)> = shapes
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        let vb = random_builder(&shapes, 200 + i as u64)?;
        let cfg = BatchNormConfig::tf_head();
        let one = Conv2dGeometry::default();
        let mut layer = ConvBnAct::new(cin, 12, 1, one, cfg, Activation::Relu, vb)?;
        let want = layer.forward_t(&cat, false)?;
        assert_eq!(
            bits(&want)?,
            bits(&layer.forward_concat(parts, false)?)?,
            "case {i} unfolded"
        );
        layer.fold_batch_norm()?;
        let got = layer.forward_concat(parts, false)?;
        assert_eq!(got.dims(), [n, 12, h, w]);
        assert_eq!(bits(&want)?, bits(&got)?, "case {i}");
    }
    Ok(())
}

/// A residual block's last convolution with its BatchNorm folded, the residual add and the
/// activation in the product's epilogue (`Conv2d::forward_add`) give the same bits as the
/// unfolded convolution, BatchNorm, add and activation, for 1x1 and k x k (strided, dilated)
/// convolutions; a residual of another shape is an error naming both shapes.
#[test]
fn residual_epilogue_is_bit_identical() -> Result<()> {
    let x = (seeded_uniform(&[2, 8, 17, 23], 13, &Device::Cpu)? * 3.0)?;
    for (i, (k, geom)) in [
        (1, Conv2dGeometry::default()),
        (3, Conv2dGeometry::same(3, 1)),
        (3, Conv2dGeometry::deeplab(3, 2, 1)),
        (3, Conv2dGeometry::same(3, 6)),
    ]
    .into_iter()
    .enumerate()
    {
        let vb = conv_bn_builder(k, 40 + 10 * i as u64)?;
        let mut conv = Conv2d::new(8, 12, k, geom, false, vb.pp("conv"))?;
        let mut bn = BatchNorm2d::new(12, BatchNormConfig::tf_backbone(), vb.pp("bn"))?;
        let plain = bn.forward_t(&conv.forward(&x)?, false)?;
        let res = seeded_uniform(plain.dims(), 77 + i as u64, &Device::Cpu)?;
        let unfused: Vec<Tensor> = [Activation::None, Activation::Relu, Activation::Relu6]
            .into_iter()
            .map(|act| act.apply(&(&plain + &res)?))
            .collect::<Result<_>>()?;
        conv.fold_bn(&mut bn)?;
        for (act, want) in [Activation::None, Activation::Relu, Activation::Relu6]
            .into_iter()
            .zip(&unfused)
        {
            let got = conv.forward_add(&x, &res, act)?;
            assert_eq!(
                bits(&got)?,
                bits(want)?,
                "conv {k}x{k} {geom:?} + residual, {act:?}"
            );
        }
        let wrong = res.narrow(3, 1, res.dim(3)? - 1)?;
        let e = conv.forward_add(&x, &wrong, Activation::Relu).unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
    }
    Ok(())
}

/// Seeded values in [-1, 1).
fn random_vec(len: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// The strided operands of one sgemm test: `A` (`m x k`, row stride `k + 3`), `B` (`k x n`,
/// stride `n + 2`), and the row stride of `C` (`n + 5`).
struct GemmCase {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl GemmCase {
    fn new(m: usize, n: usize, k: usize, seed: u64) -> Self {
        let a = random_vec(m * (k + 3), seed);
        let b = random_vec(k * (n + 2), seed + 1);
        Self { m, n, k, a, b }
    }

    /// `C` (sentinel 7.0 in the stride gaps) from `threads` workers.
    fn run(&self, epi: Option<sgemm::RowEpilogue<'_>>, threads: usize) -> Result<Vec<f32>> {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut c = vec![7.0f32; m * (n + 5)];
        sgemm::sgemm(
            (m, n, k),
            (&self.a, k + 3),
            (&self.b, n + 2),
            (&mut c, n + 5),
            epi,
            threads,
        )?;
        Ok(c)
    }
}

/// sgemm against an f64 reference on odd sizes and strided operands: every `m x n` element
/// within the accumulated rounding bound, every stride-gap element untouched; with the epilogue,
/// exactly `act(product.mul_add(scale, shift))`.
#[test]
fn sgemm_matches_f64_reference() -> Result<()> {
    let sizes = [1usize, 3, 15, 16, 17, 33, 100, 257, 1000];
    let mut seed = 500;
    for &m in &sizes {
        for &n in &sizes {
            for &k in &sizes {
                if m * n * k > 20_000_000 {
                    continue;
                }
                seed += 2;
                let case = GemmCase::new(m, n, k, seed);
                let c = case.run(None, 2)?;
                let ldc = n + 5;
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let t = case.a[i * (k + 3) + p] as f64 * case.b[p * (n + 2) + j] as f64;
                            exact += t;
                            mag += t.abs();
                        }
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1.2e-7 * k as f64 * mag + 1e-30,
                            "{m}x{n}x{k} at ({i}, {j}): {got} vs {exact}"
                        );
                    }
                    assert!(
                        c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 7.0),
                        "{m}x{n}x{k}: stride gap of row {i} written"
                    );
                }
                let scale = random_vec(m, seed + 7);
                let shift = random_vec(m, seed + 8);
                for act in [Activation::None, Activation::Relu, Activation::Relu6] {
                    let epi = sgemm::RowEpilogue::affine(&scale, &shift, act);
                    let ce = case.run(Some(epi), 2)?;
                    let want: Vec<u32> = c
                        .iter()
                        .enumerate()
                        .map(|(idx, &v)| {
                            let (i, j) = (idx / ldc, idx % ldc);
                            if j >= n {
                                return v.to_bits();
                            }
                            let v = v.mul_add(scale[i], shift[i]);
                            match act {
                                Activation::None => v,
                                Activation::Relu => v.max(0.0),
                                Activation::Relu6 => v.clamp(0.0, 6.0),
                            }
                            .to_bits()
                        })
                        .collect();
                    let got: Vec<u32> = ce.iter().map(|v| v.to_bits()).collect();
                    assert!(got == want, "{m}x{n}x{k} epilogue {act:?}");
                    // With a residual (laid out like C): act(v * s + t + r), the same bits as
                    // the three separate steps.
                    let res = random_vec(m * ldc, seed + 9);
                    let epi = sgemm::RowEpilogue {
                        residual: Some(&res[..(m - 1) * ldc + n]),
                        ..epi
                    };
                    let cr = case.run(Some(epi), 2)?;
                    for (idx, (&got, &v)) in cr.iter().zip(&c).enumerate() {
                        let (i, j) = (idx / ldc, idx % ldc);
                        let want = if j >= n {
                            v
                        } else {
                            let y = v.mul_add(scale[i], shift[i]) + res[idx];
                            match act {
                                Activation::None => y,
                                Activation::Relu => y.max(0.0),
                                Activation::Relu6 => y.clamp(0.0, 6.0),
                            }
                        };
                        assert!(
                            got.to_bits() == want.to_bits(),
                            "{m}x{n}x{k} residual epilogue {act:?} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// The blocking changes with the thread count (column jobs, row jobs) but no bit of the result
/// does, with or without the epilogue.
#[test]
fn sgemm_threads_are_bit_identical() -> Result<()> {
    for (m, n, k) in [
        (100, 1000, 257),
        (33, 5000, 100),
        (1000, 17, 300),
        (64, 96, 600),
    ] {
        let case = GemmCase::new(m, n, k, 900 + m as u64);
        let scale = random_vec(m, 1);
        let shift = random_vec(m, 2);
        let epi = sgemm::RowEpilogue::affine(&scale, &shift, Activation::Relu);
        let res = random_vec(m * (n + 5), 3);
        let epi_res = sgemm::RowEpilogue {
            residual: Some(&res),
            ..epi
        };
        let one = case.run(None, 1)?;
        let one_epi = case.run(Some(epi), 1)?;
        let one_res = case.run(Some(epi_res), 1)?;
        for t in [2, 3, 8] {
            assert!(case.run(None, t)? == one, "{m}x{n}x{k} on {t} threads");
            assert!(
                case.run(Some(epi), t)? == one_epi,
                "{m}x{n}x{k} with epilogue on {t} threads"
            );
            assert!(
                case.run(Some(epi_res), t)? == one_res,
                "{m}x{n}x{k} with residual epilogue on {t} threads"
            );
        }
    }
    Ok(())
}

/// Column-major operands and accumulation (`sgemm_ex`, the convolution backward's products):
/// every combination of storage orders against an f64 reference of `C0 + A · B`, stride gaps
/// untouched, the same bits on 1, 2 and 3 threads, and accumulating the two halves of the
/// depth gives exactly the single product (the chains continue).
#[test]
fn sgemm_transposed_operands_and_accumulation() -> Result<()> {
    use sgemm::Operand;
    fn op(d: &[f32], ld: usize, t: bool) -> Operand<'_> {
        if t {
            Operand::cols(d, ld)
        } else {
            Operand::rows(d, ld)
        }
    }
    let mut seed = 3000;
    for (m, n, k) in [
        (1, 1, 1),
        (7, 33, 5),
        (17, 49, 300),
        (50, 16, 257),
        (100, 97, 40),
        (9, 300, 600),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            seed += 3;
            // Stored with a padded leading dimension: A is m x k (or k rows of m), B k x n.
            let (lda, ldb, ldc) = (
                if ta { m + 2 } else { k + 2 },
                if tb { k + 1 } else { n + 3 },
                n + 4,
            );
            let a = random_vec(if ta { k * lda } else { m * lda }, seed);
            let b = random_vec(if tb { n * ldb } else { k * ldb }, seed + 1);
            let at = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
            let bt = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
            let c0: Vec<f32> = random_vec(m * ldc, seed + 2)
                .into_iter()
                .enumerate()
                .map(|(i, v)| if i % ldc >= n { 7.0 } else { v })
                .collect();
            let run = |threads: usize| -> Result<Vec<f32>> {
                let mut c = c0.clone();
                sgemm::sgemm_ex(
                    (m, n, k),
                    op(&a, lda, ta),
                    op(&b, ldb, tb),
                    (&mut c, ldc),
                    true,
                    None,
                    threads,
                )?;
                Ok(c)
            };
            let c = run(2)?;
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut mag) =
                        (c0[i * ldc + j] as f64, c0[i * ldc + j].abs() as f64);
                    for p in 0..k {
                        let t = at(i, p) as f64 * bt(p, j) as f64;
                        exact += t;
                        mag += t.abs();
                    }
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1.2e-7 * (k + 1) as f64 * mag + 1e-30,
                        "{m}x{n}x{k} ta {ta} tb {tb} at ({i}, {j}): {got} vs {exact}"
                    );
                }
                assert!(
                    c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 7.0),
                    "{m}x{n}x{k} ta {ta} tb {tb}: stride gap of row {i} written"
                );
            }
            for t in [1, 3] {
                assert!(run(t)? == c, "{m}x{n}x{k} ta {ta} tb {tb} on {t} threads");
            }
            // Depth split in two: the second product continues the first's chains.
            let h = k / 2;
            let sub_a = |p0: usize| if ta { &a[p0 * lda..] } else { &a[p0..] };
            let sub_b = |p0: usize| if tb { &b[p0..] } else { &b[p0 * ldb..] };
            let mut whole = vec![7.0f32; m * ldc];
            let mut split = whole.clone();
            sgemm::sgemm_ex(
                (m, n, k),
                op(&a, lda, ta),
                op(&b, ldb, tb),
                (&mut whole, ldc),
                false,
                None,
                2,
            )?;
            sgemm::sgemm_ex(
                (m, n, h),
                op(sub_a(0), lda, ta),
                op(sub_b(0), ldb, tb),
                (&mut split, ldc),
                false,
                None,
                2,
            )?;
            sgemm::sgemm_ex(
                (m, n, k - h),
                op(sub_a(h), lda, ta),
                op(sub_b(h), ldb, tb),
                (&mut split, ldc),
                true,
                None,
                1,
            )?;
            // (Exact for the AVX-512 kernel; the `gemm` crate fallback orders its sums by
            // its own blocking.)
            #[cfg(target_arch = "x86_64")]
            let own_kernel = std::env::var_os("DEEPLAB_NO_AVX512").is_none()
                && std::is_x86_feature_detected!("avx512f");
            #[cfg(not(target_arch = "x86_64"))]
            let own_kernel = false;
            let same = whole
                .iter()
                .zip(&split)
                .all(|(x, y)| x == y || (!own_kernel && (x - y).abs() <= 1e-4 * (1.0 + x.abs())));
            assert!(same, "{m}x{n}x{k} ta {ta} tb {tb}: split depth differs");
        }
    }
    // A column-major operand too short for its leading dimension is an error naming it.
    let short = vec![0f32; 10];
    let mut c = vec![0f32; 9];
    let e = sgemm::sgemm_ex(
        (3, 3, 4),
        Operand::cols(&short, 3),
        Operand::rows(&short, 3),
        (&mut c, 3),
        false,
        None,
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("column-major A"), "{e}");
    Ok(())
}

/// A NaN through the fused epilogues behaves as in the unfused ops: ReLU gives 0 (`f32::max`),
/// ReLU6 and the identity keep it (`f32::clamp`), in the sgemm tile epilogue and in the
/// depthwise kernel's.
#[test]
fn fused_epilogues_keep_nan_like_the_unfused_ops() -> Result<()> {
    // Row 0 of A holds a NaN: the whole row 0 of the product is NaN.
    let a = [f32::NAN, 1.0, 2.0, 1.0, -1.0, 0.5];
    let b = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let (scale, shift) = ([1.0f32, 2.0], [0.5f32, -0.5]);
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        let mut c = [0f32; 4];
        let epi = sgemm::RowEpilogue::affine(&scale, &shift, act);
        sgemm::sgemm((2, 2, 3), (&a, 3), (&b, 2), (&mut c, 2), Some(epi), 1)?;
        for &v in &c[..2] {
            match act {
                Activation::Relu => assert_eq!(v, 0.0, "{act:?} of NaN"),
                _ => assert!(v.is_nan(), "{act:?} of NaN gave {v}"),
            }
        }
    }
    let dev = Device::Cpu;
    let mut xv = vec![0.5f32; 2 * 9 * 9];
    xv[40] = f32::NAN;
    let x = Tensor::from_vec(xv, (1, 2, 9, 9), &dev)?;
    let w = seeded_uniform(&[2, 1, 3, 3], 3, &dev)?;
    let bias = Tensor::new(&[0.25f32, -0.25], &dev)?;
    let g = Conv2dGeometry::same(3, 1);
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        let fused = depthwise_conv2d_fused(&x, &w, Some(&bias), false, act, &g)?;
        let plain = depthwise_conv2d(&x, &w, &g)?.broadcast_add(&bias.reshape((1, 2, 1, 1))?)?;
        let plain = act.apply(&plain)?;
        let (f, p) = (
            fused.flatten_all()?.to_vec1::<f32>()?,
            plain.flatten_all()?.to_vec1::<f32>()?,
        );
        for (i, (f, p)) in f.iter().zip(&p).enumerate() {
            assert!(
                f.to_bits() == p.to_bits() || (f.is_nan() && p.is_nan()),
                "{act:?} at {i}: fused {f} vs unfused {p}"
            );
        }
        assert!(f.iter().any(|v| v.is_nan()) == (act != Activation::Relu));
    }
    Ok(())
}

/// Operands too small for the stated sizes and strides, or an epilogue with too few rows, are
/// errors that name the sizes, not out-of-bounds accesses.
#[test]
fn sgemm_rejects_short_buffers() {
    let (a, b) = (vec![1.0f32; 11], vec![1.0f32; 12]);
    let mut c = vec![0.0f32; 9];
    let e = sgemm::sgemm((3, 3, 4), (&a, 4), (&b, 3), (&mut c, 3), None, 1).unwrap_err();
    assert!(e.to_string().contains("3x4"), "{e}");
    assert!(sgemm::sgemm((3, 3, 4), (&a, 3), (&b, 3), (&mut c, 3), None, 1).is_err());
    assert!(sgemm::sgemm((3, 3, 3), (&a, 4), (&b, 3), (&mut c, 4), None, 1).is_err());
    let s = [1.0f32; 2];
    let epi = sgemm::RowEpilogue::affine(&s, &s, Activation::None);
    let e = sgemm::sgemm((3, 3, 3), (&a, 4), (&b, 3), (&mut c, 3), Some(epi), 1).unwrap_err();
    assert!(e.to_string().contains("2 scales"), "{e}");
    let s = [1.0f32; 3];
    let short = [0.0f32; 8];
    let epi = sgemm::RowEpilogue {
        residual: Some(&short),
        ..sgemm::RowEpilogue::affine(&s, &s, Activation::None)
    };
    let e = sgemm::sgemm((3, 3, 3), (&a, 4), (&b, 3), (&mut c, 3), Some(epi), 1).unwrap_err();
    assert!(e.to_string().contains("residual of 8"), "{e}");
    // k = 0: the product is zero, and the epilogue still applies.
    let mut z = vec![9.0f32; 6];
    let s = [2.0f32, 3.0];
    let t = [-1.0f32, 0.5];
    let epi = sgemm::RowEpilogue::affine(&s, &t, Activation::Relu);
    sgemm::sgemm((2, 3, 0), (&[], 0), (&[], 3), (&mut z, 3), Some(epi), 1).unwrap();
    assert_eq!(z, [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]);
}
