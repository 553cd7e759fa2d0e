//! `deeplab train`: the loss goes down, checkpoints are written, a resumed run reproduces the
//! uninterrupted run bit for bit, a run killed while writing a checkpoint leaves the previous
//! one loadable, and a NaN loss stops the run with a clear error.

use crate::common::fixture;
use deeplab_e2e::{deeplab, deeplab_bin, read_safetensors, scratch, tiny_train_args};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn log_losses(path: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|v| v["type"] == "train")
        .map(|v| v["loss"].as_f64().expect("loss"))
        .collect()
}

#[test]
fn train_lowers_the_loss_and_resume_is_bit_identical() {
    let f = fixture();
    let t = scratch("train");
    let data = f.data.display().to_string();
    let a = t.path().join("a");
    let b = t.path().join("b");
    let (ap, bp) = (a.display().to_string(), b.display().to_string());

    // uninterrupted: 8 steps, checkpoints at 4 and 8, validation at the end
    let mut args = tiny_train_args(&data, &ap, "8");
    args.extend(["--checkpoint-every", "4", "--val-split", "val"]);
    let run = deeplab(&args).ok();
    assert!(run.stdout.contains("validation mIoU"), "{}", run.stdout);
    let losses = log_losses(&a.join("train.jsonl"));
    assert_eq!(losses.len(), 8);
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[6] + losses[7]) / 2.0;
    assert!(last < first, "the loss did not go down: {losses:?}");
    assert!(a.join("checkpoint.safetensors").is_file());
    let curves = deeplab_data::image::open(a.join("curves.png"))
        .expect("curves.png")
        .to_rgb8();
    assert!(curves.width() >= 400 && curves.height() >= 400);
    let val_lines = std::fs::read_to_string(a.join("train.jsonl"))
        .expect("log")
        .lines()
        .filter(|l| l.contains("\"val_miou\""))
        .count();
    assert_eq!(val_lines, 1);

    // interrupted after step 4, then resumed
    let mut args = tiny_train_args(&data, &bp, "8");
    args.extend([
        "--checkpoint-every",
        "4",
        "--val-split",
        "val",
        "--stop-after",
        "4",
    ]);
    deeplab(&args).ok();
    let half = read_safetensors(&b.join("checkpoint.safetensors"));
    let state: serde_json::Value =
        serde_json::from_str(&half.metadata["deeplab_train_state"]).expect("state");
    assert_eq!(state["step"], 4);
    // without --resume the directory is refused, so nothing is overwritten
    deeplab(&args).one_line_error(&["--resume"]);
    let mut args = tiny_train_args(&data, &bp, "8");
    args.extend(["--checkpoint-every", "4", "--val-split", "val", "--resume"]);
    deeplab(&args).ok();

    for file in ["model.safetensors", "checkpoint.safetensors"] {
        let x = read_safetensors(&a.join(file));
        let y = read_safetensors(&b.join(file));
        assert_eq!(
            x.tensors.keys().collect::<Vec<_>>(),
            y.tensors.keys().collect::<Vec<_>>(),
            "{file}"
        );
        for (name, tx) in &x.tensors {
            assert!(
                tx == &y.tensors[name],
                "{file}: tensor '{name}' differs after resuming"
            );
        }
        assert!(
            x.tensors
                .keys()
                .any(|k| k.starts_with("optimizer.momentum."))
                == (file == "checkpoint.safetensors")
        );
    }
    // the log of the resumed run equals the uninterrupted one, line for line (but the speed)
    let strip = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .expect("log")
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("line");
                v.as_object_mut().map(|o| o.remove("images_per_s"));
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(&a.join("train.jsonl")), strip(&b.join("train.jsonl")));
}

