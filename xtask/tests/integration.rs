//! Integration tests of `fetch-weights` against HTTP servers the tests start on 127.0.0.1: a hub layout
//! that the `hf-hub` client accepts and a model-zoo archive layout, with request counting, truncation,
//! checksum mismatches, 404s and the offline case.

mod server {
    //! A tiny HTTP/1.1 server on 127.0.0.1 that serves fixed routes, honours `Range`, can cut a
    //! transfer short or announce a wrong length, logs every request, and stops by itself (on drop,
    //! and in any case after two minutes).
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    /// A file served with optional faults.
    #[derive(Clone, Default)]
    pub struct Resource {
        pub data: Vec<u8>,
        /// How many body responses (longer than `cut_at`) are cut after `cut_at` bytes.
        pub cut_first: usize,
        pub cut_at: usize,
        /// Announce this Content-Length instead of the real one, then close.
        pub declared_len: Option<u64>,
    }

    #[derive(Clone)]
    pub enum Route {
        Bytes(Resource),
        /// `302 Found` to an absolute URL, with extra headers (the hub's LFS redirect).
        Redirect {
            location: String,
            headers: Vec<(String, String)>,
        },
    }

    #[derive(Clone, Debug)]
    pub struct Request {
        pub method: String,
        pub path: String,
        pub range: Option<String>,
    }

    struct State {
        routes: HashMap<String, Route>,
        log: Vec<Request>,
    }

    pub struct Server {
        port: u16,
        stop: Arc<AtomicBool>,
        state: Arc<Mutex<State>>,
        handle: Option<JoinHandle<()>>,
    }

    impl Server {
        pub fn start() -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
            listener.set_nonblocking(true).expect("nonblocking");
            let port = listener.local_addr().expect("addr").port();
            let stop = Arc::new(AtomicBool::new(false));
            let state = Arc::new(Mutex::new(State {
                routes: HashMap::new(),
                log: Vec::new(),
            }));
            let (stop2, state2) = (stop.clone(), state.clone());
            let handle = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => handle(stream, &state2),
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
            Server {
                port,
                stop,
                state,
                handle: Some(handle),
            }
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }

        pub fn route(&self, path: &str, route: Route) {
            self.state
                .lock()
                .unwrap()
                .routes
                .insert(path.to_string(), route);
        }

        pub fn requests(&self) -> usize {
            self.state.lock().unwrap().log.len()
        }

        pub fn log(&self) -> Vec<Request> {
            self.state.lock().unwrap().log.clone()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    fn read_head(stream: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if buf.len() > 16 * 1024 || stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        String::from_utf8(buf).ok()
    }

    fn handle(mut stream: TcpStream, state: &Mutex<State>) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let Some(head) = read_head(&mut stream) else {
            return;
        };
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split_whitespace();
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("/");
        let path = target.split('?').next().unwrap_or("/").to_string();
        let range = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
            .map(|(_, v)| v.trim().to_string());
        let route = {
            let mut s = state.lock().unwrap();
            s.log.push(Request {
                method: method.clone(),
                path: path.clone(),
                range: range.clone(),
            });
            let route = s.routes.get(&path).cloned();
            // Consume one "cut" of a faulty resource when this response will carry a long body.
            if let Some(Route::Bytes(r)) = s.routes.get_mut(&path) {
                let (start, end) = span(range.as_deref(), r.data.len());
                if method == "GET" && r.cut_first > 0 && end.saturating_sub(start) > r.cut_at {
                    r.cut_first -= 1;
                }
            }
            route
        };
        let response_head = |status: &str, headers: &[(String, String)], len: u64| {
            let mut h =
                format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {len}\r\n");
            for (k, v) in headers {
                h.push_str(&format!("{k}: {v}\r\n"));
            }
            h.push_str("\r\n");
            h
        };
        match route {
            None => {
                let _ = stream.write_all(response_head("404 Not Found", &[], 0).as_bytes());
            }
            Some(Route::Redirect { location, headers }) => {
                let mut hs = headers.clone();
                hs.push(("Location".into(), location));
                let _ = stream.write_all(response_head("302 Found", &hs, 0).as_bytes());
            }
            Some(Route::Bytes(r)) => {
                let total = r.data.len();
                let ranged = range.is_some();
                let (start, end) = span(range.as_deref(), total);
                if ranged && start >= total && total > 0 {
                    let hs = vec![("Content-Range".to_string(), format!("bytes */{total}"))];
                    let _ = stream
                        .write_all(response_head("416 Range Not Satisfiable", &hs, 0).as_bytes());
                } else {
                    let body = &r.data[start..end];
                    let (status, hs) = if ranged {
                        let cr = format!("bytes {start}-{}/{total}", end.saturating_sub(1));
                        (
                            "206 Partial Content",
                            vec![("Content-Range".to_string(), cr)],
                        )
                    } else {
                        ("200 OK", vec![])
                    };
                    // Re-read the fault counters as they were before this request consumed one.
                    let cut = {
                        let s = state.lock().unwrap();
                        match s.routes.get(&path) {
                            Some(Route::Bytes(now)) => now.cut_first < r.cut_first,
                            _ => false,
                        }
                    };
                    let len = r.declared_len.unwrap_or(body.len() as u64);
                    let _ = stream.write_all(response_head(status, &hs, len).as_bytes());
                    if method != "HEAD" {
                        let n = if cut {
                            r.cut_at.min(body.len())
                        } else {
                            body.len()
                        };
                        let _ = stream.write_all(&body[..n]);
                    }
                }
            }
        }
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Both);
    }

    /// The byte span `[start, end)` a `Range: bytes=a-b` header selects (the whole file without one).
    fn span(range: Option<&str>, total: usize) -> (usize, usize) {
        let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
            return (0, total);
        };
        let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
        let start: usize = a.trim().parse().unwrap_or(0);
        let end = match b.trim().parse::<usize>() {
            Ok(b) => (b + 1).min(total),
            Err(_) => total,
        };
        (start, end.max(start.min(total)))
    }
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use deeplab_weights::cache::CacheLayout;
use deeplab_weights::{find, Source, WeightSpec};
use server::{Resource, Route, Server};
use sha2::Digest as _;
use xtask::{fetch, FetchError, FetchOptions};

