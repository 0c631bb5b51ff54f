//! End-to-end tests of the fakes over real HTTP, with the same client (reqwest) the
//! pipeline steps use.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Client, StatusCode};
use sandbox::{Fault, FaultKind, Options, Sandbox};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn opts() -> Options {
    Options {
        otp_delay_ms: 50,
        ..Options::default()
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn key(sb: &Sandbox) -> Value {
    serde_json::from_str(&std::fs::read_to_string(sb.key_file()).unwrap()).unwrap()
}

fn jwt(sb: &Sandbox, claims: Value) -> String {
    let k = key(sb);
    let enc = EncodingKey::from_rsa_pem(k["private_key"].as_str().unwrap().as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &enc).unwrap()
}

fn claims(sb: &Sandbox, scope: &str) -> Value {
    let k = key(sb);
    let now = chrono::Utc::now().timestamp();
    json!({"iss": k["client_email"], "aud": k["token_uri"], "scope": scope, "iat": now, "exp": now + 3600})
}

async fn exchange(sb: &Sandbox, assertion: &str) -> reqwest::Response {
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", assertion),
    ];
    client()
        .post(format!("{}/token", sb.google_url()))
        .form(&form)
        .send()
        .await
        .unwrap()
}

async fn google_token(sb: &Sandbox, scope: &str) -> String {
    let r = exchange(sb, &jwt(sb, claims(sb, scope))).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 3599);
    assert_eq!(v["token_type"], "Bearer");
    v["access_token"].as_str().unwrap().to_string()
}

const SHEETS: &str = "https://www.googleapis.com/auth/spreadsheets";

