//! Fire times across DST changes in four zones, checked against instants written out by
//! hand, and against a brute-force oracle that walks every minute of a year.

use crate::*;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&Utc)
}

fn tz(name: &str) -> Tz {
    name.parse().unwrap()
}

fn cron(expr: &str, zone: &str) -> ScheduleSpec {
    ScheduleSpec::cron(expr, tz(zone)).unwrap()
}

/// The next `n` fire times after `after`, as RFC 3339 UTC strings.
fn fires(spec: &ScheduleSpec, after: &str, n: usize) -> Vec<String> {
    upcoming(spec, utc(after), n)
        .into_iter()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .collect()
}

#[test]
fn new_york_spring_forward_fires_a_skipped_time_at_the_end_of_the_gap() {
    // 2024-03-10 02:00 EST -> 03:00 EDT (07:00Z): 02:30 does not exist.
    let s = cron("30 2 * * *", "America/New_York");
    assert_eq!(
        fires(&s, "2024-03-09T00:00:00Z", 3),
        [
            "2024-03-09T07:30:00Z", // 02:30 EST
            "2024-03-10T07:00:00Z", // 03:00 EDT, the first instant after the gap
            "2024-03-11T06:30:00Z", // 02:30 EDT
        ]
    );
}

#[test]
fn new_york_fall_back_fires_a_repeated_time_once_at_its_first_occurrence() {
    // 2024-11-03 02:00 EDT -> 01:00 EST (06:00Z): 01:00-01:59 happens twice.
    let s = cron("30 1 * * *", "America/New_York");
    assert_eq!(
        fires(&s, "2024-11-02T12:00:00Z", 3),
        [
            "2024-11-03T05:30:00Z", // 01:30 EDT (first); 01:30 EST (06:30Z) never fires
            "2024-11-04T06:30:00Z", // 01:30 EST the next day
            "2024-11-05T06:30:00Z",
        ]
    );
    // 01:00 EDT fires; 01:00 EST the next day fires too (croner alone skips it).
    let s = cron("0 1 * * *", "America/New_York");
    assert_eq!(
        fires(&s, "2024-11-02T12:00:00Z", 2),
        ["2024-11-03T05:00:00Z", "2024-11-04T06:00:00Z"]
    );
}

#[test]
fn inside_the_repeated_hour_the_next_fire_is_never_in_the_past() {
    // 06:30Z is 01:30 EST, the second 01:30 of 2024-11-03.
    let inside = utc("2024-11-03T06:30:00Z");
    for (expr, expected) in [
        ("0 2 * * *", "2024-11-03T07:00:00Z"), // 02:00 EST, 30 minutes later
        ("30 1 * * *", "2024-11-04T06:30:00Z"), // today's 01:30 already fired
        ("45 1 * * *", "2024-11-04T06:45:00Z"), // 01:45 EDT fired at 05:45Z
        ("0 * * * *", "2024-11-03T07:00:00Z"),
    ] {
        let s = cron(expr, "America/New_York");
        let next = next_after(&s, inside).unwrap();
        assert!(next > inside, "{expr}: {next}");
        assert_eq!(next, utc(expected), "{expr}");
    }
}

