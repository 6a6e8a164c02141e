//! The gateway's clock. Budget days and cache TTLs follow it, so a replay
//! of a recorded day can run on the trace's time instead of the wall clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to (tests, replays).
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::Relaxed);
    }
    /// Moves the clock forward to `ms`; never backwards.
    pub fn advance_to(&self, ms: u64) {
        self.0.fetch_max(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub const DAY_MS: u64 = 86_400_000;

/// The UTC day of `ms` as `YYYY-MM-DD` (budget windows are UTC days).
pub fn utc_day(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The UTC hour of `ms` as `YYYY-MM-DDTHH`.
pub fn utc_hour(ms: u64) -> String {
    format!("{}T{:02}", utc_day(ms), (ms / 3_600_000) % 24)
}

/// Milliseconds at the end (exclusive) of a `YYYY-MM-DD` UTC day.
pub fn parse_day_end(s: &str) -> Option<u64> {
    parse_day(s).map(|ms| ms + DAY_MS)
}

/// Milliseconds at the start of a `YYYY-MM-DD` UTC day.
pub fn parse_day(s: &str) -> Option<u64> {
    let mut it = s.trim().splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    (days >= 0 && utc_day(days as u64 * 86_400_000) == s.trim()).then(|| days as u64 * 86_400_000)
}

/// Howard Hinnant's civil-to-days algorithm.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(1_795_449_600_000), "2026-11-23");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(parse_day("2026-11-23"), Some(1_795_392_000_000));
        assert_eq!(parse_day("2000-02-29"), Some(951_782_400_000));
        assert_eq!(parse_day("2026-02-30"), None);
        assert_eq!(parse_day("nope"), None);
    }
}
