//! The `carol` connection and one Carol request (auth, retries, Carol's errors).

use crate::http::client::{cancellable, client, learn_credential, retry_after, sleep};
use engine::events::Level;
use engine::step::{StepContext, StepError};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The statuses pycarol retries a send on (and so do these steps).
pub const RETRY_STATUSES: [u16; 10] = [408, 409, 429, 500, 502, 503, 504, 520, 524, 598];
/// Retries of one request by default (pycarol's send: 10).
pub const DEFAULT_RETRIES: u32 = 10;
/// Timeout of one request by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// First backoff (doubling, as pycarol's `backoff_factor` 0.5).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Fetch a new token this long before the current one expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// The rendered `carol` connection.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CarolConnection")]
pub struct Connection {
    /// Always `carol`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The tenant (environment) name: `https://{tenant}.carol.ai`.
    pub tenant: String,
    /// The organization, when logging in through `https://{organization}.carol.ai`.
    #[serde(default)]
    pub organization: Option<String>,
    /// The base URL (default `https://{organization or tenant}.carol.ai`).
    #[serde(default)]
    pub url: Option<String>,
    /// The connector the staging tables belong to (its id, or its name).
    pub connector_id: String,
    /// The user (OAuth2 password grant).
    #[serde(default)]
    pub username: Option<String>,
    /// The user's password.
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub password: Option<String>,
    /// A connector API key (instead of username and password).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub api_key: Option<String>,
    /// Timeout of one request (`2m`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Used by `--sandbox` only.
    #[serde(default)]
    pub sandbox: Option<Value>,
}

/// `--sandbox`: the Carol fake's tenant and connector (the login keys come from the
/// pipeline's `sandbox:` block through `secret()`).
pub fn sandbox(
    t: &engine::connection::SandboxTarget,
) -> Result<Option<engine::connection::ConnectionOverride>, String> {
    match t.stand_in() {
        None | Some("carol") => Ok(Some(engine::connection::ConnectionOverride::Patch {
            set: ["url", "tenant", "organization", "connector_id"]
                .into_iter()
                .map(|f| (f.to_string(), t.fake(&format!("carol.{f}"))))
                .collect(),
            remove: vec![],
        })),
        Some(other) => Err(t.unknown_stand_in(other, &["carol"])),
    }
}

/// The rule between the login keys.
const LOGIN_KEYS: &str = "the carol connection needs either `username` and `password` or `api_key`";

impl engine::connection::ConnectionConfig for Connection {
    fn problems(&self) -> Vec<engine::step::Problem> {
        use engine::step::Problem;
        match (&self.username, &self.password, &self.api_key) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => Vec::new(),
            // At a login key, seldom a template (a templated key's problems are left to
            // the run, and `api_key` is usually `{{ secret(…) }}`).
            (Some(_), _, Some(_)) => {
                vec![Problem::at("username", format!("{LOGIN_KEYS}, not both"))]
            }
            (None, Some(_), Some(_)) => {
                vec![Problem::at("password", format!("{LOGIN_KEYS}, not both"))]
            }
            (Some(_), None, None) => vec![Problem::at("username", LOGIN_KEYS)],
            (None, Some(_), None) => vec![Problem::at("password", LOGIN_KEYS)],
            (None, None, None) => vec![Problem::at("connector_id", LOGIN_KEYS)],
        }
    }
}

#[derive(Debug, Clone)]
enum Auth {
    Password { username: String, password: String },
    ApiKey(String),
}

/// A Carol access token, as the worker's [`crate::tokens::TokenCache`] keeps it.
#[derive(Debug, Clone)]
pub struct Token {
    access: String,
    refresh: Option<String>,
    expires_at: Instant,
}

type Slot = crate::tokens::Slot<Token>;
/// Tokens by (base URL, tenant, username, connector) and a fingerprint of the password, in
/// the worker's resources: the steps of a run (and runs with the same login) share one.
type TokenCache = crate::tokens::TokenCache<Token>;

/// A request body.
#[derive(Debug, Clone)]
pub enum Body {
    None,
    Json(bytes::Bytes),
    Gzip(bytes::Bytes),
    Form(Vec<(String, String)>),
}

impl Body {
    pub fn json(v: &Value) -> Body {
        Body::Json(bytes::Bytes::from(
            serde_json::to_vec(v).unwrap_or_default(),
        ))
    }
}

/// How one request retries.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    pub retries: u32,
    pub max_wait: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            retries: DEFAULT_RETRIES,
            max_wait: MAX_WAIT,
        }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub elapsed: Duration,
    /// Retries this request took.
    pub retries: u32,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A logged-in view of one `carol` connection.
