//! Fault injection: one middleware in front of every endpoint counts the request,
//! tracks concurrency and applies the first matching [`Fault`](crate::Fault).
//!
//! Whether a fault hits is decided by a hash of (seed, endpoint, request key, attempt,
//! rule index) rather than a random draw, so a failing run can be replayed exactly. The
//! request key identifies "the same request" across retries: the sorted query for
//! tickets, the e-mail for login, the temporary code for otp, the bearer token for
//! logout, the method and path for sheets and BigQuery, and nothing for token (every
//! token request is an attempt of the same one).
//!
//! BigQuery requests count under one of three endpoints (`bigquery_upload` for media
//! uploads, `bigquery_jobs` for jobs and queries, `bigquery` for the rest); a rule for
//! `bigquery` applies to all three. A `job_error` fault does not answer the request: it
//! rides on it (as a request extension) into the handler, whose job then fails.

use crate::server::Kill;
use crate::{hash, hash_str, unit, FaultKind, Paging, Shared};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const ENDPOINTS: &[&str] = &[
    "tickets",
    "login",
    "otp",
    "logout",
    "token",
    "sheets",
    "bigquery",
    "bigquery_upload",
    "bigquery_jobs",
    "qockpit",
    "qockpit_ping",
    "qockpit_integrations",
    "qockpit_results",
    "carol_token",
    "carol_send",
    "carol_schema",
    "carol_delete",
    "carol_heartbeat",
];

/// Whether a rule for `rule` applies to a request counted under `endpoint`.
fn rule_matches(rule: &str, endpoint: &str) -> bool {
    rule == endpoint
        || rule == "bigquery" && endpoint.starts_with("bigquery")
        || rule == "qockpit" && endpoint.starts_with("qockpit_")
}

/// Which endpoint a request targets (None: not subject to counting or faults).
fn endpoint_of(method: &Method, path: &str) -> Option<&'static str> {
    match (method.as_str(), path) {
        (_, "/api/v2/tickets") => Some("tickets"),
        ("POST", "/api/login") => Some("login"),
        ("POST", "/api/login/otp") => Some("otp"),
        ("POST", "/api/logout") => Some("logout"),
        ("POST", "/token") => Some("token"),
        (_, p) if p.starts_with("/v4/spreadsheets/") => Some("sheets"),
        (_, p) if p.starts_with("/upload/bigquery/v2/") => Some("bigquery_upload"),
        (_, p)
            if p.starts_with("/bigquery/v2/")
                && (p.contains("/jobs") || p.contains("/queries")) =>
        {
            Some("bigquery_jobs")
        }
        (_, p) if p.starts_with("/bigquery/v2/") => Some("bigquery"),
        (m, p) if crate::carol::endpoint_of(m, p).is_some() => crate::carol::endpoint_of(m, p),
        (_, p) => crate::qockpit::endpoint_of(p),
    }
}

fn request_key(endpoint: &str, req: &axum::http::request::Parts, body: &Bytes) -> String {
    let field = |name: &str| {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get(name).and_then(|s| s.as_str()).map(str::to_string))
            .unwrap_or_default()
    };
    match endpoint {
        "tickets" => {
            let mut pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(req.uri.query().unwrap_or("")).unwrap_or_default();
            pairs.sort();
            serde_urlencoded::to_string(pairs).unwrap_or_default()
        }
        "login" => field("email"),
        "otp" => field("tmp"),
        "logout" => req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        // Every job a client creates is an attempt of "the next job", so a `job_error`
        // fault with `times: 1` fails exactly one job.
        "bigquery_jobs" | "bigquery_upload"
            if req.method == Method::POST && !req.uri.path().ends_with("/cancel") =>
        {
            "job".to_string()
        }
        "sheets" | "bigquery" | "bigquery_jobs" | "bigquery_upload" | "carol_send" => {
            format!("{} {}", req.method, req.uri.path())
        }
        // A result is "the same request" when it re-sends the same period.
        "qockpit_ping" | "qockpit_integrations" | "qockpit_results" => {
            format!("{} {} {}", req.method, req.uri.path(), field("period"))
        }
        _ => String::new(),
    }
}

/// The tickets page a request asks for, 1-based (see [`crate::Fault::page`]).
fn page_of(req: &axum::http::request::Parts, paging: Paging) -> u32 {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(req.uri.query().unwrap_or("")).unwrap_or_default();
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let limit = get("limit")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(20)
        .max(1);
    let page = match paging {
        Paging::Page => get("offset").and_then(|v| v.parse().ok()).unwrap_or(1),
        Paging::Offset => {
            get("offset")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                / limit
                + 1
        }
        Paging::Cursor => get("cursor")
            .and_then(crate::tiflux::parse_cursor)
            .map_or(1, |(page, _)| page),
        Paging::Stripe => get("starting_after")
            .and_then(crate::tiflux::skip_after)
            .map_or(1, |skip| skip as u64 / limit + 1),
    };
    u32::try_from(page).unwrap_or(u32::MAX)
}

