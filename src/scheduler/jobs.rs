//! A job's life: submit (or restore from the journal), cancel, complete,
//! fail, and the requeue of an attempt that ended without a result. Each
//! operation matches only what it freed or queued (see `matching.rs`).

use std::sync::Arc;

use super::ids::{Jix, Mix, Wix};
use super::state::JobEntry;
use super::{Effect, Scheduler};
use crate::error::{Error, Result};
use crate::types::{CacheTier, JobId, JobSpec, Millis, WorkerId};

impl Scheduler {
    /// Accepts a job into the queue and runs matching.
    pub fn submit(&mut self, id: JobId, spec: Arc<JobSpec>, now: Millis) -> Result<Vec<Effect>> {
        let model = self
            .model_ix(&spec.model_id)
            .filter(|&m| self.entry(m).is_some())
            .ok_or_else(|| Error::UnknownModel(spec.model_id.clone()))?;
        if self.job_ids.contains_key(&id) {
            return Err(Error::Internal(format!("job {id} submitted twice")));
        }
        // Fail fast when no live worker could ever hold the model.
        let bytes = self.model_bytes(model);
        let largest = self.cache_sizes.last_key_value().map_or(0, |(b, _)| *b);
        if self.workers.len() > 0 && self.models[model as usize].tiered == 0 && largest < bytes {
            return Err(Error::FailedPrecondition(format!(
                "model {} needs {} bytes of disk cache but the largest cache of any live worker is {} bytes",
                spec.model_id, bytes, largest
            )));
        }
        self.advance(now);
        if let Some(m) = self.models[model as usize].entry.as_mut() {
            m.demand.record(now, &self.cfg);
        }
        let jix = self
            .insert_job(id, spec, model, now, 0, 0)
            .expect("checked above that the job is new");
        Ok(self.place_job(jix, now))
    }

    /// Puts a job back into the queue as it was (used by `submit` and by a
    /// coordinator recovering its journal). A job the scheduler already
    /// has is left as it is.
    pub fn restore_job(
        &mut self,
        id: JobId,
        spec: Arc<JobSpec>,
        submitted_ms: Millis,
        attempt: u32,
        failures: u32,
    ) {
        let model = self.intern_model(&spec.model_id);
        self.insert_job(id, spec, model, submitted_ms, attempt, failures);
    }