#[derive(Debug, Clone)]
pub struct Carol {
    pub base: String,
    pub tenant: String,
    pub organization: Option<String>,
    pub connector_id: String,
    auth: Auth,
    timeout: Duration,
    slot: Slot,
    /// The longest a token is used (the worker's token TTL).
    token_ttl: Duration,
}

impl Carol {
    /// The step's `carol` connection; its secrets taught to the redactor.
    pub fn from_ctx(ctx: &StepContext) -> Result<Carol, StepError> {
        let json = ctx.connection.as_ref().ok_or_else(|| {
            StepError::fatal("carol steps need `connection:` naming a connection of type `carol`")
        })?;
        let conn: Connection = serde_json::from_value(json.clone()).map_err(|e| {
            StepError::fatal(ctx.redactor.redact(&format!("the carol connection: {e}")))
        })?;
        Carol::new(ctx, conn)
    }

    pub fn new(ctx: &StepContext, conn: Connection) -> Result<Carol, StepError> {
        if let Some(kind) = conn.kind.as_deref().filter(|k| *k != "carol") {
            return Err(StepError::fatal(format!(
                "carol steps need a connection of type `carol`, not `{kind}`"
            )));
        }
        for s in [&conn.password, &conn.api_key].into_iter().flatten() {
            ctx.redactor.add(s);
        }
        let auth = match (conn.username, conn.password, conn.api_key) {
            (Some(u), Some(p), None) => Auth::Password {
                username: u,
                password: p,
            },
            (None, None, Some(k)) => Auth::ApiKey(k),
            _ => return Err(StepError::fatal(LOGIN_KEYS)),
        };
        let base = match conn.url.filter(|u| !u.trim().is_empty()) {
            Some(u) => u.trim().trim_end_matches('/').to_string(),
            None => format!(
                "https://{}.carol.ai",
                conn.organization.as_deref().unwrap_or(&conn.tenant)
            ),
        };
        if conn.connector_id.trim().is_empty() {
            return Err(StepError::fatal(
                "the carol connection's `connector_id` is empty",
            ));
        }
        let timeout =
            crate::http::client::duration("timeout", conn.timeout.as_deref(), DEFAULT_TIMEOUT)?;
        let (user, secret) = match &auth {
            Auth::Password { username, password } => (username.as_str(), password.as_str()),
            Auth::ApiKey(key) => ("", key.as_str()),
        };
        let token_ttl = ctx.resources.token_ttl();
        let cache = ctx.resources.get_or_init(|| TokenCache::new(token_ttl));
        let slot = cache.slot(&[&base, &conn.tenant, user, &conn.connector_id], &[secret]);
        Ok(Carol {
            base,
            tenant: conn.tenant,
            organization: conn.organization,
            connector_id: conn.connector_id,
            auth,
            timeout,
            slot,
            token_ttl,
        })
    }

    /// `/api/...` on this connection's host.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// A valid access token (password auth only).
    async fn token(&self, ctx: &StepContext) -> Result<String, StepError> {
        let mut guard = cancellable(ctx, self.slot.lock()).await?;
        if let Some(t) = guard
            .as_ref()
            .filter(|t| Instant::now() + EXPIRY_MARGIN < t.expires_at)
        {
            // Maybe another run of this worker logged in: this run masks the token too.
            learn_credential(ctx, &t.access);
            if let Some(r) = &t.refresh {
                learn_credential(ctx, r);
            }
            return Ok(t.access.clone());
        }
        let refresh = guard.as_ref().and_then(|t| t.refresh.clone());
        let token = match refresh {
            Some(r) => match self.grant(ctx, Some(&r)).await {
                Ok(t) => t,
                Err(_) => self.grant(ctx, None).await?,
            },
            None => self.grant(ctx, None).await?,
        };
        let access = token.access.clone();
        *guard = Some(token);
        Ok(access)
    }

    /// Forget a token Carol rejected.
    async fn invalidate(&self, used: &str) {
        let mut g = self.slot.lock().await;
        if g.as_ref().is_some_and(|t| t.access == used) {
            if let Some(t) = g.as_mut() {
                t.expires_at = Instant::now();
            }
        }
    }

