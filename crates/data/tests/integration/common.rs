//! Helpers shared by the integration tests: paths into ../shared and small generated datasets.

use std::path::{Path, PathBuf};

use deeplab_data::synthetic::{self, SyntheticConfig};

/// `../shared/reference/<rel>` if it exists; otherwise prints one line naming the skipped test and
/// returns `None`.
pub fn shared(rel: &str, test: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipped {test}: {} not found (../shared is not present)",
            p.display()
        );
        None
    }
}

/// A small, fast synthetic config.
pub fn tiny_config(num_train: usize, num_val: usize) -> SyntheticConfig {
    SyntheticConfig {
        seed: 7,
        num_train,
        num_val,
        min_size: 24,
        max_size: 40,
        ..SyntheticConfig::default()
    }
}

/// A tiny VOC-layout dataset in a fresh temp dir.
pub fn tiny_voc(num_train: usize, num_val: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("VOC2012");
    synthetic::write_voc(&root, &tiny_config(num_train, num_val)).expect("write synthetic VOC");
    (dir, root)
}
