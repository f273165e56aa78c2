//! Placeholder VRAM residency (replaced by the cache branch).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::cache::BundleGuard;
use crate::error::Result;
use crate::types::ModelId;

pub struct Residency<T> {
    inner: Mutex<BTreeMap<ModelId, (Arc<T>, BundleGuard)>>,
}

impl<T> Residency<T> {
    pub fn new(_budget_bytes: u64, _max_count: usize) -> Self {
        Self {
            inner: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get_or_load(
        &self,
        guard: BundleGuard,
        load: impl FnOnce(&BundleGuard) -> Result<(T, u64)>,
    ) -> Result<(Arc<T>, bool)> {
        let mut m = self.inner.lock().unwrap();
        if let Some((t, _)) = m.get(guard.model_id()) {
            return Ok((t.clone(), true));
        }
        let (t, _) = load(&guard)?;
        let t = Arc::new(t);
        m.insert(guard.model_id().clone(), (t.clone(), guard));
        Ok((t, false))
    }

    pub fn resident(&self) -> Vec<ModelId> {
        self.inner.lock().unwrap().keys().cloned().collect()
    }
}
