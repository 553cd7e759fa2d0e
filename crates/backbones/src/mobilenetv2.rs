//! MobileNetV2 with a width multiplier, ReLU6 and atrous output stride, as the DeepLab
//! encoder (no final 1x1/1280 convolution unless the classifier is requested).
//!
//! Paper: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR
//! 2018), Sec. 3-4 and Table 2; its use as the DeepLabv3 / DeepLabv3+ encoder in the DeepLab
//! model zoo (DeepLabv3+ paper, Sec. 3.1 for the output stride).
//!
//! Graph: slim `research/slim/nets/mobilenet/{mobilenet,mobilenet_v2,conv_blocks}.py` as called
//! by tensorflow/models `research/deeplab/core/feature_extractor.py` (`_mobilenet_v2`), checked
//! against the official graph facts (`reference/official/{D,E}_*/graph_facts.txt`): the stem
//! and the stride-2 depthwise convolutions use TensorFlow `SAME` padding (asymmetric, bottom /
//! right heavier, for even inputs; [`StridedPadding::TfSame`]), every stride-1 convolution is
//! `SAME` (symmetric), BatchNorm epsilon 1e-3, output stride by removing strides and
//! multiplying the rate of the following layers, the low-level tap is `expanded_conv_2`'s
//! depthwise output after ReLU6 (144 channels at width 1.0) and the final feature is
//! `expanded_conv_16/output` (320 channels, BatchNorm output, no activation).
//!
//! Weight names: timm's `mobilenetv2_100` / `mobilenetv2_050` state dict (timm
//! `_efficientnet_builder.py` / `_efficientnet_blocks.py`): `conv_stem`, `bn1`, then
//! `blocks.S.B.{conv_dw,bn1,conv_pw,bn2}` for the first (depthwise-separable) block and
//! `blocks.S.B.{conv_pw,bn1,conv_dw,bn2,conv_pwl,bn3}` for the inverted residuals; with the
//! classifier also `conv_head`, `bn2` and `classifier`. The official `expanded_conv_N` is timm's
//! N-th block in order (`expanded_conv` = `blocks.0.0`, `expanded_conv_2` = `blocks.1.1`,
//! `expanded_conv_16` = `blocks.6.0`).

use crate::common::{self, check_bn, check_hw, check_input, hw, tf_same_geometry, StrideTracker};
use crate::{Backbone, FeatureInfo, OutputStride};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use deeplab_ops::{
    conv2d, conv_bn, conv_bn_add, depthwise_conv2d, separable_epilogue, Activation, BatchNorm2d,
    BatchNormConfig, Conv2d, Conv2dGeometry, DepthwiseConv2d, DepthwisePart, Epilogue,
    FoldBatchNorm, MacCounter, TrainConv,
};
use serde::{Deserialize, Serialize};

/// How strided 3x3 convolutions are padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StridedPadding {
    /// TensorFlow `SAME`: output `ceil(n / stride)`, the odd pixel of padding at the bottom /
    /// right (the official DeepLab MobileNetV2 graph).
    TfSame,
    /// `fixed_padding` / PyTorch symmetric `k / 2` on every side (timm's training setting).
    /// Equal to `TfSame` for odd input sizes.
    Fixed,
}

/// One stage of inverted residual blocks (a row of the paper's Table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InvertedResidualStage {
    /// Expansion factor `t` of the first 1x1 convolution (1: a depthwise-separable block with
    /// no expansion, only allowed in the first stage).
    pub expansion: usize,
    /// Output channels `c` before the width multiplier.
    pub channels: usize,
    /// Number of blocks `n`.
    pub repeats: usize,
    /// Stride `s` of the first block.
    pub stride: usize,
}