const COMMIT: &str = "2dd4221154563cec010f641b675fb4a06376ff9b";

fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn options(root: &Path, server: &Server) -> FetchOptions {
    let cache = CacheLayout {
        hub: root.join("hf").join("hub"),
        archives: root.join("deeplab"),
    };
    let mut o = FetchOptions::new(cache, &server.url(""), Some(&server.url("/zoo")));
    o.progress = false;
    o.timeout = std::time::Duration::from_secs(10);
    o
}

/// A small safetensors file with timm Xception names.
fn timm_like_safetensors() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a: Vec<u8> = (0..32 * 3 * 3 * 3)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..32)
        .flat_map(|i| (1.0 + i as f32).to_le_bytes())
        .collect();
    let tensors = vec![
        (
            "stem.0.conv.weight",
            TensorView::new(Dtype::F32, vec![32, 3, 3, 3], &a).unwrap(),
        ),
        (
            "stem.0.bn.weight",
            TensorView::new(Dtype::F32, vec![32], &b).unwrap(),
        ),
    ];
    safetensors::serialize(tensors, None).unwrap()
}

/// Serve `data` as a hub LFS file: the resolve URL redirects to a CDN path, like huggingface.co.
fn serve_hub_file(
    server: &Server,
    repo: &str,
    revision: &str,
    file: &str,
    data: &[u8],
    etag: &str,
) -> String {
    let cdn = format!("/cdn/{}", sha256(data));
    server.route(
        &format!("/{repo}/resolve/{revision}/{file}"),
        Route::Redirect {
            location: server.url(&cdn),
            headers: vec![
                ("x-repo-commit".into(), COMMIT.into()),
                ("x-linked-etag".into(), format!("\"{etag}\"")),
                ("x-linked-size".into(), data.len().to_string()),
                (
                    "etag".into(),
                    "\"0123456789abcdef0123456789abcdef01234567\"".into(),
                ),
            ],
        },
    );
    server.route(
        &cdn,
        Route::Bytes(Resource {
            data: data.to_vec(),
            ..Default::default()
        }),
    );
    cdn
}

/// The checkpoint files to pack: the official reference checkpoint when `../shared` is present,
/// else a few generated files with checkpoint names.
fn checkpoint_files() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/official/D_mobilenetv2_os16");
    let names = ["model.ckpt.index", "model.ckpt.data-00000-of-00001"];
    if names.iter().all(|n| dir.join(n).is_file()) {
        names
            .iter()
            .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
            .collect()
    } else {
        println!(
            "note: {} not found; packing generated checkpoint-named files instead of the official one",
            dir.display()
        );
        vec![
            (
                "model.ckpt.index".to_string(),
                b"generated index bytes".repeat(50),
            ),
            (
                "model.ckpt.data-00000-of-00001".to_string(),
                (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect(),
            ),
        ]
    }
}

