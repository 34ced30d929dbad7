//! Invariants shared by the property tests and the fuzz target. Not a stable API.

use std::time::Duration;

use crate::{
    Budget, Class, Classify, Decision, Jitter, Policy, Retrier, SplitMix64, Stop, StorageFailure,
};

/// Builds a policy, a seed and a failure sequence from arbitrary bytes.
pub fn decode(data: &[u8]) -> (Policy, u64, Vec<(StorageFailure, Duration)>) {
    let mut it = data.chunks(8).map(|c| {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    });
    let mut next = || it.next().unwrap_or(0);
    let n_steps = next() % 8;
    let steps = (0..n_steps)
        .map(|_| Duration::from_millis(next() % 100_000_000))
        .collect();
    let then_every = Duration::from_millis(next() % 100_000_000);
    let flags = next();
    let jitter = (flags & 1 == 1).then(|| Jitter {
        permille: u32::try_from(next() % 2000).unwrap_or(0),
        max: Duration::from_millis(next() % 10_000_000),
    });
    let budget = Budget {
        max_retries: (flags & 2 == 2).then(|| u32::try_from(next() % 64).unwrap_or(0)),
        max_elapsed: (flags & 4 == 4).then(|| Duration::from_millis(next() % 1_000_000_000)),
    };
    let seed = next();
    let mut failures = Vec::new();
    for _ in 0..64 {
        let v = next();
        let failure = match v % 6 {
            0 => StorageFailure::ConnectionReset,
            1 => StorageFailure::Timeout,
            2 => StorageFailure::LowDiskSpace,
            _ => StorageFailure::Status {
                status: u16::try_from((v >> 8) % 600).unwrap_or(500),
                retry_after: ((v >> 20) & 1 == 1).then(|| Duration::from_secs((v >> 21) % 100_000)),
            },
        };
        failures.push((failure, Duration::from_millis((v >> 40) % 1_000_000)));
    }
    let policy = Policy {
        steps,
        then_every,
        jitter,
        budget,
    };
    (policy, seed, failures)
}

/// Feeds `failures` (each after waiting its duration) to a retrier and checks that no
/// decision breaks the policy: non-recoverable failures stop at once, no delay exceeds the
/// cap plus the jitter bound (or a longer `Retry-After`), and the budget is respected.
pub fn check_invariants(
    policy: &Policy,
    seed: u64,
    failures: &[(StorageFailure, Duration)],
) -> Result<(), String> {
    let mut r = Retrier::with_jitter_source(policy.clone(), SplitMix64::new(seed));
    let mut now = Duration::ZERO;
    let mut first = None;
    for (failure, wait) in failures {
        now = now.saturating_add(*wait);
        let first = *first.get_or_insert(now);
        match r.next_delay(now, failure) {
            Decision::Retry { delay, at, retry } => {
                if failure.class() != Class::Recoverable {
                    return Err(format!("retried non-recoverable {failure:?}"));
                }
                let cap = policy
                    .max_delay()
                    .max(failure.retry_after().unwrap_or_default());
                if delay > cap {
                    return Err(format!("delay {delay:?} above cap {cap:?}"));
                }
                if at != now.saturating_add(delay) || r.poll_timeout() != Some(at) {
                    return Err(format!("retry time {at:?} is not now {now:?} + {delay:?}"));
                }
                if policy.budget.max_retries.is_some_and(|max| retry > max) {
                    return Err(format!("retry {retry} beyond budget"));
                }
                if policy
                    .budget
                    .max_elapsed
                    .is_some_and(|max| at.saturating_sub(first) > max)
                {
                    return Err(format!("retry at {at:?} beyond elapsed budget"));
                }
                now = at;
            }
            Decision::Stop(Stop::NonRecoverable) => {
                if failure.class() != Class::NonRecoverable {
                    return Err(format!("stopped on recoverable {failure:?}"));
                }
                return Ok(());
            }
            Decision::Stop(_) => return Ok(()),
        }
    }
    Ok(())
}
