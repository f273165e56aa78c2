//! The model catalogue: registering, removing, listing, warming models.
//! A registration is committed before jobs can name the model.

use std::sync::Arc;

use tracing::info;

use super::store::Op;
use super::Coordinator;
use crate::error::{Error, Result};
use crate::scheduler::Effect;
use crate::types::*;

impl Coordinator {
    /// Registers (or replaces) a catalogue entry once it is durable.
    pub async fn register_model(&self, m: ModelManifest) -> Result<ModelManifest> {
        self.check_serving()?;
        self.store
            .commit(vec![Op::PutModel(Box::new(m.clone()))])
            .await?;
        let bytes = m.total_bytes();
        self.with_sched(|s, _| {
            s.register_model(m.id.clone(), bytes);
            self.models.insert(m.id.clone(), Arc::new(m.clone()));
            Ok(((), Vec::new()))
        })?;
        info!(model_id = %m.id, bytes, files = m.files.len(), "model registered");
        Ok(m)
    }

    /// Removes a model no unfinished job needs; answers once durable.
    pub async fn remove_model(&self, id: &ModelId) -> Result<()> {
        if self.records.uses_extra(id) {
            return Err(Error::FailedPrecondition(format!(
                "model {id} is named by unfinished jobs; cancel them first"
            )));
        }
        self.with_sched(|s, _| {
            s.remove_model(id)?;
            self.models.remove(id);
            Ok(((), Vec::new()))
        })?;
        self.store.commit(vec![Op::DeleteModel(id.clone())]).await?;
        info!(model_id = %id, "model removed");
        Ok(())
    }

    pub fn models(&self) -> Vec<ModelManifest> {
        let mut v: Vec<ModelManifest> = self.models.iter().map(|m| (**m).clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn model(&self, id: &ModelId) -> Option<Arc<ModelManifest>> {
        self.models.get(id).map(|m| m.clone())
    }

    pub fn has_model(&self, id: &ModelId) -> bool {
        self.models.contains_key(id)
    }

    /// Operator request: have `replicas` workers hold `model` on disk.
    /// Returns the workers told to fetch it and those holding it already.
    pub fn warm(&self, model: &ModelId, replicas: u32) -> Result<(Vec<WorkerId>, Vec<WorkerId>)> {
        self.with_sched(|s, _| {
            let (effects, holders) = s.warm(model, replicas)?;
            let told = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Prefetch { worker, .. } => Some(worker.clone()),
                    _ => None,
                })
                .collect();
            Ok(((told, holders), effects))
        })
    }
}
