//! The command line: argument definitions and the client commands.
//! `main.rs` only parses and dispatches.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tonic::transport::Channel;

use crate::auth::{AuthedChannel, Secret};
use crate::config::{DeviceKind, EngineKind, FileConfig};
use crate::error::{Error, Result};
use crate::pb;
use crate::types::WorkerId;

#[derive(Parser, Debug)]
#[command(
    name = "corral",
    version,
    about = "Serve Stable Diffusion from thousands of models on interruptible GPUs"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "CORRAL_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator.
    Coordinator(CoordinatorArgs),
    /// Run a worker.
    Worker(Box<WorkerArgs>),
    /// The model catalogue.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Submit a job and (by default) wait for its image.
    Submit(SubmitArgs),
    /// Look at or cancel jobs.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// List connected workers and what they hold.
    Workers(ClientArgs),
    /// Per model: queued jobs and the workers holding it.
    Status(ClientArgs),
    /// Simulate the fleet: Corral's scheduler against the baselines.
    Sim(crate::sim::SimArgs),
    /// Which models to bake into the worker image under a byte budget.
    PlanImage(PlanImageCmd),
    /// The main job end to end: a coordinator, two workers, jobs, images.
    Demo(crate::demo::DemoArgs),
    /// Per-stage timings of a Stable Diffusion pipeline (session creation,
    /// text encoder, UNet step, VAE).
    BenchPipeline(BenchPipelineArgs),
    /// Load benchmark of the control plane (coordinator, N synthetic workers, K clients).
    Bench(crate::bench::BenchArgs),
}

#[derive(Args, Debug)]
pub struct PlanImageCmd {
    #[command(flatten)]
    pub plan: crate::sim::PlanImageArgs,
    /// Use the demand a live coordinator observed (ClusterStatus) instead
    /// of a CSV or a simulated scenario.
    #[arg(long)]
    pub from_coordinator: Option<String>,
}

pub async fn plan_image(a: PlanImageCmd) -> Result<()> {
    let Some(url) = a.from_coordinator.map(|u| ClientArgs::local(&u)) else {
        println!("{}", crate::sim::plan_image_cli(&a.plan)?);
        return Ok(());
    };
    let status = admin_client(&url)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    let candidates: Vec<crate::scheduler::ImageCandidate> = status
        .models
        .into_iter()
        .map(|m| crate::scheduler::ImageCandidate {
            model: crate::types::ModelId(m.model_id),
            bytes: m.bytes,
            demand: m.demand_per_s,
        })
        .collect();
    println!(
        "{}",
        crate::scheduler::plan_image(&candidates, a.plan.budget_bytes).table()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchPipelineArgs {
    /// The model bundle (an optimum ONNX export).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tiny-sd"))]
    pub model_dir: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 512)]
    pub width: u32,
    #[arg(long, default_value_t = 512)]
    pub height: u32,
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    #[arg(long, default_value_t = 0)]
    pub device_id: i32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn bench_pipeline(a: BenchPipelineArgs) -> Result<()> {
    use crate::pipeline::{bench::bench, Device, PipelineConfig};
    let cfg = PipelineConfig {
        device: match a.device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => Device::Cuda {
                device_id: a.device_id,
            },
        },
        allow_cpu_fallback: false,
        intra_op_threads: None,
        ..Default::default()
    };
    let r = bench(&a.model_dir, &cfg, a.steps, a.width, a.height, a.runs)
        .map_err(crate::worker::onnx::to_error)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?
        );
    } else {
        println!("{r}");
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Coordinator URL.
    #[arg(
        long,
        env = "CORRAL_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub coordinator: String,
    /// Client API key or admin token (prefer the environment: flags show in `ps`).
    #[arg(long, env = "CORRAL_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// PEM CA certificate to trust for an https:// coordinator.
    #[arg(long, env = "CORRAL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl ClientArgs {
    /// A coordinator on this machine with auth disabled (the demo).
    pub fn local(url: &str) -> Self {
        Self {
            coordinator: url.to_owned(),
            token: None,
            ca_cert: None,
        }
    }
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML config file ([coordinator] table).
    #[arg(long, env = "CORRAL_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "CORRAL_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    #[arg(long, env = "CORRAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "CORRAL_HEARTBEAT_INTERVAL_S")]
    pub heartbeat_interval_s: Option<f64>,
    #[arg(long, env = "CORRAL_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    #[arg(long, env = "CORRAL_STARVATION_S")]
    pub starvation_s: Option<f64>,
    /// Accept every call without a token (local use only); overrides [auth].
    #[arg(long, env = "CORRAL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// PEM certificate chain: serve TLS (with --tls-key).
    #[arg(long, env = "CORRAL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "CORRAL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// HTTP address for /metrics and the cluster page (e.g. 127.0.0.1:7701).
    #[arg(long, env = "CORRAL_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
}

