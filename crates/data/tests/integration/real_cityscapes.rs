//! The real Cityscapes sample from ../shared: labelIds -> trainIds through the embedded table, the
//! table against the official CSV, and the native layout.

use deeplab_data::io::{read_mask, RawMask};
use deeplab_data::{CityscapesLabels, Dataset, ErrorPolicy, CITYSCAPES_LABELS};

use crate::common::shared;

#[test]
fn label_ids_mapped_by_the_table_agree_with_train_ids() {
    let Some(root) = shared(
        "cityscapes",
        "label_ids_mapped_by_the_table_agree_with_train_ids",
    ) else {
        return;
    };
    let ds = Dataset::cityscapes_with(&root, "val", CityscapesLabels::LabelIds, ErrorPolicy::Fail)
        .unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.num_classes(), 19);
    let s = ds.load(0).unwrap();
    assert_eq!(s.id, "frankfurt_000000_000294");
    assert_eq!(s.image.dimensions(), (256, 128));
    let train_path =
        root.join("gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png");
    let RawMask::Index { data: train, .. } = read_mask(&train_path).unwrap() else {
        panic!("labelTrainIds is grayscale");
    };
    let same = s
        .label
        .as_slice()
        .iter()
        .zip(&train)
        .filter(|(a, b)| a == b)
        .count();
    let agreement = same as f64 / train.len() as f64;
    println!(
        "cityscapes labelIds->trainIds agreement: {same}/{} = {:.4}%",
        train.len(),
        100.0 * agreement
    );
    assert!(agreement >= 0.997, "agreement {agreement}");
    assert!(s.label.as_slice().iter().all(|&v| v < 19 || v == 255));
}

#[test]
fn auto_reads_label_train_ids_when_present() {
    let Some(root) = shared("cityscapes", "auto_reads_label_train_ids_when_present") else {
        return;
    };
    let ds = Dataset::cityscapes(&root, "val").unwrap();
    assert!(ds.entries()[0]
        .mask
        .to_string_lossy()
        .ends_with("_gtFine_labelTrainIds.png"));
    let s = ds.load(0).unwrap();
    let RawMask::Index { data, .. } = read_mask(&ds.entries()[0].mask).unwrap() else {
        panic!("grayscale expected");
    };
    assert_eq!(s.label.as_slice(), &data[..]);
    // the split directory must exist
    let err = Dataset::cityscapes(&root, "train").unwrap_err();
    assert!(err.to_string().contains("leftImg8bit/train"), "{err}");
}

#[test]
fn embedded_table_matches_the_official_csv() {
    let Some(csv) = shared(
        "cityscapes/cityscapes_labels.csv",
        "embedded_table_matches_the_official_csv",
    ) else {
        return;
    };
    let text = std::fs::read_to_string(csv).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 35);
    assert_eq!(CITYSCAPES_LABELS.len(), 35);
    for (row, label) in rows.iter().zip(CITYSCAPES_LABELS.iter()) {
        assert_eq!(row[0], label.name);
        assert_eq!(row[1].parse::<i16>().unwrap(), label.id, "{}", label.name);
        assert_eq!(
            row[2].parse::<i16>().unwrap(),
            label.train_id,
            "{}",
            label.name
        );
        assert_eq!(row[3], label.category, "{}", label.name);
        assert_eq!(
            row[4].parse::<u8>().unwrap(),
            label.category_id,
            "{}",
            label.name
        );
        assert_eq!(row[5] == "True", label.has_instances, "{}", label.name);
        assert_eq!(row[6] == "True", label.ignore_in_eval, "{}", label.name);
        let color: [u8; 3] = [
            row[7].parse().unwrap(),
            row[8].parse().unwrap(),
            row[9].parse().unwrap(),
        ];
        assert_eq!(color, label.color, "{}", label.name);
    }
}
