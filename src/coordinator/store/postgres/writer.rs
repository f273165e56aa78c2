//! The writer task: group commit on one connection, fenced by the epoch.
//!
//! It takes every operation waiting in its channel (up to `MAX_BATCH`),
//! sends them as one transaction with the statements pipelined (one round
//! trip for the whole batch, not one per operation), and runs the
//! callbacks in order once the commit answered. The transaction's first
//! statement reads the lease row `FOR SHARE`: the batch commits only if
//! the epoch is still this coordinator's, and a takeover (an UPDATE of that
//! row) waits until the batch is done. A refused or failed batch fails
//! every callback of it and puts the store in the failed state.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::{debug, error, info, warn};

use super::{connect, lease, pg_err, Msg, Shared};
use crate::coordinator::store::{Done, Op};
use crate::error::{Error, Result};

/// Most operations written in one transaction.
const MAX_BATCH: usize = 4096;

const FENCE: &str = "SELECT epoch, url FROM corral_leader WHERE id = 1 FOR SHARE";

const PUT_JOB: &str = "
WITH k AS (
    INSERT INTO corral_idempotency (key, job_id)
    SELECT $7::bytea, $1::text WHERE $7::bytea IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id
)
INSERT INTO corral_jobs (id, client, model_id, state, created_ms, finished_ms, record)
VALUES ($1, $2, $3, $4, $5, $6, $8)
ON CONFLICT (id) DO UPDATE SET
    client = EXCLUDED.client, model_id = EXCLUDED.model_id, state = EXCLUDED.state,
    created_ms = EXCLUDED.created_ms, finished_ms = EXCLUDED.finished_ms,
    record = EXCLUDED.record";

const PUT_IMAGE: &str = "
INSERT INTO corral_images (job_id, idx, png) VALUES ($1, $2, $3)
ON CONFLICT (job_id, idx) DO UPDATE SET png = EXCLUDED.png";

const DELETE_JOB: &str = "
WITH i AS (DELETE FROM corral_images WHERE job_id = $1),
     k AS (DELETE FROM corral_idempotency WHERE key = $2 AND job_id = $1)
DELETE FROM corral_jobs WHERE id = $1";

const PUT_MODEL: &str = "
INSERT INTO corral_models (id, manifest) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET manifest = EXCLUDED.manifest";

const DELETE_MODEL: &str = "DELETE FROM corral_models WHERE id = $1";

/// The writer's connection and its prepared statements.
struct Conn {
    client: Client,
    fence: Statement,
    put_job: Statement,
    put_image: Statement,
    delete_job: Statement,
    put_model: Statement,
    delete_model: Statement,
}

impl Conn {
    async fn open(pg: &tokio_postgres::Config, shared: &Shared) -> Result<Self> {
        let client = connect(pg, "writer", None).await?;
        // A paused writer must not hold the lease row's share lock for
        // ever: the database ends a transaction left idle this long.
        let idle_ms = (shared.leadership.lease.as_millis() as u64 / 2).max(500);
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {idle_ms}"
            ))
            .await
            .map_err(pg_err)?;
        let p = |q: &'static str| {
            let c = &client;
            async move { c.prepare(q).await.map_err(pg_err) }
        };
        Ok(Self {
            fence: p(FENCE).await?,
            put_job: p(PUT_JOB).await?,
            put_image: p(PUT_IMAGE).await?,
            delete_job: p(DELETE_JOB).await?,
            put_model: p(PUT_MODEL).await?,
            delete_model: p(DELETE_MODEL).await?,
            client,
        })
    }
}

/// The parameters of one operation's statements, owned for the batch.
enum Params {
    Job {
        id: String,
        client: String,
        model: String,
        state: &'static str,
        created_ms: i64,
        finished_ms: Option<i64>,
        key: Option<Vec<u8>>,
        record: Vec<u8>,
    },
    Image {
        job: String,
        idx: i32,
        png: bytes::Bytes,
    },
    DeleteJob {
        job: String,
        key: Option<Vec<u8>>,
    },
    PutModel {
        id: String,
        manifest: Vec<u8>,
    },
    DeleteModel {
        id: String,
    },
}

