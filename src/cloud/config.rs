//! The cloud tables of the config file: `[coordinator.cloud]` (policy:
//! deletion-cost advice, bad nodes, the desired-workers signal), its
//! `[coordinator.cloud.api]` (SaladCloud's public API), and `[worker.cloud]`
//! (SaladCloud's instance metadata service). Every key gets a flag and a
//! `CORRAL_*` variable like any other (src/cli/overrides.rs): the
//! coordinator's `api.key` is `--cloud-api-key` / `CORRAL_CLOUD_API_KEY`,
//! the worker's `enabled` is `--cloud-enabled` / `CORRAL_CLOUD_ENABLED`.
//!
//! Nothing here is required: with the defaults, no cloud is called and the
//! wire carries nothing new.

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::error::{Error, Result};

/// `[coordinator.cloud]`: what the coordinator decides about cloud workers
/// (those that sent `CloudInstance`) and the `corral_desired_workers` gauge.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// Seconds between evaluations of deletion costs and bad nodes; Advice
    /// goes to a worker at most this often. Default: 5.
    pub advice_interval_s: f64,
    /// Seconds ahead over which a model's demand counts toward the cost of
    /// losing its copies. Default: 600.
    pub cost_horizon_s: f64,
    /// Seconds of fleet work one running job counts for in a deletion cost
    /// (it is lost and redone elsewhere). Default: 30.
    pub cost_running_job_s: f64,
    /// A model's only copy counts this many times a copy among several (the
    /// next request for it waits for a download). Default: 3.
    pub cost_alone_factor: f64,
    /// Judge nodes bad and tell them to reallocate. Default: true.
    pub bad_nodes: bool,
    /// A node whose measured download throughput is in the fleet's bottom
    /// this many percent ... Default: 5.
    pub bad_bandwidth_percentile: f64,
    /// ... and below this fraction of the fleet's median ... Default: 0.25.
    pub bad_bandwidth_median_ratio: f64,
    /// ... for this many seconds in a row is bad. Default: 600.
    pub bad_bandwidth_sustain_s: f64,
    /// Fewest workers with a measured throughput before any is judged by
    /// it. Default: 10.
    pub bad_bandwidth_min_workers: u32,
    /// A node with this many load or inference failures ... Default: 3.
    pub bad_failures: u32,
    /// ... within this many seconds is bad. Default: 600.
    pub bad_failures_window_s: f64,
    /// A node whose cache budget (Hello.cache_max_bytes) is smaller is bad;
    /// 0: no minimum. Default: 0.
    pub min_disk_bytes: u64,
    /// Most nodes told to reallocate per hour, fleet-wide: a wrong judgement
    /// must not cycle the whole fleet (reallocated-from nodes are excluded
    /// from the container group for a while). Default: 10.
    pub max_reallocations_per_hour: u32,
    /// Bounds of `corral_desired_workers`. Default: 1.
    pub min_workers: u32,
    /// Default: 100.
    pub max_workers: u32,
    /// Seconds the signal must have stayed lower before it goes down (it
    /// goes up at once). Default: 300.
    pub scale_down_cooldown_s: f64,
    /// Seconds from asking for a node to its first job: allocation, image
    /// pull, start. Queued work is spread over this plus
    /// `scale_target_drain_s`. Default: 600.
    pub cold_start_s: f64,
    /// Seconds within which queued work should be done, beyond the cold
    /// start. Default: 300.
    pub scale_target_drain_s: f64,
    /// Busy workers (arrival rate x mean job time) are multiplied by this.
    /// Default: 1.25.
    pub scale_headroom: f64,
    /// Mean job seconds assumed before any job has completed. Default: 10.
    pub default_job_s: f64,
    /// SaladCloud's public API (`[coordinator.cloud.api]`). Default: off.
    pub api: SaladApiConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            advice_interval_s: 5.0,
            cost_horizon_s: 600.0,
            cost_running_job_s: 30.0,
            cost_alone_factor: 3.0,
            bad_nodes: true,
            bad_bandwidth_percentile: 5.0,
            bad_bandwidth_median_ratio: 0.25,
            bad_bandwidth_sustain_s: 600.0,
            bad_bandwidth_min_workers: 10,
            bad_failures: 3,
            bad_failures_window_s: 600.0,
            min_disk_bytes: 0,
            max_reallocations_per_hour: 10,
            min_workers: 1,
            max_workers: 100,
            scale_down_cooldown_s: 300.0,
            cold_start_s: 600.0,
            scale_target_drain_s: 300.0,
            scale_headroom: 1.25,
            default_job_s: 10.0,
            api: SaladApiConfig::default(),
        }
    }
}

fn positive(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!("{name} must be a positive number")))
    }
}

fn non_negative(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!("{name} must be 0 or more")))
    }
}

