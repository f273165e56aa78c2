//! The ceiling `corral bench --ceiling` compares Corral with: the smallest
//! tonic program that does one job's exchange with the same workers, the
//! same clients and the same messages (SubmitJob, an Assign down the
//! worker's stream, the result back, the job counted done), with no
//! scheduling, no store and no records. It hands each job to the next free
//! worker slot, first come first served.
//!
//! It serves Corral's own `Jobs.SubmitJob` and `Workers.Connect`, so the
//! benchmark's clients and worker fleet run unchanged against it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb;

type Tx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

#[derive(Default)]
struct Queues {
    /// Jobs no slot has taken yet.
    jobs: VecDeque<pb::Assign>,
    /// Free slots: a worker's sender per free slot.
    free: VecDeque<Tx>,
}

/// The minimal server; see the module docs.
pub struct Ceiling {
    model: pb::Model,
    queues: Mutex<Queues>,
    next: AtomicU64,
    pub completed: AtomicU64,
    pub messages: AtomicU64,
    pub workers: AtomicU64,
}

impl Ceiling {
    pub fn new(model: pb::Model) -> Arc<Self> {
        Arc::new(Self {
            model,
            queues: Mutex::new(Queues::default()),
            next: AtomicU64::new(1),
            completed: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            workers: AtomicU64::new(0),
        })
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives `job` to a free slot, or queues it.
    fn dispatch(&self, job: pb::Assign) {
        let mut q = self.queues();
        while let Some(tx) = q.free.pop_front() {
            let msg = pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::Assign(job.clone())),
            };
            if tx.try_send(Ok(msg)).is_ok() {
                self.messages.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        q.jobs.push_back(job);
    }

    /// A slot of the worker behind `tx` is free: give it the next job.
    fn slot_free(&self, tx: &Tx) {
        let mut q = self.queues();
        match q.jobs.pop_front() {
            Some(job) => {
                let msg = pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::Assign(job)),
                };
                if tx.try_send(Ok(msg)).is_ok() {
                    self.messages.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => q.free.push_back(tx.clone()),
        }
    }

    /// The gRPC services, ready to add to a server.
    pub fn services(
        self: &Arc<Self>,
    ) -> (
        pb::jobs_server::JobsServer<CeilingJobs>,
        pb::workers_server::WorkersServer<CeilingWorkers>,
    ) {
        (
            pb::jobs_server::JobsServer::new(CeilingJobs(self.clone())),
            pb::workers_server::WorkersServer::new(CeilingWorkers(self.clone())),
        )
    }
}

pub struct CeilingJobs(Arc<Ceiling>);

type Events = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for CeilingJobs {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let spec = req.into_inner().spec;
        let id = format!("j-{}", self.0.next.fetch_add(1, Ordering::Relaxed));
        self.0.dispatch(pb::Assign {
            job_id: id.clone(),
            attempt: 1,
            spec: spec.clone(),
            model: Some(self.0.model.clone()),
            queued_s: 0.0,
            extra_models: Vec::new(),
        });
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(pb::Job {
                id,
                spec,
                state: pb::JobState::Queued as i32,
                ..Default::default()
            }),
            deduplicated: false,
        }))
    }

    async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("the ceiling serves SubmitJob only"))
    }

    type WatchJobStream = Events;

    async fn watch_job(&self, _: Request<pb::WatchJobRequest>) -> Result<Response<Events>, Status> {
        Err(Status::unimplemented("the ceiling serves SubmitJob only"))
    }

    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("the ceiling serves SubmitJob only"))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(Status::unimplemented("the ceiling serves SubmitJob only"))
    }
}

pub struct CeilingWorkers(Arc<Ceiling>);

type Down = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::workers_server::Workers for CeilingWorkers {
    type ConnectStream = Down;

    async fn connect(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Down>, Status> {
        let mut inbound = req.into_inner();
        let slots = match inbound.message().await? {
            Some(pb::WorkerMessage {
                msg: Some(pb::worker_message::Msg::Hello(h)),
            }) => h.max_concurrent_jobs.max(1),
            _ => return Err(Status::invalid_argument("Hello first")),
        };
        let (tx, rx) = mpsc::channel(4096);
        let welcome = pb::Welcome {
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            max_message_bytes: 64 << 20,
        };
        tx.try_send(Ok(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Welcome(welcome)),
        }))
        .map_err(|_| Status::internal("fresh channel is full"))?;
        let c = self.0.clone();
        c.workers.fetch_add(1, Ordering::Relaxed);
        for _ in 0..slots {
            c.slot_free(&tx);
        }
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                c.messages.fetch_add(1, Ordering::Relaxed);
                if let Some(pb::worker_message::Msg::Result(_)) = m.msg {
                    c.completed.fetch_add(1, Ordering::Relaxed);
                    c.slot_free(&tx);
                }
            }
            c.workers.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| m))))
    }
}
