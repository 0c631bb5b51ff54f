//! The publishing side: one connection, one confirm-mode channel, reopened on demand.
//!
//! Admin operations (declare, depth, delete) each use a short-lived channel of their own: a
//! failed declare (a queue declared elsewhere with other arguments) or a passive declare of
//! a missing queue makes RabbitMQ close the channel it came on, and that must never be the
//! channel the publishes and their confirms are in flight on.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::url_password;
use crate::error::scrub;
use crate::{amqp_priority, BrokerConfig, BrokerError, Consumer, RunMessage};

/// AMQP delivery mode 2: the broker writes the message to disk (with a durable queue it
/// survives a broker restart).
pub(crate) const PERSISTENT: u8 = 2;

/// A handle on RabbitMQ for pipe's scheduler: declares queues, publishes run messages,
/// reads queue depths, and opens [`Consumer`]s. Cheap to clone (one shared connection).
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: BrokerConfig,
    pub(crate) shown: String,
    link: Mutex<Option<Link>>,
    links_opened: std::sync::atomic::AtomicU64,
    /// Pipe queue names declared through this handle, declared again on every reconnect.
    declared: StdMutex<BTreeSet<String>>,
}

struct Link {
    /// Which connection this is (1, 2, …): a publish that failed on link 3 must not close
    /// link 4, which another publish opened meanwhile.
    id: u64,
    conn: Connection,
    /// In confirm mode: every publish waits for the broker's ack.
    chan: Channel,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("broker", &self.inner.shown)
            .finish_non_exhaustive()
    }
}

/// How one publish attempt ended.
enum Attempt {
    Done,
    /// Retrying will not help (nack, unroutable).
    Fatal(BrokerError),
    /// The link is suspect: reconnect and try again while time is left.
    Retry(BrokerError),
}

impl Broker {
    /// Connects (failing at once when the broker cannot be reached: a misconfiguration shows
    /// at startup). Later losses are healed on demand by the next operation.
    pub async fn connect(cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        let broker = Broker::unconnected(cfg)?;
        let (cfg, shown) = (&broker.inner.cfg, &broker.inner.shown);
        let bound = cfg.connect_timeout + cfg.op_timeout;
        bounded(bound, shown, "connect", "", broker.channel()).await?;
        Ok(broker)
    }

    /// A handle that connects on its first operation (a server that starts while the
    /// broker is away keeps its runs in its store and publishes them once it is back). Only
    /// the configuration is checked here.
    pub fn unconnected(cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        validate(&cfg)?;
        Ok(Broker {
            inner: Arc::new(Inner {
                shown: cfg.shown_url(),
                cfg,
                link: Mutex::new(None),
                links_opened: std::sync::atomic::AtomicU64::new(0),
                declared: StdMutex::new(BTreeSet::new()),
            }),
        })
    }

