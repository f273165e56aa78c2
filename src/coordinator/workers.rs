//! `Workers.Connect`: one bidirectional stream per worker.
//!
//! The first message must be `Hello`; the answer starts with `Welcome`. One
//! task reads the inbound stream; the coordinator writes through a bounded
//! channel that is the response stream. A stream that ends without
//! `GoingAway` means the worker is gone.
//!
//! What a worker sends is checked before the coordinator acts on it
//! (`convert::check_report_lengths`, `convert::check_worker_message`):
//! - A Hello or Heartbeat listing more models, downloads or running
//!   attempts than `limits.*` allow is refused with RESOURCE_EXHAUSTED
//!   naming the list and the setting: the Hello's call fails, and a
//!   Heartbeat closes its stream with that status (the worker reconnects).
//! - A message with a malformed field (attempt 0, an empty job id) is
//!   ignored with a warning; reasons are cut to `limits.max_worker_reason_bytes`.
//! - Where worker tokens are bound to ids (`[[auth.workers]]`), a Hello
//!   with another id is refused with PERMISSION_DENIED.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, warn, Instrument};

use super::auth::Caller;
use super::fleet::WORKER_CHANNEL;
use super::{Coordinator, ToWorker};
use crate::error::Error;
use crate::pb;
use crate::types::WorkerHello;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WorkersService(pub Arc<Coordinator>);

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// Reads the first message: a Hello, checked against the limits and the
/// caller's token before it is converted.
async fn read_hello(
    inbound: &mut Streaming<pb::WorkerMessage>,
    coord: &Coordinator,
    caller: &Caller,
) -> Result<(WorkerHello, Option<crate::cloud::CloudInstance>), Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??
        .ok_or_else(|| Status::invalid_argument("stream closed before Hello"))?;
    if let Some(pb::worker_message::Msg::Hello(h)) = &first.msg {
        if let Some(state) = &h.state {
            crate::convert::check_report_lengths(state, &coord.config().limits, "hello.state")
                .inspect_err(|e| warn!(worker_id = %h.worker_id, error = %e, "Hello refused"))?;
        }
    }
    let cloud = crate::convert::hello_cloud(&first.msg)?;
    let hello = crate::convert::required_hello(first.msg)?;
    caller.check_worker_id(&hello.worker_id)?;
    Ok((hello, cloud))
}

#[tonic::async_trait]
impl pb::workers_server::Workers for WorkersService {
    type ConnectStream = OutStream;

    async fn connect(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = Caller::of(&req)?;
        let mut inbound = req.into_inner();
        let coord = self.0.clone();
        let (hello, cloud) = read_hello(&mut inbound, &coord, &caller).await?;
        let worker = hello.worker_id.clone();
        let cfg = coord.config();
        if coord.links.len() >= cfg.max_worker_streams && !coord.links.contains_key(&worker) {
            return Err(Error::ResourceExhausted(format!(
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
        coord.cloud_hello(&worker, cloud);
        // A refusal ends the response stream with its status.
        let (refuse, refused) = oneshot::channel::<Status>();
        let span = info_span!("worker_stream", worker_id = %worker, conn);
        tokio::spawn(
            async move {
                let reason = loop {
                    match inbound.message().await {
                        Ok(Some(m)) => {
                            let Some(mut msg) = m.msg else {
                                warn!("message without content; ignored");
                                continue;
                            };
                            match crate::convert::check_worker_message(
                                &mut msg,
                                &coord.config().limits,
                            ) {
                                Ok(()) => {}
                                Err(e @ Error::ResourceExhausted(_)) => {
                                    warn!(error = %e, "worker report refused; closing its stream");
                                    let _ = refuse.send(e.duplicate().into());
                                    break format!("report refused: {e}");
                                }
                                Err(e) => {
                                    warn!(error = %e, "worker message refused");
                                    continue;
                                }
                            }
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
        let messages = ReceiverStream::new(rx).map(|m| Ok(pb::CoordinatorMessage::from(m)));
        let refusal =
            futures::stream::once(refused).filter_map(|r| futures::future::ready(r.ok().map(Err)));
        let out = futures::stream::select(messages, refusal);
        Ok(Response::new(Box::pin(out)))
    }
}
