//! `pipe runs`: read the run history (`list`, `show`, `logs`) and drive runs from outside
//! (`start`, `log`, `finish`, like OneVizion's IntegrationWrapperRunController and
//! IntegrationWrapperAddingLog scripts).

use anyhow::{bail, Result};
use clap::{Subcommand, ValueEnum};
use engine::events::{Level, LogRecord};
use engine::status::Status;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::{LogRow, NewRun, Owner, RunDetail, RunRow, RunStore, StoreConfig, Trigger};

/// How often `pipe runs logs --follow` looks for new rows.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Step errors longer than this are cut in the `show` table (the run error is shown whole).
const STEP_ERROR_WIDTH: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List recent runs, newest first.
    List {
        /// Only the runs of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// How many runs to list (0 for all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show a run with its steps.
    Show {
        /// The run id.
        id: i64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print a run's log rows.
    Logs {
        /// The run id.
        id: i64,
        /// Keep printing new rows until the run is finished (or abandoned).
        #[arg(long, short = 'f')]
        follow: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Start a run driven from outside `pipe`; prints only the new run's id.
    Start {
        /// The pipeline (integration) name; its row is created when missing.
        #[arg(long)]
        pipeline: String,
        /// Set the integration's description.
        #[arg(long)]
        description: Option<String>,
        /// A param recorded with the run (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Repair a finished run: its failed, cancelled and skipped steps (and what depends on
    /// them) run again as the run's next attempt; succeeded steps are reused.
    Repair(super::repair::RepairArgs),
    /// Add a log row to a run.
    Log {
        /// The run id.
        id: i64,
        /// info, warning or error (or 0, 1, 2).
        #[arg(long, default_value = "info", value_parser = parse_level)]
        level: Level,
        /// The short message.
        #[arg(long, short = 'm')]
        message: String,
        /// The full text.
        #[arg(long)]
        description: Option<String>,
        /// A file to attach; it is copied into the run's folder.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The step the row belongs to.
        #[arg(long)]
        step: Option<String>,
    },
    /// Finish a run started with `pipe runs start` (or one whose `pipe run` died).
    Finish {
        /// The run id.
        id: i64,
        /// succeeded, warning (succeeded with warnings) or failed.
        #[arg(long, value_parser = parse_finish_status)]
        status: Status,
        /// Why the run failed.
        #[arg(long)]
        error: Option<String>,
        /// Finish it even when a `pipe run` owns it that is alive, or that pipe cannot see
        /// (another pid namespace).
        #[arg(long)]
        force: bool,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got `{s}`")),
    }
}

fn parse_level(s: &str) -> Result<Level, String> {
    s.to_ascii_lowercase().parse()
}

fn parse_finish_status(s: &str) -> Result<Status, String> {
    match s.to_ascii_lowercase().as_str() {
        "succeeded" => Ok(Status::Succeeded),
        "warning" => Ok(Status::Warning),
        "failed" => Ok(Status::Failed),
        _ => Err(format!(
            "unknown status `{s}` (expected succeeded, warning or failed)"
        )),
    }
}

/// Run a `pipe runs` subcommand. Exit codes: 0 ok, 1 failure, 2 usage.
pub fn main(cmd: RunsCommand, cfg: &StoreConfig) -> i32 {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(cmd, cfg, &mut out).and_then(|code| {
        out.flush()?;
        Ok(code)
    }) {
        Ok(code) => code,
        // The reader went away (`pipe runs logs 1 | head`): not an error.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            0
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn run(cmd: RunsCommand, cfg: &StoreConfig, out: &mut impl Write) -> Result<i32> {
    let store: Arc<dyn RunStore> = store::open(cfg)?;
    store.mark_abandoned()?;
    match cmd {
        RunsCommand::Repair(args) => {
            // Its own store and run, as `pipe run`.
            drop(store);
            return Ok(super::repair::main(
                args,
                &cfg.state_dir,
                cfg.url.as_deref(),
            ));
        }
        RunsCommand::List {
            pipeline,
            limit,
            format,
        } => {
            let runs = store.list_runs(pipeline.as_deref(), limit)?;
            match format {
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&runs)?)?,
                Format::Text if runs.is_empty() => match &pipeline {
                    Some(p) => writeln!(out, "no runs of pipeline `{p}`")?,
                    None => writeln!(out, "no runs")?,
                },
                Format::Text => print_run_list(out, &runs)?,
            }
        }
        RunsCommand::Show { id, format } => {
            let Some(detail) = store.get_run(id)? else {
                bail!("run {id} not found");
            };
            match format {
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&detail)?)?,
                Format::Text => print_run_detail(out, &detail)?,
            }
        }
        RunsCommand::Logs { id, follow, format } => {
            if store.run_status(id)?.is_none() {
                bail!("run {id} not found");
            }
            if follow {
                follow_logs(store.as_ref(), id, format, out)?;
            } else {
                let rows = store.logs(id, 0)?;
                match format {
                    Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
                    Format::Text => {
                        for row in &rows {
                            print_log(out, row)?;
                        }
                    }
                }
            }
        }
        RunsCommand::Start {
            pipeline,
            description,
            params,
        } => {
            if pipeline.trim().is_empty() {
                eprintln!("error: --pipeline must not be empty");
                return Ok(2);
            }
            store.upsert_integration(&pipeline, description.as_deref())?;
            if !store.is_enabled(&pipeline)? {
                bail!("integration `{pipeline}` is disabled");
            }
            let params: serde_json::Map<String, serde_json::Value> = params
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            let id = store.create_run(&NewRun {
                params: serde_json::Value::Object(params),
                ..NewRun::new(pipeline, Trigger::External, Owner::External)
            })?;
            writeln!(out, "{id}")?;
        }
        RunsCommand::Log {
            id,
            level,
            message,
            description,
            file,
            step,
        } => {
            if store.run_status(id)?.is_none() {
                bail!("run {id} not found");
            }
            store.add_log(
                id,
                &LogRecord {
                    time: chrono::Utc::now(),
                    level,
                    step,
                    message,
                    description,
                    file: file.map(|f| f.to_string_lossy().into_owned()),
                },
            )?;
        }
        RunsCommand::Finish {
            id,
            status,
            error,
            force,
        } => {
            store.finish_run(id, status, error.as_deref(), force)?;
        }
    }
    Ok(0)
}

/// Print new rows every [`FOLLOW_POLL`] until the run is finished, then the rest.
fn follow_logs(store: &dyn RunStore, id: i64, format: Format, out: &mut impl Write) -> Result<()> {
    let mut last = 0;
    loop {
        // A `pipe run` that dies while followed becomes `abandoned` here.
        store.mark_abandoned()?;
        // Status first: once it says finished, the rows read next are all there will be.
        let Some(status) = store.run_status(id)? else {
            bail!("run {id} not found");
        };
        for row in store.logs(id, last)? {
            match format {
                Format::Json => writeln!(out, "{}", serde_json::to_string(&row)?)?,
                Format::Text => print_log(out, &row)?,
            }
            last = row.id;
        }
        out.flush()?;
        if status.is_finished() {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn duration(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "-".to_string(),
        |ms| engine::duration::human(Duration::from_millis(ms)),
    )
}

fn print_run_list(out: &mut impl Write, runs: &[RunRow]) -> io::Result<()> {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.pipeline.clone(),
                r.status.label().to_string(),
                time(r.started_at),
                duration(r.duration_ms),
                r.trigger.to_string(),
            ]
        })
        .collect();
    print_table(
        out,
        &["ID", "PIPELINE", "STATUS", "STARTED", "DURATION", "TRIGGER"],
        &rows,
    )
}

