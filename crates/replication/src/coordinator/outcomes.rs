//! What follows from an action's outcome: the next step, a recovery point, a retry, a
//! required resync, the end of a job.

use std::time::Duration;

use lifeboat_retry::{Class, Decision};

use crate::model::*;

use super::item::{Item, Step};

/// What a successful action reported besides success.
#[derive(Debug, Default)]
pub(crate) struct Done {
    /// The logs a `CloseLogs` closed.
    pub(crate) logs: Vec<LogReport>,
    /// How far a `CopyDiskRange` copied, if past its range ([`Outcome::CopiedThrough`]).
    pub(crate) through: u64,
}

impl Item {
    /// `step` failed: retried on the schedule (the item Warning), or, non-recoverable,
    /// the item Critical and the job suspended until repaired.
    pub(super) fn on_failed(&mut self, now: Duration, step: Step, class: Class, message: String) {
        let what = format!("{}: {message}", task_name(&step.kind));
        if self
            .job_mut(step.job)
            .is_some_and(|j| j.state.is_terminal())
        {
            // The last action of a cancelled job: nothing to retry, nobody to alarm.
            return;
        }
        if let Some(j) = self.job_mut(step.job) {
            j.errors.push(what.clone());
        }
        self.queue.push_front(step.clone());
        match self.retrier.next_delay(now, &class) {
            Decision::Retry { .. } => self.retrying = Some(what),
            Decision::Stop(_) => {
                // Non-recoverable (or out of budget): Critical until an administrator acts.
                self.critical = Some(what);
                self.retrying = None;
                if let Some(j) = self.job_mut(step.job) {
                    j.state = JobState::Suspended;
                }
            }
        }
    }

