//! Leadership: which of the coordinators sharing a database leads.
//!
//! A lease row (`corral_leader`, one row) names the leader, its advertised
//! URL, an epoch and an expiry in the database's clock. The leader renews
//! it every `lease / 5` on a dedicated connection; a follower takes it over
//! (bumping the epoch) when it has expired, or at once when the leader's
//! lease session is gone from `pg_stat_activity` (its process died: a
//! crash is noticed in one poll, not one lease).
//!
//! Why a lease row and not an advisory lock held on a session: a paused
//! leader (SIGSTOP, a stalled VM) keeps its session and so its lock for
//! ever, and a dead host's session lingers until TCP keepalives give up;
//! a lease expires on the database's clock whatever the network does, and
//! works through connection poolers. The epoch it carries is the fence:
//! every write transaction reads the row `FOR SHARE` and commits only if
//! the epoch is still its own (`super::writer`). A takeover's UPDATE waits
//! for those transactions, so everything the old leader committed is
//! committed before the new leader loads.
//!
//! The leader also keeps a local deadline (the time it sent its last
//! successful renewal plus the lease, on the monotonic clock, so always
//! before the row expires): past it, it stops acting without waiting to
//! hear from the database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use super::{connect, pg_err};
use crate::error::{Error, Result};

/// Takes the lease if it is free (expired, ours, or its holder's session
/// is gone). Returns the new epoch.
const CAMPAIGN: &str = "
UPDATE corral_leader SET
    epoch = epoch + 1, holder = $1, url = $2,
    expires_at = now() + make_interval(secs => $3),
    pid = pg_backend_pid(),
    backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())
WHERE id = 1 AND (
    expires_at < now() OR holder = $1
    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                   WHERE a.pid = corral_leader.pid
                     AND a.backend_start = corral_leader.backend_start))
RETURNING epoch";

/// Extends the lease if it is still ours.
const RENEW: &str = "
UPDATE corral_leader SET expires_at = now() + make_interval(secs => $2)
WHERE id = 1 AND epoch = $1";

/// Who leads now, as far as the row says.
const CURRENT: &str = "
SELECT epoch, url, expires_at > now() FROM corral_leader WHERE id = 1";

/// Gives the lease up at shutdown, so that a follower takes over at once.
const RELEASE: &str = "
UPDATE corral_leader SET expires_at = '-infinity', pid = NULL, backend_start = NULL
WHERE id = 1 AND epoch = $1";

#[derive(Debug, Default)]
struct State {
    /// Our epoch while we lead.
    epoch: Option<i64>,
    /// Past this we stop acting, whatever the database says later.
    deadline: Option<Instant>,
    /// The leader's advertised URL, as last read (ours while leading).
    leader_url: Option<String>,
}

/// This coordinator's side of the lease; see the module docs.
pub(super) struct Leadership {
    /// Unique per process: a restarted coordinator is a new holder.
    pub holder: String,
    /// Where clients and workers reach this coordinator.
    pub url: String,
    pub lease: Duration,
    pg: tokio_postgres::Config,
    /// The lease session (renewals and campaigns), reconnected on error.
    conn: tokio::sync::Mutex<Option<Client>>,
    state: Mutex<State>,
    /// Writes refused because this coordinator no longer held the epoch.
    pub fenced: AtomicU64,
    /// Told when the lease session ends.
    pub ended: std::sync::Arc<tokio::sync::Notify>,
}

impl Leadership {
    pub(super) fn new(pg: tokio_postgres::Config, url: String, lease: Duration) -> Self {
        Self {
            holder: format!("{}", uuid::Uuid::new_v4().simple()),
            url,
            lease,
            pg,
            conn: tokio::sync::Mutex::new(None),
            state: Mutex::new(State::default()),
            fenced: AtomicU64::new(0),
            ended: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How often the leader renews and followers try to take over.
    pub(super) fn poll(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(100))
    }

    /// Our epoch, while we lead and the local deadline has not passed.
    pub(super) fn epoch(&self) -> Option<i64> {
        let s = self.state();
        match (s.epoch, s.deadline) {
            (Some(e), Some(d)) if Instant::now() < d => Some(e),
            _ => None,
        }
    }

    /// Why we are not leading, if we are not (None while leading).
    pub(super) fn not_leading(&self) -> Option<String> {
        let s = self.state();
        let lapsed = s.deadline.is_some_and(|d| Instant::now() >= d);
        if s.epoch.is_some() && !lapsed {
            return None;
        }
        let why = if s.epoch.is_some() {
            "this coordinator's lease lapsed (no renewal reached the database in time)"
        } else {
            "this coordinator is not the leader"
        };
        Some(match &s.leader_url {
            Some(u) if u != &self.url => format!("{why}; the leader is {u}"),
            _ => format!("{why}; no other leader is known yet"),
        })
    }

    /// The leader's URL when it is another coordinator.
    pub(super) fn other_leader(&self) -> Option<String> {
        let s = self.state();
        s.leader_url.clone().filter(|u| u != &self.url)
    }

    /// Stops leading (a failed commit, a lost lease).
    pub(super) fn demote(&self) {
        let mut s = self.state();
        s.epoch = None;
        s.deadline = None;
    }

    /// Counts a write refused for want of the epoch; returns the count.
    pub(super) fn count_fenced(&self) -> u64 {
        self.fenced.fetch_add(1, Ordering::Relaxed) + 1
    }

    async fn session(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            let c = connect(&self.pg, "lease", Some(self.ended.clone())).await?;
            // A lease session must never wait long on a row lock: a writer
            // of a paused old leader holds one until the database ends its
            // idle transaction.
            let ms = (self.poll().as_millis() as u64).max(200);
            c.batch_execute(&format!(
                "SET lock_timeout = {ms}; SET statement_timeout = {}",
                ms * 4
            ))
            .await
            .map_err(pg_err)?;
            *conn = Some(c);
        }
        Ok(conn)
    }

