//! VHDX files made by `qemu-img` read as their raw images; what `write_dynamic` writes
//! passes `qemu-img check` and `compare`; corrupted structures are refused, never a panic.

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use lifeboat_resync::BlockSource;
use lifeboat_vhdx::{Error, ExtentKind, Vhdx, WriteOptions, write_dynamic};

const MIB: u64 = 1 << 20;

/// `qemu-img ARGS`, or `None` when it is missing (CI=true requires it).
fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(out) => Some(out),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but qemu-img is missing"
            );
            eprintln!("skipping: no qemu-img");
            None
        }
    }
}

/// A disk of `len` bytes: a few scattered data regions (unaligned to blocks), zeros else.
fn raw_disk(len: u64, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; len as usize];
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..6 {
        let at = (next() % len) as usize / 512 * 512;
        let n = ((next() % (3 * MIB)) as usize).min(len as usize - at);
        for b in &mut d[at..at + n] {
            *b = next() as u8 | 1;
        }
    }
    d
}

fn read_all<S: BlockSource>(v: &Vhdx<S>) -> Vec<u8> {
    let mut out = vec![0u8; v.info().virtual_size as usize];
    // Odd-sized reads across block boundaries.
    for (i, chunk) in out.chunks_mut(700_000).enumerate() {
        v.read_at(chunk, i as u64 * 700_000).unwrap();
    }
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn qemu_img_vhdx_files_read_as_their_raw_images() {
    let dir = tempfile::tempdir().unwrap();
    let len = 40 * MIB + 512 * 3;
    let disk = raw_disk(len, 5);
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    for (sub, block_mib) in [
        ("dynamic", 1),
        ("dynamic", 2),
        ("dynamic", 8),
        ("dynamic", 32),
        ("dynamic", 256),
        ("fixed", 1),
        ("fixed", 32),
    ] {
        let out = dir.path().join(format!("{sub}-{block_mib}.vhdx"));
        let opts = format!("subformat={sub},block_size={}", block_mib * MIB);
        let Some(r) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            &opts,
            s(&raw),
            s(&out),
        ]) else {
            return;
        };
        assert!(r.status.success(), "{opts}: {r:?}");
        let v = Vhdx::open(std::fs::File::open(&out).unwrap()).unwrap();
        let info = v.info().clone();
        assert_eq!(info.block_size as u64, block_mib * MIB, "{opts}");
        assert_eq!(info.logical_sector_size, 512);
        assert!(info.virtual_size >= len, "{opts}: {info:?}");
        let bytes = read_all(&v);
        assert!(bytes[..len as usize] == disk[..], "{opts}: bytes differ");
        assert!(bytes[len as usize..].iter().all(|&b| b == 0));
        // Every byte of data lies in a data extent; a dynamic file allocates at most what
        // the data's blocks need.
        let extents = v.extents().unwrap();
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Zero) {
            assert!(
                bytes[e.range.start as usize..e.range.end as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
        }
        if sub == "dynamic" {
            let blocks_with_data = bytes
                .chunks((block_mib * MIB) as usize)
                .filter(|c| c.iter().any(|&b| b != 0))
                .count() as u64;
            assert!(
                v.allocated().unwrap() <= blocks_with_data * block_mib * MIB,
                "{opts}"
            );
        }
    }
}

#[test]
fn what_write_dynamic_writes_passes_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (len, block_mib, logical) in [
        (20 * MIB + 4096, 1, 512),
        (64 * MIB, 32, 512),
        (9 * MIB, 2, 4096),
    ] {
        let disk = raw_disk(len, len);
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &disk).unwrap();
        let out = dir.path().join("out.vhdx");
        let mut f = std::fs::File::create(&out).unwrap();
        let opts = WriteOptions {
            block_size: (block_mib * MIB) as u32,
            logical_sector_size: logical,
            ..WriteOptions::default()
        };
        let written = write_dynamic(&disk, opts, &mut f).unwrap();
        drop(f);
        assert!(written <= len);
        // Read back by this crate.
        let v = Vhdx::open(std::fs::File::open(&out).unwrap()).unwrap();
        assert!(read_all(&v) == disk, "{opts:?}");
        if logical == 4096 {
            continue; // qemu-img reads 512-byte logical sectors only
        }
        let Some(check) = qemu_img(&["check", "-f", "vhdx", s(&out)]) else {
            return;
        };
        assert!(check.status.success(), "{check:?}");
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vhdx", s(&raw), s(&out)]).unwrap();
        assert!(cmp.status.success(), "{cmp:?}");
    }
}

/// Bytes of the headers, the region tables' used part, the metadata table and items, and
/// the BAT's first entries, flipped in turn: never a panic. The headers and region tables
/// are checksummed and kept twice, so a flip there reads the disk exactly (the other copy)
/// or is refused; the metadata and BAT carry no checksum in [MS-VHDX], so a flip there
/// may read other bytes, but never out of the file's bounds.
#[test]
fn corrupt_structures_are_refused_never_a_panic() {
    let disk = raw_disk(6 * MIB, 9);
    let mut file = Cursor::new(Vec::new());
    let opts = WriteOptions {
        block_size: MIB as u32,
        ..WriteOptions::default()
    };
    write_dynamic(&disk, opts, &mut file).unwrap();
    let good = file.into_inner();
    let (meta, bat) = (2 * MIB as usize, 3 * MIB as usize);
    let mut spots: Vec<usize> = Vec::new();
    spots.extend(0..16);
    for h in [64 * 1024, 128 * 1024] {
        // Every byte of the used fields, a sample of the reserved rest (all under the CRC).
        spots.extend(h..h + 128);
        spots.extend((h + 128..h + 4096).step_by(61));
    }
    spots.extend(192 * 1024..192 * 1024 + 96);
    spots.extend(256 * 1024..256 * 1024 + 96);
    spots.extend(meta..meta + 32 + 5 * 32);
    spots.extend(meta + 64 * 1024..meta + 64 * 1024 + 48);
    spots.extend(bat..bat + 8 * 8);
    let (mut refused, mut read) = (0, 0);
    for at in spots {
        let mut bad = good.clone();
        bad[at] ^= 0x5A;
        match Vhdx::open(bad.as_slice()) {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(v) => {
                let mut buf = vec![0u8; v.info().virtual_size.min(8 * MIB) as usize];
                match v.read_at(&mut buf, 0) {
                    Err(_) => refused += 1,
                    // A read that succeeds after a flip in a checked structure must still
                    // be the disk (flips in unused or redundant bytes change nothing).
                    Ok(()) if v.info().virtual_size == disk.len() as u64 => {
                        if buf != disk && at < meta {
                            panic!("a flip at {at} read wrong bytes silently");
                        }
                        read += 1;
                    }
                    Ok(()) => read += 1,
                }
            }
        }
    }
    assert!(refused > 10 && read > 100, "{refused} refused, {read} read");
}

#[test]
fn not_a_vhdx_and_out_of_range_reads_are_refused() {
    assert!(matches!(
        Vhdx::open(vec![0u8; 4 * MIB as usize]),
        Err(Error::NotVhdx { .. })
    ));
    let mut file = Cursor::new(Vec::new());
    write_dynamic(
        &vec![1u8; 2 * MIB as usize],
        WriteOptions::default(),
        &mut file,
    )
    .unwrap();
    let v = Vhdx::open(file.into_inner()).unwrap();
    let mut buf = [0u8; 1024];
    assert!(matches!(
        v.read_at(&mut buf, 2 * MIB - 512),
        Err(Error::OutOfRange { .. })
    ));
}
