//! Placement policies: Corral (the scheduler in `src/scheduler`, through
//! an adapter) and the baselines of ../shared/BENCHMARK.md, each behind the
//! [`Policy`] trait so that the event loop treats them alike.
//!
//! A policy owns only its placement state (queues, indexes, the Corral
//! scheduler). It acts on nodes through `Core` (give a job, start one,
//! queue a download) and hears from them through the trait's hooks.
//! Baselines see node state directly (no heartbeat lag, which favours
//! them); Corral sees only what a worker reports.

mod corral;
mod fifo;
mod greedy;
mod horde;
mod push;
mod ray;
mod rendezvous;

use super::engine::Core;
use super::node::Run;
use super::params::SimParams;
use super::workload::World;
use crate::error::Result;

/// A placement policy, or a variant of one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Corral: the scheduler in src/scheduler, with replication.
    Corral,
    /// Ablation: Corral without replication (no `replicate` calls).
    #[value(name = "corral-norepl")]
    CorralNoRepl,
    /// Ablation: Corral without late binding (each node accepts
    /// `corral_early_slots` jobs and queues all but one, so jobs are bound
    /// before a GPU is free).
    #[value(name = "corral-early")]
    CorralEarly,
    /// Ablation: Corral without bandwidth awareness (workers report no
    /// measured download rate; the scheduler assumes its default).
    #[value(name = "corral-nobw")]
    CorralNoBw,
    /// Ablation: Corral without the surge response (`surge_ratio` 0).
    #[value(name = "corral-nosurge")]
    CorralNoSurge,
    /// FIFO-any.
    B1,
    /// Horde-strict: workers take only models they advertise.
    B3,
    /// Ray-multiplex: VRAM holder, else fewest loaded models.
    B4,
    /// Rendezvous hashing with bounded load, one k for every model.
    B6,
    /// Rendezvous hashing with bounded load, k proportional to the
    /// model's share of recent arrivals.
    #[value(name = "b6-prop")]
    B6Prop,
    /// Locality-greedy: each job to the node with the smallest estimated
    /// queue + fetch + load + generation, at arrival.
    B7,
    /// B7 with late binding: placement as B7, and a node that runs out of
    /// work takes the last job of the longest queue when it would finish
    /// it sooner.
    #[value(name = "b7-late")]
    B7Late,
    /// B7-late whose nodes also download a queued job's files at arrival
    /// (not when the job reaches the GPU).
    #[value(name = "b7-prefetch")]
    B7Prefetch,
}

impl PolicyKind {
    /// The policies of a default run: Corral, its ablations, every
    /// baseline and variant.
    pub const ALL: [PolicyKind; 13] = [
        PolicyKind::Corral,
        PolicyKind::CorralNoRepl,
        PolicyKind::CorralEarly,
        PolicyKind::CorralNoBw,
        PolicyKind::CorralNoSurge,
        PolicyKind::B1,
        PolicyKind::B3,
        PolicyKind::B4,
        PolicyKind::B6,
        PolicyKind::B6Prop,
        PolicyKind::B7,
        PolicyKind::B7Late,
        PolicyKind::B7Prefetch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Corral => "corral",
            Self::CorralNoRepl => "corral-norepl",
            Self::CorralEarly => "corral-early",
            Self::CorralNoBw => "corral-nobw",
            Self::CorralNoSurge => "corral-nosurge",
            Self::B1 => "b1-fifo",
            Self::B3 => "b3-horde",
            Self::B4 => "b4-ray",
            Self::B6 => "b6-rendezvous",
            Self::B6Prop => "b6-prop",
            Self::B7 => "b7-greedy",
            Self::B7Late => "b7-late",
            Self::B7Prefetch => "b7-prefetch",
        }
    }

    /// Corral or one of its ablations.
    pub fn is_corral(self) -> bool {
        matches!(
            self,
            Self::Corral
                | Self::CorralNoRepl
                | Self::CorralEarly
                | Self::CorralNoBw
                | Self::CorralNoSurge
        )
    }
}

/// Timer kinds (`Ev::Policy`).
pub(super) const TICK: u8 = 0;
pub(super) const HEARTBEAT: u8 = 1;
/// A zombie's silence noticed (baselines): its jobs go back.
pub(super) const DETECT: u8 = 2;

/// How a node leaves the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Departure {
    /// It vanished (a host interruption): its stream just ends.
    Crash,
    /// It stopped answering but still finishes its current job, silently.
    Zombie,
    /// It was stopped on purpose (a scale-in): the container got SIGTERM,
    /// and Corral's worker says GoingAway before it exits. Its jobs are
    /// lost to it all the same (the simulator models no grace period).
    Stopped,
}

/// What the event loop asks of a policy.
pub(super) trait Policy {
    /// Before the first event.
    fn begin(&mut self, _c: &mut Core) -> Result<()> {
        Ok(())
    }
    /// A job arrives.
    fn arrival(&mut self, c: &mut Core, job: u32) -> Result<()>;
    /// A node joined (with its image on disk).
    fn join(&mut self, c: &mut Core, n: u32) -> Result<()>;
    /// A node left (how: `Departure`).
    fn leave(&mut self, c: &mut Core, n: u32, how: Departure) -> Result<()>;
    /// A generation finished on `n` (the node is gone if it was a zombie's).
    fn finished(&mut self, c: &mut Core, n: u32, run: Run) -> Result<()>;
    /// The node's cache state changed.
    fn changed(&mut self, _c: &mut Core, _n: u32) -> Result<()> {
        Ok(())
    }
    /// A timer this policy set.
    fn timer(&mut self, c: &mut Core, kind: u8, arg: u32) -> Result<()>;
    /// End-of-run check against the jobs still in flight.
    fn check_end(&self, _inflight: u64) -> Result<()> {
        Ok(())
    }
}

pub(super) fn make(kind: PolicyKind, p: &SimParams, w: &World) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Corral
        | PolicyKind::CorralNoRepl
        | PolicyKind::CorralEarly
        | PolicyKind::CorralNoBw
        | PolicyKind::CorralNoSurge => Box::new(corral::CorralAdapter::new(kind, p, w)),
        PolicyKind::B1 => Box::new(fifo::Fifo::default()),
        PolicyKind::B3 => Box::new(horde::Horde::new(w)),
        PolicyKind::B4 => Box::new(push::Push::new(ray::Ray)),
        PolicyKind::B6 => Box::new(push::Push::new(rendezvous::Rendezvous::fixed(p))),
        PolicyKind::B6Prop => Box::new(push::Push::new(rendezvous::Rendezvous::proportional(p, w))),
        PolicyKind::B7 => Box::new(push::Push::new(greedy::Greedy {
            prefetch: false,
            steal: false,
        })),
        PolicyKind::B7Late => Box::new(push::Push::new(greedy::Greedy {
            prefetch: false,
            steal: true,
        })),
        PolicyKind::B7Prefetch => Box::new(push::Push::new(greedy::Greedy {
            prefetch: true,
            steal: true,
        })),
    }
}

/// Baselines: a node that left without a word is noticed after the
/// heartbeat timeout (a zombie); one whose stream ended, at once.
pub(super) fn on_leave(c: &mut Core, n: u32, zombie: bool) -> Vec<Run> {
    if zombie {
        let t = c.now + (c.p.heartbeat_timeout_s * 1e3) as u64;
        c.at(t, super::engine::Ev::Policy(DETECT, n));
        Vec::new()
    } else {
        c.take_jobs(n)
    }
}
