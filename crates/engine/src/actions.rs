//! Each action of the state machine, performed against the host, the logs and the store.

use std::ops::{ControlFlow, Range};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use lifeboat_pageblob::{
    BatchDigests, BatchReport, Change, Condition, MAX_PUT, Metadata, PageWriter, ReplicaDigests,
    StoreError, vhd,
};
use lifeboat_replication::{Action, ActionKind, LogReport, Outcome, PointId, Purpose};
use lifeboat_resync::{BlockSize, DiffOptions, ExtentKind, Side};
use lifeboat_source::ReadAt;

use crate::catalog::{self, Cycle, Location, SyncReport, replica_blob};
use crate::copy::{PieceReader, PieceSpec, Read, Segment};
use crate::data::{self, BlobSource, DiskWriter, EdgePages, LogChain, TakeSource};
use crate::engine::{Engine, Event, Task};
use crate::error::{Error, Result, blocking, joined};
use crate::host::Disk;

/// Data bytes per page-writer batch when resyncing (bounded memory).
const BATCH_BYTES: u64 = 32 << 20;
/// Data bytes per batch when applying a cycle's logs (each batch one sequence number and
/// one sync point of the replica and its digests: 8 MiB batches spent a third of
/// `replicate`'s time in fsyncs, 32 MiB ones 4-11 % more than 64 MiB ones; two held in
/// memory per transfer, the one sent and the one read ahead). Recorded in the cycle when
/// it begins ([`Cycle::batch_bytes`]).
pub(crate) const LOG_BATCH_BYTES: u64 = 64 << 20;
/// The batch size of a cycle begun before [`Cycle::batch_bytes`] was recorded.
pub(crate) const UNRECORDED_LOG_BATCH_BYTES: u64 = 32 << 20;

/// Opens a disk of `host` to be written (a failback's target), checking it is `len`
/// bytes.
fn open_disk(host: &dyn crate::host::Host, path: &Path, len: u64) -> Result<Arc<dyn Disk>> {
    sized(host.open_disk(path), path, len)
}

/// Opens a disk of `host` to be read only (a protected disk), checking it is `len` bytes.
pub(crate) fn open_source(
    host: &dyn crate::host::Host,
    path: &Path,
    len: u64,
) -> Result<Arc<dyn Disk>> {
    sized(host.open_disk_read(path), path, len)
}

/// `disk`, opened from `path`, if it is `len` bytes.
fn sized(disk: std::io::Result<Arc<dyn Disk>>, path: &Path, len: u64) -> Result<Arc<dyn Disk>> {
    let what = || format!("disk {}", path.display());
    let disk = disk.map_err(Error::io(what()))?;
    let have = disk.size().map_err(Error::io(what()))?;
    if have != len {
        return Err(Error::Invalid(format!(
            "disk {} is {have} bytes, expected {len} (the protected disk's size)",
            path.display()
        )));
    }
    Ok(disk)
}

/// `changes` without the zero runs the replica holds as zeros already (`digests` say
/// so: every block of a new replica). An initial copy leaves them unsent, and a piece of
/// holes then makes no batch at all (each is a sync point of the replica). A block the
/// batch then writes in part keeps the digest hashed from all the changes (the zeros left
/// out are the replica's), so it is neither read back nor cleared.
async fn without_known_zeros(
    digests: &mut ReplicaDigests,
    store: &dyn lifeboat_pageblob::PageStore,
    changes: &[Change],
) -> Result<Vec<Change>> {
    let zeros: Vec<Range<u64>> = changes
        .iter()
        .filter(|c| matches!(c, Change::Zero { .. }))
        .map(Change::range)
        .collect();
    let mut known = digests.known_zero(store, &zeros).await?.into_iter();
    Ok(changes
        .iter()
        .filter(|c| !matches!(c, Change::Zero { .. }) || !known.next().unwrap_or(false))
        .cloned()
        .collect())
}

/// The next copy piece of a disk, being read while the current one is sent.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    /// Item, disk, offset and length of the piece.
    key: (String, usize, u64, u64),
    /// The count of actions performed when it was started: it serves the next one only.
    after: u64,
    /// The read.
    reader: PieceReader,
}

/// What [`Engine::write_batch`] takes beside a batch's changes.
#[derive(Default)]
struct BatchOptions<'a> {
    /// The pages around the changes that cover pages in part (a cycle's, fetched before).
    edges: Option<&'a dyn ReadAt>,
    /// The sequence number the replica must be at: the batch is skipped if the replica
    /// is one past it (applied before), refused if elsewhere.
    expect: Option<u64>,
    /// The batch's digests hashed already (a copy piece's, on its reading thread), from
    /// all the changes given.
    hashed: Option<BatchDigests>,
    /// Zero runs the replica holds as zeros already are not sent (an initial copy's).
    skip_known_zeros: bool,
}

/// What a transfer did, for [`Engine::settle`] to record.
#[derive(Debug)]
pub(crate) enum Transferred {
    /// A piece of a disk was copied.
    Copied {
        /// Whether anything was sent (not a piece the replica held already).
        sent: bool,
        /// Where the copy got to, if past the piece: a run of holes after it, which the
        /// replica held as zeros already.
        through: Option<u64>,
    },
    /// A disk was resynchronised.
    Resynced {
        /// Which.
        disk: usize,
        /// What was compared and sent.
        report: SyncReport,
    },
    /// A cycle's logs were applied.
    Applied {
        /// Which.
        cycle: u64,
    },
}

/// Whether `a`, an action of the item whose document is `doc`, is a transfer that may run
/// beside other items' ([`Engine::transfer`]): a copy piece, a disk's resync, a cycle with
/// no earlier one waiting.
pub(crate) fn is_transfer(doc: Option<&catalog::Item>, a: &Action) -> bool {
    match a.kind {
        ActionKind::CopyDiskRange { .. } | ActionKind::ResyncDisk { .. } => true,
        ActionKind::ApplyLogs { cycle } => {
            doc.is_some_and(|d| d.cycles.range(..cycle).next().is_none())
        }
        _ => false,
    }
}

impl Engine {
    /// The lease this site writes the blobs it owns with.
    fn lease(&self) -> Condition {
        Condition::lease(self.site.id())
    }

    /// Opens a host disk to be written, checking it is `len` bytes.
    pub(crate) fn open_disk(&self, path: &Path, len: u64) -> Result<Arc<dyn Disk>> {
        open_disk(&*self.host, path, len)
    }

