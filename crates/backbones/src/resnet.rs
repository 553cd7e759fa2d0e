//! ResNet-50 / 101 bottleneck networks with atrous output stride and multi-grid: timm /
//! torchvision's ResNet and the official DeepLab `resnet_v1_*_beta`, as configs of one builder.
//!
//! Paper: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Table 1;
//! DeepLabv3 (Chen et al. 2017) Sec. 3.2 / 4.1 for the output stride and multi-grid, and the
//! DeepLabv3+ paper (Sec. 4.2) for the ResNet-101 encoder with a decoder.
//!
//! Two styles ([`ResNetStyle`]):
//! - `Torchvision` follows timm `resnet.py` (= torchvision `resnet.py`): 7x7/64 stride-2 stem,
//!   3x3 stride-2 max-pool (padding 1), the stride of each layer on the 3x3 conv of its first
//!   unit, 1x1 conv + BN downsample on the first unit; output stride as timm's
//!   `make_blocks` (the first unit of a dilated layer keeps the previous rate); BatchNorm
//!   epsilon 1e-5; low-level feature = `layer1` output.
//! - `V1Beta` follows tensorflow/models `research/deeplab/core/resnet_v1_beta.py`
//!   (`resnet_v1_50_beta` / `resnet_v1_101_beta`, `root_block_fn_for_beta_variant`,
//!   `bottleneck`) and slim `resnet_utils.stack_blocks_dense`, checked against
//!   `reference/official/structure/C_resnet101beta.graph_facts.txt`: deep stem `conv1_1` 3x3/64
//!   stride 2 (fixed padding then VALID), `conv1_2` 3x3/64, `conv1_3` 3x3/128 (each conv + BN +
//!   ReLU), 3x3 stride-2 max-pool with TensorFlow `SAME` padding, the stride of blocks 1-3 on
//!   the 3x3 conv (fixed padding then VALID) of their LAST unit whose shortcut is then a
//!   stride-2 subsampling of the input (1x1 max-pool), a 1x1 conv + BN shortcut where the
//!   channels change, BatchNorm epsilon 1e-5; the low-level feature is the BatchNorm output of
//!   `block1/unit_2/bottleneck_v1/conv3` before the residual add.
//!
//! Both: every bottleneck is conv1 1x1 + BN + ReLU, conv2 3x3 (stride, rate) + BN + ReLU, conv3
//! 1x1 + BN, then ReLU(shortcut + residual); the final feature is the last layer's output.
//! Multi-grid rates (DeepLabv3's (1, 2, 4)) multiply the final rate for the units of the last
//! layer (official `unit_rate`: at output stride 16 the three units of block 4 get rates 2, 4,
//! 8); without multi-grid the torchvision style keeps timm's rule exactly.
//!
//! Weight names (timm / torchvision): `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2,
//! conv3,bn3}`, `layer{1..4}.0.downsample.{0,1}` and, with the classifier, `fc`. The beta
//! variant uses timm's deep-stem names (as in timm's `resnet50d`) for its stem:
//! `conv1.0` = `conv1_1`, `conv1.1` = its BN, `conv1.3` = `conv1_2`, `conv1.4` = its BN,
//! `conv1.6` = `conv1_3`, `bn1` = its BN (`conv1.2`/`conv1.5` are the ReLUs, parameter-free);
//! official `blockB/unit_U/bottleneck_v1/{conv1,conv2,conv3,shortcut}` map to
//! `layerB.(U-1).{conv1/bn1,conv2/bn2,conv3/bn3,downsample.0/downsample.1}`.

use crate::common::{
    check_bn, check_hw, check_input, check_multi_grid, global_avg_pool, hw, tf_same_geometry,
    StrideTracker,
};
use crate::{Backbone, FeatureInfo, OutputStride};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use deeplab_ops::{
    conv_bn, conv_bn_add, max_pool2d, Activation, BatchNorm2d, BatchNormConfig, Conv2d,
    Conv2dGeometry, FoldBatchNorm, MacCounter, Padding2d,
};
use serde::{Deserialize, Serialize};

