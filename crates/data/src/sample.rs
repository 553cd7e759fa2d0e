//! In-memory label maps and samples (an RGB image with its per-pixel class labels).

use crate::error::{DataError, Result};

pub use image::RgbImage;

/// The ignore ("void") label: pixels with this value count in no loss and no metric.
pub const IGNORE_LABEL: u8 = 255;

/// A single-channel map of class ids, row-major, `IGNORE_LABEL` for ignored pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl LabelMap {
    /// A `width` x `height` map filled with `value`.
    pub fn filled(width: u32, height: u32, value: u8) -> Self {
        LabelMap {
            width,
            height,
            data: vec![value; width as usize * height as usize],
        }
    }

    /// Wraps row-major data; fails when `data.len() != width * height`.
    pub fn from_vec(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        let expected = width as usize * height as usize;
        if data.len() != expected {
            return Err(DataError::LengthMismatch {
                what: "label map data",
                expected,
                actual: data.len(),
            });
        }
        Ok(LabelMap {
            width,
            height,
            data,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// `(width, height)`.
    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The label at column `x`, row `y`; `None` outside the map.
    pub fn get(&self, x: u32, y: u32) -> Option<u8> {
        if x < self.width && y < self.height {
            Some(self.data[y as usize * self.width as usize + x as usize])
        } else {
            None
        }
    }

    /// Sets the label at column `x`, row `y` (ignored outside the map).
    pub fn set(&mut self, x: u32, y: u32, value: u8) {
        if x < self.width && y < self.height {
            self.data[y as usize * self.width as usize + x as usize] = value;
        }
    }

    /// The row-major labels.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// The row-major labels, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Consumes the map, returning its row-major labels.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    /// Sorted distinct values present in the map (including `IGNORE_LABEL` if present).
    pub fn unique_values(&self) -> Vec<u8> {
        let mut seen = [false; 256];
        for &v in &self.data {
            seen[v as usize] = true;
        }
        (0..=255u8).filter(|&v| seen[v as usize]).collect()
    }

    /// Per-value pixel counts (index = label value).
    pub fn histogram(&self) -> [u64; 256] {
        let mut h = [0u64; 256];
        for &v in &self.data {
            h[v as usize] += 1;
        }
        h
    }
}

/// One dataset sample: the decoded image and its label map (same size).
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sample id (file stem, e.g. `2007_000033`).
    pub id: String,
    /// The RGB image.
    pub image: RgbImage,
    /// Class ids per pixel, `IGNORE_LABEL` where ignored.
    pub label: LabelMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_map_accessors() {
        let mut m = LabelMap::filled(3, 2, 0);
        m.set(2, 1, 7);
        m.set(5, 5, 9);
        assert_eq!(m.get(2, 1), Some(7));
        assert_eq!(m.get(3, 0), None);
        assert_eq!(m.unique_values(), vec![0, 7]);
        assert_eq!(m.histogram()[0], 5);
        assert!(LabelMap::from_vec(2, 2, vec![0; 3]).is_err());
    }
}
