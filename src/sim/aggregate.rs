//! Aggregation: what one finished run measured, after the end-of-run
//! invariants are checked.
//!
//! Latencies count jobs arriving in the measured window (after warm-up,
//! before the end of arrivals); a job that failed or never finished counts
//! as infinitely late. Bytes after warm-up count downloads finished after
//! warm-up.

use std::collections::BTreeMap;

use super::engine::{internal, Core, JobRec};
use super::node::Tier;
use super::policy::Policy;
use crate::error::Result;

/// One surge of a run: the surge model's latency over time and how long it
/// took to recover.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SurgeResult {
    /// The surge model (index in the catalogue) and its size.
    pub model: u32,
    pub bytes: u64,
    pub start_min: f64,
    pub duration_min: f64,
    /// 2 x (mean generation time over the fleet + load time) of the model.
    pub threshold_s: f64,
    /// Per minute of arrival around the surge: (minute, jobs, p50 s, p95 s)
    /// of the surge model's jobs.
    pub per_minute: Vec<(u32, u32, f64, f64)>,
    /// Minutes from the surge's start until the model's per-minute p95 is
    /// under the threshold for 5 minutes in a row (or until the surge
    /// ends); 0 if it never went over, infinite if it never came back.
    pub recovery_min: f64,
    /// p95 of the surge model's jobs arriving during the surge.
    pub model_p95_s: f64,
    /// p95 of all jobs arriving during the surge.
    pub all_p95_s: f64,
    /// Surge-model jobs arriving during the surge that never finished.
    pub lost: u64,
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub rate: f64,
    /// Latency in seconds of each job arriving in the measured window
    /// (infinite when it never finished), sorted.
    pub latencies_s: Vec<f64>,
    pub arrived: u64,
    pub done: u64,
    pub failed: u64,
    /// Failed or never finished.
    pub lost: u64,
    /// Jobs whose generation finished more than once.
    pub duplicates: u64,
    pub zombies: u64,
    /// Jobs refused because no node could ever serve them (B3).
    pub unservable: u64,
    pub bytes_downloaded: u64,
    /// Bytes of downloads finished after warm-up.
    pub bytes_measured: u64,
    /// Jobs arriving in the measured window that finished.
    pub done_measured: u64,
    pub lb_churn_bytes: u64,
    pub lb_capacity_bytes: u64,
    /// Per-node replays of the same placements (requests after warm-up):
    /// bytes an LRU disk fetching only on demand would download, and bytes
    /// the offline-optimal (Belady) eviction would.
    pub replay_lru_bytes: u64,
    pub replay_belady_bytes: u64,
    /// Upper bound on the sustainable arrival rate: the fleet's GPUs only
    /// generating, jobs split across GPU classes optimally (jobs/s).
    pub capacity_jobs_s: f64,
    pub hits_vram: u64,
    pub hits_baked: u64,
    pub hits_disk: u64,
    pub misses: u64,
    pub gen_s: f64,
    pub load_s: f64,
    /// p95 per minute of arrival time (minute, seconds), measured window.
    pub p95_by_minute: Vec<(u32, f64)>,
    /// p95 of the first and second half of the measured window (a check
    /// that the warm-up converged).
    pub p95_halves: (f64, f64),
    /// p95 of each popularity decile (0 = most popular).
    pub p95_by_decile: Vec<f64>,
    pub steady_p99_s: f64,
    pub storm_p99_s: f64,
    pub surges: Vec<SurgeResult>,
    /// Scale-in: p95 of arrivals in the 15 minutes before and after it,
    /// GB downloaded in the 30 minutes from it, jobs arriving in those 30
    /// minutes never finished.
    pub scale_in_pre_p95_s: f64,
    pub scale_in_p95_s: f64,
    pub scale_in_gb: f64,
    /// Of `scale_in_gb`, the bytes no waiting job needed (prefetches).
    pub scale_in_prefetch_gb: f64,
    pub scale_in_lost: u64,
    /// Stopped early, hopelessly overloaded (`abort_backlog_s`).
    pub aborted: bool,
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn latency(r: &JobRec) -> f64 {
    r.done_ms.map_or(f64::INFINITY, |d| {
        d.saturating_sub(r.arr.at_ms) as f64 / 1e3
    })
}

