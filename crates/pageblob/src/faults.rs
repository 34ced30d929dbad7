//! `FaultyStore`: a decorator that makes a real store fail on cue and records requests.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::StoreError;
use crate::store::{Condition, Doc, ETag, Expect, LeaseId, Metadata, PageStore, Properties};

/// A failure to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this HTTP status (500, 503, 412, 403, …) without calling the store.
    Status(u16),
    /// A timeout (recoverable), without calling the store.
    Timeout,
    /// A connection reset *after* the store applied the request: the caller cannot tell
    /// whether it landed (the hard case for exactly-once).
    ResetAfterApply,
    /// The local disk is full (non-recoverable until someone makes room), without calling
    /// the store.
    DiskFull,
    /// A page write's bytes changed on the way (one bit flipped), then handed to the store
    /// with the checksum sent: a store that checks it refuses the write, one given none
    /// takes the changed bytes. No effect on other requests (they carry no pages).
    Corrupt,
}

/// A kind of request, to plan faults for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Request {
    /// Create (a page blob).
    Create,
    /// Get Properties.
    Properties,
    /// Put Page.
    Put,
    /// Clear Pages.
    Clear,
    /// A ranged read.
    Read,
    /// Page ranges or a diff of them.
    Ranges,
    /// Snapshot Blob.
    Snapshot,
    /// List snapshots.
    Snapshots,
    /// Delete a snapshot.
    DeleteSnapshot,
    /// Copy a snapshot into a new blob.
    CopySnapshot,
    /// Set Sequence Number.
    SetSequenceNumber,
    /// Set Metadata.
    Metadata,
    /// Resize.
    Resize,
    /// Delete Blob.
    Delete,
    /// List blobs.
    List,
    /// Acquire, break or release a lease.
    Lease,
    /// Read a document.
    GetDoc,
    /// Write a document.
    PutDoc,
}

/// A request the decorator saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `"put"` or `"clear"`.
    pub kind: &'static str,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// A read the decorator saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRead {
    /// The blob read.
    pub blob: String,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// Writes to several blobs waiting for each other ([`FaultyStore::meet`]).
#[derive(Debug)]
struct Meeting {
    n: usize,
    within: Duration,
    select: fn(&str, u64) -> bool,
    blobs: BTreeSet<String>,
    arrived: tokio::sync::watch::Sender<usize>,
}

/// Wraps any [`PageStore`]: the Nth page request (writes and clears, counted from 1)
/// fails with the fault planned for it, and the next requests of a kind fail as planned
/// ([`FaultyStore::fail_next`]); every page request and every read is recorded, so tests
/// can check sizes and alignment of what was actually sent, and what was read.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    plan: Mutex<BTreeMap<u64, Fault>>,
    by_kind: Mutex<BTreeMap<Request, (u32, Fault)>>,
    /// Requests seen of each kind.
    tally: Mutex<BTreeMap<Request, u64>>,
    count: Mutex<u64>,
    seen: Mutex<Vec<Seen>>,
    reads: Mutex<Vec<SeenRead>>,
    prepared: Mutex<Vec<(String, Vec<Range<u64>>)>>,
    meeting: Mutex<Option<Meeting>>,
    /// Requests left before the caller "dies": every later one fails.
    lives: Mutex<Option<u64>>,
    /// What it reports as its `write_group_bytes`.
    group: Mutex<u64>,
    /// Whether it asks for page writes' checksums (its `content_crc64`) whatever `inner`
    /// asks.
    checksums: Mutex<bool>,
    /// How long each page request waits before it goes to `inner`.
    pace: Mutex<Duration>,
    /// Page requests under way now, and the most under way at once so far.
    out: Mutex<(usize, usize)>,
}

/// A page request under way, counted in [`FaultyStore::most_at_once`] until dropped.
struct Out<'a>(&'a Mutex<(usize, usize)>);

impl<'a> Out<'a> {
    fn start(m: &'a Mutex<(usize, usize)>) -> Self {
        let mut o = lock(m);
        o.0 += 1;
        o.1 = o.1.max(o.0);
        Out(m)
    }
}

impl Drop for Out<'_> {
    fn drop(&mut self) {
        lock(self.0).0 -= 1;
    }
}

