//! What the operator sees: the coordinator's state gauges for `/metrics`,
//! the `/api/cluster` document behind the cluster page, and a ring buffer
//! of 10-second samples of throughput and latency.
//!
//! Everything here reads: the scheduler lock is taken once per call, state
//! is copied out, and the lock is released before anything is formatted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Coordinator;
use crate::metrics::{self, CoordMetrics, Histogram, Scrape};
use crate::types::{CacheTier, JobSpec, Timings};

/// Workers listed in `/api/cluster` at most (the page is a grid; a few
/// thousand rows help nobody). The counts are always complete.
pub const MAX_WORKERS_SHOWN: usize = 200;

/// One period's throughput and latency.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time at the end of the period, in milliseconds.
    pub at_ms: u64,
    pub period_s: f64,
    pub submitted_per_s: f64,
    pub completed_per_s: f64,
    pub failed_per_s: f64,
    /// Mean of queue + download + load + inference of jobs completed in the period.
    pub mean_job_s: Option<f64>,
    pub mean_inference_s: Option<f64>,
    pub assign_p50_ms: Option<f64>,
    pub assign_p99_ms: Option<f64>,
    pub queued: u64,
    pub workers: u64,
    /// True for the period still running (the last point on the page).
    pub partial: bool,
}

/// Cumulative values a sample is the difference of.
#[derive(Clone, Debug)]
struct Totals {
    at: std::time::Instant,
    submitted: u64,
    completed: u64,
    failed: u64,
    job_s: f64,
    inference_s: f64,
    assign: Vec<u64>,
}

impl Totals {
    fn now(m: &CoordMetrics) -> Self {
        let p = &m.phases;
        Self {
            at: std::time::Instant::now(),
            submitted: m.jobs_submitted.get(),
            completed: m.jobs_completed.get(),
            failed: m.jobs_failed_total(),
            job_s: p.queue.sum_s() + p.download.sum_s() + p.load.sum_s() + p.inference.sum_s(),
            inference_s: p.inference.sum_s(),
            assign: m.assign_latency.snapshot(),
        }
    }
}

/// The ring buffer of samples (the last hour at 10-s periods).
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
    last: Mutex<Totals>,
    capacity: usize,
}

pub const SAMPLE_PERIOD_S: u64 = 10;

impl History {
    pub fn new(capacity: usize, m: &CoordMetrics) -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            last: Mutex::new(Totals::now(m)),
            capacity,
        }
    }

    fn diff(from: &Totals, to: &Totals, queued: u64, workers: u64, partial: bool) -> Sample {
        let secs = to.at.duration_since(from.at).as_secs_f64().max(1e-3);
        let done = to.completed.saturating_sub(from.completed);
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let mean = |a: f64, b: f64| (done > 0).then(|| (b - a).max(0.0) / done as f64);
        let assign: Vec<u64> = to
            .assign
            .iter()
            .zip(&from.assign)
            .map(|(b, a)| b.saturating_sub(*a))
            .collect();
        let bounds = metrics::ASSIGN_BUCKETS_S;
        let q = |q| Histogram::quantile_of(bounds, &assign, q).map(|s| s * 1000.0);
        Sample {
            at_ms: unix_ms(),
            period_s: secs,
            submitted_per_s: per(from.submitted, to.submitted),
            completed_per_s: per(from.completed, to.completed),
            failed_per_s: per(from.failed, to.failed),
            mean_job_s: mean(from.job_s, to.job_s),
            mean_inference_s: mean(from.inference_s, to.inference_s),
            assign_p50_ms: q(0.5),
            assign_p99_ms: q(0.99),
            queued,
            workers,
            partial,
        }
    }

    /// Closes the current period (called every [`SAMPLE_PERIOD_S`]).
    pub fn record(&self, m: &CoordMetrics, queued: u64, workers: u64) {
        let now = Totals::now(m);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let s = Self::diff(&last, &now, queued, workers, false);
        *last = now;
        drop(last);
        let mut v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() == self.capacity {
            v.pop_front();
        }
        v.push_back(s);
    }

    /// The closed samples, then the period still running.
    pub fn samples(&self, m: &CoordMetrics, queued: u64, workers: u64) -> Vec<Sample> {
        let mut out: Vec<Sample> = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        out.push(Self::diff(&last, &Totals::now(m), queued, workers, true));
        out
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Serialize)]
pub struct WorkerView {
    pub id: String,
    pub gpu: String,
    pub slots: u32,
    pub running: usize,
    pub draining: bool,
    pub last_seen_s_ago: f64,
    pub vram: Vec<String>,
    pub disk: Vec<String>,
    pub preloaded: Vec<String>,
    /// (model, bytes done, bytes total)
    pub downloading: Vec<(String, u64, u64)>,
}

#[derive(Serialize)]
pub struct ModelView {
    pub id: String,
    pub queued: u32,
    pub running: u32,
    pub workers_vram: u32,
    pub workers_disk: u32,
    pub workers_downloading: u32,
}

#[derive(Serialize)]
pub struct ClusterView {
    pub at_ms: u64,
    pub workers_total: usize,
    pub workers: Vec<WorkerView>,
    pub models: Vec<ModelView>,
    pub totals: serde_json::Value,
    pub samples: Vec<Sample>,
}

impl Coordinator {
    /// Queued jobs and connected workers, for a sample.
    pub(super) fn load_now(&self) -> (u64, u64) {
        let snap = self.snapshot();
        (snap.queued as u64, snap.workers.len() as u64)
    }