/// Which ResNet graph to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResNetStyle {
    /// timm / torchvision ResNet (7x7 stem, stride on the first unit of each layer).
    Torchvision,
    /// Official DeepLab `resnet_v1_*_beta` (three 3x3 stem convs, stride on the last unit).
    V1Beta,
}

/// A ResNet variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Variant name (e.g. `resnet101`).
    pub name: String,
    /// Units per layer (`[3, 4, 23, 3]` for ResNet-101).
    pub layers: Vec<usize>,
    /// Graph style.
    pub style: ResNetStyle,
    /// Output stride of the final feature.
    pub output_stride: OutputStride,
    /// Multi-grid rates of the last layer's units (e.g. `[1, 2, 4]`); `None` is no multi-grid.
    pub multi_grid: Option<Vec<usize>>,
    /// BatchNorm epsilon (1e-5).
    pub bn_eps: f64,
    /// BatchNorm momentum (PyTorch convention; 3e-4 = TF decay 0.9997).
    pub bn_momentum: f64,
    /// ImageNet classifier (`fc`) with this many classes, if any.
    pub classifier: Option<usize>,
}

impl ResNetConfig {
    fn new(name: &str, layers: [usize; 4], style: ResNetStyle) -> Self {
        Self {
            name: name.into(),
            layers: layers.to_vec(),
            style,
            output_stride: OutputStride::Os16,
            multi_grid: None,
            bn_eps: 1e-5,
            bn_momentum: 3e-4,
            classifier: None,
        }
    }

    /// ResNet-50 (timm `resnet50`, torchvision semantics).
    pub fn resnet50() -> Self {
        Self::new("resnet50", [3, 4, 6, 3], ResNetStyle::Torchvision)
    }

    /// ResNet-101 (timm `resnet101`, torchvision semantics).
    pub fn resnet101() -> Self {
        Self::new("resnet101", [3, 4, 23, 3], ResNetStyle::Torchvision)
    }

    /// Official DeepLab `resnet_v1_50_beta`.
    pub fn resnet50_beta() -> Self {
        Self::new("resnet50_beta", [3, 4, 6, 3], ResNetStyle::V1Beta)
    }

    /// Official DeepLab `resnet_v1_101_beta`.
    pub fn resnet101_beta() -> Self {
        Self::new("resnet101_beta", [3, 4, 23, 3], ResNetStyle::V1Beta)
    }

    /// The same config at another output stride.
    pub fn with_output_stride(self, output_stride: OutputStride) -> Self {
        Self {
            output_stride,
            ..self
        }
    }

    /// The same config with multi-grid rates for the last layer (e.g. `[1, 2, 4]`), or none.
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
        if self.layers.len() != 4 || self.layers.contains(&0) {
            bail!(
                "{what}: layers must be four positive unit counts, got {:?}",
                self.layers
            )
        }
        if self.style == ResNetStyle::V1Beta && self.layers[0] < 2 {
            bail!("{what}: the beta low-level feature needs at least 2 units in layer1")
        }
        check_multi_grid(&self.multi_grid, self.layers[3], what)?;
        if self.classifier == Some(0) {
            bail!("{what}: a classifier needs at least one class")
        }
        Ok(())
    }
}

/// How a bottleneck's input reaches the residual add.
#[derive(Clone, Debug)]
enum Shortcut {
    Identity,
    /// `downsample.0` (1x1 conv, stride) + `downsample.1` (BN).
    Conv(Conv2d, BatchNorm2d),
    /// Official `resnet_utils.subsample`: every `stride`-th pixel (1x1 max-pool).
    Subsample(usize),
}

/// A bottleneck unit (timm `Bottleneck` names).
#[derive(Clone, Debug)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    shortcut: Shortcut,
}

