//! Run history through the CLI: runs list/show/logs, runs started and fed from outside,
//! abandoned runs, and two processes writing at once.

use crate::util::{history, wait_with_deadline, Env, Out};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `pipe runs start --pipeline NAME`: stdout must be the id and nothing else.
fn start_outside_run(env: &Env, pipeline: &str) -> i64 {
    let out = env.run(&["runs", "start", "--pipeline", pipeline]);
    out.expect_code(0);
    let text = out.stdout();
    let id: i64 = text
        .trim_end_matches('\n')
        .parse()
        .unwrap_or_else(|e| panic!("`runs start` printed more than an id ({e}): {text:?}"));
    assert_eq!(text, format!("{id}\n"));
    id
}

fn runs_json(env: &Env) -> Vec<serde_json::Value> {
    let out = env.run(&["runs", "list", "--format", "json", "--limit", "0"]);
    out.expect_code(0);
    out.json().as_array().expect("an array of runs").clone()
}

fn status_in_list(env: &Env, id: i64) -> Option<String> {
    runs_json(env)
        .into_iter()
        .find(|r| r["id"] == id)
        .map(|r| r["status"].as_str().unwrap().to_string())
}

#[test]
fn runs_list_show_and_logs_after_a_run() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: listed
steps:
  extract:
    type: exec
    retry: { attempts: 2, backoff: 10ms }
    with:
      command: sh
      args: ["-c", "echo row-one; echo row-two; test -f again || { touch again; exit 1; }"]
      on_nonzero: fail
  report:
    type: log
    needs: [extract]
    with: { message: "report-done" }
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--quiet", "--format", "json"]);
    out.expect_code(0);
    let id = out.json()["run_id"].as_i64().unwrap();

    let out = env.run(&["runs", "list"]);
    out.expect_code(0);
    let text = out.stdout();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("run {id} not listed:\n{text}"));
    assert!(line.contains("listed"), "{line}");
    assert!(line.contains("succeeded"), "{line}");
    assert!(text.starts_with("ID"), "{text}");

    let runs = runs_json(&env);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["id"], id);
    assert_eq!(runs[0]["pipeline"], "listed");
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[0]["trigger"], "cli");

    let out = env.run(&["runs", "list", "--pipeline", "other", "--format", "json"]);
    out.expect_code(0);
    assert_eq!(out.json(), serde_json::json!([]));
    let out = env.run(&["runs", "list", "--pipeline", "other"]);
    out.expect_code(0);
    assert!(!out.stdout().contains("listed"), "{}", out.stdout());
    assert!(out.stdout().contains("no runs"), "{}", out.stdout());
    let out = env.run(&["runs", "list", "--pipeline", "listed", "--format", "json"]);
    assert_eq!(out.json().as_array().unwrap().len(), 1);

    let out = env.run(&["runs", "show", &id.to_string(), "--format", "json"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["id"], id);
    assert_eq!(v["status"], "succeeded");
    let steps: Vec<(String, String, u64)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("extract".to_string(), "succeeded".to_string(), 2),
            ("report".to_string(), "succeeded".to_string(), 1)
        ]
    );
    assert!(v["log_count"].as_u64().unwrap() >= 5, "{v}");

    let out = env.run(&["runs", "show", &id.to_string()]);
    out.expect_code(0);
    assert!(
        out.stdout().starts_with(&format!("run {id}  listed")),
        "{}",
        out.stdout()
    );
    assert!(out.stdout().contains("extract"), "{}", out.stdout());

    let out = env.run(&["runs", "logs", &id.to_string()]);
    out.expect_code(0);
    let logs = out.stdout();
    let one = logs.find("row-one").expect(&logs);
    let two = logs[one..].find("row-two").map(|i| i + one).expect(&logs);
    assert!(one < two);
    assert!(logs.contains("report-done"), "{logs}");
    // The failed first attempt left a warning row.
    assert!(logs.contains("WARN"), "{logs}");

    let out = env.run(&["runs", "logs", &id.to_string(), "--format", "json"]);
    out.expect_code(0);
    let rows = out.json();
    let messages: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages.iter().filter(|m| **m == "row-one").count(),
        2,
        "{messages:?}"
    );

    for args in [&["runs", "show", "4242"][..], &["runs", "logs", "4242"][..]] {
        let out = env.run(args);
        out.expect_code(1);
        assert!(
            out.stderr().contains("run 4242 not found"),
            "{args:?}: {}",
            out.stderr()
        );
        assert!(out.stdout().is_empty(), "{}", out.stdout());
    }
}

