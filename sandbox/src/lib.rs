//! Local, faithful fakes of the external services `pipe` pipelines talk to, so that a
//! pipeline written for production runs offline, deterministically and fast
//! (`pipe run --sandbox`, `pipe sandbox serve`, and the test suites).
//!
//! Two HTTP servers on `127.0.0.1` random ports:
//! - the "Tiflux" port: the sandbox web login (`/api/login`, `/api/login/otp`,
//!   `/api/logout`) in front of the Tiflux v2 ticket API (`/api/v2/tickets`), plus
//!   `GET /__sandbox/stats` for out-of-process tests;
//! - the "Google" port: the OAuth2 token endpoint (`POST /token`, verifying real RS256
//!   JWTs signed with the generated service-account key), the Sheets v4 values API and
//!   BigQuery REST v2 (`/bigquery/v2`, `/upload/bigquery/v2`; tables persist as Parquet
//!   under [`Options::state_dir`], see [`bigquery`](crate::list_tables)).
//!
//! The wire shapes follow `/work/shared/api-contracts.md`: the same client code must
//! work against the real services, so the fakes answer with the real status codes,
//! headers and error bodies. Everything that could vary (credentials, OTPs, tickets,
//! which request a fault hits) derives from [`Options::seed`], so runs are repeatable.
//!
//! Why a hand-rolled accept loop instead of `axum::serve`: the `Reset` fault must drop
//! the connection without writing a response, which needs per-connection control of
//! the socket (see [`server`]).

mod bigquery;
mod carol;
mod demo_db;
mod faults;
mod google;
mod qockpit;
mod server;
mod tickets;
mod tiflux;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

pub use bigquery::{list_tables, TableSummary};
pub use carol::{
    CarolStats, DEFAULT_SENDING_LIMIT as CAROL_DEFAULT_SENDING_LIMIT,
    MAX_SENDING_LIMIT as CAROL_MAX_SENDING_LIMIT,
};

/// How the fakes behave. Every field has a default; `PIPE_SANDBOX` may set any subset.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Options {
    /// All generated data (credentials, OTPs, tickets, fault decisions) derives from it.
    pub seed: u64,
    /// Number of tickets in all.
    pub tickets: usize,
    /// Tickets' `created_at` spread over the 365 days before this instant.
    pub anchor: DateTime<Utc>,
    /// After a first-factor login, the OTP row is written to the sheet after this delay.
    pub otp_delay_ms: u64,
    /// Added to every tickets request.
    pub latency_ms: u64,
    /// Injected failures.
    pub faults: Vec<Fault>,
    /// Where to write the service-account key file (default: a temp dir kept while the
    /// [`Sandbox`] lives).
    pub dir: Option<PathBuf>,
    /// pipe's state directory: the BigQuery fake keeps its tables under
    /// `<state_dir>/sandbox/bigquery/<project>/<dataset>/<table>.parquet` (default: a temp
    /// dir kept while the [`Sandbox`] lives).
    pub state_dir: Option<PathBuf>,
    /// BigQuery `jobs.get` / `getQueryResults` report a new job PENDING, then RUNNING, for
    /// this many polls before DONE (0: DONE at once), to exercise pollers.
    pub bigquery_job_polls: u32,
    /// Carol: `expires_in` of the access tokens the fake issues, in seconds.
    pub carol_token_ttl_s: u64,
    /// Carol: the sending limit (`GET /api/v3/staging/sendingLimit`) in bytes; a send body
    /// above it (as received, compressed) is answered 413.
    pub carol_sending_limit_bytes: u64,
    /// How `/api/v2/tickets` pages, and the habits of hostile APIs it may take on (default:
    /// the Tiflux contract).
    pub tickets_api: TicketsApi,
}

