//! The TOTVS Carol fake: OAuth2 tokens (password and refresh-token grants, expiring,
//! rotating refresh tokens), connector API keys, the tenant, staging-table schemas, staging
//! sends (async, sync and the batch "intake" newer pycarol uses), delete by crosswalk,
//! heartbeats and the sending limit — the contract of `api-contracts.md` ("TOTVS Carol")
//! and the paths pycarol 2.56 calls.
//!
//! Wire details that matter to clients:
//! - `Authorization: <access_token>` with no scheme. `Bearer <token>` is an unknown token
//!   (401), as Carol treats it.
//! - Errors are `{"errorCode", "errorMessage", "possibleResponsibleField"}`.
//! - A send body is a JSON array of records, gzip when `Content-Encoding: gzip`; the
//!   sending limit applies to the bytes received (compressed), 413 above it.
//! - Records replace the stored record with the same crosswalk values (compared as text:
//!   `33` and `"33"` are the same key, as a delete body sends numbers as strings).
//!
//! State lives in memory. Records are kept as the JSON text the client sent (one
//! `RawValue` each), so a million records cost their size, not a tree of maps.

// Errors are ready responses in Carol's shape, as axum handlers return them.
#![allow(clippy::result_large_err)]

use crate::faults;
use crate::{hash, hash_str, random_token, Shared};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{middleware, Json, Router};
use chrono::{SecondsFormat, Utc};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The sending limit Carol reports by default (41 MB).
pub const DEFAULT_SENDING_LIMIT: u64 = 41 * MB;
/// Carol never accepts more than this per request (80 MB).
pub const MAX_SENDING_LIMIT: u64 = 80 * MB;
const MB: u64 = 1024 * 1024;
/// Schema field types Carol knows.
const TYPES: [&str; 8] = [
    "string", "integer", "long", "double", "boolean", "date", "object", "nested",
];

/// What the Carol fake received (a part of [`crate::Stats`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CarolStats {
    /// Requests to the Carol fake (every path, faulted ones included).
    pub requests: u64,
    /// Staging send requests (async, sync and intake) that reached the handler.
    pub send_requests: u64,
    /// Send bodies as received (compressed when gzip), summed.
    pub bytes_received: u64,
    /// Send requests whose body came gzip (`Content-Encoding: gzip`).
    pub gzip_requests: u64,
    /// Send bodies after gunzip, summed.
    pub bytes_raw: u64,
    /// The largest send body as received.
    pub max_body_bytes: u64,
    /// Records accepted by sends.
    pub records_received: u64,
    /// Records stored now, all tables.
    pub records_stored: u64,
    /// Send requests answered 413 (above the sending limit).
    pub rejected_too_large: u64,
    /// Token grants (password and refresh).
    pub logins: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Records removed by deletes.
    pub records_deleted: u64,
}

struct Token {
    expires: Instant,
    issued_ms: i64,
    refresh: String,
    connector_id: String,
}

struct Table {
    schema: Value,
    crosswalk: Vec<String>,
    records: IndexMap<String, Box<RawValue>>,
}

#[derive(Default)]
struct Batch {
    records: u64,
    requests: u64,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, Token>,
    /// refresh token → connector id of the login
    refresh: HashMap<String, String>,
    tables: BTreeMap<String, Table>,
    heartbeats: HashMap<String, Value>,
    batches: BTreeMap<String, Batch>,
    /// Closed batches: each summary next to what was received.
    summaries: Vec<Value>,
}

/// The fake's tenant, credentials and state.
pub(crate) struct Store {
    pub tenant: String,
    pub tenant_id: String,
    pub organization: String,
    pub org_id: String,
    pub connector_id: String,
    pub connector_name: String,
    pub username: String,
    pub password: String,
    pub api_key: String,
    ttl: Duration,
    pub limit: u64,
    inner: Mutex<Inner>,
    requests: AtomicU64,
    send_requests: AtomicU64,
    bytes_received: AtomicU64,
    bytes_raw: AtomicU64,
    gzip_requests: AtomicU64,
    max_body: AtomicU64,
    records_received: AtomicU64,
    too_large: AtomicU64,
    logins: AtomicU64,
    heartbeat_count: AtomicU64,
    deleted: AtomicU64,
}

fn hex(seed: u64, tag: u64) -> String {
    format!(
        "{:016x}{:016x}",
        hash(seed, &[tag, 1]),
        hash(seed, &[tag, 2])
    )
}

