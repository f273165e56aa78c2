//! The coordinator's side of the cloud: which workers announced a cloud
//! machine, what was last advised to each, the bad-node judge, the
//! desired-workers signal, and the handles of the API tasks. Each tick the
//! coordinator gives it a view of the fleet (from its snapshot) and carries
//! out the [`Action`]s it returns (src/coordinator/cloud.rs); it never
//! blocks: API calls happen in `watch`'s tasks and their answers come back
//! at a later tick.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::{info, warn};

use super::config::CloudConfig;
use super::cost::{self, CostParams, Holding, ModelValue, WorkerLoad};
use super::judge::{BadReason, Judge, JudgeParams, NodeView};
use super::scale::{Load, Rate, ScaleParams, Scaler};
use super::watch::{InstanceWatch, Query, ReplicaSetter, Verdict};
use super::CloudInstance;
use crate::metrics::Scrape;
use crate::scheduler::CostModel;
use crate::types::{FailureKind, Millis, ModelId, WorkerId};

/// One worker in the coordinator's view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerView {
    pub worker: WorkerId,
    pub last_seen_ms: Millis,
    pub running_jobs: u32,
    pub slots: u32,
    /// Every model on its disk or in its memory, once.
    pub holds: Vec<Holding>,
    pub download_bps: u64,
    pub cache_max_bytes: u64,
    pub draining: bool,
}

/// One model in the coordinator's view.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModelView {
    pub demand_per_s: f64,
    pub replica_target: u32,
    pub bytes: u64,
}

/// The fleet at one tick.
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    pub now_ms: Millis,
    pub heartbeat_interval_ms: Millis,
    pub workers: Vec<WorkerView>,
    pub models: BTreeMap<ModelId, ModelView>,
    pub queued: u64,
    /// Jobs accepted so far (a counter; the arrival rate is its slope).
    pub submitted_total: u64,
    /// Mean seconds a job occupies a slot, if any completed.
    pub mean_job_s: Option<f64>,
}

/// What the coordinator should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send `Advice { deletion_cost }`.
    Advise {
        worker: WorkerId,
        deletion_cost: i32,
    },
    /// Stop assigning to it, and send `Drain { reason, reallocate: true }`.
    Reallocate { worker: WorkerId, reason: BadReason },
    /// Its machine no longer runs it: remove it and requeue its jobs now.
    Lost { worker: WorkerId, verdict: Verdict },
}

/// A worker that announced its machine.
#[derive(Clone, Debug)]
struct Announced {
    instance: CloudInstance,
    /// When it was announced or last seen in the fleet.
    seen_ms: Millis,
}

/// Announcements of workers absent from the fleet are kept this long (a
/// worker announces right after its Hello, possibly before the snapshot
/// that lists it; one that reconnects soon keeps its judgement).
const FORGET_AFTER_MS: Millis = 60_000;

#[derive(Debug)]
struct State {
    announced: BTreeMap<WorkerId, Announced>,
    /// The deletion cost last sent to each worker.
    advised: BTreeMap<WorkerId, i32>,
    /// When each silent worker was last asked about.
    asked: BTreeMap<WorkerId, Millis>,
    next_eval_ms: Millis,
    judge: Judge,
    scaler: Scaler,
    arrivals: Rate,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    advice_sent: AtomicU64,
    bad_disk: AtomicU64,
    bad_failures: AtomicU64,
    bad_bandwidth: AtomicU64,
    checks_running: AtomicU64,
    checks_gone: AtomicU64,
    checks_not_running: AtomicU64,
    checks_unknown: AtomicU64,
    reassigned: AtomicU64,
}

/// The API's background tasks, started on first use (inside a runtime).
#[derive(Debug)]
struct Api {
    watch: InstanceWatch,
    replicas: Option<ReplicaSetter>,
    cache_ms: Millis,
}

#[derive(Debug)]
pub struct Steward {
    cfg: CloudConfig,
    cost_model: CostModel,
    state: Mutex<State>,
    api: OnceLock<Option<Api>>,
    desired: AtomicU64,
    counters: Counters,
}