#[test]
fn hourly_and_quarter_hourly_across_both_new_york_changes() {
    let hourly = cron("0 * * * *", "America/New_York");
    // Spring: 02:00 does not exist and collapses with 03:00 EDT into 07:00Z.
    assert_eq!(
        fires(&hourly, "2024-03-10T04:30:00Z", 4),
        [
            "2024-03-10T05:00:00Z", // 00:00 EST
            "2024-03-10T06:00:00Z", // 01:00 EST
            "2024-03-10T07:00:00Z", // 02:00 (nonexistent) = 03:00 EDT, once
            "2024-03-10T08:00:00Z", // 04:00 EDT
        ]
    );
    // Autumn: 01:00 EST (06:00Z) is the second 01:00 and does not fire.
    assert_eq!(
        fires(&hourly, "2024-11-03T03:30:00Z", 4),
        [
            "2024-11-03T04:00:00Z", // 00:00 EDT
            "2024-11-03T05:00:00Z", // 01:00 EDT
            "2024-11-03T07:00:00Z", // 02:00 EST
            "2024-11-03T08:00:00Z",
        ]
    );
    let quarter = cron("*/15 * * * *", "America/New_York");
    assert_eq!(
        fires(&quarter, "2024-03-10T06:40:00Z", 3),
        [
            "2024-03-10T06:45:00Z", // 01:45 EST
            "2024-03-10T07:00:00Z", // 02:00-02:45 and 03:00 EDT: one fire
            "2024-03-10T07:15:00Z", // 03:15 EDT
        ]
    );
    assert_eq!(
        fires(&quarter, "2024-11-03T05:40:00Z", 2),
        [
            "2024-11-03T05:45:00Z", // 01:45 EDT
            "2024-11-03T07:00:00Z", // 02:00 EST: the repeated hour fires nothing
        ]
    );
}

#[test]
fn second_level_crons_across_both_changes() {
    let s = cron("*/20 * * * * *", "America/New_York");
    assert_eq!(
        fires(&s, "2024-03-10T06:59:30Z", 3),
        [
            "2024-03-10T06:59:40Z", // 01:59:40 EST
            "2024-03-10T07:00:00Z", // the gap collapses to 03:00:00 EDT
            "2024-03-10T07:00:20Z",
        ]
    );
    assert_eq!(
        fires(&s, "2024-11-03T05:59:30Z", 3),
        [
            "2024-11-03T05:59:40Z", // 01:59:40 EDT
            "2024-11-03T07:00:00Z", // 02:00:00 EST
            "2024-11-03T07:00:20Z",
        ]
    );
    // Every second over the spring gap: one fire at the transition, none repeated.
    let every = cron("* * * * * *", "America/New_York");
    assert_eq!(
        fires(&every, "2024-03-10T06:59:58Z", 3),
        [
            "2024-03-10T06:59:59Z",
            "2024-03-10T07:00:00Z",
            "2024-03-10T07:00:01Z"
        ]
    );
    // Every second over the autumn change: the repeated hour is a one-hour hole.
    assert_eq!(
        fires(&every, "2024-11-03T05:59:58Z", 2),
        ["2024-11-03T05:59:59Z", "2024-11-03T07:00:00Z"]
    );
    // A sub-second `after` still gives the next whole second.
    assert_eq!(
        next_after(&every, utc("2024-01-01T00:00:00.5Z")).unwrap(),
        utc("2024-01-01T00:00:01Z")
    );
}

#[test]
fn berlin_both_changes() {
    // 2024-03-31 02:00 CET -> 03:00 CEST (01:00Z); 2024-10-27 03:00 CEST -> 02:00 CET (01:00Z).
    let s = cron("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        fires(&s, "2024-03-30T00:00:00Z", 3),
        [
            "2024-03-30T01:30:00Z", // 02:30 CET
            "2024-03-31T01:00:00Z", // 03:00 CEST
            "2024-04-01T00:30:00Z", // 02:30 CEST
        ]
    );
    assert_eq!(
        fires(&s, "2024-10-26T00:00:00Z", 3),
        [
            "2024-10-26T00:30:00Z", // 02:30 CEST
            "2024-10-27T00:30:00Z", // 02:30 CEST, first; not 01:30Z
            "2024-10-28T01:30:00Z", // 02:30 CET
        ]
    );
}

