//! Where a model's files come from: the `source` string of a manifest, parsed.
//!
//! Sources: local files (plain path or `file://`), `http(s)://` prefixes (the file URL is the
//! prefix, `/`, then the relative path), and object stores mapped to their public HTTPS
//! endpoints (no SDK, no request signing):
//!
//! - `s3://bucket/prefix` -> `https://bucket.s3.amazonaws.com/prefix`, or
//!   `https://bucket.s3.<region>.amazonaws.com/prefix` when `AWS_REGION` (or
//!   `AWS_DEFAULT_REGION`) is set, or `<AWS_ENDPOINT_URL>/bucket/prefix` (path style, for
//!   MinIO, R2 and friends) when `AWS_ENDPOINT_URL` is set;
//! - `gs://bucket/prefix` -> `https://storage.googleapis.com/bucket/prefix`;
//! - `az://account/container/prefix` -> `https://account.blob.core.windows.net/container/prefix`,
//!   with `AZURE_STORAGE_SAS_TOKEN` appended as the query string when set.
//!
//! Also the HTTP client both the manifest reader and the worker's downloads use, and the
//! mapping of HTTP statuses to errors.
//!
//! This module is shared by `manifest` (the client and coordinator side) and `worker::fetch`
//! (downloads): it must not depend on either, and it does no I/O besides building the client.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// Where a model's files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A local directory.
    Local(PathBuf),
    /// A URL prefix (no trailing `/`) and a query string (empty, or starting with `?`)
    /// appended to every file URL.
    Http { prefix: String, query: String },
}

impl Source {
    /// Parses a manifest's `source` (see the module docs for the schemes).
    pub fn parse(s: &str) -> Result<Source> {
        let bad = |why: &str| Err(Error::invalid("source", format!("{s:?}: {why}")));
        let trim = |p: &str| p.trim_end_matches('/').to_owned();
        if s.is_empty() {
            return bad("empty");
        }
        if let Some(rest) = s.strip_prefix("file://") {
            return Ok(Source::Local(PathBuf::from(rest)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let (prefix, query) = match s.split_once('?') {
                Some((p, q)) => (trim(p), format!("?{q}")),
                None => (trim(s), String::new()),
            };
            return Ok(Source::Http { prefix, query });
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return bad("no bucket");
            }
            let base = if let Some(ep) = env("AWS_ENDPOINT_URL") {
                format!("{}/{bucket}", ep.trim_end_matches('/'))
            } else if let Some(region) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
                format!("https://{bucket}.s3.{region}.amazonaws.com")
            } else {
                format!("https://{bucket}.s3.amazonaws.com")
            };
            return Ok(Source::Http {
                prefix: join_prefix(&base, prefix),
                query: String::new(),
            });
        }
        if let Some(rest) = s.strip_prefix("gs://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return bad("no bucket");
            }
            let base = format!("https://storage.googleapis.com/{bucket}");
            return Ok(Source::Http {
                prefix: join_prefix(&base, prefix),
                query: String::new(),
            });
        }
        if let Some(rest) = s.strip_prefix("az://") {
            let mut parts = rest.splitn(3, '/');
            let account = parts.next().unwrap_or("");
            let container = parts.next().unwrap_or("");
            let prefix = parts.next().unwrap_or("");
            if account.is_empty() || container.is_empty() {
                return bad("expected az://account/container/prefix");
            }
            let base = format!("https://{account}.blob.core.windows.net/{container}");
            let query = env("AZURE_STORAGE_SAS_TOKEN")
                .map(|t| format!("?{}", t.trim_start_matches('?')))
                .unwrap_or_default();
            return Ok(Source::Http {
                prefix: join_prefix(&base, prefix),
                query,
            });
        }
        if s.contains("://") {
            return bad("unsupported scheme");
        }
        Ok(Source::Local(PathBuf::from(s)))
    }

    /// Where the bundle file `rel` (already validated) lives: a URL or a local path.
    pub fn locate(&self, rel: &str) -> String {
        match self {
            Source::Local(dir) => dir.join(rel).display().to_string(),
            Source::Http { prefix, query } => format!("{prefix}/{}{query}", encode_path(rel)),
        }
    }
}

fn join_prefix(base: &str, prefix: &str) -> String {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        base.to_owned()
    } else {
        format!("{base}/{}", encode_path(p))
    }
}

/// Percent-encodes each `/`-separated component (RFC 3986 unreserved characters pass).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HTTP client used for manifests and downloads.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Internal(format!("http client: {e}")))
}

/// Maps a non-success HTTP status: server-side and throttling statuses are retryable.
pub fn status_error(url: &str, status: reqwest::StatusCode) -> Error {
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Error::Unavailable(format!("GET {url}: HTTP {status}"))
    } else {
        Error::FailedPrecondition(format!("GET {url}: HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_store_urls_map_to_https() {
        // Only the env-free forms: tests run in parallel and must not set env vars.
        assert_eq!(
            Source::parse("gs://bkt/models/sd15").unwrap(),
            Source::Http {
                prefix: "https://storage.googleapis.com/bkt/models/sd15".into(),
                query: String::new()
            }
        );
        let az = Source::parse("az://acct/cont/p/q/").unwrap();
        match &az {
            Source::Http { prefix, .. } => {
                assert_eq!(prefix, "https://acct.blob.core.windows.net/cont/p/q")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Source::parse("https://h/x/?sig=1")
                .unwrap()
                .locate("a b/c.onnx"),
            "https://h/x/a%20b/c.onnx?sig=1"
        );
        assert_eq!(
            Source::parse("file:///m/x").unwrap(),
            Source::Local("/m/x".into())
        );
        assert_eq!(Source::parse("/m/x").unwrap(), Source::Local("/m/x".into()));
        assert!(Source::parse("ftp://x").is_err());
        assert!(Source::parse("az://acct").is_err());
    }
}
