//! What the benches share: the machine line, the figures table, and a child's peak RSS.
#![allow(dead_code)]

use chrono::Utc;
use std::fmt::Write as _;

pub struct Row {
    name: String,
    figure: String,
    goal: String,
    ratio: String,
}

pub fn row(
    rows: &mut Vec<Row>,
    name: impl Into<String>,
    figure: String,
    goal: impl Into<String>,
    ratio: impl Into<String>,
) {
    rows.push(Row {
        name: name.into(),
        figure,
        goal: goal.into(),
        ratio: ratio.into(),
    });
}

pub fn print_table(rows: &[Row]) {
    let header = ["benchmark", "figure", "goal / floor", "ratio"];
    let mut w = header.map(str::len);
    for r in rows {
        for (k, cell) in [&r.name, &r.figure, &r.goal, &r.ratio].iter().enumerate() {
            w[k] = w[k].max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        let mut s = String::from("|");
        for (k, c) in cells.iter().enumerate() {
            let pad = w[k] - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    println!("{}", line(header));
    let sep: Vec<String> = w.iter().map(|&n| "-".repeat(n + 2)).collect();
    println!("|{}|", sep.join("|"));
    for r in rows {
        println!("{}", line([&r.name, &r.figure, &r.goal, &r.ratio]));
    }
}

pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let date = Utc::now().format("%Y-%m-%d %H:%M UTC");
    format!("machine: {cores} cores (nproc), {cpu}; date: {date}")
}

/// Wait for `pid` and return its exit status and peak RSS (KiB).
pub fn wait4(pid: u32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for the child we spawned.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(
        r,
        pid as libc::pid_t,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, usage.ru_maxrss)
}

/// A fresh PostgreSQL database for one round; dropped when this goes away.
pub struct PgDatabase {
    admin: String,
    name: String,
}

impl PgDatabase {
    /// A new database on the server at `admin`, and its URL.
    pub fn create(admin: &str) -> (PgDatabase, String) {
        let name = format!(
            "pipe_bench_{}_{}",
            std::process::id(),
            Utc::now().timestamp_micros()
        );
        let mut c = postgres::Client::connect(admin, postgres::NoTls).unwrap_or_else(|e| {
            panic!("this bench needs PostgreSQL at {admin} (PIPE_TEST_POSTGRES_URL): {e}")
        });
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let url = match admin.rfind('/') {
            Some(p) if admin[..p].ends_with(|c: char| c != '/') => {
                let (base, rest) = admin.split_at(p);
                let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
                format!("{base}/{name}{query}")
            }
            _ => format!("{admin}/{name}"),
        };
        (
            PgDatabase {
                admin: admin.to_string(),
                name,
            },
            url,
        )
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3, utime 14, stime 15 (1-based), so 11 and 12 here.
    let utime: f64 = f[11].parse().unwrap();
    let stime: f64 = f[12].parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (utime + stime) / hz
}

/// A `VmXXX:` line of /proc/<pid>/status, in KiB.
pub fn status_kib(pid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A number from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}
