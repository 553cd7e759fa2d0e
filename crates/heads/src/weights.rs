//! Canonical weight files: safetensors with the model configuration as JSON in the metadata
//! (key [`CONFIG_KEY`]), written atomically, read back with every tensor checked against what
//! the configured model needs.

use crate::config::DeepLabConfig;
use crate::error::{ModelError, Result};
use crate::keys::TensorKey;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// The safetensors metadata key holding the [`DeepLabConfig`] JSON.
pub const CONFIG_KEY: &str = "deeplab_config";

/// Writes `path` through a temporary file in the same directory that is renamed over `path` only
/// once `write` succeeded, so an existing file is never left half-written.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".deeplab-tmp-")
        .tempfile_in(&dir)
        .map_err(|e| ModelError::io(path, e))?;
    write(tmp.as_file_mut()).map_err(|e| ModelError::io(path, e))?;
    tmp.as_file_mut()
        .flush()
        .map_err(|e| ModelError::io(path, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| ModelError::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| ModelError::io(path, e.error))?;
    Ok(())
}

/// A tensor to be written: canonical name, shape (PyTorch layout) and row-major f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Canonical name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// Copies a candle tensor (any float dtype, any device) to f32 host memory.
    pub fn from_tensor(name: &str, t: &Tensor) -> candle_core::Result<Self> {
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            name: name.to_string(),
            shape: t.dims().to_vec(),
            data,
        })
    }
}

/// Writes a canonical weight file: f32 tensors sorted by name and `config` as JSON under
/// [`CONFIG_KEY`] (plus `format: pt`, which some safetensors tools expect). Atomic.
pub fn save_weights(
    path: impl AsRef<Path>,
    config: &DeepLabConfig,
    tensors: &[NamedTensor],
) -> Result<()> {
    let path = path.as_ref();
    let json = serde_json::to_string(config).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mut byte_store: BTreeMap<&str, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for t in tensors {
        let n: usize = t.shape.iter().product();
        if n != t.data.len() {
            return Err(ModelError::ShapeMismatch {
                path: path.to_path_buf(),
                name: t.name.clone(),
                expected: t.shape.clone(),
                found: vec![t.data.len()],
            });
        }
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        if byte_store
            .insert(&t.name, (t.shape.clone(), bytes))
            .is_some()
        {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                detail: format!("tensor '{}' given twice", t.name),
            });
        }
    }
    let mut views = Vec::with_capacity(byte_store.len());
    for (name, (shape, bytes)) in &byte_store {
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
            .map_err(|e| ModelError::Safetensors {
                path: path.to_path_buf(),
                detail: format!("tensor '{name}': {e}"),
            })?;
        views.push((*name, v));
    }
    let meta = HashMap::from([
        (CONFIG_KEY.to_string(), json),
        ("format".to_string(), "pt".to_string()),
    ]);
    let bytes =
        safetensors::tensor::serialize(views, Some(meta)).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    write_atomically(path, |f| f.write_all(&bytes))
}

/// Saves candle tensors (e.g. a `VarMap`'s) with `config`; see [`save_weights`].
pub fn save_tensors<'a>(
    path: impl AsRef<Path>,
    config: &DeepLabConfig,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<()> {
    let path = path.as_ref();
    let named = tensors
        .into_iter()
        .map(|(n, t)| NamedTensor::from_tensor(n, t).map_err(|e| ModelError::candle(path, e)))
        .collect::<Result<Vec<_>>>()?;
    save_weights(path, config, &named)
}

