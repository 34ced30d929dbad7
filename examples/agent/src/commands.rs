//! The commands that work on protected items: each one engine call, and its output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lifeboat_engine::{
    Engine, Event, Export, Failover, Location, Observer, Replicated, Site, Task,
};
use lifeboat_replication::{
    Command, CopyFrequency, JobAction, JobId, JobKind, JobState, PlanAction, PlanActionKind,
    PlanFailover, PlanGroup, PlanScope, PointChoice, PointId, ProtectionState, RecoveryPlan,
    ReplicationPolicy,
};

use crate::host::AgentHost;
use crate::human;
use crate::out::say;
use crate::{Cli, Cmd, Format, Frequency, JobCmd, PlanCmd, Store};

/// Progress bars for long tasks, and one-line notes, on stderr (none when quiet).
pub(crate) struct Bars {
    quiet: bool,
    /// Whether stderr is a terminal (bars), or not (plain periodic lines).
    tty: bool,
    bars: Mutex<HashMap<(String, usize), ProgressBar>>,
    /// Per disk, when its task started and when a line was last printed.
    lines: Mutex<HashMap<(String, usize), Started>>,
}

/// When a disk's task started, and when a progress line was last printed for it.
type Started = (std::time::Instant, Option<std::time::Instant>);

impl Bars {
    pub(crate) fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        Bars {
            quiet,
            tty: std::io::stderr().is_terminal(),
            bars: Mutex::default(),
            lines: Mutex::default(),
        }
    }
}

impl Observer for Bars {
    fn event(&self, e: &Event) {
        if self.quiet {
            return;
        }
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::Progress {
                item,
                disk,
                task,
                done,
                total,
            } => {
                let what = match task {
                    Task::InitialCopy => "initial replication",
                    Task::ResyncCompare => "resync compare",
                    _ => "working",
                };
                if !self.tty {
                    // Not a terminal (cron, CI, a log): a plain line every 10 s and at the end.
                    let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                    let now = std::time::Instant::now();
                    let (start, last) = lines.entry((item.clone(), *disk)).or_insert((now, None));
                    let start = *start;
                    let recent =
                        last.is_some_and(|l| now.duration_since(l) < Duration::from_secs(10));
                    if done < total && recent {
                        return;
                    }
                    *last = Some(now);
                    let secs = now.duration_since(start).as_secs_f64().max(0.001);
                    let rate = *done as f64 / secs;
                    let mut line = format!(
                        "{item} disk {disk} {what}: {} of {} ({} %)",
                        human::size(*done),
                        human::size(*total),
                        done * 100 / (*total).max(1)
                    );
                    if secs >= 1.0 {
                        line.push_str(&format!(", {}/s", human::size(rate as u64)));
                        if rate > 0.0 && done < total {
                            let left = Duration::from_secs_f64((total - done) as f64 / rate);
                            line.push_str(&format!(", about {} left", human::duration(left)));
                        }
                    }
                    eprintln!("{line}");
                    return;
                }
                let bar = bars.entry((item.clone(), *disk)).or_insert_with(|| {
                    let bar = ProgressBar::new(*total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_message(format!("{item} disk {disk} {what}"));
                    bar
                });
                bar.set_position(*done);
            }
            Event::CycleApplied {
                item,
                disk,
                cycle,
                bytes_sent,
                requests,
                batches,
            } => eprintln!(
                "{item} disk {disk}: cycle {cycle} applied, {} in {requests} request(s), {batches} batch(es)",
                human::size(*bytes_sent)
            ),
            Event::LogSkipped { path, id, .. } => {
                eprintln!("{}: log {id} was taken before; skipped", path.display())
            }
            Event::TookOver { item, from } => {
                eprintln!("{item}: taken over from site {from} (its writes are fenced now)")
            }
            Event::Performing { item, task, detail } => {
                tracing::info!(item, "{task}");
                tracing::debug!(item, action = detail);
            }
            Event::Idle => {
                self.lines.lock().unwrap_or_else(|p| p.into_inner()).clear();
                for b in bars.values() {
                    b.finish_and_clear();
                }
                bars.clear();
            }
            _ => {}
        }
    }
}

