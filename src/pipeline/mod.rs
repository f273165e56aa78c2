//! The Stable Diffusion pipeline on ONNX Runtime (`ort`).
//!
//! Owns: loading a Hugging Face optimum ONNX export (`model_index.json`, `text_encoder/`,
//! `unet/`, `vae_decoder/`, `tokenizer/`, `scheduler/`), CLIP tokenization, classifier-free
//! guidance, the denoising loop with the schedulers in [`schedulers`], VAE decoding and PNG
//! encoding. It knows nothing of workers, gRPC or protobuf, and all of it is synchronous: callers
//! on an async runtime use `spawn_blocking`.
//!
//! Sessions are created once in [`Pipeline::load`] and reused by every [`Pipeline::generate`];
//! a pipeline runs one request at a time (each session sits behind a mutex, as `ort` requires
//! `&mut` to run). LoRAs ([`lora`]) are merged into the patched weights once per LoRA set and
//! bound as inputs of those same sessions: switching sets never rebuilds a session.

pub mod bench;
mod generate;
mod load;
pub mod lora;
pub mod noise;
pub(crate) mod onnx_proto;
pub mod png;
pub mod runtime;
pub mod schedulers;
mod tensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ort::session::Session;
use serde::Serialize;

use self::lora::merge::{ComponentWeights, LoraCache, PreparedLoras};
use self::lora::LoraWeight;
use self::schedulers::{SchedulerConfig, SchedulerKind};
use self::tensors::Port;
use self::tokenizer::ClipTokenizer;

/// Where sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda {
        device_id: i32,
    },
}

/// How a pipeline is loaded.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Execution provider. Default: CPU.
    pub device: Device,
    /// When CUDA cannot be registered, load on the CPU instead of failing. Default: false.
    pub allow_cpu_fallback: bool,
    /// ONNX Runtime intra-op threads per session. Default: None (ONNX Runtime decides).
    pub intra_op_threads: Option<usize>,
    /// Memory (on the session's device) that prepared LoRA sets may keep between requests,
    /// least recently used evicted first. Default: [`DEFAULT_LORA_CACHE_BYTES`].
    pub lora_cache_bytes: u64,
    /// Whether LoRAs may patch k x k convolutions (LoCon) besides linear and 1x1 layers. On the
    /// CPU such weights lose ONNX Runtime's pre-packed convolutions (+49% conv time measured).
    /// Default: None = true on CUDA, false on the CPU.
    pub lora_conv: Option<bool>,
}

/// Default of [`PipelineConfig::lora_cache_bytes`]: 2 GiB.
pub const DEFAULT_LORA_CACHE_BYTES: u64 = 2 << 30;

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            allow_cpu_fallback: false,
            intra_op_threads: None,
            lora_cache_bytes: DEFAULT_LORA_CACHE_BYTES,
            lora_conv: None,
        }
    }
}

/// The base architecture of a checkpoint or of the checkpoint a LoRA was trained on, told by
/// the width of the text features the UNet's cross-attention reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// SD 1.x: CLIP ViT-L, 768.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H, 1024.
    Sd2,
    /// SDXL: CLIP ViT-L + OpenCLIP ViT-bigG, 768 + 1280 = 2048.
    Sdxl,
    /// Anything else (the tiny test fixtures: 32).
    Other { cross_attention_dim: usize },
}

impl ModelFamily {
    pub fn from_cross_attention_dim(d: usize) -> Self {
        match d {
            768 => Self::Sd1,
            1024 => Self::Sd2,
            2048 => Self::Sdxl,
            d => Self::Other {
                cross_attention_dim: d,
            },
        }
    }
}

impl std::fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sd1 => f.write_str("SD 1.x"),
            Self::Sd2 => f.write_str("SD 2.x"),
            Self::Sdxl => f.write_str("SDXL"),
            Self::Other {
                cross_attention_dim,
            } => write!(f, "other (cross-attention width {cross_attention_dim})"),
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub model_id: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    pub seed: u64,
    pub num_images: u32,
    /// "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"; "" = the model's default.
    pub scheduler: String,
    /// LoRAs applied for this request, each with its weight (0 = not applied, but checked).
    pub loras: Vec<LoraWeight>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            model_id: String::new(),
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 20,
            guidance_scale: 7.5,
            seed: 0,
            num_images: 1,
            scheduler: String::new(),
            loras: Vec::new(),
        }
    }
}

