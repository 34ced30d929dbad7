//! The driver: performs the coordinator's actions against the disks, the logs and the
//! page store, and saves the state after every step so any process can carry on.

use std::collections::HashMap;
use std::fs::{self, File};
use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use lifeboat_pageblob::{
    BatchReport, Change, Condition, MAX_PUT, Metadata, PageStore, PageWriter, ReplicaDigests,
    StoreError, WriteError, WriterConfig, vhd,
};
use lifeboat_replication::{
    Action, ActionKind, Command, HealthCause, JobId, JobState, Outcome, PointId, ProtectionState,
    Purpose,
};
use lifeboat_resync::{BlockSize, BlockSource, DiffOptions, ExtentKind, Side};
use lifeboat_retry::{Class, Classify};

use crate::disk::{self, BlobSource, EdgePages};
use crate::state::{self, Cycle, ItemState, Location, State, SyncReport};

/// Data bytes per page-writer batch when resyncing (bounded memory).
const BATCH_BYTES: u64 = 32 << 20;
/// Data bytes per batch when applying logs (each batch one sequence number).
const LOG_BATCH_BYTES: u64 = 8 << 20;

/// The agent: a store, a site directory and the state.
pub(crate) struct Agent<S> {
    pub(crate) store: Arc<S>,
    pub(crate) site: PathBuf,
    pub(crate) state: State,
    pub(crate) azure: bool,
    pub(crate) quiet: bool,
    bars: HashMap<(String, usize), ProgressBar>,
    /// The site's lock, held while the agent runs (released by the OS on any exit).
    _lock: File,
    /// Actions performed by this process.
    performed: u64,
    /// Replica digests as last saved, by blob.
    digests: std::sync::Mutex<HashMap<String, ReplicaDigests>>,
}

/// The class of an error: recoverable storage and I/O faults are retried on the
/// replication schedule; everything else is non-recoverable.
fn classify(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return s.class();
        }
        if let Some(w) = cause.downcast_ref::<WriteError>() {
            return match w {
                WriteError::Store { source, .. } => source.class(),
                _ => Class::NonRecoverable,
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.class();
        }
    }
    Class::NonRecoverable
}

