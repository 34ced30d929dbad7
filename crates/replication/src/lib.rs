/*!
The brain of Lifeboat: a sans-IO state machine that decides, for every protected machine,
what to copy, ship, apply, resync, snapshot, fail over and delete, and keeps the jobs view.

It performs no I/O and reads no clock: commands, action outcomes and the current time go
in through `handle_*`; actions come out of [`Coordinator::poll_action`] and the next
deadline out of [`Coordinator::poll_timeout`]. Its state is serialisable (serde), so a
restarted agent resumes exactly where it stopped.

# Overview

- [`Coordinator`]: every protected item, its [`ProtectionState`], test-failover state,
  recovery points, health, retries (the `lifeboat-retry` schedule; non-recoverable errors
  make the item Critical until [`Command::RepairReplication`]) and its [`Job`]s.
- [`Command`]s: enable protection, resync (pause, resume, cancel), test failover and
  cleanup, planned and unplanned failover (latest, latest processed, latest app-consistent,
  or a chosen point), change recovery point, commit, cancel, failback (protective snapshot
  first; complete or cancel), reprotect, repair.
- Recovery plans ([`RecoveryPlan`], [`Command::StartPlan`]): ordered groups, the
  items of a group failing over in parallel, group N+1 after group N; pre/post actions per
  group, manual (the plan's job is suspended until [`Command::ResumePlan`]) or
  scripted ([`ActionKind::RunHook`]), scoped to test, planned or unplanned failover.
- Jobs: every operation (and every plan run) is a [`Job`] with ordered tasks, state,
  progress and errors; [`Coordinator::allowed_actions`] says whether it can be cancelled,
  restarted or resumed ([`Command::CancelJob`], [`Command::RestartJob`],
  [`Command::ResumeJob`]). Every operation, an item's, a plan's or a job action, goes in
  through [`Coordinator::handle_command`].
- Records: each item's whole state, its jobs and points included, is an [`ItemRecord`] a
  driver can persist on its own and load into any coordinator
  ([`Coordinator::item_record`], [`Coordinator::insert_item`],
  [`Coordinator::remove_item`]); plans likewise ([`PlanRecord`]). Job ids name their item
  (`vm1#3`), so drivers that each hold some items never give out the same id.
  [`Command::TakeOver`] tells an item that another driver acts for it now: logs its old
  driver shipped and did not apply are gone.
- [`Action`]s the driver performs and answers with an [`Outcome`]: copy a disk range, close /
  apply / discard logs, resync a disk, create / delete recovery points, materialise disks,
  shut down or start machines. Each is idempotent.

# Rules

- Resync is required when a closed log holds at least half of its disk, when a log was not
  closed cleanly, or when the disk changed while tracking was off; with `auto_resync` it
  starts at once. Recovery points are not pruned during a resync, so the last good point
  survives until the resynced replica has produced a new one.
- Planned and test failover are refused during resync; unplanned failover is allowed and
  cancels it.
- Health is Warning when more than the policy's share of delta cycles (20 %) was missed,
  when no cycle succeeded within the RPO warning, while a resync runs or is paused, while
  initial replication or an uncommitted failover is pending; Critical on a non-recoverable
  error or a required resync. Planned failover applies a final delta after shutting the source down (zero
  loss) or fails (and restarts the source) if that delta requires a resync.
- An unplanned failover to the latest point applies what was shipped and makes a new point
  only from a replica that holds whole cycles: during a resync, or after a take-over cut a
  cycle short (the item is then resync-required), it uses the newest recovery point.

# Invariants

Checked after every step by the property tests and the fuzz target
([`Coordinator::check_invariants`]):
1. at most one failover job in progress per item;
2. a committed failover keeps exactly one recovery point, the one it used;
3. a planned failover completes only after its final delta was applied;
4. recovery points are in creation order; initial copies never pass a disk's end;
5. every job is terminal, has work queued or in flight, or is suspended on a Critical
   item that [`Command::RepairReplication`] resumes or on a paused resync; a plan's job is
   terminal, waits for a manual action, has a hook in flight or item failovers running;
6. a failback never syncs onto the on-premises disks, nor waits for completion, without
   its protective snapshot.

An operation not allowed in the item's state is refused with [`OpError::NotAllowed`],
which names the state.

# Example

```
use std::time::Duration;
use lifeboat_replication::*;

let mut c = Coordinator::new();
let mut now = Duration::ZERO;
let policy = ReplicationPolicy { copy_chunk: 1 << 20, ..ReplicationPolicy::default() };
c.handle_command(now, Command::EnableProtection { item: "vm1".into(), disks: vec![2 << 20], policy })?;

// A driver: perform each action, report success (logs are small and clean).
let drive = |c: &mut Coordinator, now: Duration| {
    while let Some(a) = c.poll_action() {
        let outcome = match a.kind {
            ActionKind::CloseLogs { .. } => Outcome::Logs(vec![LogReport::clean(0, 4096)]),
            _ => Outcome::Done,
        };
        c.handle_outcome(now, a.id, outcome).unwrap();
    }
};
drive(&mut c, now);
assert_eq!(c.status("vm1", now).unwrap().state, ProtectionState::Protected);

// Two delta cycles, each a crash-consistent recovery point.
for _ in 0..2 {
    now = c.poll_timeout().unwrap();
    c.handle_timeout(now);
    drive(&mut c, now);
}
assert_eq!(c.status("vm1", now).unwrap().points.len(), 3);

// Planned failover (zero loss), then commit: one recovery point remains.
c.handle_command(now, Command::PlannedFailover { item: "vm1".into() })?;
drive(&mut c, now);
c.handle_command(now, Command::Commit { item: "vm1".into() })?;
drive(&mut c, now);
let s = c.status("vm1", now).unwrap();
assert_eq!((s.state, s.points.len()), (ProtectionState::FailoverCommitted, 1));
c.check_invariants().unwrap();
# Ok::<(), OpError>(())
```

# Crate features

- `fuzzing` (off by default): the model checks and input builders the fuzz targets share
  with the property tests (not a stable API).
*/
#![doc(test(attr(deny(warnings))))]

pub use crate::{
    coordinator::{Coordinator, ItemRecord, ItemStatus},
    display::span,
    error::OpError,
    jobs::allowed_actions,
    plan::PlanRecord,
};
// The vocabulary: items and their policy, states and health, points, actions and
// outcomes, commands, jobs, recovery plans.
pub use crate::model::{
    Action, ActionId, ActionKind, Command, CopyFrequency, Health, HealthCause, ItemId, Job,
    JobAction, JobId, JobKind, JobState, LogReport, Outcome, PlanAction, PlanActionKind,
    PlanFailover, PlanGroup, PlanScope, PointChoice, PointId, ProtectionState, Purpose,
    RecoveryPlan, RecoveryPoint, ReplicationPolicy, ResyncReason, ResyncWindow, Task,
    TestFailoverState,
};

mod coordinator;
mod display;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod jobs;
mod model;
mod plan;

#[cfg(test)]
mod tests;
