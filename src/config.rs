//! Configuration: a TOML file (`--config`), overridden by flags and
//! `CORRAL_*` environment variables (clap reads both). Unknown keys in the
//! file are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::error::{Error, Result};
use crate::scheduler::{CostModel, SchedulerConfig};

/// The whole file: one table per role.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Tokens; see `AuthConfig`. The coordinator refuses to start without
    /// this table unless given `--insecure-no-auth`.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

/// The `[auth]` table: who may call the coordinator (docs/security.md).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept every call without a token; for local use only. Default: false.
    pub disabled: bool,
    /// Tokens for the Admin service; they may also see every job. Default: none.
    pub admin_tokens: Vec<Secret>,
    /// Tokens for `Workers.Connect`. Default: none.
    pub worker_tokens: Vec<Secret>,
    /// API keys for the Jobs service; a client sees only its own jobs. Default: none.
    pub clients: Vec<ClientKey>,
    /// Worker tokens bound to worker ids (`[[auth.workers]]`): a worker
    /// presenting one may say Hello only with an id its patterns allow.
    /// Tokens in `worker_tokens` may use any id. Default: none.
    pub workers: Vec<WorkerKey>,
}

/// A worker token and the worker ids it may use (`[[auth.workers]]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerKey {
    pub token: Secret,
    /// Worker id patterns: an exact id, or a pattern where `*` stands for
    /// any run of characters (`gpu-*`, `*-eu-west`). At least one.
    pub ids: Vec<String>,
}

/// Whether worker id `id` matches `pattern` (`*`: any run of characters).
pub fn worker_id_matches(pattern: &str, id: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = id.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no '*': an exact id
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// One client of the Jobs service (`[[auth.clients]]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientKey {
    /// Stored with each job it submits: letters, digits, `.`, `_`, `-`.
    pub name: String,
    pub key: Secret,
}

/// Shortest token or key accepted.
const MIN_TOKEN_BYTES: usize = 16;

