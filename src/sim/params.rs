//! Simulation parameters: the scenarios of ../shared/BENCHMARK.md and a
//! TOML overlay so users can simulate their own fleet and catalogue.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One class of GPU in the fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuClass {
    /// Share of the nodes.
    pub share: f64,
    pub vram_gb: f64,
    /// Seconds per SD1.5 image.
    pub sd15_s: f64,
    /// Seconds per SDXL image.
    pub sdxl_s: f64,
}

/// A mass departure (S3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storm {
    pub at_min: f64,
    /// Share of live nodes that leave.
    pub share: f64,
    pub within_min: f64,
}

/// A surge: one model takes a share of all arrivals for a while (a viral
/// checkpoint). The model is found by popularity rank, so its size follows
/// from the catalogue; `size_gb` picks the first model at or after `rank`
/// of that size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Surge {
    /// Popularity rank where the search starts (1 = most popular).
    pub rank: usize,
    /// Size of the model wanted, GB (matched within 0.05 GB); 0: the model
    /// at `rank`, whatever its size. Default: 0.
    #[serde(default)]
    pub size_gb: f64,
    /// Share of all arrivals that go to the model during the surge.
    pub share: f64,
    pub start_min: f64,
    pub duration_min: f64,
}

/// How a scale-in picks the nodes it removes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleInRule {
    /// Lowest deletion cost first (`scale_in.rs`), as SaladCloud does
    /// with the cost the workers report.
    #[default]
    Cost,
    /// Uniformly at random.
    Random,
}

/// A scale-in: `nodes` live nodes are removed at `at_min` and not
/// replaced (the fleet shrinks). They are stopped (SIGTERM: Corral's
/// worker says GoingAway) unless `abrupt`, where they vanish like crashed
/// hosts and Corral's scheduler reads them as losses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleIn {
    pub at_min: f64,
    pub nodes: usize,
    #[serde(default)]
    pub rule: ScaleInRule,
    #[serde(default)]
    pub abrupt: bool,
}

/// A popularity shift (S2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shift {
    pub at_min: f64,
    /// Cold models that jump to the top ranks.
    pub cold_models: usize,
    /// Share of ranks swapped at each later step.
    pub swap_share: f64,
    pub every_min: f64,
}

/// Everything a run depends on. Defaults: scenario S1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimParams {
    pub name: String,
    // ---- catalogue and popularity
    pub models: usize,
    pub zipf_s: f64,
    pub sd15_share: f64,
    pub sd15_gb: f64,
    /// Share of SD1.5 models that are the larger size.
    pub sd15_big_share: f64,
    pub sd15_big_gb: f64,
    pub sdxl_gb: f64,
    /// LoRAs in the catalogue (0: none).
    pub loras: usize,
    /// Share of jobs that add one LoRA.
    pub lora_share: f64,
    pub lora_min_mb: f64,
    pub lora_max_mb: f64,
    // ---- fleet
    pub nodes: usize,
    pub fleet: Vec<GpuClass>,
    /// Generation time jitter, +- this share.
    pub jitter: f64,
    pub disk_gb: f64,
    /// Most popular models baked into the image.
    pub baked: usize,
    pub vram_reserved_gb: f64,
    pub bw_median_mbit: f64,
    pub bw_sigma: f64,
    pub load_base_s: f64,
    pub load_gbps: f64,
    pub heartbeat_s: f64,
    pub heartbeat_timeout_s: f64,
    // ---- churn
    /// Leave hazard per node-hour.
    pub hazard_per_h: f64,
    pub replace_median_min: f64,
    pub replace_sigma: f64,
    /// Share of leavers that are zombies.
    pub zombie_share: f64,
    /// How late a zombie finishes its current job.
    pub zombie_delay_s: f64,
    pub storm: Option<Storm>,
    pub shift: Option<Shift>,
    /// Surges of single models (`[[surges]]` in TOML).
    pub surges: Vec<Surge>,
    /// A scale-in (`[scale_in]` in TOML).
    pub scale_in: Option<ScaleIn>,
    // ---- arrivals
    /// Jobs per second for the reference run.
    pub rate: f64,
    pub arrival_cv: f64,
    /// Minutes over which the rate ramps up from 5% (0: none).
    pub ramp_min: f64,
    pub length_h: f64,
    pub warmup_min: f64,
    /// Warm-up by count of jobs instead of minutes (0: use `warmup_min`):
    /// the warm-up lasts as long as this many jobs take at the run's rate,
    /// its first 3/4 ramping the rate up from 5% (a fleet with cold disks
    /// is not swamped), then `measure_min` minutes are measured. Caches converge by requests, not minutes, so every
    /// rate gets a like warm-up. Overrides `warmup_min`, `ramp_min` and
    /// `length_h`.
    pub warmup_jobs: f64,
    /// Minutes measured after a `warmup_jobs` warm-up.
    pub measure_min: f64,
    /// Simulated minutes after the last arrival for jobs to finish.
    pub drain_min: f64,
    // ---- goodput bisection
    pub slo_p95_s: f64,
    pub bisect_lo: f64,
    pub bisect_hi: f64,
    /// Bisection steps after the grid; 0: no goodput search at all.
    pub bisect_steps: u32,
    /// Geometric grid of rates from bisect_lo to bisect_hi, probed from
    /// the top down (0: goodput not searched).
    pub goodput_grid: usize,
    /// A run with more than this many seconds of arrivals outstanding
    /// stops early as overloaded (0: never).
    pub abort_backlog_s: f64,
    // ---- baselines and Corral tunables
    pub b4_vram_models: usize,
    /// B6: candidates per model (fixed k).
    pub b6_k: usize,
    /// B6: bounded-load cap, a multiple of the mean load.
    pub b6_cap: f64,
    /// B6-prop: candidates per model = max(b6_min_k, ceil(scale x share
    /// of recent arrivals x live nodes)).
    pub b6_prop_scale: f64,
    pub b6_min_k: usize,
    pub corral_min_replicas: u32,
    pub corral_headroom: f64,
    pub corral_replicate: bool,
    /// The scheduler's `starvation_ms`, in seconds.
    pub corral_starvation_s: f64,
    /// The scheduler's `recent_demand_per_hour`.
    pub corral_recent_per_h: f64,
    /// The scheduler's `replica_disk_share`.
    pub corral_disk_share: f64,
    /// Ablation corral-early: jobs a node accepts at once (it runs one and
    /// queues the rest), so the scheduler binds jobs before a GPU is free.
    /// The scheduler takes a free slot for a free GPU, so this overstates
    /// what binding early costs; a faithful switch is for the scheduler.
    pub corral_early_slots: u32,
}

