//! What clients do with jobs: submit, read, watch, cancel, list.
//!
//! A submission is stored before the scheduler sees it and answered only
//! once committed; reads come from the records of unfinished jobs or from
//! the store, never from the scheduler.

use std::sync::Arc;

use tokio::sync::broadcast;
use tracing::info;

use super::records::Reserve;
use super::store::{scoped_key, Cursor, ListQuery, Op, StoredJob};
use super::Coordinator;
use crate::error::{Error, Result};
use crate::types::*;

/// A job as a client sees it, with its start estimate.
#[derive(Clone, Debug)]
pub struct JobView {
    pub record: JobRecord,
    /// Seconds from now until the job is estimated to start; 0 once
    /// started or when no worker could start it yet.
    pub estimated_start_s: f64,
}

/// A job's first event for a new watcher and the receiver of the rest
/// (none once the job has finished).
pub struct Watch {
    pub first: JobEvent,
    pub rx: Option<broadcast::Receiver<JobEvent>>,
}

impl Coordinator {
    fn estimate_s(&self, at_ms: Option<Millis>) -> f64 {
        at_ms.map_or(0.0, |t| t.saturating_sub(self.now_ms()) as f64 / 1000.0)
    }

    /// Accepts a validated job for `client` ("" with authentication off),
    /// answering once it is durable. Returns the job and whether an earlier
    /// job with the same idempotency key was returned instead.
    pub async fn submit(&self, client: &str, mut spec: JobSpec) -> Result<(JobView, bool)> {
        self.check_serving()?;
        self.check_models(&mut spec)?;
        let key = scoped_key(client, &spec.idempotency_key);
        if let Some(k) = &key {
            if let Some(earlier) = self.records.key_owner(k) {
                return self.deduplicated(client, &spec, earlier).await;
            }
            if let Some(earlier) = self.store.find_key(k).await? {
                return self.deduplicated(client, &spec, earlier).await;
            }
        }
        let id = JobId(format!("j-{}", uuid::Uuid::new_v4().simple()));
        match self
            .records
            .reserve(&id, client, key.as_deref(), &self.cfg.limits)?
        {
            Reserve::Duplicate(earlier) => return self.deduplicated(client, &spec, earlier).await,
            Reserve::Ok => {}
        }
        let now = self.now_ms();
        let stored = StoredJob {
            id: id.clone(),
            client: client.to_owned(),
            spec: spec.clone(),
            state: JobState::Queued,
            attempt: 0,
            failures: 0,
            worker: None,
            tier: None,
            created_ms: now,
            updated_ms: now,
            error: String::new(),
            result: None,
            last_worker: None,
        };
        if let Err(e) = self
            .store
            .commit(vec![Op::PutJob(Box::new(stored.clone()))])
            .await
        {
            self.records.release(client, key.as_deref());
            self.metrics.job_rejected();
            return Err(e);
        }
        self.metrics.job_accepted(&id);
        self.records.insert(&stored, None);
        let spec = Arc::new(spec);
        let scheduled = self.with_sched(|s, now| {
            let effects = s.submit(id.clone(), spec.clone(), now)?;
            Ok((s.estimate_start_ms(&id, now).map(|ms| now + ms), effects))
        });
        match scheduled {
            Ok(est) => self.records.set_estimate(&id, est),
            Err(e) => {
                // Stored but not schedulable (its model was removed a moment
                // ago, or the store began failing): it must not stay queued.
                self.fail_unscheduled(&id, &e.to_string());
            }
        }
        info!(job_id = %id, model_id = %spec.model_id, "accepted");
        Ok((self.view(&id).await?, false))
    }

