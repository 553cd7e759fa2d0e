//! A dataset: a list of (image, mask) file pairs with the class table and the mask encoding, opened
//! from one of the three supported layouts, and the decoding + validation of one sample.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cityscapes::{self, CityscapesLabels};
use crate::classes::ClassTable;
use crate::error::{DataError, ErrorPolicy, Result, SkippedSample};
use crate::folder;
use crate::io::{read_mask, read_rgb_image, RawMask};
use crate::sample::{LabelMap, Sample, IGNORE_LABEL};
use crate::voc::{self, VocLabels};

/// The on-disk layout a dataset was opened from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// PASCAL VOC 2012 (`JPEGImages/`, `SegmentationClass[Aug]/`, `ImageSets/Segmentation/`).
    Voc,
    /// Cityscapes (`leftImg8bit/`, `gtFine/`).
    Cityscapes,
    /// The custom folder format (`classes.txt`, `images/`, `masks/`).
    Folder,
    /// Built in code with [`Dataset::from_entries`].
    Custom,
}

impl DatasetFormat {
    /// Guesses the layout of `root`: `JPEGImages/` (or `VOC2012/JPEGImages/`) means VOC,
    /// `leftImg8bit/` Cityscapes, `images/` + `masks/` the folder format.
    pub fn detect(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        if voc::resolve_root(root).is_ok() {
            Ok(DatasetFormat::Voc)
        } else if root.join("leftImg8bit").is_dir() {
            Ok(DatasetFormat::Cityscapes)
        } else if root.join("images").is_dir() && root.join("masks").is_dir() {
            Ok(DatasetFormat::Folder)
        } else {
            Err(DataError::MissingPath {
                what: "dataset (no JPEGImages/, leftImg8bit/ or images/+masks/ inside)",
                path: root.to_path_buf(),
            })
        }
    }
}

/// How a mask file's values become class ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskEncoding {
    /// Single-channel masks (palette indices or gray levels) hold class ids `0..num_classes` or 255;
    /// RGB masks are mapped through the class table's colors (ignore colors give 255).
    ClassIds,
    /// Cityscapes `labelIds`, mapped to train ids through the official label table.
    CityscapesLabelIds,
}

/// One sample's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleEntry {
    /// The sample id (file stem).
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// The mask file.
    pub mask: PathBuf,
    /// How to read the mask.
    pub encoding: MaskEncoding,
}

/// A segmentation dataset: samples, classes and where they came from.
///
/// Opening checks that the split list exists and is not empty and that every listed image and mask
/// exists; decoding problems (corrupt files, size mismatches, bad label values) surface in
/// [`Dataset::load`].
#[derive(Debug)]
pub struct Dataset {
    format: DatasetFormat,
    root: PathBuf,
    split: Option<String>,
    classes: ClassTable,
    entries: Vec<SampleEntry>,
    skipped: Vec<SkippedSample>,
}

impl Dataset {
    /// PASCAL VOC 2012 split `split` (`train`, `val`, `trainval`, `train_aug`, or a path to a `.txt`
    /// list) under `root` (`VOCdevkit/` or `VOCdevkit/VOC2012/`); masks chosen by [`VocLabels::Auto`];
    /// missing files are errors. The classes are the 21 VOC classes, unless the root holds a
    /// `classes.txt` in the custom format (a dataset in the VOC layout with its own classes).
    pub fn voc(root: impl AsRef<Path>, split: &str) -> Result<Self> {
        Self::voc_with(root, split, VocLabels::Auto, ErrorPolicy::Fail)
    }

    /// [`Dataset::voc`] with an explicit mask folder and missing-file policy.
    pub fn voc_with(
        root: impl AsRef<Path>,
        split: &str,
        labels: VocLabels,
        policy: ErrorPolicy,
    ) -> Result<Self> {
        let (root, entries) = voc::discover(root.as_ref(), split, labels)?;
        let classes_file = root.join("classes.txt");
        let classes = if classes_file.is_file() {
            ClassTable::from_file(&classes_file)?
        } else {
            ClassTable::voc()
        };
        Self::build(
            DatasetFormat::Voc,
            root,
            Some(split.to_string()),
            classes,
            entries,
            policy,
        )
    }

    /// Cityscapes split `split` (`train`, `val`, `test`) under `root` (the folder holding
    /// `leftImg8bit/` and `gtFine/`), reading `*_labelTrainIds.png` where present.
    pub fn cityscapes(root: impl AsRef<Path>, split: &str) -> Result<Self> {
        Self::cityscapes_with(root, split, CityscapesLabels::Auto, ErrorPolicy::Fail)
    }

    /// [`Dataset::cityscapes`] with an explicit annotation choice and missing-file policy.
    pub fn cityscapes_with(
        root: impl AsRef<Path>,
        split: &str,
        labels: CityscapesLabels,
        policy: ErrorPolicy,
    ) -> Result<Self> {
        let root = root.as_ref();
        let entries = cityscapes::discover(root, split, labels)?;
        Self::build(
            DatasetFormat::Cityscapes,
            root.to_path_buf(),
            Some(split.to_string()),
            ClassTable::cityscapes(),
            entries,
            policy,
        )
    }