impl Bottleneck {
    /// Output and, with `keep_pre`, the residual branch before the add (conv3's BN output);
    /// without it, in inference with the BatchNorms folded, the add and the ReLU run in
    /// conv3's epilogue.
    fn forward(&self, x: &Tensor, train: bool, keep_pre: bool) -> Result<(Tensor, Option<Tensor>)> {
        let y = conv_bn(&self.conv1, &self.bn1, x, train)?;
        let y = conv_bn(&self.conv2, &self.bn2, &y, train)?;
        let sc = match &self.shortcut {
            Shortcut::Identity => x.clone(),
            Shortcut::Conv(c, b) => conv_bn(c, b, x, train)?,
            Shortcut::Subsample(s) => {
                let g = Conv2dGeometry {
                    stride: (*s, *s),
                    dilation: (1, 1),
                    padding: Padding2d::ZERO,
                };
                max_pool2d(x, (1, 1), &g)?
            }
        };
        if keep_pre {
            let pre = conv_bn(&self.conv3, &self.bn3, &y, train)?;
            let out = Activation::Relu.apply(&(&pre + sc)?)?;
            return Ok((out, Some(pre)));
        }
        let out = conv_bn_add(&self.conv3, &self.bn3, &y, &sc, Activation::Relu, train)?;
        Ok((out, None))
    }

    fn fold_batch_norm(&mut self) -> Result<()> {
        self.conv1.fold_bn(&mut self.bn1)?;
        self.conv2.fold_bn(&mut self.bn2)?;
        self.conv3.fold_bn(&mut self.bn3)?;
        if let Shortcut::Conv(c, b) = &mut self.shortcut {
            c.fold_bn(b)?;
        }
        Ok(())
    }

    fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<(usize, usize)> {
        let s = self.conv1.count(input, c)?;
        let s = self.conv2.count(s, c)?;
        let out = self.conv3.count(s, c)?;
        let sc = match &self.shortcut {
            Shortcut::Identity => input,
            Shortcut::Conv(conv, _) => conv.count(input, c)?,
            Shortcut::Subsample(st) => ((input.0 - 1) / st + 1, (input.1 - 1) / st + 1),
        };
        if sc != out {
            bail!("resnet unit: shortcut {sc:?} and residual {out:?} sizes differ for input {input:?}")
        }
        Ok(out)
    }
}

/// The stem before the max-pool.
#[derive(Clone, Debug)]
enum Stem {
    /// `conv1` 7x7/64 stride 2 + `bn1` + ReLU.
    Torchvision { conv1: Conv2d, bn1: BatchNorm2d },
    /// `conv1.0`/`conv1.1`, `conv1.3`/`conv1.4`, `conv1.6`/`bn1`, each + ReLU.
    Deep { convs: Vec<(Conv2d, BatchNorm2d)> },
}

/// ResNet backbone (see the module docs).
#[derive(Clone, Debug)]
pub struct ResNet {
    config: ResNetConfig,
    stem: Stem,
    /// `layers[l][u]`.
    layers: Vec<Vec<Bottleneck>>,
    /// `(layer, unit, before_add)`: where the low-level feature is taken.
    tap: (usize, usize, bool),
    fc: Option<Linear>,
    info: Vec<FeatureInfo>,
}

impl ResNet {
    /// Builds the network of `config`, loading (or initializing) timm-named weights from `vb`.
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let bn = BatchNormConfig {
            eps: config.bn_eps,
            momentum: config.bn_momentum,
        };
        let relu = Activation::Relu;
        let mut tracker = StrideTracker::new(1, config.output_stride.value());
        let (s, _) = tracker.unit(2)?;
        let stem = match config.style {
            ResNetStyle::Torchvision => Stem::Torchvision {
                conv1: Conv2d::new(
                    3,
                    64,
                    7,
                    Conv2dGeometry::deeplab(7, s, 1),
                    false,
                    vb.pp("conv1"),
                )?,
                bn1: BatchNorm2d::new(64, bn, vb.pp("bn1"))?.with_activation(relu),
            },
            ResNetStyle::V1Beta => {
                let c = |cin, cout, stride, name: &str| {
                    Conv2d::new(
                        cin,
                        cout,
                        3,
                        Conv2dGeometry::deeplab(3, stride, 1),
                        false,
                        vb.pp(name),
                    )
                };
                let b = |ch, name: &str| {
                    Ok::<_, candle_core::Error>(
                        BatchNorm2d::new(ch, bn, vb.pp(name))?.with_activation(relu),
                    )
                };
                Stem::Deep {
                    convs: vec![
                        (c(3, 64, s, "conv1.0")?, b(64, "conv1.1")?),
                        (c(64, 64, 1, "conv1.3")?, b(64, "conv1.4")?),
                        (c(64, 128, 1, "conv1.6")?, b(128, "bn1")?),
                    ],
                }
            }
        };
        tracker.unit(2)?; // the max-pool

