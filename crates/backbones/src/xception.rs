//! Modified Aligned Xception (Xception-41 / 65 / 71) with atrous output stride, the DeepLabv3+
//! encoder.
//!
//! Paper: Chen et al., DeepLabv3+ (ECCV 2018), Sec. 3.2 and Fig. 4 (deeper Xception, every
//! max-pooling replaced by a strided separable convolution, BatchNorm + ReLU after each 3x3
//! depthwise convolution in the exit flow), on Chollet's Xception (CVPR 2017) and MSRA's
//! Aligned Xception.
//!
//! Graph: tensorflow/models `research/deeplab/core/xception.py` (`xception_41/65/71`,
//! `xception_module`, `stack_blocks_dense`), checked against the official graph facts
//! (`reference/official/structure/A_xception65.graph_facts.txt`): stem `conv1_1` 3x3/32 stride 2
//! (fixed padding then VALID) and `conv1_2` 3x3/64, each conv + BN + ReLU; then units of three
//! separable convolutions where the stride is on the third one (fixed padding then VALID) and
//! the shortcut is a strided 1x1 conv + BN on the unit's input ('conv'), the input itself
//! ('sum') or absent ('none'). Every unit except exit block 2 applies ReLU to the input of each
//! separable convolution and none after its BatchNorms; exit block 2 applies ReLU after every
//! BatchNorm (depthwise and pointwise). BatchNorm epsilon 1e-3. The output stride is reached by
//! removing strides and multiplying the rate of the following units; multi-grid rates multiply
//! the rates of exit block 2's three separable convolutions. The low-level feature is the
//! pointwise BatchNorm output (no ReLU) of the second separable convolution of the unit that
//! goes from stride 4 to 8 (`entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise`
//! for Xception-41/65, `entry_flow/block3/...` for Xception-71); the final feature is exit
//! block 2's output after its last ReLU.
//!
//! Weight names: timm's `xception41/65/71` state dict (timm `xception_aligned.py`, whose
//! `xception65.tf_in1k` is the official DeepLab ImageNet checkpoint): `stem.{0,1}.{conv,bn}`,
//! `blocks.K.shortcut.{conv,bn}`, `blocks.K.stack.conv{1,2,3}.{conv_dw,bn_dw,conv_pw,bn_pw}`
//! (one `blocks.K` per unit: official `entry_flow/block1/unit_1` = `blocks.0`, the middle flow
//! units follow in order) and, with the classifier, `head.fc`.

use crate::common::{
    check_bn, check_hw, check_input, check_multi_grid, global_avg_pool, StrideTracker,
};
use crate::{Backbone, FeatureInfo, OutputStride};
use candle_core::{bail, Module, ModuleT, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use deeplab_ops::{
    Activation, BatchNormConfig, Conv2dGeometry, ConvBnAct, FoldBatchNorm, MacCounter,
    SeparableActivation, SeparableConv2d, SeparableConv2dConfig,
};
use serde::{Deserialize, Serialize};

/// The shortcut of an Xception unit (official `skip_connection_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XceptionSkip {
    /// 1x1 convolution (with the unit's stride) + BatchNorm on the input, added.
    Conv,
    /// The input itself, added (needs equal channels and stride 1).
    Sum,
    /// No shortcut.
    None,
}

/// Where an Xception unit applies ReLU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XceptionAct {
    /// ReLU on the input of each separable convolution, none after the BatchNorms (official
    /// `activation_fn_in_separable_conv=False`; timm `start_with_relu=True`).
    ReluFirst,
    /// ReLU after every BatchNorm (official `activation_fn_in_separable_conv=True`, exit
    /// block 2; timm `start_with_relu=False`).
    AfterEach,
}

