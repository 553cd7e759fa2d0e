//! The CUDA kernels of `deeplab-ops` (`crates/ops/kernels/deeplab_ops.cu`) run on the CPU: the
//! same source, compiled as C++ against a small emulation of the CUDA runtime (`emu/`), where a
//! launch runs its blocks in turn and each block's threads are OS threads, so block barriers,
//! warp shuffles and atomics keep their CUDA meaning. Its tests compare every kernel with the
//! CPU kernels of `deeplab-ops`, launched with the sizes the CUDA backend uses
//! ([`deeplab_ops::kernel_abi`]): the kernels' indexing, bounds, reductions and arithmetic are
//! tested on machines without a GPU. What it cannot test: the PTX compilation, the device's
//! rounding of `rsqrtf` and the order of its atomic adds, and the launch glue in
//! `deeplab-ops`'s `cuda.rs`.
//!
//! Each function launches one kernel on `grid` blocks of `block` threads (`block` a multiple
//! of 32) and checks that the slices hold what the kernel reads and writes for its sizes.
//!
//! ```
//! use deeplab_cuda_emu::channel_affine;
//! use deeplab_ops::kernel_abi::{grid_blocks, BLOCK};
//! let x = [1.0f32, -2.0, 3.0, -4.0]; // 1 x 2 x 1 x 2
//! let mut y = [0.0f32; 4];
//! channel_affine((grid_blocks(4), BLOCK), &x, &[2.0, 1.0], &[0.0, 1.0], &mut y, (2, 2), 1);
//! assert_eq!(y, [2.0, 0.0, 4.0, 0.0]);
//! ```
#![deny(missing_docs)]

use deeplab_ops::kernel_abi::Geom;

mod ffi {
    use deeplab_ops::kernel_abi::Geom;
    extern "C" {
        pub fn emu_dw_fwd(
            grid: u32,
            block: u32,
            x: *const f32,
            k: *const f32,
            y: *mut f32,
            g: Geom,
        );
        pub fn emu_dw_bwd_input(
            grid: u32,
            block: u32,
            gy: *const f32,
            k: *const f32,
            gx: *mut f32,
            g: Geom,
        );
        pub fn emu_dw_bwd_weight(
            grid: u32,
            block: u32,
            gy: *const f32,
            x: *const f32,
            gk: *mut f32,
            g: Geom,
        );
        pub fn emu_resize_fwd(
            grid: u32,
            block: u32,
            x: *const f32,
            y: *mut f32,
            planes: i32,
            h: i32,
            w: i32,
            ho: i32,
            wo: i32,
            mode: i32,
        );
        pub fn emu_resize_bwd(
            grid: u32,
            block: u32,
            gy: *const f32,
            gx: *mut f32,
            planes: i32,
            h: i32,
            w: i32,
            ho: i32,
            wo: i32,
            mode: i32,
        );
        pub fn emu_bn_train_fwd(
            grid: u32,
            block: u32,
            x: *const f32,
            gamma: *const f32,
            beta: *const f32,
            out: *mut f32,
            n: i32,
            c: i32,
            hw: i32,
            eps: f32,
        );
        pub fn emu_bn_train_bwd(
            grid: u32,
            block: u32,
            x: *const f32,
            dy: *const f32,
            p: *const f32,
            out: *mut f32,
            n: i32,
            c: i32,
            hw: i32,
            eps: f32,
        );
        pub fn emu_channel_affine(
            grid: u32,
            block: u32,
            x: *const f32,
            s: *const f32,
            b: *const f32,
            y: *mut f32,
            total: i64,
            c: i32,
            hw: i32,
            act: i32,
        );
    }
}

/// `(grid, block)`: blocks and threads per block of a launch.
pub type Launch = (u32, u32);

/// Panics unless `block` is a positive multiple of the warp and `grid` positive.
fn check_launch((grid, block): Launch) {
    assert!(
        grid > 0 && block > 0 && block % 32 == 0,
        "launch of {grid} blocks of {block} threads"
    );
}

/// Panics unless `s` holds `want` values.
fn check_len(what: &str, s: usize, want: usize) {
    assert_eq!(
        s, want,
        "{what}: {s} values, the kernel's sizes need {want}"
    );
}

