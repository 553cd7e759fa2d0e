//! TFLite DeepLab models → canonical safetensors.
//!
//! Imports DeepLabv3-MobileNetV2 models exported to TFLite the way TensorFlow published
//! `deeplabv3_257_mv_gpu.tflite` (width 0.5, output stride 8, float32) and
//! `deeplabv3_mnv2_pascal_quant.tflite` (width 1.0, output stride 16, uint8 quantization-aware
//! trained): the graph of tensorflow/models `research/deeplab/model.py` (`extract_features` with
//! image pooling + the 1x1 ASPP branch, `_get_logits`, `predict_labels`) on slim's
//! `mobilenet_v2.py`, with every BatchNorm folded into its convolution by the TFLite converter.
//! The file is read with `deeplab-formats` ([`deeplab_formats::TfliteModel`]).
//!
//! What the converter does:
//! - Walks the main subgraph in execution order. Every `CONV_2D` / `DEPTHWISE_CONV_2D` is
//!   assigned to a layer by the TensorFlow scope in its tensor names (weights, then bias, then
//!   output: `MobilenetV2/Conv`, `MobilenetV2/expanded_conv[_N]/{expand,depthwise,project}`,
//!   `image_pooling`, `aspp0`, `aspp{i}[_depthwise|_pointwise]`, `concat_projection`,
//!   `logits/semantic`), which names the canonical module exactly as the checkpoint importer
//!   does ([`crate::convert::map_variable`]).
//! - Infers the model: the output stride from the product of the convolution strides, the
//!   MobileNetV2 width and channel rounding from the weight shapes (the checkpoint importer's
//!   inference, fed the TFLite shapes), the ASPP layout from the scopes present, the atrous
//!   rates from the ASPP convolutions' dilations; then checks the result against every tensor
//!   the model loads.
//! - Checks the dataflow against what [`crate::DeepLabModel`] computes: every convolution reads
//!   the value the model feeds that layer (following `ADD`, `AVERAGE_POOL_2D` / `MEAN`,
//!   `RESIZE_BILINEAR`, `CONCATENATION`, `QUANTIZE` / `DEQUANTIZE` and `ARG_MAX`), with the
//!   model's kernel, stride, dilation (the backbone's output-stride scheme), `SAME` padding
//!   (equal to the backbone's [`StridedPadding::TfSame`] at stride 2, and to symmetric padding
//!   at stride 1) and fused activation (ReLU6 after the stem, expansions and depthwise convs,
//!   none after projections, ReLU in the ASPP, none on the logits); residual adds exactly where
//!   the model adds; global average pooling; image-pooling broadcast; concatenation in the
//!   model's order ([image pooling, 1x1, atrous...], whatever order the ops run in); resizes
//!   with the configured `align_corners`; the graph output is the logits upsampled to the input
//!   size (or their argmax). Anything else is an error naming the operator, e.g.
//!   `operator #9 MUL (output tensor 86 'x'): unsupported operator ...`.
//! - Converts layouts: TFLite conv weights `[Cout, kh, kw, Cin]` → `[Cout, Cin, kh, kw]`,
//!   depthwise `[1, kh, kw, C]` → `[C, 1, kh, kw]`; dequantizes uint8/int8 weights
//!   (`scale * (q - zero_point)`, per tensor or per channel) and int32 biases (scale
//!   `input_scale * weight_scale[c]`, as the TFLite kernels apply them; zero point 0).
//! - Expresses each folded BatchNorm as an identity BatchNorm carrying the bias: `weight` 1,
//!   `bias` b, `running_mean` 0, `running_var` `1 - eps` (in f32), whose evaluation scale
//!   `1 / sqrt(running_var + eps)` is exactly 1 in f32 (see the unit tests, which run it through
//!   [`deeplab_ops::BatchNorm2d`]).
//! - Stores the input normalization: from the input tensor's quantization for a uint8 input
//!   (`scale * (pixel - zero_point)`: the quantized model's 1/128 and 128 give `(x - 128) / 128`),
//!   [`InputNormalization::Official`] (`x * 2/255 - 1 = (x - 127.5) / 127.5`, the DeepLab
//!   convention the published float model expects) for a float input, whose preprocessing the
//!   file does not record; [`TfliteOptions::normalization`] overrides both.
//!
//! Not supported (clear errors): the DeepLabv3+ decoder, backbones other than MobileNetV2,
//! ops outside the list above, depth multipliers other than 1, sparse or string tensors.
//!
//! Keys written: the crate's key scheme (see the crate docs), e.g.
//! `backbone.blocks.1.0.conv_dw.weight`, `backbone.blocks.1.0.bn2.bias`, `aspp.pooling.conv.weight`,
//! `classifier.bias`.

use crate::config::{DeepLabConfig, InputNormalization};
use crate::convert::{map_variable, plan_conversion, ConversionPlan, ConvertOptions};
use crate::error::{ModelError, Result};
use crate::weights::{save_weights, NamedTensor};
use deeplab_backbones::{BackboneConfig, MobileNetV2Config, OutputStride, StridedPadding};
use deeplab_formats::tflite::{
    Activation as TfActivation, BuiltinOp, BuiltinOptions, Operator, Padding, SubGraph,
    Tensor as TfTensor, TensorData, TensorType,
};
use deeplab_formats::TfliteModel;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Options of a TFLite conversion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TfliteOptions {
    /// Use exactly this configuration instead of inferring one (the graph must match it).
    pub config: Option<DeepLabConfig>,
    /// The input normalization to store (default: see the module docs).
    pub normalization: Option<InputNormalization>,
}

/// How a layer's weights were stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightEncoding {
    /// float32 or float16.
    Float,
    /// uint8 / int8 with one scale and zero point.
    PerTensor,
    /// uint8 / int8 with a scale and zero point per output channel.
    PerChannel,
}

/// The graph input.
#[derive(Clone, Debug, PartialEq)]
pub struct TfliteInput {
    /// Tensor name.
    pub name: String,
    /// Height the model was exported for.
    pub height: usize,
    /// Width the model was exported for.
    pub width: usize,
    /// Element type (`float32`, `uint8`, `int8`).
    pub dtype: String,
    /// `(scale, zero_point)` of a quantized input.
    pub quantization: Option<(f32, i64)>,
}

/// What the graph outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TfliteOutput {
    /// Logits `[1, height, width, classes]` (upsampled to the input size, or at the output
    /// stride when the graph does not upsample).
    Logits {
        /// Height.
        height: usize,
        /// Width.
        width: usize,
        /// Classes.
        classes: usize,
    },
    /// The per-pixel argmax of the upsampled logits, `[1, height, width]`.
    ArgMax {
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
}

/// One converted convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertedLayer {
    /// Operator index in the subgraph.
    pub op_index: usize,
    /// `CONV_2D` or `DEPTHWISE_CONV_2D`.
    pub op: String,
    /// The TensorFlow scope it was assigned to (e.g. `MobilenetV2/expanded_conv_3/depthwise`).
    pub scope: String,
    /// The weight tensor's name.
    pub weights: String,
    /// The bias tensor's name, if any.
    pub bias: Option<String>,
    /// The canonical convolution module (e.g. `backbone.blocks.2.0.conv_dw`).
    pub module: String,
    /// The canonical BatchNorm module carrying the folded bias (`None` for the classifier).
    pub bn: Option<String>,
    /// How the weights were stored.
    pub encoding: WeightEncoding,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
}

