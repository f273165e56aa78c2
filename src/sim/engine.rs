//! The discrete-event engine: simulated nodes that download, cache, load
//! and generate, driven by one policy (Corral's scheduler or a baseline).
//!
//! Time is in simulated milliseconds. Events at equal times run in the
//! order they were scheduled. Nothing here reads the wall clock or
//! iterates a hash map, so a seed gives the same run every time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

use rand::rngs::StdRng;

use super::params::SimParams;
use super::workload::{stream, Arrival, World, GB, POLICY};
use crate::error::{Error, Result};
use crate::scheduler::{CostModel, Effect, Scheduler, SchedulerConfig};
use crate::types::{
    CacheReport, DiskModel, DownloadState, JobId, JobSpec, ModelId, RunningJob, WorkerHello,
    WorkerId,
};

/// A placement policy.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Corral: the scheduler in src/scheduler, with replication.
    Corral,
    /// FIFO-any.
    B1,
    /// Horde-strict: workers take only models they advertise.
    B3,
    /// Ray-multiplex: VRAM holder, else fewest loaded models.
    B4,
    /// Rendezvous hashing with bounded load.
    B6,
    /// Locality-greedy: smallest estimated queue + fetch + load + generation.
    B7,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Corral,
        PolicyKind::B1,
        PolicyKind::B3,
        PolicyKind::B4,
        PolicyKind::B6,
        PolicyKind::B7,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Corral => "corral",
            Self::B1 => "b1-fifo",
            Self::B3 => "b3-horde",
            Self::B4 => "b4-ray",
            Self::B6 => "b6-rendezvous",
            Self::B7 => "b7-greedy",
        }
    }

    fn pushes(self) -> bool {
        matches!(self, Self::B4 | Self::B6 | Self::B7)
    }
}

/// Where a job found its model when its GPU work began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Vram,
    Baked,
    Disk,
    Miss,
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub rate: f64,
    /// Latency in seconds of each job arriving after warm-up (infinite when
    /// it never finished), sorted.
    pub latencies_s: Vec<f64>,
    pub arrived: u64,
    pub done: u64,
    pub failed: u64,
    /// Failed or never finished.
    pub lost: u64,
    /// Jobs whose generation finished more than once.
    pub duplicates: u64,
    pub zombies: u64,
    /// Jobs refused because no node could ever serve them (B3).
    pub unservable: u64,
    pub bytes_downloaded: u64,
    /// Bytes of downloads finished after warm-up.
    pub bytes_measured: u64,
    /// Jobs arriving after warm-up that finished.
    pub done_measured: u64,
    pub lb_churn_bytes: u64,
    pub lb_capacity_bytes: u64,
    pub hits_vram: u64,
    pub hits_baked: u64,
    pub hits_disk: u64,
    pub misses: u64,
    pub gen_s: f64,
    pub load_s: f64,
    /// p95 per minute of arrival time (minute, seconds).
    pub p95_by_minute: Vec<(u32, f64)>,
    /// p95 of each popularity decile (0 = most popular).
    pub p95_by_decile: Vec<f64>,
    pub steady_p99_s: f64,
    pub storm_p99_s: f64,
    /// Stopped early, hopelessly overloaded (`abort_backlog_s`).
    pub aborted: bool,
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(u32),
    Join(u32),
    Leave(u32),
    Detect(u32),
    DlDone(u32, u64),
    Gpu(u32, u64),
    ZombieDone(u32, u32, u32),
    Heartbeat(u32),
    Tick,
}

#[derive(Clone, Copy, Debug)]
struct Run {
    job: u32,
    attempt: u32,
    est_ms: u64,
    /// It waited for a download.
    missed: bool,
}

#[derive(Clone, Copy, Debug)]
enum Gpu {
    Idle,
    Waiting(Run),
    Loading(Run),
    Generating(Run),
}

struct Node {
    id: WorkerId,
    up: bool,
    gone: bool,
    zombie_busy: bool,
    class: usize,
    bps: f64,
    vram_cap: u64,
    disk_cap: u64,
    /// File -> (last use, baked).
    disk: BTreeMap<u32, (u64, bool)>,
    disk_used: u64,
    vram: BTreeMap<u32, u64>,
    vram_used: u64,
    dl: Option<(u32, u64, u64)>,
    dl_q: VecDeque<u32>,
    dl_token: u64,
    measured_bps: u64,
    gpu: Gpu,
    gpu_token: u64,
    busy_until: u64,
    local: VecDeque<Run>,
    local_est: u64,
    advertised: BTreeSet<u32>,
}

impl Node {
    fn run(&self) -> Option<Run> {
        match self.gpu {
            Gpu::Idle => None,
            Gpu::Waiting(r) | Gpu::Loading(r) | Gpu::Generating(r) => Some(r),
        }
    }
    fn load(&self) -> usize {
        self.local.len() + usize::from(self.run().is_some())
    }
}

struct JobRec {
    arr: Arrival,
    done_ms: Option<u64>,
    failed: bool,
    finishes: u32,
    tier: Option<Tier>,
}

