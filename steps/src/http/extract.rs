//! `type: http.extract` — page through a JSON API into a table (a Polars `DataFrame`).
//!
//! Why a step of its own rather than `http.request` in a loop: pagination is where the
//! scripts this replaces went wrong — a page retried after a 503 and then skipped, a last
//! page that was exactly full so the loop stopped one page early (or never), a cursor that the
//! API repeated forever. Here each strategy has explicit stop rules and a loop guard:
//!
//! * `offset` / `page` — addressable pages: `offset=0,n,2·n…` (`n` the records the first
//!   page actually held: APIs clamp `size` silently) or `page=first_page,+1…`. With
//!   `concurrency: N` up to N pages are in flight at once: when a total is configured
//!   (`total_header`/`total_path`), or for offsets, the first page comes alone and tells
//!   the page size served and where the last page is; otherwise pages are fetched
//!   speculatively ahead (the first empty page, or one shorter than the first, ends the
//!   run; pages fetched beyond it are dropped — a dropped page that still held records
//!   fails the step). At concurrency 1 offsets advance by the records received. Pages are reassembled in page order, so every
//!   record appears exactly once and in order. A page that fails with a retryable error is
//!   retried in place (see [`super::client`]); if it still fails the step fails — a page is
//!   never skipped.
//! * `cursor` — the next request carries `cursor_param=<cursor>`, the cursor read from the
//!   body (`cursor_path`), a header (`cursor_header`) or the last record (`cursor_field`,
//!   Stripe's `starting_after`); no cursor ends the run (unless `has_more` says otherwise:
//!   then the step fails).
//! * `next_url` — the body holds the next page's URL (`next_url_path`; relative URLs are
//!   resolved against the current one).
//! * `link_header` — the next URL is the RFC 8288 `Link: <…>; rel="next"` header.
//! * `none` — one request.
//!
//! Stop rules, checked after every page in order. A cursor, next-URL or Link walk ends on
//! its own end signal: no cursor / next link, a false `has_more_path`, the total reached,
//! `max_pages`; an empty or short page ends it only with `stop_on_short_page: true` (APIs
//! that filter after paging send them mid-walk; see docs/decisions). An `offset`/`page` walk
//! also ends at an empty page or one shorter than the page size served. A cursor or next
//! URL seen before fails the step (the API is looping). A total (`total_header` /
//! `total_path`, in records; null is "unknown") that the records received do not match
//! fails the step (`on_total_mismatch: warn` keeps them).
//!
//! Rate limits: `rate_limit: {requests, per}` spaces requests out, and a response with
//! `RateLimit-Remaining: 0` pauses every request until `RateLimit-Reset`.
//!
//! Records go into typed column builders page by page ([`super::records`]); a page's JSON is
//! dropped as soon as its turn in page order has come.

use super::auth::Auth;
use super::client::{cancellable, duration, Body, Limiter, Reply, Sender, Target};
use super::records::{Columns, Shape};
use super::request::auth_secret_fields;
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{Problem, StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use futures::stream::{FuturesUnordered, StreamExt};
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn default_method() -> String {
    "GET".into()
}
fn default_true() -> bool {
    true
}
fn default_separator() -> String {
    "_".into()
}

/// How pages are addressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PageType {
    /// One request, no pagination.
    #[default]
    None,
    /// `offset_param` = records to skip (0, size, 2·size …); needs `size`.
    Offset,
    /// `page_param` = page number (`first_page`, +1 …).
    Page,
    /// `cursor_param` = the cursor the previous page returned.
    Cursor,
    /// The previous page's body holds the next URL.
    NextUrl,
    /// The previous page's `Link` header holds the next URL (`rel="next"`).
    LinkHeader,
}

/// Pagination: how pages are addressed and when to stop.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Paginate {
    /// The strategy: `offset`, `page`, `cursor`, `next_url`, `link_header` or `none`
    /// (default).
    #[serde(rename = "type", default)]
    pub kind: PageType,
    /// `offset`: the query parameter of the offset (default `offset`).
    #[serde(default)]
    pub offset_param: Option<String>,
    /// `page`: the query parameter of the page number (default `page`).
    #[serde(default)]
    pub page_param: Option<String>,
    /// `page`: the number of the first page (default 1; 0 for zero-based APIs).
    #[serde(default)]
    pub first_page: Option<i64>,
    /// The query parameter of the page size (default `limit`); sent when `size` is set.
    #[serde(default)]
    pub size_param: Option<String>,
    /// Records per page (sent as `size_param`; a shorter page is the last one).
    #[serde(default)]
    pub size: Option<u64>,
    /// `cursor`: the query parameter that carries the cursor.
    #[serde(default)]
    pub cursor_param: Option<String>,
    /// `cursor`: dotted path of the next cursor in the body (`meta.next_cursor`).
    #[serde(default)]
    pub cursor_path: Option<String>,
    /// `cursor`: the response header that holds the next cursor (instead of `cursor_path`).
    #[serde(default)]
    pub cursor_header: Option<String>,
    /// `cursor`: dotted path, inside the page's last record, of the next cursor (Stripe's
    /// `starting_after=<id of the last record>`: `cursor_param: starting_after`,
    /// `cursor_field: id`, `has_more_path: has_more`). An empty page has no last record and
    /// ends the walk.
    #[serde(default)]
    pub cursor_field: Option<String>,
    /// `next_url`: dotted path of the next page's URL in the body (`links.next`).
    #[serde(default)]
    pub next_url_path: Option<String>,
    /// A response header with the total number of records (`X-Total-Items`).
    #[serde(default)]
    pub total_header: Option<String>,
    /// Dotted path of the total number of records in the body (`meta.total`; null means
    /// unknown).
    #[serde(default)]
    pub total_path: Option<String>,
    /// Dotted path of a boolean in the body; false ends the run.
    #[serde(default)]
    pub has_more_path: Option<String>,
    /// `true`: a page with fewer records than `size` is the last (the API never serves
    /// fewer than it was asked for; saves the request that would find the end). `false`: a
    /// page's length never ends the walk. Unset (default): `offset` and `page` walks end at
    /// a page shorter than the first page (the page size the API actually serves, which may
    /// be less than `size`); `cursor`, `next_url` and `link_header` walks end only on their
    /// own end signal.
    #[serde(default)]
    pub stop_on_short_page: Option<bool>,
    /// When the records received differ from the announced total (`total_header` /
    /// `total_path`): `fail` (default) fails the step before anything downstream runs;
    /// `warn` keeps what arrived and ends with a warning.
    #[serde(default)]
    pub on_total_mismatch: OnTotalMismatch,
    /// Fetch at most this many pages.
    #[serde(default)]
    pub max_pages: Option<u64>,
    /// `offset` and `page`: pages fetched at once (default 1), reassembled in order.
    #[serde(default)]
    pub concurrency: Option<usize>,
}

/// What a total that does not match the records received does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnTotalMismatch {
    /// Fail the step (the table is not handed on).
    #[default]
    Fail,
    /// Keep the records that arrived; the step ends with a warning.
    Warn,
}

/// A client-side request-rate limit.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// At most this many requests …
    pub requests: u32,
    /// … per this period (`1s`, `1m`).
    pub per: String,
}