    /// One attempt to take the lease. `Ok(true)` when it is ours now.
    pub(super) async fn campaign(&self) -> Result<bool> {
        let mut conn = self.session().await?;
        let c = conn.as_ref().expect("session() connects");
        let sent = Instant::now();
        let secs = self.lease.as_secs_f64();
        let won = c
            .query_opt(CAMPAIGN, &[&self.holder, &self.url, &secs])
            .await;
        let won = match won {
            Ok(r) => r.map(|r| r.get::<_, i64>(0)),
            Err(e) => {
                *conn = None;
                return Err(pg_err(e));
            }
        };
        if let Some(epoch) = won {
            let mut s = self.state();
            s.epoch = Some(epoch);
            s.deadline = Some(sent + self.lease);
            s.leader_url = Some(self.url.clone());
            info!(epoch, url = %self.url, "took the lead");
            return Ok(true);
        }
        let row = c.query_one(CURRENT, &[]).await;
        match row {
            Ok(r) => {
                let (url, live): (String, bool) = (r.get(1), r.get(2));
                self.state().leader_url = (live && !url.is_empty()).then_some(url);
            }
            Err(e) => {
                *conn = None;
                return Err(pg_err(e));
            }
        }
        Ok(false)
    }

    /// While leading: extends the lease. `Err` with the reason once it is
    /// lost (the row names another epoch); a database error only logs
    /// (the local deadline decides when to stop).
    pub(super) async fn renew(&self) -> std::result::Result<(), String> {
        let Some(epoch) = self.state().epoch else {
            return Ok(());
        };
        let gone = {
            let mut conn = self.conn.lock().await;
            let gone = conn.as_ref().is_none_or(|c| c.is_closed());
            if gone {
                *conn = None;
            }
            gone
        };
        if gone {
            // The lease session is what tells followers we live: without
            // it one may take over at once.
            let why = "this coordinator lost its lease session; it campaigns again".to_owned();
            warn!(reason = %why, "stepping down");
            self.demote();
            return Err(why);
        }
        let mut conn = match self.session().await {
            Ok(c) => c,
            Err(e) => {
                // The local deadline decides: the row may still be ours.
                warn!(error = %e, "lease renewal: cannot reach the database");
                return Ok(());
            }
        };
        let c = conn.as_ref().expect("session() connects");
        let sent = Instant::now();
        let secs = self.lease.as_secs_f64();
        match c.execute(RENEW, &[&epoch, &secs]).await {
            Ok(1) => {
                let mut s = self.state();
                if s.epoch == Some(epoch) {
                    s.deadline = Some(sent + self.lease);
                }
                Ok(())
            }
            Ok(_) => {
                let n = self.count_fenced();
                let now = c.query_one(CURRENT, &[]).await.ok();
                let (new_epoch, url) = now
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                    .unwrap_or((0, String::new()));
                warn!(
                    epoch,
                    new_epoch,
                    leader = %url,
                    fenced_writes = n,
                    "fenced write refused: lease renewal of a lost epoch"
                );
                let mut s = self.state();
                s.epoch = None;
                s.deadline = None;
                s.leader_url = (!url.is_empty()).then_some(url.clone());
                Err(format!(
                    "this coordinator lost the lead (epoch {new_epoch} took over from \
                     epoch {epoch}); the leader is {url}"
                ))
            }
            Err(e) if e.is_closed() || e.as_db_error().is_none() => {
                // The lease session is gone, and with it what tells
                // followers that we live: one may take over at once.
                let why = format!(
                    "this coordinator lost its lease session ({}); it campaigns again",
                    pg_err(e)
                );
                warn!(reason = %why, "stepping down");
                *conn = None;
                self.demote();
                Err(why)
            }
            Err(e) => {
                // A timeout behind a lock: the local deadline decides.
                warn!(error = %pg_err(e), "lease renewal failed");
                Ok(())
            }
        }
    }

    /// Gives the lease up (at shutdown).
    pub(super) async fn release(&self) {
        let Some(epoch) = self.state().epoch else {
            return;
        };
        self.demote();
        match self.session().await {
            Ok(conn) => {
                let c = conn.as_ref().expect("session() connects");
                match c.execute(RELEASE, &[&epoch]).await {
                    Ok(_) => info!(epoch, "gave up the lead"),
                    Err(e) => warn!(error = %pg_err(e), "could not give up the lead"),
                }
            }
            Err(e) => warn!(error = %e, "could not give up the lead"),
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("holder", &self.holder)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// An error for a write refused because we do not lead.
pub(super) fn not_leader(why: String) -> Error {
    Error::Unavailable(format!("store: {why}"))
}
