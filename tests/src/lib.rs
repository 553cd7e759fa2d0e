//! Helpers shared by the workspace end-to-end tests: locating (and building, if needed) the
//! `deeplab` binary, running it, scratch directories, generated datasets, and small readers for
//! the files it writes (safetensors tensors and metadata, `.npy` headers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// The `deeplab` binary of the same profile and target directory as the running test, built
/// with `cargo build -p deeplab-cli --bin deeplab` once per test process (a no-op when it is up
/// to date; under `cargo test --workspace` the binary is otherwise not built, or stale).
/// `DEEPLAB_BIN` overrides it.
pub fn deeplab_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("DEEPLAB_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // <target>/<profile>/deps/<test binary>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("<target>/<profile>")
            .to_path_buf();
        let profile = profile_dir
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "deeplab-cli", "--bin", "deeplab"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(workspace_root());
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd
            .status()
            .expect("running cargo to build the deeplab binary");
        assert!(status.success(), "cargo build -p deeplab-cli failed");
        let bin = profile_dir.join(format!("deeplab{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

/// The result of one run of the binary.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panics with both streams unless the run succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "deeplab failed\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless the run failed with exactly one non-empty stderr line starting with
    /// `error` and containing every `needle`; returns that line.
    pub fn one_line_error(&self, needles: &[&str]) -> String {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a failure, got {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one stderr line, got:\n{}",
            self.stderr
        );
        let line = lines[0];
        assert!(line.starts_with("error"), "{line}");
        for n in needles {
            assert!(line.contains(n), "'{line}' does not mention '{n}'");
        }
        line.to_string()
    }

    /// Panics unless the run failed and its stderr (which may hold progress lines first) ends
    /// with its only `error` line, containing every `needle`; returns that line.
    pub fn final_error_line(&self, needles: &[&str]) -> String {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a failure, got {:?}\n--- stderr\n{}",
            self.code,
            self.stderr
        );
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect();
        assert_eq!(errors.len(), 1, "expected one error line:\n{}", self.stderr);
        assert_eq!(
            self.stderr.lines().last(),
            Some(errors[0]),
            "{}",
            self.stderr
        );
        for n in needles {
            assert!(
                errors[0].contains(n),
                "'{}' does not mention '{n}'",
                errors[0]
            );
        }
        errors[0].to_string()
    }
}

/// Runs `deeplab` with `args` in `cwd` (progress bars off).
pub fn deeplab_in(cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(deeplab_bin());
    cmd.arg("--quiet").args(args).current_dir(cwd);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().expect("running deeplab");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `deeplab` with `args` in the workspace root.
pub fn deeplab(args: &[&str]) -> Run {
    deeplab_in(&workspace_root(), args, &[])
}

/// A fresh scratch directory (removed when dropped).
pub fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("deeplab-e2e-{tag}-"))
        .tempdir()
        .expect("creating a scratch directory")
}

/// Writes a small generated dataset in the VOC layout.
pub fn synth_voc(root: &Path, seed: u64, train: usize, val: usize) {
    let cfg = deeplab_data::synthetic::SyntheticConfig {
        seed,
        num_train: train,
        num_val: val,
        min_size: 48,
        max_size: 72,
        ..Default::default()
    };
    deeplab_data::synthetic::write_voc(root, &cfg).expect("writing a synthetic dataset");
}

/// Arguments of a tiny, fast training run (MobileNetV2 width 0.5, 16-channel head, 65x65 crops).
pub fn tiny_train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--backbone",
        "mobilenetv2_050",
        "--aspp-channels",
        "16",
        "--decoder-channels",
        "16",
        "--decoder-projection",
        "8",
        "--crop",
        "65",
        "--batch-size",
        "4",
        "--steps",
        steps,
        "--lr",
        "0.05",
        "--log-every",
        "1",
        "--seed",
        "5",
    ]
}

/// A safetensors file: raw bytes and header of every tensor, and the metadata.
#[derive(Debug)]
pub struct SafeTensors {
    /// `name -> (dtype, shape, raw little-endian bytes)`.
    pub tensors: BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// Reads a safetensors file (panics on a malformed one).
pub fn read_safetensors(path: &Path) -> SafeTensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    let data = &bytes[8 + n..];
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (k, v) in header.as_object().expect("header object") {
        if k == "__metadata__" {
            for (mk, mv) in v.as_object().expect("metadata object") {
                metadata.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
            }
            continue;
        }
        let off = v["data_offsets"].as_array().expect("offsets");
        let (a, b) = (
            off[0].as_u64().expect("offset") as usize,
            off[1].as_u64().expect("offset") as usize,
        );
        let shape = v["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        tensors.insert(
            k.clone(),
            (
                v["dtype"].as_str().unwrap_or("").to_string(),
                shape,
                data[a..b].to_vec(),
            ),
        );
    }
    SafeTensors { tensors, metadata }
}

/// Writes a safetensors file from parts (f32/f16 raw bytes as given).
pub fn write_safetensors(path: &Path, st: &SafeTensors) {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&st.metadata).expect("metadata"),
    );
    let mut data = Vec::new();
    for (k, (dtype, shape, bytes)) in &st.tensors {
        let a = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header");
    let pad = (8 - h.len() % 8) % 8;
    h.extend(std::iter::repeat_n(b' ', pad));
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The shape and f32 values of a little-endian f32 `.npy` file.
pub fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "{} is not a .npy file",
        path.display()
    );
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hl]).expect("utf-8 header");
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let s = header.find("'shape': (").expect("shape") + "'shape': (".len();
    let e = header[s..].find(')').expect("shape end") + s;
    let shape: Vec<usize> = header[s..e]
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().expect("dim"))
        .collect();
    let data: Vec<f32> = bytes[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}
