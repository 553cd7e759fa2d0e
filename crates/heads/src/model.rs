//! The assembled models: [`DeepLabV3`] (backbone → ASPP → 1x1 classifier) and
//! [`DeepLabV3Plus`] (backbone → ASPP → decoder on the stride-4 feature → classifier), both
//! followed by a bilinear upsampling of the logits to the input size (DeepLabv3 §3.3,
//! DeepLabv3+ §3.1; official `tensorflow/models` `research/deeplab/model.py`:
//! `multi_scale_logits`, `_get_logits`, `predict_labels`), and [`DeepLabModel`], the closed set
//! of the two built from a [`DeepLabConfig`].
//!
//! Keys: `backbone.*` (the backbone's timm names), `aspp.*`, `decoder.*`,
//! `classifier.{weight,bias}` (see the crate docs).

use crate::aspp::{Aspp, AsppConfig};
use crate::config::DeepLabConfig;
use crate::decoder::{Decoder, DecoderConfig};
use crate::error::{ModelError, Result as FileResult};
use crate::keys::{KeyRecorder, TensorKey};
use crate::weights::{check_keys, read_weights};
use crate::Intermediates;
use candle_core::{bail, DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use deeplab_backbones::{AnyBackbone, Backbone};
use deeplab_ops::{
    resize_bilinear, BatchNormConfig, Conv2d, Conv2dGeometry, FoldBatchNorm, MacCounter, ResizeMode,
};
use std::collections::HashMap;
use std::path::Path;

/// Parameters and multiply-adds of a model for one input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelCount {
    /// Trainable parameters: conv weights, BatchNorm scales and shifts, the classifier bias.
    pub params: u64,
    /// BatchNorm running statistics (the rest of the weight file).
    pub buffers: u64,
    /// Multiply-adds of every convolution for the input size, with the paper's convention
    /// (see [`deeplab_ops::MacCounter`]).
    pub macs: u64,
}

impl ModelCount {
    /// Multiply-adds in billions.
    pub fn gmacs(&self) -> f64 {
        self.macs as f64 / 1e9
    }
}

/// The logits at the network's output resolution and upsampled to the input size.
#[derive(Clone, Debug)]
pub struct DeepLabOutput {
    /// `[N, classes, h, w]` at the decoder (DeepLabv3+) or output-stride (DeepLabv3) resolution.
    pub logits: Tensor,
    /// `[N, classes, H, W]` bilinearly upsampled to the input size.
    pub upsampled: Tensor,
}

/// The parts shared by both models.
#[derive(Clone, Debug)]
struct Common {
    config: DeepLabConfig,
    backbone: AnyBackbone,
    high: usize,
    aspp: Aspp,
    classifier: Conv2d,
    mode: ResizeMode,
}

