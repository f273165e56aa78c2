//! Which nodes are bad: pure bookkeeping the coordinator feeds (failures as
//! they are reported, the fleet's state at each evaluation) and asks for
//! verdicts. A node is bad when
//!
//! - its cache budget is below `min_disk_bytes`;
//! - it reported `failures` load or inference failures within
//!   `failures_window_ms` (a node that cannot load or run models wastes
//!   every job sent to it);
//! - its measured download throughput stayed, for `bandwidth_sustain_ms`,
//!   both in the fleet's bottom `bandwidth_percentile` percent and below
//!   `bandwidth_median_ratio` of the median (a fleet always has a bottom 5%:
//!   only one far below the rest is bad), with at least
//!   `bandwidth_min_workers` workers measured.
//!
//! Each node is judged at most once (until [`Judge::forget`]), and at most
//! `max_per_hour` verdicts are given per hour fleet-wide: a verdict past the
//! cap waits for the next evaluation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::types::{Millis, WorkerId};

/// The tunables (`[coordinator.cloud]` bad_* and min_disk_bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeParams {
    pub bandwidth_percentile: f64,
    pub bandwidth_median_ratio: f64,
    pub bandwidth_sustain_ms: Millis,
    pub bandwidth_min_workers: usize,
    pub failures: u32,
    pub failures_window_ms: Millis,
    pub min_disk_bytes: u64,
    pub max_per_hour: u32,
}

impl From<&super::CloudConfig> for JudgeParams {
    fn from(c: &super::CloudConfig) -> Self {
        Self {
            bandwidth_percentile: c.bad_bandwidth_percentile,
            bandwidth_median_ratio: c.bad_bandwidth_median_ratio,
            bandwidth_sustain_ms: (c.bad_bandwidth_sustain_s * 1000.0) as Millis,
            bandwidth_min_workers: c.bad_bandwidth_min_workers as usize,
            failures: c.bad_failures,
            failures_window_ms: (c.bad_failures_window_s * 1000.0) as Millis,
            min_disk_bytes: c.min_disk_bytes,
            max_per_hour: c.max_reallocations_per_hour,
        }
    }
}

/// Why a node is bad.
#[derive(Clone, Debug, PartialEq)]
pub enum BadReason {
    Disk { bytes: u64, min: u64 },
    Failures { count: u32, window_s: u64 },
    Bandwidth { bps: u64, median_bps: u64 },
}

impl BadReason {
    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Disk { .. } => "disk",
            Self::Failures { .. } => "failures",
            Self::Bandwidth { .. } => "bandwidth",
        }
    }
}

impl std::fmt::Display for BadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disk { bytes, min } => write!(
                f,
                "disk too small: a cache budget of {bytes} bytes, below the minimum of {min}"
            ),
            Self::Failures { count, window_s } => write!(
                f,
                "{count} model load or inference failures within {window_s} s"
            ),
            Self::Bandwidth { bps, median_bps } => write!(
                f,
                "insufficient download bandwidth: {bps} B/s, the fleet's median is {median_bps} B/s"
            ),
        }
    }
}

/// One node at an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub worker: WorkerId,
    /// Measured download throughput; 0 when not yet measured.
    pub download_bps: u64,
    pub cache_max_bytes: u64,
}

/// The judge's memory. See the module docs.
#[derive(Debug, Default)]
pub struct Judge {
    failures: BTreeMap<WorkerId, VecDeque<Millis>>,
    slow_since: BTreeMap<WorkerId, Millis>,
    judged: BTreeSet<WorkerId>,
    /// When each verdict of the last hour was given.
    verdicts: VecDeque<Millis>,
}

const HOUR_MS: Millis = 3_600_000;

impl Judge {
    /// A load or inference failure on `worker`.
    pub fn failure(&mut self, worker: &WorkerId, now: Millis) {
        self.failures
            .entry(worker.clone())
            .or_default()
            .push_back(now);
    }

    /// Forgets a node (it left, or came back on another machine).
    pub fn forget(&mut self, worker: &WorkerId) {
        self.failures.remove(worker);
        self.slow_since.remove(worker);
        self.judged.remove(worker);
    }

    pub fn is_judged(&self, worker: &WorkerId) -> bool {
        self.judged.contains(worker)
    }

