//! Inference on one image: preprocessing (native size, the official pad-to-crop protocol, a
//! PIL-bilinear stretch, or a keep-aspect resize padded with 128 as the TFLite models expect),
//! multi-scale and flipped inputs averaged as softmax probabilities (official
//! `research/deeplab/model.py` `predict_labels_multi_scale`), optional sliding-window inference
//! for images larger than the crop, and the mapping of the prediction back to the image's own
//! size (crop of the valid region, nearest-neighbour resize of labels).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use deeplab_data::{
    resize_bilinear_pil, resize_long_side_padded, transform::pad_float, FloatImage, LabelMap,
    Normalization, RgbImage,
};
use deeplab_heads::{DeepLabModel, InputNormalization};
use deeplab_ops::{resize_bilinear, scale_dimension, ResizeMode};
use std::fmt;
use std::str::FromStr;

/// How an image becomes the network input, and how the prediction maps back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preprocess {
    /// The image at its own size (no resize, no padding).
    Native,
    /// Padded at the bottom/right with the mean pixel to the eval crop (`None`: the default
    /// crop of the weights or the dataset), never cropped; the official protocol. Only the
    /// image's own region is scored.
    Pad(Option<(usize, usize)>),
    /// Stretched to `height` x `width` with PIL's bilinear filter (the TFLite float model's
    /// 257x257 input); the prediction is resized back with nearest neighbour.
    Resize(usize, usize),
    /// Resized keeping the aspect ratio so the long side is N (PIL bilinear), at the top-left of
    /// an N x N canvas filled with 128 (the quantized TFLite model's input); the valid region of
    /// the prediction is resized back with nearest neighbour.
    KeepAspectPad(usize),
}

fn parse_hw(s: &str) -> Option<(usize, usize)> {
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (h.trim().parse().ok()?, w.trim().parse().ok()?),
        None => {
            let n = s.trim().parse().ok()?;
            (n, n)
        }
    };
    (h > 0 && w > 0).then_some((h, w))
}

impl FromStr for Preprocess {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "unknown preprocessing '{s}': use native, pad, pad:HxW, resize:N, resize:HxW or keep-aspect-pad:N"
            )
        };
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a)),
            None => (s.trim(), None),
        };
        Ok(match (kind, arg) {
            ("native", None) => Preprocess::Native,
            ("pad", None) => Preprocess::Pad(None),
            ("pad", Some(a)) => Preprocess::Pad(Some(parse_hw(a).ok_or_else(bad)?)),
            ("resize", Some(a)) => {
                let (h, w) = parse_hw(a).ok_or_else(bad)?;
                Preprocess::Resize(h, w)
            }
            ("keep-aspect-pad", Some(a)) => {
                Preprocess::KeepAspectPad(a.trim().parse().ok().filter(|n| *n > 0).ok_or_else(bad)?)
            }
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for Preprocess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Preprocess::Native => f.write_str("native"),
            Preprocess::Pad(None) => f.write_str("pad"),
            Preprocess::Pad(Some((h, w))) => write!(f, "pad:{h}x{w}"),
            Preprocess::Resize(h, w) => write!(f, "resize:{h}x{w}"),
            Preprocess::KeepAspectPad(n) => write!(f, "keep-aspect-pad:{n}"),
        }
    }
}

/// The data crate's normalization equal to a model's (for the pad value and the loader).
pub fn data_normalization(n: &InputNormalization) -> Normalization {
    match *n {
        InputNormalization::Official => Normalization::Official,
        InputNormalization::ImageNet => Normalization::ImageNet,
        InputNormalization::MeanStd { mean, std } => Normalization::MeanStd { mean, std },
    }
}

/// Inference settings.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceOptions {
    /// Preprocessing; `Pad(None)` must be resolved to a size before use.
    pub preprocess: Preprocess,
    /// Input scales whose softmax probabilities are averaged (`[1.0]`: single scale).
    pub scales: Vec<f64>,
    /// Also run the horizontally flipped input and average it in.
    pub flip: bool,
    /// With [`Preprocess::Pad`]: images larger than the crop are covered by overlapping
    /// crop-sized windows (stride 2/3 of the crop) whose probabilities are averaged, instead of
    /// being run whole.
    pub sliding_window: bool,
}

