//! `pipe worker`: runs the queued runs `pipe serve --broker` publishes, on any machine.
//!
//! A worker loads the same pipelines folder as the server (like an Airflow or Celery worker,
//! it runs the code it was deployed with) and consumes its named queues from RabbitMQ with a
//! prefetch equal to its free slots. A message carries a queue item id only; for each one:
//!
//! 1. the item is read from the store: unknown, or no longer queued (a duplicate or
//!    redelivered message) → the message is acked and dropped; an integration this worker
//!    has not loaded (a deploy in progress) → the message goes back after a pause, for a
//!    worker that has it;
//! 2. it is claimed in the store ([`store::RunStore::claim_item`]: one transaction, queued →
//!    claimed by this worker's lease, fence + 1, under the integration's
//!    `max_concurrent_runs` across all workers), and only then the message is acked. `Full`
//!    acks the message and unpublishes the item: the server publishes it again once there is
//!    room. A store that cannot be reached puts the message back and pauses consuming until
//!    it answers again;
//! 3. the run is recorded under the claim's fence and every history write checks it
//!    ([`store::HistoryWriter::start_fenced`]): when this worker's lease expired (a stall,
//!    a partition) and the server marked its run abandoned or queued it again, the stale run
//!    is refused, stops, and never overwrites the record.
//!
//! The worker's lease (renewed by a [`LeaseKeeper`]) keeps its claims and runs alive: after
//! `kill -9`, within one lease period the server marks its runs abandoned (or queues them
//! again under `retry_on_lost`). Its row in the workers table (`pipe workers list`) gets a
//! heartbeat with its current runs; `pipe workers drain ID` or SIGTERM drains it: no more
//! messages (unacked ones go back to the queue), running runs get the drain timeout, then
//! are cancelled (teardown steps still run).

use crate::catalog::Catalog;
use crate::runs::{blocking, Runs};
use crate::serve::log;
use chrono::Utc;
use engine::step::Registry;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{ItemClaim, LeaseKeeper, LeaseOwner, QueueState, RunStore, StoreError, WorkerInfo};
use tokio_util::sync::CancellationToken;

/// How often the folder is scanned.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long a message for an integration this worker has not loaded is held before it goes
/// back to its queue (for another worker, or for this one once its folder has the file).
const NOT_HERE_PAUSE: Duration = Duration::from_secs(2);
/// How often a worker that cannot reach its store asks it again.
const STORE_RETRY: Duration = Duration::from_secs(2);

/// What `pipe worker` asks for.
pub struct WorkerConfig {
    /// The pipelines folder (the same files as the server's).
    pub dir: PathBuf,
    /// The named queues consumed.
    pub queues: Vec<String>,
    /// Runs at once.
    pub slots: usize,
    /// How long running runs may take to finish once draining.
    pub drain_timeout: Duration,
    /// The step types (to validate files).
    pub registry: Registry,
    pub store: Arc<dyn RunStore>,
    pub broker: broker::BrokerConfig,
    /// Starts runs (the one run path).
    pub launcher: Arc<dyn crate::Launcher>,
    /// Cancelled to end the drain early (a second SIGTERM).
    pub hurry: CancellationToken,
    /// The `pipe` version, for the workers table.
    pub version: String,
}

/// What happened, for the exit message.
#[derive(Debug, Default, Clone)]
pub struct WorkerReport {
    /// This worker's id in the workers table.
    pub id: String,
    /// Runs it finished.
    pub runs: u64,
    /// Runs cancelled because the drain timeout passed.
    pub cancelled_at_drain: u64,
}

struct Shared {
    store: Arc<dyn RunStore>,
    owner: LeaseOwner,
    lease: Duration,
    integrations: crate::catalog::Live,
    /// The run ids running now (for heartbeats).
    running: Mutex<BTreeSet<i64>>,
    runs: Runs,
    report: Mutex<WorkerReport>,
}

/// A worker.
pub struct Worker;

