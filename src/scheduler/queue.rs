//! Queue upkeep: each model's queue (priority, then arrival), all queued
//! jobs by age, and each non-empty queue by the age of its head. Every
//! change is O(log n); nothing here decides.

use super::ids::{Jix, Mix};
use super::state::Head;
use super::Scheduler;

impl Scheduler {
    /// Files a job (not running) in its model's queue.
    pub(super) fn enqueue(&mut self, jix: Jix) {
        let j = &self.jobs[jix];
        let (m, key, seq) = (j.model, j.key(), j.seq);
        self.models[m as usize].queue.insert((key, jix));
        self.move_head(m);
        self.by_age.insert((seq, jix));
    }

    /// Takes a queued job out of its model's queue.
    pub(super) fn dequeue(&mut self, jix: Jix) {
        let j = &self.jobs[jix];
        let (m, key, seq) = (j.model, j.key(), j.seq);
        self.models[m as usize].queue.remove(&(key, jix));
        self.move_head(m);
        self.by_age.remove(&(seq, jix));
    }

    /// Keeps the model's cached head and the heads index in step with its
    /// queue.
    fn move_head(&mut self, model: Mix) {
        let slot = &self.models[model as usize];
        let old = slot.head;
        let new = slot.queue.first().map(|&(_, jix)| {
            let j = &self.jobs[jix];
            Head {
                job: jix,
                seq: j.seq,
                priority: j.spec.priority,
                submitted_ms: j.submitted_ms,
            }
        });
        if old.map(|h| h.job) == new.map(|h| h.job) {
            return;
        }
        self.models[model as usize].head = new;
        if let Some(o) = old {
            self.heads.remove(&(o.seq, model));
        }
        if let Some(n) = new {
            self.heads.insert((n.seq, model));
        }
    }

    /// The head (next job) of a model's queue.
    pub(super) fn head(&self, model: Mix) -> Option<Head> {
        self.models[model as usize].head
    }
}
