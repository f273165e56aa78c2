//! The scheduler's state: jobs, workers and models, the catalogue, and
//! read-only views of them.
//!
//! The operations live beside it, one concern per file: `jobs.rs` (a job's
//! life), `workers.rs` (a worker's life), `queue.rs` and `index.rs` (the
//! indexes kept in step with both), `matching.rs` (which job goes where)
//! and `estimate.rs` (how long things take). Nothing here decides.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::ids::{Jix, Mix, Slab, Wix};
use super::index::{HolderIndex, Placed, WorkerSets};
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
    /// Arrival order; unique, kept across requeues.
    pub(super) seq: u64,
    /// Where the current attempt found its model, as assigned.
    pub(super) tier: Option<CacheTier>,
    /// How long the current attempt was expected to take when it started
    /// (estimates of when a worker frees read this, not the model's
    /// service time learned since).
    pub(super) expected_ms: Millis,
    pub(super) model: Mix,
    /// `worker`, as an index.
    pub(super) on: Option<Wix>,
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
    pub(super) vram: BTreeSet<Mix>,
    pub(super) disk: BTreeMap<Mix, bool>,
    /// Downloads in progress: bytes done and total.
    pub(super) downloading: BTreeMap<Mix, (u64, u64)>,
    /// Generation time here relative to the model's mean, learned.
    pub(super) speed: f64,
    /// When the soonest running attempt is expected to end.
    pub(super) free_at_ms: Millis,
    /// Until when the worker counts as making progress: the latest running
    /// attempt's start plus twice its expected length plus 10 s.
    pub(super) healthy_until_ms: Millis,
    /// What this worker's entries in the indexes were built from.
    pub(super) placed: Placed,
    /// The key of this worker's entry in the expiry set (`last_seen_ms`
    /// when it was filed; see `workers.rs`).
    pub(super) deadline_key: Millis,
}

impl WorkerEntry {
    pub fn free_slots(&self) -> u32 {
        let used = (self.running.len() + self.stopping.len()) as u32;
        self.hello.max_concurrent_jobs.saturating_sub(used)
    }

    /// The best tier at which this worker holds `model`, if it holds it.
    pub fn tier_of(&self, model: &ModelId) -> Option<CacheTier> {
        if self.report.vram_models.contains(model) {
            return Some(CacheTier::Vram);
        }
        let d = self
            .report
            .disk_models
            .iter()
            .find(|d| &d.model_id == model)?;
        Some(if d.preloaded {
            CacheTier::Preloaded
        } else {
            CacheTier::Disk
        })
    }

    pub fn is_downloading(&self, model: &ModelId) -> bool {
        self.report.downloads.iter().any(|d| &d.model_id == model)
    }

    /// `tier_of`, by index.
    pub(super) fn tier(&self, model: Mix) -> Option<CacheTier> {
        if self.vram.contains(&model) {
            Some(CacheTier::Vram)
        } else {
            match self.disk.get(&model) {
                Some(true) => Some(CacheTier::Preloaded),
                Some(false) => Some(CacheTier::Disk),
                None => None,
            }
        }
    }

    /// Every model this worker holds or is fetching.
    pub(super) fn held(&self) -> BTreeSet<Mix> {
        self.vram
            .iter()
            .chain(self.disk.keys())
            .chain(self.downloading.keys())
            .copied()
            .collect()
    }

    pub(super) fn can_hold(&self, bytes: u64) -> bool {
        self.hello.cache_max_bytes >= bytes
    }