#[test]
fn an_outside_run_is_started_logged_to_and_finished() {
    let env = Env::new();
    let id = start_outside_run(&env, "wrapper");
    let ids = id.to_string();
    let report = env.write("report.csv", "a,b\n1,2\n");
    env.run(&[
        "runs",
        "log",
        &ids,
        "--level",
        "warning",
        "--message",
        "disk almost full",
        "--description",
        "only 3% left on /data",
        "--file",
        report.to_str().unwrap(),
    ])
    .expect_code(0);
    env.run(&["runs", "log", &ids, "--level", "2", "-m", "upload failed"])
        .expect_code(0);
    env.run(&["runs", "log", &ids, "-m", "plain info"])
        .expect_code(0);
    // A bad level is a usage error and adds nothing.
    env.run(&["runs", "log", &ids, "--level", "loud", "-m", "x"])
        .expect_code(2);
    // A missing attachment fails and adds nothing.
    let out = env.run(&[
        "runs",
        "log",
        &ids,
        "-m",
        "ghost",
        "--file",
        env.path().join("missing.csv").to_str().unwrap(),
    ]);
    out.expect_code(1);
    // Logging into an unknown run fails.
    env.run(&["runs", "log", "4242", "-m", "lost"])
        .expect_code(1);

    assert_eq!(status_in_list(&env, id).as_deref(), Some("running"));
    env.run(&["runs", "finish", &ids, "--status", "warning"])
        .expect_code(0);

    let out = env.run(&["runs", "show", &ids, "--format", "json"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "warning");
    assert_eq!(v["pipeline"], "wrapper");
    assert_eq!(v["trigger"], "external");
    assert_eq!(v["owner"], "external");
    assert!(v["finished_at"].is_string(), "{v}");
    assert_eq!(v["log_count"], 3);

    let out = env.run(&["runs", "logs", &ids, "--format", "json"]);
    out.expect_code(0);
    let rows = out.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["level"], "warning");
    assert_eq!(rows[0]["message"], "disk almost full");
    assert_eq!(rows[0]["description"], "only 3% left on /data");
    assert_eq!(rows[1]["level"], "error");
    assert_eq!(rows[1]["message"], "upload failed");
    assert_eq!(rows[2]["level"], "info");
    let copy = std::path::PathBuf::from(rows[0]["file"].as_str().unwrap());
    let run_dir = std::fs::canonicalize(env.state().join("runs").join(&ids)).unwrap();
    assert_eq!(copy.parent().unwrap(), run_dir, "{}", copy.display());
    assert_ne!(copy, report);
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "a,b\n1,2\n");

    let out = env.run(&["runs", "logs", &ids]);
    out.expect_code(0);
    assert!(out.stdout().contains("WARN"), "{}", out.stdout());
    assert!(
        out.stdout().contains("only 3% left on /data"),
        "{}",
        out.stdout()
    );
    assert!(out.stdout().contains("file: "), "{}", out.stdout());

    // Finishing twice is an error, and leaves the run as it was.
    let out = env.run(&["runs", "finish", &ids, "--status", "failed"]);
    out.expect_code(1);
    assert!(out.stderr().contains("already"), "{}", out.stderr());
    assert_eq!(status_in_list(&env, id).as_deref(), Some("warning"));
    env.run(&["runs", "finish", "4242", "--status", "succeeded"])
        .expect_code(1);
    env.run(&["runs", "finish", &ids, "--status", "running"])
        .expect_code(2);
}

