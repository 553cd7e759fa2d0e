//! The command-line interface: clap definitions of `deeplab eval | predict | train | info |
//! bench | convert | synth` and the code that runs each.

use crate::evaluate::{evaluate, EvalOptions};
use crate::files::{self, LoadedModel};
use crate::infer::{InferenceOptions, Predictor, Preprocess};
use crate::optim::{paper_weight_decay, SgdConfig};
use crate::schedule::PolySchedule;
use crate::train::{self, BatchNormMode, DatasetKind, InitFrom, TrainOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use deeplab_backbones::{BackboneConfig, OutputStride};
use deeplab_data::{
    io::{read_rgb_image, save_palette_png, save_rgb_png},
    render, BoundaryDefinition, ClassTable, DatasetFormat, ErrorPolicy,
};
use deeplab_heads::{DeepLabConfig, DeepLabModel, FoldBatchNorm, InputNormalization};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// DeepLabv3 / DeepLabv3+ semantic segmentation: evaluate, predict, train, inspect, benchmark.
///
/// With no other arguments, `deeplab eval` evaluates the bundled sample model on the bundled
/// sample dataset and `deeplab predict` segments a bundled sample image.
#[derive(Debug, Parser)]
#[command(name = "deeplab", version, propagate_version = true)]
pub struct Cli {
    /// Worker threads of the tensor kernels (default: every core).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// No progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Keep BatchNorm layers as separate passes at inference (by default eval, predict and
    /// bench fold each into its convolution's output pass; the outputs are identical).
    #[arg(long, global = true)]
    pub no_fold: bool,
    /// Element type of inference (eval, predict, bench): f32, or f16 (weights, convolutions
    /// and matmuls in half precision; BatchNorm and our kernels' arithmetic in f32). bf16 is
    /// not offered: candle's CPU matmul has no bf16 kernel.
    #[arg(long, global = true, value_enum, default_value_t = InferDType::F32)]
    pub dtype: InferDType,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate weights on a dataset split: per-class IoU table, mIoU, pixel accuracy, JSON.
    Eval(EvalArgs),
    /// Segment images: colored mask, overlay and palette-index label PNGs (and logits).
    Predict(PredictArgs),
    /// Train a model (SGD + momentum, poly schedule, atomic checkpoints, --resume).
    Train(Box<TrainArgs>),
    /// Parameters and multiply-adds of a configuration; metadata of a weight file.
    Info(InfoArgs),
    /// Forward latency and throughput of a configuration at a size.
    Bench(BenchArgs),
    /// Convert an official TensorFlow DeepLab checkpoint (or model-zoo .tar.gz) to safetensors.
    Convert(ConvertArgs),
    /// Write a generated dataset of textured shapes (VOC or folder layout) from a seed.
    Synth(SynthArgs),
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<T>()
                .map_err(|_| anyhow::anyhow!("{what}: '{t}' is not a valid number"))
        })
        .collect()
}

fn parse_hw(s: &str, what: &str) -> Result<(usize, usize)> {
    let parse = |t: &str| -> Result<usize> {
        t.trim()
            .parse::<usize>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| anyhow::anyhow!("{what}: '{s}' is not N or HxW with positive numbers"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

fn output_stride(v: Option<usize>, flag: &str) -> Result<Option<OutputStride>> {
    v.map(|v| OutputStride::new(v).map_err(|_| anyhow::anyhow!("{flag} {v}: must be 8, 16 or 32")))
        .transpose()
}

/// Model architecture flags (train, info, bench).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Backbone: xception41/65/71, resnet50/101, resnet50_beta/resnet101_beta,
    /// mobilenetv2_100, mobilenetv2_050, mobilenetv2_050_deeplab.
    #[arg(long, default_value = "xception65")]
    pub backbone: String,
    /// Head: DeepLabv3+ (ASPP + decoder) or DeepLabv3 (ASPP only).
    #[arg(long, value_enum, default_value = "v3plus")]
    pub head: HeadKind,
    /// Atrous separable ASPP / decoder convs (default: true for Xception and MobileNetV2, false
    /// for ResNet, as in the paper).
    #[arg(long)]
    pub separable: Option<bool>,
    /// Output stride of the backbone (8, 16 or 32).
    #[arg(long = "output-stride", default_value_t = 16)]
    pub output_stride: usize,
    /// ASPP atrous rates, e.g. 6,12,18 (default: 6/12/18 scaled to the output stride), or
    /// `none` for image pooling + 1x1 only.
    #[arg(long)]
    pub atrous_rates: Option<String>,
    /// No image-level (global pooling) ASPP branch.
    #[arg(long)]
    pub no_image_pooling: bool,
    /// Channels of the ASPP branches.
    #[arg(long, default_value_t = 256)]
    pub aspp_channels: usize,
    /// Channels of the decoder's refinement convs.
    #[arg(long, default_value_t = 256)]
    pub decoder_channels: usize,
    /// Channels of the decoder's low-level projection.
    #[arg(long, default_value_t = 48)]
    pub decoder_projection: usize,
    /// Multi-grid rates of the last block (Xception, ResNet), e.g. 1,2,4.
    #[arg(long)]
    pub multi_grid: Option<String>,
    /// Input normalization (default: official x*2/255-1, ImageNet mean/std for timm ResNets).
    #[arg(long, value_enum)]
    pub normalization: Option<NormKind>,
    /// Number of classes (train: default the dataset's; info/bench: default 21).
    #[arg(long)]
    pub num_classes: Option<usize>,
}

/// DeepLab head variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadKind {
    /// DeepLabv3+.
    V3plus,
    /// DeepLabv3.
    V3,
}

/// Input normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NormKind {
    /// x * 2 / 255 - 1.
    Official,
    /// ImageNet mean / std.
    Imagenet,
}