#[test]
fn a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable() {
    let f = fixture();
    let t = scratch("kill");
    let data = f.data.display().to_string();
    let out = t.path().join("run");
    let op = out.display().to_string();
    let mut args = tiny_train_args(&data, &op, "6");
    args.extend(["--checkpoint-every", "2"]);
    let mut child = Command::new(deeplab_bin())
        .arg("--quiet")
        .args(&args)
        .env("DEEPLAB_TEST_WRITE_DELAY_MS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning deeplab train");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = 0;
    let mut transcript = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        transcript += &line;
        transcript.push('\n');
        if line.contains("halfway through writing") && line.contains("checkpoint.safetensors") {
            seen += 1;
            if seen == 2 {
                // the second checkpoint (step 4) is half written: kill the process now
                child.kill().expect("killing deeplab");
                break;
            }
        }
    }
    let status = child.wait().expect("waiting for deeplab");
    assert!(
        seen == 2 && !status.success(),
        "the run was not killed mid-write:\n{transcript}"
    );

    // the checkpoint of step 2 is intact and loadable
    let ckpt = out.join("checkpoint.safetensors");
    let st = read_safetensors(&ckpt);
    let state: serde_json::Value =
        serde_json::from_str(&st.metadata["deeplab_train_state"]).expect("state");
    assert_eq!(state["step"], 2);
    let cp = ckpt.display().to_string();
    let info = deeplab(&["info", "--weights", &cp, "--size", "65"]).ok();
    assert!(info.stdout.contains("parameters"), "{}", info.stdout);
    let mp = out.join("model.safetensors").display().to_string();
    deeplab(&["eval", "--data", &data, "--weights", &mp, "--limit", "2"]).ok();
    deeplab(&["eval", "--data", &data, "--weights", &cp, "--limit", "2"]).ok();
    // and the run continues from it
    let mut args = tiny_train_args(&data, &op, "6");
    args.extend(["--checkpoint-every", "2", "--resume"]);
    let r = deeplab(&args).ok();
    assert!(r.stdout.contains("trained steps 2..6"), "{}", r.stdout);
}

/// f32 values of a raw little-endian tensor.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn initialization_from_imagenet_backbone_and_from_a_full_checkpoint() {
    let f = fixture();
    let t = scratch("init");
    let data = f.data.display().to_string();
    // a timm-style backbone file: the fixture's backbone tensors without the `backbone.`
    // prefix, plus an ImageNet classifier the model does not use
    let mut st = read_safetensors(&f.model);
    let mut timm = deeplab_e2e::SafeTensors {
        tensors: std::collections::BTreeMap::new(),
        metadata: std::collections::BTreeMap::new(),
    };
    for (k, v) in &st.tensors {
        if let Some(rest) = k.strip_prefix("backbone.") {
            timm.tensors.insert(rest.to_string(), v.clone());
        }
    }
    timm.tensors.insert(
        "classifier.weight".into(),
        ("F32".into(), vec![2, 2], vec![0u8; 16]),
    );
    let timm_path = t.path().join("timm_mobilenetv2_050.safetensors");
    deeplab_e2e::write_safetensors(&timm_path, &timm);
    let out = t.path().join("from-backbone");
    let (tp, op) = (timm_path.display().to_string(), out.display().to_string());
    let mut args = tiny_train_args(&data, &op, "1");
    let lr = args.iter().position(|a| *a == "--lr").expect("--lr") + 1;
    args[lr] = "1e-9";
    args.extend(["--init-backbone", &tp]);
    let r = deeplab(&args).ok();
    assert!(r.stderr.contains("backbone tensors from"), "{}", r.stderr);
    // after one step at a negligible learning rate the backbone convolutions are the file's
    let trained = read_safetensors(&out.join("model.safetensors"));
    let key = "backbone.conv_stem.weight";
    let (a, b) = (f32s(&trained.tensors[key].2), f32s(&st.tensors[key].2));
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6),
        "{key} was not loaded"
    );
    // the head was not: it comes from the seeded initialization
    let key = "classifier.weight";
    assert_ne!(f32s(&trained.tensors[key].2), f32s(&st.tensors[key].2));

    // fine-tuning a full checkpoint on a dataset with other classes re-initializes only the
    // classifier: a 3-class copy of the dataset's classes.txt is not needed, the file's
    // classifier is given another shape instead
    let (dtype, _, bytes) = st.tensors["classifier.weight"].clone();
    let cin = bytes.len() / 4 / 5;
    st.tensors.insert(
        "classifier.weight".into(),
        (dtype.clone(), vec![7, cin, 1, 1], vec![0u8; 7 * cin * 4]),
    );
    st.tensors
        .insert("classifier.bias".into(), (dtype, vec![7], vec![0u8; 28]));
    let other = t.path().join("seven-classes.safetensors");
    deeplab_e2e::write_safetensors(&other, &st);
    let out = t.path().join("finetune");
    let (o, p) = (other.display().to_string(), out.display().to_string());
    let mut args = tiny_train_args(&data, &p, "1");
    args.extend(["--init", &o]);
    let r = deeplab(&args).ok();
    assert!(
        r.stderr
            .contains("re-initialized classifier.bias, classifier.weight"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_nan_loss_stops_training_with_a_clear_error() {
    let f = fixture();
    let t = scratch("nan");
    let data = f.data.display().to_string();
    let op = t.path().join("run").display().to_string();
    let mut args = tiny_train_args(&data, &op, "20");
    let lr = args.iter().position(|a| *a == "--lr").expect("--lr") + 1;
    args[lr] = "1e30";
    let line = deeplab(&args).final_error_line(&["training stopped", "loss is"]);
    assert!(line.contains("NaN") || line.contains("inf"), "{line}");
}
