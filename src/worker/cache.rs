//! Placeholder disk cache (replaced by the real one from the cache branch).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::types::{CacheTier, DiskModel, DownloadState, ModelId, ModelManifest};

pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub preloaded_dir: Option<PathBuf>,
    pub max_concurrent_downloads: usize,
}

#[derive(Clone)]
pub struct DiskCache(Arc<CacheConfig>);

pub struct BundleGuard {
    path: PathBuf,
    model: ModelId,
}

impl BundleGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn model_id(&self) -> &ModelId {
        &self.model
    }
}

#[derive(Default)]
pub struct CacheSnapshot {
    pub disk_models: Vec<DiskModel>,
    pub downloads: Vec<DownloadState>,
    pub free_bytes: u64,
    pub download_bps: u64,
}

impl DiskCache {
    pub async fn open(cfg: CacheConfig) -> Result<DiskCache> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| Error::io(&cfg.dir, e))?;
        Ok(Self(Arc::new(cfg)))
    }

    pub async fn ensure(
        &self,
        manifest: &ModelManifest,
        _progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(BundleGuard, CacheTier)> {
        let src = manifest.source.trim_start_matches("file://");
        Ok((
            BundleGuard {
                path: PathBuf::from(src),
                model: manifest.id.clone(),
            },
            CacheTier::Disk,
        ))
    }

    pub fn prefetch(&self, _m: ModelManifest) -> tokio::task::JoinHandle<Result<()>> {
        tokio::spawn(async { Ok(()) })
    }

    pub fn report(&self) -> CacheSnapshot {
        CacheSnapshot {
            free_bytes: self.0.max_bytes,
            ..Default::default()
        }
    }
}
