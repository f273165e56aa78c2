//! [`TrackCalls`]: a tower layer in front of the gRPC services that counts,
//! per connection, the calls in progress (from the request until its
//! response body is dropped), for [`Activity::Calls`](super::Activity):
//! a connection's first call ends its handshake, and one without calls is
//! idle. It also puts the connection's `TcpConnectInfo` back in the
//! request, where tonic's `remote_addr` looks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::transport::server::TlsConnectInfo;

use super::{ConnInfo, ConnState};

/// The layer; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackCalls;

impl<S> tower_layer::Layer<S> for TrackCalls {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked(inner)
    }
}

/// A service whose calls are counted on their connection.
#[derive(Clone, Debug)]
pub struct Tracked<S>(S);

/// One call in progress; counted down when dropped.
struct Call(Arc<ConnState>);

impl Call {
    fn start(state: Arc<ConnState>) -> Self {
        state.call_started();
        Self(state)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Tracked<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let ext = req.extensions();
        let info = ext
            .get::<ConnInfo>()
            .or_else(|| ext.get::<TlsConnectInfo<ConnInfo>>().map(|t| t.get_ref()))
            .cloned();
        let call = info.map(|i| {
            req.extensions_mut().insert(i.tcp.clone());
            Call::start(i.state)
        });
        let fut = self.0.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|inner| CallBody { inner, _call: call }))
        })
    }
}

/// A response body that keeps its call counted until it is dropped.
pub struct CallBody<B> {
    inner: B,
    _call: Option<Call>,
}

impl<B> http_body::Body for CallBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
