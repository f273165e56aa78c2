//! The Corral adapter: drives `crate::scheduler::Scheduler` exactly as the
//! coordinator does, with simulated workers.
//!
//! Each node connects with a `WorkerHello`, sends its full `CacheReport`
//! every `heartbeat_s` and on every change (download start or finish,
//! model loaded, attempt stopped), and reports completions with
//! `complete`; a 1 s tick calls `expire_workers`, `schedule` and
//! `replicate`. Effects are carried out as a worker would: `Assign` starts
//! the job (or queues it when the node takes several), `Prefetch` queues a
//! download, `Cancel` stops an attempt.
//!
//! The ablations are configurations of this adapter, never of the
//! scheduler's code: no `replicate` calls (corral-norepl); nodes that take
//! `corral_early_slots` jobs and run them one after another, so the
//! scheduler binds jobs at arrival (corral-early); reports without a
//! measured download rate (corral-nobw); no surge response
//! (corral-nosurge).

use std::sync::Arc;

use super::{Departure, Policy, PolicyKind, HEARTBEAT, TICK};
use crate::error::Result;
use crate::scheduler::{CostModel, Effect, Scheduler, SchedulerConfig};
use crate::sim::engine::{internal, Core, Ev};
use crate::sim::node::Run;
use crate::sim::params::SimParams;
use crate::sim::workload::{World, GB};
use crate::types::{
    CacheReport, DiskModel, DownloadState, JobId, JobSpec, ModelId, RunningJob, WorkerHello,
    WorkerId,
};

pub(crate) struct CorralAdapter {
    sched: Scheduler,
    workers: Vec<WorkerId>,
    models: Vec<ModelId>,
    replicate: bool,
    /// Jobs a node accepts at once (1: it takes work only when free).
    slots: u32,
    /// Whether reports carry the measured download rate.
    report_bandwidth: bool,
}

/// The scheduler's configuration for a simulated fleet.
pub(crate) fn scheduler_config(p: &SimParams) -> SchedulerConfig {
    SchedulerConfig {
        heartbeat_timeout_ms: (p.heartbeat_timeout_s * 1e3) as u64,
        min_warm_replicas: p.corral_min_replicas,
        starvation_ms: (p.corral_starvation_s * 1e3) as u64,
        recent_demand_per_hour: p.corral_recent_per_h,
        replica_disk_share: p.corral_disk_share,
        replica_headroom: p.corral_headroom,
        cost: CostModel {
            load_base_ms: (p.load_base_s * 1e3) as u64,
            load_bps: (p.load_gbps * GB) as u64,
            ..CostModel::default()
        },
        ..SchedulerConfig::default()
    }
}

fn parse_id(s: &str) -> Result<u32> {
    s.get(1..)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| internal(format!("bad simulated id {s:?}")))
}

impl CorralAdapter {
    pub(crate) fn new(kind: PolicyKind, p: &SimParams, w: &World) -> Self {
        let mut cfg = scheduler_config(p);
        if kind == PolicyKind::CorralNoSurge {
            cfg.surge_ratio = 0.0;
        }
        let mut sched = Scheduler::new(cfg);
        let models: Vec<ModelId> = (0..w.models).map(|m| ModelId(format!("m{m}"))).collect();
        for (m, id) in models.iter().enumerate() {
            sched.register_model(id.clone(), w.files[m].bytes);
        }
        Self {
            sched,
            workers: (0..w.lives.len())
                .map(|n| WorkerId(format!("n{n}")))
                .collect(),
            models,
            replicate: p.corral_replicate && kind != PolicyKind::CorralNoRepl,
            slots: if kind == PolicyKind::CorralEarly {
                p.corral_early_slots.max(1)
            } else {
                1
            },
            report_bandwidth: kind != PolicyKind::CorralNoBw,
        }
    }