impl Store {
    pub fn new(seed: u64, ttl_s: u64, limit: u64) -> Store {
        Store {
            tenant: "pipesandbox".into(),
            tenant_id: hex(seed, 0xca01),
            organization: "pipeorg".into(),
            org_id: hex(seed, 0xca02),
            connector_id: hex(seed, 0xca03),
            connector_name: "pipe_sandbox".into(),
            username: "integration@example.com".into(),
            password: format!("carol-{:012x}", hash(seed, &[0xca04]) & 0xffff_ffff_ffff),
            api_key: hex(seed, 0xca05),
            ttl: Duration::from_secs(ttl_s.max(1)),
            limit: limit.max(1),
            inner: Mutex::new(Inner::default()),
            requests: AtomicU64::new(0),
            send_requests: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_raw: AtomicU64::new(0),
            gzip_requests: AtomicU64::new(0),
            max_body: AtomicU64::new(0),
            records_received: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            heartbeat_count: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CarolStats {
        let stored = {
            let inner = self.inner.lock().unwrap();
            inner.tables.values().map(|t| t.records.len() as u64).sum()
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CarolStats {
            requests: g(&self.requests),
            send_requests: g(&self.send_requests),
            bytes_received: g(&self.bytes_received),
            bytes_raw: g(&self.bytes_raw),
            gzip_requests: g(&self.gzip_requests),
            max_body_bytes: g(&self.max_body),
            records_received: g(&self.records_received),
            records_stored: stored,
            rejected_too_large: g(&self.too_large),
            logins: g(&self.logins),
            heartbeats: g(&self.heartbeat_count),
            records_deleted: g(&self.deleted),
        }
    }

    /// The records stored in `table`, in first-insertion order.
    pub fn records(&self, table: &str) -> Vec<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .tables
            .get(table)
            .map(|t| {
                t.records
                    .values()
                    .filter_map(|r| serde_json::from_str(r.get()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A table's schema as stored.
    pub fn schema(&self, table: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner.tables.get(table).map(|t| t.schema.clone())
    }

    /// Batch summaries received (`POST /api/v3/staging/batch/{id}/summary`), each with what
    /// the fake received under that batch id and whether the two match.
    pub fn summaries(&self) -> Vec<Value> {
        self.inner.lock().unwrap().summaries.clone()
    }

    /// The last heartbeat of a connector.
    pub fn heartbeat(&self, connector: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .heartbeats
            .get(connector)
            .cloned()
    }

    /// A token that is valid now (tests: expire it early to exercise refresh).
    pub fn expire_tokens(&self) {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        for t in inner.tokens.values_mut() {
            t.expires = now;
        }
    }

    /// Start with a staging table already holding `records` (the previous sync of a
    /// connector), as if an earlier run had created `schema` and sent them.
    pub(crate) fn preload(
        &self,
        table: &str,
        schema: Value,
        crosswalk: Vec<String>,
        records: &[Value],
    ) {
        let mut stored = IndexMap::new();
        for r in records {
            if let (Some(key), Ok(raw)) =
                (key_of(r, &crosswalk), RawValue::from_string(r.to_string()))
            {
                stored.insert(key, raw);
            }
        }
        self.inner.lock().unwrap().tables.insert(
            table.to_string(),
            Table {
                schema,
                crosswalk,
                records: stored,
            },
        );
    }

    /// The whole state as JSON (`GET /__sandbox/carol`).
    pub fn dump(&self, with_records: bool) -> Value {
        let stats = self.stats();
        let inner = self.inner.lock().unwrap();
        let tables: serde_json::Map<String, Value> = inner
            .tables
            .iter()
            .map(|(name, t)| {
                let mut v = json!({
                    "schema": t.schema,
                    "crosswalk": t.crosswalk,
                    "count": t.records.len(),
                });
                if with_records {
                    v["records"] = Value::Array(
                        t.records
                            .values()
                            .filter_map(|r| serde_json::from_str(r.get()).ok())
                            .collect(),
                    );
                }
                (name.clone(), v)
            })
            .collect();
        let batches: serde_json::Map<String, Value> = inner
            .batches
            .iter()
            .map(|(id, b)| {
                (
                    id.clone(),
                    json!({"records": b.records, "requests": b.requests}),
                )
            })
            .collect();
        json!({
            "stats": stats,
            "tables": tables,
            "heartbeats": inner.heartbeats,
            "batches": batches,
            "summaries": inner.summaries,
        })
    }
}

/// Carol's error shape.
pub(crate) fn carol_error(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    (
        status,
        Json(json!({
            "errorCode": status.as_u16(),
            "errorMessage": message,
            "possibleResponsibleField": field,
        })),
    )
        .into_response()
}

type Resp = Result<Response, Response>;

/// The fault-injection endpoint of a Carol request (`carol_token`, `carol_send`,
/// `carol_schema`, `carol_delete`, `carol_heartbeat`); `None` for other paths.
pub(crate) fn endpoint_of(method: &str, path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/api/")?;
    let (version, tail) = rest.split_once('/')?;
    if !version.starts_with('v') {
        return None;
    }
    if tail == "oauth2/token" {
        return Some("carol_token");
    }
    if tail.starts_with("heartbeats/") {
        return Some("carol_heartbeat");
    }
    if tail.starts_with("staging/intake/") || tail.starts_with("staging/batch/") {
        return Some("carol_send");
    }
    let table = tail.strip_prefix("staging/tables/")?;
    match (method, table.split_once('/')) {
        (_, Some((_, "schema"))) | (_, Some((_, "drop"))) => Some("carol_schema"),
        ("POST", None) | ("POST", Some((_, "sync"))) => Some("carol_send"),
        ("DELETE", None) => Some("carol_delete"),
        _ => None,
    }
}

/// The largest send body the fault gate reads: room above the limit (and Carol's 80 MB
/// ceiling), so the handler itself answers 413 with Carol's error.
pub(crate) fn max_body(opts: &crate::Options) -> usize {
    (MAX_SENDING_LIMIT.max(opts.carol_sending_limit_bytes) + 16 * MB) as usize
}

fn bad(message: &str, field: Option<&str>) -> Response {
    carol_error(StatusCode::BAD_REQUEST, message, field)
}

/// Who a request is: the connector id its credentials belong to.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<String, Response> {
    let c = &shared.carol;
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(key) = get("x-auth-key") {
        let connector = get("x-auth-connectorid").unwrap_or("");
        if key == c.api_key && (connector == c.connector_id || connector == c.connector_name) {
            return Ok(c.connector_id.clone());
        }
        return Err(carol_error(
            StatusCode::UNAUTHORIZED,
            "Invalid API key or connector id",
            Some("x-auth-key"),
        ));
    }
    let Some(token) = get(header::AUTHORIZATION.as_str()) else {
        return Err(carol_error(
            StatusCode::UNAUTHORIZED,
            "Full authentication is required to access this resource",
            None,
        ));
    };
    let inner = c.inner.lock().unwrap();
    match inner.tokens.get(token) {
        Some(t) if t.expires > Instant::now() => Ok(t.connector_id.clone()),
        Some(_) => Err(carol_error(
            StatusCode::UNAUTHORIZED,
            "Access token expired",
            None,
        )),
        // "Bearer <token>" lands here too: Carol takes the whole header as the token.
        None => Err(carol_error(
            StatusCode::UNAUTHORIZED,
            "Invalid access token",
            None,
        )),
    }
}

/// The connector a request names (`connectorId`: an id or the connector's name), else the
/// credentials' one.
fn connector(shared: &Shared, q: &HashMap<String, String>, auth: &str) -> Result<String, Response> {
    let c = &shared.carol;
    match q
        .get("connectorId")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        None => Ok(auth.to_string()),
        Some(id) if id == c.connector_id || id == c.connector_name => Ok(c.connector_id.clone()),
        Some(id) => Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Connector not found: {id}"),
            Some("connectorId"),
        )),
    }
}

fn valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric())
}

fn check_table(name: &str) -> Result<(), Response> {
    if valid_table_name(name) {
        Ok(())
    } else {
        Err(bad(
            &format!(
                "Invalid staging table name `{name}`: letters and digits only, starting with a letter"
            ),
            Some("table"),
        ))
    }
}

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/{version}/oauth2/token", post(token))
        .route("/api/{version}/oauth2/token/{token}", get(token_info))
        .route(
            "/api/{version}/oauth2/token/{token}/userAccessDetails",
            get(access_details),
        )
        .route("/api/v1/tenants/current", get(tenant_current))
        .route("/api/v2/tenants/domain/{domain}", get(tenant_by_domain))
        .route("/api/v1/organizations/current", get(org_current))
        .route("/api/v2/users/current", get(user_current))
        .route("/api/v2/apiKey/details", get(api_key_details))
        .route("/api/v1/connectors/{id}", get(connector_by_id))
        .route("/api/v1/connectors/name/{name}", get(connector_by_name))
        .route(
            "/api/v1/staging/connectors/{id}/tables",
            get(connector_stagings),
        )
        .route(
            "/api/v2/staging/tables/{table}/schema",
            get(schema_get).post(schema_post).put(schema_put),
        )
        .route(
            "/api/v2/staging/tables/{table}/drop",
            axum::routing::delete(drop_table),
        )
        .route(
            "/api/v2/staging/tables/{table}",
            post(send_async).delete(delete_records),
        )
        .route("/api/v2/staging/tables/{table}/sync", post(send_sync))
        .route("/api/v2/staging/intake/{table}", post(send_intake))
        .route("/api/v3/staging/batch/{batch}/summary", post(batch_summary))
        .route("/api/v3/staging/sendingLimit", get(sending_limit))
        .route(
            "/api/v1/heartbeats/{connector}",
            put(heartbeat_put).get(heartbeat_get),
        )
        .route("/__sandbox/carol", get(dump))
        .route("/__sandbox/stats", get(stats))
        .fallback(|| async { carol_error(StatusCode::NOT_FOUND, "Resource not found", None) })
        .layer(middleware::from_fn_with_state(shared.clone(), faults::gate))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        // The fault gate already bounds bodies (above the sending limit, so the handler can
        // answer 413 in Carol's shape); axum's own 2 MB default would cut sends short.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared)
}

