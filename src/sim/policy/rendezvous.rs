//! B6 rendezvous hashing with bounded load: each model's candidates are its
//! top-k nodes by hash; a job goes to the least-loaded candidate unless
//! that one is over the cap (`b6_cap` x the mean load), then to the next
//! node in hash order under the cap.
//!
//! Fixed k gives every model the same k (`b6_k`). Proportional k gives a
//! model `max(b6_min_k, ceil(b6_prop_scale x its share of recent arrivals
//! x live nodes))` candidates, so popular models spread over more nodes;
//! its share is a decaying count of arrivals (15 minutes), what a real
//! router could keep.

use std::cmp::Reverse;

use super::push::Placer;
use crate::sim::engine::Core;
use crate::sim::node::splitmix;
use crate::sim::params::SimParams;
use crate::sim::workload::World;

/// Time constant of the arrival counts, ms.
const DEMAND_MS: f64 = 900_000.0;

pub(crate) struct Rendezvous {
    cap: f64,
    k: usize,
    /// Proportional k: (scale, per-model decayed counts, total, last update).
    prop: Option<Prop>,
}

struct Prop {
    scale: f64,
    counts: Vec<f64>,
    total: f64,
    at_ms: Vec<u64>,
    total_at: u64,
}

fn decay(v: f64, from: u64, to: u64) -> f64 {
    v * (-(to.saturating_sub(from) as f64) / DEMAND_MS).exp()
}

impl Rendezvous {
    pub(crate) fn fixed(p: &SimParams) -> Self {
        Self {
            cap: p.b6_cap,
            k: p.b6_k.max(1),
            prop: None,
        }
    }

    pub(crate) fn proportional(p: &SimParams, w: &World) -> Self {
        Self {
            cap: p.b6_cap,
            k: p.b6_min_k.max(1),
            prop: Some(Prop {
                scale: p.b6_prop_scale,
                counts: vec![0.0; w.models],
                total: 0.0,
                at_ms: vec![0; w.models],
                total_at: 0,
            }),
        }
    }

    fn k_for(&self, model: u32, now: u64, live: usize) -> usize {
        let Some(p) = &self.prop else {
            return self.k;
        };
        let m = model as usize;
        let count = decay(p.counts[m], p.at_ms[m], now);
        let total = decay(p.total, p.total_at, now).max(1e-9);
        let want = (p.scale * count / total * live as f64).ceil() as usize;
        want.max(self.k)
    }
}

impl Placer for Rendezvous {
    fn observe(&mut self, c: &Core, j: u32) {
        if let Some(p) = &mut self.prop {
            let m = c.arrival(j).model as usize;
            p.counts[m] = decay(p.counts[m], p.at_ms[m], c.now) + 1.0;
            p.at_ms[m] = c.now;
            p.total = decay(p.total, p.total_at, c.now) + 1.0;
            p.total_at = c.now;
        }
    }

    fn choose(&mut self, c: &Core, j: u32, up: &[u32]) -> u32 {
        let m = c.arrival(j).model;
        let mut order: Vec<(u64, u32)> = up
            .iter()
            .map(|n| (splitmix(splitmix(u64::from(m)) ^ u64::from(*n)), *n))
            .collect();
        order.sort_by_key(|(h, n)| (Reverse(*h), *n));
        let load = |n: u32| c.nodes[n as usize].load();
        let total: usize = up.iter().map(|n| load(*n)).sum();
        let cap = ((self.cap * (total + 1) as f64 / up.len() as f64).ceil() as usize).max(1);
        let k = self.k_for(m, c.now, up.len()).clamp(1, order.len());
        let best_k = order[..k]
            .iter()
            .min_by_key(|(_, n)| load(*n))
            .map(|(_, n)| *n)
            .expect("k >= 1");
        if load(best_k) < cap {
            best_k
        } else {
            order[k..]
                .iter()
                .find(|(_, n)| load(*n) < cap)
                .map(|(_, n)| *n)
                .unwrap_or(best_k)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_k_follows_the_share_of_recent_arrivals() {
        let r = Rendezvous {
            cap: 1.25,
            k: 2,
            prop: Some(Prop {
                scale: 2.0,
                counts: vec![90.0, 9.0, 1.0, 0.0],
                total: 100.0,
                at_ms: vec![0; 4],
                total_at: 0,
            }),
        };
        // 2 x share x 100 live nodes, at least k = 2.
        assert_eq!(r.k_for(0, 0, 100), 180);
        assert_eq!(r.k_for(1, 0, 100), 18);
        assert_eq!(r.k_for(2, 0, 100), 2);
        assert_eq!(r.k_for(3, 0, 100), 2);
        // Counts decay together: shares, and so k, hold over time
        // (2 x 0.09 x 110 = 19.8).
        assert_eq!(r.k_for(1, 0, 110), 20);
        assert_eq!(r.k_for(1, 3_600_000, 110), 20);
        let fixed = Rendezvous {
            cap: 1.25,
            k: 4,
            prop: None,
        };
        assert_eq!(fixed.k_for(0, 0, 100), 4);
    }
}
