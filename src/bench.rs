//! `corral bench`: load on the control plane over real gRPC on loopback.
//!
//! Starts a coordinator in this process, N workers whose engine returns a
//! fixed payload at once (a child process by default, so that this
//! process's CPU and memory are the coordinator's and the clients'), a
//! tiny model every worker holds preloaded, and K clients submitting M
//! jobs. Figures come from the coordinator's own metrics
//! ([`crate::metrics::coord`]): completions, accept-to-assign latency and
//! worker-stream messages; CPU and memory from `/proc`.
//!
//! `--idle` connects the workers and measures the coordinator at rest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{oneshot, watch, Semaphore};

use crate::config::{CoordinatorConfig, EngineKind, WorkerConfig};
use crate::error::{Error, Result};
use crate::metrics::{self, Histogram};
use crate::pb;
use crate::types::{JobSpec, ModelId, ModelManifest};
use crate::worker::engine::{Engine, LoadedModel};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workers to connect.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Jobs to submit.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: u64,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Job slots per worker.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Submissions per second across all clients; 0: as fast as the
    /// in-flight window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Jobs submitted but not completed at most (0: 2 x workers x slots).
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_interval_s: f64,
    /// Bytes of the image each job returns.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Denoising steps per job (one progress message each).
    #[arg(long, default_value_t = 1)]
    pub steps: u32,
    /// Connect the workers, submit nothing, and measure for --idle-s.
    #[arg(long)]
    pub idle: bool,
    /// How long to measure in --idle mode (0: three heartbeat intervals).
    #[arg(long, default_value_t = 0.0)]
    pub idle_s: f64,
    /// Run the workers in this process instead of a child process.
    #[arg(long)]
    pub inline: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Internal: be the worker fleet for the coordinator at this URL.
    #[arg(long, hide = true)]
    pub fleet_of: Option<String>,
    /// Internal: the fleet's preloaded directory.
    #[arg(long, hide = true)]
    pub fleet_preloaded: Option<PathBuf>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        Self {
            workers: 1000,
            jobs: 100_000,
            clients: 32,
            slots: 1,
            rate: 0.0,
            window: 0,
            heartbeat_interval_s: 5.0,
            payload_bytes: 1024,
            steps: 1,
            idle: false,
            idle_s: 0.0,
            inline: true,
            format: Format::Table,
            fleet_of: None,
            fleet_preloaded: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub mode: &'static str,
    pub fleet: &'static str,
    pub workers: usize,
    pub slots: u32,
    pub jobs: u64,
    pub clients: usize,
    pub rate: f64,
    pub payload_bytes: usize,
    pub elapsed_s: f64,
    pub jobs_completed: u64,
    pub jobs_per_s: f64,
    pub assign_p50_ms: Option<f64>,
    pub assign_p99_ms: Option<f64>,
    pub assign_p999_ms: Option<f64>,
    /// Worker-stream messages (both ways) per second.
    pub messages_per_s: f64,
    /// CPU of this process (coordinator and clients; workers too when inline), in cores.
    pub coordinator_cpu_cores: f64,
    /// CPU of the worker fleet's process, in cores (None when inline).
    pub fleet_cpu_cores: Option<f64>,
    /// VmHWM of this process, MiB.
    pub peak_rss_mib: f64,
    /// VmRSS of this process at the end, MiB.
    pub rss_mib: f64,
    pub fleet_peak_rss_mib: Option<f64>,
}

/// The CLI entry: the fleet role or the benchmark, printed.
pub async fn run_cli(args: BenchArgs) -> Result<()> {
    if let Some(url) = args.fleet_of.clone() {
        return fleet_main(&args, &url).await;
    }
    let format = args.format;
    let report = run(args).await?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?
        ),
        Format::Table => print_table(&report),
    }
    Ok(())
}

