//! The VAE: a checkpoint's own (`vae_decoder/`, optional `vae_encoder/`) or a separate bundle
//! of the same layout that replaces it per request ([`VaeModel::load`]).
//!
//! Owns: decoding latents to pixels (refusing NaN/inf output, the fp16 overflow of the SDXL
//! VAE, with an error instead of a black image) and encoding pixels to latents for
//! image-to-image (optimum's `latent_parameters`: mean and log-variance, sampled with the
//! documented noise stream of [`super::noise::VAE_ENCODE_STREAM_KEY`]).

use std::path::Path;
use std::sync::Mutex;

use ort::session::Session;
use serde_json::Value;

use super::load::{cached_session, read_json, require};
use super::noise::{NoiseRng, VAE_ENCODE_STREAM_KEY};
use super::runtime::{self, ModelSource};

use super::tensors::{find_port, float_tensor, read_floats, Port};
use super::{lock, PipelineConfig, PipelineError};

struct Decoder {
    session: Mutex<Session>,
    input: Port,
    output: Port,
}

struct Encoder {
    session: Mutex<Session>,
    input: Port,
    output: Port,
}

/// A loaded VAE (decoder, and encoder when the bundle has one).
pub struct VaeModel {
    name: String,
    decoder: Decoder,
    encoder: Option<Encoder>,
    scaling_factor: f32,
    /// Pixels per latent (8).
    scale: usize,
    latent_channels: usize,
    /// `force_upcast` in the config: the VAE overflows in fp16 (SDXL's).
    force_upcast: bool,
    bytes: u64,
}

impl std::fmt::Debug for VaeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaeModel")
            .field("name", &self.name)
            .field("scaling_factor", &self.scaling_factor)
            .field("encoder", &self.encoder.is_some())
            .finish()
    }
}

/// Two VAEs are equal when they are the same loaded object.
impl PartialEq for VaeModel {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

fn config(dir: &Path) -> Result<Option<Value>, PipelineError> {
    for part in ["vae_decoder", "vae_encoder", "vae"] {
        let p = dir.join(part).join("config.json");
        if p.is_file() {
            return read_json(&p).map(Some);
        }
    }
    Ok(None)
}

impl VaeModel {
    /// Loads `dir/vae_decoder/model.onnx` (+ `config.json`: scaling_factor, default 0.18215)
    /// and `dir/vae_encoder/model.onnx` when present.
    pub fn load(dir: &Path, cfg: &PipelineConfig) -> Result<VaeModel, PipelineError> {
        Self::load_with_cache(dir, cfg, None)
    }

