//! One protected item's state, its queue of steps and its jobs: the transitions every
//! concern (admission, outcomes, schedule) shares.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use lifeboat_retry::Retrier;
use serde::{Deserialize, Serialize};

use crate::error::OpError;
use crate::model::*;

/// A queued action; `job` is the number of the item's job self belongs to, `task` the
/// index of its task in that job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Step {
    pub(super) kind: ActionKind,
    pub(super) job: Option<u64>,
    #[serde(default)]
    pub(super) task: Option<usize>,
}

/// One protected item: its state, its queue of steps (one in flight at a time) and
/// its jobs. Every transition of the item is a method of self.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Item {
    /// The item's name (the coordinator's key for self; set again on insert and restore).
    #[serde(default)]
    pub(super) name: ItemId,
    pub(super) disks: Vec<u64>,
    pub(super) copied: Vec<u64>,
    pub(super) policy: ReplicationPolicy,
    pub(super) state: ProtectionState,
    pub(super) test: TestFailoverState,
    pub(super) points: Vec<RecoveryPoint>,
    pub(super) resync_reason: Option<ResyncReason>,
    pub(super) critical: Option<String>,
    pub(super) retrying: Option<String>,
    pub(super) retrier: Retrier,
    pub(super) queue: VecDeque<Step>,
    pub(super) in_flight: Option<(ActionId, Step)>,
    pub(super) next_cycle: u64,
    pub(super) cycle_due: Option<Duration>,
    pub(super) last_success: Option<Duration>,
    pub(super) failover_point: Option<PointId>,
    pub(super) final_delta_applied: bool,
    /// A protective snapshot of the on-premises disks exists (failback in progress).
    pub(super) protective_snapshot: bool,
    /// Delta cycles that were due (run or missed), and missed.
    #[serde(default)]
    pub(super) cycles_due: u64,
    #[serde(default)]
    pub(super) cycles_missed: u64,
    /// Nothing is emitted before this (scheduled initial replication).
    #[serde(default)]
    pub(super) wait_until: Option<Duration>,
    /// An automatic resync waits for its window to open at this time.
    #[serde(default)]
    pub(super) resync_at: Option<Duration>,
    /// The item's jobs, by number.
    pub(super) jobs: BTreeMap<u64, Job>,
    /// The last job number given out.
    pub(super) next_job: u64,
    /// The last recovery-point id given out.
    pub(super) next_point: u64,
    /// A cycle's logs are being applied: until that ends, the replica may hold part of
    /// the cycle.
    #[serde(default)]
    pub(super) applying: bool,
    /// The replica holds part of a cycle whose logs are lost (a take-over): no point and
    /// no moment of the source describes self until a resync or reprotect completes.
    #[serde(default)]
    pub(super) replica_broken: bool,
    /// Delta cycles applied (discarded ones not counted).
    #[serde(default)]
    pub(super) cycles_applied: u64,
    /// Closed cycles not applied yet: the moment each makes the replica hold (when its
    /// newest log was closed, or when a full copy read the disks) and whether its logs
    /// were closed at a quiesced snapshot.
    #[serde(default)]
    pub(super) closed: BTreeMap<u64, (Duration, bool)>,
    /// The moment the replica holds, as of the last cycle applied: a new point's time.
    #[serde(default)]
    pub(super) replica_time: Option<Duration>,
}

impl Item {
    /// The replica now holds the source as of `to` (if a cycle applied brought data).
    pub(super) fn advance_replica(&mut self, to: Option<Duration>) {
        if let Some(t) = to {
            self.replica_time = Some(self.replica_time.map_or(t, |r| r.max(t)));
        }
    }

    /// A new item, enabling protection.
    pub(super) fn new(name: &str, disks: Vec<u64>, policy: ReplicationPolicy) -> Item {
        Item {
            name: name.to_owned(),
            copied: vec![0; disks.len()],
            disks,
            retrier: Retrier::new(policy.retry.clone()),
            policy,
            state: ProtectionState::EnablingProtection,
            test: TestFailoverState::None,
            points: Vec::new(),
            resync_reason: None,
            critical: None,
            retrying: None,
            queue: VecDeque::new(),
            in_flight: None,
            next_cycle: 0,
            cycle_due: None,
            last_success: None,
            failover_point: None,
            final_delta_applied: false,
            protective_snapshot: false,
            cycles_due: 0,
            cycles_missed: 0,
            wait_until: None,
            resync_at: None,
            jobs: BTreeMap::new(),
            next_job: 0,
            next_point: 0,
            applying: false,
            replica_broken: false,
            cycles_applied: 0,
            closed: BTreeMap::new(),
            replica_time: None,
        }
    }