#[test]
fn sao_paulo_2018_midnight_that_did_not_exist_and_the_2019_end() {
    // 2018-11-04 00:00 -03 -> 01:00 -02 (03:00Z): that midnight never happened.
    let midnight = cron("0 0 * * *", "America/Sao_Paulo");
    assert_eq!(
        fires(&midnight, "2018-11-02T12:00:00Z", 3),
        [
            "2018-11-03T03:00:00Z", // 00:00 -03
            "2018-11-04T03:00:00Z", // 01:00 -02, the first instant of the day
            "2018-11-05T02:00:00Z", // 00:00 -02
        ]
    );
    // 00:30 is in the same gap: it fires at the same instant.
    let half = cron("30 0 * * *", "America/Sao_Paulo");
    assert_eq!(
        next_after(&half, utc("2018-11-03T12:00:00Z")).unwrap(),
        utc("2018-11-04T03:00:00Z")
    );
    // 2019-02-17 00:00 -02 -> 2019-02-16 23:00 -03 (02:00Z): 23:xx on the 16th twice.
    let late = cron("30 23 * * *", "America/Sao_Paulo");
    assert_eq!(
        fires(&late, "2019-02-15T12:00:00Z", 3),
        [
            "2019-02-16T01:30:00Z", // 2019-02-15 23:30 -02
            "2019-02-17T01:30:00Z", // 2019-02-16 23:30 -02, the first; not 02:30Z
            "2019-02-18T02:30:00Z", // 2019-02-17 23:30 -03
        ]
    );
    assert_eq!(
        fires(&midnight, "2019-02-15T12:00:00Z", 3),
        [
            "2019-02-16T02:00:00Z", // 00:00 -02
            "2019-02-17T03:00:00Z", // 00:00 -03 (the clock went back before it)
            "2019-02-18T03:00:00Z",
        ]
    );
}

#[test]
fn lord_howe_half_hour_changes() {
    // 2024-10-06 02:00 +10:30 -> 02:30 +11 (2024-10-05T15:30Z).
    let s = cron("15 2 * * *", "Australia/Lord_Howe");
    assert_eq!(
        fires(&s, "2024-10-04T00:00:00Z", 3),
        [
            "2024-10-04T15:45:00Z", // 02:15 +10:30
            "2024-10-05T15:30:00Z", // 02:30 +11
            "2024-10-06T15:15:00Z", // 02:15 +11
        ]
    );
    let ten = cron("*/10 * * * *", "Australia/Lord_Howe");
    assert_eq!(
        fires(&ten, "2024-10-05T15:15:00Z", 3),
        [
            "2024-10-05T15:20:00Z", // 01:50 +10:30
            "2024-10-05T15:30:00Z", // 02:00-02:20 and 02:30 +11: once
            "2024-10-05T15:40:00Z", // 02:40 +11
        ]
    );
    // 2024-04-07 02:00 +11 -> 01:30 +10:30 (2024-04-06T15:00Z): 01:30-01:59 twice.
    let s = cron("45 1 * * *", "Australia/Lord_Howe");
    assert_eq!(
        fires(&s, "2024-04-05T00:00:00Z", 3),
        [
            "2024-04-05T14:45:00Z", // 01:45 +11
            "2024-04-06T14:45:00Z", // 01:45 +11, first; not 15:15Z
            "2024-04-07T15:15:00Z", // 01:45 +10:30
        ]
    );
    assert_eq!(
        fires(&ten, "2024-04-06T14:45:00Z", 3),
        [
            "2024-04-06T14:50:00Z", // 01:50 +11
            "2024-04-06T15:30:00Z", // 02:00 +10:30 (01:30-01:50 again do not fire)
            "2024-04-06T15:40:00Z",
        ]
    );
}

