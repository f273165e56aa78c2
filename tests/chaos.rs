//! Chaos: real processes on loopback. A coordinator and four synthetic
//! workers run ~250 jobs while workers are killed with SIGKILL and
//! restarted with the same id, the coordinator is killed with SIGKILL
//! and restarted on the same port and data dir, workers are paused with
//! SIGSTOP past the heartbeat timeout and resumed (zombies), a second
//! process starts with a live worker's id, and (as root) the disk holding
//! the data dir fills up and is freed again. Afterwards every accepted
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

use common::disk::Tmpfs;
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
/// Completed-job counts at which a worker is paused past the heartbeat
/// timeout, then resumed.
const ZOMBIES_AT: [usize; 2] = [25, 145];
/// Completed-job count at which a second process says Hello with a live
/// worker's id.
const DUPLICATE_AT: usize = 90;
/// Completed-job count at which the data dir's disk fills (root only).
const DISK_FULL_AT: usize = 180;

/// What happens at a completed-job count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chaos {
    KillWorker(usize),
    KillCoordinator,
    Zombie(usize),
    Duplicate(usize),
    DiskFull,
}

struct Cluster {
    dir: PathBuf,
    addr: String,
    data: PathBuf,
    coordinator: Proc,
    workers: Vec<Proc>,
    /// The data dir's file system, when it could be mounted; dropped
    /// (unmounted) after the processes.
    disk: Option<Tmpfs>,
    /// Worker kills and pauses: when (Unix seconds), which worker id, and
    /// whether it was a kill.
    kills: Vec<(f64, String, bool)>,
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
    start_worker_as(dir, url, &format!("worker{i}"), &format!("w{i}"))
}

