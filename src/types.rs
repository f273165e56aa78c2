//! Domain types shared by the scheduler, the coordinator and the worker.
//!
//! No protobuf here: `convert.rs` maps these to and from the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

string_id!(
    /// A job, named by the coordinator when it is accepted.
    JobId
);
string_id!(
    /// A worker, named by the worker itself and stable across its restarts.
    WorkerId
);
string_id!(
    /// A catalogue entry.
    ModelId
);

/// Milliseconds on the scheduler's clock (see `clock.rs`).
pub type Millis = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ModelKind {
    #[default]
    Checkpoint,
    Lora,
    Vae,
    Upscaler,
}

/// One file of a bundle. `path` is relative and has been checked to stay
/// inside the bundle (see `convert.rs` and `worker::cache`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: String,
}

/// A catalogue entry: the files of one pipeline and where they come from.
/// Its `Debug` redacts the source (a pre-signed URL carries credentials).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub id: ModelId,
    pub kind: ModelKind,
    pub source: String,
    pub files: Vec<ModelFile>,
    /// A checkpoint's family, or the family a LoRA or VAE targets: "sd1",
    /// "sd2", "sdxl", "dim:N"; empty when unknown or any (upscalers).
    #[serde(default)]
    pub family: String,
    /// A LoRA's key format ("kohya", "peft") or an upscaler's scale ("x2", "x4").
    #[serde(default)]
    pub format: String,
}

impl fmt::Debug for ModelManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelManifest")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("source", &crate::redact::url(&self.source))
            .field("files", &self.files)
            .field("family", &self.family)
            .field("format", &self.format)
            .finish()
    }
}

impl ModelManifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// A LoRA applied to a job, with its weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    pub model_id: ModelId,
    pub weight: f32,
}

/// What a client asked for, validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model_id: ModelId,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    pub seed: u64,
    pub num_images: u32,
    /// Empty: the model's own scheduler.
    pub scheduler: String,
    pub priority: i32,
    pub idempotency_key: String,
    /// Applied in order.
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    /// Replaces the checkpoint's VAE.
    #[serde(default)]
    pub vae_id: Option<ModelId>,
    /// Image-to-image: the input picture (PNG or JPEG).
    #[serde(default, with = "base64_bytes")]
    pub init_image: Option<bytes::Bytes>,
    /// Image-to-image: how much of the input is replaced, (0, 1].
    #[serde(default)]
    pub strength: f32,
    /// Run on every image after generation.
    #[serde(default)]
    pub upscaler_id: Option<ModelId>,
}

impl JobSpec {
    /// Every bundle the job needs besides its checkpoint: its LoRAs in
    /// order, then its VAE, then its upscaler.
    pub fn extra_models(&self) -> Vec<ModelId> {
        self.loras
            .iter()
            .map(|l| l.model_id.clone())
            .chain(self.vae_id.clone())
            .chain(self.upscaler_id.clone())
            .collect()
    }

    /// An empty-prompt 512x512, 20-step job for `model`: what the simulator
    /// and the scheduling benchmark submit, where only the model matters.
    pub fn for_model(model_id: ModelId) -> Self {
        Self {
            model_id,
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 20,
            guidance_scale: 7.0,
            seed: 0,
            num_images: 1,
            scheduler: String::new(),
            priority: 0,
            idempotency_key: String::new(),
            loras: Vec::new(),
            vae_id: None,
            init_image: None,
            strength: 0.0,
            upscaler_id: None,
        }
    }
}

/// An input image in a stored job, as base64 in its JSON.
mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<bytes::Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bytes::Bytes>, D::Error> {
        let v: Option<String> = Option::deserialize(d)?;
        v.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(bytes::Bytes::from)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where a job found its model when it started, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CacheTier {
    Vram,
    Preloaded,
    Disk,
    Download,
}

impl CacheTier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vram => "vram",
            Self::Preloaded => "preloaded",
            Self::Disk => "disk",
            Self::Download => "download",
        }
    }
}