/// Page through a JSON API into a table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpExtract {
    /// A path joined to the connection's `base_url` (`/api/v2/tickets`). Use either `path`
    /// or `url`.
    #[serde(default)]
    pub path: Option<String>,
    /// The full URL of the first page.
    #[serde(default)]
    pub url: Option<String>,
    /// The HTTP method (default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Query parameters sent with every page (strings, numbers, booleans; a list repeats
    /// the parameter; null leaves it out). Templates make incremental windows
    /// (`start_datetime: "{{ … }}"`).
    #[serde(default)]
    pub query: IndexMap<String, Value>,
    /// Request headers (they override the connection's by name).
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Authentication, overriding the connection's.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// Dotted path to the list of records in the body (`data.items`); absent: the body is
    /// the list.
    #[serde(default)]
    pub records: Option<String>,
    /// Pagination (default: one request).
    #[serde(default)]
    pub paginate: Paginate,
    /// Space requests out: `{requests: 10, per: 1s}`. `RateLimit-Remaining: 0` with
    /// `RateLimit-Reset` is always honoured.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Nested objects become `parent_child` columns (default true); false keeps them as
    /// struct columns.
    #[serde(default = "default_true")]
    pub flatten: bool,
    /// The separator of flattened column names (default `_`).
    #[serde(default = "default_separator")]
    pub separator: String,
    /// Timeout of one request (default the connection's `timeout`, else 30s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// How often one request is retried on a connection error, 5xx or 429 (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// The longest wait before a retry (default `1m`); a longer `Retry-After` or
    /// `RateLimit-Reset` fails the step.
    #[serde(default)]
    pub max_wait: Option<String>,
    /// The largest response body read: a number of bytes or a size such as `50MB`, `1GiB`
    /// (default `512MiB`). A larger (or endless) body fails the step.
    #[serde(default)]
    #[schemars(schema_with = "crate::http::send::size_schema")]
    pub max_body: Option<String>,
}

/// What one page said.
#[derive(Debug, Default)]
struct Page {
    records: Records,
    total: Option<u64>,
    has_more: Option<bool>,
    cursor: Option<String>,
    next_url: Option<url::Url>,
    bytes: u64,
}

/// A page's records: parsed, or (the common case: the body is the list and nothing else is
/// read from it) the body itself, counted by a quick scan and parsed straight into the
/// column builders when the page's turn comes.
#[derive(Debug)]
enum Records {
    Parsed(Vec<Value>),
    Raw { reply: Box<Reply>, n: usize },
}

impl Default for Records {
    fn default() -> Self {
        Records::Parsed(Vec::new())
    }
}

impl Records {
    fn len(&self) -> usize {
        match self {
            Records::Parsed(v) => v.len(),
            Records::Raw { n, .. } => *n,
        }
    }
}

/// Walk a dotted path (`a.b.0.c`).
fn at_path<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        cur = match cur {
            Value::Object(o) => o.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn scalar_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn as_count(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The `rel="next"` target of an RFC 8288 `Link` header.
pub fn link_next(header: &str) -> Option<String> {
    let mut rest = header;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let end = after.find('>')?;
        let target = &after[..end];
        let params_all = &after[end + 1..];
        let params = &params_all[..params_all.find('<').unwrap_or(params_all.len())];
        for p in params.split(';') {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("rel")
                && v.trim()
                    .trim_end_matches(',')
                    .trim()
                    .trim_matches('"')
                    .split_whitespace()
                    .any(|r| r.eq_ignore_ascii_case("next"))
            {
                return Some(target.to_string());
            }
        }
        rest = params_all;
    }
    None
}

/// What fetches pages (shared by the concurrent page futures).
struct Fetcher<'a> {
    cfg: &'a HttpExtract,
    ctx: &'a StepContext,
    sender: Sender<'a>,
}

/// What collects them (in page order). Pages are counted here as they arrive; their records
/// go, in page order, to the column builders on a thread of their own ([`Builder`]), so
/// parsing a page never delays the next request: at concurrency 1 page n+1 is on the wire
/// while page n is parsed, at concurrency N a slot is refilled as soon as its page lands.
struct Sink<'a> {
    ctx: &'a StepContext,
    builder: Builder,
    pages: u64,
    bytes: u64,
    /// Records handed to the builders (counted on arrival, so the stop rules need not wait
    /// for the parse).
    records: u64,
    total: Option<u64>,
}

/// The column builders, fed through a bounded channel by a blocking task: at most `depth`
/// pages wait there (memory stays a few pages whatever the run's length).
struct Builder {
    tx: Option<tokio::sync::mpsc::Sender<Records>>,
    task: Option<tokio::task::JoinHandle<Result<Built, BuildError>>>,
}

/// The finished table and its column names (in order).
struct Built {
    df: polars::prelude::DataFrame,
    columns: Vec<String>,
}

enum BuildError {
    /// A page whose body is not JSON.
    NotJson(Box<Reply>, serde_json::Error),
    /// Polars refused the columns.
    Table(String),
}

impl Builder {
    fn start(shape: Shape, depth: usize) -> Builder {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Records>(depth.max(1));
        let task = tokio::task::spawn_blocking(move || {
            let mut columns = Columns::new();
            while let Some(records) = rx.blocking_recv() {
                match records {
                    Records::Parsed(records) => {
                        for r in &records {
                            columns.push_value(r, &shape);
                        }
                    }
                    Records::Raw { reply, .. } => {
                        if let Err(e) = columns.push_json_array(&reply.body, &shape) {
                            return Err(BuildError::NotJson(reply, e));
                        }
                    }
                }
            }
            let names = columns.names();
            let df = columns
                .finish()
                .map_err(|e| BuildError::Table(e.to_string()))?;
            Ok(Built { df, columns: names })
        });
        Builder {
            tx: Some(tx),
            task: Some(task),
        }
    }
}

impl Sink<'_> {
    /// Append a page's records (the page was counted when it arrived).
    async fn emit(&mut self, page: Page) -> Result<(), StepError> {
        self.records += page.records.len() as u64;
        let sent = match &self.builder.tx {
            Some(tx) => tx.send(page.records).await.is_ok(),
            None => false,
        };
        if !sent {
            // The builders stopped on a bad page: their error is the step's.
            return Err(match self.finish().await {
                Err(e) => e,
                Ok(_) => StepError::fatal("the column builders stopped early"),
            });
        }
        self.ctx
            .progress(&[("pages", self.pages), ("records", self.records)]);
        Ok(())
    }

    fn records(&self) -> u64 {
        self.records
    }

    /// Wait for the builders to take the last page and build the table.
    async fn finish(&mut self) -> Result<Built, StepError> {
        self.builder.tx = None;
        let Some(task) = self.builder.task.take() else {
            return Err(StepError::fatal("the table was already built"));
        };
        match task.await {
            Ok(Ok(built)) => Ok(built),
            Ok(Err(BuildError::NotJson(reply, e))) => Err(not_json(self.ctx, &reply, &e)),
            Ok(Err(BuildError::Table(e))) => {
                Err(StepError::fatal(format!("building the table: {e}")))
            }
            Err(e) => Err(StepError::fatal(format!("building the table: {e}"))),
        }
    }
}

