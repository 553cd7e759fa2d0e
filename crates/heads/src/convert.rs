//! Official TensorFlow DeepLab checkpoints → canonical safetensors.
//!
//! Reads a tensor-bundle checkpoint (a `model.ckpt` prefix, its `.index`, a directory, or a
//! model-zoo `.tar.gz`, through `deeplab-formats`), maps every official variable name to this
//! crate's key scheme, converts layouts, infers the [`DeepLabConfig`] (or takes one), checks
//! that the result is exactly what that model loads, and writes the file with the config in its
//! metadata.
//!
//! Name mapping (official scope → canonical module; `weights` → `.weight`,
//! `depthwise_weights` → `.weight`, `biases` → `.bias`, `BatchNorm/{gamma, beta, moving_mean,
//! moving_variance}` → `{weight, bias, running_mean, running_var}`):
//! - `MobilenetV2/Conv` → `backbone.conv_stem` / `backbone.bn1`; `MobilenetV2/expanded_conv_N`
//!   is timm's N-th block `blocks.S.B` with `expand` → `conv_pw`/`bn1`, `depthwise` →
//!   `conv_dw`/`bn2`, `project` → `conv_pwl`/`bn3` (the first block has `depthwise` →
//!   `conv_dw`/`bn1`, `project` → `conv_pw`/`bn2`).
//! - `xception_{41,65,71}/entry_flow/conv1_{1,2}` → `backbone.stem.{0,1}.{conv,bn}`; the units
//!   `{entry,middle,exit}_flow/blockB/unit_U/xception_module` are numbered in order as
//!   `backbone.blocks.K`, with `separable_convJ_{depthwise,pointwise}` →
//!   `stack.convJ.{conv_dw,bn_dw | conv_pw,bn_pw}` and `shortcut` → `shortcut.{conv,bn}`.
//! - `resnet_v1_{50,101}/conv1_{1,2,3}` → `backbone.conv1.{0,3,6}` with BNs `conv1.1`,
//!   `conv1.4`, `bn1`; `blockB/unit_U/bottleneck_v1/{conv1,conv2,conv3,shortcut}` →
//!   `backbone.layerB.(U-1).{conv1/bn1, conv2/bn2, conv3/bn3, downsample.0/downsample.1}`.
//! - The head as in the crate docs.
//!
//! Layouts: conv `[kh, kw, Cin, Cout]` → `[Cout, Cin, kh, kw]`; depthwise `[kh, kw, C, 1]` →
//! `[C, 1, kh, kw]`. Optimizer slots (`*/Momentum`, `*/Adam*`, `*/RMSProp*`,
//! `*/ExponentialMovingAverage`), `global_step` and Adam's `beta{1,2}_power` are skipped and
//! reported; any other unmapped variable, or one whose shape does not fit the model, is an
//! error naming the variable and the checkpoint.

use crate::config::{
    paper_rates, AsppSettings, DecoderSettings, DeepLabConfig, InputNormalization,
};
use crate::error::{ModelError, Result};
use crate::keys::TensorKey;
use crate::weights::{save_weights, NamedTensor};
use deeplab_backbones::{
    BackboneConfig, MobileNetV2Config, OutputStride, ResNetConfig, XceptionConfig,
};
use deeplab_formats::Checkpoint;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How a TensorFlow tensor is laid out and must be permuted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TfLayout {
    /// `[kh, kw, Cin, Cout]` → `[Cout, Cin, kh, kw]`.
    Conv,
    /// `[kh, kw, C, 1]` → `[C, 1, kh, kw]`.
    Depthwise,
    /// 1-D, unchanged.
    Vector,
}

/// Where one official variable goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// To this canonical tensor, with this layout conversion.
    Tensor {
        /// Canonical name.
        name: String,
        /// Layout of the TensorFlow tensor.
        layout: TfLayout,
    },
    /// Not a model weight (optimizer state, step counter): skipped.
    Skip,
}

/// Options of a conversion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConvertOptions {
    /// Use exactly this configuration instead of inferring one (the checkpoint must fit it).
    pub config: Option<DeepLabConfig>,
    /// Output stride the model is built at (default 16; the official training setting).
    pub output_stride: Option<OutputStride>,
    /// ASPP rates at that output stride (default: 6/12/18 scaled to it, when the checkpoint
    /// has three atrous branches).
    pub atrous_rates: Option<Vec<usize>>,
    /// Multi-grid rates of the backbone's last block (Xception, ResNet), e.g. `[1, 2, 4]`.
    pub multi_grid: Option<Vec<usize>>,
    /// Output stride to evaluate at, stored in the config (e.g. 8 for the model zoo's
    /// evaluation setting).
    pub eval_output_stride: Option<OutputStride>,
}

