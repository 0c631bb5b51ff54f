//! Tests against a small in-process fake of BigQuery (axum): token endpoint, datasets,
//! tables, multipart and resumable uploads (tables kept as DataFrames), jobs, a MERGE that
//! upserts on the keys of its ON clause, and insertAll.

use super::*;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method as HttpMethod, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use engine::events::{Observer, RunEvent};
use engine::secrets::Redactor;
use polars::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const TOKEN: &str = "ya29.bq-fake-token";

/// A resumable upload session: the job, the bytes so far, the announced total.
type Session = (Value, Vec<u8>, usize);

#[derive(Default)]
struct Fake {
    url: OnceLock<String>,
    datasets: Mutex<HashSet<String>>,
    /// `dataset.table` → (schema fields, rows).
    tables: Mutex<HashMap<String, (Value, DataFrame)>>,
    /// `METHOD path?query` of every BigQuery request.
    log: Mutex<Vec<String>>,
    queries: Mutex<Vec<String>>,
    jobs: Mutex<HashMap<String, Value>>,
    /// Resumable sessions: (job, bytes so far, total).
    sessions: Mutex<HashMap<String, Session>>,
    content_ranges: Mutex<Vec<String>>,
    /// Multipart bodies received: (content type, body).
    multipart: Mutex<Vec<(String, Vec<u8>)>>,
    /// The chunk PUT with this number (1-based, counting every PUT) fails with a 503.
    fail_chunk_at: AtomicUsize,
    /// Every MERGE job ends with an `invalid` errorResult.
    fail_merge: AtomicBool,
    tokens: AtomicUsize,
}

fn google_error(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        Json(json!({"error": {"code": code, "message": message,
            "errors": [{"reason": reason, "message": message, "domain": "global"}]}})),
    )
        .into_response()
}

fn parquet_frame(bytes: &[u8]) -> DataFrame {
    ParquetReader::new(std::io::Cursor::new(bytes.to_vec()))
        .finish()
        .unwrap()
}

impl Fake {
    /// Run a load job's data into its destination; the job is RUNNING until first polled.
    fn finish_load(&self, mut job: Value, data: &[u8]) -> Value {
        let load = &job["configuration"]["load"];
        let dest = format!(
            "{}.{}",
            load["destinationTable"]["datasetId"].as_str().unwrap(),
            load["destinationTable"]["tableId"].as_str().unwrap()
        );
        let df = parquet_frame(data);
        let mut tables = self.tables.lock().unwrap();
        let Some((_, rows)) = tables.get_mut(&dest) else {
            job["status"] = json!({"state": "DONE", "errorResult": {"reason": "notFound", "message": format!("Not found: Table {dest}")}});
            return job;
        };
        if load["writeDisposition"] == "WRITE_TRUNCATE" || rows.width() == 0 {
            *rows = df;
        } else {
            let df = df.select(rows.get_column_names_owned()).unwrap();
            rows.vstack_mut(&df).unwrap();
        }
        job["status"] = json!({"state": "RUNNING"});
        self.jobs.lock().unwrap().insert(
            job["jobReference"]["jobId"].as_str().unwrap().to_string(),
            job.clone(),
        );
        job
    }