impl Steward {
    pub fn new(cfg: CloudConfig, cost_model: CostModel) -> Self {
        let scaler = Scaler::new(ScaleParams::from(&cfg));
        Self {
            desired: AtomicU64::new(u64::from(scaler.current())),
            state: Mutex::new(State {
                announced: BTreeMap::new(),
                advised: BTreeMap::new(),
                asked: BTreeMap::new(),
                next_eval_ms: 0,
                judge: Judge::default(),
                scaler,
                arrivals: Rate::new(60_000),
            }),
            cfg,
            cost_model,
            api: OnceLock::new(),
            counters: Counters::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The API tasks, started the first time a runtime is there to run them.
    fn api(&self) -> Option<&Api> {
        if let Some(api) = self.api.get() {
            return api.as_ref();
        }
        let group = self.cfg.api.group()?;
        tokio::runtime::Handle::try_current().ok()?;
        self.api
            .get_or_init(|| {
                let timeout = Duration::from_secs_f64(self.cfg.api.timeout_s);
                let client = match super::api::SaladApi::new(&group, timeout) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "the SaladCloud API is configured but unusable");
                        return None;
                    }
                };
                info!(group = %group.container_group, set_replicas = self.cfg.api.set_replicas, "asking the SaladCloud API about silent workers");
                let cache = Duration::from_secs_f64(self.cfg.api.cache_s);
                Some(Api {
                    watch: InstanceWatch::spawn(client.clone(), cache),
                    replicas: self.cfg.api.set_replicas.then(|| {
                        ReplicaSetter::spawn(
                            client,
                            Duration::from_secs_f64(self.cfg.api.replicas_interval_s),
                        )
                    }),
                    cache_ms: (self.cfg.api.cache_s * 1000.0) as Millis,
                })
            })
            .as_ref()
    }

    /// A worker announced its machine (right after its Hello).
    pub fn announce(&self, worker: &WorkerId, instance: CloudInstance, now: Millis) {
        let mut s = self.state();
        let moved = s
            .announced
            .get(worker)
            .is_some_and(|a| a.instance.machine_id != instance.machine_id);
        if moved {
            // Another machine: a new node, judged afresh.
            s.judge.forget(worker);
            s.advised.remove(worker);
        }
        info!(worker_id = %worker, machine_id = %instance.machine_id, "cloud instance announced");
        s.announced.insert(
            worker.clone(),
            Announced {
                instance,
                seen_ms: now,
            },
        );
    }

    /// A worker that said Hello without a cloud machine: nothing cloudy
    /// about it any more.
    pub fn forget(&self, worker: &WorkerId) {
        let mut s = self.state();
        if s.announced.remove(worker).is_some() {
            s.judge.forget(worker);
            s.advised.remove(worker);
            s.asked.remove(worker);
        }
    }

    /// Whether the worker announced a cloud machine.
    pub fn is_cloud(&self, worker: &WorkerId) -> bool {
        self.state().announced.contains_key(worker)
    }

    /// An attempt failed on `worker` (accepted reports only).
    pub fn attempt_failed(&self, worker: &WorkerId, kind: FailureKind, now: Millis) {
        if matches!(kind, FailureKind::Load | FailureKind::Inference) {
            let mut s = self.state();
            if s.announced.contains_key(worker) {
                s.judge.failure(worker, now);
            }
        }
    }

    /// The desired-workers signal now.
    pub fn desired_workers(&self) -> u32 {
        self.desired.load(Relaxed) as u32
    }

    /// What the next [`tick`](Self::tick) needs: `None`, nothing (skip it);
    /// `Some(false)`, the workers' liveness and load only; `Some(true)`, the
    /// full view (an evaluation is due and some worker is a cloud worker).
    pub fn wants_view(&self, now: Millis) -> Option<bool> {
        let s = self.state();
        if now >= s.next_eval_ms {
            // Holdings and demand matter only with cloud workers to advise.
            return Some(!s.announced.is_empty());
        }
        let watching = self.cfg.api.group().is_some() && !s.announced.is_empty();
        watching.then_some(false)
    }

    /// One tick: answers from the API, questions about silent workers, and
    /// (every `advice_interval_s`) deletion costs, bad nodes and the scaling
    /// signal.
    pub fn tick(&self, view: &FleetView) -> Vec<Action> {
        let now = view.now_ms;
        let api = self.api();
        let mut s = self.state();
        let mut out = Vec::new();
        let present: std::collections::BTreeSet<&WorkerId> =
            view.workers.iter().map(|w| &w.worker).collect();
        let mut gone = Vec::new();
        for (w, a) in s.announced.iter_mut() {
            if present.contains(w) {
                a.seen_ms = now;
            } else if now.saturating_sub(a.seen_ms) >= FORGET_AFTER_MS {
                gone.push(w.clone());
            }
        }
        for w in gone {
            s.announced.remove(&w);
            s.judge.forget(&w);
        }
        if let Some(api) = api {
            self.collect_answers(&mut s, api, view, &mut out);
            self.ask_about_silent(&mut s, api, view);
        }
        if now < s.next_eval_ms {
            return out;
        }
        s.next_eval_ms = now + (self.cfg.advice_interval_s * 1000.0) as Millis;
        if !s.announced.is_empty() {
            self.advise(&mut s, view, &mut out);
            if self.cfg.bad_nodes {
                self.judge(&mut s, view, &mut out);
            }
        }
        self.scale(&mut s, view, api);
        out
    }

    fn collect_answers(&self, s: &mut State, api: &Api, view: &FleetView, out: &mut Vec<Action>) {
        for a in api.watch.answers() {
            let c = &self.counters;
            match &a.verdict {
                Verdict::Running => &c.checks_running,
                Verdict::Gone => &c.checks_gone,
                Verdict::NotRunning(_) => &c.checks_not_running,
                Verdict::Unknown(_) => &c.checks_unknown,
            }
            .fetch_add(1, Relaxed);
            if let Verdict::Unknown(why) = &a.verdict {
                warn!(worker_id = %a.query.worker, reason = %why, "no answer about a silent worker's instance");
            }
            if !a.verdict.is_lost() {
                continue;
            }
            // Only if it stayed silent, on the same machine, since the question.
            let still_silent = view
                .workers
                .iter()
                .any(|w| w.worker == a.query.worker && w.last_seen_ms == a.query.last_seen_ms);
            let same_machine = s
                .announced
                .get(&a.query.worker)
                .is_some_and(|x| x.instance == a.query.instance);
            if still_silent && same_machine {
                c.reassigned.fetch_add(1, Relaxed);
                s.asked.remove(&a.query.worker);
                out.push(Action::Lost {
                    worker: a.query.worker,
                    verdict: a.verdict,
                });
            }
        }
    }

    fn ask_about_silent(&self, s: &mut State, api: &Api, view: &FleetView) {
        let now = view.now_ms;
        s.asked
            .retain(|w, _| view.workers.iter().any(|v| &v.worker == w));
        for w in &view.workers {
            if now.saturating_sub(w.last_seen_ms) <= view.heartbeat_interval_ms {
                continue;
            }
            let Some(a) = s.announced.get(&w.worker) else {
                continue;
            };
            if a.instance.container_group_id.is_empty() {
                continue;
            }
            let recently = s.asked.get(&w.worker).is_some_and(|t| {
                now.saturating_sub(*t) < api.cache_ms.max(view.heartbeat_interval_ms)
            });
            if recently {
                continue;
            }
            let q = Query {
                worker: w.worker.clone(),
                instance: a.instance.clone(),
                last_seen_ms: w.last_seen_ms,
            };
            if api.watch.ask(q) {
                s.asked.insert(w.worker.clone(), now);
            }
        }
    }

    fn advise(&self, s: &mut State, view: &FleetView, out: &mut Vec<Action>) {
        let loads: Vec<WorkerLoad> = view
            .workers
            .iter()
            .map(|w| WorkerLoad {
                worker: w.worker.clone(),
                running_jobs: w.running_jobs,
                holds: w.holds.clone(),
            })
            .collect();
        // Copies are re-created at the fleet's typical throughput.
        let mut bps: Vec<u64> = view
            .workers
            .iter()
            .map(|w| w.download_bps)
            .filter(|b| *b > 0)
            .collect();
        bps.sort_unstable();
        let median_bps = bps.get(bps.len() / 2).copied().unwrap_or(0);
        let models: BTreeMap<ModelId, ModelValue> = view
            .models
            .iter()
            .map(|(id, m)| {
                let v = ModelValue::new(
                    m.demand_per_s,
                    m.replica_target,
                    m.bytes,
                    median_bps,
                    &self.cost_model,
                );
                (id.clone(), v)
            })
            .collect();
        let costs = cost::deletion_costs(&loads, &models, &CostParams::from(&self.cfg));
        s.advised
            .retain(|w, _| view.workers.iter().any(|v| &v.worker == w));
        for (w, seconds) in view.workers.iter().zip(costs) {
            if !s.announced.contains_key(&w.worker) {
                continue;
            }
            let c = cost::to_deletion_cost(seconds);
            let material = match s.advised.get(&w.worker) {
                None => true,
                Some(&last) => (c - last).abs() >= (last.abs() / 10).max(10),
            };
            if material {
                s.advised.insert(w.worker.clone(), c);
                self.counters.advice_sent.fetch_add(1, Relaxed);
                out.push(Action::Advise {
                    worker: w.worker.clone(),
                    deletion_cost: c,
                });
            }
        }
    }

    fn judge(&self, s: &mut State, view: &FleetView, out: &mut Vec<Action>) {
        let nodes: Vec<NodeView> = view
            .workers
            .iter()
            .filter(|w| s.announced.contains_key(&w.worker) && !w.draining)
            .map(|w| NodeView {
                worker: w.worker.clone(),
                download_bps: w.download_bps,
                cache_max_bytes: w.cache_max_bytes,
            })
            .collect();
        for (worker, reason) in s
            .judge
            .evaluate(&nodes, view.now_ms, &JudgeParams::from(&self.cfg))
        {
            let c = &self.counters;
            match reason {
                BadReason::Disk { .. } => &c.bad_disk,
                BadReason::Failures { .. } => &c.bad_failures,
                BadReason::Bandwidth { .. } => &c.bad_bandwidth,
            }
            .fetch_add(1, Relaxed);
            warn!(worker_id = %worker, %reason, "bad node: draining it and asking it to reallocate");
            out.push(Action::Reallocate { worker, reason });
        }
    }

    fn scale(&self, s: &mut State, view: &FleetView, api: Option<&Api>) {
        let arrival_per_s = s.arrivals.update(view.submitted_total, view.now_ms);
        let slots: Vec<u32> = view.workers.iter().map(|w| w.slots).collect();
        let slots_per_worker = if slots.is_empty() {
            1.0
        } else {
            f64::from(slots.iter().sum::<u32>()) / slots.len() as f64
        };
        let load = Load {
            queued: view.queued,
            arrival_per_s,
            mean_job_s: view.mean_job_s.unwrap_or(self.cfg.default_job_s),
            slots_per_worker,
        };
        let desired = s.scaler.update(&load, view.now_ms);
        let before = self.desired.swap(u64::from(desired), Relaxed);
        if before != u64::from(desired) {
            info!(
                desired,
                queued = view.queued,
                arrival_per_s,
                "desired workers changed"
            );
        }
        if let Some(r) = api.and_then(|a| a.replicas.as_ref()) {
            r.want(desired);
        }
    }

    /// The cloud series of the coordinator's `/metrics`.
    pub fn encode(&self, g: &mut Scrape<'_, '_>) -> Result<(), std::fmt::Error> {
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct Reason {
            reason: &'static str,
        }
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct Result_ {
            result: &'static str,
        }
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Relaxed);
        g.gauge(
            "corral_desired_workers",
            "Workers the fleet wants now: arrival rate x mean job time, plus queued work spread \
             over the cold start and drain target, within [cloud.min_workers, cloud.max_workers]; \
             falls only after cloud.scale_down_cooldown_s.",
            f64::from(self.desired_workers()),
        )?;
        g.counter(
            "corral_cloud_advice_sent",
            "Deletion-cost advice sent to cloud workers.",
            get(&c.advice_sent),
        )?;
        g.counters(
            "corral_cloud_bad_nodes",
            "Cloud workers judged bad and told to reallocate, by reason.",
            [
                ("disk", get(&c.bad_disk)),
                ("failures", get(&c.bad_failures)),
                ("bandwidth", get(&c.bad_bandwidth)),
            ]
            .map(|(reason, v)| (Reason { reason }, v)),
        )?;
        g.counters(
            "corral_cloud_instance_checks",
            "Answers of the SaladCloud API about silent workers' instances, by result.",
            [
                ("running", get(&c.checks_running)),
                ("gone", get(&c.checks_gone)),
                ("not_running", get(&c.checks_not_running)),
                ("unknown", get(&c.checks_unknown)),
            ]
            .map(|(result, v)| (Result_ { result }, v)),
        )?;
        g.counter(
            "corral_cloud_workers_reassigned",
            "Silent workers removed before the heartbeat timeout because their instance was gone.",
            get(&c.reassigned),
        )?;
        if let Some(api) = self.api.get().and_then(|a| a.as_ref()) {
            g.counter(
                "corral_cloud_api_calls",
                "Calls to the SaladCloud API about instances.",
                api.watch.calls.load(Relaxed),
            )?;
            g.counter(
                "corral_cloud_api_failures",
                "Calls to the SaladCloud API about instances that failed.",
                api.watch.call_failures.load(Relaxed),
            )?;
            if let Some(r) = &api.replicas {
                g.counter(
                    "corral_cloud_replicas_set",
                    "Times the container group's replica count was set.",
                    r.set.load(Relaxed),
                )?;
                g.gauge(
                    "corral_cloud_replicas",
                    "The replica count last accepted by the SaladCloud API (0: none yet).",
                    r.applied.load(Relaxed) as f64,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, holds: &[&str], cache_max_bytes: u64) -> WorkerView {
        WorkerView {
            worker: id.into(),
            last_seen_ms: 0,
            running_jobs: 0,
            slots: 1,
            holds: holds
                .iter()
                .map(|m| Holding {
                    model: (*m).into(),
                    preloaded: false,
                })
                .collect(),
            download_bps: 50_000_000,
            cache_max_bytes,
            draining: false,
        }
    }

    fn view(now_ms: Millis, workers: Vec<WorkerView>, hot_rate: f64) -> FleetView {
        let model = |rate: f64| ModelView {
            demand_per_s: rate,
            replica_target: 2,
            bytes: 2_000_000_000,
        };
        FleetView {
            now_ms,
            heartbeat_interval_ms: 1_000,
            workers,
            models: [("hot".into(), model(hot_rate)), ("cold".into(), model(0.0))]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn costs(actions: &[Action]) -> BTreeMap<String, i32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Advise {
                    worker,
                    deletion_cost,
                } => Some((worker.0.clone(), *deletion_cost)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn advice_goes_to_cloud_workers_on_change_only() {
        let cfg = CloudConfig {
            advice_interval_s: 1.0,
            ..Default::default()
        };
        let st = Steward::new(cfg, CostModel::default());
        let fleet = || {
            vec![
                worker("alone", &["hot"], 1 << 40),
                worker("spare", &["cold"], 1 << 40),
                worker("plain", &["hot"], 1 << 40),
            ]
        };
        // "plain" never named a cloud machine: no advice for it, ever.
        for w in ["alone", "spare"] {
            st.announce(
                &w.into(),
                CloudInstance::new(format!("m-{w}"), String::new()).unwrap(),
                0,
            );
        }
        let first = costs(&st.tick(&view(0, fleet(), 0.5)));
        assert_eq!(first.keys().collect::<Vec<_>>(), ["alone", "spare"]);
        assert!(first["alone"] > 0 && first["spare"] == 0, "{first:?}");
        // Within the interval: nothing; after it, unchanged: nothing.
        assert!(st.tick(&view(500, fleet(), 0.5)).is_empty());
        assert!(costs(&st.tick(&view(1_000, fleet(), 0.5))).is_empty());
        // "plain" drops its copy: "alone" now holds the only one, worth more.
        let mut f = fleet();
        f[2].holds.clear();
        let later = costs(&st.tick(&view(2_000, f, 0.5)));
        assert_eq!(later.keys().collect::<Vec<_>>(), ["alone"]);
        assert!(later["alone"] > first["alone"], "{first:?} {later:?}");
        // A worker that reconnects without a cloud machine is forgotten.
        st.forget(&"alone".into());
        assert!(!st.is_cloud(&"alone".into()));
    }

    #[test]
    fn a_small_disk_is_judged_once() {
        let cfg = CloudConfig {
            advice_interval_s: 1.0,
            min_disk_bytes: 1_000,
            ..Default::default()
        };
        let st = Steward::new(cfg, CostModel::default());
        st.announce(
            &"small".into(),
            CloudInstance::new("m-s".into(), String::new()).unwrap(),
            0,
        );
        let fleet = || vec![worker("small", &[], 10), worker("plain-small", &[], 10)];
        let verdicts = |actions: Vec<Action>| -> Vec<String> {
            actions
                .into_iter()
                .filter_map(|a| match a {
                    Action::Reallocate { worker, reason } => {
                        Some(format!("{worker}: {}", reason.kind()))
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(verdicts(st.tick(&view(0, fleet(), 0.0))), ["small: disk"]);
        assert!(verdicts(st.tick(&view(5_000, fleet(), 0.0))).is_empty());
    }

    #[test]
    fn desired_workers_follow_the_queue() {
        let cfg = CloudConfig {
            advice_interval_s: 1.0,
            min_workers: 2,
            max_workers: 8,
            cold_start_s: 0.0,
            scale_target_drain_s: 10.0,
            scale_down_cooldown_s: 0.0,
            ..Default::default()
        };
        let st = Steward::new(cfg, CostModel::default());
        assert_eq!(st.desired_workers(), 2);
        let mut v = view(0, vec![], 0.0);
        v.queued = 30;
        v.mean_job_s = Some(2.0);
        st.tick(&v);
        // 30 jobs x 2 s over 10 s: 6 workers.
        assert_eq!(st.desired_workers(), 6);
        v.now_ms = 1_000;
        v.queued = 1_000;
        st.tick(&v);
        assert_eq!(st.desired_workers(), 8, "the maximum");
        v.now_ms = 2_000;
        v.queued = 0;
        st.tick(&v);
        v.now_ms = 3_000;
        st.tick(&v);
        assert_eq!(st.desired_workers(), 2, "the minimum");
    }
}
