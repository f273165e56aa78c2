//! Index upkeep: every worker filed by how soon it could start work, per
//! model it holds and for models it would have to fetch, so that matching
//! and estimates find the soonest holders or the best fetcher in O(log n)
//! instead of scanning and sorting the fleet.
//!
//! A worker is in one readiness class:
//!
//! - `Free`: not draining, a free slot: it could start now;
//! - `Idle`: not draining, no free slot and nothing running (its slots are
//!   held by attempts being stopped, or it has none): it counts as starting
//!   now in estimates, but takes nothing;
//! - `Busy`: its soonest attempt is expected to end at `free_at_ms`; once
//!   that time has passed it is overdue and expected to need half a default
//!   service time more, whatever the clock says (a slow worker never looks
//!   free);
//! - `Draining`: in no placement set.
//!
//! A start of a model on a holder costs its wait plus fetching and loading.
//! That cost is the same for every holder with the model in VRAM (0) and
//! for every holder with it on disk (a load), so [`HolderIndex`] files the
//! live holders of a model by cost class (VRAM, disk, fetching) and, within
//! a class, by readiness; busy ones by `free_at_ms`. Time needs no upkeep:
//! at any `now`, a class's busy holders split at `now` into the overdue
//! (all one wait) and the pending (in order of their wait), two ordered
//! runs. Only holders still fetching have a cost of their own (the
//! download left); they are few per model (the concurrent downloads of one
//! model) and are compared one by one. [`WorkerSets`] files the fleet
//! likewise for fetching a model it does not hold.
//!
//! Whether a holder is healthy (busy but not long overdue, see
//! `healthy_holder`) does change with time: each busy worker is on a
//! timeline until it stops being healthy, and `advance(now)` (run by every
//! mutating operation) refiles those whose time passed, each once.
//!
//! Each worker keeps the [`Placed`] snapshot its entries were built from.
//! `place(w)` recomputes it and, when it changed, takes the old entries out
//! and files the new ones: every operation that changes a worker (its
//! report, slots, running attempts, draining) ends with `place`.
//! `index_tests.rs` checks the indexes against a brute-force recomputation
//! after random operations. Holder sets and counters (who holds what,
//! draining workers included) are kept apart by `file_holdings`, which runs
//! only when a worker's holdings change.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::iter::Peekable;

use super::ids::{Mix, Wix};
use super::Scheduler;
use crate::types::Millis;

/// How a worker stands; see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Readiness {
    #[default]
    Draining,
    Free,
    Idle,
    Busy,
}

/// What a start of a model costs on a holder, besides the wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cost {
    /// In VRAM: nothing.
    Vram,
    /// On disk: a load (the same on every holder).
    Disk,
    /// Fetching: the download left and a load, in milliseconds.
    Fetch(Millis),
}

/// What a worker's index entries were built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Placed {
    pub(super) class: Readiness,
    pub(super) free_at: Millis,
    pub(super) healthy_until: Millis,
    /// Busy and not long overdue at the index's time.
    pub(super) healthy: bool,
    /// `speed.to_bits()`: orders like the speed (positive floats).
    pub(super) speed_bits: u64,
    /// Time to finish the downloads in progress.
    pub(super) fetch_ms: Millis,
    /// Download rate as reported (0: unknown).
    pub(super) bps: u64,
    /// Per model held or fetched: the model, the cost class of a start
    /// here, whether it is downloading. Empty when draining.
    pub(super) models: Vec<(Mix, Cost, bool)>,
}

/// One cost class of a model's live holders, by readiness.
#[derive(Clone, Debug, Default)]
pub(super) struct Class {
    /// Free holders by speed (fastest first).
    pub(super) free: BTreeSet<(u64, Wix)>,
    pub(super) idle: BTreeSet<Wix>,
    /// Busy holders by `free_at`.
    pub(super) busy: BTreeSet<(Millis, Wix)>,
}

/// One model's live holders.
#[derive(Clone, Debug, Default)]
pub(super) struct HolderIndex {
    pub(super) vram: Class,
    pub(super) disk: Class,
    /// Holders only fetching the model, by their own start cost.
    pub(super) fetch_free: BTreeSet<(Millis, u64, Wix)>,
    pub(super) fetch_idle: BTreeSet<(Millis, Wix)>,
    /// By `free_at`, with the cost.
    pub(super) fetch_busy: BTreeSet<(Millis, Millis, Wix)>,
    /// Live holders; of them, downloading the model; busy and healthy.
    pub(super) live: u32,
    pub(super) downloading: u32,
    pub(super) healthy: u32,
}

