//! Loading an optimum ONNX export (SD 1.x/2.x, SDXL): checking the layout, reading the
//! configurations, building the sessions (weights that LoRAs may patch declared as overridable inputs, see
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
use super::tensors::{find_port, Port};
use super::tokenizer::ClipTokenizer;
use super::vae::VaeModel;
use super::{
    Device, LoadTimings, ModelFamily, Pipeline, PipelineConfig, PipelineError, TextEncoder, Unet,
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

/// The text encoder's input ids, the hidden states the UNet reads, and SDXL's pooled output.
fn text_encoder_ports(
    session: &Session,
    name: &str,
    xl: bool,
) -> Result<(Port, Port, Option<Port>), PipelineError> {
    let input = find_port(session, false, name, &["input_ids"], |p| !p.is_float())?;
    let hidden = if xl {
        // optimum exports `hidden_states.0` (embeddings) .. `hidden_states.N`; diffusers' SDXL
        // reads `hidden_states[-2]`, the output of layer N - 1.
        let top = session
            .outputs()
            .iter()
            .filter_map(|o| {
                o.name()
                    .strip_prefix("hidden_states.")?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .filter(|&n| n >= 1)
            .ok_or_else(|| {
                PipelineError::BadModel(format!(
                    "{name}: an SDXL text encoder must output hidden_states.0..N (export with \
                     output_hidden_states, as optimum does)"
                ))
            })?;
        let want = format!("hidden_states.{}", top - 1);
        find_port(session, true, name, &[want.as_str()], |_| false)?
    } else {
        find_port(session, true, name, &["last_hidden_state"], |p| {
            p.shape.len() == 3
        })?
    };
    let pooled = if xl && name == "text_encoder_2" {
        Some(find_port(session, true, name, &["text_embeds"], |p| {
            p.shape.len() == 2
        })?)
    } else {
        None
    };
    Ok((input, hidden, pooled))
}

impl Pipeline {
    /// Loads an optimum ONNX export (SD 1.x/2.x, or SDXL with `text_encoder_2/`) on the
    /// configured device.
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
        let index = read_json(&require(
            dir.join("model_index.json"),
            "the pipeline index of an optimum export",
        )?)?;
        let class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let xl = dir.join("text_encoder_2").exists() || class.contains("XL");
        if class.contains("Refiner") || class.contains("Inpaint") || class.contains("Flux") {
            return Err(PipelineError::Unsupported(format!(
                "{class}: only StableDiffusionPipeline and StableDiffusionXLPipeline exports are \
                 supported"
            )));
        }
        let mut encoders = vec![(
            Component::TextEncoder,
            require(dir.join("text_encoder/model.onnx"), "the CLIP text encoder")?,
            require(dir.join("tokenizer"), "the tokenizer directory")?,
        )];
        if xl {
            encoders.push((
                Component::TextEncoder2,
                require(
                    dir.join("text_encoder_2/model.onnx"),
                    "SDXL's second text encoder",
                )?,
                require(dir.join("tokenizer_2"), "SDXL's second tokenizer directory")?,
            ));
        }
        let unet_path = require(dir.join("unet/model.onnx"), "the UNet")?;
        let sched_path = require(
            dir.join("scheduler/scheduler_config.json"),
            "the scheduler configuration",
        )?;
        let sched_text =
            std::fs::read_to_string(&sched_path).map_err(|e| PipelineError::io(&sched_path, e))?;
        let scheduler = SchedulerConfig::from_json(&sched_text)
            .map_err(|e| PipelineError::BadModel(format!("{}: {e}", sched_path.display())))?;
        let mut tokenizers = encoders
            .iter()
            .map(|(_, _, tok)| ClipTokenizer::load(tok))
            .collect::<Result<Vec<_>, _>>()?;

        let started = Instant::now();
        let load_parts = |device: Device| -> Result<Vec<Part>, PipelineError> {
            let conv = cfg.lora_conv.unwrap_or(device != Device::Cpu);
            let mut parts = encoders
                .iter()
                .map(|(c, path, _)| Part::new(path.clone(), Some(*c), conv))
                .collect::<Result<Vec<_>, _>>()?;
            parts.push(Part::new(unet_path.clone(), Some(Component::Unet), conv)?);
            Ok(parts)
        };
        let mut parts = load_parts(cfg.device)?;
        let (mut sessions, device) = match Self::sessions(&parts, cfg, optimized_dir) {
            Ok(s) => (s, cfg.device),
            Err(e) if cfg.allow_cpu_fallback && cfg.device != Device::Cpu => {
                tracing::warn!(error = %e, "CUDA unavailable; falling back to the CPU");
                parts = load_parts(Device::Cpu)?;
                (
                    Self::sessions(&parts, &cpu(cfg), optimized_dir)?,
                    Device::Cpu,
                )
            }
            Err(e) => return Err(e),
        };
        let vae_cfg = if device == cfg.device {
            cfg.clone()
        } else {
            cpu(cfg)
        };
        let vae = VaeModel::load_with_cache(dir, &vae_cfg, optimized_dir)?;
        let timings = LoadTimings {
            sessions_s: started.elapsed().as_secs_f64(),
        };
        let un = sessions
            .pop()
            .ok_or_else(|| PipelineError::Runtime("session count".into()))?;

        let mut text_encoders = Vec::new();
        for ((component, _, _), session) in encoders.iter().zip(sessions) {
            let name = component.dir();
            let (input, output, pooled) = text_encoder_ports(&session, name, xl)?;
            let mut tokenizer = tokenizers.remove(0);
            if let Some(n) = input.fixed_dim(1) {
                tokenizer.set_max_len(n);
            }
            text_encoders.push(TextEncoder {
                component: *component,
                session: Mutex::new(session),
                tokenizer,
                input,
                output,
                pooled,
            });
        }
        let extra = |name: &str| find_port(&un, false, "unet", &[name], |_| false).ok();
        // Weights declared as inputs for LoRAs are never taken for a data input by shape.
        let weights: std::collections::HashSet<String> = parts
            .iter()
            .filter_map(|p| p.weights.as_ref())
            .flat_map(|w| w.overridable())
            .collect();
        let data = |p: &Port| !weights.contains(&p.name);
        let unet = Unet {
            sample: find_port(&un, false, "unet", &["sample"], |p| {
                data(p) && p.is_float() && p.shape.len() == 4
            })?,
            timestep: find_port(&un, false, "unet", &["timestep", "timesteps", "t"], |p| {
                data(p) && p.shape.len() <= 1
            })?,
            hidden: find_port(&un, false, "unet", &["encoder_hidden_states"], |p| {
                data(p) && p.shape.len() == 3
            })?,
            output: find_port(&un, true, "unet", &["out_sample"], |p| p.shape.len() == 4)?,
            text_embeds: extra("text_embeds"),
            time_ids: extra("time_ids"),
            session: Mutex::new(un),
        };
        match (xl, unet.text_embeds.is_some() && unet.time_ids.is_some()) {
            (true, false) => {
                return Err(PipelineError::BadModel(
                    "unet: an SDXL UNet takes text_embeds and time_ids".into(),
                ))
            }
            (false, true) => {
                return Err(PipelineError::BadModel(
                    "unet: takes text_embeds and time_ids (SDXL) but the export has no \
                     text_encoder_2"
                        .into(),
                ))
            }
            _ => {}
        }
        let latent_channels = unet.sample.fixed_dim(1).unwrap_or(4);
        for (port, what) in [
            (&unet.sample, "unet sample"),
            (&unet.hidden, "unet encoder_hidden_states"),
        ] {
            if !port.is_float() {
                return Err(PipelineError::BadModel(format!(
                    "{what} must be float16 or float32, is {:?}",
                    port.ty
                )));
            }
        }
        let vae_scale = 8;
        let sample_size = std::fs::read_to_string(dir.join("unet/config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|c| c.get("sample_size")?.as_u64());
        let default_size = match sample_size {
            Some(n) => n as u32 * vae_scale as u32,
            None if xl => 1024,
            None => 512,
        };
        let force_zeros_for_empty_prompt = xl
            && index
                .get("force_zeros_for_empty_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        let family = ModelFamily::from_cross_attention_dim(
            unet.hidden
                .fixed_dim(2)
                .or(text_encoders[0].output.fixed_dim(2))
                .unwrap_or(0),
        );
        let model_id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let resident_bytes =
            parts.iter().map(|p| model_bytes(&p.path)).sum::<u64>() + vae.resident_bytes();
        Ok(Pipeline {
            model_id,
            device,
            family,
            scheduler,
            text_encoders,
            unet,
            vae,
            vae_scale,
            latent_channels,
            default_size,
            force_zeros_for_empty_prompt,
            resident_bytes,
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
        parts
            .iter()
            .map(|p| cached_session(p.source(), &p.variant(), cfg, optimized_dir))
            .collect()
    }
}

fn cpu(cfg: &PipelineConfig) -> PipelineConfig {
    PipelineConfig {
        device: Device::Cpu,
        ..cfg.clone()
    }
}

/// A session built through the optimized-graph cache when there is one.
pub(crate) fn cached_session(
    source: ModelSource<'_>,
    variant: &str,
    cfg: &PipelineConfig,
    optimized_dir: Option<&Path>,
) -> Result<Session, PipelineError> {
    let lib = runtime::init()?;
    let key = optimized_dir.map(|d| runtime::OptimizedCache {
        dir: d,
        key: cache_key(source.path, variant, cfg.device, &lib),
    });
    runtime::build_session(source, cfg, key.as_ref())
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
