//! Where fetched weights live on disk, so the fetcher and the CLI agree without any network access.
//!
//! - Hub files go to the standard Hugging Face hub cache (`$HF_HOME/hub`, default
//!   `~/.cache/huggingface/hub`): `models--{org}--{name}/snapshots/{commit}/{file}`, a symlink to
//!   `blobs/{etag}`, with `refs/{revision}` holding the commit the revision resolved to.
//! - Model-zoo archives go to the project cache (`--cache-dir`, else `$DEEPLAB_CACHE`, else
//!   `{user cache dir}/deeplab`): `{name}/{archive}.tar.gz` (the verified download) and
//!   `{name}/model.safetensors` (the converted, usable file), with `{name}/model.safetensors.json`
//!   recording what it was made from.
use std::path::{Path, PathBuf};

use crate::{is_hex, Source, WeightSpec};

/// Environment variable overriding the project cache directory for model-zoo archives.
pub const CACHE_ENV: &str = "DEEPLAB_CACHE";
/// Environment variable of the Hugging Face home (the hub cache is its `hub/` folder).
pub const HF_HOME_ENV: &str = "HF_HOME";
/// File name of the converted checkpoint inside an archive entry's cache folder.
pub const CONVERTED_FILE: &str = "model.safetensors";
/// File name of the record written next to the converted checkpoint.
pub const STAMP_FILE: &str = "model.safetensors.json";

/// The two cache roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    /// The Hugging Face hub cache (the folder holding `models--*`).
    pub hub: PathBuf,
    /// The project cache for model-zoo archives and their conversions.
    pub archives: PathBuf,
}

impl CacheLayout {
    /// The layout from the environment: `$HF_HOME/hub` (else `~/.cache/huggingface/hub`) and
    /// `cache_dir` (else `$DEEPLAB_CACHE`, else `{user cache dir}/deeplab`).
    /// `None` when no home / cache directory can be determined and none was given.
    pub fn from_env(cache_dir: Option<&Path>) -> Option<Self> {
        let hub = match std::env::var_os(HF_HOME_ENV) {
            Some(home) if !home.is_empty() => PathBuf::from(home).join("hub"),
            _ => dirs::home_dir()?
                .join(".cache")
                .join("huggingface")
                .join("hub"),
        };
        let archives = match cache_dir {
            Some(dir) => dir.to_path_buf(),
            None => match std::env::var_os(CACHE_ENV) {
                Some(dir) if !dir.is_empty() => PathBuf::from(dir),
                _ => dirs::cache_dir()?.join("deeplab"),
            },
        };
        Some(Self { hub, archives })
    }

    /// Folder of one hub repository: `{hub}/models--{org}--{name}`.
    pub fn hub_repo_dir(&self, repo: &str) -> PathBuf {
        self.hub
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// Folder of one archive entry: `{archives}/{name}`.
    pub fn entry_dir(&self, spec: &WeightSpec) -> PathBuf {
        self.archives.join(spec.name)
    }

    /// Where the converted safetensors of an archive entry goes.
    pub fn converted_path(&self, spec: &WeightSpec) -> PathBuf {
        self.entry_dir(spec).join(CONVERTED_FILE)
    }

    /// Where the verified archive of an archive entry goes.
    pub fn archive_path(&self, spec: &WeightSpec) -> PathBuf {
        self.entry_dir(spec).join(spec.source.file_name())
    }

    /// The snapshot path of a hub file if the revision has been resolved and the file is present.
    /// A revision that is a full commit hash is looked up directly (caches written by the Python
    /// client have no `refs/{commit}`), a branch through `refs/{branch}`.
    pub fn hub_snapshot(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let dir = self.hub_repo_dir(repo);
        let mut commits = Vec::new();
        if is_hex(revision, 40) {
            commits.push(revision.to_string());
        }
        if let Ok(c) = std::fs::read_to_string(dir.join("refs").join(revision)) {
            let c = c.trim().to_string();
            if !c.is_empty() && !commits.contains(&c) {
                commits.push(c);
            }
        }
        commits
            .into_iter()
            .map(|c| dir.join("snapshots").join(c).join(file))
            .find(|p| p.is_file())
    }

    /// The usable safetensors file of `spec` if it has already been fetched (and, for archives,
    /// converted). Touches only the local disk.
    pub fn locate(&self, spec: &WeightSpec) -> Option<PathBuf> {
        match spec.source {
            Source::Hub {
                repo,
                revision,
                file,
            } => self.hub_snapshot(repo, revision, file),
            Source::Archive { .. } => {
                let p = self.converted_path(spec);
                p.is_file().then_some(p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::find;

    fn layout(root: &Path) -> CacheLayout {
        CacheLayout {
            hub: root.join("hub"),
            archives: root.join("deeplab"),
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "deeplab-weights-cache-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn explicit_cache_dir_wins() {
        let dir = Path::new("/some/where");
        if let Some(l) = CacheLayout::from_env(Some(dir)) {
            assert_eq!(l.archives, dir);
            assert!(l.hub.ends_with("hub"));
        }
    }

    #[test]
    fn archive_entries_are_located_by_converted_file() {
        let root = scratch("archive");
        let l = layout(&root);
        let spec = find("mobilenetv2_coco_voc_trainaug").unwrap();
        assert_eq!(l.locate(spec), None);
        assert_eq!(
            l.archive_path(spec),
            root.join("deeplab/mobilenetv2_coco_voc_trainaug/deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz")
        );
        std::fs::create_dir_all(l.entry_dir(spec)).unwrap();
        std::fs::write(l.converted_path(spec), b"x").unwrap();
        assert_eq!(l.locate(spec), Some(l.converted_path(spec)));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn hub_files_are_located_through_refs_or_pinned_commit() {
        let root = scratch("hub");
        let l = layout(&root);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo_dir = l.hub_repo_dir("timm/some.model");
        assert!(repo_dir.ends_with("models--timm--some.model"));
        assert_eq!(
            l.hub_snapshot("timm/some.model", "main", "model.safetensors"),
            None
        );
        std::fs::create_dir_all(repo_dir.join("snapshots").join(commit)).unwrap();
        std::fs::write(
            repo_dir
                .join("snapshots")
                .join(commit)
                .join("model.safetensors"),
            b"x",
        )
        .unwrap();
        // A pinned commit needs no ref.
        assert!(l
            .hub_snapshot("timm/some.model", commit, "model.safetensors")
            .is_some());
        // A branch needs refs/{branch}.
        assert_eq!(
            l.hub_snapshot("timm/some.model", "main", "model.safetensors"),
            None
        );
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();
        assert!(l
            .hub_snapshot("timm/some.model", "main", "model.safetensors")
            .is_some());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
