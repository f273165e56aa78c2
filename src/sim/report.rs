//! Rendering experiments: Markdown tables, JSON, CSV, and SVG plots.
//!
//! Every figure is a mean over seeds with its 95% interval; comparisons
//! with Corral are paired by seed (the same trace): "corral − X" is the
//! mean per-seed difference and its interval, "corral / X" the mean
//! per-seed ratio.

use std::fmt::Write;
use std::path::Path;

use serde_json::json;

use super::experiment::{ramp_min, Experiment, PolicyOutcome, SeedOutcome, Sweep};
use super::percentile;
use super::policy::PolicyKind;
use super::stats::{fmt_ci, mean_ci, paired_diff, paired_ratio};
use super::svg::{self, Axis, Series};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

/// Per-seed values of one metric.
type Rows = Vec<(String, Vec<f64>)>;

fn get<'a>(rows: &'a Rows, name: &str) -> &'a [f64] {
    rows.iter()
        .find(|r| r.0 == name)
        .map_or(&[], |r| r.1.as_slice())
}

fn cell(v: &[f64], digits: usize) -> String {
    fmt_ci(mean_ci(v), digits)
}

fn recovery_min(r: &super::RunResult, at_min: f64) -> f64 {
    let at = at_min as u32;
    let pre: Vec<f64> = r
        .p95_by_minute
        .iter()
        .filter(|(m, _)| *m + 20 >= at && *m < at)
        .map(|(_, v)| *v)
        .collect();
    if pre.is_empty() {
        return f64::NAN;
    }
    let pre = pre.iter().sum::<f64>() / pre.len() as f64;
    if !pre.is_finite() {
        // Overloaded before the shift: no level to return to.
        return f64::NAN;
    }
    let thr = (1.25 * pre).max(pre + 2.0);
    let after: Vec<&(u32, f64)> = r.p95_by_minute.iter().filter(|(m, _)| *m >= at).collect();
    for i in 0..after.len() {
        let end = (i + 5).min(after.len());
        if after[i..end].iter().all(|(_, v)| *v <= thr) {
            return f64::from(after[i].0 - at);
        }
    }
    f64::INFINITY
}

