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
pub mod noise;
pub mod png;
pub mod runtime;
pub mod schedulers;
mod tensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::DynTensor;
use serde_json::Value;

use self::schedulers::{Sampler, SchedulerConfig, SchedulerKind};
use self::tensors::{find_port, float_tensor, number_tensor, read_floats, Port};
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

    /// Generates `num_images` PNGs. `on_step(done, total)` is called after every denoising step;
    /// returning false cancels before the next one ([`PipelineError::Cancelled`]).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<Image>, PipelineError> {
        let kind = self.validate(req)?;
        let per = self.latent_len(req.width, req.height);
        let n = req.num_images as usize;
        let noise = noise::initial_noise(req.seed, n, per);
        let latents = self.denoise(req, &noise, on_step)?;
        let model = if req.model_id.is_empty() {
            &self.model_id
        } else {
            &req.model_id
        };
        let mut images = Vec::with_capacity(n);
        for (i, lat) in latents.chunks(per).enumerate() {
            let pixels = self.decode(lat, req.width, req.height)?;
            let rgb = png::to_rgb8(&pixels, req.width as usize, req.height as usize);
            let seed = req.seed.wrapping_add(i as u64);
            let params = png::Parameters {
                prompt: &req.prompt,
                negative_prompt: &req.negative_prompt,
                steps: req.steps,
                sampler: kind.a1111_name(),
                guidance_scale: req.guidance_scale,
                seed,
                width: req.width,
                height: req.height,
                model,
            };
            let png = png::encode_rgb(req.width, req.height, &rgb, &params.to_a1111())?;
            images.push(Image { png, seed });
        }
        Ok(images)
    }

    /// The text encoder's hidden states for each prompt, concatenated: `[texts.len(), seq, dim]`.
    pub fn encode_prompts(&self, texts: &[&str]) -> Result<(Vec<f32>, [usize; 2]), PipelineError> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<_, _>>()?;
        let seq = self.tokenizer.max_len();
        let batch = match self.text_encoder.input.fixed_dim(0) {
            Some(b) if b < ids.len() => b,
            _ => ids.len(),
        };
        let mut out = Vec::new();
        let mut dims = [seq, 0];
        let mut session = lock(&self.text_encoder.session);
        for chunk in ids.chunks(batch) {
            let flat: Vec<f64> = chunk.iter().flatten().map(|&i| i as f64).collect();
            let input = number_tensor(self.text_encoder.input.ty, &[chunk.len(), seq], &flat)?;
            let mut outputs = session
                .run(vec![(self.text_encoder.input.name.as_str(), input)])
                .map_err(|e| PipelineError::Runtime(format!("text encoder: {e}")))?;
            let value = outputs
                .remove(&self.text_encoder.output.name)
                .ok_or_else(|| {
                    PipelineError::BadModel("text encoder returned no hidden states".into())
                })?;
            let (shape, data) = read_floats(value)?;
            if shape.len() != 3 || shape[0] != chunk.len() || shape[1] != seq {
                return Err(PipelineError::BadModel(format!(
                    "text encoder returned shape {shape:?}, expected [{}, {seq}, dim]",
                    chunk.len()
                )));
            }
            dims[1] = shape[2];
            out.extend_from_slice(&data);
        }
        Ok((out, dims))
    }

    /// Runs the denoising loop from the given unit-variance initial noise (`num_images` images
    /// of [`Pipeline::latent_len`] values each) and returns the final latents (before the VAE's
    /// scaling factor is undone). The lower-level entry the golden tests use.
    pub fn denoise(
        &self,
        req: &GenerateRequest,
        noise: &[f32],
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<f32>, PipelineError> {
        let kind = self.validate(req)?;
        let n = req.num_images as usize;
        let per = self.latent_len(req.width, req.height);
        if noise.len() != n * per {
            return Err(PipelineError::InvalidRequest(format!(
                "initial noise has {} values, expected {}",
                noise.len(),
                n * per
            )));
        }
        let emb = self.encode_request(req)?;
        self.denoise_encoded(req, kind, &emb, noise, on_step)
    }

    /// The hidden states a request's UNet passes attend to: `[negative, prompt]` with guidance,
    /// `[prompt]` without (diffusers skips the unconditional pass when the scale is <= 1).
    pub(crate) fn encode_request(&self, req: &GenerateRequest) -> Result<Encoded, PipelineError> {
        let (data, dims) = if req.guidance_scale > 1.0 {
            self.encode_prompts(&[&req.negative_prompt, &req.prompt])?
        } else {
            self.encode_prompts(&[&req.prompt])?
        };
        Ok(Encoded { data, dims })
    }

    /// The denoising loop proper, from encoded prompts and checked initial noise.
    pub(crate) fn denoise_encoded(
        &self,
        req: &GenerateRequest,
        kind: SchedulerKind,
        emb: &Encoded,
        noise: &[f32],
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<f32>, PipelineError> {
        let n = req.num_images as usize;
        let per = self.latent_len(req.width, req.height);
        let (lh, lw) = (
            req.height as usize / self.vae_scale,
            req.width as usize / self.vae_scale,
        );
        let guided = req.guidance_scale > 1.0;
        let (emb, [seq, dim]) = (&emb.data, emb.dims);
        let emb_len = seq * dim;
        // UNet batch: [uncond x n, cond x n] with guidance, else [cond x n].
        let copies = if guided { 2 } else { 1 };
        let total = copies * n;
        let mut hidden = Vec::with_capacity(total * emb_len);
        for c in 0..copies {
            for _ in 0..n {
                hidden.extend_from_slice(&emb[c * emb_len..(c + 1) * emb_len]);
            }
        }
        let chunk = match self.unet.sample.fixed_dim(0) {
            Some(b) if total % b == 0 => b,
            Some(b) => {
                return Err(PipelineError::InvalidRequest(format!(
                "the UNet has a fixed batch of {b}; {total} (images x guidance) is not a multiple"
            )))
            }
            None => total,
        };
        let hidden_tensors = hidden
            .chunks(chunk * emb_len)
            .map(|h| float_tensor(self.unet.hidden.ty, &[chunk, seq, dim], h))
            .collect::<Result<Vec<_>, _>>()?;

        let seeds: Vec<u64> = (0..n as u64).map(|i| req.seed.wrapping_add(i)).collect();
        let mut sampler = Sampler::new(&self.scheduler, kind, req.steps as usize, &seeds, per);
        let init = sampler.init_noise_sigma();
        let mut x: Vec<f32> = noise.iter().map(|v| v * init).collect();
        let steps = sampler.timesteps().len();
        let mut session = lock(&self.unet.session);
        // IO binding: the hidden states are bound once per request (moved to the GPU once on
        // CUDA), the output is bound to CPU memory; only the latents cross per step.
        let rt = |e: ort::Error| PipelineError::Runtime(format!("unet binding: {e}"));
        let cpu = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(rt)?;
        let mut bindings = Vec::with_capacity(hidden_tensors.len());
        for h in hidden_tensors {
            let h = self.to_device(h);
            let mut b = session.create_binding().map_err(rt)?;
            b.bind_input(self.unet.hidden.name.as_str(), &h)
                .map_err(rt)?;
            b.bind_output_to_device(self.unet.output.name.as_str(), &cpu)
                .map_err(rt)?;
            bindings.push(b);
        }
        let t_shape: Vec<usize> = match self.unet.timestep.shape.as_slice() {
            [] => vec![],
            [1] => vec![1],
            _ => vec![chunk],
        };
        let t_len = t_shape.first().copied().unwrap_or(1);
        let mut model_in = vec![0f32; total * per];
        let mut model_out = Vec::with_capacity(total * per);
        let mut guided_out = vec![0f32; n * per];
        for i in 0..steps {
            let scale = sampler.input_scale(i);
            for c in 0..copies {
                for (d, s) in model_in[c * n * per..(c + 1) * n * per].iter_mut().zip(&x) {
                    *d = s * scale;
                }
            }
            let t = sampler.timesteps()[i];
            model_out.clear();
            for (k, binding) in bindings.iter_mut().enumerate() {
                let sample = float_tensor(
                    self.unet.sample.ty,
                    &[chunk, self.latent_channels, lh, lw],
                    &model_in[k * chunk * per..(k + 1) * chunk * per],
                )?;
                let timestep = number_tensor(self.unet.timestep.ty, &t_shape, &vec![t; t_len])?;
                binding
                    .bind_input(self.unet.sample.name.as_str(), &sample)
                    .map_err(rt)?;
                binding
                    .bind_input(self.unet.timestep.name.as_str(), &timestep)
                    .map_err(rt)?;
                let mut outputs = session
                    .run_binding(binding)
                    .map_err(|e| PipelineError::Runtime(format!("unet step {i}: {e}")))?;
                let value = outputs
                    .remove(&self.unet.output.name)
                    .ok_or_else(|| PipelineError::BadModel("the UNet returned no sample".into()))?;
                let (_, data) = read_floats(value)?;
                if data.len() != chunk * per {
                    return Err(PipelineError::BadModel(format!(
                        "the UNet returned {} values, expected {}",
                        data.len(),
                        chunk * per
                    )));
                }
                model_out.extend_from_slice(&data);
            }
            if guided {
                let g = req.guidance_scale;
                let (unc, cond) = model_out.split_at(n * per);
                for ((o, &u), &c) in guided_out.iter_mut().zip(unc).zip(cond) {
                    *o = u + g * (c - u);
                }
                sampler.step(&guided_out, i, &mut x);
            } else {
                sampler.step(&model_out, i, &mut x);
            }
            if !on_step(i as u32 + 1, steps as u32) {
                return Err(PipelineError::Cancelled);
            }
        }
        Ok(x)
    }

    /// On CUDA, a copy of `t` in GPU memory (bound once, read by every step); else `t`.
    fn to_device(&self, t: DynTensor) -> DynTensor {
        #[cfg(feature = "cuda")]
        if let Device::Cuda { device_id } = self.device {
            match t.to(AllocationDevice::CUDA, device_id) {
                Ok(d) => return d,
                Err(e) => tracing::warn!(error = %e, "hidden states stay in host memory"),
            }
        }
        t
    }

    /// Decodes one image's latents to `[3, height, width]` pixels in [-1, 1].
    pub fn decode(
        &self,
        latents: &[f32],
        width: u32,
        height: u32,
    ) -> Result<Vec<f32>, PipelineError> {
        let (lh, lw) = (
            height as usize / self.vae_scale,
            width as usize / self.vae_scale,
        );
        let scaled: Vec<f32> = latents.iter().map(|v| v / self.scaling_factor).collect();
        let input = float_tensor(
            self.vae.input.ty,
            &[1, self.latent_channels, lh, lw],
            &scaled,
        )?;
        let mut session = lock(&self.vae.session);
        let mut outputs = session
            .run(vec![(self.vae.input.name.as_str(), input)])
            .map_err(|e| PipelineError::Runtime(format!("vae decoder: {e}")))?;
        let value = outputs
            .remove(&self.vae.output.name)
            .ok_or_else(|| PipelineError::BadModel("the VAE decoder returned no sample".into()))?;
        let (shape, data) = read_floats(value)?;
        if shape != [1, 3, height as usize, width as usize] {
            return Err(PipelineError::BadModel(format!(
                "the VAE decoder returned shape {shape:?}, expected [1, 3, {height}, {width}]"
            )));
        }
        Ok(data)
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
