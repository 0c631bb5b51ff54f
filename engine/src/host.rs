//! Which process is this, and is that one alive: the pid, its start time and the host
//! identity (boot + pid namespace). The run store's leases decide whether a run's owner is
//! lost; these are the proof used when the owner lives where this process can see it (and
//! for runs recorded before leases), and what `file.write` uses for its temporaries.

use std::fs;

/// What `/proc/<pid>/stat` says: whether the process is a zombie, and its start time
/// (field 22, clock ticks since boot).
fn proc_stat(pid: u32) -> Option<(bool, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (the state), so field 22 is `fields[19]`.
    let zombie = matches!(fields.first().copied(), Some("Z" | "X"));
    Some((zombie, fields.get(19)?.to_string()))
}

/// [`process_start`] of this process, read once (a service records it with every run).
pub fn own_process_start() -> Option<String> {
    static START: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    START
        .get_or_init(|| process_start(std::process::id()))
        .clone()
}

/// The start time of a process, to tell a reused pid apart.
pub fn process_start(pid: u32) -> Option<String> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Where this process lives: the boot (`/proc/sys/kernel/random/boot_id`) and the pid
/// namespace (`/proc/self/ns/pid`), as `BOOT/pid:[INODE]`. Two processes see each other's
/// pids only when this is the same; `None` without procfs.
pub fn host_identity() -> Option<String> {
    // The boot and this process's pid namespace do not change while it runs: read once.
    static HOST: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let ns = fs::read_link("/proc/self/ns/pid").ok()?;
        Some(format!("{}/{}", boot.trim(), ns.to_string_lossy()))
    })
    .clone()
}

/// Whether process `pid` of this pid namespace is alive (not a zombie): what
/// [`owner_alive`] tells, for a caller that knows only a pid.
pub fn pid_alive(pid: u32) -> bool {
    owner_alive(Some(i64::from(pid)), None)
}

/// What can be told about the process that owns a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// It lives in another pid namespace or boot: its pid means nothing here.
    Unknown,
}

/// The owner of a run (or lease), from its pid, start time and host identity (records
/// without a host are judged by pid alone).
pub fn owner_liveness(pid: Option<i64>, start: Option<&str>, host: Option<&str>) -> Liveness {
    if let Some(host) = host {
        if host_identity().as_deref() != Some(host) {
            return Liveness::Unknown;
        }
    }
    if owner_alive(pid, start) {
        Liveness::Alive
    } else {
        Liveness::Dead
    }
}

/// Whether the process that created a run is still the one running under its pid.
pub fn owner_alive(pid: Option<i64>, start: Option<&str>) -> bool {
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()).filter(|&p| p > 0) else {
        return false;
    };
    if let Some((zombie, now_start)) = proc_stat(pid) {
        return !zombie && start.is_none_or(|s| s == now_start);
    }
    // No readable /proc entry (no procfs, or hidden): ask the kernel whether the pid exists.
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 performs only the existence and permission checks; raw > 0.
    let r = unsafe { libc::kill(raw, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
