//! Scenario tests under a simulated clock, crash-and-resume from serialised state, and a
//! model-based property test of the documented invariants.

use std::time::Duration;

use lifeboat_retry::Class;
use proptest::prelude::*;

use crate::*;

const MIB: u64 = 1 << 20;
const MIN: Duration = Duration::from_secs(60);

/// Fails the next `.2` actions `.0` matches with class `.1`.
type Injection = (fn(&ActionKind) -> bool, Class, u32);

/// How the simulated world answers actions.
#[derive(Clone, Debug)]
struct World {
    /// Log bytes each CloseLogs reports per disk.
    log_bytes: u64,
    clean: bool,
    guid_ok: bool,
    /// Logs continue the disk's chain.
    chained: bool,
    /// Logs closed at a quiesced snapshot.
    quiesced: bool,
    /// Fail the next N actions of this kind with this class.
    fail: Option<Injection>,
    /// Copies of (disk, offset) answered "copied through" this offset.
    through: Vec<(usize, u64, u64)>,
}

impl Default for World {
    fn default() -> Self {
        World {
            log_bytes: 4096,
            clean: true,
            guid_ok: true,
            chained: true,
            quiesced: false,
            fail: None,
            through: Vec::new(),
        }
    }
}

/// A coordinator, a clock, a world, and the log of actions performed.
struct Sim {
    c: Coordinator,
    now: Duration,
    world: World,
    done: Vec<Action>,
    /// Serialise, deserialise and resume before every outcome (crash at every step).
    crashy: bool,
}

impl Sim {
    /// Resumes the three-tier plan (it waits for a manual action).
    fn resume_plan(&mut self) -> Result<JobId, OpError> {
        let plan = "three-tier".into();
        self.c
            .handle_command(self.now, Command::ResumePlan { plan })
    }

    fn new() -> Self {
        Sim {
            c: Coordinator::new(),
            now: Duration::ZERO,
            world: World::default(),
            done: Vec::new(),
            crashy: false,
        }
    }

    fn policy() -> ReplicationPolicy {
        ReplicationPolicy {
            copy_chunk: 4 * MIB,
            ..ReplicationPolicy::default()
        }
    }

    /// Protects `item` with `policy` and runs until nothing is ready.
    fn protect_with(&mut self, item: &str, disks: Vec<u64>, policy: ReplicationPolicy) -> JobId {
        let job = self
            .c
            .handle_command(
                self.now,
                Command::EnableProtection {
                    item: item.into(),
                    disks,
                    policy,
                },
            )
            .unwrap();
        self.run();
        job
    }

    fn protect(&mut self, item: &str, disks: Vec<u64>) -> JobId {
        self.protect_with(item, disks, Self::policy())
    }

    fn cmd(&mut self, cmd: Command) -> Result<JobId, OpError> {
        let r = self.c.handle_command(self.now, cmd);
        self.run();
        r
    }

    fn crash(&mut self) {
        let json = serde_json::to_string(&self.c).unwrap();
        self.c = serde_json::from_str(&json).unwrap();
        self.c.restore(self.now);
    }

    /// Performs every ready action until none is left (not advancing time).
    fn run(&mut self) {
        for _ in 0..10_000 {
            if self.crashy {
                self.crash();
            }
            let Some(a) = self.c.poll_action() else {
                return;
            };
            let outcome = self.answer(&a);
            self.c.handle_outcome(self.now, a.id, outcome).unwrap();
            self.done.push(a);
            self.c.check_invariants().unwrap();
        }
        panic!("runaway: more than 10 000 actions without time passing");
    }

    fn answer(&mut self, a: &Action) -> Outcome {
        if let Some((pred, class, n)) = &mut self.world.fail
            && pred(&a.kind)
            && *n > 0
        {
            *n -= 1;
            return Outcome::Failed {
                class: *class,
                message: "injected".into(),
            };
        }
        let disks = self
            .c
            .status(&a.item, self.now)
            .map_or(0, |s| s.initial_copy.len());
        match a.kind {
            ActionKind::CloseLogs { .. } => Outcome::Logs(
                (0..disks)
                    .map(|disk| LogReport {
                        closed_cleanly: self.world.clean,
                        write_guid_matches: self.world.guid_ok,
                        continues_chain: self.world.chained,
                        app_consistent: self.world.quiesced,
                        ..LogReport::clean(disk, self.world.log_bytes)
                    })
                    .collect(),
            ),
            ActionKind::CopyDiskRange { disk, offset, .. } => {
                match self
                    .world
                    .through
                    .iter()
                    .find(|t| (t.0, t.1) == (disk, offset))
                {
                    Some(&(_, _, end)) => Outcome::CopiedThrough(end),
                    None => Outcome::Done,
                }
            }
            _ => Outcome::Done,
        }
    }

    /// Performs one ready action; `false` if none was ready.
    fn step(&mut self) -> bool {
        let Some(a) = self.c.poll_action() else {
            return false;
        };
        let outcome = self.answer(&a);
        self.c.handle_outcome(self.now, a.id, outcome).unwrap();
        self.done.push(a);
        self.c.check_invariants().unwrap();
        true
    }

    /// Jumps to the next deadline and runs what it releases.
    fn tick(&mut self) {
        let t = self.c.poll_timeout().expect("something is scheduled");
        assert!(t >= self.now, "deadline in the past");
        self.now = t;
        self.c.handle_timeout(self.now);
        self.run();
    }

    fn status(&self) -> ItemStatus {
        self.c.status("vm", self.now).unwrap()
    }

    fn kinds(&self) -> Vec<&ActionKind> {
        self.done.iter().map(|a| &a.kind).collect()
    }

    /// The copies performed: disk, offset, length.
    fn copies(&self) -> Vec<(usize, u64, u64)> {
        self.kinds()
            .into_iter()
            .filter_map(|k| match k {
                ActionKind::CopyDiskRange { disk, offset, len } => Some((*disk, *offset, *len)),
                _ => None,
            })
            .collect()
    }
}

/// A copy answered "copied through" an offset goes on from there: a driver that finds a
/// run of holes skips it in one action. An offset within the range counts as done, one
/// past the disk's end as its end; only the copy's own disk moves.
#[test]
fn a_copy_goes_on_from_where_the_driver_copied_through() {
    let mut s = Sim::new();
    s.world.through = vec![
        (0, 0, 9 * MIB),
        (0, 9 * MIB, 9 * MIB + 1),
        (1, 0, 100 * MIB),
    ];
    s.protect("vm", vec![14 * MIB, 5 * MIB]);
    assert_eq!(
        s.copies(),
        [
            (0, 0, 4 * MIB),
            (0, 9 * MIB, 4 * MIB),
            (0, 13 * MIB, MIB),
            (1, 0, 4 * MIB)
        ]
    );
    let st = s.status();
    assert_eq!(st.state, ProtectionState::Protected);
    assert_eq!(st.initial_copy, [(14 * MIB, 14 * MIB), (5 * MIB, 5 * MIB)]);
}

#[test]
fn enable_copies_disks_one_at_a_time_then_protects() {
    let mut s = Sim::new();
    let job = s.protect("vm", vec![10 * MIB, 5 * MIB]);
    assert_eq!(
        s.copies(),
        [
            (0, 0, 4 * MIB),
            (0, 4 * MIB, 4 * MIB),
            (0, 8 * MIB, 2 * MIB),
            (1, 0, 4 * MIB),
            (1, 4 * MIB, MIB)
        ]
    );
    assert_eq!(s.kinds()[0], &ActionKind::StartTracking);
    let st = s.status();
    assert_eq!(st.state, ProtectionState::Protected);
    assert_eq!(st.health, Health::Normal);
    assert_eq!(st.points.len(), 1);
    assert_eq!(st.initial_copy, [(10 * MIB, 10 * MIB), (5 * MIB, 5 * MIB)]);
    let j = s.c.job(&job).unwrap();
    assert_eq!(
        (j.kind, j.state, j.progress_permille),
        (JobKind::EnableProtection, JobState::Succeeded, 1000)
    );
    assert!(j.tasks.iter().all(|t| t.state == JobState::Succeeded));
    assert!(
        j.tasks
            .iter()
            .any(|t| t.name == "Initial replication of disk 1")
    );
}

