//! The service loop: the watcher, the scheduler, the workers, leases, and the drain.
//!
//! Tasks (tokio; every store call goes through `spawn_blocking`, the store being a sync
//! interface):
//!
//! - **watcher**: scans the folder once a second ([`crate::catalog`]) and records what
//!   changed in the store (loaded version, load error, removed), then publishes a new
//!   snapshot of the integrations for the other tasks;
//! - **scheduler**: while this server holds the `scheduler` leader lease, plans each enabled
//!   integration's due ticks (`scheduler::plan_ticks`, from the cursor the store keeps),
//!   decides overlaps, and records ticks and their queue items in ONE store transaction
//!   whose UNIQUE (integration, scheduled_at) makes every tick exist once. The leader lease
//!   only saves work: if two servers ever both plan (a lease expiring mid-round), the unique
//!   key still enqueues each tick once. It wakes at the next due instant, at least every
//!   second;
//! - **workers**: N loops that claim the highest-priority queued item the store allows
//!   (each integration's `max_concurrent_runs` is honoured inside `claim`), run it through
//!   the runner with the tick's instant as the logical date, watch for cancel requests, and
//!   ack it; a failed run may pause its integration (`pause_after_failures`);
//! - **lease**: this process's owner lease (runs and claims carry its id) is renewed by a
//!   [`store::LeaseKeeper`]; every lease period the server expires the runs of dead owners
//!   (abandoned, or re-queued when their integration says `retry_on_lost: true`).
//!
//! Stopping ([`Service::run`]'s `shutdown` token, SIGTERM in `pipe serve`): scheduling and
//! claiming stop at once; running runs get `drain_timeout` to finish, are then cancelled
//! (their teardown steps run) and awaited; everything is recorded, the leases are released,
//! and `run` returns. A restart continues from the cursors in the store.

use crate::catalog::{Catalog, Change, Integration};
use crate::runs::blocking;
use chrono::{DateTime, Utc};
use engine::step::Registry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::{
    AckOutcome, Enqueue, IntegrationFile, LeaseKeeper, LeaseOwner, PlannedTick, QueueItem,
    RunFilter, RunStore, Status, Trigger,
};
use tokio_util::sync::CancellationToken;

/// The leader lease the scheduler loop runs under.
pub const SCHEDULER_LEASE: &str = "scheduler";
/// How long the scheduler sleeps at most between rounds.
const SCHEDULER_WAKE: Duration = Duration::from_secs(1);
/// How often the folder is scanned.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long an idle worker waits before asking the queue again (it is also woken when
/// this server enqueued something).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The longest one wait for the store's queue notification lasts.
const LISTEN_WAIT: Duration = Duration::from_secs(1);
/// How often old ticks, queue items and leases are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long ticks, finished queue items and dead leases are kept.
const KEEP: Duration = Duration::from_secs(7 * 86_400);

/// What `pipe serve` asks for.
pub struct ServeConfig {
    /// The folder of pipeline files.
    pub dir: PathBuf,
    /// In-process workers (0: schedule only, with a broker).
    pub workers: usize,
    /// Publish queued runs to RabbitMQ for `pipe worker`s (the outbox, [`crate::publish`]).
    pub broker: Option<broker::BrokerConfig>,
    /// How long running runs may take to finish once stopping.
    pub drain_timeout: Duration,
    /// The step types (to validate files).
    pub registry: Registry,
    pub store: Arc<dyn RunStore>,
    /// Starts runs (the one run path shared with `pipe run`).
    pub launcher: Arc<dyn crate::Launcher>,
    /// Cancelled to end the drain early (a second SIGTERM): running runs are cancelled.
    pub hurry: CancellationToken,
}

/// What happened, for the exit message.
#[derive(Debug, Default, Clone)]
pub struct ServeReport {
    /// Runs this server finished.
    pub runs: u64,
    /// Runs cancelled because the drain timeout passed.
    pub cancelled_at_drain: u64,
}

