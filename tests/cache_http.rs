//! The disk cache against a real HTTP server on 127.0.0.1:0.

#[path = "cache_common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use corral::error::Error;
use corral::types::{CacheTier, ModelId};
use corral::worker::cache::{bundle_dir_name, DiskCache};
use corral::worker::fetch::RetryPolicy;

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_backoff: Duration::from_millis(10),
        read_timeout: Duration::from_secs(10),
    }
}

async fn open(dir: &std::path::Path, max: u64, pre: Option<std::path::PathBuf>) -> DiskCache {
    DiskCache::open_with(config(dir, max, pre), fast_retry())
        .await
        .unwrap()
}

#[tokio::test]
async fn download_verify_then_disk_hit() {
    let srv = TestServer::start().await;
    let m = srv.publish("sd15", &[("unet/model.onnx", 300_000), ("vae.onnx", 1000)]);
    // The manifest can be read back from the server.
    let fetched = corral::manifest::manifest_from_source(&m.id, &m.source)
        .await
        .unwrap();
    assert_eq!(fetched.files, m.files);

    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 10_000_000, None).await;
    let last = AtomicU64::new(0);
    let (g, tier) = cache
        .ensure(&m, &|done, total| {
            assert!(done <= total);
            last.store(done, Ordering::Relaxed);
        })
        .await
        .unwrap();
    assert_eq!(tier, CacheTier::Download);
    assert_eq!(last.load(Ordering::Relaxed), m.total_bytes());
    assert_bundle(g.path(), &m);
    assert_eq!(g.model_id(), &m.id);
    let n = srv.request_count();

    let (g2, tier) = cache.ensure(&m, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Disk);
    assert_eq!(g2.path(), g.path());
    assert_eq!(srv.request_count(), n, "a hit must not touch the network");
    let s = cache.stats();
    assert_eq!((s.misses, s.hits_disk), (1, 1));
    assert_eq!(s.bytes_downloaded, m.total_bytes());
    let r = cache.report();
    assert_eq!(r.disk_models.len(), 1);
    assert!(r.download_bps > 0);
    assert_eq!(r.free_bytes, 10_000_000 - m.total_bytes());
}

#[tokio::test]
async fn concurrent_ensures_share_one_download() {
    let srv = TestServer::start().await;
    let m = srv.publish("shared", &[("w.bin", 200_000)]);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000_000, None).await;
    let (a, b) = tokio::join!(cache.ensure(&m, &|_, _| {}), cache.ensure(&m, &|_, _| {}));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.1, CacheTier::Download);
    assert_eq!(b.1, CacheTier::Download);
    assert_eq!(srv.requests_for("shared/w.bin").len(), 1);
    assert_eq!(cache.report().used_bytes, 200_000);
}

#[tokio::test]
async fn budget_for_two_of_three_evicts_the_lru() {
    let srv = TestServer::start().await;
    let ms: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| srv.publish(id, &[("model.bin", 100_000)]))
        .collect();
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 250_000, None).await;
    for m in &ms[..2] {
        cache.ensure(m, &|_, _| {}).await.unwrap();
    }
    // Touch "a" so "b" is the least recently used.
    assert_eq!(
        cache.ensure(&ms[0], &|_, _| {}).await.unwrap().1,
        CacheTier::Disk
    );
    let (_c, tier) = cache.ensure(&ms[2], &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Download);
    let ids: Vec<_> = cache
        .report()
        .disk_models
        .into_iter()
        .map(|m| m.model_id)
        .collect();
    assert_eq!(ids, vec![ModelId::from("a"), ModelId::from("c")]);
    assert_eq!(listing(d.path()), vec![".corral-cache", "a", "c"]);
    assert_eq!(cache.stats().evictions, 1);
    // Cycling keeps evicting the least recently used; the budget always holds.
    for m in ms.iter().cycle().take(6) {
        let (g, _) = cache.ensure(m, &|_, _| {}).await.unwrap();
        assert_bundle(g.path(), m);
        drop(g);
        assert!(cache.report().used_bytes <= 250_000);
    }
}

