//! `foreach:` fan-out through `pipe run`: one run per item with `item` in its templates, a
//! concurrency bound, the items' tables combined with an `item` column, per-item statuses
//! kept in the run history, a failing item losing none of the others, and a second
//! `foreach` over the same keys seeing only its own item's rows.

use crate::util::{history, step, Env};

fn write_inputs(env: &Env) {
    env.write("in/north.csv", "id,amount\n1,10\n2,20\n");
    env.write("in/south.csv", "id,amount,region_code\n3,30,S\n");
    env.write("in/east.csv", "id,amount\n4,40\n5,50\n6,60\n");
}

fn pipeline(on_failure: &str) -> String {
    PIPELINE.replace("ON_FAILURE", on_failure)
}

const PIPELINE: &str = r#"
pipeline: fanout
params:
  regions: { type: list, default: [north, south, east] }
steps:
  read:
    type: file.read
    foreach:
      items: "{{ params.regions }}"
      concurrency: 2
      on_item_failure: ON_FAILURE
    with:
      path: "in/{{ item }}.csv"
    outputs:
      position: "{{ item_index }}"
  per_region:
    type: file.write
    input: read
    foreach: "{{ params.regions }}"
    with:
      path: "out/{{ item }}.csv"
  all:
    type: file.write
    input: read
    with:
      path: out/all.csv
"#;

