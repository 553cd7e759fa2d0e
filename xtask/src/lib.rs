//! Library behind `cargo xtask`: verified, resumable downloads of the pretrained weights in the
//! [`deeplab_weights`] table.
//!
//! [`fetch`] turns one table entry into a usable safetensors file:
//! - **Hub entries** go through the `hf-hub` crate's synchronous client into the standard hub cache
//!   (honouring `HF_ENDPOINT` and `HF_HOME` via [`FetchOptions::from_env`]); the file is checked against
//!   the table's sha256 or, where the table has none, the hub's LFS sha256 (the `x-linked-etag` that
//!   names the blob).
//! - **Archive entries** (the official model-zoo `.tar.gz` files) are downloaded over plain HTTP(S) into
//!   the project cache with resume (`Range`), verified, extracted, and converted once by the
//!   [`Converter`] the caller passes (the TensorFlow-checkpoint converter of the heads crate).
//!
//! In both cases downloads land in a temporary `.part` file renamed only when complete and verified,
//! a checksum mismatch deletes the file and names both hashes, an interrupted transfer resumes on the
//! next run, a cached verified file is served without any network request, and being offline with
//! nothing cached gives an error naming the URL.
//!
//! ```no_run
//! use std::path::Path;
//! use deeplab_weights::{find, WeightSpec};
//! use xtask::{fetch, FetchOptions};
//!
//! fn convert(ckpt: &Path, spec: &WeightSpec, out: &Path) -> anyhow::Result<()> {
//!     anyhow::bail!("plug the TF-checkpoint converter in here ({} -> {})", ckpt.display(), out.display())
//! }
//!
//! let opts = FetchOptions::from_env(None)?;
//! let fetched = fetch(find("xception65.tf_in1k")?, &opts, &convert)?;
//! println!("{}", fetched.path.display());
//! # Ok::<(), anyhow::Error>(())
//! ```
#![deny(missing_docs)]

mod archive;
mod http;
mod hub;
pub mod list;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use deeplab_weights;
use deeplab_weights::cache::CacheLayout;
use deeplab_weights::{Source, WeightSpec};

pub use http::sha256_file;

/// Converts an extracted TensorFlow checkpoint into canonical safetensors:
/// `(checkpoint prefix, table entry, output path)`. The prefix is the path without the `.index` /
/// `.data-*` suffixes (e.g. `.../model.ckpt`); the output path is a temporary file in the cache folder
/// that the fetcher renames into place once the converter returns `Ok`.
pub type Converter<'a> = &'a dyn Fn(&Path, &WeightSpec, &Path) -> anyhow::Result<()>;

/// Environment variable naming a mirror for the model-zoo archives: the archive file name is appended
/// to it instead of `http://download.tensorflow.org/models/`.
pub const ARCHIVE_MIRROR_ENV: &str = "DEEPLAB_ARCHIVE_MIRROR";
/// Environment variable of the hub endpoint (default `https://huggingface.co`).
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// The default hub endpoint.
pub const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";

/// Where to download from and to.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The hub cache and the project archive cache.
    pub cache: CacheLayout,
    /// Base URL of the hub (`HF_ENDPOINT`), without a trailing slash.
    pub hub_endpoint: String,
    /// Optional base URL replacing the archive URLs' directory (`DEEPLAB_ARCHIVE_MIRROR`).
    pub archive_mirror: Option<String>,
    /// Draw a progress bar per download (on stderr, only when it is a terminal).
    pub progress: bool,
    /// Timeout for connecting and for each read of an archive download.
    pub timeout: Duration,
}

