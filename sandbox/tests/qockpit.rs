//! The QOCKPIT fake and the demo database over real HTTP: what `qockpit-kpi.py` does (ping,
//! list the integrations, run each SQL for a month on the customer's database, post the
//! rows), done by hand.

use reqwest::{Client, StatusCode};
use sandbox::{Fault, FaultKind, Options, Sandbox};
use serde_json::{json, Value};
use std::time::Duration;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

struct Qockpit {
    base: String,
    token: String,
}

impl Qockpit {
    fn of(sb: &Sandbox) -> Qockpit {
        let v = sb.values();
        let q = &v["qockpit"];
        assert_eq!(q["base_endpoint"], sb.qockpit_url());
        Qockpit {
            base: format!(
                "{}/{}",
                q["base_endpoint"].as_str().unwrap(),
                q["domain"].as_str().unwrap()
            ),
            token: q["api_token"].as_str().unwrap().to_string(),
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = client()
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Token {}", self.token))
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn post(&self, id: &str, body: &str) -> (StatusCode, Value) {
        let r = client()
            .post(format!("{}/integrations/{id}/results", self.base))
            .header("Authorization", format!("Token {}", self.token))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }
}

/// Run an integration's SQL for `period` the way the client must: `:inicio` and `:fim`
/// bound to the first day of the month and of the next.
fn run_sql(db: &std::path::Path, sql: &str, inicio: &str, fim: &str) -> Vec<Value> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c.prepare(sql).unwrap();
    let names: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
    let rows = st
        .query_map(&[(":inicio", inicio), (":fim", fim)], |r| {
            let mut o = serde_json::Map::new();
            for (i, n) in names.iter().enumerate() {
                let v = match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(n) => json!(n),
                    rusqlite::types::ValueRef::Real(f) => json!(f),
                    rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                    rusqlite::types::ValueRef::Blob(_) => Value::Null,
                };
                o.insert(n.clone(), v);
            }
            Ok(Value::Object(o))
        })
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

#[tokio::test]
async fn qockpit_kpi_round_trip_on_the_demo_db() {
    let sb = Sandbox::start(Options::default()).await.unwrap();
    assert!(sb.demo_db().exists());
    assert_eq!(
        sb.values()["demo_db"]["path"],
        sb.demo_db().display().to_string()
    );
    let q = Qockpit::of(&sb);
    assert!(q.base.starts_with("http://127.0.0.1:"), "{}", q.base);
    assert!(sb.qockpit_url().ends_with("/api"));

    let (s, v) = q.get("/ping").await;
    assert_eq!(s, 200);
    assert_eq!(v["ok"], true);
    assert_eq!(v["domain"], sb.values()["qockpit"]["domain"]);

    let (s, list) = q.get("/integrations?type=kpi").await;
    assert_eq!(s, 200);
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 3);
    for (n, i) in list.iter().enumerate() {
        assert_eq!(i["id"], n as u64 + 1);
        assert_eq!(i["source"], "default");
        assert!(i["name"].is_string() && i["indicator"].is_string());
        let sql = i["sql"].as_str().unwrap();
        assert!(sql.contains(":inicio") && sql.contains(":fim"), "{sql}");
        // Every SQL runs on the demo database and finds data in 2019-01 and 2025-12.
        for (inicio, fim) in [("2019-01-01", "2019-02-01"), ("2025-12-01", "2026-01-01")] {
            let rows = run_sql(sb.demo_db(), sql, inicio, fim);
            assert!(!rows.is_empty(), "{sql} {inicio}");
            let first = rows[0].as_object().unwrap();
            assert!(
                first.values().any(|v| v.as_f64().is_some_and(|x| x > 0.0)),
                "{sql}: {rows:?}"
            );
        }
    }
    let (_, none) = q.get("/integrations?type=other").await;
    assert_eq!(none, json!([]));

