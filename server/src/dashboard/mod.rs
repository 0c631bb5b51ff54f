//! The web dashboard at `/`: server-rendered pages (minijinja templates embedded in the
//! binary) with htmx for the live parts, no SPA and no CDN (assets under `/assets/`).
//!
//! - Session: the API's own JWTs in two cookies (`HttpOnly; SameSite=Strict; Path=/`,
//!   `Secure` over https): the access token, renewed from the refresh token when it has
//!   expired or is close to it, and the refresh token (7 days). Logging out ends every
//!   session of the user in the store, so a copied refresh cookie is refused after it.
//! - CSRF: every POST must carry the session's token (a hidden `csrf` field, or the
//!   `X-CSRF-Token` header htmx sends from `hx-headers`), derived from the refresh token
//!   (an attacker who cannot read the cookie cannot compute it); an `Origin` that is not
//!   this server is refused too. SameSite=Strict keeps the cookies off cross-site requests.
//! - A strict Content-Security-Policy on every page: no inline script or style anywhere.
//! - Actions call the API's own handlers with the session's caller, so the roles, checks
//!   and messages are the API's. docs/decisions/0029-dashboard.md.

mod dag;
mod pages;

use crate::auth::{Caller, TokenKind};
use crate::problem::Problem;
use crate::AppState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex, OnceLock};
use store::Role;

/// The policy of every dashboard response.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

const ACCESS_COOKIE: &str = "pipe_session";
const REFRESH_COOKIE: &str = "pipe_refresh";
/// An access token with less than this left is renewed.
const RENEW_BEFORE_SECS: i64 = 5 * 60;

pub fn router() -> Router<AppState> {
    let private = Router::new()
        .route("/", get(pages::integrations))
        .route("/integrations/{name}/enable", post(pages::enable))
        .route("/integrations/{name}/disable", post(pages::disable))
        .route("/integrations/{name}/trigger", post(pages::trigger))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/live", get(pages::run_live))
        .route("/runs/{id}/logs", get(pages::run_logs))
        .route("/runs/{id}/cancel", post(pages::cancel))
        .route("/runs/{id}/repair", post(pages::repair))
        .route("/schedules", get(pages::schedules))
        .route("/workers", get(pages::workers))
        .route(
            "/credentials",
            get(pages::credentials).post(pages::save_credential),
        )
        .route("/credentials/{name}/delete", post(pages::delete_credential))
        .route("/logout", post(pages::logout));
    Router::new()
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/assets/{file}", get(asset))
        .merge(private)
        .layer(axum::middleware::from_fn(renew_cookie))
        .layer(axum::middleware::map_response(csp))
        .layer(axum::middleware::from_fn(origin_check))
}

/// Who is logged in, for the handlers.
#[derive(Clone)]
pub struct Session {
    pub caller: Caller,
    pub user: String,
    /// The token every POST of this session must carry.
    pub csrf: String,
    /// The server runs every run against the local fakes (`pipe serve --sandbox`).
    pub sandbox: bool,
}

impl Session {
    pub fn can_operate(&self) -> bool {
        self.caller.role >= Role::Operator
    }
}