impl AuthConfig {
    /// No tokens needed (`--insecure-no-auth`, tests).
    pub fn disabled() -> Self {
        Self {
            disabled: true,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.disabled {
            return Ok(());
        }
        let mut seen = std::collections::HashSet::new();
        let all = self
            .admin_tokens
            .iter()
            .chain(&self.worker_tokens)
            .chain(self.workers.iter().map(|w| &w.token))
            .chain(self.clients.iter().map(|c| &c.key));
        for t in all {
            if t.expose().len() < MIN_TOKEN_BYTES {
                return Err(Error::Config(format!(
                    "auth: tokens and keys must be at least {MIN_TOKEN_BYTES} bytes"
                )));
            }
            if !t.expose().bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Config(
                    "auth: tokens and keys must be printable ASCII without spaces".into(),
                ));
            }
            if !seen.insert(t.expose()) {
                return Err(Error::Config(
                    "auth: a token or key is listed twice; each must name one role".into(),
                ));
            }
        }
        for w in &self.workers {
            if w.ids.is_empty() {
                return Err(Error::Config(
                    "auth.workers: each token needs at least one id pattern in `ids`".into(),
                ));
            }
            for p in &w.ids {
                let ok = !p.is_empty()
                    && p.len() <= 256
                    && !p.chars().any(|c| c.is_control() || c == '/' || c == '\\');
                if !ok {
                    return Err(Error::Config(format!(
                        "auth.workers: id pattern {p:?} must be 1-256 characters without \
                         control characters or path separators"
                    )));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.clients {
            let ok = !c.name.is_empty()
                && c.name.len() <= 64
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(Error::Config(format!(
                    "auth: client name {:?} must be 1-64 letters, digits, '.', '_' or '-'",
                    c.name
                )));
            }
            if !names.insert(c.name.as_str()) {
                return Err(Error::Config(format!(
                    "auth: client {:?} is listed twice",
                    c.name
                )));
            }
        }
        Ok(())
    }
}

impl FileConfig {
    /// Reads a TOML file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}

/// Limits on what clients may ask for and what workers may report.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobLimits {
    /// Smallest width and height in pixels. Default: 64.
    pub min_side_px: u32,
    /// Largest width and height in pixels. Default: 2048.
    pub max_side_px: u32,
    /// Most denoising steps. Default: 150.
    pub max_steps: u32,
    /// Largest classifier-free guidance scale. Default: 30.
    pub max_guidance: f32,
    /// Most images per job. Default: 8.
    pub max_images: u32,
    /// Longest prompt or negative prompt, in bytes. Default: 4096.
    pub max_prompt_bytes: usize,
    /// Most jobs queued or running at once. Default: 100000.
    pub max_unfinished_jobs: usize,
    /// Most jobs one client may have queued or running at once. Default: 10000.
    pub max_unfinished_jobs_per_client: usize,
    /// Most models a worker may list in one report (Hello or Heartbeat),
    /// in VRAM and on disk, each; a longer list closes its stream with
    /// RESOURCE_EXHAUSTED. Default: 10000.
    pub max_worker_models: usize,
    /// Most downloads in progress a worker may list in one report. Default: 1000.
    pub max_worker_downloads: usize,
    /// Most running attempts a worker may list in one report. Default: 1000.
    pub max_worker_jobs: usize,
    /// Longest reason a worker may give (JobFailed, PrefetchFailed,
    /// GoingAway), in bytes; longer ones are cut. Default: 8192.
    pub max_worker_reason_bytes: usize,
    /// Most LoRAs one job may name. Default: 8.
    pub max_loras: usize,
    /// Largest LoRA weight, either way. Default: 4.
    pub max_lora_weight: f32,
    /// Largest image-to-image input, in bytes. Default: 16 MiB.
    pub max_init_image_bytes: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            min_side_px: 64,
            max_side_px: 2048,
            max_steps: 150,
            max_guidance: 30.0,
            max_images: 8,
            max_prompt_bytes: 4096,
            max_unfinished_jobs: 100_000,
            max_unfinished_jobs_per_client: 10_000,
            max_worker_models: 10_000,
            max_worker_downloads: 1_000,
            max_worker_jobs: 1_000,
            max_worker_reason_bytes: 8192,
            max_loras: 8,
            max_lora_weight: 4.0,
            max_init_image_bytes: 16 << 20,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC address. Default: 127.0.0.1:7700.
    pub listen: SocketAddr,
    /// Where the coordinator keeps its state. Default: ./corral-data.
    pub data_dir: PathBuf,
    /// The job store: none (or empty) for the embedded store under
    /// `data_dir`; a `postgres://` URL for PostgreSQL, shared by every
    /// coordinator of a group, one of which leads (docs/ha.md). Put the
    /// password in `PGPASSWORD`, not in the URL. Default: none.
    pub store: Option<Secret>,
    /// The URL workers and clients reach this coordinator at; followers
    /// send callers to the leader's. Default: `http://` (`https://` with
    /// TLS) and `listen`, with the host name when `listen` is 0.0.0.0 or
    /// [::], and the bound port when `listen` has port 0.
    pub advertise_url: Option<String>,
    /// Seconds a leader's lease lasts without renewal (PostgreSQL store);
    /// it renews every fifth of it, and a follower takes over within about
    /// this long after the leader stops (at once when its process died).
    /// Default: 5.
    pub leader_lease_s: f64,
    /// How often workers heartbeat. Default: 5.
    pub heartbeat_interval_s: f64,
    /// Missed heartbeat intervals before a worker is dead. Default: 3.
    pub heartbeat_missed: u32,
    /// Failed attempts before a job ends failed. Default: 3.
    pub max_attempts: u32,
    /// Seconds a job may wait before any capable worker takes it. Default: 60.
    pub starvation_s: f64,
    /// Largest gRPC message, either way (images are large). Default: 64 MiB.
    pub max_message_bytes: usize,
    /// Finished jobs (records and result images) are kept this long. Default: 86400.
    pub result_retention_s: u64,
    /// Most worker streams connected at once. Default: 10000.
    pub max_worker_streams: usize,
    /// PEM certificate chain; with `tls_key`, the gRPC port speaks TLS. Default: none.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`. Default: none.
    pub tls_key: Option<PathBuf>,
    /// HTTP address for `/metrics` and the cluster page `/`; none: no HTTP port. Default: none.
    pub http_listen: Option<SocketAddr>,
    /// Bearer token required by `/metrics` and `/api/cluster` on the HTTP
    /// port (`Authorization: Bearer <token>`; the cluster page takes it
    /// from its URL fragment, `/#token=...`); none: no token. Default: none.
    pub http_token: Option<Secret>,
    /// Most connections open at once on the gRPC port; one more is closed
    /// as soon as it is accepted. Default: none: the process's open-file
    /// limit less a reserve of max(64, limit / 8) for the store and logs.
    pub max_connections: Option<usize>,
    /// Seconds a new gRPC connection has to finish its TLS handshake,
    /// send the HTTP/2 preface and start its first call before it is
    /// closed. Default: 10.
    pub handshake_timeout_s: f64,
    /// Seconds a connection may stay open with no call in progress before
    /// it is closed (clients reconnect on their next call). Default: 300.
    pub idle_timeout_s: f64,
    /// Local (`file://` or absolute path) model sources are accepted only
    /// under this directory, unless `local_sources_anywhere`. Default: none.
    pub local_source_root: Option<PathBuf>,
    /// Accept local model sources anywhere. Default: true with
    /// authentication disabled, false with it on (a client with an admin
    /// token could otherwise make workers read any directory).
    pub local_sources_anywhere: Option<bool>,
    pub limits: JobLimits,
    /// The scheduler's tunables (`[coordinator.scheduler]`).
    pub scheduler: SchedulerTunables,
    /// Cloud workers: deletion-cost advice, bad nodes, the desired-workers
    /// signal, SaladCloud's API (`[coordinator.cloud]` and
    /// `[coordinator.cloud.api]`, src/cloud/config.rs). Default: no API.
    pub cloud: crate::cloud::CloudConfig,
    /// The file's `[auth]` table (or `--insecure-no-auth`); required.
    #[serde(skip)]
    pub auth: Option<AuthConfig>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".parse().expect("valid address"),
            data_dir: PathBuf::from("corral-data"),
            store: None,
            advertise_url: None,
            leader_lease_s: 5.0,
            heartbeat_interval_s: 5.0,
            heartbeat_missed: 3,
            max_attempts: 3,
            starvation_s: 60.0,
            max_message_bytes: 64 << 20,
            result_retention_s: 86_400,
            max_worker_streams: 10_000,
            tls_cert: None,
            tls_key: None,
            http_listen: None,
            http_token: None,
            max_connections: None,
            handshake_timeout_s: 10.0,
            idle_timeout_s: 300.0,
            local_source_root: None,
            local_sources_anywhere: None,
            limits: JobLimits::default(),
            scheduler: SchedulerTunables::default(),
            cloud: Default::default(),
            auth: None,
        }
    }
}

