//! Rendering for predict and eval outputs: color masks, image/mask overlays and a confusion-matrix
//! heat map.

use crate::classes::Palette;
use crate::error::{DataError, Result};
use crate::metrics::ConfusionMatrix;
use crate::sample::{LabelMap, RgbImage, IGNORE_LABEL};

/// Paints every label with its palette color.
pub fn colorize(label: &LabelMap, palette: &Palette) -> RgbImage {
    let mut raw = Vec::with_capacity(label.as_slice().len() * 3);
    for &v in label.as_slice() {
        raw.extend_from_slice(&palette.color(v));
    }
    RgbImage::from_raw(label.width(), label.height(), raw)
        .unwrap_or_else(|| RgbImage::new(label.width(), label.height()))
}

/// Blends the label colors over the image: `(1 - alpha) * image + alpha * color`; ignore (255) pixels
/// and, when `skip_background` is set, label 0 keep the image's own color.
pub fn overlay(
    image: &RgbImage,
    label: &LabelMap,
    palette: &Palette,
    alpha: f32,
    skip_background: bool,
) -> Result<RgbImage> {
    if image.dimensions() != label.dimensions() {
        return Err(DataError::Config(format!(
            "overlay: image is {}x{} but label is {}x{}",
            image.width(),
            image.height(),
            label.width(),
            label.height()
        )));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err(DataError::Config(format!(
            "overlay alpha {alpha} is outside 0..=1"
        )));
    }
    let mut out = image.clone();
    for (px, &v) in out.pixels_mut().zip(label.as_slice()) {
        if v == IGNORE_LABEL || (skip_background && v == 0) {
            continue;
        }
        let c = palette.color(v);
        for (ch, col) in px.0.iter_mut().zip(c) {
            *ch = ((1.0 - alpha) * *ch as f32 + alpha * col as f32).round() as u8;
        }
    }
    Ok(out)
}

/// A heat map of the row-normalized confusion matrix (row = ground truth, column = prediction):
/// white (0) to dark blue (1), `cell` pixels per entry, a strip of class colors left of the rows and
/// above the columns, rows without ground truth hatched gray.
pub fn confusion_matrix_image(
    cm: &ConfusionMatrix,
    palette: &Palette,
    cell: u32,
) -> Result<RgbImage> {
    if cell == 0 {
        return Err(DataError::Config(
            "confusion matrix cell size must be positive".into(),
        ));
    }
    let k = cm.num_classes() as u32;
    let strip = cell.max(4) / 2;
    let margin = strip + 2;
    let size = margin + k * cell + 1;
    let mut img = RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255]));
    for r in 0..k {
        let row_sum: u64 = (0..k).map(|c| cm.count(r as usize, c as usize)).sum();
        for c in 0..k {
            let color = if row_sum == 0 {
                None
            } else {
                let f = cm.count(r as usize, c as usize) as f64 / row_sum as f64;
                Some(heat(f))
            };
            for dy in 0..cell {
                for dx in 0..cell {
                    let px = match color {
                        Some(col) => col,
                        None if (dx + dy) % 4 == 0 => [200, 200, 200],
                        None => [240, 240, 240],
                    };
                    img.put_pixel(
                        margin + c * cell + dx,
                        margin + r * cell + dy,
                        image::Rgb(px),
                    );
                }
            }
        }
    }
    // grid lines
    for i in 0..=k {
        let p = margin + i * cell;
        for t in margin..size {
            img.put_pixel(p.min(size - 1), t, image::Rgb([160, 160, 160]));
            img.put_pixel(t, p.min(size - 1), image::Rgb([160, 160, 160]));
        }
    }
    // class color strips
    for i in 0..k {
        let color = image::Rgb(palette.color(i as u8));
        for d in 1..cell.saturating_sub(1).max(1) {
            for s in 0..strip {
                img.put_pixel(s, margin + i * cell + d, color);
                img.put_pixel(margin + i * cell + d, s, color);
            }
        }
    }
    Ok(img)
}

fn heat(f: f64) -> [u8; 3] {
    let f = f.clamp(0.0, 1.0);
    // white -> (8, 48, 107) dark blue
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    [lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colorize_and_overlay() {
        let label = LabelMap::from_vec(3, 1, vec![0, 1, 255]).unwrap();
        let p = Palette::voc();
        let c = colorize(&label, &p);
        assert_eq!(c.get_pixel(1, 0).0, [128, 0, 0]);
        assert_eq!(c.get_pixel(2, 0).0, [224, 224, 192]);
        let img = RgbImage::from_pixel(3, 1, image::Rgb([0, 100, 200]));
        let o = overlay(&img, &label, &p, 0.5, true).unwrap();
        assert_eq!(o.get_pixel(0, 0).0, [0, 100, 200]);
        assert_eq!(o.get_pixel(1, 0).0, [64, 50, 100]);
        assert_eq!(o.get_pixel(2, 0).0, [0, 100, 200]);
        assert!(overlay(&img, &LabelMap::filled(2, 1, 0), &p, 0.5, false).is_err());
    }

    #[test]
    fn confusion_image_cells() {
        let mut cm = ConfusionMatrix::new(3).unwrap();
        cm.update(&[0u8, 0, 1], &[0u8, 0, 1]).unwrap();
        let img = confusion_matrix_image(&cm, &Palette::voc(), 10).unwrap();
        let margin = 5 + 2;
        // diagonal full = dark, off-diagonal empty = white, row 2 (no gt) hatched
        assert_eq!(img.get_pixel(margin + 5, margin + 5).0, [8, 48, 107]);
        assert_eq!(img.get_pixel(margin + 15, margin + 5).0, [255, 255, 255]);
        let p = img.get_pixel(margin + 25, margin + 25).0;
        assert!(p == [200, 200, 200] || p == [240, 240, 240]);
        // legend strip of class 1 has its VOC color
        assert_eq!(img.get_pixel(1, margin + 15).0, [128, 0, 0]);
    }
}
