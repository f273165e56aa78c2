//! One placement decision at scale, and how its cost grows.
//!
//! Every iteration completes one worker's job (which assigns that worker
//! its next job) and submits one new job, so the queue keeps its depth:
//! one iteration is one complete + one assignment + one submit. Every
//! worker has one slot and starts busy.
//!
//! The headline point is 10,000 workers, 5,000 models, 100,000 queued jobs,
//! each worker holding 10 models on disk (one of them in VRAM): 20 holders
//! per model. The sweeps vary one dimension at a time from there:
//!
//! - `assign/workers/N`: N workers (holders per model grow with N);
//! - `assign/models/N`: N models (holders per model shrink as N grows);
//! - `assign/hot_holders/N`: a hot model held by N workers (10,000: every
//!   worker) that half of all jobs ask for;
//! - `assign/queued/N`: N queued jobs.
//!
//! Run (a few minutes; the setups dominate):
//! `cargo bench --bench assign -- --warm-up-time 1 --measurement-time 2`
//! (a filter such as `assign/queued` builds and runs only those worlds).

use std::sync::Arc;

use corral::scheduler::{Effect, Scheduler, SchedulerConfig};
use corral::types::{CacheReport, DiskModel, JobId, JobSpec, ModelId, WorkerHello, WorkerId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const GB: u64 = 1_000_000_000;

/// One bench world's shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    workers: u64,
    models: u64,
    queued: u64,
    /// Workers (the first ones) that also hold the hot model; 0: no hot
    /// model.
    hot_holders: u64,
}

const BASE: Shape = Shape {
    workers: 10_000,
    models: 5_000,
    queued: 100_000,
    hot_holders: 0,
};

fn model(m: u64) -> ModelId {
    ModelId(format!("m{m}"))
}

const HOT: &str = "hot";

fn lcg(x: u64) -> u64 {
    x.wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407)
}

struct World {
    shape: Shape,
    s: Scheduler,
    /// The job each worker runs, and its attempt (0: none).
    running: Vec<(JobId, u32)>,
    next_job: u64,
    rng: u64,
    now: u64,
    /// The next worker to complete its job.
    turn: usize,
    steps: u64,
    /// Assignments made by `step`.
    assigned: u64,
}

impl World {
    fn new(shape: Shape) -> Self {
        let mut s = Scheduler::new(SchedulerConfig::default());
        for m in 0..shape.models {
            s.register_model(model(m), (2 + m % 5) * GB);
        }
        if shape.hot_holders > 0 {
            s.register_model(HOT.into(), 2 * GB);
        }
        // Ten models per worker, spread so that every model has about the
        // same number of holders.
        let stride = (shape.models / 10).max(1);
        for w in 0..shape.workers {
            let mut disk: Vec<DiskModel> = (0..10)
                .map(|k| DiskModel {
                    model_id: model((w * 7 + k * stride) % shape.models),
                    bytes: 3 * GB,
                    preloaded: k < 2,
                })
                .collect();
            if w < shape.hot_holders {
                disk.push(DiskModel {
                    model_id: HOT.into(),
                    bytes: 2 * GB,
                    preloaded: false,
                });
            }
            let hello = WorkerHello {
                worker_id: WorkerId(format!("w{w}")),
                version: "bench".into(),
                gpu_name: "bench".into(),
                vram_bytes: 24 * GB,
                cache_max_bytes: 50 * GB,
                max_concurrent_jobs: 1,
                state: CacheReport {
                    vram_models: vec![disk[0].model_id.clone()],
                    disk_models: disk,
                    free_disk_bytes: 20 * GB,
                    download_bps: 25_000_000,
                    ..Default::default()
                },
            };
            s.connect(hello, 0);
        }
        let mut world = World {
            shape,
            s,
            running: vec![(JobId::default(), 0); shape.workers as usize],
            next_job: 0,
            rng: 1,
            now: 1,
            turn: 0,
            steps: 0,
            assigned: 0,
        };
        while world.s.queued_len() < shape.queued as usize {
            let effects = world.submit();
            world.record(&effects);
        }
        // Workers left idle get a job for the model in their VRAM (which
        // a free worker holding it in VRAM takes at once).
        for w in 0..shape.workers {
            if world.running[w as usize].1 == 0 {
                let m = model((w * 7) % shape.models);
                let effects = world.submit_for(m);
                world.record(&effects);
            }
        }
        world.assigned = 0;
        world
    }

