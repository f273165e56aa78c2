//! What losing a worker would cost the fleet: its deletion cost. Pure: the
//! coordinator computes it from its snapshot (src/cloud/steward.rs), and the
//! simulator can call it to compare scale-in by deletion cost with random
//! removal.
//!
//! The cost is in seconds of fleet work:
//!
//! - each running job counts `running_job_s` (its progress is lost and it
//!   runs again elsewhere);
//! - each model copy the worker holds (not baked into the image: a new node
//!   has those too) counts the time to re-create the copy (`refill_s`:
//!   download and load) times the chance that the model is asked for within
//!   the horizon (`1 - exp(-rate x horizon_s)`), times how much this copy
//!   matters: `alone_factor` when it is the only copy (the next request waits
//!   for a download), 1 when the fleet holds no more copies than the model's
//!   replica target (losing one means fetching one), and `target / copies`
//!   when it holds more (a spare copy is partly redundant).
//!
//! So a worker holding only widely held or unrequested models costs little,
//! and one that alone holds a model in demand costs much; when a SaladCloud
//! container group scales in, the cheapest instances go first.
//!
//! To play a scale-in (the simulator): one [`WorkerLoad`] per live worker,
//! one [`ModelValue::new`] per model with its demand and replica target,
//! then [`deletion_costs`]; remove the workers with the lowest costs first
//! (SaladCloud compares [`to_deletion_cost`] of them, so equal tenths tie).

use std::collections::BTreeMap;

use super::MAX_DELETION_COST;
use crate::types::{ModelId, WorkerId};

/// One model copy a worker holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    pub model: ModelId,
    /// Baked into the image: every node has it; losing it costs nothing.
    pub preloaded: bool,
}

/// One worker: what it runs and holds.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerLoad {
    pub worker: WorkerId,
    pub running_jobs: u32,
    /// Each model once (disk or VRAM).
    pub holds: Vec<Holding>,
}

/// One model, as the scheduler sees its demand.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModelValue {
    /// Recent arrivals per second.
    pub demand_per_s: f64,
    /// How many workers should hold it (0: no recent demand).
    pub replica_target: u32,
    /// Seconds to re-create a copy: download plus load.
    pub refill_s: f64,
}

impl ModelValue {
    /// A model of `bytes` with this demand, its copies re-created at
    /// `download_bps` (0: the cost model's default) plus the load time, as
    /// the scheduler's cost model estimates them.
    pub fn new(
        demand_per_s: f64,
        replica_target: u32,
        bytes: u64,
        download_bps: u64,
        cost: &crate::scheduler::CostModel,
    ) -> Self {
        let ms = cost.download_ms(bytes, download_bps) + cost.load_ms(bytes);
        Self {
            demand_per_s,
            replica_target,
            refill_s: ms as f64 / 1000.0,
        }
    }
}

/// The tunables (`[coordinator.cloud]` cost_*).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostParams {
    pub horizon_s: f64,
    pub running_job_s: f64,
    pub alone_factor: f64,
}

impl From<&super::CloudConfig> for CostParams {
    fn from(c: &super::CloudConfig) -> Self {
        Self {
            horizon_s: c.cost_horizon_s,
            running_job_s: c.cost_running_job_s,
            alone_factor: c.cost_alone_factor,
        }
    }
}

impl Default for CostParams {
    fn default() -> Self {
        (&super::CloudConfig::default()).into()
    }
}

/// The cost of losing each worker, in seconds of fleet work, in the order
/// of `workers`. Models missing from `models` have no demand.
pub fn deletion_costs(
    workers: &[WorkerLoad],
    models: &BTreeMap<ModelId, ModelValue>,
    p: &CostParams,
) -> Vec<f64> {
    let mut copies: BTreeMap<&ModelId, u32> = BTreeMap::new();
    for w in workers {
        for h in &w.holds {
            *copies.entry(&h.model).or_default() += 1;
        }
    }
    workers
        .iter()
        .map(|w| {
            let running = f64::from(w.running_jobs) * p.running_job_s;
            let held: f64 = w
                .holds
                .iter()
                .filter(|h| !h.preloaded)
                .map(|h| {
                    let Some(m) = models.get(&h.model) else {
                        return 0.0;
                    };
                    let n = copies.get(&h.model).copied().unwrap_or(1).max(1);
                    copy_value(m, n, p)
                })
                .sum();
            running + held
        })
        .collect()
}

