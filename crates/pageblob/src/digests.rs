//! `ReplicaDigests`: the replica's block signature, kept current as batches land and stored
//! beside the blob, so a resync or failback never reads the whole replica back.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use bytes::Bytes;
use lifeboat_resync::{BlockDigester, BlockSize, Digest, Signature};

use crate::StoreError;
use crate::store::{
    Condition, LeaseId, MAX_PUT, Metadata, PAGE, PageStore, merge_ranges, subtract,
};
use crate::writer::Change;

/// The digest of a block whose bytes are unknown ([`ReplicaDigests::forget`]): 32 bytes
/// of text, which no block hashes to.
const UNKNOWN: Digest = Digest::Hash(*b"lifeboat: this block is unknown!");

/// The blob beside `blob` that holds its digests.
pub fn digests_blob(blob: &str) -> String {
    format!("{blob}.digests")
}

const LEN_KEY: &str = "disklength";
const BS_KEY: &str = "blocksize";
const SEQ_KEY: &str = "sequencenumber";
const FORMAT_KEY: &str = "digestformat";
/// Fixed 32-byte slots, one per block, at `block * 32`; all zeros for a zero block.
const FORMAT: &str = "slots32";
const SLOT: u64 = 32;

/// One page of the digests blob: [`SLOTS_PER_PAGE`] slots.
type Page = Box<[u8; PAGE as usize]>;
const SLOTS_PER_PAGE: u64 = PAGE / SLOT;

fn zero_page() -> Page {
    Box::new([0u8; PAGE as usize])
}

/// The digest a stored slot holds (all zeros: a zero block).
fn decode(slot: &[u8]) -> Digest {
    let mut h = [0u8; SLOT as usize];
    h.copy_from_slice(slot);
    if h == [0; SLOT as usize] {
        Digest::Zero
    } else {
        Digest::Hash(h)
    }
}

/// Runs of consecutive values in `sorted` (ascending, no repeats), each at most `max` long.
fn runs(sorted: &[u64], max: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &v in sorted {
        match out.last_mut() {
            Some(r) if r.end == v && r.end - r.start < max => r.end += 1,
            _ => out.push(v..v + 1),
        }
    }
    out
}

/// The blocks (of `block_size`, in a replica of `len` bytes) that `ranges` overlap, in
/// order, each once.
fn touched_blocks(ranges: &[Range<u64>], block_size: BlockSize, len: u64) -> Vec<u64> {
    touched_units(ranges, u64::from(block_size.get()), len)
}

/// The slot pages holding the digests of the blocks `ranges` overlap, in order, listed
/// without listing the blocks (a range may span a million of them).
fn touched_pages(ranges: &[Range<u64>], block_size: BlockSize, len: u64) -> Vec<u64> {
    touched_units(ranges, u64::from(block_size.get()) * SLOTS_PER_PAGE, len)
}

/// The units of `unit` bytes (blocks, or the bytes of the blocks a slot page describes)
/// of a replica of `len` bytes that `ranges` overlap, in order, each once.
fn touched_units(ranges: &[Range<u64>], unit: u64, len: u64) -> Vec<u64> {
    let mut units: Vec<u64> = ranges
        .iter()
        .filter(|r| r.start < r.end && r.start < len)
        .flat_map(|r| r.start / unit..=(r.end.min(len) - 1) / unit)
        .collect();
    units.sort_unstable();
    units.dedup();
    units
}

/// Where the slots not held in memory are read from: the digests blob, or a snapshot of it.
#[derive(Clone, Debug)]
struct Backing {
    name: String,
    snapshot: Option<String>,
    /// Saved into by this value: the blob exists with the digests' size (the next save
    /// asks nothing of it first).
    saved: bool,
    /// The pages the blob may hold other than zeros, when known (it was created by this
    /// value: every page it wrote since, or was about to); the rest read as zeros without
    /// a request. `None`: any page may.
    written: Option<Vec<Range<u64>>>,
}

impl Backing {
    /// Whether page `p` of the blob may hold anything but zeros.
    fn may_hold(&self, p: u64) -> bool {
        self.written.as_ref().is_none_or(|w| {
            let k = w.partition_point(|r| r.end <= p);
            w.get(k).is_some_and(|r| r.start <= p)
        })
    }
}

/// The BLAKE3 block signature (as `lifeboat-resync` computes it) of the first `len` bytes
/// of a replica blob, with the blob sequence number it describes.
///
/// The digests live in the [`digests_blob`] (32 bytes per block, all zeros for a zero
/// block); memory holds only the slot pages the last batch touched. After each batch,
/// [`ReplicaDigests::update_with`] reads the slot pages of the blocks the batch touched
/// (none for pages whose every block it covers whole), and re-hashes only blocks it covered
/// in part (read back from the store, unless [`BatchDigests::read_rest`] completed them
/// while the batch was sent); [`ReplicaDigests::save`] writes only those slot
/// pages, then records the sequence number in its metadata: the cost of a batch follows
/// the batch, not the disk, and so does the memory. Digests whose sequence number is not
/// the blob's (a crash between the batch and the save) are stale:
/// [`ReplicaDigests::load`] reports it so the caller can
/// [`rebuild`](ReplicaDigests::rebuild).
///
/// New, rebuilt and scanned digests are held whole (absent pages are zero slots) until
/// their first save; [`ReplicaDigests::signature`] reads every slot (a resync's whole
/// signature).
#[derive(Clone, Debug)]
pub struct ReplicaDigests {
    len: u64,
    block_size: BlockSize,
    sequence_number: u64,
    /// Slot pages held, by page index in the digests blob.
    pages: BTreeMap<u64, Page>,
    /// Where pages not held are; `None`: every page is held or all zeros, and none is
    /// stored yet (a save writes them all).
    backing: Option<Backing>,
    /// Pages changed since the last save or load (of backed digests).
    dirty: BTreeSet<u64>,
}

