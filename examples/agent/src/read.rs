//! The read commands (`status`, `points`, `jobs`): they read the catalogue, never the
//! site's lock, so they answer at once while a service or a long command works; when the
//! store cannot be reached they show the site's cache and say how old it is.

use std::path::Path;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use lifeboat_engine::{Catalogue, Item, Location, Source, SyncReport};
use lifeboat_replication::{HealthCause, Job, ReplicationPolicy};
use serde::Serialize;

use crate::human::{ago, duration, local, now, rfc3339, size, when};
use crate::{Cli, Cmd, PlanCmd, Store, Target};

/// How long a read waits for the store before it shows the site's cache.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a read command.
pub(crate) async fn run(cli: &Cli) -> Result<()> {
    let site = &cli.target.site;
    // No site set up here and no embedded store: nothing to read, and a read makes no
    // directories (opening the store would make its own, and the site's).
    let unmade = crate::local_store_dir(&cli.target)
        .filter(|dir| !dir.exists() && !lifeboat_engine::Site::is_set_up(site));
    let (c, place) = match unmade {
        Some(dir) => (
            Catalogue::empty(),
            Place {
                desc: dir.display().to_string(),
                azure: false,
            },
        ),
        None => {
            let store = crate::open_store(&cli.target, false).await?;
            let c = catalogue(&cli.target, &store).await?;
            let (desc, azure) = (store.desc, store.azure);
            (c, Place { desc, azure })
        }
    };
    match &cli.command {
        Cmd::Status { item } => status(&c, site, &place, item.as_deref(), cli.json),
        Cmd::Jobs { item } => jobs(&c, item.as_deref(), cli.json),
        Cmd::Points { item } => points(&c, item, cli.json),
        Cmd::Plan {
            command: PlanCmd::List,
        } => plans(&c, None, cli.json),
        Cmd::Plan {
            command: PlanCmd::Show { plan },
        } => plans(&c, Some(plan), cli.json),
        _ => unreachable!("not a read command"),
    }
}

/// The catalogue from the store, else from the site's cache (saying so on stderr).
async fn catalogue(target: &Target, store: &Store) -> Result<Catalogue> {
    let site = target.site.as_path();
    let read = Catalogue::read(&*store.store, Some((site, &store.desc)));
    let why = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(c)) => return Ok(c),
        Ok(Err(e @ lifeboat_engine::Error::WrongStore { .. })) => return Err(e.into()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {} s", READ_TIMEOUT.as_secs()),
    };
    let unreachable = format!("the store {} cannot be reached ({why})", store.desc);
    if !site.join("cache").is_dir() {
        anyhow::bail!("{unreachable}, and the site has no cache to show");
    }
    let c = Catalogue::cached(site).with_context(|| format!("{unreachable}; the site's cache"))?;
    if let Source::Cache { written } = c.source() {
        let age = SystemTime::now()
            .duration_since(*written)
            .unwrap_or_default();
        eprintln!(
            "lifeboat: {unreachable}; showing the site's cache, {} old",
            duration(age)
        );
    }
    Ok(c)
}

/// Bytes of logs waiting in the item's inbox at this site.
fn inbox_bytes(site: &Path, it: &Item) -> u64 {
    crate::host::inbox_bytes(site, &it.name, it.disks.len())
}

/// One item, as `status --json` writes it (docs/cli.md documents the schema).
#[derive(Serialize)]
struct StatusView<'a> {
    item: &'a str,
    owner: &'a str,
    owned_here: bool,
    epoch: u64,
    state: &'static str,
    test_failover: &'static str,
    health: &'static str,
    causes: Vec<CauseView>,
    policy: PolicyView,
    points: Vec<u64>,
    cycles_applied: u64,
    rpo_seconds: Option<u64>,
    last_cycle: Option<String>,
    next_cycle: Option<String>,
    retry_at: Option<String>,
    inbox_bytes: u64,
    failover_point: Option<u64>,
    source_running: bool,
    target_running: bool,
    disks: Vec<DiskView<'a>>,
    test_disks: Vec<LocationView<'a>>,
    recovered: Vec<LocationView<'a>>,
    last_resync: &'a [SyncReport],
    last_sync_back: &'a [SyncReport],
}

#[derive(Serialize)]
struct CauseView {
    kind: &'static str,
    message: String,
}

#[derive(Serialize)]
struct PolicyView {
    copy_frequency_seconds: u64,
    retention_hours: u64,
    rpo_warning_seconds: u64,
    rpo_critical_seconds: Option<u64>,
    auto_resync: bool,
}

