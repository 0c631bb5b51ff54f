//! The SQLite backend (the default): `<state_dir>/history.sqlite`, embedded, no server.
//!
//! Several `pipe` processes may use one file at once: the database is in WAL mode, every
//! write is a `BEGIN IMMEDIATE` transaction (so the busy timeout applies to it, and writes
//! of all processes are serialised: the queue's claim needs nothing more), and a
//! transaction that still meets `SQLITE_BUSY` is tried again. Each process keeps a few
//! connections in a small pool, so readers do not wait for each other.
//!
//! Migrations: versions 1-3 are the schema of the history file before the store existed
//! (`PRAGMA user_version` counted them); an old file is migrated in place. The applied
//! versions are rows of `schema_migrations` (and `user_version` still says the number, so an
//! older `pipe` refuses a newer file instead of misreading it).

use crate::error::Context as _;
use crate::sql::{Backend, Dialect, Row, SqlStore, Tx, Value, Work};
use crate::{Result, StoreError};
use chrono::Utc;
use rusqlite::{params, Connection, ErrorCode};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How long one statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a transaction that still met `SQLITE_BUSY` is tried again.
const BUSY_RETRIES: u32 = 10;
/// Idle connections kept per store: as many as the threads that use it at once (a
/// service's workers and run writers), so none pays for opening a connection and preparing
/// its statements again.
const POOL_IDLE: usize = 32;

/// Schema migrations, in order; the version is the position + 1.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // The store (issue 10): repair attempts, leases, integrations from files, ticks, queue.
    r#"
ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN lease_owner TEXT;
ALTER TABLE runs ADD COLUMN queue_item INTEGER;
ALTER TABLE runs ADD COLUMN cancel_requested_at TEXT;
CREATE INDEX runs_running_by_pipeline ON runs(pipeline, status);
CREATE TABLE step_runs_v4 (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    step        TEXT NOT NULL,
    run_attempt INTEGER NOT NULL DEFAULT 1,
    kind        TEXT,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  TEXT,
    finished_at TEXT,
    duration_ms INTEGER,
    "rows"      INTEGER,
    error       TEXT,
    outputs     TEXT,
    UNIQUE (run_id, step, run_attempt)
);
INSERT INTO step_runs_v4(run_id, step, run_attempt, kind, status, attempts, started_at,
                         finished_at, duration_ms, "rows", error, outputs)
    SELECT run_id, step, 1, kind, status, attempts, started_at, finished_at, duration_ms,
           "rows", error, outputs
    FROM step_runs ORDER BY rowid;
