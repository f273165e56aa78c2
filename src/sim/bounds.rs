//! Lower bounds on the bytes any policy must download for a world.
//!
//! - Churn cover (sound, loose): for each file outside the image, the
//!   fewest node lifetimes that cover its request times; each such
//!   lifetime must download it once.
//! - Aggregate capacity (sound): all live disks as one cache of the
//!   integrated byte-seconds; keep the shortest reuse gaps until the budget
//!   is spent (fractionally at the margin); every other reuse, and every
//!   first request, is a miss.
//!
//! Both reduce to about one download per model requested in most
//! scenarios: they bound bytes, not routing. Per-node replays of the
//! placements (`belady.rs`) show what routing costs, and the GPU capacity
//! bound here caps goodput.

use std::collections::BTreeSet;

use super::params::SimParams;
use super::workload::{World, GB};

/// (churn cover bytes, aggregate capacity bytes).
pub fn lower_bounds(p: &SimParams, w: &World, end_ms: u64) -> (u64, u64) {
    let baked: BTreeSet<u32> = w.baked.iter().copied().collect();
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); w.files.len()];
    for a in &w.arrivals {
        for f in [Some(a.model), a.lora].into_iter().flatten() {
            if !baked.contains(&f) {
                times[f as usize].push(a.at_ms);
            }
        }
    }
    let mut lives: Vec<(u64, u64)> = w
        .lives
        .iter()
        .filter(|l| l.join_ms < end_ms)
        .map(|l| (l.join_ms, l.leave_ms.min(end_ms)))
        .collect();
    lives.sort_unstable();
    // Churn cover: greedy interval cover of each file's request times.
    let mut churn = 0u64;
    for (f, ts) in times.iter().enumerate() {
        let mut covered_to: Option<u64> = None;
        let mut i = 0;
        let mut best_end = 0u64;
        let mut have = false;
        let mut count = 0u64;
        for &t in ts {
            if covered_to.is_some_and(|c| t <= c) {
                continue;
            }
            while i < lives.len() && lives[i].0 <= t {
                best_end = best_end.max(lives[i].1);
                have = true;
                i += 1;
            }
            if have && best_end >= t {
                count += 1;
                covered_to = Some(best_end);
            }
        }
        churn += count * w.files[f].bytes;
    }
    // Aggregate capacity.
    let budget: f64 = lives
        .iter()
        .map(|(a, b)| b.saturating_sub(*a) as f64 / 1e3 * p.disk_gb * GB)
        .sum();
    let mut gaps: Vec<(u64, u64)> = Vec::new(); // (gap ms, bytes)
    let mut cap = 0f64;
    for (f, ts) in times.iter().enumerate() {
        if ts.is_empty() {
            continue;
        }
        let bytes = w.files[f].bytes;
        cap += bytes as f64;
        for pair in ts.windows(2) {
            gaps.push((pair[1] - pair[0], bytes));
        }
    }
    gaps.sort_unstable();
    let mut left = budget;
    for (gap, bytes) in gaps {
        let cost = gap as f64 / 1e3 * bytes as f64;
        if cost <= left {
            left -= cost;
        } else {
            let kept = if cost > 0.0 { left / cost } else { 1.0 };
            left = 0.0;
            cap += bytes as f64 * (1.0 - kept);
        }
    }
    (churn, cap as u64)
}

/// Upper bound on the arrival rate the fleet can sustain, jobs/s: the GPUs
/// of the nodes live in the measured window (their mean number per class)
/// only generating, never loading or waiting, with SD1.5 and SDXL jobs
/// (in the trace's measured mix) split across GPU classes optimally.
pub fn gpu_capacity(p: &SimParams, w: &World) -> f64 {
    let (lo, hi) = (w.warmup_ms, w.end_ms.max(w.warmup_ms + 1));
    let mut live = vec![0f64; p.fleet.len()];
    for l in &w.lives {
        let ms = l.leave_ms.min(hi).saturating_sub(l.join_ms.max(lo));
        live[l.class] += ms as f64 / (hi - lo) as f64;
    }
    let window: Vec<_> = w
        .arrivals
        .iter()
        .filter(|a| a.at_ms >= lo && a.at_ms < hi)
        .collect();
    let xl = window
        .iter()
        .filter(|a| w.files[a.model as usize].xl)
        .count() as f64
        / window.len().max(1) as f64;
    let classes: Vec<(f64, f64, f64)> = p
        .fleet
        .iter()
        .zip(&live)
        .map(|(g, n)| (*n, g.sd15_s, g.sdxl_s))
        .collect();
    capacity(&classes, xl)
}

/// Highest rate at which `classes` (live nodes, s per SD1.5 job, s per SDXL
/// job) serve a mix with share `xl` of SDXL jobs. SDXL work goes first to
/// the classes relatively fastest at it (optimal for two job types).
fn capacity(classes: &[(f64, f64, f64)], xl: f64) -> f64 {
    let mut order: Vec<&(f64, f64, f64)> = classes.iter().collect();
    order.sort_by(|a, b| (a.2 / a.1).total_cmp(&(b.2 / b.1)));
    let feasible = |rate: f64| {
        let mut xl_left = rate * xl;
        let mut sd_cap = 0.0;
        for (n, sd, x) in &order {
            let take = xl_left.min(n / x);
            xl_left -= take;
            sd_cap += (n - take * x) / sd;
        }
        xl_left <= 1e-9 && sd_cap >= rate * (1.0 - xl) - 1e-9
    };
    let (mut lo, mut hi) = (0.0, 1.0);
    while feasible(hi) && hi < 1e9 {
        hi *= 2.0;
    }
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if feasible(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::capacity;

    #[test]
    fn capacity_of_one_class_is_nodes_over_mean_time() {
        // 10 nodes, 2 s and 6 s, half SDXL: 10 / 4 s = 2.5 jobs/s.
        let c = capacity(&[(10.0, 2.0, 6.0)], 0.5);
        assert!((c - 2.5).abs() < 1e-6, "{c}");
    }

    #[test]
    fn capacity_gives_sdxl_to_the_class_relatively_fastest_at_it() {
        // Class A: 1 s / 10 s; class B: 1 s / 2 s; one node each; half
        // SDXL. SDXL goes to B first (ratio 2 < 10). At rate r > 1, B is
        // full with r = 1's SDXL and A takes the rest: A's time
        // 10 (r/2 - 1/2) + r/2 <= 1 gives r <= 12/11.
        let c = capacity(&[(1.0, 1.0, 10.0), (1.0, 1.0, 2.0)], 0.5);
        assert!((c - 12.0 / 11.0).abs() < 1e-6, "{c}");
        // And never worse than giving each class the plain mix.
        let naive = 1.0 / (0.5 + 5.0) + 1.0 / (0.5 + 1.0);
        assert!(c >= naive, "{c} < {naive}");
    }
}
