//! A valid dynamic VHDX with fuzzer-chosen bytes written over its structures (pairs of a
//! 3-byte offset into the first 4 MiB and a value): opening it and reading the whole
//! virtual disk never panics, and never reads past the file.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lifeboat_vhdx::{Vhdx, WriteOptions, write_dynamic};

fn base() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let mut disk = vec![0u8; 3 << 20];
        disk[1 << 20..(1 << 20) + 4096].fill(0xA5);
        let mut file = Cursor::new(Vec::new());
        let opts = WriteOptions {
            block_size: 1 << 20,
            ..WriteOptions::default()
        };
        write_dynamic(&disk, opts, &mut file).expect("a valid image");
        file.into_inner()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut image = base().to_vec();
    for m in data.chunks_exact(4) {
        let at = (usize::from(m[0]) << 16 | usize::from(m[1]) << 8 | usize::from(m[2])) % (4 << 20);
        if at < image.len() {
            image[at] = m[3];
        }
    }
    if let Ok(v) = Vhdx::open(image.as_slice()) {
        let size = v.info().virtual_size.min(16 << 20) as usize;
        let mut buf = vec![0u8; size];
        let _ = v.read_at(&mut buf, 0);
        let _ = v.extents();
    }
});