impl Fetcher<'_> {
    /// Fetch one page and read what it says.
    async fn fetch(
        &self,
        url: &url::Url,
        with_base_query: bool,
        extra: &[(String, String)],
    ) -> Result<Page, StepError> {
        let reply = self
            .sender
            .send(url, with_base_query, extra, &Body::None)
            .await?;
        reply.check(self.ctx, &self.sender.prep.method, &[])?;
        self.read(reply)
    }

    fn read(&self, reply: Reply) -> Result<Page, StepError> {
        let p = &self.cfg.paginate;
        let mut page = Page {
            bytes: reply.body.len() as u64,
            ..Page::default()
        };
        if let Some(h) = &p.total_header {
            page.total = reply.header(h).and_then(|v| v.trim().parse().ok());
        }
        // Nothing but the list itself is read from the body: leave its parsing to the
        // column builders (no `Value` tree), count its records now.
        let body_is_list = self.cfg.records.is_none()
            && p.total_path.is_none()
            && p.has_more_path.is_none()
            && match p.kind {
                PageType::Cursor => p.cursor_path.is_none() && p.cursor_field.is_none(),
                PageType::NextUrl => false,
                _ => true,
            };
        if body_is_list {
            if let Some(n) = super::records::array_len(&reply.body) {
                if p.kind == PageType::Cursor {
                    page.cursor = p
                        .cursor_header
                        .as_deref()
                        .and_then(|h| reply.header(h))
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string);
                }
                if p.kind == PageType::LinkHeader {
                    page.next_url = self.link_next(&reply)?;
                }
                page.records = Records::Raw {
                    reply: Box::new(reply),
                    n,
                };
                return Ok(page);
            }
        }
        let shown = super::client::without_query(&reply.url);
        let body: Value = if reply.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&reply.body).map_err(|e| not_json(self.ctx, &reply, &e))?
        };
        if let Some(path) = &p.total_path {
            if let Some(t) = at_path(&body, path).and_then(as_count) {
                page.total = Some(t);
            }
        }
        if let Some(path) = &p.has_more_path {
            page.has_more = match at_path(&body, path) {
                Some(Value::Bool(b)) => Some(*b),
                Some(Value::String(s)) => s.parse().ok(),
                _ => None,
            };
        }
        match p.kind {
            PageType::Cursor => {
                page.cursor = match (&p.cursor_path, &p.cursor_header) {
                    (Some(path), _) => scalar_string(at_path(&body, path)),
                    (None, Some(h)) => reply
                        .header(h)
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                    _ => None,
                };
            }
            PageType::NextUrl => {
                let path = p.next_url_path.as_deref().unwrap_or_default();
                if let Some(next) = scalar_string(at_path(&body, path)) {
                    page.next_url = Some(self.resolve(&reply.url, &next)?);
                }
            }
            PageType::LinkHeader => page.next_url = self.link_next(&reply)?,
            _ => {}
        }
        let list = match &self.cfg.records {
            Some(path) => at_path(&body, path).cloned().unwrap_or(Value::Null),
            None => body,
        };
        let records = match list {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            other => {
                return Err(StepError::fatal(format!(
                    "{shown}: expected a list of records{}, found {}",
                    match &self.cfg.records {
                        Some(p) => format!(" at `{p}`"),
                        None => " (set `records` to the path of the list in the body)".into(),
                    },
                    kind_of(&other)
                )))
            }
        };
        if let (PageType::Cursor, Some(field)) = (p.kind, &p.cursor_field) {
            page.cursor = records
                .last()
                .and_then(|last| scalar_string(at_path(last, field)));
        }
        page.records = Records::Parsed(records);
        Ok(page)
    }

    /// The resolved `rel="next"` of the `Link` headers.
    fn link_next(&self, reply: &Reply) -> Result<Option<url::Url>, StepError> {
        let next = reply
            .headers
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(link_next);
        next.map(|n| self.resolve(&reply.url, &n)).transpose()
    }

    fn resolve(&self, base: &url::Url, next: &str) -> Result<url::Url, StepError> {
        base.join(next).map_err(|e| {
            StepError::fatal(self.ctx.redactor.redact(&format!(
                "invalid next page URL `{}`: {e}",
                super::client::unparsed_url_shown(next)
            )))
        })
    }

    /// `stop_on_short_page: true`: fewer records than `size` end any walk.
    fn short_of_size(&self, n: usize) -> bool {
        let p = &self.cfg.paginate;
        p.stop_on_short_page == Some(true) && p.size.is_some_and(|s| (n as u64) < s)
    }

    /// The default of `offset`/`page` walks: fewer records than the first page held (the
    /// page size the API serves) end the walk.
    fn short_of_served(&self, n: u64, served: u64) -> bool {
        self.cfg.paginate.stop_on_short_page.is_none() && served > 0 && n < served
    }

    fn size_pair(&self) -> Vec<(String, String)> {
        let p = &self.cfg.paginate;
        match p.size {
            Some(s) => vec![(
                p.size_param.clone().unwrap_or_else(|| "limit".into()),
                s.to_string(),
            )],
            None => Vec::new(),
        }
    }

    /// The query pair that addresses page `idx` (0-based) for `page`, or the page at
    /// `offset` records for `offset`.
    fn address(&self, idx: u64, offset: u64) -> (String, String) {
        let p = &self.cfg.paginate;
        match p.kind {
            PageType::Offset => (
                p.offset_param.clone().unwrap_or_else(|| "offset".into()),
                offset.to_string(),
            ),
            _ => (
                p.page_param.clone().unwrap_or_else(|| "page".into()),
                (p.first_page.unwrap_or(1) + idx as i64).to_string(),
            ),
        }
    }

    fn loop_error(&self, what: &str, pages: u64) -> StepError {
        StepError::fatal(self.ctx.redactor.redact(&format!(
            "the API returned {what} a second time (after {pages} pages); stopping a pagination loop"
        )))
    }

    /// `cursor`, `next_url`, `link_header`, `none`: one page after the other.
    async fn sequential(&self, sink: &mut Sink<'_>) -> Result<(), StepError> {
        let p = &self.cfg.paginate;
        let mut url = self.sender.prep.url.clone();
        let mut with_base = true;
        let mut extra = self.size_pair();
        let mut seen = HashSet::new();
        loop {
            if p.max_pages.is_some_and(|m| sink.pages >= m) {
                break;
            }
            let page = self.fetch(&url, with_base, &extra).await?;
            sink.pages += 1;
            sink.bytes += page.bytes;
            if page.total.is_some() {
                sink.total = page.total;
            }
            let n = page.records.len();
            let (has_more, cursor, next_url) =
                (page.has_more, page.cursor.clone(), page.next_url.clone());
            sink.emit(page).await?;
            // A walk ends on its own signal; a page's length only when the user says so.
            if (n == 0 && p.stop_on_short_page == Some(true))
                || self.short_of_size(n)
                || has_more == Some(false)
                || p.kind == PageType::None
                || sink.total.is_some_and(|t| sink.records() >= t)
            {
                break;
            }
            let more_announced = |what: &str| {
                StepError::fatal(format!(
                    "page {} says there are more records (`has_more_path` is true) but gives no {what}; \
                     stopping here would lose them",
                    sink.pages
                ))
            };
            if p.kind == PageType::Cursor {
                let Some(c) = cursor else {
                    if has_more == Some(true) {
                        return Err(more_announced("cursor"));
                    }
                    break;
                };
                if !seen.insert(c.clone()) {
                    return Err(self.loop_error(&format!("cursor `{c}`"), sink.pages));
                }
                extra = self.size_pair();
                extra.push((p.cursor_param.clone().unwrap_or_default(), c));
            } else {
                let Some(next) = next_url else {
                    if has_more == Some(true) {
                        return Err(more_announced("next URL"));
                    }
                    break;
                };
                if next == url || !seen.insert(next.to_string()) {
                    return Err(self.loop_error(
                        &format!("next URL `{}`", super::client::without_query(&next)),
                        sink.pages,
                    ));
                }
                url = next;
                with_base = false;
                extra = Vec::new();
            }
        }
        Ok(())
    }

    /// `offset`, `page`: up to `concurrency` pages in flight, reassembled in page order.
    async fn addressable(&self, sink: &mut Sink<'_>) -> Result<(), StepError> {
        let p = &self.cfg.paginate;
        let slots = p.concurrency.unwrap_or(1).max(1);
        let max_pages = p.max_pages.unwrap_or(u64::MAX);
        let offsets = p.kind == PageType::Offset;
        // Pages whose index is at or past `end` are not part of the result.
        let mut end = u64::MAX;
        // Why `end` was set by a page's length (a later page with records contradicts it).
        let mut ended_short: Option<(u64, u64)> = None;
        let mut next_issue = 0u64;
        let mut next_emit = 0u64;
        // The records the first page held: the page size the API actually serves (an API may
        // clamp `size` silently). 0 until the first page arrives.
        let mut served = 0u64;
        let mut done: BTreeMap<u64, Page> = BTreeMap::new();
        let base = &self.sender.prep.url;
        let fetch_at = |idx: u64, offset: u64| {
            let mut extra = self.size_pair();
            extra.push(self.address(idx, offset));
            async move { (idx, self.fetch(base, true, &extra).await) }
        };
        let mut in_flight = FuturesUnordered::new();
        // With a total configured, the first page alone tells how many pages there are: no
        // request is spent on pages past the end (rate-limited APIs count them). Offsets need
        // the served page size before the second page can be addressed.
        let mut awaiting_first = p.total_header.is_some() || p.total_path.is_some() || offsets;
        loop {
            while in_flight.len() < slots
                && next_issue < end.min(max_pages)
                && !(awaiting_first && next_issue >= 1)
            {
                // At concurrency 1 an offset is the records received so far (every page
                // before this one has been emitted); ahead of them, a multiple of the
                // served size.
                let offset = if slots == 1 {
                    sink.records()
                } else {
                    next_issue * served
                };
                in_flight.push(fetch_at(next_issue, offset));
                next_issue += 1;
            }
            let Some((idx, res)) = cancellable(self.ctx, in_flight.next()).await? else {
                break;
            };
            let page = res?;
            awaiting_first = false;
            sink.pages += 1;
            sink.bytes += page.bytes;
            let n = page.records.len() as u64;
            if let Some(t) = page.total {
                sink.total = Some(t);
            }
            if idx == 0 {
                served = n;
            }
            if let (Some(short), true) = (ended_short, idx >= end && n > 0) {
                return Err(varying_page_size(short, served, (idx, n)));
            }
            if n == 0 {
                end = end.min(idx);
            } else if self.short_of_size(n as usize) || page.has_more == Some(false) {
                end = end.min(idx + 1);
            }
            // The number of pages comes from the page size served, not the one asked for.
            // (At concurrency 1 offsets follow the records received, and the total ends the
            // walk when reached.)
            if let (Some(t), true) = (sink.total, served > 0 && !(offsets && slots == 1)) {
                end = end.min(t.div_ceil(served));
            }
            if idx < end {
                done.insert(idx, page);
            }
            while next_emit < end {
                let Some(page) = done.remove(&next_emit) else {
                    break;
                };
                let n = page.records.len() as u64;
                let short = next_emit > 0 && self.short_of_served(n, served);
                sink.emit(page).await?;
                next_emit += 1;
                if short && next_emit < end {
                    end = next_emit;
                    ended_short = Some((next_emit - 1, n));
                    // Pages already fetched past it that hold records contradict it.
                    if let Some((&later, page)) =
                        done.range(end..).find(|(_, p)| p.records.len() > 0)
                    {
                        return Err(varying_page_size(
                            (next_emit - 1, n),
                            served,
                            (later, page.records.len() as u64),
                        ));
                    }
                }
                if sink.total.is_some_and(|t| sink.records() >= t) {
                    end = end.min(next_emit);
                }
            }
            done.retain(|k, _| *k < end);
        }
        Ok(())
    }
}