/// Every metric of one policy, per seed.
fn metrics(exp: &Experiment, po: &PolicyOutcome) -> Rows {
    let p = &exp.params;
    let mut rows: Rows = Vec::new();
    let mut push = |name: &str, f: &dyn Fn(&SeedOutcome) -> f64| {
        rows.push((name.to_owned(), po.seeds.iter().map(f).collect()));
    };
    let per_job = |bytes: u64, s: &SeedOutcome| {
        if s.reference.done_measured == 0 {
            return f64::NAN;
        }
        bytes as f64 / 1e9 / s.reference.done_measured as f64
    };
    if p.goodput_grid > 0 {
        push("goodput", &|s| s.goodput.unwrap_or(f64::NAN));
    }
    push("p50_s", &|s| percentile(&s.reference.latencies_s, 0.50));
    push("p95_s", &|s| percentile(&s.reference.latencies_s, 0.95));
    push("p99_s", &|s| percentile(&s.reference.latencies_s, 0.99));
    push("gb_per_job", &|s| per_job(s.reference.bytes_measured, s));
    push("gb_per_job_lru_replay", &|s| {
        per_job(s.reference.replay_lru_bytes, s)
    });
    push("gb_per_job_belady_replay", &|s| {
        per_job(s.reference.replay_belady_bytes, s)
    });
    push("gb_per_job_all", &|s| {
        s.reference.bytes_downloaded as f64 / 1e9 / s.reference.done.max(1) as f64
    });
    let share = |s: &SeedOutcome, k: usize| {
        let r = &s.reference;
        let all = (r.hits_vram + r.hits_baked + r.hits_disk + r.misses).max(1) as f64;
        [r.hits_vram, r.hits_disk, r.hits_baked, r.misses][k] as f64 / all
    };
    push("vram_hit", &|s| share(s, 0));
    push("disk_hit", &|s| share(s, 1));
    push("baked_hit", &|s| share(s, 2));
    push("miss", &|s| share(s, 3));
    push("lost_jobs", &|s| s.reference.lost as f64);
    push("duplicates", &|s| s.reference.duplicates as f64);
    push("zombies", &|s| s.reference.zombies as f64);
    push("unservable_share", &|s| {
        s.reference.unservable as f64 / s.reference.arrived.max(1) as f64
    });
    push("gpu_load_share", &|s| {
        s.reference.load_s / (s.reference.load_s + s.reference.gen_s).max(1e-9)
    });
    push("p95_first_half_s", &|s| s.reference.p95_halves.0);
    push("p95_second_half_s", &|s| s.reference.p95_halves.1);
    push("capacity_jobs_s", &|s| s.reference.capacity_jobs_s);
    if exp.cold_start {
        let slo = p.slo_p95_s;
        push("cold_ramp_min", &move |s| ramp_min(&s.reference, slo));
    }
    if let Some(shift) = &p.shift {
        let at = shift.at_min;
        push("recovery_min", &move |s| recovery_min(&s.reference, at));
    }
    if p.storm.is_some() {
        push("storm_p99_s", &|s| s.reference.storm_p99_s);
        push("steady_p99_s", &|s| s.reference.steady_p99_s);
        push("storm_over_steady_p99", &|s| {
            s.reference.storm_p99_s / s.reference.steady_p99_s.max(1e-9)
        });
    }
    if p.loras > 0 || p.zipf_s < 1.0 {
        push("tail_decile_p95_s", &|s| {
            s.reference
                .p95_by_decile
                .last()
                .copied()
                .unwrap_or(f64::NAN)
        });
        push("top_decile_p95_s", &|s| {
            s.reference
                .p95_by_decile
                .first()
                .copied()
                .unwrap_or(f64::NAN)
        });
    }
    for i in 0..p.surges.len() {
        let at = move |s: &SeedOutcome| s.reference.surges.get(i).cloned().unwrap_or_default();
        push(&format!("surge{}_recovery_min", i + 1), &|s| {
            at(s).recovery_min
        });
        push(&format!("surge{}_model_p95_s", i + 1), &|s| {
            at(s).model_p95_s
        });
        push(&format!("surge{}_all_p95_s", i + 1), &|s| at(s).all_p95_s);
        push(&format!("surge{}_lost", i + 1), &|s| at(s).lost as f64);
    }
    if p.scale_in.is_some() {
        push("scale_in_pre_p95_s", &|s| s.reference.scale_in_pre_p95_s);
        push("scale_in_p95_s", &|s| s.reference.scale_in_p95_s);
        push("scale_in_gb", &|s| s.reference.scale_in_gb);
        push("scale_in_prefetch_gb", &|s| {
            s.reference.scale_in_prefetch_gb
        });
        push("scale_in_lost", &|s| s.reference.scale_in_lost as f64);
    }
    push("aborted_runs", &|s| {
        f64::from(u8::from(s.reference.aborted))
    });
    rows
}

/// The strongest baseline (not Corral or an ablation): highest mean
/// goodput, else lowest mean p95 at the reference rate.
pub fn best_baseline(exp: &Experiment) -> Option<PolicyKind> {
    let score = |po: &PolicyOutcome| {
        let m = metrics(exp, po);
        if exp.params.goodput_grid > 0 {
            mean_ci(get(&m, "goodput")).0
        } else {
            -mean_ci(get(&m, "p95_s")).0
        }
    };
    exp.outcomes
        .iter()
        .filter(|po| !po.policy.is_corral())
        .map(|po| (score(po), po.policy))
        .filter(|(s, _)| !s.is_nan())
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, p)| p)
}

/// Renders a single experiment.
pub fn render(exp: &Experiment, format: Format) -> String {
    match format {
        Format::Table => table(exp),
        Format::Json => serde_json::to_string_pretty(&json_value(exp)).unwrap_or_default(),
        Format::Csv => csv(std::slice::from_ref(&(None, exp))),
    }
}

/// Renders a sweep.
pub fn render_sweep(sw: &Sweep, format: Format) -> String {
    match format {
        Format::Table => sweep_table(sw),
        Format::Json => serde_json::to_string_pretty(&json!({
            "sweep": sw.field,
            "points": sw.points.iter().map(|(v, e)| json!({"value": v, "experiment": json_value(e)})).collect::<Vec<_>>(),
        }))
        .unwrap_or_default(),
        Format::Csv => {
            let rows: Vec<(Option<(&str, f64)>, &Experiment)> = sw
                .points
                .iter()
                .map(|(v, e)| (Some((sw.field.as_str(), *v)), e))
                .collect();
            csv(&rows)
        }
    }
}

