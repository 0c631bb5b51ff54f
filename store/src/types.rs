//! The store's records. Inputs that may grow (`NewRun`, `Enqueue`, `IntegrationFile`,
//! `NewBackfill`) have a constructor and public fields, so adding a field later breaks no
//! caller; outputs are plain `Serialize` structs (`--format json` prints them).

use chrono::{DateTime, Utc};
use engine::events::Level;
use engine::status::Status;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? } $what:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(concat!("unknown ", $what, " `{}`"), other)),
                }
            }
        }
    };
}

string_enum! {
    /// Who drives a run: `pipe` (a `pipe run` or a service worker; judged by its lease) or
    /// an outside script through `pipe runs start/log/finish` (never marked abandoned).
    Owner {
        Pipe = "pipe",
        External = "external",
    } "run owner"
}

string_enum! {
    /// What started a run (or queued it).
    Trigger {
        /// `pipe run`.
        Cli = "cli",
        /// `pipe runs start`.
        External = "external",
        /// A schedule's tick.
        Schedule = "schedule",
        /// `pipe trigger`.
        Manual = "manual",
        /// `pipe backfill`.
        Backfill = "backfill",
        /// `pipe runs repair`.
        Repair = "repair",
    } "trigger"
}

string_enum! {
    /// Where a queue item is.
    QueueState {
        /// Waiting for a worker.
        Queued = "queued",
        /// Taken by a worker (its run may or may not exist yet).
        Claimed = "claimed",
        /// Its run finished (whatever its status).
        Done = "done",
        /// Cancelled before it ran, or given up by its worker.
        Cancelled = "cancelled",
    } "queue state"
}

string_enum! {
    /// What happened to a planned tick.
    TickState {
        /// A queue item was created for it.
        Enqueued = "enqueued",
        /// The planner decided not to run it (overlap, disabled, catch-up policy).
        Skipped = "skipped",
    } "tick state"
}

string_enum! {
    /// What a lease is for.
    LeaseKind {
        /// A process or worker that owns runs and claims.
        Owner = "owner",
        /// A named leader lease ([`crate::RunStore::try_lead`]).
        Leader = "leader",
    } "lease kind"
}

string_enum! {
    /// A backfill's state.
    BackfillState {
        Active = "active",
        Cancelled = "cancelled",
    } "backfill state"
}

/// How a claimed item ends ([`crate::RunQueue::ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckOutcome {
    /// Its run finished (whatever its status).
    Done,
    /// Given up without a run (the integration was disabled meanwhile, the worker stops).
    Cancelled,
}

/// A run about to start.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub pipeline: String,
    /// The run's params (already redacted), stored as JSON.
    pub params: serde_json::Value,
    pub trigger: Trigger,
    pub owner: Owner,
    pub logical_date: Option<DateTime<Utc>>,
    /// The lease owner id running it ([`crate::LeaseOwner::id`]); a `pipe`-owned run
    /// without one is judged by this process's pid, as before leases.
    pub lease_owner: Option<String>,
    /// The queue item it runs (linked in the same transaction; the item stays `claimed`
    /// until acked).
    pub queue_item: Option<i64>,
    /// The fencing token of the claim that runs it ([`QueueItem::fence`], from
    /// [`crate::RunStore::claim_item`]): the run is created only while `queue_item` is still
    /// claimed with this fence (else `Conflict`), and its fenced writes
    /// ([`crate::HistoryWriter::start_fenced`]) are refused once the run is no longer that
    /// claim's. `None` (a `pipe run`, the embedded service) checks nothing, as before.
    pub fence: Option<i64>,
    /// The pipeline text the run runs (redacted) and where its file was: the path is
    /// recorded, the text referenced when the store holds it already (see
    /// [`crate::RunStore::create_run_kept`]); kept once per distinct text, for a repair on
    /// any machine.
    pub source: Option<RunSource>,
}

/// What [`crate::RunStore::create_run_kept`] recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatedRun {
    pub id: i64,
    /// The run's source text was found in the store and is referenced by the run.
    pub source_kept: bool,
}

/// The exact pipeline text a run ran (already redacted) and the absolute path of its file
/// when the run started (a repair resolves relative paths from there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSource {
    pub text: String,
    pub path: String,
}

impl NewRun {
    pub fn new(pipeline: impl Into<String>, trigger: Trigger, owner: Owner) -> NewRun {
        NewRun {
            pipeline: pipeline.into(),
            params: serde_json::Value::Object(Default::default()),
            trigger,
            owner,
            logical_date: None,
            lease_owner: None,
            queue_item: None,
            fence: None,
            source: None,
        }
    }
}

