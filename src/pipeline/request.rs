//! Checking a request against a loaded pipeline and resolving what it leaves open: the size
//! (0 = the model's default, or the input image's), the scheduler, and for image-to-image the
//! decoded input and the first step run. Every error names the request field.

use super::image::{self, RgbImage};
use super::schedulers::SchedulerKind;
use super::{GenerateRequest, Pipeline, PipelineError, MAX_IMAGES, MAX_STEPS};

/// A checked request.
pub(crate) struct Plan {
    pub kind: SchedulerKind,
    pub width: u32,
    pub height: u32,
    /// Image-to-image: the input picture and the index of the first step run.
    pub init: Option<(RgbImage, usize)>,
}

/// diffusers' img2img truncation: `init_timestep = min(int(steps * strength), steps)` steps run,
/// starting at index `steps - init_timestep`. The strength is taken as the decimal it prints as
/// (0.7f32 is 0.699999988, and 10 x that would truncate to 6 where Python's 10 * 0.7 gives 7).
pub(crate) fn img2img_start(steps: u32, strength: f32) -> usize {
    let s: f64 = strength.to_string().parse().unwrap_or(f64::from(strength));
    let run = ((f64::from(steps) * s) as u32).min(steps);
    (steps - run) as usize
}

impl Pipeline {
    pub(crate) fn plan(&self, req: &GenerateRequest) -> Result<Plan, PipelineError> {
        let bad = |m: String| Err(PipelineError::InvalidRequest(m));
        let init = req
            .init_image
            .as_deref()
            .map(|b| image::decode(b, "init_image"))
            .transpose()?;
        let (mut width, mut height) = (req.width, req.height);
        if let Some(img) = &init {
            if width == 0 && height == 0 {
                (width, height) = (img.width, img.height);
            } else if (img.width, img.height) != (width, height) {
                return bad(format!(
                    "init_image is {}x{}, the request asks for {width}x{height}: send an image \
                     of the output size (or width and height 0)",
                    img.width, img.height
                ));
            }
        }
        if width == 0 && height == 0 {
            (width, height) = (self.default_size, self.default_size);
        }
        let s = self.vae_scale as u32;
        let field = |name: &str| {
            if init.is_some() {
                format!("{name} (of init_image)")
            } else {
                name.to_string()
            }
        };
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % s != 0 || v > 4096 {
                return bad(format!(
                    "{} {v} must be a positive multiple of {s}, at most 4096",
                    field(name)
                ));
            }
        }
        if let (Some(h), Some(w)) = (self.unet.sample.fixed_dim(2), self.unet.sample.fixed_dim(3)) {
            let (mh, mw) = (h as u32 * s, w as u32 * s);
            if (width, height) != (mw, mh) {
                return bad(format!(
                    "size {width}x{height}: this model's UNet only takes {mw}x{mh}"
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
        if let Some(v) = &req.vae {
            if v.latent_channels() != self.latent_channels {
                return bad(format!(
                    "vae: {} has {} latent channels, this model {}",
                    v.name(),
                    v.latent_channels(),
                    self.latent_channels
                ));
            }
        }
        let kind = self.scheduler_kind(req)?;
        let init = match init {
            None => None,
            Some(img) => {
                if !req.strength.is_finite() || req.strength <= 0.0 || req.strength > 1.0 {
                    return bad(format!(
                        "strength {} must be in (0, 1] for image-to-image",
                        req.strength
                    ));
                }
                let start = img2img_start(req.steps, req.strength);
                if start >= req.steps as usize {
                    return bad(format!(
                        "strength {} x steps {} leaves no denoising step (int(steps x strength) \
                         must be at least 1)",
                        req.strength, req.steps
                    ));
                }
                let has_encoder =
                    req.vae.as_ref().is_some_and(|v| v.has_encoder()) || self.vae.has_encoder();
                if !has_encoder {
                    return bad(
                        "init_image: this model has no vae_encoder (and no separate VAE with \
                         one was given): image-to-image needs it"
                            .into(),
                    );
                }
                Some((img, start))
            }
        };
        Ok(Plan {
            kind,
            width,
            height,
            init,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::img2img_start;

    #[test]
    fn img2img_truncation_follows_diffusers() {
        assert_eq!(img2img_start(8, 0.6), 4); // int(4.8) = 4 steps run
        assert_eq!(img2img_start(50, 0.75), 13); // int(37.5) = 37
        assert_eq!(img2img_start(20, 1.0), 0);
        assert_eq!(img2img_start(8, 0.1), 8); // none: refused by the caller
        assert_eq!(img2img_start(10, 0.7), 3); // 7 run, as Python's int(10 * 0.7)
    }
}
