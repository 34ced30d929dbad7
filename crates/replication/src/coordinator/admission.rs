//! Admission: whether a command is allowed in the item's state, and the steps it queues.

use std::time::Duration;

use crate::error::OpError;
use crate::model::*;

use super::Coordinator;
use super::item::Item;

/// Retention in (0, 24 h] and a copy chunk: what every policy must have.
fn valid_policy(policy: &ReplicationPolicy) -> bool {
    !policy.retention.is_zero()
        && policy.retention <= Duration::from_secs(24 * 3600)
        && policy.copy_chunk > 0
}

/// The operation, as a refusal names it.
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
        Command::StartPlan { .. } => "Start plan",
        Command::ResumePlan { .. } => "Resume plan",
        Command::CancelJob { .. } => "Cancel job",
        Command::RestartJob { .. } => "Restart job",
        Command::ResumeJob { .. } => "Resume job",
    }
}

impl Coordinator {
    /// Admits `cmd` at `now`: its job number, its steps queued and the first one out.
    pub(super) fn admit(&mut self, now: Duration, cmd: Command) -> Result<u64, OpError> {
        let name = cmd.item().to_owned();
        let job = match &cmd {
            Command::EnableProtection { disks, policy, .. } => {
                if self.items.contains_key(&name) || self.plans.contains_key(&name) {
                    return Err(OpError::AlreadyProtected(name));
                }
                if disks.is_empty() || !valid_policy(policy) {
                    return Err(OpError::InvalidPolicy(
                        "at least one disk, retention in (0, 24 h], copy chunk > 0",
                    ));
                }
                let it = self.items.entry(name.clone()).or_insert(Item::new(
                    &name,
                    disks.clone(),
                    policy.clone(),
                ));
                let job = it.new_job(now, JobKind::EnableProtection);
                it.enqueue(job, ActionKind::StartTracking);
                job
            }
            _ => {
                // An item of a plan stays while the plan names it.
                let plan = self
                    .plans()
                    .find(|p| p.groups.iter().any(|g| g.items.contains(&name)))
                    .map(|p| p.name.clone());
                let it = self
                    .items
                    .get_mut(&name)
                    .ok_or_else(|| OpError::UnknownItem(name.clone()))?;
                it.admit(now, cmd, plan.as_deref())?
            }
        };
        self.pump(&name, now);
        self.item_mut(&name).complete_empty_job(now, job);
        Ok(job)
    }
}

