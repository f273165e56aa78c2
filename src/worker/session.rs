//! The worker's session with the coordinator.
//!
//! Connects with exponential backoff and jitter (to the leader, when
//! `coordinator` names several coordinators: a follower's UNAVAILABLE
//! names the leader, which is tried next; any other failure moves on to
//! the next coordinator of the list), says Hello with its full
//! cache state (including attempts still running from before a drop),
//! heartbeats on the interval the coordinator sets, runs assigned jobs,
//! streams their progress, and returns results. Messages produced by jobs go
//! to an outbox that outlives any one stream, so a result finished while
//! the stream was down is delivered after the reconnect.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, info_span, warn, Instrument};

use super::cache::{CacheConfig, DiskCache};
use super::engine::{Engine, Job, LoadedModel};
use super::residency::Residency;
use crate::config::WorkerConfig;
use crate::convert;
use crate::error::{Error, Result};
use crate::pb;
use crate::pb::worker_message::Msg as Up;
use crate::types::*;

type Loaded = Arc<dyn LoadedModel>;

struct Running {
    attempt: u32,
    cancel: Arc<AtomicBool>,
}

/// A worker process's state, shared by its session and its job tasks.
pub struct Worker {
    cfg: WorkerConfig,
    id: WorkerId,
    cache: DiskCache,
    engine: Arc<dyn Engine>,
    resident: Residency<Loaded>,
    running: Mutex<BTreeMap<JobId, Running>>,
    draining: AtomicBool,
    outbox: mpsc::UnboundedSender<Up>,
    /// The largest message the coordinator takes (its Welcome says).
    max_message_bytes: std::sync::atomic::AtomicU64,
    metrics: crate::metrics::WorkerMetrics,
}

impl Worker {
    /// Opens the cache (sweeping and re-verifying what is on disk).
    pub async fn new(
        cfg: WorkerConfig,
        id: WorkerId,
        engine: Arc<dyn Engine>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Up>)> {
        cfg.validate()?;
        let cache = DiskCache::open(CacheConfig {
            dir: cfg.cache_dir.clone(),
            max_bytes: cfg.cache_max_bytes,
            preloaded_dir: cfg.preloaded_dir.clone(),
            max_concurrent_downloads: cfg.max_concurrent_downloads,
        })
        .await?;
        let (outbox, rx) = mpsc::unbounded_channel();
        let resident = Residency::new(cfg.vram_budget(), cfg.max_loaded_models);
        let worker = Arc::new_cyclic(|me| {
            let metrics = crate::metrics::WorkerMetrics::new();
            metrics.add_collector(Box::new(super::http::Gauges(me.clone())));
            Self {
                cfg,
                id,
                cache,
                engine,
                resident,
                running: Mutex::new(BTreeMap::new()),
                draining: AtomicBool::new(false),
                outbox,
                max_message_bytes: std::sync::atomic::AtomicU64::new(64 << 20),
                metrics,
            }
        });
        Ok((worker, rx))
    }

    pub fn id(&self) -> &WorkerId {
        &self.id
    }

    /// This worker's counters and histograms.
    pub fn metrics(&self) -> &crate::metrics::WorkerMetrics {
        &self.metrics
    }

