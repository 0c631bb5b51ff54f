//! Steps: one trait, one registry.
//!
//! A step type is a config struct (serde with `deny_unknown_fields`, schemars, doc comments)
//! implementing [`StepConfig`]. [`Registry`] holds one [`StepKind`] per type, built by
//! [`StepKind::of`]; the `steps` crate lists them all in one function. The engine validates a
//! step's `with:` by deserializing it into the struct (positions kept by [`crate::de`]) and runs
//! it by deserializing the rendered `with:` and calling [`StepConfig::run`].

use crate::de::{self, Mode};
use crate::diag::Diags;
use crate::events::{Level, LogRecord, Observer, RunEvent};
use crate::secrets::Redactor;
use crate::yaml::Node;
use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use std::any::Any;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A table flowing between steps. The engine treats it as opaque (it only asks the row
/// count); the `steps` crate stores a Polars `DataFrame` in it and downcasts on the way in.
pub trait TableData: Any + Send + Sync + std::fmt::Debug {
    fn rows(&self) -> u64;
    fn as_any(&self) -> &dyn Any;
}
pub type Table = Arc<dyn TableData>;

/// What a step's config says about the step before it runs (used by `pipe validate`).
#[derive(Debug, Clone, Default)]
pub struct StaticInfo {
    /// The step produces a table that others can take as `input`.
    pub produces_table: bool,
    /// Outputs the step always sets. `None` means the set is only known at run time
    /// (exec's `::set-output`), so references to any output name are accepted.
    pub outputs: Option<Vec<String>>,
    /// Paths (dotted, relative to `with`) of fields marked secret in the step's schema.
    pub secret_fields: Vec<String>,
    /// Names that templates inside this step's `with:` may use besides params/steps/run
    /// (`values` in a sheets wait condition, for example).
    pub locals: Vec<String>,
    /// Dotted paths (relative to `with`) of templates the step evaluates itself, later and
    /// perhaps many times, with [`StepContext::evaluate`] (a wait condition over each poll's
    /// values). The executor leaves them unrendered.
    pub deferred: Vec<String>,
    /// Warnings about the config that `pipe validate` reports at the field's position
    /// (a template inside a SQL string literal, dynamic SQL).
    pub lints: Vec<Lint>,
}

/// A step type's warning about its own config, found before running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lint {
    /// Dotted path of the field, relative to `with:` (`query`, `auth.password`).
    pub field: String,
    /// A warning code of [`crate::diag::Code`] (`"W002"`).
    pub code: &'static str,
    pub message: String,
}

/// A step config's problem with itself — settings that need each other, values out of
/// range — reported by [`StepConfig::problems`]. `pipe validate` shows it at the key's line
/// and column; a run refuses the rendered config with it. One list, so a config that
/// validates does not fail at run time for a reason validate could have named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key the message points at, relative to `with:`
    /// (`paginate.size`). A missing key points at the deepest one present.
    pub field: String,
    /// Other keys (dotted) the verdict depends on: when one of them, or `field`, holds a
    /// template, validate cannot know its value and leaves the check to the run.
    pub depends_on: Vec<String>,
    pub message: String,
}

impl Problem {
    pub fn at(field: &str, message: impl Into<String>) -> Self {
        Problem {
            field: field.to_string(),
            depends_on: Vec::new(),
            message: message.into(),
        }
    }

    /// The verdict also depends on these keys.
    pub fn given(mut self, fields: &[&str]) -> Self {
        self.depends_on.extend(fields.iter().map(|f| f.to_string()));
        self
    }
}

/// Where `dotted` (relative to `node`) is: the position of its key, or of the deepest key
/// present; and whether a template stands at it or above it.
fn locate(node: &Node, dotted: &str) -> (crate::diag::Pos, bool) {
    let templated = |n: &Node| matches!(&n.value, crate::yaml::Value::String(s) if crate::template::is_template(s));
    let mut cur = node;
    let mut pos = node.pos;
    let mut is_template = templated(node);
    for seg in dotted.split('.').filter(|s| !s.is_empty()) {
        match cur.entry(seg) {
            Some((k, v)) => {
                pos = k.pos;
                cur = v;
                is_template |= templated(v);
            }
            None => break,
        }
    }
    (pos, is_template)
}