/// A `.tar.gz` laid out like the model zoo's: `{top}/model.ckpt.*` plus a frozen-graph placeholder.
fn build_archive(top: &str, files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |path: String, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, data).unwrap();
    };
    for (name, data) in files {
        add(format!("{top}/{name}"), data);
    }
    add(
        format!("{top}/frozen_inference_graph.pb"),
        b"not a real graph",
    );
    tar.into_inner().unwrap().finish().unwrap()
}

/// Test converter: packs the checkpoint's files into a safetensors of U8 tensors with the entry's
/// config in the metadata, so the whole flow (extraction, prefix, output path) is exercised.
fn pack_converter(ckpt: &Path, spec: &WeightSpec, out: &Path) -> anyhow::Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = ckpt.parent().unwrap();
    let stem = ckpt.file_name().unwrap().to_string_lossy().into_owned();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{stem}.")) {
            let data = std::fs::read(dir.join(&name))?;
            files.push((name, data));
        }
    }
    files.sort();
    anyhow::ensure!(
        files.len() >= 2,
        "expected index + data next to {}",
        ckpt.display()
    );
    let views: Vec<(String, TensorView<'_>)> = files
        .iter()
        .map(|(n, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::U8, vec![d.len()], d).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = spec
        .metadata()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    std::fs::write(out, safetensors::serialize(views, Some(meta))?)?;
    Ok(())
}

fn failing_converter(_: &Path, _: &WeightSpec, _: &Path) -> anyhow::Result<()> {
    anyhow::bail!("converter not available")
}

/// A free port with nothing listening on it.
fn dead_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

mod hub {
    use super::*;

    #[test]
    fn fetch_verifies_against_lfs_sha_then_serves_from_cache_without_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let data = timm_like_safetensors();
        // A real table entry, pointed at the local server through the endpoint (what HF_ENDPOINT does).
        let spec = find("xception41.tf_in1k").unwrap();
        let Source::Hub {
            repo,
            revision,
            file,
        } = spec.source
        else {
            unreachable!()
        };
        serve_hub_file(&server, repo, revision, file, &data, &sha256(&data));
        let opts = options(tmp.path(), &server);

        let got = fetch(spec, &opts, &pack_converter).unwrap();
        assert!(!got.from_cache);
        assert_eq!(got.sha256, sha256(&data));
        assert_eq!(std::fs::read(&got.path).unwrap(), data);
        // The standard hub cache layout.
        let expected = tmp.path().join(format!(
            "hf/hub/models--timm--xception41.tf_in1k/snapshots/{COMMIT}/model.safetensors"
        ));
        assert_eq!(got.path, expected);
        assert!(tmp
            .path()
            .join(format!(
                "hf/hub/models--timm--xception41.tf_in1k/blobs/{}",
                sha256(&data)
            ))
            .is_file());
        let first = server.requests();
        assert!(
            first >= 2,
            "the hub was asked for metadata and the file ({first} requests)"
        );
        assert!(
            server.log().iter().all(|r| r.method == "GET"),
            "{:?}",
            server.log()
        );

        let again = fetch(spec, &opts, &pack_converter).unwrap();
        assert!(again.from_cache);
        assert_eq!(again.path, got.path);
        assert_eq!(
            server.requests(),
            first,
            "a cached, verified file makes no request"
        );
        // The CLI finds it too, without the network.
        assert_eq!(opts.cache.locate(spec), Some(got.path));
    }

    #[test]
    fn checksum_mismatch_deletes_the_file_and_names_both_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let data = timm_like_safetensors();
        let wrong = sha256(b"something else");
        let spec = WeightSpec {
            name: "test-hub-mismatch",
            source: Source::Hub {
                repo: "test/tiny",
                revision: "main",
                file: "model.safetensors",
            },
            ..*find("xception65.tf_in1k").unwrap()
        };
        serve_hub_file(
            &server,
            "test/tiny",
            "main",
            "model.safetensors",
            &data,
            &wrong,
        );
        let opts = options(tmp.path(), &server);

        let err = fetch(&spec, &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{msg}");
        assert!(
            msg.contains(&wrong) && msg.contains(&sha256(&data)),
            "{msg}"
        );
        let blob = tmp
            .path()
            .join(format!("hf/hub/models--test--tiny/blobs/{wrong}"));
        assert!(msg.contains(&blob.display().to_string()), "{msg}");
        assert!(!blob.exists(), "the bad blob is deleted");
        assert_eq!(
            opts.cache.locate(&spec),
            None,
            "no usable file is left behind"
        );
    }

    #[test]
    fn table_sha256_takes_precedence_over_the_etag() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let data = timm_like_safetensors();
        serve_hub_file(
            &server,
            "test/tiny",
            "main",
            "model.safetensors",
            &data,
            &sha256(&data),
        );
        let opts = options(tmp.path(), &server);
        let base = *find("xception65.tf_in1k").unwrap();
        let bad = WeightSpec {
            name: "test-hub-table-sha",
            source: Source::Hub {
                repo: "test/tiny",
                revision: "main",
                file: "model.safetensors",
            },
            sha256: Some("00000000000000000000000000000000000000000000000000000000000000ff"),
            ..base
        };
        let msg = fetch(&bad, &opts, &pack_converter).unwrap_err().to_string();
        assert!(
            msg.contains(
                "expected sha256 00000000000000000000000000000000000000000000000000000000000000ff"
            ),
            "{msg}"
        );
        let good = WeightSpec {
            sha256: Some(Box::leak(sha256(&data).into_boxed_str())),
            ..bad
        };
        assert!(fetch(&good, &opts, &pack_converter).is_ok());
    }

    #[test]
    fn truncated_transfer_fails_then_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let data = timm_like_safetensors();
        let cdn = serve_hub_file(
            &server,
            "test/tiny",
            "main",
            "model.safetensors",
            &data,
            &sha256(&data),
        );
        let cut_at = data.len() / 2;
        server.route(
            &cdn,
            Route::Bytes(Resource {
                data: data.clone(),
                cut_first: 1,
                cut_at,
                declared_len: None,
            }),
        );
        let spec = WeightSpec {
            name: "test-hub-truncated",
            source: Source::Hub {
                repo: "test/tiny",
                revision: "main",
                file: "model.safetensors",
            },
            ..*find("xception65.tf_in1k").unwrap()
        };
        let opts = options(tmp.path(), &server);

        let err = fetch(&spec, &opts, &pack_converter).unwrap_err();
        assert!(matches!(err, FetchError::Truncated { .. }), "{err}");
        assert_eq!(
            opts.cache.locate(&spec),
            None,
            "nothing usable after a cut transfer"
        );

        let got = fetch(&spec, &opts, &pack_converter).unwrap();
        assert_eq!(std::fs::read(&got.path).unwrap(), data);
        let resumed = server
            .log()
            .iter()
            .any(|r| r.path == cdn && r.range.as_deref() == Some(&format!("bytes={cut_at}-")));
        assert!(
            resumed,
            "the second run resumed from byte {cut_at}: {:?}",
            server.log()
        );
    }

    #[test]
    fn not_found_names_the_url() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let spec = find("xception65.tf_in1k").unwrap();
        let opts = options(tmp.path(), &server);
        let err = fetch(spec, &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Http { status: 404, .. }), "{msg}");
        assert!(msg.contains(&opts.hub_url(spec).unwrap()), "{msg}");
    }

    #[test]
    fn offline_and_not_cached_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let mut opts = options(tmp.path(), &server);
        opts.hub_endpoint = dead_port_url();
        let spec = find("mobilenetv2_100.ra_in1k").unwrap();
        let err = fetch(spec, &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Unreachable { .. }), "{msg}");
        assert!(
            msg.contains(&opts.hub_url(spec).unwrap()) && msg.contains("offline"),
            "{msg}"
        );
    }
}