/// One row of `pipe runs list`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunRow {
    pub id: i64,
    pub pipeline: String,
    pub status: Status,
    pub trigger: Trigger,
    pub owner: Owner,
    pub params: serde_json::Value,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `finished_at - started_at`, once finished.
    pub duration_ms: Option<u64>,
    pub logical_date: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// The `pipe run` process that created the run (none for external runs).
    pub pid: Option<i64>,
    /// 1, and 2, 3 … after repairs.
    pub attempt: u32,
    /// The lease owner id running the current attempt.
    pub lease_owner: Option<String>,
    /// The queue item it came from.
    pub queue_item: Option<i64>,
    /// The fence of the claim that created it (the item's fence then); `None` for a run
    /// not from the queue, and for a repair attempt (which no claim fences).
    pub fence: Option<i64>,
}

/// One step of one attempt of a run.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepRow {
    pub step: String,
    /// The run attempt this row belongs to (1 unless repaired).
    pub run_attempt: u32,
    /// The step's type (`sql.query`), when known.
    pub kind: Option<String>,
    pub status: Status,
    /// Tries of the step within the attempt (its `retry:`).
    pub attempts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
    pub rows: Option<u64>,
    pub error: Option<String>,
    pub outputs: serde_json::Value,
}

/// A run with its step rows (every attempt, in the order they started) and log count.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunDetail {
    #[serde(flatten)]
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    pub log_count: u64,
}

impl RunDetail {
    /// Each step's row of the latest attempt that has one (a repair re-runs only some
    /// steps; the others keep their earlier row), in first-start order.
    pub fn latest_steps(&self) -> Vec<&StepRow> {
        let mut out: Vec<&StepRow> = Vec::new();
        for s in &self.steps {
            match out.iter_mut().find(|o| o.step == s.step) {
                Some(o) if o.run_attempt <= s.run_attempt => *o = s,
                Some(_) => {}
                None => out.push(s),
            }
        }
        out
    }
}

/// One log row.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogRow {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub level: Level,
    pub step: Option<String>,
    pub message: String,
    pub description: Option<String>,
    /// The path of the attached file's copy in the run's folder.
    pub file: Option<String>,
}

/// Which runs [`crate::RunStore::find_runs`] returns (newest first).
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<Status>,
    pub trigger: Option<Trigger>,
    /// Only runs with an id below this (paging).
    pub before_id: Option<i64>,
    /// Only runs started at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Only runs started before this.
    pub until: Option<DateTime<Utc>>,
    /// 0 for all.
    pub limit: usize,
}

/// A pipeline file as `pipe serve` loaded it.
#[derive(Debug, Clone)]
pub struct IntegrationFile {
    pub name: String,
    pub description: Option<String>,
    /// Where the file is.
    pub path: String,
    /// A hash of its content (any stable text: the loader's choice).
    pub content_hash: String,
    /// `integration:` metadata: group, direction, external_system, owner, tags, queue,
    /// priority, retry_on_lost … (JSON object, stored as given).
    pub metadata: serde_json::Value,
    /// The queue its runs go to by default.
    pub queue: String,
    /// Its runs' default priority (higher first).
    pub priority: i64,
    /// How many of its runs may run at once (`claim` honours it); `None` for no limit.
    pub max_concurrent_runs: Option<u32>,
    /// A run lost with its owner is queued again ([`crate::RunStore::expire_lost`]); stored
    /// as `retry_on_lost` in the metadata.
    pub retry_on_lost: bool,
}

impl IntegrationFile {
    pub fn new(name: impl Into<String>, path: impl Into<String>, hash: impl Into<String>) -> Self {
        IntegrationFile {
            name: name.into(),
            description: None,
            path: path.into(),
            content_hash: hash.into(),
            metadata: serde_json::Value::Object(Default::default()),
            queue: DEFAULT_QUEUE.into(),
            priority: 0,
            max_concurrent_runs: Some(1),
            retry_on_lost: false,
        }
    }
}

/// The queue a run goes to unless its integration names one.
pub const DEFAULT_QUEUE: &str = "default";

/// The last run of an integration, as its row shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastRun {
    pub id: i64,
    pub status: Status,
    pub trigger: Trigger,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// An integration: what the file said when last loaded and what the store knows.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Integration {
    pub name: String,
    pub description: Option<String>,
    pub enabled: bool,
    /// When it was last re-enabled: its schedule restarts from here.
    pub resumed_at: Option<DateTime<Utc>>,
    pub path: Option<String>,
    pub content_hash: Option<String>,
    pub metadata: serde_json::Value,
    pub queue: String,
    pub priority: i64,
    pub max_concurrent_runs: Option<u32>,
    /// When the file was last loaded (its last valid version).
    pub loaded_at: Option<DateTime<Utc>>,
    /// Why the latest version of the file did not load (the loaded one keeps running).
    pub load_error: Option<String>,
    pub load_error_at: Option<DateTime<Utc>>,
    /// The file is gone.
    pub removed: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run: Option<LastRun>,
}