    /// A result arrived: its timings, and the model's bytes if it was downloaded.
    pub(super) fn observe_completed(&self, spec: &JobSpec, t: &Timings) {
        let bytes = if t.tier == Some(CacheTier::Download) {
            self.models
                .get(&spec.model_id)
                .map_or(0, |m| m.total_bytes())
        } else {
            0
        };
        self.metrics.job_completed(t, bytes);
    }

    /// The document behind the cluster page (from the snapshot).
    pub fn cluster_view(&self, history: &History) -> ClusterView {
        let snap = self.snapshot();
        let now = snap.at_ms;
        let workers: Vec<WorkerView> = snap
            .workers
            .iter()
            .take(MAX_WORKERS_SHOWN)
            .map(|w| {
                let r = &w.report;
                WorkerView {
                    id: w.worker_id.0.clone(),
                    gpu: w.gpu_name.clone(),
                    slots: w.max_concurrent_jobs,
                    running: w.running.len(),
                    draining: w.draining,
                    last_seen_s_ago: now.saturating_sub(w.last_seen_ms) as f64 / 1000.0,
                    vram: r.vram_models.iter().map(|m| m.0.clone()).collect(),
                    disk: r
                        .disk_models
                        .iter()
                        .filter(|d| !d.preloaded)
                        .map(|d| d.model_id.0.clone())
                        .collect(),
                    preloaded: r
                        .disk_models
                        .iter()
                        .filter(|d| d.preloaded)
                        .map(|d| d.model_id.0.clone())
                        .collect(),
                    downloading: r
                        .downloads
                        .iter()
                        .map(|d| (d.model_id.0.clone(), d.bytes_done, d.bytes_total))
                        .collect(),
                }
            })
            .collect();
        let models: Vec<ModelView> = snap
            .models
            .iter()
            .map(|m| ModelView {
                id: m.status.model.0.clone(),
                queued: m.status.queued,
                running: m.status.running,
                workers_vram: m.status.workers_vram,
                workers_disk: m.status.workers_disk,
                workers_downloading: m.status.workers_downloading,
            })
            .collect();
        let m = &self.metrics;
        let totals = serde_json::json!({
            "submitted": m.jobs_submitted.get(),
            "completed": m.jobs_completed.get(),
            "failed": m.jobs_failed_total(),
            "cancelled": m.jobs_cancelled.get(),
            "requeues": m.requeues.get(),
            "workers_expired": m.workers_expired.get(),
            "queued": snap.queued,
        });
        ClusterView {
            at_ms: unix_ms(),
            workers_total: snap.workers.len(),
            workers,
            models,
            totals,
            samples: history.samples(m, snap.queued as u64, snap.workers.len() as u64),
        }
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ModelTierLabel {
    model: String,
    tier: &'static str,
}

/// The coordinator's gauges, read from its snapshot when scraped.
#[derive(Debug)]
pub(super) struct Gauges(pub(super) std::sync::Weak<Coordinator>);

impl prometheus_client::collector::Collector for Gauges {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let Some(c) = self.0.upgrade() else {
            return Ok(());
        };
        let snap = c.snapshot();
        let (mut draining, mut slots, mut busy) = (0u64, 0u64, 0u64);
        for w in &snap.workers {
            draining += u64::from(w.draining);
            slots += u64::from(w.max_concurrent_jobs);
            busy += w.running.len() as u64;
        }
        let mut g = Scrape::new(&mut encoder);
        g.gauge(
            "corral_workers",
            "Workers connected now.",
            snap.workers.len() as f64,
        )?;
        g.gauge(
            "corral_workers_draining",
            "Connected workers taking no new jobs.",
            draining as f64,
        )?;
        g.gauge(
            "corral_worker_slots",
            "Job slots of connected workers.",
            slots as f64,
        )?;
        g.gauge(
            "corral_worker_slots_busy",
            "Job slots running an attempt.",
            busy as f64,
        )?;
        g.gauge(
            "corral_jobs_unfinished",
            "Jobs queued or running.",
            snap.unfinished as f64,
        )?;
        g.gauge(
            "corral_worker_streams",
            "Open worker streams.",
            c.links.len() as f64,
        )?;
        g.gauge(
            "corral_store_up",
            "1 while the store takes writes; 0 while it is failing and being reopened.",
            f64::from(u8::from(c.store.failed().is_none())),
        )?;
        let model = |m: &super::ModelSummary| ModelLabel {
            model: m.status.model.0.clone(),
        };
        g.gauges(
            "corral_queue_depth",
            "Jobs queued, by model.",
            snap.models
                .iter()
                .map(|m| (model(m), f64::from(m.status.queued))),
        )?;
        g.gauges(
            "corral_jobs_running",
            "Jobs running, by model.",
            snap.models
                .iter()
                .map(|m| (model(m), f64::from(m.status.running))),
        )?;
        g.gauges(
            "corral_model_workers",
            "Workers holding the model, by model and tier (vram, disk, downloading).",
            snap.models.iter().flat_map(|m| {
                [
                    ("vram", m.status.workers_vram),
                    ("disk", m.status.workers_disk),
                    ("downloading", m.status.workers_downloading),
                ]
                .map(|(tier, v)| {
                    (
                        ModelTierLabel {
                            model: m.status.model.0.clone(),
                            tier,
                        },
                        f64::from(v),
                    )
                })
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_keeps_the_last_samples_and_a_partial_one() {
        let m = CoordMetrics::new(None);
        let h = History::new(3, &m);
        for _ in 0..5 {
            h.record(&m, 1, 2);
        }
        let s = h.samples(&m, 1, 2);
        assert_eq!(s.len(), 4);
        assert!(s[..3].iter().all(|x| !x.partial));
        assert!(s[3].partial);
        assert_eq!(s[3].queued, 1);
        assert_eq!(s[3].workers, 2);
    }
}
