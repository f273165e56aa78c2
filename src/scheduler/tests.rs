use std::sync::Arc;

use super::*;
use crate::types::{CacheReport, DiskModel, JobSpec, RunningJob, WorkerHello};

const GB: u64 = 1_000_000_000;

fn spec(model: &str, priority: i32) -> Arc<JobSpec> {
    Arc::new(JobSpec {
        model_id: model.into(),
        prompt: "a cat".into(),
        negative_prompt: String::new(),
        width: 512,
        height: 512,
        steps: 20,
        guidance_scale: 7.5,
        seed: 1,
        num_images: 1,
        scheduler: String::new(),
        priority,
        ..JobSpec::for_model(model.into())
    })
}

fn hello(id: &str, slots: u32, disk: &[&str], vram: &[&str]) -> WorkerHello {
    WorkerHello {
        worker_id: id.into(),
        version: "test".into(),
        gpu_name: "test".into(),
        vram_bytes: 24 * GB,
        cache_max_bytes: 50 * GB,
        max_concurrent_jobs: slots,
        state: CacheReport {
            vram_models: vram.iter().map(|m| (*m).into()).collect(),
            disk_models: disk
                .iter()
                .map(|m| DiskModel {
                    model_id: (*m).into(),
                    bytes: 2 * GB,
                    preloaded: false,
                })
                .collect(),
            ..Default::default()
        },
    }
}

fn sched() -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig::default());
    for m in ["a", "b", "c"] {
        s.register_model(m.into(), 2 * GB);
    }
    s
}

fn assigned(effects: &[Effect]) -> Vec<(String, String, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Assign {
                worker,
                job,
                attempt,
                ..
            } => Some((worker.0.clone(), job.0.clone(), *attempt)),
            _ => None,
        })
        .collect()
}

#[test]
fn job_goes_to_worker_holding_its_model() {
    let mut s = sched();
    s.connect(hello("w1", 1, &["a"], &[]), 0);
    s.connect(hello("w2", 1, &["b"], &[]), 0);
    let e = s.submit("j1".into(), spec("b", 0), 10).unwrap();
    assert_eq!(assigned(&e), vec![("w2".into(), "j1".into(), 1)]);
    let e = s.submit("j2".into(), spec("a", 0), 10).unwrap();
    assert_eq!(assigned(&e), vec![("w1".into(), "j2".into(), 1)]);
}

#[test]
fn a_worker_that_says_hello_while_draining_gets_no_work() {
    let mut s = sched();
    let mut h = hello("w1", 1, &["a"], &["a"]);
    h.state.draining = true;
    s.connect(h, 0);
    let e = s.submit("j1".into(), spec("a", 0), 10).unwrap();
    assert!(assigned(&e).is_empty(), "{e:?}");
    // A worker that is not draining takes it (downloading the model).
    let mut e = s.connect(hello("w2", 1, &[], &[]), 20);
    e.extend(s.schedule(30));
    assert_eq!(assigned(&e), vec![("w2".into(), "j1".into(), 1)]);
}

#[test]
fn vram_beats_disk_beats_download() {
    let mut s = sched();
    s.connect(hello("disk", 1, &["a"], &[]), 0);
    s.connect(hello("vram", 1, &["a"], &["a"]), 0);
    s.connect(hello("cold", 1, &[], &[]), 0);
    let e = s.submit("j1".into(), spec("a", 0), 1).unwrap();
    assert_eq!(assigned(&e)[0].0, "vram");
    let e = s.submit("j2".into(), spec("a", 0), 1).unwrap();
    assert_eq!(assigned(&e)[0].0, "disk");
    // Both holders busy: the cold worker fetches only if that is sooner
    // than waiting. One queued job waits about one service time (5 s)
    // against a 2 GB download at 25 MB/s (80 s): it waits.
    let e = s.submit("j3".into(), spec("a", 0), 1).unwrap();
    assert!(assigned(&e).is_empty());
    assert_eq!(s.queued_len(), 1);
}

