//! The coordinator's hard state on disk: accepted jobs, idempotency keys
//! and the model catalogue, in an embedded redb database under `data_dir`,
//! and result images as PNG files under `data_dir/results/<job>/N.png`.
//!
//! One thread owns the database. Callers send it operations over a channel
//! (never blocking, never on the async runtime's threads); it writes every
//! operation waiting in the channel in one transaction and commits with an
//! fsync (group commit). A [`Journal::barrier`] resolves once everything sent
//! before it is committed: `SubmitJob` answers only after its barrier.
//!
//! Soft state (what workers hold, which worker runs what) is never stored;
//! it is rebuilt from worker reports after a restart.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{debug, error, info};

use crate::error::{Error, Result};
use crate::types::*;

/// Job id -> JSON `StoredJob`.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Scoped idempotency key (see `scoped_key`) -> job id.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// Model id -> JSON `ModelManifest`.
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");

/// Most operations written in one transaction.
const MAX_BATCH: usize = 4096;

/// A job as stored: everything needed to restore it after a crash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredJob {
    pub id: JobId,
    /// The client that submitted it ("" with authentication disabled).
    pub client: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub attempt: u32,
    /// Attempts that failed or were lost (the scheduler's count).
    pub failures: u32,
    pub worker: Option<WorkerId>,
    pub tier: Option<CacheTier>,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    pub error: String,
    /// Set once completed: the images are `results/<id>/0.png ...`.
    pub result: Option<StoredResult>,
    /// The worker the current attempt was last assigned to, kept while the
    /// job is queued again, so that only that worker may reclaim it.
    #[serde(default)]
    pub last_worker: Option<WorkerId>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredResult {
    pub images: usize,
    pub timings: Timings,
    pub worker_id: WorkerId,
}

impl StoredJob {
    /// The idempotency-table key of this job, if it has one.
    pub fn scoped_key(&self) -> Option<String> {
        scoped_key(&self.client, &self.spec.idempotency_key)
    }
}

/// Idempotency keys are per client: two clients may use the same key.
/// The anonymous client ("") keeps the bare key.
pub fn scoped_key(client: &str, key: &str) -> Option<String> {
    match (client, key) {
        (_, "") => None,
        ("", k) => Some(k.to_owned()),
        (c, k) => Some(format!("{c}\0{k}")),
    }
}

enum Op {
    PutJob(Box<StoredJob>),
    DeleteJob(JobId, Option<String>),
    PutModel(Box<ModelManifest>),
    DeleteModel(ModelId),
    /// Answered once everything sent before it is committed.
    Barrier(oneshot::Sender<Result<()>>),
    /// Commit, close the database and stop the thread.
    Close(oneshot::Sender<Result<()>>),
}

/// What the store held when it was opened.
#[derive(Debug, Default)]
pub struct Loaded {
    pub jobs: Vec<StoredJob>,
    pub idempotency: Vec<(String, JobId)>,
    pub models: Vec<ModelManifest>,
}

/// The sending side of the store; cheap to use from any thread.
pub struct Journal {
    tx: mpsc::Sender<Op>,
    results_dir: PathBuf,
}

fn store_err(e: impl Into<redb::Error>) -> Error {
    Error::Unavailable(format!("store: {}", e.into()))
}

