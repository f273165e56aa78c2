//! The event loop: timed events over the simulated fleet, handed to one
//! placement policy.
//!
//! Time is in simulated milliseconds. Events at equal times run in the
//! order they were scheduled. Nothing here reads the wall clock or iterates
//! a hash map, so a seed gives the same run every time.
//!
//! [`Core`] owns the world a run sees: the nodes (their model is in
//! `node.rs`), the jobs and the ledgers. The policy (`policy/`) owns only
//! its own placement state; it acts on nodes through `Core`'s methods, and
//! hears what the nodes did through [`Note`]s, delivered in order after
//! each event. `aggregate.rs` turns the finished run into a `RunResult`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::rngs::StdRng;

use super::aggregate::{self, RunResult};
use super::node::{Node, Run, Tier};
use super::params::SimParams;
use super::policy::{self, Departure, PolicyKind};
use super::workload::{stream, Arrival, World, POLICY};
use crate::error::{Error, Result};

/// A timed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Ev {
    Arrival(u32),
    Join(u32),
    Leave(u32),
    DlDone(u32, u64),
    Gpu(u32, u64),
    /// A zombie's late result: (node, job, attempt).
    ZombieDone(u32, u32, u32),
    /// A timer the policy set: (its kind, its argument).
    Policy(u8, u32),
    /// The scale-in event (`SimParams::scale_in`).
    ScaleIn,
}

/// What the node model tells the policy.
#[derive(Clone, Copy, Debug)]
pub(super) enum Note {
    /// The node's cache state changed (download started or finished, a
    /// model loaded, an attempt stopped): what a worker would report.
    Changed(u32),
    /// A job's generation finished on the node (a zombie's late result
    /// included: the node is then gone).
    Finished(u32, Run),
}

/// One job of the trace and what became of it.
#[derive(Clone, Debug)]
pub(super) struct JobRec {
    pub arr: Arrival,
    pub done_ms: Option<u64>,
    pub failed: bool,
    /// Generations finished (more than one: a duplicate).
    pub finishes: u32,
    /// Where its model was when its (first) GPU work began.
    pub tier: Option<Tier>,
}

/// Running totals, checked against each other at the end.
#[derive(Clone, Debug, Default)]
pub(super) struct Ledger {
    pub downloaded: u64,
    /// Bytes of downloads finished after warm-up.
    pub downloaded_measured: u64,
    pub inserted: u64,
    pub evicted: u64,
    pub gen_ms: u64,
    pub load_ms: u64,
    pub duplicates: u64,
    /// Bytes of downloads finished in the 30 minutes from the scale-in.
    pub downloaded_after_scale_in: u64,
    /// Of those, bytes no job on the node was waiting for (prefetches).
    pub prefetched_after_scale_in: u64,
    /// Jobs refused because no node could ever serve them (B3).
    pub unservable: u64,
    pub done: u64,
    pub failed: u64,
}

/// The simulated world of one run: nodes, jobs, ledgers, the clock.
pub(super) struct Core<'w> {
    pub p: &'w SimParams,
    pub w: &'w World,
    pub now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    /// One per node life (`World::lives`): a replacement is a new node.
    pub nodes: Vec<Node>,
    pub jobs: Vec<JobRec>,
    /// The policy's random stream.
    pub rng: StdRng,
    pub seed: u64,
    pub(super) use_tick: u64,
    pub notes: VecDeque<Note>,
    pub led: Ledger,
    /// Per node, (time, job) of each job its GPU took, in order: the
    /// request sequence the eviction replay (`belady.rs`) works on.
    pub requests: Vec<Vec<(u64, u32)>>,
    /// Most models a node keeps in VRAM (B4's per-node LRU); unbounded
    /// otherwise.
    pub vram_models_max: usize,
    pub end_ms: u64,
    pub aborted: bool,
    /// A goodput probe stops as soon as its p95 is certain to miss the SLO.
    probe: Option<Probe>,
    /// Jobs arrived so far (arrivals come in index order).
    pub arrived: u64,
    /// Fleet slots removed by a scale-in: their later lives never join.
    pub removed_slots: Vec<bool>,
}

pub(super) fn internal(msg: String) -> Error {
    Error::Internal(format!("simulation invariant: {msg}"))
}

