//! The worker's disk cache: a byte-budgeted LRU of model bundles, plus a read-only
//! preloaded directory baked into the container image.
//!
//! Layout of `CacheConfig::dir`:
//!
//! ```text
//! .corral-cache                 this directory belongs to Corral (everything else is swept)
//! <name>/                       one bundle per model; <name> is the model id, escaped
//!   .corral-bundle.json         the marker: manifest + `verified`; written last
//!   unet/model.onnx ...         the manifest's files
//! .tmp-<name>/                  a download in progress (swept at start-up)
//! .tomb-<name>-<n>/             an evicted bundle being deleted (swept at start-up)
//! ```
//!
//! Disk safety (STYLE #10): a download goes to `.tmp-<name>/`; every file is size- and
//! hash-verified and fsynced, the marker is written and fsynced, then the directory is renamed
//! into place and the parent fsynced. Eviction renames a bundle to a tombstone under the lock
//! and deletes it outside. So a `kill -9` at any moment leaves either a complete, verified
//! bundle or something that start-up deletes. The index changes under the same lock as the
//! renames, so it always matches the disk.
//!
//! Budget: the manifest's total is reserved before a download starts, making room by evicting
//! least-recently-used bundles that are not pinned. A [`BundleGuard`] pins its bundle; pins
//! are atomic counters, so guards can be cloned and dropped anywhere (even under other
//! locks); only the 0 -> 1 transition happens under the cache lock, where eviction looks.
//!
//! This module owns the cache directory and nothing else: it reads the preloaded directory and
//! never writes to it, and it knows nothing of the wire or of VRAM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::manifest::{hash_file, validate_manifest, MANIFEST_FILE};
use crate::types::{CacheTier, DiskModel, DownloadState, ModelId, ModelManifest};
use crate::worker::fetch::{Fetcher, RetryPolicy, Source};

/// Marks a directory as a Corral cache; `open` refuses a non-empty directory without it.
pub const CACHE_MARKER: &str = ".corral-cache";
/// Inside a bundle: its manifest and whether its files were verified; written last.
pub const BUNDLE_MARKER: &str = ".corral-bundle.json";
const TMP_PREFIX: &str = ".tmp-";
const TOMB_PREFIX: &str = ".tomb-";

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

/// What a bundle directory's marker says.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BundleMarker {
    manifest: ModelManifest,
    /// Every file's size and digest were checked when the bundle was written.
    verified: bool,
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

/// A pinned bundle: while any clone is alive the bundle is never evicted.
#[derive(Debug)]
pub struct BundleGuard {
    id: ModelId,
    path: PathBuf,
    manifest: Arc<ModelManifest>,
    /// `None` for preloaded bundles, which are never evicted anyway.
    pins: Option<Arc<AtomicUsize>>,
}

impl BundleGuard {
    /// The bundle directory; files are at `path().join(file.path)`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model_id(&self) -> &ModelId {
        &self.id
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    pub fn is_preloaded(&self) -> bool {
        self.pins.is_none()
    }

    /// Another pin on the same bundle (same as `clone`).
    pub fn pin(&self) -> BundleGuard {
        self.clone()
    }
}

impl Clone for BundleGuard {
    fn clone(&self) -> Self {
        if let Some(p) = &self.pins {
            // From >= 1: never the 0 -> 1 step that eviction must see under the lock.
            p.fetch_add(1, Ordering::AcqRel);
        }
        Self {
            id: self.id.clone(),
            path: self.path.clone(),
            manifest: self.manifest.clone(),
            pins: self.pins.clone(),
        }
    }
}