/// A page shorter than the first (`short`: index, records) ended an addressable walk, yet
/// a later one (`later`) holds records: ending there would drop them silently.
fn varying_page_size(short: (u64, u64), served: u64, later: (u64, u64)) -> StepError {
    StepError::fatal(format!(
        "page {} held {} records, fewer than the {served} of the first page, yet page {} \
         holds {}: the API's page size varies, so pages cannot be addressed safely; set \
         `paginate.concurrency: 1` or `stop_on_short_page`",
        short.0 + 1,
        short.1,
        later.0 + 1,
        later.1
    ))
}

/// A body that does not parse as JSON.
fn not_json(ctx: &StepContext, reply: &Reply, e: &serde_json::Error) -> StepError {
    StepError::fatal(ctx.redactor.redact(&format!(
        "{}: the response is not JSON ({e}): {}",
        super::client::without_query(&reply.url),
        reply.excerpt()
    )))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl HttpExtract {
    /// The target fields, for [`Target::prepare`] and [`Target::problems`].
    fn target(&self) -> Target<'_> {
        super::client::target_of!(self)
    }

    /// The pagination settings that belong together (see [`StepConfig::problems`]).
    fn paginate_problems(&self) -> Vec<Problem> {
        let p = &self.paginate;
        let mut out = Vec::new();
        let kind = "paginate.type";
        let mut need = |ok: bool, at: &str, given: &[&str], msg: &str| {
            if !ok {
                out.push(Problem::at(at, format!("paginate: {msg}")).given(given));
            }
        };
        match p.kind {
            PageType::Offset => need(
                p.size.is_some(),
                kind,
                &[],
                "`offset` pagination needs `size` (the records asked for per page)",
            ),
            PageType::Cursor => {
                need(
                    p.cursor_param.is_some(),
                    kind,
                    &[],
                    "`cursor` pagination needs `cursor_param` (the query parameter that carries the cursor)",
                );
                let sources = [&p.cursor_path, &p.cursor_header, &p.cursor_field]
                    .iter()
                    .filter(|s| s.is_some())
                    .count();
                need(
                    sources > 0,
                    kind,
                    &[],
                    "`cursor` pagination needs `cursor_path`, `cursor_header` or `cursor_field` (where the next cursor is)",
                );
                need(
                    sources <= 1,
                    kind,
                    &[],
                    "set only one of `cursor_path`, `cursor_header` and `cursor_field`",
                );
            }
            PageType::NextUrl => need(
                p.next_url_path.is_some(),
                kind,
                &[],
                "`next_url` pagination needs `next_url_path` (the dotted path of the next URL in the body)",
            ),
            _ => {}
        }
        let unused = |set: bool, key: &str, kinds: &[PageType], what: &str| {
            (set && !kinds.contains(&p.kind)).then(|| {
                Problem::at(
                    &format!("paginate.{key}"),
                    format!("paginate: `{key}` is only used by {what} pagination"),
                )
                .given(&[kind])
            })
        };
        out.extend(
            [
                unused(
                    p.offset_param.is_some(),
                    "offset_param",
                    &[PageType::Offset],
                    "`offset`",
                ),
                unused(
                    p.page_param.is_some(),
                    "page_param",
                    &[PageType::Page],
                    "`page`",
                ),
                unused(
                    p.first_page.is_some(),
                    "first_page",
                    &[PageType::Page],
                    "`page`",
                ),
                unused(
                    p.cursor_param.is_some(),
                    "cursor_param",
                    &[PageType::Cursor],
                    "`cursor`",
                ),
                unused(
                    p.cursor_field.is_some(),
                    "cursor_field",
                    &[PageType::Cursor],
                    "`cursor`",
                ),
                unused(
                    p.next_url_path.is_some(),
                    "next_url_path",
                    &[PageType::NextUrl],
                    "`next_url`",
                ),
                unused(
                    p.concurrency.is_some_and(|c| c > 1),
                    "concurrency",
                    &[PageType::Offset, PageType::Page],
                    "`offset` and `page`",
                ),
            ]
            .into_iter()
            .flatten(),
        );
        let mut need = |ok: bool, at: &str, given: &[&str], msg: &str| {
            if !ok {
                out.push(Problem::at(at, format!("paginate: {msg}")).given(given));
            }
        };
        need(
            p.size != Some(0),
            "paginate.size",
            &[],
            "`size` must be at least 1",
        );
        need(
            p.concurrency != Some(0),
            "paginate.concurrency",
            &[],
            "`concurrency` must be at least 1",
        );
        need(
            p.stop_on_short_page != Some(true) || p.size.is_some(),
            "paginate.stop_on_short_page",
            &[],
            "`stop_on_short_page: true` compares pages with `size`: set `size`",
        );
        out
    }
}

