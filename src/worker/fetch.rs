//! Downloads of single bundle files into the cache's temporary directory, from a
//! resolved [`Source`] (an [`Endpoint`]; see `crate::source` for the schemes).
//!
//! Bytes are hashed while they arrive: the async side only moves `Bytes` from the network (or
//! the source file) into a bounded channel; a `spawn_blocking` sink hashes and writes them, so
//! SHA-256 never runs on the runtime. An interrupted HTTP transfer resumes with a `Range`
//! request from the bytes already sent to the sink; a `.tmp` file left from before is hashed
//! once (only the part on disk) and continued. Size and digest are checked at the end; a
//! mismatch deletes the file and returns `Error::Checksum` naming it.
//!
//! This module knows nothing of the cache's index or budget; it writes only `dest`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::redact;
pub use crate::source::{http_client, Endpoint, Source};
use crate::source::{status_error, transport_error, unavailable};
use crate::types::ModelFile;

/// Chunks in flight between the network and the hashing sink.
const SINK_QUEUE_CHUNKS: usize = 64;
/// Write buffer of the sink and read size for local sources.
const IO_CHUNK_BYTES: usize = 1 << 20;
/// Smallest transfer that counts as a throughput sample.
const MIN_SAMPLE_BYTES: u64 = 64 << 10;

/// How hard to try an HTTP transfer.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Consecutive failed attempts (no byte received) before giving up. Default: 5.
    pub max_attempts: u32,
    /// First backoff, doubled after each failure, capped at 8 s. Default: 250 ms.
    pub base_backoff: Duration,
    /// Longest wait for the next chunk of a response. Default: 30 s.
    pub read_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_backoff: Duration::from_millis(250),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Download throughput as an exponentially weighted moving average.
#[derive(Debug, Default)]
pub struct Throughput {
    ewma_bps: Mutex<f64>,
}

impl Throughput {
    const ALPHA: f64 = 0.3;

    pub fn record(&self, bytes: u64, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if bytes == 0 || secs <= 0.0 {
            return;
        }
        let sample = bytes as f64 / secs;
        let mut e = self.ewma_bps.lock().unwrap_or_else(|p| p.into_inner());
        *e = if *e == 0.0 {
            sample
        } else {
            Self::ALPHA * sample + (1.0 - Self::ALPHA) * *e
        };
    }

    /// Bytes per second; 0 when nothing was measured yet.
    pub fn bps(&self) -> u64 {
        *self.ewma_bps.lock().unwrap_or_else(|p| p.into_inner()) as u64
    }
}

/// Downloads files; cheap to share (one HTTP connection pool, one throughput meter).
#[derive(Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    retry: RetryPolicy,
    meter: Throughput,
}

/// The blocking half of a transfer: hashes and writes what the async half sends.
struct Sink {
    tx: mpsc::Sender<Bytes>,
    join: tokio::task::JoinHandle<Result<(u64, String)>>,
}

impl Sink {
    /// Opens `dest` (when given), hashes its first `keep` bytes, truncates the rest, and
    /// appends whatever arrives on the channel. Returns (total bytes, hex digest).
    fn spawn(dest: Option<PathBuf>, keep: u64) -> Sink {
        let (tx, mut rx) = mpsc::channel::<Bytes>(SINK_QUEUE_CHUNKS);
        let join = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            let mut total = 0u64;
            let mut out = match &dest {
                Some(p) => {
                    let io = |e| Error::io(p, e);
                    let mut f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(p)
                        .map_err(io)?;
                    if keep > 0 {
                        let mut buf = vec![0u8; IO_CHUNK_BYTES];
                        let mut left = keep;
                        while left > 0 {
                            let want = left.min(buf.len() as u64) as usize;
                            f.read_exact(&mut buf[..want]).map_err(io)?;
                            h.update(&buf[..want]);
                            left -= want as u64;
                        }
                        total = keep;
                    }
                    f.set_len(keep).map_err(io)?;
                    f.seek(SeekFrom::Start(keep)).map_err(io)?;
                    Some(std::io::BufWriter::with_capacity(IO_CHUNK_BYTES, f))
                }
                None => None,
            };
            while let Some(chunk) = rx.blocking_recv() {
                h.update(&chunk);
                if let (Some(w), Some(p)) = (out.as_mut(), dest.as_ref()) {
                    w.write_all(&chunk).map_err(|e| Error::io(p, e))?;
                }
                total += chunk.len() as u64;
            }
            if let (Some(w), Some(p)) = (out, dest.as_ref()) {
                let f = w.into_inner().map_err(|e| Error::io(p, e.into_error()))?;
                f.sync_all().map_err(|e| Error::io(p, e))?;
            }
            Ok((total, hex::encode(h.finalize())))
        });
        Sink { tx, join }
    }

    async fn finish(self) -> Result<(u64, String)> {
        drop(self.tx);
        self.join
            .await
            .map_err(|e| Error::Internal(format!("hashing task: {e}")))?
    }
}

