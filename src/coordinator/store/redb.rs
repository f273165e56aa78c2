//! The embedded backend: one redb file, `data_dir/corral.redb`.
//!
//! One thread owns writing. It takes every operation waiting in its channel,
//! applies them in one transaction and commits with an fsync (group commit),
//! then runs the callbacks in order. Readers open read transactions on the
//! same database from any thread.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tracing::{debug, error, info};

use super::{Cursor, Done, ListQuery, Loaded, Op, Page, StoredJob};
use crate::error::{Error, Result};
use crate::types::*;

/// Job id -> JSON `StoredJob`.
pub(super) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Scoped idempotency key (see `scoped_key`) -> job id.
pub(super) const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// Model id -> JSON `ModelManifest`.
pub(super) const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
/// (job id, index) -> PNG bytes of a completed job.
pub(super) const IMAGES: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("images");
/// (created_ms, job id): every job, in the order `ListJobs` pages through.
pub(super) const BY_CREATED: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_created");
/// (finished_ms, job id): finished jobs, oldest first, for the retention sweep.
pub(super) const FINISHED: TableDefinition<(u64, &str), ()> = TableDefinition::new("finished");
/// Job ids of unfinished jobs: what a restart loads.
pub(super) const UNFINISHED: TableDefinition<&str, ()> = TableDefinition::new("unfinished");
/// "schema" -> the layout version of the tables above.
pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The table layout this code writes.
pub(super) const SCHEMA: &str = "2";

/// Most operations written in one transaction.
const MAX_BATCH: usize = 4096;

/// redb's page cache; bounds the memory the store uses beside the data.
const CACHE_BYTES: usize = 64 << 20;

fn store_err(e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    match &e {
        redb::Error::Io(io) if io.raw_os_error() == Some(28) => {
            Error::ResourceExhausted(format!("store: the disk is full ({e})"))
        }
        _ => Error::Unavailable(format!("store: {e}")),
    }
}

enum Msg {
    Write(Vec<Op>, Option<Done>),
    Reopen(oneshot::Sender<Result<Loaded>>),
    Close(oneshot::Sender<Result<()>>),
}

/// Shared between the writer and readers.
struct Shared {
    /// None while failed or closed.
    db: RwLock<Option<Arc<Database>>>,
    failed: Mutex<Option<String>>,
    /// Fault injection for tests: the next commit fails as a full disk would.
    fail_next: std::sync::atomic::AtomicBool,
}

pub(super) struct RedbStore {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

fn open_db(path: Option<&Path>) -> Result<Database> {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    let db = match path {
        Some(p) => super::migrate::open_or_upgrade(&b, p)?,
        None => b
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(store_err)?,
    };
    // Tables must exist before a read transaction can open them.
    let w = db.begin_write().map_err(store_err)?;
    {
        w.open_table(JOBS).map_err(store_err)?;
        w.open_table(IDEMPOTENCY).map_err(store_err)?;
        w.open_table(MODELS).map_err(store_err)?;
        w.open_table(IMAGES).map_err(store_err)?;
        w.open_table(BY_CREATED).map_err(store_err)?;
        w.open_table(FINISHED).map_err(store_err)?;
        w.open_table(UNFINISHED).map_err(store_err)?;
        w.open_table(META).map_err(store_err)?;
    }
    w.commit().map_err(store_err)?;
    Ok(db)
}

impl RedbStore {
    pub(super) fn open(data_dir: &Path) -> Result<(Self, Loaded)> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let path = data_dir.join("corral.redb");
        let db = open_db(Some(&path))?;
        super::migrate::migrate(&db, data_dir)?;
        Self::start(db, Some(path))
    }

    pub(super) fn memory() -> Result<(Self, Loaded)> {
        let db = open_db(None)?;
        super::migrate::mark_current(&db)?;
        Self::start(db, None)
    }

    fn start(db: Database, path: Option<PathBuf>) -> Result<(Self, Loaded)> {
        let loaded = read_loaded(&db)?;
        info!(
            path = %path.as_ref().map_or("memory".into(), |p| p.display().to_string()),
            unfinished = loaded.unfinished.len(),
            models = loaded.models.len(),
            "store opened"
        );
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            failed: Mutex::new(None),
            fail_next: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("corral-store".into())
            .spawn(move || writer(s, path, rx))
            .map_err(|e| Error::Internal(format!("store thread: {e}")))?;
        Ok((Self { tx, shared }, loaded))
    }

