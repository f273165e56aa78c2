//! A copy of the fleet's state for read paths (ListWorkers, ClusterStatus,
//! `/metrics`, the cluster page), taken by the ticker under the scheduler's
//! lock at most every tick, so that reads never take that lock. It is at
//! most one tick old (heartbeat interval / 5, at most 1 s).
//!
//! The same pass refreshes the start estimates of queued jobs that GetJob
//! and WatchJob report.

use std::sync::Arc;

use super::Coordinator;
use crate::scheduler::ModelStatus;
use crate::types::*;

/// One worker as the scheduler last saw it.
#[derive(Clone, Debug, Default)]
pub struct WorkerSummary {
    pub worker_id: WorkerId,
    pub version: String,
    pub gpu_name: String,
    pub vram_bytes: u64,
    pub cache_max_bytes: u64,
    pub max_concurrent_jobs: u32,
    pub report: CacheReport,
    pub running: Vec<RunningJob>,
    pub last_seen_ms: Millis,
    pub draining: bool,
}

/// One model: its jobs, its holders, its demand.
#[derive(Clone, Debug, Default)]
pub struct ModelSummary {
    pub status: ModelStatus,
    pub demand_per_s: f64,
    pub replica_target: u32,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// When it was taken (scheduler clock).
    pub at_ms: Millis,
    pub workers: Vec<WorkerSummary>,
    pub models: Vec<ModelSummary>,
    pub queued: usize,
    /// Jobs the scheduler holds (queued or running).
    pub unfinished: usize,
}

impl Snapshot {
    pub fn running(&self) -> usize {
        self.workers.iter().map(|w| w.running.len()).sum()
    }
}

impl Coordinator {
    /// The latest snapshot (cheap: an `Arc`).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn refresh_snapshot(&self) {
        let now = self.now_ms();
        let queued_jobs = self.records.queued();
        let (snap, estimates) = {
            let s = self.sched();
            let targets: std::collections::BTreeMap<ModelId, (f64, u32)> = s
                .replica_targets(now)
                .into_iter()
                .map(|t| (t.model, (t.rate_per_s, t.target)))
                .collect();
            let workers = s
                .workers()
                .map(|w| WorkerSummary {
                    worker_id: w.hello.worker_id.clone(),
                    version: w.hello.version.clone(),
                    gpu_name: w.hello.gpu_name.clone(),
                    vram_bytes: w.hello.vram_bytes,
                    cache_max_bytes: w.hello.cache_max_bytes,
                    max_concurrent_jobs: w.hello.max_concurrent_jobs,
                    report: w.report.clone(),
                    running: w
                        .running
                        .iter()
                        .map(|(j, a)| RunningJob {
                            job_id: j.clone(),
                            attempt: *a,
                        })
                        .collect(),
                    last_seen_ms: w.last_seen_ms,
                    draining: w.draining,
                })
                .collect();
            let models = s
                .model_status()
                .into_iter()
                .map(|m| {
                    let (demand, target) = targets.get(&m.model).copied().unwrap_or_default();
                    let bytes = self.models.get(&m.model).map_or(0, |e| e.total_bytes());
                    ModelSummary {
                        status: m,
                        demand_per_s: demand,
                        replica_target: target,
                        bytes,
                    }
                })
                .collect();
            let estimates: Vec<(JobId, Option<Millis>)> = queued_jobs
                .into_iter()
                .map(|id| {
                    let e = s.estimate_start_ms(&id, now).map(|ms| now + ms);
                    (id, e)
                })
                .collect();
            let snap = Snapshot {
                at_ms: now,
                workers,
                models,
                queued: s.queued_len(),
                unfinished: s.job_count(),
            };
            (snap, estimates)
        };
        for (id, e) in estimates {
            self.records.set_estimate(&id, e);
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }
}
