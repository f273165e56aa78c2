//! Argument types of every command, and how a coordinator's or worker's
//! config is resolved from the file, flags and `CORRAL_*` variables.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::client::ClientArgs;
use crate::config::{DeviceKind, FileConfig};

use super::overrides::{self, CoordinatorKeys, WorkerKeys};
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
    /// A LoRA file and its weight, `FILE:WEIGHT` (repeatable): adds the
    /// LoRA switch cost beside the full load and the image time.
    #[arg(long = "lora", value_name = "FILE:WEIGHT")]
    pub loras: Vec<String>,
    /// Apply LoRAs to 3x3 convolutions too (off by default on CPU).
    #[arg(long)]
    pub lora_conv: bool,
    /// An upscaler (.onnx file or a directory holding model.onnx) to time.
    #[arg(long)]
    pub upscaler: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML config file ([coordinator] and [auth] tables).
    #[arg(long, env = "CORRAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Accept every call without a token (local use only); overrides [auth].
    #[arg(long, env = "CORRAL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    #[command(flatten)]
    pub keys: CoordinatorKeys,
}

impl CoordinatorArgs {
    pub fn resolve(&self) -> Result<crate::config::CoordinatorConfig> {
        let file = FileConfig::load(self.config.as_deref())?;
        let mut c = overrides::apply("coordinator", &file.coordinator, &self.keys.0)?;
        c.auth = file.auth;
        if self.insecure_no_auth {
            if c.auth.as_ref().is_some_and(|a| !a.disabled) {
                tracing::warn!(
                    "--insecure-no-auth overrides the [auth] table: no tokens are checked"
                );
            }
            c.auth = Some(crate::config::AuthConfig::disabled());
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
    #[command(flatten)]
    pub keys: WorkerKeys,
}

impl WorkerArgs {
    pub fn resolve(&self) -> Result<(crate::config::WorkerConfig, WorkerId)> {
        let file = FileConfig::load(self.config.as_deref())?;
        let c = overrides::apply("worker", &file.worker, &self.keys.0)?;
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
        /// checkpoint, lora, vae or upscaler; default: guessed from the files
        /// (one .safetensors: lora; one .onnx: upscaler; vae_decoder/ without
        /// unet/: vae; else checkpoint).
        #[arg(long)]
        kind: Option<ModelKindArg>,
        /// An upscaler's scale: x2 or x4 (other kinds: read from the files).
        #[arg(long)]
        format: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    List(ClientArgs),
    Remove {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hash a bundle directory and write its corral-manifest.json, so that
    /// it can be uploaded and registered with an http(s)://, s3://, gs://
    /// or az:// source; prints what to upload and how.
    Publish {
        dir: PathBuf,
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
    /// A LoRA and its weight, `ID:WEIGHT` (weight 1 if omitted); repeatable.
    #[arg(long = "lora", value_name = "ID:WEIGHT")]
    pub loras: Vec<String>,
    /// A VAE (catalogue id) replacing the checkpoint's own.
    #[arg(long)]
    pub vae: Option<String>,
    /// Image-to-image: the input picture (PNG or JPEG, width x height).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Image-to-image: how much of the input is replaced, (0, 1]; default 0.75.
    #[arg(long, default_value_t = 0.0)]
    pub strength: f32,
    /// An upscaler (catalogue id) run on each image after generation.
    #[arg(long)]
    pub upscaler: Option<String>,
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

/// `--kind` of `models add`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModelKindArg {
    Checkpoint,
    Lora,
    Vae,
    Upscaler,
}

impl From<ModelKindArg> for crate::types::ModelKind {
    fn from(k: ModelKindArg) -> Self {
        match k {
            ModelKindArg::Checkpoint => Self::Checkpoint,
            ModelKindArg::Lora => Self::Lora,
            ModelKindArg::Vae => Self::Vae,
            ModelKindArg::Upscaler => Self::Upscaler,
        }
    }
}

/// `ID:WEIGHT` (weight 1 when omitted).
pub fn parse_lora(s: &str) -> Result<crate::pb::LoraRef> {
    let (id, weight) = match s.rsplit_once(':') {
        Some((id, w)) => (
            id,
            w.parse::<f32>().map_err(|_| {
                Error::invalid("lora", format!("{s:?}: weight {w:?} is not a number"))
            })?,
        ),
        None => (s, 1.0),
    };
    Ok(crate::pb::LoraRef {
        model_id: id.to_owned(),
        weight,
    })
}
