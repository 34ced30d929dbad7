//! The on-disk structures: the 4096-byte header, metadata headers and entries.
//! All integers are little-endian and unaligned; fields are read explicitly.

use crate::checksum::checksum_skipping;

/// Size of the log file header.
pub const HEADER_SIZE: u64 = 4096;
/// Size of a metadata block header and of a metadata entry.
pub const RECORD_SIZE: u64 = 32;
/// The usual `MetadataSize` (127 entry slots).
pub const DEFAULT_METADATA_SIZE: u32 = 4096;
/// `LogFormatVersion` 2.0, the only version writers produce.
pub const VERSION_2: u32 = 0x0002_0000;
/// `LogFormatVersion` 1.0 (Windows Server 2012 / 2012 R2, local only).
pub const VERSION_1: u32 = 0x0001_0000;
/// The cookie writers put at offset 0.
pub const COOKIE: [u8; 8] = *b"msctlog\0";
/// `MetaOperation` for a write, the only defined operation.
pub const OP_WRITE: u8 = 1;
/// Seconds from the Unix epoch to the HRL epoch, 2000-01-01T00:00:00Z.
pub const HRL_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// Whether `MetadataSize` can hold a 32-byte header and whole 32-byte entries (and one).
pub(crate) fn valid_metadata_size(ms: u32) -> bool {
    ms >= 64 && (ms - 32).is_multiple_of(32)
}

const HEADER_CHECKSUM_AT: usize = 40;
const MD_CHECKSUM_AT: usize = 12;
const ENTRY_CHECKSUM_AT: usize = 8;

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// The log file header (`_CTLOG_HEADER_PACKED`), every field as stored.
///
/// Raw byte fields (cookie, creator application, GUIDs, reserved bytes) are kept as they
/// were read, so [`Header::encode`] reproduces the header byte for byte.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// Offset 0: `msctlog` plus an eighth byte.
    pub cookie: [u8; 8],
    /// Offset 8: major version in the high 16 bits, minor in the low 16.
    pub log_format_version: u32,
    /// Offset 12: creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Offset 16: creating application, left-justified ASCII (`ct` for Hyper-V Replica).
    pub creator_application: [u8; 4],
    /// Offset 20: creating application's version, major in the high 16 bits.
    pub creator_version: u32,
    /// Offset 24: file size when the log was created.
    pub original_size: u64,
    /// Offset 32: current file size.
    pub current_size: u64,
    /// Offset 40: the header checksum as stored.
    pub checksum: u32,
    /// Offset 44: one past the last metadata block; 0 while the log is open.
    pub eol_location: u64,
    /// Offset 52: undocumented; kept, not interpreted.
    pub error_code: i32,
    /// Offset 56: size of each metadata block.
    pub metadata_size: u32,
    /// Offset 60: this log's id.
    pub unique_id: [u8; 16],
    /// Offset 76: the id of the log before this one in the chain.
    pub previous_unique_id: [u8; 16],
    /// Offset 92: last update or close time, seconds since 2000-01-01 UTC.
    pub last_modified_timestamp: u32,
    /// Offset 96: the sum of ValidMetadataEntries over all blocks.
    pub total_metadata_entries: u64,
    /// Offset 104: 0 for an HRL file.
    pub file_type: u32,
    /// Offset 108: unused, 0.
    pub flags: [u8; 2],
    /// Offset 110: the VHDX DataWriteGuid when tracking started (reserved in version 1).
    pub vhd2_data_write_guid: [u8; 16],
    /// Offsets 126..4096: reserved, 0.
    pub reserved: Box<[u8; 3970]>,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("cookie", &String::from_utf8_lossy(&self.cookie))
            .field(
                "log_format_version",
                &format_args!("{:#010x}", self.log_format_version),
            )
            .field("timestamp", &self.timestamp)
            .field(
                "creator_application",
                &String::from_utf8_lossy(&self.creator_application),
            )
            .field(
                "creator_version",
                &format_args!("{:#010x}", self.creator_version),
            )
            .field("original_size", &self.original_size)
            .field("current_size", &self.current_size)
            .field("checksum", &format_args!("{:#010x}", self.checksum))
            .field("eol_location", &self.eol_location)
            .field("error_code", &self.error_code)
            .field("metadata_size", &self.metadata_size)
            .field("unique_id", &self.unique_id)
            .field("previous_unique_id", &self.previous_unique_id)
            .field("last_modified_timestamp", &self.last_modified_timestamp)
            .field("total_metadata_entries", &self.total_metadata_entries)
            .field("file_type", &self.file_type)
            .field("flags", &self.flags)
            .field("vhd2_data_write_guid", &self.vhd2_data_write_guid)
            .finish_non_exhaustive()
    }
}

impl Header {
    /// Decodes the fields of a 4096-byte header. Nothing is validated here; see
    /// [`Reader`](crate::Reader) for the checks.
    pub fn decode(b: &[u8; 4096]) -> Header {
        Header {
            cookie: array_at(b, 0),
            log_format_version: u32_at(b, 8),
            timestamp: u32_at(b, 12),
            creator_application: array_at(b, 16),
            creator_version: u32_at(b, 20),
            original_size: u64_at(b, 24),
            current_size: u64_at(b, 32),
            checksum: u32_at(b, 40),
            eol_location: u64_at(b, 44),
            error_code: i32::from_le_bytes(array_at(b, 52)),
            metadata_size: u32_at(b, 56),
            unique_id: array_at(b, 60),
            previous_unique_id: array_at(b, 76),
            last_modified_timestamp: u32_at(b, 92),
            total_metadata_entries: u64_at(b, 96),
            file_type: u32_at(b, 104),
            flags: array_at(b, 108),
            vhd2_data_write_guid: array_at(b, 110),
            reserved: Box::new(array_at(b, 126)),
        }
    }