/// Opens the engine on the target's site and store.
pub(crate) async fn open(store: &Store, site: &Path, quiet: bool) -> Result<Engine> {
    let shown = site.display().to_string();
    let crash_after = std::env::var("LIFEBOAT_CRASH_BEFORE_SAVE")
        .ok()
        .and_then(|v| v.parse().ok());
    Ok(Engine::builder(store.store.clone(), site)
        .store_description(store.desc.clone())
        .writer(store.writer.clone())
        .host(Arc::new(AgentHost {
            site: site.to_path_buf(),
        }))
        .observer(Arc::new(Bars::new(quiet)))
        .on_wait(move || {
            if !quiet {
                eprintln!("waiting for another lifeboat process on {shown}");
            }
        })
        .crash_after_action(crash_after)
        .open()
        .await?)
}

/// Runs an item command.
pub(crate) async fn run(store: Store, cli: &Cli) -> Result<()> {
    let site = &cli.target.site;
    let beside = crate::service::running(site);
    if beside && matches!(cli.command, Cmd::Resume { .. }) {
        bail!(
            "the service on {} carries on interrupted and retrying work itself",
            site.display()
        );
    }
    let fresh = !Site::is_set_up(site);
    let mut e = open(&store, site, cli.json || cli.quiet).await?;
    if fresh && !cli.quiet {
        eprintln!(
            "set up a new site in {} (replicating into {})",
            e.site().dir().display(),
            store.desc
        );
    }
    // Finish whatever an interrupted process left in flight first.
    let resumed: Vec<JobId> = e
        .jobs()
        .into_iter()
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.id.clone())
        .collect();
    if beside {
        // The service acts for every item: this command acts for its own items only, and
        // leaves background work (an initial copy, a resync, a cycle) to the service.
        let mine = foreground(&cli.command, &e);
        e.focus(Some(mine));
    } else {
        e.drive().await?;
    }
    if cli.json {
        crate::out::json();
    }
    let r = command(&mut e, &store, cli, &resumed).await;
    // A plan waiting at a manual action has its result too (exit status 3).
    let result = match &r {
        Ok(()) => true,
        Err(err) => err.downcast_ref::<crate::Exit>().is_some(),
    };
    if result {
        crate::out::finish(&cli.name, cli.command.item(), &e)?;
    }
    let submits = matches!(
        cli.command,
        Cmd::Protect { .. } | Cmd::Replicate { .. } | Cmd::Resync { .. }
    );
    if beside && submits && r.is_ok() && foreground(&cli.command, &e).is_empty() {
        say!(
            "the service on {} carries it on: `lifeboat status` shows how far it is",
            site.display()
        );
    }
    r
}

/// The items whose work a command does itself beside a service; none for work the
/// service does in the background.
fn foreground(cmd: &Cmd, e: &Engine) -> Vec<String> {
    match cmd {
        Cmd::Protect { .. }
        | Cmd::Replicate { .. }
        | Cmd::GuestWrite { .. }
        | Cmd::Policy { .. } => Vec::new(),
        Cmd::Resync { pause, cancel, .. } if !*pause && !*cancel => Vec::new(),
        Cmd::Job { command } => {
            let id = match command {
                JobCmd::Cancel { id } | JobCmd::Restart { id } | JobCmd::Resume { id } => id,
            };
            plan_items(e, &id.item).unwrap_or_else(|| vec![id.item.clone()])
        }
        Cmd::Plan { command } => match command {
            PlanCmd::Create { .. }
            | PlanCmd::List
            | PlanCmd::Show { .. }
            | PlanCmd::Delete { .. } => Vec::new(),
            PlanCmd::Resume { plan }
            | PlanCmd::Failover { plan, .. }
            | PlanCmd::Cleanup { plan } => plan_items(e, plan).unwrap_or_default(),
        },
        other => other.item().map(|i| vec![i.to_owned()]).unwrap_or_default(),
    }
}

