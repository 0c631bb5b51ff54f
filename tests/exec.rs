//! The exec step through the real binary: log rows per line, workflow commands, files,
//! exit codes, and megabytes on both streams.

use crate::util::{history, Env};
use std::time::{Duration, Instant};

#[test]
fn stdout_and_stderr_lines_become_log_rows_and_workflow_commands_work() {
    let env = Env::new();
    env.write("report.csv", "a,b\n1,2\n");
    let p = env.write(
        "p.yaml",
        r#"
pipeline: wrapper
steps:
  script:
    type: exec
    with:
      command: sh
      args:
        - -c
        - |
          echo "hello out"
          echo "hello err" >&2
          echo "::warning::disk almost full"
          echo "::error::one record rejected"
          echo "::set-output name=count::7"
          echo "::file::report.csv"
          exit 4
      env: { GREETING: hi }
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["status"], "warning");
    let db = history(&env.state());
    let rows: Vec<(String, String, Option<String>)> = db
        .prepare("select level, message, file from logs where step = 'script' order by id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let has = |level: &str, msg: &str| rows.iter().any(|(l, m, _)| l == level && m == msg);
    assert!(has("info", "hello out"), "{rows:?}");
    assert!(has("error", "hello err"), "{rows:?}");
    assert!(has("warning", "disk almost full"), "{rows:?}");
    assert!(has("error", "one record rejected"), "{rows:?}");
    assert!(has("warning", "exited with code 4"), "{rows:?}");
    let file = rows
        .iter()
        .find_map(|(_, _, f)| f.clone())
        .expect("a row with a file");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a,b\n1,2\n");
    assert!(file.contains("runs/1/"), "{file}");
    let outputs: String = db
        .query_row(
            "select outputs from step_runs where step = 'script'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(outputs.contains("\"count\":\"7\""), "{outputs}");
}

#[test]
fn megabytes_on_both_streams_never_block_and_every_line_is_kept() {
    let env = Env::new();
    // 40,000 lines of 100 bytes on each stream (about 4 MB each), interleaved.
    let p = env.write(
        "p.yaml",
        r#"
pipeline: loud
steps:
  loud:
    type: exec
    with:
      command: sh
      args: ["-c", "i=0; while [ $i -lt 40 ]; do yes 'OUT-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' | head -n 1000; yes 'ERR-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' | head -n 1000 >&2; i=$((i+1)); done"]
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--quiet", "--format", "json"]);
    out.expect_code(0);
    let db = history(&env.state());
    let count = |level: &str| -> i64 {
        db.query_row(
            "select count(*) from logs where step = 'loud' and level = ?1 and message like ?2",
            [level, if level == "info" { "OUT-%" } else { "ERR-%" }],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(count("info"), 40_000);
    assert_eq!(count("error"), 40_000);
}

#[test]
fn on_nonzero_fail_fails_and_a_missing_program_is_a_clear_error() {
    let env = Env::new();
    let p = env.write("p.yaml", "pipeline: f\nsteps:\n  a:\n    type: exec\n    with: { command: ./does-not-exist.sh, on_nonzero: fail }\n");
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(1);
    let err = out.json()["error"].as_str().unwrap().to_string();
    assert!(err.contains("does-not-exist.sh"), "{err}");
}

#[test]
fn a_warning_is_stored_once_and_still_makes_the_status_warning() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: warned
steps:
  script:
    type: exec
    with:
      command: sh
      args: ["-c", "echo '::warning::disk almost full'"]
  note:
    type: log
    with: { message: careful, level: warning }
  each:
    type: exec
    foreach: "{{ ['a', 'b'] }}"
    with:
      command: sh
      args: ["-c", "echo '::warning::item {{ item }} is odd'"]
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "warning", "{v}");
    for id in ["script", "note", "each"] {
        assert_eq!(crate::util::step(&v, id)["status"], "warning", "{v}");
    }
    let db = history(&env.state());
    let rows: Vec<(String, String)> = db
        .prepare("select step, message from logs where level = 'warning' order by id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let count = |msg: &str| rows.iter().filter(|(_, m)| m.contains(msg)).count();
    assert_eq!(count("disk almost full"), 1, "{rows:?}");
    assert_eq!(count("careful"), 1, "{rows:?}");
    assert_eq!(count("item a is odd"), 1, "{rows:?}");
    assert_eq!(count("item b is odd"), 1, "{rows:?}");
}

#[test]
fn kill_9_of_pipe_takes_its_exec_child_with_it() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: orphan\nsteps:\n  long:\n    type: exec\n    with: { command: sh, args: ['-c', 'echo $$ > child.pid; exec sleep 300'] }\n",
    );
    let mut pipe = env
        .cmd()
        .args(["run", p.to_str().unwrap(), "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = env.path().join("child.pid");
    let deadline = Instant::now() + Duration::from_secs(60);
    let child: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        if Instant::now() > deadline {
            let _ = pipe.kill();
            panic!("the step never started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    pipe.kill().unwrap(); // SIGKILL: pipe runs no cleanup at all
    pipe.wait().unwrap();
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(child) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let survived = alive(child);
    if survived {
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    assert!(!survived, "the exec child (pid {child}) outlived pipe");
}

#[test]
fn hundreds_of_megabytes_of_output_keep_pipe_small() {
    let env = Env::new();
    // 300 MB of 100-byte lines, as fast as `yes` makes them.
    let p = env.write(
        "p.yaml",
        "pipeline: flood\nsteps:\n  flood:\n    type: exec\n    with: { command: sh, args: ['-c', 'yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | head -c 300000000'] }\n",
    );
    let mut child = env
        .cmd()
        .args(["run", p.to_str().unwrap(), "--format", "json", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The peak resident size (VmHWM only grows), read until the process ends; the
    // deadline is a hang guard.
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut peak_kb = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            if let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if peak_kb > 1_000_000 || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pipe grew to {peak_kb} kB or ran past the deadline");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        peak_kb < 200_000,
        "pipe peaked at {peak_kb} kB for 300 MB of output"
    );
    let db = history(&env.state());
    let stored: i64 = db
        .query_row(
            "select coalesce(sum(length(message)), 0) from logs where step = 'flood'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        stored < 17 << 20,
        "{stored} bytes of log stored in the database"
    );
}
