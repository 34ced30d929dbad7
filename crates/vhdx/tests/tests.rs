//! VHDX files made by `qemu-img` read as their raw images; what `write_dynamic` writes
//! passes `qemu-img check` and `compare`; corrupted structures are refused, never a panic.

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use lifeboat_source::ReadAt;
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
    let mut rng = lifeboat_source::SplitMix64::new(seed);
    let mut next = move || rng.next_u64();
    for _ in 0..6 {
        let at = (next() % len) as usize / 512 * 512;
        let n = ((next() % (3 * MIB)) as usize).min(len as usize - at);
        for b in &mut d[at..at + n] {
            *b = next() as u8 | 1;
        }
    }
    d
}

fn read_all<S: ReadAt>(v: &Vhdx<S>) -> Vec<u8> {
    let mut out = vec![0u8; v.info().virtual_size as usize];
    // Odd-sized reads across block boundaries.
    for (i, chunk) in out.chunks_mut(700_000).enumerate() {
        v.read_at(chunk, i as u64 * 700_000).unwrap();
    }
    out
}

/// `ReadAt::data_ranges` of the whole virtual disk, asked for in uneven pieces and joined.
fn data_ranges<S: lifeboat_source::ReadAt>(v: &Vhdx<S>) -> Vec<std::ops::Range<u64>> {
    let size = v.info().virtual_size;
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    let mut at = 0;
    while at < size {
        let len = (3 * MIB / 2 + 4096).min(size - at);
        for r in lifeboat_source::ReadAt::data_ranges(v, at, len).unwrap() {
            assert!(
                at <= r.start && r.end <= at + len,
                "{r:?} outside {at}+{len}"
            );
            match out.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => out.push(r),
            }
        }
        at += len;
    }
    out
}

/// The data extents' ranges.
fn data_extents(extents: &[lifeboat_vhdx::Extent]) -> Vec<std::ops::Range<u64>> {
    extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.range.clone())
        .collect()
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
        assert_eq!(data_ranges(&v), data_extents(&extents), "{opts}");
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

