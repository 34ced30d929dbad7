//! The commands that work on protected items.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lifeboat_pageblob::PageStore;
use lifeboat_replication::{
    Command, CopyFrequency, JobId, PlanAction, PlanActionKind, PlanFailover, PlanGroup, PlanScope,
    PointChoice, PointId, ProtectionState, RecoveryPlan, ReplicationPolicy,
};
use serde_json::json;

use crate::agent::Agent;
use crate::state::{self, Export, ItemState, Location, Tracking};
use crate::{Cli, Cmd, Format, Frequency, JobCmd, PlanCmd};

/// Runs an item command against `store`.
pub(crate) async fn run<S: PageStore + 'static>(
    store: Arc<S>,
    azure: bool,
    cli: &Cli,
) -> Result<()> {
    let mut a = Agent::open(store, &cli.target.site, azure, cli.json)?;
    // Finish whatever an interrupted process left in flight first.
    let resumed: Vec<JobId> = a
        .state
        .coordinator
        .jobs()
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.id.clone())
        .collect();
    a.drive().await?;
    match &cli.command {
        Cmd::Protect {
            item,
            disks,
            copy_frequency,
            retention,
            block_size,
        } => {
            let policy = policy(*copy_frequency, *retention)?;
            protect(&mut a, item, disks, policy, *block_size).await
        }
        Cmd::Replicate { item, logs } => replicate(&mut a, item, logs).await,
        Cmd::Resync {
            item,
            pause,
            resume,
            cancel,
        } => {
            let cmd = if *pause {
                Command::PauseResync { item: item.clone() }
            } else if *resume {
                Command::ResumeResync { item: item.clone() }
            } else if *cancel {
                Command::CancelResync { item: item.clone() }
            } else {
                return resync(&mut a, item, &resumed).await;
            };
            a.command(cmd).await?;
            println!("{item}: {:?}", a.protection(item)?);
            Ok(())
        }
        Cmd::ChangePoint { item, point } => {
            let point = parse_point(point)?;
            a.command(Command::ChangeRecoveryPoint {
                item: item.clone(),
                point,
            })
            .await?;
            print_locations(&a.item(item)?.recovered);
            Ok(())
        }
        Cmd::Job { command } => job(&mut a, command).await,
        Cmd::Status { item } => status(&mut a, item.as_deref(), cli.json),
        Cmd::Jobs { item } => jobs(&a, item.as_deref(), cli.json),
        Cmd::Points { item } => points(&mut a, item, cli.json),
        Cmd::TestFailover {
            item,
            point,
            out,
            format,
        } => test_failover(&mut a, item, parse_point(point)?, export(out, *format)).await,
        Cmd::TestFailoverCleanup { item } => {
            a.command(Command::TestFailoverCleanup { item: item.clone() })
                .await?;
            Ok(())
        }
        Cmd::Failover {
            item,
            planned,
            point,
            logs,
            out,
            format,
            ..
        } => {
            if !azure && out.is_none() {
                bail!("on the local site, failover needs --out DIR for the recovered disks");
            }
            let ex = out.as_ref().map(|o| export(o, *format)).unwrap_or_default();
            let how = if *planned {
                Failover::Planned(logs)
            } else {
                Failover::Unplanned(parse_point(point)?)
            };
            failover(&mut a, item, how, ex).await
        }
        Cmd::Commit { item } => {
            a.command(Command::Commit { item: item.clone() }).await?;
            Ok(())
        }
        Cmd::Cancel { item } => {
            let cmd = match a.protection(item)? {
                ProtectionState::FailbackInProgress | ProtectionState::FailbackCompleted => {
                    Command::CancelFailback { item: item.clone() }
                }
                _ => Command::CancelFailover { item: item.clone() },
            };
            a.command(cmd).await?;
            Ok(())
        }
        Cmd::Failback { item, to, full } => failback(&mut a, item, to, *full).await,
        Cmd::Reprotect { item } => reprotect(&mut a, item).await,
        Cmd::Repair { item } => {
            a.command(Command::RepairReplication { item: item.clone() })
                .await?;
            Ok(())
        }
        Cmd::Resume { now } => {
            let t = a.now();
            let at = match a.state.coordinator.poll_timeout() {
                Some(due) if *now => due.max(t),
                _ => t,
            };
            a.state.clock = at;
            a.state.coordinator.handle_timeout(at);
            a.drive().await?;
            a.save()
        }
        Cmd::GuestWrite {
            item,
            disk,
            log,
            writes,
            size,
            seed,
        } => crate::demo::guest_write(&mut a, item, *disk, log, *writes, *size, *seed),
        Cmd::Plan { command } => plan(&mut a, command).await,
        Cmd::Demo { .. } | Cmd::Hrl { .. } | Cmd::Diff { .. } => {
            unreachable!("run without a store")
        }
    }
}

