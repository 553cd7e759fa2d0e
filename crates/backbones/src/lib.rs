//! Aligned Xception, ResNet and MobileNetV2 backbones for DeepLab, with atrous output stride
//! 8 / 16 / 32 and the stride-4 low-level feature the DeepLabv3+ decoder needs.
//!
//! Paper: Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
//! Segmentation" (DeepLabv3+, ECCV 2018), Sec. 3.1 (atrous convolution and output stride) and
//! Sec. 3.2 (modified Aligned Xception); the ResNet-101 and MobileNetV2 encoders of the same
//! paper and of its official model zoo.
//!
//! Every backbone implements [`Backbone`]: it lists its taps in [`Backbone::feature_info`]
//! (channels and reduction: the low-level stride-4 feature first, then the final feature at
//! the output stride) and returns one tensor per tap from [`Backbone::forward_features`]. The
//! train flag reaches every BatchNorm. [`Backbone::count_macs`] counts multiply-adds with the
//! paper's convention (see [`deeplab_ops::MacCounter`]).
//!
//! The three families are plain configs fed to one builder each ([`XceptionConfig`],
//! [`ResNetConfig`], [`MobileNetV2Config`]); [`BackboneConfig`] is the serde-(de)serializable
//! closed set and [`build`] turns it into an [`AnyBackbone`]. Weight names are exactly timm's
//! state-dict names (`xception65.tf_in1k`, `resnet101.tv_in1k`, `mobilenetv2_100.ra_in1k`
//! load with no renaming); the classifier head is optional and absent by default. The
//! official DeepLab `resnet_v1_*_beta` variant uses timm's deep-stem names (see
//! [`resnet`]). [`official_variable`] maps the official TensorFlow variable names to these, for
//! converting official checkpoints.
//!
//! The graphs follow the official TensorFlow DeepLab implementation
//! (tensorflow/models `research/deeplab/core/{xception,resnet_v1_beta,feature_extractor}.py`
//! and slim's `nets/mobilenet/mobilenet_v2.py`): strided convolutions pad explicitly
//! (`fixed_padding`) then run `VALID`, except MobileNetV2 whose strided convolutions use
//! TensorFlow `SAME` padding (asymmetric for even inputs); stride-1 convolutions, dilated or
//! not, are `SAME`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use deeplab_backbones::{build, Backbone, BackboneConfig, MobileNetV2Config, OutputStride};
//!
//! let config = BackboneConfig::MobileNetV2(
//!     MobileNetV2Config::mobilenetv2_100().with_output_stride(OutputStride::Os16),
//! );
//! let backbone = build(&config, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
//! let x = Tensor::zeros((1, 3, 65, 65), DType::F32, &Device::Cpu)?;
//! let features = backbone.forward_features(&x, false)?;
//! // The low-level tap at stride 4 (144 channels) and the final feature at stride 16.
//! assert_eq!(backbone.feature_info()[0].reduction, 4);
//! assert_eq!(features[0].dims(), &[1, 144, 17, 17]);
//! assert_eq!(features[1].dims(), &[1, 320, 5, 5]);
//! # Ok::<(), candle_core::Error>(())
//! ```
#![deny(missing_docs)]

mod common;
pub mod mobilenetv2;
pub mod official;
pub mod resnet;
pub mod xception;

