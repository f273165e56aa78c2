//! The benchmark's worker fleet: real Corral workers whose engine returns a
//! fixed payload at once, holding one tiny model preloaded; in this process
//! or in a child process (`--fleet-of`), and the `/proc` figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use super::BenchArgs;
use crate::config::{EngineKind, WorkerConfig};
use crate::error::{Error, Result};
use crate::types::ModelManifest;
use crate::worker::engine::{Engine, Job, LoadedModel, Output};

/// Returns `payload` at once: the control plane's cost alone.
struct PayloadEngine {
    payload: Arc<Vec<u8>>,
}

struct PayloadModel {
    payload: Arc<Vec<u8>>,
}

impl Engine for PayloadEngine {
    fn name(&self) -> &'static str {
        "bench"
    }
    fn load(&self, _m: &ModelManifest, _dir: &Path) -> Result<Arc<dyn LoadedModel>> {
        Ok(Arc::new(PayloadModel {
            payload: self.payload.clone(),
        }))
    }
}

impl LoadedModel for PayloadModel {
    fn resident_bytes(&self) -> u64 {
        1
    }
    fn generate(&self, job: &Job, on_step: &mut dyn FnMut(u32, u32) -> bool) -> Result<Output> {
        let spec = job.spec;
        for step in 1..=spec.steps {
            if !on_step(step, spec.steps) {
                return Err(crate::worker::engine::cancelled());
            }
        }
        Ok(Output {
            images: (0..spec.num_images)
                .map(|_| self.payload.as_ref().clone())
                .collect(),
            ..Output::default()
        })
    }
}

/// A scratch directory under the system temp dir, removed on drop.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    pub(super) fn new(what: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("corral-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        Ok(Self(p))
    }
    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) const MODEL: &str = "bench-model";

/// Writes the tiny bundle into `dir/MODEL`; returns `dir` (the preloaded dir).
pub(super) fn write_bundle(dir: &Path) -> Result<PathBuf> {
    let root = dir.join(MODEL);
    std::fs::create_dir_all(root.join("unet")).map_err(|e| Error::io(&root, e))?;
    for (p, bytes) in [
        ("model_index.json", b"{\"name\":\"bench\"}".to_vec()),
        ("unet/model.onnx", vec![7u8; 4096]),
    ] {
        let path = root.join(p);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(dir.to_path_buf())
}

/// Starts `n` workers for `url`; they stop when `stop` changes.
pub(super) async fn spawn_workers(
    url: &str,
    n: usize,
    slots: u32,
    payload_bytes: usize,
    preloaded: &Path,
    scratch: &Path,
    stop: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<Result<()>>>> {
    // The PNG signature, then filler: the coordinator checks results are PNGs.
    let mut payload: Vec<u8> = b"\x89PNG\r\n\x1a\n".to_vec();
    payload.extend((8..payload_bytes.max(8)).map(|i| i as u8));
    let payload = Arc::new(payload);
    let engine: Arc<dyn Engine> = Arc::new(PayloadEngine { payload });
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = WorkerConfig {
            coordinator: url.to_owned(),
            cache_dir: scratch.join(format!("w{i}")),
            cache_max_bytes: 1 << 30,
            preloaded_dir: Some(preloaded.to_path_buf()),
            max_concurrent_jobs: slots,
            engine: EngineKind::Synthetic,
            shutdown_grace_s: 5,
            ..WorkerConfig::default()
        };
        let id = crate::types::WorkerId(format!("bench-w{i:05}"));
        let (w, outbox) = crate::worker::Worker::new(cfg, id, engine.clone()).await?;
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(crate::worker::run(w, outbox, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    Ok(tasks)
}

/// The child process: workers until stdin closes.
pub(super) async fn fleet_main(args: &BenchArgs, url: &str) -> Result<()> {
    let scratch = Scratch::new("fleet")?;
    let preloaded = args
        .fleet_preloaded
        .clone()
        .ok_or_else(|| Error::Config("--fleet-preloaded is required with --fleet-of".into()))?;
    let (stop, rx) = watch::channel(false);
    let tasks = spawn_workers(
        url,
        args.workers,
        args.slots,
        args.payload_bytes,
        &preloaded,
        scratch.path(),
        rx,
    )
    .await?;
    println!("ready");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {}
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

pub(super) enum Fleet {
    Inline {
        stop: watch::Sender<bool>,
        tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    },
    Process(tokio::process::Child),
}

impl Fleet {
    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Fleet::Process(c) => c.id(),
            Fleet::Inline { .. } => None,
        }
    }

    pub(super) async fn stop(self) {
        match self {
            Fleet::Inline { stop, tasks } => {
                let _ = stop.send(true);
                for t in tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
                }
            }
            Fleet::Process(mut child) => {
                // Closing its stdin asks it to stop; then it is killed if slow.
                drop(child.stdin.take());
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// CPU seconds (user + system) of a process from /proc.
pub(super) fn cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// A `Vm*` line of /proc/PID/status, in MiB.
pub(super) fn vm_mib(pid: Option<u32>, key: &str) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
