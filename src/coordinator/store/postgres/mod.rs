//! The PostgreSQL backend (`--store postgres://...`): the store every
//! coordinator of a group shares, and the lease that says which one leads.
//!
//! - Writes: one writer task and connection (`writer.rs`) takes every
//!   operation queued, applies them in one transaction (group commit, the
//!   statements pipelined), checks the leadership epoch in the same
//!   transaction, commits, then runs the callbacks in order.
//! - Reads: a small pool of connections (deadpool-postgres); reads never
//!   wait for the writer.
//! - Images live in the database (`bytea`), written in the transaction
//!   that writes the completed record: the database is the only storage
//!   every coordinator shares, and one commit makes the record and its
//!   images durable together, so no reader ever sees one without the other.
//! - Leadership (`lease.rs`): a coordinator that does not lead reports the
//!   store as failed ("not the leader; the leader is X"); the coordinator's
//!   watchdog then calls [`PgStore::reopen`], which campaigns until this
//!   coordinator leads and returns what the store holds.
//!
//! Schema and migrations: `schema.rs`.

mod lease;
mod schema;
mod writer;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls};
use tracing::{info, info_span, warn, Instrument};

use super::{Cursor, Done, ListQuery, Loaded, Op, Page, StoredJob};
use crate::error::{Error, Result};
use crate::types::*;
use lease::Leadership;

/// Connections kept for reads.
const READ_POOL: usize = 8;

/// How to reach the database and how this coordinator takes part.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://` URL or `key=value` string.
    pub url: String,
    /// This coordinator's advertised URL (written in the lease row).
    pub advertise_url: String,
    pub lease: Duration,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &"<redacted>")
            .field("advertise_url", &self.advertise_url)
            .field("lease", &self.lease)
            .finish()
    }
}

pub(super) fn pg_err(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Unavailable(format!(
            "store: postgres: {} ({})",
            db.message(),
            db.code().code()
        )),
        None => Error::Unavailable(format!("store: postgres: {e}")),
    }
}

/// Parses the URL; a password may come from `PGPASSWORD` instead (keep it
/// out of flags and config files).
fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut c = tokio_postgres::Config::from_str(url).map_err(|e| {
        // The URL may hold a password: never echo it.
        Error::Config(format!("store: the PostgreSQL URL does not parse: {e}"))
    })?;
    if c.get_password().is_none() {
        if let Ok(p) = std::env::var("PGPASSWORD") {
            c.password(p);
        }
    }
    if c.get_application_name().is_none() {
        c.application_name("corral-coordinator");
    }
    c.connect_timeout(Duration::from_secs(5));
    // A dead database host is noticed in tens of seconds, not hours.
    c.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
    Ok(c)
}

/// One connection, its driver task spawned (named by `role`); `ended` is
/// told when the connection ends.
pub(super) async fn connect(
    c: &tokio_postgres::Config,
    role: &'static str,
    ended: Option<Arc<tokio::sync::Notify>>,
) -> Result<Client> {
    let (client, conn) = c.connect(NoTls).await.map_err(pg_err)?;
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                warn!(error = %e, "postgres connection ended");
            }
            if let Some(n) = ended {
                n.notify_one();
            }
        }
        .instrument(info_span!("postgres", role)),
    );
    Ok(client)
}

enum Msg {
    Write(Vec<Op>, Option<Done>),
    Close(oneshot::Sender<Result<()>>),
}

/// Shared by the writer, the readers and the lease task.
struct Shared {
    leadership: Leadership,
    /// A failed commit; cleared by `reopen`.
    failed: Mutex<Option<String>>,
    fail_next: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn set_failed(&self, why: String) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    fn failed(&self) -> Option<String> {
        let f = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        f.or_else(|| self.leadership.not_leading())
    }
}

pub(super) struct PgStore {
    tx: mpsc::UnboundedSender<Msg>,
    shared: Arc<Shared>,
    pool: Pool,
}

impl PgStore {
    /// Connects, migrates, and campaigns once: the store leads (and
    /// returns what it holds) or follows (and returns nothing, failed with
    /// "not the leader" until `reopen` wins the lead).
    pub(super) async fn open(o: &PgOptions) -> Result<(Self, Loaded)> {
        let pg = pg_config(&o.url)?;
        let mut c = connect(&pg, "migrate", None).await?;
        let version = schema::migrate(&mut c).await?;
        drop(c);
        let pool = Pool::builder(Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        ))
        .max_size(READ_POOL)
        .build()
        .map_err(|e| Error::Internal(format!("store: read pool: {e}")))?;
        let shared = Arc::new(Shared {
            leadership: Leadership::new(pg.clone(), o.advertise_url.clone(), o.lease),
            failed: Mutex::new(None),
            fail_next: Default::default(),
            closed: Default::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer::run(shared.clone(), pg, rx).instrument(info_span!("store_writer")));
        spawn_renewals(Arc::downgrade(&shared));
        let store = Self { tx, shared, pool };
        let loaded = if store.shared.leadership.campaign().await? {
            store.load().await?
        } else {
            Loaded::default()
        };
        info!(
            schema = version,
            leading = store.shared.leadership.epoch().is_some(),
            url = %o.advertise_url,
            unfinished = loaded.unfinished.len(),
            models = loaded.models.len(),
            "postgres store opened"
        );
        Ok((store, loaded))
    }