struct Shared {
    store: Arc<dyn RunStore>,
    owner: LeaseOwner,
    lease: Duration,
    integrations: crate::catalog::Live,
    /// Stop scheduling and claiming.
    stopping: CancellationToken,
    /// The drain timeout passed: cancel running runs.
    drain_over: CancellationToken,
    /// Wakes idle workers after an enqueue ([`Shared::queued`]).
    work: tokio::sync::Notify,
    /// Wakes the publisher after an enqueue; a wake-up while it is busy is kept (a permit),
    /// never lost to a 200 ms poll.
    publish: Arc<tokio::sync::Notify>,
    launcher: Arc<dyn crate::Launcher>,
    report: std::sync::Mutex<ServeReport>,
}

impl Shared {
    /// Something was queued: wake the idle workers and the publisher.
    fn queued(&self) {
        self.work.notify_waiters();
        self.publish.notify_one();
    }
}

/// A line on stderr, with the time: the service's log.
pub fn log(msg: impl std::fmt::Display) {
    eprintln!(
        "{} {msg}",
        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
}

/// The service.
pub struct Service;

impl Service {
    /// Serve until `shutdown` is cancelled, then drain and return.
    pub async fn run(cfg: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<ServeReport> {
        let ServeConfig {
            dir,
            workers,
            drain_timeout,
            registry,
            store,
            launcher,
            hurry,
            broker,
        } = cfg;
        if workers == 0 && broker.is_none() {
            anyhow::bail!("with no workers (--workers 0) a broker (--broker) must run the runs");
        }
        let broker = match broker {
            // A broker that is away now only delays publishing (the runs wait in the
            // store); a configuration that cannot work is an error now.
            Some(cfg) => match broker::Broker::connect(cfg.clone()).await {
                Ok(b) => Some(b),
                Err(e @ broker::BrokerError::Config { .. }) => {
                    anyhow::bail!("cannot use the broker {}: {e}", cfg.shown_url())
                }
                Err(e) => {
                    log(format!(
                        "cannot reach the broker now ({e}); queued runs wait in the store and are published once it answers"
                    ));
                    Some(broker::Broker::unconnected(cfg)?)
                }
            },
            None => None,
        };
        let mut catalog = Catalog::new(&dir, registry);
        // The first scan must see the folder: a typo in DIR is an error, not an empty
        // service.
        let changes = tokio::task::block_in_place(|| catalog.scan()).map_err(|e| {
            anyhow::anyhow!("cannot read the pipelines folder {}: {e}", dir.display())
        })?;
        let lease = store::lease_period();
        let owner = LeaseOwner::this_process("serve");
        let keeper = {
            let store = store.clone();
            let owner = owner.clone();
            tokio::task::spawn_blocking(move || LeaseKeeper::start(store, owner, lease)).await??
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            owner,
            lease,
            integrations: Default::default(),
            stopping: CancellationToken::new(),
            drain_over: CancellationToken::new(),
            work: tokio::sync::Notify::new(),
            publish: Arc::new(tokio::sync::Notify::new()),
            launcher,
            report: Default::default(),
        });
        record_changes(&shared, &catalog, changes).await;
        log(format!(
            "serving {} integration(s) from {} with {workers} worker(s); store: {}{}",
            catalog.integrations().len(),
            dir.display(),
            store.describe(),
            broker
                .as_ref()
                .map(|b| format!("; publishing runs to {}", b.shown_url()))
                .unwrap_or_default()
        ));
        // Runs of owners that died while nobody was serving.
        expire_lost(&shared).await;

        let watcher = tokio::spawn(watch(shared.clone(), catalog));
        let scheduler = tokio::spawn(schedule_loop(shared.clone()));
        let expirer = tokio::spawn(expire_loop(shared.clone()));
        let listener = tokio::spawn(listen_loop(shared.clone()));
        let publisher = broker.clone().map(|b| {
            tokio::spawn(crate::publish::publish_loop(
                store.clone(),
                b,
                shared.stopping.clone(),
                shared.publish.clone(),
            ))
        });
        let mut pool = Vec::new();
        for n in 0..workers {
            pool.push(tokio::spawn(worker(shared.clone(), n + 1)));
        }

        shutdown.cancelled().await;
        log("stopping: no new ticks or claims; waiting for running runs");
        shared.stopping.cancel();
        let _ = scheduler.await;
        let _ = watcher.await;
        let _ = expirer.await;
        listener.abort();
        if let Some(p) = publisher {
            let _ = p.await;
        }
        if let Some(b) = &broker {
            b.close().await;
        }
        let running = async {
            for w in &mut pool {
                let _ = w.await;
            }
        };
        crate::runs::drain(running, drain_timeout, &hurry, &shared.drain_over).await;
        {
            let store = store.clone();
            let id = shared.owner.id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = store.resign(SCHEDULER_LEASE, &id);
                keeper.stop();
            })
            .await;
        }
        let report = shared
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        log(format!("stopped after {} run(s)", report.runs));
        Ok(report)
    }
}

