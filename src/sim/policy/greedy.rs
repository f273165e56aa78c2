//! B7 locality-greedy and its variants.
//!
//! - B7: each job to the node with the smallest estimated finish (the work
//!   committed there + the job's own fetch + load + generation, with the
//!   node's measured bandwidth and true speed), bound at arrival; the
//!   download starts when the job reaches the GPU.
//! - B7-late: the same placement, but binding is revised when a GPU frees
//!   up: a node with nothing left to do takes the last job of the longest
//!   queue if it would finish it sooner than that queue would (late
//!   binding by stealing).
//! - B7-prefetch: B7-late whose nodes also download a queued job's files
//!   at once (behind the node's other downloads), not when the job reaches
//!   the GPU.
//!
//! A pull variant (one central queue; a free node takes the oldest job it
//! is the best place for) was tried and dropped: under load its free
//! nodes kept taking jobs that needed downloads and it fell behind at
//! 22 jobs/s where B7 holds (docs/sim.md).

use std::cmp::Reverse;

use super::push::Placer;
use crate::sim::engine::Core;

pub(crate) struct Greedy {
    /// Queued jobs' files download at arrival.
    pub prefetch: bool,
    /// Idle nodes steal from long queues.
    pub steal: bool,
}

/// Work committed to `n`, ms from now.
fn backlog(c: &Core, n: u32) -> u64 {
    c.busy_left(n) + c.nodes[n as usize].local_est
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
        if !self.steal {
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
