//! Replication: keep enough workers holding each model in demand.
//!
//! Demand per model is a decaying arrival rate; the target number of
//! holders is the model's load (rate x service time, in busy workers) with
//! headroom, raised for observed churn and never below
//! `min_warm_replicas` while demand is recent. Targets are met greedily in
//! order of demand, within a share of the fleet's cache budget, by
//! prefetching onto the workers where a copy costs least. Copies are only
//! ever added (a worker's own LRU removes them), and a prefetch counts as a
//! copy while it is pending, so targets do not flap.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::ids::{Mix, Wix};
use super::surge::Surge;
use super::{Effect, Scheduler, SchedulerConfig};
use crate::types::{Millis, ModelId, WorkerId};

/// Two exponentially decaying arrival counts, in arrivals per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Demand {
    fast: f64,
    slow: f64,
    /// Short time constant (`surge_window_ms`), for surge detection.
    burst: f64,
    at_ms: Millis,
}

impl Demand {
    fn decayed(&self, now: Millis, cfg: &SchedulerConfig) -> (f64, f64) {
        let dt = now.saturating_sub(self.at_ms) as f64;
        (
            self.fast * (-dt / cfg.demand_fast_ms.max(1) as f64).exp(),
            self.slow * (-dt / cfg.demand_slow_ms.max(1) as f64).exp(),
        )
    }

    /// One arrival at `now`.
    pub(crate) fn record(&mut self, now: Millis, cfg: &SchedulerConfig) {
        let (f, s) = self.decayed(now, cfg);
        let b = self.burst_per_s(now, cfg);
        self.fast = f + 1000.0 / cfg.demand_fast_ms.max(1) as f64;
        self.slow = s + 1000.0 / cfg.demand_slow_ms.max(1) as f64;
        self.burst = b + 1000.0 / cfg.surge_window_ms.max(1) as f64;
        self.at_ms = self.at_ms.max(now);
    }

    /// Arrivals per second at `now`, short time constant (surges).
    pub(crate) fn burst_per_s(&self, now: Millis, cfg: &SchedulerConfig) -> f64 {
        let dt = now.saturating_sub(self.at_ms) as f64;
        self.burst * (-dt / cfg.surge_window_ms.max(1) as f64).exp()
    }

    /// Arrivals per second at `now`, slow time constant.
    pub(crate) fn slow_per_s(&self, now: Millis, cfg: &SchedulerConfig) -> f64 {
        self.decayed(now, cfg).1
    }

    /// Arrivals per second at `now`: the larger of the two rates.
    pub(crate) fn rate_per_s(&self, now: Millis, cfg: &SchedulerConfig) -> f64 {
        let (f, s) = self.decayed(now, cfg);
        f.max(s)
    }
}

/// Replication bookkeeping kept between rounds.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplicaState {
    /// Workers lost without notice, as a decaying rate (slow constant).
    losses: Demand,
    /// Prefetches sent and not yet visible in the worker's report.
    pub(super) pending: BTreeMap<WorkerId, (ModelId, Millis)>,
    next_round_ms: Millis,
    /// Surges in progress (see `surge.rs`).
    pub(super) surges: BTreeMap<Mix, Surge>,
    pub(super) next_surge_ms: Millis,
    /// Each model's replica target at the last round, for judging which
    /// copies are spare.
    pub(super) last_targets: BTreeMap<Mix, u32>,
}

impl ReplicaState {
    pub(crate) fn record_loss(&mut self, now: Millis, cfg: &SchedulerConfig) {
        self.losses.record(now, cfg);
    }
}

/// The replication plan for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaTarget {
    pub model: ModelId,
    /// Recent arrivals per second.
    pub rate_per_s: f64,
    /// Workers that should hold it.
    pub target: u32,
    /// Workers that hold it, fetch it, or were told to.
    pub holders: u32,
}

