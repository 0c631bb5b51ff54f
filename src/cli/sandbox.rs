//! `pipe sandbox serve`: run the local fakes of the external services in the
//! foreground, so a pipeline (or a person with curl) can be pointed at them by hand.
//!
//! It prints the endpoints and `export` lines for the environment a pipeline reads,
//! then `sandbox ready` last: scripts and tests wait for that line before connecting.
//!
//! `pipe sandbox tables` lists what the BigQuery fake stored under the state directory
//! (`<state>/sandbox/bigquery/…/*.parquet`) by reading the files, so it works after the
//! run that wrote them has ended, with no server.

use clap::{Args, Subcommand};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Start the fakes (Tiflux web login + tickets, Google OAuth + Sheets + BigQuery) until Ctrl-C.
    Serve(ServeArgs),
    /// List the BigQuery fake's tables under <state-dir>/sandbox/bigquery (no server needed).
    Tables(TablesArgs),
}

#[derive(Args)]
pub struct TablesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Seed of all generated data (overrides PIPE_SANDBOX).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of tickets.
    #[arg(long)]
    pub tickets: Option<usize>,
    /// Delay before the OTP lands in the sheet, e.g. `2s`, `300ms`.
    #[arg(long, value_parser = parse_duration)]
    pub otp_delay: Option<Duration>,
    /// Latency added to every tickets request, e.g. `20ms`.
    #[arg(long, value_parser = parse_duration)]
    pub latency: Option<Duration>,
    /// A fault as JSON, e.g. '{"endpoint":"tickets","kind":{"type":"status","code":503},"rate":0.1}'.
    /// Repeatable; replaces the faults of PIPE_SANDBOX.
    #[arg(long = "fault", value_name = "JSON")]
    pub faults: Vec<String>,
    /// Keep the BigQuery fake's tables under <state-dir>/sandbox/bigquery (where
    /// `pipe sandbox tables` and later runs find them) instead of a temp dir.
    #[arg(long)]
    pub keep_tables: bool,
    /// BigQuery jobs report PENDING, then RUNNING, for this many polls before DONE.
    #[arg(long)]
    pub job_polls: Option<u32>,
}

/// `1500`, `1500ms`, `2s`, `1m` (a bare number is milliseconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 300ms, 2s, 1m)"))?;
    let ms = match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        other => return Err(format!("unknown duration unit `{other}` (use ms, s or m)")),
    };
    Ok(Duration::from_millis(ms.round() as u64))
}

/// Quote a value for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn options(args: &ServeArgs, state_dir: &Path) -> anyhow::Result<::sandbox::Options> {
    let mut o = ::sandbox::Options::from_env()?;
    if args.keep_tables {
        o.state_dir = Some(state_dir.to_path_buf());
    }
    if let Some(n) = args.job_polls {
        o.bigquery_job_polls = n;
    }
    if let Some(seed) = args.seed {
        o.seed = seed;
    }
    if let Some(n) = args.tickets {
        o.tickets = n;
    }
    if let Some(d) = args.otp_delay {
        o.otp_delay_ms = d.as_millis() as u64;
    }
    if let Some(d) = args.latency {
        o.latency_ms = d.as_millis() as u64;
    }
    if !args.faults.is_empty() {
        o.faults = args
            .faults
            .iter()
            .map(|f| serde_json::from_str(f).map_err(|e| anyhow::anyhow!("--fault {f}: {e}")))
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(o)
}

