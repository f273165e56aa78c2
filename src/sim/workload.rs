//! The world a run sees: catalogue, arrival trace and node lifetimes.
//!
//! Generated from the parameters and a seed, with separate random streams
//! for the workload, churn and bandwidth, so every policy sees the same
//! world and a change of arrival rate leaves the fleet's history alone.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Gamma, LogNormal, Zipf};

use super::params::{SimParams, Surge};

pub const GB: f64 = 1e9;

/// One file in the catalogue: checkpoints first, then LoRAs.
#[derive(Clone, Debug)]
pub struct File {
    pub bytes: u64,
    pub xl: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at_ms: u64,
    pub model: u32,
    pub lora: Option<u32>,
}

/// One node's life: it joins, runs, and leaves (maybe as a zombie).
#[derive(Clone, Copy, Debug)]
pub struct NodeLife {
    /// The fleet slot; a replacement takes its predecessor's slot.
    pub slot: usize,
    pub join_ms: u64,
    pub leave_ms: u64,
    pub zombie: bool,
    pub class: usize,
    pub bps: f64,
}

#[derive(Clone, Debug)]
pub struct World {
    pub files: Vec<File>,
    pub models: usize,
    /// Baked into every node's image.
    pub baked: Vec<u32>,
    /// Popularity rank of each model at the start (0 = most popular).
    pub rank0: Vec<usize>,
    /// The model of each of `SimParams::surges`, in order.
    pub surge_models: Vec<u32>,
    pub arrivals: Vec<Arrival>,
    pub lives: Vec<NodeLife>,
    pub end_ms: u64,
    pub warmup_ms: u64,
}

