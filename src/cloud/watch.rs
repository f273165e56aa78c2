//! The coordinator's calls to the SaladCloud API, in background tasks, so
//! that nothing the coordinator does waits on them:
//!
//! - [`InstanceWatch`]: the coordinator asks (without blocking) about the
//!   instances of silent workers; the task lists the container group's
//!   instances (one call answers every question, reused for
//!   `salad.cache_s`) and sends back, per worker, whether its machine still
//!   runs its container. The ticker collects the answers at its next tick.
//! - [`ReplicaSetter`]: sets the container group's replica count to the
//!   latest desired value, at most every `salad.replicas_interval_s`.
//!
//! Both tasks end when their handle is dropped (their channel closes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, info_span, warn, Instrument};

use super::api::{InstanceState, SaladApi};
use super::CloudInstance;
use crate::types::{Millis, WorkerId};

/// Questions waiting for the task, at most (more are refused, not queued).
const QUEUE: usize = 1024;

/// A question about a silent worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub worker: WorkerId,
    pub instance: CloudInstance,
    /// When the worker was last heard from, as the scheduler saw it; the
    /// answer counts only if the worker has stayed silent since.
    pub last_seen_ms: Millis,
}

/// What the API says of a worker's machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The container runs there: keep the normal timeout.
    Running,
    /// No instance of the group runs on that machine any more.
    Gone,
    /// An instance is there, not running (stopping, or being re-created).
    NotRunning(InstanceState),
    /// No answer (the API failed, or the worker is in another group).
    Unknown(String),
}

impl Verdict {
    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Gone => "gone",
            Self::NotRunning(_) => "not_running",
            Self::Unknown(_) => "unknown",
        }
    }

    /// Whether the worker's jobs should move now.
    pub fn is_lost(&self) -> bool {
        matches!(self, Self::Gone | Self::NotRunning(_))
    }
}

#[derive(Clone, Debug)]
pub struct Answer {
    pub query: Query,
    pub verdict: Verdict,
}

/// The handle of the instance-checking task.
#[derive(Debug)]
pub struct InstanceWatch {
    tx: mpsc::Sender<Query>,
    rx: Mutex<mpsc::Receiver<Answer>>,
    /// API calls made (container group and instance lists).
    pub calls: Arc<AtomicU64>,
    pub call_failures: Arc<AtomicU64>,
}

impl InstanceWatch {
    /// Starts the task (needs a tokio runtime).
    pub fn spawn(api: SaladApi, cache: Duration) -> Self {
        let (tx, qrx) = mpsc::channel(QUEUE);
        let (atx, rx) = mpsc::channel(QUEUE);
        let calls = Arc::new(AtomicU64::new(0));
        let call_failures = Arc::new(AtomicU64::new(0));
        let task = Task {
            api,
            cache,
            group_id: None,
            list: None,
            calls: calls.clone(),
            call_failures: call_failures.clone(),
        };
        tokio::spawn(task.run(qrx, atx).instrument(info_span!("salad_instances")));
        Self {
            tx,
            rx: Mutex::new(rx),
            calls,
            call_failures,
        }
    }

    /// Asks about a worker; false when the task is busy (ask again later).
    pub fn ask(&self, q: Query) -> bool {
        self.tx.try_send(q).is_ok()
    }

    /// The answers that arrived since the last call.
    pub fn answers(&self) -> Vec<Answer> {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        while let Ok(a) = rx.try_recv() {
            out.push(a);
        }
        out
    }
}

