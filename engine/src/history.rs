//! Run history in an embedded SQLite database (`<state_dir>/history.sqlite`).
//!
//! The model follows OneVizion's Integration → Integration Run → Log trackors:
//! `integrations` (one row per pipeline name, with an `enabled` switch and the last run),
//! `runs` (one row per run), `step_runs` (one row per step of a run) and `logs` (the log
//! rows, each with an optional attached file copied into `<state_dir>/runs/<id>/`).
//!
//! Several `pipe` processes may write at once: the database is in WAL mode, every write is a
//! `BEGIN IMMEDIATE` transaction (so the busy timeout applies to it), and a write that still
//! meets `SQLITE_BUSY` is tried again. Strings reaching this module are already redacted.
//!
//! [`HistoryWriter`] is the executor's [`Observer`]: a background thread with its own
//! connection that records events in batched transactions.

use crate::events::{Level, LogRecord, Observer, RunEvent, StepRecord};
use crate::status::Status;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The database file inside the state dir.
pub const DB_FILE: &str = "history.sqlite";
/// How long one statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a write that still met `SQLITE_BUSY` is tried again.
const BUSY_RETRIES: u32 = 10;
/// The writer thread commits at least this often while events keep coming.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// …and never puts more than this many events in one transaction.
const MAX_BATCH: usize = 2000;
/// The most event bytes waiting for the writer thread: a step producing log rows faster
/// than they are committed then waits (an exec step stops reading its child's output, and
/// the pipe's buffer makes the child wait in turn) instead of pipe's memory growing.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// What one queued event counts for besides its text.
const EVENT_OVERHEAD: usize = 256;
/// The log text stored in the database per step (and for the run's own rows), unless
/// `PIPE_LOG_LIMIT` (bytes) says otherwise; the rows past it go to a file in the run's folder
/// (`log-<step>.txt`) and one row says so.
pub const DEFAULT_LOG_LIMIT: u64 = 16 << 20;
/// The variable that overrides [`DEFAULT_LOG_LIMIT`].
pub const LOG_LIMIT_VAR: &str = "PIPE_LOG_LIMIT";

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE integrations (
    name        TEXT PRIMARY KEY,
    description TEXT,
    enabled     INTEGER NOT NULL DEFAULT 1,
    last_run_id INTEGER,
    last_run_at TEXT
);
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline     TEXT NOT NULL,
    params       TEXT NOT NULL DEFAULT '{}',
    "trigger"    TEXT NOT NULL,
    status       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    logical_date TEXT,
    error        TEXT,
    pid          INTEGER,
    pid_start    TEXT,
    owner        TEXT NOT NULL DEFAULT 'pipe'
);
CREATE INDEX runs_by_pipeline ON runs(pipeline, id);
CREATE INDEX runs_by_status ON runs(status);
CREATE TABLE step_runs (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    step        TEXT NOT NULL,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  TEXT,
    finished_at TEXT,
    duration_ms INTEGER,
    "rows"      INTEGER,
    error       TEXT,
    outputs     TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE logs (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    time        TEXT NOT NULL,
    level       TEXT NOT NULL,
    step        TEXT,
    message     TEXT NOT NULL,
    description TEXT,
    file        TEXT
);
CREATE INDEX logs_by_run ON logs(run_id, id);
"#,
    r#"
ALTER TABLE step_runs ADD COLUMN kind TEXT;
"#,
    // Where the owning `pipe run` lives (boot id and pid namespace, see [`host_identity`]):
    // a pid says nothing about a process in another namespace or after a reboot.
    r#"
ALTER TABLE runs ADD COLUMN host TEXT;
"#,
];

/// The run history as steps see it ([`crate::step::HistoryView`]): each question opens
/// the database afresh, so it can be shared between tasks and never holds a lock.
///
/// With the running run's writer, a question first waits for the events sent so far to be
/// committed, so the steps that finished earlier in this run count too.
#[derive(Debug, Clone)]
pub struct HistoryReader {
    pub state_dir: PathBuf,
    pub writer: Option<std::sync::Arc<HistoryWriter>>,
}

impl crate::step::HistoryView for HistoryReader {
    fn rows_since(
        &self,
        pipeline: &str,
        step_type: &str,
        since: DateTime<Utc>,
    ) -> std::result::Result<u64, String> {
        if let Some(w) = &self.writer {
            w.flush();
        }
        Store::open(&self.state_dir)
            .and_then(|s| s.rows_since(pipeline, step_type, since))
            .map_err(|e| format!("run history: {e:#}"))
    }
}

/// Who drives a run: `pipe run` (its process is watched, see [`Store::mark_abandoned`]) or
/// an outside script through `pipe runs start/log/finish` (never marked abandoned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    Pipe,
    External,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Pipe => "pipe",
            Owner::External => "external",
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pipe" => Ok(Owner::Pipe),
            "external" => Ok(Owner::External),
            other => Err(format!("unknown run owner `{other}`")),
        }
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `pipe run`.
    Cli,
    /// `pipe runs start`.
    External,
    /// A schedule.
    Schedule,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cli => "cli",
            Trigger::External => "external",
            Trigger::Schedule => "schedule",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cli" => Ok(Trigger::Cli),
            "external" => Ok(Trigger::External),
            "schedule" => Ok(Trigger::Schedule),
            other => Err(format!("unknown trigger `{other}`")),
        }
    }
}

/// A run about to start.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub pipeline: String,
    /// The run's params (already redacted), stored as JSON.
    pub params: serde_json::Value,
    pub trigger: Trigger,
    pub owner: Owner,
    pub logical_date: Option<DateTime<Utc>>,
}

/// One row of `pipe runs list`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub pipeline: String,
    pub status: Status,
    pub trigger: Trigger,
    pub owner: Owner,
    pub params: serde_json::Value,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `finished_at - started_at`, once finished.
    pub duration_ms: Option<u64>,
    pub logical_date: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// The `pipe run` process that owns the run (none for external runs).
    pub pid: Option<i64>,
}

/// One step of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    pub step: String,
    pub status: Status,
    pub attempts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
    pub rows: Option<u64>,
    pub error: Option<String>,
    pub outputs: serde_json::Value,
}

/// A run with its steps (in the order they started) and the number of its log rows.
#[derive(Debug, Clone, Serialize)]
pub struct RunDetail {
    #[serde(flatten)]
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    pub log_count: u64,
}

