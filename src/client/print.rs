//! How answers from the coordinator are printed for people.

use super::{state_word, tier_word};
use crate::pb;

pub fn job(j: &pb::Job) {
    let model = j.spec.as_ref().map_or("", |s| s.model_id.as_str());
    let mut line = format!(
        "{} {} model={model} attempt={}",
        j.id,
        state_word(j.state),
        j.attempt
    );
    if !j.worker_id.is_empty() {
        line += &format!(" worker={} tier={}", j.worker_id, tier_word(j.tier));
    }
    if !j.error.is_empty() {
        line += &format!(" error={:?}", j.error);
    }
    println!("{line}");
}

/// One line per worker: what it holds in VRAM, on disk (* = preloaded), downloading.
pub fn workers(r: &pb::ListWorkersResponse) {
    for w in &r.workers {
        let s = w.state.clone().unwrap_or_default();
        println!(
            "{} gpu={} slots={} running={} vram=[{}] disk=[{}] downloading=[{}] free_disk={} seen={:.1}s ago{}",
            w.worker_id,
            w.gpu_name,
            w.max_concurrent_jobs,
            s.running_jobs.len(),
            s.vram_models.join(","),
            s.disk_models
                .iter()
                .map(|d| if d.preloaded { format!("{}*", d.model_id) } else { d.model_id.clone() })
                .collect::<Vec<_>>()
                .join(","),
            s.downloads
                .iter()
                .map(|d| format!("{}:{}/{}", d.model_id, d.bytes_done, d.bytes_total))
                .collect::<Vec<_>>()
                .join(","),
            s.free_disk_bytes,
            w.last_seen_s_ago,
            if w.draining { " draining" } else { "" }
        );
    }
}

/// The fleet's totals, then one line per model.
pub fn status(r: &pb::ClusterStatusResponse) {
    println!(
        "workers={} queued={} running={}",
        r.workers, r.queued_jobs, r.running_jobs
    );
    println!(
        "{:<24} {:>7} {:>7} {:>5} {:>5} {:>5} {:>9} {:>7}",
        "model", "queued", "running", "vram", "disk", "dl", "demand/s", "target"
    );
    for m in &r.models {
        println!(
            "{:<24} {:>7} {:>7} {:>5} {:>5} {:>5} {:>9.3} {:>7}",
            m.model_id,
            m.queued_jobs,
            m.running_jobs,
            m.workers_vram,
            m.workers_disk,
            m.workers_downloading,
            m.demand_per_s,
            m.replica_target
        );
    }
}
