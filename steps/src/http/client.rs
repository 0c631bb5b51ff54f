//! The plumbing every HTTP step shares: the `http` connection, one `reqwest::Client` for the
//! whole process, and [`Sender::send`] — retries, `Retry-After`, rate limits, cancellation
//! and secrets.
//!
//! Why one client: it owns the connection pool and the TLS configuration (rustls), so pages
//! of an extraction reuse connections and concurrent steps against the same host share them.
//! It honours `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` (reqwest's default).
//!
//! Why retries live here as well as in the step envelope's `retry:`: a step-level retry starts
//! the whole step again (for an extraction, every page); a retry here repeats one request, so
//! page 37 of 40 failing once with a 503 costs one request, not 37.
//!
//! Rate limits are the step's, not one request's: a 429 (or any `Retry-After`, or
//! `RateLimit-Remaining: 0`) closes a gate that every request of the step passes before it
//! is sent, so no request leaves before the server's deadline; with several requests in
//! flight the step also halves how many it keeps in flight and grows back one at a time
//! (see [`Limiter`]). Open, the gate costs one atomic load per request.
//!
//! Bodies are read up to `max_body` (default 512 MiB): an endless or oversized response
//! fails the step instead of growing the process without bound.
//!
//! Secrets: every credential the client sends or receives (the connection's and step's auth,
//! `Authorization` headers both ways, OAuth2 tokens, API keys) is taught to the run's
//! redactor before the request leaves, so no log row, error or output can show it.

use super::auth::Auth;
use engine::events::Level;
use engine::step::{Problem, StepContext, StepError};
use indexmap::IndexMap;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Default number of retries of one request.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default longest wait between two tries (and longest `Retry-After` accepted).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);
/// Default timeout of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest response body: more than any real API page, less than a crash.
pub const DEFAULT_MAX_BODY: u64 = 512 << 20;
/// First backoff step; it doubles on each retry.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// How much of a body an error message quotes.
const EXCERPT: usize = 300;

/// The rendered `http` connection (`connections: {api: {type: http, base_url: …}}`).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "HttpConnection")]
pub struct Connection {
    /// Always `http` for these steps.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Prefix of every `path`.
    pub base_url: String,
    /// Headers sent with every request (the step's `headers` override them by name).
    #[serde(default)]
    pub headers: IndexMap<String, Value>,
    /// Authentication for every request (the step's `auth` overrides it).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub auth: Option<Auth>,
    /// Timeout of one request (`30s`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// The local fake that `pipe run --sandbox` points this connection at (`tiflux`, `qockpit`).
    #[serde(default)]
    pub sandbox: Option<Value>,
}

impl engine::connection::ConnectionConfig for Connection {}

/// `--sandbox`: an `http` connection names its fake with `sandbox: <service>`; one without
/// is refused, since it would reach the real network.
pub fn sandbox(
    t: &engine::connection::SandboxTarget,
) -> Result<Option<engine::connection::ConnectionOverride>, String> {
    let base_url = match t.stand_in() {
        Some("tiflux") => t.fake("tiflux.url"),
        Some("qockpit") => format!(
            "{}/{}",
            t.fake("qockpit.base_endpoint"),
            t.fake("qockpit.domain")
        ),
        Some(other) => return Err(t.unknown_stand_in(other, &["tiflux", "qockpit"])),
        None => {
            return Err(format!(
                "connection `{}` has no stand-in: add `sandbox: tiflux` (or another fake) so --sandbox stays offline",
                t.name
            ))
        }
    };
    Ok(Some(engine::connection::ConnectionOverride::Patch {
        set: vec![("base_url".into(), base_url)],
        remove: vec![],
    }))
}

impl Connection {
    /// The step's connection, when it names one.
    pub fn from_ctx(ctx: &StepContext) -> Result<Option<Connection>, StepError> {
        let Some(json) = &ctx.connection else {
            return Ok(None);
        };
        let conn: Connection = serde_json::from_value(json.clone()).map_err(|e| {
            StepError::fatal(ctx.redactor.redact(&format!("the http connection: {e}")))
        })?;
        if let Some(kind) = &conn.kind {
            if kind != "http" {
                return Err(StepError::fatal(format!(
                    "http steps need a connection of type `http`, not `{kind}`"
                )));
            }
        }
        Ok(Some(conn))
    }
}

