//! Executor semantics through `pipe run`: ordering, concurrency, retry, timeout, skip,
//! teardown after failure and after Ctrl-C, outputs between steps, params.

use crate::util::{history, Env, Out};
use std::time::{Duration, Instant};

fn steps_of(v: &serde_json::Value) -> Vec<(String, String, u64)> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["attempts"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn status_of(v: &serde_json::Value, id: &str) -> String {
    steps_of(v)
        .into_iter()
        .find(|s| s.0 == id)
        .unwrap_or_else(|| panic!("no step {id}"))
        .1
}

#[test]
fn dependencies_order_steps_and_outputs_flow_between_them() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: flow
params:
  days: { type: integer, default: 3 }
steps:
  second:
    type: exec
    with:
      command: sh
      args: ["-c", "test -f first.done && echo got-{{ steps.first.answer }}-{{ params.days }}"]
    outputs:
      line: "{{ result.stdout_last_line }}"
  first:
    type: exec
    with:
      command: sh
      args: ["-c", "touch first.done; echo '::set-output name=answer::42'"]
  third:
    type: log
    with: { message: "{{ steps.second.line }} {{ steps.first.succeeded }}", outputs: { n: "{{ params.days * 2 }}" } }
"#,
    );
    let out = env.run(&[
        "run",
        p.to_str().unwrap(),
        "--format",
        "json",
        "--param",
        "days=5",
    ]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "succeeded");
    let order: Vec<String> = steps_of(&v).into_iter().map(|s| s.0).collect();
    assert_eq!(order, ["first", "second", "third"]);
    let db = history(&env.state());
    let line: String = db
        .query_row(
            "select outputs from step_runs where step = 'second'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(line.contains("got-42-5"), "{line}");
    let msg: String = db
        .query_row(
            "select message from logs where step = 'third' and message like 'got%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(msg, "got-42-5 true");
    let n: String = db
        .query_row(
            "select outputs from step_runs where step = 'third'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(n.contains("\"n\":10"), "{n}");
}

#[test]
fn independent_steps_run_concurrently_within_the_bound() {
    let env = Env::new();
    std::fs::create_dir_all(env.path().join("running")).unwrap();
    let mut yaml = String::from("pipeline: wide\nconcurrency: 2\nsteps:\n");
    for i in 0..6 {
        yaml.push_str(&format!(
            "  s{i}:\n    type: exec\n    with:\n      command: sh\n      args: [\"-c\", \"touch running/{i}; ls running | wc -l >> counts; sleep 0.4; rm running/{i}\"]\n"
        ));
    }
    let p = env.write("p.yaml", &yaml);
    env.run(&["run", p.to_str().unwrap(), "--quiet"])
        .expect_code(0);
    let counts: Vec<usize> = std::fs::read_to_string(env.path().join("counts"))
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 6);
    assert!(
        counts.iter().all(|&c| c <= 2),
        "more than 2 at once: {counts:?}"
    );
    assert!(counts.contains(&2), "never 2 at once: {counts:?}");
    // --concurrency overrides the file.
    std::fs::remove_file(env.path().join("counts")).unwrap();
    env.run(&["run", p.to_str().unwrap(), "--quiet", "--concurrency", "1"])
        .expect_code(0);
    let counts = std::fs::read_to_string(env.path().join("counts")).unwrap();
    assert!(counts.split_whitespace().all(|c| c == "1"), "{counts}");
}

#[test]
fn retry_counts_attempts_and_only_retries_retryable_errors() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: retry
steps:
  flaky:
    type: exec
    retry: { attempts: 3, backoff: 10ms }
    with:
      command: sh
      args: ["-c", "n=$(cat c 2>/dev/null || echo 0); n=$((n+1)); echo $n > c; [ $n -ge 3 ]"]
      on_nonzero: fail
  fatal:
    type: log
    retry: { attempts: 3, backoff: 10ms }
    with: { message: broken, level: error }
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(1);
    let v = out.json();
    let s = steps_of(&v);
    assert!(
        s.contains(&("flaky".into(), "succeeded".into(), 3)),
        "{s:?}"
    );
    assert!(s.contains(&("fatal".into(), "failed".into(), 1)), "{s:?}");
    assert_eq!(v["error"], "step `fatal` failed: broken");
}

