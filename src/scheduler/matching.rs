//! Matching: which queued job a free worker starts.
//!
//! Three entry points, each a bounded amount of work per decision:
//!
//! - after a submit (or a requeue), `place_job` asks the job's model's
//!   free holders, soonest start first, from the holder index; when no
//!   worker holds the model, the free worker that could fetch it soonest
//!   takes it;
//! - on a freed (or new) worker, `schedule_among` asks `best_job_for`: the
//!   heads of the queues of the models it holds, and (for new workers and
//!   the full pass) the oldest queued models it could fetch;
//! - `schedule`, the periodic full pass, asks every free worker.
//!
//! A worker takes a model's job unless the other holders would start the
//! model's backlog sooner (`sooner_elsewhere`: a few steps into the holder
//! index). Decisions iterate ordered sets only, so they are deterministic.

use std::cmp::Reverse;

use super::ids::{Jix, Mix, Wix};
use super::state::Head;
use super::{Effect, Scheduler};
use crate::types::{CacheTier, Millis};

/// Free holders of a model ranked exactly (by start plus generation time)
/// after a submit; taken from the holder index, which orders them by start
/// then speed.
const SUBMIT_LOOKAHEAD: usize = 8;
/// Of those, how many are asked to take the job.
const SUBMIT_ASKED: usize = 4;
/// How many holders deep `backlog_start_ms` looks.
const BACKLOG_LOOKAHEAD: usize = 32;

/// What one matching pass remembers until its next assignment.
#[derive(Default)]
struct Memo {
    /// Queued models (oldest heads first) that some worker might do better
    /// to fetch than to wait for a holder.
    cold: Option<Vec<Mix>>,
}

impl Scheduler {
    /// Assigns queued jobs to workers with free slots until no worker can
    /// start a job sooner than it would start elsewhere. A full pass over
    /// the free workers (the coordinator's tick); operations on one worker
    /// or one job match only those.
    pub fn schedule(&mut self, now: Millis) -> Vec<Effect> {
        self.advance(now);
        if self.by_age.is_empty() {
            return Vec::new();
        }
        let free: Vec<Wix> = self.sets.free.iter().copied().collect();
        self.schedule_among(&free, true, false, now)
    }

    /// Matching after a job joins the queue (submitted or requeued): the
    /// free workers holding its model first, soonest finish first; when no
    /// worker holds it, the free worker that could fetch it soonest.
    pub(super) fn place_job(&mut self, jix: Jix, now: Millis) -> Vec<Effect> {
        let model = self.jobs[jix].model;
        let mut held: Vec<(Millis, Wix)> = self
            .free_holders(model)
            .take(SUBMIT_LOOKAHEAD)
            .map(|w| {
                let e = &self.workers[w];
                (
                    self.start_here_ms(e, model, now) + self.generate_ms(e, model),
                    w,
                )
            })
            .collect();
        held.sort_unstable();
        let mut effects = Vec::new();
        for (_, w) in held.into_iter().take(SUBMIT_ASKED) {
            effects.extend(self.schedule_among(&[w], false, false, now));
            if self.jobs.get(jix).is_none_or(|j| j.on.is_some()) {
                return effects;
            }
        }
        if self.models[model as usize].holders.is_empty() {
            if let Some((_, w)) = self.best_fetcher(model, true, now) {
                effects.push(self.assign(w, jix, CacheTier::Download, now));
                self.place(w);
            }
        }
        effects
    }

    /// Matching restricted to `candidates`, in the order given. `cold`:
    /// also consider models they would have to fetch (the full pass and
    /// new workers do; the frequent per-worker events leave that to the
    /// next full pass, at most a tick away). A candidate given a job is
    /// refiled in the indexes once done; `refile`: every candidate is (a
    /// caller that changed a worker leaves its filing to this, so that a
    /// worker freed and given a job is refiled once, not twice: its own
    /// entries are not read while it is matched, except by cold
    /// candidates, and those refile after each assignment).
    pub(super) fn schedule_among(
        &mut self,
        candidates: &[Wix],
        cold: bool,
        refile: bool,
        now: Millis,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut memo = Memo::default();
        for &w in candidates {
            let mut assigned = false;
            loop {
                if self.by_age.is_empty() {
                    break;
                }
                match self.workers.get(w) {
                    Some(e) if !e.draining && e.free_slots() > 0 => {}
                    _ => break,
                }
                let Some((job, tier)) = self.best_job_for(w, cold, now, &mut memo) else {
                    break;
                };
                effects.push(self.assign(w, job, tier, now));
                assigned = true;
                memo.cold = None;
                if cold {
                    // Cold candidates read this worker's own entries.
                    self.place(w);
                }
            }
            if (assigned || refile) && self.workers.get(w).is_some() {
                self.place(w);
            }
            if self.by_age.is_empty() && !refile {
                break;
            }
        }
        effects
    }

