//! `pipe`: the command line. Each subcommand lives in `src/cli/<name>.rs`.

mod cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pipe",
    version,
    about = "A declarative data-pipeline engine: YAML DAGs of typed, templated steps"
)]
struct Cli {
    /// Where run history and run files live (default: $PIPE_HOME, else ./.pipe).
    #[arg(long, global = true, env = "PIPE_HOME")]
    state_dir: Option<PathBuf>,
    /// The run store: `postgres://user@host/db` for PostgreSQL, else SQLite in the state dir
    /// (default; `sqlite:PATH` for another file). Run folders stay in the state dir.
    #[arg(long, global = true, env = "PIPE_DB")]
    db: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline.
    Run(cli::run::RunArgs),
    /// Check pipelines without running them (the CI gate).
    Validate(cli::validate::ValidateArgs),
    /// Print the JSON Schema of the pipeline format.
    Schema(cli::schema::SchemaArgs),
    /// Print a pipeline's DAG as Mermaid or Graphviz dot.
    Graph(cli::graph::GraphArgs),
    /// Run history: list, show, follow logs; start, log and finish runs from outside.
    #[command(subcommand)]
    Runs(cli::runs::RunsCommand),
    /// Schedules: `pipe schedule next FILE` prints the coming fire times.
    #[command(subcommand)]
    Schedule(cli::schedule::ScheduleCommand),
    /// Run the integration service: schedule, queue and run every pipeline of a folder.
    Serve(cli::serve::ServeArgs),
    /// The integrations of the service: list, show, enable, disable.
    #[command(subcommand)]
    Integrations(cli::integrations::IntegrationsCommand),
    /// Queue a manual run of an integration (the running service picks it up).
    Trigger(cli::integrations::TriggerArgs),
    /// Queue one run per scheduled tick of a past range; `backfill list`, `backfill cancel ID`.
    Backfill(cli::integrations::BackfillArgs),
    /// Local fakes of the external services (`pipe sandbox serve`).
    Sandbox {
        #[command(subcommand)]
        cmd: cli::sandbox::SandboxCommand,
    },
}

fn main() {
    cli::install_panic_hook();
    steps::init_crypto();
    let cli = Cli::parse();
    let state_dir = cli.state_dir.unwrap_or_else(|| PathBuf::from(".pipe"));
    let store_config = store::StoreConfig {
        url: cli.db.clone(),
        state_dir: state_dir.clone(),
    };
    let code = match cli.command {
        Command::Run(args) => cli::run::main(args, &state_dir, cli.db.as_deref()),
        Command::Validate(args) => cli::validate::main(args),
        Command::Schema(args) => cli::schema::main(args),
        Command::Graph(args) => cli::graph::main(args),
        Command::Runs(cmd) => cli::runs::main(
            cmd,
            &store::StoreConfig {
                url: cli.db.clone(),
                state_dir: state_dir.clone(),
            },
        ),
        Command::Sandbox { cmd } => cli::sandbox::main_in(cmd, &state_dir),
        Command::Schedule(cmd) => cli::schedule::main(cmd),
        Command::Serve(args) => cli::serve::main(args, &store_config),
        Command::Integrations(cmd) => cli::integrations::integrations_main(cmd, &store_config),
        Command::Trigger(args) => cli::integrations::trigger_main(args, &store_config),
        Command::Backfill(args) => cli::integrations::backfill_main(args, &store_config),
    };
    std::process::exit(code);
}
