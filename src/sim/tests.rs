use super::*;

fn small(name: &str) -> SimParams {
    let mut p = SimParams::scenario(name).unwrap();
    p.models = 60;
    p.nodes = 12;
    p.rate = 0.6;
    p.length_h = 0.5;
    p.warmup_min = 5.0;
    p.ramp_min = 0.0;
    p.warmup_jobs = 0.0;
    // Long enough for the last arrivals' downloads on the slowest nodes.
    p.drain_min = 15.0;
    p.goodput_grid = 0;
    if p.loras > 0 {
        p.loras = 50;
    }
    if let Some(s) = p.storm.as_mut() {
        s.at_min = 15.0;
    }
    if let Some(s) = p.shift.as_mut() {
        s.at_min = 15.0;
        s.cold_models = 5;
    }
    if let Some(s) = p.scale_in.as_mut() {
        s.at_min = 15.0;
        s.nodes = 4;
    }
    p
}

#[test]
fn every_policy_runs_a_short_scenario_with_invariants() {
    for sc in ["s1", "s3", "s4"] {
        let p = small(sc);
        for pol in PolicyKind::ALL {
            let r = run_once(&p, pol, 7, p.rate).unwrap_or_else(|e| panic!("{sc} {pol:?}: {e}"));
            assert!(r.arrived > 100, "{sc} {pol:?}: {}", r.arrived);
            assert!(r.done > 0, "{sc} {pol:?}");
        }
    }
}

#[test]
fn same_seed_same_results() {
    let p = small("s2");
    for pol in [PolicyKind::Corral, PolicyKind::B7] {
        let a = run_once(&p, pol, 3, p.rate).unwrap();
        let b = run_once(&p, pol, 3, p.rate).unwrap();
        assert_eq!(a.latencies_s, b.latencies_s);
        assert_eq!(a.bytes_downloaded, b.bytes_downloaded);
        assert_eq!(
            format!("{:?}", a.p95_by_minute),
            format!("{:?}", b.p95_by_minute)
        );
    }
}

#[test]
fn corral_serves_a_light_load_without_loss() {
    let mut p = small("s1");
    p.rate = 0.2;
    let r = run_once(&p, PolicyKind::Corral, 1, p.rate).unwrap();
    assert_eq!(r.lost, 0);
    assert!(percentile(&r.latencies_s, 0.5) < 30.0);
}

#[test]
fn table_json_and_csv_render() {
    let mut p = small("s1");
    p.goodput_grid = 2;
    p.bisect_steps = 1;
    p.bisect_lo = 0.5;
    p.bisect_hi = 2.0;
    let exp = experiment(&p, &[PolicyKind::Corral, PolicyKind::B1], 2, 2).unwrap();
    let t = report::render(&exp, Format::Table);
    assert!(t.contains("| corral |"), "{t}");
    let j: serde_json::Value = serde_json::from_str(&report::render(&exp, Format::Json)).unwrap();
    assert_eq!(j["policies"][0]["policy"], "corral");
    assert!(j["policies"][0].get("gb_per_job").is_some());
    let c = report::render(&exp, Format::Csv);
    assert_eq!(c.lines().count(), 3);
}

#[test]
fn config_file_overrides_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "nodes = 7\n[storm]\nat_min = 5.0\nshare = 0.5\nwithin_min = 1.0\n",
    )
    .unwrap();
    let p = SimParams::load("s1", Some(&good)).unwrap();
    assert_eq!(p.nodes, 7);
    assert_eq!(p.storm.unwrap().share, 0.5);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "nodez = 7\n").unwrap();
    assert!(SimParams::load("s1", Some(&bad)).is_err());
}

#[test]
fn plan_image_from_a_scenario_fits_the_budget() {
    let args = PlanImageArgs {
        budget_bytes: 20_000_000_000,
        demand: None,
        scenario: "s1".into(),
        config: None,
        seed: 1,
    };
    let out = plan_image_cli(&args).unwrap();
    assert!(out.contains("Image plan"), "{out}");
}

