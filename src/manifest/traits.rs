//! What a bundle is, beyond its files: its kind guessed from the file list,
//! and its family and format read from a few of its bytes (a LoRA's
//! safetensors header, a checkpoint's `unet/config.json`, a VAE's
//! `config.json`), from the source itself: a local directory, or HTTP range
//! requests. Never the whole bundle.
//!
//! Families are "sd1", "sd2", "sdxl", or "dim:N" for another cross-attention
//! width (the tiny test models); VAEs are "sd" (SD 1.x and 2.x share one) or
//! "sdxl"; empty means unknown (nothing is refused for it) or any.

use std::io::{Read, Seek, SeekFrom};

use crate::error::{Error, Result};
use crate::pipeline::ModelFamily;
use crate::source::{Endpoint, Source};
use crate::types::{ModelFile, ModelKind, ModelManifest};

/// Largest JSON config read.
const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Largest safetensors header read.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The kind a bundle's files suggest: one `.safetensors` file is a LoRA,
/// one `.onnx` file an upscaler, `vae_decoder/` without `unet/` a VAE, and
/// anything else a checkpoint.
pub fn guess_kind(files: &[ModelFile]) -> ModelKind {
    let payload: Vec<&ModelFile> = files
        .iter()
        .filter(|f| f.path != super::MANIFEST_FILE)
        .collect();
    let has = |p: &str| payload.iter().any(|f| f.path.starts_with(p));
    let ends = |s: &str| payload.iter().filter(|f| f.path.ends_with(s)).count();
    if payload.len() == 1 && ends(".safetensors") == 1 {
        ModelKind::Lora
    } else if ends(".onnx") == 1 && !has("unet/") && !has("vae_decoder/") {
        ModelKind::Upscaler
    } else if has("vae_decoder/") && !has("unet/") {
        ModelKind::Vae
    } else {
        ModelKind::Checkpoint
    }
}

/// The name a family is recorded under.
pub fn family_name(f: ModelFamily) -> String {
    match f {
        ModelFamily::Sd1 => "sd1".into(),
        ModelFamily::Sd2 => "sd2".into(),
        ModelFamily::Sdxl => "sdxl".into(),
        ModelFamily::Other {
            cross_attention_dim,
        } => format!("dim:{cross_attention_dim}"),
    }
}

/// Whether a LoRA or VAE of family `extra` fits a checkpoint of family
/// `checkpoint` (unknown families fit anything).
pub fn fits(checkpoint: &str, extra: &str) -> bool {
    if checkpoint.is_empty() || extra.is_empty() {
        return true;
    }
    match extra {
        // VAEs: one for SD 1.x, 2.x (and other non-SDXL widths), one for SDXL.
        "sd" => checkpoint != "sdxl",
        _ => checkpoint == extra,
    }
}

/// Reads a bundle's family and format from its source. Errors when the
/// files cannot be read or say nothing sensible.
pub async fn read_traits(m: &ModelManifest) -> Result<(String, String)> {
    let ep = Source::parse(&m.source)?.resolve()?;
    match m.kind {
        ModelKind::Lora => {
            let file = m
                .files
                .iter()
                .find(|f| f.path.ends_with(".safetensors"))
                .ok_or_else(|| {
                    Error::invalid("model.files", "a LoRA bundle holds one .safetensors file")
                })?;
            let len = read(&ep, &file.path, 0, 8).await?;
            let n = u64::from_le_bytes(
                len.as_slice()
                    .try_into()
                    .map_err(|_| Error::invalid("model.files", "a LoRA file under 8 bytes"))?,
            );
            if n > MAX_HEADER_BYTES || n + 8 > file.size_bytes {
                return Err(Error::invalid(
                    "model.files",
                    format!("{}: header length {n} does not fit the file", file.path),
                ));
            }
            let header = read(&ep, &file.path, 8, n).await?;
            let info = crate::pipeline::lora::inspect_header(&header, file.size_bytes, &file.path)
                .map_err(|e| Error::invalid("model.files", e.to_string()))?;
            let format = match info.format {
                crate::pipeline::lora::LoraFormat::Kohya => "kohya",
                crate::pipeline::lora::LoraFormat::Peft => "peft",
            };
            Ok((
                info.family.map(family_name).unwrap_or_default(),
                format.into(),
            ))
        }
        ModelKind::Checkpoint => {
            let family = match config(&ep, m, "unet/config.json").await? {
                Some(c) => c
                    .get("cross_attention_dim")
                    .and_then(|d| d.as_u64())
                    .map(|d| family_name(ModelFamily::from_cross_attention_dim(d as usize))),
                None => None,
            };
            let xl = m
                .files
                .iter()
                .any(|f| f.path.starts_with("text_encoder_2/"));
            Ok((
                family.unwrap_or_else(|| if xl { "sdxl".into() } else { String::new() }),
                String::new(),
            ))
        }
        ModelKind::Vae => {
            let family = match config(&ep, m, "vae_decoder/config.json").await? {
                Some(c) => match c.get("scaling_factor").and_then(|s| s.as_f64()) {
                    Some(s) if (s - 0.13025).abs() < 1e-4 => "sdxl",
                    Some(_) => "sd",
                    None => "",
                },
                None => "",
            };
            Ok((family.into(), String::new()))
        }
        ModelKind::Upscaler => Ok((String::new(), m.format.clone())),
    }
}

