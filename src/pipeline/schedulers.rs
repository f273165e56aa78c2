//! Noise schedulers with diffusers' mathematics, configured from `scheduler/scheduler_config.json`.
//!
//! Implemented: Euler (`EulerDiscreteScheduler`), Euler ancestral
//! (`EulerAncestralDiscreteScheduler`), DDIM with eta 0 (`DDIMScheduler`), and DPM++ 2M
//! (`DPMSolverMultistepScheduler`: dpmsolver++, solver_order 2, midpoint, lower_order_final,
//! final sigma 0) with and without Karras sigmas. Schedules are computed as diffusers does
//! (f32 betas and cumulative alphas, f64 interpolation, sigmas rounded to f32); the per-step
//! updates run on f32 latents. `scripts/reference_sd.py` is the numpy twin used for the goldens.
//!
//! This module is pure: no ONNX Runtime, no I/O.

use serde_json::Value;

use super::noise::{NoiseRng, ANCESTRAL_STREAM_KEY};

/// The samplers Corral offers, by their request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Ddim,
    DpmPp2m,
    DpmPp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// Parses a request name: "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras".
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::Ddim => "ddim",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// The sampler's name as AUTOMATIC1111 writes it in PNG `parameters`.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::Ddim => "DDIM",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }

    /// Maps a diffusers scheduler class to the closest implemented sampler. PNDM, LMS and
    /// other multistep classes map to DPM++ 2M, the multistep solver implemented here.
    pub fn from_class_name(class: &str, use_karras_sigmas: bool) -> Self {
        match class {
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "DDIMScheduler" => Self::Ddim,
            _ if use_karras_sigmas => Self::DpmPp2mKarras,
            _ => Self::DpmPp2m,
        }
    }

    /// diffusers' default `timestep_spacing` of the class, used when the config has none.
    fn default_spacing(self) -> Spacing {
        match self {
            Self::Ddim => Spacing::Leading,
            _ => Spacing::Linspace,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

/// The fields of `scheduler_config.json` the samplers use (diffusers' defaults where absent).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub class_name: String,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: Prediction,
    /// `None`: each sampler's diffusers default.
    pub timestep_spacing: Option<Spacing>,
    pub steps_offset: i64,
    /// DDIM's `set_alpha_to_one` (diffusers' default true).
    pub set_alpha_to_one: bool,
    pub use_karras_sigmas: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: "PNDMScheduler".into(),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: Prediction::Epsilon,
            timestep_spacing: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            use_karras_sigmas: false,
        }
    }
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json`; the error says which field is wrong.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let f = |k: &str, d: f64| v.get(k).and_then(Value::as_f64).unwrap_or(d);
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        if v.get("trained_betas").is_some_and(|b| !b.is_null()) {
            return Err("trained_betas is not supported".into());
        }
        let beta_schedule = match s("beta_schedule").as_deref().unwrap_or("linear") {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => return Err(format!("beta_schedule {other:?} is not supported")),
        };
        let prediction_type = match s("prediction_type").as_deref().unwrap_or("epsilon") {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => return Err(format!("prediction_type {other:?} is not supported")),
        };
        let timestep_spacing = match s("timestep_spacing").as_deref() {
            None => None,
            Some("linspace") => Some(Spacing::Linspace),
            Some("leading") => Some(Spacing::Leading),
            Some("trailing") => Some(Spacing::Trailing),
            Some(other) => return Err(format!("timestep_spacing {other:?} is not supported")),
        };
        let n = f("num_train_timesteps", 1000.0);
        if !(2.0..=100_000.0).contains(&n) {
            return Err(format!("num_train_timesteps {n} is out of range"));
        }
        Ok(Self {
            class_name: s("_class_name").unwrap_or_default(),
            num_train_timesteps: n as usize,
            beta_start: f("beta_start", 0.0001),
            beta_end: f("beta_end", 0.02),
            beta_schedule,
            prediction_type,
            timestep_spacing,
            steps_offset: f("steps_offset", 0.0) as i64,
            set_alpha_to_one: v
                .get("set_alpha_to_one")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            use_karras_sigmas: v
                .get("use_karras_sigmas")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// The sampler used for an empty request scheduler name.
    pub fn default_kind(&self) -> SchedulerKind {
        SchedulerKind::from_class_name(&self.class_name, self.use_karras_sigmas)
    }

    fn spacing(&self, kind: SchedulerKind) -> Spacing {
        self.timestep_spacing.unwrap_or(kind.default_spacing())
    }

    /// Cumulative products of (1 - beta), in f32 as diffusers computes them.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end, n)
                .into_iter()
                .map(|b| b as f32)
                .collect(),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| {
                    let b = b as f32;
                    b * b
                })
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let ab = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        };
        let mut acc = 1.0f32;
        betas
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }
}

/// numpy's `linspace(start, stop, num)`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// numpy's `interp(x, arange(len(fp)), fp)`.
fn interp(x: f64, fp: &[f32]) -> f64 {
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    let (a, b) = (fp[i] as f64, fp[i + 1] as f64);
    a + (b - a) * w
}

/// A sampler's schedule for a number of inference steps, as diffusers' `set_timesteps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The timesteps given to the UNet, one per step (descending).
    pub timesteps: Vec<f64>,
    /// Sigmas (f32 as diffusers keeps them) with a final 0; empty for DDIM.
    pub sigmas: Vec<f32>,
    /// The factor applied to the unit-variance initial noise.
    pub init_noise_sigma: f32,
}

