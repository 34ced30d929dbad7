/*!
Retry policy for replication: sorts failures into recoverable and non-recoverable and
computes when to retry, on the Hyper-V Replica schedule (1, 2, 4, 8, 10 minutes, then every
30 minutes while the error persists).

This crate performs no I/O, reads no clock and never sleeps: the caller passes `now` in and
gets a delay back. The optional `tokio` feature adds a small async [`retry`] driver that
does the sleeping for you.

# Overview

- [`Classify`] / [`Class`]: whether a failure is worth retrying. Implemented for
  [`std::io::Error`] and for [`StorageFailure`] (Azure Storage: 408/429/5xx and connection
  faults are recoverable; 400/401/403/404/409/412 are not; see [`classify_status`]).
- [`Policy`]: the schedule, optional bounded [`Jitter`] from an injectable
  [`JitterSource`], and an optional [`Budget`]. The default is the Hyper-V Replica
  schedule; [`Policy::scaled`] shrinks it for tests or short copy frequencies.
- [`Retrier`]: the per-operation state; `next_delay(now, &failure)` answers with a
  [`Decision`]: retry after a delay (never shorter than a server's `Retry-After`), or
  [`Stop`] (non-recoverable: mark the item *Critical*; or budget spent).

# Example

```
use std::time::Duration;
use lifeboat_retry::{Decision, Policy, Retrier, Stop, StorageFailure};

let mut r = Retrier::new(Policy::default());
let t0 = Duration::from_secs(1_000);

// Throttled: the schedule says 1 minute, the server asks for 5; the server wins.
let throttled = StorageFailure::Status { status: 429, retry_after: Some(Duration::from_secs(300)) };
let Decision::Retry { delay, .. } = r.next_delay(t0, &throttled) else { unreachable!() };
assert_eq!(delay, Duration::from_secs(300));

// A 503 at the retry: the schedule's second step, 2 minutes.
let Decision::Retry { delay, .. } = r.next_delay(t0 + delay, &StorageFailure::status(503)) else {
    unreachable!()
};
assert_eq!(delay, Duration::from_secs(120));

// Authentication failed: never retried.
assert_eq!(r.next_delay(t0, &StorageFailure::status(403)), Decision::Stop(Stop::NonRecoverable));
```

# Crate features

- `tokio` (off by default): [`retry`], an async driver that sleeps on the tokio timer.
- `fuzzing` (off by default): the model checks and input builders the fuzz targets share
  with the property tests (not a stable API).
*/
#![doc(test(attr(deny(warnings))))]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// The default jitter source (re-exported from `lifeboat-source`).
pub use lifeboat_source::SplitMix64;

pub use crate::{
    classify::{Class, Classify, classify_io_kind},
    policy::{Budget, Jitter, JitterSource, Policy},
    retrier::{Decision, Retrier, Stop},
    storage::{StorageFailure, classify_status, parse_retry_after},
};

#[cfg(feature = "tokio")]
pub use crate::driver::{RetryError, retry};

mod classify;
#[cfg(feature = "tokio")]
mod driver;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod policy;
mod retrier;
mod storage;

#[cfg(test)]
mod tests;
