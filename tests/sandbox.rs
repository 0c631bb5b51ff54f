//! The headline extraction, offline: `pipe run pipelines/tiflux.yaml --sandbox` against the
//! local fakes (two-factor login through the OTP sheet, paged tickets, logout).

use crate::util::{repo_root, step, Env};

fn tiflux() -> String {
    repo_root()
        .join("pipelines/tiflux.yaml")
        .display()
        .to_string()
}

/// The fake BigQuery's tables under a state dir, as `pipe sandbox tables --format json` lists them.
fn tables(env: &Env) -> Vec<serde_json::Value> {
    let out = env.run(&["sandbox", "tables", "--format", "json"]);
    out.expect_code(0);
    out.json().as_array().unwrap().clone()
}

fn tickets_table(env: &Env) -> serde_json::Value {
    tables(env)
        .into_iter()
        .find(|t| t["dataset"] == "helpdesk" && t["table"] == "tickets")
        .expect("helpdesk.tickets was loaded")
}

#[test]
fn the_tiflux_pipeline_runs_offline_loads_bigquery_and_logs_out() {
    let env = Env::new();
    let out = Out2::run(
        &env,
        &[
            "run",
            &tiflux(),
            "--sandbox",
            "--format",
            "json",
            "--param",
            "days=400",
        ],
        r#"{"tickets": 1000, "otp_delay_ms": 0}"#,
    );
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    // 400 days back from the anchor covers every ticket the fake holds.
    assert_eq!(step(&v, "tickets")["rows"], 1000, "{v}");
    assert_eq!(step(&v, "clean")["rows"], 1000, "{v}");
    assert_eq!(step(&v, "load")["rows"], 1000, "{v}");
    assert_eq!(step(&v, "logout")["status"], "succeeded");
    assert_eq!(v["sandbox"]["logouts"], 1, "{v}");
    assert_eq!(v["sandbox"]["live_tokens"], 0, "{v}");
    // 1000 tickets in pages of 200: the first page tells the total, then exactly 4 more.
    assert_eq!(v["sandbox"]["requests"]["tickets"], 5, "{v}");

    // The table: its row count, business column names and types.
    let t = tickets_table(&env);
    assert_eq!(t["rows"], 1000, "{t}");
    let schema = t["schema"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema in {t}"));
    for (column, ty) in [
        ("numero", "INTEGER"),
        ("titulo", "STRING"),
        ("situacao", "STRING"),
        ("criado_em", "TIMESTAMP"),
        ("fechado_em", "TIMESTAMP"),
        ("worked_hours", "FLOAT"),
        ("is_closed", "BOOLEAN"),
    ] {
        assert_eq!(
            schema.get(column).and_then(|v| v.as_str()),
            Some(ty),
            "{column} in {t}"
        );
    }
    for gone in ["ticket_number", "title", "created_at"] {
        assert!(
            schema.get(gone).is_none(),
            "{gone} should have been renamed: {t}"
        );
    }
}

#[test]
fn the_same_period_twice_leaves_each_ticket_once() {
    let env = Env::new();
    for _ in 0..2 {
        let out = Out2::run(
            &env,
            &[
                "run",
                &tiflux(),
                "--sandbox",
                "--format",
                "json",
                "--param",
                "days=400",
            ],
            r#"{"tickets": 300, "otp_delay_ms": 0}"#,
        );
        out.expect_code(0);
    }
    assert_eq!(tickets_table(&env)["rows"], 300);
}

#[test]
fn a_bigquery_job_error_fails_the_run_keeps_the_table_and_still_logs_out() {
    let env = Env::new();
    Out2::run(
        &env,
        &[
            "run",
            &tiflux(),
            "--sandbox",
            "--format",
            "json",
            "--param",
            "days=400",
        ],
        r#"{"tickets": 300, "otp_delay_ms": 0}"#,
    )
    .expect_code(0);
    let faults = r#"{"tickets": 500, "otp_delay_ms": 0, "faults": [{"endpoint": "bigquery_jobs", "kind": {"type": "job_error", "reason": "invalid", "message": "Query error: the sky fell"}}]}"#;
    let out = Out2::run(
        &env,
        &[
            "run",
            &tiflux(),
            "--sandbox",
            "--format",
            "json",
            "--param",
            "days=400",
        ],
        faults,
    );
    out.expect_code(1);
    let v = out.json();
    assert_eq!(step(&v, "load")["status"], "failed", "{v}");
    assert!(
        step(&v, "load")["error"]
            .as_str()
            .unwrap()
            .contains("the sky fell"),
        "{v}"
    );
    assert_eq!(step(&v, "logout")["status"], "succeeded", "{v}");
    // The target is as the first run left it; no staging table is left behind.
    assert_eq!(tickets_table(&env)["rows"], 300);
    let names: Vec<String> = tables(&env)
        .iter()
        .map(|t| t["table"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["tickets"], "{names:?}");
}

#[test]
fn extraction_failing_midway_still_logs_out() {
    let env = Env::new();
    let faults = r#"{"tickets": 1000, "otp_delay_ms": 100, "faults": [{"endpoint": "tickets", "page": 3, "kind": {"type": "status", "code": 500}}]}"#;
    let out = Out2::run(
        &env,
        &[
            "run",
            &tiflux(),
            "--sandbox",
            "--format",
            "json",
            "--param",
            "days=400",
        ],
        faults,
    );
    out.expect_code(1);
    let v = out.json();
    assert_eq!(step(&v, "tickets")["status"], "failed", "{v}");
    assert_eq!(step(&v, "logout")["status"], "succeeded", "{v}");
    assert_eq!(v["sandbox"]["logouts"], 1, "{v}");
    assert!(v["error"].as_str().unwrap().contains("tickets"), "{v}");
    // Nothing was loaded.
    assert_eq!(step(&v, "load")["status"], "skipped", "{v}");
    assert!(tables(&env).is_empty());
}

#[test]
fn a_page_failing_twice_is_retried_without_gaps_or_duplicates() {
    let env = Env::new();
    let faults = r#"{"tickets": 1000, "otp_delay_ms": 100, "faults": [{"endpoint": "tickets", "page": 2, "times": 2, "kind": {"type": "status", "code": 503}}]}"#;
    let out = Out2::run(
        &env,
        &[
            "run",
            &tiflux(),
            "--sandbox",
            "--format",
            "json",
            "--param",
            "days=400",
        ],
        faults,
    );
    out.expect_code(0);
    let v = out.json();
    assert_eq!(step(&v, "tickets")["rows"], 1000, "{v}");
    assert_eq!(v["sandbox"]["requests"]["tickets"], 7, "{v}");
}

#[test]
fn secrets_of_the_login_never_reach_the_history() {
    let env = Env::new();
    let out = Out2::run(
        &env,
        &["run", &tiflux(), "--sandbox", "--format", "json", "-v"],
        r#"{"tickets": 300, "otp_delay_ms": 100}"#,
    );
    out.expect_code(0);
    let db = crate::util::history(&env.state());
    let outputs: String = db
        .query_row(
            "select outputs from step_runs where step = 'session'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(outputs.contains("\"token\":\"***\""), "{outputs}");
    let otp: String = db
        .query_row(
            "select outputs from step_runs where step = 'otp'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(otp.contains("\"code\":\"***\""), "{otp}");
    let all = format!("{}{}", out.stdout(), out.stderr());
    assert!(
        !all.contains("Bearer "),
        "a bearer token was printed: {all}"
    );
}

