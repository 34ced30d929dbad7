//! The vocabulary: items, policies, states, health, recovery points, jobs, actions.

use std::time::Duration;

use lifeboat_retry::Class;
use serde::{Deserialize, Serialize};

/// A protected item's name (a machine).
pub type ItemId = String;

/// A recovery point's id, unique per coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PointId(pub u64);

/// A job's id: the item (or recovery plan) it belongs to and its number there, written
/// `ITEM#N`. Numbers are given out per item, so the items of different drivers (sites)
/// never take the same id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId {
    /// The item, or the recovery plan for a plan's job.
    pub item: ItemId,
    /// The job's number within the item, from 1.
    pub n: u64,
}

impl JobId {
    /// Job `n` of `item`.
    pub fn new(item: impl Into<ItemId>, n: u64) -> Self {
        JobId {
            item: item.into(),
            n,
        }
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.item, self.n)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;

    /// Parses `ITEM#N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (item, n) = s
            .rsplit_once('#')
            .ok_or_else(|| format!("{s:?} is not a job id (ITEM#N)"))?;
        let n = n
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not a job id (ITEM#N)"))?;
        if item.is_empty() {
            return Err(format!("{s:?} is not a job id (ITEM#N)"));
        }
        Ok(JobId::new(item, n))
    }
}

/// An action's id: report its outcome with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActionId(pub u64);

/// How often a delta cycle ships the change log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyFrequency {
    /// Every 30 seconds.
    Seconds30,
    /// Every 5 minutes (the default).
    Minutes5,
    /// Every 15 minutes.
    Minutes15,
}

impl CopyFrequency {
    /// The interval.
    pub fn interval(self) -> Duration {
        Duration::from_secs(match self {
            CopyFrequency::Seconds30 => 30,
            CopyFrequency::Minutes5 => 300,
            CopyFrequency::Minutes15 => 900,
        })
    }
}

/// A replication policy. [`Default`]: 5-minute copies, 24 h of recovery points, automatic
/// resync, the Hyper-V retry schedule. (A point is app-consistent when the driver reports
/// its cycle's logs closed at a quiesced snapshot: [`LogReport::app_consistent`].)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationPolicy {
    /// Delta cycle interval.
    pub copy_frequency: CopyFrequency,
    /// How long recovery points are kept (at most 24 h).
    pub retention: Duration,
    /// Start a resync by itself when one is required (otherwise wait for the command).
    pub auto_resync: bool,
    /// With `auto_resync`: start automatic resyncs only inside this daily window (Hyper-V's
    /// AutoResynchronizeIntervalStart/End); `None` for at once.
    #[serde(default)]
    pub resync_window: Option<ResyncWindow>,
    /// Start initial replication at this time instead of at once (the disks are tracked
    /// from enable protection on).
    #[serde(default)]
    pub initial_replication_at: Option<Duration>,
    /// Retries of recoverable failures.
    pub retry: lifeboat_retry::Policy,
    /// Bytes per initial-replication copy action (256 MiB by default). Each piece the
    /// replica does not already hold is a sync point of it where an engine applies it
    /// (fewer, larger pieces wait for the disk less often; a crash loses at most the
    /// piece in hand). The engine reads and sends a piece a few MiB at a time, so its
    /// size does not set the memory a copy holds, and reports progress as those land.
    pub copy_chunk: u64,
    /// Health turns Warning when the newest recovery point's data is older than this (the
    /// recovery point objective).
    pub rpo_warning: Duration,
    /// Health turns Critical when the newest recovery point's data is older than this.
    #[serde(default)]
    pub rpo_critical: Option<Duration>,
    /// Health turns Warning when more than this percentage of the delta cycles due were
    /// missed (Hyper-V Replica's rule: 20).
    #[serde(default = "default_missed_percent")]
    pub missed_cycles_warning_percent: u8,
}

fn default_missed_percent() -> u8 {
    20
}