/// Why the async half stopped early.
enum Stop {
    /// The sink hung up: its own error says why.
    SinkGone,
    Err(Error),
}

impl Fetcher {
    pub fn new(retry: RetryPolicy) -> Result<Fetcher> {
        Ok(Fetcher {
            client: http_client()?,
            retry,
            meter: Throughput::default(),
        })
    }

    /// Measured download throughput, bytes per second (EWMA over files); 0 when unknown.
    pub fn download_bps(&self) -> u64 {
        self.meter.bps()
    }

    /// Fetches `file` from `source` into `dest`, calling `progress(bytes_done)` as it goes,
    /// and verifies size and SHA-256. A partial `dest` left from before is continued. On a
    /// mismatch `dest` is deleted and `Error::Checksum` names `file.path`.
    pub async fn fetch_file(
        &self,
        source: &Endpoint,
        file: &ModelFile,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<()> {
        let size = file.size_bytes;
        let mut keep = match tokio::fs::metadata(dest).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io(dest, e)),
        };
        if keep > size || matches!(source, Endpoint::Local(_)) {
            keep = 0; // longer than it should be, or a cheap local copy: start over
        }
        let sink = Sink::spawn(Some(dest.to_path_buf()), keep);
        let started = Instant::now();
        let stopped = match source {
            Endpoint::Http { .. } => {
                let url = source.locate(&file.path);
                self.produce_http(&url, &file.path, size, keep, &sink.tx, progress)
                    .await
            }
            Endpoint::Local(_) => {
                let path = PathBuf::from(source.locate(&file.path));
                produce_local(&path, size, &sink.tx, progress).await
            }
        };
        let finished = sink.finish().await;
        let (got, digest) = match (stopped, finished) {
            (Err(Stop::Err(e)), _) | (_, Err(e)) => {
                // A checksum-class failure leaves nothing behind; others keep the partial
                // file so a later attempt can resume it.
                if matches!(e, Error::Checksum { .. }) {
                    let _ = tokio::fs::remove_file(dest).await;
                }
                return Err(e);
            }
            (Err(Stop::SinkGone), Ok(_)) => {
                return Err(Error::Internal("hashing task stopped early".into()));
            }
            (Ok(()), Ok(v)) => v,
        };
        if got - keep >= MIN_SAMPLE_BYTES {
            // Small files measure latency, not throughput.
            self.meter.record(got - keep, started.elapsed());
        }
        if got != size || !digest.eq_ignore_ascii_case(&file.sha256) {
            let _ = tokio::fs::remove_file(dest).await;
            let (expected, actual) = if got != size {
                (format!("{size} bytes"), format!("{got} bytes"))
            } else {
                (file.sha256.clone(), digest)
            };
            return Err(Error::Checksum {
                path: file.path.clone(),
                expected,
                actual,
            });
        }
        Ok(())
    }

    /// Streams `url` into the sink from byte `offset`, resuming with `Range` after a cut.
    async fn produce_http(
        &self,
        url: &str,
        rel: &str,
        size: u64,
        mut offset: u64,
        tx: &mpsc::Sender<Bytes>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Stop> {
        let mut failures = 0u32;
        let mut first = true;
        while first || offset < size {
            first = false;
            let before = offset;
            let attempt = self.http_attempt(url, rel, size, &mut offset, tx, progress);
            let err = match attempt.await {
                Ok(()) if offset >= size => return Ok(()),
                Ok(()) => unavailable(
                    url,
                    &format!("connection closed at byte {offset} of {size}"),
                ),
                Err(Stop::Err(e)) if e.is_retryable() => e,
                Err(stop) => return Err(stop),
            };
            if offset > before {
                failures = 0; // it was moving: this is a new interruption, not a dead end
            }
            failures += 1;
            if failures >= self.retry.max_attempts {
                return Err(Stop::Err(err));
            }
            let backoff = self
                .retry
                .base_backoff
                .saturating_mul(1 << (failures - 1).min(5))
                .min(Duration::from_secs(8));
            tracing::warn!(url = %redact::url(url), offset, size, error = %err, ?backoff, "download interrupted, retrying");
            tokio::time::sleep(backoff).await;
        }
        Ok(())
    }

    async fn http_attempt(
        &self,
        url: &str,
        rel: &str,
        size: u64,
        offset: &mut u64,
        tx: &mpsc::Sender<Bytes>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Stop> {
        let mut req = self.client.get(url);
        if *offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={}-", *offset));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Stop::Err(transport_error(url, e)))?;
        let status = resp.status();
        // A server that ignores Range answers 200 with the whole body: skip what we have.
        let mut skip = match status.as_u16() {
            206 => {
                let start = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(*offset) {
                    return Err(Stop::Err(unavailable(
                        url,
                        &format!(
                            "asked for bytes from {}, got Content-Range from {start:?}",
                            *offset
                        ),
                    )));
                }
                0
            }
            200 => *offset,
            416 if *offset == size => return Ok(()),
            _ => return Err(Stop::Err(status_error(url, status))),
        };
        let mut body = resp.bytes_stream();
        loop {
            let next = tokio::time::timeout(self.retry.read_timeout, body.next())
                .await
                .map_err(|_| Stop::Err(unavailable(url, &"read timed out")))?;
            let Some(chunk) = next else { return Ok(()) };
            let mut chunk = chunk.map_err(|e| Stop::Err(transport_error(url, e)))?;
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                chunk = chunk.slice(n as usize..);
                skip -= n;
                if chunk.is_empty() {
                    continue;
                }
            }
            if *offset + chunk.len() as u64 > size {
                return Err(Stop::Err(Error::Checksum {
                    path: rel.to_owned(),
                    expected: format!("{size} bytes"),
                    actual: format!("more than {size} bytes"),
                }));
            }
            *offset += chunk.len() as u64;
            tx.send(chunk).await.map_err(|_| Stop::SinkGone)?;
            progress(*offset);
        }
    }
}

