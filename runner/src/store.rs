//! Every access of the runner to the run store, in one place.
//!
//! Why one module: what the runner asks of the store — mark runs of lost owners abandoned,
//! record a new run (or the next attempt of one, a repair) owned by a lease, keep the
//! pipeline text it ran, the event writer, the reader steps get — is these few functions,
//! so a change of the store (another backend, a remote API for remote workers) is this file.
//!
//! The store's clients block (SQLite; PostgreSQL's client must not run on an async worker
//! thread), so everything here is called from `spawn_blocking`.

use crate::PrepareError;
use engine::plan::Plan;
use std::sync::{Arc, Mutex};
use store::{HistoryReader, HistoryWriter, LeaseKeeper, LeaseOwner, NewRun, Owner, RunStore};

pub use store::{StoreConfig, Trigger};

/// Where runs recorded before the store kept their pipeline text kept it: a file in the
/// run folder (a repair of such a run still reads it).
pub const PIPELINE_SNAPSHOT: &str = "pipeline.yaml";
/// Beside it: the pipeline file's absolute path when the run started (one line).
pub const PIPELINE_PATH: &str = "pipeline.path";

/// The store of a runner: opened on first use (a dry run never opens it), or given.
pub(crate) struct StoreHandle {
    config: StoreConfig,
    store: Mutex<Option<Arc<dyn RunStore>>>,
    /// The lease that owns this runner's runs (a service's worker keeps it renewed);
    /// `None`: each run takes a lease of its own for as long as it runs.
    lease_owner: Option<String>,
}

/// What a new run records.
pub(crate) struct NewRecord<'a> {
    pub plan: &'a Plan,
    /// The pipeline text that was validated, redacted, kept in the store with the run.
    pub source: Option<&'a str>,
    pub params: serde_json::Value,
    pub trigger: Trigger,
    pub logical_date: chrono::DateTime<chrono::Utc>,
    pub queue_item: Option<i64>,
    /// Continue this finished run as its next attempt instead of creating one.
    pub resume: Option<i64>,
    /// The lease that owns the run (else the handle's, else one of the run's own).
    pub lease_owner: Option<String>,
    /// The queue claim's fencing token: the run is created under it and its history
    /// writes are fenced.
    pub fence: Option<i64>,
}

/// What a run keeps of its pipeline: the text (already redacted by the caller) and the
/// file's absolute path, so a repair resolves relative paths as the run did.
pub(crate) fn run_source(plan: &Plan, text: &str) -> store::RunSource {
    let file = std::path::absolute(&plan.file).unwrap_or(plan.file.clone());
    store::RunSource {
        text: text.to_string(),
        path: file.display().to_string(),
    }
}

/// Keep the final text of a run (redacted with everything it masked); the caller skips it
/// when the store already had exactly this text for the run at its start. Best effort:
/// without it, a repair says the text is missing. Blocking.
pub(crate) fn keep_pipeline_text(store: &dyn RunStore, run_id: i64, plan: &Plan, text: &str) {
    let _ = store.set_run_source(run_id, &run_source(plan, text));
}

/// A run recorded in the store, with its event writer.
pub(crate) struct Recorded {
    pub run_id: i64,
    pub attempt: u32,
    pub run_dir: std::path::PathBuf,
    pub writer: Arc<HistoryWriter>,
    /// What steps may read of the history (the writer's events so far included).
    pub reader: Arc<dyn engine::step::HistoryView>,
    /// The run's own lease, renewed until the run is over (none under a worker's lease).
    pub lease: Option<LeaseKeeper>,
    /// Its writes are fenced ([`HistoryWriter::fenced_out`] says when they are refused).
    pub fenced: bool,
    /// The store held the run's text at the start and the run references it.
    pub source_kept: bool,
    pub store: Arc<dyn RunStore>,
}

impl StoreHandle {
    pub fn new(
        config: StoreConfig,
        store: Option<Arc<dyn RunStore>>,
        lease_owner: Option<String>,
    ) -> Self {
        StoreHandle {
            config,
            store: Mutex::new(store),
            lease_owner,
        }
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.config.state_dir
    }

    /// The stored credentials, sealed with the master key from the environment or the state
    /// dir (`None` when none is set: resolving then says how to set one).
    pub fn vault(
        &self,
        connections: &engine::connection::Connections,
    ) -> Result<credentials::Vault, PrepareError> {
        let key = credentials::load_key(&self.config.state_dir)
            .map_err(|e| PrepareError::Credential(e.to_string()))?
            .map(|(key, _)| key);
        Ok(credentials::Vault::new(
            self.get()?,
            connections.clone(),
            key,
        ))
    }

