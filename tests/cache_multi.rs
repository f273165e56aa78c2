//! Several bundles for one job (a checkpoint and small LoRA bundles), ensured together over a
//! real HTTP server on 127.0.0.1:0; and the bounded prefetch queue.

#[path = "cache_common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use corral::error::Error;
use corral::types::{CacheTier, ModelId, ModelKind, ModelManifest};
use corral::worker::cache::{DiskCache, MAX_QUEUED_PREFETCHES};
use corral::worker::fetch::RetryPolicy;

const CKPT: &[(&str, usize)] = &[("unet/model.onnx", 400_000), ("vae/model.onnx", 50_000)];

fn lora(srv: &TestServer, id: &str, bytes: usize) -> ModelManifest {
    let mut m = srv.publish(id, &[("lora.safetensors", bytes)]);
    m.kind = ModelKind::Lora;
    m
}

async fn open(dir: &std::path::Path, max: u64, pre: Option<std::path::PathBuf>) -> DiskCache {
    let retry = RetryPolicy {
        max_attempts: 3,
        base_backoff: Duration::from_millis(10),
        read_timeout: Duration::from_secs(30),
    };
    DiskCache::open_with(config(dir, max, pre), retry)
        .await
        .unwrap()
}

fn ids(v: &[ModelId]) -> Vec<&str> {
    v.iter().map(|m| m.as_str()).collect()
}

