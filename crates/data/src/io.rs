//! Reading images and masks (palette indices via the `png` crate) and writing PNG/JPEG files atomically.
//!
//! The `image` crate expands palette PNGs to RGB; segmentation masks such as VOC's `SegmentationClass`
//! store class ids as palette *indices*, so masks are decoded here with the `png` crate directly.

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::sample::{LabelMap, RgbImage};

/// Reads a file into memory, naming the path on failure.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Decodes any PNG or JPEG (by content, not extension) to 8-bit RGB.
///
/// Grayscale, palette and alpha images are converted to RGB (alpha dropped).
pub fn read_rgb_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    decode_rgb_image(&bytes, path)
}

/// Decodes in-memory PNG or JPEG bytes to 8-bit RGB; `path` is only used in error messages.
pub fn decode_rgb_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let decode_err = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    if bytes.is_empty() {
        return Err(decode_err("the file is empty".into()));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?;
    let format = reader.format();
    if format.is_none() {
        return Err(decode_err("not a recognised image format".into()));
    }
    if format == Some(image::ImageFormat::Jpeg) {
        check_jpeg_complete(bytes).map_err(decode_err)?;
    }
    let img = reader.decode().map_err(|e| decode_err(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(decode_err("image has zero width or height".into()));
    }
    Ok(img.to_rgb8())
}

/// Rejects JPEG streams that stop before their end-of-image marker.
///
/// The `image` crate's JPEG decoder returns a gray-filled image, and no error, for a file cut anywhere
/// after its header (checked on a VOC JPEG cut at 30%..99%); a truncated training image must be an
/// error instead. The end-of-image marker (FF D9) must follow the last start-of-scan marker
/// (FF DA); inside entropy-coded data an FF byte is always stuffed or a restart marker, so FF D9 cannot
/// occur there, and an EXIF thumbnail's own EOI comes before the main scan. Trailing bytes after the
/// EOI (seen in real files) are accepted.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let last_marker = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last_marker(0xDA), last_marker(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => Ok(()),
        (None, _) => Err("truncated JPEG: no start-of-scan marker".into()),
        _ => Err("truncated JPEG: the image data stops before the end-of-image marker".into()),
    }
}

/// A decoded mask before it is interpreted by a dataset's label encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawMask {
    /// Single-channel values: palette indices (palette PNG) or gray levels (grayscale PNG).
    Index {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Row-major values.
        data: Vec<u8>,
    },
    /// RGB colors (RGB or RGBA PNG, alpha dropped), row-major, 3 bytes per pixel.
    Color {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Row-major RGB triples.
        data: Vec<u8>,
    },
}

impl RawMask {
    /// `(width, height)`.
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            RawMask::Index { width, height, .. } | RawMask::Color { width, height, .. } => {
                (*width, *height)
            }
        }
    }
}

/// Reads a mask PNG without expanding palettes: palette PNGs give their indices, grayscale PNGs their
/// values (16-bit values above 255 are an error), RGB/RGBA PNGs their colors.
pub fn read_mask(path: impl AsRef<Path>) -> Result<RawMask> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    decode_mask(&bytes, path)
}