    /// The configuration (its URL holds the password: show [`Broker::shown_url`] instead).
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.cfg
    }

    /// The broker's URL without its password.
    pub fn shown_url(&self) -> &str {
        &self.inner.shown
    }

    /// Declares pipe queue `queue`: the durable RabbitMQ queue `<prefix><queue>` with
    /// `x-max-priority`. Idempotent; declared again after every reconnect.
    pub async fn declare(&self, queue: &str) -> Result<(), BrokerError> {
        let full = self.inner.cfg.queue_name(queue);
        let q = &full;
        self.admin("declare", &full, |chan| async move {
            declare_on(&chan, &self.inner.cfg, &self.inner.shown, q).await
        })
        .await?;
        self.inner
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_string());
        Ok(())
    }

    /// Publishes "run queue item `msg.item_id`" to pipe queue `queue` (declare it first) as a
    /// persistent message at the AMQP priority [`amqp_priority`] gives `priority`, and waits
    /// for the broker's confirm. Reconnects as needed, all within `publish_timeout`; past it,
    /// or on a nack, it is an error and the caller keeps the run queued in its store.
    ///
    /// At least once: when a connection dies between the broker taking the message and its
    /// confirm arriving, the retry publishes it again. Consumers see the duplicate and the
    /// claim in the store drops it.
    pub async fn publish(
        &self,
        queue: &str,
        msg: &RunMessage,
        priority: i64,
    ) -> Result<(), BrokerError> {
        let full = self.inner.cfg.queue_name(queue);
        let level = amqp_priority(priority, self.inner.cfg.max_priority);
        self.publish_body(&full, &msg.encode(), level).await
    }

    pub(crate) async fn publish_body(
        &self,
        full: &str,
        body: &[u8],
        level: u8,
    ) -> Result<(), BrokerError> {
        let cfg = &self.inner.cfg;
        let deadline = Instant::now() + cfg.publish_timeout;
        let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
        let mut last: Option<BrokerError> = None;
        loop {
            let mut link = None;
            let attempt = self.publish_once(full, body, level, &mut link);
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Attempt::Done) => return Ok(()),
                Ok(Attempt::Fatal(e)) => return Err(e),
                Ok(Attempt::Retry(e)) => {
                    self.drop_link(link).await;
                    let delay = backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    last = Some(e);
                    tokio::time::sleep(delay).await;
                }
                Err(_elapsed) => {
                    // No confirm in time: that connection is suspect.
                    self.drop_link(link).await;
                    return Err(last.unwrap_or_else(|| BrokerError::Timeout {
                        operation: "publish",
                        queue: full.to_string(),
                        broker: self.inner.shown.clone(),
                        after: cfg.publish_timeout,
                    }));
                }
            }
        }
    }

    /// One try; `link` is set to the id of the link it used.
    async fn publish_once(
        &self,
        full: &str,
        body: &[u8],
        level: u8,
        link: &mut Option<u64>,
    ) -> Attempt {
        let failed = |detail: String| BrokerError::Publish {
            queue: full.to_string(),
            broker: self.inner.shown.clone(),
            detail,
        };
        let chan = match self.link_channel().await {
            Ok((id, c)) => {
                *link = Some(id);
                c
            }
            Err(e) => return Attempt::Retry(e),
        };
        let props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_priority(level)
            .with_content_type("application/json".into());
        // mandatory: a message for a queue that does not exist comes back instead of being
        // dropped by the default exchange and confirmed as if all were well.
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = match chan
            .basic_publish("".into(), full.into(), options, body, props)
            .await
        {
            Ok(c) => c,
            Err(e) => return Attempt::Retry(failed(self.scrub(e))),
        };
        match confirm.await {
            Ok(Confirmation::Ack(None)) => Attempt::Done,
            Ok(Confirmation::Ack(Some(returned))) => Attempt::Fatal(failed(format!(
                "unroutable ({} {}): is the queue declared?",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => Attempt::Fatal(BrokerError::Nacked {
                queue: full.to_string(),
                broker: self.inner.shown.clone(),
            }),
            Ok(Confirmation::NotRequested) => {
                Attempt::Fatal(failed("the channel is not in confirm mode".into()))
            }
            Err(e) => Attempt::Retry(failed(self.scrub(e))),
        }
    }

    /// The number of messages ready in pipe queue `queue` (not counting those delivered and
    /// not yet acked): for metrics and autoscaling. A missing queue is a `Declare` error.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let full = self.inner.cfg.queue_name(queue);
        let q = &full;
        self.admin("queue depth", &full, |chan| async move {
            let options = QueueDeclareOptions::default().passive();
            chan.queue_declare(q.as_str().into(), options, FieldTable::default())
                .await
                .map(|q| q.message_count())
                .map_err(|e| self.declare_error(q, e))
        })
        .await
    }

    /// Deletes pipe queue `queue` and the messages in it (tests, operations). Deleting a
    /// missing queue is not an error.
    pub async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let full = self.inner.cfg.queue_name(queue);
        let q = &full;
        self.inner
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(queue);
        self.admin("delete", &full, |chan| async move {
            chan.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(drop)
                .map_err(|e| self.declare_error(q, e))
        })
        .await
    }

    /// A consumer over pipe queues `queues` (declared if needed) with `prefetch` unacked
    /// messages at most (0: paused); see [`Consumer`]. It has a connection of its own.
    pub async fn consume(&self, queues: &[String], prefetch: u16) -> Result<Consumer, BrokerError> {
        Consumer::start(self.inner.cfg.clone(), queues, prefetch).await
    }

    /// Closes the connection (publishes after this reconnect).
    pub async fn close(&self) {
        if let Some(link) = self.inner.link.lock().await.take() {
            let closing = link.conn.close(200, "OK".into());
            let _ = tokio::time::timeout(self.inner.cfg.op_timeout, closing).await;
        }
    }

    /// The publishing channel, reconnecting when the old one is gone.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.link_channel().await.map(|(_, chan)| chan)
    }

    /// The publishing channel and its link's id.
    async fn link_channel(&self) -> Result<(u64, Channel), BrokerError> {
        let mut link = self.inner.link.lock().await;
        if let Some(l) = link.as_ref() {
            if l.conn.status().connected() && l.chan.status().connected() {
                return Ok((l.id, l.chan.clone()));
            }
        }
        *link = None;
        let cfg = &self.inner.cfg;
        let conn = open_connection(cfg, &self.inner.shown, "pipe publisher").await?;
        let chan = conn
            .create_channel()
            .await
            .map_err(|e| self.connect_error(e))?;
        chan.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.connect_error(e))?;
        let declared: Vec<String> = self
            .inner
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for queue in declared {
            declare_on(&chan, cfg, &self.inner.shown, &cfg.queue_name(&queue)).await?;
        }
        let id = 1 + self
            .inner
            .links_opened
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *link = Some(Link {
            id,
            conn,
            chan: chan.clone(),
        });
        Ok((id, chan))
    }

    /// Runs `op` on a fresh channel of the shared connection (closed afterwards), all
    /// within `connect_timeout + op_timeout`.
    pub(crate) async fn admin<T, F, Fut>(
        &self,
        operation: &'static str,
        full: &str,
        op: F,
    ) -> Result<T, BrokerError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let cfg = &self.inner.cfg;
        let work = async {
            let chan = self.admin_channel().await?;
            let r = op(chan.clone()).await;
            close_quietly(&chan).await;
            r
        };
        let bound = cfg.connect_timeout + cfg.op_timeout;
        bounded(bound, &self.inner.shown, operation, full, work).await
    }

    /// A fresh channel on the shared connection, for one admin operation.
    async fn admin_channel(&self) -> Result<Channel, BrokerError> {
        self.channel().await?;
        let link = self.inner.link.lock().await;
        match link.as_ref() {
            Some(l) => l
                .conn
                .create_channel()
                .await
                .map_err(|e| self.connect_error(e)),
            None => Err(BrokerError::Connect {
                broker: self.inner.shown.clone(),
                detail: "connection lost".into(),
            }),
        }
    }

    /// Forgets link `id` if it is still the current one (`None`, no link was had: nothing to
    /// forget). Dropping the lapin connection closes it.
    async fn drop_link(&self, id: Option<u64>) {
        let mut link = self.inner.link.lock().await;
        if id.is_some() && link.as_ref().map(|l| l.id) == id {
            link.take();
        }
    }

    fn scrub(&self, e: impl std::fmt::Display) -> String {
        scrub(e, url_password(&self.inner.cfg.url))
    }

    fn connect_error(&self, e: lapin::Error) -> BrokerError {
        BrokerError::Connect {
            broker: self.inner.shown.clone(),
            detail: self.scrub(e),
        }
    }

    fn declare_error(&self, full: &str, e: lapin::Error) -> BrokerError {
        BrokerError::Declare {
            queue: full.to_string(),
            broker: self.inner.shown.clone(),
            detail: self.scrub(e),
        }
    }
}