    fn insert_job(
        &mut self,
        id: JobId,
        spec: Arc<JobSpec>,
        model: Mix,
        submitted_ms: Millis,
        attempt: u32,
        failures: u32,
    ) -> Option<Jix> {
        if self.job_ids.contains_key(&id) {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let jix = self.jobs.insert(JobEntry {
            id: id.clone(),
            spec,
            submitted_ms,
            attempt,
            failures,
            worker: None,
            started_ms: None,
            seq,
            tier: None,
            expected_ms: 0,
            model,
            on: None,
        });
        self.job_ids.insert(id, jix);
        self.enqueue(jix);
        Some(jix)
    }

    /// Forgets a job (queued: out of its queue; running: the caller has
    /// taken it off its worker).
    fn remove_job(&mut self, jix: Jix) -> JobEntry {
        let j = &self.jobs[jix];
        if j.on.is_some() {
            self.models[j.model as usize].running -= 1;
        } else {
            self.dequeue(jix);
        }
        let j = self.jobs.remove(jix).expect("live job");
        self.job_ids.remove(&j.id);
        j
    }

    /// Cancels a job that has not finished. A queued job leaves the queue;
    /// a running one is told to stop. The job is forgotten either way.
    /// Nothing is matched: no slot frees until the worker confirms the
    /// stop (its next heartbeat), and a shorter queue makes no other
    /// worker more eligible.
    pub fn cancel(&mut self, id: &JobId, now: Millis) -> Result<Vec<Effect>> {
        let jix = self
            .job_ix(id)
            .ok_or_else(|| Error::UnknownJob(id.clone()))?;
        self.advance(now);
        let job = self.remove_job(jix);
        let mut effects = Vec::new();
        if let (Some(name), Some(w)) = (job.worker, job.on) {
            let worker = &mut self.workers[w];
            worker.running.remove(id);
            worker.stopping.insert(id.clone());
            self.place(w);
            effects.push(Effect::Cancel {
                worker: name,
                job: id.clone(),
                attempt: job.attempt,
            });
        }
        Ok(effects)
    }

    /// Checks that `worker` runs `attempt` of `job` now.
    pub fn check_current(&self, worker: &WorkerId, job: &JobId, attempt: u32) -> Result<()> {
        self.current(self.worker_ix(worker), worker, job, attempt)
            .map(|_| ())
    }

    /// `check_current` with the worker's id looked up: the ids of the
    /// worker and the job.
    fn current(
        &self,
        wix: Option<Wix>,
        worker: &WorkerId,
        job: &JobId,
        attempt: u32,
    ) -> Result<(Wix, Jix)> {
        let jix = self
            .job_ix(job)
            .ok_or_else(|| Error::UnknownJob(job.clone()))?;
        let j = &self.jobs[jix];
        match (wix, j.on) {
            (Some(w), Some(on)) if w == on && j.attempt == attempt => Ok((w, jix)),
            _ => Err(Error::FailedPrecondition(format!(
                "attempt {attempt} of job {job} is not current on worker {worker}"
            ))),
        }
    }

    /// A worker finished an attempt. Results of superseded attempts are
    /// refused; the caller ignores them. The freed worker is matched.
    pub fn complete(
        &mut self,
        worker: &WorkerId,
        job: &JobId,
        attempt: u32,
        now: Millis,
    ) -> Result<Vec<Effect>> {
        self.advance(now);
        let wix = self.release_stopping(worker, job);
        let (w, jix) = self.current(wix, worker, job, attempt)?;
        let entry = self.remove_job(jix);
        self.workers[w].running.remove(job);
        self.learn_service_time(w, &entry, now);
        Ok(self.schedule_among(&[w], false, true, now))
    }

    /// Learns the model's generation time and the worker's speed from a
    /// finished attempt: generation time only (a download's length says
    /// nothing about the model, and a load's is known).
    fn learn_service_time(&mut self, w: Wix, job: &JobEntry, now: Millis) {
        let Some(started) = job.started_ms else {
            return;
        };
        let load = self.cfg.cost.load_ms(self.model_bytes(job.model));
        let took = now.saturating_sub(started);
        let took = match job.tier {
            Some(CacheTier::Vram) => took,
            Some(CacheTier::Disk | CacheTier::Preloaded) => took.saturating_sub(load),
            _ => return,
        };
        let Some(model) = self.models[job.model as usize].entry.as_mut() else {
            return;
        };
        let took = took.max(1) as f64;
        if let Some(s) = model.service_ms {
            let worker = &mut self.workers[w];
            worker.speed = (0.8 * worker.speed + 0.2 * took / s.max(1.0)).clamp(0.1, 10.0);
        }
        model.service_ms = Some(match model.service_ms {
            Some(s) => 0.8 * s + 0.2 * took,
            None => took,
        });
    }

    /// A worker reports that an attempt failed. The freed worker is
    /// matched, then the requeued job, as after a submit.
    pub fn fail(
        &mut self,
        worker: &WorkerId,
        job: &JobId,
        attempt: u32,
        reason: &str,
        retryable: bool,
        now: Millis,
    ) -> Result<Vec<Effect>> {
        self.advance(now);
        let wix = self.release_stopping(worker, job);
        let (w, jix) = self.current(wix, worker, job, attempt)?;
        self.workers[w].running.remove(job);
        let mut effects = self.requeue_or_fail(jix, reason, retryable, true);
        effects.extend(self.schedule_among(&[w], false, true, now));
        if self.jobs.get(jix).is_some_and(|j| j.on.is_none()) {
            effects.extend(self.place_job(jix, now));
        }
        Ok(effects)
    }

    /// A cancelled attempt's end (result or failure) frees its slot.
    /// Returns the worker's id.
    fn release_stopping(&mut self, worker: &WorkerId, job: &JobId) -> Option<Wix> {
        let w = self.worker_ix(worker)?;
        if self.workers[w].stopping.remove(job) {
            self.place(w);
        }
        Some(w)
    }

    /// Puts a job whose attempt ended back in the queue, or ends it failed.
    /// The caller has taken the attempt off its worker.
    pub(super) fn requeue_or_fail(
        &mut self,
        jix: Jix,
        reason: &str,
        retryable: bool,
        count_failure: bool,
    ) -> Vec<Effect> {
        let j = &mut self.jobs[jix];
        if count_failure {
            j.failures += 1;
        }
        if !retryable || j.failures >= self.cfg.max_attempts {
            let reason = if retryable {
                format!("failed {} times; last: {reason}", j.failures)
            } else {
                reason.to_owned()
            };
            let job = self.remove_job(jix);
            return vec![Effect::Failed {
                job: job.id,
                reason,
            }];
        }
        let model = j.model;
        let was_running = j.on.take().is_some();
        j.worker = None;
        j.started_ms = None;
        j.tier = None;
        let (id, next_attempt) = (j.id.clone(), j.attempt + 1);
        if was_running {
            self.models[model as usize].running -= 1;
        }
        self.enqueue(jix);
        vec![Effect::Requeued {
            job: id,
            next_attempt,
            reason: reason.to_owned(),
        }]
    }
}
