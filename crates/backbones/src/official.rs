//! The official TensorFlow DeepLab backbone variable names mapped to this crate's (timm) names,
//! for converting official checkpoints once, offline, into canonical safetensors.
//!
//! Reference: the variable scopes of tensorflow/models `research/deeplab/core/xception.py`
//! (`xception_65/entry_flow/block1/unit_1/xception_module/separable_conv1_depthwise/...`),
//! `resnet_v1_beta.py` (`resnet_v1_101/block1/unit_1/bottleneck_v1/conv1/...`, deep stem
//! `conv1_1..3`) and slim `mobilenet_v2.py` (`MobilenetV2/expanded_conv_N/{expand,depthwise,
//! project}/...`), as listed in `reference/official/*/variables.txt`. Loads no weights; the
//! names it produces are the ones [`crate::build`] loads (see the family modules). TF stores
//! convolutions `[kh, kw, Cin, Cout]` and depthwise kernels `[kh, kw, C, 1]`; [`TfLayout`]
//! says how to permute each into PyTorch's layout. BatchNorm `gamma`, `beta`, `moving_mean`,
//! `moving_variance` become `weight`, `bias`, `running_mean`, `running_var`.

use crate::{BackboneConfig, MobileNetV2Config, ResNetStyle, XceptionConfig, XceptionSkip};

/// How an official variable's data is laid out relative to ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TfLayout {
    /// TF `[kh, kw, Cin, Cout]` -> ours `[Cout, Cin, kh, kw]`.
    Conv,
    /// TF `[kh, kw, C, 1]` -> ours `[C, 1, kh, kw]`.
    Depthwise,
    /// A per-channel vector, unchanged.
    Vector,
}

impl TfLayout {
    /// The axis permutation taking the TF array to ours (`ours = tf.permute(p)`), if any.
    pub fn permutation(self) -> Option<[usize; 4]> {
        match self {
            TfLayout::Conv => Some([3, 2, 0, 1]),
            TfLayout::Depthwise => Some([2, 3, 0, 1]),
            TfLayout::Vector => None,
        }
    }

    /// Our shape for an official shape.
    pub fn convert_shape(self, tf: &[usize]) -> Vec<usize> {
        match (self.permutation(), tf.len()) {
            (Some(p), 4) => p.iter().map(|&i| tf[i]).collect(),
            _ => tf.to_vec(),
        }
    }
}

/// Where an official backbone variable goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TfVariable {
    /// Our (timm) name, without any model prefix (e.g. `blocks.1.stack.conv2.bn_pw.weight`).
    pub name: String,
    /// How to permute the data.
    pub layout: TfLayout,
}

/// Maps an official variable name (with its backbone scope, e.g. `xception_65/...`,
/// `resnet_v1_101/...`, `MobilenetV2/...`) of the backbone `config` describes to ours. `None`
/// for names outside the backbone (ASPP, decoder, logits, optimizer slots, global step) and
/// for configs with no official counterpart (timm-style ResNet).
pub fn official_variable(config: &BackboneConfig, tf_name: &str) -> Option<TfVariable> {
    let (rest, leaf) = tf_name.rsplit_once('/')?;
    let (param, layout) = match leaf {
        "weights" => ("weight", TfLayout::Conv),
        "depthwise_weights" => ("weight", TfLayout::Depthwise),
        "gamma" => ("weight", TfLayout::Vector),
        "beta" => ("bias", TfLayout::Vector),
        "moving_mean" => ("running_mean", TfLayout::Vector),
        "moving_variance" => ("running_var", TfLayout::Vector),
        _ => return None,
    };
    let (rest, bn) = match rest.strip_suffix("/BatchNorm") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    if bn == (layout != TfLayout::Vector) {
        return None;
    }
    let module = match config {
        BackboneConfig::Xception(c) => xception_module(c, rest, bn)?,
        BackboneConfig::ResNet(c) if c.style == ResNetStyle::V1Beta => {
            let scope = format!("resnet_v1_{}/", resnet_depth(&c.layers)?);
            resnet_beta_module(rest.strip_prefix(&scope)?, bn)?
        }
        BackboneConfig::ResNet(_) => return None,
        BackboneConfig::MobileNetV2(c) => {
            mobilenet_module(c, rest.strip_prefix("MobilenetV2/")?, bn)?
        }
    };
    Some(TfVariable {
        name: format!("{module}.{param}"),
        layout,
    })
}

