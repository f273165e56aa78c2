//! Which nodes a scale-in removes: the lowest deletion costs, or random.
//!
//! The deletion cost is `cloud::cost::deletion_costs`, the function the
//! coordinator uses for the workers' SaladCloud deletion cost, with its
//! default parameters, fed from the simulator's state. In seconds of fleet
//! work: each job running or queued on the node, plus, for each model copy
//! it holds outside its image, the time to re-create the copy (download at
//! the fleet's median bandwidth, plus load) times the chance the model is
//! asked for soon, weighted up when it is the only copy.
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
use crate::cloud::cost::{self, CostParams, Holding, ModelValue, WorkerLoad};
use crate::types::{ModelId, WorkerId};

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

/// The deletion cost of each of `nodes` (seconds of fleet work).
pub(super) fn deletion_costs(c: &Core, nodes: &[u32]) -> Vec<f64> {
    let models = c.w.models as u32;
    let model_id = |m: u32| ModelId(format!("m{m}"));
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
    let holdings: Vec<Vec<u32>> = nodes.iter().map(|&n| held(n)).collect();
    let loads: Vec<WorkerLoad> = nodes
        .iter()
        .zip(&holdings)
        .map(|(&n, h)| WorkerLoad {
            worker: WorkerId(format!("n{n}")),
            running_jobs: c.nodes[n as usize].load() as u32,
            holds: h
                .iter()
                .map(|&m| Holding {
                    model: model_id(m),
                    preloaded: false,
                })
                .collect(),
        })
        .collect();
    let mut wanted: Vec<u32> = holdings.concat();
    wanted.sort_unstable();
    wanted.dedup();
    let values = model_values(c, &wanted)
        .into_iter()
        .map(|(m, v)| (model_id(m), v))
        .collect();
    cost::deletion_costs(&loads, &values, &CostParams::default())
}

fn model_values(c: &Core, wanted: &[u32]) -> BTreeMap<u32, ModelValue> {
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
    wanted
        .iter()
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
                ModelValue {
                    demand_per_s: rate,
                    replica_target: target,
                    refill_s,
                },
            )
        })
        .collect()
}
