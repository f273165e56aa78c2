//! Building a model's manifest (its files, sizes and SHA-256 digests) from its source.
//!
//! A source is a local directory (plain path or `file://`), an `http(s)://` prefix, or an
//! object-store URL (`s3://`, `gs://`, `az://`, mapped to HTTPS by `crate::source::Source`).
//! A directory published over HTTP carries a `corral-manifest.json` (a JSON list of
//! [`ModelFile`]) written by [`write_manifest_file`]; a local directory without one is walked
//! and hashed. Every path in a manifest is checked by [`validate_relative_path`], because
//! bundle paths become file names under the cache directory.
//!
//! This module owns no state and never writes anywhere except in [`write_manifest_file`].

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::source::Source;
use crate::types::{ModelFile, ModelId, ModelKind, ModelManifest};

/// The file a published bundle directory carries: a JSON list of its files.
pub const MANIFEST_FILE: &str = "corral-manifest.json";

/// Read buffer for hashing local files.
const HASH_CHUNK_BYTES: usize = 1 << 20;

/// Checks that `p` is a relative path that stays inside its bundle: no leading `/`, no
/// `..` or `.` or empty components, no backslashes, no NUL, no Windows drive prefix.
pub fn validate_relative_path(p: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid("files.path", format!("{p:?}: {why}")));
    if p.is_empty() {
        return bad("empty path");
    }
    if p.starts_with('/') {
        return bad("absolute path");
    }
    if p.contains('\\') {
        return bad("backslash in path");
    }
    if p.contains('\0') {
        return bad("NUL in path");
    }
    if p.len() >= 2 && p.as_bytes()[1] == b':' {
        return bad("drive prefix in path");
    }
    for c in p.split('/') {
        match c {
            "" => return bad("empty path component"),
            "." | ".." => return bad("relative component"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a whole manifest: valid, unique paths and 64-hex-digit digests.
pub fn validate_manifest(m: &ModelManifest) -> Result<()> {
    if m.id.as_str().is_empty() {
        return Err(Error::invalid("model_id", "empty"));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        validate_relative_path(&f.path)?;
        if !seen.insert(f.path.as_str()) {
            return Err(Error::invalid(
                "files.path",
                format!("{:?} listed twice in {}", f.path, m.id),
            ));
        }
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "files.sha256",
                format!("{:?} in {}: not 64 hex digits", f.path, m.id),
            ));
        }
    }
    // A file that is also a directory prefix of another would clash on disk.
    for f in &m.files {
        let prefix = format!("{}/", f.path);
        if m.files.iter().any(|g| g.path.starts_with(&prefix)) {
            return Err(Error::invalid(
                "files.path",
                format!("{:?} in {} is both a file and a directory", f.path, m.id),
            ));
        }
    }
    Ok(())
}

/// Hashes one file: (size, lowercase hex SHA-256). Blocking: call from `spawn_blocking`.
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
/// with `/`, sorted. Blocking: call from `spawn_blocking`.
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
/// Blocking.
pub fn write_manifest_file(dir: &Path) -> Result<Vec<ModelFile>> {
    let files = scan_dir(dir)?;
    let json = serde_json::to_vec_pretty(&files)
        .map_err(|e| Error::Internal(format!("serialising manifest: {e}")))?;
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    let dst = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    Ok(files)
}

fn parse_file_list(bytes: &[u8], origin: &str) -> Result<Vec<ModelFile>> {
    let mut files: Vec<ModelFile> = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid("manifest", format!("{origin}: {e}")))?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Builds the manifest of model `id` from `source` (see the module docs). Local directories
/// are hashed on the blocking pool; remote sources must publish `corral-manifest.json`.
pub async fn manifest_from_source(id: &ModelId, source: &str) -> Result<ModelManifest> {
    let src = Source::parse(source)?;
    let files = match src {
        Source::Local(dir) => local_files(dir).await?,
        Source::Http { .. } => {
            let url = src.locate(MANIFEST_FILE);
            let client = crate::source::http_client()?;
            let resp = client
                .get(&url)
                .send()
                .await
                .map_err(|e| Error::Unavailable(format!("GET {url}: {e}")))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(crate::source::status_error(&url, status));
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| Error::Unavailable(format!("GET {url}: {e}")))?;
            parse_file_list(&body, &url)?
        }
    };
    let m = ModelManifest {
        id: id.clone(),
        kind: ModelKind::default(),
        source: source.to_owned(),
        files,
    };
    validate_manifest(&m)?;
    Ok(m)
}

async fn local_files(dir: PathBuf) -> Result<Vec<ModelFile>> {
    tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?;
        if !meta.is_dir() {
            return Err(Error::invalid(
                "source",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let mf = dir.join(MANIFEST_FILE);
        match std::fs::read(&mf) {
            Ok(bytes) => parse_file_list(&bytes, &mf.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => scan_dir(&dir),
            Err(e) => Err(Error::io(&mf, e)),
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("manifest task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for ok in ["a", "unet/model.onnx", "a.b/c_d-e", "x/.hidden"] {
            assert!(validate_relative_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "C:x",
            "a/.",
        ] {
            assert!(validate_relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn local_dir_manifest_is_sorted_and_hashed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("unet")).unwrap();
        std::fs::write(d.path().join("unet/model.onnx"), b"abc").unwrap();
        std::fs::write(d.path().join("a.json"), b"{}").unwrap();
        std::fs::write(d.path().join(".hidden"), b"x").unwrap();
        std::fs::write(d.path().join("partial.tmp"), b"x").unwrap();
        let src = format!("file://{}", d.path().display());
        let m = manifest_from_source(&ModelId::from("m"), &src)
            .await
            .unwrap();
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.json", "unet/model.onnx"]);
        assert_eq!(m.files[1].size_bytes, 3);
        assert_eq!(
            m.files[1].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // A published manifest wins over walking.
        write_manifest_file(d.path()).unwrap();
        std::fs::write(d.path().join("late.bin"), b"zz").unwrap();
        let m2 = manifest_from_source(&ModelId::from("m"), d.path().to_str().unwrap())
            .await
            .unwrap();
        assert_eq!(m2.files, m.files);
    }

    #[test]
    fn manifest_validation_rejects_escapes_and_bad_digests() {
        let f = |p: &str, h: &str| ModelFile {
            path: p.into(),
            size_bytes: 1,
            sha256: h.into(),
        };
        let good = "0".repeat(64);
        let mk = |files| ModelManifest {
            id: "m".into(),
            kind: ModelKind::Checkpoint,
            source: String::new(),
            files,
        };
        assert!(validate_manifest(&mk(vec![f("a", &good)])).is_ok());
        assert!(validate_manifest(&mk(vec![f("../a", &good)])).is_err());
        assert!(validate_manifest(&mk(vec![f("a", "xyz")])).is_err());
        assert!(validate_manifest(&mk(vec![f("a", &good), f("a", &good)])).is_err());
        assert!(validate_manifest(&mk(vec![f("a", &good), f("a/b", &good)])).is_err());
    }
}