/// What one of `copies` copies of a model is worth.
fn copy_value(m: &ModelValue, copies: u32, p: &CostParams) -> f64 {
    if !positive(m.demand_per_s) || !positive(m.refill_s) {
        return 0.0;
    }
    let asked = 1.0 - (-m.demand_per_s * p.horizon_s).exp();
    let needed = m.replica_target.max(1);
    let weight = if copies == 1 {
        p.alone_factor
    } else if copies <= needed {
        1.0
    } else {
        f64::from(needed) / f64::from(copies)
    };
    m.refill_s * asked * weight
}

/// Above zero (NaN is not).
fn positive(v: f64) -> bool {
    v > 0.0
}

/// Seconds as a deletion cost: tenths of a second, 0..=100000.
pub fn to_deletion_cost(seconds: f64) -> i32 {
    if !positive(seconds) {
        return 0;
    }
    (seconds * 10.0).round().min(f64::from(MAX_DELETION_COST)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, running: u32, holds: &[(&str, bool)]) -> WorkerLoad {
        WorkerLoad {
            worker: id.into(),
            running_jobs: running,
            holds: holds
                .iter()
                .map(|(m, preloaded)| Holding {
                    model: (*m).into(),
                    preloaded: *preloaded,
                })
                .collect(),
        }
    }

    fn value(rate: f64, target: u32) -> ModelValue {
        ModelValue {
            demand_per_s: rate,
            replica_target: target,
            refill_s: 60.0,
        }
    }

    #[test]
    fn the_sole_holder_of_a_hot_model_costs_most() {
        let models: BTreeMap<ModelId, ModelValue> = [
            ("hot".into(), value(0.5, 2)),
            ("common".into(), value(0.5, 2)),
            ("cold".into(), value(0.0, 0)),
        ]
        .into_iter()
        .collect();
        let fleet = [
            w("alone", 0, &[("hot", false), ("common", false)]),
            w("b", 0, &[("common", false), ("cold", false)]),
            w("c", 0, &[("common", false)]),
            w("d", 0, &[("common", false)]),
        ];
        let c = deletion_costs(&fleet, &models, &CostParams::default());
        // "common": 4 copies for a target of 2, each worth half a refill.
        assert!((c[2] - 30.0).abs() < 0.1, "{c:?}");
        assert_eq!(c[1], c[2], "a cold model adds nothing: {c:?}");
        // "hot" alone: a full refill times the alone factor, plus "common".
        assert!((c[0] - (60.0 * 3.0 + 30.0)).abs() < 0.1, "{c:?}");
    }

    #[test]
    fn running_jobs_count_and_preloaded_copies_do_not() {
        let models: BTreeMap<ModelId, ModelValue> =
            [("m".into(), value(1.0, 1))].into_iter().collect();
        let p = CostParams::default();
        let fleet = [w("baked", 0, &[("m", true)]), w("busy", 2, &[])];
        let c = deletion_costs(&fleet, &models, &p);
        assert_eq!(c[0], 0.0);
        assert_eq!(c[1], 2.0 * p.running_job_s);
    }

    #[test]
    fn nearly_alone_costs_more_than_widely_held() {
        let models: BTreeMap<ModelId, ModelValue> =
            [("m".into(), value(0.1, 2))].into_iter().collect();
        let p = CostParams::default();
        let two = deletion_costs(
            &[w("a", 0, &[("m", false)]), w("b", 0, &[("m", false)])],
            &models,
            &p,
        );
        let many: Vec<WorkerLoad> = (0..8)
            .map(|i| w(&format!("w{i}"), 0, &[("m", false)]))
            .collect();
        let eight = deletion_costs(&many, &models, &p);
        assert!(two[0] > eight[0] * 3.9, "{two:?} {eight:?}");
    }

    #[test]
    fn costs_are_tenths_of_a_second_within_bounds() {
        assert_eq!(to_deletion_cost(0.0), 0);
        assert_eq!(to_deletion_cost(f64::NAN), 0);
        assert_eq!(to_deletion_cost(12.34), 123);
        assert_eq!(to_deletion_cost(1e12), MAX_DELETION_COST);
    }
}
