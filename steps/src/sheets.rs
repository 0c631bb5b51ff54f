//! `type: sheets.read` — read a range of a Google Sheet, optionally waiting until its values
//! satisfy a condition.
//!
//! Why a step of its own: the help-desk login of the headline pipeline e-mails a one-time
//! code, and the customer's mailbox script copies it into a spreadsheet. The pipeline has to
//! *wait* for a fresh code to appear there (`wait.until`, re-evaluated after every read) and
//! then use it (`outputs: { code: "{{ values[0][0] }}" }`). Reading a sheet once (a lookup
//! table, a list of ids) is the same call without `wait`.
//!
//! * Auth: the step's connection has type `google_service_account` with `key_file` (a path,
//!   relative to the pipeline's folder) or `key_json` (the key itself) — exactly one. The
//!   key's `private_key` is masked everywhere at once. A token for the scope
//!   `spreadsheets.readonly` is fetched with `yup-oauth2` from the key's own `token_uri`
//!   (which is how the sandbox and the tests point it at a local fake) and cached for the
//!   whole step. `sheets_base_url` (default `https://sheets.googleapis.com/`) redirects the
//!   Sheets calls.
//! * One `spreadsheets.values.get` per read. `values` is always a list of lists (rows, or
//!   columns with `major_dimension: columns`) holding the cells as Google returns them
//!   (strings when `render: formatted`; numbers and booleans too otherwise); `[]` for an
//!   empty range (Google omits trailing empty rows and cells, and the whole `values` key when
//!   nothing is there). `as: table` turns the lists into a table: the first row (or, with
//!   columns, the first cell of each column) is the header, every column is a string column,
//!   ragged rows are padded with nulls.
//! * `wait`: read every `every` (default 5s) until the deferred template `until` — which
//!   sees the freshly read `values` besides `params`, `steps` and `run` — is true; fail after
//!   `timeout` (default 3m). A transient failure of one read (network, 429, 5xx) does not end
//!   the wait; the next read tries again. A log row is written for the first poll and then
//!   about every 30 seconds, not for every poll.
//! * Errors name the spreadsheet and the range: 403 says which service account to share the
//!   sheet with, 404 says the spreadsheet does not exist, 400 says the range is bad (Google's
//!   message, e.g. an unknown tab), a refused sign-in quotes the token endpoint's
//!   `error_description`. Network errors, timeouts, 429 and 5xx are retryable (`retry:`);
//!   the others are not.
//! * The result object (`result` in `outputs:`) is `{values, range, major_dimension, rows}`;
//!   `values` is also a plain name there (`{{ values[0][0] }}`). The step's own outputs are
//!   `values`, `rows` and `range`.
//!
//! Crates: `google-sheets4` (the generated client of the Sheets API v4) and `yup-oauth2`
//! (the service-account JWT flow), because the issue asked for them. RUSTSEC-2025-0066 flags
//! the google-apis-rs family as unmaintained, yet it is still republished against the
//! current Discovery documents (7.0.0+20251215); we use only `values.get`, and the fake in
//! this module's tests (and the sandbox) proves the wire protocol we depend on, so swapping
//! the crate for a plain HTTP call later is a local change.

use async_trait::async_trait;
use engine::events::Level;
use engine::model::DurationSpec;
use engine::step::{Problem, StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use google_sheets4::api::Scope;
use google_sheets4::hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use google_sheets4::hyper_util::client::legacy::connect::HttpConnector;
use google_sheets4::hyper_util::client::legacy::Client;
use google_sheets4::hyper_util::rt::TokioExecutor;
use google_sheets4::yup_oauth2;
use google_sheets4::Sheets;
use polars::prelude::{Column, DataFrame};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

/// Where the Sheets API lives unless the connection says otherwise.
const DEFAULT_BASE_URL: &str = "https://sheets.googleapis.com/";
/// The connection type this step accepts.
const CONNECTION_TYPE: &str = "google_service_account";
/// The longest one read (or one token request) may take before it counts as a network error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// While waiting, a log row about every this often (plus the first poll).
const LOG_EVERY: Duration = Duration::from_secs(30);
const DEFAULT_EVERY: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// What the step makes of the values it reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadAs {
    /// Only the `values` output and result (a list of lists).
    #[default]
    Values,
    /// Also a table for later steps: the first row is the header, every column a string.
    Table,
}

/// Whether the inner lists of `values` are rows or columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MajorDimension {
    /// Each inner list is a row (`values[row][column]`).
    #[default]
    Rows,
    /// Each inner list is a column (`values[column][row]`).
    Columns,
}

impl MajorDimension {
    fn api(self) -> &'static str {
        match self {
            MajorDimension::Rows => "ROWS",
            MajorDimension::Columns => "COLUMNS",
        }
    }
}

/// How cells are rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Render {
    /// As displayed in the sheet (always strings: `"1,234.50"`, `"2025-01-31"`).
    #[default]
    Formatted,
    /// The underlying values: numbers and booleans as JSON numbers and booleans, dates as
    /// serial numbers.
    Unformatted,
    /// Formulas as written (`"=SUM(A1:A3)"`), other cells unformatted.
    Formula,
}

impl Render {
    fn api(self) -> &'static str {
        match self {
            Render::Formatted => "FORMATTED_VALUE",
            Render::Unformatted => "UNFORMATTED_VALUE",
            Render::Formula => "FORMULA",
        }
    }
}

/// Keep reading until a condition over the values holds.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    /// The condition, a template evaluated after every read with `values` (the values just
    /// read) besides `params`, `steps` and `run`, e.g.
    /// `"{{ values and values[0][1] >= steps.login.finished_at }}"`. It is not rendered when
    /// the step starts.
    pub until: String,
    /// The pause between reads (`5s`, `500ms`; default 5s).
    #[serde(default)]
    pub every: Option<DurationSpec>,
    /// How long to keep reading before the step fails (`3m`, `1h`; default 3m).
    #[serde(default)]
    pub timeout: Option<DurationSpec>,
}

