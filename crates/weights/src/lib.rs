//! The one table of pretrained weights: where each file comes from, how to check it, and the model it implies.
//!
//! Every pretrained file the project knows about is one [`WeightSpec`] in [`all()`]: its source (a Hugging
//! Face Hub repository pinned to a revision, or an official DeepLab model-zoo archive URL from
//! `tensorflow/models` `research/deeplab/g3doc/model_zoo.md`), the sha256 and size where they are known,
//! the model configuration it implies ([`ModelSpec`], plain data), the preprocessing it expects
//! ([`Preprocess`]), its license and the published metric as documentation.
//!
//! Both `cargo xtask fetch-weights` and the `deeplab` CLI read this table; nothing else in the workspace
//! hard-codes a hub id or an archive URL. The crate has no tensor dependency: it is data, lookup and the
//! cache layout ([`cache`]) that tells where a fetched file lives without touching the network.
//!
//! ```
//! use deeplab_weights::{find, Normalization, Source};
//!
//! let spec = find("xception65_coco_voc_trainaug").unwrap();
//! assert_eq!(spec.model.backbone, "xception65");
//! assert_eq!(spec.model.num_classes, Some(21));
//! let head = spec.model.head.as_ref().unwrap();
//! assert_eq!(head.atrous_rates_at(8), Some([12, 24, 36]));
//! assert_eq!(spec.preprocess.normalization, Normalization::Inception);
//! assert!(matches!(spec.source, Source::Archive { .. }));
//!
//! // Unknown names fail with the closest known names.
//! let err = find("xception65_coco_voc").unwrap_err();
//! assert!(err.to_string().contains("xception65_coco_voc_trainaug"));
//! ```
#![deny(missing_docs)]

pub mod cache;
mod table;

use std::fmt;

/// Where a weights file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A file in a Hugging Face Hub model repository, fetched through the hub API
    /// (`{endpoint}/{repo}/resolve/{revision}/{file}`) into the standard hub cache.
    Hub {
        /// Repository id, e.g. `timm/xception65.tf_in1k`.
        repo: &'static str,
        /// A full 40-hex commit hash, or a branch name (`main`) where no commit could be pinned.
        revision: &'static str,
        /// Path of the file inside the repository, e.g. `model.safetensors`.
        file: &'static str,
    },
    /// A `.tar.gz` archive holding a TensorFlow checkpoint (`*.index` + `*.data-*`), downloaded over
    /// plain HTTP(S), extracted and converted once into canonical safetensors.
    Archive {
        /// The archive URL exactly as listed in the official model zoo.
        url: &'static str,
    },
}

impl Source {
    /// The final path segment of the source: the hub file name or the archive file name.
    pub fn file_name(&self) -> &'static str {
        match self {
            Source::Hub { file, .. } => file.rsplit('/').next().unwrap_or(file),
            Source::Archive { url } => url.rsplit('/').next().unwrap_or(url),
        }
    }

    /// Whether the revision is pinned to a full commit hash (hub) or is an immutable URL (archive).
    pub fn is_pinned(&self) -> bool {
        match self {
            Source::Hub { revision, .. } => is_hex(revision, 40),
            Source::Archive { .. } => true,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Hub {
                repo,
                revision,
                file,
            } => {
                let rev = if is_hex(revision, 40) {
                    &revision[..12]
                } else {
                    revision
                };
                write!(f, "hf://{repo}@{rev}/{file}")
            }
            Source::Archive { url } => f.write_str(url),
        }
    }
}

/// What kind of weights an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    /// An ImageNet-pretrained classification backbone: the starting point for training DeepLab.
    Backbone,
    /// A complete, trained segmentation model (backbone + ASPP/decoder + logits).
    Segmentation,
}

impl fmt::Display for WeightKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightKind::Backbone => "backbone",
            WeightKind::Segmentation => "segmentation",
        })
    }
}

