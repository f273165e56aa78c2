//! Where a model's files come from: the `source` string of a manifest, parsed, checked and
//! resolved to something a worker can read.
//!
//! The grammar ([`Source::parse`], pure: no environment, no I/O, so the coordinator can check
//! a source at registration exactly as a worker will read it):
//!
//! ```text
//! /abs/dir  |  file:///abs/dir                  a local directory (absolute, no . or ..)
//! http(s)://[user:pass@]host[:port]/prefix[?q]  a URL prefix; the query (a pre-signed URL's
//!                                               signature) is appended to every file URL
//! s3://bucket[/prefix]                          S3 naming rules for the bucket
//! gs://bucket[/prefix]                          GCS naming rules
//! az://account/container[/prefix]               Azure naming rules
//! ```
//!
//! No fragment (`#`) anywhere, no query or userinfo on object stores (their credentials are
//! the worker's environment), no whitespace or control characters in URLs, no `.`, `..` or
//! empty segments in prefixes, at most [`MAX_SOURCE_BYTES`]. Bucket names follow `names`.
//!
//! Resolution ([`Source::resolve`], on the worker, or on the client building a manifest) maps
//! object stores to their public HTTPS endpoints (no SDK, no request signing):
//!
//! - `s3://bucket/prefix` -> `https://bucket.s3.amazonaws.com/prefix`, or
//!   `https://bucket.s3.<region>.amazonaws.com/prefix` when `AWS_REGION` (or
//!   `AWS_DEFAULT_REGION`) is set, or `<AWS_ENDPOINT_URL>/bucket/prefix` (path style, for
//!   MinIO, R2 and friends) when `AWS_ENDPOINT_URL` is set;
//! - `gs://bucket/prefix` -> `https://storage.googleapis.com/bucket/prefix`;
//! - `az://account/container/prefix` -> `https://account.blob.core.windows.net/container/prefix`
//!   (or `<AZURE_STORAGE_BLOB_ENDPOINT>/container/prefix`, for Azurite), with
//!   `AZURE_STORAGE_SAS_TOKEN` appended as the query string when set.
//!
//! Whether a local source is acceptable at all is a policy of the coordinator:
//! [`Source::check_local_policy`].
//!
//! This module is shared by `manifest` (client and coordinator side) and `worker::fetch`
//! (downloads): it must not depend on either. It prints sources and URLs only through
//! `crate::redact`.

mod http;
pub mod names;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::redact;

pub use http::{get_limited, http_client, status_error, transport_error, unavailable};

/// Longest `source` accepted.
pub const MAX_SOURCE_BYTES: usize = 4096;
/// Longest object key prefix (S3's limit for a whole key).
const MAX_PREFIX_BYTES: usize = 1024;
/// The schemes [`Source::parse`] accepts.
pub const SCHEMES: &[&str] = &["file", "http", "https", "s3", "gs", "az"];

/// A parsed `source` (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A local directory, absolute.
    Local(PathBuf),
    /// A URL prefix (no trailing `/`) and a query string (empty, or starting with `?`)
    /// appended to every file URL.
    Http { prefix: String, query: String },
    /// An S3 bucket and key prefix (no leading or trailing `/`; may be empty).
    S3 { bucket: String, prefix: String },
    /// A Google Cloud Storage bucket and prefix.
    Gs { bucket: String, prefix: String },
    /// An Azure storage account, blob container and prefix.
    Az {
        account: String,
        container: String,
        prefix: String,
    },
}

/// Where a worker reads a bundle's files: a directory or a URL prefix.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    Local(PathBuf),
    /// As [`Source::Http`]: every file is `prefix/<path>query`.
    Http {
        prefix: String,
        query: String,
    },
}