#[test]
fn delta_cycles_run_every_copy_interval_and_prune_by_retention() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB, MIB]);
    let start = s.now;
    for _ in 0..30 {
        s.tick();
    }
    // 5-minute cycles: 30 of them in 150 minutes, each a recovery point.
    assert_eq!(s.now - start, MIN * 150);
    let st = s.status();
    assert_eq!(st.cycles_applied, 31);
    assert_eq!(st.points.len(), 31, "24 h retention keeps them all");
    // Nothing was quiesced: no point claims to be app-consistent.
    assert_eq!(st.points.iter().filter(|p| p.app_consistent).count(), 0);

    // A 1-hour retention prunes older points, keeping the newest.
    let mut s = Sim::new();
    s.protect_with(
        "vm",
        vec![MIB],
        ReplicationPolicy {
            retention: MIN * 60,
            ..Sim::policy()
        },
    );
    for _ in 0..40 {
        s.tick();
    }
    let pts = s.status().points;
    assert!(pts.iter().all(|p| s.now - p.time <= MIN * 65), "{pts:?}");
    assert!(
        s.kinds()
            .iter()
            .any(|k| matches!(k, ActionKind::DeleteRecoveryPoint { .. }))
    );
}

#[test]
fn recoverable_faults_retry_on_the_hyper_v_schedule() {
    let mut s = Sim::new();
    s.world.fail = Some((
        |k| matches!(k, ActionKind::CopyDiskRange { .. }),
        Class::Recoverable,
        6,
    ));
    s.c.handle_command(
        s.now,
        Command::EnableProtection {
            item: "vm".into(),
            disks: vec![MIB],
            policy: Sim::policy(),
        },
    )
    .unwrap();
    s.run();
    let mut waits = Vec::new();
    for _ in 0..6 {
        let before = s.now;
        let st = s.status();
        assert_eq!(st.health, Health::Warning);
        assert!(
            st.causes
                .iter()
                .any(|c| matches!(c, HealthCause::Retrying { .. }))
        );
        s.tick();
        waits.push((s.now - before).as_secs() / 60);
    }
    assert_eq!(waits, [1, 2, 4, 8, 10, 30]);
    assert_eq!(s.status().state, ProtectionState::Protected);
    let j = s.c.jobs().next().unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.errors.len(), 6);
}

#[test]
fn non_recoverable_fault_makes_the_item_critical_until_repaired() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.world.fail = Some((
        |k| matches!(k, ActionKind::ApplyLogs { .. }),
        Class::NonRecoverable,
        1,
    ));
    s.tick();
    let st = s.status();
    assert_eq!(st.health, Health::Critical);
    assert!(matches!(
        st.causes[0],
        HealthCause::NonRecoverableError { .. }
    ));
    assert_eq!(s.c.poll_timeout(), None, "no retry is scheduled");
    assert!(s.c.poll_action().is_none());
    let n = s.done.len();
    s.now += MIN * 600;
    s.c.handle_timeout(s.now);
    s.run();
    assert_eq!(s.done.len(), n, "nothing happens while Critical");
    s.cmd(Command::RepairReplication { item: "vm".into() })
        .unwrap();
    assert!(matches!(
        s.done.last().unwrap().kind,
        ActionKind::CreateRecoveryPoint { .. }
    ));
    // The point holds the cycle closed ten hours ago: the recovery point objective is
    // exceeded until the next cycle brings fresh data.
    let st = s.status();
    assert_eq!(st.health, Health::Warning);
    assert!(matches!(st.causes[..], [HealthCause::RpoExceeded { .. }]));
    s.tick();
    assert_eq!(s.status().health, Health::Normal);
    // Repair is only for a Critical item.
    assert!(matches!(
        s.cmd(Command::RepairReplication { item: "vm".into() }),
        Err(OpError::NotAllowed { .. })
    ));
}

#[test]
fn half_disk_log_unclean_log_offline_change_and_broken_chain_require_resync() {
    for (log_bytes, clean, guid_ok, chained) in [
        (MIB / 2, true, true, true),
        (4096, false, true, true),
        (4096, true, false, true),
        (4096, true, true, false),
    ] {
        let mut s = Sim::new();
        s.protect("vm", vec![MIB, MIB]);
        s.world = World {
            log_bytes,
            clean,
            guid_ok,
            chained,
            ..World::default()
        };
        let points_before = s.status().points.clone();
        // Hold the resync's disk work to observe the intermediate state.
        s.world.fail = Some((
            |k| matches!(k, ActionKind::ResyncDisk { .. }),
            Class::Recoverable,
            1,
        ));
        s.tick();
        let st = s.status();
        assert_eq!(
            st.state,
            ProtectionState::Resynchronizing,
            "{log_bytes} {clean} {guid_ok}"
        );
        assert!(
            st.causes
                .iter()
                .any(|c| matches!(c, HealthCause::ResyncRequired(_)))
        );
        assert!(
            s.kinds()
                .iter()
                .any(|k| matches!(k, ActionKind::DiscardLogs { .. }))
        );
        assert_eq!(st.points, points_before, "no point is lost during resync");
        // Planned and test failover are refused during resync, naming the state.
        let e = s
            .cmd(Command::PlannedFailover { item: "vm".into() })
            .unwrap_err();
        assert!(e.to_string().contains("resynchronizing"), "{e}");
        assert!(
            s.cmd(Command::TestFailover {
                item: "vm".into(),
                point: PointChoice::LatestProcessed
            })
            .is_err()
        );
        s.world = World::default();
        s.tick();
        let st = s.status();
        assert_eq!(st.state, ProtectionState::Protected);
        assert_eq!(st.points.len(), points_before.len() + 1);
        assert_eq!(
            s.kinds()
                .iter()
                .filter(|k| matches!(k, ActionKind::ResyncDisk { .. }))
                .count(),
            3
        );
    }
}

#[test]
fn manual_resync_policy_waits_for_the_command() {
    let mut s = Sim::new();
    s.protect_with(
        "vm",
        vec![MIB],
        ReplicationPolicy {
            auto_resync: false,
            ..Sim::policy()
        },
    );
    s.world.clean = false;
    s.tick();
    assert_eq!(s.status().state, ProtectionState::ResyncRequired);
    assert_eq!(s.status().health, Health::Critical);
    s.world.clean = true;
    let job = s.cmd(Command::Resync { item: "vm".into() }).unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    assert_eq!(s.status().state, ProtectionState::Protected);
}

#[test]
fn test_failover_leaves_replication_running() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.tick();
    let job = s
        .cmd(Command::TestFailover {
            item: "vm".into(),
            point: PointChoice::LatestProcessed,
        })
        .unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    assert_eq!(
        s.status().test_failover,
        TestFailoverState::TestFailoverCompleted
    );
    let newest = s.status().points.last().unwrap().id;
    assert!(s.kinds().contains(&&ActionKind::MaterializeDisks {
        point: newest,
        purpose: Purpose::Test
    }));
    let cycles = s.status().cycles_applied;
    s.tick();
    s.tick();
    assert_eq!(
        s.status().cycles_applied,
        cycles + 2,
        "cycles go on during a test failover"
    );
    assert!(
        s.cmd(Command::TestFailover {
            item: "vm".into(),
            point: PointChoice::Latest
        })
        .is_err()
    );
    s.cmd(Command::TestFailoverCleanup { item: "vm".into() })
        .unwrap();
    assert_eq!(s.status().test_failover, TestFailoverState::None);
    assert_eq!(s.status().state, ProtectionState::Protected);
}

#[test]
fn planned_failover_is_zero_loss_then_commit_keeps_one_point() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.tick();
    s.tick();
    let cycles = s.status().cycles_applied;
    let n = s.done.len();
    s.cmd(Command::PlannedFailover { item: "vm".into() })
        .unwrap();
    let seq: Vec<&ActionKind> = s.done[n..].iter().map(|a| &a.kind).collect();
    assert!(matches!(seq[0], ActionKind::ShutDownSource));
    assert!(matches!(seq[1], ActionKind::CloseLogs { .. }));
    assert!(matches!(seq[2], ActionKind::ApplyLogs { .. }));
    assert!(matches!(seq[3], ActionKind::CreateRecoveryPoint { .. }));
    assert!(matches!(
        seq[4],
        ActionKind::MaterializeDisks {
            purpose: Purpose::Failover,
            ..
        }
    ));
    assert!(matches!(seq[5], ActionKind::StartTarget { .. }));
    let st = s.status();
    assert_eq!(st.state, ProtectionState::PlannedFailoverCompleted);
    assert_eq!(st.cycles_applied, cycles + 1, "the final delta was applied");
    assert_eq!(st.failover_point, Some(st.points.last().unwrap().id));
    assert_eq!(st.health, Health::Warning);
    assert_eq!(s.c.poll_timeout(), None, "no delta cycles after failover");
    s.cmd(Command::Commit { item: "vm".into() }).unwrap();
    let st = s.status();
    assert_eq!(st.state, ProtectionState::FailoverCommitted);
    assert_eq!(st.points.len(), 1);
    assert_eq!(Some(st.points[0].id), st.failover_point);
    assert!(s.cmd(Command::Commit { item: "vm".into() }).is_err());
}

