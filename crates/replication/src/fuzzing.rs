//! The model-based checks shared by the property tests and the fuzz target. Not a stable API.

use std::time::Duration;

use lifeboat_retry::Class;

use crate::*;

const MIB: u64 = 1 << 20;

/// One step of a model-based run.
#[derive(Clone, Debug)]
pub enum Op {
    /// Issue command `.0` with parameter `.1` (13: start the recovery plan, 14: resume it,
    /// 19-21: cancel, restart, resume a job, 22: take over, 23: replicate now, 24: change
    /// the policy, 25: disable protection).
    Command(u8, u8),
    /// Answer one outstanding action (chosen and shaped by the byte).
    Answer(u8),
    /// Let minutes pass.
    Advance(u16),
    /// Crash: persist, restore, resume.
    Crash,
}

/// A command built from two bytes.
pub fn command(c: u8, p: u8, points: &[RecoveryPoint]) -> Command {
    let item = if p.is_multiple_of(5) { "vm2" } else { "vm" }.to_string();
    let point = match p % 4 {
        0 => PointChoice::Latest,
        1 => PointChoice::LatestProcessed,
        2 => PointChoice::LatestAppConsistent,
        _ => PointChoice::Id(
            points
                .get(p as usize % points.len().max(1))
                .map_or(PointId(999), |x| x.id),
        ),
    };
    match c {
        0 => Command::EnableProtection {
            item,
            disks: vec![MIB + u64::from(p) * 512, MIB],
            policy: ReplicationPolicy {
                copy_chunk: MIB / 2,
                initial_replication_at: p
                    .is_multiple_of(7)
                    .then(|| Duration::from_secs(u64::from(p) * 60)),
                resync_window: p.is_multiple_of(3).then_some(ResyncWindow {
                    start: Duration::from_secs(u64::from(p) * 600),
                    end: Duration::from_secs(u64::from(p) * 600 + 7200),
                }),
                ..ReplicationPolicy::default()
            },
        },
        1 => Command::Resync { item },
        2 => Command::TestFailover { item, point },
        3 => Command::TestFailoverCleanup { item },
        4 => Command::PlannedFailover { item },
        5 => Command::UnplannedFailover { item, point },
        6 => Command::Commit { item },
        7 => Command::CancelFailover { item },
        8 => Command::RepairReplication { item },
        9 => Command::Failback {
            item,
            full: p.is_multiple_of(2),
            alternate: p.is_multiple_of(3),
        },
        10 => Command::CompleteFailback { item },
        11 => Command::CancelFailback { item },
        15 => Command::ChangeRecoveryPoint { item, point },
        16 => Command::PauseResync { item },
        17 => Command::ResumeResync { item },
        18 => Command::CancelResync { item },
        22 => Command::TakeOver { item },
        23 => Command::ReplicateNow { item },
        24 => Command::ChangePolicy {
            item,
            policy: ReplicationPolicy {
                copy_frequency: match p % 3 {
                    0 => CopyFrequency::Seconds30,
                    1 => CopyFrequency::Minutes5,
                    _ => CopyFrequency::Minutes15,
                },
                retention: Duration::from_secs(3600 * (1 + u64::from(p) % 24)),
                copy_chunk: MIB / 2,
                ..ReplicationPolicy::default()
            },
        },
        25 => Command::DisableProtection {
            item,
            delete_replica: p.is_multiple_of(2),
        },
        _ => Command::Reprotect { item },
    }
}