#[test]
fn dry_run_with_sandbox_shows_the_plan() {
    let env = Env::new();
    let out = Out2::run(&env, &["run", &tiflux(), "--sandbox", "--dry-run"], "{}");
    out.expect_code(0);
    let s = out.stdout();
    assert!(s.contains("1. login (http.request)"), "{s}");
    assert!(s.contains("<steps.session.token>"), "{s}");
}

/// `pipe` with `PIPE_SANDBOX` set.
struct Out2;
impl Out2 {
    fn run(env: &Env, args: &[&str], sandbox: &str) -> crate::util::Out {
        crate::util::Out(
            env.cmd()
                .env("PIPE_SANDBOX", sandbox)
                .args(args)
                .output()
                .expect("run pipe"),
        )
    }
}

/// The tiflux pipeline with a faster OTP poll (and a given wait timeout), for OTP timing tests.
fn tiflux_variant(env: &Env, timeout: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("pipelines/tiflux.yaml")).unwrap();
    let text = text
        .replace("every: 5s", "every: 100ms")
        .replace("timeout: 3m", &format!("timeout: {timeout}"));
    assert!(
        text.contains("every: 100ms"),
        "the pipeline's OTP wait changed shape"
    );
    env.write("tiflux-fast.yaml", &text).display().to_string()
}