impl Common {
    fn new(config: &DeepLabConfig, head_channels: Option<usize>, vb: &VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let backbone = config.backbone.build(vb.pp("backbone"))?;
        let info = backbone.feature_info();
        let high = info
            .iter()
            .enumerate()
            .max_by_key(|(_, f)| f.reduction)
            .map(|(i, _)| i)
            .ok_or_else(|| candle_core::Error::msg("backbone reports no features"))?;
        let bn = BatchNormConfig::tf_head().with_eps(config.head_bn_eps);
        let aspp_cfg = AsppConfig {
            in_channels: info[high].channels,
            channels: config.aspp.channels,
            atrous_rates: config.aspp.atrous_rates.clone(),
            image_pooling: config.aspp.image_pooling,
            separable: config.aspp.separable,
            dropout: config.aspp.dropout,
            bn,
        };
        let aspp = Aspp::new(&aspp_cfg, vb.pp("aspp"))?;
        let cin = head_channels.unwrap_or(config.aspp.channels);
        let classifier = Conv2d::new(
            cin,
            config.num_classes,
            1,
            Conv2dGeometry::default(),
            true,
            vb.pp("classifier"),
        )?;
        Ok(Self {
            config: config.clone(),
            backbone,
            high,
            aspp,
            classifier,
            mode: ResizeMode::from_align_corners(config.align_corners),
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<(usize, usize)> {
        match x.dims() {
            [_, 3, h, w] if *h > 0 && *w > 0 => Ok((*h, *w)),
            d => bail!("deeplab: expected a normalized NCHW RGB batch [N, 3, H, W], got {d:?}"),
        }
    }

    fn features(
        &self,
        x: &Tensor,
        train: bool,
        rec: &mut Option<&mut Intermediates>,
    ) -> Result<Vec<Tensor>> {
        let feats = self.backbone.forward_features(x, train)?;
        if let Some(r) = rec.as_deref_mut() {
            r.insert("backbone_features", &feats[self.high]);
            let info = self.backbone.feature_info();
            if let Some(i) = info.iter().position(|f| f.reduction == 4) {
                r.insert("low_level_feature", &feats[i]);
            }
        }
        Ok(feats)
    }

    fn finish(
        &self,
        head: &Tensor,
        input_hw: (usize, usize),
        rec: Option<&mut Intermediates>,
    ) -> Result<DeepLabOutput> {
        let logits = self.classifier.forward(head)?;
        let upsampled = resize_bilinear(&logits, input_hw, self.mode)?;
        if let Some(r) = rec {
            r.insert("logits_conv", &logits);
            r.insert("logits", &logits);
            r.insert("logits_upsampled", &upsampled);
        }
        Ok(DeepLabOutput { logits, upsampled })
    }
}

/// DeepLabv3: backbone → ASPP → 1x1 classifier → bilinear upsampling.
#[derive(Clone, Debug)]
pub struct DeepLabV3 {
    common: Common,
}

impl DeepLabV3 {
    /// Builds the model (`config.decoder` must be `None`), loading or initializing weights
    /// from `vb` under the crate's key scheme.
    pub fn new(config: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        if config.decoder.is_some() {
            bail!("DeepLabV3 has no decoder; use DeepLabV3Plus (or DeepLabModel) for this config")
        }
        Ok(Self {
            common: Common::new(config, None, &vb)?,
        })
    }

    /// Runs on a normalized NCHW batch; returns the low-resolution and upsampled logits.
    pub fn forward_output(&self, x: &Tensor, train: bool) -> Result<DeepLabOutput> {
        self.run(x, train, None)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &DeepLabConfig {
        &self.common.config
    }

    fn run(
        &self,
        x: &Tensor,
        train: bool,
        mut rec: Option<&mut Intermediates>,
    ) -> Result<DeepLabOutput> {
        let c = &self.common;
        let hw = c.check_input(x)?;
        let feats = c.features(x, train, &mut rec)?;
        let y = c
            .aspp
            .forward_rec(&feats[c.high], train, rec.as_deref_mut())?;
        c.finish(&y, hw, rec)
    }

    fn count_macs(&self, input_hw: (usize, usize), m: &mut MacCounter) -> Result<()> {
        let c = &self.common;
        c.backbone.count_macs(input_hw, m)?;
        let sizes = c.backbone.feature_sizes(input_hw)?;
        let out = c.aspp.count(sizes[c.high], m)?;
        c.classifier.count(out, m)?;
        Ok(())
    }
}

impl ModuleT for DeepLabV3 {
    /// Logits upsampled to the input size, `[N, classes, H, W]`, for a normalized batch.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_output(x, train)?.upsampled)
    }
}

impl From<DeepLabV3> for DeepLabModel {
    fn from(m: DeepLabV3) -> Self {
        DeepLabModel::V3(m)
    }
}

/// DeepLabv3+: backbone → ASPP → decoder with the low-level feature → classifier → bilinear
/// upsampling.
#[derive(Clone, Debug)]
pub struct DeepLabV3Plus {
    common: Common,
    decoder: Decoder,
    low: usize,
}

impl DeepLabV3Plus {
    /// Builds the model (`config.decoder` must be set), loading or initializing weights from
    /// `vb` under the crate's key scheme. Fails when the backbone has no feature at the
    /// decoder's stride.
    pub fn new(config: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        let Some(d) = &config.decoder else {
            bail!("DeepLabV3Plus needs decoder settings; use DeepLabV3 (or DeepLabModel) for this config")
        };
        let common = Common::new(config, Some(d.channels), &vb)?;
        let info = common.backbone.feature_info();
        let Some(low) = info.iter().position(|f| f.reduction == d.output_stride) else {
            bail!(
                "decoder stride {} not offered by backbone {} (its features: {:?})",
                d.output_stride,
                config.backbone.name(),
                info.iter()
                    .map(|f| (f.channels, f.reduction))
                    .collect::<Vec<_>>()
            )
        };
        let dcfg = DecoderConfig {
            in_channels: config.aspp.channels,
            low_level_channels: info[low].channels,
            projection_channels: d.projection_channels,
            channels: d.channels,
            num_convs: d.num_convs,
            separable: d.separable,
            output_stride: d.output_stride,
            align_corners: config.align_corners,
            bn: BatchNormConfig::tf_head().with_eps(config.head_bn_eps),
        };
        let decoder = Decoder::new(&dcfg, vb.pp("decoder"))?;
        Ok(Self {
            common,
            decoder,
            low,
        })
    }

    /// Runs on a normalized NCHW batch; returns the low-resolution and upsampled logits.
    pub fn forward_output(&self, x: &Tensor, train: bool) -> Result<DeepLabOutput> {
        self.run(x, train, None)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &DeepLabConfig {
        &self.common.config
    }

    fn run(
        &self,
        x: &Tensor,
        train: bool,
        mut rec: Option<&mut Intermediates>,
    ) -> Result<DeepLabOutput> {
        let c = &self.common;
        let hw = c.check_input(x)?;
        let feats = c.features(x, train, &mut rec)?;
        let a = c
            .aspp
            .forward_rec(&feats[c.high], train, rec.as_deref_mut())?;
        let y = self
            .decoder
            .forward_rec(&a, &feats[self.low], hw, train, rec.as_deref_mut())?;
        c.finish(&y, hw, rec)
    }

    fn count_macs(&self, input_hw: (usize, usize), m: &mut MacCounter) -> Result<()> {
        let c = &self.common;
        c.backbone.count_macs(input_hw, m)?;
        let sizes = c.backbone.feature_sizes(input_hw)?;
        c.aspp.count(sizes[c.high], m)?;
        let out = self.decoder.count(input_hw, sizes[self.low], m)?;
        c.classifier.count(out, m)?;
        Ok(())
    }
}

impl ModuleT for DeepLabV3Plus {
    /// Logits upsampled to the input size, `[N, classes, H, W]`, for a normalized batch.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_output(x, train)?.upsampled)
    }
}

impl From<DeepLabV3Plus> for DeepLabModel {
    fn from(m: DeepLabV3Plus) -> Self {
        DeepLabModel::V3Plus(m)
    }
}

/// A DeepLabv3 or DeepLabv3+ model, as its [`DeepLabConfig`] says.
#[derive(Clone, Debug)]
// One model per process, never in collections: its size does not matter, and boxing the
// variants would only add an indirection to every access.
#[allow(clippy::large_enum_variant)]
pub enum DeepLabModel {
    /// No decoder.
    V3(DeepLabV3),
    /// With the decoder.
    V3Plus(DeepLabV3Plus),
}

impl FoldBatchNorm for Common {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.backbone.fold_batch_norm()?;
        self.aspp.fold_batch_norm()
    }
}

impl FoldBatchNorm for DeepLabV3 {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.common.fold_batch_norm()
    }
}

impl FoldBatchNorm for DeepLabV3Plus {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.common.fold_batch_norm()?;
        self.decoder.fold_batch_norm()
    }
}

