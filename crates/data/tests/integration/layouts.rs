//! The three layouts round-trip generated scenes exactly; SBD `SegmentationClassAug` + `train_aug.txt`;
//! format detection.

use std::fs;

use deeplab_data::cityscapes::CITYSCAPES_LABELS;
use deeplab_data::io::{save_gray_png, save_rgb_png};
use deeplab_data::synthetic::{
    generate_scene, write_folder, write_voc, FolderMaskStyle, SyntheticSplit,
};
use deeplab_data::{Dataset, DatasetFormat, ErrorPolicy, LabelMap, VocLabels};

use crate::common::tiny_config;

#[test]
fn voc_layout_roundtrips_generated_scenes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(3, 2);
    let written = write_voc(dir.path(), &cfg).unwrap();
    assert_eq!(
        written.train,
        vec!["train_0000", "train_0001", "train_0002"]
    );
    let ds = Dataset::voc(dir.path(), "val").unwrap();
    assert_eq!(ds.format(), DatasetFormat::Voc);
    assert_eq!(
        ds.num_classes(),
        5,
        "classes.txt overrides the 21 VOC classes"
    );
    assert_eq!(
        ds.classes().names(),
        vec!["background", "disc", "square", "triangle", "stripes"]
    );
    for i in 0..2 {
        let expect = generate_scene(&cfg, SyntheticSplit::Val, i).unwrap();
        let got = ds.load(i).unwrap();
        assert_eq!(got.id, expect.id);
        assert_eq!(got.label, expect.label, "labels are lossless");
        // JPEG is lossy: the mean absolute error stays small
        let mae: f64 = got
            .image
            .as_raw()
            .iter()
            .zip(expect.image.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / got.image.as_raw().len() as f64;
        assert!(mae < 6.0, "mean abs JPEG error {mae}");
    }
    assert_eq!(Dataset::voc(dir.path(), "trainval").unwrap().len(), 5);
    // the same folder through VOCdevkit/VOC2012 nesting
    let devkit = tempfile::tempdir().unwrap();
    write_voc(devkit.path().join("VOC2012"), &cfg).unwrap();
    assert_eq!(Dataset::voc(devkit.path(), "train").unwrap().len(), 3);
}

#[test]
fn sbd_segmentation_class_aug_and_train_aug_list() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny_config(3, 1);
    write_voc(root, &cfg).unwrap();
    // SBD-style: grayscale masks in SegmentationClassAug, list in DrSleep's two-column format
    fs::create_dir_all(root.join("SegmentationClassAug")).unwrap();
    let mut lines = String::new();
    for i in 0..3 {
        let s = generate_scene(&cfg, SyntheticSplit::Train, i).unwrap();
        save_gray_png(
            root.join(format!("SegmentationClassAug/{}.png", s.id)),
            &s.label,
        )
        .unwrap();
        lines += &format!("/JPEGImages/{0}.jpg /SegmentationClassAug/{0}.png\n", s.id);
    }
    fs::write(root.join("ImageSets/Segmentation/train_aug.txt"), lines).unwrap();
    let ds = Dataset::voc(root, "train_aug").unwrap();
    assert_eq!(ds.len(), 3);
    assert!(ds.entries()[0]
        .mask
        .to_string_lossy()
        .contains("SegmentationClassAug"));
    let palette_ds = Dataset::voc(root, "train").unwrap();
    assert!(palette_ds.entries()[0]
        .mask
        .to_string_lossy()
        .contains("SegmentationClass/"));
    for i in 0..3 {
        assert_eq!(ds.load(i).unwrap().label, palette_ds.load(i).unwrap().label);
    }
    let forced = Dataset::voc_with(
        root,
        "train",
        VocLabels::SegmentationClassAug,
        ErrorPolicy::Fail,
    )
    .unwrap();
    assert!(forced.entries()[1]
        .mask
        .to_string_lossy()
        .contains("SegmentationClassAug"));
}

