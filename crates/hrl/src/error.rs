//! Errors and warnings, each with the file offset it concerns.

use std::fmt;
use std::io;

/// Why a log could not be read, written or folded.
///
/// Every variant carries the file offset (and, where it applies, what was expected and
/// what was found), so a message points at the exact bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the underlying source failed.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Where the failed access started.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than the 4096-byte header.
    #[error("file is {len} bytes, shorter than the 4096-byte header")]
    TooShort {
        /// The file length.
        len: u64,
    },
    /// The cookie is not `msctlog` (case-sensitive).
    #[error("bad cookie at offset 0: expected \"msctlog\", found {found:02X?}")]
    BadCookie {
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// The major version is not 1 or 2.
    #[error("unsupported LogFormatVersion at offset 8: {found:#010x} (expected major 1 or 2){}",
        if *found == 0x0000_0200 { "; this looks like a big-endian file, which is not supported" } else { "" })]
    UnsupportedVersion {
        /// The version field.
        found: u32,
    },
    /// The header checksum does not match its bytes.
    #[error(
        "header checksum mismatch at offset 40: computed {expected:#010x}, stored {found:#010x} (a corrupt header, or not an HRL file)"
    )]
    HeaderChecksum {
        /// The checksum computed over the header.
        expected: u32,
        /// The checksum stored in the header.
        found: u32,
    },
    /// `EOLLocation` is 0: the writer never closed the log cleanly. Salvage mode can
    /// recover the valid prefix.
    #[error("log not closed cleanly (EOLLocation at offset 44 is 0)")]
    NotClosedCleanly,
    /// `MetadataSize` is below 64 or not 32 plus a multiple of 32.
    #[error(
        "bad MetadataSize at offset 56: {found} (must be at least 64 and 32 + a multiple of 32)"
    )]
    BadMetadataSize {
        /// The field's value.
        found: u32,
    },
    /// `EOLLocation` is outside the file, or leaves no room for a metadata block.
    #[error(
        "EOLLocation {eol} out of bounds: must be between {min} and the file length {file_len}"
    )]
    EolOutOfBounds {
        /// The field's value.
        eol: u64,
        /// The smallest valid value (4096 + MetadataSize).
        min: u64,
        /// The file length.
        file_len: u64,
    },
    /// A `PreviousMetadataLocation` points somewhere a metadata block cannot be.
    #[error(
        "broken metadata chain at offset {offset}: PreviousMetadataLocation {distance} {reason}"
    )]
    BrokenChain {
        /// The metadata block holding the bad distance.
        offset: u64,
        /// The distance found.
        distance: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A metadata block's header checksum does not match.
    #[error(
        "metadata header checksum mismatch at offset {offset}: computed {expected:#010x}, stored {found:#010x}"
    )]
    MetadataChecksum {
        /// The metadata block.
        offset: u64,
        /// The checksum computed.
        expected: u32,
        /// The checksum stored.
        found: u32,
    },
    /// `ValidMetadataEntries` exceeds the slots a block of `MetadataSize` has.
    #[error(
        "ValidMetadataEntries at offset {offset} is {found}, more than the {slots} slots of a block"
    )]
    TooManyEntries {
        /// The field's offset.
        offset: u64,
        /// The field's value.
        found: u32,
        /// The slots per block.
        slots: u32,
    },
    /// A metadata entry's checksum does not match.
    #[error(
        "metadata entry checksum mismatch at offset {offset}: computed {expected:#010x}, stored {found:#010x}"
    )]
    EntryChecksum {
        /// The entry.
        offset: u64,
        /// The checksum computed.
        expected: u32,
        /// The checksum stored.
        found: u32,
    },
    /// A `MetaOperation` other than 1 (write), in strict mode.
    #[error("unsupported MetaOperation at offset {offset}: {found} (only 1, write, is defined)")]
    UnsupportedOperation {
        /// The field's offset.
        offset: u64,
        /// The field's value.
        found: u8,
    },
    /// The payload lengths of a block do not fill the space between it and the block
    /// before it exactly.
    #[error(
        "metadata block at offset {offset}: its payloads total {found} bytes, but the data area before it is {expected} bytes"
    )]
    PayloadMismatch {
        /// The metadata block.
        offset: u64,
        /// The size of the data area (block offset minus data start).
        expected: u64,
        /// The sum of the block's DataLength fields.
        found: u64,
    },
    /// A payload's bytes do not match its non-zero `DataChecksum`.
    #[error(
        "DataChecksum mismatch for the payload at offset {offset} (entry at {entry}): computed {expected:#010x}, stored {found:#010x}"
    )]
    DataChecksum {
        /// The payload's file offset.
        offset: u64,
        /// The entry's file offset.
        entry: u64,
        /// The checksum computed over the payload.
        expected: u32,
        /// The entry's DataChecksum.
        found: u32,
    },
    /// `ByteOffset + DataLength` overflows a u64.
    #[error("entry at offset {offset}: ByteOffset {disk_offset} + DataLength {len} overflows")]
    DiskRangeOverflow {
        /// The entry.
        offset: u64,
        /// Its ByteOffset.
        disk_offset: u64,
        /// Its DataLength.
        len: u64,
    },
    /// A check that is only a warning in lenient mode failed in strict mode.
    #[error("strict mode: {0}")]
    Strict(Warning),
    /// Salvage found no valid metadata block at all.
    #[error("salvage found no valid metadata block after the header")]
    NothingToSalvage,
    /// Two logs of a chain do not link: `PreviousUniqueId` is not the `UniqueId` of the
    /// log before it.
    #[error(
        "log {index} of the chain does not follow log {prev}: its PreviousUniqueId is {found:02x?}, expected {expected:02x?}"
    )]
    ChainLink {
        /// Position of the log in the chain.
        index: usize,
        /// Position of the log before it.
        prev: usize,
        /// The previous log's UniqueId.
        expected: [u8; 16],
        /// This log's PreviousUniqueId.
        found: [u8; 16],
    },
    /// A write given to the writer is longer than a DataLength can say (4 GiB − 1).
    #[error("write of {len} bytes is longer than an HRL entry can hold (4 GiB - 1)")]
    WriteTooLarge {
        /// The length given.
        len: u64,
    },
    /// A write given to the writer ends past the end of a u64 disk.
    #[error("write at disk offset {disk_offset} of {len} bytes overflows")]
    WriteOverflow {
        /// The disk offset given.
        disk_offset: u64,
        /// The length given.
        len: u64,
    },
}

