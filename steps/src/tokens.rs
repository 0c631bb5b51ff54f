//! Login tokens shared by the steps of a worker, with a time to live.
//!
//! Why per worker and not per process: a service runs many runs, of many pipelines with
//! different credentials, in one process. The cache lives in the worker's
//! [`engine::step::Resources`] (one per `runner::Runner`), and an entry's key includes a
//! fingerprint of the secret parts of the login (password, client secret, API key), so two
//! runs share a token only when they log in with the very same credentials — never a run
//! with a wrong password riding on another run's token. A run that reuses a cached token
//! teaches it to its own redactor (the run that fetched it is not the one that prints it).
//!
//! The time to live bounds both how long a token without an expiry is trusted and how long
//! an entry nobody asks for is kept, so the cache does not grow without bound in a
//! long-running service.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One login's token, locked while it is being fetched (concurrent steps wait for one login).
pub type Slot<T> = Arc<tokio::sync::Mutex<Option<T>>>;

/// Tokens of type `T` by login; see the module docs.
pub struct TokenCache<T> {
    ttl: Duration,
    /// Random per cache: the fingerprint of a secret is not comparable outside it.
    hasher: std::collections::hash_map::RandomState,
    entries: Mutex<HashMap<String, Entry<T>>>,
}

struct Entry<T> {
    slot: Slot<T>,
    last_used: Instant,
}

impl<T> TokenCache<T> {
    pub fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            hasher: Default::default(),
            entries: Mutex::default(),
        }
    }

    /// How long a token may be trusted at most, and an unused entry kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The slot of one login: `public` parts (URL, user …) and `secret` parts (password …),
    /// of which only a fingerprint is kept. Entries unused for the TTL are dropped.
    pub fn slot(&self, public: &[&str], secret: &[&str]) -> Slot<T> {
        let mut h = self.hasher.build_hasher();
        for s in secret {
            h.write(s.as_bytes());
            h.write_u8(0x1f);
        }
        let key = format!("{}\u{1f}{:016x}", public.join("\u{1f}"), h.finish());
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Nobody holds a slot nobody asked for within the TTL (a step in flight holds it).
        entries.retain(|_, e| {
            now.duration_since(e.last_used) < self.ttl || Arc::strong_count(&e.slot) > 1
        });
        let entry = entries.entry(key).or_insert_with(|| Entry {
            slot: Slot::default(),
            last_used: now,
        });
        entry.last_used = now;
        entry.slot.clone()
    }

    /// Logins held.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When a token fetched now and valid for `expires_in` (none: unknown) stops being used:
    /// at the latest after the TTL.
    pub fn expiry(&self, expires_in: Option<Duration>) -> Instant {
        let life = expires_in.map_or(self.ttl, |d| d.min(self.ttl));
        Instant::now() + life
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn logins_with_other_secrets_get_other_slots_and_the_same_share_one() {
        let cache: TokenCache<String> = TokenCache::new(Duration::from_secs(60));
        let a = cache.slot(&["https://x/token", "me"], &["right"]);
        *a.lock().await = Some("token-a".into());
        let same = cache.slot(&["https://x/token", "me"], &["right"]);
        assert_eq!(same.lock().await.as_deref(), Some("token-a"));
        let wrong = cache.slot(&["https://x/token", "me"], &["wrong"]);
        assert_eq!(wrong.lock().await.as_deref(), None);
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test]
    async fn an_entry_nobody_uses_expires_and_a_token_lives_at_most_the_ttl() {
        let ttl = Duration::from_millis(50);
        let cache: TokenCache<String> = TokenCache::new(ttl);
        let slot = cache.slot(&["u"], &["s"]);
        *slot.lock().await = Some("t".into());
        drop(slot);
        std::thread::sleep(ttl * 3);
        // Asking for another login drops the stale one; asking again starts empty.
        cache.slot(&["other"], &[]);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.slot(&["u"], &["s"]).lock().await.as_deref(), None);
        // An entry in use survives the sweep.
        let held = cache.slot(&["held"], &[]);
        std::thread::sleep(ttl * 3);
        cache.slot(&["other"], &[]);
        assert!(Arc::strong_count(&held) > 1);
        assert_eq!(cache.len(), 2);
        let t0 = Instant::now();
        assert!(cache.expiry(Some(Duration::from_secs(3600))) <= t0 + ttl + Duration::from_secs(1));
        assert!(cache.expiry(None) <= Instant::now() + ttl);
    }
}
