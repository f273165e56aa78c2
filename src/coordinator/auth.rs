//! Authentication and authorisation of calls to the coordinator.
//!
//! Every call to `Jobs`, `Workers` and `Admin` passes a [`Guard`] (a tonic
//! interceptor) that reads `authorization: Bearer <token>`, finds the role
//! the token belongs to (comparing SHA-256 digests in constant time, over
//! every configured token), refuses roles the service does not serve, and
//! leaves the [`Caller`] in the request's extensions for the service:
//!
//! - `Workers`: worker tokens. A token from `[[auth.workers]]` is bound to
//!   worker id patterns: its Hello must name a matching id
//!   ([`Caller::check_worker_id`], PERMISSION_DENIED otherwise); one from
//!   `worker_tokens` may use any id.
//! - `Jobs`: client keys (a client sees and cancels only its own jobs) and
//!   admin tokens (see every job).
//! - `Admin`: admin tokens.
//!
//! With `[auth] disabled = true` every call is `Caller::Anonymous`, which may
//! do everything. Health checks and reflection are not guarded. Tokens are
//! never logged: `Secret` redacts itself, and failures log only the peer.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};
use tracing::warn;

use crate::config::AuthConfig;
use crate::error::{Error, Result};
use crate::types::{JobId, WorkerId};

/// Who made a call, as established by the guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is disabled: everything is allowed.
    Anonymous,
    Admin,
    /// A worker, and the ids it may connect as.
    Worker(WorkerIds),
    /// A client, by the name it has in the config.
    Client(Arc<str>),
}

/// The worker ids a worker token may say Hello with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerIds {
    /// A token from `worker_tokens`.
    Any,
    /// A token from `[[auth.workers]]`: ids matching one of these patterns
    /// (see [`crate::config::worker_id_matches`]).
    Matching(Arc<[String]>),
}

