//! Lower bounds on the bytes any policy must download for a world.
//!
//! - Churn cover (sound, loose): for each file outside the image, the
//!   fewest node lifetimes that cover its request times; each such
//!   lifetime must download it once.
//! - Aggregate capacity (sound): all live disks as one cache of the
//!   integrated byte-seconds; keep the shortest reuse gaps until the budget
//!   is spent (fractionally at the margin); every other reuse, and every
//!   first request, is a miss.

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
