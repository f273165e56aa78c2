//! The worker's HTTP port (`http_listen`): Prometheus `/metrics` with what
//! the session counts (jobs by tier, phase durations, failures) and what the
//! disk cache counts (through [`worker_cache_stats`]).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::info;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};

use super::Worker;
use crate::error::{Error, Result};
use crate::metrics::Scrape;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabel {
    result: &'static str,
}

/// What the disk cache counts (bytes downloaded, lookups by tier,
/// evictions, checksum failures) and what the worker holds, read from the
/// worker when `/metrics` is scraped.
#[derive(Debug)]
pub(super) struct Gauges(pub(super) Weak<Worker>);

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let Some(w) = self.0.upgrade() else {
            return Ok(());
        };
        let s = w.cache().stats();
        let report = w.report();
        let mut g = Scrape::new(&mut encoder);
        g.counter(
            "corral_worker_cache_download_bytes",
            "Bytes downloaded into the disk cache.",
            s.bytes_downloaded,
        )?;
        g.counters(
            "corral_worker_cache_lookups",
            "Cache lookups by where the model was found.",
            [
                ("preloaded", s.hits_preloaded),
                ("disk", s.hits_disk),
                ("download", s.misses),
            ]
            .map(|(result, v)| (LookupLabel { result }, v)),
        )?;
        g.counter(
            "corral_worker_cache_evictions",
            "Models evicted from the disk cache.",
            s.evictions,
        )?;
        g.counter(
            "corral_worker_cache_checksum_failures",
            "Downloaded files whose sha256 did not match.",
            s.checksum_failures,
        )?;
        g.gauge(
            "corral_worker_jobs_running",
            "Jobs running now.",
            report.running_jobs.len() as f64,
        )?;
        g.gauge(
            "corral_worker_models_vram",
            "Models loaded in memory.",
            report.vram_models.len() as f64,
        )?;
        g.gauge(
            "corral_worker_models_disk",
            "Models on disk (including preloaded).",
            report.disk_models.len() as f64,
        )?;
        g.gauge(
            "corral_worker_downloads",
            "Downloads in progress.",
            report.downloads.len() as f64,
        )?;
        g.gauge(
            "corral_worker_cache_free_bytes",
            "Free bytes in the disk cache budget.",
            report.free_disk_bytes as f64,
        )?;
        Ok(())
    }
}

/// The worker's `/metrics` text.
pub fn metrics_text(worker: &Worker) -> String {
    worker.metrics().render()
}

pub use crate::http::HttpGuard;

/// Binds `addr` and serves `/metrics` until the guard drops.
pub async fn start(addr: SocketAddr, worker: &Arc<Worker>) -> Result<HttpGuard> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("http_listen {addr}"), e))?;
    serve(listener, worker)
}

/// Serves `/metrics` on a listener the caller bound, until the guard drops.
pub fn serve(listener: TcpListener, worker: &Arc<Worker>) -> Result<HttpGuard> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("http listener", e))?;
    let app = axum::Router::new()
        .route("/metrics", get(handler))
        .with_state(Arc::downgrade(worker));
    info!(%addr, "worker HTTP listening (/metrics)");
    crate::http::serve(listener, app)
}

async fn handler(State(w): State<Weak<Worker>>) -> Response {
    let Some(w) = w.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "worker stopped\n").into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics_text(&w),
    )
        .into_response()
}