/// Corral's paired comparison with `other` on metric `name`:
/// (difference, ratio) strings.
fn paired_cells(
    exp: &Experiment,
    other: &PolicyOutcome,
    name: &str,
    digits: usize,
) -> (String, String) {
    let Some(corral) = exp.outcome(PolicyKind::Corral) else {
        return ("-".into(), "-".into());
    };
    if other.policy == PolicyKind::Corral {
        return ("-".into(), "-".into());
    }
    let a = metrics(exp, corral);
    let b = metrics(exp, other);
    let (a, b) = (get(&a, name), get(&b, name));
    if a.len() != b.len() || a.is_empty() {
        return ("-".into(), "-".into());
    }
    (
        fmt_ci(paired_diff(a, b), digits),
        fmt_ci(paired_ratio(a, b), 2),
    )
}

fn header(exp: &Experiment) -> String {
    let p = &exp.params;
    let seeds = exp.outcomes.first().map_or(0, |o| o.seeds.len());
    let measured = p.length_h * 60.0 - p.warmup_min;
    if exp.cold_start {
        format!(
            "### Scenario {}, cold start: {} seeds, {} jobs/s from empty disks (only the image), measured from minute 0 for {} min; {} nodes, {} models\n",
            p.name, seeds, p.rate, measured, p.nodes, p.models
        )
    } else {
        let warm = if p.warmup_jobs > 0.0 {
            let r = p.at_rate(p.rate);
            format!(
                "warm-up of {} jobs ({:.0} min at the reference rate; the rate ramps up from 5% over its first 3/4), {} min measured",
                p.warmup_jobs, r.warmup_min, p.measure_min
            )
        } else {
            format!(
                "{} min warm-up (rate ramped up from 5% over the first {} min), {} min measured",
                p.warmup_min, p.ramp_min, measured
            )
        };
        format!(
            "### Scenario {}: {} seeds, reference rate {} jobs/s, {warm}; {} nodes, {} models, Zipf {}, median {} Mbit/s, disk {} GB, churn {}/h\n",
            p.name, seeds, p.rate, p.nodes, p.models, p.zipf_s, p.bw_median_mbit, p.disk_gb, p.hazard_per_h
        )
    }
}

