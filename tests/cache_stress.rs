//! Many concurrent ensures over a tight budget on a multi-threaded runtime, with a watcher
//! that walks the cache directory the whole time: the bytes on disk never exceed the budget.

#[path = "cache_common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use corral::error::Error;
use corral::worker::cache::{DiskCache, BUNDLE_MARKER};

/// Bytes of bundle files under `dir` (markers excluded: they are not part of any manifest).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if e.file_name() != BUNDLE_MARKER && e.file_name() != ".corral-cache" {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ensures_never_exceed_the_budget() {
    let src = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let ms: Vec<_> = (0..8)
        .map(|i| {
            local_bundle(
                src.path(),
                &format!("m{i}"),
                &[("a.bin", 40_000 + i * 1000), ("b/c.bin", 30_000)],
            )
        })
        .collect();
    let budget = 260_000; // room for three or so
    let cache = DiskCache::open(config(d.path(), budget, None))
        .await
        .unwrap();
    let stop = StopOnDrop::new();
    let max_seen = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, max_seen, dir) = (stop.0.clone(), max_seen.clone(), d.path().to_path_buf());
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = cache.report();
                assert!(r.used_bytes + r.reserved_bytes <= budget, "{r:?}");
                max_seen.fetch_max(disk_bytes(&dir), Ordering::Relaxed);
            }
        })
    };
    let tasks: Vec<_> = (0..48)
        .map(|k| {
            let cache = cache.clone();
            let m = ms[(k * 5 + k / 7) % ms.len()].clone();
            tokio::spawn(async move {
                match cache.ensure(&m, &|_, _| {}).await {
                    Ok((g, _)) => {
                        assert_bundle(g.path(), &m);
                        tokio::task::yield_now().await;
                        true
                    }
                    // Pins of the other tasks may leave no room: refused, never overcommitted.
                    Err(Error::ResourceExhausted(_)) => false,
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap() as usize;
    }
    drop(stop);
    watcher.await.unwrap();
    assert!(ok > 0);
    assert!(
        max_seen.load(Ordering::Relaxed) <= budget,
        "disk held {} bytes",
        max_seen.load(Ordering::Relaxed)
    );
    let r = cache.report();
    assert_eq!(r.reserved_bytes, 0);
    assert!(cache.pinned().is_empty());
    let mut want = vec![".corral-cache".to_string()];
    want.extend(r.disk_models.iter().map(|m| m.model_id.to_string()));
    want.sort();
    assert_eq!(listing(d.path()), want);
    let s = cache.stats();
    assert_eq!(s.hits_disk + s.misses, 48);
    eprintln!(
        "{ok} of 48 served; {s:?}; most bytes seen on disk {}",
        max_seen.load(Ordering::Relaxed)
    );
}

/// A guard dropped is a pin gone, at once: the next caller must never find the bundle still
/// pinned by the download that fetched it. (The download task used to hand its guard over
/// in a channel that kept it alive until the task had finished too: under CPU contention, one
/// `ensure` in twenty returned while that pin lingered for milliseconds, and a budget that
/// fits exactly then refused room. The race needs preemption, so two threads burn CPU.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_guard_leaves_no_pin_behind() {
    let stop = StopOnDrop::new();
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.0.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            })
        })
        .collect();
    let srv = TestServer::start().await;
    let d = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(config(d.path(), 100_000_000, None))
        .await
        .unwrap();
    for i in 0..100 {
        let m = srv.publish(&format!("m{i}"), &[("model.bin", 2000)]);
        let (g, _) = cache.ensure(&m, &|_, _| {}).await.unwrap();
        drop(g);
        assert_eq!(cache.pinned(), [], "download {i}");
    }
    drop(stop);
    for b in burners {
        b.join().unwrap();
    }
}