#[test]
fn planned_failover_whose_final_delta_needs_resync_fails_and_restarts_the_source() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.world.clean = false;
    s.world.fail = Some((
        |k| matches!(k, ActionKind::ResyncDisk { .. }),
        Class::Recoverable,
        1,
    ));
    let job = s
        .cmd(Command::PlannedFailover { item: "vm".into() })
        .unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Failed);
    assert!(s.kinds().contains(&&ActionKind::StartSource));
    assert_eq!(s.status().state, ProtectionState::Resynchronizing);
}

#[test]
fn unplanned_failover_cancels_resync_and_chooses_points() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    for i in 0..14 {
        // Every fifth cycle closes its logs at a quiesced snapshot.
        s.world.quiesced = i % 5 == 0;
        s.tick();
    }
    s.world.quiesced = false;
    let pts = s.status().points.clone();
    // Enter resync and hold it.
    s.world.clean = false;
    s.world.fail = Some((
        |k| matches!(k, ActionKind::ResyncDisk { .. }),
        Class::Recoverable,
        1,
    ));
    s.tick();
    assert_eq!(s.status().state, ProtectionState::Resynchronizing);
    let chosen = pts[3].id;
    s.world = World::default();
    let job = s
        .cmd(Command::UnplannedFailover {
            item: "vm".into(),
            point: PointChoice::Id(chosen),
        })
        .unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    let resync =
        s.c.jobs()
            .find(|j| j.kind == JobKind::Resynchronize)
            .unwrap();
    assert_eq!(resync.state, JobState::Cancelled);
    let st = s.status();
    assert_eq!(
        (st.state, st.failover_point),
        (ProtectionState::UnplannedFailoverCompleted, Some(chosen))
    );
    // A second failover while one is done is refused.
    assert!(
        s.cmd(Command::UnplannedFailover {
            item: "vm".into(),
            point: PointChoice::Latest
        })
        .is_err()
    );
    // Cancel: back to Protected, cycles resume.
    s.cmd(Command::CancelFailover { item: "vm".into() })
        .unwrap();
    assert_eq!(s.status().state, ProtectionState::Protected);
    let cycles = s.status().cycles_applied;
    s.tick();
    assert_eq!(s.status().cycles_applied, cycles + 1);

    // The other choices.
    let app = s
        .status()
        .points
        .iter()
        .rev()
        .find(|p| p.app_consistent)
        .unwrap()
        .id;
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::LatestAppConsistent,
    })
    .unwrap();
    assert_eq!(s.status().failover_point, Some(app));
    s.cmd(Command::CancelFailover { item: "vm".into() })
        .unwrap();
    let n = s.done.len();
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::Latest,
    })
    .unwrap();
    assert!(matches!(s.done[n].kind, ActionKind::ProcessPendingLogs));
    let newest = s.status().points.last().unwrap().id;
    assert_eq!(s.status().failover_point, Some(newest));
    assert!(matches!(
        s.cmd(Command::UnplannedFailover {
            item: "other".into(),
            point: PointChoice::Latest
        }),
        Err(OpError::UnknownItem(_))
    ));
}

#[test]
fn failback_protects_the_source_syncs_completes_and_reprotects() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB, MIB]);
    s.tick();
    s.cmd(Command::PlannedFailover { item: "vm".into() })
        .unwrap();
    assert!(
        s.cmd(Command::Failback {
            item: "vm".into(),
            full: false,
            alternate: false
        })
        .is_err(),
        "commit first"
    );
    s.cmd(Command::Commit { item: "vm".into() }).unwrap();
    let n = s.done.len();
    let job = s
        .cmd(Command::Failback {
            item: "vm".into(),
            full: false,
            alternate: true,
        })
        .unwrap();
    let seq: Vec<&ActionKind> = s.done[n..].iter().map(|a| &a.kind).collect();
    assert_eq!(
        seq,
        [
            &ActionKind::ProtectSourceDisks { alternate: true },
            &ActionKind::SyncBack {
                full: false,
                final_pass: false
            },
            &ActionKind::StopTarget,
            &ActionKind::SyncBack {
                full: false,
                final_pass: true
            },
            &ActionKind::StartSource,
        ]
    );
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    assert_eq!(s.status().state, ProtectionState::FailbackCompleted);
    s.cmd(Command::CompleteFailback { item: "vm".into() })
        .unwrap();
    assert_eq!(s.status().state, ProtectionState::FailbackCommitted);
    assert!(s.kinds().contains(&&ActionKind::DeleteProtectiveSnapshot));
    s.cmd(Command::Reprotect { item: "vm".into() }).unwrap();
    let st = s.status();
    assert_eq!(
        (st.state, st.failover_point),
        (ProtectionState::Protected, None)
    );
    let cycles = st.cycles_applied;
    s.tick();
    assert_eq!(
        s.status().cycles_applied,
        cycles + 1,
        "delta cycles resume after reprotect"
    );
}

#[test]
fn cancelled_failback_restores_the_source_disks() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::LatestProcessed,
    })
    .unwrap();
    s.cmd(Command::Commit { item: "vm".into() }).unwrap();
    // The first sync back keeps failing: cancel while it retries.
    s.world.fail = Some((
        |k| matches!(k, ActionKind::SyncBack { .. }),
        Class::Recoverable,
        100,
    ));
    let fb = s
        .cmd(Command::Failback {
            item: "vm".into(),
            full: true,
            alternate: false,
        })
        .unwrap();
    assert_eq!(s.status().state, ProtectionState::FailbackInProgress);
    s.world.fail = None;
    let n = s.done.len();
    s.cmd(Command::CancelFailback { item: "vm".into() })
        .unwrap();
    let seq: Vec<&ActionKind> = s.done[n..].iter().map(|a| &a.kind).collect();
    assert!(
        matches!(
            seq[..],
            [
                ActionKind::ShutDownSource,
                ActionKind::RestoreSourceDisks,
                ActionKind::StartTarget { .. }
            ]
        ),
        "{seq:?}"
    );
    assert_eq!(s.c.job(&fb).unwrap().state, JobState::Cancelled);
    let st = s.status();
    assert_eq!(
        (st.state, st.points.len()),
        (ProtectionState::FailoverCommitted, 1)
    );
}

#[test]
fn crash_and_resume_at_every_step_reaches_the_same_end() {
    let script = |s: &mut Sim| {
        s.protect("vm", vec![9 * MIB, 3 * MIB]);
        for _ in 0..3 {
            s.tick();
        }
        s.world.log_bytes = 5 * MIB;
        s.tick();
        s.world.log_bytes = 4096;
        s.tick(); // the resync's own logs were too big too: it runs again after a back-off
        assert_eq!(s.status().state, ProtectionState::Protected);
        s.cmd(Command::TestFailover {
            item: "vm".into(),
            point: PointChoice::LatestProcessed,
        })
        .unwrap();
        s.cmd(Command::TestFailoverCleanup { item: "vm".into() })
            .unwrap();
        s.tick();
        s.cmd(Command::PlannedFailover { item: "vm".into() })
            .unwrap();
        s.cmd(Command::Commit { item: "vm".into() }).unwrap();
    };
    let mut plain = Sim::new();
    script(&mut plain);
    let mut crashy = Sim::new();
    crashy.crashy = true;
    script(&mut crashy);
    let (a, b) = (plain.status(), crashy.status());
    assert_eq!(a.state, ProtectionState::FailoverCommitted);
    assert_eq!(
        (a.state, a.points.len(), a.cycles_applied),
        (b.state, b.points.len(), b.cycles_applied)
    );
    // Crashing re-issues in-flight actions: the crashy run may repeat some, never skip.
    let kinds = |s: &Sim| {
        s.done
            .iter()
            .map(|a| format!("{:?}", a.kind))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(kinds(&plain), kinds(&crashy));
}

#[test]
fn refused_operations_name_the_state() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    for (cmd, state) in [
        (
            Command::Commit { item: "vm".into() },
            "while vm is protected",
        ),
        (
            Command::CancelFailover { item: "vm".into() },
            "while vm is protected",
        ),
        (
            Command::TestFailoverCleanup { item: "vm".into() },
            "with no test failover: there is nothing to clean up",
        ),
    ] {
        let e = s.cmd(cmd).unwrap_err();
        assert!(e.to_string().contains(state), "{e}");
    }
    assert!(matches!(
        s.cmd(Command::EnableProtection {
            item: "vm".into(),
            disks: vec![MIB],
            policy: Sim::policy()
        }),
        Err(OpError::AlreadyProtected(_))
    ));
    assert!(matches!(
        s.cmd(Command::EnableProtection {
            item: "x".into(),
            disks: vec![],
            policy: Sim::policy()
        }),
        Err(OpError::InvalidPolicy(_))
    ));
}

