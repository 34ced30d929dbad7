//! What the agent remembers between processes: the coordinator and, per item, where its
//! disks, logs, snapshots and recovered disks are. One JSON file in the site directory,
//! replaced atomically (write, fsync, rename, fsync the directory) after every step.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use lifeboat_replication::Coordinator;
use serde::{Deserialize, Serialize};

/// The whole agent state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    /// The last time handed to the coordinator (never goes backwards).
    pub(crate) clock: Duration,
    /// The brain.
    pub(crate) coordinator: Coordinator,
    /// Per protected item.
    pub(crate) items: BTreeMap<String, ItemState>,
    /// Recovery plans: ordered groups of items.
    pub(crate) plans: BTreeMap<String, Vec<Vec<String>>>,
}

/// A 16-byte id (HRL UniqueId, DataWriteGuid), shown as hex.
pub(crate) type Guid = [u8; 16];

/// Formats a guid as 32 hex digits.
pub(crate) fn hex(g: &Guid) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

/// Per-disk change tracking, as the host's tracking driver would keep it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Tracking {
    /// The disk's data-write GUID when tracking started (logs must carry it or zero).
    pub(crate) write_guid: Guid,
    /// The UniqueId of the newest log generated or accepted for the disk: the next log's
    /// PreviousUniqueId.
    pub(crate) last_log: Guid,
    /// The UniqueId of the newest log `guest-write` generated (it may not be taken yet).
    pub(crate) generated: Guid,
    /// Every log id ever accepted (applied or discarded): a log is taken once.
    pub(crate) seen: BTreeSet<String>,
}

/// A log accepted and copied into the site, waiting for its cycle.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StagedLog {
    /// The disk.
    pub(crate) disk: usize,
    /// The staged copy.
    pub(crate) path: PathBuf,
    /// Bytes of writes it holds.
    pub(crate) logged_bytes: u64,
    /// EOLLocation set (closed cleanly).
    pub(crate) clean: bool,
    /// Its Vhd2DataWriteGuid matches the tracking one (or is zero).
    pub(crate) guid_ok: bool,
}

/// A closed cycle: its logs and, per disk, the replica sequence number its batch expects.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Cycle {
    /// Logs in chain order.
    pub(crate) logs: Vec<StagedLog>,
    /// Per disk: the blob sequence number before the batch.
    pub(crate) expect_seq: Vec<u64>,
}

/// Where a disk materialised from a recovery point lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Location {
    /// A local file (raw, or a fixed VHD whose footer follows the disk's bytes).
    File {
        /// The path.
        path: PathBuf,
    },
    /// A page blob in the target store (Azure), with an optional local download.
    Blob {
        /// The blob.
        name: String,
        /// The downloaded copy, if one was asked for.
        download: Option<PathBuf>,
    },
}

/// Where materialised disks go, chosen by the command that starts the operation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Export {
    /// Output directory.
    pub(crate) dir: Option<PathBuf>,
    /// Write fixed VHDs instead of raw images.
    pub(crate) vhd: bool,
}

/// What a resync or sync-back did, for the user.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct SyncReport {
    /// Blocks compared.
    pub(crate) blocks_compared: u64,
    /// Bytes of data sent.
    pub(crate) bytes_sent: u64,
    /// Bytes cleared (zero ranges; nothing sent).
    pub(crate) bytes_cleared: u64,
}

/// The agent's knowledge of one item.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ItemState {
    /// The on-premises (source) disks, in order.
    pub(crate) disks: Vec<PathBuf>,
    /// Their sizes.
    pub(crate) sizes: Vec<u64>,
    /// Resync block size.
    pub(crate) block_size: u32,
    /// Per disk.
    pub(crate) tracking: Vec<Tracking>,
    /// Accepted logs not yet in a cycle.
    pub(crate) pending: Vec<StagedLog>,
    /// Closed cycles not yet applied or discarded.
    pub(crate) cycles: BTreeMap<u64, Cycle>,
    /// Recovery point id -> snapshot id per disk (filled disk by disk).
    pub(crate) points: BTreeMap<u64, Vec<String>>,
    /// Where test failover writes.
    pub(crate) test_export: Export,
    /// The test-failover disks.
    pub(crate) test_disks: Vec<Location>,
    /// Where failover writes.
    pub(crate) failover_export: Export,
    /// The recovered disks (what the recovered machine runs on).
    pub(crate) recovered: Vec<Location>,
    /// Failback target disks (the original ones unless alternate).
    pub(crate) failback_to: Vec<PathBuf>,
    /// Protective copies of the failback target disks.
    pub(crate) protective: Vec<PathBuf>,
    /// Whether the source machine runs.
    pub(crate) source_running: bool,
    /// Whether the recovered machine runs.
    pub(crate) target_running: bool,
    /// The last resync, per disk.
    pub(crate) last_resync: Vec<SyncReport>,
    /// The last sync back, per disk.
    pub(crate) last_sync_back: Vec<SyncReport>,
    /// Files no longer referenced, deleted once the state that forgets them is saved (an
    /// action re-issued after a crash may still need them until then).
    #[serde(default)]
    pub(crate) trash: Vec<PathBuf>,
}

impl ItemState {
    /// The replica blob of disk `d`.
    pub(crate) fn blob(item: &str, d: usize) -> String {
        format!("{item}.disk{d}")
    }
}

/// The state file of a site.
pub(crate) fn path(site: &Path) -> PathBuf {
    site.join("state.json")
}

/// Loads the site's state (an empty one for a new site).
pub(crate) fn load(site: &Path) -> Result<State> {
    let p = path(site);
    match fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a Lifeboat state file", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Replaces the site's state atomically and durably.
pub(crate) fn save(site: &Path, state: &State) -> Result<()> {
    fs::create_dir_all(site).with_context(|| format!("creating {}", site.display()))?;
    let p = path(site);
    let tmp = site.join("state.json.tmp");
    let bytes = serde_json::to_vec(state).context("encoding the state")?;
    let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, &p).with_context(|| format!("replacing {}", p.display()))?;
    fs::File::open(site)?.sync_all()?;
    Ok(())
}
