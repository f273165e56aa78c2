//! The HTTP port shared by the coordinator and the worker (`/metrics`, and
//! on the coordinator the cluster page): serving an axum router on a bound
//! listener until a guard is dropped.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info_span, warn, Instrument};

use crate::error::{Error, Result};

/// Stops the HTTP server when dropped.
pub struct HttpGuard {
    _stop: oneshot::Sender<()>,
    pub addr: SocketAddr,
}

/// Serves `app` on `listener` in a task until the returned guard drops.
pub fn serve(listener: TcpListener, app: axum::Router) -> Result<HttpGuard> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("http listener", e))?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        async move {
            let served = axum::serve(listener, app)
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
