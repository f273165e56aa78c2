//! Helpers for end-to-end tests: a coordinator and workers in this process,
//! over real gRPC on 127.0.0.1 (bound first, then served). In a test binary
//! named `postgres_*` every coordinator keeps its state in PostgreSQL
//! instead of the embedded store (`pg.rs`).
#![allow(dead_code)]

pub mod pg;
pub mod procs;
pub mod raw;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use corral::config::{CoordinatorConfig, EngineKind, WorkerConfig};
use corral::pb;
use corral::types::{ModelFile, ModelId, ModelKind, ModelManifest};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct Coord {
    pub url: String,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<corral::Result<()>>,
}

impl Coord {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }
}

pub fn fast_config() -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval_s: 0.2,
        heartbeat_missed: 3,
        ..CoordinatorConfig::default()
    }
}

/// A coordinator in this process on a fresh data dir (or a fresh
/// PostgreSQL database, see the module docs). Without an auth decision in
/// `cfg`, authentication is disabled (as `--insecure-no-auth`).
pub async fn coordinator(mut cfg: CoordinatorConfig) -> Coord {
    cfg.auth
        .get_or_insert_with(corral::config::AuthConfig::disabled);
    let data_dir = tempfile::tempdir().unwrap();
    cfg.data_dir = data_dir.path().to_path_buf();
    cfg.store = pg::store_for(data_dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(corral::coordinator::run(listener, cfg, async move {
        let _ = rx.await;
    }));
    Coord {
        url,
        data_dir,
        stop: Some(stop),
        task,
    }
}

pub struct WorkerProc {
    pub id: String,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<corral::Result<()>>,
}

impl WorkerProc {
    /// Graceful stop (like SIGTERM).
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }

    /// Cuts the stream as a crash would: the session task is aborted.
    pub fn kill(self) {
        self.task.abort();
    }
}

pub fn worker_config(url: &str, cache_dir: &Path) -> WorkerConfig {
    WorkerConfig {
        coordinator: url.to_owned(),
        cache_dir: cache_dir.to_path_buf(),
        engine: EngineKind::Synthetic,
        synthetic_step_ms: 5,
        shutdown_grace_s: 5,
        ..WorkerConfig::default()
    }
}

pub async fn worker(id: &str, cfg: WorkerConfig) -> WorkerProc {
    let engine = corral::worker::engine::from_config(&cfg).unwrap();
    let (w, outbox) = corral::worker::Worker::new(cfg, id.into(), engine)
        .await
        .unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(corral::worker::run(w, outbox, async move {
        let _ = rx.await;
    }));
    WorkerProc {
        id: id.to_owned(),
        stop: Some(stop),
        task,
    }
}

/// Writes a small model bundle into `dir/name` and returns its manifest.
pub fn make_model(dir: &Path, name: &str) -> ModelManifest {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("unet")).unwrap();
    let files = [
        (
            "model_index.json",
            format!("{{\"name\":\"{name}\"}}").into_bytes(),
        ),
        ("unet/model.onnx", vec![name.len() as u8; 4096]),
    ];
    let mut out = Vec::new();
    for (path, bytes) in files {
        std::fs::write(root.join(path), &bytes).unwrap();
        out.push(ModelFile {
            path: path.into(),
            size_bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        });
    }
    ModelManifest {
        family: String::new(),
        format: String::new(),
        id: ModelId(name.into()),
        kind: ModelKind::Checkpoint,
        source: format!("file://{}", root.display()),
        files: out,
    }
}

pub async fn channel(url: &str) -> Channel {
    corral::client::channel(url).await.unwrap()
}

pub async fn jobs(url: &str) -> pb::jobs_client::JobsClient<Channel> {
    pb::jobs_client::JobsClient::new(channel(url).await).max_decoding_message_size(64 << 20)
}

pub async fn admin(url: &str) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::new(channel(url).await)
}

pub async fn register(url: &str, m: &ModelManifest) {
    admin(url)
        .await
        .register_model(pb::RegisterModelRequest {
            model: Some(m.clone().into()),
        })
        .await
        .unwrap();
}

pub fn spec(model: &str, seed: u64) -> pb::JobSpec {
    pb::JobSpec {
        model_id: model.into(),
        prompt: "a lighthouse at dusk".into(),
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 7.5,
        seed,
        num_images: 1,
        ..Default::default()
    }
}

pub async fn submit(url: &str, spec: pb::JobSpec) -> pb::Job {
    jobs(url)
        .await
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

pub async fn get(url: &str, id: &str) -> pb::Job {
    jobs(url)
        .await
        .get_job(pb::GetJobRequest {
            job_id: id.into(),
            include_images: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls `cond` every 20 ms until it holds or `secs` pass.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_state(url: &str, id: &str, state: pb::JobState, secs: u64) -> pb::Job {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let j = get(url, id).await;
        if j.state == state as i32 {
            return j;
        }
        let ended = [
            pb::JobState::Completed,
            pb::JobState::Failed,
            pb::JobState::Cancelled,
        ]
        .map(|s| s as i32);
        if ended.contains(&j.state) {
            panic!("job {id} ended {:?}, not {state:?}: {j:?}", j.state());
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for job {id} to be {state:?}; it is {j:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn worker_count(url: &str) -> usize {
    admin(url)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .len()
}

pub async fn wait_workers(url: &str, n: usize) {
    wait_until(10, &format!("{n} workers"), || async move {
        worker_count(url).await == n
    })
    .await;
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