/// A tickets page the handler must serve short (a request extension).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageFault {
    /// The most tickets the page may hold.
    pub records: usize,
}

/// The middleware.
pub(crate) async fn gate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(endpoint) = endpoint_of(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let _in_flight = shared.enter(endpoint);
    let (parts, body) = req.into_parts();
    let limit = if endpoint == "bigquery_upload" {
        crate::bigquery::MAX_UPLOAD_BODY
    } else if endpoint == "carol_send" {
        crate::carol::max_body(&shared.opts)
    } else {
        64 << 20
    };
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::BAD_REQUEST, "unreadable request body").into_response(),
    };
    let chosen = choose(&shared, endpoint, &parts, &bytes).await;
    // `latency_ms` is the tickets endpoint's response time, as a real server's: the page is
    // built while the clock runs and the response leaves `latency_ms` after the request
    // (after latency faults, which add to it). Building it after the wait would add the
    // fake's own CPU to every page's wait, which a real API does not.
    let deadline = (endpoint == "tickets" && shared.opts.latency_ms > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_millis(shared.opts.latency_ms));
    if endpoint == "tickets" {
        if let Some(seconds) = shared.over_rate_limit() {
            return rate_limited(endpoint, HeaderValue::from(seconds));
        }
    }
    let kill = parts.extensions.get::<Kill>().cloned();
    let mut req = Request::from_parts(parts, Body::from(bytes));
    // The connection a `Reset` fault drops (once the latency has passed).
    let mut reset = None;
    let response = match chosen {
        None => next.run(req).await,
        Some(FaultKind::JobError { reason, message }) => {
            req.extensions_mut()
                .insert(crate::bigquery::JobError { reason, message });
            next.run(req).await
        }
        Some(kind @ (FaultKind::EmptyPage | FaultKind::ShortPage { .. })) => {
            let records = match kind {
                FaultKind::ShortPage { records } => records,
                _ => 0,
            };
            req.extensions_mut().insert(PageFault { records });
            next.run(req).await
        }
        Some(FaultKind::OversizedBody { bytes }) => oversized(bytes),
        Some(FaultKind::Status { code }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error(
                endpoint,
                status,
                "injected_fault",
                "sandbox fault injection",
            )
        }
        Some(FaultKind::RetryAfterSeconds { seconds }) => {
            rate_limited(endpoint, HeaderValue::from(seconds))
        }
        Some(FaultKind::RetryAfterDate { seconds }) => {
            let at = chrono::Utc::now() + chrono::Duration::seconds(seconds as i64);
            let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
            rate_limited(endpoint, HeaderValue::from_str(&date).expect("ascii date"))
        }
        Some(FaultKind::Unauthorized) => error(
            endpoint,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "invalid_token",
        ),
        Some(FaultKind::Reset) => {
            reset = kill;
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Some(FaultKind::Truncate) => truncate(next.run(req).await).await,
        Some(FaultKind::SlowBody { ms }) => slow(next.run(req).await, ms).await,
        Some(FaultKind::Latency { .. }) => unreachable!("latency faults are applied in choose"),
    };
    if let Some(at) = deadline {
        sleep_until_precisely(at).await;
    }
    if let Some(k) = reset {
        k.kill();
    }
    response
}

