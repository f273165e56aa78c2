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
//! `&mut` to run).

pub mod bench;
mod generate;
pub mod noise;
pub mod png;
pub mod runtime;
pub mod schedulers;
mod tensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ort::session::Session;
use serde_json::Value;

use self::schedulers::{SchedulerConfig, SchedulerKind};
use self::tensors::{find_port, Port};
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
#[derive(Debug, Clone, Default)]
pub struct PipelineConfig {
    /// Execution provider. Default: CPU.
    pub device: Device,
    /// When CUDA cannot be registered, load on the CPU instead of failing. Default: false.
    pub allow_cpu_fallback: bool,
    /// ONNX Runtime intra-op threads per session. Default: None (ONNX Runtime decides).
    pub intra_op_threads: Option<usize>,
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
}

fn lock(m: &Mutex<Session>) -> MutexGuard<'_, Session> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn require(path: PathBuf, what: &str) -> Result<PathBuf, PipelineError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(PipelineError::MissingFile {
            path,
            what: what.into(),
        })
    }
}

fn read_json(path: &Path) -> Result<Value, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| PipelineError::BadModel(format!("{}: {e}", path.display())))
}

/// Bytes of a model file and its external data, if any.
fn model_bytes(model: &Path) -> u64 {
    let data = model.with_file_name("model.onnx_data");
    [model.to_path_buf(), data]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

impl Pipeline {
    /// Loads an optimum ONNX export on the configured device.
    pub fn load(dir: &Path, cfg: &PipelineConfig) -> Result<Pipeline, PipelineError> {
        Self::load_with_cache(dir, cfg, None)
    }

    /// As [`Pipeline::load`]; with `optimized_dir`, ONNX Runtime's optimized graphs are saved
    /// there on the first load and read back on later ones, skipping graph optimization.
    pub fn load_with_cache(
        dir: &Path,
        cfg: &PipelineConfig,
        optimized_dir: Option<&Path>,
    ) -> Result<Pipeline, PipelineError> {
        runtime::init()?;
        if !dir.is_dir() {
            return Err(PipelineError::MissingFile {
                path: dir.to_owned(),
                what: "the model directory".into(),
            });
        }
        if dir.join("text_encoder_2").exists() {
            return Err(PipelineError::Unsupported(
                "SDXL (text_encoder_2) is not supported yet".into(),
            ));
        }
        let index = read_json(&require(
            dir.join("model_index.json"),
            "the pipeline index of an optimum export",
        )?)?;
        let class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if class.contains("XL") {
            return Err(PipelineError::Unsupported(format!(
                "{class}: SDXL (text_encoder_2) is not supported yet"
            )));
        }
        let te_path = require(dir.join("text_encoder/model.onnx"), "the CLIP text encoder")?;
        let unet_path = require(dir.join("unet/model.onnx"), "the UNet")?;
        let vae_path = require(dir.join("vae_decoder/model.onnx"), "the VAE decoder")?;
        let sched_path = require(
            dir.join("scheduler/scheduler_config.json"),
            "the scheduler configuration",
        )?;
        let tok_dir = require(dir.join("tokenizer"), "the tokenizer directory")?;

        let sched_text =
            std::fs::read_to_string(&sched_path).map_err(|e| PipelineError::io(&sched_path, e))?;
        let scheduler = SchedulerConfig::from_json(&sched_text)
            .map_err(|e| PipelineError::BadModel(format!("{}: {e}", sched_path.display())))?;
        let mut tokenizer = ClipTokenizer::load(&tok_dir)?;

        let vae_cfg_path = dir.join("vae_decoder/config.json");
        let vae_cfg = if vae_cfg_path.is_file() {
            Some(read_json(&vae_cfg_path)?)
        } else {
            None
        };
        let scaling_factor = vae_cfg
            .as_ref()
            .and_then(|c| c.get("scaling_factor")?.as_f64())
            .unwrap_or(0.18215) as f32;
        let vae_scale = vae_cfg
            .as_ref()
            .and_then(|c| {
                c.get("block_out_channels")?
                    .as_array()
                    .map(|a| 1usize << a.len().saturating_sub(1))
            })
            .unwrap_or(8);

        let started = Instant::now();
        let (sessions, device) =
            match Self::sessions(&[&te_path, &unet_path, &vae_path], cfg, optimized_dir) {
                Ok(s) => (s, cfg.device),
                Err(e) if cfg.allow_cpu_fallback && cfg.device != Device::Cpu => {
                    tracing::warn!(error = %e, "CUDA unavailable; falling back to the CPU");
                    let cpu = PipelineConfig {
                        device: Device::Cpu,
                        ..cfg.clone()
                    };
                    (
                        Self::sessions(&[&te_path, &unet_path, &vae_path], &cpu, optimized_dir)?,
                        Device::Cpu,
                    )
                }
                Err(e) => return Err(e),
            };
        let timings = LoadTimings {
            sessions_s: started.elapsed().as_secs_f64(),
        };
        let [te, un, va]: [Session; 3] = sessions
            .try_into()
            .map_err(|_| PipelineError::Runtime("session count".into()))?;

        if un
            .inputs()
            .iter()
            .any(|i| i.name() == "text_embeds" || i.name() == "time_ids")
        {
            return Err(PipelineError::Unsupported(
                "SDXL (text_encoder_2) is not supported yet".into(),
            ));
        }
        let text_encoder = TextEncoder {
            input: find_port(&te, false, "text_encoder", &["input_ids"], |p| {
                !p.is_float()
            })?,
            output: find_port(&te, true, "text_encoder", &["last_hidden_state"], |p| {
                p.shape.len() == 3
            })?,
            session: Mutex::new(te),
        };
        if let Some(n) = text_encoder.input.fixed_dim(1) {
            tokenizer.set_max_len(n);
        }
        let unet = Unet {
            sample: find_port(&un, false, "unet", &["sample"], |p| {
                p.is_float() && p.shape.len() == 4
            })?,
            timestep: find_port(&un, false, "unet", &["timestep", "timesteps", "t"], |p| {
                p.shape.len() <= 1
            })?,
            hidden: find_port(&un, false, "unet", &["encoder_hidden_states"], |p| {
                p.shape.len() == 3
            })?,
            output: find_port(&un, true, "unet", &["out_sample"], |p| p.shape.len() == 4)?,
            session: Mutex::new(un),
        };
        let vae = Vae {
            input: find_port(&va, false, "vae_decoder", &["latent_sample"], |p| {
                p.is_float()
            })?,
            output: find_port(&va, true, "vae_decoder", &["sample"], |p| {
                p.shape.len() == 4
            })?,
            session: Mutex::new(va),
        };
        let latent_channels = unet.sample.fixed_dim(1).unwrap_or(4);
        for (port, what) in [
            (&unet.sample, "unet sample"),
            (&unet.hidden, "unet encoder_hidden_states"),
            (&vae.input, "vae latent_sample"),
        ] {
            if !port.is_float() {
                return Err(PipelineError::BadModel(format!(
                    "{what} must be float16 or float32, is {:?}",
                    port.ty
                )));
            }
        }
        let model_id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Pipeline {
            model_id,
            device,
            tokenizer,
            scheduler,
            text_encoder,
            unet,
            vae,
            scaling_factor,
            vae_scale,
            latent_channels,
            resident_bytes: [&te_path, &unet_path, &vae_path]
                .iter()
                .map(|p| model_bytes(p))
                .sum(),
            timings,
        })
    }

    fn sessions(
        models: &[&PathBuf],
        cfg: &PipelineConfig,
        optimized_dir: Option<&Path>,
    ) -> Result<Vec<Session>, PipelineError> {
        let lib = runtime::init()?;
        models
            .iter()
            .map(|m| {
                let key = optimized_dir.map(|d| runtime::OptimizedCache {
                    dir: d,
                    key: cache_key(m, cfg.device, &lib),
                });
                runtime::build_session(m, cfg, key.as_ref())
            })
            .collect()
    }

    /// The device the sessions run on (CPU after a permitted fallback).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Approximate memory the sessions hold: the size of the model files.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
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

/// Names a cached optimized graph after the model file (size, mtime), the device and the
/// ONNX Runtime library, so that a changed model or runtime never reads a stale graph.
fn cache_key(model: &Path, device: Device, lib: &Path) -> String {
    use sha2::{Digest, Sha256};
    let meta = std::fs::metadata(model).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(format!(
        "{}|{}|{mtime}|{device:?}|{}",
        model.display(),
        meta.map_or(0, |m| m.len()),
        lib.display()
    ));
    let component = model
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{component}-{}", &hex::encode(h.finalize())[..16])
}
