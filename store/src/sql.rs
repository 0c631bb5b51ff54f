//! The store's logic, written once over a tiny SQL interface that both backends implement
//! ([`Backend`], [`Tx`]): statements use `?1 ?2 …` placeholders (PostgreSQL's `$1` is
//! substituted by its backend), values are [`Value`]s (integers, text, null), times are
//! RFC 3339 UTC text with milliseconds (which sorts as text, in both databases), booleans are
//! integers. What differs (locking, `FOR UPDATE SKIP LOCKED`, DDL) is asked of the
//! [`Dialect`].

use crate::error::Context as _;
use crate::*;
use chrono::{DateTime, SecondsFormat, Utc};
use engine::host::{owner_alive, owner_liveness, Liveness};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    /// A PostgreSQL array parameter (`?1::text[]`, `bigint[]`, `bool[]`) of scalars, for
    /// the multi-row statements of the PostgreSQL planner; never a result, never SQLite's.
    List(Vec<Value>),
}

impl Value {
    fn list<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::List(items.into_iter().map(Into::into).collect())
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<DateTime<Utc>> for Value {
    fn from(v: DateTime<Utc>) -> Self {
        Value::Text(ts(v))
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*][..] };
}
pub(crate) use p;

/// One result row.
pub(crate) struct Row(pub Vec<Value>);

impl Row {
    fn get(&self, i: usize) -> Result<&Value> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("result has no column {i}")))
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.get(i)? {
            Value::Null => Ok(None),
            Value::Int(n) => Ok(Some(*n)),
            Value::Text(t) => t
                .parse()
                .map(Some)
                .map_err(|_| bad(format!("column {i}: `{t}` is not an integer"))),
            Value::List(_) => Err(bad(format!("column {i} is a list"))),
        }
    }
    pub fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| bad(format!("column {i} is null")))
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.get(i)? {
            Value::Null => Ok(None),
            Value::Int(n) => Ok(Some(n.to_string())),
            Value::Text(t) => Ok(Some(t.clone())),
            Value::List(_) => Err(bad(format!("column {i} is a list"))),
        }
    }
    pub fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| bad(format!("column {i} is null")))
    }
    pub fn opt_time(&self, i: usize) -> Result<Option<DateTime<Utc>>> {
        self.opt_text(i)?.map(|t| parse_time(&t)).transpose()
    }
    pub fn time(&self, i: usize) -> Result<DateTime<Utc>> {
        parse_time(&self.text(i)?)
    }
    pub fn parsed<T: FromStr<Err = String>>(&self, i: usize) -> Result<T> {
        self.text(i)?.parse().map_err(bad)
    }
    pub fn json(&self, i: usize) -> Result<serde_json::Value> {
        Ok(parse_json(self.opt_text(i)?.as_deref()))
    }
    pub fn u32(&self, i: usize) -> Result<u32> {
        Ok(u32::try_from(self.int(i)?.max(0)).unwrap_or(u32::MAX))
    }
    pub fn opt_u32(&self, i: usize) -> Result<Option<u32>> {
        Ok(self
            .opt_int(i)?
            .map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX)))
    }
    pub fn opt_u64(&self, i: usize) -> Result<Option<u64>> {
        Ok(self.opt_int(i)?.map(|n| n.max(0) as u64))
    }
    pub fn bool(&self, i: usize) -> Result<bool> {
        Ok(self.opt_int(i)?.unwrap_or(0) != 0)
    }
}

fn bad(msg: impl Into<String>) -> StoreError {
    StoreError::Backend(anyhow::anyhow!(
        "unreadable value in the store: {}",
        msg.into()
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A transaction of either backend.
pub(crate) trait Tx {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64>;
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// This transaction queued something: wake [`RunStore::wait_for_queue`] of every
    /// process once it commits (PostgreSQL: one `NOTIFY` per transaction, however many
    /// items; SQLite: nothing, its waiters poll).
    fn queue_changed(&mut self) -> Result<()> {
        Ok(())
    }
    fn one(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// What a transaction does (`Send`: the PostgreSQL backend may run it on another thread).
pub(crate) type Work<'a, T> = dyn FnMut(&mut dyn Tx) -> Result<T> + Send + 'a;

/// A backend: runs closures in write or read transactions, retrying on contention.
pub(crate) trait Backend: Send + Sync + 'static {
    const DIALECT: Dialect;
    /// A write transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: read committed), tried
    /// again from the start while it fails on contention (busy, deadlock, serialization).
    fn write<T: Send>(&self, f: &mut Work<'_, T>) -> Result<T>;
    /// A read transaction (one snapshot for all its statements).
    fn read<T: Send>(&self, f: &mut Work<'_, T>) -> Result<T>;
    /// Whether the error is contention that trying again may cure.
    fn is_contention(e: &StoreError) -> bool;
    /// See [`RunStore::wait_for_queue`].
    fn wait_for_queue(&self, timeout: Duration) -> Result<bool> {
        std::thread::sleep(timeout);
        Ok(false)
    }
    /// How many grouped write transactions may be in flight at once ([`crate::group`]).
    const GROUP_LEADERS: usize;
    fn describe(&self) -> String;
    fn schema_version(&self) -> Result<u32>;
}

/// The store over a backend.
pub(crate) struct SqlStore<B: Backend> {
    pub backend: B,
    pub state_dir: PathBuf,
    /// The short writes of a run's life (claim, run row, event batches, ack) share commits
    /// with those of the other threads writing at the same time.
    pub group: crate::group::Group,
}

/// The content address of a pipeline text in `pipeline_sources`.
fn source_hash(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Store the text at its hash unless it is there already.
fn put_source(tx: &mut dyn Tx, hash: &str, text: &str) -> Result<()> {
    tx.exec(
        "INSERT INTO pipeline_sources(hash, text) VALUES (?1, ?2) ON CONFLICT(hash) DO NOTHING",
        p![hash, text],
    )?;
    Ok(())
}

impl<B: Backend> std::fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunStore({})", self.backend.describe())
    }
}

/// Times are stored as RFC 3339 UTC text with milliseconds, which sorts as text.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| bad(format!("bad time `{s}`: {e}")))
}

fn parse_json(text: Option<&str>) -> serde_json::Value {
    match text {
        Some(t) => serde_json::from_str(t).unwrap_or_else(|_| serde_json::Value::String(t.into())),
        None => serde_json::Value::Null,
    }
}

fn json_text(v: &serde_json::Value) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

fn plus(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(1))
}

fn limit_value(limit: usize) -> i64 {
    if limit == 0 {
        i64::MAX
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

const RUN_COLUMNS: &str = r#"id, pipeline, status, "trigger", owner, params, started_at, finished_at,
    logical_date, error, pid, attempt, lease_owner, queue_item, fence"#;

fn run_row(r: &Row) -> Result<RunRow> {
    let started_at = r.time(6)?;
    let finished_at = r.opt_time(7)?;
    Ok(RunRow {
        id: r.int(0)?,
        pipeline: r.text(1)?,
        status: r.parsed(2)?,
        trigger: r.parsed(3)?,
        owner: r.parsed(4)?,
        params: r.json(5)?,
        started_at,
        finished_at,
        duration_ms: finished_at.map(|f| (f - started_at).num_milliseconds().max(0) as u64),
        logical_date: r.opt_time(8)?,
        error: r.opt_text(9)?,
        pid: r.opt_int(10)?,
        attempt: r.opt_u32(11)?.unwrap_or(1),
        lease_owner: r.opt_text(12)?,
        queue_item: r.opt_int(13)?,
        fence: r.opt_int(14)?,
    })
}

const STEP_COLUMNS: &str = r#"step, run_attempt, kind, status, attempts, started_at, finished_at,
    duration_ms, "rows", error, outputs"#;

fn step_row(r: &Row) -> Result<StepRow> {
    Ok(StepRow {
        step: r.text(0)?,
        run_attempt: r.opt_u32(1)?.unwrap_or(1),
        kind: r.opt_text(2)?,
        status: r.parsed(3)?,
        attempts: r.u32(4)?,
        started_at: r.opt_time(5)?,
        finished_at: r.opt_time(6)?,
        duration_ms: r.opt_u64(7)?,
        rows: r.opt_u64(8)?,
        error: r.opt_text(9)?,
        outputs: r.json(10)?,
    })
}

const QUEUE_COLUMNS: &str = r#"id, integration, queue, priority, "trigger", logical_date, params,
    dedup_key, backfill_id, state, enqueued_at, claimed_by, claimed_at, claim_expires_at,
    run_id, finished_at, published_at, fence"#;

fn queue_row(r: &Row) -> Result<QueueItem> {
    Ok(QueueItem {
        id: r.int(0)?,
        integration: r.text(1)?,
        queue: r.text(2)?,
        priority: r.int(3)?,
        trigger: r.parsed(4)?,
        logical_date: r.opt_time(5)?,
        params: r.json(6)?,
        dedup_key: r.opt_text(7)?,
        backfill_id: r.opt_int(8)?,
        state: r.parsed(9)?,
        enqueued_at: r.time(10)?,
        claimed_by: r.opt_text(11)?,
        claimed_at: r.opt_time(12)?,
        claim_expires_at: r.opt_time(13)?,
        run_id: r.opt_int(14)?,
        finished_at: r.opt_time(15)?,
        published_at: r.opt_time(16)?,
        fence: r.opt_int(17)?.unwrap_or(0),
    })
}

const INTEGRATION_COLUMNS: &str = r#"i.name, i.description, i.enabled, i.resumed_at, i.path,
    i.content_hash, i.metadata, i.queue, i.priority, i.max_concurrent_runs, i.loaded_at,
    i.load_error, i.load_error_at, i.removed, i.next_run_at,
    r.id, r.status, r."trigger", r.started_at, r.finished_at"#;

fn integration_row(r: &Row) -> Result<Integration> {
    let last_run = match r.opt_int(15)? {
        Some(id) => Some(LastRun {
            id,
            status: r.parsed(16)?,
            trigger: r.parsed(17)?,
            started_at: r.time(18)?,
            finished_at: r.opt_time(19)?,
        }),
        None => None,
    };
    let metadata = match r.opt_text(6)? {
        Some(t) => parse_json(Some(&t)),
        None => serde_json::Value::Object(Default::default()),
    };
    Ok(Integration {
        name: r.text(0)?,
        description: r.opt_text(1)?,
        enabled: r.bool(2)?,
        resumed_at: r.opt_time(3)?,
        path: r.opt_text(4)?,
        content_hash: r.opt_text(5)?,
        metadata,
        queue: r.opt_text(7)?.unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
        priority: r.opt_int(8)?.unwrap_or(0),
        max_concurrent_runs: r.opt_u32(9)?,
        loaded_at: r.opt_time(10)?,
        load_error: r.opt_text(11)?,
        load_error_at: r.opt_time(12)?,
        removed: r.bool(13)?,
        next_run_at: r.opt_time(14)?,
        last_run,
    })
}

const LEASE_COLUMNS: &str =
    "name, kind, owner, host, pid, acquired_at, heartbeat_at, expires_at, host_identity, pid_start";

fn lease_row(r: &Row) -> Result<LeaseRow> {
    Ok(LeaseRow {
        name: r.text(0)?,
        kind: r.parsed(1)?,
        owner: r.text(2)?,
        host: r.opt_text(3)?,
        pid: r.opt_int(4)?,
        acquired_at: r.time(5)?,
        heartbeat_at: r.time(6)?,
        expires_at: r.time(7)?,
    })
}

/// A stored owner lease, as `expire_lost` and `finish_run` judge it.
struct StoredLease {
    expires_at: DateTime<Utc>,
    host: Option<String>,
    host_identity: Option<String>,
    pid: Option<i64>,
    pid_start: Option<String>,
    role: Option<String>,
}

impl StoredLease {
    /// The owner lives in this boot and pid namespace and its pid is gone (or reused).
    fn provably_dead(&self) -> bool {
        self.host_identity.is_some()
            && self.host_identity == engine::host::host_identity()
            && !owner_alive(self.pid, self.pid_start.as_deref())
    }
    fn lost(&self, now: DateTime<Utc>) -> bool {
        self.expires_at < now || self.provably_dead()
    }
    fn label(&self) -> String {
        format!(
            "{}@{}:{}",
            self.role.as_deref().unwrap_or("pipe"),
            self.host.as_deref().unwrap_or("?"),
            self.pid.map_or_else(|| "?".to_string(), |p| p.to_string())
        )
    }
}

fn owner_leases(tx: &mut dyn Tx) -> Result<HashMap<String, StoredLease>> {
    let rows = tx.query(
        "SELECT name, expires_at, host, host_identity, pid, pid_start, role
         FROM leases WHERE kind = 'owner'",
        p![],
    )?;
    let mut out = HashMap::new();
    for r in rows {
        out.insert(
            r.text(0)?,
            StoredLease {
                expires_at: r.time(1)?,
                host: r.opt_text(2)?,
                host_identity: r.opt_text(3)?,
                pid: r.opt_int(4)?,
                pid_start: r.opt_text(5)?,
                role: r.opt_text(6)?,
            },
        );
    }
    Ok(out)
}

fn owner_lease(tx: &mut dyn Tx, id: &str) -> Result<Option<StoredLease>> {
    let r = tx.one(
        "SELECT name, expires_at, host, host_identity, pid, pid_start, role
         FROM leases WHERE kind = 'owner' AND name = ?1",
        p![id],
    )?;
    r.map(|r| {
        Ok(StoredLease {
            expires_at: r.time(1)?,
            host: r.opt_text(2)?,
            host_identity: r.opt_text(3)?,
            pid: r.opt_int(4)?,
            pid_start: r.opt_text(5)?,
            role: r.opt_text(6)?,
        })
    })
    .transpose()
}

/// A new run's row (`?1`…`?14`: pipeline, params, trigger, started, logical date, pid, pid
/// start, owner, host, lease owner, queue item, fence, source hash, source path; the hash
/// is referenced only when `pipeline_sources` holds it), returning its id and whether the
/// hash was.
const INSERT_RUN: &str = r#"INSERT INTO runs(pipeline, params, "trigger", status, started_at,
                       logical_date, pid, pid_start, owner, host, attempt,
                       lease_owner, queue_item, fence, source_hash, source_path)
       VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10, ?11,
               COALESCE(?12, (SELECT fence FROM queue WHERE id = ?11)),
               (SELECT hash FROM pipeline_sources WHERE hash = ?13), ?14)
       RETURNING id, source_hash IS NOT NULL AS kept"#;

fn ensure_integration(tx: &mut dyn Tx, name: &str) -> Result<()> {
    let created = tx.exec(
        "INSERT INTO integrations(name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
        p![name],
    )?;
    if created > 0 {
        bump_integrations(tx)?;
    }
    Ok(())
}

/// Count a change of what `list_integrations` shows (not last or next runs), for
/// [`RunStore::integrations_version`].
fn bump_integrations(tx: &mut dyn Tx) -> Result<()> {
    tx.exec(
        "UPDATE store_meta SET value = value + 1 WHERE key = 'integrations_version'",
        p![],
    )?;
    Ok(())
}

fn insert_log(tx: &mut dyn Tx, run_id: i64, rec: &LogRecord, file: Option<&str>) -> Result<()> {
    tx.exec(
        "INSERT INTO logs(run_id, time, level, step, message, description, file)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        p![
            run_id,
            rec.time,
            rec.level.as_str(),
            rec.step.as_deref(),
            rec.message.as_str(),
            rec.description.as_deref(),
            file
        ],
    )?;
    Ok(())
}

/// The run `id` ended (or started again) at `at`: its integration's last run time, if it is
/// still the integration's last run. By name, the primary key: `last_run_id` has no index,
/// and a scan of every integration per finished run was the slowest statement of a
/// 10,000-integration server.
fn touch_last_run(tx: &mut dyn Tx, id: i64, at: DateTime<Utc>) -> Result<()> {
    tx.exec(
        "UPDATE integrations SET last_run_at = ?2
         WHERE name = (SELECT pipeline FROM runs WHERE id = ?1) AND last_run_id = ?1",
        p![id, at],
    )?;
    Ok(())
}

const LOG_COLUMNS: &str = "id, time, level, step, message, description, file";

fn log_row(r: &Row) -> Result<LogRow> {
    Ok(LogRow {
        id: r.int(0)?,
        time: r.time(1)?,
        level: r.parsed(2)?,
        step: r.opt_text(3)?,
        message: r.text(4)?,
        description: r.opt_text(5)?,
        file: r.opt_text(6)?,
    })
}

fn record_run_finished(
    tx: &mut dyn Tx,
    dialect: Dialect,
    id: i64,
    status: Status,
    error: Option<&str>,
    at: DateTime<Utc>,
) -> Result<()> {
    if dialect == Dialect::Postgres {
        // The three writes below as one statement: a round trip and two statements' worth
        // of overhead less per run, which a burst of short runs pays 10,000 times.
        tx.query(
            "WITH r AS (
                 UPDATE runs SET status = ?2, finished_at = ?3, error = ?4,
                     cancel_requested_at = NULL
                 WHERE id = ?1 RETURNING pipeline),
             i AS (
                 UPDATE integrations SET last_run_at = ?3
                 WHERE name = (SELECT pipeline FROM r) AND last_run_id = ?1),
             q AS (
                 UPDATE queue SET state = 'done', finished_at = ?3
                 WHERE run_id = ?1 AND state = 'claimed')
             SELECT 1",
            p![id, status.as_str(), at, error],
        )?;
        return Ok(());
    }
    tx.exec(
        "UPDATE runs SET status = ?2, finished_at = ?3, error = ?4, cancel_requested_at = NULL
         WHERE id = ?1",
        p![id, status.as_str(), at, error],
    )?;
    touch_last_run(tx, id, at)?;
    // The queue item of a finished run is done, even when its worker dies before the ack.
    tx.exec(
        "UPDATE queue SET state = 'done', finished_at = ?2 WHERE run_id = ?1 AND state = 'claimed'",
        p![id, at],
    )?;
    Ok(())
}

fn record_step_finished(
    tx: &mut dyn Tx,
    run_id: i64,
    attempt: Option<i64>,
    s: &StepRecord,
) -> Result<()> {
    let outputs = match &s.outputs {
        serde_json::Value::Null => None,
        v => Some(json_text(v)?),
    };
    tx.exec(
        r#"INSERT INTO step_runs(run_id, step, run_attempt, status, attempts, started_at,
                                finished_at, duration_ms, "rows", error, outputs, kind)
           VALUES (?1, ?2, COALESCE(?3, (SELECT attempt FROM runs WHERE id = ?1), 1),
                   ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULLIF(?12, ''))
           ON CONFLICT(run_id, step, run_attempt) DO UPDATE SET
               kind = COALESCE(excluded.kind, step_runs.kind),
               status = excluded.status,
               attempts = excluded.attempts,
               started_at = COALESCE(excluded.started_at, step_runs.started_at),
               finished_at = excluded.finished_at,
               duration_ms = excluded.duration_ms,
               "rows" = excluded."rows",
               error = excluded.error,
               outputs = excluded.outputs"#,
        p![
            run_id,
            s.step.as_str(),
            attempt,
            s.status.as_str(),
            s.attempts,
            s.started_at,
            s.finished_at,
            s.duration_ms,
            s.rows,
            s.error.as_deref(),
            outputs,
            s.kind.as_str()
        ],
    )?;
    Ok(())
}