impl Scheduler {
    /// Replica targets for every model with recent demand, most demanded
    /// first (ties by id).
    pub fn replica_targets(&self, now: Millis) -> Vec<ReplicaTarget> {
        let cfg = &self.cfg;
        let live: Vec<_> = self.workers().filter(|w| !w.draining).collect();
        if live.is_empty() {
            return Vec::new();
        }
        let mut budget = live
            .iter()
            .map(|w| w.hello.cache_max_bytes as f64)
            .sum::<f64>()
            * cfg.replica_disk_share;
        // Chance that a given worker is lost in one second: the slow rate,
        // a sustained hazard. The fast one would read a one-off mass
        // departure (a scale-in of 40 nodes) as a hazard of 40 a minute and
        // multiply every target for minutes: the simulated scale-in
        // downloaded 10 TB in 30 minutes that way.
        let loss_per_worker_s = self.repl.losses.slow_per_s(now, cfg) / live.len() as f64;
        let mut pending: BTreeMap<&ModelId, u32> = BTreeMap::new();
        for (m, _) in self.repl.pending.values() {
            *pending.entry(m).or_default() += 1;
        }
        // Recent demand is judged on the slow rate (sustained, not one
        // stray request); the load uses the larger rate (fast to rise).
        let mut ranked: Vec<(f64, &ModelId, Mix)> = self
            .catalogue()
            .filter(|(_, _, m)| {
                m.demand.slow_per_s(now, cfg) * 3600.0 >= cfg.recent_demand_per_hour
            })
            .map(|(id, mix, m)| (m.demand.rate_per_s(now, cfg), id, mix))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let mut out = Vec::with_capacity(ranked.len());
        for (rate, model, mix) in ranked {
            let bytes = self.model_bytes(mix);
            let service_s = self.service_ms(mix) as f64 / 1000.0;
            let load = rate * service_s;
            let base = ((load * cfg.replica_headroom).ceil() as u32)
                .max(cfg.min_warm_replicas)
                .max(self.surge_target(mix).unwrap_or(0));
            // Copies expected to vanish while a lost one is replaced.
            let refill_s = (cfg.cost.download_ms(bytes, 0) + cfg.cost.load_ms(bytes)) as f64 / 1e3;
            // At most as many again: losses refill copies, never multiply them.
            let extra =
                ((base as f64 * loss_per_worker_s * refill_s * 3.0).round() as u32).min(base);
            let mut target = (base + extra).min(live.len() as u32);
            let holders = &self.models[mix as usize].holders;
            let held = holders.len() as u32 + pending.get(model).copied().unwrap_or(0);
            // Copies in the image cost no cache; counting them is only
            // worth it for models held widely (the image's are everywhere).
            let preloaded = if holders.len() as u32 >= target {
                holders
                    .iter()
                    .take(target as usize)
                    .filter(|&&w| self.workers[w].disk.get(&mix) == Some(&true))
                    .count() as u32
            } else {
                0
            };
            // Copies beyond the image cost cache; stop adding when the
            // budget is spent.
            let copies = target.saturating_sub(preloaded);
            let affordable = (budget / bytes.max(1) as f64).floor() as u32;
            if copies > affordable {
                target = preloaded + affordable;
            }
            budget -= target.saturating_sub(preloaded) as f64 * bytes as f64;
            out.push(ReplicaTarget {
                model: model.clone(),
                rate_per_s: rate,
                target,
                holders: held,
            });
        }
        out
    }

