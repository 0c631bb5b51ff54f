//! The executor: runs a [`Plan`] on tokio.
//!
//! Steps start as soon as everything they depend on is done, at most `concurrency` at once.
//! The plan stays immutable; this module owns the run's state: each finished step's value
//! (outputs and built-ins, what `steps.<id>` shows templates), the tables steps hand each
//! other, and cancellation. Semantics follow GitHub Actions: a step whose dependency failed
//! or was skipped is skipped, unless it is `always: true` (teardown), which runs whatever
//! happened before it, even after Ctrl-C. Every string that leaves a step passes the
//! redactor before it is emitted.

use crate::events::{Level, LogRecord, Observer, RunEvent, StepRecord};
use crate::plan::Plan;
use crate::secrets::Redactor;
use crate::status::Status;
use crate::step::{StepContext, StepError, StepOutput, Table};
use crate::template::{Scope, Templates};
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use indexmap::IndexMap;
use minijinja::value::{Enumerator, Object, Value as TValue};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a cancelled step gets to stop (kill its children) before it is abandoned.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

pub struct RunRequest {
    pub plan: Arc<Plan>,
    /// The values templates see as `params`.
    pub params: TValue,
    /// `run` in templates.
    pub run: TValue,
    pub run_id: i64,
    pub concurrency: usize,
    pub run_dir: PathBuf,
    pub templates: Arc<Templates>,
    pub redactor: Redactor,
    pub observer: Arc<dyn Observer>,
    /// Ctrl-C/SIGTERM: cancels running steps; teardown steps still run.
    pub cancel: CancellationToken,
    /// A second Ctrl-C: cancels teardown steps too.
    pub hard_cancel: CancellationToken,
    /// What steps may read of the run history.
    pub history: Option<Arc<dyn crate::step::HistoryView>>,
    /// When the run started (`run.started_at`).
    pub started_at: DateTime<Utc>,
    /// What the worker shares between its runs (token caches).
    pub resources: Arc<crate::step::Resources>,
    /// `pipe runs repair`: steps settled by an earlier attempt of this run, by id. They do
    /// not run again: their recorded outputs are what `steps.<id>` shows and their table
    /// (when one was kept) is what later steps read. Empty for a first attempt.
    pub reuse: HashMap<String, ReusedStep>,
}

/// A step of an earlier attempt that a repair keeps (see [`crate::repair`]).
#[derive(Clone)]
pub struct ReusedStep {
    /// Its record from the attempt that ran it.
    pub record: StepRecord,
    /// Its table, read back from the run folder (`keep_tables:`).
    pub table: Option<Table>,
    /// The attempt it comes from.
    pub attempt: u32,
}

/// Where `keep_tables:` writes step `id`'s table in a run folder.
pub fn kept_table_path(run_dir: &std::path::Path, id: &str) -> PathBuf {
    run_dir.join("tables").join(format!("{id}.parquet"))
}

pub struct RunResult {
    pub status: Status,
    pub error: Option<String>,
    /// In plan order.
    pub steps: Vec<StepRecord>,
}

/// `steps` in templates: a read-only view of the finished steps' values.
#[derive(Debug, Default)]
struct StepsView {
    values: RwLock<HashMap<String, TValue>>,
}

impl Object for StepsView {
    fn get_value(self: &Arc<Self>, key: &TValue) -> Option<TValue> {
        self.values.read().unwrap().get(key.as_str()?).cloned()
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<TValue> = self
            .values
            .read()
            .unwrap()
            .keys()
            .map(|k| TValue::from(k.as_str()))
            .collect();
        Enumerator::Values(keys)
    }
}

struct Shared {
    req: RunRequest,
    steps: Arc<StepsView>,
    tables: Mutex<HashMap<String, Table>>,
    /// Per `foreach` step: whether each item (by key text) succeeded, so that a later
    /// `foreach` over the same keys skips the items that failed upstream.
    item_ok: Mutex<HashMap<String, HashMap<String, bool>>>,
    pipeline_dir: PathBuf,
}

impl Shared {
    fn scope(&self) -> Scope {
        Scope::new(
            self.req.params.clone(),
            TValue::from_dyn_object(self.steps.clone()),
            self.req.run.clone(),
        )
    }
    fn log(&self, step: Option<&str>, level: Level, message: String) {
        self.req.observer.event(&RunEvent::Log(LogRecord {
            time: Utc::now(),
            level,
            step: step.map(str::to_string),
            message: self.req.redactor.redact(&message),
            description: None,
            file: None,
        }));
    }
    /// The tables step `i` reads (`input`, then `inputs`), by producing step.
    fn inputs_of(&self, i: usize) -> IndexMap<String, Table> {
        let spec = &self.req.plan.steps[i].spec;
        let tables = self.tables.lock().unwrap();
        spec.input
            .iter()
            .chain(spec.inputs.iter())
            .filter_map(|name| tables.get(name).map(|t| (name.clone(), t.clone())))
            .collect()
    }
    /// The unrendered connection `name` as this run sees it: the plan's, or what the run's
    /// connection overrides make of it (`--sandbox`). The plan itself is never changed.
    fn connection_node(&self, name: &str) -> std::borrow::Cow<'_, crate::yaml::Node> {
        self.req
            .templates
            .runtime()
            .overrides
            .connections
            .node(name, &self.req.plan.connection_nodes[name])
    }
    /// Make a step's value visible to later templates.
    fn publish(&self, id: &str, value: serde_json::Value) {
        self.steps
            .values
            .write()
            .unwrap()
            .insert(id.to_string(), TValue::from_serialize(&value));
    }
}