fn print_run_detail(out: &mut impl Write, d: &RunDetail) -> io::Result<()> {
    let r = &d.run;
    writeln!(out, "run {}  {}", r.id, r.pipeline)?;
    let mut fields: Vec<(&str, String)> = vec![
        ("status", r.status.label().to_string()),
        ("trigger", r.trigger.to_string()),
        (
            "owner",
            match r.pid {
                Some(pid) => format!("{} (pid {pid})", r.owner),
                None => r.owner.to_string(),
            },
        ),
    ];
    if r.attempt > 1 {
        fields.push(("attempt", format!("{} (repaired)", r.attempt)));
    }
    fields.push(("started", time(r.started_at)));
    if let Some(f) = r.finished_at {
        fields.push(("finished", time(f)));
        fields.push(("duration", duration(r.duration_ms)));
    }
    if let Some(l) = r.logical_date {
        fields.push(("logical date", time(l)));
    }
    if r.params.as_object().is_some_and(|o| !o.is_empty()) {
        fields.push(("params", r.params.to_string()));
    }
    fields.push(("logs", format!("{} rows", d.log_count)));
    for (k, v) in fields {
        writeln!(out, "{:<14}{v}", format!("{k}:"))?;
    }
    if !d.steps.is_empty() {
        writeln!(out)?;
        // A repaired run shows each attempt's rows, the attempt first.
        let attempts = r.attempt > 1;
        let rows: Vec<Vec<String>> = d
            .steps
            .iter()
            .map(|s| {
                let mut row = vec![
                    s.step.clone(),
                    s.status.label().to_string(),
                    s.attempts.to_string(),
                    if s.status.is_finished() && s.started_at.is_some() {
                        duration(s.duration_ms)
                    } else {
                        "-".to_string()
                    },
                    s.rows.map_or_else(|| "-".to_string(), |n| n.to_string()),
                    s.error.as_deref().map(short).unwrap_or_default(),
                ];
                if attempts {
                    row.insert(0, s.run_attempt.to_string());
                }
                row
            })
            .collect();
        let mut header = vec!["STEP", "STATUS", "ATTEMPTS", "DURATION", "ROWS", "ERROR"];
        if attempts {
            header.insert(0, "RUN");
        }
        print_table(out, &header, &rows)?;
    }
    if let Some(e) = &r.error {
        writeln!(out)?;
        writeln!(out, "error: {}", indent(e, 7))?;
    }
    Ok(())
}