/// How `/api/v2/tickets` pages and which hostile habits it has (all off by default).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketsApi {
    pub paging: Paging,
    /// Serve at most this many tickets a page whatever `limit` asks, without saying so
    /// (GitHub clamps `per_page` to 100).
    pub max_page_size: Option<usize>,
    /// A fixed-window rate limit: beyond `requests` in a window of `window_ms` (windows
    /// count from the fake's start), 429 with `Retry-After` (whole seconds to the
    /// window's end).
    pub rate_limit: Option<WindowLimit>,
}

/// How the tickets endpoint addresses pages. Every style sends `X-Total-Items`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Paging {
    /// Tiflux: `offset` is the 1-based page number, `limit` its size; the body is the list.
    #[default]
    Page,
    /// `offset` is the number of tickets to skip; the body is the list.
    Offset,
    /// `cursor` is the previous page's `next_cursor` (none: the first page); the body is
    /// `{"data": [...], "next_cursor": "..." | null}`.
    Cursor,
    /// Stripe: `starting_after` is the `ticket_number` of the previous page's last ticket;
    /// the body is `{"object": "list", "data": [...], "has_more": bool}`.
    Stripe,
}

/// At most `requests` per `window_ms`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowLimit {
    pub requests: u64,
    pub window_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 42,
            tickets: 1000,
            anchor: Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap(),
            otp_delay_ms: 300,
            latency_ms: 0,
            faults: Vec::new(),
            dir: None,
            state_dir: None,
            bigquery_job_polls: 0,
            carol_token_ttl_s: 3600,
            carol_sending_limit_bytes: carol::DEFAULT_SENDING_LIMIT,
            tickets_api: TicketsApi::default(),
        }
    }
}

impl Options {
    /// `PIPE_SANDBOX` (a JSON object of these fields, partial is fine), else the defaults.
    pub fn from_env() -> anyhow::Result<Options> {
        match std::env::var("PIPE_SANDBOX") {
            Ok(s) if !s.trim().is_empty() => serde_json::from_str(&s)
                .context("PIPE_SANDBOX must be a JSON object of sandbox options"),
            _ => Ok(Options::default()),
        }
    }
}

fn one() -> f64 {
    1.0
}

/// One injected failure rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fault {
    /// "tickets" | "login" | "otp" | "logout" | "token" | "sheets" | "bigquery" (every
    /// BigQuery call, uploads and jobs included) | "bigquery_upload" | "bigquery_jobs"
    /// (jobs.insert, jobs.get, jobs.query, getQueryResults) | "qockpit" (all three of
    /// "qockpit_ping", "qockpit_integrations", "qockpit_results").
    pub endpoint: String,
    pub kind: FaultKind,
    /// Probability; decided by a hash of (seed, endpoint, request key, attempt), so the
    /// same requests fail on every run.
    #[serde(default = "one")]
    pub rate: f64,
    /// Only this tickets page: its `offset` (page number) in the Tiflux style; in the other
    /// [`Paging`] styles the page number it would have (the cursor's page; skip / limit + 1).
    #[serde(default)]
    pub page: Option<u32>,
    /// Only the first N attempts of each matching request key.
    #[serde(default)]
    pub times: Option<u32>,
}

/// What an injected failure does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status and the endpoint's error body.
    Status { code: u16 },
    /// 429 with `Retry-After: <seconds>`.
    RetryAfterSeconds { seconds: u64 },
    /// 429 with `Retry-After: <HTTP-date now + seconds>`.
    RetryAfterDate { seconds: u64 },
    /// Drop the connection without a response.
    Reset,
    /// Send a `Content-Length` larger than the body, then close.
    Truncate,
    /// Trickle the body slowly (`ms` between chunks).
    SlowBody { ms: u64 },
    /// Delay the request by `ms` (then look at the next matching fault, if any).
    Latency { ms: u64 },
    /// 401 `invalid_token` (in the endpoint's error shape).
    Unauthorized,
    /// Tickets: the page holds no tickets but carries on (the next cursor, `has_more`,
    /// the total as if it were full), as APIs that filter after paging do.
    EmptyPage,
    /// Tickets: the page holds only its first `records` tickets and carries on right after
    /// them (the next cursor / `has_more` follow the tickets actually sent).
    ShortPage { records: usize },
    /// A 200 whose JSON list body is `bytes` long, streamed without a `Content-Length`.
    OversizedBody { bytes: u64 },
    /// BigQuery: the next matching load or query job ends DONE with this `errorResult`
    /// (jobs.query answers with this error). Use with `times: 1` for "the next job".
    JobError { reason: String, message: String },
}

