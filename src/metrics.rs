//! Prometheus metrics through `prometheus-client`: one [`Registry`] per
//! coordinator ([`CoordMetrics`]) and per worker ([`WorkerMetrics`]), no
//! process-wide state, so that tests running several of each in one
//! process see exact counts.
//!
//! Counters and histograms are updated where events happen (one relaxed
//! atomic add). Gauges that describe state (queue depth per model, workers
//! connected) are not kept: a [`Collector`] reads them from the owner's
//! snapshot at scrape time, so they cannot drift. The text is Prometheus'
//! classic format (`text/plain; version=0.0.4`).
//!
//! Histograms are Corral's own ([`Histogram`], fixed buckets) because the
//! cluster page and the load benchmark read quantiles back in-process.
//!
//! This module knows no tonic or protobuf; callers pass domain types.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::types::{CacheTier, FailureKind, JobId, Timings};

/// A monotonically increasing count (shared by its clones).
pub type Counter = PromCounter<u64, AtomicU64>;

/// Upper bounds of the job-phase histograms, in seconds.
pub const PHASE_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Upper bounds of the submit-to-assign histogram, in seconds: finer, so
/// that quantiles read back from it are within a bucket's width (<= 1.5x).
pub const ASSIGN_BUCKETS_S: &[f64] = &[
    0.00001, 0.000015, 0.00002, 0.00003, 0.00005, 0.00007, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005,
    0.0007, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 30.0, 60.0,
];

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One per bound, plus the +Inf bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// A histogram of seconds with fixed buckets; clones share their counts.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(HistogramInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, secs: f64) {
        let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
        let i = self.0.bounds.partition_point(|b| *b < secs);
        self.0.counts[i].fetch_add(1, Relaxed);
        self.0.sum_ns.fetch_add((secs * 1e9) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn sum_s(&self) -> f64 {
        self.0.sum_ns.load(Relaxed) as f64 / 1e9
    }

    /// The bucket counts now (not cumulative), for differences over time.
    pub fn snapshot(&self) -> Vec<u64> {
        self.0.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// The `q` quantile (0..=1) of a snapshot, interpolated linearly within
    /// its bucket; `None` when empty. The +Inf bucket reads as its lower bound.
    pub fn quantile_of(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
                let Some(&hi) = bounds.get(i) else {
                    return Some(lo);
                };
                let frac = (rank - seen as f64) / c as f64;
                return Some(lo + (hi - lo) * frac);
            }
            seen += c;
        }
        bounds.last().copied()
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        Self::quantile_of(self.0.bounds, &self.snapshot(), q)
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.0.bounds
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.snapshot())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum_s(), self.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

pub const TIERS: [CacheTier; 4] = [
    CacheTier::Vram,
    CacheTier::Preloaded,
    CacheTier::Disk,
    CacheTier::Download,
];

fn tier(t: CacheTier) -> TierLabel {
    TierLabel { tier: t.as_str() }
}

fn kind(k: FailureKind) -> KindLabel {
    KindLabel { kind: k.as_str() }
}

/// The four phases of a job's time, as workers measure them.
#[derive(Clone, Debug)]
pub struct PhaseHistograms {
    pub queue: Histogram,
    pub download: Histogram,
    pub load: Histogram,
    pub inference: Histogram,
}

impl PhaseHistograms {
    fn register(reg: &mut Registry, prefix: &str, who: &str) -> Self {
        let h = Self {
            queue: Histogram::new(PHASE_BUCKETS_S),
            download: Histogram::new(PHASE_BUCKETS_S),
            load: Histogram::new(PHASE_BUCKETS_S),
            inference: Histogram::new(PHASE_BUCKETS_S),
        };
        for (phase, m, what) in [
            (
                "queue",
                &h.queue,
                "Seconds a job waited before a worker took it",
            ),
            (
                "download",
                &h.download,
                "Seconds spent downloading the model (jobs that downloaded)",
            ),
            (
                "load",
                &h.load,
                "Seconds spent loading the model (jobs that loaded one)",
            ),
            ("inference", &h.inference, "Seconds spent generating"),
        ] {
            reg.register(
                format!("{prefix}_job_{phase}_seconds"),
                format!("{what}, {who}."),
                m.clone(),
            );
        }
        h
    }

    /// Download and load are observed only for jobs that did them, so a
    /// warm job does not drag their quantiles to zero.
    pub fn observe(&self, t: &Timings) {
        self.queue.observe(t.queue_s);
        if t.tier == Some(CacheTier::Download) {
            self.download.observe(t.download_s);
        }
        if t.tier != Some(CacheTier::Vram) {
            self.load.observe(t.load_s);
        }
        self.inference.observe(t.inference_s);
    }
}

fn counter(reg: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    reg.register(name, help, c.clone());
    c
}

fn family<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

/// Renders a registry in Prometheus' text format.
fn render(reg: &Registry) -> String {
    let mut out = String::with_capacity(16 << 10);
    prometheus_client::encoding::prometheus_text::encode(&mut out, reg)
        .expect("writing to a String cannot fail");
    out
}

// ---- coordinator -------------------------------------------------------------