    fn record(&mut self, effects: &[Effect]) {
        for e in effects {
            if let Effect::Assign {
                worker,
                job,
                attempt,
                ..
            } = e
            {
                let i: usize = worker.0[1..].parse().expect("worker id");
                self.running[i] = (job.clone(), *attempt);
                self.assigned += 1;
            }
        }
    }

    fn submit(&mut self) -> Vec<Effect> {
        self.rng = lcg(self.rng);
        let r = self.rng >> 33;
        let model = if self.shape.hot_holders > 0 && r % 2 == 0 {
            HOT.into()
        } else {
            model(r % self.shape.models)
        };
        self.submit_for(model)
    }

    fn submit_for(&mut self, model: ModelId) -> Vec<Effect> {
        let id = JobId(format!("j{}", self.next_job));
        self.next_job += 1;
        let spec = Arc::new(JobSpec::for_model(model));
        self.s.submit(id, spec, self.now).expect("submit")
    }

    /// One iteration: the next busy worker completes its job (and is
    /// given its next one, if it should take one), and one job is
    /// submitted.
    fn step(&mut self) {
        self.now += 1;
        self.steps += 1;
        let n = self.running.len();
        // Idle workers are skipped (a harness cost, outside the scheduler).
        let busy = (0..n)
            .map(|k| (self.turn + k) % n)
            .find(|&i| self.running[i].1 > 0);
        if let Some(i) = busy {
            let worker = WorkerId(format!("w{i}"));
            let (job, attempt) = self.running[i].clone();
            self.running[i] = (JobId::default(), 0);
            let effects = self
                .s
                .complete(&worker, &job, attempt, self.now)
                .expect("complete");
            self.record(&effects);
            self.turn = (i + 1) % n;
        }
        let effects = self.submit();
        self.record(&effects);
    }
}

impl World {
    /// Assignments per iteration: about one when completions and arrivals
    /// balance (a shallow queue leaves some workers idle).
    fn report(&self, name: &str) {
        eprintln!(
            "{name}: {:.2} assignments per iteration over {} iterations",
            self.assigned as f64 / self.steps.max(1) as f64,
            self.steps
        );
    }
}

fn sweep(c: &mut Criterion, name: &str, points: &[u64], shape: impl Fn(u64) -> Shape) {
    let mut g = c.benchmark_group(format!("assign/{name}"));
    g.sample_size(20);
    for &p in points {
        // Built on first use, so that a filter builds only what it runs.
        let mut world = None;
        g.bench_with_input(BenchmarkId::from_parameter(p), &p, |b, _| {
            let w = world.get_or_insert_with(|| World::new(shape(p)));
            b.iter(|| w.step())
        });
        if let Some(w) = world {
            w.report(&format!("assign/{name}/{p}"));
        }
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let mut world = None;
    c.bench_function(
        "complete+assign+submit (10k workers, 5k models, 100k queued)",
        |b| {
            let w = world.get_or_insert_with(|| World::new(BASE));
            b.iter(|| w.step())
        },
    );
    if let Some(w) = &world {
        w.report("complete+assign+submit");
    }
    c.bench_function("replicate round (10k workers, 5k models)", |b| {
        let w = world.get_or_insert_with(|| World::new(BASE));
        b.iter(|| {
            w.now += 10_000;
            w.s.replicate(w.now)
        })
    });
    sweep(c, "workers", &[1_000, 3_000, 30_000], |n| Shape {
        workers: n,
        ..BASE
    });
    sweep(c, "models", &[500, 50_000], |n| Shape { models: n, ..BASE });
    sweep(c, "hot_holders", &[100, 1_000, 10_000], |n| Shape {
        hot_holders: n,
        ..BASE
    });
    sweep(c, "queued", &[1_000, 10_000, 1_000_000], |n| Shape {
        queued: n,
        ..BASE
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
