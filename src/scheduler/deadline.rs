//! Attempt deadlines: a worker that keeps heartbeating but never finishes
//! an attempt (a hung generation, a wedged driver) must not hold its job
//! forever while other workers wait.
//!
//! Every running attempt gets a deadline when it starts (assignment, or
//! adoption from a reconnecting worker's report): its start plus
//! `attempt_deadline_factor` times its budget, at least
//! `attempt_deadline_floor_ms`. The budget is the attempt's expected
//! length (`expected_run_ms`: fetch and load by tier, then the model's
//! learned generation time) with the generation part scaled up for a job
//! larger than a nominal one (steps x images x pixels over 30 x 1 x
//! 512 x 512), since the learned time is a mean over jobs of any size.
//! The scaling never shrinks a budget, so the deadline errs long.
//!
//! Deadlines sit in a set ordered by time, kept in step with each attempt
//! (filed when it starts, removed when it ends in any way), so a tick
//! reads only the attempts that are due: nothing when none is.
//!
//! A due attempt is taken off its worker and told to stop (`Cancel`; its
//! slot stays taken until the worker confirms, as for a client's cancel:
//! a worker that cannot stop it is busy), and the job is requeued, the
//! lost attempt counting as a failure, so a job that hangs every worker
//! ends failed after `max_attempts`. A worker that reconnects still
//! reporting the attempt does not get it back.

use super::ids::Jix;
use super::{Effect, Scheduler};
use crate::types::{JobSpec, Millis};

/// Work of the nominal job the learned generation times are taken to
/// describe: 30 steps, one 512x512 image.
const NOMINAL_WORK: f64 = 30.0 * 512.0 * 512.0;

/// How many nominal jobs' worth of generation `spec` asks for, at least 1.
fn work_scale(spec: &JobSpec) -> f64 {
    let work = f64::from(spec.steps.max(1))
        * f64::from(spec.num_images.max(1))
        * f64::from(spec.width.max(1))
        * f64::from(spec.height.max(1));
    (work / NOMINAL_WORK).max(1.0)
}

impl Scheduler {
    /// Files the deadline of the attempt `jix` runs now (the caller has set
    /// its `started_ms` and `expected_ms`).
    pub(super) fn arm_deadline(&mut self, jix: Jix) {
        self.disarm_deadline(jix);
        let j = &self.jobs[jix];
        // `expected_ms` is setup (fetch, load) plus the model's generation
        // time as it was when the attempt started, which is now.
        let generate = self.service_ms(j.model).min(j.expected_ms);
        let setup = j.expected_ms - generate;
        let budget = (setup as f64 + generate as f64 * work_scale(&j.spec))
            * self.cfg.attempt_deadline_factor;
        // Saturates (an f64 past u64::MAX converts to u64::MAX).
        let allowed = (budget as Millis).max(self.cfg.attempt_deadline_floor_ms);
        let at = j.started_ms.unwrap_or(0).saturating_add(allowed);
        self.jobs[jix].deadline_ms = Some(at);
        self.attempt_deadlines.insert((at, jix));
    }

    /// Forgets the deadline of `jix`'s attempt (it ended or left its worker).
    pub(super) fn disarm_deadline(&mut self, jix: Jix) {
        if let Some(at) = self.jobs[jix].deadline_ms.take() {
            self.attempt_deadlines.remove(&(at, jix));
        }
    }

    /// When the running attempt of `job` is due, if it runs.
    pub fn attempt_deadline_ms(&self, job: &crate::types::JobId) -> Option<Millis> {
        self.job(job)?.deadline_ms
    }