    pub(super) fn write(&self, ops: Vec<Op>, done: Option<Done>) {
        if let Err(mpsc::SendError(Msg::Write(_, Some(done)))) = self.tx.send(Msg::Write(ops, done))
        {
            done(Err(Error::Unavailable("store: closed".into())));
        }
    }

    pub(super) fn fail_next_commit(&self) {
        self.shared
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn failed(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) async fn reopen(&self) -> Result<Loaded> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Reopen(tx))
            .map_err(|_| Error::Unavailable("store: closed".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("store: the writer stopped".into()))?
    }

    pub(super) async fn close(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    fn db(&self) -> Result<Arc<Database>> {
        self.shared
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "store: {}",
                    self.failed().unwrap_or_else(|| "closed".into())
                ))
            })
    }

    pub(super) fn get(&self, id: &JobId) -> Result<Option<StoredJob>> {
        let db = self.db()?;
        let r = db.begin_read().map_err(store_err)?;
        let t = r.open_table(JOBS).map_err(store_err)?;
        let v = t.get(id.0.as_str()).map_err(store_err)?;
        v.map(|v| decode_job(id.as_str(), v.value())).transpose()
    }

    pub(super) fn images(&self, id: &JobId, n: usize) -> Result<Vec<Bytes>> {
        let db = self.db()?;
        let r = db.begin_read().map_err(store_err)?;
        let t = r.open_table(IMAGES).map_err(store_err)?;
        (0..n)
            .map(|i| {
                t.get((id.0.as_str(), i as u32))
                    .map_err(store_err)?
                    .map(|v| Bytes::copy_from_slice(v.value()))
                    .ok_or_else(|| {
                        Error::Internal(format!("image {i} of job {id} is missing from the store"))
                    })
            })
            .collect()
    }

    pub(super) fn find_key(&self, scoped: &str) -> Result<Option<JobId>> {
        let db = self.db()?;
        let r = db.begin_read().map_err(store_err)?;
        let t = r.open_table(IDEMPOTENCY).map_err(store_err)?;
        let v = t.get(scoped).map_err(store_err)?;
        Ok(v.map(|v| JobId(v.value().to_owned())))
    }

    pub(super) fn list(&self, q: &ListQuery) -> Result<Page> {
        let db = self.db()?;
        let r = db.begin_read().map_err(store_err)?;
        let index = r.open_table(BY_CREATED).map_err(store_err)?;
        let jobs = r.open_table(JOBS).map_err(store_err)?;
        let max_scanned = if q.max_scanned == 0 {
            10_000
        } else {
            q.max_scanned
        };
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut last: Option<Cursor> = None;
        let start = q
            .after
            .as_ref()
            .map(|c| (c.created_ms, c.id.0.clone()))
            .unwrap_or((0, String::new()));
        let iter = index
            .range::<(u64, &str)>((start.0, start.1.as_str())..)
            .map_err(store_err)?;
        for item in iter {
            let (k, _) = item.map_err(store_err)?;
            let (created_ms, id) = k.value();
            let pos = Cursor {
                created_ms,
                id: JobId(id.to_owned()),
            };
            if q.after.as_ref() == Some(&pos) {
                continue; // the range is inclusive; the cursor is not
            }
            if out.len() == q.limit || scanned == max_scanned {
                // There is more: continue after the last position examined.
                return Ok((out, last));
            }
            scanned += 1;
            last = Some(pos);
            let Some(v) = jobs.get(id).map_err(store_err)? else {
                continue;
            };
            let job = decode_job(id, v.value())?;
            let keep = q.state.is_none_or(|s| job.state == s)
                && q.model.as_ref().is_none_or(|m| &job.spec.model_id == m)
                && q.client.as_ref().is_none_or(|c| &job.client == c);
            if keep {
                out.push(job);
            }
        }
        Ok((out, None))
    }

    pub(super) fn finished_before(
        &self,
        cutoff_ms: Millis,
        limit: usize,
    ) -> Result<Vec<StoredJob>> {
        let db = self.db()?;
        let r = db.begin_read().map_err(store_err)?;
        let index = r.open_table(FINISHED).map_err(store_err)?;
        let jobs = r.open_table(JOBS).map_err(store_err)?;
        let mut out = Vec::new();
        for item in index
            .range::<(u64, &str)>(..=(cutoff_ms, "\u{10FFFF}"))
            .map_err(store_err)?
        {
            if out.len() == limit {
                break;
            }
            let (k, _) = item.map_err(store_err)?;
            let (_, id) = k.value();
            if let Some(v) = jobs.get(id).map_err(store_err)? {
                out.push(decode_job(id, v.value())?);
            }
        }
        Ok(out)
    }
}

