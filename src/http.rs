//! The HTTP port shared by the coordinator and the worker (`/metrics`, and
//! on the coordinator the cluster page): serving an axum router on a bound
//! listener until a guard is dropped, behind an optional bearer token.
//!
//! Connections come through [`accept::Acceptor`] (also used by the
//! coordinator's gRPC port): at most [`HTTP_MAX_CONNECTIONS`] at once, a
//! deadline for the first byte and for idleness, and a backoff on accept
//! errors.

pub mod accept;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info_span, warn, Instrument};

use crate::auth::Secret;
use crate::error::{Error, Result};
use crate::metrics::ConnMetrics;
use accept::{AcceptLimits, Acceptor, Activity};

/// Most connections open at once on an HTTP port (scrapers and pages).
pub const HTTP_MAX_CONNECTIONS: usize = 128;

/// What the HTTP port enforces on its connections.
fn http_limits() -> AcceptLimits {
    AcceptLimits {
        max_connections: HTTP_MAX_CONNECTIONS,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        activity: Activity::Reads,
    }
}

/// Stops the HTTP server when dropped.
pub struct HttpGuard {
    _stop: oneshot::Sender<()>,
    pub addr: SocketAddr,
}

/// How a port is served beyond its routes.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// Required as `Authorization: Bearer <token>` on every path but
    /// `public`; none: no token.
    pub token: Option<Secret>,
    /// Paths served without the token (pages that hold no data).
    pub public: &'static [&'static str],
    /// Where the port's connections are counted.
    pub connections: ConnMetrics,
}

/// Serves `app` on `listener` in a task until the returned guard drops.
pub fn serve(listener: TcpListener, app: axum::Router) -> Result<HttpGuard> {
    serve_with(listener, app, HttpOptions::default())
}

/// [`serve`], with a token and connection counters.
pub fn serve_with(
    listener: TcpListener,
    app: axum::Router,
    opts: HttpOptions,
) -> Result<HttpGuard> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("http listener", e))?;
    let app = match &opts.token {
        Some(t) => app.layer(axum::middleware::from_fn_with_state(
            Arc::new(TokenCheck {
                digest: Sha256::digest(t.expose().as_bytes()).into(),
                public: opts.public,
            }),
            require_token,
        )),
        None => app,
    };
    let acceptor = Acceptor::new(listener, http_limits(), opts.connections, "http");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        async move {
            let served = axum::serve(acceptor, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                warn!(error = %e, "HTTP server failed");
            }
        }
        .instrument(info_span!("http", %addr)),
    );
    Ok(HttpGuard { _stop: stop, addr })
}

struct TokenCheck {
    digest: [u8; 32],
    public: &'static [&'static str],
}

impl TokenCheck {
    /// Whether the request carries the token (compared as digests, in
    /// constant time).
    fn admits(&self, req: &Request) -> bool {
        let Some(h) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let Ok(h) = h.to_str() else { return false };
        let Some(token) = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
        else {
            return false;
        };
        let d: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

async fn require_token(State(check): State<Arc<TokenCheck>>, req: Request, next: Next) -> Response {
    if check.public.contains(&req.uri().path()) || check.admits(&req) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this port needs Authorization: Bearer <http_token>\n",
    )
        .into_response()
}
