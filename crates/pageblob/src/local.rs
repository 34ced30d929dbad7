//! `LocalStore`: page blobs as sparse files in a directory, with copy-on-write snapshots,
//! documents and leases; safe to share between processes.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use journal::{Position, Record};
use lifeboat_source::{LINE, line_pad};
use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::store::{
    Condition, Doc, ETag, Expect, LeaseId, LeaseState, MAX_PUT, Metadata, PageStore, Properties,
    check_blob_name, check_pages, check_size, crc64, meeting, merge_ranges, subtract, unless_panic,
};

mod journal;

/// The embedded default store: one directory per blob under a root (a `/` in a blob name
/// is `%` in the directory's), holding
///
/// - `data`: a page blob's bytes, a sparse file;
/// - `snap-<id>`: a snapshot's copy-on-write pages: before the first change to a page after
///   a snapshot, the page's old bytes are copied here, so taking a snapshot copies nothing;
/// - `state.json`: size, sequence number, metadata, lease, entity tag, allocated ranges and
///   snapshots (a document's bytes too), replaced atomically (write, fsync, rename, fsync
///   the directory) at each sync point;
/// - `journal`: what page writes, clears and copy-on-write copies changed since then, one
///   checksummed line appended per change (replayed onto `state.json` when read; a line
///   torn by a power loss ends the replay), so a page write costs a line, not a rewrite
///   of the whole range list.
///
/// Durability: a snapshot's preserved pages, and the journal line that lists them, are on
/// disk before the page is overwritten (two fsyncs per first change of pages after a
/// snapshot); documents, leases, snapshots, metadata and sequence numbers are durable when
/// the call returns. Page writes become durable (data fsynced, then the state that lists
/// them) at the next *sync point*: `snapshot`, `set_sequence_number`, `set_metadata`,
/// `resize`, or [`LocalStore::sync`]. The [`PageWriter`](crate::PageWriter) ends every batch with a
/// sequence-number update, so a crash loses at most the batch in flight, which is
/// replayed. A failed flush of the data file (the kernel reports it to one fsync only,
/// and may have dropped the pages) makes every sync point of the blob, and every read of
/// those pages, fail until the pages written since the last sync point are written or
/// cleared again (listed in the journal, so a process opening the store later knows).
///
/// It checks what Azure checks: 512-byte alignment, the 4 MiB body cap, the CRC-64,
/// sequence-number conditions, leases, entity tags, snapshot isolation. Every operation
/// holds the store's lock file (`.lock`, an OS file lock), so processes sharing a store
/// see each operation whole, as they would a service's; but a read of a blob itself (not
/// of a snapshot) holds it only to check the read and open the data file, so writes to
/// other pages proceed meanwhile: a read racing a write to the same pages may see part of
/// each, as a file's reader would. Pages never written, or cleared, read as zeros without
/// the data file being read.
#[derive(Clone, Debug)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// The store's lock file: held (in-process by the mutex, across processes by the OS
    /// lock) for the whole of every operation.
    lock: Mutex<File>,
    /// Seeds entity tags (with a per-process random key).
    etags: AtomicU64,
    keys: RandomState,
    /// Whether anything is fsynced (always, but in simulations).
    fsync: bool,
    /// Data-file fsyncs at sync points (what a sync point costs most; tests count them).
    data_syncs: AtomicU64,
    /// Per blob directory, the state last read or written, with the stamp of the
    /// `state.json` it came from and its place in the journal: a load that finds the same
    /// stamp replays only what was appended to the journal since (parsing the state was
    /// most of a small page write's cost). Checked against the files on every load, so
    /// another process's writes are always seen.
    cache: Mutex<HashMap<PathBuf, Cached>>,
    /// Page writes not yet flushed, and whether a flush runs (see `write_behind`).
    behind: Arc<Behind>,
}

/// The write-behind of page writes: bytes written since the last flush began, whether
/// one runs, how many began, and the data files whose flush failed (the failure is
/// reported by their next sync point: the kernel reports a writeback error to one fsync
/// only, and a background flush may be the one); then, per data file, the pages a failed
/// flush may have lost, until they are written again.
#[derive(Debug, Default)]
struct Behind {
    dirty: AtomicU64,
    flushing: AtomicBool,
    started: AtomicU64,
    failed: Mutex<Vec<(PathBuf, String)>>,
    lost: Mutex<HashMap<PathBuf, Lost>>,
}

/// Pages of a data file whose writes may not be on disk (a flush failed after they were
/// written, and the kernel may have dropped them): every sync point of the blob fails
/// until they are written (or cleared) again.
#[derive(Debug)]
struct Lost {
    reason: String,
    ranges: Vec<Range<u64>>,
}

impl Lost {
    /// The error of a sync point, or a read, that meets lost pages of `path`.
    fn error(&self, path: &Path) -> StoreError {
        let bytes: u64 = self.ranges.iter().map(|r| r.end - r.start).sum();
        io_err(path)(io::Error::other(format!(
            "flushing page writes failed ({}): {bytes} bytes in {} range(s) written since \
             the last sync point, the first at {}, may not be on disk; write them again",
            self.reason,
            self.ranges.len(),
            self.ranges.first().map_or(0, |r| r.start),
        )))
    }
}

impl Behind {
    /// A failure of a background flush of `path`, if one is not yet reported.
    fn take_failure(&self, path: &Path) -> Option<String> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let k = failed.iter().position(|(p, _)| p == path)?;
        Some(failed.swap_remove(k).1)
    }

    fn lost(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Lost>> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes `ranges` of `path` as lost by a failed flush.
    fn lose(&self, path: &Path, ranges: Vec<Range<u64>>, reason: String) {
        let mut lost = self.lost();
        let e = lost.entry(path.to_owned()).or_insert(Lost {
            reason: String::new(),
            ranges: Vec::new(),
        });
        e.reason = reason;
        e.ranges.extend(ranges);
        e.ranges = merge_ranges(std::mem::take(&mut e.ranges));
    }

    /// `ranges` of `path` were written (or cleared) again: no longer lost.
    fn rewritten(&self, path: &Path, ranges: &[Range<u64>]) {
        let mut lost = self.lost();
        let Some(e) = lost.get_mut(path) else {
            return;
        };
        for r in ranges {
            e.ranges = e
                .ranges
                .iter()
                .flat_map(|l| subtract(l, std::slice::from_ref(r)))
                .collect();
        }
        if e.ranges.is_empty() {
            lost.remove(path);
        }
    }
}

/// Bytes of page writes after which the data file is flushed in the background.
const WRITE_BEHIND: u64 = 8 << 20;

/// Bytes of a page write handed to the kernel at a time: a 4 MiB write into the page
/// cache took 30-40 % more CPU time than the same bytes in 256 KiB or 512 KiB writes, and
/// more wall time (`protect` of the bench disk, 1 GiB with 546 MiB of data, alternating
/// runs: median CPU 1.05 s against 0.75 s; 1 MiB writes 0.91 s; ADR 0008). Without the
/// write-behind flush beside them, 4 MiB writes still cost 0.84 s against 0.67 s.
const WRITE_CHUNK: usize = 256 << 10;

/// A parsed state and the stamp of the `state.json` it was parsed from.
#[derive(Debug)]
struct Cached {
    stamp: Stamp,
    state: State,
}

/// What identifies a `state.json`'s content without reading all of it: its length and
/// its first bytes, which hold the generation and entity tag (every durable state has a
/// new generation; a blob deleted and made again, a new random entity tag). A file of
/// another layout is identified by all of its bytes.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    head: Vec<u8>,
}

/// How many leading bytes of `state.json` make its stamp.
const STAMP_HEAD: usize = 256;
/// How a `state.json` of this layout begins (generation, then entity tag).
const STAMP_PREFIX: &[u8] = b"{\"generation\":";

