//! `PageWriter`: changes in, aligned, coalesced, fenced, retried page requests out.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lifeboat_retry::{Budget, Policy, RetryError, retry};
use lifeboat_source::ReadAt;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::StoreError;
use crate::store::{Condition, LeaseId, MAX_PUT, PAGE, PageStore, merge_ranges, unless_panic};

/// One change to the replica: new bytes, or a range that now reads as zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Write `data` at `offset`.
    Data {
        /// Disk offset (need not be aligned).
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Make `len` bytes at `offset` read as zeros.
    Zero {
        /// Disk offset (need not be aligned).
        offset: u64,
        /// Length.
        len: u64,
    },
}

impl Change {
    /// The disk range the change covers.
    pub fn range(&self) -> Range<u64> {
        match self {
            Change::Data { offset, data } => *offset..offset + data.len() as u64,
            Change::Zero { offset, len } => *offset..offset + len,
        }
    }
}

/// How a [`PageWriter`] sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Requests in flight at once (bounded memory: at most this many bodies of at most
    /// `max_request` bytes are being sent).
    pub in_flight: usize,
    /// The largest Put Page body; at most [`MAX_PUT`] (4 MiB).
    pub max_request: u64,
    /// Retries per request. The default is quick (0.1 s doubling to 1.6 s, then every
    /// 5 s, at most 8 retries): the replication layer owns the long Hyper-V schedule.
    pub retry: Policy,
    /// A bandwidth limit on Put Page bodies; `None` for none. Writers whose configs are
    /// clones of one share it (an engine's writers: one limit for the site).
    pub throttle: Option<Throttle>,
}

/// A limit of bytes per second shared by every writer holding a clone: each request waits
/// for its turn, spaced by its size over the rate.
#[derive(Clone, Debug)]
pub struct Throttle {
    rate: u64,
    next: Arc<Mutex<Option<Instant>>>,
}

/// Two throttles are equal when they are one limit (clones of one).
impl PartialEq for Throttle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.next, &other.next)
    }
}

impl Eq for Throttle {}

impl Throttle {
    /// At most `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Self {
        Throttle {
            rate: bytes_per_second.max(1),
            next: Arc::default(),
        }
    }

    /// The limit, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `len` bytes may be sent.
    async fn admit(&self, len: u64) {
        let at = {
            let mut next = self.next.lock().await;
            let at = next.map_or_else(Instant::now, |n| n.max(Instant::now()));
            *next = Some(at + Duration::from_secs_f64(len as f64 / self.rate as f64));
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            in_flight: 4,
            max_request: MAX_PUT,
            retry: Policy {
                steps: [100, 200, 400, 800, 1600]
                    .map(Duration::from_millis)
                    .to_vec(),
                then_every: Duration::from_secs(5),
                jitter: None,
                budget: Budget {
                    max_retries: Some(8),
                    max_elapsed: None,
                },
            },
            throttle: None,
        }
    }
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The blob's sequence number is not the batch's: the batch was applied already, or
    /// another writer holds the blob. Nothing of this batch was written.
    #[error("fenced: batch {expected} but the blob is at sequence number {found}")]
    Fenced {
        /// The batch's sequence number.
        expected: u64,
        /// The blob's.
        found: u64,
    },
    /// A request failed for good (non-recoverable, or retries exhausted).
    #[error("{what} failed after {attempts} attempt(s): {source}")]
    Store {
        /// The request.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: StoreError,
    },
    /// A change has unaligned edges and no edge source was given to complete them.
    #[error("change at {offset} (+{len}) is not 512-byte aligned and no edge source was given")]
    NeedEdges {
        /// The change's offset.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Two changes overlap.
    #[error("changes overlap at offset {offset}")]
    Overlap {
        /// Where.
        offset: u64,
    },
    /// Reading edge bytes failed.
    #[error("reading edge bytes at {offset}: {source}")]
    Edge {
        /// Where.
        offset: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What a batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    /// Bytes sent in Put Page requests.
    pub bytes_sent: u64,
    /// Put Page requests.
    pub put_requests: u64,
    /// Clear Pages requests.
    pub clear_requests: u64,
    /// Retries made.
    pub retries: u64,
    /// Time the batch took.
    pub elapsed: Duration,
}

/// Running totals of a writer, readable while it works.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    puts: AtomicU64,
    clears: AtomicU64,
    retries: AtomicU64,
}

