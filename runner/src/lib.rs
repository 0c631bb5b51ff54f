//! One run path: [`Runner::prepare`]`(`[`RunSpec`]`)` → [`PreparedRun::start`] →
//! [`RunHandle::join`], shared by `pipe run`, the service's embedded workers and (later)
//! remote workers, so none of them copies the run lifecycle.
//!
//! Why this shape (DataFusion's plan / task context / runtime split):
//! - The validated [`Plan`] is immutable and shared (`Arc<Plan>`), by several runs at once.
//! - What one run needs — its params, logical date, redactor, template runtime, connection
//!   overrides (`--sandbox`, stored credentials), secret source, history writer, cancellation — is built by
//!   [`Runner::prepare`] and owned by the run; nothing of it is a process-wide `static`.
//! - What a worker shares between its runs — the registry of step and connection kinds,
//!   the state dir / store, the token caches (with a TTL), the default secret source —
//!   is the [`Runner`].
//! - Terminal concerns stay in the CLI: progress, the summary, signals, exit codes. They
//!   reach the run through observers and [`RunControls`].
//!
//! Every access to the run history goes through the `store` module (one place to switch to
//! the `store` crate's `RunStore`).

pub mod params;
pub mod redaction;
pub mod repair;
mod sandbox;
mod store;
mod vault;

pub use params::ParamValue;
pub use store::{StoreConfig, Trigger, PIPELINE_SNAPSHOT};

use chrono::{DateTime, Utc};
use engine::diag::Diagnostic;
use engine::events::{Observer, RunEvent, StepRecord};
use engine::executor::{self, ReusedStep, RunRequest};
use engine::plan::Plan;
use engine::secrets::{Redactor, Secrets};
use engine::status::Status;
use engine::step::{Registry, Resources};
use engine::template::{Overrides, Runtime, Templates};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How a worker is set up.
pub struct RunnerConfig {
    /// Where run files live (`--state-dir`), and the SQLite history by default.
    pub state_dir: PathBuf,
    /// The run store (`--db` / `PIPE_DB`): `None` for SQLite in the state dir.
    pub db: Option<String>,
    /// An open store to use instead of opening `db` (a service shares one).
    pub store: Option<Arc<dyn ::store::RunStore>>,
    /// The lease id that owns this runner's runs, kept renewed by the caller (a service's
    /// worker). `None`: each run takes a lease of its own for as long as it runs.
    pub lease_owner: Option<String>,
    /// The step types and connection kinds.
    pub registry: Arc<Registry>,
    /// Where `secret()` reads from, unless a run's spec brings its own.
    pub secrets: Secrets,
    /// How long cached login tokens are trusted at most and kept unused.
    pub token_ttl: Duration,
}

impl RunnerConfig {
    /// Every step type of `steps`, secrets from the environment, the default token TTL.
    pub fn new(state_dir: impl Into<PathBuf>) -> RunnerConfig {
        RunnerConfig {
            state_dir: state_dir.into(),
            db: None,
            store: None,
            lease_owner: None,
            registry: Arc::new(steps::registry()),
            secrets: Secrets::default(),
            token_ttl: engine::step::DEFAULT_TOKEN_TTL,
        }
    }
}

/// A worker's environment: what its runs share. Cheap to share behind an `Arc`.
pub struct Runner {
    store: Arc<store::StoreHandle>,
    registry: Arc<Registry>,
    secrets: Secrets,
    resources: Arc<Resources>,
}

/// A pipeline file, validated, with its warnings and the text that was validated.
#[derive(Clone)]
pub struct Loaded {
    pub plan: Arc<Plan>,
    /// Warnings and notes (no errors: the file is valid).
    pub diagnostics: Vec<Diagnostic>,
    /// The file's text as validated (kept with the run in the store).
    pub source: Arc<str>,
}

