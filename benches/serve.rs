//! The integration service benchmark (`cargo bench --bench serve`, or `just bench`).
//!
//! Drives the real `pipe serve` binary as a child process, as an operator would run it:
//! 10,000 integrations (pipeline files, one `log` step each: the cheapest run through the
//! real executor and history writer) on per-minute cron schedules, in a temp dir; the
//! server runs over at least two minute boundaries, first on SQLite, then on the machine's
//! PostgreSQL (a fresh database per round, dropped after); SIGTERM stops it. The figures
//! come from the store the server wrote (each run's logical date is its scheduled instant,
//! `started_at` is when the run was recorded as started) and from `/proc/<pid>`:
//!
//! - lag from scheduled instant to run start, p50/p99/max (goal p99 ≤ 1 s), split into
//!   scheduler (instant → queued), queue wait (queued → claimed) and start (claimed →
//!   run recorded) so a missed goal says where the time goes;
//! - runs/s while each minute's burst drains (goal ≥ 500 no-op runs/s on each backend);
//! - the server's peak RSS (VmHWM; goal ≤ 300 MB);
//! - its CPU time between ticks (utime + stime over a quiet stretch of the minute, after the
//!   burst drained): what 10,000 idle integrations cost;
//! - floors in the same store, after the server stopped: 10,000 rows inserted in one
//!   transaction, and 10,000 rows in one transaction each (a run needs at least a commit).
//!
//! Anchors: Airflow's scheduler loop and Dagster's 30 s daemon tick start runs seconds late;
//! the goal here is under a second at p99 for 10,000 simultaneous ticks.
//!
//! Sizes and choices are overridable for a quick smoke run on a debug build:
//! `PIPE_BIN` (the `pipe` binary; default the one cargo built with this bench),
//! `PIPE_BENCH_INTEGRATIONS` (10000), `PIPE_BENCH_WORKERS` (16), `PIPE_BENCH_MINUTES`
//! (measured minute boundaries, 2), `PIPE_BENCH_BACKENDS` (`sqlite,postgres`),
//! `PIPE_BENCH_SHAPES` (`burst,spread`: every schedule at second 0, or integration k at
//! second k % 60 — the same N runs a minute as a burst or as a steady stream),
//! `PIPE_TEST_POSTGRES_URL` (`postgres://postgres@127.0.0.1:5432/test`: the server to
//! create the round's database on). E.g.
//! `PIPE_BIN=target/debug/pipe PIPE_BENCH_INTEGRATIONS=200 cargo bench --bench serve`.
//!
//! No harness, no criterion: a plain `main` that prints the machine and a table.

mod support;
use support::{cpu_seconds, machine, print_table, row, status_kib, PgDatabase, Row};

use chrono::{DateTime, Duration as TimeDelta, DurationRound, Utc};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LAG_GOAL_P99: f64 = 1.0; // seconds
const RUNS_PER_S_GOAL: f64 = 500.0;
const RSS_GOAL_MB: f64 = 300.0;
const FLOOR_ROWS: usize = 10_000;

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

struct Settings {
    bin: PathBuf,
    integrations: usize,
    workers: usize,
    minutes: usize,
    backends: Vec<String>,
    shapes: Vec<Shape>,
    pg_url: String,
}

/// How the integrations' per-minute schedules sit in the minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Every integration at second 0 (`* * * * *`): one burst of N runs a minute, whose
    /// drain measures runs/s; its lag is N / runs/s by construction.
    Burst,
    /// Integration k at second k % 60 (`S * * * * *`): the same N runs a minute, as a
    /// steady N/60 runs/s, the way schedules of many teams fall; its lag measures the
    /// scheduler and the queue, not a backlog.
    Spread,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Burst => "burst",
            Shape::Spread => "spread",
        }
    }
}