#[derive(Serialize)]
struct DiskView<'a> {
    index: usize,
    path: &'a Path,
    size: u64,
    /// The replica's blob name in the store.
    blob: String,
    /// Where the replica is: on Azure its URL (what `az disk create --source` takes), else
    /// the blob in the embedded store.
    replica: String,
    write_guid: String,
    last_log: String,
    copied: Option<u64>,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum LocationView<'a> {
    File {
        path: &'a Path,
    },
    Blob {
        name: &'a str,
        download: Option<&'a PathBuf>,
    },
}

pub(crate) fn locations(ls: &[Location]) -> Vec<LocationView<'_>> {
    ls.iter()
        .map(|l| match l {
            Location::File { path } => LocationView::File { path },
            Location::Blob { name, download } => LocationView::Blob {
                name,
                download: download.as_ref(),
            },
        })
        .collect()
}

fn policy_view(p: &ReplicationPolicy) -> PolicyView {
    PolicyView {
        copy_frequency_seconds: p.copy_frequency.interval().as_secs(),
        retention_hours: p.retention.as_secs() / 3600,
        rpo_warning_seconds: p.rpo_warning.as_secs(),
        rpo_critical_seconds: p.rpo_critical.map(|c| c.as_secs()),
        auto_resync: p.auto_resync,
    }
}

/// The store, as messages name it.
struct Place {
    /// A path, or the container URL without its query.
    desc: String,
    /// Azure or the embedded store.
    azure: bool,
}

/// Where a replica blob is, for people and for `az`.
fn replica_location(store: &Place, blob: &str) -> String {
    if store.azure {
        format!("{}/{blob}", store.desc)
    } else {
        format!("{blob} in the store {}", store.desc)
    }
}