/// Wait until `at`, to a fraction of a millisecond. tokio's timer works in whole
/// milliseconds and rounds up (a 20 ms sleep took 20.5–21.5 ms), so the last 2 ms are slept
/// on a blocking thread, whose sleep is precise: `latency_ms` means what it says.
async fn sleep_until_precisely(at: tokio::time::Instant) {
    if let Some(coarse) = at.checked_sub(Duration::from_millis(2)) {
        tokio::time::sleep_until(coarse).await;
    }
    let rest = at.saturating_duration_since(tokio::time::Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

/// Apply latency faults and return the first other fault that hits.
async fn choose(
    shared: &Shared,
    endpoint: &str,
    parts: &axum::http::request::Parts,
    body: &Bytes,
) -> Option<FaultKind> {
    if !shared
        .opts
        .faults
        .iter()
        .any(|f| rule_matches(&f.endpoint, endpoint))
    {
        return None;
    }
    let key = request_key(endpoint, parts, body);
    let attempt = {
        let mut a = shared.attempts.lock().unwrap();
        let n = a.entry((endpoint.to_string(), key.clone())).or_default();
        *n += 1;
        *n
    };
    let page = page_of(parts, shared.opts.tickets_api.paging);
    for (i, f) in shared.opts.faults.iter().enumerate() {
        if !rule_matches(&f.endpoint, endpoint)
            || f.page.is_some_and(|p| endpoint != "tickets" || p != page)
            || f.times.is_some_and(|t| attempt > t)
        {
            continue;
        }
        let h = hash(
            shared.opts.seed,
            &[hash_str(endpoint), hash_str(&key), attempt as u64, i as u64],
        );
        if f.rate < 1.0 && unit(h) >= f.rate {
            continue;
        }
        // A page fault needs a page.
        if matches!(f.kind, FaultKind::EmptyPage | FaultKind::ShortPage { .. })
            && endpoint != "tickets"
        {
            continue;
        }
        // A job error needs a job: only requests that create one (POSTs) take it.
        if matches!(f.kind, FaultKind::JobError { .. })
            && (parts.method != Method::POST || key != "job")
        {
            continue;
        }
        match &f.kind {
            FaultKind::Latency { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
            other => return Some(other.clone()),
        }
    }
    None
}

/// A 429 in the endpoint's error shape with this `Retry-After`.
fn rate_limited(endpoint: &str, retry_after: HeaderValue) -> Response {
    let mut r = error(
        endpoint,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "rate limit exceeded",
    );
    r.headers_mut().insert(header::RETRY_AFTER, retry_after);
    r
}

/// An error in the endpoint family's own shape.
pub(crate) fn error(endpoint: &str, status: StatusCode, code: &str, message: &str) -> Response {
    match endpoint {
        "sheets" | "bigquery" | "bigquery_jobs" | "bigquery_upload" => {
            crate::google::google_error(status, message)
        }
        "qockpit_ping" | "qockpit_integrations" | "qockpit_results" => {
            let message = if status == StatusCode::UNAUTHORIZED {
                "invalid token"
            } else {
                message
            };
            crate::qockpit::detail(status, message)
        }
        e if e.starts_with("carol_") => crate::carol::carol_error(status, message, None),
        "token" => {
            let code = if status == StatusCode::UNAUTHORIZED {
                "invalid_client"
            } else {
                code
            };
            (
                status,
                axum::Json(json!({"error": code, "error_description": message})),
            )
                .into_response()
        }
        _ => (status, axum::Json(json!({"error": code}))).into_response(),
    }
}

async fn body_bytes(resp: Response) -> (axum::http::response::Parts, Bytes) {
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    (parts, bytes)
}

/// Announce the full length, send about half of it, then fail the body so hyper
/// closes the connection.
async fn truncate(resp: Response) -> Response {
    let (mut parts, bytes) = body_bytes(resp).await;
    let full = bytes.len().max(2);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(full + 16));
    let half = bytes.slice(..bytes.len() / 2);
    // Pause after the partial body so hyper flushes the head and the partial body
    // before the error makes it drop the connection.
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let half = half.clone();
        async move {
            match step {
                0 => Some((Ok(half), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::BrokenPipe,
                            "sandbox fault: truncated body",
                        )),
                        2,
                    ))
                }
                _ => None,
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// A 200 with a JSON list of `bytes` bytes (`[{"n":0},{"n":0},…]`), produced chunk by chunk
/// (the fake holds one chunk, whatever the size) and sent without a `Content-Length`.
fn oversized(bytes: u64) -> Response {
    const CHUNK: usize = 64 << 10;
    const ITEM: &[u8] = br#"{"n":0},"#;
    let chunk = Bytes::from(ITEM.repeat(CHUNK / ITEM.len()));
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= bytes {
                return None;
            }
            let next = if sent == 0 {
                Bytes::from_static(b"[")
            } else if sent + chunk.len() as u64 + 8 >= bytes {
                Bytes::from_static(br#"{"n":0}]"#)
            } else {
                chunk
            };
            let len = next.len() as u64;
            let done = if next.ends_with(b"]") {
                bytes
            } else {
                sent + len
            };
            Some((Ok::<Bytes, std::io::Error>(next), done))
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Send the body in about ten chunks, `ms` apart.
async fn slow(resp: Response, ms: u64) -> Response {
    let (mut parts, bytes) = body_bytes(resp).await;
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let step = bytes.len().div_ceil(10).max(1);
    let chunks: Vec<Bytes> = (0..bytes.len())
        .step_by(step)
        .map(|i| bytes.slice(i..(i + step).min(bytes.len())))
        .collect();
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), true),
        move |(mut it, first)| async move {
            let chunk = it.next()?;
            if !first {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Some((Ok::<Bytes, std::io::Error>(chunk), (it, false)))
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}
