//! What a valid manifest is: safe relative paths, no two paths naming one file, 64-hex-digit
//! digests, sizes whose sum fits, and bounded counts and lengths (a manifest comes from a
//! client, an HTTP server or a disk, and the worker turns its paths into file names).
//!
//! Errors are `InvalidArgument` naming the field; the reason starts with the entry
//! (`files[3] "a/B"`), since field names are static.

use std::collections::{HashMap, HashSet};

use icu_normalizer::ComposingNormalizerBorrowed;

use crate::error::{Error, Result};
use crate::source::Source;
use crate::types::ModelManifest;

/// Most files in one manifest (a diffusers tree has a few dozen; ONNX external data a few
/// hundred).
pub const MAX_MANIFEST_FILES: usize = 10_000;
/// Longest relative path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest path component, in bytes (NAME_MAX on Linux).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Largest bundle, in bytes (16 TiB): far above any model, far below an overflow.
pub const MAX_BUNDLE_BYTES: u64 = 1 << 44;

/// Checks that `p` is a relative path that stays inside its bundle: no leading `/`, no
/// `..` or `.` or empty components, no backslashes, no control characters, no Windows drive
/// prefix, at most [`MAX_PATH_BYTES`] (and [`MAX_COMPONENT_BYTES`] per component).
pub fn validate_relative_path(p: &str) -> Result<()> {
    relative_path_problem(p).map_or(Ok(()), |why| {
        Err(Error::invalid(
            "files.path",
            format!("{:?}: {why}", clip(p)),
        ))
    })
}

fn relative_path_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("empty path".into());
    }
    if p.len() > MAX_PATH_BYTES {
        return Some(format!("longer than {MAX_PATH_BYTES} bytes"));
    }
    if p.starts_with('/') {
        return Some("absolute path".into());
    }
    if p.contains('\\') {
        return Some("backslash in path".into());
    }
    if p.chars().any(char::is_control) {
        return Some("control character (or NUL) in path".into());
    }
    if p.len() >= 2 && p.as_bytes()[1] == b':' {
        return Some("drive prefix in path".into());
    }
    for c in p.split('/') {
        match c {
            "" => return Some("empty path component".into()),
            "." | ".." => return Some("relative component".into()),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Some(format!(
                    "a component longer than {MAX_COMPONENT_BYTES} bytes"
                ))
            }
            _ => {}
        }
    }
    None
}

/// At most 120 characters of `s`, for messages about hostile input.
fn clip(s: &str) -> &str {
    s.char_indices().nth(120).map_or(s, |(i, _)| &s[..i])
}

/// The name a file system that ignores case or Unicode form would see.
fn fold(p: &str) -> String {
    ComposingNormalizerBorrowed::new_nfc()
        .normalize(&p.to_lowercase())
        .into_owned()
}