/// A plan's name and its items (its actions are its own).
fn plan_items(e: &Engine, plan: &str) -> Option<Vec<String>> {
    let p = e.plan(plan)?;
    Some(
        std::iter::once(plan.to_owned())
            .chain(p.groups.iter().flat_map(|g| g.items.iter().cloned()))
            .collect(),
    )
}

async fn command(e: &mut Engine, store: &Store, cli: &Cli, resumed: &[JobId]) -> Result<()> {
    let azure = store.azure;
    match &cli.command {
        Cmd::Protect { .. } => match Protect::of(&cli.command)? {
            Some(p) => protect(e, &p.item, &p.disks, p.policy, p.block_size).await,
            None => Ok(()),
        },
        Cmd::Replicate {
            item,
            logs,
            app_consistent,
        } => replicate(e, item, logs, *app_consistent).await,
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
                return resync(e, item, resumed).await;
            };
            e.command(cmd).await?;
            say!("{item}: {}", e.protection(item)?);
            Ok(())
        }
        Cmd::ChangePoint { item, point } => {
            let point = parse_point(point)?;
            e.command(Command::ChangeRecoveryPoint {
                item: item.clone(),
                point,
            })
            .await?;
            crate::out::disks(&e.item(item)?.item.failover.disks);
            Ok(())
        }
        Cmd::Job { command } => job(e, command).await,
        Cmd::Policy {
            item,
            copy_frequency,
            retention,
            rpo_warning,
            rpo_critical,
            auto_resync,
        } => {
            let mut p = e.item(item)?.item.replication.policy().clone();
            if let Some(f) = copy_frequency {
                p.copy_frequency = policy(*f, 1)?.copy_frequency;
            }
            if let Some(h) = retention {
                p.retention = policy(Frequency::M5, *h)?.retention;
            }
            if let Some(w) = rpo_warning {
                p.rpo_warning = *w;
            }
            if rpo_critical.is_some() {
                p.rpo_critical = *rpo_critical;
            }
            if let Some(a) = auto_resync {
                p.auto_resync = *a;
            }
            if p.rpo_critical.is_some_and(|c| c < p.rpo_warning) {
                bail!("the RPO critical threshold must not be shorter than the warning one");
            }
            e.command(Command::ChangePolicy {
                item: item.clone(),
                policy: p,
            })
            .await?;
            done(e, item, "policy changed")
        }
        Cmd::TestFailover {
            item,
            point,
            out,
            format,
            force,
        } => {
            let ex = export(Some(out), *format, azure, *force);
            e.test_failover(item, parse_point(point)?, ex).await?;
            crate::out::disks(&e.item(item)?.item.test.disks);
            Ok(())
        }
        Cmd::TestFailoverCleanup { item } => {
            e.command(Command::TestFailoverCleanup { item: item.clone() })
                .await?;
            done(e, item, "test failover disks deleted")
        }
        Cmd::Failover {
            item,
            planned,
            point,
            logs,
            out,
            format,
            force,
            ..
        } => {
            let how = if *planned {
                Failover::Planned(logs.clone())
            } else {
                Failover::Unplanned(parse_point(point)?)
            };
            e.failover(item, how, export(out.as_deref(), *format, azure, *force))
                .await?;
            crate::out::disks(&e.item(item)?.item.failover.disks);
            Ok(())
        }
        Cmd::Commit { item } => {
            e.command(Command::Commit { item: item.clone() }).await?;
            done(
                e,
                item,
                "failover committed (the other recovery points are deleted)",
            )
        }
        Cmd::Cancel { item } => {
            let cmd = match e.protection(item)? {
                ProtectionState::FailbackInProgress | ProtectionState::FailbackCompleted => {
                    Command::CancelFailback { item: item.clone() }
                }
                _ => Command::CancelFailover { item: item.clone() },
            };
            let what = match cmd {
                Command::CancelFailback { .. } => {
                    "failback cancelled (the protective copies are restored)"
                }
                _ => "failover cancelled",
            };
            e.command(cmd).await?;
            done(e, item, what)
        }
        Cmd::Failback { item, to, full } => failback(e, item, to, *full).await,
        Cmd::Unprotect {
            item,
            delete_replica,
        } => {
            let disks = e.item(item)?.item.disks.len();
            e.unprotect(item, *delete_replica).await?;
            if *delete_replica {
                say!("{item}: protection disabled; its recovery points and replica are deleted");
            } else {
                say!(
                    "{item}: protection disabled; the replica stays in {} (no longer updated):",
                    store.desc
                );
                let blobs: Vec<Location> = (0..disks)
                    .map(|d| Location::Blob {
                        name: lifeboat_engine::replica_blob(item, d),
                        download: None,
                    })
                    .collect();
                crate::out::disks(&blobs);
            }
            Ok(())
        }
        Cmd::Reprotect { item } => {
            let finishing = resumed
                .iter()
                .any(|j| j.item == *item && e.job(j).is_some_and(|j| j.kind == JobKind::Reprotect));
            if e.protection(item)? == ProtectionState::Protected && !finishing {
                bail!("{item} is protected already: there is nothing to reprotect");
            }
            e.reprotect(item).await?;
            done(e, item, "replicating towards the recovery site again")
        }
        Cmd::Verify {
            item,
            point,
            source,
            repair,
        } => verify(e, item, point.map(PointId), *source, *repair).await,
        Cmd::TakeOver { item } => {
            if e.take_over(item).await? {
                say!("{item}: this site acts for it now");
            } else {
                say!("{item}: this site acts for it already");
            }
            Ok(())
        }
        Cmd::Repair { item } => {
            e.command(Command::RepairReplication { item: item.clone() })
                .await?;
            done(e, item, "repaired")
        }
        Cmd::Resume { now } => {
            e.resume(*now).await?;
            let open: Vec<String> = e
                .jobs()
                .into_iter()
                .filter(|j| !j.state.is_terminal())
                .map(|j| j.id.to_string())
                .collect();
            match (resumed.len(), open.is_empty()) {
                (0, true) => say!("nothing to resume"),
                (n, true) => say!("{n} job(s) carried on to their end"),
                (_, false) => say!(
                    "still waiting: {} (`lifeboat jobs` says why)",
                    open.join(", ")
                ),
            }
            Ok(())
        }
        Cmd::GuestWrite {
            item,
            disk,
            log,
            writes,
            size,
            seed,
        } => crate::demo::guest_write(e, item, *disk, log, *writes, *size, *seed, false),
        Cmd::Plan { command } => plan(e, command, azure).await,
        Cmd::Demo { .. }
        | Cmd::Completions { .. }
        | Cmd::Man
        | Cmd::Disk { .. }
        | Cmd::Hrl { .. }
        | Cmd::Diff { .. }
        | Cmd::Run { .. }
        | Cmd::Status { .. }
        | Cmd::Jobs { .. }
        | Cmd::Points { .. } => {
            unreachable!("run elsewhere")
        }
    }
}

