//! `type: http.send` — the input table's rows to an API as JSON, in batches.
//!
//! The scripts `pipe` replaces end with "send the result to the platform" (QOCKPIT's KPI
//! rows, staging records): a loop that builds a list of dicts, posts it, and hopes it was
//! not too big, not sent twice after a timeout, and not printed with the token in a
//! traceback. This step does that once:
//!
//! * rows become JSON objects with typed values (integers, floats, booleans, strings, null,
//!   dates as `YYYY-MM-DD`, datetimes as RFC 3339, decimals as exact numbers), each
//!   serialized once into one buffer;
//! * batches are bounded by a row count and by body size (`batch: {rows, bytes}`), measured
//!   on the JSON before compression, envelope included, so no request exceeds either;
//! * `body:` is an optional envelope around the batch: the string `"$rows"` marks where the
//!   rows array goes (`{period: "2019-01", rows: "$rows"}`), `"$row"` one row per request;
//!   without `body:` the request body is the array itself;
//! * requests reuse [`super::client`]: the `http` connection, auth, and retries of one
//!   request on connection errors, 5xx and 429 — a batch is retried alone, never re-sent
//!   after it succeeded, and batches go one after another in table order;
//! * every batch gets a log row (n/N, rows, bytes, status, time); a batch that still fails
//!   fails the step naming it, with the server's answer (redacted).

use super::auth::Auth;
use super::client::{Body, Limiter, Reply, Sender, Target};
use super::request::auth_secret_fields;
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{Problem, StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use polars::prelude::*;
use reqwest::header::{HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The marker of the batch's rows array inside `body:`.
pub const ROWS_MARKER: &str = "$rows";
/// The marker of one row inside `body:` (one request per row).
pub const ROW_MARKER: &str = "$row";
/// Default rows per request.
const DEFAULT_ROWS: u64 = 500;
/// Default largest JSON body (5 MB).
const DEFAULT_BYTES: u64 = 5_000_000;
/// How many responses the `responses` output keeps.
const RESPONSES_CAP: usize = 100;
/// How much of a non-JSON response body `responses` keeps.
const TEXT_CAP: usize = 4096;
/// Stands for the marker while the envelope is serialized.
const SENTINEL: &str = "\u{1}pipe-rows\u{1}";

const OUTPUTS: [&str; 8] = [
    "rows",
    "batches",
    "requests",
    "retries",
    "bytes",
    "failed_batches",
    "statuses",
    "responses",
];

fn default_method() -> String {
    "POST".into()
}

/// How the rows are cut into requests.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// Most rows in one request (default 500; `1` sends one request per row).
    #[serde(default)]
    pub rows: Option<u64>,
    /// Largest request body, measured on the JSON before gzip, envelope included: a number
    /// of bytes or a size such as `5MB`, `512KB`, `1MiB` (default `5MB`). A single row
    /// larger than this fails the step.
    #[serde(default)]
    #[schemars(schema_with = "size_schema")]
    pub bytes: Option<String>,
}

pub(crate) fn size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": ["string", "integer"]})
}

/// What to do when a batch still fails after its retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnBatchFailure {
    /// Stop at the failed batch and fail the step (later batches are not sent).
    #[default]
    Fail,
    /// Send the remaining batches, count the failures in `failed_batches` and end with a
    /// warning.
    Warn,
}

/// Send the input table's rows to an API as JSON, in batches.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSend {
    /// The HTTP method (default `POST`).
    #[serde(default = "default_method")]
    pub method: String,
    /// The full URL. Use either `url` or `path`.
    #[serde(default)]
    pub url: Option<String>,
    /// A path joined to the connection's `base_url` (`/integrations/1/results`).
    #[serde(default)]
    pub path: Option<String>,
    /// Query parameters (strings, numbers, booleans; a list repeats the parameter; null
    /// leaves it out).
    #[serde(default)]
    pub query: IndexMap<String, Value>,
    /// Request headers (they override the connection's by name). `Content-Type` defaults
    /// to `application/json`.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// An envelope around each batch: any JSON value in which the string `"$rows"` stands
    /// for the batch's array of rows (`{period: "{{ params.period }}", rows: "$rows"}`),
    /// or `"$row"` for a single row (one request per row). Exactly one marker. Default:
    /// the body is the array of rows.
    #[serde(default)]
    pub body: Option<Value>,
    /// How rows are cut into requests: `{rows: 500, bytes: 5MB}` (both bounds hold).
    #[serde(default)]
    pub batch: Batch,
    /// Compress each body with gzip (`Content-Encoding: gzip`).
    #[serde(default)]
    pub gzip: bool,
    /// The statuses that count as success (default: any 2xx).
    #[serde(default)]
    pub expect: Vec<u16>,
    /// With an empty input table, send one batch with an empty rows array (default false:
    /// send nothing and say so in the log).
    #[serde(default)]
    pub send_empty: bool,
    /// `fail` (default): a batch that still fails after its retries fails the step; `warn`:
    /// send the rest and end with a warning.
    #[serde(default)]
    pub on_batch_failure: OnBatchFailure,
    /// Authentication, overriding the connection's.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// Timeout of one try (`30s`; default the connection's `timeout`, else 30s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// How often one batch is retried on a connection error, 5xx or 429 (default 3). A
    /// step-level `retry:` would send every batch again: use it only with idempotent APIs.
    #[serde(default)]
    pub retries: Option<u32>,
    /// The longest wait before a retry (default `1m`); a longer `Retry-After` fails the
    /// batch.
    #[serde(default)]
    pub max_wait: Option<String>,
    /// The largest response body read: a number of bytes or a size such as `50MB`, `1GiB`
    /// (default `512MiB`). A larger (or endless) body fails the step.
    #[serde(default)]
    #[schemars(schema_with = "size_schema")]
    pub max_body: Option<String>,
}