/// A bundle's JSON file, if the manifest lists it.
async fn config(ep: &Endpoint, m: &ModelManifest, rel: &str) -> Result<Option<serde_json::Value>> {
    let Some(f) = m.files.iter().find(|f| f.path == rel) else {
        return Ok(None);
    };
    if f.size_bytes > MAX_CONFIG_BYTES as u64 {
        return Ok(None);
    }
    let bytes = read(ep, rel, 0, f.size_bytes).await?;
    Ok(serde_json::from_slice(&bytes).ok())
}

/// `len` bytes of a bundle file from `offset`.
async fn read(ep: &Endpoint, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    match ep {
        Endpoint::Local(_) => {
            let path = std::path::PathBuf::from(ep.locate(rel));
            tokio::task::spawn_blocking(move || {
                let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| Error::io(&path, e))?;
                let mut buf = vec![0u8; len as usize];
                f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
                Ok(buf)
            })
            .await
            .map_err(|e| Error::Internal(format!("read task: {e}")))?
        }
        Endpoint::Http { .. } => {
            let url = ep.locate(rel);
            let client = crate::source::http_client()?;
            let resp = client
                .get(&url)
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={offset}-{}", offset + len.saturating_sub(1)),
                )
                .send()
                .await
                .map_err(|e| crate::source::transport_error(&url, e))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(crate::source::status_error(&url, status));
            }
            let whole = status != reqwest::StatusCode::PARTIAL_CONTENT;
            let body = resp
                .bytes()
                .await
                .map_err(|e| crate::source::transport_error(&url, e))?;
            // A server that ignores Range sends the whole file.
            let start = if whole { offset as usize } else { 0 };
            body.get(start..start + len as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    Error::Unavailable(format!(
                        "GET {}: shorter than {} bytes",
                        ep.shown(rel),
                        offset + len
                    ))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(p: &str) -> ModelFile {
        ModelFile {
            path: p.into(),
            size_bytes: 1,
            sha256: "0".repeat(64),
        }
    }

    #[test]
    fn kinds_are_guessed_from_the_files() {
        assert_eq!(guess_kind(&[f("x.safetensors")]), ModelKind::Lora);
        assert_eq!(guess_kind(&[f("model.onnx")]), ModelKind::Upscaler);
        assert_eq!(
            guess_kind(&[f("vae_decoder/model.onnx"), f("vae_decoder/config.json")]),
            ModelKind::Vae
        );
        assert_eq!(
            guess_kind(&[f("unet/model.onnx"), f("vae_decoder/model.onnx")]),
            ModelKind::Checkpoint
        );
    }

    #[test]
    fn families_fit() {
        assert!(fits("sd1", "sd1"));
        assert!(!fits("sd1", "sdxl"));
        assert!(!fits("sdxl", "sd1"));
        assert!(fits("sd2", "sd"));
        assert!(!fits("sdxl", "sd"));
        assert!(fits("sdxl", "sdxl"));
        assert!(fits("", "sdxl"));
        assert!(fits("sdxl", ""));
        assert!(fits("dim:32", "sd"));
        assert!(!fits("dim:32", "dim:80"));
        assert!(!fits("sd1", "dim:32"));
    }
}