impl Default for ReplicationPolicy {
    fn default() -> Self {
        ReplicationPolicy {
            copy_frequency: CopyFrequency::Minutes5,
            retention: Duration::from_secs(24 * 3600),
            auto_resync: true,
            resync_window: None,
            initial_replication_at: None,
            retry: lifeboat_retry::Policy::default(),
            copy_chunk: 256 << 20,
            rpo_warning: Duration::from_secs(3600),
            rpo_critical: None,
            missed_cycles_warning_percent: default_missed_percent(),
        }
    }
}

/// A daily window, as offsets from midnight of the coordinator's clock (which counts from a
/// midnight, e.g. the Unix epoch); `end` before `start` wraps past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncWindow {
    /// Opens at.
    pub start: Duration,
    /// Closes at.
    pub end: Duration,
}

const DAY: u64 = 24 * 3600;

impl ResyncWindow {
    /// Whether `now` is inside the window.
    pub fn contains(&self, now: Duration) -> bool {
        let t = now.as_secs() % DAY;
        let (s, e) = (self.start.as_secs() % DAY, self.end.as_secs() % DAY);
        if s <= e {
            s <= t && t < e
        } else {
            t >= s || t < e
        }
    }

    /// `now` if inside the window, else when it next opens.
    pub fn next_open(&self, now: Duration) -> Duration {
        if self.contains(now) {
            return now;
        }
        let t = now.as_secs() % DAY;
        let s = self.start.as_secs() % DAY;
        let wait = if s > t { s - t } else { DAY - t + s };
        Duration::from_secs(now.as_secs() + wait)
    }
}

/// Where a protected item is in its lifecycle (names after Azure Site Recovery's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ProtectionState {
    /// Prerequisite checks and change tracking being set up.
    EnablingProtection,
    /// Disks being copied, one at a time, while writes are tracked.
    InitialReplicationInProgress,
    /// Replicating by delta cycles.
    Protected,
    /// Deltas cannot continue (see the item's resync reason).
    ResyncRequired,
    /// A resync is running.
    Resynchronizing,
    /// A resync is paused (`ResumeResync` continues where it stopped).
    ResyncPaused,
    /// Planned failover running (source shut down, final delta, target started).
    PlannedFailoverInitiated,
    /// Planned failover done, not committed.
    PlannedFailoverCompleted,
    /// Unplanned failover running.
    UnplannedFailoverInitiated,
    /// Unplanned failover done, not committed.
    UnplannedFailoverCompleted,
    /// Commit running (other recovery points being deleted).
    CommitFailoverInProgress,
    /// Failover committed: the item runs at the recovery site on one recovery point.
    FailoverCommitted,
    /// Cancel running (target stopped, source restarted).
    CancelFailoverInProgress,
    /// Failback running: on-premises disks protected, synced back from the recovered
    /// disks, recovered machine stopped, final sync, source started.
    FailbackInProgress,
    /// Failback synced and the source runs again; `CompleteFailback` makes it final.
    FailbackCompleted,
    /// Failback made final; `Reprotect` resumes replication towards the recovery site.
    FailbackCommitted,
    /// Reprotect running (a resync of the replica from the source).
    ReprotectInitiated,
    /// Disable protection running: tracking stopped, pending logs discarded, the replica
    /// deleted if asked.
    DisablingProtection,
    /// Protection disabled: the driver removes the item from its catalogue (the replica
    /// stays where it is unless its deletion was asked).
    ProtectionDisabled,
}

/// Test failover state, beside the protection state (test failover does not disturb
/// replication).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestFailoverState {
    /// No test failover.
    None,
    /// Test disks being materialised.
    TestFailoverInitiated,
    /// Test disks exist.
    TestFailoverCompleted,
    /// Test disks being deleted.
    TestFailoverCleanupInitiated,
}

