//! A dynamic VHDX whose headers say the log must be replayed, with fuzzer-chosen bytes as
//! its log: each 4 KiB sector that starts `loge` gets the header's LogGuid and a correct
//! CRC-32C over the length it claims, so entries get past the checksum and the replay's
//! sequence search, descriptors and data sectors are what is explored. Opening and reading
//! the whole disk never panics and never reads past the file.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lifeboat_vhdx::{Vhdx, WriteOptions, write_dynamic};

const MIB: usize = 1 << 20;
const GUID: [u8; 16] = [0x4C; 16];

fn seal(b: &mut [u8]) {
    b[4..8].fill(0);
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32;
    b[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn base() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let mut disk = vec![0u8; 3 * MIB];
        disk[MIB..MIB + 4096].fill(0xA5);
        let mut file = Cursor::new(Vec::new());
        let opts = WriteOptions {
            block_size: MIB as u32,
            ..WriteOptions::default()
        };
        write_dynamic(&disk, opts, &mut file).expect("a valid image");
        let mut image = file.into_inner();
        for h in [64 << 10, 128 << 10] {
            image[h + 48..h + 64].copy_from_slice(&GUID);
            seal(&mut image[h..h + 4096]);
        }
        image
    })
}

fuzz_target!(|data: &[u8]| {
    let mut image = base().to_vec();
    let n = data.len().min(MIB);
    image[MIB..MIB + n].copy_from_slice(&data[..n]);
    for s in (MIB..MIB + n).step_by(4096) {
        if &image[s..s + 4] != b"loge" {
            continue;
        }
        let len = u32::from_le_bytes(image[s + 8..s + 12].try_into().expect("4 bytes")) as usize;
        if len == 0 || len % 4096 != 0 || s + len > 2 * MIB {
            continue;
        }
        image[s + 32..s + 48].copy_from_slice(&GUID);
        seal(&mut image[s..s + len]);
    }
    if let Ok(v) = Vhdx::open(image.as_slice()) {
        let size = v.info().virtual_size.min(16 << 20) as usize;
        let mut buf = vec![0u8; size];
        let _ = v.read_at(&mut buf, 0);
        let _ = v.extents();
    }
});
