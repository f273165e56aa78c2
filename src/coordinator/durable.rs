//! Durability of the coordinator's hard state: opening and restoring the
//! store, recording every job change in decision order, results written
//! before the completed state is committed, and the retention sweep.
//!
//! Hooks in `mod.rs` are two lines: `update` marks a job dirty, and
//! `with_sched` records the dirty jobs while the scheduler is still locked,
//! so the journal sees changes in the order they were decided. Nothing a
//! worker reports is stored: a restarted coordinator queues every unfinished
//! job again with its attempt number, and a worker that reconnects with that
//! attempt still running keeps it (`Scheduler::connect`).

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use dashmap::DashMap;
use tracing::{error, info, info_span, warn, Instrument};

use super::journal::{scoped_key, Journal, Loaded, StoredJob, StoredResult};
use super::{Coordinator, JobSlot};
use crate::config::JobLimits;
use crate::error::{Error, Result};
use crate::pb;
use crate::scheduler::Scheduler;
use crate::types::*;

/// The coordinator's durability and ownership bookkeeping.
#[derive(Default)]
pub(super) struct Durable {
    journal: OnceLock<Journal>,
    /// The client that submitted each job ("" with authentication off).
    owners: DashMap<JobId, Arc<str>>,
    /// Unfinished jobs, counted against their client.
    unfinished: DashMap<JobId, Arc<str>>,
    per_client: DashMap<Arc<str>, usize>,
    /// Jobs changed since they were last recorded.
    dirty: Mutex<Vec<JobId>>,
    /// Unfinished jobs' last assignment: (worker, attempt). Only that
    /// worker may reclaim that attempt when it reconnects.
    last_run: DashMap<JobId, (WorkerId, u32)>,
}

impl Durable {
    pub(super) fn mark(&self, id: &JobId) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
    }

    fn take_dirty(&self) -> Vec<JobId> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Refuses a job that would take `client` over its limit.
    pub(super) fn admit(&self, client: &str, limits: &JobLimits) -> Result<()> {
        let n = self.per_client.get(client).map_or(0, |n| *n);
        if n >= limits.max_unfinished_jobs_per_client {
            return Err(Error::ResourceExhausted(format!(
                "client {client:?} has {n} unfinished jobs, the configured maximum \
                 (limits.max_unfinished_jobs_per_client)"
            )));
        }
        Ok(())
    }

    /// Records who owns a new job, counts it as unfinished and marks it
    /// to be written.
    pub(super) fn own(&self, id: &JobId, client: &str) {
        self.mark(id);
        let client: Arc<str> = Arc::from(client);
        self.owners.insert(id.clone(), client.clone());
        self.unfinished.insert(id.clone(), client.clone());
        *self.per_client.entry(client).or_insert(0) += 1;
    }

    /// Forgets a job that was never accepted.
    pub(super) fn disown(&self, id: &JobId) {
        self.finished(id);
        self.owners.remove(id);
    }

    fn finished(&self, id: &JobId) {
        self.last_run.remove(id);
        if let Some((_, c)) = self.unfinished.remove(id) {
            if let Some(mut n) = self.per_client.get_mut(&c) {
                *n = n.saturating_sub(1);
            }
        }
    }

    pub(super) fn owner(&self, id: &JobId) -> Option<Arc<str>> {
        self.owners.get(id).map(|c| c.clone())
    }

    fn journal(&self) -> Option<&Journal> {
        self.journal.get()
    }
}

fn stored(r: &JobRecord, client: &str, failures: u32, last_worker: Option<WorkerId>) -> StoredJob {
    StoredJob {
        last_worker,
        id: r.id.clone(),
        client: client.to_owned(),
        spec: r.spec.as_ref().clone(),
        state: r.state,
        attempt: r.attempt,
        failures,
        worker: r.worker.clone(),
        tier: r.tier,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        error: r.error.clone(),
        result: r.output.as_ref().map(|o| StoredResult {
            images: o.images.len(),
            timings: o.timings,
            worker_id: o.worker_id.clone(),
        }),
    }
}

