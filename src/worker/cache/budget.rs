//! The index and the byte budget: which bundles are present, what they weigh, what is
//! reserved by downloads in flight, least-recently-used order, pins and eviction.
//!
//! The manifest's total is reserved before a download starts, making room by evicting
//! least-recently-used bundles that are not pinned. A [`BundleGuard`] pins its bundle; pins
//! are atomic counters, so guards can be cloned and dropped anywhere (even under other
//! locks); only the 0 -> 1 transition happens under the cache lock, where eviction looks.
//! Eviction renames a bundle to a tombstone under the lock (so the index always matches the
//! disk) and leaves the deleting to the caller, outside the lock.
//!
//! This module owns `State` and every change to it except a download's own bookkeeping
//! (`download` reserves, un-reserves and inserts the finished bundle under the same lock).
//! It does no I/O but the tombstone rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::download::{Dl, InFlight};
use super::layout::{bundle_dir_name, Preloaded, TOMB_PREFIX};
use super::{bump, DiskCache};
use crate::error::{Error, Result};
use crate::types::{ModelId, ModelManifest};

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

pub(super) fn preloaded_guard(id: &ModelId, p: &Preloaded) -> BundleGuard {
    BundleGuard {
        id: id.clone(),
        path: p.dir.clone(),
        manifest: p.manifest.clone(),
        pins: None,
    }
}

/// A bundle in the cache directory.
pub(super) struct Entry {
    pub(super) dir: PathBuf,
    pub(super) manifest: Arc<ModelManifest>,
    pub(super) bytes: u64,
    pub(super) pins: Arc<AtomicUsize>,
    /// The `State::tick` of its last use: the LRU order.
    pub(super) last_used: u64,
}

impl Entry {
    pub(super) fn pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    /// A new pin; call with the cache lock held (the 0 -> 1 step).
    pub(super) fn guard(&self, id: &ModelId) -> BundleGuard {
        self.pins.fetch_add(1, Ordering::AcqRel);
        BundleGuard {
            id: id.clone(),
            path: self.dir.clone(),
            manifest: self.manifest.clone(),
            pins: Some(self.pins.clone()),
        }
    }
}

#[derive(Default)]
/// The index, under the cache lock.
pub(super) struct State {
    pub(super) entries: HashMap<ModelId, Entry>,
    pub(super) inflight: HashMap<ModelId, InFlight>,
    pub(super) used: u64,
    pub(super) reserved: u64,
    pub(super) tick: u64,
}

impl DiskCache {
    /// A new pin on a bundle already present (preloaded or cached), without touching the LRU.
    pub fn pin(&self, id: &ModelId) -> Option<BundleGuard> {
        if let Some(p) = self.0.preloaded.get(id) {
            return Some(preloaded_guard(id, p));
        }
        let st = self.lock();
        st.entries.get(id).map(|e| e.guard(id))
    }

    /// Renames `id`'s bundle to a tombstone and drops it from the index. Lock held.
    pub(super) fn evict_locked(&self, st: &mut State, id: &ModelId) -> Result<PathBuf> {
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
    pub(super) fn make_room_locked(
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

/// What `make_room_locked` found.
pub(super) enum Room {
    /// Room made; these tombstones must be deleted before writing.
    Made(Vec<PathBuf>),
    /// Only downloads in flight are in the way: wait for this one, then look again.
    WaitFor(watch::Receiver<Dl>),
}

pub(super) fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}
