//! The REST API under load (`cargo bench --bench api`, or `just bench`).
//!
//! A store with 1,000,000 runs (100 integrations) and 10,000,000 log rows, written straight
//! into the database (SQLite file, then a fresh PostgreSQL database), served by the real
//! `pipe serve --listen`; a load generator in this process (reqwest on tokio, N keep-alive
//! connections, each sending its next request when the previous answered) asks for:
//!
//! - `GET /api/v1/runs` — the first page (50 newest);
//! - `GET /api/v1/runs?cursor=…` — a page deep in the history (ids around 10,000);
//! - `GET /api/v1/runs?integration=…` — one integration's newest page;
//! - `GET /api/v1/runs/{id}` — a run with its steps (what a run page reads);
//! - `GET /api/v1/runs/{id}/logs` — its log page;
//! - `GET /runs/{id}` — the dashboard's run page (with the session's cookies).
//!
//! Each with a viewer's JWT (so every request also verifies the token and reads the user).
//! Figures: requests/s and p50/p99 latency (goal p99 ≤ 20 ms for the API, ≤ 100 ms for a
//! page). The load generator shares the machine's cores with the server and the database
//! (2 here): the latencies include waiting for a core. Floor measured in the same run:
//! `GET /health` (one trivial store read, no token), the cost of the HTTP round trip itself.
//!
//! Overridable: `PIPE_BIN`, `PIPE_BENCH_RUNS` (1000000), `PIPE_BENCH_LOGS_PER_RUN` (10),
//! `PIPE_BENCH_CONNECTIONS` (8), `PIPE_BENCH_SECONDS` (10 per endpoint),
//! `PIPE_BENCH_BACKENDS` (`sqlite,postgres`), `PIPE_TEST_POSTGRES_URL`.

mod support;
use support::{env_usize, machine, print_table, row, PgDatabase, Row};

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const API_P99_GOAL_MS: f64 = 20.0;
const PAGE_P99_GOAL_MS: f64 = 100.0;
const PASSWORD: &str = "bench-password-1";

struct Settings {
    bin: PathBuf,
    runs: usize,
    logs_per_run: usize,
    connections: usize,
    seconds: u64,
    backends: Vec<String>,
    pg_admin: String,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            bin: std::env::var_os("PIPE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pipe"))),
            runs: env_usize("PIPE_BENCH_RUNS", 1_000_000),
            logs_per_run: env_usize("PIPE_BENCH_LOGS_PER_RUN", 10),
            connections: env_usize("PIPE_BENCH_CONNECTIONS", 8),
            seconds: env_usize("PIPE_BENCH_SECONDS", 10) as u64,
            backends: std::env::var("PIPE_BENCH_BACKENDS")
                .unwrap_or_else(|_| "sqlite,postgres".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            pg_admin: std::env::var("PIPE_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        }
    }
}

/// The seeding statements: runs, their logs, four steps for each of the newest 1,000.
/// `series(n)` is the dialect's "rows x = 1..n" source.
fn seed_sql(runs: usize, logs: usize, series: impl Fn(usize) -> String, time: &str) -> Vec<String> {
    let t = |expr: &str| time.replace("EXPR", expr);
    vec![
        format!(
            "INSERT INTO runs(id, pipeline, params, \"trigger\", status, started_at, finished_at, owner, attempt)
             SELECT x, 'integration-' || (x % 100), '{{}}', 'schedule',
                    CASE WHEN x % 20 = 0 THEN 'failed' ELSE 'succeeded' END,
                    {}, {}, 'pipe', 1
             FROM {}",
            t("x * 2"),
            t("x * 2 + 1"),
            series(runs)
        ),
        format!(
            "INSERT INTO logs(run_id, time, level, step, message)
             SELECT (x - 1) / {logs} + 1, {}, 'info', 'extract', 'fetched page ' || x || ' of the tickets API'
             FROM {}",
            t("x"),
            series(runs * logs)
        ),
        format!(
            "INSERT INTO step_runs(run_id, step, run_attempt, kind, status, attempts, started_at, finished_at, duration_ms, \"rows\", outputs)
             SELECT {runs} - (x - 1) / 4, 'step_' || ((x - 1) % 4), 1, 'http.extract', 'succeeded', 1,
                    {}, {}, 1000, 500, '{{}}'
             FROM {}",
            t("x"),
            t("x + 1"),
            series(4000.min(runs * 4))
        ),
    ]
}