/// `5MB`, `512KB`, `1MiB`, `1000000` → bytes (decimal units are powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 5MB, 512KB, 1000000)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = (n * mult as f64).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// A column, cast to what its JSON values are written from.
enum Col {
    Int(Int64Chunked),
    UInt(UInt64Chunked),
    Float(Float64Chunked),
    Bool(BooleanChunked),
    /// Text; `true` when it is a number's exact digits (decimals), written unquoted.
    Str(StringChunked, bool),
    Null,
}

impl Col {
    fn of(c: &Column) -> PolarsResult<Col> {
        let dt = c.dtype();
        Ok(match dt {
            DataType::Null => Col::Null,
            DataType::Boolean => Col::Bool(c.bool()?.rechunk().into_owned()),
            DataType::String => Col::Str(c.str()?.rechunk().into_owned(), false),
            DataType::Float32 | DataType::Float64 => {
                Col::Float(c.cast(&DataType::Float64)?.f64()?.rechunk().into_owned())
            }
            d if d.is_unsigned_integer() => {
                Col::UInt(c.cast(&DataType::UInt64)?.u64()?.rechunk().into_owned())
            }
            d if d.is_signed_integer() => {
                Col::Int(c.cast(&DataType::Int64)?.i64()?.rechunk().into_owned())
            }
            DataType::Datetime(_, tz) => {
                let format = if tz.is_some() {
                    "%Y-%m-%dT%H:%M:%S%.f%:z"
                } else {
                    "%Y-%m-%dT%H:%M:%S%.f"
                };
                let s = c.datetime()?.to_string(format)?;
                Col::Str(s.rechunk().into_owned(), false)
            }
            // Decimals: their exact digits, as a JSON number.
            d if d.is_numeric() => Col::Str(
                c.cast(&DataType::String)?.str()?.rechunk().into_owned(),
                true,
            ),
            // Dates (`YYYY-MM-DD`), times and anything else: as text.
            _ => Col::Str(
                c.cast(&DataType::String)?.str()?.rechunk().into_owned(),
                false,
            ),
        })
    }

    fn write(&self, i: usize, out: &mut Vec<u8>) {
        let null = |out: &mut Vec<u8>| out.extend_from_slice(b"null");
        match self {
            Col::Null => null(out),
            Col::Int(a) => match a.get(i) {
                Some(v) => out.extend_from_slice(v.to_string().as_bytes()),
                None => null(out),
            },
            Col::UInt(a) => match a.get(i) {
                Some(v) => out.extend_from_slice(v.to_string().as_bytes()),
                None => null(out),
            },
            // serde_json writes NaN and infinities as null.
            Col::Float(a) => match a.get(i) {
                Some(v) => serde_json::to_writer(&mut *out, &v).expect("writing to a Vec"),
                None => null(out),
            },
            Col::Bool(a) => match a.get(i) {
                Some(true) => out.extend_from_slice(b"true"),
                Some(false) => out.extend_from_slice(b"false"),
                None => null(out),
            },
            Col::Str(a, number) => match a.get(i) {
                Some(s) if *number => out.extend_from_slice(s.as_bytes()),
                Some(s) => serde_json::to_writer(&mut *out, s).expect("writing to a Vec"),
                None => null(out),
            },
        }
    }
}

/// Every row as a JSON object, back to back in one buffer; `ends[i]` is where row `i` ends.
pub(crate) struct Rows {
    pub buf: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Rows {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }
    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }
    fn row(&self, i: usize) -> &[u8] {
        &self.buf[self.start(i)..self.ends[i]]
    }
}