impl CoordinatorArgs {
    pub fn resolve(&self) -> Result<crate::config::CoordinatorConfig> {
        let file = FileConfig::load(self.config.as_deref())?;
        let mut c = file.coordinator;
        c.auth = file.auth;
        if self.insecure_no_auth {
            if c.auth.as_ref().is_some_and(|a| !a.disabled) {
                tracing::warn!(
                    "--insecure-no-auth overrides the [auth] table: no tokens are checked"
                );
            }
            c.auth = Some(crate::config::AuthConfig::disabled());
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
        }
        if self.tls_key.is_some() {
            c.tls_key = self.tls_key.clone();
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = self.heartbeat_interval_s {
            c.heartbeat_interval_s = v;
        }
        if let Some(v) = self.max_attempts {
            c.max_attempts = v;
        }
        if let Some(v) = self.starvation_s {
            c.starvation_s = v;
        }
        if self.http_listen.is_some() {
            c.http_listen = self.http_listen;
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// TOML config file ([worker] table).
    #[arg(long, env = "CORRAL_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "CORRAL_COORDINATOR")]
    pub coordinator: Option<String>,
    #[arg(long, env = "CORRAL_WORKER_ID")]
    pub worker_id: Option<String>,
    #[arg(long, env = "CORRAL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    #[arg(long, env = "CORRAL_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    #[arg(long, env = "CORRAL_PRELOADED_DIR")]
    pub preloaded_dir: Option<PathBuf>,
    #[arg(long, env = "CORRAL_MAX_CONCURRENT_JOBS")]
    pub max_concurrent_jobs: Option<u32>,
    /// onnx (default) or synthetic (tests and load benchmarks only).
    #[arg(long, env = "CORRAL_ENGINE")]
    pub engine: Option<EngineKind>,
    #[arg(long, env = "CORRAL_DEVICE")]
    pub device: Option<DeviceKind>,
    #[arg(long, env = "CORRAL_DEVICE_ID")]
    pub device_id: Option<i32>,
    #[arg(long, env = "CORRAL_ALLOW_CPU_FALLBACK")]
    pub allow_cpu_fallback: Option<bool>,
    #[arg(long, env = "CORRAL_VRAM_BUDGET_BYTES")]
    pub vram_budget_bytes: Option<u64>,
    #[arg(long, env = "CORRAL_MAX_LOADED_MODELS")]
    pub max_loaded_models: Option<usize>,
    #[arg(long, env = "CORRAL_SHUTDOWN_GRACE_S")]
    pub shutdown_grace_s: Option<u64>,
    #[arg(long, env = "CORRAL_SYNTHETIC_STEP_MS")]
    pub synthetic_step_ms: Option<u64>,
    /// Worker token (prefer the environment: flags show in `ps`).
    #[arg(long, env = "CORRAL_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// PEM CA certificate to trust for an https:// coordinator.
    #[arg(long, env = "CORRAL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// HTTP address for this worker's /metrics (e.g. 127.0.0.1:7702).
    #[arg(long, env = "CORRAL_WORKER_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
}

impl WorkerArgs {
    pub fn resolve(&self) -> Result<(crate::config::WorkerConfig, WorkerId)> {
        let mut c = FileConfig::load(self.config.as_deref())?.worker;
        macro_rules! set {
            ($($f:ident),*) => {$( if let Some(v) = &self.$f { c.$f = v.clone(); } )*};
        }
        set!(
            coordinator,
            cache_dir,
            cache_max_bytes,
            max_concurrent_jobs,
            engine,
            device,
            device_id,
            allow_cpu_fallback,
            vram_budget_bytes,
            max_loaded_models,
            shutdown_grace_s,
            synthetic_step_ms
        );
        if self.preloaded_dir.is_some() {
            c.preloaded_dir = self.preloaded_dir.clone();
        }
        if self.worker_id.is_some() {
            c.worker_id = self.worker_id.clone();
        }
        if self.token.is_some() {
            c.token = self.token.clone();
        }
        if self.ca_cert.is_some() {
            c.ca_cert = self.ca_cert.clone();
        }
        if self.http_listen.is_some() {
            c.http_listen = self.http_listen;
        }
        c.validate()?;
        let id = match &c.worker_id {
            Some(id) => id.clone(),
            None => std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_owned())
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Error::Config("--worker-id is required (no host name found)".into())
                })?,
        };
        let id = crate::convert::worker_id(id)?;
        Ok((c, id))
    }
}