/// Fails the test if `f` takes longer than `secs` (a deadlock would hang it forever).
async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_and_three_loras_fit_a_tight_budget_together() {
    let srv = TestServer::start().await;
    let ckpt = srv.publish("ckpt", CKPT);
    let loras: Vec<_> = (1..=3)
        .map(|i| lora(&srv, &format!("lora{i}"), 20_000 + i * 5_000))
        .collect();
    let old: Vec<_> = ["old1", "old2"]
        .iter()
        .map(|id| srv.publish(id, &[("model.bin", 200_000)]))
        .collect();
    let set: Vec<ModelManifest> = std::iter::once(ckpt.clone())
        .chain(loras.iter().cloned())
        .collect();
    let need: u64 = set.iter().map(|m| m.total_bytes()).sum();
    let budget = need + 10_000; // the set, and no room for anything else
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), budget, None).await;
    // Yesterday's models fill the cache; unpinned, they must make way.
    for m in &old {
        cache.ensure(m, &|_, _| {}).await.unwrap();
    }
    let stop = StopOnDrop::new();
    let watcher = {
        let (stop, cache) = (stop.0.clone(), cache.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = cache.report();
                assert!(r.used_bytes + r.reserved_bytes <= budget, "{r:?}");
            }
        })
    };
    let last = AtomicU64::new(0);
    let got = within(
        30,
        "ensure_all",
        cache.ensure_all(&set, &|done, total| {
            assert!(done <= total, "{done} > {total}");
            assert_eq!(total, need);
            last.store(done, Ordering::Relaxed);
        }),
    )
    .await
    .unwrap();
    drop(stop);
    watcher.await.unwrap();
    assert_eq!(last.load(Ordering::Relaxed), need);
    assert_eq!(got.len(), 4);
    for ((g, tier), m) in got.iter().zip(&set) {
        assert_eq!(g.model_id(), &m.id, "results come in the order asked");
        assert_eq!(*tier, CacheTier::Download);
        assert_bundle(g.path(), m);
    }
    assert_eq!(ids(&cache.pinned()), ["ckpt", "lora1", "lora2", "lora3"]);
    let r = cache.report();
    assert_eq!((r.used_bytes, r.reserved_bytes), (need, 0));
    assert!(r.downloads.is_empty());
    assert_eq!(cache.stats().evictions, 2);
    // The report lists LoRA bundles like any other.
    let listed: Vec<_> = r.disk_models.iter().map(|m| m.model_id.as_str()).collect();
    assert_eq!(listed, ["ckpt", "lora1", "lora2", "lora3"]);
    drop(got);
    assert!(cache.pinned().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_sets_share_downloads_and_never_deadlock() {
    let srv = TestServer::start().await;
    let ckpt = srv.publish("ckpt", CKPT);
    let l: Vec<_> = (1..=3)
        .map(|i| lora(&srv, &format!("l{i}"), 30_000))
        .collect();
    let need = ckpt.total_bytes() + 3 * 30_000;
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), need, None).await;
    // Two jobs ask for overlapping sets in opposite orders, several times over.
    let a = vec![ckpt.clone(), l[0].clone(), l[1].clone()];
    let b = vec![l[2].clone(), l[1].clone(), ckpt.clone()];
    for _ in 0..5 {
        let (ra, rb) = within(30, "two overlapping ensure_all", async {
            tokio::join!(
                cache.ensure_all(&a, &|_, _| {}),
                cache.ensure_all(&b, &|_, _| {})
            )
        })
        .await;
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            ra[0].0.path(),
            rb[2].0.path(),
            "one ckpt bundle, pinned twice"
        );
    }
    for p in [
        "ckpt/unet/model.onnx",
        "l1/lora.safetensors",
        "l2/lora.safetensors",
    ] {
        assert_eq!(
            srv.requests_for(p).len(),
            1,
            "{p} downloaded more than once"
        );
    }
    assert!(cache.pinned().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_cannot_fit_fails_and_releases_what_it_took() {
    let srv = TestServer::start().await;
    let ckpt = srv.publish("ckpt", CKPT);
    let ckpt2 = srv.publish("ckpt2", CKPT);
    let l1 = lora(&srv, "l1", 30_000);
    let l2 = lora(&srv, "l2", 30_000);
    let budget = ckpt.total_bytes() + 100_000;
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), budget, None).await;

    // Larger than the whole budget: refused before any byte moves.
    let e = cache
        .ensure_all(&[ckpt.clone(), ckpt2.clone()], &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ResourceExhausted(m) if m.contains("ckpt2") && m.contains("budget")),
        "{e}"
    );
    assert_eq!(srv.request_count(), 0);

    // Job 1 holds its set; job 2's does not fit beside it.
    let job1 = cache
        .ensure_all(&[ckpt.clone(), l1.clone()], &|_, _| {})
        .await
        .unwrap();
    let e = within(
        30,
        "the refused set",
        cache.ensure_all(&[l2.clone(), ckpt2.clone()], &|_, _| {}),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
    // A download of the failed set still finishing hands its pin to nobody, then drops it.
    wait_for(
        "the failed set's pins to go",
        Duration::from_secs(10),
        || ids(&cache.pinned()) == ["ckpt", "l1"] && cache.report().downloads.is_empty(),
    )
    .await;
    let r = cache.report();
    assert_eq!(r.reserved_bytes, 0);
    assert!(r.used_bytes <= budget);
    assert_bundle(job1[0].0.path(), &ckpt);
    drop(job1);
    // Once job 1 is done, job 2's set fits.
    let job2 = cache
        .ensure_all(&[l2.clone(), ckpt2.clone()], &|_, _| {})
        .await
        .unwrap();
    assert_bundle(job2[1].0.path(), &ckpt2);

    // The same model twice with different files is a caller's bug.
    let mut other = l1.clone();
    other.files[0].size_bytes += 1;
    let e = cache
        .ensure_all(&[l1.clone(), other], &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                field: "models",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_lora_bundle_is_listed_and_served_without_budget() {
    let srv = TestServer::start().await;
    let ckpt = srv.publish("ckpt", CKPT);
    // The image bakes in a LoRA: one .safetensors file and its corral-manifest.json.
    let pre = tempfile::tempdir().unwrap();
    let dir = pre.path().join("style-lora");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = content("style-lora", 120_000);
    std::fs::write(dir.join("style.safetensors"), &bytes).unwrap();
    corral::manifest::write_manifest_file(&dir).unwrap();
    // The catalogue knows the same files under an http source and kind Lora.
    let l = ModelManifest {
        family: String::new(),
        format: String::new(),
        id: ModelId::from("style-lora"),
        kind: ModelKind::Lora,
        source: srv.url("style-lora"),
        files: vec![file_entry("style.safetensors", &bytes)],
    };
    let d = tempfile::tempdir().unwrap();
    // Room for the checkpoint only: the preloaded LoRA is not counted.
    let cache = open(d.path(), ckpt.total_bytes(), Some(pre.path().to_path_buf())).await;
    let r = cache.report();
    assert_eq!(r.disk_models.len(), 1);
    assert_eq!(r.disk_models[0].model_id.as_str(), "style-lora");
    assert!(r.disk_models[0].preloaded);
    assert_eq!(r.disk_models[0].bytes, 120_000);
    let got = cache
        .ensure_all(&[ckpt.clone(), l.clone()], &|_, _| {})
        .await
        .unwrap();
    assert_eq!(got[0].1, CacheTier::Download);
    assert_eq!(got[1].1, CacheTier::Preloaded);
    assert_eq!(got[1].0.path(), dir.as_path());
    assert!(got[1].0.is_preloaded());
    assert_bundle(got[1].0.path(), &l);
    assert!(srv.requests_for("style-lora/style.safetensors").is_empty());
    let listed: Vec<_> = cache
        .report()
        .disk_models
        .into_iter()
        .map(|m| (m.model_id.0, m.preloaded))
        .collect();
    assert_eq!(
        listed,
        [("ckpt".to_owned(), false), ("style-lora".to_owned(), true)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_queue_is_bounded() {
    let srv = TestServer::start().await;
    let n = MAX_QUEUED_PREFETCHES + 5;
    let ms: Vec<_> = (0..n)
        .map(|i| srv.publish(&format!("p{i}"), &[("f.bin", 1000)]))
        .collect();
    // The first prefetch hangs mid-body, so every later one stays queued behind it.
    srv.state
        .stall_after
        .lock()
        .unwrap()
        .insert("p0/f.bin".into(), 10);
    let d = tempfile::tempdir().unwrap();
    let cache = open(d.path(), 100_000_000, None).await;
    let handles: Vec<_> = ms.iter().map(|m| cache.prefetch(m.clone())).collect();
    let mut admitted = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if i < MAX_QUEUED_PREFETCHES {
            admitted.push(h);
            continue;
        }
        let e = within(5, "a refused prefetch", h)
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&e, Error::ResourceExhausted(m) if m.contains(&format!("p{i}"))),
            "{e}"
        );
    }
    // A model already queued is not queued twice.
    within(5, "a duplicate prefetch", cache.prefetch(ms[3].clone()))
        .await
        .unwrap()
        .unwrap();
    // A hostile manifest is refused before it is queued.
    let mut bad = ms[1].clone();
    bad.files[0].path = "../escape".into();
    let e = cache.prefetch(bad).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(admitted.iter().all(|h| !h.is_finished()));
    // Cancelled prefetches leave the queue: there is room again.
    for h in &admitted {
        h.abort();
    }
    for h in admitted {
        let _ = h.await;
    }
    let late = &ms[MAX_QUEUED_PREFETCHES];
    srv.state.stall_after.lock().unwrap().clear();
    within(
        30,
        "a prefetch after the queue drained",
        cache.prefetch(late.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(cache
        .report()
        .disk_models
        .iter()
        .any(|m| m.model_id == late.id));
}