impl ModelArgs {
    /// The configuration the flags describe.
    pub fn config(&self, default_classes: usize) -> Result<DeepLabConfig> {
        let backbone = BackboneConfig::from_name(&self.backbone)
            .map_err(|e| anyhow::anyhow!("--backbone: {e}"))?;
        let os = output_stride(Some(self.output_stride), "--output-stride")?
            .unwrap_or(OutputStride::Os16);
        let backbone = backbone.with_output_stride(os);
        let is_resnet = matches!(backbone, BackboneConfig::ResNet(_));
        let separable = self.separable.unwrap_or(!is_resnet);
        let norm = match self.normalization {
            Some(NormKind::Official) => InputNormalization::Official,
            Some(NormKind::Imagenet) => InputNormalization::ImageNet,
            None if is_resnet && !self.backbone.ends_with("_beta") => InputNormalization::ImageNet,
            None => InputNormalization::Official,
        };
        let classes = self.num_classes.unwrap_or(default_classes);
        let mut c = match self.head {
            HeadKind::V3plus => DeepLabConfig::v3plus(backbone, classes, separable, norm),
            HeadKind::V3 => DeepLabConfig::v3(backbone, classes, separable, norm),
        };
        if let Some(r) = &self.atrous_rates {
            c.aspp.atrous_rates = if r.trim() == "none" {
                Vec::new()
            } else {
                parse_list(r, "--atrous-rates")?
            };
        }
        c.aspp.image_pooling = !self.no_image_pooling;
        c.aspp.channels = self.aspp_channels;
        if let Some(d) = c.decoder.as_mut() {
            d.channels = self.decoder_channels;
            d.projection_channels = self.decoder_projection;
        }
        if let Some(mg) = &self.multi_grid {
            let mg: Vec<usize> = parse_list(mg, "--multi-grid")?;
            c = c
                .with_multi_grid(Some(mg))
                .map_err(|e| anyhow::anyhow!("--multi-grid: {e}"))?;
        }
        c.validate()
            .map_err(|e| anyhow::anyhow!("model configuration: {e}"))?;
        Ok(c)
    }
}

/// `deeplab eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Dataset root (VOC `VOCdevkit/` or `VOC2012/`, Cityscapes root, or a folder dataset).
    /// Default: the bundled sample dataset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Dataset layout.
    #[arg(long, value_enum, default_value = "auto")]
    pub dataset: DatasetKind,
    /// Split (default: val; every image for a folder dataset without splits/val.txt).
    #[arg(long)]
    pub split: Option<String>,
    /// Weight file, or a name of the weights table already fetched with
    /// `cargo xtask fetch-weights`. Default: the bundled sample model.
    #[arg(long)]
    pub weights: Option<String>,
    /// Evaluate at this output stride (e.g. 8 for weights trained at 16).
    #[arg(long = "output-stride")]
    pub output_stride: Option<usize>,
    /// native | pad | pad:HxW | resize:N | resize:HxW | keep-aspect-pad:N (default: pad to the
    /// eval crop for VOC and Cityscapes layouts, native for folder datasets).
    #[arg(long)]
    pub preprocess: Option<Preprocess>,
    /// Input scales whose probabilities are averaged, e.g. 0.5,0.75,1,1.25,1.5,1.75.
    #[arg(long, default_value = "1")]
    pub scales: String,
    /// Also average the horizontally flipped input.
    #[arg(long)]
    pub flip: bool,
    /// With pad: cover images larger than the crop with overlapping crop-sized windows.
    #[arg(long)]
    pub sliding_window: bool,
    /// Trimap band widths in pixels, e.g. 1,2,4,8,16 (boundary accuracy).
    #[arg(long)]
    pub trimap: Option<String>,
    /// Trimap boundary: pixels next to a label change, or the void (255) pixels as in the papers.
    #[arg(long, value_enum, default_value = "label-change")]
    pub trimap_boundary: TrimapBoundary,
    /// Write every metric as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Save colored predictions, the confusion-matrix image and metrics.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Evaluate only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Trimap boundary definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrimapBoundary {
    /// Pixels with a 4-neighbour of another ground-truth value.
    LabelChange,
    /// The void (255) pixels.
    IgnoreRegion,
}

/// `deeplab predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Images or directories of images (default: a bundled sample image).
    pub inputs: Vec<PathBuf>,
    /// Weight file or fetched table name (default: the bundled sample model).
    #[arg(long)]
    pub weights: Option<String>,
    /// Output directory for <stem>_mask.png, <stem>_overlay.png and <stem>_label.png.
    #[arg(long, default_value = "predictions")]
    pub out: PathBuf,
    /// Write the raw logits (N x classes x H x W, f32, at the network input size) to this .npy.
    #[arg(long)]
    pub logits: Option<PathBuf>,
    /// native | pad | pad:HxW | resize:N | resize:HxW | keep-aspect-pad:N (default native).
    #[arg(long)]
    pub preprocess: Option<Preprocess>,
    /// Shortcut for --preprocess resize:N (or HxW).
    #[arg(long, conflicts_with = "preprocess")]
    pub resize: Option<String>,
    /// Input scales whose probabilities are averaged.
    #[arg(long, default_value = "1")]
    pub scales: String,
    /// Also average the horizontally flipped input.
    #[arg(long)]
    pub flip: bool,
    /// Run at this output stride.
    #[arg(long = "output-stride")]
    pub output_stride: Option<usize>,
    /// Opacity of the overlay colors.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f32,
    /// A classes.txt naming and coloring the classes (default: from the weight file).
    #[arg(long)]
    pub classes: Option<PathBuf>,
}