pub struct Sim<'w> {
    p: &'w SimParams,
    w: &'w World,
    kind: PolicyKind,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    nodes: Vec<Node>,
    jobs: Vec<JobRec>,
    rng: StdRng,
    seed: u64,
    use_tick: u64,
    sched: Option<Scheduler>,
    fx: VecDeque<Effect>,
    model_ids: Vec<ModelId>,
    // pull baselines
    global: VecDeque<u32>,
    by_model: BTreeMap<u32, VecDeque<u32>>,
    advertisers: Vec<u32>,
    idle: BTreeSet<u32>,
    // ledgers
    downloaded: u64,
    /// Bytes of downloads finished after warm-up.
    downloaded_measured: u64,
    inserted: u64,
    evicted: u64,
    gen_ms: u64,
    load_ms: u64,
    duplicates: u64,
    unservable: u64,
    done: u64,
    failed: u64,
    end_ms: u64,
    aborted: bool,
    /// Jobs arrived so far (arrivals come in index order).
    arrived: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn internal(msg: String) -> Error {
    Error::Internal(format!("simulation invariant: {msg}"))
}

impl<'w> Sim<'w> {
    pub fn new(p: &'w SimParams, w: &'w World, kind: PolicyKind, seed: u64) -> Self {
        let nodes = w
            .lives
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let c = &p.fleet[l.class];
                Node {
                    id: WorkerId(format!("n{i}")),
                    up: false,
                    gone: false,
                    zombie_busy: false,
                    class: l.class,
                    bps: l.bps,
                    vram_cap: ((c.vram_gb - p.vram_reserved_gb).max(0.0) * GB) as u64,
                    disk_cap: (p.disk_gb * GB) as u64,
                    disk: BTreeMap::new(),
                    disk_used: 0,
                    vram: BTreeMap::new(),
                    vram_used: 0,
                    dl: None,
                    dl_q: VecDeque::new(),
                    dl_token: 0,
                    measured_bps: 0,
                    gpu: Gpu::Idle,
                    gpu_token: 0,
                    busy_until: 0,
                    local: VecDeque::new(),
                    local_est: 0,
                    advertised: BTreeSet::new(),
                }
            })
            .collect();
        let sched = (kind == PolicyKind::Corral).then(|| {
            let mut s = Scheduler::new(SchedulerConfig {
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
            });
            for m in 0..w.models {
                s.register_model(ModelId(format!("m{m}")), w.files[m].bytes);
            }
            s
        });
        Self {
            p,
            w,
            kind,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            nodes,
            jobs: Vec::with_capacity(w.arrivals.len()),
            rng: stream(seed, POLICY),
            seed,
            use_tick: 0,
            sched,
            fx: VecDeque::new(),
            model_ids: (0..w.models).map(|m| ModelId(format!("m{m}"))).collect(),
            global: VecDeque::new(),
            by_model: BTreeMap::new(),
            advertisers: vec![0; w.models],
            idle: BTreeSet::new(),
            downloaded: 0,
            downloaded_measured: 0,
            inserted: 0,
            evicted: 0,
            gen_ms: 0,
            load_ms: 0,
            duplicates: 0,
            unservable: 0,
            done: 0,
            failed: 0,
            end_ms: w.end_ms + (p.drain_min * 60e3) as u64,
            aborted: false,
            arrived: 0,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, ev)));
    }

    /// Runs to the end and checks the invariants.
    pub fn run(mut self) -> Result<RunResult> {
        for (i, a) in self.w.arrivals.iter().enumerate() {
            self.jobs.push(JobRec {
                arr: *a,
                done_ms: None,
                failed: false,
                finishes: 0,
                tier: None,
            });
            self.at(a.at_ms, Ev::Arrival(i as u32));
        }
        for (i, l) in self.w.lives.iter().enumerate() {
            if l.join_ms < self.end_ms {
                self.at(l.join_ms, Ev::Join(i as u32));
                if l.leave_ms < self.end_ms {
                    self.at(l.leave_ms, Ev::Leave(i as u32));
                }
            }
        }
        if self.sched.is_some() {
            self.at(1000, Ev::Tick);
        }
        // Past this many jobs outstanding (minutes of arrivals) the run is
        // hopelessly overloaded: stop, and count what is left as lost.
        let rate = self.w.arrivals.len() as f64 / (self.w.end_ms as f64 / 1e3).max(1.0);
        let abort_at = (rate * self.p.abort_backlog_s).max(1000.0) as u64;
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            if t > self.end_ms {
                break;
            }
            if let Ev::Arrival(_) = ev {
                if self.p.abort_backlog_s > 0.0 && self.arrived - self.done - self.failed > abort_at
                {
                    self.aborted = true;
                    break;
                }
                self.arrived += 1;
            }
            self.now = t;
            self.handle(ev)?;
            while let Some(e) = self.fx.pop_front() {
                self.effect(e)?;
            }
        }
        self.finish()
    }

    fn handle(&mut self, ev: Ev) -> Result<()> {
        match ev {
            Ev::Arrival(j) => self.arrival(j),
            Ev::Join(n) => self.join(n),
            Ev::Leave(n) => self.leave(n),
            Ev::Detect(n) => {
                self.lost_node_jobs(n);
                Ok(())
            }
            Ev::DlDone(n, tok) => self.dl_done(n, tok),
            Ev::Gpu(n, tok) => self.gpu_step(n, tok),
            Ev::ZombieDone(n, job, attempt) => {
                self.completed(
                    n,
                    Run {
                        job,
                        attempt,
                        est_ms: 0,
                        missed: false,
                    },
                );
                Ok(())
            }
            Ev::Heartbeat(n) => {
                if self.nodes[n as usize].up {
                    self.heartbeat(n);
                    let every = (self.p.heartbeat_s * 1e3) as u64;
                    self.at(self.now + every.max(1), Ev::Heartbeat(n));
                }
                Ok(())
            }
            Ev::Tick => {
                let now = self.now;
                let replicate = self.p.corral_replicate;
                let s = self.sched.as_mut().expect("corral");
                let mut e = s.expire_workers(now);
                e.extend(s.schedule(now));
                if replicate {
                    e.extend(s.replicate(now));
                }
                self.fx.extend(e);
                self.at(now + 1000, Ev::Tick);
                Ok(())
            }
        }
    }

    // ---- jobs --------------------------------------------------------------

    fn spec(&self, job: u32) -> Arc<JobSpec> {
        Arc::new(JobSpec::for_model(
            self.model_ids[self.jobs[job as usize].arr.model as usize].clone(),
        ))
    }

    fn arrival(&mut self, j: u32) -> Result<()> {
        match self.kind {
            PolicyKind::Corral => {
                let spec = self.spec(j);
                let s = self.sched.as_mut().expect("corral");
                match s.submit(JobId(format!("j{j}")), spec, self.now) {
                    Ok(e) => self.fx.extend(e),
                    Err(_) => self.fail_job(j),
                }
            }
            PolicyKind::B1 => {
                if let Some(n) = self.idle.pop_first() {
                    self.start(n, j, 1);
                } else {
                    self.global.push_back(j);
                }
            }
            PolicyKind::B3 => {
                let m = self.jobs[j as usize].arr.model;
                if self.advertisers[m as usize] == 0 {
                    self.unservable += 1;
                    self.fail_job(j);
                    return Ok(());
                }
                let pick = self
                    .idle
                    .iter()
                    .filter(|n| self.nodes[**n as usize].advertised.contains(&m))
                    .min_by_key(|n| (!self.nodes[**n as usize].vram.contains_key(&m), **n))
                    .copied();
                match pick {
                    Some(n) => {
                        self.idle.remove(&n);
                        self.start(n, j, 1);
                    }
                    None => self.by_model.entry(m).or_default().push_back(j),
                }
            }
            _ => self.place(j),
        }
        Ok(())
    }

    fn fail_job(&mut self, j: u32) {
        let r = &mut self.jobs[j as usize];
        if r.done_ms.is_none() && !r.failed {
            r.failed = true;
            self.failed += 1;
        }
    }

    /// Push baselines: choose a node's local queue now.
    fn place(&mut self, j: u32) {
        let a = self.jobs[j as usize].arr;
        let m = a.model;
        let up: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|n| self.nodes[*n as usize].up)
            .collect();
        if up.is_empty() {
            self.global.push_back(j);
            return;
        }
        let node = match self.kind {
            PolicyKind::B4 => {
                let warm = up
                    .iter()
                    .filter(|n| self.nodes[**n as usize].vram.contains_key(&m))
                    .min_by_key(|n| (self.nodes[**n as usize].load(), **n));
                match warm {
                    Some(n) => *n,
                    None => *up
                        .iter()
                        .min_by_key(|n| {
                            let x = &self.nodes[**n as usize];
                            (x.vram.len(), x.load(), **n)
                        })
                        .expect("non-empty"),
                }
            }
            PolicyKind::B6 => {
                let mut order: Vec<(u64, u32)> = up
                    .iter()
                    .map(|n| (splitmix(splitmix(u64::from(m)) ^ u64::from(*n)), *n))
                    .collect();
                order.sort_by_key(|(h, n)| (Reverse(*h), *n));
                let total: usize = up.iter().map(|n| self.nodes[*n as usize].load()).sum();
                let cap = (self.p.b6_cap * (total + 1) as f64 / up.len() as f64).ceil() as usize;
                let k = self.p.b6_k.max(1).min(order.len());
                let load = |n: u32| self.nodes[n as usize].load();
                let best_k = order[..k]
                    .iter()
                    .min_by_key(|(_, n)| load(*n))
                    .map(|(_, n)| *n)
                    .expect("k >= 1");
                if load(best_k) < cap.max(1) {
                    best_k
                } else {
                    order[k..]
                        .iter()
                        .find(|(_, n)| load(*n) < cap.max(1))
                        .map(|(_, n)| *n)
                        .unwrap_or(best_k)
                }
            }
            _ => {
                // B7: smallest estimated finish time.
                *up.iter()
                    .min_by_key(|n| (self.b7_estimate(**n, &a).0, **n))
                    .expect("non-empty")
            }
        };
        let est = self.b7_estimate(node, &a).1;
        self.enqueue_local(node, j, 1, est);
    }

    /// (estimated start-to-finish of this job on `n` counting the work
    /// queued there, this job's own fetch + load + generation).
    fn b7_estimate(&self, n: u32, a: &Arrival) -> (u64, u64) {
        let x = &self.nodes[n as usize];
        let bps = if x.measured_bps == 0 {
            CostModel::default().default_download_bps
        } else {
            x.measured_bps
        };
        let queued_files = |f: u32| {
            x.local
                .iter()
                .any(|r| self.needs(JobFiles::Job(r.job)).contains(&Some(f)))
        };
        let mut own = 0u64;
        for f in self.needs(a_job_files(a)).into_iter().flatten() {
            let have = x.disk.contains_key(&f)
                || x.dl.is_some_and(|d| d.0 == f)
                || x.dl_q.contains(&f)
                || queued_files(f);
            if !have {
                own += self.w.files[f as usize].bytes * 1000 / bps.max(1);
            }
        }
        let last_model = x
            .local
            .back()
            .map(|r| self.jobs[r.job as usize].arr.model)
            .or_else(|| x.run().map(|r| self.jobs[r.job as usize].arr.model));
        if !x.vram.contains_key(&a.model) || last_model.is_some_and(|m| m != a.model) {
            own += self.load_ms(a.model);
        }
        own += self.mean_gen_ms(x.class, a.model);
        let backlog = x.busy_until.saturating_sub(self.now) + x.local_est;
        (backlog + own, own)
    }

    fn needs(&self, job_or_files: JobFiles) -> [Option<u32>; 2] {
        match job_or_files {
            JobFiles::Job(j) => {
                let a = &self.jobs[j as usize].arr;
                [Some(a.model), a.lora]
            }
            JobFiles::Files(f) => f,
        }
    }

    fn enqueue_local(&mut self, n: u32, job: u32, attempt: u32, est_ms: u64) {
        let x = &mut self.nodes[n as usize];
        if matches!(x.gpu, Gpu::Idle) && x.local.is_empty() {
            self.start(n, job, attempt);
        } else {
            x.local.push_back(Run {
                job,
                attempt,
                est_ms,
                missed: false,
            });
            x.local_est += est_ms;
        }
    }

    fn mean_gen_ms(&self, class: usize, model: u32) -> u64 {
        let c = &self.p.fleet[class];
        let s = if self.w.files[model as usize].xl {
            c.sdxl_s
        } else {
            c.sd15_s
        };
        (s * 1e3) as u64
    }

    fn gen_ms(&self, class: usize, job: u32) -> u64 {
        let model = self.jobs[job as usize].arr.model;
        let u = (splitmix(self.seed ^ splitmix(u64::from(job))) >> 11) as f64 / (1u64 << 53) as f64;
        let jitter = 1.0 + self.p.jitter * (2.0 * u - 1.0);
        (self.mean_gen_ms(class, model) as f64 * jitter) as u64
    }

    fn load_ms(&self, model: u32) -> u64 {
        let b = self.w.files[model as usize].bytes as f64;
        ((self.p.load_base_s + b / (self.p.load_gbps * GB)) * 1e3) as u64
    }

    // ---- nodes -----------------------------------------------------------

    fn join(&mut self, n: u32) -> Result<()> {
        let baked = self.w.baked.clone();
        let tick = self.next_use();
        {
            let x = &mut self.nodes[n as usize];
            x.up = true;
            for f in &baked {
                x.disk.insert(*f, (tick, true));
            }
        }
        match self.kind {
            PolicyKind::Corral => {
                let report = self.report(n);
                let x = &self.nodes[n as usize];
                let hello = WorkerHello {
                    worker_id: x.id.clone(),
                    version: "sim".into(),
                    gpu_name: format!("class{}", x.class),
                    vram_bytes: x.vram_cap + (self.p.vram_reserved_gb * GB) as u64,
                    cache_max_bytes: x.disk_cap,
                    max_concurrent_jobs: 1,
                    state: report,
                };
                let e = self
                    .sched
                    .as_mut()
                    .expect("corral")
                    .connect(hello, self.now);
                self.fx.extend(e);
                let every = (self.p.heartbeat_s * 1e3) as u64;
                let offset = u64::from(n) * 37 % every.max(1);
                self.at(self.now + offset.max(1), Ev::Heartbeat(n));
            }
            PolicyKind::B3 => {
                self.b3_choose(n);
                self.node_free(n);
            }
            PolicyKind::B1 => self.node_free(n),
            _ => {
                // Push baselines: jobs that found no node wait here.
                let waiting: Vec<u32> = self.global.drain(..).collect();
                for j in waiting {
                    self.place(j);
                }
            }
        }
        Ok(())
    }

    /// B3: the node advertises its image plus models drawn by popularity
    /// that fill its disk, and fetches them at start.
    fn b3_choose(&mut self, n: u32) {
        let mut chosen: BTreeSet<u32> = self.w.baked.iter().copied().collect();
        let cap = self.nodes[n as usize].disk_cap;
        let mut used = 0u64;
        let zipf = rand_distr::Zipf::new(self.w.models as u64, self.p.zipf_s.max(0.0))
            .expect("valid zipf");
        let mut by_rank: Vec<u32> = vec![0; self.w.models];
        for (m, r) in self.w.rank0.iter().enumerate() {
            by_rank[*r] = m as u32;
        }
        let mut tries = 0;
        let mut order = Vec::new();
        while tries < 4 * self.w.models {
            tries += 1;
            let r = rand_distr::Distribution::sample(&zipf, &mut self.rng) as usize - 1;
            let m = by_rank[r.min(by_rank.len() - 1)];
            let b = self.w.files[m as usize].bytes;
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
        let x = &mut self.nodes[n as usize];
        x.advertised = chosen;
        x.dl_q.extend(order);
        self.kick(n);
    }

    fn leave(&mut self, n: u32) -> Result<()> {
        let zombie = self.w.lives[n as usize].zombie;
        let x = &mut self.nodes[n as usize];
        x.up = false;
        self.idle.remove(&n);
        if self.kind == PolicyKind::B3 {
            for m in std::mem::take(&mut self.nodes[n as usize].advertised) {
                self.advertisers[m as usize] -= 1;
            }
        }
        let x = &mut self.nodes[n as usize];
        if zombie && x.run().is_some() {
            // It stops talking but finishes its job, late.
            x.zombie_busy = true;
        } else {
            x.gone = true;
            x.gpu_token += 1;
            x.dl_token += 1;
        }
        match self.kind {
            PolicyKind::Corral => {
                if !zombie {
                    let id = self.nodes[n as usize].id.clone();
                    let e = self
                        .sched
                        .as_mut()
                        .expect("corral")
                        .disconnect(&id, "left", false, self.now);
                    self.fx.extend(e);
                }
            }
            _ => {
                if zombie {
                    let t = self.now + (self.p.heartbeat_timeout_s * 1e3) as u64;
                    self.at(t, Ev::Detect(n));
                } else {
                    self.lost_node_jobs(n);
                }
            }
        }
        Ok(())
    }

    /// Baselines: a node is known gone; its jobs go back to the policy.
    fn lost_node_jobs(&mut self, n: u32) {
        let x = &mut self.nodes[n as usize];
        let mut jobs: Vec<Run> = x.local.drain(..).collect();
        x.local_est = 0;
        if let Some(r) = x.run() {
            jobs.insert(0, r);
        }
        if !x.zombie_busy {
            x.gpu = Gpu::Idle;
        }
        for r in jobs {
            if self.jobs[r.job as usize].done_ms.is_some() {
                continue;
            }
            self.requeue(r.job, r.attempt + 1);
        }
    }

    fn requeue(&mut self, j: u32, attempt: u32) {
        match self.kind {
            PolicyKind::B1 => {
                if let Some(n) = self.idle.pop_first() {
                    self.start(n, j, attempt);
                } else {
                    self.global.push_front(j);
                }
            }
            PolicyKind::B3 => {
                let m = self.jobs[j as usize].arr.model;
                if self.advertisers[m as usize] == 0 {
                    self.fail_job(j);
                } else {
                    self.by_model.entry(m).or_default().push_front(j);
                    let idle: Vec<u32> = self.idle.iter().copied().collect();
                    for n in idle {
                        if self.nodes[n as usize].advertised.contains(&m) {
                            self.idle.remove(&n);
                            self.node_free(n);
                            break;
                        }
                    }
                }
            }
            _ => self.place(j),
        }
    }

    /// A pull node with nothing to do asks for work.
    fn node_free(&mut self, n: u32) {
        if !self.nodes[n as usize].up {
            return;
        }
        if self.kind.pushes() {
            if let Some(r) = self.nodes[n as usize].local.pop_front() {
                self.nodes[n as usize].local_est -= r.est_ms;
                self.start(n, r.job, r.attempt);
            }
            return;
        }
        let next = match self.kind {
            PolicyKind::B1 => self.global.pop_front(),
            PolicyKind::B3 => {
                let x = &self.nodes[n as usize];
                let best = x
                    .advertised
                    .iter()
                    .filter_map(|m| {
                        self.by_model
                            .get(m)
                            .and_then(|q| q.front())
                            .map(|j| (*j, *m))
                    })
                    .min();
                best.map(|(j, m)| {
                    let q = self.by_model.get_mut(&m).expect("exists");
                    q.pop_front();
                    if q.is_empty() {
                        self.by_model.remove(&m);
                    }
                    j
                })
            }
            _ => None,
        };
        match next {
            Some(j) => self.start(n, j, 1),
            None => {
                self.idle.insert(n);
            }
        }
    }

    fn next_use(&mut self) -> u64 {
        self.use_tick += 1;
        self.use_tick
    }

    /// The node's GPU takes a job.
    fn start(&mut self, n: u32, job: u32, attempt: u32) {
        let a = self.jobs[job as usize].arr;
        let est = self.b7_estimate(n, &a).1;
        let x = &mut self.nodes[n as usize];
        debug_assert!(matches!(x.gpu, Gpu::Idle));
        let missing: Vec<u32> = [Some(a.model), a.lora]
            .into_iter()
            .flatten()
            .filter(|f| !x.disk.contains_key(f))
            .collect();
        let run = Run {
            job,
            attempt,
            est_ms: est,
            missed: !missing.is_empty(),
        };
        x.gpu = Gpu::Waiting(run);
        x.busy_until = self.now + est;
        if missing.is_empty() {
            self.proceed(n);
            return;
        }
        for f in missing.iter().rev() {
            if x.dl.is_some_and(|d| d.0 == *f) {
                continue;
            }
            x.dl_q.retain(|q| q != f);
            x.dl_q.push_front(*f);
        }
        self.kick(n);
    }

    /// Starts the next download if the channel is free.
    fn kick(&mut self, n: u32) {
        let now = self.now;
        let x = &mut self.nodes[n as usize];
        if x.dl.is_some() || x.gone {
            return;
        }
        while let Some(f) = x.dl_q.pop_front() {
            if x.disk.contains_key(&f) {
                continue;
            }
            let bytes = self.w.files[f as usize].bytes;
            let ms = (bytes as f64 / x.bps * 1e3).ceil() as u64;
            x.dl = Some((f, now, now + ms.max(1)));
            let tok = x.dl_token;
            self.at(now + ms.max(1), Ev::DlDone(n, tok));
            if self.kind == PolicyKind::Corral && (f as usize) < self.w.models {
                self.heartbeat(n);
            }
            return;
        }
    }

    fn dl_done(&mut self, n: u32, tok: u64) -> Result<()> {
        let x = &mut self.nodes[n as usize];
        if x.gone || tok != x.dl_token {
            return Ok(());
        }
        let Some((f, start, _)) = x.dl.take() else {
            return Ok(());
        };
        let bytes = self.w.files[f as usize].bytes;
        let took = self.now.saturating_sub(start).max(1);
        x.measured_bps = bytes * 1000 / took;
        self.downloaded += bytes;
        if self.now >= self.w.warmup_ms {
            self.downloaded_measured += bytes;
        }
        self.insert_disk(n, f)?;
        let waiting = match self.nodes[n as usize].gpu {
            Gpu::Waiting(r) => Some(r),
            _ => None,
        };
        if let Some(r) = waiting {
            let x = &self.nodes[n as usize];
            let a = &self.jobs[r.job as usize].arr;
            if [Some(a.model), a.lora]
                .into_iter()
                .flatten()
                .all(|f| x.disk.contains_key(&f))
            {
                self.proceed(n);
            }
        }
        if !self.nodes[n as usize].zombie_busy {
            self.kick(n);
        }
        if self.kind == PolicyKind::Corral && self.nodes[n as usize].up {
            self.heartbeat(n);
        }
        Ok(())
    }

    fn pinned(&self, n: u32) -> [Option<u32>; 2] {
        match self.nodes[n as usize].run() {
            Some(r) => self.needs(JobFiles::Job(r.job)),
            None => [None, None],
        }
    }

    fn insert_disk(&mut self, n: u32, f: u32) -> Result<()> {
        let bytes = self.w.files[f as usize].bytes;
        let pinned = self.pinned(n);
        let tick = self.next_use();
        let x = &mut self.nodes[n as usize];
        if x.disk.contains_key(&f) {
            return Err(internal(format!(
                "node {n} downloaded file {f} it already held"
            )));
        }
        while x.disk_used + bytes > x.disk_cap {
            let victim = x
                .disk
                .iter()
                .filter(|(g, (_, baked))| !*baked && !pinned.contains(&Some(**g)))
                .min_by_key(|(g, (t, _))| (*t, **g))
                .map(|(g, _)| *g);
            let Some(v) = victim else {
                return Err(internal(format!("node {n}: disk full of pinned files")));
            };
            x.disk.remove(&v);
            let vb = self.w.files[v as usize].bytes;
            x.disk_used -= vb;
            self.evicted += vb;
        }
        x.disk.insert(f, (tick, false));
        x.disk_used += bytes;
        self.inserted += bytes;
        if x.disk_used > x.disk_cap {
            return Err(internal(format!("node {n}: disk over capacity")));
        }
        Ok(())
    }

    /// Files present: load (if needed) then generate.
    fn proceed(&mut self, n: u32) {
        let Gpu::Waiting(run) = self.nodes[n as usize].gpu else {
            return;
        };
        let a = self.jobs[run.job as usize].arr;
        let tick = self.next_use();
        let load = self.load_ms(a.model);
        let gen = self.gen_ms(self.nodes[n as usize].class, run.job);
        let model_bytes = self.w.files[a.model as usize].bytes;
        let b4 = self.kind == PolicyKind::B4;
        let b4_cap = self.p.b4_vram_models.max(1);
        let x = &mut self.nodes[n as usize];
        let baked = x.disk.get(&a.model).is_some_and(|d| d.1);
        for f in [Some(a.model), a.lora].into_iter().flatten() {
            if let Some(e) = x.disk.get_mut(&f) {
                e.0 = tick;
            }
        }
        let tier = if run.missed {
            Tier::Miss
        } else if x.vram.contains_key(&a.model) {
            Tier::Vram
        } else if baked {
            Tier::Baked
        } else {
            Tier::Disk
        };
        let rec = &mut self.jobs[run.job as usize];
        if rec.tier.is_none() {
            rec.tier = Some(tier);
        }
        let tok = x.gpu_token;
        if let Some(t) = x.vram.get_mut(&a.model) {
            *t = tick;
            x.gpu = Gpu::Generating(run);
            self.gen_ms += gen;
            self.at(self.now + gen, Ev::Gpu(n, tok));
            return;
        }
        while x.vram_used + model_bytes > x.vram_cap || (b4 && x.vram.len() >= b4_cap) {
            let Some((&v, _)) = x.vram.iter().min_by_key(|(m, t)| (**t, **m)) else {
                break;
            };
            x.vram.remove(&v);
            x.vram_used -= self.w.files[v as usize].bytes;
        }
        x.vram.insert(a.model, tick);
        x.vram_used += model_bytes;
        x.gpu = Gpu::Loading(run);
        self.load_ms += load;
        self.at(self.now + load, Ev::Gpu(n, tok));
    }

    fn gpu_step(&mut self, n: u32, tok: u64) -> Result<()> {
        let x = &self.nodes[n as usize];
        if tok != x.gpu_token {
            return Ok(());
        }
        if x.vram_used > x.vram_cap {
            return Err(internal(format!("node {n}: VRAM over capacity")));
        }
        match x.gpu {
            Gpu::Loading(run) => {
                let gen = self.gen_ms(x.class, run.job);
                self.nodes[n as usize].gpu = Gpu::Generating(run);
                self.gen_ms += gen;
                self.at(self.now + gen, Ev::Gpu(n, tok));
                if self.kind == PolicyKind::Corral && self.nodes[n as usize].up {
                    self.heartbeat(n);
                }
            }
            Gpu::Generating(run) => {
                let x = &mut self.nodes[n as usize];
                x.gpu = Gpu::Idle;
                if x.zombie_busy {
                    x.zombie_busy = false;
                    x.gone = true;
                    x.gpu_token += 1;
                    x.dl_token += 1;
                    let t = self.now + (self.p.zombie_delay_s * 1e3) as u64;
                    self.at(t, Ev::ZombieDone(n, run.job, run.attempt));
                    return Ok(());
                }
                self.completed(n, run);
                if self.kind != PolicyKind::Corral {
                    self.node_free(n);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn completed(&mut self, n: u32, run: Run) {
        let rec = &mut self.jobs[run.job as usize];
        rec.finishes += 1;
        if rec.finishes == 2 {
            self.duplicates += 1;
        }
        let accepted = match self.kind {
            PolicyKind::Corral => {
                let id = self.nodes[n as usize].id.clone();
                let s = self.sched.as_mut().expect("corral");
                match s.complete(&id, &JobId(format!("j{}", run.job)), run.attempt, self.now) {
                    Ok(e) => {
                        self.fx.extend(e);
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => true,
        };
        let rec = &mut self.jobs[run.job as usize];
        if accepted && rec.done_ms.is_none() && !rec.failed {
            rec.done_ms = Some(self.now);
            self.done += 1;
        }
    }

    // ---- Corral wiring ---------------------------------------------------

    fn report(&self, n: u32) -> CacheReport {
        let x = &self.nodes[n as usize];
        let models = self.w.models as u32;
        CacheReport {
            vram_models: x
                .vram
                .keys()
                .map(|m| self.model_ids[*m as usize].clone())
                .collect(),
            disk_models: x
                .disk
                .iter()
                .filter(|(f, _)| **f < models)
                .map(|(f, (_, baked))| DiskModel {
                    model_id: self.model_ids[*f as usize].clone(),
                    bytes: self.w.files[*f as usize].bytes,
                    preloaded: *baked,
                })
                .collect(),
            downloads: x
                .dl
                .iter()
                .filter(|d| d.0 < models)
                .map(|(f, start, end)| {
                    let total = self.w.files[*f as usize].bytes;
                    let span = end.saturating_sub(*start).max(1);
                    let done = (total as u128 * u128::from(self.now.saturating_sub(*start))
                        / u128::from(span)) as u64;
                    DownloadState {
                        model_id: self.model_ids[*f as usize].clone(),
                        bytes_done: done.min(total),
                        bytes_total: total,
                    }
                })
                .collect(),
            free_disk_bytes: x.disk_cap.saturating_sub(x.disk_used),
            running_jobs: x
                .run()
                .map(|r| RunningJob {
                    job_id: JobId(format!("j{}", r.job)),
                    attempt: r.attempt,
                })
                .into_iter()
                .collect(),
            download_bps: x.measured_bps,
            draining: false,
        }
    }

    fn heartbeat(&mut self, n: u32) {
        let report = self.report(n);
        let id = self.nodes[n as usize].id.clone();
        if let Ok(e) = self
            .sched
            .as_mut()
            .expect("corral")
            .heartbeat(&id, report, self.now)
        {
            self.fx.extend(e);
        }
    }

    fn effect(&mut self, e: Effect) -> Result<()> {
        match e {
            Effect::Assign {
                worker,
                job,
                attempt,
                ..
            } => {
                let n = parse_id(&worker.0)?;
                let j = parse_id(&job.0)?;
                let x = &self.nodes[n as usize];
                if !x.up {
                    // A zombie the scheduler has not yet expired.
                    return Ok(());
                }
                if x.run().is_some() {
                    return Err(internal(format!("node {n} assigned while busy")));
                }
                self.start(n, j, attempt);
            }
            Effect::Prefetch { worker, model } => {
                let n = parse_id(&worker.0)?;
                let m = parse_id(&model.0)?;
                let x = &mut self.nodes[n as usize];
                if x.up && !x.disk.contains_key(&m) && !x.dl_q.contains(&m) {
                    x.dl_q.push_back(m);
                    self.kick(n);
                }
            }
            Effect::Cancel {
                worker,
                job,
                attempt,
            } => {
                let n = parse_id(&worker.0)?;
                let j = parse_id(&job.0)?;
                let x = &mut self.nodes[n as usize];
                if x.run().is_some_and(|r| r.job == j && r.attempt == attempt) && x.up {
                    x.gpu = Gpu::Idle;
                    x.gpu_token += 1;
                    self.heartbeat(n);
                }
            }
            Effect::Requeued { .. } => {}
            Effect::Failed { job, .. } => {
                let j = parse_id(&job.0)?;
                self.fail_job(j);
            }
        }
        Ok(())
    }

    // ---- results ---------------------------------------------------------

    fn finish(self) -> Result<RunResult> {
        let arrived = self.arrived;
        let mut inflight = 0u64;
        for (i, r) in self.jobs.iter().enumerate().take(arrived as usize) {
            if r.done_ms.is_some() && r.failed {
                return Err(internal(format!("job {i} both done and failed")));
            }
            if r.done_ms.is_none() && !r.failed {
                inflight += 1;
            }
        }
        if self.done + self.failed + inflight != arrived {
            return Err(internal(format!(
                "arrived {arrived} != done {} + failed {} + in flight {inflight}",
                self.done, self.failed
            )));
        }
        if let Some(s) = &self.sched {
            if s.job_count() as u64 != inflight {
                return Err(internal(format!(
                    "scheduler holds {} jobs, {inflight} in flight",
                    s.job_count()
                )));
            }
        }
        if self.downloaded != self.inserted {
            return Err(internal(format!(
                "downloaded {} bytes but inserted {}",
                self.downloaded, self.inserted
            )));
        }
        let held: u64 = self.nodes.iter().map(|x| x.disk_used).sum();
        if held != self.inserted - self.evicted {
            return Err(internal(format!(
                "disks hold {held} bytes; inserts - evictions = {}",
                self.inserted - self.evicted
            )));
        }
        let warm = self.w.warmup_ms;
        let end = self.w.end_ms;
        let lat = |r: &JobRec| {
            r.done_ms.map_or(f64::INFINITY, |d| {
                d.saturating_sub(r.arr.at_ms) as f64 / 1e3
            })
        };
        let measured: Vec<&JobRec> = self
            .jobs
            .iter()
            .filter(|r| r.arr.at_ms >= warm && r.arr.at_ms < end)
            .collect();
        let mut latencies: Vec<f64> = measured.iter().map(|r| lat(r)).collect();
        latencies.sort_by(f64::total_cmp);
        let mut res = RunResult {
            arrived,
            done: self.done,
            failed: self.failed,
            lost: arrived - self.done,
            duplicates: self.duplicates,
            unservable: self.unservable,
            zombies: self
                .w
                .lives
                .iter()
                .filter(|l| l.zombie && l.leave_ms < end)
                .count() as u64,
            bytes_downloaded: self.downloaded,
            bytes_measured: self.downloaded_measured,
            done_measured: measured.iter().filter(|r| r.done_ms.is_some()).count() as u64,
            aborted: self.aborted,
            gen_s: self.gen_ms as f64 / 1e3,
            load_s: self.load_ms as f64 / 1e3,
            ..Default::default()
        };
        for r in &measured {
            match r.tier {
                Some(Tier::Vram) => res.hits_vram += 1,
                Some(Tier::Baked) => res.hits_baked += 1,
                Some(Tier::Disk) => res.hits_disk += 1,
                Some(Tier::Miss) => res.misses += 1,
                None => {}
            }
        }
        // p95 per minute of arrival.
        let mut by_min: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        let mut by_decile: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for r in &measured {
            by_min
                .entry((r.arr.at_ms / 60_000) as u32)
                .or_default()
                .push(lat(r));
            let d = self.w.rank0[r.arr.model as usize] * 10 / self.w.models.max(1);
            by_decile.entry(d).or_default().push(lat(r));
        }
        for (m, mut v) in by_min {
            v.sort_by(f64::total_cmp);
            res.p95_by_minute.push((m, percentile(&v, 0.95)));
        }
        for (_, mut v) in by_decile {
            v.sort_by(f64::total_cmp);
            res.p95_by_decile.push(percentile(&v, 0.95));
        }
        if let Some(storm) = &self.p.storm {
            let at = (storm.at_min * 60e3) as u64;
            let mut steady: Vec<f64> = measured
                .iter()
                .filter(|r| r.arr.at_ms < at)
                .map(|r| lat(r))
                .collect();
            let mut during: Vec<f64> = measured
                .iter()
                .filter(|r| r.arr.at_ms >= at && r.arr.at_ms < at + 15 * 60_000)
                .map(|r| lat(r))
                .collect();
            steady.sort_by(f64::total_cmp);
            during.sort_by(f64::total_cmp);
            res.steady_p99_s = percentile(&steady, 0.99);
            res.storm_p99_s = percentile(&during, 0.99);
        }
        let (churn, cap) = super::bounds::lower_bounds(self.p, self.w, self.end_ms);
        res.lb_churn_bytes = churn;
        res.lb_capacity_bytes = cap;
        res.latencies_s = latencies;
        Ok(res)
    }
}

/// The files a job needs, or a given pair.
#[derive(Clone, Copy)]
enum JobFiles {
    Job(u32),
    Files([Option<u32>; 2]),
}

fn a_job_files(a: &Arrival) -> JobFiles {
    JobFiles::Files([Some(a.model), a.lora])
}

fn parse_id(s: &str) -> Result<u32> {
    s.get(1..)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| internal(format!("bad simulated id {s:?}")))
}

/// One run of `policy` on the world of (`seed`, `rate`).
pub fn run_once(p: &SimParams, policy: PolicyKind, seed: u64, rate: f64) -> Result<RunResult> {
    let world = World::generate(p, seed, rate);
    let mut r = Sim::new(p, &world, policy, seed).run()?;
    r.rate = rate;
    Ok(r)
}
