//! Nobody unauthorised: tokens per role, clients confined to their own
//! jobs, per-client limits, workers confined to their own attempts, TLS,
//! and the CLI sending `CORRAL_TOKEN`.

mod common;

use common::raw::RawWorker;
use common::*;
use corral::auth::{AuthedChannel, Secret};
use corral::config::{AuthConfig, ClientKey, CoordinatorConfig, JobLimits};
use corral::pb;
use tonic::Code;

const ADMIN: &str = "admin-token-0123456789";
const WORKER: &str = "worker-token-0123456789";
const ACME: &str = "acme-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";

fn auth() -> AuthConfig {
    AuthConfig {
        disabled: false,
        admin_tokens: vec![Secret::new(ADMIN)],
        worker_tokens: vec![Secret::new(WORKER)],
        clients: vec![
            ClientKey {
                name: "acme".into(),
                key: Secret::new(ACME),
            },
            ClientKey {
                name: "globex".into(),
                key: Secret::new(GLOBEX),
            },
        ],
    }
}

/// Authentication on; local model sources only under the system's temp
/// directory, where the tests write their bundles.
fn secured() -> CoordinatorConfig {
    CoordinatorConfig {
        auth: Some(auth()),
        local_source_root: Some(std::env::temp_dir()),
        ..fast_config()
    }
}

async fn authed(url: &str, token: Option<&str>) -> AuthedChannel {
    corral::auth::connect(url, None, token.map(Secret::new).as_ref())
        .await
        .unwrap()
}

async fn jobs_as(url: &str, token: Option<&str>) -> pb::jobs_client::JobsClient<AuthedChannel> {
    pb::jobs_client::JobsClient::new(authed(url, token).await)
}

async fn admin_as(url: &str, token: Option<&str>) -> pb::admin_client::AdminClient<AuthedChannel> {
    pb::admin_client::AdminClient::new(authed(url, token).await)
}

async fn submit_as(url: &str, token: &str, s: pb::JobSpec) -> Result<pb::Job, tonic::Status> {
    jobs_as(url, Some(token))
        .await
        .submit_job(pb::SubmitJobRequest { spec: Some(s) })
        .await
        .map(|r| r.into_inner().job.unwrap())
}

async fn list_as(url: &str, token: &str) -> Vec<String> {
    let mut ids: Vec<String> = jobs_as(url, Some(token))
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    ids.sort();
    ids
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => panic!("the call was allowed"),
        Err(s) => s.code(),
    }
}

