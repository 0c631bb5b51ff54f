//! The sandbox web login and the Tiflux v2 tickets endpoint (one base URL, as in the
//! contract's "Sandbox web login" section).
//!
//! Login is two-factor: `POST /api/login` checks the password and "e-mails" an OTP by
//! writing it, after `otp_delay_ms`, into the OTP spreadsheet held by the Google fake;
//! the pipeline must read it through the Sheets API and answer `POST /api/login/otp`,
//! which hands out the bearer token in the `authorization` response header.

use crate::faults::{self, error};
use crate::tickets::{self, Filter, Query};
use crate::{hash, random_token, Paging, Shared};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use chrono::{NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the OTP "e-mail" lands.
pub(crate) const OTP_RANGE: &str = "OTP!A2:B2";
/// An OTP is valid this long after the first-factor login.
const OTP_TTL: Duration = Duration::from_secs(300);
/// A session token is valid this long.
const SESSION_TTL: Duration = Duration::from_secs(3600);
/// The advertised (not enforced: 429s come from faults) requests per minute.
const RATE_LIMIT: u64 = 1000;

struct Pending {
    otp: String,
    issued: Instant,
    used: bool,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<String, Pending>,
    tokens: HashMap<String, Instant>,
    /// (minute since the epoch, requests in it)
    window: (i64, u64),
}

/// Logins in progress and live sessions.
#[derive(Default)]
pub(crate) struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    pub(crate) fn live(&self) -> u64 {
        let now = Instant::now();
        self.inner
            .lock()
            .unwrap()
            .tokens
            .values()
            .filter(|exp| **exp > now)
            .count() as u64
    }

    fn valid(&self, headers: &HeaderMap) -> Option<String> {
        let token = bearer(headers)?;
        let inner = self.inner.lock().unwrap();
        inner
            .tokens
            .get(&token)
            .filter(|exp| **exp > Instant::now())
            .map(|_| token)
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/login", post(login))
        .route("/api/login/otp", post(login_otp))
        .route("/api/logout", post(logout))
        .route("/api/v2/tickets", get(list_tickets))
        .route("/__sandbox/stats", get(stats))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not_found"}))) })
        .layer(middleware::from_fn_with_state(shared.clone(), faults::gate))
        .with_state(shared)
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.stats()).into_response()
}

fn json_body(body: &Bytes) -> Option<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(|v| v.is_object())
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v.get(name).and_then(|s| s.as_str()).unwrap_or("")
}

async fn login(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(v) = json_body(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request"})),
        )
            .into_response();
    };
    if field(&v, "email") != shared.user || field(&v, "password") != shared.password {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_credentials"})),
        )
            .into_response();
    }
    let n = shared.login_count.fetch_add(1, Ordering::SeqCst) + 1;
    let otp = format!(
        "{:06}",
        hash(shared.opts.seed, &[0x006f_7470, n]) % 1_000_000
    );
    let tmp = random_token(16);
    shared.tiflux.inner.lock().unwrap().pending.insert(
        tmp.clone(),
        Pending {
            otp: otp.clone(),
            issued: Instant::now(),
            used: false,
        },
    );
    let writer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(shared.opts.otp_delay_ms)).await;
            let sent_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
            shared.google.write(
                &shared.otp_sheet,
                OTP_RANGE,
                vec![vec![json!(otp), json!(sent_at)]],
            );
        })
    };
    let mut bg = shared.background.lock().unwrap();
    bg.retain(|h| !h.is_finished());
    bg.push(writer);
    Json(json!({"tmp": tmp})).into_response()
}

async fn login_otp(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(v) = json_body(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request"})),
        )
            .into_response();
    };
    let (tmp, otp) = (field(&v, "tmp"), field(&v, "otp"));
    let token = {
        let mut inner = shared.tiflux.inner.lock().unwrap();
        let ok = match inner.pending.get_mut(tmp) {
            Some(p) if !p.used && p.issued.elapsed() <= OTP_TTL && p.otp == otp => {
                p.used = true;
                true
            }
            _ => false,
        };
        inner
            .pending
            .retain(|_, p| !p.used && p.issued.elapsed() <= OTP_TTL);
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_otp"})),
            )
                .into_response();
        }
        let token = random_token(24);
        let now = Instant::now();
        inner.tokens.retain(|_, exp| *exp > now);
        inner.tokens.insert(token.clone(), now + SESSION_TTL);
        token
    };
    shared.count_login();
    let mut resp = Json(json!({})).into_response();
    resp.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("hex token"),
    );
    resp
}

