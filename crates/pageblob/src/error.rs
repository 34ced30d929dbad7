//! The store error, and how retries classify it.

use std::io;
use std::time::Duration;

use lifeboat_retry::{Class, Classify, classify_io_kind, classify_status};

/// Why a page-store operation failed. Variants mirror Azure Storage's answers so that a
/// local store and Azure fail the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The blob (or snapshot) does not exist (404).
    #[error("not found: {what}")]
    NotFound {
        /// The blob or snapshot.
        what: String,
    },
    /// The blob already exists (409).
    #[error("already exists: {blob}")]
    AlreadyExists {
        /// The blob.
        blob: String,
    },
    /// An offset or length that is not a multiple of 512, or a zero length (400).
    #[error("offset {offset} / length {len} not aligned to 512-byte pages")]
    Misaligned {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// A body larger than 4 MiB (413 on Azure).
    #[error("request body of {len} bytes exceeds 4 MiB")]
    TooLarge {
        /// The length given.
        len: u64,
    },
    /// A range past the end of the blob (416).
    #[error("range {offset}+{len} is past the blob's size {size}")]
    OutOfRange {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// The blob's size.
        size: u64,
    },
    /// A sequence-number condition failed (412): another writer holds the blob, or this
    /// batch was already applied.
    #[error("sequence number condition failed: expected {expected}, blob has {found}")]
    ConditionFailed {
        /// The sequence number required.
        expected: u64,
        /// The blob's sequence number.
        found: u64,
    },
    /// A lease holds the blob and the request did not carry it (412 LeaseIdMissing or
    /// LeaseIdMismatchWithBlobOperation; 409 LeaseAlreadyPresent on acquire): another
    /// writer owns the blob.
    #[error("{blob} is leased by another writer")]
    Leased {
        /// The blob.
        blob: String,
    },
    /// The request carried a lease id but no lease holds the blob (412
    /// LeaseNotPresentWithBlobOperation).
    #[error("{blob} holds no lease")]
    NotLeased {
        /// The blob.
        blob: String,
    },
    /// The blob is not the version the write expected (412 ConditionNotMet), or exists
    /// where it was expected absent (409 BlobAlreadyExists on a conditional create).
    #[error("{blob} changed since it was read")]
    Changed {
        /// The blob.
        blob: String,
    },
    /// The transactional CRC-64 does not match the body (400 Crc64Mismatch): the body
    /// changed on the way.
    #[error("CRC-64 mismatch: sent {sent:#018x}, {}", match actual {
        Some(a) => format!("the body has {a:#018x}"),
        None => "the body arrived changed".to_owned(),
    })]
    ChecksumMismatch {
        /// The CRC sent.
        sent: u64,
        /// The CRC of the body that arrived, if the store says (Azure does not).
        actual: Option<u64>,
    },
    /// The service answered with another HTTP status.
    #[error("HTTP {status}: {message}")]
    Http {
        /// The status code.
        status: u16,
        /// The service's error code or message.
        message: String,
        /// The `Retry-After` it sent.
        retry_after: Option<Duration>,
    },
    /// The service gave no HTTP answer: the host name does not resolve, the connection is
    /// refused or dropped, TLS fails, or nothing came back in time.
    #[error("cannot reach {host}: {}", why.explain(detail))]
    Unreachable {
        /// The host (and port) the request went to.
        host: String,
        /// Why, as a user can act on it.
        why: Unreachable,
        /// The innermost cause, as the network stack said it.
        detail: String,
    },
    /// The client failed before or after the exchange (a body it could not read, a
    /// credential it could not use): not the service's answer.
    #[error("storage client: {0}")]
    Client(String),
    /// A local I/O error.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A local store's state file is unreadable.
    #[error("corrupt store state {path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob name the store does not take.
    #[error("blob name {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A lease id that is not a GUID.
    #[error("{0:?} is not a lease id (a GUID)")]
    BadLeaseId(String),
    /// A page operation on a document, or a document operation on a page blob.
    #[error("{name} is not a {expected}")]
    WrongKind {
        /// The blob.
        name: String,
        /// What the operation needs: "page blob" or "document".
        expected: &'static str,
    },
    /// Snapshots named in the wrong order (the earlier one after the later one).
    #[error("snapshot {prev} is newer than snapshot {snapshot}")]
    SnapshotOrder {
        /// The one given as earlier.
        prev: String,
        /// The one given as later (`current` for the blob itself).
        snapshot: String,
    },
    /// The store's settings are unusable: its URL, a key, a credential.
    #[error("{what}: {detail}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// What is wrong (secrets redacted).
        detail: String,
    },
    /// The service answered without what the protocol requires of it.
    #[error("the service broke the protocol: {0}")]
    Protocol(String),
}