impl Item {
    /// Admits `cmd` (any but `EnableProtection`) in the item's state; `plan` is the
    /// recovery plan naming the item, if one does.
    fn admit(&mut self, now: Duration, cmd: Command, plan: Option<&str>) -> Result<u64, OpError> {
        let name = self.name.clone();
        let op = op_name(&cmd);
        let state = self.state;
        let deny = |test: Option<TestFailoverState>| OpError::NotAllowed {
            op,
            item: name.clone(),
            state,
            test,
        };
        use ProtectionState as S;
        let job = match cmd {
            Command::EnableProtection { .. } => return Err(OpError::AlreadyProtected(name)),
            // Routed to their plan or job before an item sees them.
            Command::StartPlan { .. }
            | Command::ResumePlan { .. }
            | Command::CancelJob { .. }
            | Command::RestartJob { .. }
            | Command::ResumeJob { .. } => return Err(deny(None)),
            Command::Resync { .. } => {
                if !matches!(state, S::ResyncRequired | S::Protected) {
                    return Err(deny(None));
                }
                if state == S::Protected {
                    self.resync_reason = Some(ResyncReason::Manual);
                }
                self.start_resync(now)
            }
            Command::TestFailover { point, .. } => {
                if !matches!(state, S::Protected) {
                    return Err(deny(None));
                }
                if self.test != TestFailoverState::None {
                    return Err(deny(Some(self.test)));
                }
                let p = self.choose(point)?;
                let job = self.new_job(now, JobKind::TestFailover);
                self.test = TestFailoverState::TestFailoverInitiated;
                self.enqueue(
                    job,
                    ActionKind::MaterializeDisks {
                        point: p,
                        purpose: Purpose::Test,
                    },
                );
                job
            }
            Command::TestFailoverCleanup { .. } => {
                if self.test != TestFailoverState::TestFailoverCompleted {
                    return Err(deny(Some(self.test)));
                }
                let job = self.new_job(now, JobKind::TestFailoverCleanup);
                self.test = TestFailoverState::TestFailoverCleanupInitiated;
                self.enqueue(job, ActionKind::DeleteTestDisks);
                job
            }
            Command::PlannedFailover { .. } => {
                // Not during resync: the final delta could not make the replica complete.
                if state != S::Protected {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::PlannedFailover);
                self.state = S::PlannedFailoverInitiated;
                self.final_delta_applied = false;
                self.drop_cycle_steps(now);
                let cycle = self.new_cycle();
                self.enqueue(job, ActionKind::ShutDownSource);
                self.enqueue(job, ActionKind::CloseLogs { cycle });
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
                let replica_usable = state == S::Protected && !self.replica_broken;
                let chosen = match point {
                    PointChoice::Latest if replica_usable => None,
                    PointChoice::Latest => Some(self.choose(PointChoice::LatestProcessed)?),
                    other => Some(self.choose(other)?),
                };
                if chosen.is_none() && self.points.is_empty() {
                    return Err(OpError::NoRecoveryPoint {
                        item: name,
                        choice: point,
                    });
                }
                // Unplanned failover cancels a resync and stops delta cycles.
                self.cancel_jobs(
                    now,
                    &[JobKind::Resynchronize],
                    "cancelled by unplanned failover",
                );
                let job = self.new_job(now, JobKind::UnplannedFailover);
                self.state = S::UnplannedFailoverInitiated;
                // A replica part-way through a resync, or waiting for one, stays so: a
                // cancelled failover returns to the resync (the reason is kept).
                if state != S::Protected {
                    self.replica_broken = true;
                }
                self.drop_cycle_steps(now);
                match chosen {
                    Some(p) => self.fail_over_to(job, p),
                    None => {
                        self.enqueue(job, ActionKind::ProcessPendingLogs);
                        let point = self.new_point();
                        self.enqueue(
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
                // Not while a change of recovery point is under way: which point is
                // committed is only known once it ends.
                if !matches!(
                    state,
                    S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted
                ) {
                    return Err(deny(None));
                }
                if let Some(job) = self.changing_point() {
                    return Err(OpError::Busy {
                        op,
                        item: name.clone(),
                        job: job.clone(),
                        what: "change of recovery point",
                    });
                }
                let job = self.new_job(now, JobKind::Commit);
                self.state = S::CommitFailoverInProgress;
                let keep = self.failover_point;
                let others: Vec<PointId> = self
                    .points
                    .iter()
                    .map(|p| p.id)
                    .filter(|id| Some(*id) != keep)
                    .collect();
                for point in others {
                    self.enqueue(job, ActionKind::DeleteRecoveryPoint { point });
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
                let job = self.new_job(now, JobKind::CancelFailover);
                self.state = S::CancelFailoverInProgress;
                self.enqueue(job, ActionKind::StopTarget);
                if state == S::PlannedFailoverCompleted {
                    self.enqueue(job, ActionKind::StartSource);
                }
                job
            }
            Command::Failback {
                full, alternate, ..
            } => {
                if state != S::FailoverCommitted {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Failback);
                self.state = S::FailbackInProgress;
                self.enqueue(job, ActionKind::ProtectSourceDisks { alternate });
                self.enqueue(
                    job,
                    ActionKind::SyncBack {
                        full,
                        final_pass: false,
                    },
                );
                self.enqueue(job, ActionKind::StopTarget);
                self.enqueue(
                    job,
                    ActionKind::SyncBack {
                        full: false,
                        final_pass: true,
                    },
                );
                self.enqueue(job, ActionKind::StartSource);
                job
            }
            Command::CompleteFailback { .. } => {
                if state != S::FailbackCompleted {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::CompleteFailback);
                self.enqueue(job, ActionKind::DeleteProtectiveSnapshot);
                job
            }
            Command::CancelFailback { .. } => {
                // A failback starts from a committed failover, which kept its point.
                let (S::FailbackInProgress | S::FailbackCompleted, Some(point)) =
                    (state, self.failover_point)
                else {
                    return Err(deny(None));
                };
                self.cancel_jobs(now, &[JobKind::Failback], "cancelled by CancelFailback");
                let job = self.new_job(now, JobKind::CancelFailback);
                self.state = S::FailbackInProgress;
                // The source may be running on half-synced disks: stop it, restore, and
                // bring the recovered machine back.
                self.enqueue(job, ActionKind::ShutDownSource);
                if self.protective_snapshot {
                    self.enqueue(job, ActionKind::RestoreSourceDisks);
                }
                self.enqueue(job, ActionKind::StartTarget { point });
                job
            }
            Command::Reprotect { .. } => {
                if state != S::FailbackCommitted {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Reprotect);
                self.state = S::ReprotectInitiated;
                self.resync_reason = Some(ResyncReason::Manual);
                let disks = self.disks.len();
                self.enqueue(job, ActionKind::StartTracking);
                for disk in 0..disks {
                    self.enqueue(job, ActionKind::ResyncDisk { disk });
                }
                let cycle = self.new_cycle();
                self.enqueue(job, ActionKind::CloseLogs { cycle });
                job
            }
            Command::ChangeRecoveryPoint { point, .. } => {
                if !matches!(
                    state,
                    S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted
                ) {
                    return Err(deny(None));
                }
                let p = self.choose(point)?;
                let job = self.new_job(now, JobKind::ChangeRecoveryPoint);
                self.enqueue(job, ActionKind::StopTarget);
                self.fail_over_to(job, p);
                job
            }
            Command::PauseResync { .. } => {
                let Some(job) = self.resync_job().filter(|_| state == S::Resynchronizing) else {
                    return Err(deny(None));
                };
                // The resync job is suspended; its queued steps wait for ResumeResync.
                self.state = S::ResyncPaused;
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.state = JobState::Suspended;
                }
                job
            }
            Command::ResumeResync { .. } => {
                let Some(job) = self.resync_job().filter(|_| state == S::ResyncPaused) else {
                    return Err(deny(None));
                };
                self.resume_resync(job);
                job
            }
            Command::CancelResync { .. } => {
                let Some(job) = self
                    .resync_job()
                    .filter(|_| matches!(state, S::Resynchronizing | S::ResyncPaused))
                else {
                    return Err(deny(None));
                };
                self.cancel_resync(now);
                job
            }
            Command::RepairReplication { .. } => {
                if self.critical.is_none() {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::RepairReplication);
                self.critical = None;
                self.retrier.succeeded();
                let paused = self.paused();
                let suspended: Vec<u64> = self.queue.iter().filter_map(|s| s.job).collect();
                for j in suspended {
                    if let Some(jb) = self.jobs.get_mut(&j)
                        && jb.state == JobState::Suspended
                        && !(paused && jb.kind == JobKind::Resynchronize)
                    {
                        jb.state = JobState::InProgress;
                    }
                }
                self.finish_job(now, job, JobState::Succeeded);
                job
            }
            Command::ReplicateNow { .. } => {
                if state != S::Protected {
                    return Err(deny(None));
                }
                let job = self.new_job(now, JobKind::Replicate);
                let cycle = self.new_cycle();
                self.enqueue(job, ActionKind::CloseLogs { cycle });
                job
            }
            Command::TakeOver { .. } => {
                let job = self.new_job(now, JobKind::TakeOver);
                self.take_over(now);
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
                if self.test != TestFailoverState::None {
                    return Err(deny(Some(self.test)));
                }
                if let Some(plan) = plan {
                    return Err(OpError::InPlan {
                        item: name.clone(),
                        plan: plan.to_owned(),
                    });
                }
                // Nothing the item was doing carries on.
                self.cancel_jobs(
                    now,
                    &[JobKind::EnableProtection, JobKind::Resynchronize],
                    "cancelled by disable protection",
                );
                self.drop_cycle_steps(now);
                let job = self.new_job(now, JobKind::DisableProtection);
                self.state = S::DisablingProtection;
                self.clear_failure();
                self.wait_until = None;
                self.cycle_due = None;
                self.resync_at = None;
                self.closed.clear();
                let points: Vec<PointId> = self.points.iter().map(|p| p.id).collect();
                let queued = self.deleting();
                self.enqueue(job, ActionKind::StopTracking);
                if delete_replica {
                    for point in points.into_iter().filter(|p| !queued.contains(p)) {
                        self.enqueue(job, ActionKind::DeleteRecoveryPoint { point });
                    }
                    self.enqueue(job, ActionKind::DeleteReplica);
                }
                job
            }
            Command::ChangePolicy { policy, .. } => {
                if !valid_policy(&policy) {
                    return Err(OpError::InvalidPolicy(
                        "retention in (0, 24 h], copy chunk > 0",
                    ));
                }
                let job = self.new_job(now, JobKind::ChangePolicy);
                let interval = policy.copy_frequency.interval();
                self.cycle_due = self.cycle_due.map(|due| due.min(now + interval));
                self.policy = policy;
                self.prune(now);
                job
            }
        };
        Ok(job)
    }
}
