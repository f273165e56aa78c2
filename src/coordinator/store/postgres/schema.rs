//! The PostgreSQL schema and its migrations.
//!
//! Each migration is a numbered SQL script applied once, in order, inside
//! one transaction together with its row in `corral_migrations`. Two
//! coordinators starting at once serialize on a transaction-level advisory
//! lock, so a script never runs twice. A database migrated by a newer
//! Corral (a version this code does not know) is refused rather than
//! written with the wrong layout.
//!
//! Layout (version 1):
//! - `corral_jobs`: one row per job; `record` is the JSON `StoredJob` (as
//!   `bytea`: `jsonb` refuses a `\u0000` a client may put in a prompt), and
//!   the columns beside it are what the queries filter and order on:
//!   `(created_ms, id)` is ListJobs' cursor order, `finished_ms` (null while
//!   unfinished) drives the retention sweep and the set loaded at start.
//!   Ids are `COLLATE "C"` so that they order by bytes, as in the redb store.
//! - `corral_idempotency`: scoped idempotency key (`bytea`: it joins the
//!   client and its key with a NUL) -> job id.
//! - `corral_models`: the catalogue (JSON manifests).
//! - `corral_images`: a completed job's PNGs, written in the transaction
//!   that writes its completed record.
//! - `corral_leader`: one row, the leadership lease and its epoch (see
//!   `lease.rs`).

use tokio_postgres::Client;
use tracing::info;

use super::pg_err;
use crate::error::{Error, Result};

/// Any constant: the key of the advisory lock migrations take.
const MIGRATION_LOCK: i64 = 0x636f_7272_616c_0001;

/// (version, name, script), in order. Never edit a released script: add one.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "jobs, keys, catalogue, images, leader",
    r#"
CREATE TABLE corral_jobs (
    id          text COLLATE "C" PRIMARY KEY,
    client      text COLLATE "C" NOT NULL,
    model_id    text COLLATE "C" NOT NULL,
    state       text NOT NULL,
    created_ms  bigint NOT NULL,
    finished_ms bigint,
    record      bytea NOT NULL
);
CREATE INDEX corral_jobs_by_created ON corral_jobs (created_ms, id);
CREATE INDEX corral_jobs_unfinished ON corral_jobs (created_ms, id) WHERE finished_ms IS NULL;
CREATE INDEX corral_jobs_finished ON corral_jobs (finished_ms, id) WHERE finished_ms IS NOT NULL;
CREATE TABLE corral_idempotency (
    key    bytea PRIMARY KEY,
    job_id text COLLATE "C" NOT NULL
);
CREATE TABLE corral_models (
    id       text COLLATE "C" PRIMARY KEY,
    manifest bytea NOT NULL
);
CREATE TABLE corral_images (
    job_id text COLLATE "C" NOT NULL,
    idx    integer NOT NULL,
    png    bytea NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE corral_leader (
    id            integer PRIMARY KEY CHECK (id = 1),
    epoch         bigint NOT NULL,
    holder        text NOT NULL,
    url           text NOT NULL,
    expires_at    timestamptz NOT NULL,
    pid           integer,
    backend_start timestamptz
);
INSERT INTO corral_leader (id, epoch, holder, url, expires_at) VALUES (1, 0, '', '', '-infinity');
"#,
)];

/// Applies the migrations `client`'s database lacks. Returns the version.
pub(super) async fn migrate(client: &mut Client) -> Result<i32> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS corral_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg_err)?;
    let applied: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM corral_migrations",
            &[],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if applied > known {
        return Err(Error::FailedPrecondition(format!(
            "store: the database has schema version {applied}, newer than this Corral \
             knows ({known}); run a Corral at least as new as the one that migrated it"
        )));
    }
    for (version, name, script) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
        tx.batch_execute(script).await.map_err(|e| {
            Error::Internal(format!("store: migration {version} ({name}) failed: {e}"))
        })?;
        tx.execute(
            "INSERT INTO corral_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(pg_err)?;
        info!(version, name, "store migrated");
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(known)
}