/// Checks the end-of-run invariants.
fn check(c: &Core, policy: &dyn Policy) -> Result<()> {
    let arrived = c.arrived;
    let mut inflight = 0u64;
    for (i, r) in c.jobs.iter().enumerate().take(arrived as usize) {
        if r.done_ms.is_some() && r.failed {
            return Err(internal(format!("job {i} both done and failed")));
        }
        if r.done_ms.is_none() && !r.failed {
            inflight += 1;
        }
    }
    if c.led.done + c.led.failed + inflight != arrived {
        return Err(internal(format!(
            "arrived {arrived} != done {} + failed {} + in flight {inflight}",
            c.led.done, c.led.failed
        )));
    }
    policy.check_end(inflight)?;
    if c.led.downloaded != c.led.inserted {
        return Err(internal(format!(
            "downloaded {} bytes but inserted {}",
            c.led.downloaded, c.led.inserted
        )));
    }
    let held: u64 = c.nodes.iter().map(|x| x.disk_used).sum();
    if held != c.led.inserted - c.led.evicted {
        return Err(internal(format!(
            "disks hold {held} bytes; inserts - evictions = {}",
            c.led.inserted - c.led.evicted
        )));
    }
    Ok(())
}

/// Checks the invariants and measures the run.
pub(super) fn finish(c: &Core, policy: &dyn Policy) -> Result<RunResult> {
    check(c, policy)?;
    let warm = c.w.warmup_ms;
    let end = c.w.end_ms;
    let measured: Vec<&JobRec> = c
        .jobs
        .iter()
        .filter(|r| r.arr.at_ms >= warm && r.arr.at_ms < end)
        .collect();
    let (replay_lru_bytes, replay_belady_bytes) = super::belady::replay(c);
    let mut res = RunResult {
        arrived: c.arrived,
        done: c.led.done,
        failed: c.led.failed,
        lost: c.arrived - c.led.done,
        duplicates: c.led.duplicates,
        unservable: c.led.unservable,
        zombies: c
            .w
            .lives
            .iter()
            .filter(|l| l.zombie && l.leave_ms < end)
            .count() as u64,
        bytes_downloaded: c.led.downloaded,
        bytes_measured: c.led.downloaded_measured,
        done_measured: measured.iter().filter(|r| r.done_ms.is_some()).count() as u64,
        replay_lru_bytes,
        replay_belady_bytes,
        capacity_jobs_s: super::bounds::gpu_capacity(c.p, c.w),
        aborted: c.aborted,
        gen_s: c.led.gen_ms as f64 / 1e3,
        load_s: c.led.load_ms as f64 / 1e3,
        latencies_s: sorted(measured.iter().map(|r| latency(r)).collect()),
        ..Default::default()
    };
    for r in &measured {
        match r.tier {
            Some(Tier::Vram) => res.hits_vram += 1,
            Some(Tier::Baked) => res.hits_baked += 1,
            Some(Tier::Disk) => res.hits_disk += 1,
            Some(Tier::Miss) => res.misses += 1,
            None => {}
        }
    }
    let mut by_min: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    let mut by_decile: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mid = warm + (end - warm) / 2;
    let mut halves = (Vec::new(), Vec::new());
    for r in &measured {
        by_min
            .entry((r.arr.at_ms / 60_000) as u32)
            .or_default()
            .push(latency(r));
        let d = c.w.rank0[r.arr.model as usize] * 10 / c.w.models.max(1);
        by_decile.entry(d).or_default().push(latency(r));
        if r.arr.at_ms < mid {
            halves.0.push(latency(r));
        } else {
            halves.1.push(latency(r));
        }
    }
    res.p95_halves = (
        percentile(&sorted(halves.0), 0.95),
        percentile(&sorted(halves.1), 0.95),
    );
    res.p95_by_minute = by_min
        .into_iter()
        .map(|(m, v)| (m, percentile(&sorted(v), 0.95)))
        .collect();
    res.p95_by_decile = by_decile
        .into_values()
        .map(|v| percentile(&sorted(v), 0.95))
        .collect();
    if let Some(storm) = &c.p.storm {
        let at = (storm.at_min * 60e3) as u64;
        let pick = |lo: u64, hi: u64| -> Vec<f64> {
            sorted(
                measured
                    .iter()
                    .filter(|r| r.arr.at_ms >= lo && r.arr.at_ms < hi)
                    .map(|r| latency(r))
                    .collect(),
            )
        };
        res.steady_p99_s = percentile(&pick(0, at), 0.99);
        res.storm_p99_s = percentile(&pick(at, at + 15 * 60_000), 0.99);
    }
    if let Some(s) = &c.p.scale_in {
        let at = (s.at_min * 60e3) as u64;
        let pick = |lo: u64, hi: u64| -> Vec<f64> {
            sorted(
                c.jobs
                    .iter()
                    .filter(|r| r.arr.at_ms >= lo && r.arr.at_ms < hi.min(c.w.end_ms))
                    .map(latency)
                    .collect(),
            )
        };
        res.scale_in_pre_p95_s = percentile(&pick(at.saturating_sub(15 * 60_000), at), 0.95);
        res.scale_in_p95_s = percentile(&pick(at, at + 15 * 60_000), 0.95);
        res.scale_in_gb = c.led.downloaded_after_scale_in as f64 / 1e9;
        res.scale_in_prefetch_gb = c.led.prefetched_after_scale_in as f64 / 1e9;
        res.scale_in_lost = pick(at, at + 30 * 60_000)
            .iter()
            .filter(|l| l.is_infinite())
            .count() as u64;
    }
    res.surges = surges(c);
    let (churn, cap) = super::bounds::lower_bounds(c.p, c.w, c.end_ms);
    res.lb_churn_bytes = churn;
    res.lb_capacity_bytes = cap;
    Ok(res)
}

