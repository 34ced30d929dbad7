//! `FaultyStore`: a decorator that makes a real store fail on cue and records requests.

use std::collections::BTreeMap;
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

/// Wraps any [`PageStore`]: the Nth page request (writes and clears, counted from 1)
/// fails with the fault planned for it; every page request is recorded, so tests can
/// check sizes and alignment of what was actually sent.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    plan: Mutex<BTreeMap<u64, Fault>>,
    count: Mutex<u64>,
    seen: Mutex<Vec<Seen>>,
}

impl<S> FaultyStore<S> {
    /// Wraps `inner` with no faults planned.
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            plan: Mutex::new(BTreeMap::new()),
            count: Mutex::new(0),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// Makes page request number `n` (from 1) fail with `fault`.
    pub fn fail_nth(&self, n: u64, fault: Fault) {
        lock(&self.plan).insert(n, fault);
    }

    /// The page requests seen so far (including failed ones).
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
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
        self.inner.create(blob, size, seq, md).await
    }

    async fn properties(&self, blob: &str) -> Result<Properties, StoreError> {
        self.inner.properties(blob).await
    }

    async fn write_pages(
        &self,
        blob: &str,
        offset: u64,
        data: Bytes,
        crc64: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        match self.next("put", offset, data.len() as u64) {
            Some(Fault::ResetAfterApply) => {
                self.inner.write_pages(blob, offset, data, crc64, c).await?;
                Err(injected(Fault::ResetAfterApply))
            }
            Some(f) => Err(injected(f)),
            None => self.inner.write_pages(blob, offset, data, crc64, c).await,
        }
    }

    async fn clear_pages(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        match self.next("clear", offset, len) {
            Some(Fault::ResetAfterApply) => {
                self.inner.clear_pages(blob, offset, len, c).await?;
                Err(injected(Fault::ResetAfterApply))
            }
            Some(f) => Err(injected(f)),
            None => self.inner.clear_pages(blob, offset, len, c).await,
        }
    }

    async fn read(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        self.inner.read(blob, snapshot, offset, len).await
    }

    async fn page_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        self.inner.page_ranges(blob, snapshot).await
    }

    async fn diff_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        prev: &str,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        self.inner.diff_ranges(blob, snapshot, prev).await
    }

    async fn snapshot(&self, blob: &str, c: Condition) -> Result<String, StoreError> {
        self.inner.snapshot(blob, c).await
    }

    async fn snapshots(&self, blob: &str) -> Result<Vec<String>, StoreError> {
        self.inner.snapshots(blob).await
    }

    async fn delete_snapshot(&self, blob: &str, snapshot: &str) -> Result<(), StoreError> {
        self.inner.delete_snapshot(blob, snapshot).await
    }

    async fn copy_snapshot(
        &self,
        blob: &str,
        snapshot: &str,
        dest: &str,
    ) -> Result<(), StoreError> {
        self.inner.copy_snapshot(blob, snapshot, dest).await
    }

    async fn set_sequence_number(
        &self,
        blob: &str,
        seq: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        self.inner.set_sequence_number(blob, seq, c).await
    }

    async fn set_metadata(
        &self,
        blob: &str,
        md: &Metadata,
        c: Condition,
    ) -> Result<(), StoreError> {
        self.inner.set_metadata(blob, md, c).await
    }

    async fn resize(&self, blob: &str, size: u64, c: Condition) -> Result<(), StoreError> {
        self.inner.resize(blob, size, c).await
    }

    async fn delete(&self, blob: &str, c: Condition) -> Result<(), StoreError> {
        self.inner.delete(blob, c).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn acquire_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.acquire_lease(blob, lease).await
    }

    async fn break_lease(&self, blob: &str) -> Result<(), StoreError> {
        self.inner.break_lease(blob).await
    }

    async fn release_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.release_lease(blob, lease).await
    }

    async fn get_doc(&self, name: &str) -> Result<Option<Doc>, StoreError> {
        self.inner.get_doc(name).await
    }

    async fn put_doc(
        &self,
        name: &str,
        data: Bytes,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<ETag, StoreError> {
        self.inner.put_doc(name, data, expect, lease).await
    }
}
