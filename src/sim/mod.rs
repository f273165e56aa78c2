//! The discrete-event simulator: Corral's scheduler against baselines on
//! the scenarios of ../shared/BENCHMARK.md.
//!
//! It drives `crate::scheduler` directly (never the gRPC server) with
//! simulated workers that report their cache state as heartbeats, exactly
//! as real workers do. Baselines share the worker model and the traces but
//! place jobs themselves. Results: a table per scenario, JSON or CSV, and
//! SVG plots. See docs/sim.md.

mod bounds;
pub mod engine;
pub mod params;
mod report;
mod svg;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub use engine::{percentile, run_once, PolicyKind, RunResult};
pub use params::SimParams;
pub use report::Format;

use crate::error::{Error, Result};
use crate::scheduler::{plan_image, ImageCandidate};

/// `corral sim`: run a scenario for every policy over several seeds.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Scenario: s1 (steady Zipf), s2 (popularity shift), s3 (churn storm),
    /// s4 (cold long tail).
    #[arg(long, default_value = "s1")]
    pub scenario: String,
    /// TOML file whose keys override the scenario's parameters (see
    /// docs/sim.md for the keys).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seeds per policy (seeds 1..=N).
    #[arg(long, default_value_t = 3)]
    pub seeds: u32,
    /// Policies to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub policies: Vec<PolicyKind>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write SVG plots into this directory.
    #[arg(long)]
    pub plots_dir: Option<PathBuf>,
    /// Arrival rate of the reference run, jobs per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Simulated hours per run.
    #[arg(long)]
    pub hours: Option<f64>,
    /// Rates probed for SLO-goodput, a geometric grid (0: no goodput).
    #[arg(long)]
    pub goodput_grid: Option<usize>,
    /// Bisection steps refining goodput after the grid.
    #[arg(long)]
    pub bisect_steps: Option<u32>,
    /// Zipf exponent of popularity.
    #[arg(long)]
    pub zipf: Option<f64>,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            scenario: "s1".into(),
            config: None,
            seeds: 3,
            policies: Vec::new(),
            format: Format::Table,
            plots_dir: None,
            rate: None,
            hours: None,
            goodput_grid: None,
            bisect_steps: None,
            zipf: None,
            threads: None,
        }
    }
}

/// One policy on one seed: the reference run and, when asked, goodput.
#[derive(Clone, Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    /// Highest rate with p95 <= SLO (0 when even the lowest fails).
    pub goodput: Option<f64>,
    /// (rate, p95 s) of each bisection probe.
    pub probes: Vec<(f64, f64)>,
    pub reference: RunResult,
}

/// All seeds of one policy.
#[derive(Clone, Debug)]
pub struct PolicyOutcome {
    pub policy: PolicyKind,
    pub seeds: Vec<SeedOutcome>,
}

pub struct Experiment {
    pub params: SimParams,
    pub outcomes: Vec<PolicyOutcome>,
}

fn p95_of(r: &RunResult) -> f64 {
    percentile(&r.latencies_s, 0.95)
}

