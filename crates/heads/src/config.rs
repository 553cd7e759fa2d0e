//! The serializable model configuration: which backbone at which output stride, the ASPP and
//! decoder hyper-parameters, the classes, the resize convention and the input normalization.
//! It travels as JSON in the weight file's safetensors metadata, so a file alone says how to
//! build its model. Variants are named constructors; there is no `Default`.

use crate::error::{ModelError, Result};
use candle_core::Tensor;
use deeplab_backbones::{
    BackboneConfig, MobileNetV2Config, OutputStride, ResNetConfig, XceptionConfig,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How raw pixels (0..255) are normalized before the network, i.e. what the weights expect.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputNormalization {
    /// The official DeepLab checkpoints (Inception preprocessing): `x * 2/255 - 1`.
    Official,
    /// ImageNet statistics (timm / torchvision weights): `(x/255 - mean) / std` with mean
    /// (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    #[serde(rename = "imagenet")]
    ImageNet,
    /// `(x/255 - mean) / std` with explicit per-channel statistics in 0..1 units.
    MeanStd {
        /// Mean per channel (RGB).
        mean: [f32; 3],
        /// Standard deviation per channel (RGB), positive.
        std: [f32; 3],
    },
}

impl InputNormalization {
    /// `(scale, shift)` per channel with `normalized = raw * scale + shift`.
    pub fn scale_shift(&self) -> ([f32; 3], [f32; 3]) {
        let ms = |mean: [f32; 3], std: [f32; 3]| {
            let mut a = [0f32; 3];
            let mut b = [0f32; 3];
            for c in 0..3 {
                a[c] = 1.0 / (255.0 * std[c]);
                b[c] = -mean[c] / std[c];
            }
            (a, b)
        };
        match *self {
            InputNormalization::Official => ([2.0 / 255.0; 3], [-1.0; 3]),
            InputNormalization::ImageNet => ms([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            InputNormalization::MeanStd { mean, std } => ms(mean, std),
        }
    }

    /// Normalizes an NCHW batch of raw RGB pixels (0..255).
    pub fn apply(&self, raw: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, _, _) = raw.dims4()?;
        if c != 3 {
            candle_core::bail!(
                "normalization: expected 3 (RGB) channels, got input {:?}",
                raw.dims()
            )
        }
        let (a, b) = self.scale_shift();
        let dev = raw.device();
        let a = Tensor::new(&a, dev)?
            .reshape((1, 3, 1, 1))?
            .to_dtype(raw.dtype())?;
        let b = Tensor::new(&b, dev)?
            .reshape((1, 3, 1, 1))?
            .to_dtype(raw.dtype())?;
        raw.broadcast_mul(&a)?.broadcast_add(&b)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if let InputNormalization::MeanStd { mean, std } = self {
            if std.iter().any(|s| !(s.is_finite() && *s > 0.0))
                || mean.iter().any(|m| !m.is_finite())
            {
                return Err(format!("normalization mean {mean:?} / std {std:?}: std must be positive and both finite"));
            }
        }
        Ok(())
    }
}

/// ASPP hyper-parameters (DeepLabv3 §3.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsppSettings {
    /// Channels of each branch and of the projection (256).
    pub channels: usize,
    /// Rates of the 3x3 atrous branches at the configured output stride (6/12/18 at 16,
    /// 12/24/36 at 8); empty for "image pooling + 1x1" (the MobileNetV2 model-zoo head).
    pub atrous_rates: Vec<usize>,
    /// The image-level (global average pooling) branch.
    pub image_pooling: bool,
    /// Atrous separable 3x3 branches (DeepLabv3+ §3.1) instead of plain atrous convs.
    pub separable: bool,
    /// Dropout probability after the projection, training only (official keep_prob 0.9 = 0.1).
    pub dropout: f32,
}

/// Decoder hyper-parameters (DeepLabv3+ §3.1, Table 1-2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSettings {
    /// Reduction of the low-level feature it refines with (4).
    pub output_stride: usize,
    /// Channels of the low-level 1x1 projection (48).
    pub projection_channels: usize,
    /// Channels of the 3x3 refinement convs (256).
    pub channels: usize,
    /// Number of 3x3 refinement convs, 1-3 (2).
    pub num_convs: usize,
    /// Separable refinement convs.
    pub separable: bool,
}

