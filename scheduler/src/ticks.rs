//! Which ticks to plan now: the cursor, catch-up after downtime, and ranges for backfills.

use crate::{next_after, CatchUp, ScheduleSpec, Trigger};
use chrono::{DateTime, TimeDelta, Utc};
use std::collections::VecDeque;

/// Where planning of one integration's schedule stands; the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Every tick at or before this instant has been planned (or deliberately dropped).
    pub through: DateTime<Utc>,
    /// [`ScheduleSpec::fingerprint`] of the schedule that planned them.
    pub fingerprint: String,
}

/// What [`plan_ticks`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickPlan {
    /// The ticks to enqueue, oldest first: scheduled instants (the runs' logical dates).
    pub due: Vec<DateTime<Utc>>,
    /// The cursor to store (also when `due` is empty).
    pub cursor: Cursor,
    /// The cursor was (re)started at `now`: no cursor, a changed fingerprint, or a disabled
    /// schedule. Nothing before `now` is planned.
    pub reset: bool,
    /// The oldest tick that became due but was dropped by the catch-up policy (every
    /// dropped tick is from here to before `due[0]`), for a log line.
    pub dropped_since: Option<DateTime<Utc>>,
}

/// Plan the ticks of `(cursor.through, now]` per `spec.catch_up` (see the crate docs). Pass
/// `cursor: None` on a first start and when the integration is re-enabled.
pub fn plan_ticks(spec: &ScheduleSpec, cursor: Option<&Cursor>, now: DateTime<Utc>) -> TickPlan {
    let fingerprint = spec.fingerprint();
    let cursor = match cursor {
        Some(c) if spec.enabled && c.fingerprint == fingerprint => c,
        _ => {
            return TickPlan {
                due: Vec::new(),
                cursor: Cursor {
                    through: now,
                    fingerprint,
                },
                reset: true,
                dropped_since: None,
            }
        }
    };
    if cursor.through >= now {
        return TickPlan {
            due: Vec::new(),
            cursor: cursor.clone(),
            reset: false,
            dropped_since: None,
        };
    }
    let keep = match spec.catch_up {
        CatchUp::None | CatchUp::Latest => 1,
        CatchUp::All => spec.max_catch_up.max(1) as usize,
    };
    let mut due = newest_ticks(spec, cursor.through, now, keep);
    if spec.catch_up == CatchUp::None {
        let grace = TimeDelta::from_std(spec.grace).unwrap_or(TimeDelta::MAX);
        due.retain(|t| now.signed_duration_since(*t) <= grace);
    }
    let dropped_since = next_after(spec, cursor.through)
        .filter(|first| *first <= now && due.first() != Some(first));
    TickPlan {
        due,
        cursor: Cursor {
            through: now,
            fingerprint,
        },
        reset: false,
        dropped_since,
    }
}

/// The ticks of `(after, until]`, oldest first, at most `limit` (the oldest ones): for a
/// backfill over a range.
pub fn ticks_between(
    spec: &ScheduleSpec,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut t = after;
    while out.len() < limit {
        match next_after(spec, t) {
            Some(next) if next <= until => {
                out.push(next);
                t = next;
            }
            _ => break,
        }
    }
    out
}