#[test]
fn intervals_step_in_utc_from_the_epoch() {
    let s = ScheduleSpec::interval(std::time::Duration::from_secs(15 * 60)).unwrap();
    assert_eq!(
        fires(&s, "2024-03-10T06:52:13Z", 3),
        [
            "2024-03-10T07:00:00Z",
            "2024-03-10T07:15:00Z",
            "2024-03-10T07:30:00Z"
        ]
    );
    // Strictly after: an instant on the grid gives the next one.
    assert_eq!(
        next_after(&s, utc("2024-03-10T07:00:00Z")).unwrap(),
        utc("2024-03-10T07:15:00Z")
    );
    // A timezone does not move interval ticks, DST or not.
    let mut ny = s.clone();
    ny.timezone = tz("America/New_York");
    assert_eq!(
        fires(&ny, "2024-11-03T05:50:00Z", 3),
        fires(&s, "2024-11-03T05:50:00Z", 3)
    );
    assert_eq!(ny.fingerprint(), s.fingerprint());
    // Before the epoch too.
    let s = ScheduleSpec::interval(std::time::Duration::from_secs(7)).unwrap();
    assert_eq!(
        next_after(&s, utc("1969-12-31T23:59:50Z")).unwrap(),
        utc("1969-12-31T23:59:53Z") // -7 s
    );
    assert_eq!(
        next_after(&s, utc("1969-12-31T23:59:53Z")).unwrap(),
        utc("1970-01-01T00:00:00Z")
    );
    assert!(ScheduleSpec::interval(std::time::Duration::ZERO).is_err());
    assert!(ScheduleSpec::interval(std::time::Duration::from_millis(1500)).is_err());
}

#[test]
fn a_cron_that_never_fires_is_refused() {
    for expr in ["0 0 30 2 *", "0 0 31 4,6 *", "0 0 31 2,4,6,9,11 *"] {
        let e = ScheduleSpec::cron(expr, chrono_tz::UTC).unwrap_err();
        assert!(e.0.contains("never fires"), "{expr}: {e}");
    }
    // Rare is fine: Feb 29, and a weekday OR a day of the month.
    let leap = cron("0 0 29 2 *", "UTC");
    assert_eq!(
        next_after(&leap, utc("2024-03-01T00:00:00Z")),
        Some(utc("2028-02-29T00:00:00Z"))
    );
    assert!(ScheduleSpec::cron("0 0 30 2 1", chrono_tz::UTC).is_ok());
}

#[test]
fn fingerprints_follow_cron_and_timezone() {
    let a = cron("0 6 * * *", "America/Sao_Paulo");
    assert_eq!(
        a.fingerprint(),
        cron("0  6 * *   *", "America/Sao_Paulo").fingerprint()
    );
    assert_ne!(
        a.fingerprint(),
        cron("0 7 * * *", "America/Sao_Paulo").fingerprint()
    );
    assert_ne!(a.fingerprint(), cron("0 6 * * *", "UTC").fingerprint());
    assert_eq!(a.fingerprint().len(), 16);
    // Stable across versions: the value is part of stored cursors.
    assert_eq!(
        cron("0 6 * * *", "UTC").fingerprint(),
        ScheduleSpec::cron("0 6 * * *", chrono_tz::UTC)
            .unwrap()
            .fingerprint()
    );
}

/// Brute force: walk every minute of `[from, to)`; a minute instant fires when some
/// matching wall-clock minute lies in (the latest wall clock seen before it, its own wall
/// clock] — the first time the clock shows it. Independent of the search in `cron.rs`.
fn oracle(expr: &str, zone: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let matcher = engine::schedule_check::parse(expr).unwrap();
    let matches = |n: chrono::NaiveDateTime| {
        matcher
            .is_time_matching(&Utc.from_utc_datetime(&n))
            .unwrap()
    };
    let mut out = Vec::new();
    let mut seen_max = (from - TimeDelta::minutes(1))
        .with_timezone(&zone)
        .naive_local();
    let mut t = from;
    while t < to {
        let local = t.with_timezone(&zone).naive_local();
        if local > seen_max {
            let mut n = seen_max + TimeDelta::minutes(1);
            while n <= local {
                if matches(n) {
                    out.push(t);
                    break;
                }
                n += TimeDelta::minutes(1);
            }
            seen_max = local;
        }
        t += TimeDelta::minutes(1);
    }
    out
}