impl Default for SimParams {
    fn default() -> Self {
        Self {
            name: "s1".into(),
            models: 1000,
            zipf_s: 1.1,
            sd15_share: 0.7,
            sd15_gb: 2.13,
            sd15_big_share: 0.25,
            sd15_big_gb: 4.24,
            sdxl_gb: 6.94,
            loras: 0,
            lora_share: 0.5,
            lora_min_mb: 10.0,
            lora_max_mb: 200.0,
            nodes: 200,
            fleet: vec![
                GpuClass {
                    share: 0.4,
                    vram_gb: 24.0,
                    sd15_s: 2.0,
                    sdxl_s: 6.0,
                },
                GpuClass {
                    share: 0.3,
                    vram_gb: 24.0,
                    sd15_s: 3.5,
                    sdxl_s: 10.0,
                },
                GpuClass {
                    share: 0.3,
                    vram_gb: 12.0,
                    sd15_s: 7.0,
                    sdxl_s: 18.0,
                },
            ],
            jitter: 0.1,
            disk_gb: 50.0,
            baked: 5,
            vram_reserved_gb: 4.0,
            bw_median_mbit: 200.0,
            bw_sigma: 0.9,
            load_base_s: 1.5,
            load_gbps: 1.5,
            heartbeat_s: 5.0,
            heartbeat_timeout_s: 15.0,
            hazard_per_h: 0.011,
            replace_median_min: 10.0,
            replace_sigma: 1.08,
            zombie_share: 0.0,
            zombie_delay_s: 60.0,
            storm: None,
            shift: None,
            surges: Vec::new(),
            scale_in: None,
            rate: 10.0,
            arrival_cv: 2.0,
            ramp_min: 20.0,
            length_h: 1.5,
            warmup_min: 40.0,
            warmup_jobs: 100_000.0,
            measure_min: 30.0,
            drain_min: 10.0,
            slo_p95_s: 60.0,
            bisect_lo: 4.0,
            bisect_hi: 64.0,
            bisect_steps: 4,
            goodput_grid: 5,
            abort_backlog_s: 300.0,
            b4_vram_models: 3,
            b6_k: 4,
            b6_cap: 4.0,
            b6_prop_scale: 2.0,
            b6_min_k: 2,
            corral_min_replicas: 2,
            corral_headroom: 1.5,
            corral_replicate: true,
            corral_starvation_s: 60.0,
            corral_recent_per_h: 6.0,
            corral_disk_share: 0.8,
            corral_early_slots: 2,
        }
    }
}

/// The arrival rate of the timed scenarios (S2, S3, surges, scale-in):
/// about the best baseline's steady-state S1 goodput (b7-prefetch, 20.3
/// jobs/s in docs/sim.md), so harsher than the 0.7 x of the surge
/// targets, which docs/sim.md also reports at `--rate 14.2`.
pub const REFERENCE_RATE: f64 = 20.0;

