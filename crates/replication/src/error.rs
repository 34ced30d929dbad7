//! Why a command or an outcome was refused, in the operator's words.

use crate::model::{ActionId, ItemId, JobId, PointChoice, ProtectionState, TestFailoverState};

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
    /// The operation must wait for a job of the item to end (a commit keeps the point a
    /// change of recovery point ends on, known only once it ends).
    #[error("{op} must wait: {item}'s {what} (job {job}) has not ended (`lifeboat jobs` shows it)")]
    Busy {
        /// The operation.
        op: &'static str,
        /// The item.
        item: ItemId,
        /// The job to wait for.
        job: JobId,
        /// What that job does.
        what: &'static str,
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