pub fn schedule(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Schedule {
    let n = cfg.num_train_timesteps;
    let ac = cfg.alphas_cumprod();
    let full: Vec<f32> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
    let spacing = cfg.spacing(kind);
    let off = cfg.steps_offset as f64;
    match kind {
        SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
            let ts: Vec<f64> = match spacing {
                Spacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                    .into_iter()
                    .rev()
                    .collect(),
                Spacing::Leading => {
                    let ratio = (n / steps) as f64;
                    (0..steps)
                        .rev()
                        .map(|i| (i as f64 * ratio).round_ties_even() + off)
                        .collect()
                }
                Spacing::Trailing => trailing(n, steps),
            };
            let mut sigmas: Vec<f32> = ts.iter().map(|&t| interp(t, &full) as f32).collect();
            sigmas.push(0.0);
            let max = sigmas.iter().copied().fold(0.0f32, f32::max);
            let init = match spacing {
                Spacing::Leading => (max * max + 1.0).sqrt(),
                _ => max,
            };
            // diffusers keeps Euler timesteps as f32.
            let timesteps = ts.into_iter().map(|t| t as f32 as f64).collect();
            Schedule {
                timesteps,
                sigmas,
                init_noise_sigma: init,
            }
        }
        SchedulerKind::Ddim => {
            let ts: Vec<f64> = match spacing {
                Spacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                    .into_iter()
                    .rev()
                    .map(f64::round_ties_even)
                    .collect(),
                Spacing::Leading => {
                    let ratio = (n / steps) as f64;
                    (0..steps)
                        .rev()
                        .map(|i| (i as f64 * ratio).round_ties_even() + off)
                        .collect()
                }
                Spacing::Trailing => trailing(n, steps),
            };
            Schedule {
                timesteps: ts,
                sigmas: vec![],
                init_noise_sigma: 1.0,
            }
        }
        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
            let mut ts: Vec<f64> = match spacing {
                Spacing::Linspace => {
                    let v = linspace(0.0, (n - 1) as f64, steps + 1);
                    v[1..].iter().rev().map(|t| t.round_ties_even()).collect()
                }
                Spacing::Leading => {
                    let ratio = (n / (steps + 1)) as f64;
                    (1..=steps)
                        .rev()
                        .map(|i| (i as f64 * ratio).round_ties_even() + off)
                        .collect()
                }
                Spacing::Trailing => trailing(n, steps),
            };
            let mut sigmas: Vec<f32>;
            if kind == SchedulerKind::DpmPp2mKarras {
                let log_sigmas: Vec<f32> = full.iter().map(|s| s.ln()).collect();
                let (smin, smax) = (full[0] as f64, full[n - 1] as f64);
                let rho = 7.0;
                let (min_inv, max_inv) = (smin.powf(1.0 / rho), smax.powf(1.0 / rho));
                let ks: Vec<f64> = linspace(0.0, 1.0, steps)
                    .into_iter()
                    .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                    .collect();
                ts = ks
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
                    .collect();
                sigmas = ks.into_iter().map(|s| s as f32).collect();
            } else {
                sigmas = ts.iter().map(|&t| interp(t, &full) as f32).collect();
            }
            sigmas.push(0.0);
            Schedule {
                timesteps: ts,
                sigmas,
                init_noise_sigma: 1.0,
            }
        }
    }
}