fn decode_job(id: &str, bytes: &[u8]) -> Result<StoredJob> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Internal(format!("stored job {id} does not decode: {e}")))
}

pub(super) fn read_loaded(db: &Database) -> Result<Loaded> {
    let r = db.begin_read().map_err(store_err)?;
    let mut out = Loaded::default();
    let jobs = r.open_table(JOBS).map_err(store_err)?;
    for item in r
        .open_table(UNFINISHED)
        .map_err(store_err)?
        .iter()
        .map_err(store_err)?
    {
        let (k, _) = item.map_err(store_err)?;
        let id = k.value();
        match jobs.get(id).map_err(store_err)? {
            Some(v) => out.unfinished.push(decode_job(id, v.value())?),
            None => error!(job_id = id, "unfinished job has no record"),
        }
    }
    for item in r
        .open_table(MODELS)
        .map_err(store_err)?
        .iter()
        .map_err(store_err)?
    {
        let (k, v) = item.map_err(store_err)?;
        let m: ModelManifest = serde_json::from_slice(v.value()).map_err(|e| {
            Error::Internal(format!("stored model {} does not decode: {e}", k.value()))
        })?;
        out.models.push(m);
    }
    out.unfinished
        .sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(out)
}

/// Writes a job's record and keeps its index entries in step.
pub(super) fn put_job(w: &redb::WriteTransaction, job: &StoredJob) -> Result<(), redb::Error> {
    let bytes = serde_json::to_vec(job).expect("a stored job always encodes");
    let id = job.id.0.as_str();
    w.open_table(JOBS)?.insert(id, bytes.as_slice())?;
    w.open_table(BY_CREATED)?.insert((job.created_ms, id), ())?;
    if job.state.is_terminal() {
        w.open_table(UNFINISHED)?.remove(id)?;
        w.open_table(FINISHED)?.insert((job.updated_ms, id), ())?;
    } else {
        w.open_table(UNFINISHED)?.insert(id, ())?;
    }
    if let Some(k) = job.scoped_key() {
        w.open_table(IDEMPOTENCY)?.insert(k.as_str(), id)?;
    }
    Ok(())
}

fn delete_job(w: &redb::WriteTransaction, id: &str, key: Option<&str>) -> Result<(), redb::Error> {
    let old = {
        let mut jobs = w.open_table(JOBS)?;
        let v = jobs.remove(id)?;
        v.and_then(|v| serde_json::from_slice::<StoredJob>(v.value()).ok())
    };
    if let Some(old) = old {
        w.open_table(BY_CREATED)?.remove((old.created_ms, id))?;
        w.open_table(FINISHED)?.remove((old.updated_ms, id))?;
        let mut images = w.open_table(IMAGES)?;
        for i in 0..old.result.map_or(0, |r| r.images) {
            images.remove((id, i as u32))?;
        }
    }
    w.open_table(UNFINISHED)?.remove(id)?;
    if let Some(k) = key {
        let mut t = w.open_table(IDEMPOTENCY)?;
        let ours = t.get(k)?.is_some_and(|v| v.value() == id);
        if ours {
            t.remove(k)?;
        }
    }
    Ok(())
}

fn apply_op(w: &redb::WriteTransaction, op: &Op) -> Result<(), redb::Error> {
    match op {
        Op::PutJob(job) => put_job(w, job)?,
        Op::PutImages { job, images } => {
            let mut t = w.open_table(IMAGES)?;
            for (i, png) in images.iter().enumerate() {
                t.insert((job.0.as_str(), i as u32), png.as_ref())?;
            }
        }
        Op::DeleteJob { job, key } => delete_job(w, &job.0, key.as_deref())?,
        Op::PutModel(m) => {
            let bytes = serde_json::to_vec(m).expect("a manifest always encodes");
            w.open_table(MODELS)?
                .insert(m.id.0.as_str(), bytes.as_slice())?;
        }
        Op::DeleteModel(id) => {
            w.open_table(MODELS)?.remove(id.0.as_str())?;
        }
    }
    Ok(())
}

