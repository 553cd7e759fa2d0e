//! TFLite import: TensorFlow's published DeepLabv3 TFLite models convert into canonical weight
//! files whose models reproduce the TFLite interpreter's logits and argmax maps on real VOC
//! images (`../shared/reference/tflite`), and malformed or truncated files fail with errors that
//! name the file and leave the output untouched.
//!
//! Scoring protocol (used identically for our maps and the interpreter's): a prediction map is
//! brought back to the ground-truth mask's size with nearest-neighbour sampling (pixel centres,
//! `src = floor((dst + 0.5) * in / out)`): the whole 257x257 map of the float model (the image was
//! stretched to 257x257), the valid (unpadded) top-left region of the 513x513 map of the
//! quantized model. It is then scored against the original-resolution VOC mask with
//! `deeplab_data::ConfusionMatrix` (void = 255 ignored), one matrix over the 12 images.

use candle_core::{Device, Tensor};
use deeplab_backbones::{BackboneConfig, MobileNetV2Config, OutputStride};
use deeplab_data::io::{read_mask, read_rgb_image, RawMask};
use deeplab_data::{
    resize_bilinear_pil, resize_long_side_padded, ConfusionMatrix, Dataset, RgbImage,
};
use deeplab_heads::tflite::{
    convert_tflite, identity_running_var, looks_like_tflite, read_tflite, TfliteOptions,
    TfliteOutput, WeightEncoding,
};
use deeplab_heads::{DeepLabConfig, DeepLabModel, InputNormalization, ModelError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const FLOAT: &str = "tflite/deeplabv3_257_mv_gpu.tflite";
const QUANT: &str = "tflite/deeplabv3_mnv2_pascal_quant.tflite";

/// `../shared/reference/<rel>`, or `None` after printing one line saying what `what` skips.
fn shared(rel: &str, what: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipping {what}: {} is absent (the shared reference folder is not here)",
            p.display()
        );
        None
    }
}

/// A raw RGB image as a `[1, 3, H, W]` f32 batch of 0..255 pixels.
fn raw_nchw(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut v = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            v[c * h * w + i] = p.0[c] as f32;
        }
    }
    Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).expect("tensor")
}

/// Our argmax map (row-major) of raw pixels, normalized as the file says.
fn predict(model: &DeepLabModel, img: &RgbImage) -> Vec<u8> {
    let x = model.normalize(&raw_nchw(img)).expect("normalize");
    let p = model.predict(&x).expect("predict");
    p.flatten_all()
        .expect("flatten")
        .to_vec1::<u32>()
        .expect("u32")
        .into_iter()
        .map(|v| v as u8)
        .collect()
}

/// A grayscale / palette PNG's values and size.
fn read_labels(path: &Path) -> (usize, usize, Vec<u8>) {
    match read_mask(path).expect("read label png") {
        RawMask::Index {
            width,
            height,
            data,
        } => (width as usize, height as usize, data),
        RawMask::Color { .. } => panic!("{}: expected a single-channel PNG", path.display()),
    }
}

/// Nearest-neighbour resampling of the `(vw, vh)` top-left region of a `stride`-wide map to
/// `(w, h)` (pixel centres).
fn nearest(map: &[u8], stride: usize, (vw, vh): (usize, usize), (w, h): (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let sy = (((y as f64 + 0.5) * vh as f64 / h as f64) as usize).min(vh - 1);
        for x in 0..w {
            let sx = (((x as f64 + 0.5) * vw as f64 / w as f64) as usize).min(vw - 1);
            out.push(map[sy * stride + sx]);
        }
    }
    out
}

/// Fraction of equal labels over the `(vw, vh)` top-left region of two `stride`-wide maps.
fn agreement(a: &[u8], b: &[u8], stride: usize, (vw, vh): (usize, usize)) -> f64 {
    let mut same = 0usize;
    for y in 0..vh {
        for x in 0..vw {
            same += usize::from(a[y * stride + x] == b[y * stride + x]);
        }
    }
    same as f64 / (vw * vh) as f64
}

fn val_small() -> Option<Dataset> {
    let root = shared("voc2012/val_small", "VOC val_small checks")?;
    Some(Dataset::voc(&root, "val").expect("val_small opens as VOC"))
}

fn converted(rel: &str, dir: &Path) -> Option<(DeepLabModel, deeplab_heads::tflite::TfliteReport)> {
    let src = shared(rel, &format!("the {rel} checks"))?;
    let out = dir.join("model.safetensors");
    let t = Instant::now();
    let report = convert_tflite(&src, &out, &TfliteOptions::default()).expect("convert");
    println!("{report}\nconverted in {:.2?}", t.elapsed());
    let model = DeepLabModel::load(&out, &Device::Cpu).expect("load the converted file");
    Some((model, report))
}

#[test]
fn float_model_converts_with_the_published_architecture_and_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((model, report)) = converted(FLOAT, dir.path()) else {
        return;
    };
    let c = &report.config;
    assert_eq!(c.backbone.name(), "mobilenetv2_050_deeplab");
    assert_eq!(c.output_stride().value(), 8);
    assert!(c.aspp.image_pooling && c.aspp.atrous_rates.is_empty() && c.decoder.is_none());
    assert_eq!((c.num_classes, c.aspp.channels), (21, 256));
    assert_eq!(c.normalization, InputNormalization::Official);
    assert_eq!(report.layers.len(), 38 + 17);
    assert!(report
        .layers
        .iter()
        .all(|l| l.encoding == WeightEncoding::Float));
    assert!(!report.quantized());
    assert_eq!(
        report.output,
        TfliteOutput::Logits {
            height: 257,
            width: 257,
            classes: 21
        }
    );
    assert_eq!((report.input.height, report.input.width), (257, 257));
    // The layer mapping follows the op sequence: stem first, logits last.
    assert_eq!(report.layers[0].module, "backbone.conv_stem");
    assert_eq!(report.layers[0].bn.as_deref(), Some("backbone.bn1"));
    assert_eq!(
        report.layers.last().map(|l| l.module.as_str()),
        Some("classifier")
    );

    let Some(dir_ref) = shared("tflite/reference_outputs", "the float logits parity") else {
        return;
    };
    let read = |name: &str| {
        let a = deeplab_heads::npy::read_npy(dir_ref.join(name)).expect("npy");
        Tensor::from_vec(a.to_f32(), a.shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.permute((0, 3, 1, 2)))
            .and_then(|t| t.contiguous())
            .expect("nchw")
    };
    // The input is already normalized ((x - 127.5) / 127.5): run the network on it directly.
    let x = read("2007_000129_deeplabv3_257_mv_gpu_input.npy");
    let want = read("2007_000129_deeplabv3_257_mv_gpu_logits.npy");
    let t = Instant::now();
    let got = model.forward_output(&x, false).expect("forward").upsampled;
    let diff = (&got - &want)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    let scale = want
        .abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("scale");
    println!(
        "float model, 2007_000129: max |logits - TFLite| = {diff:.3e} (logits up to {scale:.1}), forward {:.2?}",
        t.elapsed()
    );
    assert!(diff <= 1e-3, "max abs logits difference {diff}");
}

