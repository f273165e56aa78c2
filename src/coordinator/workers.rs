//! `Workers.Connect`: one bidirectional stream per worker.
//!
//! The first message must be `Hello`; the answer starts with `Welcome`. One
//! task reads the inbound stream; the coordinator writes through a bounded
//! channel that is the response stream. A stream that ends without
//! `GoingAway` means the worker is gone.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, warn, Instrument};

use super::fleet::WORKER_CHANNEL;
use super::{Coordinator, ToWorker};
use crate::pb;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WorkersService(pub Arc<Coordinator>);

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::workers_server::Workers for WorkersService {
    type ConnectStream = OutStream;

    async fn connect(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??
            .ok_or_else(|| Status::invalid_argument("stream closed before Hello"))?;
        let hello = crate::convert::required_hello(first.msg)?;
        let worker = hello.worker_id.clone();
        let coord = self.0.clone();
        let cfg = coord.config();
        if coord.links.len() >= cfg.max_worker_streams && !coord.links.contains_key(&worker) {
            return Err(crate::Error::ResourceExhausted(format!(
                "{} worker streams are connected, the configured maximum (max_worker_streams)",
                coord.links.len()
            ))
            .into());
        }
        let (tx, rx) = mpsc::channel(WORKER_CHANNEL);
        tx.try_send(ToWorker::Welcome {
            heartbeat_interval_ms: cfg.heartbeat_interval_ms(),
            heartbeat_timeout_ms: cfg.scheduler().heartbeat_timeout_ms,
            max_message_bytes: cfg.max_message_bytes as u64,
        })
        .map_err(|_| Status::internal("fresh channel is full"))?;
        let conn = coord.worker_connected(hello, tx)?;
        let span = info_span!("worker_stream", worker_id = %worker, conn);
        tokio::spawn(
            async move {
                let reason = loop {
                    match inbound.message().await {
                        Ok(Some(m)) => {
                            let Some(msg) = m.msg else {
                                warn!("message without content; ignored");
                                continue;
                            };
                            let going_away = matches!(msg, pb::worker_message::Msg::GoingAway(_));
                            let res = coord.worker_message(&worker, conn, msg);
                            if let Err(e) = res {
                                warn!(error = %e, "worker message ignored");
                            }
                            if going_away || !coord.is_current(&worker, conn) {
                                return;
                            }
                        }
                        Ok(None) => break "closed its stream".to_string(),
                        Err(e) => break format!("stream failed: {}", e.message()),
                    }
                };
                coord.worker_gone(&worker, conn, &reason, false);
            }
            .instrument(span),
        );
        // Protobuf is built here, on the stream's task, outside any lock.
        let out = ReceiverStream::new(rx).map(|m| Ok(pb::CoordinatorMessage::from(m)));
        Ok(Response::new(Box::pin(out)))
    }
}