/// One official Xception block: `units` identical units of three separable convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct XceptionBlockConfig {
    /// Input channels of the first unit.
    pub in_chs: usize,
    /// Output channels of the three separable convolutions.
    pub out_chs: [usize; 3],
    /// Stride of each unit (on its third separable convolution and its shortcut).
    pub stride: usize,
    /// Number of units.
    pub units: usize,
    /// Shortcut type.
    pub skip: XceptionSkip,
    /// ReLU placement.
    pub act: XceptionAct,
}

/// An Aligned Xception variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct XceptionConfig {
    /// Variant name (e.g. `xception65`).
    pub name: String,
    /// Entry, middle and exit flow blocks, in order.
    pub blocks: Vec<XceptionBlockConfig>,
    /// Output stride of the final feature.
    pub output_stride: OutputStride,
    /// Multi-grid rates of the last block's three separable convolutions (official
    /// `multi_grid`); `None` is (1, 1, 1).
    pub multi_grid: Option<Vec<usize>>,
    /// BatchNorm epsilon (1e-3).
    pub bn_eps: f64,
    /// BatchNorm momentum (PyTorch convention; 3e-4 = TF decay 0.9997).
    pub bn_momentum: f64,
    /// ImageNet classifier (`head.fc`) with this many classes, if any.
    pub classifier: Option<usize>,
}

fn block(
    in_chs: usize,
    out_chs: [usize; 3],
    stride: usize,
    units: usize,
    skip: XceptionSkip,
    act: XceptionAct,
) -> XceptionBlockConfig {
    XceptionBlockConfig {
        in_chs,
        out_chs,
        stride,
        units,
        skip,
        act,
    }
}

impl XceptionConfig {
    fn from_blocks(name: &str, blocks: Vec<XceptionBlockConfig>) -> Self {
        Self {
            name: name.into(),
            blocks,
            output_stride: OutputStride::Os16,
            multi_grid: None,
            bn_eps: 1e-3,
            bn_momentum: 3e-4,
            classifier: None,
        }
    }

    /// Xception-41 (official `xception_41`, timm `xception41`): 8 middle-flow units.
    #[rustfmt::skip]
    pub fn xception41() -> Self {
        use XceptionAct::*;
        use XceptionSkip::*;
        Self::from_blocks("xception41", vec![
            // entry flow          out chs        stride units skip  act
            block(64,   [128, 128, 128],    2, 1,  Conv, ReluFirst), // block1    blocks.0
            block(128,  [256, 256, 256],    2, 1,  Conv, ReluFirst), // block2    blocks.1 (low-level tap)
            block(256,  [728, 728, 728],    2, 1,  Conv, ReluFirst), // block3    blocks.2
            // middle flow
            block(728,  [728, 728, 728],    1, 8,  Sum,  ReluFirst), // block1    blocks.3..10
            // exit flow
            block(728,  [728, 1024, 1024],  2, 1,  Conv, ReluFirst), // block1    blocks.11
            block(1024, [1536, 1536, 2048], 1, 1,  None, AfterEach), // block2    blocks.12
        ])
    }

    /// Xception-65 (official `xception_65`, timm `xception65`): 16 middle-flow units, the
    /// paper's main backbone.
    #[rustfmt::skip]
    pub fn xception65() -> Self {
        use XceptionAct::*;
        use XceptionSkip::*;
        Self::from_blocks("xception65", vec![
            // entry flow          out chs        stride units skip  act
            block(64,   [128, 128, 128],    2, 1,  Conv, ReluFirst), // block1    blocks.0
            block(128,  [256, 256, 256],    2, 1,  Conv, ReluFirst), // block2    blocks.1 (low-level tap)
            block(256,  [728, 728, 728],    2, 1,  Conv, ReluFirst), // block3    blocks.2
            // middle flow
            block(728,  [728, 728, 728],    1, 16, Sum,  ReluFirst), // block1    blocks.3..18
            // exit flow
            block(728,  [728, 1024, 1024],  2, 1,  Conv, ReluFirst), // block1    blocks.19
            block(1024, [1536, 1536, 2048], 1, 1,  None, AfterEach), // block2    blocks.20
        ])
    }