    fn get(&self) -> Result<Arc<dyn RunStore>, PrepareError> {
        let mut slot = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = store::open(&self.config).map_err(|e| {
            PrepareError::History(format!(
                "cannot open run history in {}: {e:#}",
                self.config.state_dir.display()
            ))
        })?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Mark runs of lost owners abandoned, then record a `running` run (or the next attempt
    /// of `resume`) owned by a lease, keep the pipeline text, and start the event writer.
    pub fn record_run(&self, new: NewRecord) -> Result<Recorded, PrepareError> {
        let store = self.get()?;
        let given = new.lease_owner.clone().or_else(|| self.lease_owner.clone());
        let lease = match &given {
            Some(_) => None,
            None => Some(
                LeaseKeeper::start(
                    store.clone(),
                    LeaseOwner::this_process("run"),
                    store::lease_period(),
                )
                .map_err(|e| {
                    PrepareError::History(format!("cannot record the run's owner: {e:#}"))
                })?,
            ),
        };
        let owner = given.or_else(|| lease.as_ref().map(|l| l.owner().id.clone()));
        // A lone `pipe run` looks for dead owners' runs as every pipe command does; a
        // service's worker leaves that to its server, which expires them every lease period
        // (a scan per run start was a third of a busy server's time).
        if self.lease_owner.is_none() {
            let _ = store.mark_abandoned();
        }
        let (run_id, attempt, source_kept) = match new.resume {
            Some(id) => {
                let attempt = store
                    .start_attempt(id, owner.as_deref(), chrono::Utc::now())
                    .map_err(|e| PrepareError::History(format!("cannot repair run {id}: {e:#}")))?;
                // A repair keeps the text of the run's start.
                (id, attempt, true)
            }
            None => {
                // A service recorded the integration (and its description) when it loaded
                // the file; a lone run records it here. `create_run` makes a missing row.
                let described = if self.lease_owner.is_none() {
                    store.upsert_integration(&new.plan.name, new.plan.description.as_deref())
                } else {
                    Ok(())
                };
                let created = described
                    .and_then(|_| {
                        store.create_run_kept(&NewRun {
                            params: new.params,
                            logical_date: Some(new.logical_date),
                            lease_owner: owner,
                            queue_item: new.queue_item,
                            fence: new.fence,
                            source: new.source.map(|text| run_source(new.plan, text)),
                            ..NewRun::new(new.plan.name.clone(), new.trigger, Owner::Pipe)
                        })
                    })
                    .map_err(|e| PrepareError::History(format!("cannot record the run: {e:#}")))?;
                (created.id, 1, created.source_kept)
            }
        };
        let run_dir = store.run_dir(run_id);
        let fence = new.fence.filter(|_| new.resume.is_none());
        let writer = match fence {
            Some(f) => HistoryWriter::start_fenced(store.clone(), run_id, f),
            None => HistoryWriter::start(store.clone(), run_id),
        }
        .map(Arc::new)
        .map_err(|e| PrepareError::History(format!("cannot write run history: {e:#}")))?;
        let reader = Arc::new(HistoryReader {
            store: store.clone(),
            writer: Some(writer.clone()),
        });
        Ok(Recorded {
            run_id,
            attempt,
            run_dir,
            writer,
            reader,
            lease,
            fenced: fence.is_some(),
            source_kept,
            store,
        })
    }
    /// Record a run that could not start (or, with `resume`, that run's next attempt) as
    /// `failed` with `error`, which is also its one log row ([`crate::Runner::record_unstartable`]).
    /// Blocking.
    pub fn record_unstartable(
        &self,
        mut new: NewRun,
        resume: Option<i64>,
        error: &str,
    ) -> Result<i64, PrepareError> {
        let store = self.get()?;
        let history = |e: store::StoreError| {
            PrepareError::History(format!("cannot record the run that could not start: {e:#}"))
        };
        new.lease_owner = new.lease_owner.or_else(|| self.lease_owner.clone());
        let run_id = match resume {
            Some(id) => {
                store
                    .start_attempt(id, new.lease_owner.as_deref(), chrono::Utc::now())
                    .map_err(history)?;
                id
            }
            None => store.create_run_kept(&new).map_err(history)?.id,
        };
        store
            .add_log(
                run_id,
                &engine::events::LogRecord {
                    time: chrono::Utc::now(),
                    level: engine::events::Level::Error,
                    step: None,
                    message: error.to_string(),
                    description: None,
                    file: None,
                },
            )
            .map_err(history)?;
        store
            .finish_run(run_id, engine::status::Status::Failed, Some(error), true)
            .map_err(history)?;
        Ok(run_id)
    }
}

/// Drain the writer once the run is over; the error, if the history may be incomplete. When
/// a step abandoned after its cancellation still holds the writer, what was sent so far is
/// committed and the writer closes when the last holder lets go. The run's own lease is
/// released only then. Blocking (joins the writer's thread).
pub(crate) fn finish(writer: Arc<HistoryWriter>, lease: Option<LeaseKeeper>) -> Option<String> {
    let error = match Arc::try_unwrap(writer) {
        Ok(w) => w.finish().err().map(|e| format!("{e:#}")),
        Err(shared) => {
            shared.flush();
            None
        }
    };
    drop(lease);
    error
}

/// A recorded run that will not start (a worker drained before it): finish it as
/// `cancelled` now rather than leaving it `running` until its lease expires. Blocking.
pub(crate) fn discard(r: Recorded, why: &str) -> Result<(), String> {
    let Recorded {
        run_id,
        writer,
        lease,
        store,
        ..
    } = r;
    let _ = finish(writer, None);
    let result = store
        .finish_run(run_id, engine::status::Status::Cancelled, Some(why), true)
        .map_err(|e| format!("cannot finish run {run_id}: {e:#}"));
    drop(lease);
    result
}