/// `round(arange(n, 0, -n / steps)) - 1`.
fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let ratio = n as f64 / steps as f64;
    (0..steps)
        .map(|k| n as f64 - k as f64 * ratio)
        .take_while(|&v| v > 0.0)
        .map(|v| v.round_ties_even() - 1.0)
        .collect()
}

/// diffusers' `_sigma_to_t`: piecewise-linear in log sigma.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[high_idx] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Runs one sampler over a batch of latents `[n, per_image]`.
pub struct Sampler {
    kind: SchedulerKind,
    cfg: SchedulerConfig,
    schedule: Schedule,
    alphas_cumprod: Vec<f32>,
    steps: usize,
    per_image: usize,
    /// DPM++ 2M: the previous step's predicted x0.
    prev_x0: Option<Vec<f32>>,
    /// Euler ancestral: one noise stream per image.
    rngs: Vec<NoiseRng>,
}

impl Sampler {
    /// `seeds[i]` is image i's seed; ancestral noise uses `seeds[i] ^ ANCESTRAL_STREAM_KEY`.
    pub fn new(
        cfg: &SchedulerConfig,
        kind: SchedulerKind,
        steps: usize,
        seeds: &[u64],
        per_image: usize,
    ) -> Self {
        Self {
            kind,
            cfg: cfg.clone(),
            schedule: schedule(cfg, kind, steps),
            alphas_cumprod: cfg.alphas_cumprod(),
            steps,
            per_image,
            prev_x0: None,
            rngs: seeds
                .iter()
                .map(|s| NoiseRng::new(s ^ ANCESTRAL_STREAM_KEY))
                .collect(),
        }
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    pub fn init_noise_sigma(&self) -> f32 {
        self.schedule.init_noise_sigma
    }

    /// Image-to-image: `x0` noised to the level of step `i` (the first step run), as diffusers'
    /// `add_noise` with the begin index set: `x0 + sigma * noise` for Euler, `sqrt(a) x0 +
    /// sqrt(1 - a) noise` for DDIM, `alpha_t x0 + sigma_t noise` for DPM-Solver++ (f32 maths).
    pub fn add_noise(&self, x0: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        let (a, b) = match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => (1.0, self.schedule.sigmas[i]),
            SchedulerKind::Ddim => {
                let ac = self.alphas_cumprod[self.schedule.timesteps[i] as usize];
                (ac.sqrt(), (1.0 - ac).sqrt())
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                let sig = self.schedule.sigmas[i];
                let alpha = 1.0 / (sig * sig + 1.0).sqrt();
                (alpha, sig * alpha)
            }
        };
        let euler = matches!(
            self.kind,
            SchedulerKind::Euler | SchedulerKind::EulerAncestral
        );
        x0.iter()
            .zip(noise)
            .map(|(&x, &n)| if euler { x + n * b } else { a * x + b * n })
            .collect()
    }

