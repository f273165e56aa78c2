//! Chaos: real processes on loopback. A coordinator and four synthetic
//! workers run ~250 jobs while workers are killed with SIGKILL and
//! restarted with the same id, and the coordinator is killed with SIGKILL
//! and restarted on the same port and data dir. Afterwards every accepted
//! job has completed exactly once, with its image, and no process panicked.
//!
//! Chaos is driven by progress (kill when N jobs have completed), not by
//! timers. Prints its figures:
//! `cargo nextest run -E 'binary(chaos)' --no-capture`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{self, Proc};
use common::*;
use corral::pb;

const JOBS: usize = 250;
const WORKERS: usize = 4;
const WATCHED: usize = 40;
/// Completed-job counts at which a worker is killed (and restarted).
const WORKER_KILLS_AT: [usize; 6] = [15, 40, 70, 110, 160, 200];
/// Completed-job counts at which the coordinator is killed (and restarted).
const COORDINATOR_KILLS_AT: [usize; 2] = [55, 135];

struct Cluster {
    dir: PathBuf,
    addr: String,
    coordinator: Proc,
    workers: Vec<Proc>,
}

fn coordinator_flags() -> [&'static str; 5] {
    [
        "--heartbeat-interval-s",
        "0.2",
        "--max-attempts",
        "10",
        "--insecure-no-auth",
    ]
}

