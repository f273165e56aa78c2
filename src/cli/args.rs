//! Argument types of every command, and how a coordinator's or worker's
//! config is resolved from the file, flags and `CORRAL_*` variables.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::auth::Secret;
use crate::client::ClientArgs;
use crate::config::{DeviceKind, EngineKind, FileConfig};
use crate::error::{Error, Result};
use crate::types::WorkerId;

#[derive(Args, Debug)]
pub struct PlanImageCmd {
    #[command(flatten)]
    pub plan: crate::sim::PlanImageArgs,
    /// Use the demand a live coordinator observed (ClusterStatus) instead
    /// of a CSV or a simulated scenario.
    #[arg(long)]
    pub from_coordinator: Option<String>,
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
