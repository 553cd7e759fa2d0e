//! Hub entries: the `hf-hub` synchronous client downloads into the standard hub cache, then the file is
//! verified against the table's sha256 or the hub's LFS sha256 (the blob's name, from `x-linked-etag`).
use std::path::{Path, PathBuf};

use deeplab_weights::{is_hex, Source, WeightSpec};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::ProgressBar;

use crate::http::{progress_bar, remove_quietly, sha256_file, transport_reason};
use crate::{FetchError, FetchOptions, Fetched};

/// Adapts our progress bar to hf-hub's progress callbacks.
struct HubProgress(ProgressBar);

impl Progress for HubProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}

/// The blob a snapshot entry points to, and the etag it is named after.
fn blob_of(pointer: &Path) -> Result<(PathBuf, String), FetchError> {
    let blob =
        std::fs::canonicalize(pointer).map_err(|e| FetchError::io("cannot resolve", pointer, e))?;
    let etag = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Only a file inside `blobs/` is named after its etag (a copy made where symlinks fail is not).
    let in_blobs = blob
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "blobs");
    Ok((blob, if in_blobs { etag } else { String::new() }))
}

/// Remove a cached hub file: the blob and the snapshot pointer to it.
fn remove_hub_file(pointer: &Path, blob: &Path) {
    remove_quietly(blob);
    if std::fs::symlink_metadata(pointer).is_ok() {
        remove_quietly(pointer);
    }
}

/// Verify a cached or freshly downloaded hub file; on mismatch it is deleted.
fn verify(spec: &WeightSpec, url: &str, pointer: &Path) -> Result<String, FetchError> {
    let (blob, etag) = blob_of(pointer)?;
    let expected = match spec.sha256 {
        Some(h) => h.to_string(),
        None if is_hex(&etag, 64) => etag.clone(),
        None => {
            remove_hub_file(pointer, &blob);
            return Err(FetchError::Unverifiable {
                name: spec.name.to_string(),
                path: blob,
                etag,
            });
        }
    };
    let actual = sha256_file(&blob)?;
    if actual != expected {
        remove_hub_file(pointer, &blob);
        return Err(FetchError::ChecksumMismatch {
            name: spec.name.to_string(),
            url: url.to_string(),
            path: blob,
            expected,
            actual,
        });
    }
    if let Some(size) = spec.size {
        let len = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
        if len != size {
            remove_hub_file(pointer, &blob);
            return Err(FetchError::SizeMismatch {
                name: spec.name.to_string(),
                url: url.to_string(),
                expected: size,
                actual: len,
            });
        }
    }
    Ok(actual)
}

fn map_api_error(
    e: ApiError,
    spec: &WeightSpec,
    url: &str,
    opts: &FetchOptions,
    repo: &str,
) -> FetchError {
    let name = spec.name.to_string();
    match e {
        ApiError::RequestError(err) => match *err {
            ureq::Error::Status(status, resp) => FetchError::Http {
                name,
                url: resp.get_url().to_string(),
                status,
            },
            ureq::Error::Transport(t) => FetchError::Unreachable {
                name,
                url: url.to_string(),
                reason: transport_reason(&t, url),
                cache: opts.cache.hub_repo_dir(repo),
            },
        },
        ApiError::IoError(io) => {
            // A body read that fails mid-way is a cut transfer; hf-hub keeps `blobs/<etag>.part`.
            let blobs = opts.cache.hub_repo_dir(repo).join("blobs");
            let part = find_part(&blobs).unwrap_or(blobs);
            let received = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            match io.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::TimedOut => FetchError::Truncated {
                    url: url.to_string(),
                    received,
                    expected: "?".to_string(),
                    part,
                },
                _ => FetchError::io("cannot download into", &part, io),
            }
        }
        other => FetchError::Protocol {
            name,
            url: url.to_string(),
            reason: other.to_string(),
        },
    }
}

/// A `.part` file left in a repository's blob folder by an interrupted download.
fn find_part(blobs: &Path) -> Option<PathBuf> {
    std::fs::read_dir(blobs)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "part"))
}

pub(crate) fn fetch_hub(spec: &WeightSpec, opts: &FetchOptions) -> Result<Fetched, FetchError> {
    let Source::Hub {
        repo,
        revision,
        file,
    } = spec.source
    else {
        unreachable!("fetch_hub is only called for hub entries")
    };
    let url = opts.hub_url(spec).unwrap_or_default();
    let mut notes = Vec::new();
    if !spec.source.is_pinned() {
        notes.push(format!(
            "{repo} is not pinned to a commit (revision `{revision}`); verified against the hub's LFS sha256"
        ));
    }

    // 1. Cached: verify locally, no request at all.
    if let Some(pointer) = opts.cache.hub_snapshot(repo, revision, file) {
        match verify(spec, &url, &pointer) {
            Ok(sha256) => {
                return Ok(Fetched {
                    name: spec.name,
                    path: pointer,
                    sha256,
                    from_cache: true,
                    notes,
                })
            }
            Err(
                e @ (FetchError::ChecksumMismatch { .. }
                | FetchError::SizeMismatch { .. }
                | FetchError::Unverifiable { .. }),
            ) => {
                notes.push(format!(
                    "the cached copy was bad and has been removed ({e}); downloading again"
                ));
            }
            Err(e) => return Err(e),
        }
    }

    // 2. Download through hf-hub (HEAD-like ranged GET for the metadata, then a resumable GET).
    std::fs::create_dir_all(&opts.cache.hub)
        .map_err(|e| FetchError::io("cannot create the hub cache", &opts.cache.hub, e))?;
    let api = ApiBuilder::from_cache(Cache::new(opts.cache.hub.clone()))
        .with_endpoint(opts.hub_endpoint.clone())
        .with_progress(false)
        .with_retries(0)
        .build()
        .map_err(|e| map_api_error(e, spec, &url, opts, repo))?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let download = |label: &str| {
        api_repo.download_with_progress(file, HubProgress(progress_bar(opts.progress, label)))
    };
    let pointer = match download(spec.name) {
        Ok(p) => p,
        Err(ApiError::InvalidResume) => {
            // A `.part` longer than the file: drop it and start over once.
            if let Some(part) = find_part(&opts.cache.hub_repo_dir(repo).join("blobs")) {
                remove_quietly(&part);
            }
            download(spec.name).map_err(|e| map_api_error(e, spec, &url, opts, repo))?
        }
        Err(e) => return Err(map_api_error(e, spec, &url, opts, repo)),
    };
    let sha256 = verify(spec, &url, &pointer)?;
    Ok(Fetched {
        name: spec.name,
        path: pointer,
        sha256,
        from_cache: false,
        notes,
    })
}
