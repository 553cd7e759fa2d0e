//! Pure-Rust readers of TensorFlow tensor-bundle checkpoints and TFLite flatbuffers.
//!
//! Two independent formats, no candle dependency:
//!
//! - [`checkpoint`]: TensorFlow V2 checkpoints (`model.ckpt.index` + `model.ckpt.data-*`), the
//!   format of the official DeepLab model zoo, including its `.tar.gz` tarballs, plus a writer
//!   producing checkpoints TensorFlow can read (used to generate test fixtures).
//! - [`tflite`]: TFLite flatbuffer models: tensors with their quantization parameters and data,
//!   and the operator graph with decoded builtin options.
//!
//! Every error names the file and, where one is involved, the variable, tensor or operator.
//!
//! ```
//! use deeplab_formats::{Checkpoint, CheckpointWriter, DType};
//!
//! let dir = tempfile::tempdir()?;
//! let prefix = dir.path().join("model.ckpt");
//! let mut w = CheckpointWriter::create(&prefix)?;
//! w.add_f32("logits/semantic/biases", &[3], &[0.5, -1.0, 2.0])?;
//! w.add_f32("logits/semantic/weights", &[1, 1, 2, 3], &[0.0; 6])?;
//! w.finish()?;
//!
//! let ckpt = Checkpoint::open(&prefix)?;
//! assert_eq!(ckpt.names(), ["logits/semantic/biases", "logits/semantic/weights"]);
//! let info = ckpt.entry("logits/semantic/weights")?;
//! assert_eq!((info.dtype, info.shape.as_slice()), (DType::F32, &[1, 1, 2, 3][..]));
//! assert_eq!(ckpt.read_f32("logits/semantic/biases")?, vec![0.5, -1.0, 2.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod checkpoint;
mod crc32c;
mod flatbuf;
mod proto;
mod snappy;
mod sstable;
pub mod tflite;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointWriter, DType, TensorInfo};
pub use tflite::{TfliteError, TfliteModel};