/// `deeplab train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset root.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset layout.
    #[arg(long, value_enum, default_value = "auto")]
    pub dataset: DatasetKind,
    /// Training split.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Validation split, evaluated every --val-every steps and at the end.
    #[arg(long)]
    pub val_split: Option<String>,
    /// Output directory (checkpoint.safetensors, model.safetensors, train.jsonl, curves.png).
    #[arg(long)]
    pub out: PathBuf,
    /// The architecture.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Initialize the backbone from ImageNet weights: a timm safetensors file or a fetched
    /// table name (e.g. mobilenetv2_100.ra_in1k).
    #[arg(long, conflicts_with = "init")]
    pub init_backbone: Option<String>,
    /// Initialize from a full DeepLab weight file (fine-tuning; the classifier is re-initialized
    /// when the class count differs).
    #[arg(long)]
    pub init: Option<String>,
    /// Training steps.
    #[arg(long, default_value_t = 30000)]
    pub steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Crop size, N or HxW.
    #[arg(long, default_value = "513")]
    pub crop: String,
    /// Base learning rate of the poly schedule.
    #[arg(long, default_value_t = 0.007)]
    pub lr: f64,
    /// Power of the poly schedule.
    #[arg(long, default_value_t = 0.9)]
    pub lr_power: f64,
    /// Linear warm-up steps (0: none, as the official schedule).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay on convolution weights (default: 4e-5 Xception/MobileNetV2, 1e-4 ResNet).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Also decay depthwise kernels (the official code does not).
    #[arg(long)]
    pub decay_depthwise: bool,
    /// Freeze BatchNorm (running statistics used and kept; scales and shifts not trained).
    #[arg(long)]
    pub freeze_bn: bool,
    /// Momentum of the BatchNorm running averages (PyTorch convention; official TF: 0.0003).
    #[arg(long, default_value_t = 0.1)]
    pub bn_momentum: f64,
    /// ASPP dropout probability; the CPU random generator cannot be seeded, so a run with
    /// dropout is not reproducible and cannot resume bit for bit.
    #[arg(long, default_value_t = 0.0)]
    pub aspp_dropout: f32,
    /// Smallest random scale.
    #[arg(long, default_value_t = 0.5)]
    pub min_scale: f32,
    /// Largest random scale.
    #[arg(long, default_value_t = 2.0)]
    pub max_scale: f32,
    /// Step between scales (0: continuous).
    #[arg(long, default_value_t = 0.25)]
    pub scale_step: f32,
    /// No random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
    /// Seed of the initialization, data order and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: usize,
    /// Validate every N steps (0: only at the end); needs --val-split.
    #[arg(long, default_value_t = 0)]
    pub val_every: usize,
    /// Log every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Stop after this step (writing a checkpoint); continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Continue the run in --out from its checkpoint (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// Element type of model.safetensors: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub save_dtype: files::SaveDType,
}

/// `deeplab info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A weight file (or fetched table name) to describe instead of the flags' configuration.
    #[arg(long)]
    pub weights: Option<String>,
    /// The architecture (without --weights).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input size for the multiply-add count, N or HxW.
    #[arg(long, default_value = "513")]
    pub size: String,
}

/// `deeplab bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmark the model of this weight file instead of the flags' configuration.
    #[arg(long)]
    pub weights: Option<String>,
    /// The architecture (without --weights).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input size, N or HxW.
    #[arg(long, default_value = "513")]
    pub size: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Untimed warm-up passes.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed passes.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Time a training step instead (forward in training mode, cross-entropy on random labels,
    /// backward, SGD update): reports images/s of training.
    #[arg(long)]
    pub train: bool,
    /// Print one JSON line (for scripts such as benches/peers/e2e.py) after the text.
    #[arg(long)]
    pub json: bool,
    /// Also print where the time goes: each layer kind's share of a pass, and the costliest
    /// individual layer shapes (with `--train`, also the backward kernels and the SGD update).
    #[arg(long)]
    pub profile: bool,
    /// With `--profile`: how many of the costliest layer shapes to list.
    #[arg(long, default_value_t = 12, value_name = "N")]
    pub profile_shapes: usize,
}

/// `deeplab convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// TensorFlow checkpoint (prefix, .index, directory or model-zoo .tar.gz), or a .tflite file.
    pub input: PathBuf,
    /// Output safetensors file.
    pub output: PathBuf,
    /// Output stride to build the model at (default 16).
    #[arg(long = "output-stride")]
    pub output_stride: Option<usize>,
    /// ASPP rates at that output stride, e.g. 6,12,18.
    #[arg(long)]
    pub atrous_rates: Option<String>,
    /// Multi-grid rates of the last block, e.g. 1,2,4.
    #[arg(long)]
    pub multi_grid: Option<String>,
    /// Output stride to evaluate at, recorded in the file (e.g. 8).
    #[arg(long)]
    pub eval_output_stride: Option<usize>,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

/// `deeplab synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (must not exist or be empty).
    pub out: PathBuf,
    /// Layout.
    #[arg(long, value_enum, default_value = "voc")]
    pub layout: SynthLayout,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training scenes.
    #[arg(long, default_value_t = 24)]
    pub train: usize,
    /// Validation scenes.
    #[arg(long, default_value_t = 8)]
    pub val: usize,
    /// Smallest side.
    #[arg(long, default_value_t = 64)]
    pub min_size: u32,
    /// Largest side.
    #[arg(long, default_value_t = 128)]
    pub max_size: u32,
    /// Objects per scene (1..=N).
    #[arg(long, default_value_t = 3)]
    pub max_objects: usize,
    /// Width of the void band around objects (0: none).
    #[arg(long, default_value_t = 1)]
    pub void_width: u32,
    /// Per-pixel noise amplitude.
    #[arg(long, default_value_t = 12)]
    pub noise: u8,
    /// JPEG quality of the images.
    #[arg(long, default_value_t = 92)]
    pub jpeg_quality: u8,
    /// Folder layout: RGB color masks instead of index masks.
    #[arg(long)]
    pub color_masks: bool,
}

/// Layout of a generated dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SynthLayout {
    /// PASCAL VOC layout (with a classes.txt).
    Voc,
    /// The custom folder layout.
    Folder,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // Read by rayon's global pool and candle's matmul when they first start.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle runs element-wise ops on its own pool of spinning threads (beside rayon's, which
    // the convolution kernels use); on a few shared cores the spinning costs up to 8x in
    // training (measured: 4.5 -> 35 images/s on 2 cores). Element-wise ops run on the calling
    // thread unless CANDLE_NUM_THREADS says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let progress = !cli.quiet;
    let inference = Inference {
        fold: !cli.no_fold,
        dtype: match cli.dtype {
            InferDType::F32 => DType::F32,
            InferDType::F16 => DType::F16,
        },
        device: Device::Cpu,
    };
    let command = cli.command;
    on_worker(cli.threads, move || {
        let device = &inference.device;
        match command {
            Command::Eval(a) => cmd_eval(a, progress, &inference),
            Command::Predict(a) => cmd_predict(a, &inference),
            Command::Train(a) => cmd_train(*a, progress, device),
            Command::Info(a) => cmd_info(a, device),
            Command::Bench(a) => cmd_bench(a, &inference),
            Command::Convert(a) => cmd_convert(a),
            Command::Synth(a) => cmd_synth(a),
        }
    })
}

