//! `corral bench`: load on the control plane over real gRPC on loopback.
//!
//! Starts a coordinator in this process, N workers whose engine returns a
//! fixed payload at once (a child process by default, so that this
//! process's CPU and memory are the coordinator's and the clients'), a
//! tiny model every worker holds preloaded, and K clients submitting M
//! jobs. Figures come from the coordinator's own metrics: completions,
//! accept-to-assign latency and worker-stream messages; CPU and memory from
//! `/proc`.
//!
//! `--ceiling` runs the same load against the minimal exchange
//! (`ceiling.rs`) first and prints Corral's ratio to it. `--idle` connects
//! the workers and measures the coordinator at rest.

mod ceiling;
mod fleet;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{oneshot, watch, Semaphore};

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::metrics::{self, Histogram};
use crate::pb;
use crate::types::ModelId;
use ceiling::Ceiling;
use fleet::{cpu_s, spawn_workers, vm_mib, write_bundle, Fleet, Scratch, MODEL};

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
    /// Also run the ceiling (the minimal exchange with the same workers and
    /// clients, no scheduling, no store) and print Corral's ratio to it.
    #[arg(long)]
    pub ceiling: bool,
    /// With --ceiling: how many times to run each, alternating.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The coordinator's store: a `postgres://` URL of an empty database
    /// (docs/ha.md); none: the embedded store in a scratch directory.
    #[arg(long, env = "CORRAL_BENCH_STORE", hide_env_values = true)]
    pub store: Option<String>,
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
            ceiling: false,
            rounds: 1,
            format: Format::Table,
            store: None,
            fleet_of: None,
            fleet_preloaded: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// "corral", or "ceiling" (the minimal exchange, no scheduling or store).
    pub target: &'static str,
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

/// The CLI entry: the fleet role, or the benchmark (and the ceiling
/// beside it), printed.
pub async fn run_cli(args: BenchArgs) -> Result<()> {
    if let Some(url) = args.fleet_of.clone() {
        return fleet::fleet_main(&args, &url).await;
    }
    let format = args.format;
    let mut reports = Vec::new();
    for _ in 0..args.rounds.max(1) {
        if args.ceiling {
            reports.push(run_target(args.clone(), Target::Ceiling).await?);
        }
        reports.push(run_target(args.clone(), Target::Corral).await?);
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&reports).map_err(|e| Error::Internal(e.to_string()))?
        ),
        Format::Table => {
            for r in &reports {
                print_table(r);
            }
            if args.ceiling {
                print_ratio(&reports);
            }
        }
    }
    Ok(())
}

