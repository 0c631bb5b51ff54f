//! `type: http.request` — one HTTP call; its response is the step's result object.
//!
//! The steps around an extraction — a login that returns a code, a second factor whose token
//! comes back in a header, a logout — are single calls whose answers feed later steps. So the
//! whole response (status, lowercased headers, parsed JSON, text) is the result object
//! `response`, and `outputs:` pick from it (`{{ response.json.tmp }}`,
//! `{{ response.headers.authorization }}`). An `Authorization` header in the response is
//! taught to the redactor at once: it is a credential, whatever the step does with it.
//!
//! A status outside `expect` (default: any 2xx) fails the step with the status and the start
//! of the body (redacted); 5xx and 429 are retried first (see [`super::client`]).

use super::auth::{Auth, SECRET_FIELDS};
use super::client::{Body, Limiter, Sender, Target};
use async_trait::async_trait;
use engine::step::{Problem, StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;

/// How much of the body the result object keeps as text.
const BODY_CAP: usize = 1 << 20;

fn default_method() -> String {
    "GET".into()
}

/// One HTTP request.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    /// The HTTP method (`GET`, `POST`, `PUT`, `PATCH`, `DELETE` …; default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// The full URL. Use either `url` or `path`.
    #[serde(default)]
    pub url: Option<String>,
    /// A path joined to the connection's `base_url` (`/api/login`).
    #[serde(default)]
    pub path: Option<String>,
    /// Query parameters (strings, numbers, booleans; a list repeats the parameter; null
    /// leaves it out).
    #[serde(default)]
    pub query: IndexMap<String, Value>,
    /// Request headers (they override the connection's by name). An `Authorization` value
    /// is masked in every log and output.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// A JSON body (any value; sets `Content-Type: application/json`).
    #[serde(default)]
    pub json: Option<Value>,
    /// A form body (`application/x-www-form-urlencoded`).
    #[serde(default)]
    pub form: Option<IndexMap<String, Value>>,
    /// A raw text body (set `Content-Type` in `headers`).
    #[serde(default)]
    pub body: Option<String>,
    /// The statuses that count as success (default: any 2xx). Others fail the step with
    /// the status and the start of the body.
    #[serde(default)]
    pub expect: Vec<u16>,
    /// Authentication for this request, overriding the connection's.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// Timeout of one try (`30s`; default the connection's `timeout`, else 30s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// How often a connection error, 5xx or 429 is retried inside the step (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// The longest wait before a retry (default `1m`); a longer `Retry-After` fails the
    /// step.
    #[serde(default)]
    pub max_wait: Option<String>,
    /// The largest response body read: a number of bytes or a size such as `50MB`, `1GiB`
    /// (default `512MiB`). A larger (or endless) body fails the step.
    #[serde(default)]
    #[schemars(schema_with = "crate::http::send::size_schema")]
    pub max_body: Option<String>,
}

/// `auth.<field>` paths that hold secrets, when `auth` is set.
pub(crate) fn auth_secret_fields(auth: Option<&Auth>) -> Vec<String> {
    if auth.is_none() {
        return Vec::new();
    }
    SECRET_FIELDS.iter().map(|f| format!("auth.{f}")).collect()
}

impl HttpRequest {
    /// The target fields, for [`Target::prepare`] and [`Target::problems`].
    fn target(&self) -> Target<'_> {
        super::client::target_of!(self)
    }
}

#[async_trait]
impl StepConfig for HttpRequest {
    const TYPE: &'static str = "http.request";
    const SUMMARY: &'static str =
        "Send one HTTP request; the response (status, headers, JSON, body) is the result object `response`";
    const RESULT_NAME: &'static str = "response";

