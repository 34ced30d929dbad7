//! `lifeboat run`: the service. It acts for every item the site owns, in real time: delta
//! cycles at each item's copy frequency (taking the logs waiting in the inbox), retries on
//! the replication schedule, scheduled initial replication and resyncs, health as time
//! passes. Between its steps (none longer than one action) it lets other `lifeboat`
//! processes work on the site, and it sleeps without holding the site at all; read
//! commands never wait for it (they read the catalogue, not the site).

use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use lifeboat_engine::{Engine, Event, Observer};
use lifeboat_replication::{Health, ProtectionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::Store;
use crate::host::inbox_bytes;

/// The longest the service sleeps without looking at the site (another process may have
/// protected an item or started a job meanwhile).
const NAP: Duration = Duration::from_secs(2);

/// The service's lock: held while it runs (released by the OS on any exit).
fn service_lock(site: &Path) -> Result<File> {
    std::fs::create_dir_all(site).with_context(|| format!("creating {}", site.display()))?;
    let path = site.join("service.lock");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Whether a `lifeboat run` service works on the site.
pub(crate) fn running(site: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .open(site.join("service.lock"))
    else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => {
            let _ = f.unlock();
            false
        }
        Err(_) => true,
    }
}

/// The engine's events, as the service's log lines.
struct ServiceLog;

impl Observer for ServiceLog {
    fn event(&self, e: &Event) {
        match e {
            Event::CycleApplied {
                item,
                disk,
                cycle,
                bytes_sent,
                requests,
                batches,
            } => tracing::info!(
                item,
                disk,
                cycle,
                bytes_sent,
                requests,
                batches,
                "cycle applied"
            ),
            Event::LogSkipped { item, path, id } => {
                tracing::info!(item, log = %path.display(), id, "log taken before: skipped")
            }
            Event::TookOver { item, from } => tracing::warn!(item, from, "item taken over"),
            Event::Performing { item, task, detail } => {
                tracing::debug!(item, action = detail, "{task}")
            }
            Event::Failed {
                item,
                action,
                message,
            } => tracing::warn!(
                item,
                action,
                "failed: {message} (retried on the schedule if recoverable)"
            ),
            _ => {}
        }
    }
}

/// How the service runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    /// Do the work that is due, then exit.
    pub(crate) once: bool,
    /// Where to serve metrics.
    pub(crate) metrics: Option<SocketAddr>,
    /// Items' copy pieces sent at once.
    pub(crate) transfers: usize,
}

/// Runs the service until SIGTERM or SIGINT (or, with `once`, until the work that is due
/// is done).
pub(crate) async fn run(store: &Store, site: &Path, opts: Options) -> Result<()> {
    let Options {
        once,
        metrics,
        transfers,
    } = opts;
    let lock = service_lock(site)?;
    if lock.try_lock().is_err() {
        bail!(
            "a lifeboat service already runs on {}: one per site",
            site.display()
        );
    }
    let mut e = Engine::builder(store.store.clone(), site)
        .store_description(store.desc.clone())
        .writer(store.writer.clone())
        .host(Arc::new(crate::host::AgentHost {
            site: site.to_path_buf(),
        }))
        .observer(Arc::new(ServiceLog))
        .transfers(transfers)
        .open()
        .await?;
    let stop = Arc::new((AtomicBool::new(false), Notify::new()));
    watch_signals(stop.clone())?;
    let page = Arc::new(Mutex::new(String::new()));
    if let Some(addr) = metrics {
        serve_metrics(addr, page.clone()).await?;
    }
    tracing::info!(site = %site.display(), store = %store.desc, "service started");
    let stopping = || stop.0.load(Ordering::SeqCst);
    let mut errors = Errors::default();
    while !stopping() {
        if let Err(err) = e.yield_site().await {
            errors.log(&err);
        }
        let worked = match e.step().await {
            Ok(w) => w,
            Err(err) => {
                errors.log(&err);
                false
            }
        };
        publish(&e, site, &page);
        if worked {
            continue;
        }
        if once {
            break;
        }
        let now = e.now();
        let nap = e
            .next_wakeup()
            .map_or(NAP, |t| t.saturating_sub(now).min(NAP));
        let stop2 = stop.clone();
        let slept = e
            .unlocked(async move {
                tokio::select! {
                    _ = tokio::time::sleep(nap) => {}
                    _ = stop2.1.notified() => {}
                }
            })
            .await;
        if let Err(err) = slept {
            errors.log(&err);
        }
    }
    tracing::info!("service stopped");
    Ok(())
}