async fn logout(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let Some(token) = shared.tiflux.valid(&headers) else {
        return error("logout", StatusCode::UNAUTHORIZED, "invalid_token", "");
    };
    shared.tiflux.inner.lock().unwrap().tokens.remove(&token);
    shared.count_logout();
    StatusCode::NO_CONTENT.into_response()
}

fn unprocessable(message: impl Into<String>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": message.into()})),
    )
        .into_response()
}

/// ISO 8601 with an offset; a bare datetime or date is taken in the help desk's -03:00.
fn parse_datetime(s: &str, end_of_day: bool) -> Option<i64> {
    // An unencoded `+` in a query string arrives as a space.
    let s = s.trim().replace(' ', "+");
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&s) {
        return Some(t.timestamp());
    }
    let local = |n: NaiveDateTime| n.and_utc().timestamp() + 3 * 3600;
    for f in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(&s, f) {
            return Some(local(n));
        }
    }
    let d = NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok()?;
    let t = if end_of_day {
        d.and_hms_opt(23, 59, 59)?
    } else {
        d.and_hms_opt(0, 0, 0)?
    };
    Some(local(t))
}

#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn parse_ids(name: &str, value: &str) -> Result<Vec<u64>, Response> {
    let ids: Result<Vec<u64>, _> = value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<u64>())
        .collect();
    let ids =
        ids.map_err(|_| unprocessable(format!("{name} must be a comma-separated list of ids")))?;
    if ids.len() > 15 {
        return Err(unprocessable(format!("{name} accepts at most 15 ids")));
    }
    Ok(ids)
}

/// A `cursor` of [`Paging::Cursor`]: `c<page>_<skip>` → (page number, tickets to skip).
/// The page number makes every cursor of a walk distinct, even one that does not advance.
pub(crate) fn parse_cursor(text: &str) -> Option<(u64, usize)> {
    let (page, skip) = text.strip_prefix('c')?.split_once('_')?;
    Some((page.parse().ok()?, skip.parse().ok()?))
}

/// The tickets to skip after `starting_after=<ticket_number>` ([`Paging::Stripe`]).
pub(crate) fn skip_after(text: &str) -> Option<usize> {
    let n: u64 = text.trim().parse().ok()?;
    usize::try_from(n.checked_sub(tickets::FIRST_NUMBER)? + 1).ok()
}