/// Independent streams from one seed.
pub fn stream(seed: u64, which: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ which.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

pub const WORKLOAD: u64 = 1;
pub const CHURN: u64 = 2;
pub const BANDWIDTH: u64 = 3;
pub const POLICY: u64 = 4;
pub const SERVICE: u64 = 5;
const CATALOGUE: u64 = 6;

impl World {
    pub fn generate(p: &SimParams, seed: u64, rate: f64) -> Self {
        let end_ms = (p.length_h * 3.6e6) as u64;
        // Catalogue: sizes independent of popularity rank.
        let mut rng = stream(seed, CATALOGUE);
        let mut files = Vec::with_capacity(p.models + p.loras);
        for _ in 0..p.models {
            let f = if rng.gen_bool(p.sd15_share.clamp(0.0, 1.0)) {
                let big = rng.gen_bool(p.sd15_big_share.clamp(0.0, 1.0));
                File {
                    bytes: ((if big { p.sd15_big_gb } else { p.sd15_gb }) * GB) as u64,
                    xl: false,
                }
            } else {
                File {
                    bytes: (p.sdxl_gb * GB) as u64,
                    xl: true,
                }
            };
            files.push(f);
        }
        for _ in 0..p.loras {
            let mb = rng.gen_range(p.lora_min_mb..=p.lora_max_mb.max(p.lora_min_mb));
            files.push(File {
                bytes: (mb * 1e6) as u64,
                xl: false,
            });
        }
        // Popularity: rank r -> model by[r].
        let mut by: Vec<u32> = (0..p.models as u32).collect();
        shuffle(&mut by, &mut rng);
        let mut rank0 = vec![0; p.models];
        for (r, m) in by.iter().enumerate() {
            rank0[*m as usize] = r;
        }
        let baked = by.iter().take(p.baked).copied().collect();
        let surge_models: Vec<u32> = p
            .surges
            .iter()
            .map(|s| surge_model(s, &by, &files))
            .collect();
        let arrivals = arrivals(p, seed, rate, end_ms, by, &surge_models);
        let lives = lives(p, seed, end_ms);
        Self {
            files,
            models: p.models,
            baked,
            rank0,
            surge_models,
            arrivals,
            lives,
            end_ms,
            warmup_ms: (p.warmup_min * 60e3) as u64,
        }
    }
}

/// The model a surge picks: the one at its rank, or the first from there
/// on whose size matches `size_gb`.
fn surge_model(s: &Surge, by: &[u32], files: &[File]) -> u32 {
    let from = s.rank.clamp(1, by.len()) - 1;
    let fits = |m: &&u32| {
        s.size_gb <= 0.0 || (files[**m as usize].bytes as f64 / GB - s.size_gb).abs() < 0.05
    };
    by[from..]
        .iter()
        .find(fits)
        .or_else(|| by[..from].iter().rev().find(fits))
        .copied()
        .unwrap_or(by[from])
}

fn shuffle<T>(v: &mut [T], rng: &mut StdRng) {
    for i in (1..v.len()).rev() {
        let j = rng.gen_range(0..=i);
        v.swap(i, j);
    }
}

fn arrivals(
    p: &SimParams,
    seed: u64,
    rate: f64,
    end_ms: u64,
    mut by: Vec<u32>,
    surge_models: &[u32],
) -> Vec<Arrival> {
    let mut rng = stream(seed, WORKLOAD);
    let zipf = Zipf::new(p.models as u64, p.zipf_s.max(0.0)).expect("valid zipf");
    let shape = 1.0 / (p.arrival_cv * p.arrival_cv);
    let gamma = Gamma::new(shape, 1.0 / shape).expect("valid gamma");
    let mut out = Vec::with_capacity((rate * end_ms as f64 / 1e3) as usize + 16);
    let mut t = 0.0f64;
    let mut next_shift = p.shift.as_ref().map(|s| s.at_min * 60e3);
    let mut shifted = false;
    loop {
        let ramp = if p.ramp_min > 0.0 {
            (t / (p.ramp_min * 60e3)).clamp(0.05, 1.0)
        } else {
            1.0
        };
        t += gamma.sample(&mut rng) * 1e3 / (rate * ramp);
        if t >= end_ms as f64 {
            break;
        }
        if let (Some(at), Some(s)) = (next_shift, p.shift.as_ref()) {
            if t >= at {
                if !shifted {
                    // Cold models from the tail jump to the top ranks.
                    let n = by.len();
                    let k = s.cold_models.min(n / 2);
                    let mut cold: Vec<u32> = Vec::with_capacity(k);
                    for _ in 0..k {
                        let i = rng.gen_range(n / 2..by.len());
                        cold.push(by.remove(i));
                    }
                    for (r, m) in cold.into_iter().enumerate() {
                        by.insert(r, m);
                    }
                    shifted = true;
                } else {
                    let swaps = ((by.len() as f64 * s.swap_share) / 2.0).round() as usize;
                    for _ in 0..swaps {
                        let a = rng.gen_range(0..by.len());
                        let b = rng.gen_range(0..by.len());
                        by.swap(a, b);
                    }
                }
                next_shift = Some(at + s.every_min.max(0.1) * 60e3);
            }
        }
        // A surge takes its share of arrivals while it lasts (the first
        // active surge, if several overlap).
        let minute = t / 60e3;
        let surge = p
            .surges
            .iter()
            .zip(surge_models)
            .find(|(s, _)| minute >= s.start_min && minute < s.start_min + s.duration_min);
        let model = match surge {
            Some((s, m)) if rng.gen_bool(s.share.clamp(0.0, 1.0)) => *m,
            _ => {
                let r = zipf.sample(&mut rng) as usize - 1;
                by[r.min(by.len() - 1)]
            }
        };
        let lora = (p.loras > 0 && rng.gen_bool(p.lora_share.clamp(0.0, 1.0)))
            .then(|| (p.models + rng.gen_range(0..p.loras)) as u32);
        out.push(Arrival {
            at_ms: t as u64,
            model,
            lora,
        });
    }
    out
}

fn lives(p: &SimParams, seed: u64, end_ms: u64) -> Vec<NodeLife> {
    let mut churn = stream(seed, CHURN);
    let mut bw = stream(seed, BANDWIDTH);
    let bw_dist =
        LogNormal::new((p.bw_median_mbit * 1e6 / 8.0).ln(), p.bw_sigma).expect("lognormal");
    let replace =
        LogNormal::new((p.replace_median_min * 60e3).ln(), p.replace_sigma).expect("lognormal");
    let life = (p.hazard_per_h > 0.0).then(|| Exp::new(p.hazard_per_h / 3.6e6).expect("exp"));
    let total: f64 = p.fleet.iter().map(|c| c.share).sum::<f64>().max(1e-9);
    let mut out = Vec::new();
    for slot in 0..p.nodes {
        // Classes by share, deterministic per slot.
        let x = (slot as f64 + 0.5) / p.nodes as f64 * total;
        let mut acc = 0.0;
        let mut class = p.fleet.len() - 1;
        for (i, c) in p.fleet.iter().enumerate() {
            acc += c.share;
            if x < acc {
                class = i;
                break;
            }
        }
        let storm_hit = p
            .storm
            .as_ref()
            .is_some_and(|s| churn.gen_bool(s.share.clamp(0.0, 1.0)));
        let mut join = 0.0f64;
        while join < end_ms as f64 {
            let mut leave = life.map_or(f64::INFINITY, |d| join + d.sample(&mut churn));
            if let (Some(s), true) = (p.storm.as_ref(), storm_hit) {
                let at = s.at_min * 60e3;
                if join <= at && leave > at {
                    leave = at + churn.gen::<f64>() * s.within_min * 60e3;
                }
            }
            let zombie = churn.gen_bool(p.zombie_share.clamp(0.0, 1.0));
            out.push(NodeLife {
                slot,
                join_ms: join as u64,
                leave_ms: leave.min(u64::MAX as f64 / 2.0) as u64,
                zombie,
                class,
                bps: bw_dist.sample(&mut bw),
            });
            join = leave + replace.sample(&mut churn);
        }
    }
    out
}