/// Where an integration's planner got to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduleCursor {
    pub last_planned: DateTime<Utc>,
    pub fingerprint: String,
}

/// A tick the planner decided on.
#[derive(Debug, Clone)]
pub struct PlannedTick {
    pub scheduled_at: DateTime<Utc>,
    /// The run to queue for it, or `None` to record it as skipped.
    pub enqueue: Option<Enqueue>,
    /// Why it was skipped (or any note), shown with the tick.
    pub note: Option<String>,
}

/// One integration's part of [`crate::RunStore::record_ticks_many`].
#[derive(Debug, Clone)]
pub struct TickBatch {
    pub integration: String,
    pub fingerprint: String,
    pub ticks: Vec<PlannedTick>,
    /// The cursor to move to (never backwards).
    pub cursor: DateTime<Utc>,
    /// `Some(x)` sets the next run to `x` in the same transaction; `None` leaves it.
    pub next_run: Option<Option<DateTime<Utc>>>,
}

impl TickBatch {
    pub fn new(
        integration: impl Into<String>,
        fingerprint: impl Into<String>,
        cursor: DateTime<Utc>,
    ) -> TickBatch {
        TickBatch {
            integration: integration.into(),
            fingerprint: fingerprint.into(),
            ticks: Vec::new(),
            cursor,
            next_run: None,
        }
    }
}

/// An integration's counts ([`crate::RunStore::integration_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IntegrationCounts {
    /// Running runs plus claimed items without a run yet.
    pub active: u64,
    /// Queued items.
    pub queued: u64,
}

/// What [`crate::RunStore::record_ticks`] did with one tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TickOutcome {
    pub scheduled_at: DateTime<Utc>,
    /// False when the tick was already recorded (nothing was done for it now).
    pub inserted: bool,
    /// The queue item created (or merged into) for it now.
    pub queue_item: Option<i64>,
}

/// A recorded tick.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TickRow {
    pub integration: String,
    pub scheduled_at: DateTime<Utc>,
    pub planned_at: DateTime<Utc>,
    pub state: TickState,
    pub queue_item: Option<i64>,
    pub note: Option<String>,
}

/// A run to queue.
#[derive(Debug, Clone)]
pub struct Enqueue {
    pub integration: String,
    pub queue: String,
    /// Higher first.
    pub priority: i64,
    pub trigger: Trigger,
    pub logical_date: Option<DateTime<Utc>>,
    /// The run's params (already redacted where secret), JSON.
    pub params: serde_json::Value,
    /// Unique among queued items: a second item with the same key is merged into the
    /// first. Include the integration in it (`sales@2026-12-02T06:00:00Z`).
    pub dedup_key: Option<String>,
    pub backfill_id: Option<i64>,
    /// For a repair: the run to repair.
    pub run_id: Option<i64>,
}

impl Enqueue {
    pub fn new(integration: impl Into<String>, trigger: Trigger) -> Enqueue {
        Enqueue {
            integration: integration.into(),
            queue: DEFAULT_QUEUE.into(),
            priority: 0,
            trigger,
            logical_date: None,
            params: serde_json::Value::Object(Default::default()),
            dedup_key: None,
            backfill_id: None,
            run_id: None,
        }
    }
}

/// What [`crate::RunQueue::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: i64,
    /// True when merged into an already queued item with the same dedup key.
    pub merged: bool,
}

/// A queue item.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueItem {
    pub id: i64,
    pub integration: String,
    pub queue: String,
    pub priority: i64,
    pub trigger: Trigger,
    pub logical_date: Option<DateTime<Utc>>,
    pub params: serde_json::Value,
    pub dedup_key: Option<String>,
    pub backfill_id: Option<i64>,
    pub state: QueueState,
    pub enqueued_at: DateTime<Utc>,
    /// The worker owner id that claimed it.
    pub claimed_by: Option<String>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub claim_expires_at: Option<DateTime<Utc>>,
    /// The run started for it (or, for a repair item, the run to repair).
    pub run_id: Option<i64>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When its message was last published to the broker (`None`: not yet, or not since it
    /// went back to the queue): the outbox ([`crate::RunStore::unpublished`]).
    pub published_at: Option<DateTime<Utc>>,
    /// How many times it was claimed: the fencing token of the current claim (0 before the
    /// first). A run created for the claim carries it ([`NewRun::fence`]).
    pub fence: i64,
}

