//! `pipe run`: the terminal around one run of the `runner` crate — its progress on
//! stderr, the summary on stdout, Ctrl-C/SIGTERM, exit codes. Validating, params, the
//! sandbox, recording and executing are [`runner::Runner`]'s, shared with the service.
//!
//! Exit codes: 0 succeeded (with or without warnings), 1 failed or cancelled, 2 nothing ran
//! (invalid pipeline, bad param, usage). Progress goes to stderr, the summary to stdout.

use super::Format;
use chrono::{DateTime, NaiveDate, Utc};
use engine::events::{Level, Observer, RunEvent, StepRecord};
use engine::plan::Plan;
use engine::status::Status;
use indexmap::IndexMap;
use runner::{ParamValue, PlanSource, PrepareError, RunSpec, Runner};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// After the summary, how long blocking work left by cancelled steps may take to stop.
const BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(clap::Args)]
pub struct RunArgs {
    /// The pipeline file.
    pub path: PathBuf,
    /// A param value, `name=value` (repeatable); typed by the param's declaration.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// The run's logical date (`2026-01-31` or RFC 3339); "today" in templates. Default: now.
    #[arg(long)]
    pub logical_date: Option<String>,
    /// Steps at once (default: the pipeline's `concurrency`, else the number of CPUs).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Print the plan in execution order with rendered, redacted configs; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub terminal: Terminal,
    /// Run offline against pipe's local fakes of the external services (see `pipe sandbox
    /// serve`): connections are pointed at them and `secret()`/`env()` take the values of
    /// the pipeline's `sandbox:` block. `PIPE_SANDBOX` (JSON) tunes the fakes.
    #[arg(long)]
    pub sandbox: bool,
}

fn usage(msg: impl std::fmt::Display) -> i32 {
    eprintln!("error: {msg}");
    2
}

pub fn main(args: RunArgs, state_dir: &Path, db: Option<&str>) -> i32 {
    let display = args.path.display().to_string();
    let mut config = runner::RunnerConfig::new(state_dir);
    config.db = db.map(str::to_string);
    config.registry = Arc::new(super::registry());
    let worker = Runner::new(config);
    let loaded = match worker.load(&args.path, &display) {
        Ok(l) => l,
        Err(e) => {
            if let PrepareError::Invalid { diagnostics, .. } = &e {
                for d in diagnostics {
                    eprintln!("{d}");
                }
            }
            return usage(e);
        }
    };
    if !args.terminal.quiet {
        for d in &loaded.diagnostics {
            eprintln!("{d}");
        }
    }
    let logical_date = match args
        .logical_date
        .as_deref()
        .map(parse_logical_date)
        .transpose()
    {
        Ok(d) => d,
        Err(e) => return usage(e),
    };
    let mut params = Vec::new();
    for item in &args.params {
        let Some((name, text)) = item.split_once('=') else {
            return usage(format!("--param expects NAME=VALUE, got `{item}`"));
        };
        params.push((name.to_string(), ParamValue::Text(text.to_string())));
    }
    let mut spec = RunSpec::new(PlanSource::Loaded(loaded));
    spec.params = params;
    spec.logical_date = logical_date;
    spec.concurrency = args.concurrency;
    spec.sandbox = args.sandbox;
    spec.dry_run = args.dry_run;
    execute(&worker, spec, args.terminal, state_dir)
}

/// How a run shows itself on the terminal (the options of `pipe run` and `pipe runs repair`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Terminal {
    /// Summary format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Only the summary: no progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Also show every info log row on stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Prepare and run `spec` with progress, signals and the summary; the exit code. Shared by
/// `pipe run` and `pipe runs repair`.
pub fn execute(worker: &Runner, spec: RunSpec, terminal: Terminal, state_dir: &Path) -> i32 {
    let Terminal {
        format,
        quiet,
        verbose,
    } = terminal;
    let dry = spec.dry_run;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let prepared = match runtime.block_on(worker.prepare(spec)) {
        Ok(p) => p,
        Err(PrepareError::Sandbox(e)) => return usage(format!("--sandbox: {e}")),
        Err(e) => return usage(e),
    };
    let plan = prepared.plan().clone();
    if dry {
        return dry_run(&plan, prepared.preview(), format);
    }
    let run_id = prepared.id().unwrap_or_default();
    let progress = Arc::new(Progress::new(quiet, verbose));
    let attempt = prepared.attempt();
    if !quiet {
        let again = if attempt > 1 {
            format!(", attempt {attempt}")
        } else {
            String::new()
        };
        eprintln!(
            "run {run_id}: {} ({} steps, concurrency {}{again})",
            plan.name,
            plan.steps.len(),
            prepared.concurrency()
        );
    }
    let outcome = runtime.block_on(async {
        let handle = prepared.start(vec![progress.clone()]);
        let signals = tokio::spawn(watch_signals(handle.controls()));
        let outcome = handle.join().await;
        signals.abort();
        outcome
    });
    progress.stop();
    if let Some(e) = &outcome.history_error {
        eprintln!("warning: run history may be incomplete: {e}");
    }
    let summary = Summary {
        run_id,
        plan: &plan,
        status: outcome.status,
        error: outcome.error.as_deref(),
        steps: &outcome.steps,
        elapsed: outcome.elapsed,
        sandbox: outcome.sandbox.clone(),
        attempt,
    };
    print_summary(&summary, format, state_dir);
    // The history is closed and the summary printed: blocking work a cancelled step left
    // behind (a big file still being parsed) gets a moment to see its cancellation, and
    // is then dropped with the process instead of holding it for minutes.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    if outcome.status.is_success() {
        0
    } else {
        1
    }
}