/// Checks the launch; the element counts of a depthwise convolution's input, kernel and output
/// for `g`.
fn depthwise_lens(launch: Launch, g: &Geom) -> (usize, usize, usize) {
    check_launch(launch);
    let u = |v: i32| usize::try_from(v).expect("negative size in Geom");
    let planes = u(g.n) * u(g.c);
    (
        planes * u(g.h) * u(g.w),
        u(g.c) * u(g.kh) * u(g.kw),
        planes * u(g.ho) * u(g.wo),
    )
}

/// Checks the launch and the slices of a resize (`input` values in, `output` values out) for
/// `(planes, size, out)`; the kernel's `int` arguments `planes, h, w, ho, wo`.
fn resize_args(
    launch: Launch,
    (input, output): (usize, usize),
    (planes, size, out): (usize, (usize, usize), (usize, usize)),
) -> [i32; 5] {
    check_launch(launch);
    check_len("input", input, planes * size.0 * size.1);
    check_len("output", output, planes * out.0 * out.1);
    [planes, size.0, size.1, out.0, out.1].map(|v| i32::try_from(v).expect("size over i32"))
}

/// Checks a one-block-per-channel BatchNorm launch over `(n, c, hw)` whose per-element inputs
/// and output hold `inputs` and `output` values; the kernel's `n, c, hw`.
fn bn_args(
    launch: Launch,
    inputs: &[usize],
    output: usize,
    (n, c, hw): (usize, usize, usize),
) -> [i32; 3] {
    check_launch(launch);
    for &len in inputs {
        check_len("input", len, n * c * hw);
    }
    check_len("output", output, n * c * hw + 2 * c);
    assert_eq!(
        launch.0 as usize, c,
        "BatchNorm kernels: one block per channel"
    );
    [n, c, hw].map(|v| i32::try_from(v).expect("size over i32"))
}

/// `dw_fwd`: depthwise convolution `y = x ⊛ k` (`x` `[n, c, h, w]`, `k` `[c, kh, kw]`, `y`
/// `[n, c, ho, wo]`).
pub fn dw_fwd(launch: Launch, x: &[f32], k: &[f32], y: &mut [f32], g: Geom) {
    let (xl, kl, yl) = depthwise_lens(launch, &g);
    check_len("x", x.len(), xl);
    check_len("k", k.len(), kl);
    check_len("y", y.len(), yl);
    // SAFETY: the slices hold every element the kernel addresses for `g` (checked above).
    unsafe {
        ffi::emu_dw_fwd(
            launch.0,
            launch.1,
            x.as_ptr(),
            k.as_ptr(),
            y.as_mut_ptr(),
            g,
        )
    }
}

/// `dw_bwd_input`: the input gradient `gx` (`[n, c, h, w]`) of [`dw_fwd`] from `gy`.
pub fn dw_bwd_input(launch: Launch, gy: &[f32], k: &[f32], gx: &mut [f32], g: Geom) {
    let (xl, kl, yl) = depthwise_lens(launch, &g);
    check_len("gy", gy.len(), yl);
    check_len("k", k.len(), kl);
    check_len("gx", gx.len(), xl);
    // SAFETY: as in `dw_fwd`.
    unsafe {
        ffi::emu_dw_bwd_input(
            launch.0,
            launch.1,
            gy.as_ptr(),
            k.as_ptr(),
            gx.as_mut_ptr(),
            g,
        )
    }
}

/// `dw_bwd_weight`: the weight gradient `gk` (`[c, kh, kw]`) of [`dw_fwd`], one block per
/// (channel, tap): `launch.0` must be `c * kh * kw`.
pub fn dw_bwd_weight(launch: Launch, gy: &[f32], x: &[f32], gk: &mut [f32], g: Geom) {
    let (xl, kl, yl) = depthwise_lens(launch, &g);
    check_len("gy", gy.len(), yl);
    check_len("x", x.len(), xl);
    check_len("gk", gk.len(), kl);
    assert_eq!(
        launch.0 as usize, kl,
        "dw_bwd_weight: one block per channel and tap"
    );
    // SAFETY: as in `dw_fwd`; block `b` writes `gk[b]`, `b < c * taps`.
    unsafe {
        ffi::emu_dw_bwd_weight(
            launch.0,
            launch.1,
            gy.as_ptr(),
            x.as_ptr(),
            gk.as_mut_ptr(),
            g,
        )
    }
}