    /// Xception-71 (official `xception_71`, timm `xception71`): two more entry-flow blocks.
    #[rustfmt::skip]
    pub fn xception71() -> Self {
        use XceptionAct::*;
        use XceptionSkip::*;
        Self::from_blocks("xception71", vec![
            // entry flow          out chs        stride units skip  act
            block(64,   [128, 128, 128],    2, 1,  Conv, ReluFirst), // block1    blocks.0
            block(128,  [256, 256, 256],    1, 1,  Conv, ReluFirst), // block2    blocks.1
            block(256,  [256, 256, 256],    2, 1,  Conv, ReluFirst), // block3    blocks.2 (low-level tap)
            block(256,  [728, 728, 728],    1, 1,  Conv, ReluFirst), // block4    blocks.3
            block(728,  [728, 728, 728],    2, 1,  Conv, ReluFirst), // block5    blocks.4
            // middle flow
            block(728,  [728, 728, 728],    1, 16, Sum,  ReluFirst), // block1    blocks.5..20
            // exit flow
            block(728,  [728, 1024, 1024],  2, 1,  Conv, ReluFirst), // block1    blocks.21
            block(1024, [1536, 1536, 2048], 1, 1,  None, AfterEach), // block2    blocks.22
        ])
    }

    /// The same config at another output stride.
    pub fn with_output_stride(self, output_stride: OutputStride) -> Self {
        Self {
            output_stride,
            ..self
        }
    }

    /// The same config with multi-grid rates for exit block 2 (e.g. `[1, 2, 4]`), or none.
    pub fn with_multi_grid(self, multi_grid: Option<Vec<usize>>) -> Self {
        Self { multi_grid, ..self }
    }

    /// The same config with (or without) the ImageNet classifier.
    pub fn with_classifier(self, classifier: Option<usize>) -> Self {
        Self { classifier, ..self }
    }

    /// The same config with another BatchNorm epsilon.
    pub fn with_bn_eps(self, bn_eps: f64) -> Self {
        Self { bn_eps, ..self }
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<()> {
        let what = &self.name;
        check_bn(self.bn_eps, self.bn_momentum, what)?;
        check_multi_grid(&self.multi_grid, 3, what)?;
        if self.blocks.is_empty() {
            bail!("{what}: no blocks")
        }
        let mut cin = 64;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.in_chs != cin {
                bail!(
                    "{what}: block {i} expects {} input channels, the previous block gives {cin}",
                    b.in_chs
                )
            }
            if b.units == 0 || b.stride == 0 || b.out_chs.contains(&0) {
                bail!("{what}: block {i} {b:?} has a zero field")
            }
            if b.units > 1 && b.in_chs != b.out_chs[2] {
                bail!(
                    "{what}: block {i} repeats units that change channels ({} -> {})",
                    b.in_chs,
                    b.out_chs[2]
                )
            }
            if b.skip == XceptionSkip::Sum && (b.in_chs != b.out_chs[2] || b.stride != 1) {
                bail!("{what}: block {i} has a 'sum' shortcut but changes shape")
            }
            cin = b.out_chs[2];
        }
        if self.classifier == Some(0) {
            bail!("{what}: a classifier needs at least one class")
        }
        Ok(())
    }
}

/// One Xception unit (timm `XceptionModule`, names `shortcut`, `stack.conv{1,2,3}`).
#[derive(Clone, Debug)]
struct Unit {
    convs: Vec<SeparableConv2d>,
    shortcut: Option<ConvBnAct>,
    skip: XceptionSkip,
}