async fn count(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if !req.uri().path().starts_with("/__sandbox") {
        shared.carol.requests.fetch_add(1, Ordering::Relaxed);
    }
    next.run(req).await
}

async fn dump(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    Json(
        shared
            .carol
            .dump(q.get("records").is_none_or(|v| v != "false")),
    )
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(serde_json::to_value(shared.stats()).unwrap_or_default())
}

// ---------------------------------------------------------------------------------------
// OAuth2

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
    subdomain: Option<String>,
    #[serde(rename = "orgSubdomain")]
    org_subdomain: Option<String>,
    #[serde(rename = "connectorId")]
    connector_id: Option<String>,
    refresh_token: Option<String>,
}

fn issue(shared: &Shared, connector_id: String) -> Value {
    let c = &shared.carol;
    let access = random_token(16);
    let refresh = random_token(16);
    let issued_ms = Utc::now().timestamp_millis();
    let mut inner = c.inner.lock().unwrap();
    inner.refresh.insert(refresh.clone(), connector_id.clone());
    inner.tokens.insert(
        access.clone(),
        Token {
            expires: Instant::now() + c.ttl,
            issued_ms,
            refresh: refresh.clone(),
            connector_id: connector_id.clone(),
        },
    );
    c.logins.fetch_add(1, Ordering::Relaxed);
    json!({
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": c.ttl.as_secs(),
        "timeIssuedInMillis": issued_ms,
        "token_type": "bearer",
        "client_id": format!("{}_{}_mdmConnector", c.tenant_id, connector_id),
        "state": "",
    })
}