pub(crate) fn policy(f: Frequency, retention_hours: u64) -> Result<ReplicationPolicy> {
    if !(1..=24).contains(&retention_hours) {
        bail!("--retention must be 1..=24 hours, got {retention_hours}");
    }
    Ok(ReplicationPolicy {
        copy_frequency: match f {
            Frequency::S30 => CopyFrequency::Seconds30,
            Frequency::M5 => CopyFrequency::Minutes5,
            Frequency::M15 => CopyFrequency::Minutes15,
        },
        retention: Duration::from_secs(retention_hours * 3600),
        // The agent starts resyncs when asked (`lifeboat resync`), as the CLI has it.
        auto_resync: false,
        copy_chunk: 16 << 20,
        ..ReplicationPolicy::default()
    })
}

fn export(dir: &Path, format: Format) -> Export {
    Export {
        dir: Some(dir.to_path_buf()),
        vhd: format == Format::Vhd,
    }
}

fn parse_point(s: &str) -> Result<PointChoice> {
    Ok(match s {
        "latest" => PointChoice::Latest,
        "latest-processed" => PointChoice::LatestProcessed,
        "latest-app-consistent" => PointChoice::LatestAppConsistent,
        id => PointChoice::Id(PointId(id.parse().with_context(|| {
            format!("--point: expected latest, latest-processed, latest-app-consistent or a point id, got {id}")
        })?)),
    })
}

/// How a failover goes.
pub(crate) enum Failover<'a> {
    /// Planned, with the final logs.
    Planned(&'a [(usize, PathBuf)]),
    /// Unplanned, to a point.
    Unplanned(PointChoice),
}

/// Test failover of an item into `ex`.
pub(crate) async fn test_failover<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    point: PointChoice,
    ex: Export,
) -> Result<()> {
    a.item_mut(item)?.test_export = ex;
    a.command(Command::TestFailover {
        item: item.to_owned(),
        point,
    })
    .await?;
    print_locations(&a.item(item)?.test_disks);
    Ok(())
}

/// Planned or unplanned failover of an item into `ex`.
pub(crate) async fn failover<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    how: Failover<'_>,
    ex: Export,
) -> Result<()> {
    a.item_mut(item)?.failover_export = ex;
    let cmd = match how {
        Failover::Planned(logs) => {
            if !logs.is_empty() {
                a.stage_logs(item, logs)?;
                a.save()?;
            }
            Command::PlannedFailover {
                item: item.to_owned(),
            }
        }
        Failover::Unplanned(point) => Command::UnplannedFailover {
            item: item.to_owned(),
            point,
        },
    };
    a.command(cmd).await?;
    print_locations(&a.item(item)?.recovered);
    Ok(())
}

/// After failback: completes it if needed, then resumes replication (a no-op when the item
/// is protected again already).
pub(crate) async fn reprotect<S: PageStore + 'static>(a: &mut Agent<S>, item: &str) -> Result<()> {
    if a.protection(item)? == ProtectionState::FailbackCompleted {
        a.command(Command::CompleteFailback {
            item: item.to_owned(),
        })
        .await?;
    }
    // In any other state than Protected the coordinator names the state that forbids it.
    if a.protection(item)? != ProtectionState::Protected {
        a.command(Command::Reprotect {
            item: item.to_owned(),
        })
        .await?;
    }
    Ok(())
}

fn print_locations(ls: &[Location]) {
    for (d, l) in ls.iter().enumerate() {
        match l {
            Location::File { path, .. } => println!("disk {d}: {}", path.display()),
            Location::Blob { name, download } => match download {
                Some(p) => println!("disk {d}: blob {name} (downloaded to {})", p.display()),
                None => println!("disk {d}: blob {name}"),
            },
        }
    }
}

