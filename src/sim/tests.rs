use super::*;

fn small(name: &str) -> SimParams {
    let mut p = SimParams::scenario(name).unwrap();
    p.models = 60;
    p.nodes = 12;
    p.rate = 0.6;
    p.length_h = 0.5;
    p.warmup_min = 5.0;
    p.drain_min = 5.0;
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