async fn token(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let form: TokenForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return bad(&format!("Invalid form: {e}"), None),
    };
    let c = &shared.carol;
    match form.grant_type.as_deref() {
        Some("password") => {
            if form.username.as_deref() != Some(c.username.as_str())
                || form.password.as_deref() != Some(c.password.as_str())
            {
                return carol_error(
                    StatusCode::UNAUTHORIZED,
                    "Invalid username or password",
                    Some("userLogin/password"),
                );
            }
            let sub = form.subdomain.as_deref().unwrap_or("").trim();
            if !sub.is_empty() && sub != c.tenant {
                return carol_error(
                    StatusCode::NOT_FOUND,
                    &format!("Tenant not found: {sub}"),
                    Some("subdomain"),
                );
            }
            let org = form.org_subdomain.as_deref().unwrap_or("").trim();
            if !org.is_empty() && org != "None" && org != c.organization {
                return carol_error(
                    StatusCode::NOT_FOUND,
                    &format!("Organization not found: {org}"),
                    Some("orgSubdomain"),
                );
            }
            let connector = form
                .connector_id
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| c.connector_id.clone());
            Json(issue(&shared, connector)).into_response()
        }
        Some("refresh_token") => {
            let given = form.refresh_token.unwrap_or_default();
            // Refresh tokens rotate: each is good for one refresh.
            let connector = c.inner.lock().unwrap().refresh.remove(&given);
            match connector {
                Some(connector) => Json(issue(&shared, connector)).into_response(),
                None => bad("Invalid refresh token", Some("refresh_token")),
            }
        }
        other => bad(
            &format!("Unsupported grant_type {:?}", other.unwrap_or("")),
            Some("grant_type"),
        ),
    }
}

async fn token_info(
    State(shared): State<Arc<Shared>>,
    Path((_v, t)): Path<(String, String)>,
) -> Response {
    let c = &shared.carol;
    let inner = c.inner.lock().unwrap();
    match inner.tokens.get(&t) {
        Some(tok) if tok.expires > Instant::now() => Json(json!({
            "access_token": t,
            "refresh_token": tok.refresh,
            "expires_in": tok.expires.saturating_duration_since(Instant::now()).as_secs(),
            "timeIssuedInMillis": tok.issued_ms,
            "token_type": "bearer",
        }))
        .into_response(),
        _ => carol_error(StatusCode::UNAUTHORIZED, "Invalid access token", None),
    }
}

async fn access_details(
    State(shared): State<Arc<Shared>>,
    Path((_v, t)): Path<(String, String)>,
) -> Response {
    let c = &shared.carol;
    let inner = c.inner.lock().unwrap();
    match inner.tokens.get(&t) {
        Some(tok) if tok.expires > Instant::now() => Json(json!({
            "envUserId": hex(0, 0xca10),
            "externalAppId": tok.connector_id,
            "loginLevel": "mdmTenant",
            "orgId": c.org_id,
            "refreshToken": tok.refresh,
            "system": false,
            "tenantId": c.tenant_id,
            "userId": hex(0, 0xca11),
        }))
        .into_response(),
        _ => carol_error(StatusCode::UNAUTHORIZED, "Invalid access token", None),
    }
}