/// Decodes mask PNG bytes; `path` is only used in error messages. See [`read_mask`].
pub fn decode_mask(bytes: &[u8], path: &Path) -> Result<RawMask> {
    let decode_err = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    if bytes.is_empty() {
        return Err(decode_err("the file is empty".into()));
    }
    if !bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        return Err(DataError::UnsupportedMask {
            path: path.to_path_buf(),
            message: "masks must be PNG files (lossless); this file is not a PNG".into(),
        });
    }
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| decode_err(format!("PNG header: {e}")))?;
    let buf_size = reader
        .output_buffer_size()
        .ok_or_else(|| decode_err("image too large".into()))?;
    let mut buf = vec![0u8; buf_size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| decode_err(format!("PNG data: {e}")))?;
    let (width, height) = (frame.width, frame.height);
    if width == 0 || height == 0 {
        return Err(decode_err("mask has zero width or height".into()));
    }
    let line = frame.line_size;
    let depth = frame.bit_depth as u8;
    let n = width as usize * height as usize;
    use png::ColorType as C;
    match frame.color_type {
        C::Indexed | C::Grayscale | C::GrayscaleAlpha => {
            let samples = if frame.color_type == C::GrayscaleAlpha {
                2
            } else {
                1
            };
            let mut data = Vec::with_capacity(n);
            for y in 0..height as usize {
                let row = &buf[y * line..(y + 1) * line];
                for x in 0..width as usize {
                    let v: u32 = match depth {
                        8 => row[x * samples] as u32,
                        16 => u16::from_be_bytes([row[x * samples * 2], row[x * samples * 2 + 1]])
                            as u32,
                        1 | 2 | 4 => {
                            let bit = x * depth as usize;
                            let byte = row[bit / 8];
                            let shift = 8 - depth as usize - bit % 8;
                            ((byte >> shift) & ((1u8 << depth) - 1)) as u32
                        }
                        _ => return Err(decode_err(format!("unsupported bit depth {depth}"))),
                    };
                    if v > 255 {
                        return Err(DataError::InvalidLabel {
                            path: path.to_path_buf(),
                            value: v,
                            x: x as u32,
                            y: y as u32,
                            expected:
                                "a label value in 0..=255 (16-bit masks may only hold 8-bit values)"
                                    .into(),
                        });
                    }
                    data.push(v as u8);
                }
            }
            Ok(RawMask::Index {
                width,
                height,
                data,
            })
        }
        C::Rgb | C::Rgba => {
            if depth != 8 {
                return Err(DataError::UnsupportedMask {
                    path: path.to_path_buf(),
                    message: format!("{depth}-bit color masks are not supported; use 8-bit RGB"),
                });
            }
            let samples = if frame.color_type == C::Rgba { 4 } else { 3 };
            let mut data = Vec::with_capacity(n * 3);
            for y in 0..height as usize {
                let row = &buf[y * line..y * line + width as usize * samples];
                for px in row.chunks_exact(samples) {
                    data.extend_from_slice(&px[..3]);
                }
            }
            Ok(RawMask::Color {
                width,
                height,
                data,
            })
        }
    }
}

/// Writes `path` through a temporary file in the same directory and a rename, so an existing file is
/// replaced only by a complete new one and a failed write leaves nothing half-written behind.
pub fn write_atomic(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> std::result::Result<(), String>,
) -> Result<()> {
    let path = path.as_ref();
    let enc_err = |message: String| DataError::Encode {
        path: path.to_path_buf(),
        message,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| enc_err("the path has no file name".into()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file =
            fs::File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        fs::rename(&tmp, path).map_err(|e| format!("renaming {}: {e}", tmp.display()))
    })();
    if let Err(message) = result {
        let _ = fs::remove_file(&tmp);
        return Err(enc_err(message));
    }
    Ok(())
}

/// Saves an RGB image as PNG (atomically).
pub fn save_rgb_png(path: impl AsRef<Path>, image: &RgbImage) -> Result<()> {
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, image.width(), image.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(image.as_raw())
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())
    })
}

/// Saves an RGB image as JPEG with the given quality (1..=100, atomically).
pub fn save_jpeg(path: impl AsRef<Path>, image: &RgbImage, quality: u8) -> Result<()> {
    let path = path.as_ref();
    if !(1..=100).contains(&quality) {
        return Err(DataError::Config(format!(
            "JPEG quality {quality} for {} is outside 1..=100",
            path.display()
        )));
    }
    write_atomic(path, |w| {
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(w, quality);
        enc.encode_image(image).map_err(|e| e.to_string())
    })
}

