//! `corral bench` as a library: a small inline run completes every job and
//! reports figures consistent with what it did (no timing is asserted).

use corral::bench::{self, BenchArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_load_run_completes_every_job() {
    let r = bench::run(BenchArgs {
        workers: 3,
        jobs: 60,
        clients: 2,
        inline: true,
        ..BenchArgs::default()
    })
    .await
    .unwrap();
    assert_eq!(r.mode, "load");
    assert_eq!(r.jobs_completed, 60);
    assert!(r.jobs_per_s > 0.0);
    // Every job was assigned once: the histogram has quantiles.
    let (p50, p99) = (r.assign_p50_ms.unwrap(), r.assign_p99_ms.unwrap());
    assert!(p50 <= p99, "p50 {p50} > p99 {p99}");
    // Assign, progress and result per job at least.
    assert!(r.messages_per_s * r.elapsed_s >= 3.0 * 60.0);
    assert!(r.peak_rss_mib > 0.0);
    assert!(r.fleet_cpu_cores.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mode_connects_workers_and_submits_nothing() {
    let r = bench::run(BenchArgs {
        workers: 4,
        idle: true,
        idle_s: 0.5,
        heartbeat_interval_s: 0.1,
        inline: true,
        ..BenchArgs::default()
    })
    .await
    .unwrap();
    assert_eq!(r.mode, "idle");
    assert_eq!(r.jobs_completed, 0);
    // Four workers heartbeating every 100 ms for half a second.
    assert!(r.messages_per_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ceiling_runs_the_same_load() {
    let r = bench::run_target(
        BenchArgs {
            workers: 3,
            jobs: 60,
            clients: 2,
            inline: true,
            ..BenchArgs::default()
        },
        bench::Target::Ceiling,
    )
    .await
    .unwrap();
    assert_eq!((r.target, r.jobs_completed), ("ceiling", 60));
    // No scheduler: no assign latency is measured.
    assert!(r.assign_p50_ms.is_none());
    assert!(r.messages_per_s * r.elapsed_s >= 3.0 * 60.0);
}
