//! Matching: which queued job each free worker starts, after a submit, on
//! a freed worker, and in the periodic full pass.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::{Effect, Scheduler};
use crate::types::{CacheTier, JobId, Millis, ModelId, WorkerId};

use super::state::{JobEntry, QueueKey, WorkerEntry};

/// The two soonest holder starts of a model, for one matching pass.
#[derive(Clone, Debug)]
pub(super) struct Soonest {
    pub(super) best: Millis,
    pub(super) best_id: Option<WorkerId>,
    pub(super) second: Millis,
}

/// What one matching pass remembers until its next assignment.
#[derive(Default)]
pub(super) struct Memo {
    /// Worth filling: the pass has several workers to match.
    pub(super) shared: bool,
    pub(super) soonest: BTreeMap<ModelId, Soonest>,
    /// Queued models (oldest heads first) that some worker might do better
    /// to fetch than to wait for a holder.
    pub(super) cold: Option<Vec<ModelId>>,
}

impl Memo {
    pub(super) fn clear(&mut self) {
        self.soonest.clear();
        self.cold = None;
    }
}

impl Scheduler {
    /// Matching after a submit: the free workers holding the model first;
    /// when none holds it, the free worker that could fetch it soonest.
    pub(super) fn schedule_submitted(
        &mut self,
        job: &JobId,
        model: &ModelId,
        now: Millis,
    ) -> Vec<Effect> {
        // Free holders, soonest start first; stop once the job is placed.
        let mut held: Vec<(Millis, WorkerId)> =
            self.holders.get(model).map_or_else(Vec::new, |h| {
                h.iter()
                    .filter(|w| self.free.contains(*w))
                    .filter_map(|id| {
                        let w = self.workers.get(id)?;
                        Some((
                            self.start_here_ms(w, model, now) + self.generate_ms(w, model),
                            id.clone(),
                        ))
                    })
                    .collect()
            });
        held.sort();
        let mut effects = Vec::new();
        for (_, worker) in held.into_iter().take(4) {
            effects.extend(self.schedule_among(vec![worker], false, now));
            if self.jobs.get(job).is_some_and(|j| j.worker.is_some()) {
                return effects;
            }
        }
        let still_queued = self.jobs.get(job).is_some_and(|j| j.worker.is_none());
        if still_queued && self.holders.get(model).is_none_or(|h| h.is_empty()) {
            let best = self
                .free
                .iter()
                .filter_map(|id| {
                    let w = &self.workers[id];
                    self.can_run(w, model)
                        .then(|| (self.start_here_ms(w, model, now), id.clone()))
                })
                .min();
            if let Some((_, worker)) = best {
                effects.push(self.assign(&worker, job, CacheTier::Download, now));
            }
        }
        effects
    }

    /// Assigns queued jobs to workers with free slots until no worker can
    /// start a job sooner than it would start elsewhere. A full pass over
    /// the free workers; operations on one worker match only that worker
    /// and the coordinator's tick runs this to catch the rest.
    pub fn schedule(&mut self, now: Millis) -> Vec<Effect> {
        if self.by_age.is_empty() {
            return Vec::new();
        }
        let free: Vec<WorkerId> = self.free.iter().cloned().collect();
        self.schedule_among(free, true, now)
    }

    /// Matching restricted to `candidates`, in the order given. `cold`:
    /// also consider models they would have to fetch (the full pass and
    /// new workers do; the frequent per-worker events leave that to the
    /// next full pass, at most a tick away).
    pub(super) fn schedule_among(
        &mut self,
        candidates: Vec<WorkerId>,
        cold: bool,
        now: Millis,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut memo = Memo {
            shared: candidates.len() > 1,
            ..Memo::default()
        };
        for worker in candidates {
            loop {
                if self.by_age.is_empty() {
                    return effects;
                }
                match self.workers.get(&worker) {
                    Some(w) if !w.draining && w.free_slots() > 0 => {}
                    _ => break,
                }
                let Some((job, tier)) = self.best_job_for(&worker, cold, now, &mut memo) else {
                    break;
                };
                effects.push(self.assign(&worker, &job, tier, now));
                memo.clear();
            }
        }
        effects
    }