    /// What the worker would report now.
    fn report(&self, c: &Core, n: u32) -> CacheReport {
        let x = &c.nodes[n as usize];
        let models = c.w.models as u32;
        CacheReport {
            vram_models: x
                .vram
                .keys()
                .map(|m| self.models[*m as usize].clone())
                .collect(),
            disk_models: x
                .disk
                .iter()
                .filter(|(f, _)| **f < models)
                .map(|(f, (_, baked))| DiskModel {
                    model_id: self.models[*f as usize].clone(),
                    bytes: c.w.files[*f as usize].bytes,
                    preloaded: *baked,
                })
                .collect(),
            // Downloads queued behind the one in progress are reported too
            // (at 0 bytes), as the worker's cache reports every download
            // it has accepted.
            downloads: x
                .dl
                .iter()
                .copied()
                .chain(x.dl_q.iter().map(|&f| (f, c.now, c.now)))
                .filter(|d| d.0 < models && !x.disk.contains_key(&d.0))
                .map(|(f, start, end)| {
                    let total = c.w.files[f as usize].bytes;
                    let span = end.saturating_sub(start).max(1);
                    let done = (total as u128 * u128::from(c.now.saturating_sub(start))
                        / u128::from(span)) as u64;
                    DownloadState {
                        model_id: self.models[f as usize].clone(),
                        bytes_done: done.min(total),
                        bytes_total: total,
                    }
                })
                .collect(),
            free_disk_bytes: x.disk_cap.saturating_sub(x.disk_used),
            running_jobs: x
                .run()
                .into_iter()
                .chain(x.local.iter().copied())
                .map(|r| RunningJob {
                    job_id: JobId(format!("j{}", r.job)),
                    attempt: r.attempt,
                })
                .collect(),
            download_bps: if self.report_bandwidth {
                x.measured_bps
            } else {
                0
            },
            draining: false,
        }
    }

    fn heartbeat(&mut self, c: &mut Core, n: u32) -> Result<()> {
        let report = self.report(c, n);
        let fx = self
            .sched
            .heartbeat(&self.workers[n as usize], report, c.now)
            .unwrap_or_default();
        self.apply(c, fx)
    }

    /// Carries out the scheduler's effects as workers would.
    fn apply(&mut self, c: &mut Core, effects: Vec<Effect>) -> Result<()> {
        for e in effects {
            match e {
                Effect::Assign {
                    worker,
                    job,
                    attempt,
                    ..
                } => {
                    let n = parse_id(&worker.0)?;
                    let j = parse_id(&job.0)?;
                    let x = &c.nodes[n as usize];
                    if !x.up {
                        // A zombie the scheduler has not yet expired.
                        continue;
                    }
                    if x.load() >= self.slots as usize {
                        return Err(internal(format!("node {n} assigned past its slots")));
                    }
                    let est = c.estimate(n, j).1;
                    c.give(n, j, attempt, est);
                }
                Effect::Prefetch { worker, model } => {
                    let n = parse_id(&worker.0)?;
                    let m = parse_id(&model.0)?;
                    c.want(n, m);
                }
                Effect::Cancel {
                    worker,
                    job,
                    attempt,
                } => {
                    let n = parse_id(&worker.0)?;
                    let j = parse_id(&job.0)?;
                    let x = &mut c.nodes[n as usize];
                    if !x.up {
                        continue;
                    }
                    if x.run().is_some_and(|r| r.job == j && r.attempt == attempt) {
                        c.stop(n);
                        c.start_next_local(n);
                    } else if let Some(i) = x
                        .local
                        .iter()
                        .position(|r| r.job == j && r.attempt == attempt)
                    {
                        let r = x.local.remove(i).expect("in range");
                        x.local_est -= r.est_ms;
                        c.note_changed(n);
                    }
                }
                Effect::Requeued { .. } => {}
                Effect::Failed { job, .. } => c.fail_job(parse_id(&job.0)?),
            }
        }
        Ok(())
    }
}