impl CloudConfig {
    pub fn validate(&self) -> Result<()> {
        positive("cloud.advice_interval_s", self.advice_interval_s)?;
        positive("cloud.cost_horizon_s", self.cost_horizon_s)?;
        non_negative("cloud.cost_running_job_s", self.cost_running_job_s)?;
        if !(self.cost_alone_factor.is_finite() && self.cost_alone_factor >= 1.0) {
            return Err(Error::Config(
                "cloud.cost_alone_factor must be at least 1".into(),
            ));
        }
        if !(self.bad_bandwidth_percentile > 0.0 && self.bad_bandwidth_percentile < 50.0) {
            return Err(Error::Config(
                "cloud.bad_bandwidth_percentile must be in (0, 50)".into(),
            ));
        }
        if !(self.bad_bandwidth_median_ratio > 0.0 && self.bad_bandwidth_median_ratio <= 1.0) {
            return Err(Error::Config(
                "cloud.bad_bandwidth_median_ratio must be in (0, 1]".into(),
            ));
        }
        positive(
            "cloud.bad_bandwidth_sustain_s",
            self.bad_bandwidth_sustain_s,
        )?;
        positive("cloud.bad_failures_window_s", self.bad_failures_window_s)?;
        if self.bad_failures == 0 {
            return Err(Error::Config(
                "cloud.bad_failures must be at least 1".into(),
            ));
        }
        if self.min_workers > self.max_workers || self.max_workers == 0 {
            return Err(Error::Config(
                "cloud.min_workers must be at most cloud.max_workers, which must be at least 1"
                    .into(),
            ));
        }
        non_negative("cloud.scale_down_cooldown_s", self.scale_down_cooldown_s)?;
        non_negative("cloud.cold_start_s", self.cold_start_s)?;
        positive("cloud.scale_target_drain_s", self.scale_target_drain_s)?;
        if !(self.scale_headroom.is_finite() && self.scale_headroom >= 1.0) {
            return Err(Error::Config(
                "cloud.scale_headroom must be at least 1".into(),
            ));
        }
        positive("cloud.default_job_s", self.default_job_s)?;
        self.api.validate()
    }
}

/// `[coordinator.cloud.api]`: SaladCloud's public API, for the instance of a
/// silent worker and, optionally, the container group's replica count. Off
/// unless `api_key`, `organization`, `project` and `container_group` are
/// all set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SaladApiConfig {
    /// Base URL. Default: https://api.salad.com/api/public.
    pub url: String,
    /// API key, sent as `Salad-Api-Key`; never logged. Default: none.
    pub key: Option<Secret>,
    /// Organization name. Default: none.
    pub organization: Option<String>,
    /// Project name. Default: none.
    pub project: Option<String>,
    /// The container group the workers run in (its name). Default: none.
    pub container_group: Option<String>,
    /// Seconds one API request may take. Default: 5.
    pub timeout_s: f64,
    /// Seconds the list of instances is reused for. Default: 2.
    pub cache_s: f64,
    /// Set the container group's replica count to `corral_desired_workers`
    /// (within cloud.min_workers and cloud.max_workers). Default: false.
    pub set_replicas: bool,
    /// Seconds between replica-count updates, at least. Default: 60.
    pub replicas_interval_s: f64,
}

impl Default for SaladApiConfig {
    fn default() -> Self {
        Self {
            url: "https://api.salad.com/api/public".into(),
            key: None,
            organization: None,
            project: None,
            container_group: None,
            timeout_s: 5.0,
            cache_s: 2.0,
            set_replicas: false,
            replicas_interval_s: 60.0,
        }
    }
}

/// Where a container group lives, with the key to reach it.
#[derive(Clone, Debug)]
pub struct GroupRef {
    pub api_url: String,
    pub api_key: Secret,
    pub organization: String,
    pub project: String,
    pub container_group: String,
}

impl SaladApiConfig {
    /// The group to call the API about; `None` when the API is off.
    pub fn group(&self) -> Option<GroupRef> {
        let key = self.key.clone().filter(|k| !k.is_empty())?;
        Some(GroupRef {
            api_url: self.url.trim_end_matches('/').to_owned(),
            api_key: key,
            organization: self.organization.clone()?,
            project: self.project.clone()?,
            container_group: self.container_group.clone()?,
        })
    }

    pub fn validate(&self) -> Result<()> {
        positive("cloud.api.timeout_s", self.timeout_s)?;
        non_negative("cloud.api.cache_s", self.cache_s)?;
        positive("cloud.api.replicas_interval_s", self.replicas_interval_s)?;
        let named = [&self.organization, &self.project, &self.container_group];
        let keyed = self.key.as_ref().is_some_and(|k| !k.is_empty());
        if keyed && named.iter().any(|n| n.is_none()) {
            return Err(Error::Config(
                "cloud.api.key is set: cloud.api.organization, cloud.api.project and \
                 cloud.api.container_group are needed too"
                    .into(),
            ));
        }
        for (what, v) in [
            ("cloud.api.organization", &self.organization),
            ("cloud.api.project", &self.project),
            ("cloud.api.container_group", &self.container_group),
        ] {
            if let Some(v) = v {
                if !valid_name(v) {
                    return Err(Error::Config(format!(
                        "{what} {v:?} must be 2-63 lowercase letters, digits or '-', \
                         starting with a letter"
                    )));
                }
            }
        }
        if self.set_replicas && !keyed {
            return Err(Error::Config(
                "cloud.api.set_replicas needs cloud.api.key (and the group's names)".into(),
            ));
        }
        url::Url::parse(&self.url)
            .map_err(|e| Error::Config(format!("cloud.api.url {:?}: {e}", self.url)))?;
        Ok(())
    }
}