    /// Opens a protected disk to be read, checking it is `len` bytes.
    pub(crate) fn open_source(&self, path: &Path, len: u64) -> Result<Arc<dyn Disk>> {
        open_source(&*self.host, path, len)
    }

    pub(crate) async fn perform(&mut self, a: &Action) -> Result<Outcome> {
        let name = a.item.as_str();
        match &a.kind {
            ActionKind::StartTracking => self.start_tracking(name).await?,
            ActionKind::CopyDiskRange { .. } | ActionKind::ResyncDisk { .. } => {
                let done = self.transfer(a, None, true).await?;
                return self.settle(name, done);
            }
            ActionKind::CloseLogs { cycle } => return self.close_logs(name, *cycle).await,
            ActionKind::ApplyLogs { cycle } => self.apply_cycle(name, *cycle).await?,
            ActionKind::DiscardLogs { cycle } => {
                let doc = self.doc_mut(name)?;
                if let Some(c) = doc.cycles.remove(cycle) {
                    doc.trash.extend(c.logs.into_iter().map(|l| l.path));
                }
            }
            ActionKind::ProcessPendingLogs => {
                let cycles: Vec<u64> = self.doc(name)?.cycles.keys().copied().collect();
                for c in cycles {
                    self.apply_cycle(name, c).await?;
                }
            }
            ActionKind::CreateRecoveryPoint { point, .. } => {
                self.create_point(name, *point).await?
            }
            ActionKind::DeleteRecoveryPoint { point } => self.delete_point(name, *point).await?,
            ActionKind::MaterializeDisks { point, purpose } => {
                self.materialize(name, *point, *purpose).await?
            }
            ActionKind::DeleteTestDisks => {
                let test = &mut self.doc_mut(name)?.test;
                test.point = None;
                let disks = std::mem::take(&mut test.disks);
                for l in &disks {
                    self.remove_location(l).await?;
                }
            }
            ActionKind::StopTracking => self.stop_tracking(name)?,
            ActionKind::DeleteReplica => self.delete_replica(name).await?,
            ActionKind::ShutDownSource => {
                self.host
                    .shut_down_source(name)
                    .map_err(Error::io(format!("shutting {name} down")))?;
                self.doc_mut(name)?.source_running = false;
            }
            ActionKind::StartSource => {
                self.host
                    .start_source(name)
                    .map_err(Error::io(format!("starting {name}")))?;
                self.doc_mut(name)?.source_running = true;
            }
            ActionKind::StartTarget { .. } => {
                self.host
                    .start_target(name)
                    .map_err(Error::io(format!("starting the recovered {name}")))?;
                self.doc_mut(name)?.target_running = true;
            }
            ActionKind::StopTarget => {
                self.host
                    .stop_target(name)
                    .map_err(Error::io(format!("stopping the recovered {name}")))?;
                self.doc_mut(name)?.target_running = false;
            }
            ActionKind::ProtectSourceDisks { .. } => self.protect_source(name)?,
            ActionKind::SyncBack { full, .. } => self.sync_back(name, *full).await?,
            ActionKind::RestoreSourceDisks => {
                let doc = self.doc(name)?.clone();
                for (d, (p, to)) in doc.protective.iter().zip(&doc.failback_to).enumerate() {
                    let disk = self.open_disk(to, doc.disks[d].size)?;
                    data::restore_disk(p, &*disk, doc.disks[d].size)?;
                }
                // Used up: a later failback takes fresh protective copies.
                let doc = self.doc_mut(name)?;
                let copies = std::mem::take(&mut doc.protective);
                doc.trash.extend(copies);
            }
            ActionKind::DeleteProtectiveSnapshot => {
                let doc = self.doc_mut(name)?;
                let copies = std::mem::take(&mut doc.protective);
                doc.trash.extend(copies);
                // The failback target is now the machine's disk.
                for (d, to) in doc.failback_to.clone().into_iter().enumerate() {
                    if let Some(disk) = doc.disks.get_mut(d) {
                        disk.source = to;
                    }
                }
            }
            ActionKind::RunHook {
                plan,
                group,
                pre,
                hook,
            } => {
                let (host, plan, group, pre, hook) =
                    (self.host.clone(), plan.clone(), *group, *pre, hook.clone());
                blocking("running a hook", move || {
                    host.run_hook(&plan, group, pre, &hook)
                })
                .await?
                .map_err(Error::io(format!("hook of plan {name}")))?;
            }
            other => {
                return Err(Error::Invalid(format!(
                    "the engine does not know how to perform {other:?}"
                )));
            }
        }
        Ok(Outcome::Done)
    }

    async fn start_tracking(&mut self, name: &str) -> Result<()> {
        let doc = self.doc(name)?.clone();
        let mut own_guids = Vec::new();
        for (d, disk) in doc.disks.iter().enumerate() {
            let h = self.open_source(&disk.source, disk.size)?;
            own_guids.push(h.write_guid().map_err(Error::io(format!(
                "reading the DataWriteGuid of {}",
                disk.source.display()
            )))?);
            self.ensure_replica(&replica_blob(name, d), disk.size, doc.block_size)
                .await?;
        }
        let host = self.host.clone();
        let doc = self.doc_mut(name)?;
        for (d, disk) in doc.disks.iter_mut().enumerate() {
            // A VHDX names itself: Hyper-V's logs carry its DataWriteGuid as it is now (a
            // write outside tracking changes it, and logs naming the old one are refused).
            if let Some(g) = own_guids[d] {
                disk.tracking.write_guid = g;
            } else if disk.tracking.write_guid == [0; 16] {
                disk.tracking.write_guid =
                    crate::site::random_guid(&format!("{name}/disk{d}/write-guid"));
            }
            let start = crate::site::random_guid(&format!("{name}/disk{d}/chain"));
            host.tracking_started(name, d, start)
                .map_err(Error::io(format!(
                    "starting change tracking of {name} disk {d}"
                )))?;
            disk.tracking.restart(start);
        }
        // Logs staged or closed before tracking (re)started are covered by the copy or
        // resync that follows.
        doc.trash_unapplied_logs();
        Ok(())
    }

    /// Disable protection: change tracking stops; logs staged or closed and not applied
    /// go to the trash.
    fn stop_tracking(&mut self, name: &str) -> Result<()> {
        let host = self.host.clone();
        let doc = self.doc_mut(name)?;
        for d in 0..doc.disks.len() {
            host.tracking_stopped(name, d).map_err(Error::io(format!(
                "stopping change tracking of {name} disk {d}"
            )))?;
        }
        doc.trash_unapplied_logs();
        Ok(())
    }

