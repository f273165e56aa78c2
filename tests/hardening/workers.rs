//! Workers that misbehave, on purpose or not.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral::auth::Secret;
use corral::config::{AuthConfig, CoordinatorConfig, WorkerKey};
use corral::pb;
use corral::types::ModelManifest;
use corral::worker::engine::{Engine, Job, LoadedModel, Output};
use tokio::task::block_in_place;
use tonic::Code;

use crate::common::procs::{self, Proc};
use crate::common::raw::{png_like, RawWorker};
use crate::common::*;

fn start_worker(dir: &Path, url: &str, name: &str, id: &str) -> Proc {
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
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[],
    )
}

/// A coordinator process with its HTTP port and the model `sd-a`.
async fn cluster(dir: &Path, heartbeat_s: &str) -> (Proc, String, String) {
    let logs = dir.join("logs");
    let (mut c, addr) = block_in_place(|| {
        procs::coordinator(
            &logs,
            "127.0.0.1:0",
            &dir.join("data"),
            &[
                "--heartbeat-interval-s",
                heartbeat_s,
                "--insecure-no-auth",
                "--http-listen",
                "127.0.0.1:0",
            ],
        )
    });
    let http = format!("http://{}", block_in_place(|| procs::http_addr(&mut c)));
    let url = format!("http://{addr}");
    register(&url, &make_model(&dir.join("models"), "sd-a")).await;
    (c, url, http)
}

async fn listed(url: &str, id: &str) -> bool {
    admin(url)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .iter()
        .any(|w| w.worker_id == id)
}

/// The zombie: a worker paused (SIGSTOP) past the heartbeat
/// timeout is removed and its stream closed; resumed, it reconnects and is
/// given work again (before, it heartbeated into a stream nobody read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_reconnects_and_gets_work_again() {
    let dir = tmp();
    let (mut coord, url, _http) = cluster(dir.path(), "0.2").await;
    let mut w = start_worker(dir.path(), &url, "w1", "w1");
    let first = submit(&url, spec("sd-a", 1)).await;
    wait_state(&url, &first.id, pb::JobState::Completed, 30).await;

    w.signal(libc::SIGSTOP);
    block_in_place(|| coord.wait_log("worker missed its heartbeats", 20));
    let u = url.clone();
    wait_until(10, "w1 to be removed", || {
        let u = u.clone();
        async move { !listed(&u, "w1").await }
    })
    .await;
    w.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let u = url.clone();
    wait_until(30, "w1 to reconnect", || {
        let u = u.clone();
        async move { listed(&u, "w1").await }
    })
    .await;
    let back_in = resumed.elapsed();
    block_in_place(|| w.wait_log("stream to coordinator dropped; reconnecting", 10));
    let second = submit(&url, spec("sd-a", 2)).await;
    let done = wait_state(&url, &second.id, pb::JobState::Completed, 30).await;
    assert_eq!(done.output.unwrap().worker_id, "w1");
    println!(
        "zombie: SIGSTOP past the heartbeat timeout (0.6 s), SIGCONT: listed again {:.2} s \
         later and ran the next job",
        back_in.as_secs_f64()
    );
}

/// Two worker processes with one `--worker-id`: the second is refused
/// with ALREADY_EXISTS and retries with backoff; the first keeps its
/// stream (no flapping) and every job completes on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_one_id_do_not_flap() {
    let dir = tmp();
    // A 1 s heartbeat: the refusal looks at whether the first was heard
    // within one interval.
    let (_coord, url, http) = cluster(dir.path(), "1.0").await;
    let _a = start_worker(dir.path(), &url, "a", "dup");
    let u = url.clone();
    wait_until(20, "the first to connect", || {
        let u = u.clone();
        async move { listed(&u, "dup").await }
    })
    .await;
    let connected = "corral_workers_connected_total";
    assert_eq!(scrape(&http, connected).await, 1.0);
    let b = start_worker(dir.path(), &url, "b", "dup");
    // Four refusals, at growing intervals: seconds of trying.
    let refusal = "give each worker its own --worker-id";
    let watched = Instant::now();
    block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while b.log().matches(refusal).count() < 4 {
            assert!(Instant::now() < deadline, "{}", b.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let window = watched.elapsed();
    let log = b.log();
    let failures: Vec<u64> = log
        .lines()
        .filter(|l| l.contains(refusal))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["fields"]["failures"].as_u64().unwrap()
        })
        .collect();
    assert!(
        failures.windows(2).all(|p| p[1] == p[0] + 1),
        "backoff grows with each refusal: {failures:?}"
    );
    assert_eq!(
        scrape(&http, connected).await,
        1.0,
        "no stream was replaced"
    );
    let ids: Vec<String> = futures::future::join_all((0..10).map(|i| {
        let u = url.clone();
        async move { submit(&u, spec("sd-a", 100 + i)).await.id }
    }))
    .await;
    for id in &ids {
        let j = wait_state(&url, id, pb::JobState::Completed, 30).await;
        assert_eq!(j.attempt, 1, "{j:?}");
        assert!(!j.error.contains("replaced"), "{j:?}");
    }
    assert_eq!(scrape(&http, connected).await, 1.0);
    println!(
        "duplicate ids: the second worker refused {} times (ALREADY_EXISTS, backoff) over {:.1} s \
         while the first kept its stream (1 connection); 10/10 jobs completed on attempt 1",
        b.log().matches(refusal).count(),
        window.as_secs_f64()
    );
}

