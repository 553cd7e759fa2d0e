//! Integration tests of deeplab-formats: real official checkpoints and TFLite models from
//! `../shared` (skipped with a message when absent), writer round trips, tarballs, and corrupt
//! or truncated copies.

use std::path::{Path, PathBuf};

/// `../shared/reference/<rel>` if it exists; otherwise prints why the test is skipped.
fn shared(rel: &str, test: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipped {test}: {} not found (../shared is absent)",
            p.display()
        );
        None
    }
}

/// Deterministic pseudo-random numbers for fixtures and fuzzing.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn f32(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

mod checkpoint {
    use super::*;
    use deeplab_formats::checkpoint::data_shard_path;
    use deeplab_formats::{Checkpoint, CheckpointError, CheckpointWriter, DType};

    /// (name, shape, dtype) rows of a `variables.txt`.
    fn variables_txt(path: &Path) -> Vec<(String, Vec<usize>, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                assert_eq!(cols.len(), 3, "bad line {l:?}");
                let shape = cols[1]
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse().unwrap())
                    .collect();
                (cols[0].to_string(), shape, cols[2].to_string())
            })
            .collect()
    }

    /// (name, shape, values) of a fixture variable.
    type Var = (String, Vec<usize>, Vec<f32>);

    /// A fixture checkpoint from the writer: `n` f32 variables with DeepLab-like names.
    fn fixture(dir: &Path, n: usize, seed: u64) -> (PathBuf, Vec<Var>) {
        let mut rng = Lcg(seed);
        let prefix = dir.join("model.ckpt");
        let mut w = CheckpointWriter::create(&prefix).unwrap();
        let mut vars = Vec::new();
        for i in 0..n {
            let shape = match i % 4 {
                0 => vec![3, 3, 1 + i % 5, 2 + i % 3],
                1 => vec![8 + i % 7],
                2 => vec![1, 1, 4, 6],
                _ => vec![],
            };
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.f32())
                .collect();
            let name = format!("MobilenetV2/expanded_conv_{i}/layer_{}/weights", i % 3);
            w.add_f32(&name, &shape, &values).unwrap();
            vars.push((name, shape, values));
        }
        w.finish().unwrap();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        (prefix, vars)
    }

    fn copy_checkpoint(src_prefix: &Path, dst_dir: &Path) -> PathBuf {
        let name = src_prefix.file_name().unwrap();
        let dst = dst_dir.join(name);
        let with = |p: &Path, s: &str| {
            let mut o = p.as_os_str().to_owned();
            o.push(s);
            PathBuf::from(o)
        };
        std::fs::copy(with(src_prefix, ".index"), with(&dst, ".index")).unwrap();
        std::fs::copy(
            data_shard_path(src_prefix, 0, 1),
            data_shard_path(&dst, 0, 1),
        )
        .unwrap();
        dst
    }

    #[test]
    fn official_checkpoints_match_variables_txt() {
        for set in ["D_mobilenetv2_os16", "E_mobilenetv2_v3plus_os16"] {
            let Some(dir) = shared(
                &format!("official/{set}"),
                "official_checkpoints_match_variables_txt",
            ) else {
                return;
            };
            let ckpt = Checkpoint::open(dir.join("model.ckpt")).unwrap();
            let vars = variables_txt(&dir.join("variables.txt"));
            assert!(vars.len() > 200, "{set}: {} variables", vars.len());
            for (name, shape, dtype) in &vars {
                let info = ckpt.entry(name).unwrap_or_else(|e| panic!("{set}: {e}"));
                assert_eq!(&info.shape, shape, "{set}: {name}");
                assert_eq!(info.dtype.name(), dtype, "{set}: {name}");
            }
            // And nothing in the checkpoint that variables.txt does not list.
            let listed: std::collections::HashSet<&str> =
                vars.iter().map(|v| v.0.as_str()).collect();
            let extra: Vec<&str> = ckpt
                .names()
                .iter()
                .map(|s| s.as_str())
                .filter(|n| !listed.contains(n))
                .collect();
            assert!(extra.is_empty(), "{set}: unlisted variables {extra:?}");
            // Key order is byte-wise sorted.
            assert!(ckpt
                .names()
                .windows(2)
                .all(|w| w[0].as_bytes() < w[1].as_bytes()));
            // Every tensor reads, its CRC verifies, and the bytes cover the whole data shard.
            let bytes = ckpt.verify_all().unwrap();
            let shard_len = std::fs::metadata(&ckpt.shard_paths()[0]).unwrap().len();
            assert_eq!(bytes, shard_len, "{set}: verified bytes vs data shard size");
            for (name, info) in ckpt.iter() {
                if info.dtype == DType::F32 {
                    let v = ckpt.read_f32(name).unwrap();
                    assert_eq!(v.len(), info.num_elements());
                    assert!(
                        v.iter().all(|x| x.is_finite()),
                        "{set}: {name} has non-finite values"
                    );
                }
            }
            // BatchNorm variances of a real model are positive.
            let var = ckpt
                .read_f32("MobilenetV2/Conv/BatchNorm/moving_variance")
                .unwrap();
            assert!(var.iter().all(|&v| v > 0.0));
            println!("{set}: {} variables, {bytes} bytes verified", ckpt.len());
        }
    }

    #[test]
    fn open_accepts_prefix_index_data_and_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (prefix, vars) = match shared(
            "official/D_mobilenetv2_os16/model.ckpt.index",
            "open_accepts_prefix_index_data_and_directory (real files; using a fixture)",
        ) {
            Some(index) => (index.with_extension(""), Vec::new()),
            None => fixture(tmp.path(), 12, 1),
        };
        let index = PathBuf::from(format!("{}.index", prefix.display()));
        let data = data_shard_path(&prefix, 0, 1);
        let dir = prefix.parent().unwrap().to_path_buf();
        let reference = Checkpoint::open(&prefix).unwrap();
        for p in [&index, &data, &dir] {
            let c = Checkpoint::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(c.names(), reference.names());
            assert_eq!(c.prefix(), reference.prefix());
        }
        for (name, _, values) in &vars {
            assert_eq!(&reference.read_f32(name).unwrap(), values);
        }
    }

    #[test]
    fn writer_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        // Enough variables for several data blocks and index entries.
        let (prefix, vars) = fixture(tmp.path(), 600, 7);
        let c = Checkpoint::open(&prefix).unwrap();
        assert_eq!(c.len(), vars.len());
        for ((name, shape, values), got) in vars.iter().zip(c.names()) {
            assert_eq!(name, got);
            let info = c.entry(name).unwrap();
            assert_eq!((&info.shape, info.dtype), (shape, DType::F32));
            assert_eq!(&c.read_f32(name).unwrap(), values);
        }
        for f in deeplab_formats::checkpoint::checkpoint_files(&prefix, 1) {
            assert!(f.is_file(), "{}", f.display());
        }
        // No temporary files are left behind.
        let files: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");

        // Other dtypes and conversions.
        let p2 = tmp.path().join("mixed.ckpt");
        let mut w = CheckpointWriter::create(&p2).unwrap();
        w.add_raw("global_step", DType::I64, &[], &30000i64.to_le_bytes())
            .unwrap();
        let h: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        w.add_raw("half", DType::F16, &[2], &h).unwrap();
        let d: Vec<u8> = [1.25f64, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.add_raw("double", DType::F64, &[2, 1], &d).unwrap();
        w.add_raw("bytes", DType::U8, &[3], &[0, 7, 255]).unwrap();
        w.add_f32("empty", &[0, 4], &[]).unwrap();
        // Writer input errors name the variable.
        let e = w.add_f32("half", &[1], &[1.0]).unwrap_err().to_string();
        assert!(e.contains("'half'") && e.contains("already"), "{e}");
        let e = w.add_f32("bad", &[2, 2], &[1.0]).unwrap_err().to_string();
        assert!(e.contains("'bad'") && e.contains("[2, 2]"), "{e}");
        assert!(w.add_f32("", &[], &[1.0]).is_err());
        assert!(w.add_raw("s", DType::String, &[], b"x").is_err());
        w.finish().unwrap();
        let c = Checkpoint::open(&p2).unwrap();
        assert_eq!(
            c.names(),
            ["bytes", "double", "empty", "global_step", "half"]
        );
        assert_eq!(c.read_i64("global_step").unwrap(), vec![30000]);
        assert_eq!(c.read_f32("global_step").unwrap(), vec![30000.0]);
        assert_eq!(c.read_f32("half").unwrap(), vec![0.5, -2.0]);
        assert_eq!(c.read_f32("double").unwrap(), vec![1.25, 3.0]);
        assert_eq!(c.read_f32("bytes").unwrap(), vec![0.0, 7.0, 255.0]);
        assert_eq!(c.read_f32("empty").unwrap(), Vec::<f32>::new());
        assert_eq!(c.entry("empty").unwrap().shape, vec![0, 4]);
        assert!(c.read_i64("half").is_err());
    }

    #[test]
    fn real_checkpoint_survives_rewrite() {
        for set in ["D_mobilenetv2_os16", "E_mobilenetv2_v3plus_os16"] {
            let Some(dir) = shared(
                &format!("official/{set}"),
                "real_checkpoint_survives_rewrite",
            ) else {
                return;
            };
            rewrite_matches_tensorflow(&dir);
        }
    }

    fn rewrite_matches_tensorflow(dir: &Path) {
        let src = Checkpoint::open(dir.join("model.ckpt")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let prefix = tmp.path().join("model.ckpt");
        let mut w = CheckpointWriter::create(&prefix).unwrap();
        // Add the tensors in the order TensorFlow wrote them (by data offset), so that offsets
        // agree and the files can be compared byte for byte.
        let mut order: Vec<&String> = src.names().iter().collect();
        order.sort_by_key(|n| src.location(n).unwrap().1);
        for name in order {
            let info = src.entry(name).unwrap();
            w.add_raw(name, info.dtype, &info.shape, &src.read_raw(name).unwrap())
                .unwrap();
        }
        let index = w.finish().unwrap();
        let copy = Checkpoint::open(&prefix).unwrap();
        assert_eq!(copy.names(), src.names());
        for (name, info) in src.iter() {
            assert_eq!(copy.entry(name).unwrap(), info);
            assert_eq!(copy.location(name).unwrap(), src.location(name).unwrap());
            assert_eq!(
                copy.read_raw(name).unwrap(),
                src.read_raw(name).unwrap(),
                "{name}"
            );
        }
        // Byte-identical to what TensorFlow wrote: the writer's output is a real TF bundle.
        assert!(
            std::fs::read(&copy.shard_paths()[0]).unwrap()
                == std::fs::read(&src.shard_paths()[0]).unwrap()
        );
        assert!(
            std::fs::read(index).unwrap() == std::fs::read(src.index_path()).unwrap(),
            "index differs from TensorFlow's"
        );
    }

    /// Writes a model-zoo-like tarball holding the checkpoint at `prefix`.
    fn make_tarball(prefix: &Path, out: &Path, top: &str, extra_ckpt_dir: Option<&str>) {
        let f = std::fs::File::create(out).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let index = PathBuf::from(format!("{}.index", prefix.display()));
        let data = data_shard_path(prefix, 0, 1);
        let graph = b"not really a graph".to_vec();
        let mut h = tar::Header::new_gnu();
        h.set_size(graph.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(
            &mut h,
            format!("{top}/frozen_inference_graph.pb"),
            graph.as_slice(),
        )
        .unwrap();
        tar.append_path_with_name(&index, format!("{top}/model.ckpt.index"))
            .unwrap();
        tar.append_path_with_name(&data, format!("{top}/model.ckpt.data-00000-of-00001"))
            .unwrap();
        if let Some(d) = extra_ckpt_dir {
            tar.append_path_with_name(&index, format!("{d}/model.ckpt.index"))
                .unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn tarball_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = match shared(
            "official/D_mobilenetv2_os16/model.ckpt.index",
            "tarball_checkpoints (real files; using a fixture)",
        ) {
            Some(index) => index.with_extension(""),
            None => fixture(tmp.path(), 40, 3).0,
        };
        let direct = Checkpoint::open(&prefix).unwrap();
        let tgz = tmp
            .path()
            .join("deeplabv3_pascal_train_aug_2018_01_04.tar.gz");
        make_tarball(&prefix, &tgz, "deeplabv3_pascal_train_aug", None);
        let extracted_dir;
        {
            let c = Checkpoint::open(&tgz).unwrap();
            assert_eq!(c.names(), direct.names());
            for name in direct.names() {
                assert_eq!(c.read_raw(name).unwrap(), direct.read_raw(name).unwrap());
            }
            c.verify_all().unwrap();
            extracted_dir = c.prefix().parent().unwrap().to_path_buf();
            assert!(
                !extracted_dir.join("frozen_inference_graph.pb").exists(),
                "non-checkpoint members are not extracted"
            );
            let c2 = Checkpoint::open_tar_gz(&tgz).unwrap();
            assert_eq!(c2.len(), c.len());
        }
        assert!(
            !extracted_dir.exists(),
            "the temporary extraction is removed with the checkpoint"
        );

        // Two checkpoints in one archive: a clear error naming both members.
        let tgz2 = tmp.path().join("two.tgz");
        make_tarball(&prefix, &tgz2, "a", Some("b"));
        let e = Checkpoint::open(&tgz2).unwrap_err().to_string();
        assert!(
            e.contains("two.tgz")
                && e.contains("a/model.ckpt.index")
                && e.contains("b/model.ckpt.index"),
            "{e}"
        );

        // A truncated or non-gzip archive is an error naming the file, never a panic.
        let bytes = std::fs::read(&tgz).unwrap();
        for cut in [0, 10, 100, bytes.len() / 2, bytes.len() - 9] {
            let t = tmp.path().join(format!("cut{cut}.tar.gz"));
            std::fs::write(&t, &bytes[..cut]).unwrap();
            let e = Checkpoint::open(&t).unwrap_err().to_string();
            assert!(e.contains(&format!("cut{cut}.tar.gz")), "{e}");
        }
    }

    #[test]
    fn corrupt_copies_give_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let src = match shared(
            "official/D_mobilenetv2_os16/model.ckpt.index",
            "corrupt_copies_give_clear_errors (real files; using a fixture)",
        ) {
            Some(index) => index.with_extension(""),
            None => {
                let dir = tmp.path().join("src");
                std::fs::create_dir_all(&dir).unwrap();
                fixture(&dir, 60, 5).0
            }
        };
        let reference = Checkpoint::open(&src).unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let prefix = copy_checkpoint(&src, &work);
        let index = PathBuf::from(format!("{}.index", prefix.display()));
        let data = data_shard_path(&prefix, 0, 1);
        let index_bytes = std::fs::read(&index).unwrap();
        let data_bytes = std::fs::read(&data).unwrap();
        let restore = || {
            std::fs::write(&index, &index_bytes).unwrap();
            std::fs::write(&data, &data_bytes).unwrap();
        };

        // Truncated index: an error at every cut, never a panic. (Every single cut is covered
        // in memory by the table reader's unit test; file writes are slow, so here: all cuts near
        // both ends plus a spread.)
        let n = index_bytes.len();
        let cuts: Vec<usize> = (0..64)
            .chain(n.saturating_sub(160)..n)
            .chain((0..150).map(|i| i * n / 150))
            .collect();
        for cut in cuts {
            std::fs::write(&index, &index_bytes[..cut]).unwrap();
            let e = Checkpoint::open(&prefix).unwrap_err();
            assert!(
                matches!(
                    e,
                    CheckpointError::Truncated { .. }
                        | CheckpointError::BadMagic { .. }
                        | CheckpointError::Corrupt { .. }
                        | CheckpointError::BlockCrc { .. }
                ),
                "cut {cut}: {e}"
            );
            assert!(e.to_string().contains("model.ckpt.index"), "{e}");
        }
        std::fs::write(&index, &index_bytes[..20]).unwrap();
        assert!(matches!(
            Checkpoint::open(&prefix),
            Err(CheckpointError::Truncated { .. })
        ));
        restore();

        // Wrong magic.
        let mut b = index_bytes.clone();
        b[n - 1] ^= 0xff;
        std::fs::write(&index, &b).unwrap();
        let e = Checkpoint::open(&prefix).unwrap_err();
        assert!(matches!(e, CheckpointError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("bad table magic"), "{e}");

        // Flipped byte inside the index's first data block: block CRC error.
        let mut b = index_bytes.clone();
        b[5] ^= 0x40;
        std::fs::write(&index, &b).unwrap();
        let e = Checkpoint::open(&prefix).unwrap_err();
        assert!(matches!(e, CheckpointError::BlockCrc { .. }), "{e}");
        restore();

        // Truncated data shard: the error names the data file and a variable that no longer fits.
        for cut in [0, 1, data_bytes.len() / 3, data_bytes.len() - 1] {
            std::fs::write(&data, &data_bytes[..cut]).unwrap();
            let e = Checkpoint::open(&prefix).unwrap_err();
            match &e {
                CheckpointError::DataTruncated {
                    name, needed, len, ..
                } => {
                    assert!(reference.contains(name));
                    assert!(*needed > *len && *len == cut as u64);
                }
                other => panic!("cut {cut}: unexpected {other}"),
            }
            assert!(e.to_string().contains(".data-00000-of-00001"), "{e}");
        }
        // Data shard removed.
        std::fs::remove_file(&data).unwrap();
        let e = Checkpoint::open(&prefix).unwrap_err().to_string();
        assert!(e.contains(".data-00000-of-00001"), "{e}");
        restore();

        // Flipped byte in the data: the CRC error names the variable holding that byte; the
        // other variables still read.
        let mut rng = Lcg(11);
        for _ in 0..5 {
            let at = (rng.next() as usize) % data_bytes.len();
            let mut b = data_bytes.clone();
            b[at] ^= 0x01;
            std::fs::write(&data, &b).unwrap();
            let c = Checkpoint::open(&prefix).unwrap();
            let mut failed = Vec::new();
            for name in c.names() {
                match c.read_raw(name) {
                    Ok(v) => assert_eq!(v, reference.read_raw(name).unwrap()),
                    Err(CheckpointError::TensorCrc { name: n, .. }) => failed.push(n),
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(
                failed.len(),
                1,
                "byte {at}: exactly one variable must fail, got {failed:?}"
            );
            let e = c.read_f32(&failed[0]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("'{}'", failed[0])) && e.contains("checksum mismatch"),
                "{e}"
            );
            assert!(matches!(
                c.verify_all(),
                Err(CheckpointError::TensorCrc { .. })
            ));
        }
        restore();

        // Missing index and ambiguous directories.
        let e = Checkpoint::open(work.join("nothing.ckpt"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nothing.ckpt.index") && e.contains("does not exist"),
            "{e}"
        );
        std::fs::copy(&index, work.join("other.ckpt.index")).unwrap();
        let e = Checkpoint::open(&work).unwrap_err().to_string();
        assert!(
            e.contains("2 checkpoints") && e.contains("other.ckpt") && e.contains("model.ckpt"),
            "{e}"
        );
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            Checkpoint::open(&empty),
            Err(CheckpointError::NotFound { .. })
        ));

        // Random byte flips anywhere in the index: an error or the same contents, never a panic.
        let mut rng = Lcg(23);
        for _ in 0..300 {
            let mut b = index_bytes.clone();
            let at = (rng.next() as usize) % b.len();
            b[at] = rng.next() as u8;
            std::fs::write(&index, &b).unwrap();
            if let Ok(c) = Checkpoint::open(&prefix) {
                assert_eq!(
                    c.names(),
                    reference.names(),
                    "flip at {at} changed the variable list unnoticed"
                );
            }
        }
        restore();
        Checkpoint::open(&prefix).unwrap().verify_all().unwrap();
    }
}

mod tflite {
    use super::*;
    use deeplab_formats::tflite::{
        BuiltinOp, BuiltinOptions, TensorType, TfliteError, TfliteModel,
    };

    const MODELS: [&str; 2] = ["deeplabv3_257_mv_gpu", "deeplabv3_mnv2_pascal_quant"];

    /// Rows of a `*.tensors.tsv`: (index, name, shape, dtype, scale, zero_point).
    fn tensors_tsv(path: &Path) -> Vec<(usize, String, Vec<usize>, String, f64, i64)> {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            "index\tname\tshape\tdtype\tquant_scale\tquant_zero_point"
        );
        lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let c: Vec<&str> = l.split('\t').collect();
                assert_eq!(c.len(), 6, "{l:?}");
                // Shapes are printed like "[np.int32(1), np.int32(257)]".
                let shape = c[2]
                    .trim_matches(|ch| ch == '[' || ch == ']')
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| {
                        s.trim()
                            .trim_start_matches("np.int32(")
                            .trim_end_matches(')')
                            .parse()
                            .unwrap()
                    })
                    .collect();
                (
                    c[0].parse().unwrap(),
                    c[1].to_string(),
                    shape,
                    c[3].to_string(),
                    c[4].parse().unwrap(),
                    c[5].parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn real_models_match_tensor_tables() {
        for name in MODELS {
            let Some(path) = shared(
                &format!("tflite/{name}.tflite"),
                "real_models_match_tensor_tables",
            ) else {
                return;
            };
            let m = TfliteModel::open(&path).unwrap();
            let g = m.main_subgraph();
            let rows = tensors_tsv(&path.with_extension("tensors.tsv"));
            assert_eq!(rows.len(), g.tensors.len(), "{name}");
            for (index, tname, shape, dtype, scale, zp) in &rows {
                let t = &g.tensors[*index];
                assert_eq!(&t.name, tname, "{name} t{index}");
                assert_eq!(&t.shape, shape, "{name} t{index} {tname}");
                assert_eq!(t.dtype.name(), dtype, "{name} t{index} {tname}");
                let (s, z) = match &t.quantization {
                    Some(q) if !q.scale.is_empty() => {
                        assert_eq!(
                            q.scale.len(),
                            1,
                            "{name} {tname}: these models are per-tensor quantized"
                        );
                        (q.scale[0], q.zero_point.first().copied().unwrap_or(0))
                    }
                    _ => (0.0, 0),
                };
                assert_eq!(s, *scale as f32, "{name} {tname} scale");
                assert_eq!(z, *zp, "{name} {tname} zero point");
            }
            // Every constant tensor decodes, with finite real values of the right count.
            let mut consts = 0;
            for t in &g.tensors {
                if !t.has_data {
                    continue;
                }
                consts += 1;
                match t.dtype {
                    TensorType::Float32 | TensorType::UInt8 => {
                        let v = m.dequantize(t).unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(v.len(), t.num_elements());
                        assert!(v.iter().all(|x| x.is_finite()));
                    }
                    TensorType::Int32 => {
                        // Biases are quantized int32; shape operands are plain int32.
                        let d = m.tensor_data(t).unwrap();
                        if t.quantization.is_some() {
                            assert_eq!(m.dequantize(t).unwrap().len(), t.num_elements());
                        } else {
                            assert!(matches!(d, deeplab_formats::tflite::TensorData::I32(_)));
                        }
                    }
                    other => panic!("{name}: unexpected constant type {other}"),
                }
            }
            assert!(consts > 100, "{name}: {consts} constant tensors");
        }
    }

    #[test]
    fn real_model_graphs() {
        let Some(path) = shared("tflite/deeplabv3_257_mv_gpu.tflite", "real_model_graphs") else {
            return;
        };
        let m = TfliteModel::open(&path).unwrap();
        let g = m.main_subgraph();
        assert_eq!(g.operators.len(), 70);
        let counts = g.op_counts();
        let expect = [
            ("ADD", 10),
            ("AVERAGE_POOL_2D", 1),
            ("CONCATENATION", 1),
            ("CONV_2D", 38),
            ("DEPTHWISE_CONV_2D", 17),
            ("RESIZE_BILINEAR", 3),
        ];
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            expect
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<Vec<_>>()
        );
        let input = &g.tensors[g.inputs[0]];
        assert_eq!(
            (input.shape.as_slice(), input.dtype),
            (&[1, 257, 257, 3][..], TensorType::Float32)
        );
        let output = &g.tensors[g.outputs[0]];
        assert_eq!(output.shape, vec![1, 257, 257, 21]);
        // Output stride 8: the later depthwise convs are atrous (rates 2 and 4).
        let mut rates: Vec<i32> = g
            .operators
            .iter()
            .filter_map(|op| match &op.options {
                BuiltinOptions::DepthwiseConv2D(o) => Some(o.dilation_h),
                _ => None,
            })
            .collect();
        rates.dedup();
        assert_eq!(rates, vec![1, 2, 4]);
        for op in &g.operators {
            if op.op == BuiltinOp::RESIZE_BILINEAR {
                assert_eq!(
                    op.options,
                    BuiltinOptions::ResizeBilinear {
                        align_corners: true,
                        half_pixel_centers: false
                    }
                );
            }
        }

        let Some(path) = shared(
            "tflite/deeplabv3_mnv2_pascal_quant.tflite",
            "real_model_graphs",
        ) else {
            return;
        };
        let m = TfliteModel::open(&path).unwrap();
        let g = m.main_subgraph();
        assert_eq!(g.operators.len(), 72);
        let input = &g.tensors[g.inputs[0]];
        let q = input.quantization.as_ref().unwrap();
        assert_eq!(
            (input.dtype, q.scale.as_slice(), q.zero_point.as_slice()),
            (TensorType::UInt8, &[1.0 / 128.0][..], &[128][..])
        );
        let last = g.operators.last().unwrap();
        assert_eq!(last.op, BuiltinOp::ARG_MAX);
        assert_eq!(
            last.options,
            BuiltinOptions::ArgMax {
                output_type: TensorType::Int64
            }
        );
        assert_eq!(g.tensors[g.outputs[0]].shape, vec![1, 513, 513]);
        assert_eq!(g.op_counts().get("QUANTIZE"), Some(&1));
    }

    #[test]
    fn print_op_listings() {
        for name in MODELS {
            let Some(path) = shared(&format!("tflite/{name}.tflite"), "print_op_listings") else {
                return;
            };
            let m = TfliteModel::open(&path).unwrap();
            let g = m.main_subgraph();
            println!(
                "== {name}: {} operators; {:?}",
                g.operators.len(),
                g.op_counts()
            );
            let n = g.operators.len();
            for op in g
                .operators
                .iter()
                .take(15)
                .chain(g.operators.iter().skip(n.saturating_sub(15)))
            {
                let line = g.describe_operator(op);
                assert!(
                    line.starts_with(&format!("#{:<3} {}", op.index, op.op)),
                    "{line}"
                );
                println!("{line}");
            }
        }
    }

    #[test]
    fn truncated_and_corrupted_real_files_never_panic() {
        for name in MODELS {
            let Some(path) = shared(
                &format!("tflite/{name}.tflite"),
                "truncated_and_corrupted_real_files_never_panic",
            ) else {
                return;
            };
            let bytes = std::fs::read(&path).unwrap();
            let n = bytes.len();
            // Every cut in the header region, then cuts spread over the whole file.
            let cuts: Vec<usize> = (0..512)
                .chain((0..300).map(|i| i * n / 300))
                .chain([n - 1])
                .collect();
            for cut in cuts {
                match TfliteModel::from_bytes(bytes[..cut].to_vec(), &path) {
                    Err(e) => assert!(e.to_string().contains(name), "{e}"),
                    Ok(m) => {
                        // Only possible if the cut removed nothing the model refers to.
                        for t in &m.main_subgraph().tensors {
                            if t.has_data {
                                m.dequantize(t)
                                    .or_else(|_| m.tensor_data(t).map(|_| Vec::new()))
                                    .unwrap();
                            }
                        }
                    }
                }
            }
            let mut rng = Lcg(5);
            for _ in 0..300 {
                let mut b = bytes.clone();
                // Flip bytes in the flatbuffer's tables (the first and last 64 KiB hold the
                // structure; the middle is mostly weight data).
                let at = if rng.next() & 1 == 0 {
                    (rng.next() as usize) % 65536
                } else {
                    n - 1 - (rng.next() as usize) % 65536
                };
                b[at] = rng.next() as u8;
                if let Ok(m) = TfliteModel::from_bytes(b, &path) {
                    for g in &m.subgraphs {
                        for t in &g.tensors {
                            let _ = m.dequantize(t);
                        }
                        for op in &g.operators {
                            let _ = g.describe_operator(op);
                        }
                    }
                }
            }
            let mut b = bytes.clone();
            b[4..8].copy_from_slice(b"ABCD");
            let e = TfliteModel::from_bytes(b, &path).unwrap_err();
            assert!(matches!(e, TfliteError::BadIdentifier { .. }), "{e}");
            assert!(e.to_string().contains("expected \"TFL3\""), "{e}");
        }
        let e = TfliteModel::open("/nonexistent/model.tflite")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/model.tflite"), "{e}");
    }
}
