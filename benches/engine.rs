//! Engine benchmarks (`cargo bench --bench engine`, or `just bench`).
//!
//! Two figures the project commits to, each printed next to its goal and a physical floor:
//!
//! 1. `pipe validate` throughput: 1,000 generated pipelines (10–30 steps each) validated
//!    in-process, file read included. Goal: ≥ 5,000 files/s. Floor: reading the files and
//!    parsing the YAML only.
//! 2. `pipe run` overhead: a 10,000-step DAG of no-op steps executed exactly as `pipe run`
//!    does (history on). Goal: ≤ 1 s in all (≤ 100 µs per step). Floor: spawning and joining
//!    10,000 empty tokio tasks, and inserting 10,000 rows into SQLite in one transaction.
//!
//! No harness, no criterion: a plain `main` that times with `Instant` and prints a table.

mod support;
use support::{machine, print_table, row, Row};

use async_trait::async_trait;
use chrono::Utc;
use engine::diag::{Diags, Severity};
use engine::executor::{self, RunRequest};
use engine::secrets::Redactor;
use engine::status::Status;
use engine::step::{StepConfig, StepContext, StepError, StepKind, StepOutput};
use engine::template::{Runtime, Templates};
use schemars::JsonSchema;
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{HistoryWriter, NewRun, Owner, StoreConfig, Trigger, DB_FILE};
use tokio_util::sync::CancellationToken;

const FILES: usize = 1_000;
const VALIDATE_REPEATS: usize = 5;
const VALIDATE_GOAL_FILES_PER_S: f64 = 5_000.0;

const DAG_STEPS: usize = 10_000;
const DAG_LAYER: usize = 100;
const RUN_REPEATS: usize = 3;
const RUN_GOAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// A bench-only step type.

/// Does nothing: measures the engine's own cost per step.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Noop {
    /// Ignored.
    #[serde(default)]
    note: Option<String>,
}

#[async_trait]
impl StepConfig for Noop {
    const TYPE: &'static str = "noop";
    const SUMMARY: &'static str = "Do nothing (benchmarks only)";

    async fn run(self, _ctx: StepContext) -> Result<StepOutput, StepError> {
        let _ = self.note;
        Ok(StepOutput::default())
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers: a deterministic PRNG, statistics, the table.

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// In `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() - 1)]
    }
}

fn best(times: &[Duration]) -> Duration {
    *times.iter().min().expect("at least one sample")
}

fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t[t.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// Benchmark 1: validation.

const WORDS: &[&str] = &[
    "extract", "load", "clean", "merge", "report", "notify", "export", "check", "sync", "fetch",
];

/// One realistic pipeline: params, a connection-free mix of `exec` and `log` steps with
/// `needs`, `if:`, retry/timeout envelopes, derived outputs and templates that read params
/// and the declared outputs of earlier `log` steps.
fn gen_pipeline(n: usize, rng: &mut Rng) -> (String, usize) {
    let steps = rng.range(10, 30);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# yaml-language-server: $schema=../schemas/pipeline.schema.json\n\
         pipeline: generated-{n:04}\n\
         description: Generated pipeline {n} for the validation benchmark.\n\
         schedule: {{ cron: \"{} {} * * *\", timezone: America/Sao_Paulo }}\n\
         params:\n  \
           days: {{ type: integer, default: {}, description: How many days back to load. }}\n  \
           region: {{ type: enum, values: [north, south, east, west], default: north }}\n  \
           period: {{ type: month, default: MA, description: The month to report on. }}\n  \
           label: {{ type: string, default: nightly }}\n\
         concurrency: {}\n\
         steps:",
        rng.range(0, 59),
        rng.range(0, 23),
        rng.range(1, 30),
        rng.range(2, 8),
    );
    // (id, outputs declared by `log`'s `with.outputs`)
    let mut done: Vec<(String, Vec<&str>)> = Vec::new();
    for i in 0..steps {
        let id = format!("{}_{i:02}", rng.pick(WORDS));
        let is_log = i == 0 || rng.range(0, 2) == 0;
        let _ = writeln!(s, "  {id}:");
        let _ = writeln!(s, "    type: {}", if is_log { "log" } else { "exec" });
        let _ = writeln!(s, "    description: Step {i} of pipeline {n}.");
        let mut needs: Vec<&str> = Vec::new();
        if !done.is_empty() {
            for _ in 0..rng.range(1, 2.min(done.len())) {
                let d = rng.pick(&done).0.as_str();
                if !needs.contains(&d) {
                    needs.push(d);
                }
            }
            let _ = writeln!(s, "    needs: [{}]", needs.join(", "));
        }
        // A reference to a declared output of an earlier log step, when there is one.
        let logs: Vec<&(String, Vec<&str>)> =
            done.iter().filter(|(_, outs)| !outs.is_empty()).collect();
        let reference = if logs.is_empty() {
            "{{ params.label }}".to_string()
        } else {
            let (sid, outs) = *rng.pick(&logs);
            format!("{{{{ steps.{sid}.{} }}}}", rng.pick(outs))
        };
        if rng.range(0, 3) == 0 {
            let _ = writeln!(s, "    if: \"{{{{ params.days > {} }}}}\"", rng.range(0, 5));
        }
        if is_log {
            let _ = writeln!(s, "    with:");
            let _ = writeln!(
                s,
                "      message: \"{id}: {{{{ params.days }}}} days of {{{{ params.region }}}} for {{{{ params.period }}}} ({{{{ params.period.first_day }}}} to {{{{ params.period.last_day }}}}); prev {reference}\""
            );
            if rng.range(0, 1) == 0 {
                let _ = writeln!(s, "      level: info");
            }
            let _ = writeln!(s, "      outputs:");
            let _ = writeln!(s, "        total: \"{{{{ params.days * {} }}}}\"", i + 1);
            let _ = writeln!(
                s,
                "        tag: \"{{{{ params.region }}}}-{{{{ run.id }}}}\""
            );
            done.push((id, vec!["total", "tag", "status"]));
        } else {
            if rng.range(0, 1) == 0 {
                let _ = writeln!(
                    s,
                    "    retry: {{ attempts: {}, backoff: {}s, max_backoff: 1m }}",
                    rng.range(2, 5),
                    rng.range(1, 10)
                );
            }
            if rng.range(0, 1) == 0 {
                let _ = writeln!(s, "    timeout: {}m", rng.range(1, 30));
            }
            let _ = writeln!(s, "    with:");
            let _ = writeln!(s, "      command: sh");
            let _ = writeln!(
                s,
                "      args: [\"-c\", 'echo \"$1 $2\"; echo \"::set-output name=done::$1\"', \"sh\", \"{{{{ params.days }}}}\", \"{reference}\"]"
            );
            let _ = writeln!(
                s,
                "      env: {{ REGION: \"{{{{ params.region }}}}\", PERIOD: \"{{{{ params.period }}}}\" }}"
            );
            let _ = writeln!(s, "      on_nonzero: fail");
            let _ = writeln!(s, "    outputs:");
            let _ = writeln!(s, "      last: \"{{{{ result.stdout_last_line }}}}\"");
            done.push((id, Vec::new()));
        }
    }
    (s, steps)
}

fn bench_validate(dir: &Path, rows: &mut Vec<Row>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut files: Vec<(PathBuf, String)> = Vec::with_capacity(FILES);
    let mut total_steps = 0;
    let mut total_bytes = 0;
    for n in 0..FILES {
        let (text, steps) = gen_pipeline(n, &mut rng);
        total_steps += steps;
        total_bytes += text.len();
        let path = dir.join(format!("pipeline-{n:04}.yaml"));
        std::fs::write(&path, text).expect("write a generated pipeline");
        files.push((path.clone(), path.display().to_string()));
    }
    let registry = steps::registry();

    // Correctness first: every file is valid, with no errors.
    let mut warnings = 0;
    for (path, display) in &files {
        let outcome = engine::validate::validate_file(path, display, &registry);
        let errors: Vec<String> = outcome
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.to_string())
            .collect();
        assert!(errors.is_empty(), "{display}: {}", errors.join("\n"));
        assert!(outcome.plan.is_some(), "{display}: no plan");
        warnings += outcome.diagnostics.len();
    }

    let mut validate_times = Vec::new();
    let mut single_times = Vec::new();
    let mut floor_times = Vec::new();
    for _ in 0..VALIDATE_REPEATS {
        // Floor: read + YAML parse only.
        let t = Instant::now();
        for (path, display) in &files {
            let text = std::fs::read_to_string(path).expect("read");
            let mut d = Diags::new(display);
            let root = engine::yaml::parse(&text, &mut d);
            assert!(root.is_some());
            std::hint::black_box(root);
        }
        floor_times.push(t.elapsed());

        // One thread.
        let t = Instant::now();
        for (path, display) in &files {
            let outcome = engine::validate::validate_file(path, display, &registry);
            std::hint::black_box(&outcome);
            debug_assert!(outcome.plan.is_some());
        }
        single_times.push(t.elapsed());

        // What `pipe validate` does: all files on all cores.
        let t = Instant::now();
        let outcomes = engine::validate::validate_files(&files, &registry);
        validate_times.push(t.elapsed());
        assert!(outcomes.iter().all(|o| o.plan.is_some()));
    }

    let n = FILES as f64;
    let (b, m) = (best(&validate_times), median(&validate_times));
    let fb = best(&floor_times);
    let rate = n / secs(b);
    println!(
        "validate: {FILES} files, {total_steps} steps, {:.1} MiB, {warnings} warnings, 0 errors; \
         {VALIDATE_REPEATS} repeats",
        total_bytes as f64 / (1024.0 * 1024.0)
    );
    row(
        rows,
        "validate 1,000 files (all cores): best",
        format!("{rate:.0} files/s ({:.1} µs/file)", secs(b) * 1e6 / n),
        format!("≥ {VALIDATE_GOAL_FILES_PER_S:.0} files/s"),
        format!(
            "{:.2}× goal {}",
            rate / VALIDATE_GOAL_FILES_PER_S,
            if rate >= VALIDATE_GOAL_FILES_PER_S {
                "(met)"
            } else {
                "(MISSED)"
            }
        ),
    );
    row(
        rows,
        "validate 1,000 files (all cores): median",
        format!(
            "{:.0} files/s ({:.1} µs/file)",
            n / secs(m),
            secs(m) * 1e6 / n
        ),
        format!("≥ {VALIDATE_GOAL_FILES_PER_S:.0} files/s"),
        format!("{:.2}× goal", n / secs(m) / VALIDATE_GOAL_FILES_PER_S),
    );
    row(
        rows,
        "validate 1,000 files: steps/s",
        format!("{:.0} steps/s", total_steps as f64 / secs(b)),
        "-",
        "-",
    );
    let sb = best(&single_times);
    row(
        rows,
        "validate 1,000 files (1 thread): best",
        format!(
            "{:.0} files/s ({:.1} µs/file)",
            n / secs(sb),
            secs(sb) * 1e6 / n
        ),
        format!("≥ {VALIDATE_GOAL_FILES_PER_S:.0} files/s"),
        format!("{:.2}× goal", n / secs(sb) / VALIDATE_GOAL_FILES_PER_S),
    );
    row(
        rows,
        "floor: read + YAML parse, 1 thread (best)",
        format!(
            "{:.0} files/s ({:.1} µs/file)",
            n / secs(fb),
            secs(fb) * 1e6 / n
        ),
        "floor",
        format!("1-thread validate = {:.2}× floor time", secs(sb) / secs(fb)),
    );
}

// ---------------------------------------------------------------------------------------
// Benchmark 2: a 10,000-step no-op DAG, run as `pipe run` runs it.

/// Layers of [`DAG_LAYER`] steps; each step after the first layer needs 1–3 steps of the
/// layer before.
fn gen_dag(rng: &mut Rng) -> String {
    let mut s = String::from(
        "pipeline: noop-dag\ndescription: 10,000 no-op steps in layers of 100.\nsteps:\n",
    );
    let layers = DAG_STEPS / DAG_LAYER;
    for l in 0..layers {
        for k in 0..DAG_LAYER {
            let _ = writeln!(s, "  l{l:03}_s{k:03}:\n    type: noop");
            if l > 0 {
                let mut needs: Vec<usize> = Vec::new();
                for _ in 0..rng.range(1, 3) {
                    let d = rng.range(0, DAG_LAYER - 1);
                    if !needs.contains(&d) {
                        needs.push(d);
                    }
                }
                let names: Vec<String> = needs
                    .iter()
                    .map(|d| format!("l{:03}_s{d:03}", l - 1))
                    .collect();
                let _ = writeln!(s, "    needs: [{}]", names.join(", "));
            }
            if k % 10 == 0 {
                let _ = writeln!(s, "    with: {{ note: layer {l} }}");
            }
        }
    }
    s
}

struct RunTimes {
    setup: Duration,
    execute: Duration,
    finish: Duration,
    total: Duration,
}

fn run_dag(
    path: &Path,
    state_dir: &Path,
    registry: &engine::step::Registry,
    rt: &tokio::runtime::Runtime,
) -> RunTimes {
    let display = path.display().to_string();
    let plan = engine::validate::validate_file(path, &display, registry)
        .plan
        .expect("the DAG is valid");
    let plan = Arc::new(plan);
    let tz = plan.timezone();
    let logical_date = Utc::now();
    let concurrency = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);

    let clock = Instant::now();
    let store = store::open(&StoreConfig::sqlite(state_dir)).expect("open the history");
    let _ = store.mark_abandoned();
    store
        .upsert_integration(&plan.name, plan.description.as_deref())
        .expect("upsert integration");
    let run_id = store
        .create_run(&NewRun {
            logical_date: Some(logical_date),
            ..NewRun::new(plan.name.clone(), Trigger::Cli, Owner::Pipe)
        })
        .expect("create the run");
    let run_dir = store.run_dir(run_id);
    let writer = Arc::new(HistoryWriter::start(store.clone(), run_id).expect("history writer"));
    let observer: Arc<dyn engine::events::Observer> = writer.clone();
    let redactor = Redactor::new();
    let templates = Arc::new(Templates::new(Runtime {
        redactor: redactor.clone(),
        tz,
        logical_date,
        dry_run: false,
        overrides: Default::default(),
    }));
    let params = minijinja::Value::from(std::collections::BTreeMap::<String, String>::new());
    let setup = clock.elapsed();

    let t = Instant::now();
    let result = rt.block_on(executor::execute(RunRequest {
        plan: plan.clone(),
        params,
        run: engine::template::run_value(run_id, Utc::now(), logical_date, tz),
        run_id,
        concurrency,
        run_dir,
        templates,
        redactor,
        observer,
        cancel: CancellationToken::new(),
        hard_cancel: CancellationToken::new(),
        reuse: Default::default(),
        history: None,
        started_at: Utc::now(),
        resources: Arc::default(),
    }));
    let execute = t.elapsed();

    let t = Instant::now();
    match Arc::try_unwrap(writer) {
        Ok(w) => w.finish().expect("history written"),
        Err(shared) => shared.close().expect("history written"),
    }
    let finish = t.elapsed();
    let total = clock.elapsed();

    assert_eq!(result.status, Status::Succeeded, "{:?}", result.error);
    assert_eq!(result.steps.len(), DAG_STEPS);
    let db = rusqlite::Connection::open(state_dir.join(DB_FILE)).expect("open the db");
    let (rows, ok): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), SUM(status = 'succeeded') FROM step_runs WHERE run_id = ?1",
            [run_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count step_runs");
    assert_eq!(rows, DAG_STEPS as i64, "step_runs rows");
    assert_eq!(ok, DAG_STEPS as i64, "succeeded step_runs rows");
    RunTimes {
        setup,
        execute,
        finish,
        total,
    }
}