/// The coordinator's counters. Calls are one line at the place the event
/// happens.
#[derive(Debug)]
pub struct CoordMetrics {
    registry: Mutex<Registry>,
    pub jobs_submitted: Counter,
    pub jobs_rejected: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: Family<KindLabel, Counter>,
    pub jobs_cancelled: Counter,
    pub assignments: Family<TierLabel, Counter>,
    pub requeues: Counter,
    pub attempt_failures: Family<KindLabel, Counter>,
    pub workers_connected: Counter,
    pub workers_disconnected: Counter,
    pub workers_expired: Counter,
    /// Commits that failed (the store was then reopened).
    pub store_failures: Counter,
    pub download_bytes: Counter,
    pub messages_received: Counter,
    pub messages_sent: Counter,
    /// Accept to first Assign effect, measured on the coordinator.
    pub assign_latency: Histogram,
    /// From the timings in the results workers return.
    pub phases: PhaseHistograms,
    /// When each job not yet assigned was accepted.
    accepted_at: DashMap<JobId, Instant>,
}

impl CoordMetrics {
    /// A registry with every coordinator series; `gauges` adds the series
    /// read at scrape time.
    pub fn new(gauges: Option<Box<dyn Collector>>) -> Self {
        let mut reg = Registry::default();
        let r = &mut reg;
        let m = Self {
            jobs_submitted: counter(
                r,
                "corral_jobs_submitted",
                "Jobs accepted (committed to the store).",
            ),
            jobs_rejected: counter(
                r,
                "corral_jobs_rejected",
                "Submissions refused after validation: limits, or the store could not commit them.",
            ),
            jobs_completed: counter(r, "corral_jobs_completed", "Jobs completed."),
            jobs_failed: family(r, "corral_jobs_failed", "Jobs that ended failed, by kind."),
            jobs_cancelled: counter(r, "corral_jobs_cancelled", "Jobs cancelled by clients."),
            assignments: family(
                r,
                "corral_assignments",
                "Assignments by the cache tier the worker held the model at.",
            ),
            requeues: counter(
                r,
                "corral_requeues",
                "Attempts lost or failed retryably whose job was queued again.",
            ),
            attempt_failures: family(
                r,
                "corral_attempt_failures",
                "Attempts that failed, by kind (accepted reports only).",
            ),
            workers_connected: counter(
                r,
                "corral_workers_connected",
                "Worker streams that said Hello.",
            ),
            workers_disconnected: counter(
                r,
                "corral_workers_disconnected",
                "Worker streams that ended (closed, failed or GoingAway).",
            ),
            workers_expired: counter(
                r,
                "corral_workers_expired",
                "Workers dropped for missing their heartbeats.",
            ),
            store_failures: counter(
                r,
                "corral_store_failures",
                "Store commits that failed; each made the coordinator reopen its store and reload.",
            ),
            download_bytes: counter(
                r,
                "corral_download_bytes",
                "Model bytes downloaded by workers for jobs (from results at tier download).",
            ),
            messages_received: counter(
                r,
                "corral_worker_messages_received",
                "Messages received on worker streams.",
            ),
            messages_sent: counter(
                r,
                "corral_worker_messages_sent",
                "Messages sent on worker streams.",
            ),
            assign_latency: Histogram::new(ASSIGN_BUCKETS_S),
            phases: PhaseHistograms::register(r, "corral", "from results"),
            accepted_at: DashMap::new(),
            registry: Mutex::new(Registry::default()),
        };
        reg.register(
            "corral_assign_latency_seconds",
            "Seconds from accepting a job to its first assignment, on the coordinator.",
            m.assign_latency.clone(),
        );
        if let Some(g) = gauges {
            reg.register_collector(g);
        }
        // Every label value from the start, so that series exist at zero.
        for t in TIERS {
            let _ = m.assignments.get_or_create(&tier(t));
        }
        for k in FailureKind::ALL {
            let _ = m.jobs_failed.get_or_create(&kind(k));
            let _ = m.attempt_failures.get_or_create(&kind(k));
        }
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = reg;
        m
    }

