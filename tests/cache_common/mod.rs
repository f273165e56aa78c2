//! Helpers shared by the cache tests: generated bundles and a tiny HTTP/1.1 file server
//! (GET with `Range`, one-shot connection cuts, corrupted bodies) on 127.0.0.1:0.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral::types::{ModelFile, ModelId, ModelKind, ModelManifest};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Deterministic bytes for file `name` of `len` bytes.
pub fn content(name: &str, len: usize) -> Vec<u8> {
    let mut seed = Sha256::digest(name.as_bytes()).to_vec();
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        seed = Sha256::digest(&seed).to_vec();
        out.extend_from_slice(&seed);
    }
    out.truncate(len);
    out
}

pub fn file_entry(path: &str, bytes: &[u8]) -> ModelFile {
    ModelFile {
        path: path.to_owned(),
        size_bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    }
}

/// Writes a bundle of `files` (path, size) under `root/<id>/` and returns its manifest with a
/// `file://` source.
pub fn local_bundle(root: &Path, id: &str, files: &[(&str, usize)]) -> ModelManifest {
    let dir = root.join(id);
    let mut out = Vec::new();
    for (p, n) in files {
        let bytes = content(&format!("{id}/{p}"), *n);
        let fp = dir.join(p);
        std::fs::create_dir_all(fp.parent().unwrap()).unwrap();
        std::fs::write(&fp, &bytes).unwrap();
        out.push(file_entry(p, &bytes));
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    ModelManifest {
        family: String::new(),
        format: String::new(),
        id: ModelId::from(id),
        kind: ModelKind::Checkpoint,
        source: format!("file://{}", dir.display()),
        files: out,
    }
}

/// Checks that the bundle at `dir` holds exactly the manifest's bytes.
pub fn assert_bundle(dir: &Path, m: &ModelManifest) {
    for f in &m.files {
        let bytes = std::fs::read(dir.join(&f.path)).unwrap();
        assert_eq!(bytes.len() as u64, f.size_bytes, "{}", f.path);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), f.sha256, "{}", f.path);
    }
}

/// Names at the top of `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Polls `cond` until it holds or `deadline` passes.
pub async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops a watcher thread when dropped, also when the test panics (a runtime waits for its
/// blocking threads at shutdown, so a watcher left running hangs the test instead of failing
/// it).
pub struct StopOnDrop(pub Arc<std::sync::atomic::AtomicBool>);

impl StopOnDrop {
    pub fn new() -> Self {
        Self(Arc::default())
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct ServerState {
    pub files: Mutex<HashMap<String, Vec<u8>>>,
    /// One-shot: the next response for this path stops after this many body bytes.
    pub cut_after: Mutex<HashMap<String, usize>>,
    /// The response for this path stops after this many body bytes and hangs (never closes).
    pub stall_after: Mutex<HashMap<String, usize>>,
    /// Responses for these paths have one byte flipped.
    pub corrupt: Mutex<HashSet<String>>,
    /// Answer every request with the whole body (200), as servers without Range support do.
    pub ignore_range: std::sync::atomic::AtomicBool,
    /// Every request: (path, Range header if any).
    pub log: Mutex<Vec<(String, Option<String>)>>,
    /// Every request: (path, query string if any).
    pub queries: Mutex<Vec<(String, Option<String>)>>,
}

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_conn(sock, st.clone()));
            }
        });
        TestServer { addr, state, task }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("http://{}/{}", self.addr, prefix)
    }

    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(path.to_owned(), bytes);
    }

    /// Publishes a bundle of generated files under `/<id>/` and returns its manifest.
    pub fn publish(&self, id: &str, files: &[(&str, usize)]) -> ModelManifest {
        let mut out = Vec::new();
        for (p, n) in files {
            let bytes = content(&format!("{id}/{p}"), *n);
            out.push(file_entry(p, &bytes));
            self.put(&format!("{id}/{p}"), bytes);
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        self.put(
            &format!("{id}/corral-manifest.json"),
            serde_json::to_vec(&out).unwrap(),
        );
        ModelManifest {
            family: String::new(),
            format: String::new(),
            id: ModelId::from(id),
            kind: ModelKind::Checkpoint,
            source: self.url(id),
            files: out,
        }
    }

    pub fn requests_for(&self, path: &str) -> Vec<Option<String>> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn request_count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }
}

async fn serve_conn(mut sock: tokio::net::TcpStream, st: Arc<ServerState>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let target = first.split(' ').nth(1).unwrap_or("/");
    // A query (a pre-signed URL's signature) is recorded, not part of the file's name.
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let path = path.trim_start_matches('/').to_owned();
    st.queries.lock().unwrap().push((path.clone(), query));
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_owned());
    st.log.lock().unwrap().push((path.clone(), range.clone()));
    let body = st.files.lock().unwrap().get(&path).cloned();
    let Some(mut body) = body else {
        let _ = sock
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    if st.corrupt.lock().unwrap().contains(&path) && !body.is_empty() {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let total = body.len();
    let honour = !st.ignore_range.load(std::sync::atomic::Ordering::Relaxed);
    let start = range
        .as_deref()
        .filter(|_| honour)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, part, extra) = match start {
        Some(s) if s < total => (
            "206 Partial Content",
            &body[s..],
            format!("Content-Range: bytes {s}-{}/{total}\r\n", total - 1),
        ),
        Some(_) => (
            "416 Range Not Satisfiable",
            &body[..0],
            format!("Content-Range: bytes */{total}\r\n"),
        ),
        None => ("200 OK", &body[..], String::new()),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Accept-Ranges: bytes\r\nConnection: close\r\n\r\n",
        part.len()
    );
    if sock.write_all(header.as_bytes()).await.is_err() {
        return;
    }
    let cut = st.cut_after.lock().unwrap().remove(&path);
    let send = match cut {
        Some(n) => &part[..n.min(part.len())],
        None => part,
    };
    let stall = st.stall_after.lock().unwrap().get(&path).copied();
    if let Some(n) = stall {
        let _ = sock.write_all(&send[..n.min(send.len())]).await;
        let _ = sock.flush().await;
        std::future::pending::<()>().await;
    }
    let _ = sock.write_all(send).await;
    let _ = sock.shutdown().await;
}

/// A cache config in `dir` with `max_bytes`.
pub fn config(
    dir: &Path,
    max_bytes: u64,
    preloaded: Option<PathBuf>,
) -> corral::worker::cache::CacheConfig {
    corral::worker::cache::CacheConfig {
        dir: dir.to_path_buf(),
        max_bytes,
        preloaded_dir: preloaded,
        max_concurrent_downloads: 2,
    }
}
