//! Training and evaluation transforms (the official DeepLab input pipeline) and input normalization.
//!
//! Training follows `research/deeplab/input_preprocess.py` of tensorflow/models:
//! 1. random scale `s` from `{0.5, 0.75, ..., 2.0}` (evenly spaced between min and max, like
//!    `tf.lin_space`), new size `int(dim * s)`; the image is resized bilinearly and the label by
//!    nearest neighbour, both with `align_corners=True`;
//! 2. pad at the bottom/right to at least the crop size, the image with the mean pixel (the pixel value
//!    that normalizes to 0) and the label with 255;
//! 3. random crop of the crop size (513x513 by default), offsets uniform over every valid position;
//! 4. horizontal flip with probability 0.5.
//!
//! The four steps are composed into one pass that computes only the pixels of the crop, so the cost
//! does not grow with the scale factor. Every random choice comes from the caller's RNG, so a seed
//! fixes the result.
//!
//! Evaluation either leaves the image as is or pads it at the bottom/right to the eval crop size
//! (513x513 for VOC, 1025x2049 for Cityscapes), as the official evaluation does; the padded label is
//! 255, so padding never counts in the metrics.

use rand::Rng;

use crate::error::{DataError, Result};
use crate::sample::{LabelMap, RgbImage, IGNORE_LABEL};

/// Per-channel input normalization applied to raw pixel values in `0..=255`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    /// The official DeepLab checkpoints: `x * 2/255 - 1`, i.e. `(x - 127.5) / 127.5`, range [-1, 1].
    Official,
    /// ImageNet mean/std (timm and torchvision ResNet weights): `(x/255 - mean) / std` with
    /// mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    ImageNet,
    /// `(x/255 - mean) / std` with custom mean and std (in 0..1 units).
    MeanStd {
        /// Mean per channel, 0..1 units.
        mean: [f32; 3],
        /// Standard deviation per channel, 0..1 units (must be > 0).
        std: [f32; 3],
    },
}

/// ImageNet channel means (0..1 units).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (0..1 units).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Normalization {
    /// `(a, b)` per channel with `normalized = x * a + b` for a raw pixel value `x`.
    pub fn scale_shift(&self) -> ([f32; 3], [f32; 3]) {
        match *self {
            Normalization::Official => ([2.0 / 255.0; 3], [-1.0; 3]),
            Normalization::ImageNet => Self::mean_std(IMAGENET_MEAN, IMAGENET_STD),
            Normalization::MeanStd { mean, std } => Self::mean_std(mean, std),
        }
    }

    fn mean_std(mean: [f32; 3], std: [f32; 3]) -> ([f32; 3], [f32; 3]) {
        let mut a = [0.0; 3];
        let mut b = [0.0; 3];
        for c in 0..3 {
            a[c] = 1.0 / (255.0 * std[c]);
            b[c] = -mean[c] / std[c];
        }
        (a, b)
    }

    /// Checks that every std is positive and finite.
    pub fn validate(&self) -> Result<()> {
        if let Normalization::MeanStd { mean, std } = self {
            if std.iter().any(|s| !(s.is_finite() && *s > 0.0))
                || mean.iter().any(|m| !m.is_finite())
            {
                return Err(DataError::Config(format!(
                    "normalization mean {mean:?} / std {std:?}: std must be positive and both finite"
                )));
            }
        }
        Ok(())
    }

    /// The raw pixel value (per channel) that normalizes to 0: 127.5 for [`Normalization::Official`],
    /// 255 * mean otherwise. Used to pad images so padding is 0 after normalization.
    pub fn mean_pixel(&self) -> [f32; 3] {
        match *self {
            Normalization::Official => [127.5; 3],
            Normalization::ImageNet => IMAGENET_MEAN.map(|m| m * 255.0),
            Normalization::MeanStd { mean, .. } => mean.map(|m| m * 255.0),
        }
    }

    /// Normalizes one raw value of channel `c`.
    pub fn apply(&self, c: usize, x: f32) -> f32 {
        let (a, b) = self.scale_shift();
        x * a[c] + b[c]
    }
}

/// A 3-channel float image in planar CHW order, in raw pixel units (0..255, not normalized).
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImage {
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `3 * height * width` values, channel-major.
    pub data: Vec<f32>,
}

