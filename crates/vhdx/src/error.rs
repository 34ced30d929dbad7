//! Why a VHDX file cannot be read: each refusal names the structure, its file offset, and
//! what was expected and found.

use std::io;

/// Why a VHDX file could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the file failed.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Where the failed read started.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Not a VHDX file: the first eight bytes are not `vhdxfile`.
    #[error("not a VHDX file: offset 0 holds {found:02X?}, expected \"vhdxfile\"")]
    NotVhdx {
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// A structure's signature or checksum is wrong, or a field is out of its range.
    #[error("{structure} at offset {offset}: expected {expected}, found {found}")]
    Invalid {
        /// Which structure (`header 1`, `region table 2`, `metadata table`, `BAT entry 7`).
        structure: String,
        /// Its file offset.
        offset: u64,
        /// What the spec requires.
        expected: String,
        /// What the file holds.
        found: String,
    },
    /// The file uses something this reader does not (yet) read; it refuses rather than
    /// guess.
    #[error("{what} at offset {offset} is not supported: {why}")]
    Unsupported {
        /// The feature.
        what: String,
        /// Where the file uses it.
        offset: u64,
        /// Why, and what to do instead.
        why: String,
    },
    /// A read past the virtual disk's end.
    #[error("read of {len} bytes at {offset} passes the virtual disk's end ({size})")]
    OutOfRange {
        /// Where the read starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The virtual disk's size.
        size: u64,
    },
}

impl Error {
    pub(crate) fn invalid(
        structure: impl Into<String>,
        offset: u64,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            structure: structure.into(),
            offset,
            expected: expected.into(),
            found: found.into(),
        }
    }

    pub(crate) fn unsupported(
        what: impl Into<String>,
        offset: u64,
        why: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            what: what.into(),
            offset,
            why: why.into(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