impl Source {
    /// Parses and checks a manifest's `source`. Errors are `InvalidArgument` on `source` and
    /// show the source redacted.
    pub fn parse(s: &str) -> Result<Source> {
        let shown = {
            let r = redact::url(s);
            match r.char_indices().nth(200) {
                Some((i, _)) => format!("{:?}...", &r[..i]),
                None => format!("{r:?}"),
            }
        };
        let bad = |why: String| Error::invalid("source", format!("{shown}: {why}"));
        if s.is_empty() {
            return Err(bad("empty".into()));
        }
        if s.len() > MAX_SOURCE_BYTES {
            return Err(bad(format!("longer than {MAX_SOURCE_BYTES} bytes")));
        }
        if s.chars().any(char::is_control) {
            return Err(bad("control character".into()));
        }
        let Some((scheme, rest)) = split_scheme(s) else {
            return local_path(s).map_err(bad);
        };
        let lower = scheme.to_ascii_lowercase();
        if !SCHEMES.contains(&lower.as_str()) {
            return Err(bad(format!(
                "unsupported scheme {lower:?} (supported: {})",
                SCHEMES.join(", ")
            )));
        }
        if s.contains('#') {
            return Err(bad("a fragment (#) is not allowed".into()));
        }
        if lower == "http" || lower == "https" {
            return http_prefix(s).map_err(bad);
        }
        if s.chars().any(char::is_whitespace) {
            return Err(bad("whitespace in a URL (percent-encode it)".into()));
        }
        if rest.contains('?') {
            let why = if lower == "file" {
                "a query is not allowed".to_owned()
            } else {
                format!("a query is not allowed on {lower}:// (credentials come from the worker's environment)")
            };
            return Err(bad(why));
        }
        match lower.as_str() {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad(
                        "file:// takes an absolute path and no host: file:///dir".into(),
                    ));
                }
                local_path(rest).map_err(bad)
            }
            "s3" | "gs" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                no_userinfo(bucket).map_err(&bad)?;
                let check = if lower == "s3" {
                    names::s3_bucket
                } else {
                    names::gcs_bucket
                };
                check(bucket).map_err(|why| bad(format!("bucket {bucket:?}: {why}")))?;
                let (bucket, prefix) = (bucket.to_owned(), key_prefix(prefix).map_err(&bad)?);
                Ok(if lower == "s3" {
                    Source::S3 { bucket, prefix }
                } else {
                    Source::Gs { bucket, prefix }
                })
            }
            _ => {
                let mut parts = rest.splitn(3, '/');
                let account = parts.next().unwrap_or("");
                let container = parts.next().unwrap_or("");
                no_userinfo(account).map_err(&bad)?;
                if account.is_empty() || container.is_empty() {
                    return Err(bad("expected az://account/container[/prefix]".into()));
                }
                names::azure_account(account)
                    .map_err(|why| bad(format!("account {account:?}: {why}")))?;
                names::azure_container(container)
                    .map_err(|why| bad(format!("container {container:?}: {why}")))?;
                Ok(Source::Az {
                    account: account.to_owned(),
                    container: container.to_owned(),
                    prefix: key_prefix(parts.next().unwrap_or("")).map_err(&bad)?,
                })
            }
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Source::Local(_))
    }

    /// Whether this source is acceptable on a coordinator: remote sources always are; a local
    /// directory when `allow_any`, or when it lies under `root` (compared component by
    /// component; `parse` refuses `..`, so the comparison cannot be escaped lexically, but a
    /// symlink inside `root` is not followed: the coordinator may not see the workers' disks).
    /// Refusals are `PermissionDenied` naming `source`.
    pub fn check_local_policy(&self, root: Option<&Path>, allow_any: bool) -> Result<()> {
        let Source::Local(dir) = self else {
            return Ok(());
        };
        if allow_any {
            return Ok(());
        }
        match root {
            Some(root) if dir.starts_with(root) => Ok(()),
            Some(root) => Err(Error::PermissionDenied(format!(
                "source: local directory {} is outside the allowed root {}",
                dir.display(),
                root.display()
            ))),
            None => Err(Error::PermissionDenied(format!(
                "source: local directories ({}) are not allowed on this coordinator; use an \
                 http(s)://, s3://, gs:// or az:// source, or configure a root for local sources",
                dir.display()
            ))),
        }
    }

    /// Where to read the files, with this process's environment (see the module docs).
    pub fn resolve(&self) -> Result<Endpoint> {
        self.resolve_with(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`resolve`](Self::resolve) with the environment given (tests must not set variables:
    /// they run in parallel).
    pub fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Endpoint> {
        Ok(match self {
            Source::Local(d) => Endpoint::Local(d.clone()),
            Source::Http { prefix, query } => Endpoint::Http {
                prefix: prefix.clone(),
                query: query.clone(),
            },
            Source::S3 { bucket, prefix } => {
                let base = if let Some(ep) = env("AWS_ENDPOINT_URL") {
                    format!("{}/{bucket}", endpoint_var("AWS_ENDPOINT_URL", &ep)?)
                } else if let Some(region) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION"))
                {
                    let ok = !region.is_empty()
                        && region.len() <= 32
                        && region
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                    if !ok {
                        return Err(Error::Config(format!(
                            "AWS_REGION {region:?} is not a region name"
                        )));
                    }
                    format!("https://{bucket}.s3.{region}.amazonaws.com")
                } else {
                    format!("https://{bucket}.s3.amazonaws.com")
                };
                Endpoint::Http {
                    prefix: join_prefix(&base, prefix),
                    query: String::new(),
                }
            }
            Source::Gs { bucket, prefix } => Endpoint::Http {
                prefix: join_prefix(&format!("https://storage.googleapis.com/{bucket}"), prefix),
                query: String::new(),
            },
            Source::Az {
                account,
                container,
                prefix,
            } => {
                let base = match env("AZURE_STORAGE_BLOB_ENDPOINT") {
                    Some(ep) => endpoint_var("AZURE_STORAGE_BLOB_ENDPOINT", &ep)?,
                    None => format!("https://{account}.blob.core.windows.net"),
                };
                let query = env("AZURE_STORAGE_SAS_TOKEN")
                    .map(|t| format!("?{}", t.trim_start_matches('?')))
                    .unwrap_or_default();
                Endpoint::Http {
                    prefix: join_prefix(&format!("{base}/{container}"), prefix),
                    query,
                }
            }
        })
    }
}

/// The source written back, credentials redacted: safe for logs and errors.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slash = |p: &str| {
            if p.is_empty() {
                String::new()
            } else {
                format!("/{p}")
            }
        };
        match self {
            Source::Local(d) => write!(f, "{}", d.display()),
            Source::Http { prefix, query } => {
                write!(f, "{}", redact::url(&format!("{prefix}{query}")))
            }
            Source::S3 { bucket, prefix } => write!(f, "s3://{bucket}{}", slash(prefix)),
            Source::Gs { bucket, prefix } => write!(f, "gs://{bucket}{}", slash(prefix)),
            Source::Az {
                account,
                container,
                prefix,
            } => write!(f, "az://{account}/{container}{}", slash(prefix)),
        }
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({self})")
    }
}