/// The process-wide client (connection pool, rustls, proxies from the environment).
pub fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .user_agent(concat!("pipe/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("building the HTTP client")
    })
}

/// Run `f` unless the step is cancelled first.
pub async fn cancellable<F: Future>(ctx: &StepContext, f: F) -> Result<F::Output, StepError> {
    tokio::select! {
        _ = ctx.cancel.cancelled() => Err(StepError::fatal("cancelled")),
        v = f => Ok(v),
    }
}

/// Sleep unless cancelled.
pub async fn sleep(ctx: &StepContext, d: Duration) -> Result<(), StepError> {
    cancellable(ctx, tokio::time::sleep(d)).await
}

/// Parse an optional duration field.
pub fn duration(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, StepError> {
    match text {
        None => Ok(default),
        Some(t) => {
            engine::duration::parse(t).map_err(|e| StepError::fatal(format!("`{field}`: {e}")))
        }
    }
}

/// A JSON scalar as a query/header string; `None` for null.
pub fn scalar_text(field: &str, v: &Value) -> Result<Option<String>, StepError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        _ => Err(StepError::fatal(format!(
            "`{field}` must be a string, number or boolean"
        ))),
    }
}

/// What a request body is.
#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    None,
    Json(Value),
    Form(Vec<(String, String)>),
    Text(String),
    /// Bytes sent as they are (`http.send`'s JSON batches, gzipped or not; the caller sets
    /// `Content-Type` and `Content-Encoding`).
    Bytes(Vec<u8>),
}

/// Retries and timeouts of one step.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub retries: u32,
    pub max_wait: Duration,
    pub timeout: Duration,
    /// The largest response body read, in bytes.
    pub max_body: u64,
}

/// The request a step's config describes, resolved against its connection.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: Method,
    pub url: url::Url,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub auth: Option<Auth>,
    pub policy: Policy,
}

/// The target fields every HTTP step has.
pub struct Target<'a> {
    pub method: &'a str,
    pub url: Option<&'a str>,
    pub path: Option<&'a str>,
    pub query: &'a IndexMap<String, Value>,
    pub headers: &'a IndexMap<String, String>,
    pub auth: Option<&'a Auth>,
    pub timeout: Option<&'a str>,
    pub retries: Option<u32>,
    pub max_wait: Option<&'a str>,
    pub max_body: Option<&'a str>,
}

use engine::secrets::is_secret_header as secret_header;

/// The [`Target`] of a step config whose target fields have the usual names (`method`,
/// `url`, `path`, `query`, `headers`, `auth`, `timeout`, `retries`, `max_wait`, `max_body`).
macro_rules! target_of {
    ($cfg:expr) => {
        $crate::http::client::Target {
            method: &$cfg.method,
            url: $cfg.url.as_deref(),
            path: $cfg.path.as_deref(),
            query: &$cfg.query,
            headers: &$cfg.headers,
            auth: $cfg.auth.as_ref(),
            timeout: $cfg.timeout.as_deref(),
            retries: $cfg.retries,
            max_wait: $cfg.max_wait.as_deref(),
            max_body: $cfg.max_body.as_deref(),
        }
    };
}
pub(crate) use target_of;

/// Teach the redactor an `Authorization`-style value and, for `Scheme credentials`, the
/// credentials alone.
pub fn learn_credential(ctx: &StepContext, value: &str) {
    ctx.redactor.add(value);
    if let Some((_, cred)) = value.trim().split_once(' ') {
        ctx.redactor.add(cred.trim());
    }
}

