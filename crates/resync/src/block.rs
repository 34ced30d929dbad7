//! Block size, progress, and the chunked read loop every pass shares.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::io::BlockSource;
use crate::signature::Digest;

/// A block size: a power of two of at least 512 bytes (at most 1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

impl BlockSize {
    /// 64 KiB, the default.
    pub const DEFAULT: BlockSize = BlockSize(64 << 10);

    /// Checks `bytes`.
    pub fn new(bytes: u32) -> Result<Self, Error> {
        if bytes.is_power_of_two() && (512..=1 << 30).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(Error::BadBlockSize { found: bytes })
        }
    }

    /// The size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// How many blocks a disk of `len` bytes has (the last may be short).
    pub fn blocks(self, len: u64) -> u64 {
        len.div_ceil(u64::from(self.0))
    }

    /// The byte range of block `index` of a disk of `len` bytes.
    pub fn range(self, index: u64, len: u64) -> Range<u64> {
        let start = index.saturating_mul(u64::from(self.0)).min(len);
        start..start.saturating_add(u64::from(self.0)).min(len)
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize::DEFAULT
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = Error;

    fn try_from(v: u32) -> Result<Self, Error> {
        BlockSize::new(v)
    }
}

impl From<BlockSize> for u32 {
    fn from(b: BlockSize) -> u32 {
        b.0
    }
}

/// How far a long pass has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Blocks processed so far (the cursor to resume from).
    pub blocks_done: u64,
    /// Blocks in the whole pass.
    pub blocks_total: u64,
    /// Bytes found to differ so far.
    pub bytes_differing: u64,
}

impl Progress {
    pub(crate) fn new(blocks_done: u64, blocks_total: u64, bytes_differing: u64) -> Self {
        Progress {
            blocks_done,
            blocks_total,
            bytes_differing,
        }
    }
}

/// Bytes read per request: large sequential reads (≥ 1 MiB), a whole number of blocks.
pub(crate) fn chunk_len(block_size: BlockSize) -> u64 {
    (8u64 << 20).max(u64::from(block_size.get()))
}

/// Whether every byte is zero; 256-byte strides OR-fold in vector registers.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut strides = data.chunks_exact(256);
    for s in &mut strides {
        if s.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    strides.remainder().iter().all(|&b| b == 0)
}

/// The digest of one block: zero detected first, BLAKE3 otherwise.
pub(crate) fn digest_block(block: &[u8]) -> Digest {
    if is_zero(block) {
        Digest::Zero
    } else {
        Digest::Hash(*blake3::hash(block).as_bytes())
    }
}

/// Applies `f` to each block of `chunk`, in order; on all cores with `parallel`.
pub(crate) fn map_blocks<T: Send>(
    chunk: &[u8],
    block_size: BlockSize,
    f: impl Fn(&[u8]) -> T + Sync + Send,
) -> Vec<T> {
    let bs = block_size.get() as usize;
    #[cfg(feature = "parallel")]
    {
        use rayon::prelude::*;
        chunk.par_chunks(bs).map(f).collect()
    }
    #[cfg(not(feature = "parallel"))]
    {
        chunk.chunks(bs).map(f).collect()
    }
}

/// Reads blocks `blocks` of `source` (of length `len`) in large chunks and calls
/// `f(first_block_index, bytes)` for each; the last chunk may end in a short block.
pub(crate) fn for_each_chunk<S: BlockSource + ?Sized>(
    source: &S,
    block_size: BlockSize,
    len: u64,
    blocks: Range<u64>,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let bs = u64::from(block_size.get());
    let per_chunk = chunk_len(block_size) / bs;
    let mut buf = Vec::new();
    let mut first = blocks.start;
    while first < blocks.end {
        let last = (first + per_chunk).min(blocks.end);
        let start = first * bs;
        let end = (last * bs).min(len);
        buf.resize((end - start) as usize, 0);
        source
            .read_exact_at(&mut buf, start)
            .map_err(|e| Error::io(start, e))?;
        f(first, &buf)?;
        first = last;
    }
    Ok(())
}

/// `(0..n).map(f)`, on all cores with `parallel`.
pub(crate) fn map_range<T: Send>(n: u64, f: impl Fn(u64) -> T + Sync + Send) -> Vec<T> {
    #[cfg(feature = "parallel")]
    {
        use rayon::prelude::*;
        (0..n).into_par_iter().map(f).collect()
    }
    #[cfg(not(feature = "parallel"))]
    {
        (0..n).map(f).collect()
    }
}
