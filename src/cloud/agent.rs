//! The worker's side of the cloud (`[worker.cloud] enabled`): it learns the
//! machine it runs on (config, SaladCloud's variables, else the claims of
//! IMDS's identity token) for the worker's Hello, keeps its SaladCloud deletion cost equal to what
//! the coordinator advises (one PUT to IMDS at most every
//! `deletion_cost_interval_s`, the latest value winning), and reallocates
//! the container to another machine when the coordinator judges the node bad
//! (once per process: the container then restarts elsewhere).
//!
//! The PUT loop is a task that ends when the agent is dropped.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

use super::config::WorkerCloudConfig;
use super::imds::Imds;
use super::CloudInstance;
use crate::error::Result;
use crate::metrics::Scrape;

#[derive(Debug, Default)]
struct Counters {
    cost_updates: AtomicU64,
    imds_failures: AtomicU64,
    reallocations: AtomicU64,
    /// The deletion cost IMDS last accepted; i64::MIN before any.
    cost_set: AtomicI64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Agent {
    imds: Imds,
    instance: CloudInstance,
    wanted: watch::Sender<Option<i32>>,
    reallocated: AtomicBool,
    counters: Arc<Counters>,
}

impl Agent {
    /// The agent for `cfg`, its PUT loop started; `None` when the cloud is
    /// off. Needs a tokio runtime. Fails when no machine id can be found.
    pub async fn start(cfg: &WorkerCloudConfig) -> Result<Option<Arc<Self>>> {
        if !cfg.enabled {
            return Ok(None);
        }
        cfg.validate()?;
        let imds = Imds::new(&cfg.imds_url, Duration::from_secs_f64(cfg.imds_timeout_s))?;
        let instance = identify(cfg, &imds).await?;
        let (wanted, rx) = watch::channel(None);
        let counters = Arc::new(Counters {
            cost_set: AtomicI64::new(i64::MIN),
            ..Counters::default()
        });
        let every = Duration::from_secs_f64(cfg.deletion_cost_interval_s);
        tokio::spawn(
            put_loop(imds.clone(), rx, every, counters.clone())
                .instrument(info_span!("imds_deletion_cost")),
        );
        info!(machine_id = %instance.machine_id, container_group_id = %instance.container_group_id, imds = %cfg.imds_url, "SaladCloud instance metadata service on");
        Ok(Some(Arc::new(Self {
            imds,
            instance,
            wanted,
            reallocated: AtomicBool::new(false),
            counters,
        })))
    }

    /// The machine to announce in Hello.
    pub fn instance(&self) -> &CloudInstance {
        &self.instance
    }

    /// The coordinator's advice: set this deletion cost (when the interval
    /// allows; a newer advice replaces one not yet set).
    pub fn advise(&self, deletion_cost: i32) {
        let cost = deletion_cost.clamp(0, super::MAX_DELETION_COST);
        self.wanted.send_replace(Some(cost));
    }

    /// Whether a reallocation was asked for already.
    pub fn reallocated(&self) -> bool {
        self.reallocated.load(Relaxed)
    }

    /// Asks SaladCloud to move this container to another machine, once per
    /// process: later calls do nothing and return false.
    pub async fn reallocate(&self, reason: &str) -> Result<bool> {
        if self.reallocated.swap(true, Relaxed) {
            return Ok(false);
        }
        warn!(%reason, "asking SaladCloud to reallocate this container to another machine");
        match self.imds.reallocate(reason).await {
            Ok(()) => {
                self.counters.reallocations.fetch_add(1, Relaxed);
                Ok(true)
            }
            Err(e) => {
                self.counters.imds_failures.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// The worker's cloud series for `/metrics`.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(Series(self.counters.clone()))
    }
}

/// The machine and container group: from the config or SaladCloud's
/// variables, else from the claims of IMDS's identity token
/// (`salad_machine_id`, `salad_container_group_id`; read, not verified:
/// they only name this container to the coordinator).
async fn identify(cfg: &WorkerCloudConfig, imds: &Imds) -> Result<CloudInstance> {
    let (mut machine, mut group) = cfg.configured_ids();
    if machine.is_none() || group.is_none() {
        match imds.token().await.and_then(|t| super::imds::claims(&t)) {
            Ok(c) => {
                machine = machine.or(c.salad_machine_id);
                group = group.or(c.salad_container_group_id);
            }
            Err(e) if machine.is_some() => {
                warn!(error = %e, "no container group id: the coordinator will not ask the API about this worker");
            }
            Err(e) => {
                return Err(crate::Error::Config(format!(
                    "cloud.enabled: no machine id (set cloud.machine_id or SALAD_MACHINE_ID, \
                     or run where IMDS answers /v1/token): {e}"
                )))
            }
        }
    }
    let machine = machine.ok_or_else(|| {
        crate::Error::Config(
            "cloud.enabled: no machine id in cloud.machine_id, SALAD_MACHINE_ID or IMDS's token"
                .into(),
        )
    })?;
    CloudInstance::new(machine, group.unwrap_or_default())
}

async fn put_loop(
    imds: Imds,
    mut rx: watch::Receiver<Option<i32>>,
    every: Duration,
    counters: Arc<Counters>,
) {
    let mut last: Option<i32> = None;
    // Ends when the agent (the sender) is dropped.
    while rx.changed().await.is_ok() {
        let Some(want) = *rx.borrow_and_update() else {
            continue;
        };
        if last == Some(want) {
            continue;
        }
        match imds.set_deletion_cost(want).await {
            Ok(()) => {
                info!(deletion_cost = want, "deletion cost set");
                counters.cost_updates.fetch_add(1, Relaxed);
                counters.cost_set.store(i64::from(want), Relaxed);
                last = Some(want);
            }
            Err(e) => {
                counters.imds_failures.fetch_add(1, Relaxed);
                warn!(error = %e, deletion_cost = want, "cannot set the deletion cost; will retry");
                rx.mark_changed();
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[derive(Debug)]
struct Series(Arc<Counters>);

impl Collector for Series {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let c = &self.0;
        let mut g = Scrape::new(&mut encoder);
        g.counter(
            "corral_worker_cloud_deletion_cost_updates",
            "Deletion costs set through the instance metadata service.",
            c.cost_updates.load(Relaxed),
        )?;
        let set = c.cost_set.load(Relaxed);
        if set != i64::MIN {
            g.gauge(
                "corral_worker_cloud_deletion_cost",
                "The deletion cost last set (tenths of a second of fleet work).",
                set as f64,
            )?;
        }
        g.counter(
            "corral_worker_cloud_reallocations",
            "Reallocations to another machine asked of the instance metadata service.",
            c.reallocations.load(Relaxed),
        )?;
        g.counter(
            "corral_worker_cloud_imds_failures",
            "Instance metadata service calls that failed.",
            c.imds_failures.load(Relaxed),
        )
    }
}
