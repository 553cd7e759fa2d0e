//! Cityscapes: the official 35-row label table (labelIds -> 19 trainIds) and the native folder layout
//! `leftImg8bit/{split}/{city}/*_leftImg8bit.png` + `gtFine/{split}/{city}/*_gtFine_{labelIds,labelTrainIds}.png`.
//!
//! The table restates the facts of `cityscapesscripts/helpers/labels.py` (mcordts/cityscapesScripts):
//! name, id, trainId (255 = ignored in training and evaluation), category, category id, whether the
//! class has instances, whether it is ignored in evaluation, and its color.

use std::path::{Path, PathBuf};

use crate::dataset::{MaskEncoding, SampleEntry};
use crate::error::{DataError, Result};
use crate::sample::IGNORE_LABEL;

/// One row of the Cityscapes label table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CityscapesLabel {
    /// Class name.
    pub name: &'static str,
    /// The id stored in `*_gtFine_labelIds.png` (-1 for "license plate", which is never stored).
    pub id: i16,
    /// The training id: 0..=18 for the 19 evaluated classes, 255 ignored, -1 for "license plate".
    pub train_id: i16,
    /// Category name.
    pub category: &'static str,
    /// Category id.
    pub category_id: u8,
    /// Whether instances of the class are annotated individually.
    pub has_instances: bool,
    /// Whether the class is left out of evaluation.
    pub ignore_in_eval: bool,
    /// RGB color.
    pub color: [u8; 3],
}

// One argument per table column keeps the table below readable as a table.
#[allow(clippy::too_many_arguments)]
const fn row(
    name: &'static str,
    id: i16,
    train_id: i16,
    category: &'static str,
    category_id: u8,
    has_instances: bool,
    ignore_in_eval: bool,
    color: [u8; 3],
) -> CityscapesLabel {
    CityscapesLabel {
        name,
        id,
        train_id,
        category,
        category_id,
        has_instances,
        ignore_in_eval,
        color,
    }
}

/// The official 35-row Cityscapes label table.
#[rustfmt::skip]
pub const CITYSCAPES_LABELS: [CityscapesLabel; 35] = [
    //   name                    id  train  category        cat  inst   ignore  color
    row("unlabeled",             0,  255, "void",          0, false, true,  [0, 0, 0]),
    row("ego vehicle",           1,  255, "void",          0, false, true,  [0, 0, 0]),
    row("rectification border",  2,  255, "void",          0, false, true,  [0, 0, 0]),
    row("out of roi",            3,  255, "void",          0, false, true,  [0, 0, 0]),
    row("static",                4,  255, "void",          0, false, true,  [0, 0, 0]),
    row("dynamic",               5,  255, "void",          0, false, true,  [111, 74, 0]),
    row("ground",                6,  255, "void",          0, false, true,  [81, 0, 81]),
    row("road",                  7,    0, "flat",          1, false, false, [128, 64, 128]),
    row("sidewalk",              8,    1, "flat",          1, false, false, [244, 35, 232]),
    row("parking",               9,  255, "flat",          1, false, true,  [250, 170, 160]),
    row("rail track",           10,  255, "flat",          1, false, true,  [230, 150, 140]),
    row("building",             11,    2, "construction",  2, false, false, [70, 70, 70]),
    row("wall",                 12,    3, "construction",  2, false, false, [102, 102, 156]),
    row("fence",                13,    4, "construction",  2, false, false, [190, 153, 153]),
    row("guard rail",           14,  255, "construction",  2, false, true,  [180, 165, 180]),
    row("bridge",               15,  255, "construction",  2, false, true,  [150, 100, 100]),
    row("tunnel",               16,  255, "construction",  2, false, true,  [150, 120, 90]),
    row("pole",                 17,    5, "object",        3, false, false, [153, 153, 153]),
    row("polegroup",            18,  255, "object",        3, false, true,  [153, 153, 153]),
    row("traffic light",        19,    6, "object",        3, false, false, [250, 170, 30]),
    row("traffic sign",         20,    7, "object",        3, false, false, [220, 220, 0]),
    row("vegetation",           21,    8, "nature",        4, false, false, [107, 142, 35]),
    row("terrain",              22,    9, "nature",        4, false, false, [152, 251, 152]),
    row("sky",                  23,   10, "sky",           5, false, false, [70, 130, 180]),
    row("person",               24,   11, "human",         6, true,  false, [220, 20, 60]),
    row("rider",                25,   12, "human",         6, true,  false, [255, 0, 0]),
    row("car",                  26,   13, "vehicle",       7, true,  false, [0, 0, 142]),
    row("truck",                27,   14, "vehicle",       7, true,  false, [0, 0, 70]),
    row("bus",                  28,   15, "vehicle",       7, true,  false, [0, 60, 100]),
    row("caravan",              29,  255, "vehicle",       7, true,  true,  [0, 0, 90]),
    row("trailer",              30,  255, "vehicle",       7, true,  true,  [0, 0, 110]),
    row("train",                31,   16, "vehicle",       7, true,  false, [0, 80, 100]),
    row("motorcycle",           32,   17, "vehicle",       7, true,  false, [0, 0, 230]),
    row("bicycle",              33,   18, "vehicle",       7, true,  false, [119, 11, 32]),
    row("license plate",        -1,   -1, "vehicle",       7, false, true,  [0, 0, 142]),
];