/// The first line of `text`, cut to [`STEP_ERROR_WIDTH`] characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    let more = line.len() < text.trim_end().len();
    if line.chars().count() > STEP_ERROR_WIDTH {
        format!(
            "{}…",
            line.chars().take(STEP_ERROR_WIDTH - 1).collect::<String>()
        )
    } else if more {
        format!("{line} …")
    } else {
        line.to_string()
    }
}

/// Indent every line after the first by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    text.trim_end()
        .replace('\n', &format!("\n{}", " ".repeat(n)))
}

fn print_log(out: &mut impl Write, row: &LogRow) -> io::Result<()> {
    let level = match row.level {
        Level::Info => "INFO",
        Level::Warning => "WARN",
        Level::Error => "ERROR",
    };
    let head = match &row.step {
        Some(step) => format!("{} {level:<5} {step}  ", time(row.time)),
        None => format!("{} {level:<5} ", time(row.time)),
    };
    writeln!(out, "{head}{}", indent(&row.message, 4))?;
    if let Some(d) = row.description.as_deref().filter(|d| !d.trim().is_empty()) {
        writeln!(out, "    {}", indent(d, 4))?;
    }
    if let Some(f) = &row.file {
        writeln!(out, "    file: {f}")?;
    }
    Ok(())
}

/// Columns separated by two spaces, each as wide as its widest cell; the last is not padded.
fn print_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            s.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(cell.chars().count()),
            ));
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(&mut header.iter().copied())?;
    for row in rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}