async fn list_tickets(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    fault: Option<axum::Extension<faults::PageFault>>,
    RawQuery(query): RawQuery,
) -> Response {
    let api = &shared.opts.tickets_api;
    if shared.tiflux.valid(&headers).is_none() {
        return error("tickets", StatusCode::UNAUTHORIZED, "invalid_token", "");
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let (mut page, mut limit) = (1usize, 20usize);
    let mut skip: Option<usize> = None;
    let mut cursor_page = 1u64;
    let mut q = Query {
        filter: Filter::All,
        by_solved: false,
        start: None,
        end: None,
        desk_ids: None,
        client_ids: None,
    };
    for (k, v) in &pairs {
        match k.as_str() {
            "offset" if api.paging == Paging::Offset => match v.parse::<usize>() {
                Ok(s) => skip = Some(s),
                _ => {
                    return unprocessable("offset must be a number of tickets to skip (0, 1, ...)")
                }
            },
            "offset" if api.paging == Paging::Page => match v.parse::<usize>() {
                Ok(p) if p >= 1 => page = p,
                _ => return unprocessable("offset must be a page number (1, 2, ...)"),
            },
            "cursor" if api.paging == Paging::Cursor => match parse_cursor(v) {
                Some((p, s)) => {
                    cursor_page = p;
                    skip = Some(s);
                }
                None => return unprocessable("cursor is not one this API gave out"),
            },
            "starting_after" if api.paging == Paging::Stripe => match skip_after(v) {
                Some(s) => skip = Some(s),
                None => return unprocessable("starting_after must be a ticket_number"),
            },
            "limit" => match v.parse::<usize>() {
                Ok(l) if (1..=200).contains(&l) => limit = l,
                _ => return unprocessable("limit must be between 1 and 200"),
            },
            "filter_by" => {
                q.filter = match v.as_str() {
                    "all" => Filter::All,
                    "open" => Filter::Open,
                    "closed" => Filter::Closed,
                    "canceled" => Filter::Canceled,
                    _ => {
                        return unprocessable(
                            "filter_by must be one of open, closed, canceled, all",
                        )
                    }
                }
            }
            "date_type" => {
                q.by_solved = match v.as_str() {
                    "created_at" => false,
                    "solved_in_time" => true,
                    _ => return unprocessable("date_type must be created_at or solved_in_time"),
                }
            }
            "start_datetime" => match parse_datetime(v, false) {
                Some(t) => q.start = Some(t),
                None => return unprocessable("start_datetime must be an ISO 8601 datetime"),
            },
            "end_datetime" => match parse_datetime(v, true) {
                Some(t) => q.end = Some(t),
                None => return unprocessable("end_datetime must be an ISO 8601 datetime"),
            },
            "desk_ids" => match parse_ids(k, v) {
                Ok(ids) => q.desk_ids = Some(ids),
                Err(r) => return r,
            },
            "client_ids" => match parse_ids(k, v) {
                Ok(ids) => q.client_ids = Some(ids),
                Err(r) => return r,
            },
            other if other.ends_with("_ids") => {
                if let Err(r) = parse_ids(k, v) {
                    return r;
                }
            }
            _ => {}
        }
    }
    // A clamping API serves fewer than asked, without saying so; a page fault fewer still.
    let served = api
        .max_page_size
        .map_or(limit, |m| limit.min(m.max(1)))
        .min(fault.map_or(usize::MAX, |f| f.records));
    let skip = skip.unwrap_or_else(|| {
        (page - 1).saturating_mul(api.max_page_size.map_or(limit, |m| limit.min(m.max(1))))
    });
    let (total, indices) = shared.tickets.slice(&q, skip, served);
    let after = skip + indices.len();
    // About 1.1 KB a ticket: one allocation for the page, tickets serialized straight in.
    let mut body = Vec::with_capacity(2 + indices.len() * 1280);
    body.push(b'[');
    for (n, i) in indices.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        shared.tickets.write_ticket(*i, &mut body);
    }
    body.push(b']');
    let body = match api.paging {
        Paging::Page | Paging::Offset => body,
        Paging::Cursor => {
            let next = (after < total).then(|| format!("c{}_{after}", cursor_page + 1));
            let mut b = b"{\"data\":".to_vec();
            b.extend_from_slice(&body);
            b.extend_from_slice(b",\"next_cursor\":");
            b.extend_from_slice(json!(next).to_string().as_bytes());
            b.push(b'}');
            b
        }
        Paging::Stripe => {
            let mut b = b"{\"object\":\"list\",\"data\":".to_vec();
            b.extend_from_slice(&body);
            b.extend_from_slice(format!(",\"has_more\":{}}}", after < total).as_bytes());
            b
        }
    };

    let now = Utc::now().timestamp();
    let minute = now.div_euclid(60);
    let used = {
        let mut inner = shared.tiflux.inner.lock().unwrap();
        if inner.window.0 != minute {
            inner.window = (minute, 0);
        }
        inner.window.1 += 1;
        inner.window.1
    };
    let mut resp = Response::new(Body::from(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert("x-total-items", HeaderValue::from(total));
    h.insert(
        "ratelimit-remaining",
        HeaderValue::from(RATE_LIMIT.saturating_sub(used)),
    );
    h.insert(
        "ratelimit-reset",
        HeaderValue::from_str(&tickets::local_time((minute + 1) * 60)).expect("ascii"),
    );
    resp
}
