//! The records of unfinished jobs: what was decided, what is visible, who
//! watches.
//!
//! Each job has two copies of its record: `decided` follows the scheduler's
//! decisions and is what the store is asked to write; `visible` is what the
//! store has committed and what clients see. The store's commit callback
//! (`committed`) moves a decided record to visible and tells watchers, in
//! commit order. A finished job leaves this map once its final state is
//! committed; from then on it is read from the store, so memory holds only
//! unfinished jobs, never the retained history.
//!
//! This module takes no scheduler lock and does no I/O.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::broadcast;

use super::store::StoredJob;
use crate::config::JobLimits;
use crate::error::{Error, Result};
use crate::types::*;

/// Events queued per watcher before it is told it lagged.
const WATCH_BUFFER: usize = 256;

struct Live {
    decided: JobRecord,
    visible: JobRecord,
    owner: Arc<str>,
    key: Option<String>,
    /// The attempt the scheduler gave out last, and to whom: only that
    /// worker may reclaim it after a reconnect or a restart.
    last_run: Option<(WorkerId, u32)>,
    /// The attempt running now, as decided (progress is checked against it).
    current: Option<(WorkerId, u32)>,
    /// Created by the first watcher and dropped when the job ends.
    events: Option<broadcast::Sender<JobEvent>>,
    /// When the job is estimated to start (scheduler clock), while queued.
    estimate_ms: Option<Millis>,
    failures: u32,
}

/// Why a submission could not reserve its place.
pub(super) enum Reserve {
    Ok,
    /// An unfinished job already has this idempotency key.
    Duplicate(JobId),
}

#[derive(Default)]
pub(super) struct Records {
    live: DashMap<JobId, Live>,
    /// Idempotency keys (scoped) of jobs not yet finished, including jobs
    /// being submitted. Finished jobs' keys are found in the store.
    keys: DashMap<String, JobId>,
    /// Unfinished jobs (and submissions in flight) per client, and in all.
    per_client: DashMap<Arc<str>, usize>,
    unfinished: AtomicUsize,
}

impl Records {
    /// Holds a place for a job being submitted: counts it against its
    /// client's limit and reserves its idempotency key.
    pub(super) fn reserve(
        &self,
        id: &JobId,
        client: &str,
        key: Option<&str>,
        limits: &JobLimits,
    ) -> Result<Reserve> {
        let unfinished = self.unfinished.load(Ordering::Relaxed);
        if unfinished >= limits.max_unfinished_jobs {
            return Err(Error::ResourceExhausted(format!(
                "{unfinished} jobs are unfinished, the configured maximum (limits.max_unfinished_jobs)"
            )));
        }
        let client: Arc<str> = Arc::from(client);
        {
            let mut n = self.per_client.entry(client.clone()).or_insert(0);
            if *n >= limits.max_unfinished_jobs_per_client {
                return Err(Error::ResourceExhausted(format!(
                    "client {client:?} has {} unfinished jobs, the configured maximum \
                     (limits.max_unfinished_jobs_per_client)",
                    *n
                )));
            }
            *n += 1;
        }
        self.unfinished.fetch_add(1, Ordering::Relaxed);
        if let Some(k) = key {
            match self.keys.entry(k.to_owned()) {
                Entry::Occupied(e) => {
                    let earlier = e.get().clone();
                    drop(e);
                    self.release(&client, None);
                    return Ok(Reserve::Duplicate(earlier));
                }
                Entry::Vacant(e) => {
                    e.insert(id.clone());
                }
            }
        }
        Ok(Reserve::Ok)
    }

    /// Gives back what `reserve` (or an unfinished job) held.
    pub(super) fn release(&self, client: &str, key: Option<&str>) {
        if let Some(mut n) = self.per_client.get_mut(client) {
            *n = n.saturating_sub(1);
        }
        let _ = self
            .unfinished
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if let Some(k) = key {
            self.keys.remove(k);
        }
    }

    /// A job whose record the store holds (just accepted, or restored).
    pub(super) fn insert(&self, job: &StoredJob, last_run: Option<(WorkerId, u32)>) {
        let record = job.record();
        self.live.insert(
            job.id.clone(),
            Live {
                decided: record.clone(),
                visible: record,
                owner: Arc::from(job.client.as_str()),
                key: job.scoped_key(),
                last_run,
                current: None,
                events: None,
                estimate_ms: None,
                failures: job.failures,
            },
        );
    }

    /// For a restored job: takes its place in the per-client count and
    /// its idempotency key.
    pub(super) fn count_restored(&self, job: &StoredJob) {
        *self
            .per_client
            .entry(Arc::from(job.client.as_str()))
            .or_insert(0) += 1;
        self.unfinished.fetch_add(1, Ordering::Relaxed);
        if let Some(k) = job.scoped_key() {
            self.keys.insert(k, job.id.clone());
        }
    }

    pub(super) fn spec(&self, id: &JobId) -> Option<Arc<JobSpec>> {
        self.live.get(id).map(|l| l.decided.spec.clone())
    }

    pub(super) fn set_current(&self, id: &JobId, current: Option<(WorkerId, u32)>) {
        if let Some(mut l) = self.live.get_mut(id) {
            if let Some(c) = &current {
                l.last_run = Some(c.clone());
            }
            l.current = current;
        }
    }

    pub(super) fn last_run(&self, id: &JobId) -> Option<(WorkerId, u32)> {
        self.live.get(id).and_then(|l| l.last_run.clone())
    }