/// The result of a conversion.
#[derive(Clone, Debug)]
pub struct Converted {
    /// The model configuration (inferred or given).
    pub config: DeepLabConfig,
    /// The canonical tensors, in model order.
    pub tensors: Vec<NamedTensor>,
    /// `(official name, canonical name)` of every converted variable.
    pub mapping: Vec<(String, String)>,
    /// Official variables skipped as non-weights.
    pub skipped: Vec<String>,
}

/// The official backbone families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    MobileNetV2,
    Xception(usize),
    ResNet(usize),
}

fn is_skipped(name: &str) -> bool {
    const SLOTS: [&str; 6] = [
        "/Momentum",
        "/Adam",
        "/Adam_1",
        "/RMSProp",
        "/RMSProp_1",
        "/ExponentialMovingAverage",
    ];
    matches!(name, "global_step" | "beta1_power" | "beta2_power")
        || SLOTS.iter().any(|s| name.ends_with(s))
}

fn family_of(root: &str) -> Option<Family> {
    match root {
        "MobilenetV2" => Some(Family::MobileNetV2),
        "xception_41" => Some(Family::Xception(41)),
        "xception_65" => Some(Family::Xception(65)),
        "xception_71" => Some(Family::Xception(71)),
        "resnet_v1_50" => Some(Family::ResNet(50)),
        "resnet_v1_101" => Some(Family::ResNet(101)),
        _ => None,
    }
}