fn keyed(model: &str, seed: u64, key: &str) -> pb::JobSpec {
    pb::JobSpec {
        idempotency_key: key.into(),
        ..spec(model, seed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_roles_are_kept_apart() {
    let models = tmp();
    let c = coordinator(CoordinatorConfig {
        local_source_root: Some(models.path().to_path_buf()),
        ..secured()
    })
    .await;
    let m = make_model(models.path(), "sd-a");
    // With authentication on, a local source outside the configured root is
    // refused at registration, naming the source.
    let elsewhere = tmp();
    let outside = make_model(elsewhere.path(), "sd-outside");
    let refused = admin_as(&c.url, Some(ADMIN))
        .await
        .register_model(pb::RegisterModelRequest {
            model: Some(outside.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("source") && refused.message().contains("outside"),
        "{refused:?}"
    );
    let register = |token: Option<&'static str>| {
        let (url, m) = (c.url.clone(), m.clone());
        async move {
            admin_as(&url, token)
                .await
                .register_model(pb::RegisterModelRequest {
                    model: Some(m.into()),
                })
                .await
        }
    };
    assert_eq!(code(register(None).await), Code::Unauthenticated);
    assert_eq!(
        code(register(Some("not-a-token-at-all-000")).await),
        Code::Unauthenticated
    );
    assert_eq!(code(register(Some(ACME)).await), Code::PermissionDenied);
    assert_eq!(code(register(Some(WORKER)).await), Code::PermissionDenied);
    register(Some(ADMIN)).await.unwrap();
    assert_eq!(
        code(submit_as(&c.url, WORKER, spec("sd-a", 1)).await),
        Code::PermissionDenied
    );
    let anonymous = jobs_as(&c.url, None)
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await;
    assert_eq!(code(anonymous), Code::Unauthenticated);

    // Two clients may use the same idempotency key.
    let a = submit_as(&c.url, ACME, keyed("sd-a", 1, "same"))
        .await
        .unwrap();
    let b = submit_as(&c.url, GLOBEX, keyed("sd-a", 2, "same"))
        .await
        .unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(
        submit_as(&c.url, ACME, keyed("sd-a", 1, "same"))
            .await
            .unwrap()
            .id,
        a.id
    );
    // A client sees and cancels only its own jobs; admin sees all.
    let mut globex = jobs_as(&c.url, Some(GLOBEX)).await;
    let get = globex
        .get_job(pb::GetJobRequest {
            job_id: a.id.clone(),
            include_images: false,
        })
        .await;
    assert_eq!(code(get), Code::NotFound);
    let cancel = globex
        .cancel_job(pb::CancelJobRequest {
            job_id: a.id.clone(),
        })
        .await;
    assert_eq!(code(cancel), Code::NotFound);
    let watch = globex
        .watch_job(pb::WatchJobRequest {
            job_id: a.id.clone(),
        })
        .await;
    assert_eq!(code(watch), Code::NotFound);
    assert_eq!(list_as(&c.url, ACME).await, vec![a.id.clone()]);
    assert_eq!(list_as(&c.url, GLOBEX).await, vec![b.id.clone()]);
    let mut both = vec![a.id.clone(), b.id.clone()];
    both.sort();
    assert_eq!(list_as(&c.url, ADMIN).await, both);
    jobs_as(&c.url, Some(ACME))
        .await
        .cancel_job(pb::CancelJobRequest {
            job_id: a.id.clone(),
        })
        .await
        .unwrap();

    // A worker needs a worker token; with it, globex's job runs.
    let cache = tmp();
    let mut wcfg = worker_config(&c.url, cache.path());
    wcfg.token = Some(Secret::new(WORKER));
    let w = worker("w1", wcfg).await;
    let url = c.url.clone();
    let id = b.id.clone();
    wait_until(20, "globex's job to complete", || {
        let (url, id) = (url.clone(), id.clone());
        async move {
            let j = jobs_as(&url, Some(GLOBEX))
                .await
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    include_images: false,
                })
                .await
                .unwrap()
                .into_inner();
            j.state == pb::JobState::Completed as i32
        }
    })
    .await;
    w.stop().await;
    // Without a token, Connect is refused.
    let mut raw = pb::workers_client::WorkersClient::new(authed(&c.url, Some(ACME)).await);
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::WorkerMessage>(1);
    let refused = raw
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    assert_eq!(code(refused), Code::PermissionDenied);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_are_limited_per_client() {
    let c = coordinator(CoordinatorConfig {
        limits: JobLimits {
            max_unfinished_jobs_per_client: 2,
            ..JobLimits::default()
        },
        ..secured()
    })
    .await;
    let models = tmp();
    admin_as(&c.url, Some(ADMIN))
        .await
        .register_model(pb::RegisterModelRequest {
            model: Some(make_model(models.path(), "sd-a").into()),
        })
        .await
        .unwrap();
    let first = submit_as(&c.url, ACME, spec("sd-a", 1)).await.unwrap();
    submit_as(&c.url, ACME, spec("sd-a", 2)).await.unwrap();
    let third = submit_as(&c.url, ACME, spec("sd-a", 3)).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(
        third.message().contains("max_unfinished_jobs_per_client"),
        "{}",
        third.message()
    );
    // Other clients are not affected; a finished job frees a place.
    submit_as(&c.url, GLOBEX, spec("sd-a", 4)).await.unwrap();
    jobs_as(&c.url, Some(ACME))
        .await
        .cancel_job(pb::CancelJobRequest { job_id: first.id })
        .await
        .unwrap();
    submit_as(&c.url, ACME, spec("sd-a", 5)).await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_report_for_another_workers_job() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    let mut honest = RawWorker::connect(&c.url, "honest", vec![]).await;
    let a = honest.next_assign().await;
    honest.heartbeat(vec![pb::RunningJob {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
    }]);
    let mallory = RawWorker::connect(&c.url, "mallory", vec![]).await;
    mallory.result(&a.job_id, a.attempt, b"forged").await;
    mallory
        .send(pb::worker_message::Msg::Failed(pb::JobFailed {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            reason: "forged".into(),
            retryable: false,
            ..Default::default()
        }))
        .await;
    // Messages on one stream are handled in order: once mallory's
    // GoingAway has been handled, so were its forgeries.
    mallory
        .send(pb::worker_message::Msg::GoingAway(pb::GoingAway {
            reason: "done".into(),
        }))
        .await;
    wait_workers(&c.url, 1).await;
    let j = get(&c.url, &job.id).await;
    assert_eq!(
        (j.state, j.worker_id.as_str()),
        (pb::JobState::Running as i32, "honest")
    );
    honest.result(&a.job_id, a.attempt, b"real").await;
    let done = wait_state(&c.url, &job.id, pb::JobState::Completed, 10).await;
    let out = done.output.unwrap();
    assert_eq!(
        (out.worker_id.as_str(), out.images),
        ("honest", vec![common::raw::png_like(b"real").into()])
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_self_signed_certificate() {
    let certs = tmp();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key, ca) = (
        certs.path().join("cert.pem"),
        certs.path().join("key.pem"),
        certs.path().join("ca.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let c = coordinator(CoordinatorConfig {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..secured()
    })
    .await;
    let url = c.url.replace("http://", "https://");
    let admin_ch = corral::auth::connect(&url, Some(&ca), Some(&Secret::new(ADMIN)))
        .await
        .unwrap();
    let models = tmp();
    pb::admin_client::AdminClient::new(admin_ch)
        .register_model(pb::RegisterModelRequest {
            model: Some(make_model(models.path(), "sd-a").into()),
        })
        .await
        .unwrap();
    let acme = corral::auth::connect(&url, Some(&ca), Some(&Secret::new(ACME)))
        .await
        .unwrap();
    let mut jobs_tls = pb::jobs_client::JobsClient::new(acme);
    let job = jobs_tls
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("sd-a", 1)),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let cache = tmp();
    let mut wcfg = worker_config(&url, cache.path());
    wcfg.token = Some(Secret::new(WORKER));
    wcfg.ca_cert = Some(ca.clone());
    let w = worker("w-tls", wcfg).await;
    let id = job.id.clone();
    wait_until(20, "the job to complete over TLS", || {
        let (mut j, id) = (jobs_tls.clone(), id.clone());
        async move {
            j.get_job(pb::GetJobRequest {
                job_id: id,
                include_images: false,
            })
            .await
            .unwrap()
            .into_inner()
            .state
                == pb::JobState::Completed as i32
        }
    })
    .await;
    // Plain text to the TLS port does not get through.
    let plain = corral::auth::connect(&c.url, None, Some(&Secret::new(ACME))).await;
    if let Ok(ch) = plain {
        let r = pb::jobs_client::JobsClient::new(ch)
            .list_jobs(pb::ListJobsRequest::default())
            .await;
        assert!(r.is_err());
    }
    // Nor does TLS without trusting the certificate.
    let untrusted = corral::auth::connect(&url, None, Some(&Secret::new(ACME))).await;
    if let Ok(ch) = untrusted {
        let r = pb::jobs_client::JobsClient::new(ch)
            .list_jobs(pb::ListJobsRequest::default())
            .await;
        assert!(r.is_err());
    }
    w.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_corral_token() {
    let c = coordinator(secured()).await;
    let url = c.url.clone();
    let run = move |token: Option<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_corral"));
            cmd.args(["jobs", "list", "--coordinator", &url])
                .env_remove("CORRAL_TOKEN");
            if let Some(t) = token {
                cmd.env("CORRAL_TOKEN", t);
            }
            cmd.output().unwrap()
        })
    };
    let ok = run(Some(ACME)).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = run(None).await.unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(!err.contains(ACME));
    // `corral worker` sends its token from CORRAL_TOKEN too.
    let dir = tmp();
    let mut w = common::procs::Proc::start(
        &dir.path().join("logs"),
        "worker",
        &[
            "worker",
            "--coordinator",
            &c.url,
            "--worker-id",
            "w-env",
            "--engine",
            "synthetic",
            "--cache-dir",
            dir.path().join("cache").to_str().unwrap(),
        ],
        &[("CORRAL_TOKEN", WORKER)],
    );
    let url = c.url.clone();
    wait_until(20, "the worker process to connect", || {
        let url = url.clone();
        async move {
            admin_as(&url, Some(ADMIN))
                .await
                .list_workers(pb::ListWorkersRequest {})
                .await
                .is_ok_and(|r| r.into_inner().workers.len() == 1)
        }
    })
    .await;
    w.kill();
    assert!(
        !w.log().contains(WORKER),
        "the token is in the worker's log"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_claim_jobs_it_was_not_given() {
    let c = coordinator(fast_config()).await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let (a, b) = (
        submit(&c.url, spec("sd-a", 1)).await,
        submit(&c.url, spec("sd-a", 2)).await,
    );
    // Mallory's Hello claims both queued jobs, at attempts never assigned
    // to it, and more of them than its one slot.
    let claims = vec![
        pb::RunningJob {
            job_id: a.id.clone(),
            attempt: 0,
        },
        pb::RunningJob {
            job_id: b.id.clone(),
            attempt: 1,
        },
    ];
    let mut mallory = RawWorker::connect(&c.url, "mallory", claims).await;
    mallory.heartbeat(vec![]);
    // It gets one job the ordinary way, as attempt 1, and nothing more.
    let assigned = mallory.next_assign().await;
    assert_eq!(assigned.attempt, 1);
    let other = if assigned.job_id == a.id {
        &b.id
    } else {
        &a.id
    };
    let j = get(&c.url, other).await;
    // (A claim of the next attempt of a queued job only renumbers it: see
    // durability.rs an_unrecorded_attempt_is_never_reused.)
    assert_eq!(
        (j.state, j.worker_id.as_str()),
        (pb::JobState::Queued as i32, ""),
        "{j:?}"
    );
    assert!(j.attempt <= 1, "{j:?}");
    drop(mallory);
    c.stop().await;
}
