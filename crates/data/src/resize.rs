//! Preprocessing of the TFLite reference models: PIL-compatible bilinear resizing and a keep-aspect
//! resize padded at the bottom/right.
//!
//! [`resize_bilinear_pil`] reproduces Pillow's `Image.resize(size, Image.BILINEAR)` on 8-bit RGB
//! (`libImaging/Resample.c`): a separable triangle filter whose support is scaled by the downscale
//! factor (so shrinking averages over the footprint, i.e. is antialiased), source pixel centers at
//! `(x + 0.5) * in/out`, weights normalized per output pixel and converted to fixed point with 22
//! fractional bits (rounded half away from zero), then a horizontal and a vertical pass, each
//! accumulating from `2^21`, shifting right by 22 and clamping to 0..=255 (so the intermediate image
//! is rounded to 8 bits). A pass is skipped when its dimension does not change, as Pillow does, and
//! the pass order follows recent Pillow (see [`PassOrder::Auto`]).
//!
//! Measured against the reference inputs in `shared/reference/tflite/reference_outputs` (PIL resizes
//! of VOC JPEGs): fed the libjpeg-decoded pixels PIL saw (decoded once with libjpeg-turbo's `djpeg`,
//! outside the test suite), the output is bit-exact on all 12 257x257 and all 12 513x513 inputs. Fed
//! the `image` crate's JPEG decoding, which differs from libjpeg by up to +-9 on some pixels, the
//! integration test `pil_resize` measures 81.96% of channel values exact and 99.17% within +-1 at
//! 257x257, 88.21% / 98.17% on the padded 513x513 inputs.

