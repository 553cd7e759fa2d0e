//! The bundled sample: `deeplab eval` with no arguments evaluates the committed model on the
//! committed dataset and prints the real table; `deeplab predict` with no image writes a mask.

use deeplab_e2e::{deeplab, deeplab_in, scratch, workspace_root};

#[test]
fn eval_without_arguments_evaluates_the_bundled_sample() {
    let r = deeplab(&["eval"]).ok();
    assert!(r.stdout.contains("bundled sample"), "{}", r.stdout);
    for class in [
        "background",
        "disc",
        "square",
        "triangle",
        "stripes",
        "mIoU",
    ] {
        assert!(r.stdout.contains(class), "no '{class}' in:\n{}", r.stdout);
    }
    // the model has learned the shapes: far above chance (20% for 5 classes)
    let miou: f64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("mIoU "))
        .and_then(|l| l.split('%').next())
        .and_then(|v| v.trim().parse().ok())
        .expect("an mIoU line");
    assert!(miou > 50.0, "bundled model mIoU {miou}%:\n{}", r.stdout);
}

#[test]
fn predict_without_arguments_writes_a_mask_of_a_bundled_image() {
    let t = scratch("sample-predict");
    let r = deeplab_in(t.path(), &["predict"], &[]).ok();
    assert!(r.stdout.contains("val_0003"), "{}", r.stdout);
    let mask = t.path().join("predictions").join("val_0003_mask.png");
    let img = deeplab_data::image::open(&mask)
        .expect("mask PNG")
        .to_rgb8();
    let src = deeplab_data::io::read_rgb_image(
        workspace_root().join("datasets/sample/JPEGImages/val_0003.jpg"),
    )
    .expect("sample image");
    assert_eq!(img.dimensions(), src.dimensions());
    // more than one class is predicted
    let first = img.get_pixel(0, 0).0;
    assert!(img.pixels().any(|p| p.0 != first), "a single-color mask");
}