struct Task {
    api: SaladApi,
    cache: Duration,
    /// The group's id, learned once (workers report it as
    /// SALAD_CONTAINER_GROUP_ID).
    group_id: Option<String>,
    /// The last list of (machine id, state), and when it was fetched.
    list: Option<(Instant, Vec<(String, InstanceState)>)>,
    calls: Arc<AtomicU64>,
    call_failures: Arc<AtomicU64>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Query>, tx: mpsc::Sender<Answer>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(q) = rx.try_recv() {
                batch.push(q);
            }
            let known = self.refresh().await;
            for query in batch {
                let verdict = match &known {
                    Err(e) => Verdict::Unknown(e.clone()),
                    Ok(()) => self.verdict(&query.instance),
                };
                if tx.try_send(Answer { query, verdict }).is_err() {
                    warn!("the coordinator is not collecting instance answers; one dropped");
                }
            }
        }
    }

    /// Makes sure the group id and a recent list are known.
    async fn refresh(&mut self) -> Result<(), String> {
        if self.group_id.is_none() {
            self.calls.fetch_add(1, Ordering::Relaxed);
            match self.api.container_group().await {
                Ok(g) => {
                    info!(group = %g.name, id = %g.id, "container group found");
                    self.group_id = Some(g.id);
                }
                Err(e) => {
                    self.call_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "cannot read the container group");
                    return Err(e.to_string());
                }
            }
        }
        let fresh = self
            .list
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.cache);
        if !fresh {
            self.calls.fetch_add(1, Ordering::Relaxed);
            match self.api.instances().await {
                Ok(list) => {
                    let list = list.into_iter().map(|i| (i.machine_id, i.state)).collect();
                    self.list = Some((Instant::now(), list));
                }
                Err(e) => {
                    self.call_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "cannot list the container group's instances");
                    return Err(e.to_string());
                }
            }
        }
        Ok(())
    }

    fn verdict(&self, instance: &CloudInstance) -> Verdict {
        let group = self.group_id.as_deref().unwrap_or_default();
        if instance.container_group_id != group {
            return Verdict::Unknown(format!(
                "the worker is in container group {:?}, not {} ({group})",
                instance.container_group_id,
                self.api.group_name()
            ));
        }
        let list = self
            .list
            .as_ref()
            .map(|(_, l)| l.as_slice())
            .unwrap_or_default();
        // Two instances on one machine: if either runs, so may the worker.
        let states: Vec<&InstanceState> = list
            .iter()
            .filter(|(m, _)| *m == instance.machine_id)
            .map(|(_, s)| s)
            .collect();
        match states.first() {
            None => Verdict::Gone,
            Some(_) if states.contains(&&InstanceState::Running) => Verdict::Running,
            Some(s) => Verdict::NotRunning((*s).clone()),
        }
    }
}

/// The handle of the replica-count task.
#[derive(Debug)]
pub struct ReplicaSetter {
    tx: watch::Sender<u32>,
    /// Replica counts set, and failed attempts.
    pub set: Arc<AtomicU64>,
    pub failures: Arc<AtomicU64>,
    /// The last count the API accepted (0 before any).
    pub applied: Arc<AtomicU64>,
}

impl ReplicaSetter {
    /// Starts the task (needs a tokio runtime).
    pub fn spawn(api: SaladApi, every: Duration) -> Self {
        let (tx, mut rx) = watch::channel(0u32);
        let set = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let applied = Arc::new(AtomicU64::new(0));
        let (s, f, a) = (set.clone(), failures.clone(), applied.clone());
        tokio::spawn(
            async move {
                let mut last: Option<u32> = None;
                while rx.changed().await.is_ok() {
                    let want = *rx.borrow_and_update();
                    if want == 0 || last == Some(want) {
                        continue;
                    }
                    match api.set_replicas(want).await {
                        Ok(g) => {
                            info!(replicas = g.replicas, "container group replica count set");
                            s.fetch_add(1, Ordering::Relaxed);
                            a.store(u64::from(want), Ordering::Relaxed);
                            last = Some(want);
                        }
                        Err(e) => {
                            f.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, replicas = want, "cannot set the replica count");
                            // Try again after the interval, with the latest value.
                            rx.mark_changed();
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            }
            .instrument(info_span!("salad_replicas")),
        );
        Self {
            tx,
            set,
            failures,
            applied,
        }
    }

    /// The count wanted now (the task sets it when its interval allows).
    pub fn want(&self, replicas: u32) {
        self.tx.send_if_modified(|v| {
            let changed = *v != replicas;
            *v = replicas;
            changed
        });
    }
}