/// What digests say of blocks whose bytes were hashed again ([`ReplicaDigests::check`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Blocks whose digests differ from their bytes': damage.
    pub damaged: Vec<u64>,
    /// Blocks whose digests were recorded unknown: not checked (a resync sends them).
    pub unknown: Vec<u64>,
}

/// A batch's block digests computed from the bytes it sends ([`BatchDigests::of`]), and
/// the ranges that must be read back after it lands (blocks it covers only in part), unless
/// [`BatchDigests::read_rest`] completed those blocks while the batch was sent.
#[derive(Clone, Debug, Default)]
pub struct BatchDigests {
    known: Vec<(u64, Digest)>,
    rest: Vec<Range<u64>>,
    /// The replica's block size and length (`None`: no block is covered in part).
    geometry: Option<(BlockSize, u64)>,
    /// The changes overlap each other: their blocks are only read back after the batch.
    overlapping: bool,
}

/// A piece of a block [`BatchDigests::read_rest`] completes, in disk order.
enum Piece {
    /// Bytes the batch leaves: the gap read at this index.
    Gap(usize),
    /// Bytes the batch writes.
    Data(Bytes),
    /// Bytes the batch clears.
    Zeros(u64),
}

impl BatchDigests {
    /// The digests of every block that one of `changes` covers whole, for a replica of
    /// `len` bytes in blocks of `block_size`; the rest of the touched ranges are left to
    /// be read back. Changes that overlap each other are all left to be read back (which
    /// of them lands last is the writer's business). Pure CPU: run it beside the batch.
    pub fn of(changes: &[Change], block_size: BlockSize, len: u64) -> Self {
        Self::of_hashed(changes, block_size, len, |_| None)
    }

    /// [`BatchDigests::of`], taking the digest of a block that a data change covers whole,
    /// or that the changes cover whole together (data and zero runs side by side), from
    /// `hashed` where it has one (`None`: computed here, or left to be read back). For a
    /// reader that hashes each block right after reading it, while the CPU's cache still
    /// holds its bytes: hashing a 64 MiB piece after reading it all reads it from memory
    /// again.
    ///
    /// `hashed(b)` must be [`digest_block`](lifeboat_resync::digest_block) of block `b`'s
    /// bytes as `changes` hold them: the digests are recorded as the replica's, and a
    /// later resync trusts them. It is asked only of blocks the changes cover whole.
    pub fn of_hashed(
        changes: &[Change],
        block_size: BlockSize,
        len: u64,
        hashed: impl Fn(u64) -> Option<Digest>,
    ) -> Self {
        let mut ranges: Vec<Range<u64>> = changes.iter().map(Change::range).collect();
        ranges.sort_by_key(|r| r.start);
        if ranges.windows(2).any(|w| w[0].end > w[1].start) {
            return BatchDigests {
                rest: ranges,
                overlapping: true,
                ..BatchDigests::default()
            };
        }
        let bs = u64::from(block_size.get());
        let mut out = BatchDigests {
            geometry: Some((block_size, len)),
            ..BatchDigests::default()
        };
        for c in changes {
            let r = c.range();
            let first = r.start.div_ceil(bs);
            let mut whole = first..first;
            let mut b = first;
            while b < block_size.blocks(len) {
                let br = block_size.range(b, len);
                if br.end > r.end {
                    break;
                }
                let d = match c {
                    Change::Zero { .. } => Digest::Zero,
                    Change::Data { offset, data } => hashed(b).unwrap_or_else(|| {
                        lifeboat_resync::digest_block(
                            &data[(br.start - offset) as usize..(br.end - offset) as usize],
                        )
                    }),
                };
                out.known.push((b, d));
                b += 1;
                whole.end = b;
            }
            // The parts of the change outside its whole blocks.
            let covered = if whole.is_empty() {
                r.start..r.start
            } else {
                whole.start * bs..block_size.range(whole.end - 1, len).end
            };
            if r.start < covered.start || covered.is_empty() {
                let end = if covered.is_empty() {
                    r.end
                } else {
                    covered.start
                };
                out.rest.push(r.start..end);
            }
            if !covered.is_empty() && covered.end < r.end {
                out.rest.push(covered.end..r.end);
            }
        }
        // Blocks no one change covers whole but the changes do together: given or left.
        let spans = merge_ranges(ranges);
        let given: Vec<(u64, Digest)> = touched_blocks(&out.rest, block_size, len)
            .into_iter()
            .filter(|&b| {
                let br = block_size.range(b, len);
                let i = spans.partition_point(|s| s.end <= br.start);
                spans
                    .get(i)
                    .is_some_and(|s| s.start <= br.start && br.end <= s.end)
            })
            .filter_map(|b| Some((b, hashed(b)?)))
            .collect();
        if !given.is_empty() {
            let cut: Vec<Range<u64>> = given
                .iter()
                .map(|&(b, _)| block_size.range(b, len))
                .collect();
            out.rest = merge_ranges(std::mem::take(&mut out.rest))
                .iter()
                .flat_map(|r| subtract(r, &cut))
                .collect();
            out.known.extend(given);
        }
        out
    }

    /// The digests known from the batch's bytes: block and digest, in no set order.
    pub fn known(&self) -> &[(u64, Digest)] {
        &self.known
    }

    /// The ranges whose blocks are left to be read back after the batch lands.
    pub fn rest(&self) -> &[Range<u64>] {
        &self.rest
    }

