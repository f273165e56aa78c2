//! The client commands: each calls the coordinator and prints the answer.

use std::path::PathBuf;

use crate::client::{
    admin_client, follow, jobs_client, tier_word, write_images, ClientArgs, Finished,
};
use crate::config::DeviceKind;
use crate::error::{Error, Result};
use crate::pb;

use super::args::*;
use crate::client::print;

pub async fn plan_image(a: PlanImageCmd) -> Result<()> {
    let Some(url) = a.from_coordinator.map(|u| ClientArgs::local(&u)) else {
        println!("{}", crate::sim::plan_image_cli(&a.plan)?);
        return Ok(());
    };
    let status = admin_client(&url)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let candidates: Vec<crate::scheduler::ImageCandidate> = status
        .models
        .into_iter()
        .map(|m| crate::scheduler::ImageCandidate {
            model: crate::types::ModelId(m.model_id),
            bytes: m.bytes,
            demand: m.demand_per_s,
        })
        .collect();
    println!(
        "{}",
        crate::scheduler::plan_image(&candidates, a.plan.budget_bytes).table()
    );
    Ok(())
}

pub fn bench_pipeline(a: BenchPipelineArgs) -> Result<()> {
    use crate::pipeline::bench::{bench_with, BenchOptions};
    use crate::pipeline::{Device, PipelineConfig};
    let loras = a
        .loras
        .iter()
        .map(|s| {
            let l = parse_lora(s)?;
            Ok((PathBuf::from(l.model_id), l.weight))
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = PipelineConfig {
        device: match a.device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => Device::Cuda {
                device_id: a.device_id,
            },
        },
        allow_cpu_fallback: false,
        intra_op_threads: None,
        lora_conv: a.lora_conv.then_some(true),
        ..Default::default()
    };
    let opts = BenchOptions {
        steps: a.steps,
        width: a.width,
        height: a.height,
        runs: a.runs,
        loras,
        upscaler: a.upscaler,
    };
    let r = bench_with(&a.model_dir, &cfg, &opts).map_err(crate::worker::onnx::to_error)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?
        );
    } else {
        println!("{r}");
    }
    Ok(())
}

pub async fn models(cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::Add {
            id,
            source,
            kind,
            format,
            client,
        } => {
            let id = crate::convert::model_id(id, "id")?;
            let source = crate::source::absolute_if_local(&source)?;
            let mut manifest = crate::manifest::manifest_from_source(&id, &source).await?;
            manifest.kind =
                kind.map_or_else(|| crate::manifest::guess_kind(&manifest.files), Into::into);
            manifest.format = format.unwrap_or_default();
            let total = manifest.total_bytes();
            let files = manifest.files.len();
            let m = admin_client(&client)
                .await?
                .register_model(pb::RegisterModelRequest {
                    model: Some(manifest.into()),
                })
                .await?
                .into_inner();
            println!(
                "registered {} ({files} files, {total} bytes) from {}",
                m.id,
                crate::redact::url(&m.source)
            );
        }
        ModelsCmd::List(client) => {
            let r = admin_client(&client)
                .await?
                .list_models(pb::ListModelsRequest {})
                .await?
                .into_inner();
            println!("{:<24} {:>14} {:>6}  source", "model", "bytes", "files");
            for m in r.models {
                let bytes: u64 = m.files.iter().map(|f| f.size_bytes).sum();
                println!(
                    "{:<24} {:>14} {:>6}  {}",
                    m.id,
                    bytes,
                    m.files.len(),
                    crate::redact::url(&m.source)
                );
            }
        }
        ModelsCmd::Remove { id, client } => {
            admin_client(&client)
                .await?
                .remove_model(pb::RemoveModelRequest {
                    model_id: id.clone(),
                })
                .await?;
            println!("removed {id}");
        }
        ModelsCmd::Publish { dir } => {
            let p = tokio::task::spawn_blocking(move || crate::manifest::publish_dir(&dir))
                .await
                .map_err(|e| Error::Internal(format!("publish task: {e}")))??;
            println!("{}", p.instructions());
        }
        ModelsCmd::Fetch { dir, models } => {
            let cache = crate::worker::cache::DiskCache::open(crate::worker::cache::CacheConfig {
                dir,
                max_bytes: u64::MAX,
                preloaded_dir: None,
                max_concurrent_downloads: 2,
            })
            .await?;
            for pair in models {
                let (id, source) = pair.split_once('=').ok_or_else(|| {
                    Error::invalid("models", format!("{pair:?} is not ID=SOURCE"))
                })?;
                let id = crate::convert::model_id(id.to_owned(), "models")?;
                let source = crate::source::absolute_if_local(source)?;
                let manifest = crate::manifest::manifest_from_source(&id, &source).await?;
                let (guard, tier) = cache.ensure(&manifest, &|_, _| {}).await?;
                println!(
                    "{id}: {} bytes at {} ({})",
                    manifest.total_bytes(),
                    guard.path().display(),
                    tier.as_str()
                );
            }
        }
        ModelsCmd::Warm {
            id,
            replicas,
            client,
        } => {
            let r = admin_client(&client)
                .await?
                .warm_model(pb::WarmModelRequest {
                    model_id: id.clone(),
                    replicas,
                })
                .await?
                .into_inner();
            println!(
                "{id}: held by [{}]; prefetching on [{}]",
                r.holders.join(", "),
                r.worker_ids.join(", ")
            );
        }
    }
    Ok(())
}