/// Join a connection's base URL and a step's path with exactly one `/`.
pub fn join(base: &str, path: &str) -> String {
    if path.is_empty() {
        return base.to_string();
    }
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

impl Target<'_> {
    /// What is wrong with the target fields on their own (see
    /// [`engine::step::StepConfig::problems`]): checked by `pipe validate` and before a run.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.url.is_some() && self.path.is_some() {
            out.push(Problem::at("path", "set either `url` or `path`, not both"));
        }
        if Method::from_bytes(self.method.trim().to_ascii_uppercase().as_bytes()).is_err() {
            out.push(Problem::at(
                "method",
                format!("invalid HTTP method `{}`", self.method),
            ));
        }
        for (key, text) in [("timeout", self.timeout), ("max_wait", self.max_wait)] {
            if let Some(Err(e)) = text.map(engine::duration::parse) {
                out.push(Problem::at(key, format!("`{key}`: {e}")));
            }
        }
        if let Some(Err(e)) = self.max_body.map(super::send::parse_size) {
            out.push(Problem::at("max_body", format!("`max_body`: {e}")));
        }
        out
    }

    /// Resolve URL, headers, auth and policy; register every secret with the redactor.
    pub fn prepare(&self, ctx: &StepContext) -> Result<Prepared, StepError> {
        let conn = Connection::from_ctx(ctx)?;
        let url_text = match (self.url, self.path) {
            (Some(_), Some(_)) => {
                return Err(StepError::fatal("set either `url` or `path`, not both"));
            }
            (Some(u), None) => u.to_string(),
            (None, path) => match &conn {
                Some(c) => join(&c.base_url, path.unwrap_or("")),
                None => {
                    return Err(StepError::fatal(
                        "`path` needs a connection with a `base_url` (or use `url`)",
                    ))
                }
            },
        };
        let url = url::Url::parse(&url_text).map_err(|e| {
            StepError::fatal(ctx.redactor.redact(&format!(
                "invalid URL `{}`: {e}",
                unparsed_url_shown(&url_text)
            )))
        })?;
        let method = Method::from_bytes(self.method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| StepError::fatal(format!("invalid HTTP method `{}`", self.method)))?;

        let mut headers = HeaderMap::new();
        let mut add = |name: &str, value: &str| -> Result<(), StepError> {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| StepError::fatal(format!("invalid header name `{name}`")))?;
            if secret_header(name) {
                learn_credential(ctx, value);
            }
            let v = HeaderValue::from_str(value).map_err(|_| {
                StepError::fatal(format!(
                    "header `{name}` has a value that is not valid in HTTP"
                ))
            })?;
            headers.insert(n, v);
            Ok(())
        };
        if let Some(c) = &conn {
            for (k, v) in &c.headers {
                if let Some(s) = scalar_text(&format!("headers.{k}"), v)? {
                    add(k, &s)?;
                }
            }
        }
        for (k, v) in self.headers {
            add(k, v)?;
        }

        let mut query = Vec::new();
        for (k, v) in self.query {
            match v {
                Value::Array(items) => {
                    for item in items {
                        if let Some(s) = scalar_text(&format!("query.{k}"), item)? {
                            query.push((k.clone(), s));
                        }
                    }
                }
                other => {
                    if let Some(s) = scalar_text(&format!("query.{k}"), other)? {
                        query.push((k.clone(), s));
                    }
                }
            }
        }

        let auth = self
            .auth
            .cloned()
            .or_else(|| conn.as_ref().and_then(|c| c.auth.clone()));
        if let Some(a) = &auth {
            a.learn_secrets(&ctx.redactor);
        }
        let timeout = match self.timeout {
            Some(t) => duration("timeout", Some(t), DEFAULT_TIMEOUT)?,
            None => duration(
                "connection timeout",
                conn.as_ref().and_then(|c| c.timeout.as_deref()),
                DEFAULT_TIMEOUT,
            )?,
        };
        let policy = Policy {
            retries: self.retries.unwrap_or(DEFAULT_RETRIES),
            max_wait: duration("max_wait", self.max_wait, DEFAULT_MAX_WAIT)?,
            timeout,
            max_body: match self.max_body {
                None => DEFAULT_MAX_BODY,
                Some(t) => super::send::parse_size(t)
                    .map_err(|e| StepError::fatal(format!("`max_body`: {e}")))?,
            },
        };
        Ok(Prepared {
            method,
            url,
            query,
            headers,
            auth,
            policy,
        })
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub url: url::Url,
    pub elapsed: Duration,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The start of the body, for error messages.
    pub fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let t = text.trim();
        if t.chars().count() > EXCERPT {
            format!("{}…", t.chars().take(EXCERPT).collect::<String>())
        } else {
            t.to_string()
        }
    }

    /// Fail unless the status is allowed (`expect`, or any 2xx when empty). 5xx and 429 are
    /// retryable failures (the step's `retry:` may run it again), others are not.
    pub fn check(
        &self,
        ctx: &StepContext,
        method: &Method,
        expect: &[u16],
    ) -> Result<(), StepError> {
        let ok = if expect.is_empty() {
            self.status.is_success()
        } else {
            expect.contains(&self.status.as_u16())
        };
        if ok {
            return Ok(());
        }
        let excerpt = self.excerpt();
        let msg = ctx.redactor.redact(&format!(
            "{method} {} returned HTTP {}{}{}",
            without_query(&self.url),
            self.status,
            if expect.is_empty() {
                String::new()
            } else {
                format!(" (expected {expect:?})")
            },
            if excerpt.is_empty() {
                String::new()
            } else {
                format!(": {excerpt}")
            }
        ));
        if retryable_status(self.status) {
            Err(StepError::retryable(msg))
        } else {
            Err(StepError::fatal(msg))
        }
    }
}

