//! The library behind the `deeplab` command: training (SGD with momentum, the poly schedule,
//! atomic checkpoints that resume bit for bit), evaluation (official pad-to-crop protocol,
//! multi-scale and flipped inputs, sliding windows, trimap), prediction, and the pieces they
//! share.
//!
//! Modules:
//! - [`optim`]: [`optim::Sgd`], momentum SGD with weight decay on convolution weights only.
//! - [`schedule`]: [`schedule::PolySchedule`], `base_lr * (1 - step / steps) ^ 0.9`.
//! - [`train`]: [`train::train`], the training loop, checkpoints, JSONL log and curves.
//! - [`infer`]: [`infer::Predictor`], preprocessing, multi-scale / flip / sliding-window
//!   inference and the mapping back to the image size.
//! - [`evaluate`]: [`evaluate::evaluate`], metrics over a dataset split.
//! - [`files`]: weight files with metadata, `--weights NAME` resolution, the bundled sample.
//! - [`init`]: seeded initialization and loading ImageNet backbone / full weights.
//! - [`plot`]: the training-curve renderer.
//! - [`cli`]: the command-line interface (clap) and its commands.
//!
//! ```
//! use deeplab_cli::{optim::{Sgd, SgdConfig}, schedule::PolySchedule};
//! use candle_core::{Device, Tensor, Var};
//!
//! // One SGD step on a 1x1 "convolution" weight under the poly schedule.
//! let w = Var::from_tensor(&Tensor::new(&[[[[2.0f32]]]], &Device::Cpu)?)?;
//! let mut opt = Sgd::new(
//!     vec![("conv.weight".to_string(), w.clone())],
//!     SgdConfig { momentum: 0.9, weight_decay: 0.0, decay_depthwise: false },
//! ).map_err(candle_core::Error::msg)?;
//! let schedule = PolySchedule::new(0.007, 0.9, 100).map_err(candle_core::Error::msg)?;
//! let loss = w.as_tensor().sqr()?.sum_all()?; // d/dw = 2w = 4
//! opt.step(&loss.backward()?, schedule.lr(0))?;
//! let v = w.as_tensor().flatten_all()?.to_vec1::<f32>()?[0];
//! assert!((v - (2.0 - 0.007 * 4.0)).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod alloc;
pub mod cli;
pub mod evaluate;
pub mod files;
pub mod infer;
pub mod init;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod train;

use anyhow::{Context, Result};
use std::path::Path;

/// Creates `dir` (and its parents) if needed and checks that files can be created in it, so a
/// command fails before doing any work when its output cannot be written.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "output directory {} exists and is not a directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    tempfile::Builder::new()
        .prefix(".deeplab-write-test-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write to output directory {}", dir.display()))?;
    Ok(())
}
