//! The control plane end to end: a coordinator and synthetic-engine workers
//! in this process, over real gRPC on 127.0.0.1.

mod common;

use std::time::Duration;

use common::raw::RawWorker;
use common::*;
use corral::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_and_image_comes_back() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    let m = make_model(models.path(), "sd-a");
    register(&c.url, &m).await;
    let cache = tmp();
    let w = worker("w1", worker_config(&c.url, cache.path())).await;
    let job = submit(&c.url, spec("sd-a", 7)).await;
    assert!(job.state == pb::JobState::Queued as i32 || job.state == pb::JobState::Running as i32);
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 20).await;
    let out = done.output.unwrap();
    assert_eq!(out.worker_id, "w1");
    assert_eq!(out.images.len(), 1);
    assert!(out.images[0].starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(done.attempt, 1);
    w.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_go_to_the_worker_holding_their_model() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    let a = make_model(models.path(), "sd-a");
    let b = make_model(models.path(), "sd-b");
    register(&c.url, &a).await;
    register(&c.url, &b).await;
    // Each worker has one model baked in; neither can download quickly
    // enough to beat the holder.
    let (pre_a, pre_b) = (tmp(), tmp());
    copy_dir(&models.path().join("sd-a"), &pre_a.path().join("sd-a"));
    copy_dir(&models.path().join("sd-b"), &pre_b.path().join("sd-b"));
    let (c1, c2) = (tmp(), tmp());
    let mut cfg1 = worker_config(&c.url, c1.path());
    cfg1.preloaded_dir = Some(pre_a.path().to_path_buf());
    let mut cfg2 = worker_config(&c.url, c2.path());
    cfg2.preloaded_dir = Some(pre_b.path().to_path_buf());
    let w1 = worker("wa", cfg1).await;
    let w2 = worker("wb", cfg2).await;
    wait_workers(&c.url, 2).await;
    // One job at a time, so a holder of each job's model is always idle
    // when the job arrives: no job may be served by a worker that lacks
    // its model (the replication planner may have copied a model to the
    // other worker meanwhile; then both hold it).
    for i in 0..8 {
        let model = if i % 3 == 0 { "sd-b" } else { "sd-a" };
        let id = submit(&c.url, spec(model, i)).await.id;
        let j = wait_state(&c.url, &id, pb::JobState::Completed, 30).await;
        let tier = j.output.unwrap().timings.unwrap().tier;
        assert_ne!(
            tier,
            pb::CacheTier::Download as i32,
            "job {i} for {model} was served by {}, which lacked it",
            j.worker_id
        );
        if i < 2 {
            // Before any replica could exist, only the baked-in holder has it.
            let want = if model == "sd-a" { "wa" } else { "wb" };
            assert_eq!(j.worker_id, want, "job for {model} ran on {}", j.worker_id);
        }
    }
    w1.stop().await;
    w2.stop().await;
    c.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_is_reassigned_and_completes_once() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    let m = make_model(models.path(), "sd-a");
    register(&c.url, &m).await;
    let (c1, c2) = (tmp(), tmp());
    let mut slow = worker_config(&c.url, c1.path());
    slow.synthetic_step_ms = 500;
    let victim = worker("victim", slow).await;
    wait_workers(&c.url, 1).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    wait_state(&c.url, &job.id, pb::JobState::Running, 10).await;
    let mut watch = jobs(&c.url)
        .await
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    victim.kill();
    let rescuer = worker("rescuer", worker_config(&c.url, c2.path())).await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 30).await;
    assert_eq!(done.worker_id, "rescuer");
    assert_eq!(done.attempt, 2);
    // The watcher saw exactly one completion, after a requeue.
    let mut kinds = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
    {
        kinds.push(match ev.event.unwrap() {
            pb::job_event::Event::Requeued(_) => "requeued",
            pb::job_event::Event::Completed(_) => "completed",
            pb::job_event::Event::Assigned(_) => "assigned",
            _ => "other",
        });
    }
    assert_eq!(
        kinds.iter().filter(|k| **k == "completed").count(),
        1,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"requeued"), "{kinds:?}");
    rescuer.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_attempt_result_is_ignored() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let mut zombie = RawWorker::connect(&c.url, "zombie", vec![]).await;
    let a1 = zombie.next_assign().await;
    assert_eq!((a1.job_id.as_str(), a1.attempt), (job.id.as_str(), 1));
    // The zombie stops heartbeating; the job moves on to attempt 2.
    let mut fresh = RawWorker::connect(&c.url, "fresh", vec![]).await;
    fresh.heartbeat(vec![]);
    let a2 = fresh.next_assign().await;
    assert_eq!(a2.attempt, 2);
    // The zombie's late result for attempt 1 arrives on a new stream.
    let late = RawWorker::connect(&c.url, "zombie", vec![]).await;
    late.result(&job.id, 1, b"stale").await;
    // A result for a job it never held, and garbage, are ignored too.
    late.result("j-nonexistent", 1, b"x").await;
    late.send(pb::worker_message::Msg::Progress(pb::JobProgress {
        job_id: job.id.clone(),
        attempt: 9,
        phase: 3,
        ..Default::default()
    }))
    .await;
    fresh.result(&job.id, 2, b"fresh").await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    let out = done.output.unwrap();
    assert_eq!(out.images, vec![common::raw::png_like(b"fresh")]);
    assert_eq!(out.worker_id, "fresh");
    // A second result for the finished job changes nothing.
    fresh.result(&job.id, 2, b"again").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        get(&c.url, &job.id).await.output.unwrap().images,
        vec![common::raw::png_like(b"fresh")]
    );
    drop((late, zombie));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_worker_keeps_its_job() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let mut first = RawWorker::connect(&c.url, "w", vec![]).await;
    let a = first.next_assign().await;
    drop(first); // the stream drops
    wait_state(&c.url, &job.id, pb::JobState::Queued, 10).await;
    let running = vec![pb::RunningJob {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
    }];
    let again = RawWorker::connect(&c.url, "w", running.clone()).await;
    again.heartbeat(running);
    let j = wait_state(&c.url, &job.id, pb::JobState::Running, 10).await;
    assert_eq!((j.worker_id.as_str(), j.attempt), ("w", 1));
    again.result(&job.id, 1, b"img").await;
    wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let cache = tmp();
    let mut cfg = worker_config(&c.url, cache.path());
    cfg.synthetic_step_ms = 200;
    let w = worker("w", cfg).await;
    wait_workers(&c.url, 1).await;
    let mut s = spec("sd-a", 1);
    s.steps = 100;
    let running = submit(&c.url, s.clone()).await;
    let queued = submit(&c.url, s).await;
    wait_state(&c.url, &running.id, pb::JobState::Running, 10).await;
    let mut client = jobs(&c.url).await;
    let j = client
        .cancel_job(pb::CancelJobRequest {
            job_id: queued.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, pb::JobState::Cancelled as i32);
    let j = client
        .cancel_job(pb::CancelJobRequest {
            job_id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, pb::JobState::Cancelled as i32);
    // The worker stops within a step and its slot frees: a new job runs.
    let mut quick = spec("sd-a", 2);
    quick.steps = 2;
    let next = submit(&c.url, quick).await;
    wait_state(&c.url, &next.id, pb::JobState::Completed, 10).await;
    assert_eq!(
        get(&c.url, &running.id).await.state,
        pb::JobState::Cancelled as i32
    );
    let err = client
        .cancel_job(pb::CancelJobRequest {
            job_id: running.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    w.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_the_right_code_and_message() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let mut client = jobs(&c.url).await;
    let cases: Vec<(pb::JobSpec, Code, &str)> = vec![
        (spec("nope", 1), Code::NotFound, "unknown model nope"),
        (
            pb::JobSpec {
                width: 100,
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "width: 100 is not a multiple of 8",
        ),
        (
            pb::JobSpec {
                height: 8,
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "height: 8 is outside",
        ),
        (
            pb::JobSpec {
                steps: 0,
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "steps",
        ),
        (
            pb::JobSpec {
                guidance_scale: -1.0,
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "guidance_scale",
        ),
        (
            pb::JobSpec {
                guidance_scale: f32::NAN,
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "guidance_scale",
        ),
        (
            pb::JobSpec {
                num_images: 99,
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "num_images",
        ),
        (
            pb::JobSpec {
                scheduler: "plms".into(),
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "scheduler",
        ),
        (
            pb::JobSpec {
                model_id: String::new(),
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "model_id",
        ),
        (
            pb::JobSpec {
                prompt: "x".repeat(10_000),
                ..spec("sd-a", 1)
            },
            Code::InvalidArgument,
            "prompt",
        ),
    ];
    for (s, code, msg) in cases {
        let err = client
            .submit_job(pb::SubmitJobRequest { spec: Some(s) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(msg),
            "{:?} lacks {msg:?}",
            err.message()
        );
    }
    let err = client
        .submit_job(pb::SubmitJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("spec"));
    let err = client
        .get_job(pb::GetJobRequest {
            job_id: "j-missing".into(),
            include_images: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin(&c.url)
        .await
        .register_model(pb::RegisterModelRequest {
            model: Some(pb::Model {
                id: "evil".into(),
                source: "file:///tmp".into(),
                files: vec![pb::ModelFile {
                    path: "../../etc/passwd".into(),
                    size_bytes: 1,
                    sha256: "0".repeat(64),
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("files.path"), "{}", err.message());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_job() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let mut s = spec("sd-a", 1);
    s.idempotency_key = "order-42".into();
    let mut client = jobs(&c.url).await;
    let first = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(s.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let second = client
        .submit_job(pb::SubmitJobRequest { spec: Some(s) })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.deduplicated);
    assert!(second.deduplicated);
    assert_eq!(first.job.unwrap().id, second.job.unwrap().id);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_jobs_filters_and_pages() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    register(&c.url, &make_model(models.path(), "sd-b")).await;
    for i in 0..5 {
        submit(&c.url, spec(if i < 3 { "sd-a" } else { "sd-b" }, i)).await;
    }
    let mut client = jobs(&c.url).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = client
            .list_jobs(pb::ListJobsRequest {
                state: pb::JobState::Queued as i32,
                model_id: "sd-a".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.jobs.len() <= 2);
        seen.extend(r.jobs.into_iter().map(|j| j.id));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen.len(), 3);
    seen.dedup();
    assert_eq!(seen.len(), 3);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_is_declared_dead() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    // Connected but never heartbeating: gone after 3 x 0.2 s.
    let mut silent = RawWorker::connect(&c.url, "silent", vec![]).await;
    silent.next_assign().await;
    wait_state(&c.url, &job.id, pb::JobState::Queued, 10).await;
    wait_workers(&c.url, 0).await;
    drop(silent);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_jobs_then_goes_away() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let cache = tmp();
    let mut cfg = worker_config(&c.url, cache.path());
    cfg.synthetic_step_ms = 100;
    let w = worker("w", cfg).await;
    wait_workers(&c.url, 1).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    wait_state(&c.url, &job.id, pb::JobState::Running, 10).await;
    w.stop().await; // returns once GoingAway is said
    let j = get(&c.url, &job.id).await;
    assert_eq!(j.state, pb::JobState::Completed as i32, "{j:?}");
    // ListWorkers reads a snapshot at most one tick old.
    wait_workers(&c.url, 0).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_hands_jobs_back() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let (c1, c2) = (tmp(), tmp());
    let mut cfg = worker_config(&c.url, c1.path());
    cfg.synthetic_step_ms = 200;
    cfg.shutdown_grace_s = 0;
    let leaving = worker("leaving", cfg).await;
    wait_workers(&c.url, 1).await;
    let mut s = spec("sd-a", 1);
    s.steps = 50;
    let job = submit(&c.url, s).await;
    wait_state(&c.url, &job.id, pb::JobState::Running, 10).await;
    leaving.stop().await;
    // Handed back without counting as a failure, and done elsewhere.
    let staying = worker("staying", worker_config(&c.url, c2.path())).await;
    let j = wait_state(&c.url, &job.id, pb::JobState::Completed, 30).await;
    assert_eq!(j.worker_id, "staying");
    assert_eq!(j.attempt, 2);
    staying.stop().await;
    c.stop().await;
}