fn floor_tasks(rt: &tokio::runtime::Runtime) -> Duration {
    let t = Instant::now();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..DAG_STEPS {
            set.spawn(async move { i });
        }
        let mut sum = 0usize;
        while let Some(r) = set.join_next().await {
            sum += r.expect("task");
        }
        std::hint::black_box(sum);
    });
    t.elapsed()
}

/// 10,000 rows shaped like `step_runs`, one transaction, WAL + synchronous=NORMAL as the
/// history database uses.
fn floor_sqlite(dir: &Path) -> Duration {
    let path = dir.join("floor.sqlite");
    let _ = std::fs::remove_file(&path);
    let mut conn = rusqlite::Connection::open(&path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("sync");
    conn.execute_batch(
        "CREATE TABLE step_runs (run_id INTEGER NOT NULL, step TEXT NOT NULL,
            status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, started_at TEXT,
            finished_at TEXT, duration_ms INTEGER, \"rows\" INTEGER, error TEXT, outputs TEXT,
            PRIMARY KEY (run_id, step))",
    )
    .expect("schema");
    let now = Utc::now()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        .to_string();
    let t = Instant::now();
    let tx = conn.transaction().expect("begin");
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO step_runs(run_id, step, status, attempts, started_at, finished_at,
                 duration_ms, outputs) VALUES (1, ?1, 'succeeded', 1, ?2, ?2, 0, '{}')",
            )
            .expect("prepare");
        for i in 0..DAG_STEPS {
            stmt.execute(rusqlite::params![
                format!("l{:03}_s{:03}", i / 100, i % 100),
                now
            ])
            .expect("insert");
        }
    }
    tx.commit().expect("commit");
    t.elapsed()
}

