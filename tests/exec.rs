//! The exec step through the real binary: log rows per line, workflow commands, files,
//! exit codes, and megabytes on both streams.

use crate::util::{history, Env};

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
