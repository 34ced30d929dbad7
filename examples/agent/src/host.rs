//! The agent's host: disks are raw image files, closed logs arrive in the site's inbox,
//! machines are not run (the engine records whether they would be), plan hooks are shell
//! commands.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_engine::{Disk, FileHost, Host, LogOutcome};

/// Environment variables a hook never sees: the store's secrets.
const SECRETS: [&str; 3] = ["LIFEBOAT_KEY", "LIFEBOAT_AZURE_URL", "LIFEBOAT_ACCOUNT"];

/// Raw image files, an inbox of closed logs, shell hooks.
#[derive(Debug)]
pub(crate) struct AgentHost {
    /// The site directory (the inbox is `SITE/inbox/ITEM/DISK_INDEX/`).
    pub(crate) site: PathBuf,
}

/// Where closed logs of an item's disk arrive: whoever ships them from Hyper-V moves each
/// complete `.hrl` file in (a rename, so it appears whole); name order means nothing.
pub(crate) fn inbox(site: &Path, item: &str, disk: usize) -> PathBuf {
    site.join("inbox").join(item).join(disk.to_string())
}

/// Bytes of logs waiting in an item's inbox, all disks.
pub(crate) fn inbox_bytes(site: &Path, item: &str, disks: usize) -> u64 {
    (0..disks).map(|d| inbox_logs(site, item, d).1).sum()
}

/// Whether a file is a VHDX, by its signature (never by its name).
pub(crate) fn is_vhdx_file(f: &std::fs::File) -> io::Result<bool> {
    let mut head = [0u8; 8];
    let n = std::os::unix::fs::FileExt::read_at(f, &mut head, 0)?;
    Ok(lifeboat_vhdx::is_vhdx(&head[..n]))
}

/// The logs waiting in a disk's inbox, with their total size.
pub(crate) fn inbox_logs(site: &Path, item: &str, disk: usize) -> (Vec<PathBuf>, u64) {
    let mut logs = Vec::new();
    let mut bytes = 0;
    if let Ok(entries) = std::fs::read_dir(inbox(site, item, disk)) {
        for e in entries.flatten() {
            let p = e.path();
            let ok = p.extension().is_some_and(|x| x == "hrl")
                && e.file_type().is_ok_and(|t| t.is_file())
                && !e.file_name().to_string_lossy().starts_with('.');
            if ok {
                bytes += e.metadata().map_or(0, |m| m.len());
                logs.push(p);
            }
        }
    }
    logs.sort();
    (logs, bytes)
}

impl Host for AgentHost {
    /// The logs waiting in the item's inbox (the cycle's own, or a planned failover's
    /// final ones).
    fn close_logs(&self, item: &str, disks: usize) -> io::Result<Vec<(usize, PathBuf)>> {
        Ok((0..disks)
            .flat_map(|d| {
                inbox_logs(&self.site, item, d)
                    .0
                    .into_iter()
                    .map(move |p| (d, p))
            })
            .collect())
    }

