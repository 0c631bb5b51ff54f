//! Reconnect delays: exponential from `backoff_min`, capped at `backoff_max`, jittered.
//!
//! Jitter (each delay drawn from [d/2, d]) keeps a fleet of workers that lost the broker at
//! the same moment from knocking on it in lockstep when it comes back.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// One reconnect sequence's delays; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min: min.max(Duration::from_millis(1)),
            max: max.max(min),
            failures: 0,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos() as u64;
        half + Duration::from_nanos(if spread == 0 {
            0
        } else {
            random() % (spread + 1)
        })
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random u64 from the standard library's per-process seeded hasher (no rand crate for
/// one jitter).
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_with_jitter_in_range() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings = [100u64, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for c in ceilings {
            let d = b.next_delay();
            let c = Duration::from_millis(c);
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
        }
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