/// A MobileNetV2 variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MobileNetV2Config {
    /// Variant name (e.g. `mobilenetv2_100`).
    pub name: String,
    /// Width (depth) multiplier applied to every output channel count.
    pub width: f64,
    /// Channels are rounded to a multiple of this ([`crate::make_divisible`]): 8 in timm and
    /// in the official code at width 1.0; 1 in the official DeepLab code at other widths.
    pub divisible_by: usize,
    /// Stem channels before the width multiplier (32).
    pub stem_channels: usize,
    /// The inverted-residual stages (paper Table 2).
    pub stages: Vec<InvertedResidualStage>,
    /// Channels of the final 1x1 convolution used only by the classifier (1280).
    pub head_channels: usize,
    /// Output stride of the final feature.
    pub output_stride: OutputStride,
    /// Padding of the strided convolutions.
    pub strided_padding: StridedPadding,
    /// BatchNorm epsilon (1e-3 as the official graph; timm's PyTorch weights were trained with
    /// 1e-5).
    pub bn_eps: f64,
    /// BatchNorm momentum (PyTorch convention; 3e-4 = TF decay 0.9997).
    pub bn_momentum: f64,
    /// ImageNet classifier (`conv_head`, `bn2`, `classifier`) with this many classes, if any.
    pub classifier: Option<usize>,
}

impl MobileNetV2Config {
    /// The paper's Table 2 (t, c, n, s), shared by every width.
    #[rustfmt::skip]
    pub fn paper_stages() -> Vec<InvertedResidualStage> {
        let s = |expansion, channels, repeats, stride| InvertedResidualStage { expansion, channels, repeats, stride };
        vec![
            //  t    c    n  s
            s(1,  16,  1, 1), // expanded_conv            blocks.0 (depthwise separable)
            s(6,  24,  2, 2), // expanded_conv_1..2        blocks.1 (low-level tap in .1)
            s(6,  32,  3, 2), // expanded_conv_3..5        blocks.2
            s(6,  64,  4, 2), // expanded_conv_6..9        blocks.3
            s(6,  96,  3, 1), // expanded_conv_10..12      blocks.4
            s(6, 160,  3, 2), // expanded_conv_13..15      blocks.5
            s(6, 320,  1, 1), // expanded_conv_16          blocks.6
        ]
    }

    /// MobileNetV2 at `width`, channels rounded to multiples of 8 (timm `mobilenetv2_*`,
    /// official at width 1.0), official DeepLab padding and BatchNorm epsilon, output stride
    /// 16, no classifier.
    pub fn with_width(width: f64) -> Self {
        Self {
            name: format!("mobilenetv2_{:03}", (width * 100.0).round() as usize),
            width,
            divisible_by: 8,
            stem_channels: 32,
            stages: Self::paper_stages(),
            head_channels: 1280,
            output_stride: OutputStride::Os16,
            strided_padding: StridedPadding::TfSame,
            bn_eps: 1e-3,
            bn_momentum: 3e-4,
            classifier: None,
        }
    }

    /// Width 1.0 (timm `mobilenetv2_100`; the official DeepLab `mobilenet_v2`).
    pub fn mobilenetv2_100() -> Self {
        Self::with_width(1.0)
    }

    /// Width 0.5 with timm's rounding (timm `mobilenetv2_050`: the 24-channel stage has 16).
    pub fn mobilenetv2_050() -> Self {
        Self::with_width(0.5)
    }

    /// Width 0.5 with the official DeepLab rounding (`divisible_by = 1`: the 24-channel stage
    /// has 12), the network of the published `deeplabv3_257_mv_gpu` model.
    pub fn mobilenetv2_050_deeplab() -> Self {
        Self {
            name: "mobilenetv2_050_deeplab".into(),
            divisible_by: 1,
            ..Self::with_width(0.5)
        }
    }

    /// The same config at another output stride.
    pub fn with_output_stride(self, output_stride: OutputStride) -> Self {
        Self {
            output_stride,
            ..self
        }
    }

    /// The same config with (or without) the ImageNet classifier.
    pub fn with_classifier(self, classifier: Option<usize>) -> Self {
        Self { classifier, ..self }
    }

