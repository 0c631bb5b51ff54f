//! Repairing a finished run (Databricks' "repair run"): the steps that did not succeed run
//! again as the next attempt of the same run, and the succeeded ones are reused from
//! history (their recorded outputs; their tables when the pipeline keeps them).
//!
//! What runs again is [`engine::repair::select`]'s rule. The repair runs the pipeline as it
//! was when the run started: the runner keeps the file's text with the run in the store
//! ([`store::RunStore::run_source`], with the file's original path so paths relative to
//! the pipeline's folder still resolve; runs recorded before that kept `pipeline.yaml` and
//! `pipeline.path` in their folder), not whatever the file says today. Params and
//! the logical date are the run's own; params recorded masked (a secret was passed as one)
//! must be given again.

use crate::store::{PIPELINE_PATH as SNAPSHOT_PATH_FILE, PIPELINE_SNAPSHOT as SNAPSHOT_FILE};
use ::store::{RunDetail, RunStore};
use engine::executor::{kept_table_path, ReusedStep};
use engine::plan::Plan;
use engine::repair::{select, PreviousStep};
use engine::status::Status;
use engine::step::Registry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a run cannot be repaired. The `Display` is what `pipe runs repair` prints.
#[derive(Debug)]
#[non_exhaustive]
pub enum RepairError {
    NoRun(i64),
    StillRunning(i64),
    NothingToRepair(i64, Status),
    /// Neither the store nor the run folder keeps the text of its pipeline (an external
    /// run, one recorded before repairs existed, or one killed before its end whose text
    /// the store never held).
    NoSnapshot(i64),
    /// The snapshot no longer validates (a step type was removed since, say).
    Invalid(String),
    Store(String),
}

impl std::fmt::Display for RepairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepairError::NoRun(id) => write!(f, "no run {id}"),
            RepairError::StillRunning(id) => write!(
                f,
                "run {id} is still running: repair it once it has finished (or cancel it)"
            ),
            RepairError::NothingToRepair(id, s) => {
                write!(f, "run {id} {}: nothing to repair", s.label())
            }
            RepairError::NoSnapshot(id) => write!(
                f,
                "run {id} cannot be repaired: no copy of its pipeline was kept (an external run, one recorded before repairs existed, or the first run of a new file that ended before it could keep it); run the pipeline again instead (`pipe run FILE`, or `pipe trigger NAME` on the service)"
            ),
            RepairError::Invalid(e) => write!(f, "{e}"),
            RepairError::Store(e) => write!(f, "run history: {e}"),
        }
    }
}

impl std::error::Error for RepairError {}

/// A repair ready to run: the plan of the run's snapshot, what runs again (with why) and
/// what is reused.
pub struct Repair {
    pub run: RunDetail,
    pub plan: Arc<Plan>,
    /// The steps that run again, in plan order, with the reason.
    pub rerun: Vec<(String, String)>,
    /// The steps kept from earlier attempts (for the executor).
    pub reuse: HashMap<String, ReusedStep>,
}

/// Work out the repair of run `id`. Blocking (store and files).
pub fn plan_repair(
    store: &dyn RunStore,
    registry: &Registry,
    id: i64,
) -> Result<Repair, RepairError> {
    let run = store
        .get_run(id)
        .map_err(|e| RepairError::Store(e.to_string()))?
        .ok_or(RepairError::NoRun(id))?;
    match run.run.status {
        Status::Running => return Err(RepairError::StillRunning(id)),
        s if s.is_success() => return Err(RepairError::NothingToRepair(id, s)),
        _ => {}
    }
    let dir = store.run_dir(id);
    let kept = store
        .run_source(id)
        .map_err(|e| RepairError::Store(e.to_string()))?;
    let (text, original) = match kept {
        Some(s) => (s.text, PathBuf::from(s.path)),
        // A run recorded before the store kept pipeline texts kept it in its folder.
        None => {
            let snapshot = dir.join(SNAPSHOT_FILE);
            let Ok(text) = std::fs::read_to_string(&snapshot) else {
                return Err(RepairError::NoSnapshot(id));
            };
            let original = std::fs::read_to_string(dir.join(SNAPSHOT_PATH_FILE))
                .map(|p| PathBuf::from(p.trim()))
                .unwrap_or_else(|_| snapshot.clone());
            (text, original)
        }
    };
    let display = format!("{} (as run {id} started)", original.display());
    let outcome = engine::validate::validate_text(&text, &original, &display, registry);
    let Some(plan) = outcome.plan else {
        let problems: Vec<String> = outcome
            .diagnostics
            .iter()
            .filter(|d| d.severity == engine::diag::Severity::Error)
            .map(|d| d.to_string())
            .collect();
        return Err(RepairError::Invalid(format!(
            "run {id}'s pipeline no longer validates:\n{}",
            problems.join("\n")
        )));
    };
    let plan = Arc::new(plan);
    let latest = run.latest_steps();
    let mut table_ok: HashMap<String, bool> = plan
        .steps
        .iter()
        .map(|s| (s.id.clone(), kept_table_path(&dir, &s.id).is_file()))
        .collect();
    // A kept table that cannot be read makes its step run again: choose, load what the
    // re-run steps read, and choose again without the tables that failed.
    loop {
        let previous = |step: &str| {
            latest
                .iter()
                .find(|r| r.step == step)
                .map(|r| PreviousStep {
                    status: r.status,
                    outputs: r.outputs.clone(),
                    table_kept: table_ok.get(step).copied().unwrap_or(false),
                })
        };
        let selection = select(&plan, &previous);
        let mut reuse = HashMap::new();
        let mut unreadable = Vec::new();
        for &i in &selection.reuse {
            let step = &plan.steps[i];
            let Some(row) = latest.iter().find(|r| r.step == step.id) else {
                continue;
            };
            let read_by_rerun = selection.rerun.iter().any(|(k, _)| {
                let s = &plan.steps[*k].spec;
                s.input.as_deref() == Some(step.id.as_str()) || s.inputs.contains(&step.id)
            });
            let table = match (&plan.table_ops, read_by_rerun && table_ok[&step.id]) {
                (Some(ops), true) => match ops.load(&kept_table_path(&dir, &step.id)) {
                    Ok(t) => Some(t),
                    Err(_) => {
                        unreadable.push(step.id.clone());
                        None
                    }
                },
                _ => None,
            };
            reuse.insert(
                step.id.clone(),
                ReusedStep {
                    record: engine::events::StepRecord {
                        step: row.step.clone(),
                        kind: row.kind.clone().unwrap_or_else(|| step.spec.kind.clone()),
                        status: row.status,
                        attempts: row.attempts,
                        started_at: row.started_at,
                        finished_at: row.finished_at,
                        duration_ms: row.duration_ms.unwrap_or(0),
                        rows: row.rows,
                        error: row.error.clone(),
                        outputs: row.outputs.clone(),
                    },
                    table,
                    attempt: row.run_attempt,
                },
            );
        }
        if !unreadable.is_empty() {
            for id in unreadable {
                table_ok.insert(id, false);
            }
            continue;
        }
        let rerun = selection
            .rerun
            .iter()
            .map(|(i, why)| (plan.steps[*i].id.clone(), why.clone()))
            .collect();
        return Ok(Repair {
            run,
            plan,
            rerun,
            reuse,
        });
    }
}