#[test]
fn float_model_matches_the_interpreter_on_val_small() {
    let (Some(ds), Some(refs)) = (
        val_small(),
        shared("tflite/reference_outputs", "the float argmax checks"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((model, _)) = converted(FLOAT, dir.path()) else {
        return;
    };
    let t = Instant::now();
    let mut cm_ours = ConfusionMatrix::new(21).expect("cm");
    let mut cm_own_resize = ConfusionMatrix::new(21).expect("cm");
    let mut cm_tflite = ConfusionMatrix::new(21).expect("cm");
    let mut worst = 1.0f64;
    let mut own_total = 0.0;
    assert_eq!(ds.len(), 12);
    for i in 0..ds.len() {
        let s = ds.load(i).expect("sample");
        let id = &s.id;
        let (mw, mh) = (s.label.width() as usize, s.label.height() as usize);
        let input = read_rgb_image(refs.join(format!("{id}_deeplabv3_257_mv_gpu_input257.png")))
            .expect("input png");
        let (w, h, tfl) =
            read_labels(&refs.join(format!("{id}_deeplabv3_257_mv_gpu_argmax257.png")));
        assert_eq!((w, h), (257, 257));
        let ours = predict(&model, &input);
        let agree = agreement(&ours, &tfl, 257, (257, 257));
        // Our own PIL-compatible resize of the decoded JPEG instead of the exact input.
        let own = resize_bilinear_pil(&s.image, 257, 257).expect("resize");
        let ours_own = predict(&model, &own);
        let agree_own = agreement(&ours_own, &tfl, 257, (257, 257));
        println!(
            "float {id}: argmax agreement {:.3}% (exact input), {:.3}% (our resize of the JPEG)",
            agree * 100.0,
            agree_own * 100.0
        );
        worst = worst.min(agree);
        own_total += agree_own;
        let gt = s.label.as_slice();
        for (cm, map) in [
            (&mut cm_ours, &ours),
            (&mut cm_own_resize, &ours_own),
            (&mut cm_tflite, &tfl),
        ] {
            cm.update(gt, &nearest(map, 257, (257, 257), (mw, mh)))
                .expect("score");
        }
    }
    let (m_ours, m_own, m_tfl) = (
        cm_ours.mean_iou(),
        cm_own_resize.mean_iou(),
        cm_tflite.mean_iou(),
    );
    println!(
        "float model on 12 val_small images: worst per-image agreement {:.3}%, mean agreement with our resize {:.3}%; mIoU ours {m_ours:.4} (exact inputs), {m_own:.4} (our resize), interpreter {m_tfl:.4}; {:.2?}",
        worst * 100.0,
        own_total / 12.0 * 100.0,
        t.elapsed()
    );
    assert!(worst >= 0.995, "worst per-image agreement {worst}");
    assert!(
        own_total / 12.0 >= 0.99,
        "mean agreement with our resize {}",
        own_total / 12.0
    );
    assert!((m_ours - m_tfl).abs() <= 0.005, "mIoU {m_ours} vs {m_tfl}");
    assert!(
        (m_own - m_tfl).abs() <= 0.005,
        "mIoU (our resize) {m_own} vs {m_tfl}"
    );
}

#[test]
fn quantized_model_matches_the_interpreter_on_val_small() {
    let (Some(ds), Some(refs)) = (
        val_small(),
        shared("tflite/reference_outputs", "the quantized argmax checks"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((model, report)) = converted(QUANT, dir.path()) else {
        return;
    };
    let c = &report.config;
    assert_eq!(c.backbone.name(), "mobilenetv2_100");
    assert_eq!(c.output_stride().value(), 16);
    assert!(c.aspp.image_pooling && c.aspp.atrous_rates.is_empty());
    assert!(report.quantized());
    assert!(report
        .layers
        .iter()
        .all(|l| l.encoding == WeightEncoding::PerTensor));
    assert_eq!(
        report.output,
        TfliteOutput::ArgMax {
            height: 513,
            width: 513
        }
    );
    // uint8 input, scale 1/128, zero point 128: (x - 128) / 128.
    let (a, b) = c.normalization.scale_shift();
    assert!(
        (a[0] - 1.0 / 128.0).abs() < 1e-8 && (b[0] + 1.0).abs() < 1e-6,
        "{a:?} {b:?}"
    );

    let t = Instant::now();
    let mut cm_ours = ConfusionMatrix::new(21).expect("cm");
    let mut cm_own_resize = ConfusionMatrix::new(21).expect("cm");
    let mut cm_tflite = ConfusionMatrix::new(21).expect("cm");
    let mut worst = 1.0f64;
    let mut worst_own = 1.0f64;
    for i in 0..ds.len() {
        let s = ds.load(i).expect("sample");
        let id = &s.id;
        let (mw, mh) = (s.label.width() as usize, s.label.height() as usize);
        let input =
            read_rgb_image(refs.join(format!("{id}_deeplabv3_mnv2_pascal_quant_input513.png")))
                .expect("input png");
        let (w, h, tfl) =
            read_labels(&refs.join(format!("{id}_deeplabv3_mnv2_pascal_quant_argmax513.png")));
        assert_eq!((w, h), (513, 513));
        // The valid region: our keep-aspect resize of the JPEG gives its size (and our own input).
        let own = resize_long_side_padded(&s.image, 513, 128).expect("resize");
        let valid = (own.valid_width as usize, own.valid_height as usize);
        let ours = predict(&model, &input);
        let agree = agreement(&ours, &tfl, 513, valid);
        let ours_own = predict(&model, &own.image);
        let agree_own = agreement(&ours_own, &tfl, 513, valid);
        println!(
            "quantized {id}: argmax agreement on the valid {}x{} region {:.3}% (exact input), {:.3}% (our resize of the JPEG)",
            valid.0,
            valid.1,
            agree * 100.0,
            agree_own * 100.0
        );
        worst = worst.min(agree);
        worst_own = worst_own.min(agree_own);
        let gt = s.label.as_slice();
        for (cm, map) in [
            (&mut cm_ours, &ours),
            (&mut cm_own_resize, &ours_own),
            (&mut cm_tflite, &tfl),
        ] {
            cm.update(gt, &nearest(map, 513, valid, (mw, mh)))
                .expect("score");
        }
    }
    let (m_ours, m_own, m_tfl) = (
        cm_ours.mean_iou(),
        cm_own_resize.mean_iou(),
        cm_tflite.mean_iou(),
    );
    println!(
        "quantized model on 12 val_small images: worst per-image agreement {:.3}% (exact inputs), {:.3}% (our resize); mIoU ours {m_ours:.4} (exact inputs), {m_own:.4} (our resize), interpreter {m_tfl:.4}; {:.2?}",
        worst * 100.0,
        worst_own * 100.0,
        t.elapsed()
    );
    assert!(worst >= 0.95, "worst per-image agreement {worst}");
    assert!(
        worst_own >= 0.95,
        "worst per-image agreement with our resize {worst_own}"
    );
    assert!((m_ours - m_tfl).abs() <= 0.02, "mIoU {m_ours} vs {m_tfl}");
    assert!(
        (m_own - m_tfl).abs() <= 0.02,
        "mIoU (our resize) {m_own} vs {m_tfl}"
    );
}

/// Every way a file can be broken gives an error naming it, and the output is left alone.
fn assert_fails_cleanly(input: &Path, out: &Path, what: &str) -> String {
    std::fs::write(out, b"user's file").expect("sentinel");
    let e = convert_tflite(input, out, &TfliteOptions::default())
        .expect_err(&format!("{what} must fail"));
    let msg = e.to_string();
    let name = input.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(msg.contains(name), "{what}: '{msg}' does not name the file");
    assert_eq!(
        std::fs::read(out).expect("sentinel"),
        b"user's file",
        "{what}: the output was touched"
    );
    msg
}

#[test]
fn malformed_files_fail_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.safetensors");
    let p = |n: &str| dir.path().join(n);

    let msg = assert_fails_cleanly(&p("missing.tflite"), &out, "a missing file");
    assert!(
        msg.contains("No such file") || msg.contains("not found"),
        "{msg}"
    );

    std::fs::write(p("empty.tflite"), b"").expect("write");
    let msg = assert_fails_cleanly(&p("empty.tflite"), &out, "an empty file");
    assert!(msg.contains("too short"), "{msg}");

    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend_from_slice(&[0u8; 64]);
    std::fs::write(p("image.tflite"), &png).expect("write");
    let msg = assert_fails_cleanly(&p("image.tflite"), &out, "a file with the wrong magic");
    assert!(msg.contains("TFL3"), "{msg}");
    assert!(!looks_like_tflite(&p("image.tflite")));

    // The identifier, then offsets pointing outside the file.
    let mut bad = vec![0xF0, 0xFF, 0x00, 0x00];
    bad.extend_from_slice(b"TFL3");
    bad.extend_from_slice(&[0xAB; 24]);
    std::fs::write(p("garbage.tflite"), &bad).expect("write");
    assert!(looks_like_tflite(&p("garbage.tflite")));
    let msg = assert_fails_cleanly(&p("garbage.tflite"), &out, "a corrupt flatbuffer");
    assert!(!msg.is_empty());
    let e = read_tflite(&p("garbage.tflite"), &TfliteOptions::default()).expect_err("corrupt");
    assert!(matches!(e, ModelError::Tflite(_)), "{e:?}");
}

#[test]
fn truncated_copies_of_the_real_model_fail_cleanly() {
    let Some(src) = shared(FLOAT, "the truncated-file checks") else {
        return;
    };
    let bytes = std::fs::read(&src).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.safetensors");
    let n = bytes.len();
    for cut in [0, 7, 8, 100, 4096, n / 2, n - 4096] {
        let path = dir.path().join(format!("cut_{cut}.tflite"));
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let msg = assert_fails_cleanly(&path, &out, &format!("a copy cut at {cut} of {n} bytes"));
        println!("cut at {cut}: {msg}");
    }
    // A corrupted identifier.
    let mut copy = bytes.clone();
    copy[4..8].copy_from_slice(b"TFL2");
    let path = dir.path().join("renamed.tflite");
    std::fs::write(&path, &copy).expect("write");
    let msg = assert_fails_cleanly(&path, &out, "a wrong identifier");
    assert!(msg.contains("TFL2") && msg.contains("TFL3"), "{msg}");
}

#[test]
fn looks_like_tflite_on_real_files() {
    let Some(src) = shared(QUANT, "the TFLite sniffing check") else {
        return;
    };
    assert!(looks_like_tflite(&src));
}

/// A TFLite writer for tests: a DeepLabv3-MobileNetV2 graph exported from canonical parameters
/// (BatchNorm folded, TFLite layouts, optionally int8 per-channel weights), so the converter
/// is exercised end to end without `../shared`, and so single ops can be broken on purpose.
mod synthetic {
    use candle_core::{Device, Tensor};
    use deeplab_backbones::BackboneConfig;
    use deeplab_heads::DeepLabConfig;
    use std::collections::HashMap;

    /// One tensor: name, shape, TFLite type code, constant data, quantization
    /// `(scales, zero points, quantized dimension)`.
    #[derive(Clone, Debug)]
    pub struct T {
        pub name: String,
        pub shape: Vec<i32>,
        pub ty: i8,
        pub data: Option<Vec<u8>>,
        pub quant: Option<(Vec<f32>, Vec<i64>, i32)>,
    }

    /// Builtin options (fields in TFLite schema order).
    #[derive(Clone, Debug)]
    pub enum Opts {
        Conv {
            pad: i8,
            stride: i32,
            act: i8,
            dilation: i32,
        },
        Dw {
            pad: i8,
            stride: i32,
            mult: i32,
            act: i8,
            dilation: i32,
        },
        Pool {
            pad: i8,
            stride: i32,
            fw: i32,
            fh: i32,
            act: i8,
        },
        Concat {
            axis: i32,
            act: i8,
        },
        Add {
            act: i8,
        },
        Mul {
            act: i8,
        },
        Resize {
            align_corners: bool,
            half_pixel: bool,
        },
        ArgMax {
            ty: i8,
        },
        Reducer {
            keep_dims: bool,
        },
        Empty,
    }

    #[derive(Clone, Debug)]
    pub struct Op {
        pub code: i32,
        pub inputs: Vec<i32>,
        pub outputs: Vec<i32>,
        pub opts: Opts,
    }

    #[derive(Clone, Debug, Default)]
    pub struct Graph {
        pub tensors: Vec<T>,
        pub ops: Vec<Op>,
        pub inputs: Vec<i32>,
        pub outputs: Vec<i32>,
    }

    impl Graph {
        pub fn tensor(&self, name: &str) -> usize {
            self.tensors
                .iter()
                .position(|t| t.name == name)
                .unwrap_or_else(|| panic!("no tensor {name}"))
        }

        /// The operator producing tensor `name`.
        pub fn op_of(&mut self, name: &str) -> &mut Op {
            let t = self.tensor(name) as i32;
            self.ops
                .iter_mut()
                .find(|o| o.outputs.contains(&t))
                .unwrap_or_else(|| panic!("no op makes {name}"))
        }
    }

    #[derive(Clone, Copy)]
    enum F {
        No,
        I8(i8),
        U8(u8),
        I32(i32),
        U32(u32),
        Ref,
    }

    /// Front-to-back flatbuffer writer: a parent is written before its children and its offset
    /// fields are patched once a child's position is known (flatbuffer offsets point forward).
    struct Fb {
        b: Vec<u8>,
    }

    impl Fb {
        fn pad4(&mut self) {
            let n = self.b.len().next_multiple_of(4);
            self.b.resize(n, 0);
        }

        fn link(&mut self, field: usize, target: usize) {
            let v = (target - field) as u32;
            self.b[field..field + 4].copy_from_slice(&v.to_le_bytes());
        }

        /// A table preceded by its vtable; every present field takes a 4-byte slot. Returns the
        /// table position and each field's position.
        fn table(&mut self, fields: &[F]) -> (usize, Vec<usize>) {
            self.pad4();
            let vt = self.b.len();
            let mut offs = Vec::new();
            let mut o = 4u16;
            for f in fields {
                if matches!(f, F::No) {
                    offs.push(0u16);
                } else {
                    offs.push(o);
                    o += 4;
                }
            }
            self.b.extend(((4 + 2 * fields.len()) as u16).to_le_bytes());
            self.b.extend(o.to_le_bytes());
            for x in &offs {
                self.b.extend(x.to_le_bytes());
            }
            self.pad4();
            let t = self.b.len();
            self.b.extend(((t - vt) as i32).to_le_bytes());
            let mut pos = Vec::new();
            for (f, &off) in fields.iter().zip(&offs) {
                pos.push(t + off as usize);
                let bytes: [u8; 4] = match *f {
                    F::No => continue,
                    F::I8(v) => [v as u8, 0, 0, 0],
                    F::U8(v) => [v, 0, 0, 0],
                    F::I32(v) => v.to_le_bytes(),
                    F::U32(v) => v.to_le_bytes(),
                    F::Ref => [0; 4],
                };
                self.b.extend(bytes);
            }
            (t, pos)
        }

        fn vector(&mut self, n: usize, bytes: &[u8]) -> usize {
            self.pad4();
            let p = self.b.len();
            self.b.extend((n as u32).to_le_bytes());
            self.b.extend_from_slice(bytes);
            p
        }

        fn string(&mut self, s: &str) -> usize {
            let p = self.vector(s.len(), s.as_bytes());
            self.b.push(0);
            p
        }

        /// A vector of `n` table offsets: its position and the slot positions.
        fn tables(&mut self, n: usize) -> (usize, Vec<usize>) {
            let p = self.vector(n, &vec![0u8; 4 * n]);
            (p, (0..n).map(|i| p + 4 + 4 * i).collect())
        }

        fn i32s(&mut self, v: &[i32]) -> usize {
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.vector(v.len(), &b)
        }
    }

    fn options(fb: &mut Fb, o: &Opts) -> (u8, usize) {
        let (member, fields) = match *o {
            Opts::Conv {
                pad,
                stride,
                act,
                dilation,
            } => (
                1,
                vec![
                    F::I8(pad),
                    F::I32(stride),
                    F::I32(stride),
                    F::I8(act),
                    F::I32(dilation),
                    F::I32(dilation),
                ],
            ),
            Opts::Dw {
                pad,
                stride,
                mult,
                act,
                dilation,
            } => (
                2,
                vec![
                    F::I8(pad),
                    F::I32(stride),
                    F::I32(stride),
                    F::I32(mult),
                    F::I8(act),
                    F::I32(dilation),
                    F::I32(dilation),
                ],
            ),
            Opts::Pool {
                pad,
                stride,
                fw,
                fh,
                act,
            } => (
                5,
                vec![
                    F::I8(pad),
                    F::I32(stride),
                    F::I32(stride),
                    F::I32(fw),
                    F::I32(fh),
                    F::I8(act),
                ],
            ),
            Opts::Concat { axis, act } => (10, vec![F::I32(axis), F::I8(act)]),
            Opts::Add { act } => (11, vec![F::I8(act)]),
            Opts::Mul { act } => (21, vec![F::I8(act)]),
            Opts::Resize {
                align_corners,
                half_pixel,
            } => (
                15,
                vec![
                    F::No,
                    F::No,
                    F::U8(align_corners.into()),
                    F::U8(half_pixel.into()),
                ],
            ),
            Opts::ArgMax { ty } => (40, vec![F::I8(ty)]),
            Opts::Reducer { keep_dims } => (27, vec![F::U8(keep_dims.into())]),
            Opts::Empty => (38, vec![]),
        };
        (member, fb.table(&fields).0)
    }

    /// Serializes a one-subgraph TFLite model (schema version 3).
    pub fn serialize(g: &Graph) -> Vec<u8> {
        let mut fb = Fb {
            b: vec![0, 0, 0, 0, b'T', b'F', b'L', b'3'],
        };
        let (root, rf) = fb.table(&[F::U32(3), F::Ref, F::Ref, F::No, F::Ref]);
        fb.b[0..4].copy_from_slice(&(root as u32).to_le_bytes());
        let mut codes: Vec<i32> = Vec::new();
        for op in &g.ops {
            if !codes.contains(&op.code) {
                codes.push(op.code);
            }
        }
        let (v, slots) = fb.tables(codes.len());
        fb.link(rf[1], v);
        for (s, &c) in slots.iter().zip(&codes) {
            let (t, _) = fb.table(&[F::I8(c.min(127) as i8), F::No, F::I32(1), F::I32(c)]);
            fb.link(*s, t);
        }
        let (v, slots) = fb.tables(1);
        fb.link(rf[2], v);
        let (sg, sf) = fb.table(&[F::Ref, F::Ref, F::Ref, F::Ref, F::No]);
        fb.link(slots[0], sg);
        let (v, slots) = fb.tables(g.tensors.len());
        fb.link(sf[0], v);
        let mut buffers: Vec<Option<&[u8]>> = vec![None];
        for (s, t) in slots.iter().zip(&g.tensors) {
            let buf = match &t.data {
                Some(d) => {
                    buffers.push(Some(d));
                    buffers.len() - 1
                }
                None => 0,
            };
            let q = if t.quant.is_some() { F::Ref } else { F::No };
            let (tt, tf) = fb.table(&[F::Ref, F::I8(t.ty), F::U32(buf as u32), F::Ref, q]);
            fb.link(*s, tt);
            let p = fb.i32s(&t.shape);
            fb.link(tf[0], p);
            let p = fb.string(&t.name);
            fb.link(tf[3], p);
            if let Some((scale, zp, dim)) = &t.quant {
                let (qt, qf) =
                    fb.table(&[F::No, F::No, F::Ref, F::Ref, F::No, F::No, F::I32(*dim)]);
                fb.link(tf[4], qt);
                let b: Vec<u8> = scale.iter().flat_map(|x| x.to_le_bytes()).collect();
                let p = fb.vector(scale.len(), &b);
                fb.link(qf[2], p);
                let b: Vec<u8> = zp.iter().flat_map(|x| x.to_le_bytes()).collect();
                let p = fb.vector(zp.len(), &b);
                fb.link(qf[3], p);
            }
        }
        let p = fb.i32s(&g.inputs);
        fb.link(sf[1], p);
        let p = fb.i32s(&g.outputs);
        fb.link(sf[2], p);
        let (v, slots) = fb.tables(g.ops.len());
        fb.link(sf[3], v);
        for (s, op) in slots.iter().zip(&g.ops) {
            let idx = codes.iter().position(|&c| c == op.code).unwrap_or(0) as u32;
            // The options member is patched in once its table is written (after the operator).
            let (ot, of) = fb.table(&[F::U32(idx), F::Ref, F::Ref, F::U8(0), F::Ref]);
            fb.link(*s, ot);
            let p = fb.i32s(&op.inputs);
            fb.link(of[1], p);
            let p = fb.i32s(&op.outputs);
            fb.link(of[2], p);
            let (member, t) = options(&mut fb, &op.opts);
            fb.b[of[3]] = member;
            fb.link(of[4], t);
        }
        let (v, slots) = fb.tables(buffers.len());
        fb.link(rf[4], v);
        for (s, data) in slots.iter().zip(&buffers) {
            match data {
                Some(d) => {
                    let (bt, bf) = fb.table(&[F::Ref]);
                    fb.link(*s, bt);
                    let p = fb.vector(d.len(), d);
                    fb.link(bf[0], p);
                }
                None => {
                    let (bt, _) = fb.table(&[]);
                    fb.link(*s, bt);
                }
            }
        }
        fb.b
    }

    /// Seeded canonical parameters for `config` (conv weights scaled by fan-in, BatchNorm
    /// statistics away from identity so folding matters).
    pub fn params(config: &DeepLabConfig) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        for (i, k) in config.keys().expect("keys").into_iter().enumerate() {
            let u = deeplab_ops::reference::seeded_uniform(&k.shape, 1000 + i as u64, &dev)
                .expect("uniform");
            let t = if k.shape.len() == 4 {
                let fan_in = (k.shape[1] * k.shape[2] * k.shape[3]) as f64;
                (u * (3.0 / fan_in).sqrt()).expect("scale")
            } else if k.name.ends_with(".running_var") {
                u.affine(0.3, 1.0).expect("var")
            } else if k.name.ends_with(".running_mean") || k.name.ends_with(".bias") {
                (u * 0.1).expect("shift")
            } else {
                u.affine(0.2, 1.0).expect("gamma")
            };
            m.insert(k.name.clone(), t);
        }
        m
    }

    const RELU: i8 = 1;
    const RELU6: i8 = 3;
    const NONE: i8 = 0;
    const ACT_SCALE: f32 = 0.05;

    /// Exports `config`'s model with parameters `p` as a TFLite graph for an `h` x `w` input.
    /// `quantized`: uint8 activations, int8 per-channel weights, int32 biases. Returns the graph
    /// and, per canonical tensor, the values the converter must produce (dequantized, folded).
    pub struct Exporter<'a> {
        pub g: Graph,
        p: &'a HashMap<String, Tensor>,
        quantized: bool,
        pub expected: HashMap<String, Vec<f32>>,
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("f32")
    }

    impl<'a> Exporter<'a> {
        fn act(&mut self, name: &str, shape: [usize; 4]) -> i32 {
            let quant = self.quantized.then(|| (vec![ACT_SCALE], vec![0], 0));
            self.g.tensors.push(T {
                name: name.into(),
                shape: shape.iter().map(|&d| d as i32).collect(),
                ty: if self.quantized { 3 } else { 0 },
                data: None,
                quant,
            });
            (self.g.tensors.len() - 1) as i32
        }

        fn konst(
            &mut self,
            name: &str,
            shape: Vec<i32>,
            ty: i8,
            data: Vec<u8>,
            quant: Option<(Vec<f32>, Vec<i64>, i32)>,
        ) -> i32 {
            self.g.tensors.push(T {
                name: name.into(),
                shape,
                ty,
                data: Some(data),
                quant,
            });
            (self.g.tensors.len() - 1) as i32
        }

        fn shape(&self, t: i32) -> [usize; 4] {
            let s = &self.g.tensors[t as usize].shape;
            [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize]
        }

        fn scale_of(&self, t: i32) -> f32 {
            self.g.tensors[t as usize]
                .quant
                .as_ref()
                .map(|q| q.0[0])
                .unwrap_or(1.0)
        }

        #[allow(clippy::too_many_arguments)]
        fn conv(
            &mut self,
            scope: &str,
            x: i32,
            module: &str,
            bn: Option<(&str, f64)>,
            depthwise: bool,
            stride: usize,
            dilation: usize,
            act: i8,
            out_leaf: &str,
        ) -> i32 {
            let w = &self.p[&format!("{module}.weight")];
            let (co, ci, kh, kw) = w.dims4().expect("4d");
            let wv = vals(w);
            let (scale, bias): (Vec<f32>, Vec<f32>) = match bn {
                Some((b, eps)) => {
                    let g = vals(&self.p[&format!("{b}.weight")]);
                    let be = vals(&self.p[&format!("{b}.bias")]);
                    let mu = vals(&self.p[&format!("{b}.running_mean")]);
                    let var = vals(&self.p[&format!("{b}.running_var")]);
                    (0..co)
                        .map(|o| {
                            let s = g[o] as f64 / (var[o] as f64 + eps).sqrt();
                            (s as f32, (be[o] as f64 - mu[o] as f64 * s) as f32)
                        })
                        .unzip()
                }
                None => (vec![1.0; co], vals(&self.p[&format!("{module}.bias")])),
            };
            // Folded weights, canonical layout.
            let per = ci * kh * kw;
            let folded: Vec<f32> = wv
                .iter()
                .enumerate()
                .map(|(i, v)| v * scale[i / per])
                .collect();
            // Quantize per output channel (int8, zero point 0).
            let (deq, qscale): (Vec<f32>, Vec<f32>) = if self.quantized {
                let s: Vec<f32> = (0..co)
                    .map(|o| {
                        folded[o * per..(o + 1) * per]
                            .iter()
                            .fold(0f32, |m, v| m.max(v.abs()))
                            / 127.0
                    })
                    .map(|s| if s > 0.0 { s } else { 1e-6 })
                    .collect();
                let d = folded
                    .iter()
                    .enumerate()
                    .map(|(i, v)| s[i / per] * (v / s[i / per]).round().clamp(-127.0, 127.0))
                    .collect();
                (d, s)
            } else {
                (folded.clone(), vec![])
            };
            // TFLite layout: [Cout, kh, kw, Cin], depthwise [1, kh, kw, C].
            let tshape = if depthwise {
                vec![1, kh as i32, kw as i32, co as i32]
            } else {
                vec![co as i32, kh as i32, kw as i32, ci as i32]
            };
            let mut tfl = vec![0f32; folded.len()];
            for o in 0..co {
                for i in 0..ci {
                    for y in 0..kh {
                        for xx in 0..kw {
                            let t = if depthwise {
                                (y * kw + xx) * co + o
                            } else {
                                ((o * kh + y) * kw + xx) * ci + i
                            };
                            tfl[t] = folded[((o * ci + i) * kh + y) * kw + xx];
                        }
                    }
                }
            }
            let wleaf = if depthwise {
                "depthwise_weights"
            } else {
                "weights"
            };
            let wt = if self.quantized {
                let per_t = if depthwise { 1 } else { per };
                let q: Vec<u8> = tfl
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let o = if depthwise { i % co } else { i / per_t };
                        (v / qscale[o]).round().clamp(-127.0, 127.0) as i8 as u8
                    })
                    .collect();
                let dim = if depthwise { 3 } else { 0 };
                self.konst(
                    &format!("{scope}/{wleaf}"),
                    tshape,
                    9,
                    q,
                    Some((qscale.clone(), vec![0; co], dim)),
                )
            } else {
                let b = tfl.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.konst(&format!("{scope}/{wleaf}"), tshape, 0, b, None)
            };
            let bt = if self.quantized {
                let si = self.scale_of(x);
                let s: Vec<f32> = qscale.iter().map(|w| w * si).collect();
                let q: Vec<i32> = bias
                    .iter()
                    .zip(&s)
                    .map(|(b, s)| (b / s).round() as i32)
                    .collect();
                let deq_b: Vec<f32> = q
                    .iter()
                    .zip(&qscale)
                    .map(|(&v, &w)| (v as f64 * (w as f64 * si as f64)) as f32)
                    .collect();
                self.record_bias(module, bn, deq_b);
                let b = q.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.konst(
                    &format!("{scope}/Conv2D_bias"),
                    vec![co as i32],
                    2,
                    b,
                    Some((s, vec![0; co], 0)),
                )
            } else {
                self.record_bias(module, bn, bias.clone());
                let b = bias.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.konst(&format!("{scope}/Conv2D_bias"), vec![co as i32], 0, b, None)
            };
            self.expected.insert(format!("{module}.weight"), deq);
            let [_, h, wd, _] = self.shape(x);
            let out = self.act(
                &format!("{scope}/{out_leaf}"),
                [1, h.div_ceil(stride), wd.div_ceil(stride), co],
            );
            let opts = if depthwise {
                Opts::Dw {
                    pad: 0,
                    stride: stride as i32,
                    mult: 1,
                    act,
                    dilation: dilation as i32,
                }
            } else {
                Opts::Conv {
                    pad: 0,
                    stride: stride as i32,
                    act,
                    dilation: dilation as i32,
                }
            };
            self.g.ops.push(Op {
                code: if depthwise { 4 } else { 3 },
                inputs: vec![x, wt, bt],
                outputs: vec![out],
                opts,
            });
            out
        }

        fn record_bias(&mut self, module: &str, bn: Option<(&str, f64)>, v: Vec<f32>) {
            match bn {
                Some((b, _)) => self.expected.insert(format!("{b}.bias"), v),
                None => self.expected.insert(format!("{module}.bias"), v),
            };
        }

        fn op(
            &mut self,
            code: i32,
            inputs: Vec<i32>,
            name: &str,
            shape: [usize; 4],
            opts: Opts,
        ) -> i32 {
            let out = self.act(name, shape);
            self.g.ops.push(Op {
                code,
                inputs,
                outputs: vec![out],
                opts,
            });
            out
        }

        fn resize(&mut self, x: i32, name: &str, h: usize, w: usize) -> i32 {
            let size = self.konst(
                &format!("{name}/size"),
                vec![2],
                2,
                [h as i32, w as i32]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                None,
            );
            let c = self.shape(x)[3];
            self.op(
                23,
                vec![x, size],
                name,
                [1, h, w, c],
                Opts::Resize {
                    align_corners: true,
                    half_pixel: false,
                },
            )
        }
    }

    /// The graph of `config`'s model for an `h` x `w` input (see [`Exporter`]).
    pub fn export(
        config: &DeepLabConfig,
        p: &HashMap<String, Tensor>,
        quantized: bool,
        argmax: bool,
        (h, w): (usize, usize),
    ) -> (Graph, HashMap<String, Vec<f32>>) {
        let BackboneConfig::MobileNetV2(mb) = &config.backbone else {
            panic!("MobileNetV2 only")
        };
        let mut e = Exporter {
            g: Graph::default(),
            p,
            quantized,
            expected: HashMap::new(),
        };
        let input_quant = quantized.then(|| (vec![1.0 / 128.0], vec![128], 0));
        e.g.tensors.push(T {
            name: "input".into(),
            shape: vec![1, h as i32, w as i32, 3],
            ty: if quantized { 3 } else { 0 },
            data: None,
            quant: input_quant,
        });
        e.g.inputs = vec![0];
        let eps_b = mb.bn_eps;
        let eps_h = config.head_bn_eps;
        let target = mb.output_stride.value();
        let (mut current, mut rate) = (1usize, 1usize);
        let mut unit = |s: usize| {
            let r = rate;
            if current == target {
                rate *= s;
                (1, r)
            } else {
                current *= s;
                (s, r)
            }
        };
        let (s, r) = unit(2);
        let mut x = e.conv(
            "MobilenetV2/Conv",
            0,
            "backbone.conv_stem",
            Some(("backbone.bn1", eps_b)),
            false,
            s,
            r,
            RELU6,
            "Relu6",
        );
        let mut cin = mb.round_channels(mb.stem_channels);
        let mut n = 0;
        for (si, st) in mb.stages.iter().enumerate() {
            let cout = mb.round_channels(st.channels);
            for bi in 0..st.repeats {
                let (stride, r) = unit(if bi == 0 { st.stride } else { 1 });
                let tf = if n == 0 {
                    "MobilenetV2/expanded_conv".to_string()
                } else {
                    format!("MobilenetV2/expanded_conv_{n}")
                };
                let pfx = format!("backbone.blocks.{si}.{bi}");
                let m = |s: &str| format!("{pfx}.{s}");
                let y = if st.expansion == 1 {
                    let d = e.conv(
                        &format!("{tf}/depthwise"),
                        x,
                        &m("conv_dw"),
                        Some((&m("bn1"), eps_b)),
                        true,
                        stride,
                        r,
                        RELU6,
                        "Relu6",
                    );
                    e.conv(
                        &format!("{tf}/project"),
                        d,
                        &m("conv_pw"),
                        Some((&m("bn2"), eps_b)),
                        false,
                        1,
                        1,
                        NONE,
                        "BatchNorm/FusedBatchNorm",
                    )
                } else {
                    let ex = e.conv(
                        &format!("{tf}/expand"),
                        x,
                        &m("conv_pw"),
                        Some((&m("bn1"), eps_b)),
                        false,
                        1,
                        1,
                        RELU6,
                        "Relu6",
                    );
                    let d = e.conv(
                        &format!("{tf}/depthwise"),
                        ex,
                        &m("conv_dw"),
                        Some((&m("bn2"), eps_b)),
                        true,
                        stride,
                        r,
                        RELU6,
                        "Relu6",
                    );
                    e.conv(
                        &format!("{tf}/project"),
                        d,
                        &m("conv_pwl"),
                        Some((&m("bn3"), eps_b)),
                        false,
                        1,
                        1,
                        NONE,
                        "BatchNorm/FusedBatchNorm",
                    )
                };
                x = if stride == 1 && cin == cout {
                    let shape = e.shape(y);
                    e.op(
                        0,
                        vec![y, x],
                        &format!("{tf}/add"),
                        shape,
                        Opts::Add { act: NONE },
                    )
                } else {
                    y
                };
                cin = cout;
                n += 1;
            }
        }
        let [_, fh, fw, fc] = e.shape(x);
        let pooled = e.op(
            1,
            vec![x],
            "AvgPool2D/AvgPool",
            [1, 1, 1, fc],
            Opts::Pool {
                pad: 1,
                stride: 1,
                fw: fw as i32,
                fh: fh as i32,
                act: NONE,
            },
        );
        let ip = e.conv(
            "image_pooling",
            pooled,
            "aspp.pooling.conv",
            Some(("aspp.pooling.bn", eps_h)),
            false,
            1,
            1,
            RELU,
            "Relu",
        );
        let mut branches = vec![e.resize(ip, "ResizeBilinear", fh, fw)];
        branches.push(e.conv(
            "aspp0",
            x,
            "aspp.convs.0.conv",
            Some(("aspp.convs.0.bn", eps_h)),
            false,
            1,
            1,
            RELU,
            "Relu",
        ));
        for (i, &r) in config.aspp.atrous_rates.iter().enumerate() {
            let k = i + 1;
            branches.push(e.conv(
                &format!("aspp{k}"),
                x,
                &format!("aspp.convs.{k}.conv"),
                Some((&format!("aspp.convs.{k}.bn"), eps_h)),
                false,
                1,
                r,
                RELU,
                "Relu",
            ));
        }
        let c = config.aspp.channels;
        let cat = e.op(
            2,
            branches.clone(),
            "concat",
            [1, fh, fw, c * branches.len()],
            Opts::Concat { axis: 3, act: NONE },
        );
        let proj = e.conv(
            "concat_projection",
            cat,
            "aspp.project.conv",
            Some(("aspp.project.bn", eps_h)),
            false,
            1,
            1,
            RELU,
            "Relu",
        );
        let logits = e.conv(
            "logits/semantic",
            proj,
            "classifier",
            None,
            false,
            1,
            1,
            NONE,
            "BiasAdd",
        );
        let mut out = e.resize(logits, "ResizeBilinear_2", h, w);
        if argmax {
            let axis = e.konst(
                "ArgMax/dimension",
                vec![],
                2,
                3i32.to_le_bytes().to_vec(),
                None,
            );
            e.g.tensors.push(T {
                name: "ArgMax".into(),
                shape: vec![1, h as i32, w as i32],
                ty: 4,
                data: None,
                quant: None,
            });
            let o = (e.g.tensors.len() - 1) as i32;
            e.g.ops.push(Op {
                code: 56,
                inputs: vec![out, axis],
                outputs: vec![o],
                opts: Opts::ArgMax { ty: 4 },
            });
            out = o;
        }
        e.g.outputs = vec![out];
        (e.g, e.expected)
    }
}