/// Checks a whole manifest: its id, its source (see [`Source::parse`]), 1 to
/// [`MAX_MANIFEST_FILES`] files with valid paths, no two paths naming the same file (also
/// when they differ only in case or Unicode normalisation), no file that is also a directory
/// of another, 64-hex-digit digests, and a total size that neither overflows nor exceeds
/// [`MAX_BUNDLE_BYTES`].
pub fn validate_manifest(m: &ModelManifest) -> Result<()> {
    if m.id.as_str().is_empty() {
        return Err(Error::invalid("model_id", "empty"));
    }
    Source::parse(&m.source)?;
    let id = &m.id;
    if m.files.is_empty() {
        return Err(Error::invalid("files", format!("model {id} has no files")));
    }
    if m.files.len() > MAX_MANIFEST_FILES {
        return Err(Error::invalid(
            "files",
            format!(
                "model {id} lists {} files; at most {MAX_MANIFEST_FILES} are accepted",
                m.files.len()
            ),
        ));
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(m.files.len());
    let mut keys: Vec<String> = Vec::with_capacity(m.files.len());
    let mut dirs: HashSet<String> = HashSet::new();
    let mut total = 0u64;
    for (i, f) in m.files.iter().enumerate() {
        let at = || format!("files[{i}] {:?} of model {id}", clip(&f.path));
        if let Some(why) = relative_path_problem(&f.path) {
            return Err(Error::invalid("files.path", format!("{}: {why}", at())));
        }
        let key = fold(&f.path);
        if let Some(j) = seen.insert(key.clone(), i) {
            let how = if m.files[j].path == f.path {
                "listed twice"
            } else {
                "differs only in case or Unicode form"
            };
            return Err(Error::invalid(
                "files.path",
                format!(
                    "{}: same file as files[{j}] {:?} ({how})",
                    at(),
                    m.files[j].path
                ),
            ));
        }
        // Every ancestor directory, to find a file that is also a directory below.
        let mut end = 0;
        while let Some(k) = key[end..].find('/') {
            end += k;
            dirs.insert(key[..end].to_owned());
            end += 1;
        }
        keys.push(key);
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "files.sha256",
                format!("{}: {:?} is not 64 hex digits", at(), clip(&f.sha256)),
            ));
        }
        total = total
            .checked_add(f.size_bytes)
            .filter(|t| *t <= MAX_BUNDLE_BYTES)
            .ok_or_else(|| {
                Error::invalid(
                    "files.size_bytes",
                    format!(
                        "{}: {} bytes brings the model over {MAX_BUNDLE_BYTES} bytes",
                        at(),
                        f.size_bytes
                    ),
                )
            })?;
    }
    // A file that is also a directory prefix of another would clash on disk.
    if let Some(i) = keys.iter().position(|k| dirs.contains(k)) {
        return Err(Error::invalid(
            "files.path",
            format!(
                "files[{i}] {:?} of model {id} is both a file and a directory",
                m.files[i].path
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ModelFile, ModelKind};

    fn f(p: &str, size: u64, h: &str) -> ModelFile {
        ModelFile {
            path: p.into(),
            size_bytes: size,
            sha256: h.into(),
        }
    }

    fn mk(files: Vec<ModelFile>) -> ModelManifest {
        ModelManifest {
            family: String::new(),
            format: String::new(),
            id: "m".into(),
            kind: ModelKind::Checkpoint,
            source: "https://h/m".into(),
            files,
        }
    }

    fn refused(files: Vec<ModelFile>, field: &str, why: &str) {
        match validate_manifest(&mk(files)) {
            Err(e @ Error::InvalidArgument { field: got, .. }) => {
                assert_eq!(got, field, "{e}");
                assert!(e.to_string().contains(why), "{e}");
            }
            other => panic!("expected {field} ({why}), got {other:?}"),
        }
    }

    #[test]
    fn relative_paths() {
        for ok in ["a", "unet/model.onnx", "a.b/c_d-e", "x/.hidden", "é/ü.bin"] {
            assert!(validate_relative_path(ok).is_ok(), "{ok}");
        }
        let long_component = "a".repeat(MAX_COMPONENT_BYTES + 1);
        let long_path = "a/".repeat(MAX_PATH_BYTES / 2 + 1);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            "a\\b",
            "C:x",
            "a/.",
            "a\0b",
            "a\nb",
            &long_component,
            &long_path,
        ] {
            assert!(validate_relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn manifests_name_the_bad_entry() {
        let h = "0".repeat(64);
        assert!(validate_manifest(&mk(vec![f("a", 1, &h), f("b/c", 2, &h)])).is_ok());
        refused(vec![], "files", "no files");
        refused(
            vec![f("a", 1, &h), f("../a", 1, &h)],
            "files.path",
            "files[1]",
        );
        refused(vec![f("a", 1, "xyz")], "files.sha256", "files[0]");
        refused(
            vec![f("a", 1, &h), f("a", 1, &h)],
            "files.path",
            "listed twice",
        );
        refused(
            vec![f("Unet/A.onnx", 1, &h), f("unet/a.onnx", 1, &h)],
            "files.path",
            "case",
        );
        // "é" precomposed and decomposed.
        refused(
            vec![f("caf\u{e9}", 1, &h), f("cafe\u{301}", 1, &h)],
            "files.path",
            "Unicode",
        );
        refused(
            vec![f("a", 1, &h), f("a/b", 1, &h)],
            "files.path",
            "both a file and a directory",
        );
        refused(
            vec![f("x/y/z", 1, &h), f("X/Y", 1, &h)],
            "files.path",
            "both a file and a directory",
        );
        // Each size may be fine and the sum not; u64::MAX must not wrap the sum.
        let (max, big) = (MAX_BUNDLE_BYTES, u64::MAX);
        refused(
            vec![f("a", max, &h), f("b", 1, &h)],
            "files.size_bytes",
            "files[1]",
        );
        refused(
            vec![f("a", 1, &h), f("b", big, &h)],
            "files.size_bytes",
            "files[1]",
        );
        refused(vec![f("a", max + 1, &h)], "files.size_bytes", "files[0]");
        let many: Vec<_> = (0..=MAX_MANIFEST_FILES)
            .map(|i| f(&format!("f{i}"), 1, &h))
            .collect();
        refused(many, "files", "at most");
    }

    #[test]
    fn the_source_is_part_of_the_manifest() {
        let h = "0".repeat(64);
        let mut m = mk(vec![f("a", 1, &h)]);
        m.source = "ftp://h/x".into();
        assert!(matches!(
            validate_manifest(&m),
            Err(Error::InvalidArgument {
                field: "source",
                ..
            })
        ));
    }

    #[test]
    fn a_manifest_at_the_file_cap_is_accepted() {
        // (The file-versus-directory check is linear, not quadratic, so this costs
        // milliseconds, not seconds.)
        let h = "0".repeat(64);
        let files: Vec<_> = (0..MAX_MANIFEST_FILES)
            .map(|i| f(&format!("d{}/e{}/f{i}", i % 97, i % 13), 1, &h))
            .collect();
        validate_manifest(&mk(files)).unwrap();
    }
}