use candle_core::{bail, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use deeplab_ops::MacCounter;
use serde::{Deserialize, Serialize};

pub use common::make_divisible;
pub use mobilenetv2::{InvertedResidualStage, MobileNetV2, MobileNetV2Config, StridedPadding};
pub use official::{official_variable, TfLayout, TfVariable};
pub use resnet::{ResNet, ResNetConfig, ResNetStyle};
pub use xception::{Xception, XceptionAct, XceptionBlockConfig, XceptionConfig, XceptionSkip};

/// The ratio of input to final-feature resolution, set by turning strides into atrous rates.
///
/// Serialized as the plain number (8, 16 or 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "usize", into = "usize")]
pub enum OutputStride {
    /// Stride 8: the last two downsamplings become atrous (the paper's evaluation setting).
    Os8,
    /// Stride 16: the last downsampling becomes atrous (the paper's training setting).
    Os16,
    /// Stride 32: the network's nominal stride, no atrous convolution.
    Os32,
}

impl OutputStride {
    /// The stride as a number.
    pub fn value(self) -> usize {
        match self {
            OutputStride::Os8 => 8,
            OutputStride::Os16 => 16,
            OutputStride::Os32 => 32,
        }
    }

    /// Parses 8, 16 or 32.
    pub fn new(value: usize) -> Result<Self> {
        match value {
            8 => Ok(OutputStride::Os8),
            16 => Ok(OutputStride::Os16),
            32 => Ok(OutputStride::Os32),
            v => bail!("output stride must be 8, 16 or 32, got {v}"),
        }
    }
}

impl TryFrom<usize> for OutputStride {
    type Error = candle_core::Error;
    fn try_from(value: usize) -> Result<Self> {
        Self::new(value)
    }
}

impl From<OutputStride> for usize {
    fn from(os: OutputStride) -> usize {
        os.value()
    }
}

impl std::fmt::Display for OutputStride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.value())
    }
}

/// One feature a backbone returns: its channels, its reduction (input size / feature size,
/// nominally) and the timm-style module path it is taken from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FeatureInfo {
    /// Number of channels.
    pub channels: usize,
    /// Nominal stride relative to the input (4 for the low-level tap, the output stride for the
    /// final feature).
    pub reduction: usize,
    /// Where the feature is taken, as a module path in the weight-name scheme (e.g.
    /// `blocks.1.stack.conv2.bn_pw`).
    pub module: String,
}

/// A feature extractor for DeepLab.
pub trait Backbone {
    /// The taps [`Backbone::forward_features`] returns, in order: the stride-4 low-level
    /// feature, then the final feature at the output stride.
    fn feature_info(&self) -> &[FeatureInfo];

    /// Runs the backbone on an NCHW batch (normalized as the weights expect) and returns one
    /// tensor per [`Backbone::feature_info`] entry. `train` selects batch statistics (and
    /// running-statistic updates) in every BatchNorm.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>>;

    /// Adds the multiply-adds of every convolution of the backbone (shortcuts included, the
    /// optional classifier excluded) for an `input_hw` image to `c`.
    fn count_macs(&self, input_hw: (usize, usize), c: &mut MacCounter) -> Result<()>;

    /// The spatial size of each feature for an `input_hw` image, without running the network.
    fn feature_sizes(&self, input_hw: (usize, usize)) -> Result<Vec<(usize, usize)>>;

    /// The output stride the backbone was built with.
    fn output_stride(&self) -> OutputStride;

    /// The index of the feature at `reduction` in [`Backbone::feature_info`] (and in
    /// [`Backbone::forward_features`]'s result); an error naming the available reductions when
    /// there is none.
    fn feature_index(&self, reduction: usize) -> Result<usize> {
        let info = self.feature_info();
        match info.iter().position(|i| i.reduction == reduction) {
            Some(i) => Ok(i),
            None => {
                let have: Vec<usize> = info.iter().map(|i| i.reduction).collect();
                bail!("no backbone feature at reduction {reduction}; available: {have:?}")
            }
        }
    }
}

/// The configuration of any backbone of this crate; serializes to JSON with a `family` tag,
/// e.g. `{"family":"xception","name":"xception65",...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum BackboneConfig {
    /// Modified Aligned Xception.
    Xception(XceptionConfig),
    /// ResNet (timm / torchvision or official v1-beta).
    #[serde(rename = "resnet")]
    ResNet(ResNetConfig),
    /// MobileNetV2.
    #[serde(rename = "mobilenetv2")]
    MobileNetV2(MobileNetV2Config),
}

