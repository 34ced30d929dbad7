//! The coordinator: commands, outcomes and time in; actions and deadlines out.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use lifeboat_retry::{Class, Decision, Retrier};
use serde::{Deserialize, Serialize};

use crate::model::*;

/// Why a command or an outcome was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// The operation is not allowed in the item's current state.
    #[error("{op} is not allowed while {item} is {}{}: {}", state.to_string().to_lowercase(), test_part(*test), next_step(*state, *test))]
    NotAllowed {
        /// The operation.
        op: &'static str,
        /// The item.
        item: ItemId,
        /// Its protection state.
        state: ProtectionState,
        /// Its test-failover state, when that is what forbids the operation.
        test: Option<TestFailoverState>,
    },
    /// No such item.
    #[error("no protected item {0}")]
    UnknownItem(ItemId),
    /// The item is already protected.
    #[error("{0} is already protected")]
    AlreadyProtected(ItemId),
    /// No recovery point fits the choice.
    #[error("{item} has no recovery point for {choice} (`points` lists them)")]
    NoRecoveryPoint {
        /// The item.
        item: ItemId,
        /// The choice.
        choice: PointChoice,
    },
    /// The policy or disks are invalid (what is required, said).
    #[error("invalid protection settings: {0}")]
    InvalidPolicy(&'static str),
    /// A recovery plan that cannot be: no group, an empty group, an item twice, an item's
    /// name.
    #[error("plan {plan}: {why}")]
    InvalidPlan {
        /// The plan.
        plan: String,
        /// What is wrong.
        why: String,
    },
    /// No such recovery plan.
    #[error("no recovery plan {0} (`lifeboat plan list` lists them)")]
    UnknownPlan(String),
    /// The plan has a failover in progress (it cannot be replaced or started again).
    #[error("plan {0} has a failover in progress")]
    PlanRunning(String),
    /// The plan is not waiting for a manual action (nothing to resume).
    #[error("plan {0} is not waiting for a manual action")]
    PlanNotWaiting(String),
    /// No such job.
    #[error("no job {0} (`lifeboat jobs` lists them)")]
    UnknownJob(JobId),
    /// A job action that does not apply to the job (its kind or its state).
    #[error("job {job}: {why}")]
    JobActionRefused {
        /// The job.
        job: JobId,
        /// Why not.
        why: String,
    },
    /// The item belongs to a recovery plan (an operation that would leave the plan naming
    /// an item that is gone).
    #[error(
        "{item} is in recovery plan {plan}: take it out of the plan first (lifeboat plan create {plan} … without it, or lifeboat plan delete {plan})"
    )]
    InPlan {
        /// The item.
        item: ItemId,
        /// The plan.
        plan: String,
    },
    /// An outcome for an action that is not in flight (stale, or already reported).
    #[error("action {0:?} is not in flight")]
    UnknownAction(ActionId),
}

/// Retention in (0, 24 h] and a copy chunk: what every policy must have.
fn valid_policy(policy: &ReplicationPolicy) -> bool {
    !policy.retention.is_zero()
        && policy.retention <= Duration::from_secs(24 * 3600)
        && policy.copy_chunk > 0
}

/// The test-failover state, when that is what refuses an operation.
fn test_part(test: Option<TestFailoverState>) -> String {
    match test {
        None => String::new(),
        Some(TestFailoverState::None) => " with no test failover".into(),
        Some(t) => format!(" ({})", t.to_string().to_lowercase()),
    }
}

/// What to do first, for an operation refused in `state` (and `test`).
fn next_step(state: ProtectionState, test: Option<TestFailoverState>) -> &'static str {
    use ProtectionState as S;
    match test {
        Some(TestFailoverState::None) => return "there is nothing to clean up",
        Some(_) => return "clean up the test failover first",
        None => {}
    }
    match state {
        S::EnablingProtection | S::InitialReplicationInProgress | S::Resynchronizing => {
            "wait until it is protected (its job shows the progress)"
        }
        S::Protected => "it replicates normally; fail it over first",
        S::ResyncRequired => "resynchronise it first",
        S::ResyncPaused => "resume (or cancel) the paused resync first",
        S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted => {
            "commit the failover first (or cancel it)"
        }
        S::FailoverCommitted => "fail it back first",
        S::FailbackCompleted => "reprotect it first (or cancel the failback)",
        S::FailbackCommitted => "reprotect it first",
        S::PlannedFailoverInitiated
        | S::UnplannedFailoverInitiated
        | S::CommitFailoverInProgress
        | S::CancelFailoverInProgress
        | S::FailbackInProgress
        | S::ReprotectInitiated
        | S::DisablingProtection => "wait for its running job to finish (or resume it)",
        S::ProtectionDisabled => "protect it again first",
    }
}

/// A queued action; `job` is the number of the item's job it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Step {
    kind: ActionKind,
    job: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Item {
    disks: Vec<u64>,
    copied: Vec<u64>,
    policy: ReplicationPolicy,
    state: ProtectionState,
    test: TestFailoverState,
    points: Vec<RecoveryPoint>,
    resync_reason: Option<ResyncReason>,
    critical: Option<String>,
    retrying: Option<String>,
    retrier: Retrier,
    retry_at: Option<Duration>,
    queue: VecDeque<Step>,
    in_flight: Option<(ActionId, Step)>,
    next_cycle: u64,
    cycle_due: Option<Duration>,
    last_success: Option<Duration>,
    failover_point: Option<PointId>,
    final_delta_applied: bool,
    /// A protective snapshot of the on-premises disks exists (failback in progress).
    protective_snapshot: bool,
    /// Delta cycles that were due (run or missed), and missed.
    #[serde(default)]
    cycles_due: u64,
    #[serde(default)]
    cycles_missed: u64,
    /// Nothing is emitted before this (scheduled initial replication).
    #[serde(default)]
    wait_until: Option<Duration>,
    /// An automatic resync waits for its window to open at this time.
    #[serde(default)]
    resync_at: Option<Duration>,
    /// The item's jobs, by number.
    jobs: BTreeMap<u64, Job>,
    /// The last job number given out.
    next_job: u64,
    /// The last recovery-point id given out.
    next_point: u64,
    /// A cycle's logs are being applied: until that ends, the replica may hold part of
    /// the cycle.
    #[serde(default)]
    applying: bool,
    /// The replica holds part of a cycle whose logs are lost (a take-over): no point and
    /// no moment of the source describes it until a resync or reprotect completes.
    #[serde(default)]
    replica_broken: bool,
    /// Delta cycles applied (discarded ones not counted).
    #[serde(default)]
    cycles_applied: u64,
    /// Closed cycles not applied yet: the moment each makes the replica hold (when its
    /// newest log was closed, or when a full copy read the disks) and whether its logs
    /// were closed at a quiesced snapshot.
    #[serde(default)]
    closed: BTreeMap<u64, (Duration, bool)>,
    /// The moment the replica holds, as of the last cycle applied: a new point's time.
    #[serde(default)]
    replica_time: Option<Duration>,
}

impl Item {
    /// The replica now holds the source as of `to` (if a cycle applied brought data).
    fn advance_replica(&mut self, to: Option<Duration>) {
        if let Some(t) = to {
            self.replica_time = Some(self.replica_time.map_or(t, |r| r.max(t)));
        }
    }