/// Which pipeline a run runs.
#[derive(Clone)]
pub enum PlanSource {
    /// Validate this file first (its warnings end up in [`PreparedRun::diagnostics`]).
    File(PathBuf),
    /// A file validated by [`Runner::load`] (its text is what the run keeps).
    Loaded(Loaded),
    /// An already validated plan (a service validates each file once and runs it often);
    /// the run keeps the file's text as it reads it when the run is recorded.
    Plan(Arc<Plan>),
}

/// What to run, and how.
#[derive(Clone)]
pub struct RunSpec {
    pub plan: PlanSource,
    /// What started the run (recorded).
    pub trigger: Trigger,
    /// Param values by name, in the order given; the rest take their defaults.
    pub params: Vec<(String, ParamValue)>,
    /// "Today" in templates. Default: under `sandbox` the fakes' anchor date, else now.
    pub logical_date: Option<DateTime<Utc>>,
    /// Steps at once (default: the pipeline's `concurrency`, else the number of CPUs).
    pub concurrency: Option<usize>,
    /// Run against the local fakes (`pipe run --sandbox`).
    pub sandbox: bool,
    /// Render the plan, run nothing, record nothing ([`PreparedRun::preview`]).
    pub dry_run: bool,
    /// Where `secret()` reads from for this run (default: the runner's).
    pub secrets: Option<Secrets>,
    /// The queue item this run comes from (linked to the run when it is recorded; the
    /// service acks it).
    pub queue_item: Option<i64>,
    /// The lease id that owns this run, kept renewed by the caller (a service's worker);
    /// default: the runner's [`RunnerConfig::lease_owner`], else a lease of the run's own.
    pub lease_owner: Option<String>,
    /// Continue this finished run as its next attempt (a repair: `pipe runs repair ID`)
    /// instead of recording a new run; [`PreparedRun::attempt`] says which attempt.
    pub resume: Option<i64>,
    /// With `resume`: the steps an earlier attempt settled that this one keeps (see
    /// [`repair::plan_repair`]); they do not run again.
    pub reuse: HashMap<String, ReusedStep>,
    /// The fencing token of the queue claim this run comes from (a remote worker's): the
    /// run is recorded under it and each history write checks it, so once the claim was
    /// taken away (the worker's lease expired) nothing more is written and the run is
    /// cancelled.
    pub fence: Option<i64>,
}

impl RunSpec {
    /// A CLI run of `plan` with every default.
    pub fn new(plan: PlanSource) -> RunSpec {
        RunSpec {
            plan,
            trigger: Trigger::Cli,
            params: Vec::new(),
            logical_date: None,
            concurrency: None,
            sandbox: false,
            dry_run: false,
            secrets: None,
            queue_item: None,
            lease_owner: None,
            resume: None,
            reuse: HashMap::new(),
            fence: None,
        }
    }
}

/// Why a run could not be prepared; nothing ran. The `Display` is the message `pipe run`
/// prints after `error: `.
#[derive(Debug)]
#[non_exhaustive]
pub enum PrepareError {
    /// The file is not a valid pipeline (every diagnostic, errors and warnings).
    Invalid {
        file: String,
        diagnostics: Vec<Diagnostic>,
    },
    /// The local fakes could not start, or a connection cannot run against them.
    Sandbox(String),
    /// A param value (or default) is missing or wrong.
    Param(String),
    /// The run history cannot be opened or written.
    History(String),
    /// A connection's stored credential cannot be used (missing, no or wrong master key,
    /// of another type); the message names the connection and the credential.
    Credential(String),
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrepareError::Invalid { file, .. } => {
                write!(f, "{file} is not a valid pipeline; nothing ran")
            }
            PrepareError::Sandbox(e) => write!(f, "sandbox: {e}"),
            PrepareError::Param(e) | PrepareError::History(e) | PrepareError::Credential(e) => {
                f.write_str(e)
            }
        }
    }
}

impl std::error::Error for PrepareError {}

