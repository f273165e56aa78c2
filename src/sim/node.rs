//! The node model: what a simulated worker does with the jobs and
//! downloads it is given.
//!
//! A node has a disk (an LRU cache of `disk_gb` plus the models baked into
//! the image, which are never evicted), VRAM (models by size with some
//! reserved, LRU), one download channel (a FIFO; the files of the job at
//! the GPU jump the queue, behind the download in progress), a GPU that
//! loads a model and then generates, and a local FIFO of jobs committed to
//! it (push baselines, and Corral with several slots). Policies act on
//! nodes only through the `Core` methods here; the node tells them what
//! happened through `Note`s.

use std::collections::{BTreeMap, VecDeque};

use super::engine::{internal, Core, Ev, Note};
use super::params::SimParams;
use super::workload::{NodeLife, GB};
use crate::error::Result;
use crate::scheduler::CostModel;

/// One attempt of a job on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub job: u32,
    pub attempt: u32,
    /// Its own estimated fetch + load + generation when it was placed.
    pub est_ms: u64,
    /// It waited for a download.
    pub missed: bool,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Gpu {
    Idle,
    /// Its files are downloading.
    Waiting(Run),
    Loading(Run),
    Generating(Run),
}

/// Where a job found its model when its GPU work began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Vram,
    Baked,
    Disk,
    Miss,
}

pub(super) struct Node {
    pub up: bool,
    /// Left (a zombie is gone once its last job finished).
    pub gone: bool,
    /// Left as a zombie: still finishing its current job.
    pub zombie_busy: bool,
    pub class: usize,
    /// True download rate, bytes per second.
    pub bps: f64,
    pub vram_cap: u64,
    pub disk_cap: u64,
    /// File -> (last use, baked).
    pub disk: BTreeMap<u32, (u64, bool)>,
    pub disk_used: u64,
    /// Model -> last use.
    pub vram: BTreeMap<u32, u64>,
    pub vram_used: u64,
    /// (file, start ms, end ms) of the download in progress.
    pub dl: Option<(u32, u64, u64)>,
    pub dl_q: VecDeque<u32>,
    dl_token: u64,
    /// Rate of the last finished download, bytes per second (0: none yet).
    pub measured_bps: u64,
    pub gpu: Gpu,
    gpu_token: u64,
    /// When the job at the GPU is expected to finish.
    pub busy_until: u64,
    /// Jobs committed to this node, waiting for its GPU.
    pub local: VecDeque<Run>,
    /// Sum of their `est_ms`.
    pub local_est: u64,
}

impl Node {
    pub fn new(p: &SimParams, l: &NodeLife) -> Self {
        let c = &p.fleet[l.class];
        Node {
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
        }
    }

    /// The attempt at the GPU, if any.
    pub fn run(&self) -> Option<Run> {
        match self.gpu {
            Gpu::Idle => None,
            Gpu::Waiting(r) | Gpu::Loading(r) | Gpu::Generating(r) => Some(r),
        }
    }

    /// Jobs at the GPU or waiting for it here.
    pub fn load(&self) -> usize {
        self.local.len() + usize::from(self.run().is_some())
    }

    /// Holds the file on disk or is fetching it (or will).
    pub fn has_or_fetching(&self, f: u32) -> bool {
        self.disk.contains_key(&f) || self.dl.is_some_and(|d| d.0 == f) || self.dl_q.contains(&f)
    }
}

