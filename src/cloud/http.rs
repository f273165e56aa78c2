//! JSON over HTTP for the cloud clients: each request bounded by a timeout,
//! retried with exponential backoff and jitter on faults that may pass
//! (connection errors, timeouts, 429, 5xx), and every error naming the
//! service, method and path, with the server's problem details
//! (RFC 9457, `application/problem+json`) when it sent them.
//!
//! Credentials travel only in headers marked sensitive; no error or log line
//! built here contains a header, and every server-provided text goes through
//! `crate::redact::text`.

use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Attempts per call (the first and two retries).
const ATTEMPTS: u32 = 3;
/// The first retry waits about this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest server text kept in an error.
const MAX_DETAIL: usize = 300;

/// A client for one service at one base URL.
#[derive(Clone, Debug)]
pub(crate) struct JsonClient {
    client: reqwest::Client,
    base: String,
    service: &'static str,
}

/// A response that arrived (any status).
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub body: bytes::Bytes,
}

impl JsonClient {
    /// `headers` go with every request; `direct`: never through a proxy
    /// (IMDS requests that pass a proxy are refused).
    pub fn new(
        service: &'static str,
        base: &str,
        timeout: Duration,
        headers: HeaderMap,
        direct: bool,
    ) -> Result<Self> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .default_headers(headers)
            .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")));
        if direct {
            b = b.no_proxy();
        }
        let client = b
            .build()
            .map_err(|e| Error::Config(format!("{service} client: {e}")))?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            service,
        })
    }

    /// Sends a request, retrying faults that may pass; returns the last
    /// response whatever its status, or the error that ended the tries.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let base = FIRST_BACKOFF * 2u32.pow(attempt - 1);
                let jitter = rand::thread_rng().gen_range(0..=base.as_millis() as u64 / 2);
                tokio::time::sleep(base + Duration::from_millis(jitter)).await;
            }
            let mut req = self.client.request(method.clone(), &url);
            if let Some((content_type, bytes)) = &body {
                req = req
                    .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
                    .body(bytes.clone());
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = match resp.bytes().await {
                        Ok(b) => b,
                        Err(e) => {
                            last = format!("reading the response: {}", reqwest_text(&e));
                            continue;
                        }
                    };
                    if status == 429 || status >= 500 {
                        last = describe(status, &body);
                        continue;
                    }
                    return Ok(Reply { status, body });
                }
                Err(e) => last = reqwest_text(&e),
            }
        }
        Err(Error::Unavailable(format!(
            "{} {method} {path}: {last} (after {ATTEMPTS} attempts)",
            self.service
        )))
    }

    /// `send`, then a 2xx status or an error naming the call.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Reply> {
        let reply = self.send(method.clone(), path, body).await?;
        self.check(&method, path, reply)
    }

    /// A 2xx reply, or an error naming the call.
    pub fn check(&self, method: &Method, path: &str, reply: Reply) -> Result<Reply> {
        if (200..300).contains(&reply.status) {
            return Ok(reply);
        }
        let what = format!(
            "{} {method} {path}: {}",
            self.service,
            describe(reply.status, &reply.body)
        );
        Err(match reply.status {
            401 => Error::Unauthenticated(what),
            403 => Error::PermissionDenied(what),
            _ => Error::FailedPrecondition(what),
        })
    }

    /// The JSON body of a 2xx reply as `T`.
    pub fn parse<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        reply: &Reply,
    ) -> Result<T> {
        serde_json::from_slice(&reply.body).map_err(|e| {
            Error::Unavailable(format!(
                "{} {method} {path}: unexpected response body: {e}",
                self.service
            ))
        })
    }
}

/// Problem details: every property optional.
#[derive(serde::Deserialize, Default)]
struct Problem {
    title: Option<String>,
    detail: Option<String>,
    code: Option<String>,
}

/// `403 Forbidden: The request is missing ... (code)`, from whatever the
/// server sent, redacted and cut short.
fn describe(status: u16, body: &[u8]) -> String {
    let p: Problem = serde_json::from_slice(body).unwrap_or_default();
    let mut out = format!("HTTP {status}");
    for part in [p.title, p.detail].into_iter().flatten() {
        out.push_str(": ");
        out.push_str(&part);
    }
    if let Some(code) = p.code {
        out.push_str(&format!(" ({code})"));
    }
    let out = crate::redact::text(&out);
    super::truncate(&out, MAX_DETAIL).to_owned()
}

/// A reqwest error without its URL's query (there is none here, but the
/// rule is the same everywhere).
fn reqwest_text(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut s = format!("{kind}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    crate::redact::text(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_details_are_described() {
        let body = br#"{"type":"about:blank","title":"Forbidden","status":403,"detail":"Missing Metadata header","code":"forbidden"}"#;
        assert_eq!(
            describe(403, body),
            "HTTP 403: Forbidden: Missing Metadata header (forbidden)"
        );
        assert_eq!(describe(502, b"<html>"), "HTTP 502");
        let long = format!(r#"{{"detail":"{}"}}"#, "x".repeat(1000));
        assert!(describe(400, long.as_bytes()).len() <= MAX_DETAIL);
    }
}