impl Runner {
    pub fn new(config: RunnerConfig) -> Runner {
        Runner {
            store: Arc::new(store::StoreHandle::new(
                StoreConfig {
                    url: config.db,
                    state_dir: config.state_dir,
                },
                config.store,
                config.lease_owner,
            )),
            registry: config.registry,
            secrets: config.secrets,
            resources: Arc::new(Resources::new(config.token_ttl)),
        }
    }

    pub fn state_dir(&self) -> &Path {
        self.store.state_dir()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// What this worker's runs share (token caches).
    pub fn resources(&self) -> &Arc<Resources> {
        &self.resources
    }

    /// Validate a pipeline file (`display` is how diagnostics name it).
    pub fn load(&self, path: &Path, display: &str) -> Result<Loaded, PrepareError> {
        let (outcome, text) =
            engine::validate::validate_file_with_text(path, display, &self.registry);
        match (outcome.plan, text) {
            (Some(plan), Some(text)) => Ok(Loaded {
                plan: Arc::new(plan),
                diagnostics: outcome.diagnostics,
                source: text.into(),
            }),
            _ => Err(PrepareError::Invalid {
                file: display.to_string(),
                diagnostics: outcome.diagnostics,
            }),
        }
    }

    /// Everything before the first step: the plan (validated), the fakes (`sandbox`), the
    /// logical date, the params (typed), the template runtime of the run, and — unless a
    /// dry run — the run recorded as `running` with its history writer.
    pub async fn prepare(&self, spec: RunSpec) -> Result<PreparedRun, PrepareError> {
        let loaded = match &spec.plan {
            PlanSource::Plan(plan) => (plan.clone(), Vec::new(), None),
            PlanSource::Loaded(l) => (
                l.plan.clone(),
                l.diagnostics.clone(),
                Some(l.source.clone()),
            ),
            PlanSource::File(path) => {
                let l = self.load(path, &path.display().to_string())?;
                (l.plan, l.diagnostics, Some(l.source))
            }
        };
        let (plan, diagnostics, source) = loaded;
        // A service's plan came from a file: the run keeps that file's text as it is now.
        let source = source.or_else(|| std::fs::read_to_string(&plan.file).ok().map(Into::into));
        let (fakes, mut overrides, default_date) = if spec.sandbox {
            let a = sandbox::attach(&plan, &self.registry, self.state_dir())
                .await
                .map_err(PrepareError::Sandbox)?;
            (Some(a.fakes), a.overrides, Some(a.anchor))
        } else {
            (None, Overrides::default(), None)
        };
        let secrets = match self.resolve_credentials(&spec, &plan, &mut overrides).await {
            Ok(secrets) => secrets,
            Err(e) => {
                if let Some(f) = fakes {
                    f.shutdown().await;
                }
                return Err(e);
            }
        };
        let mut prepared = self
            .prepare_with(&spec, plan, source, &mut overrides, default_date, &secrets)
            .await;
        match &mut prepared {
            Ok(p) => {
                p.fakes = fakes;
                p.diagnostics = diagnostics;
            }
            Err(_) => {
                if let Some(f) = fakes {
                    f.shutdown().await;
                }
            }
        }
        prepared
    }

    /// A run that could not be prepared (`why`: its stored credential is missing, a param is
    /// wrong, the fakes did not start), recorded as `failed` with the reason as its error
    /// and its one log row: a service's operators find it in the runs list and on the
    /// dashboard, where a `pipe run` prints the reason instead. A repair (`resume`) records
    /// the failure as the run's next attempt. Its queue item is done with it. The reason
    /// names connections, credentials and params, never a value. Returns the run id.
    pub async fn record_unstartable(
        &self,
        spec: &RunSpec,
        why: &PrepareError,
    ) -> Result<i64, PrepareError> {
        let plan = match &spec.plan {
            PlanSource::Plan(plan) => plan.clone(),
            PlanSource::Loaded(l) => l.plan.clone(),
            PlanSource::File(path) => self.load(path, &path.display().to_string())?.plan,
        };
        let error = format!("the run could not start: {why}");
        let params = serde_json::Value::Object(
            spec.params
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        ParamValue::Json(j) => j.clone(),
                        ParamValue::Text(t) => serde_json::Value::String(t.clone()),
                    };
                    (k.clone(), v)
                })
                .collect(),
        );
        let handle = self.store.clone();
        let new = ::store::NewRun {
            params,
            logical_date: spec.logical_date,
            lease_owner: spec.lease_owner.clone(),
            queue_item: spec.queue_item,
            fence: spec.fence,
            ..::store::NewRun::new(plan.name.clone(), spec.trigger, ::store::Owner::Pipe)
        };
        let resume = spec.resume;
        tokio::task::spawn_blocking(move || handle.record_unstartable(new, resume, &error))
            .await
            .map_err(|e| PrepareError::History(format!("cannot record the run: {e}")))?
    }

    /// Resolve the plan's `credential:` connections into `overrides` (see the `credentials`
    /// module); the private values the run must mask. A dry run resolves none (it records
    /// nothing, needs no store and no key).
    async fn resolve_credentials(
        &self,
        spec: &RunSpec,
        plan: &Arc<Plan>,
        overrides: &mut Overrides,
    ) -> Result<Vec<String>, PrepareError> {
        let named = vault::named(plan);
        if named.is_empty() || spec.dry_run {
            return Ok(Vec::new());
        }
        let sandboxed = overrides.connections.clone();
        let needs_vault = named
            .iter()
            .any(|(connection, _)| sandboxed.get(connection).is_none());
        let (handle, plan2, registry) = (self.store.clone(), plan.clone(), self.registry.clone());
        let resolved = tokio::task::spawn_blocking(move || {
            let opened = match needs_vault {
                true => Some(handle.vault(&registry.connections)?),
                false => None,
            };
            vault::resolve(&plan2, &named, &sandboxed, opened.as_ref())
                .map_err(PrepareError::Credential)
        })
        .await
        .map_err(|e| PrepareError::Credential(format!("cannot resolve credentials: {e}")))??;
        overrides.connections = resolved.connections;
        Ok(resolved.secrets)
    }

    async fn prepare_with(
        &self,
        spec: &RunSpec,
        plan: Arc<Plan>,
        source: Option<Arc<str>>,
        overrides: &mut Overrides,
        default_date: Option<DateTime<Utc>>,
        secrets: &[String],
    ) -> Result<PreparedRun, PrepareError> {
        let tz = plan.timezone();
        let logical_date = spec.logical_date.or(default_date).unwrap_or_else(Utc::now);
        let params = params::resolve(&plan, &spec.params).map_err(PrepareError::Param)?;
        let redactor = Redactor::new();
        // Stored credentials' private values, before anything can print one.
        for secret in secrets {
            redactor.add(secret);
        }
        let registration = redaction::register(&redactor);
        overrides.secret_source = spec.secrets.clone().unwrap_or_else(|| self.secrets.clone());
        let templates = Arc::new(Templates::new(Runtime {
            redactor: redactor.clone(),
            tz,
            logical_date,
            dry_run: spec.dry_run,
            overrides: std::mem::take(overrides),
        }));
        let mut param_values = std::collections::BTreeMap::new();
        for (name, value) in &params {
            let v = engine::params::template_value(&plan.params[name], value, logical_date, tz)
                .map_err(|e| PrepareError::Param(format!("param `{name}`: {e}")))?;
            param_values.insert(name.clone(), v);
        }
        let started_at = Utc::now();
        // A literal value in the file that the run masks is `***` in the kept text, which
        // is written at the end (see `RunStore::create_run_kept`).
        let kept: Option<Arc<str>> = if spec.dry_run {
            None
        } else {
            source.as_deref().map(|s| redactor.redact(s).into())
        };
        let recorded = if spec.dry_run {
            None
        } else {
            let recorded_params = redactor.redact_json(&serde_json::Value::Object(
                params.clone().into_iter().collect(),
            ));
            let (handle, plan2) = (self.store.clone(), plan.clone());
            let (trigger, queue_item, resume, fence) =
                (spec.trigger, spec.queue_item, spec.resume, spec.fence);
            let lease_owner = spec.lease_owner.clone();
            let kept = kept.clone();
            let r = tokio::task::spawn_blocking(move || {
                handle.record_run(store::NewRecord {
                    plan: &plan2,
                    source: kept.as_deref(),
                    params: recorded_params,
                    trigger,
                    logical_date,
                    queue_item,
                    resume,
                    lease_owner,
                    fence,
                })
            })
            .await
            .map_err(|e| PrepareError::History(format!("cannot record the run: {e}")))??;
            Some(r)
        };
        let concurrency = spec
            .concurrency
            .or(plan.concurrency.map(|c| c as usize))
            .unwrap_or_else(default_concurrency);
        Ok(PreparedRun {
            plan,
            params: minijinja::Value::from(param_values),
            templates,
            redactor,
            registration,
            logical_date,
            started_at,
            concurrency,
            recorded,
            fakes: None,
            resources: self.resources.clone(),
            diagnostics: Vec::new(),
            queue_item: spec.queue_item,
            source: source.filter(|_| spec.resume.is_none()),
            kept,
            reuse: spec.reuse.clone(),
            trigger: spec.trigger,
        })
    }
}