/// The scheduler's tunables, in the file's units (seconds, MB/s, GB/s).
/// The defaults are those the simulator's figures were measured with
/// (docs/sim.md); `corral sim` takes the same keys. Replication: for every
/// model with recent demand the scheduler keeps enough copies on disk to
/// serve its load (arrival rate x generation time, in busy workers) times
/// `replica_headroom`, at least `min_warm_replicas`, within
/// `replica_disk_share` of the fleet's disk, by prefetching.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerTunables {
    /// How many queued models a free worker considers fetching per decision. Default: 32.
    pub cold_scan_models: usize,
    /// Fewest workers that keep a copy of a model with recent demand. Default: 2.
    pub min_warm_replicas: u32,
    /// Copies kept per busy worker's worth of a model's load. Default: 1.5.
    pub replica_headroom: f64,
    /// Demand below this many jobs per hour is not recent: no copies are
    /// kept for it. Default: 6.
    pub recent_demand_per_hour: f64,
    /// Time constant of the fast arrival rate per model (rises quickly). Default: 60.
    pub demand_fast_s: f64,
    /// Time constant of the slow arrival rate per model (forgets slowly). Default: 900.
    pub demand_slow_s: f64,
    /// Seconds between replication rounds. Default: 5.
    pub replicate_interval_s: f64,
    /// Share of the live workers' cache budgets that replica targets may
    /// fill; the rest is the workers' own LRU. Default: 0.8.
    pub replica_disk_share: f64,
    /// Most prefetches per replication round. Default: 256.
    pub max_prefetch_per_round: usize,
    /// Seconds a prefetch not yet in the worker's report counts as a copy. Default: 120.
    pub prefetch_pending_s: f64,
    /// Download rate assumed for a worker that has not measured one, MB/s. Default: 25.
    pub default_download_mb_per_s: f64,
    /// Fixed part of loading a model into VRAM, seconds. Default: 1.5.
    pub load_base_s: f64,
    /// Rate of loading model bytes into VRAM, GB/s. Default: 1.5.
    pub load_gb_per_s: f64,
    /// Generation time assumed before any has been observed, seconds. Default: 5.
    pub default_service_s: f64,
    /// A running attempt is stopped and its job requeued (the attempt
    /// counting as failed) once it has run this many times its expected
    /// length: fetch and load by the worker's tier, then the model's mean
    /// generation time scaled up by the job's steps x images x pixels over
    /// a 30-step 512x512 image. At least 1. Default: 4.
    pub attempt_deadline_factor: f64,
    /// Seconds an attempt may always run, whatever its estimate. Default: 600.
    pub attempt_deadline_floor_s: f64,
    /// Surges (docs/sim.md): time constant of the short arrival rate that
    /// detects them, seconds. Default: 10.
    pub surge_window_s: f64,
    /// Seconds between surge checks (and placements of their copies). Default: 1.
    pub surge_check_s: f64,
    /// A model surges when its short rate is at least this many times its
    /// slow rate; 0 turns the surge response off. Default: 3.
    pub surge_ratio: f64,
    /// ... and it would keep at least this many workers busy. Default: 4.
    pub surge_min_load: f64,
    /// Copies of a surging model per busy worker its rate needs. Default: 1.5.
    pub surge_headroom: f64,
    /// Extra copies clear a surging model's queue within this many seconds. Default: 120.
    pub surge_drain_s: f64,
    /// Most of the live workers one surging model may take, in (0, 1]. Default: 0.5.
    pub surge_max_share: f64,
    /// A surge ends when its short rate stays below this share of its peak,
    /// in (0, 1) ... Default: 0.5.
    pub surge_release_share: f64,
    /// ... for this many seconds. Default: 120.
    pub surge_release_s: f64,
}