/// Report a config's problems at their keys, leaving templated ones to the run.
pub(crate) fn report_problems(problems: &[Problem], node: &Node, diags: &mut Diags) {
    for p in problems {
        let (pos, templated) = locate(node, &p.field);
        if templated || p.depends_on.iter().any(|f| locate(node, f).1) {
            continue;
        }
        diags.push(pos, crate::diag::Code::InvalidValue, p.message.clone());
    }
}

/// What a step returns.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The step's own outputs, visible as `steps.<id>.<name>`.
    pub outputs: serde_json::Map<String, serde_json::Value>,
    /// The result object that `outputs:` templates read (as `result`, or as the name
    /// [`StepConfig::RESULT_NAME`] gives).
    pub result: serde_json::Value,
    pub table: Option<Table>,
    /// Warnings turn the step's status into `warning`.
    pub warnings: Vec<String>,
}

/// A step failure. `retryable` says whether `retry:` may try again.
#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    pub retryable: bool,
}

impl StepError {
    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: false,
        }
    }
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: true,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a worker keeps for all the runs it executes (a token cache per kind of login), by
/// type, so the engine needs to know none of them: a step asks
/// `ctx.resources.get_or_init(|| MyCache::new(ctx.resources.token_ttl()))`. One per
/// worker (`runner::Runner`); a step context built by hand (unit tests) gets a fresh one,
/// so nothing is shared through the process.
pub struct Resources {
    token_ttl: std::time::Duration,
    map: std::sync::Mutex<std::collections::HashMap<std::any::TypeId, Arc<dyn Any + Send + Sync>>>,
}

/// How long a worker trusts a credential it obtained (an OAuth2 token without an expiry)
/// or keeps one nobody used, unless the worker says otherwise.
pub const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

impl Resources {
    pub fn new(token_ttl: std::time::Duration) -> Resources {
        Resources {
            token_ttl,
            map: Default::default(),
        }
    }

    /// How long caches of credentials keep an entry (see [`DEFAULT_TOKEN_TTL`]).
    pub fn token_ttl(&self) -> std::time::Duration {
        self.token_ttl
    }

    /// The worker's `T`, made by `init` the first time it is asked for.
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(std::any::TypeId::of::<T>())
            .or_insert_with(|| Arc::new(init()));
        entry
            .clone()
            .downcast::<T>()
            .expect("entries are stored under their own type")
    }
}

impl Default for Resources {
    fn default() -> Self {
        Resources::new(DEFAULT_TOKEN_TTL)
    }
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resources(token_ttl {:?})", self.token_ttl)
    }
}

/// The running step's view of the world.
#[derive(Clone)]
pub struct StepContext {
    pub step_id: String,
    pub run_id: i64,
    pub attempt: u32,
    /// Input tables by step id, in the order `input`/`inputs` names them.
    pub inputs: IndexMap<String, Table>,
    /// The rendered connection config, when the step names one.
    pub connection: Option<serde_json::Value>,
    /// Cancelled on Ctrl-C/SIGTERM or when the step's timeout expires: stop promptly
    /// (kill child processes) and return.
    pub cancel: CancellationToken,
    /// Learn values that must never be printed (tokens received at run time).
    pub redactor: Redactor,
    /// The run's folder for attached files.
    pub run_dir: PathBuf,
    /// The folder of the pipeline file (relative paths in configs start here).
    pub pipeline_dir: PathBuf,
    /// The pipeline's name (`pipeline:`).
    pub pipeline: String,
    /// Read access to the run history (a heartbeat's record counts); `None` in unit tests
    /// that give none.
    pub history: Option<Arc<dyn HistoryView>>,
    /// When the run started (a heartbeat's default `startTime`).
    pub run_started_at: chrono::DateTime<chrono::Utc>,
    /// What the worker shares between its runs (token caches); see [`Resources`].
    pub resources: Arc<Resources>,
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) evaluator: Option<(Arc<crate::template::Templates>, crate::template::Scope)>,
}