#[test]
fn a_timeout_kills_the_attempt_and_is_retried() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: slow\nsteps:\n  slow:\n    type: exec\n    timeout: 300ms\n    retry: { attempts: 2, backoff: 10ms }\n    with: { command: sleep, args: ['5'] }\n",
    );
    let started = Instant::now();
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the sleep was not killed"
    );
    let v = out.json();
    assert_eq!(steps_of(&v)[0], ("slow".into(), "failed".into(), 2));
    assert!(
        v["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 300ms"),
        "{v}"
    );
}

#[test]
fn failure_skips_dependents_but_teardown_runs_and_the_first_failure_is_named() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: teardown
steps:
  extract:
    type: exec
    with: { command: sh, args: ["-c", "echo boom >&2; exit 3"], on_nonzero: fail }
  load:
    type: log
    needs: [extract]
    with: { message: loading }
  unrelated:
    type: log
    with: { message: fine }
  logout:
    type: exec
    always: true
    needs: [load]
    with: { command: sh, args: ["-c", "touch logged-out; exit 1"], on_nonzero: fail }
  after_logout:
    type: log
    needs: [logout]
    with: { message: never }
  skipped_by_if:
    type: log
    if: "{{ steps.unrelated.rows is none and false }}"
    with: { message: never }
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(1);
    let v = out.json();
    assert_eq!(status_of(&v, "extract"), "failed");
    assert_eq!(status_of(&v, "load"), "skipped");
    assert_eq!(status_of(&v, "unrelated"), "succeeded");
    assert_eq!(status_of(&v, "logout"), "failed");
    assert_eq!(status_of(&v, "after_logout"), "skipped");
    assert_eq!(status_of(&v, "skipped_by_if"), "skipped");
    assert!(env.path().join("logged-out").exists());
    let err = v["error"].as_str().unwrap();
    assert!(
        err.starts_with("step `extract` failed: exited with code 3"),
        "{err}"
    );
}

#[test]
fn warnings_make_the_run_succeed_with_warnings() {
    let env = Env::new();
    let p = env.write("p.yaml", "pipeline: warn\nsteps:\n  a:\n    type: exec\n    with: { command: sh, args: ['-c', 'exit 2'] }\n");
    let out = env.run(&["run", p.to_str().unwrap()]);
    out.expect_code(0);
    assert!(
        out.stdout().contains("succeeded with warnings"),
        "{}",
        out.stdout()
    );
}

#[test]
fn ctrl_c_cancels_running_steps_kills_children_and_runs_teardown() {
    cancel_with(libc::SIGINT);
}

#[test]
fn sigterm_cancels_like_ctrl_c() {
    cancel_with(libc::SIGTERM);
}