/// Why a resync is required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ResyncReason {
    /// A disk's pending log reached half of the disk's size.
    LogOverHalfDisk {
        /// The disk.
        disk: usize,
        /// The log's size.
        log_bytes: u64,
        /// The disk's size.
        disk_bytes: u64,
    },
    /// A log was not closed cleanly.
    LogNotClosedCleanly {
        /// The disk.
        disk: usize,
    },
    /// The disk changed while tracking was off (its data-write GUID changed).
    OfflineChange {
        /// The disk.
        disk: usize,
    },
    /// An administrator asked for it.
    Manual,
    /// A cycle was being applied when its logs were lost (its driver was taken over).
    LogsLost,
    /// A log does not continue the disk's chain (a log before it is missing).
    LogChainBroken {
        /// The disk.
        disk: usize,
    },
}

/// What a closed log says, reported by the driver for each disk of a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReport {
    /// The disk.
    pub disk: usize,
    /// Bytes of change the log holds.
    pub log_bytes: u64,
    /// Whether the log was closed cleanly (HRL EOLLocation set).
    pub closed_cleanly: bool,
    /// Whether the disk's data-write GUID matches the one tracking started with.
    pub write_guid_matches: bool,
    /// Whether the logs continue the disk's chain (no log between them is missing).
    #[serde(default = "yes")]
    pub continues_chain: bool,
    /// Whether the logs were closed at a quiesced (application-consistent) snapshot of
    /// the machine; a cycle's point is app-consistent when every disk's report says so.
    #[serde(default)]
    pub app_consistent: bool,
    /// When the newest of the logs was closed, if known: the moment the cycle's point
    /// describes. Without it, the moment the cycle closed.
    #[serde(default)]
    pub closed_at: Option<Duration>,
}

fn yes() -> bool {
    true
}

impl LogReport {
    /// A report of clean, chained, crash-consistent logs of `log_bytes` for `disk`.
    pub fn clean(disk: usize, log_bytes: u64) -> Self {
        LogReport {
            disk,
            log_bytes,
            closed_cleanly: true,
            write_guid_matches: true,
            continues_chain: true,
            app_consistent: false,
            closed_at: None,
        }
    }
}

/// Normal, Warning or Critical.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// All well.
    Normal,
    /// Needs attention soon.
    Warning,
    /// Replication is not protecting the item.
    Critical,
}

/// Why health is what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HealthCause {
    /// A non-recoverable error stopped replication; an administrator must act.
    NonRecoverableError {
        /// What failed.
        message: String,
    },
    /// A recoverable error is being retried.
    Retrying {
        /// What failed.
        message: String,
        /// Retries so far.
        retries: u32,
    },
    /// A resync is required.
    ResyncRequired(ResyncReason),
    /// Initial replication has not completed.
    InitialReplicationIncomplete,
    /// No delta cycle succeeded for longer than the policy's RPO warning.
    RpoExceeded {
        /// Time since the last successful cycle.
        since: Duration,
    },
    /// A failover is done but not committed.
    FailoverNotCommitted,
    /// More delta cycles were missed (started late, a whole interval or more) than the
    /// policy tolerates.
    MissedCycles {
        /// Cycles missed.
        missed: u64,
        /// Cycles due (run or missed).
        due: u64,
    },
    /// A resync is paused.
    ResyncPaused,
}

/// A recovery point: the state of every disk of the item at one time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// Its id.
    pub id: PointId,
    /// When it was made.
    pub time: Duration,
    /// Whether it is application-consistent.
    pub app_consistent: bool,
}

/// Which point a failover uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointChoice {
    /// Process what has been shipped but not applied, then use the newest point (lowest RPO).
    Latest,
    /// The newest point already processed (lowest RTO).
    LatestProcessed,
    /// The newest app-consistent point.
    LatestAppConsistent,
    /// A chosen point.
    Id(PointId),
}

/// Why disks are materialised from a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// Test failover: disposable disks, replication untouched.
    Test,
    /// Failover: the disks the recovered machine runs on.
    Failover,
}

