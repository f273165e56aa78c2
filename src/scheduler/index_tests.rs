//! The indexes against brute force: after any sequence of operations,
//! every index holds exactly what its workers' and jobs' state says, and
//! every index query answers what a scan of the whole fleet answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::ids::{Mix, Wix};
use super::index::Readiness;
use super::{Scheduler, SchedulerConfig};
use crate::types::{
    CacheReport, DiskModel, DownloadState, JobId, JobSpec, Millis, ModelId, RunningJob,
    WorkerHello, WorkerId,
};

const MODELS: u8 = 5;

fn mid(i: u8) -> ModelId {
    ModelId(format!("m{i}"))
}
fn wid(i: u8) -> WorkerId {
    WorkerId(format!("w{i}"))
}
fn jid(i: u16) -> JobId {
    JobId(format!("j{i}"))
}

/// A worker's report: models in VRAM (the first of `disk`), on disk, and
/// downloads in progress.
fn report(
    disk: &[u8],
    downloads: &[(u8, u8)],
    bps: u64,
    running: &[(u16, u32)],
    draining: bool,
) -> CacheReport {
    CacheReport {
        vram_models: disk.iter().take(1).map(|&m| mid(m)).collect(),
        disk_models: disk
            .iter()
            .map(|&m| DiskModel {
                model_id: mid(m),
                bytes: 1_000_000_000,
                preloaded: m % 2 == 0,
            })
            .collect(),
        downloads: downloads
            .iter()
            .map(|&(m, tenths)| DownloadState {
                model_id: mid(m),
                bytes_done: u64::from(tenths) * 200_000_000,
                bytes_total: 2_000_000_000,
            })
            .collect(),
        download_bps: bps,
        free_disk_bytes: 10_000_000_000,
        running_jobs: running
            .iter()
            .map(|&(j, attempt)| RunningJob {
                job_id: jid(j),
                attempt,
            })
            .collect(),
        draining,
    }
}

