//! CUDA launches of the kernels in `kernels/deeplab_ops.cu` (compiled to PTX by build.rs).

use crate::batch_norm::Activation;
use crate::geometry::Conv2dGeometry;
use crate::kernel_abi::{activation, grid_blocks, resize_mode, Geom, BLOCK};
use crate::resize::ResizeMode;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/deeplab_ops.ptx"));
const MODULE: &str = "deeplab_ops";

// SAFETY: `Geom` is `repr(C)` plain old data, laid out as `struct Geom` in the kernel source.
unsafe impl DeviceRepr for Geom {}

fn slice<'a>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    if !l.is_contiguous() {
        bail!(
            "deeplab-ops cuda: input must be contiguous, got stride {:?}",
            l.stride()
        )
    }
    Ok(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..))
}

/// A grid-stride launch over `total` elements.
fn grid(total: usize) -> LaunchConfig {
    blocks(grid_blocks(total) as usize)
}

/// `n` blocks of [`BLOCK`] threads.
fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dev(s: &CudaStorage) -> CudaDevice {
    s.device().clone()
}

pub(crate) fn depthwise_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    g: &Conv2dGeometry,
    out: (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let d = dev(xs);
    let dims = xl.shape().dims4()?;
    let (_, _, kh, kw) = wl.shape().dims4()?;
    let gm = Geom::new(dims, out, (kh, kw), g);
    let total = dims.0 * dims.1 * out.0 * out.1;
    let (x, k) = (slice(xs, xl)?, slice(ws, wl)?);
    // SAFETY: every element is written by the kernel.
    let y = unsafe { d.alloc::<f32>(total)? };
    let f = d.get_or_load_custom_func("dw_fwd", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&x).arg(&k).arg(&y).arg(&gm);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(grid(total)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, d),
        Shape::from((dims.0, dims.1, out.0, out.1)),
    ))
}

pub(crate) fn depthwise_bwd_input(
    gs: &CudaStorage,
    gl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    g: &Conv2dGeometry,
    input: (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let d = dev(gs);
    let (n, c, ho, wo) = gl.shape().dims4()?;
    let (_, _, kh, kw) = wl.shape().dims4()?;
    let gm = Geom::new((n, c, input.0, input.1), (ho, wo), (kh, kw), g);
    let total = n * c * input.0 * input.1;
    let (gy, k) = (slice(gs, gl)?, slice(ws, wl)?);
    // SAFETY: every element is written by the kernel.
    let gx = unsafe { d.alloc::<f32>(total)? };
    let f = d.get_or_load_custom_func("dw_bwd_input", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&gy).arg(&k).arg(&gx).arg(&gm);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(grid(total)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(gx, d),
        Shape::from((n, c, input.0, input.1)),
    ))
}

pub(crate) fn depthwise_bwd_weight(
    gs: &CudaStorage,
    gl: &Layout,
    xs: &CudaStorage,
    xl: &Layout,
    g: &Conv2dGeometry,
    kernel: (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let d = dev(gs);
    let dims = xl.shape().dims4()?;
    let (_, _, ho, wo) = gl.shape().dims4()?;
    let gm = Geom::new(dims, (ho, wo), kernel, g);
    let count = dims.1 * kernel.0 * kernel.1;
    let (gy, x) = (slice(gs, gl)?, slice(xs, xl)?);
    // SAFETY: every element is written by the kernel (one block each).
    let gk = unsafe { d.alloc::<f32>(count)? };
    let f = d.get_or_load_custom_func("dw_bwd_weight", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&gy).arg(&x).arg(&gk).arg(&gm);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(blocks(count)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(gk, d),
        Shape::from((dims.1, 1, kernel.0, kernel.1)),
    ))
}

pub(crate) fn resize_fwd(
    s: &CudaStorage,
    l: &Layout,
    size: (usize, usize),
    mode: ResizeMode,
) -> Result<(CudaStorage, Shape)> {
    let d = dev(s);
    let (n, c, h, w) = l.shape().dims4()?;
    let total = n * c * size.0 * size.1;
    let x = slice(s, l)?;
    // SAFETY: every element is written by the kernel.
    let y = unsafe { d.alloc::<f32>(total)? };
    let f = d.get_or_load_custom_func("resize_fwd", MODULE, PTX)?;
    let (planes, h, w, ho, wo, m) = (
        (n * c) as i32,
        h as i32,
        w as i32,
        size.0 as i32,
        size.1 as i32,
        resize_mode(mode),
    );
    let mut b = f.builder();
    b.arg(&x)
        .arg(&y)
        .arg(&planes)
        .arg(&h)
        .arg(&w)
        .arg(&ho)
        .arg(&wo)
        .arg(&m);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(grid(total)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, d),
        Shape::from((n, c, size.0, size.1)),
    ))
}