/// The URL as messages show it: without its query (which may hold API keys), a userinfo
/// password as `***`, and a user without a password (a token: `https://ghp_x@host`) too.
/// Every URL in an error goes through here (a reqwest error's own URL is dropped with
/// `without_url`); the redactor then masks the rest.
pub fn without_query(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    if u.password().is_some() {
        let _ = u.set_password(Some(engine::secrets::MASK));
    } else if !u.username().is_empty() {
        // A user without a password is a token (`https://ghp_x@host`).
        let _ = u.set_username(engine::secrets::MASK);
    }
    u.to_string()
}

/// URL text that did not parse, as messages show it: cut at the query, userinfo dropped.
pub fn unparsed_url_shown(text: &str) -> String {
    let head = text.split(['?', '#']).next().unwrap_or_default();
    match head.split_once("://") {
        Some((scheme, rest)) => match rest.split('/').next().and_then(|a| a.rsplit_once('@')) {
            Some((_, host)) => {
                let path = &rest[rest.find('/').unwrap_or(rest.len())..];
                format!("{scheme}://{}@{host}{path}", engine::secrets::MASK)
            }
            None => head.to_string(),
        },
        None => head.to_string(),
    }
}

fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
}

/// The longest delay a server's answer can ask for: anything longer (`Retry-After: 1e300`)
/// is this, so deadline arithmetic cannot overflow; it is far beyond any `max_wait`.
pub const LONGEST_SERVER_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Seconds a server sent as a delay: none when negative or not a number, capped at
/// [`LONGEST_SERVER_DELAY`].
pub fn server_delay(secs: f64) -> Option<Duration> {
    (secs >= 0.0 && !secs.is_nan()).then(|| {
        Duration::try_from_secs_f64(secs)
            .unwrap_or(LONGEST_SERVER_DELAY)
            .min(LONGEST_SERVER_DELAY)
    })
}

/// `Retry-After`: delay seconds or an HTTP-date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return server_delay(secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(LONGEST_SERVER_DELAY),
    )
}

