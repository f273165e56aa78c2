//! Prometheus metrics: counters and histograms on atomics, rendered in the
//! text exposition format by hand (no metrics crate: the hot paths pay one
//! relaxed atomic add per event, and the benchmark reads the histograms
//! back in-process).
//!
//! Two process-wide sets: [`coord()`] for the coordinator and [`worker()`]
//! for a worker. A process normally runs one of the two; tests and the
//! benchmark that run several workers in one process see their sum.
//! Gauges that describe state (queue depth per model, workers connected)
//! are not kept here: the HTTP handler reads them from the coordinator when
//! scraped, so they cannot drift.
//!
//! This module knows no tonic or protobuf; callers pass domain types.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::LazyLock;
use std::time::Instant;

use dashmap::DashMap;

use crate::types::{CacheTier, JobId, Timings};

/// A monotonically increasing count.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

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

/// A histogram of seconds with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the +Inf bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add((secs * 1e9) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn sum_s(&self) -> f64 {
        self.sum_ns.load(Relaxed) as f64 / 1e9
    }

    /// The bucket counts now (not cumulative), for differences over time.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
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
        Self::quantile_of(self.bounds, &self.snapshot(), q)
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Appends `name_bucket`, `name_sum` and `name_count` lines.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_s());
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

/// Appends `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Appends one sample line.
pub fn sample(out: &mut String, name: &str, labels: &str, v: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {v}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// Escapes a label value (backslash, quote, newline).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub const TIERS: [CacheTier; 4] = [
    CacheTier::Vram,
    CacheTier::Preloaded,
    CacheTier::Disk,
    CacheTier::Download,
];

fn tier_index(t: CacheTier) -> usize {
    match t {
        CacheTier::Vram => 0,
        CacheTier::Preloaded => 1,
        CacheTier::Disk => 2,
        CacheTier::Download => 3,
    }
}

/// Why an attempt or a job failed, in a few classes with a bounded number
/// of label values (the reasons themselves are free text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    Cancelled,
    WorkerLost,
    HeartbeatMissed,
    Download,
    Load,
    Inference,
    Other,
}

impl FailureClass {
    pub const ALL: [FailureClass; 7] = [
        Self::Cancelled,
        Self::WorkerLost,
        Self::HeartbeatMissed,
        Self::Download,
        Self::Load,
        Self::Inference,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::WorkerLost => "worker_lost",
            Self::HeartbeatMissed => "heartbeat_missed",
            Self::Download => "download",
            Self::Load => "load",
            Self::Inference => "inference",
            Self::Other => "other",
        }
    }

    /// Classifies a free-text reason by the words the coordinator and
    /// workers use in them.
    pub fn of(reason: &str) -> Self {
        let r = reason.to_ascii_lowercase();
        let has = |w: &[&str]| w.iter().any(|w| r.contains(w));
        if has(&["missed its heartbeats"]) {
            Self::HeartbeatMissed
        } else if has(&["cancelled"]) {
            Self::Cancelled
        } else if has(&[
            "closed its stream",
            "stream failed",
            "could not be reached",
            "replaced by a new connection",
            "went away",
        ]) {
            Self::WorkerLost
        } else if has(&["download", "checksum", "sha256", "fetch", "http"]) {
            Self::Download
        } else if has(&["load", "onnx", "session"]) {
            Self::Load
        } else if has(&["generate", "inference", "unet", "vae", "out of memory"]) {
            Self::Inference
        } else {
            Self::Other
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(6)
    }
}

/// Counters by failure class.
#[derive(Debug, Default)]
pub struct ByClass([Counter; 7]);