/// Stack of rayon's worker threads: the command runs on one (see [`on_worker`]), and candle's
/// backward pass walks the graph recursively.
const WORKER_STACK: usize = 64 << 20;

/// Runs `f` on a worker thread of rayon's global pool (`threads` workers, or rayon's default).
///
/// The kernels split each op with rayon. Called from a thread outside the pool, every parallel
/// op hands its work to the pool and puts the caller to sleep until it is done: two or three
/// context switches per op, hundreds per forward pass. From a worker, the caller works on its
/// own op and the other workers join in by stealing.
fn on_worker<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    let mut b = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK);
    if let Some(n) = threads {
        b = b.num_threads(n);
    }
    // Fails only if the pool was already built (a library caller did); that pool is used then.
    let _ = b.build_global();
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope runs its body before returning")
}

/// Element type of inference (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InferDType {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
}

/// How inference commands build their model: `--no-fold`, `--dtype`, the device.
struct Inference {
    fold: bool,
    dtype: DType,
    device: Device,
}

impl Inference {
    /// Loads a weight file for inference (BatchNorms folded unless `--no-fold`).
    fn load(&self, weights: &str, os: Option<usize>) -> Result<LoadedModel> {
        let path = files::resolve_weights(weights)?;
        let os = output_stride(os, "--output-stride")?;
        let mut loaded = files::load_model_as(&path, &self.device, os, self.dtype)?;
        self.prepare(&mut loaded.model)
            .with_context(|| format!("{}: folding BatchNorm", path.display()))?;
        Ok(loaded)
    }

    /// Folds the model's BatchNorms unless `--no-fold`.
    fn prepare(&self, model: &mut DeepLabModel) -> candle_core::Result<()> {
        if self.fold {
            model.fold_batch_norm()?;
        }
        Ok(())
    }
}

fn parse_scales(s: &str) -> Result<Vec<f64>> {
    let v: Vec<f64> = parse_list(s, "--scales")?;
    if v.is_empty() {
        bail!("--scales: give at least one scale");
    }
    if let Some(bad) = v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        bail!("--scales: {bad} is not a positive scale");
    }
    Ok(v)
}

fn cmd_eval(a: EvalArgs, progress: bool, inference: &Inference) -> Result<()> {
    let device = &inference.device;
    let (data, weights, bundled) = match (&a.data, &a.weights) {
        (None, None) => {
            let d = files::sample_dataset_dir();
            let w = files::sample_weights_path();
            files::check_sample_files(&[&d, &w])?;
            (d, w.display().to_string(), true)
        }
        (Some(d), Some(w)) => (d.clone(), w.clone(), false),
        (Some(_), None) => bail!(
            "--weights is required with --data (only the bundled sample runs without arguments)"
        ),
        (None, Some(_)) => bail!(
            "--data is required with --weights (only the bundled sample runs without arguments)"
        ),
    };
    let loaded = inference.load(&weights, a.output_stride)?;
    // the split: val by default, or every image of a folder dataset without splits/val.txt
    let format = match a.dataset {
        DatasetKind::Auto => DatasetFormat::detect(&data)
            .with_context(|| format!("opening dataset {}", data.display()))?,
        DatasetKind::Voc => DatasetFormat::Voc,
        DatasetKind::Cityscapes => DatasetFormat::Cityscapes,
        DatasetKind::Folder => DatasetFormat::Folder,
    };
    let split = match (&a.split, format) {
        (Some(s), _) => Some(s.clone()),
        (None, DatasetFormat::Folder) => data
            .join("splits")
            .join("val.txt")
            .is_file()
            .then(|| "val".to_string()),
        (None, _) => Some("val".to_string()),
    };
    let dataset = Arc::new(train::open_dataset(
        &data,
        a.dataset,
        split.as_deref(),
        ErrorPolicy::SkipWithWarning,
    )?);
    let resolve_crop = || -> Result<(usize, usize)> {
        loaded
            .eval_crop()
            .or(match format {
                DatasetFormat::Voc => Some((513, 513)),
                DatasetFormat::Cityscapes => Some((1025, 2049)),
                _ => None,
            })
            .context("--preprocess pad: the weight file records no eval crop and the dataset has no official one; give it, e.g. pad:513")
    };
    let preprocess = match a.preprocess {
        Some(Preprocess::Pad(None)) => Preprocess::Pad(Some(resolve_crop()?)),
        Some(p) => p,
        None if format == DatasetFormat::Folder => Preprocess::Native,
        None => Preprocess::Pad(Some(resolve_crop()?)),
    };
    let trimap_widths: Vec<u32> = match &a.trimap {
        Some(t) => parse_list(t, "--trimap")?,
        None => Vec::new(),
    };
    if trimap_widths.contains(&0) {
        bail!("--trimap: band widths must be positive");
    }
    let inference = InferenceOptions {
        preprocess,
        scales: parse_scales(&a.scales)?,
        flip: a.flip,
        sliding_window: a.sliding_window,
    };
    if a.sliding_window && !matches!(preprocess, Preprocess::Pad(_)) {
        bail!("--sliding-window works with --preprocess pad (windows of the pad size)");
    }
    if let Some(j) = &a.json {
        if let Some(dir) = j.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::ensure_writable_dir(dir)?;
        }
    }
    let opts = EvalOptions {
        inference: inference.clone(),
        trimap_widths,
        trimap_definition: match a.trimap_boundary {
            TrimapBoundary::LabelChange => BoundaryDefinition::LabelChange,
            TrimapBoundary::IgnoreRegion => BoundaryDefinition::IgnoreRegion,
        },
        out_dir: a.out.clone(),
        limit: a.limit,
        progress,
    };
    let cfg = loaded.model.config();
    println!(
        "{}evaluating {} ({}, output stride {}) on {} split {} ({} images), preprocess {}, scales {:?}{}",
        if bundled { "bundled sample: " } else { "" },
        loaded.path.display(),
        describe(cfg),
        cfg.output_stride(),
        data.display(),
        split.as_deref().unwrap_or("(all)"),
        opts.limit.map_or(dataset.len(), |l| l.min(dataset.len())),
        inference.preprocess,
        inference.scales,
        if inference.flip { ", flipped" } else { "" },
    );
    let report = evaluate(&loaded.model, Arc::clone(&dataset), &opts, device)?;
    print!("{}", report.table());
    println!(
        "{} images in {:.1} s{}",
        report.images,
        report.seconds,
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped", report.skipped.len())
        }
    );
    let json = report.to_json(serde_json::json!({
        "weights": loaded.path,
        "dataset": data,
        "split": split,
        "preprocess": inference.preprocess.to_string(),
        "scales": inference.scales,
        "flip": inference.flip,
        "sliding_window": inference.sliding_window,
        "output_stride": cfg.output_stride().value(),
    }));
    let text = serde_json::to_string_pretty(&json)?;
    let mut targets: Vec<PathBuf> = a.json.iter().cloned().collect();
    if let Some(o) = &a.out {
        targets.push(o.join("metrics.json"));
    }
    for t in targets {
        files::write_file_atomically(&t, text.as_bytes())?;
        println!("wrote {}", t.display());
    }
    Ok(())
}