/// The CSRF token of a session: a hash of its refresh token under a fixed label.
fn csrf_of(refresh: &str) -> String {
    hex::encode(Sha256::digest(format!("pipe-dashboard-csrf\0{refresh}")))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Did the request come over https (directly or through a proxy that says so)?
fn is_https(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    uri.scheme_str() == Some("https")
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value for a session cookie (`None`: delete it).
pub(crate) fn set_cookie(
    name: &str,
    value: Option<&str>,
    max_age: u64,
    secure: bool,
) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = match value {
        Some(v) => {
            format!("{name}={v}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}")
        }
        None => format!("{name}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""))
}

/// The cookies of a new session.
pub(crate) fn session_cookies(
    access: &str,
    refresh: &str,
    secure: bool,
) -> [(header::HeaderName, HeaderValue); 2] {
    [
        (
            header::SET_COOKIE,
            set_cookie(
                ACCESS_COOKIE,
                Some(access),
                crate::auth::ACCESS_TTL.as_secs(),
                secure,
            ),
        ),
        (
            header::SET_COOKIE,
            set_cookie(
                REFRESH_COOKIE,
                Some(refresh),
                crate::auth::REFRESH_TTL.as_secs(),
                secure,
            ),
        ),
    ]
}

/// The cookies that end a session.
pub(crate) fn cleared_cookies(secure: bool) -> [(header::HeaderName, HeaderValue); 2] {
    [
        (
            header::SET_COOKIE,
            set_cookie(ACCESS_COOKIE, None, 0, secure),
        ),
        (
            header::SET_COOKIE,
            set_cookie(REFRESH_COOKIE, None, 0, secure),
        ),
    ]
}

/// Where the session extractor leaves a renewed access-token cookie for the response
/// ([`renew_cookie`] puts it on every dashboard request and sets the cookie after).
#[derive(Clone, Default)]
struct RenewSlot(Arc<Mutex<Option<HeaderValue>>>);

async fn renew_cookie(mut req: Request, next: Next) -> Response {
    let slot = RenewSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut resp = next.run(req).await;
    let renewed = slot.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(v) = renewed {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// The logged-in session of a request, from its cookies (renewing the access token when it
/// has expired or is close to it); without one the request goes to the login page (htmx
/// requests are told with `HX-Redirect`).
impl FromRequestParts<AppState> for Session {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Session, Response> {
        if let Some(s) = parts.extensions.get::<Session>() {
            return Ok(s.clone());
        }
        let secure = is_https(&parts.headers, &parts.uri);
        let session = cookie(&parts.headers, REFRESH_COOKIE).and_then(|r| {
            let claims = state.keys().verify(&r, TokenKind::Refresh).ok()?;
            Some((r, claims))
        });
        let Some((refresh, claims)) = session else {
            return Err(to_login(parts, secure));
        };
        let user = claims.sub.clone();
        // The session's user as the store has them now (ended sessions included: a logout
        // refuses every refresh token issued before it).
        let caller = match state.user_caller(user.clone(), claims.iat).await {
            Ok(c) => c,
            Err(_) => return Err(to_login(parts, secure)),
        };
        let fresh = cookie(&parts.headers, ACCESS_COOKIE)
            .and_then(|a| state.keys().verify(&a, TokenKind::Access).ok())
            .is_some_and(|c| {
                c.sub == user && c.exp - chrono::Utc::now().timestamp() > RENEW_BEFORE_SECS
            });
        if !fresh {
            let (token, _) = state
                .keys()
                .issue(&user, TokenKind::Access)
                .map_err(IntoResponse::into_response)?;
            if let Some(slot) = parts.extensions.get::<RenewSlot>() {
                *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(set_cookie(
                    ACCESS_COOKIE,
                    Some(&token),
                    crate::auth::ACCESS_TTL.as_secs(),
                    secure,
                ));
            }
        }
        let session = Session {
            caller,
            user,
            csrf: csrf_of(&refresh),
            sandbox: state.sandbox(),
        };
        parts.extensions.insert(session.clone());
        Ok(session)
    }
}

/// A POST of a logged-in session, its CSRF token checked (the `X-CSRF-Token` header, or
/// the form's `csrf` field), with its form fields. Every dashboard POST takes one.
pub struct Post {
    pub session: Session,
    pub form: Vec<(String, String)>,
}

impl FromRequest<AppState> for Post {
    type Rejection = Response;
    async fn from_request(req: Request, state: &AppState) -> Result<Post, Response> {
        use subtle::ConstantTimeEq;
        let (mut parts, body) = req.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        let want = session.csrf.as_bytes();
        let header_ok = parts
            .headers
            .get("x-csrf-token")
            .map(|h| bool::from(h.as_bytes().ct_eq(want)));
        let bytes = axum::body::to_bytes(body, crate::MAX_BODY)
            .await
            .map_err(|_| {
                error_page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is too large.",
                    None,
                )
            })?;
        let form = form_urlencoded_pairs(&bytes);
        let ok = header_ok.unwrap_or_else(|| {
            form.iter()
                .find(|(k, _)| k == "csrf")
                .is_some_and(|(_, v)| bool::from(v.as_bytes().ct_eq(want)))
        });
        if !ok {
            return Err(error_page(
                StatusCode::FORBIDDEN,
                "This form is missing its security token (CSRF) or it is stale: reload the page and try again.",
                Some(&session),
            ));
        }
        Ok(Post { session, form })
    }
}

fn to_login(parts: &Parts, secure: bool) -> Response {
    let mut resp = if parts.headers.contains_key("hx-request") {
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        r.headers_mut()
            .insert("hx-redirect", HeaderValue::from_static("/login"));
        r
    } else if parts.method == Method::GET {
        Redirect::to("/login").into_response()
    } else {
        error_page(
            StatusCode::UNAUTHORIZED,
            "You are not logged in (or your session ended): log in again.",
            None,
        )
    };
    for (k, v) in cleared_cookies(secure) {
        resp.headers_mut().append(k, v);
    }
    resp
}

/// The pairs of an `application/x-www-form-urlencoded` body.
pub(crate) fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A POST whose `Origin` is another site is refused before anything else (SameSite and
/// the CSRF token are the main guards; this also covers the login form).
async fn origin_check(req: Request, next: Next) -> Response {
    if req.method() == Method::POST {
        if let (Some(origin), Some(host)) = (
            req.headers()
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok()),
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok()),
        ) {
            let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
            if origin != "null" && origin_host != host {
                return error_page(
                    StatusCode::FORBIDDEN,
                    "This form was sent from another site; it is refused.",
                    None,
                );
            }
        }
    }
    next.run(req).await
}

/// The dashboard's CSP on every response of its routes.
async fn csp(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

/// The vendored and own assets, from the binary.
async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind): (&'static str, &str) = match file.as_str() {
        "htmx.min.js" => (include_str!("../../assets/htmx.min.js"), "text/javascript"),
        "htmx-ext-sse.min.js" => (
            include_str!("../../assets/htmx-ext-sse.min.js"),
            "text/javascript",
        ),
        "pipe.js" => (include_str!("../../assets/pipe.js"), "text/javascript"),
        "pipe.css" => (include_str!("../../assets/pipe.css"), "text/css"),
        _ => return error_page(StatusCode::NOT_FOUND, "No such asset.", None),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_str(&format!("{kind}; charset=utf-8"))
                    .unwrap_or(HeaderValue::from_static("text/plain")),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The templates, embedded.
fn env() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        macro_rules! template {
            ($($name:literal),*) => {$(
                env.add_template($name, include_str!(concat!("../../templates/", $name)))
                    .expect(concat!("template ", $name));
            )*};
        }
        template!(
            "base.html",
            "login.html",
            "error.html",
            "integrations.html",
            "runs.html",
            "run.html",
            "run_live.html",
            "logs.html",
            "schedules.html",
            "workers.html",
            "credentials.html"
        );
        env.add_filter("time", |v: Option<String>| -> String {
            v.and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| {
                    t.with_timezone(&chrono::Utc)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string()
                })
                .unwrap_or_else(|| "—".into())
        });
        env.add_filter("ms", |v: Option<u64>| -> String {
            match v {
                None => "—".into(),
                Some(ms) if ms < 1000 => format!("{ms} ms"),
                Some(ms) if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
                Some(ms) => format!("{}m {:02}s", ms / 60_000, (ms / 1000) % 60),
            }
        });
        env
    })
}