impl Journal {
    /// Opens (or creates) the store under `data_dir`, reads it whole and
    /// starts the writer thread.
    pub fn open(data_dir: &Path) -> Result<(Self, Loaded)> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let results_dir = data_dir.join("results");
        std::fs::create_dir_all(&results_dir).map_err(|e| Error::io(&results_dir, e))?;
        let path = data_dir.join("corral.redb");
        let db = Database::create(&path).map_err(store_err)?;
        // Tables must exist before a read transaction can open them.
        let w = db.begin_write().map_err(store_err)?;
        {
            w.open_table(JOBS).map_err(store_err)?;
            w.open_table(IDEMPOTENCY).map_err(store_err)?;
            w.open_table(MODELS).map_err(store_err)?;
        }
        w.commit().map_err(store_err)?;
        let loaded = read_all(&db)?;
        info!(
            path = %path.display(),
            jobs = loaded.jobs.len(),
            models = loaded.models.len(),
            "store opened"
        );
        sweep_orphan_results(&results_dir, &loaded);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("corral-journal".into())
            .spawn(move || writer(db, rx))
            .map_err(|e| Error::Internal(format!("journal thread: {e}")))?;
        Ok((Self { tx, results_dir }, loaded))
    }

    fn send(&self, op: Op) {
        if self.tx.send(op).is_err() {
            error!("journal is closed; a change was not recorded");
        }
    }

    pub fn put_job(&self, job: StoredJob) {
        self.send(Op::PutJob(Box::new(job)));
    }

    pub fn delete_job(&self, id: JobId, scoped_key: Option<String>) {
        self.send(Op::DeleteJob(id, scoped_key));
    }

    pub fn put_model(&self, m: ModelManifest) {
        self.send(Op::PutModel(Box::new(m)));
    }

    pub fn delete_model(&self, id: ModelId) {
        self.send(Op::DeleteModel(id));
    }

    /// Resolves once everything sent before it is on disk.
    pub async fn barrier(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Barrier(tx));
        rx.await
            .map_err(|_| Error::Unavailable("journal is closed".into()))?
    }

    /// Commits what is pending and closes the database.
    pub async fn close(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Close(tx));
        rx.await.unwrap_or(Ok(()))
    }

    pub fn results_dir(&self) -> &Path {
        &self.results_dir
    }

    pub fn result_dir(&self, job: &JobId) -> PathBuf {
        self.results_dir.join(&job.0)
    }

    /// Writes a result's images as `.tmp-<attempt>-N.png` files (synced);
    /// `publish_images` renames them into place once the attempt won.
    pub fn write_images_tmp(&self, job: &JobId, attempt: u32, images: &[Vec<u8>]) -> Result<()> {
        use std::io::Write;
        let dir = self.result_dir(job);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for (i, png) in images.iter().enumerate() {
            let p = dir.join(format!(".tmp-{attempt}-{i}.png"));
            let mut f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
            f.write_all(png).map_err(|e| Error::io(&p, e))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }

    pub fn publish_images(&self, job: &JobId, attempt: u32, n: usize) -> Result<()> {
        let dir = self.result_dir(job);
        for i in 0..n {
            let from = dir.join(format!(".tmp-{attempt}-{i}.png"));
            let to = dir.join(format!("{i}.png"));
            std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
        }
        // The renames must survive a crash before the record says completed.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn discard_tmp_images(&self, job: &JobId, attempt: u32, n: usize) {
        let dir = self.result_dir(job);
        for i in 0..n {
            let _ = std::fs::remove_file(dir.join(format!(".tmp-{attempt}-{i}.png")));
        }
    }

    pub fn read_images(&self, job: &JobId, n: usize) -> Result<Vec<Vec<u8>>> {
        let dir = self.result_dir(job);
        (0..n)
            .map(|i| {
                let p = dir.join(format!("{i}.png"));
                std::fs::read(&p).map_err(|e| Error::io(&p, e))
            })
            .collect()
    }
}

