//! How Azure Storage outcomes are classified.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Class, Classify};

/// A failed call to Azure Storage (or to anything that speaks HTTP the same way), as the
/// page-blob writer sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StorageFailure {
    /// The service answered with a non-success HTTP status.
    Status {
        /// The HTTP status code.
        status: u16,
        /// The `Retry-After` the service sent, if any (see [`parse_retry_after`]).
        retry_after: Option<Duration>,
    },
    /// The connection was reset by the peer.
    ConnectionReset,
    /// The connection was refused.
    ConnectionRefused,
    /// No answer within the client's deadline.
    Timeout,
    /// The local disk (staging area, local replica) is full.
    LowDiskSpace,
    /// An allocation failed.
    OutOfMemory,
}

impl StorageFailure {
    /// A status failure without `Retry-After`.
    pub fn status(status: u16) -> Self {
        StorageFailure::Status {
            status,
            retry_after: None,
        }
    }
}

impl fmt::Display for StorageFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageFailure::Status {
                status,
                retry_after: Some(after),
            } => write!(f, "HTTP {status} (retry after {}s)", after.as_secs()),
            StorageFailure::Status { status, .. } => write!(f, "HTTP {status}"),
            StorageFailure::ConnectionReset => f.write_str("connection reset"),
            StorageFailure::ConnectionRefused => f.write_str("connection refused"),
            StorageFailure::Timeout => f.write_str("timed out"),
            StorageFailure::LowDiskSpace => f.write_str("low disk space"),
            StorageFailure::OutOfMemory => f.write_str("out of memory"),
        }
    }
}

impl std::error::Error for StorageFailure {}

impl Classify for StorageFailure {
    fn class(&self) -> Class {
        match self {
            StorageFailure::Status { status, .. } => classify_status(*status),
            StorageFailure::ConnectionReset
            | StorageFailure::ConnectionRefused
            | StorageFailure::Timeout
            | StorageFailure::LowDiskSpace
            | StorageFailure::OutOfMemory => Class::Recoverable,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            StorageFailure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Classifies an HTTP status from Azure Storage.
///
/// | status | class | why |
/// |---|---|---|
/// | 408, 429 | recoverable | request timeout, throttling |
/// | 500, 502, 503, 504 and other 5xx | recoverable | the service or a hop failed; Azure asks clients to retry |
/// | 501, 505 | non-recoverable | the operation or protocol version is not supported: it never will be |
/// | 400 | non-recoverable | a malformed or misaligned request is a bug, not weather |
/// | 401, 403 | non-recoverable | authentication or authorization failed |
/// | 404 | non-recoverable | the blob, container or VM does not exist |
/// | 409 | non-recoverable | lease conflict: another writer holds the blob |
/// | 412 | non-recoverable | a condition failed: another writer advanced the sequence number |
/// | any other status | non-recoverable | unexpected; an administrator should look |
pub fn classify_status(status: u16) -> Class {
    match status {
        408 | 429 => Class::Recoverable,
        501 | 505 => Class::NonRecoverable,
        500..=599 => Class::Recoverable,
        _ => Class::NonRecoverable,
    }
}

/// Parses an HTTP `Retry-After` value in its delta-seconds form (`"120"`).
///
/// The HTTP-date form needs the current wall-clock time, which this crate never reads:
/// convert it at the edge. Returns `None` for anything that is not a plain number of
/// seconds.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u64>().ok().map(Duration::from_secs)
}