/// The fleet filed by readiness, for fetching a model (and for matching).
#[derive(Clone, Debug, Default)]
pub(super) struct WorkerSets {
    /// Free workers: the full matching pass walks these.
    pub(super) free: BTreeSet<Wix>,
    /// Free workers by reported download rate.
    pub(super) free_bps: BTreeSet<(u64, Wix)>,
    /// Free and idle workers by (`fetch_ms`, fastest download first).
    pub(super) fetch_free: BTreeSet<(Millis, Reverse<u64>, Wix)>,
    pub(super) fetch_idle: BTreeSet<(Millis, Reverse<u64>, Wix)>,
    /// Busy workers by `free_at`.
    pub(super) busy: BTreeSet<(Millis, Wix)>,
    /// Busy healthy workers by `healthy_until`: they stop being healthy in
    /// this order.
    pub(super) sickening: BTreeSet<(Millis, Wix)>,
    /// The index's time: the latest `now` it was advanced to.
    pub(super) clock: Millis,
}

/// Inserts or removes one entry; the index must agree with the snapshot.
fn toggle<K: Ord + std::fmt::Debug>(set: &mut BTreeSet<K>, key: K, insert: bool) {
    let changed = if insert {
        set.insert(key)
    } else {
        set.remove(&key)
    };
    debug_assert!(changed, "index out of step with a worker's snapshot");
}

fn count(n: &mut u32, yes: bool, insert: bool) {
    if yes {
        if insert {
            *n += 1;
        } else {
            *n -= 1;
        }
    }
}

/// A sorted run of start times, boxed so that runs of different kinds merge.
type Run<'a> = Peekable<Box<dyn Iterator<Item = Millis> + 'a>>;

fn run<'a>(it: impl Iterator<Item = Millis> + 'a) -> Run<'a> {
    (Box::new(it) as Box<dyn Iterator<Item = Millis> + 'a>).peekable()
}

impl Scheduler {
    /// The download rate assumed for a worker (the default when unknown).
    pub(super) fn effective_bps(&self, bps: u64) -> u64 {
        if bps == 0 {
            self.cfg.cost.default_download_bps
        } else {
            bps
        }
    }

    /// Recomputes a worker's snapshot (and its cached `free_at_ms` and
    /// `healthy_until_ms`) from its state and refiles it if it changed.
    pub(super) fn place(&mut self, wix: Wix) {
        let new = self.compute_placed(wix);
        let w = &mut self.workers[wix];
        w.free_at_ms = new.free_at;
        w.healthy_until_ms = new.healthy_until;
        if w.placed == new {
            return;
        }
        let old = std::mem::take(&mut w.placed);
        self.file(wix, &old, false);
        self.file(wix, &new, true);
        self.workers[wix].placed = new;
    }

    /// Takes a worker out of the placement index (before it leaves).
    pub(super) fn unplace(&mut self, wix: Wix) {
        let old = std::mem::take(&mut self.workers[wix].placed);
        self.file(wix, &old, false);
    }

    pub(super) fn compute_placed(&self, wix: Wix) -> Placed {
        let w = &self.workers[wix];
        let mut free_at: Option<Millis> = None;
        let mut healthy_until = 0;
        for job in w.running.keys() {
            let Some(j) = self.job_ix(job).and_then(|j| self.jobs.get(j)) else {
                continue;
            };
            let end = j.started_ms.unwrap_or(0) + j.expected_ms;
            free_at = Some(free_at.map_or(end, |f| f.min(end)));
            let until = j.started_ms.map_or(Millis::MAX, |s| {
                s.saturating_add(2 * j.expected_ms + 10_000)
            });
            healthy_until = healthy_until.max(until);
        }
        let free_at = free_at.unwrap_or(0);
        let class = if w.draining {
            Readiness::Draining
        } else if w.free_slots() > 0 {
            Readiness::Free
        } else if w.running.is_empty() {
            Readiness::Idle
        } else {
            Readiness::Busy
        };
        let models = if class == Readiness::Draining {
            Vec::new()
        } else {
            w.held()
                .into_iter()
                .map(|m| {
                    let cost = if w.vram.contains(&m) {
                        Cost::Vram
                    } else if w.disk.contains_key(&m) {
                        Cost::Disk
                    } else {
                        Cost::Fetch(self.start_cost_ms(w, m))
                    };
                    (m, cost, w.downloading.contains_key(&m))
                })
                .collect()
        };
        Placed {
            class,
            free_at,
            healthy_until,
            healthy: class == Readiness::Busy && healthy_until >= self.sets.clock,
            speed_bits: w.speed.to_bits(),
            fetch_ms: self
                .cfg
                .cost
                .download_ms(w.download_left(), w.report.download_bps),
            bps: w.report.download_bps,
            models,
        }
    }