#[test]
fn a_surge_takes_its_share_of_arrivals_for_its_model_of_the_size_asked() {
    let mut p = small("s1");
    p.rate = 2.0;
    p.surges = vec![params::Surge {
        rank: 30,
        size_gb: p.sdxl_gb,
        share: 0.5,
        start_min: 10.0,
        duration_min: 10.0,
    }];
    let w = workload::World::generate(&p, 5, p.rate);
    let m = w.surge_models[0];
    assert!(
        w.files[m as usize].xl,
        "model {m} is not the SDXL size asked"
    );
    assert!(w.rank0[m as usize] >= 29, "rank {}", w.rank0[m as usize]);
    let during = |a: &workload::Arrival| (600_000..1_200_000).contains(&a.at_ms);
    let (n_in, hits_in) = w
        .arrivals
        .iter()
        .filter(|a| during(a))
        .fold((0, 0), |(n, h), a| (n + 1, h + u32::from(a.model == m)));
    let share = f64::from(hits_in) / f64::from(n_in);
    assert!((0.4..0.6).contains(&share), "share {share} of {n_in}");
    let outside = w
        .arrivals
        .iter()
        .filter(|a| !during(a) && a.model == m)
        .count() as f64
        / w.arrivals.len() as f64;
    assert!(outside < 0.05, "{outside}");
    // The run reports the model's latency per minute and its recovery.
    let r = run_once(&p, PolicyKind::Corral, 5, p.rate).unwrap();
    let s = &r.surges[0];
    assert_eq!(s.model, m);
    assert!(s
        .per_minute
        .iter()
        .any(|(min, n, ..)| *min == 12 && *n > 10));
    assert!(s.recovery_min >= 0.0);
    assert!(s.threshold_s > 2.0 * (p.load_base_s + 6.0));
}

#[test]
fn belady_never_downloads_more_than_lru_on_the_same_placements() {
    let p = small("s4");
    for pol in PolicyKind::ALL {
        let r = run_once(&p, pol, 2, p.rate).unwrap();
        assert!(
            r.replay_belady_bytes <= r.replay_lru_bytes,
            "{pol:?}: {} > {}",
            r.replay_belady_bytes,
            r.replay_lru_bytes
        );
        assert!(r.capacity_jobs_s > 0.0);
    }
}

#[test]
fn ablations_change_what_corral_does() {
    let p = small("s1");
    let full = run_once(&p, PolicyKind::Corral, 4, p.rate).unwrap();
    let norepl = run_once(&p, PolicyKind::CorralNoRepl, 4, p.rate).unwrap();
    // Without replication every download is for a job at a GPU: no bytes
    // beyond what the demand-only replay of its own placements fetches
    // plus what churn lost.
    assert_ne!(full.bytes_downloaded, norepl.bytes_downloaded);
    let early = run_once(&p, PolicyKind::CorralEarly, 4, p.rate).unwrap();
    assert_ne!(full.latencies_s, early.latencies_s);
    let nobw = run_once(&p, PolicyKind::CorralNoBw, 4, p.rate).unwrap();
    assert_ne!(full.latencies_s, nobw.latencies_s);
    // Early binding (jobs queued behind others at a node) may leave jobs
    // unfinished at the end of this short run; the others may not.
    for (name, r) in [("norepl", &norepl), ("nobw", &nobw)] {
        assert_eq!(
            r.lost, 0,
            "{name}: {} failed, {} arrived",
            r.failed, r.arrived
        );
    }
}

