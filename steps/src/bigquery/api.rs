//! The BigQuery REST v2 calls the load step makes: sign-in (yup-oauth2), datasets, tables,
//! media uploads (multipart and resumable), jobs polled to `DONE`, queries and `insertAll`.
//!
//! Every call goes through [`Api::send`]: a bearer token from the service account, network
//! errors, 5xx, 429 and `rateLimitExceeded`/`backendError` retried with backoff, cancellation,
//! and Google's error body (`{"error":{"code","message","errors":[{"reason"}]}}`) decoded
//! into a [`Failure`] whose reason decides whether the step may be retried.

use crate::http::client::{cancellable, sleep};
use engine::step::{StepContext, StepError};
use google_sheets4::hyper_rustls::HttpsConnector;
use google_sheets4::hyper_util::client::legacy::connect::HttpConnector;
use google_sheets4::hyper_util::client::legacy::Client;
use google_sheets4::hyper_util::rt::TokioExecutor;
use google_sheets4::yup_oauth2;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The OAuth scope of every call.
pub const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
/// Below this size the file goes in one multipart request; above it, a resumable upload.
pub const MULTIPART_LIMIT: usize = 5 * 1024 * 1024;
/// Resumable chunk size (a multiple of 256 KiB, as the protocol requires).
pub const CHUNK: usize = 8 * 1024 * 1024;
/// Retries of one request (network errors, 5xx, 429, rate limits).
const RETRIES: u32 = 4;
/// The longest one request may take (an 8 MiB chunk on a slow link included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest pause between two polls of a job.
const POLL_MAX: Duration = Duration::from_secs(5);

type Connector = HttpsConnector<HttpConnector>;
type Authenticator = yup_oauth2::authenticator::Authenticator<Connector>;

/// A failed call: HTTP status (0 for a network error), Google's reason and message.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub reason: String,
    pub message: String,
}

impl Failure {
    /// Transient: the same call may succeed later.
    pub fn retryable(&self) -> bool {
        self.status == 0
            || self.status >= 500
            || self.status == 429
            || retryable_reason(&self.reason)
    }

    /// A step error saying what was being done.
    pub fn step(&self, doing: &str) -> StepError {
        let mut msg = format!("{doing} failed: {}", self.message);
        if !self.reason.is_empty() {
            msg.push_str(&format!(" (reason: {})", self.reason));
        } else if self.status != 0 {
            msg.push_str(&format!(" (HTTP {})", self.status));
        }
        if self.retryable() {
            StepError::retryable(msg)
        } else {
            StepError::fatal(msg)
        }
    }

    fn from_reply(r: &Reply) -> Failure {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let err = &body["error"];
        let reason = err["errors"][0]["reason"]
            .as_str()
            .or_else(|| err["status"].as_str())
            .unwrap_or("")
            .to_string();
        let message = err["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&r.body);
                let t: String = text.trim().chars().take(300).collect();
                if t.is_empty() {
                    format!("HTTP {}", r.status)
                } else {
                    format!("HTTP {}: {t}", r.status)
                }
            });
        Failure {
            status: r.status.as_u16(),
            reason,
            message,
        }
    }
}