fn start_worker(dir: &Path, url: &str, i: usize) -> Proc {
    let cache = dir.join(format!("cache-{i}"));
    Proc::start(
        &dir.join("logs"),
        &format!("worker{i}"),
        &[
            "worker",
            "--coordinator",
            url,
            "--worker-id",
            &format!("w{i}"),
            "--engine",
            "synthetic",
            "--synthetic-step-ms",
            "5",
            "--shutdown-grace-s",
            "1",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[],
    )
}

impl Cluster {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill_worker(&mut self, i: usize) {
        self.workers[i].kill();
        let url = self.url();
        self.workers[i] = start_worker(&self.dir, &url, i);
    }

    fn kill_coordinator(&mut self) {
        self.coordinator.kill();
        let (p, addr) = procs::coordinator(
            &self.dir.join("logs"),
            &self.addr,
            &self.dir.join("data"),
            &coordinator_flags(),
        );
        assert_eq!(addr, self.addr, "restarted on the same port");
        self.coordinator = p;
    }
}

fn job_spec(i: usize) -> pb::JobSpec {
    pb::JobSpec {
        steps: 20,
        idempotency_key: format!("chaos-{i}"),
        ..spec("sd-a", i as u64)
    }
}

/// Submits until accepted (the coordinator may be down); the idempotency
/// key makes retries safe.
async fn submit_until_accepted(url: &str, i: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = corral::client::channel(url).await {
            let r = pb::jobs_client::JobsClient::new(ch)
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(job_spec(i)),
                })
                .await;
            if let Ok(r) = r {
                return r.into_inner().job.unwrap().id;
            }
        }
        assert!(Instant::now() < deadline, "job {i} not accepted in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn completed_count(url: &str) -> Option<usize> {
    let ch = corral::client::channel(url).await.ok()?;
    let r = pb::jobs_client::JobsClient::new(ch)
        .list_jobs(pb::ListJobsRequest {
            state: pb::JobState::Completed as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .ok()?;
    Some(r.into_inner().jobs.len())
}

/// Watches a job until a stream shows it ended, re-watching across
/// coordinator restarts. Returns (Completed events seen, worker in the
/// first Completed event).
async fn watch(url: String, id: String) -> (usize, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut completed = 0;
    let mut first_worker = String::new();
    while Instant::now() < deadline {
        let Ok(ch) = corral::client::channel(&url).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(stream) = pb::jobs_client::JobsClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .watch_job(pb::WatchJobRequest { job_id: id.clone() })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let mut ended = false;
        while let Ok(Some(ev)) = stream.message().await {
            match ev.event {
                Some(pb::job_event::Event::Completed(c)) => {
                    completed += 1;
                    if first_worker.is_empty() {
                        first_worker = c.output.unwrap_or_default().worker_id;
                    }
                    ended = true;
                }
                Some(pb::job_event::Event::Failed(_) | pb::job_event::Event::Cancelled(_)) => {
                    ended = true
                }
                _ => {}
            }
        }
        // A stream that ends after a terminal event is done; one cut by a
        // restart is watched again.
        if ended {
            break;
        }
    }
    (completed, first_worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_killed_workers_and_coordinator() {
    let started = Instant::now();
    let tmpdir = tmp();
    let dir = tmpdir.path().to_path_buf();
    let logs = dir.join("logs");
    let (coordinator, addr) = procs::coordinator(
        &logs,
        "127.0.0.1:0",
        &dir.join("data"),
        &coordinator_flags(),
    );
    let url = format!("http://{addr}");
    // The catalogue, through the CLI.
    make_model(&dir.join("models"), "sd-a");
    let source = dir.join("models").join("sd-a");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["models", "add", "sd-a", "--source"])
        .arg(&source)
        .args(["--coordinator", &url])
        .env_remove("CORRAL_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let workers = (0..WORKERS).map(|i| start_worker(&dir, &url, i)).collect();
    let cluster = Arc::new(Mutex::new(Cluster {
        dir: dir.clone(),
        addr,
        coordinator,
        workers,
    }));

    // Submitters: four tasks, retrying through restarts.
    let ids: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    let mut submitters = Vec::new();
    for t in 0..4 {
        let (url, ids) = (url.clone(), ids.clone());
        submitters.push(tokio::spawn(async move {
            for i in (t..JOBS).step_by(4) {
                let id = submit_until_accepted(&url, i).await;
                ids.lock().unwrap().insert(i, id);
            }
        }));
    }
    // Watchers on a sample, started as their jobs are accepted.
    let mut watchers = Vec::new();
    let sample_deadline = Instant::now() + Duration::from_secs(30);
    for i in (0..JOBS).step_by(JOBS / WATCHED) {
        let id = loop {
            if let Some(id) = ids.lock().unwrap().get(&i).cloned() {
                break id;
            }
            assert!(Instant::now() < sample_deadline, "job {i} never accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        watchers.push((id.clone(), tokio::spawn(watch(url.clone(), id))));
    }

    // Chaos, driven by progress.
    let (worker_kills, coordinator_kills) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut plan: Vec<(usize, Option<usize>)> = WORKER_KILLS_AT
        .iter()
        .enumerate()
        .map(|(k, &at)| (at, Some(k % WORKERS)))
        .chain(COORDINATOR_KILLS_AT.iter().map(|&at| (at, None)))
        .collect();
    plan.sort();
    let chaos_deadline = Instant::now() + Duration::from_secs(45);
    for (at, target) in plan {
        loop {
            let done = completed_count(&url).await.unwrap_or(0);
            if done >= at || Instant::now() > chaos_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (c, wk, ck) = (
            cluster.clone(),
            worker_kills.clone(),
            coordinator_kills.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut c = c.lock().unwrap();
            match target {
                Some(i) => {
                    c.kill_worker(i);
                    wk.fetch_add(1, Ordering::SeqCst);
                }
                None => {
                    c.kill_coordinator();
                    ck.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await
        .unwrap();
    }
    for s in submitters {
        s.await.unwrap();
    }
    let ids: HashMap<usize, String> = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), JOBS);

    // Every accepted job ends completed, once, with its image.
    let all: Vec<String> = ids.values().cloned().collect();
    let u = url.clone();
    wait_until(60, "every job to complete", || {
        let u = u.clone();
        async move { completed_count(&u).await == Some(JOBS) }
    })
    .await;
    let mut lost = 0;
    let mut without_image = 0;
    let mut reattempted = 0;
    let mut finals = HashMap::new();
    let mut client = pb::jobs_client::JobsClient::new(corral::client::channel(&url).await.unwrap())
        .max_decoding_message_size(64 << 20);
    for id in &all {
        match client
            .get_job(pb::GetJobRequest {
                job_id: id.clone(),
                include_images: true,
            })
            .await
        {
            Ok(j) => {
                let j = j.into_inner();
                assert_eq!(j.state, pb::JobState::Completed as i32, "{j:?}");
                reattempted += usize::from(j.attempt > 1);
                let out = j.output.unwrap_or_default();
                if out.images.len() != 1 || !out.images[0].starts_with(b"\x89PNG") {
                    without_image += 1;
                }
                finals.insert(id.clone(), out.worker_id);
            }
            Err(_) => lost += 1,
        }
    }
    let mut duplicates = 0;
    let mut changed = 0;
    for (id, w) in watchers {
        let (completed, worker) = w.await.unwrap();
        assert!(completed >= 1, "watcher of {id} saw no completion");
        duplicates += completed - 1;
        if finals.get(&id) != Some(&worker) {
            changed += 1;
        }
    }
    {
        let mut c = cluster.lock().unwrap();
        for w in &mut c.workers {
            w.kill();
        }
        c.coordinator.kill();
    }
    let panics = procs::panics(&logs);
    println!(
        "chaos: jobs={JOBS} accepted={} completed={} worker_kills={} coordinator_restarts={} \
         jobs_run_more_than_once={reattempted} lost={lost} without_image={without_image} duplicates_visible_to_clients={duplicates} \
         (watched {WATCHED}) results_changed_after_completion={changed} panics={} wall_s={:.1}",
        ids.len(),
        finals.len(),
        worker_kills.load(Ordering::SeqCst),
        coordinator_kills.load(Ordering::SeqCst),
        panics.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0);
    assert_eq!(without_image, 0);
    assert_eq!(duplicates, 0);
    assert_eq!(changed, 0);
    assert!(panics.is_empty(), "{panics:#?}");
    assert_eq!(worker_kills.load(Ordering::SeqCst), WORKER_KILLS_AT.len());
    assert_eq!(
        coordinator_kills.load(Ordering::SeqCst),
        COORDINATOR_KILLS_AT.len()
    );
}
