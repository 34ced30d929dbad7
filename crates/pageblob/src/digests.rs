//! `ReplicaDigests`: the replica's block signature, kept current as batches land and stored
//! beside the blob, so a resync or failback never reads the whole replica back.

use std::collections::BTreeSet;
use std::ops::Range;

use bytes::Bytes;
use lifeboat_resync::{BlockSize, Digest, Signature};

use crate::StoreError;
use crate::store::{Condition, LeaseId, MAX_PUT, Metadata, PAGE, PageStore, crc64};
use crate::writer::Change;

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

/// The BLAKE3 block signature (as `lifeboat-resync` computes it) of the first `len` bytes
/// of a replica blob, with the blob sequence number it describes.
///
/// After each batch, [`ReplicaDigests::update`] re-hashes only the blocks the batch
/// touched (read back from the store), and [`ReplicaDigests::save`] writes only the pages
/// of the [`digests_blob`] that hold those blocks' slots (32 bytes per block, all zeros for
/// a zero block), then records the sequence number in its metadata: the cost of a save
/// follows the batch, not the disk. Digests whose sequence number is not the blob's (a
/// crash between the batch and the save) are stale: [`ReplicaDigests::load`] reports it so
/// the caller can [`rebuild`](ReplicaDigests::rebuild).
#[derive(Clone, Debug)]
pub struct ReplicaDigests {
    signature: Signature,
    sequence_number: u64,
    /// Blocks changed since the last save or load; `None`: every slot must be written.
    dirty: Option<BTreeSet<u64>>,
}

/// A batch's block digests computed from the bytes it sends ([`BatchDigests::of`]), and
/// the ranges that must be read back after it lands (blocks it covers only in part).
#[derive(Clone, Debug, Default)]
pub struct BatchDigests {
    known: Vec<(u64, Digest)>,
    rest: Vec<Range<u64>>,
}

impl BatchDigests {
    /// The digests of every block that one of `changes` covers whole, for a replica of
    /// `len` bytes in blocks of `block_size`; the rest of the touched ranges are left to
    /// be read back. Changes that overlap each other are all left to be read back (which
    /// of them lands last is the writer's business). Pure CPU: run it beside the batch.
    pub fn of(changes: &[Change], block_size: BlockSize, len: u64) -> Self {
        let mut ranges: Vec<Range<u64>> = changes.iter().map(Change::range).collect();
        ranges.sort_by_key(|r| r.start);
        if ranges.windows(2).any(|w| w[0].end > w[1].start) {
            return BatchDigests {
                known: Vec::new(),
                rest: ranges,
            };
        }
        let bs = u64::from(block_size.get());
        let mut out = BatchDigests::default();
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
                    Change::Data { offset, data } => lifeboat_resync::digest_block(
                        &data[(br.start - offset) as usize..(br.end - offset) as usize],
                    ),
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
        out
    }
}

impl PartialEq for ReplicaDigests {
    fn eq(&self, other: &Self) -> bool {
        self.signature == other.signature && self.sequence_number == other.sequence_number
    }
}

impl Eq for ReplicaDigests {}

impl ReplicaDigests {
    /// The digests of a new, all-zero replica of `len` bytes at sequence number `seq`.
    pub fn zeroed(len: u64, block_size: BlockSize, seq: u64) -> Self {
        let n = block_size.blocks(len) as usize;
        let signature = Signature::from_parts(block_size, len, vec![Digest::Zero; n])
            .expect("one digest per block by construction");
        ReplicaDigests {
            signature,
            sequence_number: seq,
            dirty: None,
        }
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The blob sequence number the digests describe.
    pub fn sequence_number(&self) -> u64 {
        self.sequence_number
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

    /// Sets one block's digest, marking it for the next save.
    fn set(&mut self, block: u64, d: Digest) -> Result<(), StoreError> {
        self.signature
            .set_digest(block, d)
            .map_err(|e| StoreError::Corrupt {
                path: "replica digests".into(),
                reason: e.to_string(),
            })?;
        if let Some(dirty) = &mut self.dirty {
            dirty.insert(block);
        }
        Ok(())
    }

    /// Records a landed batch's digests: those computed from its bytes as they are, the
    /// blocks it covered in part read back from the store; and `seq` (the blob's sequence
    /// number after the batch).
    pub async fn update_with(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        batch: BatchDigests,
        seq: u64,
    ) -> Result<(), StoreError> {
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
        let bs = self.signature.block_size();
        let len = self.signature.len();
        let mut blocks: Vec<u64> = touched
            .iter()
            .filter(|r| r.start < r.end && r.start < len)
            .flat_map(|r| {
                r.start / u64::from(bs.get())..=(r.end.min(len) - 1) / u64::from(bs.get())
            })
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        // Read runs of adjacent blocks in requests of at most 4 MiB.
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            let per = (MAX_PUT / u64::from(bs.get())).max(1);
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && (j - i) as u64 <= per {
                j += 1;
            }
            let start = bs.range(blocks[i], len).start;
            let end = bs.range(blocks[j - 1], len).end;
            let data = store.read(blob, snapshot, start, end - start).await?;
            for (k, chunk) in data.chunks(bs.get() as usize).enumerate() {
                self.set(blocks[i] + k as u64, lifeboat_resync::digest_block(chunk))?;
            }
            i = j;
        }
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
            self.signature.len(),
            self.signature.block_size(),
            self.sequence_number,
        )
        .await?;
        Ok(self.differing(&fresh))
    }

