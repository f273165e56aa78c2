//! Push baselines: each job is committed to one node's local queue at
//! arrival, by a [`Placer`] (B4, B6, B7 and their variants). A job that
//! finds no node up waits until one joins; the jobs of a lost node are
//! placed again.

use std::collections::VecDeque;

use super::{on_leave, Departure, Policy, DETECT};
use crate::error::Result;
use crate::sim::engine::Core;
use crate::sim::node::Run;

/// Chooses the node for a job.
pub(crate) trait Placer {
    /// Before the first event.
    fn begin(&mut self, _c: &mut Core) {}
    /// Every arrival, before placement (for policies that learn demand).
    fn observe(&mut self, _c: &Core, _job: u32) {}
    /// The node for `job` among `up` (never empty).
    fn choose(&mut self, c: &Core, job: u32, up: &[u32]) -> u32;
    /// The job was committed to `n` (its GPU may have taken it already).
    fn placed(&mut self, _c: &mut Core, _n: u32, _job: u32) {}
    /// `n` is idle with nothing queued: work it may take from elsewhere.
    fn idle(&mut self, _c: &mut Core, _n: u32) {}
}

pub(crate) struct Push<P> {
    placer: P,
    /// Jobs that arrived while no node was up.
    waiting: VecDeque<u32>,
}

impl<P: Placer> Push<P> {
    pub(crate) fn new(placer: P) -> Self {
        Self {
            placer,
            waiting: VecDeque::new(),
        }
    }

    fn place(&mut self, c: &mut Core, j: u32) {
        let up = c.up_nodes();
        if up.is_empty() {
            self.waiting.push_back(j);
            return;
        }
        let n = self.placer.choose(c, j, &up);
        let est = c.estimate(n, j).1;
        c.give(n, j, 1, est);
        self.placer.placed(c, n, j);
    }
}

impl<P: Placer> Policy for Push<P> {
    fn begin(&mut self, c: &mut Core) -> Result<()> {
        self.placer.begin(c);
        Ok(())
    }

    fn arrival(&mut self, c: &mut Core, j: u32) -> Result<()> {
        self.placer.observe(c, j);
        self.place(c, j);
        Ok(())
    }

    fn join(&mut self, c: &mut Core, n: u32) -> Result<()> {
        let waiting: Vec<u32> = self.waiting.drain(..).collect();
        for j in waiting {
            self.place(c, j);
        }
        if c.nodes[n as usize].load() == 0 {
            self.placer.idle(c, n);
        }
        Ok(())
    }

    fn leave(&mut self, c: &mut Core, n: u32, how: Departure) -> Result<()> {
        for r in on_leave(c, n, how == Departure::Zombie) {
            self.place(c, r.job);
        }
        Ok(())
    }

    fn finished(&mut self, c: &mut Core, n: u32, run: Run) -> Result<()> {
        c.record_finish(run.job);
        c.mark_done(run.job);
        if c.nodes[n as usize].up && !c.start_next_local(n) {
            self.placer.idle(c, n);
        }
        Ok(())
    }

    fn timer(&mut self, c: &mut Core, kind: u8, n: u32) -> Result<()> {
        if kind == DETECT {
            for r in c.take_jobs(n) {
                self.place(c, r.job);
            }
        }
        Ok(())
    }
}
