//! Extraction benchmark (`cargo bench --bench extract`, or `just bench`).
//!
//! What a user runs: the release `pipe` binary, as a child process,
//! `pipe run <tiflux pipeline> --sandbox --format json`, with `PIPE_SANDBOX` asking the
//! fakes for 100,000 tickets and 20 ms of latency on every tickets request. The pipeline is
//! `pipelines/tiflux.yaml` (web login → OTP read from the Sheets fake → OTP login →
//! `http.extract` of `/api/v2/tickets` in pages of 200 → logout) with two edits: the
//! extraction's `concurrency` is set to N, and the OTP poll (`every: 5s`) becomes 100 ms, so
//! the login flow stays out of the measurement; the figure is the `tickets` step's
//! `duration_ms` from the JSON summary. `days` covers the fake's whole year, so all 100,000
//! tickets are in the window: 500 pages.
//!
//! Floor: pages × latency ÷ concurrency (500 × 20 ms ÷ N). Goals: ≤ 1.25 × floor at
//! concurrency 8, ≤ 1.1 × floor at concurrency 1; peak RSS of the `pipe` process
//! (`wait4`'s `ru_maxrss`) ≤ 400 MB. The same runs at 0 ms latency show the CPU cost per page
//! (fake + client), the part that does not overlap with waiting.
//!
//! No harness, no criterion: a plain `main` that prints the machine and a table.

mod support;
use support::{machine, print_table, row, wait4, Row};

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TICKETS: u64 = 100_000;
const PAGE_SIZE: u64 = 200;
const PAGES: u64 = TICKETS / PAGE_SIZE;
const LATENCY_MS: u64 = 20;
/// Covers the 365 days before the fake's anchor (the logical date under `--sandbox`).
const DAYS: u32 = 400;
const REPEATS: usize = 3;
const RSS_GOAL_MB: f64 = 400.0;
/// (concurrency, goal as a multiple of the floor)
const CASES: [(u64, f64); 2] = [(8, 1.25), (1, 1.1)];

// ---------------------------------------------------------------------------------------
// The table (as in benches/engine.rs).

