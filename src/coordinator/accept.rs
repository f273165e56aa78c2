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
    pub async fn submit(&self, client: &str, spec: JobSpec) -> Result<(JobView, bool)> {
        self.check_serving()?;
        if !self.models.contains_key(&spec.model_id) {
            return Err(Error::UnknownModel(spec.model_id));
        }
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
        let state = self.view(id).await?.record.state;
        if state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is already {}",
                state.as_str()
            )));
        }
        self.with_sched(|s, now| {
            let effects = s.cancel(id, now)?;
            self.records.set_current(id, None);
            self.transition(s, id, now, Vec::new(), |r| {
                r.state = JobState::Cancelled;
                Some(JobEventKind::Cancelled)
            });
            Ok(((), effects))
        })?;
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