/// The leaf of a variable name and what it becomes.
enum Leaf {
    Weights,
    DepthwiseWeights,
    Biases,
    Bn(&'static str),
}

fn split_leaf(name: &str) -> Option<(&str, Leaf)> {
    for (suffix, leaf) in [
        ("/BatchNorm/gamma", Leaf::Bn("weight")),
        ("/BatchNorm/beta", Leaf::Bn("bias")),
        ("/BatchNorm/moving_mean", Leaf::Bn("running_mean")),
        ("/BatchNorm/moving_variance", Leaf::Bn("running_var")),
        ("/depthwise_weights", Leaf::DepthwiseWeights),
        ("/weights", Leaf::Weights),
        ("/biases", Leaf::Biases),
    ] {
        if let Some(scope) = name.strip_suffix(suffix) {
            return Some((scope, leaf));
        }
    }
    None
}

/// `(conv module, bn module)` of a head layer scope.
fn head_layer(scope: &str) -> Option<(String, String)> {
    let pair = |p: &str, c: &str, b: &str| Some((format!("{p}.{c}"), format!("{p}.{b}")));
    match scope {
        "image_pooling" => return pair("aspp.pooling", "conv", "bn"),
        "concat_projection" => return pair("aspp.project", "conv", "bn"),
        "decoder/feature_projection0" => return pair("decoder.project", "conv", "bn"),
        "logits/semantic" => return Some(("classifier".into(), String::new())),
        _ => {}
    }
    if let Some(rest) = scope.strip_prefix("aspp") {
        let (idx, part) = match rest.split_once('_') {
            Some((i, p)) => (i, Some(p)),
            None => (rest, None),
        };
        let i: usize = parse_index(idx)?;
        let p = format!("aspp.convs.{i}");
        return match part {
            None => pair(&p, "conv", "bn"),
            Some("depthwise") if i > 0 => pair(&p, "conv_dw", "bn_dw"),
            Some("pointwise") if i > 0 => pair(&p, "conv_pw", "bn_pw"),
            _ => None,
        };
    }
    if let Some(rest) = scope.strip_prefix("decoder/decoder_conv0/decoder_conv0_") {
        let j: usize = parse_index(rest)?;
        return (j >= 1).then(|| {
            (
                format!("decoder.convs.{}.conv", j - 1),
                format!("decoder.convs.{}.bn", j - 1),
            )
        });
    }
    if let Some(rest) = scope.strip_prefix("decoder/decoder_conv") {
        let (k, part) = rest.split_once('_')?;
        let k: usize = parse_index(k)?;
        let p = format!("decoder.convs.{k}");
        return match part {
            "depthwise" => pair(&p, "conv_dw", "bn_dw"),
            "pointwise" => pair(&p, "conv_pw", "bn_pw"),
            _ => None,
        };
    }
    None
}

/// A decimal index without sign or leading zeros.
fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn mobilenet_layer(scope: &str, cfg: &MobileNetV2Config) -> Option<(String, String)> {
    if scope == "Conv" {
        return Some(("backbone.conv_stem".into(), "backbone.bn1".into()));
    }
    if scope == "Conv_1" {
        return Some(("backbone.conv_head".into(), "backbone.bn2".into()));
    }
    let rest = scope.strip_prefix("expanded_conv")?;
    let (n, part) = match rest.split_once('/') {
        Some(("", p)) => (0, p),
        Some((i, p)) => (parse_index(i.strip_prefix('_')?)?, p),
        None => return None,
    };
    if n == 0 && rest.starts_with('_') {
        return None; // `expanded_conv_0` does not exist
    }
    // The n-th block in order is blocks.S.B.
    let mut k = n;
    let mut pos = None;
    for (s, st) in cfg.stages.iter().enumerate() {
        if k < st.repeats {
            pos = Some((s, k, st.expansion == 1));
            break;
        }
        k -= st.repeats;
    }
    let (s, b, first) = pos?;
    let p = format!("backbone.blocks.{s}.{b}");
    let (c, bn) = match (part, first) {
        ("depthwise", true) => ("conv_dw", "bn1"),
        ("project", true) => ("conv_pw", "bn2"),
        ("expand", false) => ("conv_pw", "bn1"),
        ("depthwise", false) => ("conv_dw", "bn2"),
        ("project", false) => ("conv_pwl", "bn3"),
        _ => return None,
    };
    Some((format!("{p}.{c}"), format!("{p}.{bn}")))
}

fn xception_layer(scope: &str, cfg: &XceptionConfig) -> Option<(String, String)> {
    match scope {
        "entry_flow/conv1_1" => {
            return Some(("backbone.stem.0.conv".into(), "backbone.stem.0.bn".into()))
        }
        "entry_flow/conv1_2" => {
            return Some(("backbone.stem.1.conv".into(), "backbone.stem.1.bn".into()))
        }
        _ => {}
    }
    let mut it = scope.split('/');
    let (flow, block, unit, module, layer) =
        (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || module != "xception_module" {
        return None;
    }
    let b = parse_index(block.strip_prefix("block")?)?;
    let u = parse_index(unit.strip_prefix("unit_")?)?;
    if b == 0 || u == 0 {
        return None;
    }
    // The official flows: entry = all blocks but the last three, middle = the third from last,
    // exit = the last two (xception.py's block lists).
    let n = cfg.blocks.len();
    if n < 3 {
        return None;
    }
    let bi = match flow {
        "entry_flow" if b <= n - 3 => b - 1,
        "middle_flow" if b == 1 => n - 3,
        "exit_flow" if b <= 2 => n - 3 + b,
        _ => return None,
    };
    if u > cfg.blocks[bi].units {
        return None;
    }
    let k: usize = cfg.blocks[..bi].iter().map(|b| b.units).sum::<usize>() + u - 1;
    let p = format!("backbone.blocks.{k}");
    if layer == "shortcut" {
        return Some((format!("{p}.shortcut.conv"), format!("{p}.shortcut.bn")));
    }
    let rest = layer.strip_prefix("separable_conv")?;
    let (j, part) = rest.split_once('_')?;
    let j = parse_index(j)?;
    if !(1..=3).contains(&j) {
        return None;
    }
    match part {
        "depthwise" => Some((
            format!("{p}.stack.conv{j}.conv_dw"),
            format!("{p}.stack.conv{j}.bn_dw"),
        )),
        "pointwise" => Some((
            format!("{p}.stack.conv{j}.conv_pw"),
            format!("{p}.stack.conv{j}.bn_pw"),
        )),
        _ => None,
    }
}

fn resnet_layer(scope: &str, cfg: &ResNetConfig) -> Option<(String, String)> {
    match scope {
        "conv1_1" => return Some(("backbone.conv1.0".into(), "backbone.conv1.1".into())),
        "conv1_2" => return Some(("backbone.conv1.3".into(), "backbone.conv1.4".into())),
        "conv1_3" => return Some(("backbone.conv1.6".into(), "backbone.bn1".into())),
        _ => {}
    }
    let mut it = scope.split('/');
    let (block, unit, module, layer) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || module != "bottleneck_v1" {
        return None;
    }
    let b = parse_index(block.strip_prefix("block")?)?;
    let u = parse_index(unit.strip_prefix("unit_")?)?;
    if b == 0 || b > cfg.layers.len() || u == 0 || u > cfg.layers[b - 1] {
        return None;
    }
    let p = format!("backbone.layer{b}.{}", u - 1);
    match layer {
        "conv1" | "conv2" | "conv3" => {
            let j = &layer[4..];
            Some((format!("{p}.conv{j}"), format!("{p}.bn{j}")))
        }
        "shortcut" => Some((format!("{p}.downsample.0"), format!("{p}.downsample.1"))),
        _ => None,
    }
}

/// Maps one official variable name for a model with `backbone`; `None` for an unknown name.
pub fn map_variable(name: &str, backbone: &BackboneConfig) -> Option<Mapping> {
    if is_skipped(name) {
        return Some(Mapping::Skip);
    }
    let (scope, leaf) = split_leaf(name)?;
    let (conv, bn) = match scope.split_once('/') {
        Some((root, rest)) if family_of(root).is_some() => match (family_of(root)?, backbone) {
            (Family::MobileNetV2, BackboneConfig::MobileNetV2(c)) => mobilenet_layer(rest, c)?,
            (Family::Xception(d), BackboneConfig::Xception(c))
                if c.name == format!("xception{d}") =>
            {
                xception_layer(rest, c)?
            }
            (Family::ResNet(d), BackboneConfig::ResNet(c))
                if c.layers.iter().sum::<usize>() * 3 + 2 == d =>
            {
                resnet_layer(rest, c)?
            }
            _ => return None,
        },
        _ => head_layer(scope)?,
    };
    let (name, layout) = match leaf {
        Leaf::Weights => (format!("{conv}.weight"), TfLayout::Conv),
        Leaf::DepthwiseWeights => (format!("{conv}.weight"), TfLayout::Depthwise),
        Leaf::Biases => (format!("{conv}.bias"), TfLayout::Vector),
        Leaf::Bn(_) if bn.is_empty() => return None,
        Leaf::Bn(field) => (format!("{bn}.{field}"), TfLayout::Vector),
    };
    Some(Mapping::Tensor { name, layout })
}

/// The canonical shape of a TensorFlow shape under `layout`; `None` when the rank is wrong.
pub fn converted_shape(tf_shape: &[usize], layout: TfLayout) -> Option<Vec<usize>> {
    match (layout, tf_shape) {
        (TfLayout::Conv, &[kh, kw, ci, co]) => Some(vec![co, ci, kh, kw]),
        (TfLayout::Depthwise, &[kh, kw, c, 1]) => Some(vec![c, 1, kh, kw]),
        (TfLayout::Vector, &[n]) => Some(vec![n]),
        _ => None,
    }
}

/// Permutes row-major TensorFlow values into the canonical layout.
pub fn convert_values(tf_shape: &[usize], layout: TfLayout, v: &[f32]) -> Vec<f32> {
    match (layout, tf_shape) {
        (TfLayout::Conv, &[kh, kw, ci, co]) => {
            let mut out = vec![0f32; v.len()];
            for y in 0..kh {
                for x in 0..kw {
                    for i in 0..ci {
                        for o in 0..co {
                            out[((o * ci + i) * kh + y) * kw + x] =
                                v[((y * kw + x) * ci + i) * co + o];
                        }
                    }
                }
            }
            out
        }
        (TfLayout::Depthwise, &[kh, kw, c, 1]) => {
            let mut out = vec![0f32; v.len()];
            for y in 0..kh {
                for x in 0..kw {
                    for ch in 0..c {
                        out[(ch * kh + y) * kw + x] = v[(y * kw + x) * c + ch];
                    }
                }
            }
            out
        }
        _ => v.to_vec(),
    }
}

/// What the checkpoint's variable list says about the model.
struct Inventory<'a> {
    path: &'a Path,
    shapes: BTreeMap<&'a str, &'a [usize]>,
}

impl<'a> Inventory<'a> {
    fn new(path: &'a Path, variables: &'a [(String, Vec<usize>)]) -> Self {
        Self {
            path,
            shapes: variables
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice()))
                .collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<&'a [usize]> {
        self.shapes.get(name).copied()
    }