/// Says what a command did and the item's state now.
fn done(e: &Engine, item: &str, what: &str) -> Result<()> {
    say!(
        "{item}: {what}; now {}",
        e.protection(item)?.to_string().to_lowercase()
    );
    Ok(())
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
        // Resyncs start when asked (`lifeboat resync`) unless `protect --auto-resync`.
        auto_resync: false,
        // Copy pieces of the library's default size (256 MiB): each is a sync point of the
        // replica and its digests (protect of a 1 GiB disk, half data, alternating rounds:
        // 64 MiB pieces 1.36 s median, 128 MiB 1.19 s, 256 MiB 1.09 s). A piece is read and
        // sent in 4 MiB segments, so its size does not set the memory.
        ..ReplicationPolicy::default()
    })
}

/// Where materialised disks go: on Azure, blobs (what a machine there attaches) with a
/// download to DIR if asked; on the embedded store, files in DIR (blobs without one).
pub(crate) fn export(dir: Option<&Path>, format: Format, azure: bool, force: bool) -> Export {
    Export {
        dir: dir.map(Path::to_path_buf),
        vhd: format == Format::Vhd,
        vhdx: format == Format::Vhdx,
        in_store: azure || dir.is_none(),
        force,
    }
}

fn parse_point(s: &str) -> Result<PointChoice> {
    Ok(match s {
        "latest" => PointChoice::Latest,
        "latest-processed" => PointChoice::LatestProcessed,
        "latest-app-consistent" => PointChoice::LatestAppConsistent,
        id => PointChoice::Id(PointId(id.parse().map_err(|_| {
            anyhow::anyhow!(
                "--point: expected latest, latest-processed, latest-app-consistent or a point id (a number), got {id}"
            )
        })?)),
    })
}