/// Serialize the table's rows.
pub(crate) fn encode_rows(df: &DataFrame) -> Result<Rows, String> {
    let mut cols = Vec::with_capacity(df.width());
    let mut keys = Vec::with_capacity(df.width());
    for c in df.get_columns() {
        cols.push(Col::of(c).map_err(|e| {
            format!(
                "column `{}` ({}) cannot be sent as JSON: {e}",
                c.name(),
                c.dtype()
            )
        })?);
        let mut k = serde_json::to_vec(c.name().as_str()).expect("a string");
        k.push(b':');
        keys.push(k);
    }
    let mut buf = Vec::with_capacity(df.height() * (16 + 24 * df.width()));
    let mut ends = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        buf.push(b'{');
        for (j, (col, key)) in cols.iter().zip(&keys).enumerate() {
            if j > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(key);
            col.write(i, &mut buf);
        }
        buf.push(b'}');
        ends.push(buf.len());
    }
    Ok(Rows { buf, ends })
}

/// Where the rows go in each body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Envelope {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    /// `"$row"`: one row per request, not an array.
    single: bool,
}

impl Envelope {
    pub(crate) fn new(body: Option<&Value>) -> Result<Envelope, String> {
        let Some(body) = body else {
            return Ok(Envelope {
                prefix: b"[".to_vec(),
                suffix: b"]".to_vec(),
                single: false,
            });
        };
        let mut found = Vec::new();
        let replaced = mark(body, &mut found);
        let single = match found.as_slice() {
            [m] => *m == ROW_MARKER,
            [] => {
                return Err(format!(
                    "`body` must contain the string \"{ROWS_MARKER}\" (the batch's rows) or \"{ROW_MARKER}\" (one row) where the data goes"
                ))
            }
            _ => {
                return Err(format!(
                    "`body` may contain only one \"{ROWS_MARKER}\" or \"{ROW_MARKER}\" marker, found {}",
                    found.len()
                ))
            }
        };
        let text = serde_json::to_string(&replaced).expect("JSON");
        let quoted = serde_json::to_string(SENTINEL).expect("JSON");
        let at = text.find(&quoted).expect("the sentinel is in the text");
        let (mut prefix, mut suffix) = (
            text.as_bytes()[..at].to_vec(),
            text.as_bytes()[at + quoted.len()..].to_vec(),
        );
        if !single {
            prefix.push(b'[');
            suffix.insert(0, b']');
        }
        Ok(Envelope {
            prefix,
            suffix,
            single,
        })
    }

    /// Bytes a body takes besides its rows and the commas between them.
    fn overhead(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }

    /// The body of the rows in `range` (an empty range: the empty batch).
    fn body(&self, rows: &Rows, range: std::ops::Range<usize>) -> Vec<u8> {
        if range.is_empty() {
            return [self.prefix.as_slice(), self.suffix.as_slice()].concat();
        }
        let inner = rows.ends[range.end - 1] - rows.start(range.start) + range.len();
        let mut out = Vec::with_capacity(self.overhead() + inner);
        out.extend_from_slice(&self.prefix);
        for (n, i) in range.enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(rows.row(i));
        }
        out.extend_from_slice(&self.suffix);
        out
    }
}

/// Replace the marker strings by the sentinel, noting which were found.
fn mark(v: &Value, found: &mut Vec<&'static str>) -> Value {
    match v {
        Value::String(s) if s == ROWS_MARKER || s == ROW_MARKER => {
            found.push(if s == ROWS_MARKER {
                ROWS_MARKER
            } else {
                ROW_MARKER
            });
            Value::String(SENTINEL.into())
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| mark(i, found)).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), mark(v, found))).collect())
        }
        other => other.clone(),
    }
}

/// Cut rows `0..n` into batches of at most `max_rows` rows and `max_bytes` body bytes.
pub(crate) fn plan_batches(
    rows: &Rows,
    env: &Envelope,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<std::ops::Range<usize>>, String> {
    let mut batches = Vec::new();
    let (mut start, mut size) = (0usize, env.overhead());
    for i in 0..rows.len() {
        let len = rows.row(i).len();
        if env.overhead() + len > max_bytes {
            return Err(format!(
                "row {} is {len} bytes as JSON ({} with the envelope), more than batch.bytes ({max_bytes})",
                i + 1,
                env.overhead() + len
            ));
        }
        let n = i - start;
        let comma = usize::from(n > 0);
        if n > 0 && (n >= max_rows || size + comma + len > max_bytes) {
            batches.push(start..i);
            start = i;
            size = env.overhead() + len;
        } else {
            size += comma + len;
        }
    }
    if start < rows.len() {
        batches.push(start..rows.len());
    }
    Ok(batches)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4 + 64),
        flate2::Compression::default(),
    );
    enc.write_all(bytes).expect("writing to a Vec");
    enc.finish().expect("writing to a Vec")
}

/// A response body for the `responses` output: its JSON, else its (capped) text.
fn response_value(reply: &Reply) -> Value {
    serde_json::from_slice::<Value>(&reply.body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(&reply.body);
        Value::String(text.chars().take(TEXT_CAP).collect())
    })
}