fn describe(c: &DeepLabConfig) -> String {
    let rates = if c.aspp.atrous_rates.is_empty() {
        String::new()
    } else {
        format!(
            " + {} rates {}",
            if c.aspp.separable {
                "separable"
            } else {
                "atrous"
            },
            c.aspp
                .atrous_rates
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("/")
        )
    };
    let aspp = format!(
        "ASPP {}1x1{rates}",
        if c.aspp.image_pooling {
            "pooling + "
        } else {
            ""
        }
    );
    match &c.decoder {
        Some(d) => format!(
            "DeepLabv3+ {}, {aspp}, {} decoder",
            c.backbone.name(),
            if d.separable { "separable" } else { "plain" }
        ),
        None => format!("DeepLabv3 {}, {aspp}", c.backbone.name()),
    }
}

fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let is_image = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
    };
    let mut out = Vec::new();
    for i in inputs {
        if i.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(i)
                .with_context(|| format!("reading directory {}", i.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!(
                    "{}: no .jpg, .jpeg or .png images in the directory",
                    i.display()
                );
            }
            out.extend(v);
        } else if i.exists() {
            out.push(i.clone());
        } else {
            bail!("{}: no such image file or directory", i.display());
        }
    }
    let mut stems = BTreeMap::new();
    for p in &out {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        if let Some(prev) = stems.insert(stem.clone(), p.clone()) {
            bail!(
                "{} and {} have the same name '{stem}': their outputs would collide; predict them separately",
                prev.display(),
                p.display()
            );
        }
    }
    Ok(out)
}

fn cmd_predict(a: PredictArgs, inference: &Inference) -> Result<()> {
    let device = &inference.device;
    let weights = match &a.weights {
        Some(w) => w.clone(),
        None => {
            let w = files::sample_weights_path();
            files::check_sample_files(&[&w])?;
            eprintln!(
                "using the bundled sample model {} (trained on generated shapes)",
                w.display()
            );
            w.display().to_string()
        }
    };
    let inputs = if a.inputs.is_empty() {
        let img = files::sample_image_path();
        files::check_sample_files(&[&img])?;
        vec![img]
    } else {
        a.inputs.clone()
    };
    let images = collect_images(&inputs)?;
    let loaded = inference.load(&weights, a.output_stride)?;
    let classes = match &a.classes {
        Some(p) => ClassTable::from_file(p)?,
        None => loaded.class_table()?,
    };
    if classes.len() != loaded.model.config().num_classes {
        bail!(
            "--classes {}: {} classes, but the model predicts {}",
            a.classes
                .as_deref()
                .unwrap_or(Path::new("(weight file)"))
                .display(),
            classes.len(),
            loaded.model.config().num_classes
        );
    }
    if !(0.0..=1.0).contains(&a.alpha) {
        bail!("--alpha {} must be between 0 and 1", a.alpha);
    }
    let preprocess = match (&a.resize, a.preprocess) {
        (Some(r), _) => {
            let (h, w) = parse_hw(r, "--resize")?;
            Preprocess::Resize(h, w)
        }
        (None, Some(Preprocess::Pad(None))) => Preprocess::Pad(Some(loaded.eval_crop().context(
            "--preprocess pad: the weight file records no eval crop; give one, e.g. pad:513",
        )?)),
        (None, Some(p)) => p,
        (None, None) => Preprocess::Native,
    };
    let opts = InferenceOptions {
        preprocess,
        scales: parse_scales(&a.scales)?,
        flip: a.flip,
        sliding_window: false,
    };
    if a.logits.is_some() && !opts.is_single_pass() {
        bail!("--logits needs a single forward pass (no --scales list, no --flip)");
    }
    if let Some(l) = &a.logits {
        if let Some(dir) = l.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::ensure_writable_dir(dir)?;
        }
    }
    crate::ensure_writable_dir(&a.out)?;
    let predictor = Predictor::new(&loaded.model, opts, device)?;
    let palette = classes.palette();
    let names = classes.names();
    let mut logits: Vec<Tensor> = Vec::new();
    for path in &images {
        let image = read_rgb_image(path)?;
        let t0 = Instant::now();
        let pred = predictor
            .predict(&image)
            .with_context(|| format!("predicting {}", path.display()))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let mask_p = a.out.join(format!("{stem}_mask.png"));
        let overlay_p = a.out.join(format!("{stem}_overlay.png"));
        let label_p = a.out.join(format!("{stem}_label.png"));
        save_rgb_png(&mask_p, &render::colorize(&pred.label, &palette))?;
        save_rgb_png(
            &overlay_p,
            &render::overlay(&image, &pred.label, &palette, a.alpha, true)?,
        )?;
        save_palette_png(&label_p, &pred.label, palette.colors())?;
        let hist = pred.label.histogram();
        let total = (pred.label.width() * pred.label.height()) as f64;
        let mut shares: Vec<(usize, u64)> = (0..names.len())
            .map(|i| (i, hist[i]))
            .filter(|(_, n)| *n > 0)
            .collect();
        shares.sort_by_key(|x| std::cmp::Reverse(x.1));
        let shares: Vec<String> = shares
            .iter()
            .map(|(i, n)| format!("{} {:.1}%", names[*i], 100.0 * *n as f64 / total))
            .collect();
        println!(
            "{} ({}x{}, {:.0} ms): {} | wrote {}, {}, {}",
            path.display(),
            image.width(),
            image.height(),
            ms,
            shares.join(", "),
            mask_p.display(),
            overlay_p.display(),
            label_p.display()
        );
        if a.logits.is_some() {
            logits.push(pred.scores.context("no logits were kept")?);
        }
    }
    if let Some(lp) = &a.logits {
        let dims0 = logits[0].dims().to_vec();
        if let Some(bad) = logits.iter().position(|t| t.dims() != dims0.as_slice()) {
            bail!(
                "--logits {}: {} gives logits {:?} but {} gives {:?}; one .npy holds images of one size (use --resize or one image)",
                lp.display(),
                images[0].display(),
                dims0,
                images[bad].display(),
                logits[bad].dims()
            );
        }
        let all = Tensor::cat(&logits, 0)?.to_dtype(DType::F32)?;
        let shape = all.dims().to_vec();
        let data = all.flatten_all()?.to_vec1::<f32>()?;
        deeplab_heads::npy::write_npy_f32(lp, &shape, &data)?;
        println!("wrote {} (logits {:?})", lp.display(), shape);
    }
    Ok(())
}