mod archive {
    use super::*;

    const ZOO_FILE: &str = "deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz";

    fn serve_archive(server: &Server, bytes: &[u8]) -> String {
        let path = format!("/zoo/{ZOO_FILE}");
        server.route(
            &path,
            Route::Bytes(Resource {
                data: bytes.to_vec(),
                ..Default::default()
            }),
        );
        path
    }

    fn spec() -> WeightSpec {
        *find("mobilenetv2_coco_voc_trainaug").unwrap()
    }

    fn read_back(path: &Path) -> (HashMap<String, Vec<u8>>, HashMap<String, String>) {
        let bytes = std::fs::read(path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.data().to_vec()))
            .collect();
        (tensors, meta.metadata().clone().unwrap_or_default())
    }

    #[test]
    fn fetch_extracts_converts_then_serves_from_cache_without_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let files = checkpoint_files();
        let tgz = build_archive("deeplabv3_mnv2_pascal_train_aug", &files);
        serve_archive(&server, &tgz);
        let opts = options(tmp.path(), &server);
        let spec = spec();

        let got = fetch(&spec, &opts, &pack_converter).unwrap();
        assert!(!got.from_cache);
        assert_eq!(got.sha256, sha256(&tgz));
        assert_eq!(
            got.path,
            tmp.path()
                .join("deeplab/mobilenetv2_coco_voc_trainaug/model.safetensors")
        );
        let (tensors, meta) = read_back(&got.path);
        for (name, data) in &files {
            assert!(
                tensors.get(name) == Some(data),
                "{name} went through the converter intact"
            );
        }
        assert_eq!(
            meta.get("deeplab.weights").map(String::as_str),
            Some("mobilenetv2_coco_voc_trainaug")
        );
        assert_eq!(
            meta.get("deeplab.backbone").map(String::as_str),
            Some("mobilenetv2_100")
        );
        assert_eq!(
            meta.get("deeplab.num_classes").map(String::as_str),
            Some("21")
        );
        // The verified archive stays, the extraction does not, the stamp records the origin.
        let dir = tmp.path().join("deeplab/mobilenetv2_coco_voc_trainaug");
        assert!(dir.join(ZOO_FILE).is_file());
        assert!(!dir.join("extract.tmp").exists());
        assert!(!dir.join(format!("{ZOO_FILE}.part")).exists());
        let stamp = std::fs::read_to_string(dir.join("model.safetensors.json")).unwrap();
        assert!(
            stamp.contains(&sha256(&tgz))
                && stamp.contains("deeplabv3_mnv2_pascal_train_aug/model.ckpt")
        );

        let n = server.requests();
        assert_eq!(n, 1);
        let again = fetch(&spec, &opts, &failing_converter).unwrap();
        assert!(again.from_cache);
        assert_eq!(again.path, got.path);
        assert_eq!(
            server.requests(),
            n,
            "a cached, verified conversion makes no request"
        );
        assert_eq!(opts.cache.locate(&spec), Some(got.path));
    }

    #[test]
    fn checksum_mismatch_deletes_the_download_and_names_both_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        serve_archive(&server, &tgz);
        let opts = options(tmp.path(), &server);
        let expected = "1111111111111111111111111111111111111111111111111111111111111111";
        let spec = WeightSpec {
            sha256: Some(expected),
            ..spec()
        };

        let err = fetch(&spec, &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{msg}");
        assert!(
            msg.contains(expected) && msg.contains(&sha256(&tgz)),
            "{msg}"
        );
        let dir = tmp.path().join("deeplab/mobilenetv2_coco_voc_trainaug");
        assert!(!dir.join(ZOO_FILE).exists() && !dir.join(format!("{ZOO_FILE}.part")).exists());
        assert_eq!(opts.cache.locate(&spec), None);
    }

    #[test]
    fn truncated_transfer_keeps_the_part_and_the_next_run_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        let cut_at = tgz.len() / 3;
        let path = serve_archive(&server, &tgz);
        server.route(
            &path,
            Route::Bytes(Resource {
                data: tgz.clone(),
                cut_first: 1,
                cut_at,
                declared_len: None,
            }),
        );
        let opts = options(tmp.path(), &server);
        let spec = WeightSpec {
            sha256: Some(Box::leak(sha256(&tgz).into_boxed_str())),
            ..spec()
        };

        let err = fetch(&spec, &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, FetchError::Truncated { received, .. } if received == cut_at as u64),
            "{msg}"
        );
        let part = tmp.path().join(format!(
            "deeplab/mobilenetv2_coco_voc_trainaug/{ZOO_FILE}.part"
        ));
        assert!(
            msg.contains(&part.display().to_string()) && msg.contains(&tgz.len().to_string()),
            "{msg}"
        );
        assert_eq!(std::fs::metadata(&part).unwrap().len(), cut_at as u64);
        assert!(
            !part.with_extension("").exists(),
            "nothing renamed into place"
        );

        let got = fetch(&spec, &opts, &pack_converter).unwrap();
        assert_eq!(got.sha256, sha256(&tgz));
        let log = server.log();
        assert_eq!(log.len(), 2);
        assert_eq!(
            log[1].range.as_deref(),
            Some(format!("bytes={cut_at}-").as_str())
        );
        assert!(!part.exists());
    }

    #[test]
    fn wrong_content_length_is_reported_as_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        let path = serve_archive(&server, &tgz);
        let declared = tgz.len() as u64 + 1000;
        server.route(
            &path,
            Route::Bytes(Resource {
                data: tgz.clone(),
                declared_len: Some(declared),
                ..Default::default()
            }),
        );
        let opts = options(tmp.path(), &server);
        let err = fetch(&spec(), &opts, &pack_converter).unwrap_err();
        assert!(
            matches!(&err, FetchError::Truncated { received, expected, .. } if *received == tgz.len() as u64 && *expected == declared.to_string()),
            "{err}"
        );
        assert_eq!(opts.cache.locate(&spec()), None);
    }

    #[test]
    fn size_disagreeing_with_the_table_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        serve_archive(&server, &tgz);
        let opts = options(tmp.path(), &server);
        let spec = WeightSpec {
            size: Some(tgz.len() as u64 + 1),
            ..spec()
        };
        let err = fetch(&spec, &opts, &pack_converter).unwrap_err();
        assert!(matches!(err, FetchError::SizeMismatch { .. }), "{err}");
        assert!(!tmp
            .path()
            .join(format!(
                "deeplab/mobilenetv2_coco_voc_trainaug/{ZOO_FILE}.part"
            ))
            .exists());
    }

    #[test]
    fn not_found_names_the_url_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let opts = options(tmp.path(), &server);
        let err = fetch(&spec(), &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Http { status: 404, .. }), "{msg}");
        assert!(
            msg.contains(&server.url(&format!("/zoo/{ZOO_FILE}"))),
            "{msg}"
        );
        let dir = tmp.path().join("deeplab/mobilenetv2_coco_voc_trainaug");
        assert!(!dir.join(format!("{ZOO_FILE}.part")).exists() && !dir.join(ZOO_FILE).exists());
    }

    #[test]
    fn offline_and_not_cached_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let mut opts = options(tmp.path(), &server);
        opts.archive_mirror = Some(dead_port_url());
        let err = fetch(&spec(), &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Unreachable { .. }), "{msg}");
        assert!(
            msg.contains(&opts.archive_url(&spec()).unwrap()) && msg.contains("offline"),
            "{msg}"
        );
    }

    #[test]
    fn corrupt_archive_is_deleted_with_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        serve_archive(&server, b"this is not a gzip stream at all");
        let opts = options(tmp.path(), &server);
        let err = fetch(&spec(), &opts, &pack_converter).unwrap_err();
        let msg = err.to_string();
        let archive = tmp
            .path()
            .join(format!("deeplab/mobilenetv2_coco_voc_trainaug/{ZOO_FILE}"));
        assert!(matches!(err, FetchError::Archive { .. }), "{msg}");
        assert!(msg.contains(&archive.display().to_string()), "{msg}");
        assert!(!archive.exists(), "a corrupt archive is not kept");
    }

    #[test]
    fn archive_without_checkpoint_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive(
            "x",
            &[("README".to_string(), b"no checkpoint here".to_vec())],
        );
        serve_archive(&server, &tgz);
        let opts = options(tmp.path(), &server);
        let msg = fetch(&spec(), &opts, &pack_converter)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no TensorFlow checkpoint"), "{msg}");
    }

    #[test]
    fn failed_conversion_keeps_the_verified_archive_for_the_next_run() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        serve_archive(&server, &tgz);
        let opts = options(tmp.path(), &server);
        let spec = spec();

        let err = fetch(&spec, &opts, &failing_converter).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Conversion { .. }), "{msg}");
        assert!(
            msg.contains("converter not available") && msg.contains("model.ckpt"),
            "{msg}"
        );
        assert_eq!(opts.cache.locate(&spec), None);
        assert_eq!(server.requests(), 1);

        let got = fetch(&spec, &opts, &pack_converter).unwrap();
        assert!(!got.from_cache);
        assert_eq!(
            server.requests(),
            1,
            "converted from the cached archive, no new download"
        );
        assert!(
            got.notes.iter().any(|n| n.contains("cached archive")),
            "{:?}",
            got.notes
        );
    }

    #[test]
    fn tampered_conversion_is_rebuilt_from_the_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        serve_archive(&server, &tgz);
        let opts = options(tmp.path(), &server);
        let spec = spec();
        let got = fetch(&spec, &opts, &pack_converter).unwrap();
        let good = read_back(&got.path);
        std::fs::write(&got.path, b"tampered").unwrap();

        let again = fetch(&spec, &opts, &pack_converter).unwrap();
        assert!(!again.from_cache);
        assert!(
            read_back(&again.path) == good,
            "rebuilt with the same contents"
        );
        assert_eq!(server.requests(), 1);
    }

    #[test]
    fn every_model_zoo_entry_resolves_through_a_mirror() {
        let server = Server::start();
        let tmp = tempfile::tempdir().unwrap();
        let opts = options(tmp.path(), &server);
        for s in deeplab_weights::all() {
            if let Source::Archive { url } = s.source {
                let file = url.rsplit('/').next().unwrap();
                assert_eq!(
                    opts.archive_url(s).unwrap(),
                    server.url(&format!("/zoo/{file}"))
                );
            }
        }
    }
}