/// What a conversion found and produced.
#[derive(Clone, Debug)]
pub struct TfliteReport {
    /// The TFLite file.
    pub source: PathBuf,
    /// The inferred (or given) model configuration, normalization included.
    pub config: DeepLabConfig,
    /// The graph input.
    pub input: TfliteInput,
    /// The graph output.
    pub output: TfliteOutput,
    /// Every convolution, in execution order.
    pub layers: Vec<ConvertedLayer>,
    /// Number of operators in the graph.
    pub operators: usize,
}

impl TfliteReport {
    /// `true` when any layer's weights were stored quantized (and have been dequantized).
    pub fn quantized(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.encoding != WeightEncoding::Float)
    }
}

impl fmt::Display for TfliteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let head = if c.aspp.image_pooling {
            "image pooling + 1x1"
        } else {
            "1x1"
        };
        let rates = if c.aspp.atrous_rates.is_empty() {
            String::new()
        } else {
            format!(" + atrous {:?}", c.aspp.atrous_rates)
        };
        writeln!(
            f,
            "{}: DeepLabv3 {} (output stride {}), ASPP {head}{rates}, {} classes",
            self.source.display(),
            c.backbone.name(),
            c.output_stride().value(),
            c.num_classes
        )?;
        let q = match self.input.quantization {
            Some((s, z)) => format!(" (scale {s}, zero point {z})"),
            None => String::new(),
        };
        let out = match &self.output {
            TfliteOutput::Logits {
                height,
                width,
                classes,
            } => format!("{height}x{width}x{classes} logits"),
            TfliteOutput::ArgMax { height, width } => format!("{height}x{width} argmax"),
        };
        writeln!(
            f,
            "input {}x{}x3 {}{q}, output {out}; stored normalization {:?}",
            self.input.height, self.input.width, self.input.dtype, c.normalization
        )?;
        let per_tensor = self
            .layers
            .iter()
            .filter(|l| l.encoding == WeightEncoding::PerTensor)
            .count();
        let per_channel = self
            .layers
            .iter()
            .filter(|l| l.encoding == WeightEncoding::PerChannel)
            .count();
        write!(
            f,
            "{} operators, {} convolutions converted ({} float, {per_tensor} per-tensor and {per_channel} per-channel quantized, dequantized); folded BatchNorms stored as identity BatchNorms carrying the bias",
            self.operators,
            self.layers.len(),
            self.layers.len() - per_tensor - per_channel
        )
    }
}

/// The result of a conversion: the canonical tensors and the report.
#[derive(Clone, Debug)]
pub struct TfliteConversion {
    /// The model configuration (as in the report).
    pub config: DeepLabConfig,
    /// Every canonical tensor, in the model's order.
    pub tensors: Vec<NamedTensor>,
    /// What was found.
    pub report: TfliteReport,
}

/// `true` when the file at `path` starts like a TFLite flatbuffer (identifier `TFL3` at byte 4),
/// e.g. to pick this importer over the checkpoint one. Unreadable files give `false`.
pub fn looks_like_tflite(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| &head[4..8] == b"TFL3")
        .unwrap_or(false)
}

/// Converts the TFLite model at `input` and writes the canonical safetensors file `output`
/// atomically (an existing `output` is replaced only once everything succeeded).
pub fn convert_tflite(input: &Path, output: &Path, opts: &TfliteOptions) -> Result<TfliteReport> {
    let conv = read_tflite(input, opts)?;
    save_weights(output, &conv.config, &conv.tensors)?;
    Ok(conv.report)
}

/// Opens and converts a TFLite model without writing anything.
pub fn read_tflite(path: &Path, opts: &TfliteOptions) -> Result<TfliteConversion> {
    let model = TfliteModel::open(path)?;
    convert_tflite_model(&model, opts)
}