/// Logs errors, each distinct one once a minute at most (a store that is away fails
/// every step the same way).
#[derive(Default)]
struct Errors {
    last: String,
    at: Option<std::time::Instant>,
}

impl Errors {
    fn log(&mut self, err: &dyn std::fmt::Display) {
        let msg = err.to_string();
        let recent = self
            .at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if msg != self.last || !recent {
            tracing::error!("{msg}");
            self.last = msg;
            self.at = Some(std::time::Instant::now());
        }
    }
}

/// SIGTERM and SIGINT ask the service to stop after the step it is in.
fn watch_signals(stop: Arc<(AtomicBool, Notify)>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping after the current step");
        stop.0.store(true, Ordering::SeqCst);
        stop.1.notify_waiters();
        stop.1.notify_one();
    });
    Ok(())
}

/// Serves the metrics page on `addr` (`GET /metrics`, the Prometheus text format).
async fn serve_metrics(addr: SocketAddr, page: Arc<Mutex<String>>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    tracing::info!(%addr, "metrics served at /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let reply = if head.starts_with("GET /metrics ") {
                    let body = page.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(())
}

/// Rebuilds the metrics page from the items this site acts for.
fn publish(e: &Engine, site: &Path, page: &Mutex<String>) {
    let text = metrics_page(e, site);
    *page.lock().unwrap_or_else(|p| p.into_inner()) = text;
}

/// The Prometheus text format: one family per figure (gauges, and a counter for the
/// `_total`), one sample per item.
pub(crate) fn metrics_page(e: &Engine, site: &Path) -> String {
    let unix = |d: Duration| d.as_secs_f64();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let views: Vec<_> = e.items().filter(|v| v.owned).collect();
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    let label = |item: &str| format!("item=\"{}\"", item.replace(['\\', '"'], "_"));
    family(
        "lifeboat_rpo_seconds",
        "Age of the newest recovery point's data (the recovery point objective achieved).",
        views
            .iter()
            .filter_map(|v| v.status.rpo.map(|r| (label(&v.item.name), unix(r))))
            .collect(),
    );
    family(
        "lifeboat_health",
        "Health: 0 normal, 1 warning, 2 critical.",
        views
            .iter()
            .map(|v| {
                let h = match v.status.health {
                    Health::Normal => 0.0,
                    Health::Warning => 1.0,
                    _ => 2.0,
                };
                (label(&v.item.name), h)
            })
            .collect(),
    );
    family(
        "lifeboat_protected",
        "1 while the item replicates (state Protected), else 0.",
        views
            .iter()
            .map(|v| {
                let p = v.status.state == ProtectionState::Protected;
                (label(&v.item.name), if p { 1.0 } else { 0.0 })
            })
            .collect(),
    );
    family(
        "lifeboat_recovery_points",
        "Recovery points kept.",
        views
            .iter()
            .map(|v| (label(&v.item.name), v.status.points.len() as f64))
            .collect(),
    );
    family(
        "lifeboat_inbox_bytes",
        "Bytes of closed logs waiting in the inbox.",
        views
            .iter()
            .map(|v| {
                let bytes = inbox_bytes(site, &v.item.name, v.item.disks.len());
                (label(&v.item.name), bytes as f64)
            })
            .collect(),
    );
    family(
        "lifeboat_last_cycle_timestamp_seconds",
        "When the last cycle made a recovery point (Unix time).",
        views
            .iter()
            .filter_map(|v| v.status.last_cycle.map(|t| (label(&v.item.name), unix(t))))
            .collect(),
    );
    family(
        "lifeboat_next_cycle_timestamp_seconds",
        "When the next delta cycle is due (Unix time).",
        views
            .iter()
            .filter_map(|v| v.status.next_cycle.map(|t| (label(&v.item.name), unix(t))))
            .collect(),
    );
    family(
        "lifeboat_cycles_applied_total",
        "Delta cycles applied.",
        views
            .iter()
            .map(|v| (label(&v.item.name), v.status.cycles_applied as f64))
            .collect(),
    );
    family(
        "lifeboat_metrics_timestamp_seconds",
        "When this page was made (Unix time).",
        vec![(String::new(), unix(now))],
    );
    out
}