    /// The same config with another strided-convolution padding.
    pub fn with_strided_padding(self, strided_padding: StridedPadding) -> Self {
        Self {
            strided_padding,
            ..self
        }
    }

    /// The same config with another BatchNorm epsilon.
    pub fn with_bn_eps(self, bn_eps: f64) -> Self {
        Self { bn_eps, ..self }
    }

    /// The same config with another channel divisor.
    pub fn with_divisible_by(self, divisible_by: usize) -> Self {
        Self {
            divisible_by,
            ..self
        }
    }

    /// Rounds a nominal channel count with the width multiplier.
    pub fn round_channels(&self, channels: usize) -> usize {
        common::make_divisible(channels as f64 * self.width, self.divisible_by)
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<()> {
        let what = &self.name;
        if !(self.width > 0.0 && self.width.is_finite()) {
            bail!(
                "{what}: width multiplier must be positive, got {}",
                self.width
            )
        }
        if self.divisible_by == 0 || self.stem_channels == 0 || self.head_channels == 0 {
            bail!("{what}: divisible_by, stem_channels and head_channels must be positive")
        }
        check_bn(self.bn_eps, self.bn_momentum, what)?;
        if self.stages.is_empty() {
            bail!("{what}: no stages")
        }
        for (i, s) in self.stages.iter().enumerate() {
            if s.channels == 0 || s.repeats == 0 || s.stride == 0 || s.expansion == 0 {
                bail!("{what}: stage {i} {s:?} has a zero field")
            }
            if s.expansion == 1 && (i != 0 || s.repeats != 1) {
                bail!("{what}: only the first stage may be a single block with expansion 1, stage {i} is {s:?}")
            }
        }
        if self.classifier == Some(0) {
            bail!("{what}: a classifier needs at least one class")
        }
        Ok(())
    }
}

/// A 3x3 (depthwise or dense) convolution whose padding may depend on the input size
/// (TensorFlow `SAME` at stride 2).
#[derive(Clone, Debug)]
struct PaddedConv {
    weight: Tensor,
    /// A folded BatchNorm (inference).
    epilogue: Option<Box<Epilogue>>,
    depthwise: bool,
    k: usize,
    stride: usize,
    dilation: usize,
    mode: StridedPadding,
}

impl PaddedConv {
    fn dense(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        mode: StridedPadding,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = Conv2d::new(
            cin,
            cout,
            k,
            Conv2dGeometry::deeplab(k, stride, 1),
            false,
            vb,
        )?;
        Ok(Self {
            weight: conv.weight().clone(),
            epilogue: None,
            depthwise: false,
            k,
            stride,
            dilation: 1,
            mode,
        })
    }

    fn depthwise(
        ch: usize,
        k: usize,
        stride: usize,
        dilation: usize,
        mode: StridedPadding,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = DepthwiseConv2d::new(ch, k, Conv2dGeometry::deeplab(k, stride, dilation), vb)?;
        Ok(Self {
            weight: conv.weight().clone(),
            epilogue: None,
            depthwise: true,
            k,
            stride,
            dilation,
            mode,
        })
    }

