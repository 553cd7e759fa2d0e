//! Helpers shared by the integration tests: paths into ../shared, tensor comparison, `.npy`
//! to candle.

use candle_core::{DType, Device, Result, Tensor};
use std::path::{Path, PathBuf};

/// `../shared/reference/<rel>` from the workspace, or `None` (after printing one line saying
/// what `what` skips) when it is absent.
pub fn shared(rel: &str, what: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipping {what}: {} is absent (the shared reference folder is not here)",
            p.display()
        );
        None
    }
}

/// Max |a - b| divided by max |b| (floored at 1e-6): the error relative to the reference's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
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
        .max(1e-6);
    Ok(diff / scale)
}

/// An NHWC `.npy` as an NCHW tensor.
pub fn npy_nchw(path: &Path) -> Tensor {
    let a = deeplab_heads::npy::read_npy(path).expect("read npy");
    let t = Tensor::from_vec(a.to_f32(), a.shape.as_slice(), &Device::Cpu).expect("tensor");
    t.permute((0, 3, 1, 2))
        .and_then(|t| t.contiguous())
        .expect("nchw")
}