pub async fn execute(req: RunRequest) -> RunResult {
    let plan = req.plan.clone();
    let n = plan.steps.len();
    // Absolute, so that a bare `pipe run p.yaml` gives its steps "." rather than "".
    let file = std::path::absolute(&plan.file).unwrap_or_else(|_| plan.file.clone());
    let pipeline_dir = file
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."));
    let shared = Arc::new(Shared {
        steps: Arc::new(StepsView::default()),
        tables: Mutex::new(HashMap::new()),
        item_ok: Mutex::new(HashMap::new()),
        pipeline_dir,
        req,
    });
    learn_secrets_up_front(&shared);
    let semaphore = Arc::new(Semaphore::new(shared.req.concurrency.max(1)));

    let mut board = Board::new(&plan);
    let mut running: JoinSet<(usize, StepRecord)> = JoinSet::new();

    while board.done < n {
        while let Some(i) = board.ready.pop_front() {
            if let Some(reused) = shared.req.reuse.get(&plan.steps[i].id) {
                let record = reuse(&shared, i, reused);
                board.settle(i, record);
                continue;
            }
            match board.decide(&plan, i, shared.req.cancel.is_cancelled()) {
                Some((status, why)) => {
                    let record = not_run(&shared, i, status, &why);
                    board.finish(i, record, &shared);
                }
                None => {
                    let shared = shared.clone();
                    let semaphore = semaphore.clone();
                    running.spawn(async move {
                        let _permit = semaphore
                            .acquire_owned()
                            .await
                            .expect("semaphore is never closed");
                        // A panic anywhere in the step (a bug) fails that step only: the run
                        // goes on to its teardown steps and records itself.
                        let record =
                            match AssertUnwindSafe(run_step(&shared, i)).catch_unwind().await {
                                Ok(record) => record,
                                Err(payload) => panicked(&shared, i, &panic_message(&*payload)),
                            };
                        (i, record)
                    });
                }
            }
        }
        if board.done >= n {
            break;
        }
        match running.join_next().await {
            Some(Ok((i, record))) => board.finish(i, record, &shared),
            Some(Err(e)) => {
                // A step task panicked: the panic hook has printed it; record the run as failed.
                board
                    .first_failure
                    .get_or_insert_with(|| format!("a step panicked: {e}"));
                break;
            }
            None => break,
        }
    }

    let Board {
        records,
        first_failure,
        ..
    } = board;
    let steps: Vec<StepRecord> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| not_run(&shared, i, Status::Cancelled, "not run")))
        .collect();
    let status = if shared.req.cancel.is_cancelled() {
        Status::Cancelled
    } else if first_failure.is_some() || steps.iter().any(|s| s.status == Status::Failed) {
        Status::Failed
    } else if steps.iter().any(|s| s.status == Status::Warning) {
        Status::Warning
    } else {
        Status::Succeeded
    };
    let error = match status {
        Status::Cancelled => Some(
            first_failure
                .map(|f| format!("cancelled (before that: {f})"))
                .unwrap_or_else(|| "cancelled".to_string()),
        ),
        _ => first_failure,
    };
    let error = error.map(|e| shared.req.redactor.redact(&e));
    shared.req.observer.event(&RunEvent::RunFinished {
        status,
        error: error.clone(),
        at: Utc::now(),
    });
    RunResult {
        status,
        error,
        steps,
    }
}

/// The scheduler's state: which steps are done, how, and which are ready to start.
struct Board {
    records: Vec<Option<StepRecord>>,
    /// How many unfinished dependencies each step still waits for.
    waiting: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    ready: VecDeque<usize>,
    done: usize,
    /// The run's error: the first step that failed, in time.
    first_failure: Option<String>,
}

impl Board {
    fn new(plan: &Plan) -> Board {
        let n = plan.steps.len();
        let waiting: Vec<usize> = plan.steps.iter().map(|s| s.deps.len()).collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, s) in plan.steps.iter().enumerate() {
            for &d in &s.deps {
                dependents[d].push(i);
            }
        }
        let ready = (0..n).filter(|&i| waiting[i] == 0).collect();
        Board {
            records: vec![None; n],
            waiting,
            dependents,
            ready,
            done: 0,
            first_failure: None,
        }
    }

    /// Whether a ready step runs (`None`) or is settled without running, and why.
    fn decide(&self, plan: &Plan, i: usize, cancelled: bool) -> Option<(Status, String)> {
        let step = &plan.steps[i];
        if step.spec.always {
            return None;
        }
        if cancelled {
            return Some((
                Status::Cancelled,
                "the run was cancelled before this step started".to_string(),
            ));
        }
        let d = *step.deps.iter().find(|&&d| {
            !self.records[d]
                .as_ref()
                .is_some_and(|r| r.status.is_success())
        })?;
        let r = self.records[d].as_ref().expect("dependencies finish first");
        let status = if r.status == Status::Cancelled {
            Status::Cancelled
        } else {
            Status::Skipped
        };
        Some((
            status,
            format!("`{}` {}", plan.steps[d].id, r.status.label()),
        ))
    }

    fn finish(&mut self, i: usize, record: StepRecord, shared: &Shared) {
        if record.status == Status::Failed && self.first_failure.is_none() {
            self.first_failure = Some(format!(
                "step `{}` failed: {}",
                record.step,
                record.error.as_deref().unwrap_or("unknown error")
            ));
        }
        shared
            .req
            .observer
            .event(&RunEvent::StepFinished(record.clone()));
        self.settle(i, record);
    }

    /// Record step `i` as done (its event, if any, already sent) and release its dependents.
    fn settle(&mut self, i: usize, record: StepRecord) {
        self.records[i] = Some(record);
        self.done += 1;
        for &k in &self.dependents[i] {
            self.waiting[k] -= 1;
            if self.waiting[k] == 0 {
                self.ready.push_back(k);
            }
        }
    }
}

fn builtins(record: &StepRecord) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("status".into(), record.status.as_str().into());
    m.insert("succeeded".into(), record.status.is_success().into());
    m.insert("started_at".into(), record.started_at.map(rfc3339).into());
    m.insert("finished_at".into(), record.finished_at.map(rfc3339).into());
    m.insert("attempts".into(), record.attempts.into());
    m.insert("rows".into(), record.rows.into());
    m.insert("error".into(), record.error.clone().into());
    m
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A step an earlier attempt settled: its recorded values and table become this attempt's,
/// and one log row says so. Its own history rows stay those of the attempt that ran it.
fn reuse(shared: &Shared, i: usize, reused: &ReusedStep) -> StepRecord {
    let id = &shared.req.plan.steps[i].id;
    if let Some(table) = &reused.table {
        shared
            .tables
            .lock()
            .unwrap()
            .insert(id.clone(), table.clone());
    }
    let mut visible = match &reused.record.outputs {
        serde_json::Value::Object(m) => m.clone(),
        _ => Default::default(),
    };
    visible.extend(builtins(&reused.record));
    shared.publish(id, serde_json::Value::Object(visible));
    let table = if reused.table.is_some() {
        " and its kept table"
    } else {
        ""
    };
    shared.log(
        Some(id),
        Level::Info,
        format!(
            "{} in attempt {}: not run again (its outputs{table} are reused)",
            reused.record.status.label(),
            reused.attempt
        ),
    );
    reused.record.clone()
}