    /// Plans replication: prefetches toward each model's replica target.
    /// The coordinator calls this from its periodic tick; it plans at most
    /// every `replicate_interval_ms` and returns nothing in between.
    pub fn replicate(&mut self, now: Millis) -> Vec<Effect> {
        // Surges are checked more often than the round (`surge.rs`).
        let mut effects = self.surge_round(now);
        if now < self.repl.next_round_ms {
            return effects;
        }
        self.repl.next_round_ms = now + self.cfg.replicate_interval_ms;
        // Forget prefetches that arrived, were dropped, or took too long.
        let pending_ms = self.cfg.prefetch_pending_ms;
        let (workers, worker_ids, model_ids) = (&self.workers, &self.worker_ids, &self.model_ids);
        self.repl.pending.retain(|w, (m, at)| {
            let (Some(w), Some(m)) = (worker_ids.get(w), model_ids.get(m)) else {
                return false;
            };
            let w = &workers[*w];
            w.tier(*m).is_none()
                && !w.downloading.contains_key(m)
                && now.saturating_sub(*at) < pending_ms
        });
        let targets = self.replica_targets(now);
        self.repl.last_targets = targets
            .iter()
            .filter_map(|t| Some((self.model_ix(&t.model)?, t.target)))
            .collect();
        // Candidates: idle download channel, best bandwidth first.
        let default_bps = self.cfg.cost.default_download_bps;
        let (workers, worker_ids) = (&self.workers, &self.worker_ids);
        // Room: free disk plus the copies its LRU may drop without hurting
        // (`spare_bytes`). A copy that would not fit in free disk is placed
        // only where it fits in that room, and only for a model short of
        // more than half its target or in a surge: a model one copy short
        // waits for free disk (a joining worker, a finished eviction).
        // Evicting for it costs another model a copy, which the next round
        // refills elsewhere, and so on: in the simulator that chain
        // downloaded 5.5 TB in the 30 minutes after a scale-in of 40 of 200
        // nodes, against 0.6 TB without it (docs/sim.md, Scale-in).
        let mut candidates: Vec<(&WorkerId, Wix, u64, u64)> = worker_ids
            .iter()
            .map(|(id, &w)| (id, w, &workers[w]))
            .filter(|(id, _, w)| {
                !w.draining && w.report.downloads.is_empty() && !self.repl.pending.contains_key(*id)
            })
            .map(|(id, wix, w)| {
                let bps = if w.report.download_bps == 0 {
                    default_bps
                } else {
                    w.report.download_bps
                };
                (id, wix, bps, w.report.free_disk_bytes)
            })
            .collect();
        candidates.sort_by_key(|(id, _, bps, free)| (Reverse(*bps), Reverse(*free), *id));
        let mut used: BTreeSet<usize> = BTreeSet::new();
        // Each candidate's room, computed once a round and only if needed.
        let mut rooms: Option<Vec<u64>> = None;
        'models: for t in targets {
            let mix = self
                .model_ix(&t.model)
                .expect("a target is in the catalogue");
            let bytes = self.model_bytes(mix);
            for have in t.holders..t.target {
                if effects.len() >= self.cfg.max_prefetch_per_round
                    || used.len() == candidates.len()
                {
                    break 'models;
                }
                let fits = |i: usize, space: u64| {
                    let w = &self.workers[candidates[i].1];
                    !used.contains(&i)
                        && w.tier(mix).is_none()
                        && w.can_hold(bytes)
                        && space >= bytes
                };
                // A worker with free disk first, so nothing is evicted;
                // then, for a model far short, one whose LRU can drop
                // spare copies for it.
                let mut pick = (0..candidates.len()).find(|&i| fits(i, candidates[i].3));
                if pick.is_none() && (self.repl.surges.contains_key(&mix) || have * 2 < t.target) {
                    let rooms = rooms.get_or_insert_with(|| {
                        candidates
                            .iter()
                            .map(|&(_, w, _, free)| free.saturating_add(self.spare_bytes(w, now)))
                            .collect()
                    });
                    pick = (0..candidates.len()).find(|&i| fits(i, rooms[i]));
                }
                let Some(i) = pick else {
                    continue 'models;
                };
                used.insert(i);
                let worker = candidates[i].0.clone();
                effects.push(Effect::Prefetch {
                    worker: worker.clone(),
                    model: t.model.clone(),
                });
                self.repl.pending.insert(worker, (t.model.clone(), now));
            }
        }
        effects
    }
}