    fn geometry(&self, input: (usize, usize)) -> Conv2dGeometry {
        match self.mode {
            StridedPadding::TfSame if self.stride > 1 => {
                tf_same_geometry(input, self.k, self.stride, self.dilation)
            }
            _ => Conv2dGeometry::deeplab(self.k, self.stride, self.dilation),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.geometry(hw(x)?);
        if let Some(e) = &self.epilogue {
            return if self.depthwise {
                e.depthwise_conv2d(x, &self.weight, &g, false)
            } else {
                e.conv2d(x, &self.weight, &g)
            };
        }
        if self.depthwise {
            let detail = || {
                format!(
                    "{}x{} s{} d{} {}",
                    self.k,
                    self.k,
                    self.stride,
                    self.dilation,
                    deeplab_ops::profile::dims(x)
                )
            };
            deeplab_ops::profile::record("depthwise", detail, || {
                depthwise_conv2d(x, &self.weight, &g)
            })
        } else {
            deeplab_ops::profile::record_conv(["conv 1x1", "conv kxk"], x, &self.weight, &g, || {
                conv2d(x, &self.weight, None, &g, 1)
            })
        }
    }

    /// `bn(self(x))`: in training, on f32 CPU tensors, one autograd node (see
    /// [`BatchNorm2d::forward_after`]).
    fn forward_bn(&self, bn: &BatchNorm2d, x: &Tensor, train: bool) -> Result<Tensor> {
        let conv = if self.epilogue.is_none() {
            let geom = self.geometry(hw(x)?);
            let kind = if self.depthwise {
                TrainConv::Depthwise {
                    geom,
                    input_relu: false,
                }
            } else {
                TrainConv::Dense(geom)
            };
            Some((&self.weight, kind))
        } else {
            None
        };
        bn.forward_after(x, conv, |x| self.forward(x), train)
    }

    /// Folds the BatchNorm that follows into this convolution (inference).
    fn fold_bn(&mut self, bn: &mut BatchNorm2d) -> Result<()> {
        if self.epilogue.is_some() {
            bail!("mobilenetv2: a BatchNorm was already folded into this convolution")
        }
        self.epilogue = Some(Box::new(Epilogue::fold(bn, None)?));
        Ok(())
    }

    fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        let (cout, cin_g, kh, kw) = self.weight.dims4()?;
        let g = self.geometry(input);
        let out = g.output_size(input, (kh, kw))?;
        c.conv(out, (kh, kw), cin_g, cout, g.dilation);
        Ok(out)
    }
}

/// timm `DepthwiseSeparableConv`: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN.
#[derive(Clone, Debug)]
struct DsBlock {
    conv_dw: PaddedConv,
    bn1: BatchNorm2d,
    conv_pw: Conv2d,
    bn2: BatchNorm2d,
    skip: bool,
}

/// timm `InvertedResidual`: 1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1
/// project + BN, residual when the shape is kept.
#[derive(Clone, Debug)]
struct IrBlock {
    conv_pw: Conv2d,
    bn1: BatchNorm2d,
    conv_dw: PaddedConv,
    bn2: BatchNorm2d,
    conv_pwl: Conv2d,
    bn3: BatchNorm2d,
    skip: bool,
}

#[derive(Clone, Debug)]
enum Block {
    Ds(DsBlock),
    Ir(IrBlock),
}

impl Block {
    /// Output, and the depthwise activation when `tap` asks for it (the low-level feature).
    fn forward(&self, x: &Tensor, train: bool, tap: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (conv_dw, conv_pw, dw_input, skip) = match self {
            Block::Ds(b) => (&b.conv_dw, &b.conv_pw, x.clone(), b.skip),
            Block::Ir(b) => (
                &b.conv_dw,
                &b.conv_pwl,
                conv_bn(&b.conv_pw, &b.bn1, x, train)?,
                b.skip,
            ),
        };
        if let (Some(de), Some(pe), false, false) =
            (&conv_dw.epilogue, conv_pw.epilogue(), train, tap)
        {
            // Inference with the BatchNorms folded and no tap: the depthwise and pointwise
            // convolutions as one op (the same bits as in turn).
            let geom = conv_dw.geometry(hw(&dw_input)?);
            let dw = DepthwisePart {
                weight: &conv_dw.weight,
                epilogue: de,
                geom: &geom,
                input_relu: false,
            };
            let residual = skip.then_some((x, Activation::None));
            let y = separable_epilogue(&dw_input, dw, (conv_pw.weight(), pe), residual)?;
            return Ok((y, None));
        }
        match self {
            Block::Ds(b) => {
                let d = b.conv_dw.forward_bn(&b.bn1, x, train)?;
                let y = if b.skip {
                    conv_bn_add(&b.conv_pw, &b.bn2, &d, x, Activation::None, train)?
                } else {
                    conv_bn(&b.conv_pw, &b.bn2, &d, train)?
                };
                Ok((y, Some(d)))
            }
            Block::Ir(b) => {
                let d = b.conv_dw.forward_bn(&b.bn2, &dw_input, train)?;
                let y = if b.skip {
                    conv_bn_add(&b.conv_pwl, &b.bn3, &d, x, Activation::None, train)?
                } else {
                    conv_bn(&b.conv_pwl, &b.bn3, &d, train)?
                };
                Ok((y, Some(d)))
            }
        }
    }