fn synthetic_config(os: OutputStride, rates: Vec<usize>) -> DeepLabConfig {
    let mut c = DeepLabConfig::mobilenetv2_v3(5);
    c.backbone =
        BackboneConfig::MobileNetV2(MobileNetV2Config::with_width(0.35).with_output_stride(os));
    c.aspp.channels = 16;
    c.aspp.atrous_rates = rates;
    c
}

fn write_tflite(dir: &Path, name: &str, g: &synthetic::Graph) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, synthetic::serialize(g)).expect("write tflite");
    p
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// The converted tensors equal the exported (folded, dequantized) values; the identity
/// BatchNorms are exact.
fn check_tensors(
    conv: &deeplab_heads::tflite::TfliteConversion,
    expected: &HashMap<String, Vec<f32>>,
) {
    let mut matched = 0;
    for t in &conv.tensors {
        if let Some(e) = expected.get(&t.name) {
            assert_eq!(t.data.len(), e.len(), "{}", t.name);
            let d = t
                .data
                .iter()
                .zip(e)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-6 * max_abs(e).max(1.0), "{}: max diff {d}", t.name);
            matched += 1;
        } else if t.name.ends_with(".weight") {
            assert!(t.data.iter().all(|&v| v == 1.0), "{}", t.name);
        } else if t.name.ends_with(".running_mean") {
            assert!(t.data.iter().all(|&v| v == 0.0), "{}", t.name);
        } else if t.name.ends_with(".running_var") {
            let eps = if t.name.starts_with("backbone.") {
                1e-3
            } else {
                1e-5
            };
            assert!(
                t.data.iter().all(|&v| v == identity_running_var(eps)),
                "{}",
                t.name
            );
        } else {
            panic!("unexpected tensor {}", t.name);
        }
    }
    assert_eq!(
        matched,
        expected.len(),
        "every exported tensor was converted"
    );
}