    fn new(disks: Vec<u64>, policy: ReplicationPolicy) -> Item {
        Item {
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
            retry_at: None,
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
    fn job_mut(&mut self, n: Option<u64>) -> Option<&mut Job> {
        n.and_then(|n| self.jobs.get_mut(&n))
    }

    /// Whether job `n` has steps queued or in flight.
    fn job_has_work(&self, n: u64) -> bool {
        self.queue.iter().any(|s| s.job == Some(n))
            || self
                .in_flight
                .as_ref()
                .is_some_and(|(_, s)| s.job == Some(n))
    }

    /// The item's unfinished resync job.
    fn resync_job(&self) -> Option<u64> {
        self.jobs
            .values()
            .find(|j| j.kind == JobKind::Resynchronize && !j.state.is_terminal())
            .map(|j| j.id.n)
    }

    /// A paused resync holds the item's queue (derived from the state, never stored).
    fn paused(&self) -> bool {
        self.state == ProtectionState::ResyncPaused
    }

    /// Whole copy intervals the pending delta cycle is late by at `now`.
    fn cycles_overdue(&self, now: Duration) -> u64 {
        let interval = self.policy.copy_frequency.interval().as_secs().max(1);
        self.cycle_due
            .map_or(0, |due| now.saturating_sub(due).as_secs() / interval)
    }
}

/// The replication brain for any number of protected items. It never performs I/O and
/// never reads a clock: feed it [`Command`]s, action [`Outcome`]s and the time; take
/// [`Action`]s from [`Coordinator::poll_action`] and wake it at
/// [`Coordinator::poll_timeout`]. Its whole state is serialisable, so a restarted driver
/// deserialises it, calls [`Coordinator::resume`] and carries on.
///
/// Per item, one action is in flight at a time; every action is idempotent, so one
/// re-issued after a crash is safe.
///
/// Each item's state, its jobs included, stands on its own ([`ItemRecord`]): a driver may
/// persist items one by one, and load only those it acts for
/// ([`Coordinator::insert_item`], [`Coordinator::item_record`]). Recovery plans likewise
/// ([`PlanRecord`](crate::PlanRecord)).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Coordinator {
    pub(crate) items: BTreeMap<ItemId, Item>,
    pub(crate) ready: VecDeque<Action>,
    pub(crate) next_action: u64,
    /// Recovery plans by name, with their jobs and the failover in progress.
    #[serde(default)]
    pub(crate) plans: BTreeMap<String, crate::plan::PlanState>,
}

/// One item's whole replication state (its jobs and recovery points included): what a
/// driver persists for the item, and loads back with [`Coordinator::insert_item`]. It
/// answers read-only questions without a coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemRecord(Item);

impl ItemRecord {
    /// The item's state, health and points at `now`.
    pub fn status(&self, now: Duration) -> ItemStatus {
        status_of(&self.0, now)
    }

    /// The item's jobs, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.0.jobs.values()
    }

    /// The item's protection state.
    pub fn state(&self) -> ProtectionState {
        self.0.state
    }

    /// The item's replication policy.
    pub fn policy(&self) -> &ReplicationPolicy {
        &self.0.policy
    }
}

/// A read-only view of a protected item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemStatus {
    /// Its protection state.
    pub state: ProtectionState,
    /// Its test-failover state.
    pub test_failover: TestFailoverState,
    /// Its health.
    pub health: Health,
    /// Why.
    pub causes: Vec<HealthCause>,
    /// Its recovery points, oldest first.
    pub points: Vec<RecoveryPoint>,
    /// Per disk: bytes copied by initial replication, and the disk size.
    pub initial_copy: Vec<(u64, u64)>,
    /// The point the current failover uses.
    pub failover_point: Option<PointId>,
    /// Delta cycles applied.
    pub cycles_applied: u64,
    /// The recovery point objective achieved: the age of the newest point's data.
    pub rpo: Option<Duration>,
    /// When the last cycle (or copy) made a recovery point.
    pub last_cycle: Option<Duration>,
    /// When the next delta cycle is due (while protected).
    pub next_cycle: Option<Duration>,
    /// When a failed step is tried again.
    pub retry_at: Option<Duration>,
}

fn op_name(c: &Command) -> &'static str {
    match c {
        Command::EnableProtection { .. } => "Enable protection",
        Command::Resync { .. } => "Resync",
        Command::TestFailover { .. } => "Test failover",
        Command::TestFailoverCleanup { .. } => "Test failover cleanup",
        Command::PlannedFailover { .. } => "Planned failover",
        Command::UnplannedFailover { .. } => "Unplanned failover",
        Command::Commit { .. } => "Commit",
        Command::CancelFailover { .. } => "Cancel failover",
        Command::RepairReplication { .. } => "Repair replication",
        Command::Failback { .. } => "Failback",
        Command::CompleteFailback { .. } => "Complete failback",
        Command::CancelFailback { .. } => "Cancel failback",
        Command::Reprotect { .. } => "Reprotect",
        Command::ChangeRecoveryPoint { .. } => "Change recovery point",
        Command::PauseResync { .. } => "Pause resync",
        Command::ResumeResync { .. } => "Resume resync",
        Command::CancelResync { .. } => "Cancel resync",
        Command::TakeOver { .. } => "Take over",
        Command::ReplicateNow { .. } => "Replicate now",
        Command::ChangePolicy { .. } => "Change policy",
        Command::DisableProtection { .. } => "Disable protection",
    }
}

impl ActionKind {
    /// The job task this action is, as the jobs view names it ("Initial replication of
    /// disk 0").
    pub fn task(&self) -> String {
        task_name(self)
    }
}

fn task_name(kind: &ActionKind) -> String {
    match kind {
        ActionKind::StartTracking => "Prerequisites check and change tracking".into(),
        ActionKind::CopyDiskRange { disk, .. } => format!("Initial replication of disk {disk}"),
        ActionKind::CloseLogs { .. } => "Close change logs".into(),
        ActionKind::ApplyLogs { .. } => "Ship and apply change logs".into(),
        ActionKind::DiscardLogs { .. } => "Discard change logs".into(),
        ActionKind::ProcessPendingLogs => "Process pending data".into(),
        ActionKind::ResyncDisk { disk } => format!("Resynchronize disk {disk}"),
        ActionKind::CreateRecoveryPoint { .. } => "Create recovery point".into(),
        ActionKind::DeleteRecoveryPoint { .. } => "Delete recovery point".into(),
        ActionKind::MaterializeDisks {
            purpose: Purpose::Test,
            ..
        } => "Create test disks".into(),
        ActionKind::MaterializeDisks { .. } => "Create failover disks".into(),
        ActionKind::DeleteTestDisks => "Delete test disks".into(),
        ActionKind::StopTracking => "Stop change tracking".into(),
        ActionKind::DeleteReplica => "Delete replica disks".into(),
        ActionKind::ShutDownSource => "Shut down source machine".into(),
        ActionKind::StartSource => "Start source machine".into(),
        ActionKind::StartTarget { .. } => "Start recovered machine".into(),
        ActionKind::StopTarget => "Stop recovered machine".into(),
        ActionKind::ProtectSourceDisks { .. } => "Protective snapshot of on-premises disks".into(),
        ActionKind::SyncBack {
            final_pass: false, ..
        } => "Sync recovered disks back".into(),
        ActionKind::SyncBack { .. } => "Final sync back".into(),
        ActionKind::RestoreSourceDisks => "Restore on-premises disks".into(),
        ActionKind::DeleteProtectiveSnapshot => "Delete protective snapshot".into(),
        ActionKind::RunHook { group, pre, hook } => crate::plan::hook_task(*group, *pre, hook),
    }
}

impl Coordinator {
    /// An empty coordinator.
    pub fn new() -> Self {
        Coordinator::default()
    }

    /// Starts an operation at `now`; returns its job.
    pub fn handle_command(&mut self, now: Duration, cmd: Command) -> Result<JobId, OpError> {
        let r = self.command(now, cmd);
        self.pump_plans(now);
        r
    }

    pub(crate) fn command(&mut self, now: Duration, cmd: Command) -> Result<JobId, OpError> {
        let original = cmd.clone();
        let name = cmd.item().to_owned();
        let job = self.command_inner(now, cmd)?;
        if let Some(j) = self.item_mut(&name).jobs.get_mut(&job)
            && j.command.is_none()
        {
            j.command = Some(original);
        }
        Ok(JobId::new(name, job))
    }