    /// Disable protection with the replica deleted: every disk's replica blob and its
    /// digests go, snapshots included (the points were deleted before).
    async fn delete_replica(&mut self, name: &str) -> Result<()> {
        self.fence(name).await?;
        for d in 0..self.doc(name)?.disks.len() {
            let blob = replica_blob(name, d);
            self.delete_blob(&lifeboat_pageblob::digests_blob(&blob))
                .await?;
            self.delete_blob(&blob).await?;
        }
        Ok(())
    }

    /// Creates the replica blob of a disk (rounded up to 1 MiB, fixed-VHD footer), leased
    /// to this site, and its zero digests, unless it exists with the right size.
    async fn ensure_replica(&self, blob: &str, len: u64, block_size: u32) -> Result<()> {
        let size = vhd::blob_size(len);
        match self.store.properties(blob).await {
            Ok(p) if p.size == size => {}
            Ok(p) => {
                return Err(Error::Invalid(format!(
                    "replica {blob} exists with {} bytes, expected {size}",
                    p.size
                )));
            }
            Err(StoreError::NotFound { .. }) => {
                let md: Metadata = [("disklength".to_string(), len.to_string())].into();
                match self.store.create(blob, size, 0, &md).await {
                    Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        self.store.acquire_lease(blob, self.site.id()).await?;
        // The footer is rewritten each time: it is constant for the disk.
        let id = blake3::hash(blob.as_bytes());
        let mut unique = [0u8; 16];
        unique.copy_from_slice(&id.as_bytes()[..16]);
        let footer = vhd::Footer::fixed(vhd::virtual_size(len), unique, 0).encode();
        self.store
            .write_pages(
                blob,
                size - 512,
                Bytes::copy_from_slice(&footer),
                self.store.content_crc64(&footer),
                self.lease(),
            )
            .await?;
        // Digests kept by an earlier protection of the name were released with it.
        let digests = lifeboat_pageblob::digests_blob(blob);
        match self.store.acquire_lease(&digests, self.site.id()).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Hashed from what the blob holds, even at sequence number 0 (a first batch that
        // landed in part leaves its pages there): only allocated pages are read, none of
        // a new blob.
        if ReplicaDigests::load(&*self.store, blob).await?.is_none() {
            let bs = BlockSize::new(block_size)?;
            let mut d = ReplicaDigests::rebuild(&*self.store, blob, len, bs).await?;
            d.save(&*self.store, blob, Some(self.site.id())).await?;
            // Kept for the first batch (in place of any kept before): they know the pages
            // their blob holds, so a copy reads none of those it never wrote.
            self.put_digests(blob.to_owned(), d);
        }
        Ok(())
    }

    /// Applies one batch to a disk's replica and brings its digests up to date.
    /// `Ok(None)` when nothing was sent: the blob is past `how.expect` already (the batch
    /// was applied before), or nothing was left once the known zeros were dropped.
    async fn write_batch(
        &self,
        name: &str,
        d: usize,
        changes: Vec<Change>,
        how: BatchOptions<'_>,
    ) -> Result<Option<BatchReport>> {
        let doc = self.doc(name)?;
        let (len, bs) = (doc.disks[d].size, BlockSize::new(doc.block_size)?);
        let blob = replica_blob(name, d);
        let seq = self.store.properties(&blob).await?.sequence_number;
        if let Some(e) = how.expect {
            if seq == e + 1 {
                return Ok(None);
            }
            if seq != e {
                return Err(Error::Invalid(format!(
                    "replica {blob} is at sequence number {seq}, the batch expects {e}"
                )));
            }
        }
        if let Some(r) = changes.iter().map(Change::range).find(|r| r.end > len) {
            return Err(Error::Invalid(format!(
                "a change at {}..{} passes the disk's end ({len})",
                r.start, r.end
            )));
        }
        let mut digests = self.take_digests(&blob, len, bs, seq).await?;
        // What the digests are hashed from: every change given, the zeros left out too
        // (they are the replica's bytes already).
        let (changes, from) = match how.skip_known_zeros {
            true => (
                without_known_zeros(&mut digests, &*self.store, &changes).await?,
                changes,
            ),
            false => (changes.clone(), changes),
        };
        if changes.is_empty() {
            self.put_digests(blob, digests);
            return Ok(None);
        }
        let touched: Vec<Range<u64>> = changes.iter().map(Change::range).collect();
        // Until the batch's digests are saved, the stored ones describe no sequence number.
        digests
            .begin_batch(&*self.store, &blob, Some(self.site.id()))
            .await?;
        let writer = PageWriter::new(self.store.clone(), blob.clone(), self.writer.clone())
            .leased(Some(self.site.id()));
        // The batch's digests are hashed from the bytes it sends, on another thread while
        // it is sent; the blocks it covers in part are completed meanwhile from the bytes
        // it does not change (read back after it lands only if that read failed).
        let hashed = {
            let (store, blob, hashed) = (self.store.clone(), blob.clone(), how.hashed);
            async move {
                let (mut batch, from) = match hashed {
                    Some(digests) => (digests, from),
                    None => {
                        blocking("hashing a batch", move || {
                            (BatchDigests::of(&from, bs, len), from)
                        })
                        .await?
                    }
                };
                let _ = batch.read_rest(&*store, &blob, &from).await;
                Ok::<_, Error>(batch)
            }
        };
        let (sent, hashed) = tokio::join!(writer.apply_batch(seq, changes, how.edges), hashed);
        let report = match sent {
            Ok(r) => r,
            Err(e) => {
                self.recover_digests(blob, digests, &touched).await;
                return Err(e.into());
            }
        };
        match hashed {
            Ok(batch) => {
                digests
                    .update_with(&*self.store, &blob, batch, seq + 1)
                    .await?
            }
            // The runtime is shutting down: every touched block is read back instead.
            Err(_) => {
                digests
                    .update(&*self.store, &blob, &touched, seq + 1)
                    .await?
            }
        }
        digests
            .save(&*self.store, &blob, Some(self.site.id()))
            .await?;
        self.put_digests(blob, digests);
        Ok(Some(report))
    }

    /// After a batch that failed part way, having touched `touched`: part of it may have
    /// landed, so the touched blocks are hashed again as they are now, or marked unknown
    /// if they cannot be read (the store says they may not be on disk: a resync then
    /// sends them again); else the digests are rebuilt when next loaded.
    async fn recover_digests(
        &self,
        blob: String,
        mut digests: ReplicaDigests,
        touched: &[Range<u64>],
    ) {
        if let Ok(p) = self.store.properties(&blob).await
            && (digests
                .update(&*self.store, &blob, touched, p.sequence_number)
                .await
                .is_ok()
                || digests
                    .forget(&*self.store, touched, p.sequence_number)
                    .await
                    .is_ok())
            && digests
                .save(&*self.store, &blob, Some(self.site.id()))
                .await
                .is_ok()
        {
            self.put_digests(blob, digests);
        }
    }

    /// Puts digests taken with [`Engine::take_digests`] back in the cache.
    fn put_digests(&self, blob: String, digests: ReplicaDigests) {
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(blob, digests);
    }

    /// The digests of `blob` as of sequence number `seq`: kept in memory between batches
    /// (loading them reads the whole digests blob), reloaded or rebuilt when they do not
    /// describe `seq`. Taken out of the cache; [`Engine::put_digests`] puts them back.
    async fn take_digests(
        &self,
        blob: &str,
        len: u64,
        bs: BlockSize,
        seq: u64,
    ) -> Result<ReplicaDigests> {
        let cached = self
            .digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(blob);
        Ok(match cached {
            Some(d) if d.sequence_number() == seq => d,
            _ => match ReplicaDigests::load(&*self.store, blob).await? {
                Some(d) => d,
                None => ReplicaDigests::rebuild(&*self.store, blob, len, bs).await?,
            },
        })
    }

    /// What a transfer needs done first, with exclusive access: a cycle's starting
    /// points, recorded.
    pub(crate) async fn prepare(&mut self, a: &Action) -> Result<Option<Cycle>> {
        match a.kind {
            ActionKind::ApplyLogs { cycle } => self.begin_cycle(&a.item, cycle).await,
            _ => Ok(None),
        }
    }

    /// Performs a transfer (a copy piece, a disk's resync, a begun cycle: `cycle` from
    /// [`Engine::prepare`]) with shared access only: several items' run at once;
    /// [`Engine::settle`] records what it did. `alone`: no other action is performed
    /// beside it (a copy piece then reads the next one ahead).
    pub(crate) async fn transfer(
        &self,
        a: &Action,
        cycle: Option<&Cycle>,
        alone: bool,
    ) -> Result<Transferred> {
        match &a.kind {
            ActionKind::ApplyLogs { cycle: n } => {
                if let Some(c) = cycle {
                    self.send_cycle(&a.item, *n, c).await?;
                }
                Ok(Transferred::Applied { cycle: *n })
            }
            ActionKind::CopyDiskRange { disk, offset, len } => {
                let (sent, end) = self
                    .copy_range(&a.item, *disk, *offset, *len, alone)
                    .await?;
                let through = (end > offset + len).then_some(end);
                Ok(Transferred::Copied { sent, through })
            }
            ActionKind::ResyncDisk { disk } => Ok(Transferred::Resynced {
                disk: *disk,
                report: self.resync_disk(&a.item, *disk).await?,
            }),
            other => Err(Error::Invalid(format!(
                "{other:?} is not performed beside other actions"
            ))),
        }
    }

    /// Records a transfer's result in its item's document.
    pub(crate) fn settle(&mut self, item: &str, done: Transferred) -> Result<Outcome> {
        match done {
            Transferred::Copied { sent, through } => {
                self.quiet += usize::from(!sent);
                if let Some(end) = through {
                    return Ok(Outcome::CopiedThrough(end));
                }
            }
            Transferred::Resynced { disk, report } => {
                let doc = self.doc_mut(item)?;
                let n = doc.disks.len();
                doc.last_resync.resize(n, SyncReport::default());
                if let Some(r) = doc.last_resync.get_mut(disk) {
                    *r = report;
                }
            }
            Transferred::Applied { cycle } => self.end_cycle(item, cycle)?,
        }
        Ok(Outcome::Done)
    }

    /// Copies a piece of disk `d` into its replica: whether anything was sent, and
    /// where the copy got to (the piece's end, or the end of a run of holes it begins,
    /// which the replica held as zeros already).
    async fn copy_range(
        &self,
        name: &str,
        d: usize,
        offset: u64,
        len: u64,
        read_ahead: bool,
    ) -> Result<(bool, u64)> {
        let doc = self.doc(name)?;
        let (disk, bs, disks) = (doc.disks[d].clone(), doc.block_size, doc.disks.len());
        let key = (name.to_owned(), d, offset, len);
        // The piece read ahead while the last one was sent, if this action is the one
        // right after it (no other action of the item came between: a read after the
        // last piece's is as good as one now, tracking having started before both).
        let ahead = self
            .read_ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|r| r.key == key && r.after + 1 == self.performed);
        let mut reader = match ahead {
            Some(r) => r.reader,
            None => self.piece_reader(&disk, bs, offset, len),
        };
        let layout = match reader.next().await? {
            Read::Layout(layout) => layout,
            other => {
                return Err(Error::Invalid(format!(
                    "a copy piece's reader began with {other:?}, not the piece's layout"
                )));
            }
        };
        // A piece of holes that begins a longer run: the pieces of the run where the
        // replica holds zeros are skipped, up to the first where it does not, for one
        // read of the replica's properties (each piece asked them: a request per 64 MiB
        // of a thin disk on Azure).
        let zeros_until = match layout.holes_until {
            Some(end) if end > offset + len => self.zeros_until(name, d, offset, len, end).await?,
            _ => offset,
        };
        let skipped = zeros_until > offset;
        let through = zeros_until.max(offset + len);
        // The last piece of the item's last disk: its copy is done with this one.
        let last = through >= disk.size && d + 1 == disks;
        // The next piece (as long as this one, up to the disk's end) is read while this
        // one is sent: its first segments, while this one's last are sent and synced.
        // Not beside other items' transfers: the count of actions then moves by more
        // than one before the next piece, which would drop the read unused.
        let next = through;
        if read_ahead && next < disk.size {
            let n = len.min(disk.size - next);
            *self.read_ahead.lock().unwrap_or_else(|p| p.into_inner()) = Some(ReadAhead {
                key: (name.to_owned(), d, next, n),
                after: self.performed,
                reader: self.piece_reader(&disk, bs, next, n),
            });
        }
        let sent = if skipped {
            false
        } else if layout.data.is_empty() {
            let how = BatchOptions {
                skip_known_zeros: true,
                ..BatchOptions::default()
            };
            let holes = vec![Change::Zero { offset, len }];
            self.write_batch(name, d, holes, how).await?.is_some()
        } else {
            self.send_piece(name, d, offset..offset + len, &layout.data, &mut reader)
                .await?
        };
        drop(reader);
        if last {
            // The item's copy is done: its buffers go while its logs are applied.
            self.buffers.clear();
        }
        self.observer.event(&Event::Progress {
            item: name.to_owned(),
            disk: d,
            task: Task::InitialCopy,
            done: through,
            total: disk.size,
        });
        Ok((sent, through))
    }

    /// Sends a copy piece of disk `d` holding `data` (the rest holes) as one batch, each
    /// segment as `reader` hands it on, up to the writer's requests in flight at once:
    /// the piece is read and sent at the same time, through buffers the CPU's caches hold
    /// (`crate::copy`). Zeros the replica holds already are left out. Whether anything
    /// was sent (nothing: no batch).
    async fn send_piece(
        &self,
        name: &str,
        d: usize,
        piece: Range<u64>,
        data: &[Range<u64>],
        reader: &mut PieceReader,
    ) -> Result<bool> {
        let doc = self.doc(name)?;
        let (len, bs) = (doc.disks[d].size, BlockSize::new(doc.block_size)?);
        if piece.end > len {
            return Err(Error::Invalid(format!(
                "a copy piece at {}..{} passes the disk's end ({len})",
                piece.start, piece.end
            )));
        }
        let blob = replica_blob(name, d);
        let seq = self.store.properties(&blob).await?.sequence_number;
        let mut digests = self.take_digests(&blob, len, bs, seq).await?;
        let mut touched = Vec::new();
        // Progress inside the piece, as its segments land: a piece may be hundreds of MiB.
        let progress = |done| {
            self.observer.event(&Event::Progress {
                item: name.to_owned(),
                disk: d,
                task: Task::InitialCopy,
                done,
                total: len,
            })
        };
        let sent = self
            .stream_batch(
                &blob,
                seq,
                piece,
                data,
                reader,
                &mut digests,
                &mut touched,
                &progress,
            )
            .await;
        match sent {
            Ok(sent) => {
                self.put_digests(blob, digests);
                Ok(sent)
            }
            Err(e) if touched.is_empty() => {
                self.put_digests(blob, digests);
                Err(e)
            }
            Err(e) => {
                self.recover_digests(blob, digests, &touched).await;
                Err(e)
            }
        }
    }

    /// [`Engine::send_piece`]'s batch: `touched` says what it may have written, for the
    /// digests' repair if it fails part way; `progress` is told the piece's start plus the
    /// bytes of its segments done so far (sent, or found to be zeros the replica holds),
    /// as each is done.
    #[allow(clippy::too_many_arguments)]
    async fn stream_batch(
        &self,
        blob: &str,
        seq: u64,
        piece: Range<u64>,
        data: &[Range<u64>],
        reader: &mut PieceReader,
        digests: &mut ReplicaDigests,
        touched: &mut Vec<Range<u64>>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<bool> {
        let store = &*self.store;
        // Announced at the first part: the data, and the holes the replica may not hold
        // as zeros (a resumed copy's).
        let mut holes = Vec::new();
        let mut at = piece.start;
        for r in data.iter().chain(std::iter::once(&(piece.end..piece.end))) {
            if at < r.start {
                holes.push(at..r.start);
            }
            at = r.end;
        }
        // The piece's slot pages, read once (a resumed copy's): its holes and each
        // segment's zero runs are asked about against them.
        digests.hold_range(store, piece.clone()).await?;
        let known = digests.known_zero(store, &holes).await?;
        let mut announce: Vec<Range<u64>> = data.to_vec();
        announce.extend(
            holes
                .into_iter()
                .zip(known)
                .filter(|(_, z)| !z)
                .map(|(h, _)| h),
        );
        let announce = lifeboat_pageblob::merge_ranges(announce);
        let writer = PageWriter::new(self.store.clone(), blob, self.writer.clone())
            .leased(Some(self.site.id()));
        let mut batch = BatchDigests::default();
        let mut open = None;
        let mut sending = futures::stream::FuturesUnordered::new();
        // Segments being sent, at most: a copy holds these and the two read ahead. A
        // segment is one or a few requests (one Put Page's most, in data and zero runs).
        let limit = self.writer.in_flight.max(1);
        // A segment done (sent, or nothing of it to send): its buffer taken back, and
        // progress moved on by the bytes of the disk it covered.
        let mut landed = piece.start;
        let mut land = |(buffer, span): (Bytes, u64)| {
            self.buffers.give(buffer);
            landed += span;
            progress(landed);
        };
        loop {
            // Parts sent meanwhile give their buffers back.
            while sending.len() >= limit {
                if let Some(done) = sending.next().await {
                    land(done?);
                }
            }
            let read = tokio::select! {
                biased;
                done = sending.next(), if !sending.is_empty() => {
                    if let Some(done) = done {
                        land(done?);
                    }
                    continue;
                }
                read = reader.next() => read?,
            };
            let segment = match read {
                Read::Segment(segment) => segment,
                Read::End => break,
                Read::Layout(_) => {
                    return Err(Error::Invalid(
                        "a copy piece's reader gave its layout twice".into(),
                    ));
                }
            };
            let Segment {
                window,
                changes: all,
                buffer,
                digests: hashed,
            } = segment;
            let span = window.end - window.start;
            let changes = without_known_zeros(digests, store, &all).await?;
            drop(all);
            batch.join(hashed);
            if changes.is_empty() {
                land((buffer, span));
                continue;
            }
            if open.is_none() {
                // Until the batch's digests are saved, the stored ones describe no
                // sequence number.
                digests
                    .begin_batch(store, blob, Some(self.site.id()))
                    .await?;
                open = Some(writer.begin(seq, &announce).await?);
            }
            touched.extend(changes.iter().map(Change::range));
            let (writer, open) = (&writer, open.clone());
            sending.push(async move {
                let open = open.ok_or_else(|| Error::Invalid("no batch open".into()))?;
                writer.send(&open, changes, None).await?;
                Ok::<_, Error>((buffer, span))
            });
        }
        while let Some(done) = sending.next().await {
            land(done?);
        }
        drop(sending);
        let Some(open) = open else {
            return Ok(false);
        };
        writer.finish(open).await?;
        digests.update_with(store, blob, batch, seq + 1).await?;
        digests.save(store, blob, Some(self.site.id())).await?;
        Ok(true)
    }

    /// Where the pieces of `piece` bytes from `offset` to `end` stop being zeros in the
    /// replica of disk `d`, as its digests say (for a new replica, without reading them:
    /// every block is zero): `offset` if the first is not.
    async fn zeros_until(
        &self,
        name: &str,
        d: usize,
        offset: u64,
        piece: u64,
        end: u64,
    ) -> Result<u64> {
        let doc = self.doc(name)?;
        let (len, bs) = (doc.disks[d].size, BlockSize::new(doc.block_size)?);
        let blob = replica_blob(name, d);
        let seq = self.store.properties(&blob).await?.sequence_number;
        let mut digests = self.take_digests(&blob, len, bs, seq).await?;
        let pieces: Vec<Range<u64>> = (offset..end)
            .step_by(piece.max(1) as usize)
            .map(|at| at..(at + piece).min(end))
            .collect();
        let known = digests.known_zero(&*self.store, &pieces).await;
        self.put_digests(blob, digests);
        let zeros = known?.iter().take_while(|&&z| z).count();
        Ok(pieces[..zeros].last().map_or(offset, |r| r.end))
    }

    /// The reader of a piece of `disk`, started.
    fn piece_reader(
        &self,
        disk: &catalog::Disk,
        block_size: u32,
        offset: u64,
        len: u64,
    ) -> PieceReader {
        let spec = PieceSpec {
            host: self.host.clone(),
            path: disk.source.clone(),
            size: disk.size,
            offset,
            len,
            block_size,
            segment: self.segment,
        };
        PieceReader::start(spec, self.buffers.clone())
    }

    async fn close_logs(&mut self, name: &str, cycle: u64) -> Result<Outcome> {
        let n = self.doc(name)?.disks.len();
        if !self.doc(name)?.cycles.contains_key(&cycle) {
            // The host closes its open logs: with those handed over before, they hold
            // every write until now (the host's promise), so the cycle's point is now.
            self.take_host_logs(name, false).await?;
            let doc = self.doc_mut(name)?;
            let logs = std::mem::take(&mut doc.pending);
            doc.cycles.insert(
                cycle,
                Cycle {
                    logs,
                    expect_seq: Vec::new(),
                    batch_bytes: None,
                },
            );
        }
        let c = &self.doc(name)?.cycles[&cycle];
        let quiesced = !c.logs.is_empty() && c.logs.iter().all(|l| l.app_consistent);
        let reports = (0..n)
            .map(|d| {
                let mine = c.logs.iter().filter(|l| l.disk == d);
                LogReport {
                    disk: d,
                    log_bytes: mine.clone().map(|l| l.logged_bytes).sum(),
                    closed_cleanly: mine.clone().all(|l| l.clean),
                    write_guid_matches: mine.clone().all(|l| l.guid_ok),
                    continues_chain: mine.clone().all(|l| l.chained),
                    app_consistent: quiesced,
                    closed_at: mine.clone().filter_map(|l| l.closed_at).max(),
                }
            })
            .collect();
        Ok(Outcome::Logs(reports))
    }

    /// Applies cycle `cycle`, after every earlier cycle still waiting (a cycle whose apply
    /// was dropped, say by a planned failover, still comes first: a replica never skips a
    /// cycle).
    async fn apply_cycle(&mut self, name: &str, cycle: u64) -> Result<()> {
        let earlier: Vec<u64> = self
            .doc(name)?
            .cycles
            .range(..cycle)
            .map(|(c, _)| *c)
            .collect();
        for c in earlier {
            self.apply_one_cycle(name, c).await?;
        }
        self.apply_one_cycle(name, cycle).await
    }

    async fn apply_one_cycle(&mut self, name: &str, cycle: u64) -> Result<()> {
        if let Some(c) = self.begin_cycle(name, cycle).await? {
            self.send_cycle(name, cycle, &c).await?;
        }
        self.end_cycle(name, cycle)
    }

    /// The cycle to apply, with where each replica starts from recorded (durably) first;
    /// `None` if it was applied before (and removed before a crash).
    pub(crate) async fn begin_cycle(&mut self, name: &str, cycle: u64) -> Result<Option<Cycle>> {
        let Some(mut c) = self.doc(name)?.cycles.get(&cycle).cloned() else {
            return Ok(None);
        };
        if c.expect_seq.is_empty() {
            // Where each replica starts from, recorded (durably) before the first batch:
            // batch i is fenced on expect + i, so a crash resumes at the first batch the
            // blob has not taken. Taken now, not at close: a cycle closed before an
            // earlier one was applied starts after that one's batches.
            for d in 0..self.doc(name)?.disks.len() {
                let p = self.store.properties(&replica_blob(name, d)).await?;
                c.expect_seq.push(p.sequence_number);
            }
            c.batch_bytes = Some(LOG_BATCH_BYTES);
            if let Some(x) = self.doc_mut(name)?.cycles.get_mut(&cycle) {
                x.expect_seq = c.expect_seq.clone();
                x.batch_bytes = c.batch_bytes;
            }
            self.persist().await?;
        }
        Ok(Some(c))
    }

    /// Sends a begun cycle's batches (shared access: several items' cycles run at once).
    async fn send_cycle(&self, name: &str, cycle: u64, c: &Cycle) -> Result<()> {
        for (d, &expect) in c.expect_seq.iter().enumerate() {
            let logs: Vec<(&Path, &str)> = c
                .logs
                .iter()
                .filter(|l| l.disk == d)
                .map(|l| (l.path.as_path(), l.id.as_str()))
                .collect();
            if logs.is_empty() {
                continue;
            }
            // Batch i of the cycle is fenced on sequence number expect + i: a crash resumes
            // at the first batch the blob has not taken, the logs split as when it began.
            let batch = c.batch_bytes.unwrap_or(UNRECORDED_LOG_BATCH_BYTES);
            let chain = Arc::new(LogChain::open(&logs, batch)?);
            let blob = replica_blob(name, d);
            let size = self.doc(name)?.disks[d].size;
            let seq = self.store.properties(&blob).await?.sequence_number;
            if seq < expect {
                return Err(Error::Invalid(format!(
                    "replica {blob} is at sequence number {seq}, before cycle {cycle} ({expect})"
                )));
            }
            // The payloads are checked on another thread while the batches are sent: the
            // staged file may be a hard link to a log changed in place since it was handed
            // over. A bad one fails the cycle before it ends (no recovery point holds a
            // batch of it; the item needs a resync, as after a crash mid-cycle).
            let mut verified = Some({
                let chain = chain.clone();
                tokio::task::spawn_blocking(move || chain.verify())
            });
            // The next batch is read from the logs while this one is sent (two in memory).
            let read = |i: usize| {
                let chain = chain.clone();
                tokio::task::spawn_blocking(move || chain.changes(i))
            };
            let first = (seq - expect) as usize;
            let mut ahead = (first < chain.len()).then(|| read(first));
            let (mut sent, mut requests, mut batches) = (0, 0, 0);
            for i in first..chain.len() {
                let Some(reading) = ahead.take() else { break };
                let changes = joined(reading.await, "reading logs")??;
                if i + 1 < chain.len() {
                    ahead = Some(read(i + 1));
                }
                let edges =
                    EdgePages::fetch(&*self.store, &blob, &data::edge_pages(&changes), size)
                        .await?;
                if let Some(r) = self
                    .write_batch(
                        name,
                        d,
                        changes,
                        BatchOptions {
                            edges: Some(&edges),
                            expect: Some(expect + i as u64),
                            ..BatchOptions::default()
                        },
                    )
                    .await?
                {
                    sent += r.bytes_sent;
                    requests += r.put_requests;
                    batches += 1;
                }
                // A bad payload found already stops the cycle here.
                if let Some(v) = verified.take_if(|v| v.is_finished()) {
                    joined(v.await, "checking logs")??;
                }
            }
            if let Some(v) = verified {
                joined(v.await, "checking logs")??;
            }
            if requests > 0 {
                self.observer.event(&Event::CycleApplied {
                    item: name.to_owned(),
                    disk: d,
                    cycle,
                    bytes_sent: sent,
                    requests,
                    batches,
                });
            }
        }
        Ok(())
    }

    /// A cycle was applied: it leaves the catalogue, its logs go to the trash.
    fn end_cycle(&mut self, name: &str, cycle: u64) -> Result<()> {
        let doc = self.doc_mut(name)?;
        if let Some(c) = doc.cycles.remove(&cycle) {
            doc.trash.extend(c.logs.into_iter().map(|l| l.path));
        }
        Ok(())
    }

    /// Compares disk `d` with its replica's digests and sends the blocks that differ; the
    /// caller records the report. Shared access only: several items' resyncs run at once
    /// (the comparison off the runtime's threads).
    async fn resync_disk(&self, name: &str, d: usize) -> Result<SyncReport> {
        let doc = self.doc(name)?;
        let (disk, bs) = (doc.disks[d].clone(), doc.block_size);
        let blob = replica_blob(name, d);
        let seq = self.store.properties(&blob).await?.sequence_number;
        let digests = self
            .take_digests(&blob, disk.size, BlockSize::new(bs)?, seq)
            .await?;
        let signature = digests.signature(&*self.store).await?;
        let delta = {
            let (observer, item, size, bsz) = (
                self.observer.clone(),
                name.to_owned(),
                disk.size,
                u64::from(bs),
            );
            let (host, path) = (self.host.clone(), disk.source.clone());
            blocking("comparing a disk", move || {
                let src = open_source(&*host, &path, size)?;
                let delta = lifeboat_resync::diff_with(
                    Side::Local(&*src),
                    Side::Signature(&signature),
                    DiffOptions::default(),
                    move |p| {
                        observer.event(&Event::Progress {
                            item: item.clone(),
                            disk: d,
                            task: Task::ResyncCompare,
                            done: (p.blocks_done * bsz).min(size),
                            total: size,
                        });
                        ControlFlow::Continue(())
                    },
                )?;
                Ok::<_, Error>(delta)
            })
            .await??
        };
        let src = self.open_source(&disk.source, disk.size)?;
        // The batches below start from these digests (no second load).
        self.put_digests(blob, digests);
        let mut report = SyncReport {
            blocks_compared: delta.blocks_compared,
            ..SyncReport::default()
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for e in &delta.extents {
            match e.kind {
                ExtentKind::Zero => {
                    batch.push(Change::Zero {
                        offset: e.offset,
                        len: e.len,
                    });
                    report.bytes_cleared += e.len;
                }
                ExtentKind::Data => {
                    // Read in request-sized pieces: an extent may span the whole disk.
                    let mut at = e.offset;
                    while at < e.offset + e.len {
                        let n = (e.offset + e.len - at).min(MAX_PUT);
                        batch.push(Change::Data {
                            offset: at,
                            data: data::read_at(&*src, at, n, &disk.source)?,
                        });
                        batch_bytes += n;
                        report.bytes_sent += n;
                        at += n;
                        if batch_bytes >= BATCH_BYTES {
                            self.write_batch(
                                name,
                                d,
                                std::mem::take(&mut batch),
                                BatchOptions::default(),
                            )
                            .await?;
                            batch_bytes = 0;
                        }
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.write_batch(name, d, batch, BatchOptions::default())
                .await?;
        }
        Ok(report)
    }

    /// One snapshot per disk, and one of its digests beside it (what `verify` checks the
    /// point against); each recorded before the next is taken, so a crash leaves none
    /// behind unrecorded.
    async fn create_point(&mut self, name: &str, point: PointId) -> Result<()> {
        let doc = self.doc(name)?;
        let (n, bs) = (doc.disks.len(), BlockSize::new(doc.block_size)?);
        for d in 0..n {
            let blob = replica_blob(name, d);
            if self.doc(name)?.points.get(&point.0).map_or(0, Vec::len) <= d {
                // Digests a crash left behind a batch are brought up to date first.
                if !ReplicaDigests::is_current(&*self.store, &blob).await? {
                    let len = self.doc(name)?.disks[d].size;
                    let mut fresh = ReplicaDigests::rebuild(&*self.store, &blob, len, bs).await?;
                    fresh
                        .save(&*self.store, &blob, Some(self.site.id()))
                        .await?;
                    self.forget_digests(&blob);
                }
                let snap = self.store.snapshot(&blob, self.lease()).await?;
                self.doc_mut(name)?
                    .points
                    .entry(point.0)
                    .or_default()
                    .push(snap);
                self.persist().await?;
            }
            if self
                .doc(name)?
                .point_digests
                .get(&point.0)
                .map_or(0, Vec::len)
                <= d
            {
                let snap = self
                    .store
                    .snapshot(&lifeboat_pageblob::digests_blob(&blob), self.lease())
                    .await?;
                self.doc_mut(name)?
                    .point_digests
                    .entry(point.0)
                    .or_default()
                    .push(snap);
                self.persist().await?;
            }
        }
        Ok(())
    }

    /// Drops the in-memory digests of `blob` (the stored ones changed).
    pub(crate) fn forget_digests(&self, blob: &str) {
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(blob);
    }

    pub(crate) async fn delete_point(&mut self, name: &str, point: PointId) -> Result<()> {
        // The store does not fence snapshot deletions (snapshots take no lease): a write
        // of the catalogue as its lease holder first proves this site still owns the item.
        self.fence(name).await?;
        let doc = self.doc(name)?;
        let snaps = doc.points.get(&point.0).cloned().unwrap_or_default();
        let digests = doc.point_digests.get(&point.0).cloned().unwrap_or_default();
        let replicas = snaps
            .iter()
            .enumerate()
            .map(|(d, s)| (replica_blob(name, d), s));
        let digest_blobs = digests
            .iter()
            .enumerate()
            .map(|(d, s)| (lifeboat_pageblob::digests_blob(&replica_blob(name, d)), s));
        for (blob, snap) in replicas.chain(digest_blobs) {
            match self.store.delete_snapshot(&blob, snap).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let doc = self.doc_mut(name)?;
        doc.points.remove(&point.0);
        doc.point_digests.remove(&point.0);
        Ok(())
    }

    async fn materialize(&mut self, name: &str, point: PointId, purpose: Purpose) -> Result<()> {
        let doc = self.doc(name)?.clone();
        let snaps = doc.points.get(&point.0).ok_or_else(|| {
            Error::Invalid(format!("recovery point {} has no snapshots", point.0))
        })?;
        let (export, tag) = match purpose {
            Purpose::Test => (&doc.test.export, "test"),
            Purpose::Failover => (&doc.failover.export, "failover"),
        };
        let mut out = Vec::new();
        if let Some(dir) = &export.dir {
            data::private_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        }
        let files = export.files(snaps.len());
        for (d, snap) in snaps.iter().enumerate() {
            let blob = replica_blob(name, d);
            let size = doc.disks[d].size;
            let len = if export.vhd {
                vhd::blob_size(size)
            } else {
                size
            };
            let file = files.get(d).cloned();
            if export.in_store || file.is_none() {
                let dest = catalog::purpose_blob(name, tag, d);
                self.delete_blob(&dest).await?;
                self.store.copy_snapshot(&blob, snap, &dest).await?;
                self.store.acquire_lease(&dest, self.site.id()).await?;
                if let Some(f) = &file {
                    data::export(&*self.store, &dest, None, len, f).await?;
                }
                out.push(Location::Blob {
                    name: dest,
                    download: file,
                });
            } else if let Some(f) = file {
                if export.vhdx {
                    data::export_vhdx(&*self.store, &blob, Some(snap), size, &f).await?;
                } else {
                    data::export(&*self.store, &blob, Some(snap), len, &f).await?;
                }
                out.push(Location::File { path: f });
            }
        }
        let doc = self.doc_mut(name)?;
        let m = match purpose {
            Purpose::Test => &mut doc.test,
            Purpose::Failover => &mut doc.failover,
        };
        m.disks = out;
        m.point = Some(point.0);
        Ok(())
    }

    /// Deletes a blob of an owned item (leased to this site, or not leased at all after a
    /// crash between its copy and its lease); a missing one is fine.
    async fn delete_blob(&self, blob: &str) -> Result<()> {
        match self.store.delete(blob, self.lease()).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(StoreError::NotLeased { .. }) => {
                match self.store.delete(blob, Condition::NONE).await {
                    Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_location(&self, l: &Location) -> Result<()> {
        match l {
            Location::File { path } => match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("deleting {}", path.display()))(e)),
            },
            Location::Blob { name, download } => {
                if let Some(p) = download {
                    let _ = std::fs::remove_file(p);
                }
                self.delete_blob(name).await
            }
        }
    }

    fn protect_source(&mut self, name: &str) -> Result<()> {
        let doc = self.doc(name)?.clone();
        let dir = self.site.protective_dir(name);
        let mut copies = Vec::new();
        for (d, (to, disk)) in doc.failback_to.iter().zip(&doc.disks).enumerate() {
            if self.host.open_disk(to).is_err() {
                // An alternate disk that does not exist yet: an empty one of the size.
                self.host
                    .create_disk(to, disk.size)
                    .map_err(Error::io(format!("creating disk {}", to.display())))?;
            }
            let target = self.open_disk(to, disk.size)?;
            let copy = dir.join(format!("disk{d}.raw"));
            if !copy.exists() {
                data::save_disk(&*target, disk.size, &copy)?;
            }
            copies.push(copy);
        }
        let doc = self.doc_mut(name)?;
        doc.protective = copies;
        doc.last_sync_back.clear();
        Ok(())
    }

    async fn sync_back(&mut self, name: &str, full: bool) -> Result<()> {
        let doc = self.doc(name)?.clone();
        let mut reports = Vec::new();
        for (d, (from, to)) in doc.failover.disks.iter().zip(&doc.failback_to).enumerate() {
            let len = doc.disks[d].size;
            let from = from.clone();
            let store = self.store.clone();
            let target = self.open_disk(to, len)?;
            let handle = tokio::runtime::Handle::current();
            let report = blocking("syncing back", move || -> Result<SyncReport> {
                let src: Box<dyn ReadAt + Send> = match &from {
                    Location::File { path } => Box::new(
                        std::fs::File::open(path)
                            .map_err(Error::io(format!("opening {}", path.display())))?,
                    ),
                    Location::Blob { name, .. } => Box::new(BlobSource {
                        store,
                        blob: name.clone(),
                        len,
                        handle,
                    }),
                };
                let src = TakeSource { inner: &*src, len };
                // Full: compared with nothing, every block is sent (zero blocks cleared),
                // without hashing the source or reading the target.
                let delta = if full {
                    lifeboat_resync::Delta::full(&src)?
                } else {
                    lifeboat_resync::diff(Side::Local(&src), Side::Local(&*target))?
                };
                let stats = lifeboat_resync::apply(&delta, &src, &mut DiskWriter(&*target))?;
                target
                    .sync()
                    .map_err(Error::io("syncing a failback target disk"))?;
                Ok(SyncReport {
                    blocks_compared: delta.blocks_compared,
                    bytes_sent: stats.data_bytes,
                    bytes_cleared: stats.zero_bytes,
                })
            })
            .await??;
            reports.push(report);
        }
        // Passes add up: the report covers the whole failback.
        let doc = self.doc_mut(name)?;
        doc.last_sync_back
            .resize(reports.len(), SyncReport::default());
        for (acc, r) in doc.last_sync_back.iter_mut().zip(reports) {
            acc.blocks_compared += r.blocks_compared;
            acc.bytes_sent += r.bytes_sent;
            acc.bytes_cleared += r.bytes_cleared;
        }
        Ok(())
    }
}