impl<S> FaultyStore<S> {
    /// Wraps `inner` with no faults planned.
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            plan: Mutex::new(BTreeMap::new()),
            by_kind: Mutex::new(BTreeMap::new()),
            tally: Mutex::new(BTreeMap::new()),
            count: Mutex::new(0),
            seen: Mutex::new(Vec::new()),
            reads: Mutex::new(Vec::new()),
            prepared: Mutex::new(Vec::new()),
            meeting: Mutex::new(None),
            lives: Mutex::new(None),
            group: Mutex::new(0),
            checksums: Mutex::new(false),
            pace: Mutex::new(Duration::ZERO),
            out: Mutex::new((0, 0)),
        }
    }

    /// Makes each page request (write or clear) wait `d` before it goes to the store, so
    /// requests a caller has out at once are under way at once here
    /// ([`FaultyStore::most_at_once`]).
    pub fn pace(&self, d: Duration) {
        *lock(&self.pace) = d;
    }

    /// The most page requests (writes and clears) that were under way at once so far.
    pub fn most_at_once(&self) -> usize {
        lock(&self.out).1
    }

    /// Counts a page request under way and waits the planned pace.
    async fn start(&self) -> Out<'_> {
        let out = Out::start(&self.out);
        let pace = *lock(&self.pace);
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
        out
    }

    /// Reports `bytes` as its [`PageStore::write_group_bytes`], so a writer sends it
    /// page writes in groups (0, the default: one by one, as a remote store takes them).
    /// Each write of a group still passes through this store's `write_pages` (recorded,
    /// faults injected).
    pub fn group_writes(&self, bytes: u64) {
        *lock(&self.group) = bytes;
    }

    /// Asks for every page write's CRC-64 (its [`PageStore::content_crc64`]), as a remote
    /// store does, though `inner` is one the bytes never leave the process for (the
    /// embedded store: it checks a CRC given). With it, a [`Fault::Corrupt`] write is
    /// refused by `inner` as a service refuses one, and the caller's answer to that is
    /// what a test sees.
    pub fn checksum_writes(&self) {
        *lock(&self.checksums) = true;
    }

    /// A process crash, as the store sees it: the next `n` requests (of any kind) are
    /// served, every later one fails as if the caller were gone, until
    /// [`FaultyStore::revive`]. What the caller did before is all that lands.
    pub fn kill_after(&self, n: u64) {
        *lock(&self.lives) = Some(n);
    }

    /// Serves requests again (a new process).
    pub fn revive(&self) {
        *lock(&self.lives) = None;
    }

    /// Whether a [`FaultyStore::kill_after`] has taken effect.
    pub fn dead(&self) -> bool {
        *lock(&self.lives) == Some(0)
    }

    /// Makes page request number `n` (from 1) fail with `fault`.
    pub fn fail_nth(&self, n: u64, fault: Fault) {
        lock(&self.plan).insert(n, fault);
    }

    /// Makes the next `count` requests of kind `request` fail with `fault` (replacing what
    /// was planned for that kind; 0 clears it).
    pub fn fail_next(&self, request: Request, count: u32, fault: Fault) {
        let mut m = lock(&self.by_kind);
        if count == 0 {
            m.remove(&request);
        } else {
            m.insert(request, (count, fault));
        }
    }

    /// The page requests seen so far (including failed ones).
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// Page writes that `select` picks (by blob and offset) wait until such writes to `n`
    /// blobs are under way at once (shows that writers run concurrently); a write still
    /// waiting after `within` fails (HTTP 400, not retried). Once they met, writes go
    /// through.
    pub fn meet(&self, n: usize, within: Duration, select: fn(&str, u64) -> bool) {
        *lock(&self.meeting) = Some(Meeting {
            n,
            within,
            select,
            blobs: BTreeSet::new(),
            arrived: tokio::sync::watch::channel(0).0,
        });
    }

    /// Waits at the meeting, if one is planned for `blob`.
    async fn arrive(&self, blob: &str, offset: u64) -> Result<(), StoreError> {
        let (mut rx, n, within) = {
            let mut m = lock(&self.meeting);
            let Some(meet) = m.as_mut().filter(|m| (m.select)(blob, offset)) else {
                return Ok(());
            };
            meet.blobs.insert(blob.to_owned());
            meet.arrived.send_replace(meet.blobs.len());
            (meet.arrived.subscribe(), meet.n, meet.within)
        };
        let met = matches!(
            tokio::time::timeout(within, rx.wait_for(|&c| c >= n)).await,
            Ok(Ok(_))
        );
        match met {
            true => Ok(()),
            false => Err(StoreError::Http {
                status: 400,
                message: format!(
                    "injected: {} of {n} blobs were written at once",
                    *rx.borrow()
                ),
                retry_after: None,
            }),
        }
    }

    /// How many requests of kind `request` were seen so far (including failed ones).
    pub fn requests(&self, request: Request) -> u64 {
        lock(&self.tally).get(&request).copied().unwrap_or(0)
    }

    /// The reads seen so far (including failed ones).
    pub fn reads(&self) -> Vec<SeenRead> {
        lock(&self.reads).clone()
    }

    /// The overwrites announced so far ([`PageStore::prepare_overwrite`]): each blob with
    /// its ranges, in order.
    pub fn prepared(&self) -> Vec<(String, Vec<Range<u64>>)> {
        lock(&self.prepared).clone()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn next(&self, kind: &'static str, offset: u64, len: u64) -> Option<Fault> {
        lock(&self.seen).push(Seen { kind, offset, len });
        let mut c = lock(&self.count);
        *c += 1;
        lock(&self.plan).remove(&*c)
    }

    fn tally(&self, request: Request) {
        *lock(&self.tally).entry(request).or_insert(0) += 1;
    }

    /// Counts a request of kind `request` and takes the fault planned for it, if any.
    fn planned(&self, request: Request) -> Option<Fault> {
        self.tally(request);
        let mut m = lock(&self.by_kind);
        let (n, fault) = m.get_mut(&request)?;
        let fault = *fault;
        *n -= 1;
        if *n == 0 {
            m.remove(&request);
        }
        Some(fault)
    }

    /// Runs `op` under the fault planned for it, if any.
    async fn run<T>(
        &self,
        fault: Option<Fault>,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        {
            let mut lives = lock(&self.lives);
            match lives.as_mut() {
                Some(0) => {
                    return Err(StoreError::Io {
                        path: "injected".into(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the process died",
                        ),
                    });
                }
                Some(n) => *n -= 1,
                None => {}
            }
        }
        match fault {
            None | Some(Fault::Corrupt) => op.await,
            Some(Fault::ResetAfterApply) => {
                op.await?;
                Err(injected(Fault::ResetAfterApply))
            }
            Some(f) => Err(injected(f)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn injected(f: Fault) -> StoreError {
    match f {
        Fault::Status(status) => StoreError::Http {
            status,
            message: "injected fault".into(),
            retry_after: (status == 503).then_some(Duration::ZERO),
        },
        Fault::Timeout => StoreError::Io {
            path: "injected".into(),
            source: std::io::ErrorKind::TimedOut.into(),
        },
        Fault::ResetAfterApply => StoreError::Io {
            path: "injected".into(),
            source: std::io::ErrorKind::ConnectionReset.into(),
        },
        Fault::DiskFull => StoreError::Io {
            path: "injected".into(),
            source: std::io::ErrorKind::StorageFull.into(),
        },
        // Not answered so (the store answers a changed write); as a service refuses one.
        Fault::Corrupt => StoreError::Http {
            status: 400,
            message: "injected fault: changed on the way".into(),
            retry_after: None,
        },
    }
}

#[async_trait]
impl<S: PageStore> PageStore for FaultyStore<S> {
    async fn create(
        &self,
        blob: &str,
        size: u64,
        seq: u64,
        md: &Metadata,
    ) -> Result<(), StoreError> {
        let f = self.planned(Request::Create);
        self.run(f, self.inner.create(blob, size, seq, md)).await
    }

    async fn properties(&self, blob: &str) -> Result<Properties, StoreError> {
        let f = self.planned(Request::Properties);
        self.run(f, self.inner.properties(blob)).await
    }

    fn write_group_bytes(&self) -> u64 {
        *lock(&self.group)
    }

    fn content_crc64(&self, data: &[u8]) -> Option<u64> {
        if *lock(&self.checksums) {
            Some(crate::crc64(data))
        } else {
            self.inner.content_crc64(data)
        }
    }

    async fn write_pages(
        &self,
        blob: &str,
        offset: u64,
        data: Bytes,
        crc64: Option<u64>,
        c: Condition,
    ) -> Result<(), StoreError> {
        self.arrive(blob, offset).await?;
        let _out = self.start().await;
        // Counted, and a planned fault of the kind left for a later one, if the Nth fails.
        let f = match self.next("put", offset, data.len() as u64) {
            Some(f) => {
                self.tally(Request::Put);
                Some(f)
            }
            None => self.planned(Request::Put),
        };
        let data = match f {
            Some(Fault::Corrupt) => {
                let mut changed = data.to_vec();
                if let Some(b) = changed.first_mut() {
                    *b ^= 1;
                }
                Bytes::from(changed)
            }
            _ => data,
        };
        self.run(f, self.inner.write_pages(blob, offset, data, crc64, c))
            .await
    }

    async fn clear_pages(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        let _out = self.start().await;
        let f = match self.next("clear", offset, len) {
            Some(f) => {
                self.tally(Request::Clear);
                Some(f)
            }
            None => self.planned(Request::Clear),
        };
        self.run(f, self.inner.clear_pages(blob, offset, len, c))
            .await
    }

    async fn prepare_overwrite(
        &self,
        blob: &str,
        ranges: &[Range<u64>],
        c: Condition,
    ) -> Result<(), StoreError> {
        lock(&self.prepared).push((blob.to_owned(), ranges.to_vec()));
        self.inner.prepare_overwrite(blob, ranges, c).await
    }

    async fn read(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        lock(&self.reads).push(SeenRead {
            blob: blob.to_owned(),
            offset,
            len,
        });
        let f = self.planned(Request::Read);
        self.run(f, self.inner.read(blob, snapshot, offset, len))
            .await
    }

    async fn page_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let f = self.planned(Request::Ranges);
        self.run(f, self.inner.page_ranges(blob, snapshot)).await
    }

    async fn diff_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        prev: &str,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let f = self.planned(Request::Ranges);
        self.run(f, self.inner.diff_ranges(blob, snapshot, prev))
            .await
    }

    async fn snapshot(&self, blob: &str, c: Condition) -> Result<String, StoreError> {
        let f = self.planned(Request::Snapshot);
        self.run(f, self.inner.snapshot(blob, c)).await
    }

    async fn snapshots(&self, blob: &str) -> Result<Vec<String>, StoreError> {
        let f = self.planned(Request::Snapshots);
        self.run(f, self.inner.snapshots(blob)).await
    }

    async fn snapshot_properties(
        &self,
        blob: &str,
        snapshot: &str,
    ) -> Result<Properties, StoreError> {
        let f = self.planned(Request::Properties);
        self.run(f, self.inner.snapshot_properties(blob, snapshot))
            .await
    }

    async fn delete_snapshot(&self, blob: &str, snapshot: &str) -> Result<(), StoreError> {
        let f = self.planned(Request::DeleteSnapshot);
        self.run(f, self.inner.delete_snapshot(blob, snapshot))
            .await
    }

    async fn copy_snapshot(
        &self,
        blob: &str,
        snapshot: &str,
        dest: &str,
    ) -> Result<(), StoreError> {
        let f = self.planned(Request::CopySnapshot);
        self.run(f, self.inner.copy_snapshot(blob, snapshot, dest))
            .await
    }

    async fn set_sequence_number(
        &self,
        blob: &str,
        seq: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        let f = self.planned(Request::SetSequenceNumber);
        self.run(f, self.inner.set_sequence_number(blob, seq, c))
            .await
    }

    async fn set_metadata(
        &self,
        blob: &str,
        md: &Metadata,
        c: Condition,
    ) -> Result<(), StoreError> {
        let f = self.planned(Request::Metadata);
        self.run(f, self.inner.set_metadata(blob, md, c)).await
    }

    async fn resize(&self, blob: &str, size: u64, c: Condition) -> Result<(), StoreError> {
        let f = self.planned(Request::Resize);
        self.run(f, self.inner.resize(blob, size, c)).await
    }

    async fn delete(&self, blob: &str, c: Condition) -> Result<(), StoreError> {
        let f = self.planned(Request::Delete);
        self.run(f, self.inner.delete(blob, c)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let f = self.planned(Request::List);
        self.run(f, self.inner.list(prefix)).await
    }

    async fn acquire_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        let f = self.planned(Request::Lease);
        self.run(f, self.inner.acquire_lease(blob, lease)).await
    }

    async fn break_lease(&self, blob: &str) -> Result<(), StoreError> {
        let f = self.planned(Request::Lease);
        self.run(f, self.inner.break_lease(blob)).await
    }

    async fn release_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        let f = self.planned(Request::Lease);
        self.run(f, self.inner.release_lease(blob, lease)).await
    }

    async fn get_doc(&self, name: &str) -> Result<Option<Doc>, StoreError> {
        let f = self.planned(Request::GetDoc);
        self.run(f, self.inner.get_doc(name)).await
    }

    async fn put_doc(
        &self,
        name: &str,
        data: Bytes,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<ETag, StoreError> {
        let f = self.planned(Request::PutDoc);
        self.run(f, self.inner.put_doc(name, data, expect, lease))
            .await
    }
}
