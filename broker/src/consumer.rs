//! The worker side: one consumer over several queues, that outlives broker outages.
//!
//! A [`Consumer`] owns a background task (the supervisor) with its own connection and one
//! channel carrying one AMQP consumer per queue. Deliveries from all of them come out of
//! [`Consumer::next`] in arrival order. When the connection or channel is lost the supervisor
//! reports it once ([`BrokerError::Disconnected`] as an item), reconnects with jittered
//! exponential backoff, declares the queues again, restores the prefetch and consumes again;
//! `next` returns `None` only after [`Consumer::close`] (or when the `Consumer` is dropped).
//!
//! # Ack after claim
//! A worker acks a delivery only once it has claimed the queue item in the store (or found
//! it already claimed or finished). Until then the message is the broker's to redeliver: a
//! worker that dies between receiving and claiming loses nothing, RabbitMQ hands the message
//! to another consumer with `redelivered` set. After the claim the store's lease and fencing
//! token own the run, so acking then means RabbitMQ's consumer timeout never touches a long
//! run. An ack that fails because its channel died is harmless ([`BrokerError::Settle`]):
//! the message comes back, and the claim (already taken) makes the worker drop it.
//!
//! # Prefetch = free slots
//! The prefetch is a channel-wide limit (`basic.qos` with `global`, which RabbitMQ applies
//! across all consumers of the channel) so it bounds the unacked messages over all queues
//! together. [`Consumer::set_prefetch`] changes it at any time; 0 means "take nothing now"
//! (AMQP's 0 would mean unlimited, so the consumer cancels its AMQP consumers instead and
//! starts them again on the next non-zero prefetch).
//!
//! # Malformed messages
//! A body that is not a [`RunMessage`] is rejected without requeue (RabbitMQ drops it, or
//! dead-letters it where the operator configured that) and reported as a
//! [`BrokerError::Malformed`] item; it is never returned as a run.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::{bounded, declare_on, open_connection, validate};
use crate::config::url_password;
use crate::error::scrub;
use crate::{BrokerConfig, BrokerError, RunMessage};

/// One "run this queue item" message received from a queue. Settle it with [`ack`](Self::ack)
/// (after the claim) or [`reject`](Self::reject); a delivery dropped unsettled stays unacked
/// until the consumer's connection ends, and then goes back to its queue.
pub struct Delivery {
    /// The queue item's id in pipe's store.
    pub item_id: i64,
    /// The pipe queue it came from (without the prefix).
    pub queue: String,
    /// True when RabbitMQ delivered this message before (to a consumer that did not ack it).
    pub redelivered: bool,
    /// The message's AMQP priority.
    pub priority: u8,
    acker: Acker,
    full_queue: String,
    shown: Arc<str>,
    /// Cancelled when the session (connection) this delivery came on ends.
    lost: CancellationToken,
    bound: Duration,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("item_id", &self.item_id)
            .field("queue", &self.queue)
            .field("redelivered", &self.redelivered)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Acks: the broker forgets the message. An error means the channel it came on is gone
    /// (the broker will redeliver it); callers that claimed the item first can ignore it.
    pub async fn ack(self) -> Result<(), BrokerError> {
        let r = self
            .settle(self.acker.ack(BasicAckOptions::default()))
            .await;
        self.settled(r)
    }

    /// Rejects: with `requeue` the message goes back to its queue, without it is dropped (or
    /// dead-lettered).
    pub async fn reject(self, requeue: bool) -> Result<(), BrokerError> {
        let r = self
            .settle(self.acker.reject(BasicRejectOptions { requeue }))
            .await;
        self.settled(r)
    }

    /// Runs an ack or reject, unless the connection it must go through is gone: lapin can
    /// leave such a call pending forever when its connection died mid-call.
    async fn settle(
        &self,
        call: impl std::future::Future<Output = lapin::Result<bool>>,
    ) -> Result<bool, String> {
        if self.lost.is_cancelled() {
            return Ok(false);
        }
        tokio::select! {
            r = call => r.map_err(|e| e.to_string()),
            _ = self.lost.cancelled() => Ok(false),
            _ = tokio::time::sleep(self.bound) => Err(format!("no answer within {:?}", self.bound)),
        }
    }

