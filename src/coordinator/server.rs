//! Serving: the three Corral services, health and reflection (v1 and
//! v1alpha, for grpcurl 1.8), on a listener the caller bound.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, info_span, Instrument};

use super::admin::AdminService;
use super::auth::{Authenticator, Guard, Service};
use super::jobs::JobsService;
use super::workers::WorkersService;
use super::Coordinator;
use crate::clock::{Clock, SystemClock};
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::pb;

/// The services, for tests that call inner functions.
pub struct Services {
    pub coordinator: Arc<Coordinator>,
    pub jobs: JobsService,
    pub admin: AdminService,
}

impl Services {
    /// The services around a coordinator with an in-memory store.
    pub fn new(cfg: CoordinatorConfig, clock: Arc<dyn Clock>) -> Self {
        Self::around(Coordinator::new(cfg, clock))
    }

    /// The services around a coordinator restored from `cfg.data_dir`.
    pub fn open(cfg: CoordinatorConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        Ok(Self::around(Coordinator::open(cfg, clock)?))
    }

    /// The services around a coordinator restored from the store `cfg`
    /// names: the embedded one under `data_dir`, or PostgreSQL (`store`).
    /// `bound` is the gRPC address, for the advertised URL. A coordinator
    /// that does not lead starts not serving, and campaigns once served.
    pub async fn open_store(
        cfg: CoordinatorConfig,
        clock: Arc<dyn Clock>,
        bound: std::net::SocketAddr,
    ) -> Result<Self> {
        let Some(url) = cfg.postgres_url() else {
            std::fs::create_dir_all(&cfg.data_dir).map_err(|e| Error::io(&cfg.data_dir, e))?;
            return Self::open(cfg, clock);
        };
        let opts = super::store::PgOptions {
            url: url.to_owned(),
            advertise_url: cfg.advertised_url(bound),
            lease: Duration::from_secs_f64(cfg.leader_lease_s),
        };
        let (store, loaded) = super::store::Store::open_postgres(&opts).await?;
        let c = Coordinator::with_store(cfg, clock, store, loaded);
        if c.store.failed().is_some() {
            c.serving.store(false, std::sync::atomic::Ordering::Release);
        }
        Ok(Self::around(c))
    }

    fn around(coordinator: Arc<Coordinator>) -> Self {
        Self {
            jobs: JobsService(coordinator.clone()),
            admin: AdminService(coordinator.clone()),
            coordinator,
        }
    }
}

/// Every Corral service SERVING or NOT_SERVING (the store is failing).
pub(super) async fn set_health(h: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    h.set_service_status("", status).await;
    h.set_service_status(
        <pb::jobs_server::JobsServer<JobsService> as tonic::server::NamedService>::NAME,
        status,
    )
    .await;
    h.set_service_status(
        <pb::workers_server::WorkersServer<WorkersService> as tonic::server::NamedService>::NAME,
        status,
    )
    .await;
    h.set_service_status(
        <pb::admin_server::AdminServer<AdminService> as tonic::server::NamedService>::NAME,
        status,
    )
    .await;
}

/// Refuses every call while the coordinator's shared store says it does
/// not lead (or is recovering): UNAVAILABLE, with the leader's advertised
/// URL in the message and in the `corral-leader` metadata entry when
/// another coordinator leads. Workers and clients follow it
/// (`crate::auth::LEADER_METADATA`). The embedded store is never gated.
#[derive(Clone)]
struct LeaderGate(Weak<Coordinator>);

impl tonic::service::Interceptor for LeaderGate {
    fn call(
        &mut self,
        req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let Some(c) = self.0.upgrade() else {
            return Err(tonic::Status::unavailable("the coordinator is stopping"));
        };
        if !c.store.is_shared() {
            return Ok(req);
        }
        let Some(why) = c.store.failed() else {
            return Ok(req);
        };
        let mut status = tonic::Status::unavailable(why);
        if let Some(url) = c.store.other_leader() {
            if let Ok(v) = url.parse() {
                status
                    .metadata_mut()
                    .insert(crate::auth::LEADER_METADATA, v);
            }
        }
        Err(status)
    }
}

/// Ticks the scheduler (liveness, time-dependent matching) until the
/// coordinator is dropped.
fn spawn_ticker(coord: Weak<Coordinator>, every: Duration) {
    tokio::spawn(
        async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(c) = coord.upgrade() else { return };
                c.tick();
            }
        }
        .instrument(info_span!("ticker")),
    );
}

/// Serves until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let http = super::http::bind(cfg.http_listen).await?;
    run_with_http(listener, http, cfg, shutdown).await
}

/// [`run`], with the HTTP port (`/metrics`, the cluster page) on a listener
/// the caller bound, or none.
pub async fn run_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    cfg.validate()?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    let services = Services::open_store(cfg, Arc::new(SystemClock), bound).await?;
    serve(services, listener, http, shutdown).await
}

/// Serves `services` (restored already) until `shutdown` resolves.
pub async fn serve(
    services: Services,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let cfg = services.coordinator.config().clone();
    cfg.validate()?;
    let max = cfg.max_message_bytes;
    let tick = Duration::from_millis((cfg.heartbeat_interval_ms() / 5).clamp(50, 1000));
    let retention_s = cfg.result_retention_s;
    let auth = Arc::new(Authenticator::new(
        cfg.auth
            .as_ref()
            .expect("validate() requires an auth decision"),
    ));
    let gate = LeaderGate(Arc::downgrade(&services.coordinator));
    let guard = |s: Service| Guard::new(auth.clone(), s);
    let tls = super::auth::server_tls(&cfg)?;
    let coord = services.coordinator.clone();
    spawn_ticker(Arc::downgrade(&coord), tick);
    super::recovery::spawn_sweeper(Arc::downgrade(&coord), retention_s);
    let _http = http.map(|l| super::http::spawn(l, &coord)).transpose()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(
        &health,
        coord.serving.load(std::sync::atomic::Ordering::Acquire),
    )
    .await;
    super::recovery::spawn_watchdog(Arc::downgrade(&coord), health.clone());
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

    let stopping = coord.clone();
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    info!(%addr, tls = tls.is_some(), "coordinator listening");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    }
    use tonic::service::interceptor::InterceptedService;
    server
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            InterceptedService::new(
                pb::workers_server::WorkersServer::new(WorkersService(coord.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                guard(Service::Workers),
            ),
            gate.clone(),
        ))
        .add_service(InterceptedService::new(
            InterceptedService::new(
                pb::jobs_server::JobsServer::new(services.jobs)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                guard(Service::Jobs),
            ),
            gate.clone(),
        ))
        .add_service(InterceptedService::new(
            InterceptedService::new(
                pb::admin_server::AdminServer::new(services.admin)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                guard(Service::Admin),
            ),
            gate.clone(),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            // Worker streams never end on their own: close them, so that
            // the server's graceful shutdown can finish.
            stopping.close_worker_streams();
        })
        .await
        .map_err(|e| Error::Internal(format!("server: {e}")))?;
    coord.close_store().await?;
    info!("coordinator stopped");
    Ok(())
}
