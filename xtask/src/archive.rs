//! Archive entries: download the model-zoo `.tar.gz` into the project cache, verify, extract, find the
//! TensorFlow checkpoint and convert it once into `model.safetensors`, recorded by a stamp file.
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use deeplab_weights::cache::{CONVERTED_FILE, STAMP_FILE};
use deeplab_weights::WeightSpec;
use serde::{Deserialize, Serialize};

use crate::http::{download_resumable, progress_bar, remove_quietly, sha256_file, Target};
use crate::{Converter, FetchError, FetchOptions, Fetched};

/// What `model.safetensors.json` records about a conversion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub name: String,
    pub url: String,
    pub archive: String,
    pub archive_sha256: String,
    pub archive_size: u64,
    /// Checkpoint prefix inside the archive (`dir/model.ckpt`).
    pub checkpoint: String,
    pub converted_sha256: String,
    pub converted_size: u64,
}

fn read_stamp(path: &Path) -> Option<Stamp> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Write `contents` to `path` through a temporary file in the same folder and a rename.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), FetchError> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, contents).map_err(|e| FetchError::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| FetchError::io("cannot rename into", path, e))
}

/// Every `*.index` file under `dir` (recursively), sorted.
fn index_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let path = entry.path();
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_file() && path.extension().is_some_and(|e| e == "index") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The checkpoint prefix in an extracted archive: the single `X.index` with at least one `X.data-*`.
pub(crate) fn find_checkpoint(
    name: &str,
    archive: &Path,
    dir: &Path,
) -> Result<PathBuf, FetchError> {
    let bad = |reason: String| FetchError::Archive {
        name: name.to_string(),
        path: archive.to_path_buf(),
        reason,
    };
    let indexes = index_files(dir).map_err(|e| FetchError::io("cannot list", dir, e))?;
    let mut prefixes = Vec::new();
    for idx in indexes {
        let prefix = idx.with_extension("");
        let stem = prefix
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let has_data = std::fs::read_dir(prefix.parent().unwrap_or(dir))
            .map_err(|e| FetchError::io("cannot list", dir, e))?
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{stem}.data-"))
            });
        if has_data {
            prefixes.push(prefix);
        }
    }
    match prefixes.len() {
        1 => Ok(prefixes.remove(0)),
        0 => Err(bad(
            "it holds no TensorFlow checkpoint (no `*.index` file with its `*.data-*` shards)"
                .to_string(),
        )),
        _ => Err(bad(format!(
            "it holds several checkpoints: {}",
            prefixes
                .iter()
                .map(|p| p.strip_prefix(dir).unwrap_or(p).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Extract a `.tar.gz` into `dest` (created fresh). Entries that would land outside `dest` are
/// refused by the `tar` crate.
fn extract(name: &str, archive: &Path, dest: &Path) -> Result<(), FetchError> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| FetchError::io("cannot clear", dest, e))?;
    }
    std::fs::create_dir_all(dest).map_err(|e| FetchError::io("cannot create", dest, e))?;
    let file = File::open(archive).map_err(|e| FetchError::io("cannot open", archive, e))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut tar = tar::Archive::new(gz);
    tar.set_preserve_permissions(false);
    tar.unpack(dest).map_err(|e| FetchError::Archive {
        name: name.to_string(),
        path: archive.to_path_buf(),
        reason: format!("cannot extract it as .tar.gz: {e}"),
    })
}

/// The converted file is usable when its stamp exists, matches the table, and its hash matches.
fn cached_conversion(spec: &WeightSpec, converted: &Path, stamp_path: &Path) -> Option<Stamp> {
    if !converted.is_file() {
        return None;
    }
    let stamp = read_stamp(stamp_path)?;
    if stamp.name != spec.name {
        return None;
    }
    if let Some(expected) = spec.sha256 {
        if stamp.archive_sha256 != expected {
            return None;
        }
    }
    let len = std::fs::metadata(converted).ok()?.len();
    if len != stamp.converted_size {
        return None;
    }
    (sha256_file(converted).ok()? == stamp.converted_sha256).then_some(stamp)
}

pub(crate) fn fetch_archive(
    spec: &WeightSpec,
    opts: &FetchOptions,
    convert: Converter<'_>,
) -> Result<Fetched, FetchError> {
    let url = opts.archive_url(spec).unwrap_or_default();
    let dir = opts.cache.entry_dir(spec);
    let converted = dir.join(CONVERTED_FILE);
    let stamp_path = dir.join(STAMP_FILE);
    let archive = opts.cache.archive_path(spec);
    let mut notes = Vec::new();

    // 1. Already converted and intact: no request.
    if let Some(stamp) = cached_conversion(spec, &converted, &stamp_path) {
        return Ok(Fetched {
            name: spec.name,
            path: converted,
            sha256: stamp.archive_sha256,
            from_cache: true,
            notes,
        });
    }
    if converted.exists() {
        notes.push(format!(
            "{} did not match its record {} and is rebuilt",
            converted.display(),
            stamp_path.display()
        ));
        remove_quietly(&converted);
    }
    std::fs::create_dir_all(&dir).map_err(|e| FetchError::io("cannot create", &dir, e))?;

    // 2. The verified archive: from the cache, or downloaded into `.part` and renamed when verified.
    let mut from_cache = true;
    let archive_sha256 = if archive.is_file() {
        let actual = sha256_file(&archive)?;
        match spec.sha256 {
            Some(expected) if expected != actual => {
                remove_quietly(&archive);
                notes.push(format!(
                    "the cached archive had sha256 {actual} instead of {expected}; it was deleted"
                ));
                None
            }
            _ => Some(actual),
        }
    } else {
        None
    };
    let archive_sha256 = match archive_sha256 {
        Some(h) => h,
        None => {
            from_cache = false;
            let part = archive.with_extension("gz.part");
            let pb = progress_bar(opts.progress, spec.name);
            let target = Target {
                name: spec.name,
                url: &url,
                cache: &archive,
            };
            if let Err(e) = download_resumable(&target, &part, spec.size, opts.timeout, &pb) {
                // Leave no empty folder behind when nothing was downloaded.
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
            let actual = sha256_file(&part)?;
            if let Some(expected) = spec.sha256 {
                if actual != expected {
                    remove_quietly(&part);
                    return Err(FetchError::ChecksumMismatch {
                        name: spec.name.to_string(),
                        url,
                        path: part,
                        expected: expected.to_string(),
                        actual,
                    });
                }
            } else {
                notes.push(format!(
                    "the table has no sha256 for `{}`; the download has sha256 {actual}",
                    spec.name
                ));
            }
            std::fs::rename(&part, &archive)
                .map_err(|e| FetchError::io("cannot rename into", &archive, e))?;
            actual
        }
    };
    let archive_size = std::fs::metadata(&archive)
        .map_err(|e| FetchError::io("cannot stat", &archive, e))?
        .len();

    // 3. Extract, find the checkpoint, convert into a temporary file, rename, record.
    let extract_dir = dir.join("extract.tmp");
    let result = (|| {
        if let Err(e) = extract(spec.name, &archive, &extract_dir) {
            // A corrupt archive is useless: delete it so the next run downloads it again.
            if matches!(e, FetchError::Archive { .. }) {
                remove_quietly(&archive);
            }
            return Err(e);
        }
        let prefix = find_checkpoint(spec.name, &archive, &extract_dir)?;
        let tmp_out = dir.join(format!("{CONVERTED_FILE}.tmp"));
        remove_quietly(&tmp_out);
        convert(&prefix, spec, &tmp_out).map_err(|source| {
            remove_quietly(&tmp_out);
            FetchError::Conversion {
                name: spec.name.to_string(),
                checkpoint: prefix.clone(),
                source,
            }
        })?;
        let converted_size = match std::fs::metadata(&tmp_out) {
            Ok(m) if m.is_file() && m.len() > 0 => m.len(),
            _ => {
                remove_quietly(&tmp_out);
                return Err(FetchError::Conversion {
                    name: spec.name.to_string(),
                    checkpoint: prefix.clone(),
                    source: anyhow::anyhow!("the converter wrote no file at {}", tmp_out.display()),
                });
            }
        };
        let converted_sha256 = sha256_file(&tmp_out)?;
        std::fs::rename(&tmp_out, &converted)
            .map_err(|e| FetchError::io("cannot rename into", &converted, e))?;
        let stamp = Stamp {
            name: spec.name.to_string(),
            url: url.clone(),
            archive: spec.source.file_name().to_string(),
            archive_sha256: archive_sha256.clone(),
            archive_size,
            checkpoint: prefix
                .strip_prefix(&extract_dir)
                .unwrap_or(&prefix)
                .to_string_lossy()
                .into_owned(),
            converted_sha256,
            converted_size,
        };
        let json = serde_json::to_vec_pretty(&stamp).map_err(|e| FetchError::Io {
            op: "cannot encode",
            path: stamp_path.clone(),
            source: std::io::Error::other(e),
        })?;
        if let Err(e) = write_atomic(&stamp_path, &json) {
            remove_quietly(&converted);
            return Err(e);
        }
        Ok(())
    })();
    if extract_dir.exists() {
        let _ = std::fs::remove_dir_all(&extract_dir);
    }
    result?;
    Ok(Fetched {
        name: spec.name,
        path: converted,
        sha256: archive_sha256,
        from_cache: false,
        notes: {
            if from_cache {
                notes.push("converted from the cached archive (no download)".to_string());
            }
            notes
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_discovery() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let a = Path::new("a.tar.gz");
        let err = find_checkpoint("n", a, root).unwrap_err().to_string();
        assert!(
            err.contains("no TensorFlow checkpoint") && err.contains("a.tar.gz"),
            "{err}"
        );

        std::fs::create_dir_all(root.join("x")).unwrap();
        std::fs::write(root.join("x/model.ckpt.index"), b"i").unwrap();
        // An index without data shards is not a checkpoint.
        assert!(find_checkpoint("n", a, root).is_err());
        std::fs::write(root.join("x/model.ckpt.data-00000-of-00001"), b"d").unwrap();
        assert_eq!(
            find_checkpoint("n", a, root).unwrap(),
            root.join("x/model.ckpt")
        );

        std::fs::write(root.join("x/other.index"), b"i").unwrap();
        std::fs::write(root.join("x/other.data-00000-of-00001"), b"d").unwrap();
        let err = find_checkpoint("n", a, root).unwrap_err().to_string();
        assert!(err.contains("several checkpoints"), "{err}");
    }

    #[test]
    fn stamp_roundtrip_and_atomic_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(STAMP_FILE);
        let s = Stamp {
            name: "n".into(),
            url: "u".into(),
            archive: "a.tar.gz".into(),
            archive_sha256: "00".into(),
            archive_size: 3,
            checkpoint: "x/model.ckpt".into(),
            converted_sha256: "11".into(),
            converted_size: 4,
        };
        write_atomic(&p, &serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(read_stamp(&p), Some(s));
        assert!(!p.with_extension("json.tmp").exists());
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(read_stamp(&p), None);
    }
}
