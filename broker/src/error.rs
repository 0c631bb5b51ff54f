//! What can go wrong between pipe and RabbitMQ, as a type.
//!
//! Every variant names the broker by its redacted URL (never the password) and, where one is
//! involved, the queue by its full RabbitMQ name. The broker's own words are kept as text
//! (`detail`), scrubbed of the password, rather than as a `lapin::Error`: callers match on
//! the kind, not on lapin's internals, and the type stays `Clone` for reports.

use std::time::Duration;

/// An error of the broker transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The configuration cannot work (bad URL, `max_priority` 0, no queue to consume).
    #[error("broker configuration for {broker}: {detail}")]
    Config {
        /// The redacted broker URL.
        broker: String,
        /// What is wrong.
        detail: String,
    },
    /// No connection (or no channel) could be opened.
    #[error("cannot connect to the broker at {broker}: {detail}")]
    Connect {
        /// The redacted broker URL.
        broker: String,
        /// What the broker or the network said.
        detail: String,
    },
    /// A queue could not be declared (or, passively, does not exist).
    #[error("cannot declare queue {queue} on {broker}: {detail}")]
    Declare {
        /// The full queue name.
        queue: String,
        /// The redacted broker URL.
        broker: String,
        /// What the broker said.
        detail: String,
    },
    /// A publish failed before the broker confirmed it (connection lost, unroutable, …).
    #[error("publish to queue {queue} on {broker} failed: {detail}")]
    Publish {
        /// The full queue name.
        queue: String,
        /// The redacted broker URL.
        broker: String,
        /// What went wrong.
        detail: String,
    },
    /// The broker answered the publish with a nack: it did not take responsibility for it.
    #[error("the broker at {broker} refused (nacked) a message for queue {queue}")]
    Nacked {
        /// The full queue name.
        queue: String,
        /// The redacted broker URL.
        broker: String,
    },
    /// An operation did not finish within its bound.
    #[error("{operation} on queue {queue} at {broker} did not finish within {after:?}")]
    Timeout {
        /// What was being done (`publish`, `connect`, …).
        operation: &'static str,
        /// The full queue name (empty when no queue is involved).
        queue: String,
        /// The redacted broker URL.
        broker: String,
        /// The bound that ran out.
        after: Duration,
    },
    /// A message body that is not a [`RunMessage`](crate::RunMessage); the consumer rejected
    /// it without requeue.
    #[error("malformed message on queue {queue} at {broker} (rejected, not requeued): {detail}")]
    Malformed {
        /// The full queue name.
        queue: String,
        /// The redacted broker URL.
        broker: String,
        /// Why it does not decode.
        detail: String,
    },
    /// An ack or reject did not reach the broker (its channel is gone). Harmless for pipe:
    /// the broker redelivers the message and the claim in the store decides.
    #[error("ack/reject of a delivery from queue {queue} at {broker} failed: {detail}")]
    Settle {
        /// The full queue name.
        queue: String,
        /// The redacted broker URL.
        broker: String,
        /// Why.
        detail: String,
    },
    /// The consumer lost its connection; it reconnects by itself (this is a report).
    #[error("consumer lost its connection to {broker}: {detail}; reconnecting")]
    Disconnected {
        /// The redacted broker URL.
        broker: String,
        /// What ended the connection.
        detail: String,
    },
    /// The consumer was closed.
    #[error("the consumer on {broker} is closed")]
    Closed {
        /// The redacted broker URL.
        broker: String,
    },
}

/// The text of `err` with `password` (if any) replaced: lapin's errors do not quote the URL,
/// but an error text is no place to find out the hard way.
pub(crate) fn scrub(err: impl std::fmt::Display, password: Option<&str>) -> String {
    let text = err.to_string();
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text,
    }
}