impl ByClass {
    pub fn inc(&self, c: FailureClass) {
        self.0[c.index()].inc();
    }
    pub fn get(&self, c: FailureClass) -> u64 {
        self.0[c.index()].get()
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
    fn render(&self, out: &mut String, name: &str) {
        for c in FailureClass::ALL {
            sample(out, name, &format!("class=\"{}\"", c.as_str()), self.get(c));
        }
    }
}

/// Counters by cache tier.
#[derive(Debug, Default)]
pub struct ByTier([Counter; 4]);

impl ByTier {
    pub fn inc(&self, t: CacheTier) {
        self.0[tier_index(t)].inc();
    }
    pub fn get(&self, t: CacheTier) -> u64 {
        self.0[tier_index(t)].get()
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
    fn render(&self, out: &mut String, name: &str) {
        for t in TIERS {
            sample(out, name, &format!("tier=\"{}\"", t.as_str()), self.get(t));
        }
    }
}

/// The four phases of a job's time, as workers measure them.
#[derive(Debug)]
pub struct PhaseHistograms {
    pub queue: Histogram,
    pub download: Histogram,
    pub load: Histogram,
    pub inference: Histogram,
}

impl PhaseHistograms {
    fn new() -> Self {
        Self {
            queue: Histogram::new(PHASE_BUCKETS_S),
            download: Histogram::new(PHASE_BUCKETS_S),
            load: Histogram::new(PHASE_BUCKETS_S),
            inference: Histogram::new(PHASE_BUCKETS_S),
        }
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

    fn render(&self, out: &mut String, prefix: &str, who: &str) {
        for (phase, h, what) in [
            (
                "queue",
                &self.queue,
                "Seconds a job waited before a worker took it",
            ),
            (
                "download",
                &self.download,
                "Seconds spent downloading the model (jobs that downloaded)",
            ),
            (
                "load",
                &self.load,
                "Seconds spent loading the model (jobs that loaded one)",
            ),
            ("inference", &self.inference, "Seconds spent generating"),
        ] {
            let name = format!("{prefix}_job_{phase}_seconds");
            header(out, &name, "histogram", &format!("{what}, {who}."));
            h.render(out, &name, "");
        }
    }
}

// ---- coordinator -------------------------------------------------------------

/// The coordinator's counters. Calls are one line at the place the event
/// happens (`Coordinator::apply`, `submit`, `cancel`, `worker_message`).
#[derive(Debug)]
pub struct CoordMetrics {
    pub jobs_submitted: Counter,
    pub jobs_rejected: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: ByClass,
    pub jobs_cancelled: Counter,
    pub assignments: ByTier,
    pub requeues: Counter,
    pub attempt_failures: ByClass,
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

static COORD: LazyLock<CoordMetrics> = LazyLock::new(|| CoordMetrics {
    jobs_submitted: Counter::default(),
    jobs_rejected: Counter::default(),
    jobs_completed: Counter::default(),
    jobs_failed: ByClass::default(),
    jobs_cancelled: Counter::default(),
    assignments: ByTier::default(),
    requeues: Counter::default(),
    attempt_failures: ByClass::default(),
    workers_connected: Counter::default(),
    workers_disconnected: Counter::default(),
    workers_expired: Counter::default(),
    store_failures: Counter::default(),
    download_bytes: Counter::default(),
    messages_received: Counter::default(),
    messages_sent: Counter::default(),
    assign_latency: Histogram::new(ASSIGN_BUCKETS_S),
    phases: PhaseHistograms::new(),
    accepted_at: DashMap::new(),
});

/// The coordinator's metrics in this process.
pub fn coord() -> &'static CoordMetrics {
    &COORD
}

impl CoordMetrics {
    /// A job entered the scheduler.
    pub fn job_accepted(&self, job: &JobId) {
        self.jobs_submitted.inc();
        self.accepted_at.insert(job.clone(), Instant::now());
    }

    /// The scheduler refused a job `job_accepted` counted.
    pub fn job_rejected(&self, job: &JobId) {
        self.jobs_rejected.inc();
        self.accepted_at.remove(job);
    }