fn params(ops: &[Op]) -> Vec<Params> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::PutJob(j) => out.push(Params::Job {
                id: j.id.0.clone(),
                client: j.client.clone(),
                model: j.spec.model_id.0.clone(),
                state: j.state.as_str(),
                created_ms: j.created_ms as i64,
                finished_ms: j.state.is_terminal().then_some(j.updated_ms as i64),
                key: j.scoped_key().map(String::into_bytes),
                record: serde_json::to_vec(j).expect("a stored job always encodes"),
            }),
            Op::PutImages { job, images } => {
                for (i, png) in images.iter().enumerate() {
                    out.push(Params::Image {
                        job: job.0.clone(),
                        idx: i as i32,
                        png: png.clone(),
                    });
                }
            }
            Op::DeleteJob { job, key } => out.push(Params::DeleteJob {
                job: job.0.clone(),
                key: key.clone().map(String::into_bytes),
            }),
            Op::PutModel(m) => out.push(Params::PutModel {
                id: m.id.0.clone(),
                manifest: serde_json::to_vec(m).expect("a manifest always encodes"),
            }),
            Op::DeleteModel(id) => out.push(Params::DeleteModel { id: id.0.clone() }),
        }
    }
    out
}

type Pending<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Applies `ops` in one transaction if `epoch` still leads.
async fn commit_batch(c: &Conn, epoch: i64, ops: &[Op]) -> std::result::Result<(), Refusal> {
    let params = params(ops);
    let db = |e| Refusal::Failed(pg_err(e));
    c.client.batch_execute("BEGIN").await.map_err(db)?;
    let fence = c.client.query_one(&c.fence, &[]);
    let mut pending: Vec<Pending<'_>> = Vec::with_capacity(params.len());
    for p in &params {
        let f: Pending<'_> = match p {
            Params::Job {
                id,
                client,
                model,
                state,
                created_ms,
                finished_ms,
                key,
                record,
            } => Box::pin(async move {
                let args: [&(dyn ToSql + Sync); 8] = [
                    id,
                    client,
                    model,
                    state,
                    created_ms,
                    finished_ms,
                    key,
                    record,
                ];
                c.client.execute(&c.put_job, &args).await
            }),
            Params::Image { job, idx, png } => Box::pin(async move {
                let png: &[u8] = png.as_ref();
                c.client.execute(&c.put_image, &[job, idx, &png]).await
            }),
            Params::DeleteJob { job, key } => {
                Box::pin(async move { c.client.execute(&c.delete_job, &[job, key]).await })
            }
            Params::PutModel { id, manifest } => {
                Box::pin(async move { c.client.execute(&c.put_model, &[id, manifest]).await })
            }
            Params::DeleteModel { id } => {
                Box::pin(async move { c.client.execute(&c.delete_model, &[id]).await })
            }
        };
        pending.push(f);
    }
    // Every statement is sent before any answer is awaited (pipelining);
    // the server runs them in order.
    let (fence, applied) = futures::join!(fence, futures::future::try_join_all(pending));
    let rollback = || async {
        let _ = c.client.batch_execute("ROLLBACK").await;
    };
    let row = match fence {
        Ok(r) => r,
        Err(e) => {
            rollback().await;
            return Err(db(e));
        }
    };
    let (now_epoch, url): (i64, String) = (row.get(0), row.get(1));
    if now_epoch != epoch {
        rollback().await;
        return Err(Refusal::Fenced {
            ours: epoch,
            theirs: now_epoch,
            leader: url,
        });
    }
    if let Err(e) = applied {
        rollback().await;
        return Err(db(e));
    }
    c.client.batch_execute("COMMIT").await.map_err(db)
}