fn cancel_with(signal: i32) {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: cancel
steps:
  long:
    type: exec
    with: { command: sh, args: ["-c", "echo $$ > long.pid; sleep 30 & echo $! > child.pid; wait"] }
  next:
    type: log
    needs: [long]
    with: { message: never }
  cleanup:
    type: exec
    always: true
    needs: [next]
    with: { command: touch, args: [cleaned] }
"#,
    );
    let child = env.spawn(&["run", p.to_str().unwrap(), "--format", "json"]);
    let pidfile = env.path().join("child.pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sleeper: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = crate::util::Out(child.wait_with_output().unwrap());
    out.expect_code(1);
    let v = out.json();
    assert_eq!(v["status"], "cancelled");
    assert_eq!(status_of(&v, "long"), "cancelled");
    assert_eq!(status_of(&v, "next"), "cancelled");
    assert_eq!(status_of(&v, "cleanup"), "succeeded");
    assert!(env.path().join("cleaned").exists());
    let alive = std::fs::read_to_string(format!("/proc/{sleeper}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false);
    assert!(!alive, "the grandchild sleep survived");
    let db = history(&env.state());
    let status: String = db
        .query_row("select status from runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "cancelled");
}

#[test]
fn params_are_typed_and_bad_values_are_usage_errors() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: params
params:
  days: { type: integer, default: 180 }
  period: { type: month, default: MA }
  mode: { type: enum, values: [full, delta], default: delta }
  needed: { type: string }
steps:
  show:
    type: log
    with: { message: "{{ params.days }} {{ params.period }} {{ params.period.first_day }} {{ params.period.last_day }} {{ params.mode }} {{ params.needed }}" }
"#,
    );
    let path = p.to_str().unwrap();
    let out = env.run(&["run", path, "--param", "needed=x", "--param", "days=abc"]);
    out.expect_code(2);
    assert!(out.stderr().contains("param `days`"), "{}", out.stderr());
    let out = env.run(&["run", path]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("param `needed` is required"),
        "{}",
        out.stderr()
    );
    env.run(&["run", path, "--param", "needed=x", "--param", "mode=half"])
        .expect_code(2);
    env.run(&["run", path, "--param", "neded=x"]).expect_code(2);
    let out = env.run(&[
        "run",
        path,
        "-v",
        "--param",
        "needed=x",
        "--logical-date",
        "2026-01-15",
    ]);
    out.expect_code(0);
    assert!(
        out.stderr()
            .contains("180 2025-12 2025-12-01 2025-12-31 delta x"),
        "{}",
        out.stderr()
    );
    let out = env.run(&[
        "run",
        path,
        "-v",
        "--param",
        "needed=y",
        "--param",
        "period=2019-02",
        "--param",
        "days=7",
    ]);
    out.expect_code(0);
    assert!(
        out.stderr()
            .contains("7 2019-02 2019-02-01 2019-02-28 delta y"),
        "{}",
        out.stderr()
    );
}

#[test]
fn an_invalid_pipeline_runs_nothing_and_exits_2() {
    let env = Env::new();
    let p = env.write("p.yaml", "pipeline: bad\nsteps:\n  a: { type: exec, with: { command: touch, args: [ran] } }\n  b: { type: nope }\n");
    let out = env.run(&["run", p.to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.stderr().contains("error[E006]"), "{}", out.stderr());
    assert!(!env.path().join("ran").exists());
}

#[test]
fn dry_run_prints_the_plan_in_order_with_placeholders_and_runs_nothing() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: dry
steps:
  use:
    type: exec
    with: { command: touch, args: ["{{ steps.login.tmp }}", "{{ secret('MISSING_SECRET') }}"] }
  login:
    type: exec
    with: { command: touch, args: [ran] }
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--dry-run"]);
    out.expect_code(0);
    let s = out.stdout();
    let login = s.find("1. login (exec)").expect(&s);
    let use_ = s.find("2. use (exec) after login").expect(&s);
    assert!(login < use_);
    assert!(s.contains("<steps.login.tmp>"), "{s}");
    assert!(s.contains("***"), "{s}");
    assert!(!env.path().join("ran").exists());
    assert!(
        !env.state().join("history.sqlite").exists()
            || history(&env.state())
                .query_row("select count(*) from runs", [], |r| r.get::<_, i64>(0))
                .unwrap()
                == 0
    );
}

#[test]
fn graph_prints_mermaid_and_dot() {
    let env = Env::new();
    let p = env.write("p.yaml", "pipeline: g\nsteps:\n  a: { type: log, with: { message: a } }\n  b: { type: log, needs: [a], with: { message: b } }\n  c: { type: log, always: true, needs: [b], with: { message: c } }\n");
    let out = env.run(&["graph", p.to_str().unwrap()]);
    out.expect_code(0);
    assert!(out.stdout().contains("a --> b"), "{}", out.stdout());
    assert!(out.stdout().contains("b -.-> c"), "{}", out.stdout());
    let out = env.run(&["graph", p.to_str().unwrap(), "--format", "dot"]);
    assert!(out.stdout().contains("\"a\" -> \"b\";"), "{}", out.stdout());
}

/// A teardown step and what the run recorded, for the tests of failures inside a step.
fn run_with_teardown(env: &Env, step: &str, params: &[&str]) -> serde_json::Value {
    let p = env.write(
        "p.yaml",
        &format!(
            r#"
pipeline: broken
params:
  m: {{ type: month, default: "2026-01" }}
  t: {{ type: number, default: 1 }}
steps:
{step}
  after:
    type: log
    needs: [broken]
    with: {{ message: never }}
  teardown:
    type: exec
    always: true
    needs: [after]
    with: {{ command: touch, args: [torn-down] }}
"#
        ),
    );
    let mut args = vec!["run", p.to_str().unwrap(), "--format", "json"];
    for p in params {
        args.extend(["--param", p]);
    }
    let out = env.run(&args);
    out.expect_code(1);
    let v = out.json();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(status_of(&v, "broken"), "failed", "{v}");
    assert_eq!(status_of(&v, "after"), "skipped", "{v}");
    assert_eq!(status_of(&v, "teardown"), "succeeded", "{v}");
    assert!(env.path().join("torn-down").exists(), "teardown never ran");
    let db = history(&env.state());
    let (status, error): (String, String) = db
        .query_row("select status, error from runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(status, "failed");
    assert!(error.starts_with("step `broken` failed"), "{error}");
    v
}

fn step_error(v: &serde_json::Value, id: &str) -> String {
    crate::util::step(v, id)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn calendar_arithmetic_out_of_range_is_a_template_error_and_teardown_runs() {
    let env = Env::new();
    let v = run_with_teardown(
        &env,
        "  broken:\n    type: log\n    with: { message: \"{{ params.m | add_months(100000000) }}\" }",
        &[],
    );
    let e = step_error(&v, "broken");
    assert!(e.contains("add_months: date out of range"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn a_timeout_too_long_from_a_param_is_the_steps_error_and_teardown_runs() {
    let env = Env::new();
    let v = run_with_teardown(
        &env,
        "  broken:\n    type: exec\n    timeout: \"{{ params.t }}\"\n    with: { command: 'true' }",
        &["t=1e20"],
    );
    let e = step_error(&v, "broken");
    assert!(
        e.contains("`timeout`: ") && e.contains("at most 100 years"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn a_timeout_from_a_param_applies() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: slow\nparams:\n  t: { type: string, default: 300ms }\nsteps:\n  slow:\n    type: exec\n    timeout: \"{{ params.t }}\"\n    with: { command: sleep, args: ['30'] }\n",
    );
    let child = env.spawn(&["run", p.to_str().unwrap(), "--format", "json"]);
    // Only a hang guard: the 30 s sleep is killed after 300 ms.
    let out = crate::util::wait_with_deadline(child, Duration::from_secs(25));
    out.expect_code(1);
    let e = step_error(&out.json(), "slow");
    assert!(e.contains("timed out after 300ms"), "{e}");
}

#[test]
fn a_panic_inside_a_step_fails_that_step_and_the_run_goes_on_to_its_teardown() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: panicky
steps:
  broken:
    type: log
    with: { message: hello }
  fine:
    type: log
    with: { message: fine }
  after:
    type: log
    needs: [broken]
    with: { message: never }
  teardown:
    type: exec
    always: true
    needs: [after, fine]
    with: { command: touch, args: [torn-down] }
"#,
    );
    let out = Out(env
        .cmd()
        .args(["run", p.to_str().unwrap(), "--format", "json"])
        .env("PIPE_DEBUG_PANIC_IN_STEP", "broken")
        .output()
        .unwrap());
    out.expect_code(1);
    let v = out.json();
    assert_eq!(status_of(&v, "broken"), "failed", "{v}");
    assert_eq!(status_of(&v, "fine"), "succeeded", "{v}");
    assert_eq!(status_of(&v, "after"), "skipped", "{v}");
    assert_eq!(status_of(&v, "teardown"), "succeeded", "{v}");
    assert!(env.path().join("torn-down").exists(), "teardown never ran");
    let e = step_error(&v, "broken");
    assert!(
        e.contains("panicked") && e.contains("PIPE_DEBUG_PANIC_IN_STEP asked for a panic here"),
        "{e}"
    );
    let db = history(&env.state());
    let status: String = db
        .query_row("select status from runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "failed");
}

#[test]
fn sigterm_during_a_big_file_read_exits_within_seconds_of_the_summary() {
    let env = Env::new();
    // About 35 MB of CSV: parsing it takes a debug build minutes.
    let mut csv = String::from("id,name,amount,day\n");
    for i in 0..1_000_000u32 {
        csv.push_str(&format!(
            "{i},name-{},{}.{:02},2024-03-{:02}\n",
            i % 977,
            i / 3,
            i % 100,
            i % 28 + 1
        ));
    }
    env.write("big.csv", &csv);
    let p = env.write(
        "p.yaml",
        "pipeline: big\nsteps:\n  read:\n    type: file.read\n    with: { path: big.csv }\n  teardown:\n    type: exec\n    always: true\n    needs: [read]\n    with: { command: touch, args: [torn-down] }\n",
    );
    let child = env.spawn(&["run", p.to_str().unwrap(), "--format", "json"]);
    // Wait until the read is under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let db = env.state().join("history.sqlite");
        let running = db.exists()
            && history(&env.state())
                .query_row(
                    "select count(*) from step_runs where step = 'read' and status = 'running'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap_or(0)
                > 0;
        if running {
            break;
        }
        assert!(Instant::now() < deadline, "the read never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // The deadline is a hang guard; the bound below is the point.
    let out = crate::util::wait_with_deadline(child, Duration::from_secs(300));
    let took = signalled.elapsed();
    out.expect_code(1);
    let v = out.json();
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(status_of(&v, "read"), "cancelled", "{v}");
    assert_eq!(status_of(&v, "teardown"), "succeeded", "{v}");
    assert!(
        took < Duration::from_secs(20),
        "pipe took {took:?} to exit after SIGTERM (the parse held it)"
    );
    let status: String = history(&env.state())
        .query_row("select status from runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "cancelled");
}

/// The tag `file.write` puts in its temporaries' names for this boot and pid namespace.
fn host_tag() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let host = format!("{}/{}", boot.trim(), ns.to_string_lossy());
    let mut h: u64 = 0xcbf29ce484222325;
    for b in host.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    format!("{:08x}", h as u32)
}

#[test]
fn a_file_write_removes_the_temporaries_of_writers_that_died() {
    let env = Env::new();
    env.write("in.csv", "a,b\n1,2\n");
    // A writer killed by `kill -9` mid-write left its temporary; its pid is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let tag = host_tag();
    let stale = env.write(
        &format!("out/.all.csv.tmp-{tag}-{dead}-0123456789abcdef"),
        "half",
    );
    // A live writer's temporary, and one from a pid namespace pipe cannot see, stay.
    let live = env.write(
        &format!(
            "out/.all.csv.tmp-{tag}-{}-0123456789abcdef",
            std::process::id()
        ),
        "busy",
    );
    let foreign = env.write(
        &format!("out/.all.csv.tmp-00000000-{dead}-0123456789abcdef"),
        "?",
    );
    let p = env.write(
        "p.yaml",
        "pipeline: files\nsteps:\n  read:\n    type: file.read\n    with: { path: in.csv }\n  write:\n    type: file.write\n    input: read\n    with: { path: out/all.csv }\n",
    );
    env.run(&["run", p.to_str().unwrap(), "-q"]).expect_code(0);
    assert_eq!(
        std::fs::read_to_string(env.path().join("out/all.csv")).unwrap(),
        "a,b\n1,2\n"
    );
    assert!(
        !stale.exists(),
        "the dead writer's temporary is still there"
    );
    assert!(live.exists(), "a live writer's temporary was removed");
    assert!(
        foreign.exists(),
        "another namespace's temporary was removed"
    );
}
