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
    /// Run the runs `pipe serve --broker` publishes (on any machine; needs PostgreSQL).
    Worker(cli::worker::WorkerArgs),
    /// The workers of a cluster: `workers list`, `workers drain ID`.
    #[command(subcommand)]
    Workers(cli::worker::WorkersCommand),
    /// The integrations of the service: list, show, enable, disable.
    #[command(subcommand)]
    Integrations(cli::integrations::IntegrationsCommand),
    /// Queue a manual run of an integration (the running service picks it up).
    Trigger(cli::integrations::TriggerArgs),
    /// Queue one run per scheduled tick of a past range; `backfill list`, `backfill cancel ID`.
    Backfill(cli::integrations::BackfillArgs),
    /// The REST API's users: add, passwd, role, disable, enable, delete, list.
    #[command(subcommand)]
    Users(cli::users::UsersCommand),
    /// The REST API's machine tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Tokens(cli::users::TokensCommand),
    /// Stored credentials: set, list, show, delete, rotate-key, types.
    #[command(subcommand)]
    Credentials(cli::credentials::CredentialsCommand),
    /// Local fakes of the external services (`pipe sandbox serve`).
    Sandbox {
        #[command(subcommand)]
        cmd: cli::sandbox::SandboxCommand,
    },
}

/// glibc's malloc gives each thread that allocates its own arena (up to 8 per core) and
/// returns little of a fragmented arena to the system: a service whose runs hop between
/// tokio's blocking threads and history writer threads grew from 200 MB to 750 MB in a
/// minute of 167 runs/s, and kept growing. Two arenas keep it flat (278 MB at 10,000
/// integrations) on a 2-core machine; `MALLOC_ARENA_MAX` set by the operator wins.
/// BENCHMARKS.md "Issue 10", docs/decisions/0025-group-commit-and-claims.md.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() {
    limit_malloc_arenas();
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
        Command::Worker(args) => cli::worker::main(args, &store_config),
        Command::Workers(cmd) => cli::worker::workers_main(cmd, &store_config),
        Command::Integrations(cmd) => cli::integrations::integrations_main(cmd, &store_config),
        Command::Trigger(args) => cli::integrations::trigger_main(args, &store_config),
        Command::Backfill(args) => cli::integrations::backfill_main(args, &store_config),
        Command::Users(cmd) => cli::users::users_main(cmd, &store_config),
        Command::Tokens(cmd) => cli::users::tokens_main(cmd, &store_config),
        Command::Credentials(cmd) => cli::credentials::main(cmd, &store_config),
    };
    std::process::exit(code);
}