    /// The disk cache, for its counters on `/metrics`.
    pub fn cache(&self) -> &DiskCache {
        &self.cache
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The full cache state, as sent in Hello and every heartbeat.
    pub fn report(&self) -> CacheReport {
        let snap = self.cache.report();
        CacheReport {
            vram_models: self.resident.resident(),
            disk_models: snap.disk_models,
            downloads: snap.downloads,
            free_disk_bytes: snap.free_bytes,
            running_jobs: self
                .running()
                .iter()
                .map(|(j, r)| RunningJob {
                    job_id: j.clone(),
                    attempt: r.attempt,
                })
                .collect(),
            download_bps: snap.download_bps,
            draining: self.draining.load(Ordering::SeqCst),
        }
    }

    fn hello(&self) -> WorkerHello {
        WorkerHello {
            worker_id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            gpu_name: match self.cfg.device {
                crate::config::DeviceKind::Cpu => "cpu".into(),
                crate::config::DeviceKind::Cuda => format!("cuda:{}", self.cfg.device_id),
            },
            vram_bytes: self.cfg.vram_budget(),
            cache_max_bytes: self.cfg.cache_max_bytes,
            max_concurrent_jobs: self.cfg.max_concurrent_jobs,
            state: self.report(),
        }
    }

    fn send(&self, msg: Up) {
        // The receiver lives as long as the session; after it, nobody listens.
        let _ = self.outbox.send(msg);
    }

    fn on_message(self: &Arc<Self>, msg: pb::coordinator_message::Msg) -> Result<()> {
        use pb::coordinator_message::Msg;
        match msg {
            Msg::Welcome(_) => Err(Error::invalid("msg", "Welcome sent twice")),
            Msg::Assign(a) => {
                let job = convert::job_id(a.job_id)?;
                let spec = convert::required_spec(a.spec)?;
                let model = convert::required_model(a.model)?;
                let extras = a
                    .extra_models
                    .into_iter()
                    .map(ModelManifest::try_from)
                    .collect::<Result<Vec<_>>>()?;
                if extras.iter().map(|m| &m.id).ne(spec.extra_models().iter()) {
                    return Err(Error::invalid(
                        "extra_models",
                        "must be the spec's LoRAs, VAE and upscaler, in that order",
                    ));
                }
                if self.draining.load(Ordering::SeqCst) {
                    warn!(job_id = %job, "assigned while draining; running it anyway");
                }
                let cancel = Arc::new(AtomicBool::new(false));
                self.running().insert(
                    job.clone(),
                    Running {
                        attempt: a.attempt,
                        cancel: cancel.clone(),
                    },
                );
                let span = info_span!("job", job_id = %job, attempt = a.attempt);
                let me = self.clone();
                let queued_s = a.queued_s;
                tokio::spawn(
                    async move {
                        me.run_job(job, a.attempt, spec, model, extras, queued_s, cancel)
                            .await
                    }
                    .instrument(span),
                );
                Ok(())
            }
            Msg::Cancel(c) => {
                let job = convert::job_id(c.job_id)?;
                if let Some(r) = self.running().get(&job) {
                    if r.attempt == c.attempt {
                        info!(job_id = %job, "cancel requested");
                        r.cancel.store(true, Ordering::SeqCst);
                    }
                }
                Ok(())
            }
            Msg::Prefetch(p) => {
                let cap = super::cache::MAX_QUEUED_PREFETCHES;
                if p.models.len() > cap {
                    return Err(Error::invalid(
                        "prefetch",
                        format!("{} models in one Prefetch, more than {cap}", p.models.len()),
                    ));
                }
                for m in p.models {
                    let m = ModelManifest::try_from(m)?;
                    let me = self.clone();
                    tokio::spawn(
                        async move {
                            let id = m.id.clone();
                            let res = me.cache.prefetch(m).await;
                            let err = match res {
                                Ok(Ok(())) => {
                                    info!("prefetched");
                                    return me.send(Up::Heartbeat((&me.report()).into()));
                                }
                                Ok(Err(e)) => e.to_string(),
                                Err(e) => format!("prefetch task failed: {e}"),
                            };
                            warn!(error = %err, "prefetch dropped");
                            me.send(Up::PrefetchFailed(pb::PrefetchFailed {
                                model_id: id.0,
                                reason: err,
                            }));
                        }
                        .instrument(info_span!("prefetch")),
                    );
                }
                Ok(())
            }
            Msg::Drain(_) => {
                info!("drain requested: finishing running jobs, taking no more");
                self.draining.store(true, Ordering::SeqCst);
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_job(
        self: Arc<Self>,
        job: JobId,
        attempt: u32,
        spec: JobSpec,
        model: ModelManifest,
        extras: Vec<ModelManifest>,
        queued_s: f64,
        cancel: Arc<AtomicBool>,
    ) {
        let outcome = self
            .execute(&job, attempt, &spec, &model, &extras, queued_s, &cancel)
            .await;
        // A new assignment of this job may have replaced this run (a
        // coordinator that restarted before recording an assignment can
        // cancel and assign the same attempt number again): then this run's
        // outcome is not the job's, and must neither end the new run nor be
        // reported under its attempt number.
        let ours = {
            let mut running = self.running();
            let ours = running
                .get(&job)
                .is_some_and(|r| Arc::ptr_eq(&r.cancel, &cancel));
            if ours {
                running.remove(&job);
            }
            ours
        };
        if !ours {
            info!("superseded by a newer assignment of this job; outcome dropped");
            return;
        }
        // A result the coordinator would refuse is a failure that says why.
        let limit = self.max_message_bytes.load(Ordering::Relaxed);
        let outcome = outcome.and_then(|(images, timings)| {
            let bytes: u64 = images.iter().map(|i| i.len() as u64).sum();
            // Room for the rest of the message.
            if bytes + (64 << 10) > limit {
                return Err((
                    FailureKind::Result,
                    Error::invalid(
                        "result",
                        format!(
                            "the images are {bytes} bytes, more than the coordinator's \
                             max_message_bytes ({limit}) allows"
                        ),
                    ),
                ));
            }
            Ok((images, timings))
        });
        match outcome {
            Ok((images, timings)) => {
                info!(
                    tier = timings.tier.map_or("?", |t| t.as_str()),
                    inference_s = timings.inference_s,
                    "done"
                );
                self.metrics.job_done(&timings);
                self.send(Up::Result(pb::JobResult {
                    job_id: job.0,
                    attempt,
                    images: images.into_iter().map(bytes::Bytes::from).collect(),
                    timings: Some(timings.into()),
                }));
            }
            Err((kind, e)) => {
                let cancelled = cancel.load(Ordering::SeqCst);
                let kind = if cancelled {
                    FailureKind::Cancelled
                } else {
                    kind
                };
                let retryable = !cancelled && e.is_retryable();
                warn!(error = %e, retryable, kind = kind.as_str(), "job failed");
                self.metrics.job_failed(kind);
                self.send(Up::Failed(pb::JobFailed {
                    job_id: job.0,
                    attempt,
                    reason: if cancelled {
                        "cancelled".into()
                    } else {
                        e.to_string()
                    },
                    retryable,
                    kind: convert::failure_kind_to_pb(kind) as i32,
                }));
            }
        }
        // The cache and VRAM may have changed: tell the scheduler now
        // rather than at the next interval.
        self.send(Up::Heartbeat((&self.report()).into()));
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        self: &Arc<Self>,
        job: &JobId,
        attempt: u32,
        spec: &JobSpec,
        model: &ModelManifest,
        extras: &[ModelManifest],
        queued_s: f64,
        cancel: &Arc<AtomicBool>,
    ) -> std::result::Result<(Vec<Vec<u8>>, Timings), (FailureKind, Error)> {
        let download = |e: Error| (FailureKind::Download, e);
        let load = |e: Error| (FailureKind::Load, e);
        let generating = |e: Error| (FailureKind::Inference, e);
        let mut t = Timings {
            queue_s: queued_s,
            ..Default::default()
        };
        // 1. The files, from the cache or downloaded now.
        let started = Instant::now();
        let last_pct = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let progress = {
            let me = self.clone();
            let job = job.clone();
            move |done: u64, total: u64| {
                let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
                if last_pct.swap(pct, Ordering::Relaxed) != pct {
                    me.send(Up::Progress(convert::job_progress(
                        &job,
                        attempt,
                        JobPhase::Downloading {
                            bytes_done: done,
                            bytes_total: total,
                        },
                    )));
                }
            }
        };
        // The checkpoint and every other bundle the job names, pinned
        // together (all or nothing).
        let bundles: Vec<ModelManifest> = std::iter::once(model.clone())
            .chain(extras.iter().cloned())
            .collect();
        let mut fetched = self.cache.ensure_all(&bundles, &progress).await;
        // Models idle in VRAM pin their files on disk: unload them, least
        // recently used first, until the downloads fit.
        let mut idle: Vec<ModelId> = self.resident.resident();
        while matches!(fetched, Err(Error::ResourceExhausted(_))) {
            let Some(victim) = idle.pop() else { break };
            if self.resident.evict(&victim) {
                info!(model_id = %victim, "unloaded an idle model to free disk for a download");
                fetched = self.cache.ensure_all(&bundles, &progress).await;
            }
        }
        let mut fetched = fetched.map_err(download)?.into_iter();
        let (guard, tier) = fetched
            .next()
            .ok_or_else(|| download(Error::Internal("no bundle returned".into())))?;
        // The extras stay pinned (their guards held) until generation ends.
        let mut downloaded = tier == CacheTier::Download;
        let mut extra_guards = Vec::with_capacity(extras.len());
        let mut extra_dirs = Vec::with_capacity(extras.len());
        for (m, (g, t)) in extras.iter().zip(fetched) {
            downloaded |= t == CacheTier::Download;
            extra_dirs.push((m.clone(), g.path().to_path_buf()));
            extra_guards.push(g);
        }
        if downloaded {
            t.download_s = started.elapsed().as_secs_f64();
        }
        if cancel.load(Ordering::SeqCst) {
            return Err((FailureKind::Cancelled, super::engine::cancelled()));
        }
        // 2. The model in memory, loaded once and kept.
        let loading = Instant::now();
        let me = self.clone();
        let job2 = job.clone();
        let manifest = model.clone();
        let (loaded, was_resident) = tokio::task::spawn_blocking(move || {
            let dir = guard.path().to_path_buf();
            let bytes = manifest.total_bytes();
            me.resident
                .get_or_load(&manifest.id, bytes, Some(guard), || {
                    me.send(Up::Progress(convert::job_progress(
                        &job2,
                        attempt,
                        JobPhase::Loading,
                    )));
                    me.engine.load(&manifest, &dir)
                })
        })
        .await
        .map_err(|e| load(Error::Internal(format!("load task: {e}"))))?
        .map_err(load)?;
        let loaded: Loaded = loaded.as_ref().clone();
        t.load_s = if was_resident {
            0.0
        } else {
            loading.elapsed().as_secs_f64()
        };
        t.tier = Some(if was_resident { CacheTier::Vram } else { tier });
        // 3. Generation, off the async runtime.
        let inference = Instant::now();
        let me = self.clone();
        let job2 = job.clone();
        let cancel2 = cancel.clone();
        let spec2 = spec.clone();
        let out = tokio::task::spawn_blocking(move || {
            let job = Job {
                spec: &spec2,
                extras: &extra_dirs,
            };
            let out = loaded.generate(&job, &mut |step, total| {
                me.send(Up::Progress(convert::job_progress(
                    &job2,
                    attempt,
                    JobPhase::Denoising {
                        step,
                        total_steps: total,
                    },
                )));
                !cancel2.load(Ordering::SeqCst)
            });
            drop(extra_guards);
            out
        })
        .await
        .map_err(|e| generating(Error::Internal(format!("generate task: {e}"))))?
        .map_err(generating)?;
        t.inference_s = inference.elapsed().as_secs_f64();
        t.lora_s = out.lora_s;
        t.upscale_s = out.upscale_s;
        Ok((out.images, t))
    }
}

/// Backoff between connection attempts: exponential with full jitter.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(7)).min(10_000);
    Duration::from_millis(rand::thread_rng().gen_range(cap_ms / 2..=cap_ms))
}

/// Where the next connection goes: the leader a follower named, else the
/// coordinators of the list in turn (re-resolved on each round).
struct Targets {
    spec: String,
    list: Vec<crate::auth::Target>,
    next: usize,
    hint: Option<crate::auth::Target>,
}

impl Targets {
    fn new(spec: &str) -> Self {
        Self {
            spec: spec.to_owned(),
            list: Vec::new(),
            next: 0,
            hint: None,
        }
    }

    async fn pick(&mut self) -> crate::auth::Target {
        if let Some(h) = self.hint.take() {
            return h;
        }
        if self.next == 0 || self.list.is_empty() {
            self.list = crate::auth::targets(&self.spec).await;
            if self.list.is_empty() {
                self.list = vec![crate::auth::Target::url(self.spec.clone())];
            }
        }
        let t = self.list[self.next % self.list.len()].clone();
        self.next = (self.next + 1) % self.list.len();
        t
    }

    /// After a dropped stream: the same coordinator again when it is the
    /// only one (it may come back); else the next one, which either leads
    /// now or names the leader (perhaps the same one again).
    fn dropped(&mut self, t: crate::auth::Target) {
        if self.list.len() <= 1 {
            self.hint = Some(t);
        }
    }

    fn follow(&mut self, url: String) {
        self.hint = Some(crate::auth::Target::url(url));
    }
}

/// Runs the worker until `shutdown` resolves; then finishes running jobs
/// (up to `shutdown_grace_s`), hands back the rest and says GoingAway.
pub async fn run(
    worker: Arc<Worker>,
    mut outbox: mpsc::UnboundedReceiver<Up>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut shutdown = Box::pin(shutdown);
    let mut failures = 0u32;
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    let mut targets = Targets::new(&worker.cfg.coordinator);
    loop {
        let target = targets.pick().await;
        let session = connect_once(
            &worker,
            &target,
            &mut outbox,
            &mut shutdown,
            &mut stop_deadline,
        );
        match session.await {
            Ok(SessionEnd::Finished) => return Ok(()),
            Ok(SessionEnd::Dropped(why)) => {
                warn!(reason = %why, "stream to coordinator dropped; reconnecting");
                failures = 1;
                targets.dropped(target);
            }
            Ok(SessionEnd::Redirect(leader)) => {
                info!(from = %target.url, to = %leader, "not the leader; following it");
                // A follower may name a leader that just died: retry
                // briskly, but not in a tight loop.
                failures = failures.min(3);
                targets.follow(leader);
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, failures, "cannot reach the coordinator");
            }
        }
        if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            warn!("shutting down without a coordinator to hand jobs back to");
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(failures)) => {}
            _ = &mut shutdown, if stop_deadline.is_none() => {
                start_draining(&worker, &mut stop_deadline);
            }
        }
    }
}

