//! The crate's error.

use std::io;

/// Why a signature, diff, exchange or apply failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing failed.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Where the access started.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A block size that is not a power of two between 512 bytes and 1 GiB.
    #[error("block size {found} is not a power of two between 512 and 1 GiB")]
    BadBlockSize {
        /// The size given.
        found: u32,
    },
    /// Two signatures of different block sizes cannot be compared.
    #[error("block sizes differ: source {source_block_size}, target {target_block_size}")]
    BlockSizeMismatch {
        /// The source's block size.
        source_block_size: u32,
        /// The target's block size.
        target_block_size: u32,
    },
    /// A digest list does not match the disk length.
    #[error("expected {expected} blocks, found {found}")]
    BlockCount {
        /// Blocks the length calls for.
        expected: u64,
        /// Blocks given.
        found: u64,
    },
    /// An encoded signature is malformed.
    #[error("bad signature at byte {offset}: {reason}")]
    BadSignature {
        /// Where in the encoding.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A progress callback asked to stop; resume from `next_block`.
    #[error("interrupted; resume at block {next_block}")]
    Interrupted {
        /// The first block not processed.
        next_block: u64,
    },
    /// The source's length changed between diff and apply.
    #[error("source length changed since the diff: expected {expected}, found {found}")]
    SourceChanged {
        /// The length the delta was computed for.
        expected: u64,
        /// The length now.
        found: u64,
    },
    /// A resumed delta does not continue the one it is appended to.
    #[error("the appended delta does not continue this one (cursor, block size or lengths differ)")]
    DeltaMismatch,
    /// A hash-tree message does not fit the tree it is applied to.
    #[error("hash-tree exchange: {reason}")]
    BadExchange {
        /// What is wrong.
        reason: &'static str,
    },
}

impl Error {
    pub(crate) fn io(offset: u64, source: io::Error) -> Self {
        Error::Io { offset, source }
    }
}
