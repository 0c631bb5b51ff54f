//! The REST API through the real binary: `pipe serve --listen` and reqwest.
//!
//! Every endpoint of the OpenAPI document is walked with no token (401), a too-small role
//! (403) and enough of a role (never 401, 403 or 5xx), on SQLite and PostgreSQL; the table
//! of endpoints must list exactly the document's operations, so a new endpoint cannot be
//! left out. JWTs are checked for `alg: none`, other algorithms, tampering and expiry;
//! failed logins are limited; params are typed (422 naming the param); a triggered run is
//! watched through the live event stream and its log stream; the checked-in OpenAPI
//! document must match what the server serves.

use crate::util::{Daemon, Env};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(120);
const ADMIN_PASSWORD: &str = "admin-password-1";
/// 32 bytes, hex: the credentials' master key of these servers.
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

struct Api {
    server: Daemon,
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    /// `pipe serve pipelines --listen 127.0.0.1:0` with the first admin `admin`.
    fn start(env: &Env, db: Option<&str>) -> Api {
        let pipelines = env.path().join("pipelines");
        std::fs::create_dir_all(&pipelines).unwrap();
        std::fs::copy(
            crate::util::repo_root().join("pipelines/hello.yaml"),
            pipelines.join("hello.yaml"),
        )
        .unwrap();
        let mut args = vec![
            "serve",
            "pipelines",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--init-admin",
            "admin",
        ];
        if let Some(url) = db {
            args.extend(["--db", url]);
        }
        let server = Daemon::spawn(
            env,
            "serve",
            &args,
            &[
                ("PIPE_INIT_ADMIN_PASSWORD", ADMIN_PASSWORD),
                ("PIPE_MASTER_KEY", MASTER_KEY),
            ],
        );
        let until = Instant::now() + PATIENCE;
        let base = loop {
            let log = server.output();
            if let Some(rest) = log.split("API on http://").nth(1) {
                let addr = rest.split("/api/v1/").next().unwrap().to_string();
                break format!("http://{addr}");
            }
            assert!(Instant::now() < until, "the API did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        };
        Api {
            server,
            base,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn login(&self, user: &str, password: &str) -> String {
        let (s, v) = self.call(
            "POST",
            "/api/v1/token/",
            None,
            Some(&json!({"username": user, "password": password})),
        );
        assert_eq!(s, 200, "login as {user}: {v}");
        v["access"].as_str().unwrap().to_string()
    }

    fn wait<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}; server log:\n{}",
                self.server.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Tokens for each role: admin (from --init-admin), operator and viewer (added by the
/// admin through the API), and a machine token with the viewer role.
struct Tokens {
    admin: String,
    operator: String,
    viewer: String,
    machine_viewer: String,
}

fn tokens(api: &Api) -> Tokens {
    let admin = api.login("admin", ADMIN_PASSWORD);
    for (name, role) in [("olga", "operator"), ("vera", "viewer")] {
        let (s, v) = api.call(
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(&json!({"name": name, "role": role, "password": format!("{name}-password")})),
        );
        assert_eq!(s, 201, "{v}");
        assert!(v.get("password_hash").is_none(), "{v}");
    }
    let (s, t) = api.call(
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(&json!({"name": "grafana", "role": "viewer"})),
    );
    assert_eq!(s, 201, "{t}");
    let machine = t["token"].as_str().unwrap().to_string();
    assert!(machine.starts_with("pipe_"));
    // Shown once: the list never has it.
    let (_, list) = api.call("GET", "/api/v1/tokens", Some(&admin), None);
    assert!(!list.to_string().contains(&machine), "{list}");
    Tokens {
        operator: api.login("olga", "olga-password"),
        viewer: api.login("vera", "vera-password"),
        admin,
        machine_viewer: machine,
    }
}

/// Every operation of the API with the least role it needs. `{run}` and `{item}` are
/// filled in with a real run id; bodies are valid where a body is needed.
fn endpoints(run: i64) -> Vec<(&'static str, String, Option<Value>, &'static str)> {
    let r = run.to_string();
    vec![
        ("GET", "/api/v1/me".into(), None, "viewer"),
        ("GET", "/api/v1/integrations".into(), None, "viewer"),
        ("GET", "/api/v1/integrations/hello".into(), None, "viewer"),
        (
            "GET",
            "/api/v1/integrations/hello/ticks".into(),
            None,
            "viewer",
        ),
        (
            "GET",
            "/api/v1/integrations/hello/graph".into(),
            None,
            "viewer",
        ),
        (
            "POST",
            "/api/v1/integrations/hello/trigger".into(),
            Some(json!({"params": {"count": 1}})),
            "operator",
        ),
        (
            "POST",
            "/api/v1/integrations/hello/disable".into(),
            None,
            "operator",
        ),
        (
            "POST",
            "/api/v1/integrations/hello/enable".into(),
            None,
            "operator",
        ),
        ("GET", "/api/v1/runs".into(), None, "viewer"),
        ("GET", format!("/api/v1/runs/{r}"), None, "viewer"),
        ("GET", format!("/api/v1/runs/{r}/graph"), None, "viewer"),
        ("GET", format!("/api/v1/runs/{r}/logs"), None, "viewer"),
        (
            "GET",
            format!("/api/v1/runs/{r}/logs/stream"),
            None,
            "viewer",
        ),
        ("POST", format!("/api/v1/runs/{r}/cancel"), None, "operator"),
        ("POST", format!("/api/v1/runs/{r}/repair"), None, "operator"),
        ("GET", "/api/v1/backfills".into(), None, "viewer"),
        (
            "POST",
            "/api/v1/backfills".into(),
            Some(
                json!({"integration": "hello", "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T23:00:00Z"}),
            ),
            "operator",
        ),
        (
            "POST",
            "/api/v1/backfills/1/cancel".into(),
            None,
            "operator",
        ),
        ("GET", "/api/v1/workers".into(), None, "viewer"),
        (
            "POST",
            "/api/v1/workers/nobody/drain".into(),
            None,
            "operator",
        ),
        ("GET", "/api/v1/plugins".into(), None, "viewer"),
        ("GET", "/api/v1/events".into(), None, "viewer"),
        ("GET", "/api/v1/users".into(), None, "admin"),
        (
            "POST",
            "/api/v1/users".into(),
            Some(json!({"name": "newbie", "role": "viewer", "password": "newbie-password"})),
            "admin",
        ),
        ("GET", "/api/v1/users/vera".into(), None, "admin"),
        (
            "PATCH",
            "/api/v1/users/vera".into(),
            Some(json!({"role": "viewer"})),
            "admin",
        ),
        ("DELETE", "/api/v1/users/newbie".into(), None, "admin"),
        ("GET", "/api/v1/tokens".into(), None, "admin"),
        (
            "POST",
            "/api/v1/tokens".into(),
            Some(json!({"name": "ci", "role": "operator"})),
            "admin",
        ),
        ("DELETE", "/api/v1/tokens/2".into(), None, "admin"),
        ("GET", "/api/v1/audit".into(), None, "admin"),
        (
            "PUT",
            "/api/v1/credentials/pg-main".into(),
            Some(
                json!({"type": "postgres", "public": {"host": "db", "user": "pipe"}, "private": {"password": "p4ss-word"}}),
            ),
            "admin",
        ),
        ("GET", "/api/v1/credentials".into(), None, "admin"),
        ("GET", "/api/v1/credentials/pg-main".into(), None, "admin"),
        (
            "DELETE",
            "/api/v1/credentials/pg-main".into(),
            None,
            "admin",
        ),
    ]
}

/// The OpenAPI document's operations, as (METHOD, path template).
fn documented(api: &Api) -> BTreeSet<(String, String)> {
    let (s, doc) = api.call("GET", "/api/v1/schema/", None, None);
    assert_eq!(s, 200);
    assert_eq!(
        doc["openapi"].as_str().map(|v| &v[..3]),
        Some("3.1"),
        "{}",
        doc["openapi"]
    );
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// A path of the table as its template (`/api/v1/runs/7` → `/api/v1/runs/{id}`).
fn template(path: &str) -> String {
    path.split('/')
        .enumerate()
        .map(|(i, part)| match (i, part) {
            (4, "hello" | "pg-main" | "vera" | "newbie") => "{name}".to_string(),
            (4, "nobody") => "{id}".to_string(),
            (4, p) if p.parse::<i64>().is_ok() => "{id}".to_string(),
            (_, p) => p.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 0,
        "operator" => 1,
        _ => 2,
    }
}

/// One hello run, finished.
fn a_finished_run(api: &Api, t: &Tokens) -> i64 {
    let (s, v) = api.call(
        "POST",
        "/api/v1/integrations/hello/trigger",
        Some(&t.operator),
        Some(&json!({"params": {"count": 2, "name": "api"}})),
    );
    assert_eq!(s, 202, "{v}");
    api.wait("the triggered run to finish", || {
        let (_, page) = api.call(
            "GET",
            "/api/v1/runs?integration=hello&trigger=manual",
            Some(&t.viewer),
            None,
        );
        page["items"]
            .as_array()?
            .iter()
            .find(|r| r["status"] == "succeeded")
            .and_then(|r| r["id"].as_i64())
    })
}

fn walk_every_endpoint_by_role(db: Option<&str>) {
    let env = Env::new();
    let api = Api::start(&env, db);
    let t = tokens(&api);
    let run = a_finished_run(&api, &t);

    // The table is the document: no endpoint left out, none invented.
    let mut table: BTreeSet<(String, String)> = endpoints(run)
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), template(p)))
        .collect();
    // The two that need no token (they give one), tested on their own below.
    table.insert(("POST".into(), "/api/v1/token/".into()));
    table.insert(("POST".into(), "/api/v1/token/refresh/".into()));
    assert_eq!(
        table,
        documented(&api),
        "the test's table and the OpenAPI document differ"
    );

    let by_role = [
        ("viewer", t.viewer.as_str()),
        ("viewer", t.machine_viewer.as_str()),
        ("operator", t.operator.as_str()),
        ("admin", t.admin.as_str()),
    ];
    for (method, path, body, needs) in endpoints(run) {
        let (s, v) = api.call(method, &path, None, body.as_ref());
        assert_eq!(s, 401, "{method} {path} without a token: {v}");
        assert_eq!(v["status"], 401, "a problem document: {v}");
        for (role, token) in by_role {
            // A stream stays open: only its status is read.
            if path.ends_with("/stream") || path.ends_with("/events") {
                let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                let resp = api
                    .http
                    .request(m, format!("{}{path}", api.base))
                    .bearer_auth(token)
                    .send()
                    .unwrap();
                let want: u16 = if rank(role) >= rank(needs) { 200 } else { 403 };
                assert_eq!(resp.status().as_u16(), want, "{method} {path} as {role}");
                continue;
            }
            let (s, v) = api.call(method, &path, Some(token), body.as_ref());
            if rank(role) < rank(needs) {
                assert_eq!(s, 403, "{method} {path} as {role}: {v}");
                assert!(v["detail"].as_str().unwrap().contains(needs), "{v}");
            } else {
                assert!(
                    s != 401 && s != 403 && s < 500,
                    "{method} {path} as {role}: {s} {v}"
                );
            }
        }
    }
    assert_eq!(
        api.server.output().matches("panicked").count(),
        0,
        "{}",
        api.server.output()
    );
}

#[test]
fn every_endpoint_by_role_on_sqlite() {
    walk_every_endpoint_by_role(None);
}

#[test]
fn every_endpoint_by_role_on_postgresql() {
    let db = crate::util::PgDb::new();
    walk_every_endpoint_by_role(Some(&db.url));
}

fn b64(v: &Value) -> String {
    crate::util::base64(v.to_string().as_bytes(), true)
}

/// An HS256 JWT signed with `key`.
fn sign(header: &Value, claims: &Value, key: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let input = format!("{}.{}", b64(header), b64(claims));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(input.as_bytes());
    let sig = crate::util::base64(&mac.finalize().into_bytes(), true);
    format!("{input}.{sig}")
}

#[test]
fn jwts_are_checked_for_algorithm_signature_kind_and_expiry() {
    let env = Env::new();
    let mut api = Api::start(&env, None);
    let admin = api.login("admin", ADMIN_PASSWORD);
    let (s, _) = api.call("GET", "/api/v1/me", Some(&admin), None);
    assert_eq!(s, 200);
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": "admin", "typ": "access", "iat": now, "exp": now + 600, "jti": "x"});
    // `alg: none` with no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims)
    );
    let (s, v) = api.call("GET", "/api/v1/me", Some(&none), None);
    assert_eq!(s, 401, "{v}");
    // Another algorithm, and a right algorithm with a guessed key.
    let hs512 = sign(&json!({"alg": "HS512", "typ": "JWT"}), &claims, b"guess");
    assert_eq!(api.call("GET", "/api/v1/me", Some(&hs512), None).0, 401);
    let guessed = sign(&json!({"alg": "HS256", "typ": "JWT"}), &claims, b"guess");
    let (s, v) = api.call("GET", "/api/v1/me", Some(&guessed), None);
    assert_eq!(s, 401);
    assert!(v["detail"].as_str().unwrap().contains("signature"), "{v}");
    // A real token with its claims changed (a role it does not have: the user is all a
    // token says).
    let parts: Vec<&str> = admin.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&json!({"sub": "root", "typ": "access", "iat": now, "exp": now + 600, "jti": "y"})),
        parts[2]
    );
    assert_eq!(api.call("GET", "/api/v1/me", Some(&tampered), None).0, 401);

    // With the server's own key (read from the store): expired is refused, a refresh token
    // is not an access token, and a token of a user that is gone is refused.
    let key_hex: String = crate::util::history(&env.state())
        .query_row(
            "SELECT value FROM settings WHERE key = 'jwt_hs256_key'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let key = hex_decode(&key_hex);
    let header = json!({"alg": "HS256", "typ": "JWT"});
    let good = sign(&header, &claims, &key);
    assert_eq!(
        api.call("GET", "/api/v1/me", Some(&good), None).0,
        200,
        "the test signs like the server"
    );
    let expired = sign(
        &header,
        &json!({"sub": "admin", "typ": "access", "iat": now - 900, "exp": now - 1, "jti": "z"}),
        &key,
    );
    let (s, v) = api.call("GET", "/api/v1/me", Some(&expired), None);
    assert_eq!(s, 401);
    assert!(v["detail"].as_str().unwrap().contains("expired"), "{v}");
    let refresh = sign(
        &header,
        &json!({"sub": "admin", "typ": "refresh", "iat": now, "exp": now + 600, "jti": "r"}),
        &key,
    );
    assert_eq!(api.call("GET", "/api/v1/me", Some(&refresh), None).0, 401);
    let (s, v) = api.call(
        "POST",
        "/api/v1/token/refresh/",
        None,
        Some(&json!({"refresh": refresh})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        api.call(
            "GET",
            "/api/v1/me",
            Some(v["access"].as_str().unwrap()),
            None
        )
        .0,
        200
    );
    let ghost = sign(
        &header,
        &json!({"sub": "ghost", "typ": "access", "iat": now, "exp": now + 600, "jti": "g"}),
        &key,
    );
    assert_eq!(api.call("GET", "/api/v1/me", Some(&ghost), None).0, 401);
    // A revoked machine token stops at once.
    let (_, t) = api.call(
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(&json!({"name": "ci", "role": "viewer"})),
    );
    let machine = t["token"].as_str().unwrap().to_string();
    assert_eq!(api.call("GET", "/api/v1/me", Some(&machine), None).0, 200);
    let id = t["id"].as_i64().unwrap();
    assert_eq!(
        api.call(
            "DELETE",
            &format!("/api/v1/tokens/{id}"),
            Some(&admin),
            None
        )
        .0,
        200
    );
    assert_eq!(api.call("GET", "/api/v1/me", Some(&machine), None).0, 401);

    // `pipe users logout` ends every session of the user: the access and refresh tokens
    // issued so far are refused at once; a new login (in a later second) works.
    let out = env.run(&["users", "logout", "admin"]);
    out.expect_code(0);
    let (s, v) = api.call("GET", "/api/v1/me", Some(&admin), None);
    assert_eq!(s, 401, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("ended"), "{v}");
    let (s, v) = api.call(
        "POST",
        "/api/v1/token/refresh/",
        None,
        Some(&json!({"refresh": refresh})),
    );
    assert_eq!(s, 401, "{v}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = api.login("admin", ADMIN_PASSWORD);
    assert_eq!(api.call("GET", "/api/v1/me", Some(&again), None).0, 200);
    assert_eq!(api.server.stop(), 0);
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn failed_logins_are_limited_even_for_the_right_password() {
    let env = Env::new();
    let api = Api::start(&env, None);
    for _ in 0..5 {
        let (s, v) = api.call(
            "POST",
            "/api/v1/token/",
            None,
            Some(&json!({"username": "admin", "password": "wrong-password"})),
        );
        assert_eq!(s, 401, "{v}");
    }
    let resp = api
        .http
        .post(format!("{}/api/v1/token/", api.base))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    // Another user is not locked out by it.
    let (s, _) = api.call(
        "POST",
        "/api/v1/token/",
        None,
        Some(&json!({"username": "someone", "password": "x"})),
    );
    assert_eq!(s, 401);
    // The log says a login was refused, and never the password tried.
    let log = api.server.output();
    assert!(log.contains("refused a login as `admin`"), "{log}");
    assert!(!log.contains("wrong-password"), "{log}");
}

#[test]
fn bad_input_gets_problem_documents_never_5xx() {
    let env = Env::new();
    let api = Api::start(&env, None);
    let admin = api.login("admin", ADMIN_PASSWORD);
    let cases: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("POST", "/api/v1/token/", Some("{not json"), 400),
        ("POST", "/api/v1/token/", Some("{\"username\": 1}"), 422),
        ("GET", "/api/v1/runs?limit=0", None, 422),
        ("GET", "/api/v1/runs?limit=abc", None, 400),
        ("GET", "/api/v1/runs?status=sleeping", None, 422),
        ("GET", "/api/v1/runs?since=yesterday", None, 422),
        ("GET", "/api/v1/runs?cursor=zzz", None, 422),
        ("GET", "/api/v1/runs/abc", None, 400),
        ("GET", "/api/v1/runs/999999", None, 404),
        ("GET", "/api/v1/integrations/nope", None, 404),
        ("POST", "/api/v1/integrations/hello/trigger", Some("{\"params\": {\"count\": \"many\"}}"), 422),
        ("POST", "/api/v1/integrations/hello/trigger", Some("{\"params\": {\"nope\": 1}}"), 422),
        ("POST", "/api/v1/integrations/hello/trigger", Some("[1, 2]"), 422),
        ("POST", "/api/v1/users", Some("{\"name\": \"a b\", \"role\": \"viewer\", \"password\": \"long-enough\"}"), 422),
        ("POST", "/api/v1/users", Some("{\"name\": \"ab\", \"role\": \"king\", \"password\": \"long-enough\"}"), 422),
        ("POST", "/api/v1/users", Some("{\"name\": \"ab\", \"role\": \"viewer\", \"password\": \"short\"}"), 422),
        ("PATCH", "/api/v1/users/admin", Some("{\"role\": \"viewer\"}"), 409),
        ("DELETE", "/api/v1/integrations", None, 405),
        ("GET", "/api/v1/nothing-here", None, 404),
        ("POST", "/api/v1/backfills", Some("{\"integration\": \"hello\", \"from\": \"2026-02-01T00:00:00Z\", \"to\": \"2026-01-01T00:00:00Z\"}"), 422),
    ];
    for (method, path, body, want) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = api
            .http
            .request(m, format!("{}{path}", api.base))
            .bearer_auth(&admin);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().unwrap();
        assert_eq!(status, want, "{method} {path} {body:?}: {text}");
        assert_eq!(
            ctype.as_deref(),
            Some("application/problem+json"),
            "{method} {path}: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["status"], want);
        assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
    }
    // A 422 names the param at fault.
    let (_, v) = api.call(
        "POST",
        "/api/v1/integrations/hello/trigger",
        Some(&admin),
        Some(&json!({"params": {"count": "many"}})),
    );
    assert_eq!(v["field"], "params.count", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("count"), "{v}");
    // Oversized bodies are refused before they are read whole.
    let big = "x".repeat(2 << 20);
    let resp = api
        .http
        .post(format!("{}/api/v1/token/", api.base))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
}

#[test]
fn a_triggered_run_is_watched_live_and_its_log_streams_to_the_end() {
    let env = Env::new();
    let api = Api::start(&env, None);
    let t = tokens(&api);
    // Listen before triggering.
    let events = api
        .http
        .get(format!("{}/api/v1/events?integration=hello", api.base))
        .bearer_auth(&t.viewer)
        .send()
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(events).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("\"step\":\"goodbye\"") && line.contains("succeeded");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    // The integration's page has what a trigger form needs.
    let (_, detail) = api.call("GET", "/api/v1/integrations/hello", Some(&t.viewer), None);
    let params: Vec<&str> = detail["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["name", "count", "period"]);
    assert_eq!(
        detail["next_fire_times"].as_array().unwrap().len(),
        5,
        "{detail}"
    );
    let run = a_finished_run(&api, &t);
    let lines = reader.join().unwrap();
    let text = lines.join("\n");
    assert!(text.contains("event: run"), "{text}");
    assert!(text.contains("event: step"), "{text}");
    for step in ["greet", "countdown", "report", "goodbye"] {
        assert!(
            text.contains(&format!("\"step\":\"{step}\"")),
            "{step} in {text}"
        );
    }
    // The run's steps and logs, paged.
    let (_, r) = api.call("GET", &format!("/api/v1/runs/{run}"), Some(&t.viewer), None);
    assert_eq!(r["steps"].as_array().unwrap().len(), 4, "{r}");
    let (_, p1) = api.call(
        "GET",
        &format!("/api/v1/runs/{run}/logs?limit=1"),
        Some(&t.viewer),
        None,
    );
    assert_eq!(p1["items"].as_array().unwrap().len(), 1);
    let after = p1["next_after"].as_i64().expect("a next page");
    let (_, p2) = api.call(
        "GET",
        &format!("/api/v1/runs/{run}/logs?after={after}"),
        Some(&t.viewer),
        None,
    );
    assert!(!p2["items"].as_array().unwrap().is_empty());
    // The finished run's log stream sends every row, then `end` with the status, and closes.
    let body = api
        .http
        .get(format!("{}/api/v1/runs/{run}/logs/stream", api.base))
        .bearer_auth(&t.viewer)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        body.contains("event: log") && body.contains("hello, api"),
        "{body}"
    );
    assert!(body.trim_end().ends_with("data: succeeded"), "{body}");
    // The run page's graph: four steps, the edges of `needs`.
    let (_, g) = api.call(
        "GET",
        &format!("/api/v1/runs/{run}/graph"),
        Some(&t.viewer),
        None,
    );
    assert_eq!(g["nodes"].as_array().unwrap().len(), 4, "{g}");
    assert!(
        g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["from"] == "countdown" && e["to"] == "report"),
        "{g}"
    );
    // Cursor pages of runs: two pages of one.
    let (_, again) = api.call(
        "POST",
        "/api/v1/integrations/hello/trigger",
        Some(&t.operator),
        None,
    );
    assert!(again["item"].is_i64());
    api.wait("two runs", || {
        let (_, page) = api.call(
            "GET",
            "/api/v1/runs?integration=hello",
            Some(&t.viewer),
            None,
        );
        (page["items"].as_array()?.len() >= 2).then_some(())
    });
    let (_, first) = api.call("GET", "/api/v1/runs?limit=1", Some(&t.viewer), None);
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();
    let (_, second) = api.call(
        "GET",
        &format!("/api/v1/runs?limit=1&cursor={cursor}"),
        Some(&t.viewer),
        None,
    );
    assert_ne!(first["items"][0]["id"], second["items"][0]["id"]);
    // Metrics say what the store holds.
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .bearer_auth(&t.machine_viewer)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("pipe_runs{status=\"succeeded\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pipe_step_duration_seconds_count"),
        "{metrics}"
    );
    assert_eq!(
        api.http
            .get(format!("{}/metrics", api.base))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let health: Value = api
        .http
        .get(format!("{}/health", api.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
}

/// The OpenAPI document as served is the one checked in at docs/api/openapi.json
/// (`PIPE_UPDATE_OPENAPI=1` writes it); Swagger UI and Redoc come from the binary.
#[test]
fn the_checked_in_openapi_document_matches_and_the_docs_need_no_cdn() {
    let env = Env::new();
    let api = Api::start(&env, None);
    let served = api
        .http
        .get(format!("{}/api/v1/schema/", api.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let served: Value = serde_json::from_str(&served).unwrap();
    let file = crate::util::repo_root().join("docs/api/openapi.json");
    if std::env::var_os("PIPE_UPDATE_OPENAPI").is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, serde_json::to_string_pretty(&served).unwrap() + "\n").unwrap();
    }
    let kept: Value = serde_json::from_str(
        &std::fs::read_to_string(&file)
            .expect("docs/api/openapi.json (PIPE_UPDATE_OPENAPI=1 writes it)"),
    )
    .unwrap();
    assert!(kept == served, "docs/api/openapi.json differs from the served document: run the test with PIPE_UPDATE_OPENAPI=1 and review the diff");
    for page in ["/api/v1/docs/", "/api/v1/redoc/"] {
        let resp = api.http.get(format!("{}{page}", api.base)).send().unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{page}");
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        let html = resp.text().unwrap();
        assert!(
            !html.contains("https://") && !html.contains("http://"),
            "{page} loads something from elsewhere:\n{html}"
        );
    }
    let js = api
        .http
        .get(format!("{}/api/v1/redoc/redoc.standalone.js", api.base))
        .send()
        .unwrap();
    assert_eq!(js.status().as_u16(), 200);
    assert!(js.bytes().unwrap().len() > 500_000);
    let init = api
        .http
        .get(format!("{}/api/v1/docs/swagger-initializer.js", api.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(init.contains("/api/v1/schema/"), "{init}");
}

/// schemathesis (PyPI, pinned in tests/python/requirements.txt) generates requests from the
/// served OpenAPI document, with an admin's token, a bounded number per operation: no answer
/// is a 5xx, and every answer's status, content type and body match the document. The
/// streams are left out (they do not end).
#[test]
fn schemathesis_finds_no_server_error_and_every_answer_matches_the_document() {
    let env = Env::new();
    let api = Api::start(&env, None);
    let t = tokens(&api);
    a_finished_run(&api, &t);
    let python = crate::fidelity::python();
    let st = python.with_file_name("schemathesis");
    let out = std::process::Command::new(&st)
        .args([
            "run",
            &format!("{}/api/v1/schema/", api.base),
            "-H",
            &format!("Authorization: Bearer {}", t.admin),
            "--max-examples",
            "15",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--exclude-path-regex",
            "stream|events",
            "--generation-deterministic",
            "--request-timeout",
            "20",
            "--no-color",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", st.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("generated"), "{text}");
    assert_eq!(api.server.output().matches("panicked").count(), 0);
}

/// A credential saved through the API: its private value is in no answer, not in the audit
/// trail, not in the store's file, not in the server's log; a save that does not check
/// against the type is a 422 naming the field; a private field left out keeps its value.
#[test]
fn credentials_private_values_are_write_only() {
    let env = Env::new();
    let mut api = Api::start(&env, None);
    let admin = api.login("admin", ADMIN_PASSWORD);
    let canary = "canary-7f3a9c2e51d8";
    let (s, v) = api.call(
        "PUT",
        "/api/v1/credentials/carol-prod",
        Some(&admin),
        Some(&json!({"type": "carol", "public": {"tenant": "t1", "organization": "o1", "connector_id": "c1", "username": "u"}, "private": {"password": canary}})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        v["credential"]["private_fields"],
        json!(["password"]),
        "{v}"
    );
    // Saved again without the private part: the password stays.
    let (s, v) = api.call(
        "PUT",
        "/api/v1/credentials/carol-prod",
        Some(&admin),
        Some(&json!({"type": "carol", "public": {"tenant": "t2", "organization": "o1", "connector_id": "c1", "username": "u"}})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["credential"]["private_fields"],
        json!(["password"]),
        "{v}"
    );
    // A field of the wrong type is named.
    let (s, v) = api.call(
        "PUT",
        "/api/v1/credentials/pg",
        Some(&admin),
        Some(&json!({"type": "postgres", "public": {"host": "db", "port": "not-a-port"}})),
    );
    assert_eq!(s, 422, "{v}");
    assert!(
        v["field"].as_str().unwrap_or_default().contains("port"),
        "{v}"
    );
    let (s, v) = api.call(
        "PUT",
        "/api/v1/credentials/x",
        Some(&admin),
        Some(&json!({"type": "nope"})),
    );
    assert_eq!((s, v["field"].as_str()), (422, Some("type")), "{v}");
    // Everything an admin can read.
    let mut seen = String::new();
    for path in [
        "/api/v1/credentials",
        "/api/v1/credentials/carol-prod",
        "/api/v1/audit",
        "/api/v1/plugins",
    ] {
        let (s, v) = api.call("GET", path, Some(&admin), None);
        assert_eq!(s, 200, "{path}: {v}");
        seen.push_str(&v.to_string());
    }
    assert!(seen.contains("credential.set"), "the change is audited");
    assert!(!seen.contains(canary), "a private value came back: {seen}");
    let viewer_sees = api.call("GET", "/api/v1/credentials", None, None);
    assert_eq!(viewer_sees.0, 401);
    assert_eq!(api.server.stop(), 0);
    assert!(!api.server.output().contains(canary));
    for entry in std::fs::read_dir(env.state()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "{} holds the private value in clear",
                path.display()
            );
        }
    }
}
