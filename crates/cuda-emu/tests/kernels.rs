//! Every CUDA kernel of `deeplab-ops`, run on the CPU by the emulation, against the CPU kernels
//! of `deeplab-ops` (values) and candle's autograd through them (gradients), on the launch
//! sizes the CUDA backend uses, over geometries that reach every padding and stride branch.

use candle_core::{Device, Result, Tensor, Var};
use deeplab_cuda_emu as emu;
use deeplab_ops::kernel_abi::{activation, grid_blocks, resize_mode, Geom, BLOCK};
use deeplab_ops::reference::seeded_uniform;
use deeplab_ops::{Activation, Conv2dGeometry, Padding2d, ResizeMode};

fn vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Asserts `got` and `want` agree to `tol` of `want`'s largest magnitude (at least 1).
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: element {i}: emulated CUDA {g} vs CPU {w} (tolerance {})",
            tol * scale
        );
    }
}

/// The depthwise geometries: 3x3 SAME at rates 1, 2 and 3, DeepLab's stride 2 (fixed
/// padding), asymmetric padding, a 5x3 kernel with a stride per axis, no padding.
fn depthwise_cases() -> Vec<((usize, usize), Conv2dGeometry)> {
    let pad = |top, bottom, left, right| Padding2d {
        top,
        bottom,
        left,
        right,
    };
    vec![
        ((3, 3), Conv2dGeometry::same(3, 1)),
        ((3, 3), Conv2dGeometry::same(3, 2)),
        ((3, 3), Conv2dGeometry::same(3, 3)),
        ((3, 3), Conv2dGeometry::deeplab(3, 2, 1)),
        (
            (3, 3),
            Conv2dGeometry {
                stride: (2, 2),
                dilation: (1, 1),
                padding: pad(0, 1, 0, 1),
            },
        ),
        (
            (5, 3),
            Conv2dGeometry {
                stride: (1, 2),
                dilation: (2, 1),
                padding: pad(4, 3, 1, 0),
            },
        ),
        ((3, 3), Conv2dGeometry::default()),
    ]
}

#[test]
fn depthwise_forward_and_gradients_match_the_cpu_kernels() -> Result<()> {
    let dev = Device::Cpu;
    let (n, c, h, w) = (2, 5, 11, 13);
    for (case, (k, g)) in depthwise_cases().into_iter().enumerate() {
        let x = seeded_uniform(&[n, c, h, w], 10 + case as u64, &dev)?;
        let wt = seeded_uniform(&[c, 1, k.0, k.1], 20 + case as u64, &dev)?;
        let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&wt)?);
        let y = deeplab_ops::depthwise_conv2d(xv.as_tensor(), wv.as_tensor(), &g)?;
        let (_, _, ho, wo) = y.dims4()?;
        let gy = seeded_uniform(&[n, c, ho, wo], 30 + case as u64, &dev)?;
        let grads = (&y * &gy)?.sum_all()?.backward()?;
        let gm = Geom::new((n, c, h, w), (ho, wo), k, &g);
        let what = |op: &str| format!("{op}, case {case}: {k:?} {g:?}");

        let mut got = vec![f32::NAN; n * c * ho * wo];
        emu::dw_fwd(
            (grid_blocks(got.len()), BLOCK),
            &vec(&x)?,
            &vec(&wt)?,
            &mut got,
            gm,
        );
        close(&what("dw_fwd"), &got, &vec(&y)?, 1e-6);

        let mut gx = vec![f32::NAN; n * c * h * w];
        emu::dw_bwd_input(
            (grid_blocks(gx.len()), BLOCK),
            &vec(&gy)?,
            &vec(&wt)?,
            &mut gx,
            gm,
        );
        let want = grads.get(xv.as_tensor()).expect("x gradient");
        close(&what("dw_bwd_input"), &gx, &vec(want)?, 1e-6);

        let mut gk = vec![f32::NAN; c * k.0 * k.1];
        let launch = (gk.len() as u32, BLOCK);
        emu::dw_bwd_weight(launch, &vec(&gy)?, &vec(&x)?, &mut gk, gm);
        let want = grads.get(wv.as_tensor()).expect("weight gradient");
        close(&what("dw_bwd_weight"), &gk, &vec(want)?, 1e-5);
    }
    Ok(())
}

#[test]
fn grid_stride_loops_cover_more_elements_than_threads() -> Result<()> {
    // 2 blocks of 64 threads for 1014 outputs: every thread takes several.
    let dev = Device::Cpu;
    let (n, c, h, w) = (1, 6, 13, 13);
    let g = Conv2dGeometry::same(3, 2);
    let x = seeded_uniform(&[n, c, h, w], 1, &dev)?;
    let wt = seeded_uniform(&[c, 1, 3, 3], 2, &dev)?;
    let want = deeplab_ops::depthwise_conv2d(&x, &wt, &g)?;
    let mut got = vec![f32::NAN; n * c * h * w];
    let gm = Geom::new((n, c, h, w), (h, w), (3, 3), &g);
    emu::dw_fwd((2, 64), &vec(&x)?, &vec(&wt)?, &mut got, gm);
    close("dw_fwd on 2 x 64 threads", &got, &vec(&want)?, 1e-6);
    Ok(())
}