    /// `POST /api/v1/oauth2/token`: the password grant, or the refresh-token grant.
    async fn grant(&self, ctx: &StepContext, refresh: Option<&str>) -> Result<Token, StepError> {
        let Auth::Password { username, password } = &self.auth else {
            return Err(StepError::fatal("no password login with an API key"));
        };
        let form: Vec<(&str, &str)> = match refresh {
            Some(r) => vec![("grant_type", "refresh_token"), ("refresh_token", r)],
            None => {
                let mut f = vec![
                    ("grant_type", "password"),
                    ("username", username.as_str()),
                    ("password", password.as_str()),
                    ("subdomain", self.tenant.as_str()),
                    ("connectorId", self.connector_id.as_str()),
                ];
                if let Some(o) = &self.organization {
                    f.push(("orgSubdomain", o.as_str()));
                }
                f
            }
        };
        let url = self.url("/api/v1/oauth2/token");
        let resp = cancellable(
            ctx,
            client()
                .post(&url)
                .header("accept", "application/json")
                .form(&form)
                .timeout(self.timeout)
                .send(),
        )
        .await?
        .map_err(|e| {
            StepError::retryable(ctx.redactor.redact(&format!("Carol login at {url}: {e}")))
        })?;
        let status = resp.status();
        let body = cancellable(ctx, resp.bytes())
            .await?
            .map_err(|e| StepError::retryable(format!("Carol login: reading the answer: {e}")))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Some(t) = v.get("access_token").and_then(|t| t.as_str()) {
            learn_credential(ctx, t);
        }
        if let Some(t) = v.get("refresh_token").and_then(|t| t.as_str()) {
            learn_credential(ctx, t);
        }
        if !status.is_success() {
            let what = if refresh.is_some() {
                "refreshing the token"
            } else {
                "logging in (password grant)"
            };
            let err = ctx.redactor.redact(&format!(
                "Carol {what} at {url}: HTTP {status}: {}",
                carol_message(&body)
            ));
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                StepError::retryable(err)
            } else {
                StepError::fatal(err)
            });
        }
        let access = v["access_token"]
            .as_str()
            .ok_or_else(|| StepError::fatal("Carol's token answer has no access_token"))?
            .to_string();
        let expires_in = v["expires_in"]
            .as_f64()
            .or_else(|| v["expires_in"].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(3600.0)
            .max(0.0);
        ctx.log(
            Level::Info,
            &format!(
                "Carol: {} (token valid {} s)",
                if refresh.is_some() {
                    "token refreshed"
                } else {
                    "logged in"
                },
                expires_in as u64
            ),
        );
        Ok(Token {
            access,
            refresh: v["refresh_token"].as_str().map(str::to_string),
            expires_at: Instant::now()
                + Duration::try_from_secs_f64(expires_in)
                    .unwrap_or(self.token_ttl)
                    .min(self.token_ttl),
        })
    }

    /// Send one request: connection errors and [`RETRY_STATUSES`] are retried with backoff
    /// (or `Retry-After`); a 401 with password auth fetches a new token once. Returns the
    /// last response whatever its status.
    pub async fn request(
        &self,
        ctx: &StepContext,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: &Body,
        policy: Retries,
    ) -> Result<Reply, StepError> {
        let url = self.url(path);
        let shown = format!("{method} {url}");
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            let mut rb = client()
                .request(method.clone(), &url)
                .header("accept", "application/json")
                .timeout(self.timeout);
            if !query.is_empty() {
                rb = rb.query(query);
            }
            let mut token_used = None;
            rb = match &self.auth {
                Auth::ApiKey(key) => rb
                    .header("x-auth-key", key.as_str())
                    .header("x-auth-connectorid", self.connector_id.as_str()),
                Auth::Password { .. } => {
                    let t = self.token(ctx).await?;
                    let rb = rb.header("authorization", t.as_str());
                    token_used = Some(t);
                    rb
                }
            };
            rb = match body {
                Body::None => rb,
                Body::Json(b) => rb
                    .header("content-type", "application/json")
                    .body(b.clone()),
                Body::Gzip(b) => rb
                    .header("content-type", "application/json")
                    .header("content-encoding", "gzip")
                    .body(b.clone()),
                Body::Form(f) => rb.form(f),
            };
            let started = Instant::now();
            let outcome = cancellable(ctx, async {
                let resp = rb.send().await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let bytes = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, bytes))
            })
            .await?;
            let (status, headers, bytes) = match outcome {
                Ok(v) => v,
                Err(e) => {
                    let msg = ctx.redactor.redact(&format!("{shown}: {e}"));
                    if attempt < policy.retries {
                        attempt += 1;
                        let wait = backoff(attempt, policy.max_wait);
                        ctx.log(
                            Level::Warning,
                            &format!(
                                "{msg}; retry {attempt}/{} in {}",
                                policy.retries,
                                engine::duration::human(wait)
                            ),
                        );
                        sleep(ctx, wait).await?;
                        continue;
                    }
                    return Err(StepError::retryable(msg));
                }
            };
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                if let Some(used) = &token_used {
                    refreshed = true;
                    ctx.log(
                        Level::Info,
                        &format!("{shown}: HTTP 401, logging in to Carol again"),
                    );
                    self.invalidate(used).await;
                    continue;
                }
            }
            if RETRY_STATUSES.contains(&status.as_u16()) && attempt < policy.retries {
                attempt += 1;
                let wait = retry_after(&headers)
                    .unwrap_or_else(|| backoff(attempt, policy.max_wait))
                    .min(policy.max_wait);
                ctx.log(
                    Level::Warning,
                    &ctx.redactor.redact(&format!(
                        "{shown} returned HTTP {status}; retry {attempt}/{} in {}",
                        policy.retries,
                        engine::duration::human(wait)
                    )),
                );
                sleep(ctx, wait).await?;
                continue;
            }
            return Ok(Reply {
                status,
                body: bytes.to_vec(),
                elapsed: started.elapsed(),
                retries: attempt,
            });
        }
    }

    /// [`Carol::request`], failing unless the answer is 2xx; the answer's JSON.
    pub async fn call(
        &self,
        ctx: &StepContext,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: &Body,
    ) -> Result<Value, StepError> {
        let reply = self
            .request(ctx, method.clone(), path, query, body, Retries::default())
            .await?;
        check(ctx, &method, path, &reply)?;
        Ok(reply.json())
    }

    /// The sending limit in bytes (`GET /api/v3/staging/sendingLimit`), at most 80 MB.
    pub async fn sending_limit(&self, ctx: &StepContext) -> Result<u64, StepError> {
        let v = self
            .call(
                ctx,
                Method::GET,
                "/api/v3/staging/sendingLimit",
                &[],
                &Body::None,
            )
            .await?;
        let quantity = v["quantity"]
            .as_f64()
            .ok_or_else(|| StepError::fatal(format!("unexpected sendingLimit answer: {v}")))?;
        let unit = v["unit"].as_str().unwrap_or("BYTES").to_ascii_uppercase();
        let factor = match unit.as_str() {
            "BYTES" | "B" => 1.0,
            "KILOBYTES" | "KB" => 1024.0,
            "MEGABYTES" | "MB" => 1024.0 * 1024.0,
            "GIGABYTES" | "GB" => 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(StepError::fatal(format!(
                    "unexpected sendingLimit unit `{other}`"
                )))
            }
        };
        let bytes = (quantity * factor) as u64;
        Ok(bytes.clamp(1024, MAX_LIMIT))
    }
}

