//! The `PageStore` trait: what replication needs from a page-blob service.

use std::collections::BTreeMap;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Page size: every offset and length of a page operation is a multiple of it.
pub const PAGE: u64 = 512;
/// The largest body one Put Page request may carry (Azure's limit).
pub const MAX_PUT: u64 = 4 << 20;

/// How far apart two ranges of one [`PageStore::read_ranges`] call may be and still be
/// read in one request by its default (the bytes between are read and dropped: over a
/// network, cheaper than another request's round trip).
pub const READ_MERGE_GAP: u64 = 1 << 20;

/// How many requests the default [`PageStore::read_ranges`] has in flight at once.
pub const READS_IN_FLIGHT: usize = 4;

/// The reads [`PageStore::read_ranges`]'s default makes for `ranges`: spans in order of
/// offset, each of ranges less than [`READ_MERGE_GAP`] apart and at most [`MAX_PUT`] long
/// (or one range alone), and for each range the span holding it.
fn merge_reads(ranges: &[Range<u64>]) -> (Vec<Range<u64>>, Vec<usize>) {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].start, ranges[i].end));
    let mut spans: Vec<Range<u64>> = Vec::new();
    let mut of = vec![0; ranges.len()];
    for i in order {
        let r = ranges[i].start..ranges[i].end.max(ranges[i].start);
        match spans.last_mut() {
            Some(s)
                if r.start <= s.end.saturating_add(READ_MERGE_GAP)
                    && r.end.max(s.end) - s.start <= MAX_PUT =>
            {
                s.end = s.end.max(r.end);
            }
            _ => spans.push(r),
        }
        of[i] = spans.len() - 1;
    }
    (spans, of)
}

/// Blob metadata: name/value pairs.
pub type Metadata = BTreeMap<String, String>;

/// What a blob says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// Size in bytes (a multiple of 512 for a page blob).
    pub size: u64,
    /// The blob sequence number: the fencing token of a batch (page blobs).
    pub sequence_number: u64,
    /// Name/value metadata.
    pub metadata: Metadata,
    /// Whether a lease holds the blob.
    pub lease: LeaseState,
    /// The blob's entity tag: it changes whenever the blob does.
    pub etag: ETag,
}

/// Whether a lease holds a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// No lease: anyone may write (and acquire one).
    Available,
    /// A lease holds the blob: writes must carry its id.
    Leased,
    /// The lease was broken: anyone may write (and acquire a new one).
    Broken,
}

/// A lease id: whoever holds it is the only writer of the leased blob. Azure takes a
/// GUID, written `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct LeaseId(pub [u8; 16]);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

impl std::str::FromStr for LeaseId {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
        let dashes_ok = s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-');
        if hex.len() != 32 || !dashes_ok {
            return Err(StoreError::BadLeaseId(s.to_owned()));
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).unwrap_or("");
            out[i] =
                u8::from_str_radix(text, 16).map_err(|_| StoreError::BadLeaseId(s.to_owned()))?;
        }
        Ok(LeaseId(out))
    }
}

impl From<LeaseId> for String {
    fn from(l: LeaseId) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for LeaseId {
    type Error = StoreError;

    fn try_from(s: String) -> Result<Self, StoreError> {
        s.parse()
    }
}

/// An entity tag: the version of a blob a conditional write expects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ETag(pub String);

impl std::fmt::Display for ETag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A small whole-object blob (a catalogue document) and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doc {
    /// Its bytes.
    pub data: Bytes,
    /// Its entity tag: pass it to [`PageStore::put_doc`] to replace exactly this version.
    pub etag: ETag,
}

/// What a document write expects to find: two writers never both win.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No blob of that name (`If-None-Match: *`).
    Absent,
    /// Exactly this version (`If-Match`).
    Version(ETag),
}

/// A precondition on a write: it is refused (HTTP 412 on Azure) unless it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    /// Only if the blob's sequence number equals this.
    pub sequence_number_eq: Option<u64>,
    /// The lease the writer holds: required when a lease holds the blob, refused when none
    /// does. Without it, a write to a leased blob is refused.
    pub lease: Option<LeaseId>,
}

impl Condition {
    /// No precondition.
    pub const NONE: Condition = Condition {
        sequence_number_eq: None,
        lease: None,
    };

    /// Only if the sequence number is `seq`.
    pub fn sequence_number(seq: u64) -> Self {
        Condition {
            sequence_number_eq: Some(seq),
            lease: None,
        }
    }