    /// Stops every attempt past its deadline and requeues (or fails) its
    /// job; the requeued jobs are matched as after a submit.
    pub fn expire_attempts(&mut self, now: Millis) -> Vec<Effect> {
        let mut effects = Vec::new();
        while let Some(&(at, jix)) = self.attempt_deadlines.first() {
            if at > now {
                break;
            }
            self.advance(now);
            self.disarm_deadline(jix);
            let j = &self.jobs[jix];
            let (Some(w), Some(name)) = (j.on, j.worker.clone()) else {
                debug_assert!(false, "a deadline outlived its attempt");
                continue;
            };
            let (id, attempt) = (j.id.clone(), j.attempt);
            let took_s = now.saturating_sub(j.started_ms.unwrap_or(now)) as f64 / 1e3;
            let expected_s = j.expected_ms as f64 / 1e3;
            let worker = &mut self.workers[w];
            worker.running.remove(&id);
            worker.stopping.insert(id.clone());
            self.place(w);
            self.jobs[jix].timed_out = true;
            effects.push(Effect::Cancel {
                worker: name.clone(),
                job: id,
                attempt,
            });
            let why = format!(
                "attempt {attempt} on worker {name} passed its deadline after {took_s:.0} s \
                 (expected {expected_s:.0} s; attempt_deadline_factor, attempt_deadline_floor_s)"
            );
            effects.extend(self.requeue_or_fail(jix, &why, true, true));
            if self.jobs.get(jix).is_some_and(|j| j.on.is_none()) {
                effects.extend(self.place_job(jix, now));
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::scheduler::SchedulerConfig;
    use crate::types::{CacheReport, JobId, RunningJob, WorkerHello, WorkerId};

    const GB: u64 = 1_000_000_000;

    /// A worker with model `m` in VRAM, running `running`.
    fn hello(id: &str, running: &[(&str, u32)]) -> WorkerHello {
        WorkerHello {
            worker_id: id.into(),
            version: "t".into(),
            gpu_name: "g".into(),
            vram_bytes: 24 * GB,
            cache_max_bytes: 50 * GB,
            max_concurrent_jobs: 1,
            state: CacheReport {
                vram_models: vec!["m".into()],
                running_jobs: running
                    .iter()
                    .map(|(j, a)| RunningJob {
                        job_id: (*j).into(),
                        attempt: *a,
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    /// Default generation time 5 s in VRAM: 2 x 5 s = 10 s, floor 8 s.
    fn sched() -> Scheduler {
        let mut s = Scheduler::new(SchedulerConfig {
            attempt_deadline_factor: 2.0,
            attempt_deadline_floor_ms: 8_000,
            heartbeat_timeout_ms: 1_000_000,
            ..SchedulerConfig::default()
        });
        s.register_model("m".into(), 2 * GB);
        s
    }

    fn spec() -> Arc<JobSpec> {
        let mut s = JobSpec::for_model("m".into());
        s.steps = 30;
        Arc::new(s)
    }

    fn kinds(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|e| match e {
                Effect::Assign {
                    worker, attempt, ..
                } => format!("assign {} {attempt}", worker.0),
                Effect::Cancel {
                    worker, attempt, ..
                } => format!("cancel {} {attempt}", worker.0),
                Effect::Requeued { next_attempt, .. } => format!("requeued {next_attempt}"),
                Effect::Failed { .. } => "failed".into(),
                Effect::Prefetch { .. } => "prefetch".into(),
            })
            .collect()
    }

    #[test]
    fn a_hung_attempt_is_stopped_and_its_job_runs_elsewhere() {
        let mut s = sched();
        s.connect(hello("w1", &[]), 0);
        let e = s.submit("j".into(), spec(), 1_000).unwrap();
        assert_eq!(kinds(&e), ["assign w1 1"]);
        let job = JobId::from("j");
        assert_eq!(s.attempt_deadline_ms(&job), Some(11_000));
        // A second worker comes while w1 holds the job; it heartbeats.
        s.connect(hello("w2", &[]), 2_000);
        assert!(s.expire_attempts(10_999).is_empty());
        let e = s.expire_attempts(11_000);
        assert_eq!(kinds(&e), ["cancel w1 1", "requeued 2", "assign w2 2"]);
        assert!(matches!(&e[1], Effect::Requeued { reason, .. } if reason.contains("deadline")));
        assert_eq!(s.job(&job).unwrap().failures, 1);
        // w1's slot stays taken until it stops the attempt.
        let w1 = WorkerId::from("w1");
        assert_eq!(s.worker(&w1).unwrap().free_slots(), 0);
        s.heartbeat(&w1, hello("w1", &[]).state, 12_000).unwrap();
        assert_eq!(s.worker(&w1).unwrap().free_slots(), 1);
        // A late result from w1 is refused; w2's is taken.
        assert!(s.complete(&w1, &job, 1, 12_500).is_err());
        s.complete(&"w2".into(), &job, 2, 13_000).unwrap();
        assert!(s.attempt_deadlines.is_empty());
    }

    #[test]
    fn every_end_of_an_attempt_forgets_its_deadline() {
        let mut s = sched();
        s.connect(hello("w1", &[]), 0);
        for (i, end) in ["complete", "fail", "cancel", "disconnect"]
            .iter()
            .enumerate()
        {
            let job = JobId(format!("j{i}"));
            s.submit(job.clone(), spec(), 0).unwrap();
            let attempt = s.job(&job).unwrap().attempt;
            assert_eq!(s.attempt_deadlines.len(), 1, "{end}");
            let w1 = WorkerId::from("w1");
            match *end {
                "complete" => drop(s.complete(&w1, &job, attempt, 1).unwrap()),
                "fail" => drop(s.fail(&w1, &job, attempt, "x", false, 1).unwrap()),
                "cancel" => {
                    s.cancel(&job, 1).unwrap();
                    s.heartbeat(&w1, hello("w1", &[]).state, 1).unwrap();
                }
                _ => {
                    s.disconnect(&w1, "gone", false, 1);
                    assert!(s.job(&job).unwrap().deadline_ms.is_none());
                    s.cancel(&job, 1).unwrap();
                    s.connect(hello("w1", &[]), 1);
                }
            }
            assert!(s.attempt_deadlines.is_empty(), "{end}");
        }
    }

    #[test]
    fn a_reconnecting_worker_does_not_get_a_timed_out_attempt_back() {
        let mut s = sched();
        s.connect(hello("w1", &[]), 0);
        s.submit("j".into(), spec(), 0).unwrap();
        s.expire_attempts(10_000);
        let job = JobId::from("j");
        assert_eq!(s.job(&job).unwrap().worker, None);
        // It reconnects still running attempt 1: told to stop it (first,
        // on its stream), and given the job (still queued) afresh, as
        // attempt 2 with its own deadline, instead of adopting attempt 1.
        s.disconnect(&"w1".into(), "stream ended", false, 10_500);
        let e = s.connect(hello("w1", &[("j", 1)]), 11_000);
        assert_eq!(kinds(&e), ["cancel w1 1", "assign w1 2"]);
        assert_eq!(s.job(&job).unwrap().failures, 1);
        assert_eq!(s.attempt_deadline_ms(&job), Some(21_000));
    }

    #[test]
    fn a_job_that_hangs_every_time_ends_failed() {
        let mut s = sched();
        let mut now = 0;
        for attempt in 1..=3 {
            let w = WorkerId(format!("w{attempt}"));
            s.connect(hello(&w.0, &[]), now);
            if attempt == 1 {
                s.submit("j".into(), spec(), now).unwrap();
            }
            assert_eq!(s.job(&"j".into()).unwrap().attempt, attempt);
            now += 10_000;
            let e = s.expire_attempts(now);
            let want = if attempt < 3 {
                vec![
                    format!("cancel {} {attempt}", w.0),
                    format!("requeued {}", attempt + 1),
                ]
            } else {
                vec![format!("cancel {} {attempt}", w.0), "failed".into()]
            };
            assert_eq!(kinds(&e), want);
        }
        assert!(s.job(&"j".into()).is_none());
        assert!(s.attempt_deadlines.is_empty());
    }

    #[test]
    fn large_jobs_and_downloads_get_longer() {
        let mut s = sched();
        s.register_model("cold".into(), 2 * GB);
        let mut w = hello("w1", &[]);
        w.max_concurrent_jobs = 2;
        s.connect(w, 0);
        // 60 steps x 4 images of 1024x1024: 32 nominal jobs of 5 s.
        let mut big = JobSpec::for_model("m".into());
        (big.steps, big.num_images, big.width, big.height) = (60, 4, 1024, 1024);
        s.submit("big".into(), Arc::new(big), 0).unwrap();
        assert_eq!(s.attempt_deadline_ms(&"big".into()), Some(2 * 32 * 5_000));
        // A model to fetch: 2 GB at 25 MB/s, a load of 1.5 s + 2 GB at
        // 1.5 GB/s, then 5 s; twice that.
        s.submit(
            "cold".into(),
            Arc::new(JobSpec::for_model("cold".into())),
            0,
        )
        .unwrap();
        let want = 2 * (80_000 + 1_500 + 1_333 + 5_000);
        assert_eq!(s.attempt_deadline_ms(&"cold".into()), Some(want));
    }

    #[test]
    fn larger_jobs_scale_up_never_down() {
        let mut s = JobSpec::for_model("m".into());
        (s.steps, s.num_images, s.width, s.height) = (30, 1, 512, 512);
        assert_eq!(work_scale(&s), 1.0);
        (s.steps, s.num_images) = (10, 1);
        assert_eq!(work_scale(&s), 1.0);
        (s.steps, s.num_images, s.width, s.height) = (60, 4, 1024, 1024);
        assert_eq!(work_scale(&s), 2.0 * 4.0 * 4.0);
    }
}
