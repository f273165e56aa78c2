//! A job's life: submit (or restore from the journal), cancel, complete,
//! fail, and the requeue of an attempt that ended without a result.

use std::sync::Arc;

use super::{Effect, Scheduler};
use crate::error::{Error, Result};
use crate::types::{CacheTier, JobId, JobSpec, Millis, WorkerId};

use super::state::JobEntry;

impl Scheduler {
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

    pub(super) fn release_stopping(&mut self, worker: &WorkerId, job: &JobId) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.stopping.remove(job);
        }
        self.refresh_free(worker);
    }

    /// Puts a job whose attempt ended back in the queue, or ends it failed.
    pub(super) fn requeue_or_fail(
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
}
