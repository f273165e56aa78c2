//! Per-stage timings of the pipeline, for `corral bench-pipeline`.
//!
//! Measures, on one model directory and device: reading the ONNX files, session creation (first
//! load, which optimizes the graphs and caches them; second load from that cache; and a plain
//! load without cache), then `runs` generations after one warm-up, split into text encoder,
//! UNet steps, VAE decode and PNG encoding; the VAE encoder (image-to-image) when the export has
//! one, and an upscaler when given one. With LoRAs ([`BenchOptions::loras`]) it also
//! measures what switching to that LoRA set costs: the merge into prepared weights (the method
//! the pipeline uses), a cache hit, and, side by side, the alternative of rebuilding the UNet and
//! text-encoder sessions with `SessionBuilder::with_initializer`, beside the full UNet session
//! build. A benchmark, not a test: it asserts nothing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::image::RgbImage;
use super::lora::merge::PreparedLoras;
use super::lora::{Component, Lora, LoraWeight};
use super::schedulers::SchedulerKind;
use super::upscale::Upscaler;
use super::{noise, png, runtime, GenerateRequest, Pipeline, PipelineConfig, PipelineError};

/// What to benchmark besides the model directory and the device.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub steps: u32,
    pub width: u32,
    pub height: u32,
    /// Timed generations after one warm-up.
    pub runs: u32,
    /// LoRA files and weights (`corral bench-pipeline --lora FILE:W`); empty = no LoRA rows.
    pub loras: Vec<(PathBuf, f32)>,
    /// An upscaler (`.onnx` or a directory with model.onnx) run on the generated image.
    pub upscaler: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            steps: 20,
            width: 512,
            height: 512,
            runs: 3,
            loras: Vec::new(),
            upscaler: None,
        }
    }
}

/// The LoRA rows of the report.
#[derive(Debug, Clone, Serialize)]
pub struct LoraBench {
    /// `name:weight` of each LoRA.
    pub loras: Vec<String>,
    /// Weights the set replaces, and their bytes on the device.
    pub weights_patched: usize,
    pub prepared_bytes: u64,
    /// Reading and parsing the LoRA files.
    pub file_load_s: f64,
    /// Building the UNet session alone (what reloading the UNet would cost, files cached).
    pub unet_session_s: f64,
    /// Switching to the set, not cached: read the base weights, merge, create the tensors.
    pub switch: Stat,
    /// Switching to the set when it is cached (an LRU hit).
    pub switch_cached: Stat,
    /// The alternative: merge, then rebuild the UNet and text-encoder sessions with the merged
    /// weights as `with_initializer` overrides.
    pub switch_by_session_rebuild: Stat,
    pub unet_step: Stat,
    pub total: Stat,
}

/// Mean and minimum of a set of timings, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stat {
    pub mean_ms: f64,
    pub min_ms: f64,
    pub samples: usize,
}

