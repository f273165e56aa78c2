//! Time estimates: the cost model, and how long until a job could start
//! on a worker, on another holder, or anywhere.

use super::state::{JobEntry, WorkerEntry};
use super::Scheduler;
use crate::types::{CacheTier, JobId, Millis, ModelId, WorkerId};

/// The cost model behind placement. Defaults follow ../shared/BENCHMARK.md.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// Download rate assumed for a worker that has not measured one. Default: 25 MB/s.
    pub default_download_bps: u64,
    /// Fixed part of loading a model into VRAM. Default: 1,500 ms.
    pub load_base_ms: Millis,
    /// Rate of loading model bytes into VRAM. Default: 1.5 GB/s.
    pub load_bps: u64,
    /// Generation time assumed before any has been observed. Default: 5,000 ms.
    pub default_service_ms: Millis,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            default_download_bps: 25_000_000,
            load_base_ms: 1_500,
            load_bps: 1_500_000_000,
            default_service_ms: 5_000,
        }
    }
}

impl CostModel {
    /// Time to fetch `bytes` at `bps` (0 = unknown: the default rate).
    pub fn download_ms(&self, bytes: u64, bps: u64) -> Millis {
        let bps = if bps == 0 {
            self.default_download_bps
        } else {
            bps
        };
        bytes.saturating_mul(1000) / bps.max(1)
    }

    /// Time to load a model of `bytes` from disk into VRAM.
    pub fn load_ms(&self, bytes: u64) -> Millis {
        self.load_base_ms + bytes.saturating_mul(1000) / self.load_bps.max(1)
    }
}

impl Scheduler {
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
    pub(super) fn generate_ms(&self, w: &WorkerEntry, model: &ModelId) -> Millis {
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

    /// How long an attempt is expected to take on `w`, from assignment:
    /// fetch and load by its tier, then generation.
    pub(super) fn expected_run_ms(&self, w: &WorkerEntry, j: &JobEntry) -> Millis {
        let cost = &self.cfg.cost;
        let bytes = self.model_bytes(&j.spec.model_id);
        let setup = match j.tier {
            Some(CacheTier::Vram) => 0,
            Some(CacheTier::Disk | CacheTier::Preloaded) => cost.load_ms(bytes),
            _ => cost.download_ms(bytes, w.report.download_bps) + cost.load_ms(bytes),
        };
        setup + self.service_ms(&j.spec.model_id)
    }

    /// The soonest any worker other than `except` holding `model` could
    /// start the job `ahead` places into its queue (`Millis::MAX` when
    /// none holds it).
    pub(super) fn start_elsewhere_ms(
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
}
