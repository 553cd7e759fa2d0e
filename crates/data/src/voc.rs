//! PASCAL VOC 2012 in its native `VOCdevkit/VOC2012` layout, with the SBD `SegmentationClassAug` labels.
//!
//! ```text
//! VOC2012/
//!   JPEGImages/<id>.jpg
//!   SegmentationClass/<id>.png        palette PNG, indices 0..20, 255 = void
//!   SegmentationClassAug/<id>.png     (optional, SBD) grayscale PNG, same values
//!   ImageSets/Segmentation/{train,val,trainval}.txt   one id per line
//!   ImageSets/Segmentation/train_aug.txt              (optional) the 10,582 SBD-augmented ids
//! ```

use std::path::{Path, PathBuf};

use crate::dataset::{MaskEncoding, SampleEntry};
use crate::error::{DataError, Result};

/// Which VOC annotation folder to read masks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VocLabels {
    /// `SegmentationClassAug/` for splits whose name contains "aug" (e.g. `train_aug`), otherwise
    /// `SegmentationClass/` if it exists, else `SegmentationClassAug/`.
    #[default]
    Auto,
    /// Always `SegmentationClass/` (palette PNGs).
    SegmentationClass,
    /// Always `SegmentationClassAug/` (grayscale PNGs from SBD).
    SegmentationClassAug,
}

/// Accepts either `VOCdevkit/` or `VOCdevkit/VOC2012/`; returns the folder holding `JPEGImages/`.
pub(crate) fn resolve_root(root: &Path) -> Result<PathBuf> {
    if root.join("JPEGImages").is_dir() {
        return Ok(root.to_path_buf());
    }
    let nested = root.join("VOC2012");
    if nested.join("JPEGImages").is_dir() {
        return Ok(nested);
    }
    Err(DataError::MissingPath {
        what: "VOC 2012 image folder",
        path: root.join("JPEGImages"),
    })
}

/// The split list path: `split` itself when it names a `.txt` file, else
/// `ImageSets/Segmentation/{split}.txt`.
pub(crate) fn split_path(root: &Path, split: &str) -> PathBuf {
    if split.ends_with(".txt") {
        PathBuf::from(split)
    } else {
        root.join("ImageSets")
            .join("Segmentation")
            .join(format!("{split}.txt"))
    }
}

/// Reads a split list: one id per line; blank lines skipped; lines in the
/// `/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png` form give the first file's stem.
pub(crate) fn read_split(path: &Path) -> Result<Vec<String>> {
    if !path.is_file() {
        return Err(DataError::MissingSplit {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| !t.starts_with('#'))
        .map(|t| {
            if t.contains('/') {
                Path::new(t)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| t.to_string())
            } else {
                t.to_string()
            }
        })
        .collect();
    if ids.is_empty() {
        return Err(DataError::EmptySplit {
            path: path.to_path_buf(),
        });
    }
    Ok(ids)
}

pub(crate) fn discover(
    root: &Path,
    split: &str,
    labels: VocLabels,
) -> Result<(PathBuf, Vec<SampleEntry>)> {
    let root = resolve_root(root)?;
    let ids = read_split(&split_path(&root, split))?;
    let class_dir = root.join("SegmentationClass");
    let aug_dir = root.join("SegmentationClassAug");
    let mask_dir = match labels {
        VocLabels::SegmentationClass => class_dir,
        VocLabels::SegmentationClassAug => aug_dir,
        VocLabels::Auto => {
            let split_name = Path::new(split)
                .file_stem()
                .map(|s| s.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            if split_name.contains("aug") || !class_dir.is_dir() {
                aug_dir
            } else {
                class_dir
            }
        }
    };
    if !mask_dir.is_dir() {
        return Err(DataError::MissingPath {
            what: "VOC mask folder",
            path: mask_dir,
        });
    }
    let entries = ids
        .into_iter()
        .map(|id| SampleEntry {
            image: root.join("JPEGImages").join(format!("{id}.jpg")),
            mask: mask_dir.join(format!("{id}.png")),
            encoding: MaskEncoding::ClassIds,
            id,
        })
        .collect();
    Ok((root, entries))
}