#[tokio::test]
async fn pinned_bundles_are_not_evicted_and_refusal_names_them() {
    let srv = TestServer::start().await;
    let a = srv.publish("a", &[("model.bin", 100_000)]);
    let b = srv.publish("b", &[("model.bin", 100_000)]);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 150_000, None).await;
    let (ga, _) = cache.ensure(&a, &|_, _| {}).await.unwrap();
    let e = cache.ensure(&b, &|_, _| {}).await.unwrap_err();
    match &e {
        Error::ResourceExhausted(msg) => {
            assert!(
                msg.contains("model b") && msg.contains("pinned: [a"),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
    assert_bundle(ga.path(), &a);
    let p = cache.prefetch(b.clone()).await.unwrap().unwrap_err();
    assert!(matches!(p, Error::ResourceExhausted(_)));
    drop(ga);
    cache.prefetch(b.clone()).await.unwrap().unwrap();
    let ids: Vec<_> = cache
        .report()
        .disk_models
        .into_iter()
        .map(|m| m.model_id)
        .collect();
    assert_eq!(ids, vec![ModelId::from("b")]);
}

#[tokio::test]
async fn cut_connection_resumes_with_range() {
    let srv = TestServer::start().await;
    let m = srv.publish("big", &[("unet.onnx", 500_000)]);
    srv.state
        .cut_after
        .lock()
        .unwrap()
        .insert("big/unet.onnx".into(), 123_456);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000_000, None).await;
    let (g, tier) = cache.ensure(&m, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Download);
    assert_bundle(g.path(), &m);
    let reqs = srv.requests_for("big/unet.onnx");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0], None);
    assert_eq!(reqs[1].as_deref(), Some("bytes=123456-"));
}

#[tokio::test]
async fn corrupted_file_is_rejected_and_never_indexed() {
    let srv = TestServer::start().await;
    let m = srv.publish("bad", &[("a.bin", 1000), ("b.bin", 50_000)]);
    srv.state.corrupt.lock().unwrap().insert("bad/b.bin".into());
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000_000, None).await;
    let e = cache.ensure(&m, &|_, _| {}).await.unwrap_err();
    assert!(
        matches!(&e, Error::Checksum { path, .. } if path == "b.bin"),
        "{e}"
    );
    let r = cache.report();
    assert!(r.disk_models.is_empty() && r.downloads.is_empty());
    assert_eq!((r.used_bytes, r.reserved_bytes), (0, 0));
    assert_eq!(listing(d.path()), vec![".corral-cache"]);
    assert_eq!(cache.stats().checksum_failures, 1);
    // Fixed upstream: the next ensure downloads it.
    srv.state.corrupt.lock().unwrap().clear();
    let (g, _) = cache.ensure(&m, &|_, _| {}).await.unwrap();
    assert_bundle(g.path(), &m);
}

#[tokio::test]
async fn missing_file_is_not_retried_forever() {
    let srv = TestServer::start().await;
    let mut m = srv.publish("gone", &[("a.bin", 10)]);
    m.files[0].path = "missing.bin".into();
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000_000, None).await;
    let e = cache.ensure(&m, &|_, _| {}).await.unwrap_err();
    assert!(
        matches!(e, Error::FailedPrecondition(ref s) if s.contains("404")),
        "{e}"
    );
    assert_eq!(srv.requests_for("gone/missing.bin").len(), 1);
    assert_eq!(listing(d.path()), vec![".corral-cache"]);
}

#[tokio::test]
async fn preloaded_model_served_without_download_and_never_evicted() {
    let srv = TestServer::start().await;
    let pre = tempfile::tempdir().unwrap();
    // A preloaded bundle without a marker: the manifest is computed at open.
    let pm = local_bundle(pre.path(), "popular", &[("unet.onnx", 80_000)]);
    let a = srv.publish("a", &[("model.bin", 100_000)]);
    let b = srv.publish("b", &[("model.bin", 100_000)]);
    let mut remote_pm = pm.clone();
    remote_pm.source = srv.url("popular");

    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 150_000, Some(pre.path().to_path_buf())).await;
    let r = cache.report();
    assert_eq!(r.disk_models.len(), 1);
    assert!(r.disk_models[0].preloaded);
    assert_eq!(r.free_bytes, 150_000, "preloaded bytes are not counted");

    for m in [&a, &b, &a, &b] {
        cache.ensure(m, &|_, _| {}).await.unwrap();
        let (g, tier) = cache.ensure(&remote_pm, &|_, _| {}).await.unwrap();
        assert_eq!(tier, CacheTier::Preloaded);
        assert!(g.path().starts_with(pre.path()));
        assert_bundle(g.path(), &pm);
    }
    assert!(srv.requests_for("popular/unet.onnx").is_empty());
    assert_eq!(cache.stats().hits_preloaded, 4);
    assert_eq!(cache.stats().evictions, 3);
    assert_eq!(listing(&pre.path().join("popular")), vec!["unet.onnx"]);
}