fn commit_batch(db: &Database, ops: &[Op]) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let w = db.begin_write().map_err(store_err)?;
    for op in ops {
        apply_op(&w, op).map_err(store_err)?;
    }
    w.commit().map_err(store_err)
}

/// The writer thread: group commit until the channel closes or `Close`.
fn writer(shared: Arc<Shared>, path: Option<PathBuf>, rx: mpsc::Receiver<Msg>) {
    let _span = tracing::info_span!("store").entered();
    let mut pending: Option<Msg> = None;
    loop {
        let first = match pending.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        match first {
            Msg::Write(ops, done) => {
                let mut ops = ops;
                let mut dones: Vec<Done> = done.into_iter().collect();
                while ops.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Write(more, done)) => {
                            ops.extend(more);
                            dones.extend(done);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let res = commit_write(&shared, &ops);
                drop(ops);
                for d in dones {
                    d(res.as_ref().map(|_| ()).map_err(Error::duplicate));
                }
            }
            Msg::Reopen(tx) => {
                let _ = tx.send(reopen(&shared, path.as_deref()));
            }
            Msg::Close(tx) => {
                // Release the file before answering, so that a new
                // coordinator in this process can open it at once.
                let db = shared.db.write().unwrap_or_else(|e| e.into_inner()).take();
                drop(db);
                info!("store closed");
                let _ = tx.send(Ok(()));
                // Anything written after Close fails.
                while let Ok(m) = rx.recv() {
                    fail_msg(m, "closed");
                }
                return;
            }
        }
    }
    info!("store closed");
}

fn fail_msg(m: Msg, why: &str) {
    let err = || Error::Unavailable(format!("store: {why}"));
    match m {
        Msg::Write(_, Some(d)) => d(Err(err())),
        Msg::Write(_, None) => {}
        Msg::Reopen(tx) => {
            let _ = tx.send(Err(err()));
        }
        Msg::Close(tx) => {
            let _ = tx.send(Ok(()));
        }
    }
}

fn commit_write(shared: &Shared, ops: &[Op]) -> Result<()> {
    let db = shared.db.read().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(db) = db else {
        let why = shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "closed".into());
        return Err(Error::Unavailable(format!(
            "store: not written, an earlier commit failed ({why})"
        )));
    };
    let started = Instant::now();
    let res = if shared
        .fail_next
        .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        Err(Error::ResourceExhausted(
            "store: the disk is full (injected fault)".into(),
        ))
    } else {
        commit_batch(&db, ops)
    };
    debug!(
        ops = ops.len(),
        ms = started.elapsed().as_millis() as u64,
        "committed"
    );
    if let Err(e) = &res {
        error!(error = %e, ops = ops.len(), "store commit failed; the store must be reopened");
        *shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        // redb refuses every later transaction after an I/O error: drop it.
        drop(db);
        shared.db.write().unwrap_or_else(|e| e.into_inner()).take();
    }
    res
}

fn reopen(shared: &Shared, path: Option<&Path>) -> Result<Loaded> {
    let Some(path) = path else {
        return Err(Error::Unavailable(
            "store: an in-memory store cannot be reopened".into(),
        ));
    };
    // Readers may still hold the old handle for a moment.
    let old = shared.db.write().unwrap_or_else(|e| e.into_inner()).take();
    drop(old);
    let mut tries = 0;
    let db = loop {
        match open_db(Some(path)) {
            Ok(db) => break db,
            Err(e) if tries < 50 && e.to_string().contains("already open") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    // A commit that must reach the disk: proves it takes writes again.
    let w = db.begin_write().map_err(store_err)?;
    w.open_table(META)
        .map_err(store_err)?
        .insert("reopened_ms", now_ms().to_string().as_str())
        .map_err(store_err)?;
    w.commit().map_err(store_err)?;
    let loaded = read_loaded(&db)?;
    *shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
    *shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    info!(unfinished = loaded.unfinished.len(), "store reopened");
    Ok(loaded)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
