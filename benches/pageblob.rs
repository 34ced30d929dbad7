//! lifeboat-pageblob: the CRC-64 every Put Page carries, `PageWriter` planning and sending
//! onto the embedded `LocalStore` (sequential data, scattered unaligned changes completed
//! from edges, cleared ranges), and the store's own page writes and snapshots, each beside
//! its floor: a table-driven CRC-64, and `pwrite` of the same bytes to a plain file.
//!
//! The store lives in a temporary directory (the page cache is hot; `open_unsynced`, so no
//! fsync is timed: that is the disk's, not the code's).

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lifeboat_benches::random_bytes;
use lifeboat_pageblob::{
    Change, Condition, LocalStore, Metadata, PageStore, PageWriter, WriterConfig, crc64,
};
use tokio::runtime::Runtime;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// CRC-64/NVME one byte at a time from a 256-entry table: the textbook implementation.
fn crc64_table(data: &[u8]) -> u64 {
    const POLY: u64 = 0x9A6C_9329_AC4B_C9B5; // reflected
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u64;
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u64;
    for &b in data {
        crc = table[((crc ^ u64::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

fn crc(c: &mut Criterion) {
    let data = random_bytes(4 * MIB, 1);
    assert_eq!(crc64_table(b"123456789"), crc64(b"123456789"));
    assert_eq!(crc64_table(&data), crc64(&data));
    let mut g = c.benchmark_group("crc64");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("crc_fast_4mib", |b| b.iter(|| crc64(black_box(&data))));
    g.bench_function("table_4mib_baseline", |b| {
        b.iter(|| crc64_table(black_box(&data)))
    });
    g.finish();
}

/// A store in a temporary directory with one blob of `size` bytes.
fn store(rt: &Runtime, size: u64) -> (tempfile::TempDir, Arc<LocalStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(LocalStore::open_unsynced(dir.path().join("store")).expect("store"));
    rt.block_on(s.create("d", size, 0, &Metadata::new()))
        .expect("create");
    (dir, s)
}

/// Sends `changes` as the blob's next batch (each iteration advances its sequence number).
fn send(rt: &Runtime, w: &PageWriter, seq: &AtomicU64, changes: Vec<Change>, edges: &[u8]) {
    let n = seq.fetch_add(1, Ordering::Relaxed);
    rt.block_on(w.apply_batch(n, changes, Some(&edges)))
        .expect("batch");
}

fn writer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let size = 128 * MIB;
    let data = Bytes::from(random_bytes(16 * MIB, 2));
    let edges = random_bytes(size, 3);
    let mut g = c.benchmark_group("page_writer");
    g.sample_size(20);

    // 16 MiB as 4096 changes of 4 KiB: coalesced into four 4 MiB Put Pages.
    let (_d, s) = store(&rt, size as u64);
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    let seq = AtomicU64::new(0);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function(BenchmarkId::new("sequential", "16mib_as_4k_changes"), |b| {
        b.iter(|| {
            let changes = (0..data.len() / (4 * KIB))
                .map(|i| Change::Data {
                    offset: (i * 4 * KIB) as u64,
                    data: data.slice(i * 4 * KIB..(i + 1) * 4 * KIB),
                })
                .collect();
            send(&rt, &w, &seq, changes, &edges)
        })
    });
    // The floor: the same 16 MiB written to a plain file with pwrite.
    let file = tempfile::tempfile().expect("file");
    g.bench_function(BenchmarkId::new("sequential", "pwrite_16mib_floor"), |b| {
        b.iter(|| {
            for (i, chunk) in data.chunks(4 * MIB).enumerate() {
                file.write_all_at(chunk, (i * 4 * MIB) as u64)
                    .expect("pwrite");
            }
        })
    });

    // 2048 changes of 1000 bytes at unaligned offsets 64 KiB apart: every one completed
    // from the edges into two pages, sent as its own request.
    let (_d2, s2) = store(&rt, size as u64);
    let w2 = PageWriter::new(s2.clone(), "d", WriterConfig::default());
    let seq2 = AtomicU64::new(0);
    let scattered: u64 = 2048 * 1000;
    g.throughput(Throughput::Bytes(scattered));
    g.bench_function(BenchmarkId::new("scattered", "2048_unaligned_1000b"), |b| {
        b.iter(|| {
            let changes = (0..2048usize)
                .map(|i| Change::Data {
                    offset: (i * 64 * KIB + 300) as u64,
                    data: data.slice(i * 1000..i * 1000 + 1000),
                })
                .collect();
            send(&rt, &w2, &seq2, changes, &edges)
        })
    });

    // 64 MiB made zero after it held data: Clear Pages, holes punched in the store.
    let (_d3, s3) = store(&rt, size as u64);
    let w3 = PageWriter::new(s3.clone(), "d", WriterConfig::default());
    let seq3 = AtomicU64::new(0);
    g.throughput(Throughput::Bytes(64 * MIB as u64));
    g.bench_function(BenchmarkId::new("clear", "64mib_after_data"), |b| {
        b.iter_batched(
            || {
                let changes = (0..4)
                    .map(|i| Change::Data {
                        offset: (i * 16 * MIB) as u64,
                        data: data.clone(),
                    })
                    .collect();
                send(&rt, &w3, &seq3, changes, &edges);
            },
            |()| {
                let zero = vec![Change::Zero {
                    offset: 0,
                    len: 64 * MIB as u64,
                }];
                send(&rt, &w3, &seq3, zero, &edges)
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();

    // The store alone: a 4 MiB page write (as the writer sends it: no CRC in-process), and a snapshot of a blob
    // holding 64 MiB, then the first write after it (the copy-on-write of its pages).
    let mut g = c.benchmark_group("local_store");
    g.sample_size(20);
    let (_d4, s4) = store(&rt, size as u64);
    let body = data.slice(0..4 * MIB);
    let crc = s4.content_crc64(&body);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("write_pages_4mib", |b| {
        b.iter(|| {
            rt.block_on(s4.write_pages("d", 0, body.clone(), crc, Condition::default()))
                .expect("write")
        })
    });
    for i in 0..16 {
        let body = data.slice(i % 4 * 4 * MIB..(i % 4 + 1) * 4 * MIB);
        let crc = s4.content_crc64(&body);
        let at = (i * 4 * MIB) as u64;
        rt.block_on(s4.write_pages("d", at, body, crc, Condition::default()))
            .expect("fill");
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("snapshot_then_first_write_4mib", |b| {
        b.iter(|| {
            let snap = rt
                .block_on(s4.snapshot("d", Condition::default()))
                .expect("snapshot");
            rt.block_on(s4.write_pages("d", 0, body.clone(), crc, Condition::default()))
                .expect("write");
            rt.block_on(s4.delete_snapshot("d", &snap))
                .expect("delete snapshot");
        })
    });
    g.finish();
}

criterion_group!(benches, crc, writer);
criterion_main!(benches);
