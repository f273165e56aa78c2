//! The HTTP client that manifests and downloads share, and how HTTP failures become errors.
//!
//! Every message built here shows a URL through [`crate::redact::url`], and a library error
//! through [`crate::redact::text`] without its own copy of the URL: callers pass the raw URL
//! (needed for the request) and never format it themselves.

use std::time::Duration;

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::redact;

/// The HTTP client used for manifests and downloads.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Internal(format!("http client: {}", redact::text(&e.to_string()))))
}

/// Maps a non-success HTTP status: server-side and throttling statuses are retryable.
pub fn status_error(url: &str, status: reqwest::StatusCode) -> Error {
    let msg = format!("GET {}: HTTP {status}", redact::url(url));
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Error::Unavailable(msg)
    } else {
        Error::FailedPrecondition(msg)
    }
}

/// A transport failure of `GET url` (connect, TLS, a cut body): retryable.
pub fn transport_error(url: &str, e: reqwest::Error) -> Error {
    unavailable(url, &e.without_url())
}

/// `Error::Unavailable` for `GET url` failing with `why`.
pub fn unavailable(url: &str, why: &dyn std::fmt::Display) -> Error {
    Error::Unavailable(format!(
        "GET {}: {}",
        redact::url(url),
        redact::text(&why.to_string())
    ))
}

/// GETs a small document (a manifest), refusing bodies over `max_bytes` without reading
/// them whole.
pub async fn get_limited(client: &reqwest::Client, url: &str, max_bytes: usize) -> Result<Vec<u8>> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| transport_error(url, e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(status_error(url, status));
    }
    let too_big = || {
        Error::FailedPrecondition(format!(
            "GET {}: body larger than {max_bytes} bytes",
            redact::url(url)
        ))
    };
    if resp.content_length().is_some_and(|n| n > max_bytes as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| transport_error(url, e))?;
        if body.len() + chunk.len() > max_bytes {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
