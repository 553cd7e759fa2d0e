//! Segmentation datasets, augmentation, batching and metrics for DeepLab.
//!
//! * Datasets ([`Dataset`]): PASCAL VOC 2012 in its native layout (palette-index masks read with the
//!   `png` crate, SBD `SegmentationClassAug` and `train_aug.txt`), Cityscapes (labelIds mapped to the
//!   19 train ids by the embedded official table, or `*_labelTrainIds.png`), and a custom folder format
//!   (`classes.txt`, `images/`, `masks/`). Every bad input is a [`DataError`] naming the file;
//!   [`ErrorPolicy::SkipWithWarning`] lets evaluation skip bad samples instead.
//! * Transforms ([`TrainTransform`], [`EvalTransform`], [`Normalization`]): the official random scale /
//!   pad / crop / flip pipeline, deterministic under a seed.
//! * [`Loader`]: worker threads with prefetch, per-epoch seeded shuffling, NCHW f32 image batches and
//!   NxHxW label batches ([`Batch::to_tensors`] for candle).
//! * [`metrics`]: streaming confusion matrix (IoU, mIoU as TF's `mean_iou`, pixel accuracy, mean class
//!   accuracy, frequency-weighted IoU) and the trimap boundary metric.
//! * [`render`]: VOC / Cityscapes palettes, color masks, overlays, a confusion-matrix image.
//! * [`resize`]: PIL-compatible bilinear resizing used by the TFLite reference models.
//! * [`synthetic`]: a seeded generator of small shape datasets in the VOC and folder layouts.
//!
//! ```
//! use deeplab_data::{
//!     synthetic, BoundaryDefinition, ConfusionMatrix, Dataset, Loader, LoaderConfig,
//!     Normalization, TrainTransform, Transform, TrimapMetric,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("deeplab-data-doc-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! // A tiny dataset in the VOC layout, then read back like the real VOC 2012.
//! let cfg = synthetic::SyntheticConfig { num_train: 4, num_val: 2, ..Default::default() };
//! synthetic::write_voc(&dir, &cfg)?;
//! let train = Dataset::voc(&dir, "train")?;
//! assert_eq!(train.len(), 4);
//!
//! // Batches of two 65x65 random crops, normalized as the official checkpoints expect.
//! let mut config = LoaderConfig::train(2, Normalization::Official, 42);
//! config.transform = Transform::Train(TrainTransform::new(65, 65)?);
//! let loader = Loader::new(train, config)?;
//! let mut cm = ConfusionMatrix::new(loader.dataset().num_classes())?;
//! let mut trimap = TrimapMetric::new(cm.num_classes(), &[1, 4], BoundaryDefinition::LabelChange)?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     assert_eq!(batch.images.len(), 2 * 3 * 65 * 65);
//!     for i in 0..batch.batch_size {
//!         // a "model" that predicts background everywhere
//!         let pred = vec![0u8; batch.height * batch.width];
//!         cm.update(batch.label(i), &pred)?;
//!         trimap.update(batch.label(i), &pred, batch.width, batch.height)?;
//!     }
//! }
//! println!("{}", cm.summary().to_table(&loader.dataset().classes().names()));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod cityscapes;
pub mod classes;
pub mod dataset;
pub mod error;
pub mod folder;
pub mod io;
pub mod loader;
pub mod metrics;
pub mod render;
pub mod resize;
pub mod sample;
pub mod synthetic;
pub mod transform;
pub mod voc;

pub use cityscapes::{CityscapesLabel, CityscapesLabels, CITYSCAPES_LABELS};
pub use classes::{ClassInfo, ClassTable, Palette, VOC_CLASSES};
pub use dataset::{Dataset, DatasetFormat, MaskEncoding, SampleEntry, SampleIter};
pub use error::{DataError, ErrorPolicy, Result, SkippedSample};
pub use loader::{Batch, EpochIter, Loader, LoaderConfig};
pub use metrics::{BoundaryDefinition, ConfusionMatrix, MetricsSummary, TrimapMetric};
pub use resize::{resize_bilinear_pil, resize_long_side_padded, PaddedResize};
pub use sample::{LabelMap, RgbImage, Sample, IGNORE_LABEL};
pub use transform::{
    AugParams, EvalTransform, FloatImage, Normalization, ScaleRange, TrainTransform, Transform,
};
pub use voc::VocLabels;

/// The `image` crate version this crate's [`RgbImage`] comes from.
pub use image;
