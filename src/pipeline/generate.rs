//! Running a loaded pipeline: prompt encoding, the guided denoising loop (UNet through IO
//! binding), VAE decoding and PNG encoding. Loading lives in `mod.rs`.

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::SessionInputValue;
use ort::value::DynTensor;

use super::lora::merge::PreparedLoras;
use super::lora::Component;
use super::schedulers::{Sampler, SchedulerKind};
use super::tensors::{float_tensor, number_tensor, read_floats};
use super::{lock, noise, png, Encoded, GenerateRequest, Image, Pipeline, PipelineError};

/// Most latents one UNet run takes when the model's batch is dynamic.
pub const MAX_UNET_BATCH: usize = 8;

impl Pipeline {
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
        let loras: Vec<png::LoraUse<'_>> = req
            .loras
            .iter()
            .map(|l| png::LoraUse {
                name: l.lora.name(),
                weight: l.weight,
                short_hash: l.lora.short_hash(),
            })
            .collect();
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
                loras: &loras,
            };
            let png = png::encode_rgb(req.width, req.height, &rgb, &params.to_a1111())?;
            images.push(Image { png, seed });
        }
        Ok(images)
    }

    /// The text encoder's hidden states for each prompt, concatenated: `[texts.len(), seq, dim]`.
    pub fn encode_prompts(&self, texts: &[&str]) -> Result<(Vec<f32>, [usize; 2]), PipelineError> {
        self.encode_prompts_with(texts, None)
    }

    /// As [`Pipeline::encode_prompts`], with the text-encoder weights of a LoRA set.
    pub(crate) fn encode_prompts_with(
        &self,
        texts: &[&str],
        loras: Option<&PreparedLoras>,
    ) -> Result<(Vec<f32>, [usize; 2]), PipelineError> {
        let patched = loras.map_or(&[][..], |l| l.for_component(Component::TextEncoder));
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
            let mut feeds: Vec<(&str, SessionInputValue<'_>)> =
                vec![(self.text_encoder.input.name.as_str(), input.into())];
            feeds.extend(patched.iter().map(|(n, t)| (n.as_str(), t.into())));
            let mut outputs = session
                .run(feeds)
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
        let loras = self.prepare_loras(&req.loras)?;
        let emb = self.encode_request(req, loras.as_deref())?;
        self.denoise_encoded(req, kind, &emb, loras.as_deref(), noise, on_step)
    }

    /// The hidden states a request's UNet passes attend to: `[negative, prompt]` with guidance,
    /// `[prompt]` without (diffusers skips the unconditional pass when the scale is <= 1).
    pub(crate) fn encode_request(
        &self,
        req: &GenerateRequest,
        loras: Option<&PreparedLoras>,
    ) -> Result<Encoded, PipelineError> {
        let (data, dims) = if req.guidance_scale > 1.0 {
            self.encode_prompts_with(&[&req.negative_prompt, &req.prompt], loras)?
        } else {
            self.encode_prompts_with(&[&req.prompt], loras)?
        };
        Ok(Encoded { data, dims })
    }

    /// The denoising loop proper, from encoded prompts and checked initial noise.
    pub(crate) fn denoise_encoded(
        &self,
        req: &GenerateRequest,
        kind: SchedulerKind,
        emb: &Encoded,
        loras: Option<&PreparedLoras>,
        noise: &[f32],
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<f32>, PipelineError> {
        let patched = loras.map_or(&[][..], |l| l.for_component(Component::Unet));
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
            // Bound the UNet batch (activation memory grows with it): the largest divisor of
            // the batch up to MAX_UNET_BATCH, so every run has the same shape.
            None => (1..=MAX_UNET_BATCH.min(total))
                .rev()
                .find(|c| total % c == 0)
                .unwrap_or(1),
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
            // A LoRA set's merged weights replace the base ones for the whole request.
            for (name, w) in patched {
                b.bind_input(name.as_str(), w).map_err(rt)?;
            }
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
            let div = sampler.input_divisor(i);
            for c in 0..copies {
                for (d, s) in model_in[c * n * per..(c + 1) * n * per].iter_mut().zip(&x) {
                    *d = s / div;
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
    pub(crate) fn to_device(&self, t: DynTensor) -> DynTensor {
        #[cfg(feature = "cuda")]
        if let super::Device::Cuda { device_id } = self.device {
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
