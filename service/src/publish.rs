//! `pipe serve --broker`: the outbox's publisher and republisher.
//!
//! The store is the record of what is queued; RabbitMQ only carries item ids to the workers.
//! An item is queued in the store first (by the scheduler, `pipe trigger`, a backfill, a
//! lost run's retry) and published afterwards, then marked published — so a crash between
//! the two leaves it unpublished and this loop finds it again, and a broker outage only
//! delays runs. Duplicates are harmless: a worker's claim takes an item once.
//!
//! - **publisher**: whenever something was queued here, and every [`PUBLISH_POLL`] for what
//!   other processes queued, it publishes what [`store::RunStore::unpublished`] returns
//!   (only items a claim could take now: an integration at its `max_concurrent_runs` waits
//!   in the store, not in the broker), many at once, each confirmed by the broker, then
//!   marks them;
//! - **republisher**: every [`REPUBLISH_EVERY`], items published more than [`STALE_AFTER`]
//!   ago and still queued are published again when their RabbitMQ queue is empty (their
//!   message is gone: a purge, a broker that lost it); while the queue still holds messages
//!   they may be among them, and workers will reach them.

use crate::runs::blocking;
use crate::serve::log;
use broker::{Broker, RunMessage};
use chrono::Utc;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{QueueItem, RunStore};
use tokio_util::sync::CancellationToken;

/// How often the store is asked for items queued by other processes.
const PUBLISH_POLL: Duration = Duration::from_millis(200);
/// Items read from the store per round.
const BATCH: usize = 512;
/// Publishes waiting for their confirms at once.
const IN_FLIGHT: usize = 64;
/// How often published-but-unclaimed items are looked at.
const REPUBLISH_EVERY: Duration = Duration::from_secs(15);
/// A published item still queued after this long may have lost its message.
const STALE_AFTER: Duration = Duration::from_secs(60);
/// The wait after a failed round, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Publish until `stopping`.
pub(crate) async fn publish_loop(
    store: Arc<dyn RunStore>,
    broker: Broker,
    stopping: CancellationToken,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut publisher = Publisher {
        store,
        broker,
        declared: BTreeSet::new(),
        failing: false,
    };
    let mut backoff = MIN_BACKOFF;
    let mut last_republish = Instant::now();
    loop {
        match publisher.round().await {
            Ok(_) => backoff = MIN_BACKOFF,
            Err(()) => {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        if last_republish.elapsed() >= REPUBLISH_EVERY {
            last_republish = Instant::now();
            publisher.republish_stale().await;
        }
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(PUBLISH_POLL) => {}
        }
    }
}

struct Publisher {
    store: Arc<dyn RunStore>,
    broker: Broker,
    /// Pipe queues declared on the broker by this process.
    declared: BTreeSet<String>,
    /// The last round failed (logged once per outage).
    failing: bool,
}

impl Publisher {
    /// Publish every publishable item; how many. `Err` after a failure (logged).
    async fn round(&mut self) -> Result<usize, ()> {
        let mut total = 0;
        loop {
            let items = match blocking(&self.store, |s| s.unpublished(BATCH)).await {
                Ok(items) => items,
                Err(e) => {
                    self.failed(format!("cannot read the queue from the store: {e:#}"));
                    return Err(());
                }
            };
            if items.is_empty() {
                self.recovered();
                return Ok(total);
            }
            let full = items.len() == BATCH;
            let (done, error) = self.publish(&items).await;
            total += done.len();
            self.mark(done).await?;
            if let Some(e) = error {
                self.failed(e);
                return Err(());
            }
            self.recovered();
            if !full {
                return Ok(total);
            }
        }
    }

    /// Publish `items` (many at once); the ids confirmed, and the first error.
    async fn publish(&mut self, items: &[QueueItem]) -> (Vec<i64>, Option<String>) {
        let mut error = None;
        for queue in items
            .iter()
            .map(|i| i.queue.clone())
            .collect::<BTreeSet<_>>()
        {
            if self.declared.contains(&queue) {
                continue;
            }
            match self.broker.declare(&queue).await {
                Ok(()) => {
                    self.declared.insert(queue);
                }
                Err(e) => {
                    error.get_or_insert(format!("cannot declare queue {queue}: {e}"));
                }
            }
        }
        let mut done = Vec::with_capacity(items.len());
        let mut tasks = tokio::task::JoinSet::new();
        let mut pending = items
            .iter()
            .filter(|i| self.declared.contains(&i.queue))
            .map(|i| (i.id, i.queue.clone(), i.priority));
        loop {
            while tasks.len() < IN_FLIGHT {
                let Some((id, queue, priority)) = pending.next() else {
                    break;
                };
                let broker = self.broker.clone();
                tasks.spawn(async move {
                    let r = broker.publish(&queue, &RunMessage::new(id), priority).await;
                    (id, r)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            match joined {
                Ok((id, Ok(()))) => done.push(id),
                Ok((id, Err(e))) => {
                    error.get_or_insert(format!("cannot publish queue item {id}: {e}"));
                }
                Err(e) => {
                    error.get_or_insert(format!("a publish task failed: {e}"));
                }
            }
        }
        (done, error)
    }

    /// Record the confirmed publishes.
    async fn mark(&mut self, ids: Vec<i64>) -> Result<(), ()> {
        if ids.is_empty() {
            return Ok(());
        }
        match blocking(&self.store, move |s| s.mark_published(&ids, Utc::now())).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // They are published but not marked: the next round publishes them again
                // (duplicates are dropped by the claim).
                self.failed(format!("cannot mark published items in the store: {e:#}"));
                Err(())
            }
        }
    }

    /// Publish again the items whose message seems lost (see the module docs).
    async fn republish_stale(&mut self) {
        let before = Utc::now() - chrono::Duration::from_std(STALE_AFTER).expect("a minute fits");
        let stale = match blocking(&self.store, move |s| s.stale_published(before, BATCH)).await {
            Ok(s) => s,
            Err(e) => {
                self.failed(format!("cannot read the queue from the store: {e:#}"));
                return;
            }
        };
        let mut by_queue: BTreeMap<String, Vec<QueueItem>> = BTreeMap::new();
        for item in stale {
            by_queue.entry(item.queue.clone()).or_default().push(item);
        }
        for (queue, items) in by_queue {
            match self.broker.queue_depth(&queue).await {
                Ok(0) => {}
                // Messages are waiting: these items may be among them.
                Ok(_) => continue,
                Err(e) => {
                    self.failed(format!("cannot read the depth of queue {queue}: {e}"));
                    return;
                }
            }
            log(format!(
                "queue {queue}: {} item(s) published over {}s ago are still queued and the queue is empty; publishing them again",
                items.len(),
                STALE_AFTER.as_secs()
            ));
            let (done, error) = self.publish(&items).await;
            if self.mark(done).await.is_err() {
                return;
            }
            if let Some(e) = error {
                self.failed(e);
                return;
            }
        }
    }

    fn failed(&mut self, why: String) {
        if !self.failing {
            log(format!(
                "publishing to the broker stopped: {why}; queued runs wait in the store and are published once it works again"
            ));
            self.failing = true;
        }
    }

    fn recovered(&mut self) {
        if self.failing {
            log("publishing to the broker works again");
            self.failing = false;
        }
    }
}