    /// An Assign effect was carried out. The first assignment of a job
    /// records its accept-to-assign latency.
    pub fn job_assigned(&self, job: &JobId, tier: CacheTier) {
        self.assignments.inc(tier);
        if let Some((_, at)) = self.accepted_at.remove(job) {
            self.assign_latency.observe(at.elapsed().as_secs_f64());
        }
    }

    pub fn job_completed(&self, t: &Timings, model_bytes: u64) {
        self.jobs_completed.inc();
        self.phases.observe(t);
        if t.tier == Some(CacheTier::Download) {
            self.download_bytes.add(model_bytes);
        }
    }

    pub fn job_failed(&self, job: &JobId, reason: &str) {
        self.jobs_failed.inc(FailureClass::of(reason));
        self.accepted_at.remove(job);
    }

    pub fn job_cancelled(&self, job: &JobId) {
        self.jobs_cancelled.inc();
        self.accepted_at.remove(job);
    }

    /// A worker reported an attempt failed.
    pub fn attempt_failed(&self, reason: &str) {
        self.attempt_failures.inc(FailureClass::of(reason));
    }

    /// Renders the counters; `gauges` (state read from the coordinator) is
    /// appended by the caller.
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &Counter); 12] = [
            (
                "corral_jobs_submitted_total",
                "Jobs accepted into the queue.",
                &self.jobs_submitted,
            ),
            (
                "corral_jobs_rejected_total",
                "Jobs refused by the scheduler (queue full).",
                &self.jobs_rejected,
            ),
            (
                "corral_jobs_completed_total",
                "Jobs completed.",
                &self.jobs_completed,
            ),
            (
                "corral_jobs_cancelled_total",
                "Jobs cancelled by clients.",
                &self.jobs_cancelled,
            ),
            (
                "corral_requeues_total",
                "Attempts lost or failed retryably whose job was queued again.",
                &self.requeues,
            ),
            (
                "corral_workers_connected_total",
                "Worker streams that said Hello.",
                &self.workers_connected,
            ),
            (
                "corral_workers_disconnected_total",
                "Worker streams that ended (closed, failed or GoingAway).",
                &self.workers_disconnected,
            ),
            (
                "corral_workers_expired_total",
                "Workers dropped for missing their heartbeats.",
                &self.workers_expired,
            ),
            (
                "corral_store_failures_total",
                "Store commits that failed; each made the coordinator reopen its store and reload.",
                &self.store_failures,
            ),
            (
                "corral_download_bytes_total",
                "Model bytes downloaded by workers for jobs (from results at tier download).",
                &self.download_bytes,
            ),
            (
                "corral_worker_messages_received_total",
                "Messages received on worker streams.",
                &self.messages_received,
            ),
            (
                "corral_worker_messages_sent_total",
                "Messages sent on worker streams.",
                &self.messages_sent,
            ),
        ];
        for (name, help, c) in counters {
            header(out, name, "counter", help);
            sample(out, name, "", c.get());
        }
        header(
            out,
            "corral_jobs_failed_total",
            "counter",
            "Jobs that ended failed, by reason class.",
        );
        self.jobs_failed.render(out, "corral_jobs_failed_total");
        header(
            out,
            "corral_attempt_failures_total",
            "counter",
            "Attempts workers reported failed, by reason class.",
        );
        self.attempt_failures
            .render(out, "corral_attempt_failures_total");
        header(
            out,
            "corral_assignments_total",
            "counter",
            "Assignments by the cache tier the worker held the model at.",
        );
        self.assignments.render(out, "corral_assignments_total");
        header(
            out,
            "corral_assign_latency_seconds",
            "histogram",
            "Seconds from accepting a job to its first assignment, on the coordinator.",
        );
        self.assign_latency
            .render(out, "corral_assign_latency_seconds", "");
        self.phases.render(out, "corral", "from results");
    }
}

// ---- worker ------------------------------------------------------------------