/// The next message of any kind on a raw worker's stream.
async fn next(w: &mut RawWorker) -> pb::coordinator_message::Msg {
    tokio::time::timeout(Duration::from_secs(10), w.rx.message())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap()
        .msg
        .unwrap()
}

async fn next_assign(w: &mut RawWorker) -> pb::Assign {
    w.next_assign().await
}

/// A result with the wrong number of images, or one that is not a PNG, is
/// refused: the attempt fails (and is retried) instead of completing the
/// job with garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_fail_their_checks_are_refused() {
    let c = coordinator(CoordinatorConfig {
        max_attempts: 5,
        ..fast_config()
    })
    .await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let mut w = RawWorker::connect(&c.url, "w1", vec![]).await;
    w.heartbeat(vec![]);
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let bad: [(Vec<Vec<u8>>, &str); 2] = [
        (
            vec![png_like(b"one"), png_like(b"two")],
            "2 images for a job of 1",
        ),
        (vec![b"GIF89a not a png".to_vec()], "is not a PNG"),
    ];
    for (images, why) in bad {
        let a = next_assign(&mut w).await;
        w.send(pb::worker_message::Msg::Result(pb::JobResult {
            job_id: job.id.clone(),
            attempt: a.attempt,
            images: images.into_iter().map(Into::into).collect(),
            timings: None,
        }))
        .await;
        let u = c.url.clone();
        let id = job.id.clone();
        wait_until(10, &format!("the result to be refused: {why}"), || {
            let (u, id) = (u.clone(), id.clone());
            async move { get(&u, &id).await.error.contains(why) }
        })
        .await;
    }
    let a = next_assign(&mut w).await;
    assert_eq!(a.attempt, 3);
    w.result(&job.id, a.attempt, b"good").await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    assert_eq!(done.output.unwrap().images, vec![png_like(b"good")]);
    c.stop().await;
}

/// Sum of a counter family over its labels.
fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A failure report for an attempt that is not current changes nothing and
/// is not counted; a current one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_failure_reports_are_not_counted() {
    let (c, http) = coordinator_with_http(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let mut w = RawWorker::connect(&c.url, "w1", vec![]).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let a = next_assign(&mut w).await;
    w.heartbeat(vec![pb::RunningJob {
        job_id: job.id.clone(),
        attempt: a.attempt,
    }]);
    let failures = || async {
        let (_, text) = http_get(&format!("{http}/metrics"), None).await;
        family_sum(&text, "corral_attempt_failures_total")
    };
    // The assignment is visible once committed.
    wait_state(&c.url, &job.id, pb::JobState::Running, 10).await;
    let before = failures().await;
    let fail = |attempt| {
        pb::worker_message::Msg::Failed(pb::JobFailed {
            job_id: job.id.clone(),
            attempt,
            reason: "out of memory".into(),
            retryable: true,
            kind: pb::FailureKind::Inference as i32,
        })
    };
    let mut events = jobs(&c.url)
        .await
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    w.send(fail(a.attempt + 6)).await;
    // Messages on one stream are handled in order: once a later report
    // (a progress step) shows, the stale one was handled.
    w.send(pb::worker_message::Msg::Progress(
        corral::convert::job_progress(
            &corral::types::JobId(job.id.clone()),
            a.attempt,
            corral::types::JobPhase::Loading,
        ),
    ))
    .await;
    let after_stale = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("the progress event within 10 s")
            .unwrap()
            .unwrap();
        if let Some(pb::job_event::Event::Loading(_)) = ev.event {
            break failures().await;
        }
    };
    assert_eq!(after_stale, before, "a stale report was counted");
    assert_eq!(
        get(&c.url, &job.id).await.state,
        pb::JobState::Running as i32
    );
    w.send(fail(a.attempt)).await;
    let h = http.clone();
    wait_until(10, "the current failure to be counted", || {
        let h = h.clone();
        async move {
            let (_, text) = http_get(&format!("{h}/metrics"), None).await;
            family_sum(&text, "corral_attempt_failures_total") == before + 1.0
        }
    })
    .await;
    drop(events);
    c.stop().await;
}