/// One log row.
#[derive(Debug, Clone, Serialize)]
pub struct LogRow {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub level: Level,
    pub step: Option<String>,
    pub message: String,
    pub description: Option<String>,
    /// The path of the attached file's copy in the run's folder.
    pub file: Option<String>,
}

/// A connection to the history database; one per process or thread.
pub struct Store {
    conn: Connection,
    state_dir: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.state_dir.display())
    }
}

impl Store {
    /// Open (creating the folder, the database and its schema when missing).
    pub fn open(state_dir: &Path) -> Result<Store> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
        let state_dir = std::path::absolute(state_dir)
            .with_context(|| format!("cannot resolve state dir {}", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("cannot open run history {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        retry(|| {
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                bail!(
                    "cannot switch {} to WAL mode (it is in {mode} mode)",
                    path.display()
                );
            }
            Ok(())
        })?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Store { conn, state_dir };
        store
            .migrate()
            .with_context(|| format!("cannot prepare run history {}", path.display()))?;
        Ok(store)
    }

    fn migrate(&self) -> Result<()> {
        let current: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current as usize == MIGRATIONS.len() {
            return Ok(());
        }
        self.write(|c| {
            // Read again under the write lock: another process may have migrated meanwhile.
            let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let version = usize::try_from(version).unwrap_or(usize::MAX);
            if version > MIGRATIONS.len() {
                bail!(
                    "the database has schema version {version}, newer than this pipe knows ({})",
                    MIGRATIONS.len()
                );
            }
            for sql in &MIGRATIONS[version..] {
                c.execute_batch(sql)?;
            }
            c.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
            Ok(())
        })
    }

    /// The state dir (absolute).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Run `f` in a `BEGIN IMMEDIATE` transaction, trying again on `SQLITE_BUSY`.
    fn write<T>(&self, mut f: impl FnMut(&Connection) -> Result<T>) -> Result<T> {
        retry(|| {
            if !self.conn.is_autocommit() {
                // Left open by a panic in an earlier call.
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let result = f(&self.conn).and_then(|v| {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            });
            if result.is_err() && !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            result
        })
    }

    /// Mark the runs of `pipe run` processes that are gone as `abandoned` (with their
    /// running steps). A process counts as gone when its pid is dead, a zombie, or now
    /// belongs to a process that started at another time. External runs are never touched.
    pub fn mark_abandoned(&self) -> Result<usize> {
        let candidates: Vec<RunOwner> = retry(|| {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, pid, pid_start, host FROM runs WHERE status = 'running' AND owner = 'pipe'",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        // A run whose owner cannot be seen from here (another pid namespace) stays running.
        let dead: Vec<(i64, Option<i64>)> = candidates
            .into_iter()
            .filter(|(_, pid, start, host)| {
                owner_liveness(*pid, start.as_deref(), host.as_deref()) == Liveness::Dead
            })
            .map(|(id, pid, _, _)| (id, pid))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let now = ts(Utc::now());
        self.write(|c| {
            let mut marked = 0;
            for (id, pid) in &dead {
                let why = match pid {
                    Some(pid) => format!("the pipe process (pid {pid}) ended while the run was running"),
                    None => "the pipe process ended while the run was running".to_string(),
                };
                let changed = c.execute(
                    "UPDATE runs SET status = 'abandoned', finished_at = ?2, error = COALESCE(error, ?3)
                     WHERE id = ?1 AND status = 'running'",
                    params![id, now, why],
                )?;
                if changed > 0 {
                    marked += 1;
                    c.execute(
                        "UPDATE step_runs SET status = 'abandoned', finished_at = ?2
                         WHERE run_id = ?1 AND status = 'running'",
                        params![id, now],
                    )?;
                }
            }
            Ok(marked)
        })
    }

    /// Create the integration row, or update its description when one is given.
    pub fn upsert_integration(&self, name: &str, description: Option<&str>) -> Result<()> {
        self.write(|c| {
            c.execute(
                "INSERT INTO integrations(name, description) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE
                 SET description = COALESCE(excluded.description, integrations.description)",
                params![name, description],
            )?;
            Ok(())
        })
    }

    /// Whether the integration may run (true when it has no row yet).
    pub fn is_enabled(&self, name: &str) -> Result<bool> {
        let enabled: Option<i64> = retry(|| {
            Ok(self
                .conn
                .query_row(
                    "SELECT enabled FROM integrations WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?)
        })?;
        Ok(enabled.is_none_or(|e| e != 0))
    }

    /// Create a run with status `running` and its folder. A `pipe`-owned run records this
    /// process's pid and start time; an external run records no pid.
    pub fn create_run(&self, new: &NewRun) -> Result<i64> {
        let started = ts(Utc::now());
        let (pid, pid_start, host) = match new.owner {
            Owner::Pipe => {
                let pid = std::process::id();
                (Some(i64::from(pid)), process_start(pid), host_identity())
            }
            Owner::External => (None, None, None),
        };
        let params_json = serde_json::to_string(&new.params)?;
        let logical = new.logical_date.map(ts);
        let id = self.write(|c| {
            c.execute(
                "INSERT INTO integrations(name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
                [&new.pipeline],
            )?;
            c.execute(
                r#"INSERT INTO runs(pipeline, params, "trigger", status, started_at, logical_date,
                                   pid, pid_start, owner, host)
                   VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?9)"#,
                params![
                    new.pipeline,
                    params_json,
                    new.trigger.as_str(),
                    started,
                    logical,
                    pid,
                    pid_start,
                    new.owner.as_str(),
                    host
                ],
            )?;
            let id = c.last_insert_rowid();
            c.execute(
                "UPDATE integrations SET last_run_id = ?1, last_run_at = ?2 WHERE name = ?3",
                params![id, started, new.pipeline],
            )?;
            Ok(id)
        })?;
        let dir = self.run_dir(id);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(id)
    }

    /// The run's folder for attached files: `<state_dir>/runs/<id>`.
    pub fn run_dir(&self, id: i64) -> PathBuf {
        self.state_dir.join("runs").join(id.to_string())
    }

    /// Add a log row; an attached file is copied into the run's folder (unless it is
    /// already there) and the copy's path is stored.
    pub fn add_log(&self, run_id: i64, rec: &LogRecord) -> Result<()> {
        let file = match &rec.file {
            Some(f) => Some(self.attach_file(run_id, Path::new(f))?),
            None => None,
        };
        self.write(|c| insert_log(c, run_id, rec, file.as_deref()))
    }

    /// Copy `src` into the run's folder under a free name and return the copy's path.
    fn attach_file(&self, run_id: i64, src: &Path) -> Result<String> {
        let dir = self.run_dir(run_id);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let src_abs = fs::canonicalize(src)
            .with_context(|| format!("cannot read attached file {}", src.display()))?;
        if !src_abs.is_file() {
            bail!("attached file {} is not a regular file", src.display());
        }
        let dir_abs = fs::canonicalize(&dir)?;
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
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", dest.display()))
                }
            };
            let copied =
                fs::File::open(&src_abs).and_then(|mut input| std::io::copy(&mut input, &mut out));
            if let Err(e) = copied {
                let _ = fs::remove_file(&dest);
                return Err(e).with_context(|| {
                    format!("cannot copy {} to {}", src.display(), dest.display())
                });
            }
            return Ok(dest.to_string_lossy().into_owned());
        }
        unreachable!("ran out of file names")
    }

    /// Finish a running run (`pipe runs finish`). Fails when the run does not exist
    /// ("run N not found"), is not running ("run N is already <status>"), or, unless
    /// `force`, belongs to a `pipe run` that is alive or that cannot be seen from here
    /// (another pid namespace or boot): that process would go on writing to it.
    pub fn finish_run(
        &self,
        id: i64,
        status: Status,
        error: Option<&str>,
        force: bool,
    ) -> Result<()> {
        if !status.is_finished() {
            bail!("cannot finish run {id} as {status}");
        }
        let at = Utc::now();
        self.write(|c| {
            type Current = (String, String, Option<i64>, Option<String>, Option<String>);
            let current: Option<Current> = c
                .query_row(
                    "SELECT status, owner, pid, pid_start, host FROM runs WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            let Some((current, owner, pid, pid_start, host)) = current else {
                bail!("run {id} not found");
            };
            match Status::from_str(&current) {
                Ok(Status::Running) => {}
                Ok(s) => bail!("run {id} is already {}", s.label()),
                Err(e) => bail!("run {id}: {e}"),
            }
            if owner == Owner::Pipe.as_str() && !force {
                let shown = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string());
                match owner_liveness(pid, pid_start.as_deref(), host.as_deref()) {
                    Liveness::Dead => {}
                    Liveness::Alive => bail!(
                        "run {id} is owned by a live `pipe run` (pid {shown}), which records \
                         its end itself; stop that process (Ctrl-C, or `kill {shown}`) to \
                         cancel it, or pass --force"
                    ),
                    Liveness::Unknown => bail!(
                        "run {id} is owned by a `pipe run` (pid {shown}) in another pid \
                         namespace or before a reboot, and pipe cannot tell from here whether \
                         it is alive; pass --force to finish the run anyway"
                    ),
                }
            }
            record_run_finished(c, id, status, error, at)
        })
    }

    /// The most recent runs (of one pipeline, when given), newest first. `limit` 0 means all.
    pub fn list_runs(&self, pipeline: Option<&str>, limit: usize) -> Result<Vec<RunRow>> {
        let limit = if limit == 0 {
            -1
        } else {
            i64::try_from(limit).unwrap_or(i64::MAX)
        };
        retry(|| {
            let rows = match pipeline {
                Some(p) => {
                    let mut stmt = self.conn.prepare_cached(&format!(
                        "SELECT {RUN_COLUMNS} FROM runs WHERE pipeline = ?1 ORDER BY id DESC LIMIT ?2"
                    ))?;
                    let rows = stmt.query_map(params![p, limit], run_row)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()?
                }
                None => {
                    let mut stmt = self.conn.prepare_cached(&format!(
                        "SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT ?1"
                    ))?;
                    let rows = stmt.query_map(params![limit], run_row)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            Ok(rows)
        })
    }

    /// A run's current status (cheaper than [`Store::get_run`], for polling).
    /// The rows handled by steps of type `kind` in `pipeline`'s runs that finished at or
    /// after `since` (a connector's "records in the last hour" for its heartbeat).
    pub fn rows_since(&self, pipeline: &str, kind: &str, since: DateTime<Utc>) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            r#"SELECT COALESCE(SUM(s."rows"), 0) FROM step_runs s JOIN runs r ON r.id = s.run_id
               WHERE r.pipeline = ?1 AND s.kind = ?2 AND s.finished_at >= ?3"#,
            params![pipeline, kind, ts(since)],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    pub fn run_status(&self, id: i64) -> Result<Option<Status>> {
        let s: Option<String> = retry(|| {
            Ok(self
                .conn
                .query_row("SELECT status FROM runs WHERE id = ?1", [id], |r| r.get(0))
                .optional()?)
        })?;
        s.map(|s| Status::from_str(&s).map_err(anyhow::Error::msg))
            .transpose()
    }

    /// A run with its steps and log count.
    pub fn get_run(&self, id: i64) -> Result<Option<RunDetail>> {
        retry(|| {
            // One read transaction, so the run, its steps and the count agree.
            let tx = self.conn.unchecked_transaction()?;
            let run = tx
                .query_row(
                    &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                    [id],
                    run_row,
                )
                .optional()?;
            let Some(run) = run else {
                return Ok(None);
            };
            let steps = {
                let mut stmt = tx.prepare_cached(
                    r#"SELECT step, status, attempts, started_at, finished_at, duration_ms, "rows",
                              error, outputs
                       FROM step_runs WHERE run_id = ?1 ORDER BY rowid"#,
                )?;
                let rows = stmt.query_map([id], step_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let log_count: i64 =
                tx.query_row("SELECT COUNT(*) FROM logs WHERE run_id = ?1", [id], |r| {
                    r.get(0)
                })?;
            tx.finish()?;
            Ok(Some(RunDetail {
                run,
                steps,
                log_count: log_count.max(0) as u64,
            }))
        })
    }

    /// The run's log rows with an id above `after_id` (0 for all), oldest first.
    pub fn logs(&self, id: i64, after_id: i64) -> Result<Vec<LogRow>> {
        retry(|| {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, time, level, step, message, description, file
                 FROM logs WHERE run_id = ?1 AND id > ?2 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![id, after_id], |r| {
                Ok(LogRow {
                    id: r.get(0)?,
                    time: get_time(r, 1)?,
                    level: get_parsed::<Level>(r, 2)?,
                    step: r.get(3)?,
                    message: r.get(4)?,
                    description: r.get(5)?,
                    file: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Record a batch of executor events in one transaction. When the batch fails for a
    /// reason other than a busy database, each event is tried on its own so one bad event
    /// does not lose the others.
    fn write_events(&self, run_id: i64, events: &[RunEvent]) -> Result<()> {
        // Copy attached files before taking the write lock.
        let files: Vec<Option<String>> = events
            .iter()
            .map(|e| match e {
                RunEvent::Log(LogRecord { file: Some(f), .. }) => Some(
                    self.attach_file(run_id, Path::new(f))
                        .unwrap_or_else(|_| f.clone()),
                ),
                _ => None,
            })
            .collect();
        let all = self.write(|c| {
            for (e, file) in events.iter().zip(&files) {
                apply_event(c, run_id, e, file.as_deref())?;
            }
            Ok(())
        });
        match all {
            Ok(()) => Ok(()),
            Err(e) if events.len() == 1 || is_busy(&e) => Err(e),
            Err(_) => {
                let mut first = None;
                for (e, file) in events.iter().zip(&files) {
                    if let Err(err) = self.write(|c| apply_event(c, run_id, e, file.as_deref())) {
                        first.get_or_insert(err);
                    }
                }
                first.map_or(Ok(()), Err)
            }
        }
    }
}

const RUN_COLUMNS: &str = r#"id, pipeline, status, "trigger", owner, params, started_at, finished_at,
    logical_date, error, pid"#;

fn run_row(r: &Row<'_>) -> rusqlite::Result<RunRow> {
    let params: Option<String> = r.get(5)?;
    let started_at = get_time(r, 6)?;
    let finished_at = get_opt_time(r, 7)?;
    Ok(RunRow {
        id: r.get(0)?,
        pipeline: r.get(1)?,
        status: get_parsed(r, 2)?,
        trigger: get_parsed(r, 3)?,
        owner: get_parsed(r, 4)?,
        params: parse_json(params.as_deref()),
        started_at,
        finished_at,
        duration_ms: finished_at.map(|f| (f - started_at).num_milliseconds().max(0) as u64),
        logical_date: get_opt_time(r, 8)?,
        error: r.get(9)?,
        pid: r.get(10)?,
    })
}

fn step_row(r: &Row<'_>) -> rusqlite::Result<StepRow> {
    let attempts: i64 = r.get(2)?;
    let duration: Option<i64> = r.get(5)?;
    let rows: Option<i64> = r.get(6)?;
    let outputs: Option<String> = r.get(8)?;
    Ok(StepRow {
        step: r.get(0)?,
        status: get_parsed(r, 1)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        started_at: get_opt_time(r, 3)?,
        finished_at: get_opt_time(r, 4)?,
        duration_ms: duration.map(|d| d.max(0) as u64),
        rows: rows.map(|n| n.max(0) as u64),
        error: r.get(7)?,
        outputs: parse_json(outputs.as_deref()),
    })
}

fn parse_json(text: Option<&str>) -> serde_json::Value {
    match text {
        Some(t) => serde_json::from_str(t).unwrap_or_else(|_| serde_json::Value::String(t.into())),
        None => serde_json::Value::Null,
    }
}

fn conversion_error(idx: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, msg.into())
}

fn get_parsed<T: FromStr<Err = String>>(r: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = r.get(idx)?;
    s.parse().map_err(|e| conversion_error(idx, e))
}

fn parse_time(idx: usize, s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| conversion_error(idx, format!("bad time `{s}`: {e}")))
}

fn get_time(r: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    let s: String = r.get(idx)?;
    parse_time(idx, &s)
}

fn get_opt_time(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let s: Option<String> = r.get(idx)?;
    s.map(|s| parse_time(idx, &s)).transpose()
}

/// Times are stored as RFC 3339 UTC text with milliseconds, which sorts as text.
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn insert_log(c: &Connection, run_id: i64, rec: &LogRecord, file: Option<&str>) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO logs(run_id, time, level, step, message, description, file)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        run_id,
        ts(rec.time),
        rec.level.as_str(),
        rec.step,
        rec.message,
        rec.description,
        file
    ])?;
    Ok(())
}

fn record_run_finished(
    c: &Connection,
    id: i64,
    status: Status,
    error: Option<&str>,
    at: DateTime<Utc>,
) -> Result<()> {
    let at = ts(at);
    c.execute(
        "UPDATE runs SET status = ?2, finished_at = ?3, error = ?4 WHERE id = ?1",
        params![id, status.as_str(), at, error],
    )?;
    c.execute(
        "UPDATE integrations SET last_run_at = ?2 WHERE last_run_id = ?1",
        params![id, at],
    )?;
    Ok(())
}

fn record_step_finished(c: &Connection, run_id: i64, s: &StepRecord) -> Result<()> {
    let outputs = match &s.outputs {
        serde_json::Value::Null => None,
        v => Some(serde_json::to_string(v)?),
    };
    c.prepare_cached(
        r#"INSERT INTO step_runs(run_id, step, status, attempts, started_at, finished_at,
                                duration_ms, "rows", error, outputs, kind)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULLIF(?11, ''))
           ON CONFLICT(run_id, step) DO UPDATE SET
               kind = COALESCE(excluded.kind, step_runs.kind),
               status = excluded.status,
               attempts = excluded.attempts,
               started_at = COALESCE(excluded.started_at, step_runs.started_at),
               finished_at = excluded.finished_at,
               duration_ms = excluded.duration_ms,
               "rows" = excluded."rows",
               error = excluded.error,
               outputs = excluded.outputs"#,
    )?
    .execute(params![
        run_id,
        s.step,
        s.status.as_str(),
        i64::from(s.attempts),
        s.started_at.map(ts),
        s.finished_at.map(ts),
        to_i64(s.duration_ms),
        s.rows.map(to_i64),
        s.error,
        outputs,
        s.kind
    ])?;
    Ok(())
}

fn apply_event(c: &Connection, run_id: i64, e: &RunEvent, file: Option<&str>) -> Result<()> {
    match e {
        RunEvent::StepStarted { step, attempt, at } => {
            c.prepare_cached(
                "INSERT INTO step_runs(run_id, step, status, attempts, started_at)
                 VALUES (?1, ?2, 'running', ?3, ?4)
                 ON CONFLICT(run_id, step) DO UPDATE SET
                     status = 'running',
                     attempts = excluded.attempts,
                     started_at = COALESCE(step_runs.started_at, excluded.started_at),
                     finished_at = NULL,
                     error = NULL",
            )?
            .execute(params![run_id, step, i64::from(*attempt), ts(*at)])?;
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
                    crate::duration::human(Duration::from_millis(*delay_ms))
                ),
                description: None,
                file: None,
            };
            insert_log(c, run_id, &rec, None)?;
        }
        RunEvent::Progress { .. } => {}
        RunEvent::StepFinished(s) => record_step_finished(c, run_id, s)?,
        RunEvent::Log(rec) => insert_log(c, run_id, rec, file.or(rec.file.as_deref()))?,
        RunEvent::RunFinished { status, error, at } => {
            record_run_finished(c, run_id, *status, error.as_deref(), *at)?
        }
    }
    Ok(())
}

