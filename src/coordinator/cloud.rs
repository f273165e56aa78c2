//! Carries out what the cloud steward (src/cloud/steward.rs) says, once per
//! tick: deletion-cost advice and drains go to workers' channels; a worker
//! whose cloud instance is gone is removed from the scheduler (its jobs
//! requeued at once) and its stream closed. The steward gets its view from
//! the snapshot, so this takes the scheduler's lock only to act.

use tracing::warn;

use super::{Coordinator, Snapshot, ToWorker};
use crate::cloud::cost::Holding;
use crate::cloud::steward::{Action, FleetView, ModelView, WorkerView};
use crate::types::*;

impl Coordinator {
    /// A worker's Hello named its cloud machine, or named none (then any
    /// machine it announced on an earlier stream is forgotten).
    pub(super) fn cloud_hello(
        &self,
        worker: &WorkerId,
        cloud: Option<crate::cloud::CloudInstance>,
    ) {
        match cloud {
            Some(instance) => self.cloud.announce(worker, instance, self.now_ms()),
            None => self.cloud.forget(worker),
        }
    }

    /// The cloud's part of a tick (after the snapshot is refreshed).
    pub(super) fn cloud_tick(&self) {
        let now = self.now_ms();
        let Some(full) = self.cloud.wants_view(now) else {
            return;
        };
        let view = self.fleet_view(&self.snapshot(), now, full);
        for action in self.cloud.tick(&view) {
            match action {
                Action::Advise {
                    worker,
                    deletion_cost,
                } => {
                    if !self.send(&worker, ToWorker::Advice { deletion_cost }) {
                        self.unreachable(&worker);
                    }
                }
                Action::Reallocate { worker, reason } => {
                    let _ = self.with_sched(|s, _| {
                        // Gone already: nothing to drain.
                        let _ = s.drain(&worker);
                        Ok(((), Vec::new()))
                    });
                    let msg = ToWorker::Drain {
                        reason: reason.to_string(),
                        reallocate: true,
                    };
                    if !self.send(&worker, msg) {
                        self.unreachable(&worker);
                    }
                }
                Action::Lost { worker, verdict } => {
                    let reason = format!(
                        "fell silent and its SaladCloud instance is {}",
                        match &verdict {
                            crate::cloud::watch::Verdict::NotRunning(s) => s.as_str(),
                            _ => "gone",
                        }
                    );
                    warn!(worker_id = %worker, %reason, "reassigning its jobs before the heartbeat timeout");
                    let _ = self.with_sched_as(FailureKind::WorkerLost, |s, now| {
                        Ok(((), s.disconnect(&worker, &reason, false, now)))
                    });
                    // If it was only paused, it reconnects and is vetted.
                    self.links.remove(&worker);
                }
            }
        }
    }

    fn unreachable(&self, worker: &WorkerId) {
        let _ = self.with_sched_as(FailureKind::WorkerLost, |s, now| {
            Ok(((), s.disconnect(worker, "could not be reached", false, now)))
        });
    }

    /// What the steward needs from the snapshot; `full`: with what each
    /// worker holds and each model's demand (only on evaluation ticks).
    fn fleet_view(&self, snap: &Snapshot, now: Millis, full: bool) -> FleetView {
        let workers = snap
            .workers
            .iter()
            .map(|w| {
                let mut v = WorkerView {
                    worker: w.worker_id.clone(),
                    last_seen_ms: w.last_seen_ms,
                    running_jobs: w.running.len() as u32,
                    slots: w.max_concurrent_jobs,
                    download_bps: w.report.download_bps,
                    cache_max_bytes: w.cache_max_bytes,
                    draining: w.draining,
                    holds: Vec::new(),
                };
                if full {
                    let disk = w.report.disk_models.iter().map(|d| Holding {
                        model: d.model_id.clone(),
                        preloaded: d.preloaded,
                    });
                    let vram = w
                        .report
                        .vram_models
                        .iter()
                        .filter(|m| !w.report.disk_models.iter().any(|d| &d.model_id == *m))
                        .map(|m| Holding {
                            model: m.clone(),
                            preloaded: false,
                        });
                    v.holds = disk.chain(vram).collect();
                }
                v
            })
            .collect();
        let models = if full {
            snap.models
                .iter()
                .map(|m| {
                    let v = ModelView {
                        demand_per_s: m.demand_per_s,
                        replica_target: m.replica_target,
                        bytes: m.bytes,
                    };
                    (m.status.model.clone(), v)
                })
                .collect()
        } else {
            Default::default()
        };
        let p = &self.metrics.phases;
        let done = p.inference.count();
        let mean_job_s = (done > 0)
            .then(|| (p.download.sum_s() + p.load.sum_s() + p.inference.sum_s()) / done as f64);
        FleetView {
            now_ms: now,
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms(),
            workers,
            models,
            queued: snap.queued as u64,
            submitted_total: self.metrics.jobs_submitted.get(),
            mean_job_s,
        }
    }
}
