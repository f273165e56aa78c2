//! Experiments: many runs over seeds, policies and parameter points, on a
//! pool of threads; the goodput search; sweeps.
//!
//! Every (policy, seed) pair of one parameter point sees the same world,
//! so differences between policies are paired by seed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::aggregate::RunResult;
use super::engine::{probe_p95, run_once};
use super::params::SimParams;
use super::policy::PolicyKind;
use crate::error::{Error, Result};

/// One policy on one seed: the goodput search (if asked) and the
/// reference run at `SimParams::rate`.
#[derive(Clone, Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    /// Highest rate with p95 <= SLO (0 when even the lowest fails).
    pub goodput: Option<f64>,
    /// (rate, p95 s) of each goodput probe.
    pub probes: Vec<(f64, f64)>,
    pub reference: RunResult,
}

/// All seeds of one policy.
#[derive(Clone, Debug)]
pub struct PolicyOutcome {
    pub policy: PolicyKind,
    pub seeds: Vec<SeedOutcome>,
}

/// All policies at one parameter point.
#[derive(Clone, Debug)]
pub struct Experiment {
    pub params: SimParams,
    pub outcomes: Vec<PolicyOutcome>,
    /// Runs started from empty disks and measured from the start.
    pub cold_start: bool,
}

impl Experiment {
    pub fn outcome(&self, policy: PolicyKind) -> Option<&PolicyOutcome> {
        self.outcomes.iter().find(|o| o.policy == policy)
    }
}

/// One experiment per value of a parameter.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The `SimParams` key swept.
    pub field: String,
    pub points: Vec<(f64, Experiment)>,
}

/// SLO-goodput: the highest arrival rate with p95 <= SLO. p95 is not
/// monotonic in the rate at the low end (a light load leaves caches cold),
/// so a geometric grid from `bisect_hi` down finds the highest passing
/// grid rate, then bisection refines between it and the grid rate above.
pub fn goodput(p: &SimParams, policy: PolicyKind, seed: u64) -> Result<(f64, Vec<(f64, f64)>)> {
    let mut probes = Vec::new();
    let ok = |rate: f64, probes: &mut Vec<(f64, f64)>| -> Result<bool> {
        let p95 = probe_p95(p, policy, seed, rate)?;
        probes.push((rate, p95));
        Ok(p95 <= p.slo_p95_s)
    };
    let n = p.goodput_grid.max(2);
    let grid: Vec<f64> = (0..n)
        .map(|i| p.bisect_lo * (p.bisect_hi / p.bisect_lo).powf(i as f64 / (n - 1) as f64))
        .collect();
    let mut found = None;
    for i in (0..n).rev() {
        if ok(grid[i], &mut probes)? {
            found = Some(i);
            break;
        }
    }
    let Some(i) = found else {
        probes.sort_by(|a, b| a.0.total_cmp(&b.0));
        return Ok((0.0, probes));
    };
    let (mut lo, mut hi) = (grid[i], grid.get(i + 1).copied().unwrap_or(grid[i]));
    if hi > lo {
        for _ in 0..p.bisect_steps {
            let mid = (lo * hi).sqrt();
            if ok(mid, &mut probes)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    probes.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok((lo, probes))
}

/// Runs `f(i)` for every i < n on `threads` threads; results in order.
fn parallel<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let out = f(i);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(out);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Internal("a simulation task did not run".into()))?)
        .collect()
}

fn seed_outcome(p: &SimParams, policy: PolicyKind, seed: u64) -> Result<SeedOutcome> {
    let (goodput, probes) = if p.goodput_grid > 0 {
        let (g, pr) = goodput(p, policy, seed)?;
        (Some(g), pr)
    } else {
        (None, Vec::new())
    };
    let reference = run_once(p, policy, seed, p.rate)?;
    Ok(SeedOutcome {
        seed,
        goodput,
        probes,
        reference,
    })
}

/// Runs every (point, policy, seed) on `threads` threads, so that a sweep
/// keeps every thread busy to the end.
fn run_points(
    points: &[SimParams],
    policies: &[PolicyKind],
    seeds: u32,
    threads: usize,
) -> Result<Vec<Vec<PolicyOutcome>>> {
    for p in points {
        p.validate()?;
    }
    let seeds = u64::from(seeds.max(1));
    let tasks: Vec<(usize, usize, u64)> = (0..points.len())
        .flat_map(|pt| {
            (0..policies.len()).flat_map(move |pol| (1..=seeds).map(move |s| (pt, pol, s)))
        })
        .collect();
    let results = parallel(tasks.len(), threads, |i| {
        let (pt, pol, seed) = tasks[i];
        seed_outcome(&points[pt], policies[pol], seed)
    })?;
    let mut out: Vec<Vec<PolicyOutcome>> = points
        .iter()
        .map(|_| {
            policies
                .iter()
                .map(|p| PolicyOutcome {
                    policy: *p,
                    seeds: Vec::new(),
                })
                .collect()
        })
        .collect();
    for ((pt, pol, _), r) in tasks.into_iter().zip(results) {
        out[pt][pol].seeds.push(r);
    }
    Ok(out)
}

