//! Hard state survives restarts: accepted jobs, idempotency keys, the
//! catalogue and results; a worker that reconnects to a restarted
//! coordinator keeps the attempt it was running; old results are swept.

mod common;

use std::path::Path;

use common::procs::{self, Proc};
use common::raw::RawWorker;
use common::*;
use corral::config::CoordinatorConfig;
use corral::pb;
use tokio::sync::oneshot;
use tonic::Code;

/// An in-process coordinator on a data dir the test keeps across restarts.
struct Served {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<corral::Result<()>>,
}

impl Served {
    async fn start(mut cfg: CoordinatorConfig, data_dir: &Path) -> Self {
        cfg.data_dir = data_dir.to_path_buf();
        cfg.store = common::pg::store_for(data_dir);
        cfg.auth
            .get_or_insert_with(corral::config::AuthConfig::disabled);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(corral::coordinator::run(listener, cfg, async move {
            let _ = rx.await;
        }));
        Self { url, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

fn keyed(model: &str, seed: u64, key: &str) -> pb::JobSpec {
    pb::JobSpec {
        idempotency_key: key.into(),
        ..spec(model, seed)
    }
}

async fn submit_full(url: &str, s: pb::JobSpec) -> pb::SubmitJobResponse {
    jobs(url)
        .await
        .submit_job(pb::SubmitJobRequest { spec: Some(s) })
        .await
        .unwrap()
        .into_inner()
}

async fn list_models(url: &str) -> Vec<String> {
    admin(url)
        .await
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_queue_catalogue_keys_and_running_attempts() {
    let data = tmp();
    let models = tmp();
    let c = Served::start(fast_config(), data.path()).await;
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    // One job runs on a raw worker; the rest wait (one slot).
    let mut w = RawWorker::connect(&c.url, "w", vec![]).await;
    let running = submit_full(&c.url, keyed("sd-a", 1, "k-run"))
        .await
        .job
        .unwrap();
    let a = w.next_assign().await;
    assert_eq!((a.job_id.as_str(), a.attempt), (running.id.as_str(), 1));
    let queued = submit_full(&c.url, keyed("sd-a", 2, "k-queued"))
        .await
        .job
        .unwrap();
    let cancelled = submit(&c.url, spec("sd-a", 3)).await;
    jobs(&c.url)
        .await
        .cancel_job(pb::CancelJobRequest {
            job_id: cancelled.id.clone(),
        })
        .await
        .unwrap();
    drop(w);
    c.stop().await;

    let c = Served::start(fast_config(), data.path()).await;
    assert_eq!(list_models(&c.url).await, vec!["sd-a".to_string()]);
    assert_eq!(
        get(&c.url, &queued.id).await.state,
        pb::JobState::Queued as i32
    );
    assert_eq!(
        get(&c.url, &cancelled.id).await.state,
        pb::JobState::Cancelled as i32
    );
    let r = get(&c.url, &running.id).await;
    assert_eq!(
        (r.state, r.attempt),
        (pb::JobState::Queued as i32, 1),
        "a job running at the restart is queued again with its attempt"
    );
    // The same keys give the same jobs after the restart.
    for (key, id, seed) in [("k-run", &running.id, 1), ("k-queued", &queued.id, 2)] {
        let again = submit_full(&c.url, keyed("sd-a", seed, key)).await;
        assert!(again.deduplicated);
        assert_eq!(&again.job.unwrap().id, id);
    }
    // The worker comes back still running attempt 1 and keeps it.
    let held = vec![pb::RunningJob {
        job_id: running.id.clone(),
        attempt: 1,
    }];
    let w = RawWorker::connect(&c.url, "w", held).await;
    let j = wait_state(&c.url, &running.id, pb::JobState::Running, 10).await;
    assert_eq!((j.worker_id.as_str(), j.attempt), ("w", 1));
    w.result(&running.id, 1, b"png-bytes").await;
    let done = wait_state(&c.url, &running.id, pb::JobState::Completed, 10).await;
    assert_eq!(done.attempt, 1);
    drop(w);
    c.stop().await;

    // Results are read back after another restart.
    let c = Served::start(fast_config(), data.path()).await;
    let done = get(&c.url, &running.id).await;
    assert_eq!(done.state, pb::JobState::Completed as i32);
    assert_eq!(
        done.output.unwrap().images,
        vec![common::raw::png_like(b"png-bytes")]
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_swept_after_the_retention_period() {
    let data = tmp();
    let models = tmp();
    let cfg = CoordinatorConfig {
        result_retention_s: 1,
        ..fast_config()
    };
    let c = Served::start(cfg, data.path()).await;
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let cache = tmp();
    let w = worker("w1", worker_config(&c.url, cache.path())).await;
    let job = submit_full(&c.url, keyed("sd-a", 1, "k1"))
        .await
        .job
        .unwrap();
    wait_state(&c.url, &job.id, pb::JobState::Completed, 20).await;
    let with_images = jobs(&c.url)
        .await
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
            include_images: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(with_images.output.unwrap().images.len(), 1);
    let url = c.url.clone();
    let id = job.id.clone();
    wait_until(20, "the job to be swept", || {
        let (url, id) = (url.clone(), id.clone());
        async move {
            let r = jobs(&url)
                .await
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    include_images: false,
                })
                .await;
            matches!(r, Err(s) if s.code() == Code::NotFound)
        }
    })
    .await;
    // Its idempotency key is free again: a new job.
    let again = submit_full(&c.url, keyed("sd-a", 1, "k1")).await;
    assert!(!again.deduplicated);
    assert_ne!(again.job.unwrap().id, job.id);
    w.stop().await;
    c.stop().await;
}

/// A job of 20 steps (200 ms on the synthetic engine at 10 ms a step),
/// so that some are still queued or running when the coordinator dies.
fn slow(i: u64) -> pb::JobSpec {
    pb::JobSpec {
        steps: 20,
        ..keyed("sd-a", i, &format!("key-{i}"))
    }
}

fn register_blocking(url: &str, m: &corral::types::ModelManifest) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(register(url, m));
}

/// The coordinator process is killed with SIGKILL while jobs run; after a
/// restart on the same port and data dir every accepted job completes, the
/// ones completed before the kill keep their images, and resubmitting with
/// the same idempotency keys returns the same jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_coordinator_loses_no_accepted_job() {
    let dir = tmp();
    let (logs, data, cache, models) = (
        dir.path().join("logs"),
        dir.path().join("data"),
        dir.path().join("cache"),
        dir.path().join("models"),
    );
    let flags = [
        "--heartbeat-interval-s",
        "0.2",
        "--max-attempts",
        "10",
        "--insecure-no-auth",
    ];
    let (mut coord, addr) = procs::coordinator(&logs, "127.0.0.1:0", &data, &flags);
    let url = format!("http://{addr}");
    let m = make_model(&models, "sd-a");
    let u = url.clone();
    tokio::task::spawn_blocking(move || register_blocking(&u, &m))
        .await
        .unwrap();
    let mut worker = Proc::start(
        &logs,
        "worker",
        &[
            "worker",
            "--coordinator",
            &url,
            "--worker-id",
            "w1",
            "--engine",
            "synthetic",
            "--synthetic-step-ms",
            "10",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[],
    );
    const N: u64 = 20;
    let mut ids = Vec::new();
    for i in 0..N {
        let r = submit_full(&url, slow(i)).await;
        ids.push(r.job.unwrap().id);
    }
    let completed = |url: String, ids: Vec<String>| async move {
        let mut done = Vec::new();
        for id in &ids {
            let j = get(&url, id).await;
            if j.state == pb::JobState::Completed as i32 {
                done.push((id.clone(), j.output.unwrap().images));
            }
        }
        done
    };
    let (u, i) = (url.clone(), ids.clone());
    wait_until(30, "a few jobs to complete", || {
        let (u, i) = (u.clone(), i.clone());
        async move { completed(u, i).await.len() >= 3 }
    })
    .await;
    let before = completed(url.clone(), ids.clone()).await;
    coord.kill();

    let (mut coord, addr2) = procs::coordinator(&logs, &addr, &data, &flags);
    assert_eq!(addr2, addr);
    for (i, id) in ids.iter().enumerate() {
        let r = submit_full(&url, slow(i as u64)).await;
        assert!(r.deduplicated, "key-{i}");
        assert_eq!(&r.job.unwrap().id, id);
    }
    let (u, i) = (url.clone(), ids.clone());
    wait_until(60, "every job to complete", || {
        let (u, i) = (u.clone(), i.clone());
        async move { completed(u, i).await.len() == N as usize }
    })
    .await;
    let after = completed(url.clone(), ids.clone()).await;
    for (id, images) in &before {
        let now = &after.iter().find(|(i, _)| i == id).unwrap().1;
        assert_eq!(
            now, images,
            "job {id} changed its result across the restart"
        );
    }
    assert!(after.iter().all(|(_, imgs)| imgs.len() == 1));
    worker.kill();
    coord.kill();
    let panics = procs::panics(&logs);
    assert!(panics.is_empty(), "{panics:#?}");
    println!(
        "sigkill test: {N} jobs, {} completed before the kill, all {N} completed after, 0 lost",
        before.len()
    );
}

/// Submits per second through the durable path (fsync per commit, group
/// commit across concurrent submits). A benchmark, not a test:
/// `cargo nextest run --run-ignored only -E 'test(submit_throughput)' --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn submit_throughput() {
    let data = tmp();
    let models = tmp();
    let cfg = CoordinatorConfig {
        limits: corral::config::JobLimits {
            max_unfinished_jobs_per_client: 1_000_000,
            ..Default::default()
        },
        ..fast_config()
    };
    let c = Served::start(cfg, data.path()).await;
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let client = jobs(&c.url).await;
    for concurrency in [1usize, 16, 64] {
        let total = 2000;
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for t in 0..concurrency {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in (t..total).step_by(concurrency) {
                    client
                        .submit_job(pb::SubmitJobRequest {
                            spec: Some(spec("sd-a", i as u64)),
                        })
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = started.elapsed().as_secs_f64();
        println!(
            "durable submits: concurrency {concurrency}: {total} in {s:.2} s = {:.0}/s",
            total as f64 / s
        );
    }
    c.stop().await;
}

/// The coordinator died after assigning attempt 1 but before recording it:
/// the worker comes back running attempt 1 of a job stored as queued. The
/// attempt is cancelled and the job reassigned as attempt 2 (a number is
/// never given out twice), so the cancelled run's report cannot end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_attempt_is_never_reused() {
    let data = tmp();
    let models = tmp();
    let c = Served::start(fast_config(), data.path()).await;
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    c.stop().await;
    let c = Served::start(fast_config(), data.path()).await;
    let claimed = vec![pb::RunningJob {
        job_id: job.id.clone(),
        attempt: 1,
    }];
    let mut w = RawWorker::connect(&c.url, "w", claimed).await;
    w.heartbeat(vec![]);
    let mut seen = Vec::new();
    let assign = loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), w.rx.message())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .unwrap();
        match m.msg {
            Some(pb::coordinator_message::Msg::Cancel(x)) => seen.push(("cancel", x.attempt)),
            Some(pb::coordinator_message::Msg::Assign(a)) => break a,
            _ => {}
        }
    };
    assert_eq!(
        seen,
        vec![("cancel", 1)],
        "the unrecorded attempt is cancelled first"
    );
    assert_eq!(
        (assign.job_id.as_str(), assign.attempt),
        (job.id.as_str(), 2)
    );
    // The cancelled run reports late; it does not end the job.
    w.send(pb::worker_message::Msg::Failed(pb::JobFailed {
        job_id: job.id.clone(),
        attempt: 1,
        reason: "cancelled".into(),
        retryable: false,
        kind: pb::FailureKind::Cancelled as i32,
    }))
    .await;
    w.result(&job.id, 2, b"img").await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    assert_eq!(done.attempt, 2);
    drop(w);
    c.stop().await;
}