/// What the fakes received.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Requests per endpoint (faulted ones included).
    pub requests: BTreeMap<String, u64>,
    /// Highest number of concurrent requests per endpoint.
    pub max_in_flight: BTreeMap<String, u64>,
    /// Successful OTP logins (sessions opened).
    pub logins: u64,
    /// Successful logouts.
    pub logouts: u64,
    /// Tiflux sessions still alive (opened, neither logged out nor expired).
    pub live_tokens: u64,
    /// Media bytes received by BigQuery load uploads (multipart and resumable).
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// What the Carol fake received.
    #[serde(default)]
    pub carol: CarolStats,
    /// Tickets requests answered 429 by `tickets_api.rate_limit`.
    #[serde(default)]
    pub rate_limited: u64,
}

/// Counters behind [`Stats`].
#[derive(Default)]
pub(crate) struct Counters {
    requests: BTreeMap<String, u64>,
    in_flight: HashMap<String, u64>,
    max_in_flight: BTreeMap<String, u64>,
    logins: u64,
    logouts: u64,
    rate_limited: u64,
    /// `tickets_api.rate_limit`: (window number, requests in it).
    window: (u64, u64),
}

/// Decrements the in-flight count of an endpoint when the request is done.
pub(crate) struct InFlight {
    shared: Arc<Shared>,
    endpoint: &'static str,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut c = self.shared.counters.lock().unwrap();
        if let Some(n) = c.in_flight.get_mut(self.endpoint) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The state both servers share.
pub(crate) struct Shared {
    pub opts: Options,
    pub user: String,
    pub password: String,
    pub otp_sheet: String,
    pub token_uri: String,
    pub client_email: String,
    pub tickets: tickets::Generator,
    pub tiflux: tiflux::Sessions,
    pub google: google::Store,
    pub bigquery: bigquery::Store,
    pub carol: carol::Store,
    pub qockpit: qockpit::Platform,
    pub counters: Mutex<Counters>,
    /// (endpoint, request key) → attempts so far.
    pub attempts: Mutex<HashMap<(String, String), u32>>,
    pub background: Mutex<Vec<JoinHandle<()>>>,
    pub login_count: AtomicU64,
    /// When the server started (`tickets_api.rate_limit` windows count from here).
    pub started: std::time::Instant,
}

impl Shared {
    pub(crate) fn enter(self: &Arc<Self>, endpoint: &'static str) -> InFlight {
        let mut c = self.counters.lock().unwrap();
        *c.requests.entry(endpoint.to_string()).or_default() += 1;
        let n = c.in_flight.entry(endpoint.to_string()).or_default();
        *n += 1;
        let n = *n;
        let max = c.max_in_flight.entry(endpoint.to_string()).or_default();
        *max = (*max).max(n);
        InFlight {
            shared: self.clone(),
            endpoint,
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = self.counters.lock().unwrap();
        Stats {
            requests: c.requests.clone(),
            max_in_flight: c.max_in_flight.clone(),
            logins: c.logins,
            logouts: c.logouts,
            live_tokens: self.tiflux.live(),
            bytes_uploaded: self
                .bigquery
                .bytes_uploaded
                .load(std::sync::atomic::Ordering::Relaxed),
            carol: self.carol.stats(),
            rate_limited: c.rate_limited,
        }
    }

    /// `tickets_api.rate_limit`: `None` when the request is within the window's budget,
    /// else the seconds to the window's end (the request is counted as rate limited).
    pub(crate) fn over_rate_limit(&self) -> Option<u64> {
        let limit = self.opts.tickets_api.rate_limit?;
        let window_ms = limit.window_ms.max(1);
        let elapsed = self.started.elapsed().as_millis() as u64;
        let window = elapsed / window_ms;
        let mut c = self.counters.lock().unwrap();
        if c.window.0 != window {
            c.window = (window, 0);
        }
        c.window.1 += 1;
        if c.window.1 <= limit.requests {
            return None;
        }
        c.rate_limited += 1;
        let left_ms = (window + 1) * window_ms - elapsed;
        Some(left_ms.div_ceil(1000).max(1))
    }

    pub(crate) fn count_login(&self) {
        self.counters.lock().unwrap().logins += 1;
    }

    pub(crate) fn count_logout(&self) {
        self.counters.lock().unwrap().logouts += 1;
    }
}

/// Deterministic 64-bit mixing (splitmix64): the fakes' only source of "randomness" for
/// data, so the same seed gives byte-identical answers on every platform.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Hash of a seed and a few words.
pub(crate) fn hash(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix(seed), |h, p| mix(h ^ mix(*p)))
}

/// FNV-1a of a string, for hashing request keys.
pub(crate) fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A hash as a number in [0, 1).
pub(crate) fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A random (not seeded) opaque token: credentials issued at run time need not repeat.
pub(crate) fn random_token(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// The running fakes. Dropping it stops them too; [`Sandbox::shutdown`] also waits.
pub struct Sandbox {
    shared: Arc<Shared>,
    tiflux_url: String,
    google_url: String,
    carol_url: String,
    qockpit_url: String,
    demo_db: PathBuf,
    key_file: PathBuf,
    servers: Vec<JoinHandle<()>>,
    _tempdir: Option<tempfile::TempDir>,
    _state_tempdir: Option<tempfile::TempDir>,
}

impl Sandbox {
    /// Bind both servers on `127.0.0.1:0`, write the service-account key file and serve.
    pub async fn start(opts: Options) -> anyhow::Result<Sandbox> {
        for f in &opts.faults {
            anyhow::ensure!(
                faults::ENDPOINTS.contains(&f.endpoint.as_str()),
                "fault endpoint `{}` is not one of {}",
                f.endpoint,
                faults::ENDPOINTS.join(", ")
            );
        }
        let tiflux_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Tiflux fake")?;
        let google_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Google fake")?;
        let qockpit_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the QOCKPIT fake")?;
        let qockpit_url = format!(
            "http://{}{}",
            qockpit_listener.local_addr()?,
            qockpit::BASE_PATH
        );
        let carol_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Carol fake")?;
        let carol_url = format!("http://{}", carol_listener.local_addr()?);
        let tiflux_url = format!("http://{}", tiflux_listener.local_addr()?);
        let google_url = format!("http://{}", google_listener.local_addr()?);
        let token_uri = format!("{google_url}/token");

        let (dir, tempdir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("pipe-sandbox-")
                    .tempdir()
                    .context("creating a temp dir")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let seed = opts.seed;
        let demo_db = {
            let (dir, anchor) = (dir.clone(), opts.anchor);
            tokio::task::spawn_blocking(move || demo_db::create(&dir, seed, anchor))
                .await
                .context("building the demo database")??
        };
        let key = google::ServiceAccount::new(seed, &google_url);
        let key_file = dir.join("sandbox-service-account.json");
        std::fs::write(&key_file, serde_json::to_string_pretty(&key.json())?)
            .with_context(|| format!("writing {}", key_file.display()))?;

        let (state_dir, state_tempdir) = match &opts.state_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("pipe-sandbox-state-")
                    .tempdir()
                    .context("creating a temp dir")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let bigquery_root = state_dir.join("sandbox").join("bigquery");
        let bigquery = bigquery::Store::new(
            bigquery_root.clone(),
            key.project_id.clone(),
            opts.bigquery_job_polls,
        )
        .with_context(|| {
            format!(
                "opening the BigQuery fake's tables in {}",
                bigquery_root.display()
            )
        })?;
        let otp_sheet = google::spreadsheet_id(seed);
        let shared = Arc::new(Shared {
            user: "analyst@example.com".to_string(),
            password: format!("sbx-{:012x}", hash(seed, &[0x7061_7373]) & 0xffff_ffff_ffff),
            otp_sheet: otp_sheet.clone(),
            token_uri,
            client_email: key.client_email.clone(),
            tickets: tickets::Generator::new(seed, opts.tickets, opts.anchor),
            tiflux: tiflux::Sessions::default(),
            google: google::Store::new(&otp_sheet)?,
            bigquery,
            carol: carol::Store::new(seed, opts.carol_token_ttl_s, opts.carol_sending_limit_bytes),
            qockpit: qockpit::Platform::new(seed),
            counters: Mutex::new(Counters::default()),
            attempts: Mutex::new(HashMap::new()),
            background: Mutex::new(Vec::new()),
            login_count: AtomicU64::new(0),
            started: std::time::Instant::now(),
            opts,
        });

        // Carol holds the previous sync of the demo ERP's issuers (staging table `emitente`).
        let previous = demo_db::previous_carol_sync(&demo_db, shared.opts.anchor)
            .context("reading the demo database")?;
        shared.carol.preload(
            "emitente",
            serde_json::json!({
                "mdmStagingType": "emitente",
                "mdmFlexible": "false",
                "mdmExportData": "false",
                "mdmStagingMapping": {"properties": {
                    "cod-emitente": {"type": "integer"},
                    "cgc": {"type": "string"},
                    "nome-emit": {"type": "string"},
                    "cidade": {"type": "string"},
                    "atualizado-em": {"type": "string"},
                }},
                "mdmCrosswalkTemplate": {"mdmCrossreference": {"emitente": ["cod-emitente"]}},
            }),
            vec!["cod-emitente".to_string()],
            &previous,
        );

        let servers = vec![
            tokio::spawn(server::serve(
                tiflux_listener,
                tiflux::router(shared.clone()),
            )),
            tokio::spawn(server::serve(
                google_listener,
                google::router(shared.clone()),
            )),
            tokio::spawn(server::serve(carol_listener, carol::router(shared.clone()))),
            tokio::spawn(server::serve(
                qockpit_listener,
                qockpit::router(shared.clone()),
            )),
        ];
        Ok(Sandbox {
            shared,
            tiflux_url,
            google_url,
            carol_url,
            qockpit_url,
            demo_db,
            key_file,
            servers,
            _tempdir: tempdir,
            _state_tempdir: state_tempdir,
        })
    }

    /// `http://127.0.0.1:PORT`: the web login and `/api/v2/tickets`.
    pub fn tiflux_url(&self) -> String {
        self.tiflux_url.clone()
    }

    /// `http://127.0.0.1:PORT`: `POST /token` and `/v4/spreadsheets/...`.
    pub fn google_url(&self) -> String {
        self.google_url.clone()
    }

    /// `google_url` + `/bigquery/v2`: the BigQuery REST base.
    pub fn bigquery_url(&self) -> String {
        format!("{}/bigquery/v2", self.google_url)
    }

    /// `google_url` + `/upload/bigquery/v2`: BigQuery media uploads (load jobs).
    pub fn upload_url(&self) -> String {
        format!("{}/upload/bigquery/v2", self.google_url)
    }

    /// The project of the generated key (`project_id`); the BigQuery fake accepts any.
    pub fn bigquery_project(&self) -> String {
        self.shared.bigquery.project.clone()
    }

    /// `http://127.0.0.1:PORT/api`: the QOCKPIT platform's `BASE_ENDPOINT` (its endpoints
    /// are under `/{domain}/`).
    pub fn qockpit_url(&self) -> String {
        self.qockpit_url.clone()
    }

    /// The demo SQLite database (`vendas`, `atendimentos`, `clientes`, `emitente`) that the
    /// QOCKPIT integrations' SQL and the Carol staging pipeline read.
    pub fn demo_db(&self) -> &Path {
        &self.demo_db
    }

    /// What the QOCKPIT platform received: `{"<integration id>": {"<period>": {"rows":
    /// [...], "received": N, "posts": P}}}` (the last rows sent for the period; `posts`
    /// counts how often it was sent). Also `GET /__sandbox/qockpit` on its port.
    pub fn qockpit_results(&self) -> serde_json::Value {
        self.shared.qockpit.results()
    }

    /// The generated service-account key JSON (`token_uri` = google_url + "/token").
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// The values pipelines' `sandbox:` blocks template over.
    pub fn values(&self) -> serde_json::Value {
        serde_json::json!({
            "tiflux": {
                "url": self.tiflux_url,
                "user": self.shared.user,
                "password": self.shared.password,
            },
            "google": {
                "url": self.google_url,
                "token_uri": self.shared.token_uri,
                "key_file": self.key_file.display().to_string(),
                "sheets_url": format!("{}/", self.google_url),
            },
            "sheets": {
                "otp_spreadsheet": self.shared.otp_sheet,
                "otp_range": tiflux::OTP_RANGE,
            },
            "bigquery": {
                "url": self.bigquery_url(),
                "upload_url": self.upload_url(),
                "project": self.shared.bigquery.project,
            },
            "carol": {
                "url": self.carol_url,
                "tenant": self.shared.carol.tenant,
                "organization": self.shared.carol.organization,
                "connector_id": self.shared.carol.connector_id,
                "connector_name": self.shared.carol.connector_name,
                "username": self.shared.carol.username,
                "password": self.shared.carol.password,
                "api_key": self.shared.carol.api_key,
            },
            "qockpit": {
                "base_endpoint": self.qockpit_url,
                "domain": self.shared.qockpit.domain,
                "api_token": self.shared.qockpit.api_token,
            },
            "demo_db": {
                "path": self.demo_db.display().to_string(),
            },
        })
    }

    /// `http://127.0.0.1:PORT`: the Carol fake (`/api/...`, `GET /__sandbox/carol`).
    pub fn carol_url(&self) -> String {
        self.carol_url.clone()
    }

    /// The records the Carol fake holds in a staging table (first-insertion order).
    pub fn carol_records(&self, table: &str) -> Vec<serde_json::Value> {
        self.shared.carol.records(table)
    }

    /// The Carol fake's whole state (tables with schema, crosswalk and record count, or
    /// the records too; batches; stats), as `GET /__sandbox/carol` gives it.
    pub fn carol_state(&self, with_records: bool) -> serde_json::Value {
        self.shared.carol.dump(with_records)
    }

    /// A Carol staging table's schema as stored.
    pub fn carol_schema(&self, table: &str) -> Option<serde_json::Value> {
        self.shared.carol.schema(table)
    }

    /// The last heartbeat the Carol fake received for a connector.
    pub fn carol_heartbeat(&self, connector_id: &str) -> Option<serde_json::Value> {
        self.shared.carol.heartbeat(connector_id)
    }

    /// The Carol batch summaries received, each with what arrived under its batch id and
    /// `matches` (newer pycarol's intake sends end with one).
    pub fn carol_batch_summaries(&self) -> Vec<serde_json::Value> {
        self.shared.carol.summaries()
    }

    /// Expire every Carol access token now (to exercise refresh).
    pub fn carol_expire_tokens(&self) {
        self.shared.carol.expire_tokens()
    }

    /// What the fakes received so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stop serving and wait for the servers to finish.
    pub async fn shutdown(mut self) {
        let handles: Vec<_> = self
            .servers
            .drain(..)
            .chain(self.shared.background.lock().unwrap().drain(..))
            .collect();
        for h in &handles {
            h.abort();
        }
        for h in handles {
            let _ = h.await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for h in &self.servers {
            h.abort();
        }
        for h in self.shared.background.lock().unwrap().iter() {
            h.abort();
        }
    }
}
