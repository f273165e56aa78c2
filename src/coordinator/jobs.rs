//! The `Jobs` service: thin methods over inner functions returning the
//! crate `Error`, which maps to a gRPC status in one place.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::accept::Watch;
use super::auth::Caller;
use super::Coordinator;
use crate::config::JobLimits;
use crate::convert;
use crate::error::{Error, Result};
use crate::pb;
use crate::types::*;

pub struct JobsService(pub Arc<Coordinator>);

/// Checks a job against the configured limits; errors name the field.
pub fn validate(spec: &JobSpec, l: &JobLimits) -> Result<()> {
    for (field, v) in [("width", spec.width), ("height", spec.height)] {
        if v % 8 != 0 {
            return Err(Error::invalid(field, format!("{v} is not a multiple of 8")));
        }
        if v < l.min_side_px || v > l.max_side_px {
            return Err(Error::invalid(
                field,
                format!("{v} is outside {}..={}", l.min_side_px, l.max_side_px),
            ));
        }
    }
    if spec.steps == 0 || spec.steps > l.max_steps {
        return Err(Error::invalid(
            "steps",
            format!("{} is outside 1..={}", spec.steps, l.max_steps),
        ));
    }
    if !(0.0..=l.max_guidance).contains(&spec.guidance_scale) {
        return Err(Error::invalid(
            "guidance_scale",
            format!("{} is outside 0..={}", spec.guidance_scale, l.max_guidance),
        ));
    }
    if spec.num_images == 0 || spec.num_images > l.max_images {
        return Err(Error::invalid(
            "num_images",
            format!("{} is outside 1..={}", spec.num_images, l.max_images),
        ));
    }
    for (field, p) in [
        ("prompt", &spec.prompt),
        ("negative_prompt", &spec.negative_prompt),
    ] {
        if p.len() > l.max_prompt_bytes {
            return Err(Error::invalid(
                field,
                format!("{} bytes is more than {}", p.len(), l.max_prompt_bytes),
            ));
        }
    }
    if spec.idempotency_key.len() > 256 {
        return Err(Error::invalid(
            "idempotency_key",
            "is longer than 256 bytes",
        ));
    }
    const SCHEDULERS: [&str; 6] = [
        "",
        "euler",
        "euler_a",
        "ddim",
        "dpmpp_2m",
        "dpmpp_2m_karras",
    ];
    if !SCHEDULERS.contains(&spec.scheduler.as_str()) {
        return Err(Error::invalid(
            "scheduler",
            format!(
                "{:?} is not one of euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras",
                spec.scheduler
            ),
        ));
    }
    Ok(())
}

impl JobsService {
    /// Accepts a job for `client` ("" with authentication off) and answers
    /// once it is durable.
    pub async fn submit_inner(
        &self,
        client: &str,
        req: pb::SubmitJobRequest,
    ) -> Result<pb::SubmitJobResponse> {
        // Checked against the limits and the catalogue by `submit`.
        let spec = convert::required_spec(req.spec)?;
        let (v, deduplicated) = self.0.submit(client, spec).await?;
        Ok(pb::SubmitJobResponse {
            job: Some(convert::job_to_pb(&v.record, None, v.estimated_start_s)),
            deduplicated,
        })
    }

    /// Refuses (as not found) a job `caller` may not see.
    async fn check_owner(&self, caller: &Caller, id: &JobId) -> Result<()> {
        let owner = self.0.owner(id).await?;
        caller.check_owner(id, Some(&owner))
    }

    pub async fn get_inner(&self, caller: &Caller, req: pb::GetJobRequest) -> Result<pb::Job> {
        let id = convert::job_id(req.job_id)?;
        self.check_owner(caller, &id).await?;
        let v = self.0.view(&id).await?;
        let images = match &v.record.output {
            Some(o) if req.include_images && v.record.state == JobState::Completed => {
                Some(self.0.images(&id, o.image_count).await?)
            }
            _ => None,
        };
        Ok(convert::job_to_pb(
            &v.record,
            images.as_ref(),
            v.estimated_start_s,
        ))
    }

    pub async fn list_inner(
        &self,
        caller: &Caller,
        req: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsResponse> {
        let state = convert::job_state_filter(req.state)?;
        let model = (!req.model_id.is_empty())
            .then(|| convert::model_id(req.model_id, "model_id"))
            .transpose()?;
        let limit = match req.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let owner = (!caller.sees_all()).then(|| caller.client_name());
        let (jobs, next) = self
            .0
            .list(state, model, owner, &req.page_token, limit)
            .await?;
        Ok(pb::ListJobsResponse {
            jobs: jobs
                .iter()
                .map(|r| convert::job_to_pb(r, None, 0.0))
                .collect(),
            next_page_token: next,
        })
    }
}

fn is_terminal(e: &JobEvent) -> bool {
    matches!(
        e.kind,
        JobEventKind::Completed { .. } | JobEventKind::Failed { .. } | JobEventKind::Cancelled
    )
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.submit_inner(caller.client_name(), req.into_inner())
                .await?,
        ))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.get_inner(&caller, req.into_inner()).await?,
        ))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = Caller::of(&req)?;
        let id = convert::job_id(req.into_inner().job_id)?;
        self.check_owner(&caller, &id).await?;
        let w = self.0.watch(&id).await?;
        Ok(Response::new(watch_stream(self.0.clone(), id, w)))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = Caller::of(&req)?;
        let id = convert::job_id(req.into_inner().job_id)?;
        self.check_owner(&caller, &id).await?;
        let v = self.0.cancel(&id).await?;
        Ok(Response::new(convert::job_to_pb(&v.record, None, 0.0)))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.list_inner(&caller, req.into_inner()).await?,
        ))
    }
}

/// The snapshot first, then each event as it happens, ending after the
/// first terminal event. A watcher too slow to follow every step resumes
/// from the job as it is now.
fn watch_stream(coord: Arc<Coordinator>, id: JobId, w: Watch) -> EventStream {
    struct State {
        coord: Arc<Coordinator>,
        id: JobId,
        pending: Option<JobEvent>,
        rx: Option<tokio::sync::broadcast::Receiver<JobEvent>>,
        done: bool,
    }
    let state = State {
        coord,
        id,
        pending: Some(w.first),
        rx: w.rx,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let event = match st.pending.take() {
            Some(e) => e,
            None => {
                let rx = st.rx.as_mut()?;
                match rx.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                        // Lagged: resume from the job as it is now. Closed:
                        // the job finished between events, or the
                        // coordinator is reloading its state; either way
                        // the job as it is now says what happened.
                        let w = st.coord.watch(&st.id).await.ok()?;
                        st.rx = w.rx;
                        w.first
                    }
                }
            }
        };
        st.done = is_terminal(&event);
        Some((Ok(convert::event_to_pb(&event)), st))
    }))
}