impl Stat {
    fn of(ms: &[f64]) -> Stat {
        if ms.is_empty() {
            return Stat::default();
        }
        Stat {
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            min_ms: ms.iter().copied().fold(f64::INFINITY, f64::min),
            samples: ms.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model_dir: String,
    pub device: String,
    pub ort_library: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub runs: u32,
    pub model_bytes: u64,
    /// Reading the ONNX files after asking the kernel to drop them from the page cache.
    pub file_read_cold_s: f64,
    /// Whether that eviction succeeded for every file (else the "cold" read may be warm).
    pub page_cache_evicted: bool,
    /// Reading them again, from the page cache.
    pub file_read_warm_s: f64,
    /// Session creation with graph optimization, writing the optimized graphs.
    pub session_create_first_s: f64,
    /// Session creation from the cached optimized graphs.
    pub session_create_cached_s: f64,
    /// Session creation with optimization and no cache.
    pub session_create_plain_s: f64,
    /// The first generation (warm-up: allocations, kernel selection).
    pub warmup_total_ms: f64,
    pub text_encoder: Stat,
    /// One UNet evaluation (batch 2 with guidance) plus the scheduler update.
    pub unet_step: Stat,
    pub vae_decode: Stat,
    pub png_encode: Stat,
    pub total: Stat,
    /// Image-to-image: the VAE encoder on a `width` x `height` image (when the export has one).
    pub vae_encode: Option<Stat>,
    /// The upscaler on the generated image, tiled (with [`BenchOptions::upscaler`]).
    pub upscale: Option<UpscaleBench>,
    pub lora: Option<LoraBench>,
}

/// The upscaler rows of the report.
#[derive(Debug, Clone, Serialize)]
pub struct UpscaleBench {
    pub name: String,
    pub scale: u32,
    pub load_s: f64,
    pub upscale: Stat,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Benchmarks `dir` on `cfg.device` at `width` x `height` with `steps` steps, `runs` times.
pub fn bench(
    dir: &Path,
    cfg: &PipelineConfig,
    steps: u32,
    width: u32,
    height: u32,
    runs: u32,
) -> Result<BenchReport, PipelineError> {
    let opts = BenchOptions {
        steps,
        width,
        height,
        runs,
        ..Default::default()
    };
    bench_with(dir, cfg, &opts)
}

/// Per-stage timings of one kind of generation.
struct Runs {
    warmup_total_ms: f64,
    te: Vec<f64>,
    unet: Vec<f64>,
    vae: Vec<f64>,
    pngs: Vec<f64>,
    total: Vec<f64>,
}

fn time_runs(
    p: &Pipeline,
    req: &GenerateRequest,
    kind: SchedulerKind,
    loras: Option<&PreparedLoras>,
    runs: u32,
) -> Result<Runs, PipelineError> {
    let (width, height) = (req.width, req.height);
    let mut r = Runs {
        warmup_total_ms: 0.0,
        te: Vec::new(),
        unet: Vec::new(),
        vae: Vec::new(),
        pngs: Vec::new(),
        total: Vec::new(),
    };
    for run in 0..=runs {
        let t0 = Instant::now();
        let t = Instant::now();
        let emb = p.encode_request(req, loras)?;
        let te_ms = ms(t);
        let noise = noise::initial_noise(req.seed, 1, p.latent_len(width, height));
        let mut last = Instant::now();
        let mut step_ms = Vec::new();
        let size = (width, height);
        let latents =
            p.denoise_encoded(req, kind, size, &emb, loras, &noise, None, &mut |_, _| {
                step_ms.push(ms(last));
                last = Instant::now();
                true
            })?;
        let t = Instant::now();
        let pixels = p.decode(&latents, width, height)?;
        let vae_ms = ms(t);
        let t = Instant::now();
        let rgb = png::to_rgb8(&pixels, width as usize, height as usize);
        png::encode_rgb(width, height, &rgb, "bench")?;
        let png_ms = ms(t);
        if run == 0 {
            r.warmup_total_ms = ms(t0);
            continue;
        }
        r.te.push(te_ms);
        r.unet.extend(step_ms);
        r.vae.push(vae_ms);
        r.pngs.push(png_ms);
        r.total.push(ms(t0));
    }
    Ok(r)
}

/// [`bench`] with every option.
pub fn bench_with(
    dir: &Path,
    cfg: &PipelineConfig,
    opts: &BenchOptions,
) -> Result<BenchReport, PipelineError> {
    let BenchOptions {
        steps,
        width,
        height,
        runs,
        ..
    } = *opts;
    let lib = super::runtime::init()?;
    let files: Vec<PathBuf> = ["text_encoder", "unet", "vae_decoder"]
        .iter()
        .flat_map(|part| ["model.onnx", "model.onnx_data"].map(|f| dir.join(part).join(f)))
        .filter(|p| p.is_file())
        .collect();
    let evicted = files.iter().all(|f| evict_from_page_cache(f));
    let (model_bytes, file_read_cold_s) = read_all(&files)?;
    let (_, file_read_warm_s) = read_all(&files)?;

    let cache = CacheDir::new()?;
    let first = Pipeline::load_with_cache(dir, cfg, Some(&cache.0))?;
    let session_create_first_s = first.load_timings().sessions_s;
    drop(first);
    let plain = Pipeline::load(dir, cfg)?;
    let session_create_plain_s = plain.load_timings().sessions_s;
    drop(plain);
    let p = Pipeline::load_with_cache(dir, cfg, Some(&cache.0))?;
    let session_create_cached_s = p.load_timings().sessions_s;

    let req = GenerateRequest {
        model_id: p.model_id.clone(),
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        negative_prompt: "blurry, low quality".into(),
        width,
        height,
        steps,
        guidance_scale: 7.5,
        seed: 1,
        num_images: 1,
        ..Default::default()
    };
    let kind = p.validate(&req)?;
    let base = time_runs(&p, &req, kind, None, runs)?;
    let lora = if opts.loras.is_empty() {
        None
    } else {
        Some(bench_loras(&p, cfg, &req, kind, opts)?)
    };
    let image = RgbImage {
        width,
        height,
        rgb: (0..width * height * 3).map(|i| (i % 251) as u8).collect(),
    };
    let vae_encode = if p.has_vae_encoder() {
        let mut t = Vec::new();
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            p.vae
                .encode(&image.to_chw_signed(), width, height, &[req.seed])?;
            t.push(ms(started));
        }
        Some(Stat::of(&t))
    } else {
        None
    };
    let upscale = match &opts.upscaler {
        None => None,
        Some(path) => {
            let started = Instant::now();
            let up = Upscaler::load(path, cfg)?;
            let load_s = started.elapsed().as_secs_f64();
            let mut t = Vec::new();
            for _ in 0..runs.max(1) {
                let started = Instant::now();
                up.upscale(&image)?;
                t.push(ms(started));
            }
            Some(UpscaleBench {
                name: up.name().to_string(),
                scale: up.scale(),
                load_s,
                upscale: Stat::of(&t),
            })
        }
    };
    Ok(BenchReport {
        model_dir: dir.display().to_string(),
        device: format!("{:?}", p.device()),
        ort_library: lib.display().to_string(),
        width,
        height,
        steps,
        runs,
        model_bytes,
        file_read_cold_s,
        page_cache_evicted: evicted,
        file_read_warm_s,
        session_create_first_s,
        session_create_cached_s,
        session_create_plain_s,
        warmup_total_ms: base.warmup_total_ms,
        text_encoder: Stat::of(&base.te),
        unet_step: Stat::of(&base.unet),
        vae_decode: Stat::of(&base.vae),
        png_encode: Stat::of(&base.pngs),
        total: Stat::of(&base.total),
        vae_encode,
        upscale,
        lora,
    })
}

fn bench_loras(
    p: &Pipeline,
    cfg: &PipelineConfig,
    req: &GenerateRequest,
    kind: SchedulerKind,
    opts: &BenchOptions,
) -> Result<LoraBench, PipelineError> {
    let t = Instant::now();
    let loras = opts
        .loras
        .iter()
        .map(|(path, weight)| {
            Ok(LoraWeight {
                lora: Arc::new(Lora::load(path)?),
                weight: *weight,
            })
        })
        .collect::<Result<Vec<_>, PipelineError>>()?;
    let file_load_s = t.elapsed().as_secs_f64();
    let parts: Vec<_> = p.lora_weights.iter().collect();
    let unet_part = parts
        .iter()
        .find(|w| w.component == Component::Unet)
        .ok_or_else(|| {
            PipelineError::InvalidRequest("loras: the UNet has no name_map.json".into())
        })?;
    let t = Instant::now();
    let bytes = unet_part.model_bytes()?;
    let source = runtime::ModelSource {
        path: unet_part.path(),
        bytes: Some(&bytes),
    };
    drop(runtime::build_session(source, cfg, None)?);
    let unet_session_s = t.elapsed().as_secs_f64();

    let device = |t| Ok(p.to_device(t));
    let (mut switch, mut hits, mut rebuild) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs.max(1) {
        let t = Instant::now();
        drop(super::lora::merge::prepare(&parts, &loras, &device)?);
        switch.push(ms(t));
        let t = Instant::now();
        let mut merged = super::lora::merge::prepare(&parts, &loras, &device)?;
        for w in &parts {
            let overrides = merged.inputs.remove(&w.component).unwrap_or_default();
            let cw = runtime::ModelSource {
                path: w.path(),
                bytes: None,
            };
            drop(runtime::build_session_with_initializers(
                cw, cfg, overrides,
            )?);
        }
        rebuild.push(ms(t));
    }
    let prepared = p.prepare_loras(&loras)?.ok_or_else(|| {
        PipelineError::InvalidRequest("loras: every weight is 0, nothing to switch to".into())
    })?;
    for _ in 0..opts.runs.max(1) {
        let t = Instant::now();
        p.prepare_loras(&loras)?;
        hits.push(ms(t));
    }
    let with = time_runs(p, req, kind, Some(&prepared), opts.runs)?;
    Ok(LoraBench {
        loras: loras
            .iter()
            .map(|l| format!("{}:{}", l.lora.name(), l.weight))
            .collect(),
        weights_patched: prepared.weights(),
        prepared_bytes: prepared.bytes(),
        file_load_s,
        unet_session_s,
        switch: Stat::of(&switch),
        switch_cached: Stat::of(&hits),
        switch_by_session_rebuild: Stat::of(&rebuild),
        unet_step: Stat::of(&with.unet),
        total: Stat::of(&with.total),
    })
}

fn read_all(files: &[PathBuf]) -> Result<(u64, f64), PipelineError> {
    let started = Instant::now();
    let mut bytes = 0;
    for f in files {
        bytes += std::fs::read(f).map_err(|e| PipelineError::io(f, e))?.len() as u64;
    }
    Ok((bytes, started.elapsed().as_secs_f64()))
}

/// Asks the kernel to drop a file's clean pages from the page cache, so that the next read
/// comes from the disk. Needs no privileges; returns false where unsupported.
fn evict_from_page_cache(path: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(f) = std::fs::File::open(path) else {
            return false;
        };
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        false
    }
}

/// A temporary directory for the optimized graphs, removed on drop.
struct CacheDir(PathBuf);

impl CacheDir {
    fn new() -> Result<Self, PipelineError> {
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("corral-bench-{}-{unique}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| PipelineError::io(&p, e))?;
        Ok(Self(p))
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model     {}", self.model_dir)?;
        writeln!(
            f,
            "device    {}   runtime {}",
            self.device, self.ort_library
        )?;
        writeln!(
            f,
            "request   {}x{}, {} steps, guidance 7.5 (UNet batch 2), {} runs after 1 warm-up",
            self.width, self.height, self.steps, self.runs
        )?;
        writeln!(f)?;
        writeln!(f, "{:<38} {:>12} {:>12}", "stage", "mean", "min")?;
        let secs = |f: &mut fmt::Formatter<'_>, name: &str, s: f64| {
            writeln!(f, "{name:<38} {:>11.4}s {:>12}", s, "")
        };
        let cold = if self.page_cache_evicted {
            "cold"
        } else {
            "cold?"
        };
        secs(
            f,
            &format!(
                "read onnx files, {cold} ({:.1} MB)",
                self.model_bytes as f64 / 1e6
            ),
            self.file_read_cold_s,
        )?;
        secs(f, "read onnx files, page cache", self.file_read_warm_s)?;
        secs(
            f,
            "sessions: first load (optimize+save)",
            self.session_create_first_s,
        )?;
        secs(
            f,
            "sessions: cached optimized graphs",
            self.session_create_cached_s,
        )?;
        secs(f, "sessions: plain (no cache)", self.session_create_plain_s)?;
        writeln!(
            f,
            "{:<38} {:>10.2}ms {:>12}",
            "warm-up generation", self.warmup_total_ms, ""
        )?;
        for (name, s) in [
            ("text encoder", self.text_encoder),
            ("unet step", self.unet_step),
            ("vae decode", self.vae_decode),
            ("png encode", self.png_encode),
            ("total per image", self.total),
        ] {
            writeln!(f, "{name:<38} {:>10.2}ms {:>10.2}ms", s.mean_ms, s.min_ms)?;
        }
        if let Some(s) = self.vae_encode {
            writeln!(
                f,
                "{:<38} {:>10.2}ms {:>10.2}ms",
                "vae encode (img2img)", s.mean_ms, s.min_ms
            )?;
        }
        if let Some(u) = &self.upscale {
            secs(
                f,
                &format!("upscaler {} x{}: load", u.name, u.scale),
                u.load_s,
            )?;
            writeln!(
                f,
                "{:<38} {:>10.2}ms {:>10.2}ms",
                "upscale (tiled)", u.upscale.mean_ms, u.upscale.min_ms
            )?;
        }
        if let Some(l) = &self.lora {
            writeln!(f)?;
            writeln!(
                f,
                "LoRAs     {} ({} weights, {:.2} MB prepared)",
                l.loras.join(" "),
                l.weights_patched,
                l.prepared_bytes as f64 / 1e6
            )?;
            secs(f, "lora files: read + parse", l.file_load_s)?;
            secs(f, "unet session build (full UNet load)", l.unet_session_s)?;
            for (name, s) in [
                ("lora switch: merge (used)", l.switch),
                ("lora switch: cached set", l.switch_cached),
                (
                    "lora switch: session rebuild (alt.)",
                    l.switch_by_session_rebuild,
                ),
                ("unet step with loras", l.unet_step),
                ("total per image with loras", l.total),
            ] {
                writeln!(f, "{name:<38} {:>10.3}ms {:>10.3}ms", s.mean_ms, s.min_ms)?;
            }
        }
        Ok(())
    }
}