        // First pass: nominal stride, (stride, rate) of every unit.
        let beta = config.style == ResNetStyle::V1Beta;
        let mut plan: Vec<Vec<(usize, usize, usize)>> = Vec::new();
        for (l, &n) in config.layers.iter().enumerate() {
            let mut units = Vec::with_capacity(n);
            for u in 0..n {
                let nominal = match (beta, l, u) {
                    (false, 0, _) | (true, 3, _) => 1,
                    (false, _, 0) => 2,
                    (true, _, u) if u == n - 1 => 2,
                    _ => 1,
                };
                let (stride, rate) = tracker.unit(nominal)?;
                units.push((nominal, stride, rate));
            }
            plan.push(units);
        }
        tracker.finish()?;
        let final_rate = tracker.rate;

        let mut layers = Vec::with_capacity(4);
        let mut cin = if beta { 128 } else { 64 };
        for (l, units) in plan.iter().enumerate() {
            let width = 64 << l;
            let cout = width * 4;
            let mut layer = Vec::with_capacity(units.len());
            for (u, &(_, stride, rate)) in units.iter().enumerate() {
                let rate = match (&config.multi_grid, l == 3) {
                    (Some(mg), true) => final_rate * mg[u],
                    _ => rate,
                };
                let vb_u = vb.pp(format!("layer{}.{u}", l + 1));
                let conv1 = Conv2d::new(
                    cin,
                    width,
                    1,
                    Conv2dGeometry::default(),
                    false,
                    vb_u.pp("conv1"),
                )?;
                let bn1 = BatchNorm2d::new(width, bn, vb_u.pp("bn1"))?.with_activation(relu);
                let geom = Conv2dGeometry::deeplab(3, stride, rate);
                let conv2 = Conv2d::new(width, width, 3, geom, false, vb_u.pp("conv2"))?;
                let bn2 = BatchNorm2d::new(width, bn, vb_u.pp("bn2"))?.with_activation(relu);
                let conv3 = Conv2d::new(
                    width,
                    cout,
                    1,
                    Conv2dGeometry::default(),
                    false,
                    vb_u.pp("conv3"),
                )?;
                let bn3 = BatchNorm2d::new(cout, bn, vb_u.pp("bn3"))?;
                let shortcut = if cin != cout || (!beta && stride != 1) {
                    let g = Conv2dGeometry::deeplab(1, stride, 1);
                    Shortcut::Conv(
                        Conv2d::new(cin, cout, 1, g, false, vb_u.pp("downsample.0"))?,
                        BatchNorm2d::new(cout, bn, vb_u.pp("downsample.1"))?,
                    )
                } else if stride != 1 {
                    Shortcut::Subsample(stride)
                } else {
                    Shortcut::Identity
                };
                layer.push(Bottleneck {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    conv3,
                    bn3,
                    shortcut,
                });
                cin = cout;
            }
            layers.push(layer);
        }
        let fc = match config.classifier {
            Some(n) => Some(candle_nn::linear(cin, n, vb.pp("fc"))?),
            None => None,
        };
        let (tap, tap_name) = if beta {
            let u = config.layers[0] - 2;
            ((0, u, true), format!("layer1.{u}.bn3"))
        } else {
            ((0, config.layers[0] - 1, false), "layer1".to_string())
        };
        let info = vec![
            FeatureInfo {
                channels: 256,
                reduction: 4,
                module: tap_name,
            },
            FeatureInfo {
                channels: cin,
                reduction: config.output_stride.value(),
                module: "layer4".into(),
            },
        ];
        Ok(Self {
            config: config.clone(),
            stem,
            layers,
            tap,
            fc,
            info,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// ImageNet logits `[N, classes]` from the final feature (global pool, `fc`); fails when
    /// built without a classifier.
    pub fn forward_classifier(&self, final_feature: &Tensor) -> Result<Tensor> {
        let Some(fc) = &self.fc else {
            bail!("{}: built without a classifier", self.config.name)
        };
        fc.forward(&global_avg_pool(final_feature)?)
    }

    fn pool_geometry(&self, input: (usize, usize)) -> Conv2dGeometry {
        match self.config.style {
            ResNetStyle::Torchvision => Conv2dGeometry {
                stride: (2, 2),
                dilation: (1, 1),
                padding: Padding2d::uniform(1),
            },
            ResNetStyle::V1Beta => tf_same_geometry(input, 3, 2, 1),
        }
    }

    fn count(&self, input: (usize, usize), c: &mut MacCounter) -> Result<Vec<(usize, usize)>> {
        check_hw(input, &self.config.name)?;
        let mut s = input;
        match &self.stem {
            Stem::Torchvision { conv1, .. } => s = conv1.count(s, c)?,
            Stem::Deep { convs } => {
                for (conv, _) in convs {
                    s = conv.count(s, c)?;
                }
            }
        }
        s = self.pool_geometry(s).output_size(s, (3, 3))?;
        let mut tap = s;
        for (l, layer) in self.layers.iter().enumerate() {
            for (u, b) in layer.iter().enumerate() {
                let out = b.count(s, c)?;
                if (l, u) == (self.tap.0, self.tap.1) {
                    tap = out;
                }
                s = out;
            }
        }
        Ok(vec![tap, s])
    }
}

impl FoldBatchNorm for ResNet {
    fn fold_batch_norm(&mut self) -> Result<()> {
        match &mut self.stem {
            Stem::Torchvision { conv1, bn1 } => conv1.fold_bn(bn1)?,
            Stem::Deep { convs } => {
                for (c, b) in convs {
                    c.fold_bn(b)?;
                }
            }
        }
        for layer in &mut self.layers {
            for u in layer {
                u.fold_batch_norm()?;
            }
        }
        Ok(())
    }
}

impl Backbone for ResNet {
    fn feature_info(&self) -> &[FeatureInfo] {
        &self.info
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(x, 3, &self.config.name)?;
        let mut x = match &self.stem {
            Stem::Torchvision { conv1, bn1 } => conv_bn(conv1, bn1, x, train)?,
            Stem::Deep { convs } => {
                let mut x = x.clone();
                for (conv, bn) in convs {
                    x = conv_bn(conv, bn, &x, train)?;
                }
                x
            }
        };
        x = max_pool2d(&x, (3, 3), &self.pool_geometry(hw(&x)?))?;
        let mut low = None;
        for (l, layer) in self.layers.iter().enumerate() {
            for (u, b) in layer.iter().enumerate() {
                let at_tap = (l, u) == (self.tap.0, self.tap.1);
                let (y, pre) = b.forward(&x, train, at_tap && self.tap.2)?;
                if at_tap {
                    low = Some(match pre {
                        Some(pre) => pre,
                        None => y.clone(),
                    });
                }
                x = y;
            }
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
    fn configs_validate() {
        for c in [
            ResNetConfig::resnet50(),
            ResNetConfig::resnet101(),
            ResNetConfig::resnet50_beta(),
            ResNetConfig::resnet101_beta().with_multi_grid(Some(vec![1, 2, 4])),
        ] {
            c.validate().unwrap();
        }
        assert!(ResNetConfig::resnet101()
            .with_multi_grid(Some(vec![1, 2]))
            .validate()
            .is_err());
    }
}
