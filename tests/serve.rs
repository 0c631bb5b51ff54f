//! `pipe serve`, `pipe integrations`, `pipe trigger` and `pipe backfill` through the real
//! binary: second-level cron schedules (six fields) on tiny pipelines in a temp dir.
//!
//! Waits are generous polls (a slow, shared CI machine must not fail them); no assertion is
//! about how long something took. PostgreSQL tests use a fresh database on the machine's
//! server (`PIPE_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`),
//! dropped afterwards; a missing server fails them.

use crate::util::Env;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Hang guard for every wait: far above what any of these tests needs.
const PATIENCE: Duration = Duration::from_secs(120);

/// A `pipe serve` child (lease period 3 s), its output in a file.
type Server = crate::util::Daemon;

/// Poll `f` until it returns `Some`, failing with `what` and the server's log past the
/// hang guard.
fn wait_for<T>(what: &str, server: &Server, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > until {
            panic!(
                "timed out waiting for {what}; server log:\n{}",
                server.output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn runs_with(env: &Env, db: Option<&str>, pipeline: &str) -> Vec<Value> {
    let mut args = vec!["runs", "list", "--limit", "0", "--format", "json"];
    args.extend(["--pipeline", pipeline]);
    let out = match db {
        Some(db) => env.run(&[&["--db", db][..], &args].concat()),
        None => env.run(&args),
    };
    out.expect_code(0);
    out.json().as_array().unwrap().clone()
}

fn runs(env: &Env, pipeline: &str) -> Vec<Value> {
    runs_with(env, None, pipeline)
}

fn finished(runs: &[Value]) -> Vec<&Value> {
    runs.iter()
        .filter(|r| !matches!(r["status"].as_str(), Some("running") | Some("queued")))
        .collect()
}

fn logical(r: &Value) -> chrono::DateTime<chrono::Utc> {
    r["logical_date"]
        .as_str()
        .unwrap_or_else(|| panic!("run without logical date: {r}"))
        .parse()
        .unwrap()
}

/// A pipeline file in `pipelines/` of the env.
fn pipeline(env: &Env, name: &str, schedule: &str, steps: &str) {
    env.write(
        &format!("pipelines/{name}.yaml"),
        &format!("pipeline: {name}\nschedule: {schedule}\nsteps:\n{steps}"),
    );
}

const LOG_STEP: &str = "  s: { type: log, with: { message: \"tick {{ run.logical_date }}\" } }\n";

/// Every logical date appears once, and they are consecutive seconds from the first to the
/// last (`ticks` per-second ticks with nothing missing and nothing twice).
#[track_caller]
fn assert_every_second_once(runs: &[Value]) {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for r in runs {
        *counts.entry(logical(r).timestamp()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    let first = *counts.keys().next().unwrap();
    let last = *counts.keys().last().unwrap();
    let missing: Vec<i64> = (first..=last).filter(|t| !counts.contains_key(t)).collect();
    assert!(missing.is_empty(), "ticks never run: {missing:?}");
}

#[test]
fn serve_runs_scheduled_ticks_with_trigger_schedule_and_stops_on_sigterm() {
    let env = Env::new();
    pipeline(&env, "tick", "{ cron: \"* * * * * *\" }", LOG_STEP);
    let mut server = Server::start(&env, "serve", &["pipelines", "--workers", "2"]);
    let done = wait_for("three scheduled runs", &server, || {
        let r = runs(&env, "tick");
        (finished(&r).len() >= 3).then_some(r)
    });
    for r in finished(&done) {
        assert_eq!(r["trigger"], "schedule", "{r}");
        assert_eq!(r["status"], "succeeded", "{r}");
        assert_eq!(logical(r).timestamp_subsec_nanos(), 0, "{r}");
    }
    assert_eq!(server.stop(), 0, "{}", server.output());
    // Nothing is left running after a clean stop.
    let after = runs(&env, "tick");
    assert!(after.iter().all(|r| r["status"] != "running"), "{after:?}");
    assert_every_second_once(&after);
    // The integration is in the store with its last run.
    let out = env.run(&["integrations", "show", "tick", "--format", "json"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["name"], "tick");
    assert_eq!(v["enabled"], true);
}

#[test]
fn disabled_integrations_are_not_scheduled_nor_triggered_and_resume_from_now() {
    let env = Env::new();
    pipeline(&env, "onoff", "{ cron: \"* * * * * *\" }", LOG_STEP);
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    wait_for("a first run", &server, || {
        (!finished(&runs(&env, "onoff")).is_empty()).then_some(())
    });
    env.run(&["integrations", "disable", "onoff"])
        .expect_code(0);
    let disabled_at = chrono::Utc::now();
    let listed = env.run(&["integrations", "list", "--format", "json"]);
    listed.expect_code(0);
    let row = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "onoff")
        .cloned()
        .expect("onoff listed");
    assert_eq!(row["enabled"], false, "{row}");
    let out = env.run(&["trigger", "onoff"]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("disabled"), "{}", out.stderr());

    // Several seconds of ticks pass while disabled: none of them is run, then or later.
    std::thread::sleep(Duration::from_secs(4));
    let enabled_at = chrono::Utc::now();
    env.run(&["integrations", "enable", "onoff"]).expect_code(0);
    wait_for("runs after re-enabling", &server, || {
        let r = runs(&env, "onoff");
        r.iter()
            .any(|r| logical(r) > enabled_at && r["status"] == "succeeded")
            .then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let all = runs(&env, "onoff");
    let during: Vec<_> = all
        .iter()
        .filter(|r| {
            let t = logical(r);
            // One tick may have been due as the disable landed.
            t > disabled_at + chrono::Duration::seconds(1)
                && t < enabled_at - chrono::Duration::seconds(1)
        })
        .collect();
    assert!(
        during.is_empty(),
        "ticks of the disabled time ran: {during:?}"
    );
}

#[test]
fn overlap_skip_never_runs_two_at_once() {
    let env = Env::new();
    pipeline(
        &env,
        "slow",
        "{ cron: \"* * * * * *\", max_concurrent_runs: 1, on_overlap: skip }",
        "  s: { type: exec, with: { command: sleep, args: [\"2\"] } }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines", "--workers", "4"]);
    let done = wait_for("three slow runs", &server, || {
        let r = runs(&env, "slow");
        (finished(&r).len() >= 3).then_some(r)
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let mut spans: Vec<(String, String)> = finished(&done)
        .iter()
        .map(|r| {
            (
                r["started_at"].as_str().unwrap().to_string(),
                r["finished_at"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlapped: {w:?}");
    }
    // Ticks that came while a run was running were skipped, not queued for later.
    let mut dates: Vec<i64> = done.iter().map(|r| logical(r).timestamp()).collect();
    dates.sort();
    assert!(
        dates.windows(2).any(|w| w[1] - w[0] > 1),
        "no tick was skipped: {dates:?}"
    );
}

#[test]
fn trigger_queues_a_manual_run_that_the_service_runs() {
    let env = Env::new();
    env.write(
        "pipelines/manual.yaml",
        "pipeline: manual\nparams:\n  who: { type: string, default: nobody }\nsteps:\n  s: { type: log, with: { message: \"hi {{ params.who }}\" } }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    wait_for("the integration to be loaded", &server, || {
        (env.run(&["integrations", "show", "manual"]).code() == 0).then_some(())
    });
    env.run(&["trigger", "manual", "--param", "who=ana", "--priority", "5"])
        .expect_code(0);
    let out = env.run(&["trigger", "nosuch"]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("nosuch"), "{}", out.stderr());
    let run = wait_for("the triggered run", &server, || {
        runs(&env, "manual")
            .into_iter()
            .find(|r| r["status"] == "succeeded")
    });
    assert_eq!(run["trigger"], "manual", "{run}");
    assert_eq!(run["params"]["who"], "ana", "{run}");
    assert_eq!(server.stop(), 0, "{}", server.output());
}

#[test]
fn catch_up_all_after_a_stop_runs_the_missed_ticks() {
    let env = Env::new();
    pipeline(
        &env,
        "catchup",
        "{ cron: \"* * * * * *\", catch_up: all, max_concurrent_runs: 10, on_overlap: queue }",
        LOG_STEP,
    );
    let mut server = Server::start(&env, "serve1", &["pipelines", "--workers", "4"]);
    wait_for("a first run", &server, || {
        (!finished(&runs(&env, "catchup")).is_empty()).then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let stopped_at = chrono::Utc::now();
    std::thread::sleep(Duration::from_secs(4));
    let mut server = Server::start(&env, "serve2", &["pipelines", "--workers", "4"]);
    wait_for("runs after the restart", &server, || {
        let r = runs(&env, "catchup");
        finished(&r)
            .iter()
            .any(|r| logical(r) > stopped_at + chrono::Duration::seconds(5))
            .then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let all = runs(&env, "catchup");
    assert_every_second_once(&all);
}

#[test]
fn catch_up_none_skips_the_downtime() {
    let env = Env::new();
    pipeline(
        &env,
        "nocatch",
        "{ cron: \"* * * * * *\", catch_up: none }",
        LOG_STEP,
    );
    let mut server = Server::start(&env, "serve1", &["pipelines"]);
    wait_for("a first run", &server, || {
        (!finished(&runs(&env, "nocatch")).is_empty()).then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    std::thread::sleep(Duration::from_secs(4));
    let mut server = Server::start(&env, "serve2", &["pipelines"]);
    let restarted = chrono::Utc::now();
    wait_for("runs after the restart", &server, || {
        finished(&runs(&env, "nocatch"))
            .iter()
            .any(|r| logical(r) > restarted)
            .then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let mut dates: Vec<i64> = runs(&env, "nocatch")
        .iter()
        .map(|r| logical(r).timestamp())
        .collect();
    dates.sort();
    assert!(
        dates.windows(2).any(|w| w[1] - w[0] >= 3),
        "the downtime's ticks ran: {dates:?}"
    );
}

#[test]
fn kill_9_during_ticks_then_restart_runs_every_tick_exactly_once() {
    let env = Env::new();
    pipeline(
        &env,
        "crashy",
        "{ cron: \"* * * * * *\", catch_up: all, max_catch_up: 1000, max_concurrent_runs: 10, on_overlap: queue }",
        "  s: { type: exec, with: { command: sleep, args: [\"0.3\"] } }\n",
    );
    // `kill -9` at random moments for a few minutes (PIPE_TEST_KILL_SECONDS, default 150):
    // after a random 0.5–6 s of serving, then a random 0–1.5 s of downtime. The seed is
    // printed, and PIPE_TEST_SEED replays a failure.
    let span = Duration::from_secs(
        std::env::var("PIPE_TEST_KILL_SECONDS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(150),
    );
    let seed: u64 = std::env::var("PIPE_TEST_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill -9 test: seed {seed} (PIPE_TEST_SEED), {span:?} of kills");
    let mut rng = seed;
    let mut random_ms = |lo: u64, hi: u64| {
        // xorshift64: reproducible from the seed, no dependency.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        lo + rng % (hi - lo + 1)
    };
    let began = std::time::Instant::now();
    let mut kills = 0;
    while began.elapsed() < span {
        let mut server = Server::start(
            &env,
            &format!("serve{kills}"),
            &["pipelines", "--workers", "4"],
        );
        std::thread::sleep(Duration::from_millis(random_ms(500, 6000)));
        server.kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(random_ms(0, 1500)));
    }
    eprintln!("kill -9 test: {kills} kills in {:?}", began.elapsed());
    assert!(
        runs(&env, "crashy").len() >= 10,
        "the killed servers ran almost nothing: the test proves nothing"
    );
    let mut server = Server::start(&env, "final", &["pipelines", "--workers", "4"]);
    let restarted = chrono::Utc::now();
    wait_for("caught up, no run left running", &server, || {
        let r = runs(&env, "crashy");
        let caught_up = r
            .iter()
            .any(|r| logical(r) > restarted + chrono::Duration::seconds(2));
        let running = r
            .iter()
            .any(|r| logical(r) < restarted && r["status"] == "running");
        (caught_up && !running).then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let all = runs(&env, "crashy");
    assert!(all.iter().all(|r| r["status"] != "running"), "{all:?}");
    assert_every_second_once(&all);
}

#[test]
fn sigterm_drains_running_runs_then_cancels_them_with_teardown() {
    let env = Env::new();
    // One run that finishes within the drain timeout…
    env.write(
        "quick/short.yaml",
        "pipeline: short\nsteps:\n  s: { type: exec, with: { command: sleep, args: [\"2\"] } }\n",
    );
    let mut server = Server::start(&env, "serve1", &["quick", "--drain-timeout", "60s"]);
    wait_for("short loaded", &server, || {
        (env.run(&["integrations", "show", "short"]).code() == 0).then_some(())
    });
    env.run(&["trigger", "short"]).expect_code(0);
    wait_for("short running", &server, || {
        runs(&env, "short")
            .iter()
            .any(|r| r["status"] == "running")
            .then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let r = runs(&env, "short");
    assert_eq!(r[0]["status"], "succeeded", "{r:?}");

    // …and one that does not: it is cancelled and its teardown step runs.
    env.write(
        "slow/long.yaml",
        "pipeline: long\nsteps:\n  s: { type: exec, with: { command: sleep, args: [\"600\"] } }\n  bye: { type: log, always: true, needs: [s], with: { message: goodbye } }\n",
    );
    let mut server = Server::start(&env, "serve2", &["slow", "--drain-timeout", "1s"]);
    wait_for("long loaded", &server, || {
        (env.run(&["integrations", "show", "long"]).code() == 0).then_some(())
    });
    env.run(&["trigger", "long"]).expect_code(0);
    wait_for("long running", &server, || {
        runs(&env, "long")
            .iter()
            .any(|r| r["status"] == "running")
            .then_some(())
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let r = runs(&env, "long");
    assert_eq!(r[0]["status"], "cancelled", "{r:?}");
    let id = r[0]["id"].as_i64().unwrap().to_string();
    let show = env.run(&["runs", "show", &id, "--format", "json"]);
    show.expect_code(0);
    let bye = show.json()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "bye")
        .cloned()
        .expect("teardown step recorded");
    assert_eq!(bye["status"], "succeeded", "{bye}");
}

#[test]
fn an_edit_that_fails_validation_keeps_the_previous_version_and_is_reported() {
    let env = Env::new();
    env.write(
        "pipelines/edit.yaml",
        "pipeline: edit\nsteps:\n  s: { type: log, with: { message: v1 } }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    wait_for("edit loaded", &server, || {
        (env.run(&["integrations", "show", "edit"]).code() == 0).then_some(())
    });
    env.write(
        "pipelines/edit.yaml",
        "pipeline: edit\nsteps:\n  s: { type: nosuchstep }\n",
    );
    let shown = wait_for("the load error", &server, || {
        let out = env.run(&["integrations", "show", "edit", "--format", "json"]);
        let v = out.json();
        v["load_error"].is_string().then_some(v)
    });
    assert!(
        shown["load_error"].as_str().unwrap().contains("nosuchstep"),
        "{shown}"
    );
    // The previous version still runs.
    env.run(&["trigger", "edit"]).expect_code(0);
    let run = wait_for("the run of the kept version", &server, || {
        runs(&env, "edit")
            .into_iter()
            .find(|r| r["status"] == "succeeded")
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    assert!(
        server.output().contains("nosuchstep"),
        "{}",
        server.output()
    );
    let id = run["id"].as_i64().unwrap().to_string();
    let logs = env.run(&["runs", "logs", &id]);
    assert!(logs.stdout().contains("v1"), "{}", logs.stdout());
}

#[test]
fn backfill_queues_one_run_per_tick_with_its_logical_date() {
    let env = Env::new();
    pipeline(
        &env,
        "daily",
        "{ cron: \"0 6 * * *\", timezone: America/Sao_Paulo }",
        LOG_STEP,
    );
    let mut server = Server::start(&env, "serve", &["pipelines", "--workers", "2"]);
    wait_for("daily loaded", &server, || {
        (env.run(&["integrations", "show", "daily"]).code() == 0).then_some(())
    });
    let out = env.run(&[
        "backfill",
        "daily",
        "--from",
        "2026-01-01",
        "--to",
        "2026-01-03",
        "--max-parallel",
        "2",
        "--format",
        "json",
    ]);
    out.expect_code(0);
    let bf = out.json();
    assert_eq!(bf["runs"], 3, "{bf}");
    let done = wait_for("three backfill runs", &server, || {
        let r = runs(&env, "daily");
        (r.iter().filter(|r| r["status"] == "succeeded").count() == 3).then_some(r)
    });
    let mut dates: Vec<String> = done
        .iter()
        .map(|r| {
            assert_eq!(r["trigger"], "backfill", "{r}");
            logical(r).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .collect();
    dates.sort();
    // 06:00 in São Paulo (UTC-3) is 09:00 UTC.
    assert_eq!(
        dates,
        [
            "2026-01-01T09:00:00Z",
            "2026-01-02T09:00:00Z",
            "2026-01-03T09:00:00Z"
        ]
    );
    let list = env.run(&["backfill", "list", "--format", "json"]);
    list.expect_code(0);
    assert_eq!(
        list.json().as_array().unwrap().len(),
        1,
        "{}",
        list.stdout()
    );
    assert_eq!(server.stop(), 0, "{}", server.output());
}

// PostgreSQL: two servers on one database.

#[test]
fn two_servers_on_one_postgresql_run_every_tick_once() {
    let env = Env::new();
    let db = crate::util::PgDb::new();
    let url = db.url.clone();
    pipeline(
        &env,
        "shared",
        "{ cron: \"* * * * * *\", catch_up: all, max_concurrent_runs: 10, on_overlap: queue }",
        LOG_STEP,
    );
    let mut a = Server::start(&env, "a", &["--db", &url, "pipelines", "--workers", "2"]);
    let mut b = Server::start(&env, "b", &["--db", &url, "pipelines", "--workers", "2"]);
    wait_for("ten runs", &a, || {
        (finished(&runs_with(&env, Some(&url), "shared")).len() >= 10).then_some(())
    });
    assert_eq!(a.stop(), 0, "{}", a.output());
    assert_eq!(b.stop(), 0, "{}", b.output());
    let all = runs_with(&env, Some(&url), "shared");
    assert!(all.iter().all(|r| r["status"] != "running"), "{all:?}");
    assert_every_second_once(&all);
}

/// Runs' (started, finished) spans never overlap.
#[track_caller]
fn assert_one_at_a_time(runs: &[&Value]) {
    let mut spans: Vec<(String, String)> = runs
        .iter()
        .map(|r| {
            (
                r["started_at"].as_str().unwrap().to_string(),
                r["finished_at"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlapped: {w:?}");
    }
}

#[test]
fn pause_after_failures_disables_the_integration() {
    let env = Env::new();
    pipeline(
        &env,
        "flaky",
        "{ cron: \"* * * * * *\", pause_after_failures: 2 }",
        "  s: { type: log, with: { message: broken, level: error } }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    let shown = wait_for("the integration paused", &server, || {
        let out = env.run(&["integrations", "show", "flaky", "--format", "json"]);
        if out.code() != 0 {
            return None;
        }
        let v = out.json();
        (v["enabled"] == false).then_some(v)
    });
    assert_eq!(shown["last_run"]["status"], "failed", "{shown}");
    let failed = runs(&env, "flaky")
        .iter()
        .filter(|r| r["status"] == "failed")
        .count();
    assert!(failed >= 2, "paused after {failed} failure(s)");
    assert_eq!(server.stop(), 0, "{}", server.output());
    assert!(server.output().contains("paused"), "{}", server.output());
    let out = env.run(&["trigger", "flaky"]);
    assert_ne!(out.code(), 0, "a paused integration is not triggered");
}

#[test]
fn a_paused_integration_sends_its_paused_notification() {
    let rx = crate::notify::Receiver::start(Box::new(|_, _| (200, vec![])));
    let env = Env::new();
    env.write(
        "pipelines/flaky.yaml",
        &format!(
            "pipeline: flaky\nschedule: {{ cron: \"* * * * * *\", pause_after_failures: 2 }}\nsteps:\n  s: {{ type: log, with: {{ message: broken, level: error }} }}\nnotify:\n  - on: [paused]\n    webhook: {{ url: \"{}\" }}\n",
            rx.url("/paused")
        ),
    );
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    let got = wait_for("the paused notification", &server, || {
        rx.requests().into_iter().find(|r| r.path == "/paused")
    });
    let body = got.json();
    assert_eq!(body["event"], "paused", "{body}");
    assert_eq!(body["pipeline"], "flaky", "{body}");
    assert_eq!(body["status"], "failed", "the last run's status: {body}");
    assert_eq!(server.stop(), 0, "{}", server.output());
    let paused: Vec<_> = rx
        .requests()
        .into_iter()
        .filter(|r| r.path == "/paused")
        .collect();
    assert_eq!(paused.len(), 1, "sent once");
}

#[test]
fn overlap_cancel_running_cancels_the_old_run_for_the_new_tick() {
    let env = Env::new();
    pipeline(
        &env,
        "replace",
        "{ cron: \"*/2 * * * * *\", max_concurrent_runs: 1, on_overlap: cancel_running }",
        "  s: { type: exec, with: { command: sleep, args: [\"600\"] } }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines", "--workers", "3"]);
    let done = wait_for("two runs cancelled by newer ticks", &server, || {
        let r = runs(&env, "replace");
        (r.iter().filter(|r| r["status"] == "cancelled").count() >= 2).then_some(r)
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    let cancelled: Vec<&Value> = done.iter().filter(|r| r["status"] == "cancelled").collect();
    assert_one_at_a_time(&cancelled);
}

#[test]
fn retry_on_lost_queues_a_killed_servers_run_again() {
    let env = Env::new();
    env.write(
        "pipelines/lost.yaml",
        "pipeline: lost\nintegration: { retry_on_lost: true }\nparams:\n  n: { type: integer, default: 0 }\nsteps:\n  s: { type: exec, with: { command: sleep, args: [\"{{ 2 if params.n == 7 else 1 }}\"] } }\n",
    );
    let mut server = Server::start(&env, "serve1", &["pipelines"]);
    wait_for("lost loaded", &server, || {
        (env.run(&["integrations", "show", "lost"]).code() == 0).then_some(())
    });
    // A long first attempt, so the kill lands while it runs.
    env.write(
        "pipelines/lost.yaml",
        "pipeline: lost\nintegration: { retry_on_lost: true }\nparams:\n  n: { type: integer, default: 0 }\nsteps:\n  s: { type: exec, with: { command: sh, args: [\"-c\", \"if [ -e first.done ]; then exit 0; fi; touch first.done; sleep 600\"] } }\n",
    );
    wait_for("the new version", &server, || {
        server
            .output()
            .contains("reloaded integration lost")
            .then_some(())
    });
    env.run(&["trigger", "lost", "--param", "n=7"])
        .expect_code(0);
    wait_for("the run", &server, || {
        runs(&env, "lost")
            .iter()
            .any(|r| r["status"] == "running")
            .then_some(())
    });
    server.kill9();
    let mut server = Server::start(&env, "serve2", &["pipelines"]);
    let all = wait_for("the lost run abandoned and run again", &server, || {
        let r = runs(&env, "lost");
        (r.iter().any(|r| r["status"] == "abandoned")
            && r.iter().any(|r| r["status"] == "succeeded"))
        .then_some(r)
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    assert_eq!(all.len(), 2, "{all:?}");
    for r in &all {
        assert_eq!(r["trigger"], "manual", "{r}");
        assert_eq!(r["params"]["n"], 7, "{r}");
    }
}

#[test]
fn backfill_max_parallel_and_cancel() {
    let env = Env::new();
    pipeline(
        &env,
        "hourly",
        "{ cron: \"0 * * * *\", max_concurrent_runs: 5 }",
        "  s: { type: exec, with: { command: sleep, args: [\"1\"] } }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines", "--workers", "4"]);
    wait_for("hourly loaded", &server, || {
        (env.run(&["integrations", "show", "hourly"]).code() == 0).then_some(())
    });
    // 3 ticks, one at a time.
    let out = env.run(&[
        "backfill",
        "hourly",
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-01T02:00:00Z",
        "--max-parallel",
        "1",
        "--format",
        "json",
    ]);
    out.expect_code(0);
    assert_eq!(out.json()["runs"], 3);
    let done = wait_for("the backfill's runs", &server, || {
        let r = runs(&env, "hourly");
        (r.iter().filter(|r| r["status"] == "succeeded").count() == 3).then_some(r)
    });
    assert_one_at_a_time(&finished(&done));
    // A long range, cancelled: what was still queued never runs.
    let out = env.run(&[
        "backfill",
        "hourly",
        "--from",
        "2025-01-01",
        "--to",
        "2025-01-31",
        "--format",
        "json",
    ]);
    out.expect_code(0);
    let id = out.json()["id"].as_i64().unwrap();
    env.run(&["backfill", "cancel", &id.to_string()])
        .expect_code(0);
    let list = env.run(&["backfill", "list", "--format", "json"]);
    let bf = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .cloned()
        .unwrap();
    assert_eq!(bf["state"], "cancelled", "{bf}");
    assert_eq!(bf["queued"], 0, "{bf}");
    assert!(bf["cancelled"].as_u64().unwrap() > 700, "{bf}");
    assert_eq!(server.stop(), 0, "{}", server.output());
    let after = runs(&env, "hourly");
    assert!(after.len() <= 3 + 4, "cancelled items ran: {}", after.len());
}

#[test]
fn a_removed_file_is_marked_removed_and_no_longer_scheduled() {
    let env = Env::new();
    pipeline(&env, "gone", "{ cron: \"* * * * * *\" }", LOG_STEP);
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    wait_for("a first run", &server, || {
        (!finished(&runs(&env, "gone")).is_empty()).then_some(())
    });
    std::fs::remove_file(env.path().join("pipelines/gone.yaml")).unwrap();
    wait_for("the integration removed", &server, || {
        let v = env
            .run(&["integrations", "show", "gone", "--format", "json"])
            .json();
        (v["removed"] == true).then_some(())
    });
    let out = env.run(&["trigger", "gone"]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("gone"), "{}", out.stderr());
    assert_eq!(server.stop(), 0, "{}", server.output());
}

#[test]
fn a_queued_repair_runs_on_the_service_as_the_next_attempt() {
    let env = Env::new();
    env.write(
        "pipelines/fixme.yaml",
        "pipeline: fixme\nsteps:\n  first: { type: log, with: { message: kept } }\n  check:\n    type: exec\n    needs: [first]\n    with: { command: sh, args: [\"-c\", \"test -e fixed\"], on_nonzero: fail }\n",
    );
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    wait_for("fixme loaded", &server, || {
        (env.run(&["integrations", "show", "fixme"]).code() == 0).then_some(())
    });
    env.run(&["trigger", "fixme"]).expect_code(0);
    let failed = wait_for("the failed run", &server, || {
        runs(&env, "fixme")
            .into_iter()
            .find(|r| r["status"] == "failed")
    });
    let id = failed["id"].as_i64().unwrap();
    std::fs::write(env.path().join("pipelines/fixed"), "").unwrap();
    let out = env.run(&["runs", "repair", &id.to_string(), "--queue"]);
    out.expect_code(0);
    assert!(out.stdout().contains("attempt 2"), "{}", out.stdout());
    let repaired = wait_for("the repaired run", &server, || {
        runs(&env, "fixme")
            .into_iter()
            .find(|r| r["id"] == id && r["status"] == "succeeded")
    });
    assert_eq!(server.stop(), 0, "{}", server.output());
    assert_eq!(repaired["attempt"], 2, "{repaired}");
    assert_eq!(runs(&env, "fixme").len(), 1, "the repair is the same run");
}

/// A store that never answers (a port that takes connections and says nothing): SIGTERM
/// while `pipe serve` and `pipe worker` wait for it is a clean stop that does not wait for
/// the 30 s connect timeout (which would end in "cannot open the store", exit 1), nor an exit
/// by the signal.
#[test]
fn sigterm_while_the_store_does_not_answer_stops_cleanly() {
    let env = Env::new();
    pipeline(&env, "tick", "{ cron: \"* * * * * *\" }", LOG_STEP);
    // Bound and listening, never accepted: the kernel completes the handshake and the
    // PostgreSQL client waits for an answer to its startup message.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let db = format!("postgres://postgres@{}/never", silent.local_addr().unwrap());
    for args in [
        &["serve", "pipelines"][..],
        &[
            "worker",
            "pipelines",
            "--broker",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ][..],
    ] {
        let mut d = crate::util::Daemon::spawn(&env, args[0], args, &[("PIPE_DB", &db)]);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            d.exited(),
            None,
            "{} ended by itself:\n{}",
            args[0],
            d.output()
        );
        assert_eq!(d.stop(), 0, "{}", d.output());
        assert!(
            d.output().contains("stopped before the store was opened"),
            "{}",
            d.output()
        );
    }
}

/// A disabled integration shows no next run (not the instant planned before it was
/// disabled); enabled again, it shows the next one from now.
#[test]
fn a_disabled_integration_has_no_next_run_until_enabled() {
    let env = Env::new();
    pipeline(&env, "daily", "{ cron: \"0 3 * * *\" }", LOG_STEP);
    let mut server = Server::start(&env, "serve", &["pipelines"]);
    // Null also while the server has not loaded it yet.
    let next = |env: &Env| {
        let out = env.run(&["integrations", "show", "daily", "--format", "json"]);
        if out.code() != 0 {
            return Value::Null;
        }
        out.json()["next_run_at"].clone()
    };
    let planned = wait_for("a next run", &server, || {
        Some(next(&env)).filter(|v| !v.is_null())
    });
    env.run(&["integrations", "disable", "daily"])
        .expect_code(0);
    assert!(next(&env).is_null(), "{}", next(&env));
    let text = env.run(&["integrations", "show", "daily"]);
    assert!(!text.stdout().contains("next run"), "{}", text.stdout());
    env.run(&["integrations", "enable", "daily"]).expect_code(0);
    let again = wait_for("a next run after enabling", &server, || {
        Some(next(&env)).filter(|v| !v.is_null())
    });
    assert_eq!(again, planned, "the same 03:00 comes next");
    assert_eq!(server.stop(), 0, "{}", server.output());
}
