//! The real engine: Stable Diffusion pipelines on ONNX Runtime
//! (`crate::pipeline`), CPU or CUDA.
//!
//! Each loaded model keeps its sessions (this is the VRAM residency the
//! worker's `Residency` bounds). ONNX Runtime's optimized graphs are saved
//! beside the cache, keyed by the bundle's hashes, so a model loaded again
//! after a restart skips graph optimization.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use std::sync::Mutex;

use super::engine::{cancelled, Engine, Job, LoadedModel, Output};
use crate::config::{DeviceKind, WorkerConfig};
use crate::error::{Error, Result};
use crate::pipeline::lora::{Lora, LoraWeight};
use crate::pipeline::upscale::Upscaler;
use crate::pipeline::vae::VaeModel;
use crate::pipeline::{Device, GenerateRequest, Pipeline, PipelineConfig, PipelineError};
use crate::types::ModelManifest;

pub struct OnnxEngine {
    cfg: PipelineConfig,
    optimized_root: PathBuf,
    extras: Arc<ExtrasCache>,
}

/// LoRAs, VAEs and upscalers loaded for jobs, shared by every checkpoint and
/// kept (most recently used) after their files are unpinned, keyed by model
/// id and content, so that the next job using them does not load them again.
struct ExtrasCache {
    cfg: PipelineConfig,
    loras: Lru<Lora>,
    vaes: Lru<VaeModel>,
    upscalers: Lru<Upscaler>,
}

/// A small LRU of loaded objects by key.
struct Lru<T> {
    cap: usize,
    items: Mutex<Vec<(String, Arc<T>)>>,
}

impl<T> Lru<T> {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            items: Mutex::new(Vec::new()),
        }
    }

    /// The cached value for `key`, or `load()`'s, cached.
    fn get_or_load(&self, key: &str, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = items.iter().position(|(k, _)| k == key) {
                let hit = items.remove(i);
                let v = hit.1.clone();
                items.push(hit);
                return Ok(v);
            }
        }
        // Loaded outside the lock: two jobs may load the same one at once;
        // both results are equal and one is kept.
        let v = Arc::new(load()?);
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.retain(|(k, _)| k != key);
        items.push((key.to_owned(), v.clone()));
        while items.len() > self.cap {
            items.remove(0);
        }
        Ok(v)
    }
}

/// A bundle's identity: id and the digest of its files.
fn content_key(m: &ModelManifest) -> String {
    let mut h = Sha256::new();
    for f in &m.files {
        h.update(f.path.as_bytes());
        h.update(f.sha256.as_bytes());
    }
    format!("{}-{}", m.id, hex::encode(&h.finalize()[..8]))
}

/// The one file of `ext` in a bundle (a LoRA's .safetensors, an upscaler's .onnx).
fn only_file(m: &ModelManifest, dir: &Path, ext: &str) -> Result<PathBuf> {
    m.files
        .iter()
        .find(|f| f.path.ends_with(ext))
        .map(|f| dir.join(&f.path))
        .ok_or_else(|| Error::Pipeline(format!("bundle {} has no {ext} file", m.id)))
}

impl ExtrasCache {
    fn lora(&self, m: &ModelManifest, dir: &Path) -> Result<Arc<Lora>> {
        self.loras.get_or_load(&content_key(m), || {
            let path = only_file(m, dir, ".safetensors")?;
            Ok(Lora::load(&path)
                .map_err(to_error)?
                .with_name(m.id.as_str()))
        })
    }

    fn vae(&self, m: &ModelManifest, dir: &Path) -> Result<Arc<VaeModel>> {
        self.vaes.get_or_load(&content_key(m), || {
            VaeModel::load(dir, &self.cfg).map_err(to_error)
        })
    }

    fn upscaler(&self, m: &ModelManifest, dir: &Path) -> Result<Arc<Upscaler>> {
        self.upscalers.get_or_load(&content_key(m), || {
            let path = only_file(m, dir, ".onnx")?;
            Upscaler::load(&path, &self.cfg).map_err(to_error)
        })
    }
}