fn status(c: &Catalogue, site: &Path, store: &Place, item: Option<&str>, json: bool) -> Result<()> {
    let now = now();
    let views: Vec<_> = match item {
        Some(i) => vec![c.item(i, now)?],
        None => c.items(now).collect(),
    };
    if json {
        let out: Vec<StatusView<'_>> = views
            .iter()
            .map(|v| {
                let (it, s) = (v.item, &v.status);
                StatusView {
                    item: &it.name,
                    owner: &it.owner.label,
                    owned_here: v.owned,
                    epoch: it.epoch,
                    state: s.state.tag(),
                    test_failover: s.test_failover.tag(),
                    health: s.health.tag(),
                    causes: s.causes.iter().map(cause_view).collect(),
                    policy: policy_view(it.replication.policy()),
                    points: s.points.iter().map(|p| p.id.0).collect(),
                    cycles_applied: s.cycles_applied,
                    rpo_seconds: s.rpo.map(|r| r.as_secs()),
                    last_cycle: s.last_cycle.map(rfc3339),
                    next_cycle: s.next_cycle.map(rfc3339),
                    retry_at: s.retry_at.map(rfc3339),
                    inbox_bytes: inbox_bytes(site, it),
                    failover_point: s.failover_point.map(|p| p.0),
                    source_running: it.source_running,
                    target_running: it.target_running,
                    disks: it
                        .disks
                        .iter()
                        .enumerate()
                        .map(|(d, disk)| DiskView {
                            index: d,
                            path: &disk.source,
                            size: disk.size,
                            blob: it.blob(d),
                            replica: if store.azure {
                                replica_location(store, &it.blob(d))
                            } else {
                                it.blob(d)
                            },
                            write_guid: lifeboat_engine::hex(&disk.tracking.write_guid),
                            last_log: lifeboat_engine::hex(&disk.tracking.last_log),
                            copied: s.initial_copy.get(d).map(|c| c.0),
                        })
                        .collect(),
                    test_disks: locations(&it.test.disks),
                    recovered: locations(&it.failover.disks),
                    last_resync: &it.last_resync,
                    last_sync_back: &it.last_sync_back,
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no protected items (`lifeboat protect ITEM --disk FILE` starts one)");
    }
    for (n, v) in views.iter().enumerate() {
        let (it, s) = (v.item, &v.status);
        if n > 0 {
            println!();
        }
        println!(
            "{}: {}, health {}",
            it.name,
            s.state,
            s.health.to_string().to_lowercase()
        );
        if !v.owned {
            println!("  owned by the site {}", it.owner.label);
        }
        for c in &s.causes {
            println!("  ! {c}");
        }
        let p = it.replication.policy();
        let mut policy = format!(
            "  policy: a cycle every {}, points kept {}, RPO warning after {}",
            duration(p.copy_frequency.interval()),
            duration(p.retention),
            duration(p.rpo_warning)
        );
        if let Some(c) = p.rpo_critical {
            policy.push_str(&format!(", critical after {}", duration(c)));
        }
        policy.push_str(if p.auto_resync {
            ", resyncs by itself"
        } else {
            ", resyncs on request"
        });
        println!("{policy}");
        let mut line = Vec::new();
        if let Some(r) = s.rpo {
            line.push(format!("RPO {}", duration(r)));
        }
        if let Some(t) = s.last_cycle {
            line.push(format!("last cycle {}", when(now, t)));
        }
        if let Some(t) = s.next_cycle {
            line.push(format!("next {}", ago(now, t)));
        }
        if let Some(t) = s.retry_at {
            line.push(format!("retry {}", ago(now, t)));
        }
        if !line.is_empty() {
            println!("  {}", line.join(", "));
        }
        let inbox = inbox_bytes(site, it);
        println!(
            "  {} recovery point(s), {} cycle(s) applied, {} of logs in the inbox",
            s.points.len(),
            s.cycles_applied,
            size(inbox)
        );
        println!(
            "  source machine {}, recovered machine {}",
            if it.source_running {
                "running"
            } else {
                "stopped"
            },
            if it.target_running {
                "running"
            } else {
                "stopped"
            }
        );
        if s.test_failover != lifeboat_replication::TestFailoverState::None {
            println!(
                "  test failover: {}",
                s.test_failover.to_string().to_lowercase()
            );
        }
        for (d, disk) in it.disks.iter().enumerate() {
            let copied = s.initial_copy.get(d).map_or(0, |c| c.0);
            let pct = copied * 100 / disk.size.max(1);
            let copy = if pct < 100 {
                format!(", initial copy {pct} %")
            } else {
                String::new()
            };
            println!(
                "  disk {d}: {} ({}{copy})\n    replica: {}",
                disk.source.display(),
                size(disk.size),
                replica_location(store, &it.blob(d))
            );
        }
    }
    Ok(())
}

fn cause_view(c: &HealthCause) -> CauseView {
    CauseView {
        kind: c.tag(),
        message: c.to_string(),
    }
}

/// One job, as `jobs --json` writes it.
#[derive(Serialize)]
struct JobView<'a> {
    id: String,
    kind: &'static str,
    item: &'a str,
    state: &'static str,
    progress_permille: u32,
    started: String,
    ended: Option<String>,
    duration_seconds: Option<u64>,
    tasks: Vec<TaskView<'a>>,
    errors: &'a [String],
    allowed_actions: Vec<&'static str>,
}

#[derive(Serialize)]
struct TaskView<'a> {
    name: &'a str,
    state: &'static str,
}

fn jobs(c: &Catalogue, item: Option<&str>, json: bool) -> Result<()> {
    let jobs: Vec<_> = c
        .jobs()
        .into_iter()
        .filter(|j| item.is_none_or(|i| j.item() == i))
        .collect();
    if json {
        let v: Vec<_> = jobs
            .iter()
            .map(|j| JobView {
                id: j.id.to_string(),
                kind: j.kind.tag(),
                item: j.item(),
                state: j.state.tag(),
                progress_permille: j.progress_permille,
                started: rfc3339(j.started),
                ended: j.ended.map(rfc3339),
                duration_seconds: j.ended.map(|e| e.saturating_sub(j.started).as_secs()),
                tasks: j
                    .tasks
                    .iter()
                    .map(|t| TaskView {
                        name: &t.name,
                        state: t.state.tag(),
                    })
                    .collect(),
                errors: &j.errors,
                allowed_actions: c.allowed_actions(j).iter().map(|a| a.tag()).collect(),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_jobs(&jobs);
    Ok(())
}

/// Prints the jobs table, its columns as wide as their longest cell.
pub(crate) fn print_jobs(jobs: &[&Job]) {
    let now = now();
    let mut rows = vec![[
        "id".to_owned(),
        "job".to_owned(),
        "state".to_owned(),
        "done".to_owned(),
        "tasks".to_owned(),
        "started".to_owned(),
        "took".to_owned(),
        "errors".to_owned(),
    ]];
    for j in jobs {
        let done = j.tasks.iter().filter(|t| t.state.is_terminal()).count();
        let took = match j.ended {
            Some(e) => duration(e.saturating_sub(j.started)),
            None => format!("{} so far", duration(now.saturating_sub(j.started))),
        };
        rows.push([
            j.id.to_string(),
            j.kind.to_string(),
            j.state.to_string(),
            format!("{} %", j.progress_permille / 10),
            format!("{done}/{}", j.tasks.len()),
            local(j.started),
            took,
            match j.errors.last() {
                Some(e) if j.errors.len() > 1 => format!("{} (and {} more)", e, j.errors.len() - 1),
                Some(e) => e.clone(),
                None => String::new(),
            },
        ]);
    }
    print_table(&rows, &[3, 4]);
}

/// Prints rows as aligned columns (two spaces apart; the columns in `right` aligned
/// right); the last column is not padded.
pub(crate) fn print_table<const N: usize>(rows: &[[String; N]], right: &[usize]) {
    let mut w = [0usize; N];
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            w[i] = w[i].max(cell.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else if right.contains(&i) {
                line.push_str(&format!("{cell:>width$}  ", width = w[i]));
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = w[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// One recovery point, as `points --json` writes it.
#[derive(Serialize)]
struct PointView<'a> {
    id: u64,
    time: String,
    app_consistent: bool,
    snapshots: Option<&'a Vec<String>>,
}

fn points(c: &Catalogue, item: &str, json: bool) -> Result<()> {
    let v = c.item(item, now())?;
    if json {
        let out: Vec<_> = v
            .status
            .points
            .iter()
            .map(|p| PointView {
                id: p.id.0,
                time: rfc3339(p.time),
                app_consistent: p.app_consistent,
                snapshots: v.item.points.get(&p.id.0),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if v.status.points.is_empty() {
        println!("{item} has no recovery point yet");
        return Ok(());
    }
    let now = now();
    let mut rows = vec![[
        "point".to_owned(),
        "time".to_owned(),
        "age".to_owned(),
        "consistency".to_owned(),
    ]];
    for p in &v.status.points {
        rows.push([
            p.id.0.to_string(),
            local(p.time),
            ago(now, p.time),
            if p.app_consistent {
                "application"
            } else {
                "crash"
            }
            .to_owned(),
        ]);
    }
    print_table(&rows, &[0]);
    Ok(())
}

/// One plan, as `plan list --json` and `plan show --json` write it.
#[derive(Serialize)]
struct PlanView<'a> {
    name: &'a str,
    groups: Vec<GroupView<'a>>,
    running: bool,
    last_job: Option<String>,
    last_state: Option<&'static str>,
}

#[derive(Serialize)]
struct GroupView<'a> {
    items: &'a [String],
    pre: Vec<ActionView<'a>>,
    post: Vec<ActionView<'a>>,
}

#[derive(Serialize)]
struct ActionView<'a> {
    name: &'a str,
    /// `manual` or `script`.
    kind: &'static str,
    script: Option<&'a str>,
    /// `test`, `planned`, `unplanned`; empty for all.
    scopes: Vec<String>,
}

fn action_views(actions: &[lifeboat_replication::PlanAction]) -> Vec<ActionView<'_>> {
    use lifeboat_replication::PlanActionKind;
    actions
        .iter()
        .map(|a| ActionView {
            name: &a.name,
            kind: match a.kind {
                PlanActionKind::Manual => "manual",
                PlanActionKind::Script { .. } => "script",
            },
            script: match &a.kind {
                PlanActionKind::Script { hook } => Some(hook),
                PlanActionKind::Manual => None,
            },
            scopes: a
                .scopes
                .iter()
                .map(|s| format!("{s:?}").to_lowercase())
                .collect(),
        })
        .collect()
}

fn plans(c: &Catalogue, only: Option<&str>, json: bool) -> Result<()> {
    let records: Vec<_> = c
        .plans()
        .filter(|r| only.is_none_or(|p| r.plan().name == p))
        .collect();
    if let Some(p) = only
        && records.is_empty()
    {
        anyhow::bail!("no recovery plan {p} (`lifeboat plan list` lists them)");
    }
    let views: Vec<PlanView<'_>> = records
        .iter()
        .map(|r| {
            let last = r.jobs().last();
            PlanView {
                name: &r.plan().name,
                groups: r
                    .plan()
                    .groups
                    .iter()
                    .map(|g| GroupView {
                        items: &g.items,
                        pre: action_views(&g.pre),
                        post: action_views(&g.post),
                    })
                    .collect(),
                running: r.running(),
                last_job: last.map(|j| j.id.to_string()),
                last_state: last.map(|j| j.state.tag()),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no recovery plans (`lifeboat plan create` makes one)");
        return Ok(());
    }
    for v in &views {
        let last = match (&v.last_job, v.last_state) {
            (Some(j), Some(s)) => format!("last job {j}: {}", s.replace('_', " ")),
            _ => "never run".to_owned(),
        };
        println!("{}: {} group(s), {last}", v.name, v.groups.len());
        if only.is_none() {
            continue;
        }
        for (n, g) in v.groups.iter().enumerate() {
            let pre = g.pre.iter().map(describe).collect::<Vec<_>>();
            let post = g.post.iter().map(describe).collect::<Vec<_>>();
            println!("  group {}: {}", n + 1, g.items.join(", "));
            for a in pre {
                println!("    before: {a}");
            }
            for a in post {
                println!("    after: {a}");
            }
        }
    }
    Ok(())
}

fn describe(a: &ActionView<'_>) -> String {
    let what = match a.script {
        Some(cmd) => format!("script `{cmd}`"),
        None => format!("manual: {}", a.name),
    };
    if a.scopes.is_empty() {
        what
    } else {
        format!("{what} ({} only)", a.scopes.join(", "))
    }
}
