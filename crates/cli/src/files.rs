//! Weight files as the CLI handles them: canonical safetensors (deeplab-heads' key scheme, the
//! model configuration under `deeplab_config`) with optional extra metadata written by
//! `deeplab train` (class names and colors, the evaluation crop, a training summary), saved in
//! f32 or f16 through a temporary file and a rename; training checkpoints (the same plus
//! optimizer state) loadable as models; `--weights NAME` resolved through the weights table and
//! the local cache (never the network); and the bundled sample model and dataset.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use deeplab_backbones::OutputStride;
use deeplab_data::{ClassTable, Palette};
use deeplab_heads::{weights::CONFIG_KEY, DeepLabConfig, DeepLabModel};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Metadata key: the classes (the `classes.txt` format of deeplab-data) the model predicts.
pub const CLASSES_KEY: &str = "deeplab_classes";
/// Metadata key: the evaluation crop `HxW` the model was trained for (the pad size of
/// `--preprocess pad`).
pub const EVAL_CROP_KEY: &str = "deeplab_eval_crop";
/// Metadata key: a JSON summary of the training run that produced the file.
pub const TRAIN_KEY: &str = "deeplab_train";
/// Metadata key of a training checkpoint: the trainer state (JSON).
pub const STATE_KEY: &str = "deeplab_train_state";
/// Tensor-name prefix of the optimizer's momentum buffers inside a checkpoint.
pub const MOMENTUM_PREFIX: &str = "optimizer.momentum.";
/// Environment variable (tests only): milliseconds to pause halfway through writing a file
/// with [`write_file_atomically`], to simulate a process killed mid-write.
pub const WRITE_DELAY_ENV: &str = "DEEPLAB_TEST_WRITE_DELAY_MS";

/// Element type of saved model tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDType {
    /// 32-bit floats (exact).
    F32,
    /// 16-bit floats (half the size; what the bundled sample model uses).
    F16,
}

impl std::str::FromStr for SaveDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            _ => Err(format!("unknown dtype '{s}': use f32 or f16")),
        }
    }
}

/// Reads the `__metadata__` of a safetensors file (the header only).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file (too short)", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        bail!(
            "{}: not a safetensors file (header length {n})",
            path.display()
        );
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let header: serde_json::Value = serde_json::from_slice(&buf)
        .with_context(|| format!("{}: not a safetensors file (bad header)", path.display()))?;
    let mut out = BTreeMap::new();
    if let Some(m) = header.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// `path` is either its old content or the complete new one, even if the process is killed.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let delay = std::env::var(WRITE_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    deeplab_heads::weights::write_atomically(path, |f| {
        // temporary files are created private (0600); the result is an ordinary file
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        }
        match delay {
            Some(ms) => {
                let half = bytes.len() / 2;
                f.write_all(&bytes[..half])?;
                f.flush()?;
                eprintln!(
                    "test hook: pausing {ms} ms halfway through writing {}",
                    path.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(ms));
                f.write_all(&bytes[half..])
            }
            None => f.write_all(bytes),
        }
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// Serializes tensors (sorted by name) with metadata to safetensors bytes.
pub fn serialize_tensors(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    dtype: SaveDType,
) -> Result<Vec<u8>> {
    let mut store: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
    for (name, t) in tensors {
        let v = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
            .with_context(|| format!("reading tensor '{name}'"))?;
        let (bytes, dt): (Vec<u8>, _) = match dtype {
            SaveDType::F32 => (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F32,
            ),
            SaveDType::F16 => (
                v.iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                safetensors::Dtype::F16,
            ),
        };
        store.push((name.clone(), t.dims().to_vec(), bytes, dt));
    }
    let mut views = Vec::with_capacity(store.len());
    for (name, shape, bytes, dt) in &store {
        let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
            .map_err(|e| anyhow::anyhow!("tensor '{name}': {e}"))?;
        views.push((name.as_str(), view));
    }
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| anyhow::anyhow!("serializing: {e}"))
}