impl StepContext {
    pub fn new(
        step_id: &str,
        run_id: i64,
        observer: Arc<dyn Observer>,
        redactor: Redactor,
        run_dir: PathBuf,
        pipeline_dir: PathBuf,
    ) -> Self {
        StepContext {
            step_id: step_id.to_string(),
            run_id,
            attempt: 1,
            inputs: IndexMap::new(),
            connection: None,
            cancel: CancellationToken::new(),
            redactor,
            run_dir,
            pipeline_dir,
            pipeline: String::new(),
            history: None,
            run_started_at: chrono::Utc::now(),
            resources: Arc::default(),
            observer,
            evaluator: None,
        }
    }

    /// Give the step the templates and variables of its run (the executor does this; tests
    /// of steps that evaluate deferred templates do it by hand).
    pub fn set_evaluator(
        &mut self,
        templates: Arc<crate::template::Templates>,
        scope: crate::template::Scope,
    ) {
        self.evaluator = Some((templates, scope));
    }

    /// Evaluate one of the step's deferred templates ([`StaticInfo::deferred`]) with extra
    /// local names (`values`). A lone `{{ expr }}` keeps its type.
    pub fn evaluate(
        &self,
        template: &str,
        locals: &[(&str, serde_json::Value)],
    ) -> Result<serde_json::Value, String> {
        let (templates, scope) = self
            .evaluator
            .as_ref()
            .ok_or("templates are not available to this step")?;
        let mut scope = scope.clone();
        for (name, value) in locals {
            scope = scope.with(name, minijinja::Value::from_serialize(value));
        }
        templates
            .render_str(template, &scope)
            .map_err(|e| self.redactor.redact(&e))
    }

    /// Evaluate a deferred condition: true or false.
    pub fn truthy(
        &self,
        template: &str,
        locals: &[(&str, serde_json::Value)],
    ) -> Result<bool, String> {
        let (templates, scope) = self
            .evaluator
            .as_ref()
            .ok_or("templates are not available to this step")?;
        let mut scope = scope.clone();
        for (name, value) in locals {
            scope = scope.with(name, minijinja::Value::from_serialize(value));
        }
        templates
            .truthy(template, &scope)
            .map_err(|e| self.redactor.redact(&e))
    }

    /// Write a log row for this step (redacted here, before it leaves the step).
    pub fn log(&self, level: Level, message: &str) {
        self.log_full(level, message, None, None);
    }

    pub fn log_full(
        &self,
        level: Level,
        message: &str,
        description: Option<&str>,
        file: Option<&str>,
    ) {
        self.observer.event(&RunEvent::Log(LogRecord {
            time: chrono::Utc::now(),
            level,
            step: Some(self.step_id.clone()),
            message: self.redactor.redact(message),
            description: description.map(|d| self.redactor.redact(d)),
            file: file.map(str::to_string),
        }));
    }

    /// Report live counters (shown on the progress line, not recorded).
    pub fn progress(&self, counters: &[(&str, u64)]) {
        self.observer.event(&RunEvent::Progress {
            step: self.step_id.clone(),
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        });
    }
}

/// Table work the engine needs for `foreach` without knowing what a table is inside (the
/// `steps` crate implements it with Polars).
pub trait TableOps: Send + Sync {
    /// The items' tables as one: columns unioned (missing values null), an `item` column
    /// holding each row's item key first.
    fn combine(&self, parts: Vec<(serde_json::Value, Table)>) -> Result<Table, String>;
    /// The rows of `table` whose `item` column equals `key`, without that column; `None`
    /// when the table has no `item` column.
    fn rows_of_item(&self, table: &Table, key: &serde_json::Value)
        -> Result<Option<Table>, String>;
    /// Write `table` to `path` (Parquet), for `keep_tables:`.
    fn save(&self, table: &Table, path: &std::path::Path) -> Result<(), String>;
    /// Read a table [`TableOps::save`] wrote.
    fn load(&self, path: &std::path::Path) -> Result<Table, String>;
}

