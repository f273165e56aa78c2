//! SaladCloud's public REST API (0.9.0-alpha), the few calls Corral makes:
//! a container group (its id and replica count), its instances (which
//! machine each runs on and in what state), and setting its replica count.
//! Every request carries the key in the `Salad-Api-Key` header (marked
//! sensitive, never logged); errors are problem details.
//!
//! Paths under the base URL (default `https://api.salad.com/api/public`):
//! - `GET  /organizations/{org}/projects/{project}/containers/{group}`
//! - `PATCH` the same, `application/merge-patch+json`, `{"replicas": n}`
//! - `GET  .../containers/{group}/instances` -> `{"instances": [...]}`
//! - `GET  .../containers/{group}/instances/{instance_id}`

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::config::GroupRef;
use super::http::JsonClient;
use crate::error::{Error, Result};

/// An instance's state, as the API names it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Allocating,
    Downloading,
    Creating,
    Running,
    Stopping,
    /// A state this client does not know yet.
    #[serde(other)]
    Unknown,
}

impl InstanceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allocating => "allocating",
            Self::Downloading => "downloading",
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Unknown => "unknown",
        }
    }
}

/// One container group instance (the fields Corral reads).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Instance {
    /// The instance id (`instance_id` in the API's earliest versions).
    #[serde(alias = "instance_id")]
    pub id: String,
    /// The machine it runs on (what workers report as `machine_id`).
    pub machine_id: String,
    pub state: InstanceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_cost: Option<i64>,
}

#[derive(Deserialize)]
struct Instances {
    instances: Vec<Instance>,
}

/// A container group (the fields Corral reads).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ContainerGroup {
    /// What instances see as `SALAD_CONTAINER_GROUP_ID`.
    pub id: String,
    pub name: String,
    pub replicas: u32,
}

#[derive(Serialize)]
struct ReplicasPatch {
    replicas: u32,
}

/// A client for one container group.
#[derive(Clone, Debug)]
pub struct SaladApi {
    http: JsonClient,
    group_path: String,
    group: String,
}

impl SaladApi {
    pub fn new(g: &GroupRef, timeout: Duration) -> Result<Self> {
        let mut key = HeaderValue::from_str(g.api_key.expose()).map_err(|_| {
            Error::Config("salad.api_key has characters not allowed in a header".into())
        })?;
        key.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert("Salad-Api-Key", key);
        Ok(Self {
            http: JsonClient::new("SaladCloud API", &g.api_url, timeout, headers, false)?,
            group_path: format!(
                "/organizations/{}/projects/{}/containers/{}",
                g.organization, g.project, g.container_group
            ),
            group: g.container_group.clone(),
        })
    }

    /// The container group's name.
    pub fn group_name(&self) -> &str {
        &self.group
    }

    pub async fn container_group(&self) -> Result<ContainerGroup> {
        let r = self.http.call(Method::GET, &self.group_path, None).await?;
        self.http.parse(Method::GET, &self.group_path, &r)
    }

    pub async fn instances(&self) -> Result<Vec<Instance>> {
        let path = format!("{}/instances", self.group_path);
        let r = self.http.call(Method::GET, &path, None).await?;
        let list: Instances = self.http.parse(Method::GET, &path, &r)?;
        Ok(list.instances)
    }

    /// One instance; `None` when the API does not know it (404).
    pub async fn instance(&self, id: &str) -> Result<Option<Instance>> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::invalid(
                "instance_id",
                format!("{id:?} is not an id"),
            ));
        }
        let path = format!("{}/instances/{id}", self.group_path);
        let r = self.http.send(Method::GET, &path, None).await?;
        if r.status == 404 {
            return Ok(None);
        }
        let r = self.http.check(&Method::GET, &path, r)?;
        self.http.parse(Method::GET, &path, &r).map(Some)
    }

    /// Sets the container group's replica count.
    pub async fn set_replicas(&self, replicas: u32) -> Result<ContainerGroup> {
        let body = serde_json::to_vec(&ReplicasPatch { replicas })
            .map_err(|e| Error::Internal(e.to_string()))?;
        let r = self
            .http
            .call(
                Method::PATCH,
                &self.group_path,
                Some(("application/merge-patch+json", body)),
            )
            .await?;
        self.http.parse(Method::PATCH, &self.group_path, &r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_parse_with_unknown_states_and_fields() {
        let body = r#"{"instances":[
            {"id":"i-1","machine_id":"m-1","state":"running","ready":true,
             "update_time":"2025-01-01T00:00:00Z","version":3},
            {"id":"i-2","machine_id":"m-2","state":"hibernating",
             "update_time":"2025-01-01T00:00:00Z","version":3}]}"#;
        let l: Instances = serde_json::from_str(body).unwrap();
        assert_eq!(l.instances[0].state, InstanceState::Running);
        assert_eq!(l.instances[1].state, InstanceState::Unknown);
        // The earliest API versions named the id `instance_id`.
        let old = r#"{"instance_id":"i-3","machine_id":"m-3","state":"stopping"}"#;
        let i: Instance = serde_json::from_str(old).unwrap();
        assert_eq!((i.id.as_str(), i.state), ("i-3", InstanceState::Stopping));
    }
}
