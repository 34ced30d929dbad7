//! The read commands (`status`, `points`, `jobs`): they read the catalogue, never the
//! site's lock, so they answer at once while a service or a long command works; when the
//! store cannot be reached they show the site's cache and say how old it is.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use lifeboat_engine::{Catalogue, Item, Source};
use serde_json::json;

use crate::host::inbox_logs;
use crate::{Cli, Cmd, Target};

/// How long a read waits for the store before it shows the site's cache.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a read command.
pub(crate) async fn run(cli: &Cli) -> Result<()> {
    let c = catalogue(&cli.target).await?;
    let site = &cli.target.site;
    match &cli.command {
        Cmd::Status { item } => status(&c, site, item.as_deref(), cli.json),
        Cmd::Jobs { item } => jobs(&c, item.as_deref(), cli.json),
        Cmd::Points { item } => points(&c, item, cli.json),
        _ => unreachable!("not a read command"),
    }
}

/// The catalogue from the store, else from the site's cache (saying so on stderr).
async fn catalogue(target: &Target) -> Result<Catalogue> {
    let site = target.site.as_path();
    let store = crate::open_store(target, false).await?;
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

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Bytes of logs waiting in the item's inbox at this site.
fn inbox_bytes(site: &Path, it: &Item) -> u64 {
    (0..it.disks.len())
        .map(|d| inbox_logs(site, &it.name, d).1)
        .sum()
}

/// `90 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
pub(crate) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `3 min ago` or `in 40 s`.
pub(crate) fn ago(now: Duration, t: Duration) -> String {
    if t <= now {
        format!("{} ago", duration(now - t))
    } else {
        format!("in {}", duration(t - now))
    }
}

fn status(c: &Catalogue, site: &Path, item: Option<&str>, json: bool) -> Result<()> {
    let now = now();
    let views: Vec<_> = match item {
        Some(i) => vec![c.item(i, now)?],
        None => c.items(now).collect(),
    };
    let mut out = Vec::new();
    for v in &views {
        let (it, s) = (v.item, &v.status);
        if json {
            out.push(json!({
                "item": it.name,
                "owner": it.owner.label,
                "owned_here": v.owned,
                "epoch": it.epoch,
                "state": format!("{:?}", s.state),
                "test_failover": format!("{:?}", s.test_failover),
                "health": format!("{:?}", s.health),
                "causes": s.causes.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>(),
                "points": s.points.iter().map(|p| p.id.0).collect::<Vec<_>>(),
                "cycles_applied": s.cycles_applied,
                "rpo_seconds": s.rpo.map(|r| r.as_secs()),
                "last_cycle": s.last_cycle.map(|t| t.as_secs()),
                "next_cycle": s.next_cycle.map(|t| t.as_secs()),
                "retry_at": s.retry_at.map(|t| t.as_secs()),
                "inbox_bytes": inbox_bytes(site, it),
                "failover_point": s.failover_point.map(|p| p.0),
                "source_running": it.source_running,
                "target_running": it.target_running,
                "disks": it.disks.iter().enumerate().map(|(d, disk)| json!({
                    "index": d,
                    "path": disk.source,
                    "size": disk.size,
                    "blob": it.blob(d),
                    "write_guid": lifeboat_engine::hex(&disk.tracking.write_guid),
                    "last_log": lifeboat_engine::hex(&disk.tracking.last_log),
                    "copied": s.initial_copy.get(d).map(|c| c.0),
                })).collect::<Vec<_>>(),
                "test_disks": it.test.disks,
                "recovered": it.failover.disks,
                "last_resync": it.last_resync,
                "last_sync_back": it.last_sync_back,
            }));
        } else {
            println!(
                "{}: {:?}, health {:?}, {} point(s), {} cycle(s) applied, source {}, recovered machine {}",
                it.name,
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
            if !v.owned {
                println!("  owned by site {}", it.owner.label);
            }
            let mut line = Vec::new();
            if let Some(r) = s.rpo {
                line.push(format!("RPO {}", duration(r)));
            }
            if let Some(t) = s.last_cycle {
                line.push(format!("last cycle {}", ago(now, t)));
            }
            if let Some(t) = s.next_cycle {
                line.push(format!("next cycle {}", ago(now, t)));
            }
            if let Some(t) = s.retry_at {
                line.push(format!("retry {}", ago(now, t)));
            }
            let inbox = inbox_bytes(site, it);
            if inbox > 0 {
                line.push(format!("{inbox} bytes of logs in the inbox"));
            }
            if !line.is_empty() {
                println!("  {}", line.join(", "));
            }
            if s.test_failover != lifeboat_replication::TestFailoverState::None {
                println!("  test failover: {:?}", s.test_failover);
            }
            for c in &s.causes {
                println!("  cause: {c:?}");
            }
            for (d, disk) in it.disks.iter().enumerate() {
                let copied = s.initial_copy.get(d).map_or(0, |c| c.0);
                println!(
                    "  disk {d}: {} ({} bytes, initial copy {}%)",
                    disk.source.display(),
                    disk.size,
                    copied * 100 / disk.size.max(1)
                );
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
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
                    "allowed_actions": c.allowed_actions(j).iter().map(|x| format!("{x:?}")).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_jobs(&jobs);
    Ok(())
}

/// Prints the jobs table.
pub(crate) fn print_jobs(jobs: &[&lifeboat_replication::Job]) {
    let w = jobs
        .iter()
        .map(|j| j.id.to_string().len())
        .max()
        .unwrap_or(2)
        .max(2);
    println!(
        "{:<w$}  {:<22} {:<11} {:>6}  {:>5}  errors",
        "id", "job", "state", "done", "tasks"
    );
    for j in jobs {
        let done = j.tasks.iter().filter(|t| t.state.is_terminal()).count();
        println!(
            "{:<w$}  {:<22} {:<11} {:>5}%  {:>2}/{:<2}  {}",
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

fn points(c: &Catalogue, item: &str, json: bool) -> Result<()> {
    let v = c.item(item, now())?;
    if json {
        let out: Vec<_> = v
            .status
            .points
            .iter()
            .map(|p| {
                json!({
                    "id": p.id.0,
                    "time": p.time.as_secs(),
                    "app_consistent": p.app_consistent,
                    "snapshots": v.item.points.get(&p.id.0),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for p in &v.status.points {
            println!(
                "point {}: time {}, {}",
                p.id.0,
                p.time.as_secs(),
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
