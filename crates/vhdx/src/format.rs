//! The on-disk constants of [MS-VHDX]: offsets, signatures, GUIDs, BAT states.

/// Where the two headers are (4 KiB each).
pub(crate) const HEADERS: [u64; 2] = [64 << 10, 128 << 10];
/// Where the two region tables are (64 KiB each).
pub(crate) const REGION_TABLES: [u64; 2] = [192 << 10, 256 << 10];
/// A region table's size, covered by its checksum.
pub(crate) const REGION_TABLE_LEN: usize = 64 << 10;
/// A header's size, covered by its checksum.
pub(crate) const HEADER_LEN: usize = 4 << 10;
/// The metadata table's size at the start of the metadata region.
pub(crate) const METADATA_TABLE_LEN: usize = 64 << 10;
/// Regions, blocks and the log sit on 1 MiB boundaries.
pub(crate) const MIB: u64 = 1 << 20;

/// A GUID as [MS-VHDX] stores it: Data1, Data2, Data3 little-endian, then 8 bytes as is.
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// The BAT region.
pub(crate) const BAT_REGION: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The metadata region.
pub(crate) const METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata: block size, LeaveBlockAllocated, HasParent.
pub(crate) const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata: the virtual disk's size.
pub(crate) const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata: the virtual disk's id (SCSI page 83).
pub(crate) const VIRTUAL_DISK_ID: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata: the logical sector size.
pub(crate) const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata: the physical sector size.
pub(crate) const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata: a differencing disk's parent locator.
pub(crate) const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// BAT payload states.
pub(crate) mod state {
    pub(crate) const NOT_PRESENT: u64 = 0;
    pub(crate) const UNDEFINED: u64 = 1;
    pub(crate) const ZERO: u64 = 2;
    pub(crate) const UNMAPPED: u64 = 3;
    pub(crate) const FULLY_PRESENT: u64 = 6;
    pub(crate) const PARTIALLY_PRESENT: u64 = 7;
}

/// CRC-32C (Castagnoli), as every VHDX checksum.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

pub(crate) fn guid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// The checksum of a structure whose 4-byte checksum field at `at` counts as zero.
pub(crate) fn checksum_with_zeroed(b: &[u8], at: usize) -> u32 {
    let mut copy = b.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_guids_follow_the_spec() {
        // The CRC-32C check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // The BAT region GUID as stored: 66 77 C2 2D 23 F6 00 42 9D 64 ...
        assert_eq!(
            &BAT_REGION[..8],
            &[0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42]
        );
    }
}
