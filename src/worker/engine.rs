//! What runs a job once its model is on disk: the `Engine` trait, and the
//! synthetic engine that control-plane tests and load benchmarks use.
//!
//! The real engine is `onnx::OnnxEngine` (Stable Diffusion on ONNX
//! Runtime). The synthetic engine is chosen only by `--engine synthetic`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::types::{JobSpec, ModelManifest};

/// Loads models. Implementations are called from blocking threads.
pub trait Engine: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Loads the bundle in `dir` (verified, pinned) into memory.
    fn load(&self, manifest: &ModelManifest, dir: &Path) -> Result<Arc<dyn LoadedModel>>;
}

/// A job as an engine runs it.
pub struct Job<'a> {
    pub spec: &'a JobSpec,
    /// The other bundles the spec names (`JobSpec::extra_models`: its LoRAs
    /// in order, then its VAE, then its upscaler), each with the directory
    /// holding it, verified and pinned for the job's duration.
    pub extras: &'a [(ModelManifest, PathBuf)],
}

impl Job<'_> {
    /// The bundle of model `id` among the extras.
    pub fn extra(&self, id: &crate::types::ModelId) -> Option<&(ModelManifest, PathBuf)> {
        self.extras.iter().find(|(m, _)| &m.id == id)
    }
}

/// What a generation produced.
#[derive(Debug, Default)]
pub struct Output {
    /// PNG files.
    pub images: Vec<Vec<u8>>,
    /// Seconds spent preparing the job's LoRA set.
    pub lora_s: f64,
    /// Seconds spent upscaling.
    pub upscale_s: f64,
}

/// A model ready to generate. Called from blocking threads.
pub trait LoadedModel: Send + Sync + 'static {
    /// Memory the loaded model holds (VRAM, or RAM on CPU).
    fn resident_bytes(&self) -> u64;
    /// Generates `spec.num_images` PNGs. `on_step(done, total)` returns
    /// false to cancel; generation then stops within one step with
    /// [`Error::Cancelled`]-like `Unavailable("cancelled")`.
    fn generate(&self, job: &Job, on_step: &mut dyn FnMut(u32, u32) -> bool) -> Result<Output>;
}

/// Builds the engine a worker was configured with.
pub fn from_config(cfg: &crate::config::WorkerConfig) -> Result<Arc<dyn Engine>> {
    match cfg.engine {
        crate::config::EngineKind::Synthetic => {
            tracing::warn!(
                "using the synthetic engine: images are test patterns, not Stable Diffusion"
            );
            Ok(Arc::new(SyntheticEngine {
                step_ms: cfg.synthetic_step_ms,
            }))
        }
        crate::config::EngineKind::Onnx => Ok(Arc::new(crate::worker::onnx::OnnxEngine::new(cfg)?)),
    }
}

/// The error a cancelled generation returns.
pub fn cancelled() -> Error {
    Error::Unavailable("cancelled".into())
}

/// A stand-in for control-plane tests and load benchmarks: draws a
/// deterministic pattern from the seed and prompt, sleeping `step_ms` per
/// step. Never the default.
#[derive(Clone, Debug)]
pub struct SyntheticEngine {
    pub step_ms: u64,
}

struct SyntheticModel {
    model: String,
    bytes: u64,
    step_ms: u64,
}

impl Engine for SyntheticEngine {
    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn load(&self, manifest: &ModelManifest, dir: &Path) -> Result<Arc<dyn LoadedModel>> {
        // Touch the files like a real load would, so a missing bundle fails.
        for f in &manifest.files {
            let p = dir.join(&f.path);
            std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(Arc::new(SyntheticModel {
            model: manifest.id.0.clone(),
            bytes: manifest.total_bytes(),
            step_ms: self.step_ms,
        }))
    }
}

impl LoadedModel for SyntheticModel {
    fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    fn generate(&self, job: &Job, on_step: &mut dyn FnMut(u32, u32) -> bool) -> Result<Output> {
        let spec = job.spec;
        // Touch the extras like a real engine would, so a missing one fails.
        for (m, dir) in job.extras {
            for f in &m.files {
                let p = dir.join(&f.path);
                std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        for step in 1..=spec.steps {
            if self.step_ms > 0 {
                std::thread::sleep(Duration::from_millis(self.step_ms));
            }
            if !on_step(step, spec.steps) {
                return Err(cancelled());
            }
        }
        let images = (0..spec.num_images)
            .map(|i| synthetic_png(&self.model, spec, spec.seed.wrapping_add(u64::from(i))))
            .collect::<Result<_>>()?;
        Ok(Output {
            images,
            ..Output::default()
        })
    }
}

/// A small deterministic PNG (at most 64x64) that depends on the model,
/// prompt and seed.
pub fn synthetic_png(model: &str, spec: &JobSpec, seed: u64) -> Result<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(model.as_bytes())
        .chain_update(spec.prompt.as_bytes())
        .chain_update(seed.to_le_bytes())
        .finalize();
    let (w, h) = (
        (spec.width / 8).clamp(1, 64),
        (spec.height / 8).clamp(1, 64),
    );
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            pixels.push(digest[0].wrapping_add((x * 4) as u8));
            pixels.push(digest[1].wrapping_add((y * 4) as u8));
            pixels.push(digest[2] ^ digest[((x + y) % 32) as usize]);
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk(
            "parameters".into(),
            format!(
                "{}\nSteps: {}, Seed: {seed}, Size: {}x{}, Model: {model}, Engine: synthetic",
                spec.prompt, spec.steps, spec.width, spec.height
            ),
        )
        .map_err(|e| Error::Internal(format!("png: {e}")))?;
        let mut writer = enc
            .write_header()
            .map_err(|e| Error::Internal(format!("png: {e}")))?;
        writer
            .write_image_data(&pixels)
            .map_err(|e| Error::Internal(format!("png: {e}")))?;
    }
    Ok(out)
}