#[test]
fn a_year_of_fire_times_matches_the_brute_force_and_strictly_increases() {
    let cases = [
        ("America/New_York", "*/15 * * * *"),
        ("America/New_York", "30 1,2 * * *"),
        ("Europe/Berlin", "0 2 * * 0"),
        ("America/Sao_Paulo", "0 0 * * *"),
        ("Australia/Lord_Howe", "*/10 1-3 * * *"),
        ("Australia/Lord_Howe", "0 * * * *"),
        ("America/Sao_Paulo", "*/30 22-23,0-1 * * *"),
        ("Europe/Berlin", "15 2 * * *"),
    ];
    for (zone, expr) in cases {
        let zone = tz(zone);
        let (from, to) = if zone.name() == "America/Sao_Paulo" {
            (utc("2018-06-01T00:00:00Z"), utc("2019-06-01T00:00:00Z"))
        } else {
            (utc("2024-01-01T00:00:00Z"), utc("2025-01-01T00:00:00Z"))
        };
        let spec = ScheduleSpec::cron(expr, zone).unwrap();
        let mut got = Vec::new();
        let mut t = from - TimeDelta::seconds(1);
        while let Some(next) = next_after(&spec, t).filter(|n| *n < to) {
            assert!(next > t, "{expr} in {zone}: {next} after {t}");
            got.push(next);
            t = next;
        }
        let want = oracle(expr, zone, from, to);
        assert!(got.len() > 50, "{expr} in {zone}: {} fires", got.len());
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "{expr} in {zone}: {} fires vs {} expected; first difference at {first:?}: {:?} vs {:?}",
                got.len(),
                want.len(),
                first.map(|i| got[i]),
                first.map(|i| want[i]),
            );
        }
    }
}

#[test]
fn a_year_of_second_level_fires_has_no_duplicates_near_changes() {
    // Every 7 seconds over the days around each change, in every zone of the tests.
    for (zone, days) in [
        ("America/New_York", ["2024-03-10", "2024-11-03"]),
        ("Europe/Berlin", ["2024-03-31", "2024-10-27"]),
        ("America/Sao_Paulo", ["2018-11-04", "2019-02-17"]),
        ("Australia/Lord_Howe", ["2024-04-07", "2024-10-06"]),
    ] {
        let spec = cron("*/7 * * * * *", zone);
        for day in days {
            let from = utc(&format!("{day}T00:00:00Z")) - TimeDelta::days(1);
            let to = from + TimeDelta::days(2);
            let mut t = from;
            let mut count = 0;
            while let Some(next) = next_after(&spec, t).filter(|n| *n < to) {
                assert!(next > t && next - t <= TimeDelta::hours(1) + TimeDelta::seconds(7));
                t = next;
                count += 1;
            }
            assert!(count > 20_000, "{zone} {day}: {count}");
        }
    }
}

#[test]
fn a_loop_waking_at_random_plans_every_tick_of_a_year_exactly_once() {
    // catch_up: all with room for every tick: the union of the plans is the fire list, in
    // order, whatever the wake-ups (seconds to hours apart, across both DST changes).
    for (zone, expr) in [
        ("America/New_York", "*/20 * * * *"),
        ("Australia/Lord_Howe", "0,30 1-3 * * *"),
    ] {
        let mut spec = cron(expr, zone);
        spec.catch_up = CatchUp::All;
        spec.max_catch_up = 10_000;
        let from = utc("2024-01-01T00:00:00Z");
        let to = utc("2025-01-01T00:00:00Z");
        let mut cursor = plan_ticks(&spec, None, from).cursor;
        let mut planned = Vec::new();
        let mut now = from;
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        while now < to {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            now += TimeDelta::milliseconds(1 + (seed >> 33) as i64 % 10_800_000);
            let now = now.min(to);
            let plan = plan_ticks(&spec, Some(&cursor), now);
            assert!(!plan.reset && plan.dropped_since.is_none(), "{plan:?}");
            planned.extend(plan.due);
            cursor = plan.cursor;
        }
        let mut expected = Vec::new();
        let mut t = from;
        while let Some(next) = next_after(&spec, t).filter(|n| *n <= to) {
            expected.push(next);
            t = next;
        }
        assert!(expected.len() > 1000, "{expr}: {}", expected.len());
        assert_eq!(planned, expected, "{expr} in {zone}");
    }
}
