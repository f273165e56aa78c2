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
