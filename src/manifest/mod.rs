//! A model's manifest: its files, sizes and SHA-256 digests, built from its source and checked.
//!
//! - `validate`: what a valid manifest is ([`validate_manifest`], [`validate_relative_path`])
//!   and the caps on what is accepted ([`MAX_MANIFEST_FILES`], [`MAX_PATH_BYTES`], ...).
//! - `local`: hashing and walking local directories, and writing `corral-manifest.json`
//!   ([`write_manifest_file`], [`publish_dir`]).
//! - `traits`: a bundle's kind guessed from its files, and its family and format read from a
//!   few of its bytes ([`guess_kind`], [`read_traits`], [`fits`]).
//! - here: [`manifest_from_source`], reading a source's manifest file (remote sources must
//!   publish one) or walking a local directory.
//!
//! A source is parsed by `crate::source`. Every path in a manifest is checked, because bundle
//! paths become file names under the cache directory. Errors show sources and URLs redacted.
//!
//! This module owns no state and writes nothing but `corral-manifest.json` (in `local`).

mod local;
mod traits;
mod validate;

use std::path::PathBuf;

pub use local::{hash_file, publish_dir, scan_dir, write_manifest_file, Publication};
pub use traits::{family_name, fits, guess_kind, read_traits};
pub use validate::{
    validate_manifest, validate_relative_path, MAX_BUNDLE_BYTES, MAX_COMPONENT_BYTES,
    MAX_MANIFEST_FILES, MAX_PATH_BYTES,
};

use crate::error::{Error, Result};
use crate::redact;
use crate::source::{Endpoint, Source};
use crate::types::{ModelFile, ModelId, ModelKind, ModelManifest};

/// The file a published bundle directory carries: a JSON list of its files.
pub const MANIFEST_FILE: &str = "corral-manifest.json";

/// Largest `corral-manifest.json` read (about [`MAX_MANIFEST_FILES`] entries with long
/// paths).
pub const MAX_MANIFEST_JSON_BYTES: usize = 16 << 20;

/// Parses a `corral-manifest.json` read from `origin` (shown redacted).
pub fn parse_file_list(bytes: &[u8], origin: &str) -> Result<Vec<ModelFile>> {
    if bytes.len() > MAX_MANIFEST_JSON_BYTES {
        return Err(Error::invalid(
            "manifest",
            format!(
                "{}: larger than {MAX_MANIFEST_JSON_BYTES} bytes",
                redact::url(origin)
            ),
        ));
    }
    let mut files: Vec<ModelFile> = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid("manifest", format!("{}: {e}", redact::url(origin))))?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Builds the manifest of model `id` from `source` (see the module docs). Local directories
/// are hashed on the blocking pool; remote sources must publish `corral-manifest.json`.
/// Object stores are resolved with this process's environment (`crate::source`).
pub async fn manifest_from_source(id: &ModelId, source: &str) -> Result<ModelManifest> {
    let files = match Source::parse(source)?.resolve()? {
        Endpoint::Local(dir) => local_files(dir).await?,
        ep @ Endpoint::Http { .. } => {
            let url = ep.locate(MANIFEST_FILE);
            let client = crate::source::http_client()?;
            let body = crate::source::get_limited(&client, &url, MAX_MANIFEST_JSON_BYTES).await?;
            parse_file_list(&body, &url)?
        }
    };
    let m = ModelManifest {
        family: String::new(),
        format: String::new(),
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

    #[tokio::test]
    async fn a_published_directory_reads_back_as_the_same_manifest() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("lora")).unwrap();
        std::fs::write(d.path().join("lora/style.safetensors"), b"weights").unwrap();
        std::fs::write(d.path().join(".DS_Store"), b"x").unwrap();
        let p = publish_dir(d.path()).unwrap();
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.total_bytes, 7);
        assert_eq!(
            p.upload_list(),
            ["lora/style.safetensors", "corral-manifest.json"]
        );
        let text = p.instructions();
        assert!(text.contains("lora/style.safetensors") && text.contains("corral models add"));
        // The manifest on disk is what a remote reader gets.
        let json = std::fs::read(&p.manifest_path).unwrap();
        assert_eq!(parse_file_list(&json, "x").unwrap(), p.files);
        let m = manifest_from_source(&ModelId::from("l"), d.path().to_str().unwrap())
            .await
            .unwrap();
        assert_eq!(m.files, p.files);
        // Not a directory: refused, nothing written.
        let f = d.path().join("lora/style.safetensors");
        assert!(matches!(
            publish_dir(&f),
            Err(Error::InvalidArgument { field: "dir", .. })
        ));
    }

    #[test]
    fn oversized_manifest_json_is_refused_unread() {
        let big = vec![b' '; MAX_MANIFEST_JSON_BYTES + 1];
        let e =
            parse_file_list(&big, "https://h/m/corral-manifest.json?sig=SECRETSECRET").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("larger than") && !msg.contains("SECRETSECRET"),
            "{msg}"
        );
    }
}