/// Number of Cityscapes train classes.
pub const CITYSCAPES_NUM_CLASSES: usize = 19;

/// The 19 train classes in train-id order.
pub fn train_classes() -> impl Iterator<Item = &'static CityscapesLabel> {
    (0..CITYSCAPES_NUM_CLASSES as i16)
        .filter_map(|t| CITYSCAPES_LABELS.iter().find(|l| l.train_id == t))
}

/// Maps a `labelIds` value to its train id (`IGNORE_LABEL` for ignored classes); `None` for a value
/// that is no Cityscapes label id.
pub fn label_id_to_train_id(id: u8) -> Option<u8> {
    CITYSCAPES_LABELS
        .iter()
        .find(|l| l.id == id as i16)
        .map(|l| {
            if l.train_id < 0 {
                IGNORE_LABEL
            } else {
                l.train_id as u8
            }
        })
}

/// A 256-entry lookup table for [`label_id_to_train_id`].
pub fn label_id_lut() -> [Option<u8>; 256] {
    let mut lut = [None; 256];
    for (v, slot) in lut.iter_mut().enumerate() {
        *slot = label_id_to_train_id(v as u8);
    }
    lut
}

/// Which Cityscapes annotation file to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CityscapesLabels {
    /// `*_gtFine_labelTrainIds.png` where present (made by cityscapesScripts' `createTrainIdLabelImgs`),
    /// else `*_gtFine_labelIds.png` mapped through the label table.
    #[default]
    Auto,
    /// Always `*_gtFine_labelIds.png`, mapped through the table.
    LabelIds,
    /// Always `*_gtFine_labelTrainIds.png`.
    TrainIds,
}

const IMAGE_SUFFIX: &str = "_leftImg8bit.png";

/// Lists the samples of `root/leftImg8bit/{split}/{city}/` in sorted order.
pub(crate) fn discover(
    root: &Path,
    split: &str,
    labels: CityscapesLabels,
) -> Result<Vec<SampleEntry>> {
    let img_dir = root.join("leftImg8bit").join(split);
    if !img_dir.is_dir() {
        return Err(DataError::MissingSplit { path: img_dir });
    }
    let gt_dir = root.join("gtFine").join(split);
    let mut cities = sorted_dir(&img_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect::<Vec<_>>();
    cities.sort();
    let mut entries = Vec::new();
    for city_dir in cities {
        let city = file_name(&city_dir);
        for file in sorted_dir(&city_dir)? {
            let name = file_name(&file);
            let Some(base) = name.strip_suffix(IMAGE_SUFFIX) else {
                continue;
            };
            let ids = gt_dir
                .join(&city)
                .join(format!("{base}_gtFine_labelIds.png"));
            let train = gt_dir
                .join(&city)
                .join(format!("{base}_gtFine_labelTrainIds.png"));
            let (mask, encoding) = match labels {
                CityscapesLabels::TrainIds => (train, MaskEncoding::ClassIds),
                CityscapesLabels::LabelIds => (ids, MaskEncoding::CityscapesLabelIds),
                CityscapesLabels::Auto if train.is_file() => (train, MaskEncoding::ClassIds),
                CityscapesLabels::Auto => (ids, MaskEncoding::CityscapesLabelIds),
            };
            entries.push(SampleEntry {
                id: base.to_string(),
                image: file,
                mask,
                encoding,
            });
        }
    }
    if entries.is_empty() {
        return Err(DataError::EmptySplit { path: img_dir });
    }
    Ok(entries)
}

pub(crate) fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        out.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_facts() {
        assert_eq!(train_classes().count(), 19);
        let names: Vec<_> = train_classes().map(|l| l.name).collect();
        assert_eq!(names[0], "road");
        assert_eq!(names[18], "bicycle");
        assert_eq!(label_id_to_train_id(7), Some(0));
        assert_eq!(label_id_to_train_id(26), Some(13));
        assert_eq!(label_id_to_train_id(0), Some(255));
        assert_eq!(label_id_to_train_id(34), None);
        // every evaluated class has a distinct train id, every ignored one 255
        for l in &CITYSCAPES_LABELS {
            assert_eq!(
                l.ignore_in_eval,
                !(0..19).contains(&l.train_id),
                "{}",
                l.name
            );
        }
    }
}