#[test]
fn synthetic_float_model_round_trips() {
    let config = synthetic_config(OutputStride::Os16, vec![2, 3]);
    let params = synthetic::params(&config);
    let (g, expected) = synthetic::export(&config, &params, false, false, (64, 48));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write_tflite(dir.path(), "synthetic.tflite", &g);
    assert!(looks_like_tflite(&src));
    let out = dir.path().join("converted.safetensors");
    let report = convert_tflite(&src, &out, &TfliteOptions::default()).expect("convert");
    println!("{report}");
    assert_eq!(report.config, config, "inferred configuration");
    assert_eq!(report.layers.len(), expected.len() / 2);
    assert_eq!(
        report.output,
        TfliteOutput::Logits {
            height: 64,
            width: 48,
            classes: 5
        }
    );
    let conv = read_tflite(&src, &TfliteOptions::default()).expect("read");
    check_tensors(&conv, &expected);

    // The converted model computes what the original (unfolded) one does.
    let dev = Device::Cpu;
    let original =
        DeepLabModel::from_tensors(Path::new("params"), &config, params, &dev).expect("original");
    let converted = DeepLabModel::load(&out, &dev).expect("load");
    let x = deeplab_ops::reference::seeded_uniform(&[1, 3, 64, 48], 7, &dev).expect("x");
    let a = original.forward_output(&x, false).expect("fwd").upsampled;
    let b = converted.forward_output(&x, false).expect("fwd").upsampled;
    let av = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let bv = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    let d = av
        .iter()
        .zip(&bv)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    println!(
        "synthetic float round trip: max |original - converted| = {d:.2e} (logits up to {:.2})",
        max_abs(&av)
    );
    assert!(d <= 1e-4 * max_abs(&av).max(1.0), "max diff {d}");
}

