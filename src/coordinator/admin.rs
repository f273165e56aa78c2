//! The `Admin` service: the catalogue and the view of the fleet.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Coordinator;
use crate::convert;
use crate::error::{Error, Result};
use crate::pb;

pub struct AdminService(pub Arc<Coordinator>);

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