    fn command_inner(&mut self, now: Duration, cmd: Command) -> Result<u64, OpError> {
        let name = cmd.item().to_owned();
        let op = op_name(&cmd);
        if let Command::EnableProtection { disks, policy, .. } = &cmd {
            if self.items.contains_key(&name) || self.plans.contains_key(&name) {
                return Err(OpError::AlreadyProtected(name));
            }
            if disks.is_empty() || !valid_policy(policy) {
                return Err(OpError::InvalidPolicy(
                    "at least one disk, retention in (0, 24 h], copy chunk > 0",
                ));
            }
            self.items
                .insert(name.clone(), Item::new(disks.clone(), policy.clone()));
            let job = self.new_job(now, JobKind::EnableProtection, &name);
            self.enqueue(&name, job, ActionKind::StartTracking);
            self.pump(&name, now);
            return Ok(job);
        }
        let item = self
            .items
            .get(&name)
            .ok_or_else(|| OpError::UnknownItem(name.clone()))?;
        let state = item.state;
        let deny = |test: Option<TestFailoverState>| OpError::NotAllowed {
            op,
            item: name.clone(),
            state,
            test,
        };
        use ProtectionState as S;
        let job = match cmd {
            Command::EnableProtection { .. } => unreachable!("handled above"),
            Command::Resync { .. } => {
                if !matches!(state, S::ResyncRequired | S::Protected) {
                    return Err(deny(None));
                }
                if state == S::Protected {
                    self.item_mut(&name).resync_reason = Some(ResyncReason::Manual);
                }
                self.start_resync(now, &name)
            }
            Command::TestFailover { point, .. } => {
                if !matches!(state, S::Protected) {
                    return Err(deny(None));
                }
                if item.test != TestFailoverState::None {
                    return Err(deny(Some(item.test)));
                }
                let p = self.choose(&name, point)?;
                let job = self.new_job(now, JobKind::TestFailover, &name);
                self.item_mut(&name).test = TestFailoverState::TestFailoverInitiated;
                self.enqueue(
                    &name,
                    job,
                    ActionKind::MaterializeDisks {
                        point: p,
                        purpose: Purpose::Test,
                    },
                );
                job
            }
            Command::TestFailoverCleanup { .. } => {
                if item.test != TestFailoverState::TestFailoverCompleted {
                    return Err(deny(Some(item.test)));
                }
                let job = self.new_job(now, JobKind::TestFailoverCleanup, &name);
                self.item_mut(&name).test = TestFailoverState::TestFailoverCleanupInitiated;
                self.enqueue(&name, job, ActionKind::DeleteTestDisks);
                job
            }
            Command::PlannedFailover { .. } => {
                // Not during resync: the final delta could not make the replica complete.
                if state != S::Protected {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::PlannedFailover, &name);
                let it = self.item_mut(&name);
                it.state = S::PlannedFailoverInitiated;
                it.final_delta_applied = false;
                self.drop_cycle_steps(now, &name);
                let cycle = self.new_cycle(&name);
                self.enqueue(&name, job, ActionKind::ShutDownSource);
                self.enqueue(&name, job, ActionKind::CloseLogs { cycle });
                job
            }
            Command::UnplannedFailover { point, .. } => {
                if !matches!(
                    state,
                    S::Protected | S::ResyncRequired | S::Resynchronizing | S::ResyncPaused
                ) {
                    return Err(deny(None));
                }
                // The replica is only worth a new point when it holds whole cycles: not
                // part-way through a resync, nor with part of a cycle whose logs are lost.
                let replica_usable = state == S::Protected && !item.replica_broken;
                let chosen = match point {
                    PointChoice::Latest if replica_usable => None,
                    PointChoice::Latest => Some(self.choose(&name, PointChoice::LatestProcessed)?),
                    other => Some(self.choose(&name, other)?),
                };
                if chosen.is_none() && self.item(&name).points.is_empty() {
                    return Err(OpError::NoRecoveryPoint {
                        item: name,
                        choice: point,
                    });
                }
                // Unplanned failover cancels a resync and stops delta cycles.
                self.cancel_jobs(
                    now,
                    &name,
                    &[JobKind::Resynchronize],
                    "cancelled by unplanned failover",
                );
                let job = self.new_job(now, JobKind::UnplannedFailover, &name);
                let it = self.item_mut(&name);
                it.state = S::UnplannedFailoverInitiated;
                // A replica part-way through a resync, or waiting for one, stays so: a
                // cancelled failover returns to the resync (the reason is kept).
                if state != S::Protected {
                    it.replica_broken = true;
                }
                self.drop_cycle_steps(now, &name);
                match chosen {
                    Some(p) => self.fail_over_to(&name, job, p),
                    None => {
                        self.enqueue(&name, job, ActionKind::ProcessPendingLogs);
                        let point = self.new_point(&name);
                        self.enqueue(
                            &name,
                            job,
                            ActionKind::CreateRecoveryPoint {
                                point,
                                app_consistent: false,
                            },
                        );
                    }
                }
                job
            }
            Command::Commit { .. } => {
                if !matches!(
                    state,
                    S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted
                ) {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Commit, &name);
                let it = self.item_mut(&name);
                it.state = S::CommitFailoverInProgress;
                let keep = it.failover_point;
                let others: Vec<PointId> = it
                    .points
                    .iter()
                    .map(|p| p.id)
                    .filter(|id| Some(*id) != keep)
                    .collect();
                for point in others {
                    self.enqueue(&name, job, ActionKind::DeleteRecoveryPoint { point });
                }
                job
            }
            Command::CancelFailover { .. } => {
                if !matches!(
                    state,
                    S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted
                ) {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::CancelFailover, &name);
                self.item_mut(&name).state = S::CancelFailoverInProgress;
                self.enqueue(&name, job, ActionKind::StopTarget);
                if state == S::PlannedFailoverCompleted {
                    self.enqueue(&name, job, ActionKind::StartSource);
                }
                job
            }
            Command::Failback {
                full, alternate, ..
            } => {
                if state != S::FailoverCommitted {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Failback, &name);
                self.item_mut(&name).state = S::FailbackInProgress;
                self.enqueue(&name, job, ActionKind::ProtectSourceDisks { alternate });
                self.enqueue(
                    &name,
                    job,
                    ActionKind::SyncBack {
                        full,
                        final_pass: false,
                    },
                );
                self.enqueue(&name, job, ActionKind::StopTarget);
                self.enqueue(
                    &name,
                    job,
                    ActionKind::SyncBack {
                        full: false,
                        final_pass: true,
                    },
                );
                self.enqueue(&name, job, ActionKind::StartSource);
                job
            }
            Command::CompleteFailback { .. } => {
                if state != S::FailbackCompleted {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::CompleteFailback, &name);
                self.enqueue(&name, job, ActionKind::DeleteProtectiveSnapshot);
                job
            }
            Command::CancelFailback { .. } => {
                if !matches!(state, S::FailbackInProgress | S::FailbackCompleted) {
                    return Err(deny(None));
                }
                self.cancel_jobs(
                    now,
                    &name,
                    &[JobKind::Failback],
                    "cancelled by CancelFailback",
                );
                let job = self.new_job(now, JobKind::CancelFailback, &name);
                self.item_mut(&name).state = S::FailbackInProgress;
                // The source may be running on half-synced disks: stop it, restore, and
                // bring the recovered machine back.
                self.enqueue(&name, job, ActionKind::ShutDownSource);
                if self.item(&name).protective_snapshot {
                    self.enqueue(&name, job, ActionKind::RestoreSourceDisks);
                }
                let point = self.item(&name).failover_point.unwrap_or(PointId(0));
                self.enqueue(&name, job, ActionKind::StartTarget { point });
                job
            }
            Command::Reprotect { .. } => {
                if state != S::FailbackCommitted {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Reprotect, &name);
                let it = self.item_mut(&name);
                it.state = S::ReprotectInitiated;
                it.resync_reason = Some(ResyncReason::Manual);
                let disks = it.disks.len();
                self.enqueue(&name, job, ActionKind::StartTracking);
                for disk in 0..disks {
                    self.enqueue(&name, job, ActionKind::ResyncDisk { disk });
                }
                let cycle = self.new_cycle(&name);
                self.enqueue(&name, job, ActionKind::CloseLogs { cycle });
                job
            }
            Command::ChangeRecoveryPoint { point, .. } => {
                if !matches!(
                    state,
                    S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted
                ) {
                    return Err(deny(None));
                }
                let p = self.choose(&name, point)?;
                let job = self.new_job(now, JobKind::ChangeRecoveryPoint, &name);
                self.enqueue(&name, job, ActionKind::StopTarget);
                self.fail_over_to(&name, job, p);
                job
            }
            Command::PauseResync { .. } => {
                let Some(job) = item.resync_job().filter(|_| state == S::Resynchronizing) else {
                    return Err(deny(None));
                };
                // The resync job is suspended; its queued steps wait for ResumeResync.
                let it = self.item_mut(&name);
                it.state = S::ResyncPaused;
                if let Some(j) = it.jobs.get_mut(&job) {
                    j.state = JobState::Suspended;
                }
                job
            }
            Command::ResumeResync { .. } => {
                let Some(job) = item.resync_job().filter(|_| state == S::ResyncPaused) else {
                    return Err(deny(None));
                };
                self.resume_resync(&name, job);
                job
            }
            Command::CancelResync { .. } => {
                let Some(job) = item
                    .resync_job()
                    .filter(|_| matches!(state, S::Resynchronizing | S::ResyncPaused))
                else {
                    return Err(deny(None));
                };
                self.cancel_resync(now, &name);
                job
            }
            Command::RepairReplication { .. } => {
                if item.critical.is_none() {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::RepairReplication, &name);
                let it = self.item_mut(&name);
                it.critical = None;
                it.retrier.succeeded();
                it.retry_at = None;
                let paused = it.paused();
                let suspended: Vec<u64> = it.queue.iter().filter_map(|s| s.job).collect();
                for j in suspended {
                    if let Some(jb) = it.jobs.get_mut(&j)
                        && jb.state == JobState::Suspended
                        && !(paused && jb.kind == JobKind::Resynchronize)
                    {
                        jb.state = JobState::InProgress;
                    }
                }
                self.finish_job(now, &name, job, JobState::Succeeded);
                job
            }
            Command::ReplicateNow { .. } => {
                if state != S::Protected {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Replicate, &name);
                let cycle = self.new_cycle(&name);
                self.enqueue(&name, job, ActionKind::CloseLogs { cycle });
                job
            }
            Command::TakeOver { .. } => {
                let job = self.new_job(now, JobKind::TakeOver, &name);
                self.take_over(now, &name);
                job
            }
            Command::DisableProtection { delete_replica, .. } => {
                if !matches!(
                    state,
                    S::EnablingProtection
                        | S::InitialReplicationInProgress
                        | S::Protected
                        | S::ResyncRequired
                        | S::Resynchronizing
                        | S::ResyncPaused
                        | S::FailoverCommitted
                        | S::FailbackCommitted
                ) {
                    return Err(deny(None));
                }
                if item.test != TestFailoverState::None {
                    return Err(deny(Some(item.test)));
                }
                if let Some(plan) = self
                    .plans()
                    .find(|p| p.groups.iter().any(|g| g.items.contains(&name)))
                {
                    return Err(OpError::InPlan {
                        item: name.clone(),
                        plan: plan.name.clone(),
                    });
                }
                // Nothing the item was doing carries on.
                self.cancel_jobs(
                    now,
                    &name,
                    &[JobKind::EnableProtection, JobKind::Resynchronize],
                    "cancelled by disable protection",
                );
                self.drop_cycle_steps(now, &name);
                let job = self.new_job(now, JobKind::DisableProtection, &name);
                let it = self.item_mut(&name);
                it.state = S::DisablingProtection;
                it.clear_failure();
                it.wait_until = None;
                it.cycle_due = None;
                it.resync_at = None;
                it.closed.clear();
                let points: Vec<PointId> = it.points.iter().map(|p| p.id).collect();
                let queued = self.deleting(&name);
                self.enqueue(&name, job, ActionKind::StopTracking);
                if delete_replica {
                    for point in points.into_iter().filter(|p| !queued.contains(p)) {
                        self.enqueue(&name, job, ActionKind::DeleteRecoveryPoint { point });
                    }
                    self.enqueue(&name, job, ActionKind::DeleteReplica);
                }
                job
            }
            Command::ChangePolicy { policy, .. } => {
                if !valid_policy(&policy) {
                    return Err(OpError::InvalidPolicy(
                        "retention in (0, 24 h], copy chunk > 0",
                    ));
                }
                let job = self.new_job(now, JobKind::ChangePolicy, &name);
                let it = self.item_mut(&name);
                let interval = policy.copy_frequency.interval();
                it.cycle_due = it.cycle_due.map(|due| due.min(now + interval));
                it.policy = policy;
                self.prune(now, &name);
                job
            }
        };
        self.pump(&name, now);
        self.complete_empty_job(now, &name, job);
        Ok(job)
    }