    fn need(&self, name: &str, rank: usize, axis: usize) -> Result<usize> {
        match self.shape(name) {
            Some(s) if s.len() == rank => Ok(s[axis]),
            Some(s) => Err(ModelError::Convert {
                path: self.path.to_path_buf(),
                variable: name.into(),
                detail: format!("expected a rank-{rank} tensor, found shape {s:?}"),
            }),
            None => Err(ModelError::Unsupported {
                path: self.path.to_path_buf(),
                detail: format!(
                    "no variable '{name}': not an official DeepLab segmentation checkpoint"
                ),
            }),
        }
    }

    fn has_scope(&self, scope: &str) -> bool {
        let p = format!("{scope}/");
        self.shapes.keys().any(|k| k.starts_with(&p))
    }
}

fn backbone_candidates(inv: &Inventory) -> Result<Vec<BackboneConfig>> {
    let roots: std::collections::BTreeSet<&str> = inv
        .shapes
        .keys()
        .filter_map(|k| k.split_once('/').map(|(r, _)| r))
        .filter(|r| family_of(r).is_some())
        .collect();
    let root = match roots.len() {
        1 => roots.into_iter().next().unwrap_or_default(),
        0 => return Err(ModelError::Unsupported {
            path: inv.path.to_path_buf(),
            detail:
                "no backbone variables (MobilenetV2/, xception_41|65|71/, resnet_v1_50|101/) found"
                    .into(),
        }),
        _ => {
            return Err(ModelError::Unsupported {
                path: inv.path.to_path_buf(),
                detail: format!("variables of several backbones: {roots:?}"),
            })
        }
    };
    let family = family_of(root).ok_or_else(|| ModelError::Unsupported {
        path: inv.path.to_path_buf(),
        detail: format!("unknown backbone scope {root}"),
    })?;
    let cands = match family {
        Family::MobileNetV2 => {
            let stem = inv.need("MobilenetV2/Conv/weights", 4, 3)?;
            let mut v = Vec::new();
            // Width from the stem (32 x width, rounded); both channel-rounding rules are tried.
            for width in [1.0, 0.5, 0.75, 0.35, 1.4, 1.3, stem as f64 / 32.0] {
                for div in [8, 1] {
                    let mut c = MobileNetV2Config::with_width(width).with_divisible_by(div);
                    if div == 1 && width == 0.5 {
                        c = MobileNetV2Config::mobilenetv2_050_deeplab();
                    } else if div == 1 {
                        c.name = format!("{}_deeplab", c.name);
                    }
                    if c.round_channels(c.stem_channels) == stem
                        && !v.contains(&BackboneConfig::MobileNetV2(c.clone()))
                    {
                        v.push(BackboneConfig::MobileNetV2(c));
                    }
                }
            }
            v
        }
        Family::Xception(41) => vec![BackboneConfig::Xception(XceptionConfig::xception41())],
        Family::Xception(65) => vec![BackboneConfig::Xception(XceptionConfig::xception65())],
        Family::Xception(_) => vec![BackboneConfig::Xception(XceptionConfig::xception71())],
        Family::ResNet(50) => vec![BackboneConfig::ResNet(ResNetConfig::resnet50_beta())],
        Family::ResNet(_) => vec![BackboneConfig::ResNet(ResNetConfig::resnet101_beta())],
    };
    Ok(cands)
}

