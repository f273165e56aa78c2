//! Scheduler state and operations.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::{Effect, SchedulerConfig};
use crate::error::{Error, Result};
use crate::types::{
    CacheReport, CacheTier, JobId, JobSpec, Millis, ModelId, RunningJob, WorkerHello, WorkerId,
};

/// Order within a model's queue: higher priority first, then oldest.
type QueueKey = (Reverse<i32>, u64);

/// The two soonest holder starts of a model, for one matching pass.
#[derive(Clone, Debug)]
struct Soonest {
    best: Millis,
    best_id: Option<WorkerId>,
    second: Millis,
}

/// What one matching pass remembers until its next assignment.
#[derive(Default)]
struct Memo {
    /// Worth filling: the pass has several workers to match.
    shared: bool,
    soonest: BTreeMap<ModelId, Soonest>,
    /// Queued models (oldest heads first) that some worker might do better
    /// to fetch than to wait for a holder.
    cold: Option<Vec<ModelId>>,
}

impl Memo {
    fn clear(&mut self) {
        self.soonest.clear();
        self.cold = None;
    }
}

/// A job that has not reached a terminal state.
#[derive(Clone, Debug)]
pub struct JobEntry {
    pub id: JobId,
    pub spec: Arc<JobSpec>,
    pub submitted_ms: Millis,
    /// Assignments so far; the running attempt's number when running.
    pub attempt: u32,
    /// Attempts that ended in a retryable failure or a lost worker.
    pub failures: u32,
    /// The worker running the current attempt, if any.
    pub worker: Option<WorkerId>,
    pub started_ms: Option<Millis>,
    seq: u64,
    /// Where the current attempt found its model, as assigned.
    tier: Option<CacheTier>,
}

impl JobEntry {
    fn key(&self) -> QueueKey {
        (Reverse(self.spec.priority), self.seq)
    }
}

/// A connected worker, as it last described itself.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    pub hello: WorkerHello,
    pub report: CacheReport,
    pub last_seen_ms: Millis,
    pub draining: bool,
    /// Attempts this worker runs, by job.
    pub running: BTreeMap<JobId, u32>,
    /// Cancelled attempts the worker has not yet confirmed stopping; they
    /// still occupy a slot.
    pub stopping: BTreeSet<JobId>,
    vram: BTreeSet<ModelId>,
    pub(super) disk: BTreeMap<ModelId, bool>,
    downloading: BTreeMap<ModelId, (u64, u64)>,
    /// Generation time here relative to the model's mean, learned.
    speed: f64,
    /// When the soonest running attempt is expected to end.
    free_at_ms: Millis,
}

impl WorkerEntry {
    fn new(hello: WorkerHello, now: Millis) -> Self {
        let mut w = Self {
            report: CacheReport::default(),
            hello,
            last_seen_ms: now,
            draining: false,
            running: BTreeMap::new(),
            stopping: BTreeSet::new(),
            vram: BTreeSet::new(),
            disk: BTreeMap::new(),
            downloading: BTreeMap::new(),
            speed: 1.0,
            free_at_ms: 0,
        };
        let state = w.hello.state.clone();
        w.set_report(state);
        w
    }

    fn set_report(&mut self, report: CacheReport) {
        self.vram = report.vram_models.iter().cloned().collect();
        self.disk = report
            .disk_models
            .iter()
            .map(|d| (d.model_id.clone(), d.preloaded))
            .collect();
        self.downloading = report
            .downloads
            .iter()
            .map(|d| (d.model_id.clone(), (d.bytes_done, d.bytes_total)))
            .collect();
        self.report = report;
    }

    pub fn free_slots(&self) -> u32 {
        let used = (self.running.len() + self.stopping.len()) as u32;
        self.hello.max_concurrent_jobs.saturating_sub(used)
    }

    /// The best tier at which this worker holds `model`, if it holds it.
    pub fn tier_of(&self, model: &ModelId) -> Option<CacheTier> {
        if self.vram.contains(model) {
            Some(CacheTier::Vram)
        } else {
            match self.disk.get(model) {
                Some(true) => Some(CacheTier::Preloaded),
                Some(false) => Some(CacheTier::Disk),
                None => None,
            }
        }
    }

    /// Every model this worker holds or is fetching.
    fn held(&self) -> BTreeSet<ModelId> {
        self.vram
            .iter()
            .chain(self.disk.keys())
            .chain(self.downloading.keys())
            .cloned()
            .collect()
    }

    pub fn is_downloading(&self, model: &ModelId) -> bool {
        self.downloading.contains_key(model)
    }

    pub(super) fn can_hold(&self, bytes: u64) -> bool {
        self.hello.cache_max_bytes >= bytes
    }
}

/// Per model: what the cluster holds and how much work waits for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStatus {
    pub model: ModelId,
    pub queued: u32,
    pub running: u32,
    pub workers_vram: u32,
    pub workers_disk: u32,
    pub workers_downloading: u32,
}

#[derive(Clone, Debug)]
pub(super) struct ModelEntry {
    pub(super) bytes: u64,
    /// Mean generation time observed, exponentially weighted.
    pub(super) service_ms: Option<f64>,
    /// Recent arrivals (see `replicate.rs`).
    pub(super) demand: super::replicate::Demand,
}