fn table(exp: &Experiment) -> String {
    let p = &exp.params;
    let mut s = header(exp);
    let goodput = p.goodput_grid > 0;
    // Headline: goodput and latency, paired with Corral.
    let (key, label, digits) = if goodput {
        ("goodput", "goodput (jobs/s)", 1)
    } else if exp.cold_start {
        ("cold_ramp_min", "time to p95 <= SLO (min)", 1)
    } else {
        ("p95_s", "p95 (s)", 1)
    };
    let _ = writeln!(
        s,
        "| policy | {label} | corral − policy (paired) | corral / policy | p50 (s) | p95 (s) | p99 (s) | GB/job | lost | dup |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for po in &exp.outcomes {
        let m = metrics(exp, po);
        let (d, r) = paired_cells(exp, po, key, digits);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            po.policy.name(),
            cell(get(&m, key), digits),
            d,
            r,
            cell(get(&m, "p50_s"), 1),
            cell(get(&m, "p95_s"), 1),
            cell(get(&m, "p99_s"), 1),
            cell(get(&m, "gb_per_job"), 3),
            cell(get(&m, "lost_jobs"), 0),
            cell(get(&m, "duplicates"), 0),
        );
    }
    // Bytes and bounds.
    let _ = writeln!(
        s,
        "\nBytes per finished job after warm-up (reference run), against per-node replays of the same placements:\n"
    );
    let _ = writeln!(
        s,
        "| policy | GB/job | demand-LRU replay | Belady replay | GB/job (whole run) | VRAM hit | disk hit | baked hit | miss | GPU time loading |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for po in &exp.outcomes {
        let m = metrics(exp, po);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            po.policy.name(),
            cell(get(&m, "gb_per_job"), 3),
            cell(get(&m, "gb_per_job_lru_replay"), 3),
            cell(get(&m, "gb_per_job_belady_replay"), 3),
            cell(get(&m, "gb_per_job_all"), 3),
            cell(get(&m, "vram_hit"), 2),
            cell(get(&m, "disk_hit"), 2),
            cell(get(&m, "baked_hit"), 2),
            cell(get(&m, "miss"), 3),
            cell(get(&m, "gpu_load_share"), 2),
        );
    }
    if let Some(po) = exp.outcomes.first() {
        let lb: Vec<f64> = po
            .seeds
            .iter()
            .map(|s| {
                let r = &s.reference;
                r.lb_churn_bytes.max(r.lb_capacity_bytes) as f64 / 1e9 / r.arrived.max(1) as f64
            })
            .collect();
        let m = metrics(exp, po);
        let _ = writeln!(
            s,
            "\nBounds: fleet-wide lower bound on bytes (churn cover / aggregate capacity, whole run) {} GB per arrived job; GPU capacity (all live GPUs generating, SD1.5/SDXL split optimally across classes) {} jobs/s.",
            cell(&lb, 4),
            cell(get(&m, "capacity_jobs_s"), 1)
        );
    }
    if goodput {
        let per: Vec<String> = exp
            .outcomes
            .iter()
            .map(|po| {
                let g: Vec<String> = po
                    .seeds
                    .iter()
                    .map(|s| format!("{:.1}", s.goodput.unwrap_or(f64::NAN)))
                    .collect();
                format!("{} [{}]", po.policy.name(), g.join(", "))
            })
            .collect();
        let _ = writeln!(s, "\nGoodput per seed (jobs/s): {}.", per.join("; "));
    }
    // Scenario-specific figures.
    let mut extra: Vec<(String, String)> = vec![
        (
            "recovery_min".into(),
            "p95 back to pre-shift level after (min)".into(),
        ),
        ("storm_p99_s".into(), "storm p99 (s)".into()),
        ("steady_p99_s".into(), "steady p99 (s)".into()),
        (
            "storm_over_steady_p99".into(),
            "storm p99 / steady p99".into(),
        ),
        ("zombies".into(), "zombies".into()),
        (
            "tail_decile_p95_s".into(),
            "least popular decile p95 (s)".into(),
        ),
        (
            "top_decile_p95_s".into(),
            "most popular decile p95 (s)".into(),
        ),
        ("unservable_share".into(), "share nobody could serve".into()),
    ];
    for (i, sg) in p.surges.iter().enumerate() {
        let k = i + 1;
        let what = format!(
            "surge {k} (min {}-{})",
            sg.start_min,
            sg.start_min + sg.duration_min
        );
        extra.push((
            format!("surge{k}_recovery_min"),
            format!("{what}: model recovers after (min)"),
        ));
        extra.push((
            format!("surge{k}_model_p95_s"),
            format!("{what}: model p95 (s)"),
        ));
        extra.push((
            format!("surge{k}_all_p95_s"),
            format!("{what}: all jobs p95 (s)"),
        ));
        extra.push((format!("surge{k}_lost"), format!("{what}: model jobs lost")));
    }
    if !exp.cold_start {
        extra.push((
            "p95_first_half_s".into(),
            "p95, first half of window (s)".into(),
        ));
        extra.push(("p95_second_half_s".into(), "p95, second half (s)".into()));
    }
    extra.push((
        "aborted_runs".into(),
        "reference runs stopped as overloaded".into(),
    ));
    let present: Vec<&(String, String)> = extra
        .iter()
        .filter(|(k, _)| {
            exp.outcomes
                .first()
                .is_some_and(|po| !get(&metrics(exp, po), k).is_empty())
        })
        .collect();
    if !present.is_empty() {
        let _ = write!(s, "\n| policy |");
        for (_, label) in &present {
            let _ = write!(s, " {label} |");
        }
        let _ = write!(s, "\n|---|");
        for _ in &present {
            let _ = write!(s, "---|");
        }
        let _ = writeln!(s);
        for po in &exp.outcomes {
            let m = metrics(exp, po);
            let _ = write!(s, "| {} |", po.policy.name());
            for (k, _) in &present {
                let _ = write!(s, " {} |", cell(get(&m, k), 2));
            }
            let _ = writeln!(s);
        }
    }
    if let Some(po) = exp.outcomes.first() {
        for (i, sg) in p.surges.iter().enumerate() {
            let models: Vec<String> = po
                .seeds
                .iter()
                .filter_map(|s| s.reference.surges.get(i))
                .map(|r| {
                    format!(
                        "m{} ({:.2} GB, threshold {:.1} s)",
                        r.model,
                        r.bytes as f64 / 1e9,
                        r.threshold_s
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "\nSurge {}: rank {} (size {} GB), {:.0}% of arrivals from minute {} for {} min; model per seed: {}.",
                i + 1,
                sg.rank,
                sg.size_gb,
                sg.share * 100.0,
                sg.start_min,
                sg.duration_min,
                models.join(", ")
            );
        }
    }
    s
}

fn sweep_table(sw: &Sweep) -> String {
    let mut s = String::new();
    let Some((_, first)) = sw.points.first() else {
        return s;
    };
    let seeds = first.outcomes.first().map_or(0, |o| o.seeds.len());
    let _ = writeln!(
        s,
        "### Sweep of {} ({} seeds per point; other parameters of scenario {})\n",
        sw.field, seeds, first.params.name
    );
    let names: Vec<&str> = first.outcomes.iter().map(|o| o.policy.name()).collect();
    let _ = write!(s, "| {} |", sw.field);
    for n in &names {
        let _ = write!(s, " {n} goodput (jobs/s) |");
    }
    let others: Vec<&PolicyOutcome> = first
        .outcomes
        .iter()
        .filter(|o| o.policy != PolicyKind::Corral)
        .collect();
    for o in &others {
        let _ = write!(
            s,
            " corral − {} | corral / {} |",
            o.policy.name(),
            o.policy.name()
        );
    }
    let _ = write!(s, " GPU capacity (jobs/s) |\n|---|");
    for _ in 0..names.len() + 2 * others.len() + 1 {
        let _ = write!(s, "---|");
    }
    let _ = writeln!(s);
    for (v, e) in &sw.points {
        let _ = write!(s, "| {v} |");
        for po in &e.outcomes {
            let _ = write!(s, " {} |", cell(get(&metrics(e, po), "goodput"), 1));
        }
        for po in e.outcomes.iter().filter(|o| o.policy != PolicyKind::Corral) {
            let (d, r) = paired_cells(e, po, "goodput", 1);
            let _ = write!(s, " {d} | {r} |");
        }
        let cap = e
            .outcomes
            .first()
            .map(|po| cell(get(&metrics(e, po), "capacity_jobs_s"), 1))
            .unwrap_or_default();
        let _ = writeln!(s, " {cap} |");
    }
    s
}

fn num(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else if v.is_nan() {
        serde_json::Value::Null
    } else {
        json!("inf")
    }
}

fn json_value(exp: &Experiment) -> serde_json::Value {
    let policies: Vec<serde_json::Value> = exp
        .outcomes
        .iter()
        .map(|po| {
            let m = metrics(exp, po);
            let mut obj = serde_json::Map::new();
            obj.insert("policy".into(), json!(po.policy.name()));
            obj.insert("seeds".into(), json!(po.seeds.len()));
            obj.insert(
                "goodput_per_seed".into(),
                po.seeds
                    .iter()
                    .map(|s| num(s.goodput.unwrap_or(f64::NAN)))
                    .collect(),
            );
            for (k, v) in &m {
                let (mean, half) = mean_ci(v);
                obj.insert(k.clone(), num(mean));
                obj.insert(format!("{k}_ci95"), num(half));
            }
            // Per-seed values, for pairing runs outside one experiment
            // (e.g. two scale-in rules on the same traces).
            obj.insert(
                "per_seed".into(),
                m.iter()
                    .map(|(k, v)| (k.clone(), v.iter().map(|x| num(*x)).collect()))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            );
            if let Some(corral) = exp.outcome(PolicyKind::Corral) {
                if po.policy != PolicyKind::Corral {
                    let c = metrics(exp, corral);
                    let mut paired = serde_json::Map::new();
                    for (k, v) in &m {
                        let (d, h) = paired_diff(get(&c, k), v);
                        paired.insert(k.clone(), json!({"corral_minus": num(d), "ci95": num(h)}));
                    }
                    obj.insert(
                        "paired_with_corral".into(),
                        serde_json::Value::Object(paired),
                    );
                }
            }
            let surges: Vec<serde_json::Value> = po
                .seeds
                .iter()
                .map(|s| json!({"seed": s.seed, "surges": s.reference.surges}))
                .collect();
            if !exp.params.surges.is_empty() {
                obj.insert("surge_series".into(), json!(surges));
            }
            serde_json::Value::Object(obj)
        })
        .collect();
    json!({
        "scenario": exp.params.name,
        "cold_start": exp.cold_start,
        "params": exp.params,
        "policies": policies,
    })
}

/// One line per (point, policy): every metric's mean and half-width.
fn csv(rows: &[(Option<(&str, f64)>, &Experiment)]) -> String {
    let mut s = String::new();
    let Some((pt, first)) = rows.first() else {
        return s;
    };
    let Some(po) = first.outcomes.first() else {
        return s;
    };
    let names: Vec<String> = metrics(first, po).into_iter().map(|r| r.0).collect();
    let _ = write!(s, "scenario,");
    if let Some((field, _)) = pt {
        let _ = write!(s, "{field},");
    }
    let _ = write!(s, "policy");
    for n in &names {
        let _ = write!(s, ",{n},{n}_ci95");
    }
    let _ = writeln!(s);
    for (pt, exp) in rows {
        for po in &exp.outcomes {
            let m = metrics(exp, po);
            let _ = write!(s, "{},", exp.params.name);
            if let Some((_, v)) = pt {
                let _ = write!(s, "{v},");
            }
            let _ = write!(s, "{}", po.policy.name());
            for n in &names {
                let (mean, half) = mean_ci(get(&m, n));
                let _ = write!(s, ",{mean},{half}");
            }
            let _ = writeln!(s);
        }
    }
    s
}

fn write_files(dir: &Path, files: Vec<(String, String)>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (f, text) in files {
        let path = dir.join(f);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// The first seed of each policy, for per-run plots.
fn first_seeds(exp: &Experiment) -> impl Iterator<Item = (&PolicyOutcome, &SeedOutcome)> {
    exp.outcomes
        .iter()
        .filter_map(|po| po.seeds.first().map(|s| (po, s)))
}

/// Writes the plots of an experiment (first seed of each policy; the surge
/// series of every seed as CSV) into `dir`.
pub fn write_plots(exp: &Experiment, dir: &Path) -> Result<()> {
    let p = &exp.params.at_rate(exp.params.rate);
    let name = if exp.cold_start {
        format!("{}-cold", p.name)
    } else {
        p.name.clone()
    };
    let mut files: Vec<(String, String)> = Vec::new();
    if !exp.cold_start {
        let series: Vec<Series> = first_seeds(exp)
            .map(|(po, s)| {
                let l = &s.reference.latencies_s;
                let n = l.len().max(1) as f64;
                let step = (l.len() / 400).max(1);
                let mut pts: Vec<(f64, f64)> = l
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % step == 0 || *i + 1 == l.len())
                    .map(|(i, v)| (v.max(0.1), (i + 1) as f64 / n))
                    .collect();
                pts.retain(|p| p.0.is_finite());
                Series::new(po.policy.name(), pts)
            })
            .collect();
        files.push((
            format!("{name}-latency-cdf.svg"),
            svg::lines(
                &format!("{name}: latency CDF at {} jobs/s (seed 1)", p.rate),
                &Axis::log("latency (s)", 0.5, 2000.0),
                &Axis::linear("share of jobs", 0.0, 1.0),
                &series,
                Some(0.95),
            ),
        ));
    }
    let values: Vec<(String, f64)> = exp
        .outcomes
        .iter()
        .map(|po| {
            let m = metrics(exp, po);
            (
                po.policy.name().to_owned(),
                mean_ci(get(&m, "gb_per_job")).0,
            )
        })
        .collect();
    files.push((
        format!("{name}-bytes-per-job.svg"),
        svg::bars(
            &format!("{name}: GB downloaded per finished job after warm-up"),
            "GB per job",
            &values,
            None,
        ),
    ));
    if p.goodput_grid > 0 {
        let series: Vec<Series> = first_seeds(exp)
            .map(|(po, s)| {
                Series::new(
                    po.policy.name(),
                    s.probes.iter().map(|(r, p)| (*r, p.min(1e4))).collect(),
                )
            })
            .collect();
        files.push((
            format!("{name}-goodput.svg"),
            svg::lines(
                &format!("{name}: p95 latency against arrival rate (seed 1); SLO dashed"),
                &Axis::log("arrival rate (jobs/s)", p.bisect_lo, p.bisect_hi),
                &Axis::log("p95 latency (s)", 1.0, 1e4),
                &series,
                Some(p.slo_p95_s),
            ),
        ));
    }
    let series: Vec<Series> = first_seeds(exp)
        .map(|(po, s)| {
            Series::new(
                po.policy.name(),
                s.reference
                    .p95_by_minute
                    .iter()
                    .map(|(m, v)| (f64::from(*m), v.clamp(0.5, 1e4)))
                    .collect(),
            )
        })
        .collect();
    files.push((
        format!("{name}-p95-over-time.svg"),
        svg::lines(
            &format!("{name}: p95 latency per minute of arrival (seed 1)"),
            &Axis::linear("minute", p.warmup_min, p.length_h * 60.0),
            &Axis::log("p95 (s)", 0.5, 1e4),
            &series,
            Some(p.slo_p95_s),
        ),
    ));
    for (i, sg) in p.surges.iter().enumerate() {
        let k = i + 1;
        let mut threshold = f64::NAN;
        let series: Vec<Series> = first_seeds(exp)
            .filter_map(|(po, s)| {
                let r = s.reference.surges.get(i)?;
                threshold = r.threshold_s;
                Some(Series::new(
                    po.policy.name(),
                    r.per_minute
                        .iter()
                        .map(|(m, _, _, p95)| (f64::from(*m), p95.clamp(0.5, 1e4)))
                        .collect(),
                ))
            })
            .collect();
        files.push((
            format!("{name}-surge{k}-model-p95.svg"),
            svg::lines(
                &format!(
                    "{name}: surge model's p95 per minute (seed 1), surge min {}-{}; dashed: 2 x (generation + load)",
                    sg.start_min,
                    sg.start_min + sg.duration_min
                ),
                &Axis::linear("minute", (sg.start_min - 10.0).max(0.0), sg.start_min + sg.duration_min + 10.0),
                &Axis::log("p95 (s)", 0.5, 1e4),
                &series,
                threshold.is_finite().then_some(threshold),
            ),
        ));
        let mut text = String::from("policy,seed,minute,jobs,p50_s,p95_s\n");
        for po in &exp.outcomes {
            for s in &po.seeds {
                if let Some(r) = s.reference.surges.get(i) {
                    for (m, n, p50, p95) in &r.per_minute {
                        let _ =
                            writeln!(text, "{},{},{m},{n},{p50},{p95}", po.policy.name(), s.seed);
                    }
                }
            }
        }
        files.push((format!("{name}-surge{k}-model-latency.csv"), text));
    }
    write_files(dir, files)
}

/// One plot per sweep: goodput (mean and 95% interval) of each policy
/// against the swept value.
pub fn write_sweep_plot(sw: &Sweep, dir: &Path) -> Result<()> {
    let Some((_, first)) = sw.points.first() else {
        return Ok(());
    };
    let mut series: Vec<Series> = first
        .outcomes
        .iter()
        .map(|po| Series::new(po.policy.name(), Vec::new()))
        .collect();
    let mut hi = 1.0f64;
    for (v, e) in &sw.points {
        for (i, po) in e.outcomes.iter().enumerate() {
            let (m, h) = mean_ci(get(&metrics(e, po), "goodput"));
            series[i].points.push((*v, m));
            series[i].err.push(h);
            hi = hi.max(m + h);
        }
    }
    let cap: Vec<(f64, f64)> = sw
        .points
        .iter()
        .filter_map(|(v, e)| {
            let po = e.outcomes.first()?;
            Some((*v, mean_ci(get(&metrics(e, po), "capacity_jobs_s")).0))
        })
        .collect();
    hi = cap.iter().map(|c| c.1).fold(hi, f64::max);
    series.push(Series::new("GPU capacity bound", cap));
    let xs: Vec<f64> = sw.points.iter().map(|(v, _)| *v).collect();
    let (lo_x, hi_x) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(0.0, f64::max),
    );
    let log_x = lo_x > 0.0 && hi_x / lo_x > 8.0;
    let x = Axis {
        label: sw.field.clone(),
        log: log_x,
        min: if log_x {
            lo_x
        } else {
            lo_x - (hi_x - lo_x) * 0.05
        },
        max: if log_x {
            hi_x
        } else {
            hi_x + (hi_x - lo_x) * 0.05
        },
    };
    let text = svg::lines(
        &format!(
            "goodput against {} ({} other parameters fixed)",
            sw.field, first.params.name
        ),
        &x,
        &Axis::linear("goodput (jobs/s, p95 <= 60 s)", 0.0, (hi * 1.1).ceil()),
        &series,
        None,
    );
    write_files(dir, vec![(format!("sweep-{}.svg", sw.field), text)])
}