/// Read a range of a Google Sheet (optionally waiting until a condition over it holds).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SheetsRead {
    /// The spreadsheet's id: the long part of its URL between `/d/` and `/edit`.
    pub spreadsheet: String,
    /// The range in A1 notation: `OTP!A2:B2`, `Sheet1!A:D`, `'My tab'!A1:C10`, or a tab name
    /// alone for all of it.
    pub range: String,
    /// `values` (default): the `values` output only; `table`: also a table for later steps
    /// (first row = header; an empty header becomes `column_N`, a repeated one gets `_2`, `_3` …).
    #[serde(rename = "as", default)]
    pub read_as: ReadAs,
    /// `rows` (default): `values` is a list of rows; `columns`: a list of columns.
    #[serde(default)]
    pub major_dimension: MajorDimension,
    /// `formatted` (default, as displayed), `unformatted` (numbers as numbers) or `formula`.
    #[serde(default)]
    pub render: Render,
    /// Poll the range until a condition holds (an OTP that a mailbox script writes there,
    /// for example); without it the range is read once.
    #[serde(default)]
    pub wait: Option<Wait>,
}

#[async_trait]
impl StepConfig for SheetsRead {
    const TYPE: &'static str = "sheets.read";
    const SUMMARY: &'static str =
        "Read a Google Sheets range (values or a table); optionally poll until a condition over the values holds";

    fn problems(&self) -> Vec<Problem> {
        let every = self.wait.as_ref().and_then(|w| w.every.as_ref());
        match every.map(|e| e.parse()) {
            Some(Ok(d)) if d.is_zero() => {
                vec![Problem::at(
                    "wait.every",
                    "`wait.every` must be longer than 0s",
                )]
            }
            _ => Vec::new(),
        }
    }

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: self.read_as == ReadAs::Table,
            outputs: Some(vec!["values".into(), "rows".into(), "range".into()]),
            secret_fields: Vec::new(),
            locals: vec!["values".into()],
            deferred: vec!["wait.until".into()],
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let redact = |e: StepError| StepError {
            message: ctx.redactor.redact(&e.message),
            retryable: e.retryable,
        };
        let reader = Reader::connect(&self, &ctx).await.map_err(redact)?;
        let read = match &self.wait {
            None => {
                ctx.log(
                    Level::Info,
                    &format!(
                        "reading `{}` of spreadsheet `{}`",
                        self.range, self.spreadsheet
                    ),
                );
                reader.read_cancellable(&ctx).await.map_err(redact)?
            }
            Some(wait) => self.wait(&reader, wait, &ctx).await.map_err(redact)?,
        };
        self.finish(read, &ctx).map_err(redact)
    }
}

