//! Initial weights for training: a seeded random initialization (He-normal convolutions,
//! BatchNorm scale 1 / shift 0 / running mean 0 / running variance 1, zero biases; each tensor
//! drawn from its own ChaCha stream keyed by the seed and its name, so the result does not depend
//! on any iteration order or thread timing), ImageNet backbone weights from a timm safetensors
//! file (its names are exactly ours under `backbone.`), or a full DeepLab weight file.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// FNV-1a hash of a name (a stable per-tensor stream id).
fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The seeded initial value of one tensor.
pub fn initial_value(name: &str, shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let values: Vec<f32> = if shape.len() == 4 && leaf == "weight" {
        // He (Kaiming) normal with fan-in = input channels per group x kernel area.
        let fan_in = (shape[1] * shape[2] * shape[3]).max(1) as f64;
        let std = (2.0 / fan_in).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(name_hash(name));
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller
            let u1: f64 = rng.gen::<f64>().max(1e-300);
            let u2: f64 = rng.gen::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            v.push((r * t.cos() * std) as f32);
            if v.len() < n {
                v.push((r * t.sin() * std) as f32);
            }
        }
        v
    } else if leaf == "running_var" || (leaf == "weight" && shape.len() == 1) {
        vec![1.0; n]
    } else {
        // BatchNorm shift, running mean, biases
        vec![0.0; n]
    };
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// The variables of a `VarMap`, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Result<Vec<(String, candle_core::Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("the VarMap lock is poisoned"))?;
    let mut v: Vec<(String, candle_core::Var)> =
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Sets every variable of `varmap` to its seeded initial value.
pub fn init_seeded(varmap: &VarMap, seed: u64) -> Result<()> {
    for (name, var) in sorted_vars(varmap)? {
        let t = initial_value(&name, var.dims(), seed, var.device())?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// What [`load_into`] did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Variables set from the file.
    pub loaded: usize,
    /// File tensors that no variable uses (e.g. an ImageNet classifier).
    pub unused: Vec<String>,
    /// Variables left at their initial value because the file's tensor has another shape (only
    /// the classifier, when fine-tuning to other classes).
    pub reinitialized: Vec<String>,
}

/// Loads ImageNet backbone weights from a timm safetensors file into the `backbone.*`
/// variables (or the `backbone.*` tensors of another DeepLab weight file). Every backbone
/// variable must be in the file with the same shape (the error names the first that is not);
/// the file's other tensors (the ImageNet classifier, `conv_head`, a DeepLab head) are ignored.
pub fn load_backbone(varmap: &VarMap, path: &Path) -> Result<LoadReport> {
    let tensors = crate::files::read_tensors(path, &Device::Cpu)?;
    let mut report = LoadReport::default();
    let mut used = std::collections::HashSet::new();
    // a DeepLab weight file keeps its backbone under `backbone.`; a timm file has no prefix
    let deeplab_file = tensors.keys().any(|k| k.starts_with("backbone."));
    for (name, var) in sorted_vars(varmap)? {
        let Some(stripped) = name.strip_prefix("backbone.") else {
            continue;
        };
        let key = if deeplab_file {
            name.as_str()
        } else {
            stripped
        };
        let Some(t) = tensors.get(key) else {
            bail!(
                "{}: missing tensor '{key}' (needed for '{name}', shape {:?}); the file holds a different backbone",
                path.display(),
                var.dims()
            );
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor '{key}' has shape {:?}, the backbone needs {:?} for '{name}'",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        used.insert(key.to_string());
        report.loaded += 1;
    }
    if report.loaded == 0 {
        bail!(
            "{}: the model has no backbone variables to load",
            path.display()
        );
    }
    report.unused = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    Ok(report)
}

/// Loads a full DeepLab weight file (or a training checkpoint) into `varmap`. Every variable
/// must be in the file with the same shape, except the classifier (`classifier.weight`,
/// `classifier.bias`), which keeps its initial value when the file's has another class count.
pub fn load_full(varmap: &VarMap, path: &Path) -> Result<LoadReport> {
    let tensors = crate::files::read_tensors(path, &Device::Cpu)?;
    let mut report = LoadReport::default();
    let mut used = std::collections::HashSet::new();
    for (name, var) in sorted_vars(varmap)? {
        let Some(t) = tensors.get(&name) else {
            bail!(
                "{}: missing tensor '{name}' (the model needs shape {:?}); the file holds a different architecture",
                path.display(),
                var.dims()
            );
        };
        used.insert(name.clone());
        if t.dims() != var.dims() {
            if name.starts_with("classifier.") {
                report.reinitialized.push(name);
                continue;
            }
            bail!(
                "{}: tensor '{name}' has shape {:?}, the model needs {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        report.loaded += 1;
    }
    report.unused = tensors
        .keys()
        .filter(|k| !used.contains(*k) && !k.starts_with(crate::files::MOMENTUM_PREFIX))
        .cloned()
        .collect();
    Ok(report)
}

/// Copies every variable's current value (for checkpoints and model files).
pub fn snapshot(varmap: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, var) in sorted_vars(varmap)? {
        out.insert(
            name.clone(),
            var.as_tensor()
                .to_dtype(DType::F32)
                .with_context(|| format!("variable '{name}'"))?
                .copy()?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_init_is_deterministic_and_scaled() -> Result<()> {
        let dev = Device::Cpu;
        let a = initial_value("x.conv.weight", &[64, 32, 3, 3], 7, &dev)?;
        let b = initial_value("x.conv.weight", &[64, 32, 3, 3], 7, &dev)?;
        let c = initial_value("y.conv.weight", &[64, 32, 3, 3], 7, &dev)?;
        let av = a.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(av, b.flatten_all()?.to_vec1::<f32>()?);
        assert_ne!(av, c.flatten_all()?.to_vec1::<f32>()?);
        let var = av.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / av.len() as f64;
        let want = 2.0 / (32.0 * 9.0);
        assert!((var / want - 1.0).abs() < 0.05, "{var} vs {want}");
        assert_eq!(
            initial_value("bn.running_var", &[3], 1, &dev)?.to_vec1::<f32>()?,
            vec![1.0; 3]
        );
        assert_eq!(
            initial_value("bn.weight", &[2], 1, &dev)?.to_vec1::<f32>()?,
            vec![1.0; 2]
        );
        assert_eq!(
            initial_value("classifier.bias", &[2], 1, &dev)?.to_vec1::<f32>()?,
            vec![0.0; 2]
        );
        Ok(())
    }
}