impl Caller {
    /// The caller the guard established; refused when there is none (a
    /// service served without its guard fails closed).
    pub fn of<T>(req: &Request<T>) -> Result<Caller> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("no credentials were checked".into()))
    }

    /// The name jobs submitted by this caller are stored under.
    pub fn client_name(&self) -> &str {
        match self {
            Caller::Client(name) => name,
            _ => "",
        }
    }

    /// Refuses a worker id this caller's token is not bound to.
    pub fn check_worker_id(&self, id: &WorkerId) -> Result<()> {
        match self {
            Caller::Worker(WorkerIds::Matching(patterns))
                if !patterns
                    .iter()
                    .any(|p| crate::config::worker_id_matches(p, &id.0)) =>
            {
                warn!(worker_id = %id, "Hello refused: the token is bound to other worker ids");
                Err(Error::PermissionDenied(format!(
                    "this worker token may not connect as worker id {id}; it is bound to {}",
                    patterns.join(", ")
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether this caller may see every job, not only its own.
    pub fn sees_all(&self) -> bool {
        matches!(self, Caller::Anonymous | Caller::Admin)
    }

    /// Refuses access to a job this caller does not own, as if it did not
    /// exist (a client learns nothing about other clients' jobs).
    pub fn check_owner(&self, id: &JobId, owner: Option<&str>) -> Result<()> {
        match self {
            Caller::Client(name) if owner != Some(&**name) => Err(Error::UnknownJob(id.clone())),
            _ => Ok(()),
        }
    }
}

/// Which service a guard stands in front of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Jobs,
    Workers,
    Admin,
}

impl Service {
    fn admits(self, c: &Caller) -> bool {
        matches!(
            (self, c),
            (_, Caller::Anonymous)
                | (Service::Jobs, Caller::Client(_) | Caller::Admin)
                | (Service::Workers, Caller::Worker(_))
                | (Service::Admin, Caller::Admin)
        )
    }

    fn name(self) -> &'static str {
        match self {
            Service::Jobs => "Jobs",
            Service::Workers => "Workers",
            Service::Admin => "Admin",
        }
    }
}

/// The configured tokens, as digests.
pub struct Authenticator {
    disabled: bool,
    tokens: Vec<([u8; 32], Caller)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("disabled", &self.disabled)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Self {
        let mut tokens = Vec::new();
        for t in &cfg.admin_tokens {
            tokens.push((digest(t.expose()), Caller::Admin));
        }
        for t in &cfg.worker_tokens {
            tokens.push((digest(t.expose()), Caller::Worker(WorkerIds::Any)));
        }
        for w in &cfg.workers {
            let ids = WorkerIds::Matching(w.ids.iter().cloned().collect());
            tokens.push((digest(w.token.expose()), Caller::Worker(ids)));
        }
        for c in &cfg.clients {
            tokens.push((
                digest(c.key.expose()),
                Caller::Client(Arc::from(c.name.as_str())),
            ));
        }
        Self {
            disabled: cfg.disabled,
            tokens,
        }
    }

    /// Who presents these headers.
    pub fn identify(&self, meta: &tonic::metadata::MetadataMap) -> Result<Caller> {
        if self.disabled {
            return Ok(Caller::Anonymous);
        }
        let header = meta
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("missing authorization: Bearer <token>".into()))?
            .to_str()
            .map_err(|_| Error::Unauthenticated("authorization is not ASCII".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Error::Unauthenticated("authorization is not a Bearer token".into()))?
            .trim();
        let d = digest(token);
        // Look at every token, so that the time taken says nothing about
        // which one (if any) matched.
        let mut found: Option<&Caller> = None;
        for (known, caller) in &self.tokens {
            let hit: bool = known.ct_eq(&d).into();
            if hit && found.is_none() {
                found = Some(caller);
            }
        }
        found
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("unknown token".into()))
    }
}

/// The interceptor in front of one service.
#[derive(Clone, Debug)]
pub struct Guard {
    auth: Arc<Authenticator>,
    service: Service,
}

impl Guard {
    pub fn new(auth: Arc<Authenticator>, service: Service) -> Self {
        Self { auth, service }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<Caller> {
        let caller = self.auth.identify(req.metadata());
        let caller = match caller {
            Ok(c) => c,
            Err(e) => {
                warn!(service = self.service.name(), peer = ?req.remote_addr(), error = %e, "call refused");
                return Err(e);
            }
        };
        if !self.service.admits(&caller) {
            warn!(service = self.service.name(), peer = ?req.remote_addr(), caller = ?caller, "call refused: wrong role");
            return Err(Error::PermissionDenied(format!(
                "this token may not call {}",
                self.service.name()
            )));
        }
        Ok(caller)
    }
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        let caller = self.check(&req)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The server's TLS settings, when `tls_cert` and `tls_key` are set.
pub fn server_tls(
    cfg: &crate::config::CoordinatorConfig,
) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let cert = std::fs::read(cert).map_err(|e| Error::io(cert, e))?;
    let key = std::fs::read(key).map_err(|e| Error::io(key, e))?;
    let identity = tonic::transport::Identity::from_pem(cert, key);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new().identity(identity),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;
    use crate::config::ClientKey;

    fn cfg() -> AuthConfig {
        AuthConfig {
            disabled: false,
            admin_tokens: vec![Secret::new("admin-token-0123456789")],
            worker_tokens: vec![Secret::new("worker-token-0123456789")],
            clients: vec![ClientKey {
                name: "acme".into(),
                key: Secret::new("acme-key-0123456789"),
            }],
            workers: vec![crate::config::WorkerKey {
                token: Secret::new("gpu-token-0123456789"),
                ids: vec!["gpu-*".into(), "spare".into()],
            }],
        }
    }

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_map_to_roles_and_services() {
        let a = Arc::new(Authenticator::new(&cfg()));
        let jobs = Guard::new(a.clone(), Service::Jobs);
        let workers = Guard::new(a.clone(), Service::Workers);
        let admin = Guard::new(a, Service::Admin);
        assert_eq!(
            jobs.check(&req(Some("acme-key-0123456789"))).unwrap(),
            Caller::Client("acme".into())
        );
        assert_eq!(
            jobs.check(&req(Some("admin-token-0123456789"))).unwrap(),
            Caller::Admin
        );
        assert!(matches!(
            jobs.check(&req(Some("worker-token-0123456789"))),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            admin.check(&req(Some("acme-key-0123456789"))),
            Err(Error::PermissionDenied(_))
        ));
        assert_eq!(
            workers
                .check(&req(Some("worker-token-0123456789")))
                .unwrap(),
            Caller::Worker(WorkerIds::Any)
        );
        assert!(matches!(
            workers.check(&req(None)),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            workers.check(&req(Some("worker-token-012345678"))),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn bound_worker_tokens_connect_only_as_their_ids() {
        let a = Arc::new(Authenticator::new(&cfg()));
        let workers = Guard::new(a.clone(), Service::Workers);
        let bound = workers.check(&req(Some("gpu-token-0123456789"))).unwrap();
        for ok in ["gpu-1", "gpu-", "spare"] {
            bound.check_worker_id(&WorkerId(ok.into())).unwrap();
        }
        for refused in ["cpu-1", "spare-2", "xgpu-1"] {
            let e = bound
                .check_worker_id(&WorkerId(refused.into()))
                .unwrap_err();
            assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
            assert!(e.to_string().contains(refused), "{e}");
        }
        // A bound worker token is still a worker token only.
        assert!(matches!(
            Guard::new(a.clone(), Service::Jobs).check(&req(Some("gpu-token-0123456789"))),
            Err(Error::PermissionDenied(_))
        ));
        // Tokens from worker_tokens may use any id.
        let any = workers
            .check(&req(Some("worker-token-0123456789")))
            .unwrap();
        any.check_worker_id(&WorkerId("cpu-1".into())).unwrap();
        Caller::Anonymous
            .check_worker_id(&WorkerId("cpu-1".into()))
            .unwrap();
    }

    #[test]
    fn disabled_lets_everyone_in() {
        let a = Arc::new(Authenticator::new(&AuthConfig {
            disabled: true,
            ..cfg()
        }));
        assert_eq!(
            Guard::new(a, Service::Admin).check(&req(None)).unwrap(),
            Caller::Anonymous
        );
    }

    #[test]
    fn clients_see_only_their_jobs() {
        let id = JobId("j-1".into());
        let acme = Caller::Client("acme".into());
        assert!(acme.check_owner(&id, Some("acme")).is_ok());
        assert!(matches!(
            acme.check_owner(&id, Some("other")),
            Err(Error::UnknownJob(_))
        ));
        assert!(Caller::Admin.check_owner(&id, Some("other")).is_ok());
    }
}