impl SheetsRead {
    /// Poll until `wait.until` holds for the values read, or the timeout passes.
    async fn wait(
        &self,
        reader: &Reader,
        wait: &Wait,
        ctx: &StepContext,
    ) -> Result<Read, StepError> {
        let every = duration(wait.every.as_ref(), DEFAULT_EVERY, "wait.every")?;
        let timeout = duration(wait.timeout.as_ref(), DEFAULT_TIMEOUT, "wait.timeout")?;
        let timeout_text = wait
            .timeout
            .as_ref()
            .map(spec_text)
            .unwrap_or_else(|| "3m".into());
        let log_every = (LOG_EVERY.as_millis() / every.as_millis().max(1)).max(1) as u64;
        let started = Instant::now();
        let deadline = started + timeout;
        ctx.log(
            Level::Info,
            &format!(
                "waiting for `{}` on `{}` of spreadsheet `{}` (every {}, at most {timeout_text})",
                wait.until,
                self.range,
                self.spreadsheet,
                engine::duration::human(every)
            ),
        );
        let mut polls: u64 = 0;
        // The poll whose outcome gets the next log row.
        let mut next_row: u64 = 1;
        let mut last_rows: Option<usize> = None;
        let mut last_error: Option<StepError> = None;
        loop {
            polls += 1;
            ctx.progress(&[("polls", polls)]);
            match reader.read_cancellable(ctx).await {
                Ok(read) => {
                    last_error = None;
                    last_rows = Some(read.values.len());
                    let values = Value::from(read.values.clone());
                    let held = ctx
                        .truthy(&wait.until, &[("values", values)])
                        .map_err(|e| {
                            StepError::fatal(format!(
                                "the wait condition `{}` failed: {e}",
                                wait.until
                            ))
                        })?;
                    if held {
                        ctx.log(
                            Level::Info,
                            &format!(
                                "the condition held after {polls} poll{} ({}): {} row{}",
                                if polls == 1 { "" } else { "s" },
                                engine::duration::human(started.elapsed()),
                                read.values.len(),
                                if read.values.len() == 1 { "" } else { "s" },
                            ),
                        );
                        return Ok(read);
                    }
                    if polls >= next_row {
                        next_row = polls + log_every;
                        ctx.log(
                            Level::Info,
                            &format!(
                                "poll {polls}: not yet ({} row{}, {} elapsed)",
                                read.values.len(),
                                if read.values.len() == 1 { "" } else { "s" },
                                engine::duration::human(started.elapsed())
                            ),
                        );
                    }
                }
                Err(e) if e.retryable && e.message != "cancelled" => {
                    if last_error.is_none() || polls >= next_row {
                        next_row = polls + log_every;
                        ctx.log(
                            Level::Warning,
                            &format!("poll {polls} failed (will try again): {}", e.message),
                        );
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if now >= deadline {
                let mut message = format!(
                    "the condition `{}` did not hold within {timeout_text} (last values: {}) — polled `{}` of spreadsheet `{}` {polls} time{}",
                    wait.until,
                    match last_rows {
                        Some(n) => format!("{n} row{}", if n == 1 { "" } else { "s" }),
                        None => "none read".into(),
                    },
                    self.range,
                    self.spreadsheet,
                    if polls == 1 { "" } else { "s" },
                );
                return Err(match last_error {
                    Some(e) => {
                        message.push_str(&format!("; the last read failed: {}", e.message));
                        StepError::retryable(message)
                    }
                    None => StepError::fatal(message),
                });
            }
            let pause = every.min(deadline - now);
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Err(StepError::fatal("cancelled")),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The step's outputs, result object and (with `as: table`) table.
    fn finish(&self, read: Read, ctx: &StepContext) -> Result<StepOutput, StepError> {
        let table = match self.read_as {
            ReadAs::Values => None,
            ReadAs::Table => Some(to_frame(&read.values, self.major_dimension).map_err(|e| {
                StepError::fatal(format!(
                    "`{}` of spreadsheet `{}` does not make a table: {e}",
                    self.range, self.spreadsheet
                ))
            })?),
        };
        let rows = match &table {
            Some(df) => df.height(),
            None => read.values.len(),
        };
        if self.wait.is_none() {
            ctx.log(
                Level::Info,
                &format!(
                    "read {rows} {}row{} from `{}`",
                    if table.is_some() { "data " } else { "" },
                    if rows == 1 { "" } else { "s" },
                    read.range
                ),
            );
        }
        let values = Value::from(read.values);
        let mut outputs = serde_json::Map::new();
        outputs.insert("values".into(), values.clone());
        outputs.insert("rows".into(), json!(rows));
        outputs.insert("range".into(), json!(read.range));
        Ok(StepOutput {
            result: json!({
                "values": values,
                "range": read.range,
                "major_dimension": self.major_dimension.api(),
                "rows": rows,
            }),
            outputs,
            table: table.map(crate::table::table),
            warnings: Vec::new(),
        })
    }
}

/// One read's values.
#[derive(Debug)]
struct Read {
    values: Vec<Vec<Value>>,
    /// The range Google says it covered (`OTP!A2:B2`), else the one asked for.
    range: String,
}

pub(crate) type Connector = HttpsConnector<HttpConnector>;

/// A signed-in Sheets client for one spreadsheet range.
struct Reader {
    hub: Sheets<Connector>,
    spreadsheet: String,
    /// The range as configured (for messages).
    range: String,
    /// The range percent-encoded for the URL path (google-sheets4 inserts it as is).
    range_path: String,
    major: MajorDimension,
    render: Render,
    client_email: String,
    token_uri: String,
}

/// The `google_service_account` connection (a service-account key for Google's APIs).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GoogleConnection {
    /// Always `google_service_account`.
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: String,
    /// A path to the service-account key JSON (relative to the pipeline's folder).
    #[serde(default)]
    key_file: Option<String>,
    /// The service-account key itself (JSON text or a mapping).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    key_json: Option<Value>,
    /// The Sheets API's base URL (default `https://sheets.googleapis.com/`).
    #[serde(default)]
    sheets_base_url: Option<String>,
    /// The local fake that `pipe run --sandbox` points this connection at (`google`).
    #[serde(default)]
    #[allow(dead_code)]
    sandbox: Option<Value>,
    /// What the connection is, for people.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

impl Reader {
    async fn connect(cfg: &SheetsRead, ctx: &StepContext) -> Result<Reader, StepError> {
        let conn = ctx.connection.as_ref().ok_or_else(|| {
            StepError::fatal(format!(
                "sheets.read needs a connection of type `{CONNECTION_TYPE}` (`connection: <name>` on the step)"
            ))
        })?;
        // The type first: another kind's keys are not this kind's mistakes.
        let kind = conn.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind != CONNECTION_TYPE {
            return Err(StepError::fatal(format!(
                "sheets.read needs a connection of type `{CONNECTION_TYPE}`, not `{kind}`"
            )));
        }
        let conn: GoogleConnection = serde_json::from_value(conn.clone()).map_err(|e| {
            StepError::fatal(format!(
                "the step's connection is not a valid `{CONNECTION_TYPE}` connection: {e}"
            ))
        })?;
        let key = load_key(&conn, &ctx.pipeline_dir)?;
        ctx.redactor.add(&key.private_key);
        let client_email = key.client_email.clone();
        let token_uri = key.token_uri.clone();
        let connector = connector();
        let auth_client =
            Client::builder(TokioExecutor::new()).build::<_, String>(connector.clone());
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
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let mut hub = Sheets::new(client, auth);
        let mut base = conn
            .sheets_base_url
            .filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_URL.into());
        if !base.ends_with('/') {
            base.push('/');
        }
        hub.base_url(base);
        Ok(Reader {
            hub,
            spreadsheet: cfg.spreadsheet.trim().to_string(),
            range: cfg.range.clone(),
            range_path: encode_path_segment(&cfg.range),
            major: cfg.major_dimension,
            render: cfg.render,
            client_email,
            token_uri,
        })
    }

    /// One read, abandoned (as `cancelled`) when the step is cancelled.
    async fn read_cancellable(&self, ctx: &StepContext) -> Result<Read, StepError> {
        tokio::select! {
            _ = ctx.cancel.cancelled() => Err(StepError::fatal("cancelled")),
            r = tokio::time::timeout(REQUEST_TIMEOUT, self.read()) => match r {
                Ok(r) => r,
                Err(_) => Err(StepError::retryable(format!(
                    "reading `{}` of spreadsheet `{}` took longer than {}",
                    self.range,
                    self.spreadsheet,
                    engine::duration::human(REQUEST_TIMEOUT)
                ))),
            },
        }
    }

    async fn read(&self) -> Result<Read, StepError> {
        let call = self
            .hub
            .spreadsheets()
            .values_get(&encode_path_segment(&self.spreadsheet), &self.range_path)
            .major_dimension(self.major.api())
            .value_render_option(self.render.api())
            .add_scope(Scope::SpreadsheetReadonly);
        match call.doit().await {
            Ok((_, vr)) => Ok(Read {
                values: vr.values.unwrap_or_default(),
                range: vr.range.unwrap_or_else(|| self.range.clone()),
            }),
            Err(e) => Err(self.error(e)),
        }
    }

    /// A clear message for a failed call, naming the spreadsheet and the range.
    fn error(&self, e: google_sheets4::Error) -> StepError {
        use google_sheets4::Error as E;
        let at = format!("`{}` of spreadsheet `{}`", self.range, self.spreadsheet);
        match e {
            E::HttpError(e) => {
                StepError::retryable(format!("network error reading {at}: {}", chain(&e)))
            }
            E::Io(e) => StepError::retryable(format!("network error reading {at}: {e}")),
            E::MissingToken(e) => match e.downcast_ref::<yup_oauth2::Error>() {
                Some(yup_oauth2::Error::AuthError(a)) => StepError::fatal(format!(
                    "Google sign-in failed: {} (service account {}, token endpoint {})",
                    a.error_description
                        .clone()
                        .unwrap_or_else(|| a.error.as_str().to_string()),
                    self.client_email,
                    self.token_uri
                )),
                Some(yup_oauth2::Error::HttpError(_) | yup_oauth2::Error::HttpClientError(_)) => {
                    StepError::retryable(format!(
                        "Google sign-in failed: cannot reach the token endpoint {}: {}",
                        self.token_uri,
                        chain(e.as_ref())
                    ))
                }
                _ => StepError::fatal(format!(
                    "Google sign-in failed (token endpoint {}): {}",
                    self.token_uri,
                    chain(e.as_ref())
                )),
            },
            E::BadRequest(body) => {
                let err = &body["error"];
                let code = err["code"].as_u64().unwrap_or(0) as u16;
                let status = err["status"].as_str().unwrap_or("");
                let message = err["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| body.to_string());
                self.status_error(code, status, &message)
            }
            E::Failure(resp) => {
                let code = resp.status().as_u16();
                let reason = resp.status().canonical_reason().unwrap_or("").to_string();
                self.status_error(code, "", &format!("HTTP {code} {reason}"))
            }
            E::JsonDecodeError(body, e) => StepError::fatal(format!(
                "unexpected response reading {at}: {e} (body starts `{}`)",
                body.chars().take(200).collect::<String>()
            )),
            other => StepError::fatal(format!("reading {at} failed: {}", other.to_string().trim())),
        }
    }

    fn status_error(&self, code: u16, status: &str, message: &str) -> StepError {
        let (id, range) = (&self.spreadsheet, &self.range);
        match (code, status) {
            (403, _) | (_, "PERMISSION_DENIED") => StepError::fatal(format!(
                "permission denied: share the spreadsheet with {} (spreadsheet `{id}`, range `{range}`; Google: {message})",
                self.client_email
            )),
            (404, _) | (_, "NOT_FOUND") => StepError::fatal(format!(
                "spreadsheet `{id}` not found (range `{range}`; Google: {message})"
            )),
            (400, _) | (_, "INVALID_ARGUMENT") => StepError::fatal(format!(
                "bad range `{range}`: {message} (spreadsheet `{id}`)"
            )),
            (401, _) | (_, "UNAUTHENTICATED") => StepError::fatal(format!(
                "Google rejected the access token of {} reading `{range}` of spreadsheet `{id}`: {message}",
                self.client_email
            )),
            (429, _) | (500..=599, _) | (_, "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL") => {
                StepError::retryable(format!(
                    "Google Sheets is busy or failing ({code}) reading `{range}` of spreadsheet `{id}`: {message}"
                ))
            }
            _ => StepError::fatal(format!(
                "reading `{range}` of spreadsheet `{id}` failed ({code} {status}): {message}"
            )),
        }
    }
}

const BOTH_KEYS: &str =
    "the google_service_account connection has both `key_file` and `key_json`: give exactly one";
const NO_KEY: &str = "the google_service_account connection needs `key_file` (a path to the service-account key JSON) or `key_json` (the key itself)";

/// `--sandbox`: the fake Google's key file (instead of any inline key) and Sheets URL.
pub fn sandbox(
    t: &engine::connection::SandboxTarget,
) -> Result<Option<engine::connection::ConnectionOverride>, String> {
    match t.stand_in() {
        None | Some("google") => Ok(Some(engine::connection::ConnectionOverride::Patch {
            set: vec![
                ("key_file".into(), t.fake("google.key_file")),
                ("sheets_base_url".into(), t.fake("google.sheets_url")),
            ],
            remove: vec!["key_json".into()],
        })),
        Some(other) => Err(t.unknown_stand_in(other, &["google"])),
    }
}

impl engine::connection::ConnectionConfig for GoogleConnection {
    fn problems(&self) -> Vec<Problem> {
        match (&self.key_file, &self.key_json) {
            (Some(_), Some(_)) => vec![Problem::at("key_json", BOTH_KEYS)],
            (None, None) => vec![Problem::at("type", NO_KEY)],
            _ => Vec::new(),
        }
    }
}

/// The service-account key from `key_file` or `key_json` (exactly one).
fn load_key(
    conn: &GoogleConnection,
    pipeline_dir: &Path,
) -> Result<yup_oauth2::ServiceAccountKey, StepError> {
    let file = conn.key_file.as_deref().filter(|s| !s.trim().is_empty());
    let inline = conn.key_json.as_ref().filter(|v| match v {
        Value::Null => false,
        Value::String(s) => !s.trim().is_empty(),
        _ => true,
    });
    let (text, origin) = match (file, inline) {
        (Some(_), Some(_)) => return Err(StepError::fatal(BOTH_KEYS)),
        (None, None) => return Err(StepError::fatal(NO_KEY)),
        (Some(path), None) => {
            let path = pipeline_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                StepError::fatal(format!(
                    "cannot read the service-account key file {}: {e}",
                    path.display()
                ))
            })?;
            (text, format!("key file {}", path.display()))
        }
        (None, Some(Value::String(s))) => (s.clone(), "`key_json`".to_string()),
        (None, Some(v)) => (v.to_string(), "`key_json`".to_string()),
    };
    // Not `parse_service_account_key`: its error quotes serde's message, which could echo
    // part of the key.
    let value: Value = serde_json::from_str(&text)
        .map_err(|_| StepError::fatal(format!("the service-account {origin} is not valid JSON")))?;
    for field in ["client_email", "private_key", "token_uri"] {
        if !value[field].is_string() {
            return Err(StepError::fatal(format!(
                "the service-account {origin} has no `{field}` (is it a service-account key?)"
            )));
        }
    }
    serde_json::from_value(value).map_err(|_| {
        StepError::fatal(format!(
            "the service-account {origin} is not a valid service-account key"
        ))
    })
}

/// The HTTPS connector for both the token endpoint and the Sheets API: the system's CA
/// certificates (Mozilla's bundled roots when the system has none), `http://` allowed for
/// local fakes. Built once per process; `bigquery.load` uses it too.
pub(crate) fn connector() -> Connector {
    static CONNECTOR: OnceLock<Connector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            crate::init_crypto();
            let builder = match HttpsConnectorBuilder::new().with_native_roots() {
                Ok(b) => b,
                Err(_) => HttpsConnectorBuilder::new().with_webpki_roots(),
            };
            builder
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .build()
        })
        .clone()
}

/// Percent-encode what may not stand in one URL path segment (`/`, `?`, `#`, `%`, spaces,
/// non-ASCII); `!`, `:` and `'` of A1 notation stay as they are.
fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error and its sources, `: `-separated (hyper's own message is terse).
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

fn duration(
    spec: Option<&DurationSpec>,
    default: Duration,
    field: &str,
) -> Result<Duration, StepError> {
    match spec {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|e| StepError::fatal(format!("`{field}`: {e}"))),
    }
}

/// A duration as the pipeline wrote it.
fn spec_text(spec: &DurationSpec) -> String {
    match spec {
        DurationSpec::Seconds(n) => format!("{n}s"),
        DurationSpec::Text(t) => t.trim().to_string(),
    }
}

/// A cell as a string column value: strings as they are, numbers and booleans as their JSON
/// text, null as null.
fn cell_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The values as a table: header first (the first row, or the first cell of each column),
/// string columns, ragged rows padded with nulls.
fn to_frame(values: &[Vec<Value>], major: MajorDimension) -> Result<DataFrame, String> {
    // (header, cells) per column.
    let columns: Vec<(Option<String>, Vec<Option<String>>)> = match major {
        MajorDimension::Rows => {
            let width = values.iter().map(Vec::len).max().unwrap_or(0);
            let header = values.first();
            let body = values.get(1..).unwrap_or(&[]);
            (0..width)
                .map(|j| {
                    (
                        header.and_then(|h| h.get(j)).and_then(cell_text),
                        body.iter().map(|r| r.get(j).and_then(cell_text)).collect(),
                    )
                })
                .collect()
        }
        MajorDimension::Columns => {
            let height = values
                .iter()
                .map(|c| c.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            values
                .iter()
                .map(|c| {
                    (
                        c.first().and_then(cell_text),
                        (1..=height).map(|i| c.get(i).and_then(cell_text)).collect(),
                    )
                })
                .collect()
        }
    };
    let mut seen = HashSet::new();
    let mut cols = Vec::with_capacity(columns.len());
    for (j, (header, cells)) in columns.into_iter().enumerate() {
        let base = match header.map(|h| h.trim().to_string()) {
            Some(h) if !h.is_empty() => h,
            _ => format!("column_{}", j + 1),
        };
        let mut name = base.clone();
        let mut n = 2;
        while !seen.insert(name.clone()) {
            name = format!("{base}_{n}");
            n += 1;
        }
        cols.push(Column::new(name.into(), cells));
    }
    DataFrame::new(cols).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Form, Path as UrlPath, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use engine::events::{Observer, RunEvent};
    use engine::secrets::Redactor;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    // ---- the fake Google: POST /token, POST /token-refused, GET values ----

    #[derive(Default)]
    struct Fake {
        /// Reads of each spreadsheet so far.
        reads: Mutex<HashMap<String, usize>>,
        /// The query strings of the reads.
        queries: Mutex<Vec<HashMap<String, String>>>,
        /// The ranges (decoded) of the reads.
        ranges: Mutex<Vec<String>>,
        tokens: AtomicUsize,
    }

    const TOKEN: &str = "ya29.fake-access-token";

    async fn token(
        State(fake): State<Arc<Fake>>,
        Form(form): Form<HashMap<String, String>>,
    ) -> Response {
        let ok = form.get("grant_type").map(String::as_str)
            == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
            && form
                .get("assertion")
                .is_some_and(|a| a.split('.').count() == 3);
        if !ok {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_request", "error_description": "bad form"})),
            )
                .into_response();
        }
        fake.tokens.fetch_add(1, Ordering::SeqCst);
        Json(json!({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}))
            .into_response()
    }

    async fn token_refused() -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})),
        )
            .into_response()
    }

    fn google_error(code: u16, status: &str, message: &str) -> Response {
        (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({"error": {"code": code, "message": message, "status": status}})),
        )
            .into_response()
    }

    async fn values(
        State(fake): State<Arc<Fake>>,
        UrlPath((id, range)): UrlPath<(String, String)>,
        Query(query): Query<HashMap<String, String>>,
        headers: HeaderMap,
    ) -> Response {
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {TOKEN}"))
        {
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
            );
        }
        let n = {
            let mut reads = fake.reads.lock().unwrap();
            let n = reads.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        fake.queries.lock().unwrap().push(query.clone());
        fake.ranges.lock().unwrap().push(range.clone());
        let major = query
            .get("majorDimension")
            .cloned()
            .unwrap_or("ROWS".into());
        let reply = |vals: Option<Value>| {
            let mut body = json!({"range": range, "majorDimension": major});
            if let Some(v) = vals {
                body["values"] = v;
            }
            Json(body).into_response()
        };
        match id.as_str() {
            "forbidden" => google_error(
                403,
                "PERMISSION_DENIED",
                "The caller does not have permission",
            ),
            "missing" => google_error(404, "NOT_FOUND", "Requested entity was not found."),
            "busy" => google_error(503, "UNAVAILABLE", "The service is currently unavailable."),
            // The OTP appears on the 4th read; the 2nd read fails transiently.
            "otp-later" => match n {
                1 | 3 => reply(None),
                2 => google_error(503, "UNAVAILABLE", "The service is currently unavailable."),
                _ => reply(Some(json!([["482913", "2025-06-01T12:00:00Z"]]))),
            },
            "book" => match range.as_str() {
                "OTP!A2:B2" => reply(Some(json!([["482913", "2025-06-01T12:00:00Z"]]))),
                "Empty!A1:B9" => reply(None),
                "'My tab'!A1:B2" => reply(Some(json!([["x"]]))),
                "People!A1:D4" if major == "COLUMNS" => reply(Some(json!([
                    ["name", "Ana", "Bia"],
                    ["", "31"],
                    ["name", "x", "y"],
                ]))),
                "People!A1:D4" => reply(Some(json!([
                    ["name", "age", "", "name"],
                    ["Ana", 31],
                    ["Bia", "28", "z", "w", "extra"],
                ]))),
                other => google_error(
                    400,
                    "INVALID_ARGUMENT",
                    &format!("Unable to parse range: {other}"),
                ),
            },
            _ => google_error(404, "NOT_FOUND", "Requested entity was not found."),
        }
    }

    async fn start_fake() -> (String, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let app = Router::new()
            .route("/token", post(token))
            .route("/token-refused", post(token_refused))
            .route("/v4/spreadsheets/{id}/values/{range}", get(values))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, fake)
    }

    /// A real RSA key (yup-oauth2 signs the JWT with it), generated once per test process.
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
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    }

    const EMAIL: &str = "pipe-reader@pipe-test.iam.gserviceaccount.com";

    fn key_json(token_uri: &str) -> Value {
        json!({
            "type": "service_account",
            "project_id": "pipe-test",
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": private_key(),
            "client_email": EMAIL,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
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
        fn rows(&self) -> Vec<(Level, String)> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter_map(|e| match e {
                    RunEvent::Log(r) => Some((r.level, r.message.clone())),
                    _ => None,
                })
                .collect()
        }
        fn last_polls(&self) -> Option<u64> {
            self.0.lock().unwrap().iter().rev().find_map(|e| match e {
                RunEvent::Progress { counters, .. } => {
                    counters.iter().find(|(k, _)| k == "polls").map(|(_, v)| *v)
                }
                _ => None,
            })
        }
    }

    struct Env {
        url: String,
        fake: Arc<Fake>,
        dir: tempfile::TempDir,
    }

    async fn env() -> Env {
        let (url, fake) = start_fake().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("key.json"),
            key_json(&format!("{url}/token")).to_string(),
        )
        .unwrap();
        Env { url, fake, dir }
    }

    impl Env {
        /// A context with a key-file connection (relative to the pipeline folder) and the
        /// templates a run gives a step (`steps.login.finished_at`).
        fn ctx(&self, obs: &Arc<Collect>) -> StepContext {
            let mut ctx = StepContext::new(
                "otp",
                1,
                obs.clone(),
                Redactor::new(),
                self.dir.path().into(),
                self.dir.path().into(),
            );
            ctx.connection = Some(json!({
                "type": "google_service_account",
                "key_file": "key.json",
                "sheets_base_url": self.url,
                "sandbox": "google",
            }));
            let templates = engine::template::Templates::new(engine::template::Runtime {
                redactor: ctx.redactor.clone(),
                tz: chrono_tz::UTC,
                logical_date: chrono::Utc::now(),
                dry_run: false,
                overrides: Default::default(),
            });
            let j = engine::template::json_to_value;
            let scope = engine::template::Scope::new(
                j(&json!({})),
                j(&json!({"login": {"finished_at": "2025-06-01T11:59:00Z"}})),
                j(&json!({"id": 1})),
            );
            ctx.set_evaluator(Arc::new(templates), scope);
            ctx
        }
    }

    fn cfg(spreadsheet: &str, range: &str) -> SheetsRead {
        SheetsRead {
            spreadsheet: spreadsheet.into(),
            range: range.into(),
            read_as: ReadAs::Values,
            major_dimension: MajorDimension::Rows,
            render: Render::Formatted,
            wait: None,
        }
    }

    fn wait(until: &str, every: &str, timeout: &str) -> Option<Wait> {
        Some(Wait {
            until: until.into(),
            every: Some(DurationSpec::Text(every.into())),
            timeout: Some(DurationSpec::Text(timeout.into())),
        })
    }

    /// No row, output or error ever shows the private key (or a line of it).
    fn assert_no_key(obs: &Collect, extra: &str) {
        let pem_lines: Vec<&str> = private_key()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let mut texts: Vec<String> = obs.rows().into_iter().map(|(_, m)| m).collect();
        texts.push(extra.to_string());
        for t in &texts {
            for l in &pem_lines {
                assert!(!t.contains(l), "the private key leaked into `{t}`");
            }
        }
    }

    #[tokio::test]
    async fn reads_values_and_publishes_them() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let ctx = env.ctx(&obs);
        let redactor = ctx.redactor.clone();
        let step = cfg("book", "OTP!A2:B2");
        let info = step.static_info();
        assert!(!info.produces_table);
        assert_eq!(info.locals, ["values"]);
        assert_eq!(info.deferred, ["wait.until"]);
        assert_eq!(info.outputs.unwrap(), ["values", "rows", "range"]);
        let out = step.run(ctx).await.unwrap();
        let expected = json!([["482913", "2025-06-01T12:00:00Z"]]);
        assert_eq!(out.outputs["values"], expected);
        assert_eq!(out.outputs["rows"], json!(1));
        assert_eq!(out.outputs["range"], json!("OTP!A2:B2"));
        assert_eq!(out.result["values"], expected);
        assert_eq!(out.result["values"][0][0], json!("482913"));
        assert_eq!(out.result["major_dimension"], json!("ROWS"));
        assert_eq!(out.result["rows"], json!(1));
        assert!(out.table.is_none());
        let q = env.fake.queries.lock().unwrap()[0].clone();
        assert_eq!(q["majorDimension"], "ROWS");
        assert_eq!(q["valueRenderOption"], "FORMATTED_VALUE");
        assert_eq!(q["alt"], "json");
        assert_eq!(env.fake.tokens.load(Ordering::SeqCst), 1);
        // The key was learnt by the redactor, and never printed.
        assert!(redactor.redact(private_key()).contains("***"));
        assert!(!redactor
            .redact(private_key())
            .contains("PRIVATE KEY-----\nMII"));
        assert_no_key(&obs, "");
    }

    #[tokio::test]
    async fn inline_key_json_and_a_range_with_spaces() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let mut ctx = env.ctx(&obs);
        ctx.connection = Some(json!({
            "type": "google_service_account",
            "key_json": key_json(&format!("{}/token", env.url)).to_string(),
            "sheets_base_url": format!("{}/", env.url),
        }));
        let out = cfg("book", "'My tab'!A1:B2").run(ctx).await.unwrap();
        assert_eq!(out.outputs["values"], json!([["x"]]));
        assert_eq!(env.fake.ranges.lock().unwrap()[0], "'My tab'!A1:B2");
    }

    #[tokio::test]
    async fn empty_range_is_an_empty_list() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let out = cfg("book", "Empty!A1:B9").run(env.ctx(&obs)).await.unwrap();
        assert_eq!(out.outputs["values"], json!([]));
        assert_eq!(out.result["values"], json!([]));
        assert_eq!(out.outputs["rows"], json!(0));
    }

    #[tokio::test]
    async fn as_table_header_names_and_ragged_rows() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let mut step = cfg("book", "People!A1:D4");
        step.read_as = ReadAs::Table;
        assert!(step.static_info().produces_table);
        let out = step.run(env.ctx(&obs)).await.unwrap();
        let df = crate::table::frame(out.table.as_ref().unwrap())
            .unwrap()
            .clone();
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(names, ["name", "age", "column_3", "name_2", "column_5"]);
        assert_eq!(df.height(), 2);
        let col = |n: &str| -> Vec<Option<String>> {
            df.column(n)
                .unwrap()
                .str()
                .unwrap()
                .into_iter()
                .map(|v| v.map(str::to_string))
                .collect()
        };
        assert_eq!(col("name"), [Some("Ana".into()), Some("Bia".into())]);
        assert_eq!(col("age"), [Some("31".into()), Some("28".into())]);
        assert_eq!(col("column_3"), [None, Some("z".into())]);
        assert_eq!(col("name_2"), [None, Some("w".into())]);
        assert_eq!(col("column_5"), [None, Some("extra".into())]);
        assert_eq!(out.outputs["rows"], json!(2));
        // `values` is still there, as returned.
        assert_eq!(out.outputs["values"][1][1], json!(31));
    }

    #[tokio::test]
    async fn as_table_by_columns() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let mut step = cfg("book", "People!A1:D4");
        step.read_as = ReadAs::Table;
        step.major_dimension = MajorDimension::Columns;
        step.render = Render::Unformatted;
        let out = step.run(env.ctx(&obs)).await.unwrap();
        let q = env.fake.queries.lock().unwrap()[0].clone();
        assert_eq!(q["majorDimension"], "COLUMNS");
        assert_eq!(q["valueRenderOption"], "UNFORMATTED_VALUE");
        assert_eq!(out.result["major_dimension"], json!("COLUMNS"));
        let df = crate::table::frame(out.table.as_ref().unwrap()).unwrap();
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(names, ["name", "column_2", "name_2"]);
        assert_eq!(df.height(), 2);
        assert_eq!(df.column("column_2").unwrap().str().unwrap().get(1), None);
    }

    #[tokio::test]
    async fn waits_until_the_value_appears() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let mut step = cfg("otp-later", "OTP!A2:B2");
        step.wait = wait(
            "{{ values and values[0][1] >= steps.login.finished_at }}",
            "50ms",
            "5s",
        );
        let out = step.run(env.ctx(&obs)).await.unwrap();
        assert_eq!(out.result["values"][0][0], json!("482913"));
        assert_eq!(env.fake.reads.lock().unwrap()["otp-later"], 4);
        assert_eq!(obs.last_polls(), Some(4));
        // One token for all the polls.
        assert_eq!(env.fake.tokens.load(Ordering::SeqCst), 1);
        let rows = obs.rows();
        assert!(rows
            .iter()
            .any(|(l, m)| *l == Level::Warning && m.contains("poll 2 failed")));
        assert!(rows
            .iter()
            .any(|(_, m)| m.contains("the condition held after 4 polls")));
        assert_no_key(&obs, "");
    }

    #[tokio::test]
    async fn wait_times_out_with_a_clear_message_and_few_rows() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let mut step = cfg("book", "Empty!A1:B9");
        step.wait = wait("{{ values | length > 0 }}", "10ms", "400ms");
        let err = step.run(env.ctx(&obs)).await.unwrap_err();
        assert!(!err.retryable);
        assert!(
            err.message.starts_with(
                "the condition `{{ values | length > 0 }}` did not hold within 400ms (last values: 0 rows)"
            ),
            "{}",
            err.message
        );
        assert!(err.message.contains("`Empty!A1:B9`"), "{}", err.message);
        let polls = obs.last_polls().unwrap();
        assert!(polls >= 5, "only {polls} polls");
        // Not one row per poll: the start, the first poll (logging is every 30s of polls).
        assert!(obs.rows().len() <= 3, "{:?}", obs.rows());
        assert_no_key(&obs, &err.message);
    }

    #[tokio::test]
    async fn wait_condition_errors_are_reported() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let mut step = cfg("book", "OTP!A2:B2");
        step.wait = wait("{{ values[0][0] | no_such_filter }}", "10ms", "1s");
        let err = step.run(env.ctx(&obs)).await.unwrap_err();
        assert!(
            err.message.starts_with("the wait condition `"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn cancel_stops_the_wait() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let ctx = env.ctx(&obs);
        let cancel = ctx.cancel.clone();
        let mut step = cfg("book", "Empty!A1:B9");
        step.wait = wait("{{ values | length > 0 }}", "50ms", "1m");
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let err = step.run(ctx).await.unwrap_err();
        assert_eq!(err.message, "cancelled");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    async fn fails(spreadsheet: &str, range: &str) -> StepError {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let err = cfg(spreadsheet, range)
            .run(env.ctx(&obs))
            .await
            .unwrap_err();
        assert_no_key(&obs, &err.message);
        err
    }

    #[tokio::test]
    async fn permission_denied_names_the_service_account() {
        let err = fails("forbidden", "OTP!A2:B2").await;
        assert!(!err.retryable);
        assert!(
            err.message.starts_with(&format!(
                "permission denied: share the spreadsheet with {EMAIL}"
            )),
            "{}",
            err.message
        );
        assert!(err.message.contains("`forbidden`") && err.message.contains("`OTP!A2:B2`"));
    }

    #[tokio::test]
    async fn missing_spreadsheet() {
        let err = fails("missing", "OTP!A2:B2").await;
        assert!(!err.retryable);
        assert!(
            err.message.starts_with("spreadsheet `missing` not found"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn bad_range_quotes_google() {
        let err = fails("book", "Nope!A1").await;
        assert!(!err.retryable);
        assert_eq!(
            err.message,
            "bad range `Nope!A1`: Unable to parse range: Nope!A1 (spreadsheet `book`)"
        );
    }

    #[tokio::test]
    async fn server_errors_are_retryable() {
        let err = fails("busy", "OTP!A2:B2").await;
        assert!(err.retryable, "{}", err.message);
        assert!(err.message.contains("503"), "{}", err.message);
    }

    #[tokio::test]
    async fn refused_sign_in_quotes_the_token_endpoint() {
        let env = env().await;
        std::fs::write(
            env.dir.path().join("key.json"),
            key_json(&format!("{}/token-refused", env.url)).to_string(),
        )
        .unwrap();
        let obs = Arc::new(Collect::default());
        let err = cfg("book", "OTP!A2:B2")
            .run(env.ctx(&obs))
            .await
            .unwrap_err();
        assert!(!err.retryable);
        assert!(
            err.message
                .starts_with("Google sign-in failed: Invalid JWT Signature."),
            "{}",
            err.message
        );
        assert_no_key(&obs, &err.message);
    }

    #[tokio::test]
    async fn unreachable_service_is_retryable() {
        let env = env().await;
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let obs = Arc::new(Collect::default());
        let mut ctx = env.ctx(&obs);
        ctx.connection.as_mut().unwrap()["sheets_base_url"] = json!(format!("http://{closed}/"));
        let err = cfg("book", "OTP!A2:B2").run(ctx).await.unwrap_err();
        assert!(err.retryable, "{}", err.message);
        assert!(
            err.message.starts_with("network error reading `OTP!A2:B2`"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn connection_mistakes_are_explained() {
        let env = env().await;
        let obs = Arc::new(Collect::default());
        let run = |conn: Option<Value>| {
            let mut ctx = env.ctx(&obs);
            ctx.connection = conn;
            cfg("book", "OTP!A2:B2").run(ctx)
        };
        let err = run(None).await.unwrap_err();
        assert!(
            err.message.contains("needs a connection"),
            "{}",
            err.message
        );
        let err = run(Some(json!({"type": "http", "base_url": "x"})))
            .await
            .unwrap_err();
        assert!(err.message.contains("not `http`"), "{}", err.message);
        let err = run(Some(json!({"type": "google_service_account"})))
            .await
            .unwrap_err();
        assert!(err.message.contains("needs `key_file`"), "{}", err.message);
        let both =
            json!({"type": "google_service_account", "key_file": "key.json", "key_json": "{}"});
        let err = run(Some(both)).await.unwrap_err();
        assert!(err.message.contains("exactly one"), "{}", err.message);
        let missing = json!({"type": "google_service_account", "key_file": "nope.json"});
        let err = run(Some(missing)).await.unwrap_err();
        assert!(
            err.message
                .contains("cannot read the service-account key file"),
            "{}",
            err.message
        );
        assert!(!err.retryable);
    }

    #[test]
    fn ranges_are_encoded_for_the_path() {
        assert_eq!(encode_path_segment("OTP!A2:B2"), "OTP!A2:B2");
        assert_eq!(encode_path_segment("'My tab'!A1"), "'My%20tab'!A1");
        assert_eq!(encode_path_segment("a/b?c#d%"), "a%2Fb%3Fc%23d%25");
        assert_eq!(encode_path_segment("Relatório"), "Relat%C3%B3rio");
    }

    #[test]
    fn the_schema_describes_every_field() {
        let mut g = schemars::SchemaGenerator::default();
        g.subschema_for::<SheetsRead>();
        let defs = serde_json::to_value(g.definitions()).unwrap();
        for def in ["SheetsRead", "Wait"] {
            assert_eq!(defs[def]["additionalProperties"], false);
            for (name, prop) in defs[def]["properties"].as_object().unwrap() {
                assert!(
                    prop["description"].is_string(),
                    "{def}.{name} has no description"
                );
            }
        }
        assert!(defs["SheetsRead"]["properties"]["as"].is_object());
    }
}