/// Something the driver must do, then report with [`Outcome`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ActionKind {
    /// Check prerequisites and start change tracking on every disk.
    StartTracking,
    /// Copy a range of a disk from the point-in-time source to the replica.
    CopyDiskRange {
        /// The disk.
        disk: usize,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Close the current logs and report them ([`Outcome::Logs`]); start new ones.
    CloseLogs {
        /// The cycle.
        cycle: u64,
    },
    /// Ship and apply the logs closed for `cycle`, exactly once.
    ApplyLogs {
        /// The cycle.
        cycle: u64,
    },
    /// Discard the logs closed for `cycle` (a resync will cover them).
    DiscardLogs {
        /// The cycle.
        cycle: u64,
    },
    /// Apply whatever was shipped and not yet applied (failover to the latest point).
    ProcessPendingLogs,
    /// Fixed-block resync of one disk (only differing blocks sent).
    ResyncDisk {
        /// The disk.
        disk: usize,
    },
    /// Snapshot every disk of the replica as a recovery point.
    CreateRecoveryPoint {
        /// Its id.
        point: PointId,
        /// Whether the guest was quiesced for it.
        app_consistent: bool,
    },
    /// Delete a recovery point.
    DeleteRecoveryPoint {
        /// Its id.
        point: PointId,
    },
    /// Create disks from a point without touching the replica.
    MaterializeDisks {
        /// The point.
        point: PointId,
        /// Test or real.
        purpose: Purpose,
    },
    /// Delete test-failover disks.
    DeleteTestDisks,
    /// Disable protection: stop change tracking on every disk and drop the logs not
    /// applied.
    StopTracking,
    /// Disable protection: delete the replica's disks (their recovery points are gone by
    /// then).
    DeleteReplica,
    /// Shut the source machine down.
    ShutDownSource,
    /// Start the source machine.
    StartSource,
    /// Start the machine at the recovery site on the failover disks.
    StartTarget {
        /// The point its disks came from.
        point: PointId,
    },
    /// Stop the machine at the recovery site.
    StopTarget,
    /// Failback: snapshot the on-premises disks first, so a cancelled failback loses nothing.
    ProtectSourceDisks {
        /// Write to other disks than the original ones.
        alternate: bool,
    },
    /// Failback: bring the on-premises disks up to the recovered disks' current content.
    SyncBack {
        /// Copy everything instead of only differing blocks.
        full: bool,
        /// The last pass, after the recovered machine stopped.
        final_pass: bool,
    },
    /// Cancelled failback: restore the on-premises disks from the protective snapshot.
    RestoreSourceDisks,
    /// Completed failback: drop the protective snapshot.
    DeleteProtectiveSnapshot,
    /// A recovery plan's script hook. Hooks may be re-issued after a crash, so they
    /// should be idempotent.
    RunHook {
        /// The plan.
        plan: String,
        /// The group (from 0).
        group: usize,
        /// Before (`true`) or after the group's failover.
        pre: bool,
        /// The hook's name, as the plan gives it.
        hook: String,
    },
}

/// An action with its id, item and job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// Report the outcome with this id.
    pub id: ActionId,
    /// Whom the action is for: its item, or the plan for a plan's own action
    /// ([`ActionKind::RunHook`]), as its job names them.
    pub item: ItemId,
    /// The job it belongs to, if any (delta cycles belong to none).
    pub job: Option<JobId>,
    /// What to do.
    pub kind: ActionKind,
}

/// How an action ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Outcome {
    /// It succeeded.
    Done,
    /// [`ActionKind::CloseLogs`] succeeded with these logs.
    Logs(Vec<LogReport>),
    /// [`ActionKind::CopyDiskRange`] succeeded, and the disk's bytes after its range up
    /// to this offset need no copy either (the driver found that the source holds no data
    /// there and the replica holds zeros): the copy goes on from here. A thin disk's run
    /// of holes then costs one action, not one per range. An offset within the range, or
    /// reported for another action, counts as [`Outcome::Done`]; one past the disk's end
    /// as its end.
    CopiedThrough(u64),
    /// It failed.
    Failed {
        /// Recoverable or not.
        class: Class,
        /// What happened.
        message: String,
    },
}

