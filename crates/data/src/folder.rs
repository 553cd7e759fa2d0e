//! The custom folder format, for training on your own data with no code.
//!
//! ```text
//! my_dataset/
//!   classes.txt            one class per line: `name, R, G, B` or `name, #RRGGBB`, optional `, ignore`
//!   images/<stem>.{jpg,jpeg,png}
//!   masks/<stem>.png       single-channel (grayscale or palette) class ids, 255 = ignore,
//!                          or RGB colors from classes.txt
//!   splits/{train,val}.txt (optional) one stem per line; without a split every image is used
//! ```

use std::path::{Path, PathBuf};

use crate::cityscapes::{file_name, sorted_dir};
use crate::classes::ClassTable;
use crate::dataset::{MaskEncoding, SampleEntry};
use crate::error::{DataError, Result};
use crate::voc::read_split;

/// Image file extensions the folder format accepts, in lookup order.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "JPG", "JPEG", "PNG"];

/// The classes file of a folder dataset: `classes.txt`, or `classes.csv` when only that exists.
pub fn classes_path(root: &Path) -> PathBuf {
    let txt = root.join("classes.txt");
    let csv = root.join("classes.csv");
    if !txt.exists() && csv.exists() {
        csv
    } else {
        txt
    }
}

pub(crate) fn discover(root: &Path, split: Option<&str>) -> Result<(ClassTable, Vec<SampleEntry>)> {
    if !root.is_dir() {
        return Err(DataError::MissingPath {
            what: "dataset root",
            path: root.to_path_buf(),
        });
    }
    let classes = ClassTable::from_file(classes_path(root))?;
    let images = root.join("images");
    let masks = root.join("masks");
    for (what, dir) in [("image folder", &images), ("mask folder", &masks)] {
        if !dir.is_dir() {
            return Err(DataError::MissingPath {
                what,
                path: dir.clone(),
            });
        }
    }
    let stems_and_images: Vec<(String, PathBuf)> = match split {
        Some(split) => {
            let path = if split.ends_with(".txt") {
                PathBuf::from(split)
            } else {
                root.join("splits").join(format!("{split}.txt"))
            };
            read_split(&path)?
                .into_iter()
                .map(|stem| {
                    let found = IMAGE_EXTENSIONS
                        .iter()
                        .map(|ext| images.join(format!("{stem}.{ext}")))
                        .find(|p| p.is_file());
                    // A missing image is reported (or skipped) by the dataset's existence check.
                    let image = found.unwrap_or_else(|| images.join(format!("{stem}.jpg")));
                    (stem, image)
                })
                .collect()
        }
        None => {
            let list: Vec<(String, PathBuf)> = sorted_dir(&images)?
                .into_iter()
                .filter(|p| {
                    p.is_file()
                        && p.extension().is_some_and(|e| {
                            IMAGE_EXTENSIONS.contains(&e.to_string_lossy().as_ref())
                        })
                })
                .map(|p| {
                    let stem = p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| file_name(&p));
                    (stem, p)
                })
                .collect();
            if list.is_empty() {
                return Err(DataError::EmptySplit { path: images });
            }
            list
        }
    };
    let entries = stems_and_images
        .into_iter()
        .map(|(id, image)| SampleEntry {
            mask: masks.join(format!("{id}.png")),
            image,
            encoding: MaskEncoding::ClassIds,
            id,
        })
        .collect();
    Ok((classes, entries))
}