use crate::fuzzing::{Op, apply_op, command, run_ops};

fn via_json(c: &Coordinator) -> Result<Coordinator, String> {
    let json = serde_json::to_string(c).map_err(|e| e.to_string())?;
    serde_json::from_str(&json).map_err(|e| e.to_string())
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..26, any::<u8>()).prop_map(|(c, p)| Op::Command(c, p)),
        6 => any::<u8>().prop_map(Op::Answer),
        2 => (1u16..1200).prop_map(Op::Advance),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_random_operations_keep_the_invariants(ops in proptest::collection::vec(arb_op(), 1..200)) {
        let mut c = Coordinator::new();
        let mut now = Duration::ZERO;
        let mut pending = Vec::new();
        c.handle_command(now, command(0, 1, &[])).unwrap();
        for op in ops {
            prop_assert_eq!(apply_op(&mut c, &mut now, &mut pending, op, &via_json), Ok(()));
            prop_assert_eq!(c.check_invariants(), Ok(()));
        }
    }

    #[test]
    fn prop_byte_encoded_sequences_keep_the_invariants(ops in proptest::collection::vec(any::<(u8, u8, u8)>(), 0..300)) {
        prop_assert_eq!(run_ops(&ops, &via_json), Ok(()));
    }
}

/// Found by the property test: a cancelled resync's in-flight action failed afterwards,
/// was requeued and revived by a repair, and set the item Protected mid-failover.
#[test]
fn regression_cancelled_job_failing_late_is_not_revived() {
    use Op::*;
    let ops = [
        Answer(1),
        Answer(1),
        Command(0, 6),
        Advance(1),
        Answer(1),
        Answer(1),
        Answer(1),
        Answer(1),
        Answer(122),
        Answer(22),
        Answer(1),
        Command(1, 1),
        Command(5, 21),
        Answer(246),
        Command(8, 1),
        Answer(121),
        Command(4, 6),
    ];
    let mut c = Coordinator::new();
    let mut now = Duration::ZERO;
    let mut pending = Vec::new();
    c.handle_command(now, command(0, 1, &[])).unwrap();
    for op in ops {
        apply_op(&mut c, &mut now, &mut pending, op, &via_json).unwrap();
        c.check_invariants().unwrap();
    }
}

/// Found by the property test: a failover chose a point whose retention delete was
/// already queued, and the commit then left no point at all.
#[test]
fn regression_a_point_being_deleted_cannot_be_chosen() {
    let mut s = Sim::new();
    s.protect_with(
        "vm",
        vec![MIB],
        ReplicationPolicy {
            retention: MIN * 30,
            ..Sim::policy()
        },
    );
    for _ in 0..6 {
        s.tick();
    }
    // Hold the next retention delete in the queue.
    s.world.fail = Some((
        |k| matches!(k, ActionKind::DeleteRecoveryPoint { .. }),
        Class::Recoverable,
        1,
    ));
    s.tick();
    let doomed = s
        .done
        .iter()
        .rev()
        .find_map(|a| match a.kind {
            ActionKind::DeleteRecoveryPoint { point } => Some(point),
            _ => None,
        })
        .unwrap();
    assert!(
        s.status().points.iter().any(|p| p.id == doomed),
        "the delete failed, the point is still listed"
    );
    assert!(matches!(
        s.cmd(Command::UnplannedFailover {
            item: "vm".into(),
            point: PointChoice::Id(doomed)
        }),
        Err(OpError::NoRecoveryPoint { .. })
    ));
}

// ---------------------------------------------------------------------- recovery plans

fn three_tier(sim: &mut Sim) -> RecoveryPlan {
    for i in ["db", "app", "web"] {
        sim.protect(i, vec![4 * MIB]);
    }
    let script = |name: &str, scopes: Vec<PlanScope>| PlanAction {
        name: name.into(),
        kind: PlanActionKind::Script { hook: name.into() },
        scopes,
    };
    RecoveryPlan {
        name: "three-tier".into(),
        groups: vec![
            PlanGroup {
                items: vec!["db".into()],
                pre: vec![script("stop-app-writes", vec![PlanScope::Planned])],
                post: vec![PlanAction {
                    name: "check the database".into(),
                    kind: PlanActionKind::Manual,
                    scopes: vec![],
                }],
            },
            PlanGroup {
                items: vec!["app".into(), "web".into()],
                pre: vec![],
                post: vec![script(
                    "switch-dns",
                    vec![PlanScope::Planned, PlanScope::Unplanned],
                )],
            },
        ],
    }
}

/// Starts the three-tier plan, runs to its manual step, resumes and runs on; its job.
fn through_the_manual_step(sim: &mut Sim, failover: PlanFailover) -> JobId {
    let job = sim
        .c
        .handle_command(
            sim.now,
            Command::StartPlan {
                plan: "three-tier".into(),
                failover,
            },
        )
        .unwrap();
    sim.run();
    sim.resume_plan().unwrap();
    sim.run();
    job
}

/// The order of the plan's actions: item failover steps and hooks.
fn plan_trace(done: &[Action]) -> Vec<String> {
    done.iter()
        .filter_map(|a| match &a.kind {
            ActionKind::RunHook { hook, .. } => Some(format!("hook {hook}")),
            ActionKind::ShutDownSource | ActionKind::StartTarget { .. } => {
                Some(format!("{} {:?}", a.item, std::mem::discriminant(&a.kind)))
            }
            ActionKind::MaterializeDisks { .. } => Some(format!("{} materialize", a.item)),
            _ => None,
        })
        .collect()
}

#[test]
fn plan_runs_groups_in_order_with_hooks_and_a_manual_step() {
    let mut sim = Sim::new();
    let plan = three_tier(&mut sim);
    sim.c.create_plan(plan).unwrap();
    sim.done.clear();
    let job = sim
        .c
        .handle_command(
            sim.now,
            Command::StartPlan {
                plan: "three-tier".into(),
                failover: PlanFailover::Planned,
            },
        )
        .unwrap();
    sim.run();
    // Group 1 ran (pre hook, db's failover), then the manual post action suspended the plan.
    let j = sim.c.job(&job).unwrap();
    assert_eq!(j.state, JobState::Suspended);
    assert_eq!(
        sim.c.status("db", sim.now).unwrap().state,
        ProtectionState::PlannedFailoverCompleted
    );
    assert_eq!(
        sim.c.status("app", sim.now).unwrap().state,
        ProtectionState::Protected
    );
    let trace = plan_trace(&sim.done);
    assert_eq!(trace[0], "hook stop-app-writes");
    assert!(trace[1].starts_with("db "), "{trace:?}");
    assert!(
        !trace
            .iter()
            .any(|t| t.starts_with("app") || t.starts_with("web"))
    );
    sim.c.check_invariants().unwrap();

    // Resumed: group 2 fails over (app and web interleaved), then its post hook.
    sim.crash();
    sim.resume_plan().unwrap();
    sim.run();
    let j = sim.c.job(&job).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(j.progress_permille, 1000);
    assert!(j.tasks.iter().all(|t| t.state == JobState::Succeeded));
    assert_eq!(j.tasks.len(), 5, "{:?}", j.tasks);
    for i in ["app", "web"] {
        assert_eq!(
            sim.c.status(i, sim.now).unwrap().state,
            ProtectionState::PlannedFailoverCompleted
        );
    }
    let trace = plan_trace(&sim.done);
    assert_eq!(trace.last().unwrap(), "hook switch-dns");
    // Parallel inside a group: web's first step comes before app's last.
    let first_web = trace.iter().position(|t| t.starts_with("web")).unwrap();
    let last_app = trace.iter().rposition(|t| t.starts_with("app")).unwrap();
    assert!(first_web < last_app, "{trace:?}");
    assert!(
        sim.c
            .handle_command(
                sim.now,
                Command::ResumePlan {
                    plan: "three-tier".into()
                }
            )
            .is_err()
    );
}