    /// A custom folder dataset; `split` names `splits/{split}.txt` (or is a path to a `.txt` list),
    /// `None` takes every image in `images/`.
    pub fn folder(root: impl AsRef<Path>, split: Option<&str>) -> Result<Self> {
        Self::folder_with(root, split, ErrorPolicy::Fail)
    }

    /// [`Dataset::folder`] with a missing-file policy.
    pub fn folder_with(
        root: impl AsRef<Path>,
        split: Option<&str>,
        policy: ErrorPolicy,
    ) -> Result<Self> {
        let root = root.as_ref();
        let (classes, entries) = folder::discover(root, split)?;
        Self::build(
            DatasetFormat::Folder,
            root.to_path_buf(),
            split.map(str::to_string),
            classes,
            entries,
            policy,
        )
    }

    /// Opens `root` in whichever layout [`DatasetFormat::detect`] finds. VOC and Cityscapes need a
    /// split; for the folder format `None` means every image.
    pub fn open(root: impl AsRef<Path>, split: Option<&str>, policy: ErrorPolicy) -> Result<Self> {
        let root = root.as_ref();
        let need_split = |name: &str| {
            split.ok_or_else(|| {
                DataError::Config(format!(
                    "{} is a {name} dataset: name a split (e.g. 'val')",
                    root.display()
                ))
            })
        };
        match DatasetFormat::detect(root)? {
            DatasetFormat::Voc => Self::voc_with(root, need_split("VOC")?, VocLabels::Auto, policy),
            DatasetFormat::Cityscapes => Self::cityscapes_with(
                root,
                need_split("Cityscapes")?,
                CityscapesLabels::Auto,
                policy,
            ),
            DatasetFormat::Folder | DatasetFormat::Custom => Self::folder_with(root, split, policy),
        }
    }

    /// A dataset from explicit entries (e.g. files produced by another tool).
    pub fn from_entries(
        root: impl AsRef<Path>,
        classes: ClassTable,
        entries: Vec<SampleEntry>,
        policy: ErrorPolicy,
    ) -> Result<Self> {
        if entries.is_empty() {
            return Err(DataError::EmptySplit {
                path: root.as_ref().to_path_buf(),
            });
        }
        Self::build(
            DatasetFormat::Custom,
            root.as_ref().to_path_buf(),
            None,
            classes,
            entries,
            policy,
        )
    }

    fn build(
        format: DatasetFormat,
        root: PathBuf,
        split: Option<String>,
        classes: ClassTable,
        entries: Vec<SampleEntry>,
        policy: ErrorPolicy,
    ) -> Result<Self> {
        let mut kept = Vec::with_capacity(entries.len());
        let mut skipped = Vec::new();
        for e in entries {
            match check_exists(&e) {
                Ok(()) => kept.push(e),
                Err(err) if policy == ErrorPolicy::SkipWithWarning => {
                    skipped.push(SkippedSample::warn(e.id.clone(), err))
                }
                Err(err) => return Err(err),
            }
        }
        if kept.is_empty() {
            return Err(DataError::EmptySplit {
                path: split
                    .as_deref()
                    .map_or_else(|| root.clone(), |s| root.join(s)),
            });
        }
        Ok(Dataset {
            format,
            root,
            split,
            classes,
            entries: kept,
            skipped,
        })
    }

    /// The layout the dataset was opened from.
    pub fn format(&self) -> DatasetFormat {
        self.format
    }

    /// The dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The split name, if any.
    pub fn split(&self) -> Option<&str> {
        self.split.as_deref()
    }

    /// The classes.
    pub fn classes(&self) -> &ClassTable {
        &self.classes
    }

    /// Number of classes (the ignore label not included).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no samples (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The samples' files.
    pub fn entries(&self) -> &[SampleEntry] {
        &self.entries
    }

    /// Samples dropped at opening under [`ErrorPolicy::SkipWithWarning`] (missing files).
    pub fn skipped(&self) -> &[SkippedSample] {
        &self.skipped
    }

    /// Decodes sample `index`: the image, the mask interpreted as class ids, both checked (same
    /// size, every label a class id or 255).
    pub fn load(&self, index: usize) -> Result<Sample> {
        let entry = self.entries.get(index).ok_or_else(|| {
            DataError::Config(format!(
                "sample index {index} out of range for a dataset of {} samples",
                self.entries.len()
            ))
        })?;
        load_entry(entry, &self.classes)
    }

    /// Iterates over the samples in order; under [`ErrorPolicy::SkipWithWarning`] bad samples are
    /// reported on stderr, recorded in [`SampleIter::skipped`] and left out.
    pub fn samples(&self, policy: ErrorPolicy) -> SampleIter<'_> {
        SampleIter {
            dataset: self,
            next: 0,
            policy,
            skipped: Vec::new(),
        }
    }
}

/// Sequential iterator over a dataset's samples; see [`Dataset::samples`].
#[derive(Debug)]
pub struct SampleIter<'a> {
    dataset: &'a Dataset,
    next: usize,
    policy: ErrorPolicy,
    skipped: Vec<SkippedSample>,
}