    fn fold_batch_norm(&mut self) -> Result<()> {
        match self {
            Block::Ds(b) => {
                b.conv_dw.fold_bn(&mut b.bn1)?;
                b.conv_pw.fold_bn(&mut b.bn2)
            }
            Block::Ir(b) => {
                b.conv_pw.fold_bn(&mut b.bn1)?;
                b.conv_dw.fold_bn(&mut b.bn2)?;
                b.conv_pwl.fold_bn(&mut b.bn3)
            }
        }
    }

    fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        match self {
            Block::Ds(b) => {
                let s = b.conv_dw.count(input, c)?;
                b.conv_pw.count(s, c)
            }
            Block::Ir(b) => {
                let s = b.conv_pw.count(input, c)?;
                let s = b.conv_dw.count(s, c)?;
                b.conv_pwl.count(s, c)
            }
        }
    }
}

/// The optional ImageNet head: `conv_head` 1x1 + `bn2` + ReLU6, global pool, `classifier`.
#[derive(Clone, Debug)]
struct Head {
    conv_head: Conv2d,
    bn2: BatchNorm2d,
    classifier: Linear,
}

/// MobileNetV2 backbone (see the module docs).
#[derive(Clone, Debug)]
pub struct MobileNetV2 {
    config: MobileNetV2Config,
    conv_stem: PaddedConv,
    bn1: BatchNorm2d,
    blocks: Vec<Block>,
    /// Index into `blocks` whose depthwise output is the low-level feature.
    tap: usize,
    head: Option<Head>,
    info: Vec<FeatureInfo>,
}

