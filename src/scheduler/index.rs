//! Index upkeep: the per-model queues and their heads, the free-worker set
//! and the holders of each model, kept in step with every change.

use super::Scheduler;
use crate::types::{CacheReport, ModelId, WorkerId};

use super::state::{JobEntry, WorkerEntry};

impl Scheduler {
    pub(super) fn enqueue(&mut self, job: &JobEntry) {
        let model = &job.spec.model_id;
        let q = self.queues.entry(model.clone()).or_default();
        let old = q.first().map(|(k, _)| k.1);
        q.insert((job.key(), job.id.clone()));
        let new = q.first().map(|(k, _)| k.1);
        self.move_head(model, old, new);
        self.by_age.insert((job.seq, job.id.clone()));
    }

    pub(super) fn dequeue(&mut self, job: &JobEntry) {
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

    pub(super) fn move_head(&mut self, model: &ModelId, old: Option<u64>, new: Option<u64>) {
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
    pub(super) fn refresh_free(&mut self, id: &WorkerId) {
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
    pub(super) fn set_report(&mut self, id: &WorkerId, report: CacheReport) {
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

    pub(super) fn add_worker(&mut self, worker: WorkerEntry) {
        let id = worker.hello.worker_id.clone();
        for m in worker.held() {
            self.holders.entry(m).or_default().insert(id.clone());
        }
        self.workers.insert(id.clone(), worker);
        self.refresh_free(&id);
    }

    pub(super) fn remove_worker(&mut self, id: &WorkerId) -> Option<WorkerEntry> {
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
}