#[tokio::test]
async fn restart_sweeps_leftovers_and_keeps_good_bundles() {
    let srv = TestServer::start().await;
    let good = srv.publish("good", &[("x/model.bin", 20_000)]);
    let half = srv.publish("half", &[("model.bin", 20_000)]);
    let d = tempfile::tempdir().unwrap();
    {
        let cache = open(d.path(), 1_000_000, None).await;
        cache.ensure(&good, &|_, _| {}).await.unwrap();
        cache.ensure(&half, &|_, _| {}).await.unwrap();
    }
    let dir = d.path();
    // A half-written bundle: its file truncated after the marker said it was complete.
    let hp = dir.join(bundle_dir_name(&half.id)).join("model.bin");
    let f = std::fs::OpenOptions::new().write(true).open(&hp).unwrap();
    f.set_len(10_000).unwrap();
    drop(f);
    // A download cut by kill -9, a tombstone, a bundle without marker, a stray file.
    std::fs::create_dir_all(dir.join(".tmp-other/sub")).unwrap();
    std::fs::write(dir.join(".tmp-other/sub/f"), b"partial").unwrap();
    std::fs::create_dir_all(dir.join(".tomb-old-3")).unwrap();
    std::fs::create_dir_all(dir.join("nomarker")).unwrap();
    std::fs::write(dir.join("nomarker/model.bin"), b"x").unwrap();
    std::fs::write(dir.join("stray"), b"x").unwrap();

    let cache = open(dir, 1_000_000, None).await;
    assert_eq!(listing(dir), vec![".corral-cache", "good"]);
    let r = cache.report();
    assert_eq!(r.disk_models.len(), 1);
    assert_eq!(r.used_bytes, 20_000);
    let n = srv.request_count();
    let (g, tier) = cache.ensure(&good, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Disk);
    assert_bundle(g.path(), &good);
    assert_eq!(srv.request_count(), n);
    let (_, tier) = cache.ensure(&half, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Download);
}

#[tokio::test]
async fn refuses_to_sweep_a_foreign_directory() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("precious.txt"), b"keep me").unwrap();
    let e = DiskCache::open(config(d.path(), 1000, None))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(d.path().join("precious.txt").exists());
}

#[tokio::test]
async fn report_shows_download_progress() {
    let srv = TestServer::start().await;
    let m = srv.publish("slow", &[("w.bin", 2_000_000)]);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 10_000_000, None).await;
    let c2 = cache.clone();
    let h = tokio::spawn(async move { c2.ensure(&m, &|_, _| {}).await.map(|_| ()) });
    wait_for("the download to show up", Duration::from_secs(10), || {
        let r = cache.report();
        !r.downloads.is_empty() || !r.disk_models.is_empty()
    })
    .await;
    let r = cache.report();
    if let Some(dl) = r.downloads.first() {
        assert_eq!(dl.bytes_total, 2_000_000);
        assert_eq!(r.reserved_bytes, 2_000_000);
        assert_eq!(r.free_bytes, 8_000_000);
    }
    h.await.unwrap().unwrap();
    let r = cache.report();
    assert!(r.downloads.is_empty());
    assert_eq!(r.used_bytes, 2_000_000);
}