#[derive(Subcommand, Debug)]
pub enum ModelsCmd {
    /// Compute a model's manifest from its source and register it.
    Add {
        id: String,
        /// file:///dir, /dir, http(s)://host/prefix, s3://, gs://, az://
        #[arg(long)]
        source: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    List(ClientArgs),
    Remove {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download models into a directory as verified bundles (to bake a
    /// preloaded directory into a worker image): `ID=SOURCE` pairs.
    Fetch {
        #[arg(long)]
        dir: PathBuf,
        #[arg(required = true)]
        models: Vec<String>,
    },
    /// Have N workers hold the model on disk now.
    Warm {
        id: String,
        #[arg(long, default_value_t = 2)]
        replicas: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 512)]
    pub width: u32,
    #[arg(long, default_value_t = 512)]
    pub height: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    #[arg(long, default_value_t = 1)]
    pub images: u32,
    /// euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras; default: the model's.
    #[arg(long, default_value = "")]
    pub scheduler: String,
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Where to write the image (several images: FILE-1.png, FILE-2.png, ...).
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    /// Print the job id and return.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Print a job's state in words.
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a job's events until it ends.
    Watch {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    List {
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

// ---- client commands ---------------------------------------------------------

pub async fn channel(url: &str) -> Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::Config(format!("coordinator URL {url:?}: {e}")))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the coordinator at {url}: {e}")))
}

/// A channel to the coordinator that sends the token with every call.
pub async fn authed_channel(c: &ClientArgs) -> Result<AuthedChannel> {
    crate::auth::connect(&c.coordinator, c.ca_cert.as_deref(), c.token.as_ref()).await
}

pub async fn jobs_client(c: &ClientArgs) -> Result<pb::jobs_client::JobsClient<AuthedChannel>> {
    Ok(pb::jobs_client::JobsClient::new(authed_channel(c).await?)
        .max_decoding_message_size(256 << 20))
}

pub async fn admin_client(c: &ClientArgs) -> Result<pb::admin_client::AdminClient<AuthedChannel>> {
    Ok(pb::admin_client::AdminClient::new(authed_channel(c).await?))
}

/// A failed call, with the server's code and message.
fn rpc(s: tonic::Status) -> Error {
    s.into()
}

pub fn state_word(v: i32) -> &'static str {
    match pb::JobState::try_from(v) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn tier_word(v: i32) -> &'static str {
    crate::convert::tier_from_pb(v).map_or("-", |t| t.as_str())
}

pub async fn models(cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::Add { id, source, client } => {
            let id = crate::convert::model_id(id, "id")?;
            let manifest = crate::manifest::manifest_from_source(&id, &source).await?;
            let total = manifest.total_bytes();
            let files = manifest.files.len();
            let m = admin_client(&client)
                .await?
                .register_model(pb::RegisterModelRequest {
                    model: Some(manifest.into()),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            println!(
                "registered {} ({files} files, {total} bytes) from {}",
                m.id, m.source
            );
        }
        ModelsCmd::List(client) => {
            let r = admin_client(&client)
                .await?
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(rpc)?
                .into_inner();
            println!("{:<24} {:>14} {:>6}  source", "model", "bytes", "files");
            for m in r.models {
                let bytes: u64 = m.files.iter().map(|f| f.size_bytes).sum();
                println!(
                    "{:<24} {:>14} {:>6}  {}",
                    m.id,
                    bytes,
                    m.files.len(),
                    m.source
                );
            }
        }
        ModelsCmd::Remove { id, client } => {
            admin_client(&client)
                .await?
                .remove_model(pb::RemoveModelRequest {
                    model_id: id.clone(),
                })
                .await
                .map_err(rpc)?;
            println!("removed {id}");
        }
        ModelsCmd::Fetch { dir, models } => {
            let cache = crate::worker::cache::DiskCache::open(crate::worker::cache::CacheConfig {
                dir,
                max_bytes: u64::MAX,
                preloaded_dir: None,
                max_concurrent_downloads: 2,
            })
            .await?;
            for pair in models {
                let (id, source) = pair.split_once('=').ok_or_else(|| {
                    Error::invalid("models", format!("{pair:?} is not ID=SOURCE"))
                })?;
                let id = crate::convert::model_id(id.to_owned(), "models")?;
                let manifest = crate::manifest::manifest_from_source(&id, source).await?;
                let (guard, tier) = cache.ensure(&manifest, &|_, _| {}).await?;
                println!(
                    "{id}: {} bytes at {} ({})",
                    manifest.total_bytes(),
                    guard.path().display(),
                    tier.as_str()
                );
            }
        }
        ModelsCmd::Warm {
            id,
            replicas,
            client,
        } => {
            let r = admin_client(&client)
                .await?
                .warm_model(pb::WarmModelRequest {
                    model_id: id.clone(),
                    replicas,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            println!(
                "{id}: held by [{}]; prefetching on [{}]",
                r.holders.join(", "),
                r.worker_ids.join(", ")
            );
        }
    }
    Ok(())
}

/// Writes a job's images next to `out`; returns the paths.
pub fn write_images(out: &Path, images: &[Vec<u8>]) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for (i, png) in images.iter().enumerate() {
        let p = if images.len() == 1 {
            out.to_path_buf()
        } else {
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
            out.with_file_name(format!("{stem}-{}.png", i + 1))
        };
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(&p, png).map_err(|e| Error::io(&p, e))?;
        paths.push(p);
    }
    Ok(paths)
}

pub async fn submit(a: SubmitArgs) -> Result<()> {
    let mut client = jobs_client(&a.client).await?;
    let r = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                model_id: a.model.clone(),
                prompt: a.prompt,
                negative_prompt: a.negative_prompt,
                width: a.width,
                height: a.height,
                steps: a.steps,
                guidance_scale: a.guidance,
                seed: a.seed,
                num_images: a.images,
                scheduler: a.scheduler,
                priority: a.priority,
                idempotency_key: a.idempotency_key,
            }),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let job = r
        .job
        .ok_or_else(|| Error::Internal("no job in the response".into()))?;
    if a.no_wait {
        println!("{}", job.id);
        return Ok(());
    }
    eprintln!(
        "job {} queued (estimated start in {:.1} s)",
        job.id, job.estimated_start_s
    );
    let done = follow(&mut client, &job.id, true).await?;
    match done {
        Finished::Completed(out) => {
            let paths = write_images(&a.out, &out.images)?;
            let t = out.timings.unwrap_or_default();
            println!(
                "{}: completed on {} from {} (queue {:.2}s, download {:.2}s, load {:.2}s, inference {:.2}s) -> {}",
                job.id,
                out.worker_id,
                tier_word(t.tier),
                t.queue_s,
                t.download_s,
                t.load_s,
                t.inference_s,
                paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Finished::Failed(reason) => Err(Error::FailedPrecondition(format!(
            "job {} failed: {reason}",
            job.id
        ))),
        Finished::Cancelled => Err(Error::FailedPrecondition(format!(
            "job {} was cancelled",
            job.id
        ))),
    }
}

pub enum Finished {
    Completed(pb::JobOutput),
    Failed(String),
    Cancelled,
}

/// Follows `WatchJob` until the job ends, showing progress on stderr.
pub async fn follow(
    client: &mut pb::jobs_client::JobsClient<AuthedChannel>,
    id: &str,
    bar: bool,
) -> Result<Finished> {
    use pb::job_event::Event;
    let mut stream = client
        .watch_job(pb::WatchJobRequest { job_id: id.into() })
        .await
        .map_err(rpc)?
        .into_inner();
    let pb_bar = if bar {
        indicatif::ProgressBar::new(1)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb_bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut place = String::from("queued");
    while let Some(ev) = stream.message().await.map_err(rpc)? {
        match ev.event {
            Some(Event::Queued(q)) => pb_bar.set_message(format!(
                "queued, estimated start in {:.1} s",
                q.estimated_start_s
            )),
            Some(Event::Assigned(a)) => {
                place = format!("{} ({})", a.worker_id, tier_word(a.tier));
                pb_bar.set_prefix(place.clone());
                pb_bar.set_message(format!("attempt {}", a.attempt));
            }
            Some(Event::Downloading(d)) => {
                pb_bar.set_length(d.bytes_total.max(1));
                pb_bar.set_position(d.bytes_done);
                pb_bar.set_message("downloading bytes");
            }
            Some(Event::Loading(_)) => pb_bar.set_message("loading model"),
            Some(Event::Progress(p)) => {
                pb_bar.set_length(u64::from(p.total_steps.max(1)));
                pb_bar.set_position(u64::from(p.step));
                pb_bar.set_message("steps");
            }
            Some(Event::Requeued(r)) => pb_bar.set_message(format!(
                "requeued (attempt {} next): {}",
                r.attempt, r.reason
            )),
            Some(Event::Completed(c)) => {
                pb_bar.finish_and_clear();
                return Ok(Finished::Completed(c.output.unwrap_or_default()));
            }
            Some(Event::Failed(f)) => {
                pb_bar.finish_and_clear();
                return Ok(Finished::Failed(f.reason));
            }
            Some(Event::Cancelled(_)) => {
                pb_bar.finish_and_clear();
                return Ok(Finished::Cancelled);
            }
            None => {}
        }
        if !bar {
            continue;
        }
    }
    let _ = place;
    Err(Error::Unavailable(format!(
        "watch of job {id} ended before the job did"
    )))
}

pub async fn jobs(cmd: JobsCmd) -> Result<()> {
    match cmd {
        JobsCmd::Get { id, client } => {
            let j = jobs_client(&client)
                .await?
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    include_images: false,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            print_job(&j);
        }
        JobsCmd::Watch { id, client } => {
            let mut c = jobs_client(&client).await?;
            match follow(&mut c, &id, true).await? {
                Finished::Completed(o) => println!(
                    "{id}: completed on {} ({} images)",
                    o.worker_id,
                    o.images.len()
                ),
                Finished::Failed(r) => println!("{id}: failed: {r}"),
                Finished::Cancelled => println!("{id}: cancelled"),
            }
        }
        JobsCmd::Cancel { id, client } => {
            let j = jobs_client(&client)
                .await?
                .cancel_job(pb::CancelJobRequest { job_id: id })
                .await
                .map_err(rpc)?
                .into_inner();
            print_job(&j);
        }
        JobsCmd::List { model, client } => {
            let mut c = jobs_client(&client).await?;
            let mut token = String::new();
            loop {
                let r = c
                    .list_jobs(pb::ListJobsRequest {
                        state: 0,
                        model_id: model.clone().unwrap_or_default(),
                        page_size: 500,
                        page_token: token,
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                for j in &r.jobs {
                    print_job(j);
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
        }
    }
    Ok(())
}

fn print_job(j: &pb::Job) {
    let model = j.spec.as_ref().map_or("", |s| s.model_id.as_str());
    let mut line = format!(
        "{} {} model={model} attempt={}",
        j.id,
        state_word(j.state),
        j.attempt
    );
    if !j.worker_id.is_empty() {
        line += &format!(" worker={} tier={}", j.worker_id, tier_word(j.tier));
    }
    if !j.error.is_empty() {
        line += &format!(" error={:?}", j.error);
    }
    println!("{line}");
}

pub async fn workers(client: ClientArgs) -> Result<()> {
    let r = admin_client(&client)
        .await?
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    for w in r.workers {
        let s = w.state.unwrap_or_default();
        println!(
            "{} gpu={} slots={} running={} vram=[{}] disk=[{}] downloading=[{}] free_disk={} seen={:.1}s ago{}",
            w.worker_id,
            w.gpu_name,
            w.max_concurrent_jobs,
            s.running_jobs.len(),
            s.vram_models.join(","),
            s.disk_models
                .iter()
                .map(|d| if d.preloaded { format!("{}*", d.model_id) } else { d.model_id.clone() })
                .collect::<Vec<_>>()
                .join(","),
            s.downloads
                .iter()
                .map(|d| format!("{}:{}/{}", d.model_id, d.bytes_done, d.bytes_total))
                .collect::<Vec<_>>()
                .join(","),
            s.free_disk_bytes,
            w.last_seen_s_ago,
            if w.draining { " draining" } else { "" }
        );
    }
    Ok(())
}

pub async fn status(client: ClientArgs) -> Result<()> {
    let r = admin_client(&client)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    println!(
        "workers={} queued={} running={}",
        r.workers, r.queued_jobs, r.running_jobs
    );
    println!(
        "{:<24} {:>7} {:>7} {:>5} {:>5} {:>5} {:>9} {:>7}",
        "model", "queued", "running", "vram", "disk", "dl", "demand/s", "target"
    );
    for m in r.models {
        println!(
            "{:<24} {:>7} {:>7} {:>5} {:>5} {:>5} {:>9.3} {:>7}",
            m.model_id,
            m.queued_jobs,
            m.running_jobs,
            m.workers_vram,
            m.workers_disk,
            m.workers_downloading,
            m.demand_per_s,
            m.replica_target
        );
    }
    Ok(())
}

/// Builds the engine a worker was configured with.
pub fn engine(cfg: &crate::config::WorkerConfig) -> Result<Arc<dyn crate::worker::engine::Engine>> {
    match cfg.engine {
        EngineKind::Synthetic => {
            tracing::warn!(
                "using the synthetic engine: images are test patterns, not Stable Diffusion"
            );
            Ok(Arc::new(crate::worker::engine::SyntheticEngine {
                step_ms: cfg.synthetic_step_ms,
            }))
        }
        EngineKind::Onnx => Ok(Arc::new(crate::worker::onnx::OnnxEngine::new(cfg)?)),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