    /// `MERGE t T USING s S ON T.`k` = S.`k` …`: target rows whose keys the source has are
    /// replaced by the source rows; the others stay.
    fn merge(&self, sql: &str) -> Result<u64, String> {
        let name = |s: &str| -> String {
            let parts: Vec<&str> = s.trim_matches('`').split('.').collect();
            format!("{}.{}", parts[1], parts[2])
        };
        let words: Vec<&str> = sql.split_whitespace().collect();
        let (target, source) = (name(words[1]), name(words[4]));
        let on = sql
            .split(" ON ")
            .nth(1)
            .unwrap()
            .split(" WHEN ")
            .next()
            .unwrap();
        let keys: Vec<String> = on
            .split(" AND ")
            .map(|c| c.split('`').nth(1).unwrap().to_string())
            .collect();
        let mut tables = self.tables.lock().unwrap();
        let src = tables.get(&source).ok_or("no staging table")?.1.clone();
        let (_, dst) = tables.get_mut(&target).ok_or("no target")?;
        if dst.width() == 0 {
            *dst = src.clone();
            return Ok(src.height() as u64);
        }
        let key_of = |df: &DataFrame, i: usize| -> String {
            keys.iter()
                .map(|k| df.column(k).unwrap().get(i).unwrap().to_string())
                .collect::<Vec<_>>()
                .join("|")
        };
        let incoming: HashSet<String> = (0..src.height()).map(|i| key_of(&src, i)).collect();
        let keep: BooleanChunked = (0..dst.height())
            .map(|i| !incoming.contains(&key_of(dst, i)))
            .collect();
        let mut kept = dst.filter(&keep).unwrap();
        let src = src.select(dst.get_column_names_owned()).unwrap();
        kept.vstack_mut(&src).unwrap();
        *dst = kept;
        Ok(src.height() as u64)
    }

    fn new_job(&self, prefix: &str, body: Value) -> Value {
        let id = format!("{prefix}_{}", self.jobs.lock().unwrap().len());
        let mut job = body;
        job["jobReference"] = json!({"projectId": "proj", "jobId": id});
        self.jobs.lock().unwrap().insert(id, job.clone());
        job
    }
}