/// The surge model's latency per minute and its recovery, per surge.
fn surges(c: &Core) -> Vec<SurgeResult> {
    let p = c.p;
    let total_share: f64 = p.fleet.iter().map(|g| g.share).sum::<f64>().max(1e-9);
    p.surges
        .iter()
        .zip(&c.w.surge_models)
        .map(|(s, &m)| {
            let gen_ms: f64 = p
                .fleet
                .iter()
                .enumerate()
                .map(|(i, g)| g.share / total_share * c.mean_gen_ms(i, m) as f64)
                .sum();
            let threshold_s = 2.0 * (gen_ms + c.load_ms(m) as f64) / 1e3;
            let start = (s.start_min * 60e3) as u64;
            let stop = ((s.start_min + s.duration_min) * 60e3) as u64;
            let lo = start.saturating_sub(10 * 60_000);
            let hi = stop + 10 * 60_000;
            let mut by_min: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
            let mut model_lat = Vec::new();
            let mut all_lat = Vec::new();
            let mut lost = 0;
            for r in &c.jobs {
                let t = r.arr.at_ms;
                if t < lo || t >= hi.min(c.w.end_ms) {
                    continue;
                }
                let during = t >= start && t < stop;
                if during {
                    all_lat.push(latency(r));
                }
                if r.arr.model != m {
                    continue;
                }
                by_min
                    .entry((t / 60_000) as u32)
                    .or_default()
                    .push(latency(r));
                if during {
                    model_lat.push(latency(r));
                    lost += u64::from(r.done_ms.is_none());
                }
            }
            let per_minute: Vec<(u32, u32, f64, f64)> = by_min
                .into_iter()
                .map(|(min, v)| {
                    let v = sorted(v);
                    (
                        min,
                        v.len() as u32,
                        percentile(&v, 0.5),
                        percentile(&v, 0.95),
                    )
                })
                .collect();
            let first = (start / 60_000) as u32;
            let last = (stop.saturating_sub(1) / 60_000) as u32;
            let during: Vec<(u32, f64)> = per_minute
                .iter()
                .filter(|(min, ..)| *min >= first && *min <= last)
                .map(|(min, _, _, p95)| (*min, *p95))
                .collect();
            SurgeResult {
                model: m,
                bytes: c.w.files[m as usize].bytes,
                start_min: s.start_min,
                duration_min: s.duration_min,
                threshold_s,
                recovery_min: recovery(&during, first, threshold_s),
                per_minute,
                model_p95_s: percentile(&sorted(model_lat), 0.95),
                all_p95_s: percentile(&sorted(all_lat), 0.95),
                lost,
            }
        })
        .collect()
}

/// Minutes from `first` until the per-minute p95 stays under `threshold`
/// for 5 minutes in a row (or to the end of `during`).
fn recovery(during: &[(u32, f64)], first: u32, threshold: f64) -> f64 {
    for i in 0..during.len() {
        let end = (i + 5).min(during.len());
        if during[i..end].iter().all(|(_, v)| *v <= threshold) {
            return f64::from(during[i].0 - first);
        }
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_counts_minutes_until_five_good_ones() {
        let d: Vec<(u32, f64)> = (10..30)
            .map(|m| (m, if m < 17 { 100.0 } else { 5.0 }))
            .collect();
        assert_eq!(recovery(&d, 10, 10.0), 7.0);
        let never: Vec<(u32, f64)> = (10..30).map(|m| (m, 100.0)).collect();
        assert!(recovery(&never, 10, 10.0).is_infinite());
        let fine: Vec<(u32, f64)> = (10..30).map(|m| (m, 1.0)).collect();
        assert_eq!(recovery(&fine, 10, 10.0), 0.0);
        // A relapse after a short dip does not count as recovered.
        let relapse: Vec<(u32, f64)> = (10..30)
            .map(|m| {
                (
                    m,
                    if (12..14).contains(&m) || m >= 20 {
                        1.0
                    } else {
                        100.0
                    },
                )
            })
            .collect();
        assert_eq!(recovery(&relapse, 10, 10.0), 10.0);
    }
}
