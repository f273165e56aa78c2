//! Rendering an experiment: Markdown table, JSON, CSV, and SVG plots.

use std::fmt::Write;
use std::path::Path;

use serde_json::json;

use super::svg::{self, Axis, Series};
use super::{percentile, Experiment, PolicyOutcome, RunResult};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

/// Mean and half-width of the 95% interval (Student t).
fn mean_ci(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 || !mean.is_finite() {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    const T: [f64; 10] = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23];
    let t = T.get(v.len() - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n).sqrt())
}

fn cell(v: &[f64], digits: usize) -> String {
    let (m, h) = mean_ci(v);
    if m.is_nan() {
        "-".into()
    } else if !m.is_finite() {
        "inf".into()
    } else if v.len() < 2 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ± {h:.digits$}")
    }
}

/// Per-seed metrics of one policy, by name.
struct Metrics {
    rows: Vec<(&'static str, Vec<f64>)>,
}

impl Metrics {
    fn get(&self, name: &str) -> &[f64] {
        self.rows
            .iter()
            .find(|r| r.0 == name)
            .map_or(&[], |r| r.1.as_slice())
    }
}

fn recovery_min(r: &RunResult, at_min: f64) -> f64 {
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

fn metrics(exp: &Experiment, po: &PolicyOutcome) -> Metrics {
    let p = &exp.params;
    let mut rows: Vec<(&'static str, Vec<f64>)> = Vec::new();
    let mut push = |name: &'static str, f: &dyn Fn(&super::SeedOutcome) -> f64| {
        rows.push((name, po.seeds.iter().map(f).collect()));
    };
    push("goodput", &|s| s.goodput.unwrap_or(f64::NAN));
    push("p50_s", &|s| percentile(&s.reference.latencies_s, 0.50));
    push("p95_s", &|s| percentile(&s.reference.latencies_s, 0.95));
    push("p99_s", &|s| percentile(&s.reference.latencies_s, 0.99));
    push("gb_per_job", &|s| {
        if s.reference.done_measured == 0 {
            return f64::NAN;
        }
        s.reference.bytes_measured as f64 / 1e9 / s.reference.done_measured as f64
    });
    push("gb_per_job_all", &|s| {
        s.reference.bytes_downloaded as f64 / 1e9 / s.reference.done.max(1) as f64
    });
    push("bytes_over_lb", &|s| {
        let lb = s
            .reference
            .lb_churn_bytes
            .max(s.reference.lb_capacity_bytes)
            .max(1);
        s.reference.bytes_downloaded as f64 / lb as f64
    });
    let share = |s: &super::SeedOutcome, k: usize| {
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
    push("aborted_runs", &|s| {
        f64::from(u8::from(s.reference.aborted))
    });
    Metrics { rows }
}

/// Renders the experiment.
pub fn render(exp: &Experiment, format: Format) -> String {
    match format {
        Format::Table => table(exp),
        Format::Json => serde_json::to_string_pretty(&json_value(exp)).unwrap_or_default(),
        Format::Csv => csv(exp),
    }
}

fn bounds(exp: &Experiment) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let Some(po) = exp.outcomes.first() else {
        return (vec![], vec![], vec![]);
    };
    let churn = po
        .seeds
        .iter()
        .map(|s| s.reference.lb_churn_bytes as f64 / 1e9)
        .collect();
    let cap = po
        .seeds
        .iter()
        .map(|s| s.reference.lb_capacity_bytes as f64 / 1e9)
        .collect();
    let per_job = po
        .seeds
        .iter()
        .map(|s| {
            let r = &s.reference;
            r.lb_churn_bytes.max(r.lb_capacity_bytes) as f64 / 1e9 / r.arrived.max(1) as f64
        })
        .collect();
    (churn, cap, per_job)
}

fn table(exp: &Experiment) -> String {
    let p = &exp.params;
    let seeds = exp.outcomes.first().map_or(0, |o| o.seeds.len());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Scenario {}: {} seeds, reference rate {} jobs/s, {} h per run ({} min warm-up), {} nodes, {} models\n",
        p.name, seeds, p.rate, p.length_h, p.warmup_min, p.nodes, p.models
    );
    let _ = writeln!(
        s,
        "| policy | goodput (jobs/s) | p50 (s) | p95 (s) | p99 (s) | GB/job | GB/job (all) | bytes/LB | VRAM hit | disk hit | baked hit | miss | lost | dup |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for po in &exp.outcomes {
        let m = metrics(exp, po);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            po.policy.name(),
            cell(m.get("goodput"), 1),
            cell(m.get("p50_s"), 1),
            cell(m.get("p95_s"), 1),
            cell(m.get("p99_s"), 1),
            cell(m.get("gb_per_job"), 3),
            cell(m.get("gb_per_job_all"), 3),
            cell(m.get("bytes_over_lb"), 2),
            cell(m.get("vram_hit"), 2),
            cell(m.get("disk_hit"), 2),
            cell(m.get("baked_hit"), 2),
            cell(m.get("miss"), 3),
            cell(m.get("lost_jobs"), 0),
            cell(m.get("duplicates"), 0),
        );
    }
    let (churn, cap, per_job) = bounds(exp);
    let _ = writeln!(
        s,
        "\nLower bounds on bytes (reference run): churn cover {} GB, aggregate capacity {} GB; the larger, per arrived job: {} GB. bytes/LB divides by the larger.",
        cell(&churn, 1),
        cell(&cap, 1),
        cell(&per_job, 4)
    );
    if p.goodput_grid > 0 {
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
    let extra: &[(&str, &str)] = &[
        ("recovery_min", "p95 back to pre-shift level after (min)"),
        ("storm_p99_s", "storm p99 (s)"),
        ("steady_p99_s", "steady p99 (s)"),
        ("storm_over_steady_p99", "storm p99 / steady p99"),
        ("zombies", "zombies"),
        ("tail_decile_p95_s", "least popular decile p95 (s)"),
        ("top_decile_p95_s", "most popular decile p95 (s)"),
        ("unservable_share", "share nobody could serve"),
        (
            "gpu_load_share",
            "GPU time loading / (loading + generating)",
        ),
        ("aborted_runs", "reference runs stopped as overloaded"),
    ];
    let present: Vec<&(&str, &str)> = extra
        .iter()
        .filter(|(k, _)| {
            exp.outcomes
                .first()
                .is_some_and(|po| !metrics(exp, po).get(k).is_empty())
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
                let _ = write!(s, " {} |", cell(m.get(k), 2));
            }
            let _ = writeln!(s);
        }
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
            for (k, v) in &m.rows {
                let (mean, half) = mean_ci(v);
                obj.insert((*k).into(), num(mean));
                obj.insert(format!("{k}_ci95"), num(half));
            }
            serde_json::Value::Object(obj)
        })
        .collect();
    let (churn, cap, _) = bounds(exp);
    json!({
        "scenario": exp.params.name,
        "params": exp.params,
        "lower_bound_churn_gb": num(mean_ci(&churn).0),
        "lower_bound_capacity_gb": num(mean_ci(&cap).0),
        "policies": policies,
    })
}

