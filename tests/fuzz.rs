//! Hostile input, by property: arbitrary protobuf messages through the
//! conversions (no panic; errors are InvalidArgument naming a field;
//! accepted model paths stay inside the bundle), and arbitrary sequences of
//! scheduler operations through its public API (no panic; a worker never
//! runs more than its slots; every job is in exactly one place).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use corral::error::Error;
use corral::pb;
use corral::scheduler::{Effect, Scheduler, SchedulerConfig};
use corral::types::*;
use proptest::prelude::*;

/// Strings a hostile peer would send: ids, paths, traversal, controls,
/// long and non-ASCII text.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,12}",
        "[a-z0-9./]{0,16}",
        Just(String::new()),
        Just("..".to_owned()),
        Just("../../etc/passwd".to_owned()),
        Just("/etc/passwd".to_owned()),
        Just("a//b".to_owned()),
        Just("a/./b".to_owned()),
        Just("a\\b".to_owned()),
        Just("a\0b".to_owned()),
        Just("x".repeat(5000)),
        "\\PC{0,40}",
        any::<String>(),
    ]
}

fn hex64() -> impl Strategy<Value = String> {
    prop_oneof!["[0-9a-fA-F]{64}", "[0-9a-z]{0,70}"]
}

fn pb_model() -> impl Strategy<Value = pb::Model> {
    (
        nasty(),
        -2i32..7,
        nasty(),
        prop::collection::vec((nasty(), any::<u64>(), hex64()), 0..4),
        (nasty(), nasty()),
    )
        .prop_map(|(id, kind, source, files, (family, format))| pb::Model {
            id,
            kind,
            source,
            family,
            format,
            files: files
                .into_iter()
                .map(|(path, size_bytes, sha256)| pb::ModelFile {
                    path,
                    size_bytes,
                    sha256,
                })
                .collect(),
        })
}

fn pb_spec() -> impl Strategy<Value = pb::JobSpec> {
    (
        (nasty(), nasty(), nasty(), any::<u32>(), any::<u32>()),
        (any::<u32>(), any::<f32>(), any::<u64>(), any::<u32>()),
        (nasty(), any::<i32>(), nasty()),
        (
            prop::collection::vec((nasty(), any::<f32>()), 0..3),
            nasty(),
            prop::collection::vec(any::<u8>(), 0..32),
            any::<f32>(),
            nasty(),
        ),
    )
        .prop_map(
            |(
                (model_id, prompt, negative_prompt, width, height),
                (steps, guidance_scale, seed, num_images),
                (scheduler, priority, idempotency_key),
                (loras, vae_id, init_image, strength, upscaler_id),
            )| pb::JobSpec {
                loras: loras
                    .into_iter()
                    .map(|(model_id, weight)| pb::LoraRef { model_id, weight })
                    .collect(),
                vae_id,
                init_image,
                strength,
                upscaler_id,
                model_id,
                prompt,
                negative_prompt,
                width,
                height,
                steps,
                guidance_scale,
                seed,
                num_images,
                scheduler,
                priority,
                idempotency_key,
            },
        )
}

fn pb_heartbeat() -> impl Strategy<Value = pb::Heartbeat> {
    (
        prop::collection::vec(nasty(), 0..3),
        prop::collection::vec((nasty(), any::<u64>(), any::<bool>()), 0..3),
        prop::collection::vec((nasty(), any::<u64>(), any::<u64>()), 0..3),
        prop::collection::vec((nasty(), any::<u32>()), 0..3),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(vram, disk, downloads, running, bps, draining)| pb::Heartbeat {
                vram_models: vram,
                disk_models: disk
                    .into_iter()
                    .map(|(model_id, bytes, preloaded)| pb::DiskModel {
                        model_id,
                        bytes,
                        preloaded,
                    })
                    .collect(),
                downloads: downloads
                    .into_iter()
                    .map(|(model_id, bytes_done, bytes_total)| pb::Download {
                        model_id,
                        bytes_done,
                        bytes_total,
                    })
                    .collect(),
                free_disk_bytes: bps / 2,
                running_jobs: running
                    .into_iter()
                    .map(|(job_id, attempt)| pb::RunningJob { job_id, attempt })
                    .collect(),
                download_bps: bps,
                draining,
            },
        )
}