/// Saves a canonical model file: `tensors` under their canonical names, the configuration
/// under `deeplab_config` and `extra` metadata, atomically.
pub fn save_model(
    path: &Path,
    config: &DeepLabConfig,
    tensors: &BTreeMap<String, Tensor>,
    extra: &BTreeMap<String, String>,
    dtype: SaveDType,
) -> Result<()> {
    let mut meta = extra.clone();
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(config)?);
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = serialize_tensors(tensors, &meta, dtype)?;
    write_file_atomically(path, &bytes)
}

/// Reads every tensor of a safetensors file as f32 on `device`.
pub fn read_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let wf = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (k, v) in wf {
        let v = v.to_dtype(DType::F32).with_context(|| {
            format!(
                "{}: tensor '{k}' has a dtype that is not a float",
                path.display()
            )
        })?;
        out.insert(k, v);
    }
    Ok(out)
}

/// A model loaded from a file, with its metadata.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model, built for evaluation.
    pub model: DeepLabModel,
    /// The file.
    pub path: PathBuf,
    /// The file's metadata.
    pub metadata: BTreeMap<String, String>,
}

impl LoadedModel {
    /// The classes recorded in the file (written by `deeplab train`), if any.
    pub fn classes(&self) -> Result<Option<ClassTable>> {
        match self.metadata.get(CLASSES_KEY) {
            Some(text) => Ok(Some(ClassTable::parse(text, &self.path).with_context(
                || format!("{}: metadata '{CLASSES_KEY}'", self.path.display()),
            )?)),
            None => Ok(None),
        }
    }

    /// The classes to name and color predictions with: the file's own, otherwise the 19
    /// Cityscapes classes for a 19-class model, the VOC classes for 21, and numbered classes with
    /// the VOC palette for anything else.
    pub fn class_table(&self) -> Result<ClassTable> {
        if let Some(c) = self.classes()? {
            return Ok(c);
        }
        let n = self.model.config().num_classes;
        Ok(match n {
            19 => ClassTable::cityscapes(),
            21 => ClassTable::voc(),
            _ => {
                let pal = Palette::voc();
                let classes = (0..n)
                    .map(|i| {
                        deeplab_data::ClassInfo::new(
                            format!("class{i}"),
                            pal.color(i.min(255) as u8),
                        )
                    })
                    .collect();
                ClassTable::new(classes, Vec::new())?
            }
        })
    }

    /// The evaluation crop recorded in the file, if any.
    pub fn eval_crop(&self) -> Option<(usize, usize)> {
        let s = self.metadata.get(EVAL_CROP_KEY)?;
        let (h, w) = s.split_once('x')?;
        Some((h.parse().ok()?, w.parse().ok()?))
    }
}

/// Loads a model file for evaluation: a canonical weight file, a file written by
/// `deeplab train`, or a training checkpoint (its optimizer state is ignored). The output stride
/// is `output_stride` when given, otherwise the file's evaluation output stride.
pub fn load_model(
    path: &Path,
    device: &Device,
    output_stride: Option<OutputStride>,
) -> Result<LoadedModel> {
    load_model_as(path, device, output_stride, candle_core::DType::F32)
}