impl Drop for BundleGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.pins {
            p.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

struct Entry {
    dir: PathBuf,
    manifest: Arc<ModelManifest>,
    bytes: u64,
    pins: Arc<AtomicUsize>,
    last_used: u64,
}

impl Entry {
    fn pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    /// A new pin; call with the cache lock held (the 0 -> 1 step).
    fn guard(&self, id: &ModelId) -> BundleGuard {
        self.pins.fetch_add(1, Ordering::AcqRel);
        BundleGuard {
            id: id.clone(),
            path: self.dir.clone(),
            manifest: self.manifest.clone(),
            pins: Some(self.pins.clone()),
        }
    }
}

struct Preloaded {
    dir: PathBuf,
    manifest: Arc<ModelManifest>,
    bytes: u64,
}

/// A shared download's state, watched by every `ensure` waiting for it.
enum Dl {
    Running { done: u64, total: u64 },
    Done(std::result::Result<BundleGuard, Arc<Error>>),
}

struct InFlight {
    total: u64,
    done: Arc<AtomicU64>,
    rx: watch::Receiver<Dl>,
}

#[derive(Default)]
struct State {
    entries: HashMap<ModelId, Entry>,
    inflight: HashMap<ModelId, InFlight>,
    used: u64,
    reserved: u64,
    tick: u64,
}

struct Inner {
    cfg: CacheConfig,
    preloaded: HashMap<ModelId, Preloaded>,
    state: Mutex<State>,
    fetcher: Fetcher,
    downloads: Semaphore,
    /// Prefetches run one at a time, and only then queue for a download slot.
    prefetches: Semaphore,
    counters: Counters,
    tomb_seq: AtomicU64,
}

#[derive(Clone)]
pub struct DiskCache(Arc<Inner>);

/// The directory name of a model: the id with everything but `[A-Za-z0-9_-]` escaped as
/// `%XX`, so it never starts with `.` and never contains `/`.
pub fn bundle_dir_name(id: &ModelId) -> String {
    let mut out = String::new();
    for b in id.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape_dir_name(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether two manifests describe the same bytes (source and kind may differ).
fn same_files(a: &ModelManifest, b: &ModelManifest) -> bool {
    let key = |m: &ModelManifest| {
        let mut v: Vec<_> = m
            .files
            .iter()
            .map(|f| (f.path.clone(), f.size_bytes, f.sha256.to_ascii_lowercase()))
            .collect();
        v.sort();
        v
    };
    a.id == b.id && key(a) == key(b)
}

/// An owned copy of an error shared between the waiters of one download.
fn dup_error(e: &Error) -> Error {
    e.duplicate()
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("blocking task: {e}"))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn remove_any(p: &Path) {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = r {
        tracing::warn!(path = %p.display(), error = %e, "could not delete");
    }
}

fn touch(p: &Path) {
    let r = std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(e) = r {
        tracing::debug!(path = %p.display(), error = %e, "could not touch marker");
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Checks a bundle directory against its manifest: sizes always, digests when asked.
fn check_bundle(dir: &Path, m: &ModelManifest, hash: bool) -> Result<()> {
    for f in &m.files {
        let p = dir.join(&f.path);
        let meta = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
        if !meta.is_file() || meta.len() != f.size_bytes {
            return Err(Error::Checksum {
                path: f.path.clone(),
                expected: format!("{} bytes", f.size_bytes),
                actual: format!("{} bytes", meta.len()),
            });
        }
        if hash {
            let (_, digest) = hash_file(&p)?;
            if !digest.eq_ignore_ascii_case(&f.sha256) {
                return Err(Error::Checksum {
                    path: f.path.clone(),
                    expected: f.sha256.clone(),
                    actual: digest,
                });
            }
        }
    }
    Ok(())
}

fn read_marker(dir: &Path) -> Result<BundleMarker> {
    let p = dir.join(BUNDLE_MARKER);
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::invalid("bundle marker", e.to_string()))
}

/// Start-up scan of the cache directory: sweeps leftovers and returns the valid bundles
/// (with their markers' mtimes, touched on every hit, for the LRU order). Blocking.
fn scan_cache_dir(dir: &Path) -> Result<Vec<(ModelId, Entry, std::time::SystemTime)>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let marker = dir.join(CACHE_MARKER);
    let names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    if !marker.exists() {
        if !names.is_empty() {
            return Err(Error::Config(format!(
                "cache dir {} is not empty and has no {CACHE_MARKER}: refusing to sweep it",
                dir.display()
            )));
        }
        std::fs::write(&marker, b"corral disk cache\n").map_err(|e| Error::io(&marker, e))?;
    }
    let mut out = Vec::new();
    for ent in names {
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == CACHE_MARKER {
            continue;
        }
        if name.starts_with(TMP_PREFIX) || name.starts_with(TOMB_PREFIX) {
            remove_any(&path);
            continue;
        }
        let valid = read_marker(&path).and_then(|mk| {
            validate_manifest(&mk.manifest)?;
            if bundle_dir_name(&mk.manifest.id) != name {
                return Err(Error::invalid("bundle marker", "id does not match dir"));
            }
            check_bundle(&path, &mk.manifest, !mk.verified)?;
            Ok(mk)
        });
        match valid {
            Ok(mk) => {
                let mtime = std::fs::metadata(path.join(BUNDLE_MARKER))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let m = mk.manifest;
                out.push((
                    m.id.clone(),
                    Entry {
                        dir: path,
                        bytes: m.total_bytes(),
                        manifest: Arc::new(m),
                        pins: Arc::new(AtomicUsize::new(0)),
                        last_used: 0,
                    },
                    mtime,
                ));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "deleting invalid cache entry");
                remove_any(&path);
            }
        }
    }
    fsync_dir(dir)?;
    Ok(out)
}

/// Start-up scan of the read-only preloaded directory: one bundle per subdirectory, described
/// by its marker, else its `corral-manifest.json`, else by hashing its files. Sizes are
/// always checked; a bad bundle is skipped (and logged), never deleted. Blocking.
fn scan_preloaded_dir(dir: &Path) -> Result<HashMap<ModelId, Preloaded>> {
    let mut out = HashMap::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %dir.display(), "no preloaded directory");
            return Ok(out);
        }
        Err(e) => return Err(Error::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        let found = (|| -> Result<ModelManifest> {
            let m = match read_marker(&path) {
                Ok(mk) => mk.manifest,
                Err(_) => {
                    let id = unescape_dir_name(&name)
                        .ok_or_else(|| Error::invalid("preloaded dir", name.clone()))?;
                    let mf = path.join(MANIFEST_FILE);
                    let files = match std::fs::read(&mf) {
                        Ok(b) => serde_json::from_slice(&b)
                            .map_err(|e| Error::invalid("manifest", e.to_string()))?,
                        Err(_) => crate::manifest::scan_dir(&path)?,
                    };
                    ModelManifest {
                        id: ModelId(id),
                        kind: Default::default(),
                        source: format!("file://{}", path.display()),
                        files,
                    }
                }
            };
            validate_manifest(&m)?;
            check_bundle(&path, &m, false)?;
            Ok(m)
        })();
        match found {
            Ok(m) => {
                out.insert(
                    m.id.clone(),
                    Preloaded {
                        dir: path,
                        bytes: m.total_bytes(),
                        manifest: Arc::new(m),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping preloaded bundle")
            }
        }
    }
    Ok(out)
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
        found.sort_by_key(|(_, _, t)| *t);
        let mut st = State::default();
        for (id, mut e, _) in found {
            st.tick += 1;
            e.last_used = st.tick;
            st.used += e.bytes;
            st.entries.insert(id, e);
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

    /// Makes `manifest`'s bundle present and returns it pinned, with where it was found:
    /// `Preloaded`, `Disk`, or `Download` (fetched by this call or one it joined).
    pub async fn ensure(
        &self,
        manifest: &ModelManifest,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(BundleGuard, CacheTier)> {
        self.ensure_inner(manifest, progress, false).await
    }

    /// Downloads `manifest` in the background at low priority (one prefetch at a time, behind
    /// `ensure` downloads). Ends with `Error::ResourceExhausted` if the budget cannot be freed.
    pub fn prefetch(&self, manifest: ModelManifest) -> tokio::task::JoinHandle<Result<()>> {
        let this = self.clone();
        let span = tracing::info_span!("prefetch", model = %manifest.id);
        tokio::spawn(
            async move {
                // Queued prefetches hold no reservation: they reserve once it is their turn.
                let _turn = this
                    .0
                    .prefetches
                    .acquire()
                    .await
                    .map_err(|_| Error::Internal("prefetch semaphore closed".into()))?;
                this.ensure_inner(&manifest, &|_, _| {}, true)
                    .await
                    .map(|_| ())
            }
            .instrument(span),
        )
    }

    /// A new pin on a bundle already present (preloaded or cached), without touching the LRU.
    pub fn pin(&self, id: &ModelId) -> Option<BundleGuard> {
        if let Some(p) = self.0.preloaded.get(id) {
            return Some(preloaded_guard(id, p));
        }
        let st = self.lock();
        st.entries.get(id).map(|e| e.guard(id))
    }

    async fn ensure_inner(
        &self,
        manifest: &ModelManifest,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
        prefetch: bool,
    ) -> Result<(BundleGuard, CacheTier)> {
        validate_manifest(manifest)?;
        let id = &manifest.id;
        let c = &self.0.counters;
        if let Some(p) = self.0.preloaded.get(id) {
            if same_files(&p.manifest, manifest) {
                if !prefetch {
                    bump(&c.hits_preloaded, 1);
                }
                return Ok((preloaded_guard(id, p), CacheTier::Preloaded));
            }
        }
        let mut waited = false;
        let mut counted = false;
        loop {
            let mut tombs = Vec::new();
            // A closure so that `?` inside cannot skip deleting the tombstones made so far.
            let step = (|| -> Result<std::result::Result<Next, (BundleGuard, CacheTier)>> {
                let mut st = self.lock();
                st.tick += 1;
                let tick = st.tick;
                let mut hit = None;
                if let Some(e) = st.entries.get_mut(id) {
                    if same_files(&e.manifest, manifest) {
                        let tier = if waited {
                            CacheTier::Download
                        } else {
                            // After waiting for room, someone else may have fetched it: that
                            // was already counted as a miss.
                            if !prefetch && !counted {
                                bump(&c.hits_disk, 1);
                            }
                            CacheTier::Disk
                        };
                        if !prefetch {
                            e.last_used = tick;
                        }
                        hit = Some((e.guard(id), tier));
                    } else if e.pinned() {
                        return Err(Error::Unavailable(format!(
                            "model {id}: an older version of the bundle is in use; retry later"
                        )));
                    } else {
                        tombs.push(self.evict_locked(&mut st, id)?);
                    }
                }
                match hit {
                    Some(h) => Ok(Err(h)),
                    None => {
                        if !prefetch && !counted {
                            counted = true;
                            bump(&c.misses, 1);
                        }
                        Ok(Ok(match st.inflight.get(id) {
                            Some(f) => Next::Join(f.rx.clone()),
                            None => {
                                match self.make_room_locked(&mut st, manifest, !prefetch)? {
                                    Room::Made(more) => {
                                        // The download deletes the tombstones before it writes.
                                        tombs.extend(more);
                                        let tombs = std::mem::take(&mut tombs);
                                        Next::Join(self.start_download_locked(
                                            &mut st, manifest, prefetch, tombs,
                                        ))
                                    }
                                    Room::WaitFor(rx) => Next::WaitFor(rx),
                                }
                            }
                        }))
                    }
                }
            })();
            if !tombs.is_empty() {
                tokio::task::spawn_blocking(move || tombs.iter().for_each(|t| remove_any(t)))
                    .await
                    .map_err(join_err)?;
            }
            let rx = match step? {
                Ok(Next::Join(rx)) => rx,
                Ok(Next::WaitFor(rx)) => {
                    // Another model's download holds the room we need; once it is done it
                    // can be evicted. Drop our receiver right away: it pins that bundle.
                    wait_done(rx).await;
                    continue;
                }
                Err((g, tier)) => {
                    if !prefetch {
                        // The marker's mtime carries the LRU order across restarts.
                        let marker = g.path().join(BUNDLE_MARKER);
                        let _ = tokio::task::spawn_blocking(move || touch(&marker)).await;
                    }
                    return Ok((g, tier));
                }
            };
            waited = true;
            match wait_download(rx, progress).await? {
                Some(g) if same_files(g.manifest(), manifest) => {
                    return Ok((g, CacheTier::Download));
                }
                // We joined a download of another version of this model, or the download
                // finished without a guard to share: look again; the index has the answer.
                _ => {}
            }
        }
    }

    /// Renames `id`'s bundle to a tombstone and drops it from the index. Lock held.
    fn evict_locked(&self, st: &mut State, id: &ModelId) -> Result<PathBuf> {
        let e = st
            .entries
            .get(id)
            .ok_or_else(|| Error::Internal(format!("evicting absent {id}")))?;
        let n = self.0.tomb_seq.fetch_add(1, Ordering::Relaxed);
        let tomb = self
            .0
            .cfg
            .dir
            .join(format!("{TOMB_PREFIX}{}-{n}", bundle_dir_name(id)));
        match std::fs::rename(&e.dir, &tomb) {
            Ok(()) => {}
            // Deleted behind our back: the index follows the disk.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(model = %id, "bundle vanished from disk");
            }
            Err(err) => return Err(Error::io(&e.dir, err)),
        }
        let bytes = e.bytes;
        st.entries.remove(id);
        st.used -= bytes;
        bump(&self.0.counters.evictions, 1);
        tracing::info!(model = %id, bytes, "evicted");
        Ok(tomb)
    }

    /// Evicts unpinned bundles, least recently used first, until `manifest` fits in the
    /// budget with everything reserved; evicts nothing if that cannot be done. When only
    /// downloads in flight stand in the way (they become evictable once done) and `may_wait`,
    /// answers with one of them to wait for. Lock held.
    fn make_room_locked(
        &self,
        st: &mut State,
        manifest: &ModelManifest,
        may_wait: bool,
    ) -> Result<Room> {
        let need = manifest.total_bytes();
        let max = self.0.cfg.max_bytes;
        let evictable: u64 = st
            .entries
            .values()
            .filter(|e| !e.pinned())
            .map(|e| e.bytes)
            .sum();
        let pinned_bytes = st.used - evictable;
        let blocked_by_pins = need > max || pinned_bytes + need > max;
        if !blocked_by_pins && st.used + st.reserved - evictable + need > max && may_wait {
            if let Some(f) = st.inflight.values().next() {
                return Ok(Room::WaitFor(f.rx.clone()));
            }
        }
        if blocked_by_pins || st.used + st.reserved - evictable + need > max {
            let mut pinned: Vec<_> = st
                .entries
                .iter()
                .filter(|(_, e)| e.pinned())
                .map(|(id, e)| format!("{id} ({})", mb(e.bytes)))
                .collect();
            pinned.sort();
            let mut loading: Vec<_> = st
                .inflight
                .iter()
                .map(|(id, f)| format!("{id} ({})", mb(f.total)))
                .collect();
            loading.sort();
            return Err(Error::ResourceExhausted(format!(
                "no room for model {} ({}): cache budget {}, used {}, reserved by downloads {}; \
                 pinned: [{}]; downloading: [{}]",
                manifest.id,
                mb(need),
                mb(max),
                mb(st.used),
                mb(st.reserved),
                pinned.join(", "),
                loading.join(", "),
            )));
        }
        let mut tombs = Vec::new();
        while st.used + st.reserved + need > max {
            let victim = st
                .entries
                .iter()
                .filter(|(_, e)| !e.pinned())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| id.clone())
                .ok_or_else(|| Error::Internal("eviction found no victim".into()))?;
            tombs.push(self.evict_locked(st, &victim)?);
        }
        Ok(Room::Made(tombs))
    }

    /// Reserves the bundle's bytes and spawns its download. Lock held.
    fn start_download_locked(
        &self,
        st: &mut State,
        manifest: &ModelManifest,
        prefetch: bool,
        tombs: Vec<PathBuf>,
    ) -> watch::Receiver<Dl> {
        let total = manifest.total_bytes();
        st.reserved += total;
        let (tx, rx) = watch::channel(Dl::Running { done: 0, total });
        let done = Arc::new(AtomicU64::new(0));
        st.inflight.insert(
            manifest.id.clone(),
            InFlight {
                total,
                done: done.clone(),
                rx: rx.clone(),
            },
        );
        let this = self.clone();
        let m = manifest.clone();
        let span = tracing::info_span!("download", model = %m.id, bytes = total, prefetch);
        tokio::spawn(async move { this.run_download(m, tx, done, tombs).await }.instrument(span));
        rx
    }

    async fn run_download(
        self,
        m: ModelManifest,
        tx: watch::Sender<Dl>,
        done: Arc<AtomicU64>,
        tombs: Vec<PathBuf>,
    ) {
        let total = m.total_bytes();
        let name = bundle_dir_name(&m.id);
        let tmp = self.0.cfg.dir.join(format!("{TMP_PREFIX}{name}"));
        // Free the evicted bytes before writing new ones: the disk never holds more than
        // the budget.
        let deleted = tokio::task::spawn_blocking(move || tombs.iter().for_each(|t| remove_any(t)))
            .await
            .map_err(join_err);
        let result = match deleted {
            Ok(()) => self.download_bundle(&m, &tmp, &tx, &done).await,
            Err(e) => Err(e),
        };
        let (taken, outcome) = {
            let mut st = self.lock();
            st.reserved -= total;
            let taken = st.inflight.remove(&m.id);
            let outcome = match result {
                Ok(()) => {
                    let dir = self.0.cfg.dir.join(&name);
                    match std::fs::rename(&tmp, &dir) {
                        Ok(()) => {
                            st.tick += 1;
                            let e = Entry {
                                dir,
                                manifest: Arc::new(m.clone()),
                                bytes: total,
                                pins: Arc::new(AtomicUsize::new(0)),
                                last_used: st.tick,
                            };
                            let g = e.guard(&m.id);
                            st.used += total;
                            st.entries.insert(m.id.clone(), e);
                            Ok(g)
                        }
                        Err(e) => Err(Error::io(&dir, e)),
                    }
                }
                Err(e) => Err(e),
            };
            (taken, outcome)
        };
        drop(taken);
        let outcome = match outcome {
            Ok(g) => {
                bump(&self.0.counters.bytes_downloaded, total);
                let dir = self.0.cfg.dir.clone();
                match tokio::task::spawn_blocking(move || fsync_dir(&dir)).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "fsync of cache dir"),
                    Err(e) => tracing::warn!(error = %e, "fsync of cache dir"),
                    Ok(Ok(())) => {}
                }
                tracing::info!("downloaded");
                Ok(g)
            }
            Err(e) => {
                if matches!(e, Error::Checksum { .. }) {
                    bump(&self.0.counters.checksum_failures, 1);
                }
                tracing::warn!(error = %e, "download failed");
                let t = tmp.clone();
                let _ = tokio::task::spawn_blocking(move || remove_any(&t)).await;
                Err(Arc::new(e))
            }
        };
        // Receivers that are gone drop the guard here, outside any lock.
        let _ = tx.send(Dl::Done(outcome));
    }

