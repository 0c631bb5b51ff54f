//! What the API and the command line both do to the store: queue a backfill's runs, queue
//! a repair. One implementation, so `pipe backfill` and `POST /api/v1/backfills` (or
//! `pipe runs repair --queue` and `POST /api/v1/runs/{id}/repair`) cannot drift apart.

use chrono::{DateTime, Utc};
use store::{
    Enqueue, Integration, NewBackfill, QueueFilter, QueueState, RunRow, RunStore, Trigger,
};

/// How far below the integration's priority backfill runs are queued: scheduled runs (and
/// manual triggers) of any integration with a priority within this distance go first.
pub const BACKFILL_PRIORITY_DROP: i64 = 1000;
/// The most runs one backfill may queue.
pub const MAX_BACKFILL_RUNS: usize = 10_000;

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The schedule's ticks from `from` to `to` (both included), or why a backfill of them
/// cannot be made.
pub fn backfill_ticks(
    name: &str,
    spec: &scheduler::ScheduleSpec,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, String> {
    if to < from {
        return Err(format!(
            "`to` ({}) is before `from` ({})",
            time(to),
            time(from)
        ));
    }
    let ticks = scheduler::ticks_between(
        spec,
        from - chrono::Duration::seconds(1),
        to,
        MAX_BACKFILL_RUNS + 1,
    );
    if ticks.is_empty() {
        return Err(format!(
            "the schedule of `{name}` ({}) has no tick between {} and {}",
            spec.describe(),
            time(from),
            time(to)
        ));
    }
    if ticks.len() > MAX_BACKFILL_RUNS {
        return Err(format!(
            "more than {MAX_BACKFILL_RUNS} ticks between {} and {}: backfill a shorter range at a time",
            time(from),
            time(to)
        ));
    }
    Ok(ticks)
}

/// Record a backfill and queue one run per tick (below the integration's priority); its id.
pub fn queue_backfill(
    store: &dyn RunStore,
    i: &Integration,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    ticks: &[DateTime<Utc>],
    max_parallel: u32,
) -> store::Result<i64> {
    let name = &i.name;
    let id = store.create_backfill(
        &NewBackfill {
            integration: name.clone(),
            from,
            to,
            max_parallel: Some(max_parallel),
        },
        Utc::now(),
    )?;
    for t in ticks {
        let mut e = Enqueue::new(name, Trigger::Backfill);
        e.queue = i.queue.clone();
        e.priority = i.priority - BACKFILL_PRIORITY_DROP;
        e.logical_date = Some(*t);
        e.backfill_id = Some(id);
        e.dedup_key = Some(format!("backfill:{id}:{name}@{}", time(*t)));
        store.enqueue(&e, Utc::now())?;
    }
    Ok(id)
}

/// The queue item of a repair of `run`: trigger `repair`, the run's id, its logical date,
/// once per run (a second request joins the first).
pub fn repair_item(run: &RunRow, integration: Option<&Integration>) -> Enqueue {
    let mut e = Enqueue::new(&run.pipeline, Trigger::Repair);
    e.run_id = Some(run.id);
    e.logical_date = run.logical_date;
    e.dedup_key = Some(format!("repair:{}", run.id));
    if let Some(i) = integration {
        e.queue = i.queue.clone();
        e.priority = i.priority;
    }
    e
}

/// Cancel a backfill: its queued runs are removed, its running runs asked to cancel.
/// (removed, asked to cancel); `NotFound` for an unknown backfill.
pub fn cancel_backfill(store: &dyn RunStore, id: i64) -> store::Result<(u64, u64)> {
    if !store.list_backfills(None)?.iter().any(|b| b.id == id) {
        return Err(store::StoreError::not_found(format!(
            "backfill {id} not found"
        )));
    }
    let running: Vec<i64> = store
        .list_queue(&QueueFilter {
            backfill_id: Some(id),
            state: Some(QueueState::Claimed),
            ..Default::default()
        })?
        .into_iter()
        .filter_map(|q| q.run_id)
        .collect();
    let removed = store.cancel_backfill(id, Utc::now())?;
    let mut cancelled = 0;
    for run in running {
        if store.request_cancel(run, Utc::now())? {
            cancelled += 1;
        }
    }
    Ok((removed, cancelled))
}

/// A param value the plan does not accept: which param, and why.
#[derive(Debug, Clone)]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

/// Given param values (text as on the command line, or JSON values) typed by the plan's
/// declarations. With `all_required`, every declared param without a default must be given.
pub fn typed_params<'a>(
    plan: &engine::plan::Plan,
    given: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>,
    all_required: bool,
) -> Result<serde_json::Map<String, serde_json::Value>, ParamError> {
    let mut out = serde_json::Map::new();
    for (name, value) in given {
        let err = |message: String| ParamError {
            param: name.to_string(),
            message,
        };
        let Some(spec) = plan.params.get(name) else {
            let known: Vec<&str> = plan.params.keys().map(String::as_str).collect();
            return Err(err(format!(
                "unknown param `{name}` of `{}` (it declares: {})",
                plan.name,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        };
        let v = match value {
            serde_json::Value::String(text) => engine::params::parse_cli(spec, text),
            other => engine::params::check_value(spec, other),
        }
        .map_err(|e| err(format!("param `{name}`: {e}")))?;
        out.insert(name.to_string(), v);
    }
    if all_required {
        for (name, spec) in &plan.params {
            if spec.default.is_none() && !out.contains_key(name) {
                return Err(ParamError {
                    param: name.clone(),
                    message: format!("param `{name}` is required (it has no default)"),
                });
            }
        }
    }
    Ok(out)
}