#[async_trait]
impl StepConfig for HttpExtract {
    const TYPE: &'static str = "http.extract";
    const SUMMARY: &'static str =
        "Page through a JSON API (offset, page, cursor, next URL, Link header) into a typed table";
    const RESULT_NAME: &'static str = "result";

    fn problems(&self) -> Vec<Problem> {
        let mut out = self.target().problems();
        out.extend(self.paginate_problems());
        if let Some(r) = &self.rate_limit {
            if let Err(e) = engine::duration::parse(&r.per) {
                out.push(Problem::at(
                    "rate_limit.per",
                    format!("`rate_limit.per`: {e}"),
                ));
            }
            if r.requests == 0 {
                out.push(Problem::at(
                    "rate_limit.requests",
                    "`rate_limit.requests` must be at least 1 (remove `rate_limit` for no limit)",
                ));
            }
        }
        out
    }

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: true,
            outputs: Some(
                ["pages", "records", "bytes", "retries", "elapsed_ms"]
                    .map(String::from)
                    .to_vec(),
            ),
            secret_fields: auth_secret_fields(self.auth.as_ref()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let started = Instant::now();
        let prep = self.target().prepare(&ctx)?;
        let window = match &self.rate_limit {
            Some(r) => Some((
                r.requests as usize,
                duration("rate_limit.per", Some(&r.per), Duration::ZERO)?,
            )),
            None => None,
        };
        let slots = match self.paginate.kind {
            PageType::Offset | PageType::Page => self.paginate.concurrency.unwrap_or(1),
            _ => 1,
        };
        let fetcher = Fetcher {
            cfg: &self,
            ctx: &ctx,
            sender: Sender::new(&ctx, &prep, Limiter::new(window).with_concurrency(slots)),
        };
        let mut sink = Sink {
            ctx: &ctx,
            builder: Builder::start(
                Shape {
                    flatten: self.flatten,
                    separator: self.separator.clone(),
                },
                slots + 1,
            ),
            pages: 0,
            bytes: 0,
            records: 0,
            total: None,
        };
        match self.paginate.kind {
            PageType::Offset | PageType::Page => fetcher.addressable(&mut sink).await?,
            _ => fetcher.sequential(&mut sink).await?,
        }
        let Built { df, columns } = sink.finish().await?;
        let records = df.height() as u64;
        let retries = fetcher.sender.retries.load(Ordering::Relaxed);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let mut warnings = Vec::new();
        if let Some(t) = sink.total {
            if t != records && self.paginate.max_pages.is_none() {
                let w = format!("the API announced {t} records; {records} arrived");
                match self.paginate.on_total_mismatch {
                    OnTotalMismatch::Fail => {
                        // Retryable: records added or removed during the walk are the
                        // usual cause, and a step-level `retry:` walks again.
                        return Err(StepError::retryable(format!(
                            "{w} (in {} pages); the table is not handed on \
                             (`paginate.on_total_mismatch: warn` keeps it)",
                            sink.pages
                        )));
                    }
                    OnTotalMismatch::Warn => {
                        ctx.log(Level::Warning, &w);
                        warnings.push(w);
                    }
                }
            }
        }
        ctx.log(
            Level::Info,
            &format!(
                "{records} records in {} pages ({} bytes, {retries} retries, {})",
                sink.pages,
                sink.bytes,
                engine::duration::human(started.elapsed())
            ),
        );
        let mut outputs = Map::new();
        outputs.insert("pages".into(), json!(sink.pages));
        outputs.insert("records".into(), json!(records));
        outputs.insert("bytes".into(), json!(sink.bytes));
        outputs.insert("retries".into(), json!(retries));
        outputs.insert("elapsed_ms".into(), json!(elapsed_ms));
        let mut result = outputs.clone();
        result.insert("columns".into(), json!(columns));
        result.insert("total".into(), json!(sink.total));
        Ok(StepOutput {
            outputs,
            result: Value::Object(result),
            table: Some(crate::table::table(df)),
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testutil::{ctx, serve, Collect};
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::{Json, Router};
    use polars::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};

    /// How the fake announces the total.
    #[derive(Clone, Copy, PartialEq)]
    enum Total {
        None,
        Header,
        BodyNull,
        Body,
    }

    /// A paged API over `n` records `{id, name}`: `/pages?offset=<page, 1-based>&limit=`
    /// (Tiflux style) and `/offsets?offset=<records to skip>&limit=`.
    #[derive(Clone)]
    struct Fake {
        n: usize,
        total: Total,
        delay_ms: u64,
        in_flight: Arc<AtomicUsize>,
        max_in_flight: Arc<AtomicUsize>,
        hits: Arc<Mutex<Vec<String>>>,
        /// Page number → how many 503s it still answers.
        failing: Arc<Mutex<HashMap<usize, usize>>>,
    }

    impl Fake {
        fn new(n: usize, total: Total) -> Self {
            Fake {
                n,
                total,
                delay_ms: 0,
                in_flight: Arc::default(),
                max_in_flight: Arc::default(),
                hits: Arc::default(),
                failing: Arc::default(),
            }
        }
        fn hits(&self) -> usize {
            self.hits.lock().unwrap().len()
        }
        fn max(&self) -> usize {
            self.max_in_flight.load(Ordering::SeqCst)
        }
    }

    async fn answer(f: &Fake, skip: usize, limit: usize, page_key: usize) -> Response {
        let now = f.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        f.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(f.delay_ms)).await;
        f.in_flight.fetch_sub(1, Ordering::SeqCst);
        {
            let mut failing = f.failing.lock().unwrap();
            if let Some(left) = failing.get_mut(&page_key) {
                if *left > 0 {
                    *left -= 1;
                    return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
                }
            }
        }
        let items: Vec<Value> = (skip..(skip + limit).min(f.n))
            .map(|i| json!({"id": i, "name": format!("r{i}")}))
            .collect();
        match f.total {
            Total::None => Json(items).into_response(),
            Total::Header => ([("X-Total-Items", f.n.to_string())], Json(items)).into_response(),
            Total::BodyNull => {
                Json(json!({"data": items, "meta": {"total": null}})).into_response()
            }
            Total::Body => Json(json!({"data": items, "meta": {"total": f.n}})).into_response(),
        }
    }

    fn param(q: &HashMap<String, String>, k: &str, default: usize) -> usize {
        q.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    async fn pages(State(f): State<Fake>, Query(q): Query<HashMap<String, String>>) -> Response {
        f.hits.lock().unwrap().push(format!("{q:?}"));
        let page = param(&q, "offset", 1);
        let limit = param(&q, "limit", 20);
        answer(&f, (page - 1) * limit, limit, page).await
    }

    async fn offsets(State(f): State<Fake>, Query(q): Query<HashMap<String, String>>) -> Response {
        f.hits.lock().unwrap().push(format!("{q:?}"));
        let skip = param(&q, "offset", 0);
        let limit = param(&q, "limit", 20);
        answer(&f, skip, limit, skip).await
    }

    async fn start(f: &Fake) -> String {
        serve(
            Router::new()
                .route("/pages", get(pages))
                .route("/offsets", get(offsets))
                .with_state(f.clone()),
        )
        .await
    }

    fn extract(yaml: Value) -> HttpExtract {
        serde_json::from_value(yaml).unwrap()
    }

    async fn run(cfg: HttpExtract, base: &str) -> Result<(StepOutput, Arc<Collect>), StepError> {
        let obs = Arc::new(Collect::default());
        let c = ctx(&obs, Some(json!({"type": "http", "base_url": base})));
        let out = cfg.run(c).await?;
        Ok((out, obs))
    }

    fn df(out: &StepOutput) -> DataFrame {
        crate::table::frame(out.table.as_ref().unwrap())
            .unwrap()
            .clone()
    }

    fn ids(out: &StepOutput) -> Vec<i64> {
        let d = df(out);
        if d.height() == 0 {
            return Vec::new();
        }
        d.column("id")
            .unwrap()
            .i64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    }

    fn page_cfg(size: u64, concurrency: usize, extra: Value) -> HttpExtract {
        let mut paginate = json!({"type": "page", "page_param": "offset", "first_page": 1,
            "size_param": "limit", "size": size, "concurrency": concurrency});
        for (k, v) in extra.as_object().unwrap() {
            paginate[k] = v.clone();
        }
        extract(json!({"path": "/pages", "paginate": paginate}))
    }

    #[tokio::test]
    async fn pages_with_total_header_run_concurrently_in_order() {
        let mut f = Fake::new(45, Total::Header);
        f.delay_ms = 60;
        let base = start(&f).await;
        let cfg = page_cfg(5, 4, json!({"total_header": "X-Total-Items"}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), (0..45).collect::<Vec<_>>());
        assert_eq!(f.max(), 4, "four pages in flight");
        assert_eq!(f.hits(), 9, "the total says 9 pages; no extra request");
        assert_eq!(out.outputs["records"], 45);
        assert_eq!(out.outputs["pages"], 9);
    }

    #[tokio::test]
    async fn pages_without_total_are_fetched_speculatively_in_order() {
        let mut f = Fake::new(43, Total::None);
        f.delay_ms = 60;
        let base = start(&f).await;
        let (out, _) = run(page_cfg(5, 4, json!({})), &base).await.unwrap();
        assert_eq!(ids(&out), (0..43).collect::<Vec<_>>());
        assert_eq!(f.max(), 4, "four pages in flight without a total");
        assert!(f.hits() >= 9 && f.hits() <= 9 + 4, "{} requests", f.hits());
        assert!(out.warnings.is_empty());
    }

    #[tokio::test]
    async fn last_page_exactly_full_needs_one_empty_page() {
        let f = Fake::new(10, Total::None);
        let base = start(&f).await;
        let (out, _) = run(page_cfg(5, 1, json!({})), &base).await.unwrap();
        assert_eq!(ids(&out), (0..10).collect::<Vec<_>>());
        assert_eq!(f.hits(), 3, "pages 1, 2 and the empty 3");
        // With the total known no extra page is needed.
        let f = Fake::new(10, Total::Header);
        let base = start(&f).await;
        let (out, _) = run(
            page_cfg(5, 1, json!({"total_header": "X-Total-Items"})),
            &base,
        )
        .await
        .unwrap();
        assert_eq!(ids(&out).len(), 10);
        assert_eq!(f.hits(), 2);
    }

    #[tokio::test]
    async fn null_total_is_unknown_and_short_page_stops() {
        let f = Fake::new(7, Total::BodyNull);
        let base = start(&f).await;
        let mut cfg = page_cfg(5, 2, json!({"total_path": "meta.total"}));
        cfg.records = Some("data".into());
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), (0..7).collect::<Vec<_>>());
        assert!(f.hits() <= 3);
    }