/// Record one event. `attempt` is the run's current attempt when the caller read it (a
/// fenced write must), else `None`: the step rows then read it inside their own insert.
fn apply_event(
    tx: &mut dyn Tx,
    dialect: Dialect,
    run_id: i64,
    attempt: Option<i64>,
    e: &RunEvent,
    file: Option<&str>,
) -> Result<()> {
    match e {
        RunEvent::StepStarted {
            step,
            attempt: n,
            at,
        } => {
            tx.exec(
                "INSERT INTO step_runs(run_id, step, run_attempt, status, attempts, started_at)
                 VALUES (?1, ?2, COALESCE(?3, (SELECT attempt FROM runs WHERE id = ?1), 1),
                         'running', ?4, ?5)
                 ON CONFLICT(run_id, step, run_attempt) DO UPDATE SET
                     status = 'running',
                     attempts = excluded.attempts,
                     started_at = COALESCE(step_runs.started_at, excluded.started_at),
                     finished_at = NULL,
                     error = NULL",
                p![run_id, step.as_str(), attempt, *n, *at],
            )?;
        }
        RunEvent::StepRetrying {
            step,
            attempt,
            error,
            delay_ms,
        } => {
            let rec = LogRecord {
                time: Utc::now(),
                level: Level::Warning,
                step: Some(step.clone()),
                message: format!(
                    "attempt {attempt} failed: {error}; retrying in {}",
                    engine::duration::human(Duration::from_millis(*delay_ms))
                ),
                description: None,
                file: None,
            };
            insert_log(tx, run_id, &rec, None)?;
        }
        RunEvent::Progress { .. } => {}
        RunEvent::StepFinished(s) => record_step_finished(tx, run_id, attempt, s)?,
        RunEvent::Log(rec) => insert_log(tx, run_id, rec, file.or(rec.file.as_deref()))?,
        RunEvent::RunFinished { status, error, at } => {
            record_run_finished(tx, dialect, run_id, *status, error.as_deref(), *at)?
        }
    }
    Ok(())
}

/// The run's current attempt, where its step rows go. With a fence, the run must be
/// running and created by the claim with that fence, else `Fenced` (nothing is written);
/// on PostgreSQL its row stays locked to the end of the transaction, so `expire_lost` (or
/// anyone else) cannot change its status between this check and the batch's writes.
fn run_attempt(
    tx: &mut dyn Tx,
    dialect: Dialect,
    run_id: i64,
    fence: Option<i64>,
) -> Result<Option<i64>> {
    let Some(fence) = fence else {
        // Unfenced: the step rows read the attempt in their own statements (no round trip).
        return Ok(None);
    };
    let lock = if dialect == Dialect::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let Some(r) = tx.one(
        &format!("SELECT attempt, status, fence FROM runs WHERE id = ?1{lock}"),
        p![run_id],
    )?
    else {
        return Err(StoreError::not_found(format!("run {run_id} not found")));
    };
    let status: Status = r.parsed(1)?;
    let theirs = r.opt_int(2)?;
    if status != Status::Running || theirs != Some(fence) {
        let why = if theirs != Some(fence) {
            match theirs {
                Some(f) => format!("it belongs to the claim with fence {f}"),
                None => "it is not a claim's (a repair attempt, or a run not from the queue)"
                    .to_string(),
            }
        } else {
            format!("it is {}", status.label())
        };
        return Err(StoreError::fenced(format!(
            "run {run_id}: the write of the claim with fence {fence} is refused, {why} (its \
             worker's lease expired and the run was taken from it)"
        )));
    }
    Ok(Some(r.opt_int(0)?.unwrap_or(1)))
}

/// The events of a batch worth a statement: a step's start is left out when the same
/// batch also holds its finish (whose row says when it started), as it does for every
/// step that took less than the writer's linger.
fn worth_writing(events: &[RunEvent]) -> Vec<usize> {
    let mut seen_finish: std::collections::HashSet<&str> = Default::default();
    let mut keep = Vec::with_capacity(events.len());
    // From the end: a start is dropped only when its step's finish comes after it.
    for (i, e) in events.iter().enumerate().rev() {
        match e {
            RunEvent::StepFinished(s) => {
                seen_finish.insert(s.step.as_str());
            }
            RunEvent::StepStarted { step, .. } if seen_finish.contains(step.as_str()) => continue,
            _ => {}
        }
        keep.push(i);
    }
    keep.reverse();
    keep
}

/// Queue `item` inside an open write transaction.
fn enqueue_tx(tx: &mut dyn Tx, item: &Enqueue, now: DateTime<Utc>) -> Result<Enqueued> {
    ensure_integration(tx, &item.integration)?;
    enqueue_known(tx, item, now)
}

/// [`enqueue_tx`] for an integration whose row exists (the planner ensured it). The insert
/// goes first and merges only when a queued item holds the key: one round trip for the
/// common case, which matters to a planner queueing 10,000 ticks at once.
fn enqueue_known(tx: &mut dyn Tx, item: &Enqueue, now: DateTime<Utc>) -> Result<Enqueued> {
    let merge = |tx: &mut dyn Tx| -> Result<Option<Enqueued>> {
        let Some(key) = &item.dedup_key else {
            return Ok(None);
        };
        let Some(r) = tx.one(
            "SELECT id FROM queue WHERE dedup_key = ?1 AND state = 'queued'",
            p![key],
        )?
        else {
            return Ok(None);
        };
        let id = r.int(0)?;
        // A raised priority is published again (the queued message has the old one).
        tx.exec(
            "UPDATE queue SET priority = ?2, published_at = NULL WHERE id = ?1 AND priority < ?2",
            p![id, item.priority],
        )?;
        Ok(Some(Enqueued { id, merged: true }))
    };
    tx.queue_changed()?;
    let params = json_text(&item.params)?;
    let inserted = tx.one(
        r#"INSERT INTO queue(integration, queue, priority, "trigger", logical_date, params,
                             dedup_key, backfill_id, state, enqueued_at, run_id)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'queued', ?9, ?10)
           ON CONFLICT (dedup_key) WHERE state = 'queued' DO NOTHING
           RETURNING id"#,
        p![
            item.integration.as_str(),
            item.queue.as_str(),
            item.priority,
            item.trigger.as_str(),
            item.logical_date,
            params,
            item.dedup_key.as_deref(),
            item.backfill_id,
            now,
            item.run_id
        ],
    )?;
    match inserted {
        Some(r) => Ok(Enqueued {
            id: r.int(0)?,
            merged: false,
        }),
        // A queued item holds the key (queued earlier, or by another transaction).
        None => merge(tx)?.ok_or_else(|| {
            StoreError::Backend(anyhow::anyhow!(
                "queue item with dedup key {:?} vanished while merging",
                item.dedup_key
            ))
        }),
    }
}

