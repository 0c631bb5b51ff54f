//! The run store through the binary: `--db postgres://…` / `PIPE_DB` (a fresh database of
//! the machine's PostgreSQL per test, at `PIPE_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), and a repaired run in `runs show`.

use crate::util::{Env, PgDb};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn runs_json(env: &Env, db: &str) -> Vec<serde_json::Value> {
    let out = env.run(&[
        "runs", "list", "--format", "json", "--limit", "0", "--db", db,
    ]);
    out.expect_code(0);
    out.json().as_array().expect("an array of runs").clone()
}

#[test]
fn runs_recorded_in_postgres_are_listed_shown_and_followed_from_it() {
    let db = PgDb::new();
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: in_pg\nsteps:\n  hello:\n    type: log\n    with: { message: hello-from-pg }\n",
    );
    let out = env.run(&[
        "run",
        p.to_str().unwrap(),
        "--quiet",
        "--format",
        "json",
        "--db",
        &db.url,
    ]);
    out.expect_code(0);
    let id = out.json()["run_id"].as_i64().unwrap();

    let runs = runs_json(&env, &db.url);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["id"], id);
    assert_eq!(runs[0]["pipeline"], "in_pg");
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[0]["trigger"], "cli");
    let out = env.run(&["runs", "list", "--db", &db.url]);
    out.expect_code(0);
    assert!(out.stdout().contains("in_pg"), "{}", out.stdout());
    // Nothing went to the SQLite history of the state dir.
    let out = env.run(&["runs", "list", "--format", "json"]);
    out.expect_code(0);
    assert_eq!(out.json(), serde_json::json!([]));

    // PIPE_DB says the same as --db.
    let out = env
        .cmd()
        .env("PIPE_DB", &db.url)
        .args(["runs", "show", &id.to_string(), "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"][0]["step"], "hello");
    assert_eq!(v["steps"][0]["status"], "succeeded");
    let out = env
        .cmd()
        .env("PIPE_DB", &db.url)
        .args(["runs", "logs", &id.to_string()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello-from-pg"));

    // A run driven from outside, in the same database.
    let out = env.run(&["runs", "start", "--pipeline", "wrapper", "--db", &db.url]);
    out.expect_code(0);
    let outside: i64 = out.stdout().trim().parse().unwrap();
    env.run(&[
        "runs",
        "log",
        &outside.to_string(),
        "-m",
        "step one",
        "--db",
        &db.url,
    ])
    .expect_code(0);
    env.run(&[
        "runs",
        "finish",
        &outside.to_string(),
        "--status",
        "succeeded",
        "--db",
        &db.url,
    ])
    .expect_code(0);
    let out = env.run(&[
        "runs",
        "logs",
        &outside.to_string(),
        "--follow",
        "--db",
        &db.url,
    ]);
    out.expect_code(0);
    assert!(out.stdout().contains("step one"), "{}", out.stdout());
    assert_eq!(runs_json(&env, &db.url).len(), 2);

    // A bad URL is a clear error without the password.
    let out = env.run(&[
        "runs",
        "list",
        "--db",
        "postgres://pipe:hunter2-secret@127.0.0.1:1/none?connect_timeout=2",
    ]);
    out.expect_code(1);
    assert!(
        out.stderr()
            .contains("cannot connect to postgres://pipe@127.0.0.1:1/none"),
        "{}",
        out.stderr()
    );
    assert!(!out.stderr().contains("hunter2"), "{}", out.stderr());
}

#[test]
fn a_killed_pipe_run_in_postgres_becomes_abandoned() {
    let db = PgDb::new();
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: abandon_pg\nsteps:\n  wait:\n    type: exec\n    with: { command: sh, args: ['-c', 'echo $$ > sleep.pid; exec sleep 30'] }\n",
    );
    let mut child = env
        .cmd()
        .args(["run", p.to_str().unwrap(), "--quiet", "--db", &db.url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = env.path().join("sleep.pid");
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let running = runs_json(&env, &db.url)
            .into_iter()
            .find(|r| r["status"] == "running");
        let started = std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'));
        if let (Some(r), true) = (running, started) {
            break r["id"].as_i64().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run never showed as running with its step started");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let sleeper: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    child.kill().unwrap(); // SIGKILL: the lease is left to expire
    child.wait().unwrap();
    // SAFETY: plain kill(2) of the sleep this test started (via the step).
    unsafe { libc::kill(sleeper, libc::SIGKILL) };
    // Its owner lived in this pid namespace: the dead pid proves it lost at once.
    let out = env.run(&[
        "runs",
        "show",
        &run_id.to_string(),
        "--format",
        "json",
        "--db",
        &db.url,
    ]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "abandoned", "{v}");
    assert_eq!(v["steps"][0]["status"], "abandoned", "{v}");
    assert!(
        v["lease_owner"]
            .as_str()
            .is_some_and(|o| o.starts_with("run-")),
        "{v}"
    );
}

#[test]
fn runs_show_displays_each_attempt_of_a_repaired_run() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: repaired\nsteps:\n  extract:\n    type: log\n    with: { message: one }\n  load:\n    type: exec\n    needs: [extract]\n    with: { command: sh, args: ['-c', 'exit 3'], on_nonzero: fail }\n",
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--quiet", "--format", "json"]);
    out.expect_code(1);
    let id = out.json()["run_id"].as_i64().unwrap();
    // What the repair helper does through the store: attempt 2 re-runs `load`.
    let s = store::open(&store::StoreConfig::sqlite(env.state())).unwrap();
    assert_eq!(s.start_attempt(id, None, chrono::Utc::now()).unwrap(), 2);
    let now = chrono::Utc::now();
    s.write_events(
        id,
        &[
            store::RunEvent::StepFinished(store::StepRecord {
                step: "load".into(),
                kind: "exec".into(),
                status: store::Status::Succeeded,
                attempts: 1,
                started_at: Some(now),
                finished_at: Some(now),
                duration_ms: 3,
                rows: None,
                error: None,
                outputs: serde_json::Value::Null,
            }),
            store::RunEvent::RunFinished {
                status: store::Status::Succeeded,
                error: None,
                at: now,
            },
        ],
    )
    .unwrap();
    drop(s);
    let out = env.run(&["runs", "show", &id.to_string()]);
    out.expect_code(0);
    let text = out.stdout();
    assert!(text.contains("attempt:      2 (repaired)"), "{text}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip_while(|l| !l.starts_with("RUN"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["1", "extract", "succeeded"],
            vec!["1", "load", "failed"],
            vec!["2", "load", "succeeded"],
        ],
        "{text}"
    );
    let out = env.run(&["runs", "show", &id.to_string(), "--format", "json"]);
    let v = out.json();
    assert_eq!(v["attempt"], 2);
    assert_eq!(v["steps"][2]["run_attempt"], 2);
}

#[test]
fn two_pipe_runs_writing_to_postgres_at_once_lose_nothing() {
    let db = PgDb::new();
    let env = Env::new();
    let mut children = Vec::new();
    for name in ["left", "right"] {
        let p = env.write(
            &format!("{name}.yaml"),
            &format!(
                "pipeline: {name}\nsteps:\n  lines:\n    type: exec\n    with: {{ command: sh, args: ['-c', 'i=1; while [ $i -le 3000 ]; do echo {name}-$i; i=$((i+1)); done'] }}\n"
            ),
        );
        children.push(env.spawn(&[
            "run",
            p.to_str().unwrap(),
            "--quiet",
            "--format",
            "json",
            "--db",
            &db.url,
        ]));
    }
    let outs: Vec<crate::util::Out> = children
        .into_iter()
        .map(|c| crate::util::wait_with_deadline(c, Duration::from_secs(180)))
        .collect();
    for (out, name) in outs.iter().zip(["left", "right"]) {
        out.expect_code(0);
        let id = out.json()["run_id"].as_i64().unwrap();
        let logs = env.run(&[
            "runs",
            "logs",
            &id.to_string(),
            "--format",
            "json",
            "--db",
            &db.url,
        ]);
        logs.expect_code(0);
        let messages: Vec<String> = logs
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["step"] == "lines")
            .map(|r| r["message"].as_str().unwrap().to_string())
            .collect();
        let expected: Vec<String> = (1..=3000).map(|i| format!("{name}-{i}")).collect();
        assert_eq!(messages, expected, "run {id} ({name})");
    }
    let runs = runs_json(&env, &db.url);
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
}