impl Settings {
    fn from_env() -> Settings {
        let bin = std::env::var_os("PIPE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pipe")));
        assert!(
            bin.exists(),
            "the pipe binary {} does not exist",
            bin.display()
        );
        let backends = std::env::var("PIPE_BENCH_BACKENDS")
            .unwrap_or_else(|_| "sqlite,postgres".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        for b in &backends {
            assert!(
                b == "sqlite" || b == "postgres",
                "PIPE_BENCH_BACKENDS: unknown backend {b:?} (sqlite, postgres)"
            );
        }
        let shapes = std::env::var("PIPE_BENCH_SHAPES")
            .unwrap_or_else(|_| "burst,spread".into())
            .split(',')
            .map(|v| match v.trim() {
                "burst" => Shape::Burst,
                "spread" => Shape::Spread,
                other => panic!("PIPE_BENCH_SHAPES: unknown shape {other:?} (burst, spread)"),
            })
            .collect();
        Settings {
            bin,
            shapes,
            integrations: env_usize("PIPE_BENCH_INTEGRATIONS", 10_000).max(1),
            workers: env_usize("PIPE_BENCH_WORKERS", 16).max(1),
            minutes: env_usize("PIPE_BENCH_MINUTES", 2).max(1),
            backends,
            pg_url: std::env::var("PIPE_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The integrations.

fn write_integrations(dir: &Path, n: usize, shape: Shape) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let name = format!("i{k:05}");
        let cron = match shape {
            Shape::Burst => "* * * * *".to_string(),
            Shape::Spread => format!("{} * * * * *", k % 60),
        };
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            format!(
                "pipeline: {name}\n\
                 description: bench no-op integration\n\
                 schedule: {{ cron: \"{cron}\" }}\n\
                 steps:\n  \
                   s: {{ type: log, with: {{ message: \"tick\" }} }}\n"
            ),
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// The child process and /proc.

/// The server child; killed if the bench panics.
struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (up to `patience`) for a clean exit; the exit code.
    fn stop(&mut self, patience: Duration) -> i32 {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let mut child = self.child.take().unwrap();
        let until = Instant::now() + patience;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "pipe serve did not exit within {patience:?} of SIGTERM; its log: {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Samples VmRSS every 200 ms until stopped; the largest seen.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: i32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match status_kib(pid, "VmRSS:") {
                    Some(v) => max = max.max(v),
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            max
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Wait for a line containing `needle` in the log (from its start).
fn wait_for_log(server: &mut Server, needle: &str, patience: Duration) -> Instant {
    let until = Instant::now() + patience;
    let mut offset = 0u64;
    let mut carry = String::new();
    loop {
        if let Ok(mut f) = std::fs::File::open(&server.log) {
            f.seek(SeekFrom::Start(offset)).unwrap();
            let mut buf = String::new();
            let n = f.read_to_string(&mut buf).unwrap_or(0) as u64;
            offset += n;
            carry.push_str(&buf);
            if carry.contains(needle) {
                return Instant::now();
            }
            // Keep only the unfinished last line.
            if let Some(p) = carry.rfind('\n') {
                carry.drain(..=p);
            }
        }
        if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "pipe serve exited ({status}) before {needle:?}:\n{}",
                server.log_text()
            );
        }
        assert!(
            Instant::now() < until,
            "no {needle:?} in the server's log within {patience:?}:\n{}",
            tail(&server.log_text(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sleep until the wall clock reaches `t`.
fn sleep_until(t: DateTime<Utc>) {
    let d = t - Utc::now();
    if let Ok(d) = d.to_std() {
        std::thread::sleep(d);
    }
}

// ---------------------------------------------------------------------------------------
// Reading the store (SQL over both backends: the same query text).

/// One scheduled run as the store recorded it.
struct RunRow {
    logical: DateTime<Utc>,
    started: DateTime<Utc>,
    finished: Option<DateTime<Utc>>,
    status: String,
    enqueued: Option<DateTime<Utc>>,
    claimed: Option<DateTime<Utc>>,
}

const RUNS_SQL: &str = "SELECT r.logical_date, r.started_at, r.finished_at, r.status, \
     q.enqueued_at, q.claimed_at FROM runs r LEFT JOIN queue q ON q.id = r.queue_item \
     WHERE r.\"trigger\" = 'schedule' AND r.logical_date IS NOT NULL";
const TICKS_SQL: &str =
    "SELECT scheduled_at, state, count(*) FROM ticks GROUP BY scheduled_at, state";
const LOADED_SQL: &str = "SELECT count(*) FROM integrations WHERE next_run_at IS NOT NULL";

fn parse_ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("store time {s:?}: {e}"))
        .with_timezone(&Utc)
}

fn opt_ts(s: Option<String>) -> Option<DateTime<Utc>> {
    s.as_deref().map(parse_ts)
}

/// The store of one round, as the bench reads it.
enum Db {
    Sqlite(PathBuf),
    Postgres { url: String },
}

impl Db {
    fn sqlite(&self) -> rusqlite::Connection {
        let Db::Sqlite(p) = self else { unreachable!() };
        let c = rusqlite::Connection::open(p).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    fn pg(&self) -> postgres::Client {
        let Db::Postgres { url, .. } = self else {
            unreachable!()
        };
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }

    fn loaded(&self) -> usize {
        match self {
            Db::Sqlite(p) if !p.exists() => 0,
            Db::Sqlite(_) => self
                .sqlite()
                .query_row(LOADED_SQL, [], |r| r.get::<_, i64>(0))
                .unwrap_or(0) as usize,
            Db::Postgres { .. } => self
                .pg()
                .query_one(LOADED_SQL, &[])
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0) as usize,
        }
    }

    fn runs(&self) -> Vec<RunRow> {
        type Raw = (
            String,
            String,
            Option<String>,
            String,
            Option<String>,
            Option<String>,
        );
        let raw: Vec<Raw> = match self {
            Db::Sqlite(_) => {
                let c = self.sqlite();
                let mut st = c.prepare(RUNS_SQL).unwrap();
                st.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
            }
            Db::Postgres { .. } => self
                .pg()
                .query(RUNS_SQL, &[])
                .unwrap()
                .into_iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                .collect(),
        };
        raw.into_iter()
            .map(|(l, s, f, status, e, c)| RunRow {
                logical: parse_ts(&l),
                started: parse_ts(&s),
                finished: opt_ts(f),
                status,
                enqueued: opt_ts(e),
                claimed: opt_ts(c),
            })
            .collect()
    }

    /// (scheduled_at, state) → count.
    fn ticks(&self) -> BTreeMap<(DateTime<Utc>, String), i64> {
        let raw: Vec<(String, String, i64)> = match self {
            Db::Sqlite(_) => {
                let c = self.sqlite();
                let mut st = c.prepare(TICKS_SQL).unwrap();
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
            Db::Postgres { .. } => self
                .pg()
                .query(TICKS_SQL, &[])
                .unwrap()
                .into_iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        };
        raw.into_iter()
            .map(|(t, s, n)| ((parse_ts(&t), s), n))
            .collect()
    }

    /// Finished runs of one minute's instants (polled while they drain; a light query).
    fn finished_in(&self, minute: DateTime<Utc>) -> usize {
        let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (from, to) = (stamp(minute), stamp(minute + TimeDelta::minutes(1)));
        let sql = "SELECT count(*) FROM runs WHERE logical_date >= $1 AND logical_date < $2 \
                   AND finished_at IS NOT NULL";
        match self {
            Db::Sqlite(_) => self
                .sqlite()
                .query_row(
                    &sql.replace("$1", "?1").replace("$2", "?2"),
                    [&from, &to],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap_or(0) as usize,
            Db::Postgres { .. } => self
                .pg()
                .query_one(sql, &[&from, &to])
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0) as usize,
        }
    }

    /// Floors: `FLOOR_ROWS` rows like a run's in one transaction, then one transaction
    /// each, into a scratch table of the same database (dropped after). Seconds.
    fn floors(&self) -> (f64, f64) {
        let create = "CREATE TABLE bench_floor (id BIGINT PRIMARY KEY, pipeline TEXT NOT NULL, \
                      status TEXT NOT NULL, started_at TEXT NOT NULL, logical_date TEXT)";
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        match self {
            Db::Sqlite(_) => {
                let mut c = self.sqlite();
                // As the store's connections: WAL (a property of the file) + NORMAL.
                c.pragma_update(None, "synchronous", "NORMAL").unwrap();
                let ins = "INSERT INTO bench_floor VALUES (?1, ?2, 'succeeded', ?3, ?3)";
                c.execute_batch("DROP TABLE IF EXISTS bench_floor").unwrap();
                c.execute_batch(create).unwrap();
                let t = Instant::now();
                let tx = c.transaction().unwrap();
                {
                    let mut st = tx.prepare(ins).unwrap();
                    for k in 0..FLOOR_ROWS {
                        st.execute(rusqlite::params![k as i64, format!("i{k:05}"), now])
                            .unwrap();
                    }
                }
                tx.commit().unwrap();
                let one = t.elapsed().as_secs_f64();
                c.execute_batch("DELETE FROM bench_floor").unwrap();
                let t = Instant::now();
                {
                    let mut st = c.prepare(ins).unwrap();
                    for k in 0..FLOOR_ROWS {
                        st.execute(rusqlite::params![k as i64, format!("i{k:05}"), now])
                            .unwrap();
                    }
                }
                let each = t.elapsed().as_secs_f64();
                c.execute_batch("DROP TABLE bench_floor").unwrap();
                (one, each)
            }
            Db::Postgres { .. } => {
                let mut c = self.pg();
                let ins = "INSERT INTO bench_floor VALUES ($1, $2, 'succeeded', $3, $3)";
                c.batch_execute("DROP TABLE IF EXISTS bench_floor").unwrap();
                c.batch_execute(create).unwrap();
                let t = Instant::now();
                {
                    let mut tx = c.transaction().unwrap();
                    let st = tx.prepare(ins).unwrap();
                    for k in 0..FLOOR_ROWS {
                        tx.execute(&st, &[&(k as i64), &format!("i{k:05}"), &now])
                            .unwrap();
                    }
                    tx.commit().unwrap();
                }
                let one = t.elapsed().as_secs_f64();
                c.batch_execute("DELETE FROM bench_floor").unwrap();
                let t = Instant::now();
                let st = c.prepare(ins).unwrap();
                for k in 0..FLOOR_ROWS {
                    c.execute(&st, &[&(k as i64), &format!("i{k:05}"), &now])
                        .unwrap();
                }
                let each = t.elapsed().as_secs_f64();
                c.batch_execute("DROP TABLE bench_floor").unwrap();
                (one, each)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Statistics.

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

fn secs(d: TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn fmt_s(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else if s.abs() < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

// ---------------------------------------------------------------------------------------
// One round.

struct Minute {
    instant: DateTime<Utc>,
    drained_at: Option<DateTime<Utc>>,
    cpu_burst: Option<f64>,
}

struct Round {
    /// Backend and shape, the rows' label.
    backend: String,
    shape: Shape,
    ready_s: f64,
    first_plan_s: f64,
    minutes: Vec<Minute>,
    quiet: Option<(f64, f64)>, // (cpu seconds, wall seconds)
    stopped_at: DateTime<Utc>,
    loaded_rss_kib: u64,
    hwm_kib: u64,
    rss_max_kib: u64,
    exit: i32,
    runs: Vec<RunRow>,
    ticks: BTreeMap<(DateTime<Utc>, String), i64>,
    floors: (f64, f64),
    log: String,
}

fn round(s: &Settings, backend: &str, shape: Shape) -> Round {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pipelines");
    let state = tmp.path().join("state");
    let t = Instant::now();
    write_integrations(&dir, s.integrations, shape);
    eprintln!(
        "[{backend}] wrote {} integrations in {:.1} s",
        s.integrations,
        t.elapsed().as_secs_f64()
    );
    let (_pg, db) = if backend == "postgres" {
        let (pg, url) = PgDatabase::create(&s.pg_url);
        let db = Db::Postgres { url };
        (Some(pg), db)
    } else {
        (None, Db::Sqlite(state.join(store::DB_FILE)))
    };
    let log = tmp.path().join("serve.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(&s.bin);
    cmd.arg("--state-dir")
        .arg(&state)
        .arg("serve")
        .arg(&dir)
        .arg("--workers")
        .arg(s.workers.to_string())
        .env_remove("PIPE_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    if let Db::Postgres { url, .. } = &db {
        cmd.arg("--db").arg(url);
    }
    let started = Instant::now();
    let mut server = Server {
        child: Some(cmd.spawn().expect("start pipe serve")),
        log: log.clone(),
    };
    let pid = server.pid();
    let rss = RssSampler::start(pid);
    let patience = Duration::from_secs(600);
    wait_for_log(&mut server, "serving ", patience);
    let ready_s = started.elapsed().as_secs_f64();
    eprintln!("[{backend}] serving after {ready_s:.1} s");
    // The first scheduler round gives every integration a cursor (next_run_at); a minute
    // boundary counts only once every integration was planned before it.
    let until = Instant::now() + patience;
    while db.loaded() < s.integrations {
        assert!(Instant::now() < until, "integrations never all planned");
        if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "pipe serve exited ({st}):\n{}",
                tail(&server.log_text(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let first_plan_s = started.elapsed().as_secs_f64();
    let loaded_rss_kib = status_kib(pid, "VmRSS:").unwrap_or(0);
    let planned = Utc::now();
    eprintln!("[{backend}] all integrations planned after {first_plan_s:.1} s");
    let first = planned.duration_trunc(TimeDelta::minutes(1)).unwrap() + TimeDelta::minutes(1);
    let mut minutes = Vec::new();
    let mut quiet = None;
    for m in 0..s.minutes {
        let instant = first + TimeDelta::minutes(m as i64);
        let next = instant + TimeDelta::minutes(1);
        sleep_until(instant);
        let cpu0 = cpu_seconds(pid);
        // Poll (lightly) until every run of this instant finished, or the next boundary.
        let mut drained_at = None;
        let mut cpu_burst = None;
        let last = m + 1 == s.minutes;
        let deadline = match (shape, last) {
            (_, true) => instant + TimeDelta::minutes(3),
            (Shape::Burst, false) => next - TimeDelta::seconds(1),
            // The minute's last runs are due at second 59.
            (Shape::Spread, false) => next + TimeDelta::seconds(5),
        };
        while Utc::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            if db.finished_in(instant) >= s.integrations {
                drained_at = Some(Utc::now());
                cpu_burst = Some(cpu_seconds(pid) - cpu0);
                break;
            }
        }
        eprintln!(
            "[{backend}] minute {}: {}",
            instant.format("%H:%M"),
            match drained_at {
                Some(d) => format!("drained after {:.1} s", secs(d - instant)),
                None => "NOT drained".into(),
            }
        );
        // The quiet stretch: from 2 s after the drain to 2 s before the next boundary.
        if let (Some(d), false, None, Shape::Burst) = (drained_at, last, &quiet, shape) {
            let from = d + TimeDelta::seconds(2);
            let to = next - TimeDelta::seconds(2);
            if to - from >= TimeDelta::seconds(5) {
                sleep_until(from);
                let c0 = cpu_seconds(pid);
                let w0 = Instant::now();
                sleep_until(to);
                quiet = Some((cpu_seconds(pid) - c0, w0.elapsed().as_secs_f64()));
            }
        }
        minutes.push(Minute {
            instant,
            drained_at,
            cpu_burst,
        });
    }
    let hwm_kib = status_kib(pid, "VmHWM:").unwrap_or(0);
    let stopped_at = Utc::now();
    let exit = server.stop(Duration::from_secs(120));
    let rss_max_kib = rss.finish();
    let log_text = server.log_text();
    let runs = db.runs();
    let ticks = db.ticks();
    let floors = db.floors();
    drop(db);
    Round {
        backend: format!("{backend}, {}", shape.label()),
        shape,
        ready_s,
        first_plan_s,
        minutes,
        quiet,
        stopped_at,
        loaded_rss_kib,
        hwm_kib,
        rss_max_kib,
        exit,
        runs,
        ticks,
        floors,
        log: log_text,
    }
}

// ---------------------------------------------------------------------------------------
// The figures of a round.

fn report(s: &Settings, r: &Round, rows: &mut Vec<Row>) {
    let b = &r.backend;
    let n = s.integrations;
    let stopped = r.stopped_at;
    let mut lags = Vec::new();
    let (mut sched, mut wait, mut start, mut dur) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut missing = 0usize;
    let mut failed = 0usize;
    let mut rates = Vec::new();
    let mut enqueue_rates = Vec::new();
    for m in &r.minutes {
        if m.drained_at.is_none() {
            eprintln!(
                "[{b}] the {} burst was not done before the next minute (or 3 minutes for the last)",
                m.instant.format("%H:%M")
            );
        }
        let next = m.instant + TimeDelta::minutes(1);
        let runs: Vec<&RunRow> = r
            .runs
            .iter()
            .filter(|x| x.logical >= m.instant && x.logical < next)
            .collect();
        missing += n.saturating_sub(runs.len());
        for x in &runs {
            lags.push(secs(x.started - x.logical));
            if let Some(e) = x.enqueued {
                sched.push(secs(e - x.logical));
                if let Some(c) = x.claimed {
                    wait.push(secs(c - e));
                    start.push(secs(x.started - c));
                }
            }
            if let Some(f) = x.finished {
                dur.push(secs(f - x.started));
            }
            if x.status != "succeeded" {
                failed += 1;
            }
        }
        // Never run by the stop: at least this late.
        for _ in runs.len()..n {
            lags.push(secs(stopped - m.instant));
        }
        if r.shape == Shape::Spread {
            // A steady N/60 runs/s: no burst to measure the drain of.
            continue;
        }
        if let Some(last_queued) = runs.iter().filter_map(|x| x.enqueued).max() {
            let span = secs(last_queued - m.instant).max(1e-3);
            enqueue_rates.push((m.instant, runs.len() as f64 / span, span));
        }
        let first_start = runs.iter().map(|x| x.started).min();
        let last_finish = runs.iter().filter_map(|x| x.finished).max();
        if let (Some(a), Some(z)) = (first_start, last_finish) {
            let span = secs(z - a).max(1e-3);
            rates.push((
                m.instant,
                runs.len() as f64 / span,
                span,
                secs(z - m.instant),
            ));
        }
    }
    let lags = sorted(lags);
    let p99 = percentile(&lags, 99.0);
    let minutes = r.minutes.len();
    let late = if missing > 0 {
        format!(
            ", {missing} of {} never ran (counted as late as the stop)",
            n * minutes
        )
    } else {
        String::new()
    };
    row(
        rows,
        format!("[{b}] lag scheduled → run start: p50 / p99 / max"),
        format!(
            "{} / {} / {} ({} runs, {minutes} minute(s){late})",
            fmt_s(percentile(&lags, 50.0)),
            fmt_s(p99),
            fmt_s(lags.last().copied().unwrap_or(f64::NAN)),
            lags.len() - missing
        ),
        format!("p99 ≤ {LAG_GOAL_P99} s"),
        format!(
            "{:.2}× goal ({})",
            p99 / LAG_GOAL_P99,
            if p99 <= LAG_GOAL_P99 { "met" } else { "missed" }
        ),
    );
    let split = |v: &[f64]| {
        let v = sorted(v.to_vec());
        format!(
            "{} / {}",
            fmt_s(percentile(&v, 50.0)),
            fmt_s(percentile(&v, 99.0))
        )
    };
    row(
        rows,
        format!("[{b}]   of which scheduler (instant → queued) p50 / p99"),
        split(&sched),
        "-",
        "-",
    );
    row(
        rows,
        format!("[{b}]   queue wait (queued → claimed) p50 / p99"),
        split(&wait),
        "-",
        "-",
    );
    row(
        rows,
        format!("[{b}]   start (claimed → run recorded) p50 / p99"),
        split(&start),
        "-",
        "-",
    );
    row(
        rows,
        format!("[{b}] run duration (start → finished) p50 / p99"),
        split(&dur),
        "-",
        "-",
    );
    for (instant, rate, span, drained) in &rates {
        row(
            rows,
            format!("[{b}] runs/s while the {} burst drains", instant.format("%H:%M")),
            format!("{rate:.0} runs/s ({n} runs in {span:.1} s; all done {drained:.1} s after the instant)"),
            format!("≥ {RUNS_PER_S_GOAL:.0} runs/s"),
            format!(
                "{:.2}× goal ({})",
                rate / RUNS_PER_S_GOAL,
                if *rate >= RUNS_PER_S_GOAL { "met" } else { "missed" }
            ),
        );
    }
    for (instant, rate, span) in &enqueue_rates {
        row(
            rows,
            format!(
                "[{b}]   scheduler: ticks queued/s, {} burst",
                instant.format("%H:%M")
            ),
            format!("{rate:.0} ticks/s (the last queued {span:.1} s after the instant)"),
            "-",
            "runs/s above cannot exceed it",
        );
    }
    let (one, each) = r.floors;
    let best = rates.iter().map(|x| x.1).fold(f64::NAN, f64::max);
    row(
        rows,
        format!("[{b}] floor: {FLOOR_ROWS} rows in 1 transaction"),
        format!("{} ({:.0} rows/s)", fmt_s(one), FLOOR_ROWS as f64 / one),
        "floor",
        format!(
            "best runs/s = 1/{:.0} of it",
            FLOOR_ROWS as f64 / one / best
        ),
    );
    row(
        rows,
        format!("[{b}] floor: {FLOOR_ROWS} rows, 1 transaction each"),
        format!(
            "{} ({:.0} commits/s)",
            fmt_s(each),
            FLOOR_ROWS as f64 / each
        ),
        "floor",
        format!(
            "a run costs {:.1} commits' time",
            FLOOR_ROWS as f64 / each / best
        ),
    );
    for m in &r.minutes {
        if let Some(c) = m.cpu_burst {
            row(
                rows,
                format!(
                    "[{b}] server CPU per run ({} burst)",
                    m.instant.format("%H:%M")
                ),
                format!(
                    "{:.0} µs/run ({c:.1} s CPU for {n} runs)",
                    c / n as f64 * 1e6
                ),
                "-",
                "-",
            );
        }
    }
    match r.quiet {
        Some((cpu, wall)) => row(
            rows,
            format!("[{b}] server CPU between ticks (idle, {n} integrations)"),
            format!(
                "{:.1}% of a core ({cpu:.2} s CPU in {wall:.0} s)",
                cpu / wall * 100.0
            ),
            "-",
            format!(
                "{:.2} ms CPU per integration per minute",
                cpu / wall * 60.0 / n as f64 * 1e3
            ),
        ),
        None => row(
            rows,
            format!("[{b}] server CPU between ticks"),
            "no quiet stretch (a burst did not drain ≥ 9 s before the next minute)".into(),
            "-",
            "-",
        ),
    }
    let hwm = r.hwm_kib.max(r.rss_max_kib) as f64 / 1024.0;
    row(
        rows,
        format!("[{b}] server peak RSS (VmHWM)"),
        format!(
            "{hwm:.0} MB (VmRSS {:.0} MB once loaded and planned, before the first tick; VmHWM {:.0} MB before SIGTERM, sampled VmRSS max {:.0} MB)",
            r.loaded_rss_kib as f64 / 1024.0,
            r.hwm_kib as f64 / 1024.0,
            r.rss_max_kib as f64 / 1024.0
        ),
        format!("≤ {RSS_GOAL_MB:.0} MB"),
        format!(
            "{:.2}× goal ({})",
            hwm / RSS_GOAL_MB,
            if hwm <= RSS_GOAL_MB { "met" } else { "missed" }
        ),
    );
    row(
        rows,
        format!("[{b}] startup: serving / every integration planned"),
        format!("{:.1} s / {:.1} s", r.ready_s, r.first_plan_s),
        "-",
        "-",
    );
    // Consistency: what the ticks table says for the measured instants.
    let mut states = Vec::new();
    for m in &r.minutes {
        let mut by_state: BTreeMap<&str, i64> = BTreeMap::new();
        for ((t, state), count) in &r.ticks {
            if *t >= m.instant && *t < m.instant + TimeDelta::minutes(1) {
                *by_state.entry(state.as_str()).or_default() += count;
            }
        }
        let parts: Vec<String> = by_state.iter().map(|(s, c)| format!("{c} {s}")).collect();
        states.push(format!(
            "{}: {}",
            m.instant.format("%H:%M"),
            parts.join(", ")
        ));
    }
    eprintln!(
        "[{b}] ticks: {}; failed runs: {failed}; exit code after SIGTERM: {}",
        states.join("; "),
        r.exit
    );
    assert_eq!(
        r.exit,
        0,
        "pipe serve exited {} after SIGTERM:\n{}",
        r.exit,
        tail(&r.log, 40)
    );
    assert_eq!(
        failed,
        0,
        "{failed} runs did not succeed:\n{}",
        tail(&r.log, 40)
    );
}

fn main() {
    let s = Settings::from_env();
    println!("{}", machine());
    println!(
        "pipe serve: {} integrations on per-minute schedules (burst: all `* * * * *`; spread: integration k at second k % 60), one `log` step each, --workers {}, {} measured minute(s) per round; binary {}",
        s.integrations,
        s.workers,
        s.minutes,
        s.bin.display()
    );
    let mut rows = Vec::new();
    for backend in &s.backends {
        for shape in &s.shapes {
            let r = round(&s, backend, *shape);
            report(&s, &r, &mut rows);
        }
    }
    println!();
    print_table(&rows);
    println!();
    println!(
        "Anchors: Airflow's scheduler loop and Dagster's 30 s daemon tick start runs seconds \
         late; the goal here is p99 ≤ 1 s from the scheduled instant, for every integration \
         firing at once (burst), or in the steady state (spread)."
    );
}