/// The `integration:` and `schedule:` of a loaded file, as the store records them.
fn integration_file(i: &Integration) -> IntegrationFile {
    let plan = &i.plan;
    let meta = &plan.integration;
    let mut f = IntegrationFile::new(&i.name, i.file.display().to_string(), &i.hash);
    f.description = plan.description.clone();
    f.queue = meta.queue.clone();
    f.priority = i64::from(meta.priority);
    f.retry_on_lost = meta.retry_on_lost;
    f.max_concurrent_runs = Some(
        plan.schedule
            .as_ref()
            .map(|s| s.max_concurrent_runs.max(1))
            .unwrap_or(1),
    );
    f.metadata = serde_json::json!({
        "group": meta.group,
        "direction": meta.direction.map(|d| d.as_str()),
        "external_system": meta.external_system,
        "owner": meta.owner,
        "tags": meta.tags,
        "queue": meta.queue,
        "priority": meta.priority,
        "retry_on_lost": meta.retry_on_lost,
        "max_lost_retries": meta.max_lost_retries,
        "schedule": plan.schedule.as_ref().and_then(|s| scheduler::ScheduleSpec::from_config(s).ok()).map(|s| s.describe()),
    });
    f
}

/// Record a scan's changes in the store and publish the new snapshot.
async fn record_changes(shared: &Arc<Shared>, catalog: &Catalog, changes: Vec<Change>) {
    let now = Utc::now();
    for change in changes {
        let store = shared.store.clone();
        let result = match &change {
            Change::Added(name) | Change::Changed(name) => {
                let Some(i) = catalog.get(name) else { continue };
                let file = integration_file(i);
                log(format!(
                    "{} integration {name} ({})",
                    if matches!(change, Change::Added(_)) {
                        "loaded"
                    } else {
                        "reloaded"
                    },
                    i.file.display()
                ));
                blocking(&store, move |s| s.load_integration(&file, now)).await
            }
            Change::Invalid { file, name, error } => {
                match name {
                    Some(n) => log(format!(
                        "integration {n}: {} no longer validates; the previous version stays in use:\n{error}",
                        file.display()
                    )),
                    None => log(format!("{} is not loaded:\n{error}", file.display())),
                }
                match name.clone() {
                    Some(n) => {
                        let e = error.clone();
                        blocking(&store, move |s| s.set_load_error(&n, Some(&e), now)).await
                    }
                    None => Ok(()),
                }
            }
            Change::Removed(name) => {
                log(format!(
                    "integration {name}: its file is gone; it is no longer scheduled"
                ));
                let n = name.clone();
                blocking(&store, move |s| s.set_removed(&n, true, now)).await
            }
        };
        if let Err(e) = result {
            log(format!("cannot record {change:?} in the store: {e:#}"));
        }
    }
    shared
        .integrations
        .set(Arc::new(catalog.integrations().clone()));
}

