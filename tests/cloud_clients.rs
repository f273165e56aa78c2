//! The IMDS and SaladCloud API clients and the worker's IMDS agent, against
//! the local stand-ins in cloud_mock (status codes, headers, problem
//! details, retries, the rate limit on deletion-cost updates).

mod cloud_mock;

use std::time::Duration;

use corral::cloud::agent::Agent;
use corral::cloud::api::{InstanceState, SaladApi};
use corral::cloud::imds::{Imds, Status};
use corral::cloud::WorkerCloudConfig;

fn imds(url: &str) -> Imds {
    Imds::new(url, Duration::from_secs(2)).unwrap()
}

#[tokio::test]
async fn every_imds_endpoint_round_trips_with_the_metadata_header() {
    let m = cloud_mock::Imds::start().await;
    let c = imds(&m.url);
    assert_eq!(
        c.status().await.unwrap(),
        Status {
            ready: true,
            started: true
        }
    );
    assert!(c.token().await.unwrap().expose().starts_with("eyJ"));
    c.set_deletion_cost(1234).await.unwrap();
    assert_eq!(c.deletion_cost().await.unwrap(), 1234);
    c.reallocate("insufficient download bandwidth")
        .await
        .unwrap();
    c.recreate().await.unwrap();
    c.restart().await.unwrap();
    let calls = m.calls();
    assert_eq!(calls.len(), 7);
    for call in &calls {
        assert!(
            call.status < 300,
            "{} {} -> {}",
            call.method,
            call.path,
            call.status
        );
        assert_eq!(call.headers.get("metadata").unwrap(), "true");
        assert!(!call
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("x-forwarded")));
    }
    let put = &m.accepted("PUT", "/v1/deletion-cost")[0];
    assert_eq!(put.headers.get("content-type").unwrap(), "application/json");
    assert_eq!(put.body, r#"{"deletion_cost":1234}"#);
    let realloc = &m.accepted("POST", "/v1/reallocate")[0];
    assert_eq!(
        realloc.body,
        r#"{"reason":"insufficient download bandwidth"}"#
    );
}

#[tokio::test]
async fn imds_refuses_requests_without_the_header_or_forwarded() {
    // What the stand-in enforces is what the documentation says; the client
    // never trips it (above).
    let m = cloud_mock::Imds::start().await;
    let http = reqwest::Client::new();
    let bare = http
        .get(format!("{}/v1/status", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 403);
    assert_eq!(
        bare.headers().get("content-type").unwrap(),
        "application/problem+json"
    );
    let body: serde_json::Value = serde_json::from_slice(&bare.bytes().await.unwrap()).unwrap();
    assert_eq!(body["status"], 403);
    let forwarded = http
        .get(format!("{}/v1/status", m.url))
        .header("Metadata", "true")
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), 403);
}

#[tokio::test]
async fn imds_errors_name_the_endpoint_and_the_problem() {
    let m = cloud_mock::Imds::start().await;
    let c = imds(&m.url);
    m.fail_next(&[404]);
    let e = c.reallocate("x").await.unwrap_err().to_string();
    assert!(e.contains("IMDS POST /v1/reallocate"), "{e}");
    assert!(
        e.contains("HTTP 404") && e.contains("injected failure"),
        "{e}"
    );
    // A server fault is retried, then succeeds.
    m.fail_next(&[503, 500]);
    c.set_deletion_cost(7).await.unwrap();
    assert_eq!(m.deletion_cost(), 7);
    let puts: Vec<u16> = m
        .calls()
        .iter()
        .filter(|c| c.path == "/v1/deletion-cost")
        .map(|c| c.status)
        .collect();
    assert_eq!(puts, vec![503, 500, 204]);
    // Three faults in a row end the call, naming it.
    m.fail_next(&[503, 503, 503]);
    let e = c.status().await.unwrap_err();
    assert!(e.is_retryable());
    assert!(e.to_string().contains("IMDS GET /v1/status"), "{e}");
}

#[tokio::test]
async fn an_unreachable_imds_fails_within_its_bounds() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let c = imds(&url);
    let e = tokio::time::timeout(Duration::from_secs(20), c.status())
        .await
        .expect("bounded")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("IMDS GET /v1/status") && e.contains("could not connect"),
        "{e}"
    );
}