/// Infers the configuration of an official checkpoint from its variables (see
/// [`ConvertOptions`] for what cannot be inferred).
fn infer_head(
    inv: &Inventory,
    backbone: BackboneConfig,
    opts: &ConvertOptions,
) -> Result<DeepLabConfig> {
    let path = inv.path;
    let cfg_err = |detail: String| ModelError::Config {
        path: path.to_path_buf(),
        detail,
    };
    let num_classes = inv.need("logits/semantic/biases", 1, 0)?;
    let channels = inv.need("aspp0/weights", 4, 3)?;
    let image_pooling = inv.has_scope("image_pooling");
    let mut n_atrous = 0;
    let mut separable = false;
    loop {
        let i = n_atrous + 1;
        if inv.has_scope(&format!("aspp{i}")) {
            n_atrous = i;
        } else if inv.has_scope(&format!("aspp{i}_depthwise")) {
            n_atrous = i;
            separable = true;
        } else {
            break;
        }
    }
    let os = opts.output_stride.unwrap_or(OutputStride::Os16);
    let atrous_rates = match &opts.atrous_rates {
        Some(r) if r.len() == n_atrous => r.clone(),
        Some(r) => {
            return Err(cfg_err(format!(
                "{} atrous rates given ({r:?}) but the checkpoint has {n_atrous} atrous ASPP branches",
                r.len()
            )))
        }
        None if n_atrous == 0 => vec![],
        None if n_atrous == 3 => paper_rates(os),
        None => {
            return Err(cfg_err(format!(
                "the checkpoint has {n_atrous} atrous ASPP branches; give their rates (only 3 have a default, 6/12/18 at OS16)"
            )))
        }
    };
    let decoder = if inv.has_scope("decoder") {
        let projection_channels = inv.need("decoder/feature_projection0/weights", 4, 3)?;
        let sep = inv.has_scope("decoder/decoder_conv0_depthwise");
        let mut n = 0;
        while inv.has_scope(&if sep {
            format!("decoder/decoder_conv{n}_depthwise")
        } else {
            format!("decoder/decoder_conv0/decoder_conv0_{}", n + 1)
        }) {
            n += 1;
        }
        let first = if sep {
            "decoder/decoder_conv0_pointwise/weights".to_string()
        } else {
            "decoder/decoder_conv0/decoder_conv0_1/weights".to_string()
        };
        let dch = inv.need(&first, 4, 3)?;
        Some(DecoderSettings {
            output_stride: 4,
            projection_channels,
            channels: dch,
            num_convs: n,
            separable: sep,
        })
    } else {
        None
    };
    let backbone = backbone.with_output_stride(os);
    let cfg = DeepLabConfig {
        backbone,
        aspp: AsppSettings {
            channels,
            atrous_rates,
            image_pooling,
            separable,
            dropout: 0.1,
        },
        decoder,
        num_classes,
        align_corners: true,
        normalization: InputNormalization::Official,
        head_bn_eps: 1e-5,
        eval_output_stride: opts.eval_output_stride,
    };
    let cfg = match &opts.multi_grid {
        Some(mg) => cfg.with_multi_grid(Some(mg.clone())).map_err(cfg_err)?,
        None => cfg,
    };
    cfg.validate().map_err(cfg_err)?;
    Ok(cfg)
}