    fn problems(&self) -> Vec<Problem> {
        let mut out = self.target().problems();
        let bodies = [
            ("json", self.json.is_some()),
            ("form", self.form.is_some()),
            ("body", self.body.is_some()),
        ];
        if let Some((second, _)) = bodies.iter().filter(|(_, set)| *set).nth(1) {
            out.push(Problem::at(
                second,
                "set at most one of `json`, `form` and `body`",
            ));
        }
        out
    }

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: false,
            outputs: Some(vec!["status".into(), "elapsed_ms".into()]),
            secret_fields: auth_secret_fields(self.auth.as_ref()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let prep = self.target().prepare(&ctx)?;
        let body = match (self.json, self.form, self.body) {
            (None, None, None) => Body::None,
            (Some(j), None, None) => Body::Json(j),
            (None, Some(f), None) => {
                let mut pairs = Vec::new();
                for (k, v) in f {
                    if let Some(s) = super::client::scalar_text(&format!("form.{k}"), &v)? {
                        pairs.push((k, s));
                    }
                }
                Body::Form(pairs)
            }
            (None, None, Some(t)) => Body::Text(t),
            _ => {
                return Err(StepError::fatal(
                    "set at most one of `json`, `form` and `body`",
                ))
            }
        };
        let sender = Sender::new(&ctx, &prep, Limiter::new(None));
        let reply = sender.send(&prep.url, true, &[], &body).await?;
        reply.check(&ctx, &prep.method, &self.expect)?;

        let mut headers = Map::new();
        for (name, value) in &reply.headers {
            let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
            // Repeated headers are joined as HTTP allows (`a, b`).
            match headers.get_mut(name.as_str()) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(&v);
                }
                _ => {
                    headers.insert(name.as_str().to_string(), Value::String(v));
                }
            }
        }
        let json_body = serde_json::from_slice::<Value>(&reply.body).unwrap_or(Value::Null);
        // A cut inside a character ends in U+FFFD, which is fine for a capped excerpt.
        let text =
            String::from_utf8_lossy(&reply.body[..reply.body.len().min(BODY_CAP)]).into_owned();
        let status = reply.status.as_u16();
        let elapsed_ms = reply.elapsed.as_millis() as u64;
        let retries = sender.retries.load(Ordering::Relaxed);
        let mut outputs = Map::new();
        outputs.insert("status".into(), json!(status));
        outputs.insert("elapsed_ms".into(), json!(elapsed_ms));
        Ok(StepOutput {
            outputs,
            result: json!({
                "status": status,
                "headers": headers,
                "json": json_body,
                "body": text,
                "url": reply.url.to_string(),
                "elapsed_ms": elapsed_ms,
                "retries": retries,
            }),
            table: None,
            warnings: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testutil::{ctx, serve, Collect};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{any, get, post};
    use axum::Router;
    use engine::events::Level;
    use std::sync::Arc;

    fn request(v: Value) -> HttpRequest {
        serde_json::from_value(v).unwrap()
    }

    /// Echoes method, content type, query and body; `/login` answers with an
    /// `authorization` header; `/missing` is a 404; `/boom` a 500.
    async fn echo_api() -> String {
        let app = Router::new()
            .route(
                "/echo",
                any(
                    |method: axum::http::Method,
                     headers: HeaderMap,
                     uri: axum::http::Uri,
                     body: String| async move {
                        axum::Json(json!({
                            "method": method.as_str(),
                            "content_type": headers.get("content-type").map(|v| v.to_str().unwrap()),
                            "authorization": headers.get("authorization").map(|v| v.to_str().unwrap()),
                            "query": uri.query(),
                            "body": body,
                        }))
                    },
                ),
            )
            .route(
                "/login",
                post(|| async {
                    (
                        [("Authorization", "Bearer session-token-xyz"), ("X-Trace", "t1")],
                        axum::Json(json!({})),
                    )
                }),
            )
            .route(
                "/missing",
                get(|| async { (StatusCode::NOT_FOUND, "no such thing").into_response() }),
            )
            .route(
                "/boom",
                get(|headers: HeaderMap| async move {
                    let auth = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    (StatusCode::INTERNAL_SERVER_ERROR, format!("crashed handling {auth}"))
                }),
            );
        serve(app).await
    }

    fn conn(base: &str) -> Option<Value> {
        Some(
            json!({"type": "http", "base_url": format!("{base}/"), "headers": {"X-Client": "pipe"}}),
        )
    }

    #[tokio::test]
    async fn json_form_and_text_bodies() {
        let base = echo_api().await;
        let obs = Arc::new(Collect::default());
        let out = request(
            json!({"method": "post", "path": "/echo", "json": {"email": "a@b.c", "n": 1},
            "query": {"x": 1, "flag": true, "ids": [1, 2], "skip": null}}),
        )
        .run(ctx(&obs, conn(&base)))
        .await
        .unwrap();
        let j = &out.result["json"];
        assert_eq!(j["method"], "POST");
        assert_eq!(j["content_type"], "application/json");
        assert_eq!(j["body"], r#"{"email":"a@b.c","n":1}"#);
        assert_eq!(j["query"], "x=1&flag=true&ids=1&ids=2");
        assert_eq!(out.result["status"], 200);
        assert_eq!(out.outputs["status"], 200);
        assert!(out.outputs["elapsed_ms"].is_u64());
        assert_eq!(
            out.result["url"],
            format!("{base}/echo?x=1&flag=true&ids=1&ids=2")
        );

        let out = request(json!({"method": "PUT", "path": "echo", "form": {"a": "1 2", "b": 3}}))
            .run(ctx(&obs, conn(&base)))
            .await
            .unwrap();
        let j = &out.result["json"];
        assert_eq!(j["content_type"], "application/x-www-form-urlencoded");
        assert_eq!(j["body"], "a=1+2&b=3");

        let out = request(
            json!({"method": "POST", "url": format!("{base}/echo"), "body": "plain text",
            "headers": {"Content-Type": "text/plain"}}),
        )
        .run(ctx(&obs, None))
        .await
        .unwrap();
        assert_eq!(out.result["json"]["body"], "plain text");
        assert_eq!(out.result["json"]["content_type"], "text/plain");

        let err = request(json!({"path": "/echo", "json": {}, "body": "x"}))
            .run(ctx(&obs, conn(&base)))
            .await
            .unwrap_err();
        assert!(err.message.contains("at most one"), "{}", err.message);
    }

    #[tokio::test]
    async fn response_headers_are_lowercased_and_authorization_is_masked() {
        let base = echo_api().await;
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, conn(&base));
        let out = request(json!({"method": "POST", "path": "/login", "json": {"tmp": "1"}}))
            .run(c.clone())
            .await
            .unwrap();
        assert_eq!(
            out.result["headers"]["authorization"],
            "Bearer session-token-xyz"
        );
        assert_eq!(out.result["headers"]["x-trace"], "t1");
        assert_eq!(out.result["json"], json!({}));
        assert_eq!(c.redactor.redact("got Bearer session-token-xyz"), "got ***");
        assert_eq!(c.redactor.redact("session-token-xyz"), "***");
    }

    #[tokio::test]
    async fn expect_decides_success() {
        let base = echo_api().await;
        let obs = Arc::new(Collect::default());
        let out = request(json!({"path": "/missing", "expect": [200, 404]}))
            .run(ctx(&obs, conn(&base)))
            .await
            .unwrap();
        assert_eq!(out.result["status"], 404);
        assert_eq!(out.result["body"], "no such thing");
        assert_eq!(out.result["json"], Value::Null);
        let err = request(json!({"path": "/missing"}))
            .run(ctx(&obs, conn(&base)))
            .await
            .unwrap_err();
        assert!(!err.retryable);
        assert!(err.message.contains("404"), "{}", err.message);
        assert!(err.message.contains("no such thing"), "{}", err.message);
        let err = request(json!({"path": "/echo", "expect": [201]}))
            .run(ctx(&obs, conn(&base)))
            .await
            .unwrap_err();
        assert!(err.message.contains("expected [201]"), "{}", err.message);
    }

    #[tokio::test]
    async fn basic_password_never_reaches_logs_or_errors() {
        let base = echo_api().await;
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, conn(&base));
        let cfg = request(json!({"path": "/boom", "retries": 2, "max_wait": "20ms",
            "auth": {"type": "basic", "username": "robot", "password": "hunter2-pass"}}));
        assert_eq!(
            cfg.static_info().secret_fields,
            vec![
                "auth.password",
                "auth.token",
                "auth.value",
                "auth.client_secret",
                "auth.refresh_token"
            ]
        );
        let err = cfg.run(c.clone()).await.unwrap_err();
        assert!(err.retryable);
        assert!(err.message.contains("500"), "{}", err.message);
        assert!(
            err.message.contains("crashed handling Basic ***"),
            "{}",
            err.message
        );
        c.log(Level::Info, "password hunter2-pass");
        let rows = obs.rows();
        assert_eq!(rows.iter().filter(|(l, _)| *l == Level::Warning).count(), 2);
        for (_, m) in rows {
            assert!(!m.contains("hunter2-pass"), "{m}");
            assert!(!m.contains("cm9ib3Q6aHVudGVyMi1wYXNz"), "{m}");
        }
    }

    #[tokio::test]
    async fn api_key_in_query_and_connection_errors_are_retryable() {
        let base = echo_api().await;
        let obs = Arc::new(Collect::default());
        let out = request(json!({"path": "/echo",
            "auth": {"type": "api_key", "name": "key", "value": "k-123456", "in": "query"}}))
        .run(ctx(&obs, conn(&base)))
        .await
        .unwrap();
        assert_eq!(out.result["json"]["query"], "key=k-123456");
        // Nothing listens on port 9 of localhost.
        let err = request(
            json!({"url": "http://127.0.0.1:9/x?key=k-123456", "retries": 1, "max_wait": "10ms"}),
        )
        .run(ctx(&obs, conn(&base)))
        .await
        .unwrap_err();
        assert!(err.retryable, "{}", err.message);
        assert!(err.message.contains("after 1 retries"), "{}", err.message);
    }

    #[tokio::test]
    async fn cancel_stops_a_slow_request() {
        let app = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                "late"
            }),
        );
        let base = serve(app).await;
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, None);
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            cancel.cancel();
        });
        let t = std::time::Instant::now();
        let err = request(json!({"url": format!("{base}/slow")}))
            .run(c)
            .await
            .unwrap_err();
        assert_eq!(err.message, "cancelled");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn schema_describes_every_field() {
        let mut g = schemars::SchemaGenerator::default();
        g.subschema_for::<HttpRequest>();
        let defs = serde_json::to_value(g.definitions()).unwrap();
        for (name, prop) in defs["HttpRequest"]["properties"].as_object().unwrap() {
            assert!(
                prop["description"].is_string(),
                "http.request {name} has no description"
            );
        }
    }
}