/// [`load_model`] with the network held and run in `dtype` (F32, F16 or BF16).
pub fn load_model_as(
    path: &Path,
    device: &Device,
    output_stride: Option<OutputStride>,
    dtype: candle_core::DType,
) -> Result<LoadedModel> {
    if !path.exists() {
        bail!("{}: weight file not found", path.display());
    }
    if path.is_dir() {
        bail!("{}: is a directory, not a weight file", path.display());
    }
    let metadata = read_metadata(path)?;
    let adjust = |c: &DeepLabConfig| -> std::result::Result<DeepLabConfig, String> {
        match output_stride {
            Some(os) => {
                let mut c = c.with_output_stride(os)?;
                c.eval_output_stride = None;
                Ok(c)
            }
            None => c.for_eval(),
        }
    };
    let wf = deeplab_heads::weights::read_weights(path, device)?;
    let cfg = adjust(&wf.config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // a training checkpoint also holds the optimizer's momentum buffers
    let checkpoint = metadata.contains_key(STATE_KEY);
    let tensors = wf
        .tensors
        .into_iter()
        .filter(|(k, _)| !(checkpoint && k.starts_with(MOMENTUM_PREFIX)))
        .collect();
    let model = DeepLabModel::from_tensors_as(path, &cfg, tensors, device, dtype)?;
    Ok(LoadedModel {
        model,
        path: path.to_path_buf(),
        metadata,
    })
}

/// Resolves `--weights`: an existing path, or a name of the weights table whose file has been
/// fetched into the local cache (`cargo xtask fetch-weights NAME`). Never touches the network.
pub fn resolve_weights(arg: &str) -> Result<PathBuf> {
    let p = PathBuf::from(arg);
    let looks_like_path =
        arg.contains('/') || arg.contains('\\') || arg.ends_with(".safetensors") || p.exists();
    if looks_like_path {
        return Ok(p);
    }
    let spec = deeplab_weights::find(arg)
        .map_err(|e| anyhow::anyhow!("--weights {arg}: no such file, and {e}"))?;
    let layout = deeplab_weights::cache::CacheLayout::from_env(None)
        .context("cannot determine the cache directory (no home directory); pass a file path")?;
    match layout.locate(spec) {
        Some(p) => Ok(p),
        None => bail!(
            "--weights {arg}: '{}' is in the weights table but not in the local cache; fetch it first with `cargo xtask fetch-weights {}`",
            spec.name,
            spec.name
        ),
    }
}

/// The repository's `datasets/sample/` (a generated dataset in the VOC layout), located from
/// this crate's source directory.
pub fn sample_dataset_dir() -> PathBuf {
    tidy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("..")
            .join("datasets")
            .join("sample"),
    )
}

/// The canonical form of `p` when it exists (for readable messages), else `p`.
fn tidy(p: PathBuf) -> PathBuf {
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// The bundled model trained on the sample dataset.
pub fn sample_weights_path() -> PathBuf {
    tidy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets")
            .join("sample_model.safetensors"),
    )
}

/// The bundled image `deeplab predict` uses when given none.
pub fn sample_image_path() -> PathBuf {
    sample_dataset_dir().join("JPEGImages").join("val_0003.jpg")
}

/// Checks that the bundled sample files exist (they do in a checkout of the repository).
pub fn check_sample_files(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if !p.exists() {
            bail!(
                "{}: the bundled sample file is missing (this binary was built from a checkout that has moved or is incomplete); pass --data and --weights explicitly",
                p.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_f16_and_metadata() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.safetensors");
        let dev = Device::Cpu;
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), Tensor::new(&[1.0f32, 0.5, -2.0], &dev)?);
        let mut meta = BTreeMap::new();
        meta.insert(EVAL_CROP_KEY.to_string(), "97x97".to_string());
        let cfg = DeepLabConfig::mobilenetv2_v3(3);
        save_model(&path, &cfg, &t, &meta, SaveDType::F16)?;
        let back = read_tensors(&path, &dev)?;
        assert_eq!(back["a"].to_vec1::<f32>()?, vec![1.0, 0.5, -2.0]);
        let m = read_metadata(&path)?;
        assert_eq!(m[EVAL_CROP_KEY], "97x97");
        assert!(m.contains_key(CONFIG_KEY));
        // the file does not hold the model's tensors: loading names the first missing one
        let e = load_model(&path, &dev, None).unwrap_err().to_string();
        assert!(
            e.contains("missing tensor") && e.contains("m.safetensors"),
            "{e}"
        );
        let e = load_model(&dir.path().join("nope.safetensors"), &dev, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        Ok(())
    }
}
