//! Local stand-ins for SaladCloud's instance metadata service (IMDS) and
//! public API, built from their public OpenAPI documents (IMDS 0.9.0-alpha,
//! API 0.9.0-alpha), that record every request. Point Corral at them with
//! `[worker.cloud] imds_url` and `[coordinator.cloud.api] url`.
//!
//! IMDS rules implemented: every request needs `Metadata: true` and no
//! `X-Forwarded-For/Host/Proto` header, else 403; bodies are JSON; errors
//! are `application/problem+json`; PUT /v1/deletion-cost takes an int32 and
//! answers 204; POST /v1/reallocate takes a reason of 1-1000 characters and
//! answers 204; unknown paths answer 404.
//!
//! API rules implemented: `Salad-Api-Key` must be the configured key, else
//! 401; unknown organization, project, group or instance: 404; PATCH of the
//! group takes `application/merge-patch+json` with replicas in 0..=500.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
    pub status: u16,
    pub at: Instant,
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("https://leaf.salad.com/e/{code}"),
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    url
}

async fn record(req: Request) -> (Call, Bytes) {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let call = Call {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        status: 0,
        at: Instant::now(),
    };
    (call, bytes)
}

// ---- IMDS ---------------------------------------------------------------------

#[derive(Default)]
struct ImdsState {
    calls: Mutex<Vec<Call>>,
    deletion_cost: Mutex<i32>,
    /// Statuses to answer the next requests with, whatever they are.
    fail_next: Mutex<Vec<u16>>,
}

/// A fake IMDS for one container instance.
#[derive(Clone)]
pub struct Imds {
    pub url: String,
    state: Arc<ImdsState>,
}

impl Imds {
    pub async fn start() -> Self {
        let state = Arc::new(ImdsState::default());
        let app = axum::Router::new()
            .fallback(imds_handler)
            .with_state(state.clone());
        Self {
            url: serve(app).await,
            state,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Accepted calls to `method path`.
    pub fn accepted(&self, method: &str, path: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method.as_str() == method && c.path == path && c.status < 300)
            .collect()
    }

    /// The deletion costs accepted, in order, with when.
    pub fn costs(&self) -> Vec<(i32, Instant)> {
        self.accepted("PUT", "/v1/deletion-cost")
            .iter()
            .map(|c| {
                let v: serde_json::Value = serde_json::from_str(&c.body).unwrap();
                (v["deletion_cost"].as_i64().unwrap() as i32, c.at)
            })
            .collect()
    }

    pub fn deletion_cost(&self) -> i32 {
        *self.state.deletion_cost.lock().unwrap()
    }

    /// The next requests get these statuses (with a problem body).
    pub fn fail_next(&self, statuses: &[u16]) {
        *self.state.fail_next.lock().unwrap() = statuses.iter().rev().copied().collect();
    }
}

async fn imds_handler(State(st): State<Arc<ImdsState>>, req: Request) -> Response {
    let (mut call, body) = record(req).await;
    let resp = imds_answer(&st, &call, &body);
    call.status = resp.status().as_u16();
    st.calls.lock().unwrap().push(call);
    resp
}

fn imds_answer(st: &ImdsState, call: &Call, body: &[u8]) -> Response {
    let h = &call.headers;
    let forwarded = ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"]
        .iter()
        .any(|n| h.contains_key(*n));
    if h.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") || forwarded {
        return problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Requests must include the header Metadata: true and no X-Forwarded-* headers",
        );
    }
    if let Some(status) = st.fail_next.lock().unwrap().pop() {
        let s = StatusCode::from_u16(status).unwrap();
        return problem(s, "injected", "injected failure");
    }
    let parse = || serde_json::from_slice::<serde_json::Value>(body).ok();
    match (call.method.as_str(), call.path.as_str()) {
        ("GET", "/v1/status") => json(
            StatusCode::OK,
            serde_json::json!({"ready": true, "started": true}),
        ),
        ("GET", "/v1/token") => json(StatusCode::OK, serde_json::json!({ "jwt": token() })),
        ("GET", "/v1/deletion-cost") => json(
            StatusCode::OK,
            serde_json::json!({"deletion_cost": *st.deletion_cost.lock().unwrap()}),
        ),
        ("PUT", "/v1/deletion-cost") => {
            let cost = parse().and_then(|v| v["deletion_cost"].as_i64());
            match cost.and_then(|c| i32::try_from(c).ok()) {
                Some(c) => {
                    *st.deletion_cost.lock().unwrap() = c;
                    StatusCode::NO_CONTENT.into_response()
                }
                None => problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-deletion-cost",
                    "deletion_cost must be an int32",
                ),
            }
        }
        ("POST", "/v1/reallocate") => {
            let reason = parse().and_then(|v| v["reason"].as_str().map(str::to_owned));
            match reason {
                Some(r) if (1..=1000).contains(&r.chars().count()) => {
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-reason",
                    "reason must be 1-1000 characters",
                ),
            }
        }
        ("POST", "/v1/recreate") | ("POST", "/v1/restart") => {
            StatusCode::NO_CONTENT.into_response()
        }
        _ => problem(StatusCode::NOT_FOUND, "not-found", "no such endpoint"),
    }
}

