//! The headline extraction, offline: `pipe run pipelines/tiflux.yaml --sandbox` against the
//! local fakes (two-factor login through the OTP sheet, paged tickets, logout).

use crate::util::{repo_root, Env};

fn tiflux() -> String {
    repo_root()
        .join("pipelines/tiflux.yaml")
        .display()
        .to_string()
}

fn step<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {v}"))
}

#[test]
fn the_tiflux_pipeline_runs_offline_and_logs_out() {
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
        r#"{"tickets": 1000, "otp_delay_ms": 200}"#,
    );
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    // 400 days back from the anchor covers every ticket the fake holds.
    assert_eq!(step(&v, "tickets")["rows"], 1000, "{v}");
    assert_eq!(step(&v, "logout")["status"], "succeeded");
    assert_eq!(v["sandbox"]["logouts"], 1, "{v}");
    assert_eq!(v["sandbox"]["live_tokens"], 0, "{v}");
    // 1000 tickets in pages of 200: 5 pages (plus nothing more: the total is known).
    assert_eq!(v["sandbox"]["requests"]["tickets"], 5, "{v}");
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