async fn handle(
    axum::extract::State(fake): axum::extract::State<Arc<Fake>>,
    method: HttpMethod,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if path == "/token" {
        fake.tokens.fetch_add(1, Ordering::SeqCst);
        return Json(json!({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}))
            .into_response();
    }
    let query = uri.query().unwrap_or("").to_string();
    fake.log.lock().unwrap().push(format!(
        "{method} {path}{}{query}",
        if query.is_empty() { "" } else { "?" }
    ));
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return google_error(
            401,
            "unauthorized",
            "Request had invalid authentication credentials.",
        );
    }
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let json_body = || serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    match (method.as_str(), seg.as_slice()) {
        // Resumable session chunks.
        ("PUT", ["session", id]) => {
            let range = headers["content-range"].to_str().unwrap().to_string();
            let n = {
                let mut r = fake.content_ranges.lock().unwrap();
                r.push(range.clone());
                r.len()
            };
            if range.starts_with("bytes */") {
                let have = fake.sessions.lock().unwrap()[*id].1.len();
                return (
                    StatusCode::PERMANENT_REDIRECT,
                    [("range", format!("bytes=0-{}", have as i64 - 1))],
                )
                    .into_response();
            }
            if fake.fail_chunk_at.load(Ordering::SeqCst) == n {
                return google_error(503, "backendError", "try again");
            }
            let (a, rest) = range
                .strip_prefix("bytes ")
                .unwrap()
                .split_once('-')
                .unwrap();
            let (b, total) = rest.split_once('/').unwrap();
            let (a, b, total): (usize, usize, usize) = (
                a.parse().unwrap(),
                b.parse().unwrap(),
                total.parse().unwrap(),
            );
            assert_eq!(
                b - a + 1,
                body.len(),
                "Content-Range {range} vs {} bytes",
                body.len()
            );
            let mut sessions = fake.sessions.lock().unwrap();
            let s = sessions.get_mut(*id).unwrap();
            assert_eq!(
                a,
                s.1.len(),
                "chunk {range} does not continue at {}",
                s.1.len()
            );
            assert_eq!(total, s.2);
            if b + 1 < total {
                assert_eq!(
                    body.len() % (256 * 1024),
                    0,
                    "a non-final chunk of {} bytes",
                    body.len()
                );
            }
            s.1.extend_from_slice(&body);
            if s.1.len() < total {
                return (
                    StatusCode::PERMANENT_REDIRECT,
                    [("range", format!("bytes=0-{b}"))],
                )
                    .into_response();
            }
            let (job, data) = (s.0.clone(), s.1.clone());
            drop(sessions);
            Json(fake.finish_load(job, &data)).into_response()
        }
        ("POST", ["upload", "bigquery", "v2", "projects", _, "jobs"]) => {
            if query.contains("uploadType=resumable") {
                assert_eq!(headers["x-upload-content-type"], "application/octet-stream");
                let total: usize = headers["x-upload-content-length"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let id = format!("s{}", fake.sessions.lock().unwrap().len());
                fake.sessions
                    .lock()
                    .unwrap()
                    .insert(id.clone(), (json_body(), Vec::new(), total));
                let loc = format!("{}/session/{id}", fake.url.get().unwrap());
                return (StatusCode::OK, [("location", loc)]).into_response();
            }
            assert!(query.contains("uploadType=multipart"), "{query}");
            let ct = headers["content-type"].to_str().unwrap().to_string();
            fake.multipart
                .lock()
                .unwrap()
                .push((ct.clone(), body.to_vec()));
            let boundary = ct.split("boundary=").nth(1).unwrap();
            let (job, data) = split_multipart(&body, boundary);
            Json(fake.finish_load(job, &data)).into_response()
        }
        ("GET", ["bigquery", "v2", "projects", _, "jobs", id]) => {
            let mut jobs = fake.jobs.lock().unwrap();
            let Some(job) = jobs.get_mut(*id) else {
                return google_error(404, "notFound", "no such job");
            };
            if job["status"]["state"] == "RUNNING" {
                job["status"] = json!({"state": "DONE"});
            }
            Json(job.clone()).into_response()
        }
        ("POST", ["bigquery", "v2", "projects", _, "queries"]) => {
            let sql = json_body()["query"].as_str().unwrap().to_string();
            fake.queries.lock().unwrap().push(sql.clone());
            let mut job =
                fake.new_job("query", json!({"configuration": {"query": {"query": sql}}}));
            if fake.fail_merge.load(Ordering::SeqCst) {
                job["status"] = json!({"state": "DONE", "errorResult": {"reason": "invalid", "message": "Query error: injected"}, "errors": [{"reason": "invalid", "message": "Query error: injected"}]});
            } else {
                match fake.merge(&sql) {
                    Ok(n) => {
                        job["status"] = json!({"state": "DONE"});
                        job["statistics"] = json!({"query": {"numDmlAffectedRows": n.to_string()}});
                    }
                    Err(e) => return google_error(400, "invalid", &e),
                }
            }
            let id = job["jobReference"]["jobId"].as_str().unwrap().to_string();
            fake.jobs.lock().unwrap().insert(id, job.clone());
            Json(json!({"jobReference": job["jobReference"], "jobComplete": true})).into_response()
        }
        ("GET", ["bigquery", "v2", "projects", _, "datasets", d]) => {
            if fake.datasets.lock().unwrap().contains(*d) {
                Json(json!({"datasetReference": {"datasetId": d}})).into_response()
            } else {
                google_error(404, "notFound", &format!("Not found: Dataset proj:{d}"))
            }
        }
        ("POST", ["bigquery", "v2", "projects", _, "datasets"]) => {
            let d = json_body()["datasetReference"]["datasetId"]
                .as_str()
                .unwrap()
                .to_string();
            fake.datasets.lock().unwrap().insert(d);
            Json(json_body()).into_response()
        }
        ("POST", ["bigquery", "v2", "projects", _, "datasets", d, "tables"]) => {
            let b = json_body();
            let t = b["tableReference"]["tableId"].as_str().unwrap();
            fake.tables.lock().unwrap().insert(
                format!("{d}.{t}"),
                (b["schema"]["fields"].clone(), DataFrame::empty()),
            );
            Json(b).into_response()
        }
        (m, ["bigquery", "v2", "projects", _, "datasets", d, "tables", t, rest @ ..]) => {
            let key = format!("{d}.{t}");
            let mut tables = fake.tables.lock().unwrap();
            let Some(entry) = tables.get_mut(&key) else {
                return google_error(404, "notFound", &format!("Not found: Table proj:{key}"));
            };
            match (m, rest) {
                ("GET", []) => Json(
                    json!({"schema": {"fields": entry.0}, "numRows": entry.1.height().to_string()}),
                )
                .into_response(),
                ("PATCH", []) => {
                    entry.0 = json_body()["schema"]["fields"].clone();
                    Json(json!({"schema": {"fields": entry.0}})).into_response()
                }
                ("DELETE", []) => {
                    tables.remove(&key);
                    StatusCode::NO_CONTENT.into_response()
                }
                ("POST", ["insertAll"]) => {
                    let b = json_body();
                    let mut errors = Vec::new();
                    for (i, r) in b["rows"].as_array().unwrap().iter().enumerate() {
                        if r["json"]["title"] == "bad" {
                            errors.push(json!({"index": i, "errors": [{"reason": "invalid", "location": "title", "message": "no such value"}]}));
                        }
                    }
                    let mut out = json!({"kind": "bigquery#tableDataInsertAllResponse"});
                    if !errors.is_empty() {
                        // A failed row stops the others of its request.
                        let bad: HashSet<u64> = errors
                            .iter()
                            .map(|e| e["index"].as_u64().unwrap())
                            .collect();
                        for i in 0..b["rows"].as_array().unwrap().len() as u64 {
                            if !bad.contains(&i) {
                                errors.push(json!({"index": i, "errors": [{"reason": "stopped", "message": ""}]}));
                            }
                        }
                        out["insertErrors"] = json!(errors);
                    } else {
                        let rows: Vec<Value> = b["rows"].as_array().unwrap().clone();
                        drop(tables);
                        fake.multipart
                            .lock()
                            .unwrap()
                            .push(("insertAll".into(), serde_json::to_vec(&rows).unwrap()));
                    }
                    Json(out).into_response()
                }
                _ => google_error(400, "invalid", "unexpected"),
            }
        }
        _ => google_error(404, "notFound", &format!("no route {method} {path}")),
    }
}