    /// Blocks whose digests differ between these and `other` (of the same geometry).
    pub fn differing(&self, other: &ReplicaDigests) -> Vec<u64> {
        self.signature
            .digests()
            .iter()
            .zip(other.signature.digests())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect()
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
        let bs = self.signature.block_size();
        let len = self.signature.len();
        let ranges: Vec<Range<u64>> = blocks.iter().map(|&b| bs.range(b, len)).collect();
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

    /// Writes the slots changed since the last save (all of them for new or rebuilt
    /// digests) into the [`digests_blob`], then its metadata, as the holder of `lease` (a
    /// digests blob this creates is leased to it).
    pub async fn save(
        &mut self,
        store: &dyn PageStore,
        blob: &str,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let name = digests_blob(blob);
        let cond = Condition::NONE.with_lease(lease);
        let n = self.signature.digests().len() as u64;
        let size = (n * SLOT).div_ceil(PAGE).max(1) * PAGE;
        match store.properties(&name).await {
            Ok(p) if p.size == size => {}
            Ok(_) => {
                store.resize(&name, size, cond).await?;
                self.dirty = None;
            }
            Err(StoreError::NotFound { .. }) => {
                // A new blob reads as zeros: only non-zero slots need writing.
                match store.create(&name, size, 0, &Metadata::new()).await {
                    Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e),
                }
                if let Some(l) = lease {
                    store.acquire_lease(&name, l).await?;
                }
                if self.dirty.is_none() {
                    self.dirty = Some(
                        (0..n)
                            .filter(|&i| self.signature.digests()[i as usize] != Digest::Zero)
                            .collect(),
                    );
                }
            }
            Err(e) => return Err(e),
        }
        // Pages to write: those holding dirty slots, in runs of at most 4 MiB.
        let per_page = PAGE / SLOT;
        let pages: Vec<u64> = match &self.dirty {
            None => (0..size / PAGE).collect(),
            Some(d) => {
                let mut p: Vec<u64> = d.iter().map(|b| b / per_page).collect();
                p.dedup();
                p
            }
        };
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len()
                && pages[j] == pages[j - 1] + 1
                && (j - i + 1) as u64 * PAGE <= MAX_PUT
            {
                j += 1;
            }
            let (first, count) = (pages[i], (j - i) as u64);
            let mut body = vec![0u8; (count * PAGE) as usize];
            for (k, slot) in body.chunks_mut(SLOT as usize).enumerate() {
                let block = first * per_page + k as u64;
                if let Some(Digest::Hash(h)) = self.signature.digests().get(block as usize) {
                    slot.copy_from_slice(h);
                }
            }
            let crc = crc64(&body);
            store
                .write_pages(&name, first * PAGE, Bytes::from(body), crc, cond)
                .await?;
            i = j;
        }
        let md = self.metadata(Some(self.sequence_number));
        store.set_metadata(&name, &md, cond).await?;
        self.dirty = Some(BTreeSet::new());
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
            (LEN_KEY.to_string(), self.signature.len().to_string()),
            (
                BS_KEY.to_string(),
                self.signature.block_size().get().to_string(),
            ),
        ]
        .into();
        if let Some(seq) = seq {
            md.insert(SEQ_KEY.to_string(), seq.to_string());
        }
        md
    }

    /// Loads the stored digests of `blob`: `Ok(None)` if there are none, or if they
    /// describe another sequence number than the blob's (stale).
    pub async fn load(store: &dyn PageStore, blob: &str) -> Result<Option<Self>, StoreError> {
        let seq = store.properties(blob).await?.sequence_number;
        Self::load_from(store, blob, None)
            .await
            .map(|d| d.filter(|d| d.sequence_number == seq))
    }

    /// Loads the digests a snapshot of the [`digests_blob`] holds (taken with a recovery
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
        let mut digests = Vec::with_capacity(n as usize);
        let mut at = 0;
        while at < n * SLOT {
            let chunk = (n * SLOT - at).min(MAX_PUT);
            let bytes = store.read(&name, snapshot, at, chunk).await?;
            for slot in bytes.chunks(SLOT as usize) {
                let mut h = [0u8; 32];
                h.copy_from_slice(slot);
                digests.push(if h == [0; 32] {
                    Digest::Zero
                } else {
                    Digest::Hash(h)
                });
            }
            at += chunk;
        }
        let signature =
            Signature::from_parts(bs, len, digests).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some(ReplicaDigests {
            signature,
            sequence_number: seq,
            dirty: Some(BTreeSet::new()),
        }))
    }
}