/// Disk paths as the catalogue records them: absolute and canonical where they exist.
fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(abs.canonicalize().unwrap_or(abs))
}

/// What a `protect` command asks, checked as far as the agent can without a site.
pub(crate) struct Protect {
    item: String,
    disks: Vec<PathBuf>,
    policy: ReplicationPolicy,
    block_size: u32,
}

impl Protect {
    /// The request of `cmd`, if it is a `protect`.
    pub(crate) fn of(cmd: &Cmd) -> Result<Option<Self>> {
        let Cmd::Protect {
            item,
            disks,
            copy_frequency,
            retention,
            block_size,
            auto_resync,
            rpo_warning,
            rpo_critical,
        } = cmd
        else {
            return Ok(None);
        };
        let mut policy = policy(*copy_frequency, *retention)?;
        if rpo_critical.is_some_and(|c| c < *rpo_warning) {
            bail!("--rpo-critical must not be shorter than --rpo-warning");
        }
        policy.auto_resync = *auto_resync;
        policy.rpo_warning = *rpo_warning;
        policy.rpo_critical = *rpo_critical;
        let block_size = match u32::try_from(*block_size).map(lifeboat_resync::BlockSize::new) {
            Ok(Ok(bs)) => bs.get(),
            Ok(Err(e)) => bail!("--block-size: {e}"),
            Err(_) => {
                bail!("--block-size: {block_size} bytes is over 1 GiB, the largest block size")
            }
        };
        Ok(Some(Protect {
            item: item.clone(),
            disks: disks.clone(),
            policy,
            block_size,
        }))
    }
}

/// Disks as the engine names them: canonical paths.
fn canonical(disks: &[PathBuf]) -> Result<Vec<PathBuf>> {
    disks
        .iter()
        .map(|d| {
            d.canonicalize()
                .with_context(|| format!("disk {}", d.display()))
        })
        .collect()
}

/// Checks a `protect` on a site not set up yet before the site and its store are: one
/// refused (a bad name, a missing disk, a bad policy) leaves neither behind.
pub(crate) fn check_first_protect(cli: &Cli) -> Result<()> {
    let site = &cli.target.site;
    if Site::is_set_up(site) {
        return Ok(());
    }
    if let Some(p) = Protect::of(&cli.command)? {
        let host = AgentHost {
            site: site.to_path_buf(),
        };
        Engine::check_protect(&host, &p.item, &canonical(&p.disks)?, p.block_size)?;
    }
    Ok(())
}