impl MobileNetV2 {
    /// Builds the network of `config`, loading (or initializing) timm-named weights from `vb`.
    pub fn new(config: &MobileNetV2Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let bn = BatchNormConfig {
            eps: config.bn_eps,
            momentum: config.bn_momentum,
        };
        let pad = config.strided_padding;
        let mut tracker = StrideTracker::new(1, config.output_stride.value());
        let mut nominal = 1usize;

        let stem_ch = config.round_channels(config.stem_channels);
        let (stem_stride, _) = tracker.unit(2)?;
        nominal *= 2;
        let conv_stem = PaddedConv::dense(3, stem_ch, 3, stem_stride, pad, vb.pp("conv_stem"))?;
        let bn1 = BatchNorm2d::new(stem_ch, bn, vb.pp("bn1"))?.with_activation(Activation::Relu6);

        let mut blocks = Vec::new();
        let mut names = Vec::new();
        let mut tap = None;
        let mut cin = stem_ch;
        for (si, stage) in config.stages.iter().enumerate() {
            let cout = config.round_channels(stage.channels);
            for bi in 0..stage.repeats {
                let nominal_stride = if bi == 0 { stage.stride } else { 1 };
                let (stride, rate) = tracker.unit(nominal_stride)?;
                nominal *= nominal_stride;
                let vb_b = vb.pp(format!("blocks.{si}.{bi}"));
                let skip = stride == 1 && cin == cout;
                let (block, dw_name, dw_ch) = if stage.expansion == 1 {
                    let conv_dw =
                        PaddedConv::depthwise(cin, 3, stride, rate, pad, vb_b.pp("conv_dw"))?;
                    let bn1 = BatchNorm2d::new(cin, bn, vb_b.pp("bn1"))?
                        .with_activation(Activation::Relu6);
                    let conv_pw = Conv2d::new(
                        cin,
                        cout,
                        1,
                        Conv2dGeometry::default(),
                        false,
                        vb_b.pp("conv_pw"),
                    )?;
                    let bn2 = BatchNorm2d::new(cout, bn, vb_b.pp("bn2"))?;
                    (
                        Block::Ds(DsBlock {
                            conv_dw,
                            bn1,
                            conv_pw,
                            bn2,
                            skip,
                        }),
                        "bn1",
                        cin,
                    )
                } else {
                    // Expanded channels are always rounded to multiples of 8 (timm
                    // `make_divisible(in_chs * exp_ratio)`, slim `expand_input_by_factor`).
                    let mid = common::make_divisible((cin * stage.expansion) as f64, 8);
                    let conv_pw = Conv2d::new(
                        cin,
                        mid,
                        1,
                        Conv2dGeometry::default(),
                        false,
                        vb_b.pp("conv_pw"),
                    )?;
                    let bn1 = BatchNorm2d::new(mid, bn, vb_b.pp("bn1"))?
                        .with_activation(Activation::Relu6);
                    let conv_dw =
                        PaddedConv::depthwise(mid, 3, stride, rate, pad, vb_b.pp("conv_dw"))?;
                    let bn2 = BatchNorm2d::new(mid, bn, vb_b.pp("bn2"))?
                        .with_activation(Activation::Relu6);
                    let conv_pwl = Conv2d::new(
                        mid,
                        cout,
                        1,
                        Conv2dGeometry::default(),
                        false,
                        vb_b.pp("conv_pwl"),
                    )?;
                    let bn3 = BatchNorm2d::new(cout, bn, vb_b.pp("bn3"))?;
                    (
                        Block::Ir(IrBlock {
                            conv_pw,
                            bn1,
                            conv_dw,
                            bn2,
                            conv_pwl,
                            bn3,
                            skip,
                        }),
                        "bn2",
                        mid,
                    )
                };
                // The low-level tap is the depthwise output of the last block at stride 4.
                if nominal == 4 {
                    tap = Some((blocks.len(), format!("blocks.{si}.{bi}.{dw_name}"), dw_ch));
                }
                blocks.push(block);
                names.push(format!("blocks.{si}"));
                cin = cout;
            }
        }
        tracker.finish()?;
        let Some((tap, tap_name, tap_ch)) = tap else {
            bail!(
                "{}: no block runs at stride 4, so there is no low-level feature",
                config.name
            )
        };
        let head = match config.classifier {
            None => None,
            Some(n) => {
                let head_ch = if config.width > 1.0 {
                    config
                        .head_channels
                        .max(config.round_channels(config.head_channels))
                } else {
                    config.head_channels
                };
                let conv_head = Conv2d::new(
                    cin,
                    head_ch,
                    1,
                    Conv2dGeometry::default(),
                    false,
                    vb.pp("conv_head"),
                )?;
                let bn2 =
                    BatchNorm2d::new(head_ch, bn, vb.pp("bn2"))?.with_activation(Activation::Relu6);
                let classifier = candle_nn::linear(head_ch, n, vb.pp("classifier"))?;
                Some(Head {
                    conv_head,
                    bn2,
                    classifier,
                })
            }
        };
        let info = vec![
            FeatureInfo {
                channels: tap_ch,
                reduction: 4,
                module: tap_name,
            },
            FeatureInfo {
                channels: cin,
                reduction: config.output_stride.value(),
                module: names.last().cloned().unwrap_or_default(),
            },
        ];
        Ok(Self {
            config: config.clone(),
            conv_stem,
            bn1,
            blocks,
            tap,
            head,
            info,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &MobileNetV2Config {
        &self.config
    }

    /// ImageNet logits `[N, classes]` from the final feature (`conv_head`, `bn2`, ReLU6, global
    /// pool, `classifier`); fails when built without a classifier.
    pub fn forward_classifier(&self, final_feature: &Tensor, train: bool) -> Result<Tensor> {
        let Some(h) = &self.head else {
            bail!("{}: built without a classifier", self.config.name)
        };
        let x = conv_bn(&h.conv_head, &h.bn2, final_feature, train)?;
        h.classifier.forward(&common::global_avg_pool(&x)?)
    }

    fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<Vec<(usize, usize)>> {
        check_hw(input, &self.config.name)?;
        let mut s = self.conv_stem.count(input, c)?;
        let mut tap = s;
        for (i, b) in self.blocks.iter().enumerate() {
            s = b.count(s, c)?;
            if i == self.tap {
                tap = s;
            }
        }
        Ok(vec![tap, s])
    }
}

impl FoldBatchNorm for MobileNetV2 {
    fn fold_batch_norm(&mut self) -> Result<()> {
        self.conv_stem.fold_bn(&mut self.bn1)?;
        for b in &mut self.blocks {
            b.fold_batch_norm()?;
        }
        if let Some(h) = &mut self.head {
            h.conv_head.fold_bn(&mut h.bn2)?;
        }
        Ok(())
    }
}

impl Backbone for MobileNetV2 {
    fn feature_info(&self) -> &[FeatureInfo] {
        &self.info
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(x, 3, &self.config.name)?;
        let mut x = self.conv_stem.forward_bn(&self.bn1, x, train)?;
        let mut low = None;
        for (i, b) in self.blocks.iter().enumerate() {
            let (y, d) = b.forward(&x, train, i == self.tap)?;
            if i == self.tap {
                low = d;
            }
            x = y;
        }
        let Some(low) = low else {
            bail!("{}: low-level tap not reached", self.config.name)
        };
        Ok(vec![low, x])
    }

    fn count_macs(&self, input_hw: (usize, usize), c: &mut MacCounter) -> Result<()> {
        self.count(input_hw, c).map(|_| ())
    }

    fn feature_sizes(&self, input_hw: (usize, usize)) -> Result<Vec<(usize, usize)>> {
        self.count(input_hw, &mut MacCounter::new())
    }

    fn output_stride(&self) -> OutputStride {
        self.config.output_stride
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn channels_follow_the_two_rounding_rules() -> Result<()> {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let timm = MobileNetV2::new(&MobileNetV2Config::mobilenetv2_050(), vb.clone())?;
        assert_eq!(timm.feature_info()[0].channels, 96); // 16 * 6
        assert_eq!(timm.feature_info()[1].channels, 160);
        let official = MobileNetV2::new(&MobileNetV2Config::mobilenetv2_050_deeplab(), vb.clone())?;
        assert_eq!(official.feature_info()[0].channels, 72); // 12 * 6, as the TFLite model
        assert_eq!(official.feature_info()[0].module, "blocks.1.1.bn2");
        let full = MobileNetV2::new(&MobileNetV2Config::mobilenetv2_100(), vb)?;
        assert_eq!(full.feature_info()[0].channels, 144);
        assert_eq!(full.feature_info()[1].module, "blocks.6");
        Ok(())
    }

    #[test]
    fn tf_same_and_fixed_padding_differ_only_on_even_inputs() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = MobileNetV2Config::mobilenetv2_050().with_output_stride(OutputStride::Os32);
        let same = MobileNetV2::new(&cfg, vb.clone())?;
        let fixed = MobileNetV2::new(&cfg.clone().with_strided_padding(StridedPadding::Fixed), vb)?;
        let diff = |h: usize, w: usize| -> Result<f32> {
            let x = Tensor::randn(0f32, 1., (1, 3, h, w), &dev)?;
            let a = same.forward_features(&x, false)?;
            let b = fixed.forward_features(&x, false)?;
            (&a[1] - &b[1])?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()
        };
        assert_eq!(diff(33, 33)?, 0.0);
        assert!(diff(32, 32)? > 0.0);
        Ok(())
    }
}
