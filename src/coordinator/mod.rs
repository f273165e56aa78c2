//! The coordinator: tonic services around the scheduler.
//!
//! `Coordinator` owns the scheduler (behind a std `Mutex`, never held across
//! an `.await`), the job records clients read (a `DashMap`), the catalogue,
//! and one outbound channel per connected worker. Every scheduler operation
//! returns effects; `apply` carries them out while the scheduler lock is
//! held, so that messages to a worker leave in decision order. Carrying out
//! an effect never blocks: sends are `try_send`, and a worker whose channel
//! is full is dropped like a dead one.

mod admin;
pub mod auth;
mod cluster;
mod durable;
pub mod http;
mod jobs;
mod journal;
mod server;
mod workers;

pub use server::{run, run_with_http, Services};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::pb;
use crate::scheduler::{Effect, Scheduler};
use crate::types::*;

/// Messages to one worker; the receiving end is its response stream.
pub type WorkerTx = mpsc::Sender<std::result::Result<pb::CoordinatorMessage, tonic::Status>>;

/// Outbound queue per worker stream.
const WORKER_CHANNEL: usize = 4096;

struct WorkerLink {
    conn: u64,
    tx: WorkerTx,
}

struct JobSlot {
    record: JobRecord,
    /// Created by the first watcher and dropped when the job ends, so a
    /// job nobody watches costs no channel.
    events: Option<broadcast::Sender<JobEvent>>,
}