    pub(super) fn write(&self, ops: Vec<Op>, done: Option<Done>) {
        if let Err(mpsc::error::SendError(Msg::Write(_, Some(done)))) =
            self.tx.send(Msg::Write(ops, done))
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
        self.shared.failed()
    }

    /// The leader's URL when another coordinator leads.
    pub(super) fn other_leader(&self) -> Option<String> {
        self.shared.leadership.other_leader()
    }

    /// Not leading, for no other fault: following another coordinator or
    /// campaigning.
    pub(super) fn following(&self) -> bool {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
            && self.shared.leadership.epoch().is_none()
    }

    pub(super) fn closed(&self) -> bool {
        self.shared
            .closed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Writes refused because this coordinator no longer held the epoch.
    pub(super) fn fenced_writes(&self) -> u64 {
        self.shared
            .leadership
            .fenced
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Campaigns until this coordinator leads, then returns what the store
    /// holds. Errors only when the database cannot be reached (or the
    /// store is closed); while another coordinator leads it keeps trying.
    pub(super) async fn reopen(&self) -> Result<Loaded> {
        let l = &self.shared.leadership;
        l.demote();
        let mut said = None;
        loop {
            if self
                .shared
                .closed
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return Err(Error::Unavailable("store: closed".into()));
            }
            if l.campaign().await? {
                break;
            }
            let leader = l.other_leader();
            if said != Some(leader.clone()) {
                info!(leader = leader.as_deref().unwrap_or("none"), "following");
                said = Some(leader);
            }
            tokio::time::sleep(l.poll()).await;
        }
        let loaded = match self.load().await {
            Ok(l) => l,
            Err(e) => {
                self.shared.leadership.demote();
                return Err(e);
            }
        };
        *self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        info!(
            unfinished = loaded.unfinished.len(),
            "leading: state loaded"
        );
        Ok(loaded)
    }

    pub(super) async fn close(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_err() {
            return Ok(());
        }
        let r = rx.await.unwrap_or(Ok(()));
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.leadership.release().await;
        r
    }

    async fn reader(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Unavailable(format!("store: postgres: {e}")))
    }

    /// The unfinished jobs (by creation) and the catalogue.
    async fn load(&self) -> Result<Loaded> {
        let c = self.reader().await?;
        let mut out = Loaded::default();
        for r in c
            .query(
                "SELECT id, record FROM corral_jobs WHERE finished_ms IS NULL \
                 ORDER BY created_ms, id",
                &[],
            )
            .await
            .map_err(pg_err)?
        {
            out.unfinished.push(decode_job(&r, 0, 1)?);
        }
        for r in c
            .query("SELECT id, manifest FROM corral_models ORDER BY id", &[])
            .await
            .map_err(pg_err)?
        {
            let id: String = r.get(0);
            let m: ModelManifest = serde_json::from_slice(r.get::<_, &[u8]>(1))
                .map_err(|e| Error::Internal(format!("stored model {id} does not decode: {e}")))?;
            out.models.push(m);
        }
        Ok(out)
    }