    /// The item's job number `n`, if `n` is given and known.
    pub(super) fn job_mut(&mut self, n: Option<u64>) -> Option<&mut Job> {
        n.and_then(|n| self.jobs.get_mut(&n))
    }

    /// Whether job `n` has steps queued or in flight.
    pub(super) fn job_has_work(&self, n: u64) -> bool {
        self.queue.iter().any(|s| s.job == Some(n))
            || self
                .in_flight
                .as_ref()
                .is_some_and(|(_, s)| s.job == Some(n))
    }

    /// The item's unfinished resync job.
    pub(super) fn resync_job(&self) -> Option<u64> {
        self.jobs
            .values()
            .find(|j| j.kind == JobKind::Resynchronize && !j.state.is_terminal())
            .map(|j| j.id.n)
    }

    /// Whether a change of recovery point is under way (its job not ended).
    pub(super) fn changing_point(&self) -> Option<&JobId> {
        self.jobs
            .values()
            .find(|j| j.kind == JobKind::ChangeRecoveryPoint && !j.state.is_terminal())
            .map(|j| &j.id)
    }

    /// A paused resync holds the item's queue (derived from the state, never stored).
    pub(super) fn paused(&self) -> bool {
        self.state == ProtectionState::ResyncPaused
    }

    /// Whole copy intervals the pending delta cycle is late by at `now`.
    pub(super) fn cycles_overdue(&self, now: Duration) -> u64 {
        let interval = self.policy.copy_frequency.interval().as_secs().max(1);
        self.cycle_due
            .map_or(0, |due| now.saturating_sub(due).as_secs() / interval)
    }
}

impl Item {
    /// Moves the action in flight back to the front of the item's queue.
    pub(super) fn requeue_in_flight(&mut self) {
        if let Some((_, step)) = self.in_flight.take() {
            self.queue.push_front(step);
        }
    }

    /// A new job of `kind`, in progress from `now`; its number.
    pub(super) fn new_job(&mut self, now: Duration, kind: JobKind) -> u64 {
        self.next_job += 1;
        let n = self.next_job;
        self.jobs
            .insert(n, Job::new(JobId::new(&self.name, n), kind, now));
        n
    }

    /// A new cycle number: every cycle closed gets its own, so a cycle stuck before self is
    /// applied is never confused with a later one.
    pub(super) fn new_cycle(&mut self) -> u64 {
        let cycle = self.next_cycle;
        self.next_cycle += 1;
        cycle
    }

    /// A new recovery-point id.
    pub(super) fn new_point(&mut self) -> PointId {
        self.next_point += 1;
        PointId(self.next_point)
    }

    /// Queues `kind` as the next task of job `job`.
    pub(super) fn enqueue(&mut self, job: u64, kind: ActionKind) {
        let task = self.jobs.get_mut(&job).map(|j| {
            j.tasks.push(Task {
                name: task_name(&kind),
                state: JobState::NotStarted,
            });
            j.tasks.len() - 1
        });
        self.queue.push_back(Step {
            kind,
            job: Some(job),
            task,
        });
    }

    /// Queues `kind` as work of no job (a delta cycle's, a clean-up).
    pub(super) fn enqueue_free(&mut self, kind: ActionKind) {
        self.queue.push_back(Step {
            kind,
            job: None,
            task: None,
        });
    }

    /// Moves the task `step` is to `state` (a task already ended stays so).
    pub(super) fn set_task(&mut self, step: &Step, state: JobState) {
        if let Some(t) = self
            .job_mut(step.job)
            .and_then(|j| j.tasks.get_mut(step.task?))
            .filter(|t| !t.state.is_terminal())
        {
            t.state = state;
        }
    }

    /// Queues `kind` for job `job`, or as free work (a delta cycle) when `None`.
    pub(super) fn enqueue_for(&mut self, job: Option<u64>, kind: ActionKind) {
        match job {
            Some(j) => self.enqueue(j, kind),
            None => self.enqueue_free(kind),
        }
    }

    /// Ends job `job` as succeeded once it has no work left (and follows from it).
    pub(super) fn complete_empty_job(&mut self, now: Duration, job: u64) {
        if self
            .jobs
            .get(&job)
            .is_some_and(|j| j.state == JobState::InProgress)
            && !self.job_has_work(job)
        {
            self.finish_job(now, job, JobState::Succeeded);
            self.on_job_succeeded(now, job);
        }
    }

