//! Errors of weight-file, checkpoint-conversion and `.npy` handling; every message names the file.

use std::path::{Path, PathBuf};

/// An error reading, writing or converting a model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An operating-system error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed or unsupported `.npy` file.
    #[error("{path}: {detail}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A malformed safetensors file.
    #[error("{path}: not a valid safetensors file: {detail}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A weight file without the model configuration in its metadata.
    #[error("{path}: no '{key}' entry in the safetensors metadata, so the file does not say which model it holds; convert or save it with deeplab-heads")]
    MissingConfig {
        /// The file.
        path: PathBuf,
        /// The metadata key looked for.
        key: &'static str,
    },
    /// An invalid model configuration (in a file or given by the caller).
    #[error("{path}: invalid model configuration: {detail}")]
    Config {
        /// The file the configuration came from (or is for).
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The model needs a tensor that the file does not have.
    #[error("{path}: missing tensor '{name}' (the model needs shape {expected:?}); the file holds a different architecture or is incomplete")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The canonical tensor name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
    /// A tensor of the file has the wrong shape for the model.
    #[error("{path}: tensor '{name}' has shape {found:?}, the model needs {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The canonical tensor name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// The file holds a tensor that the model does not use.
    #[error("{path}: tensor '{name}' is not used by the model described in the file's metadata")]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor of an unsupported element type.
    #[error(
        "{path}: tensor '{name}' has dtype {dtype}; only F32, F16, BF16 and F64 are supported"
    )]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A TensorFlow checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] deeplab_formats::CheckpointError),
    /// A TFLite model could not be read (truncated, wrong identifier, malformed flatbuffer,
    /// unsupported tensor data); the source names the file and the tensor or operator.
    #[error(transparent)]
    Tflite(#[from] deeplab_formats::TfliteError),
    /// A checkpoint inside an archive could not be read (the source names the extracted file).
    #[error("{path}: {source}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The underlying error.
        source: deeplab_formats::CheckpointError,
    },
    /// A checkpoint variable that cannot be converted.
    #[error("{path}: variable '{variable}': {detail}")]
    Convert {
        /// The checkpoint.
        path: PathBuf,
        /// The TensorFlow variable name.
        variable: String,
        /// What is wrong.
        detail: String,
    },
    /// A checkpoint that does not describe a model this crate can build.
    #[error("{path}: {detail}")]
    Unsupported {
        /// The checkpoint or file.
        path: PathBuf,
        /// What is missing or unsupported.
        detail: String,
    },
    /// A tensor operation failed while building or running the model of a file.
    #[error("{path}: {source}")]
    Candle {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: candle_core::Error,
    },
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A candle error while handling `path`.
    pub fn candle(path: &Path, source: candle_core::Error) -> Self {
        ModelError::Candle {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `Result` with a [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
