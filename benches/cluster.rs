//! The cluster benchmark (`cargo bench --bench cluster`, or `just bench`): no-op runs
//! through RabbitMQ with 1, 2 and 4 `pipe worker`s, and Celery — the seed's engine (Hopen,
//! seed 001) — doing the same in the same run as the anchor.
//!
//! pipe: the real binaries, `pipe serve --workers 0 --broker` over a fresh PostgreSQL
//! database (the machine's, `PIPE_TEST_POSTGRES_URL`) and K `pipe worker --slots 4`
//! processes; one integration whose only step is a `log` (the cheapest run through the real
//! executor, history writer and fenced claim). Runs are queued in the store, as `pipe
//! trigger` queues them; the figures come from the store: enqueue instant of each queue item,
//! `started_at` of its run.
//!
//! Celery (benches/celery/celery_bench.py, in a venv the bench makes: `PIPE_BENCH_VENV`,
//! default `~/.cache/pipe-bench/venv`, from benches/celery/requirements.txt): K worker
//! processes of `--concurrency 4` (prefork), RabbitMQ broker, the PostgreSQL result backend
//! with `task_track_started` (Hopen kept its task results in PostgreSQL); a no-op task that
//! returns the instant it started.
//!
//! Each round: a burst (`PIPE_BENCH_BURST` runs, 2000, queued as fast as one producer can;
//! runs/s from the first enqueue to the last start) and a paced stream
//! (`PIPE_BENCH_PACED` runs, 300, at `PIPE_BENCH_RATE` per second, 20; enqueue → start
//! p50/p99). Then each pipe worker's cost at rest: VmRSS and CPU over 10 idle seconds.
//! `PIPE_BENCH_WORKERS` (`1,2,4`), `PIPE_BIN`, `PIPE_TEST_AMQP` override.
//!
//! What differs, and is said in BENCHMARKS.md: a pipe run is recorded (claim with fencing
//! token, run row, step rows, log row, finish) in several PostgreSQL transactions; a Celery
//! task writes its STARTED and SUCCESS rows. Both use publisher confirms and persistent
//! messages. pipe's workers prefetch their free slots; Celery's prefetch multiplier is 1.

mod support;
use support::{cpu_seconds, env_usize, machine, print_table, row, status_kib, PgDatabase, Row};

use chrono::{DateTime, Utc};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SLOTS: usize = 4;