use crate::error::{DataError, Result};
use crate::sample::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point filter taps of one output position.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's coefficient computation for resizing `in_size` to `out_size` over the whole input.
fn coefficients(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    let inv = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; negative values are clamped to 0 right after.
            let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let xmax = ((center + support + 0.5).trunc() as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut w: Vec<f64> = (0..n)
                .map(|x| bilinear((x as f64 + xmin as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                }
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = w
                .iter()
                .map(|&k| {
                    if k < 0.0 {
                        (-0.5 + k * one).trunc() as i32
                    } else {
                        (0.5 + k * one).trunc() as i32
                    }
                })
                .collect();
            Taps {
                start: xmin,
                weights,
            }
        })
        .collect()
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over a packed RGB buffer of `w` x `h`: resamples rows (`horizontal`) or
/// columns to `out` samples, rounding to 8 bits like Pillow.
fn pass(src: &[u8], w: usize, h: usize, out: usize, horizontal: bool) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let (in_len, lines) = if horizontal { (w, h) } else { (h, w) };
    let taps = coefficients(in_len, out);
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let mut dst = vec![0u8; ow * oh * 3];
    for line in 0..lines {
        for (o, t) in taps.iter().enumerate() {
            let mut acc = [half; 3];
            for (j, &k) in t.weights.iter().enumerate() {
                let i = t.start + j;
                let (x, y) = if horizontal { (i, line) } else { (line, i) };
                let p = &src[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for c in 0..3 {
                    acc[c] += p[c] as i32 * k;
                }
            }
            let (x, y) = if horizontal { (o, line) } else { (line, o) };
            for c in 0..3 {
                dst[(y * ow + x) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    dst
}

/// Resizes to exactly `width` x `height` with Pillow's BILINEAR semantics (see the module docs).
pub fn resize_bilinear_pil(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    resize_bilinear_pil_ordered(image, width, height, PassOrder::Auto)
}

/// Which separable pass runs first. The passes round to 8 bits in between, so the order changes
/// some pixels by one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOrder {
    /// Horizontal first, except when the height is scaled *down* by a larger factor than the width:
    /// then vertical first. Recent Pillow picks the order this way ("if height is scaled down
    /// significantly more than width, resize vertically first", python-pillow/Pillow#9549); Pillow's
    /// exact threshold for "significantly" is not reproduced here. This rule reproduces all 24 TFLite
    /// reference inputs in `shared/` bit-exactly when the JPEGs are decoded by libjpeg (portrait
    /// 500->257 shrinks run vertical first; the keep-aspect 513 upscales horizontal first).
    Auto,
    /// Always horizontal first.
    HorizontalFirst,
    /// Always vertical first.
    VerticalFirst,
}

/// [`resize_bilinear_pil`] with an explicit pass order.
pub fn resize_bilinear_pil_ordered(
    image: &RgbImage,
    width: u32,
    height: u32,
    order: PassOrder,
) -> Result<RgbImage> {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return Err(DataError::Config(format!(
            "cannot resize a {in_w}x{in_h} image to {width}x{height}"
        )));
    }
    let (out_w, out_h) = (width as usize, height as usize);
    let vertical_first = match order {
        PassOrder::HorizontalFirst => false,
        PassOrder::VerticalFirst => true,
        PassOrder::Auto => {
            out_h < in_h && (in_h as f64 / out_h as f64) > (in_w as f64 / out_w as f64)
        }
    };
    let mut buf = image.as_raw().clone();
    let (mut w, mut h) = (in_w, in_h);
    let steps: [bool; 2] = if vertical_first {
        [false, true]
    } else {
        [true, false]
    };
    for horizontal in steps {
        if horizontal && out_w != w {
            buf = pass(&buf, w, h, out_w, true);
            w = out_w;
        } else if !horizontal && out_h != h {
            buf = pass(&buf, w, h, out_h, false);
            h = out_h;
        }
    }
    RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| DataError::Config("internal: resized buffer has the wrong size".into()))
}

/// The result of [`resize_long_side_padded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedResize {
    /// The `long_side` x `long_side` image: the resized image at the top-left, padding elsewhere.
    pub image: RgbImage,
    /// Width of the resized (valid) region.
    pub valid_width: u32,
    /// Height of the resized (valid) region.
    pub valid_height: u32,
}

/// Resizes keeping the aspect ratio so the long side becomes `long_side` (PIL bilinear; the short
/// side is `round(dim * long_side / max(w, h))` with Python's round-half-to-even, which is what the
/// quantized model's reference inputs show: 500x366 -> 513x376), places it at the top-left of a
/// `long_side` x `long_side` canvas filled with `pad` (128 for the quantized TFLite model), and
/// returns the valid region's size.
pub fn resize_long_side_padded(image: &RgbImage, long_side: u32, pad: u8) -> Result<PaddedResize> {
    let (w, h) = image.dimensions();
    if long_side == 0 || w == 0 || h == 0 {
        return Err(DataError::Config(format!(
            "cannot resize a {w}x{h} image to a long side of {long_side}"
        )));
    }
    let ratio = long_side as f64 / w.max(h) as f64;
    let vw = (round_half_even(ratio * w as f64) as u32).clamp(1, long_side);
    let vh = (round_half_even(ratio * h as f64) as u32).clamp(1, long_side);
    let resized = resize_bilinear_pil(image, vw, vh)?;
    let mut canvas = RgbImage::from_pixel(long_side, long_side, image::Rgb([pad; 3]));
    for y in 0..vh {
        for x in 0..vw {
            canvas.put_pixel(x, y, *resized.get_pixel(x, y));
        }
    }
    Ok(PaddedResize {
        image: canvas,
        valid_width: vw,
        valid_height: vh,
    })
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray_row(values: &[u8]) -> RgbImage {
        RgbImage::from_fn(values.len() as u32, 1, |x, _| {
            image::Rgb([values[x as usize]; 3])
        })
    }

    #[test]
    fn downscale_by_two_averages_pairs() {
        // scale 2: support 2, center = 2*xx + 1, taps at distances 1.5, 0.5, 0.5, 1.5 (x 1/2):
        // weights 0.25, 0.75, 0.75, 0.25 -> normalized 1/8, 3/8, 3/8, 1/8 (clipped at the borders).
        let img = gray_row(&[0, 40, 80, 120, 160, 200]);
        let out = resize_bilinear_pil(&img, 3, 1).unwrap();
        // out0: taps x=0..2 (xmin=0, xmax=int(3.5)=3): weights .75 .75 .25 -> 3/7,3/7,1/7:
        //   (0*3 + 40*3 + 80) / 7 = 200/7 = 28.57 -> 29
        // out1: taps 1..4 weights 1/8,3/8,3/8,1/8: (40 + 240 + 360 + 160)/8 = 100
        // out2: taps 3..5 weights 1/7,3/7,3/7: (120 + 480 + 600)/7 = 171.43 -> 171
        let v: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(v, vec![29, 100, 171]);
    }

    #[test]
    fn upscale_by_two_interpolates() {
        // scale 0.5: support 1, center = (xx + 0.5) / 2; out1 center 0.75: taps x=0 (dist 0.25) and
        // x=1 (dist 0.75): 0.75*0 + 0.25*100 = 25; out0 center 0.25: only x=0 in range -> 0.
        let img = gray_row(&[0, 100]);
        let out = resize_bilinear_pil(&img, 4, 1).unwrap();
        let v: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(v, vec![0, 25, 75, 100]);
    }

    #[test]
    fn rounding_is_half_up_in_fixed_point() {
        // 3 -> 2: scale 1.5, out0 center 0.75, support 1.5: xmin 0, xmax int(2.75)=2
        // weights for x=0: 1 - |(0 - 0.75 + 0.5)/1.5| = 1 - 1/6 = 5/6; x=1: 1 - |0.75/1.5| = 0.5
        // normalized 5/8, 3/8: 10*5/8 + 11*3/8 = 10.375 -> 10
        let img = gray_row(&[10, 11, 20]);
        let out = resize_bilinear_pil(&img, 2, 1).unwrap();
        assert_eq!(out.get_pixel(0, 0).0[0], 10);
        // out1 center 2.25: xmin int(1.25)=1, xmax min(int(4.25),3)=3; x=1: 1-|(1-2.25+.5)/1.5|=0.5,
        // x=2: 1-|0.25/1.5| = 5/6 -> 3/8*11 + 5/8*20 = 16.625 -> 17
        assert_eq!(out.get_pixel(1, 0).0[0], 17);
    }

    #[test]
    fn same_size_is_identity_and_padding_reports_valid_region() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        assert_eq!(resize_bilinear_pil(&img, 7, 5).unwrap(), img);
        let p = resize_long_side_padded(&img, 14, 128).unwrap();
        assert_eq!((p.valid_width, p.valid_height), (14, 10));
        assert_eq!(p.image.get_pixel(3, 12).0, [128; 3]);
        assert_eq!(p.image.dimensions(), (14, 14));
        assert!(resize_bilinear_pil(&img, 0, 3).is_err());
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(375.516), 376.0);
    }
}
