//! Leases: who owns a run is a lease (owner id + heartbeat + expiry) in the store, not "is
//! that pid alive". A run alive in another pid namespace or on another machine keeps
//! renewing its owner's lease and is never marked abandoned; a dead owner stops renewing
//! and its runs are found within one lease period ([`lease_period`], 10 s unless
//! `PIPE_LEASE_SECONDS` says otherwise).
//!
//! The owner id is random (two processes never share one, a reused pid changes nothing);
//! host name and pid are kept beside it for people, and the host identity (boot + pid
//! namespace) plus the pid's start time let a process that shares that namespace see at
//! once that the owner died instead of waiting for the expiry.

use crate::{Result, RunStore};
use chrono::Utc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The variable that shortens (or lengthens) the lease period, in seconds (fractions ok).
pub const LEASE_SECONDS_VAR: &str = "PIPE_LEASE_SECONDS";
const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// How long a lease lasts without a heartbeat: `PIPE_LEASE_SECONDS`, else 10 s. Holders
/// renew at a third of it.
pub fn lease_period() -> Duration {
    std::env::var(LEASE_SECONDS_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 86_400.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_LEASE)
}

/// This machine's name, for display.
pub fn host_label() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    })
    .clone()
}

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOwner {
    /// Random, unique: what runs, claims and leader leases record.
    pub id: String,
    /// What it is (`run`, `serve`, `worker-3`), for display.
    pub role: String,
    /// Host name, for display.
    pub host: String,
    pub pid: u32,
    /// Boot + pid namespace ([`engine::host::host_identity`]).
    pub host_identity: Option<String>,
    /// The pid's start time, to tell a reused pid apart.
    pub pid_start: Option<String>,
}

impl LeaseOwner {
    /// A new owner id for this process.
    pub fn this_process(role: &str) -> LeaseOwner {
        let pid = std::process::id();
        let n: u128 = rand::random();
        LeaseOwner {
            id: format!("{role}-{n:032x}"),
            role: role.to_string(),
            host: host_label(),
            pid,
            host_identity: engine::host::host_identity(),
            pid_start: engine::host::own_process_start(),
        }
    }

    /// `worker-1@host:1234`, for display.
    pub fn label(&self) -> String {
        format!("{}@{}:{}", self.role, self.host, self.pid)
    }
}

/// Keeps an owner's lease renewed from a background thread (every third of the lease
/// period) until dropped or [`LeaseKeeper::stop`]ped; stopping releases the lease.
pub struct LeaseKeeper {
    owner: LeaseOwner,
    stop: Mutex<Option<Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseKeeper({})", self.owner.id)
    }
}

impl LeaseKeeper {
    /// Take the lease now (failing when the store cannot be written) and keep renewing it.
    pub fn start(store: Arc<dyn RunStore>, owner: LeaseOwner, ttl: Duration) -> Result<Self> {
        store.heartbeat(&owner, ttl, Utc::now())?;
        let (tx, rx) = mpsc::channel::<()>();
        let last_error = Arc::new(Mutex::new(None));
        let every = (ttl / 3).max(Duration::from_millis(50));
        let thread = {
            let owner = owner.clone();
            let last_error = last_error.clone();
            std::thread::Builder::new()
                .name("pipe-lease".into())
                .spawn(move || loop {
                    match rx.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {
                            let r = store.heartbeat(&owner, ttl, Utc::now());
                            *lock(&last_error) = r.err().map(|e| e.to_string());
                        }
                        // Stopped (or the keeper is gone): release, so nobody waits for
                        // the expiry of a lease whose holder ended cleanly.
                        _ => {
                            let _ = store.release(&owner.id);
                            return;
                        }
                    }
                })
                .map_err(|e| crate::StoreError::Backend(e.into()))?
        };
        Ok(LeaseKeeper {
            owner,
            stop: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            last_error,
        })
    }

    pub fn owner(&self) -> &LeaseOwner {
        &self.owner
    }

    /// The last heartbeat's error, while renewing fails.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Stop renewing and release the lease (waits for the thread). Idempotent.
    pub fn stop(&self) {
        drop(lock(&self.stop).take());
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