/// The on-disk format of the downloaded file, before any conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Already safetensors in the reference (timm) key names: usable as downloaded.
    Safetensors,
    /// A TensorFlow tensor-bundle checkpoint inside a `.tar.gz`: needs a one-time conversion.
    TfCheckpointArchive,
}

/// The ASPP / decoder configuration of a segmentation model (DeepLabv3+ paper, §3.1-3.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSpec {
    /// Atrous rates of the three 3x3 ASPP branches at output stride 16 (`[6, 12, 18]` in the paper).
    /// `None`: no atrous branches at all (the model-zoo MobileNetV2 setting: image pooling + 1x1 only).
    pub atrous_rates_os16: Option<[u32; 3]>,
    /// Whether ASPP has the image-level (global average pooling) branch.
    pub image_pooling: bool,
    /// Output stride of the decoder's low-level feature (4 in the paper); `None` = no decoder (DeepLabv3).
    pub decoder_output_stride: Option<u32>,
    /// Whether the ASPP 3x3 branches and decoder 3x3 convs are depthwise-separable (the official
    /// `aspp_with_separable_conv` / `decoder_use_separable_conv` flags; no effect when neither exists).
    pub separable: bool,
    /// Channels of every ASPP branch and of the projection (256 in all official models).
    pub aspp_channels: u32,
}

impl HeadSpec {
    /// The ASPP atrous rates at `output_stride`: the OS16 rates scaled by `16 / output_stride`
    /// (OS 8 doubles them: `[12, 24, 36]`). `None` when the model has no atrous branches or the
    /// scaling is not exact.
    pub fn atrous_rates_at(&self, output_stride: u32) -> Option<[u32; 3]> {
        let rates = self.atrous_rates_os16?;
        if output_stride == 0 {
            return None;
        }
        let mut out = [0u32; 3];
        for (o, r) in out.iter_mut().zip(rates) {
            let scaled = r * 16;
            if scaled % output_stride != 0 {
                return None;
            }
            *o = scaled / output_stride;
        }
        Some(out)
    }

    /// Whether the model has a decoder (DeepLabv3+) rather than upsampling the ASPP logits (DeepLabv3).
    pub fn has_decoder(&self) -> bool {
        self.decoder_output_stride.is_some()
    }
}

/// The model a weights file implies, as plain data (the heads/backbones crates turn it into configs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSpec {
    /// Backbone variant: one of [`BACKBONES`] (`"xception65"`, `"resnet101"`, `"resnet101_beta"`,
    /// `"mobilenetv2_100"`, ...). The `_beta` ResNets are the official DeepLab variant with a
    /// three-3x3-conv stem; the others follow timm's definitions.
    pub backbone: &'static str,
    /// Channel (depth) multiplier of the backbone: 1.0, or 0.5 for `mobilenetv2_050`.
    pub width_multiplier: f32,
    /// Multi-grid unit rates of the last ResNet block, if any (the paper uses `(1, 2, 4)`).
    pub multi_grid: Option<[u32; 3]>,
    /// Output stride the weights were trained at, where the source says so.
    pub train_output_stride: Option<u32>,
    /// Output stride the published metric was measured at (the one to evaluate at).
    pub eval_output_stride: u32,
    /// ASPP / decoder; `None` for a classification backbone.
    pub head: Option<HeadSpec>,
    /// Number of output classes (21 VOC, 19 Cityscapes, 151 ADE20K, 1000 ImageNet); `None` where the
    /// checkpoint's classifier is not documented (the official ImageNet checkpoints).
    pub num_classes: Option<u32>,
    /// Crop size `[height, width]` used for evaluation (VOC 513x513, Cityscapes 1025x2049).
    pub crop_size: [u32; 2],
}

/// How pixels are normalised before the first convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// `x * 2 / 255 - 1` (the official DeepLab `_preprocess_zero_mean_unit_range`, timm's
    /// `IMAGENET_INCEPTION_MEAN/STD` = 0.5/0.5): values in `[-1, 1]`.
    Inception,
    /// `(x / 255 - mean) / std` with the ImageNet mean `(0.485, 0.456, 0.406)` and std
    /// `(0.229, 0.224, 0.225)` (torchvision and most timm weights).
    ImageNet,
}