impl DecoderSettings {
    /// The paper's decoder: stride 4, 48-channel projection, two 3x3 convs of 256.
    pub fn paper(separable: bool) -> Self {
        Self {
            output_stride: 4,
            projection_channels: 48,
            channels: 256,
            num_convs: 2,
            separable,
        }
    }
}

/// Everything needed to build a [`crate::DeepLabModel`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepLabConfig {
    /// The backbone variant, including its output stride and multi-grid rates.
    pub backbone: BackboneConfig,
    /// ASPP settings.
    pub aspp: AsppSettings,
    /// The decoder; `None` gives DeepLabv3.
    pub decoder: Option<DecoderSettings>,
    /// Number of classes (21 for VOC, 19 for Cityscapes).
    pub num_classes: usize,
    /// `true`: every resize is bilinear with `align_corners=True` to the official
    /// `scale_dimension` sizes (TF DeepLab); `false`: PyTorch's `align_corners=False`.
    pub align_corners: bool,
    /// What the weights expect as input.
    pub normalization: InputNormalization,
    /// BatchNorm epsilon of the head (ASPP and decoder; official 1e-5).
    pub head_bn_eps: f64,
    /// Output stride to evaluate at when it differs from the training one (e.g. 8 for weights
    /// trained at 16); see [`DeepLabConfig::for_eval`].
    pub eval_output_stride: Option<OutputStride>,
}

impl DeepLabConfig {
    /// DeepLabv3+ on `backbone` with the paper's head: image pooling, rates 6/12/18 scaled to
    /// the backbone's output stride, the stride-4 decoder with two 3x3 convs, separable ASPP
    /// and decoder convs as chosen, official resizes.
    pub fn v3plus(
        backbone: BackboneConfig,
        num_classes: usize,
        separable: bool,
        normalization: InputNormalization,
    ) -> Self {
        let os = backbone.output_stride();
        Self {
            backbone,
            aspp: AsppSettings {
                channels: 256,
                atrous_rates: paper_rates(os),
                image_pooling: true,
                separable,
                dropout: 0.1,
            },
            decoder: Some(DecoderSettings::paper(separable)),
            num_classes,
            align_corners: true,
            normalization,
            head_bn_eps: 1e-5,
            eval_output_stride: None,
        }
    }

    /// DeepLabv3 (no decoder) on `backbone` with image pooling and rates 6/12/18 scaled to the
    /// output stride.
    pub fn v3(
        backbone: BackboneConfig,
        num_classes: usize,
        separable: bool,
        normalization: InputNormalization,
    ) -> Self {
        Self {
            decoder: None,
            ..Self::v3plus(backbone, num_classes, separable, normalization)
        }
    }

    /// The paper's best model: Xception-65, output stride 16, separable ASPP and decoder
    /// (the model zoo's `xception65_coco_voc_trainaug` layout).
    pub fn xception65_v3plus(num_classes: usize) -> Self {
        Self::v3plus(
            BackboneConfig::Xception(XceptionConfig::xception65()),
            num_classes,
            true,
            InputNormalization::Official,
        )
    }

    /// Xception-65 DeepLabv3 (no decoder), plain ASPP, output stride 16.
    pub fn xception65_v3(num_classes: usize) -> Self {
        Self::v3(
            BackboneConfig::Xception(XceptionConfig::xception65()),
            num_classes,
            false,
            InputNormalization::Official,
        )
    }

    /// DeepLabv3+ on the official ResNet-101 v1-beta with multi-grid (1, 2, 4), plain ASPP and
    /// decoder convs, output stride 16 (the paper's ResNet-101 rows).
    pub fn resnet101_beta_v3plus(num_classes: usize) -> Self {
        let mut rn = ResNetConfig::resnet101_beta();
        rn.multi_grid = Some(vec![1, 2, 4]);
        Self::v3plus(
            BackboneConfig::ResNet(rn),
            num_classes,
            false,
            InputNormalization::Official,
        )
    }

