//! The coordinator's side of worker streams: who is connected, what a
//! worker's messages change, and what is sent to it.
//!
//! Messages to a worker go into its bounded channel as [`ToWorker`] values,
//! in decision order; the stream's task converts them to protobuf, outside
//! any lock. A worker whose channel is full is dropped like a dead one.
//!
//! Rules a worker lives by (also in workers.proto):
//! - One live stream per worker id. A second `Hello` with the id of a
//!   worker heard from within the last two heartbeat intervals is refused with
//!   ALREADY_EXISTS; a silent one is replaced.
//! - A worker that misses its heartbeats is removed and its stream closed,
//!   so that it reconnects (and has its running attempts vetted).
//! - Results are checked: the attempt must be current, the image count must
//!   match the request, and each image must be a PNG.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::store::Op;
use super::Coordinator;
use crate::error::{Error, Result};
use crate::pb;
use crate::scheduler::{Effect, Scheduler};
use crate::types::*;

/// A message to one worker (see workers.proto for each).
#[derive(Clone, Debug)]
pub enum ToWorker {
    Welcome {
        heartbeat_interval_ms: u64,
        heartbeat_timeout_ms: u64,
        max_message_bytes: u64,
    },
    Assign {
        job: JobId,
        attempt: u32,
        spec: Arc<JobSpec>,
        model: Arc<ModelManifest>,
        /// `spec.extra_models()`, in that order.
        extras: Vec<Arc<ModelManifest>>,
        queued_ms: Millis,
    },
    Cancel {
        job: JobId,
        attempt: u32,
    },
    Prefetch(Vec<Arc<ModelManifest>>),
    /// Stop taking jobs; `reallocate`: then move to another machine.
    Drain {
        reason: String,
        reallocate: bool,
    },
    /// The deletion cost to set (cloud workers only).
    Advice {
        deletion_cost: i32,
    },
}

pub type WorkerTx = mpsc::Sender<ToWorker>;

/// Outbound queue per worker stream.
pub(super) const WORKER_CHANNEL: usize = 4096;

pub(super) struct WorkerLink {
    conn: u64,
    tx: WorkerTx,
}

/// The eight bytes every PNG file starts with.
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

impl Coordinator {
    /// Sends to a worker; false when it cannot be reached.
    pub(super) fn send(&self, worker: &WorkerId, msg: ToWorker) -> bool {
        let Some(link) = self.links.get(worker) else {
            return false;
        };
        let ok = link.tx.try_send(msg).is_ok();
        drop(link);
        if ok {
            self.metrics.messages_sent.inc();
        } else {
            warn!(worker_id = %worker, "outbound channel closed or full; dropping the worker");
            self.links.remove(worker);
        }
        ok
    }

    /// A worker said hello on a new stream. Returns the connection id that
    /// later calls for this stream present, or refuses a second live
    /// stream for the same id.
    pub(super) fn worker_connected(&self, mut hello: WorkerHello, tx: WorkerTx) -> Result<u64> {
        self.check_serving()?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let id = hello.worker_id.clone();
        let rejected = self.vet_reported(&mut hello);
        let reported: Vec<RunningJob> = hello.state.running_jobs.clone();
        // Two intervals: a heartbeat sent on time can arrive a little late
        // (a loaded machine, a slow network), and a live worker must never
        // look silent between two of its heartbeats.
        let fresh_ms = 2 * self.cfg.heartbeat_interval_ms();
        self.with_sched(|s, now| {
            if self.links.contains_key(&id) {
                let heard = s
                    .worker(&id)
                    .is_some_and(|w| now.saturating_sub(w.last_seen_ms) <= fresh_ms);
                if heard {
                    return Err(Error::AlreadyExists(format!(
                        "worker id {id} is connected and was heard from within the last two \
                         heartbeat intervals; give each worker its own --worker-id"
                    )));
                }
                warn!(worker_id = %id, "a silent stream is replaced by a new connection");
            }
            info!(worker_id = %id, conn, slots = hello.max_concurrent_jobs, "worker connected");
            self.metrics.workers_connected.inc();
            // Replace any older stream first, so its effects go nowhere.
            self.links.insert(id.clone(), WorkerLink { conn, tx });
            let mut effects = self.refuse_reported(s, &id, &rejected, now);
            effects.extend(s.connect(hello, now));
            // Attempts the worker kept across a dropped stream run on.
            for r in &reported {
                let kept = s
                    .job(&r.job_id)
                    .is_some_and(|j| j.worker.as_ref() == Some(&id) && j.attempt == r.attempt);
                if kept {
                    info!(job_id = %r.job_id, worker_id = %id, "attempt kept across reconnect");
                    self.records
                        .set_current(&r.job_id, Some((id.clone(), r.attempt)));
                    let (w, attempt) = (id.clone(), r.attempt);
                    self.transition(s, &r.job_id, now, Vec::new(), move |rec| {
                        let changed = rec.state != JobState::Running
                            || rec.worker.as_ref() != Some(&w)
                            || rec.attempt != attempt;
                        rec.state = JobState::Running;
                        rec.worker = Some(w.clone());
                        rec.attempt = attempt;
                        rec.error.clear();
                        let tier = rec.tier.unwrap_or(CacheTier::Disk);
                        rec.tier = Some(tier);
                        changed.then_some(JobEventKind::Assigned {
                            worker: w,
                            tier,
                            attempt,
                        })
                    });
                }
            }
            Ok((conn, effects))
        })
    }

