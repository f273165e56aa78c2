//! Time estimates: the cost model, and how long until a job could start
//! on a worker, on the soonest holder, or anywhere.

use super::ids::Mix;
use super::state::{JobEntry, WorkerEntry};
use super::Scheduler;
use crate::types::{CacheTier, JobId, Millis};

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
    pub(super) fn model_bytes(&self, model: Mix) -> u64 {
        self.entry(model).map_or(0, |m| m.bytes)
    }

    /// Mean generation time of a model (the default until one is seen).
    pub(super) fn service_ms(&self, model: Mix) -> Millis {
        self.entry(model)
            .and_then(|m| m.service_ms)
            .map_or(self.cfg.cost.default_service_ms, |s| s as Millis)
    }

    /// Expected generation time of `model` on `w` (its learned speed).
    pub(super) fn generate_ms(&self, w: &WorkerEntry, model: Mix) -> Millis {
        (self.service_ms(model) as f64 * w.speed) as Millis
    }

    /// Milliseconds until `w` could start a job for `model` if it had it
    /// next: time until a slot frees, plus fetching, plus loading.
    pub(super) fn start_here_ms(&self, w: &WorkerEntry, model: Mix, now: Millis) -> Millis {
        let wait = if w.free_slots() > 0 || w.running.is_empty() {
            0
        } else if w.free_at_ms > now {
            w.free_at_ms - now
        } else {
            // Overdue: expected to need a while yet, so a slow worker never
            // looks free.
            self.cfg.cost.default_service_ms / 2
        };
        wait + self.start_cost_ms(w, model)
    }

    /// Fetching and loading `model` on `w`, once a slot is free.
    pub(super) fn start_cost_ms(&self, w: &WorkerEntry, model: Mix) -> Millis {
        let cost = &self.cfg.cost;
        let bytes = self.model_bytes(model);
        let fetch = match w.tier(model) {
            Some(_) => 0,
            None => {
                // One download at a time: others in progress come first.
                let left: u64 = w
                    .downloading
                    .iter()
                    .filter(|(m, _)| **m != model)
                    .map(|(_, (done, total))| total.saturating_sub(*done))
                    .sum();
                let done = w.downloading.get(&model).map_or(0, |d| d.0);
                let own = bytes.saturating_sub(done);
                cost.download_ms(own + left, w.report.download_bps)
            }
        };
        let load = if w.vram.contains(&model) {
            0
        } else {
            cost.load_ms(bytes)
        };
        fetch + load
    }

    /// How long an attempt is expected to take on `w`, from assignment:
    /// fetch and load by its tier, then generation.
    pub(super) fn expected_run_ms(&self, w: &WorkerEntry, j: &JobEntry) -> Millis {
        let cost = &self.cfg.cost;
        let bytes = self.model_bytes(j.model);
        let setup = match j.tier {
            Some(CacheTier::Vram) => 0,
            Some(CacheTier::Disk | CacheTier::Preloaded) => cost.load_ms(bytes),
            _ => cost.download_ms(bytes, w.report.download_bps) + cost.load_ms(bytes),
        };
        setup + self.service_ms(j.model)
    }

    /// Estimated milliseconds from `now` until a queued job starts: the
    /// soonest any worker could start it, a holder after the model's
    /// backlog (its whole queue, see `backlog_start_ms`) or another worker
    /// after fetching it. Read from the indexes: no worker is visited
    /// beyond a few candidates.
    pub fn estimate_start_ms(&self, job: &JobId, now: Millis) -> Option<Millis> {
        let j = self.job(job)?;
        if j.worker.is_some() {
            return Some(0);
        }
        let warm = self.backlog_start_ms(j.model, None, true, now);
        let cold = self
            .best_fetcher(j.model, false, now)
            .map_or(Millis::MAX, |(t, _)| t);
        let est = warm.min(cold);
        (est != Millis::MAX).then_some(est)
    }
}
