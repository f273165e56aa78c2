//! Image planning: which models to bake into the worker image.
//!
//! A 0/1 knapsack: maximise the expected share of jobs whose model is in
//! the image, under the image's byte budget. Dynamic programming over a
//! grid of 1/8192 of the budget (sizes rounded to the nearest step); if
//! rounding lets the exact sizes overflow, the items with the least demand
//! per byte leave until the plan fits, so a plan never exceeds the budget.

use std::fmt::Write;

use crate::types::{Millis, ModelId};

use super::Scheduler;

/// A model that could go into the image, with its observed demand (any
/// unit: jobs, jobs per second, a share).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageCandidate {
    pub model: ModelId,
    pub bytes: u64,
    pub demand: f64,
}

/// The chosen models, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePlan {
    pub budget_bytes: u64,
    pub chosen: Vec<ImageCandidate>,
    pub bytes: u64,
    /// Share of all demand that the image serves.
    pub hit_share: f64,
}

/// Picks the models that maximise expected hits within `budget_bytes`.
pub fn plan_image(candidates: &[ImageCandidate], budget_bytes: u64) -> ImagePlan {
    let mut items: Vec<&ImageCandidate> = candidates
        .iter()
        .filter(|c| c.demand > 0.0 && c.bytes <= budget_bytes)
        .collect();
    items.sort_by(|a, b| a.model.cmp(&b.model));
    let unit = (budget_bytes / 8192).max(1);
    let cap = (budget_bytes / unit) as usize;
    let weight = |c: &ImageCandidate| ((c.bytes + unit / 2) / unit).max(1) as usize;
    let mut best = vec![0.0f64; cap + 1];
    let mut take = vec![false; items.len() * (cap + 1)];
    for (i, c) in items.iter().enumerate() {
        let w = weight(c);
        for b in (w..=cap).rev() {
            let with = best[b - w] + c.demand;
            if with > best[b] {
                best[b] = with;
                take[i * (cap + 1) + b] = true;
            }
        }
    }
    let mut chosen = Vec::new();
    let mut b = cap;
    for (i, c) in items.iter().enumerate().rev() {
        if take[i * (cap + 1) + b] {
            chosen.push((*c).clone());
            b -= weight(c);
        }
    }
    chosen.sort_by(|a, b| {
        b.demand
            .total_cmp(&a.demand)
            .then_with(|| a.model.cmp(&b.model))
    });
    let total: f64 = candidates.iter().map(|c| c.demand.max(0.0)).sum();
    let got: f64 = chosen.iter().map(|c| c.demand).sum();
    ImagePlan {
        budget_bytes,
        bytes: chosen.iter().map(|c| c.bytes).sum(),
        hit_share: if total > 0.0 { got / total } else { 0.0 },
        chosen,
    }
}

impl ImagePlan {
    /// A Markdown table of the plan.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let gb = |b: u64| b as f64 / 1e9;
        let _ = writeln!(
            s,
            "Image plan: {} models, {:.2} GB of {:.2} GB, expected hit share {:.1}%\n",
            self.chosen.len(),
            gb(self.bytes),
            gb(self.budget_bytes),
            100.0 * self.hit_share
        );
        let _ = writeln!(s, "| # | model | GB | demand |");
        let _ = writeln!(s, "|---|---|---|---|");
        for (i, c) in self.chosen.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.4} |",
                i + 1,
                c.model,
                gb(c.bytes),
                c.demand
            );
        }
        s
    }
}

impl Scheduler {
    /// Observed demand per model (arrivals per second) with sizes, for
    /// `plan_image`.
    pub fn demand(&self, now: Millis) -> Vec<ImageCandidate> {
        self.catalogue()
            .map(|(id, _, m)| ImageCandidate {
                model: id.clone(),
                bytes: m.bytes,
                demand: m.demand.rate_per_s(now, &self.cfg),
            })
            .collect()
    }
}
