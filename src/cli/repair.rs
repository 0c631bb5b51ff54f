//! `pipe runs repair ID`: run a finished run's failed, cancelled and skipped steps again
//! (and what depends on them) as the next attempt of the same run, reusing what its
//! succeeded steps produced. What runs again, and why, is the runner's
//! [`runner::repair::plan_repair`]; the terminal (progress, summary, signals) is
//! `pipe run`'s.

use super::run::{execute, Terminal};
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
    #[command(flatten)]
    pub terminal: Terminal,
    /// Queue the repair for the running `pipe serve` instead of running it here (it runs
    /// as the run's next attempt on a worker; the run's recorded params are used).
    #[arg(long, conflicts_with = "params")]
    pub queue: bool,
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
    if args.queue {
        return queue_repair(&*store, &repair, args.id);
    }
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
    if !args.terminal.quiet {
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
    execute(&worker, spec, args.terminal, state_dir)
}

/// `--queue`: one queue item (trigger `repair`, the run's id) that a service worker runs as
/// the run's next attempt.
fn queue_repair(store: &dyn store::RunStore, repair: &runner::repair::Repair, id: i64) -> i32 {
    let pipeline = &repair.run.run.pipeline;
    let integration = match store.get_integration(pipeline) {
        Ok(i) => i,
        Err(e) => return usage(format!("cannot read integration `{pipeline}`: {e}")),
    };
    if integration.as_ref().is_some_and(|i| !i.enabled) {
        return usage(format!(
            "integration `{pipeline}` is disabled; nothing is queued (`pipe integrations enable {pipeline}` first)"
        ));
    }
    let e = server::ops::repair_item(&repair.run.run, integration.as_ref());
    match store.enqueue(&e, chrono::Utc::now()) {
        Ok(q) => {
            println!(
                "queued the repair of run {id} (queue item {}{}); `pipe serve` runs it as attempt {}",
                q.id,
                if q.merged { ", already queued" } else { "" },
                repair.run.run.attempt + 1
            );
            0
        }
        Err(e) => {
            eprintln!("error: cannot queue the repair: {e}");
            1
        }
    }
}
