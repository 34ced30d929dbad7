//! The engine's error, and how retries classify it (no downcasting: every variant knows).

use std::io;
use std::path::PathBuf;

use lifeboat_pageblob::{StoreError, WriteError};
use lifeboat_replication::{JobId, JobKind, JobState, OpError};
use lifeboat_retry::{Class, Classify};

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A page-store request failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A batch could not be applied to a replica.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A disk, log or staging file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and to which file or disk.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A log is not a valid MS-HRL log.
    #[error("log {path}: {source}")]
    Log {
        /// The log.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: lifeboat_hrl::Error,
    },
    /// Comparing disks failed.
    #[error(transparent)]
    Resync(#[from] lifeboat_resync::Error),
    /// The state machine refused the operation (it names the state that forbids it).
    #[error(transparent)]
    Refused(#[from] OpError),
    /// No item of that name in the catalogue.
    #[error("no protected item {0}")]
    UnknownItem(String),
    /// No recovery plan of that name in the catalogue.
    #[error("no recovery plan {0}")]
    UnknownPlan(String),
    /// Another site owns the item: this one may read it, not change it.
    #[error("{item} is owned by site {owner}{}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    NotOwner {
        /// The item.
        item: String,
        /// The owning site (its label).
        owner: String,
        /// What to do.
        hint: Option<String>,
    },
    /// The item was taken over by another site while this one acted for it: its writes
    /// are refused by the store from now on.
    #[error("{item} was taken over by site {owner}; this site no longer acts for it")]
    Fenced {
        /// The item.
        item: String,
        /// The site that owns it now, if known.
        owner: String,
    },
    /// A non-recoverable error stopped the item's replication.
    #[error("{item} is Critical: {message} (fix the cause, then run repair for {item})")]
    Critical {
        /// The item.
        item: String,
        /// What failed.
        message: String,
    },
    /// A recoverable error is being retried on the replication schedule.
    #[error("{item}: {message}; recoverable, retry {retries} is scheduled")]
    Retrying {
        /// The item.
        item: String,
        /// What failed.
        message: String,
        /// Retries so far.
        retries: u32,
    },
    /// A job ended without succeeding.
    #[error("{kind:?} job {job} {state:?}: {}", errors.join("; "))]
    Job {
        /// The job.
        job: JobId,
        /// What it was.
        kind: JobKind,
        /// How it ended.
        state: JobState,
        /// Its errors.
        errors: Vec<String>,
    },
    /// Bad input: a name, a disk, a size, a log that does not belong.
    #[error("{0}")]
    Invalid(String),
    /// A catalogue document cannot be used.
    #[error("catalogue document {name}: {reason}")]
    Catalog {
        /// The document.
        name: String,
        /// Why.
        reason: String,
    },
    /// The site directory belongs to another store (or its store, where it was, no longer
    /// is the one it was set up with).
    #[error("{}", wrong_store(site, expected, found))]
    WrongStore {
        /// The site directory.
        site: PathBuf,
        /// The store it was set up with.
        expected: String,
        /// The store this command names.
        found: String,
    },
}

/// The engine's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Runs `f` on tokio's blocking pool. A panic in `f` goes on panicking here: a bug is
/// not an I/O error to retry. Only a runtime shutting down (the task cancelled) is an
/// error, said as `what`.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    joined(tokio::task::spawn_blocking(f).await, what)
}

/// What a task spawned on tokio's blocking pool gave, as [`blocking`] says it.
pub(crate) fn joined<T>(r: Result<T, tokio::task::JoinError>, what: &str) -> Result<T, Error> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(Error::io(what)(io::Error::other(e))),
        },
    }
}

impl Classify for Error {
    fn class(&self) -> Class {
        match self {
            Error::Store(e) => e.class(),
            Error::Write(WriteError::Store { source, .. }) => source.class(),
            Error::Io { source, .. } => source.class(),
            Error::Resync(lifeboat_resync::Error::Io { source, .. }) => source.class(),
            _ => Class::NonRecoverable,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Store(e) | Error::Write(WriteError::Store { source: e, .. }) => e.retry_after(),
            _ => None,
        }
    }
}

/// [`Error::WrongStore`]'s message: another store named, or the same place holding
/// another store now.
fn wrong_store(site: &std::path::Path, expected: &str, found: &str) -> String {
    let site = site.display();
    if expected == found {
        format!(
            "site {site} was set up with the store {expected}, and the store there is another \
             now (lifeboat/store.json is missing or not its own): it was emptied, replaced \
             or lost"
        )
    } else {
        format!("site {site} uses the store {expected}, not {found}")
    }
}
