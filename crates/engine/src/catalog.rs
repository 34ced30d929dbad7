//! The catalogue: what failover needs, kept in the replica store beside the replicas, one
//! document per item and per recovery plan, each written only if unchanged since read.
//!
//! Names in the store (the container, or the embedded store's directory):
//!
//! | name | what |
//! |---|---|
//! | `lifeboat/store.json` | the store's identity (sites record it) |
//! | `lifeboat/items/ITEM/catalog.json` | the item: owner, disks, policy and state, recovery points, log chain, jobs |
//! | `lifeboat/items/ITEM/diskN` | the replica of disk N (a page blob ending in a fixed-VHD footer) |
//! | `lifeboat/items/ITEM/diskN.digests` | its block digests |
//! | `lifeboat/items/ITEM/test/diskN`, `…/failover/diskN` | test-failover and failover disks |
//! | `lifeboat/plans/PLAN.json` | a recovery plan, its jobs and a failover in progress |
//!
//! Every item blob and its catalogue document are leased by the owning site; a take-over
//! breaks and re-acquires every lease before it rewrites the document.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use lifeboat_pageblob::{ETag, Expect, LeaseId, PageStore, StoreError};
use lifeboat_replication::{ItemRecord, PlanRecord};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The catalogue format this engine reads and writes. A document with a higher schema is
/// refused (a newer Lifeboat wrote it); lower ones are read as they are (fields added
/// since have defaults).
pub const SCHEMA: u32 = 1;

/// Everything Lifeboat keeps in a store lives under this prefix.
pub const ROOT: &str = "lifeboat";

/// The store's identity document.
pub(crate) fn store_doc() -> String {
    format!("{ROOT}/store.json")
}

/// The prefix of every item's blobs.
pub(crate) fn items_prefix() -> String {
    format!("{ROOT}/items/")
}

/// The prefix of one item's blobs.
pub(crate) fn item_prefix(item: &str) -> String {
    format!("{ROOT}/items/{item}/")
}

/// An item's catalogue document.
pub(crate) fn item_doc(item: &str) -> String {
    format!("{ROOT}/items/{item}/catalog.json")
}

/// The replica blob of disk `d`.
pub fn replica_blob(item: &str, d: usize) -> String {
    format!("{ROOT}/items/{item}/disk{d}")
}

/// A materialised disk of `purpose` (`test` or `failover`).
pub(crate) fn purpose_blob(item: &str, purpose: &str, d: usize) -> String {
    format!("{ROOT}/items/{item}/{purpose}/disk{d}")
}

/// The prefix of every plan document.
pub(crate) fn plans_prefix() -> String {
    format!("{ROOT}/plans/")
}

/// A plan's document.
pub(crate) fn plan_doc(plan: &str) -> String {
    format!("{ROOT}/plans/{plan}.json")
}

/// Checks an item or plan name: 1 to 63 characters, letters, digits, `.`, `_` and `-`,
/// starting with a letter or a digit (so a name is one path segment everywhere: in the
/// store, in the site directory, in a job id).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} name {name:?}: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// A 16-byte id (HRL UniqueId, DataWriteGuid).
pub type Guid = [u8; 16];

/// A guid as 32 hex digits.
pub fn hex(g: &Guid) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

/// A site that owns items: its id (also the lease it holds on their blobs) and a label
/// for people (`host:/path/to/site`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The site's id; its lease on the item's blobs.
    pub site: LeaseId,
    /// Where the site is.
    pub label: String,
}

/// A protected item as the catalogue keeps it: everything any site needs to show it, fail
/// it over and fail it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Item {
    /// The format ([`SCHEMA`]).
    pub schema: u32,
    /// The item's name.
    pub name: String,
    /// The site acting for it.
    pub owner: Owner,
    /// Changes of owner so far.
    pub epoch: u64,
    /// The last take-over: from whom, when.
    #[serde(default)]
    pub taken_over: Option<(Owner, Duration)>,
    /// The last time the owner's state machine was given (its clock never goes back).
    #[serde(default)]
    pub clock: Duration,
    /// The replication state machine's record (state, health, points, jobs).
    pub replication: ItemRecord,
    /// Resync block size.
    pub block_size: u32,
    /// The disks, in order.
    pub disks: Vec<Disk>,
    /// Recovery point id -> snapshot id per disk (filled disk by disk).
    pub points: BTreeMap<u64, Vec<String>>,
    /// Recovery point id -> per disk, the snapshot of its digests taken with it (what
    /// `verify` checks the point against).
    #[serde(default)]
    pub point_digests: BTreeMap<u64, Vec<String>>,
    /// Logs accepted and staged at the owner's site, not yet in a cycle.
    pub pending: Vec<StagedLog>,
    /// Closed cycles not yet applied or discarded.
    pub cycles: BTreeMap<u64, Cycle>,
    /// The test-failover disks.
    pub test: Materialized,
    /// The failover disks (what the recovered machine runs on).
    pub failover: Materialized,
    /// Failback target disks (the original ones unless alternate).
    pub failback_to: Vec<PathBuf>,
    /// Protective copies of the failback target disks, at the owner's site.
    pub protective: Vec<PathBuf>,
    /// Whether the source machine runs.
    pub source_running: bool,
    /// Whether the recovered machine runs.
    pub target_running: bool,
    /// The last resync, per disk.
    pub last_resync: Vec<SyncReport>,
    /// The last failback's sync, per disk.
    pub last_sync_back: Vec<SyncReport>,
    /// Files at the owner's site no longer referenced, deleted once the document that
    /// forgets them is written.
    #[serde(default)]
    pub trash: Vec<PathBuf>,
}