/// Converts an opened TFLite model (see the module docs).
pub fn convert_tflite_model(model: &TfliteModel, opts: &TfliteOptions) -> Result<TfliteConversion> {
    let path = model.path().to_path_buf();
    let sub = model.main_subgraph();
    let input = graph_input(&path, sub)?;

    // Weights that reach a convolution through a DEQUANTIZE (float16 models) are read at
    // the DEQUANTIZE's constant input.
    let mut const_alias = HashMap::new();
    for op in &sub.operators {
        if op.op == BuiltinOp::DEQUANTIZE {
            if let (Some(Some(i)), Some(&o)) = (op.inputs.first(), op.outputs.first()) {
                if sub.tensors[*i].has_data {
                    const_alias.insert(o, *i);
                }
            }
        }
    }

    let mut convs = Vec::new();
    for op in &sub.operators {
        if op.op == BuiltinOp::CONV_2D || op.op == BuiltinOp::DEPTHWISE_CONV_2D {
            convs.push(parse_conv(&path, sub, op, &const_alias)?);
        }
    }
    if convs.is_empty() {
        return Err(unsupported(
            &path,
            "the graph has no convolutions: not a DeepLab model".into(),
        ));
    }

    // The checkpoint importer's variable list, in TensorFlow layouts, for inference and checks.
    let mut variables: Vec<(String, Vec<usize>)> = Vec::new();
    let mut sources: HashMap<String, (usize, Part)> = HashMap::new();
    let mut scope_op: HashMap<&str, usize> = HashMap::new();
    for (ci, c) in convs.iter().enumerate() {
        if let Some(prev) = scope_op.insert(c.scope.as_str(), c.op.index) {
            return Err(op_error(
                &path,
                sub,
                c.op,
                format!(
                    "its layer '{}' was already converted from operator #{prev}",
                    c.scope
                ),
            ));
        }
        if c.scope.starts_with("decoder/") {
            return Err(op_error(
                &path,
                sub,
                c.op,
                format!("layer '{}' belongs to a DeepLabv3+ decoder; converting TFLite decoders is not supported", c.scope),
            ));
        }
        let w = &c.weights.shape;
        let (kh, kw) = (w[1], w[2]);
        let cout = c.out_channels();
        let (leaf, tf_shape) = if c.depthwise {
            ("depthwise_weights", vec![kh, kw, cout, 1])
        } else {
            ("weights", vec![kh, kw, w[3], cout])
        };
        let mut push = |name: String, shape: Vec<usize>, part: Part| {
            variables.push((name.clone(), shape));
            sources.insert(name, (ci, part));
        };
        if c.scope == "logits/semantic" {
            push(format!("{}/weights", c.scope), tf_shape, Part::Weights);
            push(format!("{}/biases", c.scope), vec![cout], Part::Bias);
        } else {
            push(format!("{}/{leaf}", c.scope), tf_shape, Part::Weights);
            for (leaf, part) in [
                ("gamma", Part::Gamma),
                ("beta", Part::Bias),
                ("moving_mean", Part::Mean),
                ("moving_variance", Part::Var),
            ] {
                push(format!("{}/BatchNorm/{leaf}", c.scope), vec![cout], part);
            }
        }
    }

    // Output stride: the product of every convolution stride.
    let total_stride: usize = convs.iter().map(|c| c.stride).product();
    let os = OutputStride::new(total_stride).map_err(|_| {
        unsupported(
            &path,
            format!("the convolution strides multiply to {total_stride}; a DeepLab model has output stride 8, 16 or 32"),
        )
    })?;
    // Atrous rates from the dilations of the ASPP branches aspp1, aspp2, ...
    let mut rates = BTreeMap::new();
    for c in &convs {
        if let Some(rest) = c.scope.strip_prefix("aspp") {
            let idx = rest.split('_').next().unwrap_or("");
            if let Ok(i) = idx.parse::<usize>() {
                if i > 0 && !rest.ends_with("_pointwise") {
                    rates.insert(i, c.dilation);
                }
            }
        }
    }
    let atrous_rates = if rates.is_empty() {
        None
    } else if rates.keys().copied().eq(1..=rates.len()) {
        Some(rates.values().copied().collect())
    } else {
        return Err(unsupported(
            &path,
            format!(
                "ASPP branches {:?} are not numbered 1..n",
                rates.keys().collect::<Vec<_>>()
            ),
        ));
    };
    let copts = ConvertOptions {
        config: opts.config.clone(),
        output_stride: Some(os),
        atrous_rates,
        multi_grid: None,
        eval_output_stride: None,
    };
    let ConversionPlan {
        mut config,
        variables: planned,
        ..
    } = plan_conversion(&variables, &path, &copts).map_err(|e| match e {
        ModelError::Convert {
            path,
            variable,
            detail,
        } => match sources.get(&variable) {
            Some(&(ci, _)) => op_error(
                &path,
                sub,
                convs[ci].op,
                format!("layer '{}': {detail}", convs[ci].scope),
            ),
            None => ModelError::Convert {
                path,
                variable,
                detail,
            },
        },
        // The importer speaks of checkpoint variables; here they are layers of the graph.
        ModelError::Unsupported { path, detail } => ModelError::Unsupported {
            path,
            detail: detail
                .replace(
                    "the checkpoint has no variable for",
                    "the TFLite graph has no convolution for",
                )
                .replace(
                    "not an official DeepLab segmentation checkpoint",
                    "the TFLite graph has no such layer, so it is not a DeepLab segmentation model",
                )
                .replace("no backbone variables", "no backbone layers"),
        },
        other => other,
    })?;
    config.normalization = match (opts.normalization, &opts.config) {
        (Some(n), _) => n,
        (None, Some(c)) => c.normalization,
        (None, None) => input_normalization(&input),
    };
    config.validate().map_err(|detail| ModelError::Config {
        path: path.clone(),
        detail,
    })?;

    // Which canonical modules each convolution became.
    let mut module = vec![String::new(); convs.len()];
    let mut bn = vec![None; convs.len()];
    for pv in &planned {
        let Some(&(ci, part)) = sources.get(&pv.official) else {
            continue;
        };
        match part {
            Part::Weights => {
                module[ci] = pv.canonical.trim_end_matches(".weight").to_string();
            }
            Part::Gamma => bn[ci] = Some(pv.canonical.trim_end_matches(".weight").to_string()),
            _ => {}
        }
    }

    let expected = expected_graph(&config).map_err(|detail| ModelError::Config {
        path: path.clone(),
        detail,
    })?;
    let conv_of_op: HashMap<usize, usize> = convs
        .iter()
        .enumerate()
        .map(|(ci, c)| (c.op.index, ci))
        .collect();
    let output = check_graph(
        &path,
        model,
        &config,
        &expected,
        &convs,
        &conv_of_op,
        &module,
    )?;

    // The tensors, in the model's order.
    let mut tensors = Vec::with_capacity(planned.len());
    for pv in &planned {
        let &(ci, part) = sources
            .get(&pv.official)
            .ok_or_else(|| ModelError::Convert {
                path: path.clone(),
                variable: pv.official.clone(),
                detail: "internal: planned variable without a source".into(),
            })?;
        let c = &convs[ci];
        let n: usize = pv.shape.iter().product();
        let data = match part {
            Part::Weights => {
                let v = model.dequantize(c.weights)?;
                check_finite(&path, sub, c, c.weights, &v)?;
                convert_layout(&c.weights.shape, c.depthwise, &v)
            }
            Part::Bias => bias_values(model, sub, c)?,
            Part::Gamma => vec![1.0; n],
            Part::Mean => vec![0.0; n],
            Part::Var => {
                let eps = bn_eps(&config, &pv.canonical);
                if !(eps > 0.0 && eps < 1.0) {
                    return Err(ModelError::Config {
                        path: path.clone(),
                        detail: format!("BatchNorm epsilon {eps} of '{}' leaves no identity BatchNorm (running_var = 1 - eps must be positive)", pv.canonical),
                    });
                }
                vec![identity_running_var(eps); n]
            }
        };
        if data.len() != n {
            return Err(op_error(
                &path,
                sub,
                c.op,
                format!(
                    "'{}' needs {n} values for shape {:?}, the file gives {}",
                    pv.canonical,
                    pv.shape,
                    data.len()
                ),
            ));
        }
        tensors.push(NamedTensor {
            name: pv.canonical.clone(),
            shape: pv.shape.clone(),
            data,
        });
    }

    let layers = convs
        .iter()
        .enumerate()
        .map(|(ci, c)| ConvertedLayer {
            op_index: c.op.index,
            op: c.op.op.to_string(),
            scope: c.scope.clone(),
            weights: c.weights.name.clone(),
            bias: c.bias.map(|b| b.name.clone()),
            module: module[ci].clone(),
            bn: bn[ci].clone(),
            encoding: match &c.weights.quantization {
                _ if matches!(c.weights.dtype, TensorType::Float32 | TensorType::Float16) => {
                    WeightEncoding::Float
                }
                Some(q) if q.scale.len() > 1 => WeightEncoding::PerChannel,
                _ => WeightEncoding::PerTensor,
            },
            stride: c.stride,
            dilation: c.dilation,
        })
        .collect();
    let report = TfliteReport {
        source: path,
        config: config.clone(),
        input,
        output,
        layers,
        operators: sub.operators.len(),
    };
    Ok(TfliteConversion {
        config,
        tensors,
        report,
    })
}

/// The f32 `running_var` whose `running_var + eps` is exactly 1 in f32 (`1 - eps`): with
/// `weight` 1 and `running_mean` 0 the BatchNorm's evaluation scale is exactly 1 and its shift
/// exactly its `bias`.
pub fn identity_running_var(eps: f64) -> f32 {
    1.0f32 - eps as f32
}

/// What a synthesized checkpoint variable is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Weights,
    Bias,
    Gamma,
    Mean,
    Var,
}

/// One convolution operator of the graph.
struct ConvOp<'a> {
    op: &'a Operator,
    depthwise: bool,
    input: usize,
    weights: &'a TfTensor,
    bias: Option<&'a TfTensor>,
    stride: usize,
    dilation: usize,
    padding: Padding,
    act: TfActivation,
    scope: String,
}

impl ConvOp<'_> {
    fn out_channels(&self) -> usize {
        let w = &self.weights.shape;
        if self.depthwise {
            w[3]
        } else {
            w[0]
        }
    }

    fn kernel(&self) -> (usize, usize) {
        (self.weights.shape[1], self.weights.shape[2])
    }
}

fn unsupported(path: &Path, detail: String) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        detail,
    }
}

/// `operator #i OP (output tensor j 'name')`.
fn describe_op(sub: &SubGraph, op: &Operator) -> String {
    let name = match &op.custom_code {
        Some(c) => format!("CUSTOM({c})"),
        None => op.op.to_string(),
    };
    match op.outputs.first().and_then(|&o| sub.tensors.get(o)) {
        Some(t) => format!(
            "operator #{} {name} (output tensor {} '{}')",
            op.index, t.index, t.name
        ),
        None => format!("operator #{} {name}", op.index),
    }
}