impl FloatImage {
    /// A `height` x `width` image filled with `value` per channel.
    pub fn filled(height: usize, width: usize, value: [f32; 3]) -> Self {
        let plane = height * width;
        let mut data = Vec::with_capacity(3 * plane);
        for v in value {
            data.extend(std::iter::repeat_n(v, plane));
        }
        FloatImage {
            height,
            width,
            data,
        }
    }

    /// Converts an 8-bit RGB image.
    pub fn from_rgb(image: &RgbImage) -> Self {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let plane = w * h;
        let mut data = vec![0.0f32; 3 * plane];
        for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * plane + i] = px[c] as f32;
            }
        }
        FloatImage {
            height: h,
            width: w,
            data,
        }
    }

    /// Rounds and clamps back to 8-bit RGB (for looking at augmented samples).
    pub fn to_rgb(&self) -> RgbImage {
        let plane = self.height * self.width;
        let mut raw = vec![0u8; 3 * plane];
        for i in 0..plane {
            for c in 0..3 {
                raw[3 * i + c] = self.data[c * plane + i].round().clamp(0.0, 255.0) as u8;
            }
        }
        RgbImage::from_raw(self.width as u32, self.height as u32, raw)
            .unwrap_or_else(|| RgbImage::new(self.width as u32, self.height as u32))
    }

    /// The value of channel `c` at row `y`, column `x`.
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }

    /// Writes the normalized image into `out` (length `3 * height * width`, CHW).
    pub fn normalize_into(&self, norm: &Normalization, out: &mut [f32]) -> Result<()> {
        if out.len() != self.data.len() {
            return Err(DataError::LengthMismatch {
                what: "normalized image buffer",
                expected: self.data.len(),
                actual: out.len(),
            });
        }
        let (a, b) = norm.scale_shift();
        let plane = self.height * self.width;
        for c in 0..3 {
            let src = &self.data[c * plane..(c + 1) * plane];
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s * a[c] + b[c];
            }
        }
        Ok(())
    }
}

/// The random scale factors to draw from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleRange {
    /// Smallest factor (> 0).
    pub min: f32,
    /// Largest factor (>= min).
    pub max: f32,
    /// Step between factors; 0 draws uniformly from `[min, max)`.
    pub step: f32,
}

impl ScaleRange {
    /// The official setting: 0.5 to 2.0 in steps of 0.25.
    pub const OFFICIAL: ScaleRange = ScaleRange {
        min: 0.5,
        max: 2.0,
        step: 0.25,
    };

    /// No scaling.
    pub const NONE: ScaleRange = ScaleRange {
        min: 1.0,
        max: 1.0,
        step: 0.0,
    };

    fn validate(&self) -> Result<()> {
        let ok = self.min.is_finite()
            && self.max.is_finite()
            && self.step.is_finite()
            && self.min > 0.0
            && self.max >= self.min
            && self.step >= 0.0;
        if !ok {
            return Err(DataError::Config(format!(
                "scale range min {} max {} step {}: need 0 < min <= max and step >= 0",
                self.min, self.max, self.step
            )));
        }
        Ok(())
    }

    /// The discrete factors (`int((max - min) / step + 1)` values evenly spaced from min to max, like
    /// the official `tf.lin_space`), or an empty list for a continuous range.
    pub fn factors(&self) -> Vec<f32> {
        if self.min == self.max {
            return vec![self.min];
        }
        if self.step == 0.0 {
            return Vec::new();
        }
        let n = ((self.max - self.min) / self.step + 1.0) as usize;
        if n <= 1 {
            return vec![self.min];
        }
        (0..n)
            .map(|i| self.min + (self.max - self.min) * i as f32 / (n - 1) as f32)
            .collect()
    }

    /// Draws one factor.
    pub fn sample(&self, rng: &mut impl Rng) -> f32 {
        let f = self.factors();
        if f.is_empty() {
            rng.gen_range(self.min..self.max)
        } else {
            f[rng.gen_range(0..f.len())]
        }
    }
}

