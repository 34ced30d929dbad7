//! The per-operation retry state: failures in, decisions out.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Class, Classify, JitterSource, Policy, SplitMix64};

/// What to do after a failure.
#[must_use = "a decision says whether and when to retry"]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Try again after `delay`, that is at time `at`.
    Retry {
        /// How long to wait from the `now` of the failure.
        delay: Duration,
        /// `now + delay`, in the caller's time base.
        at: Duration,
        /// Which retry this will be (1 for the first).
        retry: u32,
    },
    /// Do not try again.
    Stop(Stop),
}

/// Why a [`Retrier`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Stop {
    /// The failure is non-recoverable: mark the item *Critical*; an administrator must act.
    NonRecoverable,
    /// The budget's `max_retries` were all used.
    RetriesExhausted {
        /// How many retries had been made.
        retries: u32,
    },
    /// The next retry would fall after the budget's `max_elapsed`.
    ElapsedExhausted {
        /// Time from the first failure to the failure that stopped it.
        elapsed: Duration,
    },
}

/// Retry state for one operation (or one protected item): feed it failures and the current
/// time; it answers with a [`Decision`]. It never sleeps and never reads a clock.
///
/// Times are [`Duration`]s since any origin the caller keeps fixed (a Unix epoch, the
/// start of a process, the start of a simulation). The state is serialisable, so a
/// restarted agent resumes the same schedule.
///
/// ```
/// use std::time::Duration;
/// use lifeboat_retry::{Class, Decision, Policy, Retrier, Stop};
///
/// let min = Duration::from_secs(60);
/// let mut r = Retrier::new(Policy::default());
/// let mut now = Duration::ZERO;
/// for expected in [1, 2, 4, 8, 10, 30, 30] {
///     match r.next_delay(now, &Class::Recoverable) {
///         Decision::Retry { delay, at, .. } => {
///             assert_eq!(delay, min * expected);
///             now = at; // the driver sleeps until `at`, retries, and fails again
///         }
///         Decision::Stop(why) => panic!("stopped: {why:?}"),
///     }
/// }
/// assert_eq!(r.next_delay(now, &Class::NonRecoverable), Decision::Stop(Stop::NonRecoverable));
///
/// r.succeeded(); // the next failure starts the schedule again
/// assert!(matches!(r.next_delay(now, &Class::Recoverable), Decision::Retry { retry: 1, .. }));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retrier<J = SplitMix64> {
    policy: Policy,
    first_failure: Option<Duration>,
    retries: u32,
    next_at: Option<Duration>,
    jitter_source: J,
}

impl Retrier<SplitMix64> {
    /// A retrier with the default jitter source seeded with 0 (only used when the policy
    /// has jitter; see [`Retrier::with_jitter_source`] to seed it per item).
    pub fn new(policy: Policy) -> Self {
        Retrier::with_jitter_source(policy, SplitMix64::new(0))
    }
}

impl<J: JitterSource> Retrier<J> {
    /// A retrier that draws jitter from `source`.
    pub fn with_jitter_source(policy: Policy, source: J) -> Self {
        Retrier {
            policy,
            first_failure: None,
            retries: 0,
            next_at: None,
            jitter_source: source,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Retries scheduled since the last success.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// When the first failure since the last success happened.
    pub fn first_failure(&self) -> Option<Duration> {
        self.first_failure
    }

    /// When the scheduled retry is due, if one is scheduled.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.next_at
    }

    /// Whether the work may be tried at `now`: true when no retry is scheduled, or when
    /// the scheduled one is due, which it then takes ([`Retrier::poll_timeout`] says
    /// `None` until the next failure).
    pub fn ready(&mut self, now: Duration) -> bool {
        match self.next_at {
            Some(at) if now < at => false,
            _ => {
                self.next_at = None;
                true
            }
        }
    }

    /// An operator's "retry now": a retry scheduled later than `now` is due at `now`
    /// (the schedule's position is kept, so the next failure waits as long as it would
    /// have).
    pub fn expedite(&mut self, now: Duration) {
        if let Some(at) = self.next_at.as_mut() {
            *at = (*at).min(now);
        }
    }

    /// Records a success: the next failure starts the schedule from the beginning.
    pub fn succeeded(&mut self) {
        self.first_failure = None;
        self.retries = 0;
        self.next_at = None;
    }

    /// Records a failure at `now` and decides whether and when to retry.
    ///
    /// Non-recoverable failures always stop. Recoverable ones get the next delay of the
    /// schedule plus jitter, or the server's `Retry-After` when that is longer, unless the
    /// budget is spent. A stop leaves the state as it is, so [`Retrier::succeeded`] (an
    /// operator's fix) is needed to start again.
    pub fn next_delay<E: Classify + ?Sized>(&mut self, now: Duration, failure: &E) -> Decision {
        let first = *self.first_failure.get_or_insert(now);
        self.next_at = None;
        if failure.class() == Class::NonRecoverable {
            return Decision::Stop(Stop::NonRecoverable);
        }
        if let Some(max) = self.policy.budget.max_retries
            && self.retries >= max
        {
            return Decision::Stop(Stop::RetriesExhausted {
                retries: self.retries,
            });
        }
        let base = self.policy.base_delay(self.retries);
        let jitter = match self.policy.jitter {
            Some(j) => draw(&mut self.jitter_source, j.bound(base)),
            None => Duration::ZERO,
        };
        let delay = base
            .saturating_add(jitter)
            .max(failure.retry_after().unwrap_or(Duration::ZERO));
        let at = now.saturating_add(delay);
        if let Some(max) = self.policy.budget.max_elapsed
            && at.saturating_sub(first) > max
        {
            return Decision::Stop(Stop::ElapsedExhausted {
                elapsed: now.saturating_sub(first),
            });
        }
        self.retries += 1;
        self.next_at = Some(at);
        Decision::Retry {
            delay,
            at,
            retry: self.retries,
        }
    }
}

/// A uniform draw from `0..=bound`, to the nanosecond.
fn draw<J: JitterSource>(source: &mut J, bound: Duration) -> Duration {
    let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    // Multiply-shift maps 64 random bits onto 0..=nanos without division bias worth noting.
    let span = u128::from(nanos) + 1;
    let pick = (u128::from(source.next_u64()) * span) >> 64;
    Duration::from_nanos(u64::try_from(pick).unwrap_or(nanos))
}
