//! The broker transport against the machine's real RabbitMQ (127.0.0.1:5672, guest/guest, or
//! `PIPE_TEST_AMQP`). Every test uses queues of its own (a unique suffix) and deletes them,
//! also when it fails. Without a broker the tests fail, loudly.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use broker::testing::{publish_raw, take_raw, unique_queue, CutProxy};
use broker::{amqp_priority, Broker, BrokerConfig, BrokerError, Consumer, Delivery, RunMessage};

fn url() -> String {
    std::env::var("PIPE_TEST_AMQP").unwrap_or_else(|_| broker::DEFAULT_URL.to_string())
}

fn cfg() -> BrokerConfig {
    BrokerConfig::new(url())
}

async fn connect(cfg: BrokerConfig) -> Broker {
    let shown = cfg.shown_url();
    match Broker::connect(cfg).await {
        Ok(b) => b,
        Err(e) => panic!(
            "these tests need a running RabbitMQ at {shown} (guest/guest on 127.0.0.1:5672, or \
             PIPE_TEST_AMQP): {e}"
        ),
    }
}

/// A guard against a hang (a broken test must end, not block CI); not a timing assertion.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress within 60 s"))
}

/// The next run delivery, skipping disconnection reports; panics on any other report.
async fn next_run(consumer: &mut Consumer) -> Delivery {
    within("next delivery", async {
        loop {
            match consumer.next().await {
                Some(Ok(d)) => return d,
                Some(Err(BrokerError::Disconnected { .. })) => continue,
                Some(Err(e)) => panic!("unexpected report: {e}"),
                None => panic!("consumer ended"),
            }
        }
    })
    .await
}

/// Deletes its queues when dropped (on a thread with a runtime of its own, so a failing
/// test cleans up too).
struct Queues(Vec<String>);

impl Queues {
    async fn declared(broker: &Broker, labels: &[&str]) -> Queues {
        let qs = Queues(labels.iter().map(|l| unique_queue(l)).collect());
        for q in &qs.0 {
            broker.declare(q).await.expect("declare");
        }
        qs
    }

    fn name(&self, i: usize) -> String {
        self.0[i].clone()
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.0);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let b = Broker::connect(cfg()).await.expect("connect for cleanup");
                for q in queues {
                    b.delete_queue(&q).await.expect("delete queue");
                }
                b.close().await;
            });
        })
        .join()
        .expect("cleanup thread");
    }
}

