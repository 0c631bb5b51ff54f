//! The QOCKPIT KPI pipeline, offline: `pipe run pipelines/qockpit-kpi.yaml --sandbox` asks
//! the fake platform for its integrations, runs each one's SQL for the month on the demo
//! database (`:inicio`/`:fim` bound), and posts each result; the test checks what the
//! platform received against the same figures computed straight from the database.

use crate::util::{repo_root, step, Env};

fn qockpit() -> String {
    repo_root()
        .join("pipelines/qockpit-kpi.yaml")
        .display()
        .to_string()
}

/// Run with the fakes' files (the demo database) kept in `env/fakes`.
fn run(env: &Env, extra: &[&str]) -> crate::util::Out {
    let fakes = env.path().join("fakes");
    let pipeline = qockpit();
    let mut args = vec![
        "run",
        pipeline.as_str(),
        "--sandbox",
        "--format",
        "json",
        "-q",
    ];
    args.extend_from_slice(extra);
    crate::util::Out(
        env.cmd()
            .args(&args)
            .env(
                "PIPE_SANDBOX",
                serde_json::json!({ "dir": fakes }).to_string(),
            )
            .output()
            .unwrap(),
    )
}

/// The demo database the run used (the fakes' folder was `env/fakes`).
fn demo_db(env: &Env) -> rusqlite::Connection {
    let file = env.path().join("fakes").join("demo.sqlite");
    assert!(file.exists(), "no demo database at {}", file.display());
    rusqlite::Connection::open(file).unwrap()
}

#[test]
fn the_kpi_pipeline_sends_each_integrations_result_for_the_month() {
    let env = Env::new();
    let out = run(&env, &["--param", "period=2019-01"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    let kpi = step(&v, "kpi");
    assert_eq!(kpi["outputs"]["succeeded"], 3, "{v}");
    let send = step(&v, "send");
    assert_eq!(send["outputs"]["succeeded"], 3, "{v}");
    assert_eq!(step(&v, "self_test")["status"], "skipped");

    let received = &v["sandbox"]["qockpit_results"];
    // Integration 1: revenue per branch, computed here straight from the database.
    let db = demo_db(&env);
    let mut stmt = db
        .prepare(
            "SELECT filial, COUNT(*), ROUND(SUM(valor), 2) FROM vendas
             WHERE dt >= '2019-01-01' AND dt < '2019-02-01' GROUP BY filial ORDER BY filial",
        )
        .unwrap();
    let expected: Vec<(String, i64, f64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert!(
        !expected.is_empty(),
        "the demo database has sales in 2019-01"
    );
    let rows = received["1"]["2019-01"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("integration 1 received nothing for 2019-01: {received}"));
    let got: Vec<(String, i64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["filial"].as_str().unwrap().to_string(),
                r["qtd_vendas"].as_i64().unwrap(),
                r["faturamento"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    // Integrations 2 and 3 got their own rows, once.
    let opened: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM atendimentos WHERE aberto_em >= '2019-01-01' AND aberto_em < '2019-02-01'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let by_channel: i64 = received["2"]["2019-01"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["chamados"].as_i64().unwrap())
        .sum();
    assert_eq!(by_channel, opened);
    assert!(
        received["3"]["2019-01"]["rows"][0]["tma_horas"].is_number(),
        "{received}"
    );
    for id in ["1", "2", "3"] {
        assert_eq!(received[id]["2019-01"]["posts"], 1, "{received}");
    }

    // Every statement was logged, with its bound values.
    let logs = env.run(&["runs", "logs", &v["run_id"].to_string()]);
    let text = logs.stdout();
    assert!(
        text.contains("FROM vendas WHERE dt >= ? AND dt < ?"),
        "{text}"
    );
    assert!(text.contains("['2019-01-01', '2019-02-01']"), "{text}");
}

#[test]
fn ma_is_the_month_before_the_logical_date() {
    let env = Env::new();
    // Under --sandbox the logical date is the fakes' anchor, 2026-01-01: MA is 2025-12.
    let out = run(&env, &[]);
    out.expect_code(0);
    let v = out.json();
    let received = &v["sandbox"]["qockpit_results"];
    assert!(received["1"]["2025-12"].is_object(), "{received}");
}

#[test]
fn check_true_only_tests_the_connections() {
    let env = Env::new();
    let out = run(&env, &["--param", "check=true"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(step(&v, "ping")["status"], "succeeded");
    assert_eq!(step(&v, "database")["status"], "succeeded");
    assert_eq!(step(&v, "self_test")["status"], "succeeded");
    assert_eq!(step(&v, "integrations")["status"], "skipped");
    assert_eq!(step(&v, "send")["status"], "skipped");
    assert_eq!(
        v["sandbox"]["qockpit_results"],
        serde_json::json!({}),
        "{v}"
    );
}

#[test]
fn a_bad_platform_token_fails_at_ping_and_runs_no_sql() {
    let env = Env::new();
    let p = std::fs::read_to_string(qockpit()).unwrap().replace(
        "QOCKPIT_API_TOKEN: \"{{ sandbox.qockpit.api_token }}\"",
        "QOCKPIT_API_TOKEN: not-the-token",
    );
    let file = env.write("qockpit-bad.yaml", &p);
    let out = crate::util::Out(
        env.cmd()
            .args([
                "run",
                file.to_str().unwrap(),
                "--sandbox",
                "--format",
                "json",
                "-q",
            ])
            .output()
            .unwrap(),
    );
    out.expect_code(1);
    let v = out.json();
    let err = step(&v, "ping")["error"].as_str().unwrap().to_string();
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("not-the-token"), "{err}");
    assert_eq!(step(&v, "kpi")["status"], "skipped");
}