#[test]
fn logs_follow_prints_new_rows_and_exits_when_the_run_finishes() {
    let env = Env::new();
    let id = start_outside_run(&env, "followed");
    let ids = id.to_string();
    let child = env.spawn(&["runs", "logs", &ids, "--follow", "--format", "json"]);
    // Give the follower a moment to reach its polling loop (not needed for correctness).
    std::thread::sleep(Duration::from_millis(300));
    env.run(&["runs", "log", &ids, "-m", "first row"])
        .expect_code(0);
    env.run(&["runs", "log", &ids, "--level", "error", "-m", "second row"])
        .expect_code(0);
    env.run(&["runs", "finish", &ids, "--status", "succeeded"])
        .expect_code(0);
    let out = wait_with_deadline(child, Duration::from_secs(30));
    out.expect_code(0);
    let lines: Vec<serde_json::Value> = out
        .stdout()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"))
        })
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .map(|v| v["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["first row", "second row"]);
    assert_eq!(lines[1]["level"], "error");
}

#[test]
fn a_killed_pipe_run_becomes_abandoned_but_an_outside_run_does_not() {
    let env = Env::new();
    let outside = start_outside_run(&env, "wrapper");
    let p = env.write(
        "p.yaml",
        "pipeline: abandon\nsteps:\n  wait:\n    type: exec\n    with: { command: sh, args: ['-c', 'echo $$ > sleep.pid; exec sleep 30'] }\n",
    );
    let mut child = env
        .cmd()
        .args(["run", p.to_str().unwrap(), "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = env.path().join("sleep.pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    let run_id = loop {
        let running = runs_json(&env)
            .into_iter()
            .find(|r| r["pipeline"] == "abandon" && r["status"] == "running");
        let started = std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'));
        if let (Some(r), true) = (running, started) {
            break r["id"].as_i64().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run never showed as running with its step started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let sleeper: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    child.kill().unwrap(); // SIGKILL: no chance to record anything
    child.wait().unwrap();
    // SAFETY: plain kill(2) of the sleep this test started (via the step).
    unsafe { libc::kill(sleeper, libc::SIGKILL) };

    assert_eq!(status_in_list(&env, run_id).as_deref(), Some("abandoned"));
    assert_eq!(status_in_list(&env, outside).as_deref(), Some("running"));
    let out = env.run(&["runs", "show", &run_id.to_string(), "--format", "json"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "abandoned");
    assert!(v["finished_at"].is_string(), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("ended while the run was running"),
        "{v}"
    );
    assert_eq!(v["steps"][0]["step"], "wait");
    assert_eq!(v["steps"][0]["status"], "abandoned");
    // Following an abandoned run ends at once.
    let out = env.run(&["runs", "logs", &run_id.to_string(), "--follow"]);
    out.expect_code(0);
    // The outside run can still be finished.
    env.run(&[
        "runs",
        "finish",
        &outside.to_string(),
        "--status",
        "succeeded",
    ])
    .expect_code(0);
}

#[test]
fn two_pipe_runs_writing_at_once_lose_nothing() {
    let env = Env::new();
    let mut children = Vec::new();
    for name in ["left", "right"] {
        let p = env.write(
            &format!("{name}.yaml"),
            &format!(
                "pipeline: {name}\nsteps:\n  lines:\n    type: exec\n    with: {{ command: sh, args: ['-c', 'i=1; while [ $i -le 5000 ]; do echo {name}-$i; i=$((i+1)); done'] }}\n"
            ),
        );
        children.push(env.spawn(&["run", p.to_str().unwrap(), "--quiet", "--format", "json"]));
    }
    let outs: Vec<Out> = children
        .into_iter()
        .map(|c| wait_with_deadline(c, Duration::from_secs(120)))
        .collect();
    let db = history(&env.state());
    for (out, name) in outs.iter().zip(["left", "right"]) {
        out.expect_code(0);
        let v = out.json();
        assert_eq!(v["status"], "succeeded");
        let id = v["run_id"].as_i64().unwrap();
        let (rows, distinct): (i64, i64) = db
            .query_row(
                "select count(*), count(distinct message) from logs
                 where run_id = ?1 and step = 'lines' and message like ?2",
                rusqlite::params![id, format!("{name}-%")],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, distinct), (5000, 5000), "run {id} ({name})");
        let status: String = db
            .query_row("select status from runs where id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert_eq!(status, "succeeded");
        let last: String = db
            .query_row(
                "select message from logs where run_id = ?1 and step = 'lines' order by id desc limit 1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(last, format!("{name}-5000"));
    }
}

#[test]
fn two_runs_log_loops_at_once_lose_nothing() {
    let env = std::sync::Arc::new(Env::new());
    let id = start_outside_run(&env, "wrapper");
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|who| {
            let env = env.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let msg = format!("{who}-{i}");
                    env.run(&["runs", "log", &id.to_string(), "-m", &msg])
                        .expect_code(0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let db = history(&env.state());
    let (rows, distinct): (i64, i64) = db
        .query_row(
            "select count(*), count(distinct message) from logs where run_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, distinct), (200, 200));
    // Each writer's rows keep their order.
    for who in ["a", "b"] {
        let mut stmt = db
            .prepare("select message from logs where run_id = ?1 and message like ?2 order by id")
            .unwrap();
        let got: Vec<String> = stmt
            .query_map(rusqlite::params![id, format!("{who}-%")], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let want: Vec<String> = (0..100).map(|i| format!("{who}-{i}")).collect();
        assert_eq!(got, want);
    }
}

#[test]
fn a_steps_log_past_the_limit_goes_to_a_file_and_one_row_says_so() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: chatty\nsteps:\n  chatty:\n    type: exec\n    with: { command: seq, args: ['1', '20000'] }\n  quiet:\n    type: log\n    needs: [chatty]\n    with: { message: still stored }\n",
    );
    let out = env
        .cmd()
        .args(["run", p.to_str().unwrap(), "--format", "json", "-q"])
        .env("PIPE_LOG_LIMIT", "10000")
        .output()
        .unwrap();
    crate::util::Out(out).expect_code(0);
    let db = history(&env.state());
    let rows: Vec<(String, String, Option<String>)> = db
        .prepare("select level, message, file from logs where step = 'chatty' order by id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let (last, stored) = rows.split_last().unwrap();
    let stored_bytes: usize = stored.iter().map(|(_, m, _)| m.len()).sum();
    assert!(stored_bytes <= 10_000, "{stored_bytes} bytes stored");
    assert_eq!(last.0, "warning", "{last:?}");
    assert!(
        last.1.contains("log rows")
            && last.1.contains("not stored here")
            && last.1.contains("PIPE_LOG_LIMIT"),
        "{last:?}"
    );
    let file = last.2.as_deref().expect("the rest is attached");
    assert!(file.contains("runs/1/"), "{file}");
    // Nothing is lost: the stored rows and the file's lines are every number, in order.
    let mut numbers: Vec<u32> = stored
        .iter()
        .filter_map(|(_, m, _)| m.parse().ok())
        .collect();
    numbers.extend(
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u32>().unwrap()),
    );
    assert_eq!(numbers, (1..=20_000).collect::<Vec<_>>());
    // Other steps keep their own allowance.
    let quiet: i64 = db
        .query_row(
            "select count(*) from logs where step = 'quiet' and message = 'still stored'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(quiet, 1);
}

/// A `pipe run` of a long sleep, running, and its run id (the caller waits for it).
#[allow(clippy::zombie_processes)]
fn start_sleeping_run(env: &Env) -> (std::process::Child, i64) {
    let p = env.write(
        "p.yaml",
        "pipeline: owned\nsteps:\n  wait:\n    type: exec\n    with: { command: sh, args: ['-c', 'echo $$ > sleep.pid; exec sleep 60'] }\n",
    );
    let mut child = env
        .cmd()
        .args(["run", p.to_str().unwrap(), "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = runs_json(env)
            .into_iter()
            .find(|r| r["pipeline"] == "owned" && r["status"] == "running");
        if let Some(r) = running {
            return (child, r["id"].as_i64().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run never showed as running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_finish_refuses_a_run_that_a_live_pipe_run_owns() {
    let env = Env::new();
    let (child, id) = start_sleeping_run(&env);
    let out = env.run(&["runs", "finish", &id.to_string(), "--status", "succeeded"]);
    let pid = child.id().to_string();
    // SAFETY: plain kill(2) of the pipe this test started; it cancels its run itself.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = crate::util::wait_with_deadline(child, Duration::from_secs(60));
    out.expect_code(1);
    let err = out.stderr();
    assert!(
        err.contains(&format!(
            "run {id} is owned by a live `pipe run` (pid {pid})"
        )),
        "{err}"
    );
    done.expect_code(1);
    // The owner recorded the end itself.
    assert_eq!(status_in_list(&env, id).as_deref(), Some("cancelled"));
}

#[test]
fn a_run_owned_from_another_pid_namespace_is_not_marked_abandoned() {
    let env = Env::new();
    env.run(&["runs", "list"]).expect_code(0); // creates the history
                                               // A `pipe run` in another container sharing this state dir: its pid means nothing here.
    let db = history(&env.state());
    db.execute(
        r#"INSERT INTO runs(pipeline, params, "trigger", status, started_at, pid, pid_start,
                            owner, host)
           VALUES ('elsewhere', '{}', 'cli', 'running', '2026-01-01T00:00:00.000Z', 999999999,
                   '1', 'pipe', 'another-boot/pid:[1]')"#,
        [],
    )
    .unwrap();
    let id = db.last_insert_rowid();
    assert_eq!(status_in_list(&env, id).as_deref(), Some("running"));
    let out = env.run(&["runs", "finish", &id.to_string(), "--status", "failed"]);
    out.expect_code(1);
    assert!(
        out.stderr().contains("another pid namespace") && out.stderr().contains("--force"),
        "{}",
        out.stderr()
    );
    env.run(&[
        "runs",
        "finish",
        &id.to_string(),
        "--status",
        "failed",
        "--force",
    ])
    .expect_code(0);
    assert_eq!(status_in_list(&env, id).as_deref(), Some("failed"));
}