impl FetchOptions {
    /// Options from the environment: `HF_HOME`, `HF_ENDPOINT`, `DEEPLAB_CACHE` (overridden by
    /// `cache_dir`) and `DEEPLAB_ARCHIVE_MIRROR`; progress bars on.
    ///
    /// # Errors
    /// [`FetchError::NoCacheDir`] when no home or cache directory can be found and none was given.
    pub fn from_env(cache_dir: Option<&Path>) -> Result<Self, FetchError> {
        let cache = CacheLayout::from_env(cache_dir).ok_or(FetchError::NoCacheDir)?;
        let hub_endpoint = std::env::var(HF_ENDPOINT_ENV)
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_HUB_ENDPOINT.to_string());
        let archive_mirror = std::env::var(ARCHIVE_MIRROR_ENV)
            .ok()
            .filter(|e| !e.trim().is_empty());
        Ok(Self::new(cache, &hub_endpoint, archive_mirror.as_deref()))
    }

    /// Options with explicit locations (what tests use); progress bars on, 60 s timeout.
    pub fn new(cache: CacheLayout, hub_endpoint: &str, archive_mirror: Option<&str>) -> Self {
        Self {
            cache,
            hub_endpoint: hub_endpoint.trim().trim_end_matches('/').to_string(),
            archive_mirror: archive_mirror.map(|m| m.trim().trim_end_matches('/').to_string()),
            progress: true,
            timeout: Duration::from_secs(60),
        }
    }

    /// The URL an archive entry is downloaded from: the table URL, or the mirror + its file name.
    /// `None` for hub entries.
    pub fn archive_url(&self, spec: &WeightSpec) -> Option<String> {
        match spec.source {
            Source::Archive { url } => Some(match &self.archive_mirror {
                Some(m) => format!("{m}/{}", spec.source.file_name()),
                None => url.to_string(),
            }),
            Source::Hub { .. } => None,
        }
    }

    /// The URL a hub entry resolves to: `{endpoint}/{repo}/resolve/{revision}/{file}`.
    /// `None` for archive entries.
    pub fn hub_url(&self, spec: &WeightSpec) -> Option<String> {
        match spec.source {
            Source::Hub {
                repo,
                revision,
                file,
            } => Some(format!(
                "{}/{repo}/resolve/{}/{file}",
                self.hub_endpoint,
                revision.replace('/', "%2F")
            )),
            Source::Archive { .. } => None,
        }
    }
}

/// A fetched, verified, usable weights file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Table name of the entry.
    pub name: &'static str,
    /// The usable safetensors file.
    pub path: PathBuf,
    /// Lower-case hex sha256 of the downloaded file (the hub file, or the archive).
    pub sha256: String,
    /// `true` when everything came from the cache and no request was made.
    pub from_cache: bool,
    /// Things worth telling the user (a corrupt cache entry that was replaced, an unpinned revision).
    pub notes: Vec<String>,
}