/// A Hello that claims a queued job at attempt 0 (never assigned) does not
/// get it: the claim is cancelled and the job assigned properly, attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_cannot_claim_a_job_with_attempt_0() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let claim = vec![pb::RunningJob {
        job_id: job.id.clone(),
        attempt: 0,
    }];
    let mut w = RawWorker::connect(&c.url, "w1", claim).await;
    w.heartbeat(vec![]);
    let mut cancelled = false;
    let assigned = loop {
        match next(&mut w).await {
            pb::coordinator_message::Msg::Cancel(x) => {
                assert_eq!((x.job_id.as_str(), x.attempt), (job.id.as_str(), 0));
                cancelled = true;
            }
            pb::coordinator_message::Msg::Assign(a) => break a,
            _ => {}
        }
    };
    assert!(cancelled, "the claim was not cancelled");
    assert_eq!(
        (assigned.job_id.as_str(), assigned.attempt),
        (job.id.as_str(), 1)
    );
    c.stop().await;
}

const ADMIN: &str = "admin-token-0123456789";
const ANY_WORKER: &str = "any-worker-token-0123456789";
const GPU_WORKER: &str = "gpu-worker-token-0123456789";

/// Says Hello as `id` with `token`; the call's answer.
async fn hello_as(url: &str, id: &str, token: &str) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::Hello {
            worker_id: id.into(),
            max_concurrent_jobs: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let auth = corral::auth::BearerToken::new(Some(&Secret::new(token))).unwrap();
    let mut stream = pb::workers_client::WorkersClient::with_interceptor(channel(url).await, auth)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = stream.message().await?.unwrap();
    assert!(matches!(
        first.msg,
        Some(pb::coordinator_message::Msg::Welcome(_))
    ));
    Ok(())
}

/// `[[auth.workers]]`: a token bound to `gpu-*` may not say Hello as
/// another id (PERMISSION_DENIED); tokens in `worker_tokens` may use any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_tokens_bound_to_ids() {
    let c = coordinator(CoordinatorConfig {
        auth: Some(AuthConfig {
            admin_tokens: vec![Secret::new(ADMIN)],
            worker_tokens: vec![Secret::new(ANY_WORKER)],
            workers: vec![WorkerKey {
                token: Secret::new(GPU_WORKER),
                ids: vec!["gpu-*".into()],
            }],
            ..AuthConfig::default()
        }),
        ..fast_config()
    })
    .await;
    hello_as(&c.url, "gpu-1", GPU_WORKER).await.unwrap();
    let refused = hello_as(&c.url, "cpu-1", GPU_WORKER).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("cpu-1") && refused.message().contains("gpu-*"),
        "{refused:?}"
    );
    hello_as(&c.url, "cpu-1", ANY_WORKER).await.unwrap();
    c.stop().await;
}

/// An engine whose images are 2 MiB (a PNG signature and filler).
struct BigEngine;
struct BigModel;

impl Engine for BigEngine {
    fn name(&self) -> &'static str {
        "big"
    }
    fn load(&self, _: &ModelManifest, _: &Path) -> corral::Result<Arc<dyn LoadedModel>> {
        Ok(Arc::new(BigModel))
    }
}

impl LoadedModel for BigModel {
    fn resident_bytes(&self) -> u64 {
        1
    }
    fn generate(&self, job: &Job, _: &mut dyn FnMut(u32, u32) -> bool) -> corral::Result<Output> {
        Ok(Output {
            images: (0..job.spec.num_images)
                .map(|_| png_like(&vec![1u8; 2 << 20]))
                .collect(),
            ..Output::default()
        })
    }
}