/// SLO-goodput: the highest arrival rate with p95 <= SLO. p95 is not
/// monotonic in the rate at the low end (a light load leaves caches cold,
/// and every miss waits for a download), so a geometric grid from
/// `bisect_hi` down finds the highest passing grid rate, then bisection
/// refines between it and the grid rate above.
pub fn goodput(p: &SimParams, policy: PolicyKind, seed: u64) -> Result<(f64, Vec<(f64, f64)>)> {
    let mut probes = Vec::new();
    let ok = |rate: f64, probes: &mut Vec<(f64, f64)>| -> Result<bool> {
        let r = run_once(p, policy, seed, rate)?;
        let p95 = p95_of(&r);
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

/// Runs every (policy, seed) on `threads` threads.
pub fn experiment(
    p: &SimParams,
    policies: &[PolicyKind],
    seeds: u32,
    threads: usize,
) -> Result<Experiment> {
    p.validate()?;
    let tasks: Vec<(usize, PolicyKind, u64)> = policies
        .iter()
        .enumerate()
        .flat_map(|(i, pol)| (1..=u64::from(seeds.max(1))).map(move |s| (i, *pol, s)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<SeedOutcome>>>> =
        Mutex::new((0..tasks.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(_, policy, seed)) = tasks.get(i) else {
                    break;
                };
                let out = (|| {
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
                })();
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(out);
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut outcomes: Vec<PolicyOutcome> = policies
        .iter()
        .map(|p| PolicyOutcome {
            policy: *p,
            seeds: Vec::new(),
        })
        .collect();
    for ((i, _, _), r) in tasks.iter().zip(results) {
        let r = r.ok_or_else(|| Error::Internal("a simulation task did not run".into()))??;
        outcomes[*i].seeds.push(r);
    }
    Ok(Experiment {
        params: p.clone(),
        outcomes,
    })
}

/// The parameters `args` select.
pub fn params_for(args: &SimArgs) -> Result<SimParams> {
    let mut p = SimParams::load(&args.scenario, args.config.as_deref())?;
    if let Some(r) = args.rate {
        p.rate = r;
    }
    if let Some(h) = args.hours {
        p.length_h = h;
    }
    if let Some(b) = args.bisect_steps {
        p.bisect_steps = b;
    }
    if let Some(g) = args.goodput_grid {
        p.goodput_grid = g;
    }
    if let Some(z) = args.zipf {
        p.zipf_s = z;
    }
    p.validate()?;
    Ok(p)
}

/// `corral sim`: runs the experiment and renders it; writes plots when
/// asked. Returns the text to print.
pub fn run_cli(args: &SimArgs) -> Result<String> {
    let p = params_for(args)?;
    let policies = if args.policies.is_empty() {
        PolicyKind::ALL.to_vec()
    } else {
        args.policies.clone()
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let exp = experiment(&p, &policies, args.seeds, threads)?;
    if let Some(dir) = &args.plots_dir {
        report::write_plots(&exp, dir)?;
    }
    Ok(report::render(&exp, args.format))
}

/// `corral plan-image`: which models to bake into the worker image.
#[derive(clap::Args, Clone, Debug)]
pub struct PlanImageArgs {
    /// Image budget for models, bytes (SaladCloud allows 35 GB compressed
    /// for the whole image).
    #[arg(long)]
    pub budget_bytes: u64,
    /// CSV of `model,bytes,demand` (demand in any unit; a header line is
    /// skipped). Without it, the catalogue and popularity of `--scenario`.
    #[arg(long)]
    pub demand: Option<PathBuf>,
    #[arg(long, default_value = "s1")]
    pub scenario: String,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `corral plan-image`: returns the plan as a Markdown table.
pub fn plan_image_cli(args: &PlanImageArgs) -> Result<String> {
    let candidates = match &args.demand {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            parse_demand(&text)?
        }
        None => {
            let p = SimParams::load(&args.scenario, args.config.as_deref())?;
            scenario_demand(&p, args.seed)
        }
    };
    Ok(plan_image(&candidates, args.budget_bytes).table())
}

/// Expected share of jobs per model under the scenario's initial Zipf
/// popularity.
pub fn scenario_demand(p: &SimParams, seed: u64) -> Vec<ImageCandidate> {
    let mut q = p.clone();
    q.length_h = q.warmup_min / 60.0 + 1e-3;
    let w = workload::World::generate(&q, seed, 1e-3);
    let h: f64 = (1..=p.models).map(|r| (r as f64).powf(-p.zipf_s)).sum();
    (0..p.models)
        .map(|m| ImageCandidate {
            model: format!("m{m}").into(),
            bytes: w.files[m].bytes,
            demand: ((w.rank0[m] + 1) as f64).powf(-p.zipf_s) / h,
        })
        .collect()
}

fn parse_demand(text: &str) -> Result<Vec<ImageCandidate>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed = (f.len() == 3)
            .then(|| Some((f[1].parse::<u64>().ok()?, f[2].parse::<f64>().ok()?)))
            .flatten();
        match parsed {
            Some((bytes, demand)) => out.push(ImageCandidate {
                model: f[0].into(),
                bytes,
                demand,
            }),
            None if i == 0 => {} // header
            None => {
                return Err(Error::invalid(
                    "demand",
                    format!("line {}: expected model,bytes,demand", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
