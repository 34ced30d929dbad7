//! The retry decision is on every failure path; it must cost nothing next to the I/O.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use lifeboat_retry::{Class, Jitter, Policy, Retrier, SplitMix64};

fn next_delay(c: &mut Criterion) {
    let policy = Policy::default().with_jitter(Jitter {
        permille: 100,
        max: Duration::from_secs(60),
    });
    c.bench_function("retry/next_delay_with_jitter", |b| {
        let mut r = Retrier::with_jitter_source(policy.clone(), SplitMix64::new(7));
        let mut now = Duration::ZERO;
        b.iter(|| {
            now += Duration::from_secs(1);
            if r.retries() > 64 {
                r.succeeded();
            }
            black_box(r.next_delay(black_box(now), &Class::Recoverable))
        })
    });
}

criterion_group!(benches, next_delay);
criterion_main!(benches);