async fn produce_local(
    path: &Path,
    size: u64,
    tx: &mpsc::Sender<Bytes>,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), Stop> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Stop::Err(Error::io(path, e)))?;
    let mut done = 0u64;
    loop {
        let mut buf = bytes::BytesMut::with_capacity(IO_CHUNK_BYTES);
        let n = f
            .read_buf(&mut buf)
            .await
            .map_err(|e| Stop::Err(Error::io(path, e)))?;
        if n == 0 {
            return Ok(());
        }
        done += n as u64;
        tx.send(buf.freeze()).await.map_err(|_| Stop::SinkGone)?;
        progress(done.min(size));
        if done > size {
            return Ok(()); // the size check reports it; no need to read the rest
        }
    }
}

/// What [`bench_download`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    pub url: String,
    pub bytes: u64,
    pub seconds: f64,
    /// Megabytes (10^6 bytes) per second, hashing included.
    pub mb_per_s: f64,
    pub sha256: String,
}

/// Downloads `url` once with SHA-256 on, writing to `dest` (or discarding the bytes when
/// `None`, like `curl -o /dev/null`), and reports the throughput. A benchmark, not a test.
pub async fn bench_download(url: &str, dest: Option<&Path>) -> Result<BenchReport> {
    let client = http_client()?;
    let started = Instant::now();
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| transport_error(url, e))?;
    if !resp.status().is_success() {
        return Err(status_error(url, resp.status()));
    }
    let sink = Sink::spawn(dest.map(Path::to_path_buf), 0);
    let mut body = resp.bytes_stream();
    let mut failed = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if sink.tx.send(c).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(transport_error(url, e));
                break;
            }
        }
    }
    let (bytes, sha256) = sink.finish().await?;
    if let Some(e) = failed {
        return Err(e);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchReport {
        url: redact::url(url),
        bytes,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_an_ewma() {
        let t = Throughput::default();
        assert_eq!(t.bps(), 0);
        t.record(1000, Duration::from_secs(1));
        assert_eq!(t.bps(), 1000);
        t.record(2000, Duration::from_secs(1));
        assert_eq!(t.bps(), 1300);
    }

    #[tokio::test]
    async fn local_copy_verifies_and_deletes_on_mismatch() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"hello").unwrap();
        let src = Endpoint::Local(d.path().to_path_buf());
        let f = Fetcher::new(RetryPolicy::default()).unwrap();
        let dest = d.path().join("out");
        let good = ModelFile {
            path: "f".into(),
            size_bytes: 5,
            sha256: hex::encode(Sha256::digest(b"hello")),
        };
        let seen = std::sync::atomic::AtomicU64::new(0);
        f.fetch_file(&src, &good, &dest, &|n| {
            seen.store(n, std::sync::atomic::Ordering::Relaxed)
        })
        .await
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 5);
        let bad = ModelFile {
            sha256: "0".repeat(64),
            ..good
        };
        let e = f.fetch_file(&src, &bad, &dest, &|_| {}).await.unwrap_err();
        assert!(
            matches!(e, Error::Checksum { ref path, .. } if path == "f"),
            "{e}"
        );
        assert!(!dest.exists());
    }
}