#[test]
fn cache_paths_stay_inside_the_given_roots() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(tmp.path(), &server);
    for s in deeplab_weights::all() {
        let p: PathBuf = match s.source {
            Source::Hub { .. } => opts.cache.hub_repo_dir(match s.source {
                Source::Hub { repo, .. } => repo,
                Source::Archive { .. } => unreachable!(),
            }),
            Source::Archive { .. } => opts.cache.converted_path(s),
        };
        assert!(p.starts_with(tmp.path()), "{}", p.display());
    }
}

mod cli {
    //! The `cargo xtask` binary itself, with the environment variables a user sets (given to the child
    //! process only, so parallel tests do not interfere).
    use super::*;
    use std::process::{Command, Output};

    fn xtask(args: &[&str], envs: &[(&str, String)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.args(args);
        for var in [
            "HF_ENDPOINT",
            "HF_HOME",
            "DEEPLAB_CACHE",
            "DEEPLAB_ARCHIVE_MIRROR",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().expect("run the xtask binary")
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn list_prints_every_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let out = xtask(
            &["fetch-weights", "--list"],
            &[("HF_HOME", tmp.path().display().to_string())],
        );
        assert!(out.status.success());
        let stdout = text(&out.stdout);
        for s in deeplab_weights::all() {
            assert!(stdout.contains(s.name), "{}", s.name);
        }
        assert!(stdout.contains(&format!("hub cache: {}", tmp.path().join("hub").display())));
    }

    #[test]
    fn hub_fetch_honours_hf_endpoint_and_hf_home() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let data = timm_like_safetensors();
        let spec = find("xception41.tf_in1k").unwrap();
        let Source::Hub {
            repo,
            revision,
            file,
        } = spec.source
        else {
            unreachable!()
        };
        serve_hub_file(&server, repo, revision, file, &data, &sha256(&data));
        let envs = [
            ("HF_ENDPOINT", server.url("")),
            ("HF_HOME", tmp.path().display().to_string()),
        ];
        let out = xtask(&["fetch-weights", "xception41.tf_in1k"], &envs);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let expected = tmp.path().join(format!(
            "hub/models--timm--xception41.tf_in1k/snapshots/{COMMIT}/model.safetensors"
        ));
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "xception41.tf_in1k: {} (downloaded",
                expected.display()
            )),
            "{stdout}"
        );
        println!("first run:\n{stdout}");
        let n = server.requests();
        let out = xtask(&["fetch-weights", "xception41.tf_in1k"], &envs);
        println!("second run:\n{}", text(&out.stdout));
        assert!(
            text(&out.stdout).contains("(cached, sha256"),
            "{}",
            text(&out.stdout)
        );
        assert_eq!(server.requests(), n, "the second run made no request");
    }

    #[test]
    fn archive_fetch_uses_the_mirror_and_cache_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let tgz = build_archive("x", &checkpoint_files());
        let file = "deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz";
        server.route(
            &format!("/zoo/{file}"),
            Route::Bytes(Resource {
                data: tgz,
                ..Default::default()
            }),
        );
        let cache = tmp.path().join("zoo-cache");
        let out = xtask(
            &[
                "fetch-weights",
                "mobilenetv2_coco_voc_trainaug",
                "--cache-dir",
                &cache.display().to_string(),
            ],
            &[
                ("DEEPLAB_ARCHIVE_MIRROR", server.url("/zoo")),
                ("HF_HOME", tmp.path().display().to_string()),
            ],
        );
        let official = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/reference/official/D_mobilenetv2_os16/model.ckpt.index")
            .is_file();
        let stderr = text(&out.stderr);
        assert!(cache
            .join("mobilenetv2_coco_voc_trainaug")
            .join(file)
            .is_file());
        assert_eq!(server.requests(), 1);
        if official {
            // A real official checkpoint: converted by the heads crate, config in the metadata.
            assert!(out.status.success(), "{stderr}");
            let stdout = text(&out.stdout);
            let converted = cache
                .join("mobilenetv2_coco_voc_trainaug")
                .join("model.safetensors");
            assert!(
                stdout.contains(&converted.display().to_string()),
                "{stdout}"
            );
            let config = deeplab_heads::weights::read_config(&converted).unwrap();
            assert_eq!(config.num_classes, 21);
            assert!(config.decoder.is_none());
        } else {
            // Generated bytes are no checkpoint: the conversion fails naming it, the verified
            // archive stays cached.
            assert!(!out.status.success());
            assert!(stderr.contains("converting"), "{stderr}");
        }
    }

    #[test]
    fn unknown_names_fail_with_suggestions() {
        let out = xtask(&["fetch-weights", "mobilenetv2_voc"], &[]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("did you mean") && stderr.contains("mobilenetv2_coco_voc_trainaug"),
            "{stderr}"
        );
    }
}