    /// The text of `/metrics`.
    pub fn render(&self) -> String {
        render(&self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A job was accepted.
    pub fn job_accepted(&self, job: &JobId) {
        self.jobs_submitted.inc();
        self.accepted_at.insert(job.clone(), Instant::now());
    }

    /// A submission was refused after validation.
    pub fn job_rejected(&self) {
        self.jobs_rejected.inc();
    }

    /// An Assign effect was carried out. The first assignment of a job
    /// records its accept-to-assign latency.
    pub fn job_assigned(&self, job: &JobId, t: CacheTier) {
        self.assignments.get_or_create(&tier(t)).inc();
        if let Some((_, at)) = self.accepted_at.remove(job) {
            self.assign_latency.observe(at.elapsed().as_secs_f64());
        }
    }

    pub fn job_completed(&self, t: &Timings, model_bytes: u64) {
        self.jobs_completed.inc();
        self.phases.observe(t);
        if t.tier == Some(CacheTier::Download) {
            self.download_bytes.inc_by(model_bytes);
        }
    }

    pub fn job_failed(&self, job: &JobId, k: FailureKind) {
        self.jobs_failed.get_or_create(&kind(k)).inc();
        self.accepted_at.remove(job);
    }

    pub fn job_cancelled(&self, job: &JobId) {
        self.jobs_cancelled.inc();
        self.accepted_at.remove(job);
    }

    /// An attempt failed (a worker's accepted report, or a result refused).
    pub fn attempt_failed(&self, k: FailureKind) {
        self.attempt_failures.get_or_create(&kind(k)).inc();
    }

    pub fn jobs_failed_total(&self) -> u64 {
        FailureKind::ALL
            .iter()
            .map(|k| self.jobs_failed.get_or_create(&kind(*k)).get())
            .sum()
    }
}

// ---- worker ------------------------------------------------------------------

/// A worker's counters, kept by its session.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Mutex<Registry>,
    pub jobs_run: Family<TierLabel, Counter>,
    pub jobs_failed: Family<KindLabel, Counter>,
    pub phases: PhaseHistograms,
}

impl WorkerMetrics {
    /// A registry with every worker series; `gauges` adds the series read
    /// at scrape time (cache counters, what the worker holds).
    pub fn new() -> Self {
        let mut reg = Registry::default();
        let r = &mut reg;
        let m = Self {
            jobs_run: family(
                r,
                "corral_worker_jobs",
                "Jobs this worker completed, by the tier it found the model at.",
            ),
            jobs_failed: family(
                r,
                "corral_worker_job_failures",
                "Jobs this worker failed, by kind.",
            ),
            phases: PhaseHistograms::register(r, "corral_worker", "measured on this worker"),
            registry: Mutex::new(Registry::default()),
        };
        for t in TIERS {
            let _ = m.jobs_run.get_or_create(&tier(t));
        }
        for k in FailureKind::ALL {
            let _ = m.jobs_failed.get_or_create(&kind(k));
        }
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = reg;
        m
    }

    /// Adds series read at scrape time.
    pub fn add_collector(&self, c: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(c);
    }

    pub fn render(&self) -> String {
        render(&self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn job_done(&self, t: &Timings) {
        if let Some(tr) = t.tier {
            self.jobs_run.get_or_create(&tier(tr)).inc();
        }
        self.phases.observe(t);
    }

    pub fn job_failed(&self, k: FailureKind) {
        self.jobs_failed.get_or_create(&kind(k)).inc();
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

// ---- series read at scrape time ----------------------------------------------

/// Writes gauges and counters whose values are read when scraped.
pub struct Scrape<'a, 'e> {
    enc: &'a mut prometheus_client::encoding::DescriptorEncoder<'e>,
}

impl<'a, 'e> Scrape<'a, 'e> {
    pub fn new(enc: &'a mut prometheus_client::encoding::DescriptorEncoder<'e>) -> Self {
        Self { enc }
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
        let g = prometheus_client::metrics::gauge::ConstGauge::new(v);
        let e = self
            .enc
            .encode_descriptor(name, help, None, g.metric_type())?;
        g.encode(e)
    }

    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
        let c = prometheus_client::metrics::counter::ConstCounter::new(v);
        let e = self
            .enc
            .encode_descriptor(name, help, None, c.metric_type())?;
        c.encode(e)
    }

    /// One gauge per label set.
    pub fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, f64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut e = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in rows {
            let g = prometheus_client::metrics::gauge::ConstGauge::new(v);
            g.encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// One counter per label set.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut e = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            let c = prometheus_client::metrics::counter::ConstCounter::new(v);
            c.encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.5, 1.5, 3.0, 10.0] {
            h.observe(v);
        }
        assert_eq!(h.snapshot(), vec![1, 2, 1, 1]);
        assert_eq!(h.count(), 5);
        assert!((h.sum_s() - 16.5).abs() < 1e-6);
        // Rank 2.5 of 5 lies halfway through the (1, 2] bucket's two samples.
        assert!((h.quantile(0.5).unwrap() - 1.75).abs() < 1e-9);
        assert_eq!(h.quantile(1.0), Some(4.0));
        let mut reg = Registry::default();
        reg.register("x_seconds", "x", h.clone());
        let out = render(&reg);
        assert!(out.contains("x_seconds_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_count 5\n"), "{out}");
        assert_eq!(Histogram::new(&[1.0]).quantile(0.5), None);
    }

    #[test]
    fn two_coordinators_in_one_process_count_apart() {
        let (a, b) = (CoordMetrics::new(None), CoordMetrics::new(None));
        a.jobs_completed.inc();
        a.attempt_failed(FailureKind::Download);
        a.attempt_failed(FailureKind::Download);
        assert_eq!(a.jobs_completed.get(), 1);
        assert_eq!(b.jobs_completed.get(), 0);
        let text = a.render();
        assert!(text.contains("corral_jobs_completed_total 1\n"), "{text}");
        assert!(
            text.contains("corral_attempt_failures_total{kind=\"download\"} 2\n"),
            "{text}"
        );
        assert!(b.render().contains("corral_jobs_completed_total 0\n"));
    }
}
