//! The C ABI of the CUDA kernels in `kernels/deeplab_ops.cu`: the geometry struct they take,
//! the integer codes of the resize mode and activation, and the launch sizes. Shared by the
//! CUDA launches (`cuda.rs`, `cuda` feature) and by `deeplab-cuda-emu`, which runs the same
//! kernel source on the CPU to test it without a GPU, so both launch the kernels alike.

use crate::batch_norm::Activation;
use crate::geometry::Conv2dGeometry;
use crate::resize::ResizeMode;

/// Threads per block of every launch.
pub const BLOCK: u32 = 256;

/// The most blocks of a grid-stride launch (the kernels loop over what is left).
pub const MAX_GRID: u32 = 65_535;

/// A convolution's sizes and geometry as the kernels' `struct Geom` (14 `int`s, this order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    /// Batch.
    pub n: i32,
    /// Channels.
    pub c: i32,
    /// Input height.
    pub h: i32,
    /// Input width.
    pub w: i32,
    /// Output height.
    pub ho: i32,
    /// Output width.
    pub wo: i32,
    /// Kernel height.
    pub kh: i32,
    /// Kernel width.
    pub kw: i32,
    /// Vertical stride.
    pub sy: i32,
    /// Horizontal stride.
    pub sx: i32,
    /// Vertical dilation.
    pub dy: i32,
    /// Horizontal dilation.
    pub dx: i32,
    /// Top padding.
    pub pt: i32,
    /// Left padding.
    pub pl: i32,
}

impl Geom {
    /// The geometry of an `(n, c, h, w)` input, `(ho, wo)` output and `(kh, kw)` kernel.
    pub fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (ho, wo): (usize, usize),
        (kh, kw): (usize, usize),
        g: &Conv2dGeometry,
    ) -> Self {
        let i = |v: usize| v as i32;
        Self {
            n: i(n),
            c: i(c),
            h: i(h),
            w: i(w),
            ho: i(ho),
            wo: i(wo),
            kh: i(kh),
            kw: i(kw),
            sy: i(g.stride.0),
            sx: i(g.stride.1),
            dy: i(g.dilation.0),
            dx: i(g.dilation.1),
            pt: i(g.padding.top),
            pl: i(g.padding.left),
        }
    }
}

/// Blocks of a grid-stride launch over `total` elements: one thread each, at most
/// [`MAX_GRID`] blocks of [`BLOCK`].
pub fn grid_blocks(total: usize) -> u32 {
    total.div_ceil(BLOCK as usize).clamp(1, MAX_GRID as usize) as u32
}

/// The kernels' `mode` of a resize: 0 align corners, 1 half pixel, 2 asymmetric.
pub fn resize_mode(m: ResizeMode) -> i32 {
    match m {
        ResizeMode::AlignCorners => 0,
        ResizeMode::HalfPixel => 1,
        ResizeMode::Asymmetric => 2,
    }
}

/// The kernels' `act`: 0 none, 1 ReLU, 2 ReLU6.
pub fn activation(a: Activation) -> i32 {
    match a {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::Relu6 => 2,
    }
}