    pub(super) async fn get(&self, id: &JobId) -> Result<Option<StoredJob>> {
        let c = self.reader().await?;
        let st = c
            .prepare_cached("SELECT id, record FROM corral_jobs WHERE id = $1")
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&id.0])
            .await
            .map_err(pg_err)?
            .map(|r| decode_job(&r, 0, 1))
            .transpose()
    }

    pub(super) async fn images(&self, id: &JobId, n: usize) -> Result<Vec<Bytes>> {
        let c = self.reader().await?;
        let st = c
            .prepare_cached(
                "SELECT idx, png FROM corral_images WHERE job_id = $1 AND idx < $2 ORDER BY idx",
            )
            .await
            .map_err(pg_err)?;
        let rows = c.query(&st, &[&id.0, &(n as i32)]).await.map_err(pg_err)?;
        let mut out = Vec::with_capacity(n);
        for (i, r) in rows.iter().enumerate() {
            if r.get::<_, i32>(0) as usize != i {
                break;
            }
            out.push(Bytes::from(r.get::<_, Vec<u8>>(1)));
        }
        if out.len() < n {
            return Err(Error::Internal(format!(
                "image {} of job {id} is missing from the store",
                out.len()
            )));
        }
        Ok(out)
    }

    pub(super) async fn find_key(&self, scoped: &str) -> Result<Option<JobId>> {
        let c = self.reader().await?;
        let st = c
            .prepare_cached("SELECT job_id FROM corral_idempotency WHERE key = $1")
            .await
            .map_err(pg_err)?;
        Ok(c.query_opt(&st, &[&scoped.as_bytes()])
            .await
            .map_err(pg_err)?
            .map(|r| JobId(r.get(0))))
    }

    /// As the redb store's `list`: at most `max_scanned` positions after
    /// the cursor are examined; the filters are evaluated in the database
    /// and records are sent only for the rows kept, up to one past the
    /// page (which says whether there is more).
    pub(super) async fn list(&self, q: &ListQuery) -> Result<Page> {
        let c = self.reader().await?;
        let max_scanned = if q.max_scanned == 0 {
            10_000
        } else {
            q.max_scanned
        };
        let (after_ms, after_id) = q
            .after
            .as_ref()
            .map(|c| (c.created_ms as i64, c.id.0.clone()))
            .unwrap_or((-1, String::new()));
        let st = c
            .prepare_cached(
                "WITH scan AS (
                     SELECT created_ms, id,
                            ($3::text IS NULL OR state = $3)
                            AND ($4::text IS NULL OR model_id = $4)
                            AND ($5::text IS NULL OR client = $5) AS keep
                     FROM corral_jobs
                     WHERE (created_ms, id) > ($1, $2)
                     ORDER BY created_ms, id
                     LIMIT $6
                 ), counted AS (
                     SELECT created_ms, id, keep,
                            count(*) FILTER (WHERE keep) OVER w - keep::int AS kept_before
                     FROM scan
                     WINDOW w AS (ORDER BY created_ms, id ROWS UNBOUNDED PRECEDING)
                 )
                 SELECT s.created_ms, s.id, s.keep, CASE WHEN s.keep THEN j.record END
                 FROM counted s JOIN corral_jobs j ON j.id = s.id
                 WHERE s.kept_before <= $7
                 ORDER BY s.created_ms, s.id",
            )
            .await
            .map_err(pg_err)?;
        let state = q.state.map(|s| s.as_str());
        let model = q.model.as_ref().map(|m| m.0.as_str());
        let client = q.client.as_deref();
        let rows = c
            .query(
                &st,
                &[
                    &after_ms,
                    &after_id,
                    &state,
                    &model,
                    &client,
                    &((max_scanned + 1) as i64),
                    &(q.limit as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        let mut out = Vec::new();
        let mut last: Option<Cursor> = None;
        for (scanned, r) in rows.iter().enumerate() {
            let pos = Cursor {
                created_ms: r.get::<_, i64>(0) as u64,
                id: JobId(r.get(1)),
            };
            if out.len() == q.limit || scanned == max_scanned {
                // There is more: continue after the last position examined.
                return Ok((out, last));
            }
            last = Some(pos);
            if r.get::<_, bool>(2) {
                out.push(decode_job(r, 1, 3)?);
            }
        }
        Ok((out, None))
    }

    pub(super) async fn finished_before(
        &self,
        cutoff_ms: Millis,
        limit: usize,
    ) -> Result<Vec<StoredJob>> {
        let c = self.reader().await?;
        let st = c
            .prepare_cached(
                "SELECT id, record FROM corral_jobs \
                 WHERE finished_ms IS NOT NULL AND finished_ms <= $1 \
                 ORDER BY finished_ms, id LIMIT $2",
            )
            .await
            .map_err(pg_err)?;
        c.query(
            &st,
            &[&(cutoff_ms.min(i64::MAX as u64) as i64), &(limit as i64)],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| decode_job(r, 0, 1))
        .collect()
    }
}

fn decode_job(r: &tokio_postgres::Row, id_col: usize, record_col: usize) -> Result<StoredJob> {
    let id: String = r.get(id_col);
    serde_json::from_slice(r.get::<_, &[u8]>(record_col))
        .map_err(|e| Error::Internal(format!("stored job {id} does not decode: {e}")))
}

/// Renews the lease while leading, until the store is dropped or closed.
fn spawn_renewals(shared: std::sync::Weak<Shared>) {
    tokio::spawn(
        async move {
            loop {
                let (every, ended) = match shared.upgrade() {
                    Some(s) => (s.leadership.poll(), s.leadership.ended.clone()),
                    None => return,
                };
                // The lease session ending is news at once: followers may
                // take over as soon as it is gone.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = ended.notified() => {}
                }
                let Some(s) = shared.upgrade() else { return };
                if s.closed.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                if let Err(why) = s.leadership.renew().await {
                    s.set_failed(why);
                }
            }
        }
        .instrument(info_span!("lease")),
    );
}
