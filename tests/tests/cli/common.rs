//! A shared fixture: a generated dataset and a tiny model trained on it by `deeplab train`,
//! built once per test process under the target directory.

use deeplab_e2e::{deeplab, synth_voc, tiny_train_args};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture's paths.
pub struct Fixture {
    /// A VOC-layout dataset with 8 train and 4 val scenes of 48..72 px.
    pub data: PathBuf,
    /// `model.safetensors` of a 6-step training run on it.
    pub model: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let base = exe
            .parent()
            .and_then(Path::parent)
            .expect("<target>/<profile>")
            .join("e2e-scratch");
        // earlier runs' fixtures (this process gets a fresh one)
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = base.join(format!("fixture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fixture directory");
        let data = dir.join("data");
        synth_voc(&data, 11, 8, 4);
        let out = dir.join("run");
        let (d, o) = (data.display().to_string(), out.display().to_string());
        deeplab(&tiny_train_args(&d, &o, "6")).ok();
        Fixture {
            model: out.join("model.safetensors"),
            data,
        }
    })
}