/// Enable protection (or finish an interrupted one).
pub(crate) async fn protect<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    disks: &[PathBuf],
    policy: ReplicationPolicy,
    block_size: u64,
) -> Result<()> {
    let mut paths = Vec::new();
    let mut sizes = Vec::new();
    for d in disks {
        let p = d
            .canonicalize()
            .with_context(|| format!("disk {}", d.display()))?;
        let len = std::fs::metadata(&p)?.len();
        if len == 0 || !len.is_multiple_of(512) {
            bail!(
                "disk {} is {len} bytes: a disk is a non-zero multiple of 512 bytes",
                p.display()
            );
        }
        paths.push(p);
        sizes.push(len);
    }
    let bs = u32::try_from(block_size)
        .ok()
        .and_then(|b| lifeboat_resync::BlockSize::new(b).ok())
        .with_context(|| format!("--block-size {block_size} is not a valid block size"))?;
    if let Some(existing) = a.state.items.get(item) {
        if existing.disks != paths {
            bail!("{item} is already protected with other disks");
        }
        let st = a.protection(item)?;
        println!("{item} is already protected ({st:?})");
        return Ok(());
    }
    a.state.items.insert(
        item.to_owned(),
        ItemState {
            disks: paths,
            sizes: sizes.clone(),
            block_size: bs.get(),
            tracking: vec![Tracking::default(); sizes.len()],
            source_running: true,
            ..ItemState::default()
        },
    );
    let r = a
        .command(Command::EnableProtection {
            item: item.to_owned(),
            disks: sizes,
            policy,
        })
        .await;
    if let Err(e) = &r
        && a.state.coordinator.status(item, a.state.clock).is_none()
    {
        // Refused before anything started: forget the item.
        a.state.items.remove(item);
        bail!("{e:#}");
    }
    r?;
    let st = a.protection(item)?;
    if !a.quiet {
        println!("{item}: {st:?}");
    }
    Ok(())
}

/// Stage logs and run a delta cycle now.
pub(crate) async fn replicate<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    logs: &[(usize, PathBuf)],
) -> Result<()> {
    let st = a.protection(item)?;
    if st != ProtectionState::Protected {
        bail!("replicate is not allowed while {item} is {st:?}");
    }
    let fresh = a.stage_logs(item, logs)?;
    a.save()?;
    if fresh == 0 && a.item(item)?.pending.is_empty() {
        println!("{item}: nothing new to apply");
        return Ok(());
    }
    let before = a
        .state
        .coordinator
        .status(item, a.state.clock)
        .map_or(0, |s| s.cycles_applied);
    // A delta cycle now: the clock moves to the cycle's deadline if that is later.
    for _ in 0..4 {
        if a.item(item)?.pending.is_empty() {
            break;
        }
        let now = a.now();
        let at = a
            .state
            .coordinator
            .poll_timeout()
            .map_or(now, |t| t.max(now));
        a.state.clock = at;
        a.state.coordinator.handle_timeout(at);
        a.drive().await?;
    }
    let now = a.now();
    let s = a
        .state
        .coordinator
        .status(item, now)
        .context("item vanished")?;
    if let Some(c) = s.causes.iter().find(|c| {
        matches!(
            c,
            lifeboat_replication::HealthCause::NonRecoverableError { .. }
                | lifeboat_replication::HealthCause::Retrying { .. }
        )
    }) {
        bail!("{item}: {c:?}");
    }
    if s.state == ProtectionState::ResyncRequired {
        println!(
            "{item}: resync required ({:?}); the log was not applied; run `lifeboat resync {item}`",
            s.causes
        );
    } else {
        println!(
            "{item}: {} cycle(s) applied, {} recovery point(s)",
            s.cycles_applied - before,
            s.points.len()
        );
    }
    Ok(())
}

pub(crate) async fn resync<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    resumed: &[JobId],
) -> Result<()> {
    a.item(item)?;
    // A resync an interrupted run of this command left behind was just completed.
    let finished = resumed.iter().any(|id| {
        a.state.coordinator.job(id).is_some_and(|j| {
            j.item() == item
                && j.kind == lifeboat_replication::JobKind::Resynchronize
                && j.state == lifeboat_replication::JobState::Succeeded
        })
    });
    if !finished {
        a.command(Command::Resync {
            item: item.to_owned(),
        })
        .await?;
    }
    for (d, r) in a.item(item)?.last_resync.iter().enumerate() {
        println!(
            "{item} disk {d}: {} blocks compared, {} bytes sent, {} bytes cleared",
            r.blocks_compared, r.bytes_sent, r.bytes_cleared
        );
    }
    Ok(())
}