/// A finding that does not stop a lenient read. In strict mode (the default) the ones
/// for which [`Warning::is_strict_error`] holds fail the read as [`Error::Strict`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// The cookie's eighth byte is a blank (`msctlog `) instead of NUL.
    CookieTrailingBlank,
    /// A minor version other than 0.
    MinorVersion {
        /// The version field.
        found: u32,
    },
    /// `Flags` (offset 108) is not zero.
    FlagsNonZero {
        /// The two bytes.
        found: [u8; 2],
    },
    /// A reserved header byte (126..4096, or 110..126 in version 1) is not zero.
    HeaderReservedNonZero {
        /// The first non-zero byte.
        offset: u64,
    },
    /// `FileType` is not 0 (HRL).
    FileType {
        /// The field's value.
        found: u32,
    },
    /// The log has no writes at all (EOLLocation leaves room for no metadata block).
    EmptyLog,
    /// `MetadataSize` is not a multiple of 512 (allowed, but unusual).
    MetadataSizeNotMultipleOf512 {
        /// The field's value.
        found: u32,
    },
    /// `CurrentSize` differs from the file length.
    CurrentSizeMismatch {
        /// The header's CurrentSize.
        current_size: u64,
        /// The file length.
        file_len: u64,
    },
    /// `EOLLocation` is beyond `CurrentSize`.
    EolBeyondCurrentSize {
        /// The header's EOLLocation.
        eol: u64,
        /// The header's CurrentSize.
        current_size: u64,
    },
    /// `TotalMetadataEntries` differs from the entries counted in the chain.
    TotalEntriesMismatch {
        /// The header's TotalMetadataEntries.
        header: u64,
        /// The sum of ValidMetadataEntries over the chain.
        counted: u64,
    },
    /// A metadata header's reserved bytes are not zero.
    MetadataReservedNonZero {
        /// The metadata block.
        offset: u64,
    },
    /// A used entry's reserved bytes are not zero.
    EntryReservedNonZero {
        /// The entry.
        offset: u64,
    },
    /// A used entry's `Location` is not zero.
    LocationNonZero {
        /// The entry.
        offset: u64,
        /// The field's value.
        found: u8,
    },
    /// An unused entry slot holds non-zero bytes.
    UnusedSlotNonZero {
        /// The slot.
        offset: u64,
    },
    /// Lenient mode skipped an entry whose `MetaOperation` is not 1 (its payload is still
    /// stepped over).
    SkippedOperation {
        /// The entry.
        offset: u64,
        /// The field's value.
        found: u8,
    },
    /// A write of zero bytes (allowed, but pointless).
    ZeroLengthWrite {
        /// The entry.
        offset: u64,
    },
}

