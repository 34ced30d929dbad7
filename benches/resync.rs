//! Resync throughput in bytes of image: signatures, the local byte-compare fast path, and
//! the remote path (source hashed against a signature), on a pair of in-memory images with
//! 1 % of 64 KiB blocks changed. Peers (rsync, b3sum, qemu-img) are compared side by side
//! by `benches/resync-compare.sh`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lifeboat_benches::random_bytes;
use lifeboat_resync::{BlockSize, Signature, diff};

fn pair(len: usize) -> (Vec<u8>, Vec<u8>) {
    let a = random_bytes(len, 1);
    let mut b = a.clone();
    let blocks = len / 65536;
    for k in 0..blocks / 100 {
        let i = (k * 7919) % blocks;
        b[i * 65536 + 100] ^= 0xFF;
    }
    (a, b)
}

fn resync(c: &mut Criterion) {
    let len = 256 << 20;
    let (a, b) = pair(len);
    let sig_b = Signature::compute(&b, BlockSize::DEFAULT).expect("signature");
    let mut g = c.benchmark_group("resync");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function(BenchmarkId::new("signature", "0256_mib"), |bench| {
        bench.iter(|| Signature::compute(black_box(&a), BlockSize::DEFAULT).expect("signature"))
    });
    g.bench_function(BenchmarkId::new("local_fast_path", "0256_mib"), |bench| {
        bench.iter(|| diff(black_box(&a), black_box(&b)).expect("diff"))
    });
    g.bench_function(
        BenchmarkId::new("remote_vs_signature", "0256_mib"),
        |bench| bench.iter(|| diff(black_box(&a), black_box(&sig_b)).expect("diff")),
    );
    g.bench_function(
        BenchmarkId::new("blake3_whole_image_baseline", "0256_mib"),
        |bench| bench.iter(|| blake3::hash(black_box(&a))),
    );
    g.finish();
}

criterion_group!(benches, resync);
criterion_main!(benches);