    /// Starts `job` on `worker`. The caller refiles the worker.
    pub(super) fn assign(&mut self, worker: Wix, jix: Jix, tier: CacheTier, now: Millis) -> Effect {
        self.dequeue(jix);
        let name = self.workers[worker].hello.worker_id.clone();
        let j = &mut self.jobs[jix];
        j.attempt += 1;
        j.worker = Some(name.clone());
        j.on = Some(worker);
        j.started_ms = Some(now);
        j.tier = Some(tier);
        let expected = self.expected_run_ms(&self.workers[worker], &self.jobs[jix]);
        let j = &mut self.jobs[jix];
        j.expected_ms = expected;
        let (attempt, id, model) = (j.attempt, j.id.clone(), j.model);
        let queued_ms = now.saturating_sub(j.submitted_ms);
        self.models[model as usize].running += 1;
        self.workers[worker].running.insert(id.clone(), attempt);
        Effect::Assign {
            worker: name,
            job: id,
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
    fn best_job_for(
        &self,
        worker: Wix,
        cold: bool,
        now: Millis,
        memo: &mut Memo,
    ) -> Option<(Jix, CacheTier)> {
        let w = &self.workers[worker];
        // A starving job goes to the first capable worker, unless a holder
        // of its model is making progress (then the age term below gets it
        // there; sending it to a cold worker under overload only adds
        // downloads).
        if let Some(&(_, oldest)) = self.by_age.first() {
            let job = &self.jobs[oldest];
            let model = job.model;
            if now.saturating_sub(job.submitted_ms) > self.cfg.starvation_ms
                && self.can_run(w, model)
                && (w.tier(model).is_some() || !self.healthy_holder(worker, model))
            {
                let tier = w.tier(model).unwrap_or(CacheTier::Download);
                return Some((oldest, tier));
            }
        }
        // Candidates: the head of each queue this worker could serve, keyed
        // by (start estimate net of age, priority, age); the age term keeps
        // a job needing a load from being starved by a stream of jobs for
        // the model in VRAM. The best whose model no other worker would
        // start sooner wins; the check runs best-first.
        type Key = (i64, Reverse<i32>, u64);
        let key = |est: Millis, head: Head| -> Key {
            let age = now.saturating_sub(head.submitted_ms) as i64;
            (est as i64 - age, Reverse(head.priority), head.seq)
        };
        let mut cands: Vec<(Key, Mix, Millis, CacheTier, bool)> = Vec::new();
        // Models this worker holds: taken unless another worker would start
        // the model's backlog strictly sooner.
        for model in self.held_queued(worker) {
            let here = self.start_here_ms(w, model, now);
            let head = self.head(model).expect("queued");
            let tier = w.tier(model).expect("held");
            cands.push((key(here, head), model, here, tier, true));
        }
        // Models it would have to fetch, oldest demand first: only when no
        // holder would start them as soon.
        if cold {
            if memo.cold.is_none() {
                memo.cold = Some(self.cold_candidates(now));
            }
            for &model in memo.cold.as_deref().unwrap_or_default() {
                if w.tier(model).is_some() || !self.can_run(w, model) {
                    continue;
                }
                let here = self.start_here_ms(w, model, now);
                let head = self.head(model).expect("queued");
                cands.push((key(here, head), model, here, CacheTier::Download, false));
            }
        }
        cands.sort_unstable_by_key(|a| a.0);
        cands
            .into_iter()
            .find(|&(_, model, here, _, held)| {
                !self.sooner_elsewhere(Some(worker), model, here, held, now)
            })
            .map(|(_, model, _, tier, _)| (self.head(model).expect("queued").job, tier))
    }

    /// The first `cold_scan_models` queued models by head age, less those
    /// a holder starts sooner than any free worker could fetch and load
    /// them.
    fn cold_candidates(&self, now: Millis) -> Vec<Mix> {
        let fastest = self.sets.free_bps.last().map_or(0, |e| e.0);
        self.heads
            .iter()
            .take(self.cfg.cold_scan_models)
            .map(|&(_, m)| m)
            .filter(|&m| {
                let bytes = self.model_bytes(m);
                let best_cold =
                    self.cfg.cost.download_ms(bytes, fastest) + self.cfg.cost.load_ms(bytes);
                !self.sooner_elsewhere(None, m, best_cold, false, now)
            })
            .collect()
    }

    /// The models a worker holds (VRAM or disk) that have queued jobs:
    /// walks whichever is shorter, its models or the non-empty queues.
    fn held_queued(&self, worker: Wix) -> Vec<Mix> {
        let w = &self.workers[worker];
        if w.vram.len() + w.disk.len() <= self.heads.len() {
            let q = |m: &Mix| self.models[*m as usize].head.is_some();
            w.vram
                .iter()
                .copied()
                .filter(q)
                .chain(
                    w.disk
                        .keys()
                        .copied()
                        .filter(|m| !w.vram.contains(m) && q(m)),
                )
                .collect()
        } else {
            self.heads
                .iter()
                .map(|&(_, m)| m)
                .filter(|&m| w.tier(m).is_some())
                .collect()
        }
    }

    pub(super) fn can_run(&self, w: &super::WorkerEntry, model: Mix) -> bool {
        w.tier(model).is_some() || self.entry(model).is_some_and(|m| w.can_hold(m.bytes))
    }

    /// Whether the live holders of `model` other than `except` would start
    /// the model's queued backlog sooner than `here`, so that `except`
    /// should leave it to them. `strict` (`except` holds the model):
    /// strictly sooner, the backlog spread over the holders; else (a fetch)
    /// no later than the soonest holder's start plus the rounds.
    pub(super) fn sooner_elsewhere(
        &self,
        except: Option<Wix>,
        model: Mix,
        here: Millis,
        strict: bool,
        now: Millis,
    ) -> bool {
        if strict && here == 0 {
            return false;
        }
        let there = self.backlog_start_ms(model, except, strict, now);
        if there == Millis::MAX {
            return false;
        }
        if strict {
            there < here
        } else {
            there <= here
        }
    }

    /// When the last job queued for `model` would start if only its live
    /// holders other than `except` served the queue (`Millis::MAX` when
    /// there are none). With Q queued and H holders, each holder takes a
    /// job as it frees, one per service time: the last job starts at the
    /// k-th soonest holder start (k = (Q - 1) mod H + 1) plus (Q - 1) / H
    /// rounds (`spread`). Not just the soonest holder: it takes one job, and
    /// a model held by a thousand workers would otherwise always look a
    /// moment away from being served. Looks at most `BACKLOG_LOOKAHEAD`
    /// holders deep. Without `spread`, the soonest holder plus the rounds:
    /// the optimistic view, which a fetch (bytes on the wire) must beat.
    /// (The simulator's s1 measured both: spread for holders and the
    /// optimistic view for fetches keeps GB/job and cuts p99.)
    pub(super) fn backlog_start_ms(
        &self,
        model: Mix,
        except: Option<Wix>,
        spread: bool,
        now: Millis,
    ) -> Millis {
        let slot = &self.models[model as usize];
        // Counted as the index counts (a worker being matched may not be
        // refiled yet).
        let mine = except.is_some_and(|w| {
            self.workers
                .get(w)
                .is_some_and(|e| e.placed.models.iter().any(|x| x.0 == model))
        });
        let others = slot.place.live as usize - usize::from(mine);
        if others == 0 {
            return Millis::MAX;
        }
        let queued = slot.queue.len().max(1);
        let rounds = ((queued - 1) / others) as Millis;
        let k = if spread {
            ((queued - 1) % others + 1).min(BACKLOG_LOOKAHEAD)
        } else {
            1
        };
        self.kth_holder_ms(model, except, k, now)
            .saturating_add(rounds * self.service_ms(model))
    }
}