impl Core<'_> {
    /// The files a job needs: its model and maybe a LoRA.
    pub fn files(&self, job: u32) -> [Option<u32>; 2] {
        let a = &self.jobs[job as usize].arr;
        [Some(a.model), a.lora]
    }

    pub fn next_use(&mut self) -> u64 {
        self.use_tick += 1;
        self.use_tick
    }

    pub fn mean_gen_ms(&self, class: usize, model: u32) -> u64 {
        let c = &self.p.fleet[class];
        let s = if self.w.files[model as usize].xl {
            c.sdxl_s
        } else {
            c.sd15_s
        };
        (s * 1e3) as u64
    }

    /// The job's generation time on a node of `class`: a fixed jitter per
    /// job, so every policy sees the same job.
    pub fn gen_ms(&self, class: usize, job: u32) -> u64 {
        let model = self.jobs[job as usize].arr.model;
        let u = (splitmix(self.seed ^ splitmix(u64::from(job))) >> 11) as f64 / (1u64 << 53) as f64;
        let jitter = 1.0 + self.p.jitter * (2.0 * u - 1.0);
        (self.mean_gen_ms(class, model) as f64 * jitter) as u64
    }

    pub fn load_ms(&self, model: u32) -> u64 {
        let b = self.w.files[model as usize].bytes as f64;
        ((self.p.load_base_s + b / (self.p.load_gbps * GB)) * 1e3) as u64
    }

    /// B7's estimate for `job` on `n`: (finish from now counting the work
    /// committed there, this job's own fetch + load + generation). Uses the
    /// node's measured bandwidth and true class speed (which Corral has to
    /// learn).
    /// The node's download rate as a baseline knows it: the last one
    /// measured, else the scheduler's default.
    pub fn known_bps(&self, n: u32) -> u64 {
        match self.nodes[n as usize].measured_bps {
            0 => CostModel::default().default_download_bps,
            bps => bps,
        }
    }

    /// Until the job at `n`'s GPU is done, ms: its estimate, but never
    /// less than the download it waits for still needs (an estimate made
    /// with a guessed bandwidth can run out while the node is still busy).
    pub fn busy_left(&self, n: u32) -> u64 {
        let x = &self.nodes[n as usize];
        let left = x.busy_until.saturating_sub(self.now);
        match (x.gpu, x.dl) {
            (Gpu::Waiting(_), Some((_, _, end))) => left.max(end.saturating_sub(self.now)),
            _ => left,
        }
    }

    pub fn estimate(&self, n: u32, job: u32) -> (u64, u64) {
        let x = &self.nodes[n as usize];
        let a = self.jobs[job as usize].arr;
        let bps = self.known_bps(n);
        let queued_files = |f: u32| x.local.iter().any(|r| self.files(r.job).contains(&Some(f)));
        let mut own = 0u64;
        for f in self.files(job).into_iter().flatten() {
            if !x.has_or_fetching(f) && !queued_files(f) {
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
        let backlog = self.busy_left(n) + x.local_est;
        (backlog + own, own)
    }

    // ---- life ------------------------------------------------------------

    /// The node joins with only its image on disk.
    pub fn join_node(&mut self, n: u32) {
        let tick = self.next_use();
        let baked = &self.w.baked;
        let x = &mut self.nodes[n as usize];
        x.up = true;
        for f in baked {
            x.disk.insert(*f, (tick, true));
        }
    }

    /// The node leaves. Returns whether it is a zombie: it stops talking
    /// but finishes its current job, late.
    pub fn leave_node(&mut self, n: u32) -> bool {
        let zombie = self.w.lives[n as usize].zombie;
        let x = &mut self.nodes[n as usize];
        x.up = false;
        if zombie && x.run().is_some() {
            x.zombie_busy = true;
        } else {
            x.gone = true;
            x.gpu_token += 1;
            x.dl_token += 1;
        }
        zombie
    }

    /// The node is removed by a scale-in: it leaves at once and says so
    /// (never a zombie).
    pub fn remove_node(&mut self, n: u32) {
        let x = &mut self.nodes[n as usize];
        x.up = false;
        x.gone = true;
        x.gpu_token += 1;
        x.dl_token += 1;
    }

    /// A node known gone: the jobs it held (at the GPU first, unless a
    /// zombie still runs it, then the local queue), for the policy to
    /// place again.
    pub fn take_jobs(&mut self, n: u32) -> Vec<Run> {
        let x = &mut self.nodes[n as usize];
        let mut jobs: Vec<Run> = x.local.drain(..).collect();
        x.local_est = 0;
        if let Some(r) = x.run() {
            jobs.insert(0, r);
        }
        if !x.zombie_busy {
            x.gpu = Gpu::Idle;
        }
        jobs.retain(|r| self.jobs[r.job as usize].done_ms.is_none());
        jobs
    }

    // ---- jobs ------------------------------------------------------------

    /// Commits a job to the node: its GPU takes it now if idle, else it
    /// waits in the local queue.
    pub fn give(&mut self, n: u32, job: u32, attempt: u32, est_ms: u64) {
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

    /// The idle GPU takes the next job of the local queue, if any.
    pub fn start_next_local(&mut self, n: u32) -> bool {
        let x = &mut self.nodes[n as usize];
        if !x.up || !matches!(x.gpu, Gpu::Idle) {
            return false;
        }
        let Some(r) = x.local.pop_front() else {
            return false;
        };
        x.local_est -= r.est_ms;
        self.start(n, r.job, r.attempt);
        true
    }

    /// The node's GPU takes a job: its missing files download first.
    pub fn start(&mut self, n: u32, job: u32, attempt: u32) {
        let est = self.estimate(n, job).1;
        let files = self.files(job);
        self.requests[n as usize].push((self.now, job));
        let x = &mut self.nodes[n as usize];
        debug_assert!(matches!(x.gpu, Gpu::Idle));
        let missing: Vec<u32> = files
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

    /// Stops the attempt at the GPU (a cancel); a download it waited for
    /// carries on.
    pub fn stop(&mut self, n: u32) {
        let x = &mut self.nodes[n as usize];
        x.gpu = Gpu::Idle;
        x.gpu_token += 1;
        self.note_changed(n);
    }

    /// Queues a download of `f` behind the others, unless the node holds
    /// or fetches it already.
    pub fn want(&mut self, n: u32, f: u32) {
        let x = &mut self.nodes[n as usize];
        if x.up && !x.has_or_fetching(f) {
            x.dl_q.push_back(f);
            self.kick(n);
        }
    }

    // ---- downloads ---------------------------------------------------------

    /// Starts the next download if the channel is free.
    fn kick(&mut self, n: u32) {
        let now = self.now;
        let models = self.w.models as u32;
        let x = &mut self.nodes[n as usize];
        if x.dl.is_some() || x.gone {
            return;
        }
        while let Some(f) = x.dl_q.pop_front() {
            if x.disk.contains_key(&f) {
                continue;
            }
            let bytes = self.w.files[f as usize].bytes;
            let ms = ((bytes as f64 / x.bps * 1e3).ceil() as u64).max(1);
            x.dl = Some((f, now, now + ms));
            let tok = x.dl_token;
            self.at(now + ms, Ev::DlDone(n, tok));
            if f < models {
                self.note_changed(n);
            }
            return;
        }
    }

    pub(super) fn dl_done(&mut self, n: u32, tok: u64) -> Result<()> {
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
        self.led.downloaded += bytes;
        if self.now >= self.w.warmup_ms {
            self.led.downloaded_measured += bytes;
        }
        if let Some(s) = &self.p.scale_in {
            let at = (s.at_min * 60e3) as u64;
            if self.now >= at && self.now < at + 30 * 60_000 {
                self.led.downloaded_after_scale_in += bytes;
                // Needed by a job the node holds (at its GPU or queued).
                let x = &self.nodes[n as usize];
                let wanted = x
                    .run()
                    .into_iter()
                    .chain(x.local.iter().copied())
                    .any(|r| self.files(r.job).into_iter().flatten().any(|g| g == f));
                if !wanted {
                    self.led.prefetched_after_scale_in += bytes;
                }
            }
        }
        self.insert_disk(n, f)?;
        if let Gpu::Waiting(r) = self.nodes[n as usize].gpu {
            let x = &self.nodes[n as usize];
            if self
                .files(r.job)
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
        if self.nodes[n as usize].up {
            self.note_changed(n);
        }
        Ok(())
    }

    /// Files in use by the job at the GPU: never evicted.
    fn pinned(&self, n: u32) -> [Option<u32>; 2] {
        match self.nodes[n as usize].run() {
            Some(r) => self.files(r.job),
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
            self.led.evicted += vb;
        }
        x.disk.insert(f, (tick, false));
        x.disk_used += bytes;
        self.led.inserted += bytes;
        if x.disk_used > x.disk_cap {
            return Err(internal(format!("node {n}: disk over capacity")));
        }
        Ok(())
    }

    // ---- the GPU -----------------------------------------------------------

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
        let max_models = self.vram_models_max.max(1);
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
            self.led.gen_ms += gen;
            self.at(self.now + gen, Ev::Gpu(n, tok));
            return;
        }
        while x.vram_used + model_bytes > x.vram_cap || x.vram.len() >= max_models {
            let Some((&v, _)) = x.vram.iter().min_by_key(|(m, t)| (**t, **m)) else {
                break;
            };
            x.vram.remove(&v);
            x.vram_used -= self.w.files[v as usize].bytes;
        }
        x.vram.insert(a.model, tick);
        x.vram_used += model_bytes;
        x.gpu = Gpu::Loading(run);
        self.led.load_ms += load;
        self.at(self.now + load, Ev::Gpu(n, tok));
    }

    pub(super) fn gpu_step(&mut self, n: u32, tok: u64) -> Result<()> {
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
                let up = x.up;
                self.nodes[n as usize].gpu = Gpu::Generating(run);
                self.led.gen_ms += gen;
                self.at(self.now + gen, Ev::Gpu(n, tok));
                if up {
                    self.note_changed(n);
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
                self.notes.push_back(Note::Finished(n, run));
            }
            _ => {}
        }
        Ok(())
    }
}

pub(super) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