/// `fut`, or a `Timeout` error naming `operation` and `queue` after `after`.
pub(crate) async fn bounded<T>(
    after: Duration,
    shown: &str,
    operation: &'static str,
    queue: &str,
    fut: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(after, fut).await.unwrap_or_else(|_| {
        Err(BrokerError::Timeout {
            operation,
            queue: queue.to_string(),
            broker: shown.to_string(),
            after,
        })
    })
}

pub(crate) fn validate(cfg: &BrokerConfig) -> Result<(), BrokerError> {
    let bad = |detail: &str| {
        Err(BrokerError::Config {
            broker: cfg.shown_url(),
            detail: detail.to_string(),
        })
    };
    if cfg.max_priority == 0 {
        return bad("max_priority must be at least 1");
    }
    if !(cfg.url.starts_with("amqp://") || cfg.url.starts_with("amqps://")) {
        return bad("the URL must start with amqp:// or amqps://");
    }
    Ok(())
}

/// One connection attempt, bounded by `connect_timeout`.
pub(crate) async fn open_connection(
    cfg: &BrokerConfig,
    shown: &str,
    name: &str,
) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(cfg.connect_timeout, Connection::connect(&cfg.url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(BrokerError::Connect {
            broker: shown.to_string(),
            detail: scrub(e, url_password(&cfg.url)),
        }),
        Err(_) => Err(BrokerError::Timeout {
            operation: "connect",
            queue: String::new(),
            broker: shown.to_string(),
            after: cfg.connect_timeout,
        }),
    }
}

/// Declares the durable priority queue `full` on `chan`.
pub(crate) async fn declare_on(
    chan: &Channel,
    cfg: &BrokerConfig,
    shown: &str,
    full: &str,
) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::LongInt(i32::from(cfg.max_priority)),
    );
    chan.queue_declare(full.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(drop)
        .map_err(|e| BrokerError::Declare {
            queue: full.to_string(),
            broker: shown.to_string(),
            detail: scrub(e, url_password(&cfg.url)),
        })
}

/// Closes an admin channel; a channel the broker already closed is fine.
pub(crate) async fn close_quietly(chan: &Channel) {
    if chan.status().connected() {
        let _ = tokio::time::timeout(Duration::from_secs(2), chan.close(200, "OK".into())).await;
    }
}
