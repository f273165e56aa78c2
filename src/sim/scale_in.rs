//! Which nodes a scale-in removes: the lowest deletion costs, or random.
//!
//! The deletion cost is the rule of `deletion_costs` in `src/cloud/cost.rs`
//! (the worker's SaladCloud deletion cost, written on another branch at the
//! same time), restated here on the simulator's state with the same default
//! constants; once both are merged they should call one function. In
//! seconds of fleet work:
//!
//! - each job running or queued on the node counts `RUNNING_JOB_S`;
//! - each model copy it holds outside its image counts the time to
//!   re-create the copy (download at the fleet's median bandwidth, plus
//!   load) times the chance the model is asked for within `HORIZON_S`
//!   (`1 - exp(-rate x horizon)`), times `ALONE_FACTOR` when it is the only
//!   copy, 1 when the fleet holds no more copies than the model's replica
//!   target, and `target / copies` beyond it.
//!
//! The demand and the replica target are what the coordinator would know:
//! arrivals per model over the last 15 minutes, and the scheduler's
//! default target rule (load x headroom, at least `corral_min_replicas`).
//! Every policy is scaled in by the same rule from its own fleet's state.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::engine::Core;
use super::params::{ScaleIn, ScaleInRule};

/// The defaults of `[coordinator.cloud]` cost_horizon_s,
/// cost_running_job_s and cost_alone_factor.
const HORIZON_S: f64 = 600.0;
const RUNNING_JOB_S: f64 = 30.0;
const ALONE_FACTOR: f64 = 3.0;
/// Window over which demand is counted.
const DEMAND_WINDOW_MS: u64 = 15 * 60_000;

/// The nodes to remove, up to `s.nodes` of those up now.
pub(super) fn choose(c: &Core, s: &ScaleIn) -> Vec<u32> {
    let mut up = c.up_nodes();
    match s.rule {
        ScaleInRule::Random => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed ^ 0x5ca1_e1e0);
            up.shuffle(&mut rng);
        }
        ScaleInRule::Cost => {
            let cost = deletion_costs(c, &up);
            let mut ranked: Vec<(f64, u32)> = cost.into_iter().zip(up).collect();
            ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            up = ranked.into_iter().map(|(_, n)| n).collect();
        }
    }
    up.truncate(s.nodes);
    up
}

/// What a copy of a model is worth to the fleet.
struct Value {
    demand_per_s: f64,
    target: u32,
    refill_s: f64,
}

/// The deletion cost of each of `nodes` (seconds of fleet work).
pub(super) fn deletion_costs(c: &Core, nodes: &[u32]) -> Vec<f64> {
    let models = c.w.models as u32;
    let held = |n: u32| -> Vec<u32> {
        let x = &c.nodes[n as usize];
        let mut v: Vec<u32> = x
            .disk
            .iter()
            .filter(|(f, (_, baked))| **f < models && !*baked)
            .map(|(f, _)| *f)
            .chain(x.vram.keys().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut copies: BTreeMap<u32, u32> = BTreeMap::new();
    for &n in nodes {
        for m in held(n) {
            *copies.entry(m).or_default() += 1;
        }
    }
    let values = model_values(c, &copies);
    nodes
        .iter()
        .map(|&n| {
            let running = c.nodes[n as usize].load() as f64 * RUNNING_JOB_S;
            let kept: f64 = held(n)
                .into_iter()
                .map(|m| copy_value(&values[&m], copies[&m]))
                .sum();
            running + kept
        })
        .collect()
}

fn model_values(c: &Core, copies: &BTreeMap<u32, u32>) -> BTreeMap<u32, Value> {
    let since = c.now.saturating_sub(DEMAND_WINDOW_MS);
    let window_s = (c.now - since).max(1) as f64 / 1e3;
    let mut count: BTreeMap<u32, u64> = BTreeMap::new();
    for r in c.jobs[..c.arrived as usize].iter().rev() {
        if r.arr.at_ms < since {
            break;
        }
        *count.entry(r.arr.model).or_default() += 1;
    }
    let share: f64 = c.p.fleet.iter().map(|g| g.share).sum::<f64>().max(1e-9);
    let median_bps = c.p.bw_median_mbit * 1e6 / 8.0;
    copies
        .keys()
        .map(|&m| {
            let rate = count.get(&m).copied().unwrap_or(0) as f64 / window_s;
            let gen_s: f64 =
                c.p.fleet
                    .iter()
                    .enumerate()
                    .map(|(i, g)| g.share / share * c.mean_gen_ms(i, m) as f64 / 1e3)
                    .sum();
            let target = ((rate * gen_s * c.p.corral_headroom).ceil() as u32).max(if rate > 0.0 {
                c.p.corral_min_replicas
            } else {
                0
            });
            let bytes = c.w.files[m as usize].bytes as f64;
            let refill_s = bytes / median_bps + c.load_ms(m) as f64 / 1e3;
            (
                m,
                Value {
                    demand_per_s: rate,
                    target,
                    refill_s,
                },
            )
        })
        .collect()
}

/// What one of `copies` copies is worth (`copy_value` in cloud/cost.rs).
fn copy_value(m: &Value, copies: u32) -> f64 {
    // NaN or non-positive: no value.
    if m.demand_per_s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        || m.refill_s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
    {
        return 0.0;
    }
    let asked = 1.0 - (-m.demand_per_s * HORIZON_S).exp();
    let needed = m.target.max(1);
    let weight = if copies == 1 {
        ALONE_FACTOR
    } else if copies <= needed {
        1.0
    } else {
        f64::from(needed) / f64::from(copies)
    };
    m.refill_s * asked * weight
}