/// Render `name` with `ctx` (plus the session's user, role and CSRF token) as a page.
pub(crate) fn render(name: &str, session: Option<&Session>, ctx: minijinja::Value) -> Response {
    render_status(StatusCode::OK, name, session, ctx)
}

pub(crate) fn render_status(
    status: StatusCode,
    name: &str,
    session: Option<&Session>,
    ctx: minijinja::Value,
) -> Response {
    let common = minijinja::context! {
        user => session.map(|s| s.user.clone()),
        role => session.map(|s| s.caller.role.to_string()),
        can_operate => session.is_some_and(Session::can_operate),
        csrf => session.map(|s| s.csrf.clone()),
        sandbox => session.is_some_and(|s| s.sandbox),
    };
    let ctx = minijinja::context! { ..ctx, ..common };
    match env().get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            crate::log(format!("dashboard: cannot render {name}: {e:#}"));
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// An error page (403 for a role that may not, 404, 409 …) with the reason.
pub(crate) fn error_page(status: StatusCode, message: &str, session: Option<&Session>) -> Response {
    render_status(
        status,
        "error.html",
        session,
        minijinja::context! { status => status.as_u16(), title => status.canonical_reason().unwrap_or("Error"), message },
    )
}

/// A problem from the API's handlers, as an error page.
pub(crate) fn problem_page(p: Problem, session: Option<&Session>) -> Response {
    let status = p.status();
    error_page(status, &p.detail, session)
}