fn csv(exp: &Experiment) -> String {
    let mut s = String::new();
    let Some(first) = exp.outcomes.first() else {
        return s;
    };
    let names: Vec<&str> = metrics(exp, first).rows.iter().map(|r| r.0).collect();
    let _ = write!(s, "scenario,policy");
    for n in &names {
        let _ = write!(s, ",{n},{n}_ci95");
    }
    let _ = writeln!(s);
    for po in &exp.outcomes {
        let m = metrics(exp, po);
        let _ = write!(s, "{},{}", exp.params.name, po.policy.name());
        for n in &names {
            let (mean, half) = mean_ci(m.get(n));
            let _ = write!(s, ",{mean},{half}");
        }
        let _ = writeln!(s);
    }
    s
}

/// Writes the plots of the first seed into `dir`.
pub fn write_plots(exp: &Experiment, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = &exp.params.name;
    let mut files: Vec<(String, String)> = Vec::new();
    // Latency CDF.
    let series: Vec<Series> = exp
        .outcomes
        .iter()
        .filter_map(|po| po.seeds.first().map(|s| (po, s)))
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
            Series {
                name: po.policy.name().into(),
                points: pts,
            }
        })
        .collect();
    files.push((
        format!("{name}-latency-cdf.svg"),
        svg::lines(
            &format!("{name}: latency CDF at {} jobs/s (seed 1)", exp.params.rate),
            &Axis {
                label: "latency (s)".into(),
                log: true,
                min: 0.5,
                max: 2000.0,
            },
            &Axis {
                label: "share of jobs".into(),
                log: false,
                min: 0.0,
                max: 1.0,
            },
            &series,
            Some(0.95),
        ),
    ));
    // Bytes per job.
    let values: Vec<(String, f64)> = exp
        .outcomes
        .iter()
        .map(|po| {
            let m = metrics(exp, po);
            (po.policy.name().to_owned(), mean_ci(m.get("gb_per_job")).0)
        })
        .collect();
    let lb = mean_ci(&bounds(exp).2).0;
    files.push((
        format!("{name}-bytes-per-job.svg"),
        svg::bars(
            &format!("{name}: GB downloaded per job"),
            "GB per job",
            &values,
            lb.is_finite().then_some(lb),
        ),
    ));
    // Goodput: p95 against arrival rate.
    if exp.params.goodput_grid > 0 {
        let series: Vec<Series> = exp
            .outcomes
            .iter()
            .filter_map(|po| po.seeds.first().map(|s| (po, s)))
            .map(|(po, s)| Series {
                name: po.policy.name().into(),
                points: s.probes.iter().map(|(r, p)| (*r, p.min(1e4))).collect(),
            })
            .collect();
        files.push((
            format!("{name}-goodput.svg"),
            svg::lines(
                &format!("{name}: p95 latency against arrival rate (seed 1); SLO dashed"),
                &Axis {
                    label: "arrival rate (jobs/s)".into(),
                    log: true,
                    min: exp.params.bisect_lo,
                    max: exp.params.bisect_hi,
                },
                &Axis {
                    label: "p95 latency (s)".into(),
                    log: true,
                    min: 1.0,
                    max: 1e4,
                },
                &series,
                Some(exp.params.slo_p95_s),
            ),
        ));
    }
    // p95 over time.
    let series: Vec<Series> = exp
        .outcomes
        .iter()
        .filter_map(|po| po.seeds.first().map(|s| (po, s)))
        .map(|(po, s)| Series {
            name: po.policy.name().into(),
            points: s
                .reference
                .p95_by_minute
                .iter()
                .map(|(m, v)| (f64::from(*m), v.clamp(0.5, 1e4)))
                .collect(),
        })
        .collect();
    files.push((
        format!("{name}-p95-over-time.svg"),
        svg::lines(
            &format!("{name}: p95 latency per minute of arrival (seed 1)"),
            &Axis {
                label: "minute".into(),
                log: false,
                min: exp.params.warmup_min,
                max: exp.params.length_h * 60.0,
            },
            &Axis {
                label: "p95 (s)".into(),
                log: true,
                min: 0.5,
                max: 1e4,
            },
            &series,
            Some(exp.params.slo_p95_s),
        ),
    ));
    for (f, text) in files {
        let path = dir.join(f);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
