//! The typed pipeline model: what a pipeline file may say.
//!
//! These structs are both the parser's targets and the source of `pipe schema` (schemars),
//! so the JSON Schema an editor sees can never drift from what `pipe` accepts. Sections that
//! are checked one entry at a time (params, connections, steps, a step's `with:`) are kept as
//! [`Raw`] nodes here and deserialized on their own by `validate`, so one bad entry does not
//! hide the problems of the others; `#[schemars(with = ...)]` gives them their real schema.

use crate::de::Raw;
use crate::params::ParamSpec;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;

/// A pipeline file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "pipe pipeline")]
pub struct PipelineDoc {
    /// The pipeline's name: lowercase letters, digits, `-` and `_`.
    pub pipeline: String,
    /// What the pipeline does, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Typed params, given with `--param name=value` or by their defaults.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ParamSpec>")]
    pub params: IndexMap<String, Raw>,
    /// Named, typed, reusable connections that steps refer to with `connection:`.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ConnectionSpec>")]
    pub connections: IndexMap<String, Raw>,
    /// When the scheduler runs the pipeline.
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// The pipeline as an integration of `pipe serve`: metadata and queueing.
    #[serde(default)]
    pub integration: Option<Integration>,
    /// How many steps may run at once (default: the number of CPUs).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Write each step's table as Parquet in the run's folder (`tables/<step>.parquet`), so
    /// `pipe runs repair` can reuse a succeeded step's table instead of running it again.
    #[serde(default)]
    pub keep_tables: bool,
    /// The steps, by id. Order does not matter: dependencies come from `needs`, `input(s)`
    /// and template references to `steps.<id>`.
    #[schemars(with = "IndexMap<String, StepSpec>")]
    pub steps: IndexMap<String, Raw>,
    /// Values used only by `pipe run --sandbox`, which runs the pipeline offline against
    /// local fakes: what `secret()` and `env()` return there. Templates here see `sandbox`
    /// (e.g. `{{ sandbox.tiflux.user }}`).
    #[serde(default)]
    pub sandbox: Option<SandboxBlock>,
    /// Who hears about a run: webhooks and e-mails on failure, success, a long run or a
    /// pause (see the README's "Notifications").
    #[serde(default)]
    #[schemars(with = "Vec<NotifySpec>")]
    pub notify: Vec<Raw>,
}

/// The `sandbox:` block.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxBlock {
    /// Secrets by name, as `secret('NAME')` returns them under `--sandbox`.
    #[serde(default)]
    pub secrets: IndexMap<String, String>,
    /// Environment variables by name, as `env('NAME')` returns them under `--sandbox`.
    #[serde(default)]
    pub env: IndexMap<String, String>,
}

/// A connection: a `type` and that type's fields (templates allowed; secret fields should
/// use `secret('NAME')`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ConnectionSpec {
    /// The connection type (`http`, `google_service_account`, `bigquery`, `postgres` …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The type's own fields.
    #[serde(flatten)]
    pub fields: IndexMap<String, serde_json::Value>,
}

/// When `pipe serve` runs the pipeline: a `cron` or an `interval`, in a timezone, and what
/// to do about overlapping runs and missed ticks. Give exactly one of `cron` and `interval`.
///
/// DST: a wall-clock time that does not exist (spring forward) fires once, at the first
/// instant after the gap; one that happens twice (fall back) fires once, at its first
/// occurrence. Intervals step in UTC, aligned to the Unix epoch.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["cron"] }, { "required": ["interval"] }]))]
pub struct Schedule {
    /// Five fields (minute hour day-of-month month day-of-week), or six with seconds first,
    /// read in `timezone`.
    #[serde(default)]
    pub cron: Option<String>,
    /// Run every so often instead of a cron: `30s`, `15m`, `1h` (whole seconds, at least
    /// 1s), at multiples of the interval since 1970-01-01T00:00:00Z.
    #[serde(default)]
    pub interval: Option<DurationSpec>,
    /// An IANA timezone such as `America/Sao_Paulo` (default UTC). Also the zone of "today"
    /// in templates.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Set to false to keep the schedule but not run it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How many runs of this pipeline may run at once (default 1).
    #[serde(default)]
    pub max_concurrent_runs: Option<u32>,
    /// What a tick does while `max_concurrent_runs` runs are running (default `skip`).
    #[serde(default)]
    pub on_overlap: OnOverlap,
    /// Which ticks missed while the service was down still run (default `latest`).
    #[serde(default)]
    pub catch_up: CatchUp,
    /// The most ticks run at once to catch up (default 100, at most 10000); the oldest are
    /// dropped beyond.
    #[serde(default)]
    pub max_catch_up: Option<u32>,
    /// Disable the integration after this many consecutive failed runs (and notify).
    #[serde(default)]
    pub pause_after_failures: Option<u32>,
}