/// The job JSON and the file of a multipart body, checking its layout.
fn split_multipart(body: &[u8], boundary: &str) -> (Value, Vec<u8>) {
    let head = format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n");
    assert!(
        body.starts_with(head.as_bytes()),
        "multipart body starts wrongly"
    );
    let rest = &body[head.len()..];
    let sep = format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n");
    let at = rest
        .windows(sep.len())
        .position(|w| w == sep.as_bytes())
        .expect("second part");
    let job: Value = serde_json::from_slice(&rest[..at]).unwrap();
    let data = &rest[at + sep.len()..];
    let tail = format!("\r\n--{boundary}--\r\n");
    assert!(
        data.ends_with(tail.as_bytes()),
        "multipart body ends wrongly"
    );
    (job, data[..data.len() - tail.len()].to_vec())
}

async fn start() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new().fallback(handle).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    fake.url.set(url.clone()).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, fake)
}

fn private_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl must be installed to generate the test key");
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    })
}

fn key_json(token_uri: &str) -> Value {
    json!({
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": "0123456789abcdef",
        "private_key": private_key(),
        "client_email": "loader@proj.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    })
}

#[derive(Default)]
struct Collect(Mutex<Vec<RunEvent>>);
impl Observer for Collect {
    fn event(&self, event: &RunEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}
impl Collect {
    fn rows(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                RunEvent::Log(r) => Some(r.message.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A context whose connection embeds a `google_service_account` connection (as the
/// engine does for `credentials: <name>`).
fn ctx(url: &str, df: DataFrame, obs: &Arc<Collect>) -> StepContext {
    let dir = std::env::temp_dir();
    let mut ctx = StepContext::new("load", 7, obs.clone(), Redactor::new(), dir.clone(), dir);
    ctx.inputs.insert("clean".into(), crate::table::table(df));
    ctx.connection = Some(json!({
        "type": "bigquery",
        "project": "proj",
        "base_url": format!("{url}/bigquery/v2"),
        "upload_url": format!("{url}/upload/bigquery/v2"),
        "credentials": {"type": "google_service_account", "key_json": key_json(&format!("{url}/token")).to_string()},
    }));
    ctx
}

fn tickets(ids: &[i64], title: &str) -> DataFrame {
    let at = Column::new(
        "created_at".into(),
        ids.iter().map(|i| i * 1_000_000).collect::<Vec<_>>(),
    )
    .cast(&DataType::Datetime(
        TimeUnit::Microseconds,
        Some(polars::prelude::TimeZone::UTC),
    ))
    .unwrap();
    DataFrame::new(vec![
        Column::new("id".into(), ids),
        Column::new(
            "title".into(),
            ids.iter()
                .map(|i| format!("{title} {i}"))
                .collect::<Vec<_>>(),
        ),
        at,
    ])
    .unwrap()
}

fn spec(table: &str, write: Write, keys: &[&str]) -> LoadSpec {
    LoadSpec {
        table: table.into(),
        write,
        keys: keys.iter().map(|s| s.to_string()).collect(),
        mode: Mode::Load,
        partition: None,
        cluster: Vec::new(),
        on_new_columns: OnNewColumns::Add,
        create_dataset: true,
        location: None,
    }
}

async fn run(s: LoadSpec, ctx: StepContext) -> Result<StepOutput, StepError> {
    BigQueryLoad::try_from(s).unwrap().run(ctx).await
}

fn table_rows(fake: &Fake, key: &str) -> DataFrame {
    fake.tables.lock().unwrap()[key].1.clone()
}

#[tokio::test]
async fn append_creates_dataset_and_table_and_uploads_multipart() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    let mut s = spec("helpdesk.tickets", Write::Append, &[]);
    s.partition = Some(Partition {
        field: "created_at".into(),
        kind: PartitionType::Month,
    });
    s.cluster = vec!["id".into()];
    let out = run(s, ctx(&url, tickets(&[1, 2, 3], "t"), &obs))
        .await
        .unwrap();
    assert_eq!(out.outputs["rows"], json!(3));
    assert_eq!(out.outputs["table"], json!("proj.helpdesk.tickets"));
    assert!(out.outputs["job_id"]
        .as_str()
        .unwrap()
        .starts_with("pipe_7_load_"));
    assert_eq!(out.outputs["staging_table"], Value::Null);
    assert!(out.result["created_table"].as_bool().unwrap());
    let (ct, body) = fake.multipart.lock().unwrap()[0].clone();
    assert!(ct.starts_with("multipart/related; boundary="), "{ct}");
    let (job, data) = split_multipart(&body, ct.split("boundary=").nth(1).unwrap());
    assert_eq!(out.outputs["bytes_uploaded"], json!(data.len()));
    let load = &job["configuration"]["load"];
    assert_eq!(load["sourceFormat"], "PARQUET");
    assert_eq!(load["writeDisposition"], "WRITE_APPEND");
    assert_eq!(
        load["destinationTable"],
        json!({"projectId": "proj", "datasetId": "helpdesk", "tableId": "tickets"})
    );
    assert_eq!(parquet_frame(&data).height(), 3);
    // The created table's schema, partitioning and clustering.
    let schema = fake.tables.lock().unwrap()["helpdesk.tickets"].0.clone();
    assert_eq!(
        schema[2],
        json!({"name": "created_at", "type": "TIMESTAMP", "mode": "NULLABLE"})
    );
    assert_eq!(schema[1]["type"], "STRING");
    let log = fake.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l == "POST /bigquery/v2/projects/proj/datasets"),
        "{log:?}"
    );
    // Appending again doubles the rows; the private key never shows.
    run(
        spec("helpdesk.tickets", Write::Append, &[]),
        ctx(&url, tickets(&[1, 2, 3], "t"), &obs),
    )
    .await
    .unwrap();
    assert_eq!(table_rows(&fake, "helpdesk.tickets").height(), 6);
    assert_eq!(fake.tokens.load(Ordering::SeqCst), 2);
    for row in obs.rows() {
        assert!(!row.contains("PRIVATE KEY"), "{row}");
    }
}

#[tokio::test]
async fn created_table_resource_has_partitioning_and_clustering() {
    let mut s = spec("d.t", Write::Append, &[]);
    s.partition = Some(Partition {
        field: "created_at".into(),
        kind: PartitionType::Month,
    });
    s.cluster = vec!["id".into()];
    let fields = schema::derive(&tickets(&[1], "x")).unwrap();
    let t = s.table_resource(&fields);
    assert_eq!(
        t["timePartitioning"],
        json!({"type": "MONTH", "field": "created_at"})
    );
    assert_eq!(t["clustering"], json!({"fields": ["id"]}));
}

#[tokio::test]
async fn merge_twice_keeps_each_key_once_and_drops_the_staging_table() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    let out = run(
        spec("helpdesk.tickets", Write::Merge, &["id"]),
        ctx(&url, tickets(&[1, 2], "old"), &obs),
    )
    .await
    .unwrap();
    let staging = out.outputs["staging_table"].as_str().unwrap().to_string();
    assert!(
        staging.starts_with("proj.helpdesk.tickets__pipe_stage_7_"),
        "{staging}"
    );
    let out = run(
        spec("helpdesk.tickets", Write::Merge, &["id"]),
        ctx(&url, tickets(&[2, 3], "new"), &obs),
    )
    .await
    .unwrap();
    assert!(out.outputs["job_id"]
        .as_str()
        .unwrap()
        .starts_with("query_"));
    let rows = table_rows(&fake, "helpdesk.tickets")
        .sort(["id"], Default::default())
        .unwrap();
    assert_eq!(
        rows.column("id")
            .unwrap()
            .i64()
            .unwrap()
            .into_no_null_iter()
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let titles: Vec<String> = rows
        .column("title")
        .unwrap()
        .str()
        .unwrap()
        .into_no_null_iter()
        .map(str::to_string)
        .collect();
    assert_eq!(titles, ["old 1", "new 2", "new 3"]);
    // One MERGE per run, with every column.
    let q = fake.queries.lock().unwrap().clone();
    assert_eq!(q.len(), 2);
    assert!(
        q[1].starts_with(
            "MERGE `proj.helpdesk.tickets` T USING `proj.helpdesk.tickets__pipe_stage_7_"
        ),
        "{}",
        q[1]
    );
    assert!(q[1].contains(" ON T.`id` = S.`id` WHEN MATCHED THEN UPDATE SET `title` = S.`title`, `created_at` = S.`created_at` WHEN NOT MATCHED THEN INSERT (`id`, `title`, `created_at`) VALUES (S.`id`, S.`title`, S.`created_at`)"), "{}", q[1]);
    // No staging table is left.
    let names: Vec<String> = fake.tables.lock().unwrap().keys().cloned().collect();
    assert_eq!(names, ["helpdesk.tickets"]);
}

#[tokio::test]
async fn a_failed_merge_leaves_the_target_and_drops_the_staging_table() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    run(
        spec("d.t", Write::Merge, &["id"]),
        ctx(&url, tickets(&[1, 2], "old"), &obs),
    )
    .await
    .unwrap();
    fake.fail_merge.store(true, Ordering::SeqCst);
    let err = run(
        spec("d.t", Write::Merge, &["id"]),
        ctx(&url, tickets(&[2, 3], "new"), &obs),
    )
    .await
    .unwrap_err();
    assert!(!err.retryable);
    assert!(
        err.message
            .contains("MERGE into `proj.d.t` failed: Query error: injected (reason: invalid"),
        "{}",
        err.message
    );
    let rows = table_rows(&fake, "d.t");
    assert_eq!(rows.height(), 2);
    assert_eq!(fake.tables.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn merge_checks_keys_before_uploading() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    let err = run(
        spec("d.t", Write::Merge, &["id"]),
        ctx(&url, tickets(&[1, 1], "x"), &obs),
    )
    .await
    .unwrap_err();
    assert!(
        err.message.contains("rows sharing keys (id)"),
        "{}",
        err.message
    );
    let err = run(
        spec("d.t", Write::Merge, &["nope"]),
        ctx(&url, tickets(&[1], "x"), &obs),
    )
    .await
    .unwrap_err();
    assert!(
        err.message.contains("`keys` names `nope`"),
        "{}",
        err.message
    );
    assert!(fake.multipart.lock().unwrap().is_empty());
}

#[tokio::test]
async fn replace_truncates_and_new_columns_are_added_or_refused() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    run(
        spec("d.t", Write::Append, &[]),
        ctx(&url, tickets(&[1, 2, 3], "x"), &obs),
    )
    .await
    .unwrap();
    let mut wider = tickets(&[9], "y");
    wider
        .with_column(Column::new("extra".into(), [true]))
        .unwrap();
    let mut s = spec("d.t", Write::Append, &[]);
    s.on_new_columns = OnNewColumns::Fail;
    let err = run(s, ctx(&url, wider.clone(), &obs)).await.unwrap_err();
    assert!(
        err.message.contains("columns that `proj.d.t` lacks: extra"),
        "{}",
        err.message
    );
    let out = run(
        spec("d.t", Write::Replace, &[]),
        ctx(&url, tickets(&[7], "z"), &obs),
    )
    .await
    .unwrap();
    assert_eq!(table_rows(&fake, "d.t").height(), 1);
    let (_, body) = fake.multipart.lock().unwrap().last().unwrap().clone();
    assert!(String::from_utf8_lossy(&body).contains("\"writeDisposition\":\"WRITE_TRUNCATE\""));
    assert_eq!(out.result["added_columns"], json!([]));
    // Merging the wider table patches the target first.
    let out = run(spec("d.t", Write::Merge, &["id"]), ctx(&url, wider, &obs))
        .await
        .unwrap();
    assert_eq!(out.result["added_columns"], json!(["extra"]));
    let schema = fake.tables.lock().unwrap()["d.t"].0.clone();
    assert_eq!(
        schema[3],
        json!({"name": "extra", "type": "BOOLEAN", "mode": "NULLABLE"})
    );
}

#[tokio::test]
async fn large_files_go_resumable_in_chunks_and_resume_after_a_failed_chunk() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    let ctx = ctx(&url, DataFrame::empty(), &obs);
    let key: yup_oauth2::ServiceAccountKey =
        serde_json::from_value(key_json(&format!("{url}/token"))).unwrap();
    let mut api = Api::connect(
        key,
        "proj".into(),
        None,
        &format!("{url}/bigquery/v2"),
        &format!("{url}/upload/bigquery/v2"),
    )
    .await
    .unwrap();
    api.multipart_limit = 1024;
    api.chunk = 256 * 1024;
    api.backoff = std::time::Duration::from_millis(1);
    fake.datasets.lock().unwrap().insert("d".into());
    let df = df!("n" => (0..200_000i64).collect::<Vec<_>>(), "s" => (0..200_000).map(|i| format!("row {i} {}", i * 7919 % 10007)).collect::<Vec<_>>()).unwrap();
    fake.tables
        .lock()
        .unwrap()
        .insert("d.t".into(), (json!([]), DataFrame::empty()));
    let data = schema::parquet_bytes(&df).unwrap();
    assert!(data.len() > 3 * api.chunk, "{} bytes", data.len());
    fake.fail_chunk_at.store(2, Ordering::SeqCst);
    let load = json!({"destinationTable": {"projectId": "proj", "datasetId": "d", "tableId": "t"}, "sourceFormat": "PARQUET", "writeDisposition": "WRITE_APPEND"});
    // The second chunk fails once: the client asks what the server has and resumes.
    let (job, sent) = api.load(&ctx, load, &data, "proj.d.t").await.unwrap();
    assert_eq!(job["status"]["state"], "DONE");
    assert_eq!(table_rows(&fake, "d.t").height(), 200_000);
    let ranges = fake.content_ranges.lock().unwrap().clone();
    let total = data.len();
    assert_eq!(ranges[0], format!("bytes 0-{}/{total}", 256 * 1024 - 1));
    assert!(ranges.contains(&format!("bytes */{total}")), "{ranges:?}");
    assert!(ranges
        .last()
        .unwrap()
        .ends_with(&format!("-{}/{total}", total - 1)));
    // The failed chunk was sent twice.
    assert!(sent > total as u64, "{sent} vs {total}");
}

#[tokio::test]
async fn stream_reports_refused_rows() {
    let (url, fake) = start().await;
    let obs = Arc::new(Collect::default());
    let mut s = spec("d.t", Write::Append, &["id"]);
    s.mode = Mode::Stream;
    let out = run(s.clone(), ctx(&url, tickets(&[1, 2], "ok"), &obs))
        .await
        .unwrap();
    assert_eq!(out.outputs["job_id"], Value::Null);
    let (_, sent) = fake.multipart.lock().unwrap().last().unwrap().clone();
    let rows: Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(rows[0]["insertId"], "1");
    assert_eq!(rows[0]["json"]["created_at"], "1970-01-01T00:00:01.000000Z");
    let mut df = tickets(&[1, 2, 3], "ok");
    df.with_column(Column::new("title".into(), ["ok", "bad", "ok"]))
        .unwrap();
    let err = run(s, ctx(&url, df, &obs)).await.unwrap_err();
    assert_eq!(err.message, "streaming into `proj.d.t`: BigQuery refused 1 row (row 1: invalid at `title`: no such value)");
    assert!(obs.rows().iter().any(|r| r.contains("refused row 1")));
}

#[test]
fn merge_needs_keys_statically() {
    let mut d = engine::diag::Diags::new("p.yaml");
    let node = engine::yaml::parse("table: d.t\nwrite: merge\n", &mut d).unwrap();
    let got = engine::de::from_node::<BigQueryLoad>(&node, engine::de::Mode::Check, &mut d);
    assert!(got.is_none());
    assert!(
        d.items
            .iter()
            .any(|i| i.message.contains("`write: merge` needs `keys`")),
        "{:?}",
        d.items.iter().map(|i| &i.message).collect::<Vec<_>>()
    );
    let mut d = engine::diag::Diags::new("p.yaml");
    let node = engine::yaml::parse("table: d.t\nwrite: \"{{ params.w }}\"\n", &mut d).unwrap();
    assert!(
        engine::de::from_node::<BigQueryLoad>(&node, engine::de::Mode::Check, &mut d).is_some()
    );
    let mut g = schemars::SchemaGenerator::default();
    g.subschema_for::<BigQueryLoad>();
    let defs = serde_json::to_value(g.definitions()).unwrap();
    let def = &defs["BigQueryLoad"];
    assert_eq!(def["additionalProperties"], false, "{def}");
    for (name, prop) in def["properties"].as_object().unwrap() {
        assert!(prop["description"].is_string(), "{name} has no description");
    }
    for (name, prop) in defs["Partition"]["properties"].as_object().unwrap() {
        assert!(
            prop["description"].is_string(),
            "partition.{name} has no description"
        );
    }
}

#[test]
fn table_names() {
    let t = TableRef::parse("helpdesk.tickets", "proj").unwrap();
    assert_eq!(t.to_string(), "proj.helpdesk.tickets");
    assert_eq!(
        TableRef::parse("`other-p.d.t`", "proj").unwrap().project,
        "other-p"
    );
    assert!(TableRef::parse("tickets", "proj").is_err());
    assert!(TableRef::parse("d.t x", "proj").is_err());
}
