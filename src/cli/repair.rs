//! `pipe runs repair ID`: run a finished run's failed, cancelled and skipped steps again
//! (and what depends on them) as the next attempt of the same run, reusing what its
//! succeeded steps produced. What runs again, and why, is the runner's
//! [`runner::repair::plan_repair`]; the terminal (progress, summary, signals) is
//! `pipe run`'s.

use super::run::{execute, Terminal};
use super::Format;
use runner::{ParamValue, PlanSource, RunSpec, Runner};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// The run id.
    pub id: i64,
    /// A param value for this attempt, `name=value` (repeatable): needed for a param the
    /// run recorded masked; the others keep the run's values.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Steps at once (default: the pipeline's `concurrency`, else the number of CPUs).
    #[arg(long)]
    pub concurrency: Option<usize>,
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

fn usage(msg: impl std::fmt::Display) -> i32 {
    eprintln!("error: {msg}");
    2
}

pub fn main(args: RepairArgs, state_dir: &Path, db: Option<&str>) -> i32 {
    let mut config = runner::RunnerConfig::new(state_dir);
    config.db = db.map(str::to_string);
    config.registry = Arc::new(super::registry());
    let registry = config.registry.clone();
    let store = match store::open(&store::StoreConfig {
        url: db.map(str::to_string),
        state_dir: state_dir.to_path_buf(),
    }) {
        Ok(s) => s,
        Err(e) => return usage(format!("cannot open run history: {e}")),
    };
    let _ = store.mark_abandoned();
    let repair = match runner::repair::plan_repair(&*store, &registry, args.id) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    config.store = Some(store);
    let worker = Runner::new(config);

    // The run's own params, unless given again; a masked one must be given again.
    let mut given: Vec<(String, ParamValue)> = Vec::new();
    for item in &args.params {
        let Some((name, text)) = item.split_once('=') else {
            return usage(format!("--param expects NAME=VALUE, got `{item}`"));
        };
        given.push((name.to_string(), ParamValue::Text(text.to_string())));
    }
    let mut params = given.clone();
    if let serde_json::Value::Object(recorded) = &repair.run.run.params {
        for (name, value) in recorded {
            if given.iter().any(|(n, _)| n == name) {
                continue;
            }
            if value.to_string().contains(engine::secrets::MASK) {
                return usage(format!(
                    "run {} recorded param `{name}` masked (it held a secret): give it again with --param {name}=VALUE",
                    args.id
                ));
            }
            params.push((name.clone(), ParamValue::Json(value.clone())));
        }
    }
    if !args.quiet {
        for (step, why) in &repair.rerun {
            eprintln!("repair: `{step}` runs again: {why}");
        }
        let mut kept: Vec<&String> = repair.reuse.keys().collect();
        kept.sort();
        for step in kept {
            eprintln!("repair: `{step}` is reused");
        }
    }
    let mut spec = RunSpec::new(PlanSource::Plan(repair.plan.clone()));
    spec.trigger = repair.run.run.trigger;
    spec.params = params;
    spec.logical_date = repair.run.run.logical_date;
    spec.concurrency = args.concurrency;
    spec.resume = Some(args.id);
    spec.reuse = repair.reuse;
    execute(
        &worker,
        spec,
        Terminal {
            format: args.format,
            quiet: args.quiet,
            verbose: args.verbose,
        },
        state_dir,
    )
}