DROP TABLE step_runs;
ALTER TABLE step_runs_v4 RENAME TO step_runs;
CREATE INDEX step_runs_by_kind ON step_runs(kind, finished_at);
ALTER TABLE integrations ADD COLUMN resumed_at TEXT;
ALTER TABLE integrations ADD COLUMN path TEXT;
ALTER TABLE integrations ADD COLUMN content_hash TEXT;
ALTER TABLE integrations ADD COLUMN metadata TEXT;
ALTER TABLE integrations ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
ALTER TABLE integrations ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE integrations ADD COLUMN max_concurrent_runs INTEGER;
ALTER TABLE integrations ADD COLUMN loaded_at TEXT;
ALTER TABLE integrations ADD COLUMN load_error TEXT;
ALTER TABLE integrations ADD COLUMN load_error_at TEXT;
ALTER TABLE integrations ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE integrations ADD COLUMN next_run_at TEXT;
ALTER TABLE integrations ADD COLUMN schedule_cursor TEXT;
ALTER TABLE integrations ADD COLUMN schedule_fingerprint TEXT;
CREATE TABLE backfills (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    integration  TEXT NOT NULL,
    from_at      TEXT NOT NULL,
    to_at        TEXT NOT NULL,
    max_parallel INTEGER,
    state        TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
CREATE TABLE queue (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    integration      TEXT NOT NULL,
    queue            TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    "trigger"        TEXT NOT NULL,
    logical_date     TEXT,
    params           TEXT NOT NULL DEFAULT '{}',
    dedup_key        TEXT,
    backfill_id      INTEGER,
    state            TEXT NOT NULL,
    enqueued_at      TEXT NOT NULL,
    claimed_by       TEXT,
    claimed_at       TEXT,
    claim_expires_at TEXT,
    run_id           INTEGER,
    finished_at      TEXT
);
CREATE UNIQUE INDEX queue_dedup ON queue(dedup_key) WHERE state = 'queued';
CREATE INDEX queue_pick ON queue(state, priority DESC, id);
CREATE INDEX queue_by_integration ON queue(integration, state);
CREATE INDEX queue_by_run ON queue(run_id);
CREATE INDEX queue_by_backfill ON queue(backfill_id, state);
CREATE TABLE ticks (
    integration  TEXT NOT NULL,
    scheduled_at TEXT NOT NULL,
    planned_at   TEXT NOT NULL,
    state        TEXT NOT NULL,
    queue_item   INTEGER,
    note         TEXT,
    PRIMARY KEY (integration, scheduled_at)
);
CREATE TABLE leases (
    name          TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    owner         TEXT NOT NULL,
    role          TEXT,
    host          TEXT,
    host_identity TEXT,
    pid           INTEGER,
    pid_start     TEXT,
    acquired_at   TEXT NOT NULL,
    heartbeat_at  TEXT NOT NULL,
    expires_at    TEXT NOT NULL
);
"#,
    // A change counter for pollers of the integrations list.
    r#"
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO store_meta(key, value) VALUES ('integrations_version', 0);
"#,
    // Remote workers (issue 11): the outbox, fencing tokens and the workers table.
    r#"
ALTER TABLE queue ADD COLUMN published_at TEXT;
ALTER TABLE queue ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN fence INTEGER;
CREATE INDEX queue_outbox ON queue(priority DESC, id) WHERE state = 'queued' AND published_at IS NULL;
CREATE INDEX queue_published ON queue(published_at) WHERE state = 'queued';
CREATE TABLE workers (
    id                 TEXT PRIMARY KEY,
    host               TEXT NOT NULL,
    pid                INTEGER,
    queues             TEXT NOT NULL DEFAULT '[]',
    slots              INTEGER NOT NULL DEFAULT 0,
    running            TEXT NOT NULL DEFAULT '[]',
    version            TEXT,
    lease_ms           INTEGER NOT NULL,
    started_at         TEXT NOT NULL,
    heartbeat_at       TEXT NOT NULL,
    drain_requested_at TEXT,
    stopped_at         TEXT
);
"#,
    // The pipeline text each run ran, once per distinct text (it was two files and a
    // folder per run: a third of a busy server's CPU went to creating them).
    r#"
CREATE TABLE pipeline_sources (
    hash TEXT PRIMARY KEY,
    text TEXT NOT NULL
);
ALTER TABLE runs ADD COLUMN source_hash TEXT;
ALTER TABLE runs ADD COLUMN source_path TEXT;
"#,
    // The API's users, machine tokens and settings, stored credentials, and the audit
    // trail of every change to them (issue 12).
    r#"
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    disabled_at   TEXT
);
CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    role         TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
);
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE credentials (
    name       TEXT PRIMARY KEY,
    type       TEXT NOT NULL,
    public     TEXT NOT NULL DEFAULT '{}',
    sealed     TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    time   TEXT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_by_target ON audit(target, id);
"#,
    // 9: a user's sessions can be ended (logout): JWTs issued up to then are refused.
    "ALTER TABLE users ADD COLUMN sessions_ended_at TEXT;",
];

pub(crate) type SqliteStore = SqlStore<SqliteBackend>;

pub(crate) struct SqliteBackend {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    /// The threads of this process take turns for the file's one write lock here, woken as
    /// soon as it is free, instead of in SQLite's busy handler, which sleeps 1–100 ms
    /// between tries (other processes still meet the busy timeout).
    writing: Mutex<()>,
}

/// Open the store in `state_dir`, its database at `file` (default `history.sqlite` in it).
pub(crate) fn open(state_dir: &Path, file: Option<&Path>) -> Result<SqliteStore> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
    let state_dir = std::path::absolute(state_dir)
        .with_context(|| format!("cannot resolve state dir {}", state_dir.display()))?;
    let path = match file {
        Some(f) => {
            let f = std::path::absolute(f)
                .with_context(|| format!("cannot resolve {}", f.display()))?;
            if let Some(parent) = f.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            f
        }
        None => state_dir.join(crate::DB_FILE),
    };
    let backend = SqliteBackend {
        path: path.clone(),
        pool: Mutex::new(Vec::new()),
        writing: Mutex::new(()),
    };
    let conn = backend.connect()?;
    migrate(&conn).with_context(|| format!("cannot prepare run history {}", path.display()))?;
    backend.put(conn);
    Ok(SqlStore {
        backend,
        state_dir,
        group: crate::group::Group::new(<SqliteBackend as Backend>::GROUP_LEADERS),
    })
}