/// Enable protection (or finish an interrupted one).
pub(crate) async fn protect(
    e: &mut Engine,
    item: &str,
    disks: &[PathBuf],
    policy: ReplicationPolicy,
    block_size: u32,
) -> Result<()> {
    let fresh = e
        .protect(item, &canonical(disks)?, policy, block_size)
        .await?;
    let st = e.protection(item)?;
    if !fresh {
        say!(
            "{item} is already protected ({})",
            st.to_string().to_lowercase()
        );
    } else {
        say!("{item}: {st}");
    }
    Ok(())
}

/// Stage logs and run a delta cycle now.
pub(crate) async fn replicate(
    e: &mut Engine,
    item: &str,
    logs: &[(usize, PathBuf)],
    app_consistent: bool,
) -> Result<()> {
    match e.replicate(item, logs, app_consistent).await? {
        Replicated::Nothing => say!("{item}: nothing new to apply"),
        Replicated::Applied { cycles, points } => {
            let total = e.item(item)?.status.cycles_applied;
            say!(
                "{item}: {cycles} cycle(s) applied now ({total} since protection); {points} recovery point(s)"
            )
        }
        Replicated::ResyncRequired(causes) => say!(
            "{item}: {}; the log was not applied; run `lifeboat resync {item}`",
            causes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Replicated::Staged { logs } => say!(
            "{item}: {logs} log(s) staged for the copy under way (initial replication or resync)"
        ),
        _ => {}
    }
    Ok(())
}

pub(crate) async fn resync(e: &mut Engine, item: &str, resumed: &[JobId]) -> Result<()> {
    e.item(item)?;
    // A resync an interrupted run of this command left behind was just completed.
    let finished = resumed.iter().any(|id| {
        e.job(id).is_some_and(|j| {
            j.item() == item && j.kind == JobKind::Resynchronize && j.state == JobState::Succeeded
        })
    });
    if !finished {
        e.command(Command::Resync {
            item: item.to_owned(),
        })
        .await?;
    }
    for (d, r) in e.item(item)?.item.last_resync.iter().enumerate() {
        say!(
            "{item} disk {d}: {} blocks compared, {} bytes sent, {} bytes cleared",
            r.blocks_compared,
            r.bytes_sent,
            r.bytes_cleared
        );
    }
    Ok(())
}

/// `verify`: a line per disk; fails (exit 1) when something differs, unless repaired.
async fn verify(
    e: &mut Engine,
    item: &str,
    point: Option<PointId>,
    source: bool,
    repair: bool,
) -> Result<()> {
    let found = if repair {
        e.repair(item).await?
    } else {
        e.verify(item, point, source).await?
    };
    let mut bad = 0;
    for v in &found {
        let what = match v.point {
            Some(p) => format!("point {p}"),
            None => "replica".to_owned(),
        };
        let offsets = |blocks: &[u64]| {
            blocks
                .iter()
                .take(8)
                .map(|b| (b * u64::from(v.block_size)).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &v.note {
            Some(n) => say!("{item} disk {} ({what}): not checked: {n}", v.disk),
            None if v.damaged.is_empty() => say!(
                "{item} disk {} ({what}): {} blocks match their digests",
                v.disk,
                v.blocks - v.unknown.len() as u64
            ),
            None => say!(
                "{item} disk {} ({what}): {} damaged block(s) at offset(s) {}",
                v.disk,
                v.damaged.len(),
                offsets(&v.damaged)
            ),
        }
        if !v.unknown.is_empty() {
            say!(
                "{item} disk {} ({what}): {} block(s) not checked, at offset(s) {}: their \
                 digests were recorded unknown (a batch cut short); a resync sends them",
                v.disk,
                v.unknown.len(),
                offsets(&v.unknown)
            );
        }
        if let Some(u) = &v.unlike_source {
            if u.is_empty() {
                say!("{item} disk {}: the replica equals the source", v.disk);
            } else {
                say!(
                    "{item} disk {}: {} block(s) differ from the source, at offset(s) {}",
                    v.disk,
                    u.len(),
                    offsets(u)
                );
            }
        }
        bad += usize::from(!v.clean());
    }
    if repair {
        for (d, r) in e.item(item)?.item.last_resync.iter().enumerate() {
            say!(
                "{item} disk {d}: repaired: {} blocks compared, {} bytes sent, {} bytes cleared",
                r.blocks_compared,
                r.bytes_sent,
                r.bytes_cleared
            );
        }
        return Ok(());
    }
    if bad > 0 {
        bail!(
            "{item}: {bad} disk(s) differ (run `lifeboat verify {item} --repair` to re-send them from the source)"
        );
    }
    Ok(())
}

pub(crate) async fn failback(e: &mut Engine, item: &str, to: &[PathBuf], full: bool) -> Result<()> {
    let targets = to.iter().map(|p| absolute(p)).collect::<Result<Vec<_>>>()?;
    e.failback(item, &targets, full).await?;
    for (d, r) in e.item(item)?.item.last_sync_back.iter().enumerate() {
        say!(
            "{item} disk {d}: {} blocks compared, {} bytes written, {} bytes zeroed",
            r.blocks_compared,
            r.bytes_sent,
            r.bytes_cleared
        );
    }
    say!(
        "{item}: {} (run `lifeboat reprotect {item}` to finish, or `lifeboat cancel {item}`)",
        e.protection(item)?
    );
    Ok(())
}

async fn job(e: &mut Engine, cmd: &JobCmd) -> Result<()> {
    let (id, action) = match cmd {
        JobCmd::Cancel { id } => (id, JobAction::Cancel),
        JobCmd::Restart { id } => (id, JobAction::Restart),
        JobCmd::Resume { id } => (id, JobAction::Resume),
    };
    let id = e.job_action(id, action).await?;
    if let Some(j) = e.job(&id) {
        say!(
            "job {}: {}, {}",
            j.id,
            j.kind,
            j.state.to_string().to_lowercase()
        );
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

async fn plan(e: &mut Engine, cmd: &PlanCmd, azure: bool) -> Result<()> {
    match cmd {
        PlanCmd::List | PlanCmd::Show { .. } => unreachable!("a read command"),
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
            e.create_plan(RecoveryPlan {
                name: plan.clone(),
                groups: gs,
            })
            .await?;
            say!("plan {plan}: {} group(s)", groups.len());
            Ok(())
        }
        PlanCmd::Resume { plan } => {
            e.resume_plan(plan).await?;
            report_plan(e, plan)
        }
        PlanCmd::Delete { plan } => {
            e.delete_plan(plan).await?;
            say!("plan {plan}: deleted (its items stay protected)");
            Ok(())
        }
        PlanCmd::Cleanup { plan } => {
            for item in e.plan_test_cleanup(plan).await? {
                say!("{item}: test failover disks deleted");
            }
            Ok(())
        }
        PlanCmd::Failover {
            plan,
            test,
            planned,
            unplanned,
            out,
            force,
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
            e.start_plan(plan, failover, &|item| {
                export(Some(&out.join(item)), Format::Raw, azure, *force)
            })
            .await?;
            report_plan(e, plan)
        }
    }
}

/// Prints where the plan's latest job is; fails if it failed.
fn report_plan(e: &Engine, plan: &str) -> Result<()> {
    let job = e
        .plan_job(plan)
        .with_context(|| format!("plan {plan} has no job"))?;
    for t in &job.tasks {
        say!("plan {plan}: {:<50} {}", t.name, t.state);
    }
    match job.state {
        JobState::Succeeded => {
            say!("plan {plan}: done");
            Ok(())
        }
        JobState::Suspended => {
            say!("plan {plan}: waiting for a manual action; run `lifeboat plan resume {plan}`");
            Err(crate::Exit(crate::exit::PLAN_WAITING).into())
        }
        s => bail!(
            "plan {plan}: {}: {}",
            s.to_string().to_lowercase(),
            job.errors.join("; ")
        ),
    }
}
