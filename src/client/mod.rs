//! Talking to a coordinator as a client: connections (token, TLS), the
//! Jobs and Admin stubs, following a job to its end, writing its images.
//! Used by the CLI, the demo and the load benchmark; `print` shows answers
//! as tables for people.

pub mod print;

use std::path::{Path, PathBuf};

use clap::Args;
use tonic::transport::Channel;

use crate::auth::{AuthedChannel, Secret};
use crate::error::{Error, Result};
use crate::pb;

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Coordinator URL; several, comma-separated (or a DNS name with
    /// several addresses), for a group of coordinators: the one serving
    /// (the leader) is used.
    #[arg(
        long,
        env = "CORRAL_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub coordinator: String,
    /// Client API key or admin token (prefer the environment: flags show in `ps`).
    #[arg(long, env = "CORRAL_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// PEM CA certificate to trust for an https:// coordinator.
    #[arg(long, env = "CORRAL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl ClientArgs {
    /// A coordinator on this machine with auth disabled (the demo).
    pub fn local(url: &str) -> Self {
        Self {
            coordinator: url.to_owned(),
            token: None,
            ca_cert: None,
        }
    }
}

pub async fn channel(url: &str) -> Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::Config(format!("coordinator URL {url:?}: {e}")))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the coordinator at {url}: {e}")))
}

/// How long a command waits for a serving coordinator among several (a
/// takeover takes a few seconds).
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A channel to the coordinator (the leader, when several are given) that
/// sends the token with every call.
pub async fn authed_channel(c: &ClientArgs) -> Result<AuthedChannel> {
    crate::auth::connect_leader(
        &c.coordinator,
        c.ca_cert.as_deref(),
        c.token.as_ref(),
        LEADER_WAIT,
    )
    .await
}

pub async fn jobs_client(c: &ClientArgs) -> Result<pb::jobs_client::JobsClient<AuthedChannel>> {
    Ok(pb::jobs_client::JobsClient::new(authed_channel(c).await?)
        .max_decoding_message_size(256 << 20))
}

pub async fn admin_client(c: &ClientArgs) -> Result<pb::admin_client::AdminClient<AuthedChannel>> {
    Ok(pb::admin_client::AdminClient::new(authed_channel(c).await?))
}

pub fn state_word(v: i32) -> &'static str {
    match pb::JobState::try_from(v) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn tier_word(v: i32) -> &'static str {
    crate::convert::tier_from_pb(v).map_or("-", |t| t.as_str())
}

/// Writes a job's images next to `out`; returns the paths.
pub fn write_images(out: &Path, images: &[impl AsRef<[u8]>]) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for (i, png) in images.iter().enumerate() {
        let p = if images.len() == 1 {
            out.to_path_buf()
        } else {
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
            out.with_file_name(format!("{stem}-{}.png", i + 1))
        };
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(&p, png.as_ref()).map_err(|e| Error::io(&p, e))?;
        paths.push(p);
    }
    Ok(paths)
}

pub enum Finished {
    Completed(pb::JobOutput),
    Failed(String),
    Cancelled,
}

/// Follows `WatchJob` until the job ends, showing progress on stderr.
pub async fn follow(
    client: &mut pb::jobs_client::JobsClient<AuthedChannel>,
    id: &str,
    bar: bool,
) -> Result<Finished> {
    use pb::job_event::Event;
    let mut stream = client
        .watch_job(pb::WatchJobRequest { job_id: id.into() })
        .await?
        .into_inner();
    let pb_bar = if bar {
        indicatif::ProgressBar::new(1)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb_bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut place = String::from("queued");
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Queued(q)) => pb_bar.set_message(format!(
                "queued, estimated start in {:.1} s",
                q.estimated_start_s
            )),
            Some(Event::Assigned(a)) => {
                place = format!("{} ({})", a.worker_id, tier_word(a.tier));
                pb_bar.set_prefix(place.clone());
                pb_bar.set_message(format!("attempt {}", a.attempt));
            }
            Some(Event::Downloading(d)) => {
                pb_bar.set_length(d.bytes_total.max(1));
                pb_bar.set_position(d.bytes_done);
                pb_bar.set_message("downloading bytes");
            }
            Some(Event::Loading(_)) => pb_bar.set_message("loading model"),
            Some(Event::Progress(p)) => {
                pb_bar.set_length(u64::from(p.total_steps.max(1)));
                pb_bar.set_position(u64::from(p.step));
                pb_bar.set_message("steps");
            }
            Some(Event::Requeued(r)) => pb_bar.set_message(format!(
                "requeued (attempt {} next): {}",
                r.attempt, r.reason
            )),
            Some(Event::Completed(c)) => {
                pb_bar.finish_and_clear();
                return Ok(Finished::Completed(c.output.unwrap_or_default()));
            }
            Some(Event::Failed(f)) => {
                pb_bar.finish_and_clear();
                return Ok(Finished::Failed(f.reason));
            }
            Some(Event::Cancelled(_)) => {
                pb_bar.finish_and_clear();
                return Ok(Finished::Cancelled);
            }
            None => {}
        }
        if !bar {
            continue;
        }
    }
    let _ = place;
    Err(Error::Unavailable(format!(
        "watch of job {id} ended before the job did"
    )))
}
