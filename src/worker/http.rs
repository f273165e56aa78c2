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

use super::Worker;
use crate::error::{Error, Result};
use crate::metrics::{self, CacheStatsView};

/// The disk cache's counters (bytes downloaded, lookups by tier, evictions,
/// checksum failures) for `/metrics`: the one place the cache's `stats()`
/// meets the exporter. `None` exports no cache series.
pub fn worker_cache_stats(worker: &Worker) -> Option<CacheStatsView> {
    let s = worker.cache().stats();
    Some(CacheStatsView {
        bytes_downloaded: s.bytes_downloaded,
        hits_preloaded: s.hits_preloaded,
        hits_disk: s.hits_disk,
        downloads: s.misses,
        evictions: s.evictions,
        checksum_failures: s.checksum_failures,
    })
}

/// The worker's `/metrics` text.
pub fn metrics_text(worker: &Worker) -> String {
    let mut out = String::with_capacity(8 << 10);
    metrics::worker().render(&mut out);
    if let Some(stats) = worker_cache_stats(worker) {
        stats.render(&mut out);
    }
    let report = worker.report();
    let gauges = [
        (
            "corral_worker_jobs_running",
            "Jobs running now.",
            report.running_jobs.len() as u64,
        ),
        (
            "corral_worker_models_vram",
            "Models loaded in memory.",
            report.vram_models.len() as u64,
        ),
        (
            "corral_worker_models_disk",
            "Models on disk (including preloaded).",
            report.disk_models.len() as u64,
        ),
        (
            "corral_worker_downloads",
            "Downloads in progress.",
            report.downloads.len() as u64,
        ),
        (
            "corral_worker_cache_free_bytes",
            "Free bytes in the disk cache budget.",
            report.free_disk_bytes,
        ),
    ];
    for (name, help, v) in gauges {
        metrics::header(&mut out, name, "gauge", help);
        metrics::sample(&mut out, name, "", v);
    }
    out
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
