//! The cache directory on disk: names, markers, and the start-up scan.
//!
//! ```text
//! .corral-cache                 this directory belongs to Corral (everything else is swept)
//! <name>/                       one bundle per model; <name> is the model id, escaped
//!   .corral-bundle.json         the marker: manifest + `verified`; written last
//!   unet/model.onnx ...         the manifest's files
//! .tmp-<name>/                  a download in progress (swept at start-up)
//! .tomb-<name>-<n>/             an evicted bundle being deleted (swept at start-up)
//! ```
//!
//! This module owns the names and what a valid bundle directory is; it reads the preloaded
//! directory and never writes to it. It keeps no state: the index and the budget are
//! `budget`'s, and only `download` creates bundle directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::{hash_file, validate_manifest, MANIFEST_FILE};
use crate::types::{ModelId, ModelManifest};

/// Marks a directory as a Corral cache; `open` refuses a non-empty directory without it.
pub const CACHE_MARKER: &str = ".corral-cache";
/// Inside a bundle: its manifest and whether its files were verified; written last.
pub const BUNDLE_MARKER: &str = ".corral-bundle.json";
pub(super) const TMP_PREFIX: &str = ".tmp-";
pub(super) const TOMB_PREFIX: &str = ".tomb-";

/// What a bundle directory's marker says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct BundleMarker {
    pub(super) manifest: ModelManifest,
    /// Every file's size and digest were checked when the bundle was written.
    pub(super) verified: bool,
}

/// A bundle of the read-only preloaded directory.
pub(super) struct Preloaded {
    pub(super) dir: PathBuf,
    pub(super) manifest: Arc<ModelManifest>,
    pub(super) bytes: u64,
}

/// The directory name of a model: the id with everything but `[A-Za-z0-9_-]` escaped as
/// `%XX`, so it never starts with `.` and never contains `/`.
pub fn bundle_dir_name(id: &ModelId) -> String {
    let mut out = String::new();
    for b in id.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) fn unescape_dir_name(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(super) fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

pub(super) fn remove_any(p: &Path) {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = r {
        tracing::warn!(path = %p.display(), error = %e, "could not delete");
    }
}

pub(super) fn touch(p: &Path) {
    let r = std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(e) = r {
        tracing::debug!(path = %p.display(), error = %e, "could not touch marker");
    }
}

/// Checks a bundle directory against its manifest: sizes always, digests when asked.
pub(super) fn check_bundle(dir: &Path, m: &ModelManifest, hash: bool) -> Result<()> {
    for f in &m.files {
        let p = dir.join(&f.path);
        let meta = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
        if !meta.is_file() || meta.len() != f.size_bytes {
            return Err(Error::Checksum {
                path: f.path.clone(),
                expected: format!("{} bytes", f.size_bytes),
                actual: format!("{} bytes", meta.len()),
            });
        }
        if hash {
            let (_, digest) = hash_file(&p)?;
            if !digest.eq_ignore_ascii_case(&f.sha256) {
                return Err(Error::Checksum {
                    path: f.path.clone(),
                    expected: f.sha256.clone(),
                    actual: digest,
                });
            }
        }
    }
    Ok(())
}

pub(super) fn read_marker(dir: &Path) -> Result<BundleMarker> {
    let p = dir.join(BUNDLE_MARKER);
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::invalid("bundle marker", e.to_string()))
}

/// A valid bundle found by the start-up scan.
pub(super) struct Found {
    pub(super) dir: PathBuf,
    pub(super) manifest: ModelManifest,
    /// The marker's mtime, touched on every hit: the LRU order across restarts.
    pub(super) mtime: std::time::SystemTime,
}

/// Start-up scan of the cache directory: sweeps leftovers and returns the valid bundles.
/// Blocking.
pub(super) fn scan_cache_dir(dir: &Path) -> Result<Vec<Found>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let marker = dir.join(CACHE_MARKER);
    let names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    if !marker.exists() {
        if !names.is_empty() {
            return Err(Error::Config(format!(
                "cache dir {} is not empty and has no {CACHE_MARKER}: refusing to sweep it",
                dir.display()
            )));
        }
        std::fs::write(&marker, b"corral disk cache\n").map_err(|e| Error::io(&marker, e))?;
    }
    let mut out = Vec::new();
    for ent in names {
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == CACHE_MARKER {
            continue;
        }
        if name.starts_with(TMP_PREFIX) || name.starts_with(TOMB_PREFIX) {
            remove_any(&path);
            continue;
        }
        let valid = read_marker(&path).and_then(|mk| {
            validate_manifest(&mk.manifest)?;
            if bundle_dir_name(&mk.manifest.id) != name {
                return Err(Error::invalid("bundle marker", "id does not match dir"));
            }
            check_bundle(&path, &mk.manifest, !mk.verified)?;
            Ok(mk)
        });
        match valid {
            Ok(mk) => {
                let mtime = std::fs::metadata(path.join(BUNDLE_MARKER))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                out.push(Found {
                    dir: path,
                    manifest: mk.manifest,
                    mtime,
                });
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "deleting invalid cache entry");
                remove_any(&path);
            }
        }
    }
    fsync_dir(dir)?;
    Ok(out)
}

/// Start-up scan of the read-only preloaded directory: one bundle per subdirectory, described
/// by its marker, else its `corral-manifest.json`, else by hashing its files. Sizes are
/// always checked; a bad bundle is skipped (and logged), never deleted. Blocking.
pub(super) fn scan_preloaded_dir(dir: &Path) -> Result<HashMap<ModelId, Preloaded>> {
    let mut out = HashMap::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %dir.display(), "no preloaded directory");
            return Ok(out);
        }
        Err(e) => return Err(Error::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        let found = (|| -> Result<ModelManifest> {
            let m = match read_marker(&path) {
                Ok(mk) => mk.manifest,
                Err(_) => {
                    let id = unescape_dir_name(&name)
                        .ok_or_else(|| Error::invalid("preloaded dir", name.clone()))?;
                    let mf = path.join(MANIFEST_FILE);
                    let files = match std::fs::read(&mf) {
                        Ok(b) => crate::manifest::parse_file_list(&b, &mf.display().to_string())?,
                        Err(_) => crate::manifest::scan_dir(&path)?,
                    };
                    ModelManifest {
                        family: String::new(),
                        format: String::new(),
                        id: ModelId(id),
                        kind: Default::default(),
                        source: format!("file://{}", path.display()),
                        files,
                    }
                }
            };
            validate_manifest(&m)?;
            check_bundle(&path, &m, false)?;
            Ok(m)
        })();
        match found {
            Ok(m) => {
                out.insert(
                    m.id.clone(),
                    Preloaded {
                        dir: path,
                        bytes: m.total_bytes(),
                        manifest: Arc::new(m),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping preloaded bundle")
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_escape_and_round_trip() {
        for id in [
            "sd15",
            "runwayml/stable-diffusion-v1-5",
            ".hidden",
            "a b%c",
            "é",
        ] {
            let n = bundle_dir_name(&ModelId::from(id));
            assert!(!n.starts_with('.') && !n.contains('/'), "{n}");
            assert_eq!(unescape_dir_name(&n).as_deref(), Some(id));
        }
    }
}