/// `pipe sandbox serve|tables`, with pipe's state directory.
pub fn main_in(args: SandboxCommand, state_dir: &Path) -> i32 {
    let args = match args {
        SandboxCommand::Serve(args) => args,
        SandboxCommand::Tables(t) => return tables(state_dir, t.format),
    };
    let opts = match options(&args, state_dir) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let fakes = match ::sandbox::Sandbox::start(opts).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: cannot start the local fakes: {e:#}");
                return 1;
            }
        };
        let v = fakes.values();
        let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
        let key_file = fakes.key_file().display().to_string();
        let mut out = String::new();
        out.push_str(&format!(
            "tiflux  {}  (web login /api/login, tickets /api/v2/tickets)\n",
            fakes.tiflux_url()
        ));
        out.push_str(&format!(
            "google  {}  (token {}, sheets base {})\n",
            fakes.google_url(),
            s(&v["google"]["token_uri"]),
            s(&v["google"]["sheets_url"])
        ));
        out.push_str(&format!(
            "bigquery  {}  (uploads {}, project {})\n",
            fakes.bigquery_url(),
            fakes.upload_url(),
            s(&v["bigquery"]["project"])
        ));
        out.push_str(&format!(
            "qockpit  {}/{}  (ping, integrations?type=kpi, integrations/ID/results)\n",
            fakes.qockpit_url(),
            s(&v["qockpit"]["domain"])
        ));
        out.push_str(&format!(
            "carol  {}  (tenant {}, connector {})\n",
            fakes.carol_url(),
            s(&v["carol"]["tenant"]),
            s(&v["carol"]["connector_id"])
        ));
        out.push_str(&format!("demo database  {}\n", fakes.demo_db().display()));
        out.push_str(&format!("key file  {key_file}\n"));
        out.push_str(&format!("stats   {}/__sandbox/stats\n", fakes.tiflux_url()));
        for (name, value) in [
            ("TIFLUX_URL", fakes.tiflux_url()),
            ("TIFLUX_USER", s(&v["tiflux"]["user"])),
            ("TIFLUX_PASSWORD", s(&v["tiflux"]["password"])),
            ("OTP_SHEET_ID", s(&v["sheets"]["otp_spreadsheet"])),
            ("GOOGLE_APPLICATION_CREDENTIALS", key_file.clone()),
            // The base a Google client takes as its API endpoint (it adds `/bigquery/v2`
            // or `/v4/spreadsheets` itself), and the Sheets base pipe's connection takes.
            ("GOOGLE_URL", fakes.google_url()),
            ("SHEETS_URL", s(&v["google"]["sheets_url"])),
            ("BIGQUERY_URL", fakes.bigquery_url()),
            ("BIGQUERY_PROJECT", s(&v["bigquery"]["project"])),
            ("QOCKPIT_BASE_ENDPOINT", fakes.qockpit_url()),
            ("QOCKPIT_DOMAIN", s(&v["qockpit"]["domain"])),
            ("QOCKPIT_API_TOKEN", s(&v["qockpit"]["api_token"])),
            ("CAROL_URL", fakes.carol_url()),
            ("CAROL_TENANT", s(&v["carol"]["tenant"])),
            ("CAROL_CONNECTOR_ID", s(&v["carol"]["connector_id"])),
            ("CAROL_API_KEY", s(&v["carol"]["api_key"])),
            ("CAROL_ORGANIZATION", s(&v["carol"]["organization"])),
            ("CAROL_CONNECTOR_NAME", s(&v["carol"]["connector_name"])),
            ("CAROL_USERNAME", s(&v["carol"]["username"])),
            ("CAROL_PASSWORD", s(&v["carol"]["password"])),
            ("DEMO_DB", fakes.demo_db().display().to_string()),
        ] {
            out.push_str(&format!("export {name}={}\n", shell_quote(&value)));
        }
        out.push_str("sandbox ready\n");
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        wait_for_signal().await;
        fakes.shutdown().await;
        0
    })
}

fn tables(state_dir: &Path, format: Format) -> i32 {
    let tables = match ::sandbox::list_tables(state_dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "error: cannot read the sandbox's tables under {}: {e:#}",
                state_dir.join("sandbox/bigquery").display()
            );
            return 1;
        }
    };
    let out = match format {
        Format::Json => serde_json::to_string_pretty(&tables).expect("serializable") + "\n",
        Format::Text => render_tables(&tables),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    0
}

/// An aligned table: project, dataset, table, rows, columns, path.
fn render_tables(tables: &[::sandbox::TableSummary]) -> String {
    let header = ["PROJECT", "DATASET", "TABLE", "ROWS", "COLUMNS", "PATH"];
    let rows: Vec<[String; 6]> = tables
        .iter()
        .map(|t| {
            [
                t.project.clone(),
                t.dataset.clone(),
                t.table.clone(),
                t.rows.to_string(),
                t.columns.to_string(),
                t.path.display().to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            // Numbers right-aligned, the last column unpadded.
            match i {
                3 | 4 => l.push_str(&format!("{c:>w$}  ")),
                5 => l.push_str(c),
                _ => l.push_str(&format!("{c:<w$}  ")),
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from), &mut out);
    for r in &rows {
        line(r, &mut out);
    }
    if rows.is_empty() {
        out.push_str("(no tables)\n");
    }
    out
}

/// Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("150"), Ok(Duration::from_millis(150)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("http://127.0.0.1:80"), "http://127.0.0.1:80");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }
}