/// One official variable of a conversion plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVariable {
    /// The official (TensorFlow) name.
    pub official: String,
    /// The canonical name.
    pub canonical: String,
    /// The TensorFlow layout to convert from.
    pub layout: TfLayout,
    /// The canonical shape.
    pub shape: Vec<usize>,
}

/// A checked mapping of a checkpoint's variables onto a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ConversionPlan {
    /// The model configuration.
    pub config: DeepLabConfig,
    /// Every weight, in the model's order.
    pub variables: Vec<PlannedVariable>,
    /// Official variables skipped as non-weights.
    pub skipped: Vec<String>,
}

/// Maps every variable for `config`'s model and checks the result against what the model loads.
fn plan(inv: &Inventory, config: &DeepLabConfig) -> Result<(Vec<PlannedVariable>, Vec<String>)> {
    let path = inv.path;
    let keys: Vec<TensorKey> = config.keys().map_err(|e| ModelError::candle(path, e))?;
    let wanted: HashMap<&str, &TensorKey> = keys.iter().map(|k| (k.name.as_str(), k)).collect();
    let mut by_canonical: HashMap<String, (String, TfLayout)> = HashMap::new();
    let mut skipped = Vec::new();
    for (&name, &shape) in &inv.shapes {
        let err = |detail: String| ModelError::Convert {
            path: path.to_path_buf(),
            variable: name.into(),
            detail,
        };
        let (canonical, layout) = match map_variable(name, &config.backbone) {
            Some(Mapping::Skip) => {
                skipped.push(name.to_string());
                continue;
            }
            Some(Mapping::Tensor { name: c, layout }) => (c, layout),
            None => {
                return Err(err(format!(
                    "unknown variable (not part of an official DeepLab {} model)",
                    config.backbone.name()
                )))
            }
        };
        let Some(k) = wanted.get(canonical.as_str()) else {
            return Err(err(format!(
                "maps to '{canonical}', which the configured model does not have"
            )));
        };
        let Some(conv) = converted_shape(shape, layout) else {
            return Err(err(format!(
                "shape {shape:?} is not a {layout:?} tensor (maps to '{canonical}')"
            )));
        };
        if conv != k.shape {
            return Err(err(format!(
                "shape {shape:?} converts to {conv:?}, but '{canonical}' of the model has shape {:?}",
                k.shape
            )));
        }
        if let Some((other, _)) = by_canonical.insert(canonical.clone(), (name.to_string(), layout))
        {
            return Err(err(format!("maps to '{canonical}', as does '{other}'")));
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for k in &keys {
        let Some((tf, layout)) = by_canonical.remove(&k.name) else {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                detail: format!(
                    "the checkpoint has no variable for '{}' (shape {:?}) of the configured model",
                    k.name, k.shape
                ),
            });
        };
        out.push(PlannedVariable {
            official: tf,
            canonical: k.name.clone(),
            layout,
            shape: k.shape.clone(),
        });
    }
    Ok((out, skipped))
}