/// `rows 1–500` / `row 7` / `no rows` for messages.
fn rows_label(r: &std::ops::Range<usize>) -> String {
    if r.is_empty() {
        "no rows".into()
    } else if r.len() == 1 {
        format!("row {}", r.start + 1)
    } else {
        format!("rows {}–{}", r.start + 1, r.end)
    }
}

impl HttpSend {
    /// The target fields, for [`Target::prepare`] and [`Target::problems`].
    fn target(&self) -> Target<'_> {
        super::client::target_of!(self)
    }
}

#[async_trait]
impl StepConfig for HttpSend {
    const TYPE: &'static str = "http.send";
    const SUMMARY: &'static str =
        "Send the input table's rows to an API as JSON, in batches bounded by rows and bytes (envelope, gzip, retries per batch)";

    fn problems(&self) -> Vec<Problem> {
        let mut out = self.target().problems();
        match Envelope::new(self.body.as_ref()) {
            Err(e) => out.push(Problem::at("body", e)),
            Ok(env) => match self.batch.rows {
                Some(0) => out.push(Problem::at("batch.rows", "`batch.rows` must be at least 1")),
                Some(n) if env.single && n > 1 => out.push(
                    Problem::at(
                        "batch.rows",
                        format!(
                            "`body` uses \"{ROW_MARKER}\" (one row per request): `batch.rows` must be 1 or unset"
                        ),
                    )
                    .given(&["body"]),
                ),
                _ => {}
            },
        }
        if let Some(Err(e)) = self.batch.bytes.as_deref().map(parse_size) {
            out.push(Problem::at("batch.bytes", format!("`batch.bytes`: {e}")));
        }
        out
    }

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: false,
            outputs: Some(OUTPUTS.iter().map(|s| s.to_string()).collect()),
            secret_fields: auth_secret_fields(self.auth.as_ref()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let df = match ctx.inputs.first() {
            Some((id, t)) => crate::table::frame(t)
                .ok_or_else(|| StepError::fatal(format!("input `{id}` is not a table")))?
                .clone(),
            None => {
                return Err(StepError::fatal(
                    "http.send needs a table: name the step that produces it as `input:`",
                ))
            }
        };
        let env = Envelope::new(self.body.as_ref()).map_err(StepError::fatal)?;
        let max_rows = match (self.batch.rows, env.single) {
            (Some(0), _) => return Err(StepError::fatal("`batch.rows` must be at least 1")),
            (Some(n), true) if n > 1 => {
                return Err(StepError::fatal(format!(
                    "`body` uses \"{ROW_MARKER}\" (one row per request): `batch.rows` must be 1 or unset"
                )))
            }
            (_, true) => 1,
            (Some(n), false) => n,
            (None, false) => DEFAULT_ROWS,
        };
        let max_bytes = match &self.batch.bytes {
            Some(t) => {
                parse_size(t).map_err(|e| StepError::fatal(format!("`batch.bytes`: {e}")))?
            }
            None => DEFAULT_BYTES,
        };
        let mut prep = self.target().prepare(&ctx)?;
        if !prep.headers.contains_key(CONTENT_TYPE) {
            prep.headers
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if self.gzip {
            prep.headers
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }

        let (rows, mut batches, env) = tokio::task::spawn_blocking(move || {
            let rows = encode_rows(&df)?;
            let batches = plan_batches(&rows, &env, max_rows as usize, max_bytes as usize)?;
            Ok::<_, String>((rows, batches, env))
        })
        .await
        .map_err(|e| StepError::fatal(format!("http.send panicked: {e}")))?
        .map_err(|e| StepError::fatal(ctx.redactor.redact(&e)))?;

        let shown = format!(
            "{} {}",
            prep.method,
            super::client::without_query(&prep.url)
        );
        if rows.len() == 0 {
            if !self.send_empty {
                ctx.log(
                    Level::Info,
                    &format!("the input table has no rows: nothing sent to {shown} (set send_empty: true to send an empty batch)"),
                );
            } else if env.single {
                return Err(StepError::fatal(format!(
                    "send_empty needs \"{ROWS_MARKER}\" in `body`: with \"{ROW_MARKER}\" there is no row to send"
                )));
            } else {
                batches.push(0..0);
            }
        }
        let total = batches.len();

        let sender = Sender::new(&ctx, &prep, Limiter::new(None));
        let mut sent_rows = 0u64;
        let mut sent_bytes = 0u64;
        let mut failed = 0u64;
        let mut attempted = 0u64;
        let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
        let mut responses = Vec::new();
        let mut warnings = Vec::new();
        for (n, range) in batches.into_iter().enumerate() {
            let n = n + 1;
            let (label, count) = (rows_label(&range), range.len());
            // Bodies are built one at a time: only one batch is in memory besides the rows.
            let json_body = env.body(&rows, range);
            let raw_len = json_body.len();
            let wire = if self.gzip {
                gzip(&json_body)
            } else {
                json_body
            };
            let wire_len = wire.len();
            let size = if self.gzip {
                format!("{raw_len} bytes, {wire_len} gzipped")
            } else {
                format!("{raw_len} bytes")
            };
            let started = Instant::now();
            attempted += 1;
            sent_bytes += wire_len as u64;
            let outcome = sender
                .send(&prep.url, true, &[], &Body::Bytes(wire))
                .await
                .and_then(|reply| {
                    *statuses.entry(reply.status.as_u16()).or_default() += 1;
                    reply.check(&ctx, &prep.method, &self.expect).map(|_| reply)
                });
            let elapsed = started.elapsed().as_millis();
            let reply = match outcome {
                Ok(reply) => reply,
                Err(e) if e.message == "cancelled" => return Err(e),
                Err(e) => {
                    let message =
                        format!("batch {n}/{total} ({label}, {size}) failed: {}", e.message);
                    match self.on_batch_failure {
                        OnBatchFailure::Fail => {
                            return Err(StepError {
                                message,
                                retryable: e.retryable,
                            })
                        }
                        OnBatchFailure::Warn => {
                            failed += 1;
                            ctx.log(Level::Warning, &message);
                            warnings.push(ctx.redactor.redact(&message));
                            continue;
                        }
                    }
                }
            };
            sent_rows += count as u64;
            ctx.log(
                Level::Info,
                &format!(
                    "batch {n}/{total}: {count} rows ({label}), {size}, HTTP {} in {elapsed} ms",
                    reply.status.as_u16()
                ),
            );
            ctx.progress(&[("rows", sent_rows), ("batches", n as u64)]);
            if responses.len() < RESPONSES_CAP {
                responses.push(response_value(&reply));
            }
        }
        let retries = sender.retries.load(Ordering::Relaxed);
        let requests = attempted + retries;
        ctx.log(
            Level::Info,
            &format!(
                "sent {sent_rows} of {} rows to {shown} in {total} batch{} ({requests} requests, {sent_bytes} bytes{})",
                rows.len(),
                if total == 1 { "" } else { "es" },
                if failed > 0 {
                    format!(", {failed} failed")
                } else {
                    String::new()
                }
            ),
        );
        let result = json!({
            "rows": sent_rows,
            "batches": total,
            "requests": requests,
            "retries": retries,
            "bytes": sent_bytes,
            "failed_batches": failed,
            "statuses": statuses
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<Map<String, Value>>(),
            "responses": responses,
        });
        Ok(StepOutput {
            outputs: result.as_object().cloned().unwrap_or_default(),
            result,
            table: None,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testutil::{ctx, serve, Collect};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::Router;
    use std::collections::VecDeque;
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    /// What the test API received, and the statuses it answers with next (then 201).
    #[derive(Default)]
    struct Api {
        bodies: Mutex<Vec<Value>>,
        encodings: Mutex<Vec<Option<String>>>,
        wire_sizes: Mutex<Vec<usize>>,
        answers: Mutex<VecDeque<(u16, String)>>,
    }

    async fn api(state: Arc<Api>) -> String {
        let app = Router::new().route(
            "/in",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let encoding = headers
                        .get("content-encoding")
                        .map(|v| v.to_str().unwrap().to_string());
                    let json = if encoding.as_deref() == Some("gzip") {
                        let mut out = Vec::new();
                        flate2::read::GzDecoder::new(&body[..])
                            .read_to_end(&mut out)
                            .unwrap();
                        out
                    } else {
                        body.to_vec()
                    };
                    assert_eq!(headers["content-type"], "application/json");
                    if let Some((code, text)) = state.answers.lock().unwrap().pop_front() {
                        return (StatusCode::from_u16(code).unwrap(), text).into_response();
                    }
                    let v: Value = serde_json::from_slice(&json).unwrap();
                    let n = state.bodies.lock().unwrap().len() + 1;
                    state.bodies.lock().unwrap().push(v);
                    state.encodings.lock().unwrap().push(encoding);
                    state.wire_sizes.lock().unwrap().push(body.len());
                    (StatusCode::CREATED, axum::Json(json!({"batch": n}))).into_response()
                }
            }),
        );
        serve(app).await
    }

    fn conn(base: &str) -> Option<Value> {
        Some(json!({"type": "http", "base_url": base}))
    }

    fn numbers(n: usize) -> DataFrame {
        df!(
            "id" => (1..=n as i64).collect::<Vec<_>>(),
            "nome" => (1..=n).map(|i| format!("cliente {i}")).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn with_input(c: &mut StepContext, df: DataFrame) {
        c.inputs.insert("src".into(), crate::table::table(df));
    }

    fn step(v: Value) -> HttpSend {
        serde_json::from_value(v).unwrap()
    }

    async fn run(
        cfg: Value,
        df: DataFrame,
        base: &str,
    ) -> (Result<StepOutput, StepError>, Arc<Collect>) {
        let obs = Arc::new(Collect::default());
        let mut c = ctx(&obs, conn(base));
        with_input(&mut c, df);
        (step(cfg).run(c).await, obs)
    }

    #[test]
    fn rows_become_typed_json() {
        let dates = Series::new("d".into(), [Some(17897i32), None])
            .cast(&DataType::Date)
            .unwrap();
        let utc = Series::new(
            "t".into(),
            [1_546_300_800_000_000i64, 1_546_300_800_500_000],
        )
        .cast(&DataType::Datetime(
            TimeUnit::Microseconds,
            Some(polars::prelude::TimeZone::UTC),
        ))
        .unwrap();
        let naive = Series::new("n".into(), [0i64, 60_000])
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))
            .unwrap();
        let df = DataFrame::new(vec![
            Series::new("i".into(), [Some(-3i32), None]).into(),
            Series::new("u".into(), [u64::MAX, 0]).into(),
            Series::new("f".into(), [1.5f64, f64::NAN]).into(),
            Series::new("b".into(), [true, false]).into(),
            Series::new("s".into(), [Some("aspas \" e ção"), None]).into(),
            dates.into(),
            utc.into(),
            naive.into(),
        ])
        .unwrap();
        let rows = encode_rows(&df).unwrap();
        let parsed: Vec<Value> = (0..rows.len())
            .map(|i| serde_json::from_slice(rows.row(i)).unwrap())
            .collect();
        assert_eq!(
            parsed[0],
            json!({"i": -3, "u": u64::MAX, "f": 1.5, "b": true, "s": "aspas \" e ção",
                "d": "2019-01-01", "t": "2019-01-01T00:00:00+00:00", "n": "1970-01-01T00:00:00"})
        );
        assert_eq!(
            parsed[1],
            json!({"i": null, "u": 0, "f": null, "b": false, "s": null, "d": null,
                "t": "2019-01-01T00:00:00.500+00:00", "n": "1970-01-01T00:01:00"})
        );
    }

    #[test]
    fn envelopes_and_batch_plans() {
        let rows = encode_rows(&numbers(10)).unwrap();
        let plain = Envelope::new(None).unwrap();
        let by_rows = plan_batches(&rows, &plain, 4, 1 << 20).unwrap();
        assert_eq!(by_rows, vec![0..4, 4..8, 8..10]);
        // Each row is about 27 bytes: a 100-byte bound takes three.
        let by_bytes = plan_batches(&rows, &plain, 500, 100).unwrap();
        for b in &by_bytes {
            let body = plain.body(&rows, b.clone());
            assert!(body.len() <= 100, "{}", body.len());
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v.as_array().unwrap().len(), b.len());
        }
        assert_eq!(by_bytes.iter().map(|b| b.len()).sum::<usize>(), 10);
        assert!(by_bytes.len() >= 4);
        let err = plan_batches(&rows, &plain, 500, 10).unwrap_err();
        assert!(err.contains("row 1 is"), "{err}");

        let env =
            Envelope::new(Some(&json!({"period": "2019-01", "rows": "$rows", "n": 1}))).unwrap();
        let body = env.body(&rows, 0..2);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["period"], "2019-01");
        assert_eq!(v["rows"][1]["id"], 2);
        assert_eq!(
            serde_json::from_slice::<Value>(&env.body(&rows, 0..0)).unwrap()["rows"],
            json!([])
        );
        let one = Envelope::new(Some(&json!({"data": "$row"}))).unwrap();
        let v: Value = serde_json::from_slice(&one.body(&rows, 3..4)).unwrap();
        assert_eq!(v, json!({"data": {"id": 4, "nome": "cliente 4"}}));
        for bad in [json!({"rows": []}), json!(["$rows", "$rows"])] {
            assert!(Envelope::new(Some(&bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_size("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert!(parse_size("5 parsecs").is_err());
    }

    #[tokio::test]
    async fn sends_batches_by_rows_and_by_bytes() {
        let state = Arc::new(Api::default());
        let base = api(state.clone()).await;
        let (out, obs) = run(
            json!({"path": "/in", "batch": {"rows": 400}}),
            numbers(1000),
            &base,
        )
        .await;
        let out = out.unwrap();
        let sizes: Vec<usize> = state
            .bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b.as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [400, 400, 200]);
        assert_eq!(state.bodies.lock().unwrap()[2][199]["id"], 1000);
        assert_eq!(out.outputs["rows"], 1000);
        assert_eq!(out.outputs["batches"], 3);
        assert_eq!(out.outputs["requests"], 3);
        assert_eq!(out.outputs["failed_batches"], 0);
        assert_eq!(out.outputs["statuses"], json!({"201": 3}));
        assert_eq!(
            out.outputs["responses"],
            json!([{"batch": 1}, {"batch": 2}, {"batch": 3}])
        );
        let logs = obs.rows();
        assert!(
            logs.iter()
                .any(|(_, m)| m.starts_with("batch 2/3: 400 rows (rows 401–800)")
                    && m.contains("HTTP 201")),
            "{logs:?}"
        );

        let state = Arc::new(Api::default());
        let base = api(state.clone()).await;
        let (out, _) = run(
            json!({"path": "/in", "batch": {"bytes": "1KB"}}),
            numbers(1000),
            &base,
        )
        .await;
        let out = out.unwrap();
        let bodies = state.bodies.lock().unwrap();
        assert!(bodies.len() > 20);
        assert_eq!(out.outputs["batches"], bodies.len());
        assert!(state.wire_sizes.lock().unwrap().iter().all(|s| *s <= 1000));
        let ids: Vec<i64> = bodies
            .iter()
            .flat_map(|b| {
                b.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["id"].as_i64().unwrap())
            })
            .collect();
        assert_eq!(ids, (1..=1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn gzip_round_trip_with_an_envelope() {
        let state = Arc::new(Api::default());
        let base = api(state.clone()).await;
        let (out, _) = run(
            json!({"path": "/in", "gzip": true, "batch": {"rows": 300},
                "body": {"period": "2019-01", "rows": "$rows"}}),
            numbers(500),
            &base,
        )
        .await;
        let out = out.unwrap();
        assert_eq!(
            *state.encodings.lock().unwrap(),
            vec![Some("gzip".to_string()), Some("gzip".to_string())]
        );
        let bodies = state.bodies.lock().unwrap();
        assert_eq!(bodies[0]["period"], "2019-01");
        assert_eq!(bodies[0]["rows"].as_array().unwrap().len(), 300);
        assert_eq!(
            bodies[1]["rows"][199],
            json!({"id": 500, "nome": "cliente 500"})
        );
        // Repetitive JSON compresses well: the bytes sent are the gzipped ones.
        let wire: usize = state.wire_sizes.lock().unwrap().iter().sum();
        assert_eq!(out.outputs["bytes"], wire);
        assert!(wire < 500 * 30 / 3, "{wire}");
    }

    #[tokio::test]
    async fn one_request_per_row() {
        let state = Arc::new(Api::default());
        let base = api(state.clone()).await;
        let (out, _) = run(json!({"path": "/in", "body": "$row"}), numbers(3), &base).await;
        assert_eq!(out.unwrap().outputs["requests"], 3);
        assert_eq!(
            *state.bodies.lock().unwrap(),
            vec![
                json!({"id": 1, "nome": "cliente 1"}),
                json!({"id": 2, "nome": "cliente 2"}),
                json!({"id": 3, "nome": "cliente 3"})
            ]
        );
        let state = Arc::new(Api::default());
        let base = api(state.clone()).await;
        let (out, _) = run(
            json!({"path": "/in", "batch": {"rows": 1}}),
            numbers(2),
            &base,
        )
        .await;
        assert_eq!(out.unwrap().outputs["batches"], 2);
        assert_eq!(
            state.bodies.lock().unwrap()[1],
            json!([{"id": 2, "nome": "cliente 2"}])
        );
        let (err, _) = run(
            json!({"path": "/in", "body": "$row", "batch": {"rows": 5}}),
            numbers(2),
            &base,
        )
        .await;
        assert!(err.unwrap_err().message.contains("must be 1"));
    }

    #[tokio::test]
    async fn retries_a_503_without_sending_a_batch_twice() {
        // The first answer is a 503: batch 1 is retried and sent once; batch 2 follows.
        let state = Arc::new(Api::default());
        state
            .answers
            .lock()
            .unwrap()
            .push_back((503, "busy".into()));
        let base = api(state.clone()).await;
        let (out, obs) = run(
            json!({"path": "/in", "batch": {"rows": 5}, "max_wait": "20ms"}),
            numbers(10),
            &base,
        )
        .await;
        let out = out.unwrap();
        let bodies = state.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 2, "{bodies:?}");
        assert_eq!(bodies[0][0]["id"], 1);
        assert_eq!(bodies[1][0]["id"], 6);
        assert_eq!(out.outputs["retries"], 1);
        assert_eq!(out.outputs["requests"], 3);
        assert_eq!(out.outputs["statuses"], json!({"201": 2}));
        assert!(obs
            .rows()
            .iter()
            .any(|(l, m)| *l == Level::Warning && m.contains("503") && m.contains("retry 1/3")));
    }

    #[tokio::test]
    async fn a_400_fails_the_step_naming_the_batch_without_the_secret() {
        // The API refuses batch 1, quoting the credential back.
        let state = Arc::new(Api::default());
        state.answers.lock().unwrap().push_back((
            400,
            "{\"detail\":\"period: enter a month; got Bearer tok-s3cr3t-value\"}".into(),
        ));
        let base = api(state.clone()).await;
        let (err, obs) = run(
            json!({"path": "/in", "batch": {"rows": 4},
                "auth": {"type": "bearer", "token": "tok-s3cr3t-value"}}),
            numbers(10),
            &base,
        )
        .await;
        let err = err.unwrap_err();
        assert!(!err.retryable);
        assert!(
            err.message.starts_with("batch 1/3 (rows 1–4"),
            "{}",
            err.message
        );
        assert!(err.message.contains("HTTP 400"), "{}", err.message);
        assert!(
            err.message.contains("period: enter a month"),
            "{}",
            err.message
        );
        assert!(!err.message.contains("tok-s3cr3t-value"), "{}", err.message);
        // Nothing after the failed batch was sent.
        assert!(state.bodies.lock().unwrap().is_empty());
        for (_, m) in obs.rows() {
            assert!(!m.contains("tok-s3cr3t-value"), "{m}");
        }

        // on_batch_failure: warn sends the rest and counts the failure.
        let state = Arc::new(Api::default());
        state
            .answers
            .lock()
            .unwrap()
            .push_back((422, "{\"detail\":\"no\"}".into()));
        let base = api(state.clone()).await;
        let (out, _) = run(
            json!({"path": "/in", "batch": {"rows": 4}, "on_batch_failure": "warn"}),
            numbers(10),
            &base,
        )
        .await;
        let out = out.unwrap();
        assert_eq!(out.outputs["failed_batches"], 1);
        assert_eq!(out.outputs["rows"], 6);
        assert_eq!(out.warnings.len(), 1);
        assert!(out.warnings[0].contains("batch 1/3"), "{:?}", out.warnings);
        assert_eq!(state.bodies.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn empty_tables_send_nothing_unless_asked() {
        let state = Arc::new(Api::default());
        let base = api(state.clone()).await;
        let (out, obs) = run(json!({"path": "/in"}), numbers(0), &base).await;
        let out = out.unwrap();
        assert_eq!(out.outputs["requests"], 0);
        assert!(state.bodies.lock().unwrap().is_empty());
        assert!(obs.rows().iter().any(|(_, m)| m.contains("no rows")));
        let (out, _) = run(
            json!({"path": "/in", "send_empty": true, "body": {"period": "2019-01", "rows": "$rows"}}),
            numbers(0),
            &base,
        )
        .await;
        assert_eq!(out.unwrap().outputs["requests"], 1);
        assert_eq!(
            state.bodies.lock().unwrap()[0],
            json!({"period": "2019-01", "rows": []})
        );
    }

    #[tokio::test]
    async fn qockpit_fake_receives_the_kpi_rows() {
        let sb = sandbox::Sandbox::start(sandbox::Options::default())
            .await
            .unwrap();
        let v = sb.values();
        let q = &v["qockpit"];
        let conn = json!({"type": "http",
            "base_url": format!("{}/{}", q["base_endpoint"].as_str().unwrap(), q["domain"].as_str().unwrap()),
            "auth": {"type": "api_key", "name": "Authorization",
                "value": format!("Token {}", q["api_token"].as_str().unwrap()), "in": "header"}});
        let obs = Arc::new(Collect::default());
        let mut c = ctx(&obs, Some(conn));
        let df = df!("filial" => ["Campinas", "Recife"], "faturamento" => [1234.5, 99.0]).unwrap();
        with_input(&mut c, df);
        let out = step(json!({"path": "/integrations/1/results", "gzip": true,
            "body": {"period": "2019-01", "rows": "$rows"}, "expect": [201]}))
        .run(c)
        .await
        .unwrap();
        assert_eq!(out.outputs["responses"], json!([{"received": 2}]));
        assert_eq!(
            sb.qockpit_results()["1"]["2019-01"]["rows"],
            json!([{"filial": "Campinas", "faturamento": 1234.5}, {"filial": "Recife", "faturamento": 99.0}])
        );
        let token = q["api_token"].as_str().unwrap();
        for (_, m) in obs.rows() {
            assert!(!m.contains(token), "{m}");
        }
        sb.shutdown().await;
    }

    #[test]
    fn schema_describes_every_field() {
        let mut g = schemars::SchemaGenerator::default();
        g.subschema_for::<HttpSend>();
        let defs = serde_json::to_value(g.definitions()).unwrap();
        for def in ["HttpSend", "Batch"] {
            for (name, prop) in defs[def]["properties"].as_object().unwrap() {
                assert!(
                    prop["description"].is_string(),
                    "http.send {def}.{name} has no description"
                );
            }
            assert_eq!(defs[def]["additionalProperties"], false);
        }
        assert!(serde_json::from_value::<HttpSend>(json!({"url": "x", "bogus": 1})).is_err());
    }
}