#[test]
fn folder_layout_index_and_color_masks_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(2, 2);
    write_folder(dir.path().join("idx"), &cfg, FolderMaskStyle::Index).unwrap();
    write_folder(dir.path().join("col"), &cfg, FolderMaskStyle::Color).unwrap();
    let a = Dataset::folder(dir.path().join("idx"), None).unwrap();
    let b = Dataset::folder(dir.path().join("col"), None).unwrap();
    assert_eq!(a.len(), 4);
    assert_eq!(a.format(), DatasetFormat::Folder);
    for i in 0..4 {
        let (sa, sb) = (a.load(i).unwrap(), b.load(i).unwrap());
        assert_eq!(sa.label, sb.label);
        assert!(
            sa.label.as_slice().contains(&255),
            "void maps to 255 in both encodings"
        );
    }
    assert_eq!(
        Dataset::folder(dir.path().join("idx"), Some("val"))
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn cityscapes_layout_maps_label_ids() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // train ids -> one label id each (the first table row with that train id), 255 -> 0 (unlabeled)
    let to_label_id = |t: u8| -> u8 {
        if t == 255 {
            return 0;
        }
        CITYSCAPES_LABELS
            .iter()
            .find(|l| l.train_id == t as i16)
            .map(|l| l.id as u8)
            .unwrap()
    };
    let mut expected = Vec::new();
    for (city, n) in [("bremen", 2usize), ("aachen", 1)] {
        for i in 0..n {
            let s = generate_scene(&tiny_config(1, 1), SyntheticSplit::Train, i).unwrap();
            let (w, h) = s.label.dimensions();
            // spread the synthetic ids 0..4 over train ids 0, 5, 10, 13, 18
            let train: Vec<u8> = s
                .label
                .as_slice()
                .iter()
                .map(|&v| {
                    if v == 255 {
                        255
                    } else {
                        [0, 5, 10, 13, 18][v as usize]
                    }
                })
                .collect();
            let ids: Vec<u8> = train.iter().map(|&t| to_label_id(t)).collect();
            let base = format!("{city}_{i:06}_000019");
            let img_dir = root.join("leftImg8bit/train").join(city);
            let gt_dir = root.join("gtFine/train").join(city);
            fs::create_dir_all(&img_dir).unwrap();
            fs::create_dir_all(&gt_dir).unwrap();
            save_rgb_png(img_dir.join(format!("{base}_leftImg8bit.png")), &s.image).unwrap();
            save_gray_png(
                gt_dir.join(format!("{base}_gtFine_labelIds.png")),
                &LabelMap::from_vec(w, h, ids).unwrap(),
            )
            .unwrap();
            expected.push((base, s.image, train));
        }
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let ds = Dataset::cityscapes(root, "train").unwrap();
    assert_eq!(ds.format(), DatasetFormat::Cityscapes);
    assert_eq!(ds.len(), 3);
    for (i, (id, image, train)) in expected.iter().enumerate() {
        let s = ds.load(i).unwrap();
        assert_eq!(&s.id, id, "cities and files in sorted order");
        assert_eq!(&s.image, image, "PNG images are lossless");
        assert_eq!(s.label.as_slice(), &train[..]);
    }
    assert_eq!(
        DatasetFormat::detect(root).unwrap(),
        DatasetFormat::Cityscapes
    );
    assert_eq!(
        Dataset::open(root, Some("train"), ErrorPolicy::Fail)
            .unwrap()
            .len(),
        3
    );
    assert!(Dataset::open(root, None, ErrorPolicy::Fail).is_err());
}

#[test]
fn format_detection() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(1, 1);
    write_voc(dir.path().join("voc"), &cfg).unwrap();
    write_folder(dir.path().join("folder"), &cfg, FolderMaskStyle::Index).unwrap();
    assert_eq!(
        DatasetFormat::detect(dir.path().join("voc")).unwrap(),
        DatasetFormat::Voc
    );
    assert_eq!(
        DatasetFormat::detect(dir.path().join("folder")).unwrap(),
        DatasetFormat::Folder
    );
    assert!(DatasetFormat::detect(dir.path()).is_err());
    let ds = Dataset::open(dir.path().join("folder"), None, ErrorPolicy::Fail).unwrap();
    assert_eq!(ds.len(), 2);
}
