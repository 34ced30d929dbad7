//! Block size, progress, and the chunked read loop every pass shares.

use std::ops::{ControlFlow, Range};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::signature::Digest;
use lifeboat_source::{PlacedBuf, ReadAt};

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
    (1u64 << 20).max(u64::from(block_size.get()))
}

/// Whether every byte is zero; 256-byte strides OR-fold in vector registers.
///
/// ```
/// assert!(lifeboat_resync::is_zero(&[0; 4096]));
/// assert!(!lifeboat_resync::is_zero(&[0, 0, 1]));
/// ```
pub fn is_zero(data: &[u8]) -> bool {
    let mut strides = data.chunks_exact(256);
    for s in &mut strides {
        if s.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    strides.remainder().iter().all(|&b| b == 0)
}

/// The digest of one block: [`Digest::Zero`] when every byte is zero, else its BLAKE3
/// hash. The one home of this rule: signatures, and the digests a replica store keeps,
/// must agree on it byte for byte or a resync sees every block as changed.
///
/// ```
/// use lifeboat_resync::{Digest, digest_block};
/// assert_eq!(digest_block(&[0; 512]), Digest::Zero);
/// assert_ne!(digest_block(&[1; 512]), Digest::Zero);
/// ```
pub fn digest_block(block: &[u8]) -> Digest {
    if is_zero(block) {
        Digest::Zero
    } else {
        Digest::Hash(*blake3::hash(block).as_bytes())
    }
}

/// [`digest_block`] of a block given in pieces, in order, without gathering them into one
/// buffer: the digest of their concatenation (zero when every piece is).
///
/// ```
/// use lifeboat_resync::{BlockDigester, digest_block};
/// let mut d = BlockDigester::new();
/// d.update(&[7; 1000]);
/// d.zeros(24);
/// let mut whole = vec![7; 1000];
/// whole.extend([0; 24]);
/// assert_eq!(d.finish(), digest_block(&whole));
/// ```
#[derive(Clone, Debug)]
pub struct BlockDigester {
    hasher: blake3::Hasher,
    /// Bytes given, all zero so far (hashed only once a piece is not: an all-zero block's
    /// digest needs no hash).
    zeros: u64,
    nonzero: bool,
}

impl Default for BlockDigester {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockDigester {
    /// A digester with no bytes yet.
    pub fn new() -> Self {
        BlockDigester {
            hasher: blake3::Hasher::new(),
            zeros: 0,
            nonzero: false,
        }
    }

    /// The next piece of the block.
    pub fn update(&mut self, piece: &[u8]) {
        if !self.nonzero {
            if is_zero(piece) {
                self.zeros += piece.len() as u64;
                return;
            }
            self.nonzero = true;
            let zeros = std::mem::take(&mut self.zeros);
            self.hash_zeros(zeros);
        }
        self.hasher.update(piece);
    }

    /// The next `n` bytes of the block are zeros.
    pub fn zeros(&mut self, n: u64) {
        if self.nonzero {
            self.hash_zeros(n);
        } else {
            self.zeros += n;
        }
    }

    fn hash_zeros(&mut self, mut n: u64) {
        const ZEROS: [u8; 4096] = [0; 4096];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64);
            self.hasher.update(&ZEROS[..k as usize]);
            n -= k;
        }
    }

    /// The block's digest, as [`digest_block`] gives it for all the pieces at once.
    pub fn finish(&self) -> Digest {
        if self.nonzero {
            Digest::Hash(*self.hasher.finalize().as_bytes())
        } else {
            Digest::Zero
        }
    }
}

/// Two read buffers for one worker.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub(crate) a: PlacedBuf,
    pub(crate) b: PlacedBuf,
}

/// Whether `source` says `len` bytes at `offset` hold no data (a sparse file's hole):
/// they read as zeros and need not be read.
pub(crate) fn holds_no_data<S: ReadAt + ?Sized>(
    source: &S,
    offset: u64,
    len: u64,
) -> Result<bool, Error> {
    let named = source
        .data_ranges(offset, len)
        .map_err(|e| Error::io(offset, e))?;
    Ok(named.is_empty() && len > 0)
}

/// Reads `len` bytes of `source` at `offset` into `buf`.
pub(crate) fn read_into<'b, S: ReadAt + ?Sized>(
    source: &S,
    buf: &'b mut PlacedBuf,
    offset: u64,
    len: u64,
) -> Result<&'b [u8], Error> {
    let out = buf.slice(offset, len as usize);
    source
        .read_exact_at(out, offset)
        .map_err(|e| Error::io(offset, e))?;
    Ok(out)
}

/// Chunks each worker takes per round of [`run_chunks`]: rounds of one chunk per worker
/// waited at each round for the slowest (a hole beside a chunk of data).
const CHUNKS_PER_WORKER: u64 = 8;

/// Walks `blocks` in chunks of [`chunk_len`] bytes. `work` runs on each chunk (on all
/// cores with `parallel`, in rounds of [`CHUNKS_PER_WORKER`] chunks per worker taken as
/// workers come free, each reading into a [`Scratch`] of its own); `sink` gets the
/// results in disk order and may stop the walk. Memory: one scratch per worker.
pub(crate) fn run_chunks<R: Send>(
    block_size: BlockSize,
    blocks: Range<u64>,
    work: impl Fn(&mut Scratch, Range<u64>) -> Result<R, Error> + Sync,
    mut sink: impl FnMut(Range<u64>, R) -> Result<ControlFlow<()>, Error>,
) -> Result<(), Error> {
    let per_chunk = chunk_len(block_size) / u64::from(block_size.get());
    #[cfg(feature = "parallel")]
    let workers = rayon::current_num_threads().max(1);
    #[cfg(not(feature = "parallel"))]
    let workers = 1;
    let per_round = if workers > 1 {
        workers as u64 * CHUNKS_PER_WORKER
    } else {
        1
    };
    let scratch: std::sync::Mutex<Vec<Scratch>> =
        std::sync::Mutex::new((0..workers).map(|_| Scratch::default()).collect());
    // A scratch from the pool for one chunk's work (one per worker at a time).
    let run = |r: Range<u64>| {
        let take = || scratch.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut s = take().unwrap_or_default();
        let out = work(&mut s, r);
        scratch.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        out
    };
    let mut first = blocks.start;
    while first < blocks.end {
        let ranges: Vec<Range<u64>> = (0..per_round)
            .map(|k| first + k * per_chunk)
            .take_while(|&s| s < blocks.end)
            .map(|s| s..(s + per_chunk).min(blocks.end))
            .collect();
        #[cfg(feature = "parallel")]
        let results: Vec<Result<R, Error>> = {
            use rayon::prelude::*;
            ranges
                .par_iter()
                .with_max_len(1)
                .map(|r| run(r.clone()))
                .collect()
        };
        #[cfg(not(feature = "parallel"))]
        let results: Vec<Result<R, Error>> = ranges.iter().map(|r| run(r.clone())).collect();
        for (r, result) in ranges.into_iter().zip(results) {
            first = r.end;
            if sink(r, result?)?.is_break() {
                return Ok(());
            }
        }
    }
    Ok(())
}
