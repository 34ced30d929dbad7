//! Sorting failures into recoverable and non-recoverable.

use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether a failure may go away by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Class {
    /// Transient (network, throttling, low disk, low memory): retry on the schedule.
    Recoverable,
    /// Permanent until an administrator acts (authentication, missing blob or VM, a lost
    /// fencing condition, bad input): do not retry; the caller marks the item *Critical*.
    NonRecoverable,
}

/// Anything a [`Retrier`](crate::Retrier) can be told about.
///
/// Implement it for your error type to say whether a failure is worth retrying and, when
/// the server said so, how long it asked the client to wait.
pub trait Classify {
    /// Recoverable or not.
    fn class(&self) -> Class;

    /// The wait the server asked for (an HTTP `Retry-After`), if any. The retrier waits at
    /// least this long, even when its own schedule says less.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl Classify for Class {
    fn class(&self) -> Class {
        *self
    }
}

impl<T: Classify + ?Sized> Classify for &T {
    fn class(&self) -> Class {
        (**self).class()
    }

    fn retry_after(&self) -> Option<Duration> {
        (**self).retry_after()
    }
}

/// Classifies an I/O error by its kind.
///
/// Connection resets, refusals and aborts, timeouts, interruptions, a full disk and
/// out-of-memory are recoverable; everything else (not found, permission denied, invalid
/// data, unsupported, …) is not, because retrying would fail the same way.
impl Classify for io::Error {
    fn class(&self) -> Class {
        classify_io_kind(self.kind())
    }
}

/// The classification [`io::Error`] uses, for callers that only have the kind.
pub fn classify_io_kind(kind: io::ErrorKind) -> Class {
    use io::ErrorKind as K;
    match kind {
        K::ConnectionReset
        | K::ConnectionRefused
        | K::ConnectionAborted
        | K::NotConnected
        | K::BrokenPipe
        | K::TimedOut
        | K::Interrupted
        | K::WouldBlock
        | K::UnexpectedEof
        | K::StorageFull
        | K::QuotaExceeded
        | K::OutOfMemory
        | K::ResourceBusy
        | K::NetworkDown
        | K::NetworkUnreachable
        | K::HostUnreachable
        | K::AddrInUse
        | K::AddrNotAvailable => Class::Recoverable,
        _ => Class::NonRecoverable,
    }
}