fn resnet_depth(layers: &[usize]) -> Option<usize> {
    // 3 layers per bottleneck unit, plus the stem conv and the classifier.
    Some(layers.iter().sum::<usize>() * 3 + 2)
}

/// `xception_65/entry_flow/block1/unit_1/xception_module/separable_conv1_depthwise` -> ours.
fn xception_module(cfg: &XceptionConfig, rest: &str, bn: bool) -> Option<String> {
    let digits: String = cfg.name.chars().filter(|c| c.is_ascii_digit()).collect();
    let rest = rest.strip_prefix(&format!("xception_{digits}/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let pick = |conv: &str, norm: &str| {
        if bn {
            norm.to_string()
        } else {
            conv.to_string()
        }
    };
    if let ["entry_flow", stem] = parts.as_slice() {
        let i: usize = stem.strip_prefix("conv1_")?.parse().ok()?;
        if !(1..=2).contains(&i) {
            return None;
        }
        return Some(format!("stem.{}.{}", i - 1, pick("conv", "bn")));
    }
    let [flow, block, unit, "xception_module", layer] = parts.as_slice() else {
        return None;
    };
    // Official flows: entry = the blocks before the 'sum' blocks, middle = the 'sum' blocks,
    // exit = the rest.
    let first_mid = cfg
        .blocks
        .iter()
        .position(|b| b.skip == XceptionSkip::Sum)?;
    let last_mid = cfg
        .blocks
        .iter()
        .rposition(|b| b.skip == XceptionSkip::Sum)?;
    let b: usize = block.strip_prefix("block")?.parse().ok()?;
    let u: usize = unit.strip_prefix("unit_")?.parse().ok()?;
    let index = match *flow {
        "entry_flow" if (1..=first_mid).contains(&b) => b - 1,
        "middle_flow" if (1..=last_mid + 1 - first_mid).contains(&b) => first_mid + b - 1,
        "exit_flow" if (1..cfg.blocks.len() - last_mid).contains(&b) => last_mid + b,
        _ => return None,
    };
    if !(1..=cfg.blocks[index].units).contains(&u) {
        return None;
    }
    let k = cfg.blocks[..index].iter().map(|b| b.units).sum::<usize>() + u - 1;
    let inner = if *layer == "shortcut" {
        if cfg.blocks[index].skip != XceptionSkip::Conv {
            return None;
        }
        format!("shortcut.{}", pick("conv", "bn"))
    } else {
        let sep = layer.strip_prefix("separable_conv")?;
        let (i, kind) = sep.split_once('_')?;
        if !matches!(i, "1" | "2" | "3") {
            return None;
        }
        match kind {
            "depthwise" => format!("stack.conv{i}.{}", pick("conv_dw", "bn_dw")),
            "pointwise" => format!("stack.conv{i}.{}", pick("conv_pw", "bn_pw")),
            _ => return None,
        }
    };
    Some(format!("blocks.{k}.{inner}"))
}

/// `conv1_1`, `block1/unit_1/bottleneck_v1/conv1` (scope removed) -> ours (beta names).
fn resnet_beta_module(rest: &str, bn: bool) -> Option<String> {
    let parts: Vec<&str> = rest.split('/').collect();
    let pick = |conv: &str, norm: &str| {
        if bn {
            norm.to_string()
        } else {
            conv.to_string()
        }
    };
    if let [stem] = parts.as_slice() {
        return Some(match *stem {
            "conv1_1" => pick("conv1.0", "conv1.1"),
            "conv1_2" => pick("conv1.3", "conv1.4"),
            "conv1_3" => pick("conv1.6", "bn1"),
            _ => return None,
        });
    }
    let [block, unit, "bottleneck_v1", layer] = parts.as_slice() else {
        return None;
    };
    let b: usize = block.strip_prefix("block")?.parse().ok()?;
    let u: usize = unit.strip_prefix("unit_")?.parse().ok()?;
    if !(1..=4).contains(&b) || u == 0 {
        return None;
    }
    let inner = match *layer {
        "shortcut" => pick("downsample.0", "downsample.1"),
        "conv1" | "conv2" | "conv3" => {
            let j = &layer[4..];
            pick(&format!("conv{j}"), &format!("bn{j}"))
        }
        _ => return None,
    };
    Some(format!("layer{b}.{}.{inner}", u - 1))
}

/// `Conv`, `expanded_conv_N/{expand,depthwise,project}` (scope removed) -> ours.
fn mobilenet_module(cfg: &MobileNetV2Config, rest: &str, bn: bool) -> Option<String> {
    let pick = |conv: &str, norm: &str| {
        if bn {
            norm.to_string()
        } else {
            conv.to_string()
        }
    };
    if rest == "Conv" {
        return Some(pick("conv_stem", "bn1"));
    }
    let (block, part) = rest.split_once('/')?;
    let n: usize = match block.strip_prefix("expanded_conv")? {
        "" => 0,
        s => s.strip_prefix('_')?.parse().ok()?,
    };
    let (mut stage, mut idx) = (0, n);
    while idx >= cfg.stages.get(stage)?.repeats {
        idx -= cfg.stages[stage].repeats;
        stage += 1;
    }
    let ds = cfg.stages[stage].expansion == 1;
    let (conv, norm) = match (part, ds) {
        ("expand", false) => ("conv_pw", "bn1"),
        ("depthwise", false) => ("conv_dw", "bn2"),
        ("project", false) => ("conv_pwl", "bn3"),
        ("depthwise", true) => ("conv_dw", "bn1"),
        ("project", true) => ("conv_pw", "bn2"),
        _ => return None,
    };
    Some(format!("blocks.{stage}.{idx}.{}", pick(conv, norm)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResNetConfig;

    fn map(cfg: &BackboneConfig, n: &str) -> Option<String> {
        official_variable(cfg, n).map(|v| v.name)
    }

    #[test]
    fn maps_representative_names() {
        let x = BackboneConfig::Xception(XceptionConfig::xception65());
        let m = |n| map(&x, n);
        assert_eq!(
            m("xception_65/entry_flow/conv1_2/BatchNorm/gamma").as_deref(),
            Some("stem.1.bn.weight")
        );
        assert_eq!(
            m("xception_65/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise/BatchNorm/beta")
                .as_deref(),
            Some("blocks.1.stack.conv2.bn_pw.bias")
        );
        assert_eq!(
            m("xception_65/middle_flow/block1/unit_16/xception_module/separable_conv3_depthwise/depthwise_weights")
                .as_deref(),
            Some("blocks.18.stack.conv3.conv_dw.weight")
        );
        assert_eq!(
            m("xception_65/exit_flow/block2/unit_1/xception_module/separable_conv1_pointwise/weights").as_deref(),
            Some("blocks.20.stack.conv1.conv_pw.weight")
        );
        assert_eq!(m("aspp0/weights"), None);
        assert_eq!(
            m("xception_65/exit_flow/block2/unit_1/xception_module/shortcut/weights"),
            None
        );
        let r = BackboneConfig::ResNet(ResNetConfig::resnet101_beta());
        assert_eq!(
            map(&r, "resnet_v1_101/conv1_3/BatchNorm/moving_variance").as_deref(),
            Some("bn1.running_var")
        );
        assert_eq!(
            map(
                &r,
                "resnet_v1_101/block3/unit_23/bottleneck_v1/conv2/weights"
            )
            .as_deref(),
            Some("layer3.22.conv2.weight")
        );
        assert_eq!(map(&r, "resnet_v1_50/conv1_1/weights"), None);
        let mb = BackboneConfig::MobileNetV2(MobileNetV2Config::mobilenetv2_100());
        assert_eq!(
            map(
                &mb,
                "MobilenetV2/expanded_conv_2/depthwise/depthwise_weights"
            )
            .as_deref(),
            Some("blocks.1.1.conv_dw.weight")
        );
        assert_eq!(
            map(&mb, "MobilenetV2/expanded_conv/project/BatchNorm/gamma").as_deref(),
            Some("blocks.0.0.bn2.weight")
        );
        assert_eq!(
            map(&mb, "MobilenetV2/expanded_conv_17/project/weights"),
            None
        );
        assert_eq!(
            TfLayout::Conv.convert_shape(&[3, 3, 64, 128]),
            [128, 64, 3, 3]
        );
        assert_eq!(
            TfLayout::Depthwise.convert_shape(&[3, 3, 64, 1]),
            [64, 1, 3, 3]
        );
    }
}
