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
use indexmap::IndexMap;
use minijinja::value::{Enumerator, Object, Value as TValue};
use std::collections::{HashMap, VecDeque};
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
        pipeline_dir,
        req,
    });
    let semaphore = Arc::new(Semaphore::new(shared.req.concurrency.max(1)));

    let mut board = Board::new(&plan);
    let mut running: JoinSet<(usize, StepRecord)> = JoinSet::new();

    while board.done < n {
        while let Some(i) = board.ready.pop_front() {
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
                        let record = run_step(&shared, i).await;
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

/// A step that never started (skipped, or cancelled before it began).
fn not_run(shared: &Shared, i: usize, status: Status, why: &str) -> StepRecord {
    let id = &shared.req.plan.steps[i].id;
    let record = StepRecord {
        step: id.clone(),
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

async fn run_step(shared: &Shared, i: usize) -> StepRecord {
    let step = &shared.req.plan.steps[i];
    let id = step.id.as_str();
    let started = Utc::now();
    let clock = Instant::now();
    let scope = shared.scope();
    let redactor = &shared.req.redactor;
    let record = StepRecord {
        step: id.to_string(),
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
    let observer: Arc<dyn Observer> = match &holding {
        Some(h) => h.clone(),
        None => shared.req.observer.clone(),
    };
    let record = run_attempts(shared, i, &observer, record, scope, clock).await;
    if let Some(h) = holding {
        h.release(redactor);
    }
    record
}

async fn run_attempts(
    shared: &Shared,
    i: usize,
    observer: &Arc<dyn Observer>,
    mut record: StepRecord,
    scope: Scope,
    clock: Instant,
) -> StepRecord {
    let step = &shared.req.plan.steps[i];
    let id = step.id.as_str();
    let redactor = &shared.req.redactor;
    let templates = &shared.req.templates;

    let outcome: Result<Option<(StepOutput, u32)>, (Status, String)> = async {
        // `if:`
        if let Some(cond) = &step.spec.condition {
            let go = match cond {
                crate::model::Condition::Bool(b) => *b,
                crate::model::Condition::Template(t) => templates.truthy(t, &scope).map_err(|e| (Status::Failed, format!("`if:` {e}")))?,
            };
            if !go {
                return Ok(None);
            }
        }
        let config = render_config(templates, &step.config, &scope, &step.info.deferred)
            .map_err(|(pos, e)| (Status::Failed, format!("template at line {}: {e}", pos.line)))?;
        let connection = match &step.spec.connection {
            None => None,
            Some(name) => Some(render_connection(shared, name, &scope, 0).map_err(|e| (Status::Failed, e))?),
        };
        let inputs: IndexMap<String, Table> = {
            let tables = shared.tables.lock().unwrap();
            step.spec
                .input
                .iter()
                .chain(step.spec.inputs.iter())
                .filter_map(|name| tables.get(name).map(|t| (name.clone(), t.clone())))
                .collect()
        };
        let timeout = step.spec.timeout.as_ref().and_then(|t| t.parse().ok());
        let (attempts, backoff, max_backoff) = match &step.spec.retry {
            Some(r) => (
                r.attempts.max(1),
                r.backoff.as_ref().and_then(|b| b.parse().ok()).unwrap_or(Duration::from_secs(1)),
                r.max_backoff.as_ref().and_then(|b| b.parse().ok()).unwrap_or(Duration::from_secs(60)),
            ),
            None => (1, Duration::from_secs(1), Duration::from_secs(60)),
        };
        let parent = if step.spec.always { shared.req.hard_cancel.clone() } else { shared.req.cancel.clone() };
        let mut attempt = 1;
        loop {
            shared.req.observer.event(&RunEvent::StepStarted { step: id.to_string(), attempt, at: Utc::now() });
            let token = parent.child_token();
            let mut ctx = StepContext::new(id, shared.req.run_id, observer.clone(), redactor.clone(), shared.req.run_dir.clone(), shared.pipeline_dir.clone());
            ctx.attempt = attempt;
            ctx.inputs = inputs.clone();
            ctx.connection = connection.clone();
            ctx.cancel = token.clone();
            ctx.evaluator = Some((shared.req.templates.clone(), scope.clone()));
            let result = match (step.kind.run)(config.clone(), ctx) {
                Err(e) => Err(e),
                Ok(mut fut) => {
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
                Err(e) if e.retryable && attempt < attempts && !parent.is_cancelled() => {
                    let base = backoff.saturating_mul(1u32 << (attempt - 1).min(20)).min(max_backoff);
                    let half = base / 2;
                    let delay = half + half.mul_f64(rand::random::<f64>());
                    let msg = redactor.redact(&e.message);
                    shared.req.observer.event(&RunEvent::StepRetrying { step: id.to_string(), attempt, error: msg.clone(), delay_ms: delay.as_millis() as u64 });
                    shared.log(Some(id), Level::Warning, format!("attempt {attempt} of {attempts} failed: {msg}; retrying in {}", crate::duration::human(delay)));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = parent.cancelled() => return Err((Status::Cancelled, "cancelled".to_string())),
                    }
                    attempt += 1;
                }
                Err(e) => {
                    record.attempts = attempt;
                    let what = if attempt > 1 { format!(" (after {attempt} attempts)") } else { String::new() };
                    return Err((Status::Failed, format!("{}{what}", e.message)));
                }
            }
        }
    }
    .await;

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
        Ok(Some((out, attempts))) => {
            record.attempts = attempts;
            // Rows: of the table it produced, else the rows it says it handled (a load).
            record.rows = out
                .table
                .as_ref()
                .map(|t| t.rows())
                .or_else(|| out.outputs.get("rows").and_then(|r| r.as_u64()));
            record.status = if out.warnings.is_empty() {
                Status::Succeeded
            } else {
                Status::Warning
            };
            for w in &out.warnings {
                shared.log(Some(id), Level::Warning, w.clone());
            }
            let mut values = out.outputs.clone();
            // Derived outputs: templates over the result object.
            if !step.spec.outputs.is_empty() {
                let mut local =
                    scope.with(step.kind.result_name, TValue::from_serialize(&out.result));
                // Step locals (`values` of sheets.read) are also plain names in `outputs:`.
                for name in &step.info.locals {
                    if let Some(v) = out.result.get(name) {
                        local = local.with(name, TValue::from_serialize(v));
                    }
                }
                for (name, spec) in &step.spec.outputs {
                    match templates.render_str(spec.template(), &local) {
                        Ok(v) => {
                            if spec.secret() {
                                if let Some(s) = v.as_str() {
                                    redactor.add(s);
                                } else {
                                    redactor.add(&v.to_string());
                                }
                            }
                            values.insert(name.clone(), v);
                        }
                        Err(e) => {
                            record.status = Status::Failed;
                            record.error = Some(redactor.redact(&format!("output `{name}`: {e}")));
                            break;
                        }
                    }
                }
            }
            if let Some(table) = out.table {
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

/// A connection rendered for a step. A `credentials: <name>` field naming another connection
/// (a `bigquery` connection using a `google_service_account` one) is replaced by that
/// connection, rendered too, so the step receives everything it needs in one value.
fn render_connection(
    shared: &Shared,
    name: &str,
    scope: &Scope,
    depth: usize,
) -> Result<serde_json::Value, String> {
    let node = &shared.req.plan.connection_nodes[name];
    let rendered = shared
        .req
        .templates
        .render_node(node, scope)
        .map_err(|(pos, e)| format!("connection `{name}`, template at line {}: {e}", pos.line))?;
    let mut json = rendered.to_json();
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
            let rendered = templates
                .render_node(&s.config, &scope)
                .map(|n| redactor.redact_json(&n.to_json()))
                .map_err(|(pos, e)| {
                    redactor.redact(&format!("template at line {}: {e}", pos.line))
                });
            (s.id.clone(), s.kind.name.to_string(), rendered)
        })
        .collect()
}