#[test]
fn plan_actions_are_scoped_and_test_failover_leaves_replication_alone() {
    let mut sim = Sim::new();
    let plan = three_tier(&mut sim);
    sim.c.create_plan(plan).unwrap();
    sim.done.clear();
    let job = sim
        .c
        .handle_command(
            sim.now,
            Command::StartPlan {
                plan: "three-tier".into(),
                failover: PlanFailover::Test(PointChoice::Latest),
            },
        )
        .unwrap();
    sim.run();
    // No planned-only hook; the manual step (all scopes) waits.
    assert!(
        !plan_trace(&sim.done)
            .iter()
            .any(|t| t == "hook stop-app-writes")
    );
    assert_eq!(sim.c.job(&job).unwrap().state, JobState::Suspended);
    sim.resume_plan().unwrap();
    sim.run();
    assert_eq!(sim.c.job(&job).unwrap().state, JobState::Succeeded);
    // switch-dns is scoped to planned and unplanned: not run.
    assert!(!plan_trace(&sim.done).iter().any(|t| t.starts_with("hook")));
    for i in ["db", "app", "web"] {
        let s = sim.c.status(i, sim.now).unwrap();
        assert_eq!(s.state, ProtectionState::Protected);
        assert_eq!(s.test_failover, TestFailoverState::TestFailoverCompleted);
    }
}

#[test]
fn plan_fails_when_a_hook_or_an_item_fails_and_refuses_bad_plans() {
    let mut sim = Sim::new();
    let plan = three_tier(&mut sim);
    assert!(matches!(
        sim.c.create_plan(RecoveryPlan {
            name: "x".into(),
            groups: vec![PlanGroup {
                items: vec!["ghost".into()],
                ..PlanGroup::default()
            }],
        }),
        Err(OpError::UnknownItem(_))
    ));
    let mut twice = plan.clone();
    twice.groups[1].items.push("db".into());
    assert!(sim.c.create_plan(twice).is_err());
    sim.c.create_plan(plan).unwrap();

    // A failing pre hook fails the plan before any item moves.
    sim.world.fail = Some((
        |k| matches!(k, ActionKind::RunHook { .. }),
        Class::NonRecoverable,
        1,
    ));
    let job = sim
        .c
        .handle_command(
            sim.now,
            Command::StartPlan {
                plan: "three-tier".into(),
                failover: PlanFailover::Planned,
            },
        )
        .unwrap();
    sim.run();
    let j = sim.c.job(&job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.errors[0].contains("hook failed"), "{:?}", j.errors);
    assert_eq!(
        sim.c.status("db", sim.now).unwrap().state,
        ProtectionState::Protected
    );

    // An item whose failover is not allowed fails the plan and names the state.
    sim.cmd(Command::Resync { item: "db".into() }).unwrap();
    sim.world.fail = Some((
        |k| matches!(k, ActionKind::ResyncDisk { .. }),
        Class::NonRecoverable,
        1,
    ));
    sim.cmd(Command::Resync { item: "app".into() }).unwrap();
    assert_eq!(
        sim.c.status("app", sim.now).unwrap().state,
        ProtectionState::Resynchronizing
    );
    sim.resume_plan().unwrap_err();
    let job = through_the_manual_step(&mut sim, PlanFailover::Test(PointChoice::Latest));
    let j = sim.c.job(&job).unwrap();
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(j.errors[0].contains("resynchronizing"), "{:?}", j.errors);
    sim.c.check_invariants().unwrap();
}

#[test]
fn plan_survives_a_crash_at_every_step() {
    let mut sim = Sim::new();
    let plan = three_tier(&mut sim);
    sim.c.create_plan(plan).unwrap();
    sim.crashy = true;
    let job = through_the_manual_step(&mut sim, PlanFailover::Unplanned(PointChoice::Latest));
    assert_eq!(sim.c.job(&job).unwrap().state, JobState::Succeeded);
    for i in ["db", "app", "web"] {
        assert_eq!(
            sim.c.status(i, sim.now).unwrap().state,
            ProtectionState::UnplannedFailoverCompleted
        );
    }
}

// ------------------------------------------- resync control, change point, health, jobs

fn resync_disks(done: &[Action]) -> Vec<usize> {
    done.iter()
        .filter_map(|a| match a.kind {
            ActionKind::ResyncDisk { disk } => Some(disk),
            _ => None,
        })
        .collect()
}

#[test]
fn resync_pauses_resumes_where_it_stopped_and_cancels_to_resync_required() {
    let mut s = Sim::new();
    s.protect("vm", vec![8 * MIB, 8 * MIB]);
    s.done.clear();
    let job =
        s.c.handle_command(s.now, Command::Resync { item: "vm".into() })
            .unwrap();
    assert!(s.step() && s.step()); // tracking restarted, disk 0 compared
    let paused =
        s.c.handle_command(s.now, Command::PauseResync { item: "vm".into() })
            .unwrap();
    assert_eq!(paused, job);
    s.run();
    assert!(
        s.c.poll_timeout().is_none(),
        "nothing scheduled while paused"
    );
    let st = s.status();
    assert_eq!(st.state, ProtectionState::ResyncPaused);
    assert!(st.causes.contains(&HealthCause::ResyncPaused));
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Suspended);
    assert_eq!(
        s.c.allowed_actions(&job),
        [JobAction::Cancel, JobAction::Resume]
    );
    let e = s.cmd(Command::TestFailover {
        item: "vm".into(),
        point: PointChoice::Latest,
    });
    assert!(e.unwrap_err().to_string().contains("resync paused"));
    s.c.check_invariants().unwrap();

    // Resume (through the job's allowed action): disk 1 only, then Protected.
    s.crash();
    s.c.handle_command(s.now, Command::ResumeJob { job: job.clone() })
        .unwrap();
    s.run();
    assert_eq!(resync_disks(&s.done), [0, 1]);
    assert_eq!(s.status().state, ProtectionState::Protected);
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);

    // Cancel: resync required again; a restart starts over from disk 0.
    s.done.clear();
    let job =
        s.c.handle_command(s.now, Command::Resync { item: "vm".into() })
            .unwrap();
    assert!(s.step() && s.step());
    s.c.handle_command(s.now, Command::CancelJob { job: job.clone() })
        .unwrap();
    s.run();
    assert_eq!(s.status().state, ProtectionState::ResyncRequired);
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Cancelled);
    assert_eq!(s.c.allowed_actions(&job), [JobAction::Restart]);
    let again =
        s.c.handle_command(s.now, Command::RestartJob { job: job.clone() })
            .unwrap();
    s.run();
    assert_ne!(again, job);
    // The disk-1 compare already issued when the cancel came is performed (and ignored);
    // the restarted resync compares from disk 0 again.
    assert_eq!(resync_disks(&s.done), [0, 1, 0, 1]);
    assert_eq!(s.status().state, ProtectionState::Protected);
    // An unplanned failover is allowed from a paused resync and cancels it.
    let job =
        s.c.handle_command(s.now, Command::Resync { item: "vm".into() })
            .unwrap();
    s.step();
    s.c.handle_command(s.now, Command::PauseResync { item: "vm".into() })
        .unwrap();
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::LatestProcessed,
    })
    .unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Cancelled);
    assert_eq!(
        s.status().state,
        ProtectionState::UnplannedFailoverCompleted
    );
}

/// A commit waits for a change of recovery point to end (which point it keeps is known
/// only then): refused while the change's steps are queued, naming its job, admitted once
/// it ended.
#[test]
fn commit_waits_for_a_change_of_recovery_point_to_end() {
    let mut s = Sim::new();
    s.protect("vm", vec![4 * MIB]);
    s.tick();
    s.tick();
    let points: Vec<PointId> = s.status().points.iter().map(|p| p.id).collect();
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::Id(points[0]),
    })
    .unwrap();
    // Admitted, its steps not yet performed.
    let change =
        s.c.handle_command(
            s.now,
            Command::ChangeRecoveryPoint {
                item: "vm".into(),
                point: PointChoice::Id(points[1]),
            },
        )
        .unwrap();
    let e =
        s.c.handle_command(s.now, Command::Commit { item: "vm".into() })
            .unwrap_err();
    assert!(
        matches!(&e, OpError::Busy { job, .. } if *job == change),
        "{e}"
    );
    assert!(e.to_string().contains(&change.to_string()), "{e}");
    s.run();
    assert_eq!(s.c.job(&change).unwrap().state, JobState::Succeeded);
    s.cmd(Command::Commit { item: "vm".into() }).unwrap();
    assert_eq!(s.status().state, ProtectionState::FailoverCommitted);
}

