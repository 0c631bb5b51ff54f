//! The RabbitMQ transport between pipe's scheduler and its remote workers.
//!
//! `pipe serve --broker amqp://…` publishes one message per queued run; `pipe worker` on any
//! number of machines consumes them. This crate moves those messages and knows nothing of
//! pipe's store or engine:
//! - [`Broker`]: connect, [`declare`](Broker::declare) a durable priority queue,
//!   [`publish`](Broker::publish) (persistent, publisher-confirmed, bounded in time),
//!   [`queue_depth`](Broker::queue_depth) for metrics and autoscaling;
//! - [`Consumer`]: one consumer over several queues with a channel-wide prefetch, yielding
//!   [`Delivery`]s to [`ack`](Delivery::ack) once the run is claimed, reconnecting by itself;
//! - [`RunMessage`]: the body, `{"item":7}`, the queue item's id and nothing else;
//! - [`amqp_priority`]: pipe priority → AMQP priority;
//! - [`testing`]: [`CutProxy`](testing::CutProxy), to cut the broker connection in tests.
//!
//! Why it is shaped so (see docs/decisions/0024-broker.md):
//! - The store (PostgreSQL) is the system of record, RabbitMQ only a fast, prioritised
//!   doorbell. The message carries the id alone, so no secret or parameter travels or rests
//!   in the broker, and a duplicate or a republished message is harmless.
//! - Workers ack after claiming in the store, so a worker that dies before its claim loses
//!   nothing (RabbitMQ redelivers) and a long run never meets the broker's consumer timeout
//!   (the store's lease and fencing token own it from the claim on).
//! - Everything is at least once: publishes retry within their bound, redeliveries happen;
//!   the claim makes execution happen once.
//! - Losing the broker only delays runs: the consumer reconnects with capped, jittered
//!   exponential backoff (100 ms → 5 s by default) and declares and consumes again;
//!   publishing fails after `publish_timeout` and the caller keeps the run queued in the
//!   store, to publish again later.
//! - No password in any log or error: everything shown uses [`redact_url`].
//!
//! The lapin client is used with its tokio integration: call everything from within a tokio
//! runtime.

#![deny(missing_docs)]

mod backoff;
mod broker;
mod config;
mod consumer;
mod error;
mod message;
pub mod testing;

pub use broker::Broker;
pub use config::{
    redact_url, BrokerConfig, DEFAULT_MAX_PRIORITY, DEFAULT_QUEUE_PREFIX, DEFAULT_URL,
};
pub use consumer::{Consumer, Delivery};
pub use error::BrokerError;
pub use message::{amqp_priority, DecodeError, RunMessage};