#[test]
fn synthetic_int8_per_channel_model_dequantizes() {
    let config = synthetic_config(OutputStride::Os8, vec![]);
    let params = synthetic::params(&config);
    let (g, expected) = synthetic::export(&config, &params, true, true, (33, 33));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write_tflite(dir.path(), "quant.tflite", &g);
    let conv = read_tflite(&src, &TfliteOptions::default()).expect("convert");
    let r = &conv.report;
    println!("{r}");
    assert!(r.quantized());
    assert!(r
        .layers
        .iter()
        .all(|l| l.encoding == WeightEncoding::PerChannel));
    assert_eq!(
        r.output,
        TfliteOutput::ArgMax {
            height: 33,
            width: 33
        }
    );
    assert_eq!(r.input.quantization, Some((1.0 / 128.0, 128)));
    let mut want = config.clone();
    want.normalization = conv.config.normalization;
    assert_eq!(conv.config, want);
    let (a, b) = conv.config.normalization.scale_shift();
    assert!(
        (a[1] - 1.0 / 128.0).abs() < 1e-8 && (b[1] + 1.0).abs() < 1e-6,
        "{a:?} {b:?}"
    );
    check_tensors(&conv, &expected);
    // An explicit normalization wins.
    let opts = TfliteOptions {
        normalization: Some(InputNormalization::ImageNet),
        ..Default::default()
    };
    let c2 = read_tflite(&src, &opts).expect("convert");
    assert_eq!(c2.config.normalization, InputNormalization::ImageNet);
}