/// A run ready to start: recorded (unless a dry run), nothing executed yet.
pub struct PreparedRun {
    plan: Arc<Plan>,
    /// What templates see as `params`.
    params: minijinja::Value,
    templates: Arc<Templates>,
    redactor: Redactor,
    registration: redaction::Registration,
    logical_date: DateTime<Utc>,
    started_at: DateTime<Utc>,
    concurrency: usize,
    recorded: Option<store::Recorded>,
    fakes: Option<::sandbox::Sandbox>,
    resources: Arc<Resources>,
    diagnostics: Vec<Diagnostic>,
    queue_item: Option<i64>,
    /// The pipeline text, to keep (redacted) in the run folder once the run is over.
    source: Option<Arc<str>>,
    /// What was kept of it when the run was recorded (redacted with what was known then).
    kept: Option<Arc<str>>,
    reuse: HashMap<String, ReusedStep>,
    /// What started it (for notifications).
    trigger: Trigger,
}

/// One step of [`PreparedRun::preview`]: id, type, the rendered (redacted) config or why it
/// cannot be rendered yet.
pub type StepPreview = (String, String, Result<serde_json::Value, String>);

impl PreparedRun {
    /// The run's id in the history (`None` for a dry run, which records nothing).
    pub fn id(&self) -> Option<i64> {
        self.recorded.as_ref().map(|r| r.run_id)
    }
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }
    pub fn logical_date(&self) -> DateTime<Utc> {
        self.logical_date
    }
    /// The run's redactor (masks every secret the run has learnt).
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }
    /// The validator's warnings when the spec named a file.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }
    pub fn queue_item(&self) -> Option<i64> {
        self.queue_item
    }
    /// 1 for a new run; the repair's attempt number for a resumed one (0 for a dry run).
    pub fn attempt(&self) -> u32 {
        self.recorded.as_ref().map_or(0, |r| r.attempt)
    }
    /// The run's folder (`None` for a dry run).
    pub fn run_dir(&self) -> Option<&Path> {
        self.recorded.as_ref().map(|r| r.run_dir.as_path())
    }

    fn run_value(&self) -> minijinja::Value {
        engine::template::run_value(
            self.id().unwrap_or(0),
            self.started_at,
            self.logical_date,
            self.plan.timezone(),
        )
    }

    /// Each step's config rendered with placeholders for other steps' outputs, secrets as
    /// `***` (`--dry-run`). Runs nothing.
    pub fn preview(&self) -> Vec<StepPreview> {
        executor::preview(
            &self.plan,
            &self.templates,
            self.params.clone(),
            self.run_value(),
            &self.redactor,
        )
    }

    /// Do not run after all: the recorded run is finished `cancelled` with `why` (rather
    /// than left `running` until its lease expires), the fakes are stopped. A dry run has
    /// nothing to finish.
    pub async fn discard(self, why: &str) -> Result<(), String> {
        if let Some(f) = self.fakes {
            f.shutdown().await;
        }
        let Some(recorded) = self.recorded else {
            return Ok(());
        };
        let why = why.to_string();
        tokio::task::spawn_blocking(move || store::discard(recorded, &why))
            .await
            .map_err(|e| format!("cannot finish the run: {e}"))?
    }

    /// Start executing on the current tokio runtime; `observers` see every event after the
    /// history writer has. A dry run starts nothing: its outcome is `skipped` at once.
    pub fn start(self, observers: Vec<Arc<dyn Observer>>) -> RunHandle {
        let controls = RunControls {
            cancel: CancellationToken::new(),
            hard_cancel: CancellationToken::new(),
        };
        let id = self.id().unwrap_or(0);
        let c = controls.clone();
        let task = tokio::spawn(self.execute(observers, c));
        RunHandle { id, controls, task }
    }

    async fn execute(self, observers: Vec<Arc<dyn Observer>>, controls: RunControls) -> RunOutcome {
        let run = self.run_value();
        let PreparedRun {
            plan,
            params,
            templates,
            redactor,
            registration,
            started_at,
            concurrency,
            recorded,
            fakes,
            resources,
            source,
            kept,
            reuse,
            trigger,
            logical_date,
            ..
        } = self;
        let Some(store::Recorded {
            run_id,
            run_dir,
            writer,
            reader,
            lease,
            fenced,
            source_kept,
            store: run_store,
            ..
        }) = recorded
        else {
            return RunOutcome {
                run_id: 0,
                status: Status::Skipped,
                error: Some("a dry run runs nothing".into()),
                steps: Vec::new(),
                elapsed: Duration::ZERO,
                sandbox: None,
                history_error: None,
                _registration: Some(registration),
            };
        };
        let (plan_kept, redactor_kept) = (plan.clone(), redactor.clone());
        let mut all: Vec<Arc<dyn Observer>> = vec![writer.clone()];
        all.extend(observers);
        let observer: Arc<dyn Observer> = Arc::new(Fanout(all));
        let clock = Instant::now();
        // A fenced run whose claim was taken away stops: nothing it does is recorded.
        let fence_watch = fenced.then(|| {
            let (writer, controls) = (writer.clone(), controls.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(FENCE_POLL).await;
                    if writer.fenced_out() {
                        controls.cancel();
                        return;
                    }
                }
            })
        });
        // The run's `notify:` entries; none under --sandbox, which stays offline.
        let notifications = if fakes.is_some() {
            None
        } else {
            notify::RunNotifications::start(
                notify::Notifier::new(&plan, templates.clone(), params.clone(), run.clone()),
                notify::RunSummary::started(
                    &plan.name,
                    run_id,
                    trigger.as_str(),
                    Some(logical_date),
                    started_at,
                ),
                observer.clone(),
            )
        };
        let result = executor::execute(RunRequest {
            plan,
            params,
            run,
            run_id,
            concurrency,
            run_dir,
            templates,
            redactor,
            observer,
            cancel: controls.cancel.clone(),
            hard_cancel: controls.hard_cancel.clone(),
            history: Some(reader),
            started_at,
            resources,
            reuse,
        })
        .await;
        if let Some(w) = fence_watch {
            w.abort();
        }
        if let Some(n) = notifications {
            // Never fails the run: what could not be sent is a warning row of its history
            // (the writer is still open).
            n.finish(result.status, result.error.as_deref(), &result.steps)
                .await;
        }
        if let Some(text) = &source {
            let now = redactor_kept.redact(text);
            // Written only now, redacted with all the run masked (a value a script masked
            // may be in the text), unless the store had exactly this text at the start.
            if !source_kept || kept.as_deref() != Some(now.as_str()) {
                let _ = tokio::task::spawn_blocking(move || {
                    store::keep_pipeline_text(run_store.as_ref(), run_id, &plan_kept, &now)
                })
                .await;
            }
        }
        let sandbox = match fakes {
            Some(f) => {
                let stats = sandbox::stats(&f);
                f.shutdown().await;
                Some(stats)
            }
            None => None,
        };
        let elapsed = clock.elapsed();
        let history_error = tokio::task::spawn_blocking(move || store::finish(writer, lease))
            .await
            .unwrap_or_else(|e| Some(format!("the history writer panicked: {e}")));
        RunOutcome {
            run_id,
            status: result.status,
            error: result.error,
            steps: result.steps,
            elapsed,
            sandbox,
            history_error,
            _registration: Some(registration),
        }
    }
}