    /// Only as the holder of `lease`.
    pub fn lease(lease: LeaseId) -> Self {
        Condition {
            sequence_number_eq: None,
            lease: Some(lease),
        }
    }

    /// This condition, carrying `lease` (or none).
    pub fn with_lease(self, lease: Option<LeaseId>) -> Self {
        Condition { lease, ..self }
    }
}

/// The page-blob operations replication needs, as Azure Storage offers them, plus small
/// whole-object documents (the catalogue) and leases (one writer per blob).
///
/// Offsets and lengths of page operations must be multiples of [`PAGE`]; a write carries at
/// most [`MAX_PUT`] bytes and, where the store checks what arrives, its CRC-64/NVME
/// ([`PageStore::content_crc64`]). Every write to a leased blob must carry its lease
/// ([`Condition::lease`]); snapshots are not leased (Azure deletes a snapshot without a
/// lease id), so a writer fences its snapshot deletions itself. Blob names are `/`-separated
/// paths of letters, digits, `-`, `_` and `.`. Every backend must pass the `conformance`
/// suite (feature `testing`), which checks exactly these rules. The trait is object-safe:
/// `Arc<dyn PageStore>` works.
#[async_trait]
pub trait PageStore: Send + Sync + std::fmt::Debug {
    /// Creates a page blob of `size` bytes (zeros) with `metadata` and sequence number
    /// `sequence_number`; [`StoreError::AlreadyExists`] if it exists.
    async fn create(
        &self,
        blob: &str,
        size: u64,
        sequence_number: u64,
        metadata: &Metadata,
    ) -> Result<(), StoreError>;

    /// The blob's size, sequence number, metadata, lease state and entity tag.
    async fn properties(&self, blob: &str) -> Result<Properties, StoreError>;

    /// Writes `data` at `offset` if `condition` holds. `crc64`, if given, must be the
    /// CRC-64/NVME of `data` ([`crc64`]): the store refuses the write if what arrived does
    /// not match it (Azure's optional `x-ms-content-crc64`). Writers pass what
    /// [`content_crc64`](PageStore::content_crc64) says.
    async fn write_pages(
        &self,
        blob: &str,
        offset: u64,
        data: Bytes,
        crc64: Option<u64>,
        condition: Condition,
    ) -> Result<(), StoreError>;

    /// The checksum a write of `data` should carry: its [`crc64`] for a store the bytes
    /// travel to (the default), `None` for one they never leave the process for (the
    /// embedded store: computing and checking it there guards nothing, at a tenth of an
    /// initial copy's CPU time).
    fn content_crc64(&self, data: &[u8]) -> Option<u64> {
        Some(crc64(data))
    }

    /// How many bytes of page writes the store takes best in one
    /// [`write_pages_many`](PageStore::write_pages_many) call; 0 (the default): one write
    /// per request, as a remote store takes them (each is a Put Page).
    fn write_group_bytes(&self) -> u64 {
        0
    }