fn read_all(db: &Database) -> Result<Loaded> {
    let r = db.begin_read().map_err(store_err)?;
    let mut out = Loaded::default();
    for item in r
        .open_table(JOBS)
        .map_err(store_err)?
        .iter()
        .map_err(store_err)?
    {
        let (k, v) = item.map_err(store_err)?;
        let job: StoredJob = serde_json::from_slice(v.value()).map_err(|e| {
            Error::Internal(format!("stored job {} does not decode: {e}", k.value()))
        })?;
        out.jobs.push(job);
    }
    for item in r
        .open_table(IDEMPOTENCY)
        .map_err(store_err)?
        .iter()
        .map_err(store_err)?
    {
        let (k, v) = item.map_err(store_err)?;
        out.idempotency
            .push((k.value().to_owned(), JobId(v.value().to_owned())));
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
    out.jobs
        .sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(out)
}

/// Result directories of jobs the store does not know (a crash between
/// writing images and committing, or between deleting a record and its
/// files) are removed; so are temporary files of unfinished writes.
fn sweep_orphan_results(results_dir: &Path, loaded: &Loaded) {
    let known: std::collections::HashSet<&str> =
        loaded.jobs.iter().map(|j| j.id.0.as_str()).collect();
    let Ok(entries) = std::fs::read_dir(results_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if !known.contains(name.as_str()) {
            let _ = std::fs::remove_dir_all(&path);
            continue;
        }
        if let Ok(files) = std::fs::read_dir(&path) {
            for f in files.flatten() {
                if f.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

/// redb's error, boxed (it is large) so that `?` still converts.
struct DbErr(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for DbErr {
    fn from(e: E) -> Self {
        Self(Box::new(e.into()))
    }
}

fn apply_op(w: &redb::WriteTransaction, op: &Op) -> std::result::Result<(), DbErr> {
    match op {
        Op::PutJob(job) => {
            let bytes = serde_json::to_vec(job).expect("a stored job always encodes");
            w.open_table(JOBS)?
                .insert(job.id.0.as_str(), bytes.as_slice())?;
            if let Some(k) = job.scoped_key() {
                w.open_table(IDEMPOTENCY)?
                    .insert(k.as_str(), job.id.0.as_str())?;
            }
        }
        Op::DeleteJob(id, key) => {
            w.open_table(JOBS)?.remove(id.0.as_str())?;
            if let Some(k) = key {
                w.open_table(IDEMPOTENCY)?.remove(k.as_str())?;
            }
        }
        Op::PutModel(m) => {
            let bytes = serde_json::to_vec(m).expect("a manifest always encodes");
            w.open_table(MODELS)?
                .insert(m.id.0.as_str(), bytes.as_slice())?;
        }
        Op::DeleteModel(id) => {
            w.open_table(MODELS)?.remove(id.0.as_str())?;
        }
        Op::Barrier(_) | Op::Close(_) => {}
    }
    Ok(())
}

fn commit_batch(db: &Database, batch: &[Op]) -> std::result::Result<(), DbErr> {
    if batch
        .iter()
        .all(|op| matches!(op, Op::Barrier(_) | Op::Close(_)))
    {
        return Ok(());
    }
    let w = db.begin_write()?;
    for op in batch {
        apply_op(&w, op)?;
    }
    w.commit()?;
    Ok(())
}

/// The writer thread: group commit until the channel closes or `Close`.
fn writer(db: Database, rx: mpsc::Receiver<Op>) {
    let _span = tracing::info_span!("journal").entered();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let res = commit_batch(&db, &batch).map_err(|e| e.0.to_string());
        debug!(
            ops = batch.len(),
            ms = started.elapsed().as_millis() as u64,
            "committed"
        );
        if let Err(e) = &res {
            error!(error = %e, ops = batch.len(), "store commit failed");
        }
        let answer = || {
            res.clone()
                .map_err(|e| Error::Unavailable(format!("store: {e}")))
        };
        let mut closing = Vec::new();
        for op in batch {
            match op {
                Op::Barrier(tx) => {
                    let _ = tx.send(answer());
                }
                Op::Close(tx) => closing.push(tx),
                _ => {}
            }
        }
        if !closing.is_empty() {
            // Release the file before answering, so that a new coordinator
            // in this process can open it at once.
            drop(db);
            info!("store closed");
            for tx in closing {
                let _ = tx.send(answer());
            }
            return;
        }
    }
    info!("store closed");
}
