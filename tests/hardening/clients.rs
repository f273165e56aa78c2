//! Clients that misuse the API, and what a third party needs from it.

use corral::auth::Secret;
use corral::config::CoordinatorConfig;
use corral::pb;
use tonic::Code;

use crate::common::procs::Proc;
use crate::common::raw::RawWorker;
use crate::common::*;

async fn try_submit(url: &str, s: pb::JobSpec) -> Result<pb::SubmitJobResponse, tonic::Status> {
    jobs(url)
        .await
        .submit_job(pb::SubmitJobRequest { spec: Some(s) })
        .await
        .map(|r| r.into_inner())
}

/// The same idempotency key for another request is an error naming the
/// key (before, the earlier job came back as if it were this request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_request_is_refused() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let keyed = |prompt: &str| pb::JobSpec {
        prompt: prompt.into(),
        idempotency_key: "order-42".into(),
        ..spec("sd-a", 1)
    };
    let first = try_submit(&c.url, keyed("a red fox")).await.unwrap();
    let again = try_submit(&c.url, keyed("a red fox")).await.unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.job.unwrap().id, first.job.unwrap().id);
    let other = try_submit(&c.url, keyed("a blue whale")).await.unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    assert!(
        other.message().contains("order-42") && other.message().contains("different request"),
        "{other:?}"
    );
    c.stop().await;
}

/// A page token the coordinator never gave out is INVALID_ARGUMENT (before,
/// an empty last page: a client would stop listing early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_page_token_is_invalid() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    submit(&c.url, spec("sd-a", 1)).await;
    for token in ["nonsense", "12", "x.j-1"] {
        let err = jobs(&c.url)
            .await
            .list_jobs(pb::ListJobsRequest {
                page_token: token.into(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{token}: {err:?}");
        assert!(err.message().contains("page_token"), "{err:?}");
    }
    c.stop().await;
}

/// proto3 cannot tell 0 from "not set": `num_images` 0 is one image and a
/// Hello's `max_concurrent_jobs` 0 is one slot (both were refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proto3_zero_values_take_their_defaults() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = try_submit(
        &c.url,
        pb::JobSpec {
            num_images: 0,
            ..spec("sd-a", 1)
        },
    )
    .await
    .unwrap()
    .job
    .unwrap();
    assert_eq!(job.spec.unwrap().num_images, 1);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::Hello {
            worker_id: "w0".into(),
            max_concurrent_jobs: 0,
            cache_max_bytes: 1 << 30,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let rx = pb::workers_client::WorkersClient::new(channel(&c.url).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("a Hello with max_concurrent_jobs 0 is welcome")
        .into_inner();
    let mut w = RawWorker { tx, rx };
    w.heartbeat(vec![]);
    let a = w.next_assign().await;
    assert_eq!(a.spec.unwrap().num_images, 1);
    w.result(&job.id, a.attempt, b"one").await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    assert_eq!(done.output.unwrap().images.len(), 1);
    c.stop().await;
}

/// A watcher of a job that will not finish does not hold up a shutdown:
/// after a grace period its connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_does_not_hold_up_a_shutdown() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let mut client = jobs(&c.url).await;
    let mut events = client
        .watch_job(pb::WatchJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    events.message().await.unwrap().unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(20), c.stop())
        .await
        .expect("the coordinator stops with a watcher connected");
    assert!(
        !matches!(events.message().await, Ok(Some(_))),
        "the watch ended"
    );
    println!(
        "shutdown with an open WatchJob: stopped in {:.1} s (grace 3 s)",
        started.elapsed().as_secs_f64()
    );
}

const HTTP_TOKEN: &str = "http-token-0123456789";

/// With `http_token`, `/metrics` and `/api/cluster` need the bearer token;
/// the page (no data) does not, and sends the token from its fragment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_needs_its_token() {
    let (c, http) = coordinator_with_http(CoordinatorConfig {
        http_token: Some(Secret::new(HTTP_TOKEN)),
        ..fast_config()
    })
    .await;
    for path in ["/metrics", "/api/cluster"] {
        let url = format!("{http}{path}");
        assert_eq!(http_get(&url, None).await.0, 401, "{path} without a token");
        assert_eq!(
            http_get(&url, Some("http-token-wrong-456789")).await.0,
            401,
            "{path} with a wrong token"
        );
        let (code, body) = http_get(&url, Some(HTTP_TOKEN)).await;
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (_, metrics) = http_get(&format!("{http}/metrics"), Some(HTTP_TOKEN)).await;
    assert!(metrics.contains("corral_jobs_submitted_total"), "{metrics}");
    let (code, page) = http_get(&format!("{http}/"), None).await;
    assert_eq!(code, 200);
    assert!(
        page.contains("location.hash") && page.contains("Authorization"),
        "the page sends the token from its fragment"
    );
    c.stop().await;
}

/// Logs written to a file carry no ANSI colour codes.
#[test]
fn logs_have_no_colours_off_a_terminal() {
    let dir = tmp();
    let data = dir.path().join("data");
    let mut p = Proc::start(
        &dir.path().join("logs"),
        "coordinator",
        &[
            "--log-format",
            "text",
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--insecure-no-auth",
        ],
        &[],
    );
    p.wait_log("coordinator listening", 30);
    p.kill();
    let log = p.log();
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file: {log:?}"
    );
}