impl InferenceOptions {
    /// Single scale, no flip, no sliding window.
    pub fn single(preprocess: Preprocess) -> Self {
        Self {
            preprocess,
            scales: vec![1.0],
            flip: false,
            sliding_window: false,
        }
    }

    /// Whether one plain forward pass gives the result (its logits are then meaningful).
    pub fn is_single_pass(&self) -> bool {
        self.scales == [1.0] && !self.flip
    }

    fn validate(&self) -> Result<()> {
        if self.scales.is_empty() {
            bail!("--scales: give at least one scale");
        }
        if let Some(s) = self.scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("--scales: scale {s} must be a positive number");
        }
        if let Preprocess::Pad(None) = self.preprocess {
            bail!("the pad size is unresolved (internal error: resolve Pad(None) first)");
        }
        Ok(())
    }
}

/// The result of [`Predictor::predict`].
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Class ids at the image's own size.
    pub label: LabelMap,
    /// `[1, classes, H, W]` at the network input size: the logits for a single pass, the averaged
    /// probabilities otherwise (see [`Prediction::scores_are_logits`]). `None` for sliding windows.
    pub scores: Option<Tensor>,
    /// Whether `scores` holds logits (single pass) rather than probabilities.
    pub scores_are_logits: bool,
    /// The network input size `(height, width)`.
    pub input_size: (usize, usize),
}

/// Runs a model on images as [`InferenceOptions`] say.
#[derive(Debug)]
pub struct Predictor<'a> {
    model: &'a DeepLabModel,
    opts: InferenceOptions,
    device: Device,
    mode: ResizeMode,
    pad_pixel: [f32; 3],
}

impl<'a> Predictor<'a> {
    /// A predictor for `model` on `device`; fails on invalid options.
    pub fn new(model: &'a DeepLabModel, opts: InferenceOptions, device: &Device) -> Result<Self> {
        opts.validate()?;
        let cfg = model.config();
        Ok(Self {
            model,
            mode: ResizeMode::from_align_corners(cfg.align_corners),
            pad_pixel: data_normalization(&cfg.normalization).mean_pixel(),
            opts,
            device: device.clone(),
        })
    }

    /// The options.
    pub fn options(&self) -> &InferenceOptions {
        &self.opts
    }

    fn to_input(&self, img: &FloatImage) -> Result<Tensor> {
        let t = Tensor::from_slice(&img.data, (1, 3, img.height, img.width), &self.device)?;
        Ok(self.model.normalize(&t)?)
    }

    /// Logits (single pass) or averaged probabilities `[1, C, H, W]` for a normalized input.
    fn score(&self, x: &Tensor, want_probs: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if self.opts.is_single_pass() {
            let logits = self.model.forward_output(x, false)?.upsampled;
            return Ok(if want_probs {
                candle_nn::ops::softmax(&logits, 1)?
            } else {
                logits
            });
        }
        let mut acc: Option<Tensor> = None;
        let mut n = 0usize;
        for &s in &self.opts.scales {
            let size = if s == 1.0 {
                (h, w)
            } else if self.mode == ResizeMode::AlignCorners {
                (scale_dimension(h, s), scale_dimension(w, s))
            } else {
                (
                    ((h as f64) * s).round() as usize,
                    ((w as f64) * s).round() as usize,
                )
            };
            if size.0 == 0 || size.1 == 0 {
                bail!("scale {s} turns the {h}x{w} input into an empty image");
            }
            let xs = if size == (h, w) {
                x.clone()
            } else {
                resize_bilinear(x, size, self.mode)?
            };
            let flips: &[bool] = if self.opts.flip {
                &[false, true]
            } else {
                &[false]
            };
            for &f in flips {
                let xi = if f {
                    xs.flip(&[3])?.contiguous()?
                } else {
                    xs.clone()
                };
                let mut l = self
                    .model
                    .forward_output(&xi, false)
                    .with_context(|| format!("forward pass at scale {s} ({}x{})", size.0, size.1))?
                    .upsampled;
                if f {
                    l = l.flip(&[3])?.contiguous()?;
                }
                if size != (h, w) {
                    l = resize_bilinear(&l, (h, w), self.mode)?;
                }
                let p = candle_nn::ops::softmax(&l, 1)?;
                acc = Some(match acc {
                    Some(a) => (a + p)?,
                    None => p,
                });
                n += 1;
            }
        }
        let acc = acc.context("no scale was run")?;
        Ok((acc / n as f64)?)
    }

