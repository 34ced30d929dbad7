//! How the agent writes times, ages, durations and sizes for people (`2026-12-02 08:15:03
//! +01:00 (3 min ago)`, `64 MiB`) and times for programs (RFC 3339, UTC).

use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// The time now, as seconds since the Unix epoch (what the catalogue records).
pub(crate) fn now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

fn stamp(t: Duration) -> Option<Timestamp> {
    Timestamp::from_second(i64::try_from(t.as_secs()).ok()?).ok()
}

/// A time in the machine's time zone: `2026-12-02 08:15:03 +01:00`.
pub(crate) fn local(t: Duration) -> String {
    match stamp(t) {
        Some(ts) => ts
            .to_zoned(TimeZone::system())
            .strftime("%Y-%m-%d %H:%M:%S %:z")
            .to_string(),
        None => format!("{} s after the epoch", t.as_secs()),
    }
}

/// A time in the machine's time zone with its distance from now:
/// `2026-12-02 08:15:03 +01:00 (3 min ago)`.
pub(crate) fn when(now: Duration, t: Duration) -> String {
    format!("{} ({})", local(t), ago(now, t))
}

/// RFC 3339 in UTC, as JSON output writes times: `2026-12-02T07:15:03Z`.
pub(crate) fn rfc3339(t: Duration) -> String {
    stamp(t).map_or_else(|| t.as_secs().to_string(), |ts| ts.to_string())
}

/// `90 s`, `12 min`, `1 h`, `3 h 5 min`, `2 d 4 h`: as the core's messages say it.
pub(crate) use lifeboat_replication::span as duration;

/// `3 min ago` or `in 40 s`.
pub(crate) fn ago(now: Duration, t: Duration) -> String {
    if t <= now {
        format!("{} ago", duration(now - t))
    } else {
        format!("in {}", duration(t - now))
    }
}

/// IEC units: `512 B`, `4 KiB`, `1.5 GiB`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_iec_units() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(64 << 20), "64 MiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
        assert_eq!(size(1000 << 20), "1000 MiB");
    }

    #[test]
    fn times_are_rfc3339_for_programs_and_aged_for_people() {
        assert_eq!(
            rfc3339(Duration::from_secs(1_796_196_428)),
            "2026-12-02T07:27:08Z"
        );
        let now = Duration::from_secs(1_000_000);
        assert_eq!(ago(now, Duration::from_secs(999_820)), "3 min ago");
        assert_eq!(ago(now, Duration::from_secs(1_000_040)), "in 40 s");
        assert!(when(now, now).ends_with("(0 s ago)"));
        assert_eq!(duration(Duration::from_secs(3600)), "1 h");
        assert_eq!(duration(Duration::from_secs(86_400)), "24 h");
        assert_eq!(duration(Duration::from_secs(3 * 3600 + 300)), "3 h 5 min");
        assert_eq!(duration(Duration::from_secs(3 * 86_400)), "3 d");
    }
}
