//! The invariants the crate documents, checked after every step by the property tests
//! and the fuzz target.

use crate::model::*;

use super::Coordinator;

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