/// The random choices of one training transform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugParams {
    /// Scale factor.
    pub scale: f32,
    /// Height after scaling.
    pub scaled_height: usize,
    /// Width after scaling.
    pub scaled_width: usize,
    /// Crop row offset in the padded, scaled image.
    pub offset_y: usize,
    /// Crop column offset in the padded, scaled image.
    pub offset_x: usize,
    /// Whether the crop is mirrored left-right.
    pub flip: bool,
}

/// The official DeepLab training augmentation: random scale, pad, random crop, random flip.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTransform {
    crop_height: usize,
    crop_width: usize,
    scale: ScaleRange,
    flip: bool,
    pad_value: [f32; 3],
}

impl TrainTransform {
    /// The official setting at crop size `crop_height` x `crop_width`: scales 0.5..2.0 step 0.25,
    /// flips, pads the image with 127.5 (the [`Normalization::Official`] mean pixel).
    pub fn new(crop_height: usize, crop_width: usize) -> Result<Self> {
        if crop_height == 0 || crop_width == 0 {
            return Err(DataError::Config(format!(
                "crop size {crop_height}x{crop_width} must be positive"
            )));
        }
        Ok(TrainTransform {
            crop_height,
            crop_width,
            scale: ScaleRange::OFFICIAL,
            flip: true,
            pad_value: Normalization::Official.mean_pixel(),
        })
    }

    /// The official 513x513 setting, padding with the mean pixel of `norm`.
    pub fn official(norm: Normalization) -> Self {
        TrainTransform {
            crop_height: 513,
            crop_width: 513,
            scale: ScaleRange::OFFICIAL,
            flip: true,
            pad_value: norm.mean_pixel(),
        }
    }

    /// Replaces the scale range.
    pub fn with_scale(mut self, scale: ScaleRange) -> Result<Self> {
        scale.validate()?;
        self.scale = scale;
        Ok(self)
    }

    /// Turns random flipping on or off.
    pub fn with_flip(mut self, flip: bool) -> Self {
        self.flip = flip;
        self
    }

    /// Sets the raw pixel value the image is padded with (use `Normalization::mean_pixel`).
    pub fn with_pad_value(mut self, pad_value: [f32; 3]) -> Self {
        self.pad_value = pad_value;
        self
    }

    /// `(height, width)` of the output.
    pub fn crop_size(&self) -> (usize, usize) {
        (self.crop_height, self.crop_width)
    }

    /// The scale range.
    pub fn scale(&self) -> ScaleRange {
        self.scale
    }

    /// The image padding value.
    pub fn pad_value(&self) -> [f32; 3] {
        self.pad_value
    }

    /// Draws the random choices for an image of `height` x `width`, in a fixed order
    /// (scale, row offset, column offset, flip).
    pub fn sample_params(&self, height: usize, width: usize, rng: &mut impl Rng) -> AugParams {
        let scale = self.scale.sample(rng);
        // float32 product then truncation, as the official tf.cast(tf.cast(dim, float) * scale, int32)
        let scaled_height = ((height as f32 * scale) as usize).max(1);
        let scaled_width = ((width as f32 * scale) as usize).max(1);
        let padded_h = scaled_height.max(self.crop_height);
        let padded_w = scaled_width.max(self.crop_width);
        let offset_y = rng.gen_range(0..=padded_h - self.crop_height);
        let offset_x = rng.gen_range(0..=padded_w - self.crop_width);
        let flip = self.flip && rng.gen_bool(0.5);
        AugParams {
            scale,
            scaled_height,
            scaled_width,
            offset_y,
            offset_x,
            flip,
        }
    }

    /// Draws parameters and applies them.
    pub fn apply(
        &self,
        image: &RgbImage,
        label: &LabelMap,
        rng: &mut impl Rng,
    ) -> Result<(FloatImage, LabelMap)> {
        let params = self.sample_params(image.height() as usize, image.width() as usize, rng);
        self.apply_params(image, label, &params)
    }

