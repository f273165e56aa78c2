//! Opening a store written by an earlier Corral.
//!
//! Corral 0.1 wrote its store with redb 2 (file format v2) and kept result
//! images as files under `data_dir/results/<job>/<n>.png`. Opening such a
//! store upgrades the file in place with redb 2.6's `Database::upgrade()`
//! (the format redb 3 and later read), builds the indexes this version
//! keeps, moves the images into the store, and removes the old files once
//! that is committed. Nothing is lost; a job whose images were already
//! missing ends failed saying so, as 0.1 did at restart.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};
use tracing::{info, warn};

use super::redb::{put_job, BY_CREATED, IMAGES, JOBS, META, SCHEMA};
use super::StoredJob;
use crate::error::{Error, Result};
use crate::types::JobState;

fn store_err(e: impl Into<redb::Error>) -> Error {
    Error::Unavailable(format!("store: {}", e.into()))
}

/// Opens (creating if absent) the file at `path`, upgrading a redb 2 file.
pub(super) fn open_or_upgrade(b: &redb::Builder, path: &Path) -> Result<Database> {
    match b.create(path) {
        Err(redb::DatabaseError::UpgradeRequired(v)) => {
            info!(path = %path.display(), file_format = v, "upgrading the store's file format");
            let mut old = redb2::Database::open(path).map_err(|e| {
                Error::Unavailable(format!("store: opening {} to upgrade: {e}", path.display()))
            })?;
            old.upgrade().map_err(|e| {
                Error::Unavailable(format!("store: upgrading {}: {e}", path.display()))
            })?;
            drop(old);
            b.create(path).map_err(store_err)
        }
        other => other.map_err(store_err),
    }
}

/// Marks a new store as having the current layout.
pub(super) fn mark_current(db: &Database) -> Result<()> {
    let w = db.begin_write().map_err(store_err)?;
    w.open_table(META)
        .map_err(store_err)?
        .insert("schema", SCHEMA)
        .map_err(store_err)?;
    w.commit().map_err(store_err)
}

/// Brings the tables to the current layout (see the module docs).
pub(super) fn migrate(db: &Database, data_dir: &Path) -> Result<()> {
    let (schema, jobs) = {
        let r = db.begin_read().map_err(store_err)?;
        let schema = r
            .open_table(META)
            .map_err(store_err)?
            .get("schema")
            .map_err(store_err)?
            .map(|v| v.value().to_owned());
        let mut jobs = Vec::new();
        if schema.is_none() {
            for item in r
                .open_table(JOBS)
                .map_err(store_err)?
                .iter()
                .map_err(store_err)?
            {
                let (k, v) = item.map_err(store_err)?;
                let job: StoredJob = serde_json::from_slice(v.value()).map_err(|e| {
                    Error::Internal(format!("stored job {} does not decode: {e}", k.value()))
                })?;
                jobs.push(job);
            }
        }
        (schema, jobs)
    };
    match schema.as_deref() {
        Some(SCHEMA) => return Ok(()),
        Some(other) => {
            return Err(Error::Config(format!(
                "the store in {} has layout {other}, newer than this corral understands ({SCHEMA})",
                data_dir.display()
            )))
        }
        None => {}
    }
    let results = data_dir.join("results");
    let w = db.begin_write().map_err(store_err)?;
    let (mut moved, mut lost) = (0usize, 0usize);
    for mut job in jobs {
        if let (JobState::Completed, Some(r)) = (job.state, &job.result) {
            let dir = results.join(&job.id.0);
            let images: std::io::Result<Vec<Vec<u8>>> = (0..r.images)
                .map(|i| std::fs::read(dir.join(format!("{i}.png"))))
                .collect();
            match images {
                Ok(images) => {
                    let mut t = w.open_table(IMAGES).map_err(store_err)?;
                    for (i, png) in images.iter().enumerate() {
                        t.insert((job.id.0.as_str(), i as u32), png.as_slice())
                            .map_err(store_err)?;
                    }
                    moved += 1;
                }
                Err(e) => {
                    warn!(job_id = %job.id, error = %e, "result images are missing");
                    job.state = JobState::Failed;
                    job.error = format!("result images were lost: {e}");
                    job.result = None;
                    lost += 1;
                }
            }
        }
        put_job(&w, &job).map_err(store_err)?;
    }
    // The index exists now even for an empty store.
    w.open_table(BY_CREATED).map_err(store_err)?;
    w.open_table(META)
        .map_err(store_err)?
        .insert("schema", SCHEMA)
        .map_err(store_err)?;
    w.commit().map_err(store_err)?;
    if results.exists() {
        if let Err(e) = std::fs::remove_dir_all(&results) {
            warn!(dir = %results.display(), error = %e, "could not remove the old results directory");
        }
    }
    if moved + lost > 0 {
        info!(moved, lost, "store migrated to layout {SCHEMA}");
    }
    Ok(())
}