enum Refusal {
    /// The epoch moved on: another coordinator leads.
    Fenced {
        ours: i64,
        theirs: i64,
        leader: String,
    },
    Failed(Error),
}

/// The writer task: group commit until `Close` or the channel closes.
pub(super) async fn run(
    shared: Arc<Shared>,
    pg: tokio_postgres::Config,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let mut conn: Option<Conn> = None;
    let mut pending: Option<Msg> = None;
    loop {
        let first = match pending.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => break,
            },
        };
        match first {
            Msg::Write(mut ops, done) => {
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
                let res = write(&shared, &pg, &mut conn, &ops).await;
                drop(ops);
                for d in dones {
                    d(res.as_ref().map(|_| ()).map_err(Error::duplicate));
                }
            }
            Msg::Close(tx) => {
                info!("store closed");
                let _ = tx.send(Ok(()));
                while let Some(m) = rx.recv().await {
                    match m {
                        Msg::Write(_, Some(d)) => {
                            d(Err(Error::Unavailable("store: closed".into())))
                        }
                        Msg::Write(_, None) => {}
                        Msg::Close(tx) => {
                            let _ = tx.send(Ok(()));
                        }
                    }
                }
                return;
            }
        }
    }
}

/// One batch: refused at once when we do not lead or the store failed;
/// otherwise committed under the fence.
async fn write(
    shared: &Shared,
    pg: &tokio_postgres::Config,
    conn: &mut Option<Conn>,
    ops: &[Op],
) -> Result<()> {
    if let Some(why) = shared
        .failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return Err(Error::Unavailable(format!(
            "store: not written, an earlier commit failed ({why})"
        )));
    }
    if ops.is_empty() {
        return Ok(());
    }
    let Some(epoch) = shared.leadership.epoch() else {
        let why = shared
            .leadership
            .not_leading()
            .unwrap_or_else(|| "not the leader".into());
        // Only a coordinator that led counts: a follower writes nothing.
        let n = shared.leadership.count_fenced();
        warn!(ops = ops.len(), fenced_writes = n, reason = %why, "fenced write refused: not leading");
        return Err(lease::not_leader(why));
    };
    let started = Instant::now();
    let res = if shared.fail_next.swap(false, Ordering::SeqCst) {
        Err(Refusal::Failed(Error::Unavailable(
            "store: postgres: the commit failed (injected fault)".into(),
        )))
    } else {
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            match Conn::open(pg, shared).await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    error!(error = %e, "store writer cannot connect; the store must be reopened");
                    shared.set_failed(e.to_string());
                    shared.leadership.demote();
                    return Err(e);
                }
            }
        }
        commit_batch(conn.as_ref().expect("connected above"), epoch, ops).await
    };
    debug!(
        ops = ops.len(),
        ms = started.elapsed().as_millis() as u64,
        "committed"
    );
    match res {
        Ok(()) => Ok(()),
        Err(Refusal::Fenced {
            ours,
            theirs,
            leader,
        }) => {
            let n = shared.leadership.count_fenced();
            warn!(
                ops = ops.len(),
                epoch = ours,
                new_epoch = theirs,
                %leader,
                fenced_writes = n,
                "fenced write refused: another coordinator took the lead"
            );
            let why = format!(
                "this coordinator lost the lead (epoch {theirs} took over from epoch \
                 {ours}); the leader is {leader}"
            );
            shared.leadership.demote();
            shared.set_failed(why.clone());
            Err(Error::Unavailable(format!("store: {why}")))
        }
        Err(Refusal::Failed(e)) => {
            error!(error = %e, ops = ops.len(), "store commit failed; the store must be reopened");
            // The connection may be mid-transaction: start afresh.
            *conn = None;
            shared.set_failed(e.to_string());
            shared.leadership.demote();
            Err(e)
        }
    }
}
