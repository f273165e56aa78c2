//! A worker's life: connect (or reconnect), heartbeat, touch, drain,
//! disconnect and expiry, and the admin's `warm`.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::{Effect, Scheduler};
use crate::error::{Error, Result};
use crate::types::{CacheReport, JobId, Millis, ModelId, RunningJob, WorkerHello, WorkerId};

use super::state::WorkerEntry;

impl Scheduler {
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
    pub(super) fn drop_worker(
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
}
