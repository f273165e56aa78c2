//! The client side of authentication and TLS, shared by the CLI and the
//! worker: a `Secret` that never prints, the interceptor that sends
//! `authorization: Bearer <token>`, and channels to `http://` or `https://`
//! coordinators (with an optional CA file).
//!
//! The server side (checking tokens, roles) is `coordinator::auth`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

/// A token or key. Its `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; only for sending it or comparing it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&Secret>) -> Result<Self> {
        let Some(t) = token.filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        let mut v: MetadataValue<_> = format!("Bearer {}", t.expose()).parse().map_err(|_| {
            Error::Config("the token has characters not allowed in a header".into())
        })?;
        v.set_sensitive(true);
        Ok(Self(Some(v)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends the token with every call.
pub type AuthedChannel = InterceptedService<Channel, BearerToken>;

/// An endpoint for `url`; `https://` URLs use TLS, trusting `ca_cert` (a
/// PEM file) or, without one, the usual public roots.
pub fn endpoint(url: &str, ca_cert: Option<&Path>) -> Result<Endpoint> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::Config(format!("coordinator URL {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match ca_cert {
            Some(p) => {
                let pem = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        ep = ep
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS for {url}: {e}")))?;
    } else if ca_cert.is_some() {
        return Err(Error::Config(format!(
            "a CA certificate was given but {url} is not an https:// URL"
        )));
    }
    Ok(ep)
}

/// Connects to `url` and attaches `token` to every call.
pub async fn connect(
    url: &str,
    ca_cert: Option<&Path>,
    token: Option<&Secret>,
) -> Result<AuthedChannel> {
    let channel = endpoint(url, ca_cert)?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the coordinator at {url}: {e}")))?;
    Ok(InterceptedService::new(channel, BearerToken::new(token)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        let b = BearerToken::new(Some(&s)).unwrap();
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