impl BackboneConfig {
    /// The named variants: `xception41`, `xception65`, `xception71`, `resnet50`, `resnet101`,
    /// `resnet50_beta`, `resnet101_beta`, `mobilenetv2_100`, `mobilenetv2_050` and
    /// `mobilenetv2_050_deeplab` (the official DeepLab channel rounding at width 0.5), at
    /// output stride 16 with no classifier.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "xception41" => Self::Xception(XceptionConfig::xception41()),
            "xception65" => Self::Xception(XceptionConfig::xception65()),
            "xception71" => Self::Xception(XceptionConfig::xception71()),
            "resnet50" => Self::ResNet(ResNetConfig::resnet50()),
            "resnet101" => Self::ResNet(ResNetConfig::resnet101()),
            "resnet50_beta" => Self::ResNet(ResNetConfig::resnet50_beta()),
            "resnet101_beta" => Self::ResNet(ResNetConfig::resnet101_beta()),
            "mobilenetv2_100" => Self::MobileNetV2(MobileNetV2Config::mobilenetv2_100()),
            "mobilenetv2_050" => Self::MobileNetV2(MobileNetV2Config::mobilenetv2_050()),
            "mobilenetv2_050_deeplab" => {
                Self::MobileNetV2(MobileNetV2Config::mobilenetv2_050_deeplab())
            }
            other => bail!(
                "unknown backbone {other:?}; known: {}",
                Self::NAMES.join(", ")
            ),
        })
    }

    /// The backbone of an official DeepLab `model_variant` (`xception_41/65/71`,
    /// `resnet_v1_50_beta`, `resnet_v1_101_beta`, `mobilenet_v2`) with its `depth_multiplier`
    /// (MobileNetV2 only; the official code rounds channels to multiples of 8 at 1.0 and does
    /// not round at other multipliers), at output stride 16, no multi-grid, no classifier.
    pub fn from_official_variant(model_variant: &str, depth_multiplier: f64) -> Result<Self> {
        if model_variant != "mobilenet_v2" && depth_multiplier != 1.0 {
            bail!("{model_variant}: depth_multiplier {depth_multiplier} is only supported for mobilenet_v2")
        }
        Ok(match model_variant {
            "xception_41" => Self::Xception(XceptionConfig::xception41()),
            "xception_65" => Self::Xception(XceptionConfig::xception65()),
            "xception_71" => Self::Xception(XceptionConfig::xception71()),
            "resnet_v1_50_beta" => Self::ResNet(ResNetConfig::resnet50_beta()),
            "resnet_v1_101_beta" => Self::ResNet(ResNetConfig::resnet101_beta()),
            "mobilenet_v2" if depth_multiplier == 1.0 => Self::MobileNetV2(MobileNetV2Config::mobilenetv2_100()),
            "mobilenet_v2" => {
                let c = MobileNetV2Config::with_width(depth_multiplier).with_divisible_by(1);
                Self::MobileNetV2(MobileNetV2Config { name: format!("{}_deeplab", c.name), ..c })
            }
            other => bail!(
                "official model_variant {other:?} is not supported (xception_41/65/71, resnet_v1_50_beta, \
                 resnet_v1_101_beta, mobilenet_v2)"
            ),
        })
    }

    /// Every name [`BackboneConfig::from_name`] accepts.
    pub const NAMES: &'static [&'static str] = &[
        "xception41",
        "xception65",
        "xception71",
        "resnet50",
        "resnet101",
        "resnet50_beta",
        "resnet101_beta",
        "mobilenetv2_100",
        "mobilenetv2_050",
        "mobilenetv2_050_deeplab",
    ];

    /// The variant's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Xception(c) => &c.name,
            Self::ResNet(c) => &c.name,
            Self::MobileNetV2(c) => &c.name,
        }
    }

    /// The configured output stride.
    pub fn output_stride(&self) -> OutputStride {
        match self {
            Self::Xception(c) => c.output_stride,
            Self::ResNet(c) => c.output_stride,
            Self::MobileNetV2(c) => c.output_stride,
        }
    }

    /// The same config at another output stride.
    pub fn with_output_stride(self, os: OutputStride) -> Self {
        match self {
            Self::Xception(c) => Self::Xception(c.with_output_stride(os)),
            Self::ResNet(c) => Self::ResNet(c.with_output_stride(os)),
            Self::MobileNetV2(c) => Self::MobileNetV2(c.with_output_stride(os)),
        }
    }

    /// The same config with multi-grid rates (Xception: exit block 2's three separable
    /// convolutions; ResNet: the last layer's units), or none. MobileNetV2 has no multi-grid.
    pub fn with_multi_grid(self, multi_grid: Option<Vec<usize>>) -> Result<Self> {
        Ok(match self {
            Self::Xception(c) => Self::Xception(c.with_multi_grid(multi_grid)),
            Self::ResNet(c) => Self::ResNet(c.with_multi_grid(multi_grid)),
            Self::MobileNetV2(c) if multi_grid.is_none() => Self::MobileNetV2(c),
            Self::MobileNetV2(c) => bail!("{}: MobileNetV2 has no multi-grid", c.name),
        })
    }

    /// The same config with an ImageNet-style classifier of `num_classes` (timm's head names),
    /// or none.
    pub fn with_classifier(self, num_classes: Option<usize>) -> Self {
        match self {
            Self::Xception(c) => Self::Xception(c.with_classifier(num_classes)),
            Self::ResNet(c) => Self::ResNet(c.with_classifier(num_classes)),
            Self::MobileNetV2(c) => Self::MobileNetV2(c.with_classifier(num_classes)),
        }
    }

    /// Checks the config without building anything.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Xception(c) => c.validate(),
            Self::ResNet(c) => c.validate(),
            Self::MobileNetV2(c) => c.validate(),
        }
    }

    /// Builds the backbone, loading (or initializing) its weights from `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<AnyBackbone> {
        build(self, vb)
    }
}

