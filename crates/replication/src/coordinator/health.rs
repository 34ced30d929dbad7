//! An item's health (Normal, Warning, Critical, and why) and its status at a moment.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::*;

use super::item::Item;

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

/// The age of the newest point's data (or of the last successful cycle, before any).
fn rpo(it: &Item, now: Duration) -> Option<Duration> {
    let last = it.points.last().map(|p| p.time).or(it.last_success)?;
    Some(now.saturating_sub(last))
}

impl Item {
    /// The item's state, health and points at `now`.
    pub(super) fn status(&self, now: Duration) -> ItemStatus {
        let it = self;
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
            retry_at: it.retrier.poll_timeout(),
        }
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