fn cmd_train(a: TrainArgs, progress: bool, device: &Device) -> Result<()> {
    let crop = parse_hw(&a.crop, "--crop")?;
    // the class count comes from the dataset unless given
    let ds = train::open_dataset(&a.data, a.dataset, Some(&a.split), ErrorPolicy::Fail)?;
    let mut model = a.model.config(ds.num_classes())?;
    drop(ds);
    if !(0.0..1.0).contains(&a.aspp_dropout) {
        bail!("--aspp-dropout {} must be in [0, 1)", a.aspp_dropout);
    }
    model.aspp.dropout = a.aspp_dropout;
    if a.aspp_dropout > 0.0 {
        eprintln!("note: ASPP dropout draws from an unseedable generator: this run is not reproducible bit for bit");
    }
    let init = match (&a.init_backbone, &a.init) {
        (Some(b), _) => InitFrom::Backbone(files::resolve_weights(b)?),
        (None, Some(f)) => InitFrom::Full(files::resolve_weights(f)?),
        (None, None) => InitFrom::Random,
    };
    for p in match &init {
        InitFrom::Backbone(p) | InitFrom::Full(p) => vec![p],
        InitFrom::Random => vec![],
    } {
        if !p.is_file() {
            bail!("{}: initial weight file not found", p.display());
        }
    }
    let schedule = PolySchedule::new(a.lr, a.lr_power, a.steps)
        .and_then(|s| s.with_warmup(a.warmup_steps, 0.1))
        .map_err(anyhow::Error::msg)?;
    let sgd = SgdConfig {
        momentum: a.momentum,
        weight_decay: a
            .weight_decay
            .unwrap_or_else(|| paper_weight_decay(&model.backbone)),
        decay_depthwise: a.decay_depthwise,
    };
    let opts = TrainOptions {
        data: a.data.clone(),
        dataset: a.dataset,
        train_split: Some(a.split.clone()),
        val_split: a.val_split.clone(),
        out: a.out.clone(),
        model,
        init,
        schedule,
        sgd,
        bn: if a.freeze_bn {
            BatchNormMode::Frozen
        } else {
            BatchNormMode::Train {
                momentum: a.bn_momentum,
            }
        },
        batch_size: a.batch_size,
        crop,
        scale: (a.min_scale, a.max_scale, a.scale_step),
        flip: !a.no_flip,
        seed: a.seed,
        workers: a.workers,
        checkpoint_every: a.checkpoint_every,
        val_every: a.val_every,
        log_every: a.log_every,
        stop_after: a.stop_after,
        save_dtype: a.save_dtype,
        progress,
    };
    let c = &opts.model;
    let count = c.count(crop).context("counting the model")?;
    println!(
        "training {} ({} classes, output stride {}, {:.2}M parameters, {:.2} GMACs at {}x{}) on {} split {} for {} steps, batch {}, lr {} (poly {}), weight decay {}, BatchNorm {}",
        describe(c),
        c.num_classes,
        c.output_stride(),
        count.params as f64 / 1e6,
        count.gmacs(),
        crop.0,
        crop.1,
        opts.data.display(),
        a.split,
        opts.steps(),
        opts.batch_size,
        a.lr,
        a.lr_power,
        opts.sgd.weight_decay,
        match opts.bn {
            BatchNormMode::Train { momentum } => format!("trained (momentum {momentum})"),
            BatchNormMode::Frozen => "frozen".to_string(),
        }
    );
    let s = train::train(&opts, a.resume, device)?;
    println!(
        "trained steps {}..{}: loss {} -> {}{}; wrote {} and {}",
        s.started_at,
        s.steps_done,
        s.first_loss.map_or("-".into(), |v| format!("{v:.4}")),
        s.last_loss.map_or("-".into(), |v| format!("{v:.4}")),
        s.val_miou.map_or(String::new(), |v| format!(
            ", validation mIoU {:.2}%",
            100.0 * v
        )),
        s.model_path.display(),
        s.checkpoint_path.display()
    );
    Ok(())
}

fn cmd_info(a: InfoArgs, device: &Device) -> Result<()> {
    let size = parse_hw(&a.size, "--size")?;
    let config = match &a.weights {
        Some(w) => {
            let path = files::resolve_weights(w)?;
            let meta = files::read_metadata(&path)?;
            let loaded = files::load_model(&path, device, None)?;
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!("file: {} ({:.2} MB)", path.display(), bytes as f64 / 1e6);
            let st = files::read_tensors(&path, &Device::Cpu)?;
            println!("tensors: {}", st.len());
            for (k, v) in &meta {
                if k == deeplab_heads::weights::CONFIG_KEY {
                    continue;
                }
                let shown = if v.len() > 300 {
                    format!("{}... ({} chars)", &v[..300], v.len())
                } else {
                    v.clone()
                };
                println!("metadata {k}: {}", shown.replace('\n', " | "));
            }
            loaded.model.config().clone()
        }
        None => a.model.config(21)?,
    };
    println!("model: {}", describe(&config));
    println!("config: {}", serde_json::to_string(&config)?);
    let count = config.count(size)?;
    println!(
        "parameters: {} ({:.2}M), BatchNorm running statistics: {}",
        count.params,
        count.params as f64 / 1e6,
        count.buffers
    );
    println!(
        "multiply-adds at {}x{}: {:.2}B (every convolution; atrous ones on TF's space-to-batch grid)",
        size.0,
        size.1,
        count.gmacs()
    );
    Ok(())
}