/// Any backbone of this crate (enum dispatch over the closed set).
#[derive(Clone, Debug)]
pub enum AnyBackbone {
    /// Modified Aligned Xception.
    Xception(Xception),
    /// ResNet.
    ResNet(ResNet),
    /// MobileNetV2.
    MobileNetV2(MobileNetV2),
}

/// Builds the backbone `config` describes, loading (or initializing) its weights from `vb`
/// under the timm names (no prefix: pass `vb.pp("backbone")` from a model).
pub fn build(config: &BackboneConfig, vb: VarBuilder) -> Result<AnyBackbone> {
    Ok(match config {
        BackboneConfig::Xception(c) => AnyBackbone::Xception(Xception::new(c, vb)?),
        BackboneConfig::ResNet(c) => AnyBackbone::ResNet(ResNet::new(c, vb)?),
        BackboneConfig::MobileNetV2(c) => AnyBackbone::MobileNetV2(MobileNetV2::new(c, vb)?),
    })
}

impl AnyBackbone {
    /// The configuration it was built from.
    pub fn config(&self) -> BackboneConfig {
        match self {
            Self::Xception(b) => BackboneConfig::Xception(b.config().clone()),
            Self::ResNet(b) => BackboneConfig::ResNet(b.config().clone()),
            Self::MobileNetV2(b) => BackboneConfig::MobileNetV2(b.config().clone()),
        }
    }

    /// ImageNet logits from the final feature (requires a config built with a classifier;
    /// meaningful at output stride 32, the stride the classifiers were trained at).
    pub fn forward_classifier(&self, final_feature: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Xception(b) => b.forward_classifier(final_feature),
            Self::ResNet(b) => b.forward_classifier(final_feature),
            Self::MobileNetV2(b) => b.forward_classifier(final_feature, train),
        }
    }
}