/// Applies one step; `persist` stands for saving and restoring the state across a crash.
pub fn apply_op(
    c: &mut Coordinator,
    now: &mut Duration,
    pending: &mut Vec<Action>,
    op: Op,
    persist: &dyn Fn(&Coordinator) -> Result<Coordinator, String>,
) -> Result<(), String> {
    match op {
        Op::Command(13, p) => {
            let failover = match p % 3 {
                0 => PlanFailover::Test(PointChoice::Latest),
                1 => PlanFailover::Planned,
                _ => PlanFailover::Unplanned(PointChoice::LatestProcessed),
            };
            let _ = c.handle_command(
                *now,
                Command::StartPlan {
                    plan: "plan".into(),
                    failover,
                },
            );
        }
        Op::Command(14, _) => {
            let _ = c.handle_command(
                *now,
                Command::ResumePlan {
                    plan: "plan".into(),
                },
            );
        }
        Op::Command(k @ 19..=21, p) => {
            let ids: Vec<JobId> = c.jobs().map(|j| j.id.clone()).collect();
            if let Some(job) = ids.get(p as usize % ids.len().max(1)) {
                let job = job.clone();
                let _ = c.handle_command(
                    *now,
                    match k {
                        19 => Command::CancelJob { job },
                        20 => Command::RestartJob { job },
                        _ => Command::ResumeJob { job },
                    },
                );
            }
        }
        Op::Command(k, p) => {
            let points = c.status("vm", *now).map(|s| s.points).unwrap_or_default();
            let cmd = command(k, p, &points);
            if let Err(e) = c.handle_command(*now, cmd)
                && let OpError::NotAllowed { state, .. } = &e
                && !e.to_string().contains(&state.to_string().to_lowercase())
            {
                return Err(format!("refusal does not name the state: {e}"));
            }
        }
        Op::Answer(x) => {
            while let Some(a) = c.poll_action() {
                pending.push(a);
            }
            if !pending.is_empty() {
                let a = pending.remove(x as usize % pending.len());
                let outcome = match x % 7 {
                    0 => Outcome::Failed {
                        class: Class::Recoverable,
                        message: "flaky".into(),
                    },
                    1 if x % 3 == 0 => Outcome::Failed {
                        class: Class::NonRecoverable,
                        message: "denied".into(),
                    },
                    _ => match a.kind {
                        ActionKind::CloseLogs { .. } => Outcome::Logs(vec![LogReport {
                            disk: 0,
                            log_bytes: if x % 11 == 0 { MIB } else { 4096 },
                            closed_cleanly: x % 13 != 0,
                            write_guid_matches: x % 17 != 0,
                            continues_chain: x % 19 != 0,
                            app_consistent: x % 4 == 0,
                            closed_at: (x % 3 == 0)
                                .then(|| now.saturating_sub(Duration::from_secs(u64::from(x)))),
                        }]),
                        // A driver that skipped a run of holes (anywhere: within the
                        // range, past it, past the disk's end).
                        ActionKind::CopyDiskRange { offset, .. } if x % 5 == 0 => {
                            Outcome::CopiedThrough(offset + u64::from(x) * (MIB / 8))
                        }
                        _ => Outcome::Done,
                    },
                };
                // Stale ids (after a crash) are refused, never applied.
                let _ = c.handle_outcome(*now, a.id, outcome);
                // The driver forgets an item whose protection is disabled.
                let disabled: Vec<String> = c
                    .items()
                    .filter(|i| {
                        c.status(i, *now).map(|s| s.state)
                            == Some(ProtectionState::ProtectionDisabled)
                    })
                    .map(str::to_owned)
                    .collect();
                for i in disabled {
                    c.remove_item(&i);
                }
            }
        }
        Op::Advance(mins) => {
            *now += Duration::from_secs(u64::from(mins) * 60);
            c.handle_timeout(*now);
        }
        Op::Crash => {
            *c = persist(c)?;
            pending.clear();
            c.restore(*now);
        }
    }
    Ok(())
}

/// Runs byte-encoded steps from a fresh coordinator with one protected item, checking
/// the invariants after every step.
pub fn run_ops(
    ops: &[(u8, u8, u8)],
    persist: &dyn Fn(&Coordinator) -> Result<Coordinator, String>,
) -> Result<(), String> {
    let mut c = Coordinator::new();
    let mut now = Duration::ZERO;
    let mut pending: Vec<Action> = Vec::new();
    c.handle_command(now, command(0, 1, &[]))
        .map_err(|e| e.to_string())?;
    c.create_plan(RecoveryPlan {
        name: "plan".into(),
        groups: vec![PlanGroup {
            items: vec!["vm".into()],
            pre: vec![PlanAction {
                name: "pre".into(),
                kind: PlanActionKind::Script { hook: "pre".into() },
                scopes: vec![],
            }],
            post: vec![PlanAction {
                name: "check".into(),
                kind: PlanActionKind::Manual,
                scopes: vec![PlanScope::Planned],
            }],
        }],
    })
    .map_err(|e| e.to_string())?;
    for &(kind, a, b) in ops {
        let op = match kind % 12 {
            0..=2 => Op::Command(a % 26, b),
            3..=8 => Op::Answer(a),
            9..=10 => Op::Advance(u16::from(a) * 7 + 1),
            _ => Op::Crash,
        };
        apply_op(&mut c, &mut now, &mut pending, op, persist)?;
        c.check_invariants()?;
    }
    Ok(())
}