    /// What the UNet input is divided by at step `i` (sqrt(sigma^2 + 1) for sigma-based
    /// samplers, as diffusers' `scale_model_input` divides; 1 for the others).
    pub fn input_divisor(&self, i: usize) -> f32 {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let s = self.schedule.sigmas[i] as f64;
                (s * s + 1.0).sqrt() as f32
            }
            _ => 1.0,
        }
    }

    /// Updates `x` in place from the guided model output `out` at step `i`.
    pub fn step(&mut self, out: &[f32], i: usize, x: &mut [f32]) {
        let eps_pred = self.cfg.prediction_type == Prediction::Epsilon;
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let s = self.schedule.sigmas[i] as f64;
                let sn = self.schedule.sigmas[i + 1] as f64;
                let sf = s as f32;
                let (cv_out, cv_x) = ((-s / (s * s + 1.0).sqrt()) as f32, (s * s + 1.0) as f32);
                let (dt, up) = if self.kind == SchedulerKind::Euler {
                    ((sn - s) as f32, 0.0f32)
                } else {
                    let up = (sn * sn * (s * s - sn * sn) / (s * s)).sqrt();
                    let down = (sn * sn - up * up).sqrt();
                    ((down - s) as f32, up as f32)
                };
                for (xv, &e) in x.iter_mut().zip(out) {
                    let x0 = if eps_pred {
                        *xv - sf * e
                    } else {
                        e * cv_out + *xv / cv_x
                    };
                    let d = (*xv - x0) / sf;
                    *xv += d * dt;
                }
                if self.kind == SchedulerKind::EulerAncestral {
                    let mut noise = vec![0.0f32; self.per_image];
                    for (chunk, rng) in x.chunks_mut(self.per_image).zip(&mut self.rngs) {
                        rng.fill_normal(&mut noise);
                        for (xv, &nz) in chunk.iter_mut().zip(&noise) {
                            *xv += nz * up;
                        }
                    }
                }
            }
            SchedulerKind::Ddim => {
                let t = self.schedule.timesteps[i] as i64;
                let prev_t = t - (self.cfg.num_train_timesteps / self.steps) as i64;
                let a = self.alphas_cumprod[t as usize] as f64;
                let final_alpha = if self.cfg.set_alpha_to_one {
                    1.0
                } else {
                    self.alphas_cumprod[0] as f64
                };
                let ap = if prev_t >= 0 {
                    self.alphas_cumprod[prev_t as usize] as f64
                } else {
                    final_alpha
                };
                let b = 1.0 - a;
                let (sa, sb) = (a.sqrt() as f32, b.sqrt() as f32);
                let (sap, sbp) = (ap.sqrt() as f32, (1.0 - ap).sqrt() as f32);
                for (xv, &o) in x.iter_mut().zip(out) {
                    let (x0, e) = if eps_pred {
                        ((*xv - sb * o) / sa, o)
                    } else {
                        (sa * *xv - sb * o, sa * o + sb * *xv)
                    };
                    *xv = sap * x0 + sbp * e;
                }
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                self.dpm_step(out, i, x, eps_pred)
            }
        }
    }

    fn dpm_step(&mut self, out: &[f32], i: usize, x: &mut [f32], eps_pred: bool) {
        let at_st = |sig: f64| {
            let a = 1.0 / (sig * sig + 1.0).sqrt();
            (a, sig * a)
        };
        let lambda = |a: f64, s: f64| {
            if s > 0.0 {
                a.ln() - s.ln()
            } else {
                f64::INFINITY
            }
        };
        let sigmas = &self.schedule.sigmas;
        let (a_s, s_s) = at_st(sigmas[i] as f64);
        let (a_t, s_t) = at_st(sigmas[i + 1] as f64);
        let (fa, fs) = (a_s as f32, s_s as f32);
        let x0: Vec<f32> = x
            .iter()
            .zip(out)
            .map(|(&xv, &o)| {
                if eps_pred {
                    (xv - fs * o) / fa
                } else {
                    fa * xv - fs * o
                }
            })
            .collect();
        let h = lambda(a_t, s_t) - lambda(a_s, s_s);
        let ratio = (s_t / s_s) as f32;
        let c = (a_t * ((-h).exp() - 1.0)) as f32;
        let first_order =
            i == 0 || i + 1 == self.schedule.timesteps.len() || self.prev_x0.is_none();
        if first_order {
            for (xv, &m0) in x.iter_mut().zip(&x0) {
                *xv = ratio * *xv - c * m0;
            }
        } else if let Some(m1s) = &self.prev_x0 {
            let (a_1, s_1) = at_st(sigmas[i - 1] as f64);
            let h0 = lambda(a_s, s_s) - lambda(a_1, s_1);
            let inv_r0 = (1.0 / (h0 / h)) as f32;
            for ((xv, &m0), &m1) in x.iter_mut().zip(&x0).zip(m1s) {
                let d1 = inv_r0 * (m0 - m1);
                *xv = ratio * *xv - c * m0 - 0.5 * c * d1;
            }
        }
        self.prev_x0 = Some(x0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15(spacing: Option<Spacing>) -> SchedulerConfig {
        SchedulerConfig {
            timestep_spacing: spacing,
            ..SchedulerConfig::default()
        }
    }

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (*x as f64 - y).abs() <= tol * y.abs().max(1.0),
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn parses_names_and_classes() {
        for k in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::parse(k.name()), Some(k));
        }
        assert_eq!(SchedulerKind::parse("plms"), None);
        assert_eq!(
            SchedulerKind::from_class_name("EulerDiscreteScheduler", false),
            SchedulerKind::Euler
        );
        assert_eq!(
            SchedulerKind::from_class_name("DPMSolverMultistepScheduler", true),
            SchedulerKind::DpmPp2mKarras
        );
        assert_eq!(
            SchedulerKind::from_class_name("PNDMScheduler", false),
            SchedulerKind::DpmPp2m
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = SchedulerConfig::from_json(r#"{"prediction_type":"sample"}"#).unwrap_err();
        assert!(e.contains("prediction_type"), "{e}");
        let e = SchedulerConfig::from_json(r#"{"timestep_spacing":"odd"}"#).unwrap_err();
        assert!(e.contains("timestep_spacing"), "{e}");
        let c = SchedulerConfig::from_json(
            r#"{"_class_name":"PNDMScheduler","beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear",
                "num_train_timesteps":1000,"set_alpha_to_one":false,"steps_offset":1}"#,
        )
        .unwrap();
        assert_eq!(c, SchedulerConfig::default());
    }

    #[test]
    fn sd15_sigma_range() {
        // Well-known SD 1.x values: sigma_min 0.0292, sigma_max 14.6146.
        let ac = SchedulerConfig::default().alphas_cumprod();
        let s = |a: f32| ((1.0 - a) / a).sqrt();
        assert!((s(ac[0]) - 0.029168).abs() < 1e-5, "{}", s(ac[0]));
        assert!((s(ac[999]) - 14.614642).abs() < 1e-3, "{}", s(ac[999]));
    }

    // The expected values below were computed by scripts/reference_sd.py --print-schedules
    // (diffusers' set_timesteps formulas in numpy) for the SD 1.5 config and 10 steps.
    #[test]
    fn euler_schedules_match_reference() {
        let s = schedule(&sd15(None), SchedulerKind::Euler, 10);
        close(
            &s.timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            &[
                999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0,
            ],
            1e-6,
        );
        close(&s.sigmas, &EULER_LINSPACE_SIGMAS, 1e-5);
        assert!((s.init_noise_sigma as f64 - EULER_LINSPACE_SIGMAS[0]).abs() < 1e-4);
        let s = schedule(&sd15(Some(Spacing::Leading)), SchedulerKind::Euler, 10);
        close(
            &s.timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            &[
                901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0,
            ],
            1e-6,
        );
        let s = schedule(&sd15(Some(Spacing::Trailing)), SchedulerKind::Euler, 10);
        close(
            &s.timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            &[
                999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0,
            ],
            1e-6,
        );
    }

    #[test]
    fn ddim_and_dpm_timesteps_match_reference() {
        let t = |k, sp| schedule(&sd15(sp), k, 10).timesteps;
        assert_eq!(
            t(SchedulerKind::Ddim, None),
            vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
        );
        assert_eq!(
            t(SchedulerKind::DpmPp2m, None),
            DPM_LINSPACE_TIMESTEPS.to_vec()
        );
        assert_eq!(
            t(SchedulerKind::DpmPp2m, Some(Spacing::Leading)),
            DPM_LEADING_TIMESTEPS.to_vec()
        );
        let k = schedule(&sd15(None), SchedulerKind::DpmPp2mKarras, 10);
        assert_eq!(k.timesteps, DPM_KARRAS_TIMESTEPS.to_vec());
        close(&k.sigmas, &DPM_KARRAS_SIGMAS, 1e-5);
    }

    const EULER_LINSPACE_SIGMAS: [f64; 11] = [
        14.614655494689941,
        7.8398895263671875,
        4.609177589416504,
        2.9183084964752197,
        1.9501620531082153,
        1.34492826461792,
        0.9323581457138062,
        0.6249771118164062,
        0.368658185005188,
        0.029167532920837402,
        0.0,
    ];
    const DPM_LINSPACE_TIMESTEPS: [f64; 10] = [
        999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0,
    ];
    const DPM_LEADING_TIMESTEPS: [f64; 10] = [
        901.0, 811.0, 721.0, 631.0, 541.0, 451.0, 361.0, 271.0, 181.0, 91.0,
    ];
    const DPM_KARRAS_TIMESTEPS: [f64; 10] = [
        999.0, 916.0, 815.0, 687.0, 523.0, 327.0, 146.0, 41.0, 7.0, 0.0,
    ];
    const DPM_KARRAS_SIGMAS: [f64; 11] = [
        14.614655494689941,
        9.10294246673584,
        5.4784040451049805,
        3.168612480163574,
        1.749423861503601,
        0.9140768647193909,
        0.44692105054855347,
        0.20139990746974945,
        0.08191106468439102,
        0.029167532920837402,
        0.0,
    ];

    #[test]
    fn euler_a_is_deterministic_per_seed() {
        let cfg = sd15(None);
        let run = |seed| {
            let mut s = Sampler::new(&cfg, SchedulerKind::EulerAncestral, 4, &[seed], 8);
            let mut x = vec![1.0f32; 8];
            for i in 0..4 {
                s.step(&[0.5; 8], i, &mut x);
            }
            x
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