mod timm_files {
    //! The table's timm hub entries produce files that `deeplab-backbones` loads with no
    //! renaming. Each file is generated locally with timm's names and shapes (from the key lists
    //! in `../shared/reference/keys` when present, else the names our model requests with its
    //! classifier on), loaded into the backbone with the classifier, and run; the smallest one
    //! also goes through the real fetch path from the local hub.
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use deeplab_backbones::{Backbone, BackboneConfig};

    type Key = (String, Vec<usize>, bool);

    fn shared_keys(name: &str) -> Option<Vec<Key>> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../shared/reference/keys/timm_{name}.keys.txt"));
        let text = std::fs::read_to_string(p).ok()?;
        let keys = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut f = l.split('\t');
                let name = f.next().unwrap_or_default().to_string();
                let shape: Vec<usize> = f
                    .next()
                    .unwrap_or("[]")
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .filter_map(|d| d.trim().parse().ok())
                    .collect();
                let int = f.next().unwrap_or_default().contains("int");
                (name, shape, int)
            })
            .collect();
        Some(keys)
    }

    fn requested_keys(cfg: &BackboneConfig) -> Vec<Key> {
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        cfg.build(vb).expect("build backbone");
        let data = map.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec(), false))
            .collect()
    }

    fn write_file(keys: &[Key], path: &Path) {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        for (i, (name, shape, int)) in keys.iter().enumerate() {
            let t = if *int {
                Tensor::zeros(shape.as_slice(), DType::I64, &dev).unwrap()
            } else if name.ends_with("running_var") {
                Tensor::ones(shape.as_slice(), DType::F32, &dev).unwrap()
            } else {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|j| ((i * 31 + j) % 17) as f32 * 1e-3).collect();
                Tensor::from_vec(v, shape.as_slice(), &dev).unwrap()
            };
            tensors.insert(name.clone(), t);
        }
        candle_core::safetensors::save(&tensors, path).unwrap();
    }

    fn load_and_run(name: &str, path: &Path) {
        let cfg = BackboneConfig::from_name(name)
            .unwrap()
            .with_classifier(Some(1000));
        // SAFETY: the file was written by this test and is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }
            .unwrap();
        let bb = cfg
            .build(vb)
            .unwrap_or_else(|e| panic!("{name}: the timm-named file does not load: {e}"));
        let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let feats = bb.forward_features(&x, false).unwrap();
        assert_eq!(feats.len(), bb.feature_info().len());
        let logits = bb
            .forward_classifier(&feats[feats.len() - 1], false)
            .unwrap();
        assert_eq!(logits.dims(), &[1, 1000], "{name}");
    }

    #[test]
    fn timm_hub_entries_load_into_backbones_without_renaming() {
        let tmp = tempfile::tempdir().unwrap();
        let mut checked = 0;
        for spec in deeplab_weights::all() {
            let (Source::Hub { .. }, Some(keys_name)) = (&spec.source, spec.timm_keys) else {
                continue;
            };
            let keys = shared_keys(keys_name).unwrap_or_else(|| {
                println!(
                    "note: ../shared/reference/keys/timm_{keys_name}.keys.txt not found; using the names our model requests"
                );
                let cfg = BackboneConfig::from_name(keys_name)
                    .unwrap()
                    .with_classifier(Some(1000));
                requested_keys(&cfg)
            });
            let path = tmp.path().join(format!("{keys_name}.safetensors"));
            write_file(&keys, &path);
            load_and_run(keys_name, &path);
            std::fs::remove_file(&path).unwrap();
            checked += 1;
        }
        assert_eq!(checked, 7, "every timm hub entry was checked");
    }

    #[test]
    fn fetched_timm_file_loads_without_renaming() {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start();
        let opts = options(tmp.path(), &server);
        let spec = find("mobilenetv2_050.lamb_in1k").unwrap();
        let Source::Hub {
            repo,
            revision,
            file,
        } = spec.source
        else {
            unreachable!()
        };
        let keys = shared_keys("mobilenetv2_050").unwrap_or_else(|| {
            requested_keys(
                &BackboneConfig::from_name("mobilenetv2_050")
                    .unwrap()
                    .with_classifier(Some(1000)),
            )
        });
        let local = tmp.path().join("gen.safetensors");
        write_file(&keys, &local);
        let data = std::fs::read(&local).unwrap();
        serve_hub_file(&server, repo, revision, file, &data, &sha256(&data));
        let fetched = fetch(spec, &opts, &|_, _, _| {
            anyhow::bail!("no conversion for hub files")
        })
        .unwrap();
        load_and_run("mobilenetv2_050", &fetched.path);
    }
}