/// A result larger than the coordinator's `max_message_bytes` is not sent
/// (it would kill the stream and count against every job on it): the
/// attempt fails with a reason that says so, and the worker stays. (The
/// spec passes the submit-time bound; the engine's images are far larger
/// than a 64x64 job's could be.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_message_limit_fails_with_its_reason() {
    let cfg = CoordinatorConfig {
        max_message_bytes: 2 << 20,
        max_attempts: 1,
        ..fast_config()
    };
    let (c, http) = coordinator_with_http(cfg).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let cache = tmp();
    let (w, outbox) = corral::worker::Worker::new(
        worker_config(&c.url, cache.path()),
        "big".into(),
        Arc::new(BigEngine),
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(corral::worker::run(w, outbox, async move {
        let _ = stopped.await;
    }));
    // The worker list is a snapshot at most one tick old: wait for it.
    wait_until(10, "the worker to be listed", || listed(&c.url, "big")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let failed = wait_state(&c.url, &job.id, pb::JobState::Failed, 30).await;
    assert!(failed.error.contains("max_message_bytes"), "{failed:?}");
    // The worker stays: still listed, and never connected a second time.
    assert!(listed(&c.url, "big").await, "the worker stays connected");
    let (_, text) = http_get(&format!("{http}/metrics"), None).await;
    let connects: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("corral_workers_connected_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("corral_workers_connected_total in /metrics");
    assert_eq!(connects, 1.0, "the worker reconnected");
    let _ = stop.send(());
    let _ = task.await;
    c.stop().await;
}

/// A worker that heartbeats but never finishes does not hold its job: past
/// the attempt's deadline (here 1 s: factor 1 on a 0.2 s estimate, and the
/// floor of 1 s) it is told to stop and the job runs on another worker.
/// (That a late result is refused: `scheduler::deadline`'s tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_attempt_is_requeued_after_its_deadline() {
    let mut cfg = fast_config();
    cfg.scheduler.attempt_deadline_factor = 1.0;
    cfg.scheduler.attempt_deadline_floor_s = 1.0;
    cfg.scheduler.default_service_s = 0.2;
    cfg.scheduler.load_base_s = 0.0;
    let c = coordinator(cfg).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let mut hung = RawWorker::connect(&c.url, "hung", vec![]).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let first = next_assign(&mut hung).await;
    let assigned_at = Instant::now();
    hung.heartbeat(vec![pb::RunningJob {
        job_id: job.id.clone(),
        attempt: first.attempt,
    }]);
    let mut other = RawWorker::connect(&c.url, "other", vec![]).await;
    other.heartbeat(vec![]);
    let second = next_assign(&mut other).await;
    let reassigned_s = assigned_at.elapsed().as_secs_f64();
    assert_eq!(second.job_id, job.id);
    assert_eq!(second.attempt, first.attempt + 1);
    assert!(
        reassigned_s >= 1.0,
        "reassigned after {reassigned_s:.2} s, before the 1 s deadline"
    );
    let cancel = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), hung.rx.message())
            .await
            .expect("a cancel within 10 s")
            .unwrap()
            .unwrap();
        if let Some(pb::coordinator_message::Msg::Cancel(c)) = m.msg {
            break c;
        }
    };
    assert_eq!(
        (cancel.job_id.as_str(), cancel.attempt),
        (job.id.as_str(), first.attempt)
    );
    other.result(&job.id, second.attempt, b"other").await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    assert_eq!(done.worker_id, "other");
    println!(
        "attempt deadline: a hung attempt was requeued {reassigned_s:.2} s after its \
         assignment (deadline 1 s)"
    );
    c.stop().await;
}

/// Progress with a step outside 0..=steps of the job (or past its own
/// total) is refused: watchers see only the steps the job can have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_outside_the_jobs_steps_is_refused() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let mut w = RawWorker::connect(&c.url, "w1", vec![]).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let a = next_assign(&mut w).await;
    w.heartbeat(vec![pb::RunningJob {
        job_id: job.id.clone(),
        attempt: a.attempt,
    }]);
    wait_state(&c.url, &job.id, pb::JobState::Running, 10).await;
    let steps = a.spec.as_ref().unwrap().steps;
    let mut events = jobs(&c.url)
        .await
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let id = corral::types::JobId(job.id.clone());
    let step = |step, total_steps| {
        pb::worker_message::Msg::Progress(corral::convert::job_progress(
            &id,
            a.attempt,
            corral::types::JobPhase::Denoising { step, total_steps },
        ))
    };
    w.send(step(steps + 5, steps + 5)).await; // more steps than the job has
    w.send(step(steps, steps - 1)).await; // past its own total
    w.send(step(1, steps)).await;
    let first = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("a progress event within 10 s")
            .unwrap()
            .unwrap();
        if let Some(pb::job_event::Event::Progress(p)) = ev.event {
            break p;
        }
    };
    assert_eq!((first.step, first.total_steps), (1, steps));
    drop(events);
    c.stop().await;
}