/// What a tick does when the pipeline already runs `max_concurrent_runs` times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnOverlap {
    /// The tick is skipped (recorded, not run).
    #[default]
    Skip,
    /// The tick's run waits in the queue (the queue per pipeline is capped).
    Queue,
    /// The oldest running run is cancelled and the tick's run starts.
    CancelRunning,
}

/// Which missed ticks run after downtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Missed ticks are dropped.
    None,
    /// Only the most recent missed tick runs.
    #[default]
    Latest,
    /// Every missed tick runs, up to `max_catch_up` (the newest).
    All,
}

/// The default of `max_catch_up`.
pub const DEFAULT_MAX_CATCH_UP: u32 = 100;
/// The largest `max_catch_up`: a catch-up never floods the queue.
pub const MAX_MAX_CATCH_UP: u32 = 10_000;
/// The largest `max_concurrent_runs`.
pub const MAX_CONCURRENT_RUNS: u32 = 10_000;

/// What fires a schedule, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScheduleTrigger {
    /// A cron expression that parses (5 fields, or 6 with seconds first).
    Cron(String),
    /// A whole number of seconds, at least 1.
    Interval(std::time::Duration),
}

/// A validated `schedule:` with its defaults applied (on [`crate::plan::Plan::schedule`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub trigger: ScheduleTrigger,
    pub timezone: chrono_tz::Tz,
    pub enabled: bool,
    /// At least 1.
    pub max_concurrent_runs: u32,
    pub on_overlap: OnOverlap,
    pub catch_up: CatchUp,
    /// 1 to [`MAX_MAX_CATCH_UP`].
    pub max_catch_up: u32,
    /// At least 1 when set.
    pub pause_after_failures: Option<u32>,
}

/// How the pipeline runs as an integration under `pipe serve`: what it is for people (group,
/// direction, system, owner, tags) and how its runs are queued.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Integration {
    /// The control process or family the integration belongs to.
    #[serde(default)]
    pub group: Option<String>,
    /// Which way the data flows, seen from here.
    #[serde(default)]
    pub direction: Option<Direction>,
    /// The system on the other side (`Tiflux`, `Carol` …).
    #[serde(default)]
    pub external_system: Option<String>,
    /// Who answers for it (a person or a team).
    #[serde(default)]
    pub owner: Option<String>,
    /// Free labels for filtering.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The named queue its runs go through (default `default`): letters, digits, `-`, `_`.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Higher runs first within a queue (default 0).
    #[serde(default)]
    pub priority: i32,
    /// Run again a run whose owner died (lease expired) instead of marking it abandoned.
    #[serde(default)]
    pub retry_on_lost: bool,
    /// With `retry_on_lost`: how many times one tick's run may be lost and queued again
    /// before it stays abandoned (default 3).
    #[serde(default = "default_max_lost_retries")]
    pub max_lost_retries: u32,
}

impl Default for Integration {
    fn default() -> Self {
        Integration {
            group: None,
            direction: None,
            external_system: None,
            owner: None,
            tags: Vec::new(),
            queue: default_queue(),
            priority: 0,
            retry_on_lost: false,
            max_lost_retries: default_max_lost_retries(),
        }
    }
}

fn default_max_lost_retries() -> u32 {
    3
}

fn default_queue() -> String {
    "default".to_string()
}

/// Which way an integration moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the external system into ours.
    Inward,
    /// From ours to the external system.
    Outward,
    /// Both ways.
    Bidirectional,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inward => "inward",
            Direction::Outward => "outward",
            Direction::Bidirectional => "bidirectional",
        }
    }
}

impl OnOverlap {
    pub fn as_str(self) -> &'static str {
        match self {
            OnOverlap::Skip => "skip",
            OnOverlap::Queue => "queue",
            OnOverlap::CancelRunning => "cancel_running",
        }
    }
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        }
    }
}

fn yes() -> bool {
    true
}