/// The answer of a conditional update of one row by id: whether it changed (`n > 0`), or
/// `NotFound` ("run 7 not found") when there is no such row at all.
fn changed_or_missing(
    tx: &mut dyn Tx,
    n: u64,
    table: &str,
    id: Value,
    what: impl FnOnce() -> String,
) -> Result<bool> {
    if n == 0
        && tx
            .one(&format!("SELECT 1 FROM {table} WHERE id = ?1"), &[id])?
            .is_none()
    {
        return Err(StoreError::not_found(format!("{} not found", what())));
    }
    Ok(n > 0)
}

/// Copy `src` into the run's folder under a free name and return the copy's path.
fn attach_file(dir: &Path, src: &Path) -> Result<String> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let src_abs = fs::canonicalize(src)
        .with_context(|| format!("cannot read attached file {}", src.display()))?;
    if !src_abs.is_file() {
        return Err(StoreError::invalid(format!(
            "attached file {} is not a regular file",
            src.display()
        )));
    }
    let dir_abs = fs::canonicalize(dir)?;
    if src_abs.starts_with(&dir_abs) {
        return Ok(src_abs.to_string_lossy().into_owned());
    }
    let name = src_abs
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| "file".into());
    let stem = name
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = name
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()));
    for n in 0u32.. {
        let dest = if n == 0 {
            dir_abs.join(&name)
        } else {
            dir_abs.join(format!("{stem}-{n}{}", ext.as_deref().unwrap_or("")))
        };
        // create_new reserves the name, so two concurrent copies never share one.
        let mut out = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dest.display())),
        };
        let copied =
            fs::File::open(&src_abs).and_then(|mut input| std::io::copy(&mut input, &mut out));
        if let Err(e) = copied {
            let _ = fs::remove_file(&dest);
            return Err(e)
                .with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()));
        }
        return Ok(dest.to_string_lossy().into_owned());
    }
    unreachable!("ran out of file names")
}

/// How many runs of one tick (integration + logical date) may be lost and queued again,
/// unless the integration's metadata says `max_lost_retries`.
pub(crate) const MAX_LOST_RETRIES: i64 = 3;

/// Queue a lost run's item again when its integration says `retry_on_lost` (in its
/// metadata) and the same tick has not been lost `max_lost_retries` (default
/// [`MAX_LOST_RETRIES`]) times already.
fn requeue_lost(tx: &mut dyn Tx, item: &QueueItem, now: DateTime<Utc>) -> Result<Option<i64>> {
    let metadata = tx
        .one(
            "SELECT metadata FROM integrations WHERE name = ?1",
            p![item.integration.as_str()],
        )?
        .map(|r| r.opt_text(0))
        .transpose()?
        .flatten();
    let metadata = parse_json(metadata.as_deref());
    let wanted = metadata
        .get("retry_on_lost")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let max_retries = metadata
        .get("max_lost_retries")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(MAX_LOST_RETRIES);
    if !wanted || max_retries <= 0 {
        return Ok(None);
    }
    let lost_before = match item.logical_date {
        Some(at) => tx.one(
            "SELECT COUNT(*) FROM runs WHERE pipeline = ?1 AND logical_date = ?2
               AND status = 'abandoned'",
            p![item.integration.as_str(), at],
        )?,
        None => tx.one(
            "SELECT COUNT(*) FROM runs WHERE pipeline = ?1 AND logical_date IS NULL
               AND status = 'abandoned' AND params = ?2",
            p![item.integration.as_str(), json_text(&item.params)?],
        )?,
    }
    .map(|r| r.int(0))
    .transpose()?
    .unwrap_or(0);
    if lost_before > max_retries {
        return Ok(None);
    }
    let again = Enqueue {
        integration: item.integration.clone(),
        queue: item.queue.clone(),
        priority: item.priority,
        trigger: item.trigger,
        logical_date: item.logical_date,
        params: item.params.clone(),
        dedup_key: item.dedup_key.clone(),
        backfill_id: item.backfill_id,
        run_id: None,
    };
    Ok(Some(enqueue_tx(tx, &again, now)?.id))
}

/// Record one integration's ticks inside an open write transaction (see `record_ticks`).
fn record_ticks_tx(
    tx: &mut dyn Tx,
    integration: &str,
    fingerprint: &str,
    ticks: &[PlannedTick],
    cursor: DateTime<Utc>,
    next_run: Option<Option<DateTime<Utc>>>,
    now: DateTime<Utc>,
) -> Result<Vec<TickOutcome>> {
    ensure_integration(tx, integration)?;
    let mut out = Vec::with_capacity(ticks.len());
    for t in ticks {
        let state = if t.enqueue.is_some() {
            TickState::Enqueued
        } else {
            TickState::Skipped
        };
        let inserted = tx.exec(
            "INSERT INTO ticks(integration, scheduled_at, planned_at, state, note)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(integration, scheduled_at) DO NOTHING",
            p![
                integration,
                t.scheduled_at,
                now,
                state.as_str(),
                t.note.as_deref()
            ],
        )? > 0;
        let mut queue_item = None;
        if let (true, Some(item)) = (inserted, &t.enqueue) {
            let q = if item.integration == integration {
                enqueue_known(tx, item, now)?
            } else {
                enqueue_tx(tx, item, now)?
            };
            tx.exec(
                "UPDATE ticks SET queue_item = ?3 WHERE integration = ?1 AND scheduled_at = ?2",
                p![integration, t.scheduled_at, q.id],
            )?;
            queue_item = Some(q.id);
        }
        out.push(TickOutcome {
            scheduled_at: t.scheduled_at,
            inserted,
            queue_item,
        });
    }
    // One statement for the cursor and (when given) the next run.
    let cursor_sql = "UPDATE integrations SET
             schedule_cursor = CASE WHEN schedule_cursor IS NULL OR schedule_cursor < ?2
                                    THEN ?2 ELSE schedule_cursor END,
             schedule_fingerprint = ?3";
    match next_run {
        Some(next) => tx.exec(
            &format!("{cursor_sql}, next_run_at = ?4 WHERE name = ?1"),
            p![integration, cursor, fingerprint, next],
        )?,
        None => tx.exec(
            &format!("{cursor_sql} WHERE name = ?1"),
            p![integration, cursor, fingerprint],
        )?,
    };
    Ok(out)
}

/// [`record_ticks_tx`] for every batch at once, in a few multi-row statements (PostgreSQL's
/// arrays): a planner round of 10,000 due integrations was five statements per tick, 50,000
/// round trips in one transaction (18 s), while this is six statements whatever the count.
/// Same outcome, tick for tick: a tick already recorded is left alone and queues nothing; a
/// queued item holding an item's dedup key takes the merge as `enqueue` does.
fn record_ticks_multi_row(
    tx: &mut dyn Tx,
    batches: &[TickBatch],
    order: &[usize],
    now: DateTime<Utc>,
) -> Result<Vec<Vec<TickOutcome>>> {
    let names: Vec<&str> = order
        .iter()
        .map(|&i| batches[i].integration.as_str())
        .collect();
    // Every integration named, the queued items' too (they may differ from their batch's).
    let mut known: std::collections::BTreeSet<&str> = names.iter().copied().collect();
    for b in batches {
        known.extend(
            b.ticks
                .iter()
                .filter_map(|t| t.enqueue.as_ref())
                .map(|e| e.integration.as_str()),
        );
    }
    let created = tx.exec(
        "INSERT INTO integrations(name) SELECT n FROM unnest(?1::text[]) AS n
         ON CONFLICT(name) DO NOTHING",
        &[Value::list(known.iter().copied())],
    )?;
    if created > 0 {
        bump_integrations(tx)?;
    }
    // Their rows locked in name order (as the one-by-one path does): two servers planning
    // the same integrations never deadlock on each other.
    tx.query(
        "SELECT name FROM integrations WHERE name = ANY(?1::text[]) ORDER BY name FOR UPDATE",
        &[Value::list(names.iter().copied())],
    )?;

    // The ticks; which were new.
    let ticks: Vec<(usize, &PlannedTick)> = order
        .iter()
        .flat_map(|&i| batches[i].ticks.iter().map(move |t| (i, t)))
        .collect();
    let mut out: Vec<Vec<TickOutcome>> = batches
        .iter()
        .map(|b| Vec::with_capacity(b.ticks.len()))
        .collect();
    let mut inserted: std::collections::HashSet<(String, String)> = Default::default();
    if !ticks.is_empty() {
        for r in tx.query(
            "INSERT INTO ticks(integration, scheduled_at, planned_at, state, note)
             SELECT t.i, t.s, ?5, t.st, t.n
             FROM unnest(?1::text[], ?2::text[], ?3::text[], ?4::text[]) AS t(i, s, st, n)
             ON CONFLICT(integration, scheduled_at) DO NOTHING
             RETURNING integration, scheduled_at",
            &[
                Value::list(ticks.iter().map(|(i, _)| batches[*i].integration.as_str())),
                Value::list(ticks.iter().map(|(_, t)| t.scheduled_at)),
                Value::list(ticks.iter().map(|(_, t)| {
                    if t.enqueue.is_some() {
                        TickState::Enqueued.as_str()
                    } else {
                        TickState::Skipped.as_str()
                    }
                })),
                Value::list(ticks.iter().map(|(_, t)| t.note.as_deref())),
                Value::from(now),
            ],
        )? {
            inserted.insert((r.text(0)?, r.text(1)?));
        }
    }
    let is_new = |i: usize, t: &PlannedTick| {
        inserted.contains(&(batches[i].integration.clone(), ts(t.scheduled_at)))
    };

    // The queue items of the new ticks that enqueue: one insert; an item whose dedup key a
    // queued item holds (or that has none to find it by) goes the one-by-one way.
    let new_items: Vec<(usize, &PlannedTick, &Enqueue)> = ticks
        .iter()
        .filter(|(i, t)| is_new(*i, t))
        .filter_map(|(i, t)| t.enqueue.as_ref().map(|e| (*i, *t, e)))
        .collect();
    let mut ids: HashMap<String, i64> = HashMap::new();
    let keyed = new_items.iter().all(|(_, _, e)| e.dedup_key.is_some()) && {
        let keys: std::collections::HashSet<&str> = new_items
            .iter()
            .filter_map(|(_, _, e)| e.dedup_key.as_deref())
            .collect();
        keys.len() == new_items.len()
    };
    if keyed && !new_items.is_empty() {
        tx.queue_changed()?;
        let params: Vec<String> = new_items
            .iter()
            .map(|(_, _, e)| json_text(&e.params))
            .collect::<Result<_>>()?;
        for r in tx.query(
            r#"INSERT INTO queue(integration, queue, priority, "trigger", logical_date, params,
                                 dedup_key, backfill_id, state, enqueued_at, run_id)
               SELECT v.i, v.q, v.p, v.tr, v.ld, v.pa, v.k, v.b, 'queued', ?9, NULL
               FROM unnest(?1::text[], ?2::text[], ?3::bigint[], ?4::text[], ?5::text[],
                           ?6::text[], ?7::text[], ?8::bigint[])
                    AS v(i, q, p, tr, ld, pa, k, b)
               ON CONFLICT (dedup_key) WHERE state = 'queued' DO NOTHING
               RETURNING id, dedup_key"#,
            &[
                Value::list(new_items.iter().map(|(_, _, e)| e.integration.as_str())),
                Value::list(new_items.iter().map(|(_, _, e)| e.queue.as_str())),
                Value::list(new_items.iter().map(|(_, _, e)| e.priority)),
                Value::list(new_items.iter().map(|(_, _, e)| e.trigger.as_str())),
                Value::list(new_items.iter().map(|(_, _, e)| e.logical_date)),
                Value::list(params.iter().map(String::as_str)),
                Value::list(new_items.iter().map(|(_, _, e)| e.dedup_key.as_deref())),
                Value::list(new_items.iter().map(|(_, _, e)| e.backfill_id)),
                Value::from(now),
            ],
        )? {
            ids.insert(r.text(1)?, r.int(0)?);
        }
    }
    let mut links: Vec<(&str, DateTime<Utc>, i64)> = Vec::with_capacity(new_items.len());
    for (i, t, e) in &new_items {
        let found = e.dedup_key.as_ref().and_then(|k| ids.get(k)).copied();
        let id = match found {
            Some(id) => id,
            None if e.integration == batches[*i].integration => enqueue_known(tx, e, now)?.id,
            None => enqueue_tx(tx, e, now)?.id,
        };
        links.push((batches[*i].integration.as_str(), t.scheduled_at, id));
    }
    if !links.is_empty() {
        tx.exec(
            "UPDATE ticks SET queue_item = v.id
             FROM unnest(?1::text[], ?2::text[], ?3::bigint[]) AS v(i, s, id)
             WHERE ticks.integration = v.i AND ticks.scheduled_at = v.s",
            &[
                Value::list(links.iter().map(|l| l.0)),
                Value::list(links.iter().map(|l| l.1)),
                Value::list(links.iter().map(|l| l.2)),
            ],
        )?;
    }
    let item_of: HashMap<(&str, DateTime<Utc>), i64> =
        links.iter().map(|&(n, at, id)| ((n, at), id)).collect();
    for &(i, t) in &ticks {
        let name = batches[i].integration.as_str();
        out[i].push(TickOutcome {
            scheduled_at: t.scheduled_at,
            inserted: is_new(i, t),
            queue_item: item_of.get(&(name, t.scheduled_at)).copied(),
        });
    }

    // Every cursor (never backwards) and, where given, next run: one statement.
    tx.exec(
        "UPDATE integrations SET
             schedule_cursor = CASE WHEN schedule_cursor IS NULL OR schedule_cursor < v.c
                                    THEN v.c ELSE schedule_cursor END,
             schedule_fingerprint = v.f,
             next_run_at = CASE WHEN v.setn THEN v.n ELSE next_run_at END
         FROM unnest(?1::text[], ?2::text[], ?3::text[], ?4::bool[], ?5::text[])
              AS v(name, c, f, setn, n)
         WHERE integrations.name = v.name",
        &[
            Value::list(order.iter().map(|&i| batches[i].integration.as_str())),
            Value::list(order.iter().map(|&i| batches[i].cursor)),
            Value::list(order.iter().map(|&i| batches[i].fingerprint.as_str())),
            Value::list(order.iter().map(|&i| batches[i].next_run.is_some())),
            Value::list(order.iter().map(|&i| batches[i].next_run.flatten())),
        ],
    )?;
    Ok(out)
}