/// The store's lock, held; released on drop.
struct Locked<'a>(MutexGuard<'a, File>);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Kind {
    #[default]
    Page,
    Doc,
}

/// A blob's state. `generation` and `etag` come first: the head of the file identifies it
/// (see [`Stamp`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// Counts the durable state's versions.
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    etag: String,
    #[serde(default)]
    kind: Kind,
    size: u64,
    sequence_number: u64,
    metadata: Metadata,
    ranges: Vec<Range<u64>>,
    snapshots: Snaps,
    next_snapshot: u64,
    /// The lease holding the blob, if any.
    #[serde(default)]
    lease: Option<LeaseId>,
    /// A lease was broken (and none acquired since).
    #[serde(default)]
    broken: bool,
    /// A document's bytes, base64.
    #[serde(default)]
    doc: Option<String>,
    /// Pages a failed flush may have lost, as the journal lists them (never in a saved
    /// state: no sync point passes while there are any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    lost: Vec<Range<u64>>,
    /// How much of the blob's journal this state includes.
    #[serde(skip)]
    journal: Position,
}

impl State {
    fn lease_state(&self) -> LeaseState {
        match (self.lease, self.broken) {
            (Some(_), _) => LeaseState::Leased,
            (None, true) => LeaseState::Broken,
            (None, false) => LeaseState::Available,
        }
    }
}

/// A blob's snapshots, shared between the cached state and the copies loads hand out:
/// every page write loads the state, and copying each snapshot's range lists was most of
/// a scattered write's memory traffic. Written through (`DerefMut`), they are copied
/// first if shared: once per batch's copy-on-write, not per write.
#[derive(Clone, Debug, Default)]
struct Snaps(Arc<Vec<Snap>>);

impl std::ops::Deref for Snaps {
    type Target = Vec<Snap>;

    fn deref(&self) -> &Vec<Snap> {
        &self.0
    }
}

impl std::ops::DerefMut for Snaps {
    fn deref_mut(&mut self) -> &mut Vec<Snap> {
        Arc::make_mut(&mut self.0)
    }
}

impl Serialize for Snaps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Snaps {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Snap>::deserialize(d).map(|v| Snaps(Arc::new(v)))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Snap {
    id: String,
    size: u64,
    /// Allocated ranges when the snapshot was taken.
    ranges: Vec<Range<u64>>,
    /// Pages whose pre-change bytes this snapshot's file holds.
    preserved: Vec<Range<u64>>,
    /// The blob's sequence number and metadata when the snapshot was taken.
    #[serde(default)]
    sequence_number: u64,
    #[serde(default)]
    metadata: Metadata,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl LocalStore {
    /// A store rooted at `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(root.into(), true)
    }

    /// A store that never fsyncs: for tests and simulations, whose crashes are of the
    /// process (a crash of the machine may lose what it wrote).
    pub fn open_unsynced(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(root.into(), false)
    }