#[test]
fn change_recovery_point_before_commit() {
    let mut s = Sim::new();
    s.protect("vm", vec![4 * MIB]);
    s.tick();
    s.tick();
    let points: Vec<PointId> = s.status().points.iter().map(|p| p.id).collect();
    assert_eq!(points.len(), 3);
    let e = s.cmd(Command::ChangeRecoveryPoint {
        item: "vm".into(),
        point: PointChoice::Id(points[1]),
    });
    assert!(e.unwrap_err().to_string().contains("protected"));
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::Id(points[0]),
    })
    .unwrap();
    assert_eq!(s.status().failover_point, Some(points[0]));
    s.done.clear();
    let job = s
        .cmd(Command::ChangeRecoveryPoint {
            item: "vm".into(),
            point: PointChoice::Id(points[1]),
        })
        .unwrap();
    assert_eq!(
        s.kinds(),
        [
            &ActionKind::StopTarget,
            &ActionKind::MaterializeDisks {
                point: points[1],
                purpose: Purpose::Failover
            },
            &ActionKind::StartTarget { point: points[1] },
        ]
    );
    assert_eq!(s.c.job(&job).unwrap().kind, JobKind::ChangeRecoveryPoint);
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    s.cmd(Command::Commit { item: "vm".into() }).unwrap();
    let st = s.status();
    assert_eq!(
        st.points.iter().map(|p| p.id).collect::<Vec<_>>(),
        [points[1]]
    );
}

#[test]
fn missed_cycles_turn_health_to_warning_until_cycles_catch_up() {
    let mut s = Sim::new();
    s.protect("vm", vec![4 * MIB]);
    assert_eq!(s.status().health, Health::Normal);
    // The driver slept through ten intervals.
    s.now += 11 * 5 * MIN;
    let st = s.status();
    assert!(
        st.causes.contains(&HealthCause::MissedCycles {
            missed: 10,
            due: 10
        }),
        "{:?}",
        st.causes
    );
    assert_eq!(st.health, Health::Warning);
    s.c.handle_timeout(s.now);
    s.run();
    assert!(s.status().causes.contains(&HealthCause::MissedCycles {
        missed: 10,
        due: 11
    }));
    for _ in 0..40 {
        s.tick();
    }
    // 10 of 51 missed: under 20 %.
    let st = s.status();
    assert_eq!(st.health, Health::Normal, "{:?}", st.causes);
}

#[test]
fn job_actions_follow_the_job_state() {
    let mut s = Sim::new();
    s.world.fail = Some((
        |k| matches!(k, ActionKind::CopyDiskRange { .. }),
        Class::NonRecoverable,
        1,
    ));
    let job = s.protect("vm", vec![4 * MIB]);
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Suspended);
    assert_eq!(s.c.allowed_actions(&job), [JobAction::Resume]);
    assert!(
        s.c.handle_command(s.now, Command::CancelJob { job: job.clone() })
            .is_err()
    );
    assert!(
        s.c.handle_command(s.now, Command::RestartJob { job: job.clone() })
            .is_err()
    );
    s.c.handle_command(s.now, Command::ResumeJob { job: job.clone() })
        .unwrap();
    s.run();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    assert!(s.c.allowed_actions(&job).is_empty());
    assert!(
        s.c.handle_command(s.now, Command::ResumeJob { job: job.clone() })
            .is_err()
    );
    assert!(
        s.c.handle_command(s.now, Command::RestartJob { job: job.clone() })
            .is_err()
    );
}

#[test]
fn scheduled_initial_replication_tracks_now_and_copies_later() {
    let mut s = Sim::new();
    let at = Duration::from_secs(2 * 3600);
    s.protect_with(
        "vm",
        vec![8 * MIB],
        ReplicationPolicy {
            initial_replication_at: Some(at),
            ..Sim::policy()
        },
    );
    assert_eq!(s.kinds(), [&ActionKind::StartTracking]);
    let st = s.status();
    assert_eq!(st.state, ProtectionState::InitialReplicationInProgress);
    assert_eq!(st.initial_copy, [(0, 8 * MIB)]);
    assert_eq!(s.c.poll_timeout(), Some(at));
    s.crash();
    s.tick();
    assert_eq!(s.now, at);
    assert_eq!(s.status().state, ProtectionState::Protected);
    assert!(matches!(s.kinds()[1], ActionKind::CopyDiskRange { .. }));
}

#[test]
fn automatic_resync_waits_for_its_daily_window() {
    let window = ResyncWindow {
        start: Duration::from_secs(3600),
        end: Duration::from_secs(3 * 3600),
    };
    assert!(window.contains(Duration::from_secs(86_400 + 7200)));
    assert!(!window.contains(Duration::from_secs(3 * 3600)));
    let wraps = ResyncWindow {
        start: Duration::from_secs(23 * 3600),
        end: Duration::from_secs(3600),
    };
    assert!(
        wraps.contains(Duration::from_secs(1800)) && wraps.contains(Duration::from_secs(23 * 3600))
    );
    assert!(!wraps.contains(Duration::from_secs(12 * 3600)));
    assert_eq!(
        wraps.next_open(Duration::from_secs(12 * 3600)),
        Duration::from_secs(23 * 3600)
    );

    let mut s = Sim::new();
    s.now = Duration::from_secs(10 * 3600);
    s.protect_with(
        "vm",
        vec![4 * MIB],
        ReplicationPolicy {
            resync_window: Some(window),
            ..Sim::policy()
        },
    );
    s.world.log_bytes = 3 * MIB; // over half the disk
    s.tick();
    assert_eq!(s.status().state, ProtectionState::ResyncRequired);
    // The next day at 01:00.
    assert_eq!(s.c.poll_timeout(), Some(Duration::from_secs(86_400 + 3600)));
    s.world.log_bytes = 4096;
    s.crash();
    s.tick();
    assert_eq!(s.now, Duration::from_secs(86_400 + 3600));
    assert_eq!(s.status().state, ProtectionState::Protected);
    assert!(
        s.kinds()
            .iter()
            .any(|k| matches!(k, ActionKind::ResyncDisk { .. }))
    );
}

/// Each item's record stands alone: persisted, taken out and loaded into another
/// coordinator (another driver), it carries on where it stopped, its jobs with it.
#[test]
fn an_item_record_moves_between_coordinators_and_carries_on() {
    let mut s = Sim::new();
    s.protect("vm", vec![2 * MIB]);
    s.tick();
    // Stop mid-cycle: CloseLogs taken, its outcome never reported.
    s.now = s.c.poll_timeout().unwrap();
    s.c.handle_timeout(s.now);
    let a = s.c.poll_action().unwrap();
    assert!(matches!(a.kind, ActionKind::CloseLogs { .. }));
    let json = serde_json::to_string(&s.c.item_record("vm").unwrap()).unwrap();
    assert!(s.c.remove_item("vm").is_some());
    assert!(s.c.poll_action().is_none() && s.c.status("vm", s.now).is_none());

    let record: ItemRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(record.state(), ProtectionState::Protected);
    assert_eq!(record.status(s.now).points.len(), 2);
    assert_eq!(record.jobs().count(), 1);
    let mut other = Sim::new();
    other.now = s.now;
    other.c.insert_item(other.now, "vm", record);
    // The action in flight is issued again; the cycle completes.
    let again = other.c.poll_action().unwrap();
    assert_eq!(again.kind, a.kind);
    let outcome = other.answer(&again);
    other
        .c
        .handle_outcome(other.now, again.id, outcome)
        .unwrap();
    other.run();
    assert_eq!(other.status().points.len(), 3);
    other.c.check_invariants().unwrap();
}

/// Job ids are numbered per item: the jobs of items protected by two drivers never
/// collide when a third loads both.
#[test]
fn job_ids_name_their_item_and_never_collide_across_drivers() {
    let (mut a, mut b) = (Sim::new(), Sim::new());
    let ja = a.protect("vm", vec![MIB]);
    let jb = b.protect("db", vec![MIB]);
    assert_eq!(
        (ja.to_string(), jb.to_string()),
        ("vm#1".into(), "db#1".into())
    );
    assert_eq!("db#1".parse::<JobId>().unwrap(), jb);
    assert!("db".parse::<JobId>().is_err() && "#1".parse::<JobId>().is_err());
    let mut c = Coordinator::new();
    c.insert_item(a.now, "vm", a.c.item_record("vm").unwrap());
    c.insert_item(b.now, "db", b.c.item_record("db").unwrap());
    let ids: Vec<String> = c.jobs().map(|j| j.id.to_string()).collect();
    assert_eq!(ids, ["db#1", "vm#1"]);
    assert_eq!(c.job(&ja).unwrap().item(), "vm");
    assert_eq!(c.job(&jb).unwrap().kind, JobKind::EnableProtection);
    // A plan may not take an item's name, nor an item a plan's.
    let plan = |name: &str| RecoveryPlan {
        name: name.into(),
        groups: vec![PlanGroup {
            items: vec!["vm".into()],
            ..PlanGroup::default()
        }],
    };
    assert!(c.create_plan(plan("db")).is_err());
    c.create_plan(plan("p")).unwrap();
    let r = c.handle_command(
        a.now,
        Command::EnableProtection {
            item: "p".into(),
            disks: vec![MIB],
            policy: Sim::policy(),
        },
    );
    assert!(matches!(r, Err(OpError::AlreadyProtected(_))), "{r:?}");
}

