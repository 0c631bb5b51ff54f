//! The dashboard's pages and actions. Reads use the store and the API's handlers (called
//! in process with the session's caller); actions are the API's handlers too, so a viewer's
//! forged POST meets the same role check (403) as on the API.

use super::{dag, problem_page, render, render_status, Post, Session};
use crate::api::{self, Body, Path, Query};
use crate::problem::ApiResult;
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use minijinja::{context, Value};
use std::collections::HashMap;

const STATUSES: &[&str] = &[
    "running",
    "succeeded",
    "warning",
    "failed",
    "skipped",
    "cancelled",
    "abandoned",
];
const TRIGGERS: &[&str] = &[
    "schedule", "manual", "backfill", "repair", "cli", "external",
];
/// Log rows shown live on the run page (the last ones).
const LOG_TAIL: usize = 100;
/// Log rows per page of a run's log page.
const LOG_PAGE: usize = 500;

fn v(x: &impl serde::Serialize) -> Value {
    Value::from_serialize(x)
}

/// What a handler's result becomes: the page, or the problem as an error page.
fn page(session: &Session, r: ApiResult<Response>) -> Response {
    r.unwrap_or_else(|p| problem_page(p, Some(session)))
}

// ---- login, logout --------------------------------------------------------------------

pub async fn login_form() -> Response {
    render("login.html", None, context! {})
}

pub async fn login(
    State(state): State<AppState>,
    addr: api::tokens::ClientAddr,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form = super::form_urlencoded_pairs(&body);
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let username = get("username");
    let req = api::tokens::Login {
        username: username.clone(),
        password: get("password"),
    };
    // The API's login: the same password check and the same failed-login limiter.
    match api::tokens::login(State(state), addr, Body(req)).await {
        Ok(axum::Json(pair)) => {
            let secure = super::is_https(&headers, &axum::http::Uri::from_static("/"));
            let mut resp = Redirect::to("/").into_response();
            for (k, v) in super::session_cookies(&pair.access, &pair.refresh, secure) {
                resp.headers_mut().append(k, v);
            }
            resp
        }
        Err(p) => render_status(
            p.status(),
            "login.html",
            None,
            context! { error => p.detail, username },
        ),
    }
}

/// Log out: every session of the user ends in the store (their refresh tokens, here and
/// in any other browser or API client, are refused from now on), and the cookies go.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap, post: Post) -> Response {
    let (user, actor) = (post.session.user.clone(), post.session.caller.actor());
    let a = actor.clone();
    if let Err(p) = state
        .db(move |s| s.accounts().end_sessions(&user, &a, chrono::Utc::now()))
        .await
    {
        return problem_page(p, Some(&post.session));
    }
    crate::log(format!(
        "{actor} logged out of the dashboard (sessions ended)"
    ));
    let secure = super::is_https(&headers, &axum::http::Uri::from_static("/"));
    let mut resp = Redirect::to("/login").into_response();
    for (k, v) in super::cleared_cookies(secure) {
        resp.headers_mut().append(k, v);
    }
    resp
}

// ---- integrations ---------------------------------------------------------------------

async fn details(state: &AppState, session: &Session) -> ApiResult<Vec<Value>> {
    let names: Vec<String> = state
        .db(|s| s.list_integrations())
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let mut out = Vec::new();
    for name in names {
        let d = api::integrations::show_integration(
            session.caller.clone(),
            State(state.clone()),
            Path(name),
        )
        .await?;
        out.push(v(&d.0));
    }
    Ok(out)
}

pub async fn integrations(session: Session, State(state): State<AppState>) -> Response {
    let r = async {
        let items = details(&state, &session).await?;
        Ok(render(
            "integrations.html",
            Some(&session),
            context! { page => "integrations", items },
        ))
    }
    .await;
    page(&session, r)
}

pub async fn enable(
    State(state): State<AppState>,
    Path(name): Path<String>,
    post: Post,
) -> Response {
    set_enabled(post, state, name, true).await
}

pub async fn disable(
    State(state): State<AppState>,
    Path(name): Path<String>,
    post: Post,
) -> Response {
    set_enabled(post, state, name, false).await
}

async fn set_enabled(post: Post, state: AppState, name: String, enabled: bool) -> Response {
    let caller = post.session.caller.clone();
    let r = if enabled {
        api::integrations::enable_integration(caller, State(state), Path(name)).await
    } else {
        api::integrations::disable_integration(caller, State(state), Path(name)).await
    };
    page(&post.session, r.map(|_| Redirect::to("/").into_response()))
}