impl Warning {
    /// Whether strict mode turns this warning into an error.
    ///
    /// Everything a correct writer never produces is an error in strict mode; the three
    /// findings that real, correct files may show (a MetadataSize that is not a multiple
    /// of 512, a CurrentSize that disagrees with a trimmed or preallocated file, and
    /// zero-length writes) stay warnings.
    pub fn is_strict_error(&self) -> bool {
        !matches!(
            self,
            Warning::MetadataSizeNotMultipleOf512 { .. }
                | Warning::CurrentSizeMismatch { .. }
                | Warning::EolBeyondCurrentSize { .. }
                | Warning::ZeroLengthWrite { .. }
        )
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::CookieTrailingBlank => f.write_str("cookie ends in a blank, not NUL"),
            Warning::MinorVersion { found } => write!(f, "minor version in {found:#010x} is not 0"),
            Warning::FlagsNonZero { found } => {
                write!(f, "Flags at offset 108 are {found:02X?}, not 0")
            }
            Warning::HeaderReservedNonZero { offset } => {
                write!(f, "reserved header byte at offset {offset} is not 0")
            }
            Warning::FileType { found } => {
                write!(f, "FileType at offset 104 is {found}, not 0 (HRL)")
            }
            Warning::EmptyLog => f.write_str("the log holds no metadata block"),
            Warning::MetadataSizeNotMultipleOf512 { found } => {
                write!(f, "MetadataSize {found} is not a multiple of 512")
            }
            Warning::CurrentSizeMismatch {
                current_size,
                file_len,
            } => write!(
                f,
                "CurrentSize {current_size} differs from the file length {file_len}"
            ),
            Warning::EolBeyondCurrentSize { eol, current_size } => {
                write!(f, "EOLLocation {eol} is beyond CurrentSize {current_size}")
            }
            Warning::TotalEntriesMismatch { header, counted } => write!(
                f,
                "TotalMetadataEntries is {header} but the chain holds {counted} entries"
            ),
            Warning::MetadataReservedNonZero { offset } => {
                write!(
                    f,
                    "metadata header at offset {offset} has non-zero reserved bytes"
                )
            }
            Warning::EntryReservedNonZero { offset } => {
                write!(f, "entry at offset {offset} has non-zero reserved bytes")
            }
            Warning::LocationNonZero { offset, found } => {
                write!(f, "entry at offset {offset} has Location {found}, not 0")
            }
            Warning::UnusedSlotNonZero { offset } => {
                write!(f, "unused entry slot at offset {offset} is not all zero")
            }
            Warning::SkippedOperation { offset, found } => {
                write!(
                    f,
                    "skipped entry at offset {offset} with MetaOperation {found}"
                )
            }
            Warning::ZeroLengthWrite { offset } => {
                write!(f, "entry at offset {offset} writes zero bytes")
            }
        }
    }
}