    async fn download_bundle(
        &self,
        m: &ModelManifest,
        tmp: &Path,
        tx: &watch::Sender<Dl>,
        done: &AtomicU64,
    ) -> Result<()> {
        let source = Source::parse(&m.source)?;
        let _permit = self
            .0
            .downloads
            .acquire()
            .await
            .map_err(|_| Error::Internal("download semaphore closed".into()))?;
        let t = tmp.to_path_buf();
        tokio::task::spawn_blocking(move || {
            remove_any(&t);
            std::fs::create_dir_all(&t).map_err(|e| Error::io(&t, e))
        })
        .await
        .map_err(join_err)??;
        let total = m.total_bytes();
        let mut base = 0u64;
        for f in &m.files {
            let dest = tmp.join(&f.path);
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| Error::io(parent, e))?;
            }
            let report = |n: u64| {
                let d = base + n;
                done.store(d, Ordering::Relaxed);
                tx.send_replace(Dl::Running { done: d, total });
            };
            self.0
                .fetcher
                .fetch_file(&source, f, &dest, &report)
                .await?;
            base += f.size_bytes;
        }
        let marker = BundleMarker {
            manifest: m.clone(),
            verified: true,
        };
        let json = serde_json::to_vec_pretty(&marker)
            .map_err(|e| Error::Internal(format!("marker: {e}")))?;
        let t = tmp.to_path_buf();
        let files: Vec<String> = m.files.iter().map(|f| f.path.clone()).collect();
        tokio::task::spawn_blocking(move || {
            let mp = t.join(BUNDLE_MARKER);
            let f = std::fs::File::create(&mp).map_err(|e| Error::io(&mp, e))?;
            std::io::Write::write_all(&mut &f, &json).map_err(|e| Error::io(&mp, e))?;
            // An explicit, precise mtime: the kernel's own is coarse (jiffies), and the
            // markers' mtimes order the LRU after a restart.
            f.set_modified(std::time::SystemTime::now())
                .map_err(|e| Error::io(&mp, e))?;
            f.sync_all().map_err(|e| Error::io(&mp, e))?;
            // Files were fsynced by the sink; now every directory that names them.
            let mut dirs: Vec<PathBuf> = files
                .iter()
                .filter_map(|p| Path::new(p).parent().map(|d| t.join(d)))
                .collect();
            dirs.push(t.clone());
            dirs.sort();
            dirs.dedup();
            dirs.iter().try_for_each(|d| fsync_dir(d))
        })
        .await
        .map_err(join_err)?
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

    /// Models whose bundles are pinned now (for error messages and debugging).
    pub fn pinned(&self) -> Vec<ModelId> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .entries
            .iter()
            .filter(|(_, e)| e.pinned())
            .map(|(id, _)| id.clone())
            .collect();
        v.sort();
        v
    }
}