/// An operation an administrator (or a recovery plan) asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Commands are built a few times an hour; boxing the policy would burden every caller.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum Command {
    /// Protect a machine with disks of these sizes.
    EnableProtection {
        /// The item.
        item: ItemId,
        /// Disk sizes in bytes.
        disks: Vec<u64>,
        /// The policy.
        policy: ReplicationPolicy,
    },
    /// Start a resync now.
    Resync {
        /// The item.
        item: ItemId,
    },
    /// Materialise test disks from a point.
    TestFailover {
        /// The item.
        item: ItemId,
        /// Which point.
        point: PointChoice,
    },
    /// Delete the test disks.
    TestFailoverCleanup {
        /// The item.
        item: ItemId,
    },
    /// Shut the source down, apply the final delta, fail over with zero loss.
    PlannedFailover {
        /// The item.
        item: ItemId,
    },
    /// Fail over to a point without the source.
    UnplannedFailover {
        /// The item.
        item: ItemId,
        /// Which point.
        point: PointChoice,
    },
    /// Keep the failover: delete every other point.
    Commit {
        /// The item.
        item: ItemId,
    },
    /// Undo an uncommitted failover: stop the target, restart the source, resume.
    CancelFailover {
        /// The item.
        item: ItemId,
    },
    /// An administrator fixed the cause of a non-recoverable error: try again.
    RepairReplication {
        /// The item.
        item: ItemId,
    },
    /// Fail back to the on-premises disks (after a committed failover).
    Failback {
        /// The item.
        item: ItemId,
        /// Sync everything instead of only differing blocks.
        full: bool,
        /// Fail back to alternate disks instead of the original ones.
        alternate: bool,
    },
    /// Make a synced failback final.
    CompleteFailback {
        /// The item.
        item: ItemId,
    },
    /// Cancel a failback: restore the on-premises disks, restart the recovered machine.
    CancelFailback {
        /// The item.
        item: ItemId,
    },
    /// After failback: replicate towards the recovery site again.
    Reprotect {
        /// The item.
        item: ItemId,
    },
    /// Before commit: move the failed-over machine to another recovery point.
    ChangeRecoveryPoint {
        /// The item.
        item: ItemId,
        /// Which point.
        point: PointChoice,
    },
    /// Pause a running resync.
    PauseResync {
        /// The item.
        item: ItemId,
    },
    /// Continue a paused resync where it stopped.
    ResumeResync {
        /// The item.
        item: ItemId,
    },
    /// Cancel a resync: the item stays resync-required; the next resync starts over.
    CancelResync {
        /// The item.
        item: ItemId,
    },
    /// Run a delta cycle now (the logs shipped so far become a recovery point), instead of
    /// waiting for the next copy interval.
    ReplicateNow {
        /// The item.
        item: ItemId,
    },
    /// Another driver takes the item over (its previous driver is gone, and with it the
    /// logs it had shipped but not applied): pending delta cycles are dropped; a failure
    /// they caused no longer holds the item; a failover to the latest point then uses the
    /// newest recovery point if the replica may hold part of a cycle.
    TakeOver {
        /// The item.
        item: ItemId,
    },
    /// Stop replicating the item: tracking stops, logs not applied are dropped, running
    /// resyncs and initial replication are cancelled, and (with `delete_replica`) every
    /// recovery point and the replica's disks are deleted. The item ends
    /// [`ProtectionState::ProtectionDisabled`]; its driver then forgets it. Not during a
    /// failover, a failback or a test failover, nor for an item of a recovery plan.
    DisableProtection {
        /// The item.
        item: ItemId,
        /// Delete the replica and its recovery points too.
        delete_replica: bool,
    },
    /// Replace the item's replication policy: the next cycle is due one new interval from
    /// now at the latest, points older than the new retention go, health is judged by the
    /// new thresholds.
    ChangePolicy {
        /// The item.
        item: ItemId,
        /// The new policy.
        policy: ReplicationPolicy,
    },
    /// Start a recovery plan's failover: its groups in order, the items of a group
    /// together, its pre/post actions around each group. The job is the plan's.
    StartPlan {
        /// The plan.
        plan: String,
        /// Which failover every item gets.
        failover: PlanFailover,
    },
    /// A plan waits for a manual action that an administrator has now done: carry on.
    ResumePlan {
        /// The plan.
        plan: String,
    },
    /// Cancel a job: a running resync (the item stays resync-required) or a recovery
    /// plan (no further group starts; failovers already started run to their end).
    CancelJob {
        /// The job.
        job: JobId,
    },
    /// Run a failed or cancelled job's operation again, as a new job.
    RestartJob {
        /// The job.
        job: JobId,
    },
    /// Let a suspended job go on: repair a Critical item, resume a paused resync, or
    /// resume a plan waiting for a manual action.
    ResumeJob {
        /// The job.
        job: JobId,
    },
}

