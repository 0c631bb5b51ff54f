//! `pipe run`: validate, resolve params, record a run, execute, summarise.
//!
//! Exit codes: 0 succeeded (with or without warnings), 1 failed or cancelled, 2 nothing ran
//! (invalid pipeline, bad param, usage). Progress goes to stderr, the summary to stdout.

use super::Format;
use chrono::{DateTime, NaiveDate, Utc};
use engine::events::{Level, Observer, RunEvent, StepRecord};
use engine::executor::{self, RunRequest};
use engine::plan::Plan;
use engine::secrets::Redactor;
use engine::status::Status;
use engine::template::{Runtime, Templates};
use indexmap::IndexMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use store::{HistoryWriter, NewRun, Owner, Trigger};
use tokio_util::sync::CancellationToken;

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
    /// Summary format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Only the summary: no progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Also show every info log row on stderr.
    #[arg(long, short)]
    pub verbose: bool,
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
    let outcome = engine::validate::validate_file(&args.path, &display, &super::registry());
    let Some(mut plan) = outcome.plan else {
        for d in &outcome.diagnostics {
            eprintln!("{d}");
        }
        eprintln!("error: {display} is not a valid pipeline; nothing ran");
        return 2;
    };
    if !args.quiet {
        for d in &outcome.diagnostics {
            eprintln!("{d}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Under --sandbox the logical date defaults to the fakes' anchor date, so the same
    // command extracts the same data every time.
    let (fakes, overrides, default_date) = if args.sandbox {
        match runtime.block_on(attach_sandbox(&mut plan, state_dir)) {
            Ok((fakes, overrides, anchor)) => (Some(fakes), overrides, Some(anchor)),
            Err(e) => return usage(format!("--sandbox: {e}")),
        }
    } else {
        (None, Default::default(), None)
    };
    let plan = Arc::new(plan);
    let tz = plan.timezone();
    let logical_date = match args
        .logical_date
        .as_deref()
        .map(parse_logical_date)
        .transpose()
    {
        Ok(d) => d.or(default_date).unwrap_or_else(Utc::now),
        Err(e) => return usage(e),
    };
    let params = match resolve_params(&plan, &args.params) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let redactor = Redactor::new();
    super::set_panic_redactor(&redactor);
    let templates = Arc::new(Templates::new(Runtime {
        redactor: redactor.clone(),
        tz,
        logical_date,
        dry_run: args.dry_run,
        overrides,
    }));
    let mut param_values = std::collections::BTreeMap::new();
    for (name, value) in &params {
        match engine::params::template_value(&plan.params[name], value, logical_date, tz) {
            Ok(v) => {
                param_values.insert(name.clone(), v);
            }
            Err(e) => return usage(format!("param `{name}`: {e}")),
        }
    }
    let params_value = minijinja::Value::from(param_values);
    let started_at = Utc::now();

    if args.dry_run {
        let run = engine::template::run_value(0, started_at, logical_date, tz);
        return dry_run(&plan, &templates, params_value, run, &redactor, args.format);
    }

    let store = match store::open(&store::StoreConfig {
        url: db.map(str::to_string),
        state_dir: state_dir.to_path_buf(),
    }) {
        Ok(s) => s,
        Err(e) => {
            return usage(format!(
                "cannot open run history in {}: {e:#}",
                state_dir.display()
            ))
        }
    };
    // The run's owner: a lease renewed while this process lives (see store::lease).
    let lease = match store::LeaseKeeper::start(
        store.clone(),
        store::LeaseOwner::this_process("run"),
        store::lease_period(),
    ) {
        Ok(l) => l,
        Err(e) => return usage(format!("cannot record the run's owner: {e:#}")),
    };
    let _ = store.mark_abandoned();
    let recorded_params = redactor.redact_json(&serde_json::Value::Object(
        params.clone().into_iter().collect(),
    ));
    let run_id = match store
        .upsert_integration(&plan.name, plan.description.as_deref())
        .and_then(|_| {
            store.create_run(&NewRun {
                params: recorded_params,
                logical_date: Some(logical_date),
                lease_owner: Some(lease.owner().id.clone()),
                ..NewRun::new(plan.name.clone(), Trigger::Cli, Owner::Pipe)
            })
        }) {
        Ok(id) => id,
        Err(e) => return usage(format!("cannot record the run: {e:#}")),
    };
    let run_dir = store.run_dir(run_id);
    let writer = match HistoryWriter::start(store.clone(), run_id) {
        Ok(w) => Arc::new(w),
        Err(e) => return usage(format!("cannot write run history: {e:#}")),
    };
    let progress = Arc::new(Progress::new(args.quiet, args.verbose));
    let observer: Arc<dyn Observer> = Arc::new(Fanout(vec![writer.clone(), progress.clone()]));
    let concurrency = args
        .concurrency
        .or(plan.concurrency.map(|c| c as usize))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });

    let cancel = CancellationToken::new();
    let hard_cancel = CancellationToken::new();
    let clock = Instant::now();
    if !args.quiet {
        eprintln!(
            "run {run_id}: {} ({} steps, concurrency {concurrency})",
            plan.name,
            plan.steps.len()
        );
    }
    let result = runtime.block_on(async {
        let signals = tokio::spawn(watch_signals(cancel.clone(), hard_cancel.clone()));
        let run = engine::template::run_value(run_id, started_at, logical_date, tz);
        let result = executor::execute(RunRequest {
            plan: plan.clone(),
            params: params_value,
            run,
            run_id,
            concurrency,
            run_dir,
            templates,
            redactor: redactor.clone(),
            observer,
            cancel: cancel.clone(),
            hard_cancel,
            history: Some(Arc::new(store::HistoryReader {
                store: store.clone(),
                writer: Some(writer.clone()),
            })),
        })
        .await;
        signals.abort();
        result
    });
    progress.stop();
    // What the fakes saw (requests, logins, logouts), for the summary.
    // What the fakes received, for the summary (tests and curious users read it there).
    let sandbox_stats = fakes.as_ref().map(|f| {
        let mut v = serde_json::to_value(f.stats()).unwrap_or_default();
        v["qockpit_results"] = f.qockpit_results();
        v["carol_state"] = f.carol_state(false);
        v
    });
    if let Some(fakes) = fakes {
        runtime.block_on(fakes.shutdown());
    }
    let elapsed = clock.elapsed();
    let writer = Arc::try_unwrap(writer).ok();
    if let Some(w) = writer {
        if let Err(e) = w.finish() {
            eprintln!("warning: run history may be incomplete: {e:#}");
        }
    }
    let summary = Summary {
        run_id,
        plan: &plan,
        status: result.status,
        error: result.error.as_deref(),
        steps: &result.steps,
        elapsed,
        sandbox: sandbox_stats,
    };
    print_summary(&summary, args.format, state_dir);
    // The history is closed and the summary printed: blocking work a cancelled step left
    // behind (a big file still being parsed) gets a moment to see its cancellation, and
    // is then dropped with the process instead of holding it for minutes.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    if result.status.is_success() {
        0
    } else {
        1
    }
}