/// A totals snapshot: bytes, requests, retries since the writer was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterProgress {
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Put Page requests.
    pub put_requests: u64,
    /// Clear Pages requests.
    pub clear_requests: u64,
    /// Retries.
    pub retries: u64,
}

/// Applies batches of [`Change`]s to one page blob, exactly once each.
///
/// A batch is identified by the blob sequence number it expects: every request of the
/// batch is conditional on it, and a successful batch advances it by one. Replaying an
/// applied batch, or a second writer, is refused with [`WriteError::Fenced`]; a batch cut
/// short by a crash is simply applied again (page writes are idempotent).
///
/// Changes are aligned to 512-byte pages (unaligned edges are completed from a
/// caller-supplied [`ReadAt`], never guessed), coalesced into requests of at most
/// 4 MiB, zero ranges sent as Clear Pages, each body checksummed with CRC-64, up to
/// `in_flight` requests at a time, each retried through `lifeboat-retry`.
#[derive(Debug)]
pub struct PageWriter {
    store: Arc<dyn PageStore>,
    blob: String,
    config: WriterConfig,
    lease: Option<LeaseId>,
    counters: Arc<Counters>,
    /// A permit per request out (`in_flight` of them): shared by the parts of a batch
    /// sent at once.
    requests: Arc<Semaphore>,
}

enum Op {
    Put {
        offset: u64,
        data: Bytes,
    },
    /// Puts sent together, to a store that takes them so
    /// ([`PageStore::write_group_bytes`]); each counts as a request.
    Puts(Vec<(u64, Bytes)>),
    Clear {
        offset: u64,
        len: u64,
    },
}

impl PageWriter {
    /// A writer for `blob` in `store`.
    pub fn new(store: Arc<dyn PageStore>, blob: impl Into<String>, config: WriterConfig) -> Self {
        let config = WriterConfig {
            in_flight: config.in_flight.max(1),
            max_request: (config.max_request / PAGE * PAGE).clamp(PAGE, MAX_PUT),
            ..config
        };
        PageWriter {
            store,
            blob: blob.into(),
            requests: Arc::new(Semaphore::new(config.in_flight)),
            config,
            lease: None,
            counters: Arc::default(),
        }
    }

    /// Writes as the holder of `lease` (every request carries it), for a leased blob.
    pub fn leased(mut self, lease: Option<LeaseId>) -> Self {
        self.lease = lease;
        self
    }