    /// `step` succeeded (with what it reported): what follows.
    pub(super) fn on_done(&mut self, now: Duration, step: Step, done: Done) {
        let Done { logs, through } = done;
        self.retrier.succeeded();
        self.retrying = None;
        let job_kind = self.job_mut(step.job).map(|j| (j.kind, j.state));
        if let Some((_, state)) = job_kind
            && state.is_terminal()
        {
            return; // a cancelled job's last action: nothing follows from self
        }
        self.set_task(&step, JobState::Succeeded);
        let free = step.job.is_none();
        match step.kind {
            ActionKind::StartTracking => {
                // Cycles closed before tracking restarted are discarded: the copy or
                // resync that follows covers their writes.
                self.closed.clear();
                if self.state == ProtectionState::EnablingProtection {
                    self.state = ProtectionState::InitialReplicationInProgress;
                    // Scheduled initial replication: tracking runs, copying waits.
                    self.wait_until = self.policy.initial_replication_at.filter(|at| *at > now);
                    self.next_copy(step.job);
                }
            }
            ActionKind::CopyDiskRange { disk, offset, len } => {
                // Past the range too if the driver found nothing to copy there (never
                // past the disk).
                let end = (offset + len).max(through.min(self.disks[disk]));
                self.copied[disk] = self.copied[disk].max(end);
                let (done, total): (u64, u64) = (self.copied.iter().sum(), self.disks.iter().sum());
                if let Some(j) = self.job_mut(step.job) {
                    j.progress_permille = (done.saturating_mul(900) / total.max(1)) as u32;
                }
                self.next_copy(step.job);
            }
            ActionKind::CloseLogs { cycle } => {
                if free && self.state != ProtectionState::Protected {
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
                // A log that says when self was closed vouches for its disk up to then
                // (an empty one too: nothing was written); one that does not, for now.
                // No log at all: the replica holds what self held.
                let data_time = if full {
                    Some(now)
                } else {
                    logs.iter()
                        .filter_map(|l| l.closed_at.or((l.log_bytes > 0).then_some(now)))
                        .max()
                };
                let app = !logs.is_empty() && logs.iter().all(|l| l.app_consistent);
                if let Some(t) = data_time {
                    self.closed.insert(cycle, (t.min(now), app));
                }
                // Reports for disks the item does not have are the driver's mistake: ignored.
                let trigger = logs.iter().find_map(|l| {
                    let size = *self.disks.get(l.disk)?;
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
                    self.closed.remove(&cycle);
                }
                match trigger {
                    None => self.enqueue_for(step.job, ActionKind::ApplyLogs { cycle }),
                    Some(reason) if job_kind.is_some_and(|(k, _)| k == JobKind::Resynchronize) => {
                        // The resync's own logs need another pass: run self again after a
                        // back-off on the retry schedule, within the same job.
                        let j = step.job.expect("a job kind implies a job");
                        if let Some(jb) = self.jobs.get_mut(&j) {
                            jb.errors.push(format!("resync required again: {reason}"));
                        }
                        self.enqueue_free(ActionKind::DiscardLogs { cycle });
                        let next = self.new_cycle();
                        self.enqueue_resync_pass(j, next);
                        if let Decision::Retry { .. } =
                            self.retrier.next_delay(now, &Class::Recoverable)
                        {
                            self.retrying = Some(format!("resync required again: {reason}"));
                        }
                        self.resync_reason = Some(reason);
                        return;
                    }
                    Some(reason) => {
                        self.enqueue_free(ActionKind::DiscardLogs { cycle });
                        if let Some(j) = step.job {
                            if let Some(jb) = self.jobs.get_mut(&j) {
                                jb.errors.push(format!("resync required: {reason}"));
                                if jb.kind == JobKind::PlannedFailover {
                                    // Zero loss is impossible now: restart the source, then resync.
                                    self.enqueue_free(ActionKind::StartSource);
                                }
                            }
                            self.finish_job(now, j, JobState::Failed);
                            self.queue.retain(|s| s.job != Some(j));
                        }
                        // Later cycles would apply on top of logs that were not applied.
                        self.drop_cycle_steps(now);
                        self.require_resync(now, reason);
                        return;
                    }
                }
            }
            ActionKind::ApplyLogs { cycle } => {
                self.applying = false;
                self.cycles_applied += 1;
                // Cycles closed before this one and not applied (their job was superseded,
                // say by a planned failover) were applied first.
                let later = self.closed.split_off(&(cycle + 1));
                let done = std::mem::replace(&mut self.closed, later);
                let newest = done.get(&cycle).copied();
                self.advance_replica(done.values().map(|(t, _)| *t).max());
                if self.state == ProtectionState::PlannedFailoverInitiated {
                    self.final_delta_applied = true;
                }
                if free && self.state != ProtectionState::Protected {
                    return;
                }
                let app = newest.is_some_and(|(_, app)| app);
                let point = self.new_point();
                self.enqueue_for(
                    step.job,
                    ActionKind::CreateRecoveryPoint {
                        point,
                        app_consistent: app,
                    },
                );
            }
            ActionKind::ProcessPendingLogs => {
                // Every closed cycle was applied.
                let done = std::mem::take(&mut self.closed);
                self.advance_replica(done.values().map(|(t, _)| *t).max());
            }
            ActionKind::DiscardLogs { .. } | ActionKind::ResyncDisk { .. } => {}
            ActionKind::CreateRecoveryPoint {
                point,
                app_consistent,
            } => {
                // The point holds the source as the replica does: as self was when the
                // newest cycle applied closed.
                let time = self
                    .replica_time
                    .unwrap_or(now)
                    .max(self.points.last().map_or(Duration::ZERO, |p| p.time));
                self.points.push(RecoveryPoint {
                    id: point,
                    time,
                    app_consistent,
                });
                self.last_success = Some(now);
                if self.state == ProtectionState::Protected {
                    self.cycle_due = Some(now + self.policy.copy_frequency.interval());
                    self.prune(now);
                }
                if let Some((kind, _)) = job_kind
                    && matches!(kind, JobKind::PlannedFailover | JobKind::UnplannedFailover)
                    && let Some(j) = step.job
                {
                    self.fail_over_to(j, point);
                }
            }
            ActionKind::DeleteRecoveryPoint { point } => {
                self.points.retain(|p| p.id != point);
            }
            ActionKind::ProtectSourceDisks { .. } => self.protective_snapshot = true,
            ActionKind::RestoreSourceDisks | ActionKind::DeleteProtectiveSnapshot => {
                self.protective_snapshot = false;
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
            self.complete_empty_job(now, j);
        }
    }

    /// Queues the next range of initial replication, or, all copied, the closing of the
    /// logs tracked meanwhile.
    pub(super) fn next_copy(&mut self, job: Option<u64>) {
        let next = (0..self.disks.len()).find(|&d| self.copied[d] < self.disks[d]);
        let kind = match next {
            Some(disk) => ActionKind::CopyDiskRange {
                disk,
                offset: self.copied[disk],
                len: self
                    .policy
                    .copy_chunk
                    .min(self.disks[disk] - self.copied[disk]),
            },
            None => {
                let cycle = self.new_cycle();
                ActionKind::CloseLogs { cycle }
            }
        };
        self.enqueue_for(job, kind);
    }

    /// Deletes points past retention, always keeping the newest and the failover point.
    pub(super) fn prune(&mut self, now: Duration) {
        let cutoff = now.saturating_sub(self.policy.retention);
        let newest = self.points.last().map(|p| p.id);
        let queued: Vec<PointId> = self
            .queue
            .iter()
            .filter_map(|s| match s.kind {
                ActionKind::DeleteRecoveryPoint { point } => Some(point),
                _ => None,
            })
            .collect();
        let old: Vec<PointId> = self
            .points
            .iter()
            .filter(|p| {
                p.time < cutoff
                    && Some(p.id) != newest
                    && Some(p.id) != self.failover_point
                    && !queued.contains(&p.id)
            })
            .map(|p| p.id)
            .collect();
        for point in old {
            self.enqueue_free(ActionKind::DeleteRecoveryPoint { point });
        }
    }

    /// Job `job` succeeded: the state it leads to.
    pub(super) fn on_job_succeeded(&mut self, now: Duration, job: u64) {
        use ProtectionState as S;
        let Some(kind) = self.jobs.get(&job).map(|j| j.kind) else {
            return;
        };
        match kind {
            JobKind::EnableProtection | JobKind::Resynchronize => {
                self.state = S::Protected;
                self.resync_reason = None;
                self.replica_broken = false;
                self.cycle_due = Some(now + self.policy.copy_frequency.interval());
                self.prune(now);
            }
            JobKind::TestFailover => self.test = TestFailoverState::TestFailoverCompleted,
            JobKind::TestFailoverCleanup => self.test = TestFailoverState::None,
            JobKind::PlannedFailover => self.state = S::PlannedFailoverCompleted,
            JobKind::UnplannedFailover => self.state = S::UnplannedFailoverCompleted,
            JobKind::Commit => self.state = S::FailoverCommitted,
            JobKind::CancelFailover => {
                self.state = S::Protected;
                self.failover_point = None;
                self.cycle_due = Some(now);
                if self.replica_broken {
                    let reason = self.resync_reason.clone().unwrap_or(ResyncReason::LogsLost);
                    self.require_resync(now, reason);
                }
            }
            JobKind::RepairReplication
            | JobKind::ChangePolicy
            | JobKind::RecoveryPlan
            | JobKind::ChangeRecoveryPoint
            | JobKind::TakeOver
            | JobKind::Replicate => {}
            JobKind::Failback => self.state = S::FailbackCompleted,
            JobKind::CompleteFailback => self.state = S::FailbackCommitted,
            JobKind::DisableProtection => {
                self.state = S::ProtectionDisabled;
                self.cycle_due = None;
            }
            JobKind::CancelFailback => self.state = S::FailoverCommitted,
            JobKind::Reprotect => {
                // Replicating again: the old recovery-site points describe the machine
                // before self failed back; new cycles make new ones.
                self.state = S::Protected;
                self.resync_reason = None;
                self.replica_broken = false;
                self.failover_point = None;
                self.cycle_due = Some(now + self.policy.copy_frequency.interval());
                self.prune(now);
            }
        }
    }
}