fn op_error(path: &Path, sub: &SubGraph, op: &Operator, detail: String) -> ModelError {
    unsupported(path, format!("{}: {detail}", describe_op(sub, op)))
}

fn tensor_desc(t: &TfTensor) -> String {
    format!("tensor {} '{}'", t.index, t.name)
}

fn graph_input(path: &Path, sub: &SubGraph) -> Result<TfliteInput> {
    let [i] = sub.inputs.as_slice() else {
        return Err(unsupported(
            path,
            format!(
                "the graph has {} inputs; a DeepLab model has one image input",
                sub.inputs.len()
            ),
        ));
    };
    let t = &sub.tensors[*i];
    let (h, w) = match t.shape.as_slice() {
        [1, h, w, 3] if *h > 0 && *w > 0 => (*h, *w),
        s => {
            return Err(unsupported(
                path,
                format!(
                    "input {} has shape {s:?}; expected one RGB image [1, H, W, 3]",
                    tensor_desc(t)
                ),
            ))
        }
    };
    let quantization = match (&t.dtype, &t.quantization) {
        (TensorType::Float32, _) => None,
        (TensorType::UInt8 | TensorType::Int8, Some(q)) if q.scale.len() == 1 => {
            let (s, z) = (q.scale[0], q.zero_point.first().copied().unwrap_or(0));
            if !(s.is_finite() && s > 0.0) {
                return Err(unsupported(
                    path,
                    format!("input {} has quantization scale {s}", tensor_desc(t)),
                ));
            }
            Some((s, z))
        }
        (d, _) => {
            return Err(unsupported(
                path,
                format!(
                "input {} is {d}{}; expected float32, or uint8/int8 with one scale and zero point",
                tensor_desc(t),
                if t.quantization.is_none() {
                    " without quantization"
                } else {
                    ""
                }
            ),
            ))
        }
    };
    Ok(TfliteInput {
        name: t.name.clone(),
        height: h,
        width: w,
        dtype: t.dtype.to_string(),
        quantization,
    })
}

/// The normalization a graph input implies: `scale * (pixel - zero_point)` for uint8 (int8
/// inputs are taken as `pixel - 128`); `Official` for float inputs.
fn input_normalization(input: &TfliteInput) -> InputNormalization {
    match input.quantization {
        Some((s, z)) => {
            let offset = if input.dtype == TensorType::Int8.to_string() {
                128.0
            } else {
                0.0
            };
            let mean = ((z as f64 + offset) / 255.0) as f32;
            let std = (1.0 / (255.0 * s as f64)) as f32;
            InputNormalization::MeanStd {
                mean: [mean; 3],
                std: [std; 3],
            }
        }
        None => InputNormalization::Official,
    }
}

/// The TensorFlow layer scope a convolution belongs to: the longest prefix of its weight,
/// bias or output tensor name (tried in that order) that names a DeepLab layer.
fn layer_scope(names: &[&str]) -> Option<String> {
    let probe = BackboneConfig::MobileNetV2(MobileNetV2Config::mobilenetv2_100());
    for name in names {
        let mut s = *name;
        loop {
            if !s.is_empty() && map_variable(&format!("{s}/weights"), &probe).is_some() {
                return Some(s.to_string());
            }
            match s.rsplit_once('/') {
                Some((p, _)) => s = p,
                None => break,
            }
        }
    }
    None
}

fn parse_conv<'a>(
    path: &Path,
    sub: &'a SubGraph,
    op: &'a Operator,
    const_alias: &HashMap<usize, usize>,
) -> Result<ConvOp<'a>> {
    let err = |d: String| op_error(path, sub, op, d);
    let depthwise = op.op == BuiltinOp::DEPTHWISE_CONV_2D;
    let (padding, sh, sw, dh, dw, act, mult) = match &op.options {
        BuiltinOptions::Conv2D(o) if !depthwise => (
            o.padding,
            o.stride_h,
            o.stride_w,
            o.dilation_h,
            o.dilation_w,
            o.activation,
            1,
        ),
        BuiltinOptions::DepthwiseConv2D(o) if depthwise => (
            o.padding,
            o.stride_h,
            o.stride_w,
            o.dilation_h,
            o.dilation_w,
            o.activation,
            o.depth_multiplier,
        ),
        other => {
            return Err(err(format!(
                "has options '{other}', not convolution options"
            )))
        }
    };
    if sh < 1 || sw < 1 || dh < 1 || dw < 1 || sh != sw || dh != dw {
        return Err(err(format!(
            "stride {sh}x{sw} / dilation {dh}x{dw}: only equal, positive strides and dilations are supported"
        )));
    }
    let tensor = |k: usize| op.inputs.get(k).copied().flatten().map(|i| &sub.tensors[i]);
    let x = tensor(0).ok_or_else(|| err("has no input tensor".into()))?;
    let w = op
        .inputs
        .get(1)
        .copied()
        .flatten()
        .map(|i| &sub.tensors[const_alias.get(&i).copied().unwrap_or(i)])
        .ok_or_else(|| err("has no weight tensor".into()))?;
    let b = tensor(2);
    let &out = op
        .outputs
        .first()
        .ok_or_else(|| err("has no output tensor".into()))?;
    if !w.has_data {
        return Err(err(format!(
            "weight {} is computed at run time, not a constant",
            tensor_desc(w)
        )));
    }
    if !matches!(
        w.dtype,
        TensorType::Float32 | TensorType::Float16 | TensorType::UInt8 | TensorType::Int8
    ) {
        return Err(err(format!(
            "weight {} has type {}; only float32, float16, uint8 and int8 weights can be converted",
            tensor_desc(w),
            w.dtype
        )));
    }
    let cin = match x.shape.as_slice() {
        [1, _, _, c] => *c,
        s => {
            return Err(err(format!(
                "input {} has shape {s:?}; expected [1, H, W, C]",
                tensor_desc(x)
            )))
        }
    };
    let ws = w.shape.as_slice();
    let shape_ok = match ws {
        [1, kh, kw, c] if depthwise => *kh > 0 && *kw > 0 && *c == cin && mult == 1,
        [co, kh, kw, ci] if !depthwise => *co > 0 && *kh > 0 && *kw > 0 && *ci == cin,
        _ => false,
    };
    if !shape_ok {
        return Err(err(if depthwise {
            format!("weight {} has shape {ws:?} with depth multiplier {mult} for {cin} input channels; only [1, kh, kw, C] with multiplier 1 is supported", tensor_desc(w))
        } else {
            format!(
                "weight {} has shape {ws:?}; expected [Cout, kh, kw, {cin}]",
                tensor_desc(w)
            )
        }));
    }
    let cout = if depthwise { ws[3] } else { ws[0] };
    if let Some(b) = b {
        if !b.has_data
            || b.shape != [cout]
            || !matches!(
                b.dtype,
                TensorType::Float32 | TensorType::Float16 | TensorType::Int32
            )
        {
            return Err(err(format!(
                "bias {} is {} {:?}{}; expected a constant float32/float16/int32 vector of {cout}",
                tensor_desc(b),
                b.dtype,
                b.shape,
                if b.has_data { "" } else { " without data" }
            )));
        }
    }
    let out_name = sub.tensors[out].name.as_str();
    let mut names = vec![w.name.as_str()];
    if let Some(b) = b {
        names.push(b.name.as_str());
    }
    names.push(out_name);
    let scope = layer_scope(&names).ok_or_else(|| {
        err(format!(
            "cannot tell which DeepLab layer weight {} belongs to (no TensorFlow scope such as 'MobilenetV2/expanded_conv_3/depthwise', 'aspp0' or 'logits/semantic' in its name, its bias's or its output's)",
            tensor_desc(w)
        ))
    })?;
    Ok(ConvOp {
        op,
        depthwise,
        input: x.index,
        weights: w,
        bias: b,
        stride: sh as usize,
        dilation: dh as usize,
        padding,
        act,
        scope,
    })
}