impl Coordinator {
    /// A coordinator whose hard state lives under `cfg.data_dir`: what the
    /// store holds is restored (unfinished jobs queued again) before it
    /// serves.
    pub fn open(
        cfg: crate::config::CoordinatorConfig,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Arc<Self>> {
        let (journal, loaded) = Journal::open(&cfg.data_dir)?;
        let c = Self::new(cfg, clock);
        c.restore(&journal, loaded);
        let _ = c.durable.journal.set(journal);
        Ok(c)
    }

    fn restore(&self, journal: &Journal, loaded: Loaded) {
        let mut s = self.sched();
        for m in loaded.models {
            s.register_model(m.id.clone(), m.total_bytes());
            self.models.insert(m.id.clone(), m);
        }
        for (k, id) in loaded.idempotency {
            self.idempotency.insert(k, id);
        }
        let (mut queued, mut was_running, mut finished) = (0usize, 0usize, 0usize);
        for sj in loaded.jobs {
            let spec = Arc::new(sj.spec.clone());
            let mut rec = JobRecord {
                id: sj.id.clone(),
                spec: spec.clone(),
                state: sj.state,
                attempt: sj.attempt,
                worker: sj.worker.clone(),
                tier: sj.tier,
                created_ms: sj.created_ms,
                updated_ms: sj.updated_ms,
                error: sj.error.clone(),
                output: None,
            };
            if sj.state.is_terminal() {
                finished += 1;
                if let (JobState::Completed, Some(r)) = (sj.state, &sj.result) {
                    match journal.read_images(&sj.id, r.images) {
                        Ok(images) => {
                            rec.output = Some(Arc::new(JobOutput {
                                images,
                                timings: r.timings,
                                worker_id: r.worker_id.clone(),
                            }))
                        }
                        Err(e) => {
                            error!(job_id = %sj.id, error = %e, "result images are missing");
                            rec.state = JobState::Failed;
                            rec.error = format!("result images were lost: {e}");
                        }
                    }
                }
                self.durable
                    .owners
                    .insert(sj.id.clone(), Arc::from(sj.client.as_str()));
            } else {
                if sj.state == JobState::Running {
                    was_running += 1;
                } else {
                    queued += 1;
                }
                // Queued again with the attempt it had: a worker that
                // reconnects with that attempt running keeps it.
                rec.state = JobState::Queued;
                rec.worker = None;
                rec.tier = None;
                if !s.has_model(&spec.model_id) {
                    // The catalogue and the job are written in order, so
                    // this is a bug; keep the job visible rather than lose it.
                    error!(job_id = %sj.id, model_id = %spec.model_id, "job of an unknown model");
                    s.register_model(spec.model_id.clone(), 0);
                }
                if let Some(w) = sj.last_worker.clone().or_else(|| sj.worker.clone()) {
                    self.durable.last_run.insert(sj.id.clone(), (w, sj.attempt));
                }
                s.restore_job(sj.id.clone(), spec, sj.created_ms, sj.attempt, sj.failures);
                self.durable.own(&sj.id, &sj.client);
            }
            self.jobs.insert(
                sj.id,
                JobSlot {
                    record: rec,
                    events: None,
                },
            );
        }
        info!(queued, was_running, finished, "state restored");
    }

    /// Records the jobs changed since the last call. Called with the
    /// scheduler locked, so records reach the journal in decision order.
    pub(super) fn persist_dirty(&self, s: &Scheduler) {
        for id in self.durable.take_dirty() {
            let failures = s.job(&id).map_or(0, |j| j.failures);
            self.persist(&id, failures);
        }
    }

    fn persist(&self, id: &JobId, failures: u32) {
        let Some(rec) = self.jobs.get(id).map(|s| s.record.clone()) else {
            return;
        };
        if rec.state.is_terminal() {
            self.durable.finished(id);
        } else if let (JobState::Running, Some(w)) = (rec.state, &rec.worker) {
            self.durable
                .last_run
                .insert(id.clone(), (w.clone(), rec.attempt));
        }
        if let Some(j) = self.durable.journal() {
            let client = self.durable.owner(id).unwrap_or_else(|| Arc::from(""));
            let last = self.durable.last_run.get(id).map(|l| l.0.clone());
            j.put_job(stored(&rec, &client, failures, last));
        }
    }

    /// Resolves once every change made so far is on disk.
    pub async fn sync(&self) -> Result<()> {
        match self.durable.journal() {
            Some(j) => j.barrier().await,
            None => Ok(()),
        }
    }

    /// Commits what is pending and closes the store (at shutdown).
    pub async fn close_store(&self) -> Result<()> {
        match self.durable.journal() {
            Some(j) => j.close().await,
            None => Ok(()),
        }
    }

    /// Accepts a job for `client` and answers once it is durable.
    pub async fn submit_durable(&self, client: &str, spec: JobSpec) -> Result<(JobRecord, bool)> {
        let out = self.submit_as(client, spec)?;
        self.sync().await?;
        Ok(out)
    }

    pub(super) fn record_model(&self, m: &ModelManifest) {
        if let Some(j) = self.durable.journal() {
            j.put_model(m.clone());
        }
    }

    pub(super) fn forget_model(&self, id: &ModelId) {
        if let Some(j) = self.durable.journal() {
            j.delete_model(id.clone());
        }
    }

    /// Who submitted a job ("" when authentication is off).
    pub fn owner(&self, id: &JobId) -> Option<Arc<str>> {
        self.durable.owner(id)
    }

    /// A worker's result. The images are written (synced) before the
    /// scheduler decides whether this attempt wins; the winner's images
    /// are renamed into place and the completed record committed before
    /// any client hears of it. A zombie's late result is refused by the
    /// scheduler and its files discarded.
    pub(super) async fn worker_result(
        self: &Arc<Self>,
        worker: &WorkerId,
        conn: u64,
        r: pb::JobResult,
    ) -> Result<()> {
        if self.durable.journal().is_none() {
            return self.worker_message(worker, conn, pb::worker_message::Msg::Result(r));
        }
        if !self.is_current(worker, conn) {
            return Err(Error::FailedPrecondition(
                "message on a replaced stream".into(),
            ));
        }
        let job = crate::convert::job_id(r.job_id)?;
        let attempt = r.attempt;
        {
            let now = self.now_ms();
            let mut s = self.sched();
            s.touch(worker, now);
            s.check_current(worker, &job, attempt)?;
        }
        let timings: Timings = r.timings.map(Into::into).unwrap_or_default();
        let n = r.images.len();
        let me = self.clone();
        let job2 = job.clone();
        let images = tokio::task::spawn_blocking(move || {
            let j = me.durable.journal().expect("checked above");
            j.write_images_tmp(&job2, attempt, &r.images)?;
            Ok::<_, Error>(r.images)
        })
        .await
        .map_err(|e| Error::Internal(format!("result writer: {e}")))??;

        let won = self.with_sched(|s, now| Ok(((), s.complete(worker, &job, attempt, now)?)));
        let me = self.clone();
        let job2 = job.clone();
        if let Err(e) = won {
            tokio::task::spawn_blocking(move || {
                if let Some(j) = me.durable.journal() {
                    j.discard_tmp_images(&job2, attempt, n);
                }
            });
            return Err(e);
        }
        let published = tokio::task::spawn_blocking(move || {
            let j = me.durable.journal().expect("checked above");
            j.publish_images(&job2, attempt, n)
        })
        .await
        .map_err(|e| Error::Internal(format!("result writer: {e}")))?;
        if let Err(e) = published {
            // The attempt won but its images could not be kept: run it again.
            error!(job_id = %job, error = %e, "could not store the result; requeueing");
            self.requeue_after_store_failure(&job, &e.to_string());
            return Err(e);
        }
        let output = Arc::new(JobOutput {
            images,
            timings,
            worker_id: worker.clone(),
        });
        let now = self.now_ms();
        let Some(mut rec) = self.jobs.get(&job).map(|s| s.record.clone()) else {
            return Err(Error::UnknownJob(job));
        };
        rec.state = JobState::Completed;
        rec.output = Some(output.clone());
        rec.error.clear();
        rec.updated_ms = now;
        if let Some(j) = self.durable.journal() {
            let client = self.durable.owner(&job).unwrap_or_else(|| Arc::from(""));
            j.put_job(stored(&rec, &client, 0, None));
        }
        if let Err(e) = self.sync().await {
            error!(job_id = %job, error = %e, "completed state not committed");
        }
        self.update(&job, now, |r| {
            r.state = JobState::Completed;
            r.output = Some(output.clone());
            r.error.clear();
        });
        self.durable.finished(&job);
        self.observe_completed(&job, &timings);
        self.publish(&job, now, JobEventKind::Completed(output));
        info!(job_id = %job, worker_id = %worker, tier = timings.tier.map_or("?", |t| t.as_str()), "completed");
        Ok(())
    }

    /// Keeps, of the attempts a reconnecting worker says it runs, only
    /// those last assigned to it (attempt numbers start at 1), at most one
    /// per slot; returns the others, which the caller cancels. Without this
    /// a worker could claim any queued job by naming it in its Hello.
    pub(super) fn vet_reported(&self, hello: &mut WorkerHello) -> Vec<RunningJob> {
        let slots = hello.max_concurrent_jobs as usize;
        let mut kept = Vec::new();
        let mut rejected = Vec::new();
        for r in std::mem::take(&mut hello.state.running_jobs) {
            let ours = r.attempt > 0
                && self
                    .durable
                    .last_run
                    .get(&r.job_id)
                    .is_some_and(|l| l.0 == hello.worker_id && l.1 == r.attempt);
            if ours && kept.len() < slots {
                kept.push(r);
            } else {
                rejected.push(r);
            }
        }
        if !rejected.is_empty() {
            warn!(worker_id = %hello.worker_id, rejected = rejected.len(), "reported attempts not assigned to this worker");
        }
        hello.state.running_jobs = kept;
        rejected
    }

    /// Cancels, on the worker, the attempts `vet_reported` refused (before
    /// anything else is sent on its new stream). One case is a crash: the
    /// worker runs attempt `n + 1` of a job the store has queued at attempt
    /// `n`, because the coordinator died after assigning it but before
    /// recording that. Such a job is queued again numbered `n + 1`, so its
    /// next assignment is `n + 2`: a number is never given out twice, and
    /// the cancelled run's late report is refused as stale.
    pub(super) fn refuse_reported(
        &self,
        s: &mut Scheduler,
        worker: &WorkerId,
        rejected: &[RunningJob],
        now: Millis,
    ) -> Vec<crate::scheduler::Effect> {
        let mut effects = Vec::new();
        for r in rejected {
            let msg = pb::coordinator_message::Msg::Cancel(pb::Cancel {
                job_id: r.job_id.0.clone(),
                attempt: r.attempt,
            });
            self.send(worker, msg);
            let Some(j) = s.job(&r.job_id) else { continue };
            if j.worker.is_some() || r.attempt != j.attempt + 1 {
                continue;
            }
            let (spec, submitted, failures) = (j.spec.clone(), j.submitted_ms, j.failures);
            if let Ok(e) = s.cancel(&r.job_id, now) {
                effects.extend(e);
            }
            s.restore_job(r.job_id.clone(), spec, submitted, r.attempt, failures);
            self.update(&r.job_id, now, |rec| rec.attempt = r.attempt);
            warn!(job_id = %r.job_id, attempt = r.attempt, "attempt was not recorded before a restart; renumbered");
        }
        effects
    }

    fn requeue_after_store_failure(&self, job: &JobId, reason: &str) {
        let _ = self.with_sched(|s, now| {
            let Some(rec) = self.jobs.get(job).map(|s| s.record.clone()) else {
                return Ok(((), Vec::new()));
            };
            s.restore_job(
                job.clone(),
                rec.spec.clone(),
                rec.created_ms,
                rec.attempt,
                0,
            );
            self.update(job, now, |r| {
                r.state = JobState::Queued;
                r.worker = None;
                r.tier = None;
                r.error = format!("result not stored: {reason}");
            });
            Ok(((), s.schedule(now)))
        });
    }

    /// Removes finished jobs (records, idempotency keys and result files)
    /// older than `result_retention_s`. Returns how many.
    pub async fn sweep_finished(&self) -> usize {
        let Some(j) = self.durable.journal() else {
            return 0;
        };
        let cutoff = self
            .now_ms()
            .saturating_sub(self.cfg.result_retention_s.saturating_mul(1000));
        let old: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|s| s.record.state.is_terminal() && s.record.updated_ms <= cutoff)
            .map(|s| s.record.id.clone())
            .collect();
        let mut removed = Vec::new();
        for id in old {
            let Some((_, slot)) = self.jobs.remove(&id) else {
                continue;
            };
            let client = self
                .durable
                .owners
                .remove(&id)
                .map_or_else(|| Arc::from(""), |(_, c)| c);
            let key = scoped_key(&client, &slot.record.spec.idempotency_key);
            if let Some(k) = &key {
                self.idempotency.remove_if(k, |_, v| v == &id);
            }
            j.delete_job(id.clone(), key);
            removed.push(id);
        }
        if removed.is_empty() {
            return 0;
        }
        // Records first, then files: a crash in between leaves files that
        // the start-up sweep removes, never a record without its images.
        if let Err(e) = j.barrier().await {
            warn!(error = %e, "retention sweep not committed");
            return 0;
        }
        let n = removed.len();
        let dir = j.results_dir().to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            for id in removed {
                let _ = std::fs::remove_dir_all(dir.join(&id.0));
            }
        })
        .await;
        info!(jobs = n, "retention sweep removed finished jobs");
        n
    }
}

impl super::Services {
    /// The services around a coordinator restored from `cfg.data_dir`.
    pub fn open(
        cfg: crate::config::CoordinatorConfig,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Self> {
        let coordinator = Coordinator::open(cfg, clock)?;
        Ok(Self {
            jobs: super::jobs::JobsService(coordinator.clone()),
            admin: super::admin::AdminService(coordinator.clone()),
            coordinator,
        })
    }
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
