//! The HTTP port end to end: a coordinator and a synthetic-engine worker in
//! this process, a job through them, then `/metrics`, `/api/cluster` and
//! `/` scraped over HTTP.

mod common;

use common::*;
use corral::pb;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A coordinator with its HTTP port on a listener bound here.
async fn coordinator_with_http() -> (String, String, oneshot::Sender<()>, tempfile::TempDir) {
    let data = tmp();
    let mut cfg = fast_config();
    cfg.data_dir = data.path().to_path_buf();
    cfg.auth = Some(corral::config::AuthConfig::disabled());
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", grpc.local_addr().unwrap());
    let http_url = format!("http://{}", http.local_addr().unwrap());
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(corral::coordinator::run_with_http(
        grpc,
        Some(http),
        cfg,
        async move {
            let _ = rx.await;
        },
    ));
    (url, http_url, stop, data)
}

async fn fetch(url: &str) -> (u16, String, String) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ctype, r.text().await.unwrap())
}

/// The value of the sample `series` (name with labels, as printed).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// Assignments at every tier.
fn assignments(text: &str) -> f64 {
    ["vram", "preloaded", "disk", "download"]
        .iter()
        .map(|t| value(text, &format!("corral_assignments_total{{tier=\"{t}\"}}")))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_after_a_job() {
    let (url, http, stop, _data) = coordinator_with_http().await;
    let (code, ctype, before) = fetch(&format!("{http}/metrics")).await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let submitted0 = value(&before, "corral_jobs_submitted_total");
    let completed0 = value(&before, "corral_jobs_completed_total");
    let assigned0 = assignments(&before);
    let connected0 = value(&before, "corral_workers_connected_total");

    let models = tmp();
    let m = make_model(models.path(), "sd-metrics");
    register(&url, &m).await;
    let bundle_bytes = m.total_bytes() as f64;
    let cache = tmp();
    let mut wcfg = worker_config(&url, cache.path());
    let worker_http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_http_url = format!("http://{}", worker_http.local_addr().unwrap());
    wcfg.http_listen = None;
    let engine = corral::worker::engine::from_config(&wcfg).unwrap();
    let (w, outbox) = corral::worker::Worker::new(wcfg, "w-metrics".into(), engine)
        .await
        .unwrap();
    let _whttp = corral::worker::http::serve(worker_http, &w).unwrap();
    let (wstop, wrx) = oneshot::channel::<()>();
    let wtask = tokio::spawn(corral::worker::run(w, outbox, async move {
        let _ = wrx.await;
    }));
    wait_workers(&url, 1).await;

    let job = submit(&url, spec("sd-metrics", 3)).await;
    wait_state(&url, &job.id, pb::JobState::Completed, 20).await;

    let (_, _, after) = fetch(&format!("{http}/metrics")).await;
    // One registry per coordinator: exact counts.
    assert_eq!(
        value(&after, "corral_jobs_submitted_total"),
        submitted0 + 1.0
    );
    assert_eq!(
        value(&after, "corral_jobs_completed_total"),
        completed0 + 1.0
    );
    assert!(assignments(&after) >= assigned0 + 1.0);
    assert!(value(&after, "corral_download_bytes_total") >= bundle_bytes);
    assert!(value(&after, "corral_workers_connected_total") >= connected0 + 1.0);
    assert_eq!(value(&after, "corral_workers"), 1.0);
    assert_eq!(
        value(&after, "corral_queue_depth{model=\"sd-metrics\"}"),
        0.0
    );
    assert!(value(&after, "corral_assign_latency_seconds_count") >= 1.0);
    assert!(value(&after, "corral_job_inference_seconds_count") >= 1.0);
    assert!(value(&after, "corral_job_inference_seconds_sum") > 0.0);
    assert!(value(&after, "corral_worker_messages_received_total") >= 2.0);
    assert!(after.contains("# TYPE corral_assign_latency_seconds histogram"));
    assert!(after.contains("# TYPE corral_jobs_failed_total counter"));

    let (code, ctype, cluster) = fetch(&format!("{http}/api/cluster")).await;
    assert_eq!(code, 200);
    assert_eq!(ctype, "application/json");
    let v: serde_json::Value = serde_json::from_str(&cluster).unwrap();
    assert_eq!(v["workers_total"], 1);
    assert_eq!(v["workers"][0]["id"], "w-metrics");
    assert!(v["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "sd-metrics"));
    assert!(v["totals"]["completed"].as_u64().unwrap() >= 1);
    assert!(v["samples"].as_array().unwrap().last().unwrap()["partial"] == true);

    let (code, ctype, page) = fetch(&format!("{http}/")).await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(page.contains("/api/cluster"));

    // The worker's own port counts the job it ran (one registry per worker).
    let (code, _, wtext) = fetch(&format!("{worker_http_url}/metrics")).await;
    assert_eq!(code, 200);
    // The worker fetched the bundle from its file:// source: a download.
    assert_eq!(
        value(&wtext, "corral_worker_jobs_total{tier=\"download\"}"),
        1.0
    );
    assert!(value(&wtext, "corral_worker_cache_download_bytes_total") >= bundle_bytes);
    assert!(
        value(
            &wtext,
            "corral_worker_cache_lookups_total{result=\"download\"}"
        ) >= 1.0
    );
    assert!(value(&wtext, "corral_worker_job_inference_seconds_count") >= 1.0);
    assert_eq!(value(&wtext, "corral_worker_jobs_running"), 0.0);

    let _ = wstop.send(());
    let _ = wtask.await;
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_is_counted() {
    let (url, http, stop, _data) = coordinator_with_http().await;
    let models = tmp();
    register(&url, &make_model(models.path(), "sd-idle")).await;
    let (_, _, before) = fetch(&format!("{http}/metrics")).await;
    let cancelled0 = value(&before, "corral_jobs_cancelled_total");
    // No worker: the job stays queued, then is cancelled.
    let job = submit(&url, spec("sd-idle", 1)).await;
    // Gauges come from the snapshot the ticker refreshes (at most a tick old).
    wait_for_gauge(&http, "corral_queue_depth{model=\"sd-idle\"}", 1.0).await;
    jobs(&url)
        .await
        .cancel_job(pb::CancelJobRequest { job_id: job.id })
        .await
        .unwrap();
    let (_, _, after) = fetch(&format!("{http}/metrics")).await;
    assert_eq!(
        value(&after, "corral_jobs_cancelled_total"),
        cancelled0 + 1.0
    );
    wait_for_gauge(&http, "corral_queue_depth{model=\"sd-idle\"}", 0.0).await;
    let _ = stop.send(());
}

/// Waits until `/metrics` shows `series` at `want`.
async fn wait_for_gauge(http: &str, series: &str, want: f64) {
    let (http, series) = (http.to_owned(), series.to_owned());
    wait_until(10, &format!("{series} to be {want}"), || {
        let (http, series) = (http.clone(), series.clone());
        async move {
            let (_, _, text) = fetch(&format!("{http}/metrics")).await;
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str())?.strip_prefix(' '))
                .and_then(|v| v.parse::<f64>().ok());
            v == Some(want)
        }
    })
    .await;
}