/// What a worker's disk cache counts, for `/metrics`. The cache's own
/// `stats()` fills it (see `worker::http::worker_cache_stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStatsView {
    pub bytes_downloaded: u64,
    /// Hits by tier: preloaded, disk; misses are downloads.
    pub hits_preloaded: u64,
    pub hits_disk: u64,
    pub downloads: u64,
    pub evictions: u64,
    pub checksum_failures: u64,
}

impl CacheStatsView {
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &str, u64); 6] = [
            (
                "corral_worker_cache_download_bytes_total",
                "",
                "Bytes downloaded into the disk cache.",
                self.bytes_downloaded,
            ),
            (
                "corral_worker_cache_lookups_total",
                "result=\"preloaded\"",
                "Cache lookups by where the model was found.",
                self.hits_preloaded,
            ),
            (
                "corral_worker_cache_lookups_total",
                "result=\"disk\"",
                "",
                self.hits_disk,
            ),
            (
                "corral_worker_cache_lookups_total",
                "result=\"download\"",
                "",
                self.downloads,
            ),
            (
                "corral_worker_cache_evictions_total",
                "",
                "Models evicted from the disk cache.",
                self.evictions,
            ),
            (
                "corral_worker_cache_checksum_failures_total",
                "",
                "Downloaded files whose sha256 did not match.",
                self.checksum_failures,
            ),
        ];
        for (name, labels, help, v) in rows {
            if !help.is_empty() {
                header(out, name, "counter", help);
            }
            sample(out, name, labels, v);
        }
    }
}

/// A worker's counters, kept by its session.
#[derive(Debug)]
pub struct WorkerMetrics {
    pub jobs_run: ByTier,
    pub jobs_failed: ByClass,
    pub phases: PhaseHistograms,
}

static WORKER: LazyLock<WorkerMetrics> = LazyLock::new(|| WorkerMetrics {
    jobs_run: ByTier::default(),
    jobs_failed: ByClass::default(),
    phases: PhaseHistograms::new(),
});

/// The worker metrics of this process (summed over its workers).
pub fn worker() -> &'static WorkerMetrics {
    &WORKER
}

impl WorkerMetrics {
    pub fn job_done(&self, t: &Timings) {
        if let Some(tier) = t.tier {
            self.jobs_run.inc(tier);
        }
        self.phases.observe(t);
    }

    pub fn job_failed(&self, cancelled: bool, reason: &str) {
        let class = if cancelled {
            FailureClass::Cancelled
        } else {
            FailureClass::of(reason)
        };
        self.jobs_failed.inc(class);
    }

    pub fn render(&self, out: &mut String) {
        header(
            out,
            "corral_worker_jobs_total",
            "counter",
            "Jobs this worker completed, by the tier it found the model at.",
        );
        self.jobs_run.render(out, "corral_worker_jobs_total");
        header(
            out,
            "corral_worker_job_failures_total",
            "counter",
            "Jobs this worker failed, by reason class.",
        );
        self.jobs_failed
            .render(out, "corral_worker_job_failures_total");
        self.phases
            .render(out, "corral_worker", "measured on this worker");
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
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "");
        assert!(out.contains("x_seconds_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_count 5\n"), "{out}");
        assert_eq!(Histogram::new(&[1.0]).quantile(0.5), None);
    }

    #[test]
    fn reasons_fall_into_classes() {
        assert_eq!(
            FailureClass::of("worker w1 missed its heartbeats"),
            FailureClass::HeartbeatMissed
        );
        assert_eq!(
            FailureClass::of("worker w1 closed its stream"),
            FailureClass::WorkerLost
        );
        assert_eq!(FailureClass::of("cancelled"), FailureClass::Cancelled);
        assert_eq!(
            FailureClass::of("sha256 mismatch for unet/model.onnx"),
            FailureClass::Download
        );
        assert_eq!(FailureClass::of("something odd"), FailureClass::Other);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
