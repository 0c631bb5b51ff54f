//! The Carol steps against the sandbox's Carol fake: logins (password, API key, expiring
//! tokens, a rejected token), schemas, chunked gzip sends under a small sending limit,
//! upserts, retries on injected faults, deletes and heartbeats.

use super::*;
use engine::events::{Observer, RunEvent};
use engine::secrets::Redactor;
use engine::step::{HistoryView, StepConfig, StepContext};
use polars::prelude::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Collect(Mutex<Vec<String>>);
impl Observer for Collect {
    fn event(&self, e: &RunEvent) {
        if let RunEvent::Log(r) = e {
            self.0.lock().unwrap().push(format!(
                "{} {}",
                r.message,
                r.description.clone().unwrap_or_default()
            ));
        }
    }
}

async fn fake(limit: u64, ttl: u64, faults: Vec<sandbox::Fault>) -> sandbox::Sandbox {
    sandbox::Sandbox::start(sandbox::Options {
        carol_sending_limit_bytes: limit,
        carol_token_ttl_s: ttl,
        faults,
        tickets: 1,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn connection(sbx: &sandbox::Sandbox, api_key: bool) -> Value {
    let v = sbx.values();
    let c = &v["carol"];
    let mut conn = json!({
        "type": "carol",
        "tenant": c["tenant"],
        "url": c["url"],
        "connector_id": c["connector_id"],
    });
    if api_key {
        conn["api_key"] = c["api_key"].clone();
    } else {
        conn["username"] = c["username"].clone();
        conn["password"] = c["password"].clone();
    }
    conn
}

fn ctx(
    sbx: &sandbox::Sandbox,
    obs: &Arc<Collect>,
    api_key: bool,
    df: Option<DataFrame>,
) -> StepContext {
    let dir = std::env::temp_dir();
    let mut ctx = StepContext::new("carol", 1, obs.clone(), Redactor::new(), dir.clone(), dir);
    ctx.connection = Some(connection(sbx, api_key));
    ctx.pipeline = "carol-staging".into();
    if let Some(df) = df {
        ctx.inputs.insert("source".into(), crate::table::table(df));
    }
    ctx
}

fn tickets(n: usize, title: &str) -> DataFrame {
    let ids: Vec<i64> = (1..=n as i64).collect();
    let titles: Vec<String> = (1..=n)
        .map(|i| format!("{title} {i} {}", (i * 7919) % 997))
        .collect();
    let prices: Vec<f64> = (1..=n).map(|i| i as f64 / 4.0).collect();
    let open: Vec<bool> = (1..=n).map(|i| i % 3 == 0).collect();
    let at = Column::new(
        "created".into(),
        (1..=n as i64)
            .map(|i| 1_767_225_600_000 + i * 60_000)
            .collect::<Vec<_>>(),
    )
    .cast(&DataType::Datetime(
        TimeUnit::Milliseconds,
        Some(polars::prelude::TimeZone::UTC),
    ))
    .unwrap();
    DataFrame::new(vec![
        Column::new("id".into(), ids),
        Column::new("title".into(), titles),
        Column::new("price".into(), prices),
        Column::new("open".into(), open),
        at,
    ])
    .unwrap()
}

fn schema_step(table: &str) -> CarolSchema {
    CarolSchema {
        table: table.into(),
        crosswalk: vec!["id".into()],
        overrides: Default::default(),
        flexible: false,
    }
}

fn send_step(table: &str) -> CarolSend {
    CarolSend {
        table: table.into(),
        sync: false,
        max_records: None,
        retries: None,
        gzip_level: None,
    }
}

#[tokio::test]
async fn schema_then_chunked_send_under_the_limit_then_upsert() {
    let limit = 16 * 1024;
    let sbx = fake(limit, 3600, vec![]).await;
    let obs = Arc::new(Collect::default());
    let df = tickets(5000, "ticket");

    let out = schema_step("tickets")
        .run(ctx(&sbx, &obs, false, Some(df.clone())))
        .await
        .unwrap();
    assert_eq!(out.outputs["action"], json!("created"));
    let schema = sbx.carol_schema("tickets").unwrap();
    assert_eq!(
        schema["mdmStagingMapping"]["properties"],
        json!({"id": {"type": "integer"}, "title": {"type": "string"}, "price": {"type": "double"},
               "open": {"type": "boolean"}, "created": {"type": "date"}})
    );
    let again = schema_step("tickets")
        .run(ctx(&sbx, &obs, false, Some(df.clone())))
        .await
        .unwrap();
    assert_eq!(again.outputs["action"], json!("unchanged"));

    let out = send_step("tickets")
        .run(ctx(&sbx, &obs, false, Some(df.clone())))
        .await
        .unwrap();
    let stats = sbx.stats().carol;
    assert_eq!(out.outputs["records"], json!(5000));
    assert_eq!(out.outputs["rows"], json!(5000));
    // (The fake also starts holding the demo ERP's `emitente`; count this table alone.)
    assert_eq!(sbx.carol_records("tickets").len(), 5000);
    assert_eq!(stats.rejected_too_large, 0);
    assert!(stats.max_body_bytes <= limit, "{stats:?}");
    let requests = out.outputs["requests"].as_u64().unwrap();
    let sent = out.outputs["bytes_sent"].as_u64().unwrap();
    assert_eq!(sent, stats.bytes_received);
    assert!(requests > 3, "{requests}");
    assert!(
        requests as f64 <= 1.05 * sent.div_ceil(limit) as f64 + 1.0,
        "{requests} for {sent}"
    );
    let records = sbx.carol_records("tickets");
    assert_eq!(
        records[0],
        json!({"id": 1, "title": "ticket 1 940", "price": 0.25, "open": false,
               "created": "2026-01-01T00:01:00.000Z"})
    );

    // The same ids again with new titles: replaced, not added.
    let out = send_step("tickets")
        .run(ctx(&sbx, &obs, true, Some(tickets(100, "changed"))))
        .await
        .unwrap();
    assert_eq!(out.outputs["requests"], json!(1));
    let records = sbx.carol_records("tickets");
    assert_eq!(records.len(), 5000);
    assert_eq!(records[0]["title"], json!("changed 1 940"));
    assert_eq!(records[100]["title"], json!("ticket 101 225"));

    // Secrets never in the log.
    let v = sbx.values();
    let logs = obs.0.lock().unwrap().join("\n");
    for s in ["password", "api_key"] {
        assert!(
            !logs.contains(v["carol"][s].as_str().unwrap()),
            "{s} in {logs}"
        );
    }
}

#[tokio::test]
async fn record_cap_sync_and_type_change() {
    let sbx = fake(1 << 20, 3600, vec![]).await;
    let obs = Arc::new(Collect::default());
    schema_step("t2")
        .run(ctx(&sbx, &obs, true, Some(tickets(10, "a"))))
        .await
        .unwrap();
    let mut send = send_step("t2");
    send.max_records = Some(4);
    send.sync = true;
    let out = send
        .run(ctx(&sbx, &obs, true, Some(tickets(10, "a"))))
        .await
        .unwrap();
    assert_eq!(out.outputs["requests"], json!(3));
    assert_eq!(sbx.stats().requests.get("carol_send"), Some(&3));
    // A new type for a field: PUT.
    let mut s = schema_step("t2");
    s.overrides.insert("id".into(), schema::CarolType::String);
    let out = s
        .run(ctx(&sbx, &obs, true, Some(tickets(10, "a"))))
        .await
        .unwrap();
    assert_eq!(out.outputs["action"], json!("updated"));
    assert_eq!(
        sbx.carol_schema("t2").unwrap()["mdmStagingMapping"]["properties"]["id"],
        json!({"type": "string"})
    );
}

#[tokio::test]
async fn retries_faults_and_logs_in_again_after_a_rejected_token() {
    let faults = vec![sandbox::Fault {
        endpoint: "carol_send".into(),
        kind: sandbox::FaultKind::Status { code: 503 },
        rate: 1.0,
        page: None,
        times: Some(2),
    }];
    let sbx = fake(1 << 20, 3600, faults).await;
    let obs = Arc::new(Collect::default());
    schema_step("t3")
        .run(ctx(&sbx, &obs, false, Some(tickets(10, "a"))))
        .await
        .unwrap();
    // The cached token is now refused: the step logs in again once and goes on.
    sbx.carol_expire_tokens();
    let out = send_step("t3")
        .run(ctx(&sbx, &obs, false, Some(tickets(10, "a"))))
        .await
        .unwrap();
    assert_eq!(out.result["retries"], json!(2));
    assert_eq!(sbx.carol_records("t3").len(), 10);
    let logs = obs.0.lock().unwrap().join("\n");
    assert!(logs.contains("HTTP 503"), "{logs}");

    // No schema: Carol's 400, not retried, with its message.
    let err = send_step("nope1")
        .run(ctx(&sbx, &obs, false, Some(tickets(3, "a"))))
        .await
        .unwrap_err();
    assert!(err.message.contains("has no schema"), "{}", err.message);
    assert!(!err.retryable);
    // A bad password: Carol's 401 from the token endpoint.
    let mut c = ctx(&sbx, &obs, false, Some(tickets(3, "a")));
    c.connection.as_mut().unwrap()["password"] = json!("wrong-password");
    c.connection.as_mut().unwrap()["username"] = json!("someone@example.com");
    let err = send_step("t3").run(c).await.unwrap_err();
    assert!(
        err.message.contains("Invalid username or password"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("wrong-password"));
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed() {
    // Tokens valid 10 s (well under the 60 s margin): every request finds the cached one within the 60 s margin, so the
    // client refreshes (refresh tokens rotate; each works once).
    let sbx = fake(4096, 10, vec![]).await;
    let obs = Arc::new(Collect::default());
    // A username unique to this test keeps its token slot its own.
    schema_step("t4")
        .run(ctx(&sbx, &obs, false, Some(tickets(200, "a"))))
        .await
        .unwrap();
    let out = send_step("t4")
        .run(ctx(&sbx, &obs, false, Some(tickets(200, "a"))))
        .await
        .unwrap();
    assert!(out.outputs["requests"].as_u64().unwrap() > 1);
    assert_eq!(sbx.carol_records("t4").len(), 200);
    assert!(sbx.stats().carol.logins >= 3);
}

#[tokio::test]
async fn delete_by_crosswalk() {
    let sbx = fake(1 << 20, 3600, vec![]).await;
    let obs = Arc::new(Collect::default());
    schema_step("t5")
        .run(ctx(&sbx, &obs, true, Some(tickets(10, "a"))))
        .await
        .unwrap();
    send_step("t5")
        .run(ctx(&sbx, &obs, true, Some(tickets(10, "a"))))
        .await
        .unwrap();
    let keys = DataFrame::new(vec![Column::new("id".into(), [2i64, 4, 99])]).unwrap();
    let out = CarolDelete {
        table: "t5".into(),
        propagate_cleanup: true,
        crosswalk_name: None,
        batch_size: Some(2),
    }
    .run(ctx(&sbx, &obs, true, Some(keys)))
    .await
    .unwrap();
    assert_eq!(out.outputs["requests"], json!(2));
    let ids: Vec<i64> = sbx
        .carol_records("t5")
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3, 5, 6, 7, 8, 9, 10]);
    assert_eq!(sbx.stats().carol.records_deleted, 2);
}

struct History;
impl HistoryView for History {
    fn rows_since(
        &self,
        pipeline: &str,
        step_type: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, String> {
        assert_eq!((pipeline, step_type), ("carol-staging", "carol.send"));
        let ago = chrono::Utc::now() - since;
        Ok(if ago.num_minutes() <= 61 { 120 } else { 5000 })
    }
}

#[tokio::test]
async fn heartbeat_with_counts_from_history() {
    let sbx = fake(1 << 20, 3600, vec![]).await;
    let obs = Arc::new(Collect::default());
    let mut c = ctx(&sbx, &obs, false, None);
    c.history = Some(Arc::new(History));
    let mut extra = indexmap::IndexMap::new();
    extra.insert("freeSpace".to_string(), json!("1000"));
    let out = CarolHeartbeat {
        databases: Some(vec![json!({"database": "SQLite", "version": "3"})]),
        start_time: None,
        step_type: None,
        extra,
    }
    .run(c)
    .await
    .unwrap();
    assert_eq!(out.outputs["record_count_last_hour"], json!(120));
    let v = sbx.values();
    let hb = sbx
        .carol_heartbeat(v["carol"]["connector_id"].as_str().unwrap())
        .unwrap();
    let d = &hb["mdmHeartbeatData"];
    assert_eq!(d["recordCountLastHour"], json!("120"));
    assert_eq!(d["recordCountLast24Hours"], json!("5000"));
    assert_eq!(d["hostAddress"], json!("127.0.0.1"));
    assert_eq!(d["databases"][0]["database"], json!("SQLite"));
    assert_eq!(d["freeSpace"], json!("1000"));
    assert!(d["timezone"].as_str().unwrap().starts_with("GMT"));
    assert_eq!(hb["mdmEntityType"], json!("mdmHeartbeat"));
}

#[tokio::test]
async fn the_fake_speaks_carols_wire() {
    let sbx = fake(1 << 20, 3600, vec![]).await;
    let v = sbx.values();
    let c = &v["carol"];
    let base = sbx.carol_url();
    let http = reqwest::Client::new();
    let tok: Value = http
        .post(format!("{base}/api/v2/oauth2/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", c["username"].as_str().unwrap()),
            ("password", c["password"].as_str().unwrap()),
            ("subdomain", c["tenant"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = tok["access_token"].as_str().unwrap();
    assert_eq!(tok["token_type"], json!("bearer"));
    let get = |auth: String| {
        http.get(format!("{base}/api/v1/tenants/current"))
            .header("authorization", auth)
            .send()
    };
    assert_eq!(get(access.to_string()).await.unwrap().status(), 200);
    let bearer = get(format!("Bearer {access}")).await.unwrap();
    assert_eq!(bearer.status(), 401);
    let err: Value = bearer.json().await.unwrap();
    assert!(err["errorMessage"].is_string() && err.get("possibleResponsibleField").is_some());
    let details = http
        .get(format!(
            "{base}/api/v1/oauth2/token/{access}/userAccessDetails"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(details.status(), 200);
    let limit: Value = http
        .get(format!("{base}/api/v3/staging/sendingLimit"))
        .header("authorization", access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limit, json!({"quantity": 1, "unit": "MEGABYTES"}));
    // Refresh tokens rotate: the second use fails.
    let refresh = tok["refresh_token"].as_str().unwrap();
    let again = |r: &str| {
        http.post(format!("{base}/api/v1/oauth2/token"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", r)])
            .send()
    };
    assert_eq!(again(refresh).await.unwrap().status(), 200);
    assert_eq!(again(refresh).await.unwrap().status(), 400);
    // A body above the limit: 413.
    let sbx2 = fake(1000, 3600, vec![]).await;
    let v2 = sbx2.values();
    let big = http
        .post(format!(
            "{}/api/v2/staging/tables/x1?connectorId={}",
            sbx2.carol_url(),
            v2["carol"]["connector_id"].as_str().unwrap()
        ))
        .header("x-auth-key", v2["carol"]["api_key"].as_str().unwrap())
        .header(
            "x-auth-connectorid",
            v2["carol"]["connector_id"].as_str().unwrap(),
        )
        .body(vec![b' '; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    // Bodies above axum's 2 MB default reach the handler (here: no schema, so Carol's 400).
    let sbx3 = fake(8 << 20, 3600, vec![]).await;
    let v3 = sbx3.values();
    let records: Vec<Value> = (0..40_000)
        .map(|i| json!({"id": i, "text": "x".repeat(60)}))
        .collect();
    let three_mb = serde_json::to_vec(&records).unwrap();
    assert!(three_mb.len() > 3 << 20);
    let resp = http
        .post(format!("{}/api/v2/staging/tables/x1", sbx3.carol_url()))
        .header("x-auth-key", v3["carol"]["api_key"].as_str().unwrap())
        .header(
            "x-auth-connectorid",
            v3["carol"]["connector_id"].as_str().unwrap(),
        )
        .body(three_mb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["errorMessage"]
            .as_str()
            .unwrap()
            .contains("has no schema"),
        "{err}"
    );
    let dump: Value = http
        .get(format!("{}/__sandbox/carol", sbx2.carol_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dump["stats"]["rejected_too_large"], json!(1));
}
