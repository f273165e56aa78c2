//! Limits that protect the coordinator: worker streams and unfinished jobs
//! (per-client limits are in tests/auth.rs; request fields in control_plane.rs).

mod common;

use common::raw::RawWorker;
use common::*;
use corral::config::{CoordinatorConfig, JobLimits};
use corral::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_streams_are_limited() {
    let c = coordinator(CoordinatorConfig {
        max_worker_streams: 1,
        ..fast_config()
    })
    .await;
    let first = RawWorker::connect(&c.url, "w1", vec![]).await;
    first.heartbeat(vec![]);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::Hello {
            worker_id: "w2".into(),
            max_concurrent_jobs: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let refused = pb::workers_client::WorkersClient::new(channel(&c.url).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_worker_streams"),
        "{refused:?}"
    );
    // The same worker reconnecting after its stream ended is not a new
    // stream (a second live stream for one id is refused: control_plane).
    drop(first);
    let url = c.url.clone();
    wait_until(10, "w1 to reconnect", || {
        let url = url.clone();
        async move { try_hello(&url, "w1").await.is_ok() }
    })
    .await;
    drop(tx);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_are_limited_in_total() {
    let c = coordinator(CoordinatorConfig {
        limits: JobLimits {
            max_unfinished_jobs: 2,
            ..JobLimits::default()
        },
        ..fast_config()
    })
    .await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    submit(&c.url, spec("sd-a", 1)).await;
    submit(&c.url, spec("sd-a", 2)).await;
    let third = jobs(&c.url)
        .await
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("sd-a", 3)),
        })
        .await
        .unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(third.message().contains("max_unfinished_jobs"), "{third:?}");
    c.stop().await;
}

/// Says Hello as `id`; the stream is dropped at once.
async fn try_hello(url: &str, id: &str) -> Result<(), tonic::Status> {
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
    pb::workers_client::WorkersClient::new(channel(url).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|_| ())
}
