//! Helpers shared by the CPU kernels: contiguous f32 views of storages and thread fan-out.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};

/// The contiguous f32 slice a layout describes, or an error naming the op and the layout.
pub(crate) fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => bail!("{op}: expected f32 storage, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!(
            "{op}: input must be contiguous, got shape {:?} stride {:?}",
            l.dims(),
            l.stride()
        ),
    }
}

/// Number of worker threads the kernels split work across.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f` with the best SIMD instruction set this CPU supports compiled in: the body is
/// generic Rust that LLVM auto-vectorizes, instantiated once per target feature set and picked
/// at run time (the binary itself targets baseline x86-64).
macro_rules! multiversion {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn v512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v256<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if $crate::cpu::has_avx512() {
                // SAFETY: the CPU reports AVX-512F, AVX2 and FMA.
                unsafe { v512($body) }
            } else if $crate::cpu::has_avx2() {
                // SAFETY: the CPU reports AVX2 and FMA.
                unsafe { v256($body) }
            } else {
                ($body)()
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            ($body)()
        }
    }};
}

/// AVX-512F + AVX2 + FMA are available (and not disabled by `DEEPLAB_NO_AVX512`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var_os("DEEPLAB_NO_AVX512").is_none()
            && is_x86_feature_detected!("avx512f")
            && has_avx2()
    })
}

/// AVX2 + FMA are available.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Whether this crate has a kernel for `device` (CPU always; CUDA with the `cuda` feature).
/// Other devices (Metal) run the reference composition of candle ops.
pub(crate) fn has_kernel(device: &candle_core::Device) -> bool {
    match device {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => true,
        _ => false,
    }
}

/// Runs `f(b, threads)` for every image `b` of an `n`-image batch of independent one-image
/// products, `threads` being the workers `f`'s product may use. With `t > 1` workers and at
/// least `t` images, the first `n / t * t` images run one per worker at a time (each product
/// single-threaded, dealt out image by image so a worker slowed by a neighbour on the machine
/// takes fewer), the rest one after another on all `t` workers. A single-threaded product packs
/// each block of its `B` operand once, where a product split into `r` row jobs packs it `r`
/// times, and needs no synchronization between its tiles.
pub(crate) fn per_image(n: usize, f: impl Fn(usize, usize) + Sync) {
    use rayon::prelude::*;
    let t = threads();
    let whole = if t > 1 { n / t * t } else { 0 };
    (0..whole)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|b| f(b, 1));
    for b in whole..n {
        f(b, t);
    }
}

/// The contiguous image ranges of a batch sum's partial results: `t` ranges (as even as whole
/// images allow) when there are `t > 1` workers and at least `t` images, else one range of all
/// `n`. Each range's sum is one worker's single-threaded work (see [`per_image`]).
pub(crate) fn image_groups(n: usize) -> Vec<std::ops::Range<usize>> {
    let t = threads();
    let groups = if t > 1 && n >= t { t } else { 1 };
    (0..groups)
        .map(|g| g * n / groups..(g + 1) * n / groups)
        .collect()
}

/// A pointer (or any `Copy` value holding one) handed to rayon tasks that touch disjoint parts
/// of what it addresses; each use documents why the parts are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct Ptr<T>(pub T);
// SAFETY: only used for the disjoint parts of parallel tasks and for shared reads.
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Ptr<T> {}

impl<T: Copy> Ptr<T> {
    /// The wrapped value (a whole-struct use, so closures capture the `Send` wrapper).
    pub fn get(&self) -> T {
        self.0
    }
}

/// A per-thread work buffer reused from call to call (`thread_local!` of a `Cell<Vec<f32>>`):
/// [`take_buf`] lends it out, [`put_buf`] returns it. Reusing it skips the zero fill a fresh
/// `vec![0.0; len]` pays on memory the allocator hands back (with purging off it is never
/// fresh from the OS): ~2% of ResNet-101's pass went to zeroing Winograd buffers.
pub(crate) type BufKey = std::thread::LocalKey<std::cell::Cell<Vec<f32>>>;

/// The buffer of `key`, at least `len` values long. Its values are whatever the last user
/// left (zeros only when it had to grow): the caller must write every value it reads.
pub(crate) fn take_buf(key: &'static BufKey, len: usize) -> Vec<f32> {
    let v = key.take();
    if v.len() >= len {
        v
    } else {
        vec![0f32; len]
    }
}

/// Gives a buffer from [`take_buf`] back for the next call on this thread.
pub(crate) fn put_buf(key: &'static BufKey, v: Vec<f32>) {
    key.set(v);
}
