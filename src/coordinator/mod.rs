//! The coordinator: tonic services around the scheduler.
//!
//! `Coordinator` owns the scheduler (behind a std `Mutex`, never held across
//! an `.await`), the records of unfinished jobs (`records`), the catalogue,
//! one outbound channel per connected worker, and the store.
//!
//! How a decision flows: a scheduler operation runs under the lock and
//! returns effects; `apply` carries them out still under the lock, so that
//! they keep their order: messages to workers go into each worker's channel
//! (converted to protobuf later, on the stream's task), and every job
//! transition goes to the store. A transition becomes visible (GetJob,
//! WatchJob, ListJobs, metrics) only when the store has committed it: the
//! store runs a callback per commit, in order, which updates the record and
//! tells watchers. Nothing a client sees can be taken back by a crash.
//!
//! Read paths (GetJob, WatchJob, ListWorkers, ClusterStatus, `/metrics`, the
//! cluster page) never take the scheduler's lock: they read the records,
//! the store, or the snapshot the ticker refreshes.
//!
//! Files: `accept` (client operations), `fleet` (worker streams),
//! `catalogue`, `recovery` (restore, store failures, retention), `records`,
//! `snapshot`; the services are `jobs`, `workers`, `admin`, `server`.

mod accept;
mod admin;
pub mod auth;
mod catalogue;
mod cluster;
mod fleet;
pub mod http;
mod jobs;
mod records;
mod recovery;
mod server;
mod snapshot;
pub mod store;
mod workers;

pub use fleet::ToWorker;
pub use server::{run, run_with_http, serve, Services};
pub use snapshot::{ModelSummary, Snapshot, WorkerSummary};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use dashmap::DashMap;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::scheduler::{Effect, Scheduler};
use crate::types::*;
use records::Records;
use store::{Op, Store};

pub struct Coordinator {
    cfg: CoordinatorConfig,
    clock: Arc<dyn Clock>,
    sched: Mutex<Scheduler>,
    records: Arc<Records>,
    models: DashMap<ModelId, Arc<ModelManifest>>,
    links: DashMap<WorkerId, fleet::WorkerLink>,
    next_conn: AtomicU64,
    store: Store,
    /// False while the store is failing: every operation is refused.
    serving: AtomicBool,
    metrics: Arc<crate::metrics::CoordMetrics>,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Coordinator {
    /// A coordinator with an in-memory store (tests, benchmarks).
    pub fn new(cfg: CoordinatorConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        let (store, loaded) = Store::memory().expect("an in-memory store opens");
        Self::with_store(cfg, clock, store, loaded)
    }

    /// A coordinator whose hard state lives under `cfg.data_dir`: what the
    /// store holds is restored (unfinished jobs queued again) before it
    /// serves.
    pub fn open(cfg: CoordinatorConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>> {
        let (store, loaded) = Store::open(&cfg.data_dir)?;
        Ok(Self::with_store(cfg, clock, store, loaded))
    }

    fn with_store(
        cfg: CoordinatorConfig,
        clock: Arc<dyn Clock>,
        store: Store,
        loaded: store::Loaded,
    ) -> Arc<Self> {
        let c = Arc::new_cyclic(|me: &std::sync::Weak<Self>| Self {
            metrics: Arc::new(crate::metrics::CoordMetrics::new(Some(Box::new(
                cluster::Gauges(me.clone()),
            )))),
            sched: Mutex::new(Scheduler::new(cfg.scheduler())),
            cfg,
            clock,
            records: Arc::new(Records::default()),
            models: DashMap::new(),
            links: DashMap::new(),
            next_conn: AtomicU64::new(1),
            store,
            serving: AtomicBool::new(true),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
        });
        c.restore(loaded);
        c.refresh_snapshot();
        c
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    pub fn now_ms(&self) -> Millis {
        self.clock.now_ms()
    }

    /// This coordinator's counters and histograms.
    pub fn metrics(&self) -> &Arc<crate::metrics::CoordMetrics> {
        &self.metrics
    }

    fn sched(&self) -> MutexGuard<'_, Scheduler> {
        // A panic while holding the lock is a bug; the state is still
        // consistent enough to keep serving, so recover the guard.
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses work while the store is failing.
    fn check_serving(&self) -> Result<()> {
        if self.serving.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "the coordinator's store is failing and being reopened: {}",
            self.store.failed().unwrap_or_else(|| "recovering".into())
        )))
    }

