//! `corral demo`: the main job end to end on this machine.
//!
//! Starts a coordinator and two workers in this process, over real gRPC on
//! 127.0.0.1: `worker-a` has the bundled tiny model baked into its
//! preloaded directory, `worker-b` starts with an empty cache. Registers the
//! model with a `file://` source, submits a few jobs through the client API,
//! writes the images, and prints which worker ran each job and from which
//! cache tier.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use tokio::sync::oneshot;

use crate::client::{
    admin_client, follow, jobs_client, print, tier_word, write_images, ClientArgs, Finished,
};
use crate::config::{CoordinatorConfig, EngineKind, WorkerConfig};
use crate::error::{Error, Result};
use crate::pb;
use crate::types::{ModelId, ModelKind};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where images, caches and the coordinator's data go.
    #[arg(long, default_value = "corral-demo")]
    pub out: PathBuf,
    /// The model bundle to serve (an optimum ONNX export).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tiny-sd"))]
    pub model_dir: PathBuf,
    /// Jobs to submit.
    #[arg(long, default_value_t = 6)]
    pub jobs: u32,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Use the synthetic engine instead of ONNX (no ONNX Runtime needed).
    #[arg(long)]
    pub synthetic: bool,
}

const MODEL: &str = "tiny-sd";
const LORA: &str = "tiny-lora";
const XL: &str = "tiny-sdxl";
const UPSCALER: &str = "tiny-upscaler-x2";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");

const PROMPTS: [&str; 6] = [
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, photograph",
    "a city of glass towers under two moons",
    "a bowl of ramen, studio lighting",
    "an old map of an imaginary island",
    "a sailboat on a calm lake at sunrise",
];

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| Error::Internal(format!("task: {e}")))?
    }
}

async fn start_worker(id: &str, cfg: WorkerConfig) -> Result<Running> {
    let engine = crate::worker::engine::from_config(&cfg)?;
    let (w, outbox) = crate::worker::Worker::new(cfg, id.into(), engine).await?;
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(crate::worker::run(w, outbox, async move {
        let _ = rx.await;
    }));
    Ok(Running { stop, task })
}