/// A step that never started (skipped, or cancelled before it began).
fn not_run(shared: &Shared, i: usize, status: Status, why: &str) -> StepRecord {
    let id = &shared.req.plan.steps[i].id;
    let record = StepRecord {
        step: id.clone(),
        kind: shared.req.plan.steps[i].spec.kind.clone(),
        status,
        attempts: 0,
        started_at: None,
        finished_at: None,
        duration_ms: 0,
        rows: None,
        error: None,
        outputs: serde_json::Value::Object(Default::default()),
    };
    shared.log(Some(id), Level::Info, format!("{} ({why})", status.label()));
    shared.publish(id, serde_json::Value::Object(builtins(&record)));
    record
}

/// Debug builds only: a step whose id this variable names panics when it starts, so that
/// the tests of the real binary can see what a panic inside a step does.
const DEBUG_PANIC_VAR: &str = "PIPE_DEBUG_PANIC_IN_STEP";

fn debug_panic_requested(step: &str) -> bool {
    cfg!(debug_assertions) && std::env::var(DEBUG_PANIC_VAR).is_ok_and(|v| v == step)
}

/// What a caught panic says (its payload is a `&str` or a `String` when it has a message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The error of a step in which pipe panicked.
fn panic_error(message: &str) -> String {
    format!("pipe panicked in this step (a bug in pipe; please report it): {message}")
}

/// The record of a step whose task panicked outside the step's own code (the bookkeeping
/// around it): failed, with the panic's message.
fn panicked(shared: &Shared, i: usize, message: &str) -> StepRecord {
    let id = &shared.req.plan.steps[i].id;
    let error = shared.req.redactor.redact(&panic_error(message));
    let now = Utc::now();
    let record = StepRecord {
        step: id.clone(),
        kind: shared.req.plan.steps[i].spec.kind.clone(),
        status: Status::Failed,
        attempts: 1,
        started_at: Some(now),
        finished_at: Some(now),
        duration_ms: 0,
        rows: None,
        error: Some(error.clone()),
        outputs: serde_json::Value::Object(Default::default()),
    };
    shared.log(Some(id), Level::Error, format!("failed: {error}"));
    shared.publish(id, serde_json::Value::Object(builtins(&record)));
    record
}

async fn run_step(shared: &Shared, i: usize) -> StepRecord {
    let step = &shared.req.plan.steps[i];
    let id = step.id.as_str();
    let started = Utc::now();
    let clock = Instant::now();
    let scope = shared.scope();
    let redactor = &shared.req.redactor;
    let record = StepRecord {
        step: id.to_string(),
        kind: shared.req.plan.steps[i].spec.kind.clone(),
        status: Status::Failed,
        attempts: 0,
        started_at: Some(started),
        finished_at: None,
        duration_ms: 0,
        rows: None,
        error: None,
        outputs: serde_json::Value::Object(Default::default()),
    };
    // A step with secret outputs may print the secret before pipe knows it is one (a login
    // step echoing its token): its log rows are held until the outputs are known, then
    // redacted again and released.
    let holding = step
        .spec
        .outputs
        .values()
        .any(|o| o.secret())
        .then(|| Arc::new(Holding::new(shared.req.observer.clone())));
    let inner: Arc<dyn Observer> = match &holding {
        Some(h) => h.clone(),
        None => shared.req.observer.clone(),
    };
    let warned = Arc::new(WarningRows::new(inner));
    let observer: Arc<dyn Observer> = warned.clone();
    let record = run_attempts(shared, i, &observer, &warned, record, scope, clock).await;
    if let Some(h) = holding {
        h.release(redactor);
    }
    record
}

async fn run_attempts(
    shared: &Shared,
    i: usize,
    observer: &Arc<dyn Observer>,
    warned: &WarningRows,
    mut record: StepRecord,
    scope: Scope,
    clock: Instant,
) -> StepRecord {
    let step = &shared.req.plan.steps[i];
    let id = step.id.as_str();
    let redactor = &shared.req.redactor;

    let outcome = match &step.spec.foreach {
        None => run_once(shared, i, observer, &scope, None, &mut record.attempts)
            .await
            .map(|o| o.map(|(out, n)| (out, n, false))),
        Some(foreach) => run_foreach(shared, i, observer, warned, &scope, foreach).await,
    };

    let finished = Utc::now();
    record.finished_at = Some(finished);
    record.duration_ms = clock.elapsed().as_millis() as u64;
    match outcome {
        Ok(None) => {
            record.status = Status::Skipped;
            record.started_at = None;
            record.finished_at = None;
            shared.log(
                Some(id),
                Level::Info,
                "skipped (its `if:` is false)".to_string(),
            );
        }
        Ok(Some((out, attempts, derived_done))) => {
            record.attempts = attempts;
            // Rows: of the table it produced, else the rows it says it handled (a load).
            record.rows = out
                .table
                .as_ref()
                .map(|t| t.rows())
                .or_else(|| out.outputs.get("rows").and_then(|r| r.as_u64()))
                .or_else(|| out.outputs.get("records").and_then(|r| r.as_u64()));
            record.status = if out.warnings.is_empty() {
                Status::Succeeded
            } else {
                Status::Warning
            };
            // Steps log most warnings as they happen; the others get a row now.
            for w in &out.warnings {
                if !warned.logged(w, redactor) {
                    shared.log(Some(id), Level::Warning, w.clone());
                }
            }
            let mut values = out.outputs.clone();
            // Derived outputs: templates over the result object (a `foreach` step did
            // them per item).
            if !derived_done {
                match derived_outputs(shared, i, &scope, &out.result) {
                    Ok(derived) => values.extend(derived),
                    Err(e) => {
                        record.status = Status::Failed;
                        record.error = Some(redactor.redact(&e));
                    }
                }
            }
            if let Some(table) = out.table {
                if shared.req.plan.keep_tables && record.error.is_none() {
                    keep_table(shared, id, &table).await;
                }
                shared.tables.lock().unwrap().insert(id.to_string(), table);
            }
            record.outputs = redactor.redact_json(&serde_json::Value::Object(values.clone()));
            let mut visible = values;
            visible.extend(builtins(&record));
            shared.publish(id, serde_json::Value::Object(visible));
            if let Some(err) = &record.error {
                shared.log(Some(id), Level::Error, format!("failed: {err}"));
            }
            return record;
        }
        Err((status, message)) => {
            record.status = status;
            record.attempts = record.attempts.max(1);
            let message = redactor.redact(&message);
            if status == Status::Failed {
                shared.log(Some(id), Level::Error, format!("failed: {message}"));
            } else {
                shared.log(Some(id), Level::Warning, message.clone());
            }
            record.error = Some(message);
        }
    }
    shared.publish(id, serde_json::Value::Object(builtins(&record)));
    record
}

