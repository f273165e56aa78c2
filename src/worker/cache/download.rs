//! Getting a bundle onto disk: `ensure` (hit, join a download in flight, or start one),
//! `prefetch`, the download itself and its atomic publication.
//!
//! A download goes to `.tmp-<name>/`; every file is size- and hash-verified and fsynced (by
//! `worker::fetch`), the marker is written and fsynced, then the directory is renamed into
//! place and the parent fsynced. So a `kill -9` at any moment leaves either a complete,
//! verified bundle or something that start-up deletes. Concurrent `ensure`s of one model share
//! one download through a `watch` channel.
//!
//! This module writes only `.tmp-*` directories and the final rename; it asks `budget` for
//! room and never picks victims itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::Instrument;

use super::budget::{preloaded_guard, BundleGuard, Entry, Room, State};
use super::layout::{
    bundle_dir_name, fsync_dir, remove_any, touch, BundleMarker, BUNDLE_MARKER, TMP_PREFIX,
};
use super::{bump, join_err, DiskCache};
use crate::error::{Error, Result};
use crate::manifest::validate_manifest;
use crate::source::Source;
use crate::types::{CacheTier, ModelId, ModelManifest};

/// A shared download's state, watched by every `ensure` waiting for it.
///
/// `Done` carries no pin: a waiter pins the new bundle through the index, under the lock,
/// like any hit. (A guard handed over in the channel stayed pinned until the download task
/// had also dropped its sender, a moment after the waiter had returned: callers that had
/// dropped their guard still found the bundle pinned and were refused room.)
pub(super) enum Dl {
    Running { done: u64, total: u64 },
    Done(std::result::Result<(), Arc<Error>>),
}

/// A download in flight, in the index.
pub(super) struct InFlight {
    pub(super) total: u64,
    pub(super) done: Arc<AtomicU64>,
    pub(super) rx: watch::Receiver<Dl>,
}

/// Whether two manifests describe the same bytes (source and kind may differ).
pub(super) fn same_files(a: &ModelManifest, b: &ModelManifest) -> bool {
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

/// Most models queued for prefetch at once; more are refused (a coordinator's Prefetch list
/// is not trusted to be small).
pub const MAX_QUEUED_PREFETCHES: usize = 64;

/// Removes a model from the prefetch queue when dropped.
struct Dequeue<'a>(&'a DiskCache, &'a ModelId);

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.0.prefetch_queue().remove(self.1);
    }
}

impl DiskCache {
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
    /// `ensure` downloads). Ends with `Error::ResourceExhausted` if the budget cannot be freed,
    /// or at once if [`MAX_QUEUED_PREFETCHES`] models are already queued; a model already
    /// queued is not queued twice (its handle ends `Ok` at once). An invalid manifest ends
    /// with `InvalidArgument` before anything is queued.
    pub fn prefetch(&self, manifest: ModelManifest) -> tokio::task::JoinHandle<Result<()>> {
        let this = self.clone();
        let span = tracing::info_span!("prefetch", model = %manifest.id);
        let admitted = validate_manifest(&manifest).and_then(|()| {
            let mut q = this.prefetch_queue();
            if q.contains(&manifest.id) {
                Ok(false)
            } else if q.len() >= MAX_QUEUED_PREFETCHES {
                Err(Error::ResourceExhausted(format!(
                    "prefetch of model {} refused: {} prefetches already queued (the most)",
                    manifest.id,
                    q.len()
                )))
            } else {
                q.insert(manifest.id.clone());
                Ok(true)
            }
        });
        tokio::spawn(
            async move {
                if !admitted? {
                    tracing::debug!("already queued");
                    return Ok(());
                }
                // Leaves the queue however this ends (even when the task is aborted).
                let _queued = Dequeue(&this, &manifest.id);
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

    fn prefetch_queue(&self) -> std::sync::MutexGuard<'_, HashSet<ModelId>> {
        self.0
            .prefetch_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
            // Done: look again; the index has the bundle (or another version of the model,
            // if that was the download we joined), and `waited` makes it a `Download`.
            waited = true;
            wait_download(rx, progress, manifest.total_bytes()).await?;
        }
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
                            st.used += total;
                            st.entries.insert(m.id.clone(), e);
                            Ok(())
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
            Ok(()) => {
                bump(&self.0.counters.bytes_downloaded, total);
                let dir = self.0.cfg.dir.clone();
                match tokio::task::spawn_blocking(move || fsync_dir(&dir)).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "fsync of cache dir"),
                    Err(e) => tracing::warn!(error = %e, "fsync of cache dir"),
                    Ok(Ok(())) => {}
                }
                tracing::info!("downloaded");
                Ok(())
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
        let _ = tx.send(Dl::Done(outcome));
    }

    async fn download_bundle(
        &self,
        m: &ModelManifest,
        tmp: &Path,
        tx: &watch::Sender<Dl>,
        done: &AtomicU64,
    ) -> Result<()> {
        let source = Source::parse(&m.source)?.resolve()?;
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

/// Follows a shared download to its end, forwarding progress (`total` until the download
/// says its own).
async fn wait_download(
    mut rx: watch::Receiver<Dl>,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
    mut total: u64,
) -> Result<()> {
    loop {
        let seen = match &*rx.borrow_and_update() {
            Dl::Running { done, total } => Ok((*done, *total)),
            Dl::Done(Ok(())) => Err(Ok(())),
            Dl::Done(Err(e)) => Err(Err(dup_error(e))),
        };
        match seen {
            Ok((d, t)) => {
                total = t;
                progress(d, t);
            }
            Err(Ok(())) => {
                progress(total, total);
                return Ok(());
            }
            Err(Err(e)) => return Err(e),
        }
        if rx.changed().await.is_err() {
            // The sender is gone; its last value, if any, is still readable.
            return match &*rx.borrow() {
                Dl::Done(Err(e)) => Err(dup_error(e)),
                _ => Ok(()),
            };
        }
    }
}