    /// The earlier job with the same key, once its submission is durable.
    async fn deduplicated(
        &self,
        client: &str,
        spec: &JobSpec,
        earlier: JobId,
    ) -> Result<(JobView, bool)> {
        // The earlier submission may still be committing.
        self.store.barrier().await?;
        let v = self.view(&earlier).await.map_err(|_| {
            Error::Unavailable(format!(
                "an earlier submission with idempotency key {:?} did not complete; retry",
                spec.idempotency_key
            ))
        })?;
        if !same_request(&v.record.spec, spec) {
            return Err(Error::FailedPrecondition(format!(
                "idempotency key {:?} was used for a different request (job {earlier}); \
                 use a new key for a new request",
                spec.idempotency_key
            )));
        }
        let _ = client;
        Ok((v, true))
    }

    fn fail_unscheduled(&self, id: &JobId, reason: &str) {
        let s = self.sched();
        let reason = format!("could not be scheduled: {reason}");
        self.transition(&s, id, self.now_ms(), Vec::new(), |r| {
            r.state = JobState::Failed;
            r.error = reason.clone();
            Some(JobEventKind::Failed { reason })
        });
    }

    /// A job as clients see it: from the records if unfinished, else from
    /// the store.
    pub async fn view(&self, id: &JobId) -> Result<JobView> {
        if let Some((record, _, est)) = self.records.get(id) {
            return Ok(JobView {
                record,
                estimated_start_s: self.estimate_s(est),
            });
        }
        match self.store.get(id).await? {
            Some(j) => Ok(JobView {
                record: j.record(),
                estimated_start_s: 0.0,
            }),
            None => Err(Error::UnknownJob(id.clone())),
        }
    }

    /// Who submitted a job ("" when authentication is off).
    pub async fn owner(&self, id: &JobId) -> Result<Arc<str>> {
        if let Some(o) = self.records.owner(id) {
            return Ok(o);
        }
        match self.store.get(id).await? {
            Some(j) => Ok(Arc::from(j.client.as_str())),
            None => Err(Error::UnknownJob(id.clone())),
        }
    }

    /// A completed job's images, read from the store.
    pub async fn images(&self, id: &JobId, n: u32) -> Result<Images> {
        Ok(self.store.images(id, n as usize).await?.into())
    }

    /// The job now, as an event, and a receiver of later events.
    pub async fn watch(self: &Arc<Self>, id: &JobId) -> Result<Watch> {
        let now = self.now_ms();
        if let Some((record, est, rx)) = self.records.watch(id) {
            let first = snapshot_event(&record, self.estimate_s(est), now, None);
            if let Some(first) = first {
                return Ok(Watch {
                    first,
                    rx: Some(rx),
                });
            }
        }
        // Finished (or never known): the stored record is final.
        let j = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| Error::UnknownJob(id.clone()))?;
        let record = j.record();
        let images = match &record.output {
            Some(o) if record.state == JobState::Completed => {
                Some(self.images(id, o.image_count).await?)
            }
            _ => None,
        };
        let first = snapshot_event(&record, 0.0, now, images).ok_or_else(|| {
            Error::Internal(format!(
                "job {id} is {} with no event",
                record.state.as_str()
            ))
        })?;
        Ok(Watch { first, rx: None })
    }

    /// Cancels a queued or running job; answers once that is durable.
    pub async fn cancel(&self, id: &JobId) -> Result<JobView> {
        let finished = |state: JobState| {
            Error::FailedPrecondition(format!("job {id} is already {}", state.as_str()))
        };
        let state = self.view(id).await?.record.state;
        if state.is_terminal() {
            return Err(finished(state));
        }
        let cancelled = self.with_sched(|s, now| {
            let effects = s.cancel(id, now)?;
            self.records.set_current(id, None);
            self.transition(s, id, now, Vec::new(), |r| {
                r.state = JobState::Cancelled;
                Some(JobEventKind::Cancelled)
            });
            Ok(((), effects))
        });
        if let Err(Error::UnknownJob(_)) = cancelled {
            // It finished between the check above and the scheduler: once
            // that finish is committed, say so as for any finished job.
            self.store.barrier().await?;
            let state = self.view(id).await?.record.state;
            if state.is_terminal() {
                return Err(finished(state));
            }
        }
        cancelled?;
        self.store.barrier().await?;
        info!(job_id = %id, "cancelled");
        self.metrics.job_cancelled(id);
        self.view(id).await
    }

    /// A page of jobs, oldest first, from the store (so only what is
    /// durable). `page_token` continues a listing; a page may be short.
    pub async fn list(
        &self,
        state: Option<JobState>,
        model: Option<ModelId>,
        client: Option<&str>,
        page_token: &str,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, String)> {
        let after = (!page_token.is_empty())
            .then(|| Cursor::parse(page_token))
            .transpose()?;
        let (jobs, next) = self
            .store
            .list(&ListQuery {
                state,
                model,
                client: client.map(str::to_owned),
                after,
                limit,
                max_scanned: 0,
            })
            .await?;
        Ok((
            jobs.iter().map(StoredJob::record).collect(),
            next.map(|c| c.token()).unwrap_or_default(),
        ))
    }
}

