//! `retry(policy, op).await` on the tokio timer (feature `tokio`).

use std::fmt;
use std::future::Future;

use tokio::time::{Instant, sleep_until};

use crate::{Classify, Decision, Policy, Retrier, Stop};

/// The last error of an operation that [`retry`] gave up on, and why it gave up.
#[derive(Debug)]
pub struct RetryError<E> {
    /// The error of the last attempt.
    pub error: E,
    /// Why no further attempt was made.
    pub stop: Stop,
    /// How many attempts were made in all (the first one included).
    pub attempts: u32,
}

impl<E: fmt::Display> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.stop {
            Stop::NonRecoverable => "non-recoverable",
            Stop::RetriesExhausted { .. } => "retries exhausted",
            Stop::ElapsedExhausted { .. } => "retry time exhausted",
        };
        write!(
            f,
            "{why} after {} attempt(s): {}",
            self.attempts, self.error
        )
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Runs `op` until it succeeds or `policy` says stop, sleeping on the tokio timer between
/// attempts. `op` is given the attempt number, starting at 1.
///
/// ```
/// use lifeboat_retry::{Policy, StorageFailure, retry};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let policy = Policy::default().scaled(1, 60_000); // 1 ms, 2 ms, …
/// let out = retry(&policy, |attempt| async move {
///     if attempt < 3 { Err(StorageFailure::status(503)) } else { Ok(attempt) }
/// })
/// .await;
/// assert_eq!(out.unwrap(), 3);
/// # }
/// ```
pub async fn retry<T, E, F, Fut>(policy: &Policy, mut op: F) -> Result<T, RetryError<E>>
where
    E: Classify,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let origin = Instant::now();
    let mut retrier = Retrier::new(policy.clone());
    let mut attempts = 0;
    loop {
        attempts += 1;
        match op(attempts).await {
            Ok(v) => return Ok(v),
            Err(error) => match retrier.next_delay(origin.elapsed(), &error) {
                Decision::Retry { at, .. } => sleep_until(origin + at).await,
                Decision::Stop(stop) => {
                    return Err(RetryError {
                        error,
                        stop,
                        attempts,
                    });
                }
            },
        }
    }
}
