//! Canonical weight files: the configuration travels in the metadata, saving is atomic, and
//! every way a file can be wrong gives an error naming the file and the tensor.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deeplab_heads::weights::{read_config, save_varmap, save_weights, NamedTensor, CONFIG_KEY};
use deeplab_heads::{DeepLabConfig, DeepLabModel, ModelError};
use std::collections::HashMap;
use std::path::Path;

fn small_config() -> DeepLabConfig {
    let mut c = DeepLabConfig::mobilenetv2_v3plus(4);
    c.backbone = deeplab_backbones::BackboneConfig::from_name("mobilenetv2_050").expect("backbone");
    c
}

/// A trained-like model in a VarMap, saved; returns the path and the VarMap's output on `x`.
fn saved_model(dir: &Path, x: &Tensor) -> (std::path::PathBuf, Tensor) {
    let cfg = small_config();
    let vm = VarMap::new();
    let model = DeepLabModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .expect("model");
    // Non-trivial BatchNorm statistics: one training step updates them in the VarMap.
    let xb = Tensor::cat(&[x, &x.flip(&[3]).expect("flip")], 0).expect("batch");
    model.forward_t(&xb, true).expect("train forward");
    let y = model.forward_t(x, false).expect("forward");
    let path = dir.join("m.safetensors");
    save_varmap(&path, &cfg, &vm).expect("save");
    (path, y)
}

fn tensors_of(path: &Path) -> HashMap<String, Tensor> {
    deeplab_heads::weights::read_weights(path, &Device::Cpu)
        .expect("read")
        .tensors
}

fn rewrite(path: &Path, cfg: &DeepLabConfig, t: &HashMap<String, Tensor>) {
    let named: Vec<NamedTensor> = t
        .iter()
        .map(|(n, v)| NamedTensor::from_tensor(n, v).expect("named"))
        .collect();
    save_weights(path, cfg, &named).expect("save");
}

#[test]
fn save_and_load_roundtrip_reproduces_the_outputs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let x = Tensor::randn(0f32, 1.0, (1, 3, 41, 37), &Device::Cpu).expect("x");
    let (path, want) = saved_model(tmp.path(), &x);
    assert_eq!(read_config(&path).expect("config"), small_config());
    let model = DeepLabModel::load(&path, &Device::Cpu).expect("load");
    assert_eq!(model.config(), &small_config());
    let got = model.forward_t(&x, false).expect("forward");
    let diff = (&got - &want)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0));
    assert_eq!(diff.and_then(|d| d.to_scalar::<f32>()).expect("diff"), 0.0);
    // No temporary files are left beside the output.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("dir")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn missing_misshaped_and_extra_tensors_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let x = Tensor::zeros((1, 3, 33, 33), DType::F32, &Device::Cpu).expect("x");
    let (path, _) = saved_model(tmp.path(), &x);
    let cfg = small_config();
    let all = tensors_of(&path);

    let mut t = all.clone();
    t.remove("decoder.convs.1.bn_pw.running_var");
    let p = tmp.path().join("missing.safetensors");
    rewrite(&p, &cfg, &t);
    let e = DeepLabModel::load(&p, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("missing.safetensors") && msg.contains("decoder.convs.1.bn_pw.running_var"),
        "{msg}"
    );

    let mut t = all.clone();
    t.insert(
        "classifier.weight".into(),
        Tensor::zeros((5, 256, 1, 1), DType::F32, &Device::Cpu).expect("z"),
    );
    let p = tmp.path().join("shape.safetensors");
    rewrite(&p, &cfg, &t);
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("shape.safetensors")
            && msg.contains("classifier.weight")
            && msg.contains("[4, 256, 1, 1]"),
        "{msg}"
    );

    let mut t = all.clone();
    t.insert(
        "aspp.convs.4.conv.weight".into(),
        Tensor::zeros((1,), DType::F32, &Device::Cpu).expect("z"),
    );
    let p = tmp.path().join("extra.safetensors");
    rewrite(&p, &cfg, &t);
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("extra.safetensors") && msg.contains("aspp.convs.4.conv.weight"),
        "{msg}"
    );

    // The weights of one architecture under the config of another: the first missing tensor.
    let other = DeepLabConfig::mobilenetv2_v3(4);
    let p = tmp.path().join("other.safetensors");
    rewrite(&p, &other, &all);
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("other.safetensors") && msg.contains("backbone."),
        "{msg}"
    );
}