    /// Predicts the class of every pixel of `image` (RGB, 0..255).
    pub fn predict(&self, image: &RgbImage) -> Result<Prediction> {
        let (w0, h0) = (image.width() as usize, image.height() as usize);
        if w0 == 0 || h0 == 0 {
            bail!("the image is empty ({w0}x{h0})");
        }
        let (input, valid) = match self.opts.preprocess {
            Preprocess::Native => (FloatImage::from_rgb(image), (h0, w0)),
            Preprocess::Pad(Some((ch, cw))) => {
                let img = FloatImage::from_rgb(image);
                if self.opts.sliding_window && (h0 > ch || w0 > cw) {
                    let label = self.sliding(&img, (ch, cw))?;
                    return Ok(Prediction {
                        label,
                        scores: None,
                        scores_are_logits: false,
                        input_size: (ch, cw),
                    });
                }
                (
                    pad_float(&img, ch.max(h0), cw.max(w0), self.pad_pixel),
                    (h0, w0),
                )
            }
            Preprocess::Pad(None) => bail!("unresolved pad size"),
            Preprocess::Resize(h, w) => {
                let r = resize_bilinear_pil(image, w as u32, h as u32)?;
                (FloatImage::from_rgb(&r), (h, w))
            }
            Preprocess::KeepAspectPad(n) => {
                let r = resize_long_side_padded(image, n as u32, 128)?;
                (
                    FloatImage::from_rgb(&r.image),
                    (r.valid_height as usize, r.valid_width as usize),
                )
            }
        };
        let (hi, wi) = (input.height, input.width);
        let x = self.to_input(&input)?;
        let scores = self.score(&x, false)?;
        let ids = argmax_labels(&scores)?;
        let full = LabelMap::from_vec(wi as u32, hi as u32, ids)?;
        let cropped = crop_label(&full, valid.0, valid.1);
        let label = if (cropped.height() as usize, cropped.width() as usize) == (h0, w0) {
            cropped
        } else {
            resize_label_nearest(&cropped, h0, w0)
        };
        Ok(Prediction {
            label,
            scores: Some(scores),
            scores_are_logits: self.opts.is_single_pass(),
            input_size: (hi, wi),
        })
    }

    /// Sliding-window inference over an image larger than the crop.
    fn sliding(&self, img: &FloatImage, crop: (usize, usize)) -> Result<LabelMap> {
        let (h, w) = (img.height, img.width);
        let (ch, cw) = crop;
        let starts = |len: usize, c: usize| -> Vec<usize> {
            if len <= c {
                return vec![0];
            }
            let stride = (2 * c).div_ceil(3).max(1);
            let mut v: Vec<usize> = (0..)
                .map(|i| i * stride)
                .take_while(|s| s + c < len)
                .collect();
            v.push(len - c);
            v.dedup();
            v
        };
        let classes = self.model.config().num_classes;
        let mut acc = vec![0f32; classes * h * w];
        for &y0 in &starts(h, ch) {
            for &x0 in &starts(w, cw) {
                let (vh, vw) = (ch.min(h - y0), cw.min(w - x0));
                let mut win = FloatImage::filled(ch, cw, self.pad_pixel);
                for c in 0..3 {
                    for y in 0..vh {
                        let s = (c * h + y0 + y) * w + x0;
                        let d = (c * ch + y) * cw;
                        win.data[d..d + vw].copy_from_slice(&img.data[s..s + vw]);
                    }
                }
                let p = self.score(&self.to_input(&win)?, true)?;
                let p = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for k in 0..classes {
                    for y in 0..vh {
                        let src = &p[(k * ch + y) * cw..(k * ch + y) * cw + vw];
                        let dst = (k * h + y0 + y) * w + x0;
                        for (a, b) in acc[dst..dst + vw].iter_mut().zip(src) {
                            *a += b;
                        }
                    }
                }
            }
        }
        let mut ids = vec![0u8; h * w];
        for (i, id) in ids.iter_mut().enumerate() {
            let mut best = (f32::NEG_INFINITY, 0usize);
            for k in 0..classes {
                let v = acc[k * h * w + i];
                if v > best.0 {
                    best = (v, k);
                }
            }
            *id = best.1 as u8;
        }
        Ok(LabelMap::from_vec(w as u32, h as u32, ids)?)
    }
}

