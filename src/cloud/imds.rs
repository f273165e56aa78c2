//! SaladCloud's instance metadata service (IMDS): a REST API at
//! `http://169.254.169.254:80` reachable only from inside a container
//! instance. Every request carries `Metadata: true` and no `X-Forwarded-*`
//! header, and never goes through a proxy; IMDS refuses anything else with
//! 403. Bodies are JSON; errors are problem details.
//!
//! Endpoints (SaladCloud IMDS 0.9.0-alpha): `GET /v1/status` ->
//! `{"ready","started"}`; `GET /v1/token` -> `{"jwt"}`; `POST /v1/reallocate`
//! with `{"reason"}` (1-1000 characters) -> 204; `POST /v1/recreate` and
//! `POST /v1/restart` -> 204; `GET /v1/deletion-cost` -> `{"deletion_cost"}`;
//! `PUT /v1/deletion-cost` with `{"deletion_cost"}` (int32) -> 200 with the
//! body, or 204 in later versions.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::http::JsonClient;
use crate::error::{Error, Result};

/// The default base URL.
pub const DEFAULT_URL: &str = "http://169.254.169.254";

/// `GET /v1/status`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Status {
    /// The readiness probe's latest result (true without a probe).
    pub ready: bool,
    /// The startup probe's latest result (true without a probe).
    pub started: bool,
}

#[derive(Deserialize, Serialize)]
struct DeletionCost {
    deletion_cost: i32,
}

#[derive(Deserialize)]
struct Token {
    jwt: String,
}

#[derive(Serialize)]
struct Reallocate<'a> {
    reason: &'a str,
}

/// The identity token's claims Corral reads (SaladCloud's JWT
/// authentication guide names them).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub salad_machine_id: Option<String>,
    pub salad_container_group_id: Option<String>,
}

/// The claims of an identity token, read without verifying its signature
/// (the token came from this machine's IMDS; nothing is granted by it).
pub fn claims(token: &crate::auth::Secret) -> Result<Claims> {
    use base64::Engine as _;
    let bad = |why: &str| Error::Unavailable(format!("IMDS GET /v1/token: {why}"));
    let payload = token
        .expose()
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("the token is not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| bad("the token's payload is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| bad("the token's payload is not a JSON object"))
}

/// An IMDS client.
#[derive(Clone, Debug)]
pub struct Imds {
    http: JsonClient,
}

const JSON: &str = "application/json";

impl Imds {
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self> {
        let mut headers = HeaderMap::new();
        headers.insert("Metadata", HeaderValue::from_static("true"));
        Ok(Self {
            http: JsonClient::new("IMDS", base_url, timeout, headers, true)?,
        })
    }

    pub async fn status(&self) -> Result<Status> {
        let r = self.http.call(Method::GET, "/v1/status", None).await?;
        self.http.parse(Method::GET, "/v1/status", &r)
    }

    /// The instance's identity token (a JWT); never logged.
    pub async fn token(&self) -> Result<crate::auth::Secret> {
        let r = self.http.call(Method::GET, "/v1/token", None).await?;
        let t: Token = self.http.parse(Method::GET, "/v1/token", &r)?;
        Ok(crate::auth::Secret::new(t.jwt))
    }

    pub async fn deletion_cost(&self) -> Result<i32> {
        let r = self
            .http
            .call(Method::GET, "/v1/deletion-cost", None)
            .await?;
        let c: DeletionCost = self.http.parse(Method::GET, "/v1/deletion-cost", &r)?;
        Ok(c.deletion_cost)
    }

    pub async fn set_deletion_cost(&self, cost: i32) -> Result<()> {
        let body = serde_json::to_vec(&DeletionCost {
            deletion_cost: cost,
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        self.http
            .call(Method::PUT, "/v1/deletion-cost", Some((JSON, body)))
            .await?;
        Ok(())
    }

    /// Asks SaladCloud to move this container instance to another machine.
    /// `reason` (cut to 1000 bytes) is reported to SaladCloud support.
    pub async fn reallocate(&self, reason: &str) -> Result<()> {
        let reason = super::truncate(reason.trim(), super::MAX_REASON_BYTES);
        let reason = if reason.is_empty() {
            "unspecified"
        } else {
            reason
        };
        let body = serde_json::to_vec(&Reallocate { reason })
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.http
            .call(Method::POST, "/v1/reallocate", Some((JSON, body)))
            .await?;
        Ok(())
    }

    /// Recreates the container on the same machine (a fresh container).
    pub async fn recreate(&self) -> Result<()> {
        self.http.call(Method::POST, "/v1/recreate", None).await?;
        Ok(())
    }

    /// Restarts the container on the same machine, its files kept.
    pub async fn restart(&self) -> Result<()> {
        self.http.call(Method::POST, "/v1/restart", None).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;

    #[test]
    fn token_claims_are_read_and_junk_is_named() {
        // {"sub":"m-1","salad_machine_id":"m-1","salad_container_group_id":"g-1"}
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtLTEiLCJzYWxhZF9tYWNoaW5lX2lkIjoibS0xIiwic2FsYWRfY29udGFpbmVyX2dyb3VwX2lkIjoiZy0xIn0.c2ln";
        let c = claims(&Secret::new(jwt)).unwrap();
        assert_eq!(c.salad_machine_id.as_deref(), Some("m-1"));
        assert_eq!(c.salad_container_group_id.as_deref(), Some("g-1"));
        // {"sub":"x"}: no Salad claims.
        let c = claims(&Secret::new("e30.eyJzdWIiOiJ4In0.c2ln")).unwrap();
        assert_eq!(c, Claims::default());
        for bad in ["not-a-jwt", "a.!!!.c", "a.bm90IGpzb24.c"] {
            let e = claims(&Secret::new(bad)).unwrap_err().to_string();
            assert!(e.contains("IMDS GET /v1/token"), "{e}");
        }
    }
}