/// A fresh queue holding run `item`, and a consumer on it with prefetch 1.
async fn one_run_queue(label: &str, item: i64) -> (Broker, Queues, Consumer) {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &[label]).await;
    broker
        .publish(&qs.name(0), &RunMessage::new(item), 0)
        .await
        .unwrap();
    let consumer = broker.consume(&qs.0, 1).await.unwrap();
    (broker, qs, consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_over_two_queues() {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["rt-a", "rt-b"]).await;
    broker
        .publish(&qs.name(0), &RunMessage::new(7), 0)
        .await
        .unwrap();
    broker
        .publish(&qs.name(1), &RunMessage::new(8), 0)
        .await
        .unwrap();
    let mut consumer = broker.consume(&qs.0, 4).await.unwrap();
    let mut got = BTreeSet::new();
    for _ in 0..2 {
        let d = next_run(&mut consumer).await;
        assert!(!d.redelivered);
        assert_eq!(d.priority, amqp_priority(0, 10));
        got.insert((d.queue.clone(), d.item_id));
        d.ack().await.unwrap();
    }
    let want = BTreeSet::from([(qs.name(0), 7), (qs.name(1), 8)]);
    assert_eq!(got, want);
    consumer.close().await;
    assert_eq!(broker.queue_depth(&qs.name(0)).await.unwrap(), 0);
    assert_eq!(broker.queue_depth(&qs.name(1)).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_is_delivered_first() {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["prio"]).await;
    let q = qs.name(0);
    // (item, pipe priority): a backfill (-100), defaults, and a high-priority integration.
    let published = [
        (1, -100),
        (2, 0),
        (3, 10),
        (4, -100),
        (5, 10),
        (6, 0),
        (7, 1),
    ];
    for (item, priority) in published {
        broker
            .publish(&q, &RunMessage::new(item), priority)
            .await
            .unwrap();
    }
    let mut consumer = broker.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..published.len() {
        let d = next_run(&mut consumer).await;
        order.push(d.item_id);
        d.ack().await.unwrap();
    }
    // Highest first; FIFO within one level.
    assert_eq!(order, [3, 5, 7, 2, 6, 1, 4]);
    consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_persistent_confirmed_and_hold_only_the_id() {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["raw"]).await;
    let q = qs.name(0);
    // publish returns only once the broker confirmed the message.
    broker.publish(&q, &RunMessage::new(4242), 3).await.unwrap();
    assert_eq!(broker.queue_depth(&q).await.unwrap(), 1);
    let raw = take_raw(&broker, &q).await.unwrap().expect("one message");
    assert_eq!(raw.body, br#"{"item":4242}"#.to_vec());
    let value: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["item"], "the body carries the id and nothing else");
    assert_eq!(raw.delivery_mode, Some(2), "persistent");
    assert_eq!(raw.priority, Some(amqp_priority(3, 10)));
    assert_eq!(raw.content_type.as_deref(), Some("application/json"));
    assert!(raw.headers.is_empty(), "no headers: {:?}", raw.headers);
    assert_eq!(take_raw(&broker, &q).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_durable_with_max_priority() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["durable"]).await;
    let full = broker.config().queue_name(&qs.name(0));
    // RabbitMQ refuses to redeclare a queue with other properties (PRECONDITION_FAILED), so
    // a redeclaration that differs in one property at a time shows what the queue has.
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let try_declare = |durable: bool, max: Option<i32>| {
        let conn = &conn;
        let full = full.clone();
        async move {
            let chan = conn.create_channel().await.unwrap();
            let mut args = FieldTable::default();
            if let Some(m) = max {
                args.insert("x-max-priority".into(), AMQPValue::LongInt(m));
            }
            let options = QueueDeclareOptions {
                durable,
                ..QueueDeclareOptions::default()
            };
            chan.queue_declare(full.as_str().into(), options, args)
                .await
                .map(drop)
        }
    };
    try_declare(true, Some(10)).await.expect("same properties");
    let err = try_declare(false, Some(10)).await.unwrap_err();
    assert!(err.to_string().contains("durable"), "{err}");
    let err = try_declare(true, Some(5)).await.unwrap_err();
    assert!(err.to_string().contains("x-max-priority"), "{err}");
    conn.close(200, "OK".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_delivery_is_redelivered_to_another_consumer() {
    let (broker, qs, mut first) = one_run_queue("redeliver", 11).await;
    let d = next_run(&mut first).await;
    assert_eq!((d.item_id, d.redelivered), (11, false));
    // The worker dies before its claim: the delivery is never settled.
    drop(d);
    first.close().await;
    let mut second = broker.consume(&qs.0, 1).await.unwrap();
    let d = next_run(&mut second).await;
    assert_eq!((d.item_id, d.redelivered), (11, true));
    d.ack().await.unwrap();
    second.close().await;
    assert_eq!(broker.queue_depth(&qs.name(0)).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_requeues_or_drops() {
    let (broker, qs, mut consumer) = one_run_queue("reject", 21).await;
    let d = next_run(&mut consumer).await;
    assert!(!d.redelivered);
    d.reject(true).await.unwrap();
    let d = next_run(&mut consumer).await;
    assert_eq!((d.item_id, d.redelivered), (21, true));
    d.reject(false).await.unwrap();
    // Closing returns every unsettled delivery to the queue: an empty queue after it means
    // the reject dropped the message.
    consumer.close().await;
    assert_eq!(broker.queue_depth(&qs.name(0)).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_is_rejected_and_reported_not_returned() {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["malformed"]).await;
    let q = qs.name(0);
    publish_raw(&broker, &q, br#"{"item":1,"params":{"password":"x"}}"#, 5)
        .await
        .unwrap();
    publish_raw(&broker, &q, b"\xff not json", 5).await.unwrap();
    broker.publish(&q, &RunMessage::new(31), 0).await.unwrap();
    let mut consumer = broker.consume(std::slice::from_ref(&q), 3).await.unwrap();
    let mut reports = 0;
    let run = within("the valid run", async {
        loop {
            match consumer.next().await.expect("open") {
                Err(BrokerError::Malformed { queue, detail, .. }) => {
                    assert!(queue.ends_with(&q), "{queue}");
                    assert!(!detail.contains("password"), "{detail}");
                    reports += 1;
                }
                Err(BrokerError::Disconnected { .. }) => {}
                Err(e) => panic!("unexpected report: {e}"),
                Ok(d) => return d,
            }
        }
    })
    .await;
    assert_eq!(reports, 2);
    assert_eq!(run.item_id, 31);
    run.ack().await.unwrap();
    consumer.close().await;
    // Rejected without requeue: nothing came back when the consumer closed.
    assert_eq!(broker.queue_depth(&q).await.unwrap(), 0);
}

/// A direct connection, a fresh queue, a [`CutProxy`] in front of the broker and a config
/// that goes through it.
async fn behind_proxy(label: &str) -> (Broker, Queues, CutProxy, BrokerConfig) {
    let direct = connect(cfg()).await;
    let qs = Queues::declared(&direct, &[label]).await;
    let proxy = CutProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let mut via = cfg();
    via.url = proxy.url_for(&via.url);
    (direct, qs, proxy, via)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reconnects_after_a_cut_and_loses_nothing() {
    let (direct, qs, proxy, via) = behind_proxy("cut").await;
    let q = qs.name(0);
    let broker = connect(via).await;
    for item in 1..=5 {
        broker.publish(&q, &RunMessage::new(item), 0).await.unwrap();
    }
    let mut consumer = broker.consume(std::slice::from_ref(&q), 10).await.unwrap();
    let mut acked = BTreeSet::new();
    let mut held = None;
    for _ in 0..5 {
        let d = next_run(&mut consumer).await;
        if d.item_id == 5 {
            held = Some(d);
        } else {
            acked.insert(d.item_id);
            d.ack().await.unwrap();
        }
    }
    let held = held.expect("item 5 delivered");

    proxy.cut();
    // The consumer reports the loss (once) and goes on.
    within("the disconnection report", async {
        loop {
            match consumer.next().await.expect("still open") {
                Err(BrokerError::Disconnected { detail, .. }) => {
                    assert!(!detail.contains(":guest@"), "{detail}");
                    return;
                }
                Err(e) => panic!("unexpected report: {e}"),
                Ok(d) => {
                    // An ack of items 1..4 that was still on its way when the cut came.
                    assert!(d.redelivered && d.item_id < 5, "{d:?}");
                }
            }
        }
    })
    .await;
    // The held delivery's channel is gone: its ack fails (harmlessly) and RabbitMQ
    // redelivers it below.
    assert!(matches!(held.ack().await, Err(BrokerError::Settle { .. })));

    // The publisher reconnects by itself.
    for item in 6..=10 {
        broker.publish(&q, &RunMessage::new(item), 0).await.unwrap();
    }
    let mut five_redelivered = false;
    while acked.len() < 10 {
        let d = next_run(&mut consumer).await;
        if d.item_id == 5 {
            assert!(d.redelivered);
            five_redelivered = true;
        }
        let id = d.item_id;
        d.ack().await.unwrap();
        acked.insert(id);
    }
    assert!(five_redelivered);
    assert_eq!(acked, (1..=10).collect());
    consumer.close().await;
    broker.close().await;
    assert_eq!(
        direct.queue_depth(&q).await.unwrap(),
        0,
        "nothing left behind"
    );
    assert!(
        proxy.accepted() >= 4,
        "two connections before the cut, two after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_during_an_outage_fails_in_bounded_time_then_recovers() {
    let (direct, qs, proxy, mut via) = behind_proxy("outage").await;
    let q = qs.name(0);
    via.publish_timeout = Duration::from_secs(1);
    via.connect_timeout = Duration::from_millis(500);
    let broker = connect(via).await;
    broker.publish(&q, &RunMessage::new(1), 0).await.unwrap();

    proxy.set_down(true);
    // Returns (an error), bounded by publish_timeout; the hang guard is far above it.
    let err = within(
        "publish during the outage",
        broker.publish(&q, &RunMessage::new(2), 0),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            BrokerError::Connect { .. } | BrokerError::Timeout { .. } | BrokerError::Publish { .. }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("127.0.0.1"), "names the broker: {text}");
    assert!(!text.contains(":guest@"), "no password: {text}");

    proxy.set_down(false);
    broker.publish(&q, &RunMessage::new(3), 0).await.unwrap();
    assert_eq!(direct.queue_depth(&q).await.unwrap(), 2);
    let mut ids = Vec::new();
    while let Some(raw) = take_raw(&direct, &q).await.unwrap() {
        ids.push(RunMessage::decode(&raw.body).unwrap().item_id);
    }
    assert_eq!(ids, [1, 3]);
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_counts_ready_messages() {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["depth"]).await;
    let q = qs.name(0);
    assert_eq!(broker.queue_depth(&q).await.unwrap(), 0);
    for item in 0..3 {
        broker.publish(&q, &RunMessage::new(item), 0).await.unwrap();
    }
    assert_eq!(broker.queue_depth(&q).await.unwrap(), 3);
    let missing = unique_queue("missing");
    let err = broker.queue_depth(&missing).await.unwrap_err();
    assert!(
        matches!(&err, BrokerError::Declare { queue, .. } if queue.ends_with(&missing)),
        "{err:?}"
    );
    // The failed passive declare did not hurt the publishing channel.
    broker.publish(&q, &RunMessage::new(3), 0).await.unwrap();
    assert_eq!(broker.queue_depth(&q).await.unwrap(), 4);
    // Publishing to an undeclared queue is an error, not a silent drop.
    let err = broker
        .publish(&missing, &RunMessage::new(1), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Publish { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_unacked_deliveries() {
    let broker = connect(cfg()).await;
    let qs = Queues::declared(&broker, &["prefetch-a", "prefetch-b"]).await;
    for item in 1..=5 {
        broker
            .publish(&qs.name(item as usize % 2), &RunMessage::new(item), 0)
            .await
            .unwrap();
    }
    let mut consumer = broker.consume(&qs.0, 2).await.unwrap();
    let a = next_run(&mut consumer).await;
    let b = next_run(&mut consumer).await;
    let mut ids = BTreeSet::from([a.item_id, b.item_id]);
    let ready = |broker: Broker, qs: Vec<String>| async move {
        let mut n = 0;
        for q in &qs {
            n += broker.queue_depth(q).await.unwrap();
        }
        n
    };
    // The prefetch is one limit over both queues: 2 in flight, 3 still in the queues.
    assert_eq!(ready(broker.clone(), qs.0.clone()).await, 3);
    a.ack().await.unwrap();
    let c = next_run(&mut consumer).await;
    ids.insert(c.item_id);
    assert_eq!(ready(broker.clone(), qs.0.clone()).await, 2);
    // A worker with no free slot takes nothing more; with 3 it takes the rest.
    consumer.set_prefetch(0).await.unwrap();
    b.ack().await.unwrap();
    c.ack().await.unwrap();
    assert_eq!(ready(broker.clone(), qs.0.clone()).await, 2);
    consumer.set_prefetch(3).await.unwrap();
    let d = next_run(&mut consumer).await;
    let e = next_run(&mut consumer).await;
    ids.extend([d.item_id, e.item_id]);
    assert_eq!(ids, (1..=5).collect(), "five distinct deliveries");
    d.ack().await.unwrap();
    e.ack().await.unwrap();
    assert_eq!(ready(broker.clone(), qs.0.clone()).await, 0);
    consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_loudly_without_the_password() {
    let mut c = cfg();
    // Nothing listens on port 1.
    c.url = "amqp://pipe:s3cret-pw@127.0.0.1:1/%2f".into();
    let err = Broker::connect(c.clone()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");
    let err = Consumer::connect(c, &["x".to_string()], 1)
        .await
        .unwrap_err();
    assert!(!format!("{err:?}").contains("s3cret-pw"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_survive_a_cut() {
    let (direct, qs, proxy, via) = behind_proxy("cut-publish").await;
    let q = qs.name(0);
    let broker = connect(via).await;
    let mut tasks = Vec::new();
    for item in 0..40 {
        let (broker, q) = (broker.clone(), q.clone());
        tasks.push(tokio::spawn(async move {
            broker.publish(&q, &RunMessage::new(item), 0).await
        }));
        if item == 20 {
            proxy.cut();
        }
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("each publish retries through the cut");
    }
    // At least once: a publish whose confirm was cut off is sent again, so duplicates may
    // exist, but no run is missing.
    let mut ids = BTreeSet::new();
    while let Some(raw) = take_raw(&direct, &q).await.unwrap() {
        ids.insert(RunMessage::decode(&raw.body).unwrap().item_id);
    }
    assert_eq!(ids, (0..40).collect());
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_cuts_while_streaming_lose_nothing() {
    let (direct, qs, proxy, via) = behind_proxy("cuts").await;
    let q = qs.name(0);
    let broker = connect(via).await;
    let publisher = {
        let (broker, q) = (broker.clone(), q.clone());
        tokio::spawn(async move {
            for item in 0..200 {
                // A publish that fails (outage longer than publish_timeout) is retried, as
                // the caller's republisher would.
                while broker.publish(&q, &RunMessage::new(item), 0).await.is_err() {}
            }
        })
    };
    let mut consumer = broker.consume(std::slice::from_ref(&q), 8).await.unwrap();
    let mut acked = BTreeSet::new();
    let mut deliveries = 0;
    let mut reports = 0;
    within("200 runs through 3 cuts", async {
        while acked.len() < 200 {
            match consumer.next().await.expect("open") {
                Ok(d) => {
                    deliveries += 1;
                    if [50, 100, 150].contains(&deliveries) {
                        proxy.cut();
                    }
                    let id = d.item_id;
                    if d.ack().await.is_ok() {
                        acked.insert(id);
                    }
                }
                Err(BrokerError::Disconnected { .. }) => reports += 1,
                Err(e) => panic!("unexpected report: {e}"),
            }
        }
    })
    .await;
    publisher.await.unwrap();
    assert!(reports >= 3, "each cut is reported ({reports})");
    assert_eq!(acked, (0..200).collect());
    consumer.close().await;
    broker.close().await;
    // An ack that left just before a cut may not have arrived: such a message is still
    // in the queue (at least once), but nothing else is.
    let mut left = BTreeSet::new();
    while let Some(raw) = take_raw(&direct, &q).await.unwrap() {
        left.insert(RunMessage::decode(&raw.body).unwrap().item_id);
    }
    assert!(left.len() <= 3 * 8, "leftovers: {left:?}");
}