    fn settled(&self, r: Result<bool, String>) -> Result<(), BrokerError> {
        let detail = match r {
            Ok(true) => return Ok(()),
            Ok(false) => "its connection is gone (the broker redelivers it)".to_string(),
            Err(e) => e,
        };
        Err(BrokerError::Settle {
            queue: self.full_queue.clone(),
            broker: self.shown.to_string(),
            detail,
        })
    }
}

enum Control {
    Prefetch(u16, oneshot::Sender<Result<(), BrokerError>>),
    Close(oneshot::Sender<()>),
}

/// A consumer over several pipe queues; see the module docs.
pub struct Consumer {
    rx: mpsc::UnboundedReceiver<Result<Delivery, BrokerError>>,
    ctl: mpsc::UnboundedSender<Control>,
    task: Option<JoinHandle<()>>,
    shown: Arc<str>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("broker", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Connects, declares `queues` and starts consuming with `prefetch`. The first connection
    /// must succeed (a wrong URL or password shows at once); later losses are healed.
    pub async fn connect(
        cfg: BrokerConfig,
        queues: &[String],
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        Self::start(cfg, queues, prefetch).await
    }

    pub(crate) async fn start(
        cfg: BrokerConfig,
        queues: &[String],
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        validate(&cfg)?;
        let shown: Arc<str> = cfg.shown_url().into();
        if queues.is_empty() {
            return Err(BrokerError::Config {
                broker: shown.to_string(),
                detail: "a consumer needs at least one queue".into(),
            });
        }
        let (out, rx) = mpsc::unbounded_channel();
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let mut sup = Supervisor {
            queues: queues
                .iter()
                .map(|q| (q.clone(), cfg.queue_name(q)))
                .collect(),
            cfg,
            shown: shown.clone(),
            prefetch,
            out,
            ctl: ctl_rx,
        };
        let session = sup.open_bounded().await?;
        let task = tokio::spawn(sup.run(session));
        Ok(Consumer {
            rx,
            ctl,
            task: Some(task),
            shown,
        })
    }

    /// The next delivery, or a report (`Malformed`: a bad message was rejected;
    /// `Disconnected`: the connection was lost and is being restored). `None` only once the
    /// consumer is closed; a broker outage just makes it wait.
    pub async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        self.rx.recv().await
    }