impl Default for SchedulerTunables {
    fn default() -> Self {
        let d = SchedulerConfig::default();
        let secs = |ms: u64| ms as f64 / 1e3;
        Self {
            cold_scan_models: d.cold_scan_models,
            min_warm_replicas: d.min_warm_replicas,
            replica_headroom: d.replica_headroom,
            recent_demand_per_hour: d.recent_demand_per_hour,
            demand_fast_s: secs(d.demand_fast_ms),
            demand_slow_s: secs(d.demand_slow_ms),
            replicate_interval_s: secs(d.replicate_interval_ms),
            replica_disk_share: d.replica_disk_share,
            max_prefetch_per_round: d.max_prefetch_per_round,
            prefetch_pending_s: secs(d.prefetch_pending_ms),
            default_download_mb_per_s: d.cost.default_download_bps as f64 / 1e6,
            load_base_s: secs(d.cost.load_base_ms),
            load_gb_per_s: d.cost.load_bps as f64 / 1e9,
            default_service_s: secs(d.cost.default_service_ms),
            attempt_deadline_factor: d.attempt_deadline_factor,
            attempt_deadline_floor_s: secs(d.attempt_deadline_floor_ms),
            surge_window_s: secs(d.surge_window_ms),
            surge_check_s: secs(d.surge_check_ms),
            surge_ratio: d.surge_ratio,
            surge_min_load: d.surge_min_load,
            surge_headroom: d.surge_headroom,
            surge_drain_s: secs(d.surge_drain_ms),
            surge_max_share: d.surge_max_share,
            surge_release_share: d.surge_release_share,
            surge_release_s: secs(d.surge_release_ms),
        }
    }
}

