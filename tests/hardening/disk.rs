//! A full disk: the coordinator's data dir on a small tmpfs (needs root to
//! mount it; without, the test says SKIPPED and checks nothing).
//!
//! One run covers the cases in order: a result arriving when the
//! disk is full, submits until the disk fills, recovery once space is
//! freed, and a SIGKILL restart that must show every acknowledged job.

use std::time::{Duration, Instant};

use corral::pb;
use tokio::task::block_in_place;
use tonic::Code;

use crate::common::disk::Tmpfs;
use crate::common::raw::{png_like, RawWorker};
use crate::common::*;

const NOT_SERVING: i32 = 2;
const SERVING: i32 = 1;

async fn wait_health(url: &str, want: i32, secs: u64) -> Duration {
    let t = Instant::now();
    let url = url.to_owned();
    wait_until(secs, &format!("health {want}"), || {
        let url = url.clone();
        async move {
            matches!(
                tokio::time::timeout(Duration::from_secs(2), health(&url)).await,
                Ok(Ok(s)) if s == want
            )
        }
    })
    .await;
    t.elapsed()
}

async fn try_submit(url: &str, s: pb::JobSpec) -> Result<pb::SubmitJobResponse, tonic::Status> {
    let ch = corral::client::channel(url)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    pb::jobs_client::JobsClient::new(ch)
        .submit_job(pb::SubmitJobRequest { spec: Some(s) })
        .await
        .map(|r| r.into_inner())
}

async fn try_get(url: &str, id: &str) -> Result<pb::Job, tonic::Status> {
    let ch = corral::client::channel(url)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    pb::jobs_client::JobsClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .get_job(pb::GetJobRequest {
            job_id: id.into(),
            include_images: true,
        })
        .await
        .map(|r| r.into_inner())
}

/// A refusal caused by the disk: retryable, and it says so.
fn names_the_disk(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::ResourceExhausted) && s.message().contains("disk")
}