/// TFLite `[Cout, kh, kw, Cin]` → `[Cout, Cin, kh, kw]`; depthwise `[1, kh, kw, C]` →
/// `[C, 1, kh, kw]` (row-major values).
pub fn convert_layout(tflite_shape: &[usize], depthwise: bool, v: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    match (depthwise, tflite_shape) {
        (false, &[co, kh, kw, ci]) => {
            for o in 0..co {
                for y in 0..kh {
                    for x in 0..kw {
                        for i in 0..ci {
                            out[((o * ci + i) * kh + y) * kw + x] =
                                v[((o * kh + y) * kw + x) * ci + i];
                        }
                    }
                }
            }
        }
        (true, &[1, kh, kw, c]) => {
            for y in 0..kh {
                for x in 0..kw {
                    for ch in 0..c {
                        out[(ch * kh + y) * kw + x] = v[(y * kw + x) * c + ch];
                    }
                }
            }
        }
        _ => out.copy_from_slice(v),
    }
    out
}

fn check_finite(path: &Path, sub: &SubGraph, c: &ConvOp, t: &TfTensor, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(op_error(
            path,
            sub,
            c.op,
            format!(
                "{} has the non-finite value {} at flat index {i}",
                tensor_desc(t),
                v[i]
            ),
        )),
        None => Ok(()),
    }
}

/// The real bias of a convolution (zeros without a bias tensor). An int32 bias of a quantized
/// convolution is scaled by `input_scale * weight_scale[c]`, as the TFLite kernels add it to
/// the integer accumulator; otherwise it is dequantized with its own parameters.
fn bias_values(model: &TfliteModel, sub: &SubGraph, c: &ConvOp) -> Result<Vec<f32>> {
    let path = model.path();
    let cout = c.out_channels();
    let Some(b) = c.bias else {
        return Ok(vec![0.0; cout]);
    };
    let input_scale = sub.tensors[c.input]
        .quantization
        .as_ref()
        .filter(|q| q.scale.len() == 1)
        .map(|q| q.scale[0]);
    let weight_scales = c
        .weights
        .quantization
        .as_ref()
        .map(|q| q.scale.clone())
        .filter(|s| s.len() == 1 || s.len() == cout);
    let values = match (b.dtype, input_scale, weight_scales) {
        (TensorType::Int32, Some(si), Some(sw)) => {
            if let Some(q) = &b.quantization {
                if q.zero_point.iter().any(|&z| z != 0) {
                    return Err(op_error(
                        path,
                        sub,
                        c.op,
                        format!(
                            "int32 bias {} has zero points {:?}; TFLite requires 0",
                            tensor_desc(b),
                            q.zero_point
                        ),
                    ));
                }
            }
            let TensorData::I32(q) = model.tensor_data(b)? else {
                return Err(op_error(
                    path,
                    sub,
                    c.op,
                    format!("bias {} did not decode as int32", tensor_desc(b)),
                ));
            };
            q.iter()
                .enumerate()
                .map(|(o, &v)| {
                    let s = sw[if sw.len() == 1 { 0 } else { o }] as f64 * si as f64;
                    (v as f64 * s) as f32
                })
                .collect()
        }
        _ => model.dequantize(b)?,
    };
    check_finite(path, sub, c, b, &values)?;
    Ok(values)
}

/// The BatchNorm epsilon the model uses for the canonical tensor `name`.
fn bn_eps(config: &DeepLabConfig, name: &str) -> f64 {
    match (&config.backbone, name.starts_with("backbone.")) {
        (BackboneConfig::MobileNetV2(m), true) => m.bn_eps,
        _ => config.head_bn_eps,
    }
}

/// A value of the dataflow, in the model's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Sym {
    /// The normalized image.
    Input,
    /// The output of a convolution with its BatchNorm and activation (canonical module).
    Layer(String),
    /// The residual sum closing a block (canonical block prefix).
    Add(String),
    /// Global average over height and width.
    Mean(Box<Sym>),
    /// A 1x1 map resized (broadcast) to a feature map.
    Broadcast(Box<Sym>),
    /// A bilinear resize to another size.
    Resize(Box<Sym>),
    /// Channel concatenation, in order.
    Concat(Vec<Sym>),
    /// Per-pixel argmax over the channels.
    ArgMax(Box<Sym>),
}

impl fmt::Display for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sym::Input => f.write_str("the image input"),
            Sym::Layer(m) => write!(f, "the output of {m}"),
            Sym::Add(b) => write!(f, "the residual sum of {b}"),
            Sym::Mean(s) => write!(f, "global-mean({s})"),
            Sym::Broadcast(s) => write!(f, "broadcast({s})"),
            Sym::Resize(s) => write!(f, "resize({s})"),
            Sym::Concat(v) => {
                f.write_str("concat(")?;
                for (i, s) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{s}")?;
                }
                f.write_str(")")
            }
            Sym::ArgMax(s) => write!(f, "argmax({s})"),
        }
    }
}

/// What the model computes for one convolution.
#[derive(Clone, Debug)]
struct ExpectedLayer {
    input: Sym,
    depthwise: bool,
    kernel: usize,
    stride: usize,
    dilation: usize,
    act: TfActivation,
}

/// The model's dataflow.
struct Expected {
    layers: HashMap<String, ExpectedLayer>,
    /// `(a, b, sum)`: the model adds `a` and `b` (either order) into `sum`.
    adds: Vec<(Sym, Sym, Sym)>,
    logits: Sym,
}