fn pb_hello() -> impl Strategy<Value = pb::Hello> {
    (
        nasty(),
        nasty(),
        any::<u64>(),
        any::<u64>(),
        0u32..100,
        proptest::option::of(pb_heartbeat()),
    )
        .prop_map(
            |(worker_id, version, vram_bytes, cache_max_bytes, slots, state)| pb::Hello {
                worker_id,
                version,
                gpu_name: "gpu".into(),
                vram_bytes,
                cache_max_bytes,
                max_concurrent_jobs: slots,
                state,
            },
        )
}

/// An error from a conversion must be InvalidArgument and name a field.
fn names_a_field(e: &Error) -> Result<(), TestCaseError> {
    match e {
        Error::InvalidArgument { field, reason } => {
            prop_assert!(!field.is_empty() && !reason.is_empty(), "{e}");
            let status = tonic::Status::from(Error::InvalidArgument {
                field,
                reason: reason.clone(),
            });
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            prop_assert!(status.message().contains(field));
            Ok(())
        }
        other => Err(TestCaseError::fail(format!(
            "not InvalidArgument: {other:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn models_convert_or_name_the_field(m in pb_model()) {
        match ModelManifest::try_from(m.clone()) {
            Ok(ok) => {
                for f in &ok.files {
                    let p = std::path::Path::new(&f.path);
                    prop_assert!(p.is_relative(), "{:?}", f.path);
                    prop_assert!(
                        p.components().all(|c| matches!(c, std::path::Component::Normal(_))),
                        "{:?} leaves the bundle", f.path
                    );
                    prop_assert_eq!(f.sha256.len(), 64);
                }
                // And back: the wire form of an accepted model converts again.
                let back = pb::Model::from(ok.clone());
                prop_assert_eq!(ModelManifest::try_from(back).unwrap(), ok);
            }
            Err(e) => names_a_field(&e)?,
        }
        if let Err(e) = corral::convert::required_model(None) {
            names_a_field(&e)?;
        }
    }

    #[test]
    fn job_specs_convert_or_name_the_field(s in pb_spec()) {
        match corral::convert::required_spec(Some(s)) {
            Ok(spec) => {
                prop_assert!(spec.guidance_scale.is_finite());
                let back = pb::JobSpec::from(&spec);
                prop_assert_eq!(JobSpec::try_from(back).unwrap(), spec);
            }
            Err(e) => names_a_field(&e)?,
        }
    }

    #[test]
    fn hellos_and_heartbeats_convert_or_name_the_field(h in pb_hello(), hb in pb_heartbeat()) {
        let msg = Some(pb::worker_message::Msg::Hello(h));
        if let Err(e) = corral::convert::required_hello(msg) {
            names_a_field(&e)?;
        }
        if let Err(e) = CacheReport::try_from(hb) {
            names_a_field(&e)?;
        }
    }

    #[test]
    fn progress_converts_or_names_the_field(
        phase in -3i32..8, step in any::<u32>(), total in any::<u32>(), id in nasty()
    ) {
        let p = pb::JobProgress {
            job_id: id.clone(),
            attempt: 1,
            phase,
            step,
            total_steps: total,
            bytes_done: 1,
            bytes_total: 2,
        };
        if let Err(e) = corral::convert::job_phase(&p) {
            names_a_field(&e)?;
        }
        if let Err(e) = corral::convert::job_id(id) {
            names_a_field(&e)?;
        }
    }
}

// ---- scheduler operations ------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Submit {
        model: u8,
        priority: i8,
    },
    Connect {
        worker: u8,
        slots: u8,
        holds: Vec<u8>,
        reports: Vec<(u8, u8)>,
    },
    Heartbeat {
        worker: u8,
        holds: Vec<u8>,
        reports: Vec<(u8, u8)>,
        draining: bool,
    },
    Complete {
        worker: u8,
        job: u8,
        attempt: u8,
    },
    Fail {
        worker: u8,
        job: u8,
        attempt: u8,
        retryable: bool,
    },
    Cancel {
        job: u8,
    },
    Disconnect {
        worker: u8,
        graceful: bool,
    },
    Advance {
        ms: u16,
    },
    Warm {
        model: u8,
        replicas: u8,
    },
    RemoveModel {
        model: u8,
    },
    Restore {
        job: u8,
        model: u8,
        attempt: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let ids = || prop::collection::vec(0u8..4, 0..3);
    let reports = || prop::collection::vec((0u8..24, 0u8..4), 0..3);
    prop_oneof![
        4 => (0u8..4, any::<i8>()).prop_map(|(model, priority)| Op::Submit { model, priority }),
        2 => (0u8..4, 1u8..4, ids(), reports()).prop_map(|(worker, slots, holds, reports)| Op::Connect { worker, slots, holds, reports }),
        2 => (0u8..4, ids(), reports(), any::<bool>()).prop_map(|(worker, holds, reports, draining)| Op::Heartbeat { worker, holds, reports, draining }),
        3 => (0u8..4, 0u8..24, 0u8..4).prop_map(|(worker, job, attempt)| Op::Complete { worker, job, attempt }),
        2 => (0u8..4, 0u8..24, 0u8..4, any::<bool>()).prop_map(|(worker, job, attempt, retryable)| Op::Fail { worker, job, attempt, retryable }),
        1 => (0u8..24).prop_map(|job| Op::Cancel { job }),
        1 => (0u8..4, any::<bool>()).prop_map(|(worker, graceful)| Op::Disconnect { worker, graceful }),
        2 => (0u16..20_000).prop_map(|ms| Op::Advance { ms }),
        1 => (0u8..4, 0u8..4).prop_map(|(model, replicas)| Op::Warm { model, replicas }),
        1 => (0u8..4).prop_map(|model| Op::RemoveModel { model }),
        1 => (24u8..30, 0u8..4, 0u8..4).prop_map(|(job, model, attempt)| Op::Restore { job, model, attempt }),
    ]
}

fn mid(i: u8) -> ModelId {
    ModelId(format!("m{i}"))
}
fn wid(i: u8) -> WorkerId {
    WorkerId(format!("w{i}"))
}
fn jid(i: u8) -> JobId {
    JobId(format!("j{i}"))
}

fn report(holds: &[u8], reports: &[(u8, u8)], draining: bool) -> CacheReport {
    CacheReport {
        vram_models: holds.iter().take(1).map(|&m| mid(m)).collect(),
        disk_models: holds
            .iter()
            .map(|&m| DiskModel {
                model_id: mid(m),
                bytes: 1000,
                preloaded: m % 2 == 0,
            })
            .collect(),
        free_disk_bytes: 1 << 30,
        running_jobs: reports
            .iter()
            .map(|&(j, a)| RunningJob {
                job_id: jid(j),
                attempt: u32::from(a),
            })
            .collect(),
        draining,
        ..CacheReport::default()
    }
}

fn job_spec(model: u8, priority: i8) -> Arc<JobSpec> {
    Arc::new(JobSpec {
        model_id: mid(model),
        prompt: "p".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 7.5,
        seed: 1,
        num_images: 1,
        scheduler: String::new(),
        priority: i32::from(priority),
        ..JobSpec::for_model(mid(model))
    })
}

/// Checks the invariants, given every job id ever submitted.
fn check(s: &Scheduler, known: &BTreeSet<JobId>) -> Result<(), TestCaseError> {
    let mut running_on: BTreeMap<JobId, (WorkerId, u32)> = BTreeMap::new();
    for w in s.workers() {
        let used = w.running.len() + w.stopping.len();
        prop_assert!(
            w.running.len() as u32 <= w.hello.max_concurrent_jobs,
            "worker {} runs {} jobs with {} slots",
            w.hello.worker_id,
            w.running.len(),
            w.hello.max_concurrent_jobs
        );
        prop_assert!(
            w.free_slots() as usize
                <= w.hello.max_concurrent_jobs as usize
                    - used.min(w.hello.max_concurrent_jobs as usize)
        );
        for (job, attempt) in &w.running {
            let prev = running_on.insert(job.clone(), (w.hello.worker_id.clone(), *attempt));
            prop_assert!(prev.is_none(), "job {job} runs on two workers");
        }
    }
    let mut queued = 0;
    let mut unfinished = 0;
    for id in known {
        let Some(j) = s.job(id) else { continue };
        unfinished += 1;
        match &j.worker {
            Some(w) => {
                prop_assert_eq!(
                    running_on.get(id),
                    Some(&(w.clone(), j.attempt)),
                    "job {} says it runs on {} but that worker does not run it",
                    id,
                    w
                );
            }
            None => {
                queued += 1;
                prop_assert!(
                    !running_on.contains_key(id),
                    "job {id} is queued and running"
                );
            }
        }
    }
    // Every running attempt belongs to a job the scheduler still has.
    for job in running_on.keys() {
        prop_assert!(s.job(job).is_some(), "worker runs forgotten job {job}");
    }
    prop_assert_eq!(s.job_count(), unfinished);
    prop_assert_eq!(s.queued_len(), queued);
    prop_assert_eq!(running_on.len() + queued, unfinished);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn scheduler_keeps_its_invariants(ops in prop::collection::vec(op(), 1..80)) {
        let mut s = Scheduler::new(SchedulerConfig {
            max_attempts: 3,
            ..SchedulerConfig::default()
        });
        for m in 0..4 {
            s.register_model(mid(m), 1000 + u64::from(m));
        }
        let mut now: Millis = 1_000;
        let mut next_job = 0u8;
        let mut known = BTreeSet::new();
        // The last assignment of each job, as the coordinator tracks it to
        // vet what a reconnecting worker reports (Scheduler::connect alone
        // would let a Hello claim never-assigned jobs or more than its slots).
        let mut last_run: BTreeMap<JobId, (WorkerId, u32)> = BTreeMap::new();
        for op in ops {
            let effects: Vec<Effect> = match op {
                Op::Submit { model, priority } => {
                    if next_job >= 24 {
                        Vec::new()
                    } else {
                        let id = jid(next_job);
                        next_job += 1;
                        match s.submit(id.clone(), job_spec(model, priority), now) {
                            Ok(e) => {
                                known.insert(id);
                                e
                            }
                            Err(_) => Vec::new(),
                        }
                    }
                }
                Op::Connect { worker, slots, holds, reports } => {
                    let reports: Vec<(u8, u8)> = reports
                        .into_iter()
                        .filter(|&(j, a)| {
                            a > 0 && last_run.get(&jid(j)) == Some(&(wid(worker), u32::from(a)))
                        })
                        .take(usize::from(slots))
                        .collect();
                    let hello = WorkerHello {
                        worker_id: wid(worker),
                        version: "t".into(),
                        gpu_name: "g".into(),
                        vram_bytes: 1 << 30,
                        cache_max_bytes: 1 << 30,
                        max_concurrent_jobs: u32::from(slots),
                        state: report(&holds, &reports, false),
                    };
                    s.connect(hello, now)
                }
                Op::Heartbeat { worker, holds, reports, draining } => s
                    .heartbeat(&wid(worker), report(&holds, &reports, draining), now)
                    .unwrap_or_default(),
                Op::Complete { worker, job, attempt } => s
                    .complete(&wid(worker), &jid(job), u32::from(attempt), now)
                    .unwrap_or_default(),
                Op::Fail { worker, job, attempt, retryable } => s
                    .fail(&wid(worker), &jid(job), u32::from(attempt), "boom", retryable, now)
                    .unwrap_or_default(),
                Op::Cancel { job } => s.cancel(&jid(job), now).unwrap_or_default(),
                Op::Disconnect { worker, graceful } => {
                    s.disconnect(&wid(worker), "gone", graceful, now)
                }
                Op::Advance { ms } => {
                    now += Millis::from(ms);
                    let mut e = s.expire_workers(now);
                    e.extend(s.schedule(now));
                    e
                }
                Op::Warm { model, replicas } => s
                    .warm(&mid(model), u32::from(replicas))
                    .map(|(e, _)| e)
                    .unwrap_or_default(),
                Op::RemoveModel { model } => {
                    let _ = s.remove_model(&mid(model));
                    s.register_model(mid(model), 1000);
                    Vec::new()
                }
                Op::Restore { job, model, attempt } => {
                    let id = jid(job);
                    if s.job(&id).is_none() && !known.contains(&id) {
                        s.restore_job(id.clone(), job_spec(model, 0), now, u32::from(attempt), 0);
                        known.insert(id);
                    }
                    Vec::new()
                }
            };
            // Effects name only known jobs. (An Assign may be stale by the
            // end of one operation: expire_workers can assign a requeued job
            // to a worker it expires a moment later in the same call; the
            // attempt number moves on, so such a result would be refused.)
            for e in &effects {
                if let Effect::Assign { job, attempt, worker, .. } = e {
                    last_run.insert(job.clone(), (worker.clone(), *attempt));
                    prop_assert!(known.contains(job));
                    if let Some(j) = s.job(job) {
                        prop_assert!(*attempt <= j.attempt);
                    }
                }
            }
            check(&s, &known)?;
        }
    }
}
