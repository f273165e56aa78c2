//! Conversions between the wire (`pb`) and the domain (`types`): the only
//! module that sees both. Conversions from the wire reject missing or
//! malformed fields with an error that names the field.

use crate::error::{Error, Result};
use crate::pb;
use crate::types::*;

fn required<T>(v: Option<T>, field: &'static str) -> Result<T> {
    v.ok_or_else(|| Error::invalid(field, "is required"))
}

fn id_field(s: String, field: &'static str) -> Result<String> {
    if s.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if s.len() > 256 {
        return Err(Error::invalid(field, "is longer than 256 bytes"));
    }
    if s.chars().any(|c| c.is_control() || c == '/' || c == '\\') {
        return Err(Error::invalid(
            field,
            format!("{s:?} contains a control character or a path separator"),
        ));
    }
    Ok(s)
}

pub fn model_id(s: String, field: &'static str) -> Result<ModelId> {
    id_field(s, field).map(ModelId)
}

pub fn job_id(s: String) -> Result<JobId> {
    id_field(s, "job_id").map(JobId)
}

pub fn worker_id(s: String) -> Result<WorkerId> {
    id_field(s, "worker_id").map(WorkerId)
}

// ---- models ---------------------------------------------------------------

impl TryFrom<pb::Model> for ModelManifest {
    type Error = Error;
    fn try_from(m: pb::Model) -> Result<Self> {
        let kind = match pb::ModelKind::try_from(m.kind) {
            Ok(pb::ModelKind::Unspecified | pb::ModelKind::Checkpoint) => ModelKind::Checkpoint,
            Ok(pb::ModelKind::Lora) => ModelKind::Lora,
            Ok(pb::ModelKind::Vae) => ModelKind::Vae,
            Ok(pb::ModelKind::Upscaler) => ModelKind::Upscaler,
            Err(_) => {
                return Err(Error::invalid(
                    "model.kind",
                    format!("unknown kind {}", m.kind),
                ))
            }
        };
        if m.source.is_empty() {
            return Err(Error::invalid("model.source", "must not be empty"));
        }
        if m.files.is_empty() {
            return Err(Error::invalid(
                "model.files",
                "a model needs at least one file",
            ));
        }
        let files = m
            .files
            .into_iter()
            .map(|f| {
                crate::manifest::validate_relative_path(&f.path)?;
                if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::invalid(
                        "model.files.sha256",
                        format!("{:?} for {} is not 64 hex digits", f.sha256, f.path),
                    ));
                }
                Ok(ModelFile {
                    path: f.path,
                    size_bytes: f.size_bytes,
                    sha256: f.sha256.to_ascii_lowercase(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (field, v) in [("model.family", &m.family), ("model.format", &m.format)] {
            if v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
            {
                return Err(Error::invalid(
                    field,
                    format!("{v:?} is not a family or format name"),
                ));
            }
        }
        Ok(ModelManifest {
            family: m.family,
            format: m.format,
            id: model_id(m.id, "model.id")?,
            kind,
            source: m.source,
            files,
        })
    }
}

impl From<ModelManifest> for pb::Model {
    fn from(m: ModelManifest) -> Self {
        let kind = match m.kind {
            ModelKind::Checkpoint => pb::ModelKind::Checkpoint,
            ModelKind::Lora => pb::ModelKind::Lora,
            ModelKind::Vae => pb::ModelKind::Vae,
            ModelKind::Upscaler => pb::ModelKind::Upscaler,
        };
        pb::Model {
            id: m.id.0,
            kind: kind as i32,
            source: m.source,
            files: m
                .files
                .into_iter()
                .map(|f| pb::ModelFile {
                    path: f.path,
                    size_bytes: f.size_bytes,
                    sha256: f.sha256,
                })
                .collect(),
            family: m.family,
            format: m.format,
        }
    }
}

// ---- jobs -----------------------------------------------------------------

/// Structural conversion; the coordinator checks limits (`JobLimits`).
impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = Error;
    fn try_from(s: pb::JobSpec) -> Result<Self> {
        if !s.guidance_scale.is_finite() {
            return Err(Error::invalid("guidance_scale", "must be a finite number"));
        }
        let mut loras = Vec::with_capacity(s.loras.len());
        for l in s.loras {
            if !l.weight.is_finite() {
                return Err(Error::invalid("loras.weight", "must be a finite number"));
            }
            loras.push(LoraRef {
                model_id: model_id(l.model_id, "loras.model_id")?,
                weight: l.weight,
            });
        }
        if !s.strength.is_finite() {
            return Err(Error::invalid("strength", "must be a finite number"));
        }
        let optional = |v: String, field| (!v.is_empty()).then(|| model_id(v, field)).transpose();
        Ok(JobSpec {
            loras,
            vae_id: optional(s.vae_id, "vae_id")?,
            init_image: (!s.init_image.is_empty()).then(|| bytes::Bytes::from(s.init_image)),
            strength: s.strength,
            upscaler_id: optional(s.upscaler_id, "upscaler_id")?,
            model_id: model_id(s.model_id, "model_id")?,
            prompt: s.prompt,
            negative_prompt: s.negative_prompt,
            width: s.width,
            height: s.height,
            steps: s.steps,
            guidance_scale: s.guidance_scale,
            seed: s.seed,
            num_images: s.num_images,
            scheduler: s.scheduler,
            priority: s.priority,
            idempotency_key: s.idempotency_key,
        })
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(s: &JobSpec) -> Self {
        pb::JobSpec {
            model_id: s.model_id.0.clone(),
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            width: s.width,
            height: s.height,
            steps: s.steps,
            guidance_scale: s.guidance_scale,
            seed: s.seed,
            num_images: s.num_images,
            scheduler: s.scheduler.clone(),
            priority: s.priority,
            idempotency_key: s.idempotency_key.clone(),
            loras: s
                .loras
                .iter()
                .map(|l| pb::LoraRef {
                    model_id: l.model_id.0.clone(),
                    weight: l.weight,
                })
                .collect(),
            vae_id: s.vae_id.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
            init_image: s
                .init_image
                .as_ref()
                .map(|b| b.to_vec())
                .unwrap_or_default(),
            strength: s.strength,
            upscaler_id: s
                .upscaler_id
                .as_ref()
                .map(|m| m.0.clone())
                .unwrap_or_default(),
        }
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => Self::Queued,
            JobState::Running => Self::Running,
            JobState::Completed => Self::Completed,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
        }
    }
}

/// `None` for UNSPECIFIED (any state).
pub fn job_state_filter(v: i32) -> Result<Option<JobState>> {
    Ok(match pb::JobState::try_from(v) {
        Ok(pb::JobState::Unspecified) => None,
        Ok(pb::JobState::Queued) => Some(JobState::Queued),
        Ok(pb::JobState::Running) => Some(JobState::Running),
        Ok(pb::JobState::Completed) => Some(JobState::Completed),
        Ok(pb::JobState::Failed) => Some(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Some(JobState::Cancelled),
        Err(_) => return Err(Error::invalid("state", format!("unknown job state {v}"))),
    })
}

pub fn failure_kind_from_pb(v: i32) -> FailureKind {
    match pb::FailureKind::try_from(v) {
        Ok(pb::FailureKind::Download) => FailureKind::Download,
        Ok(pb::FailureKind::Load) => FailureKind::Load,
        Ok(pb::FailureKind::Inference) => FailureKind::Inference,
        Ok(pb::FailureKind::Cancelled) => FailureKind::Cancelled,
        Ok(pb::FailureKind::Invalid) => FailureKind::Invalid,
        Ok(pb::FailureKind::Result) => FailureKind::Result,
        _ => FailureKind::Other,
    }
}

pub fn failure_kind_to_pb(k: FailureKind) -> pb::FailureKind {
    match k {
        FailureKind::Download => pb::FailureKind::Download,
        FailureKind::Load => pb::FailureKind::Load,
        FailureKind::Inference => pb::FailureKind::Inference,
        FailureKind::Cancelled => pb::FailureKind::Cancelled,
        FailureKind::Invalid => pb::FailureKind::Invalid,
        FailureKind::Result => pb::FailureKind::Result,
        _ => pb::FailureKind::Unspecified,
    }
}

pub fn tier_to_pb(t: Option<CacheTier>) -> pb::CacheTier {
    match t {
        None => pb::CacheTier::Unspecified,
        Some(CacheTier::Vram) => pb::CacheTier::Vram,
        Some(CacheTier::Disk) => pb::CacheTier::Disk,
        Some(CacheTier::Preloaded) => pb::CacheTier::Preloaded,
        Some(CacheTier::Download) => pb::CacheTier::Download,
    }
}

pub fn tier_from_pb(v: i32) -> Option<CacheTier> {
    match pb::CacheTier::try_from(v) {
        Ok(pb::CacheTier::Vram) => Some(CacheTier::Vram),
        Ok(pb::CacheTier::Disk) => Some(CacheTier::Disk),
        Ok(pb::CacheTier::Preloaded) => Some(CacheTier::Preloaded),
        Ok(pb::CacheTier::Download) => Some(CacheTier::Download),
        _ => None,
    }
}

impl From<pb::Timings> for Timings {
    fn from(t: pb::Timings) -> Self {
        let clean = |v: f64| if v.is_finite() && v >= 0.0 { v } else { 0.0 };
        Timings {
            queue_s: clean(t.queue_s),
            download_s: clean(t.download_s),
            load_s: clean(t.load_s),
            inference_s: clean(t.inference_s),
            tier: tier_from_pb(t.tier),
            lora_s: clean(t.lora_s),
            upscale_s: clean(t.upscale_s),
        }
    }
}

impl From<Timings> for pb::Timings {
    fn from(t: Timings) -> Self {
        pb::Timings {
            queue_s: t.queue_s,
            download_s: t.download_s,
            load_s: t.load_s,
            inference_s: t.inference_s,
            tier: tier_to_pb(t.tier) as i32,
            lora_s: t.lora_s,
            upscale_s: t.upscale_s,
        }
    }
}

// ---- worker state -----------------------------------------------------------

impl TryFrom<pb::Heartbeat> for CacheReport {
    type Error = Error;
    fn try_from(h: pb::Heartbeat) -> Result<Self> {
        Ok(CacheReport {
            vram_models: h
                .vram_models
                .into_iter()
                .map(|m| model_id(m, "heartbeat.vram_models"))
                .collect::<Result<_>>()?,
            disk_models: h
                .disk_models
                .into_iter()
                .map(|d| {
                    Ok(DiskModel {
                        model_id: model_id(d.model_id, "heartbeat.disk_models.model_id")?,
                        bytes: d.bytes,
                        preloaded: d.preloaded,
                    })
                })
                .collect::<Result<_>>()?,
            downloads: h
                .downloads
                .into_iter()
                .map(|d| {
                    Ok(DownloadState {
                        model_id: model_id(d.model_id, "heartbeat.downloads.model_id")?,
                        bytes_done: d.bytes_done,
                        bytes_total: d.bytes_total,
                    })
                })
                .collect::<Result<_>>()?,
            free_disk_bytes: h.free_disk_bytes,
            running_jobs: h
                .running_jobs
                .into_iter()
                .map(|r| {
                    Ok(RunningJob {
                        job_id: job_id(r.job_id)?,
                        attempt: r.attempt,
                    })
                })
                .collect::<Result<_>>()?,
            download_bps: h.download_bps,
            draining: h.draining,
        })
    }
}

impl From<&CacheReport> for pb::Heartbeat {
    fn from(r: &CacheReport) -> Self {
        pb::Heartbeat {
            vram_models: r.vram_models.iter().map(|m| m.0.clone()).collect(),
            disk_models: r
                .disk_models
                .iter()
                .map(|d| pb::DiskModel {
                    model_id: d.model_id.0.clone(),
                    bytes: d.bytes,
                    preloaded: d.preloaded,
                })
                .collect(),
            downloads: r
                .downloads
                .iter()
                .map(|d| pb::Download {
                    model_id: d.model_id.0.clone(),
                    bytes_done: d.bytes_done,
                    bytes_total: d.bytes_total,
                })
                .collect(),
            free_disk_bytes: r.free_disk_bytes,
            running_jobs: r
                .running_jobs
                .iter()
                .map(|j| pb::RunningJob {
                    job_id: j.job_id.0.clone(),
                    attempt: j.attempt,
                })
                .collect(),
            download_bps: r.download_bps,
            draining: r.draining,
        }
    }
}

impl TryFrom<pb::Hello> for WorkerHello {
    type Error = Error;
    fn try_from(h: pb::Hello) -> Result<Self> {
        if h.max_concurrent_jobs == 0 {
            return Err(Error::invalid(
                "hello.max_concurrent_jobs",
                "must be at least 1",
            ));
        }
        if h.max_concurrent_jobs > 64 {
            return Err(Error::invalid(
                "hello.max_concurrent_jobs",
                "must be at most 64",
            ));
        }
        Ok(WorkerHello {
            worker_id: worker_id(h.worker_id)?,
            version: h.version,
            gpu_name: h.gpu_name,
            vram_bytes: h.vram_bytes,
            cache_max_bytes: h.cache_max_bytes,
            max_concurrent_jobs: h.max_concurrent_jobs,
            state: h
                .state
                .map(CacheReport::try_from)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl From<&WorkerHello> for pb::Hello {
    fn from(h: &WorkerHello) -> Self {
        pb::Hello {
            worker_id: h.worker_id.0.clone(),
            version: h.version.clone(),
            gpu_name: h.gpu_name.clone(),
            vram_bytes: h.vram_bytes,
            cache_max_bytes: h.cache_max_bytes,
            max_concurrent_jobs: h.max_concurrent_jobs,
            state: Some((&h.state).into()),
        }
    }
}

/// A job's progress as a worker reports it.
pub fn job_phase(p: &pb::JobProgress) -> Result<JobPhase> {
    Ok(match pb::JobPhase::try_from(p.phase) {
        Ok(pb::JobPhase::Downloading) => JobPhase::Downloading {
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
        },
        Ok(pb::JobPhase::Loading) => JobPhase::Loading,
        Ok(pb::JobPhase::Denoising) => JobPhase::Denoising {
            step: p.step,
            total_steps: p.total_steps,
        },
        _ => {
            return Err(Error::invalid(
                "progress.phase",
                format!("unknown phase {}", p.phase),
            ))
        }
    })
}

pub fn job_progress(job: &JobId, attempt: u32, phase: JobPhase) -> pb::JobProgress {
    let mut p = pb::JobProgress {
        job_id: job.0.clone(),
        attempt,
        ..Default::default()
    };
    match phase {
        JobPhase::Downloading {
            bytes_done,
            bytes_total,
        } => {
            p.phase = pb::JobPhase::Downloading as i32;
            p.bytes_done = bytes_done;
            p.bytes_total = bytes_total;
        }
        JobPhase::Loading => p.phase = pb::JobPhase::Loading as i32,
        JobPhase::Denoising { step, total_steps } => {
            p.phase = pb::JobPhase::Denoising as i32;
            p.step = step;
            p.total_steps = total_steps;
        }
    }
    p
}

pub fn required_hello(m: Option<pb::worker_message::Msg>) -> Result<WorkerHello> {
    match required(m, "msg")? {
        pb::worker_message::Msg::Hello(h) => h.try_into(),
        _ => Err(Error::invalid(
            "msg",
            "the first message on the stream must be Hello",
        )),
    }
}

pub fn required_spec(s: Option<pb::JobSpec>) -> Result<JobSpec> {
    required(s, "spec")?.try_into()
}

pub fn required_model(m: Option<pb::Model>) -> Result<ModelManifest> {
    required(m, "model")?.try_into()
}

// ---- coordinator records and events -------------------------------------------

fn output_to_pb(o: &JobOutput, images: Option<&Images>) -> pb::JobOutput {
    pb::JobOutput {
        images: images.map(|i| i.to_vec()).unwrap_or_default(),
        timings: Some(o.timings.into()),
        worker_id: o.worker_id.0.clone(),
        image_count: o.image_count,
    }
}

/// A job for the wire; `images` only when asked for and completed.
pub fn job_to_pb(r: &JobRecord, images: Option<&Images>, estimated_start_s: f64) -> pb::Job {
    pb::Job {
        id: r.id.0.clone(),
        spec: Some(r.spec.as_ref().into()),
        state: pb::JobState::from(r.state) as i32,
        attempt: r.attempt,
        worker_id: r.worker.as_ref().map(|w| w.0.clone()).unwrap_or_default(),
        tier: tier_to_pb(r.tier) as i32,
        created_at_ms: r.created_ms,
        updated_at_ms: r.updated_ms,
        error: r.error.clone(),
        output: r.output.as_ref().map(|o| output_to_pb(o, images)),
        estimated_start_s,
    }
}

pub fn event_to_pb(e: &JobEvent) -> pb::JobEvent {
    use pb::job_event::Event;
    let event = match &e.kind {
        JobEventKind::Queued { estimated_start_s } => Event::Queued(pb::Queued {
            estimated_start_s: *estimated_start_s,
        }),
        JobEventKind::Assigned {
            worker,
            tier,
            attempt,
        } => Event::Assigned(pb::Assigned {
            worker_id: worker.0.clone(),
            tier: tier_to_pb(Some(*tier)) as i32,
            attempt: *attempt,
            estimated_start_s: 0.0,
        }),
        JobEventKind::Downloading {
            bytes_done,
            bytes_total,
        } => Event::Downloading(pb::Downloading {
            bytes_done: *bytes_done,
            bytes_total: *bytes_total,
        }),
        JobEventKind::Loading => Event::Loading(pb::Loading {}),
        JobEventKind::Progress { step, total_steps } => Event::Progress(pb::Progress {
            step: *step,
            total_steps: *total_steps,
        }),
        JobEventKind::Completed { output, images } => Event::Completed(pb::Completed {
            output: Some(output_to_pb(output, Some(images))),
        }),
        JobEventKind::Failed { reason } => Event::Failed(pb::Failed {
            reason: reason.clone(),
        }),
        JobEventKind::Cancelled => Event::Cancelled(pb::Cancelled {}),
        JobEventKind::Requeued {
            reason,
            next_attempt,
        } => Event::Requeued(pb::Requeued {
            reason: reason.clone(),
            attempt: *next_attempt,
        }),
    };
    pb::JobEvent {
        job_id: e.job_id.0.clone(),
        at_ms: e.at_ms,
        event: Some(event),
    }
}

pub fn worker_to_pb(w: &crate::coordinator::WorkerSummary, now_ms: Millis) -> pb::WorkerInfo {
    let mut state: pb::Heartbeat = (&w.report).into();
    state.running_jobs = w
        .running
        .iter()
        .map(|r| pb::RunningJob {
            job_id: r.job_id.0.clone(),
            attempt: r.attempt,
        })
        .collect();
    pb::WorkerInfo {
        worker_id: w.worker_id.0.clone(),
        version: w.version.clone(),
        gpu_name: w.gpu_name.clone(),
        vram_bytes: w.vram_bytes,
        cache_max_bytes: w.cache_max_bytes,
        max_concurrent_jobs: w.max_concurrent_jobs,
        state: Some(state),
        last_seen_s_ago: now_ms.saturating_sub(w.last_seen_ms) as f64 / 1000.0,
        draining: w.draining,
    }
}

pub fn model_summary_to_pb(m: &crate::coordinator::ModelSummary) -> pb::ModelStatus {
    pb::ModelStatus {
        model_id: m.status.model.0.clone(),
        queued_jobs: m.status.queued,
        running_jobs: m.status.running,
        workers_vram: m.status.workers_vram,
        workers_disk: m.status.workers_disk,
        workers_downloading: m.status.workers_downloading,
        demand_per_s: m.demand_per_s,
        replica_target: m.replica_target,
        bytes: m.bytes,
    }
}

impl From<crate::coordinator::ToWorker> for pb::CoordinatorMessage {
    fn from(m: crate::coordinator::ToWorker) -> Self {
        use crate::coordinator::ToWorker;
        use pb::coordinator_message::Msg;
        let msg = match m {
            ToWorker::Welcome {
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
                max_message_bytes,
            } => Msg::Welcome(pb::Welcome {
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
                max_message_bytes,
            }),
            ToWorker::Assign {
                job,
                attempt,
                spec,
                model,
                extras,
                queued_ms,
            } => Msg::Assign(pb::Assign {
                job_id: job.0,
                attempt,
                spec: Some(spec.as_ref().into()),
                model: Some(model.as_ref().clone().into()),
                queued_s: queued_ms as f64 / 1000.0,
                extra_models: extras.iter().map(|m| m.as_ref().clone().into()).collect(),
            }),
            ToWorker::Cancel { job, attempt } => Msg::Cancel(pb::Cancel {
                job_id: job.0,
                attempt,
            }),
            ToWorker::Prefetch(models) => Msg::Prefetch(pb::Prefetch {
                models: models.iter().map(|m| m.as_ref().clone().into()).collect(),
            }),
        };
        pb::CoordinatorMessage { msg: Some(msg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_must_stay_inside_the_bundle() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a\\b"] {
            let m = pb::Model {
                id: "m".into(),
                kind: 0,
                source: "file:///tmp".into(),
                files: vec![pb::ModelFile {
                    path: bad.into(),
                    size_bytes: 1,
                    sha256: "0".repeat(64),
                }],
                ..Default::default()
            };
            assert!(ModelManifest::try_from(m).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let err = JobSpec::try_from(pb::JobSpec::default()).unwrap_err();
        assert!(err.to_string().contains("model_id"), "{err}");
        let err = required_hello(Some(pb::worker_message::Msg::GoingAway(
            pb::GoingAway::default(),
        )))
        .unwrap_err();
        assert!(err.to_string().contains("Hello"), "{err}");
    }

    #[test]
    fn heartbeat_round_trips() {
        let r = CacheReport {
            vram_models: vec!["a".into()],
            disk_models: vec![DiskModel {
                model_id: "b".into(),
                bytes: 7,
                preloaded: true,
            }],
            downloads: vec![DownloadState {
                model_id: "c".into(),
                bytes_done: 1,
                bytes_total: 9,
            }],
            free_disk_bytes: 5,
            running_jobs: vec![RunningJob {
                job_id: "j".into(),
                attempt: 2,
            }],
            download_bps: 3,
            draining: true,
        };
        let back = CacheReport::try_from(pb::Heartbeat::from(&r)).unwrap();
        assert_eq!(back, r);
    }
}