fn seed_sqlite(path: &Path, runs: usize, logs: usize) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;")
        .unwrap();
    let series = |n: usize| {
        format!("(WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s LIMIT {n}) SELECT x FROM s)")
    };
    let time = "strftime('%Y-%m-%dT%H:%M:%fZ', 1700000000 + EXPR, 'unixepoch')";
    c.execute_batch("BEGIN").unwrap();
    for sql in seed_sql(runs, logs, series, time) {
        c.execute_batch(&sql).unwrap();
    }
    c.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")
        .unwrap();
}

fn seed_postgres(url: &str, runs: usize, logs: usize) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let series = |n: usize| format!("generate_series(1, {n}) AS x");
    let time = "to_char(to_timestamp(1700000000 + EXPR) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";
    for sql in seed_sql(runs, logs, series, time) {
        c.batch_execute(&sql).unwrap();
    }
    c.batch_execute(&format!(
        "SELECT setval(pg_get_serial_sequence('runs', 'id'), {runs}); \
         SELECT setval(pg_get_serial_sequence('logs', 'id'), {});",
        runs * logs
    ))
    .unwrap();
    c.batch_execute("VACUUM ANALYZE").unwrap();
}

struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn pipe(s: &Settings, dir: &Path, db: Option<&str>) -> Command {
    let mut c = Command::new(&s.bin);
    c.current_dir(dir).env("PIPE_HOME", dir.join("state"));
    if let Some(url) = db {
        c.args(["--db", url]);
    }
    c
}