#[tokio::test]
async fn a_new_version_of_a_model_replaces_the_old_bundle() {
    let srv = TestServer::start().await;
    let v1 = srv.publish("m", &[("w.bin", 10_000)]);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000_000, None).await;
    let g1 = cache.ensure(&v1, &|_, _| {}).await.unwrap().0;
    // Republished with other bytes under the same id.
    let mut v2 = v1.clone();
    let bytes = content("m/w.bin v2", 12_000);
    v2.files = vec![file_entry("w.bin", &bytes)];
    srv.put("m/w.bin", bytes);
    // While v1 is pinned the new version waits (retryable).
    let e = cache.ensure(&v2, &|_, _| {}).await.unwrap_err();
    assert!(
        matches!(e, Error::Unavailable(_)) && e.is_retryable(),
        "{e}"
    );
    drop(g1);
    let (g2, tier) = cache.ensure(&v2, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Download);
    assert_bundle(g2.path(), &v2);
    assert_eq!(cache.report().used_bytes, 12_000);
    assert_eq!(listing(d.path()), vec![".corral-cache", "m"]);
}

#[tokio::test]
async fn resume_from_a_server_without_range_support_skips_the_prefix() {
    let srv = TestServer::start().await;
    let m = srv.publish("norange", &[("unet.onnx", 300_000)]);
    srv.state
        .ignore_range
        .store(true, std::sync::atomic::Ordering::Relaxed);
    srv.state
        .cut_after
        .lock()
        .unwrap()
        .insert("norange/unet.onnx".into(), 100_000);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000_000, None).await;
    let (g, _) = cache.ensure(&m, &|_, _| {}).await.unwrap();
    assert_bundle(g.path(), &m);
    let reqs = srv.requests_for("norange/unet.onnx");
    assert_eq!(reqs, vec![None, Some("bytes=100000-".to_string())]);
}

#[tokio::test]
async fn a_cache_dir_filled_at_build_time_serves_as_the_preloaded_dir() {
    // What the Dockerfile does: fetch into /models/preloaded with a DiskCache, then point
    // the worker's preloaded_dir at it.
    let srv = TestServer::start().await;
    let m = srv.publish("baked", &[("unet/model.onnx", 50_000), ("vae.onnx", 5_000)]);
    let pre = tempfile::tempdir().unwrap();
    {
        let build = open(pre.path(), u64::MAX, None).await;
        build.ensure(&m, &|_, _| {}).await.unwrap();
    }
    let n = srv.request_count();
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 1_000, Some(pre.path().to_path_buf())).await;
    let (g, tier) = cache.ensure(&m, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Preloaded);
    assert!(g.is_preloaded());
    assert_bundle(g.path(), &m);
    assert_eq!(srv.request_count(), n);
    assert!(cache.pin(&m.id).is_some());
}

#[tokio::test]
async fn a_model_resident_in_vram_keeps_its_files_on_disk() {
    use corral::worker::residency::Residency;
    let srv = TestServer::start().await;
    let a = srv.publish("a", &[("model.bin", 100_000)]);
    let b = srv.publish("b", &[("model.bin", 100_000)]);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 150_000, None).await;
    let vram: Residency<String> = Residency::new(1 << 30, 4);
    let (g, _) = cache.ensure(&a, &|_, _| {}).await.unwrap();
    let path = g.path().to_path_buf();
    // The session keeps the guard; the job's own handle is gone once it finishes.
    let (session, was) = vram
        .get_or_load(&a.id, 1000, Some(g), || Ok(path.display().to_string()))
        .unwrap();
    assert!(!was);
    drop(session);
    let e = cache.ensure(&b, &|_, _| {}).await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
    assert_eq!(cache.pinned(), vec![ModelId::from("a")]);
    assert!(vram.evict(&a.id));
    cache.ensure(&b, &|_, _| {}).await.unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn a_refused_new_version_leaves_no_tombstone_behind() {
    let srv = TestServer::start().await;
    let a1 = srv.publish("a", &[("w.bin", 50_000)]);
    let b = srv.publish("b", &[("w.bin", 100_000)]);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 150_000, None).await;
    cache.ensure(&a1, &|_, _| {}).await.unwrap();
    let _pin_b = cache.ensure(&b, &|_, _| {}).await.unwrap();
    let mut a2 = a1.clone();
    let bytes = content("a v2", 120_000);
    a2.files = vec![file_entry("w.bin", &bytes)];
    srv.put("a/w.bin", bytes);
    let e = cache.ensure(&a2, &|_, _| {}).await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
    // The old version was replaced (dropped), and its tombstone deleted.
    assert_eq!(listing(d.path()), vec![".corral-cache", "b"]);
    assert_eq!(cache.report().used_bytes, 100_000);
}