struct Settings {
    bin: PathBuf,
    workers: Vec<usize>,
    burst: usize,
    paced: usize,
    rate: f64,
    pg_url: String,
    amqp: String,
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
        Settings {
            bin,
            workers: std::env::var("PIPE_BENCH_WORKERS")
                .unwrap_or_else(|_| "1,2,4".into())
                .split(',')
                .map(|w| w.trim().parse().expect("PIPE_BENCH_WORKERS: numbers"))
                .collect(),
            burst: env_usize("PIPE_BENCH_BURST", 2000),
            paced: env_usize("PIPE_BENCH_PACED", 300),
            rate: std::env::var("PIPE_BENCH_RATE")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(20.0),
            pg_url: std::env::var("PIPE_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            amqp: std::env::var("PIPE_TEST_AMQP")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        }
    }
}

/// A child killed on drop, its output in a file.
struct Proc(Option<Child>, PathBuf);

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .expect("spawn");
        Proc(Some(child), log)
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let until = Instant::now() + Duration::from_secs(60);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > until {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait(what: &str, logs: &[&Proc], mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(900);
    while !f() {
        if Instant::now() > until {
            let text: Vec<String> = logs
                .iter()
                .map(|p| std::fs::read_to_string(&p.1).unwrap_or_default())
                .collect();
            panic!("timed out waiting for {what}:\n{}", text.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

/// How long idle workers are watched for their cost at rest.
const IDLE_WATCH: Duration = Duration::from_secs(10);

struct Figures {
    /// Per idle worker (after the runs): memory in MB (pipe: RSS; Celery: the PSS of its
    /// process and pool) and CPU as a share of one core.
    idle: Option<(f64, f64)>,
    runs_per_s: f64,
    burst_p50: f64,
    burst_p99: f64,
    paced_p50: f64,
    paced_p99: f64,
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .with_timezone(&Utc)
}

/// Enqueue → start of the items with ids in `ids`, and (first enqueue, last start).
fn lags(pg: &mut postgres::Client, from: i64, to: i64) -> (Vec<f64>, f64) {
    let rows = pg
        .query(
            "SELECT q.enqueued_at, r.started_at FROM queue q JOIN runs r ON r.id = q.run_id
             WHERE q.id BETWEEN $1 AND $2",
            &[&from, &to],
        )
        .unwrap();
    let mut lags = Vec::new();
    let (mut first, mut last) = (None::<DateTime<Utc>>, None::<DateTime<Utc>>);
    for r in rows {
        let (e, s) = (time(r.get(0)), time(r.get(1)));
        lags.push((s - e).num_microseconds().unwrap() as f64 / 1e6);
        first = Some(first.map_or(e, |f| f.min(e)));
        last = Some(last.map_or(s, |l| l.max(s)));
    }
    lags.sort_by(f64::total_cmp);
    let span = (last.unwrap() - first.unwrap()).num_microseconds().unwrap() as f64 / 1e6;
    (lags, span)
}

fn finished(pg: &mut postgres::Client) -> i64 {
    pg.query_one(
        "SELECT COUNT(*) FROM runs WHERE status NOT IN ('running')",
        &[],
    )
    .map(|r| r.get(0))
    .unwrap_or(0)
}

fn pipe_round(s: &Settings, workers: usize, dir: &Path) -> Figures {
    let (_db, db_url) = PgDatabase::create(&s.pg_url);
    let prefix = format!("bench.{}.{}.", std::process::id(), workers);
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::write(
        dir.join("pipelines/noop.yaml"),
        "pipeline: noop\nschedule: { cron: \"0 0 1 1 *\", max_concurrent_runs: 10000, on_overlap: queue }\nsteps:\n  s: { type: log, with: { message: tick } }\n",
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(&s.bin);
        c.current_dir(dir)
            .args(args)
            .env("PIPE_HOME", dir.join("state"))
            .env("PIPE_DB", &db_url)
            .env("PIPE_BROKER", &s.amqp)
            .env("PIPE_QUEUE_PREFIX", &prefix);
        c
    };
    let mut serve = Proc::spawn(
        &mut cmd(&["serve", "pipelines", "--workers", "0"]),
        dir.join(format!("serve-{workers}.log")),
    );
    let slots = SLOTS.to_string();
    let mut pool: Vec<Proc> = (0..workers)
        .map(|k| {
            Proc::spawn(
                &mut cmd(&["worker", "pipelines", "--slots", &slots]),
                dir.join(format!("worker-{workers}-{k}.log")),
            )
        })
        .collect();
    let mut pg = loop {
        if let Ok(c) = postgres::Client::connect(&db_url, postgres::NoTls) {
            break c;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let logs: Vec<&Proc> = std::iter::once(&serve).chain(pool.iter()).collect();
    wait("the integration and the workers", &logs, || {
        pg.query_one(
            "SELECT (SELECT COUNT(*) FROM integrations WHERE name = 'noop' AND content_hash IS NOT NULL)
                  + (SELECT COUNT(*) FROM workers WHERE stopped_at IS NULL)",
            &[],
        )
        .map(|r| r.get::<_, i64>(0) == 1 + workers as i64)
        .unwrap_or(false)
    });
    let store = store::open(&store::StoreConfig {
        url: Some(db_url.clone()),
        state_dir: dir.join("state"),
    })
    .unwrap();
    let enqueue = || {
        store
            .enqueue(
                &store::Enqueue::new("noop", store::Trigger::Manual),
                Utc::now(),
            )
            .unwrap()
            .id
    };
    // Warm-up: every worker has run something.
    let warm: Vec<i64> = (0..workers * SLOTS * 2).map(|_| enqueue()).collect();
    wait("the warm-up runs", &logs, || {
        finished(&mut pg) >= warm.len() as i64
    });
    let done_before = finished(&mut pg);

    let first = enqueue();
    for _ in 1..s.burst {
        enqueue();
    }
    let last = first + s.burst as i64 - 1;
    wait("the burst", &logs, || {
        finished(&mut pg) >= done_before + s.burst as i64
    });
    let (burst_lags, span) = lags(&mut pg, first, last);

    let done_before = finished(&mut pg);
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for k in 0..s.paced {
        let due = t0 + Duration::from_secs_f64(k as f64 / s.rate);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        ids.push(enqueue());
    }
    wait("the paced runs", &logs, || {
        finished(&mut pg) >= done_before + s.paced as i64
    });
    let (paced_lags, _) = lags(&mut pg, ids[0], *ids.last().unwrap());
    // A worker at rest: connected, heartbeating, nothing to run.
    let pids: Vec<i32> = pool
        .iter()
        .filter_map(|p| p.0.as_ref().map(|c| c.id() as i32))
        .collect();
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    std::thread::sleep(IDLE_WATCH);
    let cpu: f64 = pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| cpu_seconds(p) - b)
        .sum::<f64>()
        / pids.len() as f64
        / IDLE_WATCH.as_secs_f64();
    let rss: f64 = pids
        .iter()
        .map(|&p| status_kib(p, "VmRSS:").unwrap_or(0) as f64 / 1024.0)
        .sum::<f64>()
        / pids.len() as f64;
    drop(logs);
    for w in &mut pool {
        w.stop();
    }
    serve.stop();
    Figures {
        idle: Some((rss, cpu)),
        runs_per_s: s.burst as f64 / span,
        burst_p50: percentile(&burst_lags, 0.5),
        burst_p99: percentile(&burst_lags, 0.99),
        paced_p50: percentile(&paced_lags, 0.5),
        paced_p99: percentile(&paced_lags, 0.99),
    }
}

/// The bench venv with Celery, made or refreshed when its requirements changed.
fn celery_python() -> PathBuf {
    let venv = std::env::var_os("PIPE_BENCH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()))
                .join(".cache/pipe-bench/venv")
        });
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let requirements = root.join("benches/celery/requirements.txt");
    let want = std::fs::read_to_string(&requirements).unwrap();
    let stamp = venv.join(".requirements");
    let python = venv.join("bin/python");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&want) {
        return python;
    }
    eprintln!("preparing the bench venv {} (Celery)", venv.display());
    let ok = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(&python)
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(&requirements)
            .status()
            .is_ok_and(|s| s.success());
    assert!(ok, "cannot prepare the Celery venv at {}", venv.display());
    std::fs::write(&stamp, want).unwrap();
    python
}

fn celery_round(s: &Settings, python: &Path, workers: usize) -> Figures {
    let (_db, db_url) = PgDatabase::create(&s.pg_url);
    let backend = format!("db+{}", db_url.replacen("postgres://", "postgresql://", 1));
    let out = Command::new(python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/celery/celery_bench.py"))
        .args(["--broker", &s.amqp.replace("%2f", "")])
        .args(["--backend", &backend])
        .args([
            "--queue",
            &format!("bench.celery.{}.{workers}", std::process::id()),
        ])
        .args(["--workers", &workers.to_string()])
        .args(["--slots", &SLOTS.to_string()])
        .args(["--burst", &s.burst.to_string()])
        .args(["--paced", &s.paced.to_string()])
        .args(["--rate", &s.rate.to_string()])
        .output()
        .expect("run the Celery bench");
    assert!(
        out.status.success(),
        "the Celery bench failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("Celery bench output {text:?}: {e}"));
    let f = |path: &str| v.pointer(path).and_then(|x| x.as_f64()).unwrap();
    Figures {
        idle: Some((f("/idle/pss_mb"), f("/idle/cpu_core_share"))),
        runs_per_s: f("/burst/runs_per_s"),
        burst_p50: f("/burst/lag_p50"),
        burst_p99: f("/burst/lag_p99"),
        paced_p50: f("/paced/lag_p50"),
        paced_p99: f("/paced/lag_p99"),
    }
}

fn main() {
    let s = Settings::from_env();
    println!("{}", machine());
    println!(
        "cluster: pipe serve --workers 0 --broker + K pipe worker --slots {SLOTS} on PostgreSQL and RabbitMQ, vs Celery 5 (K workers, prefork --concurrency {SLOTS}, PostgreSQL results); burst of {} no-op runs, then {} at {}/s",
        s.burst, s.paced, s.rate
    );
    let python = celery_python();
    let tmp = tempfile::tempdir().unwrap();
    let mut rows: Vec<Row> = Vec::new();
    for &k in &s.workers {
        let pipe = pipe_round(&s, k, &tmp.path().join(format!("pipe-{k}")));
        let celery = celery_round(&s, &python, k);
        let ms = |x: f64| format!("{:.0} ms", x * 1000.0);
        row(
            &mut rows,
            format!("{k} worker(s): burst runs/s"),
            format!("{:.0}", pipe.runs_per_s),
            format!("Celery {:.0}", celery.runs_per_s),
            format!("{:.2}×", pipe.runs_per_s / celery.runs_per_s),
        );
        row(
            &mut rows,
            format!("{k} worker(s): burst enqueue→start p50 / p99"),
            format!("{} / {}", ms(pipe.burst_p50), ms(pipe.burst_p99)),
            format!("Celery {} / {}", ms(celery.burst_p50), ms(celery.burst_p99)),
            String::new(),
        );
        row(
            &mut rows,
            format!("{k} worker(s): {}/s enqueue→start p50 / p99", s.rate),
            format!("{} / {}", ms(pipe.paced_p50), ms(pipe.paced_p99)),
            format!("Celery {} / {}", ms(celery.paced_p50), ms(celery.paced_p99)),
            format!("{:.2}× (p50)", pipe.paced_p50 / celery.paced_p50),
        );
        if let (Some((rss, cpu)), Some((pss, ccpu))) = (pipe.idle, celery.idle) {
            row(
                &mut rows,
                format!("{k} worker(s): one worker at rest (after the runs), memory / CPU"),
                format!("{rss:.0} MB RSS / {:.2}% of a core", cpu * 100.0),
                format!("Celery {pss:.0} MB PSS (its pool) / {:.2}%", ccpu * 100.0),
                format!("{:.2}× (memory)", rss / pss),
            );
        }
    }
    print_table(&rows);
}
