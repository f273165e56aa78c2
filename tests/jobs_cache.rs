//! The cache seen through jobs: a coordinator, a synthetic-engine worker,
//! and a real HTTP server on 127.0.0.1 serving model files.

#[path = "cache_common/mod.rs"]
mod cache_common;
mod common;

use cache_common::TestServer;
use common::*;
use corral::pb;

const FILES: &[(&str, usize)] = &[("model_index.json", 100), ("unet/model.onnx", 100_000)];

async fn run_job(url: &str, model: &str, seed: u64) -> pb::Job {
    let id = submit(url, spec(model, seed)).await.id;
    wait_state(url, &id, pb::JobState::Completed, 30).await
}

fn tier(j: &pb::Job) -> pb::CacheTier {
    pb::CacheTier::try_from(j.output.as_ref().unwrap().timings.unwrap().tier).unwrap()
}

/// The one worker's disk models. The worker list is a snapshot at most one
/// tick old, and a worker that missed heartbeats on a loaded machine comes
/// back by reconnecting: wait for it to be listed.
async fn disk_models(url: &str) -> Vec<String> {
    wait_workers(url, 1).await;
    let w = admin(url)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let mut v: Vec<String> = w[0]
        .state
        .as_ref()
        .unwrap()
        .disk_models
        .iter()
        .map(|d| d.model_id.clone())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_model_is_downloaded_then_served_from_cache() {
    let server = TestServer::start().await;
    let m = server.publish("m1", FILES);
    let c = coordinator(fast_config()).await;
    register(&c.url, &m).await;
    let cache = tmp();
    let w = worker("w", worker_config(&c.url, cache.path())).await;
    let first = run_job(&c.url, "m1", 1).await;
    assert_eq!(tier(&first), pb::CacheTier::Download);
    assert!(first.output.unwrap().timings.unwrap().download_s > 0.0);
    let fetched = server.request_count();
    let second = run_job(&c.url, "m1", 2).await;
    assert_eq!(tier(&second), pb::CacheTier::Vram);
    assert_eq!(
        server.request_count(),
        fetched,
        "the second job downloaded again"
    );
    w.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_for_two_of_three_evicts_the_least_recently_used() {
    let server = TestServer::start().await;
    let c = coordinator(fast_config()).await;
    for id in ["a", "b", "c"] {
        register(&c.url, &server.publish(id, FILES)).await;
    }
    let cache = tmp();
    let mut cfg = worker_config(&c.url, cache.path());
    cfg.cache_max_bytes = 250_000; // two bundles of ~100 KB
    cfg.max_loaded_models = 1;
    let w = worker("w", cfg).await;
    for (i, m) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(
            tier(&run_job(&c.url, m, i as u64).await),
            pb::CacheTier::Download
        );
    }
    // a was used least recently: c's download evicted it.
    wait_until(10, "disk = [b, c]", || async {
        disk_models(&c.url).await == ["b", "c"]
    })
    .await;
    // b is on disk, a must come back over the network (evicting c, now the LRU... or b).
    assert_eq!(tier(&run_job(&c.url, "b", 10).await), pb::CacheTier::Disk);
    assert_eq!(
        tier(&run_job(&c.url, "a", 11).await),
        pb::CacheTier::Download
    );
    wait_until(10, "disk = [a, b]", || async {
        disk_models(&c.url).await == ["a", "b"]
    })
    .await;
    w.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_download_fails_the_job_and_is_never_loaded() {
    let server = TestServer::start().await;
    let m = server.publish("bad", FILES);
    server
        .state
        .corrupt
        .lock()
        .unwrap()
        .insert("bad/unet/model.onnx".into());
    let c = coordinator(fast_config()).await;
    register(&c.url, &m).await;
    let cache = tmp();
    let w = worker("w", worker_config(&c.url, cache.path())).await;
    let id = submit(&c.url, spec("bad", 1)).await.id;
    let j = wait_state(&c.url, &id, pb::JobState::Failed, 30).await;
    assert!(j.error.contains("checksum"), "{}", j.error);
    assert!(j.error.contains("unet/model.onnx"), "{}", j.error);
    assert!(disk_models(&c.url).await.is_empty());
    w.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_model_needs_no_download_and_survives_eviction_pressure() {
    let server = TestServer::start().await;
    let c = coordinator(fast_config()).await;
    // The preloaded model is baked in; it is not on the server at all.
    let baked = tmp();
    let p = cache_common::local_bundle(baked.path(), "baked", FILES);
    let mut p_source = p.clone();
    p_source.source = server.url("baked");
    register(&c.url, &p_source).await;
    for id in ["x", "y"] {
        register(&c.url, &server.publish(id, FILES)).await;
    }
    let cache = tmp();
    let mut cfg = worker_config(&c.url, cache.path());
    cfg.cache_max_bytes = 150_000; // one downloaded bundle at a time
    cfg.max_loaded_models = 1;
    cfg.preloaded_dir = Some(baked.path().to_path_buf());
    let w = worker("w", cfg).await;
    assert_eq!(
        tier(&run_job(&c.url, "baked", 1).await),
        pb::CacheTier::Preloaded
    );
    for (i, m) in ["x", "y", "x"].into_iter().enumerate() {
        assert_eq!(
            tier(&run_job(&c.url, m, i as u64).await),
            pb::CacheTier::Download
        );
    }
    assert_eq!(
        tier(&run_job(&c.url, "baked", 9).await),
        pb::CacheTier::Preloaded
    );
    assert!(server.requests_for("baked/unet/model.onnx").is_empty());
    w.stop().await;
    c.stop().await;
}