/// A generated image: PNG bytes (with a `parameters` chunk) and the seed that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub png: Vec<u8>,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cancelled")]
    Cancelled,
    #[error("missing {}: {what}", path.display())]
    MissingFile { path: PathBuf, what: String },
    #[error("bad model: {0}")]
    BadModel(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("ONNX Runtime not found: {0}")]
    RuntimeNotFound(String),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PipelineError {
    pub(crate) fn runtime(e: impl std::fmt::Display) -> Self {
        Self::Runtime(e.to_string())
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Most images one request may ask for.
pub const MAX_IMAGES: u32 = 16;
/// Most denoising steps one request may ask for.
pub const MAX_STEPS: u32 = 500;

struct TextEncoder {
    session: Mutex<Session>,
    input: Port,
    output: Port,
}

struct Unet {
    session: Mutex<Session>,
    sample: Port,
    timestep: Port,
    hidden: Port,
    output: Port,
}

struct Vae {
    session: Mutex<Session>,
    input: Port,
    output: Port,
}

/// Prompt hidden states `[prompts, seq, dim]`.
pub(crate) struct Encoded {
    data: Vec<f32>,
    dims: [usize; 2],
}

/// Seconds spent loading, for the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimings {
    pub sessions_s: f64,
}

/// A loaded Stable Diffusion pipeline.
pub struct Pipeline {
    model_id: String,
    device: Device,
    family: ModelFamily,
    tokenizer: ClipTokenizer,
    scheduler: SchedulerConfig,
    text_encoder: TextEncoder,
    unet: Unet,
    vae: Vae,
    scaling_factor: f32,
    vae_scale: usize,
    latent_channels: usize,
    resident_bytes: u64,
    timings: LoadTimings,
    /// Per component with a name map: the weights LoRAs may patch.
    lora_weights: Vec<ComponentWeights>,
    lora_cache: LoraCache,
}

fn lock(m: &Mutex<Session>) -> MutexGuard<'_, Session> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pipeline {
    /// The device the sessions run on (CPU after a permitted fallback).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Approximate memory the pipeline holds: the size of the model files plus the prepared
    /// LoRA sets it keeps.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes + self.lora_cache.bytes()
    }

    /// The base family (from the UNet's cross-attention width): what a LoRA must match.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Bytes and count of the prepared LoRA sets kept.
    pub fn lora_cache_usage(&self) -> (u64, usize) {
        (self.lora_cache.bytes(), self.lora_cache.len())
    }

    /// Checks that every module of these LoRAs patches a weight of this model.
    pub fn check_loras(&self, loras: &[LoraWeight]) -> Result<(), PipelineError> {
        lora::merge::check(&self.lora_weights.iter().collect::<Vec<_>>(), loras)
    }

    /// The merged weights for a LoRA set: from the cache, else merged now and cached. None
    /// when no LoRA has a non-zero weight (the base weights are used as they are).
    pub fn prepare_loras(
        &self,
        loras: &[LoraWeight],
    ) -> Result<Option<Arc<PreparedLoras>>, PipelineError> {
        self.check_loras(loras)?;
        let key = lora::merge::set_key(loras);
        if key.is_empty() {
            return Ok(None);
        }
        if let Some(p) = self.lora_cache.get(&key) {
            return Ok(Some(p));
        }
        let parts: Vec<&ComponentWeights> = self.lora_weights.iter().collect();
        let prepared = Arc::new(lora::merge::prepare(&parts, loras, &|t| {
            Ok(self.to_device(t))
        })?);
        self.lora_cache.insert(prepared.clone());
        Ok(Some(prepared))
    }

    pub fn load_timings(&self) -> LoadTimings {
        self.timings
    }

    /// The sampler used for an empty scheduler name.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.scheduler.default_kind()
    }

    /// Latent values per image for a request's size.
    pub fn latent_len(&self, width: u32, height: u32) -> usize {
        self.latent_channels
            * (width as usize / self.vae_scale)
            * (height as usize / self.vae_scale)
    }

    /// Token ids the text encoder receives for a prompt (padded to the model's length).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        self.tokenizer.encode(text)
    }

    /// Checks a request and resolves its scheduler.
    pub fn validate(&self, req: &GenerateRequest) -> Result<SchedulerKind, PipelineError> {
        let bad = |m: String| Err(PipelineError::InvalidRequest(m));
        let s = self.vae_scale as u32;
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % s != 0 || v > 4096 {
                return bad(format!(
                    "{name} {v} must be a positive multiple of {s}, at most 4096"
                ));
            }
        }
        if let (Some(h), Some(w)) = (self.unet.sample.fixed_dim(2), self.unet.sample.fixed_dim(3)) {
            let (mh, mw) = (h as u32 * s, w as u32 * s);
            if (req.width, req.height) != (mw, mh) {
                return bad(format!(
                    "size {}x{}: this model's UNet only takes {mw}x{mh}",
                    req.width, req.height
                ));
            }
        }
        let max_steps = MAX_STEPS.min(self.scheduler.num_train_timesteps as u32);
        if req.steps == 0 || req.steps > max_steps {
            return bad(format!(
                "steps {} must be between 1 and {max_steps}",
                req.steps
            ));
        }
        if req.num_images == 0 || req.num_images > MAX_IMAGES {
            return bad(format!(
                "num_images {} must be between 1 and {MAX_IMAGES}",
                req.num_images
            ));
        }
        if !req.guidance_scale.is_finite() || !(0.0..=100.0).contains(&req.guidance_scale) {
            return bad(format!(
                "guidance_scale {} must be between 0 and 100",
                req.guidance_scale
            ));
        }
        if req.scheduler.is_empty() {
            return Ok(self.scheduler.default_kind());
        }
        SchedulerKind::parse(&req.scheduler).map_or_else(
            || {
                let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
                bad(format!(
                    "scheduler {:?} is not one of {}",
                    req.scheduler,
                    names.join(", ")
                ))
            },
            Ok,
        )
    }
}
