//! The BigQuery REST v2 fake, served on the Google port under `/bigquery/v2` and
//! `/upload/bigquery/v2` (see `/work/shared/api-contracts.md`, "Google BigQuery REST v2").
//!
//! Datasets, tables, load jobs (multipart and resumable media uploads of Parquet,
//! NEWLINE_DELIMITED_JSON or CSV), query jobs, `jobs.query` / `getQueryResults`,
//! `tabledata.list` and `insertAll`, with Google's resource shapes, status codes and error
//! bodies, so Google's own client library works against it unchanged (tests/fidelity.rs).
//!
//! Why real data instead of canned answers: pipelines load files and then run MERGEs and
//! SELECTs over them, and a fake that only recognised query strings would pass pipelines
//! that are wrong. Tables are Polars frames, persisted as Parquet under
//! `<state>/sandbox/bigquery/<project>/<dataset>/<table>.parquet` (a `.schema.json`
//! sidecar keeps modes and descriptions), written atomically, so a table survives the
//! process and `pipe sandbox tables` can list it; queries are evaluated with Polars
//! ([`eval`]).
//!
//! Jobs run to completion when they are created; `Options::bigquery_job_polls` makes
//! `jobs.get` report PENDING, then RUNNING, for that many polls first, to exercise
//! pollers. A `job_error` fault makes the next matching job end DONE with that
//! `errorResult`, the way a real job fails.

mod eval;
mod sql;
mod table;

pub(crate) use table::{normalize_type, Field};

use crate::{random_token, Shared};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use polars::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// (project, dataset, table).
pub(crate) type TableKey = (String, String, String);

/// The largest request body the fake accepts (one upload chunk or multipart request).
pub(crate) const MAX_UPLOAD_BODY: usize = 1 << 30;

/// How long insertAll remembers an `insertId` (BigQuery: "at least one minute").
const DEDUPE_WINDOW: Duration = Duration::from_secs(60);

pub(crate) struct TableData {
    pub schema: Vec<Field>,
    pub df: DataFrame,
    pub created: i64,
    pub modified: i64,
    pub description: Option<String>,
}

pub(crate) struct DatasetMeta {
    created: i64,
    location: String,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The tables, in memory and on disk.
pub(crate) struct Db {
    root: PathBuf,
    pub datasets: BTreeMap<(String, String), DatasetMeta>,
    pub tables: BTreeMap<TableKey, TableData>,
}

fn sidecar(parquet: &FsPath) -> PathBuf {
    parquet.with_extension("schema.json")
}

impl Db {
    /// Load what an earlier run left under `root`.
    fn open(root: PathBuf) -> anyhow::Result<Db> {
        let mut db = Db {
            root,
            datasets: BTreeMap::new(),
            tables: BTreeMap::new(),
        };
        for found in scan(&db.root)? {
            let created = found.created.unwrap_or_else(now_ms);
            db.datasets
                .entry((found.project.clone(), found.dataset.clone()))
                .or_insert(DatasetMeta {
                    created,
                    location: "US".into(),
                });
            let Some(table) = found.table else { continue };
            let bytes = std::fs::read(&found.path)?;
            let df = table::read_parquet(&bytes)?;
            let side: Option<Value> = std::fs::read(sidecar(&found.path))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let schema = side
                .as_ref()
                .and_then(|s| serde_json::from_value::<Vec<Field>>(s["fields"].clone()).ok())
                .unwrap_or_else(|| table::schema_of(&df));
            let df = table::conform(&df, &schema).unwrap_or(df);
            db.tables.insert(
                (found.project, found.dataset, table),
                TableData {
                    schema,
                    df,
                    created,
                    modified: created,
                    description: side
                        .as_ref()
                        .and_then(|s| s["description"].as_str().map(str::to_string)),
                },
            );
        }
        Ok(db)
    }

    fn path(&self, k: &TableKey) -> PathBuf {
        self.root
            .join(&k.0)
            .join(&k.1)
            .join(format!("{}.parquet", k.2))
    }

    /// Store a table's new content (and schema) on disk, then in memory. `replace`:
    /// a new table (creation time now).
    pub fn put_table(
        &mut self,
        k: &TableKey,
        schema: Vec<Field>,
        df: DataFrame,
        replace: bool,
    ) -> Result<(), String> {
        let path = self.path(k);
        let now = now_ms();
        let (created, description) = match self.tables.get(k) {
            Some(t) if !replace => (t.created, t.description.clone()),
            _ => (now, None),
        };
        table::write_parquet(&path, &df)
            .map_err(|e| format!("storing {}: {e:#}", path.display()))?;
        table::write_json(
            &sidecar(&path),
            &json!({"fields": schema, "created": created, "description": description}),
        )
        .map_err(|e| format!("storing {}: {e:#}", path.display()))?;
        self.tables.insert(
            k.clone(),
            TableData {
                schema,
                df,
                created,
                modified: now,
                description,
            },
        );
        Ok(())
    }

    pub fn drop_table(&mut self, k: &TableKey) -> bool {
        let path = self.path(k);
        let _ = std::fs::remove_file(sidecar(&path));
        let _ = std::fs::remove_file(&path);
        self.tables.remove(k).is_some()
    }
}

/// A table (or an empty dataset) found on disk.
struct StoredTable {
    pub project: String,
    pub dataset: String,
    /// None: an empty dataset directory.
    pub table: Option<String>,
    pub path: PathBuf,
    created: Option<i64>,
}

/// The datasets and tables under a `…/sandbox/bigquery` directory.
fn scan(root: &FsPath) -> anyhow::Result<Vec<StoredTable>> {
    let mut out = Vec::new();
    let dirs = |p: &FsPath| -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut v = Vec::new();
        if p.is_dir() {
            for e in std::fs::read_dir(p)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    v.push((e.file_name().to_string_lossy().into_owned(), e.path()));
                }
            }
        }
        v.sort();
        Ok(v)
    };
    for (project, pdir) in dirs(root)? {
        for (dataset, ddir) in dirs(&pdir)? {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&ddir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                .collect();
            files.sort();
            out.push(StoredTable {
                project: project.clone(),
                dataset: dataset.clone(),
                table: None,
                path: ddir.clone(),
                created: None,
            });
            for path in files {
                let table = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let created = std::fs::read(sidecar(&path))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|v| v["created"].as_i64());
                out.push(StoredTable {
                    project: project.clone(),
                    dataset: dataset.clone(),
                    table: Some(table),
                    path,
                    created,
                });
            }
        }
    }
    Ok(out)
}

/// One table as `pipe sandbox tables` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSummary {
    pub project: String,
    pub dataset: String,
    pub table: String,
    pub rows: u64,
    pub columns: u64,
    /// Column name → BigQuery type (from the table's schema), in column order.
    pub schema: serde_json::Map<String, Value>,
    pub path: PathBuf,
}