/// Everything that can go wrong while fetching.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No cache directory could be determined.
    #[error("cannot determine a cache directory (no home directory); pass --cache-dir or set DEEPLAB_CACHE / HF_HOME")]
    NoCacheDir,
    /// The server could not be reached.
    #[error(
        "cannot reach {url}: {reason}. Are you offline? `{name}` is not in the cache ({cache})"
    )]
    Unreachable {
        /// Table name.
        name: String,
        /// The URL that was requested.
        url: String,
        /// What the HTTP client said.
        reason: String,
        /// Where the file would have been cached.
        cache: PathBuf,
    },
    /// The server answered with an error status.
    #[error("HTTP {status} for {url} (`{name}`){}", if *.status == 404 { ": not found; the link may be dead, see DEEPLAB_ARCHIVE_MIRROR / HF_ENDPOINT" } else { "" })]
    Http {
        /// Table name.
        name: String,
        /// The URL that was requested.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The transfer stopped before the announced length.
    #[error("download of {url} was cut short after {received} of {expected} bytes; the partial file {} is kept and the next run resumes it", .part.display())]
    Truncated {
        /// The URL that was requested.
        url: String,
        /// Bytes on disk so far (all transfers together).
        received: u64,
        /// The full size announced by the server, or `?` when unknown.
        expected: String,
        /// The partial file.
        part: PathBuf,
    },
    /// The server's size disagrees with the table.
    #[error("{url} announces {actual} bytes but the table expects {expected} for `{name}`; nothing was kept")]
    SizeMismatch {
        /// Table name.
        name: String,
        /// The URL that was requested.
        url: String,
        /// Size in the table.
        expected: u64,
        /// Size the server announced or delivered.
        actual: u64,
    },
    /// The downloaded file's hash is not the expected one.
    #[error("checksum mismatch for {} (`{name}`, from {url}): expected sha256 {expected}, got {actual}; the file was deleted", .path.display())]
    ChecksumMismatch {
        /// Table name.
        name: String,
        /// Where it came from.
        url: String,
        /// The deleted file.
        path: PathBuf,
        /// The expected sha256.
        expected: String,
        /// The sha256 of what arrived.
        actual: String,
    },
    /// Neither the table nor the server gives a sha256 to check a hub file against.
    #[error("cannot verify {} (`{name}`): the table has no sha256 and the hub's etag `{etag}` is not an LFS sha256; the file was deleted", .path.display())]
    Unverifiable {
        /// Table name.
        name: String,
        /// The deleted file.
        path: PathBuf,
        /// The etag the hub gave.
        etag: String,
    },
    /// The hub answered in a way the client does not understand.
    #[error("unexpected answer from the hub for {url} (`{name}`): {reason}")]
    Protocol {
        /// Table name.
        name: String,
        /// The URL that was requested.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The archive could not be read or holds no usable checkpoint.
    #[error("bad archive {} (`{name}`): {reason}", .path.display())]
    Archive {
        /// Table name.
        name: String,
        /// The archive (or extraction folder).
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The converter failed.
    #[error("converting the checkpoint {} of `{name}` to safetensors failed: {source:#}", .checkpoint.display())]
    Conversion {
        /// Table name.
        name: String,
        /// The checkpoint prefix that was given to the converter.
        checkpoint: PathBuf,
        /// The converter's error.
        source: anyhow::Error,
    },
    /// A local file operation failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl FetchError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        FetchError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Fetch one table entry (or serve it from the cache) and return the usable safetensors file.
///
/// `convert` is only called for archive entries that have not been converted yet.
///
/// # Errors
/// See [`FetchError`]: every error names the entry and the URL or file involved.
pub fn fetch(
    spec: &WeightSpec,
    opts: &FetchOptions,
    convert: Converter<'_>,
) -> Result<Fetched, FetchError> {
    match spec.source {
        Source::Hub { .. } => hub::fetch_hub(spec, opts),
        Source::Archive { .. } => archive::fetch_archive(spec, opts, convert),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeplab_weights::find;

    fn opts() -> FetchOptions {
        let cache = CacheLayout {
            hub: "/tmp/h".into(),
            archives: "/tmp/a".into(),
        };
        FetchOptions::new(
            cache,
            "http://127.0.0.1:9/",
            Some("http://mirror.example/zoo/"),
        )
    }

    #[test]
    fn urls_follow_the_table_and_the_overrides() {
        let o = opts();
        let hub = find("xception41.tf_in1k").unwrap();
        assert_eq!(
            o.hub_url(hub).unwrap(),
            "http://127.0.0.1:9/timm/xception41.tf_in1k/resolve/2dd4221154563cec010f641b675fb4a06376ff9b/model.safetensors"
        );
        assert_eq!(o.archive_url(hub), None);
        let zoo = find("mobilenetv2_coco_voc_trainaug").unwrap();
        assert_eq!(
            o.archive_url(zoo).unwrap(),
            "http://mirror.example/zoo/deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz"
        );
        let mut plain = o.clone();
        plain.archive_mirror = None;
        assert_eq!(
            plain.archive_url(zoo).unwrap(),
            "http://download.tensorflow.org/models/deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz"
        );
    }

    #[test]
    fn errors_name_both_hashes_and_the_file() {
        let e = FetchError::ChecksumMismatch {
            name: "n".into(),
            url: "http://x/y".into(),
            path: "/c/f".into(),
            expected: "aa".into(),
            actual: "bb".into(),
        };
        let m = e.to_string();
        assert!(
            m.contains("expected sha256 aa") && m.contains("got bb") && m.contains("/c/f"),
            "{m}"
        );
        let e = FetchError::Http {
            name: "n".into(),
            url: "http://x/y".into(),
            status: 404,
        };
        assert!(e.to_string().contains("http://x/y") && e.to_string().contains("not found"));
    }
}