impl Normalization {
    /// `(mean, std)` per RGB channel, for pixels scaled to `[0, 1]`.
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Normalization::Inception => ([0.5; 3], [0.5; 3]),
            Normalization::ImageNet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        }
    }

    /// Normalise one 8-bit value of channel `c` (0 = R, 1 = G, 2 = B).
    pub fn apply(self, value: u8, c: usize) -> f32 {
        let (mean, std) = self.mean_std();
        let c = c.min(2);
        (f32::from(value) / 255.0 - mean[c]) / std[c]
    }
}

impl fmt::Display for Normalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Normalization::Inception => "inception (x*2/255-1)",
            Normalization::ImageNet => "imagenet mean/std",
        })
    }
}

/// The preprocessing a weights file expects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Pixel normalisation.
    pub normalization: Normalization,
    /// Input size `[height, width]` the weights were evaluated at (the classifier's input size for
    /// backbones, the evaluation crop for segmentation models).
    pub input_size: [u32; 2],
    /// Raw pixel value used to pad crops (127.5 for inception normalisation: pads to 0 after it).
    pub pad_value: f32,
}

/// A published result, kept as documentation (no test depends on it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    /// Dataset and split, e.g. `"PASCAL VOC 2012 val"`.
    pub dataset: &'static str,
    /// Metric name, e.g. `"mIoU"`.
    pub name: &'static str,
    /// Value in percent.
    pub value: f32,
    /// Evaluation protocol: output stride, scales and flips, e.g. `"OS16, single scale"`.
    pub protocol: &'static str,
    /// Where the number comes from.
    pub reference: &'static str,
}

/// One entry of the weights table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightSpec {
    /// Unique name used on the command line (`cargo xtask fetch-weights NAME`).
    pub name: &'static str,
    /// Other names accepted by [`find`] (older model-zoo names, `timm/`-prefixed hub ids).
    pub aliases: &'static [&'static str],
    /// One-line description.
    pub description: &'static str,
    /// Backbone or full segmentation model.
    pub kind: WeightKind,
    /// Where the file comes from.
    pub source: Source,
    /// Exact size in bytes of the downloaded file, where known.
    pub size: Option<u64>,
    /// The size the source documents, for display (`"439MB"`); not used for checking.
    pub approx_size: &'static str,
    /// Lower-case hex sha256 of the downloaded file, where known. Hub files without one are checked
    /// against the hub's LFS sha256 (the `x-linked-etag` header) instead.
    pub sha256: Option<&'static str>,
    /// The model the weights imply.
    pub model: ModelSpec,
    /// The preprocessing they expect.
    pub preprocess: Preprocess,
    /// License of the weights (SPDX-style id).
    pub license: &'static str,
    /// Published result, as documentation.
    pub metric: Option<Metric>,
    /// Name of the checked-in timm key list these weights follow (`reference/keys/timm_<name>.keys.txt`),
    /// for hub safetensors in timm's names; `None` for TensorFlow checkpoints.
    pub timm_keys: Option<&'static str>,
}

impl WeightSpec {
    /// The format of the downloaded file.
    pub fn format(&self) -> WeightFormat {
        match self.source {
            Source::Hub { .. } => WeightFormat::Safetensors,
            Source::Archive { .. } => WeightFormat::TfCheckpointArchive,
        }
    }