pub async fn submit(a: SubmitArgs) -> Result<()> {
    let loras = a
        .loras
        .iter()
        .map(|s| parse_lora(s))
        .collect::<Result<Vec<_>>>()?;
    let init_image = match &a.init_image {
        Some(p) => std::fs::read(p).map_err(|e| Error::io(p, e))?,
        None => Vec::new(),
    };
    let mut client = jobs_client(&a.client).await?;
    let r = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                model_id: a.model.clone(),
                prompt: a.prompt,
                negative_prompt: a.negative_prompt,
                width: a.width,
                height: a.height,
                steps: a.steps,
                guidance_scale: a.guidance,
                seed: a.seed,
                num_images: a.images,
                scheduler: a.scheduler,
                priority: a.priority,
                idempotency_key: a.idempotency_key,
                loras,
                vae_id: a.vae.unwrap_or_default(),
                init_image,
                strength: a.strength,
                upscaler_id: a.upscaler.unwrap_or_default(),
            }),
        })
        .await?
        .into_inner();
    let job = r
        .job
        .ok_or_else(|| Error::Internal("no job in the response".into()))?;
    if a.no_wait {
        println!("{}", job.id);
        return Ok(());
    }
    eprintln!(
        "job {} queued (estimated start in {:.1} s)",
        job.id, job.estimated_start_s
    );
    let done = follow(&mut client, &job.id, true).await?;
    match done {
        Finished::Completed(out) => {
            let paths = write_images(&a.out, &out.images)?;
            let t = out.timings.unwrap_or_default();
            println!(
                "{}: completed on {} from {} (queue {:.2}s, download {:.2}s, load {:.2}s, inference {:.2}s) -> {}",
                job.id,
                out.worker_id,
                tier_word(t.tier),
                t.queue_s,
                t.download_s,
                t.load_s,
                t.inference_s,
                paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Finished::Failed(reason) => Err(Error::FailedPrecondition(format!(
            "job {} failed: {reason}",
            job.id
        ))),
        Finished::Cancelled => Err(Error::FailedPrecondition(format!(
            "job {} was cancelled",
            job.id
        ))),
    }
}

pub async fn jobs(cmd: JobsCmd) -> Result<()> {
    match cmd {
        JobsCmd::Get { id, client } => {
            let j = jobs_client(&client)
                .await?
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    include_images: false,
                })
                .await?
                .into_inner();
            print::job(&j);
        }
        JobsCmd::Watch { id, client } => {
            let mut c = jobs_client(&client).await?;
            match follow(&mut c, &id, true).await? {
                Finished::Completed(o) => println!(
                    "{id}: completed on {} ({} images)",
                    o.worker_id,
                    o.images.len()
                ),
                Finished::Failed(r) => println!("{id}: failed: {r}"),
                Finished::Cancelled => println!("{id}: cancelled"),
            }
        }
        JobsCmd::Cancel { id, client } => {
            let j = jobs_client(&client)
                .await?
                .cancel_job(pb::CancelJobRequest { job_id: id })
                .await?
                .into_inner();
            print::job(&j);
        }
        JobsCmd::List { model, client } => {
            let mut c = jobs_client(&client).await?;
            let mut token = String::new();
            loop {
                let r = c
                    .list_jobs(pb::ListJobsRequest {
                        state: 0,
                        model_id: model.clone().unwrap_or_default(),
                        page_size: 500,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                for j in &r.jobs {
                    print::job(j);
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
        }
    }
    Ok(())
}

pub async fn workers(client: ClientArgs) -> Result<()> {
    let r = admin_client(&client)
        .await?
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner();
    print::workers(&r);
    Ok(())
}

pub async fn status(client: ClientArgs) -> Result<()> {
    let r = admin_client(&client)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    print::status(&r);
    Ok(())
}
