//! The fleet with its cloud: in-process coordinator and synthetic workers,
//! SaladCloud's IMDS and API played by the local stand-ins in cloud_mock.
//! Deletion costs follow the cache; a bad node drains and reallocates once;
//! a silent worker whose instance is gone loses its jobs before the
//! heartbeat timeout; the desired-workers signal follows the load within
//! its bounds; `/ready` follows the connection.

mod cloud_mock;
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::RawWorker;
use common::*;
use corral::config::{CoordinatorConfig, WorkerConfig};
use corral::pb;
use corral::types::ModelManifest;
use corral::worker::engine::{Engine, Job, LoadedModel, Output, SyntheticEngine};
use tokio::sync::oneshot;

/// A worker in this process, with its HTTP port.
struct CloudWorker {
    worker: Arc<corral::worker::Worker>,
    http: corral::worker::http::HttpGuard,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<corral::Result<()>>,
}

impl CloudWorker {
    async fn start(id: &str, cfg: WorkerConfig, engine: Option<Arc<dyn Engine>>) -> Self {
        let engine = engine.unwrap_or_else(|| corral::worker::engine::from_config(&cfg).unwrap());
        let (worker, outbox) = corral::worker::Worker::new(cfg, id.into(), engine)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = corral::worker::http::serve(listener, &worker).unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(corral::worker::run(worker.clone(), outbox, async move {
            let _ = rx.await;
        }));
        Self {
            worker,
            http,
            stop: Some(stop),
            task,
        }
    }

    async fn ready(&self) -> (u16, String) {
        let r = reqwest::get(format!("http://{}/ready", self.http.addr))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }
}

/// A worker config announcing `machine` and talking to `imds`.
fn cloud_config(
    url: &str,
    cache: &std::path::Path,
    imds: &cloud_mock::Imds,
    machine: &str,
) -> WorkerConfig {
    let mut cfg = worker_config(url, cache);
    cfg.cloud = corral::cloud::WorkerCloudConfig {
        enabled: true,
        imds_url: imds.url.clone(),
        deletion_cost_interval_s: 0.3,
        machine_id: Some(machine.into()),
        container_group_id: Some(cloud_mock::GROUP_ID.into()),
        ..Default::default()
    };
    cfg
}

/// Puts `models` into the disk cache at `dir`, as a worker that ran them
/// before a restart would have.
async fn fill_cache(dir: &std::path::Path, models: &[&ModelManifest]) {
    let cache = corral::worker::cache::DiskCache::open(corral::worker::cache::CacheConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        preloaded_dir: None,
        max_concurrent_downloads: 1,
    })
    .await
    .unwrap();
    for m in models {
        cache.ensure(m, &|_, _| {}).await.unwrap();
    }
}

/// A coordinator with its HTTP port (for `/metrics`).
struct CoordHttp {
    url: String,
    metrics_url: String,
    _data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<corral::Result<()>>,
}

impl CoordHttp {
    async fn start(mut cfg: CoordinatorConfig) -> Self {
        cfg.auth = Some(corral::config::AuthConfig::disabled());
        let data = tmp();
        cfg.data_dir = data.path().to_path_buf();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", grpc.local_addr().unwrap());
        let metrics_url = format!("http://{}/metrics", http.local_addr().unwrap());
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(corral::coordinator::run_with_http(
            grpc,
            Some(http),
            cfg,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            url,
            metrics_url,
            _data: data,
            stop: Some(stop),
            task,
        }
    }

    /// The value of one series (`name` with its labels, as printed).
    async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }
}

async fn listed(url: &str, id: &str) -> bool {
    admin(url)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .iter()
        .any(|w| w.worker_id == id)
}