fn bench_run(dir: &Path, rows: &mut Vec<Row>) {
    let mut registry = steps::registry();
    registry.register(StepKind::of::<Noop>());
    let path = dir.join("noop-dag.yaml");
    std::fs::write(&path, gen_dag(&mut Rng(0xD1B5_4A32_D192_ED03))).expect("write the DAG");
    let display = path.display().to_string();

    let mut validate_times = Vec::new();
    for _ in 0..RUN_REPEATS {
        let t = Instant::now();
        let outcome = engine::validate::validate_file(&path, &display, &registry);
        validate_times.push(t.elapsed());
        assert!(
            outcome.diagnostics.is_empty(),
            "{:?}",
            outcome.diagnostics.first().map(|d| d.to_string())
        );
        assert_eq!(outcome.plan.expect("valid").steps.len(), DAG_STEPS);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut runs = Vec::new();
    for k in 0..RUN_REPEATS {
        let state = dir.join(format!("state-{k}"));
        runs.push(run_dag(&path, &state, &registry, &rt));
    }
    let mut task_floor = Vec::new();
    let mut sql_floor = Vec::new();
    for _ in 0..RUN_REPEATS {
        task_floor.push(floor_tasks(&rt));
        sql_floor.push(floor_sqlite(dir));
    }

    let totals: Vec<Duration> = runs.iter().map(|r| r.total).collect();
    let b = best(&totals);
    let m = median(&totals);
    let br = runs.iter().find(|r| r.total == b).expect("best run");
    let n = DAG_STEPS as f64;
    let floor = best(&task_floor) + best(&sql_floor);
    println!(
        "run: {DAG_STEPS} no-op steps in {} layers, concurrency {}, {RUN_REPEATS} repeats; \
         best run: setup {:.1} ms, executor {:.1} ms, history finish {:.1} ms",
        DAG_STEPS / DAG_LAYER,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        secs(br.setup) * 1e3,
        secs(br.execute) * 1e3,
        secs(br.finish) * 1e3,
    );
    let vb = best(&validate_times);
    row(
        rows,
        "validate 10,000-step DAG (best)",
        format!(
            "{:.1} ms ({:.1} µs/step)",
            secs(vb) * 1e3,
            secs(vb) * 1e6 / n
        ),
        "-",
        "-",
    );
    let goal_met = b <= RUN_GOAL;
    row(
        rows,
        "run 10,000-step DAG: best",
        format!(
            "{:.3} s ({:.1} µs/step, {:.0} steps/s)",
            secs(b),
            secs(b) * 1e6 / n,
            n / secs(b)
        ),
        "≤ 1 s (≤ 100 µs/step)",
        format!(
            "{:.2}× goal {}",
            secs(b) / secs(RUN_GOAL),
            if goal_met { "(met)" } else { "(MISSED)" }
        ),
    );
    row(
        rows,
        "run 10,000-step DAG: median",
        format!("{:.3} s ({:.1} µs/step)", secs(m), secs(m) * 1e6 / n),
        "≤ 1 s",
        format!("{:.2}× goal", secs(m) / secs(RUN_GOAL)),
    );
    let e2e = vb + b;
    row(
        rows,
        "validate + run (pipe run end to end)",
        format!("{:.3} s ({:.1} µs/step)", secs(e2e), secs(e2e) * 1e6 / n),
        "≤ 1 s",
        format!(
            "{:.2}× goal {}",
            secs(e2e) / secs(RUN_GOAL),
            if e2e <= RUN_GOAL { "(met)" } else { "(MISSED)" }
        ),
    );
    row(
        rows,
        "  run share: setup / executor / finish",
        format!(
            "{:.0}% / {:.0}% / {:.0}%",
            100.0 * secs(br.setup) / secs(br.total),
            100.0 * secs(br.execute) / secs(br.total),
            100.0 * secs(br.finish) / secs(br.total)
        ),
        "-",
        "-",
    );
    row(
        rows,
        "floor: 10,000 empty tokio tasks",
        format!("{:.1} ms", secs(best(&task_floor)) * 1e3),
        "floor",
        "-",
    );
    row(
        rows,
        "floor: 10,000 SQLite rows, 1 txn",
        format!("{:.1} ms", secs(best(&sql_floor)) * 1e3),
        "floor",
        "-",
    );
    row(
        rows,
        "floor: tasks + rows",
        format!("{:.1} ms", secs(floor) * 1e3),
        "floor",
        format!("run = {:.1}× floor", secs(b) / secs(floor)),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter (`validate`, `run`).
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    println!("{}", machine());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rows = Vec::new();
    if wanted("validate") {
        let vdir = dir.path().join("validate");
        std::fs::create_dir_all(&vdir).expect("mkdir");
        bench_validate(&vdir, &mut rows);
    }
    if wanted("run") {
        let rdir = dir.path().join("run");
        std::fs::create_dir_all(&rdir).expect("mkdir");
        bench_run(&rdir, &mut rows);
    }
    println!();
    print_table(&rows);
}