    /// Runs one scheduler operation and carries out its effects.
    fn with_sched<T>(
        &self,
        op: impl FnOnce(&mut Scheduler, Millis) -> Result<(T, Vec<Effect>)>,
    ) -> Result<T> {
        self.with_sched_as(FailureKind::Other, op)
    }

    /// [`with_sched`](Self::with_sched) for an operation whose requeues and
    /// failures have a known cause (a worker's report, a lost stream).
    fn with_sched_as<T>(
        &self,
        cause: FailureKind,
        op: impl FnOnce(&mut Scheduler, Millis) -> Result<(T, Vec<Effect>)>,
    ) -> Result<T> {
        self.check_serving()?;
        let now = self.now_ms();
        let mut s = self.sched();
        let (out, effects) = op(&mut s, now)?;
        self.apply(&mut s, effects, cause, now);
        Ok(out)
    }

    /// Expires silent workers, retries matching (estimates move with time),
    /// plans replication, and refreshes the snapshot read paths use.
    pub fn tick(&self) {
        if !self.serving.load(Ordering::Acquire) {
            return;
        }
        let expired = self.with_sched_as(FailureKind::HeartbeatMissed, |s, now| {
            let before: Vec<WorkerId> = s.workers().map(|w| w.hello.worker_id.clone()).collect();
            let mut e = s.expire_workers(now);
            let expired: Vec<WorkerId> = before
                .into_iter()
                .filter(|w| s.worker(w).is_none())
                .collect();
            e.extend(s.schedule(now));
            // Keep models in demand warm on enough workers.
            e.extend(s.replicate(now));
            Ok((expired, e))
        });
        for w in expired.unwrap_or_default() {
            self.metrics.workers_expired.inc();
            // Its stream ends, so that a worker that was only paused
            // reconnects (and has its running attempts vetted) instead of
            // heartbeating into a stream nobody listens to.
            if self.links.remove(&w).is_some() {
                warn!(worker_id = %w, "worker missed its heartbeats; its stream is closed");
            }
        }
        self.refresh_snapshot();
    }

