use std::io;
use std::time::Duration;

use proptest::prelude::*;

use crate::*;

const MIN: Duration = Duration::from_secs(60);

fn delays<J: JitterSource>(r: &mut Retrier<J>, n: usize, failure: &impl Classify) -> Vec<Duration> {
    let mut now = Duration::ZERO;
    (0..n)
        .map(|_| match r.next_delay(now, failure) {
            Decision::Retry { delay, at, .. } => {
                now = at;
                delay
            }
            Decision::Stop(s) => panic!("unexpected stop {s:?}"),
        })
        .collect()
}

#[test]
fn default_schedule_is_exactly_the_hyper_v_one() {
    let mut r = Retrier::new(Policy::default());
    let got = delays(&mut r, 9, &Class::Recoverable);
    let want: Vec<Duration> = [1, 2, 4, 8, 10, 30, 30, 30, 30]
        .iter()
        .map(|m| MIN * *m)
        .collect();
    assert_eq!(got, want);
    assert_eq!(r.retries(), 9);
    assert_eq!(r.first_failure(), Some(Duration::ZERO));
}

#[test]
fn poll_timeout_tracks_the_scheduled_retry() {
    let mut r = Retrier::new(Policy::default());
    assert_eq!(r.poll_timeout(), None);
    let now = Duration::from_secs(7);
    let _ = r.next_delay(now, &Class::Recoverable);
    assert_eq!(r.poll_timeout(), Some(now + MIN));
    let _ = r.next_delay(now, &Class::NonRecoverable);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn a_due_retry_is_taken_once_and_expedite_brings_it_forward() {
    let mut r = Retrier::new(Policy::default());
    let now = Duration::from_secs(7);
    assert!(r.ready(now), "nothing scheduled: ready");
    let _ = r.next_delay(now, &Class::Recoverable);
    assert!(!r.ready(now + MIN / 2), "not due yet");
    assert_eq!(
        r.poll_timeout(),
        Some(now + MIN),
        "a refusal keeps the schedule"
    );
    assert!(r.ready(now + MIN));
    assert_eq!(r.poll_timeout(), None, "taken: nothing to wake for");
    // The schedule goes on where it was: the next failure waits twice as long.
    let _ = r.next_delay(now + MIN, &Class::Recoverable);
    assert_eq!(r.poll_timeout(), Some(now + MIN * 3));
    r.expedite(now + MIN);
    assert_eq!(r.poll_timeout(), Some(now + MIN));
    assert!(r.ready(now + MIN));
    let _ = r.next_delay(now + MIN, &Class::Recoverable);
    assert_eq!(
        r.poll_timeout(),
        Some(now + MIN * 5),
        "expedite kept the position"
    );
    r.expedite(now + MIN * 9);
    assert_eq!(
        r.poll_timeout(),
        Some(now + MIN * 5),
        "never later than scheduled"
    );
}

#[test]
fn success_restarts_the_schedule() {
    let mut r = Retrier::new(Policy::default());
    let _ = delays(&mut r, 4, &Class::Recoverable);
    r.succeeded();
    assert_eq!(r.retries(), 0);
    assert_eq!(r.first_failure(), None);
    assert_eq!(delays(&mut r, 2, &Class::Recoverable), vec![MIN, MIN * 2]);
}

#[test]
fn scaled_keeps_the_shape() {
    let p = Policy::default().scaled(1, 60);
    let mut r = Retrier::new(p);
    let secs: Vec<u64> = delays(&mut r, 7, &Class::Recoverable)
        .iter()
        .map(Duration::as_secs)
        .collect();
    assert_eq!(secs, [1, 2, 4, 8, 10, 30, 30]);
    // den == 0 does not divide by zero.
    assert_eq!(Policy::default().scaled(2, 0).base_delay(0), MIN * 2);
}

#[test]
fn storage_status_classification_table() {
    use Class::*;
    let table = [
        (408, Recoverable),
        (429, Recoverable),
        (500, Recoverable),
        (502, Recoverable),
        (503, Recoverable),
        (504, Recoverable),
        (507, Recoverable),
        (501, NonRecoverable),
        (505, NonRecoverable),
        (400, NonRecoverable),
        (401, NonRecoverable),
        (403, NonRecoverable),
        (404, NonRecoverable),
        (409, NonRecoverable),
        (412, NonRecoverable),
        (416, NonRecoverable),
        (200, NonRecoverable),
        (302, NonRecoverable),
    ];
    for (status, class) in table {
        assert_eq!(classify_status(status), class, "status {status}");
        assert_eq!(StorageFailure::status(status).class(), class, "{status}");
    }
    for f in [
        StorageFailure::ConnectionReset,
        StorageFailure::ConnectionRefused,
        StorageFailure::Timeout,
        StorageFailure::LowDiskSpace,
        StorageFailure::OutOfMemory,
    ] {
        assert_eq!(f.class(), Recoverable, "{f:?}");
    }
}

#[test]
fn io_error_classification() {
    use io::ErrorKind as K;
    for k in [
        K::ConnectionReset,
        K::ConnectionRefused,
        K::TimedOut,
        K::StorageFull,
        K::OutOfMemory,
        K::Interrupted,
    ] {
        assert_eq!(io::Error::from(k).class(), Class::Recoverable, "{k:?}");
    }
    for k in [
        K::NotFound,
        K::PermissionDenied,
        K::InvalidData,
        K::InvalidInput,
        K::Unsupported,
    ] {
        assert_eq!(io::Error::from(k).class(), Class::NonRecoverable, "{k:?}");
    }
}

#[test]
fn retry_after_only_lengthens() {
    let mut r = Retrier::new(Policy::default());
    let short = StorageFailure::Status {
        status: 503,
        retry_after: Some(Duration::from_secs(5)),
    };
    let long = StorageFailure::Status {
        status: 503,
        retry_after: Some(MIN * 45),
    };
    assert_eq!(delays(&mut r, 1, &short), vec![MIN]);
    assert_eq!(delays(&mut r, 1, &long), vec![MIN * 45]);
}

#[test]
fn parse_retry_after_forms() {
    assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
    assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
    assert_eq!(parse_retry_after("-1"), None);
    assert_eq!(parse_retry_after("1.5"), None);
    assert_eq!(parse_retry_after(""), None);
    assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    assert_eq!(parse_retry_after("99999999999999999999999"), None);
}

#[test]
fn budget_max_retries() {
    let p = Policy::default().with_budget(Budget {
        max_retries: Some(3),
        max_elapsed: None,
    });
    let mut r = Retrier::new(p);
    assert_eq!(delays(&mut r, 3, &Class::Recoverable).len(), 3);
    assert_eq!(
        r.next_delay(Duration::ZERO, &Class::Recoverable),
        Decision::Stop(Stop::RetriesExhausted { retries: 3 })
    );
}

#[test]
fn budget_max_elapsed() {
    // 1 + 2 + 4 = 7 minutes fit in 10; the fourth retry would land at 15.
    let p = Policy::default().with_budget(Budget {
        max_retries: None,
        max_elapsed: Some(MIN * 10),
    });
    let mut r = Retrier::new(p);
    assert_eq!(delays(&mut r, 3, &Class::Recoverable).len(), 3);
    assert_eq!(
        r.next_delay(MIN * 7, &Class::Recoverable),
        Decision::Stop(Stop::ElapsedExhausted { elapsed: MIN * 7 })
    );
}

#[test]
fn jitter_is_bounded_and_reproducible() {
    let p = Policy::default().with_jitter(Jitter {
        permille: 100,
        max: Duration::from_secs(90),
    });
    let run = |seed| {
        let mut r = Retrier::with_jitter_source(p.clone(), SplitMix64::new(seed));
        delays(&mut r, 8, &Class::Recoverable)
    };
    let a = run(1);
    assert_eq!(a, run(1), "same seed, same delays");
    assert_ne!(a, run(2), "another seed spreads differently");
    for (i, d) in a.iter().enumerate() {
        let base = p.base_delay(u32::try_from(i).unwrap());
        // 10 % of 1 min is 6 s; 10 % of 30 min is capped at 90 s.
        let bound = (base / 10).min(Duration::from_secs(90));
        assert!(*d >= base && *d <= base + bound, "{i}: {d:?} vs {base:?}");
    }
}

/// A source that always returns the same bits, to hit the ends of the jitter range.
#[derive(Debug)]
struct Fixed(u64);

impl JitterSource for Fixed {
    fn next_u64(&mut self) -> u64 {
        self.0
    }
}

#[test]
fn jitter_extremes() {
    let p = Policy::default().with_jitter(Jitter {
        permille: 1000,
        max: MIN * 60,
    });
    let mut lo = Retrier::with_jitter_source(p.clone(), Fixed(0));
    assert_eq!(delays(&mut lo, 1, &Class::Recoverable), vec![MIN]);
    let mut hi = Retrier::with_jitter_source(p, Fixed(u64::MAX));
    assert_eq!(delays(&mut hi, 1, &Class::Recoverable), vec![MIN * 2]);
}

fn arb_failure() -> impl Strategy<Value = StorageFailure> {
    prop_oneof![
        (100u16..600, proptest::option::of(0u64..10_000)).prop_map(|(status, ra)| {
            StorageFailure::Status {
                status,
                retry_after: ra.map(Duration::from_secs),
            }
        }),
        Just(StorageFailure::ConnectionReset),
        Just(StorageFailure::Timeout),
        Just(StorageFailure::LowDiskSpace),
    ]
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        proptest::collection::vec(0u64..100_000, 0..8),
        0u64..100_000,
        proptest::option::of((0u32..2000, 0u64..10_000)),
        proptest::option::of(0u32..20),
        proptest::option::of(0u64..1_000_000),
    )
        .prop_map(|(steps, every, jitter, max_retries, max_elapsed)| Policy {
            steps: steps.into_iter().map(Duration::from_millis).collect(),
            then_every: Duration::from_millis(every),
            jitter: jitter.map(|(permille, max)| Jitter {
                permille,
                max: Duration::from_millis(max),
            }),
            budget: Budget {
                max_retries,
                max_elapsed: max_elapsed.map(Duration::from_millis),
            },
        })
}

