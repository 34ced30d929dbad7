//! How the model's values read to people (`Display`: "Resync required", "the log of disk 0
//! does not continue its chain") and to programs (`tag()`: `resync_required`, the stable
//! lowercase name JSON output uses). Debug text is for developers only.

use std::fmt;
use std::time::Duration;

use crate::model::{
    Health, HealthCause, JobAction, JobKind, JobState, PointChoice, PointId, ProtectionState,
    ResyncReason, TestFailoverState,
};

/// Gives a unit enum its stable tag (`tag()`) and a `Display` in words made from it
/// (`resync_required` → "Resync required").
macro_rules! tags {
    ($($ty:ident { $($v:ident => $tag:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// The stable lowercase name (`snake_case`), as JSON output writes it.
            pub fn tag(&self) -> &'static str {
                match self { $($ty::$v => $tag),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                words(self.tag(), f)
            }
        }
    )+};
}

/// `resync_required` as "Resync required".
fn words(tag: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut first = true;
    for part in tag.split('_') {
        if first {
            let mut c = part.chars();
            if let Some(h) = c.next() {
                write!(f, "{}{}", h.to_ascii_uppercase(), c.as_str())?;
            }
            first = false;
        } else {
            write!(f, " {part}")?;
        }
    }
    Ok(())
}

tags! {
    ProtectionState {
        EnablingProtection => "enabling_protection",
        InitialReplicationInProgress => "initial_replication_in_progress",
        Protected => "protected",
        ResyncRequired => "resync_required",
        Resynchronizing => "resynchronizing",
        ResyncPaused => "resync_paused",
        PlannedFailoverInitiated => "planned_failover_initiated",
        PlannedFailoverCompleted => "planned_failover_completed",
        UnplannedFailoverInitiated => "unplanned_failover_initiated",
        UnplannedFailoverCompleted => "unplanned_failover_completed",
        CommitFailoverInProgress => "commit_failover_in_progress",
        FailoverCommitted => "failover_committed",
        CancelFailoverInProgress => "cancel_failover_in_progress",
        FailbackInProgress => "failback_in_progress",
        FailbackCompleted => "failback_completed",
        FailbackCommitted => "failback_committed",
        ReprotectInitiated => "reprotect_initiated",
        DisablingProtection => "disabling_protection",
        ProtectionDisabled => "protection_disabled",
    }
    TestFailoverState {
        None => "none",
        TestFailoverInitiated => "test_failover_initiated",
        TestFailoverCompleted => "test_failover_completed",
        TestFailoverCleanupInitiated => "test_failover_cleanup_initiated",
    }
    Health {
        Normal => "normal",
        Warning => "warning",
        Critical => "critical",
    }
    JobKind {
        EnableProtection => "enable_protection",
        Resynchronize => "resynchronize",
        TestFailover => "test_failover",
        TestFailoverCleanup => "test_failover_cleanup",
        PlannedFailover => "planned_failover",
        UnplannedFailover => "unplanned_failover",
        Commit => "commit",
        CancelFailover => "cancel_failover",
        RepairReplication => "repair_replication",
        Failback => "failback",
        CompleteFailback => "complete_failback",
        CancelFailback => "cancel_failback",
        Reprotect => "reprotect",
        RecoveryPlan => "recovery_plan",
        ChangeRecoveryPoint => "change_recovery_point",
        TakeOver => "take_over",
        Replicate => "replicate",
        ChangePolicy => "change_policy",
        DisableProtection => "disable_protection",
    }
    JobState {
        NotStarted => "not_started",
        InProgress => "in_progress",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
        Suspended => "suspended",
    }
    JobAction {
        Cancel => "cancel",
        Restart => "restart",
        Resume => "resume",
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for PointChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointChoice::Latest => f.write_str("the latest point"),
            PointChoice::LatestProcessed => f.write_str("the latest processed point"),
            PointChoice::LatestAppConsistent => f.write_str("the latest app-consistent point"),
            PointChoice::Id(id) => write!(f, "point {id}"),
        }
    }
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::LogOverHalfDisk {
                disk,
                log_bytes,
                disk_bytes,
            } => write!(
                f,
                "the changes logged for disk {disk} ({log_bytes} bytes) reached half of the disk ({disk_bytes} bytes)"
            ),
            ResyncReason::LogNotClosedCleanly { disk } => {
                write!(f, "a log of disk {disk} was not closed cleanly")
            }
            ResyncReason::OfflineChange { disk } => {
                write!(f, "disk {disk} changed while its changes were not tracked")
            }
            ResyncReason::Manual => f.write_str("an administrator asked for it"),
            ResyncReason::LogsLost => {
                f.write_str("the logs of a cycle being applied were lost (the item was taken over)")
            }
            ResyncReason::LogChainBroken { disk } => write!(
                f,
                "a log of disk {disk} does not continue its chain (a log before it is missing)"
            ),
        }
    }
}

