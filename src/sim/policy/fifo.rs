//! B1 FIFO-any: the head of one global queue goes to any idle node.

use std::collections::{BTreeSet, VecDeque};

use super::{on_leave, Departure, Policy, DETECT};
use crate::error::Result;
use crate::sim::engine::Core;
use crate::sim::node::Run;

#[derive(Default)]
pub(crate) struct Fifo {
    queue: VecDeque<u32>,
    idle: BTreeSet<u32>,
}

impl Fifo {
    fn requeue(&mut self, c: &mut Core, runs: Vec<Run>) {
        for r in runs {
            match self.idle.pop_first() {
                Some(n) => c.start(n, r.job, r.attempt + 1),
                None => self.queue.push_front(r.job),
            }
        }
    }

    /// An idle node asks for work.
    fn node_free(&mut self, c: &mut Core, n: u32) {
        if !c.nodes[n as usize].up {
            return;
        }
        match self.queue.pop_front() {
            Some(j) => c.start(n, j, 1),
            None => {
                self.idle.insert(n);
            }
        }
    }
}

impl Policy for Fifo {
    fn arrival(&mut self, c: &mut Core, j: u32) -> Result<()> {
        match self.idle.pop_first() {
            Some(n) => c.start(n, j, 1),
            None => self.queue.push_back(j),
        }
        Ok(())
    }

    fn join(&mut self, c: &mut Core, n: u32) -> Result<()> {
        self.node_free(c, n);
        Ok(())
    }

    fn leave(&mut self, c: &mut Core, n: u32, how: Departure) -> Result<()> {
        self.idle.remove(&n);
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