/// Corral's throughput over the ceiling's, run by run.
fn print_ratio(reports: &[BenchReport]) {
    let of = |t: &str| -> Vec<f64> {
        reports
            .iter()
            .filter(|r| r.target == t)
            .map(|r| r.jobs_per_s)
            .collect()
    };
    let (corral, ceiling) = (of("corral"), of("ceiling"));
    let ratios: Vec<String> = corral
        .iter()
        .zip(&ceiling)
        .map(|(c, x)| format!("{:.2}", c / x.max(1e-9)))
        .collect();
    println!(
        "corral / ceiling jobs/s: {} (corral {:?}, ceiling {:?})",
        ratios.join(", "),
        corral.iter().map(|v| v.round()).collect::<Vec<_>>(),
        ceiling.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
}

fn print_table(r: &BenchReport) {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3} ms"));
    println!(
        "{} | mode {} | {} workers x {} slots ({} fleet) | {} jobs from {} clients{} | payload {} B",
        r.target,
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
async fn connected_workers(url: &str) -> Result<u32> {
    let mut admin = crate::client::admin_client(&crate::client::ClientArgs::local(url)).await?;
    Ok(admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(Error::from)?
        .into_inner()
        .workers)
}

/// What the benchmark loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Corral,
    Ceiling,
}

/// The server under load, and how to read its counters.
enum Server {
    Corral(Arc<crate::coordinator::Coordinator>),
    Ceiling(Arc<Ceiling>),
}

impl Server {
    fn completed(&self) -> u64 {
        match self {
            Server::Corral(c) => c.metrics().jobs_completed.get(),
            Server::Ceiling(c) => c.completed.load(Ordering::Relaxed),
        }
    }

    fn messages(&self) -> u64 {
        match self {
            Server::Corral(c) => {
                c.metrics().messages_received.get() + c.metrics().messages_sent.get()
            }
            Server::Ceiling(c) => c.messages.load(Ordering::Relaxed),
        }
    }

    fn assign_counts(&self) -> Option<Vec<u64>> {
        match self {
            Server::Corral(c) => Some(c.metrics().assign_latency.snapshot()),
            Server::Ceiling(_) => None,
        }
    }

    async fn workers(&self, url: &str) -> u32 {
        match self {
            Server::Corral(_) => connected_workers(url).await.unwrap_or(0),
            Server::Ceiling(c) => c.workers.load(Ordering::Relaxed) as u32,
        }
    }
}

/// Runs the benchmark against Corral and returns its figures.
pub async fn run(args: BenchArgs) -> Result<BenchReport> {
    run_target(args, Target::Corral).await
}

/// Runs the benchmark against `target` and returns its figures.
pub async fn run_target(args: BenchArgs, target: Target) -> Result<BenchReport> {
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
        store: args.store.clone().map(crate::auth::Secret::new),
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
    let stopped = async move {
        let _ = stopped.await;
    };
    let manifest = crate::manifest::manifest_from_source(
        &ModelId(MODEL.into()),
        &format!("file://{}", preloaded.join(MODEL).display()),
    )
    .await?;
    let (server, coord_task) = match target {
        Target::Corral => {
            let bound = listener
                .local_addr()
                .map_err(|e| Error::io("listener", e))?;
            let services = crate::coordinator::Services::open_store(
                cfg,
                Arc::new(crate::clock::SystemClock),
                bound,
            )
            .await?;
            let coordinator = services.coordinator.clone();
            let task = tokio::spawn(crate::coordinator::serve(services, listener, None, stopped));
            crate::client::admin_client(&crate::client::ClientArgs::local(&url))
                .await?
                .register_model(pb::RegisterModelRequest {
                    model: Some(manifest.into()),
                })
                .await
                .map_err(Error::from)?;
            (Server::Corral(coordinator), task)
        }
        Target::Ceiling => {
            let ceiling = Ceiling::new(manifest.into());
            let (jobs, workers) = ceiling.services();
            let task = tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(jobs)
                    .add_service(workers)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        stopped,
                    )
                    .await
                    .map_err(|e| Error::Internal(format!("ceiling server: {e}")))
            });
            (Server::Ceiling(ceiling), task)
        }
    };

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
        let n = server.workers(&url).await as usize;
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

    let fleet_pid = fleet.pid();
    let (done0, msgs0, assign0) = (
        server.completed(),
        server.messages(),
        server.assign_counts(),
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
        submit_all(&url, &args, &server, done0).await?;
    }

    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, fcpu1) = (cpu_s(None), fleet_cpu());
    let completed = server.completed() - done0;
    let msgs = server.messages() - msgs0;
    let assign: Option<Vec<u64>> = server
        .assign_counts()
        .zip(assign0)
        .map(|(now, then)| now.iter().zip(&then).map(|(b, a)| b - a).collect());
    let q = |q| {
        assign.as_ref().and_then(|a| {
            Histogram::quantile_of(metrics::ASSIGN_BUCKETS_S, a, q).map(|s| s * 1000.0)
        })
    };
    let report = BenchReport {
        target: match target {
            Target::Corral => "corral",
            Target::Ceiling => "ceiling",
        },
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
async fn submit_all(url: &str, args: &BenchArgs, server: &Server, done0: u64) -> Result<()> {
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
        let done = server.completed() - done0;
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