    /// Reports how action `id` ended, at `now`.
    pub fn handle_outcome(
        &mut self,
        now: Duration,
        id: ActionId,
        outcome: Outcome,
    ) -> Result<(), OpError> {
        if self.plan_outcome(now, id, &outcome) {
            self.pump_plans(now);
            return Ok(());
        }
        let name = self
            .items
            .iter()
            .find(|(_, it)| it.in_flight.as_ref().is_some_and(|(a, _)| *a == id))
            .map(|(n, _)| n.clone())
            .ok_or(OpError::UnknownAction(id))?;
        let (_, step) = self
            .item_mut(&name)
            .in_flight
            .take()
            .ok_or(OpError::UnknownAction(id))?;
        match outcome {
            Outcome::Failed { class, message } => self.on_failed(now, &name, step, class, message),
            Outcome::Done => self.on_done(now, &name, step, Vec::new()),
            Outcome::Logs(logs) => self.on_done(now, &name, step, logs),
        }
        self.pump(&name, now);
        self.pump_plans(now);
        Ok(())
    }

    /// Wakes the coordinator at `now` (a retry or a delta cycle may be due).
    pub fn handle_timeout(&mut self, now: Duration) {
        let names: Vec<ItemId> = self.items.keys().cloned().collect();
        for n in names {
            self.pump(&n, now);
        }
        self.pump_plans(now);
    }

    /// Runs at `now` what would wait for a later time: scheduled retries and delta cycles
    /// (an administrator's "now"; the policy's own waits, scheduled initial replication and
    /// a resync window, stay).
    pub fn expedite(&mut self, now: Duration) {
        for it in self.items.values_mut() {
            if it.retry_at.is_some_and(|t| t > now) {
                it.retry_at = Some(now);
            }
            if it.cycle_due.is_some_and(|t| t > now) {
                it.cycle_due = Some(now);
            }
        }
        self.handle_timeout(now);
    }

    /// After restoring a serialised coordinator: re-issues every action that was in
    /// flight (actions are idempotent) and drops actions the old driver never took.
    pub fn resume(&mut self, now: Duration) {
        self.ready.clear();
        let names: Vec<ItemId> = self.items.keys().cloned().collect();
        for n in names {
            self.requeue_in_flight(&n);
            self.pump(&n, now);
        }
        self.resume_plans();
        self.pump_plans(now);
    }

    /// A copy of one item's state, to persist it on its own.
    pub fn item_record(&self, name: &str) -> Option<ItemRecord> {
        self.items.get(name).cloned().map(ItemRecord)
    }

    /// Adds (or replaces) an item from its persisted record and resumes it at `now`: the
    /// action it had in flight is issued again (actions are idempotent).
    pub fn insert_item(&mut self, now: Duration, name: &str, record: ItemRecord) {
        self.ready.retain(|a| a.item != name);
        self.items.insert(name.to_owned(), record.0);
        self.requeue_in_flight(name);
        self.pump(name, now);
        self.pump_plans(now);
    }

