//! [`write_dynamic`]: a new dynamic VHDX of a virtual disk, data blocks written once, in
//! order; blocks that read as zeros take no space.

use std::io::{self, Seek, SeekFrom, Write};

use lifeboat_resync::is_zero;
use lifeboat_source::ReadAt;

use crate::format::*;

/// How [`write_dynamic`] lays the file out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Bytes per block: a power of two from 1 to 256 MiB (Hyper-V's default is 32 MiB).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// The DataWriteGuid, FileWriteGuid and disk id to record (any unique values).
    pub ids: [[u8; 16]; 3],
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            block_size: 32 << 20,
            logical_sector_size: 512,
            ids: [[1; 16], [2; 16], [3; 16]],
        }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Writes `disk` as a dynamic VHDX into `out` (positioned at 0): identifier, two headers,
/// two region tables, an empty log, metadata, then every block holding data, then the BAT
/// (the one seek back). Returns the bytes of data blocks written.
pub fn write_dynamic<W: Write + Seek>(
    disk: &dyn ReadAt,
    opts: WriteOptions,
    out: &mut W,
) -> io::Result<u64> {
    let bs = u64::from(opts.block_size);
    if !opts.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
        return Err(invalid(format!(
            "block size {bs}: a power of two from 1 to 256 MiB"
        )));
    }
    let logical = opts.logical_sector_size;
    if logical != 512 && logical != 4096 {
        return Err(invalid(format!(
            "logical sector size {logical}: 512 or 4096"
        )));
    }
    let size = disk.size()?;
    if size == 0 || !size.is_multiple_of(u64::from(logical)) {
        return Err(invalid(format!(
            "disk size {size}: a positive multiple of {logical}"
        )));
    }
    let chunk_ratio = ((1u64 << 23) * u64::from(logical)) / bs;
    let blocks = size.div_ceil(bs);
    let entries = blocks + (blocks - 1) / chunk_ratio;
    let (log_at, meta_at, bat_at) = (MIB, 2 * MIB, 3 * MIB);
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let data_at = bat_at + bat_len;

    // The first 1 MiB: identifier, headers, region tables.
    let mut head = vec![0u8; MIB as usize];
    head[..8].copy_from_slice(b"vhdxfile");
    for (i, c) in "lifeboat".encode_utf16().enumerate() {
        head[8 + 2 * i..10 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    for (seq, &at) in HEADERS.iter().enumerate() {
        let h = &mut head[at as usize..at as usize + HEADER_LEN];
        h[..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&(seq as u64).to_le_bytes());
        h[16..32].copy_from_slice(&opts.ids[1]);
        h[32..48].copy_from_slice(&opts.ids[0]);
        // LogGuid zero: the log is empty.
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
        h[72..80].copy_from_slice(&log_at.to_le_bytes());
        let crc = crc32c(h);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    for &at in &REGION_TABLES {
        let r = &mut head[at as usize..at as usize + REGION_TABLE_LEN];
        r[..4].copy_from_slice(b"regi");
        r[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (k, (id, offset, len)) in [
            (BAT_REGION, bat_at, bat_len),
            (METADATA_REGION, meta_at, MIB),
        ]
        .into_iter()
        .enumerate()
        {
            let e = 16 + k * 32;
            r[e..e + 16].copy_from_slice(&id);
            r[e + 16..e + 24].copy_from_slice(&offset.to_le_bytes());
            r[e + 24..e + 28].copy_from_slice(&(len as u32).to_le_bytes());
            r[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        }
        let crc = crc32c(r);
        r[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    out.write_all(&head)?;
    // The log: 1 MiB, empty.
    out.write_all(&vec![0u8; MIB as usize])?;

    // Metadata: the table, then the items from 64 KiB on.
    let mut meta = vec![0u8; MIB as usize];
    meta[..8].copy_from_slice(b"metadata");
    let items: [([u8; 16], Vec<u8>, u32); 5] = [
        (
            FILE_PARAMETERS,
            [opts.block_size.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            4,
        ),
        (VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), 6),
        (VIRTUAL_DISK_ID, opts.ids[2].to_vec(), 6),
        (LOGICAL_SECTOR_SIZE, logical.to_le_bytes().to_vec(), 6),
        (PHYSICAL_SECTOR_SIZE, 4096u32.to_le_bytes().to_vec(), 6),
    ];
    meta[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut at = METADATA_TABLE_LEN;
    for (k, (id, bytes, flags)) in items.iter().enumerate() {
        let e = 32 + k * 32;
        meta[e..e + 16].copy_from_slice(id);
        meta[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
        meta[e + 20..e + 24].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        meta[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        meta[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    }
    out.write_all(&meta)?;

    // Data blocks after the BAT's space, in order; the BAT last.
    out.seek(SeekFrom::Start(data_at))?;
    let mut bat = vec![0u8; bat_len as usize];
    let mut next = data_at;
    let mut buf = vec![0u8; bs as usize];
    let mut written = 0;
    for block in 0..blocks {
        let start = block * bs;
        let n = (size - start).min(bs) as usize;
        buf[n..].fill(0);
        disk.read_exact_at(&mut buf[..n], start)?;
        if is_zero(&buf[..n]) {
            continue; // NOT_PRESENT: reads as zeros.
        }
        out.write_all(&buf)?;
        let index = block + block / chunk_ratio;
        let entry = next | 6; // FULLY_PRESENT at FileOffsetMB = next >> 20
        bat[(index * 8) as usize..(index * 8 + 8) as usize].copy_from_slice(&entry.to_le_bytes());
        next += bs;
        written += n as u64;
    }
    out.seek(SeekFrom::Start(bat_at))?;
    out.write_all(&bat)?;
    out.seek(SeekFrom::Start(next))?;
    out.flush()?;
    Ok(written)
}