/// The fake's tables under `<state_dir>/sandbox/bigquery` (reads the Parquet footers; no
/// server needed).
pub fn list_tables(state_dir: &FsPath) -> anyhow::Result<Vec<TableSummary>> {
    let root = state_dir.join("sandbox").join("bigquery");
    let mut out = Vec::new();
    for t in scan(&root)? {
        let Some(table) = t.table else { continue };
        let file = std::fs::File::open(&t.path)?;
        let mut reader = ParquetReader::new(file);
        let schema = reader.schema()?;
        let rows = reader.num_rows()? as u64;
        // The BigQuery schema kept beside the Parquet file (types and modes).
        let sidecar = t.path.with_extension("schema.json");
        let types = std::fs::read(&sidecar)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["fields"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| Some((f["name"].as_str()?.to_string(), f["type"].clone())))
            .collect();
        out.push(TableSummary {
            project: t.project,
            dataset: t.dataset,
            table,
            rows,
            columns: schema.len() as u64,
            schema: types,
            path: t.path,
        });
    }
    Ok(out)
}

struct QueryResult {
    kind: &'static str,
    target: Option<TableKey>,
    schema: Vec<Field>,
    df: Option<DataFrame>,
    affected: Option<u64>,
}

struct Job {
    project: String,
    id: String,
    location: String,
    configuration: Value,
    created: i64,
    ended: i64,
    error: Option<Value>,
    statistics: Value,
    polls_left: u32,
    result: Option<QueryResult>,
}

impl Job {
    /// The state the next poll sees: PENDING, RUNNING, then DONE.
    fn poll(&mut self) -> &'static str {
        match self.polls_left {
            0 => "DONE",
            n => {
                self.polls_left -= 1;
                if n >= 2 {
                    "PENDING"
                } else {
                    "RUNNING"
                }
            }
        }
    }

    fn json(&self, state: &str, email: &str) -> Value {
        let mut status = json!({ "state": state });
        let mut stats = json!({
            "creationTime": self.created.to_string(),
            "startTime": self.created.to_string(),
        });
        if state == "DONE" {
            if let Some(e) = &self.error {
                status["errorResult"] = e.clone();
                status["errors"] = json!([e]);
            }
            stats["endTime"] = json!(self.ended.to_string());
            if let (Some(s), Some(m)) = (stats.as_object_mut(), self.statistics.as_object()) {
                s.extend(m.clone());
            }
        }
        json!({
            "kind": "bigquery#job",
            "etag": format!("\"{}\"", self.id),
            "id": format!("{}:{}.{}", self.project, self.location, self.id),
            "selfLink": format!("/bigquery/v2/projects/{}/jobs/{}?location={}", self.project, self.id, self.location),
            "user_email": email,
            "jobReference": self.reference(),
            "configuration": self.configuration,
            "status": status,
            "statistics": stats,
        })
    }

    fn reference(&self) -> Value {
        json!({"projectId": self.project, "jobId": self.id, "location": self.location})
    }
}

/// A resumable upload session.
struct Upload {
    project: String,
    job: Value,
    total: Option<u64>,
    data: Vec<u8>,
    injected: Option<JobError>,
    /// The job's id once the upload completed.
    done: Option<String>,
}

/// A `job_error` fault riding on a request (set by the fault gate).
#[derive(Clone, Debug)]
pub(crate) struct JobError {
    pub reason: String,
    pub message: String,
}

/// The fake's state.
pub(crate) struct Store {
    pub project: String,
    db: Mutex<Db>,
    jobs: Mutex<HashMap<(String, String), Job>>,
    uploads: Mutex<HashMap<String, Upload>>,
    insert_ids: Mutex<HashMap<(TableKey, String), Instant>>,
    pub bytes_uploaded: AtomicU64,
    polls: u32,
}

impl Store {
    /// `root`: `<state>/sandbox/bigquery`.
    pub fn new(root: PathBuf, project: String, polls: u32) -> anyhow::Result<Store> {
        std::fs::create_dir_all(&root)?;
        Ok(Store {
            project,
            db: Mutex::new(Db::open(root)?),
            jobs: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            insert_ids: Mutex::new(HashMap::new()),
            bytes_uploaded: AtomicU64::new(0),
            polls,
        })
    }
}

/// A BigQuery error response.
#[derive(Debug)]
pub(crate) struct BqError {
    reason: String,
    message: String,
}

fn err(reason: &str, message: impl Into<String>) -> BqError {
    BqError {
        reason: reason.to_string(),
        message: message.into(),
    }
}

fn status_of(reason: &str) -> StatusCode {
    match reason {
        "notFound" => StatusCode::NOT_FOUND,
        "duplicate" => StatusCode::CONFLICT,
        "accessDenied" => StatusCode::FORBIDDEN,
        "authError" => StatusCode::UNAUTHORIZED,
        "rateLimitExceeded" => StatusCode::TOO_MANY_REQUESTS,
        "backendError" | "internalError" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl IntoResponse for BqError {
    fn into_response(self) -> Response {
        let status = status_of(&self.reason);
        let name = match status.as_u16() {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            409 => "ALREADY_EXISTS",
            429 => "RESOURCE_EXHAUSTED",
            _ => "INTERNAL",
        };
        let body = json!({"error": {
            "code": status.as_u16(),
            "message": self.message,
            "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            "status": name,
        }});
        (status, Json(body)).into_response()
    }
}

impl From<sql::QErr> for BqError {
    fn from(e: sql::QErr) -> Self {
        err(e.reason, e.message)
    }
}

type Res = Result<Response, BqError>;

fn error_result(e: &BqError) -> Value {
    let mut v = json!({"reason": e.reason, "message": e.message});
    if e.reason == "invalidQuery" {
        v["location"] = json!("query");
    }
    v
}

pub(crate) fn router() -> Router<Arc<Shared>> {
    let v2 = "/bigquery/v2/projects/{p}";
    Router::new()
        .route(
            &format!("{v2}/datasets"),
            post(insert_dataset).get(list_datasets),
        )
        .route(
            &format!("{v2}/datasets/{{d}}"),
            get(get_dataset).delete(delete_dataset),
        )
        .route(
            &format!("{v2}/datasets/{{d}}/tables"),
            post(insert_table).get(list_tables_http),
        )
        .route(
            &format!("{v2}/datasets/{{d}}/tables/{{t}}"),
            get(get_table)
                .delete(delete_table)
                .patch(patch_table)
                .put(patch_table),
        )
        .route(
            &format!("{v2}/datasets/{{d}}/tables/{{t}}/data"),
            get(list_data),
        )
        .route(
            &format!("{v2}/datasets/{{d}}/tables/{{t}}/insertAll"),
            post(insert_all),
        )
        .route(&format!("{v2}/jobs"), post(insert_job))
        .route(&format!("{v2}/jobs/{{j}}"), get(get_job))
        .route(&format!("{v2}/jobs/{{j}}/cancel"), post(cancel_job))
        .route(&format!("{v2}/queries"), post(query))
        .route(&format!("{v2}/queries/{{j}}"), get(get_query_results))
        .route(
            "/upload/bigquery/v2/projects/{p}/jobs",
            post(upload_start).put(upload_chunk),
        )
        // Media uploads are large (Google's Python client sends 100 MB chunks); axum's
        // default limit is 2 MB. The fault gate bounds what it buffers too.
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BODY))
}