/// The dataflow of `config`'s model: MobileNetV2 (the backbone's output-stride scheme: a
/// layer whose stride would exceed the output stride runs at stride 1 with the current rate,
/// and multiplies the rate of the layers after it), then the ASPP and the classifier.
fn expected_graph(config: &DeepLabConfig) -> std::result::Result<Expected, String> {
    let BackboneConfig::MobileNetV2(mb) = &config.backbone else {
        return Err(format!(
            "backbone {}: only MobileNetV2 models are converted from TFLite",
            config.backbone.name()
        ));
    };
    if config.decoder.is_some() {
        return Err("the DeepLabv3+ decoder is not supported in TFLite conversion".into());
    }
    let target = mb.output_stride.value();
    let (mut current, mut rate) = (1usize, 1usize);
    let mut unit = |s: usize| {
        let r = rate;
        if current >= target {
            rate *= s;
            (1, r)
        } else {
            current *= s;
            (s, r)
        }
    };
    let mut layers = HashMap::new();
    let mut add = |name: String, input: Sym, depthwise, kernel, (stride, dilation), act| {
        layers.insert(
            name.clone(),
            ExpectedLayer {
                input,
                depthwise,
                kernel,
                stride,
                dilation,
                act,
            },
        );
        Sym::Layer(name)
    };
    let mut adds = Vec::new();
    let mut v = add(
        "backbone.conv_stem".into(),
        Sym::Input,
        false,
        3,
        unit(2),
        TfActivation::Relu6,
    );
    let mut cin = mb.round_channels(mb.stem_channels);
    for (si, st) in mb.stages.iter().enumerate() {
        let cout = mb.round_channels(st.channels);
        for bi in 0..st.repeats {
            let (stride, r) = unit(if bi == 0 { st.stride } else { 1 });
            let p = format!("backbone.blocks.{si}.{bi}");
            let one = (1, 1);
            let last = if st.expansion == 1 {
                let d = add(
                    format!("{p}.conv_dw"),
                    v.clone(),
                    true,
                    3,
                    (stride, r),
                    TfActivation::Relu6,
                );
                add(format!("{p}.conv_pw"), d, false, 1, one, TfActivation::None)
            } else {
                let e = add(
                    format!("{p}.conv_pw"),
                    v.clone(),
                    false,
                    1,
                    one,
                    TfActivation::Relu6,
                );
                let d = add(
                    format!("{p}.conv_dw"),
                    e,
                    true,
                    3,
                    (stride, r),
                    TfActivation::Relu6,
                );
                add(
                    format!("{p}.conv_pwl"),
                    d,
                    false,
                    1,
                    one,
                    TfActivation::None,
                )
            };
            v = if stride == 1 && cin == cout {
                adds.push((last, v.clone(), Sym::Add(p.clone())));
                Sym::Add(p)
            } else {
                last
            };
            cin = cout;
        }
    }
    let feature = v;
    let one = (1, 1);
    let mut branches = Vec::new();
    if config.aspp.image_pooling {
        let p = add(
            "aspp.pooling.conv".into(),
            Sym::Mean(Box::new(feature.clone())),
            false,
            1,
            one,
            TfActivation::Relu,
        );
        branches.push(Sym::Broadcast(Box::new(p)));
    }
    branches.push(add(
        "aspp.convs.0.conv".into(),
        feature.clone(),
        false,
        1,
        one,
        TfActivation::Relu,
    ));
    for (i, &r) in config.aspp.atrous_rates.iter().enumerate() {
        let p = format!("aspp.convs.{}", i + 1);
        branches.push(if config.aspp.separable {
            let d = add(
                format!("{p}.conv_dw"),
                feature.clone(),
                true,
                3,
                (1, r),
                TfActivation::Relu,
            );
            add(format!("{p}.conv_pw"), d, false, 1, one, TfActivation::Relu)
        } else {
            add(
                format!("{p}.conv"),
                feature.clone(),
                false,
                3,
                (1, r),
                TfActivation::Relu,
            )
        });
    }
    let cat = if branches.len() == 1 {
        branches.remove(0)
    } else {
        Sym::Concat(branches)
    };
    let proj = add(
        "aspp.project.conv".into(),
        cat,
        false,
        1,
        one,
        TfActivation::Relu,
    );
    let logits = add("classifier".into(), proj, false, 1, one, TfActivation::None);
    Ok(Expected {
        layers,
        adds,
        logits,
    })
}

/// Integer values of a constant tensor (axes operands).
fn const_ints(model: &TfliteModel, t: &TfTensor) -> Option<Vec<i64>> {
    match model.tensor_data(t).ok()? {
        TensorData::I32(v) => Some(v.into_iter().map(i64::from).collect()),
        TensorData::I64(v) => Some(v),
        _ => None,
    }
}

fn hw4(t: &TfTensor) -> Option<(usize, usize, usize)> {
    match t.shape.as_slice() {
        [1, h, w, c] => Some((*h, *w, *c)),
        _ => None,
    }
}