#[test]
fn broken_files_give_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let x = Tensor::zeros((1, 3, 33, 33), DType::F32, &Device::Cpu).expect("x");
    let (path, _) = saved_model(tmp.path(), &x);
    let bytes = std::fs::read(&path).expect("bytes");

    let p = tmp.path().join("nope.safetensors");
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope.safetensors"), "{msg}");

    let p = tmp.path().join("trunc.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).expect("write");
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("trunc.safetensors"), "{msg}");

    let p = tmp.path().join("garbage.safetensors");
    std::fs::write(&p, b"not a safetensors file at all").expect("write");
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("garbage.safetensors"), "{msg}");
    assert!(read_config(&p).is_err());

    // A plain safetensors file without the config.
    let p = tmp.path().join("plain.safetensors");
    let t = HashMap::from([(
        "a".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).expect("z"),
    )]);
    candle_core::safetensors::save(&t, &p).expect("save");
    let e = DeepLabModel::load(&p, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, ModelError::MissingConfig { .. }) && e.to_string().contains(CONFIG_KEY),
        "{e}"
    );
    assert!(matches!(
        read_config(&p),
        Err(ModelError::MissingConfig { .. })
    ));

    // An invalid config in the metadata.
    let mut cfg = small_config();
    cfg.decoder.as_mut().expect("decoder").num_convs = 7;
    let p = tmp.path().join("badcfg.safetensors");
    save_weights(&p, &cfg, &[]).expect("save");
    let msg = DeepLabModel::load(&p, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("badcfg.safetensors") && msg.contains("num_convs"),
        "{msg}"
    );

    // Saving into a directory that does not exist fails and creates nothing.
    let p = tmp.path().join("no_dir/x.safetensors");
    let msg = save_weights(&p, &small_config(), &[])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("x.safetensors"), "{msg}");
}

/// The little-endian bytes of a tensor of 16-bit values, `bits` giving each value's bits.
fn le_bytes<T: candle_core::WithDType>(t: &Tensor, bits: fn(T) -> u16) -> Vec<u8> {
    let vals: Vec<T> = t.flatten_all().and_then(|t| t.to_vec1()).expect("vals");
    vals.into_iter()
        .flat_map(|v| bits(v).to_le_bytes())
        .collect()
}

/// Writes `tensors` to `path` in `dtype` (F16 or BF16) with `cfg` in the metadata.
fn write_half(path: &Path, cfg: &DeepLabConfig, tensors: &HashMap<String, Tensor>, dtype: DType) {
    let (st_dtype, bits): (_, fn(&Tensor) -> Vec<u8>) = match dtype {
        DType::BF16 => (safetensors::Dtype::BF16, |t| {
            le_bytes(t, half::bf16::to_bits)
        }),
        DType::F16 => (safetensors::Dtype::F16, |t| le_bytes(t, half::f16::to_bits)),
        other => panic!("not a half dtype: {other:?}"),
    };
    let data: Vec<(&str, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, v)| {
            let bytes = bits(&v.to_dtype(dtype).expect("cast"));
            (n.as_str(), bytes, v.dims().to_vec())
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s)| {
            let view = safetensors::tensor::TensorView::new(st_dtype, s.clone(), b).expect("view");
            (*n, view)
        })
        .collect();
    let json = serde_json::to_string(cfg).expect("json");
    let meta = HashMap::from([(CONFIG_KEY.to_string(), json)]);
    let bytes = safetensors::tensor::serialize(views, Some(meta)).expect("ser");
    std::fs::write(path, bytes).expect("write");
}

/// A file stored in f16 or bf16 loads to exactly the network of its values: its outputs equal,
/// bit for bit, those of an f32 file holding the same (rounded) values. How far the rounding
/// itself moves a network is a property of the weights, not of loading, and is not asserted here.
#[test]
fn half_precision_files_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let x = Tensor::randn(0f32, 1.0, (1, 3, 33, 33), &Device::Cpu).expect("x");
    let (path, _) = saved_model(tmp.path(), &x);
    let t = tensors_of(&path);
    let cfg = small_config();
    for dtype in [DType::BF16, DType::F16] {
        let half_path = tmp.path().join(format!("{dtype:?}.safetensors"));
        write_half(&half_path, &cfg, &t, dtype);
        let rounded: HashMap<String, Tensor> = t
            .iter()
            .map(|(n, v)| {
                let r = v.to_dtype(dtype).and_then(|h| h.to_dtype(DType::F32));
                (n.clone(), r.expect("round"))
            })
            .collect();
        let rounded_path = tmp.path().join(format!("{dtype:?}-as-f32.safetensors"));
        rewrite(&rounded_path, &cfg, &rounded);

        let half_model = DeepLabModel::load(&half_path, &Device::Cpu).expect("load half");
        let f32_model = DeepLabModel::load(&rounded_path, &Device::Cpu).expect("load f32");
        let a = half_model.forward_t(&x, false).expect("a");
        let b = f32_model.forward_t(&x, false).expect("b");
        assert_eq!(a.dtype(), DType::F32, "{dtype:?} files load to f32 weights");
        let diff = (&a - &b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(
            diff, 0.0,
            "{dtype:?} file and its f32 twin differ by {diff}"
        );
    }
}