#[test]
fn cold_worker_takes_a_deep_backlog() {
    let mut s = sched();
    s.connect(hello("warm", 1, &["a"], &["a"]), 0);
    for i in 0..40 {
        s.submit(format!("j{i}").into(), spec("a", 0), 0).unwrap();
    }
    // 39 jobs queued behind one warm worker (about 195 s) against an 81.5 s
    // fetch and load: a new idle worker fetches.
    let e = s.connect(hello("cold", 1, &[], &[]), 0);
    assert_eq!(assigned(&e).len(), 1);
    assert_eq!(assigned(&e)[0].0, "cold");
}

#[test]
fn within_a_model_higher_priority_then_oldest() {
    let mut s = sched();
    s.submit("old".into(), spec("a", 0), 0).unwrap();
    s.submit("new".into(), spec("a", 0), 1).unwrap();
    s.submit("urgent".into(), spec("a", 5), 2).unwrap();
    let e = s.connect(hello("w", 3, &["a"], &[]), 3);
    let order: Vec<String> = assigned(&e).into_iter().map(|a| a.1).collect();
    assert_eq!(order, vec!["urgent", "old", "new"]);
}

#[test]
fn never_assigns_beyond_free_slots() {
    let mut s = sched();
    s.connect(hello("w", 2, &["a"], &["a"]), 0);
    let mut n = 0;
    for i in 0..5 {
        n += assigned(&s.submit(format!("j{i}").into(), spec("a", 0), 0).unwrap()).len();
    }
    assert_eq!(n, 2);
    assert_eq!(s.worker(&"w".into()).unwrap().free_slots(), 0);
    assert_eq!(s.queued_len(), 3);
}

#[test]
fn starving_job_goes_to_any_capable_worker() {
    let mut s = sched();
    s.connect(hello("busy", 1, &["a"], &["a"]), 0);
    s.submit("first".into(), spec("a", 0), 0).unwrap();
    s.submit("waits".into(), spec("a", 0), 0).unwrap();
    let e = s.connect(hello("cold", 1, &[], &[]), 0);
    assert!(assigned(&e).is_empty(), "too early to fetch: {e:?}");
    let later = s.config().starvation_ms + 1;
    let e = s.schedule(later);
    assert_eq!(assigned(&e), vec![("cold".into(), "waits".into(), 1)]);
}

