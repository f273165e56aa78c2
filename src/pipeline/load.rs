//! Loading an optimum ONNX export: checking the layout, reading the configurations, building
//! the sessions (weights that LoRAs may patch declared as overridable inputs, see
//! [`super::lora::merge`]) and discovering their inputs and outputs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ort::session::Session;
use serde_json::Value;

use super::lora::merge::{ComponentWeights, LoraCache};
use super::lora::Component;
use super::runtime::{self, ModelSource};
use super::schedulers::SchedulerConfig;
use super::tensors::find_port;
use super::tokenizer::ClipTokenizer;
use super::{
    Device, LoadTimings, ModelFamily, Pipeline, PipelineConfig, PipelineError, TextEncoder, Unet,
    Vae,
};

pub(crate) fn require(path: PathBuf, what: &str) -> Result<PathBuf, PipelineError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(PipelineError::MissingFile {
            path,
            what: what.into(),
        })
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| PipelineError::BadModel(format!("{}: {e}", path.display())))
}

/// Bytes of a model file and its external data, if any.
pub(crate) fn model_bytes(model: &Path) -> u64 {
    let data = model.with_file_name("model.onnx_data");
    [model.to_path_buf(), data]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A component to build a session for: its file, and the LoRA-patchable weights if it has a
/// name map (then the session is built from the rewritten bytes).
struct Part {
    path: PathBuf,
    weights: Option<ComponentWeights>,
    bytes: Option<Vec<u8>>,
}

impl Part {
    fn new(path: PathBuf, component: Option<Component>, conv: bool) -> Result<Self, PipelineError> {
        let weights = match component {
            Some(c) => ComponentWeights::load(&path, c, conv)?,
            None => None,
        };
        let bytes = weights.as_ref().map(|w| w.model_bytes()).transpose()?;
        Ok(Part {
            path,
            weights,
            bytes,
        })
    }

    fn source(&self) -> ModelSource<'_> {
        ModelSource {
            path: &self.path,
            bytes: self.bytes.as_deref(),
        }
    }

    /// Names the overridable set in the optimized-graph cache key: another name map (or
    /// `lora_conv` setting) must not reuse a graph built with other inputs.
    fn variant(&self) -> String {
        self.weights
            .as_ref()
            .map(|w| w.overridable().join(","))
            .unwrap_or_default()
    }
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
        let load_parts = |device: Device| -> Result<Vec<Part>, PipelineError> {
            let conv = cfg.lora_conv.unwrap_or(device != Device::Cpu);
            Ok(vec![
                Part::new(te_path.clone(), Some(Component::TextEncoder), conv)?,
                Part::new(unet_path.clone(), Some(Component::Unet), conv)?,
                Part::new(vae_path.clone(), None, conv)?,
            ])
        };
        let mut parts = load_parts(cfg.device)?;
        let (sessions, device) = match Self::sessions(&parts, cfg, optimized_dir) {
            Ok(s) => (s, cfg.device),
            Err(e) if cfg.allow_cpu_fallback && cfg.device != Device::Cpu => {
                tracing::warn!(error = %e, "CUDA unavailable; falling back to the CPU");
                let cpu = PipelineConfig {
                    device: Device::Cpu,
                    ..cfg.clone()
                };
                parts = load_parts(Device::Cpu)?;
                (Self::sessions(&parts, &cpu, optimized_dir)?, Device::Cpu)
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
        let family = ModelFamily::from_cross_attention_dim(
            unet.hidden
                .fixed_dim(2)
                .or(text_encoder.output.fixed_dim(2))
                .unwrap_or(0),
        );
        let model_id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Pipeline {
            model_id,
            device,
            family,
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
            lora_weights: parts.into_iter().filter_map(|p| p.weights).collect(),
            lora_cache: LoraCache::new(cfg.lora_cache_bytes),
        })
    }

    fn sessions(
        parts: &[Part],
        cfg: &PipelineConfig,
        optimized_dir: Option<&Path>,
    ) -> Result<Vec<Session>, PipelineError> {
        let lib = runtime::init()?;
        parts
            .iter()
            .map(|p| {
                let key = optimized_dir.map(|d| runtime::OptimizedCache {
                    dir: d,
                    key: cache_key(&p.path, &p.variant(), cfg.device, &lib),
                });
                runtime::build_session(p.source(), cfg, key.as_ref())
            })
            .collect()
    }
}

/// Names a cached optimized graph after the model file (size, mtime), the overridable weights,
/// the device and the ONNX Runtime library, so that a changed model or runtime never reads a
/// stale graph.
fn cache_key(model: &Path, variant: &str, device: Device, lib: &Path) -> String {
    use sha2::{Digest, Sha256};
    let meta = std::fs::metadata(model).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(format!(
        "{}|{}|{mtime}|{device:?}|{}|{variant}",
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