    /// Applies given parameters: the crop of the scaled, padded, optionally flipped sample.
    pub fn apply_params(
        &self,
        image: &RgbImage,
        label: &LabelMap,
        p: &AugParams,
    ) -> Result<(FloatImage, LabelMap)> {
        if image.dimensions() != label.dimensions() {
            return Err(DataError::Config(format!(
                "image is {}x{} but label is {}x{}",
                image.width(),
                image.height(),
                label.width(),
                label.height()
            )));
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (ch, cw) = (self.crop_height, self.crop_width);
        let (sh, sw) = (p.scaled_height, p.scaled_width);
        if p.offset_y + ch > sh.max(ch) || p.offset_x + cw > sw.max(cw) || sh == 0 || sw == 0 {
            return Err(DataError::Config(format!(
                "augmentation parameters {p:?} do not fit crop {ch}x{cw}"
            )));
        }
        let ys = axis_map(h, sh, p.offset_y, ch, false);
        let xs = axis_map(w, sw, p.offset_x, cw, p.flip);
        let plane = ch * cw;
        let mut data = vec![0.0f32; 3 * plane];
        let mut lab = vec![IGNORE_LABEL; plane];
        let src = image.as_raw();
        let lsrc = label.as_slice();
        for (oy, ym) in ys.iter().enumerate() {
            let Some(ym) = ym else {
                for c in 0..3 {
                    data[c * plane + oy * cw..c * plane + (oy + 1) * cw].fill(self.pad_value[c]);
                }
                continue;
            };
            let row0 = ym.i0 * w;
            let row1 = ym.i1 * w;
            let lrow = ym.nearest * w;
            for (ox, xm) in xs.iter().enumerate() {
                let o = oy * cw + ox;
                let Some(xm) = xm else {
                    for c in 0..3 {
                        data[c * plane + o] = self.pad_value[c];
                    }
                    continue;
                };
                for c in 0..3 {
                    let tl = src[(row0 + xm.i0) * 3 + c] as f32;
                    let tr = src[(row0 + xm.i1) * 3 + c] as f32;
                    let bl = src[(row1 + xm.i0) * 3 + c] as f32;
                    let br = src[(row1 + xm.i1) * 3 + c] as f32;
                    let top = tl + (tr - tl) * xm.frac;
                    let bottom = bl + (br - bl) * xm.frac;
                    data[c * plane + o] = top + (bottom - top) * ym.frac;
                }
                lab[o] = lsrc[lrow + xm.nearest];
            }
        }
        Ok((
            FloatImage {
                height: ch,
                width: cw,
                data,
            },
            LabelMap::from_vec(cw as u32, ch as u32, lab)?,
        ))
    }
}

/// Source coordinates along one axis for one output position.
#[derive(Debug, Clone, Copy)]
struct AxisSample {
    i0: usize,
    i1: usize,
    frac: f32,
    nearest: usize,
}

/// For each of `out_len` crop positions: the source sample in an input of length `in_len` resized
/// to `scaled_len` with align_corners=True, or `None` in the padding.
fn axis_map(
    in_len: usize,
    scaled_len: usize,
    offset: usize,
    out_len: usize,
    flip: bool,
) -> Vec<Option<AxisSample>> {
    // TF computes the align_corners scale in float32: (in - 1) / (out - 1).
    let ratio = if scaled_len > 1 {
        (in_len as f32 - 1.0) / (scaled_len as f32 - 1.0)
    } else {
        0.0
    };
    (0..out_len)
        .map(|o| {
            let o = if flip { out_len - 1 - o } else { o };
            let p = offset + o;
            if p >= scaled_len {
                return None;
            }
            let src = p as f32 * ratio;
            let i0 = (src.floor() as usize).min(in_len - 1);
            let i1 = (i0 + 1).min(in_len - 1);
            let nearest = (src.round() as usize).min(in_len - 1);
            Some(AxisSample {
                i0,
                i1,
                frac: src - i0 as f32,
                nearest,
            })
        })
        .collect()
}

/// The evaluation transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalTransform {
    /// Leave the image at its size.
    Identity,
    /// Pad at the bottom/right to at least `height` x `width` (never crops; a larger image is left as
    /// is), image with the pad value, label with 255.
    PadTo {
        /// Target height.
        height: usize,
        /// Target width.
        width: usize,
    },
}

impl EvalTransform {
    /// The official VOC eval crop: pad to 513x513.
    pub const VOC: EvalTransform = EvalTransform::PadTo {
        height: 513,
        width: 513,
    };
    /// The official Cityscapes eval crop: pad to 1025x2049.
    pub const CITYSCAPES: EvalTransform = EvalTransform::PadTo {
        height: 1025,
        width: 2049,
    };

