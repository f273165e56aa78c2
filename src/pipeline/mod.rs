//! The Stable Diffusion pipeline on ONNX Runtime (`ort`).
//!
//! Owns: loading a Hugging Face optimum ONNX export of SD 1.x/2.x or SDXL (`model_index.json`,
//! `text_encoder/`, `text_encoder_2/`, `unet/`, `vae_decoder/`, `vae_encoder/`, `tokenizer/`,
//! `scheduler/`), CLIP tokenization, classifier-free guidance, the denoising loop with the
//! schedulers in [`schedulers`], image-to-image, LoRAs ([`lora`]), VAE decoding (the checkpoint's
//! or a separate [`vae::VaeModel`]), upscaling ([`upscale`]) and PNG encoding. It knows nothing of workers, gRPC or protobuf, and all of it is synchronous: callers
//! on an async runtime use `spawn_blocking`.
//!
//! Sessions are created once in [`Pipeline::load`] and reused by every [`Pipeline::generate`];
//! a pipeline runs one request at a time (each session sits behind a mutex, as `ort` requires
//! `&mut` to run). LoRAs ([`lora`]) are merged into the patched weights once per LoRA set and
//! bound as inputs of those same sessions: switching sets never rebuilds a session.

pub mod bench;
mod generate;
pub mod image;
mod load;
pub mod lora;
pub mod noise;
pub(crate) mod onnx_proto;
pub mod png;
mod request;
pub mod runtime;
pub mod schedulers;
mod tensors;
pub mod tokenizer;
pub mod upscale;
pub mod vae;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ort::session::Session;
use serde::Serialize;

use self::lora::merge::{ComponentWeights, LoraCache, PreparedLoras};
use self::lora::{Component, LoraWeight};
use self::schedulers::{SchedulerConfig, SchedulerKind};
use self::tensors::Port;
use self::tokenizer::ClipTokenizer;
use self::upscale::Upscaler;
use self::vae::VaeModel;

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
    /// Image-to-image: the input picture, PNG or JPEG bytes (at most
    /// [`image::MAX_IMAGE_BYTES`], [`image::MAX_IMAGE_PIXELS`]). Its size must be the
    /// request's (width and height 0 take the image's). None = text-to-image.
    pub init_image: Option<Vec<u8>>,
    /// Image-to-image: how much of the schedule is re-run, in (0, 1]; diffusers' `strength`
    /// (`int(steps * strength)` steps are run). Ignored without `init_image`. Default: 0.8.
    pub strength: f32,
    /// A separate VAE replacing the checkpoint's own (decoding, and encoding when it has an
    /// encoder). None = the checkpoint's.
    pub vae: Option<Arc<VaeModel>>,
    /// An upscaler run on each generated image before PNG encoding. None = none.
    pub upscaler: Option<Arc<Upscaler>>,
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
            init_image: None,
            strength: 0.8,
            vae: None,
            upscaler: None,
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
    component: Component,
    session: Mutex<Session>,
    tokenizer: ClipTokenizer,
    input: Port,
    /// The hidden states the UNet attends to: `last_hidden_state`, or for SDXL the
    /// penultimate layer's (`hidden_states.<N-1>`, as diffusers' `hidden_states[-2]`).
    output: Port,
    /// SDXL's second encoder: the pooled, projected `text_embeds`.
    pooled: Option<Port>,
}

struct Unet {
    session: Mutex<Session>,
    sample: Port,
    timestep: Port,
    hidden: Port,
    output: Port,
    /// SDXL's added conditioning: the pooled prompt and the size/crop ids.
    text_embeds: Option<Port>,
    time_ids: Option<Port>,
}

/// Prompt hidden states `[prompts, seq, dim]` and, for SDXL, the pooled prompts
/// `[prompts, pooled_dim]`.
pub(crate) struct Encoded {
    data: Vec<f32>,
    dims: [usize; 2],
    pooled: Vec<f32>,
    pooled_dim: usize,
}

/// Seconds spent loading, for the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimings {
    pub sessions_s: f64,
}

/// Where a request's time went, in seconds (zero for stages it did not run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GenerateTimings {
    /// Checking and merging its LoRA set (near 0 when cached or without LoRAs).
    pub lora_prepare_s: f64,
    pub text_encoder_s: f64,
    /// Image-to-image: decoding the input and the VAE encoder.
    pub vae_encode_s: f64,
    pub denoise_s: f64,
    pub vae_decode_s: f64,
    pub upscale_s: f64,
    pub png_encode_s: f64,
}

/// A loaded Stable Diffusion pipeline.
pub struct Pipeline {
    model_id: String,
    device: Device,
    family: ModelFamily,
    scheduler: SchedulerConfig,
    /// One (SD 1.x/2.x) or two (SDXL) text encoders, hidden states concatenated in this order.
    text_encoders: Vec<TextEncoder>,
    unet: Unet,
    vae: VaeModel,
    vae_scale: usize,
    latent_channels: usize,
    /// Width and height used when a request leaves them 0 (SDXL 1024, SD 1.x 512).
    default_size: u32,
    /// SDXL: an empty negative prompt is all zeros (diffusers' `force_zeros_for_empty_prompt`).
    force_zeros_for_empty_prompt: bool,
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

    /// True for an SDXL export (two text encoders, added conditioning).
    pub fn is_xl(&self) -> bool {
        self.text_encoders.len() > 1
    }

    /// The size a request with width and height 0 gets.
    pub fn default_size(&self) -> u32 {
        self.default_size
    }

    /// Whether image-to-image works without a separate VAE (the export has a `vae_encoder`).
    pub fn has_vae_encoder(&self) -> bool {
        self.vae.has_encoder()
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

    /// Token ids the (first) text encoder receives for a prompt (padded to the model's length).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        self.text_encoders[0].tokenizer.encode(text)
    }

    /// Checks a request and resolves its scheduler (see also `request.rs`).
    pub fn validate(&self, req: &GenerateRequest) -> Result<SchedulerKind, PipelineError> {
        self.plan(req).map(|p| p.kind)
    }

    fn scheduler_kind(&self, req: &GenerateRequest) -> Result<SchedulerKind, PipelineError> {
        let bad = |m: String| Err(PipelineError::InvalidRequest(m));
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