    /// The entry's configuration as string pairs, for the `__metadata__` of a converted safetensors file
    /// (so a converted checkpoint carries the model it implies). Absent options are omitted.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let m = &self.model;
        let mut out = vec![
            ("deeplab.weights", self.name.to_string()),
            ("deeplab.source", self.source.to_string()),
            ("deeplab.license", self.license.to_string()),
            ("deeplab.backbone", m.backbone.to_string()),
            ("deeplab.width_multiplier", m.width_multiplier.to_string()),
            (
                "deeplab.eval_output_stride",
                m.eval_output_stride.to_string(),
            ),
            (
                "deeplab.crop_size",
                format!("{}x{}", m.crop_size[0], m.crop_size[1]),
            ),
            (
                "deeplab.normalization",
                match self.preprocess.normalization {
                    Normalization::Inception => "inception",
                    Normalization::ImageNet => "imagenet",
                }
                .to_string(),
            ),
        ];
        if let Some(os) = m.train_output_stride {
            out.push(("deeplab.train_output_stride", os.to_string()));
        }
        if let Some(c) = m.num_classes {
            out.push(("deeplab.num_classes", c.to_string()));
        }
        if let Some(g) = m.multi_grid {
            out.push(("deeplab.multi_grid", format!("{},{},{}", g[0], g[1], g[2])));
        }
        if let Some(h) = &m.head {
            if let Some(r) = h.atrous_rates_os16 {
                out.push((
                    "deeplab.atrous_rates_os16",
                    format!("{},{},{}", r[0], r[1], r[2]),
                ));
            }
            out.push(("deeplab.image_pooling", h.image_pooling.to_string()));
            if let Some(d) = h.decoder_output_stride {
                out.push(("deeplab.decoder_output_stride", d.to_string()));
            }
            out.push(("deeplab.separable", h.separable.to_string()));
            out.push(("deeplab.aspp_channels", h.aspp_channels.to_string()));
        }
        out
    }

    /// Whether `name` is this entry's name or one of its aliases (ASCII case-insensitive).
    pub fn matches(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// Every backbone variant string the table uses.
pub const BACKBONES: &[&str] = &[
    "xception41",
    "xception65",
    "xception71",
    "resnet50",
    "resnet101",
    "resnet50_beta",
    "resnet101_beta",
    "mobilenetv2_100",
    "mobilenetv2_050",
];

/// Errors of table lookup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeightsError {
    /// No entry has this name or alias.
    #[error("unknown weights name `{name}`{}", suggestion_text(.suggestions))]
    UnknownName {
        /// The name that was asked for.
        name: String,
        /// The closest known names, best first (may be empty).
        suggestions: Vec<&'static str>,
    },
}

fn suggestion_text(suggestions: &[&'static str]) -> String {
    if suggestions.is_empty() {
        "; run `cargo xtask fetch-weights --list` to see the available weights".to_string()
    } else {
        format!("; did you mean: {}?", suggestions.join(", "))
    }
}

/// The whole table, in display order (hub backbones first, then the official model zoo).
pub fn all() -> &'static [WeightSpec] {
    table::TABLE
}

/// Look an entry up by name or alias (ASCII case-insensitive).
///
/// # Errors
/// [`WeightsError::UnknownName`] with up to five close matches when nothing matches.
pub fn find(name: &str) -> Result<&'static WeightSpec, WeightsError> {
    let name = name.trim();
    if let Some(spec) = all().iter().find(|s| s.matches(name)) {
        return Ok(spec);
    }
    Err(WeightsError::UnknownName {
        name: name.to_string(),
        suggestions: suggestions(name, 5),
    })
}

/// Up to `max` entry names closest to `query`, best first: entries whose name or alias contains the
/// query (or is contained in it) come first, then those within a small edit distance.
pub fn suggestions(query: &str, max: usize) -> Vec<&'static str> {
    let q = query.to_ascii_lowercase();
    if q.is_empty() {
        return Vec::new();
    }
    let mut scored: Vec<(usize, &'static str)> = Vec::new();
    for spec in all() {
        let mut best = usize::MAX;
        for candidate in std::iter::once(spec.name).chain(spec.aliases.iter().copied()) {
            let c = candidate.to_ascii_lowercase();
            let d = strsim::levenshtein(&q, &c);
            let score = if c.contains(&q) || (q.len() >= 4 && q.contains(&c)) {
                c.len().abs_diff(q.len()) / 8
            } else if tokens_cover(&q, &c) {
                // Every word of the query starts a word of the candidate ("xception65_voc").
                50 + d
            } else if d * 3 <= q.len().max(c.len()) {
                // Edits up to a third of the longer name: typos, a dropped suffix.
                100 + d
            } else {
                continue;
            };
            best = best.min(score);
        }
        if best != usize::MAX {
            scored.push((best, spec.name));
        }
    }
    scored.sort();
    scored.into_iter().take(max).map(|(_, n)| n).collect()
}

fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split(['_', '.', '-', '/']).filter(|w| !w.is_empty())
}

/// Whether every word of `query` is a prefix of some word of `candidate`.
fn tokens_cover(query: &str, candidate: &str) -> bool {
    let mut any = false;
    for w in words(query) {
        any = true;
        if !words(candidate).any(|c| c.starts_with(w)) {
            return false;
        }
    }
    any
}

/// Whether `s` is exactly `len` lower-case hex digits.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_and_aliases_are_unique() {
        let mut seen = HashSet::new();
        for spec in all() {
            for n in std::iter::once(spec.name).chain(spec.aliases.iter().copied()) {
                assert!(seen.insert(n.to_ascii_lowercase()), "duplicate name {n}");
            }
        }
    }

    #[test]
    fn every_entry_is_consistent() {
        for s in all() {
            if let Some(h) = s.sha256 {
                assert!(
                    is_hex(h, 64),
                    "{}: sha256 must be 64 lower-case hex",
                    s.name
                );
            }
            assert!(
                BACKBONES.contains(&s.model.backbone),
                "{}: backbone {}",
                s.name,
                s.model.backbone
            );
            assert!(
                [8, 16, 32].contains(&s.model.eval_output_stride),
                "{}",
                s.name
            );
            if let Some(os) = s.model.train_output_stride {
                assert!([8, 16, 32].contains(&os), "{}", s.name);
            }
            assert!(s.model.width_multiplier > 0.0 && s.model.width_multiplier <= 1.0);
            match s.kind {
                WeightKind::Segmentation => {
                    let head = s.model.head.expect("segmentation entries have a head");
                    assert!(s.model.num_classes.is_some(), "{}", s.name);
                    if head.atrous_rates_os16.is_some() {
                        assert!(head.atrous_rates_at(s.model.eval_output_stride).is_some());
                    }
                    assert!(
                        s.metric.is_some(),
                        "{}: model-zoo entries document their metric",
                        s.name
                    );
                }
                WeightKind::Backbone => assert!(s.model.head.is_none(), "{}", s.name),
            }
            match s.source {
                Source::Hub {
                    repo,
                    revision,
                    file,
                } => {
                    assert!(repo.contains('/') && !file.is_empty() && !revision.is_empty());
                    assert!(
                        s.timm_keys.is_some(),
                        "{}: hub entries name their key list",
                        s.name
                    );
                }
                Source::Archive { url } => {
                    assert!(
                        url.starts_with("http://download.tensorflow.org/models/"),
                        "{url}"
                    );
                    assert!(url.ends_with(".tar.gz"), "{url}");
                    assert!(s.timm_keys.is_none());
                }
            }
            assert!(!s.license.is_empty() && !s.description.is_empty());
            assert!(s.preprocess.input_size.iter().all(|&d| d > 0));
        }
    }

    #[test]
    fn required_entries_exist() {
        for name in [
            "xception41.tf_in1k",
            "xception65.tf_in1k",
            "xception71.tf_in1k",
            "resnet50.tv_in1k",
            "resnet101.tv_in1k",
            "mobilenetv2_100.ra_in1k",
            "mobilenetv2_050.lamb_in1k",
            "xception65_coco_voc_trainaug",
            "xception65_coco_voc_trainval",
            "mobilenetv2_coco_voc_trainaug",
            "mobilenetv2_coco_voc_trainval",
            "xception65_cityscapes_trainfine",
            "mobilenetv2_coco_cityscapes_trainfine",
            "xception_65_imagenet",
            "resnet_v1_101_beta_imagenet",
        ] {
            assert_eq!(find(name).map(|s| s.name), Ok(name));
        }
        // Hub ids with the organisation and the older model-zoo names resolve too.
        assert_eq!(
            find("timm/xception65.tf_in1k").map(|s| s.name),
            Ok("xception65.tf_in1k")
        );
        assert_eq!(
            find("XCEPTION_COCO_VOC_TRAINAUG").map(|s| s.name),
            Ok("xception65_coco_voc_trainaug")
        );
    }

    #[test]
    fn unknown_names_suggest_close_matches() {
        let err = find("xception65_voc").unwrap_err();
        let WeightsError::UnknownName { suggestions, .. } = &err;
        assert!(
            suggestions.contains(&"xception65_coco_voc_trainaug"),
            "{suggestions:?}"
        );
        let err = find("mobilenetv2_coco_voc_trainvl").unwrap_err();
        let WeightsError::UnknownName { suggestions, .. } = &err;
        assert_eq!(
            suggestions.first(),
            Some(&"mobilenetv2_coco_voc_trainval"),
            "{suggestions:?}"
        );
        let msg = find("zzzz-nothing").unwrap_err().to_string();
        assert!(msg.contains("--list"), "{msg}");
    }

    #[test]
    fn rates_scale_with_output_stride() {
        let h = find("xception65_coco_voc_trainaug")
            .unwrap()
            .model
            .head
            .unwrap();
        assert_eq!(h.atrous_rates_at(16), Some([6, 12, 18]));
        assert_eq!(h.atrous_rates_at(8), Some([12, 24, 36]));
        assert_eq!(h.atrous_rates_at(32), Some([3, 6, 9]));
        let m = find("mobilenetv2_coco_voc_trainaug")
            .unwrap()
            .model
            .head
            .unwrap();
        assert_eq!(m.atrous_rates_at(16), None);
        assert!(!m.has_decoder());
    }

    #[test]
    fn normalization_matches_the_official_formula() {
        for v in [0u8, 1, 127, 128, 254, 255] {
            let official = 2.0 * f32::from(v) / 255.0 - 1.0;
            assert!((Normalization::Inception.apply(v, 0) - official).abs() < 1e-6);
        }
        let x = Normalization::ImageNet.apply(255, 2);
        assert!((x - (1.0 - 0.406) / 0.225).abs() < 1e-6);
    }

    #[test]
    fn metadata_carries_the_model_config() {
        let md: std::collections::HashMap<_, _> = find("xception65_coco_voc_trainaug")
            .unwrap()
            .metadata()
            .into_iter()
            .collect();
        assert_eq!(md["deeplab.backbone"], "xception65");
        assert_eq!(md["deeplab.atrous_rates_os16"], "6,12,18");
        assert_eq!(md["deeplab.decoder_output_stride"], "4");
        assert_eq!(md["deeplab.num_classes"], "21");
        assert_eq!(md["deeplab.crop_size"], "513x513");
        assert_eq!(md["deeplab.normalization"], "inception");
        let mobile: std::collections::HashMap<_, _> = find("mobilenetv2_coco_voc_trainaug")
            .unwrap()
            .metadata()
            .into_iter()
            .collect();
        assert!(!mobile.contains_key("deeplab.atrous_rates_os16"));
        assert!(!mobile.contains_key("deeplab.decoder_output_stride"));
    }

    #[test]
    fn source_display_and_file_name() {
        let s = find("xception65_coco_voc_trainaug").unwrap();
        assert_eq!(
            s.source.file_name(),
            "deeplabv3_pascal_train_aug_2018_01_04.tar.gz"
        );
        let t = find("xception41.tf_in1k").unwrap();
        assert_eq!(t.source.file_name(), "model.safetensors");
        assert!(t.source.is_pinned());
        assert!(t
            .source
            .to_string()
            .starts_with("hf://timm/xception41.tf_in1k@2dd422115456/"));
    }
}