/// One step: the envelope common to every step type, and the type's own config in `with:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The step type (see `pipe schema` or the README's step reference).
    #[serde(rename = "type")]
    pub kind: String,
    /// What the step does, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Steps that must finish before this one starts.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Run only when this is true (a template such as `"{{ params.days > 0 }}"`, or a boolean).
    #[serde(default, rename = "if")]
    pub condition: Option<Condition>,
    /// Try again on retryable failures (timeouts, connection errors …).
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// The longest one attempt may take (`30s`, `5m`); it is then cancelled and counts as a
    /// retryable failure.
    #[serde(default)]
    pub timeout: Option<DurationSpec>,
    /// Teardown: run once `needs` are done, whatever their status, even after a failure or
    /// Ctrl-C.
    #[serde(default)]
    pub always: bool,
    /// The connection (from `connections:`) the step uses.
    #[serde(default)]
    pub connection: Option<String>,
    /// The step whose table this step reads.
    #[serde(default)]
    pub input: Option<String>,
    /// Several input tables, by step id.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Derived outputs: templates over the step's result object, visible as
    /// `steps.<id>.<name>`.
    #[serde(default)]
    pub outputs: IndexMap<String, OutputSpec>,
    /// Fan-out: run the step once per item of a list (`"{{ steps.list.items }}"`), with
    /// `item` and `item_index` in its templates.
    #[serde(default)]
    pub foreach: Option<Foreach>,
    /// The step type's own config.
    #[serde(default, rename = "with")]
    #[schemars(with = "Option<serde_json::Value>")]
    pub config: Option<Raw>,
}

/// `if:` — a boolean or a template.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "a boolean or a template string")]
pub enum Condition {
    Bool(bool),
    Template(String),
}

/// A derived output: a template, or `{ value, secret }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "a template string, or a mapping with `value` and `secret`"
)]
pub enum OutputSpec {
    Template(String),
    Full(OutputFull),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputFull {
    /// The template.
    pub value: String,
    /// Redact the value everywhere (logs, history, summaries).
    #[serde(default)]
    pub secret: bool,
}

impl OutputSpec {
    pub fn template(&self) -> &str {
        match self {
            OutputSpec::Template(t) => t,
            OutputSpec::Full(f) => &f.value,
        }
    }
    pub fn secret(&self) -> bool {
        matches!(self, OutputSpec::Full(OutputFull { secret: true, .. }))
    }
}

/// `foreach:` — a template giving the list, or the full form.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "a template giving a list, or a mapping with `items`"
)]
pub enum Foreach {
    Items(String),
    Full(ForeachFull),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForeachFull {
    /// A template giving the list of items (`"{{ steps.list.items }}"`).
    pub items: String,
    /// Each item's key: recorded with its status and in the combined table's `item`
    /// column (a template over `item`, such as `"{{ item.id }}"`; default: the item itself
    /// when it is a string or number, else its 0-based position).
    #[serde(default)]
    pub key: Option<String>,
    /// How many items run at once (default 4).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// `fail` (default): the step fails after all items ran when any failed; `warn`: it ends
    /// with status `warning` and the table of the items that succeeded.
    #[serde(default)]
    pub on_item_failure: OnItemFailure,
}

/// What a failed item does to its `foreach` step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnItemFailure {
    /// The step fails once every item has run.
    #[default]
    Fail,
    /// The step ends with status `warning`.
    Warn,
}

impl Foreach {
    pub fn items(&self) -> &str {
        match self {
            Foreach::Items(t) => t,
            Foreach::Full(f) => &f.items,
        }
    }
    pub fn key(&self) -> Option<&str> {
        match self {
            Foreach::Items(_) => None,
            Foreach::Full(f) => f.key.as_deref(),
        }
    }
    pub fn concurrency(&self) -> usize {
        match self {
            Foreach::Full(ForeachFull {
                concurrency: Some(c),
                ..
            }) => (*c).max(1) as usize,
            _ => 4,
        }
    }
    pub fn on_item_failure(&self) -> OnItemFailure {
        match self {
            Foreach::Items(_) => OnItemFailure::Fail,
            Foreach::Full(f) => f.on_item_failure,
        }
    }
}

/// The names a `foreach` step's templates see besides params/steps/run.
pub const ITEM_LOCALS: &[&str] = &["item", "item_index"];
/// The outputs every `foreach` step sets.
pub const FOREACH_OUTPUTS: &[&str] = &["items", "succeeded", "failed", "skipped"];

/// Retries with exponential backoff and jitter.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first one included (1 = no retry).
    pub attempts: u32,
    /// The wait before the second attempt; doubled each time (default 1s).
    #[serde(default)]
    pub backoff: Option<DurationSpec>,
    /// The longest wait between attempts (default 1m).
    #[serde(default)]
    pub max_backoff: Option<DurationSpec>,
}