impl<'w> Core<'w> {
    fn new(p: &'w SimParams, w: &'w World, seed: u64) -> Self {
        let nodes: Vec<Node> = w.lives.iter().map(|l| Node::new(p, l)).collect();
        let jobs = w
            .arrivals
            .iter()
            .map(|a| JobRec {
                arr: *a,
                done_ms: None,
                failed: false,
                finishes: 0,
                tier: None,
            })
            .collect();
        Self {
            p,
            w,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            requests: vec![Vec::new(); nodes.len()],
            nodes,
            jobs,
            rng: stream(seed, POLICY),
            seed,
            use_tick: 0,
            notes: VecDeque::new(),
            led: Ledger::default(),
            vram_models_max: usize::MAX,
            end_ms: w.end_ms + (p.drain_min * 60e3) as u64,
            aborted: false,
            probe: None,
            arrived: 0,
            removed_slots: vec![false; p.nodes],
        }
    }

    /// Schedules `ev` at `t`.
    pub fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, ev)));
    }

    pub fn arrival(&self, job: u32) -> &Arrival {
        &self.jobs[job as usize].arr
    }

    /// Nodes up now, by index.
    pub fn up_nodes(&self) -> Vec<u32> {
        (0..self.nodes.len() as u32)
            .filter(|n| self.nodes[*n as usize].up)
            .collect()
    }

    pub fn fail_job(&mut self, j: u32) {
        let r = &mut self.jobs[j as usize];
        if r.done_ms.is_none() && !r.failed {
            r.failed = true;
            self.led.failed += 1;
        }
    }

    /// A generation of `j` finished (counted even if superseded).
    pub fn record_finish(&mut self, j: u32) {
        let r = &mut self.jobs[j as usize];
        r.finishes += 1;
        if r.finishes == 2 {
            self.led.duplicates += 1;
        }
    }

    /// The job's result was accepted: it is done.
    pub fn mark_done(&mut self, j: u32) {
        let r = &mut self.jobs[j as usize];
        if r.done_ms.is_none() && !r.failed {
            r.done_ms = Some(self.now);
            self.led.done += 1;
        }
    }

    /// Tells the policy the node's state changed (one note per node in a
    /// row: the policy reads the state when it handles it).
    pub fn note_changed(&mut self, n: u32) {
        if !matches!(self.notes.back(), Some(Note::Changed(m)) if *m == n) {
            self.notes.push_back(Note::Changed(n));
        }
    }
}

/// Counts measured jobs already later than the SLO, to stop a probe whose
/// p95 must miss it: with `n` jobs in the window, p95 (the
/// `ceil(0.95 n)`-th smallest latency) exceeds the SLO once more than
/// `n - ceil(0.95 n)` jobs are late.
#[derive(Clone, Debug)]
struct Probe {
    slo_ms: u64,
    /// Jobs before this index arrived more than the SLO ago and are counted.
    next: usize,
    late: u64,
    allowed: u64,
}

impl Probe {
    fn new(p: &SimParams, w: &World) -> Self {
        let n = w
            .arrivals
            .iter()
            .filter(|a| a.at_ms >= w.warmup_ms && a.at_ms < w.end_ms)
            .count() as u64;
        Self {
            slo_ms: (p.slo_p95_s * 1e3) as u64,
            next: 0,
            late: 0,
            allowed: n - (0.95 * n as f64).ceil() as u64,
        }
    }

    /// Whether the p95 is now certain to exceed the SLO.
    fn failed(&mut self, c: &Core) -> bool {
        while let Some(r) = c.jobs.get(self.next) {
            let due = r.arr.at_ms + self.slo_ms;
            if due >= c.now {
                break;
            }
            let measured = r.arr.at_ms >= c.w.warmup_ms && r.arr.at_ms < c.w.end_ms;
            if measured && r.done_ms.is_none_or(|d| d > due) {
                self.late += 1;
            }
            self.next += 1;
        }
        self.late > self.allowed
    }
}

/// One run of `kind` on the world of (`seed`, `rate`).
pub fn run_once(p: &SimParams, kind: PolicyKind, seed: u64, rate: f64) -> Result<RunResult> {
    let p = &p.at_rate(rate);
    let world = World::generate(p, seed, rate);
    let c = simulate(p, &world, kind, seed, false)?;
    let mut r = aggregate::finish(&c.0, &*c.1)?;
    r.rate = rate;
    Ok(r)
}