fn start_worker_as(dir: &Path, url: &str, name: &str, id: &str) -> Proc {
    let cache = dir.join(format!("cache-{name}"));
    Proc::start(
        &dir.join("logs"),
        name,
        &[
            "worker",
            "--coordinator",
            url,
            "--worker-id",
            id,
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
        self.kills.push((unix_now_s(), format!("w{i}"), true));
        self.workers[i].kill();
        let url = self.url();
        self.workers[i] = start_worker(&self.dir, &url, i);
    }

    fn kill_coordinator(&mut self) {
        self.coordinator.kill();
        let (p, addr) = procs::coordinator(
            &self.dir.join("logs"),
            &self.addr,
            &self.data,
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

async fn listed(url: &str, id: &str) -> bool {
    let Ok(ch) = corral::client::channel(url).await else {
        return false;
    };
    pb::admin_client::AdminClient::new(ch)
        .list_workers(pb::ListWorkersRequest {})
        .await
        .is_ok_and(|r| r.into_inner().workers.iter().any(|w| w.worker_id == id))
}

/// The coordinator's health now (0 when it cannot be asked).
async fn health_now(url: &str) -> i32 {
    match tokio::time::timeout(Duration::from_secs(2), health(url)).await {
        Ok(Ok(s)) => s,
        _ => 0,
    }
}

/// Waits (blocking the task briefly per look) until `f` holds for the cluster.
async fn wait_cluster(
    cluster: &Arc<Mutex<Cluster>>,
    secs: u64,
    what: &str,
    f: impl Fn(&Cluster) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f(&cluster.lock().unwrap()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const EXPIRED: &str = "worker missed its heartbeats";
const REFUSED: &str = "give each worker its own --worker-id";

/// SIGSTOP worker `i` until the coordinator drops it, then SIGCONT: it must
/// reconnect by itself.
async fn zombie(cluster: &Arc<Mutex<Cluster>>, url: &str, i: usize) {
    let id = format!("w{i}");
    wait_until(30, &format!("{id} to be connected"), || listed(url, &id)).await;
    let before = cluster
        .lock()
        .unwrap()
        .coordinator
        .log()
        .matches(EXPIRED)
        .count();
    {
        let mut c = cluster.lock().unwrap();
        c.kills.push((unix_now_s(), id.clone(), false));
        c.workers[i].signal(libc::SIGSTOP);
    }
    wait_cluster(cluster, 20, "the paused worker to expire", |c| {
        c.coordinator.log().matches(EXPIRED).count() > before
    })
    .await;
    cluster.lock().unwrap().workers[i].signal(libc::SIGCONT);
    wait_until(30, &format!("{id} to reconnect"), || listed(url, &id)).await;
}

/// Starts a second process with worker `i`'s id; it must be refused (or
/// refuse the first), then is killed.
async fn duplicate(cluster: &Arc<Mutex<Cluster>>, url: &str, i: usize) -> usize {
    let id = format!("w{i}");
    wait_until(30, &format!("{id} to be connected"), || listed(url, &id)).await;
    let mut dup = {
        let c = cluster.lock().unwrap();
        start_worker_as(&c.dir, url, &format!("dup{i}"), &id)
    };
    let before = cluster.lock().unwrap().workers[i]
        .log()
        .matches(REFUSED)
        .count();
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusals = loop {
        let n = dup.log().matches(REFUSED).count()
            + cluster.lock().unwrap().workers[i]
                .log()
                .matches(REFUSED)
                .count()
            - before;
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "no refusal:\n{}", dup.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    dup.kill();
    refusals
}

/// Fills the data dir's disk, and submits jobs with large prompts (which
/// the store cannot fit in pages it already has) until the coordinator
/// stops serving; then frees the disk: the coordinator must serve again by
/// itself. Returns how long it was not serving, and the jobs acknowledged
/// meanwhile (by index from `JOBS`), which must complete like the others.
async fn disk_full(
    cluster: &Arc<Mutex<Cluster>>,
    url: &str,
) -> Option<(Duration, Vec<(usize, String)>)> {
    let ballast = cluster.lock().unwrap().disk.as_ref()?.fill();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in JOBS.. {
        if health_now(url).await == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the disk never filled");
        let spec = pb::JobSpec {
            prompt: "a lighthouse at dusk ".repeat(190),
            ..job_spec(i)
        };
        let Ok(ch) = corral::client::channel(url).await else {
            continue;
        };
        if let Ok(r) = pb::jobs_client::JobsClient::new(ch)
            .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
            .await
        {
            acked.push((i, r.into_inner().job.unwrap().id));
        }
    }
    let down = Instant::now();
    drop(ballast);
    wait_until(30, "the coordinator to serve again", || async {
        health_now(url).await == 1
    })
    .await;
    Some((down.elapsed(), acked))
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
    let disk = Tmpfs::mount(&dir.join("disk"), 64);
    if disk.is_none() {
        println!("chaos: full-disk phase SKIPPED (mounting a tmpfs needs root)");
    }
    let data = disk
        .as_ref()
        .map_or_else(|| dir.join("data"), |d| d.dir.join("data"));
    let (coordinator, addr) = procs::coordinator(&logs, "127.0.0.1:0", &data, &coordinator_flags());
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
        data,
        coordinator,
        workers,
        disk,
        kills: Vec::new(),
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
    let (mut zombies, mut refusals, mut not_serving) = (0, 0, None);
    let mut plan: Vec<(usize, Chaos)> = WORKER_KILLS_AT
        .iter()
        .enumerate()
        .map(|(k, &at)| (at, Chaos::KillWorker(k % WORKERS)))
        .chain(
            COORDINATOR_KILLS_AT
                .iter()
                .map(|&at| (at, Chaos::KillCoordinator)),
        )
        .chain(
            ZOMBIES_AT
                .iter()
                .enumerate()
                .map(|(k, &at)| (at, Chaos::Zombie((k + 1) % WORKERS))),
        )
        .chain([
            (DUPLICATE_AT, Chaos::Duplicate(2)),
            (DISK_FULL_AT, Chaos::DiskFull),
        ])
        .collect();
    plan.sort();
    let chaos_deadline = Instant::now() + Duration::from_secs(60);
    for (at, event) in plan {
        loop {
            let done = completed_count(&url).await.unwrap_or(0);
            if done >= at || Instant::now() > chaos_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match event {
            Chaos::KillWorker(_) | Chaos::KillCoordinator => {
                let (c, wk, ck) = (
                    cluster.clone(),
                    worker_kills.clone(),
                    coordinator_kills.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    let mut c = c.lock().unwrap();
                    match event {
                        Chaos::KillWorker(i) => {
                            c.kill_worker(i);
                            wk.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {
                            c.kill_coordinator();
                            ck.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
                .await
                .unwrap();
            }
            Chaos::Zombie(i) => {
                zombie(&cluster, &url, i).await;
                zombies += 1;
            }
            Chaos::Duplicate(i) => refusals += duplicate(&cluster, &url, i).await,
            Chaos::DiskFull => {
                if let Some((down, acked)) = disk_full(&cluster, &url).await {
                    not_serving = Some(down);
                    ids.lock().unwrap().extend(acked);
                }
            }
        }
    }
    for s in submitters {
        s.await.unwrap();
    }
    let ids: HashMap<usize, String> = ids.lock().unwrap().clone();
    let total = ids.len();
    assert!((0..JOBS).all(|i| ids.contains_key(&i)));

    // Every accepted job ends completed, once, with its image.
    let all: Vec<String> = ids.values().cloned().collect();
    let u = url.clone();
    wait_until(60, "every job to complete", || {
        let u = u.clone();
        async move { completed_count(&u).await == Some(total) }
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
    let replaced: usize = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("coordinator"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .matches("a silent stream is replaced")
                .count()
        })
        .sum();
    let panics = procs::panics(&logs);
    let kills = cluster.lock().unwrap().kills.clone();
    let (after_kill, after_requeue) = reassignment_times(&logs, &kills);
    println!(
        "chaos: jobs={JOBS} accepted={} completed={} worker_kills={} coordinator_restarts={} \
         jobs_run_more_than_once={reattempted} lost={lost} without_image={without_image} duplicates_visible_to_clients={duplicates} \
         (watched {WATCHED}) results_changed_after_completion={changed} panics={} \
         zombies_resumed={zombies} duplicate_id_refusals={refusals} streams_replaced={replaced} \
         disk_full_not_serving_s={} wall_s={:.1}\n\
         chaos: reassignment after a worker SIGKILL (kill to the job assigned again, \
         coordinator log times): n={} p50_s={:.3} p95_s={:.3} max_s={:.3}; requeue to \
         assignment, every requeue: n={} p50_s={:.3} p95_s={:.3} max_s={:.3}",
        ids.len(),
        finals.len(),
        worker_kills.load(Ordering::SeqCst),
        coordinator_kills.load(Ordering::SeqCst),
        panics.len(),
        not_serving.map_or("skipped".into(), |d| format!("{:.2}", d.as_secs_f64())),
        started.elapsed().as_secs_f64(),
        after_kill.len(),
        quantile(&after_kill, 0.5),
        quantile(&after_kill, 0.95),
        quantile(&after_kill, 1.0),
        after_requeue.len(),
        quantile(&after_requeue, 0.5),
        quantile(&after_requeue, 0.95),
        quantile(&after_requeue, 1.0),
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
    assert_eq!(zombies, ZOMBIES_AT.len());
    assert!(refusals >= 1);
}

fn unix_now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Unix seconds of an RFC 3339 UTC timestamp (`2026-11-30T18:30:00.123Z`).
fn unix_s(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>());
    let (y, m, d) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.splitn(3, ':').map(|x| x.parse::<f64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// From the coordinators' JSON logs: for each job requeued because a
/// killed worker went away (its worker's latest kill or pause before the
/// requeue was a kill), seconds from the kill to its next assignment; and
/// for every requeue, seconds from the requeue to the next assignment.
fn reassignment_times(logs: &Path, kills: &[(f64, String, bool)]) -> (Vec<f64>, Vec<f64>) {
    // (time, message, job, reason), in time order.
    let mut events: Vec<(f64, String, String, String)> = Vec::new();
    for e in std::fs::read_dir(logs).unwrap().flatten() {
        if !e.file_name().to_string_lossy().starts_with("coordinator") {
            continue;
        }
        for line in std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
        {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            let msg = f["message"].as_str().unwrap_or_default();
            if msg != "requeued" && msg != "assigned" {
                continue;
            }
            let Some(t) = v["timestamp"].as_str().and_then(unix_s) else {
                continue;
            };
            let field = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
            events.push((t, msg.to_owned(), field("job_id"), field("reason")));
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut after_kill, mut after_requeue) = (Vec::new(), Vec::new());
    for (i, (t, msg, job, reason)) in events.iter().enumerate() {
        if msg != "requeued" {
            continue;
        }
        let Some(assigned) = events[i + 1..]
            .iter()
            .find(|e| e.1 == "assigned" && &e.2 == job)
            .map(|e| e.0)
        else {
            continue;
        };
        after_requeue.push(assigned - t);
        let killed = kills.iter().rev().find(|(k, w, _)| {
            *k <= *t && *t - *k < 10.0 && reason.contains(&format!("worker {w} "))
        });
        if let Some((k, _, true)) = killed {
            after_kill.push(assigned - k);
        }
    }
    (after_kill, after_requeue)
}

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}