/// `resize_fwd`: bilinear resize of `planes` planes `size.0 x size.1` into `out.0 x out.1`
/// (`mode` from [`deeplab_ops::kernel_abi::resize_mode`]).
pub fn resize_fwd(
    launch: Launch,
    x: &[f32],
    y: &mut [f32],
    dims: (usize, (usize, usize), (usize, usize)),
    mode: i32,
) {
    let [planes, h, w, ho, wo] = resize_args(launch, (x.len(), y.len()), dims);
    let (x, y) = (x.as_ptr(), y.as_mut_ptr());
    // SAFETY: the slices hold every element addressed for these sizes (checked above).
    unsafe { ffi::emu_resize_fwd(launch.0, launch.1, x, y, planes, h, w, ho, wo, mode) }
}

/// `resize_bwd`: the gradient `gx` (`planes x size`, added to: start from zeros) of
/// [`resize_fwd`] from `gy` (`planes x out`).
pub fn resize_bwd(
    launch: Launch,
    gy: &[f32],
    gx: &mut [f32],
    dims: (usize, (usize, usize), (usize, usize)),
    mode: i32,
) {
    let [planes, h, w, ho, wo] = resize_args(launch, (gx.len(), gy.len()), dims);
    let (gy, gx) = (gy.as_ptr(), gx.as_mut_ptr());
    // SAFETY: as in `resize_fwd`.
    unsafe { ffi::emu_resize_bwd(launch.0, launch.1, gy, gx, planes, h, w, ho, wo, mode) }
}

/// `bn_train_fwd`: training BatchNorm of `x` (`[n, c, hw]`), one block per channel: `out` is
/// the normalized `x`, then the batch means (`c`), then the biased batch variances (`c`).
pub fn bn_train_fwd(
    launch: Launch,
    x: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    out: &mut [f32],
    dims: (usize, usize, usize),
    eps: f32,
) {
    let [n, c, hw] = bn_args(launch, &[x.len()], out.len(), dims);
    check_len("gamma", gamma.len(), dims.1);
    check_len("beta", beta.len(), dims.1);
    let (x, g, b, out) = (x.as_ptr(), gamma.as_ptr(), beta.as_ptr(), out.as_mut_ptr());
    // SAFETY: the slices hold every element addressed for these sizes (checked above).
    unsafe { ffi::emu_bn_train_fwd(launch.0, launch.1, x, g, b, out, n, c, hw, eps) }
}

/// `bn_train_bwd`: the gradients of [`bn_train_fwd`] from `dy`, given `p` = gamma, batch mean,
/// batch variance (`3c`): `out` is `dx`, then `dgamma` (`c`), then `dbeta` (`c`).
pub fn bn_train_bwd(
    launch: Launch,
    (x, dy): (&[f32], &[f32]),
    p: &[f32],
    out: &mut [f32],
    dims: (usize, usize, usize),
    eps: f32,
) {
    let [n, c, hw] = bn_args(launch, &[x.len(), dy.len()], out.len(), dims);
    check_len("p", p.len(), 3 * dims.1);
    let (x, dy, p, out) = (x.as_ptr(), dy.as_ptr(), p.as_ptr(), out.as_mut_ptr());
    // SAFETY: as in `bn_train_fwd`.
    unsafe { ffi::emu_bn_train_bwd(launch.0, launch.1, x, dy, p, out, n, c, hw, eps) }
}

/// `channel_affine`: `y = act(x * s[ch] + b[ch])` over `x` with `channels_hw = (c, hw)`
/// (`act` from [`deeplab_ops::kernel_abi::activation`]).
pub fn channel_affine(
    launch: Launch,
    x: &[f32],
    s: &[f32],
    b: &[f32],
    y: &mut [f32],
    (c, hw): (usize, usize),
    act: i32,
) {
    check_launch(launch);
    assert!(
        c * hw > 0 && x.len() % (c * hw) == 0,
        "x: {} values for {c} x {hw}",
        x.len()
    );
    check_len("s", s.len(), c);
    check_len("b", b.len(), c);
    check_len("y", y.len(), x.len());
    let i = |v: usize| i32::try_from(v).expect("size over i32");
    // SAFETY: the slices hold every element addressed for these sizes (checked above).
    unsafe {
        ffi::emu_channel_affine(
            launch.0,
            launch.1,
            x.as_ptr(),
            s.as_ptr(),
            b.as_ptr(),
            y.as_mut_ptr(),
            x.len() as i64,
            i(c),
            i(hw),
            act,
        )
    }
}
