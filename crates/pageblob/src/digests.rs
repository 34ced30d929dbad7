//! `ReplicaDigests`: the replica's block signature, kept current as batches land and stored
//! beside the blob, so a resync or failback never reads the whole replica back.

use std::ops::Range;

use bytes::Bytes;
use lifeboat_resync::{BlockSize, Digest, Signature};

use crate::StoreError;
use crate::store::{Condition, MAX_PUT, Metadata, PAGE, PageStore, crc64};

/// The blob beside `blob` that holds its digests.
pub fn digests_blob(blob: &str) -> String {
    format!("{blob}.digests")
}

const LEN_KEY: &str = "encodedlength";
const SEQ_KEY: &str = "sequencenumber";

/// The BLAKE3 block signature (lifeboat-resync format) of the first `len` bytes of a
/// replica blob, with the blob sequence number it describes.
///
/// After each batch, [`ReplicaDigests::update`] re-hashes only the blocks the batch
/// touched (read back from the store), and [`ReplicaDigests::save`] stores the encoding
/// in a page blob named [`digests_blob`] whose metadata records its length and sequence
/// number. A signature whose sequence number is not the blob's (a crash between the batch
/// and the save) is stale: [`ReplicaDigests::load`] reports it so the caller can
/// [`rebuild`](ReplicaDigests::rebuild).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaDigests {
    signature: Signature,
    sequence_number: u64,
}

impl ReplicaDigests {
    /// The digests of a new, all-zero replica of `len` bytes at sequence number `seq`.
    pub fn zeroed(len: u64, block_size: BlockSize, seq: u64) -> Self {
        let n = block_size.blocks(len) as usize;
        let signature = Signature::from_parts(block_size, len, vec![Digest::Zero; n])
            .expect("one digest per block by construction");
        ReplicaDigests {
            signature,
            sequence_number: seq,
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
    pub async fn update<S: PageStore>(
        &mut self,
        store: &S,
        blob: &str,
        touched: &[Range<u64>],
        seq: u64,
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
            let data = store.read(blob, None, start, end - start).await?;
            for (k, chunk) in data.chunks(bs.get() as usize).enumerate() {
                let d = if chunk.iter().all(|&b| b == 0) {
                    Digest::Zero
                } else {
                    Digest::Hash(*blake3::hash(chunk).as_bytes())
                };
                self.signature
                    .set_digest(blocks[i] + k as u64, d)
                    .map_err(|e| StoreError::Invalid(e.to_string()))?;
            }
            i = j;
        }
        self.sequence_number = seq;
        Ok(())
    }

    /// Recomputes every digest from the blob (after a crash left them stale).
    pub async fn rebuild<S: PageStore>(
        store: &S,
        blob: &str,
        len: u64,
        block_size: BlockSize,
    ) -> Result<Self, StoreError> {
        let seq = store.properties(blob).await?.sequence_number;
        let mut d = ReplicaDigests::zeroed(len, block_size, seq);
        // Unallocated ranges read as zeros: hash only what is allocated.
        let ranges = store.page_ranges(blob, None).await?;
        d.update(store, blob, &ranges, seq).await?;
        Ok(d)
    }

    /// Blocks whose stored digest does not match the blob's current bytes.
    pub async fn verify<S: PageStore>(
        &self,
        store: &S,
        blob: &str,
    ) -> Result<Vec<u64>, StoreError> {
        let fresh = ReplicaDigests::rebuild(
            store,
            blob,
            self.signature.len(),
            self.signature.block_size(),
        )
        .await?;
        Ok(self
            .signature
            .digests()
            .iter()
            .zip(fresh.signature.digests())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect())
    }

    /// Stores the encoding in the [`digests_blob`], replacing what was there.
    pub async fn save<S: PageStore>(&self, store: &S, blob: &str) -> Result<(), StoreError> {
        let name = digests_blob(blob);
        let bytes = self.signature.encode();
        let size = (bytes.len() as u64).div_ceil(PAGE) * PAGE;
        match store.properties(&name).await {
            Ok(p) if p.size != size => store.resize(&name, size).await?,
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                store.create(&name, size, 0, &Metadata::new()).await?
            }
            Err(e) => return Err(e),
        }
        let mut padded = bytes.clone();
        padded.resize(size as usize, 0);
        for (k, piece) in padded.chunks(MAX_PUT as usize).enumerate() {
            let at = k as u64 * MAX_PUT;
            store
                .write_pages(
                    &name,
                    at,
                    Bytes::copy_from_slice(piece),
                    crc64(piece),
                    Condition::NONE,
                )
                .await?;
        }
        let md: Metadata = [
            (LEN_KEY.to_string(), bytes.len().to_string()),
            (SEQ_KEY.to_string(), self.sequence_number.to_string()),
        ]
        .into();
        store.set_metadata(&name, &md).await
    }

    /// Loads the stored digests of `blob`: `Ok(None)` if there are none, or if they
    /// describe another sequence number than the blob's (stale).
    pub async fn load<S: PageStore>(store: &S, blob: &str) -> Result<Option<Self>, StoreError> {
        let name = digests_blob(blob);
        let p = match store.properties(&name).await {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let field = |k: &str| p.metadata.get(k).and_then(|v| v.parse::<u64>().ok());
        let (Some(len), Some(seq)) = (field(LEN_KEY), field(SEQ_KEY)) else {
            return Ok(None);
        };
        if seq != store.properties(blob).await?.sequence_number || len > p.size {
            return Ok(None);
        }
        let bytes = store.read(&name, None, 0, len).await?;
        let signature = Signature::decode(&bytes).map_err(|e| StoreError::Corrupt {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(ReplicaDigests {
            signature,
            sequence_number: seq,
        }))
    }
}