#[test]
fn synthetic_graph_errors_name_the_operator() {
    let config = synthetic_config(OutputStride::Os16, vec![2, 3]);
    let params = synthetic::params(&config);
    let (g, _) = synthetic::export(&config, &params, false, false, (64, 48));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.safetensors");
    let check = |what: &str, g: &synthetic::Graph, needles: &[&str]| {
        let src = write_tflite(dir.path(), &format!("{}.tflite", what.replace(' ', "_")), g);
        let msg = assert_fails_cleanly(&src, &out, what);
        println!("{what}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{what}: '{msg}' lacks '{n}'");
        }
    };
    let ec =
        |n: usize, part: &str, leaf: &str| format!("MobilenetV2/expanded_conv_{n}/{part}/{leaf}");

    let mut m = g.clone();
    let op = m.op_of("MobilenetV2/expanded_conv_2/add");
    op.code = 18;
    op.opts = synthetic::Opts::Mul { act: 0 };
    check(
        "mul instead of add",
        &m,
        &["operator #", "MUL", "unsupported operator"],
    );

    let mut m = g.clone();
    let t = m.tensor(&ec(3, "expand", "weights"));
    m.tensors[t].ty = 7;
    check(
        "int16 weights",
        &m,
        &[
            "operator #",
            "expanded_conv_3/expand/weights",
            "int16",
            "only float32",
        ],
    );

    let mut m = g.clone();
    let t = m.tensor(&ec(4, "depthwise", "depthwise_weights"));
    m.tensors[t].ty = 42;
    check(
        "unknown tensor type",
        &m,
        &["expanded_conv_4/depthwise/depthwise_weights", "42"],
    );

    let mut m = g.clone();
    m.op_of(&ec(4, "depthwise", "Relu6")).opts = synthetic::Opts::Dw {
        pad: 0,
        stride: 1,
        mult: 1,
        act: 3,
        dilation: 2,
    };
    check(
        "wrong dilation",
        &m,
        &[
            "operator #",
            "backbone.blocks.2.1.conv_dw",
            "dilation 2",
            "dilation 1",
        ],
    );

    let mut m = g.clone();
    m.op_of(&ec(4, "depthwise", "Relu6")).opts = synthetic::Opts::Dw {
        pad: 1,
        stride: 1,
        mult: 1,
        act: 3,
        dilation: 1,
    };
    check("valid padding", &m, &["operator #", "VALID"]);

    let mut m = g.clone();
    m.op_of(&ec(5, "project", "BatchNorm/FusedBatchNorm")).opts = synthetic::Opts::Conv {
        pad: 0,
        stride: 1,
        act: 3,
        dilation: 1,
    };
    check("wrong activation", &m, &["operator #", "RELU6", "NONE"]);

    let mut m = g.clone();
    m.op_of("concat").inputs.swap(0, 1);
    check(
        "swapped concat",
        &m,
        &["operator #", "aspp.project.conv", "concat("],
    );

    let mut m = g.clone();
    let skip = m.tensor(&ec(2, "project", "BatchNorm/FusedBatchNorm")) as i32;
    m.op_of(&ec(3, "expand", "Relu6")).inputs[0] = skip;
    check(
        "missing residual",
        &m,
        &["operator #", "residual sum of backbone.blocks.1.1"],
    );

    let mut m = g.clone();
    m.op_of("ResizeBilinear_2").opts = synthetic::Opts::Resize {
        align_corners: false,
        half_pixel: true,
    };
    check(
        "half-pixel resize",
        &m,
        &["operator #", "align_corners=false"],
    );

    let mut m = g.clone();
    for (from, to) in [
        (ec(6, "expand", "weights"), "w6"),
        (ec(6, "expand", "Conv2D_bias"), "b6"),
        (ec(6, "expand", "Relu6"), "y6"),
    ] {
        let t = m.tensor(&from);
        m.tensors[t].name = to.into();
    }
    check(
        "unnamed layer",
        &m,
        &["operator #", "'w6'", "cannot tell which DeepLab layer"],
    );

    // A configuration that does not fit the graph.
    let src = write_tflite(dir.path(), "valid.tflite", &g);
    let opts = TfliteOptions {
        config: Some(synthetic_config(OutputStride::Os8, vec![4, 6])),
        ..Default::default()
    };
    let e = convert_tflite(&src, &out, &opts).expect_err("wrong config");
    println!("wrong config: {e}");
    assert!(
        e.to_string().contains("operator #") && e.to_string().contains("dilation"),
        "{e}"
    );
}