pub async fn trigger(
    State(state): State<AppState>,
    Path(name): Path<String>,
    post: Post,
) -> Response {
    // Text for every param (the API types it as the command line does); an empty field
    // leaves the param to its default.
    let params: serde_json::Map<String, serde_json::Value> = post
        .form
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("param.")?, v)))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
        .collect();
    let body = serde_json::json!({ "params": params }).to_string();
    let r = api::integrations::trigger_integration(
        post.session.caller.clone(),
        State(state),
        Path(name.clone()),
        body.into(),
    )
    .await;
    page(
        &post.session,
        r.map(|(_, t)| {
            Redirect::to(&format!(
                "/runs?integration={}&queued={}",
                urlencode(&name),
                t.0.item
            ))
            .into_response()
        }),
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---- runs -----------------------------------------------------------------------------

pub async fn runs(
    session: Session,
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let query = api::runs::RunsQuery {
        integration: get("integration"),
        status: get("status"),
        trigger: get("trigger"),
        since: None,
        until: None,
        cursor: get("cursor"),
        limit: Some(50),
    };
    let names: Vec<String> = state
        .db(|s| s.list_integrations())
        .await
        .map(|l| l.into_iter().map(|i| i.name).collect())
        .unwrap_or_default();
    let (items, next_cursor, error) =
        match api::runs::list_runs(session.caller.clone(), State(state), Query(query)).await {
            Ok(p) => (v(&p.0.items), p.0.next_cursor, None),
            Err(p) => (Value::from(Vec::<Value>::new()), None, Some(p.detail)),
        };
    let next = next_cursor.map(|c| {
        let mut qs = vec![format!("cursor={c}")];
        for k in ["integration", "status", "trigger"] {
            if let Some(v) = get(k) {
                qs.push(format!("{k}={}", urlencode(&v)));
            }
        }
        format!("/runs?{}", qs.join("&"))
    });
    render(
        "runs.html",
        Some(&session),
        context! {
            page => "runs", items, next, error, names,
            statuses => STATUSES, triggers => TRIGGERS,
            f_integration => get("integration"), f_status => get("status"), f_trigger => get("trigger"),
            queued => get("queued"),
        },
    )
}

/// What the live part of a run page shows: status, DAG, steps, log tail.
async fn live(state: &AppState, session: &Session, id: i64) -> ApiResult<Value> {
    let detail = api::runs::show_run(session.caller.clone(), State(state.clone()), Path(id))
        .await?
        .0;
    let steps: Vec<&store::StepRow> = detail.latest_steps();
    let status: HashMap<String, String> = steps
        .iter()
        .map(|s| (s.step.clone(), s.status.as_str().to_string()))
        .collect();
    let (graph, graph_error) =
        match api::runs::run_graph(session.caller.clone(), State(state.clone()), Path(id)).await {
            Ok(g) => (Some(dag::layout(&g.0, &status)), None),
            Err(p) => (None, Some(p.detail)),
        };
    let tail = state.db(move |s| s.logs_tail(id, LOG_TAIL)).await?;
    let finished = detail.run.status.is_finished();
    Ok(context! {
        run => v(&detail.run),
        steps => v(&steps),
        graph => graph.as_ref().map(v),
        graph_error,
        log_count => detail.log_count,
        tail => v(&tail),
        finished,
        repairable => finished && !matches!(detail.run.status, engine::status::Status::Succeeded),
    })
}

pub async fn run(session: Session, State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let r = async {
        let ctx = live(&state, &session, id).await?;
        Ok(render(
            "run.html",
            Some(&session),
            context! { page => "runs", id, ..ctx },
        ))
    }
    .await;
    page(&session, r)
}

/// The live part alone, polled by the run page every second while the run is not finished
/// (the fragment of a finished run polls no more).
pub async fn run_live(
    session: Session,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Response {
    let r = async {
        let ctx = live(&state, &session, id).await?;
        Ok(render(
            "run_live.html",
            Some(&session),
            context! { id, ..ctx },
        ))
    }
    .await;
    page(&session, r)
}

pub async fn run_logs(
    session: Session,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let after = q.get("after").and_then(|a| a.parse::<i64>().ok());
    let query = api::runs::LogsQuery {
        after,
        limit: Some(LOG_PAGE),
    };
    let r = async {
        let p = api::runs::run_logs(session.caller.clone(), State(state), Path(id), Query(query))
            .await?
            .0;
        Ok(render(
            "logs.html",
            Some(&session),
            context! { page => "runs", id, rows => v(&p.items), next_after => p.next_after, after },
        ))
    }
    .await;
    page(&session, r)
}

pub async fn cancel(State(state): State<AppState>, Path(id): Path<i64>, post: Post) -> Response {
    let r = api::runs::cancel_run(post.session.caller.clone(), State(state), Path(id)).await;
    page(
        &post.session,
        r.map(|_| Redirect::to(&format!("/runs/{id}")).into_response()),
    )
}

pub async fn repair(State(state): State<AppState>, Path(id): Path<i64>, post: Post) -> Response {
    let r = api::runs::repair_run(post.session.caller.clone(), State(state), Path(id)).await;
    page(
        &post.session,
        r.map(|_| Redirect::to(&format!("/runs/{id}")).into_response()),
    )
}

// ---- schedules, workers, credentials --------------------------------------------------

pub async fn schedules(session: Session, State(state): State<AppState>) -> Response {
    let r = async {
        let items = details(&state, &session).await?;
        let mut ticks = Vec::new();
        for i in &items {
            let name = i
                .get_attr("name")
                .ok()
                .and_then(|n| n.as_str().map(str::to_string))
                .unwrap_or_default();
            let n = name.clone();
            let t = state.db(move |s| s.list_ticks(&n, 10)).await?;
            ticks.push(context! { name, ticks => v(&t) });
        }
        let backfills = api::backfills::list_backfills(session.caller.clone(), State(state))
            .await?
            .0;
        Ok(render(
            "schedules.html",
            Some(&session),
            context! { page => "schedules", items, ticks, backfills => v(&backfills) },
        ))
    }
    .await;
    page(&session, r)
}

pub async fn workers(session: Session, State(state): State<AppState>) -> Response {
    let r = async {
        let w = api::workers::list_workers(session.caller.clone(), State(state))
            .await?
            .0;
        Ok(render(
            "workers.html",
            Some(&session),
            context! { page => "workers", workers => v(&w) },
        ))
    }
    .await;
    page(&session, r)
}

/// One field of a credential form.
#[derive(serde::Serialize)]
struct Field {
    name: String,
    kind: String,
    description: Option<String>,
    required: bool,
    private: bool,
}

fn fields(schema: &serde_json::Value, private: bool) -> Vec<Field> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, p)| {
            let kind = p["type"]
                .as_str()
                .or_else(|| {
                    p["anyOf"].as_array().and_then(|a| {
                        a.iter()
                            .find_map(|x| x["type"].as_str().filter(|t| *t != "null"))
                    })
                })
                // A field without one plain type (`oneOf`, a `$ref`): JSON or plain text.
                .unwrap_or(
                    if p.get("oneOf")
                        .or(p.get("$ref"))
                        .or(p.get("allOf"))
                        .is_some()
                    {
                        "json"
                    } else {
                        "string"
                    },
                )
                .to_string();
            Field {
                name: name.clone(),
                kind,
                description: p["description"].as_str().map(str::to_string),
                required: required.contains(&name.as_str()),
                private,
            }
        })
        .collect()
}