/// Every policy on seeds 1..=`seeds` at one parameter point.
pub fn experiment(
    p: &SimParams,
    policies: &[PolicyKind],
    seeds: u32,
    threads: usize,
) -> Result<Experiment> {
    let outcomes = run_points(std::slice::from_ref(p), policies, seeds, threads)?
        .pop()
        .unwrap_or_default();
    Ok(Experiment {
        params: p.clone(),
        outcomes,
        cold_start: false,
    })
}

/// The cold start: runs from empty disks (only the image), measured from
/// the first minute, no warm-up, no ramp, no goodput search.
pub fn cold_start(
    p: &SimParams,
    policies: &[PolicyKind],
    seeds: u32,
    threads: usize,
) -> Result<Experiment> {
    let mut q = p.clone();
    q.warmup_jobs = 0.0;
    q.warmup_min = 0.0;
    q.ramp_min = 0.0;
    q.goodput_grid = 0;
    let mut e = experiment(&q, policies, seeds, threads)?;
    e.cold_start = true;
    Ok(e)
}

/// Minutes from the start until the per-minute p95 stays within the SLO
/// for 10 minutes in a row (to the end of the run if it has fewer left);
/// infinite if it never does.
pub fn ramp_min(r: &RunResult, slo_s: f64) -> f64 {
    let m = &r.p95_by_minute;
    for i in 0..m.len() {
        let end = (i + 10).min(m.len());
        if m[i..end].iter().all(|(_, v)| *v <= slo_s) {
            return f64::from(m[i].0);
        }
    }
    f64::INFINITY
}

/// `p` with one numeric key set (any key of `SimParams`).
pub fn with_field(p: &SimParams, field: &str, value: f64) -> Result<SimParams> {
    let mut v = toml::Value::try_from(p).map_err(|e| Error::Config(format!("internal: {e}")))?;
    let table = v
        .as_table_mut()
        .ok_or_else(|| Error::Config("internal: parameters are not a table".into()))?;
    let slot = table
        .get_mut(field)
        .ok_or_else(|| Error::invalid("sweep", format!("no parameter named {field:?}")))?;
    *slot = match slot {
        toml::Value::Integer(_) if value.fract() == 0.0 => toml::Value::Integer(value as i64),
        toml::Value::Float(_) => toml::Value::Float(value),
        _ => {
            return Err(Error::invalid(
                "sweep",
                format!("{field} is not a number, or {value} does not fit it"),
            ))
        }
    };
    let q: SimParams = v
        .try_into()
        .map_err(|e| Error::Config(format!("sweep {field} = {value}: {e}")))?;
    q.validate()?;
    Ok(q)
}

/// Default points of the sweeps named in issue 14.
pub fn default_points(field: &str) -> Option<Vec<f64>> {
    Some(match field {
        "zipf_s" => vec![0.6, 0.8, 1.0, 1.1, 1.3],
        "bw_median_mbit" => vec![50.0, 100.0, 200.0, 500.0, 950.0],
        "hazard_per_h" => vec![0.01, 0.025, 0.05, 0.1],
        "models" => vec![200.0, 1000.0, 3000.0, 10000.0],
        "disk_gb" => vec![25.0, 50.0, 100.0],
        _ => return None,
    })
}

/// One experiment per point of `field`, all on one pool of threads.
pub fn sweep(
    p: &SimParams,
    field: &str,
    points: &[f64],
    policies: &[PolicyKind],
    seeds: u32,
    threads: usize,
) -> Result<Sweep> {
    let params: Vec<SimParams> = points
        .iter()
        .map(|v| with_field(p, field, *v))
        .collect::<Result<_>>()?;
    let outcomes = run_points(&params, policies, seeds, threads)?;
    Ok(Sweep {
        field: field.to_owned(),
        points: points
            .iter()
            .zip(params)
            .zip(outcomes)
            .map(|((v, params), outcomes)| {
                (
                    *v,
                    Experiment {
                        params,
                        outcomes,
                        cold_start: false,
                    },
                )
            })
            .collect(),
    })
}