impl OnnxEngine {
    /// Finds ONNX Runtime now, so that a worker without it fails at start
    /// with a message that says what to install.
    pub fn new(wc: &WorkerConfig) -> Result<Self> {
        let lib = crate::pipeline::runtime::init().map_err(to_error)?;
        tracing::info!(library = %lib.display(), "ONNX Runtime loaded");
        let device = match wc.device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => Device::Cuda {
                device_id: wc.device_id,
            },
        };
        let mut root = wc.cache_dir.clone().into_os_string();
        root.push(".optimized");
        let cfg = PipelineConfig {
            device,
            allow_cpu_fallback: wc.allow_cpu_fallback,
            intra_op_threads: None,
            lora_conv: wc.lora_conv,
            ..Default::default()
        };
        Ok(Self {
            extras: Arc::new(ExtrasCache {
                cfg: cfg.clone(),
                loras: Lru::new(32),
                vaes: Lru::new(2),
                upscalers: Lru::new(2),
            }),
            cfg,
            optimized_root: PathBuf::from(root),
        })
    }

    fn optimized_dir(&self, m: &ModelManifest) -> PathBuf {
        let device = format!("{:?}", self.cfg.device);
        let key = hex::encode(&Sha256::digest(device.as_bytes())[..4]);
        self.optimized_root
            .join(format!("{}-{key}", content_key(m)))
    }
}

/// How pipeline errors reach the coordinator: a missing runtime or a
/// runtime fault may go away elsewhere (retryable); a bad model will not.
pub fn to_error(e: PipelineError) -> Error {
    match e {
        PipelineError::Cancelled => cancelled(),
        PipelineError::RuntimeNotFound(_) | PipelineError::Runtime(_) => {
            Error::Unavailable(e.to_string())
        }
        PipelineError::InvalidRequest(m) => Error::invalid("spec", m),
        other => Error::Pipeline(other.to_string()),
    }
}

struct OnnxModel {
    id: String,
    pipeline: Pipeline,
    extras: Arc<ExtrasCache>,
}

impl Engine for OnnxEngine {
    fn name(&self) -> &'static str {
        "onnx"
    }

    fn load(&self, manifest: &ModelManifest, dir: &Path) -> Result<Arc<dyn LoadedModel>> {
        let opt = self.optimized_dir(manifest);
        std::fs::create_dir_all(&opt).map_err(|e| Error::io(&opt, e))?;
        let pipeline = Pipeline::load_with_cache(dir, &self.cfg, Some(&opt)).map_err(to_error)?;
        let t = pipeline.load_timings();
        tracing::info!(model_id = %manifest.id, timings = ?t, "pipeline loaded");
        Ok(Arc::new(OnnxModel {
            id: manifest.id.0.clone(),
            pipeline,
            extras: self.extras.clone(),
        }))
    }
}

impl LoadedModel for OnnxModel {
    fn resident_bytes(&self) -> u64 {
        self.pipeline.resident_bytes()
    }

    fn generate(&self, job: &Job, on_step: &mut dyn FnMut(u32, u32) -> bool) -> Result<Output> {
        let spec = job.spec;
        let bundle = |id: &crate::types::ModelId| {
            job.extra(id)
                .ok_or_else(|| Error::Internal(format!("bundle {id} was not fetched for the job")))
        };
        let mut loras = Vec::with_capacity(spec.loras.len());
        for l in &spec.loras {
            let (m, dir) = bundle(&l.model_id)?;
            loras.push(LoraWeight {
                lora: self.extras.lora(m, dir)?,
                weight: l.weight,
            });
        }
        let vae = match &spec.vae_id {
            Some(id) => {
                let (m, dir) = bundle(id)?;
                Some(self.extras.vae(m, dir)?)
            }
            None => None,
        };
        let upscaler = match &spec.upscaler_id {
            Some(id) => {
                let (m, dir) = bundle(id)?;
                Some(self.extras.upscaler(m, dir)?)
            }
            None => None,
        };
        let req = GenerateRequest {
            model_id: self.id.clone(),
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            guidance_scale: spec.guidance_scale,
            seed: spec.seed,
            num_images: spec.num_images,
            scheduler: spec.scheduler.clone(),
            loras,
            init_image: spec.init_image.as_ref().map(|b| b.to_vec()),
            strength: spec.strength,
            vae,
            upscaler,
        };
        let (images, t) = self
            .pipeline
            .generate_timed(&req, on_step)
            .map_err(to_error)?;
        Ok(Output {
            images: images.into_iter().map(|i| i.png).collect(),
            lora_s: t.lora_prepare_s,
            upscale_s: t.upscale_s,
        })
    }
}