/// What [`crate::RunStore::claim_item`] did with a worker's message.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum ItemClaim {
    /// Claimed now (queued → claimed, fence + 1): run it, then ack the message.
    Claimed(Box<QueueItem>),
    /// Already claimed, done or cancelled (a duplicate or redelivered message): ack the
    /// message and drop it.
    Gone { state: QueueState },
    /// Its integration's `max_concurrent_runs` or its backfill's `max_parallel` has no room
    /// now: do not ack and forget; reject the message with requeue (later).
    Full,
    /// Its integration is disabled: the item is cancelled now; ack and drop the message.
    Disabled,
    /// No such item (pruned, or from another store): ack and drop the message.
    NotFound,
}

/// Which items [`crate::RunStore::list_queue`] returns.
#[derive(Debug, Clone, Default)]
pub struct QueueFilter {
    pub integration: Option<String>,
    pub state: Option<QueueState>,
    pub backfill_id: Option<i64>,
    /// 0 for all.
    pub limit: usize,
}

/// A backfill to record.
#[derive(Debug, Clone)]
pub struct NewBackfill {
    pub integration: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub max_parallel: Option<u32>,
}

/// A recorded backfill with its items' counts.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Backfill {
    pub id: i64,
    pub integration: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub max_parallel: Option<u32>,
    pub state: BackfillState,
    pub created_at: DateTime<Utc>,
    pub queued: u64,
    pub claimed: u64,
    pub done: u64,
    pub cancelled: u64,
}

/// A lease as stored.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseRow {
    /// The owner id, or `leader:<name>` for a leader lease.
    pub name: String,
    pub kind: LeaseKind,
    /// Who holds it (for a leader lease, the owner id).
    pub owner: String,
    pub host: Option<String>,
    pub pid: Option<i64>,
    pub acquired_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A run [`crate::RunStore::expire_lost`] marked abandoned.
#[derive(Debug, Clone, Serialize)]
pub struct LostRun {
    pub run_id: i64,
    pub pipeline: String,
    pub lease_owner: Option<String>,
    /// The queue item it ran (now `done`).
    pub queue_item: Option<QueueItem>,
    /// The item queued again for it, when its integration says `retry_on_lost`.
    pub requeued: Option<i64>,
}

/// What [`crate::RunStore::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub ticks: u64,
    pub queue_items: u64,
    pub leases: u64,
    /// Workers stopped, or silent, since before the cut.
    pub workers: u64,
}

/// A worker process announcing itself ([`crate::RunStore::register_worker`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its lease owner id ([`crate::LeaseOwner::id`]): what its claims and runs record.
    pub id: String,
    /// Host name, for people.
    pub host: String,
    pub pid: Option<i64>,
    /// The named queues it consumes.
    pub queues: Vec<String>,
    /// How many runs it runs at once.
    pub slots: u32,
    /// The `pipe` version it runs.
    pub version: Option<String>,
    /// Its lease period: it is alive while its last heartbeat is younger than this.
    pub lease: std::time::Duration,
}

impl WorkerInfo {
    /// A worker of this process under the lease owner id `id`.
    pub fn this_process(id: impl Into<String>, queues: Vec<String>, slots: u32) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            host: crate::host_label(),
            pid: Some(i64::from(std::process::id())),
            queues,
            slots,
            version: None,
            lease: crate::lease_period(),
        }
    }
}

/// What a worker learns from its heartbeat ([`crate::RunStore::worker_heartbeat`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WorkerControl {
    /// `pipe workers drain ID` asked it to finish its current runs and take no more.
    pub drain_requested: bool,
}

string_enum! {
    /// A worker as `pipe workers list` shows it.
    WorkerState {
        /// Heartbeating, taking runs.
        Active = "active",
        /// Heartbeating, finishing its runs, taking no more.
        Draining = "draining",
        /// Said it stopped.
        Stopped = "stopped",
        /// Silent for longer than its lease period without saying it stopped.
        Lost = "lost",
    } "worker state"
}

/// A worker as stored ([`crate::RunStore::list_workers`]).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub pid: Option<i64>,
    pub queues: Vec<String>,
    pub slots: u32,
    /// The runs it reported running at its last heartbeat.
    pub running: Vec<i64>,
    pub version: Option<String>,
    /// Its lease period, in milliseconds.
    pub lease_ms: u64,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub drain_requested_at: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
    /// Not stopped, and its last heartbeat is within its lease period of `now`.
    pub alive: bool,
    pub state: WorkerState,
}
