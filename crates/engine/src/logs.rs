//! Taking closed logs exactly once, in chain order: the rules that keep a replica from
//! silently missing a write.
//!
//! Each disk's logs form a chain (a log's PreviousUniqueId names the log before it). The
//! chain starts where change tracking starts (protection, a resync, reprotect): the engine
//! gives each start a fresh id, tells the host ([`Host::tracking_started`]) and records it
//! as the disk's cursor; the first log follows it. A log is staged for the next cycle only
//! when it continues the chain; the logs handed over together are put in chain order first
//! (the order they are given in means nothing). Then:
//! - a log taken before (its id among the disk's recent ones) is skipped: exactly once;
//! - a log continuing the chain tracking ended at the last restart is stale (a resync
//!   covered its writes): skipped;
//! - any other log leaves a gap (a log before it is missing): it is staged as breaking the
//!   chain, never applied, and its cycle marks the item resync-required with the reason.

use std::path::PathBuf;

#[cfg(doc)]
use crate::Host;
use crate::catalog::{self, Disk, Guid, StagedLog, Tracking};
use crate::data::{self, Log};
use crate::engine::{Engine, Event};
use crate::error::{Error, Result, blocking};

/// What [`Engine::stage_logs`] did with the logs handed over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Staged {
    /// Logs staged for the next cycle that continue their disk's chain.
    pub chained: usize,
    /// Logs that leave a gap: staged so their cycle asks for a resync, never applied.
    pub broken: usize,
    /// Logs taken before, or covered by a resync: skipped.
    pub skipped: usize,
    /// What became of each log handed over.
    pub logs: Vec<(usize, PathBuf, LogOutcome)>,
}

/// What became of one log handed over to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogOutcome {
    /// Staged for the next cycle, which applies it.
    Staged,
    /// Taken before, or covered by a resync: nothing to do.
    Skipped,
    /// Not applied, and why: a log that is not valid for its disk is not staged; one that
    /// is staged but cannot be applied (a gap before it, not closed cleanly, over half the
    /// disk, another disk's data-write GUID) makes its cycle ask for a resync.
    Refused(String),
}

impl Tracking {
    /// Change tracking (re)starts: a new chain begins at `start` (the id its first log
    /// follows); logs continuing the old one are covered by what restarted it.
    pub(crate) fn restart(&mut self, start: Guid) {
        self.session += 1;
        if self.last_log != [0; 16] {
            self.retired = Some(self.last_log);
        }
        self.last_log = start;
    }

    fn remember(&mut self, id: Guid) {
        self.recent.push_back(id);
        while self.recent.len() > catalog::RECENT_LOGS {
            self.recent.pop_front();
        }
    }
}

impl Engine {
    /// Accepts closed logs (disk index, file) for an item: each is checked (a valid MS-HRL
    /// log, writes within the disk), put in chain order, and staged in the site for the
    /// next cycle, exactly once. `app_consistent`: the logs were closed at a quiesced
    /// snapshot of the machine. Nothing is staged if any log is invalid.
    pub async fn stage_logs(
        &mut self,
        item: &str,
        logs: &[(usize, PathBuf)],
        app_consistent: bool,
    ) -> Result<Staged> {
        let mut read: Vec<(usize, PathBuf, Log)> = Vec::new();
        for (d, path, log) in self.check_logs(item, logs.to_vec()).await? {
            read.push((d, path, log?));
        }
        self.stage_checked(item, read, app_consistent).await
    }

    /// Stages logs already read and checked ([`Engine::check_log`]): each is read once.
    async fn stage_checked(
        &mut self,
        item: &str,
        read: Vec<(usize, PathBuf, Log)>,
        app_consistent: bool,
    ) -> Result<Staged> {
        let mut disks = self.doc(item)?.disks.clone();
        let mut out = Staged::default();
        let mut staged = Vec::new();
        for (d, disk) in disks.iter_mut().enumerate() {
            let mut mine: Vec<(PathBuf, Log)> = read
                .iter()
                .filter(|(x, _, _)| *x == d)
                .map(|(_, p, l)| (p.clone(), l.clone()))
                .collect();
            while !mine.is_empty() {
                let t = &mut disk.tracking;
                let i = mine
                    .iter()
                    .position(|(_, l)| t.recent.contains(&l.unique_id))
                    .or_else(|| {
                        mine.iter()
                            .position(|(_, l)| Some(l.previous_id) == t.retired)
                    })
                    .or_else(|| mine.iter().position(|(_, l)| l.previous_id == t.last_log));
                let Some(i) = i else {
                    // A gap: what is left cannot follow the chain.
                    for (path, log) in mine.drain(..) {
                        staged.push(self.stage_one(item, d, &path, &log, false, app_consistent)?);
                        disk.tracking.remember(log.unique_id);
                        out.broken += 1;
                        let why = format!(
                            "does not continue disk {d}'s chain (a log before it is missing): {item} needs a resync"
                        );
                        out.logs.push((d, path, LogOutcome::Refused(why)));
                    }
                    break;
                };
                let (path, log) = mine.remove(i);
                if t.recent.contains(&log.unique_id) || Some(log.previous_id) == t.retired {
                    if Some(log.previous_id) == t.retired {
                        t.retired = Some(log.unique_id);
                    }
                    self.observer.event(&Event::LogSkipped {
                        item: item.to_owned(),
                        path: path.clone(),
                        id: catalog::hex(&log.unique_id),
                    });
                    out.skipped += 1;
                    out.logs.push((d, path, LogOutcome::Skipped));
                    continue;
                }
                let one = self.stage_one(item, d, &path, &log, true, app_consistent)?;
                let size = disk.size;
                let outcome = if !one.clean {
                    LogOutcome::Refused(format!("was not closed cleanly: {item} needs a resync"))
                } else if !one.guid_ok {
                    LogOutcome::Refused(format!(
                        "names another data-write GUID than disk {d}'s (the disk changed offline): {item} needs a resync"
                    ))
                } else if one.logged_bytes > 0 && one.logged_bytes.saturating_mul(2) >= size {
                    LogOutcome::Refused(format!(
                        "holds {} bytes, half of disk {d} or more: {item} needs a resync",
                        one.logged_bytes
                    ))
                } else {
                    LogOutcome::Staged
                };
                out.logs.push((d, path, outcome));
                staged.push(one);
                let t = &mut disk.tracking;
                t.last_log = log.unique_id;
                t.remember(log.unique_id);
                out.chained += 1;
            }
        }
        let doc = self.doc_mut(item)?;
        doc.disks = disks;
        doc.pending.extend(staged);
        self.persist().await?;
        Ok(out)
    }

