//! ASPP, decoder and the assembled DeepLabv3 / DeepLabv3+ models on candle, with canonical
//! weight files that carry their configuration, an importer of the official TensorFlow
//! DeepLab checkpoints, and a parameter / multiply-add counter.
//!
//! Papers: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation"
//! (DeepLabv3, 2017), §3.3 (ASPP with image-level features); Chen et al., "Encoder-Decoder with
//! Atrous Separable Convolution for Semantic Image Segmentation" (DeepLabv3+, ECCV 2018), §3.1
//! (decoder, atrous separable convolution). Reference implementation: tensorflow/models
//! `research/deeplab/model.py` (`extract_features`, `refine_by_decoder`, `_get_logits`),
//! whose outputs the parity tests reproduce.
//!
//! # Pieces
//! - [`DeepLabConfig`]: serde configuration (backbone variant with output stride and
//!   multi-grid, ASPP rates, image pooling, separable convs, decoder, classes, resize
//!   convention, input normalization, optional evaluation output stride). Named constructors
//!   such as [`DeepLabConfig::xception65_v3plus`] and [`DeepLabConfig::mobilenetv2_v3`].
//! - [`Aspp`], [`Decoder`], and the models [`DeepLabV3`], [`DeepLabV3Plus`] and
//!   [`DeepLabModel`] (either, as the config says). Models take *normalized* NCHW input
//!   ([`DeepLabModel::normalize`] applies the config's normalization to raw 0..255 pixels).
//! - [`weights`]: canonical safetensors files with the config JSON under the metadata key
//!   `deeplab_config`, written atomically; [`DeepLabModel::load`] builds from a file alone.
//! - [`convert`]: official DeepLab TensorFlow checkpoints (or model-zoo `.tar.gz`) to canonical
//!   files.
//! - [`tflite`]: TensorFlow's TFLite DeepLabv3-MobileNetV2 models (float or uint8-quantized,
//!   BatchNorm folded) to canonical files, the graph checked against what the model computes.
//! - [`DeepLabModel::count`] / [`DeepLabConfig::count`]: parameters and multiply-adds with the
//!   paper's convention (every convolution, atrous ones counted on TensorFlow's
//!   space-to-batch grid; see [`deeplab_ops::MacCounter`]).
//! - [`npy`]: a small `.npy` reader / writer.
//!
//! # Key scheme
//! One scheme for both models (PyTorch layouts: conv `[Cout, Cin, kh, kw]`, depthwise
//! `[C, 1, kh, kw]`; BatchNorm `weight`, `bias`, `running_mean`, `running_var`):
//!
//! | key | module |
//! |---|---|
//! | `backbone.*` | the backbone, under its timm state-dict names (e.g. `backbone.blocks.0.stack.conv1.conv_dw.weight`) |
//! | `aspp.pooling.conv.weight`, `aspp.pooling.bn.*` | image pooling: 1x1 conv + BN (+ ReLU) |
//! | `aspp.convs.0.conv.weight`, `aspp.convs.0.bn.*` | the 1x1 branch |
//! | `aspp.convs.{i}.conv.weight`, `aspp.convs.{i}.bn.*` | atrous branch `i` = 1, 2, 3 (plain 3x3) |
//! | `aspp.convs.{i}.{conv_dw,bn_dw,conv_pw,bn_pw}.*` | atrous branch `i` (separable; timm's names) |
//! | `aspp.project.conv.weight`, `aspp.project.bn.*` | 1x1 projection of the concatenation |
//! | `decoder.project.conv.weight`, `decoder.project.bn.*` | 1x1 48-channel low-level projection |
//! | `decoder.convs.{k}.conv.weight`, `decoder.convs.{k}.bn.*` | refinement conv `k` = 0.. (plain 3x3) |
//! | `decoder.convs.{k}.{conv_dw,bn_dw,conv_pw,bn_pw}.*` | refinement conv `k` (separable) |
//! | `classifier.weight`, `classifier.bias` | the 1x1 logits conv (the only bias) |
//!
//! Official TensorFlow names map as: `image_pooling` → `aspp.pooling`, `aspp0` →
//! `aspp.convs.0`, `aspp{i}` / `aspp{i}_{depthwise,pointwise}` → `aspp.convs.{i}`,
//! `concat_projection` → `aspp.project`, `decoder/feature_projection0` → `decoder.project`,
//! `decoder/decoder_conv{k}_{depthwise,pointwise}` (separable) or
//! `decoder/decoder_conv0/decoder_conv0_{k+1}` (plain) → `decoder.convs.{k}`,
//! `logits/semantic` → `classifier`.
//!
//! # Example
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::VarBuilder;
//! use deeplab_heads::{DeepLabConfig, DeepLabV3Plus, DeepLabModel};
//!
//! // DeepLabv3+ on MobileNetV2 (separable ASPP 6/12/18, stride-4 decoder), zero weights.
//! let config = DeepLabConfig::mobilenetv2_v3plus(21);
//! let model = DeepLabV3Plus::new(&config, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
//! let raw = Tensor::full(128f32, (1, 3, 65, 65), &Device::Cpu)?; // RGB pixels, 0..255
//! let x = config.normalization.apply(&raw)?;
//! let out = model.forward_output(&x, false)?;
//! assert_eq!(out.logits.dims(), &[1, 21, 17, 17]); // stride 4
//! assert_eq!(model.forward_t(&x, false)?.dims(), &[1, 21, 65, 65]);
//!
//! // The same through the enum a weight file builds, and the paper's multiply-adds count.
//! let model = DeepLabModel::from(model);
//! assert_eq!(model.predict(&x)?.dims(), &[1, 65, 65]);
//! let count = config.count((513, 513))?;
//! assert!(count.gmacs() > 1.0 && count.params > 2_000_000);
//! # Ok::<(), candle_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod aspp;
pub mod config;
pub mod convert;
pub mod decoder;
mod error;
pub mod keys;
pub mod model;
pub mod npy;
pub mod tflite;
pub mod weights;

pub use aspp::{Aspp, AsppConfig};
pub use config::{AsppSettings, DecoderSettings, DeepLabConfig, InputNormalization};
pub use decoder::{Decoder, DecoderConfig};
pub use deeplab_ops::FoldBatchNorm;
pub use error::{ModelError, Result};
pub use keys::{KeyRecorder, TensorKey};
pub use model::{DeepLabModel, DeepLabOutput, DeepLabV3, DeepLabV3Plus, ModelCount};

use candle_core::Tensor;
use std::collections::BTreeMap;

/// Named intermediate tensors of one forward pass (NCHW), keyed by the official reference
/// dump names (see [`DeepLabModel::forward_with_intermediates`]).
#[derive(Clone, Debug, Default)]
pub struct Intermediates {
    map: BTreeMap<String, Tensor>,
}

impl Intermediates {
    /// Stores `t` under `name` (replacing an earlier one).
    pub fn insert(&mut self, name: &str, t: &Tensor) {
        self.map.insert(name.to_string(), t.clone());
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    /// Every name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// `(name, tensor)` pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of stored tensors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// `true` when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The underlying map.
    pub fn into_map(self) -> BTreeMap<String, Tensor> {
        self.map
    }
}