async fn watch_signals(cancel: CancellationToken, hard: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        count += 1;
        if count == 1 {
            eprintln!("\ncancelling: running steps are stopped, teardown steps still run (press Ctrl-C again to stop them too)");
            cancel.cancel();
        } else {
            eprintln!("\nstopping teardown steps too");
            hard.cancel();
        }
    }
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

/// Params from `--param` and defaults, typed; every problem is a usage error.
fn resolve_params(
    plan: &Plan,
    given: &[String],
) -> Result<IndexMap<String, serde_json::Value>, String> {
    let mut values = IndexMap::new();
    for item in given {
        let Some((name, text)) = item.split_once('=') else {
            return Err(format!("--param expects NAME=VALUE, got `{item}`"));
        };
        let Some(spec) = plan.params.get(name) else {
            let known: Vec<&str> = plan.params.keys().map(String::as_str).collect();
            let hint = engine::diag::did_you_mean(name, known.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(format!(
                "unknown param `{name}`{hint} (this pipeline declares: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        let v =
            engine::params::parse_cli(spec, text).map_err(|e| format!("param `{name}`: {e}"))?;
        values.insert(name.to_string(), v);
    }
    for (name, spec) in &plan.params {
        if values.contains_key(name) {
            continue;
        }
        match &spec.default {
            Some(d) => {
                let v = engine::params::check_value(spec, d)
                    .map_err(|e| format!("default of param `{name}`: {e}"))?;
                values.insert(name.clone(), v);
            }
            None => {
                return Err(format!(
                    "param `{name}` is required: pass --param {name}=VALUE"
                ))
            }
        }
    }
    Ok(values)
}

fn dry_run(
    plan: &Plan,
    templates: &Templates,
    params: minijinja::Value,
    run: minijinja::Value,
    redactor: &Redactor,
    format: Format,
) -> i32 {
    let preview = executor::preview(plan, templates, params, run, redactor);
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
                "run_id": run_id, "pipeline": plan.name, "status": status, "error": error,
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
            println!(
                "\nrun {run_id} {}: {} in {}",
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

struct Fanout(Vec<Arc<dyn Observer>>);

impl Observer for Fanout {
    fn event(&self, e: &RunEvent) {
        for o in &self.0 {
            o.event(e);
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

/// Connection types that `--sandbox` replaces with the demo SQLite database.
const SQL_TYPES: &[&str] = steps::sql::conn::CONNECTION_TYPES;

/// `--sandbox`: start the local fakes, point the pipeline's connections at them and give
/// `secret()`/`env()` the values of its `sandbox:` block. A pipeline written for production
/// runs unchanged and offline.
///
/// Connections map by type (`google_service_account` → the Google fake, `carol` → the
/// Carol fake, a database → the demo SQLite database); an `http`
/// connection names its stand-in with `sandbox: <service>` (an http connection without one
/// would reach the real network, so it is refused).
async fn attach_sandbox(
    plan: &mut Plan,
    state_dir: &Path,
) -> Result<(sandbox::Sandbox, engine::template::Overrides, DateTime<Utc>), String> {
    let mut options = sandbox::Options::from_env().map_err(|e| format!("PIPE_SANDBOX: {e:#}"))?;
    // The fake BigQuery keeps its tables under pipe's state dir, where `pipe sandbox
    // tables` (and anyone with a Parquet reader) can read what was loaded.
    options
        .state_dir
        .get_or_insert_with(|| state_dir.to_path_buf());
    let anchor = options.anchor;
    let fakes = sandbox::Sandbox::start(options)
        .await
        .map_err(|e| format!("cannot start the local fakes: {e:#}"))?;
    let values = fakes.values();
    let names: Vec<String> = plan.connections.keys().cloned().collect();
    for name in &names {
        let spec = &plan.connections[name];
        // A database connection becomes the demo SQLite database, whatever its server.
        if SQL_TYPES.contains(&spec.kind.as_str()) {
            let path = fakes.demo_db().display().to_string();
            let node = plan
                .connection_nodes
                .get_mut(name)
                .expect("every connection has its node");
            let pos = node.pos;
            let s =
                |t: &str| engine::yaml::Node::new(pos, engine::yaml::Value::String(t.to_string()));
            node.value =
                engine::yaml::Value::Map(vec![(s("type"), s("sqlite")), (s("path"), s(&path))]);
            let spec = plan.connections.get_mut(name).expect("listed");
            spec.kind = "sqlite".to_string();
            spec.fields.clear();
            spec.fields.insert("path".into(), path.into());
            continue;
        }
        let stand_in = spec.fields.get("sandbox").and_then(|v| v.as_str());
        let borrows_key = spec
            .fields
            .get("credentials")
            .is_some_and(|c| c.is_string());
        let fields: Vec<(&str, String)> = match (spec.kind.as_str(), stand_in) {
            (_, Some("tiflux")) => vec![("base_url", fakes.tiflux_url())],
            (_, Some("qockpit")) => vec![(
                "base_url",
                format!(
                    "{}/{}",
                    fakes.qockpit_url(),
                    values["qockpit"]["domain"].as_str().unwrap_or_default()
                ),
            )],
            ("carol", None | Some("carol")) => ["url", "tenant", "organization", "connector_id"]
                .into_iter()
                .map(|f| (f, values["carol"][f].as_str().unwrap_or_default().to_string()))
                .collect(),
            ("google_service_account", None | Some("google")) => vec![
                ("key_file", fakes.key_file().display().to_string()),
                ("sheets_base_url", format!("{}/", fakes.google_url())),
            ],
            ("bigquery", None | Some("google") | Some("bigquery")) => {
                let project = values["bigquery"]["project"].as_str().unwrap_or("pipe-sandbox").to_string();
                let mut fields = vec![
                    ("base_url", fakes.bigquery_url()),
                    ("upload_url", fakes.upload_url()),
                    ("project", project),
                ];
                // Its own key (when it does not borrow one with `credentials:`) is the fake's.
                if !borrows_key {
                    fields.push(("key_file", fakes.key_file().display().to_string()));
                }
                fields
            }
            (_, Some(other)) => {
                return Err(format!(
                    "connection `{name}` names an unknown stand-in `sandbox: {other}` (known: tiflux, qockpit, google, bigquery, carol)"
                ))
            }
            ("http", None) => {
                return Err(format!(
                    "connection `{name}` has no stand-in: add `sandbox: tiflux` (or another fake) so --sandbox stays offline"
                ))
            }
            _ => vec![],
        };
        let node = plan
            .connection_nodes
            .get_mut(name)
            .expect("every connection has its node");
        if let engine::yaml::Value::Map(entries) = &mut node.value {
            // The fake's key file replaces an inline key.
            if fields.iter().any(|(f, _)| *f == "key_file") {
                entries.retain(|(k, _)| k.key_str() != Some("key_json"));
            }
            for (field, value) in fields {
                let pos = node.pos;
                let new = engine::yaml::Node::new(pos, engine::yaml::Value::String(value));
                match entries.iter_mut().find(|(k, _)| k.key_str() == Some(field)) {
                    Some((_, v)) => *v = new,
                    None => entries.push((
                        engine::yaml::Node::new(
                            pos,
                            engine::yaml::Value::String(field.to_string()),
                        ),
                        new,
                    )),
                }
            }
        }
    }
    // The `sandbox:` block, rendered with `sandbox` = the fakes' values.
    let scratch = Templates::new(Runtime {
        redactor: Redactor::new(),
        tz: plan.timezone(),
        logical_date: Utc::now(),
        dry_run: false,
        overrides: Default::default(),
    });
    let scope = engine::template::Scope::new(
        minijinja::Value::UNDEFINED,
        minijinja::Value::UNDEFINED,
        minijinja::Value::UNDEFINED,
    )
    .with("sandbox", minijinja::Value::from_serialize(&values));
    let mut overrides = engine::template::Overrides::default();
    for (target, source) in [
        (&mut overrides.secrets, &plan.sandbox.secrets),
        (&mut overrides.env, &plan.sandbox.env),
    ] {
        for (name, template) in source {
            let v = scratch
                .render_str(template, &scope)
                .map_err(|e| format!("sandbox.{name}: {e}"))?;
            target.insert(
                name.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            );
        }
    }
    Ok((fakes, overrides, anchor))
}