/// CRC-32C over `b` with its checksum field at `at` counted as zero, stored there.
fn seal(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32;
    b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// What a log entry does: write a 4 KiB sector, or zero a range, at a file offset.
enum Op<'a> {
    Write(u64, &'a [u8]),
    Zero(u64, u64),
}

/// A log entry as [MS-VHDX] 2.3.1 lays it out: the 64-byte header, 32-byte descriptors
/// (padded to 4 KiB), then a data sector per write (its first 8 and last 4 bytes moved
/// into the descriptor, a sequence number in their place), sealed by CRC-32C.
fn log_entry(
    seq: u64,
    tail: u32,
    guid: [u8; 16],
    flushed: u64,
    last: u64,
    ops: &[Op<'_>],
) -> Vec<u8> {
    let desc_sectors = (64 + 32 * ops.len()).div_ceil(4096);
    let writes = ops.iter().filter(|o| matches!(o, Op::Write(..))).count();
    let len = (desc_sectors + writes) * 4096;
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(ops.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(&guid);
    e[48..56].copy_from_slice(&flushed.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    let mut sector = desc_sectors;
    for (k, op) in ops.iter().enumerate() {
        let d = 64 + 32 * k;
        match op {
            Op::Zero(at, n) => {
                e[d..d + 4].copy_from_slice(b"zero");
                e[d + 8..d + 16].copy_from_slice(&n.to_le_bytes());
                e[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
            }
            Op::Write(at, bytes) => {
                e[d..d + 4].copy_from_slice(b"desc");
                e[d + 4..d + 8].copy_from_slice(&bytes[4092..]);
                e[d + 8..d + 16].copy_from_slice(&bytes[..8]);
                e[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
                let s = &mut e[sector * 4096..(sector + 1) * 4096];
                s[0..4].copy_from_slice(b"data");
                s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                s[8..4092].copy_from_slice(&bytes[8..4092]);
                s[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
                sector += 1;
            }
        }
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
    }
    seal(&mut e, 4);
    e
}

/// A 4 MiB disk of non-zero bytes (a pattern of period `period`) and its dynamic VHDX in
/// 1 MiB blocks: the log at 1 MiB, the BAT at 3, the blocks at 4, 5, 6 and 7 MiB.
fn four_full_blocks(period: usize) -> (Vec<u8>, Vec<u8>) {
    let disk: Vec<u8> = (0..4 * MIB as usize)
        .map(|i| (i % period) as u8 | 1)
        .collect();
    let mut file = Cursor::new(Vec::new());
    let opts = WriteOptions {
        block_size: MIB as u32,
        ..WriteOptions::default()
    };
    write_dynamic(&disk, opts, &mut file).unwrap();
    (disk, file.into_inner())
}

/// A VHDX not closed cleanly: its log holds updates (a payload sector, a zeroed range, a
/// BAT page that drops one block and allocates another past the file's end) that never
/// reached their place. It reads as the replayed disk; an older sequence and a torn entry
/// after the head are ignored; the file is never written.
#[test]
fn a_dirty_log_is_replayed_in_memory_and_the_file_is_untouched() {
    let (disk, mut img) = four_full_blocks(251);
    assert_eq!(img.len() as u64, 8 * MIB);
    let (log, bat) = (MIB as usize, 3 * MIB as usize);
    let guid = [0x6C; 16];

    let s1 = vec![0xA1u8; 4096];
    let s2 = vec![0xB2u8; 4096];
    let mut bat_page = img[bat..bat + 4096].to_vec();
    bat_page[16..24].copy_from_slice(&2u64.to_le_bytes()); // block 2: ZERO
    bat_page[24..32].copy_from_slice(&((8 * MIB) | 6).to_le_bytes()); // block 3 at 8 MiB
    let a = log_entry(
        100,
        0,
        guid,
        8 * MIB,
        8 * MIB,
        &[Op::Write(4 * MIB + 8192, &s1), Op::Zero(5 * MIB, 8192)],
    );
    let b = log_entry(
        101,
        0,
        guid,
        8 * MIB,
        9 * MIB,
        &[Op::Write(3 * MIB, &bat_page), Op::Write(8 * MIB, &s2)],
    );
    let mut torn = log_entry(102, 0, guid, 8 * MIB, 9 * MIB, &[Op::Zero(4 * MIB, 4096)]);
    torn[200] ^= 1;
    let stale = log_entry(
        50,
        512 << 10,
        guid,
        8 * MIB,
        8 * MIB,
        &[Op::Zero(4 * MIB, MIB)],
    );
    let mut at = log;
    for e in [&a, &b, &torn] {
        img[at..at + e.len()].copy_from_slice(e);
        at += e.len();
    }
    img[log + (512 << 10)..log + (512 << 10) + stale.len()].copy_from_slice(&stale);
    for h in [64 << 10, 128 << 10] {
        img[h + 48..h + 64].copy_from_slice(&guid);
        seal(&mut img[h..h + 4096], 4);
    }

    let mut want = disk.clone();
    want[8192..12288].copy_from_slice(&s1);
    want[MIB as usize..MIB as usize + 8192].fill(0);
    want[2 * MIB as usize..3 * MIB as usize].fill(0);
    want[3 * MIB as usize..4 * MIB as usize].fill(0);
    want[3 * MIB as usize..3 * MIB as usize + 4096].copy_from_slice(&s2);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.vhdx");
    std::fs::write(&path, &img).unwrap();
    let v = Vhdx::open(std::fs::File::open(&path).unwrap()).unwrap();
    assert!(v.log_replayed());
    assert!(read_all(&v) == want, "the replayed disk differs");
    let kinds: Vec<ExtentKind> = v.extents().unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [ExtentKind::Data, ExtentKind::Zero, ExtentKind::Data]
    );
    drop(v);
    assert!(std::fs::read(&path).unwrap() == img, "the file was written");

    // A head whose FlushedFileOffset lies past the end: the file was cut short.
    let mut cut = img.clone();
    let b2 = log_entry(
        101,
        0,
        guid,
        16 * MIB,
        16 * MIB,
        &[Op::Write(3 * MIB, &bat_page)],
    );
    cut[log + a.len()..log + a.len() + b2.len()].copy_from_slice(&b2);
    match Vhdx::open(cut.as_slice()) {
        Err(Error::Invalid { structure, .. }) => assert_eq!(structure, "log entry"),
        other => panic!("a truncated file was read: {other:?}"),
    }
    // No valid entry at all: nothing to replay, the disk as the file holds it.
    let mut empty = img.clone();
    empty[log..log + 2 * MIB as usize / 2].fill(0);
    let v = Vhdx::open(empty.as_slice()).unwrap();
    assert!(read_all(&v) == disk);
}

/// The hand-made dirty log, replayed by qemu (on a copy: qemu writes to replay) and by
/// this reader (in memory), gives the same disk: the entries follow the spec as a second
/// implementation reads it.
#[test]
fn qemu_replays_the_hand_made_log_to_the_same_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, mut img) = four_full_blocks(241);
    let (log, bat) = (MIB as usize, 3 * MIB as usize);
    let guid = [0x3D; 16];
    let mut bat_page = img[bat..bat + 4096].to_vec();
    bat_page[8..16].copy_from_slice(&3u64.to_le_bytes()); // block 1: UNMAPPED
    let a = log_entry(
        7,
        0,
        guid,
        8 * MIB,
        8 * MIB,
        &[
            Op::Write(6 * MIB + 4096, &vec![0xC3; 4096]),
            Op::Write(3 * MIB, &bat_page),
            Op::Zero(7 * MIB, 3 * 4096),
        ],
    );
    img[log..log + a.len()].copy_from_slice(&a);
    for h in [64 << 10, 128 << 10] {
        img[h + 48..h + 64].copy_from_slice(&guid);
        seal(&mut img[h..h + 4096], 4);
    }
    let path = dir.path().join("dirty.vhdx");
    std::fs::write(&path, &img).unwrap();
    let ours = read_all(&Vhdx::open(img.as_slice()).unwrap());
    let Some(check) = qemu_img(&["check", "-r", "all", "-f", "vhdx", s(&path)]) else {
        return;
    };
    assert!(check.status.success(), "{check:?}");
    let raw = dir.path().join("qemu.raw");
    let conv = qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&path), s(&raw)]).unwrap();
    assert!(conv.status.success(), "{conv:?}");
    let theirs = std::fs::read(&raw).unwrap();
    assert!(ours == theirs, "qemu's replay differs from ours");
    assert!(ours != disk, "the log changed nothing");
}

/// A differencing chain reads as the child over its parent, sector by sector where the
/// child's bitmap says; a missing parent, a parent that is not the one the child was made
/// over, and a loop are refused; nothing is written.
#[test]
fn a_differencing_chain_reads_as_the_child_over_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (child, img, want) = lifeboat_vhdx::testing::differencing_chain(dir.path()).unwrap();
    let open_parent = |l: &lifeboat_vhdx::ParentLocator| -> Result<std::fs::File, Error> {
        let rel = l.get("relative_path").unwrap().replace('\\', "/");
        std::fs::File::open(dir.path().join(rel)).map_err(|e| Error::Io {
            offset: 0,
            source: e,
        })
    };
    let v = lifeboat_vhdx::open_chain(std::fs::File::open(&child).unwrap(), open_parent).unwrap();
    assert!(v.info().differencing && v.parent_disk().is_some());
    assert!(read_all(&v) == want, "the chain reads other bytes");
    assert_eq!(v.allocated().unwrap(), 8 * MIB);
    // What may hold data, block by block through the chain, is what the extents say.
    assert_eq!(data_ranges(&v), data_extents(&v.extents().unwrap()));
    assert!(
        std::fs::read(&child).unwrap() == img,
        "the child was written"
    );

    // Alone, the child says what it needs.
    let alone = Vhdx::open(img.as_slice()).unwrap();
    let mut buf = [0u8; 512];
    alone.read_at(&mut buf, MIB).unwrap(); // its own block
    assert_eq!(buf, [0xC1; 512]);
    let e = alone.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("attach the parent"), "{e}");

    // Another disk as the parent: the linkage names the one it must be.
    let mut f = Cursor::new(Vec::new());
    let opts = WriteOptions {
        block_size: MIB as u32,
        ..WriteOptions::default()
    };
    write_dynamic(&vec![1u8; 8 * MIB as usize], opts, &mut f).unwrap();
    let other_img = f.into_inner();
    let other = Vhdx::open(other_img.as_slice()).unwrap();
    let e = Vhdx::open(img.as_slice())
        .unwrap()
        .with_parent(other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("parent_linkage") && e.contains("{11111111-1111-1111-1111-111111111111}"),
        "{e}"
    );

    // A child whose locator names itself: a loop.
    let mut looped = img.clone();
    let me = lifeboat_vhdx::format_guid(&[0x21; 16]);
    lifeboat_vhdx::testing::make_differencing(
        &mut looped,
        &[("parent_linkage", &me), ("relative_path", "looped.avhdx")],
    );
    std::fs::write(dir.path().join("looped.avhdx"), &looped).unwrap();
    let r = lifeboat_vhdx::open_chain(
        std::fs::File::open(dir.path().join("looped.avhdx")).unwrap(),
        open_parent,
    );
    match r {
        Err(Error::Invalid {
            structure, found, ..
        }) => {
            assert_eq!(structure, "parent chain");
            assert!(found.contains("loop"), "{found}");
        }
        other => panic!("a loop was opened: {:?}", other.map(|v| v.info().clone())),
    }
}