impl Command {
    /// The item the command is for (the plan, for a plan's command; the job's item or
    /// plan, for a job's).
    pub fn item(&self) -> &str {
        match self {
            Command::EnableProtection { item, .. }
            | Command::Resync { item }
            | Command::TestFailover { item, .. }
            | Command::TestFailoverCleanup { item }
            | Command::PlannedFailover { item }
            | Command::UnplannedFailover { item, .. }
            | Command::Commit { item }
            | Command::CancelFailover { item }
            | Command::RepairReplication { item }
            | Command::Failback { item, .. }
            | Command::CompleteFailback { item }
            | Command::CancelFailback { item }
            | Command::Reprotect { item }
            | Command::ChangeRecoveryPoint { item, .. }
            | Command::PauseResync { item }
            | Command::ResumeResync { item }
            | Command::CancelResync { item }
            | Command::ReplicateNow { item }
            | Command::TakeOver { item }
            | Command::ChangePolicy { item, .. }
            | Command::DisableProtection { item, .. } => item,
            Command::StartPlan { plan, .. } | Command::ResumePlan { plan } => plan,
            Command::CancelJob { job }
            | Command::RestartJob { job }
            | Command::ResumeJob { job } => &job.item,
        }
    }
}

/// The kind of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobKind {
    /// Enable protection (initial replication and finalize included).
    EnableProtection,
    /// Resynchronize.
    Resynchronize,
    /// Test failover.
    TestFailover,
    /// Cleanup test failover.
    TestFailoverCleanup,
    /// Planned failover.
    PlannedFailover,
    /// Unplanned failover.
    UnplannedFailover,
    /// Commit.
    Commit,
    /// Cancel failover.
    CancelFailover,
    /// Repair replication.
    RepairReplication,
    /// Failback (planned failover back to on-premises).
    Failback,
    /// Complete failback.
    CompleteFailback,
    /// Cancel failback.
    CancelFailback,
    /// Reprotect (reverse replicate).
    Reprotect,
    /// A recovery plan's failover (the job's `item` is the plan's name).
    RecoveryPlan,
    /// Change recovery point.
    ChangeRecoveryPoint,
    /// Take over (another driver acts for the item from now on).
    TakeOver,
    /// A delta cycle run on request.
    Replicate,
    /// The replication policy changed.
    ChangePolicy,
    /// Protection disabled.
    DisableProtection,
}

/// What an administrator may do with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobAction {
    /// Stop it ([`Command::CancelJob`]).
    Cancel,
    /// Run its operation again ([`Command::RestartJob`]).
    Restart,
    /// Let a suspended job continue ([`Command::ResumeJob`]).
    Resume,
}

/// A job's or task's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Not started.
    NotStarted,
    /// Running.
    InProgress,
    /// Done.
    Succeeded,
    /// Ended with an error (see the job's errors).
    Failed,
    /// Cancelled (superseded, e.g. a resync an unplanned failover cancelled).
    Cancelled,
    /// Waiting for an administrator (a non-recoverable error; `RepairReplication` resumes).
    Suspended,
}

