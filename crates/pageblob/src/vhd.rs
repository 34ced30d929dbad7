//! The 512-byte fixed-VHD footer that turns a page blob into a disk Azure can attach.

use crate::StoreError;

/// Size of the footer.
pub const FOOTER_LEN: u64 = 512;
/// Azure requires a disk's virtual size to be a whole number of MiB.
pub const SIZE_ALIGN: u64 = 1 << 20;
const COOKIE: &[u8; 8] = b"conectix";
const DISK_TYPE_FIXED: u32 = 2;

/// The virtual size of a replica of a `disk_len`-byte disk: rounded up to 1 MiB.
pub fn virtual_size(disk_len: u64) -> u64 {
    disk_len.div_ceil(SIZE_ALIGN) * SIZE_ALIGN
}

/// The page-blob size that holds a `disk_len`-byte disk: its virtual size plus the footer.
pub fn blob_size(disk_len: u64) -> u64 {
    virtual_size(disk_len) + FOOTER_LEN
}

/// A fixed-VHD footer (Virtual Hard Disk Image Format Specification; all fields
/// big-endian).
///
/// The creator application is `win ` (as Hyper-V writes it): readers such as qemu take
/// the disk size from CurrentSize only for known creators and otherwise from the CHS
/// geometry, which cannot express most sizes exactly.
///
/// ```
/// use lifeboat_pageblob::vhd::{Footer, blob_size};
///
/// let f = Footer::fixed(10 << 20, [7; 16], 0);
/// let bytes = f.encode();
/// assert_eq!(&bytes[..8], b"conectix");
/// assert_eq!(Footer::decode(&bytes)?, f);
/// assert_eq!(blob_size(10 << 20), (10 << 20) + 512);
/// # Ok::<(), lifeboat_pageblob::StoreError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Disk size in bytes (a multiple of 1 MiB for Azure).
    pub current_size: u64,
    /// Size at creation.
    pub original_size: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Identifies the disk.
    pub unique_id: [u8; 16],
    /// Cylinders, heads, sectors per track (derived from the size).
    pub geometry: (u16, u8, u8),
    /// The creator application.
    pub creator_application: [u8; 4],
}

impl Footer {
    /// The footer of a fixed disk of `size` bytes.
    pub fn fixed(size: u64, unique_id: [u8; 16], timestamp: u32) -> Self {
        Footer {
            current_size: size,
            original_size: size,
            timestamp,
            unique_id,
            geometry: geometry(size),
            creator_application: *b"win ",
        }
    }

    /// The 512 footer bytes, checksum included.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit set
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
        b[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: none (fixed)
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_application);
        b[32..36].copy_from_slice(&0x000A_0000u32.to_be_bytes()); // creator version 10.0
        b[36..40].copy_from_slice(b"Wi2k"); // creator host OS: Windows
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        b[60..64].copy_from_slice(&DISK_TYPE_FIXED.to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        let sum = !b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parses and checks a footer (cookie, fixed disk type, checksum).
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::Corrupt {
            path: "VHD footer".into(),
            reason: reason.into(),
        };
        if b.len() != 512 {
            return Err(bad("not 512 bytes"));
        }
        if &b[0..8] != COOKIE {
            return Err(bad("cookie is not \"conectix\""));
        }
        let be32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
        if be32(60) != DISK_TYPE_FIXED {
            return Err(bad("disk type is not fixed (2)"));
        }
        let sum = !b
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
        if sum != be32(64) {
            return Err(bad("checksum mismatch"));
        }
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            current_size: be64(48),
            original_size: be64(40),
            timestamp: be32(24),
            unique_id,
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            creator_application: [b[28], b[29], b[30], b[31]],
        })
    }
}

/// CHS geometry for `size` bytes, per the VHD specification's algorithm.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65_535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65_535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    total = cth / heads;
    (total as u16, heads as u8, spt as u8)
}