fn is_busy(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<rusqlite::Error>()
                .and_then(|e| e.sqlite_error_code()),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        )
    })
}

/// Call `f` again (with a growing pause) while it fails with `SQLITE_BUSY`/`SQLITE_LOCKED`:
/// the busy timeout covers most waits, but not a busy snapshot or a WAL recovery.
fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut pause = Duration::from_millis(5);
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if tries < BUSY_RETRIES && is_busy(&e) => {
                tries += 1;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

/// What `/proc/<pid>/stat` says: whether the process is a zombie, and its start time
/// (field 22, clock ticks since boot).
fn proc_stat(pid: u32) -> Option<(bool, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (the state), so field 22 is `fields[19]`.
    let zombie = matches!(fields.first().copied(), Some("Z" | "X"));
    Some((zombie, fields.get(19)?.to_string()))
}

/// The start time of a process, to tell a reused pid apart.
fn process_start(pid: u32) -> Option<String> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Where this process lives: the boot (`/proc/sys/kernel/random/boot_id`) and the pid
/// namespace (`/proc/self/ns/pid`), as `BOOT/pid:[INODE]`. Two processes see each other's
/// pids only when this is the same; `None` without procfs.
pub fn host_identity() -> Option<String> {
    // The boot and this process's pid namespace do not change while it runs: read once.
    static HOST: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let ns = fs::read_link("/proc/self/ns/pid").ok()?;
        Some(format!("{}/{}", boot.trim(), ns.to_string_lossy()))
    })
    .clone()
}