/// A goodput probe: the p95 latency (s) of the measured window at `rate`,
/// or infinity as soon as it is certain to exceed the SLO (the run stops
/// there, so failing probes cost less).
pub fn probe_p95(p: &SimParams, kind: PolicyKind, seed: u64, rate: f64) -> Result<f64> {
    let p = &p.at_rate(rate);
    let world = World::generate(p, seed, rate);
    let (c, pol) = simulate(p, &world, kind, seed, true)?;
    if c.probe.as_ref().is_some_and(|pr| pr.late > pr.allowed) || c.aborted {
        return Ok(f64::INFINITY);
    }
    let r = aggregate::finish(&c, &*pol)?;
    Ok(aggregate::percentile(&r.latencies_s, 0.95))
}

fn simulate<'w>(
    p: &'w SimParams,
    world: &'w World,
    kind: PolicyKind,
    seed: u64,
    probe: bool,
) -> Result<(Core<'w>, Box<dyn policy::Policy>)> {
    let mut c = Core::new(p, world, seed);
    if probe {
        c.probe = Some(Probe::new(p, world));
    }
    let mut pol = policy::make(kind, p, world);
    for (i, a) in world.arrivals.iter().enumerate() {
        c.at(a.at_ms, Ev::Arrival(i as u32));
    }
    for (i, l) in world.lives.iter().enumerate() {
        if l.join_ms < c.end_ms {
            c.at(l.join_ms, Ev::Join(i as u32));
            if l.leave_ms < c.end_ms {
                c.at(l.leave_ms, Ev::Leave(i as u32));
            }
        }
    }
    if let Some(s) = &p.scale_in {
        c.at((s.at_min * 60e3) as u64, Ev::ScaleIn);
    }
    pol.begin(&mut c)?;
    // Past this many jobs outstanding (seconds of arrivals) the run is
    // hopelessly overloaded: stop, and count what is left as lost.
    let mean_rate = world.arrivals.len() as f64 / (world.end_ms as f64 / 1e3).max(1.0);
    let abort_at = (mean_rate * p.abort_backlog_s).max(1000.0) as u64;
    while let Some(Reverse((t, _, ev))) = c.events.pop() {
        if t > c.end_ms {
            break;
        }
        if let Ev::Arrival(_) = ev {
            if p.abort_backlog_s > 0.0 && c.arrived - c.led.done - c.led.failed > abort_at {
                c.aborted = true;
                break;
            }
            if let Some(mut pr) = c.probe.take() {
                let failed = pr.failed(&c);
                c.probe = Some(pr);
                if failed {
                    break;
                }
            }
            c.arrived += 1;
        }
        c.now = t;
        match ev {
            Ev::Arrival(j) => pol.arrival(&mut c, j)?,
            // A slot removed by a scale-in is not replaced.
            Ev::Join(n) if c.removed_slots[world.lives[n as usize].slot] => {}
            Ev::Join(n) => {
                c.join_node(n);
                pol.join(&mut c, n)?;
            }
            // Removed by a scale-in before its own departure.
            Ev::Leave(n) if !c.nodes[n as usize].up => {}
            Ev::Leave(n) => {
                let how = if c.leave_node(n) {
                    Departure::Zombie
                } else {
                    Departure::Crash
                };
                pol.leave(&mut c, n, how)?;
            }
            Ev::ScaleIn => {
                let s = p.scale_in.as_ref().expect("scheduled only with one");
                let how = if s.abrupt {
                    Departure::Crash
                } else {
                    Departure::Stopped
                };
                for n in super::scale_in::choose(&c, s) {
                    c.removed_slots[world.lives[n as usize].slot] = true;
                    c.remove_node(n);
                    pol.leave(&mut c, n, how)?;
                }
            }
            Ev::DlDone(n, tok) => c.dl_done(n, tok)?,
            Ev::Gpu(n, tok) => c.gpu_step(n, tok)?,
            Ev::ZombieDone(n, job, attempt) => c.notes.push_back(Note::Finished(
                n,
                Run {
                    job,
                    attempt,
                    est_ms: 0,
                    missed: false,
                },
            )),
            Ev::Policy(kind, arg) => pol.timer(&mut c, kind, arg)?,
        }
        while let Some(note) = c.notes.pop_front() {
            match note {
                Note::Changed(n) => pol.changed(&mut c, n)?,
                Note::Finished(n, run) => pol.finished(&mut c, n, run)?,
            }
        }
    }
    Ok((c, pol))
}