/// What steps may ask the run history.
pub trait HistoryView: Send + Sync {
    /// The rows handled by finished steps of type `step_type` (`carol.send`) in
    /// `pipeline`'s runs since `since`.
    fn rows_since(
        &self,
        pipeline: &str,
        step_type: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, String>;
}

/// A step type's config and behaviour.
#[async_trait]
pub trait StepConfig: DeserializeOwned + JsonSchema + Send + Sync + 'static {
    /// The `type:` string.
    const TYPE: &'static str;
    /// One line for `pipe` docs and the README step reference.
    const SUMMARY: &'static str;
    /// The name under which `outputs:` templates see the result object.
    const RESULT_NAME: &'static str = "result";

    /// What is known before running (tables, outputs). Called on the unrendered config.
    fn static_info(&self) -> StaticInfo {
        StaticInfo::default()
    }

    /// What is wrong with the config on its own (see [`Problem`]). Called by `pipe validate`
    /// on the unrendered config and by the run on the rendered one, before
    /// [`StepConfig::run`]. Templated scalars arrive here as zero, false or the template
    /// text in validation: name the keys a verdict rests on, so they are skipped then.
    fn problems(&self) -> Vec<Problem> {
        Vec::new()
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError>;
}

type RunFuture = Pin<Box<dyn Future<Output = Result<StepOutput, StepError>> + Send>>;

/// A registered step type, with its behaviour erased to function pointers.
#[derive(Clone)]
pub struct StepKind {
    pub name: &'static str,
    pub summary: &'static str,
    pub result_name: &'static str,
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    /// Check an unrendered `with:` node; templated scalars are accepted wherever a value
    /// of another type is expected (they are checked again after rendering).
    pub check: fn(&Node, &mut Diags) -> Option<StaticInfo>,
    /// Deserialize a rendered `with:` node and run it.
    pub run: fn(Node, StepContext) -> Result<RunFuture, StepError>,
}

impl StepKind {
    pub fn of<C: StepConfig>() -> StepKind {
        StepKind {
            name: C::TYPE,
            summary: C::SUMMARY,
            result_name: C::RESULT_NAME,
            schema: |g| g.subschema_for::<C>(),
            check: |node, diags| {
                let config = de::from_node::<C>(node, Mode::Check, diags)?;
                report_problems(&config.problems(), node, diags);
                Some(config.static_info())
            },
            run: |node, ctx| {
                let mut diags = Diags::new(&ctx.step_id);
                match de::from_node::<C>(&node, Mode::Run, &mut diags) {
                    Some(config) => {
                        let problems = config.problems();
                        if !problems.is_empty() {
                            // Validate skipped these: they rest on templated values.
                            return Err(StepError::fatal(format!(
                                "invalid configuration after rendering templates: {}",
                                problems
                                    .iter()
                                    .map(|p| p.message.as_str())
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            )));
                        }
                        Ok(Box::pin(config.run(ctx)))
                    }
                    None => Err(StepError::fatal(format!(
                        "invalid configuration after rendering templates: {}",
                        diags
                            .items
                            .iter()
                            .map(|d| format!("line {}: {}", d.line, d.message))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ))),
                }
            },
        }
    }
}

/// Every step type `pipe` knows, by name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: IndexMap<&'static str, StepKind>,
    /// How `foreach` combines and splits tables.
    pub table_ops: Option<Arc<dyn TableOps>>,
    /// The connection types (`connections:` entries are checked against them).
    pub connections: crate::connection::Connections,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, kind: StepKind) -> &mut Self {
        self.kinds.insert(kind.name, kind);
        self
    }
    pub fn get(&self, name: &str) -> Option<&StepKind> {
        self.kinds.get(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
    pub fn kinds(&self) -> impl Iterator<Item = &StepKind> {
        self.kinds.values()
    }
}
