//! Every access of the runner to the run history, in one place.
//!
//! Why one module: the history is moving from `engine::history::Store` (SQLite under the
//! state dir) to the `store` crate's `RunStore` trait (SQLite or PostgreSQL, leases instead
//! of pids). Everything the runner asks of it — mark dead runs abandoned, record a new run,
//! the event writer, the reader steps get — goes through the few functions here, so that
//! switch is this file.

use crate::PrepareError;
use engine::history::{HistoryReader, HistoryWriter, NewRun, Owner, Store};
use engine::plan::Plan;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use engine::history::Trigger;

/// A run recorded in the history, with its event writer.
pub(crate) struct Recorded {
    pub run_id: i64,
    pub run_dir: PathBuf,
    pub writer: Arc<HistoryWriter>,
    /// What steps may read of the history (the writer's events so far included).
    pub reader: Arc<dyn engine::step::HistoryView>,
}

/// Mark runs whose owner died abandoned, then record a new `running` run of `plan` (its
/// integration upserted) and start its event writer. Blocking (SQLite): call it off the
/// async threads.
pub(crate) fn record_run(
    state_dir: &Path,
    plan: &Plan,
    params: serde_json::Value,
    trigger: Trigger,
    logical_date: chrono::DateTime<chrono::Utc>,
) -> Result<Recorded, PrepareError> {
    let store = Store::open(state_dir).map_err(|e| {
        PrepareError::History(format!(
            "cannot open run history in {}: {e:#}",
            state_dir.display()
        ))
    })?;
    let _ = store.mark_abandoned();
    let run_id = store
        .upsert_integration(&plan.name, plan.description.as_deref())
        .and_then(|_| {
            store.create_run(&NewRun {
                pipeline: plan.name.clone(),
                params,
                trigger,
                owner: Owner::Pipe,
                logical_date: Some(logical_date),
            })
        })
        .map_err(|e| PrepareError::History(format!("cannot record the run: {e:#}")))?;
    let run_dir = store.run_dir(run_id);
    let writer = HistoryWriter::start(state_dir, run_id)
        .map(Arc::new)
        .map_err(|e| PrepareError::History(format!("cannot write run history: {e:#}")))?;
    let reader = Arc::new(HistoryReader {
        state_dir: state_dir.to_path_buf(),
        writer: Some(writer.clone()),
    });
    Ok(Recorded {
        run_id,
        run_dir,
        writer,
        reader,
    })
}

/// Drain the writer once the run is over; the error, if the history may be incomplete.
/// When a step abandoned after its cancellation still holds the writer, it closes when the
/// last holder lets go (as before). Blocking (joins the writer's thread).
pub(crate) fn finish(writer: Arc<HistoryWriter>) -> Option<String> {
    match Arc::try_unwrap(writer) {
        Ok(w) => w.finish().err().map(|e| format!("{e:#}")),
        Err(_) => None,
    }
}
