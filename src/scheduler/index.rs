//! Index upkeep: every worker filed by how soon it could start work, per
//! model it holds and for models it would have to fetch, so that matching
//! and estimates find the soonest holder or the best fetcher in O(log n)
//! instead of scanning and sorting the fleet.
//!
//! A worker is in one readiness class:
//!
//! - `Free`: not draining, a free slot: it could start now;
//! - `Idle`: not draining, no free slot and nothing running (its slots are
//!   held by attempts being stopped, or it has none): it counts as starting
//!   now in estimates, but takes nothing;
//! - `Pending`: busy, its soonest attempt expected to end at `free_at_ms`,
//!   still in the future;
//! - `Overdue`: busy past that time: expected to need half a default
//!   service time more, whatever the clock says (a slow worker never looks
//!   free);
//! - `Draining`: in no placement set.
//!
//! Time turns `Pending` into `Overdue`: `advance(now)` refiles the workers
//! whose time passed, in the order of a timeline, each once. Every
//! mutating operation advances first, so queries see an index true at
//! `now`; the read-only estimate also copes with entries not yet refiled.
//! The index's time never goes back: with a clock that steps back, a worker
//! already overdue stays overdue.
//!
//! For each model, [`HolderIndex`] files the live (not draining) workers
//! holding or fetching it, by class, keyed by the cost of a start there
//! (fetch and load: 0 in VRAM, a load on disk, the download left and a
//! load while fetching). [`WorkerSets`] files the same workers for
//! fetching a model they do not hold, keyed by the time their download
//! channel frees.
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
    Pending,
    Overdue,
}

/// What a worker's index entries were built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Placed {
    pub(super) class: Readiness,
    pub(super) free_at: Millis,
    pub(super) healthy_until: Millis,
    /// `speed.to_bits()`: orders like the speed (positive floats).
    pub(super) speed_bits: u64,
    /// Time to finish the downloads in progress.
    pub(super) fetch_ms: Millis,
    /// Download rate as reported (0: unknown).
    pub(super) bps: u64,
    /// Per model held or fetched: the model, the cost of a start here
    /// (fetch and load), whether it is downloading. Empty when draining.
    pub(super) models: Vec<(Mix, Millis, bool)>,
}

/// One model's live holders, filed by class.
#[derive(Clone, Debug, Default)]
pub(super) struct HolderIndex {
    /// Free holders by (start cost, speed): the first starts soonest and,
    /// among equals, runs fastest.
    pub(super) free: BTreeSet<(Millis, u64, Wix)>,
    /// Idle holders by start cost.
    pub(super) idle: BTreeSet<(Millis, Wix)>,
    /// Pending holders by `free_at + start cost`.
    pub(super) pending: BTreeSet<(Millis, Wix)>,
    /// Overdue holders by start cost.
    pub(super) overdue: BTreeSet<(Millis, Wix)>,
    /// Busy (pending or overdue) holders by `healthy_until`.
    pub(super) healthy: BTreeSet<(Millis, Wix)>,
    /// Holders downloading the model.
    pub(super) fetching: BTreeSet<Wix>,
    /// Live holders.
    pub(super) live: u32,
}