impl<S: PageStore + 'static> Agent<S> {
    /// Opens the site: loads the state and re-issues whatever was in flight.
    pub(crate) fn open(store: Arc<S>, site: &Path, azure: bool, quiet: bool) -> Result<Self> {
        fs::create_dir_all(site).with_context(|| format!("creating {}", site.display()))?;
        let lock_path = site.join("lock");
        let lock =
            File::create(&lock_path).with_context(|| format!("opening {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            if !quiet {
                eprintln!("waiting for another lifeboat process on {}", site.display());
            }
            lock.lock()
                .with_context(|| format!("locking {}", lock_path.display()))?;
        }
        let state = state::load(site)?;
        let mut a = Agent {
            store,
            site: site.to_path_buf(),
            state,
            azure,
            quiet,
            bars: HashMap::new(),
            _lock: lock,
            performed: 0,
            digests: Default::default(),
        };
        let now = a.now();
        a.state.coordinator.resume(now);
        Ok(a)
    }

    /// The coordinator's clock: wall time, never going backwards.
    pub(crate) fn now(&mut self) -> Duration {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.state.clock = self.state.clock.max(wall);
        self.state.clock
    }

    /// Saves the state.
    pub(crate) fn save(&self) -> Result<()> {
        state::save(&self.site, &self.state)
    }

    /// The item's agent-side state.
    pub(crate) fn item(&self, name: &str) -> Result<&ItemState> {
        self.state
            .items
            .get(name)
            .ok_or_else(|| anyhow!("no protected item {name}"))
    }

    /// The item's agent-side state, to change.
    pub(crate) fn item_mut(&mut self, name: &str) -> Result<&mut ItemState> {
        self.state
            .items
            .get_mut(name)
            .ok_or_else(|| anyhow!("no protected item {name}"))
    }

    /// The item's protection state.
    pub(crate) fn protection(&mut self, name: &str) -> Result<ProtectionState> {
        let now = self.now();
        Ok(self
            .state
            .coordinator
            .status(name, now)
            .ok_or_else(|| anyhow!("no protected item {name}"))?
            .state)
    }

    /// Starts an operation, drives it as far as it goes and checks how its job ended.
    pub(crate) async fn command(&mut self, cmd: Command) -> Result<JobId> {
        let item = cmd.item().to_owned();
        let now = self.now();
        let job = self.state.coordinator.handle_command(now, cmd)?;
        self.save()?;
        self.drive().await?;
        self.check_job(&item, &job)?;
        Ok(job)
    }

    /// Performs actions until none is ready, saving after each.
    ///
    /// Crash tests set `LIFEBOAT_CRASH_BEFORE_SAVE=N`: the process aborts after performing
    /// its Nth action and before saving the outcome, the widest window a crash can hit.
    pub(crate) async fn drive(&mut self) -> Result<()> {
        let crash_at: Option<u64> = std::env::var("LIFEBOAT_CRASH_BEFORE_SAVE")
            .ok()
            .and_then(|v| v.parse().ok());
        while let Some(action) = self.state.coordinator.poll_action() {
            self.performed += 1;
            tracing::debug!(?action, "performing");
            let outcome = match self.perform(&action).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(item = %action.item, "action failed: {e:#}");
                    Outcome::Failed {
                        class: classify(&e),
                        message: format!("{e:#}"),
                    }
                }
            };
            let now = self.now();
            self.state
                .coordinator
                .handle_outcome(now, action.id, outcome)?;
            if crash_at == Some(self.performed) {
                std::process::abort();
            }
            self.save()?;
            self.empty_trash();
        }
        for bar in self.bars.values() {
            bar.finish_and_clear();
        }
        self.bars.clear();
        Ok(())
    }

    /// Deletes the files the saved state no longer needs.
    fn empty_trash(&mut self) {
        for it in self.state.items.values_mut() {
            for p in std::mem::take(&mut it.trash) {
                let _ = fs::remove_file(p);
            }
        }
    }

    /// Fails with the reason when the item is Critical, retrying, or the job failed.
    pub(crate) fn check_job(&mut self, item: &str, job: &JobId) -> Result<()> {
        let now = self.now();
        if let Some(st) = self.state.coordinator.status(item, now) {
            for c in &st.causes {
                match c {
                    HealthCause::NonRecoverableError { message } => bail!(
                        "{item} is Critical: {message} (fix the cause, then run `lifeboat repair {item}`)"
                    ),
                    HealthCause::Retrying { message, retries } => bail!(
                        "{item}: {message}; recoverable, retry {retries} is scheduled (run `lifeboat resume` to carry on)"
                    ),
                    _ => {}
                }
            }
        }
        if let Some(j) = self.state.coordinator.job(job) {
            match j.state {
                JobState::Failed | JobState::Cancelled => bail!(
                    "{:?} job {} {:?}: {}",
                    j.kind,
                    j.id,
                    j.state,
                    j.errors.join("; ")
                ),
                _ => {}
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ actions

    async fn perform(&mut self, a: &Action) -> Result<Outcome> {
        let name = a.item.as_str();
        match &a.kind {
            ActionKind::StartTracking => self.start_tracking(name).await?,
            ActionKind::CopyDiskRange { disk, offset, len } => {
                self.copy_range(name, *disk, *offset, *len).await?
            }
            ActionKind::CloseLogs { cycle } => return self.close_logs(name, *cycle).await,
            ActionKind::ApplyLogs { cycle } => self.apply_cycle(name, *cycle).await?,
            ActionKind::DiscardLogs { cycle } => {
                let it = self.item_mut(name)?;
                if let Some(c) = it.cycles.remove(cycle) {
                    it.trash.extend(c.logs.into_iter().map(|l| l.path));
                }
            }
            ActionKind::ProcessPendingLogs => {
                let cycles: Vec<u64> = self.item(name)?.cycles.keys().copied().collect();
                for c in cycles {
                    self.apply_cycle(name, c).await?;
                }
            }
            ActionKind::ResyncDisk { disk } => self.resync_disk(name, *disk).await?,
            ActionKind::CreateRecoveryPoint { point, .. } => {
                self.create_point(name, *point).await?
            }
            ActionKind::DeleteRecoveryPoint { point } => {
                let snaps = self.item(name)?.points.get(&point.0).cloned();
                for (d, snap) in snaps.unwrap_or_default().iter().enumerate() {
                    match self
                        .store
                        .delete_snapshot(&ItemState::blob(name, d), snap)
                        .await
                    {
                        Ok(()) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.item_mut(name)?.points.remove(&point.0);
            }
            ActionKind::MaterializeDisks { point, purpose } => {
                self.materialize(name, *point, *purpose).await?
            }
            ActionKind::DeleteTestDisks => {
                let disks = std::mem::take(&mut self.item_mut(name)?.test_disks);
                for l in &disks {
                    self.remove_location(l).await?;
                }
            }
            ActionKind::ShutDownSource => self.item_mut(name)?.source_running = false,
            ActionKind::StartSource => self.item_mut(name)?.source_running = true,
            ActionKind::StartTarget { .. } => self.item_mut(name)?.target_running = true,
            ActionKind::StopTarget => self.item_mut(name)?.target_running = false,
            ActionKind::ProtectSourceDisks { .. } => self.protect_source(name)?,
            ActionKind::SyncBack { full, .. } => self.sync_back(name, *full).await?,
            ActionKind::RestoreSourceDisks => {
                let it = self.item(name)?.clone();
                for (p, to) in it.protective.iter().zip(&it.failback_to) {
                    disk::copy_file(p, to)?;
                }
                // Used up: a later failback takes fresh protective copies.
                let it = self.item_mut(name)?;
                let copies = std::mem::take(&mut it.protective);
                it.trash.extend(copies);
            }
            ActionKind::DeleteProtectiveSnapshot => {
                let it = self.item_mut(name)?;
                let copies = std::mem::take(&mut it.protective);
                it.trash.extend(copies);
                // The failback target is now the machine's disk.
                it.disks = it.failback_to.clone();
            }
            ActionKind::RunHook { group, pre, hook } => run_hook(name, *group, *pre, hook).await?,
            other => bail!("the agent does not know how to perform {other:?}"),
        }
        Ok(Outcome::Done)
    }

    async fn start_tracking(&mut self, name: &str) -> Result<()> {
        let it = self.item(name)?.clone();
        for (d, (path, &len)) in it.disks.iter().zip(&it.sizes).enumerate() {
            disk::open_disk(path, len)?;
            let blob = ItemState::blob(name, d);
            self.ensure_replica(&blob, len, it.block_size).await?;
        }
        let nanos = self.now().as_nanos();
        let it = self.item_mut(name)?;
        for (d, t) in it.tracking.iter_mut().enumerate() {
            if t.write_guid == [0; 16] {
                let h =
                    blake3::hash(format!("{name}/{d}/{nanos}/{}", std::process::id()).as_bytes());
                t.write_guid.copy_from_slice(&h.as_bytes()[..16]);
            }
        }
        // Logs staged before a resync are covered by it.
        let stale: Vec<PathBuf> = it.pending.drain(..).map(|l| l.path).collect();
        it.trash.extend(stale);
        Ok(())
    }

    /// Creates the replica blob of a disk (rounded up to 1 MiB, fixed-VHD footer) and its
    /// zero digests, unless it exists with the right size.
    async fn ensure_replica(&self, blob: &str, len: u64, block_size: u32) -> Result<()> {
        let size = vhd::blob_size(len);
        match self.store.properties(blob).await {
            Ok(p) if p.size == size => {}
            Ok(p) => bail!(
                "replica {blob} exists with {} bytes, expected {size}",
                p.size
            ),
            Err(StoreError::NotFound { .. }) => {
                let md: Metadata = [("disklength".to_string(), len.to_string())].into();
                match self.store.create(blob, size, 0, &md).await {
                    Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        // The footer is rewritten each time: it is constant for the disk.
        let id = blake3::hash(blob.as_bytes());
        let mut unique = [0u8; 16];
        unique.copy_from_slice(&id.as_bytes()[..16]);
        let footer = vhd::Footer::fixed(vhd::virtual_size(len), unique, 0).encode();
        let seq = self.store.properties(blob).await?.sequence_number;
        self.store
            .write_pages(
                blob,
                size - 512,
                Bytes::copy_from_slice(&footer),
                lifeboat_pageblob::crc64(&footer),
                lifeboat_pageblob::Condition::NONE,
            )
            .await?;
        if ReplicaDigests::load(&*self.store, blob).await?.is_none() {
            let bs = BlockSize::new(block_size)?;
            let mut d = if seq == 0 {
                ReplicaDigests::zeroed(len, bs, seq)
            } else {
                ReplicaDigests::rebuild(&*self.store, blob, len, bs).await?
            };
            d.save(&*self.store, blob, None).await?;
        }
        Ok(())
    }

    /// Applies one batch to a disk's replica and brings its digests up to date. `expect`
    /// fences the batch: `Ok(None)` when the blob is already past it (applied before).
    async fn write_batch(
        &self,
        name: &str,
        d: usize,
        changes: Vec<Change>,
        edges: Option<&dyn BlockSource>,
        expect: Option<u64>,
    ) -> Result<Option<BatchReport>> {
        let it = self.item(name)?;
        let (len, bs) = (it.sizes[d], BlockSize::new(it.block_size)?);
        let blob = ItemState::blob(name, d);
        let seq = self.store.properties(&blob).await?.sequence_number;
        if let Some(e) = expect {
            if seq == e + 1 {
                return Ok(None);
            }
            if seq != e {
                bail!("replica {blob} is at sequence number {seq}, the batch expects {e}");
            }
        }
        let touched: Vec<Range<u64>> = changes.iter().map(Change::range).collect();
        if let Some(r) = touched.iter().find(|r| r.end > len) {
            bail!(
                "a change at {}..{} passes the disk's end ({len})",
                r.start,
                r.end
            );
        }
        let mut digests = self.take_digests(&blob, len, bs, seq).await?;
        let writer = PageWriter::new(self.store.clone(), blob.clone(), WriterConfig::default());
        let report = writer.apply_batch(seq, changes, edges).await?;
        digests
            .update(&*self.store, &blob, &touched, seq + 1)
            .await?;
        digests.save(&*self.store, &blob, None).await?;
        self.digests
            .lock()
            .expect("not poisoned")
            .insert(blob, digests);
        Ok(Some(report))
    }

    fn bar(&mut self, name: &str, d: usize, len: u64, what: &str) -> ProgressBar {
        let quiet = self.quiet;
        self.bars
            .entry((name.to_owned(), d))
            .or_insert_with(|| {
                let bar = if quiet {
                    ProgressBar::hidden()
                } else {
                    ProgressBar::new(len)
                };
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(format!("{name} disk {d} {what}"));
                bar
            })
            .clone()
    }

    async fn copy_range(&mut self, name: &str, d: usize, offset: u64, len: u64) -> Result<()> {
        let it = self.item(name)?;
        let (path, size) = (it.disks[d].clone(), it.sizes[d]);
        let file = disk::open_disk(&path, size)?;
        let data = disk::read_at(&file, offset, len)?;
        let changes = disk::split_zero_runs(offset, data);
        self.write_batch(name, d, changes, None, None).await?;
        let bar = self.bar(name, d, size, "initial replication");
        bar.set_position(offset + len);
        Ok(())
    }

    async fn close_logs(&mut self, name: &str, cycle: u64) -> Result<Outcome> {
        let n = self.item(name)?.disks.len();
        if !self.item(name)?.cycles.contains_key(&cycle) {
            let mut expect_seq = Vec::with_capacity(n);
            for d in 0..n {
                let p = self.store.properties(&ItemState::blob(name, d)).await?;
                expect_seq.push(p.sequence_number);
            }
            let it = self.item_mut(name)?;
            let logs = std::mem::take(&mut it.pending);
            it.cycles.insert(cycle, Cycle { logs, expect_seq });
        }
        let c = &self.item(name)?.cycles[&cycle];
        let reports = (0..n)
            .map(|d| {
                let mine = c.logs.iter().filter(|l| l.disk == d);
                lifeboat_replication::LogReport {
                    disk: d,
                    log_bytes: mine.clone().map(|l| l.logged_bytes).sum(),
                    closed_cleanly: mine.clone().all(|l| l.clean),
                    write_guid_matches: mine.clone().all(|l| l.guid_ok),
                }
            })
            .collect();
        Ok(Outcome::Logs(reports))
    }

    async fn apply_cycle(&mut self, name: &str, cycle: u64) -> Result<()> {
        let Some(c) = self.item(name)?.cycles.get(&cycle).cloned() else {
            return Ok(()); // applied and removed before a crash
        };
        for (d, &expect) in c.expect_seq.iter().enumerate() {
            let paths: Vec<&Path> = c
                .logs
                .iter()
                .filter(|l| l.disk == d)
                .map(|l| l.path.as_path())
                .collect();
            if paths.is_empty() {
                continue;
            }
            // Batch i of the cycle is fenced on sequence number expect + i: a crash resumes
            // at the first batch the blob has not taken.
            let chain = disk::LogChain::open(&paths, LOG_BATCH_BYTES)?;
            let blob = ItemState::blob(name, d);
            let size = self.item(name)?.sizes[d];
            let seq = self.store.properties(&blob).await?.sequence_number;
            if seq < expect {
                bail!(
                    "replica {blob} is at sequence number {seq}, before cycle {cycle} ({expect})"
                );
            }
            let (mut sent, mut requests, mut batches) = (0, 0, 0);
            for i in (seq - expect) as usize..chain.len() {
                let changes = chain.changes(i)?;
                let edges =
                    EdgePages::fetch(&*self.store, &blob, &disk::edge_pages(&changes), size)
                        .await?;
                if let Some(r) = self
                    .write_batch(name, d, changes, Some(&edges), Some(expect + i as u64))
                    .await?
                {
                    sent += r.bytes_sent;
                    requests += r.put_requests;
                    batches += 1;
                }
            }
            if !self.quiet && requests > 0 {
                eprintln!(
                    "{name} disk {d}: cycle {cycle} applied, {sent} bytes in {requests} requests, {batches} batch(es)"
                );
            }
        }
        let it = self.item_mut(name)?;
        if let Some(c) = it.cycles.remove(&cycle) {
            it.trash.extend(c.logs.into_iter().map(|l| l.path));
        }
        Ok(())
    }

    /// The digests of `blob` as of sequence number `seq`: kept in memory between batches
    /// (loading them reads the whole digests blob), reloaded or rebuilt when they do not
    /// describe `seq`. Taken out of the cache; `write_batch` puts them back.
    async fn take_digests(
        &self,
        blob: &str,
        len: u64,
        bs: BlockSize,
        seq: u64,
    ) -> Result<ReplicaDigests> {
        let cached = self.digests.lock().expect("not poisoned").remove(blob);
        Ok(match cached {
            Some(d) if d.sequence_number() == seq => d,
            _ => match ReplicaDigests::load(&*self.store, blob).await? {
                Some(d) => d,
                None => ReplicaDigests::rebuild(&*self.store, blob, len, bs).await?,
            },
        })
    }

    async fn resync_disk(&mut self, name: &str, d: usize) -> Result<()> {
        let it = self.item(name)?;
        let (path, size, bs) = (it.disks[d].clone(), it.sizes[d], it.block_size);
        let blob = ItemState::blob(name, d);
        let seq = self.store.properties(&blob).await?.sequence_number;
        let digests = self
            .take_digests(&blob, size, BlockSize::new(bs)?, seq)
            .await?;
        let file = disk::open_disk(&path, size)?;
        let bar = self.bar(name, d, size, "resync compare");
        let delta = {
            let bar = bar.clone();
            let bsz = u64::from(bs);
            lifeboat_resync::diff_with(
                Side::Local(&file),
                Side::Signature(digests.signature()),
                DiffOptions::default(),
                move |p| {
                    bar.set_position((p.blocks_done * bsz).min(size));
                    ControlFlow::Continue(())
                },
            )?
        };
        // The batches below start from these digests (no second load).
        self.digests
            .lock()
            .expect("not poisoned")
            .insert(blob, digests);
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
                            data: disk::read_at(&file, at, n)?,
                        });
                        batch_bytes += n;
                        report.bytes_sent += n;
                        at += n;
                        if batch_bytes >= BATCH_BYTES {
                            self.write_batch(name, d, std::mem::take(&mut batch), None, None)
                                .await?;
                            batch_bytes = 0;
                        }
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.write_batch(name, d, batch, None, None).await?;
        }
        let it = self.item_mut(name)?;
        it.last_resync.resize(it.disks.len(), SyncReport::default());
        it.last_resync[d] = report;
        Ok(())
    }

    async fn create_point(&mut self, name: &str, point: PointId) -> Result<()> {
        let n = self.item(name)?.disks.len();
        loop {
            let have = self.item(name)?.points.get(&point.0).map_or(0, Vec::len);
            if have >= n {
                return Ok(());
            }
            let snap = self
                .store
                .snapshot(&ItemState::blob(name, have), Condition::NONE)
                .await?;
            self.item_mut(name)?
                .points
                .entry(point.0)
                .or_default()
                .push(snap);
            // Each snapshot is recorded before the next is taken: a crash leaves none
            // behind unrecorded.
            self.save()?;
        }
    }

    async fn materialize(&mut self, name: &str, point: PointId, purpose: Purpose) -> Result<()> {
        let it = self.item(name)?.clone();
        let snaps = it
            .points
            .get(&point.0)
            .ok_or_else(|| anyhow!("recovery point {} has no snapshots", point.0))?;
        let (export, tag) = match purpose {
            Purpose::Test => (&it.test_export, "test"),
            Purpose::Failover => (&it.failover_export, "failover"),
        };
        let mut out = Vec::new();
        if let Some(dir) = &export.dir {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        for (d, snap) in snaps.iter().enumerate() {
            let blob = ItemState::blob(name, d);
            let len = if export.vhd {
                vhd::blob_size(it.sizes[d])
            } else {
                it.sizes[d]
            };
            let file = export.dir.as_ref().map(|dir| {
                dir.join(format!(
                    "disk{d}.{}",
                    if export.vhd { "vhd" } else { "raw" }
                ))
            });
            if self.azure {
                let dest = format!("{name}.{tag}.disk{d}");
                match self.store.delete(&dest, Condition::NONE).await {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.store.copy_snapshot(&blob, snap, &dest).await?;
                if let Some(f) = &file {
                    disk::export(&*self.store, &dest, None, len, f).await?;
                }
                out.push(Location::Blob {
                    name: dest,
                    download: file,
                });
            } else {
                let f = file.ok_or_else(|| anyhow!("the local site needs an output directory"))?;
                disk::export(&*self.store, &blob, Some(snap), len, &f).await?;
                out.push(Location::File { path: f });
            }
        }
        let it = self.item_mut(name)?;
        match purpose {
            Purpose::Test => it.test_disks = out,
            Purpose::Failover => it.recovered = out,
        }
        Ok(())
    }

    async fn remove_location(&self, l: &Location) -> Result<()> {
        match l {
            Location::File { path, .. } => match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            },
            Location::Blob { name, download } => {
                if let Some(p) = download {
                    let _ = fs::remove_file(p);
                }
                match self.store.delete(name, Condition::NONE).await {
                    Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    fn protect_source(&mut self, name: &str) -> Result<()> {
        let it = self.item(name)?.clone();
        let dir = self.site.join("protective").join(name);
        fs::create_dir_all(&dir)?;
        let mut copies = Vec::new();
        for (d, (to, &len)) in it.failback_to.iter().zip(&it.sizes).enumerate() {
            if !to.exists() {
                // An alternate disk that does not exist yet: an empty one of the size.
                let f = File::create(to).with_context(|| format!("creating {}", to.display()))?;
                f.set_len(len)?;
                f.sync_all()?;
            }
            disk::open_disk(to, len)?;
            let copy = dir.join(format!("disk{d}.raw"));
            if !copy.exists() {
                disk::copy_file(to, &copy)?;
            }
            copies.push(copy);
        }
        let it = self.item_mut(name)?;
        it.protective = copies;
        it.last_sync_back.clear();
        Ok(())
    }

    async fn sync_back(&mut self, name: &str, full: bool) -> Result<()> {
        let it = self.item(name)?.clone();
        let mut reports = Vec::new();
        for (d, (from, to)) in it.recovered.iter().zip(&it.failback_to).enumerate() {
            let len = it.sizes[d];
            let (from, to) = (from.clone(), to.clone());
            let store = self.store.clone();
            let handle = tokio::runtime::Handle::current();
            let report = tokio::task::spawn_blocking(move || -> Result<SyncReport> {
                let src: Box<dyn BlockSource + Send> = match &from {
                    Location::File { path, .. } => Box::new(
                        File::open(path).with_context(|| format!("opening {}", path.display()))?,
                    ),
                    Location::Blob { name, .. } => Box::new(BlobSource {
                        store,
                        blob: name.clone(),
                        len,
                        handle,
                    }),
                };
                let src = TakeSource { inner: &*src, len };
                let mut target = disk::open_disk(&to, len)?;
                // Full: compared with nothing, every block is sent (zero blocks cleared),
                // without hashing the source or reading the target.
                let delta = if full {
                    lifeboat_resync::diff(Side::Local(&src), Side::Bytes(&[]))?
                } else {
                    lifeboat_resync::diff(Side::Local(&src), Side::Local(&target))?
                };
                let stats = lifeboat_resync::apply(&delta, &src, &mut target)?;
                target.sync_all()?;
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
        let it = self.item_mut(name)?;
        it.last_sync_back
            .resize(reports.len(), SyncReport::default());
        for (acc, r) in it.last_sync_back.iter_mut().zip(reports) {
            acc.blocks_compared += r.blocks_compared;
            acc.bytes_sent += r.bytes_sent;
            acc.bytes_cleared += r.bytes_cleared;
        }
        Ok(())
    }

    /// Accepts closed logs for an item: checks each (disk, chain, size, not seen before)
    /// and stages a copy in the site. Returns how many were new.
    pub(crate) fn stage_logs(&mut self, name: &str, logs: &[(usize, PathBuf)]) -> Result<usize> {
        let it = self.item(name)?.clone();
        let mut fresh = 0;
        let mut planned = it.tracking.clone();
        let mut staged = Vec::new();
        for (d, path) in logs {
            let d = *d;
            let t = planned.get_mut(d).ok_or_else(|| {
                anyhow!(
                    "{name} has {} disk(s); there is no disk {d}",
                    it.disks.len()
                )
            })?;
            let log = disk::read_log(path)?;
            let id = state::hex(&log.unique_id);
            if t.seen.contains(&id) {
                if !self.quiet {
                    eprintln!("{}: log {id} was taken before; skipped", path.display());
                }
                continue;
            }
            if log.disk_end > it.sizes[d] {
                bail!(
                    "{}: writes reach byte {} but disk {d} is {} bytes",
                    path.display(),
                    log.disk_end,
                    it.sizes[d]
                );
            }
            if t.last_log != [0; 16] && log.previous_id != t.last_log {
                bail!(
                    "{}: log {id} follows {} but the last log of disk {d} is {} (out of chain order)",
                    path.display(),
                    state::hex(&log.previous_id),
                    state::hex(&t.last_log)
                );
            }
            let guid_ok = log.write_guid == [0; 16] || log.write_guid == t.write_guid;
            let dest = self
                .site
                .join("logs")
                .join(name)
                .join(format!("disk{d}-{id}.hrl"));
            disk::copy_file_to(path, &dest)?;
            t.seen.insert(id);
            t.last_log = log.unique_id;
            staged.push(state::StagedLog {
                disk: d,
                path: dest,
                logged_bytes: log.logged_bytes,
                clean: log.clean,
                guid_ok,
            });
            fresh += 1;
        }
        let it = self.item_mut(name)?;
        it.tracking = planned;
        it.pending.extend(staged);
        Ok(fresh)
    }
}

/// Runs a recovery plan's script hook with `sh -c`; a non-zero exit fails the plan.
async fn run_hook(plan: &str, group: usize, pre: bool, hook: &str) -> Result<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(hook)
        .env("LIFEBOAT_PLAN", plan)
        .env("LIFEBOAT_GROUP", (group + 1).to_string())
        .env("LIFEBOAT_PHASE", if pre { "pre" } else { "post" })
        .status()
        .await
        .with_context(|| format!("running hook {hook:?}"))?;
    if !status.success() {
        bail!("hook {hook:?} exited with {status}");
    }
    Ok(())
}

/// A source limited to its first `len` bytes (a VHD file's footer is not disk data).
struct TakeSource<'a> {
    inner: &'a (dyn BlockSource + Send),
    len: u64,
}

impl BlockSource for TakeSource<'_> {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.inner.read_exact_at(buf, offset)
    }
}
