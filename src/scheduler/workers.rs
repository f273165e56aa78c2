//! A worker's life: connect (or reconnect), heartbeat, touch, drain,
//! disconnect and expiry, and the admin's `warm`.
//!
//! Expiry reads a set of workers ordered by the `last_seen_ms` they were
//! filed under. `touch` and `heartbeat` only update `last_seen_ms` (O(1));
//! `expire_workers` looks at the stalest filing first and refiles a worker
//! seen since, so each tick costs O(log n) per worker heard from since the
//! last refile, and nothing when nobody is late.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::ids::Wix;
use super::state::WorkerEntry;
use super::{Effect, Scheduler};
use crate::error::{Error, Result};
use crate::types::{CacheReport, JobId, Millis, ModelId, RunningJob, WorkerHello, WorkerId};

impl Scheduler {
    /// A worker connected (or reconnected) and said hello. Attempts it
    /// reports running are kept if they were not reassigned meanwhile;
    /// others are cancelled on the worker.
    pub fn connect(&mut self, hello: WorkerHello, now: Millis) -> Vec<Effect> {
        self.advance(now);
        let id = hello.worker_id.clone();
        let mut effects = Vec::new();
        if self.worker_ids.contains_key(&id) {
            // A second stream for the same id replaces the first.
            effects.extend(self.disconnect(&id, "replaced by a new connection", false, now));
        }
        let reported = hello.state.running_jobs.clone();
        let wix = self.add_worker(hello, now);
        for RunningJob { job_id, attempt } in reported {
            let keep = match self.job(&job_id) {
                Some(j) if j.worker.is_none() && j.attempt == attempt => true,
                Some(j) => j.worker.as_ref() == Some(&id) && j.attempt == attempt,
                None => false,
            };
            if !keep {
                effects.push(Effect::Cancel {
                    worker: id.clone(),
                    job: job_id,
                    attempt,
                });
                continue;
            }
            let jix = self.job_ix(&job_id).expect("checked");
            if self.jobs[jix].on.is_none() {
                self.dequeue(jix);
                let j = &mut self.jobs[jix];
                // The lost attempt was not lost after all.
                j.failures = j.failures.saturating_sub(1);
                self.models[j.model as usize].running += 1;
            }
            let expected = self.expected_run_ms(&self.workers[wix], &self.jobs[jix]);
            let j = &mut self.jobs[jix];
            j.worker = Some(id.clone());
            j.on = Some(wix);
            j.started_ms.get_or_insert(now);
            j.expected_ms = expected;
            self.workers[wix].running.insert(job_id, attempt);
        }
        self.place(wix);
        effects.extend(self.schedule_among(&[wix], true, false, now));
        effects
    }

    /// A heartbeat: the worker's full cache state.
    pub fn heartbeat(
        &mut self,
        worker: &WorkerId,
        report: CacheReport,
        now: Millis,
    ) -> Result<Vec<Effect>> {
        let wix = self
            .worker_ix(worker)
            .ok_or_else(|| Error::UnknownWorker(worker.clone()))?;
        self.advance(now);
        let w = &mut self.workers[wix];
        w.last_seen_ms = now;
        // Cancelled attempts the worker no longer runs free their slot.
        let still: BTreeSet<&JobId> = report.running_jobs.iter().map(|r| &r.job_id).collect();
        w.stopping.retain(|j| still.contains(j));
        w.draining |= report.draining;
        self.set_report(wix, report);
        Ok(self.schedule_among(&[wix], false, true, now))
    }

    /// Marks a worker as seen (any message counts). O(1).
    pub fn touch(&mut self, worker: &WorkerId, now: Millis) {
        if let Some(w) = self.worker_ix(worker) {
            self.workers[w].last_seen_ms = now;
        }
    }

    /// Stops assigning to a worker; its running jobs finish.
    pub fn drain(&mut self, worker: &WorkerId) -> Result<()> {
        let wix = self
            .worker_ix(worker)
            .ok_or_else(|| Error::UnknownWorker(worker.clone()))?;
        self.workers[wix].draining = true;
        self.place(wix);
        Ok(())
    }

    /// A worker is gone. `graceful`: it said GoingAway, so its unfinished
    /// attempts do not count as failures. Its requeued jobs are matched by
    /// a full pass (a worker's loss is rare next to a job's events).
    pub fn disconnect(
        &mut self,
        worker: &WorkerId,
        reason: &str,
        graceful: bool,
        now: Millis,
    ) -> Vec<Effect> {
        self.advance(now);
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
        let Some(wix) = self.worker_ix(worker) else {
            return Vec::new();
        };
        let w = self.remove_worker(wix);
        if !graceful {
            self.repl.record_loss(now, &self.cfg);
        }
        let mut effects = Vec::new();
        for (job, attempt) in w.running {
            // Attempts still current here (the worker's id is gone from the
            // name index, its jobs still point at it).
            let current = self
                .job_ix(&job)
                .filter(|&j| self.jobs[j].on == Some(wix) && self.jobs[j].attempt == attempt);
            if let Some(jix) = current {
                let why = format!("worker {worker} {reason}");
                effects.extend(self.requeue_or_fail(jix, &why, true, !graceful));
            }
        }
        effects
    }

    /// Removes workers silent for longer than the heartbeat timeout.
    pub fn expire_workers(&mut self, now: Millis) -> Vec<Effect> {
        self.expire_workers_listed(now).1
    }