#[test]
fn synthetic_float16_weights_and_mean_pooling_convert() {
    // Two other encodings TFLite converters emit: float16 weights reaching a convolution through
    // a DEQUANTIZE, and the image pooling as MEAN over height and width.
    let config = synthetic_config(OutputStride::Os16, vec![]);
    let params = synthetic::params(&config);
    let (mut g, mut expected) = synthetic::export(&config, &params, false, false, (33, 33));
    let w_name = "MobilenetV2/expanded_conv_3/expand/weights";
    let w = g.tensor(w_name);
    let f32s: Vec<f32> = g.tensors[w]
        .data
        .as_ref()
        .expect("data")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let halves: Vec<half::f16> = f32s.iter().map(|&v| half::f16::from_f32(v)).collect();
    g.tensors.push(synthetic::T {
        name: format!("{w_name}_fp16"),
        shape: g.tensors[w].shape.clone(),
        ty: 1,
        data: Some(halves.iter().flat_map(|h| h.to_le_bytes()).collect()),
        quant: None,
    });
    g.tensors[w].data = None; // now computed by the DEQUANTIZE
    let fp16 = (g.tensors.len() - 1) as i32;
    g.ops.insert(
        0,
        synthetic::Op {
            code: 6,
            inputs: vec![fp16],
            outputs: vec![w as i32],
            opts: synthetic::Opts::Empty,
        },
    );
    // [Cout, 1, 1, Cin] in TFLite and [Cout, Cin, 1, 1] here: the same order for 1x1 kernels.
    expected.insert(
        "backbone.blocks.2.0.conv_pw.weight".into(),
        halves.iter().map(|h| h.to_f32()).collect(),
    );
    let pool = g.op_of("AvgPool2D/AvgPool");
    pool.code = 40;
    pool.opts = synthetic::Opts::Reducer { keep_dims: true };
    let axes = synthetic::T {
        name: "Mean/reduction_indices".into(),
        shape: vec![2],
        ty: 2,
        data: Some([1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect()),
        quant: None,
    };
    g.tensors.push(axes);
    let axes = (g.tensors.len() - 1) as i32;
    g.op_of("AvgPool2D/AvgPool").inputs.push(axes);

    let dir = tempfile::tempdir().expect("tempdir");
    let src = write_tflite(dir.path(), "fp16.tflite", &g);
    let conv = read_tflite(&src, &TfliteOptions::default()).expect("convert");
    assert_eq!(conv.config, config);
    check_tensors(&conv, &expected);
    let layer = conv
        .report
        .layers
        .iter()
        .find(|l| l.module == "backbone.blocks.2.0.conv_pw")
        .expect("layer");
    assert_eq!(
        (layer.weights.as_str(), layer.encoding),
        (&*format!("{w_name}_fp16"), WeightEncoding::Float)
    );

    // MEAN without kept dimensions is not what the model computes.
    g.op_of("AvgPool2D/AvgPool").opts = synthetic::Opts::Reducer { keep_dims: false };
    let src = write_tflite(dir.path(), "mean.tflite", &g);
    let out = dir.path().join("out.safetensors");
    let msg = assert_fails_cleanly(&src, &out, "mean without keep_dims");
    assert!(msg.contains("operator #") && msg.contains("MEAN"), "{msg}");
}