    /// Bytes still to download, all downloads together.
    pub(super) fn download_left(&self) -> u64 {
        self.downloading
            .values()
            .map(|(done, total)| total.saturating_sub(*done))
            .sum()
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

/// A catalogue entry.
#[derive(Clone, Debug)]
pub(super) struct ModelEntry {
    pub(super) bytes: u64,
    /// Mean generation time observed, exponentially weighted.
    pub(super) service_ms: Option<f64>,
    /// Recent arrivals (see `replicate.rs`).
    pub(super) demand: super::replicate::Demand,
}

/// A model's next job, cached with what matching reads of it (one memory
/// access per candidate model instead of a walk down the queue and a job
/// lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) job: Jix,
    pub(super) seq: u64,
    pub(super) priority: i32,
    pub(super) submitted_ms: Millis,
}

/// Everything kept per model id, in the catalogue or not (a worker may
/// report a model the catalogue does not list). Named by `model_ids`.
#[derive(Clone, Debug)]
pub(super) struct ModelSlot {
    /// Present while the model is in the catalogue.
    pub(super) entry: Option<ModelEntry>,
    /// Queued jobs, in queue order.
    pub(super) queue: BTreeSet<(QueueKey, Jix)>,
    /// The first of `queue`.
    pub(super) head: Option<Head>,
    /// Jobs running now.
    pub(super) running: u32,
    /// Workers holding it in VRAM or on disk, or fetching it (draining ones
    /// included).
    pub(super) holders: BTreeSet<Wix>,
    /// Of `holders`: in VRAM, on disk, in VRAM or on disk, downloading.
    pub(super) in_vram: u32,
    pub(super) on_disk: u32,
    pub(super) tiered: u32,
    pub(super) fetching: u32,
    /// The live holders ordered for placement (see `index.rs`).
    pub(super) place: HolderIndex,
}

impl ModelSlot {
    fn new() -> Self {
        Self {
            entry: None,
            queue: BTreeSet::new(),
            head: None,
            running: 0,
            holders: BTreeSet::new(),
            in_vram: 0,
            on_disk: 0,
            tiered: 0,
            fetching: 0,
            place: HolderIndex::default(),
        }
    }
}

/// The scheduler. See the module docs.
#[derive(Clone, Debug)]
pub struct Scheduler {
    pub(super) cfg: SchedulerConfig,
    /// Model names to ids, in name order (catalogue views iterate this).
    pub(super) model_ids: BTreeMap<ModelId, Mix>,
    pub(super) models: Vec<ModelSlot>,
    pub(super) job_ids: HashMap<JobId, Jix>,
    pub(super) jobs: Slab<JobEntry>,
    /// Worker names to ids, in name order (`workers()` iterates this).
    pub(super) worker_ids: BTreeMap<WorkerId, Wix>,
    pub(super) workers: Slab<WorkerEntry>,
    pub(super) next_seq: u64,
    /// All queued jobs, oldest first.
    pub(super) by_age: BTreeSet<(u64, Jix)>,
    /// Each non-empty model queue by the sequence number of its head.
    pub(super) heads: BTreeSet<(u64, Mix)>,
    /// Worker-level indexes (see `index.rs`).
    pub(super) sets: WorkerSets,
    /// Workers by the `last_seen_ms` they were filed under, for expiry.
    pub(super) deadlines: BTreeSet<(Millis, Wix)>,
    /// Workers by the workers' cache sizes (a multiset), for the submit
    /// check that some worker could hold a model.
    pub(super) cache_sizes: BTreeMap<u64, u32>,
    /// Replication bookkeeping (see `replicate.rs`).
    pub(super) repl: super::replicate::ReplicaState,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            model_ids: BTreeMap::new(),
            models: Vec::new(),
            job_ids: HashMap::new(),
            jobs: Slab::default(),
            worker_ids: BTreeMap::new(),
            workers: Slab::default(),
            next_seq: 0,
            by_age: BTreeSet::new(),
            heads: BTreeSet::new(),
            sets: WorkerSets::default(),
            deadlines: BTreeSet::new(),
            cache_sizes: BTreeMap::new(),
            repl: Default::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The id of a model name, made on first sight.
    pub(super) fn intern_model(&mut self, model: &ModelId) -> Mix {
        if let Some(&m) = self.model_ids.get(model) {
            return m;
        }
        let m = Mix::try_from(self.models.len()).expect("fewer than 2^32 models");
        self.models.push(ModelSlot::new());
        self.model_ids.insert(model.clone(), m);
        m
    }