    /// Files (`insert`) or unfiles a worker's entries as the snapshot says.
    fn file(&mut self, wix: Wix, p: &Placed, insert: bool) {
        let fast = Reverse(self.effective_bps(p.bps));
        let s = &mut self.sets;
        match p.class {
            Readiness::Draining => return,
            Readiness::Free => {
                toggle(&mut s.free, wix, insert);
                toggle(&mut s.free_bps, (p.bps, wix), insert);
                toggle(&mut s.fetch_free, (p.fetch_ms, fast, wix), insert);
            }
            Readiness::Idle => toggle(&mut s.fetch_idle, (p.fetch_ms, fast, wix), insert),
            Readiness::Busy => {
                toggle(&mut s.busy, (p.free_at, wix), insert);
                if p.healthy {
                    toggle(&mut s.sickening, (p.healthy_until, wix), insert);
                }
            }
        }
        for &(m, cost, downloading) in &p.models {
            let h = &mut self.models[m as usize].place;
            count(&mut h.live, true, insert);
            count(&mut h.downloading, downloading, insert);
            count(&mut h.healthy, p.healthy, insert);
            let class = match cost {
                Cost::Vram => &mut h.vram,
                Cost::Disk => &mut h.disk,
                Cost::Fetch(c) => {
                    match p.class {
                        Readiness::Draining => {}
                        Readiness::Free => {
                            toggle(&mut h.fetch_free, (c, p.speed_bits, wix), insert)
                        }
                        Readiness::Idle => toggle(&mut h.fetch_idle, (c, wix), insert),
                        Readiness::Busy => toggle(&mut h.fetch_busy, (p.free_at, c, wix), insert),
                    }
                    continue;
                }
            };
            match p.class {
                Readiness::Draining => {}
                Readiness::Free => toggle(&mut class.free, (p.speed_bits, wix), insert),
                Readiness::Idle => toggle(&mut class.idle, wix, insert),
                Readiness::Busy => toggle(&mut class.busy, (p.free_at, wix), insert),
            }
        }
    }

    /// Adds (`insert`) or removes a worker's holdings in the per-model
    /// holder sets and counters, as its report stands.
    pub(super) fn file_holdings(&mut self, wix: Wix, insert: bool) {
        let w = &self.workers[wix];
        for m in w.held() {
            let vram = w.vram.contains(&m);
            let disk = w.disk.contains_key(&m);
            let fetching = w.downloading.contains_key(&m);
            let s = &mut self.models[m as usize];
            count(&mut s.in_vram, vram, insert);
            count(&mut s.on_disk, disk, insert);
            count(&mut s.tiered, vram || disk, insert);
            count(&mut s.fetching, fetching, insert);
            toggle(&mut s.holders, wix, insert);
        }
    }

    /// Moves the index's time to `now`: busy workers whose attempts became
    /// long overdue stop counting as healthy, each refiled once.
    pub(super) fn advance(&mut self, now: Millis) {
        if now <= self.sets.clock {
            return;
        }
        self.sets.clock = now;
        while let Some(&(until, w)) = self.sets.sickening.first() {
            if until >= now {
                break;
            }
            self.place(w);
            debug_assert!(!self.sets.sickening.contains(&(until, w)));
        }
    }

    // ---- queries -----------------------------------------------------------

    /// The wait of an overdue worker.
    fn overdue_ms(&self) -> Millis {
        self.cfg.cost.default_service_ms / 2
    }

