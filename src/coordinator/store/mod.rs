//! The coordinator's hard state: accepted jobs and their transitions,
//! idempotency keys, the model catalogue, and result images.
//!
//! One writer commits everything in batches (group commit): callers queue
//! operations with [`Store::write`] and learn the outcome through a callback
//! that runs after the commit, in commit order, so that the coordinator can
//! make a transition visible only once it is durable. A job's completed
//! record and its images are written in the same transaction. Reads (`get`,
//! `images`, `list`) go to the store directly and never wait for the writer.
//!
//! A failed commit fails every operation of its batch and puts the store in
//! a failed state: later writes fail at once until [`Store::reopen`]
//! succeeds (the coordinator then reloads its state from the store, as
//! after a restart).
//!
//! Soft state (what workers hold, which worker runs what) is never stored;
//! it is rebuilt from worker reports.
//!
//! Backends: `redb` (embedded, the default; `memory` for tests) and
//! `postgres` (shared by several coordinators, one of which leads; a store
//! that does not lead reports itself failed, "not the leader", and
//! [`Store::reopen`] campaigns for the lead; see `postgres/mod.rs` and
//! docs/ha.md).

mod migrate;
mod postgres;
mod redb;

pub use postgres::PgOptions;

use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::types::*;

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
    /// Set once completed; the images are in the store under the job's id.
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

    /// The record clients see.
    pub fn record(&self) -> JobRecord {
        JobRecord {
            id: self.id.clone(),
            spec: std::sync::Arc::new(self.spec.clone()),
            state: self.state,
            attempt: self.attempt,
            worker: self.worker.clone(),
            tier: self.tier,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            error: self.error.clone(),
            output: self.result.as_ref().map(|r| {
                std::sync::Arc::new(JobOutput {
                    image_count: r.images as u32,
                    timings: r.timings,
                    worker_id: r.worker_id.clone(),
                })
            }),
        }
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

/// One change to the store.
#[derive(Debug)]
pub enum Op {
    /// Insert or replace a job's record (and its idempotency key).
    PutJob(Box<StoredJob>),
    /// A completed job's images; written with its completed record.
    PutImages {
        job: JobId,
        images: Vec<Bytes>,
    },
    /// Remove a finished job, its key and its images (retention).
    DeleteJob {
        job: JobId,
        key: Option<String>,
    },
    PutModel(Box<ModelManifest>),
    DeleteModel(ModelId),
}

/// Runs once the operations it came with are committed (or not).
pub type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// What the store held when it was opened: the catalogue and the jobs not
/// yet finished. Finished jobs stay in the store and are read on demand.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Ordered by creation.
    pub unfinished: Vec<StoredJob>,
    pub models: Vec<ModelManifest>,
}

/// A position in the list of jobs ordered by creation; `ListJobs` page
/// tokens encode it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub created_ms: Millis,
    pub id: JobId,
}

impl Cursor {
    pub fn token(&self) -> String {
        format!("{}.{}", self.created_ms, self.id)
    }

    pub fn parse(token: &str) -> Result<Self> {
        let bad = || Error::invalid("page_token", format!("{token:?} is not a page token"));
        let (ms, id) = token.split_once('.').ok_or_else(bad)?;
        let created_ms = ms.parse().map_err(|_| bad())?;
        if id.is_empty() || id.len() > 128 {
            return Err(bad());
        }
        Ok(Self {
            created_ms,
            id: JobId(id.to_owned()),
        })
    }
}

/// Which jobs `list` returns.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub state: Option<JobState>,
    pub model: Option<ModelId>,
    /// Only jobs of this client.
    pub client: Option<String>,
    /// Start after this position.
    pub after: Option<Cursor>,
    pub limit: usize,
    /// Most records examined per call; a page may be short (or empty) with
    /// a cursor when filters skip many. Default when 0: 10,000.
    pub max_scanned: usize,
}

/// A page of jobs and where the next one starts (none: the end).
pub type Page = (Vec<StoredJob>, Option<Cursor>);

