//! One assignment at scale: 10,000 workers, 5,000 models, 100,000 queued
//! jobs. Each iteration completes one worker's job (which assigns it the
//! next) and submits one new job, so the queue stays at 100,000.
//!
//! `cargo bench --bench assign`

use std::sync::Arc;

use corral::scheduler::{Effect, Scheduler, SchedulerConfig};
use corral::types::{CacheReport, DiskModel, JobId, JobSpec, ModelId, WorkerHello, WorkerId};
use criterion::{criterion_group, criterion_main, Criterion};

const WORKERS: u64 = 10_000;
const MODELS: u64 = 5_000;
const QUEUED: u64 = 100_000;
const GB: u64 = 1_000_000_000;

fn spec(model: u64) -> Arc<JobSpec> {
    Arc::new(JobSpec::for_model(ModelId(format!("m{model}"))))
}

fn lcg(x: u64) -> u64 {
    x.wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407)
}

struct World {
    s: Scheduler,
    /// The job each worker runs.
    running: Vec<(JobId, u32)>,
    next_job: u64,
    rng: u64,
    now: u64,
}

fn record(running: &mut [(JobId, u32)], effects: &[Effect]) {
    for e in effects {
        if let Effect::Assign {
            worker,
            job,
            attempt,
            ..
        } = e
        {
            let i: usize = worker.0[1..].parse().expect("worker id");
            running[i] = (job.clone(), *attempt);
        }
    }
}

fn setup() -> World {
    let mut s = Scheduler::new(SchedulerConfig::default());
    for m in 0..MODELS {
        s.register_model(ModelId(format!("m{m}")), (2 + m % 5) * GB);
    }
    for w in 0..WORKERS {
        let disk: Vec<DiskModel> = (0..10)
            .map(|k| DiskModel {
                model_id: ModelId(format!("m{}", (w * 7 + k * 499) % MODELS)),
                bytes: 3 * GB,
                preloaded: k < 2,
            })
            .collect();
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
        s,
        running: vec![(JobId::default(), 0); WORKERS as usize],
        next_job: 0,
        rng: 1,
        now: 1,
    };
    while world.s.queued_len() < QUEUED as usize {
        let effects = submit(&mut world);
        record(&mut world.running, &effects);
    }
    world
}

fn submit(w: &mut World) -> Vec<Effect> {
    w.rng = lcg(w.rng);
    let model = (w.rng >> 33) % MODELS;
    let id = JobId(format!("j{}", w.next_job));
    w.next_job += 1;
    w.s.submit(id, spec(model), w.now).expect("submit")
}

fn bench(c: &mut Criterion) {
    let mut w = setup();
    assert!(w.running.iter().all(|r| r.1 > 0), "every worker busy");
    let mut i = 0usize;
    c.bench_function(
        "complete+assign+submit (10k workers, 5k models, 100k queued)",
        |b| {
            b.iter(|| {
                w.now += 1;
                let worker = WorkerId(format!("w{i}"));
                let (job, attempt) = w.running[i].clone();
                if attempt > 0 {
                    let effects =
                        w.s.complete(&worker, &job, attempt, w.now)
                            .expect("complete");
                    if w.running[i].0 == job {
                        w.running[i] = (JobId::default(), 0);
                    }
                    record(&mut w.running, &effects);
                }
                let effects = submit(&mut w);
                record(&mut w.running, &effects);
                i = (i + 1) % WORKERS as usize;
            })
        },
    );
    c.bench_function("replicate round (10k workers, 5k models)", |b| {
        b.iter(|| {
            w.now += 10_000;
            w.s.replicate(w.now)
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
