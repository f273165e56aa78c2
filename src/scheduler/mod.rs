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

mod estimate;
mod state;

pub use estimate::CostModel;
pub use state::{JobEntry, ModelStatus, Scheduler, WorkerEntry};

use crate::types::{CacheTier, JobId, Millis, ModelId, WorkerId};

/// Tunables of the scheduler. Times in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// A worker silent for longer than this is dead. Default: 15,000.
    pub heartbeat_timeout_ms: Millis,
    /// A job whose attempts failed this many times ends failed. Default: 3.
    pub max_attempts: u32,
    /// A job waiting longer than this goes to any capable worker. Default: 60,000.
    pub starvation_ms: Millis,
    /// How many queued models a free worker considers fetching per decision. Default: 64.
    pub cold_scan_models: usize,
    /// Estimates of download, load and generation time.
    pub cost: CostModel,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout_ms: 15_000,
            max_attempts: 3,
            starvation_ms: 60_000,
            cold_scan_models: 64,
            cost: CostModel::default(),
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
mod tests;
