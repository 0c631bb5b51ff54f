//! The run store: everything `pipe` remembers between runs and shares between processes.
//!
//! One interface, [`RunStore`], with two backends that pass the same test suite:
//! SQLite (default, embedded: `<state_dir>/history.sqlite`, as before) and PostgreSQL
//! (`--db postgres://…` or `PIPE_DB`), chosen by [`open`]. It holds integrations (the
//! pipelines `pipe serve` loads, with their enabled flag), schedule ticks and the planners'
//! cursors, the run queue, runs, step runs (one row per repair attempt), logs, and leases.
//!
//! Why the interface is synchronous: both backends are blocking clients (rusqlite; the
//! `postgres` crate, which drives tokio-postgres on its own internal runtime), every call
//! is one short transaction, and the callers are a mix of plain threads (the history
//! writer, the CLI) and async tasks. Async callers use `tokio::task::spawn_blocking`; a
//! sync trait is object safe without boxing futures, and `Arc<dyn RunStore>` is `Send +
//! Sync`. See docs/decisions/0019-store.md.
//!
//! Errors are a typed [`StoreError`]: `NotFound` and `Conflict` carry the messages the CLI
//! prints as they are ("run 7 not found", "run 7 is already failed"); everything the
//! database or the file system says is `Backend`, with context naming what was being done.
//! Strings reaching the store are already redacted by their callers.
//!
//! Time is always passed in (`now`) where a decision depends on it (leases, claims, ticks),
//! so tests need no sleeps and two servers agree on what their callers saw.

mod accounts;
mod credentials;
mod error;
mod group;
mod lease;
mod pg;
mod sql;
mod sqlite;
mod types;
mod writer;

pub use accounts::*;
pub use credentials::*;
pub use error::{Result, StoreError};
pub use lease::{host_label, lease_period, LeaseKeeper, LeaseOwner, LEASE_SECONDS_VAR};
pub use types::*;
pub use writer::{HistoryReader, HistoryWriter, DEFAULT_LOG_LIMIT, LOG_LIMIT_VAR};

pub use engine::events::{Level, LogRecord, Observer, RunEvent, StepRecord};
pub use engine::status::Status;

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The SQLite database file inside the state dir.
pub const DB_FILE: &str = "history.sqlite";
/// The variable naming the database when `--db` is not given.
pub const DB_VAR: &str = "PIPE_DB";

/// Where the store lives.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `--db` or `PIPE_DB`: `postgres://…` / `postgresql://…` for PostgreSQL, `sqlite:PATH`
    /// or a plain path for an SQLite file elsewhere; `None` for `<state_dir>/history.sqlite`.
    pub url: Option<String>,
    /// Run folders (attached files, spilled logs) live here with either backend.
    pub state_dir: PathBuf,
}

impl StoreConfig {
    /// The default SQLite store in `state_dir`.
    pub fn sqlite(state_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            url: None,
            state_dir: state_dir.into(),
        }
    }
}

/// Open the store (creating and migrating its schema when needed). Several processes may
/// open one store at once; migrations are applied once, in a transaction.
pub fn open(cfg: &StoreConfig) -> Result<Arc<dyn RunStore>> {
    match cfg.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        None => Ok(Arc::new(sqlite::open(&cfg.state_dir, None)?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(pg::open(url, &cfg.state_dir)?))
        }
        Some(url) => {
            let path = match url.strip_prefix("sqlite:") {
                Some(p) => p.strip_prefix("//").unwrap_or(p),
                None if url.contains("://") => {
                    return Err(StoreError::invalid(format!(
                        "--db / {DB_VAR}: unknown kind of database `{}` (expected \
                         postgres://… or sqlite:PATH)",
                        url.split("://").next().unwrap_or_default()
                    )))
                }
                None => url,
            };
            Ok(Arc::new(sqlite::open(
                &cfg.state_dir,
                Some(Path::new(path)),
            )?))
        }
    }
}