    /// Takes an item out (another driver acts for it now); its ready actions are dropped.
    pub fn remove_item(&mut self, name: &str) -> Option<ItemRecord> {
        self.ready.retain(|a| a.item != name);
        self.items.remove(name).map(ItemRecord)
    }

    /// The next action to perform.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.ready.pop_front()
    }

    /// The next ready action of one of `items` (plan actions count as their plan's); the
    /// others stay ready. For a driver acting for some items while another one, beside
    /// it, acts for the rest.
    pub fn poll_action_for(&mut self, items: &[&str]) -> Option<Action> {
        let i = self
            .ready
            .iter()
            .position(|a| items.contains(&a.item.as_str()))?;
        self.ready.remove(i)
    }

    /// When to call [`Coordinator::handle_timeout`] next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.items
            .values()
            .filter(|it| it.in_flight.is_none() && it.critical.is_none() && !it.paused())
            .filter_map(|it| {
                it.retry_at.or(it.wait_until).or_else(|| {
                    let cycle = (it.state == ProtectionState::Protected && it.queue.is_empty())
                        .then_some(it.cycle_due)
                        .flatten();
                    let resync = (it.state == ProtectionState::ResyncRequired)
                        .then_some(it.resync_at)
                        .flatten();
                    cycle.or(resync)
                })
            })
            .min()
    }

    /// An item's state, health and points at `now`.
    pub fn status(&self, item: &str, now: Duration) -> Option<ItemStatus> {
        self.items.get(item).map(|it| status_of(it, now))
    }

    /// The protected items.
    pub fn items(&self) -> impl Iterator<Item = &str> + '_ {
        self.items.keys().map(String::as_str)
    }

    /// Every job: each item's, oldest first, then each plan's.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.items
            .values()
            .flat_map(|it| it.jobs.values())
            .chain(self.plans.values().flat_map(|p| p.jobs.values()))
    }

    /// One job.
    pub fn job(&self, id: &JobId) -> Option<&Job> {
        match self.items.get(&id.item) {
            Some(it) => it.jobs.get(&id.n),
            None => self.plans.get(&id.item)?.jobs.get(&id.n),
        }
    }

    // ------------------------------------------------------------------ internals

    fn item(&self, name: &str) -> &Item {
        &self.items[name]
    }

    fn item_mut(&mut self, name: &str) -> &mut Item {
        self.items
            .get_mut(name)
            .expect("item exists: callers check")
    }

    /// Moves the action in flight back to the front of the item's queue.
    fn requeue_in_flight(&mut self, name: &str) {
        let it = self.item_mut(name);
        if let Some((_, step)) = it.in_flight.take() {
            it.queue.push_front(step);
        }
    }

    fn new_job(&mut self, now: Duration, kind: JobKind, name: &str) -> u64 {
        let it = self.item_mut(name);
        it.next_job += 1;
        let n = it.next_job;
        it.jobs.insert(n, Job::new(JobId::new(name, n), kind, now));
        n
    }

    /// A new cycle number: every cycle closed gets its own, so a cycle stuck before it is
    /// applied is never confused with a later one.
    fn new_cycle(&mut self, name: &str) -> u64 {
        let it = self.item_mut(name);
        let cycle = it.next_cycle;
        it.next_cycle += 1;
        cycle
    }

    fn new_point(&mut self, name: &str) -> PointId {
        let it = self.item_mut(name);
        it.next_point += 1;
        PointId(it.next_point)
    }

    fn enqueue(&mut self, name: &str, job: u64, kind: ActionKind) {
        let it = self.item_mut(name);
        if let Some(j) = it.jobs.get_mut(&job) {
            j.tasks.push(Task {
                name: task_name(&kind),
                state: JobState::NotStarted,
            });
        }
        it.queue.push_back(Step {
            kind,
            job: Some(job),
        });
    }

    fn enqueue_free(&mut self, name: &str, kind: ActionKind) {
        self.item_mut(name)
            .queue
            .push_back(Step { kind, job: None });
    }

    /// Queues `kind` for job `job`, or as free work (a delta cycle) when `None`.
    fn enqueue_for(&mut self, name: &str, job: Option<u64>, kind: ActionKind) {
        match job {
            Some(j) => self.enqueue(name, j, kind),
            None => self.enqueue_free(name, kind),
        }
    }

    fn complete_empty_job(&mut self, now: Duration, name: &str, job: u64) {
        let it = self.item(name);
        if it
            .jobs
            .get(&job)
            .is_some_and(|j| j.state == JobState::InProgress)
            && !it.job_has_work(job)
        {
            self.finish_job(now, name, job, JobState::Succeeded);
            self.on_job_succeeded(now, name, job);
        }
    }

    fn finish_job(&mut self, now: Duration, name: &str, job: u64, state: JobState) {
        if let Some(j) = self.item_mut(name).jobs.get_mut(&job) {
            j.finish(now, state);
        }
    }

    fn cancel_jobs(&mut self, now: Duration, name: &str, kinds: &[JobKind], why: &str) {
        let ids: Vec<u64> = self
            .item(name)
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal() && kinds.contains(&j.kind))
            .map(|j| j.id.n)
            .collect();
        for id in ids {
            let it = self.item_mut(name);
            if let Some(j) = it.jobs.get_mut(&id) {
                j.errors.push(why.to_owned());
                j.finish(now, JobState::Cancelled);
            }
            let front = it.queue.front().cloned();
            it.queue.retain(|s| s.job != Some(id));
            if front.is_some_and(|f| f.job == Some(id)) {
                // The step waiting for a retry is gone: so is its retry.
                it.clear_failure();
            }
        }
    }

    /// Drops queued delta-cycle steps and cancels requested cycles (a resync or failover
    /// supersedes them); keeps clean-up steps (discarding logs, deleting points,
    /// restarting the source).
    fn drop_cycle_steps(&mut self, now: Duration, name: &str) {
        self.cancel_jobs(now, name, &[JobKind::Replicate], "superseded");
        let it = self.item_mut(name);
        let front = it.queue.front().cloned();
        it.queue.retain(|s| !s.is_cycle_step());
        if front.is_some_and(|f| f.is_cycle_step()) {
            // The step a retry (or an administrator) waited for is gone.
            it.clear_failure();
        }
    }

    /// Another driver acts for the item: the logs its old driver shipped and did not apply
    /// are gone, with the cycles that would have applied them.
    fn take_over(&mut self, now: Duration, name: &str) {
        self.requeue_in_flight(name);
        self.drop_cycle_steps(now, name);
        let it = self.item_mut(name);
        if it.state == ProtectionState::Protected && it.cycle_due.is_none() {
            // The dropped cycle would have scheduled the next one.
            it.cycle_due = Some(now + it.policy.copy_frequency.interval());
        }
        if std::mem::take(&mut it.applying) {
            // Part of a cycle may have landed and the rest of its logs are lost: no later
            // log can make the replica whole again.
            it.replica_broken = true;
            if it.state == ProtectionState::Protected {
                self.require_resync(now, name, ResyncReason::LogsLost);
            }
        }
    }

    /// Queues the disks of `point` as the failover disks and the machine's start on them.
    fn fail_over_to(&mut self, name: &str, job: u64, point: PointId) {
        self.item_mut(name).failover_point = Some(point);
        self.enqueue(
            name,
            job,
            ActionKind::MaterializeDisks {
                point,
                purpose: Purpose::Failover,
            },
        );
        self.enqueue(name, job, ActionKind::StartTarget { point });
    }

    fn resume_resync(&mut self, name: &str, job: u64) {
        let it = self.item_mut(name);
        it.state = ProtectionState::Resynchronizing;
        let critical = it.critical.is_some();
        if let Some(j) = it.jobs.get_mut(&job)
            && !critical
        {
            j.state = JobState::InProgress;
        }
    }

    fn cancel_resync(&mut self, now: Duration, name: &str) {
        self.cancel_jobs(
            now,
            name,
            &[JobKind::Resynchronize],
            "cancelled by CancelResync",
        );
        let it = self.item_mut(name);
        it.state = ProtectionState::ResyncRequired;
        it.resync_reason.get_or_insert(ResyncReason::Manual);
    }

    fn start_resync(&mut self, now: Duration, name: &str) -> u64 {
        self.item_mut(name).resync_at = None;
        let job = self.new_job(now, JobKind::Resynchronize, name);
        self.item_mut(name).state = ProtectionState::Resynchronizing;
        self.drop_cycle_steps(now, name);
        let cycle = self.new_cycle(name);
        self.enqueue_resync_pass(name, job, cycle);
        job
    }

    /// One resync pass: tracking restarts first (so writes during the compare are caught
    /// by new logs), every disk is compared, then the pass's own logs close as `cycle`.
    fn enqueue_resync_pass(&mut self, name: &str, job: u64, cycle: u64) {
        let disks = self.item(name).disks.len();
        self.enqueue(name, job, ActionKind::StartTracking);
        for disk in 0..disks {
            self.enqueue(name, job, ActionKind::ResyncDisk { disk });
        }
        self.enqueue(name, job, ActionKind::CloseLogs { cycle });
    }

    fn require_resync(&mut self, now: Duration, name: &str, reason: ResyncReason) {
        let it = self.item_mut(name);
        it.state = ProtectionState::ResyncRequired;
        it.resync_reason = Some(reason);
        it.cycle_due = None;
        if it.policy.auto_resync {
            match it.policy.resync_window {
                Some(w) if !w.contains(now) => it.resync_at = Some(w.next_open(now)),
                _ => {
                    self.start_resync(now, name);
                }
            }
        }
    }

    /// Emits the next step of `name` if nothing is in flight and nothing waits.
    fn pump(&mut self, name: &str, now: Duration) {
        let it = self.item_mut(name);
        if it.in_flight.is_some() || it.critical.is_some() || it.paused() {
            return;
        }
        if let Some(at) = it.retry_at {
            if now < at {
                return;
            }
            it.retry_at = None;
        }
        if let Some(at) = it.wait_until {
            if now < at {
                return;
            }
            it.wait_until = None;
        }
        if let Some(at) = it.resync_at
            && now >= at
        {
            it.resync_at = None;
            if it.state == ProtectionState::ResyncRequired {
                self.start_resync(now, name);
            }
        }
        let it = self.item_mut(name);
        if it.queue.is_empty()
            && it.state == ProtectionState::Protected
            && it.cycle_due.is_some_and(|due| due <= now)
        {
            // A cycle that starts a whole interval (or more) late missed those in between.
            let late = it.cycles_overdue(now);
            it.cycles_missed += late;
            it.cycles_due += 1 + late;
            it.cycle_due = None;
            let cycle = self.new_cycle(name);
            self.enqueue_free(name, ActionKind::CloseLogs { cycle });
        }
        let it = self.item_mut(name);
        let Some(step) = it.queue.pop_front() else {
            return;
        };
        if matches!(step.kind, ActionKind::ApplyLogs { .. }) {
            it.applying = true;
        }
        if let Some(j) = it.job_mut(step.job) {
            let task_name = task_name(&step.kind);
            if let Some(t) = j
                .tasks
                .iter_mut()
                .find(|t| t.name == task_name && !t.state.is_terminal())
            {
                t.state = JobState::InProgress;
            }
        }
        self.next_action += 1;
        let id = ActionId(self.next_action);
        self.ready.push_back(Action {
            id,
            item: name.to_owned(),
            job: step.job.map(|n| JobId::new(name, n)),
            kind: step.kind.clone(),
        });
        self.item_mut(name).in_flight = Some((id, step));
    }

    fn on_failed(&mut self, now: Duration, name: &str, step: Step, class: Class, message: String) {
        let what = format!("{}: {message}", task_name(&step.kind));
        let it = self.item_mut(name);
        if it.job_mut(step.job).is_some_and(|j| j.state.is_terminal()) {
            // The last action of a cancelled job: nothing to retry, nobody to alarm.
            return;
        }
        if let Some(j) = it.job_mut(step.job) {
            j.errors.push(what.clone());
        }
        it.queue.push_front(step.clone());
        match it.retrier.next_delay(now, &class) {
            Decision::Retry { at, .. } => {
                it.retry_at = Some(at);
                it.retrying = Some(what);
            }
            Decision::Stop(_) => {
                // Non-recoverable (or out of budget): Critical until an administrator acts.
                it.critical = Some(what);
                it.retrying = None;
                if let Some(j) = it.job_mut(step.job) {
                    j.state = JobState::Suspended;
                }
            }
        }
    }

    fn on_done(&mut self, now: Duration, name: &str, step: Step, logs: Vec<LogReport>) {
        let it = self.item_mut(name);
        it.retrier.succeeded();
        it.retrying = None;
        let job_kind = it.job_mut(step.job).map(|j| (j.kind, j.state));
        if let Some((_, state)) = job_kind
            && state.is_terminal()
        {
            return; // a cancelled job's last action: nothing follows from it
        }
        if let Some(j) = it.job_mut(step.job) {
            let task_name = task_name(&step.kind);
            if let Some(t) = j
                .tasks
                .iter_mut()
                .find(|t| t.name == task_name && t.state == JobState::InProgress)
            {
                t.state = JobState::Succeeded;
            }
        }
        let free = step.job.is_none();
        match step.kind {
            ActionKind::StartTracking => {
                let it = self.item_mut(name);
                // Cycles closed before tracking restarted are discarded: the copy or
                // resync that follows covers their writes.
                it.closed.clear();
                if it.state == ProtectionState::EnablingProtection {
                    it.state = ProtectionState::InitialReplicationInProgress;
                    // Scheduled initial replication: tracking runs, copying waits.
                    it.wait_until = it.policy.initial_replication_at.filter(|at| *at > now);
                    self.next_copy(name, step.job);
                }
            }
            ActionKind::CopyDiskRange { disk, offset, len } => {
                let it = self.item_mut(name);
                it.copied[disk] = it.copied[disk].max(offset + len);
                let (done, total): (u64, u64) = (it.copied.iter().sum(), it.disks.iter().sum());
                if let Some(j) = it.job_mut(step.job) {
                    j.progress_permille = (done.saturating_mul(900) / total.max(1)) as u32;
                }
                self.next_copy(name, step.job);
            }
            ActionKind::CloseLogs { cycle } => {
                if free && self.item(name).state != ProtectionState::Protected {
                    return;
                }
                // What the replica will hold: the disks as a full copy (protection,
                // resync, reprotect) read them now, or as of the cycle's newest log; a
                // cycle without logs changes nothing since the last point.
                let full = job_kind.is_some_and(|(k, _)| {
                    matches!(
                        k,
                        JobKind::EnableProtection | JobKind::Resynchronize | JobKind::Reprotect
                    )
                });
                let it = self.item_mut(name);
                // A log that says when it was closed vouches for its disk up to then
                // (an empty one too: nothing was written); one that does not, for now.
                // No log at all: the replica holds what it held.
                let data_time = if full {
                    Some(now)
                } else {
                    logs.iter()
                        .filter_map(|l| l.closed_at.or((l.log_bytes > 0).then_some(now)))
                        .max()
                };
                let app = !logs.is_empty() && logs.iter().all(|l| l.app_consistent);
                if let Some(t) = data_time {
                    it.closed.insert(cycle, (t.min(now), app));
                }
                // Reports for disks the item does not have are the driver's mistake: ignored.
                let trigger = logs.iter().find_map(|l| {
                    let size = *self.item(name).disks.get(l.disk)?;
                    if !l.closed_cleanly {
                        Some(ResyncReason::LogNotClosedCleanly { disk: l.disk })
                    } else if !l.continues_chain {
                        Some(ResyncReason::LogChainBroken { disk: l.disk })
                    } else if !l.write_guid_matches {
                        Some(ResyncReason::OfflineChange { disk: l.disk })
                    } else if l.log_bytes.saturating_mul(2) >= size && l.log_bytes > 0 {
                        Some(ResyncReason::LogOverHalfDisk {
                            disk: l.disk,
                            log_bytes: l.log_bytes,
                            disk_bytes: size,
                        })
                    } else {
                        None
                    }
                });
                if trigger.is_some() {
                    // The cycle's logs are not applied.
                    self.item_mut(name).closed.remove(&cycle);
                }
                match trigger {
                    None => self.enqueue_for(name, step.job, ActionKind::ApplyLogs { cycle }),
                    Some(reason) if job_kind.is_some_and(|(k, _)| k == JobKind::Resynchronize) => {
                        // The resync's own logs need another pass: run it again after a
                        // back-off on the retry schedule, within the same job.
                        let j = step.job.expect("a job kind implies a job");
                        let it = self.item_mut(name);
                        if let Some(jb) = it.jobs.get_mut(&j) {
                            jb.errors.push(format!("resync required again: {reason}"));
                        }
                        self.enqueue_free(name, ActionKind::DiscardLogs { cycle });
                        let next = self.new_cycle(name);
                        self.enqueue_resync_pass(name, j, next);
                        let it = self.item_mut(name);
                        if let Decision::Retry { at, .. } =
                            it.retrier.next_delay(now, &Class::Recoverable)
                        {
                            it.retry_at = Some(at);
                            it.retrying = Some(format!("resync required again: {reason}"));
                        }
                        it.resync_reason = Some(reason);
                        return;
                    }
                    Some(reason) => {
                        self.enqueue_free(name, ActionKind::DiscardLogs { cycle });
                        if let Some(j) = step.job {
                            let it = self.item_mut(name);
                            if let Some(jb) = it.jobs.get_mut(&j) {
                                jb.errors.push(format!("resync required: {reason}"));
                                if jb.kind == JobKind::PlannedFailover {
                                    // Zero loss is impossible now: restart the source, then resync.
                                    self.enqueue_free(name, ActionKind::StartSource);
                                }
                            }
                            self.finish_job(now, name, j, JobState::Failed);
                            self.item_mut(name).queue.retain(|s| s.job != Some(j));
                        }
                        // Later cycles would apply on top of logs that were not applied.
                        self.drop_cycle_steps(now, name);
                        self.require_resync(now, name, reason);
                        return;
                    }
                }
            }
            ActionKind::ApplyLogs { cycle } => {
                let it = self.item_mut(name);
                it.applying = false;
                it.cycles_applied += 1;
                // Cycles closed before this one and not applied (their job was superseded,
                // say by a planned failover) were applied first.
                let later = it.closed.split_off(&(cycle + 1));
                let done = std::mem::replace(&mut it.closed, later);
                let newest = done.get(&cycle).copied();
                it.advance_replica(done.values().map(|(t, _)| *t).max());
                if it.state == ProtectionState::PlannedFailoverInitiated {
                    it.final_delta_applied = true;
                }
                if free && it.state != ProtectionState::Protected {
                    return;
                }
                let app = newest.is_some_and(|(_, app)| app);
                let point = self.new_point(name);
                self.enqueue_for(
                    name,
                    step.job,
                    ActionKind::CreateRecoveryPoint {
                        point,
                        app_consistent: app,
                    },
                );
            }
            ActionKind::ProcessPendingLogs => {
                // Every closed cycle was applied.
                let it = self.item_mut(name);
                let done = std::mem::take(&mut it.closed);
                it.advance_replica(done.values().map(|(t, _)| *t).max());
            }
            ActionKind::DiscardLogs { .. } | ActionKind::ResyncDisk { .. } => {}
            ActionKind::CreateRecoveryPoint {
                point,
                app_consistent,
            } => {
                let it = self.item_mut(name);
                // The point holds the source as the replica does: as it was when the
                // newest cycle applied closed.
                let time = it
                    .replica_time
                    .unwrap_or(now)
                    .max(it.points.last().map_or(Duration::ZERO, |p| p.time));
                it.points.push(RecoveryPoint {
                    id: point,
                    time,
                    app_consistent,
                });
                it.last_success = Some(now);
                if it.state == ProtectionState::Protected {
                    it.cycle_due = Some(now + it.policy.copy_frequency.interval());
                    self.prune(now, name);
                }
                if let Some((kind, _)) = job_kind
                    && matches!(kind, JobKind::PlannedFailover | JobKind::UnplannedFailover)
                    && let Some(j) = step.job
                {
                    self.fail_over_to(name, j, point);
                }
            }
            ActionKind::DeleteRecoveryPoint { point } => {
                self.item_mut(name).points.retain(|p| p.id != point);
            }
            ActionKind::ProtectSourceDisks { .. } => self.item_mut(name).protective_snapshot = true,
            ActionKind::RestoreSourceDisks | ActionKind::DeleteProtectiveSnapshot => {
                self.item_mut(name).protective_snapshot = false;
            }
            ActionKind::SyncBack { .. }
            | ActionKind::MaterializeDisks { .. }
            | ActionKind::DeleteTestDisks
            | ActionKind::StopTracking
            | ActionKind::DeleteReplica
            | ActionKind::ShutDownSource
            | ActionKind::StartSource
            | ActionKind::StartTarget { .. }
            | ActionKind::StopTarget
            | ActionKind::RunHook { .. } => {}
        }
        if let Some(j) = step.job {
            self.complete_empty_job(now, name, j);
        }
    }

    fn next_copy(&mut self, name: &str, job: Option<u64>) {
        let it = self.item(name);
        let next = (0..it.disks.len()).find(|&d| it.copied[d] < it.disks[d]);
        let kind = match next {
            Some(disk) => ActionKind::CopyDiskRange {
                disk,
                offset: it.copied[disk],
                len: it.policy.copy_chunk.min(it.disks[disk] - it.copied[disk]),
            },
            None => {
                let cycle = self.new_cycle(name);
                ActionKind::CloseLogs { cycle }
            }
        };
        self.enqueue_for(name, job, kind);
    }

    /// Deletes points past retention, always keeping the newest and the failover point.
    fn prune(&mut self, now: Duration, name: &str) {
        let it = self.item(name);
        let cutoff = now.saturating_sub(it.policy.retention);
        let newest = it.points.last().map(|p| p.id);
        let queued: Vec<PointId> = it
            .queue
            .iter()
            .filter_map(|s| match s.kind {
                ActionKind::DeleteRecoveryPoint { point } => Some(point),
                _ => None,
            })
            .collect();
        let old: Vec<PointId> = it
            .points
            .iter()
            .filter(|p| {
                p.time < cutoff
                    && Some(p.id) != newest
                    && Some(p.id) != it.failover_point
                    && !queued.contains(&p.id)
            })
            .map(|p| p.id)
            .collect();
        for point in old {
            self.enqueue_free(name, ActionKind::DeleteRecoveryPoint { point });
        }
    }

    fn on_job_succeeded(&mut self, now: Duration, name: &str, job: u64) {
        use ProtectionState as S;
        let it = self.item_mut(name);
        let Some(kind) = it.jobs.get(&job).map(|j| j.kind) else {
            return;
        };
        match kind {
            JobKind::EnableProtection | JobKind::Resynchronize => {
                it.state = S::Protected;
                it.resync_reason = None;
                it.replica_broken = false;
                it.cycle_due = Some(now + it.policy.copy_frequency.interval());
                self.prune(now, name);
            }
            JobKind::TestFailover => it.test = TestFailoverState::TestFailoverCompleted,
            JobKind::TestFailoverCleanup => it.test = TestFailoverState::None,
            JobKind::PlannedFailover => it.state = S::PlannedFailoverCompleted,
            JobKind::UnplannedFailover => it.state = S::UnplannedFailoverCompleted,
            JobKind::Commit => it.state = S::FailoverCommitted,
            JobKind::CancelFailover => {
                it.state = S::Protected;
                it.failover_point = None;
                it.cycle_due = Some(now);
                if it.replica_broken {
                    let reason = it.resync_reason.clone().unwrap_or(ResyncReason::LogsLost);
                    self.require_resync(now, name, reason);
                }
            }
            JobKind::RepairReplication
            | JobKind::ChangePolicy
            | JobKind::RecoveryPlan
            | JobKind::ChangeRecoveryPoint
            | JobKind::TakeOver
            | JobKind::Replicate => {}
            JobKind::Failback => it.state = S::FailbackCompleted,
            JobKind::CompleteFailback => it.state = S::FailbackCommitted,
            JobKind::DisableProtection => {
                it.state = S::ProtectionDisabled;
                it.cycle_due = None;
            }
            JobKind::CancelFailback => it.state = S::FailoverCommitted,
            JobKind::Reprotect => {
                // Replicating again: the old recovery-site points describe the machine
                // before it failed back; new cycles make new ones.
                it.state = S::Protected;
                it.resync_reason = None;
                it.replica_broken = false;
                it.failover_point = None;
                it.cycle_due = Some(now + it.policy.copy_frequency.interval());
                self.prune(now, name);
            }
        }
    }

    /// Points with a delete queued or in flight: no longer choosable.
    fn deleting(&self, name: &str) -> Vec<PointId> {
        let it = self.item(name);
        it.queue
            .iter()
            .chain(it.in_flight.as_ref().map(|(_, s)| s))
            .filter_map(|s| match s.kind {
                ActionKind::DeleteRecoveryPoint { point } => Some(point),
                _ => None,
            })
            .collect()
    }

    fn choose(&self, name: &str, choice: PointChoice) -> Result<PointId, OpError> {
        let deleting = self.deleting(name);
        let live: Vec<&RecoveryPoint> = self
            .item(name)
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
            item: name.to_owned(),
            choice,
        })
    }
}