/// Reasons BigQuery documents as transient.
pub fn retryable_reason(reason: &str) -> bool {
    matches!(
        reason,
        "backendError" | "rateLimitExceeded" | "internalError" | "jobBackendError"
    )
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A signed-in BigQuery client for one project.
pub struct Api {
    pub project: String,
    pub location: Option<String>,
    base: String,
    upload: String,
    auth: Authenticator,
    client_email: String,
    token_uri: String,
    /// Uploads below this many bytes are multipart.
    pub multipart_limit: usize,
    /// Resumable chunk size.
    pub chunk: usize,
    /// Backoff base (shortened in tests).
    pub backoff: Duration,
}

impl Api {
    pub async fn connect(
        key: yup_oauth2::ServiceAccountKey,
        project: String,
        location: Option<String>,
        base: &str,
        upload: &str,
    ) -> Result<Api, StepError> {
        let client_email = key.client_email.clone();
        let token_uri = key.token_uri.clone();
        let auth_client = Client::builder(TokioExecutor::new()).build::<_, String>(connector());
        let auth = yup_oauth2::ServiceAccountAuthenticator::with_client(
            key,
            yup_oauth2::CustomHyperClientBuilder::from(auth_client),
        )
        .build()
        .await
        .map_err(|e| {
            StepError::fatal(format!(
                "the service-account key of the connection is not usable: {e}"
            ))
        })?;
        Ok(Api {
            project,
            location,
            base: base.trim_end_matches('/').to_string(),
            upload: upload.trim_end_matches('/').to_string(),
            auth,
            client_email,
            token_uri,
            multipart_limit: MULTIPART_LIMIT,
            chunk: CHUNK,
            backoff: Duration::from_millis(500),
        })
    }

    /// An access token (cached and refreshed by yup-oauth2), taught to the redactor.
    async fn token(&self, ctx: &StepContext) -> Result<String, Failure> {
        let got = cancellable(ctx, self.auth.token(&[SCOPE]))
            .await
            .map_err(|e| Failure {
                status: 400,
                reason: "cancelled".into(),
                message: e.message,
            })?;
        match got {
            Ok(t) => match t.token() {
                Some(s) => {
                    ctx.redactor.add(s);
                    Ok(s.to_string())
                }
                None => Err(Failure {
                    status: 401,
                    reason: "unauthenticated".into(),
                    message: format!(
                        "Google sign-in returned no access token (token endpoint {})",
                        self.token_uri
                    ),
                }),
            },
            Err(yup_oauth2::Error::AuthError(a)) => Err(Failure {
                status: 401,
                reason: "unauthenticated".into(),
                message: format!(
                    "Google sign-in failed: {} (service account {}, token endpoint {})",
                    a.error_description
                        .clone()
                        .unwrap_or_else(|| a.error.as_str().to_string()),
                    self.client_email,
                    self.token_uri
                ),
            }),
            Err(e @ (yup_oauth2::Error::HttpError(_) | yup_oauth2::Error::HttpClientError(_))) => {
                Err(Failure {
                    status: 0,
                    reason: String::new(),
                    message: format!(
                        "Google sign-in failed: cannot reach the token endpoint {}: {e}",
                        self.token_uri
                    ),
                })
            }
            Err(e) => Err(Failure {
                status: 401,
                reason: "unauthenticated".into(),
                message: format!(
                    "Google sign-in failed (token endpoint {}): {e}",
                    self.token_uri
                ),
            }),
        }
    }

    /// Send one request (built afresh for every try), retrying transient failures when
    /// `retry` is set. Returns the last response whatever its status; only a network error
    /// (after the retries) or a failed sign-in is an `Err`.
    pub async fn send(
        &self,
        ctx: &StepContext,
        retry: bool,
        build: &(dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<Reply, Failure> {
        let mut attempt = 0;
        loop {
            let token = self.token(ctx).await?;
            let rb = build(http()).bearer_auth(&token).timeout(REQUEST_TIMEOUT);
            let outcome = cancellable(ctx, async {
                let resp = rb.send().await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.bytes().await?;
                Ok::<_, reqwest::Error>(Reply {
                    status,
                    headers,
                    body: body.to_vec(),
                })
            })
            .await
            .map_err(|e| Failure {
                status: 400,
                reason: "cancelled".into(),
                message: e.message,
            })?;
            let failure = match &outcome {
                Ok(r) if r.status.is_success() || r.status.as_u16() == 308 => None,
                Ok(r) => Some(Failure::from_reply(r)),
                Err(e) => Some(Failure {
                    status: 0,
                    reason: String::new(),
                    message: format!("network error: {}", chain(e)),
                }),
            };
            match failure {
                Some(f) if retry && f.retryable() && attempt < RETRIES => {
                    attempt += 1;
                    let wait = self.backoff.saturating_mul(1 << (attempt - 1));
                    ctx.log(
                        engine::events::Level::Warning,
                        &format!(
                            "BigQuery: {}; retry {attempt}/{RETRIES} in {}",
                            f.message,
                            engine::duration::human(wait)
                        ),
                    );
                    sleep(ctx, wait).await.map_err(|e| Failure {
                        status: 400,
                        reason: "cancelled".into(),
                        message: e.message,
                    })?;
                }
                _ => {
                    return outcome.map_err(|e| Failure {
                        status: 0,
                        reason: String::new(),
                        message: format!("network error: {}", chain(&e)),
                    })
                }
            }
        }
    }

    /// A JSON call: the body of a 2xx response, else the failure.
    pub async fn call(
        &self,
        ctx: &StepContext,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let reply = self
            .send(ctx, true, &|c| {
                let rb = c.request(method.clone(), &url);
                match body {
                    Some(b) => rb.json(b),
                    None => rb,
                }
            })
            .await?;
        if reply.status.is_success() {
            Ok(reply.json())
        } else {
            Err(Failure::from_reply(&reply))
        }
    }

    fn project_path(&self, project: &str) -> String {
        format!("/projects/{}", seg(project))
    }

    /// `Some(dataset)` or `None` when it does not exist.
    pub async fn get_dataset(
        &self,
        ctx: &StepContext,
        project: &str,
        dataset: &str,
    ) -> Result<Option<Value>, Failure> {
        let path = format!("{}/datasets/{}", self.project_path(project), seg(dataset));
        not_found_is_none(self.call(ctx, Method::GET, &path, None).await)
    }

    /// Create a dataset (one that appeared meanwhile is fine).
    pub async fn create_dataset(
        &self,
        ctx: &StepContext,
        project: &str,
        dataset: &str,
    ) -> Result<(), Failure> {
        let mut body = json!({"datasetReference": {"projectId": project, "datasetId": dataset}});
        if let Some(l) = &self.location {
            body["location"] = json!(l);
        }
        let path = format!("{}/datasets", self.project_path(project));
        match self.call(ctx, Method::POST, &path, Some(&body)).await {
            Err(f) if f.status == 409 => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn table_path(&self, t: &TableRef) -> String {
        format!(
            "{}/datasets/{}/tables/{}",
            self.project_path(&t.project),
            seg(&t.dataset),
            seg(&t.table)
        )
    }

    /// `Some(table)` or `None` when it does not exist.
    pub async fn get_table(
        &self,
        ctx: &StepContext,
        t: &TableRef,
    ) -> Result<Option<Value>, Failure> {
        not_found_is_none(self.call(ctx, Method::GET, &self.table_path(t), None).await)
    }

    /// Create a table from a Table resource (the reference is filled in here).
    pub async fn create_table(
        &self,
        ctx: &StepContext,
        t: &TableRef,
        mut body: Value,
    ) -> Result<(), Failure> {
        body["tableReference"] =
            json!({"projectId": t.project, "datasetId": t.dataset, "tableId": t.table});
        let path = format!(
            "{}/datasets/{}/tables",
            self.project_path(&t.project),
            seg(&t.dataset)
        );
        match self.call(ctx, Method::POST, &path, Some(&body)).await {
            Err(f) if f.status == 409 => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Replace a table's schema (`tables.patch`): how new nullable columns are added.
    pub async fn patch_schema(
        &self,
        ctx: &StepContext,
        t: &TableRef,
        fields: &Value,
    ) -> Result<(), Failure> {
        let body = json!({"schema": {"fields": fields}});
        self.call(ctx, Method::PATCH, &self.table_path(t), Some(&body))
            .await
            .map(|_| ())
    }

    /// Delete a table (a missing one is fine).
    pub async fn delete_table(&self, ctx: &StepContext, t: &TableRef) -> Result<(), Failure> {
        match self
            .call(ctx, Method::DELETE, &self.table_path(t), None)
            .await
        {
            Err(f) if f.status == 404 => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// `tabledata.insertAll`: the response (with `insertErrors` when some rows failed).
    pub async fn insert_all(
        &self,
        ctx: &StepContext,
        t: &TableRef,
        body: &[u8],
    ) -> Result<Value, Failure> {
        let url = format!("{}{}/insertAll", self.base, self.table_path(t));
        let reply = self
            .send(ctx, true, &|c| {
                c.post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_vec())
            })
            .await?;
        if reply.status.is_success() {
            Ok(reply.json())
        } else {
            Err(Failure::from_reply(&reply))
        }
    }

    /// A new job id: `pipe_<run>_<step>_<random>`.
    pub fn job_id(ctx: &StepContext) -> String {
        format!("pipe_{}_{}_{}", ctx.run_id, ctx.step_id, random_suffix())
    }

    /// Upload `data` as a load job with configuration `load` and wait for it to finish.
    /// Returns the finished job and the file bytes actually sent (re-sent chunks counted).
    pub async fn load(
        &self,
        ctx: &StepContext,
        load: Value,
        data: &[u8],
        target: &str,
    ) -> Result<(Value, u64), StepError> {
        let job_id = Api::job_id(ctx);
        let mut job_ref = json!({"projectId": self.project, "jobId": job_id});
        if let Some(l) = &self.location {
            job_ref["location"] = json!(l);
        }
        let job = json!({"jobReference": job_ref, "configuration": {"load": load}});
        let doing = format!("loading into `{target}`");
        let sent = AtomicU64::new(0);
        let started = if data.len() < self.multipart_limit {
            self.multipart(ctx, &job, data, &job_id, &sent).await
        } else {
            self.resumable(ctx, &job, data, &sent).await
        }
        .map_err(|f| f.step(&doing))?;
        let bytes = sent.load(Ordering::Relaxed);
        ctx.progress(&[("bytes", bytes)]);
        let done = self.wait_job(ctx, started, &doing).await?;
        Ok((done, bytes))
    }

    /// `uploadType=multipart`: the job JSON and the file in one `multipart/related` body.
    async fn multipart(
        &self,
        ctx: &StepContext,
        job: &Value,
        data: &[u8],
        job_id: &str,
        sent: &AtomicU64,
    ) -> Result<Value, Failure> {
        let boundary = format!("pipe_boundary_{}", random_suffix());
        let body = multipart_body(&boundary, job, data);
        let url = format!(
            "{}{}/jobs?uploadType=multipart",
            self.upload,
            self.project_path(&self.project)
        );
        let reply = self
            .send(ctx, true, &|c| {
                sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                c.post(&url)
                    .header(
                        "content-type",
                        format!("multipart/related; boundary={boundary}"),
                    )
                    .body(body.clone())
            })
            .await?;
        if reply.status.is_success() {
            return Ok(reply.json());
        }
        let f = Failure::from_reply(&reply);
        if f.status == 409 {
            // A retry of a request that had in fact arrived: the job exists; follow it.
            return self.get_job(ctx, job_id).await;
        }
        Err(f)
    }

    /// `uploadType=resumable`: open a session, then PUT the file in chunks, resuming from
    /// what the server says it has (308 + `Range`) after a failed chunk.
    async fn resumable(
        &self,
        ctx: &StepContext,
        job: &Value,
        data: &[u8],
        sent: &AtomicU64,
    ) -> Result<Value, Failure> {
        let total = data.len();
        let url = format!(
            "{}{}/jobs?uploadType=resumable",
            self.upload,
            self.project_path(&self.project)
        );
        let reply = self
            .send(ctx, true, &|c| {
                c.post(&url)
                    .header("x-upload-content-type", "application/octet-stream")
                    .header("x-upload-content-length", total.to_string())
                    .json(job)
            })
            .await?;
        if !reply.status.is_success() {
            return Err(Failure::from_reply(&reply));
        }
        let session = reply
            .headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Failure {
                status: reply.status.as_u16(),
                reason: String::new(),
                message: "the resumable upload answered without a `Location` session URI".into(),
            })?;
        let session = url::Url::parse(&url)
            .and_then(|u| u.join(session))
            .map_err(|e| Failure {
                status: 0,
                reason: String::new(),
                message: format!("bad upload session URI `{session}`: {e}"),
            })?
            .to_string();
        let mut offset = 0usize;
        let mut failures = 0u32;
        loop {
            let end = (offset + self.chunk).min(total);
            let chunk = &data[offset..end];
            let range = format!("bytes {offset}-{}/{total}", end.saturating_sub(1));
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let reply = self
                .send(ctx, false, &|c| {
                    c.put(&session)
                        .header("content-range", &range)
                        .body(chunk.to_vec())
                })
                .await;
            let failure = match reply {
                Ok(r) if r.status.is_success() => return Ok(r.json()),
                Ok(r) if r.status.as_u16() == 308 => {
                    offset = received(&r.headers);
                    ctx.progress(&[("bytes", offset as u64)]);
                    continue;
                }
                Ok(r) => Failure::from_reply(&r),
                Err(f) => f,
            };
            if !failure.retryable() || failures >= RETRIES {
                return Err(failure);
            }
            failures += 1;
            let wait = self.backoff.saturating_mul(1 << (failures - 1));
            ctx.log(
                engine::events::Level::Warning,
                &format!(
                    "BigQuery upload chunk {range} failed ({}); asking the server what it has, retry {failures}/{RETRIES} in {}",
                    failure.message,
                    engine::duration::human(wait)
                ),
            );
            sleep(ctx, wait).await.map_err(|e| Failure {
                status: 400,
                reason: "cancelled".into(),
                message: e.message,
            })?;
            let status_range = format!("bytes */{total}");
            let r = self
                .send(ctx, true, &|c| {
                    c.put(&session)
                        .header("content-range", &status_range)
                        .body(Vec::new())
                })
                .await?;
            match r.status.as_u16() {
                200 | 201 => return Ok(r.json()),
                308 => offset = received(&r.headers),
                _ => return Err(Failure::from_reply(&r)),
            }
        }
    }

    pub async fn get_job(&self, ctx: &StepContext, job_id: &str) -> Result<Value, Failure> {
        let mut path = format!("{}/jobs/{}", self.project_path(&self.project), seg(job_id));
        if let Some(l) = &self.location {
            path.push_str(&format!("?location={}", seg(l)));
        }
        self.call(ctx, Method::GET, &path, None).await
    }

    /// Poll a job until `DONE`; its `errorResult` becomes the step's error.
    pub async fn wait_job(
        &self,
        ctx: &StepContext,
        mut job: Value,
        doing: &str,
    ) -> Result<Value, StepError> {
        let job_id = job["jobReference"]["jobId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                StepError::fatal(format!("{doing}: BigQuery returned a job without an id"))
            })?;
        let mut wait = Duration::from_millis(200);
        loop {
            if job["status"]["state"] == "DONE" {
                return match job_error(&job, doing, &job_id) {
                    Some(e) => Err(e),
                    None => Ok(job),
                };
            }
            sleep(ctx, wait).await?;
            wait = (wait * 3 / 2).min(POLL_MAX);
            job = self
                .get_job(ctx, &job_id)
                .await
                .map_err(|f| f.step(&format!("{doing} (polling job {job_id})")))?;
        }
    }

    /// Run a GoogleSQL statement (`jobs.query`, polled to the end). Returns the finished job.
    pub async fn query(
        &self,
        ctx: &StepContext,
        sql: &str,
        doing: &str,
    ) -> Result<Value, StepError> {
        let mut body = json!({
            "query": sql,
            "useLegacySql": false,
            "timeoutMs": 10000,
            "requestId": random_suffix(),
        });
        if let Some(l) = &self.location {
            body["location"] = json!(l);
        }
        let path = format!("{}/queries", self.project_path(&self.project));
        let resp = self
            .call(ctx, Method::POST, &path, Some(&body))
            .await
            .map_err(|f| f.step(doing))?;
        match resp["jobReference"]["jobId"].as_str() {
            Some(id) => {
                let job = self
                    .get_job(ctx, id)
                    .await
                    .map_err(|f| f.step(&format!("{doing} (polling job {id})")))?;
                let mut done = self.wait_job(ctx, job, doing).await?;
                if done["statistics"]["query"]["numDmlAffectedRows"].is_null() {
                    done["statistics"]["query"]["numDmlAffectedRows"] =
                        resp["numDmlAffectedRows"].clone();
                }
                Ok(done)
            }
            None => Ok(
                json!({"statistics": {"query": {"numDmlAffectedRows": resp["numDmlAffectedRows"]}}}),
            ),
        }
    }
}

/// The error of a finished job, naming what it was doing: message and reason, plus the
/// first few of the other errors. Retryable for transient reasons only.
fn job_error(job: &Value, doing: &str, job_id: &str) -> Option<StepError> {
    let err = job["status"]["errorResult"].as_object()?;
    let reason = err.get("reason").and_then(Value::as_str).unwrap_or("");
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no message");
    let mut msg = format!("{doing} failed: {message} (reason: {reason}");
    if !job_id.is_empty() {
        msg.push_str(&format!(", job {job_id}"));
    }
    msg.push(')');
    let others: Vec<String> = job["status"]["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| *m != message)
        .take(3)
        .map(str::to_string)
        .collect();
    if !others.is_empty() {
        msg.push_str(&format!("; also: {}", others.join("; ")));
    }
    Some(if retryable_reason(reason) {
        StepError::retryable(msg)
    } else {
        StepError::fatal(msg)
    })
}

/// The next byte the server wants, from a 308's `Range: bytes=0-N` (none: start over).
fn received(headers: &HeaderMap) -> usize {
    headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.rsplit('-').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .map(|n| n + 1)
        .unwrap_or(0)
}

/// The body of a multipart upload: the job JSON, then the file.
pub fn multipart_body(boundary: &str, job: &Value, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(data.len() + 1024);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{job}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

fn not_found_is_none(r: Result<Value, Failure>) -> Result<Option<Value>, Failure> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(f) if f.status == 404 => Ok(None),
        Err(f) => Err(f),
    }
}

/// A project, dataset and table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub project: String,
    pub dataset: String,
    pub table: String,
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.project, self.dataset, self.table)
    }
}

impl TableRef {
    /// `dataset.table` (in `project`) or `project.dataset.table`, backticks allowed.
    pub fn parse(text: &str, project: &str) -> Result<TableRef, String> {
        let t = text.trim().trim_matches('`');
        let parts: Vec<&str> = t.split('.').map(|p| p.trim().trim_matches('`')).collect();
        let (p, d, n) = match parts.as_slice() {
            [d, n] => (project, *d, *n),
            [p, d, n] => (*p, *d, *n),
            _ => {
                return Err(format!(
                    "`table: {text}` must be `dataset.table` or `project.dataset.table`"
                ))
            }
        };
        if p.is_empty() {
            return Err(format!(
                "`table: {text}` names no project and the connection has no `project`"
            ));
        }
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '$'))
        };
        if !ok(d) || !ok(n) || !p.chars().all(|c| c.is_alphanumeric() || "-_:".contains(c)) {
            return Err(format!(
                "`table: {text}`: project, dataset and table names are letters, digits, `_` and `-`"
            ));
        }
        Ok(TableRef {
            project: p.into(),
            dataset: d.into(),
            table: n.into(),
        })
    }

    /// The table quoted for GoogleSQL.
    pub fn sql(&self) -> String {
        format!("`{}.{}.{}`", self.project, self.dataset, self.table)
    }
}

/// Percent-encode one URL path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The client for BigQuery: rustls, proxies from the environment, and — unlike the shared
/// client of the HTTP steps — no redirects followed, since a resumable upload answers `308
/// Resume Incomplete`, which reqwest would otherwise take for a redirect.
fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .user_agent(concat!("pipe/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("building the HTTP client")
    })
}

/// The connector yup-oauth2 uses for the token endpoint: the one `sheets.read` builds
/// (system roots, else Mozilla's; `http://` allowed for local fakes), shared.
fn connector() -> Connector {
    crate::sheets::connector()
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// 16 hex digits, different on every call.
pub fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:016x}", h.finish())
}