    /// DeepLabv3+ on timm's / torchvision's ResNet-101 (ImageNet normalization), plain convs,
    /// multi-grid (1, 2, 4), output stride 16: the usual PyTorch setting.
    pub fn resnet101_v3plus(num_classes: usize) -> Self {
        let mut rn = ResNetConfig::resnet101();
        rn.multi_grid = Some(vec![1, 2, 4]);
        Self::v3plus(
            BackboneConfig::ResNet(rn),
            num_classes,
            false,
            InputNormalization::ImageNet,
        )
    }

    /// The model-zoo MobileNetV2 DeepLabv3 (width 1.0, output stride 16): image pooling and the
    /// 1x1 branch only, no atrous branches, no decoder.
    pub fn mobilenetv2_v3(num_classes: usize) -> Self {
        let mut c = Self::v3(
            BackboneConfig::MobileNetV2(MobileNetV2Config::mobilenetv2_100()),
            num_classes,
            false,
            InputNormalization::Official,
        );
        c.aspp.atrous_rates.clear();
        c
    }

    /// MobileNetV2 (width 1.0, output stride 16) with the full DeepLabv3+ head: separable
    /// ASPP at 6/12/18 and the separable stride-4 decoder.
    pub fn mobilenetv2_v3plus(num_classes: usize) -> Self {
        Self::v3plus(
            BackboneConfig::MobileNetV2(MobileNetV2Config::mobilenetv2_100()),
            num_classes,
            true,
            InputNormalization::Official,
        )
    }

    /// The configured (training) output stride.
    pub fn output_stride(&self) -> OutputStride {
        self.backbone.output_stride()
    }

    /// The same model at another output stride: the backbone's strides become atrous rates and
    /// the ASPP rates scale by `old / new` (6/12/18 at 16 become 12/24/36 at 8). Weights are
    /// unchanged. Fails when a rate would not be a whole number.
    pub fn with_output_stride(&self, os: OutputStride) -> std::result::Result<Self, String> {
        let old = self.output_stride().value();
        let new = os.value();
        let rates = self
            .aspp
            .atrous_rates
            .iter()
            .map(|&r| {
                let scaled = r * old / new;
                if scaled * new == r * old {
                    Ok(scaled)
                } else {
                    Err(format!("atrous rate {r} at output stride {old} has no whole equivalent at output stride {new}"))
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut c = self.clone();
        c.backbone = c.backbone.with_output_stride(os);
        c.aspp.atrous_rates = rates;
        Ok(c)
    }

    /// The same model with multi-grid rates for the backbone's last block (DeepLabv3 §3.2,
    /// e.g. `[1, 2, 4]`; Xception and ResNet), or none. Weights are unchanged.
    pub fn with_multi_grid(
        &self,
        multi_grid: Option<Vec<usize>>,
    ) -> std::result::Result<Self, String> {
        let backbone = match self.backbone.clone() {
            BackboneConfig::Xception(x) => BackboneConfig::Xception(x.with_multi_grid(multi_grid)),
            BackboneConfig::ResNet(r) => BackboneConfig::ResNet(r.with_multi_grid(multi_grid)),
            BackboneConfig::MobileNetV2(_) if multi_grid.is_some() => {
                return Err("MobileNetV2 has no multi-grid".into());
            }
            b => b,
        };
        backbone.validate().map_err(|e| e.to_string())?;
        Ok(Self {
            backbone,
            ..self.clone()
        })
    }

    /// The configuration to evaluate with: [`DeepLabConfig::with_output_stride`] at
    /// `eval_output_stride` when set, otherwise unchanged.
    pub fn for_eval(&self) -> std::result::Result<Self, String> {
        match self.eval_output_stride {
            Some(os) if os != self.output_stride() => {
                let mut c = self.with_output_stride(os)?;
                c.eval_output_stride = None;
                Ok(c)
            }
            _ => Ok(self.clone()),
        }
    }

    /// Checks the configuration without building anything.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.backbone
            .validate()
            .map_err(|e| format!("backbone: {e}"))?;
        if self.num_classes == 0 {
            return Err("num_classes must be positive".into());
        }
        if self.aspp.channels == 0 {
            return Err("aspp.channels must be positive".into());
        }
        if self.aspp.atrous_rates.contains(&0) {
            return Err(format!(
                "aspp.atrous_rates {:?} must be positive",
                self.aspp.atrous_rates
            ));
        }
        if !(0.0..1.0).contains(&self.aspp.dropout) {
            return Err(format!(
                "aspp.dropout {} must be in [0, 1)",
                self.aspp.dropout
            ));
        }
        if let Some(d) = &self.decoder {
            if !(1..=3).contains(&d.num_convs) {
                return Err(format!(
                    "decoder.num_convs {} must be 1, 2 or 3",
                    d.num_convs
                ));
            }
            if d.channels == 0 || d.projection_channels == 0 {
                return Err("decoder channels must be positive".into());
            }
            if d.output_stride == 0 || d.output_stride >= self.output_stride().value() {
                return Err(format!(
                    "decoder.output_stride {} must be below the output stride {}",
                    d.output_stride,
                    self.output_stride()
                ));
            }
        }
        if !(self.head_bn_eps > 0.0 && self.head_bn_eps.is_finite()) {
            return Err(format!("head_bn_eps {} must be positive", self.head_bn_eps));
        }
        self.normalization.validate()?;
        Ok(())
    }

    /// JSON text of the configuration.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses and validates a configuration; `origin` names where the text came from.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let c: Self = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: origin.to_path_buf(),
            detail: e.to_string(),
        })?;
        c.validate().map_err(|detail| ModelError::Config {
            path: origin.to_path_buf(),
            detail,
        })?;
        Ok(c)
    }
}