    /// `expire_workers`, also naming the workers it removed (stalest
    /// first), so the caller can close their streams.
    pub fn expire_workers_listed(&mut self, now: Millis) -> (Vec<WorkerId>, Vec<Effect>) {
        self.advance(now);
        let timeout = self.cfg.heartbeat_timeout_ms;
        let mut dead = Vec::new();
        while let Some(&(filed, wix)) = self.deadlines.first() {
            if now.saturating_sub(filed) <= timeout {
                // Everyone was seen at or after this filing: none is late.
                break;
            }
            self.deadlines.remove(&(filed, wix));
            let w = &mut self.workers[wix];
            if w.last_seen_ms != filed {
                // Seen since it was filed: file it again as last seen.
                w.deadline_key = w.last_seen_ms;
                self.deadlines.insert((w.last_seen_ms, wix));
                continue;
            }
            dead.push(w.hello.worker_id.clone());
        }
        if dead.is_empty() {
            return (dead, Vec::new());
        }
        let mut effects = Vec::new();
        for id in &dead {
            effects.extend(self.drop_worker(id, "missed its heartbeats", false, now));
        }
        effects.extend(self.schedule(now));
        (dead, effects)
    }

    /// Tells up to `replicas` workers in total to hold `model` on disk:
    /// those that already hold it count; the rest are chosen among those
    /// with the most free disk. Returns the prefetches and current holders.
    /// An admin's command: it looks at every worker.
    pub fn warm(&mut self, model: &ModelId, replicas: u32) -> Result<(Vec<Effect>, Vec<WorkerId>)> {
        let m = self
            .model_ix(model)
            .filter(|&m| self.entry(m).is_some())
            .ok_or_else(|| Error::UnknownModel(model.clone()))?;
        let bytes = self.model_bytes(m);
        let mut holders: Vec<WorkerId> = self.models[m as usize]
            .holders
            .iter()
            .map(|&w| self.workers[w].hello.worker_id.clone())
            .collect();
        holders.sort();
        let mut candidates: Vec<&WorkerEntry> = self
            .workers()
            .filter(|w| {
                !w.draining
                    && w.tier(m).is_none()
                    && !w.downloading.contains_key(&m)
                    && w.can_hold(bytes)
            })
            .collect();
        candidates.sort_by_key(|w| (Reverse(w.report.free_disk_bytes), &w.hello.worker_id));
        let wanted = (replicas as usize).saturating_sub(holders.len());
        let effects = candidates
            .into_iter()
            .take(wanted)
            .map(|w| Effect::Prefetch {
                worker: w.hello.worker_id.clone(),
                model: model.clone(),
            })
            .collect();
        Ok((effects, holders))
    }

    // ---- upkeep ------------------------------------------------------------

    /// Files a new worker everywhere but in the placement index (the
    /// caller places it once its attempts are known).
    fn add_worker(&mut self, hello: WorkerHello, now: Millis) -> Wix {
        let id = hello.worker_id.clone();
        let report = hello.state.clone();
        *self.cache_sizes.entry(hello.cache_max_bytes).or_default() += 1;
        let wix = self.workers.insert(WorkerEntry {
            hello,
            report: CacheReport::default(),
            last_seen_ms: now,
            draining: false,
            running: Default::default(),
            stopping: Default::default(),
            vram: Default::default(),
            disk: Default::default(),
            downloading: Default::default(),
            speed: 1.0,
            free_at_ms: 0,
            healthy_until_ms: 0,
            placed: Default::default(),
            deadline_key: now,
        });
        self.worker_ids.insert(id, wix);
        self.deadlines.insert((now, wix));
        self.set_report(wix, report);
        wix
    }

    /// Takes a worker out of every index and forgets it.
    fn remove_worker(&mut self, wix: Wix) -> WorkerEntry {
        self.unplace(wix);
        self.file_holdings(wix, false);
        let w = self.workers.remove(wix).expect("live worker");
        self.worker_ids.remove(&w.hello.worker_id);
        self.deadlines.remove(&(w.deadline_key, wix));
        let size = w.hello.cache_max_bytes;
        if let Some(n) = self.cache_sizes.get_mut(&size) {
            *n -= 1;
            if *n == 0 {
                self.cache_sizes.remove(&size);
            }
        }
        w
    }

    /// Replaces a worker's report and keeps the holder sets in step. The
    /// caller places the worker.
    fn set_report(&mut self, wix: Wix, report: CacheReport) {
        let w = &self.workers[wix];
        // Most heartbeats repeat the holdings: skip the holder sets.
        let same = w.report.vram_models == report.vram_models
            && w.report.disk_models == report.disk_models
            && w.report.downloads.len() == report.downloads.len()
            && w.report
                .downloads
                .iter()
                .zip(&report.downloads)
                .all(|(a, b)| a.model_id == b.model_id);
        let downloading = report
            .downloads
            .iter()
            .map(|d| {
                (
                    self.intern_model(&d.model_id),
                    (d.bytes_done, d.bytes_total),
                )
            })
            .collect();
        if same {
            let w = &mut self.workers[wix];
            w.downloading = downloading;
            w.report = report;
            return;
        }
        self.file_holdings(wix, false);
        let vram = report
            .vram_models
            .iter()
            .map(|m| self.intern_model(m))
            .collect();
        let disk = report
            .disk_models
            .iter()
            .map(|d| (self.intern_model(&d.model_id), d.preloaded))
            .collect();
        let w = &mut self.workers[wix];
        w.vram = vram;
        w.disk = disk;
        w.downloading = downloading;
        w.report = report;
        self.file_holdings(wix, true);
    }
}