#[derive(Clone, Debug)]
enum Op {
    Submit {
        model: u8,
        priority: i8,
    },
    Connect {
        worker: u8,
        slots: u8,
        cache_gb: u8,
        disk: Vec<u8>,
        downloads: Vec<(u8, u8)>,
        bps: u64,
    },
    Heartbeat {
        worker: u8,
        disk: Vec<u8>,
        downloads: Vec<(u8, u8)>,
        bps: u64,
        draining: bool,
    },
    Complete {
        worker: u8,
        pick: u16,
    },
    Fail {
        worker: u8,
        pick: u16,
        retryable: bool,
    },
    Cancel {
        pick: u16,
    },
    Disconnect {
        worker: u8,
        graceful: bool,
    },
    Touch {
        worker: u8,
    },
    Drain {
        worker: u8,
    },
    Advance {
        ms: u32,
    },
    Register {
        model: u8,
        gb: u8,
    },
    Remove {
        model: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let models = || prop::collection::vec(0..MODELS, 0..3);
    let downloads = || prop::collection::vec((0..MODELS, 0u8..10), 0..2);
    let bps = prop_oneof![Just(0u64), Just(25_000_000u64), Just(100_000_000u64)];
    prop_oneof![
        8 => (0..MODELS, -2i8..3).prop_map(|(model, priority)| Op::Submit { model, priority }),
        4 => (0u8..6, prop_oneof![1 => Just(0u8), 6 => 1u8..3], 1u8..8, models(), downloads(), bps.clone()).prop_map(
            |(worker, slots, cache_gb, disk, downloads, bps)| Op::Connect { worker, slots, cache_gb, disk, downloads, bps }),
        3 => (0u8..6, models(), downloads(), bps, prop::bool::weighted(0.1)).prop_map(
            |(worker, disk, downloads, bps, draining)| Op::Heartbeat { worker, disk, downloads, bps, draining }),
        4 => (0u8..6, any::<u16>()).prop_map(|(worker, pick)| Op::Complete { worker, pick }),
        2 => (0u8..6, any::<u16>(), any::<bool>()).prop_map(|(worker, pick, retryable)| Op::Fail { worker, pick, retryable }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        1 => (0u8..6, any::<bool>()).prop_map(|(worker, graceful)| Op::Disconnect { worker, graceful }),
        2 => (0u8..6).prop_map(|worker| Op::Touch { worker }),
        1 => (0u8..6).prop_map(|worker| Op::Drain { worker }),
        3 => prop_oneof![0u32..3_000, 0u32..40_000].prop_map(|ms| Op::Advance { ms }),
        1 => (0..MODELS, 1u8..4).prop_map(|(model, gb)| Op::Register { model, gb }),
        1 => (0..MODELS).prop_map(|model| Op::Remove { model }),
    ]
}

/// A running attempt of `worker`, chosen by `pick`.
fn running_on(s: &Scheduler, worker: &WorkerId, pick: u16) -> Option<(JobId, u32)> {
    let w = s.worker(worker)?;
    let n = w.running.len();
    (n > 0).then(|| {
        let (j, a) = w
            .running
            .iter()
            .nth(usize::from(pick) % n)
            .expect("in range");
        (j.clone(), *a)
    })
}

fn apply(s: &mut Scheduler, op: Op, now: &mut Millis, next_job: &mut u16) {
    let t = *now;
    match op {
        Op::Submit { model, priority } => {
            let mut spec = JobSpec::for_model(mid(model));
            spec.priority = i32::from(priority);
            let _ = s.submit(jid(*next_job), Arc::new(spec), t);
            *next_job += 1;
        }
        Op::Connect {
            worker,
            slots,
            cache_gb,
            disk,
            downloads,
            bps,
        } => {
            // A reconnecting worker reports what it still runs.
            let running: Vec<(u16, u32)> = s
                .worker(&wid(worker))
                .map(|w| {
                    w.running
                        .iter()
                        .map(|(j, a)| (j.0[1..].parse().expect("job id"), *a))
                        .take(usize::from(slots))
                        .collect()
                })
                .unwrap_or_default();
            s.connect(
                WorkerHello {
                    worker_id: wid(worker),
                    version: "t".into(),
                    gpu_name: "g".into(),
                    vram_bytes: 1 << 34,
                    cache_max_bytes: u64::from(cache_gb) * 1_000_000_000,
                    max_concurrent_jobs: u32::from(slots),
                    state: report(&disk, &downloads, bps, &running, false),
                },
                t,
            );
        }
        Op::Heartbeat {
            worker,
            disk,
            downloads,
            bps,
            draining,
        } => {
            // Cancelled attempts end when the worker stops reporting them.
            let running: Vec<(u16, u32)> = s
                .worker(&wid(worker))
                .map(|w| {
                    w.running
                        .iter()
                        .map(|(j, a)| (j.0[1..].parse().expect("job id"), *a))
                        .collect()
                })
                .unwrap_or_default();
            let _ = s.heartbeat(
                &wid(worker),
                report(&disk, &downloads, bps, &running, draining),
                t,
            );
        }
        Op::Complete { worker, pick } => {
            if let Some((j, a)) = running_on(s, &wid(worker), pick) {
                s.complete(&wid(worker), &j, a, t).expect("current attempt");
            }
        }
        Op::Fail {
            worker,
            pick,
            retryable,
        } => {
            if let Some((j, a)) = running_on(s, &wid(worker), pick) {
                s.fail(&wid(worker), &j, a, "boom", retryable, t)
                    .expect("current attempt");
            }
        }
        Op::Cancel { pick } => {
            let _ = s.cancel(&jid(pick % (*next_job).max(1)), t);
        }
        Op::Disconnect { worker, graceful } => {
            s.disconnect(&wid(worker), "gone", graceful, t);
        }
        Op::Touch { worker } => s.touch(&wid(worker), t),
        Op::Drain { worker } => {
            let _ = s.drain(&wid(worker));
        }
        Op::Advance { ms } => {
            *now += Millis::from(ms);
            let timeout = s.config().heartbeat_timeout_ms;
            let late: BTreeSet<WorkerId> = s
                .workers()
                .filter(|w| *now - w.last_seen_ms > timeout)
                .map(|w| w.hello.worker_id.clone())
                .collect();
            let (dead, _) = s.expire_workers_listed(*now);
            assert_eq!(
                dead.into_iter().collect::<BTreeSet<_>>(),
                late,
                "expired at {now}"
            );
            s.schedule(*now);
        }
        Op::Register { model, gb } => s.register_model(mid(model), u64::from(gb) * 1_000_000_000),
        Op::Remove { model } => {
            let _ = s.remove_model(&mid(model));
        }
    }
}

fn brute_healthy(s: &Scheduler, except: Wix, model: Mix, now: Millis) -> bool {
    s.workers
        .iter()
        .filter(|(w, e)| *w != except && !e.draining && e.held().contains(&model))
        .any(|(_, e)| {
            e.free_slots() > 0
                || e.downloading.contains_key(&model)
                || e.running.keys().any(|job| {
                    let j = s.job(job).expect("running job");
                    let elapsed = now.saturating_sub(j.started_ms.unwrap_or(now));
                    elapsed <= 2 * j.expected_ms + 10_000
                })
        })
}

/// Every index equals a recomputation from the entries, and every query
/// equals a scan.
fn check(s: &Scheduler, now: Millis) -> Result<(), TestCaseError> {
    // Snapshots are current.
    for (w, e) in s.workers.iter() {
        prop_assert_eq!(
            &s.compute_placed(w),
            &e.placed,
            "stale snapshot of {}",
            e.hello.worker_id
        );
        let busy = e.placed.class == Readiness::Busy;
        prop_assert_eq!(
            busy,
            !e.draining && e.free_slots() == 0 && !e.running.is_empty()
        );
    }
    // The placement index holds exactly the snapshots' entries: taking
    // every worker out (which asserts each entry was there) leaves it empty.
    let mut bare = s.clone();
    let all: Vec<Wix> = bare.workers.iter().map(|(w, _)| w).collect();
    for &w in &all {
        bare.unplace(w);
        bare.file_holdings(w, false);
    }
    let sets = &bare.sets;
    prop_assert!(sets.free.is_empty() && sets.free_bps.is_empty() && sets.fetch_free.is_empty());
    prop_assert!(sets.fetch_idle.is_empty() && sets.busy.is_empty() && sets.sickening.is_empty());
    for m in &bare.models {
        let h = &m.place;
        for c in [&h.vram, &h.disk] {
            prop_assert!(c.free.is_empty() && c.idle.is_empty() && c.busy.is_empty());
        }
        prop_assert!(h.fetch_free.is_empty() && h.fetch_idle.is_empty() && h.fetch_busy.is_empty());
        prop_assert_eq!((h.live, h.downloading, h.healthy), (0, 0, 0));
        prop_assert!(m.holders.is_empty());
        prop_assert_eq!((m.in_vram, m.on_disk, m.tiered, m.fetching), (0, 0, 0, 0));
    }
    // Queues, heads, ages and running counts.
    let mut running: BTreeMap<Mix, u32> = BTreeMap::new();
    let mut queued = 0;
    for (jix, j) in s.jobs.iter() {
        prop_assert_eq!(s.job_ids.get(&j.id), Some(&jix));
        match j.on {
            Some(w) => {
                *running.entry(j.model).or_default() += 1;
                prop_assert_eq!(s.workers[w].running.get(&j.id), Some(&j.attempt));
            }
            None => {
                queued += 1;
                prop_assert!(s.models[j.model as usize].queue.contains(&(j.key(), jix)));
                prop_assert!(s.by_age.contains(&(j.seq, jix)));
            }
        }
    }
    prop_assert_eq!(s.by_age.len(), queued);
    let heads: BTreeSet<(u64, Mix)> = (0..s.models.len() as Mix)
        .filter_map(|m| s.models[m as usize].queue.first().map(|e| (e.0 .1, m)))
        .collect();
    prop_assert_eq!(&heads, &s.heads);
    for (m, slot) in s.models.iter().enumerate() {
        prop_assert_eq!(slot.running, running.get(&(m as Mix)).copied().unwrap_or(0));
        let head = slot
            .queue
            .first()
            .map(|&(_, j)| (j, s.jobs[j].seq, s.jobs[j].submitted_ms));
        prop_assert_eq!(slot.head.map(|h| (h.job, h.seq, h.submitted_ms)), head);
    }
    // Expiry and cache sizes.
    let deadlines: BTreeSet<(Millis, Wix)> =
        s.workers.iter().map(|(w, e)| (e.deadline_key, w)).collect();
    prop_assert_eq!(&deadlines, &s.deadlines);
    let mut sizes: BTreeMap<u64, u32> = BTreeMap::new();
    for (_, e) in s.workers.iter() {
        *sizes.entry(e.hello.cache_max_bytes).or_default() += 1;
        prop_assert!(e.deadline_key <= e.last_seen_ms);
    }
    prop_assert_eq!(&sizes, &s.cache_sizes);
    // Queries, at the index's time and later (the read-only estimate's
    // case), for every worker left out and none.
    for later in [now, now + 1_000, now + 30_000] {
        for m in 0..s.models.len() as Mix {
            let excepts = std::iter::once(None).chain(s.workers.iter().map(|(w, _)| Some(w)));
            for except in excepts {
                // The k-th soonest start, k past the number of holders too.
                let mut starts: Vec<Millis> = s
                    .workers
                    .iter()
                    .filter(|(w, e)| Some(*w) != except && !e.draining && e.held().contains(&m))
                    .map(|(_, e)| s.start_here_ms(e, m, later))
                    .collect();
                starts.sort_unstable();
                for k in 1..=starts.len() + 1 {
                    prop_assert_eq!(
                        s.kth_holder_ms(m, except, k, later),
                        starts.get(k - 1).copied().unwrap_or(Millis::MAX),
                        "holder {} of m{} except {:?} at {}",
                        k,
                        m,
                        except,
                        later
                    );
                }
                if let (Some(w), true) = (except, later == now) {
                    prop_assert_eq!(s.healthy_holder(w, m), brute_healthy(s, w, m, now));
                }
            }
            // Fewer workers than the lookahead: the fetcher is exact.
            for free_only in [true, false] {
                let brute = s
                    .workers
                    .iter()
                    .filter(|(_, e)| !e.draining && (!free_only || e.free_slots() > 0))
                    .filter(|(_, e)| e.tier(m).is_none() && s.can_run(e, m))
                    .map(|(w, e)| (s.start_here_ms(e, m, later), w))
                    .min();
                let got = s.best_fetcher(m, free_only, later);
                prop_assert_eq!(got.map(|g| g.0), brute.map(|b| b.0), "fetcher for m{}", m);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn indexes_match_a_brute_force_recomputation(ops in prop::collection::vec(op(), 1..80)) {
        let mut s = Scheduler::new(SchedulerConfig {
            heartbeat_timeout_ms: 30_000,
            starvation_ms: 20_000,
            ..SchedulerConfig::default()
        });
        for m in 0..MODELS - 1 {
            s.register_model(mid(m), 1_000_000_000 + u64::from(m) * 500_000_000);
        }
        let mut now: Millis = 1_000;
        let mut next_job = 0;
        for op in ops {
            apply(&mut s, op, &mut now, &mut next_job);
            check(&s, s.sets.clock.max(now))?;
        }
    }
}

/// A placement the old holder scan (the first 32 holders by name) got
/// wrong: the holder about to free a slot with the model in VRAM is last by
/// name, behind 40 busy disk holders, and a new disk holder would start the
/// job later than it. The job waits for it.
#[test]
fn every_holder_counts_however_many() {
    let gb2 = 2_000_000_000;
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.register_model(mid(0), gb2);
    let hello = |name: String, vram: bool| WorkerHello {
        worker_id: name.into(),
        version: "t".into(),
        gpu_name: "g".into(),
        vram_bytes: 1 << 34,
        cache_max_bytes: 50_000_000_000,
        max_concurrent_jobs: 1,
        state: CacheReport {
            vram_models: if vram { vec![mid(0)] } else { vec![] },
            disk_models: vec![DiskModel {
                model_id: mid(0),
                bytes: gb2,
                preloaded: false,
            }],
            ..Default::default()
        },
    };
    for i in 0..40 {
        s.connect(hello(format!("w{i:02}"), false), 0);
    }
    s.connect(hello("w99".into(), true), 0);
    let spec = || Arc::new(JobSpec::for_model(mid(0)));
    let mut busy = 0;
    for i in 0..41 {
        busy += s.submit(jid(i), spec(), 0).unwrap().len();
    }
    assert_eq!(busy, 41);
    // Disk holders end at a load (2.83 s) + 5 s; w99 (VRAM) at 5 s.
    assert_eq!(s.job(&jid(0)).unwrap().worker, Some(wid(99)));
    s.submit(jid(100), spec(), 4_000).unwrap();
    // A new disk holder would start in 2.83 s; w99 frees in 1 s.
    let e = s.connect(hello("w50".into(), false), 4_000);
    assert!(e.is_empty(), "{e:?}");
    let e = s.complete(&wid(99), &jid(0), 1, 5_000).unwrap();
    assert!(
        matches!(&e[..], [crate::scheduler::Effect::Assign { worker, job, .. }] if *worker == wid(99) && *job == jid(100)),
        "{e:?}"
    );
}
