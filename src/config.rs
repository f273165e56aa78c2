//! Configuration: a TOML file (`--config`), overridden by flags and
//! `CORRAL_*` environment variables (clap reads both). Unknown keys in the
//! file are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::error::{Error, Result};
use crate::scheduler::SchedulerConfig;

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

/// Limits on what clients may ask for.
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
    /// Local (`file://` or absolute path) model sources are accepted only
    /// under this directory, unless `local_sources_anywhere`. Default: none.
    pub local_source_root: Option<PathBuf>,
    /// Accept local model sources anywhere. Default: true with
    /// authentication disabled, false with it on (a client with an admin
    /// token could otherwise make workers read any directory).
    pub local_sources_anywhere: Option<bool>,
    pub limits: JobLimits,
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
            local_source_root: None,
            local_sources_anywhere: None,
            limits: JobLimits::default(),
            auth: None,
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
        if self.max_message_bytes < 1 << 20 {
            return Err(Error::Config(
                "max_message_bytes must be at least 1 MiB".into(),
            ));
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
        SchedulerConfig {
            heartbeat_timeout_ms: self.heartbeat_interval_ms() * u64::from(self.heartbeat_missed),
            max_attempts: self.max_attempts,
            starvation_ms: (self.starvation_s * 1000.0) as u64,
            ..SchedulerConfig::default()
        }
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
    /// HTTP address for this worker's `/metrics`; none: no HTTP port. Default: none.
    pub http_listen: Option<SocketAddr>,
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
        Ok(())
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
}