    pub(super) fn assign(
        &mut self,
        worker: &WorkerId,
        job: &JobId,
        tier: CacheTier,
        now: Millis,
    ) -> Effect {
        let mut entry = self.jobs.remove(job).expect("queued job exists");
        self.dequeue(&entry);
        entry.attempt += 1;
        entry.worker = Some(worker.clone());
        entry.started_ms = Some(now);
        entry.tier = Some(tier);
        let attempt = entry.attempt;
        let queued_ms = now.saturating_sub(entry.submitted_ms);
        self.jobs.insert(job.clone(), entry);
        let w = self.workers.get_mut(worker).expect("worker exists");
        w.running.insert(job.clone(), attempt);
        self.refresh_free(worker);
        Effect::Assign {
            worker: worker.clone(),
            job: job.clone(),
            attempt,
            tier,
            queued_ms,
        }
    }

    /// The job `worker` should start now, if any. Among the heads of the
    /// model queues it could serve, those no other worker would start
    /// sooner; of these, the one with the smallest start estimate net of
    /// the time the job has already waited (so a job needing a load is not
    /// starved by a stream of jobs for the model in VRAM).
    pub(super) fn best_job_for(
        &self,
        worker: &WorkerId,
        cold: bool,
        now: Millis,
        memo: &mut Memo,
    ) -> Option<(JobId, CacheTier)> {
        let w = &self.workers[worker];
        // A starving job goes to the first capable worker, unless a holder
        // of its model is making progress (then the age term below gets it
        // there; sending it to a cold worker under overload only adds
        // downloads).
        if let Some((_, oldest)) = self.by_age.first() {
            let job = &self.jobs[oldest];
            let model = &job.spec.model_id;
            if now.saturating_sub(job.submitted_ms) > self.cfg.starvation_ms
                && self.can_run(w, model)
                && (w.tier_of(model).is_some() || !self.healthy_holder(worker, model, now))
            {
                let tier = w.tier_of(&job.spec.model_id).unwrap_or(CacheTier::Download);
                return Some((oldest.clone(), tier));
            }
        }
        // Candidates: the head of each queue this worker could serve, keyed
        // by (start estimate net of age, priority, age); the age term keeps
        // a job needing a load from being starved by a stream of jobs for
        // the model in VRAM. The best whose model no other worker would
        // start sooner wins; the (costlier) check runs best-first.
        type Key = (i64, Reverse<i32>, u64);
        let key = |est: Millis, job: &JobEntry| -> Key {
            let age = now.saturating_sub(job.submitted_ms) as i64;
            (est as i64 - age, Reverse(job.spec.priority), job.seq)
        };
        let mut cands: Vec<(Key, &ModelId, Millis, CacheTier, bool)> = Vec::new();
        // Models this worker holds: taken unless another worker would start
        // the model's backlog strictly sooner.
        for (model, queue) in self.held_queues(w) {
            let here = self.start_here_ms(w, model, now);
            let head = &self.jobs[&queue.first().expect("queues are never empty").1];
            let tier = w.tier_of(model).expect("held");
            cands.push((key(here, head), model, here, tier, true));
        }
        // Models it would have to fetch, oldest demand first: only when no
        // holder would start them as soon.
        let cold_models = if cold {
            if memo.cold.is_none() {
                memo.cold = Some(self.cold_candidates(memo, now));
            }
            memo.cold.clone().unwrap_or_default()
        } else {
            Vec::new()
        };
        for model in &cold_models {
            if w.tier_of(model).is_some() || !self.can_run(w, model) {
                continue;
            }
            let here = self.start_here_ms(w, model, now);
            let head = &self.jobs[&self.queues[model].first().expect("non-empty").1];
            cands.push((key(here, head), model, here, CacheTier::Download, false));
        }
        cands.sort_by_key(|a| a.0);
        for (_, model, here, tier, held) in cands {
            if !self.sooner_elsewhere(memo, worker, model, here, held, now) {
                let head = &self.queues[model].first().expect("non-empty").1;
                return Some((head.clone(), tier));
            }
        }
        None
    }

