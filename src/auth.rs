//! The client side of authentication and TLS, shared by the CLI and the
//! worker: a `Secret` that never prints, the interceptor that sends
//! `authorization: Bearer <token>`, channels to `http://` or `https://`
//! coordinators (with an optional CA file), and finding the leader among
//! several coordinators (a comma-separated list, or one DNS name with
//! several addresses).
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

/// The metadata entry in which a coordinator that does not lead names the
/// one that does (its advertised URL), on an UNAVAILABLE status.
pub const LEADER_METADATA: &str = "corral-leader";

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

/// One coordinator to try: a URL, and the host name its certificate names
/// when the URL holds an address resolved from that name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub tls_name: Option<String>,
}

impl Target {
    pub fn url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls_name: None,
        }
    }
}

/// The URLs of a `coordinator` setting: comma-separated, blanks ignored.
pub fn coordinator_urls(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Every coordinator a `coordinator` setting names: each URL of the list,
/// and a URL whose host name resolves to several addresses becomes one
/// target per address (TLS still checks the name). Unresolvable names stay
/// as they are, so that the connection error names them.
pub async fn targets(spec: &str) -> Vec<Target> {
    let mut out = Vec::new();
    for u in coordinator_urls(spec) {
        out.extend(expand(&u).await);
    }
    out
}

async fn expand(u: &str) -> Vec<Target> {
    let one = || vec![Target::url(u)];
    let Ok(parsed) = url::Url::parse(u) else {
        return one();
    };
    let Some(url::Host::Domain(host)) = parsed.host() else {
        return one();
    };
    let port = parsed.port_or_known_default().unwrap_or(80);
    let Ok(addrs) = tokio::net::lookup_host((host, port)).await else {
        return one();
    };
    let mut ips: Vec<std::net::IpAddr> = addrs.map(|a| a.ip()).collect();
    ips.dedup();
    if ips.len() < 2 {
        return one();
    }
    ips.into_iter()
        .map(|ip| {
            let mut each = parsed.clone();
            let _ = each.set_ip_host(ip);
            Target {
                url: each.as_str().trim_end_matches('/').to_owned(),
                tls_name: Some(host.to_owned()),
            }
        })
        .collect()
}

/// [`endpoint`] for a target (its certificate name kept).
pub fn target_endpoint(t: &Target, ca_cert: Option<&Path>) -> Result<Endpoint> {
    let Some(name) = &t.tls_name else {
        return endpoint(&t.url, ca_cert);
    };
    let mut ep = endpoint(&t.url, ca_cert)?;
    if t.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().domain_name(name.clone());
        tls = match ca_cert {
            Some(p) => {
                let pem = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        ep = ep
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS for {}: {e}", t.url)))?;
    }
    Ok(ep)
}

/// The leader's URL a coordinator that does not lead named in its
/// UNAVAILABLE answer, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
}

/// Connects to the coordinator that serves among those `spec` names (see
/// [`targets`]): with one, as [`connect`]; with several, each is asked for
/// its health and the first SERVING one is used (followers answer
/// NOT_SERVING), retrying for up to `wait` while a takeover is under way.
pub async fn connect_leader(
    spec: &str,
    ca_cert: Option<&Path>,
    token: Option<&Secret>,
    wait: Duration,
) -> Result<AuthedChannel> {
    let all = targets(spec).await;
    match all.as_slice() {
        [] => return Err(Error::Config("no coordinator URL given".into())),
        [one] if one.tls_name.is_none() => return connect(&one.url, ca_cert, token).await,
        _ => {}
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut seen = Vec::new();
        for t in &all {
            match probe(t, ca_cert).await {
                Ok(channel) => {
                    return Ok(InterceptedService::new(channel, BearerToken::new(token)?));
                }
                Err(why) => seen.push(format!("{}: {why}", t.url)),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "no coordinator is serving ({})",
                seen.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A channel to `t` if it answers SERVING to a health check.
async fn probe(t: &Target, ca_cert: Option<&Path>) -> std::result::Result<Channel, String> {
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let ep = target_endpoint(t, ca_cert)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2));
    let channel = ep
        .connect()
        .await
        .map_err(|e| format!("unreachable ({e})"))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.set_timeout(Duration::from_secs(2));
    let status = health
        .check(req)
        .await
        .map_err(|s| format!("health check failed ({})", s.message()))?
        .into_inner()
        .status;
    if status == ServingStatus::Serving as i32 {
        Ok(channel)
    } else {
        Err("not serving (a follower, or recovering)".into())
    }
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
    fn coordinator_lists_split_on_commas() {
        assert_eq!(
            coordinator_urls(" http://a:1/, ,http://b:2 "),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
        assert!(coordinator_urls("").is_empty());
    }

    #[test]
    fn the_leader_hint_comes_from_an_unavailable_status() {
        let mut s = tonic::Status::unavailable("not the leader; the leader is http://b:7700");
        s.metadata_mut()
            .insert(LEADER_METADATA, "http://b:7700".parse().unwrap());
        assert_eq!(leader_hint(&s).as_deref(), Some("http://b:7700"));
        let mut other = tonic::Status::internal("x");
        other
            .metadata_mut()
            .insert(LEADER_METADATA, "http://b:7700".parse().unwrap());
        assert_eq!(leader_hint(&other), None, "only on UNAVAILABLE");
        assert_eq!(leader_hint(&tonic::Status::unavailable("down")), None);
    }

    #[tokio::test]
    async fn addresses_stay_single_targets() {
        assert_eq!(
            targets("http://127.0.0.1:1,https://[::1]:2").await,
            vec![
                Target::url("http://127.0.0.1:1"),
                Target::url("https://[::1]:2")
            ]
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        let b = BearerToken::new(Some(&s)).unwrap();
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