/// `RateLimit-Reset`: seconds from now, a Unix time in seconds, an RFC 3339 datetime or an
/// HTTP-date.
pub fn reset_delay(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(n) = v.parse::<f64>() {
        if !(n >= 0.0 && n.is_finite()) {
            return None;
        }
        if n > 1_000_000_000.0 {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .as_secs_f64();
            return server_delay((n - now).max(0.0));
        }
        return server_delay(n);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        let ms = (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds();
        return Some(Duration::from_millis(ms.max(0) as u64).min(LONGEST_SERVER_DELAY));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(LONGEST_SERVER_DELAY),
    )
}

/// Exponential backoff with jitter for retry number `n` (1-based), at most `cap`.
fn backoff(n: u32, cap: Duration) -> Duration {
    let base = BACKOFF_BASE.saturating_mul(1u32 << (n.saturating_sub(1)).min(16));
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Up to +25 %, from the clock's low bits (no need for a random generator here).
    let jitter = base.mul_f64((nanos % 1000) as f64 / 4000.0);
    (base + jitter).min(cap)
}

/// What every request of one step passes before it is sent:
///
/// * the gate: closed until a server's deadline (`Retry-After` of a 429 or 503,
///   `RateLimit-Reset` once `RateLimit-Remaining` reaches 0, or the backoff of a 429 that
///   names none). An atomic deadline, so the open gate costs one load;
/// * the configured window (`rate_limit: {requests, per}`): at most `requests` starts per
///   `per`;
/// * adaptive concurrency, for steps with several requests in flight: a 429 halves how many
///   may be in flight (once per burst: the 429s of requests sent before the last halving do
///   not halve again); each run of that many successes lets one more in, up to the
///   configured concurrency.
#[derive(Debug)]
pub struct Limiter {
    window: Option<(usize, Duration)>,
    starts: Mutex<VecDeque<Instant>>,
    epoch: Instant,
    /// Nanoseconds after `epoch` before which no request is sent (0: open).
    closed_until: AtomicU64,
    concurrency: Concurrency,
}

#[derive(Debug)]
struct Concurrency {
    /// The configured concurrency (1: one request at a time, nothing to adapt).
    max: usize,
    /// Requests allowed in flight now.
    limit: AtomicUsize,
    active: AtomicUsize,
    /// Successes since the limit last changed.
    successes: AtomicUsize,
    /// Bumped by each halving.
    generation: AtomicU64,
    wake: tokio::sync::Notify,
}

/// A request's place in flight; dropping it frees the place.
pub struct Permit<'a> {
    limiter: &'a Limiter,
    counted: bool,
    generation: u64,
    /// The in-flight limit when the request was sent (1: it was alone).
    limit: usize,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.counted {
            let c = &self.limiter.concurrency;
            c.active.fetch_sub(1, Ordering::AcqRel);
            c.wake.notify_waiters();
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(None)
    }
}

impl Limiter {
    pub fn new(window: Option<(usize, Duration)>) -> Self {
        Limiter {
            window: window.filter(|(n, _)| *n > 0),
            starts: Mutex::default(),
            epoch: Instant::now(),
            closed_until: AtomicU64::new(0),
            concurrency: Concurrency {
                max: 1,
                limit: AtomicUsize::new(1),
                active: AtomicUsize::new(0),
                successes: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
                wake: tokio::sync::Notify::new(),
            },
        }
    }