/// SaladCloud's names: `^[a-z][a-z0-9-]{0,61}[a-z0-9]$`. They go into URL
/// paths, so nothing else is let through.
fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// `[worker.cloud]`: SaladCloud's instance metadata service (IMDS).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerCloudConfig {
    /// Announce this worker's machine to the coordinator and act on its
    /// advice through IMDS (deletion cost, reallocation). Default: false.
    pub enabled: bool,
    /// IMDS base URL. Default: http://169.254.169.254.
    pub imds_url: String,
    /// Seconds between deletion-cost updates, at least. Default: 5.
    pub deletion_cost_interval_s: f64,
    /// Seconds one IMDS request may take. Default: 2.
    pub imds_timeout_s: f64,
    /// The machine id to announce. Default: $SALAD_MACHINE_ID, else the
    /// `salad_machine_id` claim of IMDS's identity token.
    pub machine_id: Option<String>,
    /// The container group id to announce. Default:
    /// $SALAD_CONTAINER_GROUP_ID, else the token's `salad_container_group_id`.
    pub container_group_id: Option<String>,
}

impl Default for WorkerCloudConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            imds_url: super::imds::DEFAULT_URL.into(),
            deletion_cost_interval_s: 5.0,
            imds_timeout_s: 2.0,
            machine_id: None,
            container_group_id: None,
        }
    }
}

/// Longest id accepted in `CloudInstance`.
pub const MAX_ID_BYTES: usize = 128;

impl WorkerCloudConfig {
    pub fn validate(&self) -> Result<()> {
        positive(
            "cloud.deletion_cost_interval_s",
            self.deletion_cost_interval_s,
        )?;
        positive("cloud.imds_timeout_s", self.imds_timeout_s)?;
        url::Url::parse(&self.imds_url)
            .map_err(|e| Error::Config(format!("cloud.imds_url {:?}: {e}", self.imds_url)))?;
        Ok(())
    }

    /// The ids the config or SaladCloud's variables give (machine id,
    /// container group id), either possibly missing: the agent then reads
    /// them from IMDS's identity token (src/cloud/agent.rs).
    pub fn configured_ids(&self) -> (Option<String>, Option<String>) {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let machine = self
            .machine_id
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| var("SALAD_MACHINE_ID"));
        let group = self
            .container_group_id
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| var("SALAD_CONTAINER_GROUP_ID"));
        (machine, group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_the_api_is_off() {
        CloudConfig::default().validate().unwrap();
        SaladApiConfig::default().validate().unwrap();
        WorkerCloudConfig::default().validate().unwrap();
        assert!(SaladApiConfig::default().group().is_none());
    }

    #[test]
    fn an_api_key_needs_the_group_names() {
        let mut c = SaladApiConfig {
            key: Some(Secret::new("k-0123456789")),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("organization"));
        c.organization = Some("acme".into());
        c.project = Some("prod".into());
        c.container_group = Some("Bad_Name".into());
        assert!(c.validate().unwrap_err().to_string().contains("Bad_Name"));
        c.container_group = Some("corral-workers".into());
        c.validate().unwrap();
        let g = c.group().unwrap();
        assert_eq!(g.container_group, "corral-workers");
        assert!(!format!("{c:?}").contains("0123456789"));
    }

    #[test]
    fn the_tables_parse_from_the_file_and_unknown_keys_are_refused() {
        let c: crate::config::FileConfig = toml::from_str(
            "[coordinator.cloud]\nmin_workers = 2\nmax_workers = 9\n\
             [coordinator.cloud.api]\nkey = \"k-0123456789abcdef\"\norganization = \"acme\"\n\
             project = \"prod\"\ncontainer_group = \"corral-workers\"\nset_replicas = true\n\
             [worker.cloud]\nenabled = true\nmachine_id = \"m-1\"\n",
        )
        .unwrap();
        let cloud = &c.coordinator.cloud;
        assert_eq!((cloud.min_workers, cloud.max_workers), (2, 9));
        cloud.validate().unwrap();
        assert_eq!(cloud.api.group().unwrap().organization, "acme");
        assert!(c.worker.cloud.enabled);
        assert_eq!(c.worker.cloud.machine_id.as_deref(), Some("m-1"));
        let e = toml::from_str::<crate::config::FileConfig>(
            "[coordinator.cloud.api]\napi_key = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("api_key"), "{e}");
        // Without the tables: no API, no IMDS.
        let c: crate::config::FileConfig = toml::from_str("").unwrap();
        assert!(c.coordinator.cloud.api.group().is_none());
        assert!(!c.worker.cloud.enabled);
    }

    #[test]
    fn names_follow_saladclouds_rule() {
        for ok in ["ab", "corral-1", "a1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["a", "1a", "a-", "A1", "a/b", "a..b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