/// Whether process `pid` of this pid namespace is alive (not a zombie): what
/// [`owner_alive`] tells, for a caller that knows only a pid.
pub fn pid_alive(pid: u32) -> bool {
    owner_alive(Some(i64::from(pid)), None)
}

/// A running run and its owner: id, pid, pid start time, host identity.
type RunOwner = (i64, Option<i64>, Option<String>, Option<String>);

/// What can be told about the process that owns a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Alive,
    Dead,
    /// It lives in another pid namespace or boot: its pid means nothing here.
    Unknown,
}

/// The owner of a run, from its pid, start time and host identity (runs recorded before
/// the host was kept have none, and are judged by pid alone, as before).
fn owner_liveness(pid: Option<i64>, start: Option<&str>, host: Option<&str>) -> Liveness {
    if let Some(host) = host {
        if host_identity().as_deref() != Some(host) {
            return Liveness::Unknown;
        }
    }
    if owner_alive(pid, start) {
        Liveness::Alive
    } else {
        Liveness::Dead
    }
}

/// Whether the process that created a run is still the one running under its pid.
fn owner_alive(pid: Option<i64>, start: Option<&str>) -> bool {
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()).filter(|&p| p > 0) else {
        return false;
    };
    if let Some((zombie, now_start)) = proc_stat(pid) {
        return !zombie && start.is_none_or(|s| s == now_start);
    }
    // No readable /proc entry (no procfs, or hidden): ask the kernel whether the pid exists.
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 performs only the existence and permission checks; raw > 0.
    let r = unsafe { libc::kill(raw, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

enum Msg {
    /// An event and the bytes it holds of the queue's budget.
    Event(Box<RunEvent>, usize),
    Flush(Sender<()>),
}

/// How many bytes of events are queued for the writer thread, with a wait for room.
#[derive(Default)]
struct Budget {
    state: Mutex<BudgetState>,
    freed: std::sync::Condvar,
}

#[derive(Default)]
struct BudgetState {
    queued: usize,
    /// The writer thread has ended: nobody frees room any more, so nobody waits.
    closed: bool,
}

impl Budget {
    /// Wait until `n` more bytes fit (an event larger than the whole budget waits for an
    /// empty queue), then count them.
    fn take(&self, n: usize) {
        let mut st = lock(&self.state);
        while !st.closed && st.queued > 0 && st.queued + n > MAX_QUEUED_BYTES {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.queued += n;
    }
    fn give(&self, n: usize) {
        let mut st = lock(&self.state);
        st.queued = st.queued.saturating_sub(n);
        self.freed.notify_all();
    }
    fn close(&self) {
        lock(&self.state).closed = true;
        self.freed.notify_all();
    }
}

/// Closes the budget when the writer thread ends, however it ends (a panic included).
struct CloseOnDrop(std::sync::Arc<Budget>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The bytes an event holds of the queue's budget.
fn event_bytes(e: &RunEvent) -> usize {
    EVENT_OVERHEAD
        + match e {
            RunEvent::Log(rec) => {
                rec.message.len() + rec.description.as_ref().map_or(0, String::len)
            }
            RunEvent::StepFinished(s) => s.error.as_ref().map_or(0, String::len),
            RunEvent::StepRetrying { error, .. } => error.len(),
            RunEvent::RunFinished { error, .. } => error.as_ref().map_or(0, String::len),
            _ => 0,
        }
}

/// The per-step cap on stored log text: rows past it are appended to `log-<step>.txt` in
/// the run's folder, and when the step finishes (or the run, for rows of no step) one row
/// says how many rows and bytes went there, with that file attached.
struct LogCap {
    limit: u64,
    run_dir: PathBuf,
    steps: std::collections::HashMap<Option<String>, StepLog>,
}

#[derive(Default)]
struct StepLog {
    stored: u64,
    spilled_rows: u64,
    spilled_bytes: u64,
    file: Option<std::io::BufWriter<fs::File>>,
    path: PathBuf,
}

impl LogCap {
    fn new(run_dir: PathBuf) -> LogCap {
        let limit = std::env::var(LOG_LIMIT_VAR)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_LOG_LIMIT);
        LogCap {
            limit,
            run_dir,
            steps: Default::default(),
        }
    }

    /// The events to store for `e`: itself, nothing (a row past the cap, now in the file),
    /// or the summary row of a capped step followed by `e`.
    fn admit(&mut self, e: RunEvent, out: &mut Vec<RunEvent>) {
        match &e {
            RunEvent::Log(rec) if rec.file.is_none() => {
                let n =
                    (rec.message.len() + rec.description.as_ref().map_or(0, String::len)) as u64;
                let log = self.steps.entry(rec.step.clone()).or_default();
                if log.spilled_rows == 0 && log.stored + n <= self.limit {
                    log.stored += n;
                    out.push(e);
                    return;
                }
                if log.file.is_none() {
                    let name = format!("log-{}.txt", rec.step.as_deref().unwrap_or("run"));
                    log.path = self.run_dir.join(name);
                    log.file = fs::create_dir_all(&self.run_dir)
                        .and_then(|_| {
                            fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&log.path)
                        })
                        .ok()
                        .map(std::io::BufWriter::new);
                }
                if let Some(f) = log.file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{} {} {}", ts(rec.time), rec.level, rec.message);
                    if let Some(d) = &rec.description {
                        let _ = writeln!(f, "    {d}");
                    }
                }
                log.spilled_rows += 1;
                log.spilled_bytes += n;
            }
            RunEvent::StepFinished(s) => {
                self.summarise(Some(s.step.clone()), out);
                out.push(e);
            }
            RunEvent::RunFinished { .. } => {
                let steps: Vec<Option<String>> = self.steps.keys().cloned().collect();
                for step in steps {
                    self.summarise(step, out);
                }
                out.push(e);
            }
            _ => out.push(e),
        }
    }

    /// Close a capped step's file and add the row that points at it.
    fn summarise(&mut self, step: Option<String>, out: &mut Vec<RunEvent>) {
        let Some(log) = self.steps.get_mut(&step) else {
            return;
        };
        if log.spilled_rows == 0 {
            return;
        }
        let stored = log.file.take().map(|mut f| {
            use std::io::Write;
            f.flush().is_ok()
        });
        let (rows, bytes) = (log.spilled_rows, log.spilled_bytes);
        log.spilled_rows = 0;
        log.spilled_bytes = 0;
        log.stored = self.limit; // later rows of the step go on to a new file
        let whose = if step.is_some() {
            "this step's"
        } else {
            "the run's"
        };
        let message = if stored == Some(true) {
            format!(
                "{rows} more log rows ({bytes} bytes) of {whose} log are not stored here: \
                 the limit is {} bytes a step ({LOG_LIMIT_VAR}); they are in the attached file",
                self.limit
            )
        } else {
            format!(
                "{rows} more log rows ({bytes} bytes) of {whose} log were dropped: the limit \
                 is {} bytes a step ({LOG_LIMIT_VAR}) and {} could not be written",
                self.limit,
                log.path.display()
            )
        };
        out.push(RunEvent::Log(LogRecord {
            time: Utc::now(),
            level: Level::Warning,
            step,
            message,
            description: None,
            file: (stored == Some(true)).then(|| log.path.to_string_lossy().into_owned()),
        }));
    }
}

/// The executor's observer: records a run's events from a background thread with its own
/// connection, in batched transactions (committed whenever the queue runs empty, and at
/// least every 50 ms while it does not).
///
/// Call [`HistoryWriter::finish`] (or [`HistoryWriter::close`] when it is shared behind an
/// `Arc`) before the process exits; dropping it closes it too.
pub struct HistoryWriter {
    run_id: i64,
    tx: Mutex<Option<Sender<Msg>>>,
    budget: std::sync::Arc<Budget>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HistoryWriter(run {})", self.run_id)
    }
}