    /// Carries out a scheduler operation's effects (scheduler locked).
    /// `cause` is why any requeue or failure among them happened.
    fn apply(&self, s: &mut Scheduler, effects: Vec<Effect>, cause: FailureKind, now: Millis) {
        let mut work: std::collections::VecDeque<(Effect, FailureKind)> =
            effects.into_iter().map(|e| (e, cause)).collect();
        let lost = |e: Vec<Effect>| e.into_iter().map(|e| (e, FailureKind::WorkerLost));
        while let Some((effect, cause)) = work.pop_front() {
            match effect {
                Effect::Assign {
                    worker,
                    job,
                    attempt,
                    tier,
                    queued_ms,
                } => {
                    let Some(spec) = self.records.spec(&job) else {
                        continue;
                    };
                    let Some(model) = self.models.get(&spec.model_id).map(|m| m.clone()) else {
                        continue;
                    };
                    // Checked at submit; a model removed since cannot be, while
                    // jobs need it (Scheduler::remove_model).
                    let named = spec.extra_models();
                    let extras: Vec<Arc<ModelManifest>> = named
                        .iter()
                        .filter_map(|id| self.models.get(id).map(|m| m.clone()))
                        .collect();
                    if extras.len() != named.len() {
                        // A LoRA, VAE or upscaler removed between the job's
                        // acceptance and now: it can never run.
                        let reason = "a model it names was removed from the catalogue".to_string();
                        if let Ok(e) = s.cancel(&job, now) {
                            work.extend(e.into_iter().map(|e| (e, FailureKind::Invalid)));
                        }
                        work.push_back((Effect::Failed { job, reason }, FailureKind::Invalid));
                        continue;
                    }
                    info!(job_id = %job, worker_id = %worker, attempt, tier = tier.as_str(), "assigned");
                    self.metrics.job_assigned(&job, tier);
                    self.records
                        .set_current(&job, Some((worker.clone(), attempt)));
                    let w = worker.clone();
                    self.transition(s, &job, now, Vec::new(), move |r| {
                        r.state = JobState::Running;
                        r.attempt = attempt;
                        r.worker = Some(w.clone());
                        r.tier = Some(tier);
                        Some(JobEventKind::Assigned {
                            worker: w,
                            tier,
                            attempt,
                        })
                    });
                    let msg = ToWorker::Assign {
                        job: job.clone(),
                        attempt,
                        spec,
                        model,
                        extras,
                        queued_ms,
                    };
                    if !self.send(&worker, msg) {
                        work.extend(lost(s.disconnect(
                            &worker,
                            "could not be reached",
                            false,
                            now,
                        )));
                    }
                }
                Effect::Cancel {
                    worker,
                    job,
                    attempt,
                } => {
                    info!(job_id = %job, worker_id = %worker, attempt, "cancel sent");
                    if !self.send(&worker, ToWorker::Cancel { job, attempt }) {
                        work.extend(lost(s.disconnect(
                            &worker,
                            "could not be reached",
                            false,
                            now,
                        )));
                    }
                }
                Effect::Prefetch { worker, model } => {
                    let Some(m) = self.models.get(&model).map(|m| m.clone()) else {
                        continue;
                    };
                    info!(worker_id = %worker, model_id = %model, "prefetch");
                    if !self.send(&worker, ToWorker::Prefetch(vec![m])) {
                        work.extend(lost(s.disconnect(
                            &worker,
                            "could not be reached",
                            false,
                            now,
                        )));
                    }
                }
                Effect::Requeued {
                    job,
                    next_attempt,
                    reason,
                } => {
                    warn!(job_id = %job, next_attempt, %reason, kind = cause.as_str(), "requeued");
                    self.metrics.requeues.inc();
                    self.records.set_current(&job, None);
                    self.transition(s, &job, now, Vec::new(), move |r| {
                        r.state = JobState::Queued;
                        r.worker = None;
                        r.tier = None;
                        r.error = reason.clone();
                        Some(JobEventKind::Requeued {
                            reason,
                            next_attempt,
                        })
                    });
                }
                Effect::Failed { job, reason } => {
                    warn!(job_id = %job, %reason, kind = cause.as_str(), "failed");
                    self.metrics.job_failed(&job, cause);
                    self.records.set_current(&job, None);
                    self.transition(s, &job, now, Vec::new(), move |r| {
                        r.state = JobState::Failed;
                        r.error = reason.clone();
                        Some(JobEventKind::Failed { reason })
                    });
                }
            }
        }
    }

    /// Records a decided change of a job: `f` changes the record and names
    /// the event watchers get. The change (and `extra` operations, such as
    /// a result's images) goes to the store; it becomes visible once
    /// committed.
    fn transition(
        &self,
        s: &Scheduler,
        job: &JobId,
        now: Millis,
        extra: Vec<Op>,
        f: impl FnOnce(&mut JobRecord) -> Option<JobEventKind>,
    ) {
        let failures = s.job(job).map_or(0, |j| j.failures);
        let Some((stored, record, event)) = self.records.decide(job, now, failures, f) else {
            return;
        };
        let mut ops = vec![Op::PutJob(Box::new(stored))];
        ops.extend(extra);
        let records = self.records.clone();
        let at_ms = now;
        self.store.write(
            ops,
            Some(Box::new(move |res| {
                if res.is_ok() {
                    records.committed(record, event, at_ms);
                }
                // A failed commit: the recovery task reloads everything
                // from the store; nothing of this change was shown.
            })),
        );
    }

    /// Resolves once every change decided so far is on disk.
    pub async fn sync(&self) -> Result<()> {
        self.store.barrier().await
    }

    /// Commits what is pending and closes the store (at shutdown).
    pub async fn close_store(&self) -> Result<()> {
        self.store.close().await
    }
}