    /// Encodes the header with its stored [`checksum`](Header::checksum) field as is.
    pub fn encode_raw(&self) -> [u8; 4096] {
        let mut b = [0u8; 4096];
        b[0..8].copy_from_slice(&self.cookie);
        b[8..12].copy_from_slice(&self.log_format_version.to_le_bytes());
        b[12..16].copy_from_slice(&self.timestamp.to_le_bytes());
        b[16..20].copy_from_slice(&self.creator_application);
        b[20..24].copy_from_slice(&self.creator_version.to_le_bytes());
        b[24..32].copy_from_slice(&self.original_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.current_size.to_le_bytes());
        b[40..44].copy_from_slice(&self.checksum.to_le_bytes());
        b[44..52].copy_from_slice(&self.eol_location.to_le_bytes());
        b[52..56].copy_from_slice(&self.error_code.to_le_bytes());
        b[56..60].copy_from_slice(&self.metadata_size.to_le_bytes());
        b[60..76].copy_from_slice(&self.unique_id);
        b[76..92].copy_from_slice(&self.previous_unique_id);
        b[92..96].copy_from_slice(&self.last_modified_timestamp.to_le_bytes());
        b[96..104].copy_from_slice(&self.total_metadata_entries.to_le_bytes());
        b[104..108].copy_from_slice(&self.file_type.to_le_bytes());
        b[108..110].copy_from_slice(&self.flags);
        b[110..126].copy_from_slice(&self.vhd2_data_write_guid);
        b[126..].copy_from_slice(&self.reserved[..]);
        b
    }

    /// Encodes the header with a freshly computed checksum (also stored back into
    /// [`checksum`](Header::checksum)).
    pub fn encode(&mut self) -> [u8; 4096] {
        let mut b = self.encode_raw();
        self.checksum = checksum_skipping(&b, HEADER_CHECKSUM_AT);
        b[40..44].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// The checksum the header's bytes call for.
    pub fn computed_checksum(&self) -> u32 {
        checksum_skipping(&self.encode_raw(), HEADER_CHECKSUM_AT)
    }

    /// Entry slots in each metadata block: `(MetadataSize − 32) / 32`.
    pub fn slots_per_block(&self) -> u32 {
        self.metadata_size.saturating_sub(32) / 32
    }
}

/// The 32-byte header of a metadata block (`_CTLOG_METADATA_HEADER_PACKED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataHeader {
    /// Distance back from this block to the previous one; 0 for the first block.
    pub previous_metadata_location: u64,
    /// Used entry slots, counted from slot 0.
    pub valid_metadata_entries: u32,
    /// The checksum as stored.
    pub checksum: u32,
    /// Reserved, 0.
    pub reserved: [u8; 16],
}

impl MetadataHeader {
    pub(crate) fn decode(b: &[u8]) -> MetadataHeader {
        MetadataHeader {
            previous_metadata_location: u64_at(b, 0),
            valid_metadata_entries: u32_at(b, 8),
            checksum: u32_at(b, 12),
            reserved: array_at(b, 16),
        }
    }

    pub(crate) fn encode_into(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.previous_metadata_location.to_le_bytes());
        b[8..12].copy_from_slice(&self.valid_metadata_entries.to_le_bytes());
        b[12..16].copy_from_slice(&self.checksum.to_le_bytes());
        b[16..32].copy_from_slice(&self.reserved);
    }

    /// The checksum these 32 bytes call for.
    pub(crate) fn computed_checksum(raw: &[u8]) -> u32 {
        checksum_skipping(&raw[..32], MD_CHECKSUM_AT)
    }
}

/// One 32-byte metadata entry (`_CTLOG_METADATA_ENTRY_PACKED`): one guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Where on the virtual disk the payload goes.
    pub byte_offset: u64,
    /// The entry checksum as stored.
    pub checksum: u32,
    /// Payload length in bytes.
    pub data_length: u32,
    /// When the write was logged, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// 1 for a write.
    pub meta_operation: u8,
    /// Checksum of the payload; 0 means "not provided".
    pub data_checksum: u32,
    /// Microsoft-internal tracing; written as 0.
    pub location: u8,
    /// Reserved, 0.
    pub reserved: [u8; 6],
}

impl Entry {
    pub(crate) fn decode(b: &[u8]) -> Entry {
        Entry {
            byte_offset: u64_at(b, 0),
            checksum: u32_at(b, 8),
            data_length: u32_at(b, 12),
            timestamp: u32_at(b, 16),
            meta_operation: b[20],
            data_checksum: u32_at(b, 21),
            location: b[25],
            reserved: array_at(b, 26),
        }
    }

    pub(crate) fn encode_into(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.byte_offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.checksum.to_le_bytes());
        b[12..16].copy_from_slice(&self.data_length.to_le_bytes());
        b[16..20].copy_from_slice(&self.timestamp.to_le_bytes());
        b[20] = self.meta_operation;
        b[21..25].copy_from_slice(&self.data_checksum.to_le_bytes());
        b[25] = self.location;
        b[26..32].copy_from_slice(&self.reserved);
    }

    /// The entry checksum these 32 bytes call for.
    pub(crate) fn computed_checksum(raw: &[u8]) -> u32 {
        checksum_skipping(&raw[..32], ENTRY_CHECKSUM_AT)
    }

    /// Encodes the entry, with its checksum recomputed.
    pub(crate) fn seal(&mut self) -> [u8; 32] {
        let mut b = [0u8; 32];
        self.encode_into(&mut b);
        self.checksum = Self::computed_checksum(&b);
        b[8..12].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }
}