/// Saves a label map as a palette PNG whose indices are the labels (the VOC `SegmentationClass`
/// encoding): viewers show colors, loaders read the class ids. `palette` holds 3 bytes per entry
/// (at most 256 entries).
pub fn save_palette_png(
    path: impl AsRef<Path>,
    label: &LabelMap,
    palette: &[[u8; 3]],
) -> Result<()> {
    let path = path.as_ref();
    if palette.is_empty() || palette.len() > 256 {
        return Err(DataError::Config(format!(
            "palette for {} has {} entries; a PNG palette holds 1..=256",
            path.display(),
            palette.len()
        )));
    }
    let flat: Vec<u8> = palette.iter().flatten().copied().collect();
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, label.width(), label.height());
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(flat);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(label.as_slice())
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())
    })
}

/// Saves a label map as an 8-bit grayscale PNG (the SBD `SegmentationClassAug` / Cityscapes encoding).
pub fn save_gray_png(path: impl AsRef<Path>, label: &LabelMap) -> Result<()> {
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, label.width(), label.height());
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(label.as_slice())
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_png_roundtrip_keeps_indices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let label = LabelMap::from_vec(3, 2, vec![0, 1, 255, 20, 3, 0]).unwrap();
        let palette: Vec<[u8; 3]> = (0..=255u8).map(|i| [i, 0, 0]).collect();
        save_palette_png(&path, &label, &palette).unwrap();
        match read_mask(&path).unwrap() {
            RawMask::Index {
                data,
                width,
                height,
            } => {
                assert_eq!((width, height), (3, 2));
                assert_eq!(data, label.as_slice());
            }
            other => panic!("expected index mask, got {other:?}"),
        }
        // the image crate expands the palette: index 1 -> color (1,0,0)
        let rgb = read_rgb_image(&path).unwrap();
        assert_eq!(rgb.get_pixel(1, 0).0, [1, 0, 0]);
    }

    #[test]
    fn low_bit_depth_palette_is_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m2.png");
        // 2-bit indexed, width 5: values 0,1,2,3,1 in one row
        let file = fs::File::create(&path).unwrap();
        let mut enc = png::Encoder::new(file, 5, 1);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Two);
        enc.set_palette(vec![0u8; 12]);
        let mut w = enc.write_header().unwrap();
        // 0b00_01_10_11, 0b01_000000
        w.write_image_data(&[0b0001_1011, 0b0100_0000]).unwrap();
        w.finish().unwrap();
        match read_mask(&path).unwrap() {
            RawMask::Index { data, .. } => assert_eq!(data, vec![0, 1, 2, 3, 1]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_and_non_png_masks_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.png");
        fs::write(&p, b"").unwrap();
        let e = read_mask(&p).unwrap_err();
        assert!(e.to_string().contains("empty.png"), "{e}");
        let p = dir.path().join("text.png");
        fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            read_mask(&p).unwrap_err(),
            DataError::UnsupportedMask { .. }
        ));
        let e = read_rgb_image(&p).unwrap_err();
        assert!(matches!(e, DataError::Decode { .. }), "{e}");
    }

    #[test]
    fn truncated_jpegs_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jpg");
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 100]));
        save_jpeg(&p, &img, 90).unwrap();
        let bytes = fs::read(&p).unwrap();
        assert!(decode_rgb_image(&bytes, &p).is_ok());
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0, 0, 0]);
        assert!(
            decode_rgb_image(&padded, &p).is_ok(),
            "trailing bytes after EOI are fine"
        );
        for cut in [bytes.len() / 3, bytes.len() - 2] {
            let e = decode_rgb_image(&bytes[..cut], &p).unwrap_err();
            assert!(e.to_string().contains("truncated JPEG"), "{e}");
        }
    }

    #[test]
    fn atomic_write_failure_keeps_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.png");
        fs::write(&p, b"precious").unwrap();
        let r = write_atomic(&p, |_| Err("simulated failure".into()));
        assert!(r.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"precious");
        // no temp file left behind
        let n = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1);
    }
}