/// The run queue as scheduler and workers see it. The embedded implementation is the
/// store itself ([`RunStore`] extends it); a later transport (RabbitMQ) can implement it
/// between scheduler and workers while the store stays the record of what was queued.
pub trait RunQueue: Send + Sync {
    /// Queue a run. An item whose `dedup_key` equals a queued item's is merged into it
    /// (the existing item keeps its place and takes the higher priority).
    fn enqueue(&self, item: &Enqueue, now: DateTime<Utc>) -> Result<Enqueued>;
    /// Take the highest-priority, then oldest, queued item of `queues` (all queues when
    /// empty) whose integration has fewer running runs than its `max_concurrent_runs`
    /// (items of a disabled integration met on the way are cancelled), and
    /// mark it claimed by `worker` until `now + lease` (or for as long as `worker`'s lease is
    /// held, see [`RunStore::heartbeat`]). `None` when nothing can be claimed now.
    fn claim(
        &self,
        worker: &str,
        queues: &[String],
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<QueueItem>>;
    /// The claimed item is finished with (`Done`) or given up (`Cancelled`).
    fn ack(&self, item_id: i64, outcome: AckOutcome, now: DateTime<Utc>) -> Result<()>;
}

/// The store. Object safe, `Send + Sync`, every method one short transaction; `now` is the
/// caller's clock. Method names follow the old `engine::history::Store` where it had one.
pub trait RunStore: RunQueue + Send + Sync + std::fmt::Debug {
    // ----- where things are -------------------------------------------------------------

    /// The state dir (absolute): run folders live under it with either backend.
    fn state_dir(&self) -> &Path;
    /// The run's folder for attached files: `<state_dir>/runs/<id>`.
    fn run_dir(&self, id: i64) -> PathBuf {
        self.state_dir().join("runs").join(id.to_string())
    }
    /// `sqlite` or `postgres`, and where (a PostgreSQL URL without its password).
    fn describe(&self) -> String;
    /// The schema version applied (the number of migrations).
    fn schema_version(&self) -> Result<u32>;

    // ----- runs, step runs, logs (the old history) ----------------------------------------

    /// Create a run with status `running` (attempt 1) and its folder; a run taken from the
    /// queue (`NewRun::queue_item`) is linked to its item in the same transaction.
    fn create_run(&self, new: &NewRun) -> Result<i64> {
        self.create_run_kept(new).map(|c| c.id)
    }
    /// [`RunStore::create_run`], saying whether the run's [`NewRun::source`] is kept already:
    /// a text is referenced at the start only when the store holds it (some run ended with
    /// exactly this text), never written then, because a run may learn a secret that is in
    /// it while it runs. The runner keeps the final, redacted text at the end with
    /// [`RunStore::set_run_source`] unless it was kept and did not change.
    fn create_run_kept(&self, new: &NewRun) -> Result<CreatedRun>;
    /// The pipeline text the run ran and its file's path, when it was recorded
    /// ([`NewRun::source`], [`RunStore::set_run_source`]).
    fn run_source(&self, run_id: i64) -> Result<Option<RunSource>>;
    /// Keep `source` as the text the run ran (at its end, redacted with everything the run
    /// masked; see [`RunStore::create_run_kept`]). `NotFound` for an unknown run.
    fn set_run_source(&self, run_id: i64, source: &RunSource) -> Result<()>;
    /// Add a log row; an attached file is copied into the run's folder (unless it is
    /// already there) and the copy's path is stored.
    fn add_log(&self, run_id: i64, rec: &LogRecord) -> Result<()>;
    /// Record a batch of executor events (the [`HistoryWriter`]'s work) in one transaction;
    /// step rows go to the run's current attempt. When the batch fails for a reason other
    /// than contention, each event is tried alone so one bad event loses no other.
    fn write_events(&self, run_id: i64, events: &[RunEvent]) -> Result<()>;
    /// Finish a running run (`pipe runs finish`). `NotFound` when it does not exist;
    /// `Conflict` when it is not running, or, unless `force`, when its owner's lease is
    /// live (that owner would go on writing to it) or cannot be judged from here.
    fn finish_run(&self, id: i64, status: Status, error: Option<&str>, force: bool) -> Result<()>;
    /// The most recent runs (of one pipeline, when given), newest first; `limit` 0 is all.
    fn list_runs(&self, pipeline: Option<&str>, limit: usize) -> Result<Vec<RunRow>>;
    /// Like [`RunStore::list_runs`] with more filters.
    fn find_runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>>;
    /// A run with its step rows (every attempt) and log count.
    fn get_run(&self, id: i64) -> Result<Option<RunDetail>>;
    /// The step rows (every attempt) of these runs (at most 1,000 of them), by run id:
    /// what changed in many runs, in one statement.
    fn steps_of_runs(&self, ids: &[i64]) -> Result<Vec<(i64, StepRow)>>;
    /// How many runs there are in each status.
    fn run_counts(&self) -> Result<Vec<(Status, u64)>>;
    /// A run's current status (cheaper than `get_run`, for polling).
    fn run_status(&self, id: i64) -> Result<Option<Status>>;
    /// The run's log rows with an id above `after_id` (0 for all), oldest first.
    fn logs(&self, id: i64, after_id: i64) -> Result<Vec<LogRow>> {
        self.logs_page(id, after_id, 0)
    }
    /// At most `limit` (0: all) of the run's log rows after `after_id`, oldest first.
    fn logs_page(&self, id: i64, after_id: i64, limit: usize) -> Result<Vec<LogRow>>;
    /// The run's last `limit` log rows, oldest first (a live log tail: one index range
    /// read from the end, whatever the run's log size).
    fn logs_tail(&self, id: i64, limit: usize) -> Result<Vec<LogRow>>;
    /// The rows handled by steps of type `kind` in `pipeline`'s runs that finished at or
    /// after `since` (a connector's "records in the last hour").
    fn rows_since(&self, pipeline: &str, kind: &str, since: DateTime<Utc>) -> Result<u64>;
    /// Start the next attempt of a finished run (a repair): attempt + 1, status `running`,
    /// owned by `owner`; earlier attempts' step rows stay. Returns the new attempt number.
    /// `Conflict` when the run is still running.
    fn start_attempt(&self, run_id: i64, owner: Option<&str>, now: DateTime<Utc>) -> Result<u32>;
    /// Ask whoever runs `run_id` to cancel it (they poll [`RunStore::cancel_requested`]).
    /// False when the run is not running.
    fn request_cancel(&self, run_id: i64, now: DateTime<Utc>) -> Result<bool>;
    /// Whether a cancel was requested for the (running) run.
    fn cancel_requested(&self, run_id: i64) -> Result<bool>;
    /// The pipeline's finished runs that failed since its last success (for
    /// `pause_after_failures`); cancelled, skipped and abandoned runs neither count nor reset.
    fn consecutive_failures(&self, pipeline: &str) -> Result<u32>;