    /// The starts of `model` on its live holders other than `except`, at
    /// `now`, as sorted runs to merge: per cost class the free and idle
    /// holders (no wait), the overdue and the pending ones; then those
    /// still fetching, sorted here (few: one model's downloads).
    fn holder_runs(&self, model: Mix, except: Option<Wix>, now: Millis) -> Vec<Run<'_>> {
        let h = &self.models[model as usize].place;
        let other = move |w: Wix| Some(w) != except;
        let overdue = self.overdue_ms();
        let load = self.cfg.cost.load_ms(self.model_bytes(model));
        let mut runs = Vec::with_capacity(9);
        for (class, cost) in [(&h.vram, 0), (&h.disk, load)] {
            if !class.free.is_empty() || !class.idle.is_empty() {
                let ready = class
                    .free
                    .iter()
                    .map(|e| e.1)
                    .chain(class.idle.iter().copied());
                runs.push(run(ready.filter(move |&w| other(w)).map(move |_| cost)));
            }
            if class.busy.is_empty() {
                continue;
            }
            // Busy: up to `now` overdue (one wait), then pending in order.
            let split = (now.saturating_add(1), 0);
            runs.push(run(class
                .busy
                .range(..split)
                .filter(move |e| other(e.1))
                .map(move |_| overdue + cost)));
            runs.push(run(class
                .busy
                .range(split..)
                .filter(move |e| other(e.1))
                .map(move |e| e.0 - now + cost)));
        }
        let mut fetching: Vec<Millis> = h
            .fetch_free
            .iter()
            .map(|e| (e.2, e.0))
            .chain(h.fetch_idle.iter().map(|e| (e.1, e.0)))
            .filter(|e| other(e.0))
            .map(|e| e.1)
            .chain(
                h.fetch_busy
                    .iter()
                    .filter(|e| other(e.2))
                    .map(|&(at, c, _)| if at > now { at - now + c } else { overdue + c }),
            )
            .collect();
        if !fetching.is_empty() {
            fetching.sort_unstable();
            runs.push(run(fetching.into_iter()));
        }
        runs
    }

    /// The `k`-th soonest start (1: the soonest) of `model` among its live
    /// holders other than `except` (`Millis::MAX` when fewer hold it): a
    /// merge of the sorted runs, `k` steps.
    pub(super) fn kth_holder_ms(
        &self,
        model: Mix,
        except: Option<Wix>,
        k: usize,
        now: Millis,
    ) -> Millis {
        let mut runs = self.holder_runs(model, except, now);
        let mut last = Millis::MAX;
        for _ in 0..k {
            let next = runs
                .iter_mut()
                .enumerate()
                .filter_map(|(i, r)| Some((*r.peek()?, i)))
                .min();
            let Some((t, i)) = next else {
                return Millis::MAX;
            };
            runs[i].next();
            last = t;
        }
        last
    }

    /// The free holders of `model`, soonest start first (VRAM, disk, then
    /// fetching: each costs at least the one before), fastest first among
    /// equal starts.
    pub(super) fn free_holders(&self, model: Mix) -> impl Iterator<Item = Wix> + '_ {
        let h = &self.models[model as usize].place;
        h.vram
            .free
            .iter()
            .map(|e| e.1)
            .chain(h.disk.free.iter().map(|e| e.1))
            .chain(h.fetch_free.iter().map(|e| e.2))
    }

    /// Whether a live holder of `model` other than `except` is free,
    /// fetching it, or running an attempt that is not long overdue. O(1):
    /// counters, less `except`'s own part as its snapshot says.
    pub(super) fn healthy_holder(&self, except: Wix, model: Mix) -> bool {
        let h = &self.models[model as usize].place;
        let free = h.vram.free.len() + h.disk.free.len() + h.fetch_free.len();
        let (mut my_free, mut my_downloading, mut my_healthy) = (0, 0, 0);
        if let Some(w) = self.workers.get(except) {
            let p = &w.placed;
            if let Some(&(_, _, downloading)) = p.models.iter().find(|e| e.0 == model) {
                my_free = usize::from(p.class == Readiness::Free);
                my_downloading = u32::from(downloading);
                my_healthy = u32::from(p.healthy);
            }
        }
        free > my_free || h.downloading > my_downloading || h.healthy > my_healthy
    }

    /// The worker that could start `model` soonest by fetching it, with
    /// that start: among free workers only (`free_only`), or among all
    /// live ones. Looks at the first `FETCH_LOOKAHEAD` capable workers of
    /// each class in the order of its set, which is the exact order when
    /// download rates are equal and no other download is under way; else
    /// a worker whose channel frees later but downloads faster can be
    /// missed.
    pub(super) fn best_fetcher(
        &self,
        model: Mix,
        free_only: bool,
        now: Millis,
    ) -> Option<(Millis, Wix)> {
        let capable = |w: &Wix| {
            let e = &self.workers[*w];
            e.tier(model).is_none() && self.can_run(e, model)
        };
        let s = &self.sets;
        let split = (now.saturating_add(1), 0);
        let mut classes: Vec<Box<dyn Iterator<Item = Wix> + '_>> =
            vec![Box::new(s.fetch_free.iter().map(|e| e.2))];
        if !free_only {
            classes.push(Box::new(s.fetch_idle.iter().map(|e| e.2)));
            classes.push(Box::new(s.busy.range(..split).map(|e| e.1)));
            classes.push(Box::new(s.busy.range(split..).map(|e| e.1)));
        }
        classes
            .into_iter()
            .flat_map(|class| class.take(FETCH_SCAN).filter(capable).take(FETCH_LOOKAHEAD))
            .map(|w| (self.start_here_ms(&self.workers[w], model, now), w))
            .min()
    }
}

/// Capable workers compared per class by `best_fetcher`.
const FETCH_LOOKAHEAD: usize = 8;
/// Workers looked at per class to find them (some cannot hold the model).
const FETCH_SCAN: usize = 64;
