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
    /// The file's `[auth]` table (or `--insecure-no-auth`); required.
    #[serde(skip)]
    pub auth: Option<AuthConfig>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".parse().expect("valid address"),
            data_dir: PathBuf::from("corral-data"),
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
}