impl<B: Backend> SqlStore<B> {
    pub(crate) fn write<T: Send>(
        &self,
        mut f: impl FnMut(&mut dyn Tx) -> Result<T> + Send,
    ) -> Result<T> {
        self.backend.write(&mut f)
    }
    pub(crate) fn read<T: Send>(
        &self,
        mut f: impl FnMut(&mut dyn Tx) -> Result<T> + Send,
    ) -> Result<T> {
        self.backend.read(&mut f)
    }
    /// A write that may share its commit with other threads' ([`crate::group`]).
    fn write_grouped<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.group.write(&self.backend, f)
    }

    /// `write_events`, fenced or not: with a fence, each transaction first checks (under
    /// the run's row lock on PostgreSQL, so `expire_lost` cannot mark the run in between)
    /// that the run is running and was created by the claim with that fence.
    fn write_events_checked(
        &self,
        run_id: i64,
        fence: Option<i64>,
        events: &[RunEvent],
    ) -> Result<()> {
        // Copy attached files before taking the write lock.
        let dir = self.run_dir(run_id);
        let files: Vec<Option<String>> = events
            .iter()
            .map(|e| match e {
                RunEvent::Log(LogRecord { file: Some(f), .. }) => {
                    Some(attach_file(&dir, Path::new(f)).unwrap_or_else(|_| f.clone()))
                }
                _ => None,
            })
            .collect();
        let all = {
            let (events, files) = (events.to_vec(), files.clone());
            self.write_grouped(move |tx| {
                let attempt = run_attempt(tx, B::DIALECT, run_id, fence)?;
                for &i in &worth_writing(&events) {
                    apply_event(
                        tx,
                        B::DIALECT,
                        run_id,
                        attempt,
                        &events[i],
                        files[i].as_deref(),
                    )?;
                }
                Ok(())
            })
        };
        match all {
            Ok(()) => Ok(()),
            Err(e)
                if events.len() == 1
                    || B::is_contention(&e)
                    || matches!(e, StoreError::Fenced(_) | StoreError::NotFound(_)) =>
            {
                Err(e)
            }
            Err(_) => {
                let mut first = None;
                for (e, file) in events.iter().zip(&files) {
                    let one = self.write(|tx| {
                        let attempt = run_attempt(tx, B::DIALECT, run_id, fence)?;
                        apply_event(tx, B::DIALECT, run_id, attempt, e, file.as_deref())
                    });
                    if let Err(err) = one {
                        first.get_or_insert(err);
                    }
                }
                first.map_or(Ok(()), Err)
            }
        }
    }

    /// Walk the queued items in claim order (the `queue_pick` index: state, priority
    /// DESC, id), a page at a time, and take the first whose integration and backfill have
    /// room. The caps are checked per candidate, once per integration or backfill, so a
    /// claim costs a few index lookups however long the queue is (checking them in the
    /// query itself evaluated two counts for every queued item before sorting: 3 ms per
    /// claim with 600 items waiting, quadratic over a burst).
    fn claim_once(
        &self,
        worker: &str,
        queues: &[String],
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<ClaimTry> {
        let (worker, queues) = (worker.to_string(), queues.to_vec());
        self.write_grouped(move |tx| {
            let mut full_integrations: std::collections::HashSet<String> = Default::default();
            let mut full_backfills: std::collections::HashSet<i64> = Default::default();
            let mut after: Option<(i64, i64)> = None;
            let mut page_size = CLAIM_FIRST_PAGE;
            loop {
                let mut sql = format!("SELECT {CANDIDATE} WHERE q.state = 'queued'");
                let mut params: Vec<Value> = Vec::new();
                if !queues.is_empty() {
                    let marks: Vec<String> = (1..=queues.len()).map(|i| format!("?{i}")).collect();
                    sql.push_str(&format!(" AND q.queue IN ({})", marks.join(", ")));
                    params.extend(queues.iter().map(Value::from));
                }
                if let Some((priority, id)) = after {
                    let (a, b) = (params.len() + 1, params.len() + 2);
                    sql.push_str(&format!(
                        " AND (q.priority < ?{a} OR (q.priority = ?{a} AND q.id > ?{b}))"
                    ));
                    params.push(priority.into());
                    params.push(id.into());
                }
                // Most claims take the first candidate: read few, then more.
                sql.push_str(&format!(
                    " ORDER BY q.priority DESC, q.id LIMIT {page_size}"
                ));
                if B::DIALECT == Dialect::Postgres {
                    // Concurrent claimers pass over the candidates another is looking at.
                    sql.push_str(" FOR UPDATE OF q SKIP LOCKED");
                }
                let page = tx.query(&sql, &params)?;
                if page.is_empty() {
                    return Ok(ClaimTry::Nothing);
                }
                for row in &page {
                    let c = candidate(row)?;
                    after = Some((c.priority, c.id));
                    if c.disabled {
                        // Queued before its integration was disabled: never runs.
                        cancel_queued(tx, c.id, now)?;
                        continue;
                    }
                    if full_integrations.contains(&c.integration)
                        || c.backfill.is_some_and(|b| full_backfills.contains(&b))
                    {
                        continue;
                    }
                    match room(tx, B::DIALECT, &c)? {
                        Room::Free => {}
                        Room::IntegrationFull => {
                            full_integrations.insert(c.integration);
                            continue;
                        }
                        Room::BackfillFull(b) => {
                            full_backfills.insert(b);
                            continue;
                        }
                    }
                    if let Some(item) = take_item(tx, c.id, &worker, lease, now)? {
                        return Ok(ClaimTry::Got(Box::new(item)));
                    }
                }
                if page.len() < page_size {
                    return Ok(ClaimTry::Nothing);
                }
                page_size = CLAIM_PAGE;
            }
        })
    }
}

/// Whether an item of `integration` (and of `backfill`) may be claimed now: the caps of
/// `claim` and `claim_item`. On PostgreSQL the integration's row is locked first, so the
/// claimers of one integration take turns here (on any machine) and two of them never both
/// see room for one more run; a backfill's items are all of one integration, so that lock
/// covers its count too. SQLite's writers are serialised already.
fn room(tx: &mut dyn Tx, dialect: Dialect, c: &Candidate) -> Result<Room> {
    let integration = c.integration.as_str();
    let backfill_cap = c.backfill.zip(c.max_parallel);
    if dialect == Dialect::Postgres && (c.max_runs.is_some() || backfill_cap.is_some()) {
        tx.query(
            "SELECT name FROM integrations WHERE name = ?1 FOR UPDATE",
            p![integration],
        )?;
    }
    if let Some(max) = c.max_runs {
        let active = tx
            .one(
                &format!("SELECT {}", ACTIVE.replace("q.integration", "?1")),
                p![integration],
            )?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(0);
        if active >= max {
            return Ok(Room::IntegrationFull);
        }
    }
    if let Some((b, max)) = backfill_cap {
        let claimed = tx
            .one(
                "SELECT COUNT(*) FROM queue c WHERE c.backfill_id = ?1 AND c.state = 'claimed'",
                p![b],
            )?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(0);
        if claimed >= max {
            return Ok(Room::BackfillFull(b));
        }
    }
    Ok(Room::Free)
}

/// What `claim` and `claim_item` read of a queued item, its integration and its backfill
/// (`FROM queue q`, so a caller adds `WHERE` and locks `OF q`).
const CANDIDATE: &str = "q.id, q.integration, q.backfill_id, q.priority, q.state,
        i.max_concurrent_runs, b.max_parallel, i.enabled
    FROM queue q
    LEFT JOIN integrations i ON i.name = q.integration
    LEFT JOIN backfills b ON b.id = q.backfill_id";

struct Candidate {
    id: i64,
    integration: String,
    backfill: Option<i64>,
    priority: i64,
    state: QueueState,
    max_runs: Option<i64>,
    max_parallel: Option<i64>,
    /// Its integration is disabled.
    disabled: bool,
}

fn candidate(r: &Row) -> Result<Candidate> {
    Ok(Candidate {
        id: r.int(0)?,
        integration: r.text(1)?,
        backfill: r.opt_int(2)?,
        priority: r.int(3)?,
        state: r.parsed(4)?,
        max_runs: r.opt_int(5)?,
        max_parallel: r.opt_int(6)?,
        disabled: r.opt_int(7)? == Some(0),
    })
}

enum Room {
    Free,
    IntegrationFull,
    BackfillFull(i64),
}

/// Cancel a queued item (its integration is disabled).
fn cancel_queued(tx: &mut dyn Tx, id: i64, now: DateTime<Utc>) -> Result<()> {
    tx.exec(
        "UPDATE queue SET state = 'cancelled', finished_at = ?2 WHERE id = ?1 AND state = 'queued'",
        p![id, now],
    )?;
    Ok(())
}

/// Claim a queued item for `worker` (fence + 1) and return it; `None` when it is no longer
/// queued (another claimer took it since it was read: on PostgreSQL the update waits for
/// that claimer's row lock and then finds it claimed).
fn take_item(
    tx: &mut dyn Tx,
    id: i64,
    worker: &str,
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<Option<QueueItem>> {
    tx.one(
        &format!(
            "UPDATE queue SET state = 'claimed', claimed_by = ?2, claimed_at = ?3,
                 claim_expires_at = ?4, fence = fence + 1
             WHERE id = ?1 AND state = 'queued'
             RETURNING {QUEUE_COLUMNS}"
        ),
        p![id, worker, now, plus(now, lease)],
    )?
    .map(|item| queue_row(&item))
    .transpose()
}

/// Queued items a claim reads first, in claim order, and then at a time.
const CLAIM_FIRST_PAGE: usize = 1;
const CLAIM_PAGE: usize = 128;

/// The runs of `q.integration` that are running, plus its claimed items without a run.
const ACTIVE: &str = "((SELECT COUNT(*) FROM runs r WHERE r.pipeline = q.integration
                          AND r.status = 'running')
                     + (SELECT COUNT(*) FROM queue a WHERE a.integration = q.integration
                          AND a.state = 'claimed' AND a.run_id IS NULL))";