/// Polls `corral_desired_workers` until it reads `want`, keeping every value.
async fn wait_desired(c: &CoordHttp, want: f64, seen: &mut Vec<f64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = c.metric("corral_desired_workers").await.unwrap();
        seen.push(v);
        if v == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "corral_desired_workers never read {want}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw worker stream whose Hello names `machine` in the mock's group.
async fn raw_cloud_worker(url: &str, id: &str, machine: &str) -> RawWorker {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = pb::Hello {
        worker_id: id.into(),
        max_concurrent_jobs: 1,
        cache_max_bytes: 1 << 30,
        state: Some(pb::Heartbeat::default()),
        cloud: Some(pb::CloudInstance {
            machine_id: machine.into(),
            container_group_id: cloud_mock::GROUP_ID.into(),
        }),
        ..Default::default()
    };
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let mut client = pb::workers_client::WorkersClient::new(channel(url).await);
    let mut rx = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = rx.message().await.unwrap().unwrap();
    assert!(matches!(
        first.msg,
        Some(pb::coordinator_message::Msg::Welcome(_))
    ));
    RawWorker { tx, rx }
}

fn last_cost(imds: &cloud_mock::Imds) -> Option<i32> {
    imds.costs().last().map(|c| c.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_cost_follows_the_cache() {
    let mut cfg = fast_config();
    cfg.cloud.advice_interval_s = 0.1;
    let c = CoordHttp::start(cfg).await;
    let models = tmp();
    let rare = make_model(models.path(), "rare");
    let common = make_model(models.path(), "common");
    register(&c.url, &rare).await;
    register(&c.url, &common).await;
    // A alone holds "rare"; B and C hold only "common", which nobody asks for.
    let (da, db, dc) = (tmp(), tmp(), tmp());
    fill_cache(da.path(), &[&rare]).await;
    fill_cache(db.path(), &[&common]).await;
    fill_cache(dc.path(), &[&common]).await;
    let (ia, ib, ic) = (
        cloud_mock::Imds::start().await,
        cloud_mock::Imds::start().await,
        cloud_mock::Imds::start().await,
    );
    let a = CloudWorker::start(
        "wa",
        cloud_config(&c.url, da.path(), &ia, "machine-a"),
        None,
    )
    .await;
    let b = CloudWorker::start(
        "wb",
        cloud_config(&c.url, db.path(), &ib, "machine-b"),
        None,
    )
    .await;
    let cw = CloudWorker::start(
        "wc",
        cloud_config(&c.url, dc.path(), &ic, "machine-c"),
        None,
    )
    .await;
    wait_workers(&c.url, 3).await;
    // Demand for "rare", one job at a time, so its holder is idle for each.
    for i in 0..4 {
        let id = submit(&c.url, spec("rare", i)).await.id;
        let j = wait_state(&c.url, &id, pb::JobState::Completed, 30).await;
        assert_eq!(j.worker_id, "wa", "job {i} for rare");
    }
    // The sole holder of a model in demand is worth more than a worker
    // holding only a widely held, unrequested model (whichever of B and C
    // did not get a replica of "rare" meanwhile).
    let (ia2, ib2, ic2) = (ia.clone(), ib.clone(), ic.clone());
    wait_until(
        20,
        "A's deletion cost above a common-only worker's",
        move || {
            let (ia, ib, ic) = (ia2.clone(), ib2.clone(), ic2.clone());
            async move {
                match (last_cost(&ia), last_cost(&ib), last_cost(&ic)) {
                    (Some(a), Some(b), Some(c)) => a > 0 && a > b.min(c),
                    _ => false,
                }
            }
        },
    )
    .await;
    assert!(
        c.metric("corral_cloud_advice_sent_total").await.unwrap() >= 4.0,
        "advice for each worker, then A's change"
    );
    // Each IMDS saw its worker's PUTs, never closer together than the
    // configured interval.
    for (name, imds) in [("a", &ia), ("b", &ib), ("c", &ic)] {
        let costs = imds.costs();
        assert!(!costs.is_empty(), "{name}");
        for pair in costs.windows(2) {
            let gap = pair[1].1.duration_since(pair[0].1);
            assert!(
                gap >= Duration::from_millis(290),
                "{name}: {gap:?} between PUTs"
            );
        }
        assert!(imds.accepted("POST", "/v1/reallocate").is_empty(), "{name}");
    }
    let text = reqwest::get(format!("http://{}/metrics", a.http.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(
            "corral_worker_cloud_deletion_cost {}",
            ia.deletion_cost()
        )),
        "{text}"
    );
    for w in [a, b, cw] {
        w.stop().await;
    }
    c.stop().await;
}

/// The synthetic engine, except that prompts containing "fail" fail after
/// 100 ms of trying (like running out of memory mid-generation).
struct FlakyEngine(SyntheticEngine);
struct FlakyModel(Arc<dyn LoadedModel>);

impl Engine for FlakyEngine {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn load(
        &self,
        m: &ModelManifest,
        dir: &std::path::Path,
    ) -> corral::Result<Arc<dyn LoadedModel>> {
        Ok(Arc::new(FlakyModel(self.0.load(m, dir)?)))
    }
}

impl LoadedModel for FlakyModel {
    fn resident_bytes(&self) -> u64 {
        self.0.resident_bytes()
    }
    fn generate(
        &self,
        job: &Job,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> corral::Result<Output> {
        if job.spec.prompt.contains("fail") {
            std::thread::sleep(Duration::from_millis(100));
            return Err(corral::Error::Unavailable("CUDA out of memory".into()));
        }
        self.0.generate(job, on_step)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_node_drains_reallocates_once_and_its_jobs_finish_or_move() {
    let mut cfg = fast_config();
    cfg.max_attempts = 20;
    cfg.cloud.advice_interval_s = 0.05;
    cfg.cloud.bad_failures = 2;
    let c = CoordHttp::start(cfg).await;
    let models = tmp();
    let m = make_model(models.path(), "sd");
    register(&c.url, &m).await;
    let (dx, dy) = (tmp(), tmp());
    let (ix, iy) = (
        cloud_mock::Imds::start().await,
        cloud_mock::Imds::start().await,
    );
    let mut xcfg = cloud_config(&c.url, dx.path(), &ix, "machine-x");
    xcfg.max_concurrent_jobs = 2;
    xcfg.synthetic_step_ms = 20;
    let engine: Arc<dyn Engine> = Arc::new(FlakyEngine(SyntheticEngine { step_ms: 20 }));
    let x = CloudWorker::start("wx", xcfg, Some(engine)).await;
    wait_workers(&c.url, 1).await;
    let xr = &x;
    wait_until(
        10,
        "wx ready",
        move || async move { xr.ready().await.0 == 200 },
    )
    .await;
    // A long job, then two that fail on this node.
    let long = submit(
        &c.url,
        pb::JobSpec {
            steps: 100,
            ..spec("sd", 1)
        },
    )
    .await
    .id;
    wait_state(&c.url, &long, pb::JobState::Running, 10).await;
    let failing: Vec<String> = futures::future::join_all((2..4).map(|i| {
        let url = c.url.clone();
        async move {
            submit(
                &url,
                pb::JobSpec {
                    prompt: "this will fail here".into(),
                    ..spec("sd", i)
                },
            )
            .await
            .id
        }
    }))
    .await;
    // Judged bad after two failures: it drains, finishes the long job, says
    // GoingAway, asks IMDS to reallocate it, and exits.
    let mut x = x;
    let ended = tokio::time::timeout(Duration::from_secs(20), &mut x.task)
        .await
        .expect("the bad node exits");
    ended.unwrap().unwrap();
    let realloc = ix.accepted("POST", "/v1/reallocate");
    assert_eq!(realloc.len(), 1, "{:?}", ix.calls());
    assert!(realloc[0].body.contains("failures"), "{}", realloc[0].body);
    let done = wait_state(&c.url, &long, pb::JobState::Completed, 10).await;
    assert_eq!(
        done.worker_id, "wx",
        "the running job finished where it ran"
    );
    assert_eq!(
        c.metric("corral_cloud_bad_nodes_total{reason=\"failures\"}")
            .await,
        Some(1.0)
    );
    // The failing jobs move to a healthy node.
    let y = CloudWorker::start(
        "wy",
        cloud_config(&c.url, dy.path(), &iy, "machine-y"),
        None,
    )
    .await;
    for id in &failing {
        let j = wait_state(&c.url, id, pb::JobState::Completed, 20).await;
        assert_eq!(j.worker_id, "wy");
    }
    assert!(iy.accepted("POST", "/v1/reallocate").is_empty());
    assert_eq!(
        ix.accepted("POST", "/v1/reallocate").len(),
        1,
        "exactly once"
    );
    assert_eq!(
        c.metric("corral_cloud_bad_nodes_total{reason=\"failures\"}")
            .await,
        Some(1.0)
    );
    drop(x.http);
    y.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_whose_instance_is_gone_loses_its_jobs_before_the_timeout() {
    let api = cloud_mock::Api::start().await;
    // Z's machine runs its container; X's machine runs none (it died).
    api.set_instance("machine-z", "running");
    let cfg = CoordinatorConfig {
        heartbeat_interval_s: 0.2,
        // A 10-second timeout: only the API can explain an early removal.
        heartbeat_missed: 50,
        cloud: corral::cloud::CloudConfig {
            api: api.config(),
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    };
    let c = CoordHttp::start(cfg).await;
    let models = tmp();
    let m = make_model(models.path(), "sd");
    register(&c.url, &m).await;
    // Two raw workers that name their machine in Hello, take a job each,
    // and then fall silent.
    let z = raw_cloud_worker(&c.url, "wz", "machine-z").await;
    let mut z = z;
    let mut x = raw_cloud_worker(&c.url, "wx", "machine-x").await;
    let j1 = submit(&c.url, spec("sd", 1)).await.id;
    let j2 = submit(&c.url, spec("sd", 2)).await.id;
    let (az, ax) = (z.next_assign().await, x.next_assign().await);
    let x_job = ax.job_id.clone();
    assert!([&j1, &j2].contains(&&x_job) && az.job_id != x_job);
    // X is removed as soon as the API says its instance is gone. (The
    // worker list is a snapshot at most one tick old: see X listed first.)
    let url = c.url.as_str();
    wait_until(
        8,
        "wx listed",
        move || async move { listed(url, "wx").await },
    )
    .await;
    wait_until(
        8,
        "wx removed",
        move || async move { !listed(url, "wx").await },
    )
    .await;
    assert!(listed(&c.url, "wz").await, "Z stays: its instance runs");
    assert_eq!(c.metric("corral_workers_expired_total").await, Some(0.0));
    assert_eq!(
        c.metric("corral_cloud_workers_reassigned_total").await,
        Some(1.0)
    );
    assert!(
        c.metric("corral_cloud_instance_checks_total{result=\"gone\"}")
            .await
            >= Some(1.0)
    );
    // X's job runs again elsewhere, while Z (silent too) still holds its own.
    let d = tmp();
    let y = worker("wy", worker_config(&c.url, d.path())).await;
    let done = wait_state(&c.url, &x_job, pb::JobState::Completed, 10).await;
    assert_eq!(done.worker_id, "wy");
    assert!(
        listed(&c.url, "wz").await,
        "Z is still within its heartbeat timeout"
    );
    assert!(
        c.metric("corral_cloud_instance_checks_total{result=\"running\"}")
            .await
            >= Some(1.0),
        "Z was asked about and kept"
    );
    // The API was asked with the key, about the group and its instances.
    let calls = api.calls();
    assert!(calls.iter().all(|c| c.status == 200), "{calls:?}");
    assert!(calls
        .iter()
        .any(|c| c.path.ends_with("/containers/corral-workers")));
    assert!(calls
        .iter()
        .any(|c| c.path.ends_with("/containers/corral-workers/instances")));
    drop((x, z));
    y.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_workers_rise_and_fall_with_the_load_within_bounds() {
    let api = cloud_mock::Api::start().await;
    let mut cfg = fast_config();
    cfg.cloud.advice_interval_s = 0.05;
    cfg.cloud.min_workers = 1;
    cfg.cloud.max_workers = 4;
    cfg.cloud.scale_down_cooldown_s = 0.5;
    cfg.cloud.cold_start_s = 0.0;
    cfg.cloud.scale_target_drain_s = 1.0;
    cfg.cloud.default_job_s = 1.0;
    cfg.cloud.api = corral::cloud::SaladApiConfig {
        set_replicas: true,
        replicas_interval_s: 0.1,
        ..api.config()
    };
    let c = CoordHttp::start(cfg).await;
    let models = tmp();
    let m = make_model(models.path(), "sd");
    register(&c.url, &m).await;
    let mut seen = Vec::new();
    wait_desired(&c, 1.0, &mut seen).await;
    assert_eq!(seen, vec![1.0], "the minimum without load");
    // Twenty jobs and no worker: 20 x 1 s of queued work over 1 s wants 20
    // workers; the signal stops at the maximum.
    let ids: Vec<String> = futures::future::join_all((0..20).map(|i| {
        let url = c.url.clone();
        async move { submit(&url, spec("sd", i)).await.id }
    }))
    .await;
    wait_desired(&c, 4.0, &mut seen).await;
    let a = &api;
    wait_until(10, "the replica count set to 4", move || async move {
        a.replicas() == 4
    })
    .await;
    // Workers drain the queue; once the lower want has held for the
    // cooldown, the signal falls back to the minimum.
    let (d1, d2) = (tmp(), tmp());
    let w1 = worker("w1", worker_config(&c.url, d1.path())).await;
    let w2 = worker("w2", worker_config(&c.url, d2.path())).await;
    for id in &ids {
        wait_state(&c.url, id, pb::JobState::Completed, 30).await;
    }
    wait_desired(&c, 1.0, &mut seen).await;
    wait_until(10, "the replica count set to 1", move || async move {
        a.replicas() == 1
    })
    .await;
    assert!(seen.iter().all(|v| (1.0..=4.0).contains(v)), "{seen:?}");
    let patches = api.replica_patches();
    assert!(patches.iter().all(|n| (1..=4).contains(n)), "{patches:?}");
    // Up to the maximum under load, then down to the minimum; only changes
    // are sent.
    let up = patches.iter().position(|n| *n == 4).expect("set to 4");
    assert_eq!(patches[up + 1..].last(), Some(&1), "{patches:?}");
    assert!(patches.windows(2).all(|w| w[0] != w[1]), "{patches:?}");
    w1.stop().await;
    w2.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_connected() {
    // The coordinator's port is bound but not served yet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // One model baked into the "image".
    let (models, pre) = (tmp(), tmp());
    make_model(models.path(), "baked");
    copy_dir(&models.path().join("baked"), &pre.path().join("baked"));
    let d = tmp();
    let mut wcfg = worker_config(&url, d.path());
    wcfg.preloaded_dir = Some(pre.path().to_path_buf());
    let w = CloudWorker::start("wr", wcfg, None).await;
    let (status, why) = w.ready().await;
    assert_eq!(
        (status, why.trim()),
        (503, "not connected to the coordinator")
    );
    let data = tmp();
    let cfg = CoordinatorConfig {
        data_dir: data.path().to_path_buf(),
        auth: Some(corral::config::AuthConfig::disabled()),
        ..fast_config()
    };
    let (stop, rx) = oneshot::channel::<()>();
    let coord = tokio::spawn(corral::coordinator::run(listener, cfg, async move {
        let _ = rx.await;
    }));
    let wr = &w;
    wait_until(
        20,
        "ready",
        move || async move { wr.ready().await.0 == 200 },
    )
    .await;
    let (_, body) = w.ready().await;
    assert_eq!(body.trim(), "ready: connected, 1 preloaded models verified");
    assert_eq!(w.worker.readiness(), Ok(1));
    // The coordinator goes away: not ready until the worker reconnects.
    let _ = stop.send(());
    let _ = coord.await;
    wait_until(20, "not ready", move || async move {
        wr.ready().await == (503, "not connected to the coordinator\n".into())
    })
    .await;
    w.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