    /// Up to `n` requests in flight at once (what the step's `concurrency` allows).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        let n = n.max(1);
        self.concurrency.max = n;
        self.concurrency.limit = AtomicUsize::new(n);
        self
    }

    /// How many requests may be in flight now.
    pub fn in_flight_limit(&self) -> usize {
        self.concurrency.limit.load(Ordering::Acquire)
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Close the gate until `until` (a later deadline already set stays).
    pub fn close_until(&self, until: Instant) {
        self.closed_until
            .fetch_max(self.nanos(until).max(1), Ordering::AcqRel);
    }

    /// How long the gate stays closed.
    fn gate_wait(&self) -> Option<Duration> {
        let until = self.closed_until.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let now = self.nanos(Instant::now());
        (now < until).then(|| Duration::from_nanos(until - now))
    }

    /// Wait for a place in flight, the gate to be open and a slot of the window.
    pub async fn acquire(
        &self,
        ctx: &StepContext,
        max_wait: Duration,
    ) -> Result<Permit<'_>, StepError> {
        let permit = self.place(ctx).await?;
        loop {
            if let Some(wait) = self.gate_wait() {
                if wait > max_wait {
                    return Err(StepError::fatal(format!(
                        "the API asks to wait {} (Retry-After or RateLimit-Reset), longer than max_wait {}",
                        engine::duration::human(wait),
                        engine::duration::human(max_wait)
                    )));
                }
                sleep(ctx, wait.max(Duration::from_millis(1))).await?;
                continue;
            }
            let Some((n, per)) = self.window else {
                return Ok(permit);
            };
            let wait = {
                let mut starts = self.starts.lock().unwrap();
                let now = Instant::now();
                while starts
                    .front()
                    .is_some_and(|s| now.duration_since(*s) >= per)
                {
                    starts.pop_front();
                }
                if starts.len() < n {
                    starts.push_back(now);
                    return Ok(permit);
                }
                (starts[0] + per).saturating_duration_since(now)
            };
            sleep(ctx, wait.max(Duration::from_millis(1))).await?;
        }
    }

    /// A place among the requests in flight.
    async fn place(&self, ctx: &StepContext) -> Result<Permit<'_>, StepError> {
        let c = &self.concurrency;
        let generation = c.generation.load(Ordering::Acquire);
        if c.max <= 1 {
            return Ok(Permit {
                limiter: self,
                counted: false,
                generation,
                limit: 1,
            });
        }
        loop {
            let wake = c.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let limit = c.limit.load(Ordering::Acquire);
            let active = c.active.load(Ordering::Acquire);
            if active < limit
                && c.active
                    .compare_exchange(active, active + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Ok(Permit {
                    limiter: self,
                    counted: true,
                    generation: c.generation.load(Ordering::Acquire),
                    limit,
                });
            }
            if active < limit {
                continue;
            }
            cancellable(ctx, wake).await?;
        }
    }

    /// A 429: halve the in-flight limit, once per burst.
    fn throttled(&self, permit: &Permit<'_>) {
        let c = &self.concurrency;
        if c.max <= 1 {
            return;
        }
        if c.generation
            .compare_exchange(
                permit.generation,
                permit.generation + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            let limit = c.limit.load(Ordering::Acquire);
            c.limit.store((limit / 2).max(1), Ordering::Release);
            c.successes.store(0, Ordering::Release);
        }
    }

    /// A request that was not throttled: after as many successes as the limit, one more.
    fn succeeded(&self) {
        let c = &self.concurrency;
        if c.max <= 1 {
            return;
        }
        let limit = c.limit.load(Ordering::Acquire);
        if limit >= c.max {
            return;
        }
        if c.successes.fetch_add(1, Ordering::AcqRel) + 1 >= limit {
            c.successes.store(0, Ordering::Release);
            let _ = c.limit.compare_exchange(
                limit,
                (limit + 1).min(c.max),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            c.wake.notify_waiters();
        }
    }

    /// Learn from `RateLimit-Remaining` / `RateLimit-Reset`.
    fn observe(&self, headers: &HeaderMap) {
        let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let remaining = get("ratelimit-remaining").and_then(|v| v.trim().parse::<f64>().ok());
        if remaining.is_some_and(|r| r <= 0.0) {
            if let Some(d) = get("ratelimit-reset").and_then(reset_delay) {
                self.close_until(Instant::now() + d);
            }
        }
    }
}

/// Sends the requests of one step.
pub struct Sender<'a> {
    pub ctx: &'a StepContext,
    pub prep: &'a Prepared,
    pub limiter: Limiter,
    /// Retries so far (all requests of the step).
    pub retries: AtomicU64,
}

impl<'a> Sender<'a> {
    pub fn new(ctx: &'a StepContext, prep: &'a Prepared, limiter: Limiter) -> Self {
        Sender {
            ctx,
            prep,
            limiter,
            retries: AtomicU64::new(0),
        }
    }

