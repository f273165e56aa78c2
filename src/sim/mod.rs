//! The discrete-event simulator: Corral's scheduler against baselines on
//! the scenarios of ../shared/BENCHMARK.md, measured as docs/sim.md says.
//!
//! Layout:
//! - `params.rs`, `workload.rs`: the scenario and the world it generates
//!   (catalogue, arrivals with shifts and surges, node lives).
//! - `engine.rs`: the event loop and the simulated world (`Core`);
//!   `node.rs`: the node model (disk, VRAM, downloads, GPU).
//! - `policy/`: one file per policy behind a trait; `policy/corral.rs`
//!   drives `crate::scheduler::Scheduler` as the coordinator does.
//! - `aggregate.rs`: a run's figures; `belady.rs`: per-node eviction
//!   replays; `bounds.rs`: lower bounds on bytes and the GPU capacity bound.
//! - `experiment.rs`: seeds, goodput search, cold start, sweeps, on a
//!   thread pool; `stats.rs`: intervals and paired differences;
//!   `report.rs`, `svg.rs`: tables, JSON, CSV, plots.
//!
//! It drives `crate::scheduler` directly (never the gRPC server), with
//! simulated workers that report their cache state as heartbeats, exactly
//! as real workers do.

mod aggregate;
mod belady;
mod bounds;
mod engine;
mod experiment;
mod node;
pub mod params;
mod policy;
mod report;
mod scale_in;
mod stats;
mod svg;
pub mod workload;

use std::path::PathBuf;

pub use aggregate::{percentile, RunResult, SurgeResult};
pub use engine::run_once;
pub use experiment::{
    cold_start, experiment, goodput, ramp_min, sweep, with_field, Experiment, PolicyOutcome,
    SeedOutcome, Sweep,
};
pub use node::Tier;
pub use params::SimParams;
pub use policy::PolicyKind;
pub use report::{best_baseline, Format};

use crate::error::{Error, Result};
use crate::scheduler::{plan_image, ImageCandidate};

/// `corral sim`: run a scenario for every policy over several seeds.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Scenario: s1 (steady Zipf), s2 (popularity shift), s3 (churn storm),
    /// s4 (cold long tail), surge-sd15 and surge-sdxl (one model takes 30%
    /// of arrivals for 20 minutes), scale-in and scale-in-random (40 of 200
    /// nodes stopped at minute 90, chosen by deletion cost or at random),
    /// scale-in-abrupt (the same 40 by cost, vanishing like crashed hosts).
    #[arg(long, default_value = "s1")]
    pub scenario: String,
    /// TOML file whose keys override the scenario's parameters (see
    /// docs/sim.md for the keys).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seeds per policy (seeds 1..=N).
    #[arg(long, default_value_t = 10)]
    pub seeds: u32,
    /// Policies to run (default: all; with --sweep, corral and b7-late).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub policies: Vec<PolicyKind>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write SVG plots (and the surge series as CSV) into this directory.
    #[arg(long)]
    pub plots_dir: Option<PathBuf>,
    /// Arrival rate of the reference run, jobs per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Simulated hours per run (warm-up included).
    #[arg(long)]
    pub hours: Option<f64>,
    /// Warm-up minutes, not measured.
    #[arg(long)]
    pub warmup_min: Option<f64>,
    /// Rates probed for SLO-goodput, a geometric grid (0: no goodput).
    #[arg(long)]
    pub goodput_grid: Option<usize>,
    /// Bisection steps refining goodput after the grid.
    #[arg(long)]
    pub bisect_steps: Option<u32>,
    /// Zipf exponent of popularity.
    #[arg(long)]
    pub zipf: Option<f64>,
    /// Run from empty disks (only the image) with no warm-up, and report
    /// the time until p95 stays within the SLO.
    #[arg(long, conflicts_with = "sweep")]
    pub cold_start: bool,
    /// Sweep this parameter (any numeric key of the scenario, e.g. zipf_s,
    /// bw_median_mbit, hazard_per_h, models, disk_gb, b6_prop_scale),
    /// with goodput at each point.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Values of the swept parameter (default for the keys above: the
    /// ranges of issue 14).
    #[arg(long, value_delimiter = ',', requires = "sweep")]
    pub points: Vec<f64>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            scenario: "s1".into(),
            config: None,
            seeds: 10,
            policies: Vec::new(),
            format: Format::Table,
            plots_dir: None,
            rate: None,
            hours: None,
            warmup_min: None,
            goodput_grid: None,
            bisect_steps: None,
            zipf: None,
            cold_start: false,
            sweep: None,
            points: Vec::new(),
            json_out: None,
            threads: None,
        }
    }
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
    if let Some(w) = args.warmup_min {
        p.warmup_min = w;
        p.ramp_min = p.ramp_min.min(w);
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

/// `corral sim`: runs the experiment (steady state, cold start or a
/// sweep) and renders it; writes plots when asked. Returns the text to
/// print.
pub fn run_cli(args: &SimArgs) -> Result<String> {
    let p = params_for(args)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if let Some(field) = &args.sweep {
        let points = if args.points.is_empty() {
            experiment::default_points(field).ok_or_else(|| {
                Error::invalid(
                    "points",
                    format!("no default points for {field}; give --points"),
                )
            })?
        } else {
            args.points.clone()
        };
        let policies = if args.policies.is_empty() {
            vec![PolicyKind::Corral, PolicyKind::B7Late]
        } else {
            args.policies.clone()
        };
        let sw = sweep(&p, field, &points, &policies, args.seeds, threads)?;
        if let Some(dir) = &args.plots_dir {
            report::write_sweep_plot(&sw, dir)?;
        }
        if let Some(path) = &args.json_out {
            let text = report::render_sweep(&sw, Format::Json);
            std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
        }
        return Ok(report::render_sweep(&sw, args.format));
    }
    let policies = if args.policies.is_empty() {
        PolicyKind::ALL.to_vec()
    } else {
        args.policies.clone()
    };
    let exp = if args.cold_start {
        cold_start(&p, &policies, args.seeds, threads)?
    } else {
        experiment(&p, &policies, args.seeds, threads)?
    };
    if let Some(dir) = &args.plots_dir {
        report::write_plots(&exp, dir)?;
    }
    if let Some(path) = &args.json_out {
        let text = report::render(&exp, Format::Json);
        std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
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