/// An identity token like SaladCloud's: a JWT whose claims name the machine
/// and the container group (the signature is not checked by Corral).
pub fn token() -> String {
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let header = b64(serde_json::json!({"alg": "ES256", "typ": "JWT"}));
    let claims = b64(serde_json::json!({
        "sub": TOKEN_MACHINE,
        "salad_machine_id": TOKEN_MACHINE,
        "salad_container_group_id": GROUP_ID,
        "salad_organization_name": ORG,
    }));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

/// The machine the stand-in's identity token names.
pub const TOKEN_MACHINE: &str = "4f1d7c2e-9a0b-4c3d-8e5f-112233445566";

// ---- API ----------------------------------------------------------------------

pub const ORG: &str = "acme";
pub const PROJECT: &str = "prod";
pub const GROUP: &str = "corral-workers";
pub const GROUP_ID: &str = "6f1c9f1e-4a53-4f2a-9a55-0d1f7a6f2b10";
pub const KEY: &str = "salad-test-key-0123456789abcdef";

#[derive(Default)]
struct ApiState {
    calls: Mutex<Vec<Call>>,
    /// machine id -> (instance id, state)
    instances: Mutex<BTreeMap<String, (String, String)>>,
    replicas: Mutex<u32>,
}

/// A fake SaladCloud API with one container group.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    state: Arc<ApiState>,
}

impl Api {
    pub async fn start() -> Self {
        let state = Arc::new(ApiState::default());
        *state.replicas.lock().unwrap() = 1;
        let app = axum::Router::new()
            .fallback(api_handler)
            .with_state(state.clone());
        Self {
            url: serve(app).await,
            state,
        }
    }

    /// `[coordinator.cloud.api]` pointing at this server.
    pub fn config(&self) -> corral::cloud::SaladApiConfig {
        corral::cloud::SaladApiConfig {
            url: self.url.clone(),
            key: Some(corral::auth::Secret::new(KEY)),
            organization: Some(ORG.into()),
            project: Some(PROJECT.into()),
            container_group: Some(GROUP.into()),
            cache_s: 0.1,
            timeout_s: 2.0,
            ..Default::default()
        }
    }

    /// An instance of the group on `machine` in `state` ("running", ...).
    pub fn set_instance(&self, machine: &str, state: &str) {
        let mut m = self.state.instances.lock().unwrap();
        let n = m.len();
        let id = m
            .get(machine)
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| format!("0e3f0c2a-0000-4000-8000-{n:012}"));
        m.insert(machine.into(), (id, state.into()));
    }

    pub fn remove_instance(&self, machine: &str) {
        self.state.instances.lock().unwrap().remove(machine);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    pub fn replicas(&self) -> u32 {
        *self.state.replicas.lock().unwrap()
    }

    /// The replica counts set by PATCH, in order.
    pub fn replica_patches(&self) -> Vec<u32> {
        self.calls()
            .iter()
            .filter(|c| c.method == Method::PATCH && c.status < 300)
            .map(|c| {
                let v: serde_json::Value = serde_json::from_str(&c.body).unwrap();
                v["replicas"].as_u64().unwrap() as u32
            })
            .collect()
    }
}

async fn api_handler(State(st): State<Arc<ApiState>>, req: Request) -> Response {
    let (mut call, body) = record(req).await;
    let resp = api_answer(&st, &call, &body);
    call.status = resp.status().as_u16();
    st.calls.lock().unwrap().push(call);
    resp
}

fn instance_json(id: &str, machine: &str, state: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "machine_id": machine,
        "state": state,
        "update_time": "2025-06-01T12:00:00Z",
        "version": 1,
        "ready": state == "running",
        "started": state == "running",
    })
}

fn api_answer(st: &ApiState, call: &Call, body: &[u8]) -> Response {
    let key = call
        .headers
        .get("salad-api-key")
        .and_then(|v| v.to_str().ok());
    if key != Some(KEY) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid Salad-Api-Key header is required",
        );
    }
    let group_path = format!("/organizations/{ORG}/projects/{PROJECT}/containers/{GROUP}");
    let Some(rest) = call.path.strip_prefix(&group_path) else {
        return problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such container group",
        );
    };
    let group = |replicas: u32| {
        serde_json::json!({
            "id": GROUP_ID,
            "name": GROUP,
            "display_name": GROUP,
            "replicas": replicas,
            "current_state": {"status": "running"},
            "create_time": "2025-06-01T12:00:00Z",
            "update_time": "2025-06-01T12:00:00Z",
            "version": 1,
        })
    };
    match (call.method.as_str(), rest) {
        ("GET", "") => json(StatusCode::OK, group(*st.replicas.lock().unwrap())),
        ("PATCH", "") => {
            let ct = call
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok());
            if ct != Some("application/merge-patch+json") {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-content-type",
                    "PATCH takes application/merge-patch+json",
                );
            }
            let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
            match v.and_then(|v| v["replicas"].as_u64()) {
                Some(n) if n <= 500 => {
                    *st.replicas.lock().unwrap() = n as u32;
                    json(StatusCode::OK, group(n as u32))
                }
                _ => problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-replicas",
                    "replicas must be in 0..=500",
                ),
            }
        }
        ("GET", "/instances") => {
            let list: Vec<serde_json::Value> = st
                .instances
                .lock()
                .unwrap()
                .iter()
                .map(|(m, (id, s))| instance_json(id, m, s))
                .collect();
            json(StatusCode::OK, serde_json::json!({ "instances": list }))
        }
        ("GET", r) if r.starts_with("/instances/") => {
            let id = &r["/instances/".len()..];
            let found = st
                .instances
                .lock()
                .unwrap()
                .iter()
                .find(|(_, (i, _))| i == id)
                .map(|(m, (i, s))| instance_json(i, m, s));
            match found {
                Some(v) => json(StatusCode::OK, v),
                None => problem(StatusCode::NOT_FOUND, "not-found", "no such instance"),
            }
        }
        _ => problem(StatusCode::NOT_FOUND, "not-found", "no such endpoint"),
    }
}
