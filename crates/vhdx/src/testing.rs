//! Scaffolding for tests of this crate and of its users (feature `testing`; not a stable
//! API): differencing disks written by hand from [MS-VHDX], which no tool on a Linux
//! machine makes (`qemu-img` creates none).

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};

use crate::{WriteOptions, write_dynamic};

const MIB: u64 = 1 << 20;

/// `len` bytes of a non-zero pattern that differs with `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = lifeboat_source::SplitMix64::new(seed).bytes(len);
    bytes.iter_mut().for_each(|b| *b |= 0x80);
    bytes
}

/// The VHDX parent locator type, B04AEFB7-D19E-4A81-B789-25B8E9445913, as stored.
const LOCATOR_TYPE: [u8; 16] = [
    0xB7, 0xEF, 0x4A, 0xB0, 0x9E, 0xD1, 0x81, 0x4A, 0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13,
];

/// A parent locator item ([MS-VHDX] 2.6.2.6) with these UTF-16 key-value pairs.
fn locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let mut item = LOCATOR_TYPE.to_vec();
    item.extend_from_slice(&0u16.to_le_bytes());
    item.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
    let mut strings = Vec::new();
    let base = 20 + 12 * pairs.len();
    for (k, v) in pairs {
        let (k, v) = (utf16(k), utf16(v));
        let ko = base + strings.len();
        strings.extend_from_slice(&k);
        let vo = base + strings.len();
        strings.extend_from_slice(&v);
        item.extend_from_slice(&(ko as u32).to_le_bytes());
        item.extend_from_slice(&(vo as u32).to_le_bytes());
        item.extend_from_slice(&(k.len() as u16).to_le_bytes());
        item.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    item.extend_from_slice(&strings);
    item
}

/// Makes a dynamic VHDX written by [`write_dynamic`] (metadata at 2 MiB, five items) a
/// differencing disk: HasParent set, a parent locator item with these key-value pairs.
pub fn make_differencing(img: &mut [u8], pairs: &[(&str, &str)]) {
    let locator_item = &locator(pairs);
    let meta = 2 * MIB as usize;
    let fp = meta + (64 << 10);
    img[fp + 4] |= 2; // HasParent
    let at = (64 << 10) + 4096;
    img[meta + at..meta + at + locator_item.len()].copy_from_slice(locator_item);
    let e = meta + 32 + 5 * 32;
    img[e..e + 16].copy_from_slice(&LOCATOR_TYPE_ITEM);
    img[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
    img[e + 20..e + 24].copy_from_slice(&(locator_item.len() as u32).to_le_bytes());
    img[e + 24..e + 28].copy_from_slice(&4u32.to_le_bytes()); // IsRequired
    img[meta + 10..meta + 12].copy_from_slice(&6u16.to_le_bytes());
}

/// The parent locator metadata item's GUID, A8D35F2D-B30B-454D-ABF7-D3D84834AB0C.
const LOCATOR_TYPE_ITEM: [u8; 16] = [
    0x2D, 0x5F, 0xD3, 0xA8, 0x0B, 0xB3, 0x4D, 0x45, 0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C,
];

/// A parent (`parent.vhdx`) and a differencing child (`child.avhdx`) in `dir`, written
/// from the spec: the child holds two whole
/// blocks and, in a third, a few sectors its sector bitmap marks present (the rest of that
/// block's bytes are garbage that must never be read); the rest is the parent's. Returns
/// the child's path, its bytes and the chain's virtual disk.
pub fn differencing_chain(dir: &Path) -> io::Result<(PathBuf, Vec<u8>, Vec<u8>)> {
    let mib = MIB as usize;
    let parent_disk = pattern(8 * MIB as usize, 77);
    let opts = |ids: [[u8; 16]; 3]| WriteOptions {
        block_size: MIB as u32,
        ids,
        ..WriteOptions::default()
    };
    let parent_ids = [[0x11; 16], [0x12; 16], [0x13; 16]];
    let mut file = Cursor::new(Vec::new());
    write_dynamic(&parent_disk, opts(parent_ids), &mut file)?;
    std::fs::write(dir.join("parent.vhdx"), file.into_inner())?;

    let mut child_disk = vec![0u8; 8 * mib];
    child_disk[mib..2 * mib].fill(0xC1);
    child_disk[5 * mib..6 * mib].fill(0xC5);
    let mut file = Cursor::new(Vec::new());
    write_dynamic(
        &child_disk,
        opts([[0x21; 16], [0x22; 16], [0x23; 16]]),
        &mut file,
    )?;
    let mut img = file.into_inner();
    // Blocks 1 and 5 at 4 and 5 MiB.
    debug_assert_eq!(img.len(), 6 * mib);
    let linkage = crate::format_guid(&parent_ids[0]);
    make_differencing(
        &mut img,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", ".\\parent.vhdx"),
        ],
    );
    // Block 3 partially present: its payload at 6 MiB, the chunk's sector bitmap at 7 MiB.
    img.resize(8 * mib, 0);
    img[6 * mib..7 * mib].fill(0xEE);
    let present: Vec<usize> = (0..8).chain([100, 2047]).collect();
    for &s in &present {
        img[6 * mib + s * 512..6 * mib + (s + 1) * 512].fill(0xD3);
        let bit = 3 * 2048 + s; // block 3's sectors start at bit 3 * 2048 of chunk 0
        img[7 * mib + bit / 8] |= 1 << (bit % 8);
    }
    let bat = 3 * mib;
    img[bat + 3 * 8..bat + 4 * 8].copy_from_slice(&((6 * MIB) | 7).to_le_bytes());
    let sb = 4096; // chunk ratio 2^23 * 512 / 1 MiB: the sector bitmap entry of chunk 0
    img[bat + sb * 8..bat + sb * 8 + 8].copy_from_slice(&((7 * MIB) | 6).to_le_bytes());
    let child = dir.join("child.avhdx");
    std::fs::write(&child, &img)?;

    let mut want = parent_disk;
    want[mib..2 * mib].fill(0xC1);
    want[5 * mib..6 * mib].fill(0xC5);
    for &s in &present {
        want[3 * mib + s * 512..3 * mib + (s + 1) * 512].fill(0xD3);
    }
    Ok((child, img, want))
}