    /// Writes several ranges of the blob (offset, bytes, checksum of the bytes), each as
    /// [`write_pages`](PageStore::write_pages) writes it, if `condition` holds: for a store
    /// that takes them cheaper together ([`write_group_bytes`](PageStore::write_group_bytes);
    /// the embedded store checks the state, opens its files and appends to its journal
    /// once for all). The default writes them one after another. On an error some may
    /// have landed, as with separate requests; writing them again is harmless.
    async fn write_pages_many(
        &self,
        blob: &str,
        writes: &[(u64, Bytes, Option<u64>)],
        condition: Condition,
    ) -> Result<(), StoreError> {
        for (offset, data, crc) in writes {
            self.write_pages(blob, *offset, data.clone(), *crc, condition)
                .await?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros (and no longer allocated) if
    /// `condition` holds.
    async fn clear_pages(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        condition: Condition,
    ) -> Result<(), StoreError>;

    /// Announces that the pages of `ranges` (merged, in order) are about to be written or
    /// cleared, if `condition` holds: a store whose snapshots copy pages on their first
    /// change may copy them all now, durably in one go, instead of once per request (the
    /// [`PageWriter`](crate::PageWriter) announces each batch). A hint, changing nothing
    /// anyone reads; the default does nothing (Azure keeps snapshots itself).
    async fn prepare_overwrite(
        &self,
        blob: &str,
        ranges: &[Range<u64>],
        condition: Condition,
    ) -> Result<(), StoreError> {
        let _ = (blob, ranges, condition);
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the blob, or of one of its snapshots.
    async fn read(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError>;

    /// Reads each of `ranges` (byte ranges, any alignment) of the blob or of one of its
    /// snapshots, in the order given: what [`read`](PageStore::read) gives for each. For
    /// many small reads. The default is for a remote store, whose cost is per request:
    /// ranges less than [`READ_MERGE_GAP`] apart are read in one request of at most
    /// [`MAX_PUT`] bytes (unless one range is larger), up to [`READS_IN_FLIGHT`] requests
    /// at a time. A local store may read just the ranges (the embedded store does, under
    /// one lock and one open of its file).
    async fn read_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, StoreError> {
        use futures::StreamExt;
        let (spans, of) = merge_reads(ranges);
        let mut read = Vec::with_capacity(spans.len());
        let mut pending = futures::stream::FuturesOrdered::new();
        let mut next = spans.iter();
        loop {
            while pending.len() < READS_IN_FLIGHT {
                let Some(s) = next.next() else { break };
                pending.push_back(self.read(blob, snapshot, s.start, s.end - s.start));
            }
            match pending.next().await {
                Some(got) => read.push(got?),
                None => break,
            }
        }
        ranges
            .iter()
            .zip(of)
            .map(|(r, k)| {
                let (span, bytes) = (&spans[k], &read[k]);
                if bytes.len() as u64 != span.end - span.start {
                    return Err(StoreError::Corrupt {
                        path: blob.to_owned(),
                        reason: format!(
                            "a read of {} bytes answered {}",
                            span.end - span.start,
                            bytes.len()
                        ),
                    });
                }
                // A reversed range reads as empty (as the embedded store reads it).
                let end = r.end.max(r.start);
                Ok(bytes.slice((r.start - span.start) as usize..(end - span.start) as usize))
            })
            .collect()
    }

    /// The allocated (written, not cleared) ranges, merged and in order.
    async fn page_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<Range<u64>>, StoreError>;

    /// Ranges that may differ between snapshot `prev` and snapshot `snapshot` (or the
    /// blob itself when `None`), merged and in order.
    async fn diff_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        prev: &str,
    ) -> Result<Vec<Range<u64>>, StoreError>;

    /// Takes a read-only snapshot (as the holder of `condition.lease`); returns its id.
    async fn snapshot(&self, blob: &str, condition: Condition) -> Result<String, StoreError>;

    /// The blob's snapshots, oldest first.
    async fn snapshots(&self, blob: &str) -> Result<Vec<String>, StoreError>;

    /// A snapshot's size, sequence number and metadata as they were when it was taken (its
    /// lease state is [`LeaseState::Available`]: snapshots take no lease).
    async fn snapshot_properties(
        &self,
        blob: &str,
        snapshot: &str,
    ) -> Result<Properties, StoreError>;

    /// Deletes one snapshot (snapshots take no lease).
    async fn delete_snapshot(&self, blob: &str, snapshot: &str) -> Result<(), StoreError>;

    /// Creates blob `dest` with the content of `snapshot` of `blob` (test failover and
    /// failover materialise disks this way without touching the replica).
    async fn copy_snapshot(&self, blob: &str, snapshot: &str, dest: &str)
    -> Result<(), StoreError>;

    /// Sets the sequence number if `condition` holds.
    async fn set_sequence_number(
        &self,
        blob: &str,
        sequence_number: u64,
        condition: Condition,
    ) -> Result<(), StoreError>;

    /// Replaces the metadata (as the holder of `condition.lease`).
    async fn set_metadata(
        &self,
        blob: &str,
        metadata: &Metadata,
        condition: Condition,
    ) -> Result<(), StoreError>;

    /// Grows or shrinks the blob to `size` (a multiple of 512).
    async fn resize(&self, blob: &str, size: u64, condition: Condition) -> Result<(), StoreError>;

    /// Deletes the blob (a page blob with its snapshots, or a document).
    async fn delete(&self, blob: &str, condition: Condition) -> Result<(), StoreError>;

    /// The names of the blobs (not snapshots) that start with `prefix`, in order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Leases the blob to `lease` with no expiry. Acquiring a lease one already holds
    /// succeeds; a lease held by another is [`StoreError::Leased`].
    async fn acquire_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError>;

    /// Breaks whatever lease holds the blob, at once (a take-over); a blob without a lease
    /// is left as it is.
    async fn break_lease(&self, blob: &str) -> Result<(), StoreError>;

    /// Gives up `lease` on the blob.
    async fn release_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError>;

    /// A document and its version; `None` if there is none of that name.
    async fn get_doc(&self, name: &str) -> Result<Option<Doc>, StoreError>;

    /// Writes a document if `expect` holds (else [`StoreError::Changed`]), as the holder
    /// of `lease` when one is given; returns the new version.
    async fn put_doc(
        &self,
        name: &str,
        data: Bytes,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<ETag, StoreError>;
}

/// The CRC-64/NVME of `data`: Azure Storage's transactional `x-ms-content-crc64`.
///
/// ```
/// assert_eq!(lifeboat_pageblob::crc64(b"123456789"), 0xAE8B_1486_0A79_9888);
/// ```
pub fn crc64(data: &[u8]) -> u64 {
    // crc-fast folds with carry-less multiplication (PCLMULQDQ / PMULL): 10.8 GB/s here
    // against 2.1 GB/s for the `crc` crate's slice-by-16 tables, whose checksum took 17 %
    // of a 1 GiB protect's CPU (it runs twice: the sender, and the store that checks it).
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

/// Checks a page operation's alignment and size the way Azure does.
pub(crate) fn check_pages(offset: u64, len: u64, size: u64, max: u64) -> Result<(), StoreError> {
    if !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
        return Err(StoreError::Misaligned { offset, len });
    }
    if len > max {
        return Err(StoreError::TooLarge { len });
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(StoreError::OutOfRange { offset, len, size });
    }
    Ok(())
}

/// Checks a blob size (create, resize) the way Azure does: a multiple of 512.
pub(crate) fn check_size(size: u64) -> Result<(), StoreError> {
    if size.is_multiple_of(PAGE) {
        Ok(())
    } else {
        Err(StoreError::Misaligned {
            offset: 0,
            len: size,
        })
    }
}

/// Merges sorted or unsorted ranges into disjoint, non-touching ranges in order.
pub fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The ranges of `ranges` (merged and sorted) that meet `want`: found by binary search
/// (a blob's lists hold thousands of ranges; a batch asks about hundreds).
pub(crate) fn meeting<'a>(ranges: &'a [Range<u64>], want: &Range<u64>) -> &'a [Range<u64>] {
    let from = ranges.partition_point(|r| r.end <= want.start);
    let rest = &ranges[from..];
    &rest[..rest.partition_point(|r| r.start < want.end)]
}

/// `range` minus every range of `have` (which is merged and sorted).
pub(crate) fn subtract(range: &Range<u64>, have: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = range.start;
    for h in meeting(have, range) {
        if h.start > at {
            out.push(at..h.start);
        }
        at = at.max(h.end);
    }
    if at < range.end {
        out.push(at..range.end);
    }
    out
}

/// Checks a blob name: `/`-separated segments of letters, digits, `-`, `_` and `.`, none
/// empty, `.` or `..`; at most 1024 bytes (Azure's limit).
pub fn check_blob_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 1024
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName {
            name: name.to_owned(),
            why: "use /-separated segments of letters, digits, '-', '_', '.'",
        })
    }
}