    /// Totals so far.
    pub fn progress(&self) -> WriterProgress {
        let c = &self.counters;
        WriterProgress {
            bytes_sent: c.bytes.load(Ordering::Relaxed),
            put_requests: c.puts.load(Ordering::Relaxed),
            clear_requests: c.clears.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }

    /// Applies `changes` as batch `seq` (the blob's current sequence number), then
    /// advances the blob to `seq + 1`. `edges` supplies the bytes around unaligned
    /// changes (for example the replica's current content, or the source disk).
    pub async fn apply_batch(
        &self,
        seq: u64,
        changes: Vec<Change>,
        edges: Option<&dyn ReadAt>,
    ) -> Result<BatchReport, WriteError> {
        let batch = self.open(seq);
        let ops = plan(changes, edges, self.config.max_request, self.grouping())?;
        self.announce(seq, &op_ranges(&ops)).await?;
        self.send_ops(seq, ops).await?;
        self.finish(batch).await
    }

    /// Begins batch `seq` (the blob's current sequence number) whose changes come in
    /// parts ([`PageWriter::send`]), for a sender that holds only a part at a time (an
    /// initial copy reading a disk in a few small buffers). `ranges` (merged, in order)
    /// must cover every page the parts will write or clear: they are announced to the
    /// store now ([`PageStore::prepare_overwrite`]). Nothing is sent yet.
    pub async fn begin(&self, seq: u64, ranges: &[Range<u64>]) -> Result<OpenBatch, WriteError> {
        let batch = self.open(seq);
        self.announce(seq, ranges).await?;
        Ok(batch)
    }

    /// Sends a part of an open batch, as [`PageWriter::apply_batch`] sends its changes
    /// (the parts must not overlap each other: which lands last is not said). The blob
    /// stays at the batch's sequence number until [`PageWriter::finish`]. Parts sent at
    /// once share the writer's `in_flight` requests out.
    pub async fn send(
        &self,
        batch: &OpenBatch,
        changes: Vec<Change>,
        edges: Option<&dyn ReadAt>,
    ) -> Result<(), WriteError> {
        let ops = plan(changes, edges, self.config.max_request, self.grouping())?;
        self.send_ops(batch.seq, ops).await
    }

    /// Ends an open batch: advances the blob to its sequence number + 1. What the batch
    /// sent, over all its parts.
    pub async fn finish(&self, batch: OpenBatch) -> Result<BatchReport, WriteError> {
        let seq = batch.seq;
        let (store, blob) = (&*self.store, self.blob.as_str());
        let counters = &self.counters;
        let cond = Condition::sequence_number(seq).with_lease(self.lease);
        let set = retry(&self.config.retry, |attempt| {
            if attempt > 1 {
                counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            store.set_sequence_number(blob, seq + 1, cond)
        })
        .await;
        match set {
            Ok(()) => {}
            // A lost reply to an update that landed: a retry finds the blob already at
            // seq + 1. Under a lease nobody else can have moved it there, so it is this
            // batch's own update.
            Err(RetryError {
                error: StoreError::ConditionFailed { found, .. },
                attempts,
                ..
            }) if self.lease.is_some() && attempts > 1 && found == seq + 1 => {}
            Err(e) => {
                return Err(store_error(
                    format!("set sequence number {}", seq + 1),
                    e,
                    seq,
                ));
            }
        }
        let (after, before) = (self.progress(), batch.before);
        Ok(BatchReport {
            bytes_sent: after.bytes_sent - before.bytes_sent,
            put_requests: after.put_requests - before.put_requests,
            clear_requests: after.clear_requests - before.clear_requests,
            retries: after.retries - before.retries,
            elapsed: batch.start.elapsed(),
        })
    }
}

/// A batch begun with [`PageWriter::begin`], its parts being sent (a clone to each
/// part's sender: [`PageWriter::send`] may run for several parts at once).
#[derive(Clone, Debug)]
#[must_use = "a batch not finished leaves the blob at its sequence number"]
pub struct OpenBatch {
    seq: u64,
    start: Instant,
    before: WriterProgress,
}

impl OpenBatch {
    /// The batch's sequence number (the blob's while it is open).
    pub fn sequence_number(&self) -> u64 {
        self.seq
    }
}

impl PageWriter {
    /// Totals as a batch begins.
    fn open(&self, seq: u64) -> OpenBatch {
        OpenBatch {
            seq,
            start: Instant::now(),
            before: self.progress(),
        }
    }

    /// Whether the store takes touching puts in one request
    /// ([`PageStore::write_group_bytes`]): such a store pays nothing per put, so touching
    /// changes are planned as they are, not copied into one body.
    fn grouping(&self) -> bool {
        self.store.write_group_bytes() > 0
    }

    /// Tells the store which pages the batch will change
    /// ([`PageStore::prepare_overwrite`]), so copy-on-write happens once per batch.
    async fn announce(&self, seq: u64, ranges: &[Range<u64>]) -> Result<(), WriteError> {
        if ranges.is_empty() {
            return Ok(());
        }
        let cond = Condition::sequence_number(seq).with_lease(self.lease);
        let (store, blob) = (&*self.store, self.blob.as_str());
        let what = || format!("prepare batch {seq}");
        with_retries(&self.config.retry, &self.counters, seq, what, || {
            store.prepare_overwrite(blob, ranges, cond)
        })
        .await
    }

    /// Sends the requests of batch `seq`, at most `in_flight` at once (with those of
    /// other parts sent meanwhile).
    async fn send_ops(&self, seq: u64, ops: Vec<Op>) -> Result<(), WriteError> {
        let mut tasks = JoinSet::new();
        for op in group(ops, self.store.write_group_bytes()) {
            while tasks.len() >= self.config.in_flight {
                join_one(&mut tasks, seq).await?;
            }
            // Held by the request's task until it ends (or is aborted with the part).
            // Never closed, so never `None`.
            let permit = self.requests.clone().acquire_owned().await.ok();
            let (store, blob, policy, lease) = (
                self.store.clone(),
                self.blob.clone(),
                self.config.retry.clone(),
                self.lease,
            );
            let (counters, throttle) = (self.counters.clone(), self.config.throttle.clone());
            let cond = Condition::sequence_number(seq).with_lease(lease);
            tasks.spawn(async move {
                let _permit = permit;
                send(
                    &*store,
                    &blob,
                    &policy,
                    &counters,
                    throttle.as_ref(),
                    op,
                    cond,
                )
                .await
            });
        }
        while !tasks.is_empty() {
            join_one(&mut tasks, seq).await?;
        }
        Ok(())
    }
}

/// The pages `ops` change, merged.
fn op_ranges(ops: &[Op]) -> Vec<Range<u64>> {
    merge_ranges(
        ops.iter()
            .flat_map(|op| match op {
                Op::Put { offset, data } => vec![(*offset, data.len())],
                Op::Puts(puts) => puts.iter().map(|(o, d)| (*o, d.len())).collect(),
                Op::Clear { offset, len } => vec![(*offset, *len as usize)],
            })
            .map(|(offset, len)| offset..offset + len as u64)
            .collect(),
    )
}

async fn join_one(tasks: &mut JoinSet<Result<(), WriteError>>, seq: u64) -> Result<(), WriteError> {
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(WriteError::Store {
            what: format!("request task of batch {seq}"),
            attempts: 0,
            source: StoreError::Client(unless_panic(e).to_string()),
        }),
        None => Ok(()),
    }
}

fn store_error(what: String, e: RetryError<StoreError>, seq: u64) -> WriteError {
    match e.error {
        StoreError::ConditionFailed { found, .. } => WriteError::Fenced {
            expected: seq,
            found,
        },
        source => WriteError::Store {
            what,
            attempts: e.attempts,
            source,
        },
    }
}

/// Consecutive puts in groups of at most `bytes` (one request each when 0: a remote
/// store's); a clear stands alone.
fn group(ops: Vec<Op>, bytes: u64) -> Vec<Op> {
    if bytes == 0 {
        return ops;
    }
    let mut out = Vec::new();
    let mut puts: Vec<(u64, Bytes)> = Vec::new();
    let mut size = 0;
    let flush = |puts: &mut Vec<(u64, Bytes)>, out: &mut Vec<Op>| match puts.len() {
        0 => {}
        1 => {
            let (offset, data) = puts.pop().unwrap_or_default();
            out.push(Op::Put { offset, data });
        }
        _ => out.push(Op::Puts(std::mem::take(puts))),
    };
    for op in ops {
        match op {
            Op::Put { offset, data } => {
                if size + data.len() as u64 > bytes {
                    flush(&mut puts, &mut out);
                    size = 0;
                }
                size += data.len() as u64;
                puts.push((offset, data));
            }
            other => {
                flush(&mut puts, &mut out);
                size = 0;
                out.push(other);
            }
        }
    }
    flush(&mut puts, &mut out);
    out
}

#[allow(clippy::too_many_arguments)]
async fn send(
    store: &dyn PageStore,
    blob: &str,
    policy: &Policy,
    counters: &Counters,
    throttle: Option<&Throttle>,
    op: Op,
    cond: Condition,
) -> Result<(), WriteError> {
    let seq = cond.sequence_number_eq.unwrap_or_default();
    match op {
        Op::Puts(puts) => {
            let total: u64 = puts.iter().map(|(_, d)| d.len() as u64).sum();
            if let Some(t) = throttle {
                // Admitted request by request, as if sent alone (the rate is the same).
                for (_, data) in &puts {
                    t.admit(data.len() as u64).await;
                }
            }
            let n = puts.len() as u64;
            let first = puts.first().map_or(0, |p| p.0);
            let writes: Vec<(u64, Bytes, Option<u64>)> = puts
                .into_iter()
                .map(|(offset, data)| {
                    let crc = store.content_crc64(&data);
                    (offset, data, crc)
                })
                .collect();
            let what = || format!("{n} Put Pages from {first}");
            with_retries(policy, counters, seq, what, || {
                store.write_pages_many(blob, &writes, cond)
            })
            .await?;
            counters.bytes.fetch_add(total, Ordering::Relaxed);
            counters.puts.fetch_add(n, Ordering::Relaxed);
        }
        Op::Put { offset, data } => {
            if let Some(t) = throttle {
                t.admit(data.len() as u64).await;
            }
            let crc = store.content_crc64(&data);
            let len = data.len() as u64;
            let what = || format!("Put Page {offset}+{len}");
            with_retries(policy, counters, seq, what, || {
                store.write_pages(blob, offset, data.clone(), crc, cond)
            })
            .await?;
            counters.bytes.fetch_add(len, Ordering::Relaxed);
            counters.puts.fetch_add(1, Ordering::Relaxed);
        }
        Op::Clear { offset, len } => {
            let what = || format!("Clear Pages {offset}+{len}");
            with_retries(policy, counters, seq, what, || {
                store.clear_pages(blob, offset, len, cond)
            })
            .await?;
            counters.clears.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// One request, `request`, with the policy's retries, each retry counted; a final failure
/// is named by `what` (a fence failure becomes [`WriteError::Fenced`] for batch `seq`).
async fn with_retries<Fut>(
    policy: &Policy,
    counters: &Counters,
    seq: u64,
    what: impl FnOnce() -> String,
    mut request: impl FnMut() -> Fut,
) -> Result<(), WriteError>
where
    Fut: Future<Output = Result<(), StoreError>>,
{
    retry(policy, |attempt| {
        if attempt > 1 {
            counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        request()
    })
    .await
    .map_err(|e| store_error(what(), e, seq))
}

fn floor(x: u64) -> u64 {
    x / PAGE * PAGE
}

fn ceil(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Turns changes into aligned requests: aligned zero ranges become Clear Pages; data (and
/// the unaligned edge pages of zero ranges) is grouped into runs of touching pages,
/// completed from `edges` where a page is only partly covered, and cut into bodies of at
/// most `max` bytes. With `split`, a run is also cut where two changes meet on a page
/// boundary: a change covering whole pages is then sent as it is (no copy).
fn plan(
    mut changes: Vec<Change>,
    edges: Option<&dyn ReadAt>,
    max: u64,
    split: bool,
) -> Result<Vec<Op>, WriteError> {
    changes.retain(|c| {
        let r = c.range();
        r.start < r.end
    });
    changes.sort_by_key(|c| c.range().start);
    for w in changes.windows(2) {
        if w[0].range().end > w[1].range().start {
            return Err(WriteError::Overlap {
                offset: w[1].range().start,
            });
        }
    }
    let mut ops = Vec::new();
    let mut data: Vec<(u64, Bytes)> = Vec::new();
    for c in changes {
        match c {
            Change::Data { offset, data: d } => data.push((offset, d)),
            Change::Zero { offset, len } => {
                let (inner_start, inner_end) = (ceil(offset), floor(offset + len));
                if inner_start < inner_end {
                    let mut at = inner_start;
                    while at < inner_end {
                        // Clear Pages has no size cap; keep requests modest anyway.
                        let n = (inner_end - at).min(1 << 30);
                        ops.push(Op::Clear { offset: at, len: n });
                        at += n;
                    }
                    if offset < inner_start {
                        data.push((
                            offset,
                            Bytes::from(vec![0; (inner_start - offset) as usize]),
                        ));
                    }
                    if inner_end < offset + len {
                        data.push((
                            inner_end,
                            Bytes::from(vec![0; (offset + len - inner_end) as usize]),
                        ));
                    }
                } else {
                    data.push((offset, Bytes::from(vec![0; len as usize])));
                }
            }
        }
    }
    data.sort_by_key(|(o, _)| *o);
    let mut i = 0;
    while i < data.len() {
        // A run: changes whose page-aligned ranges touch or overlap.
        let run_start = floor(data[i].0);
        let mut run_end = ceil(data[i].0 + data[i].1.len() as u64);
        let mut j = i + 1;
        while j < data.len() && floor(data[j].0) <= run_end {
            run_end = run_end.max(ceil(data[j].0 + data[j].1.len() as u64));
            j += 1;
        }
        if split {
            let mut from = i;
            for k in i + 1..=j {
                let end = data[k - 1].0 + data[k - 1].1.len() as u64;
                if k == j || (data[k].0 == end && end.is_multiple_of(PAGE)) {
                    let run = &data[from..k];
                    let (start, end) = (floor(run[0].0), ceil(end));
                    put_run(run, start, end, edges, max, &mut ops)?;
                    from = k;
                }
            }
        } else {
            put_run(&data[i..j], run_start, run_end, edges, max, &mut ops)?;
        }
        i = j;
    }
    Ok(ops)
}

/// Puts of at most `max` bytes for a run of changes covering pages `start..end`.
fn put_run(
    run: &[(u64, Bytes)],
    start: u64,
    end: u64,
    edges: Option<&dyn ReadAt>,
    max: u64,
    ops: &mut Vec<Op>,
) -> Result<(), WriteError> {
    let body = if run.len() == 1 && run[0].0 == start && run[0].1.len() as u64 == end - start {
        run[0].1.clone() // aligned already: no copy
    } else {
        assemble(run, start, end, edges)?
    };
    let mut at = 0;
    while at < body.len() as u64 {
        let n = (body.len() as u64 - at).min(max);
        ops.push(Op::Put {
            offset: start + at,
            data: body.slice(at as usize..(at + n) as usize),
        });
        at += n;
    }
    Ok(())
}

/// Builds the body of a run: edge bytes where no change covers, change bytes elsewhere.
fn assemble(
    run: &[(u64, Bytes)],
    start: u64,
    end: u64,
    edges: Option<&dyn ReadAt>,
) -> Result<Bytes, WriteError> {
    let mut buf = BytesMut::zeroed((end - start) as usize);
    let mut at = start;
    let fill = |from: u64, to: u64, buf: &mut BytesMut| -> Result<(), WriteError> {
        if from >= to {
            return Ok(());
        }
        let src = edges.ok_or(WriteError::NeedEdges {
            offset: from,
            len: to - from,
        })?;
        let out = &mut buf[(from - start) as usize..(to - start) as usize];
        src.read_exact_at(out, from)
            .map_err(|source| WriteError::Edge {
                offset: from,
                source,
            })
    };
    for (offset, d) in run {
        fill(at, *offset, &mut buf)?;
        buf[(offset - start) as usize..(offset - start) as usize + d.len()].copy_from_slice(d);
        at = offset + d.len() as u64;
    }
    fill(at, end, &mut buf)?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DISK: u64 = 16 * PAGE;

    /// Non-overlapping changes: (start, len, zero?, fill byte); those with an even fill
    /// byte cover whole pages (so that some meet on a page boundary), the rest need not.
    fn changes() -> impl Strategy<Value = Vec<Change>> {
        proptest::collection::vec((0..DISK, 1..3 * PAGE, any::<bool>(), 1..=255u8), 0..6).prop_map(
            |raw| {
                let mut taken: Vec<Range<u64>> = Vec::new();
                let mut out = Vec::new();
                for (start, len, zero, byte) in raw {
                    let mut r = start..(start + len).min(DISK);
                    if byte % 2 == 0 {
                        r = floor(r.start)..ceil(r.end);
                    }
                    if taken.iter().any(|t| t.start < r.end && r.start < t.end) {
                        continue;
                    }
                    taken.push(r.clone());
                    out.push(if zero {
                        Change::Zero {
                            offset: r.start,
                            len: r.end - r.start,
                        }
                    } else {
                        Change::Data {
                            offset: r.start,
                            data: Bytes::from(vec![byte; (r.end - r.start) as usize]),
                        }
                    });
                }
                out
            },
        )
    }

    proptest! {
        /// Planning against a byte model: the requests, applied to the disk, give the disk
        /// with the changes applied; every request is page-aligned, a Put is at most `max`
        /// bytes, and no request touches a page no change touches.
        #[test]
        fn plans_equal_a_byte_model(changes in changes(), pages in 1..6u64, seed in any::<u8>()) {
            let max = pages * PAGE;
            let base: Vec<u8> = (0..DISK).map(|i| (i as u8) ^ seed | 0x80).collect();
            let mut want = base.clone();
            let mut touched = vec![false; (DISK / PAGE) as usize];
            for c in &changes {
                let r = c.range();
                match c {
                    Change::Data { data, .. } => {
                        want[r.start as usize..r.end as usize].copy_from_slice(data)
                    }
                    Change::Zero { .. } => want[r.start as usize..r.end as usize].fill(0),
                }
                for p in r.start / PAGE..r.end.div_ceil(PAGE) {
                    touched[p as usize] = true;
                }
            }
            // Sent one by one, or grouped for a store that takes groups (the same pages).
            let grouping = if seed % 2 == 0 { 0 } else { 2 * max };
            let ops = group(plan(changes, Some(&base), max, grouping > 0).unwrap(), grouping);
            let mut got = base.clone();
            let put = |offset: u64, data: &Bytes, got: &mut Vec<u8>| {
                got[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                vec![(offset, data.len() as u64)]
            };
            for op in &ops {
                let written = match op {
                    Op::Put { offset, data } => {
                        prop_assert!(data.len() as u64 <= max);
                        put(*offset, data, &mut got)
                    }
                    Op::Puts(puts) => {
                        prop_assert!(grouping > 0 && puts.len() > 1);
                        let total: u64 = puts.iter().map(|(_, d)| d.len() as u64).sum();
                        prop_assert!(total <= grouping);
                        puts.iter().flat_map(|(o, d)| put(*o, d, &mut got)).collect()
                    }
                    Op::Clear { offset, len } => {
                        got[*offset as usize..(*offset + *len) as usize].fill(0);
                        vec![(*offset, *len)]
                    }
                };
                for (offset, len) in written {
                    prop_assert!(offset % PAGE == 0 && len % PAGE == 0 && len > 0);
                    for p in offset / PAGE..(offset + len) / PAGE {
                        prop_assert!(touched[p as usize], "page {} written, no change touches it", p);
                    }
                }
            }
            prop_assert!(got == want);
        }
    }

    #[test]
    fn split_plans_send_whole_page_changes_without_copying_them() {
        let piece = |offset: u64, len: u64, byte: u8| Change::Data {
            offset,
            data: Bytes::from(vec![byte; len as usize]),
        };
        // Three changes meeting on page boundaries, then one ending inside a page and
        // one starting inside that page (they share it: one body).
        let changes = vec![
            piece(0, PAGE, 1),
            piece(PAGE, 2 * PAGE, 2),
            piece(3 * PAGE, PAGE, 3),
            piece(4 * PAGE, 100, 4),
            piece(4 * PAGE + 100, PAGE, 5),
        ];
        let at: Vec<*const u8> = changes
            .iter()
            .map(|c| match c {
                Change::Data { data, .. } => data.as_ptr(),
                Change::Zero { .. } => unreachable!(),
            })
            .collect();
        let base = vec![9u8; (8 * PAGE) as usize];
        let ops = plan(changes.clone(), Some(&base), MAX_PUT, true).unwrap();
        let puts: Vec<(u64, usize, *const u8)> = ops
            .iter()
            .map(|op| match op {
                Op::Put { offset, data } => (*offset, data.len(), data.as_ptr()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(puts.len(), 4, "{puts:?}");
        for (k, &(offset, len, ptr)) in puts[..3].iter().enumerate() {
            assert_eq!(ptr, at[k], "change {k} was copied");
            assert_eq!(
                (offset, len as u64),
                (changes[k].range().start, changes[k].range().end - offset)
            );
        }
        assert_eq!((puts[3].0, puts[3].1 as u64), (4 * PAGE, 2 * PAGE));
        // Not split (a remote store's): one body for the run.
        let ops = plan(changes, Some(&base), MAX_PUT, false).unwrap();
        assert_eq!(ops.len(), 1);
    }

    #[test]
    fn overlapping_changes_are_refused() {
        let changes = vec![
            Change::Zero {
                offset: 100,
                len: 1000,
            },
            Change::Data {
                offset: 900,
                data: Bytes::from(vec![1; 10]),
            },
        ];
        assert!(matches!(
            plan(changes, None, MAX_PUT, false),
            Err(WriteError::Overlap { offset: 900 })
        ));
    }
}