fn params(q: &Option<String>) -> HashMap<String, String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q.as_deref().unwrap_or(""))
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// The bearer token must carry a BigQuery or cloud-platform scope (a read-only one for
/// reads only).
fn auth(shared: &Shared, headers: &HeaderMap, write: bool) -> Result<(), BqError> {
    let Some(scope) = shared.google.scope_of(headers) else {
        return Err(err(
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        ));
    };
    let ok = scope.split_whitespace().any(|s| {
        let s = s.trim_start_matches("https://www.googleapis.com/auth/");
        (s.starts_with("bigquery") || s.starts_with("cloud-platform"))
            && !(write && s.ends_with(".readonly"))
    });
    if ok {
        Ok(())
    } else {
        Err(err(
            "accessDenied",
            "Request had insufficient authentication scopes.",
        ))
    }
}

fn body_json(body: &[u8]) -> Result<Value, BqError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| err("invalid", format!("Invalid JSON payload received. {e}")))
}

fn dataset_json(p: &str, d: &str, meta: &DatasetMeta) -> Value {
    json!({
        "kind": "bigquery#dataset",
        "etag": format!("\"{}\"", meta.created),
        "id": format!("{p}:{d}"),
        "selfLink": format!("/bigquery/v2/projects/{p}/datasets/{d}"),
        "datasetReference": {"projectId": p, "datasetId": d},
        "location": meta.location,
        "creationTime": meta.created.to_string(),
        "lastModifiedTime": meta.created.to_string(),
        "type": "DEFAULT",
    })
}

fn table_json(k: &TableKey, t: &TableData) -> Value {
    let bytes = t.df.estimated_size();
    let mut v = json!({
        "kind": "bigquery#table",
        "etag": format!("\"{}\"", t.modified),
        "id": format!("{}:{}.{}", k.0, k.1, k.2),
        "selfLink": format!("/bigquery/v2/projects/{}/datasets/{}/tables/{}", k.0, k.1, k.2),
        "tableReference": {"projectId": k.0, "datasetId": k.1, "tableId": k.2},
        "schema": {"fields": t.schema},
        "numBytes": bytes.to_string(),
        "numLongTermBytes": "0",
        "numRows": t.df.height().to_string(),
        "creationTime": t.created.to_string(),
        "lastModifiedTime": t.modified.to_string(),
        "type": "TABLE",
        "location": "US",
    });
    if let Some(d) = &t.description {
        v["description"] = json!(d);
    }
    v
}

fn dataset_missing(p: &str, d: &str) -> BqError {
    err("notFound", format!("Not found: Dataset {p}:{d}"))
}

fn table_missing(k: &TableKey) -> BqError {
    err("notFound", format!("Not found: Table {}", eval::display(k)))
}

async fn insert_dataset(
    State(shared): State<Arc<Shared>>,
    Path(p): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let body = body_json(&body)?;
    let Some(d) = body["datasetReference"]["datasetId"].as_str() else {
        return Err(err(
            "invalid",
            "Required parameter is missing: datasetReference.datasetId",
        ));
    };
    if d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(err("invalid", format!("Invalid dataset ID \"{d}\". Dataset IDs must be alphanumeric (plus underscores) and must be at most 1024 characters long.")));
    }
    let mut db = shared.bigquery.db.lock().unwrap();
    let key = (p.clone(), d.to_string());
    if db.datasets.contains_key(&key) {
        return Err(err("duplicate", format!("Already Exists: Dataset {p}:{d}")));
    }
    std::fs::create_dir_all(db.root.join(&p).join(d))
        .map_err(|e| err("backendError", e.to_string()))?;
    let meta = DatasetMeta {
        created: now_ms(),
        location: body["location"].as_str().unwrap_or("US").to_string(),
    };
    let v = dataset_json(&p, d, &meta);
    db.datasets.insert(key, meta);
    Ok(Json(v).into_response())
}

async fn list_datasets(
    State(shared): State<Arc<Shared>>,
    Path(p): Path<String>,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let db = shared.bigquery.db.lock().unwrap();
    let datasets: Vec<Value> = db
        .datasets
        .iter()
        .filter(|((proj, _), _)| proj == &p)
        .map(|((proj, d), m)| {
            json!({
                "kind": "bigquery#dataset",
                "id": format!("{proj}:{d}"),
                "datasetReference": {"projectId": proj, "datasetId": d},
                "location": m.location,
            })
        })
        .collect();
    Ok(
        Json(json!({"kind": "bigquery#datasetList", "etag": "\"0\"", "datasets": datasets}))
            .into_response(),
    )
}