    /// Adds the digests of another part of the same batch, for a batch sent in parts
    /// ([`PageWriter::send`](crate::PageWriter::send)), each part's digests made with
    /// [`BatchDigests::of_hashed`] from its own changes: a block that both parts touch
    /// (each covering it in part, or overlapping) is read back after the batch lands.
    pub fn join(&mut self, other: BatchDigests) {
        self.geometry = self.geometry.or(other.geometry);
        self.overlapping |= other.overlapping;
        self.rest.extend(other.rest);
        self.known.extend(other.known);
        self.known.sort_by_key(|&(b, _)| b);
        let mut twice = Vec::new();
        self.known.dedup_by(|next, kept| {
            let same = next.0 == kept.0;
            if same {
                twice.push(next.0);
            }
            same
        });
        if twice.is_empty() {
            return;
        }
        // Read back: a block known twice is one both parts wrote whole.
        self.known.retain(|(b, _)| !twice.contains(b));
        if let Some((block_size, len)) = self.geometry {
            self.rest
                .extend(twice.iter().map(|&b| block_size.range(b, len)));
        }
    }

    /// Completes the digests of the blocks the batch covers only in part, from the
    /// batch's bytes (`changes`, the same as given to [`BatchDigests::of`]) and the rest of
    /// each such block read from `blob`: then nothing is read back after the batch lands.
    ///
    /// Reads only bytes the batch does not change, in one
    /// [`read_ranges`](PageStore::read_ranges) call (the embedded store reads just those;
    /// a remote store merges nearby ones into one request). The batch's writer rewrites the
    /// rest of a partial 512-byte page with the bytes it holds, so this may run while the
    /// batch is sent, as long as nobody else writes the blob (its lease holder is the only
    /// writer); the blocks are hashed on a blocking thread, so the batch goes on meanwhile.
    /// Does nothing when the changes overlap each other (which lands last is the writer's
    /// business: those blocks are read back after). On an error nothing is changed and the
    /// blocks are read back after the batch as before.
    pub async fn read_rest(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        changes: &[Change],
    ) -> Result<(), StoreError> {
        let Some((block_size, len)) = self.geometry else {
            return Ok(());
        };
        if self.overlapping || self.rest.is_empty() {
            return Ok(());
        }
        let blocks = touched_blocks(&self.rest, block_size, len);
        let mut sorted: Vec<&Change> = changes.iter().collect();
        sorted.sort_by_key(|c| c.range().start);
        // Each block as pieces in disk order: the batch's changes inside it (they do not
        // overlap) and the gaps between them, all read in one call (a remote store merges
        // nearby gaps into one request).
        let mut parts = Vec::with_capacity(blocks.len());
        let mut gaps = Vec::new();
        for b in blocks {
            let br = block_size.range(b, len);
            let first = sorted.partition_point(|c| c.range().end <= br.start);
            let inside = &sorted[first..];
            let inside = &inside[..inside.partition_point(|c| c.range().start < br.end)];
            let mut pieces = Vec::with_capacity(2 * inside.len() + 1);
            let mut at = br.start;
            for c in inside {
                let r = c.range();
                let (from, to) = (r.start.max(at), r.end.min(br.end));
                if at < from {
                    pieces.push(Piece::Gap(gaps.len()));
                    gaps.push(at..from);
                }
                if from < to {
                    pieces.push(match c {
                        Change::Data { offset, data } => Piece::Data(
                            data.slice((from - offset) as usize..(to - offset) as usize),
                        ),
                        Change::Zero { .. } => Piece::Zeros(to - from),
                    });
                }
                at = at.max(to);
            }
            if at < br.end {
                pieces.push(Piece::Gap(gaps.len()));
                gaps.push(at..br.end);
            }
            parts.push((b, pieces));
        }
        let read = store.read_ranges(blob, None, &gaps).await?;
        if read.len() != gaps.len()
            || gaps
                .iter()
                .zip(&read)
                .any(|(g, b)| b.len() as u64 != g.end - g.start)
        {
            return Err(StoreError::Corrupt {
                path: blob.to_owned(),
                reason: "the store answered reads with other lengths than asked".into(),
            });
        }
        // Hashed piece by piece (nothing gathered into a block buffer), off the runtime's
        // threads: the caller's other futures (the batch being sent) go on meanwhile.
        let hash = move || -> Vec<(u64, Digest)> {
            parts
                .into_iter()
                .map(|(b, pieces)| {
                    let mut d = BlockDigester::new();
                    for p in pieces {
                        match p {
                            Piece::Gap(i) => d.update(&read[i]),
                            Piece::Data(bytes) => d.update(&bytes),
                            Piece::Zeros(n) => d.zeros(n),
                        }
                    }
                    (b, d.finish())
                })
                .collect()
        };
        let known = tokio::task::spawn_blocking(hash).await.map_err(|e| {
            let e = crate::store::unless_panic(e);
            StoreError::Client(format!("hashing a batch's blocks: {e}"))
        })?;
        self.known.extend(known);
        self.rest.clear();
        Ok(())
    }
}

impl ReplicaDigests {
    /// The digests of a new, all-zero replica of `len` bytes at sequence number `seq`.
    pub fn zeroed(len: u64, block_size: BlockSize, seq: u64) -> Self {
        ReplicaDigests {
            len,
            block_size,
            sequence_number: seq,
            pages: BTreeMap::new(),
            backing: None,
            dirty: BTreeSet::new(),
        }
    }

    /// The replica length the digests describe.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether they describe an empty replica.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// The blob sequence number the digests describe.
    pub fn sequence_number(&self) -> u64 {
        self.sequence_number
    }

    /// Bytes of slots held in memory (the rest stays in the store).
    pub fn memory(&self) -> usize {
        self.pages.len() * PAGE as usize
    }

    fn blocks(&self) -> u64 {
        self.block_size.blocks(self.len)
    }