impl Step {
    /// A delta cycle's own step (a resync or failover supersedes it).
    fn is_cycle_step(&self) -> bool {
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
    fn clear_failure(&mut self) {
        self.retry_at = None;
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

    /// Ends the job in `state` at `now`; its unfinished tasks end with it.
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

/// The age of the newest point's data (or of the last successful cycle, before any).
fn rpo(it: &Item, now: Duration) -> Option<Duration> {
    let last = it.points.last().map(|p| p.time).or(it.last_success)?;
    Some(now.saturating_sub(last))
}

fn status_of(it: &Item, now: Duration) -> ItemStatus {
    let (health, causes) = health(it, now);
    ItemStatus {
        state: it.state,
        test_failover: it.test,
        health,
        causes,
        points: it.points.clone(),
        initial_copy: it
            .copied
            .iter()
            .copied()
            .zip(it.disks.iter().copied())
            .collect(),
        failover_point: it.failover_point,
        cycles_applied: it.cycles_applied,
        rpo: rpo(it, now),
        last_cycle: it.last_success,
        next_cycle: (it.state == ProtectionState::Protected)
            .then_some(it.cycle_due)
            .flatten(),
        retry_at: it.retry_at,
    }
}

fn health(it: &Item, now: Duration) -> (Health, Vec<HealthCause>) {
    use ProtectionState as S;
    let mut causes = Vec::new();
    let mut h = Health::Normal;
    if let Some(m) = &it.critical {
        causes.push(HealthCause::NonRecoverableError { message: m.clone() });
        h = Health::Critical;
    }
    if it.state == S::ResyncPaused {
        causes.push(HealthCause::ResyncPaused);
    }
    if let Some(r) = &it.resync_reason
        && matches!(
            it.state,
            S::ResyncRequired | S::Resynchronizing | S::ResyncPaused
        )
    {
        causes.push(HealthCause::ResyncRequired(r.clone()));
        h = h.max(if it.state == S::ResyncRequired {
            Health::Critical
        } else {
            Health::Warning
        });
    }
    if let Some(m) = &it.retrying {
        causes.push(HealthCause::Retrying {
            message: m.clone(),
            retries: it.retrier.retries(),
        });
        h = h.max(Health::Warning);
    }
    if matches!(
        it.state,
        S::EnablingProtection | S::InitialReplicationInProgress
    ) {
        causes.push(HealthCause::InitialReplicationIncomplete);
        h = h.max(Health::Warning);
    }
    // The recovery point objective is the age of the newest point's data: a cycle that
    // brought no logs does not make the replica any fresher.
    if it.state == S::Protected
        && let Some(age) = rpo(it, now)
        && age > it.policy.rpo_warning
    {
        causes.push(HealthCause::RpoExceeded { since: age });
        let critical = it.policy.rpo_critical.is_some_and(|c| age > c);
        h = h.max(if critical {
            Health::Critical
        } else {
            Health::Warning
        });
    }
    if matches!(
        it.state,
        S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted
    ) {
        causes.push(HealthCause::FailoverNotCommitted);
        h = h.max(Health::Warning);
    }
    if it.state == S::Protected {
        // Cycles overdue right now count as missed too.
        let overdue = it.cycles_overdue(now);
        let (missed, due) = (it.cycles_missed + overdue, it.cycles_due + overdue);
        if due > 0 && missed * 100 > due * u64::from(it.policy.missed_cycles_warning_percent) {
            causes.push(HealthCause::MissedCycles { missed, due });
            h = h.max(Health::Warning);
        }
    }
    (h, causes)
}

#[doc(hidden)]
impl Coordinator {
    /// Checks the invariants the crate documents; returns the first broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        use ProtectionState as S;
        for (name, it) in &self.items {
            let failovers = it
                .jobs
                .values()
                .filter(|j| !j.state.is_terminal())
                .filter(|j| {
                    matches!(
                        j.kind,
                        JobKind::PlannedFailover | JobKind::UnplannedFailover
                    )
                })
                .count();
            if failovers > 1 {
                return Err(format!("{name}: {failovers} failovers in progress"));
            }
            if it.state == S::FailoverCommitted
                && (it.points.len() != 1 || Some(it.points[0].id) != it.failover_point)
            {
                return Err(format!("{name}: committed with points {:?}", it.points));
            }
            if it.state == S::PlannedFailoverCompleted && !it.final_delta_applied {
                return Err(format!(
                    "{name}: planned failover completed without the final delta"
                ));
            }
            if it
                .points
                .windows(2)
                .any(|w| w[0].id >= w[1].id || w[0].time > w[1].time)
            {
                return Err(format!("{name}: points out of order {:?}", it.points));
            }
            let syncing = it
                .in_flight
                .as_ref()
                .is_some_and(|(_, s)| matches!(s.kind, ActionKind::SyncBack { .. }));
            if syncing && !it.protective_snapshot {
                return Err(format!(
                    "{name}: syncing back without a protective snapshot"
                ));
            }
            if it.state == S::FailbackCompleted && !it.protective_snapshot {
                return Err(format!(
                    "{name}: failback awaiting completion without its protective snapshot"
                ));
            }
            if it.copied.iter().zip(&it.disks).any(|(c, d)| c > d) {
                return Err(format!("{name}: copied past a disk's end"));
            }
        }
        for p in self.plans.values() {
            for j in p.jobs.values().filter(|j| !j.state.is_terminal()) {
                if !self.plan_job_alive(j) {
                    return Err(format!("plan job {} is stuck", j.id));
                }
            }
        }
        for it in self.items.values() {
            for j in it.jobs.values().filter(|j| !j.state.is_terminal()) {
                let resumable = j.state == JobState::Suspended
                    && (it.critical.is_some() || (it.paused() && j.kind == JobKind::Resynchronize));
                if !(it.job_has_work(j.id.n) || resumable) {
                    return Err(format!(
                        "job {} ({:?}) is stuck: neither terminal, working nor resumable",
                        j.id, j.kind
                    ));
                }
            }
        }
        Ok(())
    }
}