    /// Applies the transform; returns the image, the label and the original `(height, width)`, which
    /// is the valid (unpadded) top-left region.
    pub fn apply(
        &self,
        image: &RgbImage,
        label: &LabelMap,
        pad_value: [f32; 3],
    ) -> Result<(FloatImage, LabelMap, (usize, usize))> {
        if image.dimensions() != label.dimensions() {
            return Err(DataError::Config(format!(
                "image is {}x{} but label is {}x{}",
                image.width(),
                image.height(),
                label.width(),
                label.height()
            )));
        }
        let (h, w) = (image.height() as usize, image.width() as usize);
        let (th, tw) = match *self {
            EvalTransform::Identity => (h, w),
            EvalTransform::PadTo { height, width } => (height.max(h), width.max(w)),
        };
        let img = FloatImage::from_rgb(image);
        Ok((
            pad_float(&img, th, tw, pad_value),
            pad_label(label, th, tw),
            (h, w),
        ))
    }
}

/// Pads a float image at the bottom/right to `height` x `width` (which must be at least its size).
pub fn pad_float(img: &FloatImage, height: usize, width: usize, value: [f32; 3]) -> FloatImage {
    if img.height == height && img.width == width {
        return img.clone();
    }
    let mut out = FloatImage::filled(height, width, value);
    let (ph, pw) = (img.height.min(height), img.width.min(width));
    for c in 0..3 {
        for y in 0..ph {
            let s = (c * img.height + y) * img.width;
            let d = (c * height + y) * width;
            out.data[d..d + pw].copy_from_slice(&img.data[s..s + pw]);
        }
    }
    out
}

/// Pads a label map at the bottom/right with 255 to `height` x `width`.
pub fn pad_label(label: &LabelMap, height: usize, width: usize) -> LabelMap {
    let (w, h) = (label.width() as usize, label.height() as usize);
    if (h, w) == (height, width) {
        return label.clone();
    }
    let mut out = LabelMap::filled(width as u32, height as u32, IGNORE_LABEL);
    let (ph, pw) = (h.min(height), w.min(width));
    let src = label.as_slice();
    let dst = out.as_mut_slice();
    for y in 0..ph {
        dst[y * width..y * width + pw].copy_from_slice(&src[y * w..y * w + pw]);
    }
    out
}