fn print_table(r: &BenchReport) {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3} ms"));
    println!(
        "mode {} | {} workers x {} slots ({} fleet) | {} jobs from {} clients{} | payload {} B",
        r.mode,
        r.workers,
        r.slots,
        r.fleet,
        r.jobs,
        r.clients,
        if r.rate > 0.0 {
            format!(" at {:.0}/s", r.rate)
        } else {
            String::new()
        },
        r.payload_bytes
    );
    println!("  elapsed                 {:.2} s", r.elapsed_s);
    println!("  jobs completed          {}", r.jobs_completed);
    println!("  jobs/s end to end       {:.0}", r.jobs_per_s);
    println!(
        "  submit->assign p50/p99/p999  {} / {} / {}",
        ms(r.assign_p50_ms),
        ms(r.assign_p99_ms),
        ms(r.assign_p999_ms)
    );
    println!("  worker messages/s       {:.0}", r.messages_per_s);
    println!(
        "  CPU (this process)      {:.2} cores{}",
        r.coordinator_cpu_cores,
        if r.fleet == "inline" {
            " (includes the workers)"
        } else {
            " (coordinator + clients)"
        }
    );
    if let Some(c) = r.fleet_cpu_cores {
        println!("  CPU (worker fleet)      {c:.2} cores");
    }
    println!(
        "  memory (this process)   peak {:.1} MiB, now {:.1} MiB",
        r.peak_rss_mib, r.rss_mib
    );
    if let Some(m) = r.fleet_peak_rss_mib {
        println!("  memory (worker fleet)   peak {m:.1} MiB");
    }
}

// ---- the engine -------------------------------------------------------------

/// Returns `payload` at once: the control plane's cost alone.
struct PayloadEngine {
    payload: Arc<Vec<u8>>,
}

struct PayloadModel {
    payload: Arc<Vec<u8>>,
}

impl Engine for PayloadEngine {
    fn name(&self) -> &'static str {
        "bench"
    }
    fn load(&self, _m: &ModelManifest, _dir: &Path) -> Result<Arc<dyn LoadedModel>> {
        Ok(Arc::new(PayloadModel {
            payload: self.payload.clone(),
        }))
    }
}