    /// Applies a decision to a job's record. Returns what to store, the
    /// record to show once stored, and the event to send then.
    pub(super) fn decide(
        &self,
        id: &JobId,
        now: Millis,
        failures: u32,
        f: impl FnOnce(&mut JobRecord) -> Option<JobEventKind>,
    ) -> Option<(StoredJob, JobRecord, Option<JobEventKind>)> {
        let mut l = self.live.get_mut(id)?;
        if l.decided.state.is_terminal() {
            return None;
        }
        let event = f(&mut l.decided);
        l.decided.updated_ms = now;
        l.failures = failures;
        let r = &l.decided;
        let stored = StoredJob {
            id: r.id.clone(),
            client: l.owner.to_string(),
            spec: r.spec.as_ref().clone(),
            state: r.state,
            attempt: r.attempt,
            failures,
            worker: r.worker.clone(),
            tier: r.tier,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
            error: r.error.clone(),
            result: r.output.as_ref().map(|o| super::store::StoredResult {
                images: o.image_count as usize,
                timings: o.timings,
                worker_id: o.worker_id.clone(),
            }),
            last_worker: l.last_run.as_ref().map(|(w, _)| w.clone()),
        };
        Some((stored, r.clone(), event))
    }

    /// The store committed `record`: show it, and tell watchers. A finished
    /// job leaves the map (the store answers for it from now on).
    pub(super) fn committed(&self, record: JobRecord, event: Option<JobEventKind>, at_ms: Millis) {
        let id = record.id.clone();
        let terminal = record.state.is_terminal();
        let Some(mut l) = self.live.get_mut(&id) else {
            return;
        };
        l.visible = record;
        if let (Some(tx), Some(kind)) = (&l.events, event) {
            // Watchers that went away are fine.
            let _ = tx.send(JobEvent {
                job_id: id.clone(),
                at_ms,
                kind,
            });
        }
        if !terminal {
            return;
        }
        let (owner, key) = (l.owner.clone(), l.key.clone());
        drop(l);
        self.live.remove(&id);
        self.release(&owner, None);
        if let Some(k) = key {
            self.keys.remove_if(&k, |_, v| v == &id);
        }
    }

    /// An event that is not a state change (progress). Refused unless the
    /// attempt is the current one; sent to watchers only once its
    /// assignment is visible (progress can outrun the assignment's commit,
    /// and a client must not see an attempt a crash could take back).
    pub(super) fn progress(
        &self,
        id: &JobId,
        worker: &WorkerId,
        attempt: u32,
        at_ms: Millis,
        kind: JobEventKind,
    ) -> Result<()> {
        let l = self
            .live
            .get(id)
            .ok_or_else(|| Error::UnknownJob(id.clone()))?;
        if l.current.as_ref().map(|(w, a)| (w, *a)) != Some((worker, attempt)) {
            return Err(Error::FailedPrecondition(format!(
                "progress of job {id} attempt {attempt}, which is not running on {worker}"
            )));
        }
        let v = &l.visible;
        let shown = v.state == JobState::Running
            && v.attempt == attempt
            && v.worker.as_ref() == Some(worker);
        if !shown {
            return Ok(());
        }
        if let Some(tx) = &l.events {
            let _ = tx.send(JobEvent {
                job_id: id.clone(),
                at_ms,
                kind,
            });
        }
        Ok(())
    }

    /// The visible record, its owner and its start estimate.
    pub(super) fn get(&self, id: &JobId) -> Option<(JobRecord, Arc<str>, Option<Millis>)> {
        self.live
            .get(id)
            .map(|l| (l.visible.clone(), l.owner.clone(), l.estimate_ms))
    }

    /// The visible record and a receiver of later events; `None` if the
    /// job is not unfinished here.
    pub(super) fn watch(
        &self,
        id: &JobId,
    ) -> Option<(JobRecord, Option<Millis>, broadcast::Receiver<JobEvent>)> {
        let mut l = self.live.get_mut(id)?;
        let rx = l
            .events
            .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe();
        Some((l.visible.clone(), l.estimate_ms, rx))
    }

    pub(super) fn owner(&self, id: &JobId) -> Option<Arc<str>> {
        self.live.get(id).map(|l| l.owner.clone())
    }

    /// Whether an unfinished job names `model` as a LoRA, VAE or upscaler.
    pub(super) fn uses_extra(&self, model: &ModelId) -> bool {
        self.live
            .iter()
            .any(|l| l.decided.spec.extra_models().contains(model))
    }

    /// Queued jobs, for refreshing their start estimates.
    pub(super) fn queued(&self) -> Vec<JobId> {
        self.live
            .iter()
            .filter(|l| l.decided.state == JobState::Queued)
            .map(|l| l.key().clone())
            .collect()
    }

    pub(super) fn set_estimate(&self, id: &JobId, at_ms: Option<Millis>) {
        if let Some(mut l) = self.live.get_mut(id) {
            l.estimate_ms = at_ms;
        }
    }

    /// The idempotency key's job, if it is unfinished or being submitted.
    pub(super) fn key_owner(&self, key: &str) -> Option<JobId> {
        self.keys.get(key).map(|e| e.clone())
    }

    /// Forgets everything (the store is being reloaded). Watchers' streams
    /// end; clients watch again.
    pub(super) fn clear(&self) {
        self.live.clear();
        self.keys.clear();
        self.per_client.clear();
        self.unfinished.store(0, Ordering::Relaxed);
    }
}
