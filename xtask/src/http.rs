//! Plain-HTTP(S) resumable download into a `.part` file, hashing and progress bars.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::FetchError;

/// Lower-case hex sha256 of a file, streamed.
///
/// # Errors
/// [`FetchError::Io`] naming the file when it cannot be read.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(|e| FetchError::io("cannot open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| FetchError::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A progress bar for one download (hidden when `show` is false or stderr is not a terminal).
pub(crate) fn progress_bar(show: bool, label: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{msg:30!} [{elapsed_precise}] [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(label.to_string());
    pb
}

/// Parse `Content-Range: bytes START-END/TOTAL` into `(start, total)` (`total` may be `*`).
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.trim().split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

/// Context for error messages.
pub(crate) struct Target<'a> {
    pub name: &'a str,
    pub url: &'a str,
    /// Where the final file would be cached (for the offline message).
    pub cache: &'a Path,
}

fn agent(timeout: Duration, url: &str) -> ureq::Agent {
    // Proxies from the environment, except for the loopback addresses tests serve from.
    let loopback =
        url.contains("://127.") || url.contains("://localhost") || url.contains("://[::1]");
    ureq::AgentBuilder::new()
        .try_proxy_from_env(!loopback)
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .redirects(8)
        .build()
}

/// Download `url` into `part`, resuming from the bytes already there when the server honours
/// `Range`, restarting otherwise. Returns when the announced length has been written; a shorter
/// transfer is [`FetchError::Truncated`] with the partial file kept for the next run. Returns the size.
pub(crate) fn download_resumable(
    t: &Target<'_>,
    part: &Path,
    expected_size: Option<u64>,
    timeout: Duration,
    pb: &ProgressBar,
) -> Result<u64, FetchError> {
    let agent = agent(timeout, t.url);
    let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if let Some(exp) = expected_size {
        if have > exp {
            remove_quietly(part);
            have = 0;
        }
    }
    // At most two attempts: a resume the server refuses (416) restarts from zero once.
    for attempt in 0..2 {
        let mut req = agent.get(t.url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) if have > 0 && attempt == 0 => {
                remove_quietly(part);
                have = 0;
                continue;
            }
            Err(ureq::Error::Status(status, _)) => {
                return Err(FetchError::Http {
                    name: t.name.to_string(),
                    url: t.url.to_string(),
                    status,
                });
            }
            Err(ureq::Error::Transport(tr)) => {
                return Err(FetchError::Unreachable {
                    name: t.name.to_string(),
                    url: t.url.to_string(),
                    reason: transport_reason(&tr, t.url),
                    cache: t.cache.to_path_buf(),
                });
            }
        };
        let content_length: Option<u64> = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse().ok());
        let (start, total) = if resp.status() == 206 {
            match resp.header("Content-Range").and_then(parse_content_range) {
                Some((s, total)) if s == have => (s, total.or(content_length.map(|l| l + s))),
                // A range we did not ask for: throw the partial file away and start over.
                _ => {
                    remove_quietly(part);
                    have = 0;
                    continue;
                }
            }
        } else {
            (0, content_length)
        };
        if let (Some(total), Some(exp)) = (total, expected_size) {
            if total != exp {
                remove_quietly(part);
                return Err(FetchError::SizeMismatch {
                    name: t.name.to_string(),
                    url: t.url.to_string(),
                    expected: exp,
                    actual: total,
                });
            }
        }
        let mut file = if start > 0 {
            OpenOptions::new().append(true).open(part)
        } else {
            File::create(part)
        }
        .map_err(|e| FetchError::io("cannot write", part, e))?;
        pb.set_length(total.or(expected_size).unwrap_or(0));
        pb.set_position(start);

        let mut reader = resp.into_reader();
        let mut written = start;
        let mut buf = vec![0u8; 256 * 1024];
        let cut_short = loop {
            match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    file.write_all(&buf[..n])
                        .map_err(|e| FetchError::io("cannot write", part, e))?;
                    written += n as u64;
                    pb.set_position(written);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        file.flush()
            .map_err(|e| FetchError::io("cannot write", part, e))?;
        file.sync_all()
            .map_err(|e| FetchError::io("cannot sync", part, e))?;
        drop(file);
        let complete = match total {
            Some(total) => written == total,
            None => cut_short.is_none(),
        };
        if !complete || cut_short.is_some() {
            pb.abandon();
            return Err(FetchError::Truncated {
                url: t.url.to_string(),
                received: written,
                expected: total.map_or_else(|| "?".to_string(), |t| t.to_string()),
                part: part.to_path_buf(),
            });
        }
        if let Some(exp) = expected_size {
            if written != exp {
                remove_quietly(part);
                return Err(FetchError::SizeMismatch {
                    name: t.name.to_string(),
                    url: t.url.to_string(),
                    expected: exp,
                    actual: written,
                });
            }
        }
        pb.finish();
        return Ok(written);
    }
    Err(FetchError::Protocol {
        name: t.name.to_string(),
        url: t.url.to_string(),
        reason: "the server refused to resume and to restart the download".to_string(),
    })
}

/// The transport error without the URL ureq repeats at its start (the message already names it).
pub(crate) fn transport_reason(tr: &ureq::Transport, url: &str) -> String {
    let text = tr.to_string();
    text.strip_prefix(url)
        .and_then(|r| r.strip_prefix(": "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// Remove a file, ignoring a missing one.
pub(crate) fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 0-0/1234"), Some((0, Some(1234))));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, None)));
        assert_eq!(parse_content_range("bytes=1-2/3"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let err = sha256_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