/// Walks the graph and checks it computes what the model computes; returns what it outputs.
fn check_graph(
    path: &Path,
    model: &TfliteModel,
    config: &DeepLabConfig,
    expected: &Expected,
    convs: &[ConvOp],
    conv_of_op: &HashMap<usize, usize>,
    module: &[String],
) -> Result<TfliteOutput> {
    let sub = model.main_subgraph();
    let mut syms: HashMap<usize, Sym> = HashMap::new();
    for &i in &sub.inputs {
        syms.insert(i, Sym::Input);
    }
    let fixed_padding = matches!(
        &config.backbone,
        BackboneConfig::MobileNetV2(m) if m.strided_padding == StridedPadding::Fixed
    );
    for op in &sub.operators {
        let err = |d: String| op_error(path, sub, op, d);
        let input_t = |k: usize| -> Result<&TfTensor> {
            op.inputs
                .get(k)
                .copied()
                .flatten()
                .map(|i| &sub.tensors[i])
                .ok_or_else(|| err(format!("has no input {k}")))
        };
        let sym_of = |t: &TfTensor| -> Result<Sym> {
            syms.get(&t.index).cloned().ok_or_else(|| {
                err(format!(
                    "reads {}, which is neither the graph input nor the output of an operator the converter maps",
                    tensor_desc(t)
                ))
            })
        };
        let out = *op
            .outputs
            .first()
            .ok_or_else(|| err("has no output".into()))?;
        let out_t = &sub.tensors[out];
        let value = match op.op {
            BuiltinOp::CONV_2D | BuiltinOp::DEPTHWISE_CONV_2D => {
                let &ci = conv_of_op
                    .get(&op.index)
                    .ok_or_else(|| err("internal: convolution not parsed".into()))?;
                let c = &convs[ci];
                let m = &module[ci];
                let Some(e) = expected.layers.get(m) else {
                    return Err(err(format!("layer '{m}' is not part of the model")));
                };
                let got = sym_of(&sub.tensors[c.input])?;
                if got != e.input {
                    return Err(err(format!(
                        "layer '{}' ({m}) reads {got}, but the model feeds it {}",
                        c.scope, e.input
                    )));
                }
                if c.depthwise != e.depthwise {
                    return Err(err(format!(
                        "layer '{}' ({m}) is {}, the model's is {}",
                        c.scope,
                        if c.depthwise { "depthwise" } else { "dense" },
                        if e.depthwise { "depthwise" } else { "dense" }
                    )));
                }
                let (kh, kw) = c.kernel();
                if (kh, kw) != (e.kernel, e.kernel) {
                    return Err(err(format!(
                        "layer '{}' ({m}) has a {kh}x{kw} kernel, the model's is {k}x{k}",
                        c.scope,
                        k = e.kernel
                    )));
                }
                let dilation_matters = e.kernel > 1;
                if c.stride != e.stride || (dilation_matters && c.dilation != e.dilation) {
                    return Err(err(format!(
                        "layer '{}' ({m}) has stride {} and dilation {}, the model at output stride {} uses stride {} and dilation {}",
                        c.scope,
                        c.stride,
                        c.dilation,
                        config.output_stride().value(),
                        e.stride,
                        e.dilation
                    )));
                }
                if e.kernel > 1 && c.padding != Padding::Same {
                    return Err(err(format!(
                        "layer '{}' ({m}) uses VALID padding; the model pads like TensorFlow's SAME",
                        c.scope
                    )));
                }
                if fixed_padding && c.stride > 1 {
                    let in_t = &sub.tensors[c.input];
                    if let Some((h, w, _)) = hw4(in_t) {
                        if h % 2 == 0 || w % 2 == 0 {
                            return Err(err(format!(
                                "layer '{}' ({m}): SAME padding at stride {} on a {h}x{w} input is asymmetric, but the configured backbone pads symmetrically (strided_padding = fixed)",
                                c.scope, c.stride
                            )));
                        }
                    }
                }
                if c.act != e.act {
                    return Err(err(format!(
                        "layer '{}' ({m}) applies {} after its folded BatchNorm, the model applies {}",
                        c.scope, c.act, e.act
                    )));
                }
                Sym::Layer(m.clone())
            }
            BuiltinOp::ADD => {
                match &op.options {
                    BuiltinOptions::Add {
                        activation: TfActivation::None,
                    }
                    | BuiltinOptions::None => {}
                    o => {
                        return Err(err(format!(
                            "has options '{o}'; a residual add has no activation"
                        )))
                    }
                }
                let a = sym_of(input_t(0)?)?;
                let b = sym_of(input_t(1)?)?;
                match expected
                    .adds
                    .iter()
                    .find(|(x, y, _)| (*x == a && *y == b) || (*x == b && *y == a))
                {
                    Some((_, _, s)) => s.clone(),
                    None => {
                        return Err(err(format!(
                            "adds {a} and {b}, which the model never adds"
                        )))
                    }
                }
            }
            BuiltinOp::AVERAGE_POOL_2D => {
                let x = input_t(0)?;
                let global = match (&op.options, hw4(x), hw4(out_t)) {
                    (BuiltinOptions::Pool2D(p), Some((h, w, _)), Some((1, 1, _))) => {
                        p.filter_h as usize == h
                            && p.filter_w as usize == w
                            && p.padding == Padding::Valid
                            && p.activation == TfActivation::None
                    }
                    _ => false,
                };
                if !global {
                    return Err(err(format!(
                        "[{}] over {:?} is not a global average pooling (the only pooling the model does)",
                        op.options, x.shape
                    )));
                }
                Sym::Mean(Box::new(sym_of(x)?))
            }
            BuiltinOp::MEAN => {
                let x = input_t(0)?;
                let axes = const_ints(model, input_t(1)?);
                let axes = axes.map(|mut a| {
                    for v in &mut a {
                        if *v < 0 {
                            *v += 4;
                        }
                    }
                    a.sort_unstable();
                    a
                });
                let keep = matches!(op.options, BuiltinOptions::Reducer { keep_dims: true });
                if axes.as_deref() != Some(&[1, 2]) || !keep {
                    return Err(err(
                        "is not a global average over height and width with kept dimensions"
                            .into(),
                    ));
                }
                Sym::Mean(Box::new(sym_of(x)?))
            }
            BuiltinOp::RESIZE_BILINEAR => {
                let x = input_t(0)?;
                let s = sym_of(x)?;
                let (Some((h, w, _)), Some((oh, ow, _))) = (hw4(x), hw4(out_t)) else {
                    return Err(err("resizes a tensor that is not [1, H, W, C]".into()));
                };
                if (h, w) == (oh, ow) {
                    s
                } else if (h, w) == (1, 1) {
                    Sym::Broadcast(Box::new(s))
                } else {
                    let (ac, hp) = match op.options {
                        BuiltinOptions::ResizeBilinear {
                            align_corners,
                            half_pixel_centers,
                        } => (align_corners, half_pixel_centers),
                        _ => (false, false),
                    };
                    let want = if config.align_corners {
                        (true, false)
                    } else {
                        (false, true)
                    };
                    if (ac, hp) != want {
                        return Err(err(format!(
                            "resizes with align_corners={ac} half_pixel_centers={hp}; the model (align_corners = {}) resizes with align_corners={} half_pixel_centers={}",
                            config.align_corners, want.0, want.1
                        )));
                    }
                    Sym::Resize(Box::new(s))
                }
            }
            BuiltinOp::CONCATENATION => {
                match &op.options {
                    BuiltinOptions::Concatenation {
                        axis: 3 | -1,
                        activation: TfActivation::None,
                    } => {}
                    o => {
                        return Err(err(format!(
                            "[{o}]: only channel concatenation (axis 3) without activation is supported"
                        )))
                    }
                }
                let mut parts = Vec::new();
                for k in 0..op.inputs.len() {
                    parts.push(sym_of(input_t(k)?)?);
                }
                if parts.len() == 1 {
                    parts.remove(0)
                } else {
                    Sym::Concat(parts)
                }
            }
            BuiltinOp::QUANTIZE | BuiltinOp::DEQUANTIZE => {
                let x = input_t(0)?;
                if x.has_data {
                    continue; // a constant (weights) dequantized for a convolution
                }
                sym_of(x)?
            }
            BuiltinOp::ARG_MAX => {
                let x = input_t(0)?;
                let axis = const_ints(model, input_t(1)?);
                if !matches!(axis.as_deref(), Some([3] | [-1])) {
                    return Err(err(format!(
                        "argmax over axis {axis:?}; only the channel axis (3) is supported"
                    )));
                }
                Sym::ArgMax(Box::new(sym_of(x)?))
            }
            _ => {
                return Err(err(
                    "unsupported operator (the converter maps CONV_2D, DEPTHWISE_CONV_2D, ADD, AVERAGE_POOL_2D, MEAN, RESIZE_BILINEAR, CONCATENATION, QUANTIZE, DEQUANTIZE and ARG_MAX)".into(),
                ))
            }
        };
        syms.insert(out, value);
    }

    let [o] = sub.outputs.as_slice() else {
        return Err(unsupported(
            path,
            format!(
                "the graph has {} outputs; a DeepLab model has one",
                sub.outputs.len()
            ),
        ));
    };
    let out_t = &sub.tensors[*o];
    let in_t = &sub.tensors[sub.inputs[0]];
    let got = syms.get(o).cloned().ok_or_else(|| {
        unsupported(
            path,
            format!(
                "output {} is not computed by any mapped operator",
                tensor_desc(out_t)
            ),
        )
    })?;
    let logits = &expected.logits;
    let upsampled = Sym::Resize(Box::new(logits.clone()));
    let (ih, iw) = (in_t.shape[1], in_t.shape[2]);
    let bad = |what: &str| {
        unsupported(
            path,
            format!(
                "output {} {:?} is {got}; {what}",
                tensor_desc(out_t),
                out_t.shape
            ),
        )
    };
    let output = match (&got, out_t.shape.as_slice()) {
        (s, &[1, h, w, c]) if *s == upsampled || *s == *logits => {
            if *s == upsampled && (h, w) != (ih, iw) {
                return Err(bad(&format!(
                    "the model upsamples the logits to the input size {ih}x{iw}"
                )));
            }
            TfliteOutput::Logits {
                height: h,
                width: w,
                classes: c,
            }
        }
        (Sym::ArgMax(s), &[1, h, w]) if **s == upsampled && (h, w) == (ih, iw) => {
            TfliteOutput::ArgMax {
                height: h,
                width: w,
            }
        }
        _ => {
            return Err(bad(&format!(
                "expected {upsampled} at the input size (or its argmax)"
            )))
        }
    };
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, ModuleT, Tensor};
    use candle_nn::VarBuilder;
    use deeplab_ops::{BatchNorm2d, BatchNormConfig};

    #[test]
    fn identity_batch_norm_is_exact() {
        // Through the real evaluation path: weight 1, mean 0, var 1 - eps gives x + bias exactly.
        for eps in [1e-3, 1e-5, 1e-2, 1e-8] {
            let bias = [0.25f32, -3.5, 1e-7, 12345.678];
            let n = bias.len();
            let dev = Device::Cpu;
            let ts = HashMap::from([
                (
                    "weight".to_string(),
                    Tensor::ones(n, DType::F32, &dev).unwrap(),
                ),
                ("bias".to_string(), Tensor::new(&bias, &dev).unwrap()),
                (
                    "running_mean".to_string(),
                    Tensor::zeros(n, DType::F32, &dev).unwrap(),
                ),
                (
                    "running_var".to_string(),
                    Tensor::full(identity_running_var(eps), n, &dev).unwrap(),
                ),
            ]);
            let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
            let bn = BatchNorm2d::new(n, BatchNormConfig::tf_head().with_eps(eps), vb).unwrap();
            let (scale, shift) = bn.folded().unwrap();
            assert_eq!(scale.to_vec1::<f32>().unwrap(), vec![1.0; n], "eps {eps}");
            assert_eq!(shift.to_vec1::<f32>().unwrap(), bias.to_vec(), "eps {eps}");
            let x = Tensor::new(&[0.1f32, -7.0, 3.3, 1e6], &dev)
                .unwrap()
                .reshape((1, n, 1, 1))
                .unwrap();
            let y = bn.forward_t(&x, false).unwrap().flatten_all().unwrap();
            let want: Vec<f32> = [0.1f32, -7.0, 3.3, 1e6]
                .iter()
                .zip(&bias)
                .map(|(a, b)| a + b)
                .collect();
            assert_eq!(y.to_vec1::<f32>().unwrap(), want, "eps {eps}");
        }
    }

    #[test]
    fn layouts() {
        // conv [co=2, kh=1, kw=2, ci=3]: encode (o, x, i) in the value.
        let (co, kh, kw, ci) = (2, 1, 2, 3);
        let mut v = vec![0f32; co * kh * kw * ci];
        for o in 0..co {
            for x in 0..kw {
                for i in 0..ci {
                    v[(o * kw + x) * ci + i] = (o * 100 + x * 10 + i) as f32;
                }
            }
        }
        let out = convert_layout(&[co, kh, kw, ci], false, &v);
        // out[o][i][0][x]
        for o in 0..co {
            for i in 0..ci {
                for x in 0..kw {
                    assert_eq!(out[(o * ci + i) * kw + x], (o * 100 + x * 10 + i) as f32);
                }
            }
        }
        // depthwise [1, kh=1, kw=2, c=3] -> [3, 1, 1, 2]
        let d = convert_layout(&[1, 1, 2, 3], true, &[0., 1., 2., 10., 11., 12.]);
        assert_eq!(d, vec![0., 10., 1., 11., 2., 12.]);
    }

    #[test]
    fn scopes_from_tensor_names() {
        let cases = [
            ("MobilenetV2/Conv/weights", "MobilenetV2/Conv"),
            ("MobilenetV2/Conv/Conv2D_Fold", "MobilenetV2/Conv"),
            (
                "MobilenetV2/expanded_conv/depthwise/depthwise_weights",
                "MobilenetV2/expanded_conv/depthwise",
            ),
            (
                "MobilenetV2/expanded_conv_16/project/Conv2D_Fold",
                "MobilenetV2/expanded_conv_16/project",
            ),
            ("logits/semantic/Conv2D", "logits/semantic"),
            ("aspp0/Conv2D_Fold", "aspp0"),
            ("image_pooling/weights", "image_pooling"),
            ("concat_projection/weights", "concat_projection"),
        ];
        for (name, scope) in cases {
            assert_eq!(layer_scope(&[name]).as_deref(), Some(scope), "{name}");
        }
        assert_eq!(layer_scope(&["conv2d_1/kernel"]), None);
        // Falls back to the next name (e.g. the output tensor).
        assert_eq!(
            layer_scope(&["w0", "MobilenetV2/expanded_conv_3/expand/Relu6"]).as_deref(),
            Some("MobilenetV2/expanded_conv_3/expand")
        );
    }

    #[test]
    fn normalization_from_input_quantization() {
        let input = TfliteInput {
            name: "x".into(),
            height: 513,
            width: 513,
            dtype: "uint8".into(),
            quantization: Some((1.0 / 128.0, 128)),
        };
        let (a, b) = input_normalization(&input).scale_shift();
        for c in 0..3 {
            // (x - 128) / 128
            assert!((a[c] - 1.0 / 128.0).abs() < 1e-9, "{a:?}");
            assert!((b[c] + 1.0).abs() < 1e-6, "{b:?}");
        }
        let float = TfliteInput {
            dtype: "float32".into(),
            quantization: None,
            ..input
        };
        assert_eq!(input_normalization(&float), InputNormalization::Official);
    }

    #[test]
    fn expected_graph_of_the_published_models() {
        // Float model: width 0.5 (official rounding), output stride 8.
        let mut c = DeepLabConfig::mobilenetv2_v3(21);
        c.backbone = BackboneConfig::MobileNetV2(
            MobileNetV2Config::mobilenetv2_050_deeplab().with_output_stride(OutputStride::Os8),
        );
        let e = expected_graph(&c).unwrap();
        let l = |m: &str| e.layers[m].clone();
        // expanded_conv_6 (blocks.3.0) keeps rate 1 with its stride removed, 7..13 run at
        // rate 2 (13 = blocks.5.0 with its stride removed), 14..16 at rate 4.
        assert_eq!(
            (
                l("backbone.blocks.3.0.conv_dw").stride,
                l("backbone.blocks.3.0.conv_dw").dilation
            ),
            (1, 1)
        );
        assert_eq!(l("backbone.blocks.3.1.conv_dw").dilation, 2);
        assert_eq!(
            (
                l("backbone.blocks.5.0.conv_dw").stride,
                l("backbone.blocks.5.0.conv_dw").dilation
            ),
            (1, 2)
        );
        assert_eq!(l("backbone.blocks.5.1.conv_dw").dilation, 4);
        assert_eq!(l("backbone.blocks.6.0.conv_dw").dilation, 4);
        assert_eq!(l("backbone.blocks.2.0.conv_dw").stride, 2);
        // 10 residual adds, as in both published graphs.
        assert_eq!(e.adds.len(), 10);
        assert_eq!(
            l("aspp.project.conv").input,
            Sym::Concat(vec![
                Sym::Broadcast(Box::new(Sym::Layer("aspp.pooling.conv".into()))),
                Sym::Layer("aspp.convs.0.conv".into())
            ])
        );
        // Quantized model: width 1.0, output stride 16.
        let e = expected_graph(&DeepLabConfig::mobilenetv2_v3(21)).unwrap();
        let l = |m: &str| e.layers[m].clone();
        assert_eq!(
            (
                l("backbone.blocks.5.0.conv_dw").stride,
                l("backbone.blocks.5.0.conv_dw").dilation
            ),
            (1, 1)
        );
        assert_eq!(l("backbone.blocks.5.1.conv_dw").dilation, 2);
        assert_eq!(l("backbone.blocks.3.0.conv_dw").stride, 2);
        assert!(expected_graph(&DeepLabConfig::xception65_v3(21)).is_err());
        assert!(expected_graph(&DeepLabConfig::mobilenetv2_v3plus(21)).is_err());
    }
}