/// The scheduler. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    pub(super) cfg: SchedulerConfig,
    pub(super) models: BTreeMap<ModelId, ModelEntry>,
    jobs: HashMap<JobId, JobEntry>,
    /// Queued jobs per model.
    queues: BTreeMap<ModelId, BTreeSet<(QueueKey, JobId)>>,
    /// All queued jobs, oldest first.
    by_age: BTreeSet<(u64, JobId)>,
    pub(super) workers: BTreeMap<WorkerId, WorkerEntry>,
    next_seq: u64,
    /// Index: workers holding each model (VRAM, disk or downloading).
    pub(super) holders: BTreeMap<ModelId, BTreeSet<WorkerId>>,
    /// Index: workers that take jobs now (not draining, a free slot).
    free: BTreeSet<WorkerId>,
    /// Index: each non-empty model queue by the sequence number of its head.
    heads: BTreeSet<(u64, ModelId)>,
    /// Replication bookkeeping (see `replicate.rs`).
    pub(super) repl: super::replicate::ReplicaState,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            models: BTreeMap::new(),
            jobs: HashMap::new(),
            queues: BTreeMap::new(),
            by_age: BTreeSet::new(),
            workers: BTreeMap::new(),
            next_seq: 0,
            holders: BTreeMap::new(),
            free: BTreeSet::new(),
            heads: BTreeSet::new(),
            repl: Default::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    // ---- catalogue -------------------------------------------------------

    pub fn register_model(&mut self, model: ModelId, bytes: u64) {
        let entry = self.models.entry(model).or_insert(ModelEntry {
            bytes,
            service_ms: None,
            demand: Default::default(),
        });
        entry.bytes = bytes;
    }

    /// Removes a model from the catalogue; refused while jobs need it.
    pub fn remove_model(&mut self, model: &ModelId) -> Result<()> {
        if self.queues.get(model).is_some_and(|q| !q.is_empty())
            || self.jobs.values().any(|j| &j.spec.model_id == model)
        {
            return Err(Error::FailedPrecondition(format!(
                "model {model} has unfinished jobs; cancel them first"
            )));
        }
        self.models
            .remove(model)
            .map(|_| ())
            .ok_or_else(|| Error::UnknownModel(model.clone()))
    }

    pub fn has_model(&self, model: &ModelId) -> bool {
        self.models.contains_key(model)
    }

    // ---- jobs ------------------------------------------------------------

    /// Accepts a job into the queue and runs matching.
    pub fn submit(&mut self, id: JobId, spec: Arc<JobSpec>, now: Millis) -> Result<Vec<Effect>> {
        let model = self
            .models
            .get(&spec.model_id)
            .ok_or_else(|| Error::UnknownModel(spec.model_id.clone()))?;
        if self.jobs.contains_key(&id) {
            return Err(Error::Internal(format!("job {id} submitted twice")));
        }
        // Fail fast when no live worker could ever hold the model.
        if !self.workers.is_empty()
            && !self
                .workers
                .values()
                .any(|w| w.tier_of(&spec.model_id).is_some() || w.can_hold(model.bytes))
        {
            let largest = self
                .workers
                .values()
                .map(|w| w.hello.cache_max_bytes)
                .max()
                .unwrap_or(0);
            return Err(Error::FailedPrecondition(format!(
                "model {} needs {} bytes of disk cache but the largest cache of any live worker is {} bytes",
                spec.model_id, model.bytes, largest
            )));
        }
        let model_id = spec.model_id.clone();
        if let Some(m) = self.models.get_mut(&model_id) {
            m.demand.record(now, &self.cfg);
        }
        self.restore_job(id.clone(), spec, now, 0, 0);
        Ok(self.schedule_submitted(&id, &model_id, now))
    }

    /// Matching after a submit: the free workers holding the model first;
    /// when none holds it, the free worker that could fetch it soonest.
    fn schedule_submitted(&mut self, job: &JobId, model: &ModelId, now: Millis) -> Vec<Effect> {
        // Free holders, soonest start first; stop once the job is placed.
        let mut held: Vec<(Millis, WorkerId)> =
            self.holders.get(model).map_or_else(Vec::new, |h| {
                h.iter()
                    .filter(|w| self.free.contains(*w))
                    .filter_map(|id| {
                        let w = self.workers.get(id)?;
                        Some((
                            self.start_here_ms(w, model, now) + self.generate_ms(w, model),
                            id.clone(),
                        ))
                    })
                    .collect()
            });
        held.sort();
        let mut effects = Vec::new();
        for (_, worker) in held.into_iter().take(4) {
            effects.extend(self.schedule_among(vec![worker], false, now));
            if self.jobs.get(job).is_some_and(|j| j.worker.is_some()) {
                return effects;
            }
        }
        let still_queued = self.jobs.get(job).is_some_and(|j| j.worker.is_none());
        if still_queued && self.holders.get(model).is_none_or(|h| h.is_empty()) {
            let best = self
                .free
                .iter()
                .filter_map(|id| {
                    let w = &self.workers[id];
                    self.can_run(w, model)
                        .then(|| (self.start_here_ms(w, model, now), id.clone()))
                })
                .min();
            if let Some((_, worker)) = best {
                effects.push(self.assign(&worker, job, CacheTier::Download, now));
            }
        }
        effects
    }

    /// Puts a job back into the queue as it was (used by `submit` and by a
    /// coordinator recovering its journal).
    pub fn restore_job(
        &mut self,
        id: JobId,
        spec: Arc<JobSpec>,
        submitted_ms: Millis,
        attempt: u32,
        failures: u32,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = JobEntry {
            id: id.clone(),
            spec,
            submitted_ms,
            attempt,
            failures,
            worker: None,
            started_ms: None,
            seq,
            tier: None,
        };
        self.enqueue(&entry);
        self.jobs.insert(id, entry);
    }

    fn enqueue(&mut self, job: &JobEntry) {
        let model = &job.spec.model_id;
        let q = self.queues.entry(model.clone()).or_default();
        let old = q.first().map(|(k, _)| k.1);
        q.insert((job.key(), job.id.clone()));
        let new = q.first().map(|(k, _)| k.1);
        self.move_head(model, old, new);
        self.by_age.insert((job.seq, job.id.clone()));
    }

    fn dequeue(&mut self, job: &JobEntry) {
        let model = &job.spec.model_id;
        if let Some(q) = self.queues.get_mut(model) {
            let old = q.first().map(|(k, _)| k.1);
            q.remove(&(job.key(), job.id.clone()));
            let new = q.first().map(|(k, _)| k.1);
            if q.is_empty() {
                self.queues.remove(model);
            }
            self.move_head(model, old, new);
        }
        self.by_age.remove(&(job.seq, job.id.clone()));
    }

    fn move_head(&mut self, model: &ModelId, old: Option<u64>, new: Option<u64>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.heads.remove(&(o, model.clone()));
        }
        if let Some(n) = new {
            self.heads.insert((n, model.clone()));
        }
    }

    /// Keeps the free-worker index in step with one worker's state.
    fn refresh_free(&mut self, id: &WorkerId) {
        // When the soonest running attempt is expected to end: kept here so
        // that estimates need no per-job lookups.
        let free_at = self.workers.get(id).map(|w| {
            w.running
                .keys()
                .filter_map(|j| self.jobs.get(j))
                .map(|j| j.started_ms.unwrap_or(0) + self.expected_run_ms(w, j))
                .min()
                .unwrap_or(0)
        });
        if let (Some(w), Some(at)) = (self.workers.get_mut(id), free_at) {
            w.free_at_ms = at;
        }
        match self.workers.get(id) {
            Some(w) if !w.draining && w.free_slots() > 0 => {
                self.free.insert(id.clone());
            }
            _ => {
                self.free.remove(id);
            }
        }
    }

    /// Replaces a worker's report and keeps the holder index in step.
    fn set_report(&mut self, id: &WorkerId, report: CacheReport) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        // Most heartbeats repeat the holdings: skip the index work.
        let same = w.report.vram_models == report.vram_models
            && w.report.disk_models == report.disk_models
            && w.report.downloads.len() == report.downloads.len()
            && w.report
                .downloads
                .iter()
                .zip(&report.downloads)
                .all(|(a, b)| a.model_id == b.model_id);
        if same {
            w.downloading = report
                .downloads
                .iter()
                .map(|d| (d.model_id.clone(), (d.bytes_done, d.bytes_total)))
                .collect();
            w.report = report;
            return;
        }
        let old = w.held();
        w.set_report(report);
        let new = w.held();
        for m in old.difference(&new) {
            if let Some(h) = self.holders.get_mut(m) {
                h.remove(id);
                if h.is_empty() {
                    self.holders.remove(m);
                }
            }
        }
        for m in new.difference(&old) {
            self.holders
                .entry(m.clone())
                .or_default()
                .insert(id.clone());
        }
    }

    fn add_worker(&mut self, worker: WorkerEntry) {
        let id = worker.hello.worker_id.clone();
        for m in worker.held() {
            self.holders.entry(m).or_default().insert(id.clone());
        }
        self.workers.insert(id.clone(), worker);
        self.refresh_free(&id);
    }

    fn remove_worker(&mut self, id: &WorkerId) -> Option<WorkerEntry> {
        let w = self.workers.remove(id)?;
        for m in w.held() {
            if let Some(h) = self.holders.get_mut(&m) {
                h.remove(id);
                if h.is_empty() {
                    self.holders.remove(&m);
                }
            }
        }
        self.free.remove(id);
        Some(w)
    }

    pub fn job(&self, id: &JobId) -> Option<&JobEntry> {
        self.jobs.get(id)
    }

    /// Jobs queued or running.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn queued_len(&self) -> usize {
        self.by_age.len()
    }

    /// Cancels a job that has not finished. A queued job leaves the queue;
    /// a running one is told to stop. The job is forgotten either way.
    pub fn cancel(&mut self, id: &JobId, now: Millis) -> Result<Vec<Effect>> {
        let job = self
            .jobs
            .remove(id)
            .ok_or_else(|| Error::UnknownJob(id.clone()))?;
        let mut effects = Vec::new();
        match &job.worker {
            None => self.dequeue(&job),
            Some(w) => {
                if let Some(worker) = self.workers.get_mut(w) {
                    worker.running.remove(id);
                    worker.stopping.insert(id.clone());
                }
                effects.push(Effect::Cancel {
                    worker: w.clone(),
                    job: id.clone(),
                    attempt: job.attempt,
                });
            }
        }
        effects.extend(self.schedule(now));
        Ok(effects)
    }

    /// Checks that `worker` runs `attempt` of `job` now.
    pub fn check_current(&self, worker: &WorkerId, job: &JobId, attempt: u32) -> Result<()> {
        match self.jobs.get(job) {
            Some(j) if j.worker.as_ref() == Some(worker) && j.attempt == attempt => Ok(()),
            Some(_) => Err(Error::FailedPrecondition(format!(
                "attempt {attempt} of job {job} is not current on worker {worker}"
            ))),
            None => Err(Error::UnknownJob(job.clone())),
        }
    }

    /// A worker finished an attempt. Results of superseded attempts are
    /// refused; the caller ignores them.
    pub fn complete(
        &mut self,
        worker: &WorkerId,
        job: &JobId,
        attempt: u32,
        now: Millis,
    ) -> Result<Vec<Effect>> {
        self.release_stopping(worker, job);
        self.check_current(worker, job, attempt)?;
        let entry = self.jobs.remove(job).expect("checked above");
        if let Some(w) = self.workers.get_mut(worker) {
            w.running.remove(job);
        }
        self.refresh_free(worker);
        let load = self
            .cfg
            .cost
            .load_ms(self.model_bytes(&entry.spec.model_id));
        if let (Some(started), Some(model)) =
            (entry.started_ms, self.models.get_mut(&entry.spec.model_id))
        {
            // Generation time only: a download's length says nothing about
            // the model, and a load's is known.
            let took = now.saturating_sub(started);
            let took = match entry.tier {
                Some(CacheTier::Vram) => Some(took),
                Some(CacheTier::Disk | CacheTier::Preloaded) => Some(took.saturating_sub(load)),
                _ => None,
            };
            if let Some(took) = took {
                let took = took.max(1) as f64;
                if let (Some(s), Some(w)) = (model.service_ms, self.workers.get_mut(worker)) {
                    w.speed = (0.8 * w.speed + 0.2 * took / s.max(1.0)).clamp(0.1, 10.0);
                }
                model.service_ms = Some(match model.service_ms {
                    Some(s) => 0.8 * s + 0.2 * took,
                    None => took,
                });
            }
        }
        Ok(self.schedule_among(vec![worker.clone()], false, now))
    }

    /// A worker reports that an attempt failed.
    pub fn fail(
        &mut self,
        worker: &WorkerId,
        job: &JobId,
        attempt: u32,
        reason: &str,
        retryable: bool,
        now: Millis,
    ) -> Result<Vec<Effect>> {
        self.release_stopping(worker, job);
        self.check_current(worker, job, attempt)?;
        if let Some(w) = self.workers.get_mut(worker) {
            w.running.remove(job);
        }
        self.refresh_free(worker);
        let mut effects = self.requeue_or_fail(job, reason, retryable, true);
        effects.extend(self.schedule(now));
        Ok(effects)
    }

    fn release_stopping(&mut self, worker: &WorkerId, job: &JobId) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.stopping.remove(job);
        }
        self.refresh_free(worker);
    }

    /// Puts a job whose attempt ended back in the queue, or ends it failed.
    fn requeue_or_fail(
        &mut self,
        id: &JobId,
        reason: &str,
        retryable: bool,
        count_failure: bool,
    ) -> Vec<Effect> {
        let Some(mut job) = self.jobs.remove(id) else {
            return Vec::new();
        };
        if count_failure {
            job.failures += 1;
        }
        if !retryable || job.failures >= self.cfg.max_attempts {
            let reason = if retryable {
                format!("failed {} times; last: {reason}", job.failures)
            } else {
                reason.to_owned()
            };
            return vec![Effect::Failed {
                job: id.clone(),
                reason,
            }];
        }
        job.worker = None;
        job.started_ms = None;
        job.tier = None;
        self.enqueue(&job);
        let next_attempt = job.attempt + 1;
        self.jobs.insert(id.clone(), job);
        vec![Effect::Requeued {
            job: id.clone(),
            next_attempt,
            reason: reason.to_owned(),
        }]
    }

    // ---- workers ---------------------------------------------------------

    /// A worker connected (or reconnected) and said hello. Attempts it
    /// reports running are kept if they were not reassigned meanwhile;
    /// others are cancelled on the worker.
    pub fn connect(&mut self, hello: WorkerHello, now: Millis) -> Vec<Effect> {
        let id = hello.worker_id.clone();
        let mut effects = Vec::new();
        if self.workers.contains_key(&id) {
            // A second stream for the same id replaces the first.
            effects.extend(self.disconnect(&id, "replaced by a new connection", false, now));
        }
        let reported = hello.state.running_jobs.clone();
        let mut worker = WorkerEntry::new(hello, now);
        for RunningJob { job_id, attempt } in reported {
            let keep = match self.jobs.get(&job_id) {
                Some(j) if j.worker.is_none() && j.attempt == attempt => true,
                Some(j) => j.worker.as_ref() == Some(&id) && j.attempt == attempt,
                None => false,
            };
            if keep {
                let mut job = self.jobs.remove(&job_id).expect("checked");
                if job.worker.is_none() {
                    self.dequeue(&job);
                    // The lost attempt was not lost after all.
                    job.failures = job.failures.saturating_sub(1);
                }
                job.worker = Some(id.clone());
                job.started_ms.get_or_insert(now);
                worker.running.insert(job_id.clone(), attempt);
                self.jobs.insert(job_id, job);
            } else {
                effects.push(Effect::Cancel {
                    worker: id.clone(),
                    job: job_id,
                    attempt,
                });
            }
        }
        self.add_worker(worker);
        effects.extend(self.schedule_among(vec![id], true, now));
        effects
    }

    /// A heartbeat: the worker's full cache state.
    pub fn heartbeat(
        &mut self,
        worker: &WorkerId,
        report: CacheReport,
        now: Millis,
    ) -> Result<Vec<Effect>> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| Error::UnknownWorker(worker.clone()))?;
        w.last_seen_ms = now;
        // Cancelled attempts the worker no longer runs free their slot.
        let still: BTreeSet<&JobId> = report.running_jobs.iter().map(|r| &r.job_id).collect();
        w.stopping.retain(|j| still.contains(j));
        w.draining |= report.draining;
        self.set_report(worker, report);
        self.refresh_free(worker);
        Ok(self.schedule_among(vec![worker.clone()], false, now))
    }

    /// Marks a worker as seen (any message counts).
    pub fn touch(&mut self, worker: &WorkerId, now: Millis) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.last_seen_ms = now;
        }
    }

    /// Stops assigning to a worker; its running jobs finish.
    pub fn drain(&mut self, worker: &WorkerId) -> Result<()> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| Error::UnknownWorker(worker.clone()))?;
        w.draining = true;
        self.refresh_free(worker);
        Ok(())
    }

    /// A worker is gone. `graceful`: it said GoingAway, so its unfinished
    /// attempts do not count as failures.
    pub fn disconnect(
        &mut self,
        worker: &WorkerId,
        reason: &str,
        graceful: bool,
        now: Millis,
    ) -> Vec<Effect> {
        let mut effects = self.drop_worker(worker, reason, graceful, now);
        effects.extend(self.schedule(now));
        effects
    }

    /// Removes a worker and requeues (or fails) its attempts, without
    /// matching: callers removing several workers match once at the end,
    /// so that no job is given to a worker about to be removed.
    fn drop_worker(
        &mut self,
        worker: &WorkerId,
        reason: &str,
        graceful: bool,
        now: Millis,
    ) -> Vec<Effect> {
        let Some(w) = self.remove_worker(worker) else {
            return Vec::new();
        };
        if !graceful {
            self.repl.record_loss(now, &self.cfg);
        }
        let mut effects = Vec::new();
        for (job, attempt) in w.running {
            if self.check_current(worker, &job, attempt).is_ok() {
                let why = format!("worker {worker} {reason}");
                effects.extend(self.requeue_or_fail(&job, &why, true, !graceful));
            }
        }
        effects
    }

    /// Removes workers silent for longer than the heartbeat timeout.
    pub fn expire_workers(&mut self, now: Millis) -> Vec<Effect> {
        let dead: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.last_seen_ms) > self.cfg.heartbeat_timeout_ms)
            .map(|(id, _)| id.clone())
            .collect();
        if dead.is_empty() {
            return Vec::new();
        }
        let mut effects = Vec::new();
        for id in dead {
            effects.extend(self.drop_worker(&id, "missed its heartbeats", false, now));
        }
        effects.extend(self.schedule(now));
        effects
    }

    pub fn worker(&self, id: &WorkerId) -> Option<&WorkerEntry> {
        self.workers.get(id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// Tells up to `replicas` workers in total to hold `model` on disk:
    /// those that already hold it count; the rest are chosen among those
    /// with the most free disk. Returns the prefetches and current holders.
    pub fn warm(&mut self, model: &ModelId, replicas: u32) -> Result<(Vec<Effect>, Vec<WorkerId>)> {
        let bytes = self
            .models
            .get(model)
            .ok_or_else(|| Error::UnknownModel(model.clone()))?
            .bytes;
        let holders: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.tier_of(model).is_some() || w.is_downloading(model))
            .map(|(id, _)| id.clone())
            .collect();
        let mut candidates: Vec<(&WorkerId, &WorkerEntry)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                !w.draining
                    && w.tier_of(model).is_none()
                    && !w.is_downloading(model)
                    && w.can_hold(bytes)
            })
            .collect();
        candidates.sort_by_key(|(id, w)| (Reverse(w.report.free_disk_bytes), (*id).clone()));
        let wanted = (replicas as usize).saturating_sub(holders.len());
        let effects = candidates
            .into_iter()
            .take(wanted)
            .map(|(id, _)| Effect::Prefetch {
                worker: id.clone(),
                model: model.clone(),
            })
            .collect();
        Ok((effects, holders))
    }

    // ---- matching --------------------------------------------------------

    /// Assigns queued jobs to workers with free slots until no worker can
    /// start a job sooner than it would start elsewhere. A full pass over
    /// the free workers; operations on one worker match only that worker
    /// and the coordinator's tick runs this to catch the rest.
    pub fn schedule(&mut self, now: Millis) -> Vec<Effect> {
        if self.by_age.is_empty() {
            return Vec::new();
        }
        let free: Vec<WorkerId> = self.free.iter().cloned().collect();
        self.schedule_among(free, true, now)
    }

    /// Matching restricted to `candidates`, in the order given. `cold`:
    /// also consider models they would have to fetch (the full pass and
    /// new workers do; the frequent per-worker events leave that to the
    /// next full pass, at most a tick away).
    fn schedule_among(
        &mut self,
        candidates: Vec<WorkerId>,
        cold: bool,
        now: Millis,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut memo = Memo {
            shared: candidates.len() > 1,
            ..Memo::default()
        };
        for worker in candidates {
            loop {
                if self.by_age.is_empty() {
                    return effects;
                }
                match self.workers.get(&worker) {
                    Some(w) if !w.draining && w.free_slots() > 0 => {}
                    _ => break,
                }
                let Some((job, tier)) = self.best_job_for(&worker, cold, now, &mut memo) else {
                    break;
                };
                effects.push(self.assign(&worker, &job, tier, now));
                memo.clear();
            }
        }
        effects
    }

    fn assign(&mut self, worker: &WorkerId, job: &JobId, tier: CacheTier, now: Millis) -> Effect {
        let mut entry = self.jobs.remove(job).expect("queued job exists");
        self.dequeue(&entry);
        entry.attempt += 1;
        entry.worker = Some(worker.clone());
        entry.started_ms = Some(now);
        entry.tier = Some(tier);
        let attempt = entry.attempt;
        let queued_ms = now.saturating_sub(entry.submitted_ms);
        self.jobs.insert(job.clone(), entry);
        let w = self.workers.get_mut(worker).expect("worker exists");
        w.running.insert(job.clone(), attempt);
        self.refresh_free(worker);
        Effect::Assign {
            worker: worker.clone(),
            job: job.clone(),
            attempt,
            tier,
            queued_ms,
        }
    }

    /// The job `worker` should start now, if any. Among the heads of the
    /// model queues it could serve, those no other worker would start
    /// sooner; of these, the one with the smallest start estimate net of
    /// the time the job has already waited (so a job needing a load is not
    /// starved by a stream of jobs for the model in VRAM).
    fn best_job_for(
        &self,
        worker: &WorkerId,
        cold: bool,
        now: Millis,
        memo: &mut Memo,
    ) -> Option<(JobId, CacheTier)> {
        let w = &self.workers[worker];
        // A starving job goes to the first capable worker, unless a holder
        // of its model is making progress (then the age term below gets it
        // there; sending it to a cold worker under overload only adds
        // downloads).
        if let Some((_, oldest)) = self.by_age.first() {
            let job = &self.jobs[oldest];
            let model = &job.spec.model_id;
            if now.saturating_sub(job.submitted_ms) > self.cfg.starvation_ms
                && self.can_run(w, model)
                && (w.tier_of(model).is_some() || !self.healthy_holder(worker, model, now))
            {
                let tier = w.tier_of(&job.spec.model_id).unwrap_or(CacheTier::Download);
                return Some((oldest.clone(), tier));
            }
        }
        // Candidates: the head of each queue this worker could serve, keyed
        // by (start estimate net of age, priority, age); the age term keeps
        // a job needing a load from being starved by a stream of jobs for
        // the model in VRAM. The best whose model no other worker would
        // start sooner wins; the (costlier) check runs best-first.
        type Key = (i64, Reverse<i32>, u64);
        let key = |est: Millis, job: &JobEntry| -> Key {
            let age = now.saturating_sub(job.submitted_ms) as i64;
            (est as i64 - age, Reverse(job.spec.priority), job.seq)
        };
        let mut cands: Vec<(Key, &ModelId, Millis, CacheTier, bool)> = Vec::new();
        // Models this worker holds: taken unless another worker would start
        // the model's backlog strictly sooner.
        for (model, queue) in self.held_queues(w) {
            let here = self.start_here_ms(w, model, now);
            let head = &self.jobs[&queue.first().expect("queues are never empty").1];
            let tier = w.tier_of(model).expect("held");
            cands.push((key(here, head), model, here, tier, true));
        }
        // Models it would have to fetch, oldest demand first: only when no
        // holder would start them as soon.
        let cold_models = if cold {
            if memo.cold.is_none() {
                memo.cold = Some(self.cold_candidates(memo, now));
            }
            memo.cold.clone().unwrap_or_default()
        } else {
            Vec::new()
        };
        for model in &cold_models {
            if w.tier_of(model).is_some() || !self.can_run(w, model) {
                continue;
            }
            let here = self.start_here_ms(w, model, now);
            let head = &self.jobs[&self.queues[model].first().expect("non-empty").1];
            cands.push((key(here, head), model, here, CacheTier::Download, false));
        }
        cands.sort_by_key(|a| a.0);
        for (_, model, here, tier, held) in cands {
            if !self.sooner_elsewhere(memo, worker, model, here, held, now) {
                let head = &self.queues[model].first().expect("non-empty").1;
                return Some((head.clone(), tier));
            }
        }
        None
    }

    /// The first `cold_scan_models` queued models by head age, less those
    /// a holder starts sooner than any worker could fetch and load them.
    fn cold_candidates(&self, memo: &mut Memo, now: Millis) -> Vec<ModelId> {
        let fastest = self
            .free
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.report.download_bps)
            .max()
            .unwrap_or(0);
        let nobody = WorkerId::default();
        self.heads
            .iter()
            .take(self.cfg.cold_scan_models)
            .map(|(_, m)| m)
            .filter(|m| {
                let bytes = self.model_bytes(m);
                let best_cold =
                    self.cfg.cost.download_ms(bytes, fastest) + self.cfg.cost.load_ms(bytes);
                !self.sooner_elsewhere(memo, &nobody, m, best_cold, false, now)
            })
            .cloned()
            .collect()
    }

    fn held_queues<'a>(
        &'a self,
        w: &'a WorkerEntry,
    ) -> impl Iterator<Item = (&'a ModelId, &'a BTreeSet<(QueueKey, JobId)>)> + 'a {
        // Walk whichever is shorter: the worker's models or the queues.
        let by_worker = w.vram.len() + w.disk.len() <= self.queues.len();
        let mine = by_worker.then(|| {
            w.vram
                .iter()
                .chain(w.disk.keys().filter(|m| !w.vram.contains(*m)))
                .filter_map(|m| self.queues.get(m).map(|q| (m, q)))
        });
        let queued =
            (!by_worker).then(|| self.queues.iter().filter(|(m, _)| w.tier_of(m).is_some()));
        mine.into_iter()
            .flatten()
            .chain(queued.into_iter().flatten())
    }

    pub(super) fn can_run(&self, w: &WorkerEntry, model: &ModelId) -> bool {
        w.tier_of(model).is_some() || self.models.get(model).is_some_and(|m| w.can_hold(m.bytes))
    }

    pub(super) fn model_bytes(&self, model: &ModelId) -> u64 {
        self.models.get(model).map_or(0, |m| m.bytes)
    }

    pub(super) fn service_ms(&self, model: &ModelId) -> Millis {
        self.models
            .get(model)
            .and_then(|m| m.service_ms)
            .map_or(self.cfg.cost.default_service_ms, |s| s as Millis)
    }

    /// Expected generation time of `model` on `w` (its learned speed).
    fn generate_ms(&self, w: &WorkerEntry, model: &ModelId) -> Millis {
        (self.service_ms(model) as f64 * w.speed) as Millis
    }

    /// Milliseconds until `w` could start a job for `model` if it had it
    /// next: time until a slot frees, plus fetching, plus loading.
    pub(super) fn start_here_ms(&self, w: &WorkerEntry, model: &ModelId, now: Millis) -> Millis {
        let cost = &self.cfg.cost;
        let bytes = self.model_bytes(model);
        let wait = if w.free_slots() > 0 || w.running.is_empty() {
            0
        } else if w.free_at_ms > now {
            w.free_at_ms - now
        } else {
            // Overdue: expected to need a while yet, so a slow worker never
            // looks free.
            self.cfg.cost.default_service_ms / 2
        };
        let fetch = match w.tier_of(model) {
            Some(_) => 0,
            None => {
                // One download at a time: others in progress come first.
                let left: u64 = w
                    .downloading
                    .iter()
                    .filter(|(m, _)| *m != model)
                    .map(|(_, (done, total))| total.saturating_sub(*done))
                    .sum();
                let done = w.downloading.get(model).map_or(0, |d| d.0);
                let own = bytes.saturating_sub(done);
                cost.download_ms(own + left, w.report.download_bps)
            }
        };
        let load = if w.vram.contains(model) {
            0
        } else {
            cost.load_ms(bytes)
        };
        wait + fetch + load
    }

    /// Whether a worker other than `except` holding (or fetching) `model`
    /// could start the model's queued backlog sooner than `here`
    /// (`strict`: strictly sooner; else no later). Looks at no more than
    /// `holder_scan` holders, so a popular model costs a bounded time, and
    /// remembers the answer per model for one matching pass.
    fn sooner_elsewhere(
        &self,
        memo: &mut Memo,
        except: &WorkerId,
        model: &ModelId,
        here: Millis,
        strict: bool,
        now: Millis,
    ) -> bool {
        if strict && here == 0 {
            return false;
        }
        let Some(holders) = self.holders.get(model) else {
            return false;
        };
        let others = holders.len() - usize::from(holders.contains(except));
        if others == 0 {
            return false;
        }
        let queued = self.queues.get(model).map_or(1, |q| q.len()).max(1);
        let backlog = ((queued - 1) / others) as Millis * self.service_ms(model);
        if !memo.shared && !memo.soonest.contains_key(model) {
            // One worker to match: stop at the first holder that wins.
            return holders
                .iter()
                .filter(|id| *id != except)
                .take(self.cfg.holder_scan)
                .filter_map(|id| self.workers.get(id))
                .filter(|w| !w.draining)
                .any(|w| {
                    let there = self.start_here_ms(w, model, now) + backlog;
                    if strict {
                        there < here
                    } else {
                        there <= here
                    }
                });
        }
        let s = memo
            .soonest
            .entry(model.clone())
            .or_insert_with(|| self.soonest_holders(holders, now, model));
        let start = if s.best_id.as_ref() == Some(except) {
            s.second
        } else {
            s.best
        };
        if start == Millis::MAX {
            return false;
        }
        let there = start + backlog;
        if strict {
            there < here
        } else {
            there <= here
        }
    }

    /// The two soonest starts among (the first `holder_scan` of) a model's
    /// holders.
    fn soonest_holders(
        &self,
        holders: &BTreeSet<WorkerId>,
        now: Millis,
        model: &ModelId,
    ) -> Soonest {
        let mut s = Soonest {
            best: Millis::MAX,
            best_id: None,
            second: Millis::MAX,
        };
        for id in holders.iter().take(self.cfg.holder_scan) {
            let Some(w) = self.workers.get(id) else {
                continue;
            };
            if w.draining {
                continue;
            }
            let t = self.start_here_ms(w, model, now);
            if t < s.best {
                s.second = s.best;
                s.best = t;
                s.best_id = Some(id.clone());
            } else if t < s.second {
                s.second = t;
            }
        }
        s
    }

    /// How long an attempt is expected to take on `w`, from assignment:
    /// fetch and load by its tier, then generation.
    fn expected_run_ms(&self, w: &WorkerEntry, j: &JobEntry) -> Millis {
        let cost = &self.cfg.cost;
        let bytes = self.model_bytes(&j.spec.model_id);
        let setup = match j.tier {
            Some(CacheTier::Vram) => 0,
            Some(CacheTier::Disk | CacheTier::Preloaded) => cost.load_ms(bytes),
            _ => cost.download_ms(bytes, w.report.download_bps) + cost.load_ms(bytes),
        };
        setup + self.service_ms(&j.spec.model_id)
    }

    /// Whether some other holder of `model` is free, fetching it, or
    /// running a job that is not long overdue.
    fn healthy_holder(&self, except: &WorkerId, model: &ModelId, now: Millis) -> bool {
        self.holders.get(model).is_some_and(|h| {
            h.iter()
                .filter(|id| *id != except)
                .take(self.cfg.holder_scan)
                .filter_map(|id| self.workers.get(id))
                .filter(|w| !w.draining)
                .any(|w| {
                    w.free_slots() > 0
                        || w.is_downloading(model)
                        || w.running.keys().filter_map(|j| self.jobs.get(j)).any(|j| {
                            let elapsed = now.saturating_sub(j.started_ms.unwrap_or(now));
                            elapsed <= 2 * self.expected_run_ms(w, j) + 10_000
                        })
                })
        })
    }

    /// The soonest any worker other than `except` holding `model` could
    /// start the job `ahead` places into its queue (`Millis::MAX` when
    /// none holds it).
    fn start_elsewhere_ms(
        &self,
        except: &WorkerId,
        model: &ModelId,
        ahead: usize,
        now: Millis,
    ) -> Millis {
        let holders: Vec<&WorkerEntry> = self
            .holders
            .get(model)
            .into_iter()
            .flatten()
            .filter(|id| *id != except)
            .filter_map(|id| self.workers.get(id))
            .filter(|w| !w.draining)
            .collect();
        if holders.is_empty() {
            return Millis::MAX;
        }
        let queued = self.queues.get(model).map_or(0, |q| q.len()).max(ahead + 1);
        let rounds = ((queued - 1) / holders.len()) as Millis;
        let soonest = holders
            .iter()
            .map(|w| self.start_here_ms(w, model, now))
            .min()
            .unwrap_or(0);
        soonest + rounds * self.service_ms(model)
    }

    /// Estimated milliseconds from `now` until a queued job starts: the
    /// soonest any worker could start it, counting the jobs ahead of it.
    pub fn estimate_start_ms(&self, job: &JobId, now: Millis) -> Option<Millis> {
        let j = self.jobs.get(job)?;
        if j.worker.is_some() {
            return Some(0);
        }
        let model = &j.spec.model_id;
        let ahead = self
            .queues
            .get(model)
            .map_or(0, |q| q.range(..(j.key(), j.id.clone())).count());
        let none = WorkerId::from("");
        let warm = self.start_elsewhere_ms(&none, model, ahead, now);
        let cold = self
            .workers
            .values()
            .filter(|w| !w.draining && w.tier_of(model).is_none() && self.can_run(w, model))
            .map(|w| self.start_here_ms(w, model, now))
            .min()
            .unwrap_or(Millis::MAX);
        let est = warm.min(cold);
        (est != Millis::MAX).then_some(est)
    }

    /// Per model: queued and running jobs, and which workers hold it.
    pub fn model_status(&self) -> Vec<ModelStatus> {
        let mut out: BTreeMap<&ModelId, ModelStatus> = BTreeMap::new();
        for m in self.models.keys() {
            out.insert(
                m,
                ModelStatus {
                    model: m.clone(),
                    ..Default::default()
                },
            );
        }
        for (m, q) in &self.queues {
            if let Some(s) = out.get_mut(m) {
                s.queued = q.len() as u32;
            }
        }
        for j in self.jobs.values().filter(|j| j.worker.is_some()) {
            if let Some(s) = out.get_mut(&j.spec.model_id) {
                s.running += 1;
            }
        }
        for w in self.workers.values() {
            for m in &w.vram {
                if let Some(s) = out.get_mut(m) {
                    s.workers_vram += 1;
                }
            }
            for m in w.disk.keys() {
                if let Some(s) = out.get_mut(m) {
                    s.workers_disk += 1;
                }
            }
            for m in w.downloading.keys() {
                if let Some(s) = out.get_mut(m) {
                    s.workers_downloading += 1;
                }
            }
        }
        out.into_values().collect()
    }
}