fn median<T: Copy + Ord>(xs: &[T]) -> T {
    let mut v = xs.to_vec();
    v.sort();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------
// One run of the real binary.

/// The login flow, the extraction and the logout of `pipelines/tiflux.yaml` (later steps
/// and their connections left out: only `tickets` is measured), with the extraction's
/// concurrency set and a short OTP poll.
fn pipeline(concurrency: u64) -> String {
    const STEPS: [&str; 5] = ["login", "otp", "session", "tickets", "logout"];
    const CONNECTIONS: [&str; 2] = ["tiflux", "google"];
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/tiflux.yaml");
    let text = std::fs::read_to_string(&path).expect("read pipelines/tiflux.yaml");
    let mut out = String::new();
    let mut section = String::new();
    let mut block = String::new();
    let mut keep = true;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && line.contains(':') {
            section = line.split(':').next().unwrap_or_default().to_string();
            keep = true;
        } else if let Some(name) = line
            .strip_prefix("  ")
            .filter(|l| !l.starts_with(' ') && l.trim_end().ends_with(':'))
            .map(|l| l.trim_end().trim_end_matches(':'))
        {
            block = name.to_string();
            keep = match section.as_str() {
                "steps" => STEPS.contains(&name),
                "connections" => CONNECTIONS.contains(&name),
                _ => true,
            };
        }
        if !keep {
            continue;
        }
        if section == "steps" && block == "logout" && line.trim_start().starts_with("needs:") {
            out.push_str("    needs: [tickets]\n");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let edit = |text: &str, from: &str, to: &str| {
        assert_eq!(
            text.matches(from).count(),
            1,
            "pipelines/tiflux.yaml should contain `{from}` once"
        );
        text.replace(from, to)
    };
    let text = edit(
        &out,
        "concurrency: 8",
        &format!("concurrency: {concurrency}"),
    );
    let text = edit(&text, "every: 5s", "every: 100ms");
    edit(&text, "size: 200", &format!("size: {PAGE_SIZE}"))
}

struct Run {
    /// The `tickets` step's duration_ms.
    tickets: Duration,
    /// The whole process, start to exit.
    wall: Duration,
    rows: u64,
    requests: u64,
    max_in_flight: u64,
    /// Peak RSS of the `pipe` process, KiB.
    rss_kib: i64,
}

// The child is reaped by `wait4` (below), which also reports its peak RSS.
#[allow(clippy::zombie_processes)]
fn run_once(dir: &Path, file: &Path, concurrency: u64, latency_ms: u64) -> Run {
    let options = serde_json::json!({
        "tickets": TICKETS, "latency_ms": latency_ms, "otp_delay_ms": 0,
    });
    let state = dir.join(format!("state-{concurrency}-{latency_ms}"));
    let clock = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipe"))
        .arg("--state-dir")
        .arg(&state)
        .arg("run")
        .arg(file)
        .args(["--sandbox", "--format", "json", "--quiet"])
        .args(["--param", &format!("days={DAYS}")])
        .env("PIPE_SANDBOX", options.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pipe");
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    let (code, rss_kib) = wait4(child.id());
    let wall = clock.elapsed();
    let errors = errors.join().unwrap_or_default();
    assert_eq!(code, 0, "pipe run failed:\n{out}\n{errors}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("the JSON summary");
    assert_eq!(v["status"], "succeeded", "{out}");
    let step = v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == "tickets")
        .expect("a tickets step");
    let rows = step["rows"].as_u64().expect("tickets rows");
    assert_eq!(rows, TICKETS, "every ticket extracted");
    let requests = v["sandbox"]["requests"]["tickets"].as_u64().unwrap_or(0);
    assert_eq!(requests, PAGES, "one request per page, none retried: {out}");
    let max_in_flight = v["sandbox"]["max_in_flight"]["tickets"]
        .as_u64()
        .unwrap_or(0);
    Run {
        tickets: Duration::from_millis(step["duration_ms"].as_u64().expect("duration_ms")),
        wall,
        rows,
        requests,
        max_in_flight,
        rss_kib,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench_case(dir: &Path, concurrency: u64, goal: f64, rows: &mut Vec<Row>) -> f64 {
    let file = dir.join(format!("tiflux-c{concurrency}.yaml"));
    std::fs::write(&file, pipeline(concurrency)).expect("write the pipeline");

    let runs: Vec<Run> = (0..REPEATS)
        .map(|_| run_once(dir, &file, concurrency, LATENCY_MS))
        .collect();
    // The same at 0 ms latency: what a page costs in CPU (fake + client).
    let cpu: Vec<Run> = (0..REPEATS)
        .map(|_| run_once(dir, &file, concurrency, 0))
        .collect();
    let times: Vec<Duration> = runs.iter().map(|r| r.tickets).collect();
    let best = *times.iter().min().expect("runs");
    let med = median(&times);
    let floor = Duration::from_millis(PAGES * LATENCY_MS / concurrency);
    let ratio = best.as_secs_f64() / floor.as_secs_f64();
    let br = runs.iter().find(|r| r.tickets == best).expect("best run");
    for (k, r) in runs.iter().chain(&cpu).enumerate() {
        println!(
            "concurrency {concurrency}, latency {:2} ms, run {}: tickets step {:.0} ms, \
             process {:.0} ms, {} rows, {} requests, max in flight {}, peak RSS {:.0} MB",
            if k < REPEATS { LATENCY_MS } else { 0 },
            k % REPEATS + 1,
            ms(r.tickets),
            ms(r.wall),
            r.rows,
            r.requests,
            r.max_in_flight,
            r.rss_kib as f64 / 1024.0,
        );
    }
    let c = concurrency;
    row(
        rows,
        format!("extract, concurrency {c}: best"),
        format!(
            "{:.2} s ({:.0} rows/s, {:.1} ms/page)",
            best.as_secs_f64(),
            TICKETS as f64 / best.as_secs_f64(),
            ms(best) / PAGES as f64
        ),
        format!("≤ {goal}× floor"),
        format!(
            "{ratio:.3}× floor {}",
            if ratio <= goal { "(met)" } else { "(MISSED)" }
        ),
    );
    row(
        rows,
        format!("extract, concurrency {c}: median"),
        format!(
            "{:.2} s ({:.0} rows/s)",
            med.as_secs_f64(),
            TICKETS as f64 / med.as_secs_f64()
        ),
        format!("≤ {goal}× floor"),
        format!("{:.3}× floor", med.as_secs_f64() / floor.as_secs_f64()),
    );
    row(
        rows,
        format!("  floor: {PAGES} pages × {LATENCY_MS} ms ÷ {c}"),
        format!("{:.2} s", floor.as_secs_f64()),
        "floor",
        "-",
    );
    let in_flight: Vec<u64> = runs.iter().map(|r| r.max_in_flight).collect();
    row(
        rows,
        "  fake's max in flight (tickets)",
        format!("{}", in_flight.iter().max().copied().unwrap_or(0)),
        format!("= {c}"),
        if in_flight.iter().all(|&n| n == c) {
            "equal".to_string()
        } else {
            format!("DIFFERS ({in_flight:?})")
        },
    );
    let cpu_best = cpu.iter().map(|r| r.tickets).min().expect("runs");
    row(
        rows,
        "  same at 0 ms latency (CPU), best",
        format!(
            "{:.2} s ({:.2} ms/page)",
            cpu_best.as_secs_f64(),
            ms(cpu_best) / PAGES as f64
        ),
        "-",
        format!("{:.2}× floor", cpu_best.as_secs_f64() / floor.as_secs_f64()),
    );
    row(
        rows,
        "  process wall time (best run)",
        format!(
            "{:.2} s (login flow + start + exit: {:.2} s)",
            br.wall.as_secs_f64(),
            (br.wall.saturating_sub(br.tickets)).as_secs_f64()
        ),
        "-",
        "-",
    );
    runs.iter()
        .chain(&cpu)
        .map(|r| r.rss_kib as f64 / 1024.0)
        .fold(0.0, f64::max)
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter: `c1`, `c8`.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!("{}", machine());
    println!(
        "pipe: {}; {TICKETS} tickets, {PAGES} pages of {PAGE_SIZE}, {LATENCY_MS} ms latency, \
         {REPEATS} runs each",
        env!("CARGO_BIN_EXE_pipe")
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rows = Vec::new();
    let mut rss: f64 = 0.0;
    for (c, goal) in CASES {
        let name = format!("c{c}");
        if filters.is_empty() || filters.contains(&name) {
            rss = rss.max(bench_case(dir.path(), c, goal, &mut rows));
        }
    }
    row(
        &mut rows,
        "peak RSS of pipe (all runs)",
        format!("{rss:.0} MB"),
        format!("≤ {RSS_GOAL_MB:.0} MB"),
        format!(
            "{:.2}× goal {}",
            rss / RSS_GOAL_MB,
            if rss <= RSS_GOAL_MB {
                "(met)"
            } else {
                "(MISSED)"
            }
        ),
    );
    println!();
    print_table(&rows);
}