pub(crate) async fn failback<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    to: &[PathBuf],
    full: bool,
) -> Result<()> {
    let it = a.item(item)?;
    if to.len() != it.disks.len() {
        bail!(
            "{item} has {} disk(s); --to names {}",
            it.disks.len(),
            to.len()
        );
    }
    let mut targets = Vec::new();
    for p in to {
        let abs = if p.is_absolute() {
            p.clone()
        } else {
            std::env::current_dir()?.join(p)
        };
        targets.push(abs.canonicalize().unwrap_or(abs));
    }
    for (d, (p, &len)) in targets.iter().zip(&it.sizes).enumerate() {
        // An alternate disk may not exist yet (it is created); one that exists must fit.
        if let Ok(m) = std::fs::metadata(p)
            && m.len() != len
        {
            bail!(
                "--to {} is {} bytes but disk {d} is {len} bytes",
                p.display(),
                m.len()
            );
        }
    }
    let alternate = targets != it.disks;
    let st = a.protection(item)?;
    if st == ProtectionState::FailoverCommitted {
        a.item_mut(item)?.failback_to = targets;
    }
    // A failback an interrupted run left completed needs nothing more.
    if st != ProtectionState::FailbackCompleted {
        a.command(Command::Failback {
            item: item.to_owned(),
            full,
            alternate,
        })
        .await?;
    }
    for (d, r) in a.item(item)?.last_sync_back.iter().enumerate() {
        println!(
            "{item} disk {d}: {} blocks compared, {} bytes written, {} bytes zeroed",
            r.blocks_compared, r.bytes_sent, r.bytes_cleared
        );
    }
    println!(
        "{item}: {:?} (run `lifeboat reprotect {item}` to finish, or `lifeboat cancel {item}`)",
        a.protection(item)?
    );
    Ok(())
}

fn dur(d: Duration) -> String {
    format!("{}", d.as_secs())
}

