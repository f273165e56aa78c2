//! B3 Horde-strict: a node advertises its image plus models drawn by
//! popularity that fill its disk (fetched at start) and takes only jobs
//! for those. Jobs for a model nobody advertises fail at once ("share
//! nobody could serve").

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand_distr::{Distribution, Zipf};

use super::{on_leave, Departure, Policy, DETECT};
use crate::error::Result;
use crate::sim::engine::Core;
use crate::sim::node::Run;
use crate::sim::workload::{World, GB};

pub(crate) struct Horde {
    by_model: BTreeMap<u32, VecDeque<u32>>,
    /// Nodes advertising each model.
    advertisers: Vec<u32>,
    /// Per node, what it advertises.
    advertised: Vec<BTreeSet<u32>>,
    idle: BTreeSet<u32>,
}

impl Horde {
    pub(crate) fn new(w: &World) -> Self {
        Self {
            by_model: BTreeMap::new(),
            advertisers: vec![0; w.models],
            advertised: vec![BTreeSet::new(); w.lives.len()],
            idle: BTreeSet::new(),
        }
    }

    /// The node's advertised models: its image plus Zipf draws until the
    /// disk is nearly full; it fetches them at once.
    fn choose(&mut self, c: &mut Core, n: u32) {
        let mut chosen: BTreeSet<u32> = c.w.baked.iter().copied().collect();
        let cap = c.nodes[n as usize].disk_cap;
        let mut used = 0u64;
        let zipf = Zipf::new(c.w.models as u64, c.p.zipf_s.max(0.0)).expect("valid zipf");
        let mut by_rank: Vec<u32> = vec![0; c.w.models];
        for (m, r) in c.w.rank0.iter().enumerate() {
            by_rank[*r] = m as u32;
        }
        let mut order = Vec::new();
        for _ in 0..4 * c.w.models {
            let r = zipf.sample(&mut c.rng) as usize - 1;
            let m = by_rank[r.min(by_rank.len() - 1)];
            let b = c.w.files[m as usize].bytes;
            if chosen.contains(&m) {
                continue;
            }
            if used + b > cap {
                if cap - used < (2.0 * GB) as u64 {
                    break;
                }
                continue;
            }
            used += b;
            chosen.insert(m);
            order.push(m);
        }
        for m in &chosen {
            self.advertisers[*m as usize] += 1;
        }
        self.advertised[n as usize] = chosen;
        for m in order {
            c.want(n, m);
        }
    }

    fn requeue(&mut self, c: &mut Core, runs: Vec<Run>) {
        for r in runs {
            let m = c.arrival(r.job).model;
            if self.advertisers[m as usize] == 0 {
                c.fail_job(r.job);
                continue;
            }
            self.by_model.entry(m).or_default().push_front(r.job);
            let idle: Vec<u32> = self.idle.iter().copied().collect();
            for n in idle {
                if self.advertised[n as usize].contains(&m) {
                    self.idle.remove(&n);
                    self.node_free(c, n);
                    break;
                }
            }
        }
    }

    /// An idle node takes the oldest job among the models it advertises.
    fn node_free(&mut self, c: &mut Core, n: u32) {
        if !c.nodes[n as usize].up {
            return;
        }
        let best = self.advertised[n as usize]
            .iter()
            .filter_map(|m| {
                self.by_model
                    .get(m)
                    .and_then(|q| q.front())
                    .map(|j| (*j, *m))
            })
            .min();
        match best {
            Some((j, m)) => {
                let q = self.by_model.get_mut(&m).expect("exists");
                q.pop_front();
                if q.is_empty() {
                    self.by_model.remove(&m);
                }
                c.start(n, j, 1);
            }
            None => {
                self.idle.insert(n);
            }
        }
    }
}

impl Policy for Horde {
    fn arrival(&mut self, c: &mut Core, j: u32) -> Result<()> {
        let m = c.arrival(j).model;
        if self.advertisers[m as usize] == 0 {
            c.led.unservable += 1;
            c.fail_job(j);
            return Ok(());
        }
        let pick = self
            .idle
            .iter()
            .filter(|n| self.advertised[**n as usize].contains(&m))
            .min_by_key(|n| (!c.nodes[**n as usize].vram.contains_key(&m), **n))
            .copied();
        match pick {
            Some(n) => {
                self.idle.remove(&n);
                c.start(n, j, 1);
            }
            None => self.by_model.entry(m).or_default().push_back(j),
        }
        Ok(())
    }

    fn join(&mut self, c: &mut Core, n: u32) -> Result<()> {
        self.choose(c, n);
        self.node_free(c, n);
        Ok(())
    }

    fn leave(&mut self, c: &mut Core, n: u32, how: Departure) -> Result<()> {
        self.idle.remove(&n);
        for m in std::mem::take(&mut self.advertised[n as usize]) {
            self.advertisers[m as usize] -= 1;
        }
        let lost = on_leave(c, n, how == Departure::Zombie);
        self.requeue(c, lost);
        Ok(())
    }

    fn finished(&mut self, c: &mut Core, n: u32, run: Run) -> Result<()> {
        c.record_finish(run.job);
        c.mark_done(run.job);
        self.node_free(c, n);
        Ok(())
    }

    fn timer(&mut self, c: &mut Core, kind: u8, n: u32) -> Result<()> {
        if kind == DETECT {
            let lost = c.take_jobs(n);
            self.requeue(c, lost);
        }
        Ok(())
    }
}
