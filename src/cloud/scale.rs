//! How many workers the fleet wants: the `corral_desired_workers` signal,
//! for any autoscaler that reads Prometheus (or the coordinator itself,
//! through the SaladCloud API). Pure.
//!
//! ```text
//! busy    = arrival rate x mean job seconds x headroom      (Little's law)
//! backlog = queued jobs x mean job seconds / (cold start + target drain)
//! desired = ceil((busy + backlog) / job slots per worker), within [min, max]
//! ```
//!
//! A node asked for now helps only after its cold start, so queued work is
//! spread over the cold start plus the time it should take to drain. The
//! signal rises at once; it falls only once the lower value has held for
//! the cooldown (nodes are slow to come back).

use crate::types::Millis;

/// The tunables (`[coordinator.cloud]` scale_*, bounds, cold start).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleParams {
    pub min_workers: u32,
    pub max_workers: u32,
    pub cooldown_ms: Millis,
    pub cold_start_s: f64,
    pub target_drain_s: f64,
    pub headroom: f64,
}

impl From<&super::CloudConfig> for ScaleParams {
    fn from(c: &super::CloudConfig) -> Self {
        Self {
            min_workers: c.min_workers,
            max_workers: c.max_workers,
            cooldown_ms: (c.scale_down_cooldown_s * 1000.0) as Millis,
            cold_start_s: c.cold_start_s,
            target_drain_s: c.scale_target_drain_s,
            headroom: c.scale_headroom,
        }
    }
}

/// The fleet's load at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Jobs waiting for a worker.
    pub queued: u64,
    /// Jobs arriving per second (recent).
    pub arrival_per_s: f64,
    /// Seconds a job occupies a slot: download, load and generation.
    pub mean_job_s: f64,
    /// Mean job slots per worker (1 when unknown).
    pub slots_per_worker: f64,
}

/// Workers wanted for `load`, before bounds and cooldown (fractional).
pub fn wanted(load: &Load, p: &ScaleParams) -> f64 {
    let job_s = load.mean_job_s.max(0.0);
    let busy = load.arrival_per_s.max(0.0) * job_s * p.headroom;
    let backlog = load.queued as f64 * job_s / (p.cold_start_s + p.target_drain_s).max(1.0);
    let slots = if load.slots_per_worker >= 1.0 {
        load.slots_per_worker
    } else {
        1.0
    };
    let w = (busy + backlog) / slots;
    // Queued work needs somebody, however short.
    if load.queued > 0 {
        w.max(1.0)
    } else {
        w
    }
}

/// The signal with its memory (bounds and cooldown).
#[derive(Clone, Debug)]
pub struct Scaler {
    p: ScaleParams,
    current: u32,
    /// Since when the wanted value has been below `current`, and the
    /// largest wanted value seen since then.
    lower_since: Option<(Millis, u32)>,
}

impl Scaler {
    pub fn new(p: ScaleParams) -> Self {
        Self {
            current: p.min_workers,
            p,
            lower_since: None,
        }
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    /// Feeds one observation; returns the signal.
    pub fn update(&mut self, load: &Load, now: Millis) -> u32 {
        let w = wanted(load, &self.p).ceil();
        let w = (w.min(f64::from(u32::MAX)) as u32).clamp(self.p.min_workers, self.p.max_workers);
        if w >= self.current {
            self.current = w;
            self.lower_since = None;
            return w;
        }
        let (since, peak) = self.lower_since.get_or_insert((now, w));
        *peak = (*peak).max(w);
        if now.saturating_sub(*since) >= self.p.cooldown_ms {
            // Down to the most the cooldown window wanted, not its last value.
            self.current = *peak;
            self.lower_since = None;
        }
        self.current
    }
}

/// An arrival rate from a growing counter: an exponentially weighted rate
/// with time constant `tau_ms`.
#[derive(Clone, Debug)]
pub struct Rate {
    tau_ms: f64,
    last: Option<(Millis, u64)>,
    rate: f64,
}

impl Rate {
    pub fn new(tau_ms: Millis) -> Self {
        Self {
            tau_ms: tau_ms.max(1) as f64,
            last: None,
            rate: 0.0,
        }
    }

    /// Feeds the counter's value at `now`; returns the rate per second.
    pub fn update(&mut self, count: u64, now: Millis) -> f64 {
        if let Some((t, c)) = self.last {
            let dt = now.saturating_sub(t) as f64;
            if dt > 0.0 {
                let inst = count.saturating_sub(c) as f64 * 1000.0 / dt;
                let a = 1.0 - (-dt / self.tau_ms).exp();
                self.rate += a * (inst - self.rate);
            }
        }
        self.last = Some((now, count));
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ScaleParams {
        ScaleParams {
            min_workers: 2,
            max_workers: 50,
            cooldown_ms: 60_000,
            cold_start_s: 300.0,
            target_drain_s: 300.0,
            headroom: 1.25,
        }
    }

    #[test]
    fn wanted_follows_littles_law_and_the_backlog() {
        let p = params();
        let steady = Load {
            arrival_per_s: 2.0,
            mean_job_s: 10.0,
            slots_per_worker: 1.0,
            ..Load::default()
        };
        assert!((wanted(&steady, &p) - 25.0).abs() < 1e-9);
        let backlog = Load {
            queued: 600,
            ..steady
        };
        // 600 jobs x 10 s over 600 s: ten more workers.
        assert!((wanted(&backlog, &p) - 35.0).abs() < 1e-9);
        let two_slots = Load {
            slots_per_worker: 2.0,
            ..steady
        };
        assert!((wanted(&two_slots, &p) - 12.5).abs() < 1e-9);
        let trickle = Load {
            queued: 1,
            mean_job_s: 1.0,
            ..Load::default()
        };
        assert_eq!(wanted(&trickle, &p), 1.0);
    }

    #[test]
    fn rises_at_once_falls_after_the_cooldown_within_bounds() {
        let p = params();
        let mut s = Scaler::new(p);
        let load = |rate: f64| Load {
            arrival_per_s: rate,
            mean_job_s: 10.0,
            slots_per_worker: 1.0,
            queued: 0,
        };
        assert_eq!(s.update(&load(0.0), 0), 2, "the minimum");
        assert_eq!(s.update(&load(2.0), 1_000), 25);
        assert_eq!(s.update(&load(100.0), 2_000), 50, "the maximum");
        assert_eq!(s.update(&load(0.8), 3_000), 50);
        assert_eq!(s.update(&load(0.4), 30_000), 50);
        // The cooldown's largest want (0.8/s: 10 workers), not its last.
        assert_eq!(s.update(&load(0.4), 63_000), 10);
        assert_eq!(s.update(&load(0.0), 64_000), 10);
        assert_eq!(s.update(&load(0.0), 124_000), 2);
    }

    #[test]
    fn rate_converges_on_a_steady_count() {
        let mut r = Rate::new(10_000);
        let mut out = 0.0;
        for i in 0..200u64 {
            out = r.update(i * 5, i * 1000);
        }
        assert!((out - 5.0).abs() < 0.01, "{out}");
    }
}