impl Item {
    /// The replica blob of disk `d`.
    pub fn blob(&self, d: usize) -> String {
        replica_blob(&self.name, d)
    }

    /// Moves every log staged or closed and not applied into the trash.
    pub(crate) fn trash_unapplied_logs(&mut self) {
        let stale = self
            .pending
            .drain(..)
            .chain(
                std::mem::take(&mut self.cycles)
                    .into_values()
                    .flat_map(|c| c.logs),
            )
            .map(|l| l.path);
        self.trash.extend(stale);
    }
}

/// One disk of an item.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Disk {
    /// The protected disk, as its host names it.
    pub source: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Change tracking: where the disk's log chain stands.
    pub tracking: Tracking,
}

/// How many recent log ids a disk remembers (to tell a log taken before from one out of
/// chain).
pub(crate) const RECENT_LOGS: usize = 64;

/// Per-disk change tracking, as the host's tracking driver keeps it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Tracking {
    /// The disk's data-write GUID when tracking started (logs must carry it or zero).
    pub write_guid: Guid,
    /// The UniqueId of the newest log accepted for the disk: the next log's
    /// PreviousUniqueId.
    pub last_log: Guid,
    /// The most recent log ids taken, newest last.
    pub recent: VecDeque<Guid>,
    /// Tracking (re)starts so far (protection, resyncs, reprotect): each starts a chain.
    #[serde(default)]
    pub session: u64,
    /// The end of the chain tracking left at its last restart: logs continuing it are
    /// covered by the resync that restarted it.
    #[serde(default)]
    pub retired: Option<Guid>,
}

/// A log accepted and copied into the owner's site, waiting for its cycle.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StagedLog {
    /// The disk.
    pub disk: usize,
    /// The staged copy (or a hard link to the log handed over).
    pub path: PathBuf,
    /// Its UniqueId, hex: checked against the file when it is applied (empty in
    /// catalogues from before it was recorded).
    #[serde(default)]
    pub id: String,
    /// Bytes of writes it holds.
    pub logged_bytes: u64,
    /// EOLLocation set (closed cleanly).
    pub clean: bool,
    /// Its Vhd2DataWriteGuid matches the tracking one (or is zero).
    pub guid_ok: bool,
    /// It continues the disk's chain (else a log before it is missing).
    #[serde(default = "yes")]
    pub chained: bool,
    /// It was closed at a quiesced snapshot of the machine.
    #[serde(default)]
    pub app_consistent: bool,
    /// When it was closed, if it says.
    #[serde(default)]
    pub closed_at: Option<Duration>,
}

fn yes() -> bool {
    true
}

/// A closed cycle: its logs and, per disk, the replica sequence number its batches start
/// from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Cycle {
    /// Logs in chain order.
    pub logs: Vec<StagedLog>,
    /// Per disk: the blob sequence number before the cycle's first batch (recorded when
    /// the cycle starts being applied; empty until then).
    pub expect_seq: Vec<u64>,
    /// Data bytes per batch the cycle is applied in, recorded with `expect_seq`: batch i
    /// is fenced on `expect_seq + i`, so a resumed cycle must split its logs as it did
    /// (another build may split them otherwise). A cycle begun before this was recorded
    /// was split in 32 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_bytes: Option<u64>,
}

/// Where a disk materialised from a recovery point lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// A file at the site that made it (raw, or a fixed VHD whose footer follows the
    /// disk's bytes).
    File {
        /// The path.
        path: PathBuf,
    },
    /// A page blob in the store, with an optional local download.
    Blob {
        /// The blob.
        name: String,
        /// The downloaded copy, if one was asked for.
        download: Option<PathBuf>,
    },
}