/// What the credentials page shows besides the types: a message at the top and, after a
/// refused save, the public values typed (never the private ones) to fill the form again.
#[derive(Default)]
struct CredentialNotice {
    status: Option<axum::http::StatusCode>,
    error: Option<String>,
    saved: Option<String>,
    deleted: Option<String>,
    failed_type: String,
    failed_name: String,
    failed_public: serde_json::Map<String, serde_json::Value>,
}

async fn credentials_page(
    session: &Session,
    state: AppState,
    notice: CredentialNotice,
) -> ApiResult<Response> {
    let plugins = api::plugins::list_plugins(session.caller.clone(), State(state.clone()))
        .await?
        .0;
    let types: Vec<Value> = plugins
        .credentials
        .iter()
        .map(|c| {
            let mut f = fields(&c.public_schema, false);
            f.extend(fields(&c.private_schema, true));
            context! { name => c.name.clone(), summary => c.summary.clone(), fields => v(&f) }
        })
        .collect();
    let is_admin = session.caller.role >= store::Role::Admin;
    let stored = if is_admin {
        api::credentials::list_credentials(session.caller.clone(), State(state.clone()))
            .await?
            .0
    } else {
        Vec::new()
    };
    let ctx = context! {
        page => "credentials",
        types,
        is_admin,
        stored => v(&stored),
        has_key => state.vault().key_id().is_some(),
        error => notice.error,
        saved => notice.saved,
        deleted => notice.deleted,
        failed_type => notice.failed_type,
        failed_name => notice.failed_name,
        failed_public => v(&notice.failed_public),
    };
    Ok(render_status(
        notice.status.unwrap_or(axum::http::StatusCode::OK),
        "credentials.html",
        Some(session),
        ctx,
    ))
}