/// `keep_tables:`: write a succeeded step's table into the run folder for a later repair.
/// A table that cannot be written is a warning: the run goes on, and a repair runs that
/// step again instead of reusing it.
async fn keep_table(shared: &Shared, id: &str, table: &Table) {
    let Some(ops) = shared.req.plan.table_ops.clone() else {
        return;
    };
    let path = kept_table_path(&shared.req.run_dir, id);
    let t = table.clone();
    let written = tokio::task::spawn_blocking(move || ops.save(&t, &path))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    if let Err(e) = written {
        shared.log(
            Some(id),
            Level::Warning,
            format!("keep_tables: cannot keep this step's table: {e}"),
        );
    }
}

/// The step's `outputs:` templates, evaluated over its result object.
fn derived_outputs(
    shared: &Shared,
    i: usize,
    scope: &Scope,
    result: &serde_json::Value,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let step = &shared.req.plan.steps[i];
    let mut values = serde_json::Map::new();
    if step.spec.outputs.is_empty() {
        return Ok(values);
    }
    let mut local = scope.with(step.kind.result_name, TValue::from_serialize(result));
    // Step locals (`values` of sheets.read) are also plain names in `outputs:`.
    for name in &step.info.locals {
        if let Some(v) = result.get(name) {
            local = local.with(name, TValue::from_serialize(v));
        }
    }
    for (name, spec) in &step.spec.outputs {
        let v = shared
            .req
            .templates
            .render_str(spec.template(), &local)
            .map_err(|e| format!("output `{name}`: {e}"))?;
        if spec.secret() {
            match v.as_str() {
                Some(s) => shared.req.redactor.add(s),
                None => shared.req.redactor.add(&v.to_string()),
            }
        }
        values.insert(name.clone(), v);
    }
    Ok(values)
}