async fn get_dataset(
    State(shared): State<Arc<Shared>>,
    Path((p, d)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let db = shared.bigquery.db.lock().unwrap();
    let meta = db
        .datasets
        .get(&(p.clone(), d.clone()))
        .ok_or_else(|| dataset_missing(&p, &d))?;
    Ok(Json(dataset_json(&p, &d, meta)).into_response())
}

async fn delete_dataset(
    State(shared): State<Arc<Shared>>,
    Path((p, d)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, true)?;
    let q = params(&q);
    let mut db = shared.bigquery.db.lock().unwrap();
    if !db.datasets.contains_key(&(p.clone(), d.clone())) {
        return Err(dataset_missing(&p, &d));
    }
    let tables: Vec<TableKey> = db
        .tables
        .keys()
        .filter(|k| k.0 == p && k.1 == d)
        .cloned()
        .collect();
    if !tables.is_empty() && q.get("deleteContents").map(String::as_str) != Some("true") {
        return Err(err(
            "resourceInUse",
            format!("Dataset {p}:{d} is still in use"),
        ));
    }
    for k in &tables {
        db.drop_table(k);
    }
    let _ = std::fs::remove_dir_all(db.root.join(&p).join(&d));
    db.datasets.remove(&(p, d));
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn parse_schema(v: &Value) -> Result<Vec<Field>, BqError> {
    let fields = v.get("fields").cloned().unwrap_or_else(|| json!([]));
    let fields: Vec<Field> = serde_json::from_value(fields)
        .map_err(|e| err("invalid", format!("Invalid schema: {e}")))?;
    let fields = fields
        .into_iter()
        .map(Field::normalized)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| err("invalid", m))?;
    let mut seen = std::collections::HashSet::new();
    for f in &fields {
        if !seen.insert(f.name.to_ascii_lowercase()) {
            return Err(err(
                "invalid",
                format!("Field {} is specified more than once", f.name),
            ));
        }
    }
    Ok(fields)
}

async fn insert_table(
    State(shared): State<Arc<Shared>>,
    Path((p, d)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let body = body_json(&body)?;
    let Some(t) = body["tableReference"]["tableId"].as_str() else {
        return Err(err(
            "invalid",
            "Required parameter is missing: tableReference.tableId",
        ));
    };
    let schema = parse_schema(&body["schema"])?;
    let mut db = shared.bigquery.db.lock().unwrap();
    if !db.datasets.contains_key(&(p.clone(), d.clone())) {
        return Err(dataset_missing(&p, &d));
    }
    let k = (p, d, t.to_string());
    if db.tables.contains_key(&k) {
        return Err(err(
            "duplicate",
            format!("Already Exists: Table {}", eval::display(&k)),
        ));
    }
    let df = table::empty(&schema);
    db.put_table(&k, schema, df, true)
        .map_err(|m| err("backendError", m))?;
    if let Some(desc) = body["description"].as_str() {
        db.tables.get_mut(&k).expect("just put").description = Some(desc.to_string());
    }
    Ok(Json(table_json(&k, &db.tables[&k])).into_response())
}

async fn list_tables_http(
    State(shared): State<Arc<Shared>>,
    Path((p, d)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let q = params(&q);
    let db = shared.bigquery.db.lock().unwrap();
    if !db.datasets.contains_key(&(p.clone(), d.clone())) {
        return Err(dataset_missing(&p, &d));
    }
    let all: Vec<(&TableKey, &TableData)> = db
        .tables
        .iter()
        .filter(|(k, _)| k.0 == p && k.1 == d)
        .collect();
    let start: usize = q.get("pageToken").and_then(|t| t.parse().ok()).unwrap_or(0);
    let max: usize = q
        .get("maxResults")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1000)
        .max(1);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(max)
        .map(|(k, t)| {
            json!({
                "kind": "bigquery#table",
                "id": format!("{}:{}.{}", k.0, k.1, k.2),
                "tableReference": {"projectId": k.0, "datasetId": k.1, "tableId": k.2},
                "type": "TABLE",
                "creationTime": t.created.to_string(),
            })
        })
        .collect();
    let mut v = json!({"kind": "bigquery#tableList", "etag": "\"0\"", "tables": page, "totalItems": all.len()});
    if start + max < all.len() {
        v["nextPageToken"] = json!((start + max).to_string());
    }
    Ok(Json(v).into_response())
}

async fn get_table(
    State(shared): State<Arc<Shared>>,
    Path((p, d, t)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let db = shared.bigquery.db.lock().unwrap();
    let k = (p, d, t);
    if !db.datasets.contains_key(&(k.0.clone(), k.1.clone())) {
        return Err(dataset_missing(&k.0, &k.1));
    }
    let t = db.tables.get(&k).ok_or_else(|| table_missing(&k))?;
    Ok(Json(table_json(&k, t)).into_response())
}

async fn delete_table(
    State(shared): State<Arc<Shared>>,
    Path((p, d, t)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, true)?;
    let mut db = shared.bigquery.db.lock().unwrap();
    let k = (p, d, t);
    if !db.drop_table(&k) {
        return Err(table_missing(&k));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// tables.patch / tables.update: a new description, or a schema that only adds
/// NULLABLE or REPEATED fields (relaxing REQUIRED to NULLABLE is allowed too).
async fn patch_table(
    State(shared): State<Arc<Shared>>,
    Path((p, d, t)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let body = body_json(&body)?;
    let mut db = shared.bigquery.db.lock().unwrap();
    let k = (p, d, t);
    let cur = db.tables.get(&k).ok_or_else(|| table_missing(&k))?;
    let (mut schema, mut df) = (cur.schema.clone(), cur.df.clone());
    if body.get("schema").is_some_and(|s| !s.is_null()) {
        let new = parse_schema(&body["schema"])?;
        for old in &schema {
            let Some(n) = new.iter().find(|f| f.name == old.name) else {
                return Err(err("invalid", format!("Provided Schema does not match Table {}. Field {} is missing in new schema", eval::display(&k), old.name)));
            };
            if n.ty != old.ty {
                return Err(err("invalid", format!("Provided Schema does not match Table {}. Field {} has changed type from {} to {}", eval::display(&k), old.name, old.ty, n.ty)));
            }
        }
        for n in &new {
            if !schema.iter().any(|f| f.name == n.name) && n.mode == "REQUIRED" {
                return Err(err("invalid", format!("Provided Schema does not match Table {}. Cannot add required fields to an existing schema. (field: {})", eval::display(&k), n.name)));
            }
        }
        df = table::conform(&df, &new).map_err(|m| err("invalid", m))?;
        schema = new;
    }
    db.put_table(&k, schema, df, false)
        .map_err(|m| err("backendError", m))?;
    if let Some(desc) = body.get("description") {
        db.tables.get_mut(&k).expect("just put").description = desc.as_str().map(str::to_string);
    }
    Ok(Json(table_json(&k, &db.tables[&k])).into_response())
}

fn truthy(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// One page of rows: `startIndex` or a `pageToken` (the offset), `maxResults`.
fn page(
    df: &DataFrame,
    schema: &[Field],
    q: &HashMap<String, String>,
) -> Result<(Vec<Value>, Option<String>), BqError> {
    let start: usize = q
        .get("pageToken")
        .or_else(|| q.get("startIndex"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let max: usize = q
        .get("maxResults")
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let n = df.height();
    let start = start.min(n);
    let len = max.min(n - start);
    let slice = df.slice(start as i64, len);
    let rows = table::rows_json(&slice, schema, truthy(q, "formatOptions.useInt64Timestamp"))
        .map_err(|e| err("backendError", e.to_string()))?;
    let token = (start + len < n && len > 0).then(|| (start + len).to_string());
    Ok((rows, token))
}

async fn list_data(
    State(shared): State<Arc<Shared>>,
    Path((p, d, t)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let q = params(&q);
    let db = shared.bigquery.db.lock().unwrap();
    let k = (p, d, t);
    let t = db.tables.get(&k).ok_or_else(|| table_missing(&k))?;
    let schema: Vec<Field> = match q.get("selectedFields").filter(|s| !s.is_empty()) {
        None => t.schema.clone(),
        Some(sel) => sel
            .split(',')
            .map(|name| {
                let name = name.trim();
                t.schema
                    .iter()
                    .find(|f| f.name == name)
                    .cloned()
                    .ok_or_else(|| err("invalid", format!("Invalid field selection {name}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let (rows, token) = page(&t.df, &schema, &q)?;
    let mut v = json!({
        "kind": "bigquery#tableDataList",
        "etag": format!("\"{}\"", t.modified),
        "totalRows": t.df.height().to_string(),
        "rows": rows,
    });
    if let Some(tok) = token {
        v["pageToken"] = json!(tok);
    }
    Ok(Json(v).into_response())
}

fn gunzip_if(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, BqError> {
    let gz = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gz {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)
        .map_err(|e| err("invalid", format!("Invalid gzip body: {e}")))?;
    Ok(out)
}

async fn insert_all(
    State(shared): State<Arc<Shared>>,
    Path((p, d, t)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let body = body_json(&gunzip_if(&headers, &body)?)?;
    let skip_invalid = body["skipInvalidRows"].as_bool().unwrap_or(false);
    let ignore_unknown = body["ignoreUnknownValues"].as_bool().unwrap_or(false);
    let rows = body["rows"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return Err(err("invalid", "No rows present in the request."));
    }
    if rows.len() > 50_000 {
        return Err(err(
            "invalid",
            "too many rows present in the request, limit: 50000 row count: more",
        ));
    }
    let mut db = shared.bigquery.db.lock().unwrap();
    let k = (p, d, t);
    let t = db.tables.get(&k).ok_or_else(|| table_missing(&k))?;
    let mut errors: Vec<Value> = Vec::new();
    let mut good: Vec<(usize, Value, Option<String>)> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let json_row = row.get("json").and_then(Value::as_object);
        let mut problems = Vec::new();
        match json_row {
            Some(obj) => table::check_row(&t.schema, obj, ignore_unknown, "", &mut problems),
            None => problems.push((String::new(), "Row is missing its json object".to_string())),
        }
        if problems.is_empty() {
            let insert_id = row
                .get("insertId")
                .and_then(Value::as_str)
                .map(str::to_string);
            good.push((
                i,
                Value::Object(json_row.cloned().unwrap_or_default()),
                insert_id,
            ));
        } else {
            errors.push(json!({
                "index": i,
                "errors": problems.iter().map(|(loc, m)| json!({"reason": "invalid", "location": loc, "debugInfo": "", "message": m})).collect::<Vec<_>>(),
            }));
        }
    }
    if !errors.is_empty() && !skip_invalid {
        // The whole request is refused: the valid rows are reported as stopped.
        for (i, _, _) in &good {
            errors.push(json!({"index": i, "errors": [{"reason": "stopped", "location": "", "debugInfo": "", "message": ""}]}));
        }
        errors.sort_by_key(|e| e["index"].as_u64());
        return Ok(Json(
            json!({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors}),
        )
        .into_response());
    }
    // Best-effort de-duplication by insertId, as BigQuery does.
    let fresh: Vec<Value> = {
        let mut ids = shared.bigquery.insert_ids.lock().unwrap();
        let now = Instant::now();
        ids.retain(|_, at| now.duration_since(*at) < DEDUPE_WINDOW);
        good.into_iter()
            .filter(|(_, _, id)| match id {
                Some(id) => ids.insert((k.clone(), id.clone()), now).is_none(),
                None => true,
            })
            .map(|(_, v, _)| v)
            .collect()
    };
    if !fresh.is_empty() {
        let refs: Vec<&Value> = fresh.iter().collect();
        let new =
            table::frame_from_rows(&t.schema, &refs).map_err(|e| err("invalid", e.to_string()))?;
        let mut df = t.df.clone();
        df.vstack_mut(&new)
            .map_err(|e| err("backendError", e.to_string()))?;
        let schema = t.schema.clone();
        db.put_table(&k, schema, df, false)
            .map_err(|m| err("backendError", m))?;
    }
    let mut v = json!({"kind": "bigquery#tableDataInsertAllResponse"});
    if !errors.is_empty() {
        v["insertErrors"] = json!(errors);
    }
    Ok(Json(v).into_response())
}

fn new_job_id() -> String {
    format!("job_{}", random_token(12))
}

/// Store a finished job; its JSON as the creating call returns it.
fn store_job(shared: &Shared, mut job: Job) -> Value {
    job.polls_left = shared.bigquery.polls;
    let state = if job.polls_left > 0 {
        "PENDING"
    } else {
        "DONE"
    };
    let v = job.json(state, &shared.client_email);
    shared
        .bigquery
        .jobs
        .lock()
        .unwrap()
        .insert((job.project.clone(), job.id.clone()), job);
    v
}

fn job_shell(project: &str, body: &Value, kind: &'static str) -> Job {
    let reference = &body["jobReference"];
    let mut configuration = body["configuration"].clone();
    configuration["jobType"] = json!(kind);
    Job {
        project: project.to_string(),
        id: reference["jobId"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(new_job_id),
        location: reference["location"].as_str().unwrap_or("US").to_string(),
        configuration,
        created: now_ms(),
        ended: now_ms(),
        error: None,
        statistics: json!({}),
        polls_left: 0,
        result: None,
    }
}

fn table_ref(v: &Value, project: &str) -> Result<TableKey, BqError> {
    let (Some(d), Some(t)) = (v["datasetId"].as_str(), v["tableId"].as_str()) else {
        return Err(err(
            "invalid",
            "Required parameter is missing: destinationTable",
        ));
    };
    Ok((
        v["projectId"].as_str().unwrap_or(project).to_string(),
        d.to_string(),
        t.to_string(),
    ))
}

/// Parse the uploaded bytes of a load job.
fn parse_source(
    format: &str,
    data: &[u8],
    schema: Option<&[Field]>,
    cfg: &Value,
) -> Result<(Vec<Field>, DataFrame), BqError> {
    let invalid = |m: String| err("invalid", m);
    match format {
        "PARQUET" => {
            let df = table::read_parquet(data)
                .map_err(|e| invalid(format!("Error while reading data, error message: Failed to read a Parquet file: {e}")))?;
            Ok((table::schema_of(&df), df))
        }
        "NEWLINE_DELIMITED_JSON" => {
            let mut rows = Vec::new();
            for (n, line) in data.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(line).map_err(|e| {
                    invalid(format!("Error while reading data, error message: JSON parsing error in row starting at position {n}: {e}"))
                })?;
                if !v.is_object() {
                    return Err(invalid(format!("Error while reading data, error message: JSON parsing error in row starting at position {n}: not an object")));
                }
                rows.push(v);
            }
            let refs: Vec<&Value> = rows.iter().collect();
            let schema = match schema {
                Some(s) => s.to_vec(),
                None => table::detect_schema(&refs),
            };
            let ignore = cfg["ignoreUnknownValues"].as_bool().unwrap_or(false);
            for (i, r) in rows.iter().enumerate() {
                let mut problems = Vec::new();
                table::check_row(&schema, r.as_object().expect("object"), ignore, "", &mut problems);
                if let Some((loc, m)) = problems.first() {
                    return Err(invalid(format!("Error while reading data, error message: JSON table encountered too many errors, giving up. Rows: {}; errors: 1. Please look into the errors[] collection for more details. (row {i}, field {loc}: {m})", i + 1)));
                }
            }
            let df = table::frame_from_rows(&schema, &refs).map_err(|e| invalid(e.to_string()))?;
            Ok((schema, df))
        }
        "CSV" => {
            let skip = cfg["skipLeadingRows"]
                .as_u64()
                .or_else(|| cfg["skipLeadingRows"].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0);
            let sep = cfg["fieldDelimiter"].as_str().and_then(|s| s.bytes().next()).unwrap_or(b',');
            let raw = CsvReadOptions::default()
                .with_has_header(false)
                .with_skip_rows(skip as usize)
                .with_infer_schema_length(Some(0))
                .map_parse_options(|o| o.with_separator(sep))
                .into_reader_with_file_handle(std::io::Cursor::new(data.to_vec()))
                .finish()
                .map_err(|e| invalid(format!("Error while reading data, error message: {e}")))?;
            let schema = match schema {
                Some(s) => s.to_vec(),
                None => (0..raw.width())
                    .map(|i| Field::new(&format!("string_field_{i}"), "STRING", "NULLABLE"))
                    .collect(),
            };
            if raw.width() != schema.len() && raw.height() > 0 {
                return Err(invalid(format!("Error while reading data, error message: CSV table references column position {}, but line contains only {} columns.", schema.len() - 1, raw.width())));
            }
            let mut rows: Vec<Value> = vec![json!({}); raw.height()];
            for (c, f) in raw.get_columns().iter().zip(&schema) {
                let s = c.as_materialized_series();
                for (i, v) in s.str().map_err(|e| invalid(e.to_string()))?.iter().enumerate() {
                    rows[i][&f.name] = v.filter(|v| !v.is_empty()).map_or(Value::Null, |v| json!(v));
                }
            }
            for (i, r) in rows.iter().enumerate() {
                let mut problems = Vec::new();
                table::check_row(&schema, r.as_object().expect("object"), false, "", &mut problems);
                if let Some((loc, m)) = problems.first() {
                    return Err(invalid(format!("Error while reading data, error message: CSV table encountered too many errors, giving up. Rows: {}; errors: 1. (field {loc}: {m})", i + 1)));
                }
            }
            let refs: Vec<&Value> = rows.iter().collect();
            let df = table::frame_from_rows(&schema, &refs).map_err(|e| invalid(e.to_string()))?;
            Ok((schema, df))
        }
        other => Err(invalid(format!(
            "The BigQuery sandbox cannot load sourceFormat {other} (PARQUET, NEWLINE_DELIMITED_JSON and CSV are supported)"
        ))),
    }
}

/// Run a load into the database; the number of rows loaded.
fn load(db: &mut Db, project: &str, cfg: &Value, data: &[u8]) -> Result<u64, BqError> {
    let k = table_ref(&cfg["destinationTable"], project)?;
    let format = cfg["sourceFormat"].as_str().unwrap_or("CSV");
    let given = match cfg.get("schema") {
        Some(s)
            if s.get("fields")
                .is_some_and(|f| f.as_array().is_some_and(|a| !a.is_empty())) =>
        {
            Some(parse_schema(s)?)
        }
        _ => None,
    };
    if !db.datasets.contains_key(&(k.0.clone(), k.1.clone())) {
        return Err(dataset_missing(&k.0, &k.1));
    }
    let existing = db.tables.get(&k);
    let read_schema = given.clone().or_else(|| existing.map(|t| t.schema.clone()));
    let (data_schema, df) = parse_source(format, data, read_schema.as_deref(), cfg)?;
    let rows = df.height() as u64;
    let write = cfg["writeDisposition"].as_str().unwrap_or("WRITE_APPEND");
    let create = cfg["createDisposition"]
        .as_str()
        .unwrap_or("CREATE_IF_NEEDED");
    let allow_add = cfg["schemaUpdateOptions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|o| o == "ALLOW_FIELD_ADDITION"));
    let allow_relax = cfg["schemaUpdateOptions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|o| o == "ALLOW_FIELD_RELAXATION"));
    let name = eval::display(&k);
    let invalid = |m: String| err("invalid", m);
    let (schema, base) = match existing {
        None if create == "CREATE_NEVER" => return Err(table_missing(&k)),
        None => {
            let schema = given.unwrap_or(data_schema);
            (schema.clone(), table::empty(&schema))
        }
        Some(t) => match write {
            "WRITE_EMPTY" if t.df.height() > 0 => {
                return Err(err("duplicate", format!("Already Exists: Table {name}")))
            }
            "WRITE_TRUNCATE" => {
                let schema = given.unwrap_or(data_schema);
                (schema.clone(), table::empty(&schema))
            }
            "WRITE_APPEND" | "WRITE_EMPTY" => {
                let mut schema = t.schema.clone();
                for f in &data_schema {
                    match schema.iter_mut().find(|s| s.name == f.name) {
                        Some(s) if s.ty != f.ty => {
                            return Err(invalid(format!(
                                "Provided Schema does not match Table {name}. Field {} has changed type from {} to {}",
                                f.name, s.ty, f.ty
                            )))
                        }
                        Some(_) => {}
                        None if allow_add => {
                            let mut f = f.clone();
                            if f.mode == "REQUIRED" {
                                f.mode = "NULLABLE".into();
                            }
                            schema.push(f);
                        }
                        None => {
                            return Err(invalid(format!(
                                "Provided Schema does not match Table {name}. Cannot add fields (field: {})",
                                f.name
                            )))
                        }
                    }
                }
                for s in schema.iter_mut() {
                    if s.mode == "REQUIRED" && !data_schema.iter().any(|f| f.name == s.name) {
                        if allow_relax {
                            s.mode = "NULLABLE".into();
                        } else {
                            return Err(invalid(format!(
                                "Provided Schema does not match Table {name}. Field {} is missing in new schema",
                                s.name
                            )));
                        }
                    }
                }
                let base = table::conform(&t.df, &schema).map_err(invalid)?;
                (schema, base)
            }
            other => {
                return Err(invalid(format!(
                    "Invalid value for writeDisposition: {other}"
                )))
            }
        },
    };
    let new = table::conform(&df, &schema).map_err(invalid)?;
    let mut out = base;
    out.vstack_mut(&new).map_err(|e| invalid(e.to_string()))?;
    let replace = existing.is_none();
    db.put_table(&k, schema, out, replace)
        .map_err(|m| err("backendError", m))?;
    Ok(rows)
}

/// Finish a load job (from an upload).
fn run_load_job(
    shared: &Shared,
    project: &str,
    body: &Value,
    data: &[u8],
    injected: Option<JobError>,
) -> Value {
    let mut job = job_shell(project, body, "LOAD");
    let cfg = &body["configuration"]["load"];
    let outcome = match injected {
        Some(e) => Err(err(&e.reason, e.message)),
        None => {
            let mut db = shared.bigquery.db.lock().unwrap();
            load(&mut db, project, cfg, data)
        }
    };
    match outcome {
        Ok(rows) => {
            job.statistics = json!({"load": {
                "inputFiles": "1",
                "inputFileBytes": data.len().to_string(),
                "outputRows": rows.to_string(),
                "outputBytes": data.len().to_string(),
                "badRecords": "0",
            }});
        }
        Err(e) => job.error = Some(error_result(&e)),
    }
    job.ended = now_ms();
    store_job(shared, job)
}

/// Run a query job's statement.
fn run_query(shared: &Shared, project: &str, cfg: &Value) -> Result<QueryResult, BqError> {
    let text = cfg["query"].as_str().unwrap_or("");
    if cfg["useLegacySql"].as_bool() == Some(true) {
        return Err(err(
            "invalidQuery",
            "The BigQuery sandbox only runs GoogleSQL (useLegacySql: false)",
        ));
    }
    let dd = cfg["defaultDataset"]["datasetId"].as_str().map(|d| {
        (
            cfg["defaultDataset"]["projectId"]
                .as_str()
                .unwrap_or(project)
                .to_string(),
            d.to_string(),
        )
    });
    let mut db = shared.bigquery.db.lock().unwrap();
    let out = eval::execute(&mut db, project, dd.as_ref(), text)?;
    let (schema, df) = match out.result {
        Some((schema, df)) => (schema, Some(df)),
        None => (Vec::new(), None),
    };
    if let (Some(df), Some(dest)) = (&df, cfg.get("destinationTable").filter(|d| d.is_object())) {
        let k = table_ref(dest, project)?;
        let existing = db.tables.get(&k);
        let write = cfg["writeDisposition"].as_str().unwrap_or("WRITE_EMPTY");
        let out = match (existing, write) {
            (Some(t), "WRITE_APPEND") => {
                let new = table::conform(df, &t.schema).map_err(|m| err("invalid", m))?;
                let mut all = t.df.clone();
                all.vstack_mut(&new)
                    .map_err(|e| err("invalid", e.to_string()))?;
                (t.schema.clone(), all)
            }
            (Some(t), "WRITE_EMPTY") if t.df.height() > 0 => {
                return Err(err(
                    "duplicate",
                    format!("Already Exists: Table {}", eval::display(&k)),
                ))
            }
            _ => (schema.clone(), df.clone()),
        };
        let replace = existing.is_none();
        db.put_table(&k, out.0, out.1, replace)
            .map_err(|m| err("backendError", m))?;
    }
    Ok(QueryResult {
        kind: out.kind,
        target: out.target,
        schema,
        df,
        affected: out.affected,
    })
}

fn query_stats(r: &QueryResult) -> Value {
    let mut q = json!({
        "statementType": r.kind,
        "totalBytesProcessed": "0",
        "totalBytesBilled": "0",
        "cacheHit": false,
    });
    if let Some(n) = r.affected {
        q["numDmlAffectedRows"] = json!(n.to_string());
    }
    if let Some(k) = &r.target {
        q["ddlTargetTable"] = json!({"projectId": k.0, "datasetId": k.1, "tableId": k.2});
    }
    json!({"totalBytesProcessed": "0", "query": q})
}

async fn insert_job(
    State(shared): State<Arc<Shared>>,
    Path(p): Path<String>,
    injected: Option<Extension<JobError>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let body = body_json(&body)?;
    let cfg = &body["configuration"];
    if let Some(id) = body["jobReference"]["jobId"].as_str() {
        if shared
            .bigquery
            .jobs
            .lock()
            .unwrap()
            .contains_key(&(p.clone(), id.to_string()))
        {
            return Err(err("duplicate", format!("Already Exists: Job {p}:US.{id}")));
        }
    }
    let injected = injected.map(|Extension(e)| err(&e.reason, e.message));
    if cfg.get("query").is_some() {
        let mut job = job_shell(&p, &body, "QUERY");
        let outcome = match injected {
            Some(e) => Err(e),
            None => run_query(&shared, &p, &cfg["query"]),
        };
        match outcome {
            Ok(r) => {
                job.statistics = query_stats(&r);
                job.result = Some(r);
            }
            Err(e) => job.error = Some(error_result(&e)),
        }
        job.ended = now_ms();
        return Ok(Json(store_job(&shared, job)).into_response());
    }
    if let Some(copy) = cfg.get("copy") {
        let mut job = job_shell(&p, &body, "COPY");
        let outcome = match injected {
            Some(e) => Err(e),
            None => copy_tables(&shared, &p, copy),
        };
        if let Err(e) = outcome {
            job.error = Some(error_result(&e));
        }
        return Ok(Json(store_job(&shared, job)).into_response());
    }
    if cfg.get("load").is_some() {
        return Err(err(
            "invalid",
            "The BigQuery sandbox loads media uploads only (POST /upload/bigquery/v2/projects/{p}/jobs); it cannot read sourceUris",
        ));
    }
    Err(err(
        "invalid",
        "Required parameter is missing: configuration",
    ))
}

fn copy_tables(shared: &Shared, project: &str, cfg: &Value) -> Result<(), BqError> {
    let sources: Vec<Value> = match cfg.get("sourceTables").and_then(Value::as_array) {
        Some(a) => a.clone(),
        None => vec![cfg["sourceTable"].clone()],
    };
    let dest = table_ref(&cfg["destinationTable"], project)?;
    let mut db = shared.bigquery.db.lock().unwrap();
    let mut schema: Option<Vec<Field>> = None;
    let mut frames = Vec::new();
    for s in &sources {
        let k = table_ref(s, project)?;
        let t = db.tables.get(&k).ok_or_else(|| table_missing(&k))?;
        schema.get_or_insert_with(|| t.schema.clone());
        frames.push(t.df.clone());
    }
    let schema = schema.ok_or_else(|| err("invalid", "No source tables"))?;
    let write = cfg["writeDisposition"].as_str().unwrap_or("WRITE_EMPTY");
    let existing = db.tables.get(&dest);
    let mut out = match (existing, write) {
        (Some(t), "WRITE_APPEND") => t.df.clone(),
        (Some(t), "WRITE_EMPTY") if t.df.height() > 0 => {
            return Err(err(
                "duplicate",
                format!("Already Exists: Table {}", eval::display(&dest)),
            ))
        }
        _ => table::empty(&schema),
    };
    for f in frames {
        let f = table::conform(&f, &schema).map_err(|m| err("invalid", m))?;
        out.vstack_mut(&f)
            .map_err(|e| err("invalid", e.to_string()))?;
    }
    let replace = existing.is_none();
    db.put_table(&dest, schema, out, replace)
        .map_err(|m| err("backendError", m))
}

async fn get_job(
    State(shared): State<Arc<Shared>>,
    Path((p, j)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let mut jobs = shared.bigquery.jobs.lock().unwrap();
    let job = jobs
        .get_mut(&(p.clone(), j.clone()))
        .ok_or_else(|| err("notFound", format!("Not found: Job {p}:{j}")))?;
    let state = job.poll();
    Ok(Json(job.json(state, &shared.client_email)).into_response())
}

async fn cancel_job(
    State(shared): State<Arc<Shared>>,
    Path((p, j)): Path<(String, String)>,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, true)?;
    let jobs = shared.bigquery.jobs.lock().unwrap();
    let job = jobs
        .get(&(p.clone(), j.clone()))
        .ok_or_else(|| err("notFound", format!("Not found: Job {p}:{j}")))?;
    Ok(Json(json!({"kind": "bigquery#jobCancelResponse", "job": job.json("DONE", &shared.client_email)})).into_response())
}

/// The jobs.query / getQueryResults body for a job.
fn results_json(job: &Job, kind: &str, q: &HashMap<String, String>) -> Result<Value, BqError> {
    let mut v = json!({
        "kind": kind,
        "etag": format!("\"{}\"", job.id),
        "jobReference": job.reference(),
        "jobComplete": true,
        "cacheHit": false,
        "totalBytesProcessed": "0",
    });
    if let Some(e) = &job.error {
        return Err(err(
            e["reason"].as_str().unwrap_or("invalidQuery"),
            e["message"].as_str().unwrap_or(""),
        ));
    }
    let Some(r) = &job.result else {
        return Ok(v);
    };
    if let Some(df) = &r.df {
        let (rows, token) = page(df, &r.schema, q)?;
        v["schema"] = json!({ "fields": r.schema });
        v["totalRows"] = json!(df.height().to_string());
        if !rows.is_empty() {
            v["rows"] = json!(rows);
        }
        if let Some(t) = token {
            v["pageToken"] = json!(t);
        }
    } else {
        v["schema"] = json!({"fields": []});
    }
    if let Some(n) = r.affected {
        v["numDmlAffectedRows"] = json!(n.to_string());
        v["dmlStats"] =
            json!({"insertedRowCount": "0", "updatedRowCount": "0", "deletedRowCount": "0"});
        v["dmlStats"] = match r.kind {
            "INSERT" => json!({"insertedRowCount": n.to_string()}),
            "DELETE" | "TRUNCATE_TABLE" => json!({"deletedRowCount": n.to_string()}),
            "UPDATE" => json!({"updatedRowCount": n.to_string()}),
            _ => json!({}),
        };
    }
    Ok(v)
}

async fn query(
    State(shared): State<Arc<Shared>>,
    Path(p): Path<String>,
    injected: Option<Extension<JobError>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let body = body_json(&body)?;
    if let Some(Extension(e)) = injected {
        return Err(err(&e.reason, e.message));
    }
    let wrapped = json!({
        "jobReference": {"projectId": p, "jobId": body["requestId"].as_str().map(|r| format!("job_{r}")).unwrap_or_else(new_job_id), "location": body["location"].as_str().unwrap_or("US")},
        "configuration": {"query": {
            "query": body["query"],
            "useLegacySql": body["useLegacySql"],
            "defaultDataset": body["defaultDataset"],
        }},
    });
    let mut job = job_shell(&p, &wrapped, "QUERY");
    let r = run_query(&shared, &p, &body)?;
    job.statistics = query_stats(&r);
    job.result = Some(r);
    job.ended = now_ms();
    let mut q = HashMap::new();
    if let Some(m) = body["maxResults"].as_u64() {
        q.insert("maxResults".to_string(), m.to_string());
    }
    if body["formatOptions"]["useInt64Timestamp"].as_bool() == Some(true) {
        q.insert(
            "formatOptions.useInt64Timestamp".to_string(),
            "true".to_string(),
        );
    }
    let pending = shared.bigquery.polls > 0;
    let v = if pending {
        json!({"kind": "bigquery#queryResponse", "jobReference": job.reference(), "jobComplete": false})
    } else {
        results_json(&job, "bigquery#queryResponse", &q)?
    };
    store_job(&shared, job);
    Ok(Json(v).into_response())
}

async fn get_query_results(
    State(shared): State<Arc<Shared>>,
    Path((p, j)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Res {
    auth(&shared, &headers, false)?;
    let q = params(&q);
    let mut jobs = shared.bigquery.jobs.lock().unwrap();
    let job = jobs
        .get_mut(&(p.clone(), j.clone()))
        .ok_or_else(|| err("notFound", format!("Not found: Job {p}:{j}")))?;
    if job.poll() != "DONE" {
        return Ok(Json(json!({"kind": "bigquery#getQueryResultsResponse", "jobReference": job.reference(), "jobComplete": false})).into_response());
    }
    Ok(Json(results_json(job, "bigquery#getQueryResultsResponse", &q)?).into_response())
}

/// The parts of a `multipart/related` body.
fn multipart(content_type: &str, body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))?
        .trim_matches('"');
    let delim = format!("--{boundary}").into_bytes();
    let mut cuts = Vec::new();
    let mut i = 0;
    while i + delim.len() <= body.len() {
        if body[i..].starts_with(&delim) {
            cuts.push(i);
            i += delim.len();
        } else {
            i += 1;
        }
    }
    let mut parts = Vec::new();
    for w in cuts.windows(2) {
        let mut part = &body[w[0] + delim.len()..w[1]];
        part = part
            .strip_prefix(b"\r\n")
            .or_else(|| part.strip_prefix(b"\n"))
            .unwrap_or(part);
        part = part
            .strip_suffix(b"\r\n")
            .or_else(|| part.strip_suffix(b"\n"))
            .unwrap_or(part);
        let split = part
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .or_else(|| part.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))?;
        parts.push(part[split..].to_vec());
    }
    Some(parts)
}

async fn upload_start(
    State(shared): State<Arc<Shared>>,
    Path(p): Path<String>,
    RawQuery(raw): RawQuery,
    injected: Option<Extension<JobError>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    auth(&shared, &headers, true)?;
    let q = params(&raw);
    let injected = injected.map(|Extension(e)| e);
    match q.get("uploadType").map(String::as_str) {
        Some("multipart") => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let parts = multipart(ct, &body)
                .filter(|p| p.len() == 2)
                .ok_or_else(|| err("invalid", "Invalid multipart request: expected a multipart/related body with the job metadata and the media"))?;
            let job = body_json(&parts[0])?;
            shared
                .bigquery
                .bytes_uploaded
                .fetch_add(parts[1].len() as u64, Ordering::Relaxed);
            let v = run_load_job(&shared, &p, &job, &parts[1], injected);
            Ok(Json(v).into_response())
        }
        Some("resumable") => {
            let job = body_json(&body)?;
            let total = headers
                .get("x-upload-content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let id = random_token(16);
            shared.bigquery.uploads.lock().unwrap().insert(
                id.clone(),
                Upload {
                    project: p.clone(),
                    job,
                    total,
                    data: Vec::new(),
                    injected,
                    done: None,
                },
            );
            let base = shared.token_uri.trim_end_matches("/token");
            let location = format!(
                "{base}/upload/bigquery/v2/projects/{p}/jobs?uploadType=resumable&upload_id={id}"
            );
            let mut r = StatusCode::OK.into_response();
            r.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_str(&location).expect("ascii URL"),
            );
            Ok(r)
        }
        other => Err(err(
            "invalid",
            format!("Invalid uploadType: {}", other.unwrap_or("")),
        )),
    }
}

/// `bytes a-b/total`, `bytes a-b/*`, `bytes */total`, `bytes */*`.
/// A Content-Range: the bytes carried (None: a status query) and the total (None: `*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

fn content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        }
    };
    Some((range, total))
}

async fn upload_chunk(
    State(shared): State<Arc<Shared>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Res {
    let q = params(&raw);
    let id = q.get("upload_id").cloned().unwrap_or_default();
    let mut uploads = shared.bigquery.uploads.lock().unwrap();
    let Some(up) = uploads.get_mut(&id) else {
        return Err(err("notFound", "No such upload session"));
    };
    if let Some(job_id) = &up.done {
        let jobs = shared.bigquery.jobs.lock().unwrap();
        let job = &jobs[&(up.project.clone(), job_id.clone())];
        return Ok(Json(job.json("DONE", &shared.client_email)).into_response());
    }
    let range = match headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => Some(
            content_range(v)
                .ok_or_else(|| err("invalid", format!("Invalid Content-Range: {v}")))?,
        ),
        None => None,
    };
    match range {
        // The whole media in one request.
        None => {
            up.data.truncate(0);
            up.data.extend_from_slice(&body);
            up.total = Some(body.len() as u64);
        }
        Some((Some((a, b)), total)) => {
            let have = up.data.len() as u64;
            if a > have {
                return Err(err("invalid", format!("Invalid request. According to the Content-Range header, the upload offset is {a} byte(s), which exceeds already uploaded size of {have} byte(s).")));
            }
            if b + 1 - a != body.len() as u64 {
                return Err(err("invalid", format!("Invalid request. The Content-Range header says {} byte(s), the body has {}", b + 1 - a, body.len())));
            }
            up.data.truncate(a as usize);
            up.data.extend_from_slice(&body);
            if total.is_some() {
                up.total = total;
            }
        }
        // A status query (`bytes */total`): possibly the end of an upload whose last
        // chunk was empty.
        Some((None, total)) => {
            if total.is_some() {
                up.total = total;
            }
        }
    }
    shared
        .bigquery
        .bytes_uploaded
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    if up.total == Some(up.data.len() as u64) {
        let data = std::mem::take(&mut up.data);
        let (project, job, injected) = (up.project.clone(), up.job.clone(), up.injected.take());
        let v = run_load_job(&shared, &project, &job, &data, injected);
        up.done = v["jobReference"]["jobId"].as_str().map(str::to_string);
        return Ok(Json(v).into_response());
    }
    let mut r = Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .body(axum::body::Body::empty())
        .expect("response");
    if !up.data.is_empty() {
        r.headers_mut().insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes=0-{}", up.data.len() - 1)).expect("ascii"),
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests;