    /// The nodes judged bad now (each once). `nodes` is the whole fleet;
    /// memory of nodes absent from it is dropped, except verdicts.
    pub fn evaluate(
        &mut self,
        nodes: &[NodeView],
        now: Millis,
        p: &JudgeParams,
    ) -> Vec<(WorkerId, BadReason)> {
        let present: BTreeSet<&WorkerId> = nodes.iter().map(|n| &n.worker).collect();
        self.failures.retain(|w, _| present.contains(w));
        self.slow_since.retain(|w, _| present.contains(w));
        for times in self.failures.values_mut() {
            while times
                .front()
                .is_some_and(|t| now.saturating_sub(*t) > p.failures_window_ms)
            {
                times.pop_front();
            }
        }
        while self
            .verdicts
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= HOUR_MS)
        {
            self.verdicts.pop_front();
        }
        let slow = self.track_bandwidth(nodes, now, p);
        let mut out = Vec::new();
        for n in nodes {
            if self.judged.contains(&n.worker) {
                continue;
            }
            let reason = if p.min_disk_bytes > 0 && n.cache_max_bytes < p.min_disk_bytes {
                Some(BadReason::Disk {
                    bytes: n.cache_max_bytes,
                    min: p.min_disk_bytes,
                })
            } else if let Some(count) = self
                .failures
                .get(&n.worker)
                .map(|t| t.len() as u32)
                .filter(|c| *c >= p.failures)
            {
                Some(BadReason::Failures {
                    count,
                    window_s: p.failures_window_ms / 1000,
                })
            } else {
                slow.get(&n.worker).cloned()
            };
            let Some(reason) = reason else { continue };
            if self.verdicts.len() >= p.max_per_hour as usize {
                tracing::warn!(worker_id = %n.worker, %reason, cap = p.max_per_hour, "a bad node waits: the hourly cap on reallocations is reached");
                continue;
            }
            self.verdicts.push_back(now);
            self.judged.insert(n.worker.clone());
            out.push((n.worker.clone(), reason));
        }
        out
    }

    /// Updates how long each node has been slow; returns those slow for
    /// long enough.
    fn track_bandwidth(
        &mut self,
        nodes: &[NodeView],
        now: Millis,
        p: &JudgeParams,
    ) -> BTreeMap<WorkerId, BadReason> {
        let mut measured: Vec<u64> = nodes
            .iter()
            .map(|n| n.download_bps)
            .filter(|b| *b > 0)
            .collect();
        if measured.len() < p.bandwidth_min_workers.max(2) {
            self.slow_since.clear();
            return BTreeMap::new();
        }
        measured.sort_unstable();
        let median = measured[measured.len() / 2];
        // Nearest rank: the value below which `percentile` percent lie.
        let rank = ((p.bandwidth_percentile / 100.0) * measured.len() as f64).ceil() as usize;
        let cutoff = measured[rank.clamp(1, measured.len()) - 1];
        let floor = (median as f64 * p.bandwidth_median_ratio) as u64;
        let mut out = BTreeMap::new();
        for n in nodes {
            let slow = n.download_bps > 0 && n.download_bps <= cutoff && n.download_bps < floor;
            if !slow {
                self.slow_since.remove(&n.worker);
                continue;
            }
            let since = *self.slow_since.entry(n.worker.clone()).or_insert(now);
            if now.saturating_sub(since) >= p.bandwidth_sustain_ms {
                out.insert(
                    n.worker.clone(),
                    BadReason::Bandwidth {
                        bps: n.download_bps,
                        median_bps: median,
                    },
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> JudgeParams {
        (&super::super::CloudConfig {
            bad_bandwidth_sustain_s: 10.0,
            bad_failures: 2,
            bad_failures_window_s: 60.0,
            min_disk_bytes: 100,
            max_reallocations_per_hour: 3,
            ..Default::default()
        })
            .into()
    }

    fn node(id: &str, bps: u64) -> NodeView {
        NodeView {
            worker: id.into(),
            download_bps: bps,
            cache_max_bytes: 1000,
        }
    }

    fn fleet(slow_bps: u64) -> Vec<NodeView> {
        let mut v: Vec<NodeView> = (0..19)
            .map(|i| node(&format!("w{i}"), 100_000_000 + i))
            .collect();
        v.push(node("slow", slow_bps));
        v
    }

    #[test]
    fn sustained_slowness_far_below_the_median_is_bad() {
        let p = params();
        let mut j = Judge::default();
        assert!(j.evaluate(&fleet(1_000_000), 0, &p).is_empty());
        // A recovery resets the clock.
        assert!(j.evaluate(&fleet(90_000_000), 6_000, &p).is_empty());
        assert!(j.evaluate(&fleet(1_000_000), 8_000, &p).is_empty());
        assert!(j.evaluate(&fleet(1_000_000), 17_000, &p).is_empty());
        let v = j.evaluate(&fleet(1_000_000), 18_000, &p);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, WorkerId::from("slow"));
        assert_eq!(v[0].1.kind(), "bandwidth");
        // Once.
        assert!(j.evaluate(&fleet(1_000_000), 30_000, &p).is_empty());
    }

    #[test]
    fn the_bottom_of_a_uniform_fleet_is_not_bad() {
        let p = params();
        let mut j = Judge::default();
        for t in [0, 20_000, 40_000] {
            assert!(j.evaluate(&fleet(80_000_000), t, &p).is_empty());
        }
    }

    #[test]
    fn repeated_failures_within_the_window_are_bad() {
        let p = params();
        let mut j = Judge::default();
        let nodes = [node("a", 0), node("b", 0)];
        j.failure(&"a".into(), 0);
        j.failure(&"a".into(), 70_000);
        assert!(
            j.evaluate(&nodes, 70_000, &p).is_empty(),
            "the first fell out of the window"
        );
        j.failure(&"a".into(), 80_000);
        let v = j.evaluate(&nodes, 80_000, &p);
        assert_eq!(
            v,
            vec![(
                "a".into(),
                BadReason::Failures {
                    count: 2,
                    window_s: 60
                }
            )]
        );
    }

    #[test]
    fn small_disks_are_bad_within_the_hourly_cap() {
        let p = params();
        let mut j = Judge::default();
        let nodes: Vec<NodeView> = (0..5)
            .map(|i| NodeView {
                cache_max_bytes: 10,
                ..node(&format!("d{i}"), 0)
            })
            .collect();
        assert_eq!(j.evaluate(&nodes, 0, &p).len(), 3, "the cap");
        assert!(j.evaluate(&nodes, 1_000, &p).is_empty());
        let later = j.evaluate(&nodes, HOUR_MS, &p);
        assert_eq!(later.len(), 2);
        assert!(later.iter().all(|(_, r)| r.kind() == "disk"));
        assert!(later[0].1.to_string().contains("below the minimum of 100"));
    }
}
