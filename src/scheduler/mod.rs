//! The scheduler: the pure, synchronous core of the coordinator.
//!
//! It owns the queue of jobs not yet finished, what each connected worker
//! holds (soft state, rebuilt from worker reports), and the matching of jobs
//! to workers. It does no I/O and knows no protobuf or tokio: every operation
//! takes `now` in milliseconds and returns the [`Effect`]s the caller must
//! carry out (send an assignment, tell a client). The coordinator, the
//! simulator and the benchmarks drive this same code.
//!
//! Decisions iterate only ordered maps, so they are deterministic for a
//! given sequence of operations.
//!
//! Per-job work is O(log n) in workers, models and queued jobs: names are
//! looked up once at the API and turned into dense integer ids (`ids.rs`);
//! every question a decision asks (the soonest holder of a model, the
//! best worker to fetch it, the oldest queue, who is late) is answered
//! from an index kept in step with each change, never by a scan of the
//! fleet. Only the periodic full pass (`schedule`), replication rounds and
//! admin views visit every free worker, worker or model.
//!
//! Layout, one concern per file:
//!
//! - `state.rs`: the data (jobs, workers, models), the catalogue, views;
//! - `ids.rs`: the integer ids;
//! - `jobs.rs`: a job's life (submit, cancel, complete, fail, requeue);
//! - `workers.rs`: a worker's life (connect, heartbeat, drain, expiry);
//! - `queue.rs`: per-model queues and their heads;
//! - `index.rs`: where each worker stands, per model and for fetching;
//! - `matching.rs`: which job a free worker starts;
//! - `estimate.rs`: the cost model and start estimates;
//! - `deadline.rs`: attempt deadlines (a running attempt's time is up);
//! - `replicate.rs`: replica targets and prefetches;
//! - `surge.rs`: surge detection, fast placement of copies, release;
//! - `plan.rs`: which models to bake into the worker image.

mod deadline;
mod estimate;
mod ids;
mod index;
mod jobs;
mod matching;
mod plan;
mod queue;
mod replicate;
mod state;
mod surge;
mod workers;

pub use estimate::CostModel;
pub use plan::{plan_image, ImageCandidate, ImagePlan};
pub use replicate::ReplicaTarget;
pub use state::{JobEntry, ModelStatus, Scheduler, WorkerEntry};
pub use surge::SurgeView;

use crate::types::{CacheTier, JobId, Millis, ModelId, WorkerId};

/// Tunables of the scheduler. Times in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// A worker silent for longer than this is dead. Default: 15,000.
    pub heartbeat_timeout_ms: Millis,
    /// A job whose attempts failed this many times ends failed. Default: 3.
    pub max_attempts: u32,
    /// A running attempt is stopped and its job requeued once it has run
    /// this many times its expected length (see `deadline.rs`). Default: 4.
    pub attempt_deadline_factor: f64,
    /// ... but never before it has run this long. Default: 600,000.
    pub attempt_deadline_floor_ms: Millis,
    /// A job waiting longer than this goes to any capable worker. Default: 60,000.
    pub starvation_ms: Millis,
    /// How many queued models a free worker considers fetching per decision. Default: 32.
    pub cold_scan_models: usize,
    /// Estimates of download, load and generation time.
    pub cost: CostModel,
    /// Fewest workers that keep a copy of a model with recent demand
    /// (`replicate`). Default: 2.
    pub min_warm_replicas: u32,
    /// Replica targets are the model's load (arrival rate x service time,
    /// in busy workers) times this. Default: 1.5.
    pub replica_headroom: f64,
    /// Demand below this many jobs per hour (slow rate) is not recent: no
    /// replicas are kept for it. Default: 6 (one job per ten minutes).
    pub recent_demand_per_hour: f64,
    /// Time constants of the two decaying arrival rates per model; the
    /// larger rate counts (fast to rise, slow to forget). Default: 60,000
    /// and 900,000.
    pub demand_fast_ms: Millis,
    pub demand_slow_ms: Millis,
    /// How often `replicate` plans; calls in between return nothing.
    /// Default: 5,000.
    pub replicate_interval_ms: Millis,
    /// Share of the live workers' cache budgets that replica targets may
    /// fill; the rest is left to the workers' own LRU. Default: 0.8.
    pub replica_disk_share: f64,
    /// Most prefetches issued per `replicate` round. Default: 256.
    pub max_prefetch_per_round: usize,
    /// A prefetch not yet seen in a worker's report counts as a copy for
    /// this long, then is forgotten. Default: 120,000.
    pub prefetch_pending_ms: Millis,
    /// Time constant of the short arrival rate that detects surges
    /// (`surge.rs`). Default: 10,000.
    pub surge_window_ms: Millis,
    /// How often surges are checked and their copies placed. Default: 1,000.
    pub surge_check_ms: Millis,
    /// A model surges when its short rate is at least this many times its
    /// slow rate (0: surge response off). Default: 3.
    pub surge_ratio: f64,
    /// ... and would keep at least this many workers busy (and more than
    /// its copies serve). Default: 4.
    pub surge_min_load: f64,
    /// Copies of a surging model per busy worker its rate needs. Default: 1.5.
    pub surge_headroom: f64,
    /// Extra copies clear the jobs already queued for a surging model
    /// within this time. Default: 120,000.
    pub surge_drain_ms: Millis,
    /// Most of the live workers one surging model may take. Default: 0.5.
    pub surge_max_share: f64,
    /// A surge ends when its short rate stays below this share of its peak
    /// for `surge_release_ms`. Default: 0.5 and 120,000.
    pub surge_release_share: f64,
    pub surge_release_ms: Millis,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout_ms: 15_000,
            max_attempts: 3,
            attempt_deadline_factor: 4.0,
            attempt_deadline_floor_ms: 600_000,
            starvation_ms: 60_000,
            cold_scan_models: 32,
            cost: CostModel::default(),
            min_warm_replicas: 2,
            replica_headroom: 1.5,
            recent_demand_per_hour: 6.0,
            demand_fast_ms: 60_000,
            demand_slow_ms: 900_000,
            replicate_interval_ms: 5_000,
            replica_disk_share: 0.8,
            max_prefetch_per_round: 256,
            prefetch_pending_ms: 120_000,
            surge_window_ms: 10_000,
            surge_check_ms: 1_000,
            surge_ratio: 3.0,
            surge_min_load: 4.0,
            surge_headroom: 1.5,
            surge_drain_ms: 120_000,
            surge_max_share: 0.5,
            surge_release_share: 0.5,
            surge_release_ms: 120_000,
        }
    }
}

/// What the caller must do after an operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Send the job to the worker.
    Assign {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        tier: CacheTier,
        queued_ms: Millis,
    },
    /// Tell the worker to stop an attempt.
    Cancel {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
    },
    /// Tell the worker to download a model now.
    Prefetch { worker: WorkerId, model: ModelId },
    /// A running attempt was lost; the job is queued again.
    Requeued {
        job: JobId,
        next_attempt: u32,
        reason: String,
    },
    /// The job ended failed.
    Failed { job: JobId, reason: String },
}

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod surge_tests;
#[cfg(test)]
mod tests;
