//! lifeboat-vhdx: mapping the extents of a 1 TiB sparse dynamic VHDX (the BAT read page by
//! page), and reading a 256 MiB dynamic VHDX through the reader against reading the same
//! bytes as a raw image, both from files in the page cache (the goal: ≥ 0.8× raw).

use std::hint::black_box;
use std::io::Cursor;
use std::os::unix::fs::FileExt;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lifeboat_benches::random_bytes;
use lifeboat_vhdx::{ExtentKind, Vhdx, WriteOptions, write_dynamic};

const MIB: usize = 1 << 20;
/// Reads as initial replication makes them.
const CHUNK: usize = 4 * MIB;

/// A 1 TiB dynamic VHDX with 32 MiB blocks, eight of them allocated far apart: written as
/// a 256 MiB disk, then its size set to 1 TiB and its blocks moved in the BAT.
fn sparse_tib() -> Vec<u8> {
    let bs = 32 * MIB;
    let disk = random_bytes(8 * bs, 3);
    let mut file = Cursor::new(Vec::new());
    let opts = WriteOptions {
        block_size: bs as u32,
        ..WriteOptions::default()
    };
    write_dynamic(&disk, opts, &mut file).expect("image");
    let mut img = file.into_inner();
    let (meta, bat) = (2 * MIB, 3 * MIB);
    img[meta + (64 << 10) + 8..meta + (64 << 10) + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let chunk_ratio = (1usize << 23) * 512 / bs;
    let entries: Vec<u64> = (0..8)
        .map(|i| u64::from_le_bytes(img[bat + i * 8..bat + i * 8 + 8].try_into().expect("8")))
        .collect();
    img[bat..bat + 64].fill(0);
    for (i, e) in entries.into_iter().enumerate() {
        let block = i * 4093;
        let index = block + block / chunk_ratio;
        img[bat + index * 8..bat + index * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    img
}

fn vhdx(c: &mut Criterion) {
    let img = sparse_tib();
    let v = Vhdx::open(img.as_slice()).expect("open");
    assert_eq!(v.info().virtual_size, 1 << 40);
    let data = v
        .extents()
        .expect("extents")
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .count();
    assert_eq!(data, 8);
    let mut g = c.benchmark_group("vhdx");
    g.bench_function(BenchmarkId::new("extents", "1_tib_sparse"), |b| {
        b.iter(|| black_box(&v).extents().expect("extents"))
    });

    // A full read, 256 MiB all allocated, against the raw image.
    let dir = tempfile::tempdir().expect("tempdir");
    let len = 256 * MIB;
    let disk = random_bytes(len, 5);
    let raw = dir.path().join("d.raw");
    std::fs::write(&raw, &disk).expect("raw");
    let mut file = Cursor::new(Vec::new());
    let opts = WriteOptions {
        block_size: 32 * MIB as u32,
        ..WriteOptions::default()
    };
    write_dynamic(&disk, opts, &mut file).expect("image");
    let path = dir.path().join("d.vhdx");
    std::fs::write(&path, file.into_inner()).expect("vhdx");
    let raw = std::fs::File::open(&raw).expect("raw");
    let v = Vhdx::open(std::fs::File::open(&path).expect("vhdx")).expect("open");
    let mut buf = vec![0u8; CHUNK];
    g.throughput(Throughput::Bytes(len as u64));
    g.sample_size(20);
    g.bench_function(BenchmarkId::new("read_raw_file", "256_mib"), |b| {
        b.iter(|| {
            for at in (0..len).step_by(CHUNK) {
                raw.read_exact_at(&mut buf, at as u64).expect("read");
            }
        })
    });
    g.bench_function(BenchmarkId::new("read_vhdx_file", "256_mib"), |b| {
        b.iter(|| {
            for at in (0..len).step_by(CHUNK) {
                v.read_at(&mut buf, at as u64).expect("read");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, vhdx);
criterion_main!(benches);