impl Policy for CorralAdapter {
    fn begin(&mut self, c: &mut Core) -> Result<()> {
        c.at(1000, Ev::Policy(TICK, 0));
        Ok(())
    }

    fn arrival(&mut self, c: &mut Core, j: u32) -> Result<()> {
        let spec = Arc::new(JobSpec::for_model(
            self.models[c.arrival(j).model as usize].clone(),
        ));
        match self.sched.submit(JobId(format!("j{j}")), spec, c.now) {
            Ok(fx) => self.apply(c, fx),
            Err(_) => {
                c.fail_job(j);
                Ok(())
            }
        }
    }

    fn join(&mut self, c: &mut Core, n: u32) -> Result<()> {
        let report = self.report(c, n);
        let x = &c.nodes[n as usize];
        let hello = WorkerHello {
            worker_id: self.workers[n as usize].clone(),
            version: "sim".into(),
            gpu_name: format!("class{}", x.class),
            vram_bytes: x.vram_cap + (c.p.vram_reserved_gb * GB) as u64,
            cache_max_bytes: x.disk_cap,
            max_concurrent_jobs: self.slots,
            state: report,
        };
        let fx = self.sched.connect(hello, c.now);
        let every = ((c.p.heartbeat_s * 1e3) as u64).max(1);
        let offset = u64::from(n) * 37 % every;
        c.at(c.now + offset.max(1), Ev::Policy(HEARTBEAT, n));
        self.apply(c, fx)
    }

    fn leave(&mut self, c: &mut Core, n: u32, how: Departure) -> Result<()> {
        // Jobs waiting in the node's own queue vanish with it; the
        // scheduler requeues every attempt it had assigned there.
        let x = &mut c.nodes[n as usize];
        x.local.clear();
        x.local_est = 0;
        let graceful = match how {
            // It stops heartbeating: `expire_workers` notices.
            Departure::Zombie => return Ok(()),
            Departure::Crash => false,
            // GoingAway: not a loss the replica targets should insure against.
            Departure::Stopped => true,
        };
        let fx = self
            .sched
            .disconnect(&self.workers[n as usize], "left", graceful, c.now);
        self.apply(c, fx)
    }

    fn finished(&mut self, c: &mut Core, n: u32, run: Run) -> Result<()> {
        c.record_finish(run.job);
        let job = JobId(format!("j{}", run.job));
        let fx = match self
            .sched
            .complete(&self.workers[n as usize], &job, run.attempt, c.now)
        {
            Ok(fx) => {
                c.mark_done(run.job);
                fx
            }
            // A superseded attempt: its result is refused.
            Err(_) => Vec::new(),
        };
        // The node's own queue goes first; new assignments queue behind.
        c.start_next_local(n);
        self.apply(c, fx)
    }

    fn changed(&mut self, c: &mut Core, n: u32) -> Result<()> {
        if c.nodes[n as usize].up {
            self.heartbeat(c, n)?;
        }
        Ok(())
    }

    fn timer(&mut self, c: &mut Core, kind: u8, n: u32) -> Result<()> {
        match kind {
            TICK => {
                let mut fx = self.sched.expire_workers(c.now);
                fx.extend(self.sched.schedule(c.now));
                if self.replicate {
                    fx.extend(self.sched.replicate(c.now));
                }
                c.at(c.now + 1000, Ev::Policy(TICK, 0));
                self.apply(c, fx)
            }
            HEARTBEAT if c.nodes[n as usize].up => {
                let every = ((c.p.heartbeat_s * 1e3) as u64).max(1);
                c.at(c.now + every, Ev::Policy(HEARTBEAT, n));
                self.heartbeat(c, n)
            }
            _ => Ok(()),
        }
    }

    fn check_end(&self, inflight: u64) -> Result<()> {
        if self.sched.job_count() as u64 != inflight {
            return Err(internal(format!(
                "scheduler holds {} jobs, {inflight} in flight",
                self.sched.job_count()
            )));
        }
        Ok(())
    }
}
