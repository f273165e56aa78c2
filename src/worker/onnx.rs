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

use super::engine::{cancelled, Engine, LoadedModel};
use crate::config::{DeviceKind, WorkerConfig};
use crate::error::{Error, Result};
use crate::pipeline::{Device, GenerateRequest, Pipeline, PipelineConfig, PipelineError};
use crate::types::{JobSpec, ModelManifest};

pub struct OnnxEngine {
    cfg: PipelineConfig,
    optimized_root: PathBuf,
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
        Ok(Self {
            cfg: PipelineConfig {
                device,
                allow_cpu_fallback: wc.allow_cpu_fallback,
                intra_op_threads: None,
                ..Default::default()
            },
            optimized_root: PathBuf::from(root),
        })
    }

    fn optimized_dir(&self, m: &ModelManifest) -> PathBuf {
        let mut h = Sha256::new();
        for f in &m.files {
            h.update(f.path.as_bytes());
            h.update(f.sha256.as_bytes());
        }
        h.update(format!("{:?}", self.cfg.device).as_bytes());
        let key = hex::encode(&h.finalize()[..8]);
        self.optimized_root.join(format!("{}-{key}", m.id))
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
        }))
    }
}

impl LoadedModel for OnnxModel {
    fn resident_bytes(&self) -> u64 {
        self.pipeline.resident_bytes()
    }

    fn generate(
        &self,
        spec: &JobSpec,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<Vec<u8>>> {
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
            ..Default::default()
        };
        let images = self.pipeline.generate(&req, on_step).map_err(to_error)?;
        Ok(images.into_iter().map(|i| i.png).collect())
    }
}
