//! `pipe worker` (run the runs `pipe serve --broker` publishes, on any machine) and
//! `pipe workers list | drain ID` (see the `service` crate's `worker` module).

use super::serve::{parse_duration, BrokerArgs};
use super::Format;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The folder of pipeline files: the same files as the server's (watched).
    #[arg(default_value = "pipelines")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The named queues to take runs from, comma-separated (`high,default`).
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub queues: Vec<String>,
    /// How many runs this worker runs at once (its prefetch is its free slots).
    #[arg(long, default_value_t = 4)]
    pub slots: usize,
    /// On SIGTERM (or `pipe workers drain`), how long running runs may take to finish
    /// before they are cancelled (their teardown steps still run).
    #[arg(long, default_value = "5min", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Run every run against pipe's local fakes of the external services (for a
    /// `pipe serve --sandbox` cluster).
    #[arg(long)]
    pub sandbox: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum WorkersCommand {
    /// The workers the store knows: state, host, queues, slots, current runs, heartbeat.
    List {
        /// Include workers that stopped.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Ask a worker to finish its current runs and take no more (it then stops).
    Drain { id: String },
}

/// Exit codes: 0 after a clean stop, 1 when the worker could not start, 2 for bad arguments.
pub fn main(args: WorkerArgs, cfg: &store::StoreConfig) -> i32 {
    let Some(broker) = args.broker.config() else {
        eprintln!("error: a worker takes its runs from RabbitMQ: give --broker (or PIPE_BROKER)");
        return 2;
    };
    if args.slots == 0 {
        eprintln!("error: --slots must be at least 1");
        return 2;
    }
    let queues: Vec<String> = args
        .queues
        .iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    if let Some(bad) = queues.iter().find(|q| {
        !q.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }) {
        eprintln!("error: --queues: `{bad}` is not a queue name (letters, digits, `-`, `_`)");
        return 2;
    }
    if queues.is_empty() {
        eprintln!("error: --queues names no queue");
        return 2;
    }
    super::serve::run_until_signalled(cfg, move |store, shutdown, hurry| {
        let config = service::worker::WorkerConfig {
            dir: args.dir,
            queues,
            slots: args.slots,
            drain_timeout: args.drain_timeout,
            registry: super::registry(),
            store,
            broker,
            launcher: Arc::new(
                super::serve::launcher::RunnerLauncher::new(super::registry(), &cfg.state_dir)
                    .sandboxed(args.sandbox),
            ),
            hurry,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        async move {
            service::worker::Worker::run(config, shutdown)
                .await
                .map(drop)
        }
    })
}

pub fn workers_main(cmd: WorkersCommand, cfg: &store::StoreConfig) -> i32 {
    let Some(store) = super::serve::open_store(cfg) else {
        return 1;
    };
    let now = chrono::Utc::now();
    match cmd {
        WorkersCommand::List { all, format } => {
            let list = match store.list_workers(now) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            };
            let list: Vec<_> = list
                .into_iter()
                .filter(|w| all || w.state != store::WorkerState::Stopped)
                .collect();
            match format {
                Format::Json => match serde_json::to_string_pretty(&list) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return 1;
                    }
                },
                Format::Text if list.is_empty() => println!(
                    "no workers{} (`pipe worker --broker URL` starts one)",
                    if all { "" } else { " running" }
                ),
                Format::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|w| {
                            let ago = (now - w.heartbeat_at).num_milliseconds().max(0) as f64;
                            vec![
                                w.id.clone(),
                                w.state.as_str().to_string(),
                                format!(
                                    "{}{}",
                                    w.host,
                                    w.pid.map(|p| format!(" pid {p}")).unwrap_or_default()
                                ),
                                w.queues.join(","),
                                format!("{}/{}", w.running.len(), w.slots),
                                if w.running.is_empty() {
                                    "-".into()
                                } else {
                                    w.running
                                        .iter()
                                        .map(|r| r.to_string())
                                        .collect::<Vec<_>>()
                                        .join(",")
                                },
                                format!("{:.1}s ago", ago / 1000.0),
                                w.version.clone().unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        super::table(
                            &[
                                "ID",
                                "STATE",
                                "HOST",
                                "QUEUES",
                                "BUSY",
                                "RUNS",
                                "HEARTBEAT",
                                "VERSION"
                            ],
                            &rows
                        )
                    );
                }
            }
            0
        }
        WorkersCommand::Drain { id } => match store.request_drain(&id, now) {
            Ok(true) => {
                println!("worker {id} asked to drain: it finishes its current runs, takes no more, and stops");
                0
            }
            Ok(false) => {
                println!("worker {id} was already asked to drain, or has stopped");
                0
            }
            Err(store::StoreError::NotFound(_)) => {
                eprintln!("error: no worker {id} (`pipe workers list` shows them)");
                1
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
    }
}
