//! Surge response: a model whose arrivals jump (a viral checkpoint) gets
//! its extra copies within seconds, on the workers that will have them
//! soonest, all at once; they are released with hysteresis afterwards.
//!
//! - **Detection** reads the arrival rate, not the queue: each model keeps
//!   a third decaying arrival count with a short time constant
//!   (`surge_window_ms`, see `Demand` in `replicate.rs`). A model surges
//!   when that rate is at least `surge_ratio` times its slow (15 min) rate,
//!   would keep `surge_min_load` workers busy, and needs more copies than
//!   the model has. The check runs every
//!   `surge_check_ms`, apart from the slower replication round.
//! - **Target**: while a model surges, its copies follow the short-window
//!   rate (or the longer ones, whichever is larger) times its service time
//!   times `surge_headroom`, plus enough workers to clear the jobs already
//!   queued for it within `surge_drain_ms`; capped at `surge_max_share` of
//!   the live workers. During a surge the target only grows, so noise in
//!   the rate never removes copies being fetched.
//! - **Placement**: every missing copy is started in the same check, on
//!   the workers whose copy would be complete soonest: what they still
//!   have to download plus the model, at their measured bandwidth. A
//!   worker qualifies only if its free disk plus its spare copies (models
//!   without recent demand, or held by more workers than their replica
//!   target) fit the model, so its LRU makes room without evicting a
//!   model others depend on.
//! - **Release**: a surge ends once its short-window rate has stayed below
//!   `surge_release_share` of its peak for `surge_release_ms`. Its copies
//!   then count against the ordinary replica target only; the ones beyond
//!   it are spare, and workers' LRUs reclaim them as they go unused. The
//!   gap between entering (a multiple of the slow rate) and leaving (a
//!   share of the peak, sustained) is the hysteresis.

use std::collections::BTreeMap;

use super::ids::{Mix, Wix};
use super::{Effect, Scheduler};
use crate::types::{Millis, WorkerId};

/// One model's surge in progress.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Surge {
    pub(crate) since_ms: Millis,
    /// Highest short-window arrival rate seen, per second.
    pub(crate) peak_per_s: f64,
    /// Copies wanted; never lowered while the surge lasts.
    pub(crate) target: u32,
    /// Since when the rate has been below the release level.
    pub(crate) calm_since_ms: Option<Millis>,
}

/// A surge as the views show it.
#[derive(Clone, Debug, PartialEq)]
pub struct SurgeView {
    pub model: crate::types::ModelId,
    pub since_ms: Millis,
    pub peak_per_s: f64,
    pub target: u32,
    /// Workers that hold it, fetch it, or were told to.
    pub holders: u32,
}

impl Scheduler {
    /// Models surging now, by name.
    pub fn surges(&self) -> Vec<SurgeView> {
        self.repl
            .surges
            .iter()
            .map(|(&m, s)| SurgeView {
                model: self.model_name(m),
                since_ms: s.since_ms,
                peak_per_s: s.peak_per_s,
                target: s.target,
                holders: self.copies(m),
            })
            .collect()
    }

    /// The surge target of `model`, if it surges.
    pub(super) fn surge_target(&self, model: Mix) -> Option<u32> {
        self.repl.surges.get(&model).map(|s| s.target)
    }

    fn model_name(&self, m: Mix) -> crate::types::ModelId {
        self.model_ids
            .iter()
            .find(|(_, &x)| x == m)
            .map(|(id, _)| id.clone())
            .expect("a surging model is named")
    }

    /// Holders of `model` plus prefetches sent and not yet reported.
    fn copies(&self, model: Mix) -> u32 {
        let slot = &self.models[model as usize];
        let pending = self
            .repl
            .pending
            .values()
            .filter(|(m, _)| self.model_ix(m) == Some(model))
            .count();
        slot.holders.len() as u32 + pending as u32
    }

    /// Detects surges, updates their targets, ends calm ones, and starts
    /// the missing copies. Called from `replicate`; runs at most every
    /// `surge_check_ms`.
    pub(super) fn surge_round(&mut self, now: Millis) -> Vec<Effect> {
        if now < self.repl.next_surge_ms || self.cfg.surge_ratio <= 0.0 {
            return Vec::new();
        }
        self.repl.next_surge_ms = now + self.cfg.surge_check_ms;
        let live = self
            .worker_ids
            .values()
            .filter(|&&w| !self.workers[w].draining)
            .count() as u32;
        if live == 0 {
            return Vec::new();
        }
        self.detect(now, live);
        let mut effects = Vec::new();
        let models: Vec<(Mix, u32)> = self
            .repl
            .surges
            .iter()
            .map(|(&m, s)| (m, s.target))
            .collect();
        for (m, target) in models {
            let missing = target.saturating_sub(self.copies(m));
            if missing > 0 {
                effects.extend(self.place_copies(m, missing, now));
            }
        }
        effects
    }