#[test]
fn resize_forward_and_gradient_match_the_cpu_kernels() -> Result<()> {
    let dev = Device::Cpu;
    let modes = [
        ResizeMode::AlignCorners,
        ResizeMode::HalfPixel,
        ResizeMode::Asymmetric,
    ];
    // Up (DeepLab's 4x decoder upsampling with align corners: 33 -> 129), down, to and from
    // one pixel, and a non-integer ratio per axis.
    let sizes = [
        ((9, 9), (33, 33)),
        ((17, 13), (5, 7)),
        ((1, 1), (4, 3)),
        ((6, 5), (1, 1)),
        ((7, 10), (12, 23)),
    ];
    for mode in modes {
        for (s, o) in sizes {
            let planes = 3;
            let x = seeded_uniform(&[1, planes, s.0, s.1], 3, &dev)?;
            let xv = Var::from_tensor(&x)?;
            let y = deeplab_ops::resize_bilinear(xv.as_tensor(), o, mode)?;
            let gy = seeded_uniform(&[1, planes, o.0, o.1], 4, &dev)?;
            let grads = (&y * &gy)?.sum_all()?.backward()?;
            let what = |op: &str| format!("{op} {mode:?} {s:?} -> {o:?}");
            let total = planes * o.0 * o.1;

            let mut got = vec![f32::NAN; total];
            let launch = (grid_blocks(total), BLOCK);
            emu::resize_fwd(
                launch,
                &vec(&x)?,
                &mut got,
                (planes, s, o),
                resize_mode(mode),
            );
            close(&what("resize_fwd"), &got, &vec(&y)?, 1e-6);

            let mut gx = vec![0f32; planes * s.0 * s.1];
            emu::resize_bwd(
                launch,
                &vec(&gy)?,
                &mut gx,
                (planes, s, o),
                resize_mode(mode),
            );
            let want = grads.get(xv.as_tensor()).expect("x gradient");
            close(&what("resize_bwd"), &gx, &vec(want)?, 1e-5);
        }
    }
    Ok(())
}

#[test]
fn batch_norm_training_matches_the_cpu_kernel_and_autograd() -> Result<()> {
    let dev = Device::Cpu;
    let eps = 1e-3;
    // Planes smaller and larger than a block, a batch of one and of several.
    for (n, c, h, w) in [(2, 3, 5, 7), (1, 4, 23, 19), (3, 2, 1, 2)] {
        let hw = h * w;
        let x = ((seeded_uniform(&[n, c, h, w], 5, &dev)? * 3.0)? + 0.5)?;
        let gamma = seeded_uniform(&[c], 6, &dev)?;
        let beta = seeded_uniform(&[c], 7, &dev)?;
        let (y, mean, var) = deeplab_ops::batch_norm_train(&x, &gamma, &beta, eps)?;
        let mut out = vec![f32::NAN; n * c * hw + 2 * c];
        let (gv, bv) = (vec(&gamma)?, vec(&beta)?);
        emu::bn_train_fwd(
            (c as u32, BLOCK),
            &vec(&x)?,
            (&gv, &bv),
            &mut out,
            (n, c, hw),
            eps as f32,
        );
        let what = |part: &str| format!("bn_train_fwd {part}, input {:?}", (n, c, h, w));
        let m = n * c * hw;
        close(&what("output"), &out[..m], &vec(&y)?, 1e-5);
        close(&what("mean"), &out[m..m + c], &vec(&mean)?, 1e-5);
        close(&what("variance"), &out[m + c..], &vec(&var)?, 1e-5);

        // Gradients of sum(bn(x) * dy) by autograd through the reference composition.
        let (xv, gvar, bvar) = (
            Var::from_tensor(&x)?,
            Var::from_tensor(&gamma)?,
            Var::from_tensor(&beta)?,
        );
        let (yr, ..) = deeplab_ops::reference::batch_norm_train(
            xv.as_tensor(),
            gvar.as_tensor(),
            bvar.as_tensor(),
            eps,
        )?;
        let dy = seeded_uniform(&[n, c, h, w], 8, &dev)?;
        let grads = (&yr * &dy)?.sum_all()?.backward()?;
        let p: Vec<f32> = [gv.clone(), vec(&mean)?, vec(&var)?].concat();
        let mut back = vec![f32::NAN; m + 2 * c];
        emu::bn_train_bwd(
            (c as u32, BLOCK),
            (&vec(&x)?, &vec(&dy)?),
            &p,
            &mut back,
            (n, c, hw),
            eps as f32,
        );
        let what = |part: &str| format!("bn_train_bwd {part}, input {:?}", (n, c, h, w));
        let g = |v: &Var| vec(grads.get(v.as_tensor()).expect("gradient"));
        close(&what("dx"), &back[..m], &g(&xv)?, 1e-4);
        close(&what("dgamma"), &back[m..m + c], &g(&gvar)?, 1e-4);
        close(&what("dbeta"), &back[m + c..], &g(&bvar)?, 1e-5);
    }
    Ok(())
}

#[test]
fn channel_affine_matches_the_cpu_kernel() -> Result<()> {
    let dev = Device::Cpu;
    let (n, c, h, w) = (2, 3, 9, 10);
    let x = (seeded_uniform(&[n, c, h, w], 9, &dev)? * 8.0)?;
    let s = (seeded_uniform(&[c], 10, &dev)? * 2.0)?;
    let b = seeded_uniform(&[c], 11, &dev)?;
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        let want = deeplab_ops::channel_affine(&x, &s, &b, act)?;
        let mut got = vec![f32::NAN; n * c * h * w];
        let launch = (grid_blocks(got.len()), BLOCK);
        let (sv, bv) = (vec(&s)?, vec(&b)?);
        emu::channel_affine(
            launch,
            &vec(&x)?,
            &sv,
            &bv,
            &mut got,
            (c, h * w),
            activation(act),
        );
        // The same fused multiply-add, so the same bits.
        close(&format!("channel_affine {act:?}"), &got, &vec(&want)?, 0.0);
    }
    Ok(())
}