async fn watch_signals(run: runner::RunControls) {
    let hard = run.clone();
    super::on_signals(
        move || {
            eprintln!("\ncancelling: running steps are stopped, teardown steps still run (press Ctrl-C again to stop them too)");
            run.cancel();
        },
        move || {
            eprintln!("\nstopping teardown steps too");
            hard.hard_cancel();
        },
    )
    .await
}

fn parse_logical_date(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = DateTime::parse_from_rfc3339(text) {
        return Ok(d.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    Err(format!(
        "--logical-date: expected 2026-01-31 or an RFC 3339 time, got `{text}`"
    ))
}

fn dry_run(plan: &Plan, preview: Vec<runner::StepPreview>, format: Format) -> i32 {
    match format {
        Format::Json => {
            let items: Vec<serde_json::Value> = preview
                .iter()
                .zip(&plan.steps)
                .map(|((id, kind, rendered), step)| {
                    serde_json::json!({
                        "id": id,
                        "type": kind,
                        "needs": step.deps.iter().map(|&d| plan.steps[d].id.clone()).collect::<Vec<_>>(),
                        "always": step.spec.always,
                        "with": rendered.as_ref().ok(),
                        "error": rendered.as_ref().err(),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"pipeline": plan.name, "dry_run": true, "steps": items})
                )
                .unwrap()
            );
        }
        Format::Text => {
            println!(
                "plan for {} ({} steps, nothing will run):",
                plan.name,
                plan.steps.len()
            );
            for (n, ((id, kind, rendered), step)) in preview.iter().zip(&plan.steps).enumerate() {
                let needs: Vec<&str> = step
                    .deps
                    .iter()
                    .map(|&d| plan.steps[d].id.as_str())
                    .collect();
                let mut flags = String::new();
                if !needs.is_empty() {
                    flags.push_str(&format!(" after {}", needs.join(", ")));
                }
                if step.spec.always {
                    flags.push_str(" [always]");
                }
                println!("{}. {id} ({kind}){flags}", n + 1);
                match rendered {
                    Ok(v) => {
                        for line in serde_json::to_string_pretty(v).unwrap().lines() {
                            println!("     {line}");
                        }
                    }
                    Err(e) => println!("     (cannot render yet: {e})"),
                }
            }
        }
    }
    0
}

struct Summary<'a> {
    run_id: i64,
    plan: &'a Plan,
    status: Status,
    error: Option<&'a str>,
    steps: &'a [StepRecord],
    elapsed: std::time::Duration,
    /// Under --sandbox: what the fakes received.
    sandbox: Option<serde_json::Value>,
    /// 1, or the repair's attempt.
    attempt: u32,
}

fn print_summary(summary: &Summary, format: Format, state_dir: &Path) {
    let Summary {
        run_id,
        plan,
        status,
        error,
        steps,
        elapsed,
        ..
    } = *summary;
    match format {
        Format::Json => {
            let steps: Vec<serde_json::Value> = steps
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "id": s.step, "type": s.kind, "status": s.status, "attempts": s.attempts,
                        "duration_ms": s.duration_ms, "rows": s.rows, "error": s.error,
                        "outputs": s.outputs,
                    })
                })
                .collect();
            let mut v = serde_json::json!({
                "run_id": run_id, "attempt": summary.attempt, "pipeline": plan.name, "status": status, "error": error,
                "duration_ms": elapsed.as_millis() as u64, "steps": steps,
            });
            if let Some(stats) = &summary.sandbox {
                v["sandbox"] = stats.clone();
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap());
        }
        Format::Text => {
            let rows: Vec<Vec<String>> = steps
                .iter()
                .map(|s| {
                    vec![
                        s.step.clone(),
                        s.status.label().to_string(),
                        if s.status == Status::Skipped || s.attempts == 0 {
                            "-".into()
                        } else {
                            engine::duration::human(std::time::Duration::from_millis(s.duration_ms))
                        },
                        s.rows.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                        s.attempts.to_string(),
                    ]
                })
                .collect();
            let attempt = if summary.attempt > 1 {
                format!(" (attempt {})", summary.attempt)
            } else {
                String::new()
            };
            println!(
                "\nrun {run_id}{attempt} {}: {} in {}",
                plan.name,
                status.label(),
                engine::duration::human(elapsed)
            );
            print!(
                "{}",
                super::table(&["STEP", "STATUS", "DURATION", "ROWS", "ATTEMPTS"], &rows)
            );
            if let Some(e) = error {
                println!("error: {e}");
            }
            let dir = if state_dir == Path::new(".pipe") {
                String::new()
            } else {
                format!(" --state-dir {}", state_dir.display())
            };
            println!("history: pipe runs show {run_id}{dir}   logs: pipe runs logs {run_id}{dir}");
            if summary.sandbox.is_some() {
                let bq = state_dir.join("sandbox").join("bigquery");
                println!(
                    "sandbox BigQuery tables: pipe sandbox tables{dir}   (Parquet files under {})",
                    bq.display()
                );
            }
        }
    }
}

