//! Tests of the surge response (`surge.rs`): detection from the arrival
//! rate, placement on the soonest workers with room, release with
//! hysteresis.

use std::sync::Arc;

use super::*;
use crate::types::{CacheReport, DiskModel, DownloadState, JobSpec, WorkerHello};

const GB: u64 = 1_000_000_000;
const S: u64 = 1000;

/// A worker that takes no jobs (so the jobs stay queued and only
/// prefetches place copies), with the given bandwidth, free disk and
/// models on disk (2 GB each).
fn worker(id: &str, bps: u64, free_gb: u64, disk: &[&str]) -> WorkerHello {
    WorkerHello {
        worker_id: id.into(),
        version: "test".into(),
        gpu_name: "test".into(),
        vram_bytes: 24 * GB,
        cache_max_bytes: 50 * GB,
        max_concurrent_jobs: 0,
        state: CacheReport {
            disk_models: disk
                .iter()
                .map(|m| DiskModel {
                    model_id: (*m).into(),
                    bytes: 2 * GB,
                    preloaded: false,
                })
                .collect(),
            free_disk_bytes: free_gb * GB,
            download_bps: bps,
            ..Default::default()
        },
    }
}

fn sched(cfg: SchedulerConfig) -> Scheduler {
    let mut s = Scheduler::new(cfg);
    for m in ["a", "h", "c", "x"] {
        s.register_model(m.into(), 2 * GB);
    }
    s
}

/// Submits one job for `model` every `every_ms` in `[from, to)`, calling
/// `replicate` every second as the coordinator's tick does; returns the
/// prefetches issued, with the time of each.
fn arrivals(
    s: &mut Scheduler,
    model: &str,
    from: u64,
    to: u64,
    every_ms: u64,
) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let mut next_job = from;
    let mut t = from;
    while t < to {
        while next_job <= t {
            let id = format!("{model}-{next_job}");
            s.submit(
                id.into(),
                Arc::new(JobSpec::for_model(model.into())),
                next_job,
            )
            .unwrap();
            next_job += every_ms;
        }
        out.extend(
            prefetched(&s.replicate(t))
                .into_iter()
                .map(|(w, m)| (t, w, m)),
        );
        t += S;
    }
    out
}

fn prefetched(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Prefetch { worker, model } => Some((worker.0.clone(), model.0.clone())),
            _ => None,
        })
        .collect()
}

fn surging(s: &Scheduler) -> Vec<String> {
    s.surges().into_iter().map(|v| v.model.0).collect()
}

#[test]
fn a_jump_in_arrivals_is_a_surge_within_seconds_and_all_copies_start_at_once() {
    let mut s = sched(SchedulerConfig::default());
    for i in 0..20 {
        s.connect(worker(&format!("w{i:02}"), 25_000_000, 40, &[]), 0);
    }
    // Quiet: one job a minute for 20 minutes.
    arrivals(&mut s, "a", 0, 1200 * S, 60 * S);
    assert!(surging(&s).is_empty());
    // Then 4 jobs a second (20 s of work each second at 5 s a job).
    let fx = arrivals(&mut s, "a", 1200 * S, 1210 * S, 250);
    assert_eq!(surging(&s), vec!["a".to_string()]);
    let first = fx.first().expect("copies were started").0;
    assert!(
        first <= 1203 * S,
        "detected {} s after the jump",
        (first - 1200 * S) / S
    );
    // Copies go out in one check: more than one at the first.
    let at_first = fx.iter().filter(|(t, ..)| *t == first).count();
    assert!(at_first >= 3, "{fx:?}");
    // The target is the load (20 workers busy) with headroom, capped at
    // half the fleet: 10 copies, all placed, each on a different worker.
    let v = &s.surges()[0];
    assert_eq!(v.target, 10, "{v:?}");
    assert_eq!(v.holders, 10, "{v:?}");
    let mut ws: Vec<&String> = fx.iter().map(|(_, w, _)| w).collect();
    ws.sort();
    ws.dedup();
    assert_eq!(ws.len(), fx.len());
}

#[test]
fn steady_demand_is_not_a_surge() {
    let mut s = sched(SchedulerConfig::default());
    for i in 0..4 {
        s.connect(worker(&format!("w{i}"), 25_000_000, 40, &[]), 0);
    }
    // One job every 2 s (2.5 workers busy) for 40 minutes; the tick runs
    // from minute 30, once the slow rate has learnt the level.
    for i in 0..1200u64 {
        let t = i * 2 * S;
        let id = format!("j{i}");
        s.submit(id.into(), Arc::new(JobSpec::for_model("a".into())), t)
            .unwrap();
        if t >= 1800 * S {
            s.replicate(t);
            assert!(surging(&s).is_empty(), "at {} s", t / S);
        }
    }
}

