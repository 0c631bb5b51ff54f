//! `pipe runs repair ID`: a finished run's failed steps run again (attempt 2 of the same
//! run), reusing what the succeeded steps produced.

use crate::util::{Env, Out};

/// read (a table) → check (fails until the file `ok` exists) → write (the read table).
fn pipeline(env: &Env, keep_tables: bool) -> std::path::PathBuf {
    env.write("in.csv", "a,b\n1,2\n3,4\n");
    env.write(
        "p.yaml",
        &format!(
            r#"
pipeline: repairable
keep_tables: {keep_tables}
steps:
  read:
    type: file.read
    with: {{ path: in.csv }}
  check:
    type: exec
    needs: [read]
    with: {{ command: sh, args: ["-c", "test -f ok"], on_nonzero: fail }}
  write:
    type: file.write
    input: read
    needs: [check]
    with: {{ path: out.csv }}
"#
        ),
    )
}

fn statuses(v: &serde_json::Value) -> Vec<(String, String)> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn first_run(env: &Env, p: &std::path::Path) -> i64 {
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json", "-q"]);
    out.expect_code(1);
    let v = out.json();
    assert_eq!(
        statuses(&v),
        vec![
            ("read".into(), "succeeded".into()),
            ("check".into(), "failed".into()),
            ("write".into(), "skipped".into()),
        ]
    );
    v["run_id"].as_i64().unwrap()
}

#[test]
fn repair_runs_the_failed_step_again_and_reuses_the_kept_table() {
    let env = Env::new();
    let p = pipeline(&env, true);
    let id = first_run(&env, &p);
    assert!(
        env.state()
            .join(format!("runs/{id}/tables/read.parquet"))
            .exists(),
        "keep_tables writes the read step's table"
    );
    // Fix the cause, and change the input: a reused table is the one the first attempt read.
    env.write("ok", "");
    env.write("in.csv", "a,b\n1,2\n3,4\n5,6\n");
    let out = env.run(&["runs", "repair", &id.to_string(), "--format", "json", "-q"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["run_id"].as_i64(), Some(id), "the repair is the same run");
    assert_eq!(v["attempt"].as_u64(), Some(2));
    assert_eq!(v["status"], "succeeded");
    assert_eq!(
        std::fs::read_to_string(env.path().join("out.csv")).unwrap(),
        "a,b\n1,2\n3,4\n",
        "the write used the kept table of attempt 1"
    );
    // `runs show` tells the story: one run, attempt 2, read reused from attempt 1.
    let show = env.run(&["runs", "show", &id.to_string(), "--format", "json"]);
    show.expect_code(0);
    let s = show.json();
    assert_eq!(s["status"], "succeeded");
    assert_eq!(s["attempt"].as_u64(), Some(2));
    let steps = s["steps"].as_array().unwrap();
    // Each step's latest row: rows of every attempt are kept.
    let attempt_of = |id: &str| {
        steps
            .iter()
            .filter(|x| x["step"] == id)
            .filter_map(|x| x["run_attempt"].as_u64())
            .max()
    };
    assert_eq!(attempt_of("read"), Some(1));
    assert_eq!(attempt_of("check"), Some(2));
    assert_eq!(attempt_of("write"), Some(2));
    let logs = env.run(&["runs", "logs", &id.to_string()]);
    assert!(logs.stdout().contains("not run again"), "{}", logs.stdout());
}

#[test]
fn without_kept_tables_the_table_step_runs_again() {
    let env = Env::new();
    let p = pipeline(&env, false);
    let id = first_run(&env, &p);
    env.write("ok", "");
    env.write("in.csv", "a,b\n1,2\n3,4\n5,6\n");
    let out = env.run(&["runs", "repair", &id.to_string(), "--format", "json", "-q"]);
    out.expect_code(0);
    assert_eq!(
        std::fs::read_to_string(env.path().join("out.csv")).unwrap(),
        "a,b\n1,2\n3,4\n5,6\n",
        "read ran again: its table was not kept"
    );
}

#[test]
fn a_succeeded_or_unknown_run_has_nothing_to_repair() {
    let env = Env::new();
    let p = pipeline(&env, false);
    env.write("ok", "");
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json", "-q"]);
    out.expect_code(0);
    let id = out.json()["run_id"].as_i64().unwrap();
    let again = env.run(&["runs", "repair", &id.to_string()]);
    again.expect_code(2);
    assert!(
        again.stderr().contains("nothing to repair"),
        "{}",
        again.stderr()
    );
    let unknown = env.run(&["runs", "repair", "999"]);
    unknown.expect_code(2);
    assert!(
        unknown.stderr().contains("no run 999"),
        "{}",
        unknown.stderr()
    );
}

/// With PostgreSQL as the store, a run made on one machine is repaired from another: the
/// pipeline text it ran is kept in the store, not in the first machine's state dir (here a
/// second state dir stands for the other machine; the pipeline's own files stay where the
/// run's file was, as a shared folder of pipelines would be).
#[test]
fn a_run_in_postgres_is_repaired_from_another_state_dir() {
    let db = crate::util::PgDb::new();
    let first = Env::new();
    let p = pipeline(&first, false);
    let out = Out(first
        .cmd()
        .env("PIPE_DB", &db.url)
        .args(["run", p.to_str().unwrap(), "--format", "json", "-q"])
        .output()
        .unwrap());
    out.expect_code(1);
    let id = out.json()["run_id"].as_i64().unwrap();
    // Nothing of the run is a file: its folder would only hold what steps attached.
    assert!(
        !first.state().join(format!("runs/{id}")).exists(),
        "a run that attaches nothing has no folder"
    );
    // Fix the cause; change the file: the repair runs the text the run ran.
    first.write("ok", "");
    std::fs::write(&p, "pipeline: repairable\nsteps: {}\n").unwrap();
    let other = Env::new();
    let out = Out(other
        .cmd()
        .env("PIPE_DB", &db.url)
        .args(["runs", "repair", &id.to_string(), "--format", "json", "-q"])
        .output()
        .unwrap());
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["run_id"].as_i64(), Some(id));
    assert_eq!(v["attempt"].as_u64(), Some(2));
    assert_eq!(v["status"], "succeeded");
    assert_eq!(
        std::fs::read_to_string(first.path().join("out.csv")).unwrap(),
        "a,b\n1,2\n3,4\n",
        "the kept text's relative paths resolved from where the run's file was"
    );
}

/// A run whose pipeline text was never kept (here an outside script's run) cannot be
/// repaired, and the error says why and what to do instead.
#[test]
fn a_run_without_a_kept_pipeline_says_to_run_it_again() {
    let env = Env::new();
    let started = env.run(&["runs", "start", "--pipeline", "script"]);
    started.expect_code(0);
    let id = started.stdout().trim().to_string();
    env.run(&["runs", "finish", &id, "--status", "failed"])
        .expect_code(0);
    let out = env.run(&["runs", "repair", &id]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("no copy of its pipeline was kept")
            && out.stderr().contains("run the pipeline again instead"),
        "{}",
        out.stderr()
    );
}