    /// Asks the host to close the item's open logs ([`Host::close_logs`]) and stages what
    /// it hands over.
    pub(crate) async fn take_host_logs(
        &mut self,
        item: &str,
        app_consistent: bool,
    ) -> Result<Staged> {
        let host = self.host.clone();
        let (name, n) = (item.to_owned(), self.doc(item)?.disks.len());
        let closed = blocking("closing change logs", move || host.close_logs(&name, n))
            .await?
            .map_err(Error::io(format!("closing the change logs of {item}")))?;
        if closed.is_empty() {
            return Ok(Staged::default());
        }
        let mut valid = Vec::new();
        let mut refused = Vec::new();
        for (d, path, log) in self.check_logs(item, closed).await? {
            match log {
                Ok(log) => valid.push((d, path, log)),
                Err(e) => refused.push((d, path, LogOutcome::Refused(e.to_string()))),
            }
        }
        let mut staged = if valid.is_empty() {
            Staged::default()
        } else {
            self.stage_checked(item, valid, app_consistent).await?
        };
        staged.logs.extend(refused);
        let (host, name, report) = (self.host.clone(), item.to_owned(), staged.logs.clone());
        blocking("handing logs back", move || host.logs_taken(&name, &report))
            .await?
            .map_err(Error::io(format!("handing the change logs of {item} back")))?;
        Ok(staged)
    }

    /// Reads logs (disk index, file), checking that each is a valid MS-HRL log whose
    /// writes fit disk `d` of the item: each log's answer, in the order given. The logs
    /// are read at once on the blocking pool (reading and summing a log's payloads is a
    /// core's work; a hand-over of several waited for each in turn).
    async fn check_logs(
        &self,
        item: &str,
        logs: Vec<(usize, PathBuf)>,
    ) -> Result<Vec<(usize, PathBuf, Result<Log>)>> {
        let doc = self.doc(item)?;
        let n = doc.disks.len();
        let checks = logs.into_iter().map(|(d, path)| {
            let size = doc.disks.get(d).map(|disk| disk.size);
            let (p, item) = (path.clone(), item.to_owned());
            let check = move || -> Result<Log> {
                let size = size.ok_or_else(|| {
                    Error::Invalid(format!("{item} has {n} disk(s); there is no disk {d}"))
                })?;
                let log = data::read_log(&p)?;
                if log.disk_end > size {
                    return Err(Error::Invalid(format!(
                        "{}: writes reach byte {} but disk {d} is {size} bytes",
                        p.display(),
                        log.disk_end,
                    )));
                }
                Ok(log)
            };
            async move { (d, path, blocking("checking a change log", check).await) }
        });
        let mut out = Vec::new();
        for (d, path, log) in futures::future::join_all(checks).await {
            out.push((d, path, log?));
        }
        Ok(out)
    }

    /// Stages a log in the site for its cycle: a hard link where the site shares the log's
    /// file system (nothing copied; the log's bytes made durable), else a copy. Either way
    /// the staged file is checked to be this log (its UniqueId) when it is applied.
    fn stage_one(
        &self,
        item: &str,
        d: usize,
        path: &std::path::Path,
        log: &Log,
        chained: bool,
        app_consistent: bool,
    ) -> Result<StagedLog> {
        let id = catalog::hex(&log.unique_id);
        let dest = self.site.logs_dir(item).join(format!("disk{d}-{id}.hrl"));
        data::link_or_copy(path, &dest)?;
        let disk: &Disk = &self.doc(item)?.disks[d];
        Ok(StagedLog {
            disk: d,
            path: dest,
            id,
            logged_bytes: log.logged_bytes,
            clean: log.clean,
            guid_ok: log.write_guid == [0; 16] || log.write_guid == disk.tracking.write_guid,
            chained,
            app_consistent,
            closed_at: log.closed_at,
        })
    }
}