    /// Starts, updates and ends surges.
    fn detect(&mut self, now: Millis, live: u32) {
        let cfg = &self.cfg;
        let cap = ((live as f64 * cfg.surge_max_share).floor() as u32).max(1);
        let mut seen: BTreeMap<Mix, (f64, u32)> = BTreeMap::new();
        for (_, m, e) in self.catalogue() {
            let burst = e.demand.burst_per_s(now, cfg);
            let service_s = self.service_ms(m) as f64 / 1e3;
            let surging = self.repl.surges.contains_key(&m);
            // Only a jump the model's copies cannot absorb is a surge: a
            // burst that its holders serve needs no response (and counting
            // it would spend downloads on every clump of arrivals).
            let holders = self.models[m as usize].holders.len() as f64;
            let starts = burst * service_s >= cfg.surge_min_load
                && burst >= cfg.surge_ratio * e.demand.slow_per_s(now, cfg)
                && burst * service_s * cfg.surge_headroom > holders;
            if !surging && !starts {
                continue;
            }
            let rate = burst.max(e.demand.rate_per_s(now, cfg));
            let queued = self.models[m as usize].queue.len() as f64;
            let drain_s = (cfg.surge_drain_ms.max(1) as f64) / 1e3;
            let want = rate * service_s * cfg.surge_headroom + queued * service_s / drain_s;
            seen.insert(m, (burst, (want.ceil() as u32).clamp(1, cap)));
        }
        let (release_share, release_ms) = (cfg.surge_release_share, cfg.surge_release_ms);
        let surges = &mut self.repl.surges;
        // Surges no longer seen have calmed to nothing.
        for (m, s) in surges.iter_mut() {
            if !seen.contains_key(m) {
                s.calm_since_ms.get_or_insert(now);
            }
        }
        for (m, (burst, target)) in seen {
            let s = surges.entry(m).or_insert(Surge {
                since_ms: now,
                peak_per_s: burst,
                target,
                calm_since_ms: None,
            });
            s.peak_per_s = s.peak_per_s.max(burst);
            s.target = s.target.max(target);
            if burst < release_share * s.peak_per_s {
                s.calm_since_ms.get_or_insert(now);
            } else {
                s.calm_since_ms = None;
            }
        }
        surges.retain(|_, s| {
            s.calm_since_ms
                .is_none_or(|t| now.saturating_sub(t) < release_ms)
        });
    }

    /// Sends `missing` prefetches of `model` to the workers that would hold
    /// it soonest, among those with room for it without evicting a copy
    /// others depend on.
    fn place_copies(&mut self, model: Mix, missing: u32, now: Millis) -> Vec<Effect> {
        let bytes = self.model_bytes(model);
        let Some(name) = self
            .catalogue()
            .find(|(_, m, _)| *m == model)
            .map(|(id, _, _)| id.clone())
        else {
            return Vec::new();
        };
        let mut ready: Vec<(Millis, &WorkerId, Wix)> = self
            .worker_ids
            .iter()
            .filter(|(id, &w)| {
                let x = &self.workers[w];
                !x.draining
                    && x.can_hold(bytes)
                    && x.tier(model).is_none()
                    && !x.downloading.contains_key(&model)
                    && !self.repl.pending.contains_key(*id)
                    && x.report
                        .free_disk_bytes
                        .saturating_add(self.spare_bytes(w, now))
                        >= bytes
            })
            .map(|(id, &w)| {
                let x = &self.workers[w];
                let eta = self
                    .cfg
                    .cost
                    .download_ms(x.download_left() + bytes, x.report.download_bps);
                (eta, id, w)
            })
            .collect();
        ready.sort();
        let chosen: Vec<WorkerId> = ready
            .into_iter()
            .take(missing as usize)
            .map(|(_, id, _)| id.clone())
            .collect();
        chosen
            .into_iter()
            .map(|worker| {
                self.repl
                    .pending
                    .insert(worker.clone(), (name.clone(), now));
                Effect::Prefetch {
                    worker,
                    model: name.clone(),
                }
            })
            .collect()
    }

    /// Bytes on `w`'s disk its LRU may drop without hurting: copies not in
    /// VRAM nor in the image whose model has no recent demand or more
    /// holders than its last replica target.
    pub(super) fn spare_bytes(&self, w: Wix, now: Millis) -> u64 {
        let x = &self.workers[w];
        let cfg = &self.cfg;
        x.disk
            .iter()
            .filter(|(m, preloaded)| !**preloaded && !x.vram.contains(m))
            .filter(|(&m, _)| {
                let Some(e) = self.entry(m) else {
                    return true;
                };
                if self.repl.surges.contains_key(&m) {
                    return false;
                }
                let recent = e.demand.slow_per_s(now, cfg) * 3600.0 >= cfg.recent_demand_per_hour;
                // A model in demand keeps at least one copy, target or not.
                let target = self.repl.last_targets.get(&m).copied().unwrap_or(0).max(1);
                !recent || self.models[m as usize].holders.len() as u32 > target
            })
            .map(|(&m, _)| self.model_bytes(m))
            .sum()
    }
}