enum SessionEnd {
    Finished,
    Dropped(String),
    /// A coordinator that does not lead named the one that does.
    Redirect(String),
}

fn start_draining(worker: &Worker, deadline: &mut Option<tokio::time::Instant>) {
    info!(
        running = worker.running().len(),
        grace_s = worker.cfg.shutdown_grace_s,
        "shutting down: finishing running jobs"
    );
    worker.draining.store(true, Ordering::SeqCst);
    *deadline =
        Some(tokio::time::Instant::now() + Duration::from_secs(worker.cfg.shutdown_grace_s));
}

async fn connect_once(
    worker: &Arc<Worker>,
    target: &crate::auth::Target,
    outbox: &mut mpsc::UnboundedReceiver<Up>,
    shutdown: &mut std::pin::Pin<Box<impl Future<Output = ()>>>,
    stop_deadline: &mut Option<tokio::time::Instant>,
) -> Result<SessionEnd> {
    let url = target.url.clone();
    // Keepalive pings find a coordinator that stopped answering (a frozen
    // or partitioned leader, a dead host) within six seconds, about when a
    // follower takes over its lease, so that the worker moves to it.
    let endpoint = crate::auth::target_endpoint(target, worker.cfg.ca_cert.as_deref())?
        .http2_keep_alive_interval(Duration::from_secs(3))
        .keep_alive_timeout(Duration::from_secs(3));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("connect to {url}: {e}")))?;
    let token = crate::auth::BearerToken::new(worker.cfg.token.as_ref())?;
    let mut client = pb::workers_client::WorkersClient::with_interceptor(channel, token)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(1024);
    let up = |m: Up| pb::WorkerMessage { msg: Some(m) };
    tx.send(up(Up::Hello((&worker.hello()).into())))
        .await
        .map_err(|_| Error::Internal("fresh channel closed".into()))?;
    // A coordinator that accepts the connection but never answers (a
    // paused process) must not hold the worker.
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        client.connect(ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| Error::Unavailable(format!("Connect to {url}: no answer in 10 s")))?;
    let mut inbound = match connected {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if let Some(leader) = crate::auth::leader_hint(&s).filter(|l| l != &url) {
                return Ok(SessionEnd::Redirect(leader));
            }
            return Err(Error::Unavailable(format!(
                "Connect to {url}: {}",
                s.message()
            )));
        }
    };
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .map_err(|_| Error::Unavailable(format!("Connect to {url}: no Welcome in 10 s")))?;
    let welcome = match first {
        Ok(Some(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Welcome(w)),
        })) => w,
        Ok(other) => {
            return Err(Error::Unavailable(format!(
                "expected Welcome, got {other:?}"
            )))
        }
        Err(s) => {
            if let Some(leader) = crate::auth::leader_hint(&s).filter(|l| l != &url) {
                return Ok(SessionEnd::Redirect(leader));
            }
            return Err(Error::Unavailable(format!(
                "Connect to {url}: {}",
                s.message()
            )));
        }
    };
    info!(coordinator = %url, heartbeat_ms = welcome.heartbeat_interval_ms, "connected");
    if welcome.max_message_bytes > 0 {
        worker
            .max_message_bytes
            .store(welcome.max_message_bytes, Ordering::Relaxed);
    }
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(welcome.heartbeat_interval_ms.max(50)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut *shutdown, if stop_deadline.is_none() => {
                start_draining(worker, stop_deadline);
                // Tell the coordinator at once to assign nothing more.
                let _ = tx.send(up(Up::Heartbeat((&worker.report()).into()))).await;
            }
            _ = heartbeat.tick() => {
                if tx.send(up(Up::Heartbeat((&worker.report()).into()))).await.is_err() {
                    return Ok(SessionEnd::Dropped("outbound stream closed".into()));
                }
            }
            Some(m) = outbox.recv() => {
                if tx.send(up(m)).await.is_err() {
                    return Ok(SessionEnd::Dropped("outbound stream closed".into()));
                }
            }
            m = inbound.message() => match m {
                Ok(Some(pb::CoordinatorMessage { msg: Some(msg) })) => {
                    if let Err(e) = worker.on_message(msg) {
                        warn!(error = %e, "coordinator message ignored");
                    }
                }
                Ok(Some(_)) => warn!("empty message from coordinator ignored"),
                Ok(None) => return Ok(SessionEnd::Dropped("coordinator closed the stream".into())),
                Err(s) => return Ok(SessionEnd::Dropped(s.message().to_string())),
            },
            _ = check.tick(), if stop_deadline.is_some() => {
                let idle = worker.running().is_empty();
                let late = stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                if idle || late {
                    // Flush what jobs produced, then hand back the rest.
                    while let Ok(m) = outbox.try_recv() {
                        let _ = tx.send(up(m)).await;
                    }
                    for r in worker.running().values() {
                        r.cancel.store(true, Ordering::SeqCst);
                    }
                    let reason = if idle { "shutdown" } else { "shutdown grace period over" };
                    let _ = tx.send(up(Up::GoingAway(pb::GoingAway { reason: reason.into() }))).await;
                    drop(tx);
                    // Wait for the coordinator to close its side, briefly.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    info!(reason, "said GoingAway");
                    return Ok(SessionEnd::Finished);
                }
            }
        }
    }
}
