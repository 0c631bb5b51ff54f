//! `pipe schedule next`: fire times through the real binary, DST changes visible, and the
//! schedule keys' validation.

use crate::util::Env;

fn pipeline(schedule: &str) -> String {
    format!(
        "pipeline: sched\nschedule: {schedule}\nsteps:\n  a:\n    type: log\n    with: {{ message: hi }}\n"
    )
}

/// `pipe schedule next --format json` fire times as (utc, local).
fn fires(env: &Env, schedule: &str, after: &str, count: usize) -> Vec<(String, String)> {
    let file = env.write("p.yaml", &pipeline(schedule));
    let out = env.run(&[
        "schedule",
        "next",
        file.to_str().unwrap(),
        "--after",
        after,
        "--count",
        &count.to_string(),
        "--format",
        "json",
    ]);
    out.expect_code(0);
    out.json()["fires"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["utc"].as_str().unwrap().to_string(),
                f["local"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn new_york_spring_gap_and_autumn_repeat() {
    let env = Env::new();
    assert_eq!(
        fires(
            &env,
            "{ cron: \"30 2 * * *\", timezone: America/New_York }",
            "2024-03-09T00:00:00Z",
            3
        ),
        pairs(&[
            ("2024-03-09T07:30:00Z", "2024-03-09T02:30:00-05:00"),
            ("2024-03-10T07:00:00Z", "2024-03-10T03:00:00-04:00"),
            ("2024-03-11T06:30:00Z", "2024-03-11T02:30:00-04:00"),
        ])
    );
    // Hourly over the autumn change: 01:00 fires once (EDT), then 02:00 EST.
    assert_eq!(
        fires(
            &env,
            "{ cron: \"0 * * * *\", timezone: America/New_York }",
            "2024-11-03T04:30:00Z",
            3
        ),
        pairs(&[
            ("2024-11-03T05:00:00Z", "2024-11-03T01:00:00-04:00"),
            ("2024-11-03T07:00:00Z", "2024-11-03T02:00:00-05:00"),
            ("2024-11-03T08:00:00Z", "2024-11-03T03:00:00-05:00"),
        ])
    );
}

#[test]
fn sao_paulo_2018_midnight_and_berlin_and_lord_howe() {
    let env = Env::new();
    assert_eq!(
        fires(
            &env,
            "{ cron: \"0 0 * * *\", timezone: America/Sao_Paulo }",
            "2018-11-03T12:00:00Z",
            2
        ),
        pairs(&[
            ("2018-11-04T03:00:00Z", "2018-11-04T01:00:00-02:00"),
            ("2018-11-05T02:00:00Z", "2018-11-05T00:00:00-02:00"),
        ])
    );
    assert_eq!(
        fires(
            &env,
            "{ cron: \"30 2 * * *\", timezone: Europe/Berlin }",
            "2024-10-26T12:00:00Z",
            2
        ),
        pairs(&[
            ("2024-10-27T00:30:00Z", "2024-10-27T02:30:00+02:00"),
            ("2024-10-28T01:30:00Z", "2024-10-28T02:30:00+01:00"),
        ])
    );
    assert_eq!(
        fires(
            &env,
            "{ cron: \"15 2 * * *\", timezone: Australia/Lord_Howe }",
            "2024-10-05T00:00:00Z",
            2
        ),
        pairs(&[
            ("2024-10-05T15:30:00Z", "2024-10-06T02:30:00+11:00"),
            ("2024-10-06T15:15:00Z", "2024-10-07T02:15:00+11:00"),
        ])
    );
    // Second-level cron over the New York spring gap.
    assert_eq!(
        fires(
            &env,
            "{ cron: \"*/30 * * * * *\", timezone: America/New_York }",
            "2024-03-10T06:59:00Z",
            3
        ),
        pairs(&[
            ("2024-03-10T06:59:30Z", "2024-03-10T01:59:30-05:00"),
            ("2024-03-10T07:00:00Z", "2024-03-10T03:00:00-04:00"),
            ("2024-03-10T07:00:30Z", "2024-03-10T03:00:30-04:00"),
        ])
    );
}

#[test]
fn text_output_shows_utc_local_and_the_offset_change() {
    let env = Env::new();
    let file = env.write(
        "p.yaml",
        &pipeline("{ cron: \"0 0 * * *\", timezone: America/Sao_Paulo }"),
    );
    // A wall-clock `--after` is read in the schedule's zone.
    let out = env.run(&[
        "schedule",
        "next",
        file.to_str().unwrap(),
        "--after",
        "2018-11-03T12:00",
        "--count",
        "2",
    ]);
    out.expect_code(0);
    let text = out.stdout();
    assert!(
        text.contains("cron \"0 0 * * *\" in America/Sao_Paulo"),
        "{text}"
    );
    assert!(text.contains("after 2018-11-03T15:00:00Z"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].starts_with("UTC") && lines[1].contains("America/Sao_Paulo"));
    assert!(
        lines[2].starts_with("2018-11-04T03:00:00Z  2018-11-04T01:00:00-02:00")
            && lines[2].contains("UTC offset -02:00 (was -03:00)"),
        "{text}"
    );
    assert!(
        lines[3].starts_with("2018-11-05T02:00:00Z  2018-11-05T00:00:00-02:00")
            && !lines[3].contains("offset"),
        "{text}"
    );
}

#[test]
fn intervals_step_in_utc() {
    let env = Env::new();
    assert_eq!(
        fires(
            &env,
            "{ interval: 15m, timezone: America/New_York }",
            "2024-11-03T05:50:00Z",
            3
        ),
        pairs(&[
            ("2024-11-03T06:00:00Z", "2024-11-03T01:00:00-05:00"),
            ("2024-11-03T06:15:00Z", "2024-11-03T01:15:00-05:00"),
            ("2024-11-03T06:30:00Z", "2024-11-03T01:30:00-05:00"),
        ])
    );
}

#[test]
fn no_schedule_invalid_file_and_bad_arguments_are_clear_errors() {
    let env = Env::new();
    let file = env.write(
        "none.yaml",
        "pipeline: none\nsteps:\n  a:\n    type: log\n    with: { message: hi }\n",
    );
    let out = env.run(&["schedule", "next", file.to_str().unwrap()]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("has no `schedule:`"),
        "{}",
        out.stderr()
    );

    let bad = env.write("bad.yaml", &pipeline("{ cron: \"0 25 * * *\" }"));
    let out = env.run(&["schedule", "next", bad.to_str().unwrap()]);
    out.expect_code(2);
    let err = out.stderr();
    assert!(err.contains("bad.yaml:2:") && err.contains("E014"), "{err}");
    assert!(err.contains("is not a valid pipeline"), "{err}");

    let ok = env.write("ok.yaml", &pipeline("{ cron: \"0 6 * * *\" }"));
    for args in [
        vec!["--after", "yesterday"],
        vec!["--count", "0"],
        vec!["--count", "100000"],
    ] {
        let mut all = vec!["schedule", "next", ok.to_str().unwrap()];
        all.extend(args.iter().copied());
        let out = env.run(&all);
        out.expect_code(2);
        assert!(
            out.stderr().starts_with("error: --"),
            "{args:?}: {}",
            out.stderr()
        );
    }
    // The default start is now: ten fire times, each in the future.
    let out = env.run(&["schedule", "next", ok.to_str().unwrap(), "--format", "json"]);
    out.expect_code(0);
    let v = out.json();
    let fires = v["fires"].as_array().unwrap();
    assert_eq!(fires.len(), 10);
    let now = chrono::Utc::now();
    for f in fires {
        let t = chrono::DateTime::parse_from_rfc3339(f["utc"].as_str().unwrap()).unwrap();
        assert!(t > now - chrono::TimeDelta::seconds(5), "{t}");
    }
}

#[test]
fn schedule_and_integration_keys_are_validated_with_positions() {
    let env = Env::new();
    let diagnostics = |name: &str, text: &str| {
        let file = env.write(name, text);
        let out = env.run(&["validate", "--format", "json", file.to_str().unwrap()]);
        out.expect_code(1);
        out.diagnostics()
    };
    let has = |got: &[(u64, u64, String)], line: u64, col: u64, text: &str| {
        got.iter()
            .any(|(l, c, m)| *l == line && *c == col && m.contains(text))
    };
    // Unknown words of the enums, at their values.
    let got = diagnostics(
        "words.yaml",
        "pipeline: words
schedule:
  cron: \"0 6 * * *\"
  on_overlap: sometimes
integration:
  direction: sideways
steps:
  a:
    type: log
    with: { message: hi }
",
    );
    assert!(
        has(&got, 4, 15, "expected one of: skip, queue, cancel_running"),
        "{got:?}"
    );
    assert!(
        has(
            &got,
            6,
            14,
            "expected one of: inward, outward, bidirectional"
        ),
        "{got:?}"
    );
    // Ranges, both triggers, a queue name, a repeated tag, a template: all in one pass.
    let got = diagnostics(
        "keys.yaml",
        "pipeline: keys
schedule:
  cron: \"0 6 * * *\"
  interval: 15m
  max_concurrent_runs: 0
  max_catch_up: 0
  pause_after_failures: \"{{ params.n }}\"
integration:
  queue: \"no spaces\"
  tags: [a, a]
steps:
  a:
    type: log
    with: { message: hi }
",
    );
    assert!(has(&got, 4, 13, "not both"), "{got:?}");
    assert!(has(&got, 5, 24, "max_concurrent_runs"), "{got:?}");
    assert!(has(&got, 6, 17, "max_catch_up"), "{got:?}");
    assert!(has(&got, 7, 25, "not templates"), "{got:?}");
    assert!(has(&got, 9, 10, "queue name"), "{got:?}");
    assert!(has(&got, 10, 13, "given twice"), "{got:?}");
    let got = diagnostics(
        "interval.yaml",
        "pipeline: iv\nschedule: { interval: 1500ms }\nsteps:\n  a:\n    type: log\n    with: { message: hi }\n",
    );
    assert!(has(&got, 2, 23, "whole number of seconds"), "{got:?}");
    let got = diagnostics(
        "never.yaml",
        "pipeline: never\nschedule: { cron: \"0 0 30 2 *\" }\nsteps:\n  a:\n    type: log\n    with: { message: hi }\n",
    );
    assert!(has(&got, 2, 19, "never fires"), "{got:?}");

    let file = env.write(
        "neither.yaml",
        "pipeline: neither\nschedule: { timezone: UTC }\nsteps:\n  a:\n    type: log\n    with: { message: hi }\n",
    );
    let out = env.run(&["validate", "--format", "json", file.to_str().unwrap()]);
    out.expect_code(1);
    let got = out.diagnostics();
    assert!(
        got.iter()
            .any(|(l, _, m)| *l == 2 && m.contains("needs `cron`") && m.contains("interval")),
        "{got:?}"
    );

    // A full, valid block passes.
    let file = env.write(
        "full.yaml",
        "pipeline: full
schedule:
  interval: 30s
  timezone: Europe/Berlin
  max_concurrent_runs: 2
  on_overlap: cancel_running
  catch_up: all
  max_catch_up: 50
  pause_after_failures: 3
integration:
  group: billing
  direction: bidirectional
  external_system: Tiflux
  owner: data-team
  tags: [nightly, finance]
  queue: high_priority
  priority: 10
  retry_on_lost: true
steps:
  a:
    type: log
    with: { message: hi }
",
    );
    let out = env.run(&["validate", file.to_str().unwrap()]);
    out.expect_code(0);
}