/// The paper's ASPP rates (6, 12, 18 at output stride 16) at another output stride: doubled at
/// 8, halved at 32.
pub fn paper_rates(os: OutputStride) -> Vec<usize> {
    match os {
        OutputStride::Os8 => vec![12, 24, 36],
        OutputStride::Os16 => vec![6, 12, 18],
        OutputStride::Os32 => vec![3, 6, 9],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_roundtrip_and_validation() {
        for c in [
            DeepLabConfig::xception65_v3plus(21),
            DeepLabConfig::xception65_v3(21),
            DeepLabConfig::resnet101_beta_v3plus(21),
            DeepLabConfig::resnet101_v3plus(19),
            DeepLabConfig::mobilenetv2_v3(21),
            DeepLabConfig::mobilenetv2_v3plus(21),
        ] {
            c.validate().unwrap();
            let back = DeepLabConfig::from_json(&c.to_json(), Path::new("mem")).unwrap();
            assert_eq!(back, c);
        }
        let mut c = DeepLabConfig::xception65_v3plus(21);
        c.decoder.as_mut().unwrap().num_convs = 4;
        assert!(c.validate().unwrap_err().contains("num_convs"));
        let e = DeepLabConfig::from_json("{\"backbone\": 1}", Path::new("cfg.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg.json"), "{e}");
    }

    #[test]
    fn output_stride_scales_rates() {
        let c = DeepLabConfig::xception65_v3plus(21);
        let c8 = c.with_output_stride(OutputStride::Os8).unwrap();
        assert_eq!(c8.aspp.atrous_rates, vec![12, 24, 36]);
        assert_eq!(c8.output_stride(), OutputStride::Os8);
        let mut e = c.clone();
        e.eval_output_stride = Some(OutputStride::Os8);
        assert_eq!(e.for_eval().unwrap().aspp.atrous_rates, vec![12, 24, 36]);
        let mut odd = c.clone();
        odd.aspp.atrous_rates = vec![5];
        assert!(odd.with_output_stride(OutputStride::Os32).is_err());
        let mg = c.with_multi_grid(Some(vec![1, 2, 4])).unwrap();
        assert!(
            matches!(&mg.backbone, BackboneConfig::Xception(x) if x.multi_grid == Some(vec![1, 2, 4]))
        );
        assert!(c.with_multi_grid(Some(vec![1, 2])).is_err());
        assert!(DeepLabConfig::mobilenetv2_v3(21)
            .with_multi_grid(Some(vec![1, 2, 4]))
            .is_err());
    }

    #[test]
    fn normalization_values() {
        let (a, b) = InputNormalization::Official.scale_shift();
        assert!((0.0 * a[0] + b[0] + 1.0).abs() < 1e-7 && (255.0 * a[1] + b[1] - 1.0).abs() < 1e-6);
        let (a, b) = InputNormalization::ImageNet.scale_shift();
        assert!(((0.485 * 255.0) * a[0] + b[0]).abs() < 1e-6);
    }
}