proptest! {
    #[test]
    fn prop_delays_within_cap_and_budget(
        policy in arb_policy(),
        seed: u64,
        failures in proptest::collection::vec(
            (arb_failure(), (0u64..200_000).prop_map(Duration::from_millis)),
            1..40,
        ),
    ) {
        prop_assert_eq!(crate::fuzzing::check_invariants(&policy, seed, &failures), Ok(()));
    }

    #[test]
    fn prop_decoded_inputs_keep_invariants(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (policy, seed, failures) = crate::fuzzing::decode(&data);
        prop_assert_eq!(crate::fuzzing::check_invariants(&policy, seed, &failures), Ok(()));
    }

    #[test]
    fn prop_non_recoverable_always_stops(policy in arb_policy(), status in 400u16..500) {
        prop_assume!(status != 408 && status != 429);
        let mut r = Retrier::new(policy);
        prop_assert_eq!(
            r.next_delay(Duration::ZERO, &StorageFailure::status(status)),
            Decision::Stop(Stop::NonRecoverable)
        );
    }
}

#[cfg(feature = "tokio")]
mod driver {
    use std::cell::Cell;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_recoverable_on_schedule_in_virtual_time() {
        let start = tokio::time::Instant::now();
        let calls = Cell::new(0);
        let out = retry(&Policy::default(), |attempt| {
            calls.set(attempt);
            async move {
                if attempt <= 6 {
                    Err(StorageFailure::ConnectionReset)
                } else {
                    Ok("done")
                }
            }
        })
        .await;
        assert_eq!(out.unwrap(), "done");
        assert_eq!(calls.get(), 7);
        // 1 + 2 + 4 + 8 + 10 + 30 minutes of virtual time.
        assert_eq!(start.elapsed().as_secs(), 55 * 60);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_non_recoverable_without_waiting() {
        let start = tokio::time::Instant::now();
        let err = retry(&Policy::default(), |_| async {
            Err::<(), _>(StorageFailure::status(412))
        })
        .await
        .unwrap_err();
        assert_eq!(err.stop, Stop::NonRecoverable);
        assert_eq!(err.attempts, 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(
            err.to_string()
                .starts_with("non-recoverable after 1 attempt")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_ends_the_driver() {
        let p = Policy::default().with_budget(Budget {
            max_retries: Some(2),
            max_elapsed: None,
        });
        let err = retry(&p, |_| async { Err::<(), _>(StorageFailure::Timeout) })
            .await
            .unwrap_err();
        assert_eq!(err.stop, Stop::RetriesExhausted { retries: 2 });
        assert_eq!(err.attempts, 3);
    }
}
