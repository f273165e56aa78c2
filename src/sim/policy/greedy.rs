//! B7 locality-greedy and its variants.
//!
//! - B7: each job to the node with the smallest estimated finish (the work
//!   committed there + the job's own fetch + load + generation, with the
//!   node's measured bandwidth and true speed), bound at arrival; the
//!   download starts when the job reaches the GPU.
//! - B7-prefetch: the same placement, but a queued job's files download
//!   at once (behind the node's other downloads), and a node that runs out
//!   of work steals the last job of the longest queue when it would finish
//!   it sooner.
//! - B7-late: late binding. Jobs wait in one queue; a node that frees up
//!   takes, among the oldest `b7_window` jobs, the one it would finish
//!   soonest (a job older than `b7_starvation_s` first). An arriving job
//!   goes to the idle node that would finish it soonest, if any is idle.

use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};

use super::push::Placer;
use super::{on_leave, Policy, DETECT};
use crate::error::Result;
use crate::sim::engine::Core;
use crate::sim::node::Run;
use crate::sim::params::SimParams;

pub(crate) struct Greedy {
    pub prefetch: bool,
}

/// Work committed to `n`, ms from now.
fn backlog(c: &Core, n: u32) -> u64 {
    let x = &c.nodes[n as usize];
    x.busy_until.saturating_sub(c.now) + x.local_est
}

/// Whether a job at `n`'s GPU or in its queue needs file `f`.
fn needed_at(c: &Core, n: u32, f: u32) -> bool {
    let x = &c.nodes[n as usize];
    x.run()
        .into_iter()
        .chain(x.local.iter().copied())
        .any(|r| c.files(r.job).contains(&Some(f)))
}

impl Placer for Greedy {
    fn choose(&mut self, c: &Core, j: u32, up: &[u32]) -> u32 {
        *up.iter()
            .min_by_key(|n| (c.estimate(**n, j).0, **n))
            .expect("non-empty")
    }

    fn placed(&mut self, c: &mut Core, n: u32, j: u32) {
        let at_gpu = c.nodes[n as usize].run().is_some_and(|r| r.job == j);
        if self.prefetch && !at_gpu {
            for f in c.files(j).into_iter().flatten() {
                c.want(n, f);
            }
        }
    }

    fn idle(&mut self, c: &mut Core, n: u32) {
        if !self.prefetch {
            return;
        }
        let victim = c
            .up_nodes()
            .into_iter()
            .filter(|v| *v != n && !c.nodes[*v as usize].local.is_empty())
            .max_by_key(|v| (backlog(c, *v), Reverse(*v)));
        let Some(v) = victim else {
            return;
        };
        let r = *c.nodes[v as usize].local.back().expect("non-empty");
        let there = backlog(c, v);
        let here = c.estimate(n, r.job).1;
        if here >= there {
            return;
        }
        let x = &mut c.nodes[v as usize];
        x.local.pop_back();
        x.local_est -= r.est_ms;
        // The victim no longer fetches files only the stolen job needed
        // (unless the download is already under way).
        for f in c.files(r.job).into_iter().flatten() {
            if !needed_at(c, v, f) {
                c.nodes[v as usize].dl_q.retain(|q| *q != f);
            }
        }
        c.start(n, r.job, r.attempt);
    }
}

pub(crate) struct Late {
    queue: VecDeque<u32>,
    idle: BTreeSet<u32>,
    window: usize,
    starvation_ms: u64,
}

impl Late {
    pub(crate) fn new(p: &SimParams) -> Self {
        Self {
            queue: VecDeque::new(),
            idle: BTreeSet::new(),
            window: p.b7_window.max(1),
            starvation_ms: (p.b7_starvation_s * 1e3) as u64,
        }
    }

    /// The idle node that would finish `j` soonest takes it; false if no
    /// node is idle.
    fn give_idle(&mut self, c: &mut Core, j: u32, attempt: u32) -> bool {
        let best = self
            .idle
            .iter()
            .min_by_key(|n| (c.estimate(**n, j).1, **n))
            .copied();
        match best {
            Some(n) => {
                self.idle.remove(&n);
                c.start(n, j, attempt);
                true
            }
            None => false,
        }
    }

    /// A free node takes the queued job it would finish soonest.
    fn node_free(&mut self, c: &mut Core, n: u32) {
        if !c.nodes[n as usize].up {
            return;
        }
        let Some(&oldest) = self.queue.front() else {
            self.idle.insert(n);
            return;
        };
        let starving = c.now.saturating_sub(c.arrival(oldest).at_ms) > self.starvation_ms;
        let i = if starving {
            0
        } else {
            (0..self.queue.len().min(self.window))
                .min_by_key(|i| (c.estimate(n, self.queue[*i]).1, *i))
                .expect("non-empty")
        };
        let j = self.queue.remove(i).expect("in range");
        c.start(n, j, 1);
    }

    fn requeue(&mut self, c: &mut Core, runs: Vec<Run>) {
        for r in runs.into_iter().rev() {
            if !self.give_idle(c, r.job, r.attempt + 1) {
                self.queue.push_front(r.job);
            }
        }
    }
}

impl Policy for Late {
    fn arrival(&mut self, c: &mut Core, j: u32) -> Result<()> {
        if !self.give_idle(c, j, 1) {
            self.queue.push_back(j);
        }
        Ok(())
    }

    fn join(&mut self, c: &mut Core, n: u32) -> Result<()> {
        self.node_free(c, n);
        Ok(())
    }

    fn leave(&mut self, c: &mut Core, n: u32, zombie: bool) -> Result<()> {
        self.idle.remove(&n);
        let lost = on_leave(c, n, zombie);
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