/// The newest `n` ticks of `(after, until]`, oldest first, without walking all of a long
/// range: windows ending at `until` double until they hold `n` ticks or reach `after`.
fn newest_ticks(
    spec: &ScheduleSpec,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    n: usize,
) -> Vec<DateTime<Utc>> {
    if n == 0 || after >= until {
        return Vec::new();
    }
    if let Trigger::Interval { secs } = spec.trigger {
        // Multiples of `secs`: the last one at or before `until`, back `n - 1` steps.
        let step = secs as i64;
        let Some(first) = next_after(spec, after) else {
            return Vec::new();
        };
        let last = until.timestamp().div_euclid(step) * step;
        let first = first.timestamp();
        if last < first {
            return Vec::new();
        }
        let count = (last - first) / step + 1;
        let from = last - (count.min(n as i64) - 1) * step;
        return (0..)
            .map(|k| from + k * step)
            .take_while(|t| *t <= last)
            .filter_map(|t| DateTime::from_timestamp(t, 0))
            .collect();
    }
    let mut window = TimeDelta::minutes(1);
    loop {
        let start = until
            .checked_sub_signed(window)
            .filter(|s| *s > after)
            .unwrap_or(after);
        let mut kept: VecDeque<DateTime<Utc>> = VecDeque::with_capacity(n.min(1024));
        let mut t = start;
        while let Some(next) = next_after(spec, t).filter(|x| *x <= until) {
            if kept.len() == n {
                kept.pop_front();
            }
            kept.push_back(next);
            t = next;
        }
        if kept.len() == n || start == after {
            return kept.into();
        }
        window = window.checked_mul(2).unwrap_or(TimeDelta::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScheduleSpec;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn hourly(catch_up: CatchUp) -> ScheduleSpec {
        let mut s = ScheduleSpec::cron("0 * * * *", chrono_tz::Europe::Berlin).unwrap();
        s.catch_up = catch_up;
        s
    }

    fn at(spec: &ScheduleSpec, through: &str) -> Cursor {
        Cursor {
            through: utc(through),
            fingerprint: spec.fingerprint(),
        }
    }

    #[test]
    fn first_start_changed_schedule_and_disabled_restart_from_now() {
        let spec = hourly(CatchUp::All);
        let now = utc("2024-05-01T12:30:00Z");
        let plan = plan_ticks(&spec, None, now);
        assert!(plan.reset && plan.due.is_empty());
        assert_eq!(plan.cursor.through, now);
        assert_eq!(plan.cursor.fingerprint, spec.fingerprint());
        // A cursor of another cron (or zone) a week old: no flood of past ticks.
        let other = ScheduleSpec::cron("0 * * * *", chrono_tz::UTC).unwrap();
        let old = at(&other, "2024-04-24T00:00:00Z");
        let plan = plan_ticks(&spec, Some(&old), now);
        assert!(plan.reset && plan.due.is_empty(), "{plan:?}");
        assert_eq!(plan.cursor.fingerprint, spec.fingerprint());
        // Disabled: nothing, and the cursor follows `now` so enabling later floods nothing.
        let mut off = spec.clone();
        off.enabled = false;
        let plan = plan_ticks(&off, Some(&at(&spec, "2024-04-24T00:00:00Z")), now);
        assert!(plan.reset && plan.due.is_empty());
        assert_eq!(plan.cursor.through, now);
    }

    #[test]
    fn a_running_loop_plans_each_tick_once() {
        for catch_up in [CatchUp::None, CatchUp::Latest, CatchUp::All] {
            let spec = hourly(catch_up);
            let mut cursor = plan_ticks(&spec, None, utc("2024-05-01T10:59:59Z")).cursor;
            let mut planned = Vec::new();
            // The loop wakes a little late, sometimes twice for one tick.
            for now in [
                "2024-05-01T11:00:00.2Z",
                "2024-05-01T11:00:01Z",
                "2024-05-01T11:30:00Z",
                "2024-05-01T12:00:03Z",
                "2024-05-01T13:00:00Z",
            ] {
                let plan = plan_ticks(&spec, Some(&cursor), utc(now));
                assert!(!plan.reset && plan.dropped_since.is_none(), "{plan:?}");
                planned.extend(plan.due);
                cursor = plan.cursor;
            }
            assert_eq!(
                planned,
                [
                    utc("2024-05-01T11:00:00Z"),
                    utc("2024-05-01T12:00:00Z"),
                    utc("2024-05-01T13:00:00Z")
                ],
                "{catch_up:?}"
            );
        }
    }

    #[test]
    fn downtime_per_catch_up_policy() {
        let now = utc("2024-05-01T15:20:00Z");
        // Down since 10:30: 11:00 … 15:00 were missed (5 ticks).
        let spec = hourly(CatchUp::None);
        let plan = plan_ticks(&spec, Some(&at(&spec, "2024-05-01T10:30:00Z")), now);
        assert!(plan.due.is_empty(), "{plan:?}");
        assert_eq!(plan.dropped_since, Some(utc("2024-05-01T11:00:00Z")));
        assert_eq!(plan.cursor.through, now);
        // `none` still runs the current tick when it is only a little late.
        let plan = plan_ticks(
            &spec,
            Some(&at(&spec, "2024-05-01T10:30:00Z")),
            utc("2024-05-01T15:00:40Z"),
        );
        assert_eq!(plan.due, [utc("2024-05-01T15:00:00Z")]);
        assert_eq!(plan.dropped_since, Some(utc("2024-05-01T11:00:00Z")));

        let spec = hourly(CatchUp::Latest);
        let plan = plan_ticks(&spec, Some(&at(&spec, "2024-05-01T10:30:00Z")), now);
        assert_eq!(plan.due, [utc("2024-05-01T15:00:00Z")]);
        assert_eq!(plan.dropped_since, Some(utc("2024-05-01T11:00:00Z")));

        let mut spec = hourly(CatchUp::All);
        let plan = plan_ticks(&spec, Some(&at(&spec, "2024-05-01T10:30:00Z")), now);
        assert_eq!(plan.due.len(), 5);
        assert_eq!(plan.due[0], utc("2024-05-01T11:00:00Z"));
        assert_eq!(plan.dropped_since, None);
        // Beyond max_catch_up the oldest are dropped.
        spec.max_catch_up = 2;
        let plan = plan_ticks(&spec, Some(&at(&spec, "2024-05-01T10:30:00Z")), now);
        assert_eq!(
            plan.due,
            [utc("2024-05-01T14:00:00Z"), utc("2024-05-01T15:00:00Z")]
        );
        assert_eq!(plan.dropped_since, Some(utc("2024-05-01T11:00:00Z")));
    }

    #[test]
    fn years_of_downtime_of_a_per_second_cron_stay_bounded() {
        let mut spec = ScheduleSpec::cron("* * * * * *", chrono_tz::UTC).unwrap();
        spec.catch_up = CatchUp::All;
        spec.max_catch_up = 100;
        let cursor = at(&spec, "2020-01-01T00:00:00Z");
        let now = utc("2024-05-01T12:00:00.5Z");
        let plan = plan_ticks(&spec, Some(&cursor), now);
        assert_eq!(plan.due.len(), 100);
        assert_eq!(plan.due[99], utc("2024-05-01T12:00:00Z"));
        assert_eq!(plan.due[0], utc("2024-05-01T11:58:21Z"));
        assert!(plan.due.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(plan.dropped_since, Some(utc("2020-01-01T00:00:01Z")));
        // Same for an interval.
        let mut spec = ScheduleSpec::interval(std::time::Duration::from_secs(1)).unwrap();
        spec.catch_up = CatchUp::All;
        let plan = plan_ticks(&spec, Some(&at(&spec, "2020-01-01T00:00:00Z")), now);
        assert_eq!(plan.due.len(), 100);
        assert_eq!(plan.due[0], utc("2024-05-01T11:58:21Z"));
        assert_eq!(plan.due[99], utc("2024-05-01T12:00:00Z"));
    }

    #[test]
    fn a_sparse_cron_after_long_downtime() {
        // Yearly, missed for five years: `all` with the default cap finds all five.
        let mut spec = ScheduleSpec::cron("0 0 1 1 *", chrono_tz::UTC).unwrap();
        spec.catch_up = CatchUp::All;
        let plan = plan_ticks(
            &spec,
            Some(&at(&spec, "2019-06-01T00:00:00Z")),
            utc("2024-06-01T00:00:00Z"),
        );
        assert_eq!(plan.due.len(), 5);
        assert_eq!(plan.due[0], utc("2020-01-01T00:00:00Z"));
    }

    #[test]
    fn a_clock_that_went_back_plans_nothing_and_keeps_the_cursor() {
        let spec = hourly(CatchUp::All);
        let cursor = at(&spec, "2024-05-01T12:00:00Z");
        let plan = plan_ticks(&spec, Some(&cursor), utc("2024-05-01T11:00:00Z"));
        assert!(plan.due.is_empty() && !plan.reset);
        assert_eq!(plan.cursor, cursor);
    }

    #[test]
    fn dst_gap_ticks_are_planned_once() {
        // Berlin 2024-03-31: 02:00 does not exist; the hourly 02:00 and 03:00 are one tick.
        let spec = hourly(CatchUp::All);
        let plan = plan_ticks(
            &spec,
            Some(&at(&spec, "2024-03-30T23:30:00Z")),
            utc("2024-03-31T02:30:00Z"),
        );
        assert_eq!(
            plan.due,
            [
                utc("2024-03-31T00:00:00Z"), // 01:00 CET
                utc("2024-03-31T01:00:00Z"), // 02:00 (gap) = 03:00 CEST
                utc("2024-03-31T02:00:00Z"), // 04:00 CEST
            ]
        );
    }

    #[test]
    fn ticks_between_for_backfills() {
        let spec = hourly(CatchUp::Latest);
        let got = ticks_between(
            &spec,
            utc("2024-05-01T00:00:00Z"),
            utc("2024-05-01T03:00:00Z"),
            10,
        );
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], utc("2024-05-01T03:00:00Z"));
        let got = ticks_between(
            &spec,
            utc("2024-05-01T00:00:00Z"),
            utc("2024-06-01T00:00:00Z"),
            10,
        );
        assert_eq!(got.len(), 10);
        assert_eq!(got[0], utc("2024-05-01T01:00:00Z"));
    }
}