#[derive(serde::Deserialize)]
pub struct CredentialQuery {
    saved: Option<String>,
    deleted: Option<String>,
}

pub async fn credentials(
    session: Session,
    State(state): State<AppState>,
    Query(q): Query<CredentialQuery>,
) -> Response {
    let notice = CredentialNotice {
        saved: q.saved,
        deleted: q.deleted,
        ..CredentialNotice::default()
    };
    let r = credentials_page(&session, state, notice).await;
    page(&session, r)
}

/// A form field's text as the JSON its schema asks for (a number, a boolean, an object or
/// a list typed as JSON); text that does not parse stays text, and the type's check then
/// names the field.
fn typed_field(kind: &str, text: &str) -> serde_json::Value {
    let parsed = match kind {
        "integer" => text.trim().parse::<i64>().ok().map(Into::into),
        "number" => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|n| serde_json::Number::from_f64(n).map(serde_json::Value::Number)),
        "boolean" => text.trim().parse::<bool>().ok().map(Into::into),
        "object" | "array" | "json" => serde_json::from_str(text).ok(),
        _ => None,
    };
    parsed.unwrap_or_else(|| serde_json::Value::String(text.to_string()))
}

/// Save a credential from its type's form: the API's save (admins; validated against the
/// type, 422 naming the field). Empty fields are left out: an empty private field keeps
/// the stored value. A refused save shows the page again with the reason and the public
/// values typed; the private ones are never sent back.
pub async fn save_credential(State(state): State<AppState>, post: Post) -> Response {
    let get = |k: &str| {
        post.form
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let (kind, name) = (get("type"), get("name"));
    let plugins =
        match api::plugins::list_plugins(post.session.caller.clone(), State(state.clone())).await {
            Ok(p) => p.0,
            Err(p) => return problem_page(p, Some(&post.session)),
        };
    let schema_kinds: HashMap<(bool, String), String> = plugins
        .credentials
        .iter()
        .filter(|c| c.name == kind)
        .flat_map(|c| {
            fields(&c.public_schema, false)
                .into_iter()
                .chain(fields(&c.private_schema, true))
        })
        .map(|f| ((f.private, f.name), f.kind))
        .collect();
    let mut public = serde_json::Map::new();
    let mut private = serde_json::Map::new();
    for (key, value) in &post.form {
        let (is_private, field) = match (key.strip_prefix("public."), key.strip_prefix("private."))
        {
            (Some(f), _) => (false, f),
            (_, Some(f)) => (true, f),
            _ => continue,
        };
        if value.is_empty() {
            continue;
        }
        let kind = schema_kinds
            .get(&(is_private, field.to_string()))
            .map(String::as_str)
            .unwrap_or("string");
        let typed = typed_field(kind, value);
        if is_private {
            private.insert(field.to_string(), typed);
        } else {
            public.insert(field.to_string(), typed);
        }
    }
    let req = api::credentials::SaveCredential {
        kind: kind.clone(),
        public: public.clone(),
        private,
    };
    let saved = api::credentials::save_credential(
        post.session.caller.clone(),
        State(state.clone()),
        Path(name.clone()),
        Body(req),
    )
    .await;
    match saved {
        Ok(_) => Redirect::to(&format!("/credentials?saved={}", urlencode(&name))).into_response(),
        // A role too small is the API's 403 page; a refused value shows the form again.
        Err(p) if p.status() == axum::http::StatusCode::FORBIDDEN => {
            problem_page(p, Some(&post.session))
        }
        Err(p) => {
            let notice = CredentialNotice {
                status: Some(p.status()),
                error: Some(format!("Credential `{name}` was not saved: {}", p.detail)),
                failed_type: kind,
                failed_name: name,
                // Only the type's public fields go back into the form: a private value
                // sent as a public field (a forged form) is not echoed.
                failed_public: public
                    .into_iter()
                    .filter(|(k, _)| schema_kinds.contains_key(&(false, k.clone())))
                    .collect(),
                ..CredentialNotice::default()
            };
            let r = credentials_page(&post.session, state, notice).await;
            page(&post.session, r)
        }
    }
}

/// Delete a stored credential (admins).
pub async fn delete_credential(
    State(state): State<AppState>,
    Path(name): Path<String>,
    post: Post,
) -> Response {
    let r = api::credentials::delete_credential(
        post.session.caller.clone(),
        State(state),
        Path(name.clone()),
    )
    .await;
    page(
        &post.session,
        r.map(|_| {
            Redirect::to(&format!("/credentials?deleted={}", urlencode(&name))).into_response()
        }),
    )
}