/// Plans the conversion of a checkpoint with these `variables` (official name, TensorFlow
/// shape); `origin` names the checkpoint in errors. Infers the configuration unless
/// `opts.config` is given, and checks that every variable maps to a tensor the model loads with
/// the converted shape and that the model gets every tensor it needs.
pub fn plan_conversion(
    variables: &[(String, Vec<usize>)],
    origin: &Path,
    opts: &ConvertOptions,
) -> Result<ConversionPlan> {
    let inv = Inventory::new(origin, variables);
    let (config, (variables, skipped)) = match &opts.config {
        Some(c) => {
            c.validate().map_err(|detail| ModelError::Config {
                path: origin.to_path_buf(),
                detail,
            })?;
            (c.clone(), plan(&inv, c)?)
        }
        None => {
            let cands = backbone_candidates(&inv)?;
            let mut first_err = None;
            let mut found = None;
            for b in cands {
                let cfg = infer_head(&inv, b, opts)?;
                match plan(&inv, &cfg) {
                    Ok(p) => {
                        found = Some((cfg, p));
                        break;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            match (found, first_err) {
                (Some(f), _) => f,
                (None, Some(e)) => return Err(e),
                (None, None) => {
                    return Err(ModelError::Unsupported {
                        path: origin.to_path_buf(),
                        detail: "no backbone variant fits the checkpoint".into(),
                    })
                }
            }
        }
    };
    Ok(ConversionPlan {
        config,
        variables,
        skipped,
    })
}

/// Converts an open checkpoint: plans it (see [`plan_conversion`]), reads every variable and
/// converts its layout.
pub fn convert_checkpoint(ckpt: &Checkpoint, opts: &ConvertOptions) -> Result<Converted> {
    convert_checkpoint_from(ckpt, ckpt.prefix(), opts)
}

/// [`convert_checkpoint`] with `origin` (e.g. the `.tar.gz` it was extracted from) named in
/// errors instead of the checkpoint's own prefix.
pub fn convert_checkpoint_from(
    ckpt: &Checkpoint,
    origin: &Path,
    opts: &ConvertOptions,
) -> Result<Converted> {
    let path: PathBuf = origin.to_path_buf();
    let variables: Vec<(String, Vec<usize>)> = ckpt
        .iter()
        .map(|(n, i)| (n.to_string(), i.shape.clone()))
        .collect();
    let ConversionPlan {
        config,
        variables: planned,
        skipped,
    } = plan_conversion(&variables, &path, opts)?;
    let mut tensors = Vec::with_capacity(planned.len());
    let mut mapping = Vec::with_capacity(planned.len());
    for PlannedVariable {
        official: tf,
        canonical,
        layout,
        shape,
    } in planned
    {
        let info = ckpt.entry(&tf)?;
        let values = ckpt.read_f32(&tf)?;
        if values.len() != info.num_elements() {
            return Err(ModelError::Convert {
                path: path.clone(),
                variable: tf,
                detail: format!("read {} values for shape {:?}", values.len(), info.shape),
            });
        }
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Convert {
                path: path.clone(),
                variable: tf,
                detail: format!("value {} at flat index {bad} is not finite", values[bad]),
            });
        }
        let data = convert_values(&info.shape, layout, &values);
        tensors.push(NamedTensor {
            name: canonical.clone(),
            shape,
            data,
        });
        mapping.push((tf, canonical));
    }
    Ok(Converted {
        config,
        tensors,
        mapping,
        skipped,
    })
}

/// Converts the checkpoint at `input` (prefix, `.index`, directory, or `.tar.gz`) and writes
/// the canonical safetensors file `output` atomically.
pub fn convert_file(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<Converted> {
    let input = input.as_ref();
    let ckpt = Checkpoint::open(input)?;
    // A checkpoint extracted from an archive lives in a temporary directory: name the archive.
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let from_archive = name.ends_with(".tar.gz") || name.ends_with(".tgz");
    let conv = if from_archive {
        convert_checkpoint_from(&ckpt, input, opts).map_err(|e| match e {
            ModelError::Checkpoint(source) => ModelError::Archive {
                path: input.to_path_buf(),
                source,
            },
            other => other,
        })?
    } else {
        convert_checkpoint(&ckpt, opts)?
    };
    save_weights(output, &conv.config, &conv.tensors)?;
    Ok(conv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(name: &str, b: &BackboneConfig) -> Option<String> {
        match map_variable(name, b)? {
            Mapping::Tensor { name, .. } => Some(name),
            Mapping::Skip => Some("<skip>".into()),
        }
    }

    #[test]
    fn head_names() {
        let b = BackboneConfig::MobileNetV2(MobileNetV2Config::mobilenetv2_100());
        let cases = [
            ("image_pooling/weights", "aspp.pooling.conv.weight"),
            (
                "image_pooling/BatchNorm/moving_variance",
                "aspp.pooling.bn.running_var",
            ),
            ("aspp0/BatchNorm/gamma", "aspp.convs.0.bn.weight"),
            ("aspp2/weights", "aspp.convs.2.conv.weight"),
            (
                "aspp3_depthwise/depthwise_weights",
                "aspp.convs.3.conv_dw.weight",
            ),
            ("aspp1_pointwise/BatchNorm/beta", "aspp.convs.1.bn_pw.bias"),
            (
                "concat_projection/BatchNorm/moving_mean",
                "aspp.project.bn.running_mean",
            ),
            (
                "decoder/feature_projection0/weights",
                "decoder.project.conv.weight",
            ),
            (
                "decoder/decoder_conv1_depthwise/BatchNorm/gamma",
                "decoder.convs.1.bn_dw.weight",
            ),
            (
                "decoder/decoder_conv0/decoder_conv0_2/weights",
                "decoder.convs.1.conv.weight",
            ),
            ("logits/semantic/weights", "classifier.weight"),
            ("logits/semantic/biases", "classifier.bias"),
            ("global_step", "<skip>"),
            ("aspp0/weights/Momentum", "<skip>"),
            ("MobilenetV2/Conv/weights", "backbone.conv_stem.weight"),
            (
                "MobilenetV2/expanded_conv/depthwise/BatchNorm/gamma",
                "backbone.blocks.0.0.bn1.weight",
            ),
            (
                "MobilenetV2/expanded_conv/project/weights",
                "backbone.blocks.0.0.conv_pw.weight",
            ),
            (
                "MobilenetV2/expanded_conv_2/depthwise/depthwise_weights",
                "backbone.blocks.1.1.conv_dw.weight",
            ),
            (
                "MobilenetV2/expanded_conv_16/project/BatchNorm/beta",
                "backbone.blocks.6.0.bn3.bias",
            ),
        ];
        for (tf, want) in cases {
            assert_eq!(map(tf, &b).as_deref(), Some(want), "{tf}");
        }
        for bad in [
            "aspp0_depthwise/depthwise_weights",
            "aspp01/weights",
            "logits/semantic/BatchNorm/gamma",
            "MobilenetV2/expanded_conv_17/project/weights",
            "MobilenetV2/expanded_conv_0/project/weights",
            "xception_65/entry_flow/conv1_1/weights",
            "something/else",
        ] {
            assert_eq!(map(bad, &b), None, "{bad}");
        }
    }

    #[test]
    fn xception_and_resnet_names() {
        let x = BackboneConfig::Xception(XceptionConfig::xception65());
        let cases = [
            ("xception_65/entry_flow/conv1_2/BatchNorm/gamma", "backbone.stem.1.bn.weight"),
            (
                "xception_65/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise/weights",
                "backbone.blocks.1.stack.conv2.conv_pw.weight",
            ),
            (
                "xception_65/middle_flow/block1/unit_16/xception_module/separable_conv3_depthwise/BatchNorm/beta",
                "backbone.blocks.18.stack.conv3.bn_dw.bias",
            ),
            (
                "xception_65/exit_flow/block1/unit_1/xception_module/shortcut/weights",
                "backbone.blocks.19.shortcut.conv.weight",
            ),
            (
                "xception_65/exit_flow/block2/unit_1/xception_module/separable_conv1_depthwise/depthwise_weights",
                "backbone.blocks.20.stack.conv1.conv_dw.weight",
            ),
        ];
        for (tf, want) in cases {
            assert_eq!(map(tf, &x).as_deref(), Some(want), "{tf}");
        }
        assert_eq!(
            map(
                "xception_65/middle_flow/block1/unit_17/xception_module/shortcut/weights",
                &x
            ),
            None
        );
        let x71 = BackboneConfig::Xception(XceptionConfig::xception71());
        assert_eq!(
            map("xception_71/middle_flow/block1/unit_1/xception_module/separable_conv1_depthwise/depthwise_weights", &x71)
                .as_deref(),
            Some("backbone.blocks.5.stack.conv1.conv_dw.weight")
        );
        assert_eq!(
            map("xception_65/entry_flow/conv1_1/weights", &x71),
            None,
            "scope of another depth"
        );
        let r = BackboneConfig::ResNet(ResNetConfig::resnet101_beta());
        let cases = [
            ("resnet_v1_101/conv1_1/weights", "backbone.conv1.0.weight"),
            (
                "resnet_v1_101/conv1_2/BatchNorm/gamma",
                "backbone.conv1.4.weight",
            ),
            (
                "resnet_v1_101/conv1_3/BatchNorm/moving_mean",
                "backbone.bn1.running_mean",
            ),
            (
                "resnet_v1_101/block1/unit_1/bottleneck_v1/shortcut/weights",
                "backbone.layer1.0.downsample.0.weight",
            ),
            (
                "resnet_v1_101/block3/unit_23/bottleneck_v1/conv2/BatchNorm/beta",
                "backbone.layer3.22.bn2.bias",
            ),
        ];
        for (tf, want) in cases {
            assert_eq!(map(tf, &r).as_deref(), Some(want), "{tf}");
        }
        assert_eq!(
            map(
                "resnet_v1_101/block3/unit_24/bottleneck_v1/conv2/weights",
                &r
            ),
            None
        );
        assert_eq!(map("resnet_v1_50/conv1_1/weights", &r), None);
    }

    #[test]
    fn layouts() {
        // conv [kh=1, kw=2, ci=2, co=3]: value = 100*y + 10*x + ... encode indices.
        let (kh, kw, ci, co) = (1, 2, 2, 3);
        let mut v = vec![0f32; kh * kw * ci * co];
        for x in 0..kw {
            for i in 0..ci {
                for o in 0..co {
                    v[(x * ci + i) * co + o] = (x * 100 + i * 10 + o) as f32;
                }
            }
        }
        let out = convert_values(&[kh, kw, ci, co], TfLayout::Conv, &v);
        assert_eq!(
            converted_shape(&[kh, kw, ci, co], TfLayout::Conv),
            Some(vec![co, ci, kh, kw])
        );
        // out[o][i][0][x]
        assert_eq!(out[((2 * ci + 1) * kh) * kw + 1], 112.0);
        let d = convert_values(
            &[1, 2, 3, 1],
            TfLayout::Depthwise,
            &[0., 1., 2., 10., 11., 12.],
        );
        assert_eq!(d, vec![0., 10., 1., 11., 2., 12.]);
        assert_eq!(converted_shape(&[3, 3, 5, 2], TfLayout::Depthwise), None);
    }
}
