//! Queue upkeep: each model's queue (priority, then arrival), all queued
//! jobs by age, and each non-empty queue by the age of its head. Every
//! change is O(log n); nothing here decides.

use super::ids::{Jix, Mix};
use super::Scheduler;

impl Scheduler {
    /// Files a job (not running) in its model's queue.
    pub(super) fn enqueue(&mut self, jix: Jix) {
        let j = &self.jobs[jix];
        let (m, key, seq) = (j.model, j.key(), j.seq);
        let q = &mut self.models[m as usize].queue;
        let old = q.first().map(|(k, _)| k.1);
        q.insert((key, jix));
        let new = q.first().map(|(k, _)| k.1);
        self.move_head(m, old, new);
        self.by_age.insert((seq, jix));
    }

    /// Takes a queued job out of its model's queue.
    pub(super) fn dequeue(&mut self, jix: Jix) {
        let j = &self.jobs[jix];
        let (m, key, seq) = (j.model, j.key(), j.seq);
        let q = &mut self.models[m as usize].queue;
        let old = q.first().map(|(k, _)| k.1);
        q.remove(&(key, jix));
        let new = q.first().map(|(k, _)| k.1);
        self.move_head(m, old, new);
        self.by_age.remove(&(seq, jix));
    }

    fn move_head(&mut self, model: Mix, old: Option<u64>, new: Option<u64>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.heads.remove(&(o, model));
        }
        if let Some(n) = new {
            self.heads.insert((n, model));
        }
    }

    /// The head (next job) of a model's queue.
    pub(super) fn head(&self, model: Mix) -> Option<Jix> {
        self.models[model as usize].queue.first().map(|e| e.1)
    }
}