#[test]
fn a_late_otp_is_waited_for() {
    let env = Env::new();
    let p = tiflux_variant(&env, "20s");
    let out = Out2::run(
        &env,
        &[
            "run",
            &p,
            "--sandbox",
            "--format",
            "json",
            "--param",
            "days=400",
        ],
        r#"{"tickets": 200, "otp_delay_ms": 1500}"#,
    );
    out.expect_code(0);
    let v = out.json();
    assert_eq!(step(&v, "otp")["status"], "succeeded", "{v}");
    assert_eq!(step(&v, "tickets")["rows"], 200, "{v}");
    assert_eq!(step(&v, "load")["rows"], 200, "{v}");
    // It polled the sheet several times before the code arrived.
    assert!(
        v["sandbox"]["requests"]["sheets"].as_u64().unwrap() >= 3,
        "{v}"
    );
}

#[test]
fn an_otp_that_never_arrives_fails_clearly_and_nothing_is_extracted() {
    let env = Env::new();
    let p = tiflux_variant(&env, "1s");
    let out = Out2::run(
        &env,
        &["run", &p, "--sandbox", "--format", "json"],
        r#"{"tickets": 200, "otp_delay_ms": 600000}"#,
    );
    out.expect_code(1);
    let v = out.json();
    assert_eq!(step(&v, "otp")["status"], "failed", "{v}");
    assert!(
        step(&v, "otp")["error"]
            .as_str()
            .unwrap()
            .contains("did not hold within 1s"),
        "{v}"
    );
    assert_eq!(step(&v, "session")["status"], "skipped");
    assert_eq!(step(&v, "tickets")["status"], "skipped");
    // No session was opened, so there is nothing to log out of.
    assert_eq!(step(&v, "logout")["status"], "skipped");
    assert_eq!(
        v["sandbox"]["requests"]["tickets"],
        serde_json::Value::Null,
        "{v}"
    );
}

#[test]
fn an_http_connection_without_a_stand_in_is_refused_under_sandbox() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: real\nconnections:\n  api: { type: http, base_url: https://example.com }\nsteps:\n  get: { type: http.request, connection: api, with: { path: /x } }\n",
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--sandbox"]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("connection `api` has no stand-in"),
        "{}",
        out.stderr()
    );
}

/// Every pipeline in `pipelines/` runs offline with `--sandbox` and succeeds (the fakes'
/// defaults: 1,000 tickets; the OTP after 300 ms).
#[test]
fn every_pipeline_in_the_repo_runs_with_sandbox() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            names.push(path);
        }
    }
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for path in names {
        let env = Env::new();
        let out = env.run(&[
            "run",
            path.to_str().unwrap(),
            "--sandbox",
            "--format",
            "json",
            "-q",
        ]);
        let v = out.json();
        assert_eq!(v["status"], "succeeded", "{}: {v}", path.display());
    }
}