/// The ids of unpublished queued items a claim could take now: per integration, no more
/// than its `max_concurrent_runs` minus its active runs and its items already published
/// (in flight to a worker); per backfill likewise with `max_parallel`. Publishing more
/// would only make workers find them `Full` and hand them back, over and over.
const PUBLISHABLE: &str = "SELECT w.id FROM (
        SELECT q.id, q.integration, q.backfill_id,
            ROW_NUMBER() OVER (PARTITION BY q.integration ORDER BY q.priority DESC, q.id) AS rn_i,
            ROW_NUMBER() OVER (PARTITION BY q.backfill_id ORDER BY q.priority DESC, q.id) AS rn_b
        FROM queue q WHERE q.state = 'queued' AND q.published_at IS NULL
    ) w
    LEFT JOIN integrations i ON i.name = w.integration
    LEFT JOIN backfills b ON b.id = w.backfill_id
    WHERE (i.max_concurrent_runs IS NULL
           OR w.rn_i
              + (SELECT COUNT(*) FROM runs r WHERE r.pipeline = w.integration
                   AND r.status = 'running')
              + (SELECT COUNT(*) FROM queue a WHERE a.integration = w.integration
                   AND a.state = 'claimed' AND a.run_id IS NULL)
              + (SELECT COUNT(*) FROM queue f WHERE f.integration = w.integration
                   AND f.state = 'queued' AND f.published_at IS NOT NULL)
              <= i.max_concurrent_runs)
      AND (w.backfill_id IS NULL OR b.max_parallel IS NULL
           OR w.rn_b
              + (SELECT COUNT(*) FROM queue c WHERE c.backfill_id = w.backfill_id
                   AND (c.state = 'claimed'
                        OR (c.state = 'queued' AND c.published_at IS NOT NULL)))
              <= b.max_parallel)";

enum ClaimTry {
    Nothing,
    Got(Box<QueueItem>),
}

impl<B: Backend> RunQueue for SqlStore<B> {
    fn enqueue(&self, item: &Enqueue, now: DateTime<Utc>) -> Result<Enqueued> {
        self.write(|tx| enqueue_tx(tx, item, now))
    }

    fn claim(
        &self,
        worker: &str,
        queues: &[String],
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<QueueItem>> {
        // Idle workers poll: on SQLite an empty queue is seen without taking the (one,
        // file-wide) write lock. PostgreSQL claimers do not block each other anyway.
        if B::DIALECT == Dialect::Sqlite {
            let any = self.read(|tx| {
                Ok(tx
                    .one("SELECT 1 FROM queue WHERE state = 'queued' LIMIT 1", p![])?
                    .is_some())
            })?;
            if !any {
                return Ok(None);
            }
        }
        match self.claim_once(worker, queues, lease, now)? {
            ClaimTry::Nothing => Ok(None),
            ClaimTry::Got(item) => Ok(Some(*item)),
        }
    }

    fn ack(&self, item_id: i64, outcome: AckOutcome, now: DateTime<Utc>) -> Result<()> {
        let state = match outcome {
            AckOutcome::Done => QueueState::Done,
            AckOutcome::Cancelled => QueueState::Cancelled,
        };
        self.write_grouped(move |tx| {
            let Some(r) = tx.one("SELECT state FROM queue WHERE id = ?1", p![item_id])? else {
                return Err(StoreError::not_found(format!(
                    "queue item {item_id} not found"
                )));
            };
            let current: QueueState = r.parsed(0)?;
            match current {
                QueueState::Claimed => {
                    tx.exec(
                        "UPDATE queue SET state = ?2, finished_at = ?3 WHERE id = ?1",
                        p![item_id, state.as_str(), now],
                    )?;
                    Ok(())
                }
                // Already finished (its run's end marked it done): acking again is harmless.
                QueueState::Done | QueueState::Cancelled => Ok(()),
                QueueState::Queued => Err(StoreError::conflict(format!(
                    "queue item {item_id} is not claimed"
                ))),
            }
        })
    }
}

impl<B: Backend> RunStore for SqlStore<B> {
    fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn schema_version(&self) -> Result<u32> {
        self.backend.schema_version()
    }