    /// As [`VaeModel::load`], through ONNX Runtime's optimized-graph cache.
    pub fn load_with_cache(
        dir: &Path,
        cfg: &PipelineConfig,
        optimized_dir: Option<&Path>,
    ) -> Result<VaeModel, PipelineError> {
        runtime::init()?;
        let dec_path = require(dir.join("vae_decoder/model.onnx"), "the VAE decoder")?;
        let enc_path = dir.join("vae_encoder/model.onnx");
        let cfg_json = config(dir)?;
        let get = |k: &str| cfg_json.as_ref().and_then(|c| c.get(k).cloned());
        let scaling_factor = get("scaling_factor")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.18215) as f32;
        let scale = get("block_out_channels")
            .and_then(|v| v.as_array().map(|a| 1usize << a.len().saturating_sub(1)))
            .unwrap_or(8);
        let force_upcast = get("force_upcast")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        fn source(path: &Path) -> ModelSource<'_> {
            ModelSource { path, bytes: None }
        }
        let dec = cached_session(source(&dec_path), "", cfg, optimized_dir)?;
        let decoder = Decoder {
            input: find_port(&dec, false, "vae_decoder", &["latent_sample"], |p| {
                p.is_float()
            })?,
            output: find_port(&dec, true, "vae_decoder", &["sample"], |p| {
                p.shape.len() == 4
            })?,
            session: Mutex::new(dec),
        };
        if !decoder.input.is_float() {
            return Err(PipelineError::BadModel(format!(
                "vae latent_sample must be float16 or float32, is {:?}",
                decoder.input.ty
            )));
        }
        let encoder = if enc_path.is_file() {
            let enc = cached_session(source(&enc_path), "", cfg, optimized_dir)?;
            Some(Encoder {
                input: find_port(&enc, false, "vae_encoder", &["sample"], |p| p.is_float())?,
                output: find_port(
                    &enc,
                    true,
                    "vae_encoder",
                    &["latent_parameters", "latent_sample"],
                    |p| p.shape.len() == 4,
                )?,
                session: Mutex::new(enc),
            })
        } else {
            None
        };
        let latent_channels = decoder.input.fixed_dim(1).unwrap_or(4);
        let bytes = super::load::model_bytes(&dec_path)
            + if enc_path.is_file() {
                super::load::model_bytes(&enc_path)
            } else {
                0
            };
        Ok(VaeModel {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            decoder,
            encoder,
            scaling_factor,
            scale,
            latent_channels,
            force_upcast,
            bytes,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn scaling_factor(&self) -> f32 {
        self.scaling_factor
    }

    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// Size of the model files.
    pub fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    /// Decodes one image's latents (as the UNet left them, before 1/scaling_factor) to
    /// `[3, height, width]` pixels in [-1, 1].
    pub fn decode(
        &self,
        latents: &[f32],
        width: u32,
        height: u32,
    ) -> Result<Vec<f32>, PipelineError> {
        let (lh, lw) = (height as usize / self.scale, width as usize / self.scale);
        let scaled: Vec<f32> = latents.iter().map(|v| v / self.scaling_factor).collect();
        let input = float_tensor(
            self.decoder.input.ty,
            &[1, self.latent_channels, lh, lw],
            &scaled,
        )?;
        let mut session = lock(&self.decoder.session);
        let mut outputs = session
            .run(vec![(self.decoder.input.name.as_str(), input)])
            .map_err(|e| PipelineError::Runtime(format!("vae decoder: {e}")))?;
        let value = outputs
            .remove(&self.decoder.output.name)
            .ok_or_else(|| PipelineError::BadModel("the VAE decoder returned no sample".into()))?;
        let (shape, data) = read_floats(value)?;
        if shape != [1, 3, height as usize, width as usize] {
            return Err(PipelineError::BadModel(format!(
                "the VAE decoder returned shape {shape:?}, expected [1, 3, {height}, {width}]"
            )));
        }
        let bad = data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            let why = if self.decoder.input.ty == ort::value::TensorElementType::Float16 {
                if self.force_upcast {
                    "this VAE overflows in float16 (its config says force_upcast): use a float32 \
                     vae_decoder, or a VAE fixed for float16 (e.g. sdxl-vae-fp16-fix) as a \
                     separate VAE"
                } else {
                    "a float16 overflow: try a float32 vae_decoder or a separate VAE"
                }
            } else {
                "the latents were out of range"
            };
            return Err(PipelineError::BadModel(format!(
                "the VAE decoder {} returned {bad} NaN/inf values: {why}",
                self.name
            )));
        }
        Ok(data)
    }

    /// Encodes one image (`[3, h, w]` in [-1, 1]) to latents (scaled by scaling_factor, as the
    /// UNet works on them), one sample per seed: mean + std * noise, the noise drawn from
    /// `seed ^ VAE_ENCODE_STREAM_KEY`. An encoder that outputs 4-channel `latent_sample` is
    /// used as is.
    pub fn encode(
        &self,
        chw: &[f32],
        width: u32,
        height: u32,
        seeds: &[u64],
    ) -> Result<Vec<f32>, PipelineError> {
        let enc = self.encoder.as_ref().ok_or_else(|| {
            PipelineError::InvalidRequest(format!(
                "init_image: the VAE {} has no vae_encoder, image-to-image needs one",
                self.name
            ))
        })?;
        let input = float_tensor(enc.input.ty, &[1, 3, height as usize, width as usize], chw)?;
        let mut session = lock(&enc.session);
        let mut outputs = session
            .run(vec![(enc.input.name.as_str(), input)])
            .map_err(|e| PipelineError::Runtime(format!("vae encoder: {e}")))?;
        let value = outputs
            .remove(&enc.output.name)
            .ok_or_else(|| PipelineError::BadModel("the VAE encoder returned nothing".into()))?;
        let (shape, data) = read_floats(value)?;
        let (lh, lw) = (height as usize / self.scale, width as usize / self.scale);
        let c = self.latent_channels;
        let per = c * lh * lw;
        let mut out = Vec::with_capacity(per * seeds.len());
        if shape == [1, 2 * c, lh, lw] {
            let (mean, logvar) = data.split_at(per);
            let std: Vec<f32> = logvar
                .iter()
                .map(|&l| (0.5 * f64::from(l.clamp(-30.0, 20.0))).exp() as f32)
                .collect();
            let mut z = vec![0f32; per];
            for &s in seeds {
                NoiseRng::new(s ^ VAE_ENCODE_STREAM_KEY).fill_normal(&mut z);
                out.extend(
                    mean.iter()
                        .zip(&std)
                        .zip(&z)
                        .map(|((m, sd), n)| (m + sd * n) * self.scaling_factor),
                );
            }
        } else if shape == [1, c, lh, lw] {
            for _ in seeds {
                out.extend(data.iter().map(|v| v * self.scaling_factor));
            }
        } else {
            return Err(PipelineError::BadModel(format!(
                "the VAE encoder returned shape {shape:?}, expected [1, {}, {lh}, {lw}]",
                2 * c
            )));
        }
        Ok(out)
    }
}
