//! The coordinator's HTTP port (`http_listen`): Prometheus `/metrics`, the
//! cluster page `/` and its data `/api/cluster`.
//!
//! The server holds only a `Weak` to the coordinator and stops when the
//! guard [`spawn`] returns is dropped (at the end of `run`). A sampler task
//! closes one [`History`] period every 10 s.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::{info, info_span, Instrument};

use super::cluster::{History, SAMPLE_PERIOD_S};
use super::Coordinator;
use crate::error::{Error, Result};

/// The cluster page: one self-contained file, polling `/api/cluster`.
const PAGE: &str = include_str!("cluster.html");

/// Samples kept: one hour at 10-s periods.
const HISTORY_SAMPLES: usize = 360;

struct HttpState {
    coord: Weak<Coordinator>,
    history: History,
}

pub use crate::http::HttpGuard;

/// Binds `addr` if given (startup fails on a bad address rather than later).
pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|e| Error::io(format!("http_listen {a}"), e)),
    }
}

/// Serves `/metrics`, `/` and `/api/cluster` on `listener` until the guard drops.
pub fn spawn(listener: TcpListener, coord: &Arc<Coordinator>) -> Result<HttpGuard> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("http listener", e))?;
    let state = Arc::new(HttpState {
        coord: Arc::downgrade(coord),
        history: History::new(HISTORY_SAMPLES, coord.metrics()),
    });
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/cluster", get(cluster))
        .with_state(state.clone());
    info!(%addr, "coordinator HTTP listening (/metrics, /, /api/cluster)");
    let sampler = Arc::downgrade(&state);
    tokio::spawn(
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(SAMPLE_PERIOD_S));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(st) = sampler.upgrade() else { return };
                let Some(c) = st.coord.upgrade() else { return };
                let (queued, workers) = c.load_now();
                st.history.record(c.metrics(), queued, workers);
            }
        }
        .instrument(info_span!("http_sampler")),
    );
    crate::http::serve(listener, app)
}

fn gone() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "coordinator stopped\n").into_response()
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let Some(c) = st.coord.upgrade() else {
        return gone();
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        c.metrics_text(),
    )
        .into_response()
}

async fn cluster(State(st): State<Arc<HttpState>>) -> Response {
    let Some(c) = st.coord.upgrade() else {
        return gone();
    };
    match serde_json::to_string(&c.cluster_view(&st.history)) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