impl SqliteBackend {
    fn connect(&self) -> Result<Connection> {
        let path = &self.path;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open run history {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        retry(|| {
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(anyhow::anyhow!(
                    "cannot switch {} to WAL mode (it is in {mode} mode)",
                    path.display()
                )));
            }
            Ok(())
        })?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Every statement of the store stays prepared (the default keeps only 16).
        conn.set_prepared_statement_cache_capacity(256);
        Ok(conn)
    }

    fn take(&self) -> Result<Connection> {
        let idle = lock(&self.pool).pop();
        match idle {
            Some(c) => Ok(c),
            None => self.connect(),
        }
    }

    fn put(&self, conn: Connection) {
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_IDLE {
            pool.push(conn);
        }
    }

    fn transaction<T>(&self, begin: &str, f: &mut Work<'_, T>) -> Result<T> {
        let conn = self.take()?;
        let result = retry(|| {
            if !conn.is_autocommit() {
                // Left open by a panic in an earlier call.
                let _ = conn.execute_batch("ROLLBACK");
            }
            conn.execute_batch(begin)?;
            let result = f(&mut SqliteTx(&conn)).and_then(|v| {
                conn.execute_batch("COMMIT")?;
                Ok(v)
            });
            if result.is_err() && !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            result
        });
        self.put(conn);
        result
    }
}

impl Backend for SqliteBackend {
    const DIALECT: Dialect = Dialect::Sqlite;
    /// One writer at a time per file.
    const GROUP_LEADERS: usize = 1;

    fn write<T: Send>(&self, f: &mut Work<'_, T>) -> Result<T> {
        let _turn = lock(&self.writing);
        self.transaction("BEGIN IMMEDIATE", f)
    }

    fn read<T: Send>(&self, f: &mut Work<'_, T>) -> Result<T> {
        self.transaction("BEGIN", f)
    }

    fn is_contention(e: &StoreError) -> bool {
        is_busy(e)
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    fn schema_version(&self) -> Result<u32> {
        self.read(&mut |tx| {
            let r = tx.one("SELECT MAX(version) FROM schema_migrations", &[])?;
            Ok(r.map(|r| r.opt_u32(0)).transpose()?.flatten().unwrap_or(0))
        })
    }
}

/// Apply the migrations this file lacks, in one `BEGIN IMMEDIATE` transaction (another
/// process opening the file at the same time waits, then finds them applied).
fn migrate(conn: &Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current as usize == MIGRATIONS.len() {
        return Ok(());
    }
    retry(|| {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = migrate_locked(conn).and_then(|()| {
            conn.execute_batch("COMMIT")?;
            Ok(())
        });
        if result.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        result
    })
}

fn migrate_locked(c: &Connection) -> Result<()> {
    // Read again under the write lock: another process may have migrated meanwhile.
    let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::invalid(format!(
            "the database has schema version {version}, newer than this pipe knows ({})",
            MIGRATIONS.len()
        )));
    }
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at TEXT NOT NULL
         )",
    )?;
    let now = crate::sql::ts(Utc::now());
    // A file from before the store counted its migrations only in user_version.
    for v in 1..=version {
        c.execute(
            "INSERT INTO schema_migrations(version, applied_at) VALUES (?1, ?2)
             ON CONFLICT(version) DO NOTHING",
            params![v as i64, now],
        )?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        c.execute_batch(sql)
            .with_context(|| format!("migration {} failed", i + 1))?;
        c.execute(
            "INSERT INTO schema_migrations(version, applied_at) VALUES (?1, ?2)",
            params![(i + 1) as i64, now],
        )?;
    }
    c.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    Ok(())
}

struct SqliteTx<'a>(&'a Connection);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::List(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "a list parameter is PostgreSQL's only".into(),
                ))
            }
        })
    }
}

impl Tx for SqliteTx<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        use rusqlite::types::ValueRef;
        let mut stmt = self.0.prepare_cached(sql)?;
        let n = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => Value::Int(v as i64),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

fn is_busy(e: &StoreError) -> bool {
    let StoreError::Backend(e) = e else {
        return false;
    };
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