pub(crate) fn resize_bwd(
    s: &CudaStorage,
    l: &Layout,
    input: (usize, usize),
    mode: ResizeMode,
) -> Result<(CudaStorage, Shape)> {
    let d = dev(s);
    let (n, c, ho, wo) = l.shape().dims4()?;
    let total = n * c * ho * wo;
    let gy = slice(s, l)?;
    let gx = d.alloc_zeros::<f32>(n * c * input.0 * input.1)?;
    let f = d.get_or_load_custom_func("resize_bwd", MODULE, PTX)?;
    let (planes, h, w, ho, wo, m) = (
        (n * c) as i32,
        input.0 as i32,
        input.1 as i32,
        ho as i32,
        wo as i32,
        resize_mode(mode),
    );
    let mut b = f.builder();
    b.arg(&gy)
        .arg(&gx)
        .arg(&planes)
        .arg(&h)
        .arg(&w)
        .arg(&ho)
        .arg(&wo)
        .arg(&m);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(grid(total)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(gx, d),
        Shape::from((n, c, input.0, input.1)),
    ))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_train_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let d = dev(xs);
    let (n, c, h, w) = xl.shape().dims4()?;
    let total = n * c * h * w + 2 * c;
    let (x, g, bb) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { d.alloc::<f32>(total)? };
    let f = d.get_or_load_custom_func("bn_train_fwd", MODULE, PTX)?;
    let (ni, ci, hw, e) = (n as i32, c as i32, (h * w) as i32, eps as f32);
    let mut b = f.builder();
    b.arg(&x)
        .arg(&g)
        .arg(&bb)
        .arg(&out)
        .arg(&ni)
        .arg(&ci)
        .arg(&hw)
        .arg(&e);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(blocks(c)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, d), Shape::from(total)))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_train_bwd(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    ps: &CudaStorage,
    pl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let d = dev(xs);
    let (n, c, h, w) = xl.shape().dims4()?;
    let total = n * c * h * w + 2 * c;
    let (x, dy, p) = (slice(xs, xl)?, slice(gs, gl)?, slice(ps, pl)?);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { d.alloc::<f32>(total)? };
    let f = d.get_or_load_custom_func("bn_train_bwd", MODULE, PTX)?;
    let (ni, ci, hw, e) = (n as i32, c as i32, (h * w) as i32, eps as f32);
    let mut b = f.builder();
    b.arg(&x)
        .arg(&dy)
        .arg(&p)
        .arg(&out)
        .arg(&ni)
        .arg(&ci)
        .arg(&hw)
        .arg(&e);
    // SAFETY: argument types match the kernel signature.
    unsafe { b.launch(blocks(c)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, d), Shape::from(total)))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn channel_affine(
    xs: &CudaStorage,
    xl: &Layout,
    ss: &CudaStorage,
    sl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    act: Activation,
) -> Result<(CudaStorage, Shape)> {
    let d = dev(xs);
    let (n, c, h, w) = xl.shape().dims4()?;
    let total = n * c * h * w;
    let (x, s, b) = (slice(xs, xl)?, slice(ss, sl)?, slice(bs, bl)?);
    // SAFETY: every element is written by the kernel.
    let y = unsafe { d.alloc::<f32>(total)? };
    let f = d.get_or_load_custom_func("channel_affine", MODULE, PTX)?;
    let a = activation(act);
    let (t, ci, hw) = (total as i64, c as i32, (h * w) as i32);
    let mut lb = f.builder();
    lb.arg(&x)
        .arg(&s)
        .arg(&b)
        .arg(&y)
        .arg(&t)
        .arg(&ci)
        .arg(&hw)
        .arg(&a);
    // SAFETY: argument types match the kernel signature.
    unsafe { lb.launch(grid(total)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, d),
        Shape::from((n, c, h, w)),
    ))
}