    /// Ends job `job` in `state` at `now`.
    pub(super) fn finish_job(&mut self, now: Duration, job: u64, state: JobState) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.finish(now, state);
        }
    }

    /// Cancels the unfinished jobs of these kinds, with their queued steps, saying why.
    pub(super) fn cancel_jobs(&mut self, now: Duration, kinds: &[JobKind], why: &str) {
        let ids: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal() && kinds.contains(&j.kind))
            .map(|j| j.id.n)
            .collect();
        for id in ids {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.errors.push(why.to_owned());
                j.finish(now, JobState::Cancelled);
            }
            let front = self.queue.front().cloned();
            self.queue.retain(|s| s.job != Some(id));
            if front.is_some_and(|f| f.job == Some(id)) {
                // The step waiting for a retry is gone: so is its retry.
                self.clear_failure();
            }
        }
    }

    /// Drops queued delta-cycle steps and cancels requested cycles (a resync or failover
    /// supersedes them); keeps clean-up steps (discarding logs, deleting points,
    /// restarting the source).
    pub(super) fn drop_cycle_steps(&mut self, now: Duration) {
        self.cancel_jobs(now, &[JobKind::Replicate], "superseded");
        let front = self.queue.front().cloned();
        self.queue.retain(|s| !s.is_cycle_step());
        if front.is_some_and(|f| f.is_cycle_step()) {
            // The step a retry (or an administrator) waited for is gone.
            self.clear_failure();
        }
    }

    /// Queues the disks of `point` as the failover disks and the machine's start on them.
    pub(super) fn fail_over_to(&mut self, job: u64, point: PointId) {
        self.failover_point = Some(point);
        self.enqueue(
            job,
            ActionKind::MaterializeDisks {
                point,
                purpose: Purpose::Failover,
            },
        );
        self.enqueue(job, ActionKind::StartTarget { point });
    }

    /// Points with a delete queued or in flight: no longer choosable.
    pub(super) fn deleting(&self) -> Vec<PointId> {
        self.queue
            .iter()
            .chain(self.in_flight.as_ref().map(|(_, s)| s))
            .filter_map(|s| match s.kind {
                ActionKind::DeleteRecoveryPoint { point } => Some(point),
                _ => None,
            })
            .collect()
    }

    /// The recovery point `choice` names, among those not being deleted.
    pub(super) fn choose(&self, choice: PointChoice) -> Result<PointId, OpError> {
        let deleting = self.deleting();
        let live: Vec<&RecoveryPoint> = self
            .points
            .iter()
            .filter(|p| !deleting.contains(&p.id))
            .collect();
        let found = match choice {
            PointChoice::Latest | PointChoice::LatestProcessed => live.last().copied(),
            PointChoice::LatestAppConsistent => {
                live.iter().rev().find(|p| p.app_consistent).copied()
            }
            PointChoice::Id(id) => live.iter().find(|p| p.id == id).copied(),
        };
        found.map(|p| p.id).ok_or_else(|| OpError::NoRecoveryPoint {
            item: self.name.clone(),
            choice,
        })
    }
}

impl Step {
    /// A delta cycle's own step (a resync or failover supersedes self).
    pub(super) fn is_cycle_step(&self) -> bool {
        self.job.is_none()
            && matches!(
                self.kind,
                ActionKind::CloseLogs { .. }
                    | ActionKind::ApplyLogs { .. }
                    | ActionKind::CreateRecoveryPoint { .. }
            )
    }
}

impl Item {
    /// Forgets the failure of the step at the queue's front (that step is gone).
    pub(super) fn clear_failure(&mut self) {
        self.retrying = None;
        self.critical = None;
        self.retrier.succeeded();
    }
}

impl Job {
    pub(crate) fn new(id: JobId, kind: JobKind, now: Duration) -> Job {
        Job {
            id,
            kind,
            state: JobState::InProgress,
            tasks: Vec::new(),
            progress_permille: 0,
            started: now,
            ended: None,
            errors: Vec::new(),
            command: None,
        }
    }

    /// Ends the job in `state` at `now`; its unfinished tasks end with self.
    pub(crate) fn finish(&mut self, now: Duration, state: JobState) {
        self.state = state;
        self.ended = Some(now);
        if state == JobState::Succeeded {
            self.progress_permille = 1000;
        }
        for t in &mut self.tasks {
            if !t.state.is_terminal() {
                t.state = if state == JobState::Succeeded {
                    JobState::Succeeded
                } else {
                    JobState::Cancelled
                };
            }
        }
    }
}
