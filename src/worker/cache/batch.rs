//! Several bundles for one job (a checkpoint, its LoRAs, a VAE, an upscaler), ensured
//! together: all pinned, or none.
//!
//! Pins are atomic counters, not locks, so holding several cannot deadlock; what can go wrong
//! is a job's own downloads evicting each other's bundles, or two jobs each holding half of
//! what they need. So: the set is checked against the budget before anything moves; bundles
//! already present are pinned first, in one hold of the lock and in model id order; then the
//! missing ones are ensured concurrently (each download reserves its bytes, and waits only
//! for downloads in flight, which always finish). A set that does not fit beside what other
//! jobs pin fails with `ResourceExhausted` naming the pins, and releases what it took.
//!
//! This module only composes `download::ensure` and the index's pins; it owns no state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::try_join_all;

use super::budget::BundleGuard;
use super::download::same_files;
use super::DiskCache;
use crate::error::{Error, Result};
use crate::manifest::validate_manifest;
use crate::types::{CacheTier, ModelId, ModelManifest};

/// Most bundles one call may ask for (a checkpoint, 8 LoRAs, a VAE, an upscaler, and room).
pub const MAX_BUNDLES_PER_JOB: usize = 16;

impl DiskCache {
    /// Makes every bundle in `manifests` present and returns them pinned, in the order given
    /// (a model listed twice gets two pins on one bundle). `progress(done, total)` counts the
    /// bytes of the whole set. On any failure nothing stays pinned by this call.
    pub async fn ensure_all(
        &self,
        manifests: &[ModelManifest],
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Vec<(BundleGuard, CacheTier)>> {
        if manifests.is_empty() {
            return Ok(Vec::new());
        }
        if manifests.len() > MAX_BUNDLES_PER_JOB {
            return Err(Error::invalid(
                "models",
                format!(
                    "{} bundles asked for at once; at most {MAX_BUNDLES_PER_JOB}",
                    manifests.len()
                ),
            ));
        }
        // One entry per model, in id order: the order pins are taken in.
        let mut unique: Vec<&ModelManifest> = Vec::with_capacity(manifests.len());
        for m in manifests {
            validate_manifest(m)?;
            match unique.iter().find(|u| u.id == m.id) {
                Some(u) if !same_files(u, m) => {
                    return Err(Error::invalid(
                        "models",
                        format!("model {} listed twice with different files", m.id),
                    ))
                }
                Some(_) => {}
                None => unique.push(m),
            }
        }
        unique.sort_by(|a, b| a.id.cmp(&b.id));
        self.check_set_fits(&unique)?;

        // Present bundles are pinned before any download of this set can evict them.
        let held: Vec<BundleGuard> = {
            let st = self.lock();
            unique
                .iter()
                .filter_map(|m| {
                    let e = st.entries.get(&m.id)?;
                    same_files(&e.manifest, m).then(|| e.guard(&m.id))
                })
                .collect()
        };

        let total: u64 = unique.iter().map(|m| m.total_bytes()).sum();
        let done: Vec<AtomicU64> = unique.iter().map(|_| AtomicU64::new(0)).collect();
        let report = || progress(done.iter().map(|d| d.load(Ordering::Relaxed)).sum(), total);
        let got = try_join_all(unique.iter().enumerate().map(|(i, m)| {
            let (done, report) = (&done, &report);
            async move {
                let each = |d: u64, _total: u64| {
                    done[i].store(d, Ordering::Relaxed);
                    report();
                };
                let r = self.ensure(m, &each).await?;
                done[i].store(m.total_bytes(), Ordering::Relaxed);
                report();
                Ok::<_, Error>(r)
            }
        }))
        .await?;
        drop(held);

        let by_id: HashMap<&ModelId, &(BundleGuard, CacheTier)> =
            got.iter().map(|r| (r.0.model_id(), r)).collect();
        Ok(manifests
            .iter()
            .map(|m| {
                let (g, tier) = by_id[&m.id];
                (g.pin(), *tier)
            })
            .collect())
    }

    /// Refuses a set that cannot fit in the budget even with everything else evicted.
    fn check_set_fits(&self, set: &[&ModelManifest]) -> Result<()> {
        let max = self.0.cfg.max_bytes;
        let cached: Vec<&&ModelManifest> = set
            .iter()
            .filter(|m| {
                !self
                    .0
                    .preloaded
                    .get(&m.id)
                    .is_some_and(|p| same_files(&p.manifest, m))
            })
            .collect();
        let need = cached
            .iter()
            .try_fold(0u64, |acc, m| acc.checked_add(m.total_bytes()));
        match need {
            Some(n) if n <= max => Ok(()),
            _ => {
                let list: Vec<String> = cached
                    .iter()
                    .map(|m| format!("{} ({} bytes)", m.id, m.total_bytes()))
                    .collect();
                Err(Error::ResourceExhausted(format!(
                    "bundles [{}] together exceed the cache budget of {max} bytes",
                    list.join(", ")
                )))
            }
        }
    }
}