pub struct Coordinator {
    cfg: CoordinatorConfig,
    clock: Arc<dyn Clock>,
    sched: Mutex<Scheduler>,
    jobs: DashMap<JobId, JobSlot>,
    idempotency: DashMap<String, JobId>,
    models: DashMap<ModelId, ModelManifest>,
    links: DashMap<WorkerId, WorkerLink>,
    next_conn: AtomicU64,
    durable: durable::Durable,
}

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            sched: Mutex::new(Scheduler::new(cfg.scheduler())),
            cfg,
            clock,
            jobs: DashMap::new(),
            idempotency: DashMap::new(),
            models: DashMap::new(),
            links: DashMap::new(),
            next_conn: AtomicU64::new(1),
            durable: durable::Durable::default(),
        })
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    pub fn now_ms(&self) -> Millis {
        self.clock.now_ms()
    }

    fn sched(&self) -> MutexGuard<'_, Scheduler> {
        // A panic while holding the lock is a bug; the state is still
        // consistent enough to keep serving, so recover the guard.
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one scheduler operation and carries out its effects.
    fn with_sched<T>(
        &self,
        op: impl FnOnce(&mut Scheduler, Millis) -> Result<(T, Vec<Effect>)>,
    ) -> Result<T> {
        let now = self.now_ms();
        let mut s = self.sched();
        let (out, effects) = op(&mut s, now)?;
        self.apply(&mut s, effects, now);
        self.persist_dirty(&s);
        Ok(out)
    }

    /// Expires silent workers, retries matching (estimates move with time) and
    /// plans replication.
    pub fn tick(&self) {
        let _ = self.with_sched(|s, now| {
            let before = s.workers().count();
            let mut e = s.expire_workers(now);
            crate::metrics::coord()
                .workers_expired
                .add((before - s.workers().count()) as u64);
            e.extend(s.schedule(now));
            // Keep models in demand warm on enough workers.
            e.extend(s.replicate(now));
            Ok(((), e))
        });
    }

    fn apply(&self, s: &mut Scheduler, effects: Vec<Effect>, now: Millis) {
        let mut work: std::collections::VecDeque<Effect> = effects.into();
        while let Some(effect) = work.pop_front() {
            match effect {
                Effect::Assign {
                    worker,
                    job,
                    attempt,
                    tier,
                    queued_ms,
                } => {
                    let Some(spec) = self.update(&job, now, |r| {
                        r.state = JobState::Running;
                        r.attempt = attempt;
                        r.worker = Some(worker.clone());
                        r.tier = Some(tier);
                    }) else {
                        continue;
                    };
                    let model = self.models.get(&spec.model_id).map(|m| m.clone());
                    let msg = pb::coordinator_message::Msg::Assign(pb::Assign {
                        job_id: job.0.clone(),
                        attempt,
                        spec: Some(spec.as_ref().into()),
                        model: model.map(Into::into),
                        queued_s: queued_ms as f64 / 1000.0,
                    });
                    info!(job_id = %job, worker_id = %worker, attempt, tier = tier.as_str(), "assigned");
                    crate::metrics::coord().job_assigned(&job, tier);
                    self.publish(
                        &job,
                        now,
                        JobEventKind::Assigned {
                            worker: worker.clone(),
                            tier,
                            attempt,
                        },
                    );
                    if !self.send(&worker, msg) {
                        work.extend(s.disconnect(&worker, "could not be reached", false, now));
                    }
                }
                Effect::Cancel {
                    worker,
                    job,
                    attempt,
                } => {
                    info!(job_id = %job, worker_id = %worker, attempt, "cancel sent");
                    let msg = pb::coordinator_message::Msg::Cancel(pb::Cancel {
                        job_id: job.0.clone(),
                        attempt,
                    });
                    if !self.send(&worker, msg) {
                        work.extend(s.disconnect(&worker, "could not be reached", false, now));
                    }
                }
                Effect::Prefetch { worker, model } => {
                    let Some(m) = self.models.get(&model).map(|m| m.clone()) else {
                        continue;
                    };
                    info!(worker_id = %worker, model_id = %model, "prefetch");
                    let msg = pb::coordinator_message::Msg::Prefetch(pb::Prefetch {
                        models: vec![m.into()],
                    });
                    if !self.send(&worker, msg) {
                        work.extend(s.disconnect(&worker, "could not be reached", false, now));
                    }
                }
                Effect::Requeued {
                    job,
                    next_attempt,
                    reason,
                } => {
                    warn!(job_id = %job, next_attempt, %reason, "requeued");
                    crate::metrics::coord().requeues.inc();
                    self.update(&job, now, |r| {
                        r.state = JobState::Queued;
                        r.worker = None;
                        r.tier = None;
                        r.error = reason.clone();
                    });
                    self.publish(
                        &job,
                        now,
                        JobEventKind::Requeued {
                            reason,
                            next_attempt,
                        },
                    );
                }
                Effect::Failed { job, reason } => {
                    warn!(job_id = %job, %reason, "failed");
                    crate::metrics::coord().job_failed(&job, &reason);
                    self.update(&job, now, |r| {
                        r.state = JobState::Failed;
                        r.error = reason.clone();
                    });
                    self.publish(&job, now, JobEventKind::Failed { reason });
                }
            }
        }
    }

    /// Sends to a worker; false when it cannot be reached.
    fn send(&self, worker: &WorkerId, msg: pb::coordinator_message::Msg) -> bool {
        let Some(link) = self.links.get(worker) else {
            return false;
        };
        let ok = link
            .tx
            .try_send(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
            .is_ok();
        drop(link);
        if ok {
            crate::metrics::coord().messages_sent.inc();
        } else {
            warn!(worker_id = %worker, "outbound channel closed or full; dropping the worker");
            self.links.remove(worker);
        }
        ok
    }

    /// Changes a job's record; returns its spec, or `None` if unknown.
    fn update(
        &self,
        job: &JobId,
        now: Millis,
        f: impl FnOnce(&mut JobRecord),
    ) -> Option<Arc<JobSpec>> {
        let mut slot = self.jobs.get_mut(job)?;
        f(&mut slot.record);
        slot.record.updated_ms = now;
        self.durable.mark(job);
        Some(slot.record.spec.clone())
    }

    fn publish(&self, job: &JobId, now: Millis, kind: JobEventKind) {
        if let Some(mut slot) = self.jobs.get_mut(job) {
            let terminal = matches!(
                kind,
                JobEventKind::Completed(_) | JobEventKind::Failed { .. } | JobEventKind::Cancelled
            );
            if let Some(tx) = &slot.events {
                // Watchers that went away are fine.
                let _ = tx.send(JobEvent {
                    job_id: job.clone(),
                    at_ms: now,
                    kind,
                });
            }
            if terminal {
                // Later watchers see the final state in their snapshot.
                slot.events = None;
            }
        }
    }

    // ---- jobs ------------------------------------------------------------

    /// Accepts a validated job. Returns its record and whether an earlier
    /// job with the same idempotency key was returned instead.
    pub fn submit(&self, spec: JobSpec) -> Result<(JobRecord, bool)> {
        self.submit_as("", spec)
    }

    /// `submit` for `client`, who owns the job; idempotency keys are per
    /// client. Use `submit_durable` to answer only once it is on disk.
    pub fn submit_as(&self, client: &str, spec: JobSpec) -> Result<(JobRecord, bool)> {
        let key = journal::scoped_key(client, &spec.idempotency_key).unwrap_or_default();
        let id = JobId(format!("j-{}", uuid::Uuid::new_v4().simple()));
        let spec = Arc::new(spec);
        // Everything under the scheduler lock, so that two submissions with
        // one idempotency key cannot both be accepted.
        let earlier = self.with_sched(|s, now| {
            if !key.is_empty() {
                if let Some(id) = self.idempotency.get(&key).map(|e| e.clone()) {
                    return Ok((Some(id), Vec::new()));
                }
            }
            if s.job_count() >= self.cfg.limits.max_unfinished_jobs {
                return Err(Error::ResourceExhausted(format!(
                    "{} jobs are unfinished, the configured maximum (limits.max_unfinished_jobs)",
                    s.job_count()
                )));
            }
            self.durable.admit(client, &self.cfg.limits)?;
            let record = JobRecord {
                id: id.clone(),
                spec: spec.clone(),
                state: JobState::Queued,
                attempt: 0,
                worker: None,
                tier: None,
                created_ms: now,
                updated_ms: now,
                error: String::new(),
                output: None,
            };
            self.durable.own(&id, client);
            self.jobs.insert(
                id.clone(),
                JobSlot {
                    record,
                    events: None,
                },
            );
            crate::metrics::coord().job_accepted(&id);
            match s.submit(id.clone(), spec.clone(), now) {
                Ok(effects) => {
                    if !key.is_empty() {
                        self.idempotency.insert(key.clone(), id.clone());
                    }
                    Ok((None, effects))
                }
                Err(err) => {
                    crate::metrics::coord().job_rejected(&id);
                    self.jobs.remove(&id);
                    self.durable.disown(&id);
                    Err(err)
                }
            }
        })?;
        if let Some(earlier) = earlier {
            return Ok((self.get(&earlier)?, true));
        }
        info!(job_id = %id, model_id = %spec.model_id, "accepted");
        Ok((self.get(&id)?, false))
    }

    pub fn get(&self, id: &JobId) -> Result<JobRecord> {
        self.jobs
            .get(id)
            .map(|s| s.record.clone())
            .ok_or_else(|| Error::UnknownJob(id.clone()))
    }

    /// Seconds until a queued job is estimated to start (0 once started or
    /// when no worker could start it yet).
    pub fn estimated_start_s(&self, id: &JobId) -> f64 {
        let now = self.now_ms();
        self.sched()
            .estimate_start_ms(id, now)
            .map_or(0.0, |ms| ms as f64 / 1000.0)
    }

    /// The record now and a receiver of later events.
    pub fn watch(&self, id: &JobId) -> Result<(JobRecord, broadcast::Receiver<JobEvent>)> {
        let mut slot = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| Error::UnknownJob(id.clone()))?;
        let rx = if slot.record.state.is_terminal() {
            // Nothing more will happen: a receiver that ends at once.
            broadcast::channel(1).1
        } else {
            slot.events
                .get_or_insert_with(|| broadcast::channel(256).0)
                .subscribe()
        };
        Ok((slot.record.clone(), rx))
    }

    pub fn cancel(&self, id: &JobId) -> Result<JobRecord> {
        let state = self.get(id)?.state;
        if state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is already {}",
                state.as_str()
            )));
        }
        self.with_sched(|s, now| {
            let effects = s.cancel(id, now)?;
            self.update(id, now, |r| r.state = JobState::Cancelled);
            self.publish(id, now, JobEventKind::Cancelled);
            Ok(((), effects))
        })?;
        info!(job_id = %id, "cancelled");
        crate::metrics::coord().job_cancelled(id);
        self.get(id)
    }

    /// Jobs matching the filters (`owner`: submitted by that client),
    /// ordered by creation, after `after` (a job id).
    pub fn list(
        &self,
        state: Option<JobState>,
        model: Option<&ModelId>,
        owner: Option<&str>,
        after: Option<&JobId>,
        limit: usize,
    ) -> (Vec<JobRecord>, Option<JobId>) {
        let mut all: Vec<JobRecord> = self
            .jobs
            .iter()
            .filter(|s| state.is_none_or(|st| s.record.state == st))
            .filter(|s| model.is_none_or(|m| &s.record.spec.model_id == m))
            .filter(|s| owner.is_none_or(|o| self.owner(&s.record.id).as_deref() == Some(o)))
            .map(|s| s.record.clone())
            .collect();
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        let start = match after {
            Some(a) => all
                .iter()
                .position(|r| &r.id == a)
                .map_or(all.len(), |i| i + 1),
            None => 0,
        };
        let page: Vec<JobRecord> = all.into_iter().skip(start).take(limit + 1).collect();
        if page.len() > limit {
            let mut page = page;
            page.truncate(limit);
            let next = page.last().map(|r| r.id.clone());
            (page, next)
        } else {
            (page, None)
        }
    }

    // ---- workers ---------------------------------------------------------

    /// A worker said hello on a new stream. Returns the connection id that
    /// later calls for this stream must present.
    fn worker_connected(&self, mut hello: WorkerHello, tx: WorkerTx) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let id = hello.worker_id.clone();
        info!(worker_id = %id, conn, slots = hello.max_concurrent_jobs, "worker connected");
        let rejected = self.vet_reported(&mut hello);
        crate::metrics::coord().workers_connected.inc();
        let reported: Vec<RunningJob> = hello.state.running_jobs.clone();
        let _ = self.with_sched(|s, now| {
            // Replace any older stream first, so its effects go nowhere.
            self.links.insert(id.clone(), WorkerLink { conn, tx });
            let mut effects = self.refuse_reported(s, &id, &rejected, now);
            effects.extend(s.connect(hello, now));
            // Attempts the worker kept across a dropped stream run on.
            for r in &reported {
                let kept = s
                    .job(&r.job_id)
                    .is_some_and(|j| j.worker.as_ref() == Some(&id) && j.attempt == r.attempt);
                if kept {
                    info!(job_id = %r.job_id, worker_id = %id, "attempt kept across reconnect");
                    self.update(&r.job_id, now, |rec| {
                        rec.state = JobState::Running;
                        rec.worker = Some(id.clone());
                        rec.attempt = r.attempt;
                        rec.error.clear();
                    });
                }
            }
            Ok(((), effects))
        });
        conn
    }

    /// Ends every worker's response stream (at shutdown); workers reconnect.
    pub fn close_worker_streams(&self) {
        info!(workers = self.links.len(), "closing worker streams");
        self.links.clear();
    }

    fn is_current(&self, worker: &WorkerId, conn: u64) -> bool {
        self.links.get(worker).is_some_and(|l| l.conn == conn)
    }

    /// The stream `conn` of `worker` ended (`graceful`: after GoingAway).
    fn worker_gone(&self, worker: &WorkerId, conn: u64, reason: &str, graceful: bool) {
        if self
            .links
            .remove_if(worker, |_, l| l.conn == conn)
            .is_none()
        {
            return; // a newer stream replaced this one, or it was dropped already
        }
        info!(worker_id = %worker, reason, graceful, "worker gone");
        crate::metrics::coord().workers_disconnected.inc();
        let _ = self.with_sched(|s, now| Ok(((), s.disconnect(worker, reason, graceful, now))));
    }

    /// One message from a worker's stream. Errors are the worker's fault
    /// (stale or foreign job ids): the caller logs them and goes on.
    fn worker_message(
        &self,
        worker: &WorkerId,
        conn: u64,
        msg: pb::worker_message::Msg,
    ) -> Result<()> {
        use pb::worker_message::Msg;
        crate::metrics::coord().messages_received.inc();
        if !self.is_current(worker, conn) {
            return Err(Error::FailedPrecondition(
                "message on a replaced stream".into(),
            ));
        }
        match msg {
            Msg::Hello(_) => Err(Error::invalid("msg", "Hello may only be sent once")),
            Msg::Heartbeat(h) => {
                let report = CacheReport::try_from(h)?;
                self.with_sched(|s, now| Ok(((), s.heartbeat(worker, report, now)?)))
            }
            Msg::Progress(p) => {
                let job = crate::convert::job_id(p.job_id.clone())?;
                let phase = crate::convert::job_phase(&p)?;
                let now = self.now_ms();
                {
                    let mut s = self.sched();
                    s.touch(worker, now);
                    s.check_current(worker, &job, p.attempt)?;
                }
                let kind = match phase {
                    JobPhase::Downloading {
                        bytes_done,
                        bytes_total,
                    } => JobEventKind::Downloading {
                        bytes_done,
                        bytes_total,
                    },
                    JobPhase::Loading => JobEventKind::Loading,
                    JobPhase::Denoising { step, total_steps } => {
                        JobEventKind::Progress { step, total_steps }
                    }
                };
                self.publish(&job, now, kind);
                Ok(())
            }
            Msg::Result(r) => {
                let job = crate::convert::job_id(r.job_id)?;
                let timings: Timings = r.timings.map(Into::into).unwrap_or_default();
                let output = Arc::new(JobOutput {
                    images: r.images,
                    timings,
                    worker_id: worker.clone(),
                });
                self.with_sched(|s, now| {
                    let effects = s.complete(worker, &job, r.attempt, now)?;
                    self.update(&job, now, |rec| {
                        rec.state = JobState::Completed;
                        rec.output = Some(output.clone());
                        rec.error.clear();
                    });
                    self.publish(&job, now, JobEventKind::Completed(output));
                    Ok(((), effects))
                })?;
                info!(job_id = %job, worker_id = %worker, tier = timings.tier.map_or("?", |t| t.as_str()), "completed");
                self.observe_completed(&job, &timings);
                Ok(())
            }
            Msg::Failed(f) => {
                let job = crate::convert::job_id(f.job_id)?;
                warn!(job_id = %job, worker_id = %worker, attempt = f.attempt, reason = %f.reason, retryable = f.retryable, "attempt failed");
                crate::metrics::coord().attempt_failed(&f.reason);
                self.with_sched(|s, now| {
                    Ok((
                        (),
                        s.fail(worker, &job, f.attempt, &f.reason, f.retryable, now)?,
                    ))
                })
            }
            Msg::PrefetchFailed(p) => {
                warn!(worker_id = %worker, model_id = %p.model_id, reason = %p.reason, "prefetch failed");
                Ok(())
            }
            Msg::GoingAway(g) => {
                self.worker_gone(worker, conn, &format!("went away: {}", g.reason), true);
                Ok(())
            }
        }
    }

    // ---- catalogue -------------------------------------------------------

    pub fn register_model(&self, m: ModelManifest) -> ModelManifest {
        let bytes = m.total_bytes();
        let _ = self.with_sched(|s, _| {
            s.register_model(m.id.clone(), bytes);
            self.models.insert(m.id.clone(), m.clone());
            self.record_model(&m);
            Ok(((), Vec::new()))
        });
        info!(model_id = %m.id, bytes, files = m.files.len(), "model registered");
        m
    }

    pub fn remove_model(&self, id: &ModelId) -> Result<()> {
        self.with_sched(|s, _| {
            s.remove_model(id)?;
            self.models.remove(id);
            self.forget_model(id);
            Ok(((), Vec::new()))
        })
    }

    pub fn models(&self) -> Vec<ModelManifest> {
        let mut v: Vec<ModelManifest> = self.models.iter().map(|m| m.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn has_model(&self, id: &ModelId) -> bool {
        self.models.contains_key(id)
    }

    /// Operator request: have `replicas` workers hold `model` on disk.
    pub fn warm(&self, model: &ModelId, replicas: u32) -> Result<(Vec<WorkerId>, Vec<WorkerId>)> {
        self.with_sched(|s, _| {
            let (effects, holders) = s.warm(model, replicas)?;
            let told = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Prefetch { worker, .. } => Some(worker.clone()),
                    _ => None,
                })
                .collect();
            Ok(((told, holders), effects))
        })
    }

    pub fn workers_pb(&self) -> Vec<pb::WorkerInfo> {
        let now = self.now_ms();
        self.sched()
            .workers()
            .map(|w| crate::convert::worker_to_pb(w, now))
            .collect()
    }

    pub fn cluster_status(&self) -> pb::ClusterStatusResponse {
        let now = self.now_ms();
        let s = self.sched();
        let targets: std::collections::BTreeMap<ModelId, (f64, u32)> = s
            .replica_targets(now)
            .into_iter()
            .map(|t| (t.model, (t.rate_per_s, t.target)))
            .collect();
        let models: Vec<pb::ModelStatus> = s
            .model_status()
            .into_iter()
            .map(|m| {
                let (demand, target) = targets.get(&m.model).copied().unwrap_or_default();
                let bytes = self.models.get(&m.model).map_or(0, |e| e.total_bytes());
                pb::ModelStatus {
                    model_id: m.model.0,
                    queued_jobs: m.queued,
                    running_jobs: m.running,
                    workers_vram: m.workers_vram,
                    workers_disk: m.workers_disk,
                    workers_downloading: m.workers_downloading,
                    demand_per_s: demand,
                    replica_target: target,
                    bytes,
                }
            })
            .collect();
        pb::ClusterStatusResponse {
            workers: s.workers().count() as u32,
            queued_jobs: models.iter().map(|m| m.queued_jobs).sum(),
            running_jobs: models.iter().map(|m| m.running_jobs).sum(),
            models,
        }
    }
}