    #[tokio::test]
    async fn empty_first_page_is_an_empty_table() {
        let f = Fake::new(0, Total::None);
        let base = start(&f).await;
        let (out, _) = run(page_cfg(5, 3, json!({})), &base).await.unwrap();
        assert_eq!(df(&out).height(), 0);
        assert_eq!(out.outputs["records"], 0);
        let f = Fake::new(0, Total::Header);
        let base = start(&f).await;
        let (out, _) = run(
            page_cfg(5, 1, json!({"total_header": "X-Total-Items"})),
            &base,
        )
        .await
        .unwrap();
        assert_eq!(df(&out).height(), 0);
        assert_eq!(f.hits(), 1, "a total of 0 stops after the first page");
    }

    #[tokio::test]
    async fn offsets_with_total_in_body() {
        let f = Fake::new(12, Total::Body);
        let base = start(&f).await;
        let cfg = extract(json!({"path": "/offsets", "records": "data",
            "paginate": {"type": "offset", "size": 5, "total_path": "meta.total", "stop_on_short_page": false}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), (0..12).collect::<Vec<_>>());
        let hits = f.hits.lock().unwrap().clone();
        assert_eq!(hits.len(), 3);
        assert!(hits[2].contains("\"offset\": \"10\""), "{hits:?}");
    }

    #[tokio::test]
    async fn a_failing_page_is_retried_in_place() {
        let mut f = Fake::new(30, Total::None);
        f.delay_ms = 20;
        f.failing.lock().unwrap().insert(2, 2);
        let base = start(&f).await;
        let (out, obs) = run(page_cfg(5, 3, json!({})), &base).await.unwrap();
        assert_eq!(
            ids(&out),
            (0..30).collect::<Vec<_>>(),
            "no gap, no duplicate"
        );
        assert_eq!(out.outputs["retries"], 2);
        assert_eq!(
            obs.rows()
                .iter()
                .filter(|(l, m)| *l == Level::Warning && m.contains("503"))
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn max_pages_stops_early() {
        let f = Fake::new(100, Total::None);
        let base = start(&f).await;
        let (out, _) = run(page_cfg(5, 4, json!({"max_pages": 3})), &base)
            .await
            .unwrap();
        assert_eq!(ids(&out), (0..15).collect::<Vec<_>>());
        assert_eq!(f.hits(), 3);
    }

    /// A cursor API: `/c?cursor=N` returns record N and `next` = N+1 (until `n`), or a fixed
    /// cursor forever when `stuck`.
    async fn cursor_api(n: usize, stuck: bool, in_header: bool) -> String {
        let app = Router::new().route(
            "/c",
            get(move |Query(q): Query<HashMap<String, String>>| async move {
                let at = param(&q, "cursor", 0);
                let next = if stuck {
                    Some(1)
                } else {
                    (at + 1 < n).then_some(at + 1)
                };
                let body = json!({"items": [{"id": at}], "next": next});
                let mut headers = HeaderMap::new();
                if let (true, Some(c)) = (in_header, next) {
                    headers.insert("x-next", c.to_string().parse().unwrap());
                }
                (headers, Json(body))
            }),
        );
        serve(app).await
    }

    #[tokio::test]
    async fn cursor_from_body_and_header() {
        let base = cursor_api(4, false, false).await;
        let cfg = extract(json!({"path": "/c", "records": "items",
            "paginate": {"type": "cursor", "cursor_param": "cursor", "cursor_path": "next"}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), vec![0, 1, 2, 3]);
        let base = cursor_api(3, false, true).await;
        let cfg = extract(json!({"path": "/c", "records": "items",
            "paginate": {"type": "cursor", "cursor_param": "cursor", "cursor_header": "X-Next"}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn repeated_cursor_fails() {
        let base = cursor_api(4, true, false).await;
        let cfg = extract(json!({"path": "/c", "records": "items",
            "paginate": {"type": "cursor", "cursor_param": "cursor", "cursor_path": "next"}}));
        let err = run(cfg, &base).await.unwrap_err();
        assert!(
            err.message.contains("cursor `1` a second time"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn next_url_and_link_header() {
        let app = Router::new()
            .route(
                "/n",
                get(|Query(q): Query<HashMap<String, String>>| async move {
                    let p = param(&q, "p", 0);
                    let next = (p < 2).then(|| format!("n?p={}", p + 1));
                    Json(json!({"results": [{"id": p}], "links": {"next": next}}))
                }),
            )
            .route(
                "/l",
                get(|Query(q): Query<HashMap<String, String>>| async move {
                    let p = param(&q, "p", 0);
                    let mut h = HeaderMap::new();
                    if p < 2 {
                        let link =
                            format!("</l?p=0>; rel=\"first\", </l?p={}>; rel=\"next\"", p + 1);
                        h.insert("link", link.parse().unwrap());
                    }
                    (h, Json(json!([{"id": p}])))
                }),
            )
            .route(
                "/loop",
                get(|| async {
                    Json(json!({"results": [{"id": 1}], "links": {"next": "/loop2"}}))
                }),
            )
            .route(
                "/loop2",
                get(|| async { Json(json!({"results": [{"id": 2}], "links": {"next": "/loop"}})) }),
            );
        let base = serve(app).await;
        let cfg = extract(json!({"path": "/n", "records": "results",
            "paginate": {"type": "next_url", "next_url_path": "links.next"}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), vec![0, 1, 2]);
        let cfg = extract(json!({"path": "/l", "paginate": {"type": "link_header"}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), vec![0, 1, 2]);
        let cfg = extract(json!({"path": "/loop", "records": "results",
            "paginate": {"type": "next_url", "next_url_path": "links.next"}}));
        let err = run(cfg, &base).await.unwrap_err();
        assert!(err.message.contains("a second time"), "{}", err.message);
    }

    #[tokio::test]
    async fn has_more_false_stops() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = Router::new().route(
            "/h",
            get(move |Query(q): Query<HashMap<String, String>>| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    let p = param(&q, "page", 1);
                    Json(json!({"rows": [{"id": p}], "has_more": p < 3}))
                }
            }),
        );
        let base = serve(app).await;
        let cfg = extract(json!({"path": "/h", "records": "rows",
            "paginate": {"type": "page", "has_more_path": "has_more"}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), vec![1, 2, 3]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// `/r` answers the first call with `status` + `retry_after`, then one record.
    async fn flaky(status: StatusCode, retry_after: String) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = Router::new().route(
            "/r",
            get(move || {
                let c = c.clone();
                let retry_after = retry_after.clone();
                async move {
                    if c.fetch_add(1, Ordering::SeqCst) == 0 {
                        (status, [("retry-after", retry_after)], "slow down").into_response()
                    } else {
                        Json(json!([{"id": 1}])).into_response()
                    }
                }
            }),
        );
        (serve(app).await, calls)
    }

    #[tokio::test]
    async fn retry_after_in_seconds_and_as_a_date() {
        let (base, calls) = flaky(StatusCode::TOO_MANY_REQUESTS, "1".into()).await;
        let t = Instant::now();
        let (out, _) = run(extract(json!({"path": "/r"})), &base).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(ids(&out), vec![1]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let when = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
        let (base, calls) = flaky(StatusCode::SERVICE_UNAVAILABLE, when).await;
        let t = Instant::now();
        let (out, _) = run(extract(json!({"path": "/r"})), &base).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(out.outputs["retries"], 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retry_after_beyond_max_wait_fails_clearly() {
        let (base, _) = flaky(StatusCode::TOO_MANY_REQUESTS, "120".into()).await;
        let err = run(extract(json!({"path": "/r", "max_wait": "5s"})), &base)
            .await
            .unwrap_err();
        assert!(err.message.contains("Retry-After 2m00s"), "{}", err.message);
        assert!(err.message.contains("max_wait 5.0s"), "{}", err.message);
    }

    #[tokio::test]
    async fn ratelimit_headers_pause_until_reset() {
        let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let c = calls.clone();
        let app = Router::new().route(
            "/rl",
            get(move |Query(q): Query<HashMap<String, String>>| {
                let c = c.clone();
                async move {
                    c.lock().unwrap().push(Instant::now());
                    let p = param(&q, "page", 1);
                    let reset = (chrono::Utc::now() + chrono::Duration::seconds(1))
                        .with_timezone(&chrono::FixedOffset::west_opt(3 * 3600).unwrap())
                        .to_rfc3339();
                    let rows: Vec<Value> = if p <= 2 {
                        vec![json!({"id": p})]
                    } else {
                        vec![]
                    };
                    (
                        [
                            ("RateLimit-Remaining", "0".to_string()),
                            ("RateLimit-Reset", reset),
                        ],
                        Json(rows),
                    )
                }
            }),
        );
        let base = serve(app).await;
        let cfg = extract(json!({"path": "/rl", "paginate": {"type": "page"}}));
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out), vec![1, 2]);
        let times = calls.lock().unwrap().clone();
        assert_eq!(times.len(), 3);
        assert!(
            times[1] - times[0] >= Duration::from_millis(400),
            "{times:?}"
        );
    }

    #[tokio::test]
    async fn rate_limit_config_spaces_requests() {
        let f = Fake::new(25, Total::None);
        let base = start(&f).await;
        let mut cfg = page_cfg(5, 4, json!({}));
        cfg.rate_limit = Some(RateLimit {
            requests: 2,
            per: "300ms".into(),
        });
        let t = Instant::now();
        let (out, _) = run(cfg, &base).await.unwrap();
        assert_eq!(ids(&out).len(), 25);
        // 6 requests at 2 per 300 ms: at least two full windows of waiting.
        assert!(
            t.elapsed() >= Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn types_timestamps_and_flattening() {
        let app = Router::new().route(
            "/t",
            get(|| async {
                Json(json!([
                    {"ticket_number": 1, "created_at": "2024-03-10T21:30:00-03:00", "worked_hours": 1,
                     "is_closed": false, "status": {"id": 1, "name": "Open"}, "tags": ["a", "b"], "responsible": null},
                    {"ticket_number": 2, "created_at": "2024-03-11T08:00:00-03:00", "worked_hours": 2.5,
                     "is_closed": true, "status": {"id": 3, "name": "Done"}, "tags": [], "responsible": {"id": 7, "name": "Ana"}}
                ]))
            }),
        );
        let base = serve(app).await;
        let (out, _) = run(extract(json!({"path": "/t"})), &base).await.unwrap();
        let d = df(&out);
        assert_eq!(
            d.get_column_names_str(),
            [
                "ticket_number",
                "created_at",
                "worked_hours",
                "is_closed",
                "status_id",
                "status_name",
                "tags",
                "responsible_id",
                "responsible_name"
            ]
        );
        assert_eq!(
            d.column("created_at").unwrap().dtype(),
            &DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC))
        );
        let utc = chrono::DateTime::parse_from_rfc3339("2024-03-11T00:30:00Z")
            .unwrap()
            .timestamp_micros();
        assert_eq!(
            d.column("created_at")
                .unwrap()
                .datetime()
                .unwrap()
                .phys
                .get(0),
            Some(utc)
        );
        assert_eq!(
            d.column("worked_hours").unwrap().dtype(),
            &DataType::Float64
        );
        assert_eq!(d.column("is_closed").unwrap().dtype(), &DataType::Boolean);
        assert_eq!(
            d.column("tags").unwrap().str().unwrap().get(0),
            Some("[\"a\",\"b\"]")
        );
        let names = out.result["columns"].as_array().unwrap().len();
        assert_eq!(
            names, 10,
            "the result lists every column seen, parents included"
        );
    }

    #[tokio::test]
    async fn oauth2_token_is_cached_and_refreshed_on_401() {
        let issued = Arc::new(AtomicUsize::new(0));
        let i = issued.clone();
        let app = Router::new()
            .route(
                "/token",
                axum::routing::post(move |body: String| {
                    let i = i.clone();
                    async move {
                        assert!(body.contains("grant_type=client_credentials"), "{body}");
                        assert!(body.contains("client_secret=s3cr3t-"), "{body}");
                        let n = i.fetch_add(1, Ordering::SeqCst) + 1;
                        Json(json!({"access_token": format!("tok-{n}-abcdef"), "expires_in": 3600, "token_type": "bearer"}))
                    }
                }),
            )
            .route(
                "/data",
                get(|headers: HeaderMap| async move {
                    // The first token is revoked early.
                    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
                        Some("Bearer tok-1-abcdef") | None => {
                            (StatusCode::UNAUTHORIZED, "invalid_token").into_response()
                        }
                        Some(_) => Json(json!([{"id": 1}])).into_response(),
                    }
                }),
            );
        let base = serve(app).await;
        let auth = json!({"type": "oauth2", "grant": "client_credentials", "token_url": format!("{base}/token"),
            "client_id": "me", "client_secret": "s3cr3t-value"});
        let cfg = extract(json!({"path": "/data", "auth": auth}));
        // The steps of one worker share its token cache.
        let worker = Arc::new(engine::step::Resources::default());
        let step = |obs: &Arc<Collect>, worker: &Arc<engine::step::Resources>| {
            let mut c = ctx(obs, Some(json!({"type": "http", "base_url": base})));
            c.resources = worker.clone();
            c
        };
        let obs = Arc::new(Collect::default());
        let out = cfg.clone().run(step(&obs, &worker)).await.unwrap();
        assert_eq!(ids(&out), vec![1]);
        assert_eq!(
            issued.load(Ordering::SeqCst),
            2,
            "one refresh after the 401"
        );
        // The next step (or run) of the worker reuses the cached token, and its own
        // redactor learns it, though another run fetched it.
        let other_run = Arc::new(Collect::default());
        let c = step(&other_run, &worker);
        let out = cfg.clone().run(c.clone()).await.unwrap();
        assert_eq!(ids(&out), vec![1]);
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        assert_eq!(c.redactor.redact("tok-2-abcdef"), "***");
        // Other credentials for the same client never ride on that token.
        let mut wrong = auth.clone();
        wrong["client_secret"] = json!("s3cr3t-other");
        let other = extract(json!({"path": "/data", "auth": wrong}));
        other.run(step(&obs, &worker)).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 3);
        // Another worker has its own cache.
        cfg.run(step(&obs, &Arc::default())).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 4);
        for (_, m) in obs.rows().into_iter().chain(other_run.rows()) {
            assert!(!m.contains("tok-") && !m.contains("s3cr3t"), "{m}");
        }
    }

    #[tokio::test]
    async fn bearer_token_never_reaches_the_log() {
        let app = Router::new().route(
            "/echo",
            get(|headers: HeaderMap| async move {
                let auth = headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                (StatusCode::SERVICE_UNAVAILABLE, format!("you sent {auth}"))
            }),
        );
        let base = serve(app).await;
        let obs = Arc::new(Collect::default());
        let c = ctx(
            &obs,
            Some(json!({"type": "http", "base_url": base,
                "auth": {"type": "bearer", "token": "very-secret-token-123"}})),
        );
        let cfg = extract(json!({"path": "/echo", "retries": 1, "max_wait": "10ms"}));
        let err = cfg.run(c.clone()).await.unwrap_err();
        assert!(
            err.message.contains("you sent Bearer ***"),
            "{}",
            err.message
        );
        assert!(err.retryable);
        c.log(Level::Info, "the token is very-secret-token-123");
        let rows = obs.rows();
        assert!(rows.len() >= 2);
        for (_, m) in rows {
            assert!(!m.contains("very-secret-token-123"), "{m}");
        }
    }

    #[tokio::test]
    async fn configuration_mistakes_are_explained() {
        let base = "http://127.0.0.1:9";
        let problems = |v: Value| {
            extract(v)
                .problems()
                .into_iter()
                .map(|p| p.message)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let p = problems(json!({"path": "/x", "paginate": {"type": "offset"}}));
        assert!(p.contains("needs `size`"), "{p}");
        let p = problems(json!({"paginate": {"type": "cursor", "cursor_param": "c"}}));
        assert!(p.contains("cursor_path"), "{p}");
        let p = problems(json!({"paginate": {"type": "next_url"}}));
        assert!(p.contains("next_url_path"), "{p}");
        let p = problems(json!({"paginate": {"type": "cursor", "cursor_param": "c",
            "cursor_path": "a", "cursor_field": "id"}}));
        assert!(p.contains("only one of"), "{p}");
        let p = problems(json!({"paginate": {"type": "cursor", "cursor_param": "c",
            "cursor_field": "id", "concurrency": 4}}));
        assert!(p.contains("`concurrency` is only used"), "{p}");
        assert_eq!(
            problems(json!({"paginate": {"type": "page", "size": 5}})),
            ""
        );
        let obs = Arc::new(Collect::default());
        let err = extract(json!({"path": "/x"}))
            .run(ctx(&obs, None))
            .await
            .unwrap_err();
        assert!(
            err.message.contains("needs a connection"),
            "{}",
            err.message
        );
        let obs = Arc::new(Collect::default());
        let err = extract(json!({"path": "/x"}))
            .run(ctx(
                &obs,
                Some(json!({"type": "http", "base_url": base, "tokn": "x"})),
            ))
            .await
            .unwrap_err();
        assert!(err.message.contains("tokn"), "{}", err.message);
    }

    #[test]
    fn the_sketch_validates_with_templates() {
        use engine::de::{from_node, Mode};
        use engine::diag::Diags;
        let yaml = r#"
path: /api/v2/tickets
headers: { Authorization: "{{ steps.session.token }}" }
query:
  filter_by: all
  start_datetime: "{{ run.logical_date | isoformat }}"
auth: { type: oauth2, grant: password, token_url: "https://x/token", username: u, password: "{{ secret('P') }}" }
paginate:
  type: page
  page_param: offset
  first_page: 1
  size_param: limit
  size: "{{ params.size }}"
  total_header: X-Total-Items
  concurrency: 8
"#;
        let mut d = Diags::new("t.yaml");
        let node = engine::yaml::parse(yaml, &mut d).unwrap();
        let cfg: HttpExtract = from_node(&node, Mode::Check, &mut d).unwrap();
        assert!(
            d.items.is_empty(),
            "{:?}",
            d.items.iter().map(|i| &i.message).collect::<Vec<_>>()
        );
        assert_eq!(cfg.paginate.concurrency, Some(8));
        assert!(cfg
            .static_info()
            .secret_fields
            .contains(&"auth.password".to_string()));
        let bad = engine::yaml::parse("paginate: { type: page, sise: 3 }\n", &mut d).unwrap();
        let _ = from_node::<HttpExtract>(&bad, Mode::Check, &mut d);
        assert!(d.items.iter().any(|i| i.message.contains("sise")));
    }

    #[test]
    fn link_header_parsing() {
        assert_eq!(
            link_next(r#"<https://a/x?page=2>; rel="next", <https://a/x?page=9>; rel="last""#),
            Some("https://a/x?page=2".into())
        );
        assert_eq!(link_next(r#"<https://a/x?page=1>; rel="prev""#), None);
        assert_eq!(link_next("<u>; rel=next"), Some("u".into()));
    }

    #[test]
    fn schema_describes_every_field() {
        let mut g = schemars::SchemaGenerator::default();
        g.subschema_for::<HttpExtract>();
        let defs = serde_json::to_value(g.definitions()).unwrap();
        for def in ["HttpExtract", "Paginate", "RateLimit"] {
            for (name, prop) in defs[def]["properties"].as_object().unwrap() {
                assert!(
                    prop["description"].is_string(),
                    "{def}.{name} has no description"
                );
            }
        }
    }
}