/// Folds every BatchNorm into the convolution before it, for inference (see
/// [`FoldBatchNorm`]): the same evaluation-mode outputs, fewer passes over memory; the folded
/// model cannot train. `deeplab eval`, `predict` and `bench` fold by default.
impl FoldBatchNorm for DeepLabModel {
    fn fold_batch_norm(&mut self) -> Result<()> {
        match self {
            DeepLabModel::V3(m) => m.fold_batch_norm(),
            DeepLabModel::V3Plus(m) => m.fold_batch_norm(),
        }
    }
}

impl DeepLabModel {
    /// Builds the model `config` describes, loading (or initializing) its weights from `vb`.
    pub fn new(config: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match config.decoder {
            Some(_) => Self::V3Plus(DeepLabV3Plus::new(config, vb)?),
            None => Self::V3(DeepLabV3::new(config, vb)?),
        })
    }

    /// Loads a canonical weight file: builds the model its metadata describes and checks every
    /// tensor first, so a missing, mis-shaped or unused tensor is an error naming it and the
    /// file.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> FileResult<Self> {
        let path = path.as_ref();
        let wf = read_weights(path, device)?;
        Self::from_tensors(path, &wf.config, wf.tensors, device)
    }

    /// Loads a weight file with the configuration produced by `adjust` from the file's own
    /// (e.g. `|c| c.for_eval()` or another output stride; the weights must still fit).
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        adjust: impl FnOnce(&DeepLabConfig) -> std::result::Result<DeepLabConfig, String>,
    ) -> FileResult<Self> {
        let path = path.as_ref();
        let wf = read_weights(path, device)?;
        let cfg = adjust(&wf.config).map_err(|detail| ModelError::Config {
            path: path.to_path_buf(),
            detail,
        })?;
        Self::from_tensors(path, &cfg, wf.tensors, device)
    }

    /// Builds `config` from named tensors read from `path` (used in error messages), after
    /// checking them against the keys the model needs.
    pub fn from_tensors(
        path: &Path,
        config: &DeepLabConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> FileResult<Self> {
        Self::from_tensors_as(path, config, tensors, device, DType::F32)
    }

    /// [`DeepLabModel::from_tensors`] with the weights held (and the network run) in `dtype`:
    /// F32, or F16 / BF16 for half-precision inference (BatchNorm statistics, the folded
    /// epilogues and the custom kernels' arithmetic stay f32; matmuls and convolutions run in
    /// `dtype`). [`DeepLabModel::normalize`] converts inputs to `dtype`, and the logits come
    /// back as F32.
    pub fn from_tensors_as(
        path: &Path,
        config: &DeepLabConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> FileResult<Self> {
        config.validate().map_err(|detail| ModelError::Config {
            path: path.to_path_buf(),
            detail,
        })?;
        let keys = config.keys().map_err(|e| ModelError::candle(path, e))?;
        check_keys(
            path,
            &keys,
            tensors.iter().map(|(n, t)| (n.as_str(), t.dims())),
        )?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::new(config, vb).map_err(|e| ModelError::candle(path, e))
    }

    /// The element type of the weights (and of the activations inside the network).
    pub fn dtype(&self) -> DType {
        self.common().classifier.weight().dtype()
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &DeepLabConfig {
        &self.common().config
    }

    fn common(&self) -> &Common {
        match self {
            Self::V3(m) => &m.common,
            Self::V3Plus(m) => &m.common,
        }
    }

    /// The backbone.
    pub fn backbone(&self) -> &AnyBackbone {
        &self.common().backbone
    }

    /// The ASPP module.
    pub fn aspp(&self) -> &Aspp {
        &self.common().aspp
    }

    /// The decoder (DeepLabv3+ only).
    pub fn decoder(&self) -> Option<&Decoder> {
        match self {
            Self::V3(_) => None,
            Self::V3Plus(m) => Some(&m.decoder),
        }
    }

    /// The 1x1 logits convolution (`classifier.weight`, `classifier.bias`).
    pub fn classifier(&self) -> &Conv2d {
        &self.common().classifier
    }

    /// Normalizes raw RGB pixels (0..255, NCHW) as the weights expect
    /// ([`DeepLabConfig::normalization`]).
    pub fn normalize(&self, raw: &Tensor) -> Result<Tensor> {
        self.config()
            .normalization
            .apply(raw)?
            .to_dtype(self.dtype())
    }

    /// Runs on a normalized NCHW batch; returns the low-resolution and upsampled logits
    /// (F32 whatever the model's dtype).
    pub fn forward_output(&self, x: &Tensor, train: bool) -> Result<DeepLabOutput> {
        let out = match self {
            Self::V3(m) => m.run(x, train, None)?,
            Self::V3Plus(m) => m.run(x, train, None)?,
        };
        if out.logits.dtype() == DType::F32 {
            return Ok(out);
        }
        Ok(DeepLabOutput {
            logits: out.logits.to_dtype(DType::F32)?,
            upsampled: out.upsampled.to_dtype(DType::F32)?,
        })
    }

    /// Runs in evaluation mode and returns every named intermediate (NCHW), under the names of
    /// the official reference dumps: `backbone_features`, `low_level_feature` (the stride-4 tap),
    /// `aspp_image_pooling_{avgpool,conv,resized}`, `aspp0`, `aspp{i}_depthwise` (separable),
    /// `aspp{i}`, `aspp_concat`, `aspp_output`, `decoder_feature_projection0`,
    /// `decoder_aspp_resized`, `decoder_lowlevel_resized`, `decoder_concat`,
    /// `decoder_conv{k}_depthwise` (separable), `decoder_conv{k}`, `logits_conv` (= `logits`)
    /// and `logits_upsampled`.
    pub fn forward_with_intermediates(&self, x: &Tensor) -> Result<Intermediates> {
        let mut rec = Intermediates::default();
        match self {
            Self::V3(m) => m.run(x, false, Some(&mut rec))?,
            Self::V3Plus(m) => m.run(x, false, Some(&mut rec))?,
        };
        Ok(rec)
    }

    /// Per-pixel class ids `[N, H, W]` (u32) of a normalized batch, at the input size.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_output(x, false)?.upsampled.argmax(1)
    }

    /// Parameters and multiply-adds for an `input_hw` image.
    pub fn count(&self, input_hw: (usize, usize)) -> Result<ModelCount> {
        let mut m = MacCounter::new();
        match self {
            Self::V3(v) => v.count_macs(input_hw, &mut m)?,
            Self::V3Plus(v) => v.count_macs(input_hw, &mut m)?,
        }
        let keys = self.config().keys()?;
        let buffers: u64 = keys
            .iter()
            .filter(|k| k.is_buffer())
            .map(|k| k.numel() as u64)
            .sum();
        let all: u64 = keys.iter().map(|k| k.numel() as u64).sum();
        Ok(ModelCount {
            params: all - buffers,
            buffers,
            macs: m.macs,
        })
    }
}

impl ModuleT for DeepLabModel {
    /// Logits upsampled to the input size, `[N, classes, H, W]`, for a normalized batch.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_output(x, train)?.upsampled)
    }
}

impl DeepLabConfig {
    /// Every tensor (canonical name and shape) the model of this configuration loads, in
    /// the order the model requests them; built without weights.
    pub fn keys(&self) -> Result<Vec<TensorKey>> {
        let rec = KeyRecorder::new();
        DeepLabModel::new(self, rec.var_builder())?;
        Ok(rec.keys())
    }

    /// Parameters and multiply-adds of this configuration for an `input_hw` image, without
    /// weights.
    pub fn count(&self, input_hw: (usize, usize)) -> Result<ModelCount> {
        let rec = KeyRecorder::new();
        DeepLabModel::new(self, rec.var_builder())?.count(input_hw)
    }
}