pub async fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let model_dir = a
        .model_dir
        .canonicalize()
        .map_err(|e| Error::io(&a.model_dir, e))?;
    if a.out.exists() {
        // Start from clean caches so the tiers shown are this run's.
        for sub in [
            "coordinator",
            "cache-a",
            "cache-b",
            "cache-a.optimized",
            "cache-b.optimized",
            "preloaded-a",
        ] {
            let p = a.out.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    let preloaded = a.out.join("preloaded-a");
    copy_dir(&model_dir, &preloaded.join(MODEL))?;

    // The coordinator.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("127.0.0.1:0", e))?;
    let url = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| Error::io("listener", e))?
    );
    let ccfg = CoordinatorConfig {
        data_dir: a.out.join("coordinator"),
        heartbeat_interval_s: 1.0,
        // Loopback only, in this process: no tokens.
        auth: Some(crate::config::AuthConfig::disabled()),
        ..CoordinatorConfig::default()
    };
    let (stop, rx) = oneshot::channel::<()>();
    let coordinator = Running {
        stop,
        task: tokio::spawn(crate::coordinator::run(listener, ccfg, async move {
            let _ = rx.await;
        })),
    };
    println!("coordinator on {url}");

    // Two workers: one with the model baked in, one empty.
    let engine = if a.synthetic {
        EngineKind::Synthetic
    } else {
        EngineKind::Onnx
    };
    let wcfg = |cache: &str, pre: Option<PathBuf>| WorkerConfig {
        coordinator: url.clone(),
        cache_dir: a.out.join(cache),
        preloaded_dir: pre,
        engine,
        synthetic_step_ms: 50,
        shutdown_grace_s: 10,
        ..WorkerConfig::default()
    };
    let wa = start_worker("worker-a", wcfg("cache-a", Some(preloaded.clone()))).await?;
    let wb = start_worker("worker-b", wcfg("cache-b", None)).await?;
    println!("worker-a: {} preloaded; worker-b: empty cache", MODEL);

    // The catalogue entry, from a file:// source.
    let source = format!("file://{}", model_dir.display());
    let manifest = crate::manifest::manifest_from_source(&ModelId(MODEL.into()), &source).await?;
    println!(
        "registering {MODEL}: {} files, {} bytes, from {source}",
        manifest.files.len(),
        manifest.total_bytes()
    );
    admin_client(&ClientArgs::local(&url))
        .await?
        .register_model(pb::RegisterModelRequest {
            model: Some(manifest.into()),
        })
        .await?;
    wait_for_workers(&url, 2).await?;
    let extras = register_extras(&url, &a.out).await?;

    // Jobs through the client API, all at once: the plain ones, then one
    // with a LoRA, one SDXL and one upscaled job when the fixtures are here.
    let images_dir = a.out.join("images");
    let (steps, size) = (a.steps, a.size);
    let plain = |i: u32| pb::JobSpec {
        model_id: MODEL.into(),
        prompt: PROMPTS[i as usize % PROMPTS.len()].to_string(),
        negative_prompt: "blurry".into(),
        width: size,
        height: size,
        steps,
        guidance_scale: 7.5,
        seed: 1000 + u64::from(i),
        num_images: 1,
        scheduler: ["euler_a", "dpmpp_2m_karras", "ddim", "euler"][i as usize % 4].into(),
        ..Default::default()
    };
    let mut specs: Vec<(String, pb::JobSpec)> = (0..a.jobs)
        .map(|i| ("txt2img".to_string(), plain(i)))
        .collect();
    if extras {
        specs.push((
            "lora".into(),
            pb::JobSpec {
                loras: vec![pb::LoraRef {
                    model_id: LORA.into(),
                    weight: 0.8,
                }],
                ..plain(100)
            },
        ));
        specs.push((
            "sdxl".into(),
            pb::JobSpec {
                model_id: XL.into(),
                ..plain(101)
            },
        ));
        specs.push((
            "upscale x2".into(),
            pb::JobSpec {
                upscaler_id: UPSCALER.into(),
                ..plain(102)
            },
        ));
    }
    let mut rows = run_all(&url, specs).await?;
    // Image-to-image on the first image made.
    if extras {
        if let Some(Finished::Completed(out)) = rows.first().map(|r| &r.2) {
            let init = out.images[0].to_vec();
            let more = run_all(
                &url,
                vec![(
                    "img2img".into(),
                    pb::JobSpec {
                        init_image: init,
                        strength: 0.6,
                        prompt: "the same, in winter".into(),
                        ..plain(103)
                    },
                )],
            )
            .await?;
            rows.extend(more);
        }
    }

    println!();
    println!(
        "{:<4} {:<10} {:<9} {:<9} {:>7} {:>7} {:>9}  {:<16} image",
        "job", "kind", "worker", "tier", "load_s", "infer_s", "download", "scheduler"
    );
    let mut failed = 0;
    for (i, (kind, id, done, scheduler)) in rows.into_iter().enumerate() {
        match done {
            Finished::Completed(out) => {
                let file = images_dir.join(format!("{:02}-{}.png", i + 1, &id[..10.min(id.len())]));
                let paths = write_images(&file, &out.images)?;
                let t = out.timings.unwrap_or_default();
                println!(
                    "{:<4} {:<10} {:<9} {:<9} {:>7.2} {:>7.2} {:>8.2}s  {:<16} {}",
                    i + 1,
                    kind,
                    out.worker_id,
                    tier_word(t.tier),
                    t.load_s,
                    t.inference_s,
                    t.download_s,
                    scheduler,
                    paths[0].display()
                );
            }
            Finished::Failed(reason) => {
                failed += 1;
                println!("{:<4} {kind:<10} failed: {reason}", i + 1);
            }
            Finished::Cancelled => {
                failed += 1;
                println!("{:<4} {kind:<10} cancelled", i + 1);
            }
        }
    }
    println!();
    print::workers(
        &admin_client(&ClientArgs::local(&url))
            .await?
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner(),
    );
    wa.stop().await?;
    wb.stop().await?;
    coordinator.stop().await?;
    println!(
        "\n{} jobs, {} failed, in {:.1} s; images in {}",
        a.jobs + if extras { 4 } else { 0 },
        failed,
        started.elapsed().as_secs_f64(),
        images_dir.display()
    );
    if failed > 0 {
        return Err(Error::FailedPrecondition(format!(
            "{failed} demo jobs did not complete"
        )));
    }
    Ok(())
}