/// Per-pixel argmax over the class axis of `[1, C, H, W]` scores, as u8 class ids.
pub fn argmax_labels(scores: &Tensor) -> Result<Vec<u8>> {
    let (_, c, _, _) = scores.dims4()?;
    if c > 255 {
        bail!("{c} classes do not fit 8-bit label maps (255 is the ignore label)");
    }
    let ids = scores.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
    Ok(ids.into_iter().map(|v| v as u8).collect())
}

/// The top-left `height` x `width` region of a label map.
pub fn crop_label(label: &LabelMap, height: usize, width: usize) -> LabelMap {
    let (w, h) = (label.width() as usize, label.height() as usize);
    if (h, w) == (height, width) {
        return label.clone();
    }
    let (ch, cw) = (height.min(h), width.min(w));
    let src = label.as_slice();
    let mut out = Vec::with_capacity(ch * cw);
    for y in 0..ch {
        out.extend_from_slice(&src[y * w..y * w + cw]);
    }
    LabelMap::from_vec(cw as u32, ch as u32, out)
        .unwrap_or_else(|_| LabelMap::filled(cw as u32, ch as u32, 0))
}

/// Nearest-neighbour resize of a label map (pixel centres: `src = floor((dst + 0.5) * in / out)`,
/// as PIL's `NEAREST`).
pub fn resize_label_nearest(label: &LabelMap, height: usize, width: usize) -> LabelMap {
    let (w, h) = (label.width() as usize, label.height() as usize);
    let src = label.as_slice();
    let map = |dst: usize, out: usize, inp: usize| {
        ((((dst as f64) + 0.5) * inp as f64 / out as f64) as usize).min(inp - 1)
    };
    let xs: Vec<usize> = (0..width).map(|x| map(x, width, w)).collect();
    let mut out = Vec::with_capacity(height * width);
    for y in 0..height {
        let sy = map(y, height, h);
        out.extend(xs.iter().map(|&sx| src[sy * w + sx]));
    }
    LabelMap::from_vec(width as u32, height as u32, out)
        .unwrap_or_else(|_| LabelMap::filled(width as u32, height as u32, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_preprocess() {
        assert_eq!("native".parse::<Preprocess>().unwrap(), Preprocess::Native);
        assert_eq!("pad".parse::<Preprocess>().unwrap(), Preprocess::Pad(None));
        assert_eq!(
            "pad:513".parse::<Preprocess>().unwrap(),
            Preprocess::Pad(Some((513, 513)))
        );
        assert_eq!(
            "pad:1025x2049".parse::<Preprocess>().unwrap(),
            Preprocess::Pad(Some((1025, 2049)))
        );
        assert_eq!(
            "resize:257".parse::<Preprocess>().unwrap(),
            Preprocess::Resize(257, 257)
        );
        assert_eq!(
            "keep-aspect-pad:513".parse::<Preprocess>().unwrap(),
            Preprocess::KeepAspectPad(513)
        );
        for bad in [
            "",
            "resize",
            "resize:0",
            "pad:x",
            "stretch:3",
            "keep-aspect-pad:-1",
        ] {
            let e = bad.parse::<Preprocess>().unwrap_err();
            assert!(e.contains("preprocessing"), "{e}");
        }
        for p in [
            "native",
            "pad",
            "pad:3x5",
            "resize:7x9",
            "keep-aspect-pad:513",
        ] {
            assert_eq!(p.parse::<Preprocess>().unwrap().to_string(), p);
        }
    }

    fn tiny_model() -> DeepLabModel {
        use deeplab_backbones::{BackboneConfig, MobileNetV2Config};
        let mut cfg = deeplab_heads::DeepLabConfig::v3plus(
            BackboneConfig::MobileNetV2(MobileNetV2Config::mobilenetv2_050()),
            3,
            true,
            InputNormalization::Official,
        );
        cfg.aspp.channels = 8;
        if let Some(d) = cfg.decoder.as_mut() {
            d.channels = 8;
            d.projection_channels = 4;
        }
        let vm = candle_nn::VarMap::new();
        let m = DeepLabModel::new(
            &cfg,
            candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        crate::init::init_seeded(&vm, 3).unwrap();
        m
    }

    fn noise_image(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 37 + y * 91 + seed * 13) ^ (x * y + seed);
            image::Rgb([(v % 251) as u8, (v / 3 % 241) as u8, (v / 7 % 239) as u8])
        })
    }

    #[test]
    fn flip_averaging_is_mirror_symmetric_and_sizes_map_back() {
        let model = tiny_model();
        let dev = Device::Cpu;
        let img = noise_image(52, 40, 1);
        let mirrored = image::imageops::flip_horizontal(&img);
        let opts = InferenceOptions {
            preprocess: Preprocess::Native,
            scales: vec![0.75, 1.0],
            flip: true,
            sliding_window: false,
        };
        let p = Predictor::new(&model, opts, &dev).unwrap();
        let a = p.predict(&img).unwrap();
        let b = p.predict(&mirrored).unwrap();
        assert!(!a.scores_are_logits);
        let (w, h) = (52usize, 40usize);
        for y in 0..h {
            for x in 0..w {
                assert_eq!(
                    a.label.as_slice()[y * w + x],
                    b.label.as_slice()[y * w + w - 1 - x],
                    "pixel ({x}, {y})"
                );
            }
        }
        // every preprocessing maps the prediction back to the image size
        for pre in [
            Preprocess::Pad(Some((65, 65))),
            Preprocess::Resize(33, 33),
            Preprocess::KeepAspectPad(49),
        ] {
            let p = Predictor::new(&model, InferenceOptions::single(pre), &dev).unwrap();
            let r = p.predict(&img).unwrap();
            assert_eq!(r.label.dimensions(), (52, 40), "{pre}");
            assert!(r.scores_are_logits);
            let (hi, wi) = r.input_size;
            assert_eq!(
                (hi, wi),
                match pre {
                    Preprocess::Pad(_) => (65, 65),
                    Preprocess::Resize(h, w) => (h, w),
                    _ => (49, 49),
                }
            );
        }
    }

    #[test]
    fn padding_scores_only_the_image_and_sliding_windows_cover_it() {
        let model = tiny_model();
        let dev = Device::Cpu;
        let img = noise_image(30, 30, 2);
        let pad = Predictor::new(
            &model,
            InferenceOptions::single(Preprocess::Pad(Some((41, 41)))),
            &dev,
        )
        .unwrap();
        let a = pad.predict(&img).unwrap();
        // the padded input's prediction, cropped, is the label map
        let full = argmax_labels(a.scores.as_ref().unwrap()).unwrap();
        for y in 0..30 {
            assert_eq!(
                &a.label.as_slice()[y * 30..y * 30 + 30],
                &full[y * 41..y * 41 + 30]
            );
        }
        // a window as large as the image: sliding equals plain padding
        let mut opts = InferenceOptions::single(Preprocess::Pad(Some((41, 41))));
        opts.sliding_window = true;
        let s = Predictor::new(&model, opts.clone(), &dev).unwrap();
        assert_eq!(s.predict(&img).unwrap().label, a.label);
        // a larger image is covered by windows
        let big = noise_image(70, 45, 3);
        let r = s.predict(&big).unwrap();
        assert_eq!(r.label.dimensions(), (70, 45));
        assert!(r.label.as_slice().iter().all(|&v| v < 3));
        assert!(r.scores.is_none());
    }

    #[test]
    fn nearest_resize_and_crop() {
        let l = LabelMap::from_vec(2, 2, vec![1, 2, 3, 4]).unwrap();
        let up = resize_label_nearest(&l, 4, 4);
        assert_eq!(
            up.as_slice(),
            &[1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]
        );
        let down = resize_label_nearest(&up, 2, 2);
        assert_eq!(down.as_slice(), l.as_slice());
        let c = crop_label(&up, 1, 3);
        assert_eq!(c.as_slice(), &[1, 1, 2]);
    }
}