/// Where materialised disks go, chosen by the command that starts the operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// Output directory for files (downloads, when `in_store`).
    pub dir: Option<PathBuf>,
    /// Write fixed VHDs instead of raw images.
    pub vhd: bool,
    /// Write dynamic VHDX files (what Hyper-V attaches) instead of raw images: files at the
    /// site only, not blobs in the store.
    #[serde(default)]
    pub vhdx: bool,
    /// The disks are blobs in the store (`lifeboat/items/ITEM/{test,failover}/diskN`,
    /// what an Azure machine attaches); `dir` then holds downloads. Without a `dir` they
    /// are blobs in any case.
    #[serde(default)]
    pub in_store: bool,
    /// Overwrite files already in `dir` (otherwise an existing file is refused: it may
    /// be anything, a source disk included).
    #[serde(default)]
    pub force: bool,
}

impl Export {
    /// The files the disks of an item with `disks` disks go to.
    pub fn files(&self, disks: usize) -> Vec<PathBuf> {
        let ext = match (self.vhd, self.vhdx) {
            (true, _) => "vhd",
            (false, true) => "vhdx",
            (false, false) => "raw",
        };
        match &self.dir {
            Some(dir) => (0..disks)
                .map(|d| dir.join(format!("disk{d}.{ext}")))
                .collect(),
            None => Vec::new(),
        }
    }
}

/// Disks materialised for a test failover or a failover.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Materialized {
    /// Where they go.
    pub export: Export,
    /// Where they are, per disk.
    pub disks: Vec<Location>,
    /// The recovery point they hold.
    #[serde(default)]
    pub point: Option<u64>,
}

/// What a resync or sync-back did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SyncReport {
    /// Blocks compared.
    pub blocks_compared: u64,
    /// Bytes of data sent.
    pub bytes_sent: u64,
    /// Bytes cleared (zero ranges; nothing sent).
    pub bytes_cleared: u64,
}

/// A recovery plan's document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PlanDoc {
    pub(crate) schema: u32,
    pub(crate) record: PlanRecord,
}

/// The store's identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StoreDoc {
    pub(crate) schema: u32,
    pub(crate) id: String,
}

/// Reads a document; `None` if there is none. Refuses a document of a newer schema.
pub(crate) async fn read<T: DeserializeOwned>(
    store: &dyn PageStore,
    name: &str,
) -> Result<Option<(T, ETag, Vec<u8>)>> {
    let Some(doc) = store.get_doc(name).await? else {
        return Ok(None);
    };
    let bad = |reason: String| Error::Catalog {
        name: name.to_owned(),
        reason,
    };
    #[derive(Deserialize)]
    struct Head {
        schema: u32,
    }
    let head: Head = serde_json::from_slice(&doc.data).map_err(|e| bad(e.to_string()))?;
    if head.schema > SCHEMA {
        return Err(bad(format!(
            "written by a newer Lifeboat (schema {}, this one reads up to {SCHEMA})",
            head.schema
        )));
    }
    let value = serde_json::from_slice(&doc.data).map_err(|e| bad(e.to_string()))?;
    Ok(Some((value, doc.etag, doc.data.to_vec())))
}

/// The item whose document is the blob `name` (`None`: another blob).
pub(crate) fn item_of(name: &str) -> Option<&str> {
    name.strip_prefix(ROOT)?
        .strip_prefix("/items/")?
        .strip_suffix("/catalog.json")
}

/// A document as read: its value, its ETag and its bytes.
pub(crate) type Read<T> = (T, ETag, Vec<u8>);

/// Every item's and plan's document in `store` (items by name, plans in the store's
/// order); none where its container does not exist yet (the first command that writes
/// makes it: a protect refused before that leaves none).
pub(crate) async fn read_all(
    store: &dyn PageStore,
) -> Result<(BTreeMap<String, Read<Item>>, Vec<Read<PlanDoc>>)> {
    let mut items = BTreeMap::new();
    for name in listed(store, &items_prefix()).await? {
        if let Some(item) = item_of(&name)
            && let Some(doc) = read::<Item>(store, &name).await?
        {
            items.insert(item.to_owned(), doc);
        }
    }
    let mut plans = Vec::new();
    for name in listed(store, &plans_prefix()).await? {
        plans.extend(read::<PlanDoc>(store, &name).await?);
    }
    Ok((items, plans))
}

/// The blobs of `store` under `prefix`; none where its container does not exist.
async fn listed(store: &dyn PageStore, prefix: &str) -> Result<Vec<String>> {
    match store.list(prefix).await {
        Err(StoreError::NotFound { .. }) => Ok(Vec::new()),
        r => Ok(r?),
    }
}

/// Encodes a document.
pub(crate) fn encode<T: Serialize>(name: &str, doc: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(doc).map_err(|e| Error::Catalog {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes encoded document bytes if `expect` holds, as the holder of `lease`.
pub(crate) async fn write(
    store: &dyn PageStore,
    name: &str,
    bytes: &[u8],
    expect: Expect,
    lease: Option<LeaseId>,
) -> Result<ETag, StoreError> {
    store
        .put_doc(name, Bytes::copy_from_slice(bytes), expect, lease)
        .await
}