/// The same chain read by a second, independent implementation (dissect.hypervisor, which
/// .ci/run installs from PyPI) gives the same disk: the hand-made child follows the spec
/// as another reader understands it.
#[test]
fn a_second_implementation_reads_the_chain_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, want) = lifeboat_vhdx::testing::differencing_chain(dir.path()).unwrap();
    let out = dir.path().join("dissect.raw");
    let script = "import sys\n\
        from dissect.hypervisor.disk.vhdx import VHDX\n\
        v = VHDX(open(sys.argv[1], 'rb'))\n\
        v.seek(0)\n\
        open(sys.argv[2], 'wb').write(v.read(v.size))\n";
    let run = Command::new("python3")
        .args(["-c", script, s(&child), s(&out)])
        .output();
    let ok = run.as_ref().is_ok_and(|r| r.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but python3 with dissect.hypervisor failed: {run:?}"
        );
        eprintln!("skipping: no python3 with dissect.hypervisor ({run:?})");
        return;
    }
    let theirs = std::fs::read(&out).unwrap();
    assert!(theirs == want, "dissect.hypervisor reads another disk");
}

/// A failback onto a fixed VHDX writes in place: a new header (next sequence number, new
/// DataWriteGuid) first, then the data; `qemu-img check` and `compare` agree. A dynamic
/// disk with unallocated blocks and a differencing disk are refused, nothing written.
#[test]
fn writes_in_place_into_a_fixed_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    let disk = raw_disk(5 * MIB, 21);
    std::fs::write(&raw, &disk).unwrap();
    let fixed = dir.path().join("fixed.vhdx");
    // -S 0: every block written, as Hyper-V's fixed disks hold them (qemu otherwise marks
    // zero blocks ZERO, with no space in the file).
    let Some(made) = qemu_img(&[
        "convert",
        "-S",
        "0",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "subformat=fixed,block_size=1M",
        s(&raw),
        s(&fixed),
    ]) else {
        return;
    };
    assert!(made.status.success(), "{made:?}");
    let mut v = Vhdx::open(std::fs::File::open(&fixed).unwrap()).unwrap();
    let seq = v.info().header_sequence;
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&fixed)
        .unwrap();
    let before = v.info().data_write_guid;
    v.begin_writes(&mut w, [0x77; 16], [0x88; 16]).unwrap();
    let mut want = disk.clone();
    for (at, n, byte) in [
        (0u64, 512usize, 0x11u8),
        (MIB - 4096, 8192, 0x22),
        (3 * MIB + 512, 1_500_000, 0x33),
    ] {
        let data = vec![byte; n];
        v.write_at(&mut w, at, &data).unwrap();
        want[at as usize..at as usize + n].copy_from_slice(&data);
    }
    lifeboat_vhdx::WriteAt::sync(&mut w).unwrap();
    drop((v, w));
    let back = Vhdx::open(std::fs::File::open(&fixed).unwrap()).unwrap();
    assert_eq!(back.info().header_sequence, seq + 1);
    assert_eq!(back.info().data_write_guid, [0x88; 16]);
    assert_ne!(before, [0x88; 16]);
    assert!(
        read_all(&back) == want,
        "the written disk reads other bytes"
    );
    let check = qemu_img(&["check", "-f", "vhdx", s(&fixed)]).unwrap();
    assert!(check.status.success(), "{check:?}");
    std::fs::write(&raw, &want).unwrap();
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vhdx", s(&raw), s(&fixed)]).unwrap();
    assert!(cmp.status.success(), "{cmp:?}");

    // A dynamic disk's block that the file does not hold: refused before any write.
    let mut sparse = vec![0u8; 4 * MIB as usize];
    sparse[..4096].fill(1);
    let mut f = Cursor::new(Vec::new());
    let opts = WriteOptions {
        block_size: MIB as u32,
        ..WriteOptions::default()
    };
    write_dynamic(&sparse, opts, &mut f).unwrap();
    let img = f.into_inner();
    let mut v = Vhdx::open(img.as_slice()).unwrap();
    let e = v.check_writable().unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let mut copy = img.clone();
    assert!(v.begin_writes(&mut copy, [1; 16], [2; 16]).is_err());
    assert!(copy == img, "a refused disk was written");

    // A differencing disk: refused.
    let (child, img, _) = lifeboat_vhdx::testing::differencing_chain(dir.path()).unwrap();
    let mut v = Vhdx::open(img.as_slice()).unwrap();
    let mut copy = img.clone();
    assert!(v.begin_writes(&mut copy, [1; 16], [2; 16]).is_err());
    assert!(copy == img && child.exists());
}
