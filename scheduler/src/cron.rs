//! Cron fire times through a timezone's wall clock, DST-proof.
//!
//! croner finds the next matching *wall-clock* (naive) time: it is run in UTC, where naive
//! and real time are the same, so its own DST handling never runs. Each naive match `n` is
//! then mapped to the first instant at which the zone's wall clock shows `n` or later
//! ([`first_instant_showing`]): once for a normal time, the first occurrence of a repeated
//! time, the end of the gap for a skipped time. That map never decreases, so skipping the
//! matches that land at or before `after` gives strictly increasing fire times.

use crate::ScheduleError;
use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A parsed cron expression (5 fields, or 6 with seconds first).
#[derive(Debug, Clone)]
pub struct CronExpr {
    normalized: String,
    cron: croner::Cron,
}

/// How many matches inside a repeated (fall-back) period may be skipped in one search: a
/// per-second cron in a 2-hour repeat is 7200; anything beyond is a bug, not a schedule.
const MAX_SKIPPED: usize = 100_000;

impl CronExpr {
    pub fn parse(expr: &str) -> Result<Self, ScheduleError> {
        let cron = engine::schedule_check::parse(expr)
            .map_err(|e| ScheduleError(format!("invalid cron `{expr}`: {e}")))?;
        Ok(CronExpr {
            normalized: expr.split_whitespace().collect::<Vec<_>>().join(" "),
            cron,
        })
    }

    /// The expression, fields joined by one space.
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// The next naive wall-clock time strictly after `naive` that matches.
    fn next_naive(&self, naive: NaiveDateTime) -> Option<NaiveDateTime> {
        let start = Utc.from_utc_datetime(&naive);
        self.cron
            .find_next_occurrence(&start, false)
            .ok()
            .map(|t| t.naive_utc())
    }

    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Every match at or before the wall-clock time of `after` maps to an instant at or
        // before `after` (the wall clock showed it by then), so the search starts there.
        let mut naive = after.with_timezone(&tz).naive_local().with_nanosecond(0)?;
        for _ in 0..MAX_SKIPPED {
            let m = self.next_naive(naive)?;
            let t = first_instant_showing(tz, m)?;
            if t > after {
                return Some(t);
            }
            naive = m;
        }
        None
    }
}

/// The first instant at which `tz`'s wall clock shows `n` or later.
pub fn first_instant_showing(tz: Tz, n: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&n) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
        LocalResult::None => gap_end(tz, n),
    }
}

/// `n` falls in a gap: the instant the clock jumped over it. Any instant whose wall clock
/// shows `n` or later is at least `n - 14h` (UTC offsets are at most +14h) and `n + 12h`
/// shows more than `n` (offsets are at least -12h), so the answer is within that window, where
/// the wall clock only moves forward (no zone falls back within a day of springing forward);
/// a binary search over whole seconds (transitions are on whole seconds) finds it.
fn gap_end(tz: Tz, n: NaiveDateTime) -> Option<DateTime<Utc>> {
    let shows = |secs: i64| -> Option<bool> {
        let t = DateTime::from_timestamp(secs, 0)?;
        Some(t.with_timezone(&tz).naive_local() >= n)
    };
    let base = n.and_utc().timestamp();
    let mut lo = base.checked_sub(15 * 3600)?; // shows < n
    let mut hi = base.checked_add(13 * 3600)?; // shows >= n
    if shows(lo)? || !shows(hi)? {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if shows(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let t = DateTime::from_timestamp(hi, 0)?;
    // The gap's end is a transition: one second before it the clock shows less than `n`.
    debug_assert!(
        (t - TimeDelta::seconds(1)).with_timezone(&tz).naive_local() < n,
        "gap end for {n} in {tz}"
    );
    Some(t)
}