/// Saves every variable of a `VarMap` (e.g. after training a model built with
/// `VarBuilder::from_varmap`; BatchNorm running statistics included) with `config`.
pub fn save_varmap(
    path: impl AsRef<Path>,
    config: &DeepLabConfig,
    varmap: &candle_nn::VarMap,
) -> Result<()> {
    let path = path.as_ref();
    let data = varmap.data().lock().map_err(|_| ModelError::Config {
        path: path.to_path_buf(),
        detail: "the VarMap lock is poisoned".into(),
    })?;
    let named = data
        .iter()
        .map(|(n, v)| {
            NamedTensor::from_tensor(n, v.as_tensor()).map_err(|e| ModelError::candle(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    drop(data);
    save_weights(path, config, &named)
}

fn parse_header(bytes: &[u8], path: &Path) -> Result<safetensors::tensor::Metadata> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    Ok(meta)
}

fn config_from_meta(meta: &safetensors::tensor::Metadata, path: &Path) -> Result<DeepLabConfig> {
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| ModelError::MissingConfig {
            path: path.to_path_buf(),
            key: CONFIG_KEY,
        })?;
    let cfg: DeepLabConfig = serde_json::from_str(json).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        detail: format!("metadata '{CONFIG_KEY}': {e}"),
    })?;
    cfg.validate().map_err(|detail| ModelError::Config {
        path: path.to_path_buf(),
        detail,
    })?;
    Ok(cfg)
}

/// Reads only the model configuration of a weight file (the header, not the tensors).
pub fn read_config(path: impl AsRef<Path>) -> Result<DeepLabConfig> {
    use std::io::Read;
    let path = path.as_ref();
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: format!("cannot read the header length: {e}"),
        })?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: format!("header length {n} is absurd"),
        });
    }
    let mut buf = vec![0u8; 8 + n as usize];
    buf[..8].copy_from_slice(&len);
    f.read_exact(&mut buf[8..])
        .map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: format!("truncated header: {e}"),
        })?;
    // `read_metadata` checks the header against the buffer length; parse the JSON directly.
    let header: serde_json::Value =
        serde_json::from_slice(&buf[8..]).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: format!("bad header: {e}"),
        })?;
    let json = header
        .get("__metadata__")
        .and_then(|m| m.get(CONFIG_KEY))
        .and_then(|v| v.as_str())
        .ok_or_else(|| ModelError::MissingConfig {
            path: path.to_path_buf(),
            key: CONFIG_KEY,
        })?;
    let cfg: DeepLabConfig = serde_json::from_str(json).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        detail: format!("metadata '{CONFIG_KEY}': {e}"),
    })?;
    cfg.validate().map_err(|detail| ModelError::Config {
        path: path.to_path_buf(),
        detail,
    })?;
    Ok(cfg)
}

/// The content of a weight file.
#[derive(Debug)]
pub struct WeightFile {
    /// The model configuration from the metadata.
    pub config: DeepLabConfig,
    /// Every tensor, converted to f32 on the requested device.
    pub tensors: HashMap<String, Tensor>,
}

/// Reads a whole weight file (config and tensors, as f32 on `device`). The tensors are not yet
/// checked against the model; see [`check_keys`].
pub fn read_weights(path: impl AsRef<Path>, device: &Device) -> Result<WeightFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let meta = parse_header(&bytes, path)?;
    let config = config_from_meta(&meta, path)?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let mut tensors = HashMap::new();
    for (name, view) in st.iter() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            d => {
                return Err(ModelError::Dtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: format!("{d:?}"),
                })
            }
        };
        let t = Tensor::from_vec(values, view.shape(), device)
            .map_err(|e| ModelError::candle(path, e))?;
        tensors.insert(name.to_string(), t);
    }
    Ok(WeightFile { config, tensors })
}

/// Checks `tensors` (name → shape) against the `required` keys of a model: the first required
/// tensor (in model order) that is missing or mis-shaped is an error naming it and `path`; then
/// any tensor the model does not use (in name order) is an error.
pub fn check_keys<'a>(
    path: &Path,
    required: &[TensorKey],
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    let have: BTreeMap<&str, &[usize]> = tensors.into_iter().collect();
    for k in required {
        match have.get(k.name.as_str()) {
            None => {
                return Err(ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: k.name.clone(),
                    expected: k.shape.clone(),
                })
            }
            Some(s) if *s != k.shape.as_slice() => {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: k.name.clone(),
                    expected: k.shape.clone(),
                    found: s.to_vec(),
                })
            }
            Some(_) => {}
        }
    }
    let wanted: std::collections::HashSet<&str> =
        required.iter().map(|k| k.name.as_str()).collect();
    if let Some(extra) = have.keys().find(|n| !wanted.contains(*n)) {
        return Err(ModelError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: extra.to_string(),
        });
    }
    Ok(())
}