impl Unit {
    /// Output and the second separable convolution's output (pointwise BN, before any ReLU).
    fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let a = self.convs[0].forward_t(x, train)?;
        let b = self.convs[1].forward_t(&a, train)?;
        // The shortcut is added in the last pointwise convolution's epilogue when folded.
        let y = match (self.skip, &self.shortcut) {
            (XceptionSkip::Conv, Some(s)) => {
                self.convs[2].forward_add(&b, &s.forward_t(x, train)?, train)?
            }
            (XceptionSkip::Sum, _) => self.convs[2].forward_add(&b, x, train)?,
            (XceptionSkip::None, _) => self.convs[2].forward_t(&b, train)?,
            (XceptionSkip::Conv, None) => bail!("xception unit: 'conv' shortcut missing"),
        };
        Ok((y, b))
    }

    fn fold_batch_norm(&mut self) -> Result<()> {
        for conv in &mut self.convs {
            conv.fold_batch_norm()?;
        }
        if let Some(s) = &mut self.shortcut {
            s.fold_batch_norm()?;
        }
        Ok(())
    }

    fn count(
        &self,
        input: (usize, usize),
        c: &mut MacCounter,
    ) -> Result<((usize, usize), (usize, usize))> {
        let a = self.convs[0].count(input, c)?;
        let b = self.convs[1].count(a, c)?;
        let out = self.convs[2].count(b, c)?;
        if let Some(s) = &self.shortcut {
            let so = s.count(input, c)?;
            if so != out {
                bail!("xception unit: shortcut {so:?} and residual {out:?} sizes differ for input {input:?}")
            }
        }
        Ok((out, b))
    }
}

/// Modified Aligned Xception backbone (see the module docs).
#[derive(Clone, Debug)]
pub struct Xception {
    config: XceptionConfig,
    stem: Vec<ConvBnAct>,
    units: Vec<Unit>,
    /// Index into `units` whose second separable convolution is the low-level feature.
    tap: usize,
    head: Option<Linear>,
    info: Vec<FeatureInfo>,
}