fn tenant_json(c: &Store) -> Value {
    json!({
        "mdmId": c.tenant_id,
        "mdmName": c.tenant,
        "mdmSubdomain": c.tenant,
        "mdmOrgId": c.org_id,
        "mdmEntityType": "mdmTenant",
        "mdmStatus": "ACTIVE",
    })
}

async fn tenant_current(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Resp {
    authenticate(&shared, &headers)?;
    Ok(Json(tenant_json(&shared.carol)).into_response())
}

async fn tenant_by_domain(State(shared): State<Arc<Shared>>, Path(domain): Path<String>) -> Resp {
    if domain != shared.carol.tenant {
        return Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Tenant not found: {domain}"),
            Some("domain"),
        ));
    }
    Ok(Json(tenant_json(&shared.carol)).into_response())
}

async fn org_current(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Resp {
    authenticate(&shared, &headers)?;
    let c = &shared.carol;
    Ok(Json(json!({
        "mdmId": c.org_id,
        "mdmName": c.organization,
        "mdmEntityType": "mdmOrganization",
    }))
    .into_response())
}

/// The user a login acts as (pycarol's `current_user`: `v2/users/current`).
async fn user_current(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Resp {
    authenticate(&shared, &headers)?;
    let c = &shared.carol;
    Ok(Json(json!({
        "mdmId": format!("{:016x}{:016x}", hash_str(&c.username), hash_str(&c.tenant_id)),
        "mdmName": "Integration user",
        "mdmUserLogin": c.username,
        "mdmEmail": c.username,
        "mdmTenantId": c.tenant_id,
        "mdmOrgId": c.org_id,
        "mdmEntityType": "mdmUser",
        "mdmStatus": "ACTIVE",
    }))
    .into_response())
}

/// The connector's public record (`v1/connectors/{id}`, `v1/connectors/name/{name}`).
fn connector_json(c: &Store) -> Value {
    json!({
        "mdmId": c.connector_id,
        "mdmName": c.connector_name,
        "mdmLabel": {"en-US": c.connector_name},
        "mdmGroupName": "Others",
        "mdmTenantId": c.tenant_id,
        "mdmEntityType": "mdmConnector",
        "mdmDeleted": false,
    })
}

fn connector_not_found(what: &str) -> Response {
    carol_error(
        StatusCode::NOT_FOUND,
        &format!("Connector not found: {what}"),
        None,
    )
}

/// `v2/apiKey/details?apiKey=…&connectorId=…`: the key's record, never the key itself.
async fn api_key_details(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Resp {
    authenticate(&shared, &headers)?;
    let c = &shared.carol;
    let key = q.get("apiKey").map(String::as_str).unwrap_or("");
    let connector = q.get("connectorId").map(String::as_str).unwrap_or("");
    if key != c.api_key || (connector != c.connector_id && connector != c.connector_name) {
        return Err(carol_error(
            StatusCode::NOT_FOUND,
            "API key not found for this connector",
            Some("apiKey"),
        ));
    }
    Ok(Json(json!({
        "mdmId": format!("{:016x}", hash_str(&c.api_key)),
        "mdmConnectorId": c.connector_id,
        "mdmTenantId": c.tenant_id,
        "mdmDescription": "pipe sandbox connector key",
        "mdmEntityType": "mdmApiKey",
        "mdmEnabled": true,
    }))
    .into_response())
}

/// `v1/connectors/{id}` and `v1/connectors/name/{name}`: the connector when `wanted`
/// names it.
fn connector_lookup(shared: &Shared, headers: &HeaderMap, wanted: &str, by_name: bool) -> Resp {
    authenticate(shared, headers)?;
    let c = &shared.carol;
    if wanted
        != if by_name {
            &c.connector_name
        } else {
            &c.connector_id
        }
    {
        return Err(connector_not_found(wanted));
    }
    Ok(Json(connector_json(c)).into_response())
}

async fn connector_by_id(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Resp {
    connector_lookup(&shared, &headers, &id, false)
}

async fn connector_by_name(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Resp {
    connector_lookup(&shared, &headers, &name, true)
}

/// `v1/staging/connectors/{id}/tables`: the names of the connector's staging tables.
async fn connector_stagings(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Resp {
    authenticate(&shared, &headers)?;
    let c = &shared.carol;
    if id != c.connector_id && id != c.connector_name {
        return Err(connector_not_found(&id));
    }
    let names: Vec<String> = c.inner.lock().unwrap().tables.keys().cloned().collect();
    Ok(Json(names).into_response())
}

// ---------------------------------------------------------------------------------------
// Schemas

/// Check a schema body; its crosswalk fields and property names.
fn parse_schema(table: &str, body: &Bytes) -> Result<(Value, Vec<String>), Response> {
    let mut schema: Value =
        serde_json::from_slice(body).map_err(|e| bad(&format!("Invalid JSON: {e}"), None))?;
    let obj = schema
        .as_object_mut()
        .ok_or_else(|| bad("The schema must be a JSON object", None))?;
    let props = obj
        .get("mdmStagingMapping")
        .and_then(|m| m.get("properties"))
        .and_then(|p| p.as_object())
        .ok_or_else(|| {
            bad(
                "mdmStagingMapping.properties is required",
                Some("mdmStagingMapping"),
            )
        })?;
    let mut fields = Vec::new();
    for (name, p) in props {
        let ty = p.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if !TYPES.contains(&ty) {
            return Err(bad(
                &format!(
                    "Invalid type `{ty}` of field `{name}` (known: {})",
                    TYPES.join(", ")
                ),
                Some(name),
            ));
        }
        fields.push(name.clone());
    }
    let xref = obj
        .get("mdmCrosswalkTemplate")
        .and_then(|c| c.get("mdmCrossreference"))
        .and_then(|c| c.as_object())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            bad(
                "mdmCrosswalkTemplate.mdmCrossreference is required",
                Some("mdmCrosswalkTemplate"),
            )
        })?;
    let list = xref
        .values()
        .next()
        .and_then(|v| v.as_array())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| {
            bad(
                "The crosswalk must list at least one field",
                Some("mdmCrosswalkTemplate"),
            )
        })?;
    let mut crosswalk = Vec::new();
    for f in list {
        let f = f.as_str().unwrap_or("");
        if !fields.iter().any(|p| p == f) {
            return Err(bad(
                &format!("Crosswalk field `{f}` is not in the schema's properties"),
                Some("mdmCrosswalkTemplate"),
            ));
        }
        crosswalk.push(f.to_string());
    }
    obj.insert("mdmStagingType".into(), json!(table));
    Ok((schema, crosswalk))
}

async fn schema_get(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Resp {
    let auth = authenticate(&shared, &headers)?;
    let conn = connector(&shared, &q, &auth)?;
    let inner = shared.carol.inner.lock().unwrap();
    match inner.tables.get(&table) {
        Some(t) => {
            let mut s = t.schema.clone();
            s["mdmConnectorId"] = json!(conn);
            Ok(Json(s).into_response())
        }
        None => Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Staging table schema not found: {table}"),
            Some("table"),
        )),
    }
}

async fn schema_write(
    shared: Arc<Shared>,
    table: String,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
    create: bool,
) -> Resp {
    let auth = authenticate(&shared, &headers)?;
    let conn = connector(&shared, &q, &auth)?;
    check_table(&table)?;
    let (mut schema, crosswalk) = parse_schema(&table, &body)?;
    let mut inner = shared.carol.inner.lock().unwrap();
    let exists = inner.tables.contains_key(&table);
    if create && exists {
        return Err(bad(
            &format!("Staging table schema already exists: {table} (use PUT to update it)"),
            Some("mdmStagingType"),
        ));
    }
    if !create && !exists {
        return Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Staging table schema not found: {table}"),
            Some("table"),
        ));
    }
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    schema["mdmConnectorId"] = json!(conn);
    schema["mdmLastUpdated"] = json!(now);
    match inner.tables.get_mut(&table) {
        Some(t) => {
            schema["mdmId"] = t.schema["mdmId"].clone();
            schema["mdmCreated"] = t.schema["mdmCreated"].clone();
            if t.crosswalk != crosswalk {
                // A new identifier re-keys what is stored.
                let old = std::mem::take(&mut t.records);
                for (_, r) in old {
                    let v: Value = serde_json::from_str(r.get()).unwrap_or_default();
                    if let Some(k) = key_of(&v, &crosswalk) {
                        t.records.insert(k, r);
                    }
                }
            }
            t.schema = schema.clone();
            t.crosswalk = crosswalk;
        }
        None => {
            schema["mdmId"] = json!(random_token(16));
            schema["mdmCreated"] = json!(now);
            inner.tables.insert(
                table,
                Table {
                    schema: schema.clone(),
                    crosswalk,
                    records: IndexMap::new(),
                },
            );
        }
    }
    Ok(Json(schema).into_response())
}