#[test]
fn copies_go_to_the_soonest_workers_that_have_room_without_evicting_hot_models() {
    let cfg = SchedulerConfig {
        // Only the surge places copies here, and at most 3 (0.6 x 5 live
        // workers).
        min_warm_replicas: 0,
        replica_headroom: 0.0,
        surge_max_share: 0.6,
        ..SchedulerConfig::default()
    };
    let mut s = sched(cfg);
    // The fastest, but its full disk holds the only copy of `h`, in demand.
    s.connect(worker("full-hot", 400_000_000, 0, &["h"]), 0);
    // Nearly as fast, full of `c`, which nobody asks for: room by eviction.
    s.connect(worker("full-cold", 200_000_000, 0, &["c"]), 0);
    s.connect(worker("fast", 100_000_000, 40, &[]), 0);
    // Fast, but 8 GB of another download to finish first (100 s).
    let mut busy = worker("busy-dl", 100_000_000, 40, &[]);
    busy.state.downloads = vec![DownloadState {
        model_id: "x".into(),
        bytes_done: 0,
        bytes_total: 8 * GB,
    }];
    s.connect(busy, 0);
    s.connect(worker("slow", 5_000_000, 40, &[]), 0);
    // `h` is in demand: a job every 5 minutes for an hour.
    arrivals(&mut s, "h", 0, 3600 * S, 300 * S);
    let fx = arrivals(&mut s, "a", 3600 * S, 3610 * S, 100);
    let order: Vec<&str> = fx.iter().map(|(_, w, _)| w.as_str()).collect();
    // Ready in 10 s, 20 s, 100 s; `slow` would take 400 s.
    assert_eq!(order, vec!["full-cold", "fast", "busy-dl"], "{fx:?}");
    assert!(fx.iter().all(|(_, _, m)| m == "a"));
    assert_eq!(fx[0].0, fx[2].0, "all three in one check: {fx:?}");
}

#[test]
fn a_surge_is_released_only_after_its_rate_stays_low() {
    let cfg = SchedulerConfig::default();
    let release_ms = cfg.surge_release_ms;
    let mut s = sched(cfg);
    for i in 0..40 {
        s.connect(worker(&format!("w{i:02}"), 25_000_000, 40, &[]), 0);
    }
    arrivals(&mut s, "a", 0, 60 * S, 200);
    assert_eq!(surging(&s), vec!["a".to_string()]);
    // The rate falls to 60% of its peak (above the 50% release level):
    // still a surge, and its target does not shrink.
    let target = s.surges()[0].target;
    arrivals(&mut s, "a", 60 * S, 600 * S, 333);
    assert_eq!(surging(&s), vec!["a".to_string()]);
    let peak_target = s.surges()[0].target;
    assert!(peak_target >= target);
    // Arrivals stop: the surge lasts until the rate has been low for
    // `surge_release_ms`, then ends.
    let mut t = 600 * S;
    while t < 600 * S + release_ms / 2 {
        s.replicate(t);
        t += S;
    }
    assert_eq!(surging(&s), vec!["a".to_string()]);
    while t < 600 * S + release_ms + 60 * S {
        s.replicate(t);
        t += S;
    }
    assert!(surging(&s).is_empty());
    // Released: the replica target is the ordinary one again (load x
    // headroom on the decaying rate), below the surge's, so the copies
    // beyond it are spare for the workers' LRUs.
    let a = s.replica_targets(t);
    let a = a.iter().find(|r| r.model.0 == "a").unwrap();
    assert!(
        a.target < peak_target,
        "{a:?} vs surge target {peak_target}"
    );
}

#[test]
fn surge_response_off_when_ratio_is_zero() {
    let mut s = sched(SchedulerConfig {
        surge_ratio: 0.0,
        ..SchedulerConfig::default()
    });
    for i in 0..20 {
        s.connect(worker(&format!("w{i:02}"), 25_000_000, 40, &[]), 0);
    }
    arrivals(&mut s, "a", 0, 10 * S, 250);
    assert!(surging(&s).is_empty());
}

#[test]
fn a_mass_departure_does_not_multiply_replica_targets() {
    let mut s = sched(SchedulerConfig::default());
    for i in 0..40 {
        s.connect(worker(&format!("w{i:02}"), 25_000_000, 40, &[]), 0);
    }
    // One job a second for 10 minutes: about 5 workers busy.
    for i in 0..600u64 {
        let id = format!("j{i}");
        s.submit(
            id.clone().into(),
            Arc::new(JobSpec::for_model("a".into())),
            i * S,
        )
        .unwrap();
        let _ = s.cancel(&id.into(), i * S);
    }
    let target = |s: &Scheduler, t: u64| {
        s.replica_targets(t)
            .into_iter()
            .find(|r| r.model.0 == "a")
            .unwrap()
            .target
    };
    let before = target(&s, 600 * S);
    // Half the fleet leaves without notice in one second (a scale-in).
    for i in 0..20 {
        s.disconnect(&format!("w{i:02}").into(), "gone", false, 600 * S);
    }
    let after = target(&s, 601 * S);
    assert!(before >= 5, "{before}");
    // The churn term refills copies for a sustained loss rate; one event
    // is not read as 20 losses a minute for every model.
    assert!(after * 2 <= before * 3, "{before} -> {after}");
}