    // ----- integrations ----------------------------------------------------------------

    /// Create the integration row, or update its description when one is given.
    fn upsert_integration(&self, name: &str, description: Option<&str>) -> Result<()>;
    /// Record a loaded (valid) pipeline file: path, content hash, metadata; clears the load
    /// error and the removed flag. The enabled flag is kept (a new row starts enabled).
    fn load_integration(&self, file: &IntegrationFile, now: DateTime<Utc>) -> Result<()>;
    /// Record (or, with `None`, clear) why the integration's file failed to load; the
    /// previously loaded version stays recorded.
    fn set_load_error(&self, name: &str, error: Option<&str>, now: DateTime<Utc>) -> Result<()>;
    /// Enable or disable; disabling clears the next run, re-enabling records `now` as the
    /// resume instant, from which the schedule restarts. Returns whether the flag changed.
    /// Creates the row when missing.
    fn set_enabled(&self, name: &str, enabled: bool, now: DateTime<Utc>) -> Result<bool>;
    /// Whether the integration may run (true when it has no row yet).
    fn is_enabled(&self, name: &str) -> Result<bool>;
    /// The file is gone (`removed`), or back. A removed integration is kept for its history.
    fn set_removed(&self, name: &str, removed: bool, now: DateTime<Utc>) -> Result<()>;
    /// The next planned fire time (written by the scheduler; `None` for none).
    fn set_next_run(&self, name: &str, next: Option<DateTime<Utc>>) -> Result<()>;
    /// A number that changes whenever anything [`RunStore::list_integrations`] shows changes
    /// (a row added, loaded, enabled or disabled, removed, a load error), except last and next
    /// runs: a poller reads this cheap number and lists only when it moved.
    fn integrations_version(&self) -> Result<i64>;
    /// Every integration, by name, with its last run.
    fn list_integrations(&self) -> Result<Vec<Integration>>;
    /// One integration with its last run.
    fn get_integration(&self, name: &str) -> Result<Option<Integration>>;

    // ----- schedule ticks ----------------------------------------------------------------