impl Job {
    /// The item the job belongs to (the recovery plan, for a plan's job).
    pub fn item(&self) -> &str {
        &self.id.item
    }
}

impl JobState {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One step of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// What it does.
    pub name: String,
    /// Its state.
    pub state: JobState,
}

/// Every operation is a job with ordered tasks, a state and progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id (which names its item, or its recovery plan).
    pub id: JobId,
    /// What it is.
    pub kind: JobKind,
    /// Its state.
    pub state: JobState,
    /// Its tasks, in order.
    pub tasks: Vec<Task>,
    /// Progress in per mille (0..=1000).
    pub progress_permille: u32,
    /// When it started.
    pub started: Duration,
    /// When it ended.
    pub ended: Option<Duration>,
    /// Errors met (retried or final).
    pub errors: Vec<String>,
    /// The command that started it (for restart); `None` for plan jobs.
    #[serde(default)]
    pub command: Option<Command>,
}

/// Which failover a recovery plan runs, for every item of every group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanFailover {
    /// Test failover to the chosen point.
    Test(PointChoice),
    /// Planned failover.
    Planned,
    /// Unplanned failover to the chosen point.
    Unplanned(PointChoice),
}

impl PlanFailover {
    /// The scope plan actions are matched against.
    pub fn scope(self) -> PlanScope {
        match self {
            PlanFailover::Test(_) => PlanScope::Test,
            PlanFailover::Planned => PlanScope::Planned,
            PlanFailover::Unplanned(_) => PlanScope::Unplanned,
        }
    }

    /// The command it means for one item.
    pub fn command(self, item: ItemId) -> Command {
        match self {
            PlanFailover::Test(point) => Command::TestFailover { item, point },
            PlanFailover::Planned => Command::PlannedFailover { item },
            PlanFailover::Unplanned(point) => Command::UnplannedFailover { item, point },
        }
    }
}

/// The failovers a plan action takes part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanScope {
    /// Test failover.
    Test,
    /// Planned failover.
    Planned,
    /// Unplanned failover.
    Unplanned,
}

/// What a plan's pre or post action is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanActionKind {
    /// An administrator does something by hand: the plan suspends until
    /// [`Command::ResumePlan`].
    Manual,
    /// A script the driver runs ([`ActionKind::RunHook`]).
    Script {
        /// The hook's name (for example a command line).
        hook: String,
    },
}

/// A pre or post action of a plan group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAction {
    /// What it is called in the job's tasks.
    pub name: String,
    /// Manual or scripted.
    pub kind: PlanActionKind,
    /// The failovers it runs in; empty for all.
    pub scopes: Vec<PlanScope>,
}

impl PlanAction {
    /// Whether it runs in a failover of `scope`.
    pub fn applies(&self, scope: PlanScope) -> bool {
        self.scopes.is_empty() || self.scopes.contains(&scope)
    }
}

/// One group of a recovery plan: its items fail over in parallel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanGroup {
    /// The items.
    pub items: Vec<ItemId>,
    /// Actions before the group's failover, in order.
    pub pre: Vec<PlanAction>,
    /// Actions after it, in order.
    pub post: Vec<PlanAction>,
}

/// A recovery plan: ordered groups; group N+1 starts when group N is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPlan {
    /// Its name.
    pub name: String,
    /// The groups, in order.
    pub groups: Vec<PlanGroup>,
}

impl ActionKind {
    /// The job task this action is, as the jobs view names it ("Initial replication of
    /// disk 0").
    pub fn task(&self) -> String {
        task_name(self)
    }
}

/// The job task an action is, as the jobs view names it.
pub(crate) fn task_name(kind: &ActionKind) -> String {
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
        ActionKind::RunHook {
            group, pre, hook, ..
        } => crate::plan::hook_task(*group, *pre, hook),
    }
}