impl LoadedModel for PayloadModel {
    fn resident_bytes(&self) -> u64 {
        1
    }
    fn generate(
        &self,
        spec: &JobSpec,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<Vec<u8>>> {
        for step in 1..=spec.steps {
            if !on_step(step, spec.steps) {
                return Err(crate::worker::engine::cancelled());
            }
        }
        Ok((0..spec.num_images)
            .map(|_| self.payload.as_ref().clone())
            .collect())
    }
}

// ---- the fleet --------------------------------------------------------------

/// A scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("corral-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        Ok(Self(p))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MODEL: &str = "bench-model";

/// Writes the tiny bundle into `dir/MODEL`; returns `dir` (the preloaded dir).
fn write_bundle(dir: &Path) -> Result<PathBuf> {
    let root = dir.join(MODEL);
    std::fs::create_dir_all(root.join("unet")).map_err(|e| Error::io(&root, e))?;
    for (p, bytes) in [
        ("model_index.json", b"{\"name\":\"bench\"}".to_vec()),
        ("unet/model.onnx", vec![7u8; 4096]),
    ] {
        let path = root.join(p);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(dir.to_path_buf())
}

/// Starts `n` workers for `url`; they stop when `stop` changes.
async fn spawn_workers(
    url: &str,
    n: usize,
    slots: u32,
    payload_bytes: usize,
    preloaded: &Path,
    scratch: &Path,
    stop: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<Result<()>>>> {
    // The PNG signature, then filler: the coordinator checks results are PNGs.
    let mut payload: Vec<u8> = b"\x89PNG\r\n\x1a\n".to_vec();
    payload.extend((8..payload_bytes.max(8)).map(|i| i as u8));
    let payload = Arc::new(payload);
    let engine: Arc<dyn Engine> = Arc::new(PayloadEngine { payload });
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = WorkerConfig {
            coordinator: url.to_owned(),
            cache_dir: scratch.join(format!("w{i}")),
            cache_max_bytes: 1 << 30,
            preloaded_dir: Some(preloaded.to_path_buf()),
            max_concurrent_jobs: slots,
            engine: EngineKind::Synthetic,
            shutdown_grace_s: 5,
            ..WorkerConfig::default()
        };
        let id = crate::types::WorkerId(format!("bench-w{i:05}"));
        let (w, outbox) = crate::worker::Worker::new(cfg, id, engine.clone()).await?;
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(crate::worker::run(w, outbox, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    Ok(tasks)
}

/// The child process: workers until stdin closes.
async fn fleet_main(args: &BenchArgs, url: &str) -> Result<()> {
    let scratch = Scratch::new("fleet")?;
    let preloaded = args
        .fleet_preloaded
        .clone()
        .ok_or_else(|| Error::Config("--fleet-preloaded is required with --fleet-of".into()))?;
    let (stop, rx) = watch::channel(false);
    let tasks = spawn_workers(
        url,
        args.workers,
        args.slots,
        args.payload_bytes,
        &preloaded,
        scratch.path(),
        rx,
    )
    .await?;
    println!("ready");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {}
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

enum Fleet {
    Inline {
        stop: watch::Sender<bool>,
        tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    },
    Process(tokio::process::Child),
}

impl Fleet {
    fn pid(&self) -> Option<u32> {
        match self {
            Fleet::Process(c) => c.id(),
            Fleet::Inline { .. } => None,
        }
    }

    async fn stop(self) {
        match self {
            Fleet::Inline { stop, tasks } => {
                let _ = stop.send(true);
                for t in tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
                }
            }
            Fleet::Process(mut child) => {
                // Closing its stdin asks it to stop; then it is killed if slow.
                drop(child.stdin.take());
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

// ---- process figures ----------------------------------------------------------

/// CPU seconds (user + system) of a process from /proc.
fn cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// A `Vm*` line of /proc/PID/status, in MiB.
fn vm_mib(pid: Option<u32>, key: &str) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

// ---- the benchmark ------------------------------------------------------------

async fn connected_workers(url: &str) -> Result<u32> {
    let mut admin = crate::client::admin_client(&crate::client::ClientArgs::local(url)).await?;
    Ok(admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(Error::from)?
        .into_inner()
        .workers)
}

/// Runs the benchmark and returns its figures.
pub async fn run(args: BenchArgs) -> Result<BenchReport> {
    if args.workers == 0 || args.clients == 0 || args.slots == 0 {
        return Err(Error::Config(
            "--workers, --clients and --slots must be at least 1".into(),
        ));
    }
    let scratch = Scratch::new("bench")?;
    let preloaded = write_bundle(&scratch.path().join("preloaded"))?;

    // The coordinator.
    let cfg = CoordinatorConfig {
        data_dir: scratch.path().join("data"),
        heartbeat_interval_s: args.heartbeat_interval_s,
        limits: crate::config::JobLimits {
            max_unfinished_jobs: (args.jobs as usize).max(100_000),
            max_unfinished_jobs_per_client: (args.jobs as usize).max(100_000),
            ..Default::default()
        },
        // Loopback only: measure the control plane, not token checks.
        auth: Some(crate::config::AuthConfig::disabled()),
        ..CoordinatorConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("127.0.0.1:0", e))?;
    let url = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| Error::io("listener", e))?
    );
    let (stop_coord, stopped) = oneshot::channel::<()>();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| Error::io(&cfg.data_dir, e))?;
    let services = crate::coordinator::Services::open(cfg, Arc::new(crate::clock::SystemClock))?;
    let coordinator = services.coordinator.clone();
    let coord_task = tokio::spawn(crate::coordinator::serve(
        services,
        listener,
        None,
        async move {
            let _ = stopped.await;
        },
    ));

    let manifest = crate::manifest::manifest_from_source(
        &ModelId(MODEL.into()),
        &format!("file://{}", preloaded.join(MODEL).display()),
    )
    .await?;
    crate::client::admin_client(&crate::client::ClientArgs::local(&url))
        .await?
        .register_model(pb::RegisterModelRequest {
            model: Some(manifest.into()),
        })
        .await
        .map_err(Error::from)?;

    // The workers.
    let fleet = if args.inline {
        let (stop, rx) = watch::channel(false);
        let tasks = spawn_workers(
            &url,
            args.workers,
            args.slots,
            args.payload_bytes,
            &preloaded,
            &scratch.path().join("workers"),
            rx,
        )
        .await?;
        Fleet::Inline { stop, tasks }
    } else {
        let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
        let mut child = tokio::process::Command::new(exe)
            .args(["bench", "--fleet-of", &url, "--fleet-preloaded"])
            .arg(&preloaded)
            .args(["--workers", &args.workers.to_string()])
            .args(["--slots", &args.slots.to_string()])
            .args(["--payload-bytes", &args.payload_bytes.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io("spawning the worker fleet", e))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| Error::Internal("fleet stdout".into()))?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        match lines.next_line().await {
            Ok(Some(l)) if l == "ready" => {}
            other => {
                return Err(Error::Internal(format!(
                    "worker fleet did not start: {other:?}"
                )))
            }
        }
        Fleet::Process(child)
    };
    let deadline = Instant::now() + Duration::from_secs(120 + args.workers as u64 / 50);
    loop {
        let n = connected_workers(&url).await.unwrap_or(0) as usize;
        if n >= args.workers {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "only {n} of {} workers connected",
                args.workers
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let m = coordinator.metrics().clone();
    let fleet_pid = fleet.pid();
    let (done0, msgs0, assign0) = (
        m.jobs_completed.get(),
        m.messages_received.get() + m.messages_sent.get(),
        m.assign_latency.snapshot(),
    );
    let fleet_cpu = || fleet_pid.and_then(|p| cpu_s(Some(p)));
    let (cpu0, fcpu0) = (cpu_s(None), fleet_cpu());
    let t0 = Instant::now();

    if args.idle {
        let secs = if args.idle_s > 0.0 {
            args.idle_s
        } else {
            3.0 * args.heartbeat_interval_s
        };
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    } else {
        submit_all(&url, &args, &m, done0).await?;
    }

    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, fcpu1) = (cpu_s(None), fleet_cpu());
    let completed = m.jobs_completed.get() - done0;
    let msgs = m.messages_received.get() + m.messages_sent.get() - msgs0;
    let assign: Vec<u64> = m
        .assign_latency
        .snapshot()
        .iter()
        .zip(&assign0)
        .map(|(b, a)| b - a)
        .collect();
    let q = |q| Histogram::quantile_of(metrics::ASSIGN_BUCKETS_S, &assign, q).map(|s| s * 1000.0);
    let report = BenchReport {
        mode: if args.idle { "idle" } else { "load" },
        fleet: if args.inline { "inline" } else { "process" },
        workers: args.workers,
        slots: args.slots,
        jobs: if args.idle { 0 } else { args.jobs },
        clients: args.clients,
        rate: args.rate,
        payload_bytes: args.payload_bytes,
        elapsed_s: elapsed,
        jobs_completed: completed,
        jobs_per_s: completed as f64 / elapsed,
        assign_p50_ms: q(0.5),
        assign_p99_ms: q(0.99),
        assign_p999_ms: q(0.999),
        messages_per_s: msgs as f64 / elapsed,
        coordinator_cpu_cores: cpu0.zip(cpu1).map_or(0.0, |(a, b)| (b - a) / elapsed),
        fleet_cpu_cores: fcpu0.zip(fcpu1).map(|(a, b)| (b - a) / elapsed),
        peak_rss_mib: vm_mib(None, "VmHWM:").unwrap_or(0.0),
        rss_mib: vm_mib(None, "VmRSS:").unwrap_or(0.0),
        fleet_peak_rss_mib: fleet_pid.and_then(|p| vm_mib(Some(p), "VmHWM:")),
    };

    fleet.stop().await;
    let _ = stop_coord.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), coord_task).await;
    Ok(report)
}

/// K clients submit M jobs, paced by `--rate` or by the in-flight window;
/// returns when all M have completed.
async fn submit_all(
    url: &str,
    args: &BenchArgs,
    m: &metrics::CoordMetrics,
    done0: u64,
) -> Result<()> {
    let window = if args.window > 0 {
        args.window
    } else {
        2 * args.workers * args.slots as usize
    };
    let permits = Arc::new(Semaphore::new(window));
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let mut client = crate::client::jobs_client(&crate::client::ClientArgs::local(url)).await?;
        let (permits, next, jobs, rate, steps) = (
            permits.clone(),
            next.clone(),
            args.jobs,
            args.rate,
            args.steps,
        );
        clients.push(Some(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return Ok::<(), Error>(());
                }
                if rate > 0.0 {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                } else {
                    permits
                        .acquire()
                        .await
                        .map_err(|_| Error::Internal("window closed".into()))?
                        .forget();
                }
                let spec = pb::JobSpec {
                    model_id: MODEL.into(),
                    prompt: "bench".into(),
                    width: 64,
                    height: 64,
                    steps,
                    guidance_scale: 7.5,
                    seed: i,
                    num_images: 1,
                    ..Default::default()
                };
                client
                    .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                    .await
                    .map_err(Error::from)?;
            }
        })));
    }
    // Completions reopen the window; the run ends when all M completed.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = 0u64;
    loop {
        let done = m.jobs_completed.get() - done0;
        if done > seen {
            permits.add_permits((done - seen) as usize);
            seen = done;
        }
        if done >= args.jobs {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "only {done} of {} jobs completed in 600 s",
                args.jobs
            )));
        }
        // A client ends when the tickets run out, or on an error: surface it.
        for slot in clients.iter_mut() {
            if slot.as_ref().is_some_and(|c| c.is_finished()) {
                if let Some(Ok(Err(e))) = slot.take().and_then(|c| c.now_or_never()) {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for c in clients.into_iter().flatten() {
        c.await
            .map_err(|e| Error::Internal(format!("client task: {e}")))??;
    }
    Ok(())
}
