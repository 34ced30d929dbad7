//! What differs per embedder: the protected host (its disks, its machines, its hooks) and
//! the clock. Everything else is the engine's.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lifeboat_source::ReadAt;

use crate::logs::LogOutcome;

/// The engine's only clock: the time since the Unix epoch. Tests pass one they move.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> Duration;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A disk of the protected host: read at any offset (initial replication, resync), written
/// at any offset (failback). Positional and shareable across threads.
pub trait Disk: ReadAt + Send {
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes every write so far durable.
    fn sync(&self) -> io::Result<()>;

    /// Whether every byte can be written (checked before a failback starts, so a target
    /// that would refuse part-way is refused whole). Yes by default.
    fn check_writable(&self) -> io::Result<()> {
        Ok(())
    }

    /// The disk's own DataWriteGuid, for a format that has one (VHDX): the id Hyper-V's
    /// change logs name as `Vhd2DataWriteGuid`, which changes when the disk is written
    /// outside change tracking. `None` (the default): the engine makes one up, and logs
    /// are written with it.
    fn write_guid(&self) -> io::Result<Option<[u8; 16]>> {
        Ok(None)
    }
}

impl Disk for File {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
}

/// The protected host, as the engine sees it. Disks are named by paths the embedder
/// chooses (files, devices, or names in its own space); the engine records them in the
/// catalogue and hands them back.
///
/// Machine control defaults to nothing (a host that runs no machines); the engine records
/// whether each machine runs either way.
pub trait Host: Send + Sync + std::fmt::Debug {
    /// Opens a disk for reading and writing (a failback's target).
    fn open_disk(&self, path: &Path) -> io::Result<Arc<dyn Disk>>;

    /// Opens a disk to be read only (a protected disk copied, compared, verified), so a
    /// disk the host may not write (a read-only file or mount, a snapshot) can be
    /// protected. The default opens it as [`Host::open_disk`] does.
    fn open_disk_read(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        self.open_disk(path)
    }

    /// Creates a zeroed disk of `len` bytes at `path` (failback to an alternate disk that
    /// does not exist yet); an existing one is an error.
    fn create_disk(&self, path: &Path, len: u64) -> io::Result<()>;

    /// Change tracking of a disk (re)starts (protection, a resync, reprotect): the first
    /// log of the new chain must name `chain` as its PreviousUniqueId. A host whose
    /// tracking driver writes the logs tells it here; others hand the id to whoever
    /// writes them (the catalogue keeps it as the disk's cursor).
    fn tracking_started(&self, item: &str, disk: usize, chain: [u8; 16]) -> io::Result<()> {
        let _ = (item, disk, chain);
        Ok(())
    }

    /// Protection of the item was disabled: its change tracking on `disk` may stop, and
    /// logs not handed over yet are not wanted any more.
    fn tracking_stopped(&self, item: &str, disk: usize) -> io::Result<()> {
        let _ = (item, disk);
        Ok(())
    }

    /// Closes the item's open change logs now and hands over every log closed and not
    /// handed over yet, as (disk, file): the engine asks at the start of each cycle, so a
    /// cycle's point holds the disks as they are now. A host whose logs close on their own
    /// schedule and are handed over with [`Engine::replicate`] keeps the default (none):
    /// it promises that no write is missing from the logs handed over so far (else a
    /// cycle's point claims a moment its replica does not hold).
    ///
    /// [`Engine::replicate`]: crate::Engine::replicate
    fn close_logs(&self, item: &str, disks: usize) -> io::Result<Vec<(usize, PathBuf)>> {
        let _ = (item, disks);
        Ok(Vec::new())
    }

    /// What became of the logs [`Host::close_logs`] handed over, once the catalogue
    /// records it: [`LogOutcome::Staged`] and [`LogOutcome::Skipped`] ones are the
    /// engine's now (the host may delete them); a [`LogOutcome::Refused`] one should be
    /// moved aside with its reason for a person to see.
    fn logs_taken(&self, item: &str, logs: &[(usize, PathBuf, LogOutcome)]) -> io::Result<()> {
        let _ = (item, logs);
        Ok(())
    }

    /// Shuts the protected machine down (planned failover).
    fn shut_down_source(&self, item: &str) -> io::Result<()> {
        let _ = item;
        Ok(())
    }

    /// Starts the protected machine (cancelled failover, failback).
    fn start_source(&self, item: &str) -> io::Result<()> {
        let _ = item;
        Ok(())
    }

    /// Starts the recovered machine on its failover disks.
    fn start_target(&self, item: &str) -> io::Result<()> {
        let _ = item;
        Ok(())
    }

    /// Stops the recovered machine.
    fn stop_target(&self, item: &str) -> io::Result<()> {
        let _ = item;
        Ok(())
    }