fn status<S: PageStore + 'static>(a: &mut Agent<S>, item: Option<&str>, json: bool) -> Result<()> {
    let now = a.now();
    let names: Vec<String> = match item {
        Some(i) => {
            a.item(i)?;
            vec![i.to_owned()]
        }
        None => a.state.items.keys().cloned().collect(),
    };
    let mut out = Vec::new();
    for n in &names {
        let s = a
            .state
            .coordinator
            .status(n, now)
            .with_context(|| format!("no protected item {n}"))?;
        let it = a.item(n)?;
        if json {
            out.push(json!({
                "item": n,
                "state": format!("{:?}", s.state),
                "test_failover": format!("{:?}", s.test_failover),
                "health": format!("{:?}", s.health),
                "causes": s.causes.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>(),
                "points": s.points.iter().map(|p| p.id.0).collect::<Vec<_>>(),
                "cycles_applied": s.cycles_applied,
                "failover_point": s.failover_point.map(|p| p.0),
                "source_running": it.source_running,
                "target_running": it.target_running,
                "disks": it.disks.iter().zip(&it.sizes).enumerate().map(|(d, (p, len))| json!({
                    "index": d,
                    "path": p,
                    "size": len,
                    "blob": ItemState::blob(n, d),
                    "write_guid": state::hex(&it.tracking[d].write_guid),
                    "last_log": state::hex(&it.tracking[d].last_log),
                    "copied": s.initial_copy.get(d).map(|c| c.0),
                })).collect::<Vec<_>>(),
                "test_disks": it.test_disks,
                "recovered": it.recovered,
                "last_resync": it.last_resync,
                "last_sync_back": it.last_sync_back,
            }));
        } else {
            println!(
                "{n}: {:?}, health {:?}, {} point(s), {} cycle(s) applied, source {}, recovered machine {}",
                s.state,
                s.health,
                s.points.len(),
                s.cycles_applied,
                if it.source_running {
                    "running"
                } else {
                    "stopped"
                },
                if it.target_running {
                    "running"
                } else {
                    "stopped"
                },
            );
            if s.test_failover != lifeboat_replication::TestFailoverState::None {
                println!("  test failover: {:?}", s.test_failover);
            }
            for c in &s.causes {
                println!("  cause: {c:?}");
            }
            for (d, (p, len)) in it.disks.iter().zip(&it.sizes).enumerate() {
                let copied = s.initial_copy.get(d).map_or(0, |c| c.0);
                println!(
                    "  disk {d}: {} ({len} bytes, initial copy {}%)",
                    p.display(),
                    copied * 100 / len.max(&1)
                );
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn jobs<S: PageStore + 'static>(a: &Agent<S>, item: Option<&str>, json: bool) -> Result<()> {
    let jobs: Vec<_> = a
        .state
        .coordinator
        .jobs()
        .filter(|j| item.is_none_or(|i| j.item() == i))
        .collect();
    if json {
        let v: Vec<_> = jobs
            .iter()
            .map(|j| {
                json!({
                    "id": j.id.to_string(),
                    "kind": format!("{:?}", j.kind),
                    "item": j.item(),
                    "state": format!("{:?}", j.state),
                    "progress_permille": j.progress_permille,
                    "started": j.started.as_secs(),
                    "ended": j.ended.map(|e| e.as_secs()),
                    "tasks": j.tasks.iter().map(|t| json!({"name": t.name, "state": format!("{:?}", t.state)})).collect::<Vec<_>>(),
                    "errors": j.errors,
                    "allowed_actions": a.state.coordinator.allowed_actions(&j.id).iter().map(|x| format!("{x:?}")).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_jobs(a, &jobs);
    Ok(())
}

/// Prints the jobs table.
pub(crate) fn print_jobs<S>(_a: &Agent<S>, jobs: &[&lifeboat_replication::Job]) {
    println!(
        "{:<10}  {:<22} {:<11} {:>6}  {:>5}  errors",
        "id", "job", "state", "done", "tasks"
    );
    for j in jobs {
        let done = j.tasks.iter().filter(|t| t.state.is_terminal()).count();
        println!(
            "{:<10}  {:<22} {:<11} {:>5}%  {:>2}/{:<2}  {}",
            j.id.to_string(),
            format!("{:?}", j.kind),
            format!("{:?}", j.state),
            j.progress_permille / 10,
            done,
            j.tasks.len(),
            j.errors.len()
        );
    }
}

fn points<S: PageStore + 'static>(a: &mut Agent<S>, item: &str, json: bool) -> Result<()> {
    let now = a.now();
    let s = a
        .state
        .coordinator
        .status(item, now)
        .with_context(|| format!("no protected item {item}"))?;
    let it = a.item(item)?;
    if json {
        let v: Vec<_> = s
            .points
            .iter()
            .map(|p| {
                json!({
                    "id": p.id.0,
                    "time": p.time.as_secs(),
                    "app_consistent": p.app_consistent,
                    "snapshots": it.points.get(&p.id.0),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &s.points {
            println!(
                "point {}: time {}, {}",
                p.id.0,
                dur(p.time),
                if p.app_consistent {
                    "app-consistent"
                } else {
                    "crash-consistent"
                }
            );
        }
    }
    Ok(())
}

async fn job<S: PageStore + 'static>(a: &mut Agent<S>, cmd: &JobCmd) -> Result<()> {
    let now = a.now();
    let c = &mut a.state.coordinator;
    let id = match cmd {
        JobCmd::Cancel { id } => {
            c.cancel_job(now, id)?;
            id.clone()
        }
        JobCmd::Restart { id } => c.restart_job(now, id)?,
        JobCmd::Resume { id } => {
            c.resume_job(now, id)?;
            id.clone()
        }
    };
    a.save()?;
    a.drive().await?;
    if let Some(j) = a.state.coordinator.job(&id) {
        println!("job {}: {:?} {:?}", j.id, j.kind, j.state);
    }
    Ok(())
}

/// Parses `GROUP[/SCOPE,...]:manual:NAME` or `GROUP[/SCOPE,...]:script:COMMAND`.
fn parse_plan_action(s: &str, groups: usize) -> Result<(usize, PlanAction)> {
    let mut parts = s.splitn(3, ':');
    let (Some(head), Some(kind), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
        bail!(
            "plan action {s:?}: expected GROUP[/SCOPES]:manual:NAME or GROUP[/SCOPES]:script:COMMAND"
        );
    };
    let (group, scopes) = head.split_once('/').unwrap_or((head, ""));
    let group: usize = group
        .parse()
        .ok()
        .filter(|g| (1..=groups).contains(g))
        .with_context(|| format!("plan action {s:?}: group must be 1..={groups}"))?;
    let scopes = scopes
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| match x {
            "test" => Ok(PlanScope::Test),
            "planned" => Ok(PlanScope::Planned),
            "unplanned" => Ok(PlanScope::Unplanned),
            other => bail!("plan action {s:?}: unknown scope {other}"),
        })
        .collect::<Result<Vec<_>>>()?;
    let kind = match kind {
        "manual" => PlanActionKind::Manual,
        "script" => PlanActionKind::Script {
            hook: text.to_owned(),
        },
        other => bail!("plan action {s:?}: {other} is neither manual nor script"),
    };
    Ok((
        group - 1,
        PlanAction {
            name: text.to_owned(),
            kind,
            scopes,
        },
    ))
}

async fn plan<S: PageStore + 'static>(a: &mut Agent<S>, cmd: &PlanCmd) -> Result<()> {
    match cmd {
        PlanCmd::Create {
            plan,
            groups,
            pre,
            post,
        } => {
            let mut gs: Vec<PlanGroup> = groups
                .iter()
                .map(|g| PlanGroup {
                    items: g
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                    ..PlanGroup::default()
                })
                .collect();
            for p in pre {
                let (g, action) = parse_plan_action(p, gs.len())?;
                gs[g].pre.push(action);
            }
            for p in post {
                let (g, action) = parse_plan_action(p, gs.len())?;
                gs[g].post.push(action);
            }
            a.state.coordinator.create_plan(RecoveryPlan {
                name: plan.clone(),
                groups: gs,
            })?;
            a.save()?;
            println!("plan {plan}: {} group(s)", groups.len());
            Ok(())
        }
        PlanCmd::Resume { plan } => {
            let now = a.now();
            a.state.coordinator.resume_plan(now, plan)?;
            a.save()?;
            a.drive().await?;
            report_plan(a, plan)
        }
        PlanCmd::Failover {
            plan,
            test,
            planned,
            unplanned,
            out,
        } => {
            let failover = if *test {
                PlanFailover::Test(PointChoice::Latest)
            } else if *planned {
                PlanFailover::Planned
            } else if *unplanned {
                PlanFailover::Unplanned(PointChoice::Latest)
            } else {
                bail!("plan failover needs --test, --planned or --unplanned");
            };
            let items: Vec<String> = a
                .state
                .coordinator
                .plan(plan)
                .with_context(|| format!("no recovery plan {plan}"))?
                .groups
                .iter()
                .flat_map(|g| g.items.clone())
                .collect();
            for i in &items {
                let ex = export(&out.join(i), Format::Raw);
                let it = a.item_mut(i)?;
                if *test {
                    it.test_export = ex;
                } else {
                    it.failover_export = ex;
                }
            }
            let now = a.now();
            a.state.coordinator.start_plan(now, plan, failover)?;
            a.save()?;
            a.drive().await?;
            report_plan(a, plan)
        }
    }
}

/// Prints where the plan's latest job is; fails if it failed.
fn report_plan<S: PageStore + 'static>(a: &Agent<S>, plan: &str) -> Result<()> {
    let job = a
        .state
        .coordinator
        .jobs()
        .filter(|j| j.kind == lifeboat_replication::JobKind::RecoveryPlan && j.item() == plan)
        .last()
        .with_context(|| format!("plan {plan} has no job"))?;
    for t in &job.tasks {
        println!("plan {plan}: {:<50} {:?}", t.name, t.state);
    }
    match job.state {
        lifeboat_replication::JobState::Succeeded => {
            println!("plan {plan}: done");
            Ok(())
        }
        lifeboat_replication::JobState::Suspended => {
            println!("plan {plan}: waiting for a manual action; run `lifeboat plan resume {plan}`");
            Ok(())
        }
        s => bail!("plan {plan}: {s:?}: {}", job.errors.join("; ")),
    }
}
