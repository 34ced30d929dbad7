//! Time: when an item's next step may go out (retries, scheduled initial replication,
//! delta cycles, resync windows), and the resync and take-over transitions self drives.

use std::time::Duration;

use crate::model::*;

use super::item::{Item, Step};

impl Item {
    /// The step that may go out at `now`, taken off the queue (its task marked started):
    /// none while a step is in flight, the item is Critical or its resync paused, or a
    /// retry, scheduled initial replication or resync window waits. A delta cycle that
    /// is due is queued first.
    pub(super) fn next_step(&mut self, now: Duration) -> Option<Step> {
        if self.in_flight.is_some() || self.critical.is_some() || self.paused() {
            return None;
        }
        if !self.retrier.ready(now) {
            return None;
        }
        if let Some(at) = self.wait_until {
            if now < at {
                return None;
            }
            self.wait_until = None;
        }
        if let Some(at) = self.resync_at
            && now >= at
        {
            self.resync_at = None;
            if self.state == ProtectionState::ResyncRequired {
                self.start_resync(now);
            }
        }
        if self.queue.is_empty()
            && self.state == ProtectionState::Protected
            && self.cycle_due.is_some_and(|due| due <= now)
        {
            // A cycle that starts a whole interval (or more) late missed those in between.
            let late = self.cycles_overdue(now);
            self.cycles_missed += late;
            self.cycles_due += 1 + late;
            self.cycle_due = None;
            let cycle = self.new_cycle();
            self.enqueue_free(ActionKind::CloseLogs { cycle });
        }
        let step = self.queue.pop_front()?;
        if matches!(step.kind, ActionKind::ApplyLogs { .. }) {
            self.applying = true;
        }
        self.set_task(&step, JobState::InProgress);
        Some(step)
    }

    /// When the item next wants to be woken: a retry, scheduled initial replication, a
    /// delta cycle or a resync window (none while self waits for something else).
    pub(super) fn wake_at(&self) -> Option<Duration> {
        if self.in_flight.is_some() || self.critical.is_some() || self.paused() {
            return None;
        }
        self.retrier.poll_timeout().or(self.wait_until).or_else(|| {
            let cycle = (self.state == ProtectionState::Protected && self.queue.is_empty())
                .then_some(self.cycle_due)
                .flatten();
            let resync = (self.state == ProtectionState::ResyncRequired)
                .then_some(self.resync_at)
                .flatten();
            cycle.or(resync)
        })
    }

    /// An administrator's "now": a scheduled retry and the next delta cycle are due at
    /// `now` (scheduled initial replication and a resync window stay).
    pub(super) fn expedite(&mut self, now: Duration) {
        self.retrier.expedite(now);
        if self.cycle_due.is_some_and(|t| t > now) {
            self.cycle_due = Some(now);
        }
    }

    /// Another driver acts for the item: the logs its old driver shipped and did not apply
    /// are gone, with the cycles that would have applied them.
    pub(super) fn take_over(&mut self, now: Duration) {
        self.requeue_in_flight();
        self.drop_cycle_steps(now);
        if self.state == ProtectionState::Protected && self.cycle_due.is_none() {
            // The dropped cycle would have scheduled the next one.
            self.cycle_due = Some(now + self.policy.copy_frequency.interval());
        }
        if std::mem::take(&mut self.applying) {
            // Part of a cycle may have landed and the rest of its logs are lost: no later
            // log can make the replica whole again.
            self.replica_broken = true;
            if self.state == ProtectionState::Protected {
                self.require_resync(now, ResyncReason::LogsLost);
            }
        }
    }

    /// A paused resync goes on (its job stays suspended while the item is Critical).
    pub(super) fn resume_resync(&mut self, job: u64) {
        self.state = ProtectionState::Resynchronizing;
        let critical = self.critical.is_some();
        if let Some(j) = self.jobs.get_mut(&job)
            && !critical
        {
            j.state = JobState::InProgress;
        }
    }

    /// The resync stops; the item is resync-required again.
    pub(super) fn cancel_resync(&mut self, now: Duration) {
        self.cancel_jobs(now, &[JobKind::Resynchronize], "cancelled by CancelResync");
        self.state = ProtectionState::ResyncRequired;
        self.resync_reason.get_or_insert(ResyncReason::Manual);
    }

    /// A resync job starts: queued delta cycles are dropped, one pass is queued.
    pub(super) fn start_resync(&mut self, now: Duration) -> u64 {
        self.resync_at = None;
        let job = self.new_job(now, JobKind::Resynchronize);
        self.state = ProtectionState::Resynchronizing;
        self.drop_cycle_steps(now);
        let cycle = self.new_cycle();
        self.enqueue_resync_pass(job, cycle);
        job
    }

    /// One resync pass: tracking restarts first (so writes during the compare are caught
    /// by new logs), every disk is compared, then the pass's own logs close as `cycle`.
    pub(super) fn enqueue_resync_pass(&mut self, job: u64, cycle: u64) {
        let disks = self.disks.len();
        self.enqueue(job, ActionKind::StartTracking);
        for disk in 0..disks {
            self.enqueue(job, ActionKind::ResyncDisk { disk });
        }
        self.enqueue(job, ActionKind::CloseLogs { cycle });
    }

    /// The replica cannot continue from logs: resync-required for `reason`, started at
    /// once (or when the window opens) under an automatic-resync policy.
    pub(super) fn require_resync(&mut self, now: Duration, reason: ResyncReason) {
        self.state = ProtectionState::ResyncRequired;
        self.resync_reason = Some(reason);
        self.cycle_due = None;
        if self.policy.auto_resync {
            match self.policy.resync_window {
                Some(w) if !w.contains(now) => self.resync_at = Some(w.next_open(now)),
                _ => {
                    self.start_resync(now);
                }
            }
        }
    }
}