    /// The planner's cursor of an integration: the last planned instant and the schedule's
    /// fingerprint when it was planned.
    fn schedule_cursor(&self, integration: &str) -> Result<Option<ScheduleCursor>>;
    /// In ONE transaction: insert the ticks (UNIQUE (integration, scheduled_at): a tick
    /// already recorded, by this process earlier or by another server, is left alone), the
    /// queue items of the new ones that enqueue, and move the cursor to `cursor` (never
    /// backwards) with `fingerprint`. Returns what happened to each tick, in order.
    fn record_ticks(
        &self,
        integration: &str,
        fingerprint: &str,
        ticks: &[PlannedTick],
        cursor: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<TickOutcome>>;
    /// [`RunStore::record_ticks`] for many integrations in ONE transaction (a planner's
    /// round: one commit for all its due integrations), each batch also setting the next run
    /// when it says so. Outcomes in the order of `batches`.
    fn record_ticks_many(
        &self,
        batches: &[TickBatch],
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<TickOutcome>>>;
    /// Every integration's planner cursor, in one query (integrations never planned are
    /// absent).
    fn schedule_cursors(&self) -> Result<HashMap<String, ScheduleCursor>>;
    /// Per integration with any: active runs (what `claim` compares with
    /// `max_concurrent_runs`, as [`RunStore::count_active`]) and queued items (as
    /// [`RunStore::count_queued`]), in one read.
    fn integration_counts(&self) -> Result<HashMap<String, IntegrationCounts>>;
    /// The integration's recorded ticks, newest first (`limit` 0 is all).
    fn list_ticks(&self, integration: &str, limit: usize) -> Result<Vec<TickRow>>;

    // ----- the queue (beyond RunQueue) ----------------------------------------------------

    /// Cancel a queued (not yet claimed) item. False when it was not queued.
    fn cancel_item(&self, item_id: i64, now: DateTime<Utc>) -> Result<bool>;
    /// Queue items, newest first.
    fn list_queue(&self, filter: &QueueFilter) -> Result<Vec<QueueItem>>;
    /// One queue item.
    fn get_item(&self, item_id: i64) -> Result<Option<QueueItem>>;
    /// How many items of the integration are queued (not claimed): a capped queue's check.
    fn count_queued(&self, integration: &str) -> Result<u64>;
    /// How many runs of the integration are running, plus its claimed items that have no
    /// run yet: what `claim` compares with `max_concurrent_runs`.
    fn count_active(&self, integration: &str) -> Result<u64>;

    // ----- backfills -----------------------------------------------------------------------

    /// Record a backfill; its items are enqueued by the caller with `backfill_id` set.
    fn create_backfill(&self, new: &NewBackfill, now: DateTime<Utc>) -> Result<i64>;
    /// Backfills, newest first, with their item counts.
    fn list_backfills(&self, integration: Option<&str>) -> Result<Vec<Backfill>>;
    /// Cancel a backfill and its queued items; returns how many items were cancelled.
    fn cancel_backfill(&self, id: i64, now: DateTime<Utc>) -> Result<u64>;

    // ----- leases --------------------------------------------------------------------------

    /// Take or renew the lease of an owner (a process or worker) for `ttl`. Runs and claims
    /// of that owner are alive while it is renewed.
    fn heartbeat(&self, owner: &LeaseOwner, ttl: Duration, now: DateTime<Utc>) -> Result<()>;
    /// Give up an owner's lease (clean shutdown): its running runs are then found lost by
    /// the next [`RunStore::expire_lost`], so finish them first.
    fn release(&self, owner_id: &str) -> Result<()>;
    /// Take or renew the named leader lease: true when `owner` holds it until `now + ttl`
    /// (it was free, expired, or already its own), false when another owner holds it.
    fn try_lead(
        &self,
        name: &str,
        owner: &LeaseOwner,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool>;
    /// Give up the leader lease if `owner_id` holds it.
    fn resign(&self, name: &str, owner_id: &str) -> Result<()>;
    /// The leases (owners and leaders), expired ones included, by name.
    fn list_leases(&self) -> Result<Vec<LeaseRow>>;
    /// Mark running runs whose owner is lost as `abandoned` (with their running steps), and
    /// put claimed items that never started a run back in the queue. An owner is lost when
    /// its lease expired before `now` (or it has none); a run recorded before leases is
    /// judged by its pid as before (never a run from another pid namespace). External runs
    /// (`pipe runs start`) are never touched. A marked run's queue item is queued again in
    /// the same transaction when its integration says `retry_on_lost` (metadata), at most a
    /// few times per tick, so whichever process notices first (a CLI command too) honours it.
    /// Returns the runs marked, with what was re-queued.
    fn expire_lost(&self, now: DateTime<Utc>) -> Result<Vec<LostRun>>;
    /// Delete what only the recent past needs, older than `older_than`: ticks behind their
    /// integration's cursor (never planned again), done and cancelled queue items, owner
    /// leases that expired (their runs were marked long ago), and workers stopped or silent
    /// since before it. Runs and logs stay.
    fn prune(&self, older_than: DateTime<Utc>) -> Result<Pruned>;
    /// [`RunStore::expire_lost`] at the current time, counting the runs marked.
    fn mark_abandoned(&self) -> Result<usize> {
        self.expire_lost(Utc::now()).map(|v| v.len())
    }

    // ----- remote workers: the outbox, claims by item, fencing, workers -------------------
    //
    // With a broker (`pipe serve --broker`), the store stays the record of what is queued
    // and the broker only carries item ids. The outbox is the `published_at` column: an item
    // is queued in the store first (`enqueue`, `record_ticks`), published afterwards and then
    // marked, so a crash between the two leaves it unpublished and found again; duplicates
    // are harmless because `claim_item` takes an item once. See docs/decisions/0019-store.md.

    /// Queued items never published (or queued again since: a lost claim, a raised
    /// priority), in claim order (priority, then age), at most `limit` (0 for all).
    /// Only items a claim could take now are returned: an integration at its
    /// `max_concurrent_runs` (counting its items already published) or a backfill at its
    /// `max_parallel` waits here, not in the broker.
    fn unpublished(&self, limit: usize) -> Result<Vec<QueueItem>>;
    /// Block until something may have been queued by any process (an enqueue, a trigger,
    /// a tick, a lost claim put back) or `timeout` passed; true when woken. PostgreSQL
    /// listens for the `NOTIFY` each such transaction sends; SQLite only waits (its
    /// callers poll). Call it from a blocking thread.
    fn wait_for_queue(&self, timeout: Duration) -> Result<bool>;
    /// A worker dropped the item's message because the claim found no room
    /// ([`ItemClaim::Full`]): it is unpublished again, and published once there is room.
    /// False when it is no longer queued.
    fn unpublish(&self, item_id: i64) -> Result<bool>;
    /// Their messages are published (confirmed by the broker): record `now` as their last
    /// publish. Items no longer queued are left alone. Returns how many were marked.
    fn mark_published(&self, ids: &[i64], now: DateTime<Utc>) -> Result<u64>;
    /// Queued items whose last publish is older than `before` (their message may be lost
    /// with a broker that was not durable, or purged): a republisher sends them again and
    /// marks them. Claim order, at most `limit` (0 for all).
    fn stale_published(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<QueueItem>>;
    /// Claim the item a worker got a message for: in one transaction (shared through the
    /// group commit like `claim`), queued → claimed by `worker` until `now + lease`, its
    /// fence + 1, when its integration and backfill have room (the caps as `claim` checks
    /// them; on PostgreSQL under the integration's row lock, so they hold across machines).
    /// Otherwise says why not: see [`ItemClaim`].
    fn claim_item(
        &self,
        item_id: i64,
        worker: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<ItemClaim>;
    /// [`RunStore::write_events`] for the run of the claim with `fence`: the batch is written
    /// only while the run is `running` and was created with that fence; otherwise nothing is
    /// written and the error is [`StoreError::Fenced`] (so a stalled worker's late
    /// `RunFinished` never replaces `abandoned`). `NotFound` when there is no such run.
    fn write_events_fenced(&self, run_id: i64, fence: i64, events: &[RunEvent]) -> Result<()>;
    /// Record a worker (or its return after a lost connection: host, pid, queues, slots and
    /// version are updated, a stop is forgotten, a drain request kept).
    fn register_worker(&self, info: &WorkerInfo, now: DateTime<Utc>) -> Result<()>;
    /// A worker's heartbeat with the runs it is running; says whether it is asked to drain.
    /// `NotFound` for a worker never registered (or pruned): register again.
    fn worker_heartbeat(
        &self,
        id: &str,
        running: &[i64],
        now: DateTime<Utc>,
    ) -> Result<WorkerControl>;
    /// Every worker, newest first, judged alive at `now`.
    fn list_workers(&self, now: DateTime<Utc>) -> Result<Vec<WorkerRow>>;
    /// Ask a worker to finish its current runs and take no more (its next heartbeat says
    /// so). True when asked now; false when it was already asked or has stopped.
    /// `NotFound` for an unknown id.
    fn request_drain(&self, id: &str, now: DateTime<Utc>) -> Result<bool>;
    /// The worker stopped (cleanly). `NotFound` for an unknown id.
    fn worker_stopped(&self, id: &str, now: DateTime<Utc>) -> Result<()>;

    // --- the API's users and tokens, and stored credentials (issue 12) ---

    /// Users, machine tokens, settings and the audit trail ([`AccountStore`]).
    fn accounts(&self) -> &dyn AccountStore;
    /// Stored credentials, their private part sealed ([`CredentialStore`]).
    fn credentials(&self) -> &dyn CredentialStore;
}
