//! The scheduler's state: jobs, workers and models, the catalogue, and
//! read-only views of them. The operations live beside it, one concern per
//! file: `jobs.rs` (a job's life), `workers.rs` (a worker's life),
//! `index.rs` (the indexes kept in step with both), `matching.rs` (which
//! job goes where) and `estimate.rs` (how long things take).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::SchedulerConfig;
use crate::error::{Error, Result};
use crate::types::{
    CacheReport, CacheTier, JobId, JobSpec, Millis, ModelId, WorkerHello, WorkerId,
};

/// Order within a model's queue: higher priority first, then oldest.
pub(super) type QueueKey = (Reverse<i32>, u64);

/// A job that has not reached a terminal state.
#[derive(Clone, Debug)]
pub struct JobEntry {
    pub id: JobId,
    pub spec: Arc<JobSpec>,
    pub submitted_ms: Millis,
    /// Assignments so far; the running attempt's number when running.
    pub attempt: u32,
    /// Attempts that ended in a retryable failure or a lost worker.
    pub failures: u32,
    /// The worker running the current attempt, if any.
    pub worker: Option<WorkerId>,
    pub started_ms: Option<Millis>,
    pub(super) seq: u64,
    /// Where the current attempt found its model, as assigned.
    pub(super) tier: Option<CacheTier>,
}

impl JobEntry {
    pub(super) fn key(&self) -> QueueKey {
        (Reverse(self.spec.priority), self.seq)
    }
}

/// A connected worker, as it last described itself.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    pub hello: WorkerHello,
    pub report: CacheReport,
    pub last_seen_ms: Millis,
    pub draining: bool,
    /// Attempts this worker runs, by job.
    pub running: BTreeMap<JobId, u32>,
    /// Cancelled attempts the worker has not yet confirmed stopping; they
    /// still occupy a slot.
    pub stopping: BTreeSet<JobId>,
    pub(super) vram: BTreeSet<ModelId>,
    pub(super) disk: BTreeMap<ModelId, bool>,
    pub(super) downloading: BTreeMap<ModelId, (u64, u64)>,
    /// Generation time here relative to the model's mean, learned.
    pub(super) speed: f64,
    /// When the soonest running attempt is expected to end.
    pub(super) free_at_ms: Millis,
}

impl WorkerEntry {
    pub(super) fn new(hello: WorkerHello, now: Millis) -> Self {
        let mut w = Self {
            report: CacheReport::default(),
            hello,
            last_seen_ms: now,
            draining: false,
            running: BTreeMap::new(),
            stopping: BTreeSet::new(),
            vram: BTreeSet::new(),
            disk: BTreeMap::new(),
            downloading: BTreeMap::new(),
            speed: 1.0,
            free_at_ms: 0,
        };
        let state = w.hello.state.clone();
        w.set_report(state);
        w
    }

    pub(super) fn set_report(&mut self, report: CacheReport) {
        self.vram = report.vram_models.iter().cloned().collect();
        self.disk = report
            .disk_models
            .iter()
            .map(|d| (d.model_id.clone(), d.preloaded))
            .collect();
        self.downloading = report
            .downloads
            .iter()
            .map(|d| (d.model_id.clone(), (d.bytes_done, d.bytes_total)))
            .collect();
        self.report = report;
    }

    pub fn free_slots(&self) -> u32 {
        let used = (self.running.len() + self.stopping.len()) as u32;
        self.hello.max_concurrent_jobs.saturating_sub(used)
    }

    /// The best tier at which this worker holds `model`, if it holds it.
    pub fn tier_of(&self, model: &ModelId) -> Option<CacheTier> {
        if self.vram.contains(model) {
            Some(CacheTier::Vram)
        } else {
            match self.disk.get(model) {
                Some(true) => Some(CacheTier::Preloaded),
                Some(false) => Some(CacheTier::Disk),
                None => None,
            }
        }
    }

    /// Every model this worker holds or is fetching.
    pub(super) fn held(&self) -> BTreeSet<ModelId> {
        self.vram
            .iter()
            .chain(self.disk.keys())
            .chain(self.downloading.keys())
            .cloned()
            .collect()
    }

    pub fn is_downloading(&self, model: &ModelId) -> bool {
        self.downloading.contains_key(model)
    }

    pub(super) fn can_hold(&self, bytes: u64) -> bool {
        self.hello.cache_max_bytes >= bytes
    }
}