    // Post the rows for 2019-01, then re-send: the period is replaced.
    let rows = run_sql(
        sb.demo_db(),
        list[0]["sql"].as_str().unwrap(),
        "2019-01-01",
        "2019-02-01",
    );
    let body = json!({"period": "2019-01", "rows": rows}).to_string();
    let (s, v) = q.post("1", &body).await;
    assert_eq!(s, 201);
    assert_eq!(v, json!({"received": rows.len()}));
    let (s, v) = q
        .post(
            "1",
            r#"{"period":"2019-01","rows":[{"filial":"X","faturamento":1.5}]}"#,
        )
        .await;
    assert_eq!((s, v), (StatusCode::CREATED, json!({"received": 1})));
    let (s, _) = q.post("3", r#"{"period":"2025-12","rows":[]}"#).await;
    assert_eq!(s, 201);
    let results = sb.qockpit_results();
    assert_eq!(
        results["1"]["2019-01"]["rows"],
        json!([{"filial":"X","faturamento":1.5}])
    );
    assert_eq!(results["1"]["2019-01"]["posts"], 2);
    assert_eq!(results["3"]["2025-12"]["received"], 0);
    let over_http: Value = client()
        .get(format!(
            "{}/__sandbox/qockpit",
            sb.qockpit_url().trim_end_matches("/api")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, results);

    let stats = sb.stats();
    assert_eq!(stats.requests["qockpit_ping"], 1);
    assert_eq!(stats.requests["qockpit_integrations"], 2);
    assert_eq!(stats.requests["qockpit_results"], 3);
    sb.shutdown().await;
}

#[tokio::test]
async fn qockpit_refuses_bad_tokens_domains_and_bodies() {
    let sb = Sandbox::start(Options::default()).await.unwrap();
    let q = Qockpit::of(&sb);
    for auth in [
        None,
        Some("Token wrong".to_string()),
        Some(format!("Bearer {}", q.token)),
    ] {
        let mut rb = client().get(format!("{}/ping", q.base));
        if let Some(a) = auth {
            rb = rb.header("Authorization", a);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"detail": "invalid token"})
        );
    }
    let other = Qockpit {
        base: format!("{}/outra", sb.qockpit_url()),
        token: q.token.clone(),
    };
    assert_eq!(
        other.get("/ping").await,
        (StatusCode::NOT_FOUND, json!({"detail": "not found"}))
    );
    let (s, v) = q.post("99", r#"{"period":"2019-01","rows":[]}"#).await;
    assert_eq!(
        (s, v),
        (StatusCode::NOT_FOUND, json!({"detail": "not found"}))
    );
    for bad in [
        "not json",
        "[]",
        r#"{"rows":[]}"#,
        r#"{"period":"2019-13","rows":[]}"#,
        r#"{"period":"2019-1","rows":[]}"#,
        r#"{"period":201901,"rows":[]}"#,
        r#"{"period":"2019-01"}"#,
        r#"{"period":"2019-01","rows":{"a":1}}"#,
        r#"{"period":"2019-01","rows":[1,2]}"#,
    ] {
        let (s, v) = q.post("1", bad).await;
        assert_eq!(s, 400, "{bad}");
        assert!(v["detail"].is_string(), "{bad}: {v}");
    }
    assert_eq!(sb.qockpit_results(), json!({}));
    sb.shutdown().await;
}

#[tokio::test]
async fn qockpit_faults_use_the_sandbox_machinery() {
    let sb = Sandbox::start(Options {
        faults: vec![Fault {
            endpoint: "qockpit".into(),
            kind: FaultKind::Status { code: 503 },
            rate: 1.0,
            page: None,
            times: Some(1),
        }],
        ..Options::default()
    })
    .await
    .unwrap();
    let q = Qockpit::of(&sb);
    let body = r#"{"period":"2019-02","rows":[{"a":1}]}"#;
    let (s, v) = q.post("2", body).await;
    assert_eq!(s, 503);
    assert!(v["detail"].is_string(), "{v}");
    assert_eq!(q.post("2", body).await.0, 201);
    assert_eq!(q.get("/ping").await.0, 503);
    assert_eq!(q.get("/ping").await.0, 200);
    assert_eq!(sb.stats().requests["qockpit_results"], 2);
    assert_eq!(sb.qockpit_results()["2"]["2019-02"]["posts"], 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn demo_db_follows_the_seed() {
    let read = |p: &std::path::Path| -> String {
        let c = rusqlite::Connection::open(p).unwrap();
        c.query_row(
            "SELECT group_concat(cgc || nome_emit, ',') FROM emitente",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let a = Sandbox::start(Options::default()).await.unwrap();
    let b = Sandbox::start(Options::default()).await.unwrap();
    let c = Sandbox::start(Options {
        seed: 7,
        ..Options::default()
    })
    .await
    .unwrap();
    assert_eq!(read(a.demo_db()), read(b.demo_db()));
    assert_ne!(read(a.demo_db()), read(c.demo_db()));
    assert_ne!(
        a.values()["qockpit"]["api_token"],
        c.values()["qockpit"]["api_token"]
    );
}
