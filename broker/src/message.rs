//! What travels through RabbitMQ, and at which AMQP priority.
//!
//! # Only the queue item's id
//! A [`RunMessage`] is `{"item":7}`: the id of the queue item in pipe's store, nothing else.
//! The store (PostgreSQL) is the system of record: the run's integration, params, priority
//! and state live there, so
//! - no secret or parameter ever sits in RabbitMQ's queues, disk or management UI;
//! - a message can be redelivered, duplicated or published again by a republisher without
//!   anything to reconcile: the worker claims the item in the store (one transaction with a
//!   fencing token) and a message for an item already claimed or finished is just acked;
//! - the body is a few bytes, so the broker stays cheap at high rates.
//!
//! Decoding is strict (exactly one field `item`, an integer) and returns a typed error; a
//! body from anything else is never taken for a run.
//!
//! # Priority mapping
//! Pipe priorities are `i64`, default 0, higher first; backfills are queued 100 below their
//! integration's priority. AMQP priorities are `0..=max_priority` (RabbitMQ advises ≤ 10).
//! [`amqp_priority`] maps on a logarithmic scale around the middle:
//! 0 → `max/2`; then each doubling of |p| is one level up (positive) or down (negative),
//! clamped at the ends. With `max_priority` 10: `1 → 6`, `2..=3 → 7`, `4..=7 → 8`,
//! `8..=15 → 9`, `≥ 16 → 10`; `-1 → 4`, `-2..=-3 → 3`, `-4..=-7 → 2`, `-8..=-15 → 1`,
//! `≤ -16 → 0`.
//!
//! Why this shape: it never inverts an order (a higher pipe priority never maps lower); the
//! small priorities people actually write (0, 1, 5, 10) get distinct levels; and every
//! backfill of an integration at priority −15..=115 lands strictly below that integration's
//! scheduled runs (a default integration's backfills go to level 0). Within one level the
//! broker is FIFO; the store's own ordering (priority, then age) still decides among the runs
//! a worker gets when it claims. The priority only orders messages *within* a queue.

use serde::{Deserialize, Serialize};

/// "Run this queue item": the message pipe's scheduler publishes and its workers consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunMessage {
    /// The id of the queue item in pipe's store.
    #[serde(rename = "item")]
    pub item_id: i64,
}

/// Why a body is not a [`RunMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a run message ({len} bytes): {reason}")]
pub struct DecodeError {
    /// The body's length.
    pub len: usize,
    /// What the JSON parser said.
    pub reason: String,
}

/// The largest body [`RunMessage::decode`] looks at; a real one is about 20 bytes.
const MAX_BODY: usize = 256;

impl RunMessage {
    /// The message for queue item `item_id`.
    pub fn new(item_id: i64) -> Self {
        RunMessage { item_id }
    }

    /// The JSON body: `{"item":7}`.
    pub fn encode(&self) -> Vec<u8> {
        format!("{{\"item\":{}}}", self.item_id).into_bytes()
    }

    /// Parses a body; anything but `{"item": <i64>}` is an error.
    pub fn decode(body: &[u8]) -> Result<RunMessage, DecodeError> {
        let fail = |reason: String| DecodeError {
            len: body.len(),
            reason,
        };
        if body.len() > MAX_BODY {
            return Err(fail(format!("longer than {MAX_BODY} bytes")));
        }
        serde_json::from_slice(body).map_err(|e| fail(e.to_string()))
    }
}

/// The AMQP priority (`0..=max_priority`) of a run with pipe priority `priority`; see the
/// module docs for the scale and why.
pub fn amqp_priority(priority: i64, max_priority: u8) -> u8 {
    let mid = max_priority / 2;
    if priority == 0 {
        return mid;
    }
    // The number of binary digits of |p|: 1 → 1, 2..=3 → 2, 4..=7 → 3, …, up to 64.
    let steps = (64 - priority.unsigned_abs().leading_zeros()) as u8;
    if priority > 0 {
        mid + steps.min(max_priority - mid)
    } else {
        mid - steps.min(mid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_only_the_id() {
        assert_eq!(RunMessage::new(7).encode(), br#"{"item":7}"#.to_vec());
        assert_eq!(RunMessage::new(-3).encode(), br#"{"item":-3}"#.to_vec());
        for id in [0, 1, 7, i64::MAX, i64::MIN] {
            let m = RunMessage::new(id);
            assert_eq!(RunMessage::decode(&m.encode()), Ok(m));
            // The derived serializer agrees with the hand-written one.
            assert_eq!(serde_json::to_vec(&m).unwrap(), m.encode());
        }
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in [
            &b""[..],
            b"7",
            b"{}",
            b"{\"item\":\"7\"}",
            b"{\"item\":7.5}",
            b"{\"item\":7,\"params\":{}}",
            b"{\"item\":99999999999999999999}",
            b"\xff\xfe",
            b"null",
        ] {
            let err = RunMessage::decode(body).unwrap_err();
            assert_eq!(err.len, body.len(), "{body:?}");
        }
        let long = format!("{{\"item\":7{}}}", " ".repeat(300));
        assert!(RunMessage::decode(long.as_bytes()).is_err());
    }

    #[test]
    fn priority_scale_with_ten_levels() {
        let cases = [
            (0, 5),
            (1, 6),
            (2, 7),
            (3, 7),
            (4, 8),
            (7, 8),
            (8, 9),
            (15, 9),
            (16, 10),
            (1000, 10),
            (i64::MAX, 10),
            (-1, 4),
            (-3, 3),
            (-4, 2),
            (-15, 1),
            (-16, 0),
            (-100, 0),
            (i64::MIN, 0),
        ];
        for (p, want) in cases {
            assert_eq!(amqp_priority(p, 10), want, "pipe priority {p}");
        }
    }

    #[test]
    fn priority_never_inverts_and_stays_in_range() {
        for max in [1u8, 2, 5, 9, 10, 255] {
            let mut probes: Vec<i64> = (-300..=300).collect();
            probes.extend([
                i64::MIN,
                i64::MIN + 1,
                -(1 << 40),
                1 << 40,
                i64::MAX - 1,
                i64::MAX,
            ]);
            probes.sort_unstable();
            let mut last = 0u8;
            for (i, &p) in probes.iter().enumerate() {
                let a = amqp_priority(p, max);
                assert!(a <= max, "priority {p} max {max} -> {a}");
                if i > 0 {
                    assert!(a >= last, "order inverted at {p} (max {max})");
                }
                last = a;
            }
            if max <= 10 {
                // Small scales reach both ends (a 64-bit |p| has at most 64 binary digits).
                assert_eq!(amqp_priority(i64::MIN, max), 0);
                assert_eq!(amqp_priority(i64::MAX, max), max);
            }
        }
    }

    #[test]
    fn backfills_go_below_their_integration() {
        for p in -15..=115 {
            assert!(
                amqp_priority(p - 100, 10) < amqp_priority(p, 10),
                "integration priority {p}"
            );
        }
        // A default integration's backfills take the lowest level.
        assert_eq!(amqp_priority(-100, 10), 0);
    }
}