#[test]
fn foreach_runs_each_item_and_combines_their_tables() {
    let env = Env::new();
    write_inputs(&env);
    let p = env.write("p.yaml", &pipeline("fail"));
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json", "-q"]);
    out.expect_code(0);
    let v = out.json();
    let read = step(&v, "read");
    assert_eq!(read["status"], "succeeded", "{v}");
    assert_eq!(read["rows"], 6);
    assert_eq!(read["outputs"]["succeeded"], 3);
    assert_eq!(read["outputs"]["failed"], 0);
    assert_eq!(read["outputs"]["position"], serde_json::json!([0, 1, 2]));
    let keys: Vec<_> = read["outputs"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                i["status"].as_str().unwrap().to_string(),
                i["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("north".into(), "succeeded".into(), 2),
            ("south".into(), "succeeded".into(), 1),
            ("east".into(), "succeeded".into(), 3)
        ]
    );
    // Combined: columns unioned (region_code only in south), an `item` column first, in
    // item order.
    let all = std::fs::read_to_string(env.path().join("out/all.csv")).unwrap();
    assert_eq!(
        all,
        "item,id,amount,region_code\nnorth,1,10,\nnorth,2,20,\nsouth,3,30,S\neast,4,40,\neast,5,50,\neast,6,60,\n"
    );
    // A foreach over the same keys gets only its own item's rows, without the column.
    assert_eq!(
        std::fs::read_to_string(env.path().join("out/south.csv")).unwrap(),
        "id,amount,region_code\n3,30,S\n"
    );
    assert_eq!(
        std::fs::read_to_string(env.path().join("out/east.csv")).unwrap(),
        "id,amount,region_code\n4,40,\n5,50,\n6,60,\n"
    );
    // Per-item statuses are in the run history, and a log row per item.
    let db = history(&env.state());
    let outputs: String = db
        .query_row(
            "SELECT outputs FROM step_runs WHERE step = 'read'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let outputs: serde_json::Value = serde_json::from_str(&outputs).unwrap();
    assert_eq!(outputs["items"][2]["key"], "east");
    let rows: i64 = db
        .query_row(
            "SELECT count(*) FROM logs WHERE step = 'read' AND message LIKE 'item %/3 (%) succeeded%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 3);
    let kind: String = db
        .query_row("SELECT kind FROM step_runs WHERE step = 'read'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(kind, "file.read");
}

/// The pipeline over north, missing (no such file) and east.
fn run_with_a_missing_region(env: &Env, on_failure: &str) -> crate::util::Out {
    write_inputs(env);
    let p = env.write("p.yaml", &pipeline(on_failure));
    env.run(&[
        "run",
        p.to_str().unwrap(),
        "--format",
        "json",
        "-q",
        "--param",
        "regions=north,missing,east",
    ])
}

#[test]
fn a_failing_item_fails_the_step_only_after_every_item_ran() {
    let env = Env::new();
    let out = run_with_a_missing_region(&env, "fail");
    out.expect_code(1);
    let v = out.json();
    let read = step(&v, "read");
    assert_eq!(read["status"], "failed");
    let error = read["error"].as_str().unwrap();
    assert!(
        error.starts_with("1 of 3 items failed: item missing: "),
        "{error}"
    );
    assert_eq!(step(&v, "all")["status"], "skipped");
    // The others ran and were recorded.
    let db = history(&env.state());
    let ok: i64 = db
        .query_row(
            "SELECT count(*) FROM logs WHERE step = 'read' AND message LIKE 'item %succeeded%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(ok, 2);
}

#[test]
fn on_item_failure_warn_keeps_the_items_that_succeeded() {
    let env = Env::new();
    let out = run_with_a_missing_region(&env, "warn");
    out.expect_code(0);
    let v = out.json();
    let read = step(&v, "read");
    assert_eq!(read["status"], "warning", "{v}");
    assert_eq!(read["outputs"]["failed"], 1);
    assert_eq!(read["outputs"]["items"][1]["status"], "failed");
    assert!(read["outputs"]["items"][1]["error"]
        .as_str()
        .unwrap()
        .contains("missing"));
    let all = std::fs::read_to_string(env.path().join("out/all.csv")).unwrap();
    assert_eq!(all.lines().count(), 1 + 5, "{all}");
    // The item that failed upstream is skipped downstream (never another item's rows).
    let per_region = &step(&v, "per_region")["outputs"];
    assert_eq!(per_region["succeeded"], 2);
    assert_eq!(per_region["skipped"], 1);
    assert_eq!(
        per_region["items"][1]["reason"],
        "item failed upstream in `read`"
    );
    assert!(!env.path().join("out/missing.csv").exists());
}

#[test]
fn item_is_only_known_inside_foreach_and_the_list_must_be_a_list() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"
pipeline: bad
steps:
  a:
    type: log
    with:
      message: "{{ item }}"
  b:
    type: log
    foreach:
      items: "{{ [1, 2] }}"
      concurrency: 0
    with:
      message: "{{ item }} {{ item_index }}"
"#,
    );
    let out = env.run(&["validate", p.to_str().unwrap()]);
    out.expect_code(1);
    let err = out.stdout() + &out.stderr();
    assert!(err.contains("p.yaml:7:16: error[E012]"), "{err}");
    assert!(
        err.contains("error[E019]: foreach.concurrency must be at least 1"),
        "{err}"
    );
    assert_eq!(err.matches("error[").count(), 2, "{err}");

    let p = env.write(
        "q.yaml",
        r#"
pipeline: notalist
steps:
  b:
    type: log
    foreach: "{{ 'abc' }}"
    with:
      message: "{{ item }}"
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--format", "json", "-q"]);
    out.expect_code(1);
    assert_eq!(
        step(&out.json(), "b")["error"],
        "`foreach:` must give a list, not a string"
    );
}

#[test]
fn dry_run_shows_a_foreach_step_for_a_placeholder_item() {
    let env = Env::new();
    let p = env.write("p.yaml", &pipeline("fail"));
    let out = env.run(&["run", p.to_str().unwrap(), "--dry-run"]);
    out.expect_code(0);
    let text = out.stdout() + &out.stderr();
    assert!(text.contains("\"path\": \"in/<item>.csv\""), "{text}");
    assert!(text.contains("\"path\": \"out/<item>.csv\""), "{text}");
}

#[test]
fn a_hundred_thousand_items_start_without_a_quadratic_key_check() {
    let env = Env::new();
    // minijinja's `range` stops at 10,000 items: ten of them make the list.
    let items = (0..10)
        .map(|i| format!("range({}, {})", i * 10_000, (i + 1) * 10_000))
        .collect::<Vec<_>>()
        .join(" + ");
    let p = env.write(
        "p.yaml",
        &format!(
            "pipeline: many\nsteps:\n  each:\n    type: log\n    foreach:\n      items: \"{{{{ {items} }}}}\"\n      concurrency: 8\n    if: \"{{{{ item == 0 }}}}\"\n    with: {{ message: \"{{{{ item }}}}\" }}\n"
        ),
    );
    let child = env.spawn(&["run", p.to_str().unwrap(), "--format", "json", "-q"]);
    // A hang guard only (the quadratic check took minutes).
    let out = crate::util::wait_with_deadline(child, std::time::Duration::from_secs(240));
    out.expect_code(0);
    let v = out.json();
    assert_eq!(
        step(&v, "each")["outputs"]["skipped"],
        99_999,
        "{}",
        out.stdout().len()
    );
    // The keys are checked before the step announces its items: that took 81 s when each
    // key was compared with every earlier one; a look-up per key takes well under 20 s even
    // on a busy debug build.
    let db = history(&env.state());
    let (started, announced): (String, String) = db
        .query_row(
            "select r.started_at, l.time from runs r join logs l on l.run_id = r.id
             where l.message = '100000 items, 8 at a time'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
    let took = t(&announced) - t(&started);
    assert!(
        took < chrono::TimeDelta::seconds(20),
        "checking 100,000 keys took {took}"
    );
}