    fn create_run_kept(&self, new: &NewRun) -> Result<CreatedRun> {
        let started = Utc::now();
        let (pid, pid_start, host) = match new.owner {
            Owner::Pipe => (
                Some(i64::from(std::process::id())),
                engine::host::own_process_start(),
                engine::host::host_identity(),
            ),
            Owner::External => (None, None, None),
        };
        let params_json = json_text(&new.params)?;
        if new.fence.is_some() && new.queue_item.is_none() {
            return Err(StoreError::invalid(
                "a fenced run needs its queue item (NewRun::queue_item)",
            ));
        }
        let hash = new.source.as_ref().map(|s| source_hash(&s.text));
        let new = new.clone();
        let created = self.write_grouped(move |tx| {
            let values = p![
                new.pipeline.as_str(),
                params_json.as_str(),
                new.trigger.as_str(),
                started,
                new.logical_date,
                pid,
                pid_start.as_deref(),
                new.owner.as_str(),
                host.as_deref(),
                new.lease_owner.as_deref(),
                new.queue_item,
                new.fence,
                hash.as_deref(),
                new.source.as_ref().map(|s| s.path.as_str())
            ];
            let (id, linked, touched, source_kept) = if B::DIALECT == Dialect::Postgres {
                // The run row, its queue item's link and the integration's last run in one
                // statement (four before): a service starts thousands of runs a minute.
                let row = tx
                    .one(
                        &format!(
                            "WITH r AS ({INSERT_RUN}),
                             q AS (
                                 UPDATE queue SET run_id = (SELECT id FROM r)
                                 WHERE id = ?11 AND state = 'claimed'
                                   AND (?12::BIGINT IS NULL OR fence = ?12::BIGINT)
                                 RETURNING 1),
                             i AS (
                                 UPDATE integrations
                                 SET last_run_id = (SELECT id FROM r), last_run_at = ?4
                                 WHERE name = ?1
                                 RETURNING 1)
                             SELECT (SELECT id FROM r), (SELECT COUNT(*) FROM q),
                                    (SELECT COUNT(*) FROM i), (SELECT kept FROM r)"
                        ),
                        values,
                    )?
                    .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("INSERT returned no id")))?;
                (
                    row.int(0)?,
                    row.int(1)? > 0,
                    row.int(2)? > 0,
                    row.int(3)? > 0,
                )
            } else {
                let row = tx
                    .one(INSERT_RUN, values)?
                    .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("INSERT returned no id")))?;
                let (id, kept) = (row.int(0)?, row.int(1)? > 0);
                let linked = match new.queue_item {
                    Some(item) => {
                        tx.exec(
                            "UPDATE queue SET run_id = ?2
                             WHERE id = ?1 AND state = 'claimed' AND (?3 IS NULL OR fence = ?3)",
                            p![item, id, new.fence],
                        )? > 0
                    }
                    None => false,
                };
                let touched = tx.exec(
                    "UPDATE integrations SET last_run_id = ?1, last_run_at = ?2 WHERE name = ?3",
                    p![id, started, new.pipeline.as_str()],
                )? > 0;
                (id, linked, touched, kept)
            };
            if let (Some(item), false) = (new.queue_item, linked) {
                return Err(StoreError::conflict(match new.fence {
                    Some(fence) => format!(
                        "queue item {item} is no longer claimed with fence {fence} (cancelled, \
                         or taken back and claimed again after its worker's lease expired)"
                    ),
                    None => format!(
                        "queue item {item} is not claimed (cancelled, or taken back after its \
                         worker's lease expired)"
                    ),
                }));
            }
            if !touched {
                // A run of a pipeline never loaded as an integration (a lone `pipe run`).
                ensure_integration(tx, &new.pipeline)?;
                tx.exec(
                    "UPDATE integrations SET last_run_id = ?1, last_run_at = ?2 WHERE name = ?3",
                    p![id, started, new.pipeline.as_str()],
                )?;
            }
            Ok(CreatedRun { id, source_kept })
        })?;
        // No folder yet: what writes into it (attached files, spilled logs, kept tables)
        // creates it. Creating one per run cost a busy server more CPU than its queries.
        Ok(created)
    }

    fn run_source(&self, run_id: i64) -> Result<Option<RunSource>> {
        self.read(|tx| {
            let Some(r) = tx.one(
                "SELECT s.text, r.source_path FROM runs r
                 JOIN pipeline_sources s ON s.hash = r.source_hash WHERE r.id = ?1",
                p![run_id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(RunSource {
                text: r.text(0)?,
                path: r.opt_text(1)?.unwrap_or_default(),
            }))
        })
    }

    fn set_run_source(&self, run_id: i64, source: &RunSource) -> Result<()> {
        let hash = source_hash(&source.text);
        let source = source.clone();
        // Grouped: the first runs of a folder of new files each keep theirs at once.
        self.write_grouped(move |tx| {
            put_source(tx, &hash, &source.text)?;
            let n = tx.exec(
                "UPDATE runs SET source_hash = ?2, source_path = ?3 WHERE id = ?1",
                p![run_id, hash.as_str(), source.path.as_str()],
            )?;
            changed_or_missing(tx, n, "runs", run_id.into(), || format!("run {run_id}"))?;
            Ok(())
        })
    }

    fn add_log(&self, run_id: i64, rec: &LogRecord) -> Result<()> {
        let file = match &rec.file {
            Some(f) => Some(attach_file(&self.run_dir(run_id), Path::new(f))?),
            None => None,
        };
        self.write(|tx| insert_log(tx, run_id, rec, file.as_deref()))
    }

    fn write_events(&self, run_id: i64, events: &[RunEvent]) -> Result<()> {
        self.write_events_checked(run_id, None, events)
    }

    fn write_events_fenced(&self, run_id: i64, fence: i64, events: &[RunEvent]) -> Result<()> {
        self.write_events_checked(run_id, Some(fence), events)
    }

    fn finish_run(&self, id: i64, status: Status, error: Option<&str>, force: bool) -> Result<()> {
        if !status.is_finished() {
            return Err(StoreError::invalid(format!(
                "cannot finish run {id} as {status}"
            )));
        }
        let at = Utc::now();
        self.write(|tx| {
            let Some(r) = tx.one(
                "SELECT status, owner, pid, pid_start, host, lease_owner FROM runs WHERE id = ?1",
                p![id],
            )?
            else {
                return Err(StoreError::not_found(format!("run {id} not found")));
            };
            let current: Status = r.parsed(0)?;
            if current != Status::Running {
                return Err(StoreError::conflict(format!(
                    "run {id} is already {}",
                    current.label()
                )));
            }
            let owner: Owner = r.parsed(1)?;
            let pid = r.opt_int(2)?;
            let shown = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string());
            if owner == Owner::Pipe && !force {
                match r.opt_text(5)? {
                    Some(lease_owner) => match owner_lease(tx, &lease_owner)? {
                        Some(l) if !l.lost(at) => {
                            let here = l.host_identity.is_some()
                                && l.host_identity == engine::host::host_identity();
                            if here {
                                let shown = l
                                    .pid
                                    .map_or_else(|| "unknown".to_string(), |p| p.to_string());
                                return Err(StoreError::conflict(format!(
                                    "run {id} is owned by a live `pipe run` (pid {shown}), which \
                                     records its end itself; stop that process (Ctrl-C, or \
                                     `kill {shown}`) to cancel it, or pass --force"
                                )));
                            }
                            return Err(StoreError::conflict(format!(
                                "run {id} is owned by {} whose lease is live (until {}); it \
                                 records the run's end itself; pass --force to finish the run \
                                 anyway",
                                l.label(),
                                ts(l.expires_at)
                            )));
                        }
                        _ => {}
                    },
                    None => {
                        let (start, host) = (r.opt_text(3)?, r.opt_text(4)?);
                        match owner_liveness(pid, start.as_deref(), host.as_deref()) {
                            Liveness::Dead => {}
                            Liveness::Alive => {
                                return Err(StoreError::conflict(format!(
                                    "run {id} is owned by a live `pipe run` (pid {shown}), which \
                                     records its end itself; stop that process (Ctrl-C, or \
                                     `kill {shown}`) to cancel it, or pass --force"
                                )))
                            }
                            Liveness::Unknown => {
                                return Err(StoreError::conflict(format!(
                                    "run {id} is owned by a `pipe run` (pid {shown}) in another \
                                     pid namespace or before a reboot, and pipe cannot tell from \
                                     here whether it is alive; pass --force to finish the run \
                                     anyway"
                                )))
                            }
                        }
                    }
                }
            }
            record_run_finished(tx, B::DIALECT, id, status, error, at)
        })
    }

    fn list_runs(&self, pipeline: Option<&str>, limit: usize) -> Result<Vec<RunRow>> {
        self.find_runs(&RunFilter {
            pipeline: pipeline.map(str::to_string),
            limit,
            ..Default::default()
        })
    }

    fn find_runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>> {
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1");
        let mut params: Vec<Value> = Vec::new();
        let mut add = |cond: &str, v: Value, params: &mut Vec<Value>| {
            params.push(v);
            sql.push_str(&format!(" AND {cond} ?{}", params.len()));
        };
        if let Some(p) = &filter.pipeline {
            add("pipeline =", p.into(), &mut params);
        }
        if let Some(s) = filter.status {
            add("status =", s.as_str().into(), &mut params);
        }
        if let Some(t) = filter.trigger {
            add(r#""trigger" ="#, t.as_str().into(), &mut params);
        }
        if let Some(b) = filter.before_id {
            add("id <", b.into(), &mut params);
        }
        if let Some(t) = filter.since {
            add("started_at >=", t.into(), &mut params);
        }
        if let Some(t) = filter.until {
            add("started_at <", t.into(), &mut params);
        }
        params.push(limit_value(filter.limit).into());
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", params.len()));
        self.read(|tx| tx.query(&sql, &params)?.iter().map(run_row).collect())
    }

    fn steps_of_runs(&self, ids: &[i64]) -> Result<Vec<(i64, StepRow)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().copied().take(1000).collect();
        let list = ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        // Integers only, formatted here: no text reaches the statement.
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT run_id, {STEP_COLUMNS} FROM step_runs WHERE run_id IN ({list})
                     ORDER BY run_id, run_attempt, id"
                ),
                p![],
            )?
            .into_iter()
            .map(|r| {
                let run = r.int(0)?;
                Ok((run, step_row(&Row(r.0[1..].to_vec()))?))
            })
            .collect()
        })
    }

    fn run_counts(&self) -> Result<Vec<(Status, u64)>> {
        self.read(|tx| {
            tx.query("SELECT status, COUNT(*) FROM runs GROUP BY status", p![])?
                .iter()
                .map(|r| Ok((r.parsed(0)?, r.opt_u64(1)?.unwrap_or(0))))
                .collect()
        })
    }

    fn get_run(&self, id: i64) -> Result<Option<RunDetail>> {
        self.read(|tx| {
            let Some(run) = tx.one(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                p![id],
            )?
            else {
                return Ok(None);
            };
            let run = run_row(&run)?;
            let steps = tx
                .query(
                    &format!(
                        "SELECT {STEP_COLUMNS} FROM step_runs WHERE run_id = ?1
                         ORDER BY run_attempt, id"
                    ),
                    p![id],
                )?
                .iter()
                .map(step_row)
                .collect::<Result<Vec<_>>>()?;
            let log_count = tx
                .one("SELECT COUNT(*) FROM logs WHERE run_id = ?1", p![id])?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
            Ok(Some(RunDetail {
                run,
                steps,
                log_count: log_count.max(0) as u64,
            }))
        })
    }

    fn run_status(&self, id: i64) -> Result<Option<Status>> {
        self.read(|tx| {
            tx.one("SELECT status FROM runs WHERE id = ?1", p![id])?
                .map(|r| r.parsed(0))
                .transpose()
        })
    }

    fn logs_page(&self, id: i64, after_id: i64, limit: usize) -> Result<Vec<LogRow>> {
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {LOG_COLUMNS} FROM logs WHERE run_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                ),
                p![id, after_id, limit_value(limit)],
            )?
            .iter()
            .map(log_row)
            .collect()
        })
    }

    fn logs_tail(&self, id: i64, limit: usize) -> Result<Vec<LogRow>> {
        let mut rows: Vec<LogRow> = self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {LOG_COLUMNS} FROM logs WHERE run_id = ?1 ORDER BY id DESC LIMIT ?2"
                ),
                p![id, limit_value(limit)],
            )?
            .iter()
            .map(log_row)
            .collect::<Result<_>>()
        })?;
        rows.reverse();
        Ok(rows)
    }

    fn rows_since(&self, pipeline: &str, kind: &str, since: DateTime<Utc>) -> Result<u64> {
        self.read(|tx| {
            let n = tx
                .one(
                    r#"SELECT CAST(COALESCE(SUM(s."rows"), 0) AS BIGINT)
                       FROM step_runs s JOIN runs r ON r.id = s.run_id
                       WHERE r.pipeline = ?1 AND s.kind = ?2 AND s.finished_at >= ?3"#,
                    p![pipeline, kind, since],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
            Ok(n.max(0) as u64)
        })
    }

    fn start_attempt(&self, run_id: i64, owner: Option<&str>, now: DateTime<Utc>) -> Result<u32> {
        let pid = std::process::id();
        let (pid_start, host) = (
            engine::host::process_start(pid),
            engine::host::host_identity(),
        );
        self.write(|tx| {
            let Some(r) = tx.one("SELECT status, attempt FROM runs WHERE id = ?1", p![run_id])?
            else {
                return Err(StoreError::not_found(format!("run {run_id} not found")));
            };
            let status: Status = r.parsed(0)?;
            if !status.is_finished() {
                return Err(StoreError::conflict(format!(
                    "run {run_id} is still {}",
                    status.label()
                )));
            }
            let next = r.opt_int(1)?.unwrap_or(1) + 1;
            tx.exec(
                "UPDATE runs SET attempt = ?2, status = 'running', finished_at = NULL,
                     error = NULL, cancel_requested_at = NULL, lease_owner = ?3, owner = 'pipe',
                     pid = ?4, pid_start = ?5, host = ?6, fence = NULL
                 WHERE id = ?1",
                p![
                    run_id,
                    next,
                    owner,
                    i64::from(pid),
                    pid_start.as_deref(),
                    host.as_deref()
                ],
            )?;
            touch_last_run(tx, run_id, now)?;
            Ok(u32::try_from(next).unwrap_or(u32::MAX))
        })
    }

    fn request_cancel(&self, run_id: i64, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE runs SET cancel_requested_at = ?2 WHERE id = ?1 AND status = 'running'",
                p![run_id, now],
            )?;
            changed_or_missing(tx, n, "runs", run_id.into(), || format!("run {run_id}"))
        })
    }

    fn cancel_requested(&self, run_id: i64) -> Result<bool> {
        self.read(|tx| {
            Ok(tx
                .one(
                    "SELECT 1 FROM runs WHERE id = ?1 AND status = 'running'
                     AND cancel_requested_at IS NOT NULL",
                    p![run_id],
                )?
                .is_some())
        })
    }

    fn consecutive_failures(&self, pipeline: &str) -> Result<u32> {
        self.read(|tx| {
            let rows = tx.query(
                "SELECT status FROM runs WHERE pipeline = ?1
                   AND status IN ('succeeded', 'warning', 'failed')
                 ORDER BY id DESC LIMIT 1000",
                p![pipeline],
            )?;
            let mut n = 0;
            for r in rows {
                if r.parsed::<Status>(0)? != Status::Failed {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
    }

    fn upsert_integration(&self, name: &str, description: Option<&str>) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO integrations(name, description) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE
                 SET description = COALESCE(excluded.description, integrations.description)",
                p![name, description],
            )?;
            bump_integrations(tx)?;
            Ok(())
        })
    }

    fn load_integration(&self, file: &IntegrationFile, now: DateTime<Utc>) -> Result<()> {
        let mut metadata = file.metadata.clone();
        if file.retry_on_lost {
            match &mut metadata {
                serde_json::Value::Object(m) => {
                    m.insert("retry_on_lost".into(), true.into());
                }
                _ => metadata = serde_json::json!({ "retry_on_lost": true }),
            }
        }
        let metadata = json_text(&metadata)?;
        self.write(|tx| {
            tx.exec(
                "INSERT INTO integrations(name, description, path, content_hash, metadata, queue,
                                          priority, max_concurrent_runs, loaded_at, removed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)
                 ON CONFLICT(name) DO UPDATE SET
                     description = excluded.description,
                     path = excluded.path,
                     content_hash = excluded.content_hash,
                     metadata = excluded.metadata,
                     queue = excluded.queue,
                     priority = excluded.priority,
                     max_concurrent_runs = excluded.max_concurrent_runs,
                     loaded_at = excluded.loaded_at,
                     load_error = NULL,
                     load_error_at = NULL,
                     removed = 0",
                p![
                    file.name.as_str(),
                    file.description.as_deref(),
                    file.path.as_str(),
                    file.content_hash.as_str(),
                    metadata.as_str(),
                    file.queue.as_str(),
                    file.priority,
                    file.max_concurrent_runs,
                    now
                ],
            )?;
            bump_integrations(tx)?;
            Ok(())
        })
    }

    fn set_load_error(&self, name: &str, error: Option<&str>, now: DateTime<Utc>) -> Result<()> {
        self.write(|tx| {
            ensure_integration(tx, name)?;
            tx.exec(
                "UPDATE integrations SET load_error = ?2, load_error_at = ?3 WHERE name = ?1",
                p![name, error, error.map(|_| now)],
            )?;
            bump_integrations(tx)?;
            Ok(())
        })
    }

    fn set_enabled(&self, name: &str, enabled: bool, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            ensure_integration(tx, name)?;
            let was = tx
                .one("SELECT enabled FROM integrations WHERE name = ?1", p![name])?
                .map(|r| r.bool(0))
                .transpose()?
                .unwrap_or(true);
            if was == enabled {
                return Ok(false);
            }
            if enabled {
                tx.exec(
                    "UPDATE integrations SET enabled = 1, resumed_at = ?2 WHERE name = ?1",
                    p![name, now],
                )?;
            } else {
                // A disabled integration has no next run (the planner writes one again
                // when it is enabled).
                tx.exec(
                    "UPDATE integrations SET enabled = 0, next_run_at = NULL WHERE name = ?1",
                    p![name],
                )?;
            }
            bump_integrations(tx)?;
            Ok(true)
        })
    }

    fn is_enabled(&self, name: &str) -> Result<bool> {
        self.read(|tx| {
            Ok(tx
                .one("SELECT enabled FROM integrations WHERE name = ?1", p![name])?
                .map(|r| r.bool(0))
                .transpose()?
                .unwrap_or(true))
        })
    }

    fn set_removed(&self, name: &str, removed: bool, _now: DateTime<Utc>) -> Result<()> {
        self.write(|tx| {
            ensure_integration(tx, name)?;
            tx.exec(
                "UPDATE integrations SET removed = ?2 WHERE name = ?1",
                p![name, removed],
            )?;
            bump_integrations(tx)?;
            Ok(())
        })
    }

    fn set_next_run(&self, name: &str, next: Option<DateTime<Utc>>) -> Result<()> {
        self.write(|tx| {
            ensure_integration(tx, name)?;
            tx.exec(
                "UPDATE integrations SET next_run_at = ?2 WHERE name = ?1",
                p![name, next],
            )?;
            Ok(())
        })
    }

    fn list_integrations(&self) -> Result<Vec<Integration>> {
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {INTEGRATION_COLUMNS} FROM integrations i
                     LEFT JOIN runs r ON r.id = i.last_run_id ORDER BY i.name"
                ),
                p![],
            )?
            .iter()
            .map(integration_row)
            .collect()
        })
    }

    fn get_integration(&self, name: &str) -> Result<Option<Integration>> {
        self.read(|tx| {
            tx.one(
                &format!(
                    "SELECT {INTEGRATION_COLUMNS} FROM integrations i
                     LEFT JOIN runs r ON r.id = i.last_run_id WHERE i.name = ?1"
                ),
                p![name],
            )?
            .map(|r| integration_row(&r))
            .transpose()
        })
    }

    fn integrations_version(&self) -> Result<i64> {
        self.read(|tx| {
            Ok(tx
                .one(
                    "SELECT value FROM store_meta WHERE key = 'integrations_version'",
                    p![],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0))
        })
    }

    fn schedule_cursor(&self, integration: &str) -> Result<Option<ScheduleCursor>> {
        self.read(|tx| {
            let Some(r) = tx.one(
                "SELECT schedule_cursor, schedule_fingerprint FROM integrations WHERE name = ?1",
                p![integration],
            )?
            else {
                return Ok(None);
            };
            match r.opt_time(0)? {
                Some(last_planned) => Ok(Some(ScheduleCursor {
                    last_planned,
                    fingerprint: r.opt_text(1)?.unwrap_or_default(),
                })),
                None => Ok(None),
            }
        })
    }

    fn record_ticks(
        &self,
        integration: &str,
        fingerprint: &str,
        ticks: &[PlannedTick],
        cursor: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<TickOutcome>> {
        self.write(|tx| record_ticks_tx(tx, integration, fingerprint, ticks, cursor, None, now))
    }

    fn record_ticks_many(
        &self,
        batches: &[TickBatch],
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<TickOutcome>>> {
        // Rows are locked in name order, whatever the caller's order, so two servers
        // planning the same integrations never deadlock on each other.
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|&a, &b| batches[a].integration.cmp(&batches[b].integration));
        if B::DIALECT == Dialect::Postgres {
            return self.write(|tx| record_ticks_multi_row(tx, batches, &order, now));
        }
        self.write(|tx| {
            let mut out: Vec<Vec<TickOutcome>> = vec![Vec::new(); batches.len()];
            for &i in &order {
                let b = &batches[i];
                out[i] = record_ticks_tx(
                    tx,
                    &b.integration,
                    &b.fingerprint,
                    &b.ticks,
                    b.cursor,
                    b.next_run,
                    now,
                )?;
            }
            Ok(out)
        })
    }

    fn schedule_cursors(&self) -> Result<HashMap<String, ScheduleCursor>> {
        self.read(|tx| {
            let mut out = HashMap::new();
            for r in tx.query(
                "SELECT name, schedule_cursor, schedule_fingerprint FROM integrations
                 WHERE schedule_cursor IS NOT NULL",
                p![],
            )? {
                out.insert(
                    r.text(0)?,
                    ScheduleCursor {
                        last_planned: r.time(1)?,
                        fingerprint: r.opt_text(2)?.unwrap_or_default(),
                    },
                );
            }
            Ok(out)
        })
    }

    fn integration_counts(&self) -> Result<HashMap<String, IntegrationCounts>> {
        self.read(|tx| {
            let mut out: HashMap<String, IntegrationCounts> = HashMap::new();
            for r in tx.query(
                "SELECT pipeline, COUNT(*) FROM runs WHERE status = 'running' GROUP BY pipeline",
                p![],
            )? {
                out.entry(r.text(0)?).or_default().active += r.opt_u64(1)?.unwrap_or(0);
            }
            for r in tx.query(
                "SELECT integration, state, COUNT(*) FROM queue
                 WHERE state = 'queued' OR (state = 'claimed' AND run_id IS NULL)
                 GROUP BY integration, state",
                p![],
            )? {
                let n = r.opt_u64(2)?.unwrap_or(0);
                let c = out.entry(r.text(0)?).or_default();
                match r.parsed::<QueueState>(1)? {
                    QueueState::Queued => c.queued += n,
                    _ => c.active += n,
                }
            }
            Ok(out)
        })
    }

    fn list_ticks(&self, integration: &str, limit: usize) -> Result<Vec<TickRow>> {
        self.read(|tx| {
            tx.query(
                "SELECT integration, scheduled_at, planned_at, state, queue_item, note
                 FROM ticks WHERE integration = ?1 ORDER BY scheduled_at DESC LIMIT ?2",
                p![integration, limit_value(limit)],
            )?
            .iter()
            .map(|r| {
                Ok(TickRow {
                    integration: r.text(0)?,
                    scheduled_at: r.time(1)?,
                    planned_at: r.time(2)?,
                    state: r.parsed(3)?,
                    queue_item: r.opt_int(4)?,
                    note: r.opt_text(5)?,
                })
            })
            .collect()
        })
    }

    fn cancel_item(&self, item_id: i64, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE queue SET state = 'cancelled', finished_at = ?2
                 WHERE id = ?1 AND state = 'queued'",
                p![item_id, now],
            )?;
            changed_or_missing(tx, n, "queue", item_id.into(), || {
                format!("queue item {item_id}")
            })
        })
    }

    fn list_queue(&self, filter: &QueueFilter) -> Result<Vec<QueueItem>> {
        let mut sql = format!("SELECT {QUEUE_COLUMNS} FROM queue WHERE 1 = 1");
        let mut params: Vec<Value> = Vec::new();
        if let Some(i) = &filter.integration {
            params.push(i.into());
            sql.push_str(&format!(" AND integration = ?{}", params.len()));
        }
        if let Some(s) = filter.state {
            params.push(s.as_str().into());
            sql.push_str(&format!(" AND state = ?{}", params.len()));
        }
        if let Some(b) = filter.backfill_id {
            params.push(b.into());
            sql.push_str(&format!(" AND backfill_id = ?{}", params.len()));
        }
        params.push(limit_value(filter.limit).into());
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", params.len()));
        self.read(|tx| tx.query(&sql, &params)?.iter().map(queue_row).collect())
    }

    fn get_item(&self, item_id: i64) -> Result<Option<QueueItem>> {
        self.read(|tx| {
            tx.one(
                &format!("SELECT {QUEUE_COLUMNS} FROM queue WHERE id = ?1"),
                p![item_id],
            )?
            .map(|r| queue_row(&r))
            .transpose()
        })
    }

    fn count_queued(&self, integration: &str) -> Result<u64> {
        self.read(|tx| {
            Ok(tx
                .one(
                    "SELECT COUNT(*) FROM queue WHERE integration = ?1 AND state = 'queued'",
                    p![integration],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0)
                .max(0) as u64)
        })
    }

    fn count_active(&self, integration: &str) -> Result<u64> {
        self.read(|tx| {
            Ok(tx
                .one(
                    &format!(
                        "SELECT {} FROM integrations WHERE name = ?1",
                        ACTIVE.replace("q.integration", "?1")
                    ),
                    p![integration],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0)
                .max(0) as u64)
        })
    }

    fn create_backfill(&self, new: &NewBackfill, now: DateTime<Utc>) -> Result<i64> {
        self.write(|tx| {
            ensure_integration(tx, &new.integration)?;
            tx.one(
                "INSERT INTO backfills(integration, from_at, to_at, max_parallel, state, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'active', ?5) RETURNING id",
                p![
                    new.integration.as_str(),
                    new.from,
                    new.to,
                    new.max_parallel,
                    now
                ],
            )?
            .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("INSERT returned no id")))?
            .int(0)
        })
    }

    fn list_backfills(&self, integration: Option<&str>) -> Result<Vec<Backfill>> {
        let counts = |state: &str| {
            format!(
                "(SELECT COUNT(*) FROM queue q WHERE q.backfill_id = b.id AND q.state = '{state}')"
            )
        };
        let mut sql = format!(
            "SELECT b.id, b.integration, b.from_at, b.to_at, b.max_parallel, b.state, b.created_at,
                    {}, {}, {}, {}
             FROM backfills b",
            counts("queued"),
            counts("claimed"),
            counts("done"),
            counts("cancelled")
        );
        let params: Vec<Value> = match integration {
            Some(i) => {
                sql.push_str(" WHERE b.integration = ?1");
                vec![i.into()]
            }
            None => vec![],
        };
        sql.push_str(" ORDER BY b.id DESC");
        self.read(|tx| {
            tx.query(&sql, &params)?
                .iter()
                .map(|r| {
                    Ok(Backfill {
                        id: r.int(0)?,
                        integration: r.text(1)?,
                        from: r.time(2)?,
                        to: r.time(3)?,
                        max_parallel: r.opt_u32(4)?,
                        state: r.parsed(5)?,
                        created_at: r.time(6)?,
                        queued: r.opt_u64(7)?.unwrap_or(0),
                        claimed: r.opt_u64(8)?.unwrap_or(0),
                        done: r.opt_u64(9)?.unwrap_or(0),
                        cancelled: r.opt_u64(10)?.unwrap_or(0),
                    })
                })
                .collect()
        })
    }

    fn cancel_backfill(&self, id: i64, now: DateTime<Utc>) -> Result<u64> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE backfills SET state = 'cancelled' WHERE id = ?1",
                p![id],
            )?;
            if n == 0 {
                return Err(StoreError::not_found(format!("backfill {id} not found")));
            }
            tx.exec(
                "UPDATE queue SET state = 'cancelled', finished_at = ?2
                 WHERE backfill_id = ?1 AND state = 'queued'",
                p![id, now],
            )
        })
    }

    fn heartbeat(&self, owner: &LeaseOwner, ttl: Duration, now: DateTime<Utc>) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO leases(name, kind, owner, role, host, host_identity, pid, pid_start,
                                    acquired_at, heartbeat_at, expires_at)
                 VALUES (?1, 'owner', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)
                 ON CONFLICT(name) DO UPDATE SET
                     heartbeat_at = excluded.heartbeat_at,
                     expires_at = excluded.expires_at",
                p![
                    owner.id.as_str(),
                    owner.role.as_str(),
                    owner.host.as_str(),
                    owner.host_identity.as_deref(),
                    owner.pid,
                    owner.pid_start.as_deref(),
                    now,
                    plus(now, ttl)
                ],
            )?;
            Ok(())
        })
    }

    fn release(&self, owner_id: &str) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "DELETE FROM leases WHERE name = ?1 AND kind = 'owner'",
                p![owner_id],
            )?;
            Ok(())
        })
    }

    fn try_lead(
        &self,
        name: &str,
        owner: &LeaseOwner,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let key = format!("leader:{name}");
        self.write(|tx| {
            // A holder in this pid namespace whose process is gone may be replaced at once.
            let stale = match tx.one(
                "SELECT owner, host_identity, pid, pid_start FROM leases WHERE name = ?1",
                p![key.as_str()],
            )? {
                Some(r) => {
                    let dead = r.opt_text(1)?.is_some()
                        && r.opt_text(1)? == engine::host::host_identity()
                        && !owner_alive(r.opt_int(2)?, r.opt_text(3)?.as_deref());
                    if dead {
                        r.opt_text(0)?
                    } else {
                        None
                    }
                }
                None => None,
            };
            let won = tx.one(
                "INSERT INTO leases(name, kind, owner, role, host, host_identity, pid, pid_start,
                                    acquired_at, heartbeat_at, expires_at)
                 VALUES (?1, 'leader', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
                 ON CONFLICT(name) DO UPDATE SET
                     acquired_at = CASE WHEN leases.owner = excluded.owner
                                        THEN leases.acquired_at ELSE excluded.acquired_at END,
                     owner = excluded.owner, role = excluded.role, host = excluded.host,
                     host_identity = excluded.host_identity, pid = excluded.pid,
                     pid_start = excluded.pid_start,
                     heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at
                 WHERE leases.owner = excluded.owner OR leases.expires_at < excluded.heartbeat_at
                       OR leases.owner = ?10
                 RETURNING owner",
                p![
                    key.as_str(),
                    owner.id.as_str(),
                    owner.role.as_str(),
                    owner.host.as_str(),
                    owner.host_identity.as_deref(),
                    owner.pid,
                    owner.pid_start.as_deref(),
                    now,
                    plus(now, ttl),
                    stale.as_deref().unwrap_or("")
                ],
            )?;
            Ok(won.is_some())
        })
    }

    fn resign(&self, name: &str, owner_id: &str) -> Result<()> {
        let key = format!("leader:{name}");
        self.write(|tx| {
            tx.exec(
                "DELETE FROM leases WHERE name = ?1 AND owner = ?2",
                p![key.as_str(), owner_id],
            )?;
            Ok(())
        })
    }

    fn list_leases(&self) -> Result<Vec<LeaseRow>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {LEASE_COLUMNS} FROM leases ORDER BY name"),
                p![],
            )?
            .iter()
            .map(lease_row)
            .collect()
        })
    }

    fn prune(&self, older_than: DateTime<Utc>) -> Result<Pruned> {
        self.write(|tx| {
            let ticks = tx.exec(
                "DELETE FROM ticks WHERE scheduled_at < ?1 AND scheduled_at < COALESCE(
                     (SELECT i.schedule_cursor FROM integrations i
                      WHERE i.name = ticks.integration), '')",
                p![older_than],
            )?;
            let queue_items = tx.exec(
                "DELETE FROM queue WHERE state IN ('done', 'cancelled') AND finished_at < ?1",
                p![older_than],
            )?;
            let leases = tx.exec(
                "DELETE FROM leases WHERE kind = 'owner' AND expires_at < ?1",
                p![older_than],
            )?;
            let workers = tx.exec(
                "DELETE FROM workers WHERE COALESCE(stopped_at, heartbeat_at) < ?1",
                p![older_than],
            )?;
            Ok(Pruned {
                ticks,
                queue_items,
                leases,
                workers,
            })
        })
    }

    fn expire_lost(&self, now: DateTime<Utc>) -> Result<Vec<LostRun>> {
        // Judge outside the write lock (reading /proc takes a moment), then mark in one
        // transaction, each row only if it is still running.
        struct Candidate {
            id: i64,
            lease_owner: Option<String>,
            why: String,
        }
        let (runs, items) = self.read(|tx| {
            let leases = owner_leases(tx)?;
            let mut runs = Vec::new();
            for r in tx.query(
                "SELECT id, pid, pid_start, host, lease_owner FROM runs
                 WHERE status = 'running' AND owner = 'pipe' ORDER BY id",
                p![],
            )? {
                let (id, pid) = (r.int(0)?, r.opt_int(1)?);
                match r.opt_text(4)? {
                    Some(lo) => {
                        let why = match leases.get(&lo) {
                            None => Some(format!(
                                "its owner ({lo}) holds no lease: it stopped without finishing \
                                 the run"
                            )),
                            Some(l) if l.provably_dead() => Some(format!(
                                "the pipe process that owned it ({}) ended while the run was \
                                 running",
                                l.label()
                            )),
                            Some(l) if l.expires_at < now => Some(format!(
                                "its owner ({}) stopped renewing its lease (expired {}): it \
                                 ended while the run was running",
                                l.label(),
                                ts(l.expires_at)
                            )),
                            Some(_) => None,
                        };
                        if let Some(why) = why {
                            runs.push(Candidate {
                                id,
                                lease_owner: Some(lo),
                                why,
                            });
                        }
                    }
                    None => {
                        let (start, host) = (r.opt_text(2)?, r.opt_text(3)?);
                        // A run whose owner cannot be seen from here stays running.
                        if owner_liveness(pid, start.as_deref(), host.as_deref()) == Liveness::Dead
                        {
                            let why = match pid {
                                Some(pid) => format!(
                                    "the pipe process (pid {pid}) ended while the run was running"
                                ),
                                None => {
                                    "the pipe process ended while the run was running".to_string()
                                }
                            };
                            runs.push(Candidate {
                                id,
                                lease_owner: None,
                                why,
                            });
                        }
                    }
                }
            }
            // Claimed items that never got a run, whose claimer is lost.
            let mut items = Vec::new();
            for r in tx.query(
                "SELECT id, claimed_by, claim_expires_at FROM queue
                 WHERE state = 'claimed' AND run_id IS NULL ORDER BY id",
                p![],
            )? {
                let by = r.opt_text(1)?.unwrap_or_default();
                let lost = match leases.get(&by) {
                    Some(l) => l.lost(now),
                    None => r.opt_time(2)?.is_none_or(|t| t < now),
                };
                if lost {
                    items.push(r.int(0)?);
                }
            }
            Ok((runs, items))
        })?;
        if runs.is_empty() && items.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|tx| {
            let mut lost = Vec::new();
            for c in &runs {
                let changed = tx.exec(
                    "UPDATE runs SET status = 'abandoned', finished_at = ?2,
                         error = COALESCE(error, ?3)
                     WHERE id = ?1 AND status = 'running'",
                    p![c.id, now, c.why.as_str()],
                )?;
                if changed == 0 {
                    continue;
                }
                tx.exec(
                    "UPDATE step_runs SET status = 'abandoned', finished_at = ?2
                     WHERE run_id = ?1 AND status = 'running'",
                    p![c.id, now],
                )?;
                touch_last_run(tx, c.id, now)?;
                let r = tx
                    .one(
                        "SELECT pipeline, queue_item FROM runs WHERE id = ?1",
                        p![c.id],
                    )?
                    .ok_or_else(|| StoreError::not_found(format!("run {} not found", c.id)))?;
                let mut queue_item = None;
                if let Some(item) = r.opt_int(1)? {
                    tx.exec(
                        "UPDATE queue SET state = 'done', finished_at = ?2
                         WHERE id = ?1 AND state = 'claimed'",
                        p![item, now],
                    )?;
                    queue_item = tx
                        .one(
                            &format!("SELECT {QUEUE_COLUMNS} FROM queue WHERE id = ?1"),
                            p![item],
                        )?
                        .map(|r| queue_row(&r))
                        .transpose()?;
                }
                let pipeline = r.text(0)?;
                let requeued = match &queue_item {
                    Some(item) => requeue_lost(tx, item, now)?,
                    None => None,
                };
                lost.push(LostRun {
                    run_id: c.id,
                    pipeline,
                    lease_owner: c.lease_owner.clone(),
                    queue_item,
                    requeued,
                });
            }
            for &item in &items {
                // Back in the queue, unless an equal item was queued meanwhile.
                let key = tx
                    .one(
                        "SELECT dedup_key FROM queue WHERE id = ?1 AND state = 'claimed'
                         AND run_id IS NULL",
                        p![item],
                    )?
                    .map(|r| r.opt_text(0))
                    .transpose()?;
                let Some(key) = key else { continue };
                let duplicate = match &key {
                    Some(k) => tx
                        .one(
                            "SELECT 1 FROM queue WHERE dedup_key = ?1 AND state = 'queued'",
                            p![k.as_str()],
                        )?
                        .is_some(),
                    None => false,
                };
                if duplicate {
                    tx.exec(
                        "UPDATE queue SET state = 'cancelled', finished_at = ?2 WHERE id = ?1",
                        p![item, now],
                    )?;
                } else {
                    tx.exec(
                        "UPDATE queue SET state = 'queued', claimed_by = NULL, claimed_at = NULL,
                             claim_expires_at = NULL, published_at = NULL
                         WHERE id = ?1",
                        p![item],
                    )?;
                    tx.queue_changed()?;
                }
            }
            Ok(lost)
        })
    }

    fn unpublished(&self, limit: usize) -> Result<Vec<QueueItem>> {
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {QUEUE_COLUMNS} FROM queue WHERE id IN ({PUBLISHABLE})
                     ORDER BY priority DESC, id LIMIT ?1"
                ),
                p![limit_value(limit)],
            )?
            .iter()
            .map(queue_row)
            .collect()
        })
    }

    fn wait_for_queue(&self, timeout: Duration) -> Result<bool> {
        self.backend.wait_for_queue(timeout)
    }

    fn unpublish(&self, item_id: i64) -> Result<bool> {
        self.write_grouped(move |tx| {
            Ok(tx.exec(
                "UPDATE queue SET published_at = NULL WHERE id = ?1 AND state = 'queued'",
                p![item_id],
            )? > 0)
        })
    }

    fn mark_published(&self, ids: &[i64], now: DateTime<Utc>) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids = ids.to_vec();
        self.write_grouped(move |tx| {
            let mut n = 0;
            for &id in &ids {
                n += tx.exec(
                    "UPDATE queue SET published_at = ?2 WHERE id = ?1 AND state = 'queued'",
                    p![id, now],
                )?;
            }
            Ok(n)
        })
    }

    fn stale_published(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<QueueItem>> {
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {QUEUE_COLUMNS} FROM queue
                     WHERE state = 'queued' AND published_at < ?1
                     ORDER BY priority DESC, id LIMIT ?2"
                ),
                p![before, limit_value(limit)],
            )?
            .iter()
            .map(queue_row)
            .collect()
        })
    }

    fn claim_item(
        &self,
        item_id: i64,
        worker: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<ItemClaim> {
        let worker = worker.to_string();
        self.write_grouped(move |tx| {
            let lock = if B::DIALECT == Dialect::Postgres {
                // Another claimer of this item waits here, then finds it claimed.
                " FOR UPDATE OF q"
            } else {
                ""
            };
            let Some(row) = tx.one(
                &format!("SELECT {CANDIDATE} WHERE q.id = ?1{lock}"),
                p![item_id],
            )?
            else {
                return Ok(ItemClaim::NotFound);
            };
            let c = candidate(&row)?;
            if c.state != QueueState::Queued {
                return Ok(ItemClaim::Gone { state: c.state });
            }
            if c.disabled {
                cancel_queued(tx, item_id, now)?;
                return Ok(ItemClaim::Disabled);
            }
            match room(tx, B::DIALECT, &c)? {
                Room::Free => {}
                Room::IntegrationFull | Room::BackfillFull(_) => return Ok(ItemClaim::Full),
            }
            match take_item(tx, item_id, &worker, lease, now)? {
                Some(item) => Ok(ItemClaim::Claimed(Box::new(item))),
                None => {
                    let state = tx
                        .one("SELECT state FROM queue WHERE id = ?1", p![item_id])?
                        .map(|r| r.parsed(0))
                        .transpose()?;
                    Ok(state.map_or(ItemClaim::NotFound, |state| ItemClaim::Gone { state }))
                }
            }
        })
    }

    fn register_worker(&self, info: &WorkerInfo, now: DateTime<Utc>) -> Result<()> {
        let queues = json_text(&serde_json::json!(info.queues))?;
        let lease_ms = u64::try_from(info.lease.as_millis()).unwrap_or(u64::MAX);
        self.write(|tx| {
            tx.exec(
                "INSERT INTO workers(id, host, pid, queues, slots, running, version, lease_ms,
                                     started_at, heartbeat_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, '[]', ?6, ?7, ?8, ?8)
                 ON CONFLICT(id) DO UPDATE SET
                     host = excluded.host, pid = excluded.pid, queues = excluded.queues,
                     slots = excluded.slots, version = excluded.version,
                     lease_ms = excluded.lease_ms, heartbeat_at = excluded.heartbeat_at,
                     stopped_at = NULL",
                p![
                    info.id.as_str(),
                    info.host.as_str(),
                    info.pid,
                    queues.as_str(),
                    info.slots,
                    info.version.as_deref(),
                    lease_ms,
                    now
                ],
            )?;
            Ok(())
        })
    }

    fn worker_heartbeat(
        &self,
        id: &str,
        running: &[i64],
        now: DateTime<Utc>,
    ) -> Result<WorkerControl> {
        let running = json_text(&serde_json::json!(running))?;
        self.write(|tx| {
            let Some(r) = tx.one(
                "UPDATE workers SET running = ?2, heartbeat_at = ?3 WHERE id = ?1
                 RETURNING drain_requested_at",
                p![id, running.as_str(), now],
            )?
            else {
                return Err(StoreError::not_found(format!("worker {id} not found")));
            };
            Ok(WorkerControl {
                drain_requested: r.opt_text(0)?.is_some(),
            })
        })
    }

    fn list_workers(&self, now: DateTime<Utc>) -> Result<Vec<WorkerRow>> {
        self.read(|tx| {
            tx.query(
                "SELECT id, host, pid, queues, slots, running, version, lease_ms, started_at,
                        heartbeat_at, drain_requested_at, stopped_at
                 FROM workers ORDER BY started_at DESC, id",
                p![],
            )?
            .iter()
            .map(|r| {
                let lease_ms = r.opt_u64(7)?.unwrap_or(0);
                let heartbeat_at = r.time(9)?;
                let drain_requested_at = r.opt_time(10)?;
                let stopped_at = r.opt_time(11)?;
                let lease = chrono::Duration::milliseconds(i64::try_from(lease_ms).unwrap_or(0));
                let alive = stopped_at.is_none() && heartbeat_at + lease >= now;
                let state = match (stopped_at, alive, drain_requested_at) {
                    (Some(_), _, _) => WorkerState::Stopped,
                    (None, false, _) => WorkerState::Lost,
                    (None, true, Some(_)) => WorkerState::Draining,
                    (None, true, None) => WorkerState::Active,
                };
                let list = |i: usize| -> Result<serde_json::Value> { r.json(i) };
                Ok(WorkerRow {
                    id: r.text(0)?,
                    host: r.text(1)?,
                    pid: r.opt_int(2)?,
                    queues: serde_json::from_value(list(3)?).unwrap_or_default(),
                    slots: r.u32(4)?,
                    running: serde_json::from_value(list(5)?).unwrap_or_default(),
                    version: r.opt_text(6)?,
                    lease_ms,
                    started_at: r.time(8)?,
                    heartbeat_at,
                    drain_requested_at,
                    stopped_at,
                    alive,
                    state,
                })
            })
            .collect()
        })
    }

    fn request_drain(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE workers SET drain_requested_at = ?2
                 WHERE id = ?1 AND drain_requested_at IS NULL AND stopped_at IS NULL",
                p![id, now],
            )?;
            changed_or_missing(tx, n, "workers", id.into(), || format!("worker {id}"))
        })
    }

    fn worker_stopped(&self, id: &str, now: DateTime<Utc>) -> Result<()> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE workers SET stopped_at = ?2, heartbeat_at = ?2, running = '[]'
                 WHERE id = ?1",
                p![id, now],
            )?;
            if n == 0 {
                return Err(StoreError::not_found(format!("worker {id} not found")));
            }
            Ok(())
        })
    }

    fn accounts(&self) -> &dyn crate::AccountStore {
        self
    }

    fn credentials(&self) -> &dyn crate::CredentialStore {
        self
    }
}