/// A duration as the messages and the agent say it: `90 s`, `12 min`, `1 h`, `3 h 5 min`,
/// `2 d 4 h` (whole seconds, the two largest units).
///
/// ```
/// use std::time::Duration;
/// use lifeboat_replication::span;
/// assert_eq!(span(Duration::from_secs(90)), "90 s");
/// assert_eq!(span(Duration::from_secs(3 * 3600 + 300)), "3 h 5 min");
/// assert_eq!(span(Duration::from_secs(2 * 86_400 + 4 * 3600)), "2 d 4 h");
/// ```
pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    let (big, small) = match s {
        0..120 => return format!("{s} s"),
        120..3600 => return format!("{} min", s / 60),
        3600..172_800 => ((s / 3600, "h"), (s % 3600 / 60, "min")),
        _ => ((s / 86_400, "d"), (s % 86_400 / 3600, "h")),
    };
    match small.0 {
        0 => format!("{} {}", big.0, big.1),
        n => format!("{} {} {n} {}", big.0, big.1, small.1),
    }
}

impl fmt::Display for HealthCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCause::NonRecoverableError { message } => {
                write!(
                    f,
                    "stopped by an error that needs an administrator: {message}"
                )
            }
            HealthCause::Retrying { message, retries } => {
                write!(f, "retrying (retry {retries}): {message}")
            }
            HealthCause::ResyncRequired(why) => write!(f, "resync required: {why}"),
            HealthCause::InitialReplicationIncomplete => {
                f.write_str("initial replication has not completed")
            }
            HealthCause::RpoExceeded { since } => {
                write!(f, "the newest recovery point is {} old", span(*since))
            }
            HealthCause::FailoverNotCommitted => f.write_str("a failover is not committed"),
            HealthCause::MissedCycles { missed, due } => {
                write!(f, "{missed} of {due} delta cycles were missed")
            }
            HealthCause::ResyncPaused => f.write_str("a resync is paused"),
        }
    }
}

impl HealthCause {
    /// The stable lowercase name of the cause, as JSON output writes it.
    pub fn tag(&self) -> &'static str {
        match self {
            HealthCause::NonRecoverableError { .. } => "non_recoverable_error",
            HealthCause::Retrying { .. } => "retrying",
            HealthCause::ResyncRequired(_) => "resync_required",
            HealthCause::InitialReplicationIncomplete => "initial_replication_incomplete",
            HealthCause::RpoExceeded { .. } => "rpo_exceeded",
            HealthCause::FailoverNotCommitted => "failover_not_committed",
            HealthCause::MissedCycles { .. } => "missed_cycles",
            HealthCause::ResyncPaused => "resync_paused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_words_and_tags_are_snake_case() {
        assert_eq!(
            ProtectionState::ResyncRequired.to_string(),
            "Resync required"
        );
        assert_eq!(ProtectionState::ResyncRequired.tag(), "resync_required");
        assert_eq!(JobKind::EnableProtection.to_string(), "Enable protection");
        assert_eq!(Health::Critical.tag(), "critical");
        assert_eq!(PointChoice::Id(PointId(99)).to_string(), "point 99");
        let cause = HealthCause::ResyncRequired(ResyncReason::LogChainBroken { disk: 0 });
        assert_eq!(
            cause.to_string(),
            "resync required: a log of disk 0 does not continue its chain (a log before it is missing)"
        );
        let rpo = HealthCause::RpoExceeded {
            since: Duration::from_secs(4000),
        };
        assert_eq!(
            rpo.to_string(),
            "the newest recovery point is 1 h 6 min old"
        );
    }
}