    /// Ends every worker's response stream (at shutdown); workers reconnect.
    pub fn close_worker_streams(&self) {
        info!(workers = self.links.len(), "closing worker streams");
        self.links.clear();
    }

    pub(super) fn is_current(&self, worker: &WorkerId, conn: u64) -> bool {
        self.links.get(worker).is_some_and(|l| l.conn == conn)
    }

    fn check_stream(&self, worker: &WorkerId, conn: u64) -> Result<()> {
        if self.is_current(worker, conn) {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(
                "message on a replaced or closed stream".into(),
            ))
        }
    }

    /// The stream `conn` of `worker` ended (`graceful`: after GoingAway).
    pub(super) fn worker_gone(&self, worker: &WorkerId, conn: u64, reason: &str, graceful: bool) {
        if self
            .links
            .remove_if(worker, |_, l| l.conn == conn)
            .is_none()
        {
            return; // a newer stream replaced this one, or it was dropped already
        }
        info!(worker_id = %worker, reason, graceful, "worker gone");
        self.metrics.workers_disconnected.inc();
        let _ = self.with_sched_as(FailureKind::WorkerLost, |s, now| {
            Ok(((), s.disconnect(worker, reason, graceful, now)))
        });
    }

    /// One message from a worker's stream. Errors are the worker's fault
    /// (stale or foreign job ids): the caller logs them and goes on.
    pub(super) fn worker_message(
        &self,
        worker: &WorkerId,
        conn: u64,
        msg: pb::worker_message::Msg,
    ) -> Result<()> {
        use pb::worker_message::Msg;
        self.metrics.messages_received.inc();
        self.check_stream(worker, conn)?;
        match msg {
            Msg::Hello(_) => Err(Error::invalid("msg", "Hello may only be sent once")),
            Msg::Heartbeat(h) => {
                let report = CacheReport::try_from(h)?;
                self.with_sched(|s, now| Ok(((), s.heartbeat(worker, report, now)?)))
            }
            Msg::Progress(p) => {
                let job = crate::convert::job_id(p.job_id.clone())?;
                let phase = crate::convert::job_phase(&p)?;
                let kind = match phase {
                    JobPhase::Downloading {
                        bytes_done,
                        bytes_total,
                    } => JobEventKind::Downloading {
                        bytes_done,
                        bytes_total,
                    },
                    JobPhase::Loading => JobEventKind::Loading,
                    JobPhase::Denoising { step, total_steps } => {
                        // Image-to-image runs only the last part of the schedule.
                        let steps = self.records.spec(&job).map_or(0, |s| s.steps);
                        if step > total_steps || total_steps > steps {
                            return Err(Error::invalid(
                                "progress",
                                format!("step {step} of {total_steps} for a job of {steps} steps"),
                            ));
                        }
                        JobEventKind::Progress { step, total_steps }
                    }
                };
                self.records
                    .progress(&job, worker, p.attempt, self.now_ms(), kind)
            }
            Msg::Result(r) => self.worker_result(worker, r),
            Msg::Failed(f) => {
                let job = crate::convert::job_id(f.job_id)?;
                // A third-party worker may not redact: the reason reaches
                // clients and logs.
                let reason = crate::redact::text(&f.reason);
                let kind = crate::convert::failure_kind_from_pb(f.kind);
                self.with_sched_as(kind, |s, now| {
                    let effects =
                        s.fail(worker, &job, f.attempt, &reason, f.retryable, now)?;
                    // Counted only once accepted: a stale report changes nothing.
                    warn!(job_id = %job, worker_id = %worker, attempt = f.attempt, %reason, retryable = f.retryable, kind = kind.as_str(), "attempt failed");
                    self.metrics.attempt_failed(kind);
                    self.cloud.attempt_failed(worker, kind, now);
                    Ok(((), effects))
                })
            }
            Msg::PrefetchFailed(p) => {
                warn!(worker_id = %worker, model_id = %p.model_id, reason = %crate::redact::text(&p.reason), "prefetch failed");
                Ok(())
            }
            Msg::GoingAway(g) => {
                let reason = crate::redact::text(&g.reason);
                self.worker_gone(worker, conn, &format!("went away: {reason}"), true);
                Ok(())
            }
        }
    }

    /// A worker's result. Checked, then the attempt completes in the
    /// scheduler (its slot is free at once); the completed record and the
    /// images are committed together, and only then does any client hear
    /// of it. A result that fails the checks fails the attempt instead.
    fn worker_result(&self, worker: &WorkerId, r: pb::JobResult) -> Result<()> {
        let job = crate::convert::job_id(r.job_id)?;
        let attempt = r.attempt;
        let timings: Timings = r.timings.map(Into::into).unwrap_or_default();
        let images: Vec<Bytes> = r.images;
        let spec = self
            .records
            .spec(&job)
            .ok_or_else(|| Error::UnknownJob(job.clone()))?;
        if let Err(problem) = check_images(&spec, &images) {
            let reason = format!("invalid result from worker {worker}: {problem}");
            return self.with_sched_as(FailureKind::Result, |s, now| {
                let effects = s.fail(worker, &job, attempt, &reason, true, now)?;
                warn!(job_id = %job, worker_id = %worker, attempt, %reason, "result refused");
                self.metrics.attempt_failed(FailureKind::Result);
                Ok(((), effects))
            });
        }
        let output = Arc::new(JobOutput {
            image_count: images.len() as u32,
            timings,
            worker_id: worker.clone(),
        });
        let shared: Images = images.clone().into();
        self.with_sched(|s, now| {
            let effects = s.complete(worker, &job, attempt, now)?;
            self.records.set_current(&job, None);
            let ops = vec![Op::PutImages {
                job: job.clone(),
                images,
            }];
            let out = output.clone();
            self.transition(s, &job, now, ops, move |rec| {
                rec.state = JobState::Completed;
                rec.output = Some(out.clone());
                rec.error.clear();
                Some(JobEventKind::Completed {
                    output: out,
                    images: shared,
                })
            });
            Ok(((), effects))
        })?;
        info!(job_id = %job, worker_id = %worker, tier = timings.tier.map_or("?", |t| t.as_str()), "completed");
        self.observe_completed(&spec, &timings);
        Ok(())
    }

    /// Keeps, of the attempts a reconnecting worker says it runs, only
    /// those last assigned to it (attempt numbers start at 1), at most one
    /// per slot; returns the others, which the caller cancels. Without this
    /// a worker could claim any queued job by naming it in its Hello.
    fn vet_reported(&self, hello: &mut WorkerHello) -> Vec<RunningJob> {
        let slots = hello.max_concurrent_jobs as usize;
        let mut kept = Vec::new();
        let mut rejected = Vec::new();
        for r in std::mem::take(&mut hello.state.running_jobs) {
            let ours = r.attempt > 0
                && self
                    .records
                    .last_run(&r.job_id)
                    .is_some_and(|l| l.0 == hello.worker_id && l.1 == r.attempt);
            if ours && kept.len() < slots {
                kept.push(r);
            } else {
                rejected.push(r);
            }
        }
        if !rejected.is_empty() {
            warn!(worker_id = %hello.worker_id, rejected = rejected.len(), "reported attempts not assigned to this worker");
        }
        hello.state.running_jobs = kept;
        rejected
    }

    /// Cancels, on the worker, the attempts `vet_reported` refused (before
    /// anything else is sent on its new stream). One case is a crash: the
    /// worker runs attempt `n + 1` of a job the store has queued at attempt
    /// `n`, because the coordinator died after assigning it but before
    /// recording that. Such a job is queued again numbered `n + 1`, so its
    /// next assignment is `n + 2`: a number is never given out twice, and
    /// the cancelled run's late report is refused as stale.
    fn refuse_reported(
        &self,
        s: &mut Scheduler,
        worker: &WorkerId,
        rejected: &[RunningJob],
        now: Millis,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        for r in rejected {
            self.send(
                worker,
                ToWorker::Cancel {
                    job: r.job_id.clone(),
                    attempt: r.attempt,
                },
            );
            let Some(j) = s.job(&r.job_id) else { continue };
            if j.worker.is_some() || r.attempt != j.attempt + 1 {
                continue;
            }
            let (spec, submitted, failures) = (j.spec.clone(), j.submitted_ms, j.failures);
            if let Ok(e) = s.cancel(&r.job_id, now) {
                effects.extend(e);
            }
            s.restore_job(r.job_id.clone(), spec, submitted, r.attempt, failures);
            self.transition(s, &r.job_id, now, Vec::new(), |rec| {
                rec.attempt = r.attempt;
                None
            });
            warn!(job_id = %r.job_id, attempt = r.attempt, "attempt was not recorded before a restart; renumbered");
        }
        effects
    }
}

/// Whether a result's images are what the job asked for.
fn check_images(spec: &JobSpec, images: &[Bytes]) -> std::result::Result<(), String> {
    if images.len() != spec.num_images as usize {
        return Err(format!(
            "{} images for a job of {}",
            images.len(),
            spec.num_images
        ));
    }
    if let Some(i) = images.iter().position(|p| !p.starts_with(PNG_SIGNATURE)) {
        return Err(format!("image {i} is not a PNG file"));
    }
    Ok(())
}