impl Coordinator {
    /// Checks what a job names against the catalogue, and fills what it
    /// leaves to defaults: the size (0 x 0: the checkpoint's, or the input
    /// image's) and the image-to-image strength (0: 0.75). Errors name the
    /// field and the model.
    fn check_models(&self, spec: &mut JobSpec) -> Result<()> {
        use crate::manifest::fits;
        let l = &self.cfg.limits;
        let ckpt = self
            .models
            .get(&spec.model_id)
            .map(|m| m.clone())
            .ok_or_else(|| Error::UnknownModel(spec.model_id.clone()))?;
        if ckpt.kind != ModelKind::Checkpoint {
            return Err(Error::invalid(
                "model_id",
                format!("{} is a {:?}, not a checkpoint", ckpt.id, ckpt.kind),
            ));
        }
        let extra = |id: &ModelId, field: &'static str, kind: ModelKind| {
            let m = self
                .models
                .get(id)
                .map(|m| m.clone())
                .ok_or_else(|| Error::invalid(field, format!("unknown model {id}")))?;
            if m.kind != kind {
                return Err(Error::invalid(
                    field,
                    format!("{id} is a {:?}, not a {kind:?}", m.kind),
                ));
            }
            if !fits(&ckpt.family, &m.family) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{id} is for {} models; checkpoint {} is {}",
                        m.family, ckpt.id, ckpt.family
                    ),
                ));
            }
            Ok(m)
        };
        if spec.loras.len() > l.max_loras {
            return Err(Error::invalid(
                "loras",
                format!(
                    "{} LoRAs, more than {} (limits.max_loras)",
                    spec.loras.len(),
                    l.max_loras
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for lr in &spec.loras {
            if !seen.insert(&lr.model_id) {
                return Err(Error::invalid(
                    "loras",
                    format!("LoRA {} is named twice", lr.model_id),
                ));
            }
            if lr.weight.abs() > l.max_lora_weight {
                return Err(Error::invalid(
                    "loras.weight",
                    format!(
                        "{} for LoRA {} is outside -{m}..={m} (limits.max_lora_weight)",
                        lr.weight,
                        lr.model_id,
                        m = l.max_lora_weight
                    ),
                ));
            }
            extra(&lr.model_id, "loras.model_id", ModelKind::Lora)?;
        }
        if let Some(v) = &spec.vae_id {
            extra(v, "vae_id", ModelKind::Vae)?;
        }
        let scale = match &spec.upscaler_id {
            Some(u) => match extra(u, "upscaler_id", ModelKind::Upscaler)?
                .format
                .as_str()
            {
                "x2" => 2,
                // Unknown: the largest, so that the size check is safe.
                _ => 4,
            },
            None => 1,
        };
        match &spec.init_image {
            Some(img) => {
                if img.len() > l.max_init_image_bytes {
                    return Err(Error::invalid(
                        "init_image",
                        format!(
                            "{} bytes, more than {} (limits.max_init_image_bytes)",
                            img.len(),
                            l.max_init_image_bytes
                        ),
                    ));
                }
                let (w, h) = image_size(img).ok_or_else(|| {
                    Error::invalid("init_image", "is not a PNG or JPEG file (or is truncated)")
                })?;
                if spec.width == 0 && spec.height == 0 {
                    (spec.width, spec.height) = (w, h);
                } else if (w, h) != (spec.width, spec.height) {
                    return Err(Error::invalid(
                        "init_image",
                        format!(
                            "is {w}x{h}; the job asks for {}x{} (the input is not resized)",
                            spec.width, spec.height
                        ),
                    ));
                }
                if spec.strength == 0.0 {
                    spec.strength = 0.75;
                }
                if !(spec.strength > 0.0 && spec.strength <= 1.0) {
                    return Err(Error::invalid(
                        "strength",
                        format!("{} is outside (0, 1]", spec.strength),
                    ));
                }
            }
            None if spec.strength != 0.0 => {
                return Err(Error::invalid(
                    "strength",
                    "is for image-to-image: give an init_image or leave it 0",
                ))
            }
            None => {}
        }
        if spec.width == 0 && spec.height == 0 {
            let side = if ckpt.family == "sdxl" { 1024 } else { 512 };
            (spec.width, spec.height) = (side, side);
        }
        super::jobs::validate(spec, l)?;
        // The result must fit one message to this coordinator (RGB PNG, at
        // worst uncompressed, plus the rest of the message).
        let per_image =
            u64::from(spec.width * scale) * u64::from(spec.height * scale) * 3 + (64 << 10);
        let worst = per_image * u64::from(spec.num_images);
        let room = (self.cfg.max_message_bytes as u64).saturating_sub(1 << 20);
        if worst > room {
            return Err(Error::invalid(
                "num_images",
                format!(
                    "{} images of {}x{} (upscaled x{scale}) may take {worst} bytes, more than one \
                     result message may carry ({room}; max_message_bytes); ask for fewer images \
                     per job",
                    spec.num_images,
                    spec.width * scale,
                    spec.height * scale
                ),
            ));
        }
        Ok(())
    }
}

/// Width and height of a PNG or JPEG file, from its header.
fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() >= 24 && &b[12..16] == b"IHDR" {
        let w = u32::from_be_bytes(b[16..20].try_into().ok()?);
        let h = u32::from_be_bytes(b[20..24].try_into().ok()?);
        return Some((w, h));
    }
    if !b.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    // JPEG: walk the markers to the first start-of-frame.
    let mut i = 2;
    while i + 9 <= b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        let sof = (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker);
        if sof {
            let h = u32::from(u16::from_be_bytes([b[i + 5], b[i + 6]]));
            let w = u32::from(u16::from_be_bytes([b[i + 7], b[i + 8]]));
            return Some((w, h));
        }
        i += 2 + len;
    }
    None
}

/// Whether two submissions ask for the same thing (the key aside).
fn same_request(a: &JobSpec, b: &JobSpec) -> bool {
    let mut b = b.clone();
    b.idempotency_key = a.idempotency_key.clone();
    *a == b
}

/// The event that describes a record as it is now, for a new watcher.
pub(super) fn snapshot_event(
    r: &JobRecord,
    est: f64,
    now: Millis,
    images: Option<Images>,
) -> Option<JobEvent> {
    let kind = match r.state {
        JobState::Queued => JobEventKind::Queued {
            estimated_start_s: est,
        },
        JobState::Running => JobEventKind::Assigned {
            worker: r.worker.clone()?,
            tier: r.tier?,
            attempt: r.attempt,
        },
        JobState::Completed => JobEventKind::Completed {
            output: r.output.clone()?,
            images: images?,
        },
        JobState::Failed => JobEventKind::Failed {
            reason: r.error.clone(),
        },
        JobState::Cancelled => JobEventKind::Cancelled,
    };
    Some(JobEvent {
        job_id: r.id.clone(),
        at_ms: now,
        kind,
    })
}