impl SimParams {
    /// The named scenario: s1 to s4, surge-sd15, surge-sdxl, scale-in,
    /// scale-in-random, scale-in-abrupt.
    pub fn scenario(name: &str) -> Result<Self> {
        let s1 = Self::default();
        // Scenarios with events at fixed minutes warm up by time: 90
        // minutes (the first 20 ramping up), about 100,000 jobs at the
        // reference rate.
        let timed = Self {
            rate: REFERENCE_RATE,
            warmup_jobs: 0.0,
            warmup_min: 90.0,
            ramp_min: 20.0,
            goodput_grid: 0,
            ..Self::default()
        };
        let surge = |name: &str, size_gb: f64| Self {
            name: name.into(),
            length_h: 130.0 / 60.0,
            surges: vec![Surge {
                rank: 100,
                size_gb,
                share: 0.3,
                start_min: 90.0,
                duration_min: 20.0,
            }],
            ..timed.clone()
        };
        Ok(match name.to_ascii_lowercase().as_str() {
            "s1" => s1,
            "surge-sd15" => surge("surge-sd15", s1.sd15_gb),
            "surge-sdxl" => surge("surge-sdxl", s1.sdxl_gb),
            "scale-in" | "scale-in-random" | "scale-in-abrupt" => Self {
                name: name.into(),
                length_h: 130.0 / 60.0,
                scale_in: Some(ScaleIn {
                    at_min: 90.0,
                    nodes: 40,
                    rule: if name.ends_with("random") {
                        ScaleInRule::Random
                    } else {
                        ScaleInRule::Cost
                    },
                    abrupt: name.ends_with("abrupt"),
                }),
                ..timed.clone()
            },
            "s2" => Self {
                name: "s2".into(),
                length_h: 150.0 / 60.0,
                shift: Some(Shift {
                    at_min: 110.0,
                    cold_models: 20,
                    swap_share: 0.05,
                    every_min: 10.0,
                }),
                ..timed.clone()
            },
            "s3" => Self {
                name: "s3".into(),
                length_h: 150.0 / 60.0,
                hazard_per_h: 0.05,
                zombie_share: 0.02,
                storm: Some(Storm {
                    at_min: 110.0,
                    share: 0.3,
                    within_min: 5.0,
                }),
                ..timed.clone()
            },
            "s4" => Self {
                name: "s4".into(),
                models: 3000,
                zipf_s: 0.8,
                loras: 5000,
                nodes: 100,
                rate: 0.5,
                warmup_jobs: 0.0,
                ramp_min: 10.0,
                warmup_min: 20.0,
                length_h: 2.0,
                goodput_grid: 0,
                ..s1
            },
            other => {
                return Err(Error::invalid(
                    "scenario",
                    format!(
                    "unknown scenario {other:?}; expected s1, s2, s3, s4, surge-sd15, surge-sdxl, scale-in, scale-in-random or scale-in-abrupt"
                ),
                ))
            }
        })
    }

    /// The scenario, with the TOML file's keys laid over it.
    pub fn load(scenario: &str, config: Option<&Path>) -> Result<Self> {
        let base = Self::scenario(scenario)?;
        let Some(path) = config else {
            return Ok(base);
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let over: toml::Value =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut merged =
            toml::Value::try_from(&base).map_err(|e| Error::Config(format!("internal: {e}")))?;
        merge(&mut merged, over);
        let p: Self = merged
            .try_into()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        p.validate()?;
        Ok(p)
    }

    /// The parameters of a run at `rate`: a warm-up given in jobs becomes
    /// minutes at that rate.
    pub fn at_rate(&self, rate: f64) -> Self {
        let mut p = self.clone();
        p.rate = rate;
        if self.warmup_jobs > 0.0 && rate > 0.0 {
            // The ramp covers the first 3/4 of the warm-up at a mean of
            // (5% + 100%) / 2 of the rate: expected jobs are
            // rate x minutes x (0.75 x 0.525 + 0.25).
            p.warmup_min = self.warmup_jobs / rate / 60.0 / (0.75 * 0.525 + 0.25);
            p.ramp_min = 0.75 * p.warmup_min;
            p.length_h = (p.warmup_min + self.measure_min) / 60.0;
        }
        p
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |f: &'static str, r: &str| Err(Error::invalid(f, r.to_owned()));
        if self.models == 0 {
            return bad("models", "must be at least 1");
        }
        if self.nodes == 0 {
            return bad("nodes", "must be at least 1");
        }
        if self.fleet.is_empty() || self.fleet.iter().any(|c| c.share < 0.0) {
            return bad("fleet", "needs at least one class with a share >= 0");
        }
        if self.rate <= 0.0 || self.arrival_cv <= 0.0 {
            return bad("rate", "rate and arrival_cv must be > 0");
        }
        // A warm-up given in jobs sets the length (`at_rate`).
        if self.warmup_jobs == 0.0
            && (self.length_h <= 0.0 || self.warmup_min / 60.0 >= self.length_h)
        {
            return bad("length_h", "must be longer than warmup_min");
        }
        if self.warmup_jobs < 0.0 || (self.warmup_jobs > 0.0 && self.measure_min <= 0.0) {
            return bad("warmup_jobs", "must be >= 0, and measure_min > 0 with it");
        }
        if self.zipf_s < 0.0 {
            return bad("zipf_s", "must be >= 0");
        }
        Ok(())
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_table() && v.is_table() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}