fn cmd_bench(a: BenchArgs, inference: &Inference) -> Result<()> {
    let device = &inference.device;
    let (h, w) = parse_hw(&a.size, "--size")?;
    if a.batch == 0 || a.iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    if a.train && a.batch == 1 {
        bail!("--train needs --batch of at least 2 (BatchNorm batch statistics)");
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let x = crate::init::initial_value("bench.input.weight", &[a.batch, 3, h, w], 1, device)?;
    let (cfg, mut step): (DeepLabConfig, Box<dyn FnMut() -> Result<()>>) = if a.train {
        // trainable variables: the weight file's, or seeded random ones
        let vm = candle_nn::VarMap::new();
        let cfg = match &a.weights {
            Some(wt) => {
                let path = files::resolve_weights(wt)?;
                let wf = deeplab_heads::weights::read_weights(&path, device)?;
                let cfg =
                    train::training_config(&wf.config, BatchNormMode::Train { momentum: 0.1 });
                DeepLabModel::new(
                    &cfg,
                    candle_nn::VarBuilder::from_varmap(&vm, DType::F32, device),
                )?;
                for (name, var) in vm
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?
                    .iter()
                {
                    if let Some(t) = wf.tensors.get(name) {
                        var.set(&t.to_dtype(DType::F32)?)?;
                    }
                }
                cfg
            }
            None => {
                let cfg = train::training_config(
                    &a.model.config(21)?,
                    BatchNormMode::Train { momentum: 0.1 },
                );
                DeepLabModel::new(
                    &cfg,
                    candle_nn::VarBuilder::from_varmap(&vm, DType::F32, device),
                )?;
                crate::init::init_seeded(&vm, 0)?;
                cfg
            }
        };
        let model = DeepLabModel::new(
            &cfg,
            candle_nn::VarBuilder::from_varmap(&vm, DType::F32, device),
        )?;
        let classes = cfg.num_classes as u32;
        let labels: Vec<u32> = (0..a.batch * h * w)
            .map(|i| ((i / w / 16 + i % w / 16) as u32) % classes)
            .collect();
        let y = Tensor::from_vec(labels, (a.batch, h, w), device)?;
        let params = train::trainable(&vm, BatchNormMode::Train { momentum: 0.1 })?;
        let mut opt = crate::optim::Sgd::new(params, SgdConfig::paper(&cfg.backbone))
            .map_err(anyhow::Error::msg)?;
        let step = move || -> Result<()> {
            let logits = model.forward_output(&x, true)?.upsampled;
            let loss = deeplab_ops::cross_entropy(&logits, &y, 255)?;
            let grads = loss.backward()?;
            deeplab_ops::profile::record(
                "sgd update",
                || "all parameters".into(),
                || opt.step(&grads, 1e-4),
            )?;
            Ok(())
        };
        (cfg, Box::new(step))
    } else {
        let model = match &a.weights {
            Some(wt) => inference.load(wt, None)?.model,
            None => {
                let cfg = a.model.config(21)?;
                let vm = candle_nn::VarMap::new();
                DeepLabModel::new(
                    &cfg,
                    candle_nn::VarBuilder::from_varmap(&vm, DType::F32, device),
                )?;
                crate::init::init_seeded(&vm, 0)?;
                // Inference runs on plain (detached) tensors: a model made of `Var`s records the
                // graph of every forward pass and keeps all its activations alive.
                let tensors = vm
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                    .collect();
                let mut model = DeepLabModel::new(
                    &cfg,
                    candle_nn::VarBuilder::from_tensors(tensors, inference.dtype, device),
                )?;
                inference.prepare(&mut model)?;
                model
            }
        };
        let cfg = model.config().clone();
        let x = x.to_dtype(model.dtype())?;
        let step = move || -> Result<()> {
            let y = model.forward_output(&x, false)?.upsampled;
            // make sure the result is materialized
            let _ = y.dims();
            Ok(())
        };
        (cfg, Box::new(step))
    };
    let count = cfg.count((h, w))?;
    for _ in 0..a.warmup {
        step()?;
    }
    deeplab_ops::profile::enable(a.profile);
    let _ = deeplab_ops::profile::take();
    let mut times = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        0.5 * (times[times.len() / 2 - 1] + times[times.len() / 2])
    };
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let (what, whats) = if a.train {
        ("training step", "training steps")
    } else {
        ("pass", "passes")
    };
    let peak = peak_rss_mib();
    println!(
        "{} output stride {}, input {}x{}x{}x{}, {:.2}M parameters, {:.2} GMACs per image, {threads} threads, {} warm-up + {} timed {whats}",
        describe(&cfg),
        cfg.output_stride(),
        a.batch,
        3,
        h,
        w,
        count.params as f64 / 1e6,
        count.gmacs(),
        a.warmup,
        a.iters
    );
    println!(
        "latency per {what}: median {:.1} ms, mean {:.1} ms, min {:.1} ms, max {:.1} ms; throughput {:.2} images/s ({:.1} GMAC/s{}); peak RSS {}",
        median * 1e3,
        mean * 1e3,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        a.batch as f64 / median,
        count.gmacs() * a.batch as f64 / median,
        if a.train { " of forward work" } else { "" },
        peak.map_or("n/a".to_string(), |m| format!("{m:.0} MiB"))
    );
    if a.profile {
        deeplab_ops::profile::enable(false);
        print_profile(
            deeplab_ops::profile::take(),
            a.iters,
            mean,
            a.profile_shapes,
        );
    }
    if a.json {
        let matmul = matmul_gflops(device)?;
        let rec = serde_json::json!({
            "matmul_gflops": matmul,
            "model": describe(&cfg), "output_stride": cfg.output_stride().to_string(),
            "mode": if a.train { "train" } else { "inference" },
            "batch": a.batch, "height": h, "width": w, "threads": threads,
            "params": count.params, "gmacs": count.gmacs(),
            "median_s": median, "mean_s": mean, "min_s": times[0],
            "max_s": times[times.len() - 1], "images_per_s": a.batch as f64 / median,
            "peak_rss_mib": peak,
        });
        println!("{rec}");
    }
    Ok(())
}