impl SchedulerTunables {
    /// Every value in its range; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("replica_headroom", self.replica_headroom),
            ("demand_fast_s", self.demand_fast_s),
            ("demand_slow_s", self.demand_slow_s),
            ("replicate_interval_s", self.replicate_interval_s),
            ("default_download_mb_per_s", self.default_download_mb_per_s),
            ("load_gb_per_s", self.load_gb_per_s),
            ("default_service_s", self.default_service_s),
            ("attempt_deadline_floor_s", self.attempt_deadline_floor_s),
            ("surge_window_s", self.surge_window_s),
            ("surge_check_s", self.surge_check_s),
            ("surge_headroom", self.surge_headroom),
            ("surge_drain_s", self.surge_drain_s),
            ("surge_release_s", self.surge_release_s),
        ];
        for (k, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::Config(format!(
                    "scheduler.{k} must be a positive number, got {v}"
                )));
            }
        }
        let non_negative = [
            ("recent_demand_per_hour", self.recent_demand_per_hour),
            ("prefetch_pending_s", self.prefetch_pending_s),
            ("load_base_s", self.load_base_s),
            ("surge_ratio", self.surge_ratio),
            ("surge_min_load", self.surge_min_load),
        ];
        for (k, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::Config(format!(
                    "scheduler.{k} must be zero or more, got {v}"
                )));
            }
        }
        let max_share_ok = self.surge_max_share > 0.0 && self.surge_max_share <= 1.0;
        let release_ok = self.surge_release_share > 0.0 && self.surge_release_share < 1.0;
        if !(max_share_ok && release_ok) {
            return Err(Error::Config(
                "scheduler.surge_max_share must be in (0, 1] and scheduler.surge_release_share in (0, 1)"
                    .into(),
            ));
        }
        if !(self.replica_disk_share > 0.0 && self.replica_disk_share <= 1.0) {
            return Err(Error::Config(format!(
                "scheduler.replica_disk_share must be in (0, 1], got {}",
                self.replica_disk_share
            )));
        }
        if !(self.attempt_deadline_factor.is_finite() && self.attempt_deadline_factor >= 1.0) {
            return Err(Error::Config(format!(
                "scheduler.attempt_deadline_factor must be at least 1, got {}",
                self.attempt_deadline_factor
            )));
        }
        if self.demand_fast_s > self.demand_slow_s {
            return Err(Error::Config(
                "scheduler.demand_fast_s must not exceed scheduler.demand_slow_s".into(),
            ));
        }
        if self.cold_scan_models == 0 {
            return Err(Error::Config(
                "scheduler.cold_scan_models must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// These values over `base` (whose liveness fields are kept).
    fn apply(&self, base: SchedulerConfig) -> SchedulerConfig {
        let ms = |s: f64| (s * 1e3).round() as u64;
        SchedulerConfig {
            cold_scan_models: self.cold_scan_models,
            min_warm_replicas: self.min_warm_replicas,
            replica_headroom: self.replica_headroom,
            recent_demand_per_hour: self.recent_demand_per_hour,
            demand_fast_ms: ms(self.demand_fast_s),
            demand_slow_ms: ms(self.demand_slow_s),
            replicate_interval_ms: ms(self.replicate_interval_s),
            replica_disk_share: self.replica_disk_share,
            max_prefetch_per_round: self.max_prefetch_per_round,
            prefetch_pending_ms: ms(self.prefetch_pending_s),
            attempt_deadline_factor: self.attempt_deadline_factor,
            attempt_deadline_floor_ms: ms(self.attempt_deadline_floor_s),
            surge_window_ms: ms(self.surge_window_s),
            surge_check_ms: ms(self.surge_check_s),
            surge_ratio: self.surge_ratio,
            surge_min_load: self.surge_min_load,
            surge_headroom: self.surge_headroom,
            surge_drain_ms: ms(self.surge_drain_s),
            surge_max_share: self.surge_max_share,
            surge_release_share: self.surge_release_share,
            surge_release_ms: ms(self.surge_release_s),
            cost: CostModel {
                default_download_bps: (self.default_download_mb_per_s * 1e6) as u64,
                load_base_ms: ms(self.load_base_s),
                load_bps: (self.load_gb_per_s * 1e9) as u64,
                default_service_ms: ms(self.default_service_s),
            },
            ..base
        }
    }
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.heartbeat_interval_s > 0.0 && self.heartbeat_interval_s <= 3600.0) {
            return Err(Error::Config(
                "heartbeat_interval_s must be in (0, 3600]".into(),
            ));
        }
        if self.heartbeat_missed == 0 || self.max_attempts == 0 {
            return Err(Error::Config(
                "heartbeat_missed and max_attempts must be at least 1".into(),
            ));
        }
        if self.limits.min_side_px == 0 || self.limits.min_side_px > self.limits.max_side_px {
            return Err(Error::Config(
                "limits: min_side_px must be in 1..=max_side_px".into(),
            ));
        }
        self.scheduler.validate()?;
        if self.max_message_bytes < 1 << 20 {
            return Err(Error::Config(
                "max_message_bytes must be at least 1 MiB".into(),
            ));
        }
        for (key, v) in [
            ("handshake_timeout_s", self.handshake_timeout_s),
            ("idle_timeout_s", self.idle_timeout_s),
        ] {
            if !(v > 0.0 && v <= 86_400.0) {
                return Err(Error::Config(format!("{key} must be in (0, 86400]")));
            }
        }
        if self.max_connections == Some(0) {
            return Err(Error::Config(
                "max_connections must be at least 1 (or unset: from the open-file limit)".into(),
            ));
        }
        if self.http_token.as_ref().is_some_and(|t| {
            t.expose().len() < MIN_TOKEN_BYTES || !t.expose().bytes().all(|b| b.is_ascii_graphic())
        }) {
            return Err(Error::Config(format!(
                "http_token must be at least {MIN_TOKEN_BYTES} bytes of printable ASCII without spaces"
            )));
        }
        if !(self.leader_lease_s >= 0.5 && self.leader_lease_s <= 600.0) {
            return Err(Error::Config("leader_lease_s must be in [0.5, 600]".into()));
        }
        if let Some(s) = self.postgres_url() {
            if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
                return Err(Error::Config(
                    "store must be empty (the embedded store) or a postgres:// URL".into(),
                ));
            }
        }
        if let Some(u) = &self.advertise_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "advertise_url {u:?} must be an http:// or https:// URL"
                )));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::Config(
                "tls_cert and tls_key go together: give both or neither".into(),
            ));
        }
        self.cloud.validate()?;
        match &self.auth {
            None => Err(Error::Config(
                "no [auth] table: configure admin_tokens, worker_tokens and [[auth.clients]], \
                 or for local use set [auth] disabled = true or pass --insecure-no-auth"
                    .into(),
            )),
            Some(a) => a.validate(),
        }
    }

    /// The PostgreSQL URL, when the store is PostgreSQL.
    pub fn postgres_url(&self) -> Option<&str> {
        self.store
            .as_ref()
            .map(|s| s.expose().trim())
            .filter(|s| !s.is_empty())
    }

    /// `advertise_url`, or the URL derived from the address bound.
    pub fn advertised_url(&self, bound: SocketAddr) -> String {
        if let Some(u) = &self.advertise_url {
            return u.trim_end_matches('/').to_owned();
        }
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let host = if bound.ip().is_unspecified() {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into())
        } else {
            match bound.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        format!("{scheme}://{host}:{}", bound.port())
    }

    /// Whether local model sources are accepted outside `local_source_root`.
    pub fn local_sources_anywhere(&self) -> bool {
        self.local_sources_anywhere
            .unwrap_or_else(|| self.auth.as_ref().is_none_or(|a| a.disabled))
    }

    pub fn heartbeat_interval_ms(&self) -> u64 {
        (self.heartbeat_interval_s * 1000.0) as u64
    }

    pub fn scheduler(&self) -> SchedulerConfig {
        self.scheduler.apply(SchedulerConfig {
            heartbeat_timeout_ms: self.heartbeat_interval_ms() * u64::from(self.heartbeat_missed),
            max_attempts: self.max_attempts,
            starvation_ms: (self.starvation_s * 1000.0) as u64,
            ..SchedulerConfig::default()
        })
    }
}