    /// Sets the prefetch (the most unacked messages over all queues) to `n`, e.g. the
    /// worker's free slots; 0 takes nothing until the next non-zero value. Kept across
    /// reconnects; while the broker is away it is applied on the next connection.
    pub async fn set_prefetch(&self, n: u16) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        let closed = || BrokerError::Closed {
            broker: self.shown.to_string(),
        };
        self.ctl
            .send(Control::Prefetch(n, tx))
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Stops consuming and closes the connection. Deliveries not yet acked go back to their
    /// queues (RabbitMQ requeues them when the channel closes) and reach other consumers
    /// with `redelivered` set.
    pub async fn close(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Control::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The background task of one [`Consumer`].
struct Supervisor {
    cfg: BrokerConfig,
    shown: Arc<str>,
    /// (pipe name, full RabbitMQ name).
    queues: Vec<(String, String)>,
    prefetch: u16,
    out: mpsc::UnboundedSender<Result<Delivery, BrokerError>>,
    ctl: mpsc::UnboundedReceiver<Control>,
}

/// What the merged consumer streams yield.
enum Event {
    Item(usize, Box<lapin::Result<lapin::message::Delivery>>),
    /// The AMQP consumer with this tag ended (cancelled, or its channel closed).
    Ended(String, usize),
}

struct Session {
    conn: Connection,
    chan: Channel,
    streams: SelectAll<BoxStream<'static, Event>>,
    /// Tags of the AMQP consumers running now (empty while paused).
    tags: Vec<String>,
    /// Tags we cancelled ourselves: their end is expected.
    ending: HashSet<String>,
    started: Instant,
    /// Cancelled when this session ends: its deliveries' acks fail at once.
    lost: CancellationToken,
}

enum Exit {
    Closed,
    Lost(String),
}

impl Supervisor {
    async fn run(mut self, first: Session) {
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut session = Some(first);
        loop {
            let s = match session.take() {
                Some(s) => s,
                None => match self.open_bounded().await {
                    Ok(s) => s,
                    Err(_) => {
                        // Reported once when the connection was lost; a long outage is
                        // one report, not one per attempt.
                        if !self.wait(backoff.next_delay()).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let started = s.started;
            match self.pump(s).await {
                Exit::Closed => return,
                Exit::Lost(detail) => {
                    // A connection that lived a while starts a new backoff sequence; one
                    // that dies at once keeps backing off.
                    if started.elapsed() >= self.cfg.backoff_max {
                        backoff.reset();
                    }
                    let report = BrokerError::Disconnected {
                        broker: self.shown.to_string(),
                        detail,
                    };
                    if self.out.send(Err(report)).is_err() || !self.wait(backoff.next_delay()).await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps `delay` while still answering control messages; false when closed.
    async fn wait(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                c = self.ctl.recv() => match c {
                    None => return false,
                    Some(Control::Close(reply)) => {
                        let _ = reply.send(());
                        return false;
                    }
                    Some(Control::Prefetch(n, reply)) => {
                        // Applied by the next session.
                        self.prefetch = n;
                        let _ = reply.send(Ok(()));
                    }
                },
            }
        }
    }

    /// [`Supervisor::open`] within `connect_timeout + op_timeout`.
    async fn open_bounded(&mut self) -> Result<Session, BrokerError> {
        let bound = self.cfg.connect_timeout + self.cfg.op_timeout;
        let shown = self.shown.clone();
        bounded(bound, &shown, "connect", "", self.open()).await
    }

    /// One connection: channel, queues declared, prefetch, consumers.
    async fn open(&mut self) -> Result<Session, BrokerError> {
        let conn = open_connection(&self.cfg, &self.shown, "pipe worker").await?;
        let chan = conn
            .create_channel()
            .await
            .map_err(|e| self.connect_error(e))?;
        for (_, full) in &self.queues {
            declare_on(&chan, &self.cfg, &self.shown, full).await?;
        }
        let mut s = Session {
            conn,
            chan,
            streams: SelectAll::new(),
            tags: Vec::new(),
            ending: HashSet::new(),
            started: Instant::now(),
            lost: CancellationToken::new(),
        };
        if self.prefetch > 0 {
            self.qos(&s.chan).await.map_err(|e| self.connect_error(e))?;
            self.start_consumers(&mut s)
                .await
                .map_err(|e| self.connect_error(e))?;
        }
        Ok(s)
    }

    async fn qos(&self, chan: &Channel) -> lapin::Result<()> {
        chan.basic_qos(self.prefetch, BasicQosOptions { global: true })
            .await
    }

    async fn start_consumers(&self, s: &mut Session) -> lapin::Result<()> {
        for (i, (_, full)) in self.queues.iter().enumerate() {
            let consumer = s
                .chan
                .basic_consume(
                    full.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tag = consumer.tag().to_string();
            s.tags.push(tag.clone());
            let end = stream::once(async move { Event::Ended(tag, i) });
            s.streams.push(
                consumer
                    .map(move |r| Event::Item(i, Box::new(r)))
                    .chain(end)
                    .boxed(),
            );
        }
        Ok(())
    }

    async fn pump(&mut self, mut s: Session) -> Exit {
        let exit = self.pump_session(&mut s).await;
        s.lost.cancel();
        exit
    }

    async fn pump_session(&mut self, s: &mut Session) -> Exit {
        loop {
            tokio::select! {
                Some(ev) = s.streams.next(), if !s.streams.is_empty() => {
                    if let Some(exit) = self.on_event(s, ev).await {
                        return exit;
                    }
                }
                c = self.ctl.recv() => match c {
                    None => {
                        self.shutdown(&s.conn).await;
                        return Exit::Closed;
                    }
                    Some(Control::Close(reply)) => {
                        self.shutdown(&s.conn).await;
                        let _ = reply.send(());
                        return Exit::Closed;
                    }
                    Some(Control::Prefetch(n, reply)) => {
                        let bound = self.cfg.op_timeout;
                        let applied = tokio::time::timeout(bound, self.apply_prefetch(s, n)).await;
                        match applied.unwrap_or_else(|_| Err(format!("basic.qos: no answer within {bound:?}"))) {
                            Ok(()) => {
                                let _ = reply.send(Ok(()));
                            }
                            Err(detail) => {
                                // Kept in self.prefetch: the next session applies it.
                                let _ = reply.send(Ok(()));
                                return Exit::Lost(detail);
                            }
                        }
                    }
                },
            }
        }
    }

    /// Handles one event of the consumer streams; `Some` ends the session.
    async fn on_event(&mut self, s: &mut Session, ev: Event) -> Option<Exit> {
        match ev {
            Event::Item(i, delivery) => match *delivery {
                Ok(d) => {
                    if self.forward(i, d, &s.lost).await {
                        None
                    } else {
                        self.shutdown(&s.conn).await;
                        Some(Exit::Closed)
                    }
                }
                Err(e) => Some(Exit::Lost(self.scrub(e))),
            },
            Event::Ended(tag, _) if s.ending.remove(&tag) => None,
            Event::Ended(_, i) => Some(Exit::Lost(format!(
                "the consumer on queue {} ended (queue deleted or channel closed)",
                self.queues[i].1
            ))),
        }
    }

    async fn apply_prefetch(&mut self, s: &mut Session, n: u16) -> Result<(), String> {
        self.prefetch = n;
        self.apply_prefetch_now(s, n)
            .await
            .map_err(|e| self.scrub(e))
    }

    async fn apply_prefetch_now(&self, s: &mut Session, n: u16) -> lapin::Result<()> {
        if n > 0 {
            self.qos(&s.chan).await?;
            if s.tags.is_empty() {
                self.start_consumers(s).await?;
            }
        } else {
            for tag in std::mem::take(&mut s.tags) {
                s.ending.insert(tag.clone());
                s.chan
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await?;
            }
        }
        Ok(())
    }

    /// Hands a delivery to the worker, or rejects a malformed one; false when nobody listens.
    async fn forward(
        &self,
        i: usize,
        d: lapin::message::Delivery,
        lost: &CancellationToken,
    ) -> bool {
        let (pipe, full) = &self.queues[i];
        let item = match RunMessage::decode(&d.data) {
            Ok(m) => Ok(Delivery {
                item_id: m.item_id,
                queue: pipe.clone(),
                redelivered: d.redelivered,
                priority: d.properties.priority().unwrap_or(0),
                acker: d.acker,
                full_queue: full.clone(),
                shown: self.shown.clone(),
                lost: lost.clone(),
                bound: self.cfg.op_timeout,
            }),
            Err(e) => {
                // If the reject does not arrive (channel lost), the message comes back and
                // is rejected then.
                let reject = d.acker.reject(BasicRejectOptions { requeue: false });
                let _ = tokio::time::timeout(self.cfg.op_timeout, reject).await;
                Err(BrokerError::Malformed {
                    queue: full.clone(),
                    broker: self.shown.to_string(),
                    detail: e.to_string(),
                })
            }
        };
        self.out.send(item).is_ok()
    }

    async fn shutdown(&self, conn: &Connection) {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "OK".into())).await;
    }

    fn scrub(&self, e: impl std::fmt::Display) -> String {
        scrub(e, url_password(&self.cfg.url))
    }

    fn connect_error(&self, e: impl std::fmt::Display) -> BrokerError {
        BrokerError::Connect {
            broker: self.shown.to_string(),
            detail: self.scrub(e),
        }
    }
}