#[test]
fn dead_worker_jobs_requeue_with_next_attempt_and_stale_results_are_refused() {
    let mut s = sched();
    s.connect(hello("w1", 1, &["a"], &[]), 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    let timeout = s.config().heartbeat_timeout_ms;
    s.connect(hello("w2", 1, &["a"], &[]), timeout);
    let e = s.expire_workers(timeout + 1);
    assert!(e.iter().any(|e| matches!(
        e,
        Effect::Requeued {
            next_attempt: 2,
            ..
        }
    )));
    assert_eq!(assigned(&e), vec![("w2".into(), "j".into(), 2)]);
    // The zombie's late result for attempt 1 is refused.
    assert!(s
        .complete(&"w1".into(), &"j".into(), 1, timeout + 2)
        .is_err());
    assert!(s
        .complete(&"w2".into(), &"j".into(), 2, timeout + 3)
        .is_ok());
    assert!(s.job(&"j".into()).is_none());
}

#[test]
fn job_fails_after_max_attempts() {
    let mut s = sched();
    s.connect(hello("w", 1, &["a"], &[]), 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    let mut last = Vec::new();
    for attempt in 1..=3 {
        // Each retry goes straight back to the only worker, one attempt up.
        last = s
            .fail(&"w".into(), &"j".into(), attempt, "oom", true, 1)
            .unwrap();
    }
    assert!(
        matches!(&last[0], Effect::Failed { reason, .. } if reason.contains("3 times") && reason.contains("oom")),
        "{last:?}"
    );
    assert!(s.job(&"j".into()).is_none());
}

#[test]
fn non_retryable_failure_ends_at_once() {
    let mut s = sched();
    s.connect(hello("w", 1, &["a"], &[]), 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    let e = s
        .fail(&"w".into(), &"j".into(), 1, "bad model", false, 1)
        .unwrap();
    assert!(matches!(&e[0], Effect::Failed { reason, .. } if reason == "bad model"));
}

#[test]
fn reconnecting_worker_keeps_jobs_not_yet_reassigned() {
    let mut s = sched();
    s.connect(hello("w", 1, &["a"], &[]), 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    let e = s.disconnect(&"w".into(), "stream closed", false, 5);
    assert!(e.iter().any(|e| matches!(e, Effect::Requeued { .. })));
    let mut h = hello("w", 1, &["a"], &[]);
    h.state.running_jobs = vec![RunningJob {
        job_id: "j".into(),
        attempt: 1,
    }];
    let e = s.connect(h, 6);
    assert!(e.is_empty(), "{e:?}");
    let j = s.job(&"j".into()).unwrap();
    assert_eq!(
        (j.worker.clone(), j.attempt, j.failures),
        (Some("w".into()), 1, 0)
    );
    assert!(s.complete(&"w".into(), &"j".into(), 1, 7).is_ok());
}

#[test]
fn reconnecting_worker_is_told_to_drop_reassigned_jobs() {
    let mut s = sched();
    s.connect(hello("w", 1, &["a"], &[]), 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    s.disconnect(&"w".into(), "stream closed", false, 5);
    s.connect(hello("other", 1, &["a"], &[]), 5);
    let mut h = hello("w", 1, &["a"], &[]);
    h.state.running_jobs = vec![RunningJob {
        job_id: "j".into(),
        attempt: 1,
    }];
    let e = s.connect(h, 6);
    assert!(matches!(&e[0], Effect::Cancel { attempt: 1, .. }), "{e:?}");
    assert_eq!(s.job(&"j".into()).unwrap().worker, Some("other".into()));
}

#[test]
fn cancel_queued_and_running() {
    let mut s = sched();
    s.connect(hello("w", 1, &["a"], &[]), 0);
    s.submit("run".into(), spec("a", 0), 0).unwrap();
    s.submit("queued".into(), spec("a", 0), 0).unwrap();
    let e = s.cancel(&"queued".into(), 1).unwrap();
    assert!(e.is_empty());
    assert_eq!(s.queued_len(), 0);
    let e = s.cancel(&"run".into(), 2).unwrap();
    assert!(matches!(&e[0], Effect::Cancel { attempt: 1, .. }));
    // The slot stays taken until the worker stops the attempt.
    assert_eq!(s.worker(&"w".into()).unwrap().free_slots(), 0);
    s.heartbeat(&"w".into(), CacheReport::default(), 3).unwrap();
    assert_eq!(s.worker(&"w".into()).unwrap().free_slots(), 1);
    assert!(s.cancel(&"run".into(), 4).is_err());
}

#[test]
fn model_too_big_for_every_cache_fails_fast() {
    let mut s = sched();
    s.register_model("huge".into(), 80 * GB);
    s.connect(hello("w", 1, &[], &[]), 0);
    let err = s.submit("j".into(), spec("huge", 0), 0).unwrap_err();
    assert!(matches!(err, crate::Error::FailedPrecondition(ref m) if m.contains("80000000000")));
}

#[test]
fn unknown_model_is_refused() {
    let mut s = sched();
    let err = s.submit("j".into(), spec("nope", 0), 0).unwrap_err();
    assert!(matches!(err, crate::Error::UnknownModel(_)));
}

#[test]
fn estimate_counts_download_for_cold_workers() {
    let mut s = sched();
    s.connect(hello("cold", 1, &[], &[]), 0);
    s.drain(&"cold".into()).unwrap();
    s.connect(hello("cold2", 0, &[], &[]), 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    let cost = &s.config().cost;
    let expect = cost.download_ms(2 * GB, 0) + cost.load_ms(2 * GB);
    assert_eq!(s.estimate_start_ms(&"j".into(), 0), Some(expect));
}

#[test]
fn same_operations_give_same_decisions() {
    let run = || {
        let mut s = sched();
        let mut out = Vec::new();
        for w in 0..6 {
            let m = ["a", "b", "c"][w % 3];
            out.extend(s.connect(hello(&format!("w{w}"), 1, &[m], &[]), 0));
        }
        for i in 0..30 {
            let m = ["a", "b", "c", "a"][i % 4];
            out.extend(
                s.submit(format!("j{i}").into(), spec(m, 0), i as u64)
                    .unwrap(),
            );
        }
        format!("{out:?}")
    };
    assert_eq!(run(), run());
}

fn prefetches(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Prefetch { worker, model } => Some((worker.0.clone(), model.0.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn estimate_counts_a_download_already_under_way_elsewhere() {
    let mut s = sched();
    // No free slot (so the job stays queued), fetching b at 100 MB/s.
    let mut h = hello("busy-dl", 0, &[], &[]);
    h.state.download_bps = 100_000_000;
    h.state.downloads = vec![crate::types::DownloadState {
        model_id: "b".into(),
        bytes_done: 0,
        bytes_total: 2 * GB,
    }];
    s.connect(h, 0);
    s.submit("j".into(), spec("a", 0), 0).unwrap();
    // One download at a time: b (2 GB) first, then a (2 GB), then the load.
    let cost = s.config().cost.clone();
    let want = cost.download_ms(4 * GB, 100_000_000) + cost.load_ms(2 * GB);
    assert_eq!(s.estimate_start_ms(&"j".into(), 0), Some(want));
}

#[test]
fn busy_warm_worker_beats_idle_cold_one_only_when_sooner() {
    let mut s = sched();
    s.connect(hello("warm", 1, &["a"], &["a"]), 0);
    s.submit("j0".into(), spec("a", 0), 0).unwrap();
    let mut cold = hello("cold", 1, &[], &[]);
    cold.state.download_bps = 10_000_000_000; // a 2 GB fetch takes 0.2 s
    s.connect(cold, 0);
    // The warm worker frees in about 5 s; the cold one starts in 0.2 s +
    // a 2.8 s load: it takes the job.
    let e = s.submit("j1".into(), spec("a", 0), 1).unwrap();
    let e = if assigned(&e).is_empty() {
        s.schedule(2)
    } else {
        e
    };
    assert_eq!(assigned(&e), vec![("cold".into(), "j1".into(), 1)]);
}

#[test]
fn replication_keeps_two_copies_of_a_model_in_demand() {
    let mut s = sched();
    for w in ["w1", "w2", "w3"] {
        let mut h = hello(w, 1, &[], &[]);
        h.state.free_disk_bytes = 40 * GB;
        s.connect(h, 0);
    }
    // Sustained demand for a: enough arrivals to pass the recent threshold.
    for i in 0..10u64 {
        s.submit(format!("j{i}").into(), spec("a", 0), i * 1000)
            .unwrap();
        let _ = s.cancel(&format!("j{i}").into(), i * 1000);
    }
    let t = s.replica_targets(10_000);
    let a = t.iter().find(|t| t.model.0 == "a").expect("a has a target");
    assert!(a.target >= 2, "{a:?}");
    let e = s.replicate(10_000);
    let p = prefetches(&e);
    assert_eq!(p.len(), 2, "{e:?}");
    assert!(p.iter().all(|(_, m)| m == "a"));
    // Pending prefetches count as copies: the next round adds none.
    let e = s.replicate(10_000 + s.config().replicate_interval_ms);
    assert!(prefetches(&e).is_empty(), "{e:?}");
}

#[test]
fn replication_prefers_workers_with_room_and_bandwidth() {
    let mut s = sched();
    let mut full = hello("full", 1, &[], &[]);
    full.state.free_disk_bytes = 0;
    full.state.download_bps = 900_000_000;
    let mut slow = hello("slow", 1, &[], &[]);
    slow.state.free_disk_bytes = 40 * GB;
    slow.state.download_bps = 10_000_000;
    let mut fast = hello("fast", 1, &[], &[]);
    fast.state.free_disk_bytes = 40 * GB;
    fast.state.download_bps = 500_000_000;
    for h in [full, slow, fast] {
        s.connect(h, 0);
    }
    for i in 0..10u64 {
        s.submit(format!("j{i}").into(), spec("b", 0), i * 1000)
            .unwrap();
        let _ = s.cancel(&format!("j{i}").into(), i * 1000);
    }
    let p = prefetches(&s.replicate(10_000));
    assert_eq!(p[0].0, "fast", "{p:?}");
    assert_eq!(p[1].0, "slow", "{p:?}");
}

/// On full disks a model one copy short of its target waits for free
/// room (evicting for it would leave another model short, and so on); a
/// model short of more than half its target evicts copies nobody needs.
#[test]
fn full_disks_evict_only_spare_copies_and_only_for_a_model_far_short() {
    let mut s = sched();
    // Three full workers: w1 holds a, w2 and w3 hold c, which has no
    // demand (spare).
    s.connect(hello("w1", 1, &["a"], &[]), 0);
    s.connect(hello("w2", 1, &["c"], &[]), 0);
    s.connect(hello("w3", 1, &["c"], &[]), 0);
    for i in 0..10u64 {
        s.submit(format!("j{i}").into(), spec("a", 0), i * 1000)
            .unwrap();
        let _ = s.cancel(&format!("j{i}").into(), i * 1000);
    }
    let a = s.replica_targets(10_000);
    let a = a.iter().find(|t| t.model.0 == "a").unwrap();
    assert_eq!((a.target, a.holders), (2, 1), "{a:?}");
    // One copy short: no eviction.
    assert!(prefetches(&s.replicate(10_000)).is_empty());
    // Lose the only copy: far short, so a worker whose c is spare gets one.
    let _ = s.disconnect(&"w1".into(), "gone", true, 11_000);
    let p = prefetches(&s.replicate(10_000 + 2 * s.config().replicate_interval_ms));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].1, "a");
}

#[test]
fn no_replicas_without_recent_demand() {
    let mut s = sched();
    s.connect(hello("w1", 1, &[], &[]), 0);
    assert!(s.replica_targets(0).is_empty());
    assert!(s.replicate(0).is_empty());
}

#[test]
fn image_plan_is_an_optimal_knapsack() {
    let c = |m: &str, gb: u64, d: f64| ImageCandidate {
        model: m.into(),
        bytes: gb * GB,
        demand: d,
    };
    // Greedy by demand takes "big" (0.5) and nothing else fits; the best
    // plan is the two smaller ones (0.3 + 0.3).
    let items = [c("big", 7, 0.5), c("s1", 5, 0.3), c("s2", 5, 0.3)];
    let plan = plan_image(&items, 10 * GB);
    let names: Vec<&str> = plan.chosen.iter().map(|c| c.model.as_str()).collect();
    assert_eq!(names, vec!["s1", "s2"]);
    assert!(plan.bytes <= 10 * GB);
    assert!((plan.hit_share - 0.6 / 1.1).abs() < 1e-9);
    assert!(plan.table().contains("| 1 | s1 |"));
}

#[test]
fn expiring_several_workers_never_assigns_to_one_of_them() {
    let mut s = sched();
    s.connect(hello("w1", 1, &["a"], &[]), 0);
    s.connect(hello("w2", 2, &["a"], &[]), 0);
    s.submit("j1".into(), spec("a", 0), 0).unwrap();
    s.submit("j2".into(), spec("a", 0), 0).unwrap();
    // w2 has a free slot when w1's job is requeued. Both go silent; a
    // third worker stays alive.
    let t = s.config().heartbeat_timeout_ms;
    s.connect(hello("w3", 2, &["a"], &[]), t);
    let e = s.expire_workers(t + 1);
    for (w, _, _) in assigned(&e) {
        assert_eq!(w, "w3", "{e:?}");
    }
    assert!(s.worker(&"w1".into()).is_none() && s.worker(&"w2".into()).is_none());
}

#[test]
fn expiry_names_the_silent_workers_and_spares_those_heard_from() {
    let mut s = sched();
    for w in ["w1", "w2", "w3"] {
        s.connect(hello(w, 1, &["a"], &[]), 0);
    }
    let t = s.config().heartbeat_timeout_ms;
    // Any message counts; a heartbeat too.
    s.touch(&"w2".into(), t);
    s.heartbeat(&"w3".into(), CacheReport::default(), t / 2)
        .unwrap();
    let (dead, _) = s.expire_workers_listed(t + 1);
    assert_eq!(dead, vec![WorkerId::from("w1")]);
    let (dead, _) = s.expire_workers_listed(t / 2 + t + 1);
    assert_eq!(dead, vec![WorkerId::from("w3")]);
    assert!(s.worker(&"w2".into()).is_some());
    assert_eq!(s.workers().count(), 1);
}
