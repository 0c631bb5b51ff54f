//! The redactors of the live runs, for the process's panic hook.
//!
//! A panic hook is process-wide, but a secret belongs to one run: a service runs many at
//! once, so there is no single "current" redactor. Each run registers its redactor while it
//! is prepared and running (and while its outcome is held), and the hook masks a panic
//! message with every live one — a panic cannot say which run it came from, and masking too
//! much is harmless. Deregistration is the guard's `Drop`, so the list holds only live runs.

use engine::secrets::Redactor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

static LIVE: Mutex<Vec<(u64, Redactor)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

/// A run's registration; dropping it deregisters the redactor.
#[derive(Debug)]
pub struct Registration(u64);

/// Register a run's redactor for [`redact_live`].
pub fn register(redactor: &Redactor) -> Registration {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    lock().push((id, redactor.clone()));
    Registration(id)
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock().retain(|(id, _)| *id != self.0);
    }
}

/// `text` masked by every live run's redactor (for panic messages).
pub fn redact_live(text: &str) -> String {
    // A panic inside a redactor while the lock is held must not poison the hook's next use,
    // nor deadlock it: take a copy of the list first.
    let live: Vec<Redactor> = match LIVE.try_lock() {
        Ok(g) => g.iter().map(|(_, r)| r.clone()).collect(),
        Err(std::sync::TryLockError::Poisoned(p)) => {
            p.into_inner().iter().map(|(_, r)| r.clone()).collect()
        }
        // Held by the panicking thread itself (a panic while registering): nothing to
        // mask it with that is safe to wait for.
        Err(std::sync::TryLockError::WouldBlock) => Vec::new(),
    };
    live.iter()
        .fold(text.to_string(), |text, r| r.redact(&text))
}

/// How many runs are registered (tests).
pub fn live_count() -> usize {
    lock().len()
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u64, Redactor)>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_runs_secret_is_masked_and_a_finished_run_is_forgotten() {
        let (a, b) = (Redactor::new(), Redactor::new());
        a.add("alpha-secret-1");
        b.add("bravo-secret-2");
        let ga = register(&a);
        let gb = register(&b);
        let text = "x alpha-secret-1 y bravo-secret-2 z";
        assert_eq!(redact_live(text), "x *** y *** z");
        drop(ga);
        assert_eq!(redact_live(text), "x alpha-secret-1 y *** z");
        drop(gb);
        assert_eq!(redact_live(text), text);
    }
}
