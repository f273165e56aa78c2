//! The cloud around the fleet: SaladCloud's instance metadata service (IMDS)
//! on the worker, and its public API on the coordinator, so that the fleet
//! heals and scales with its cache in mind. Nothing here is required: without
//! `[worker.cloud] enabled` and `[coordinator.cloud.api]` credentials, no
//! cloud is called and the wire carries nothing new (docs/saladcloud.md).
//!
//! What lives here:
//! - `config`: the `[coordinator.cloud]` (with `[coordinator.cloud.api]`)
//!   and `[worker.cloud]` tables.
//! - `http`: bounded, retried JSON calls whose errors name the endpoint and
//!   never carry a credential; `imds` and `api` are the two clients on it.
//! - `cost`, `judge`, `scale`: pure decisions (no I/O, no tokio), shared with
//!   the simulator: the deletion cost of each worker, which nodes are bad,
//!   how many workers the fleet wants.
//! - `steward`: the coordinator's side, which keeps the state those
//!   decisions need and says what to send; `watch`: the background task
//!   that asks the API about silent workers' instances (the coordinator never
//!   waits on it).
//! - `agent`: the worker's side, which sets the advised deletion cost and
//!   reallocates when told.
//!
//! The coordinator's services call into `steward` (src/coordinator/cloud.rs
//! carries out what it says); the worker's session calls into `agent`. This
//! module knows no tonic or protobuf.

pub mod agent;
pub mod api;
pub mod config;
pub mod cost;
mod http;
pub mod imds;
pub mod judge;
pub mod scale;
pub mod steward;
pub mod watch;

pub use config::{CloudConfig, SaladApiConfig, WorkerCloudConfig};
pub use steward::Steward;

use crate::error::{Error, Result};

/// Which cloud machine a worker runs on (workers.proto `Hello.cloud`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CloudInstance {
    /// SaladCloud's `SALAD_MACHINE_ID`.
    pub machine_id: String,
    /// SaladCloud's `SALAD_CONTAINER_GROUP_ID`; empty when unknown.
    pub container_group_id: String,
}

impl CloudInstance {
    /// Checks the ids: a machine id is required, both are short printable
    /// ASCII (they go into logs and are compared with the API's).
    pub fn new(machine_id: String, container_group_id: String) -> Result<Self> {
        let ok =
            |s: &str| s.len() <= config::MAX_ID_BYTES && s.bytes().all(|b| b.is_ascii_graphic());
        if machine_id.is_empty() || !ok(&machine_id) {
            return Err(Error::invalid(
                "hello.cloud.machine_id",
                format!("must be 1-{} printable ASCII bytes", config::MAX_ID_BYTES),
            ));
        }
        if !ok(&container_group_id) {
            return Err(Error::invalid(
                "hello.cloud.container_group_id",
                format!(
                    "must be at most {} printable ASCII bytes",
                    config::MAX_ID_BYTES
                ),
            ));
        }
        Ok(Self {
            machine_id,
            container_group_id,
        })
    }
}

/// The largest deletion cost set (the API's limit for an instance's
/// `deletion_cost`; IMDS takes any int32).
pub const MAX_DELETION_COST: i32 = 100_000;

/// Longest reason sent with a reallocation (IMDS's limit).
pub const MAX_REASON_BYTES: usize = 1000;

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_checked() {
        assert!(CloudInstance::new("m-1".into(), String::new()).is_ok());
        let e = CloudInstance::new(String::new(), "g".into()).unwrap_err();
        assert!(e.to_string().contains("machine_id"), "{e}");
        let e = CloudInstance::new("m 1".into(), "g".into()).unwrap_err();
        assert!(e.to_string().contains("machine_id"), "{e}");
        let e = CloudInstance::new("m".into(), "g".repeat(200)).unwrap_err();
        assert!(e.to_string().contains("container_group_id"), "{e}");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