/// A handler of `POST|PUT /…/{table}…` with a body: `$f(shared, table, query, headers,
/// body, $arg)` (axum handlers take no extra arguments).
macro_rules! send_handler {
    ($name:ident, $f:ident, $arg:expr) => {
        async fn $name(
            State(shared): State<Arc<Shared>>,
            Path(table): Path<String>,
            Query(q): Query<HashMap<String, String>>,
            headers: HeaderMap,
            body: Bytes,
        ) -> Resp {
            $f(shared, table, q, headers, body, $arg).await
        }
    };
}
send_handler!(schema_post, schema_write, true);
send_handler!(schema_put, schema_write, false);

async fn drop_table(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Resp {
    let auth = authenticate(&shared, &headers)?;
    connector(&shared, &q, &auth)?;
    let removed = shared.carol.inner.lock().unwrap().tables.remove(&table);
    match removed {
        Some(_) => Ok(Json(json!({"success": true})).into_response()),
        None => Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Staging table not found: {table}"),
            Some("table"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Sends

/// The crosswalk values of a record as one key (text; numbers and strings alike).
fn key_of(record: &Value, crosswalk: &[String]) -> Option<String> {
    let mut key = String::new();
    for (i, f) in crosswalk.iter().enumerate() {
        let part = match record.get(f)? {
            Value::Null => return None,
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if i > 0 {
            key.push('\u{1f}');
        }
        key.push_str(&part);
    }
    Some(key)
}

enum Mode {
    Async,
    Sync,
    Intake,
}

async fn send(
    shared: Arc<Shared>,
    table: String,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
    mode: Mode,
) -> Resp {
    let auth = authenticate(&shared, &headers)?;
    connector(&shared, &q, &auth)?;
    check_table(&table)?;
    let c = &shared.carol;
    let received = body.len() as u64;
    c.send_requests.fetch_add(1, Ordering::Relaxed);
    c.bytes_received.fetch_add(received, Ordering::Relaxed);
    c.max_body.fetch_max(received, Ordering::Relaxed);
    if received > c.limit {
        c.too_large.fetch_add(1, Ordering::Relaxed);
        return Err(carol_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "Request body of {received} bytes is above the sending limit of {} bytes",
                c.limit
            ),
            None,
        ));
    }
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let raw: Vec<u8> = if gzip {
        c.gzip_requests.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(body.len() * 6);
        if let Err(e) = flate2::read::MultiGzDecoder::new(&body[..]).read_to_end(&mut out) {
            return Err(bad(&format!("Invalid gzip body: {e}"), None));
        }
        out
    } else {
        body.to_vec()
    };
    c.bytes_raw.fetch_add(raw.len() as u64, Ordering::Relaxed);
    // Parse before taking the lock.
    let records: Vec<Box<RawValue>> = match serde_json::from_slice::<Vec<Box<RawValue>>>(&raw) {
        Ok(v) => v,
        Err(_) => match serde_json::from_slice::<Box<RawValue>>(&raw) {
            Ok(one) if one.get().trim_start().starts_with('{') => vec![one],
            _ => return Err(bad("The body must be a JSON array of records", None)),
        },
    };
    let crosswalk = {
        let inner = c.inner.lock().unwrap();
        match inner.tables.get(&table) {
            Some(t) => t.crosswalk.clone(),
            None => {
                return Err(bad(
                    &format!("Staging table `{table}` has no schema: create it first"),
                    Some("table"),
                ))
            }
        }
    };
    let mut keyed = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        let v: Value = serde_json::from_str(r.get()).unwrap_or(Value::Null);
        if !v.is_object() {
            return Err(bad(&format!("Record {i} is not a JSON object"), None));
        }
        match key_of(&v, &crosswalk) {
            Some(k) => keyed.push((k, r)),
            None => {
                let missing = crosswalk
                    .iter()
                    .find(|f| v.get(f.as_str()).is_none_or(|x| x.is_null()))
                    .cloned()
                    .unwrap_or_default();
                return Err(bad(
                    &format!("Record {i} has no value for the crosswalk field `{missing}`"),
                    Some(&missing),
                ));
            }
        }
    }
    let n = keyed.len() as u64;
    {
        let mut inner = c.inner.lock().unwrap();
        let Some(t) = inner.tables.get_mut(&table) else {
            return Err(bad(
                &format!("Staging table `{table}` has no schema"),
                Some("table"),
            ));
        };
        for (k, r) in keyed {
            t.records.insert(k, r);
        }
        if let Mode::Intake = mode {
            if let Some(batch) = q.get("batchId") {
                let b = inner.batches.entry(batch.clone()).or_default();
                b.records += n;
                b.requests += 1;
            }
        }
    }
    c.records_received.fetch_add(n, Ordering::Relaxed);
    Ok(match mode {
        Mode::Sync => Json(json!({"success": true, "recordsProcessed": n})).into_response(),
        _ => Json(json!({"success": true, "recordsReceived": n})).into_response(),
    })
}

send_handler!(send_async, send, Mode::Async);
send_handler!(send_sync, send, Mode::Sync);
send_handler!(send_intake, send, Mode::Intake);

async fn batch_summary(
    State(shared): State<Arc<Shared>>,
    Path(batch): Path<String>,
    headers: HeaderMap,
    Json(summary): Json<Value>,
) -> Resp {
    authenticate(&shared, &headers)?;
    let total_records = summary.get("totalRecords").and_then(|v| v.as_u64());
    let total_requests = summary.get("totalRequests").and_then(|v| v.as_u64());
    let (Some(records), Some(requests)) = (total_records, total_requests) else {
        return Err(bad(
            "totalRecords and totalRequests are required",
            Some("totalRecords"),
        ));
    };
    // pycarol names a batch `{tenant}-pycarol-{unix seconds}`: two sends in one second
    // share the id. A summary closes what was received under the id so far.
    let mut inner = shared.carol.inner.lock().unwrap();
    let open = inner.batches.remove(&batch).unwrap_or_default();
    let matches = open.records == records && open.requests == requests;
    let closed = json!({
        "batchId": batch,
        "summary": summary,
        "receivedRecords": open.records,
        "receivedRequests": open.requests,
        "matches": matches,
    });
    inner.summaries.push(closed.clone());
    Ok(Json(json!({"batchId": batch, "totalRecords": records, "totalRequests": requests, "status": "RECEIVED"})).into_response())
}

async fn sending_limit(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Resp {
    authenticate(&shared, &headers)?;
    let limit = shared.carol.limit;
    Ok(Json(if limit % MB == 0 {
        json!({"quantity": limit / MB, "unit": "MEGABYTES"})
    } else {
        json!({"quantity": limit, "unit": "BYTES"})
    })
    .into_response())
}

/// Delete by crosswalk: `[{"<crosswalk name>": {"field": "value", …}}, …]` (or the bare
/// `{"field": "value"}` objects).
async fn delete_records(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Resp {
    let auth = authenticate(&shared, &headers)?;
    connector(&shared, &q, &auth)?;
    check_table(&table)?;
    let _propagate = flag(&q, "propagateCleanup");
    let items: Vec<Value> = serde_json::from_slice(&body)
        .map_err(|_| bad("The body must be a JSON array of crosswalk objects", None))?;
    let mut inner = shared.carol.inner.lock().unwrap();
    let Some(t) = inner.tables.get_mut(&table) else {
        return Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Staging table not found: {table}"),
            Some("table"),
        ));
    };
    let mut deleted = 0u64;
    for item in &items {
        // `{"emitente": {"cod-emitente": "33"}}`: the crosswalk name wraps the values.
        let values = match item.as_object() {
            Some(o) if o.len() == 1 && o.values().all(|v| v.is_object()) => {
                o.values().next().cloned().unwrap_or_default()
            }
            _ => item.clone(),
        };
        let Some(k) = key_of(&values, &t.crosswalk) else {
            return Err(bad(
                &format!(
                    "A delete item lacks crosswalk fields {:?}: {item}",
                    t.crosswalk
                ),
                Some("body"),
            ));
        };
        if t.records.shift_remove(&k).is_some() {
            deleted += 1;
        }
    }
    shared.carol.deleted.fetch_add(deleted, Ordering::Relaxed);
    Ok(Json(json!({"success": true, "deleted": deleted})).into_response())
}

// ---------------------------------------------------------------------------------------
// Heartbeats

async fn heartbeat_put(
    State(shared): State<Arc<Shared>>,
    Path(connector_id): Path<String>,
    headers: HeaderMap,
    Json(mut body): Json<Value>,
) -> Resp {
    authenticate(&shared, &headers)?;
    let c = &shared.carol;
    if connector_id != c.connector_id {
        return Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("Connector not found: {connector_id}"),
            Some("connectorId"),
        ));
    }
    if !body.get("mdmHeartbeatData").is_some_and(|d| d.is_object()) {
        return Err(bad(
            "mdmHeartbeatData is required",
            Some("mdmHeartbeatData"),
        ));
    }
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut inner = c.inner.lock().unwrap();
    let id = inner
        .heartbeats
        .get(&connector_id)
        .and_then(|h| h.get("mdmId").cloned())
        .unwrap_or_else(|| json!(random_token(16)));
    body["mdmId"] = id;
    body["mdmConnectorId"] = json!(connector_id);
    body["mdmEntityType"] = json!("mdmHeartbeat");
    body["mdmTenantId"] = json!(c.tenant_id);
    body["mdmLastHeartbeatTime"] = json!(now);
    body["mdmLastUpdated"] = json!(now);
    inner.heartbeats.insert(connector_id, body.clone());
    c.heartbeat_count.fetch_add(1, Ordering::Relaxed);
    Ok(Json(body).into_response())
}

async fn heartbeat_get(
    State(shared): State<Arc<Shared>>,
    Path(connector_id): Path<String>,
    headers: HeaderMap,
) -> Resp {
    authenticate(&shared, &headers)?;
    match shared.carol.heartbeat(&connector_id) {
        Some(h) => Ok(Json(h).into_response()),
        None => Err(carol_error(
            StatusCode::NOT_FOUND,
            &format!("No heartbeat for connector {connector_id}"),
            Some("connectorId"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert!(valid_table_name("tickets2"));
        assert!(!valid_table_name("2tickets"));
        assert!(!valid_table_name("tic_kets"));
        assert!(!valid_table_name(""));
    }

    #[test]
    fn keys_compare_as_text() {
        let cw = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            key_of(&json!({"a": 33, "b": "x"}), &cw),
            key_of(&json!({"a": "33", "b": "x"}), &cw)
        );
        assert_eq!(key_of(&json!({"a": 1}), &cw), None);
        assert_eq!(key_of(&json!({"a": 1, "b": null}), &cw), None);
    }
}
