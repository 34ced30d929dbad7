//! HRL parsing, validation and DataChecksum throughput, in bytes of log, next to a naive
//! byte-loop baseline for the checksum kernel.
//!
//! The log is `LIFEBOAT_BENCH_LOG_MIB` MiB (default 1024) of writes of 4–64 KiB at random
//! 512-byte aligned disk offsets, with DataChecksums, written by `LogWriter`.

use std::hint::black_box;
use std::io::{Cursor, Write};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lifeboat_benches::random_bytes;
use lifeboat_hrl::{LogWriter, ReadOptions, Reader, WriterConfig, byte_sum};

fn log_bytes() -> Vec<u8> {
    let mib: usize = std::env::var("LIFEBOAT_BENCH_LOG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let target = mib << 20;
    let pool = random_bytes(8 << 20, 42);
    let mut w = LogWriter::new(
        Cursor::new(Vec::with_capacity(target + (16 << 20))),
        WriterConfig::default(),
    )
    .expect("writer");
    let mut written = 0usize;
    let mut rng = lifeboat_source::SplitMix64::new(7);
    while written < target {
        let state = rng.next_u64();
        let len = 4096 * (1 + (state >> 33) as usize % 16);
        let at = (state >> 20) as usize % (pool.len() - len);
        let disk_offset = ((state >> 8) % (1 << 30)) * 512;
        w.write(disk_offset, &pool[at..at + len], 1).expect("write");
        written += len;
    }
    w.finish(2).expect("finish").0.into_inner()
}

/// The spec's reference routine as written: one wrapping add per byte. The compiler is
/// free to vectorise it; this is what a straightforward implementation gets.
fn naive_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for &b in data {
        sum = sum.wrapping_add(u32::from(b));
    }
    sum
}

fn parse(c: &mut Criterion) {
    let log = log_bytes();
    let name = format!("{}mib", log.len() >> 20);
    let mut tmp = tempfile::NamedTempFile::new().expect("tempfile");
    tmp.write_all(&log).expect("write log file");
    let file = tmp.reopen().expect("reopen");

    let mut g = c.benchmark_group("hrl");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(log.len() as u64));
    let meta = ReadOptions::default().verify_data(false);
    g.bench_function(BenchmarkId::new("metadata_only/memory", &name), |b| {
        b.iter(|| Reader::with_options(black_box(log.as_slice()), meta).expect("valid"))
    });
    g.bench_function(BenchmarkId::new("metadata_only/file", &name), |b| {
        b.iter(|| Reader::with_options(black_box(&file), meta).expect("valid"))
    });
    g.bench_function(BenchmarkId::new("full_verify/memory", &name), |b| {
        b.iter(|| Reader::new(black_box(log.as_slice())).expect("valid"))
    });
    g.bench_function(BenchmarkId::new("full_verify/file", &name), |b| {
        b.iter(|| Reader::new(black_box(&file)).expect("valid"))
    });
    g.finish();
}

fn checksum_kernel(c: &mut Criterion) {
    let mut g = c.benchmark_group("hrl/data_checksum");
    for (tier, len) in [("0001_mib", 1usize << 20), ("0256_mib", 256 << 20)] {
        let data = random_bytes(len, 9);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("vectorised", tier), |b| {
            b.iter(|| byte_sum(black_box(&data)))
        });
        g.bench_function(BenchmarkId::new("naive_byte_loop", tier), |b| {
            b.iter(|| naive_sum(black_box(&data)))
        });
    }
    g.finish();
}

criterion_group!(benches, checksum_kernel, parse);
criterion_main!(benches);