    /// Pages of slots: the digests blob's size in pages (at least one).
    fn page_count(&self) -> u64 {
        (self.blocks() * SLOT).div_ceil(PAGE).max(1)
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: self
                .backing
                .as_ref()
                .map_or_else(|| "replica digests".into(), |b| b.name.clone()),
            reason,
        }
    }

    /// Reads pages `run` of the backing store (at most 4 MiB).
    async fn fetch(
        &self,
        store: &dyn PageStore,
        backing: &Backing,
        run: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let len = (run.end - run.start) * PAGE;
        let bytes = store
            .read(
                &backing.name,
                backing.snapshot.as_deref(),
                run.start * PAGE,
                len,
            )
            .await?;
        if bytes.len() as u64 != len {
            return Err(self.corrupt(format!(
                "read {} bytes of slots at {}, asked for {len}",
                bytes.len(),
                run.start * PAGE
            )));
        }
        Ok(bytes)
    }

    /// Reads the pages among `wanted` (ascending, no repeats) that are not held; the
    /// pages it added.
    async fn hold(
        &mut self,
        store: &dyn PageStore,
        wanted: &[u64],
    ) -> Result<Vec<u64>, StoreError> {
        let Some(backing) = &self.backing else {
            return Ok(Vec::new()); // absent pages are zero slots
        };
        let added: Vec<u64> = wanted
            .iter()
            .copied()
            .filter(|p| !self.pages.contains_key(p))
            .collect();
        let (missing, zeros): (Vec<u64>, Vec<u64>) =
            added.iter().partition(|&&p| backing.may_hold(p));
        // Pages the blob never held anything in: zeros, not read.
        for p in zeros {
            self.pages.insert(p, zero_page());
        }
        for run in runs(&missing, MAX_PUT / PAGE) {
            let bytes = self.fetch(store, backing, run.clone()).await?;
            for (p, chunk) in run.zip(bytes.chunks(PAGE as usize)) {
                let mut page = zero_page();
                page.copy_from_slice(chunk);
                self.pages.insert(p, page);
            }
        }
        Ok(added)
    }

    /// Sets one block's digest, marking its page for the next save.
    fn set(&mut self, block: u64, d: Digest) -> Result<(), StoreError> {
        if block >= self.blocks() {
            return Err(self.corrupt(format!(
                "block {block} is past the last of {}",
                self.blocks()
            )));
        }
        let p = block / SLOTS_PER_PAGE;
        let backed = self.backing.is_some();
        let page = match self.pages.entry(p) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) if !backed => e.insert(zero_page()),
            Entry::Vacant(_) => {
                return Err(self.corrupt(format!("slot page {p} was set before it was read")));
            }
        };
        let at = ((block % SLOTS_PER_PAGE) * SLOT) as usize;
        let slot = &mut page[at..at + SLOT as usize];
        match d {
            Digest::Zero => slot.fill(0),
            Digest::Hash(h) => slot.copy_from_slice(&h),
        }
        self.dirty.insert(p);
        Ok(())
    }

    /// The whole signature, reading the slots not held (memory for every block, until it
    /// is dropped).
    pub async fn signature(&self, store: &dyn PageStore) -> Result<Signature, StoreError> {
        let n = self.blocks();
        let mut digests = Vec::with_capacity(n as usize);
        let push = |page: &[u8], digests: &mut Vec<Digest>| {
            for slot in page.chunks(SLOT as usize) {
                if digests.len() as u64 == n {
                    break;
                }
                digests.push(decode(slot));
            }
        };
        let pages = self.page_count();
        let mut p = 0;
        while p < pages {
            if let Some(page) = self.pages.get(&p) {
                push(&page[..], &mut digests);
                p += 1;
                continue;
            }
            let Some(backing) = &self.backing else {
                push(&[0u8; PAGE as usize], &mut digests);
                p += 1;
                continue;
            };
            let mut q = p + 1;
            while q < pages && q - p < MAX_PUT / PAGE && !self.pages.contains_key(&q) {
                q += 1;
            }
            let bytes = self.fetch(store, backing, p..q).await?;
            push(&bytes, &mut digests);
            p = q;
        }
        Signature::from_parts(self.block_size, self.len, digests)
            .map_err(|e| self.corrupt(e.to_string()))
    }

    /// Re-hashes the blocks that `touched` ranges overlap, reading them back from the
    /// store, and records `seq` (the blob's sequence number after the batch).
    pub async fn update(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        touched: &[Range<u64>],
        seq: u64,
    ) -> Result<(), StoreError> {
        self.rehash(store, blob, None, touched).await?;
        self.sequence_number = seq;
        Ok(())
    }

    /// Records a landed batch's digests: those computed from its bytes as they are, the
    /// blocks it covered in part read back from the store; and `seq` (the blob's sequence
    /// number after the batch). Reads the slot pages the batch touched in part.
    pub async fn update_with(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        batch: BatchDigests,
        seq: u64,
    ) -> Result<(), StoreError> {
        // A page whose every slot the batch sets is not read first.
        let n = self.blocks();
        let mut set_in: BTreeMap<u64, u64> = BTreeMap::new();
        for (b, _) in &batch.known {
            *set_in.entry(b / SLOTS_PER_PAGE).or_default() += 1;
        }
        let (mut whole, mut part) = (Vec::new(), Vec::new());
        for (&p, &count) in &set_in {
            if count == SLOTS_PER_PAGE.min(n.saturating_sub(p * SLOTS_PER_PAGE)) {
                whole.push(p);
            } else {
                part.push(p);
            }
        }
        self.hold(store, &part).await?;
        for p in whole {
            self.pages.entry(p).or_insert_with(zero_page);
        }
        for (block, d) in batch.known {
            self.set(block, d)?;
        }
        self.rehash(store, blob, None, &batch.rest).await?;
        self.sequence_number = seq;
        Ok(())
    }

    /// Re-hashes the blocks that `touched` ranges overlap from the blob, or from one of
    /// its snapshots.
    async fn rehash(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        snapshot: Option<&str>,
        touched: &[Range<u64>],
    ) -> Result<(), StoreError> {
        let (bs, len) = (self.block_size, self.len);
        let size = u64::from(bs.get());
        let blocks = touched_blocks(touched, bs, len);
        let mut pages: Vec<u64> = blocks.iter().map(|b| b / SLOTS_PER_PAGE).collect();
        pages.dedup();
        self.hold(store, &pages).await?;
        // Read runs of adjacent blocks in requests of at most 4 MiB.
        for run in runs(&blocks, (MAX_PUT / size).max(1)) {
            let start = bs.range(run.start, len).start;
            let end = bs.range(run.end - 1, len).end;
            let data = store.read(blob, snapshot, start, end - start).await?;
            for (b, chunk) in run.zip(data.chunks(size as usize)) {
                self.set(b, lifeboat_resync::digest_block(chunk))?;
            }
        }
        Ok(())
    }

    /// Holds the slot pages of the blocks `range` overlaps, reading those the digests blob
    /// may hold (in as few requests as their runs allow), until the next
    /// [`save`](Self::save) (which keeps the pages it wrote): for a caller asking
    /// [`known_zero`](Self::known_zero) about a range a part at a time (an initial copy
    /// resumed over a replica's digests, a segment at a time), so each page is read once,
    /// not once per part. A new replica's digests read nothing.
    pub async fn hold_range(
        &mut self,
        store: &dyn PageStore,
        range: Range<u64>,
    ) -> Result<(), StoreError> {
        let Some(backing) = &self.backing else {
            return Ok(());
        };
        let pages: Vec<u64> = touched_pages(&[range], self.block_size, self.len)
            .into_iter()
            .filter(|&p| backing.may_hold(p))
            .collect();
        self.hold(store, &pages).await.map(drop)
    }

    /// For each of `ranges`, whether every block it overlaps is recorded as all zeros
    /// (reading the slots not held): what the replica holds there already, so zeros need
    /// not be sent (an initial copy onto a new replica: every block). A block recorded
    /// unknown ([`forget`](Self::forget)) is not zero, nor is a range reaching past the
    /// replica's end or empty.
    pub async fn known_zero(
        &mut self,
        store: &dyn PageStore,
        ranges: &[Range<u64>],
    ) -> Result<Vec<bool>, StoreError> {
        // Pages the blob never held anything in are zero slots: not held for this (a
        // thin disk's copy asks about runs of a million blocks).
        let pages: Vec<u64> = match &self.backing {
            Some(backing) => touched_pages(ranges, self.block_size, self.len)
                .into_iter()
                .filter(|&p| backing.may_hold(p))
                .collect(),
            None => Vec::new(),
        };
        // Pages read only for this are let go after (a copy of a thin disk asks about
        // every block of it; what is held grows with what batches write, not with this).
        let fetched = self.hold(store, &pages).await?;
        let size = u64::from(self.block_size.get());
        let known = ranges
            .iter()
            .map(|r| {
                if r.start >= r.end || r.end > self.len {
                    return false;
                }
                // Slot page by slot page (one lookup each; a page not held is zeros): a
                // zero slot is all zero bytes (`decode`).
                let blocks = r.start / size..(r.end - 1) / size + 1;
                let pages = blocks.start / SLOTS_PER_PAGE..(blocks.end - 1) / SLOTS_PER_PAGE + 1;
                pages.into_iter().all(|p| {
                    let Some(page) = self.pages.get(&p) else {
                        return true;
                    };
                    let first = blocks.start.max(p * SLOTS_PER_PAGE) - p * SLOTS_PER_PAGE;
                    let end = blocks.end.min((p + 1) * SLOTS_PER_PAGE) - p * SLOTS_PER_PAGE;
                    lifeboat_resync::is_zero(&page[(first * SLOT) as usize..(end * SLOT) as usize])
                })
            })
            .collect();
        for p in fetched {
            self.pages.remove(&p);
        }
        Ok(known)
    }

    /// Marks the blocks that `touched` ranges overlap as unknown, and records `seq`: for
    /// blocks whose bytes cannot be read back as they are (a store that says they may not
    /// be on disk). An unknown block's digest equals no block's (it is not a BLAKE3 output
    /// anyone can aim at), so a resync sends it again.
    pub async fn forget(
        &mut self,
        store: &dyn PageStore,
        touched: &[Range<u64>],
        seq: u64,
    ) -> Result<(), StoreError> {
        let blocks = touched_blocks(touched, self.block_size, self.len);
        let mut pages: Vec<u64> = blocks.iter().map(|b| b / SLOTS_PER_PAGE).collect();
        pages.dedup();
        self.hold(store, &pages).await?;
        for b in blocks {
            self.set(b, UNKNOWN)?;
        }
        self.sequence_number = seq;
        Ok(())
    }

    /// Recomputes every digest from the blob (after a crash left them stale).
    pub async fn rebuild(
        store: &dyn PageStore,
        blob: &str,
        len: u64,
        block_size: BlockSize,
    ) -> Result<Self, StoreError> {
        let seq = store.properties(blob).await?.sequence_number;
        ReplicaDigests::rebuild_at(store, blob, None, len, block_size, seq).await
    }

    /// Computes every digest from the blob, or one of its snapshots, recording `seq`.
    pub async fn rebuild_at(
        store: &dyn PageStore,
        blob: &str,
        snapshot: Option<&str>,
        len: u64,
        block_size: BlockSize,
        seq: u64,
    ) -> Result<Self, StoreError> {
        let mut d = ReplicaDigests::zeroed(len, block_size, seq);
        // Unallocated ranges read as zeros: hash only what is allocated.
        let ranges = store.page_ranges(blob, snapshot).await?;
        d.rehash(store, blob, snapshot, &ranges).await?;
        Ok(d)
    }

    /// The digests of every byte of the blob, or of one of its snapshots, recording `seq`:
    /// unlike [`ReplicaDigests::rebuild_at`] it reads unallocated ranges too (a store may
    /// hold stray bytes there: verify must see what a read would return).
    pub async fn scan_at(
        store: &dyn PageStore,
        blob: &str,
        snapshot: Option<&str>,
        len: u64,
        block_size: BlockSize,
        seq: u64,
    ) -> Result<Self, StoreError> {
        let mut d = ReplicaDigests::zeroed(len, block_size, seq);
        d.rehash(store, blob, snapshot, std::slice::from_ref(&(0..len)))
            .await?;
        Ok(d)
    }

    /// Blocks recorded unknown ([`forget`](Self::forget): a batch that failed part-way
    /// and could not be read back): they describe nothing, and a resync sends them.
    pub async fn unknown(&self, store: &dyn PageStore) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .signature(store)
            .await?
            .digests()
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == UNKNOWN)
            .map(|(i, _)| i as u64)
            .collect())
    }

    /// Blocks whose stored digest does not match the blob's current bytes.
    pub async fn verify(&self, store: &dyn PageStore, blob: &str) -> Result<Vec<u64>, StoreError> {
        self.verify_at(store, blob, None).await
    }

    /// Blocks whose digest here does not match the bytes of the blob, or of one of its
    /// snapshots (reads all of them).
    pub async fn verify_at(
        &self,
        store: &dyn PageStore,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<u64>, StoreError> {
        let fresh = ReplicaDigests::scan_at(
            store,
            blob,
            snapshot,
            self.len,
            self.block_size,
            self.sequence_number,
        )
        .await?;
        self.differing(store, &fresh).await
    }

    /// These digests against `actual` (of the same geometry: the bytes hashed again, by
    /// [`scan_at`](Self::scan_at)), reading each one's slots once: the blocks they differ
    /// in, but for those recorded unknown here, which are listed apart (an unknown digest
    /// matches no bytes).
    pub async fn check(
        &self,
        store: &dyn PageStore,
        actual: &ReplicaDigests,
    ) -> Result<Checked, StoreError> {
        let (a, b) = (self.signature(store).await?, actual.signature(store).await?);
        let mut c = Checked::default();
        for (i, (a, b)) in a.digests().iter().zip(b.digests()).enumerate() {
            if *a == UNKNOWN {
                c.unknown.push(i as u64);
            } else if a != b {
                c.damaged.push(i as u64);
            }
        }
        Ok(c)
    }

    /// Blocks whose digests differ between these and `other` (of the same geometry),
    /// reading the slots neither holds.
    pub async fn differing(
        &self,
        store: &dyn PageStore,
        other: &ReplicaDigests,
    ) -> Result<Vec<u64>, StoreError> {
        let (a, b) = (self.signature(store).await?, other.signature(store).await?);
        Ok(a.digests()
            .iter()
            .zip(b.digests())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect())
    }

    /// Re-hashes `blocks` from the blob's current bytes (the digests then describe what the
    /// blob holds, damaged or not: a resync compares the source with them and sends what
    /// differs).
    pub async fn rehash_blocks(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        blocks: &[u64],
    ) -> Result<(), StoreError> {
        let ranges: Vec<Range<u64>> = blocks
            .iter()
            .map(|&b| self.block_size.range(b, self.len))
            .collect();
        self.rehash(store, blob, None, &ranges).await
    }

    /// Whether the stored digests of `blob` describe its current sequence number (reads
    /// metadata only).
    pub async fn is_current(store: &dyn PageStore, blob: &str) -> Result<bool, StoreError> {
        let p = match store.properties(&digests_blob(blob)).await {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let seq = p.metadata.get(SEQ_KEY).and_then(|v| v.parse::<u64>().ok());
        Ok(
            p.metadata.get(FORMAT_KEY).map(String::as_str) == Some(FORMAT)
                && seq == Some(store.properties(blob).await?.sequence_number),
        )
    }

    /// Writes the slot pages changed since the last save (all of them for new, rebuilt
    /// or scanned digests) into the [`digests_blob`], then its metadata, as the holder of
    /// `lease` (a digests blob this creates is leased to it). Afterwards only the pages
    /// just written stay in memory.
    pub async fn save(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let name = digests_blob(blob);
        let cond = Condition::NONE.with_lease(lease);
        let count = self.page_count();
        if self.backing.as_ref().is_some_and(|b| b.snapshot.is_some()) {
            // Loaded from a snapshot: the live blob does not hold the pages not read.
            let all: Vec<u64> = (0..count).collect();
            self.hold(store, &all).await?;
            self.backing = None;
        }
        let size = count * PAGE;
        // Once saved into, the blob is known to exist with this size.
        let existing = self.backing.as_ref().is_some_and(|b| b.saved)
            || match store.properties(&name).await {
                Ok(p) => {
                    if p.size != size {
                        store.resize(&name, size, cond).await?;
                    }
                    true
                }
                Err(StoreError::NotFound { .. }) if self.backing.is_none() => {
                    // Made by another meanwhile: it may hold anything, as an existing one.
                    let made = match store.create(&name, size, 0, &Metadata::new()).await {
                        Ok(()) => true,
                        Err(StoreError::AlreadyExists { .. }) => false,
                        Err(e) => return Err(e),
                    };
                    if let Some(l) = lease {
                        store.acquire_lease(&name, l).await?;
                    }
                    !made
                }
                Err(e) => return Err(e),
            };
        let pages: Vec<u64> = match (&self.backing, existing) {
            (Some(_), _) => self.dirty.iter().copied().collect(),
            // Everything, over whatever the blob held.
            (None, true) => (0..count).collect(),
            // A new blob reads as zeros: only non-zero pages.
            (None, false) => self
                .pages
                .iter()
                .filter(|(_, page)| page.iter().any(|&b| b != 0))
                .map(|(&p, _)| p)
                .collect(),
        };
        let runs = runs(&pages, MAX_PUT / PAGE);
        // The pages the blob may hold other than zeros, known for one this value made,
        // counted before they are written (a save that fails part-way may have written
        // any of them).
        let written = match (&self.backing, existing) {
            (_, false) => Some(Vec::new()),
            (Some(b), true) => b.written.clone(),
            (None, true) => None,
        }
        .map(|mut w| {
            w.extend(runs.iter().cloned());
            merge_ranges(w)
        });
        if let Some(b) = &mut self.backing {
            b.written.clone_from(&written);
        }
        // One copy-on-write of every page the runs change (a store with snapshots would
        // otherwise preserve them run by run, two fsyncs each).
        let ranges = merge_ranges(runs.iter().map(|r| r.start * PAGE..r.end * PAGE).collect());
        if existing && !ranges.is_empty() {
            store.prepare_overwrite(&name, &ranges, cond).await?;
        }
        for run in runs {
            let mut body = Vec::with_capacity(((run.end - run.start) * PAGE) as usize);
            for p in run.clone() {
                match self.pages.get(&p) {
                    Some(page) => body.extend_from_slice(&page[..]),
                    None => body.resize(body.len() + PAGE as usize, 0),
                }
            }
            let crc = store.content_crc64(&body);
            store
                .write_pages(&name, run.start * PAGE, Bytes::from(body), crc, cond)
                .await?;
        }
        let md = self.metadata(Some(self.sequence_number));
        store.set_metadata(&name, &md, cond).await?;
        // The store holds every slot now: keep only the pages this save wrote for a
        // backed batch (the next batch often touches them again).
        if self.backing.is_some() {
            let dirty = std::mem::take(&mut self.dirty);
            self.pages.retain(|p, _| dirty.contains(p));
        } else {
            self.pages.clear();
            self.dirty.clear();
        }
        self.backing = Some(Backing {
            name,
            snapshot: None,
            saved: true,
            written,
        });
        Ok(())
    }

    /// Marks the stored digests of `blob` as describing no sequence number until the next
    /// [`save`](ReplicaDigests::save): called before a batch is written, so a batch that
    /// lands only in part (a crash, a request that failed for good) never leaves digests
    /// that claim the blob's sequence number while its bytes changed. Such digests load as
    /// stale and are rebuilt.
    pub async fn begin_batch(
        &self,
        store: &dyn PageStore,
        blob: &str,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let cond = Condition::NONE.with_lease(lease);
        match store
            .set_metadata(&digests_blob(blob), &self.metadata(None), cond)
            .await
        {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The digests blob's metadata; without a sequence number, they describe none.
    fn metadata(&self, seq: Option<u64>) -> Metadata {
        let mut md: Metadata = [
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (LEN_KEY.to_string(), self.len.to_string()),
            (BS_KEY.to_string(), self.block_size.get().to_string()),
        ]
        .into();
        if let Some(seq) = seq {
            md.insert(SEQ_KEY.to_string(), seq.to_string());
        }
        md
    }

    /// The stored digests of `blob` (reads metadata only: slots are read when a batch
    /// touches them): `Ok(None)` if there are none, or if they describe another sequence
    /// number than the blob's (stale).
    pub async fn load(store: &dyn PageStore, blob: &str) -> Result<Option<Self>, StoreError> {
        let seq = store.properties(blob).await?.sequence_number;
        Self::load_from(store, blob, None)
            .await
            .map(|d| d.filter(|d| d.sequence_number == seq))
    }

    /// The digests a snapshot of the [`digests_blob`] holds (taken with a recovery
    /// point: they describe the replica's snapshot of the same moment).
    pub async fn load_at(
        store: &dyn PageStore,
        blob: &str,
        digests_snapshot: &str,
    ) -> Result<Option<Self>, StoreError> {
        Self::load_from(store, blob, Some(digests_snapshot)).await
    }

    async fn load_from(
        store: &dyn PageStore,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Option<Self>, StoreError> {
        let name = digests_blob(blob);
        let p = match snapshot {
            Some(s) => store.snapshot_properties(&name, s).await,
            None => store.properties(&name).await,
        };
        let p = match p {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let md = &p.metadata;
        let field = |k: &str| md.get(k).and_then(|v| v.parse::<u64>().ok());
        let (Some(len), Some(bs), Some(seq)) = (field(LEN_KEY), field(BS_KEY), field(SEQ_KEY))
        else {
            return Ok(None);
        };
        if md.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Ok(None);
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            path: name.clone(),
            reason,
        };
        let bs = u32::try_from(bs)
            .ok()
            .and_then(|b| BlockSize::new(b).ok())
            .ok_or_else(|| corrupt(format!("block size {bs}")))?;
        let n = bs.blocks(len);
        if n.checked_mul(SLOT).is_none_or(|b| b > p.size) {
            return Err(corrupt(format!(
                "{n} blocks do not fit in {} bytes",
                p.size
            )));
        }
        Ok(Some(ReplicaDigests {
            len,
            block_size: bs,
            sequence_number: seq,
            pages: BTreeMap::new(),
            backing: Some(Backing {
                name,
                snapshot: snapshot.map(str::to_owned),
                saved: false,
                written: None,
            }),
            dirty: BTreeSet::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{BatchDigests, runs, touched_blocks};
    use crate::Change;
    use bytes::Bytes;
    use lifeboat_resync::{BlockSize, Digest, digest_block};

    /// A digest given for a block a data change covers whole is the one kept; the other
    /// blocks are digested from the changes.
    #[test]
    fn given_digests_are_taken_for_whole_data_blocks() {
        let bs = BlockSize::new(512).unwrap();
        let data: Vec<u8> = (0..2048u32).map(|i| (i % 251 + 1) as u8).collect();
        let changes = [
            Change::Data {
                offset: 512,
                data: Bytes::from(data.clone()),
            },
            Change::Zero {
                offset: 4096,
                len: 512,
            },
        ];
        let given = Digest::Hash([7; 32]);
        let b = BatchDigests::of_hashed(&changes, bs, 8192, |b| (b == 2).then_some(given));
        let want: Vec<(u64, Digest)> = (1..5)
            .map(|b| match b {
                2 => (b, given),
                _ => (b, digest_block(&data[(b as usize - 1) * 512..][..512])),
            })
            .chain([(8, Digest::Zero)])
            .collect();
        assert_eq!(b.known, want);
        let computed = (2, digest_block(&data[512..1024]));
        assert_eq!(BatchDigests::of(&changes, bs, 8192).known[1], computed);
    }

    #[test]
    fn given_digests_are_taken_for_blocks_the_changes_cover_whole_together() {
        let bs = BlockSize::new(512).unwrap();
        let data = |offset: u64, n: usize| Change::Data {
            offset,
            data: Bytes::from(vec![9u8; n]),
        };
        // Block 1 is data, zeros, data; block 2 the same but not given; block 4 has a gap
        // (its last 100 bytes are the replica's); block 5 lies whole in one change.
        let changes = [
            data(512, 200),
            Change::Zero {
                offset: 712,
                len: 100,
            },
            data(812, 212 + 300),
            Change::Zero {
                offset: 1324,
                len: 212,
            },
            data(2048, 412),
            data(2560, 512),
        ];
        let asked = std::cell::RefCell::new(Vec::new());
        let given = Digest::Hash([7; 32]);
        let b = BatchDigests::of_hashed(&changes, bs, 8192, |b| {
            asked.borrow_mut().push(b);
            (b != 2).then_some(given)
        });
        assert_eq!(*asked.borrow(), [5, 1, 2]);
        let mut known = b.known.clone();
        known.sort_by_key(|k| k.0);
        assert_eq!(known, [(1, given), (5, given)]);
        assert_eq!(b.rest, [1024..1536, 2048..2460]);
        // Without given digests those blocks are read back (block 5 is hashed here).
        let b = BatchDigests::of(&changes, bs, 8192);
        assert_eq!(touched_blocks(&b.rest, bs, 8192), [1, 2, 4]);
        assert_eq!(b.known, [(5, digest_block(&[9u8; 512]))]);
    }

    /// Random changes side by side and apart over a replica of random bytes, digests given
    /// for random blocks as the changes' bytes hash with their gaps filled by other bytes
    /// (right only for a block the changes cover whole): every digest known is the block's
    /// as it lands, and the rest names every other touched block.
    #[test]
    fn batch_digests_describe_the_blocks_as_they_land() {
        use proptest::prelude::*;
        const BS: u64 = 512;
        let segment = (1..3 * BS, 0..4u8, any::<u8>());
        let case = (
            prop_oneof![Just(8 * BS), Just(8 * BS - 256)],
            proptest::collection::vec(segment, 1..12),
            any::<u64>(),
            any::<u64>(),
        );
        proptest!(|((len, segments, seed, given_mask) in case)| {
            let bs = BlockSize::new(BS as u32).unwrap();
            let mut rng = lifeboat_source::SplitMix64::new(seed);
            let old = rng.bytes(len as usize);
            // The replica as it lands, and as the changes alone say it (gaps 0xEE).
            let (mut landed, mut said) = (old.clone(), vec![0xEE; len as usize]);
            let mut changes = Vec::new();
            let mut at = 0;
            for (n, kind, byte) in segments {
                let r = at as usize..(at + n).min(len) as usize;
                if r.is_empty() {
                    break;
                }
                match kind {
                    // Data: some zero bytes among others, or a gap (the replica's bytes).
                    0 | 1 => {
                        let mut data = rng.bytes(r.len());
                        data.iter_mut().step_by(3).for_each(|b| *b &= byte);
                        landed[r.clone()].copy_from_slice(&data);
                        said[r.clone()].copy_from_slice(&data);
                        changes.push(Change::Data {
                            offset: r.start as u64,
                            data: Bytes::from(data),
                        });
                    }
                    2 => {
                        landed[r.clone()].fill(0);
                        said[r.clone()].fill(0);
                        changes.push(Change::Zero {
                            offset: r.start as u64,
                            len: r.len() as u64,
                        });
                    }
                    _ => {}
                }
                at = r.end as u64;
            }
            let block = |bytes: &[u8], b: u64| {
                let r = bs.range(b, len);
                digest_block(&bytes[r.start as usize..r.end as usize])
            };
            let batch = BatchDigests::of_hashed(&changes, bs, len, |b| {
                (given_mask >> b & 1 == 1).then(|| block(&said, b))
            });
            let ranges: Vec<_> = changes.iter().map(Change::range).collect();
            let touched = touched_blocks(&ranges, bs, len);
            let rest = touched_blocks(&batch.rest, bs, len);
            let mut known: Vec<u64> = batch.known.iter().map(|k| k.0).collect();
            for &(b, d) in &batch.known {
                prop_assert_eq!(d, block(&landed, b), "block {}", b);
            }
            known.sort_unstable();
            prop_assert!(known.windows(2).all(|w| w[0] < w[1]), "a block known twice");
            prop_assert!(rest.iter().all(|b| known.binary_search(b).is_err()));
            let mut all: Vec<u64> = known.into_iter().chain(rest).collect();
            all.sort_unstable();
            prop_assert_eq!(all, touched);
        });
    }

    #[test]
    fn runs_split_at_gaps_and_at_their_limit() {
        assert_eq!(runs(&[], 4), []);
        assert_eq!(runs(&[1, 2, 3, 7, 8, 20], 4), [1..4, 7..9, 20..21]);
        assert_eq!(runs(&[0, 1, 2, 3, 4, 5], 4), [0..4, 4..6]);
    }
}