impl Worker {
    /// Consume and run until `shutdown` is cancelled (or a drain is requested), then drain
    /// and return.
    pub async fn run(
        cfg: WorkerConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<WorkerReport> {
        let WorkerConfig {
            dir,
            queues,
            slots,
            drain_timeout,
            registry,
            store,
            broker,
            launcher,
            hurry,
            version,
        } = cfg;
        anyhow::ensure!(slots >= 1, "a worker needs at least one slot");
        anyhow::ensure!(!queues.is_empty(), "a worker needs at least one queue");
        let mut catalog = Catalog::new(&dir, registry);
        let changes = tokio::task::block_in_place(|| catalog.scan()).map_err(|e| {
            anyhow::anyhow!("cannot read the pipelines folder {}: {e}", dir.display())
        })?;
        for change in &changes {
            if let crate::Change::Invalid { file, error, .. } = change {
                log(format!("{} is not loaded:\n{error}", file.display()));
            }
        }
        let lease = store::lease_period();
        let owner = LeaseOwner::this_process("worker");
        let keeper = {
            let (store, owner) = (store.clone(), owner.clone());
            tokio::task::spawn_blocking(move || LeaseKeeper::start(store, owner, lease)).await??
        };
        let mut info = WorkerInfo::this_process(
            owner.id.clone(),
            queues.clone(),
            u32::try_from(slots).unwrap_or(u32::MAX),
        );
        info.version = Some(version);
        info.lease = lease;
        {
            let info = info.clone();
            blocking(&store, move |s| s.register_worker(&info, Utc::now())).await?;
        }
        let shown = broker.shown_url();
        let prefetch = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        // A broker that is away at start delays this worker, like one lost later.
        let mut consumer = {
            let mut delay = STORE_RETRY;
            let mut said = None::<std::time::Instant>;
            loop {
                match broker::Consumer::connect(broker.clone(), &queues, prefetch(slots)).await {
                    Ok(c) => break c,
                    Err(e @ broker::BrokerError::Config { .. }) => {
                        anyhow::bail!("cannot consume from the broker {shown}: {e}")
                    }
                    Err(e) => {
                        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            log(format!(
                                "cannot consume from the broker {shown} ({e}); trying again"
                            ));
                            said = Some(std::time::Instant::now());
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        record_stop(&store, &info.id, keeper).await;
                        return Ok(WorkerReport { id: info.id, ..Default::default() });
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            owner,
            lease,
            integrations: crate::catalog::Live::new(Arc::new(catalog.integrations().clone())),
            running: Mutex::new(BTreeSet::new()),
            runs: Runs {
                store: store.clone(),
                launcher,
                drain_over: CancellationToken::new(),
            },
            report: Mutex::new(WorkerReport {
                id: info.id.clone(),
                ..Default::default()
            }),
        });
        log(format!(
            "worker {} on {} consuming {} with {slots} slot(s) from {shown}; {} integration(s) from {}; store: {}",
            info.id,
            info.host,
            queues.join(","),
            catalog.integrations().len(),
            dir.display(),
            store.describe()
        ));

        let stop_tasks = CancellationToken::new();
        let drain = CancellationToken::new();
        let watcher = tokio::spawn(watch(shared.clone(), catalog, stop_tasks.clone()));
        let heart = tokio::spawn(heartbeat(
            shared.clone(),
            info.clone(),
            drain.clone(),
            stop_tasks.clone(),
        ));

        let mut tasks = tokio::task::JoinSet::new();
        let mut store_ok = true;
        let mut current = prefetch(slots);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = drain.cancelled() => {
                    log("drain requested (`pipe workers drain`)");
                    break;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep(STORE_RETRY), if !store_ok => {
                    if blocking(&shared.store, |s| s.schema_version()).await.is_ok() {
                        log("the store answers again: claiming again");
                        store_ok = true;
                    }
                }
                next = consumer.next(), if store_ok => match next {
                    None => {
                        log("the broker consumer closed");
                        break;
                    }
                    Some(Err(e)) => log(format!("broker: {e}")),
                    Some(Ok(delivery)) => {
                        if tasks.len() >= slots {
                            // Delivered before the prefetch came down: for someone else.
                            reject(delivery, true).await;
                        } else if let Some(fut) = take(&shared, delivery, &mut store_ok).await {
                            tasks.spawn(fut);
                        }
                    }
                },
            }
            let want = if store_ok {
                prefetch(slots - tasks.len().min(slots))
            } else {
                0
            };
            if want != current {
                match consumer.set_prefetch(want).await {
                    Ok(()) => current = want,
                    Err(e) => log(format!("broker: cannot set the prefetch: {e}")),
                }
            }
        }

        log(format!(
            "draining: no more runs taken; waiting for {} running run(s)",
            tasks.len()
        ));
        // Unacked messages go back to their queues for other workers.
        consumer.close().await;
        let running = async { while tasks.join_next().await.is_some() {} };
        crate::runs::drain(running, drain_timeout, &hurry, &shared.runs.drain_over).await;
        stop_tasks.cancel();
        let _ = watcher.await;
        let _ = heart.await;
        record_stop(&store, &info.id, keeper).await;
        let report = shared
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        log(format!("worker stopped after {} run(s)", report.runs));
        Ok(report)
    }
}

/// The worker's row says it stopped; its lease is given up.
async fn record_stop(store: &Arc<dyn RunStore>, id: &str, keeper: LeaseKeeper) {
    let (store, id) = (store.clone(), id.to_string());
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = store.worker_stopped(&id, Utc::now()) {
            log(format!("cannot record this worker's stop: {e}"));
        }
        keeper.stop();
    })
    .await;
}

async fn reject(delivery: broker::Delivery, requeue: bool) {
    if let Err(e) = delivery.reject(requeue).await {
        if !matches!(e, broker::BrokerError::Settle { .. }) {
            log(format!("broker: cannot hand a message back: {e}"));
        }
    }
}

async fn ack(delivery: broker::Delivery) {
    // After a lost connection the broker redelivers the message itself; the claim in the
    // store then drops the duplicate.
    if let Err(e) = delivery.ack().await {
        if !matches!(e, broker::BrokerError::Settle { .. }) {
            log(format!("broker: cannot ack a message: {e}"));
        }
    }
}

type RunFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Decide what to do with one message (see the module docs); the run to start, if claimed.
async fn take(
    shared: &Arc<Shared>,
    delivery: broker::Delivery,
    store_ok: &mut bool,
) -> Option<RunFuture> {
    let id = delivery.item_id;
    let looked = blocking(&shared.store, move |s| s.get_item(id)).await;
    let item = match looked {
        Ok(Some(item)) => item,
        Ok(None) => {
            log(format!(
                "queue item {id} does not exist (pruned?); message dropped"
            ));
            ack(delivery).await;
            return None;
        }
        Err(e) => {
            store_down(store_ok, &e);
            reject(delivery, true).await;
            return None;
        }
    };
    if item.state != QueueState::Queued {
        // A duplicate, or redelivered after another worker claimed it.
        ack(delivery).await;
        return None;
    }
    let Some(integration) = shared.integrations.get().get(&item.integration).cloned() else {
        log(format!(
            "queue item {id} is for integration {}, which this worker has not loaded (its file is not in this worker's folder); handing it back",
            item.integration
        ));
        tokio::spawn(async move {
            tokio::time::sleep(NOT_HERE_PAUSE).await;
            reject(delivery, true).await;
        });
        return None;
    };
    let (owner, lease) = (shared.owner.id.clone(), shared.lease);
    let claimed = blocking(&shared.store, move |s| {
        s.claim_item(id, &owner, lease, Utc::now())
    })
    .await;
    match claimed {
        Ok(ItemClaim::Claimed(item)) => {
            ack(delivery).await;
            let shared = shared.clone();
            Some(Box::pin(async move {
                let s2 = shared.clone();
                let finished = shared
                    .runs
                    .run(
                        &format!("worker {}", shared.owner.id),
                        &integration,
                        *item,
                        &shared.owner.id,
                        true,
                        move |run_id| {
                            s2.running
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(run_id);
                        },
                    )
                    .await;
                if let Some(f) = finished {
                    shared
                        .running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&f.run_id);
                    let mut r = shared.report.lock().unwrap_or_else(|p| p.into_inner());
                    r.runs += 1;
                    if f.cancelled_at_drain {
                        r.cancelled_at_drain += 1;
                    }
                }
            }))
        }
        Ok(ItemClaim::Gone { .. }) | Ok(ItemClaim::Disabled) | Ok(ItemClaim::NotFound) => {
            ack(delivery).await;
            None
        }
        Ok(ItemClaim::Full) => {
            // The server publishes it again once its integration (or backfill) has room.
            ack(delivery).await;
            if let Err(e) = blocking(&shared.store, move |s| s.unpublish(id)).await {
                log(format!(
                    "cannot hand queue item {id} back to the store: {e:#}"
                ));
            }
            None
        }
        Err(e) => {
            store_down(store_ok, &e);
            reject(delivery, true).await;
            None
        }
    }
}

fn store_down(store_ok: &mut bool, e: &anyhow::Error) {
    if *store_ok {
        log(format!(
            "cannot reach the store ({e:#}); not claiming until it answers again"
        ));
    }
    *store_ok = false;
}

/// Rescan the folder every second (nothing is recorded: the server records integrations).
async fn watch(shared: Arc<Shared>, mut catalog: Catalog, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        let (back, result) = tokio::task::spawn_blocking(move || {
            let r = catalog.scan();
            (catalog, r)
        })
        .await
        .expect("scan thread");
        catalog = back;
        if let Ok(changes) = result {
            if changes.is_empty() {
                continue;
            }
            for change in &changes {
                match change {
                    crate::Change::Invalid { file, error, .. } => log(format!(
                        "{} does not validate; the previous version (if any) stays in use:\n{error}",
                        file.display()
                    )),
                    other => log(format!("pipelines folder: {other:?}")),
                }
            }
            shared
                .integrations
                .set(Arc::new(catalog.integrations().clone()));
        }
    }
}

/// Every third of a lease period: the heartbeat with the running runs; a drain request
/// cancels `drain`. A worker row that is gone (pruned while this worker was cut off) is
/// registered again.
async fn heartbeat(
    shared: Arc<Shared>,
    info: WorkerInfo,
    drain: CancellationToken,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(shared.lease / 3) => {}
        }
        let running: Vec<i64> = shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let id = info.id.clone();
        let info2 = info.clone();
        let beat = blocking(&shared.store, move |s| {
            match s.worker_heartbeat(&id, &running, Utc::now()) {
                Err(StoreError::NotFound(_)) => {
                    s.register_worker(&info2, Utc::now())?;
                    s.worker_heartbeat(&id, &running, Utc::now())
                }
                other => other,
            }
        })
        .await;
        match beat {
            Ok(control) => {
                if failing {
                    log("heartbeats reach the store again");
                    failing = false;
                }
                if control.drain_requested {
                    drain.cancel();
                }
            }
            Err(e) if !failing => {
                log(format!("cannot record this worker's heartbeat: {e:#}"));
                failing = true;
            }
            Err(_) => {}
        }
    }
}