    fn open_with(root: PathBuf, fsync: bool) -> Result<Self, StoreError> {
        private_dir(&root).map_err(io_err(&root))?;
        let lock_path = root.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        Ok(LocalStore {
            inner: Arc::new(Inner {
                root,
                lock: Mutex::new(lock),
                etags: AtomicU64::new(0),
                keys: RandomState::new(),
                fsync,
                data_syncs: AtomicU64::new(0),
                cache: Mutex::new(HashMap::new()),
                behind: Arc::default(),
            }),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The file holding `blob`'s current bytes (for tools such as `qemu-img`).
    pub fn data_path(&self, blob: &str) -> Result<PathBuf, StoreError> {
        Ok(self.inner.dir(blob)?.join("data"))
    }

    /// Fault injection (feature `testing`): the next sync point of `blob` finds that a
    /// flush of its data file failed, as a failed background flush is reported, so the
    /// pages written since its last sync point count as lost until written again.
    #[cfg(feature = "testing")]
    pub fn fail_flush(&self, blob: &str) -> Result<(), StoreError> {
        let data = self.data_path(blob)?;
        let b = &self.inner.behind;
        b.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((data, "injected flush failure".into()));
        Ok(())
    }

    /// Makes every write so far durable (a sync point).
    pub async fn sync(&self, blob: &str) -> Result<(), StoreError> {
        self.run(blob, |inner, blob| {
            let _g = inner.guard()?;
            let mut st = inner.load(blob)?;
            inner.save(blob, &mut st)
        })
        .await
    }

    async fn run<T: Send + 'static>(
        &self,
        blob: &str,
        f: impl FnOnce(&Inner, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        let blob = blob.to_owned();
        match tokio::task::spawn_blocking(move || f(&inner, &blob)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Io {
                path: self.inner.root.display().to_string(),
                source: io::Error::other(format!("store task cancelled: {}", unless_panic(e))),
            }),
        }
    }
}

impl Inner {
    /// Takes the store's lock (this process's mutex, then the OS lock shared with other
    /// processes).
    fn guard(&self) -> Result<Locked<'_>, StoreError> {
        let f = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        f.lock().map_err(io_err(&self.root))?;
        Ok(Locked(f))
    }

    fn dir(&self, blob: &str) -> Result<PathBuf, StoreError> {
        check_blob_name(blob)?;
        let name = blob.replace('/', "%");
        if name.len() > 255 {
            return Err(StoreError::BadName {
                name: blob.to_owned(),
                why: "too long for the local store (255 bytes at most)",
            });
        }
        Ok(self.root.join(name))
    }

    fn new_etag(&self) -> String {
        let mut h = self.keys.build_hasher();
        h.write_u64(self.etags.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        format!("\"0x{:016X}\"", h.finish())
    }

    fn load(&self, blob: &str) -> Result<State, StoreError> {
        let dir = self.dir(blob)?;
        let path = dir.join("state.json");
        let (mut file, stamp) = match read_stamp(&path) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    what: blob.to_owned(),
                });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let jpath = dir.join("journal");
        let jlen = match fs::metadata(&jpath) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&jpath)(e)),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get_mut(&dir)
            && c.stamp == stamp
        {
            let at = c.state.journal.end;
            if jlen == at && !c.state.journal.dirty {
                return Ok(c.state.clone());
            }
            // Another process appended: replay what is new (a journal that was emptied or
            // begun afresh is read whole, below).
            if at > 0 && jlen > at {
                let mut tail = vec![0u8; (jlen - at) as usize];
                File::open(&jpath)
                    .and_then(|f| f.read_exact_at(&mut tail, at))
                    .map_err(io_err(&jpath))?;
                let pos = journal::replay_tail(&mut c.state, &tail);
                c.state.journal = Position {
                    end: at + pos.end,
                    dirty: pos.dirty,
                };
                return Ok(c.state.clone());
            }
        }
        let mut bytes = stamp.head.clone();
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let mut st: State = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let jbytes = match fs::read(&jpath) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&jpath)(e)),
        };
        st.journal = journal::replay_all(&mut st, &jbytes);
        let state = st.clone();
        cache.insert(dir, Cached { stamp, state });
        Ok(st)
    }

    /// Loads a page blob (a document is not one).
    fn load_page(&self, blob: &str) -> Result<State, StoreError> {
        let st = self.load(blob)?;
        if st.kind != Kind::Page {
            return Err(StoreError::WrongKind {
                name: blob.to_owned(),
                expected: "page blob",
            });
        }
        Ok(st)
    }

    /// Before a sync point, outside the lock: fsyncs the blob's data file, so the sync
    /// point's own fsync (under the lock, which it still makes) finds little left to
    /// write, and reads and writes meanwhile do not wait for the disk. Only ever an extra
    /// fsync; its failure fails the sync point (the kernel reports a writeback error once).
    fn preflush(&self, blob: &str) -> Result<(), StoreError> {
        if !self.fsync {
            return Ok(());
        }
        let data = self.dir(blob)?.join("data");
        let Ok(f) = File::open(&data) else {
            // No such blob, or a document: the sync point says so under the lock.
            return Ok(());
        };
        f.sync_data().map_err(|e| {
            // Reported to this fsync only: the sync point under the lock must hear of it.
            let mut failed = self.behind.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.push((data.clone(), e.to_string()));
            io_err(&data)(e)
        })
    }

    /// The pages of data file `path` a failed flush may have lost (this process's record,
    /// and `listed`, the state's from the journal), with the error that names them.
    fn lost_error(
        &self,
        path: &Path,
        listed: &[Range<u64>],
    ) -> Option<(StoreError, Vec<Range<u64>>)> {
        let mem = self.behind.lost();
        let known = mem.get(path);
        if listed.is_empty() && known.is_none() {
            return None;
        }
        let mut ranges = listed.to_vec();
        ranges.extend(known.iter().flat_map(|k| k.ranges.iter().cloned()));
        let lost = Lost {
            reason: known.map_or_else(
                || "listed in the journal by an earlier process".to_owned(),
                |k| k.reason.clone(),
            ),
            ranges: merge_ranges(ranges),
        };
        Some((lost.error(path), lost.ranges))
    }

    /// A sync point: replaces the state durably, with a new entity tag.
    fn save(&self, blob: &str, st: &mut State) -> Result<(), StoreError> {
        st.etag = self.new_etag();
        self.replace_state(blob, st, false)
    }

    /// [`save`](Self::save) after changing the data file other than through the journal
    /// (made, resized, filled): its fsync is not left to the journal's say.
    fn save_data(&self, blob: &str, st: &mut State) -> Result<(), StoreError> {
        st.etag = self.new_etag();
        self.replace_state(blob, st, true)
    }

    /// Replaces the state durably as it is (lease changes keep the entity tag, as on
    /// Azure): fsyncs the data file (the pages the state lists) if it changed since the
    /// last state (the journal lists a change, or `data_changed`), writes `state.json`
    /// atomically and durably, then empties the journal it now includes. A crash before
    /// the journal is emptied leaves it naming the previous state: void.
    fn replace_state(
        &self,
        blob: &str,
        st: &mut State,
        data_changed: bool,
    ) -> Result<(), StoreError> {
        let dir = self.dir(blob)?;
        let data = dir.join("data");
        // Every page write and clear appends a journal line: none since the last state
        // means the data file holds nothing that state does not (a metadata or
        // sequence-number update between batches fsyncs only the state).
        let mut failure = None;
        if self.fsync
            && st.kind == Kind::Page
            && (data_changed || st.journal.end > 0)
            && let Ok(f) = File::open(&data)
        {
            match f.sync_all() {
                Ok(()) => {
                    self.data_syncs.fetch_add(1, Ordering::Relaxed);
                    self.behind.dirty.store(0, Ordering::Relaxed);
                }
                Err(e) => failure = Some(e.to_string()),
            }
        }
        if let Some(e) = self.behind.take_failure(&data) {
            failure = Some(e);
        }
        if let Some(reason) = failure {
            // What the journal lists since the last sync point may be gone from the
            // disk though the page cache still shows it; a retry's fsync would succeed
            // (the kernel reports the error once): those pages must be written again.
            let jpath = dir.join("journal");
            let jbytes = fs::read(&jpath).unwrap_or_default();
            let end = (st.journal.end as usize).min(jbytes.len());
            let changed = journal::changed(&jbytes[..end]);
            if changed.is_empty() {
                // A change made whole (made, resized, filled): retried whole by its caller.
                return Err(io_err(&data)(io::Error::other(format!(
                    "flushing page writes failed: {reason}"
                ))));
            }
            self.behind.lose(&data, changed.clone(), reason);
            // Listed durably too, so that a process opening the store later does not
            // trust those pages either (if this append fails, this process still knows).
            // On the state as it stands, not `st` (changed by the caller, not saved).
            if let Ok(mut now) = self.load(blob) {
                let recs = changed.into_iter().map(|range| Record::Lost { range });
                let _ = self.append(blob, &mut now, recs, true);
            }
        }
        if let Some(e) = self.lost_error(&data, &st.lost) {
            return Err(e.0);
        }
        st.generation += 1;
        let bytes = serde_json::to_vec(&*st).map_err(|e| StoreError::Corrupt {
            path: dir.join("state.json").display().to_string(),
            reason: format!("the state does not serialise: {e}"),
        })?;
        write_atomic(&dir, "state.json", &bytes, self.fsync)?;
        if st.journal != Position::default() {
            let jpath = dir.join("journal");
            match OpenOptions::new().write(true).open(&jpath) {
                Ok(f) => f.set_len(0).map_err(io_err(&jpath))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&jpath)(e)),
            }
            st.journal = Position::default();
        }
        // The file now holds `bytes`: what the next load will find, unless another process
        // writes first (then the stamp differs and the files are read).
        let stamp = Stamp::of(&bytes);
        let state = st.clone();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir, Cached { stamp, state });
        Ok(())
    }

    /// Applies changes to `st` and appends them to the blob's journal in one write;
    /// `durable` fsyncs the journal (what it lists is then on disk: these lines and every
    /// one before them).
    fn append(
        &self,
        blob: &str,
        st: &mut State,
        recs: impl IntoIterator<Item = Record>,
        durable: bool,
    ) -> Result<(), StoreError> {
        let dir = self.dir(blob)?;
        let jpath = dir.join("journal");
        let mut line = Vec::new();
        if st.journal.end == 0 {
            line = journal::header(st);
        }
        for rec in recs {
            journal::apply(st, &rec);
            line.extend(journal::encode(&rec));
        }
        let f = match OpenOptions::new().write(true).open(&jpath) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Made once per blob (emptied, not removed, at sync points): its name is
                // made durable with it.
                let f = private_file(&jpath).map_err(io_err(&jpath))?;
                if self.fsync {
                    File::open(&dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io_err(&dir))?;
                }
                f
            }
            Err(e) => return Err(io_err(&jpath)(e)),
        };
        let at = st.journal.end;
        if st.journal.dirty || at == 0 {
            f.set_len(at).map_err(io_err(&jpath))?;
        }
        f.write_all_at(&line, at).map_err(io_err(&jpath))?;
        if durable && self.fsync {
            f.sync_data().map_err(io_err(&jpath))?;
        }
        st.journal = Position {
            end: at + line.len() as u64,
            dirty: false,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get_mut(&dir) {
            c.state = st.clone();
        }
        Ok(())
    }

    fn data(&self, blob: &str) -> Result<(File, PathBuf), StoreError> {
        let path = self.dir(blob)?.join("data");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok((f, path))
    }

    /// Refuses a write that does not carry the lease holding the blob, or carries one
    /// where none holds it (as Azure does).
    fn check_lease(st: &State, blob: &str, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match (st.lease, lease) {
            (Some(held), Some(given)) if held == given => Ok(()),
            (Some(_), _) => Err(StoreError::Leased {
                blob: blob.to_owned(),
            }),
            (None, Some(_)) => Err(StoreError::NotLeased {
                blob: blob.to_owned(),
            }),
            (None, None) => Ok(()),
        }
    }

    fn check_condition(st: &State, blob: &str, c: Condition) -> Result<(), StoreError> {
        Self::check_lease(st, blob, c.lease)?;
        match c.sequence_number_eq {
            Some(expected) if expected != st.sequence_number => Err(StoreError::ConditionFailed {
                expected,
                found: st.sequence_number,
            }),
            _ => Ok(()),
        }
    }

    fn create_locked(
        &self,
        blob: &str,
        size: u64,
        seq: u64,
        md: &Metadata,
    ) -> Result<(), StoreError> {
        check_size(size)?;
        let dir = self.dir(blob)?;
        if dir.join("state.json").exists() {
            return Err(StoreError::AlreadyExists {
                blob: blob.to_owned(),
            });
        }
        // A crash before the state was written left files behind: start afresh.
        let _ = fs::remove_dir_all(&dir);
        self.behind.lost().remove(&dir.join("data"));
        private_dir(&dir).map_err(io_err(&dir))?;
        let data = dir.join("data");
        let f = private_file(&data).map_err(io_err(&data))?;
        f.set_len(size).map_err(io_err(&data))?;
        let mut st = State {
            size,
            sequence_number: seq,
            metadata: md.clone(),
            ..State::default()
        };
        self.save_data(blob, &mut st)
    }

    /// Copies the current bytes of `ranges` into the newest snapshot's file, for the pages
    /// it has not preserved yet, and records them durably (one fsync of the copies, one of
    /// the journal, however many ranges).
    fn preserve(
        &self,
        blob: &str,
        st: &mut State,
        ranges: &[Range<u64>],
    ) -> Result<(), StoreError> {
        // Read-only until there is something to preserve (a write must not copy the
        // shared snapshot list).
        let Some(snap) = st.snapshots.last() else {
            return Ok(());
        };
        let missing: Vec<Range<u64>> = ranges
            .iter()
            .flat_map(|r| subtract(&(r.start..r.end.min(snap.size)), &snap.preserved))
            .collect();
        let missing = merge_ranges(missing);
        if missing.is_empty() {
            return Ok(());
        }
        // Pages the snapshot holds no data for (never written or cleared when it was
        // taken) read as zeros: the snapshot's sparse file already holds them as a hole.
        let copy: Vec<Range<u64>> = missing
            .iter()
            .flat_map(|m| intersect(&snap.ranges, m))
            .collect();
        if !copy.is_empty() {
            self.copy_out(blob, &snap.id, &copy)?;
        }
        // The copies are on disk; the journal lines that list them must be too before
        // the pages change.
        let id = snap.id.clone();
        let recs = missing.into_iter().map(|range| Record::Preserve {
            range,
            snapshot: id.clone(),
        });
        self.append(blob, st, recs, true)
    }

    /// Copies the current bytes of `ranges` into snapshot `id`'s file, durably.
    fn copy_out(&self, blob: &str, id: &str, ranges: &[Range<u64>]) -> Result<(), StoreError> {
        let dir = self.dir(blob)?;
        let (data, data_path) = self.data(blob)?;
        let snap_path = dir.join(format!("snap-{id}"));
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&snap_path)
            .map_err(io_err(&snap_path))?;
        // As large as the largest piece to copy (a 4 MiB zeroed buffer per small write
        // was most of a scattered write's system time: page faults); made only if needed.
        let largest = ranges.iter().map(|r| r.end - r.start).max().unwrap_or(0);
        let mut buf = Vec::new();
        for r in ranges {
            let mut at = r.start;
            // In the kernel where it can (nothing copied through this process; a reflink
            // where the file system shares extents); it stops at the data file's end.
            while at < r.end {
                let (mut from, mut to) = (at, at);
                let n = (r.end - at).min(MAX_PUT) as usize;
                match rustix::fs::copy_file_range(&data, Some(&mut from), &out, Some(&mut to), n) {
                    Ok(done) if done > 0 => at += done as u64,
                    // The data file's end (the rest reads as zeros), or no such copy here
                    // (a real I/O error shows again below).
                    _ => break,
                }
            }
            if at < r.end && buf.is_empty() {
                buf = vec![0u8; largest.min(MAX_PUT) as usize];
            }
            while at < r.end {
                let n = (r.end - at).min(MAX_PUT) as usize;
                read_zero_past_end(&data, &mut buf[..n], at, &data_path)?;
                out.write_all_at(&buf[..n], at)
                    .map_err(io_err(&snap_path))?;
                at += n as u64;
            }
        }
        if self.fsync {
            out.sync_data().map_err(io_err(&snap_path))?;
        }
        Ok(())
    }

    fn write_pages(
        &self,
        blob: &str,
        offset: u64,
        data: &[u8],
        crc: Option<u64>,
        c: Condition,
    ) -> Result<(), StoreError> {
        self.write_many(blob, &[(offset, data, crc)], c)
    }

    /// Page writes (offset, bytes, CRC-64 if checked) under one lock, one state load, one
    /// open of the data file and one journal append: none is written unless all pass the
    /// checks.
    fn write_many(
        &self,
        blob: &str,
        writes: &[(u64, &[u8], Option<u64>)],
        c: Condition,
    ) -> Result<(), StoreError> {
        // Checked before the lock: writers to other blobs (or other requests of this
        // one) proceed meanwhile.
        for &(_, data, crc) in writes {
            let Some(crc) = crc else { continue };
            let actual = crc64(data);
            if actual != crc {
                return Err(StoreError::ChecksumMismatch {
                    sent: crc,
                    actual: Some(actual),
                });
            }
        }
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        for &(offset, data, _) in writes {
            check_pages(offset, data.len() as u64, st.size, MAX_PUT)?;
        }
        Self::check_condition(&st, blob, c)?;
        if writes.is_empty() {
            // Nothing to list: a journal line would make the next sync point fsync.
            return Ok(());
        }
        // Touching writes are listed as one range (one journal line).
        let ranges = merge_ranges(
            writes
                .iter()
                .map(|&(offset, data, _)| offset..offset + data.len() as u64)
                .collect(),
        );
        self.preserve(blob, &mut st, &ranges)?;
        let (f, path) = self.data(blob)?;
        for &(offset, data, _) in writes {
            for (i, chunk) in data.chunks(WRITE_CHUNK).enumerate() {
                f.write_all_at(chunk, offset + (i * WRITE_CHUNK) as u64)
                    .map_err(io_err(&path))?;
            }
        }
        // Listed without an fsync of the data: the next sync point makes both durable.
        let total = writes.iter().map(|w| w.1.len() as u64).sum();
        let ranges_written = ranges.clone();
        let recs: Vec<Record> = ranges
            .into_iter()
            .map(|range| Record::Write {
                range,
                etag: self.new_etag(),
            })
            .collect();
        self.append(blob, &mut st, recs, false)?;
        self.behind.rewritten(&path, &ranges_written);
        self.write_behind(f, path, total);
        Ok(())
    }

    /// Counts bytes written since the last flush (a sync point's or a background one's
    /// start; one count for the store); past [`WRITE_BEHIND`], starts
    /// flushing the data file on another thread (at most one at a time), so the sync
    /// point's fsync finds less to write: the disk works while the batch is still sent.
    /// Only ever an extra fsync: what is durable, and when, is as before.
    fn write_behind(&self, f: File, path: PathBuf, len: u64) {
        if !self.fsync {
            return;
        }
        let b = &self.behind;
        let dirty = b.dirty.fetch_add(len, Ordering::Relaxed) + len;
        if dirty < WRITE_BEHIND || b.flushing.swap(true, Ordering::Acquire) {
            return;
        }
        b.dirty.store(0, Ordering::Relaxed);
        b.started.fetch_add(1, Ordering::Relaxed);
        let b = b.clone();
        std::thread::spawn(move || {
            // Held while flushing: a sync point waits for it before asking whether a
            // flush failed (this flush may have consumed an error its own fsync misses).
            let mut failed = b.failed.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.sync_data() {
                failed.push((path, e.to_string()));
            }
            b.flushing.store(false, Ordering::Release);
        });
    }

    fn clear_pages(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        check_pages(offset, len, st.size, u64::MAX)?;
        Self::check_condition(&st, blob, c)?;
        self.preserve(blob, &mut st, std::slice::from_ref(&(offset..offset + len)))?;
        let (f, path) = self.data(blob)?;
        zero_range(&f, offset, len, &path)?;
        let (range, etag) = (offset..offset + len, self.new_etag());
        self.append(blob, &mut st, [Record::Clear { range, etag }], false)?;
        self.behind
            .rewritten(&path, std::slice::from_ref(&(offset..offset + len)));
        Ok(())
    }

    fn prepare_overwrite(
        &self,
        blob: &str,
        ranges: &[Range<u64>],
        c: Condition,
    ) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        Self::check_condition(&st, blob, c)?;
        for r in ranges {
            check_pages(r.start, r.end - r.start, st.size, u64::MAX)?;
        }
        self.preserve(blob, &mut st, ranges)
    }

    fn snapshot_index(st: &State, blob: &str, id: &str) -> Result<usize, StoreError> {
        st.snapshots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| StoreError::NotFound {
                what: format!("{blob}@{id}"),
            })
    }

    /// Reads each of `reads` (offset, length) of the blob or of snapshot `snapshot` (one
    /// state load, one open of the data file).
    fn read_locked(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        reads: &[(u64, u64)],
    ) -> Result<Vec<Bytes>, StoreError> {
        let st = self.load_page(blob)?;
        let (from, size) = match snapshot {
            Some(id) => {
                let k = Self::snapshot_index(&st, blob, id)?;
                (k, st.snapshots[k].size)
            }
            None => (st.snapshots.len(), st.size),
        };
        check_reads(reads, size)?;
        let (data, path) = self.data(blob)?;
        let dir = self.dir(blob)?;
        let file_len = data.metadata().map_err(io_err(&path))?.len();
        let mut out = Vec::with_capacity(reads.len());
        for &(offset, len) in reads {
            let want = &(offset..offset + len);
            let mut raw = vec![0u8; len as usize + LINE];
            let pad = line_pad(raw.as_ptr(), offset);
            let buf = &mut raw[pad..pad + len as usize];
            read_file(&data, file_len, buf, offset, &path)?;
            // Overlay preserved pages, newest snapshot first, so the nearest one wins.
            for snap in st.snapshots[from..].iter().rev() {
                let spath = dir.join(format!("snap-{}", snap.id));
                for r in intersect(&snap.preserved, want) {
                    let at = (r.start - offset) as usize;
                    read_preserved(
                        &spath,
                        &mut buf[at..at + (r.end - r.start) as usize],
                        r.start,
                    )?;
                }
            }
            out.push(Bytes::from(raw).slice(pad..pad + len as usize));
        }
        Ok(out)
    }

    /// Reads of the blob itself (not of a snapshot): the lock is held to check them
    /// against its state and to open its data file, not while the bytes are read, so page
    /// writes to other bytes proceed meanwhile (a read racing a write to the same bytes
    /// may see part of each, as a file's reader does).
    fn read_current(&self, blob: &str, reads: &[(u64, u64)]) -> Result<Vec<Bytes>, StoreError> {
        // What each read finds allocated (the rest reads as zeros without reading the
        // file: no page cache filled with a hole's zeros).
        let (data, path, allocated) = {
            let _g = self.guard()?;
            let st = self.load_page(blob)?;
            check_reads(reads, st.size)?;
            let allocated: Vec<Vec<Range<u64>>> = reads
                .iter()
                .map(|&(o, l)| intersect(&st.ranges, &(o..o + l)))
                .collect();
            let (data, path) = self.data(blob)?;
            // What the page cache shows of lost pages may not be what the disk holds.
            if let Some(e) = self.lost_error(&path, &st.lost)
                && reads
                    .iter()
                    .any(|&(o, l)| !meeting(&e.1, &(o..o + l)).is_empty())
            {
                return Err(e.0);
            }
            (data, path, allocated)
        };
        let mut file = &data;
        reads
            .iter()
            .zip(allocated)
            .map(|(&(offset, len), allocated)| {
                // Read into memory not zeroed first; only what is not allocated is (or
                // lies past the data file's end). Placed as the bytes lie in the file's
                // pages: the kernel copies them 3x faster so.
                let mut buf = Vec::with_capacity(len as usize + LINE);
                let pad = line_pad(buf.as_ptr(), offset);
                for r in allocated {
                    buf.resize(pad + (r.start - offset) as usize, 0);
                    file.seek(SeekFrom::Start(r.start))
                        .and_then(|_| (&mut file).take(r.end - r.start).read_to_end(&mut buf))
                        .map_err(io_err(&path))?;
                }
                buf.resize(pad + len as usize, 0);
                Ok(Bytes::from(buf).slice(pad..))
            })
            .collect()
    }

    fn snapshot(&self, blob: &str, c: Condition) -> Result<String, StoreError> {
        self.preflush(blob)?;
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        // As on Azure, a snapshot needs no lease id, but a wrong one is refused.
        if c.lease.is_some() {
            Self::check_lease(&st, blob, c.lease)?;
        }
        let id = format!("{:08}", st.next_snapshot);
        st.next_snapshot += 1;
        st.snapshots.push(Snap {
            id: id.clone(),
            size: st.size,
            ranges: st.ranges.clone(),
            preserved: Vec::new(),
            sequence_number: st.sequence_number,
            metadata: st.metadata.clone(),
        });
        self.save(blob, &mut st)?;
        Ok(id)
    }

    fn delete_snapshot(&self, blob: &str, id: &str) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        let k = Self::snapshot_index(&st, blob, id)?;
        let dir = self.dir(blob)?;
        let path = dir.join(format!("snap-{id}"));
        if k > 0 {
            // The older snapshot still needs pages only this one preserved.
            let (older, this) = st.snapshots.split_at_mut(k);
            let prev = &mut older[k - 1];
            let prev_path = dir.join(format!("snap-{}", prev.id));
            let mut moved = Vec::new();
            for r in &this[0].preserved {
                for m in subtract(&(r.start..r.end.min(prev.size)), &prev.preserved) {
                    let mut buf = vec![0u8; (m.end - m.start) as usize];
                    read_preserved(&path, &mut buf, m.start)?;
                    OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .mode(0o600)
                        .open(&prev_path)
                        .and_then(|f| {
                            f.write_all_at(&buf, m.start)?;
                            if self.fsync { f.sync_all() } else { Ok(()) }
                        })
                        .map_err(io_err(&prev_path))?;
                    moved.push(m);
                }
            }
            prev.preserved.extend(moved);
            prev.preserved = merge_ranges(std::mem::take(&mut prev.preserved));
        }
        st.snapshots.remove(k);
        self.save(blob, &mut st)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    fn diff_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        prev: &str,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let _g = self.guard()?;
        let st = self.load_page(blob)?;
        let p = Self::snapshot_index(&st, blob, prev)?;
        let s = match snapshot {
            Some(id) => Self::snapshot_index(&st, blob, id)?,
            None => st.snapshots.len(),
        };
        if s < p {
            return Err(StoreError::SnapshotOrder {
                prev: prev.to_owned(),
                snapshot: snapshot.unwrap_or("current").to_owned(),
            });
        }
        let mut out: Vec<Range<u64>> = st.snapshots[p..s]
            .iter()
            .flat_map(|x| x.preserved.clone())
            .collect();
        // A size change is a change of everything past the smaller size.
        let (a, b) = (
            st.snapshots[p].size,
            if s < st.snapshots.len() {
                st.snapshots[s].size
            } else {
                st.size
            },
        );
        if a != b {
            out.push(a.min(b)..a.max(b));
        }
        Ok(merge_ranges(out))
    }

    fn set_sequence_number(&self, blob: &str, seq: u64, c: Condition) -> Result<(), StoreError> {
        self.preflush(blob)?;
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        Self::check_condition(&st, blob, c)?;
        st.sequence_number = seq;
        self.save(blob, &mut st)
    }

    fn set_metadata(&self, blob: &str, md: &Metadata, c: Condition) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load(blob)?;
        Self::check_lease(&st, blob, c.lease)?;
        st.metadata = md.clone();
        self.save(blob, &mut st)
    }

    fn resize(&self, blob: &str, size: u64, c: Condition) -> Result<(), StoreError> {
        check_size(size)?;
        let _g = self.guard()?;
        let mut st = self.load_page(blob)?;
        Self::check_lease(&st, blob, c.lease)?;
        let old = st.size;
        if size < old {
            self.preserve(blob, &mut st, std::slice::from_ref(&(size..old)))?;
            journal::cut_range(&mut st.ranges, &(size..old));
        }
        let (f, path) = self.data(blob)?;
        f.set_len(size).map_err(io_err(&path))?;
        st.size = size;
        self.save_data(blob, &mut st)
    }

    fn copy_snapshot(&self, blob: &str, id: &str, dest: &str) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let st = self.load_page(blob)?;
        let k = Self::snapshot_index(&st, blob, id)?;
        let (size, ranges) = (st.snapshots[k].size, st.snapshots[k].ranges.clone());
        self.create_locked(dest, size, 0, &Metadata::new())?;
        let (out, out_path) = self.data(dest)?;
        for r in &ranges {
            let mut at = r.start;
            while at < r.end {
                let n = (r.end - at).min(MAX_PUT);
                let buf = self
                    .read_locked(blob, Some(id), &[(at, n)])?
                    .pop()
                    .unwrap_or_default();
                out.write_all_at(&buf, at).map_err(io_err(&out_path))?;
                at += n;
            }
        }
        let mut st = self.load_page(dest)?;
        st.ranges = ranges;
        self.save_data(dest, &mut st)
    }

    fn delete(&self, blob: &str, c: Condition) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let st = self.load(blob)?;
        Self::check_lease(&st, blob, c.lease)?;
        let dir = self.dir(blob)?;
        // Remove the state first: a crash part-way leaves no half-visible blob.
        let state = dir.join("state.json");
        fs::remove_file(&state).map_err(io_err(&state))?;
        // Its cached state goes with it (a service deletes and makes many test disks).
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&dir);
        self.behind.lost().remove(&dir.join("data"));
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let _g = self.guard()?;
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let e = e.map_err(io_err(&self.root))?;
            let Some(name) = e.file_name().to_str().map(|n| n.replace('%', "/")) else {
                continue;
            };
            if name.starts_with(prefix)
                && check_blob_name(&name).is_ok()
                && e.path().join("state.json").exists()
            {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    fn acquire_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load(blob)?;
        match st.lease {
            Some(held) if held == lease => Ok(()),
            Some(_) => Err(StoreError::Leased {
                blob: blob.to_owned(),
            }),
            None => {
                st.lease = Some(lease);
                st.broken = false;
                self.replace_state(blob, &mut st, false)
            }
        }
    }

    fn break_lease(&self, blob: &str) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load(blob)?;
        if st.lease.take().is_some() {
            st.broken = true;
            self.replace_state(blob, &mut st, false)?;
        }
        Ok(())
    }

    fn release_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        let _g = self.guard()?;
        let mut st = self.load(blob)?;
        match st.lease {
            Some(held) if held == lease => {
                st.lease = None;
                self.replace_state(blob, &mut st, false)
            }
            Some(_) => Err(StoreError::Leased {
                blob: blob.to_owned(),
            }),
            None => Err(StoreError::NotLeased {
                blob: blob.to_owned(),
            }),
        }
    }

    fn get_doc(&self, name: &str) -> Result<Option<Doc>, StoreError> {
        let _g = self.guard()?;
        let st = match self.load(name) {
            Ok(st) => st,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let text = st.doc.as_deref().ok_or_else(|| StoreError::WrongKind {
            name: name.to_owned(),
            expected: "document",
        })?;
        let data = B64.decode(text).map_err(|e| StoreError::Corrupt {
            path: name.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Some(Doc {
            data: Bytes::from(data),
            etag: ETag(st.etag),
        }))
    }

    fn put_doc(
        &self,
        name: &str,
        data: &[u8],
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<ETag, StoreError> {
        let _g = self.guard()?;
        let changed = || StoreError::Changed {
            blob: name.to_owned(),
        };
        let mut st = match (self.load(name), &expect) {
            (Ok(_), Expect::Absent) => return Err(changed()),
            (Ok(st), Expect::Version(v)) if st.etag != v.0 => return Err(changed()),
            (Ok(st), Expect::Version(_)) => {
                if st.kind != Kind::Doc {
                    return Err(StoreError::WrongKind {
                        name: name.to_owned(),
                        expected: "document",
                    });
                }
                Self::check_lease(&st, name, lease)?;
                st
            }
            (Err(StoreError::NotFound { .. }), Expect::Version(_)) => return Err(changed()),
            (Err(StoreError::NotFound { .. }), Expect::Absent) => {
                let dir = self.dir(name)?;
                let _ = fs::remove_dir_all(&dir);
                private_dir(&dir).map_err(io_err(&dir))?;
                State {
                    kind: Kind::Doc,
                    ..State::default()
                }
            }
            (Err(e), _) => return Err(e),
        };
        st.size = data.len() as u64;
        st.doc = Some(B64.encode(data));
        self.save(name, &mut st)?;
        Ok(ETag(st.etag))
    }
}

/// Replaces `dir/name` with `bytes` atomically (a temporary file renamed over it); `fsync`
/// makes it durable (the file before the rename, the directory after).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], fsync: bool) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = private_file(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    if fsync {
        f.sync_all().map_err(io_err(&tmp))?;
    }
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    if fsync {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// Opens `state.json` and reads its stamp (the file is left positioned after the bytes
/// read, for whoever reads the rest).
fn read_stamp(path: &Path) -> io::Result<(File, Stamp)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut head = Vec::with_capacity(STAMP_HEAD);
    (&mut f).take(STAMP_HEAD as u64).read_to_end(&mut head)?;
    if !head.starts_with(STAMP_PREFIX) {
        // Another layout: all of it identifies it.
        f.read_to_end(&mut head)?;
    }
    Ok((f, Stamp { len, head }))
}

impl Stamp {
    /// The stamp of a state file holding `bytes`.
    fn of(bytes: &[u8]) -> Stamp {
        let head = if bytes.starts_with(STAMP_PREFIX) {
            &bytes[..bytes.len().min(STAMP_HEAD)]
        } else {
            bytes
        };
        Stamp {
            len: bytes.len() as u64,
            head: head.to_vec(),
        }
    }
}

/// Creates (or truncates) a file only its owner can read: replicas are the machine's data.
fn private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates a directory (and its parents) only its owner can enter.
fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Reads at `offset`; bytes past the file's end read as zeros.
fn read_zero_past_end(
    f: &File,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
) -> Result<(), StoreError> {
    let len = f.metadata().map_err(io_err(path))?.len();
    read_file(f, len, buf, offset, path)
}

/// Reads `buf.len()` bytes at `offset` of a file `len` bytes long: zeros past its end.
fn read_file(
    f: &File,
    len: u64,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
) -> Result<(), StoreError> {
    // Only what lies past the end is zeroed (zeroing all first doubled a large read's
    // memory traffic).
    let n = (len.saturating_sub(offset) as usize).min(buf.len());
    f.read_exact_at(&mut buf[..n], offset)
        .map_err(io_err(path))?;
    buf[n..].fill(0);
    Ok(())
}

/// Refuses reads that pass the end of a blob (or snapshot) of `size` bytes.
fn check_reads(reads: &[(u64, u64)], size: u64) -> Result<(), StoreError> {
    match reads
        .iter()
        .find(|(o, l)| o.checked_add(*l).is_none_or(|e| e > size))
    {
        Some(&(offset, len)) => Err(StoreError::OutOfRange { offset, len, size }),
        None => Ok(()),
    }
}

/// Reads preserved pages from a snapshot's file: pages preserved without a copy (they were
/// zeros) are holes, or past the file's end, or the file was never made: all read as zeros.
fn read_preserved(path: &Path, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
    match File::open(path) {
        Ok(f) => read_zero_past_end(&f, buf, offset, path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            buf.fill(0);
            Ok(())
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Makes `len` bytes at `offset` read as zeros: a hole punched in the file where the file
/// system can (no disk space used, nothing written), else zeros written.
fn zero_range(f: &File, offset: u64, len: u64, path: &Path) -> Result<(), StoreError> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{FallocateFlags, fallocate};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match fallocate(f, flags, offset, len) {
            Ok(()) => return Ok(()),
            // Not supported by this file system: write the zeros.
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(io_err(path)(io::Error::from(e))),
        }
    }
    write_zeros(f, offset, len, path)
}

fn write_zeros(f: &File, offset: u64, len: u64, path: &Path) -> Result<(), StoreError> {
    let zeros = vec![0u8; len.min(MAX_PUT) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(MAX_PUT) as usize;
        f.write_all_at(&zeros[..n], at).map_err(io_err(path))?;
        at += n as u64;
    }
    Ok(())
}

/// The parts of `ranges` inside `want`.
fn intersect(ranges: &[Range<u64>], want: &Range<u64>) -> Vec<Range<u64>> {
    meeting(ranges, want)
        .iter()
        .map(|r| r.start.max(want.start)..r.end.min(want.end))
        .filter(|r| r.start < r.end)
        .collect()
}

#[async_trait]
impl PageStore for LocalStore {
    async fn create(
        &self,
        blob: &str,
        size: u64,
        sequence_number: u64,
        metadata: &Metadata,
    ) -> Result<(), StoreError> {
        let md = metadata.clone();
        self.run(blob, move |i, b| {
            let _g = i.guard()?;
            i.create_locked(b, size, sequence_number, &md)
        })
        .await
    }

    async fn properties(&self, blob: &str) -> Result<Properties, StoreError> {
        self.run(blob, |i, b| {
            let _g = i.guard()?;
            let st = i.load(b)?;
            Ok(Properties {
                size: st.size,
                sequence_number: st.sequence_number,
                lease: st.lease_state(),
                etag: ETag(st.etag),
                metadata: st.metadata,
            })
        })
        .await
    }

    async fn write_pages(
        &self,
        blob: &str,
        offset: u64,
        data: Bytes,
        crc64: Option<u64>,
        condition: Condition,
    ) -> Result<(), StoreError> {
        self.run(blob, move |i, b| {
            i.write_pages(b, offset, &data, crc64, condition)
        })
        .await
    }

    /// None: the bytes are handed over in this process (a CRC given is still checked).
    fn content_crc64(&self, _data: &[u8]) -> Option<u64> {
        None
    }

    fn write_group_bytes(&self) -> u64 {
        // Two 4 MiB requests, or a hundred and more small ones: per write, the lock, the
        // state's stamp, the files' opens and a journal append were half its cost; a
        // batch still makes a few groups, so the writer's requests in flight overlap
        // their checksums with another's writes.
        8 << 20
    }

    async fn write_pages_many(
        &self,
        blob: &str,
        writes: &[(u64, Bytes, Option<u64>)],
        condition: Condition,
    ) -> Result<(), StoreError> {
        let writes = writes.to_vec();
        self.run(blob, move |i, b| {
            let borrowed: Vec<(u64, &[u8], Option<u64>)> =
                writes.iter().map(|(o, d, c)| (*o, &d[..], *c)).collect();
            i.write_many(b, &borrowed, condition)
        })
        .await
    }

    async fn clear_pages(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        condition: Condition,
    ) -> Result<(), StoreError> {
        self.run(blob, move |i, b| i.clear_pages(b, offset, len, condition))
            .await
    }

    async fn prepare_overwrite(
        &self,
        blob: &str,
        ranges: &[Range<u64>],
        condition: Condition,
    ) -> Result<(), StoreError> {
        let ranges = ranges.to_vec();
        self.run(blob, move |i, b| i.prepare_overwrite(b, &ranges, condition))
            .await
    }

    async fn read(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let snap = snapshot.map(str::to_owned);
        self.run(blob, move |i, b| {
            let mut one = match snap {
                Some(id) => {
                    let _g = i.guard()?;
                    i.read_locked(b, Some(&id), &[(offset, len)])?
                }
                None => i.read_current(b, &[(offset, len)])?,
            };
            Ok(one.pop().unwrap_or_default())
        })
        .await
    }

    async fn read_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, StoreError> {
        let snap = snapshot.map(str::to_owned);
        let reads: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| (r.start, r.end.saturating_sub(r.start)))
            .collect();
        self.run(blob, move |i, b| match snap {
            Some(id) => {
                let _g = i.guard()?;
                i.read_locked(b, Some(&id), &reads)
            }
            None => i.read_current(b, &reads),
        })
        .await
    }

    async fn page_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let snap = snapshot.map(str::to_owned);
        self.run(blob, move |i, b| {
            let _g = i.guard()?;
            let st = i.load_page(b)?;
            match snap {
                Some(id) => Ok(st.snapshots[Inner::snapshot_index(&st, b, &id)?]
                    .ranges
                    .clone()),
                None => Ok(st.ranges),
            }
        })
        .await
    }

    async fn diff_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        prev: &str,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let (snap, prev) = (snapshot.map(str::to_owned), prev.to_owned());
        self.run(blob, move |i, b| i.diff_ranges(b, snap.as_deref(), &prev))
            .await
    }

    async fn snapshot(&self, blob: &str, condition: Condition) -> Result<String, StoreError> {
        self.run(blob, move |i, b| i.snapshot(b, condition)).await
    }

    async fn snapshots(&self, blob: &str) -> Result<Vec<String>, StoreError> {
        self.run(blob, |i, b| {
            let _g = i.guard()?;
            Ok(i.load_page(b)?
                .snapshots
                .iter()
                .map(|s| s.id.clone())
                .collect())
        })
        .await
    }

    async fn snapshot_properties(
        &self,
        blob: &str,
        snapshot: &str,
    ) -> Result<Properties, StoreError> {
        let id = snapshot.to_owned();
        self.run(blob, move |i, b| {
            let _g = i.guard()?;
            let st = i.load_page(b)?;
            let snap = &st.snapshots[Inner::snapshot_index(&st, b, &id)?];
            Ok(Properties {
                size: snap.size,
                sequence_number: snap.sequence_number,
                metadata: snap.metadata.clone(),
                lease: LeaseState::Available,
                etag: ETag(format!("\"{}@{}\"", st.etag.trim_matches('"'), snap.id)),
            })
        })
        .await
    }

    async fn delete_snapshot(&self, blob: &str, snapshot: &str) -> Result<(), StoreError> {
        let id = snapshot.to_owned();
        self.run(blob, move |i, b| i.delete_snapshot(b, &id)).await
    }

    async fn copy_snapshot(
        &self,
        blob: &str,
        snapshot: &str,
        dest: &str,
    ) -> Result<(), StoreError> {
        let (id, dest) = (snapshot.to_owned(), dest.to_owned());
        self.run(blob, move |i, b| i.copy_snapshot(b, &id, &dest))
            .await
    }

    async fn set_sequence_number(
        &self,
        blob: &str,
        sequence_number: u64,
        condition: Condition,
    ) -> Result<(), StoreError> {
        self.run(blob, move |i, b| {
            i.set_sequence_number(b, sequence_number, condition)
        })
        .await
    }

    async fn set_metadata(
        &self,
        blob: &str,
        metadata: &Metadata,
        condition: Condition,
    ) -> Result<(), StoreError> {
        let md = metadata.clone();
        self.run(blob, move |i, b| i.set_metadata(b, &md, condition))
            .await
    }

    async fn resize(&self, blob: &str, size: u64, condition: Condition) -> Result<(), StoreError> {
        self.run(blob, move |i, b| i.resize(b, size, condition))
            .await
    }

    async fn delete(&self, blob: &str, condition: Condition) -> Result<(), StoreError> {
        self.run(blob, move |i, b| i.delete(b, condition)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.run(prefix, |i, p| i.list(p)).await
    }

    async fn acquire_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        self.run(blob, move |i, b| i.acquire_lease(b, lease)).await
    }

    async fn break_lease(&self, blob: &str) -> Result<(), StoreError> {
        self.run(blob, |i, b| i.break_lease(b)).await
    }

    async fn release_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        self.run(blob, move |i, b| i.release_lease(b, lease)).await
    }

    async fn get_doc(&self, name: &str) -> Result<Option<Doc>, StoreError> {
        self.run(name, |i, b| i.get_doc(b)).await
    }

    async fn put_doc(
        &self,
        name: &str,
        data: Bytes,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<ETag, StoreError> {
        self.run(name, move |i, b| i.put_doc(b, &data, expect, lease))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syncs(s: &LocalStore) -> u64 {
        s.inner.data_syncs.load(Ordering::Relaxed)
    }

    /// Page writes past `WRITE_BEHIND` start one background flush (not one per write);
    /// a flush that failed fails that blob's sync points (no other blob's) until the pages
    /// written since its last sync point are written again: a retried sync point's fsync
    /// would succeed though the kernel may have dropped them.
    #[test]
    fn write_behind_flushes_in_the_background_and_reports_a_failed_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let s = &store.inner;
        let none = Condition::NONE;
        let started = || s.behind.started.load(Ordering::Relaxed);
        s.create_locked("a", 16 << 20, 0, &Metadata::new()).unwrap();
        s.create_locked("b", 1 << 20, 0, &Metadata::new()).unwrap();
        let chunk = vec![5u8; 1 << 20];
        for k in 0..WRITE_BEHIND / (1 << 20) - 1 {
            s.write_pages("a", k << 20, &chunk, Some(crc64(&chunk)), none)
                .unwrap();
        }
        assert_eq!(started(), 0, "under the threshold");
        s.write_pages("a", 15 << 20, &chunk, Some(crc64(&chunk)), none)
            .unwrap();
        assert_eq!(started(), 1, "the threshold starts one flush");
        // A failure as the flush thread records it.
        let data_a = s.dir("a").unwrap().join("data");
        s.behind
            .failed
            .lock()
            .unwrap()
            .push((data_a, "injected".into()));
        s.set_sequence_number("b", 1, none).unwrap();
        let e = s.set_sequence_number("a", 1, none).unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        // Retried: still refused, naming what the journal lists since the last one
        // (0..7 MiB and 15..16 MiB).
        let e = s.set_sequence_number("a", 1, none).unwrap_err();
        assert!(e.to_string().contains("8388608 bytes in 2 range(s)"), "{e}");
        // Nor can they be read: the page cache may show what the disk does not hold.
        assert!(s.read_current("a", &[(15 << 20, 512)]).is_err());
        assert!(s.read_current("a", &[(8 << 20, 512)]).is_ok(), "not lost");
        // Written again in part (one page cleared, the rest of the first MiB written):
        // the rest is still missing.
        s.clear_pages("a", 0, 512, none).unwrap();
        s.write_pages("a", 512, &chunk[512..], Some(crc64(&chunk[512..])), none)
            .unwrap();
        let e = s.set_sequence_number("a", 1, none).unwrap_err();
        let (left, first) = (7u64 << 20, 1u64 << 20);
        let want = format!(
            "(injected): {left} bytes in 2 range(s) written since the last sync point, \
             the first at {first}, may not be on disk; write them again"
        );
        assert!(e.to_string().ends_with(&want), "{e}");
        assert_eq!(
            s.load_page("a").unwrap().sequence_number,
            0,
            "the sequence number did not move"
        );
        // A process opening the store now (this one's memory gone) knows of it too: the
        // journal lists the pages lost.
        let later = LocalStore::open(dir.path()).unwrap();
        let l = &later.inner;
        let e = l.set_sequence_number("a", 1, none).unwrap_err();
        assert!(e.to_string().contains("by an earlier process"), "{e}");
        assert!(e.to_string().contains(&format!("{left} bytes")), "{e}");
        assert!(l.read_current("a", &[(15 << 20, 512)]).is_err());
        for k in (1..7u64).chain([15]) {
            l.write_pages("a", k << 20, &chunk, Some(crc64(&chunk)), none)
                .unwrap();
        }
        l.set_sequence_number("a", 1, none).unwrap();
        assert_eq!(l.load_page("a").unwrap().sequence_number, 1);
        assert!(l.read_current("a", &[(15 << 20, 512)]).is_ok());
        // The first process reads the new state (its own memory of the loss stays until
        // it writes those pages itself: stricter, never looser).
        assert_eq!(s.load_page("a").unwrap().sequence_number, 1);
    }

    /// A sync point fsyncs the data file only when it changed since the last one: a
    /// sequence-number or metadata update between batches costs the state's fsyncs alone.
    #[test]
    fn sync_points_fsync_the_data_only_after_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let s = &store.inner;
        let none = Condition::NONE;
        s.create_locked("b", 1 << 20, 0, &Metadata::new()).unwrap();
        assert_eq!(syncs(&store), 1, "a new data file is made durable");
        s.set_sequence_number("b", 1, none).unwrap();
        s.set_metadata("b", &Metadata::new(), none).unwrap();
        s.snapshot("b", none).unwrap();
        s.write_many("b", &[], none).unwrap();
        s.set_sequence_number("b", 2, none).unwrap();
        assert_eq!(syncs(&store), 1, "nothing was written");
        let page = [7u8; 512];
        s.write_pages("b", 4096, &page, Some(crc64(&page)), none)
            .unwrap();
        s.set_sequence_number("b", 2, none).unwrap();
        assert_eq!(syncs(&store), 2, "a written page is made durable");
        s.set_metadata("b", &Metadata::new(), none).unwrap();
        assert_eq!(syncs(&store), 2);
        s.clear_pages("b", 0, 512, none).unwrap();
        s.set_metadata("b", &Metadata::new(), none).unwrap();
        assert_eq!(syncs(&store), 3, "a cleared page is made durable");
        s.resize("b", 2 << 20, none).unwrap();
        assert_eq!(syncs(&store), 4, "a resized data file is made durable");
        // What each sync point claims is there after a reopen.
        let again = LocalStore::open(dir.path()).unwrap();
        let again = &again.inner;
        let back = again
            .read_locked("b", None, &[(4096, 512)])
            .unwrap()
            .remove(0);
        assert_eq!(back[..], page[..]);
        assert_eq!(again.load_page("b").unwrap().sequence_number, 2);
    }
}
