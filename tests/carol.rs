//! The Carol staging pipeline, offline: `pipe run pipelines/carol-staging.yaml --sandbox`
//! reads the demo ERP database, defines the staging table with its crosswalk, sends the rows
//! gzip-compressed under the sending limit, deletes the keys of the ERP's deletion log and
//! sends a heartbeat counted from the run history. The test checks what the Carol fake holds.

use crate::util::{repo_root, step, Env, Out};

fn run(env: &Env, sandbox: serde_json::Value) -> Out {
    let pipeline = repo_root().join("pipelines/carol-staging.yaml");
    Out(env
        .cmd()
        .args([
            "run",
            pipeline.to_str().unwrap(),
            "--sandbox",
            "--format",
            "json",
            "-q",
        ])
        .env("PIPE_SANDBOX", sandbox.to_string())
        .output()
        .unwrap())
}

#[test]
fn the_staging_pipeline_upserts_deletes_and_reports_a_heartbeat() {
    let env = Env::new();
    let out = run(&env, serde_json::json!({}));
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    let carol = &v["sandbox"]["carol_state"]["tables"]["emitente"];
    assert_eq!(
        carol["crosswalk"],
        serde_json::json!(["cod-emitente"]),
        "{carol}"
    );
    assert_eq!(
        carol["schema"]["mdmStagingMapping"]["properties"]["cod-emitente"]["type"], "integer",
        "{carol}"
    );
    assert_eq!(
        carol["schema"]["mdmStagingMapping"]["properties"]["nome-emit"]["type"],
        "string"
    );
    // Carol held yesterday's sync (the 500 issuers and the 4 deleted in the last 7 days);
    // now it holds exactly the ERP's 500 issuers.
    assert_eq!(carol["count"], 500, "{carol}");
    let stats = &v["sandbox"]["carol"];
    assert_eq!(stats["records_received"], 500, "{stats}");
    assert_eq!(stats["records_deleted"], 4, "{stats}");
    assert_eq!(stats["heartbeats"], 1, "{stats}");
    assert!(
        stats["bytes_received"].as_u64().unwrap() < stats["bytes_raw"].as_u64().unwrap() / 3,
        "gzip: {stats}"
    );
    assert_eq!(step(&v, "delete")["outputs"]["records"], 4);
    // The heartbeat counts what this pipeline sent in the last hour, this run included.
    let hb = &step(&v, "heartbeat")["outputs"];
    assert_eq!(hb["record_count_last_hour"], 500, "{hb}");
    assert_eq!(hb["record_count_last_24_hours"], 500, "{hb}");

    // A second run in the same state dir: the history now holds both runs' records.
    let out = run(&env, serde_json::json!({}));
    out.expect_code(0);
    let v = out.json();
    assert_eq!(
        step(&v, "heartbeat")["outputs"]["record_count_last_hour"],
        1000
    );
}

#[test]
fn requests_stay_under_a_small_sending_limit() {
    let env = Env::new();
    let limit = 3000u64;
    let out = run(
        &env,
        serde_json::json!({ "carol_sending_limit_bytes": limit }),
    );
    out.expect_code(0);
    let v = out.json();
    let stats = &v["sandbox"]["carol"];
    let sent = stats["bytes_received"].as_u64().unwrap();
    let requests = stats["send_requests"].as_u64().unwrap();
    assert!(
        stats["max_body_bytes"].as_u64().unwrap() <= limit,
        "{stats}"
    );
    assert_eq!(stats["rejected_too_large"], 0, "{stats}");
    let minimum = sent.div_ceil(limit);
    assert!(
        requests >= minimum && requests as f64 <= minimum as f64 * 1.05 + 1.0,
        "{requests} requests for {sent} bytes at {limit}: {stats}"
    );
    assert_eq!(
        v["sandbox"]["carol_state"]["tables"]["emitente"]["count"],
        500
    );
}

#[test]
fn a_refused_send_fails_the_step_but_the_heartbeat_still_goes() {
    let env = Env::new();
    let out = run(
        &env,
        serde_json::json!({
            "faults": [{ "endpoint": "carol_send", "kind": { "type": "status", "code": 403 } }]
        }),
    );
    out.expect_code(1);
    let v = out.json();
    assert_eq!(step(&v, "send")["status"], "failed", "{v}");
    assert!(
        step(&v, "send")["error"].as_str().unwrap().contains("403"),
        "{v}"
    );
    assert_eq!(step(&v, "delete")["status"], "skipped");
    assert_eq!(step(&v, "heartbeat")["status"], "succeeded", "{v}");
    assert_eq!(
        step(&v, "heartbeat")["outputs"]["record_count_last_hour"],
        0
    );
}
