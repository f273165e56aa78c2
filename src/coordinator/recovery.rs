//! Getting the coordinator's state back from the store: at start, after
//! the store failed (a full disk, an I/O error), and keeping the store to
//! its retention period.
//!
//! A failed commit means the store is behind what the scheduler decided.
//! The coordinator then does what a restart would, without exiting: it
//! stops serving (health NOT_SERVING, every call UNAVAILABLE), closes the
//! worker streams, reopens the store until it takes writes again, reloads
//! every unfinished job from it, and serves again. Workers reconnect and
//! keep the attempts they still run; a result that was not committed is
//! computed again. Nothing a client was told is lost, because nothing was
//! told before it was committed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{error, info, info_span, warn, Instrument};

use super::store::{scoped_key, Loaded, Op};
use super::Coordinator;
use crate::scheduler::Scheduler;
use crate::types::*;

/// Most finished jobs deleted in one transaction by the retention sweep.
const SWEEP_BATCH: usize = 1000;

impl Coordinator {
    /// Rebuilds the scheduler, the catalogue and the records from what the
    /// store holds. Jobs that were running are queued again with their
    /// attempt number: a worker that reconnects with that attempt running
    /// keeps it (`Scheduler::connect`).
    pub(super) fn restore(&self, loaded: Loaded) {
        let mut s = self.sched();
        *s = Scheduler::new(self.cfg.scheduler());
        self.records.clear();
        self.models.clear();
        for m in loaded.models {
            s.register_model(m.id.clone(), m.total_bytes());
            self.models.insert(m.id.clone(), Arc::new(m));
        }
        let (mut queued, mut was_running) = (0usize, 0usize);
        let mut requeued = Vec::new();
        for mut sj in loaded.unfinished {
            let last = sj
                .last_worker
                .clone()
                .or_else(|| sj.worker.clone())
                .map(|w| (w, sj.attempt));
            if sj.state == JobState::Running {
                was_running += 1;
                sj.state = JobState::Queued;
                sj.worker = None;
                sj.tier = None;
                sj.last_worker = last.as_ref().map(|(w, _)| w.clone());
                requeued.push(Op::PutJob(Box::new(sj.clone())));
            } else {
                queued += 1;
            }
            if !s.has_model(&sj.spec.model_id) {
                // The catalogue and the job are written in order, so this
                // is a bug; keep the job visible rather than lose it.
                error!(job_id = %sj.id, model_id = %sj.spec.model_id, "job of an unknown model");
                s.register_model(sj.spec.model_id.clone(), 0);
            }
            s.restore_job(
                sj.id.clone(),
                Arc::new(sj.spec.clone()),
                sj.created_ms,
                sj.attempt,
                sj.failures,
            );
            self.records.insert(&sj, last);
            self.records.count_restored(&sj);
        }
        drop(s);
        if !requeued.is_empty() {
            // The state shown is already "queued"; a crash before this
            // commit restores the same state again.
            self.store.write(requeued, None);
        }
        info!(queued, was_running, "state restored");
    }

    /// Stops serving, reopens the store until it takes writes, reloads.
    /// On a shared store that this coordinator does not lead, "reopen" is
    /// campaigning: it returns once this coordinator leads.
    async fn recover(&self, health: &tonic_health::server::HealthReporter) {
        let why = self.store.failed().unwrap_or_default();
        if self.store.following() {
            info!(reason = %why, "not leading: not serving; campaigning for the lead");
        } else {
            error!(error = %why, "the store failed: not serving until it is reopened");
            self.metrics.store_failures.inc();
        }
        self.serving.store(false, Ordering::Release);
        super::server::set_health(health, false).await;
        self.close_worker_streams();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.store.reopen().await {
                Ok(loaded) => {
                    self.restore(loaded);
                    self.serving.store(true, Ordering::Release);
                    self.refresh_snapshot();
                    super::server::set_health(health, true).await;
                    info!("the store is back; serving again");
                    return;
                }
                Err(_) if self.store.closed() => return,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "the store cannot be reopened yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Removes finished jobs (records, idempotency keys and images) older
    /// than `result_retention_s`. Returns how many.
    pub async fn sweep_finished(&self) -> usize {
        let cutoff = self
            .now_ms()
            .saturating_sub(self.cfg.result_retention_s.saturating_mul(1000));
        let mut removed = 0;
        loop {
            let old = match self.store.finished_before(cutoff, SWEEP_BATCH).await {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "retention sweep could not read the store");
                    break;
                }
            };
            let n = old.len();
            let ops = old
                .into_iter()
                .map(|j| Op::DeleteJob {
                    key: scoped_key(&j.client, &j.spec.idempotency_key),
                    job: j.id,
                })
                .collect();
            if let Err(e) = self.store.commit(ops).await {
                warn!(error = %e, "retention sweep not committed");
                break;
            }
            removed += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
        if removed > 0 {
            info!(jobs = removed, "retention sweep removed finished jobs");
        }
        removed
    }
}

/// Watches the store and recovers from its failures until the coordinator
/// is dropped.
pub(super) fn spawn_watchdog(
    coord: Weak<Coordinator>,
    health: tonic_health::server::HealthReporter,
) {
    tokio::spawn(
        async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(c) = coord.upgrade() else { return };
                if c.store.failed().is_some() {
                    c.recover(&health).await;
                }
            }
        }
        .instrument(info_span!("store_watchdog")),
    );
}

/// Runs the retention sweep until the coordinator is dropped.
pub(super) fn spawn_sweeper(coord: Weak<Coordinator>, retention_s: u64) {
    let every = Duration::from_millis((retention_s * 1000 / 4).clamp(100, 60_000));
    tokio::spawn(
        async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(c) = coord.upgrade() else { return };
                c.sweep_finished().await;
            }
        }
        .instrument(info_span!("retention_sweep")),
    );
}
