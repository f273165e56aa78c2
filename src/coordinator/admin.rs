//! The `Admin` service: the catalogue and the view of the fleet.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Coordinator;
use crate::convert;
use crate::error::{Error, Result};
use crate::pb;

pub struct AdminService(pub Arc<Coordinator>);

/// Fills a bundle's family and format from its files (a LoRA's header, a
/// checkpoint's unet/config.json); a value the client gave must agree.
/// When the files cannot be read from here, the client's values stand, but a
/// LoRA must then come with its family.
async fn with_traits(mut m: crate::types::ModelManifest) -> Result<crate::types::ModelManifest> {
    use crate::types::ModelKind;
    match crate::manifest::read_traits(&m).await {
        Ok((family, format)) => {
            for (field, given, read) in [
                ("model.family", &m.family, &family),
                ("model.format", &m.format, &format),
            ] {
                if !given.is_empty() && !read.is_empty() && given != read {
                    return Err(Error::invalid(
                        field,
                        format!("{given:?} was given, but the files say {read:?}"),
                    ));
                }
            }
            if !family.is_empty() {
                m.family = family;
            }
            if !format.is_empty() {
                m.format = format;
            }
        }
        Err(e) if m.kind == ModelKind::Lora && m.family.is_empty() => {
            return Err(Error::invalid(
                "model",
                format!(
                    "the LoRA's header could not be read from its source ({e}); \
                     give model.family and model.format"
                ),
            ))
        }
        Err(e) => {
            tracing::warn!(model_id = %m.id, error = %e, "could not read the bundle's family")
        }
    }
    if m.kind == ModelKind::Upscaler
        && !m.format.is_empty()
        && !["x2", "x4"].contains(&m.format.as_str())
    {
        return Err(Error::invalid(
            "model.format",
            format!("{:?} is not x2 or x4", m.format),
        ));
    }
    Ok(m)
}

impl AdminService {
    pub fn warm_inner(&self, req: pb::WarmModelRequest) -> Result<pb::WarmModelResponse> {
        let model = convert::model_id(req.model_id, "model_id")?;
        if req.replicas == 0 {
            return Err(Error::invalid("replicas", "must be at least 1"));
        }
        let (told, holders) = self.0.warm(&model, req.replicas)?;
        Ok(pb::WarmModelResponse {
            worker_ids: told.into_iter().map(|w| w.0).collect(),
            holders: holders.into_iter().map(|w| w.0).collect(),
        })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn register_model(
        &self,
        req: Request<pb::RegisterModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let m = convert::required_model(req.into_inner().model)?;
        crate::manifest::validate_manifest(&m)?;
        let cfg = self.0.config();
        crate::source::Source::parse(&m.source)?.check_local_policy(
            cfg.local_source_root.as_deref(),
            cfg.local_sources_anywhere(),
        )?;
        let m = with_traits(m).await?;
        let m = self.0.register_model(m).await?;
        Ok(Response::new(m.into()))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: self.0.models().into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_model(
        &self,
        req: Request<pb::RemoveModelRequest>,
    ) -> Result<Response<pb::RemoveModelResponse>, Status> {
        let id = convert::model_id(req.into_inner().model_id, "model_id")?;
        self.0.remove_model(&id).await?;
        Ok(Response::new(pb::RemoveModelResponse {}))
    }

    async fn warm_model(
        &self,
        req: Request<pb::WarmModelRequest>,
    ) -> Result<Response<pb::WarmModelResponse>, Status> {
        Ok(Response::new(self.warm_inner(req.into_inner())?))
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let snap = self.0.snapshot();
        Ok(Response::new(pb::ListWorkersResponse {
            workers: snap
                .workers
                .iter()
                .map(|w| convert::worker_to_pb(w, snap.at_ms))
                .collect(),
        }))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let snap = self.0.snapshot();
        let models: Vec<pb::ModelStatus> = snap
            .models
            .iter()
            .map(convert::model_summary_to_pb)
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            workers: snap.workers.len() as u32,
            queued_jobs: models.iter().map(|m| m.queued_jobs).sum(),
            running_jobs: models.iter().map(|m| m.running_jobs).sum(),
            models,
        }))
    }
}