/// Why a service could not be reached ([`StoreError::Unreachable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreachable {
    /// The host name does not resolve (a mistyped account name, or DNS is down).
    NameNotResolved,
    /// The connection was refused (nothing listens on that port).
    Refused,
    /// The TLS handshake failed (an https URL for a plain-HTTP endpoint, or a certificate
    /// this machine does not trust).
    Tls,
    /// No answer within the client's deadline.
    TimedOut,
    /// The connection failed otherwise (reset, closed early).
    Dropped,
}

impl Unreachable {
    /// Tells the reason from an error's text (its whole chain of causes).
    pub fn from_text(text: &str) -> Self {
        let t = text.to_ascii_lowercase();
        let any = |needles: &[&str]| needles.iter().any(|n| t.contains(n));
        if any(&[
            "dns error",
            "failed to lookup address",
            "name or service not known",
            "no such host",
            "nodename nor servname",
            "temporary failure in name resolution",
        ]) {
            Unreachable::NameNotResolved
        } else if any(&["connection refused"]) {
            Unreachable::Refused
        } else if any(&[
            "certificate",
            "tls",
            "ssl",
            "handshake",
            "invalidcontenttype",
        ]) {
            Unreachable::Tls
        } else if any(&["timed out", "timeout"]) {
            Unreachable::TimedOut
        } else {
            Unreachable::Dropped
        }
    }

    /// What happened and what to check, with the stack's own words where they help.
    fn explain(&self, detail: &str) -> String {
        match self {
            Unreachable::NameNotResolved => {
                "the host name does not resolve (check the account name in the URL, and DNS)".into()
            }
            Unreachable::Refused => {
                "the connection was refused (check the URL's port, and that the service runs)"
                    .into()
            }
            Unreachable::Tls => format!(
                "TLS failed: {detail} (https for a plain-HTTP endpoint, or a certificate this machine does not trust)"
            ),
            Unreachable::TimedOut => "no answer in time (check the network and firewalls)".into(),
            Unreachable::Dropped => format!("the connection failed: {detail}"),
        }
    }
}

impl StoreError {
    /// The HTTP status Azure would have answered with.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            StoreError::NotFound { .. } => 404,
            StoreError::AlreadyExists { .. } => 409,
            StoreError::Misaligned { .. } | StoreError::ChecksumMismatch { .. } => 400,
            StoreError::BadName { .. }
            | StoreError::BadLeaseId(_)
            | StoreError::WrongKind { .. }
            | StoreError::SnapshotOrder { .. } => 400,
            StoreError::TooLarge { .. } => 413,
            StoreError::OutOfRange { .. } => 416,
            StoreError::ConditionFailed { .. }
            | StoreError::Leased { .. }
            | StoreError::NotLeased { .. }
            | StoreError::Changed { .. } => 412,
            StoreError::Http { status, .. } => *status,
            StoreError::Io { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Unreachable { .. }
            | StoreError::Client(_)
            | StoreError::Config { .. }
            | StoreError::Protocol(_) => return None,
        })
    }
}

impl Classify for StoreError {
    fn class(&self) -> Class {
        match self {
            StoreError::Io { source, .. } => classify_io_kind(source.kind()),
            StoreError::Corrupt { .. }
            | StoreError::Client(_)
            | StoreError::Config { .. }
            | StoreError::Protocol(_) => Class::NonRecoverable,
            // A misconfigured endpoint does not heal; everything else on the way may.
            StoreError::Unreachable { why, .. } => match why {
                Unreachable::Tls => Class::NonRecoverable,
                _ => Class::Recoverable,
            },
            // A checksum mismatch means the body was damaged on the way: send it again.
            StoreError::ChecksumMismatch { .. } => Class::Recoverable,
            other => other
                .status()
                .map_or(Class::NonRecoverable, classify_status),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            StoreError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