async fn watch(shared: Arc<Shared>, mut catalog: Catalog) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shared.stopping.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        let (back, result) = tokio::task::spawn_blocking(move || {
            let r = catalog.scan();
            (catalog, r)
        })
        .await
        .expect("scan thread");
        catalog = back;
        match result {
            Ok(changes) => {
                if failing {
                    log(format!("{} is readable again", catalog.dir().display()));
                    failing = false;
                }
                if !changes.is_empty() {
                    record_changes(&shared, &catalog, changes).await;
                }
            }
            Err(e) if !failing => {
                log(format!(
                    "cannot read {} ({e}); the loaded integrations stay in use",
                    catalog.dir().display()
                ));
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// The scheduler loop: plans while holding the leader lease.
async fn schedule_loop(shared: Arc<Shared>) {
    // When each integration's next tick is due, as last planned (a cache: the store's
    // cursor is the truth, another server may have moved it).
    let mut next_due: HashMap<String, (String, DateTime<Utc>)> = HashMap::new();
    let mut leading = false;
    let mut last_lead_check: Option<std::time::Instant> = None;
    // The store's integrations version when the cache was filled: an integration enabled
    // or disabled (here or by any process) is planned again at once, so its next run is
    // right away what `integrations show` says, not at its previously planned instant.
    let mut seen_version: Option<i64> = None;
    loop {
        if shared.stopping.is_cancelled() {
            return;
        }
        // Renew (or try to take) the leader lease every third of its period.
        if last_lead_check.is_none_or(|t| t.elapsed() >= shared.lease / 3) {
            let owner = shared.owner.clone();
            let ttl = shared.lease;
            match blocking(&shared.store, move |s| {
                s.try_lead(SCHEDULER_LEASE, &owner, ttl, Utc::now())
            })
            .await
            {
                Ok(now_leading) => {
                    if now_leading != leading {
                        log(if now_leading {
                            "this server now plans the schedules (leader)"
                        } else {
                            "another server plans the schedules"
                        });
                        // A new leader reads every cursor again.
                        next_due.clear();
                    }
                    leading = now_leading;
                }
                Err(e) => log(format!("cannot renew the scheduler lease: {e:#}")),
            }
            last_lead_check = Some(std::time::Instant::now());
        }
        let mut wake = Utc::now() + chrono::Duration::from_std(SCHEDULER_WAKE).unwrap();
        if leading {
            match blocking(&shared.store, |s| s.integrations_version()).await {
                Ok(v) if seen_version != Some(v) => {
                    next_due.clear();
                    seen_version = Some(v);
                }
                Ok(_) => {}
                Err(e) => log(format!("scheduler: {e:#}")),
            }
            match plan_round(&shared, &mut next_due).await {
                Ok(Some(next)) => wake = wake.min(next),
                Ok(None) => {}
                Err(e) => log(format!("scheduler: {e:#}")),
            }
        }
        let sleep = (wake - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_millis(10))
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = shared.stopping.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// How many integrations' ticks are written in one store transaction.
const RECORD_CHUNK: usize = 500;

/// The cache key of an integration's schedule: what makes a cached due instant stale.
fn schedule_key(spec: &scheduler::ScheduleSpec) -> String {
    format!("{}:{}", spec.fingerprint(), spec.enabled)
}

/// One round: plan every due integration together (three reads for all of them, then one
/// write transaction per [`RECORD_CHUNK`] integrations, so 10,000 per-minute schedules are
/// a few transactions a minute, not tens of thousands); the earliest next due instant.
async fn plan_round(
    shared: &Arc<Shared>,
    next_due: &mut HashMap<String, (String, DateTime<Utc>)>,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let snapshot = shared.integrations.get();
    let now = Utc::now();
    let mut earliest: Option<DateTime<Utc>> = None;
    let note = |t: DateTime<Utc>, earliest: &mut Option<DateTime<Utc>>| {
        *earliest = Some(earliest.map_or(t, |e| e.min(t)));
    };
    next_due.retain(|name, _| snapshot.contains_key(name));
    // Which integrations are due, from the cache alone.
    let mut due: Vec<(&Integration, &scheduler::ScheduleSpec)> = Vec::new();
    for (name, integration) in snapshot.iter() {
        let Some(spec) = integration.spec.as_ref() else {
            continue;
        };
        let key = schedule_key(spec);
        if let Some((k, at)) = next_due.get(name) {
            if *k == key && *at > now {
                note(*at, &mut earliest);
                continue;
            }
        }
        due.push((integration, spec));
    }
    if due.is_empty() {
        return Ok(earliest);
    }
    let (rows, cursors, counts) = blocking(&shared.store, |s| {
        Ok((
            s.list_integrations()?,
            s.schedule_cursors()?,
            s.integration_counts()?,
        ))
    })
    .await?;
    let rows: HashMap<String, store::Integration> =
        rows.into_iter().map(|i| (i.name.clone(), i)).collect();
    let mut batches = Vec::new();
    let mut cancels: Vec<(String, usize)> = Vec::new();
    for (integration, spec) in due {
        let name = &integration.name;
        let key = schedule_key(spec);
        let row = rows.get(name);
        if row.is_some_and(|r| !r.enabled || r.removed) {
            // Looked at again at its next fire time; when it is enabled again its schedule
            // restarts from the instant it was enabled.
            let at = scheduler::next_after(spec, now).unwrap_or(DateTime::<Utc>::MAX_UTC);
            note(at, &mut earliest);
            next_due.insert(name.clone(), (key, at));
            continue;
        }
        let fingerprint = spec.fingerprint();
        let stored = cursors.get(name);
        // Re-enabled after the cursor: the schedule resumes from the enable instant, so
        // the pause is never caught up.
        let cursor = match (stored, row.and_then(|r| r.resumed_at)) {
            (Some(c), Some(r)) if r > c.last_planned => Some(scheduler::Cursor {
                through: r.min(now),
                fingerprint: fingerprint.clone(),
            }),
            (None, Some(r)) => Some(scheduler::Cursor {
                through: r.min(now),
                fingerprint: fingerprint.clone(),
            }),
            (Some(c), _) => Some(scheduler::Cursor {
                through: c.last_planned,
                fingerprint: c.fingerprint.clone(),
            }),
            (None, None) => None,
        };
        let plan = scheduler::plan_ticks(spec, cursor.as_ref(), now);
        if plan.reset && cursor.is_some() && spec.enabled {
            log(format!(
                "integration {name}: the schedule changed; it restarts from now ({})",
                spec.describe()
            ));
        }
        if let Some(since) = plan.dropped_since {
            log(format!(
                "integration {name}: ticks since {} were not run (catch_up: {}, max_catch_up {})",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                spec.catch_up.as_str(),
                spec.max_catch_up
            ));
        }
        let c = counts.get(name).copied().unwrap_or_default();
        let (running, mut queued) = (c.active as usize, c.queued as usize);
        let meta = &integration.plan.integration;
        let last = plan.due.len().saturating_sub(1);
        let mut batch = store::TickBatch::new(name, &fingerprint, plan.cursor.through);
        let next = scheduler::next_after(spec, plan.cursor.through);
        batch.next_run = Some(if spec.enabled { next } else { None });
        for (k, at) in plan.due.iter().enumerate() {
            let policy = if k < last {
                scheduler::OverlapPolicy::for_catch_up(spec)
            } else {
                scheduler::OverlapPolicy::of(spec)
            };
            let stamp = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            match scheduler::decide_overlap(&policy, running, queued) {
                scheduler::OverlapDecision::Skip => {
                    let why = format!(
                        "skipped: {running} running, {queued} queued (max_concurrent_runs {}, on_overlap {})",
                        spec.max_concurrent_runs,
                        spec.on_overlap.as_str()
                    );
                    log(format!("integration {name}: tick {stamp} {why}"));
                    batch.ticks.push(PlannedTick {
                        scheduled_at: *at,
                        enqueue: None,
                        note: Some(why),
                    });
                }
                d => {
                    if let scheduler::OverlapDecision::CancelRunning { cancel } = d {
                        cancels.push((name.clone(), cancel));
                    }
                    let mut e = Enqueue::new(name, Trigger::Schedule);
                    e.queue = meta.queue.clone();
                    e.priority = i64::from(meta.priority);
                    e.logical_date = Some(*at);
                    e.dedup_key = Some(format!("{name}@{stamp}"));
                    queued += 1;
                    batch.ticks.push(PlannedTick {
                        scheduled_at: *at,
                        enqueue: Some(e),
                        note: None,
                    });
                }
            }
        }
        // An integration switched off in its file moves its cursor at the schedule's pace
        // (so switching it on later floods nothing) and is looked at again then.
        let at = next.unwrap_or(DateTime::<Utc>::MAX_UTC);
        note(at, &mut earliest);
        next_due.insert(name.clone(), (key, at));
        batches.push(batch);
    }
    for (name, count) in cancels {
        cancel_oldest(shared, &name, count).await;
    }
    let mut enqueued = false;
    for chunk in batches.chunks(RECORD_CHUNK) {
        let chunk = chunk.to_vec();
        let outcomes = blocking(&shared.store, move |s| {
            s.record_ticks_many(&chunk, Utc::now())
        })
        .await?;
        enqueued |= outcomes
            .iter()
            .flatten()
            .any(|o| o.inserted && o.queue_item.is_some());
    }
    if enqueued {
        shared.queued();
    }
    Ok(earliest)
}

/// `on_overlap: cancel_running`: ask the oldest running runs to cancel.
async fn cancel_oldest(shared: &Arc<Shared>, name: &str, count: usize) {
    let n = name.to_string();
    let result = blocking(&shared.store, move |s| {
        let mut running = s.find_runs(&RunFilter {
            pipeline: Some(n),
            status: Some(Status::Running),
            ..Default::default()
        })?;
        running.sort_by_key(|r| r.id);
        let mut ids = Vec::new();
        for r in running.into_iter().take(count) {
            if s.request_cancel(r.id, Utc::now())? {
                ids.push(r.id);
            }
        }
        Ok(ids)
    })
    .await;
    match result {
        Ok(ids) if !ids.is_empty() => log(format!(
            "integration {name}: cancelling run(s) {ids:?} for a new tick (on_overlap: cancel_running)"
        )),
        Ok(_) => {}
        Err(e) => log(format!("integration {name}: cannot cancel running runs: {e:#}")),
    }
}

/// Wake the workers (and the publisher) as soon as another process queued something (`pipe
/// trigger`, a backfill, another server's tick): the store's notification on PostgreSQL,
/// else their polls.
async fn listen_loop(shared: Arc<Shared>) {
    let mut failing = false;
    loop {
        match blocking(&shared.store, |s| s.wait_for_queue(LISTEN_WAIT)).await {
            Ok(woken) => {
                failing = false;
                if woken {
                    shared.queued();
                }
            }
            Err(e) => {
                if !failing {
                    log(format!(
                        "cannot listen for queued runs (polling instead): {e:#}"
                    ));
                    failing = true;
                }
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

/// Every lease period: runs of dead owners become abandoned, or queued again. Every
/// [`PRUNE_EVERY`]: ticks, finished queue items and dead leases older than [`KEEP`] are
/// deleted (runs and logs stay), so a per-second schedule does not grow the store forever.
async fn expire_loop(shared: Arc<Shared>) {
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shared.stopping.cancelled() => return,
            _ = tokio::time::sleep(shared.lease) => {}
        }
        expire_lost(&shared).await;
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(std::time::Instant::now());
            let before = Utc::now() - chrono::Duration::from_std(KEEP).expect("a week");
            match blocking(&shared.store, move |s| s.prune(before)).await {
                Ok(p) if p.ticks + p.queue_items + p.leases > 0 => log(format!(
                    "pruned {} tick(s), {} queue item(s), {} lease(s) older than {}",
                    p.ticks,
                    p.queue_items,
                    p.leases,
                    engine::duration::human(KEEP)
                )),
                Ok(_) => {}
                Err(e) => log(format!("cannot prune the store: {e:#}")),
            }
        }
    }
}

/// Runs of dead owners: the store marks them abandoned and, in the same transaction,
/// queues those of `retry_on_lost: true` integrations again (so does every `pipe` command
/// that looks at the history: whoever notices first, the outcome is the same).
async fn expire_lost(shared: &Arc<Shared>) {
    let lost = match blocking(&shared.store, |s| s.expire_lost(Utc::now())).await {
        Ok(l) => l,
        Err(e) => {
            log(format!("cannot expire lost runs: {e:#}"));
            return;
        }
    };
    for run in lost {
        match run.requeued {
            Some(item) => {
                log(format!(
                    "run {} of {}: its owner is gone; queued again as item {item} (retry_on_lost)",
                    run.run_id, run.pipeline
                ));
                shared.queued();
            }
            None => log(format!(
                "run {} of {}: its owner is gone; marked abandoned",
                run.run_id, run.pipeline
            )),
        }
    }
}

/// One worker: claim, run, ack, until stopping.
async fn worker(shared: Arc<Shared>, n: usize) {
    loop {
        if shared.stopping.is_cancelled() {
            return;
        }
        let claimed = {
            let id = shared.owner.id.clone();
            let lease = shared.lease;
            blocking(&shared.store, move |s| s.claim(&id, &[], lease, Utc::now())).await
        };
        match claimed {
            Ok(Some(item)) => run_item(&shared, n, item).await,
            Ok(None) => {
                tokio::select! {
                    _ = shared.stopping.cancelled() => return,
                    _ = shared.work.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
            Err(e) => {
                log(format!("worker {n}: cannot claim from the queue: {e:#}"));
                tokio::select! {
                    _ = shared.stopping.cancelled() => return,
                    _ = tokio::time::sleep(IDLE_POLL * 4) => {}
                }
            }
        }
    }
}

/// Run one claimed item to its end.
async fn run_item(shared: &Arc<Shared>, n: usize, item: QueueItem) {
    let snapshot = shared.integrations.get();
    let Some(integration) = snapshot.get(&item.integration).cloned() else {
        log(format!(
            "worker {n}: queue item {} is for {}, which is not loaded here; given up",
            item.id, item.integration
        ));
        crate::runs::ack(&shared.store, item.id, AckOutcome::Cancelled).await;
        return;
    };
    let runs = crate::runs::Runs {
        store: shared.store.clone(),
        launcher: shared.launcher.clone(),
        drain_over: shared.drain_over.clone(),
    };
    // A disabled integration's items are never claimed (the claim cancels them).
    let finished = runs
        .run(
            &format!("worker {n}"),
            &integration,
            item,
            &shared.owner.id,
            false,
            |_| {},
        )
        .await;
    if let Some(f) = finished {
        let mut r = shared.report.lock().unwrap_or_else(|p| p.into_inner());
        r.runs += 1;
        if f.cancelled_at_drain {
            r.cancelled_at_drain += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::plan::Plan;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records the run and finishes it at once, with `status`.
    struct Instant {
        started: AtomicUsize,
        status: Status,
        paused: AtomicUsize,
    }

    impl Instant {
        fn new(status: Status) -> Arc<Instant> {
            Arc::new(Instant {
                started: AtomicUsize::new(0),
                status,
                paused: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait::async_trait]
    impl crate::Launcher for Instant {
        async fn start(&self, job: crate::Job) -> anyhow::Result<crate::RunHandle> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let item = job.queue_item.clone();
            let store = job.store.clone();
            let status = self.status;
            let run_id = tokio::task::spawn_blocking(move || {
                let mut new =
                    store::NewRun::new(&item.integration, item.trigger, store::Owner::Pipe);
                new.logical_date = item.logical_date;
                new.params = item.params.clone();
                new.lease_owner = Some(job.lease_owner.clone());
                new.queue_item = Some(item.id);
                let id = store.create_run(&new)?;
                store.write_events(
                    id,
                    &[store::RunEvent::RunFinished {
                        status,
                        error: None,
                        at: Utc::now(),
                    }],
                )?;
                anyhow::Ok(id)
            })
            .await??;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(crate::RunEnd {
                status,
                recorded: true,
            });
            Ok(crate::RunHandle {
                run_id,
                cancel: CancellationToken::new(),
                done: rx,
            })
        }

        async fn paused(&self, _: Arc<Plan>, _: i64, failures: u32, _: Arc<dyn RunStore>) {
            assert_eq!(failures, 2);
            self.paused.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn config(
        dir: &std::path::Path,
        store: Arc<dyn RunStore>,
        launcher: Arc<Instant>,
    ) -> ServeConfig {
        ServeConfig {
            dir: dir.join("p"),
            workers: 2,
            broker: None,
            drain_timeout: Duration::from_secs(5),
            registry: crate::test_support::registry(),
            store,
            launcher,
            hurry: CancellationToken::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_second_tick_runs_once_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("p")).unwrap();
        std::fs::write(
            dir.path().join("p/t.yaml"),
            "pipeline: t\nschedule: { cron: \"* * * * * *\", catch_up: all, max_concurrent_runs: 5, on_overlap: queue }\nsteps:\n  s: { type: log, with: { message: hi } }\n",
        )
        .unwrap();
        let store = store::open(&store::StoreConfig::sqlite(dir.path().join("state"))).unwrap();
        let launcher = Instant::new(Status::Succeeded);
        for _ in 0..2 {
            let stop = CancellationToken::new();
            let task = tokio::spawn(Service::run(
                config(dir.path(), store.clone(), launcher.clone()),
                stop.clone(),
            ));
            let until = std::time::Instant::now() + Duration::from_secs(60);
            let before = store.list_runs(Some("t"), 0).unwrap().len();
            while store.list_runs(Some("t"), 0).unwrap().len() < before + 3 {
                assert!(std::time::Instant::now() < until, "no runs");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.cancel();
            task.await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let runs = store.list_runs(Some("t"), 0).unwrap();
        let mut dates: Vec<i64> = runs
            .iter()
            .map(|r| r.logical_date.unwrap().timestamp())
            .collect();
        dates.sort();
        let n = dates.len();
        dates.dedup();
        assert_eq!(dates.len(), n, "a tick ran twice");
        assert_eq!(
            (dates[n - 1] - dates[0] + 1) as usize,
            n,
            "a tick is missing: {dates:?}"
        );
        assert!(runs.iter().all(|r| r.trigger == store::Trigger::Schedule));
        assert_eq!(launcher.started.load(Ordering::SeqCst), n);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pause_after_failures_disables_once_and_calls_the_paused_hook() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("p")).unwrap();
        std::fs::write(
            dir.path().join("p/f.yaml"),
            "pipeline: f\nschedule: { cron: \"* * * * * *\", pause_after_failures: 2 }\nsteps:\n  s: { type: log, with: { message: hi } }\n",
        )
        .unwrap();
        let store = store::open(&store::StoreConfig::sqlite(dir.path().join("state"))).unwrap();
        let launcher = Instant::new(Status::Failed);
        let stop = CancellationToken::new();
        let task = tokio::spawn(Service::run(
            config(dir.path(), store.clone(), launcher.clone()),
            stop.clone(),
        ));
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while store.is_enabled("f").unwrap() || store.get_integration("f").unwrap().is_none() {
            assert!(std::time::Instant::now() < until, "never paused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Ticks after the pause are not run.
        let started = launcher.started.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(launcher.paused.load(Ordering::SeqCst), 1);
        assert_eq!(launcher.started.load(Ordering::SeqCst), started);
        assert!(store.consecutive_failures("f").unwrap() >= 2);
    }
}