    pub(super) fn model_ix(&self, model: &ModelId) -> Option<Mix> {
        self.model_ids.get(model).copied()
    }

    pub(super) fn worker_ix(&self, worker: &WorkerId) -> Option<Wix> {
        self.worker_ids.get(worker).copied()
    }

    pub(super) fn job_ix(&self, job: &JobId) -> Option<Jix> {
        self.job_ids.get(job).copied()
    }

    /// The catalogue entry of a model id, if it is in the catalogue.
    pub(super) fn entry(&self, model: Mix) -> Option<&ModelEntry> {
        self.models[model as usize].entry.as_ref()
    }

    // ---- catalogue -------------------------------------------------------

    pub fn register_model(&mut self, model: ModelId, bytes: u64) {
        let m = self.intern_model(&model);
        let slot = &mut self.models[m as usize];
        let before = slot.entry.as_ref().map(|e| e.bytes);
        let entry = slot.entry.get_or_insert(ModelEntry {
            bytes,
            service_ms: None,
            demand: Default::default(),
        });
        entry.bytes = bytes;
        // Holders' start estimates count the model's size: refile them.
        if before != Some(bytes) {
            let holders: Vec<Wix> = slot.holders.iter().copied().collect();
            for w in holders {
                self.place(w);
            }
        }
    }

    /// Removes a model from the catalogue; refused while jobs need it.
    pub fn remove_model(&mut self, model: &ModelId) -> Result<()> {
        let Some(m) = self.model_ix(model) else {
            return Err(Error::UnknownModel(model.clone()));
        };
        let slot = &mut self.models[m as usize];
        if !slot.queue.is_empty() || slot.running > 0 {
            return Err(Error::FailedPrecondition(format!(
                "model {model} has unfinished jobs; cancel them first"
            )));
        }
        match slot.entry.take() {
            Some(_) => {
                let holders: Vec<Wix> = slot.holders.iter().copied().collect();
                for w in holders {
                    self.place(w);
                }
                Ok(())
            }
            None => Err(Error::UnknownModel(model.clone())),
        }
    }

    pub fn has_model(&self, model: &ModelId) -> bool {
        self.model_ix(model)
            .is_some_and(|m| self.entry(m).is_some())
    }

    /// Models in the catalogue, by name.
    pub(super) fn catalogue(&self) -> impl Iterator<Item = (&ModelId, Mix, &ModelEntry)> {
        self.model_ids
            .iter()
            .filter_map(|(id, &m)| Some((id, m, self.entry(m)?)))
    }

    // ---- views -----------------------------------------------------------

    pub fn job(&self, id: &JobId) -> Option<&JobEntry> {
        self.jobs.get(self.job_ix(id)?)
    }

    /// Jobs queued or running.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn queued_len(&self) -> usize {
        self.by_age.len()
    }

    pub fn worker(&self, id: &WorkerId) -> Option<&WorkerEntry> {
        self.workers.get(self.worker_ix(id)?)
    }

    /// Connected workers, by name.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.worker_ids.values().map(|&w| &self.workers[w])
    }

    /// Per model in the catalogue: queued and running jobs, and which
    /// workers hold it. Reads counters kept by the indexes: no job or
    /// worker is visited.
    pub fn model_status(&self) -> Vec<ModelStatus> {
        self.catalogue()
            .map(|(id, m, _)| {
                let s = &self.models[m as usize];
                ModelStatus {
                    model: id.clone(),
                    queued: s.queue.len() as u32,
                    running: s.running,
                    workers_vram: s.in_vram,
                    workers_disk: s.on_disk,
                    workers_downloading: s.fetching,
                }
            })
            .collect()
    }
}