/// An item key as text (`north`, `3`): how keys are compared across steps.
fn key_text(key: &serde_json::Value) -> String {
    match key {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The scope of one item of a `foreach` step.
fn item_scope(scope: &Scope, item: &serde_json::Value, index: usize) -> Scope {
    scope
        .with("item", TValue::from_serialize(item))
        .with("item_index", TValue::from(index))
}

/// A `foreach` step: the list, then each item through [`run_once`] (its own `if:`,
/// retries and timeout), `concurrency` at a time. Every item runs whatever the others do;
/// their statuses become the step's `items` output (kept in the run history), their
/// tables one table with an `item` column. An input table that has an `item` column (made
/// by an earlier `foreach` over the same keys) is split: each item sees its own rows.
async fn run_foreach(
    shared: &Shared,
    i: usize,
    observer: &Arc<dyn Observer>,
    warned: &WarningRows,
    scope: &Scope,
    foreach: &crate::model::Foreach,
) -> Result<Option<(StepOutput, u32, bool)>, (Status, String)> {
    use futures_util::StreamExt;
    let step = &shared.req.plan.steps[i];
    let id = step.id.as_str();
    let templates = &shared.req.templates;
    let fail = |m: String| (Status::Failed, m);
    let items = match templates
        .render_str(foreach.items(), scope)
        .map_err(|e| fail(format!("`foreach:` {e}")))?
    {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Null => Vec::new(),
        other => {
            return Err(fail(format!(
                "`foreach:` must give a list, not {}",
                match other {
                    serde_json::Value::Object(_) => "a mapping",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    _ => "a boolean",
                }
            )))
        }
    };
    let mut keys: Vec<serde_json::Value> = Vec::with_capacity(items.len());
    // The items seen so far by key text (how keys are compared across steps), so that
    // finding a repeated key costs one look-up per item, not a scan of the earlier ones.
    let mut by_text: HashMap<String, Vec<usize>> = HashMap::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        let key = match foreach.key() {
            Some(t) => templates
                .render_str(t, &item_scope(scope, item, n))
                .map_err(|e| fail(format!("`foreach.key` of item {n}: {e}")))?,
            None => match item {
                serde_json::Value::String(_) | serde_json::Value::Number(_) => item.clone(),
                _ => serde_json::Value::from(n),
            },
        };
        let same_text = by_text.entry(key_text(&key)).or_default();
        if let Some(&j) = same_text.iter().find(|&&j| keys[j] == key) {
            return Err(fail(format!(
                "`foreach`: items {j} and {n} have the same key `{}`; give each a distinct `key`",
                key_text(&key)
            )));
        }
        same_text.push(n);
        keys.push(key);
    }
    let concurrency = foreach.concurrency();
    shared.req.observer.event(&RunEvent::StepStarted {
        step: id.to_string(),
        attempt: 1,
        at: Utc::now(),
    });
    shared.log(
        Some(id),
        Level::Info,
        format!(
            "{} items, {} at a time",
            items.len(),
            concurrency.min(items.len().max(1))
        ),
    );
    let base_inputs = shared.inputs_of(i);
    let total = items.len();
    // A hand-driven FuturesUnordered (no stream-combinator closures: their borrowed
    // captures defeat the `Send` proof of the spawned step task).
    let mut pending = items.iter().enumerate();
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut done: Vec<ItemOutcome> = Vec::with_capacity(total);
    loop {
        while running.len() < concurrency {
            match pending.next() {
                Some((n, item)) => running.push(run_item(
                    shared,
                    i,
                    observer,
                    scope,
                    item,
                    n,
                    &keys[n],
                    &base_inputs,
                )),
                None => break,
            }
        }
        let Some(outcome) = running.next().await else {
            break;
        };
        let (n, result, _, took) = &outcome;
        let (level, what) = match result {
            Ok(Some((out, _))) => {
                let rows = out
                    .table
                    .as_ref()
                    .map(|t| format!(", {} rows", t.rows()))
                    .unwrap_or_default();
                (Level::Info, format!("succeeded{rows}"))
            }
            Ok(None) => (Level::Info, "skipped (its `if:` is false)".to_string()),
            Err((Status::Skipped, why)) => (Level::Info, format!("skipped ({why})")),
            Err((status, e)) => (Level::Error, format!("{}: {e}", status.label())),
        };
        shared.log(
            Some(id),
            level,
            format!(
                "item {}/{total} ({}) {what} in {}",
                n + 1,
                key_text(&keys[*n]),
                crate::duration::human(*took)
            ),
        );
        done.push(outcome);
    }
    done.sort_by_key(|(n, ..)| *n);

    let mut statuses = Vec::with_capacity(total);
    let mut parts = Vec::new();
    let mut per_output: IndexMap<String, Vec<serde_json::Value>> = IndexMap::new();
    let (mut succeeded, mut failed, mut skipped, mut cancelled) = (0u64, 0u64, 0u64, false);
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    let mut max_attempts = 0;
    for (n, result, attempts, took) in done {
        let key = keys[n].clone();
        max_attempts = max_attempts.max(attempts);
        let mut entry = serde_json::json!({
            "key": key,
            "attempts": attempts,
            "duration_ms": took.as_millis() as u64,
        });
        match result {
            Ok(Some((out, used))) => {
                max_attempts = max_attempts.max(used);
                succeeded += 1;
                entry["attempts"] = used.into();
                entry["status"] = if out.warnings.is_empty() {
                    "succeeded"
                } else {
                    "warning"
                }
                .into();
                for w in &out.warnings {
                    let summary = format!("item {}: {w}", key_text(&key));
                    // The item logged it already: its summary needs no row of its own.
                    if warned.logged(w, &shared.req.redactor) {
                        warned.note(&summary);
                    }
                    warnings.push(summary);
                }
                for (name, v) in &out.outputs {
                    per_output
                        .entry(name.clone())
                        .or_default()
                        .resize(n, serde_json::Value::Null);
                    per_output[name].push(v.clone());
                }
                entry["outputs"] = serde_json::Value::Object(out.outputs);
                if let Some(t) = out.table {
                    entry["rows"] = t.rows().into();
                    parts.push((key, t));
                }
            }
            Ok(None) => {
                skipped += 1;
                entry["status"] = "skipped".into();
            }
            Err((Status::Skipped, why)) => {
                skipped += 1;
                entry["status"] = "skipped".into();
                entry["reason"] = why.into();
            }
            Err((status, e)) => {
                if status == Status::Cancelled {
                    cancelled = true;
                }
                failed += 1;
                entry["status"] = status.as_str().into();
                let e = shared.req.redactor.redact(&e);
                failures.push(format!("item {}: {e}", key_text(&key)));
                entry["error"] = e.into();
            }
        }
        statuses.push(entry);
    }
    shared.item_ok.lock().unwrap().insert(
        id.to_string(),
        statuses
            .iter()
            .map(|e| {
                let ok = matches!(e["status"].as_str(), Some("succeeded" | "warning"));
                (key_text(&e["key"]), ok)
            })
            .collect(),
    );
    if cancelled {
        return Err((Status::Cancelled, "cancelled".to_string()));
    }
    if total > 0 && skipped as usize == total {
        return Ok(None);
    }
    let table = if parts.is_empty() {
        None
    } else {
        match &shared.req.plan.table_ops {
            Some(ops) => Some(
                ops.combine(parts)
                    .map_err(|e| fail(format!("combining the items' tables: {e}")))?,
            ),
            None => None,
        }
    };
    if failed > 0 && foreach.on_item_failure() == crate::model::OnItemFailure::Fail {
        return Err(fail(format!(
            "{failed} of {total} items failed: {}",
            failures.join("; ")
        )));
    }
    if failed > 0 {
        warnings.push(format!(
            "{failed} of {total} items failed: {}",
            failures.join("; ")
        ));
    }
    let mut outputs = serde_json::Map::new();
    for (name, mut values) in per_output {
        values.resize(total, serde_json::Value::Null);
        outputs.insert(name, serde_json::Value::Array(values));
    }
    outputs.insert("items".into(), serde_json::Value::Array(statuses.clone()));
    outputs.insert("succeeded".into(), succeeded.into());
    outputs.insert("failed".into(), failed.into());
    outputs.insert("skipped".into(), skipped.into());
    Ok(Some((
        StepOutput {
            outputs,
            result: serde_json::json!({ "items": statuses }),
            table,
            warnings,
        },
        max_attempts.max(1),
        true,
    )))
}

type ItemOutcome = (
    usize,
    Result<Option<(StepOutput, u32)>, (Status, String)>,
    u32,
    Duration, // how long the item took
);

/// One item of a `foreach` step: its own slice of split inputs, [`run_once`], its derived
/// outputs.
#[allow(clippy::too_many_arguments)]
async fn run_item(
    shared: &Shared,
    i: usize,
    observer: &Arc<dyn Observer>,
    scope: &Scope,
    item: &serde_json::Value,
    n: usize,
    key: &serde_json::Value,
    base_inputs: &IndexMap<String, Table>,
) -> ItemOutcome {
    let clock = Instant::now();
    let s = item_scope(scope, item, n);
    let mut attempts = 0;
    let mut inputs = IndexMap::new();
    // An item that failed in the `foreach` that made an input has nothing to work on.
    let failed_upstream = {
        let ok = shared.item_ok.lock().unwrap();
        base_inputs
            .keys()
            .find(|name| ok.get(*name).and_then(|m| m.get(&key_text(key))) == Some(&false))
            .cloned()
    };
    if let Some(name) = failed_upstream {
        return (
            n,
            Err((Status::Skipped, format!("item failed upstream in `{name}`"))),
            0,
            clock.elapsed(),
        );
    }
    for (name, table) in base_inputs {
        let own = match &shared.req.plan.table_ops {
            Some(ops) => ops.rows_of_item(table, key),
            None => Ok(None),
        };
        match own {
            Ok(t) => {
                inputs.insert(name.clone(), t.unwrap_or_else(|| table.clone()));
            }
            Err(e) => {
                return (
                    n,
                    Err((Status::Failed, format!("input `{name}`: {e}"))),
                    0,
                    clock.elapsed(),
                );
            }
        }
    }
    let result = match run_once(shared, i, observer, &s, Some(inputs), &mut attempts).await {
        Ok(Some((mut out, used))) => match derived_outputs(shared, i, &s, &out.result) {
            Ok(derived) => {
                out.outputs.extend(derived);
                Ok(Some((out, used)))
            }
            Err(e) => Err((Status::Failed, e)),
        },
        other => other,
    };
    (n, result, attempts, clock.elapsed())
}

/// One step (or one item of a `foreach` step): `if:`, rendering, attempts with retries and
/// timeouts. `Ok(None)` = skipped by its `if:`. A panic inside (a bug in pipe or in a
/// library) is this step's (or item's) failure, with the panic's message.
async fn run_once(
    shared: &Shared,
    i: usize,
    observer: &Arc<dyn Observer>,
    scope: &Scope,
    item_inputs: Option<IndexMap<String, Table>>,
    attempts_used: &mut u32,
) -> Result<Option<(StepOutput, u32)>, (Status, String)> {
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let outcome = AssertUnwindSafe(attempt_once(
        shared,
        i,
        observer,
        scope,
        item_inputs,
        &attempts,
    ))
    .catch_unwind()
    .await;
    *attempts_used = attempts.load(std::sync::atomic::Ordering::Relaxed);
    outcome.unwrap_or_else(|payload| {
        *attempts_used = (*attempts_used).max(1);
        Err((Status::Failed, panic_error(&panic_message(&*payload))))
    })
}

/// A duration of the step envelope (`timeout`, `retry.backoff` …) at run time: a template
/// is rendered first; a number is seconds. Too long or negative is the step's error, never
/// a panic in `Duration`'s arithmetic.
fn envelope_duration(
    templates: &Templates,
    scope: &Scope,
    field: &str,
    spec: &crate::model::DurationSpec,
) -> Result<Duration, (Status, String)> {
    use crate::model::DurationSpec;
    let fail = |e: String| (Status::Failed, format!("`{field}`: {e}"));
    let value = match spec {
        DurationSpec::Text(t) if crate::template::is_template(t) => {
            templates.render_str(t, scope).map_err(fail)?
        }
        DurationSpec::Text(t) => serde_json::Value::String(t.clone()),
        DurationSpec::Seconds(s) => serde_json::json!(s),
    };
    match &value {
        serde_json::Value::Number(n) => {
            crate::duration::from_secs(n.as_f64().unwrap_or(f64::NAN)).map_err(fail)
        }
        serde_json::Value::String(t) => match t.trim().parse::<f64>() {
            Ok(secs) => crate::duration::from_secs(secs).map_err(fail),
            Err(_) => crate::duration::parse(t).map_err(fail),
        },
        other => Err(fail(format!(
            "expected a duration such as 30s, 2m or 1h, got `{other}`"
        ))),
    }
}

async fn attempt_once(
    shared: &Shared,
    i: usize,
    observer: &Arc<dyn Observer>,
    scope: &Scope,
    item_inputs: Option<IndexMap<String, Table>>,
    attempts_used: &std::sync::atomic::AtomicU32,
) -> Result<Option<(StepOutput, u32)>, (Status, String)> {
    let step = &shared.req.plan.steps[i];
    let id = step.id.as_str();
    let redactor = &shared.req.redactor;
    let templates = &shared.req.templates;
    let scope = scope.clone();
    // `if:`
    if let Some(cond) = &step.spec.condition {
        let go = match cond {
            crate::model::Condition::Bool(b) => *b,
            crate::model::Condition::Template(t) => templates
                .truthy(t, &scope)
                .map_err(|e| (Status::Failed, format!("`if:` {e}")))?,
        };
        if !go {
            return Ok(None);
        }
    }
    let config = render_config(templates, &step.config, &scope, &step.info.deferred).map_err(
        |(pos, e)| {
            (
                Status::Failed,
                format!("template at line {}: {e}", pos.line),
            )
        },
    )?;
    let connection = match &step.spec.connection {
        None => None,
        Some(name) => {
            Some(render_connection(shared, name, &scope, 0).map_err(|e| (Status::Failed, e))?)
        }
    };
    let inputs = item_inputs.unwrap_or_else(|| shared.inputs_of(i));
    let duration = |field: &str, spec: Option<&crate::model::DurationSpec>| {
        spec.map(|d| envelope_duration(templates, &scope, field, d))
            .transpose()
    };
    let timeout = duration("timeout", step.spec.timeout.as_ref())?;
    let (attempts, backoff, max_backoff) = match &step.spec.retry {
        Some(r) => (
            r.attempts.max(1),
            duration("retry.backoff", r.backoff.as_ref())?.unwrap_or(Duration::from_secs(1)),
            duration("retry.max_backoff", r.max_backoff.as_ref())?
                .unwrap_or(Duration::from_secs(60)),
        ),
        None => (1, Duration::from_secs(1), Duration::from_secs(60)),
    };
    let parent = if step.spec.always {
        shared.req.hard_cancel.clone()
    } else {
        shared.req.cancel.clone()
    };
    let mut attempt = 1;
    // A `foreach` step announces itself once (its items log their own rows).
    let one_item = step.spec.foreach.is_some();
    loop {
        if !one_item {
            shared.req.observer.event(&RunEvent::StepStarted {
                step: id.to_string(),
                attempt,
                at: Utc::now(),
            });
        }
        let token = parent.child_token();
        let mut ctx = StepContext::new(
            id,
            shared.req.run_id,
            observer.clone(),
            redactor.clone(),
            shared.req.run_dir.clone(),
            shared.pipeline_dir.clone(),
        );
        ctx.attempt = attempt;
        ctx.pipeline = shared.req.plan.name.clone();
        ctx.history = shared.req.history.clone();
        ctx.run_started_at = shared.req.started_at;
        ctx.resources = shared.req.resources.clone();
        ctx.inputs = inputs.clone();
        ctx.connection = connection.clone();
        ctx.cancel = token.clone();
        ctx.evaluator = Some((shared.req.templates.clone(), scope.clone()));
        let result = match (step.kind.run)(config.clone(), ctx) {
            Err(e) => Err(e),
            Ok(fut) => {
                let panic_here = debug_panic_requested(id);
                let fut = Box::pin(async move {
                    if panic_here {
                        panic!("{DEBUG_PANIC_VAR} asked for a panic here");
                    }
                    fut.await
                });
                // A panic in the step's own code fails this attempt (not retried: it is a bug).
                let mut fut = AssertUnwindSafe(fut).catch_unwind().map(|r| {
                    r.unwrap_or_else(|payload| {
                        Err(StepError::fatal(panic_error(&panic_message(&*payload))))
                    })
                });
                let sleeper = async {
                    match timeout {
                        Some(t) => tokio::time::sleep(t).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut fut => r,
                    _ = sleeper => {
                        token.cancel();
                        let _ = tokio::time::timeout(CANCEL_GRACE, &mut fut).await;
                        Err(StepError::retryable(format!("timed out after {}", crate::duration::human(timeout.unwrap_or_default()))))
                    }
                    _ = parent.cancelled() => {
                        let _ = tokio::time::timeout(CANCEL_GRACE, &mut fut).await;
                        return Err((Status::Cancelled, "cancelled".to_string()));
                    }
                }
            }
        };
        match result {
            Ok(out) => return Ok(Some((out, attempt))),
            // The step noticed the cancellation before the executor did.
            Err(_) if parent.is_cancelled() => {
                return Err((Status::Cancelled, "cancelled".to_string()))
            }
            Err(e) if e.retryable && attempt < attempts && !parent.is_cancelled() => {
                let base = backoff
                    .saturating_mul(1u32 << (attempt - 1).min(20))
                    .min(max_backoff);
                let half = base / 2;
                let delay = half + half.mul_f64(rand::random::<f64>());
                let msg = redactor.redact(&e.message);
                shared.req.observer.event(&RunEvent::StepRetrying {
                    step: id.to_string(),
                    attempt,
                    error: msg.clone(),
                    delay_ms: delay.as_millis() as u64,
                });
                shared.log(
                    Some(id),
                    Level::Warning,
                    format!(
                        "attempt {attempt} of {attempts} failed: {msg}; retrying in {}",
                        crate::duration::human(delay)
                    ),
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = parent.cancelled() => return Err((Status::Cancelled, "cancelled".to_string())),
                }
                attempt += 1;
            }
            Err(e) => {
                attempts_used.store(attempt, std::sync::atomic::Ordering::Relaxed);
                let what = if attempt > 1 {
                    format!(" (after {attempt} attempts)")
                } else {
                    String::new()
                };
                return Err((Status::Failed, format!("{}{what}", e.message)));
            }
        }
    }
}

/// A connection rendered for a step. A `credentials: <name>` field naming another connection
/// (a `bigquery` connection using a `google_service_account` one) is replaced by that
/// connection, rendered too, so the step receives everything it needs in one value.
fn render_connection(
    shared: &Shared,
    name: &str,
    scope: &Scope,
    depth: usize,
) -> Result<serde_json::Value, String> {
    let node = shared.connection_node(name);
    let rendered = shared
        .req
        .templates
        .render_node(&node, scope)
        .map_err(|(pos, e)| format!("connection `{name}`, template at line {}: {e}", pos.line))?;
    let mut json = rendered.to_json();
    // A stored credential's values, set as they are (never rendered).
    shared
        .req
        .templates
        .runtime()
        .overrides
        .connections
        .fill(name, &mut json);
    if let Some(other) = json
        .get("credentials")
        .and_then(|c| c.as_str())
        .map(str::to_string)
    {
        if depth < 4 && shared.req.plan.connection_nodes.contains_key(&other) {
            json["credentials"] = render_connection(shared, &other, scope, depth + 1)?;
        }
    }
    // Secret connection fields (at any depth) are masked wherever they could surface.
    learn_secret_fields(&json, &shared.req.redactor);
    Ok(json)
}

/// Before the first step starts, learn every secret the pipeline names literally
/// (`secret('API_TOKEN')` in any step's `with:`, `if:`, `outputs:`, `foreach:` or any
/// connection) and every secret field of the connections that render without a step's
/// output, so a step that prints one before the step that calls `secret()` runs is masked.
/// A secret that is not set, or a connection that needs a step's output, is left to the
/// step that uses it: it fails (or is learnt) there, as it would without this.
fn learn_secrets_up_front(shared: &Shared) {
    use crate::model::{Condition, Foreach};
    fn strings<'a>(node: &'a crate::yaml::Node, out: &mut Vec<&'a str>) {
        match &node.value {
            crate::yaml::Value::String(s) => out.push(s),
            crate::yaml::Value::Seq(items) => items.iter().for_each(|n| strings(n, out)),
            crate::yaml::Value::Map(entries) => entries.iter().for_each(|(_, v)| strings(v, out)),
            _ => {}
        }
    }
    let plan = &shared.req.plan;
    let nodes: Vec<_> = plan
        .connection_nodes
        .keys()
        .map(|name| shared.connection_node(name))
        .collect();
    let mut templates: Vec<&str> = Vec::new();
    for node in &nodes {
        strings(node, &mut templates);
    }
    for step in &plan.steps {
        strings(&step.config, &mut templates);
        if let Some(Condition::Template(t)) = &step.spec.condition {
            templates.push(t);
        }
        templates.extend(step.spec.outputs.values().map(|o| o.template()));
        match &step.spec.foreach {
            Some(Foreach::Items(t)) => templates.push(t),
            Some(Foreach::Full(f)) => templates.extend(
                [Some(&f.items), f.key.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            ),
            None => {}
        }
    }
    let names: std::collections::BTreeSet<String> = templates
        .iter()
        .flat_map(|t| crate::secrets::literal_secret_names(t))
        .collect();
    let scope = shared.scope();
    for name in names {
        // `secret()` learns the value it returns; an unset one is an error here, ignored.
        let call = format!("{{{{ secret({}) }}}}", serde_json::Value::String(name));
        let _ = shared.req.templates.render_str(&call, &scope);
    }
    for name in plan.connection_nodes.keys() {
        let _ = render_connection(shared, name, &scope, 0);
    }
}

fn learn_secret_fields(v: &serde_json::Value, redactor: &Redactor) {
    if let Some(fields) = v.as_object() {
        for (field, value) in fields {
            match value {
                serde_json::Value::String(s) if crate::validate::is_secret_field(field) => {
                    redactor.add(s)
                }
                serde_json::Value::Object(_) => learn_secret_fields(value, redactor),
                _ => {}
            }
        }
    }
}

/// Render a step's config, leaving the templates the step evaluates itself untouched.
fn render_config(
    templates: &Templates,
    config: &crate::yaml::Node,
    scope: &Scope,
    deferred: &[String],
) -> Result<crate::yaml::Node, (crate::diag::Pos, String)> {
    if deferred.is_empty() {
        return templates.render_node(config, scope);
    }
    let mut stripped = config.clone();
    let mut kept = Vec::new();
    for path in deferred {
        if let Some(node) = stripped.get_path_mut(path) {
            let pos = node.pos;
            kept.push((path, std::mem::replace(node, crate::yaml::Node::null(pos))));
        }
    }
    let mut rendered = templates.render_node(&stripped, scope)?;
    for (path, node) in kept {
        if let Some(slot) = rendered.get_path_mut(path) {
            *slot = node;
        }
    }
    Ok(rendered)
}

/// Remembers the warning rows a step wrote, so that the executor does not write its
/// [`StepOutput::warnings`] a second time: steps log a warning when it happens (so it sits
/// in its place among the other rows) and also return it, which makes the status `warning`.
struct WarningRows {
    inner: Arc<dyn Observer>,
    seen: Mutex<HashSet<String>>,
}

impl WarningRows {
    /// Remembered messages at most (a step writing more warning rows than this may see a
    /// few of them twice, rather than pipe growing without bound).
    const CAPACITY: usize = 10_000;

    fn new(inner: Arc<dyn Observer>) -> Self {
        WarningRows {
            inner,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn note(&self, message: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < Self::CAPACITY {
            seen.insert(message.to_string());
        }
    }

    /// Whether the step already wrote a warning row saying `warning` (as it was redacted
    /// then, or as it is now).
    fn logged(&self, warning: &str, redactor: &Redactor) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.contains(warning) || seen.contains(&redactor.redact(warning))
    }
}

impl Observer for WarningRows {
    fn event(&self, event: &RunEvent) {
        if let RunEvent::Log(rec) = event {
            if rec.level == Level::Warning {
                self.note(&rec.message);
            }
        }
        self.inner.event(event);
    }
}

/// Holds a step's log rows until [`Holding::release`]; other events pass straight through.
struct Holding {
    inner: Arc<dyn Observer>,
    held: Mutex<Vec<RunEvent>>,
}

impl Holding {
    fn new(inner: Arc<dyn Observer>) -> Self {
        Holding {
            inner,
            held: Mutex::new(Vec::new()),
        }
    }
    fn release(&self, redactor: &Redactor) {
        for event in self.held.lock().unwrap().drain(..) {
            match event {
                RunEvent::Log(mut rec) => {
                    rec.message = redactor.redact(&rec.message);
                    rec.description = rec.description.map(|d| redactor.redact(&d));
                    self.inner.event(&RunEvent::Log(rec));
                }
                other => self.inner.event(&other),
            }
        }
    }
}

impl Observer for Holding {
    fn event(&self, event: &RunEvent) {
        match event {
            RunEvent::Log(_) => self.held.lock().unwrap().push(event.clone()),
            other => self.inner.event(other),
        }
    }
}

/// `--dry-run`: each step's config rendered with placeholders for other steps' outputs
/// (`<steps.login.tmp>`), secrets shown as `***`. Nothing runs.
pub fn preview(
    plan: &Plan,
    templates: &Templates,
    params: TValue,
    run: TValue,
    redactor: &Redactor,
) -> Vec<(String, String, Result<serde_json::Value, String>)> {
    let ids: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
    let scope = Scope::new(params, crate::template::placeholder_steps(&ids), run);
    plan.steps
        .iter()
        .map(|s| {
            // A `foreach` step is shown for a placeholder item.
            let scope = match &s.spec.foreach {
                Some(_) => scope
                    .with("item", crate::template::placeholder("item"))
                    .with("item_index", TValue::from(0)),
                None => scope.clone(),
            };
            let rendered = templates
                .render_node(&s.config, &scope)
                .map(|n| n.to_json())
                .map_err(|(pos, e)| format!("template at line {}: {e}", pos.line));
            if let Ok(json) = &rendered {
                crate::secrets::learn_step_credentials(json, redactor);
            }
            (s.id.clone(), s.kind.name.to_string(), rendered)
        })
        .collect::<Vec<_>>()
        .into_iter()
        // Masked once every step's credentials are known: one step's may show in another.
        .map(|(id, kind, rendered)| {
            let rendered = rendered
                .map(|json| redactor.redact_json(&json))
                .map_err(|e| redactor.redact(&e));
            (id, kind, rendered)
        })
        .collect()
}