/// The driver that shipped a cycle's logs is gone while the cycle was being applied: the
/// new driver takes over; the rest of the cycle cannot be applied, so a failover to
/// "latest" uses the newest recovery point, never the half-applied replica.
#[test]
fn after_a_take_over_mid_cycle_latest_is_the_newest_point() {
    let mut s = Sim::new();
    let policy = ReplicationPolicy {
        auto_resync: false,
        ..Sim::policy()
    };
    s.protect_with("vm", vec![2 * MIB], policy);
    s.tick();
    let newest = s.status().points.last().unwrap().id;
    s.now = s.c.poll_timeout().unwrap();
    s.c.handle_timeout(s.now);
    // CloseLogs done, then ApplyLogs fails for good (its logs are unreadable here).
    assert!(s.step());
    let a = s.c.poll_action().unwrap();
    assert!(matches!(a.kind, ActionKind::ApplyLogs { .. }));
    s.c.handle_outcome(
        s.now,
        a.id,
        Outcome::Failed {
            class: Class::NonRecoverable,
            message: "staged log missing".into(),
        },
    )
    .unwrap();
    assert_eq!(s.status().health, Health::Critical);

    let job = s.cmd(Command::TakeOver { item: "vm".into() }).unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    // The lost cycle no longer holds the item; its replica needs a resync, and says so.
    let st = s.status();
    assert_eq!(st.state, ProtectionState::ResyncRequired);
    assert!(
        st.causes
            .contains(&HealthCause::ResyncRequired(ResyncReason::LogsLost)),
        "{st:?}"
    );
    assert!(
        !st.causes
            .iter()
            .any(|c| matches!(c, HealthCause::NonRecoverableError { .. }))
    );
    s.done.clear();
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::Latest,
    })
    .unwrap();
    assert_eq!(
        s.status().state,
        ProtectionState::UnplannedFailoverCompleted
    );
    assert_eq!(s.status().failover_point, Some(newest));
    assert!(
        !s.kinds().iter().any(|k| matches!(
            k,
            ActionKind::ProcessPendingLogs | ActionKind::CreateRecoveryPoint { .. }
        )),
        "{:?}",
        s.kinds()
    );
}

/// A take-over between cycles loses nothing: delta cycles carry on under the new driver.
#[test]
fn a_take_over_between_cycles_keeps_replicating() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.cmd(Command::TakeOver { item: "vm".into() }).unwrap();
    let before = s.status().points.len();
    s.tick();
    s.tick();
    assert_eq!(s.status().points.len(), before + 2);
    assert_eq!(s.status().health, Health::Normal);
}

/// During a resync the replica is part old, part new: an unplanned failover to "latest"
/// uses the newest recovery point instead of snapshotting it.
#[test]
fn latest_during_a_resync_is_the_newest_point() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB, MIB]);
    let newest = s.status().points.last().unwrap().id;
    s.c.handle_command(s.now, Command::Resync { item: "vm".into() })
        .unwrap();
    // StartTracking and the first disk's resync land; the second is cut short.
    assert!(s.step() && s.step());
    assert_eq!(s.status().state, ProtectionState::Resynchronizing);
    s.done.clear();
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::Latest,
    })
    .unwrap();
    assert_eq!(s.status().failover_point, Some(newest));
    assert!(
        !s.kinds()
            .iter()
            .any(|k| matches!(k, ActionKind::CreateRecoveryPoint { .. })),
        "{:?}",
        s.kinds()
    );
}

/// A point is app-consistent exactly when its cycle's logs were closed at a quiesced
/// snapshot, and its time is when its cycle closed (never later, never in the future).
#[test]
fn points_say_what_their_data_is_and_when() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    for i in 0..6 {
        s.world.quiesced = i % 3 == 1;
        s.tick();
    }
    let pts = s.status().points;
    let app: Vec<bool> = pts.iter().map(|p| p.app_consistent).collect();
    assert_eq!(app, [false, false, true, false, false, true, false]);
    assert!(pts.windows(2).all(|w| w[0].time <= w[1].time));
    // A cycle whose apply is retried a minute later still describes its close.
    s.world.fail = Some((
        |k| matches!(k, ActionKind::ApplyLogs { .. }),
        Class::Recoverable,
        1,
    ));
    let due = s.c.poll_timeout().unwrap();
    s.tick();
    assert_eq!(s.now, due);
    s.tick();
    assert_eq!(s.now, due + MIN, "the retry came a minute later");
    let last = *s.status().points.last().unwrap();
    assert_eq!(
        last.time, due,
        "the point is stamped with its cycle's close"
    );
    assert!(s.status().points.iter().all(|p| p.time <= s.now));
}

/// A delta cycle on request: a job of its own, a point at once, and the schedule moves
/// from there; refused unless Protected.
#[test]
fn replicate_now_runs_a_cycle_at_once() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    let before = s.status();
    s.now += MIN;
    let job = s.cmd(Command::ReplicateNow { item: "vm".into() }).unwrap();
    let j = s.c.job(&job).unwrap();
    assert_eq!((j.kind, j.state), (JobKind::Replicate, JobState::Succeeded));
    let st = s.status();
    assert_eq!(st.cycles_applied, before.cycles_applied + 1);
    assert_eq!(st.points.len(), before.points.len() + 1);
    assert_eq!(st.points.last().unwrap().time, s.now);
    assert_eq!(s.c.poll_timeout(), Some(s.now + MIN * 5));
    // A log that needs a resync fails the job and says why.
    s.world.clean = false;
    let job = s.cmd(Command::ReplicateNow { item: "vm".into() }).unwrap();
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Failed);
    assert_eq!(s.status().state, ProtectionState::Resynchronizing);
    s.world.clean = true;
    let r = s.cmd(Command::ReplicateNow { item: "vm".into() });
    assert!(matches!(r, Err(OpError::NotAllowed { .. })), "{r:?}");
}

/// Every closed cycle has its own number: a cycle stuck before it was applied is never
/// confused with the planned failover's final one, or with a resync's own.
#[test]
fn cycle_numbers_are_never_reused() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.world.fail = Some((
        |k| matches!(k, ActionKind::ApplyLogs { .. }),
        Class::Recoverable,
        100,
    ));
    s.tick();
    assert!(
        s.status()
            .causes
            .iter()
            .any(|c| matches!(c, HealthCause::Retrying { .. }))
    );
    s.world.fail = None;
    s.cmd(Command::PlannedFailover { item: "vm".into() })
        .unwrap();
    s.c.handle_timeout(s.now + MIN * 30);
    s.run();
    let cycles: Vec<u64> = s
        .done
        .iter()
        .filter_map(|a| match a.kind {
            ActionKind::CloseLogs { cycle } => Some(cycle),
            _ => None,
        })
        .collect();
    let mut unique = cycles.clone();
    unique.dedup();
    assert_eq!(
        cycles, unique,
        "a cycle number was closed twice: {cycles:?}"
    );
    assert_eq!(s.status().state, ProtectionState::PlannedFailoverCompleted);
}

/// "Now" runs a scheduled retry and the next cycle at once, without moving the clock.
#[test]
fn expedite_runs_retries_and_cycles_now() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.world.fail = Some((
        |k| matches!(k, ActionKind::CloseLogs { .. }),
        Class::Recoverable,
        1,
    ));
    s.tick();
    assert!(s.c.poll_timeout().unwrap() > s.now, "a retry waits");
    let points = s.status().points.len();
    s.c.expedite(s.now);
    s.run();
    assert_eq!(s.status().points.len(), points + 1);
    assert_eq!(s.status().points.last().unwrap().time, s.now);
    s.c.expedite(s.now);
    s.run();
    assert_eq!(
        s.status().points.len(),
        points + 2,
        "the next cycle ran at once"
    );
}