impl deeplab_ops::FoldBatchNorm for AnyBackbone {
    fn fold_batch_norm(&mut self) -> Result<()> {
        match self {
            Self::Xception(b) => b.fold_batch_norm(),
            Self::ResNet(b) => b.fold_batch_norm(),
            Self::MobileNetV2(b) => b.fold_batch_norm(),
        }
    }
}

impl Backbone for AnyBackbone {
    fn feature_info(&self) -> &[FeatureInfo] {
        match self {
            Self::Xception(b) => b.feature_info(),
            Self::ResNet(b) => b.feature_info(),
            Self::MobileNetV2(b) => b.feature_info(),
        }
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        match self {
            Self::Xception(b) => b.forward_features(x, train),
            Self::ResNet(b) => b.forward_features(x, train),
            Self::MobileNetV2(b) => b.forward_features(x, train),
        }
    }

    fn count_macs(&self, input_hw: (usize, usize), c: &mut MacCounter) -> Result<()> {
        match self {
            Self::Xception(b) => b.count_macs(input_hw, c),
            Self::ResNet(b) => b.count_macs(input_hw, c),
            Self::MobileNetV2(b) => b.count_macs(input_hw, c),
        }
    }

    fn feature_sizes(&self, input_hw: (usize, usize)) -> Result<Vec<(usize, usize)>> {
        match self {
            Self::Xception(b) => b.feature_sizes(input_hw),
            Self::ResNet(b) => b.feature_sizes(input_hw),
            Self::MobileNetV2(b) => b.feature_sizes(input_hw),
        }
    }

    fn output_stride(&self) -> OutputStride {
        match self {
            Self::Xception(b) => b.output_stride(),
            Self::ResNet(b) => b.output_stride(),
            Self::MobileNetV2(b) => b.output_stride(),
        }
    }
}

/// `ModuleT` for every backbone: the final feature (the last [`Backbone::forward_features`]
/// entry), the train flag passed to every BatchNorm.
macro_rules! module_t_final_feature {
    ($($t:ty),*) => {$(
        impl ModuleT for $t {
            fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
                match self.forward_features(x, train)?.pop() {
                    Some(f) => Ok(f),
                    None => bail!("backbone returned no feature"),
                }
            }
        }
    )*};
}

module_t_final_feature!(Xception, ResNet, MobileNetV2, AnyBackbone);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_stride_round_trips_as_a_number() {
        for os in [OutputStride::Os8, OutputStride::Os16, OutputStride::Os32] {
            assert_eq!(OutputStride::new(os.value()).unwrap(), os);
        }
        assert!(OutputStride::new(4).is_err());
        assert!(OutputStride::try_from(12usize).is_err());
    }

    #[test]
    fn every_name_builds_a_valid_config() {
        for name in BackboneConfig::NAMES {
            let c = BackboneConfig::from_name(name).unwrap();
            assert_eq!(c.name(), *name);
            c.validate().unwrap();
            assert_eq!(c.output_stride(), OutputStride::Os16);
        }
        assert!(BackboneConfig::from_name("vgg16").is_err());
    }

    #[test]
    fn official_variants_map_to_configs() {
        let c = BackboneConfig::from_official_variant("mobilenet_v2", 0.5).unwrap();
        assert_eq!(
            c,
            BackboneConfig::from_name("mobilenetv2_050_deeplab").unwrap()
        );
        let c = BackboneConfig::from_official_variant("resnet_v1_101_beta", 1.0).unwrap();
        assert_eq!(c.name(), "resnet101_beta");
        assert!(BackboneConfig::from_official_variant("resnet_v1_101", 1.0).is_err());
        assert!(BackboneConfig::from_official_variant("xception_65", 0.5).is_err());
        let mg = c.with_multi_grid(Some(vec![1, 2, 4])).unwrap();
        assert!(mg.validate().is_ok());
        let m = BackboneConfig::from_name("mobilenetv2_100").unwrap();
        assert!(m.with_multi_grid(Some(vec![1, 2, 4])).is_err());
    }
}