impl Xception {
    /// Builds the network of `config`, loading (or initializing) timm-named weights from `vb`.
    pub fn new(config: &XceptionConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let bn = BatchNormConfig {
            eps: config.bn_eps,
            momentum: config.bn_momentum,
        };
        let mut tracker = StrideTracker::new(1, config.output_stride.value());
        let (s, _) = tracker.unit(2)?;
        let stem = vec![
            ConvBnAct::new(
                3,
                32,
                3,
                Conv2dGeometry::deeplab(3, s, 1),
                bn,
                Activation::Relu,
                vb.pp("stem.0"),
            )?,
            ConvBnAct::new(
                32,
                64,
                3,
                Conv2dGeometry::deeplab(3, 1, 1),
                bn,
                Activation::Relu,
                vb.pp("stem.1"),
            )?,
        ];

        // First pass: (stride, rate) of every unit, so the multi-grid can use the final rate.
        let mut plan = Vec::new();
        let mut nominal = 2usize;
        let mut tap = None;
        for (bi, b) in config.blocks.iter().enumerate() {
            for _ in 0..b.units {
                if tap.is_none() && nominal == 4 && b.stride == 2 {
                    tap = Some(plan.len());
                }
                let (stride, rate) = tracker.unit(b.stride)?;
                nominal *= b.stride;
                plan.push((bi, stride, rate));
            }
        }
        tracker.finish()?;
        let Some(tap) = tap else {
            bail!(
                "{}: no unit goes from stride 4 to 8, no low-level feature",
                config.name
            )
        };
        let last_block = config.blocks.len() - 1;

        let mut units = Vec::with_capacity(plan.len());
        for (k, &(bi, stride, rate)) in plan.iter().enumerate() {
            let b = &config.blocks[bi];
            let vb_u = vb.pp(format!("blocks.{k}"));
            let act = match b.act {
                XceptionAct::ReluFirst => SeparableActivation::Input,
                XceptionAct::AfterEach => SeparableActivation::AfterEach(Activation::Relu),
            };
            let grid = match (&config.multi_grid, bi == last_block) {
                (Some(mg), true) => [mg[0], mg[1], mg[2]],
                _ => [1, 1, 1],
            };
            let mut convs = Vec::with_capacity(3);
            let mut cin = b.in_chs;
            for (i, (&cout, &g)) in b.out_chs.iter().zip(&grid).enumerate() {
                let s = if i == 2 { stride } else { 1 };
                let cfg = SeparableConv2dConfig {
                    kernel: 3,
                    geom: Conv2dGeometry::deeplab(3, s, rate * g),
                    act,
                    bn,
                };
                let name = format!("stack.conv{}", i + 1);
                convs.push(SeparableConv2d::new(cin, cout, &cfg, vb_u.pp(name))?);
                cin = cout;
            }
            let shortcut = match b.skip {
                XceptionSkip::Conv => Some(ConvBnAct::new(
                    b.in_chs,
                    b.out_chs[2],
                    1,
                    Conv2dGeometry::deeplab(1, stride, 1),
                    bn,
                    Activation::None,
                    vb_u.pp("shortcut"),
                )?),
                _ => None,
            };
            units.push(Unit {
                convs,
                shortcut,
                skip: b.skip,
            });
        }
        let last_ch = config.blocks[last_block].out_chs[2];
        let head = match config.classifier {
            Some(n) => Some(candle_nn::linear(last_ch, n, vb.pp("head.fc"))?),
            None => None,
        };
        let tap_ch = config.blocks[plan[tap].0].out_chs[1];
        let info = vec![
            FeatureInfo {
                channels: tap_ch,
                reduction: 4,
                module: format!("blocks.{tap}.stack.conv2.bn_pw"),
            },
            FeatureInfo {
                channels: last_ch,
                reduction: config.output_stride.value(),
                module: format!("blocks.{}", units.len() - 1),
            },
        ];
        Ok(Self {
            config: config.clone(),
            stem,
            units,
            tap,
            head,
            info,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &XceptionConfig {
        &self.config
    }

    /// ImageNet logits `[N, classes]` from the final feature (global pool, `head.fc`); fails
    /// when built without a classifier.
    pub fn forward_classifier(&self, final_feature: &Tensor) -> Result<Tensor> {
        let Some(fc) = &self.head else {
            bail!("{}: built without a classifier", self.config.name)
        };
        fc.forward(&global_avg_pool(final_feature)?)
    }

    fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<Vec<(usize, usize)>> {
        check_hw(input, &self.config.name)?;
        let mut s = input;
        for l in &self.stem {
            s = l.count(s, c)?;
        }
        let mut tap = s;
        for (i, u) in self.units.iter().enumerate() {
            let (out, mid) = u.count(s, c)?;
            if i == self.tap {
                tap = mid;
            }
            s = out;
        }
        Ok(vec![tap, s])
    }
}

impl FoldBatchNorm for Xception {
    fn fold_batch_norm(&mut self) -> Result<()> {
        for s in &mut self.stem {
            s.fold_batch_norm()?;
        }
        for u in &mut self.units {
            u.fold_batch_norm()?;
        }
        Ok(())
    }
}

impl Backbone for Xception {
    fn feature_info(&self) -> &[FeatureInfo] {
        &self.info
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(x, 3, &self.config.name)?;
        let mut x = x.clone();
        for l in &self.stem {
            x = l.forward_t(&x, train)?;
        }
        let mut low = None;
        for (i, u) in self.units.iter().enumerate() {
            let (y, mid) = u.forward(&x, train)?;
            if i == self.tap {
                low = Some(mid);
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

    #[test]
    fn configs_validate_and_reject_bad_tables() {
        for c in [
            XceptionConfig::xception41(),
            XceptionConfig::xception65(),
            XceptionConfig::xception71(),
        ] {
            c.validate().unwrap();
        }
        let mut bad = XceptionConfig::xception65();
        bad.blocks[1].in_chs = 100;
        assert!(bad.validate().is_err());
        let bad = XceptionConfig::xception65().with_multi_grid(Some(vec![1, 2]));
        assert!(bad.validate().is_err());
    }
}