    /// The first `cold_scan_models` queued models by head age, less those
    /// a holder starts sooner than any worker could fetch and load them.
    pub(super) fn cold_candidates(&self, memo: &mut Memo, now: Millis) -> Vec<ModelId> {
        let fastest = self
            .free
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.report.download_bps)
            .max()
            .unwrap_or(0);
        let nobody = WorkerId::default();
        self.heads
            .iter()
            .take(self.cfg.cold_scan_models)
            .map(|(_, m)| m)
            .filter(|m| {
                let bytes = self.model_bytes(m);
                let best_cold =
                    self.cfg.cost.download_ms(bytes, fastest) + self.cfg.cost.load_ms(bytes);
                !self.sooner_elsewhere(memo, &nobody, m, best_cold, false, now)
            })
            .cloned()
            .collect()
    }

    pub(super) fn held_queues<'a>(
        &'a self,
        w: &'a WorkerEntry,
    ) -> impl Iterator<Item = (&'a ModelId, &'a BTreeSet<(QueueKey, JobId)>)> + 'a {
        // Walk whichever is shorter: the worker's models or the queues.
        let by_worker = w.vram.len() + w.disk.len() <= self.queues.len();
        let mine = by_worker.then(|| {
            w.vram
                .iter()
                .chain(w.disk.keys().filter(|m| !w.vram.contains(*m)))
                .filter_map(|m| self.queues.get(m).map(|q| (m, q)))
        });
        let queued =
            (!by_worker).then(|| self.queues.iter().filter(|(m, _)| w.tier_of(m).is_some()));
        mine.into_iter()
            .flatten()
            .chain(queued.into_iter().flatten())
    }

    pub(super) fn can_run(&self, w: &WorkerEntry, model: &ModelId) -> bool {
        w.tier_of(model).is_some() || self.models.get(model).is_some_and(|m| w.can_hold(m.bytes))
    }

    /// Whether a worker other than `except` holding (or fetching) `model`
    /// could start the model's queued backlog sooner than `here`
    /// (`strict`: strictly sooner; else no later). Looks at no more than
    /// `holder_scan` holders, so a popular model costs a bounded time, and
    /// remembers the answer per model for one matching pass.
    pub(super) fn sooner_elsewhere(
        &self,
        memo: &mut Memo,
        except: &WorkerId,
        model: &ModelId,
        here: Millis,
        strict: bool,
        now: Millis,
    ) -> bool {
        if strict && here == 0 {
            return false;
        }
        let Some(holders) = self.holders.get(model) else {
            return false;
        };
        let others = holders.len() - usize::from(holders.contains(except));
        if others == 0 {
            return false;
        }
        let queued = self.queues.get(model).map_or(1, |q| q.len()).max(1);
        let backlog = ((queued - 1) / others) as Millis * self.service_ms(model);
        if !memo.shared && !memo.soonest.contains_key(model) {
            // One worker to match: stop at the first holder that wins.
            return holders
                .iter()
                .filter(|id| *id != except)
                .take(self.cfg.holder_scan)
                .filter_map(|id| self.workers.get(id))
                .filter(|w| !w.draining)
                .any(|w| {
                    let there = self.start_here_ms(w, model, now) + backlog;
                    if strict {
                        there < here
                    } else {
                        there <= here
                    }
                });
        }
        let s = memo
            .soonest
            .entry(model.clone())
            .or_insert_with(|| self.soonest_holders(holders, now, model));
        let start = if s.best_id.as_ref() == Some(except) {
            s.second
        } else {
            s.best
        };
        if start == Millis::MAX {
            return false;
        }
        let there = start + backlog;
        if strict {
            there < here
        } else {
            there <= here
        }
    }

    /// The two soonest starts among (the first `holder_scan` of) a model's
    /// holders.
    pub(super) fn soonest_holders(
        &self,
        holders: &BTreeSet<WorkerId>,
        now: Millis,
        model: &ModelId,
    ) -> Soonest {
        let mut s = Soonest {
            best: Millis::MAX,
            best_id: None,
            second: Millis::MAX,
        };
        for id in holders.iter().take(self.cfg.holder_scan) {
            let Some(w) = self.workers.get(id) else {
                continue;
            };
            if w.draining {
                continue;
            }
            let t = self.start_here_ms(w, model, now);
            if t < s.best {
                s.second = s.best;
                s.best = t;
                s.best_id = Some(id.clone());
            } else if t < s.second {
                s.second = t;
            }
        }
        s
    }

    /// Whether some other holder of `model` is free, fetching it, or
    /// running a job that is not long overdue.
    pub(super) fn healthy_holder(&self, except: &WorkerId, model: &ModelId, now: Millis) -> bool {
        self.holders.get(model).is_some_and(|h| {
            h.iter()
                .filter(|id| *id != except)
                .take(self.cfg.holder_scan)
                .filter_map(|id| self.workers.get(id))
                .filter(|w| !w.draining)
                .any(|w| {
                    w.free_slots() > 0
                        || w.is_downloading(model)
                        || w.running.keys().filter_map(|j| self.jobs.get(j)).any(|j| {
                            let elapsed = now.saturating_sub(j.started_ms.unwrap_or(now));
                            elapsed <= 2 * self.expected_run_ms(w, j) + 10_000
                        })
                })
        })
    }
}