fn keyed(i: usize) -> pb::JobSpec {
    pb::JobSpec {
        // Large records fill the disk sooner.
        prompt: format!("{i:04} {}", "a lighthouse at dusk ".repeat(190)),
        idempotency_key: format!("disk-{i}"),
        ..spec("sd-a", i as u64)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_no_acknowledged_job() {
    let root = tmp();
    let Some(disk) = Tmpfs::mount(&root.path().join("disk"), 24) else {
        println!("SKIPPED: the full-disk test needs root (mount -t tmpfs)");
        return;
    };
    let data = disk.dir.join("data");
    let logs = root.path().join("logs");
    let flags = [
        "--heartbeat-interval-s",
        "0.2",
        "--insecure-no-auth",
        "--http-listen",
        "127.0.0.1:0",
    ];
    let (mut coord, addr) =
        block_in_place(|| procs::coordinator(&logs, "127.0.0.1:0", &data, &flags));
    let http = format!("http://{}", block_in_place(|| procs::http_addr(&mut coord)));
    let url = format!("http://{addr}");
    register(&url, &make_model(&root.path().join("models"), "sd-a")).await;
    let store_up = || scrape(&http, "corral_store_up");

    // A worker runs job J when the disk fills.
    let mut w = RawWorker::connect(&url, "w1", vec![]).await;
    let j = submit(&url, spec("sd-a", 0)).await;
    let a = w.next_assign().await;
    assert_eq!(a.job_id, j.id);
    let running = vec![pb::RunningJob {
        job_id: j.id.clone(),
        attempt: a.attempt,
    }];
    w.heartbeat(running.clone());

    // 1. J's result (4 MiB) arrives on a full disk: its commit fails.
    let mut ballast = disk.fill();
    let failed_at = Instant::now();
    w.send(pb::worker_message::Msg::Result(pb::JobResult {
        job_id: j.id.clone(),
        attempt: a.attempt,
        images: vec![png_like(&vec![7u8; 4 << 20]).into()],
        timings: None,
    }))
    .await;
    let to_not_serving = wait_health(&url, NOT_SERVING, 20).await;
    assert_eq!(store_up().await, 0.0);
    let line = block_in_place(|| coord.wait_log("the store failed", 10));
    assert!(
        line.contains("ERROR") && line.contains("disk is full"),
        "{line}"
    );
    // Nothing that was not committed is shown, and calls say why.
    match try_get(&url, &j.id).await {
        Ok(job) => assert_ne!(job.state, pb::JobState::Completed as i32, "{job:?}"),
        Err(s) => assert!(names_the_disk(&s), "{s:?}"),
    }
    let refused = try_submit(&url, keyed(100_000)).await.unwrap_err();
    assert!(names_the_disk(&refused), "{refused:?}");

    // 2. Some space comes back: serving again, by itself; J is queued
    // again (its worker's stream was closed), not lost and not stuck.
    ballast.free(2 << 20);
    let to_serving = wait_health(&url, SERVING, 30).await;
    assert_eq!(store_up().await, 1.0);
    let again = try_get(&url, &j.id).await.unwrap();
    assert_eq!(again.state, pb::JobState::Queued as i32, "{again:?}");

    // 3. Submits until the disk is full again: every OK must be durable.
    let mut acked: Vec<(usize, String)> = Vec::new();
    let mut refusals = Vec::new();
    for i in 0..20_000 {
        match try_submit(&url, keyed(i)).await {
            Ok(r) => acked.push((i, r.job.unwrap().id)),
            Err(s) => {
                assert!(names_the_disk(&s), "{s:?}");
                refusals.push(s);
                if refusals.len() >= 20 {
                    break;
                }
            }
        }
    }
    assert!(
        !acked.is_empty() && refusals.len() >= 20,
        "acked {}",
        acked.len()
    );
    wait_health(&url, NOT_SERVING, 20).await;
    assert_eq!(store_up().await, 0.0);

    // 4. All space back: serving again. J's worker reconnects still running
    // it and returns the result, which is stored now.
    drop(ballast);
    wait_health(&url, SERVING, 30).await;
    drop(w);
    let w = RawWorker::connect(&url, "w1", running.clone()).await;
    w.heartbeat(running.clone());
    w.result(&j.id, a.attempt, b"after the disk filled").await;
    wait_state(&url, &j.id, pb::JobState::Completed, 20).await;
    drop(w);

    // 5. SIGKILL and restart: every acknowledged job is there, with its key.
    coord.kill();
    let (coord2, addr2) = block_in_place(|| procs::coordinator(&logs, &addr, &data, &flags));
    assert_eq!(addr2, addr);
    let mut lost = 0;
    for (i, id) in &acked {
        match try_get(&url, id).await {
            Ok(job) => assert_eq!(job.state, pb::JobState::Queued as i32),
            Err(s) if s.code() == Code::NotFound => lost += 1,
            Err(s) => panic!("{s:?}"),
        }
        let r = try_submit(&url, keyed(*i)).await.unwrap();
        assert!(r.deduplicated, "key disk-{i} was forgotten");
        assert_eq!(&r.job.unwrap().id, id);
    }
    let done = try_get(&url, &j.id).await.unwrap();
    assert_eq!(done.state, pb::JobState::Completed as i32);
    assert_eq!(
        done.output.unwrap().images,
        vec![png_like(b"after the disk filled")]
    );
    println!(
        "full disk (24 MiB tmpfs): NOT_SERVING {:.2} s after the result that hit the full disk, \
         SERVING {:.2} s after space was freed; {} submits acknowledged before the disk filled \
         again, {} refused (UNAVAILABLE / RESOURCE_EXHAUSTED naming the disk); after SIGKILL and \
         restart lost {lost} of {} (keys kept); the result that hit the full disk was stored after \
         recovery (total {:.1} s)",
        to_not_serving.as_secs_f64(),
        to_serving.as_secs_f64(),
        acked.len(),
        refusals.len(),
        acked.len(),
        failed_at.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0);
    drop(coord2);
}