    /// Send one request, retrying connection errors, 5xx and 429 (honouring `Retry-After`)
    /// and, with OAuth2, refreshing the token once on a 401. Returns the last response
    /// whatever its status; the caller checks it.
    pub async fn send(
        &self,
        url: &url::Url,
        with_base_query: bool,
        extra_query: &[(String, String)],
        body: &Body,
    ) -> Result<Reply, StepError> {
        let ctx = self.ctx;
        let p = self.prep;
        let mut attempt = 0u32;
        let mut refreshed = false;
        let shown = format!("{} {}", p.method, without_query(url));
        loop {
            let permit = self.limiter.acquire(ctx, p.policy.max_wait).await?;
            let mut rb = client()
                .request(p.method.clone(), url.clone())
                .headers(p.headers.clone())
                .timeout(p.policy.timeout);
            if with_base_query && !p.query.is_empty() {
                rb = rb.query(&p.query);
            }
            if !extra_query.is_empty() {
                rb = rb.query(extra_query);
            }
            rb = match body {
                Body::None => rb,
                Body::Json(v) => rb.json(v),
                Body::Form(f) => rb.form(f),
                Body::Text(t) => rb.body(t.clone()),
                Body::Bytes(b) => rb.body(b.clone()),
            };
            let mut token_used = None;
            if let Some(auth) = &p.auth {
                let (b, t) = auth.apply(rb, ctx, &p.policy).await?;
                rb = b;
                token_used = t;
            }
            let started = Instant::now();
            let max_body = p.policy.max_body;
            let outcome = cancellable(ctx, async {
                let mut resp = rb.send().await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let final_url = resp.url().clone();
                if resp.content_length().is_some_and(|n| n > max_body) {
                    return Ok(Err(BodyTooLarge));
                }
                let mut body = Vec::with_capacity(
                    resp.content_length()
                        .unwrap_or(0)
                        .min(max_body)
                        .min(64 << 20) as usize,
                );
                while let Some(chunk) = resp.chunk().await? {
                    if (body.len() + chunk.len()) as u64 > max_body {
                        return Ok(Err(BodyTooLarge));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, reqwest::Error>(Ok((status, headers, final_url, body)))
            })
            .await?;
            let (status, headers, final_url, bytes) = match outcome {
                Ok(Ok(v)) => v,
                Ok(Err(BodyTooLarge)) => {
                    return Err(StepError::fatal(format!(
                        "{shown}: the response body is larger than max_body ({} bytes); \
                         raise `max_body` if the API really sends that much",
                        max_body
                    )));
                }
                Err(e) => {
                    drop(permit);
                    let msg = ctx
                        .redactor
                        .redact(&format!("{shown}: {}", error_chain(&e.without_url())));
                    if attempt < p.policy.retries {
                        attempt += 1;
                        self.retries.fetch_add(1, Ordering::Relaxed);
                        let wait = backoff(attempt, p.policy.max_wait);
                        ctx.log(
                            Level::Warning,
                            &format!(
                                "{msg}; retry {attempt}/{} in {}",
                                p.policy.retries,
                                engine::duration::human(wait)
                            ),
                        );
                        sleep(ctx, wait).await?;
                        continue;
                    }
                    return Err(StepError::retryable(format!(
                        "{msg}{}",
                        if attempt > 0 {
                            format!(" (after {attempt} retries)")
                        } else {
                            String::new()
                        }
                    )));
                }
            };
            for v in headers.get_all(AUTHORIZATION) {
                if let Ok(s) = v.to_str() {
                    learn_credential(ctx, s);
                }
            }
            self.limiter.observe(&headers);
            let reply = Reply {
                status,
                headers,
                body: bytes,
                url: final_url,
                elapsed: started.elapsed(),
            };
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                if let (Some(auth), Some(used)) = (&p.auth, &token_used) {
                    refreshed = true;
                    ctx.log(
                        Level::Info,
                        &format!("{shown}: HTTP 401, refreshing the OAuth2 token"),
                    );
                    auth.invalidate(ctx, used).await;
                    continue;
                }
            }
            let throttled = status == StatusCode::TOO_MANY_REQUESTS;
            if throttled {
                self.limiter.throttled(&permit);
            } else {
                self.limiter.succeeded();
            }
            // A 429 of a request sent among several is the step's pace, not this request's
            // failure: the in-flight limit was just halved, so it is tried again without
            // spending a retry. Alone in flight, a 429 counts as any failure.
            let charged = !throttled || permit.limit <= 1;
            drop(permit);
            if retryable_status(status) && (attempt < p.policy.retries || !charged) {
                let server_wait = retry_after(&reply.headers);
                let wait = match server_wait {
                    Some(d) if d > p.policy.max_wait => {
                        return Err(StepError::retryable(format!(
                            "{shown} returned HTTP {status} with Retry-After {}, longer than max_wait {}",
                            engine::duration::human(d),
                            engine::duration::human(p.policy.max_wait)
                        )));
                    }
                    Some(d) => d,
                    None => backoff(attempt + 1, p.policy.max_wait),
                };
                if charged {
                    attempt += 1;
                }
                self.retries.fetch_add(1, Ordering::Relaxed);
                ctx.log(
                    Level::Warning,
                    &format!(
                        "{shown} returned HTTP {status}; {} in {}",
                        if charged {
                            format!("retry {attempt}/{}", p.policy.retries)
                        } else {
                            "fewer requests in flight, trying again".to_string()
                        },
                        engine::duration::human(wait)
                    ),
                );
                if throttled || server_wait.is_some() {
                    // The server's deadline holds for every request of the step.
                    self.limiter.close_until(Instant::now() + wait);
                } else {
                    sleep(ctx, wait).await?;
                }
                continue;
            }
            return Ok(reply);
        }
    }
}

/// A response body past `max_body`.
struct BodyTooLarge;

/// An error and its causes on one line (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {

    #[test]
    fn urls_in_messages_show_no_query_and_no_userinfo() {
        let u = url::Url::parse("https://ghp_token@api.example.com/x?key=k").unwrap();
        assert_eq!(without_query(&u), "https://***@api.example.com/x");
        let u = url::Url::parse("https://user:pw@api.example.com/x").unwrap();
        assert_eq!(without_query(&u), "https://user:***@api.example.com/x");
        assert_eq!(
            unparsed_url_shown("https://tok@exa mple.com/p?key=k"),
            "https://***@exa mple.com/p"
        );
        assert_eq!(unparsed_url_shown("not a url?key=k"), "not a url");
    }

    #[test]
    fn absurd_server_delays_are_capped_not_a_panic() {
        let mut h = HeaderMap::new();
        for v in ["1e300", "18446744073709551616", "inf"] {
            h.insert(RETRY_AFTER, v.parse().unwrap());
            assert_eq!(retry_after(&h), Some(LONGEST_SERVER_DELAY), "{v}");
        }
        h.insert(RETRY_AFTER, "-1".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        assert_eq!(reset_delay("1e300"), Some(LONGEST_SERVER_DELAY));
        assert_eq!(reset_delay("2"), Some(Duration::from_secs(2)));
    }
    use super::*;
    use crate::http::testutil::{ctx, Collect};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_429_halves_the_in_flight_limit_once_per_burst_and_successes_grow_it_back() {
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, None);
        let limiter = Limiter::new(None).with_concurrency(8);
        let first = limiter.acquire(&c, DEFAULT_MAX_WAIT).await.unwrap();
        let second = limiter.acquire(&c, DEFAULT_MAX_WAIT).await.unwrap();
        assert_eq!(first.limit, 8);
        limiter.throttled(&first);
        // The second 429 of the same burst (sent before the halving) does not halve again.
        limiter.throttled(&second);
        assert_eq!(limiter.in_flight_limit(), 4);
        drop((first, second));
        let third = limiter.acquire(&c, DEFAULT_MAX_WAIT).await.unwrap();
        limiter.throttled(&third);
        assert_eq!(limiter.in_flight_limit(), 2);
        drop(third);
        limiter.succeeded();
        assert_eq!(limiter.in_flight_limit(), 2);
        limiter.succeeded();
        assert_eq!(
            limiter.in_flight_limit(),
            3,
            "one more after `limit` successes"
        );
        for _ in 0..100 {
            limiter.succeeded();
        }
        assert_eq!(
            limiter.in_flight_limit(),
            8,
            "never above the configured concurrency"
        );
    }

    #[tokio::test]
    async fn only_the_limit_may_be_in_flight() {
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, None);
        let limiter = Limiter::new(None).with_concurrency(2);
        let a = limiter.acquire(&c, DEFAULT_MAX_WAIT).await.unwrap();
        let b = limiter.acquire(&c, DEFAULT_MAX_WAIT).await.unwrap();
        let third = limiter.acquire(&c, DEFAULT_MAX_WAIT);
        tokio::pin!(third);
        assert!(
            futures::poll!(third.as_mut()).is_pending(),
            "a third request waits for a place"
        );
        drop(a);
        let c3 = third.await.unwrap();
        drop((b, c3));
    }

    #[tokio::test]
    async fn a_closed_gate_beyond_max_wait_fails_and_a_past_deadline_is_open() {
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, None);
        let limiter = Limiter::new(None);
        limiter.close_until(Instant::now() + Duration::from_secs(120));
        let err = limiter
            .acquire(&c, Duration::from_secs(5))
            .await
            .err()
            .expect("a wait beyond max_wait fails");
        assert!(
            err.message.contains("longer than max_wait"),
            "{}",
            err.message
        );
        let limiter = Limiter::new(None);
        limiter.close_until(Instant::now());
        assert!(limiter.gate_wait().is_none());
        assert!(limiter.acquire(&c, DEFAULT_MAX_WAIT).await.is_ok());
    }
}