    /// Taken logs leave the inbox; a refused one moves to `refused/` beside them, with its
    /// reason in `NAME.reason`.
    fn logs_taken(&self, item: &str, logs: &[(usize, PathBuf, LogOutcome)]) -> io::Result<()> {
        for (d, path, outcome) in logs {
            if !path.starts_with(inbox(&self.site, item, *d)) {
                continue; // handed over on the command line: not ours to move
            }
            match outcome {
                LogOutcome::Refused(why) => {
                    let aside = inbox(&self.site, item, *d).join("refused");
                    std::fs::create_dir_all(&aside)?;
                    let name = path.file_name().unwrap_or_default();
                    std::fs::rename(path, aside.join(name))?;
                    let mut reason = aside.join(name).into_os_string();
                    reason.push(".reason");
                    std::fs::write(reason, format!("{why}\n"))?;
                    tracing::warn!(item, disk = d, log = %path.display(), "log refused: {why}");
                }
                _ => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
        }
        Ok(())
    }

    /// A raw image or block device; or a VHDX (told by its signature, not its name),
    /// read through `lifeboat-vhdx` (a fixed one written in place).
    fn open_disk(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        self.open(path, false)
    }

    /// As [`AgentHost::open_disk`]; a raw image opened read-only (a protected disk on a
    /// read-only mount, or one the agent may not write, can be protected).
    fn open_disk_read(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        self.open(path, true)
    }

    fn create_disk(&self, path: &Path, len: u64) -> io::Result<()> {
        FileHost.create_disk(path, len)
    }

    /// `sh -c HOOK` with `LIFEBOAT_PLAN`, `LIFEBOAT_GROUP` (from 1) and `LIFEBOAT_PHASE`
    /// (pre or post), without the store's secrets; a non-zero exit, or running longer than
    /// `LIFEBOAT_HOOK_TIMEOUT` seconds (default 3600; the hook is killed), fails the plan.
    fn run_hook(&self, plan: &str, group: usize, pre: bool, hook: &str) -> io::Result<()> {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(hook)
            .env("LIFEBOAT_PLAN", plan)
            .env("LIFEBOAT_GROUP", (group + 1).to_string())
            .env("LIFEBOAT_PHASE", if pre { "pre" } else { "post" });
        for s in SECRETS {
            cmd.env_remove(s);
        }
        let timeout = std::env::var("LIFEBOAT_HOOK_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(3600), Duration::from_secs);
        // Its own process group, so a timeout kills what the hook started too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn()?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() >= timeout {
                if let Some(pid) = i32::try_from(child.id())
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "hook {hook:?} ran longer than {} s: killed",
                        timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            return Err(io::Error::other(format!(
                "hook {hook:?} exited with {status}"
            )));
        }
        Ok(())
    }
}

impl AgentHost {
    /// A disk at `path` (see [`AgentHost::open_disk`]), a raw one opened for reading and
    /// writing unless `read_only`.
    fn open(&self, path: &Path, read_only: bool) -> io::Result<Arc<dyn Disk>> {
        let f = std::fs::File::open(path)?;
        if is_vhdx_file(&f)? {
            let v = open_vhdx(path, f).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            return Ok(Arc::new(VhdxDisk {
                path: path.to_path_buf(),
                vhdx: std::sync::RwLock::new(v),
                writer: std::sync::Mutex::new(None),
            }));
        }
        match read_only {
            // The file opened above (a copy piece opens its disk once, not twice).
            true => FileHost::disk(f, path),
            false => FileHost.open_disk(path),
        }
    }
}

/// Where `guest-write`'s logs stand per disk (the stand-in guest's own change tracking:
/// the tracking session and the newest log it generated, which the agent may not have
/// taken yet).
pub(crate) fn generated(site: &Path) -> BTreeMap<String, (u64, String)> {
    std::fs::read(guest_file(site))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records the newest generated log of `key` (`ITEM/DISK`) in tracking session `session`.
pub(crate) fn set_generated(site: &Path, key: &str, session: u64, id: &str) -> io::Result<()> {
    let mut all = generated(site);
    all.insert(key.to_owned(), (session, id.to_owned()));
    let path = guest_file(site);
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(&serde_json::to_vec(&all).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

fn guest_file(site: &Path) -> PathBuf {
    site.join("guest.json")
}

/// A VHDX source disk: read as its virtual disk, never written (failback goes to a raw
/// image or a block device).
/// Opens a VHDX and, for a differencing disk (`.avhdx`), its parents: each found by the
/// locator's `relative_path` from the child's directory, else by the file name of its
/// `absolute_win32_path` in that directory (a chain copied off a Hyper-V host).
pub(crate) fn open_vhdx(
    path: &Path,
    f: std::fs::File,
) -> lifeboat_vhdx::Result<lifeboat_vhdx::Vhdx<std::fs::File>> {
    let mut dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    lifeboat_vhdx::open_chain(f, |locator| {
        let windows = |p: &str| p.replace('\\', "/");
        let mut tried = Vec::new();
        if let Some(rel) = locator.get("relative_path") {
            tried.push(dir.join(windows(rel).trim_start_matches("./")));
        }
        if let Some(abs) = locator.get("absolute_win32_path")
            && let Some(name) = Path::new(&windows(abs)).file_name()
        {
            tried.push(dir.join(name));
        }
        for p in &tried {
            if let Ok(f) = std::fs::File::open(p) {
                dir = p.parent().unwrap_or(Path::new(".")).to_path_buf();
                return Ok(f);
            }
        }
        Err(lifeboat_vhdx::Error::Io {
            offset: 0,
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "the parent disk is not found (tried {}; locator: {:?})",
                    tried
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    locator.entries
                ),
            ),
        })
    })
}

/// A VHDX disk: read as its virtual disk; written in place (a failback onto it) into the
/// blocks the file holds, after a new header with a new DataWriteGuid.
struct VhdxDisk {
    path: PathBuf,
    vhdx: std::sync::RwLock<lifeboat_vhdx::Vhdx<std::fs::File>>,
    /// The file opened for writing, from the first write on.
    writer: std::sync::Mutex<Option<std::fs::File>>,
}

impl VhdxDisk {
    fn refused(&self, e: lifeboat_vhdx::Error) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: {e} (fail back to a fixed VHDX, a raw image or a block device)",
                self.path.display()
            ),
        )
    }
}

impl lifeboat_resync::ReadAt for VhdxDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self
            .vhdx
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .info()
            .virtual_size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let v = self.vhdx.read().unwrap_or_else(|p| p.into_inner());
        v.read_at(buf, offset).map_err(io::Error::from)
    }

    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        let v = self.vhdx.read().unwrap_or_else(|p| p.into_inner());
        v.data_ranges(offset, len)
    }
}

impl Disk for VhdxDisk {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_none() {
            let mut f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            // Fresh ids: the disk's data changes now (the spec's rule for DataWriteGuid).
            let id = |what: &str| {
                let seed = format!("{}/{what}/{:?}", self.path.display(), Instant::now());
                let mut g = [0u8; 16];
                g.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
                g
            };
            let mut v = self.vhdx.write().unwrap_or_else(|p| p.into_inner());
            v.begin_writes(&mut f, id("file"), id("data"))
                .map_err(|e| self.refused(e))?;
            *w = Some(f);
        }
        let f = w.as_mut().expect("opened above");
        let v = self.vhdx.read().unwrap_or_else(|p| p.into_inner());
        v.write_at(f, offset, data).map_err(|e| self.refused(e))
    }

    fn sync(&self) -> io::Result<()> {
        match self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(f) => lifeboat_vhdx::WriteAt::sync(f),
            None => Ok(()),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        let v = self.vhdx.read().unwrap_or_else(|p| p.into_inner());
        v.check_writable().map_err(|e| self.refused(e))
    }

    fn write_guid(&self) -> io::Result<Option<[u8; 16]>> {
        let v = self.vhdx.read().unwrap_or_else(|p| p.into_inner());
        Ok(Some(v.info().data_write_guid))
    }
}
