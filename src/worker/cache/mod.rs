//! The worker's disk cache: a byte-budgeted LRU of model bundles, plus a read-only
//! preloaded directory baked into the container image.
//!
//! - `layout`: the directory's names and markers, what a valid bundle is, the start-up scan
//!   and sweep of leftovers (`.tmp-*`, `.tomb-*`, invalid bundles).
//! - `budget`: the index under one lock: bytes used and reserved, LRU order, pins
//!   ([`BundleGuard`]) and eviction to tombstones.
//! - `download`: `ensure` and `prefetch`, shared downloads, verification and the atomic rename
//!   that publishes a bundle.
//! - `batch`: `ensure_all`, the several bundles of one job pinned together.
//!
//! Disk safety (STYLE #10): download to `.tmp-<name>/`, verify, rename into place; evict by
//! renaming to a tombstone under the lock and delete outside it; sweep leftovers at start-up.
//! The index changes under the same lock as the renames, so it always matches the disk.
//!
//! This module owns the cache directory and nothing else: it reads the preloaded directory and
//! never writes to it, and it knows nothing of the wire or of VRAM.

mod batch;
mod budget;
mod download;
mod layout;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;

pub use batch::MAX_BUNDLES_PER_JOB;
pub use budget::BundleGuard;
pub use download::MAX_QUEUED_PREFETCHES;
pub use layout::{bundle_dir_name, BUNDLE_MARKER, CACHE_MARKER};

use crate::error::{Error, Result};
use crate::types::{DiskModel, DownloadState, ModelId};
use crate::worker::fetch::{Fetcher, RetryPolicy};
use budget::{Entry, State};
use layout::{scan_cache_dir, scan_preloaded_dir, Preloaded};

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Where downloaded bundles live. Default: none (required).
    pub dir: PathBuf,
    /// Most bytes of bundles in `dir`, downloads in progress included. Default: none.
    pub max_bytes: u64,
    /// Read-only bundles baked into the image; never evicted, not counted. Default: none.
    pub preloaded_dir: Option<PathBuf>,
    /// Downloads running at once. Default: 2.
    pub max_concurrent_downloads: usize,
}

/// What the cache holds, for heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheSnapshot {
    pub disk_models: Vec<DiskModel>,
    pub downloads: Vec<DownloadState>,
    /// `max_bytes - used - reserved`.
    pub free_bytes: u64,
    /// Bytes of bundles in the cache directory (preloaded not counted).
    pub used_bytes: u64,
    /// Bytes reserved by downloads in progress.
    pub reserved_bytes: u64,
    /// Measured download throughput (EWMA), bytes per second; 0 when unknown.
    pub download_bps: u64,
}

/// Counters since `open`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes_downloaded: u64,
    pub hits_preloaded: u64,
    pub hits_disk: u64,
    pub misses: u64,
    pub evictions: u64,
    pub checksum_failures: u64,
}

#[derive(Default)]
struct Counters {
    bytes_downloaded: AtomicU64,
    hits_preloaded: AtomicU64,
    hits_disk: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    checksum_failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Inner {
    cfg: CacheConfig,
    preloaded: HashMap<ModelId, Preloaded>,
    state: Mutex<State>,
    fetcher: Fetcher,
    downloads: Semaphore,
    /// Prefetches run one at a time, and only then queue for a download slot.
    prefetches: Semaphore,
    /// Models with a prefetch queued or running: bounded by [`MAX_QUEUED_PREFETCHES`].
    prefetch_queue: Mutex<HashSet<ModelId>>,
    counters: Counters,
    tomb_seq: AtomicU64,
}

#[derive(Clone)]
pub struct DiskCache(Arc<Inner>);

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("blocking task: {e}"))
}

impl DiskCache {
    pub async fn open(cfg: CacheConfig) -> Result<DiskCache> {
        Self::open_with(cfg, RetryPolicy::default()).await
    }

    /// `open` with a retry policy for HTTP transfers (tests use short backoffs).
    pub async fn open_with(cfg: CacheConfig, retry: RetryPolicy) -> Result<DiskCache> {
        if cfg.max_concurrent_downloads == 0 {
            return Err(Error::Config(
                "max_concurrent_downloads must be >= 1".into(),
            ));
        }
        let dir = cfg.dir.clone();
        let pre = cfg.preloaded_dir.clone();
        let (mut found, preloaded) = tokio::task::spawn_blocking(move || {
            let found = scan_cache_dir(&dir)?;
            let preloaded = match pre {
                Some(p) => scan_preloaded_dir(&p)?,
                None => HashMap::new(),
            };
            Ok::<_, Error>((found, preloaded))
        })
        .await
        .map_err(join_err)??;
        // The markers' mtimes (touched on every hit) carry the LRU order across restarts.
        found.sort_by_key(|f| f.mtime);
        let mut st = State::default();
        for f in found {
            st.tick += 1;
            let e = Entry {
                dir: f.dir,
                bytes: f.manifest.total_bytes(),
                manifest: Arc::new(f.manifest),
                pins: Arc::new(AtomicUsize::new(0)),
                last_used: st.tick,
            };
            st.used += e.bytes;
            st.entries.insert(e.manifest.id.clone(), e);
        }
        if st.used > cfg.max_bytes {
            tracing::warn!(
                used = st.used,
                max = cfg.max_bytes,
                "cache holds more than its budget; evicting at the next download"
            );
        }
        Ok(DiskCache(Arc::new(Inner {
            fetcher: Fetcher::new(retry)?,
            downloads: Semaphore::new(cfg.max_concurrent_downloads),
            prefetches: Semaphore::new(1),
            prefetch_queue: Mutex::new(HashSet::new()),
            cfg,
            preloaded,
            state: Mutex::new(st),
            counters: Counters::default(),
            tomb_seq: AtomicU64::new(0),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &CacheConfig {
        &self.0.cfg
    }

    /// What the cache holds now, for the heartbeat.
    pub fn report(&self) -> CacheSnapshot {
        let mut disk_models: Vec<DiskModel> = self
            .0
            .preloaded
            .iter()
            .map(|(id, p)| DiskModel {
                model_id: id.clone(),
                bytes: p.bytes,
                preloaded: true,
            })
            .collect();
        let st = self.lock();
        disk_models.extend(
            st.entries
                .iter()
                .filter(|(id, _)| !self.0.preloaded.contains_key(*id))
                .map(|(id, e)| DiskModel {
                    model_id: id.clone(),
                    bytes: e.bytes,
                    preloaded: false,
                }),
        );
        disk_models.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        let mut downloads: Vec<DownloadState> = st
            .inflight
            .iter()
            .map(|(id, f)| DownloadState {
                model_id: id.clone(),
                bytes_done: f.done.load(Ordering::Relaxed),
                bytes_total: f.total,
            })
            .collect();
        downloads.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        CacheSnapshot {
            disk_models,
            downloads,
            free_bytes: self.0.cfg.max_bytes.saturating_sub(st.used + st.reserved),
            used_bytes: st.used,
            reserved_bytes: st.reserved,
            download_bps: self.0.fetcher.download_bps(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.0.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            bytes_downloaded: g(&c.bytes_downloaded),
            hits_preloaded: g(&c.hits_preloaded),
            hits_disk: g(&c.hits_disk),
            misses: g(&c.misses),
            evictions: g(&c.evictions),
            checksum_failures: g(&c.checksum_failures),
        }
    }
}