fn preloaded_guard(id: &ModelId, p: &Preloaded) -> BundleGuard {
    BundleGuard {
        id: id.clone(),
        path: p.dir.clone(),
        manifest: p.manifest.clone(),
        pins: None,
    }
}

/// What `make_room_locked` found.
enum Room {
    /// Room made; these tombstones must be deleted before writing.
    Made(Vec<PathBuf>),
    /// Only downloads in flight are in the way: wait for this one, then look again.
    WaitFor(watch::Receiver<Dl>),
}

/// What `ensure` does after looking at the index.
enum Next {
    /// Follow this download of the model.
    Join(watch::Receiver<Dl>),
    /// Wait for another model's download to finish, then look again.
    WaitFor(watch::Receiver<Dl>),
}

/// Waits until a download is done (either way), without keeping its result.
async fn wait_done(mut rx: watch::Receiver<Dl>) {
    loop {
        if matches!(*rx.borrow_and_update(), Dl::Done(_)) {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Follows a shared download, forwarding progress. `Ok(None)`: it finished without a guard
/// to share; the caller looks in the index again.
async fn wait_download(
    mut rx: watch::Receiver<Dl>,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Option<BundleGuard>> {
    loop {
        let seen = {
            let b = rx.borrow_and_update();
            match &*b {
                Dl::Running { done, total } => Ok((*done, *total)),
                Dl::Done(Ok(g)) => Err(Ok(g.clone())),
                Dl::Done(Err(e)) => Err(Err(dup_error(e))),
            }
        };
        match seen {
            Ok((done, total)) => progress(done, total),
            Err(Ok(g)) => {
                let total = g.manifest().total_bytes();
                progress(total, total);
                return Ok(Some(g));
            }
            Err(Err(e)) => return Err(e),
        }
        if rx.changed().await.is_err() {
            // Sender gone: the final value, if any, is still readable.
            let b = rx.borrow();
            return match &*b {
                Dl::Done(Ok(g)) => Ok(Some(g.clone())),
                Dl::Done(Err(e)) => Err(dup_error(e)),
                Dl::Running { .. } => Ok(None),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_escape_and_round_trip() {
        for id in [
            "sd15",
            "runwayml/stable-diffusion-v1-5",
            ".hidden",
            "a b%c",
            "é",
        ] {
            let n = bundle_dir_name(&ModelId::from(id));
            assert!(!n.starts_with('.') && !n.contains('/'), "{n}");
            assert_eq!(unescape_dir_name(&n).as_deref(), Some(id));
        }
    }
}
