//! Running a loaded pipeline: prompt encoding (one text encoder, or SDXL's two with the pooled
//! prompt), image-to-image encoding, the guided denoising loop (UNet through IO binding), VAE
//! decoding, the optional upscaler and PNG encoding. Loading lives in `load.rs`, request
//! checks in `request.rs`.

use std::time::Instant;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::SessionInputValue;
use ort::value::DynTensor;

use super::image::RgbImage;
use super::lora::merge::PreparedLoras;
use super::request::Plan;
use super::schedulers::{Sampler, SchedulerKind};
use super::tensors::{float_tensor, number_tensor, read_floats};
use super::vae::VaeModel;
use super::{
    lock, noise, png, Encoded, GenerateRequest, GenerateTimings, Image, Pipeline, PipelineError,
    TextEncoder,
};

/// Most latents one UNet run takes when the model's batch is dynamic.
pub const MAX_UNET_BATCH: usize = 8;

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

impl Pipeline {
    /// Generates `num_images` PNGs. `on_step(done, total)` is called after every denoising step;
    /// returning false cancels before the next one ([`PipelineError::Cancelled`]).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<Image>, PipelineError> {
        self.generate_timed(req, on_step).map(|(images, _)| images)
    }

    /// As [`Pipeline::generate`], with where the time went.
    pub fn generate_timed(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<(Vec<Image>, GenerateTimings), PipelineError> {
        let plan = self.plan(req)?;
        let (w, h) = (plan.width, plan.height);
        let per = self.latent_len(w, h);
        let n = req.num_images as usize;
        let noise = noise::initial_noise(req.seed, n, per);
        let mut t = GenerateTimings::default();
        let latents = self.denoise_planned(req, &plan, &noise, &mut t, on_step)?;
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
        let vae = self.vae_for(req);
        let mut images = Vec::with_capacity(n);
        for (i, lat) in latents.chunks(per).enumerate() {
            let started = Instant::now();
            let pixels = vae.decode(lat, w, h)?;
            let mut img = RgbImage {
                width: w,
                height: h,
                rgb: png::to_rgb8(&pixels, w as usize, h as usize),
            };
            t.vae_decode_s += secs(started);
            if let Some(up) = &req.upscaler {
                let started = Instant::now();
                img = up.upscale(&img)?;
                t.upscale_s += secs(started);
            }
            let started = Instant::now();
            let seed = req.seed.wrapping_add(i as u64);
            let params = png::Parameters {
                prompt: &req.prompt,
                negative_prompt: &req.negative_prompt,
                steps: req.steps,
                sampler: plan.kind.a1111_name(),
                guidance_scale: req.guidance_scale,
                seed,
                width: w,
                height: h,
                model,
                loras: &loras,
                denoising_strength: plan.init.as_ref().map(|_| req.strength),
                upscaler: req.upscaler.as_ref().map(|u| (u.name(), u.scale())),
            };
            let png = png::encode_rgb(img.width, img.height, &img.rgb, &params.to_a1111())?;
            t.png_encode_s += secs(started);
            images.push(Image { png, seed });
        }
        Ok((images, t))
    }

    fn vae_for<'a>(&'a self, req: &'a GenerateRequest) -> &'a VaeModel {
        req.vae.as_deref().unwrap_or(&self.vae)
    }

    /// The (first) text encoder's hidden states for each prompt: `[texts.len(), seq, dim]`;
    /// for SDXL both encoders' penultimate states, concatenated along `dim`.
    pub fn encode_prompts(&self, texts: &[&str]) -> Result<(Vec<f32>, [usize; 2]), PipelineError> {
        self.encode_prompts_with(texts, None)
            .map(|e| (e.data, e.dims))
    }

    fn run_text_encoder(
        te: &TextEncoder,
        texts: &[&str],
        loras: Option<&PreparedLoras>,
    ) -> Result<(Vec<f32>, usize, Vec<f32>, usize), PipelineError> {
        let patched = loras.map_or(&[][..], |l| l.for_component(te.component));
        let name = te.component.dir();
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| te.tokenizer.encode(t))
            .collect::<Result<_, _>>()?;
        let seq = te.tokenizer.max_len();
        let batch = match te.input.fixed_dim(0) {
            Some(b) if b < ids.len() => b,
            _ => ids.len(),
        };
        let (mut out, mut dim) = (Vec::new(), 0);
        let (mut pooled, mut pooled_dim) = (Vec::new(), 0);
        let mut session = lock(&te.session);
        for chunk in ids.chunks(batch) {
            let flat: Vec<f64> = chunk.iter().flatten().map(|&i| i as f64).collect();
            let input = number_tensor(te.input.ty, &[chunk.len(), seq], &flat)?;
            let mut feeds: Vec<(&str, SessionInputValue<'_>)> =
                vec![(te.input.name.as_str(), input.into())];
            feeds.extend(patched.iter().map(|(n, t)| (n.as_str(), t.into())));
            let mut outputs = session
                .run(feeds)
                .map_err(|e| PipelineError::Runtime(format!("{name}: {e}")))?;
            let value = outputs.remove(&te.output.name).ok_or_else(|| {
                PipelineError::BadModel(format!("{name} returned no {}", te.output.name))
            })?;
            let (shape, data) = read_floats(value)?;
            if shape.len() != 3 || shape[0] != chunk.len() || shape[1] != seq {
                return Err(PipelineError::BadModel(format!(
                    "{name} returned shape {shape:?}, expected [{}, {seq}, dim]",
                    chunk.len()
                )));
            }
            dim = shape[2];
            out.extend_from_slice(&data);
            if let Some(p) = &te.pooled {
                let value = outputs.remove(&p.name).ok_or_else(|| {
                    PipelineError::BadModel(format!("{name} returned no {}", p.name))
                })?;
                let (shape, data) = read_floats(value)?;
                pooled_dim = shape.last().copied().unwrap_or(0);
                pooled.extend_from_slice(&data);
            }
        }
        Ok((out, dim, pooled, pooled_dim))
    }

    /// All text encoders on `texts`, with a LoRA set's text-encoder weights.
    pub(crate) fn encode_prompts_with(
        &self,
        texts: &[&str],
        loras: Option<&PreparedLoras>,
    ) -> Result<Encoded, PipelineError> {
        let mut parts = Vec::new();
        let (mut pooled, mut pooled_dim) = (Vec::new(), 0);
        for te in &self.text_encoders {
            let (h, d, p, pd) = Self::run_text_encoder(te, texts, loras)?;
            parts.push((h, d));
            if pd > 0 {
                (pooled, pooled_dim) = (p, pd);
            }
        }
        let seq = self.text_encoders[0].tokenizer.max_len();
        let dim: usize = parts.iter().map(|(_, d)| d).sum();
        let data = if parts.len() == 1 {
            parts.remove(0).0
        } else {
            // Concatenate along the feature axis, token by token.
            let mut data = Vec::with_capacity(texts.len() * seq * dim);
            for row in 0..texts.len() * seq {
                for (h, d) in &parts {
                    data.extend_from_slice(&h[row * d..(row + 1) * d]);
                }
            }
            data
        };
        Ok(Encoded {
            data,
            dims: [seq, dim],
            pooled,
            pooled_dim,
        })
    }

    /// Runs the denoising loop from the given unit-variance initial noise (`num_images` images
    /// of [`Pipeline::latent_len`] values each) and returns the final latents (before the VAE's
    /// scaling factor is undone). With `init_image` it runs image-to-image. The lower-level entry
    /// the golden tests use.
    pub fn denoise(
        &self,
        req: &GenerateRequest,
        noise: &[f32],
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<f32>, PipelineError> {
        let plan = self.plan(req)?;
        self.denoise_planned(req, &plan, noise, &mut GenerateTimings::default(), on_step)
    }

    fn denoise_planned(
        &self,
        req: &GenerateRequest,
        plan: &Plan,
        noise: &[f32],
        t: &mut GenerateTimings,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<f32>, PipelineError> {
        let n = req.num_images as usize;
        let per = self.latent_len(plan.width, plan.height);
        if noise.len() != n * per {
            return Err(PipelineError::InvalidRequest(format!(
                "initial noise has {} values, expected {}",
                noise.len(),
                n * per
            )));
        }
        let started = Instant::now();
        let loras = self.prepare_loras(&req.loras)?;
        t.lora_prepare_s = secs(started);
        let started = Instant::now();
        let emb = self.encode_request(req, loras.as_deref())?;
        t.text_encoder_s = secs(started);
        let init = match &plan.init {
            Some((img, start)) => {
                let started = Instant::now();
                let seeds: Vec<u64> = (0..n as u64).map(|i| req.seed.wrapping_add(i)).collect();
                // A separate VAE encodes when it has an encoder, else the checkpoint's does.
                let enc = req
                    .vae
                    .as_deref()
                    .filter(|v| v.has_encoder())
                    .unwrap_or(&self.vae);
                let latents = enc.encode(&img.to_chw_signed(), plan.width, plan.height, &seeds)?;
                t.vae_encode_s = secs(started);
                Some((latents, *start))
            }
            None => None,
        };
        let started = Instant::now();
        let x = self.denoise_encoded(
            req,
            plan.kind,
            (plan.width, plan.height),
            &emb,
            loras.as_deref(),
            noise,
            init.as_ref().map(|(l, s)| (l.as_slice(), *s)),
            on_step,
        )?;
        t.denoise_s = secs(started);
        Ok(x)
    }

    /// The hidden states a request's UNet passes attend to: `[negative, prompt]` with guidance,
    /// `[prompt]` without (diffusers skips the unconditional pass when the scale is <= 1). For
    /// SDXL an empty negative prompt is zeros (`force_zeros_for_empty_prompt`).
    pub(crate) fn encode_request(
        &self,
        req: &GenerateRequest,
        loras: Option<&PreparedLoras>,
    ) -> Result<Encoded, PipelineError> {
        if req.guidance_scale <= 1.0 {
            return self.encode_prompts_with(&[&req.prompt], loras);
        }
        if self.force_zeros_for_empty_prompt && req.negative_prompt.is_empty() {
            let cond = self.encode_prompts_with(&[&req.prompt], loras)?;
            let mut data = vec![0.0; cond.data.len()];
            data.extend_from_slice(&cond.data);
            let mut pooled = vec![0.0; cond.pooled.len()];
            pooled.extend_from_slice(&cond.pooled);
            return Ok(Encoded {
                data,
                pooled,
                ..cond
            });
        }
        self.encode_prompts_with(&[&req.negative_prompt, &req.prompt], loras)
    }

    /// The denoising loop proper, from encoded prompts and checked initial noise; with `init`
    /// (image-to-image latents and the first step), from those latents noised to that step.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn denoise_encoded(
        &self,
        req: &GenerateRequest,
        kind: SchedulerKind,
        (width, height): (u32, u32),
        emb: &Encoded,
        loras: Option<&PreparedLoras>,
        noise: &[f32],
        init: Option<(&[f32], usize)>,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<f32>, PipelineError> {
        let patched = loras.map_or(&[][..], |l| l.for_component(super::Component::Unet));
        let n = req.num_images as usize;
        let per = self.latent_len(width, height);
        let (lh, lw) = (
            height as usize / self.vae_scale,
            width as usize / self.vae_scale,
        );
        let guided = req.guidance_scale > 1.0;
        let ([seq, dim], pdim) = (emb.dims, emb.pooled_dim);
        let emb_len = seq * dim;
        // UNet batch: [uncond x n, cond x n] with guidance, else [cond x n].
        let copies = if guided { 2 } else { 1 };
        let total = copies * n;
        let repeat = |src: &[f32], len: usize| {
            let mut v = Vec::with_capacity(total * len);
            for c in 0..copies {
                for _ in 0..n {
                    v.extend_from_slice(&src[c * len..(c + 1) * len]);
                }
            }
            v
        };
        let hidden = repeat(&emb.data, emb_len);
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
        // Per UNet run: the hidden states and, for SDXL, the pooled prompt and the time ids
        // (original size, crop top-left, target size: diffusers' defaults, no crop).
        let mut constant: Vec<Vec<(&str, DynTensor)>> = Vec::new();
        let pooled = repeat(&emb.pooled, pdim);
        let (hf, wf) = (height as f32, width as f32);
        let time_ids: Vec<f32> = (0..chunk)
            .flat_map(|_| [hf, wf, 0.0, 0.0, hf, wf])
            .collect();
        for k in 0..total / chunk {
            let mut v = vec![(
                self.unet.hidden.name.as_str(),
                float_tensor(
                    self.unet.hidden.ty,
                    &[chunk, seq, dim],
                    &hidden[k * chunk * emb_len..(k + 1) * chunk * emb_len],
                )?,
            )];
            if let (Some(te), Some(ti)) = (&self.unet.text_embeds, &self.unet.time_ids) {
                v.push((
                    te.name.as_str(),
                    float_tensor(
                        te.ty,
                        &[chunk, pdim],
                        &pooled[k * chunk * pdim..(k + 1) * chunk * pdim],
                    )?,
                ));
                v.push((
                    ti.name.as_str(),
                    float_tensor(ti.ty, &[chunk, 6], &time_ids)?,
                ));
            }
            constant.push(v);
        }

        let seeds: Vec<u64> = (0..n as u64).map(|i| req.seed.wrapping_add(i)).collect();
        let mut sampler = Sampler::new(&self.scheduler, kind, req.steps as usize, &seeds, per);
        let (mut x, start) = match init {
            Some((latents, start)) => (sampler.add_noise(latents, noise, start), start),
            None => {
                let s = sampler.init_noise_sigma();
                (noise.iter().map(|v| v * s).collect::<Vec<f32>>(), 0)
            }
        };
        let steps = sampler.timesteps().len();
        let mut session = lock(&self.unet.session);
        // IO binding: the constant inputs are bound once per request (moved to the GPU once on
        // CUDA), the output is bound to CPU memory; only the latents cross per step.
        let rt = |e: ort::Error| PipelineError::Runtime(format!("unet binding: {e}"));
        let cpu = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(rt)?;
        let mut bindings = Vec::with_capacity(constant.len());
        for inputs in constant {
            let mut b = session.create_binding().map_err(rt)?;
            for (name, t) in inputs {
                b.bind_input(name, &self.to_device(t)).map_err(rt)?;
            }
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
        for i in start..steps {
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
            if !on_step((i - start) as u32 + 1, (steps - start) as u32) {
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
                Err(e) => tracing::warn!(error = %e, "tensor stays in host memory"),
            }
        }
        t
    }

    /// Decodes one image's latents with the checkpoint's VAE to `[3, height, width]` pixels in
    /// [-1, 1] (NaN/inf output is an error, see [`VaeModel::decode`]).
    pub fn decode(
        &self,
        latents: &[f32],
        width: u32,
        height: u32,
    ) -> Result<Vec<f32>, PipelineError> {
        self.vae.decode(latents, width, height)
    }
}