/// Progress on stderr: timestamped lines; on a terminal also a live line of the running
/// steps with their elapsed time and counters.
struct Progress {
    quiet: bool,
    verbose: bool,
    live: bool,
    state: Arc<Mutex<LiveState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct LiveState {
    running: IndexMap<String, (Instant, Vec<(String, u64)>)>,
    /// How many live lines are on screen below the last log line.
    drawn: usize,
}

impl Progress {
    fn new(quiet: bool, verbose: bool) -> Progress {
        let live = !quiet && std::io::stderr().is_terminal();
        let p = Progress {
            quiet,
            verbose,
            live,
            state: Arc::default(),
            stop: Arc::default(),
        };
        if live {
            let state = p.state.clone();
            let stop = p.stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    let mut s = state.lock().unwrap();
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    draw_live(&mut s);
                }
            });
        }
        p
    }

    fn stop(&self) {
        let mut s = self.state.lock().unwrap();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if self.live {
            clear_live(&mut s);
        }
    }

    fn line(&self, text: &str) {
        let mut s = self.state.lock().unwrap();
        if self.live {
            clear_live(&mut s);
        }
        let now = chrono::Local::now().format("%H:%M:%S");
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{now} {text}");
    }
}

fn clear_live(s: &mut LiveState) {
    if s.drawn > 0 {
        let mut err = std::io::stderr().lock();
        // Up to the first live line, then clear to the end of the screen.
        let _ = write!(err, "\r\x1b[{}A\x1b[J", s.drawn);
        s.drawn = 0;
    }
}

/// One line per running step: its elapsed time and live counters.
fn draw_live(s: &mut LiveState) {
    clear_live(s);
    if s.running.is_empty() {
        return;
    }
    let width = terminal_width();
    let mut err = std::io::stderr().lock();
    for (id, (since, counters)) in &s.running {
        let c: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let c = if c.is_empty() {
            String::new()
        } else {
            format!("  {}", c.join(", "))
        };
        let mut text = format!("  ⏵ {id} {}{c}", engine::duration::human(since.elapsed()));
        if text.chars().count() >= width {
            text = text.chars().take(width.saturating_sub(1)).collect();
        }
        let _ = writeln!(err, "{text}");
        s.drawn += 1;
    }
}

fn terminal_width() -> usize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        100
    }
}

impl Observer for Progress {
    fn event(&self, e: &RunEvent) {
        if self.quiet {
            return;
        }
        match e {
            RunEvent::StepStarted { step, attempt, .. } => {
                self.state
                    .lock()
                    .unwrap()
                    .running
                    .insert(step.clone(), (Instant::now(), Vec::new()));
                let again = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                self.line(&format!("▶ {step} started{again}"));
            }
            RunEvent::Progress { step, counters } => {
                if let Some(entry) = self.state.lock().unwrap().running.get_mut(step) {
                    entry.1 = counters.clone();
                }
            }
            RunEvent::StepRetrying { .. } => {}
            RunEvent::StepFinished(r) => {
                self.state.lock().unwrap().running.shift_remove(&r.step);
                if r.attempts == 0 {
                    return;
                }
                let mark = match r.status {
                    Status::Succeeded => "✔",
                    Status::Warning => "⚠",
                    Status::Skipped => "○",
                    _ => "✘",
                };
                let rows = r.rows.map(|n| format!(", {n} rows")).unwrap_or_default();
                let err = r
                    .error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                self.line(&format!(
                    "{mark} {} {} ({}{rows}){err}",
                    r.step,
                    r.status.label(),
                    engine::duration::human(std::time::Duration::from_millis(r.duration_ms))
                ));
            }
            RunEvent::Log(rec) => {
                if rec.level == Level::Info && !self.verbose {
                    return;
                }
                let step = rec.step.as_deref().unwrap_or("run");
                self.line(&format!("  [{step}] {}: {}", rec.level, rec.message));
            }
            RunEvent::RunFinished { .. } => {}
        }
    }
}