async fn read_range(sb: &Sandbox, token: &str, sheet: &str, range: &str) -> (StatusCode, Value) {
    let url = format!(
        "{}/v4/spreadsheets/{sheet}/values/{range}?alt=json",
        sb.google_url()
    );
    let r = client().get(url).bearer_auth(token).send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

/// Log in through both factors, reading the OTP from the sheet as a pipeline would.
async fn login(sb: &Sandbox) -> String {
    let v = sb.values();
    let c = client();
    let base = sb.tiflux_url();
    let r = c
        .post(format!("{base}/api/login"))
        .json(&json!({"email": v["tiflux"]["user"], "password": v["tiflux"]["password"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tmp = r.json::<Value>().await.unwrap()["tmp"]
        .as_str()
        .unwrap()
        .to_string();
    let gt = google_token(sb, &format!("{SHEETS}.readonly")).await;
    let sheet = v["sheets"]["otp_spreadsheet"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let otp = loop {
        let (status, body) = read_range(sb, &gt, sheet, "OTP!A2:B2").await;
        assert_eq!(status, 200, "{body}");
        if let Some(row) = body["values"][0].as_array() {
            break row[0].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the OTP never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = c
        .post(format!("{base}/api/login/otp"))
        .json(&json!({"tmp": tmp, "otp": otp}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["authorization"].to_str().unwrap().to_string()
}

async fn tickets(sb: &Sandbox, auth: &str, query: &str) -> reqwest::Response {
    client()
        .get(format!("{}/api/v2/tickets?{query}", sb.tiflux_url()))
        .header("authorization", auth)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn login_otp_tickets_logout() {
    let sb = Sandbox::start(Options {
        // Long enough that a loaded machine still reads the sheet before the OTP lands.
        otp_delay_ms: 1500,
        ..Options::default()
    })
    .await
    .unwrap();
    let v = sb.values();
    let c = client();
    let base = sb.tiflux_url();
    assert_eq!(v["google"]["sheets_url"], format!("{}/", sb.google_url()));
    assert_eq!(v["sheets"]["otp_range"], "OTP!A2:B2");
    assert_eq!(key(&sb)["token_uri"], format!("{}/token", sb.google_url()));

    let r = c
        .post(format!("{base}/api/login"))
        .json(&json!({"email": v["tiflux"]["user"], "password": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "invalid_credentials"})
    );

    let before = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let r = c
        .post(format!("{base}/api/login"))
        .json(&json!({"email": v["tiflux"]["user"], "password": v["tiflux"]["password"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tmp = r.json::<Value>().await.unwrap()["tmp"]
        .as_str()
        .unwrap()
        .to_string();

    // Not there before the delay, there after it.
    let gt = google_token(&sb, SHEETS).await;
    let sheet = v["sheets"]["otp_spreadsheet"].as_str().unwrap().to_string();
    let (_, body) = read_range(&sb, &gt, &sheet, "OTP!A2:B2").await;
    assert!(body.get("values").is_none(), "{body}");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let (_, body) = read_range(&sb, &gt, &sheet, "OTP!A2:B2").await;
    assert_eq!(body["range"], "OTP!A2:B2");
    let otp = body["values"][0][0].as_str().unwrap().to_string();
    let sent_at = body["values"][0][1].as_str().unwrap().to_string();
    assert_eq!(otp.len(), 6);
    assert!(otp.chars().all(|c| c.is_ascii_digit()));
    assert!(chrono::DateTime::parse_from_rfc3339(&sent_at).is_ok() && sent_at.ends_with('Z'));
    assert!(sent_at > before, "{sent_at} sorts after {before}");
    let (_, header) = read_range(&sb, &gt, &sheet, "OTP!A1:B1").await;
    assert_eq!(header["values"], json!([["code", "received_at"]]));

    let wrong = if otp == "000000" { "111111" } else { "000000" };
    let r = c
        .post(format!("{base}/api/login/otp"))
        .json(&json!({"tmp": tmp, "otp": wrong}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "invalid_otp"})
    );
    let r = c
        .post(format!("{base}/api/login/otp"))
        .json(&json!({"tmp": tmp, "otp": otp}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let auth = r.headers()["authorization"].to_str().unwrap().to_string();
    assert!(auth.starts_with("Bearer "));
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
    let r = c
        .post(format!("{base}/api/login/otp"))
        .json(&json!({"tmp": tmp, "otp": otp}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a used OTP is refused");

    let r = c
        .get(format!("{base}/api/v2/tickets"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "invalid_token"})
    );
    let r = tickets(&sb, &auth, "").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-total-items"], "1000");
    assert!(r.headers().contains_key("ratelimit-remaining"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(r.headers()["ratelimit-reset"].to_str().unwrap())
            .is_ok()
    );
    let page: Vec<Value> = r.json().await.unwrap();
    assert_eq!(page.len(), 20);
    let t = &page[0];
    for field in [
        "ticket_number",
        "title",
        "description",
        "is_closed",
        "created_at",
        "updated_at",
        "closed_at",
        "status",
        "stage",
        "priority",
        "desk",
        "client",
        "responsible",
        "requestor",
        "services_catalog",
        "sla_info",
        "tags",
        "followers",
        "worked_hours",
        "reopen_count",
    ] {
        assert!(t.get(field).is_some(), "missing {field} in {t}");
    }
    assert!(t["created_at"].as_str().unwrap().ends_with("-03:00"));
    assert_eq!(sb.stats().live_tokens, 1);

    let r = c
        .post(format!("{base}/api/logout"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(tickets(&sb, &auth, "").await.status(), 401);
    let stats: Value = c
        .get(format!("{base}/__sandbox/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["logins"], 1);
    assert_eq!(stats["logouts"], 1);
    assert_eq!(stats["live_tokens"], 0);
    assert_eq!(stats["requests"]["tickets"], 3);
    assert_eq!(stats["max_in_flight"]["tickets"], 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn pagination_totals_filters_and_determinism() {
    let sb = Sandbox::start(opts()).await.unwrap();
    let auth = login(&sb).await;
    let mut all = Vec::new();
    for page in 1.. {
        let r = tickets(&sb, &auth, &format!("offset={page}&limit=200")).await;
        assert_eq!(r.headers()["x-total-items"], "1000");
        let rows: Vec<Value> = r.json().await.unwrap();
        let n = rows.len();
        all.extend(rows);
        if n < 200 {
            break;
        }
    }
    assert_eq!(all.len(), 1000);
    let numbers: Vec<u64> = all
        .iter()
        .map(|t| t["ticket_number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]));
    for t in &all {
        assert_eq!(t["is_closed"].as_bool().unwrap(), !t["closed_at"].is_null());
        assert!((1..=4).contains(&t["status"]["id"].as_u64().unwrap()));
    }
    let r = tickets(&sb, &auth, "limit=201").await;
    assert_eq!(r.status(), 422);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(tickets(&sb, &auth, "offset=0").await.status(), 422);
    let ids: Vec<String> = (1..=16).map(|i| i.to_string()).collect();
    assert_eq!(
        tickets(&sb, &auth, &format!("desk_ids={}", ids.join(",")))
            .await
            .status(),
        422
    );

    // A created_at window, with offsets.
    let (start, end) = ("2025-06-01T00:00:00-03:00", "2025-06-30T23:59:59-03:00");
    let in_window = |t: &&Value| {
        let c = chrono::DateTime::parse_from_rfc3339(t["created_at"].as_str().unwrap()).unwrap();
        c >= chrono::DateTime::parse_from_rfc3339(start).unwrap()
            && c <= chrono::DateTime::parse_from_rfc3339(end).unwrap()
    };
    let expected = all.iter().filter(in_window).count();
    let q = format!(
        "limit=200&start_datetime={}&end_datetime={}",
        start.replace('+', "%2B"),
        end
    );
    let r = tickets(&sb, &auth, &q).await;
    assert_eq!(r.headers()["x-total-items"], expected.to_string().as_str());
    let rows: Vec<Value> = r.json().await.unwrap();
    assert_eq!(rows.len(), expected);
    assert!(rows.iter().all(|t| in_window(&t)));

    let open = all
        .iter()
        .filter(|t| !t["is_closed"].as_bool().unwrap())
        .count();
    let r = tickets(&sb, &auth, "filter_by=open&limit=5").await;
    assert_eq!(r.headers()["x-total-items"], open.to_string().as_str());

    // Same seed: byte-identical pages; another seed: different.
    let page = |sb: &Sandbox, auth: String| {
        let url = format!("{}/api/v2/tickets?offset=3&limit=50", sb.tiflux_url());
        async move {
            client()
                .get(url)
                .header("authorization", auth)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    };
    let sb2 = Sandbox::start(opts()).await.unwrap();
    let auth2 = login(&sb2).await;
    assert_eq!(page(&sb, auth.clone()).await, page(&sb2, auth2).await);
    let sb3 = Sandbox::start(Options { seed: 7, ..opts() }).await.unwrap();
    let auth3 = login(&sb3).await;
    assert_ne!(page(&sb, auth).await, page(&sb3, auth3).await);
}

#[tokio::test]
async fn a_million_tickets_are_lazy() {
    let started = Instant::now();
    let sb = Sandbox::start(Options {
        tickets: 1_000_000,
        ..opts()
    })
    .await
    .unwrap();
    let auth = login(&sb).await;
    let r = tickets(&sb, &auth, "offset=5000&limit=200").await;
    assert_eq!(r.headers()["x-total-items"], "1000000");
    let rows: Vec<Value> = r.json().await.unwrap();
    assert_eq!(rows.len(), 200);
    assert_eq!(rows[199]["ticket_number"], 10_000 + 1_000_000);
    let r = tickets(
        &sb,
        &auth,
        "start_datetime=2025-12-01T00:00:00Z&end_datetime=2025-12-01T23:59:59Z",
    )
    .await;
    let total: u64 = r.headers()["x-total-items"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2000..4000).contains(&total), "{total}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn fault(endpoint: &str, kind: FaultKind) -> Fault {
    Fault {
        endpoint: endpoint.into(),
        kind,
        rate: 1.0,
        page: None,
        times: Some(1),
    }
}

async fn with_fault(f: Fault) -> (Sandbox, String) {
    let sb = Sandbox::start(Options {
        faults: vec![f],
        ..opts()
    })
    .await
    .unwrap();
    let auth = login(&sb).await;
    (sb, auth)
}

#[tokio::test]
async fn fault_status_then_recovery() {
    let (sb, auth) = with_fault(fault("tickets", FaultKind::Status { code: 503 })).await;
    let r = tickets(&sb, &auth, "offset=1").await;
    assert_eq!(r.status(), 503);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(
        tickets(&sb, &auth, "offset=1").await.status(),
        200,
        "times: 1 fails only the first attempt"
    );
    assert_eq!(sb.stats().requests["tickets"], 2);
}

#[tokio::test]
async fn fault_retry_after() {
    let (sb, auth) = with_fault(fault(
        "tickets",
        FaultKind::RetryAfterSeconds { seconds: 7 },
    ))
    .await;
    let r = tickets(&sb, &auth, "").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");

    let (sb, auth) = with_fault(fault("tickets", FaultKind::RetryAfterDate { seconds: 30 })).await;
    let r = tickets(&sb, &auth, "").await;
    assert_eq!(r.status(), 429);
    let date = r.headers()["retry-after"].to_str().unwrap().to_string();
    let at = chrono::DateTime::parse_from_rfc2822(&date).unwrap();
    let delta = at.timestamp() - chrono::Utc::now().timestamp();
    assert!((25..=31).contains(&delta), "{date}");
    assert!(date.ends_with(" GMT"));
}

#[tokio::test]
async fn fault_reset_and_truncate() {
    let (sb, auth) = with_fault(fault("tickets", FaultKind::Reset)).await;
    let err = client()
        .get(format!("{}/api/v2/tickets", sb.tiflux_url()))
        .header("authorization", &auth)
        .send()
        .await;
    assert!(err.is_err(), "no response: {err:?}");
    assert_eq!(tickets(&sb, &auth, "").await.status(), 200);

    let (sb, auth) = with_fault(fault("tickets", FaultKind::Truncate)).await;
    let r = tickets(&sb, &auth, "").await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the body is cut short");
    assert_eq!(
        tickets(&sb, &auth, "")
            .await
            .json::<Vec<Value>>()
            .await
            .unwrap()
            .len(),
        20
    );
}

#[tokio::test]
async fn fault_slow_body_latency_unauthorized() {
    let (sb, auth) = with_fault(fault("tickets", FaultKind::SlowBody { ms: 40 })).await;
    let t = Instant::now();
    let rows: Vec<Value> = tickets(&sb, &auth, "").await.json().await.unwrap();
    assert_eq!(rows.len(), 20);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    let (sb, auth) = with_fault(fault("tickets", FaultKind::Latency { ms: 250 })).await;
    let t = Instant::now();
    assert_eq!(tickets(&sb, &auth, "").await.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(250));

    let (sb, auth) = with_fault(fault("tickets", FaultKind::Unauthorized)).await;
    let r = tickets(&sb, &auth, "").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "invalid_token"})
    );
}

#[tokio::test]
async fn fault_page_rate_and_other_endpoints() {
    let f = Fault {
        page: Some(2),
        times: None,
        ..fault("tickets", FaultKind::Status { code: 500 })
    };
    let (sb, auth) = with_fault(f).await;
    assert_eq!(tickets(&sb, &auth, "offset=1").await.status(), 200);
    assert_eq!(tickets(&sb, &auth, "offset=2").await.status(), 500);
    assert_eq!(tickets(&sb, &auth, "offset=2").await.status(), 500);

    // A rate is deterministic: the same pages fail in two sandboxes.
    let f = Fault {
        rate: 0.5,
        times: None,
        ..fault("tickets", FaultKind::Status { code: 502 })
    };
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let (sb, auth) = with_fault(f.clone()).await;
        let mut o = Vec::new();
        for p in 1..=20 {
            o.push(
                tickets(&sb, &auth, &format!("offset={p}"))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        outcomes.push(o);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert!(
        outcomes[0].contains(&502) && outcomes[0].contains(&200),
        "{:?}",
        outcomes[0]
    );

    // Sheets faults answer in Google's error shape; login faults in the login shape.
    let sb = Sandbox::start(Options {
        faults: vec![
            fault("sheets", FaultKind::Status { code: 503 }),
            fault("login", FaultKind::Status { code: 500 }),
        ],
        ..opts()
    })
    .await
    .unwrap();
    let gt = google_token(&sb, SHEETS).await;
    let id = sb.values()["sheets"]["otp_spreadsheet"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = read_range(&sb, &gt, &id, "OTP!A2:B2").await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["status"], "UNAVAILABLE");
    assert_eq!(body["error"]["errors"][0]["domain"], "global");
    let v = sb.values();
    let r = client()
        .post(format!("{}/api/login", sb.tiflux_url()))
        .json(&json!({"email": v["tiflux"]["user"], "password": v["tiflux"]["password"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(login(&sb).await.len() > 7, "the retry logs in");
}

#[tokio::test]
async fn token_endpoint_verifies_the_jwt() {
    let sb = Sandbox::start(opts()).await.unwrap();
    google_token(&sb, SHEETS).await;

    // Tampered payload, original signature.
    let good = jwt(&sb, claims(&sb, SHEETS));
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = claims(&sb, SHEETS);
    c["scope"] = json!("https://www.googleapis.com/auth/cloud-platform");
    let other = jwt(&sb, c);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    let r = exchange(&sb, &forged).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_grant");
    assert_eq!(v["error_description"], "Invalid JWT Signature.");

    // HS256 with some secret.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&sb, SHEETS),
        &EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    assert_eq!(
        exchange(&sb, &hs).await.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );

    let mut c = claims(&sb, SHEETS);
    c["aud"] = json!("https://example.com/token");
    let v: Value = exchange(&sb, &jwt(&sb, c)).await.json().await.unwrap();
    assert_eq!(v["error"], "invalid_grant");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("audience"),
        "{v}"
    );

    let mut c = claims(&sb, SHEETS);
    c["iss"] = json!("someone@else.iam.gserviceaccount.com");
    assert_eq!(exchange(&sb, &jwt(&sb, c)).await.status(), 400);

    let mut c = claims(&sb, SHEETS);
    let now = chrono::Utc::now().timestamp();
    c["iat"] = json!(now - 7200);
    c["exp"] = json!(now - 3600);
    let v: Value = exchange(&sb, &jwt(&sb, c)).await.json().await.unwrap();
    assert_eq!(v["error"], "invalid_grant");

    let r = client()
        .post(format!("{}/token", sb.google_url()))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
}

#[tokio::test]
async fn sheets_values_api() {
    let sb = Sandbox::start(opts()).await.unwrap();
    let id = sb.values()["sheets"]["otp_spreadsheet"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 44);
    let (status, body) = read_range(&sb, "nope", &id, "OTP!A1").await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");

    let rw = google_token(&sb, SHEETS).await;
    let ro = google_token(&sb, &format!("{SHEETS}.readonly")).await;
    let (status, body) = read_range(&sb, &ro, "unknown", "OTP!A1").await;
    assert_eq!(
        (status.as_u16(), body["error"]["status"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let (status, body) = read_range(&sb, &ro, "forbidden", "OTP!A1").await;
    assert_eq!(
        (status.as_u16(), body["error"]["status"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let (status, body) = read_range(&sb, &ro, &id, "Nope!A1").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["message"], "Unable to parse range: Nope!A1");
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    let (status, _) = read_range(&sb, &ro, &id, "OTP!1A").await;
    assert_eq!(status, 400);

    let put = |token: &str, range: &str, body: Value| {
        let url = format!(
            "{}/v4/spreadsheets/{id}/values/{range}?valueInputOption=RAW&alt=json",
            sb.google_url()
        );
        let req = client().put(url).bearer_auth(token).json(&body);
        async move { req.send().await.unwrap() }
    };
    let r = put(&ro, "OTP!D1", json!({"values": [["x"]]})).await;
    assert_eq!(r.status(), 403, "read-only scope cannot write");
    let r = put(&rw, "OTP!D1:E3", json!({"range": "OTP!D1:E3", "majorDimension": "ROWS", "values": [["a", "b"], ["c", ""], ["", ""]]})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["updatedRange"], "OTP!D1:E3");
    assert_eq!(v["updatedCells"], 6);
    let r = put(&rw, "OTP!D1:E1", json!({"values": [["a", "b", "c"]]})).await;
    assert_eq!(r.status(), 400, "more columns than the range");

    // Trailing empty cells and rows are omitted; percent-encoded ranges decode.
    let (status, body) = read_range(&sb, &ro, &id, "OTP%21D1%3AE5").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"range": "OTP!D1:E5", "majorDimension": "ROWS", "values": [["a", "b"], ["c"]]})
    );
    let url = format!(
        "{}/v4/spreadsheets/{id}/values/OTP!D1:E5?majorDimension=COLUMNS",
        sb.google_url()
    );
    let body: Value = client()
        .get(url)
        .bearer_auth(&ro)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["values"], json!([["a", "c"], ["b"]]));
    let (_, body) = read_range(&sb, &ro, &id, "OTP!G10:H12").await;
    assert!(body.get("values").is_none());
    // A1 without a sheet is the first sheet; a bare sheet name is the whole sheet.
    let (_, body) = read_range(&sb, &ro, &id, "A1:B1").await;
    assert_eq!(body["values"], json!([["code", "received_at"]]));
    let (_, body) = read_range(&sb, &ro, &id, "OTP").await;
    assert_eq!(body["range"], "OTP!A1:Z1000");
    assert_eq!(
        body["values"][0],
        json!(["code", "received_at", "", "a", "b"])
    );
}