/// A row of the summary: kind, job id, outcome, scheduler.
type Row = (String, String, Finished, String);

/// Submits every spec at once and follows each to its end.
async fn run_all(url: &str, specs: Vec<(String, pb::JobSpec)>) -> Result<Vec<Row>> {
    let mut handles = Vec::new();
    for (kind, spec) in specs {
        let url = url.to_owned();
        handles.push(tokio::spawn(async move {
            let mut client = jobs_client(&ClientArgs::local(&url)).await?;
            let scheduler = spec.scheduler.clone();
            let job = client
                .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await?
                .into_inner()
                .job
                .ok_or_else(|| Error::Internal("no job returned".into()))?;
            let done = follow(&mut client, &job.id, false).await?;
            Ok::<_, Error>((kind, job.id, done, scheduler))
        }));
    }
    let mut rows = Vec::new();
    for h in handles {
        rows.push(
            h.await
                .map_err(|e| Error::Internal(format!("task: {e}")))??,
        );
    }
    Ok(rows)
}

/// The bundled LoRA, SDXL model and upscaler, registered when this
/// checkout's fixtures are there; false when they are not.
async fn register_extras(url: &str, out: &Path) -> Result<bool> {
    let fixtures = Path::new(FIXTURES);
    if !fixtures.join("tiny-sdxl").is_dir() {
        println!("(no fixtures at {FIXTURES}: skipping the LoRA, SDXL and upscaler jobs)");
        return Ok(false);
    }
    // A LoRA or an upscaler is a directory holding its one file.
    let bundle = |name: &str, file: &str| -> Result<PathBuf> {
        let dir = out.join("bundles").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let from = fixtures.join(file);
        let to = dir.join(from.file_name().unwrap_or_default());
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        Ok(dir)
    };
    let entries = [
        (
            LORA,
            bundle("lora", "loras/tiny-a.kohya.safetensors")?,
            ModelKind::Lora,
            "",
        ),
        (XL, fixtures.join("tiny-sdxl"), ModelKind::Checkpoint, ""),
        (
            UPSCALER,
            bundle("upscaler", "upscaler-x2/model.onnx")?,
            ModelKind::Upscaler,
            "x2",
        ),
    ];
    let mut admin = admin_client(&ClientArgs::local(url)).await?;
    for (id, dir, kind, format) in entries {
        let mut m = crate::manifest::manifest_from_source(
            &ModelId(id.into()),
            &format!("file://{}", dir.display()),
        )
        .await?;
        m.kind = kind;
        m.format = format.into();
        let m = admin
            .register_model(pb::RegisterModelRequest {
                model: Some(m.into()),
            })
            .await?
            .into_inner();
        println!(
            "registering {id}: {:?}, family {:?}{}",
            kind,
            m.family,
            if m.format.is_empty() {
                String::new()
            } else {
                format!(", format {}", m.format)
            }
        );
    }
    Ok(true)
}

async fn wait_for_workers(url: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let mut admin = admin_client(&ClientArgs::local(url)).await?;
    loop {
        let w = admin
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers;
        if w.len() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "only {} of {n} workers connected",
                w.len()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