/// A task that did not finish: a panic in it goes on panicking here (a bug is not an
/// error to retry); otherwise it was cancelled (the runtime shutting down), and that is
/// returned for the caller to say.
pub(crate) fn unless_panic(e: tokio::task::JoinError) -> tokio::task::JoinError {
    match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::{merge_ranges, subtract};
    use std::ops::Range;

    /// `ranges` merged, each minus `cut` (as a batch's rest loses the blocks given).
    fn cut(ranges: Vec<Range<u64>>, cut: &[Range<u64>]) -> Vec<Range<u64>> {
        merge_ranges(ranges)
            .iter()
            .flat_map(|r| subtract(r, cut))
            .collect()
    }

    #[test]
    fn subtract_cuts_ranges_apart() {
        let (whole, middle) = (0..10, 5..25);
        assert_eq!(cut(vec![0..10, 20..30], &[]), [0..10, 20..30]);
        assert_eq!(
            cut(vec![20..30, 0..10], std::slice::from_ref(&middle)),
            [0..5, 25..30]
        );
        assert_eq!(
            cut(vec![0..12, 12..30], &[0..5, 10..12, 28..40]),
            [5..10, 12..28]
        );
        assert!(cut(vec![whole.clone()], std::slice::from_ref(&whole)).is_empty());
    }
}