impl HistoryWriter {
    pub fn start(state_dir: &Path, run_id: i64) -> Result<HistoryWriter> {
        let store = Store::open(state_dir)?;
        let (tx, rx) = mpsc::channel();
        let budget = std::sync::Arc::new(Budget::default());
        let closer = CloseOnDrop(budget.clone());
        let thread = std::thread::Builder::new()
            .name(format!("pipe-history-{run_id}"))
            .spawn(move || {
                let _closer = closer;
                writer_loop(store, run_id, rx, &_closer.0)
            })
            .context("cannot start the run history writer")?;
        Ok(HistoryWriter {
            run_id,
            tx: Mutex::new(Some(tx)),
            budget,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// Wait until every event sent so far is committed.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        let sent = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Flush(ack)).is_ok());
        if sent {
            let _ = done.recv();
        }
    }

    /// Drain every event, stop the thread and report the first write error, if any.
    pub fn finish(self) -> Result<()> {
        self.close()
    }

    /// Like [`HistoryWriter::finish`], through a shared reference. Events sent afterwards
    /// are dropped; closing twice is harmless.
    pub fn close(&self) -> Result<()> {
        drop(lock(&self.tx).take());
        let Some(thread) = lock(&self.thread).take() else {
            return Ok(());
        };
        match thread.join() {
            Ok(result) => result.context("cannot record run history"),
            Err(_) => bail!("the run history writer panicked"),
        }
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Observer for HistoryWriter {
    fn event(&self, event: &RunEvent) {
        if matches!(event, RunEvent::Progress { .. }) {
            return;
        }
        let n = event_bytes(event);
        // Outside the sender's lock: waiting for room must not hold up `flush` or `close`.
        self.budget.take(n);
        let sent = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Event(Box::new(event.clone()), n)).is_ok());
        if !sent {
            self.budget.give(n);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn writer_loop(store: Store, run_id: i64, rx: Receiver<Msg>, budget: &Budget) -> Result<()> {
    let mut first_error: Option<anyhow::Error> = None;
    let mut batch: Vec<RunEvent> = Vec::new();
    let mut acks: Vec<Sender<()>> = Vec::new();
    let mut cap = LogCap::new(store.run_dir(run_id));
    // The budget bytes of the events taken since the last commit.
    let held = std::cell::Cell::new(0);
    let mut take = |msg: Msg, batch: &mut Vec<RunEvent>, acks: &mut Vec<Sender<()>>| match msg {
        Msg::Event(e, n) => {
            held.set(held.get() + n);
            cap.admit(*e, batch);
        }
        Msg::Flush(ack) => acks.push(ack),
    };
    while let Ok(msg) = rx.recv() {
        let since = Instant::now();
        let mut disconnected = false;
        take(msg, &mut batch, &mut acks);
        while batch.len() < MAX_BATCH && since.elapsed() < FLUSH_EVERY {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut batch, &mut acks),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.write_events(run_id, &batch) {
                first_error.get_or_insert(e);
            }
            batch.clear();
        }
        budget.give(held.replace(0));
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if disconnected {
            break;
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "pipe-history-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn new_run(pipeline: &str, owner: Owner) -> NewRun {
        NewRun {
            pipeline: pipeline.into(),
            params: serde_json::json!({"month": "2026-10"}),
            trigger: if owner == Owner::Pipe {
                Trigger::Cli
            } else {
                Trigger::External
            },
            owner,
            logical_date: None,
        }
    }

    fn log(step: Option<&str>, message: &str) -> LogRecord {
        LogRecord {
            time: Utc::now(),
            level: Level::Info,
            step: step.map(str::to_string),
            message: message.into(),
            description: None,
            file: None,
        }
    }

    #[test]
    fn schema_creation_is_idempotent() {
        let dir = TempDir::new();
        let a = Store::open(&dir.0).unwrap();
        let id = a.create_run(&new_run("p", Owner::Pipe)).unwrap();
        drop(a);
        let b = Store::open(&dir.0).unwrap();
        let version: i64 = b
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        let mode: String = b
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert!(b.get_run(id).unwrap().is_some());
        // A third open while the second is still open.
        let c = Store::open(&dir.0).unwrap();
        assert_eq!(c.list_runs(None, 0).unwrap().len(), 1);
    }

    #[test]
    fn create_finish_list() {
        let dir = TempDir::new();
        let s = Store::open(&dir.0).unwrap();
        s.upsert_integration("sales", Some("nightly sales"))
            .unwrap();
        s.upsert_integration("sales", None).unwrap();
        assert!(s.is_enabled("sales").unwrap());
        assert!(s.is_enabled("never-seen").unwrap());
        let a = s.create_run(&new_run("sales", Owner::Pipe)).unwrap();
        let b = s.create_run(&new_run("stock", Owner::External)).unwrap();
        let c = s.create_run(&new_run("sales", Owner::Pipe)).unwrap();
        assert!(s.run_dir(a).is_dir());
        let (desc, last): (Option<String>, i64) = s
            .conn
            .query_row(
                "SELECT description, last_run_id FROM integrations WHERE name = 'sales'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(desc.as_deref(), Some("nightly sales"));
        assert_eq!(last, c);

        // `a` belongs to this (live) process: refused unless forced.
        let err = s
            .finish_run(a, Status::Failed, Some("boom"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("owned by a live `pipe run`"), "{err}");
        s.finish_run(a, Status::Failed, Some("boom"), true).unwrap();
        s.finish_run(b, Status::Warning, None, false).unwrap();
        let err = s
            .finish_run(a, Status::Succeeded, None, false)
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("run {a} is already failed"));
        let err = s
            .finish_run(999, Status::Succeeded, None, false)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "run 999 not found");

        let all = s.list_runs(None, 20).unwrap();
        assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c, b, a]);
        assert_eq!(all[0].status, Status::Running);
        assert!(all[0].finished_at.is_none() && all[0].duration_ms.is_none());
        assert_eq!(all[1].status, Status::Warning);
        assert_eq!(all[1].owner, Owner::External);
        assert_eq!(all[1].pid, None);
        assert_eq!(all[2].error.as_deref(), Some("boom"));
        assert_eq!(all[2].params["month"], "2026-10");
        assert_eq!(all[2].pid, Some(i64::from(std::process::id())));
        let sales = s.list_runs(Some("sales"), 20).unwrap();
        assert_eq!(sales.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c, a]);
        assert_eq!(s.list_runs(None, 1).unwrap().len(), 1);

        let detail = s.get_run(a).unwrap().unwrap();
        assert_eq!(detail.run.status, Status::Failed);
        assert!(detail.steps.is_empty());
        assert!(s.get_run(12345).unwrap().is_none());
        let json = serde_json::to_value(&detail).unwrap();
        assert_eq!(json["id"], a);
        assert_eq!(json["status"], "failed");
        assert!(json["steps"].is_array());
        assert!(json["started_at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn add_log_copies_the_file() {
        let dir = TempDir::new();
        let s = Store::open(&dir.0).unwrap();
        let id = s.create_run(&new_run("p", Owner::External)).unwrap();
        let src = dir.0.join("report.csv");
        fs::write(&src, "a,b\n1,2\n").unwrap();
        let mut rec = log(None, "uploaded");
        rec.file = Some(src.to_string_lossy().into_owned());
        s.add_log(id, &rec).unwrap();
        s.add_log(id, &rec).unwrap();
        rec.file = Some(dir.0.join("missing.csv").to_string_lossy().into_owned());
        assert!(s.add_log(id, &rec).is_err());
        let rows = s.logs(id, 0).unwrap();
        assert_eq!(rows.len(), 2);
        let f0 = PathBuf::from(rows[0].file.as_ref().unwrap());
        let f1 = PathBuf::from(rows[1].file.as_ref().unwrap());
        assert_eq!(
            f0,
            fs::canonicalize(s.run_dir(id)).unwrap().join("report.csv")
        );
        assert_eq!(f1.file_name().unwrap(), "report-1.csv");
        assert_eq!(fs::read_to_string(f1).unwrap(), "a,b\n1,2\n");
        assert_eq!(s.logs(id, rows[0].id).unwrap().len(), 1);
    }

    #[test]
    fn writer_round_trip() {
        let dir = TempDir::new();
        let s = Store::open(&dir.0).unwrap();
        let id = s.create_run(&new_run("p", Owner::Pipe)).unwrap();
        let w = Arc::new(HistoryWriter::start(&dir.0, id).unwrap());
        let obs: Arc<dyn Observer> = w.clone();
        let t0 = Utc::now();
        for step in ["extract", "load"] {
            obs.event(&RunEvent::StepStarted {
                step: step.into(),
                attempt: 1,
                at: t0,
            });
        }
        obs.event(&RunEvent::Progress {
            step: "extract".into(),
            counters: vec![("pages".into(), 3)],
        });
        obs.event(&RunEvent::StepRetrying {
            step: "extract".into(),
            attempt: 1,
            error: "HTTP 503".into(),
            delay_ms: 2000,
        });
        obs.event(&RunEvent::StepStarted {
            step: "extract".into(),
            attempt: 2,
            at: Utc::now(),
        });
        for i in 0..1000 {
            obs.event(&RunEvent::Log(log(Some("extract"), &format!("page {i}"))));
        }
        w.flush();
        let live = s.get_run(id).unwrap().unwrap();
        assert_eq!(live.log_count, 1001);
        assert_eq!(live.steps.len(), 2);
        assert_eq!(live.steps[0].status, Status::Running);
        assert_eq!(live.steps[0].attempts, 2);
        assert_eq!(live.steps[0].started_at.map(ts), Some(ts(t0)));

        obs.event(&RunEvent::StepFinished(StepRecord {
            step: "extract".into(),
            kind: "http.extract".into(),
            status: Status::Succeeded,
            attempts: 2,
            started_at: Some(t0),
            finished_at: Some(Utc::now()),
            duration_ms: 1234,
            rows: Some(42),
            error: None,
            outputs: serde_json::json!({"count": 42}),
        }));
        obs.event(&RunEvent::StepFinished(StepRecord {
            step: "load".into(),
            kind: "bigquery.load".into(),
            status: Status::Failed,
            attempts: 1,
            started_at: None,
            finished_at: Some(Utc::now()),
            duration_ms: 5,
            rows: None,
            error: Some("table locked".into()),
            outputs: serde_json::Value::Null,
        }));
        obs.event(&RunEvent::StepFinished(StepRecord {
            step: "report".into(),
            kind: "log".into(),
            status: Status::Skipped,
            attempts: 0,
            started_at: None,
            finished_at: None,
            duration_ms: 0,
            rows: None,
            error: None,
            outputs: serde_json::Value::Null,
        }));
        obs.event(&RunEvent::RunFinished {
            status: Status::Failed,
            error: Some("step load failed".into()),
            at: Utc::now(),
        });
        drop(obs);
        Arc::try_unwrap(w).unwrap().finish().unwrap();

        let d = s.get_run(id).unwrap().unwrap();
        assert_eq!(d.run.status, Status::Failed);
        assert_eq!(d.run.error.as_deref(), Some("step load failed"));
        assert!(d.run.finished_at.is_some());
        let names: Vec<_> = d.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["extract", "load", "report"]);
        assert_eq!(d.steps[0].rows, Some(42));
        assert_eq!(d.steps[0].outputs["count"], 42);
        assert_eq!(d.steps[0].duration_ms, Some(1234));
        assert_eq!(d.steps[1].error.as_deref(), Some("table locked"));
        assert!(d.steps[1].started_at.is_some(), "kept from StepStarted");
        assert_eq!(d.steps[2].status, Status::Skipped);
        let logs = s.logs(id, 0).unwrap();
        assert_eq!(logs.len(), 1001);
        assert_eq!(logs[0].level, Level::Warning);
        assert_eq!(
            logs[0].message,
            "attempt 1 failed: HTTP 503; retrying in 2.0s"
        );
        assert_eq!(logs[1000].message, "page 999");
        assert!(logs.windows(2).all(|w| w[0].id < w[1].id));
        let last_at: Option<String> = s
            .conn
            .query_row(
                "SELECT last_run_at FROM integrations WHERE name = 'p'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(last_at, d.run.finished_at.map(ts));
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = TempDir::new();
        let s = Store::open(&dir.0).unwrap();
        let runs = [
            s.create_run(&new_run("a", Owner::External)).unwrap(),
            s.create_run(&new_run("b", Owner::Pipe)).unwrap(),
        ];
        let threads: Vec<_> = runs
            .iter()
            .map(|&run| {
                let dir = dir.0.clone();
                std::thread::spawn(move || {
                    let store = Store::open(&dir).unwrap();
                    for i in 0..500 {
                        store
                            .add_log(run, &log(None, &format!("{run}:{i}")))
                            .unwrap();
                        if i % 100 == 0 {
                            store.mark_abandoned().unwrap();
                            store.list_runs(None, 10).unwrap();
                        }
                    }
                })
            })
            .collect();
        // A batched writer into the same database at the same time.
        let w = HistoryWriter::start(&dir.0, runs[1]).unwrap();
        for i in 0..500 {
            w.event(&RunEvent::Log(log(Some("w"), &format!("w:{i}"))));
        }
        for t in threads {
            t.join().unwrap();
        }
        w.finish().unwrap();
        let a = s.logs(runs[0], 0).unwrap();
        let b = s.logs(runs[1], 0).unwrap();
        assert_eq!(a.len(), 500);
        assert_eq!(b.len(), 1000);
        for (i, row) in a.iter().enumerate() {
            assert_eq!(row.message, format!("{}:{i}", runs[0]));
        }
        let from_thread: Vec<_> = b.iter().filter(|r| r.step.is_none()).collect();
        assert_eq!(from_thread.len(), 500);
        assert!(from_thread
            .iter()
            .enumerate()
            .all(|(i, r)| r.message == format!("{}:{i}", runs[1])));
    }

    #[test]
    fn mark_abandoned_only_dead_pipe_runs() {
        let dir = TempDir::new();
        let s = Store::open(&dir.0).unwrap();
        let alive = s.create_run(&new_run("p", Owner::Pipe)).unwrap();
        let insert = |owner: &str, pid: i64, pid_start: Option<&str>| -> i64 {
            s.conn
                .execute(
                    r#"INSERT INTO runs(pipeline, params, "trigger", status, started_at, pid,
                                        pid_start, owner)
                       VALUES ('p', '{}', 'cli', 'running', ?1, ?2, ?3, ?4)"#,
                    params![ts(Utc::now()), pid, pid_start, owner],
                )
                .unwrap();
            s.conn.last_insert_rowid()
        };
        let dead = insert("pipe", 999_999_999, Some("1"));
        let reused = insert(
            "pipe",
            i64::from(std::process::id()),
            Some("not-my-start-time"),
        );
        let external = insert("external", 999_999_999, None);
        s.conn
            .execute(
                "INSERT INTO step_runs(run_id, step, status, attempts, started_at)
                 VALUES (?1, 'extract', 'running', 1, ?2)",
                params![dead, ts(Utc::now())],
            )
            .unwrap();

        assert_eq!(s.mark_abandoned().unwrap(), 2);
        assert_eq!(s.mark_abandoned().unwrap(), 0);
        let status = |id| s.run_status(id).unwrap().unwrap();
        assert_eq!(status(dead), Status::Abandoned);
        assert_eq!(status(reused), Status::Abandoned);
        assert_eq!(status(external), Status::Running);
        assert_eq!(status(alive), Status::Running);
        let d = s.get_run(dead).unwrap().unwrap();
        assert!(d.run.finished_at.is_some());
        assert!(d.run.error.unwrap().contains("999999999"));
        assert_eq!(d.steps[0].status, Status::Abandoned);
        assert!(d.steps[0].finished_at.is_some());
    }
}