#[test]
fn sweep_sets_the_field_at_each_point() {
    let mut p = small("s1");
    p.goodput_grid = 2;
    p.bisect_steps = 0;
    p.bisect_lo = 0.3;
    p.bisect_hi = 0.6;
    p.length_h = 0.3;
    let sw = sweep(&p, "disk_gb", &[25.0, 100.0], &[PolicyKind::Corral], 1, 2).unwrap();
    assert_eq!(sw.points.len(), 2);
    assert_eq!(sw.points[1].1.params.disk_gb, 100.0);
    assert!(sw.points[0].1.outcomes[0].seeds[0].goodput.is_some());
    let t = report::render_sweep(&sw, Format::Table);
    assert!(t.contains("| 25 |") && t.contains("| 100 |"), "{t}");
    assert!(with_field(&p, "no_such_key", 1.0).is_err());
    assert!(with_field(&p, "name", 1.0).is_err());
    assert_eq!(with_field(&p, "models", 300.0).unwrap().models, 300);
}

#[test]
fn cold_start_reports_the_ramp() {
    let p = small("s1");
    let e = cold_start(&p, &[PolicyKind::Corral, PolicyKind::B7], 1, 2).unwrap();
    assert!(e.cold_start);
    assert_eq!(e.params.warmup_min, 0.0);
    let r = &e.outcomes[0].seeds[0].reference;
    assert_eq!(r.p95_by_minute.first().map(|m| m.0), Some(0));
    let t = report::render(&e, Format::Table);
    assert!(t.contains("cold start"), "{t}");
    let ramp = ramp_min(r, p.slo_p95_s);
    assert!(ramp.is_infinite() || ramp < 30.0);
}

#[test]
fn a_scale_in_removes_nodes_for_good_and_loses_no_job() {
    for sc in ["scale-in", "scale-in-random", "scale-in-abrupt"] {
        let mut p = small(sc);
        // Light enough that the 8 nodes left are not overloaded.
        p.rate = 0.25;
        for pol in [PolicyKind::Corral, PolicyKind::B7Late] {
            let r = run_once(&p, pol, 3, p.rate).unwrap_or_else(|e| panic!("{sc} {pol:?}: {e}"));
            // Removed nodes hand their jobs back at once.
            assert_eq!(r.scale_in_lost, 0, "{sc} {pol:?}");
            assert!(r.scale_in_p95_s.is_finite(), "{sc} {pol:?}");
            assert!(r.scale_in_pre_p95_s > 0.0, "{sc} {pol:?}");
        }
    }
    // The two rules remove different nodes: the runs differ after the
    // event, on the same trace.
    let by_cost = run_once(&small("scale-in"), PolicyKind::Corral, 3, 0.25).unwrap();
    let random = run_once(&small("scale-in-random"), PolicyKind::Corral, 3, 0.25).unwrap();
    assert_eq!(by_cost.arrived, random.arrived);
    assert_ne!(
        (by_cost.scale_in_gb, by_cost.latencies_s.clone()),
        (random.scale_in_gb, random.latencies_s.clone())
    );
}

#[test]
fn the_surge_response_starts_copies_the_ablation_does_not() {
    // A surge big enough to need copies (6 workers busy at its peak) on a
    // fleet that is not overloaded: 40 nodes, 3 jobs/s, half of them for
    // the surge model from minute 12 to 20.
    let mut p = small("surge-sd15");
    p.nodes = 40;
    p.models = 100;
    p.rate = 3.0;
    p.surges[0].rank = 30;
    p.surges[0].share = 0.5;
    p.surges[0].start_min = 12.0;
    p.surges[0].duration_min = 8.0;
    let on = run_once(&p, PolicyKind::Corral, 5, p.rate).unwrap();
    let off = run_once(&p, PolicyKind::CorralNoSurge, 5, p.rate).unwrap();
    assert_eq!(on.arrived, off.arrived, "same trace");
    assert_eq!((on.surges[0].lost, off.surges[0].lost), (0, 0));
    // On this trace the response halves the surge model's p95 (16.7 s
    // against 35.2 s when measured).
    assert!(
        on.surges[0].model_p95_s < off.surges[0].model_p95_s,
        "{} vs {}",
        on.surges[0].model_p95_s,
        off.surges[0].model_p95_s
    );
}