    /// Runs a recovery plan's script hook; an error fails the plan. Called from a blocking
    /// thread; may be called again after a crash, so hooks should be idempotent.
    fn run_hook(&self, plan: &str, group: usize, pre: bool, hook: &str) -> io::Result<()> {
        let _ = (plan, group, pre);
        Err(io::Error::other(format!(
            "this host runs no hooks (hook {hook:?})"
        )))
    }
}

/// A host whose disks are files (raw images): the reference agent's, and any embedder's
/// that replicates image files.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileHost;

impl FileHost {
    /// `f`, opened from `path`, as a disk if it is a regular file or a block device: for
    /// a host that opened the file already (to look at its format, say), so it is not
    /// opened twice.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("disk.raw");
    /// std::fs::write(&path, [7u8; 4096])?;
    /// let disk = lifeboat_engine::FileHost::disk(std::fs::File::open(&path)?, &path)?;
    /// assert_eq!(disk.size()?, 4096);
    /// assert!(lifeboat_engine::FileHost::disk(std::fs::File::open(dir.path())?, dir.path()).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn disk(f: File, path: &Path) -> io::Result<Arc<dyn Disk>> {
        let t = f.metadata()?.file_type();
        if !(t.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&t)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        Ok(Arc::new(f))
    }
}

impl Host for FileHost {
    /// A regular file or a block device (nothing else is a disk).
    fn open_disk(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        FileHost::disk(OpenOptions::new().read(true).write(true).open(path)?, path)
    }

    /// As [`FileHost::open_disk`], opened read-only: its writes fail.
    fn open_disk_read(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        FileHost::disk(File::open(path)?, path)
    }

    fn create_disk(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }
}

/// A host whose disks live in memory, for tests and examples: add disks, let a "guest"
/// write to them, read them back.
#[derive(Debug, Default)]
pub struct MemoryHost {
    disks: Mutex<BTreeMap<PathBuf, Arc<MemoryDisk>>>,
}

/// One disk of a [`MemoryHost`], and the DataWriteGuid it reports, if any.
#[derive(Debug)]
pub struct MemoryDisk(RwLock<Vec<u8>>, Option<[u8; 16]>);

impl MemoryHost {
    /// An empty host.
    pub fn new() -> Self {
        MemoryHost::default()
    }

    /// Adds (or replaces) the disk `path` with these bytes.
    pub fn add_disk(&self, path: impl Into<PathBuf>, bytes: Vec<u8>) {
        self.lock()
            .insert(path.into(), Arc::new(MemoryDisk(RwLock::new(bytes), None)));
    }

    /// Adds (or replaces) a disk that reports `write_guid` as its DataWriteGuid (as a
    /// VHDX does; see [`Disk::write_guid`]).
    pub fn add_disk_with_guid(
        &self,
        path: impl Into<PathBuf>,
        bytes: Vec<u8>,
        write_guid: [u8; 16],
    ) {
        self.lock().insert(
            path.into(),
            Arc::new(MemoryDisk(RwLock::new(bytes), Some(write_guid))),
        );
    }

    /// A copy of disk `path`'s bytes.
    pub fn disk(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        let d = self.lock().get(path.as_ref()).cloned()?;
        Some(d.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Writes to disk `path`, as the machine's guest would.
    pub fn write(&self, path: impl AsRef<Path>, offset: u64, data: &[u8]) -> io::Result<()> {
        let d = self
            .lock()
            .get(path.as_ref())
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        d.write_at(offset, data)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Arc<MemoryDisk>>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Host for MemoryHost {
    fn open_disk(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        match self.lock().get(path) {
            Some(d) => Ok(d.clone()),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no disk {}", path.display()),
            )),
        }
    }

    fn create_disk(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut disks = self.lock();
        if disks.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::OutOfMemory)?;
        disks.insert(
            path.to_path_buf(),
            Arc::new(MemoryDisk(RwLock::new(vec![0; len]), None)),
        );
        Ok(())
    }

    fn run_hook(&self, _plan: &str, _group: usize, _pre: bool, _hook: &str) -> io::Result<()> {
        Ok(())
    }
}

impl ReadAt for MemoryDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_slice()
            .read_exact_at(buf, offset)
    }

    /// The 4 KiB pages (of the disk's own grid) that hold a byte other than zero: a
    /// memory disk is as thin as its contents.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        const PAGE: u64 = 4096;
        let d = self.0.read().unwrap_or_else(|p| p.into_inner());
        let end = offset.saturating_add(len).min(d.len() as u64);
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / PAGE + 1) * PAGE).min(end);
            if !lifeboat_resync::is_zero(&d[at as usize..next as usize]) {
                match out.last_mut() {
                    Some(last) if last.end == at => last.end = next,
                    _ => out.push(at..next),
                }
            }
            at = next;
        }
        Ok(out)
    }
}

impl Disk for MemoryDisk {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.0.write().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(data.len())
            .filter(|&e| e <= d.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        d[start..end].copy_from_slice(data);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_guid(&self) -> io::Result<Option<[u8; 16]>> {
        Ok(self.1)
    }
}