/// The transform a loader applies.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Random training augmentation.
    Train(TrainTransform),
    /// Deterministic evaluation transform.
    Eval(EvalTransform),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ramp(w: u32, h: u32) -> (RgbImage, LabelMap) {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x + y) as u8]));
        let lab = LabelMap::from_vec(w, h, (0..w * h).map(|i| (i % 7) as u8).collect()).unwrap();
        (img, lab)
    }

    #[test]
    fn official_scale_factors() {
        assert_eq!(
            ScaleRange::OFFICIAL.factors(),
            vec![0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
        );
        assert_eq!(ScaleRange::NONE.factors(), vec![1.0]);
    }

    #[test]
    fn normalization_values() {
        let n = Normalization::Official;
        assert!((n.apply(0, 0.0) + 1.0).abs() < 1e-7);
        assert!((n.apply(1, 255.0) - 1.0).abs() < 1e-6);
        assert!(n.apply(2, 127.5).abs() < 1e-6);
        for x in [0.0f32, 17.0, 100.0, 200.0, 255.0] {
            assert!((n.apply(0, x) - (x - 127.5) / 127.5).abs() < 1e-6);
        }
        let m = Normalization::ImageNet;
        for c in 0..3 {
            assert!(m.apply(c, m.mean_pixel()[c]).abs() < 1e-5);
            let expect = (200.0 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!((m.apply(c, 200.0) - expect).abs() < 1e-5);
        }
        assert!(Normalization::MeanStd {
            mean: [0.0; 3],
            std: [0.0, 1.0, 1.0]
        }
        .validate()
        .is_err());
    }

    #[test]
    fn identity_params_reproduce_the_input() {
        let (img, lab) = ramp(20, 10);
        let t = TrainTransform::new(10, 20).unwrap();
        let p = AugParams {
            scale: 1.0,
            scaled_height: 10,
            scaled_width: 20,
            offset_y: 0,
            offset_x: 0,
            flip: false,
        };
        let (f, l) = t.apply_params(&img, &lab, &p).unwrap();
        assert_eq!(f.to_rgb(), img);
        assert_eq!(l, lab);
    }

    #[test]
    fn flip_mirrors_and_pad_fills() {
        let (img, lab) = ramp(6, 4);
        let t = TrainTransform::new(5, 8)
            .unwrap()
            .with_pad_value([1.0, 2.0, 3.0]);
        let p = AugParams {
            scale: 1.0,
            scaled_height: 4,
            scaled_width: 6,
            offset_y: 0,
            offset_x: 0,
            flip: true,
        };
        let (f, l) = t.apply_params(&img, &lab, &p).unwrap();
        // padded is 5x8 (image at top-left), then mirrored: columns 0,1 are padding
        for y in 0..5 {
            for x in 0..8 {
                let src_x = 7 - x;
                if y < 4 && src_x < 6 {
                    assert_eq!(f.get(0, y, x), src_x as f32);
                    assert_eq!(l.get(x as u32, y as u32), lab.get(src_x as u32, y as u32));
                } else {
                    assert_eq!(
                        [f.get(0, y, x), f.get(1, y, x), f.get(2, y, x)],
                        [1.0, 2.0, 3.0]
                    );
                    assert_eq!(l.get(x as u32, y as u32), Some(IGNORE_LABEL));
                }
            }
        }
    }

    #[test]
    fn align_corners_scaling_keeps_corners() {
        let (img, lab) = ramp(11, 6);
        let t = TrainTransform::new(12, 22).unwrap();
        let p = AugParams {
            scale: 2.0,
            scaled_height: 12,
            scaled_width: 22,
            offset_y: 0,
            offset_x: 0,
            flip: false,
        };
        let (f, l) = t.apply_params(&img, &lab, &p).unwrap();
        assert_eq!(f.get(0, 0, 21), 10.0);
        assert_eq!(f.get(1, 11, 0), 5.0);
        assert_eq!(l.get(21, 11), lab.get(10, 5));
        // the red channel is x, so it is linear in the output column: x * 10/21
        assert!((f.get(0, 3, 7) - 7.0 * 10.0 / 21.0).abs() < 1e-4);
    }

    #[test]
    fn random_transform_invariants_and_determinism() {
        let (img, lab) = ramp(37, 23);
        let t = TrainTransform::new(33, 31).unwrap();
        for seed in 0..50u64 {
            let mut r1 = ChaCha8Rng::seed_from_u64(seed);
            let mut r2 = ChaCha8Rng::seed_from_u64(seed);
            let (a, la) = t.apply(&img, &lab, &mut r1).unwrap();
            let (b, lb) = t.apply(&img, &lab, &mut r2).unwrap();
            assert_eq!(a, b);
            assert_eq!(la, lb);
            assert_eq!((a.height, a.width), (33, 31));
            // labels only take source values or 255
            let src = lab.unique_values();
            assert!(la.as_slice().iter().all(|v| *v == 255 || src.contains(v)));
            // pixel values stay in the source range or equal the pad value
            assert!(a.data.iter().all(|v| (0.0..=255.0).contains(v)));
        }
    }

    #[test]
    fn eval_pad_and_identity() {
        let (img, lab) = ramp(5, 3);
        let (f, l, valid) = EvalTransform::PadTo {
            height: 4,
            width: 7,
        }
        .apply(&img, &lab, [127.5; 3])
        .unwrap();
        assert_eq!(valid, (3, 5));
        assert_eq!((f.height, f.width), (4, 7));
        assert_eq!(f.get(0, 3, 6), 127.5);
        assert_eq!(f.get(0, 2, 4), 4.0);
        assert_eq!(l.get(6, 0), Some(255));
        assert_eq!(l.get(4, 2), lab.get(4, 2));
        let (f, _, _) = EvalTransform::PadTo {
            height: 2,
            width: 2,
        }
        .apply(&img, &lab, [0.0; 3])
        .unwrap();
        assert_eq!((f.height, f.width), (3, 5));
        let (f, l, _) = EvalTransform::Identity.apply(&img, &lab, [0.0; 3]).unwrap();
        assert_eq!(f.to_rgb(), img);
        assert_eq!(l, lab);
    }
}