/// Why an attempt or a job failed: a bounded set, for metrics and for the
/// wire (`FailureKind` in workers.proto). The reason text says the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum FailureKind {
    #[default]
    Other,
    /// The coordinator asked for it (a client cancelled the job).
    Cancelled,
    /// The worker's stream ended, or it could not be reached.
    WorkerLost,
    /// The worker stopped heartbeating.
    HeartbeatMissed,
    /// The attempt ran past its deadline.
    Deadline,
    /// Fetching a model failed (network, checksum, disk).
    Download,
    /// Loading a model failed.
    Load,
    /// Generating failed (including running out of memory).
    Inference,
    /// The request can never run (bad spec or model files).
    Invalid,
    /// The result could not be delivered or was not what the job asked for.
    Result,
}

impl FailureKind {
    pub const ALL: [FailureKind; 10] = [
        Self::Other,
        Self::Cancelled,
        Self::WorkerLost,
        Self::HeartbeatMissed,
        Self::Deadline,
        Self::Download,
        Self::Load,
        Self::Inference,
        Self::Invalid,
        Self::Result,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Other => "other",
            Self::Cancelled => "cancelled",
            Self::WorkerLost => "worker_lost",
            Self::HeartbeatMissed => "heartbeat_missed",
            Self::Deadline => "deadline",
            Self::Download => "download",
            Self::Load => "load",
            Self::Inference => "inference",
            Self::Invalid => "invalid",
            Self::Result => "result",
        }
    }
}

/// Where the time of one job went, as the worker measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_s: f64,
    pub download_s: f64,
    pub load_s: f64,
    pub inference_s: f64,
    pub tier: Option<CacheTier>,
    /// Part of `inference_s`: merging or switching LoRAs.
    #[serde(default)]
    pub lora_s: f64,
    /// Part of `inference_s`: the upscaler.
    #[serde(default)]
    pub upscale_s: f64,
}

/// A model on a worker's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskModel {
    pub model_id: ModelId,
    pub bytes: u64,
    pub preloaded: bool,
}

/// A download in progress on a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadState {
    pub model_id: ModelId,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One attempt of a job, as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunningJob {
    pub job_id: JobId,
    pub attempt: u32,
}

/// Everything a worker holds, sent in full with every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReport {
    pub vram_models: Vec<ModelId>,
    pub disk_models: Vec<DiskModel>,
    pub downloads: Vec<DownloadState>,
    pub free_disk_bytes: u64,
    pub running_jobs: Vec<RunningJob>,
    /// Measured download throughput, bytes per second; 0 when unknown.
    pub download_bps: u64,
    /// The worker is shutting down and takes no new jobs.
    pub draining: bool,
}

/// What a worker says about itself when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    pub worker_id: WorkerId,
    pub version: String,
    pub gpu_name: String,
    pub vram_bytes: u64,
    pub cache_max_bytes: u64,
    pub max_concurrent_jobs: u32,
    pub state: CacheReport,
}

/// The phase a running job is in, for progress events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    Downloading { bytes_done: u64, bytes_total: u64 },
    Loading,
    Denoising { step: u32, total_steps: u32 },
}

/// A finished job's output. The images themselves live in the store (and
/// travel as [`Images`]); records carry only how many there are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobOutput {
    pub image_count: u32,
    pub timings: Timings,
    pub worker_id: WorkerId,
}

/// PNG files of one job, shared by every reader without copying.
pub type Images = std::sync::Arc<[bytes::Bytes]>;

/// Something that happened to a job, for `WatchJob`.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEventKind {
    Queued {
        estimated_start_s: f64,
    },
    Assigned {
        worker: WorkerId,
        tier: CacheTier,
        attempt: u32,
    },
    Downloading {
        bytes_done: u64,
        bytes_total: u64,
    },
    Loading,
    Progress {
        step: u32,
        total_steps: u32,
    },
    Completed {
        output: std::sync::Arc<JobOutput>,
        images: Images,
    },
    Failed {
        reason: String,
    },
    Cancelled,
    Requeued {
        reason: String,
        next_attempt: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    pub job_id: JobId,
    pub at_ms: Millis,
    pub kind: JobEventKind,
}

/// The coordinator's record of a job, kept after it ends.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub id: JobId,
    pub spec: std::sync::Arc<JobSpec>,
    pub state: JobState,
    pub attempt: u32,
    pub worker: Option<WorkerId>,
    pub tier: Option<CacheTier>,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    pub error: String,
    pub output: Option<std::sync::Arc<JobOutput>>,
}