/// Carol never takes more than 80 MB in one request.
pub const MAX_LIMIT: u64 = 80 * 1024 * 1024;

/// Fail unless `reply` is 2xx, with Carol's error message.
pub fn check(
    ctx: &StepContext,
    method: &Method,
    path: &str,
    reply: &Reply,
) -> Result<(), StepError> {
    if reply.status.is_success() {
        return Ok(());
    }
    let msg = ctx.redactor.redact(&format!(
        "Carol {method} {path} returned HTTP {}: {}",
        reply.status,
        carol_message(&reply.body)
    ));
    if RETRY_STATUSES.contains(&reply.status.as_u16()) {
        Err(StepError::retryable(msg))
    } else {
        Err(StepError::fatal(msg))
    }
}

/// `errorMessage` (and `possibleResponsibleField`) of Carol's error shape, else the body.
pub fn carol_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match v.get("errorMessage").and_then(|m| m.as_str()) {
        Some(m) => match v.get("possibleResponsibleField").and_then(|f| f.as_str()) {
            Some(f) => format!("{m} (field: {f})"),
            None => m.to_string(),
        },
        None => {
            let t = String::from_utf8_lossy(body);
            t.trim().chars().take(300).collect()
        }
    }
}

fn backoff(n: u32, cap: Duration) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(cap)
}

/// Table names: letters and digits, starting with a letter.
pub fn check_table(name: &str) -> Result<(), StepError> {
    let mut chars = name.chars();
    if chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric())
    {
        Ok(())
    } else {
        Err(StepError::fatal(format!(
            "`{name}` is not a valid Carol staging table name: letters and digits only, starting with a letter"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_and_messages() {
        assert!(check_table("tickets2").is_ok());
        assert!(check_table("2t").is_err());
        assert!(check_table("a_b").is_err());
        assert_eq!(
            carol_message(
                br#"{"errorCode":400,"errorMessage":"bad","possibleResponsibleField":"x"}"#
            ),
            "bad (field: x)"
        );
        assert_eq!(carol_message(b"plain"), "plain");
        assert_eq!(backoff(1, MAX_WAIT), Duration::from_millis(500));
        assert_eq!(backoff(3, MAX_WAIT), Duration::from_secs(2));
        assert_eq!(backoff(30, MAX_WAIT), MAX_WAIT);
    }
}