/// The fleet filed by class, for fetching a model (and for matching).
#[derive(Clone, Debug, Default)]
pub(super) struct WorkerSets {
    /// Free workers: the full matching pass walks these.
    pub(super) free: BTreeSet<Wix>,
    /// Free workers by reported download rate.
    pub(super) free_bps: BTreeSet<(u64, Wix)>,
    /// Free and idle workers by (`fetch_ms`, fastest download first).
    pub(super) fetch_free: BTreeSet<(Millis, Reverse<u64>, Wix)>,
    pub(super) fetch_idle: BTreeSet<(Millis, Reverse<u64>, Wix)>,
    /// Pending workers by `free_at + fetch_ms`; overdue by `fetch_ms`.
    pub(super) fetch_pending: BTreeSet<(Millis, Wix)>,
    pub(super) fetch_overdue: BTreeSet<(Millis, Wix)>,
    /// Pending workers by `free_at`: they turn overdue in this order.
    pub(super) timeline: BTreeSet<(Millis, Wix)>,
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
        } else if free_at > self.sets.clock {
            Readiness::Pending
        } else {
            Readiness::Overdue
        };
        let models = if class == Readiness::Draining {
            Vec::new()
        } else {
            w.held()
                .into_iter()
                .map(|m| (m, self.start_cost_ms(w, m), w.downloading.contains_key(&m)))
                .collect()
        };
        Placed {
            class,
            free_at,
            healthy_until,
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
            Readiness::Pending => {
                toggle(&mut s.timeline, (p.free_at, wix), insert);
                let key = p.free_at.saturating_add(p.fetch_ms);
                toggle(&mut s.fetch_pending, (key, wix), insert);
            }
            Readiness::Overdue => toggle(&mut s.fetch_overdue, (p.fetch_ms, wix), insert),
        }
        for &(m, cost, fetching) in &p.models {
            let h = &mut self.models[m as usize].place;
            if insert {
                h.live += 1;
            } else {
                h.live -= 1;
            }
            match p.class {
                Readiness::Draining => {}
                Readiness::Free => toggle(&mut h.free, (cost, p.speed_bits, wix), insert),
                Readiness::Idle => toggle(&mut h.idle, (cost, wix), insert),
                Readiness::Pending => {
                    toggle(
                        &mut h.pending,
                        (p.free_at.saturating_add(cost), wix),
                        insert,
                    );
                    toggle(&mut h.healthy, (p.healthy_until, wix), insert);
                }
                Readiness::Overdue => {
                    toggle(&mut h.overdue, (cost, wix), insert);
                    toggle(&mut h.healthy, (p.healthy_until, wix), insert);
                }
            }
            if fetching {
                toggle(&mut h.fetching, wix, insert);
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
            let step = |n: &mut u32, yes: bool| {
                if yes {
                    if insert {
                        *n += 1;
                    } else {
                        *n -= 1;
                    }
                }
            };
            step(&mut s.in_vram, vram);
            step(&mut s.on_disk, disk);
            step(&mut s.tiered, vram || disk);
            step(&mut s.fetching, fetching);
            toggle(&mut s.holders, wix, insert);
        }
    }

    /// Moves the index's time to `now`: workers whose expected end passed
    /// become overdue. Each refile is paid once per expected end.
    pub(super) fn advance(&mut self, now: Millis) {
        if now <= self.sets.clock {
            return;
        }
        self.sets.clock = now;
        while let Some(&(at, w)) = self.sets.timeline.first() {
            if at > now {
                break;
            }
            // Refiled as overdue, or later on the timeline if its expected
            // end moved: either way it leaves this spot.
            self.place(w);
            debug_assert!(!self.sets.timeline.contains(&(at, w)));
        }
    }

    // ---- queries -----------------------------------------------------------

    /// The soonest a live holder of `model` other than `except` could start
    /// it (`Millis::MAX` when none): the minimum of each class's first
    /// entry. Pending entries whose time passed since the last `advance`
    /// (only the read-only estimate sees them) count as overdue.
    pub(super) fn soonest_holder_ms(&self, model: Mix, except: Option<Wix>, now: Millis) -> Millis {
        let h = &self.models[model as usize].place;
        let other = |w: Wix| Some(w) != except;
        let overdue_wait = self.cfg.cost.default_service_ms / 2;
        let mut best = Millis::MAX;
        if let Some(&(cost, _, _)) = h.free.iter().find(|e| other(e.2)) {
            best = best.min(cost);
        }
        if let Some(&(cost, _)) = h.idle.iter().find(|e| other(e.1)) {
            best = best.min(cost);
        }
        for &(key, w) in &h.pending {
            if !other(w) {
                continue;
            }
            let at = self.workers[w].placed.free_at;
            let cost = key - at;
            if at > now {
                // Later entries start later still (see `index_tests.rs`).
                best = best.min(key - now);
                break;
            }
            best = best.min(overdue_wait + cost);
        }
        if let Some(&(cost, _)) = h.overdue.iter().find(|e| other(e.1)) {
            best = best.min(overdue_wait + cost);
        }
        best
    }

    /// The `k`-th soonest start (1: the soonest) of `model` among its live
    /// holders other than `except` (`Millis::MAX` when fewer hold it): a
    /// merge of the classes' sets in order, `k` steps. Exact at the index's
    /// time; for `k > 1` on entries not yet refiled (the read-only
    /// estimate), an approximation.
    pub(super) fn kth_holder_ms(
        &self,
        model: Mix,
        except: Option<Wix>,
        k: usize,
        now: Millis,
    ) -> Millis {
        if k <= 1 {
            return self.soonest_holder_ms(model, except, now);
        }
        let h = &self.models[model as usize].place;
        let other = move |w: Wix| Some(w) != except;
        let overdue_wait = self.cfg.cost.default_service_ms / 2;
        let pending = h
            .pending
            .iter()
            .filter(move |e| other(e.1))
            .map(move |&(key, w)| {
                let at = self.workers[w].placed.free_at;
                if at > now {
                    key - now
                } else {
                    overdue_wait + (key - at)
                }
            });
        let mut classes: [std::iter::Peekable<Box<dyn Iterator<Item = Millis> + '_>>; 4] = [
            (Box::new(h.free.iter().filter(move |e| other(e.2)).map(|e| e.0))
                as Box<dyn Iterator<Item = Millis>>)
                .peekable(),
            (Box::new(h.idle.iter().filter(move |e| other(e.1)).map(|e| e.0))
                as Box<dyn Iterator<Item = Millis>>)
                .peekable(),
            (Box::new(pending) as Box<dyn Iterator<Item = Millis>>).peekable(),
            (Box::new(
                h.overdue
                    .iter()
                    .filter(move |e| other(e.1))
                    .map(move |e| overdue_wait + e.0),
            ) as Box<dyn Iterator<Item = Millis>>)
                .peekable(),
        ];
        let mut last = Millis::MAX;
        for _ in 0..k {
            let next = classes
                .iter_mut()
                .enumerate()
                .filter_map(|(i, c)| Some((*c.peek()?, i)))
                .min();
            let Some((t, i)) = next else {
                return Millis::MAX;
            };
            classes[i].next();
            last = t;
        }
        last
    }

    /// Whether a live holder of `model` other than `except` is free,
    /// fetching it, or running an attempt that is not long overdue.
    pub(super) fn healthy_holder(&self, except: Wix, model: Mix, now: Millis) -> bool {
        let h = &self.models[model as usize].place;
        h.free.iter().take(2).any(|e| e.2 != except)
            || h.fetching.iter().take(2).any(|&w| w != except)
            || h.healthy
                .iter()
                .rev()
                .take(2)
                .any(|&(until, w)| w != except && until >= now)
    }

    /// The worker that could start `model` soonest by fetching it, with
    /// that start: among free workers only (`free_only`), or among all
    /// live ones. Looks at the first `FETCH_LOOKAHEAD` capable workers of
    /// each class in the order of its set, which is the exact order when
    /// download rates are equal; with unequal rates a worker whose channel
    /// frees later but downloads faster can be missed.
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
        let mut classes: Vec<Box<dyn Iterator<Item = Wix> + '_>> =
            vec![Box::new(s.fetch_free.iter().map(|e| e.2))];
        if !free_only {
            classes.push(Box::new(s.fetch_idle.iter().map(|e| e.2)));
            classes.push(Box::new(s.fetch_pending.iter().map(|e| e.1)));
            classes.push(Box::new(s.fetch_overdue.iter().map(|e| e.1)));
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