/// A cycle's point describes the moment its newest log was closed (the host says when); a
/// cycle without logs changes nothing, so its point describes the previous one's moment;
/// a full copy describes the moment it read the disks.
#[test]
fn a_point_is_stamped_with_its_newest_log() {
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    let protected_at = s.status().points[0].time;
    assert_eq!(protected_at, s.now);
    let due = s.c.poll_timeout().unwrap();
    s.now = due;
    s.c.handle_timeout(due);
    let a = s.c.poll_action().unwrap();
    let closed = due - MIN * 3;
    let report = LogReport {
        closed_at: Some(closed),
        ..LogReport::clean(0, 4096)
    };
    s.c.handle_outcome(s.now, a.id, Outcome::Logs(vec![report]))
        .unwrap();
    s.run();
    assert_eq!(s.status().points.last().unwrap().time, closed);
    // No logs: nothing new since the last point.
    s.world.log_bytes = 0;
    s.tick();
    assert_eq!(s.status().points.last().unwrap().time, closed);
    // A resync reads the disks now.
    s.world.log_bytes = 4096;
    s.now += MIN;
    s.cmd(Command::Resync { item: "vm".into() }).unwrap();
    assert_eq!(s.status().points.last().unwrap().time, s.now);
}

#[test]
fn a_cycle_queued_behind_logs_that_need_a_resync_is_not_applied() {
    let mut s = Sim::new();
    s.protect_with(
        "vm",
        vec![MIB],
        ReplicationPolicy {
            auto_resync: false,
            ..Sim::policy()
        },
    );
    // The first cycle's close fails (retried later); a second cycle queues behind it.
    s.world.fail = Some((
        |k| matches!(k, ActionKind::CloseLogs { .. }),
        Class::Recoverable,
        1,
    ));
    let first = s.cmd(Command::ReplicateNow { item: "vm".into() }).unwrap();
    let second = s.cmd(Command::ReplicateNow { item: "vm".into() }).unwrap();
    let applied = s.done.len();
    // The first cycle's logs were not closed cleanly: nothing may apply on top of them.
    s.world.clean = false;
    s.tick();
    let st = s.status();
    assert_eq!(st.state, ProtectionState::ResyncRequired);
    assert!(
        !s.done[applied..].iter().any(|a| matches!(
            a.kind,
            ActionKind::ApplyLogs { .. } | ActionKind::CreateRecoveryPoint { .. }
        )),
        "{:?}",
        s.kinds()
    );
    let state = |id: &JobId| s.c.jobs().find(|j| j.id == *id).unwrap().state;
    assert_eq!(state(&first), JobState::Failed);
    assert_eq!(state(&second), JobState::Cancelled);
}

#[test]
fn a_cancelled_failover_returns_to_the_resync_it_interrupted() {
    let mut s = Sim::new();
    s.protect_with(
        "vm",
        vec![MIB],
        ReplicationPolicy {
            auto_resync: false,
            ..Sim::policy()
        },
    );
    s.world.clean = false;
    s.tick();
    assert_eq!(s.status().state, ProtectionState::ResyncRequired);
    s.world.clean = true;
    s.cmd(Command::UnplannedFailover {
        item: "vm".into(),
        point: PointChoice::Latest,
    })
    .unwrap();
    assert_eq!(
        s.status().state,
        ProtectionState::UnplannedFailoverCompleted
    );
    s.cmd(Command::CancelFailover { item: "vm".into() })
        .unwrap();
    let st = s.status();
    // The replica still needs its resync: no cycle may make a point of it.
    assert_eq!(st.state, ProtectionState::ResyncRequired);
    assert!(st.causes.iter().any(|c| matches!(
        c,
        HealthCause::ResyncRequired(ResyncReason::LogNotClosedCleanly { disk: 0 })
    )));
}

/// A policy change takes effect at once: the next cycle is due one new interval from now
/// at the latest, points beyond the new retention go, a bad policy is refused.
#[test]
fn a_policy_change_takes_effect_at_once() {
    let mut s = Sim::new();
    s.protect_with(
        "vm",
        vec![MIB],
        ReplicationPolicy {
            copy_frequency: CopyFrequency::Minutes15,
            ..Sim::policy()
        },
    );
    for _ in 0..4 {
        s.now += MIN * 15;
        s.tick();
    }
    let points = s.status().points.len();
    assert!(points >= 4, "{points}");
    s.now += MIN;
    let job = s
        .cmd(Command::ChangePolicy {
            item: "vm".into(),
            policy: ReplicationPolicy {
                copy_frequency: CopyFrequency::Seconds30,
                retention: Duration::from_secs(1800),
                ..Sim::policy()
            },
        })
        .unwrap();
    let j = s.c.job(&job).unwrap();
    assert_eq!(
        (j.kind, j.state),
        (JobKind::ChangePolicy, JobState::Succeeded)
    );
    assert!(s.c.poll_timeout().unwrap() <= s.now + Duration::from_secs(30));
    let st = s.status();
    assert!(
        st.points.len() < points,
        "old points pruned: {:?}",
        st.points
    );
    assert!(!st.points.is_empty(), "the newest point is kept");
    let bad = s.cmd(Command::ChangePolicy {
        item: "vm".into(),
        policy: ReplicationPolicy {
            retention: Duration::ZERO,
            ..Sim::policy()
        },
    });
    assert!(matches!(bad, Err(OpError::InvalidPolicy(_))), "{bad:?}");
}

#[test]
fn disable_protection_stops_tracking_and_deletes_the_replica_only_when_asked() {
    // Kept replica: tracking stops, nothing is deleted.
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.tick();
    let before = s.done.len();
    s.cmd(Command::DisableProtection {
        item: "vm".into(),
        delete_replica: false,
    })
    .unwrap();
    let kinds: Vec<&ActionKind> = s.done[before..].iter().map(|a| &a.kind).collect();
    assert_eq!(kinds, [&ActionKind::StopTracking]);
    assert_eq!(s.status().state, ProtectionState::ProtectionDisabled);
    assert_eq!(s.c.poll_timeout(), None, "no cycle is scheduled any more");

    // During a resync, with the replica deleted: the resync is cancelled, every point
    // and then the replica go.
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    s.tick();
    s.c.handle_command(s.now, Command::Resync { item: "vm".into() })
        .unwrap();
    assert!(s.step(), "the resync started");
    let points = s.status().points.len();
    let before = s.done.len();
    let job = s
        .cmd(Command::DisableProtection {
            item: "vm".into(),
            delete_replica: true,
        })
        .unwrap();
    // The resync's action already in flight ends; nothing of the resync follows it.
    let kinds: Vec<&ActionKind> = s.done[before..]
        .iter()
        .map(|a| &a.kind)
        .skip_while(|k| **k != ActionKind::StopTracking)
        .collect();
    assert_eq!(kinds[0], &ActionKind::StopTracking);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| matches!(k, ActionKind::DeleteRecoveryPoint { .. }))
            .count(),
        points
    );
    assert_eq!(kinds.last(), Some(&&ActionKind::DeleteReplica));
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(k, ActionKind::ResyncDisk { .. }))
    );
    let st = s.status();
    assert_eq!(
        (st.state, st.points.len()),
        (ProtectionState::ProtectionDisabled, 0)
    );
    assert_eq!(s.c.job(&job).unwrap().state, JobState::Succeeded);
    let resync =
        s.c.jobs()
            .find(|j| j.kind == JobKind::Resynchronize)
            .unwrap();
    assert_eq!(resync.state, JobState::Cancelled);

    // Refused during a failover, during a test failover and for an item of a plan.
    let mut s = Sim::new();
    s.protect("vm", vec![MIB]);
    let off = || Command::DisableProtection {
        item: "vm".into(),
        delete_replica: true,
    };
    s.cmd(Command::TestFailover {
        item: "vm".into(),
        point: PointChoice::Latest,
    })
    .unwrap();
    let e = s.cmd(off()).unwrap_err().to_string();
    assert!(e.contains("clean up the test failover first"), "{e}");
    s.cmd(Command::TestFailoverCleanup { item: "vm".into() })
        .unwrap();
    s.cmd(Command::PlannedFailover { item: "vm".into() })
        .unwrap();
    let e = s.cmd(off()).unwrap_err().to_string();
    assert!(e.contains("commit the failover first"), "{e}");
    s.cmd(Command::CancelFailover { item: "vm".into() })
        .unwrap();
    s.c.create_plan(RecoveryPlan {
        name: "p".into(),
        groups: vec![PlanGroup {
            items: vec!["vm".into()],
            pre: vec![],
            post: vec![],
        }],
    })
    .unwrap();
    let e = s.cmd(off()).unwrap_err();
    assert!(matches!(e, OpError::InPlan { .. }), "{e}");
    s.c.remove_plan("p");
    s.cmd(off()).unwrap();
    assert_eq!(s.status().state, ProtectionState::ProtectionDisabled);
}