/// Which engine a worker runs jobs with.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Stable Diffusion on ONNX Runtime.
    #[default]
    Onnx,
    /// A test engine that draws a deterministic pattern; never for production.
    Synthetic,
}

/// Where the ONNX engine runs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Coordinator URL. Default: http://127.0.0.1:7700.
    pub coordinator: String,
    /// Stable id; keep it across restarts. Default: the host name.
    pub worker_id: Option<String>,
    /// Disk cache directory. Default: ./corral-cache.
    pub cache_dir: PathBuf,
    /// Disk cache budget in bytes. Default: 50 GB.
    pub cache_max_bytes: u64,
    /// Read-only directory of models baked into the image. Default: none.
    pub preloaded_dir: Option<PathBuf>,
    /// Concurrent downloads. Default: 2.
    pub max_concurrent_downloads: usize,
    /// Jobs run at once. Default: 1.
    pub max_concurrent_jobs: u32,
    /// Default: onnx.
    pub engine: EngineKind,
    /// Default: cpu.
    pub device: DeviceKind,
    /// CUDA device ordinal. Default: 0.
    pub device_id: i32,
    /// Run on CPU when CUDA cannot load. Default: false.
    pub allow_cpu_fallback: bool,
    /// VRAM budget for loaded models in bytes; 0: 8 GB. Default: 0.
    pub vram_budget_bytes: u64,
    /// Most models loaded at once. Default: 2.
    pub max_loaded_models: usize,
    /// Apply LoRAs to 3x3 convolutions. Default: on with CUDA; off on CPU,
    /// where it slows generation 30-50% (such a LoRA is then refused).
    pub lora_conv: Option<bool>,
    /// Seconds to let running jobs finish on SIGTERM before handing them back. Default: 30.
    pub shutdown_grace_s: u64,
    /// Milliseconds per step of the synthetic engine. Default: 20.
    pub synthetic_step_ms: u64,
    /// Worker token sent to the coordinator (also `CORRAL_TOKEN`). Default: none.
    pub token: Option<Secret>,
    /// PEM CA certificate to trust for an https:// coordinator. Default: the public roots.
    pub ca_cert: Option<PathBuf>,
    /// HTTP address for this worker's `/metrics` and `/ready`; none: no HTTP port. Default: none.
    pub http_listen: Option<SocketAddr>,
    /// SaladCloud's instance metadata service (`[worker.cloud]`,
    /// src/cloud/config.rs). Default: off.
    pub cloud: crate::cloud::WorkerCloudConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:7700".into(),
            worker_id: None,
            cache_dir: PathBuf::from("corral-cache"),
            cache_max_bytes: 50_000_000_000,
            preloaded_dir: None,
            max_concurrent_downloads: 2,
            max_concurrent_jobs: 1,
            engine: EngineKind::Onnx,
            device: DeviceKind::Cpu,
            device_id: 0,
            allow_cpu_fallback: false,
            vram_budget_bytes: 0,
            max_loaded_models: 2,
            lora_conv: None,
            shutdown_grace_s: 30,
            synthetic_step_ms: 20,
            token: None,
            ca_cert: None,
            http_listen: None,
            cloud: Default::default(),
        }
    }
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > 64 {
            return Err(Error::Config(
                "max_concurrent_jobs must be in 1..=64".into(),
            ));
        }
        if self.max_loaded_models == 0 || self.max_concurrent_downloads == 0 {
            return Err(Error::Config(
                "max_loaded_models and max_concurrent_downloads must be at least 1".into(),
            ));
        }
        self.cloud.validate()
    }

    pub fn vram_budget(&self) -> u64 {
        if self.vram_budget_bytes == 0 {
            8_000_000_000
        } else {
            self.vram_budget_bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_an_error() {
        let err = toml::from_str::<FileConfig>("[coordinator]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn auth_table_parses_and_secrets_stay_hidden() {
        let c: FileConfig = toml::from_str(
            "[auth]\nadmin_tokens = [\"admin-0123456789abcdef\"]\n\
             [[auth.clients]]\nname = \"acme\"\nkey = \"acme-0123456789abcdef\"\n",
        )
        .unwrap();
        let a = c.auth.clone().unwrap();
        assert!(!a.disabled);
        assert_eq!(a.clients[0].name, "acme");
        a.validate().unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        let mut short = a.clone();
        short.worker_tokens.push(Secret::new("short"));
        assert!(short.validate().is_err());
        let mut twice = a;
        twice
            .worker_tokens
            .push(Secret::new("acme-0123456789abcdef"));
        assert!(twice.validate().is_err());
    }

    #[test]
    fn worker_id_patterns() {
        for (p, id, want) in [
            ("gpu-1", "gpu-1", true),
            ("gpu-1", "gpu-12", false),
            ("gpu-*", "gpu-12", true),
            ("gpu-*", "gpu-", true),
            ("gpu-*", "cpu-1", false),
            ("*-eu", "gpu-1-eu", true),
            ("*-eu", "gpu-1-us", false),
            ("a*b*c", "a-b-c", true),
            ("a*b*c", "a-c", false),
            ("ab*ba", "aba", false),
            ("*", "anything", true),
        ] {
            assert_eq!(worker_id_matches(p, id), want, "{p} vs {id}");
        }
        let c: FileConfig = toml::from_str(
            "[auth]\n[[auth.workers]]\ntoken = \"gpu-token-0123456789\"\nids = [\"gpu-*\"]\n",
        )
        .unwrap();
        let a = c.auth.unwrap();
        a.validate().unwrap();
        assert_eq!(a.workers[0].ids, vec!["gpu-*".to_string()]);
        let mut none = a.clone();
        none.workers[0].ids.clear();
        assert!(none.validate().is_err());
    }

    #[test]
    fn coordinator_needs_an_auth_decision() {
        let mut c = CoordinatorConfig::default();
        assert!(c.validate().unwrap_err().to_string().contains("[auth]"));
        c.auth = Some(AuthConfig::disabled());
        c.validate().unwrap();
    }

    #[test]
    fn file_overrides_defaults() {
        let c: FileConfig =
            toml::from_str("[coordinator]\nmax_attempts = 5\n[worker]\nengine = \"synthetic\"\n")
                .unwrap();
        assert_eq!(c.coordinator.max_attempts, 5);
        assert_eq!(c.coordinator.heartbeat_missed, 3);
        assert_eq!(c.worker.engine, EngineKind::Synthetic);
        assert_eq!(c.coordinator.scheduler().heartbeat_timeout_ms, 15_000);
    }

    #[test]
    fn scheduler_table_defaults_are_the_schedulers_and_keys_arrive() {
        let c = CoordinatorConfig::default();
        let want = SchedulerConfig {
            heartbeat_timeout_ms: 15_000,
            ..SchedulerConfig::default()
        };
        assert_eq!(c.scheduler(), want);
        let c: FileConfig = toml::from_str(
            "[coordinator.scheduler]\nmin_warm_replicas = 4\ndemand_fast_s = 30\n\
             default_download_mb_per_s = 10\n",
        )
        .unwrap();
        let s = c.coordinator.scheduler();
        assert_eq!(s.min_warm_replicas, 4);
        assert_eq!(s.demand_fast_ms, 30_000);
        assert_eq!(s.cost.default_download_bps, 10_000_000);
        let bad: FileConfig =
            toml::from_str("[coordinator.scheduler]\nreplica_disk_share = 1.5\n").unwrap();
        let e = bad
            .coordinator
            .scheduler
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("scheduler.replica_disk_share"), "{e}");
    }
}