// The child is reaped by `Server`'s Drop, or killed and reaped before the panic.
#[allow(clippy::zombie_processes)]
fn start(s: &Settings, dir: &Path, db: Option<&str>) -> Server {
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    let log = dir.join("serve.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = pipe(s, dir, db)
        .args([
            "serve",
            "pipelines",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.split("API on http://").nth(1) {
            let addr = rest.split("/api/v1/").next().unwrap();
            return Server {
                base: format!("http://{addr}"),
                child,
                log,
            };
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pipe serve did not start:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A request header: the API's bearer token or the dashboard's session cookies.
type Header = (&'static str, String);

/// `connections` loops asking `path` for `seconds`: (requests/s, p50 ms, p99 ms).
fn load(
    base: &str,
    path: &str,
    auth: Option<Header>,
    connections: usize,
    seconds: u64,
) -> (f64, f64, f64, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let url = format!("{base}{path}");
    let started = Instant::now();
    rt.block_on(async {
        // No redirects: a page that sends to the login page is an error, not a result.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        // Warm: one request per connection.
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (client, url, lat, errors) = (
                client.clone(),
                url.clone(),
                latencies.clone(),
                errors.clone(),
            );
            let auth = auth.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let mut req = client.get(&url);
                    if let Some((name, value)) = &auth {
                        req = req.header(*name, value);
                    }
                    match req.send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            mine.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        _ => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                lat.lock().unwrap().extend(mine);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        if l.is_empty() {
            f64::NAN
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize]
        }
    };
    (
        l.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn round(s: &Settings, backend: &str, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, url) = if backend == "postgres" {
        let (db, url) = PgDatabase::create(&s.pg_admin);
        (Some(db), Some(url))
    } else {
        (None, None)
    };
    // The schema and a viewer, through the binary.
    let mut add = pipe(s, dir.path(), url.as_deref())
        .args(["users", "add", "bench", "--role", "viewer"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(add.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    assert!(add.wait().unwrap().success());
    let t = Instant::now();
    match &url {
        Some(u) => seed_postgres(u, s.runs, s.logs_per_run),
        None => seed_sqlite(
            &dir.path().join("state/history.sqlite"),
            s.runs,
            s.logs_per_run,
        ),
    }
    println!(
        "{backend}: seeded {} runs and {} log rows in {:.0} s",
        s.runs,
        s.runs * s.logs_per_run,
        t.elapsed().as_secs_f64()
    );
    let server = start(s, dir.path(), url.as_deref());
    let (token, refresh): (String, String) = {
        let v: serde_json::Value = reqwest::blocking::Client::new()
            .post(format!("{}/api/v1/token/", server.base))
            .json(&serde_json::json!({"username": "bench", "password": PASSWORD}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        (
            v["access"].as_str().expect("a token").to_string(),
            v["refresh"].as_str().expect("a refresh token").to_string(),
        )
    };
    // The API takes the access JWT as a bearer token; the dashboard, the session's cookies.
    let bearer = ("authorization", format!("Bearer {token}"));
    let cookies = (
        "cookie",
        format!("pipe_session={token}; pipe_refresh={refresh}"),
    );
    let run = s.runs;
    let deep = 10_000.min(s.runs);
    let dashboard = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/runs/{run}", server.base))
        .header(cookies.0, &cookies.1)
        .send()
        .map(|r| r.status().as_u16() == 200)
        .unwrap_or(false);
    assert!(
        dashboard,
        "the dashboard's run page did not answer 200 to the session cookies"
    );
    let mut cases: Vec<(&str, String, Option<Header>, f64)> = vec![
        (
            "health (floor: no token, one store read)",
            "/health".into(),
            None,
            API_P99_GOAL_MS,
        ),
        (
            "runs, first page",
            "/api/v1/runs".into(),
            Some(bearer.clone()),
            API_P99_GOAL_MS,
        ),
        (
            "runs, deep cursor",
            format!("/api/v1/runs?cursor={deep}"),
            Some(bearer.clone()),
            API_P99_GOAL_MS,
        ),
        (
            "runs of one integration",
            "/api/v1/runs?integration=integration-7".into(),
            Some(bearer.clone()),
            API_P99_GOAL_MS,
        ),
        (
            "a run with its steps",
            format!("/api/v1/runs/{run}"),
            Some(bearer.clone()),
            API_P99_GOAL_MS,
        ),
        (
            "a run's log page",
            format!("/api/v1/runs/{run}/logs"),
            Some(bearer.clone()),
            API_P99_GOAL_MS,
        ),
    ];
    cases.push((
        "dashboard run page",
        format!("/runs/{run}"),
        Some(cookies.clone()),
        PAGE_P99_GOAL_MS,
    ));
    let mut floor_p50 = f64::NAN;
    for (name, path, auth, goal) in cases {
        let (rps, p50, p99, errors) = load(&server.base, &path, auth, s.connections, s.seconds);
        if path == "/health" {
            floor_p50 = p50;
        }
        println!(
            "{backend} {name}: {rps:.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {errors} errors"
        );
        assert_eq!(
            errors,
            0,
            "{name}: requests failed; server log:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        row(
            rows,
            format!("{backend}: {name} ({} connections)", s.connections),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms, {rps:.0} req/s"),
            if path == "/health" {
                "floor".to_string()
            } else {
                format!("p99 ≤ {goal} ms")
            },
            if path == "/health" {
                String::new()
            } else {
                format!(
                    "{:.1}× floor p50; {}",
                    p50 / floor_p50,
                    if p99 <= goal {
                        "goal met"
                    } else {
                        "goal missed"
                    }
                )
            },
        );
    }
    drop(server);
}

fn main() {
    let s = Settings::from_env();
    println!("{}", machine());
    println!(
        "REST API: {} runs (100 integrations), {} log rows; {} connections, {} s per endpoint; binary {}",
        s.runs,
        s.runs * s.logs_per_run,
        s.connections,
        s.seconds,
        s.bin.display()
    );
    let mut rows = Vec::new();
    for backend in &s.backends {
        round(&s, backend, &mut rows);
    }
    println!();
    print_table(&rows);
}