impl SampleIter<'_> {
    /// The samples skipped so far.
    pub fn skipped(&self) -> &[SkippedSample] {
        &self.skipped
    }
}

impl Iterator for SampleIter<'_> {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.dataset.len() {
            let i = self.next;
            self.next += 1;
            match self.dataset.load(i) {
                Ok(s) => return Some(Ok(s)),
                Err(e) if self.policy == ErrorPolicy::SkipWithWarning => {
                    let id = self.dataset.entries[i].id.clone();
                    self.skipped.push(SkippedSample::warn(id, e));
                }
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

fn check_exists(e: &SampleEntry) -> Result<()> {
    if !e.image.is_file() {
        return Err(DataError::MissingFile {
            what: "image",
            id: e.id.clone(),
            path: e.image.clone(),
        });
    }
    if !e.mask.is_file() {
        return Err(DataError::MissingFile {
            what: "mask",
            id: e.id.clone(),
            path: e.mask.clone(),
        });
    }
    Ok(())
}

fn not_found_to_missing(err: DataError, what: &'static str, id: &str) -> DataError {
    match err {
        DataError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            DataError::MissingFile {
                what,
                id: id.to_string(),
                path,
            }
        }
        other => other,
    }
}

/// Decodes and validates one entry.
pub(crate) fn load_entry(entry: &SampleEntry, classes: &ClassTable) -> Result<Sample> {
    let image =
        read_rgb_image(&entry.image).map_err(|e| not_found_to_missing(e, "image", &entry.id))?;
    let raw = read_mask(&entry.mask).map_err(|e| not_found_to_missing(e, "mask", &entry.id))?;
    let (mw, mh) = raw.dimensions();
    if (mw, mh) != image.dimensions() {
        return Err(DataError::SizeMismatch {
            image: entry.image.clone(),
            mask: entry.mask.clone(),
            image_width: image.width(),
            image_height: image.height(),
            mask_width: mw,
            mask_height: mh,
        });
    }
    let label = decode_label(raw, entry.encoding, classes, &entry.mask)?;
    Ok(Sample {
        id: entry.id.clone(),
        image,
        label,
    })
}

/// Interprets a raw mask as class ids, validating every value.
pub fn decode_label(
    raw: RawMask,
    encoding: MaskEncoding,
    classes: &ClassTable,
    path: &Path,
) -> Result<LabelMap> {
    match (raw, encoding) {
        (
            RawMask::Index {
                width,
                height,
                mut data,
            },
            enc,
        ) => {
            let (lut, expected): ([Option<u8>; 256], String) = match enc {
                MaskEncoding::ClassIds => {
                    let k = classes.len();
                    let mut lut = [None; 256];
                    for (v, slot) in lut.iter_mut().enumerate() {
                        if v < k || v == IGNORE_LABEL as usize {
                            *slot = Some(v as u8);
                        }
                    }
                    (lut, format!("a class id in 0..{k} or the ignore label 255"))
                }
                MaskEncoding::CityscapesLabelIds => (
                    cityscapes::label_id_lut(),
                    "a Cityscapes label id in 0..=33".to_string(),
                ),
            };
            for (i, v) in data.iter_mut().enumerate() {
                match lut[*v as usize] {
                    Some(mapped) => *v = mapped,
                    None => {
                        return Err(DataError::InvalidLabel {
                            path: path.to_path_buf(),
                            value: *v as u32,
                            x: (i % width as usize) as u32,
                            y: (i / width as usize) as u32,
                            expected,
                        })
                    }
                }
            }
            LabelMap::from_vec(width, height, data)
        }
        (
            RawMask::Color {
                width,
                height,
                data,
            },
            MaskEncoding::ClassIds,
        ) => {
            let mut cache: HashMap<[u8; 3], u8> = HashMap::new();
            let mut out = Vec::with_capacity(width as usize * height as usize);
            let mut last: Option<([u8; 3], u8)> = None;
            for (i, px) in data.chunks_exact(3).enumerate() {
                let c = [px[0], px[1], px[2]];
                let label = match last {
                    Some((lc, l)) if lc == c => l,
                    _ => {
                        let l = match cache.get(&c) {
                            Some(&l) => l,
                            None => {
                                let l = classes.label_of_color(c).ok_or_else(|| {
                                    DataError::UnknownColor {
                                        path: path.to_path_buf(),
                                        r: c[0],
                                        g: c[1],
                                        b: c[2],
                                        x: (i % width as usize) as u32,
                                        y: (i / width as usize) as u32,
                                    }
                                })?;
                                cache.insert(c, l);
                                l
                            }
                        };
                        last = Some((c, l));
                        l
                    }
                };
                out.push(label);
            }
            LabelMap::from_vec(width, height, out)
        }
        (RawMask::Color { .. }, MaskEncoding::CityscapesLabelIds) => {
            Err(DataError::UnsupportedMask {
                path: path.to_path_buf(),
                message: "expected a single-channel labelIds PNG, got an RGB image".into(),
            })
        }
    }
}