/// Prints a `--profile` table: time per pass by layer kind (with the unattributed rest) and
/// the costliest layer shapes.
fn print_profile(
    rows: Vec<((String, String), deeplab_ops::profile::Entry)>,
    iters: usize,
    mean: f64,
    shapes: usize,
) {
    let per = |s: f64| s / iters as f64 * 1e3;
    let mut kinds: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for ((k, _), e) in &rows {
        let v = kinds.entry(k.clone()).or_default();
        v.0 += e.calls;
        v.1 += e.seconds;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let total_ms = mean * 1e3;
    println!("profile (per pass, mean of {iters}; wall time of each layer call):");
    println!("| layer kind | calls | ms | share |");
    println!("|---|---:|---:|---:|");
    let mut attributed = 0.0;
    for (k, (calls, secs)) in &kinds {
        attributed += per(*secs);
        println!(
            "| {k} | {} | {:.1} | {:.1}% |",
            calls / iters as u64,
            per(*secs),
            100.0 * per(*secs) / total_ms
        );
    }
    println!(
        "| other (adds, concat, pooling, copies, glue) | - | {:.1} | {:.1}% |",
        total_ms - attributed,
        100.0 * (total_ms - attributed) / total_ms
    );
    let mut top = rows;
    top.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    println!("costliest layer shapes:");
    println!("| layer | shape | calls | ms |");
    println!("|---|---|---:|---:|");
    for ((k, d), e) in top.iter().take(shapes) {
        println!(
            "| {k} | {d} | {} | {:.1} |",
            e.calls / iters as u64,
            per(e.seconds)
        );
    }
}

/// The f32 rate (GFLOP/s) of candle's matmul on this device and thread count: the median of
/// seven 1024x1024x1024 products, the yardstick of the "matmul-bound" time of a model.
fn matmul_gflops(device: &Device) -> Result<f64> {
    let n = 1024;
    let a = crate::init::initial_value("bench.matmul.a", &[n, n], 1, device)?;
    let b = crate::init::initial_value("bench.matmul.b", &[n, n], 1, device)?;
    let mut times = Vec::new();
    for i in 0..9 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        let _ = c.dims();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n * n * n) as f64 / times[times.len() / 2] / 1e9)
}

/// The process's peak resident set size in MiB (`VmHWM` of `/proc/self/status`; Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn cmd_convert(a: ConvertArgs) -> Result<()> {
    if a.output.exists() && !a.force {
        bail!(
            "{}: the output file exists; pass --force to replace it",
            a.output.display()
        );
    }
    if !a.input.exists() {
        let idx = PathBuf::from(format!("{}.index", a.input.display()));
        if !idx.exists() {
            bail!("{}: no such checkpoint, archive or file", a.input.display());
        }
    }
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::ensure_writable_dir(dir)?;
    }
    let is_tflite = a
        .input
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tflite"))
        || (a.input.is_file() && deeplab_heads::tflite::looks_like_tflite(&a.input));
    if is_tflite {
        if a.output_stride.is_some() || a.atrous_rates.is_some() || a.multi_grid.is_some() {
            bail!("--output-stride, --atrous-rates and --multi-grid do not apply to TFLite models (their graph fixes them); use --eval-output-stride or `eval --output-stride`");
        }
        let mut opts = deeplab_heads::tflite::TfliteOptions::default();
        if let Some(os) = output_stride(a.eval_output_stride, "--eval-output-stride")? {
            let mut c = deeplab_heads::tflite::read_tflite(&a.input, &opts)?.config;
            c.eval_output_stride = Some(os);
            opts.config = Some(c);
        }
        let report = deeplab_heads::tflite::convert_tflite(&a.input, &a.output, &opts)?;
        println!("{report}");
        println!("wrote {}", a.output.display());
        return Ok(());
    }
    let opts = deeplab_heads::convert::ConvertOptions {
        config: None,
        output_stride: output_stride(a.output_stride, "--output-stride")?,
        atrous_rates: a
            .atrous_rates
            .as_deref()
            .map(|r| parse_list(r, "--atrous-rates"))
            .transpose()?,
        multi_grid: a
            .multi_grid
            .as_deref()
            .map(|r| parse_list(r, "--multi-grid"))
            .transpose()?,
        eval_output_stride: output_stride(a.eval_output_stride, "--eval-output-stride")?,
    };
    let conv = deeplab_heads::convert::convert_file(&a.input, &a.output, &opts)?;
    println!(
        "converted {} -> {}: {} ({} classes, output stride {}), {} tensors, {} variables skipped",
        a.input.display(),
        a.output.display(),
        describe(&conv.config),
        conv.config.num_classes,
        conv.config.output_stride(),
        conv.tensors.len(),
        conv.skipped.len()
    );
    Ok(())
}

fn cmd_synth(a: SynthArgs) -> Result<()> {
    let cfg = deeplab_data::synthetic::SyntheticConfig {
        seed: a.seed,
        num_train: a.train,
        num_val: a.val,
        min_size: a.min_size,
        max_size: a.max_size,
        max_objects: a.max_objects,
        void_width: a.void_width,
        noise: a.noise,
        jpeg_quality: a.jpeg_quality,
    };
    let ds = match a.layout {
        SynthLayout::Voc => deeplab_data::synthetic::write_voc(&a.out, &cfg)?,
        SynthLayout::Folder => deeplab_data::synthetic::write_folder(
            &a.out,
            &cfg,
            if a.color_masks {
                deeplab_data::synthetic::FolderMaskStyle::Color
            } else {
                deeplab_data::synthetic::FolderMaskStyle::Index
            },
        )?,
    };
    println!(
        "wrote {} train and {} val scenes to {}",
        ds.train.len(),
        ds.val.len(),
        ds.root.display()
    );
    Ok(())
}