/// A duration: `500ms`, `30s`, `2m`, `1h`, or a number of seconds.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "a duration such as 30s, 2m or 1h")]
pub enum DurationSpec {
    Seconds(f64),
    Text(String),
}

impl DurationSpec {
    pub fn parse(&self) -> Result<std::time::Duration, String> {
        match self {
            DurationSpec::Seconds(s) => crate::duration::from_secs(*s),
            DurationSpec::Text(t) => crate::duration::parse(t),
        }
    }
}

/// Built-in outputs of every step.
pub const BUILTIN_OUTPUTS: &[&str] = &[
    "status",
    "succeeded",
    "started_at",
    "finished_at",
    "attempts",
    "rows",
    "error",
];

/// The keys of `run` in templates.
pub const RUN_FIELDS: &[&str] = &["id", "started_at", "logical_date", "today", "pipeline"];

/// One `notify:` entry: when, and exactly one of `webhook` or `email`. Templates in it see
/// `params`, `run`, `secret()`, `env()` and the locals of [`NOTIFY_LOCALS`].
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// When to send: `failure` (failed, cancelled or abandoned), `success`, `paused`,
    /// `duration_over: 30m` (once, while the run passes that duration), or a list of them.
    #[schemars(with = "NotifyOnSchema")]
    pub on: NotifyOn,
    /// POST a JSON summary to a URL, signed with HMAC-SHA256.
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
    /// Send an e-mail through an `smtp` connection.
    #[serde(default)]
    pub email: Option<EmailSpec>,
}

/// What a notification is about.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    /// The run failed, was cancelled or was abandoned.
    Failure,
    /// The run succeeded (with or without warnings).
    Success,
    /// The scheduler paused the integration (`pause_after_failures`).
    Paused,
    /// The run is still running after this long (sent once per run).
    DurationOver(DurationSpec),
}

impl NotifyEvent {
    /// The event's name, as in the file and the webhook body.
    pub fn name(&self) -> &'static str {
        match self {
            NotifyEvent::Failure => "failure",
            NotifyEvent::Success => "success",
            NotifyEvent::Paused => "paused",
            NotifyEvent::DurationOver(_) => "duration_over",
        }
    }
}

/// `on:` — one event or a list of them (read by hand so each list item is located).
#[derive(Debug, Clone, Default)]
pub struct NotifyOn(pub Vec<NotifyEvent>);

impl<'de> Deserialize<'de> for NotifyOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, IntoDeserializer};
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = NotifyOn;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("failure, success, paused, `duration_over: 30m`, or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<NotifyOn, E> {
                NotifyEvent::deserialize(s.into_deserializer()).map(|e| NotifyOn(vec![e]))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<NotifyOn, A::Error> {
                NotifyEvent::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|e| NotifyOn(vec![e]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<NotifyOn, A::Error> {
                let mut events = Vec::new();
                while let Some(e) = seq.next_element::<NotifyEvent>()? {
                    events.push(e);
                }
                Ok(NotifyOn(events))
            }
        }
        d.deserialize_any(V)
    }
}

/// The schema of `on:` (what [`NotifyOn`] reads).
#[derive(JsonSchema)]
#[allow(dead_code)]
#[serde(untagged)]
enum NotifyOnSchema {
    One(NotifyEvent),
    Many(Vec<NotifyEvent>),
}

/// `webhook:` — POST the run's summary as JSON.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// The `http://` or `https://` URL to POST to (redirects are not followed).
    pub url: String,
    /// The HMAC-SHA256 key: each request carries `X-Pipe-Timestamp` and `X-Pipe-Signature:
    /// sha256=<hex of HMAC(secret, timestamp + "." + body)>` (use `"{{ secret('NAME') }}"`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Extra request headers (templates allowed).
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Tries after the first on a 5xx, a 429 or a connection error, with backoff (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// The longest one request may take (default 10s).
    #[serde(default)]
    pub timeout: Option<DurationSpec>,
}

/// `email:` — a plain-text summary over SMTP.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailSpec {
    /// The `smtp` connection (from `connections:`) to send through.
    pub connection: String,
    /// The recipients (`ops@example.com` or `Ops <ops@example.com>`).
    pub to: Vec<String>,
    /// The sender.
    pub from: String,
    /// The subject (a template; default `[pipe] <pipeline> run <id> <status>`).
    #[serde(default)]
    pub subject: Option<String>,
}

/// The names `notify:` templates see besides params/run: the event (`failure` …), the
/// run's status and its error (none when it has none).
pub const NOTIFY_LOCALS: &[&str] = &["event", "status", "error"];
