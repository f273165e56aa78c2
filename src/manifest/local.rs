//! Manifests of local directories: hashing, walking, and writing `corral-manifest.json` so a
//! directory can be published ([`publish_dir`]).
//!
//! Everything here is blocking: call it from `spawn_blocking` (or a CLI's main thread). The
//! only thing written is the manifest file, through a temporary file and a rename.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{validate_relative_path, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::types::ModelFile;

/// Read buffer for hashing local files.
const HASH_CHUNK_BYTES: usize = 1 << 20;

/// Hashes one file: (size, lowercase hex SHA-256).
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK_BYTES];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((n_total, hex::encode(h.finalize())))
}

/// Walks `dir` and hashes every regular file, skipping hidden names (`.*`, which covers
/// `.tmp-*` and markers), `*.tmp` and the manifest file itself. Paths are relative, joined
/// with `/`, sorted.
pub fn scan_dir(dir: &Path) -> Result<Vec<ModelFile>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&abs).map_err(|e| Error::io(&abs, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(&abs, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::invalid(
                    "files.path",
                    format!("non-UTF-8 file name in {}", abs.display()),
                ));
            };
            if name.starts_with('.') || name.ends_with(".tmp") {
                continue;
            }
            if rel.is_empty() && name == MANIFEST_FILE {
                continue;
            }
            let child_rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            let ft = ent.file_type().map_err(|e| Error::io(ent.path(), e))?;
            if ft.is_dir() {
                stack.push((ent.path(), child_rel));
            } else if ft.is_file() || ft.is_symlink() {
                let path = ent.path();
                if !path.is_file() {
                    continue; // a dangling or directory symlink
                }
                validate_relative_path(&child_rel)?;
                let (size_bytes, sha256) = hash_file(&path)?;
                out.push(ModelFile {
                    path: child_rel,
                    size_bytes,
                    sha256,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Walks and hashes `dir` and writes `dir/corral-manifest.json`, so the directory can be
/// published over HTTP (any static file server) or an object store. Returns the files.
pub fn write_manifest_file(dir: &Path) -> Result<Vec<ModelFile>> {
    let files = scan_dir(dir)?;
    write_list(dir, &files)?;
    Ok(files)
}

/// Writes `files` as `dir/corral-manifest.json`, atomically.
fn write_list(dir: &Path, files: &[ModelFile]) -> Result<()> {
    let json = serde_json::to_vec_pretty(files)
        .map_err(|e| Error::Internal(format!("serialising manifest: {e}")))?;
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    let dst = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))
}

/// What [`publish_dir`] wrote, and what to upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// The bundle directory.
    pub dir: PathBuf,
    /// `dir/corral-manifest.json`, just written.
    pub manifest_path: PathBuf,
    /// The bundle's files, sorted by path (the manifest's content).
    pub files: Vec<ModelFile>,
    pub total_bytes: u64,
}

impl Publication {
    /// Every path to upload, relative to `dir`: the files, then the manifest.
    pub fn upload_list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.files.iter().map(|f| f.path.clone()).collect();
        v.push(MANIFEST_FILE.to_owned());
        v
    }

    /// What to tell a person: the files, and how to upload and register the bundle. Keeps
    /// `BUCKET/PREFIX`, `ACCOUNT/CONTAINER` and `MODEL_ID` as placeholders.
    pub fn instructions(&self) -> String {
        let d = self.dir.display();
        let mut s = format!(
            "wrote {}: {} files, {} bytes\n\n\
             Upload these paths under one prefix, keeping their relative paths (the last one, \
             {MANIFEST_FILE}, is what `corral models add` reads):\n",
            self.manifest_path.display(),
            self.files.len(),
            self.total_bytes,
        );
        for f in &self.files {
            s.push_str(&format!("  {:<48} {:>14} bytes\n", f.path, f.size_bytes));
        }
        s.push_str(&format!("  {MANIFEST_FILE}\n\n"));
        s.push_str(&format!(
            "Workers fetch only the listed paths, so uploading the whole directory is fine:\n  \
             aws s3 sync {d} s3://BUCKET/PREFIX\n  \
             gcloud storage rsync --recursive {d} gs://BUCKET/PREFIX\n  \
             azcopy sync {d} 'https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX?<SAS>'\n  \
             or serve {d} with any static HTTP server.\n\n\
             Then register it (workers read s3://, gs:// and az:// with their own credentials; \
             an https:// source may carry a pre-signed query):\n  \
             corral models add MODEL_ID --source s3://BUCKET/PREFIX\n  \
             corral models add MODEL_ID --source gs://BUCKET/PREFIX\n  \
             corral models add MODEL_ID --source az://ACCOUNT/CONTAINER/PREFIX\n  \
             corral models add MODEL_ID --source https://HOST/PREFIX\n"
        ));
        s
    }
}

/// Prepares `dir` for publishing: hashes every file, checks the result as a manifest would be
/// checked at registration, writes `dir/corral-manifest.json`, and says what to upload
/// ([`Publication::instructions`]). Run it again after changing a file. Blocking.
pub fn publish_dir(dir: &Path) -> Result<Publication> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(
            "dir",
            format!("{} is not a directory", dir.display()),
        ));
    }
    let abs = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let files = scan_dir(&abs)?;
    // The same checks as registration (caps, duplicates, sizes), before anything is written.
    super::validate_manifest(&crate::types::ModelManifest {
        family: String::new(),
        format: String::new(),
        id: crate::types::ModelId("publish".into()),
        kind: Default::default(),
        source: format!("file://{}", abs.display()),
        files: files.clone(),
    })?;
    write_list(&abs, &files)?;
    Ok(Publication {
        manifest_path: abs.join(MANIFEST_FILE),
        dir: abs,
        total_bytes: files.iter().map(|f| f.size_bytes).sum(),
        files,
    })
}