/// The store; see the module docs.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Redb(std::sync::Arc<redb::RedbStore>),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (or creates) the embedded store under `data_dir`, migrating a
    /// store written by an earlier version.
    pub fn open(data_dir: &Path) -> Result<(Self, Loaded)> {
        let (backend, loaded) = redb::RedbStore::open(data_dir)?;
        Ok((Self::redb(backend), loaded))
    }

    /// A store in memory, for tests.
    pub fn memory() -> Result<(Self, Loaded)> {
        let (backend, loaded) = redb::RedbStore::memory()?;
        Ok((Self::redb(backend), loaded))
    }

    /// Connects to PostgreSQL, migrates its schema, and campaigns once for
    /// the lead. A store that does not lead returns nothing loaded and
    /// reports itself failed ("not the leader") until [`Store::reopen`]
    /// wins the lead.
    pub async fn open_postgres(o: &PgOptions) -> Result<(Self, Loaded)> {
        let (backend, loaded) = postgres::PgStore::open(o).await?;
        Ok((
            Self {
                backend: Backend::Postgres(backend),
            },
            loaded,
        ))
    }

    fn redb(backend: redb::RedbStore) -> Self {
        Self {
            backend: Backend::Redb(std::sync::Arc::new(backend)),
        }
    }

    /// Queues `ops` for the next commit; `done` runs after it, in commit
    /// order, on the writer's thread (keep it short).
    pub fn write(&self, ops: Vec<Op>, done: Option<Done>) {
        match &self.backend {
            Backend::Redb(b) => b.write(ops, done),
            Backend::Postgres(b) => b.write(ops, done),
        }
    }

    /// Writes `ops` and waits until they are committed.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(
            ops,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        rx.await
            .map_err(|_| Error::Unavailable("store: the writer stopped".into()))?
    }

    /// Resolves once everything written before it is committed.
    pub async fn barrier(&self) -> Result<()> {
        self.commit(Vec::new()).await
    }

    /// Fault injection (tests, chaos runs): the next commit fails as on a
    /// full disk, and the store then needs [`Store::reopen`].
    pub fn fail_next_commit(&self) {
        match &self.backend {
            Backend::Redb(b) => b.fail_next_commit(),
            Backend::Postgres(b) => b.fail_next_commit(),
        }
    }

    /// Whether the last commit failed (and the store awaits `reopen`), or
    /// this coordinator does not lead.
    pub fn failed(&self) -> Option<String> {
        match &self.backend {
            Backend::Redb(b) => b.failed(),
            Backend::Postgres(b) => b.failed(),
        }
    }

    /// The advertised URL of the coordinator that leads, when that is
    /// another one (a shared store only): callers are sent there.
    pub fn other_leader(&self) -> Option<String> {
        match &self.backend {
            Backend::Redb(_) => None,
            Backend::Postgres(b) => b.other_leader(),
        }
    }

    /// A shared store whose coordinator does not lead (and has no other
    /// fault): it follows, or campaigns.
    pub fn following(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => false,
            Backend::Postgres(b) => b.following(),
        }
    }

    /// A shared store after `close` (the embedded store says so through
    /// its errors instead).
    pub fn closed(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => false,
            Backend::Postgres(b) => b.closed(),
        }
    }

    /// Whether this store is shared by several coordinators (one leads).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Writes refused because this coordinator had lost the lead (a shared
    /// store only; the embedded store never refuses for that).
    pub fn fenced_writes(&self) -> u64 {
        match &self.backend {
            Backend::Redb(_) => 0,
            Backend::Postgres(b) => b.fenced_writes(),
        }
    }

    /// After a failure: closes and opens the store again, checks that it
    /// can commit, and returns what it holds. On a shared store: waits
    /// until this coordinator leads (campaigning), then returns what the
    /// store holds.
    pub async fn reopen(&self) -> Result<Loaded> {
        match &self.backend {
            Backend::Redb(b) => b.reopen().await,
            Backend::Postgres(b) => b.reopen().await,
        }
    }

    pub async fn get(&self, id: &JobId) -> Result<Option<StoredJob>> {
        match &self.backend {
            Backend::Redb(b) => b.get(id),
            Backend::Postgres(b) => b.get(id).await,
        }
    }

    /// A completed job's images (read off the async runtime's threads).
    pub async fn images(&self, id: &JobId, n: usize) -> Result<Vec<Bytes>> {
        match &self.backend {
            Backend::Redb(b) => {
                let (b, id) = (b.clone(), id.clone());
                tokio::task::spawn_blocking(move || b.images(&id, n))
                    .await
                    .map_err(|e| Error::Internal(format!("image reader: {e}")))?
            }
            Backend::Postgres(b) => b.images(id, n).await,
        }
    }

    /// The job an idempotency key (scoped, see [`scoped_key`]) names.
    pub async fn find_key(&self, scoped: &str) -> Result<Option<JobId>> {
        match &self.backend {
            Backend::Redb(b) => b.find_key(scoped),
            Backend::Postgres(b) => b.find_key(scoped).await,
        }
    }

    pub async fn list(&self, q: &ListQuery) -> Result<Page> {
        match &self.backend {
            Backend::Redb(b) => b.list(q),
            Backend::Postgres(b) => b.list(q).await,
        }
    }

    /// Finished jobs last changed at or before `cutoff_ms`, oldest first.
    pub async fn finished_before(&self, cutoff_ms: Millis, limit: usize) -> Result<Vec<StoredJob>> {
        match &self.backend {
            Backend::Redb(b) => b.finished_before(cutoff_ms, limit),
            Backend::Postgres(b) => b.finished_before(cutoff_ms, limit).await,
        }
    }

    /// Commits what is queued and closes the store (at shutdown); a shared
    /// store also gives up the lead, so that a follower takes over at once.
    pub async fn close(&self) -> Result<()> {
        match &self.backend {
            Backend::Redb(b) => b.close().await,
            Backend::Postgres(b) => b.close().await,
        }
    }
}

#[cfg(test)]
mod tests;
