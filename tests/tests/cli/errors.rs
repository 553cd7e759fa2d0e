//! Bad input gives one `error: ...` line naming the file or flag, and a non-zero exit status.

use crate::common::fixture;
use deeplab_e2e::{deeplab, read_safetensors, scratch, write_safetensors};

#[test]
fn missing_weight_file() {
    let f = fixture();
    let data = f.data.display().to_string();
    deeplab(&[
        "eval",
        "--data",
        &data,
        "--weights",
        "no/such/weights.safetensors",
    ])
    .one_line_error(&["no/such/weights.safetensors"]);
    let img = f
        .data
        .join("JPEGImages")
        .join("val_0000.jpg")
        .display()
        .to_string();
    deeplab(&["predict", "--weights", "missing-file.safetensors", &img])
        .one_line_error(&["missing-file.safetensors"]);
    // an unknown name that is not a path either
    deeplab(&["eval", "--data", &data, "--weights", "xception65_coco_voc"])
        .one_line_error(&["--weights", "xception65_coco_voc"]);
}

#[test]
fn weight_file_of_another_architecture_names_the_tensor() {
    let f = fixture();
    let t = scratch("arch");
    let data = f.data.display().to_string();
    // the fixture's tensors under a configuration with wider ASPP branches
    let mut st = read_safetensors(&f.model);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&st.metadata["deeplab_config"]).expect("config");
    cfg["aspp"]["channels"] = serde_json::json!(32);
    st.metadata.insert("deeplab_config".into(), cfg.to_string());
    let wrong = t.path().join("wider-aspp.safetensors");
    write_safetensors(&wrong, &st);
    let w = wrong.display().to_string();
    deeplab(&["eval", "--data", &data, "--weights", &w]).one_line_error(&[
        "wider-aspp.safetensors",
        "aspp.",
        "shape",
    ]);
    // a tensor missing altogether
    let mut st = read_safetensors(&f.model);
    st.tensors.remove("classifier.bias");
    let missing = t.path().join("no-bias.safetensors");
    write_safetensors(&missing, &st);
    let m = missing.display().to_string();
    let img = f
        .data
        .join("JPEGImages")
        .join("val_0000.jpg")
        .display()
        .to_string();
    deeplab(&["predict", "--weights", &m, &img])
        .one_line_error(&["no-bias.safetensors", "missing tensor 'classifier.bias'"]);
    // fine-tuning from weights of another backbone names the first missing tensor
    let out = t.path().join("run").display().to_string();
    let model = f.model.display().to_string();
    deeplab(&[
        "train",
        "--data",
        &data,
        "--out",
        &out,
        "--backbone",
        "mobilenetv2_100",
        "--aspp-channels",
        "16",
        "--decoder-channels",
        "16",
        "--decoder-projection",
        "8",
        "--crop",
        "65",
        "--steps",
        "1",
        "--init",
        &model,
    ])
    .one_line_error(&["model.safetensors", "tensor '", "has shape"]);
    // a truncated file
    let bytes = std::fs::read(&f.model).expect("model");
    let cut = t.path().join("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let c = cut.display().to_string();
    deeplab(&["eval", "--data", &data, "--weights", &c]).one_line_error(&["truncated.safetensors"]);
}

#[test]
fn image_that_cannot_be_decoded() {
    let f = fixture();
    let t = scratch("decode");
    let bad = t.path().join("broken.jpg");
    std::fs::write(&bad, b"this is not a JPEG").expect("write");
    let (b, model) = (bad.display().to_string(), f.model.display().to_string());
    let out = t.path().join("o").display().to_string();
    deeplab(&["predict", &b, "--weights", &model, "--out", &out]).one_line_error(&["broken.jpg"]);
    // a truncated real JPEG
    let jpg = std::fs::read(f.data.join("JPEGImages").join("val_0001.jpg")).expect("jpeg");
    let cut = t.path().join("cut.jpg");
    std::fs::write(&cut, &jpg[..jpg.len() * 2 / 3]).expect("write");
    let c = cut.display().to_string();
    deeplab(&["predict", &c, "--weights", &model, "--out", &out]).one_line_error(&["cut.jpg"]);
    deeplab(&["predict", "nope.png", "--weights", &model, "--out", &out])
        .one_line_error(&["nope.png"]);
}

#[test]
fn output_directory_that_cannot_be_written() {
    let f = fixture();
    let t = scratch("out");
    let file = t.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let blocked = file.join("sub");
    let (bl, data, model) = (
        blocked.display().to_string(),
        f.data.display().to_string(),
        f.model.display().to_string(),
    );
    let img = f
        .data
        .join("JPEGImages")
        .join("val_0000.jpg")
        .display()
        .to_string();
    deeplab(&["predict", &img, "--weights", &model, "--out", &bl]).one_line_error(&["a-file/sub"]);
    deeplab(&["eval", "--data", &data, "--weights", &model, "--out", &bl])
        .one_line_error(&["a-file/sub"]);
    deeplab(&deeplab_e2e::tiny_train_args(&data, &bl, "1")).one_line_error(&["a-file/sub"]);
    let json = file.join("m.json").display().to_string();
    deeplab(&[
        "eval",
        "--data",
        &data,
        "--weights",
        &model,
        "--json",
        &json,
    ])
    .one_line_error(&["a-file"]);
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"x",
        "the user's file is untouched"
    );
}

#[test]
fn unknown_dataset_layout_and_bad_flags() {
    let f = fixture();
    let t = scratch("layout");
    let empty = t.path().join("not-a-dataset");
    std::fs::create_dir_all(empty.join("pictures")).expect("mkdir");
    let (e, model) = (empty.display().to_string(), f.model.display().to_string());
    deeplab(&["eval", "--data", &e, "--weights", &model]).one_line_error(&["not-a-dataset"]);
    let data = f.data.display().to_string();
    deeplab(&[
        "eval",
        "--data",
        &data,
        "--weights",
        &model,
        "--split",
        "nosuchsplit",
    ])
    .one_line_error(&["nosuchsplit"]);
    deeplab(&[
        "eval",
        "--data",
        &data,
        "--weights",
        &model,
        "--scales",
        "1,abc",
    ])
    .one_line_error(&["--scales", "abc"]);
    deeplab(&[
        "eval",
        "--data",
        &data,
        "--weights",
        &model,
        "--preprocess",
        "stretch",
    ])
    .one_line_error(&["--preprocess", "stretch"]);
    deeplab(&["eval", "--data", &data]).one_line_error(&["--weights"]);
    deeplab(&["info", "--backbone", "resnet7"]).one_line_error(&["--backbone", "resnet7"]);
    deeplab(&["bench", "--output-stride", "12"]).one_line_error(&["--output-stride"]);
}