#[tokio::test]
async fn the_api_client_reads_instances_and_sets_replicas() {
    let m = cloud_mock::Api::start().await;
    m.set_instance("machine-a", "running");
    m.set_instance("machine-b", "stopping");
    let cfg = m.config();
    let api = SaladApi::new(&cfg.group().unwrap(), Duration::from_secs(2)).unwrap();
    let g = api.container_group().await.unwrap();
    assert_eq!(g.id, cloud_mock::GROUP_ID);
    let list = api.instances().await.unwrap();
    assert_eq!(list.len(), 2);
    let b = list.iter().find(|i| i.machine_id == "machine-b").unwrap();
    assert_eq!(b.state, InstanceState::Stopping);
    assert_eq!(
        api.instance(&b.id).await.unwrap().unwrap().machine_id,
        "machine-b"
    );
    assert!(api
        .instance("0e3f0c2a-0000-4000-8000-999999999999")
        .await
        .unwrap()
        .is_none());
    assert_eq!(api.set_replicas(7).await.unwrap().replicas, 7);
    assert_eq!(m.replicas(), 7);
    for c in m.calls() {
        assert_eq!(c.headers.get("salad-api-key").unwrap(), cloud_mock::KEY);
    }
}

#[tokio::test]
async fn a_wrong_api_key_is_named_but_never_shown() {
    let m = cloud_mock::Api::start().await;
    let mut cfg = m.config();
    let wrong = "wrong-key-never-to-be-printed-42";
    cfg.key = Some(corral::auth::Secret::new(wrong));
    let api = SaladApi::new(&cfg.group().unwrap(), Duration::from_secs(2)).unwrap();
    let e = api.instances().await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, corral::Error::Unauthenticated(_)), "{e:?}");
    assert!(
        text.contains("SaladCloud API GET /organizations/acme/projects/prod/containers/corral-workers/instances"),
        "{text}"
    );
    assert!(text.contains("HTTP 401"), "{text}");
    assert!(!text.contains(wrong) && !format!("{e:?}").contains(wrong));
    assert!(!format!("{api:?}").contains(wrong), "{api:?}");
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_agent_sets_the_latest_advice_at_most_once_per_interval() {
    let m = cloud_mock::Imds::start().await;
    let cfg = WorkerCloudConfig {
        enabled: true,
        imds_url: m.url.clone(),
        deletion_cost_interval_s: 0.3,
        machine_id: Some("machine-a".into()),
        container_group_id: Some(cloud_mock::GROUP_ID.into()),
        ..Default::default()
    };
    let agent = Agent::start(&cfg).await.unwrap().unwrap();
    assert_eq!(agent.instance().machine_id, "machine-a");
    // Twenty advices within a few milliseconds: the first is set at once,
    // the rest collapse into the latest, set once the interval has passed.
    for cost in 1..=20 {
        agent.advise(cost * 10);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_for("the latest advice", || m.deletion_cost() == 200).await;
    let costs = m.costs();
    assert!(costs.len() <= 3, "{costs:?}");
    assert_eq!(costs.first().unwrap().0, 10);
    for pair in costs.windows(2) {
        let gap = pair[1].1.duration_since(pair[0].1);
        assert!(gap >= Duration::from_millis(290), "{gap:?} between PUTs");
    }
    // Out-of-range advice is clamped to what the API accepts.
    agent.advise(-5);
    wait_for("a clamped cost", || m.deletion_cost() == 0).await;
    // Reallocation happens once per process.
    assert!(agent.reallocate("bad node").await.unwrap());
    assert!(!agent.reallocate("bad node again").await.unwrap());
    assert_eq!(m.accepted("POST", "/v1/reallocate").len(), 1);
}

#[tokio::test]
async fn without_configured_ids_the_agent_reads_the_identity_token() {
    let m = cloud_mock::Imds::start().await;
    let cfg = WorkerCloudConfig {
        enabled: true,
        imds_url: m.url.clone(),
        ..Default::default()
    };
    // (SALAD_MACHINE_ID is not set where tests run.)
    let agent = Agent::start(&cfg).await.unwrap().unwrap();
    assert_eq!(agent.instance().machine_id, cloud_mock::TOKEN_MACHINE);
    assert_eq!(agent.instance().container_group_id, cloud_mock::GROUP_ID);
    assert_eq!(m.accepted("GET", "/v1/token").len(), 1);
    // A configured machine id wins; the token still supplies the group.
    let cfg = WorkerCloudConfig {
        machine_id: Some("machine-a".into()),
        ..cfg
    };
    let agent = Agent::start(&cfg).await.unwrap().unwrap();
    assert_eq!(agent.instance().machine_id, "machine-a");
    assert_eq!(agent.instance().container_group_id, cloud_mock::GROUP_ID);
    // No ids anywhere and no IMDS: the worker refuses to start, saying why.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let cfg = WorkerCloudConfig {
        enabled: true,
        imds_url: gone,
        imds_timeout_s: 0.5,
        ..Default::default()
    };
    let e = Agent::start(&cfg).await.unwrap_err().to_string();
    assert!(
        e.contains("no machine id") && e.contains("SALAD_MACHINE_ID"),
        "{e}"
    );
}

#[tokio::test]
async fn a_disabled_agent_calls_nothing() {
    assert!(Agent::start(&WorkerCloudConfig::default())
        .await
        .unwrap()
        .is_none());
}