/// Per model: what the cluster holds and how much work waits for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStatus {
    pub model: ModelId,
    pub queued: u32,
    pub running: u32,
    pub workers_vram: u32,
    pub workers_disk: u32,
    pub workers_downloading: u32,
}

#[derive(Clone, Debug)]
pub(super) struct ModelEntry {
    pub(super) bytes: u64,
    /// Mean generation time observed, exponentially weighted.
    pub(super) service_ms: Option<f64>,
    /// Recent arrivals (see `replicate.rs`).
    pub(super) demand: super::replicate::Demand,
}

/// The scheduler. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    pub(super) cfg: SchedulerConfig,
    pub(super) models: BTreeMap<ModelId, ModelEntry>,
    pub(super) jobs: HashMap<JobId, JobEntry>,
    /// Queued jobs per model.
    pub(super) queues: BTreeMap<ModelId, BTreeSet<(QueueKey, JobId)>>,
    /// All queued jobs, oldest first.
    pub(super) by_age: BTreeSet<(u64, JobId)>,
    pub(super) workers: BTreeMap<WorkerId, WorkerEntry>,
    pub(super) next_seq: u64,
    /// Index: workers holding each model (VRAM, disk or downloading).
    pub(super) holders: BTreeMap<ModelId, BTreeSet<WorkerId>>,
    /// Index: workers that take jobs now (not draining, a free slot).
    pub(super) free: BTreeSet<WorkerId>,
    /// Index: each non-empty model queue by the sequence number of its head.
    pub(super) heads: BTreeSet<(u64, ModelId)>,
    /// Replication bookkeeping (see `replicate.rs`).
    pub(super) repl: super::replicate::ReplicaState,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            models: BTreeMap::new(),
            jobs: HashMap::new(),
            queues: BTreeMap::new(),
            by_age: BTreeSet::new(),
            workers: BTreeMap::new(),
            next_seq: 0,
            holders: BTreeMap::new(),
            free: BTreeSet::new(),
            heads: BTreeSet::new(),
            repl: Default::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    // ---- catalogue -------------------------------------------------------

    pub fn register_model(&mut self, model: ModelId, bytes: u64) {
        let entry = self.models.entry(model).or_insert(ModelEntry {
            bytes,
            service_ms: None,
            demand: Default::default(),
        });
        entry.bytes = bytes;
    }

    /// Removes a model from the catalogue; refused while jobs need it.
    pub fn remove_model(&mut self, model: &ModelId) -> Result<()> {
        if self.queues.get(model).is_some_and(|q| !q.is_empty())
            || self.jobs.values().any(|j| &j.spec.model_id == model)
        {
            return Err(Error::FailedPrecondition(format!(
                "model {model} has unfinished jobs; cancel them first"
            )));
        }
        self.models
            .remove(model)
            .map(|_| ())
            .ok_or_else(|| Error::UnknownModel(model.clone()))
    }

    pub fn has_model(&self, model: &ModelId) -> bool {
        self.models.contains_key(model)
    }

    pub fn job(&self, id: &JobId) -> Option<&JobEntry> {
        self.jobs.get(id)
    }

    /// Jobs queued or running.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn queued_len(&self) -> usize {
        self.by_age.len()
    }

    pub fn worker(&self, id: &WorkerId) -> Option<&WorkerEntry> {
        self.workers.get(id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// Per model: queued and running jobs, and which workers hold it.
    pub fn model_status(&self) -> Vec<ModelStatus> {
        let mut out: BTreeMap<&ModelId, ModelStatus> = BTreeMap::new();
        for m in self.models.keys() {
            out.insert(
                m,
                ModelStatus {
                    model: m.clone(),
                    ..Default::default()
                },
            );
        }
        for (m, q) in &self.queues {
            if let Some(s) = out.get_mut(m) {
                s.queued = q.len() as u32;
            }
        }
        for j in self.jobs.values().filter(|j| j.worker.is_some()) {
            if let Some(s) = out.get_mut(&j.spec.model_id) {
                s.running += 1;
            }
        }
        for w in self.workers.values() {
            for m in &w.vram {
                if let Some(s) = out.get_mut(m) {
                    s.workers_vram += 1;
                }
            }
            for m in w.disk.keys() {
                if let Some(s) = out.get_mut(m) {
                    s.workers_disk += 1;
                }
            }
            for m in w.downloading.keys() {
                if let Some(s) = out.get_mut(m) {
                    s.workers_downloading += 1;
                }
            }
        }
        out.into_values().collect()
    }
}
