//! Model manifests: bundle paths are confined to the bundle directory.

use crate::error::{Error, Result};

/// Rejects absolute paths, `..`, empty components and backslashes.
pub fn validate_relative_path(p: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid("model.files.path", format!("{p:?} {why}")));
    if p.is_empty() {
        return bad("is empty");
    }
    if p.starts_with('/') || p.contains('\\') || p.contains('\0') {
        return bad("must be a relative path with '/' separators");
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("must not contain empty, '.' or '..' components");
    }
    Ok(())
}

/// Placeholder (replaced by the cache branch): local directories only.
pub async fn manifest_from_source(
    id: &crate::types::ModelId,
    source: &str,
) -> Result<crate::types::ModelManifest> {
    use sha2::{Digest, Sha256};
    let dir = std::path::PathBuf::from(source.trim_start_matches("file://"));
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
                let rel = p
                    .strip_prefix(&dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push(crate::types::ModelFile {
                    path: rel,
                    size_bytes: bytes.len() as u64,
                    sha256: hex::encode(Sha256::digest(&bytes)),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(crate::types::ModelManifest {
        id: id.clone(),
        kind: crate::types::ModelKind::Checkpoint,
        source: source.to_owned(),
        files,
    })
}