/// How often a fenced run checks whether its claim was taken away.
const FENCE_POLL: Duration = Duration::from_millis(500);

/// Cancel a running run from anywhere (a signal handler, the service's drain).
#[derive(Clone, Debug)]
pub struct RunControls {
    cancel: CancellationToken,
    hard_cancel: CancellationToken,
}

impl RunControls {
    /// Stop running steps; teardown (`always:`) steps still run.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
    /// Stop teardown steps too.
    pub fn hard_cancel(&self) {
        self.cancel.cancel();
        self.hard_cancel.cancel();
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A started run.
pub struct RunHandle {
    id: i64,
    controls: RunControls,
    task: tokio::task::JoinHandle<RunOutcome>,
}

impl RunHandle {
    /// The run's id in the history.
    pub fn id(&self) -> i64 {
        self.id
    }
    /// See [`RunControls::cancel`].
    pub fn cancel(&self) {
        self.controls.cancel();
    }
    /// See [`RunControls::hard_cancel`].
    pub fn hard_cancel(&self) {
        self.controls.hard_cancel();
    }
    /// A clonable way to cancel this run from another task.
    pub fn controls(&self) -> RunControls {
        self.controls.clone()
    }
    /// Wait for the run to finish (recorded, fakes stopped, history drained).
    pub async fn join(self) -> RunOutcome {
        match self.task.await {
            Ok(outcome) => outcome,
            // The executor catches a step's panic; this is a bug of the run path itself.
            Err(e) => RunOutcome {
                run_id: self.id,
                status: Status::Failed,
                error: Some(format!("the run stopped unexpectedly: {e}")),
                steps: Vec::new(),
                elapsed: Duration::ZERO,
                sandbox: None,
                history_error: None,
                _registration: None,
            },
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub run_id: i64,
    pub status: Status,
    /// The first failure, named.
    pub error: Option<String>,
    /// In plan order.
    pub steps: Vec<StepRecord>,
    /// From the first step's start to the fakes' shutdown.
    pub elapsed: Duration,
    /// Under `sandbox`: what the fakes received.
    pub sandbox: Option<serde_json::Value>,
    /// Set when the run history may be incomplete.
    pub history_error: Option<String>,
    /// The run's redactor stays registered for the panic hook while the outcome is held
    /// (a summary printed from it is still covered).
    _registration: Option<redaction::Registration>,
}

struct Fanout(Vec<Arc<dyn Observer>>);

impl Observer for Fanout {
    fn event(&self, e: &RunEvent) {
        for o in &self.0 {
            o.event(e);
        }
    }
}

/// Steps at once when neither the run nor the pipeline says: the cores available, read once
/// (`available_parallelism` reads the cgroup's files each time: a service starting hundreds
/// of runs a second paid for it on every run).
fn default_concurrency() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
}