impl Endpoint {
    /// Where the bundle file `rel` (already validated) lives: a URL or a local path. May
    /// carry credentials: for requests only; print [`shown`](Self::shown).
    pub fn locate(&self, rel: &str) -> String {
        match self {
            Endpoint::Local(dir) => dir.join(rel).display().to_string(),
            Endpoint::Http { prefix, query } => format!("{prefix}/{}{query}", encode_path(rel)),
        }
    }

    /// [`locate`](Self::locate), redacted: for errors and logs.
    pub fn shown(&self, rel: &str) -> String {
        redact::url(&self.locate(rel))
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Local(d) => write!(f, "Endpoint::Local({})", d.display()),
            Endpoint::Http { prefix, query } => {
                write!(
                    f,
                    "Endpoint::Http({})",
                    redact::url(&format!("{prefix}{query}"))
                )
            }
        }
    }
}

/// For a command line: a relative local path (`./models/sd15`) made absolute against the
/// current directory, with symlinks and `..` resolved (so it must exist); anything else comes
/// back unchanged. [`Source::parse`] refuses relative paths, because a worker's current
/// directory is not the client's.
pub fn absolute_if_local(s: &str) -> Result<String> {
    if split_scheme(s).is_some() || s.starts_with('/') || s.is_empty() {
        return Ok(s.to_owned());
    }
    let abs = std::fs::canonicalize(s).map_err(|e| Error::io(s, e))?;
    abs.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid("source", format!("{} is not UTF-8", abs.display())))
}

/// `scheme://rest` when `s` starts with a scheme token (RFC 3986: a letter, then letters,
/// digits, `+`, `-`, `.`).
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let mut cs = scheme.chars();
    let first = cs.next()?;
    (first.is_ascii_alphabetic()
        && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some((scheme, rest))
}

fn local_path(p: &str) -> std::result::Result<Source, String> {
    if !p.starts_with('/') {
        return Err(
            "not an absolute path or a URL (supported: /dir, file:///dir, http(s)://, s3://, \
             gs://, az://)"
                .into(),
        );
    }
    if p.split('/').any(|c| c == "." || c == "..") {
        return Err("`.` or `..` in a local path".into());
    }
    Ok(Source::Local(PathBuf::from(p)))
}

fn http_prefix(s: &str) -> std::result::Result<Source, String> {
    if s.chars().any(char::is_whitespace) {
        return Err("whitespace in a URL (percent-encode it)".into());
    }
    let u = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if u.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    let (before_query, query) = match s.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (s, String::new()),
    };
    // The path as written (the url crate would silently resolve `..`).
    let after_scheme = &before_query[before_query.find("://").map_or(0, |i| i + 3)..];
    let (authority, path) =
        after_scheme.split_at(after_scheme.find('/').unwrap_or(after_scheme.len()));
    if authority.is_empty() {
        return Err("no host".into());
    }
    let path = path.trim_end_matches('/');
    for seg in path.split('/').skip(1) {
        match seg {
            "" => return Err("empty path segment (`//`)".into()),
            "." | ".." => return Err("`.` or `..` in the path".into()),
            _ => {}
        }
    }
    Ok(Source::Http {
        prefix: before_query.trim_end_matches('/').to_owned(),
        query,
    })
}

/// Object stores: credentials come from the worker's environment, never the source.
fn no_userinfo(first: &str) -> std::result::Result<(), String> {
    if first.contains('@') {
        return Err("credentials (user@) are not allowed in an object store URL".into());
    }
    Ok(())
}

fn key_prefix(p: &str) -> std::result::Result<String, String> {
    let p = p.trim_matches('/');
    if p.len() > MAX_PREFIX_BYTES {
        return Err(format!("prefix longer than {MAX_PREFIX_BYTES} bytes"));
    }
    if !p.is_empty() {
        for seg in p.split('/') {
            match seg {
                "" => return Err("empty segment (`//`) in the prefix".into()),
                "." | ".." => return Err("`.` or `..` in the prefix".into()),
                _ => {}
            }
        }
    }
    Ok(p.to_owned())
}

/// An endpoint from the environment: an http(s) URL without query or fragment.
fn endpoint_var(var: &str, v: &str) -> Result<String> {
    let bad = |why: &str| Error::Config(format!("{var} {}: {why}", redact::url(v)));
    let u = url::Url::parse(v).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(bad("not an http(s) URL"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("no query or fragment allowed"));
    }
    Ok(v.trim_end_matches('/').to_owned())
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

#[cfg(test)]
mod tests;
