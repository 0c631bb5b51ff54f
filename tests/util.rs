//! Shared test helpers: a temporary directory with its own state dir, and a `pipe` command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Hang guard for a daemon's exit: far above what any test needs.
const PATIENCE: Duration = Duration::from_secs(120);

pub struct Env {
    pub dir: tempfile::TempDir,
}

pub fn pipe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pipe"))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    /// Write a file in the temp dir and return its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }
    /// `pipe` with `--state-dir` set to this env's state, run in the temp dir.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(pipe_bin());
        c.current_dir(self.dir.path());
        c.env("PIPE_HOME", self.state());
        c.env_remove("PIPE_DB");
        c.env_remove("RUST_BACKTRACE");
        c
    }
    /// `pipe` started with `args`, its stdout and stderr piped (for [`wait_with_deadline`]).
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.cmd()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run pipe")
    }
    pub fn run(&self, args: &[&str]) -> Out {
        Out(self.cmd().args(args).output().expect("run pipe"))
    }
}

pub struct Out(pub Output);

impl Out {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// `pipe validate --format json`'s diagnostics as (line, column, message).
    pub fn diagnostics(&self) -> Vec<(u64, u64, String)> {
        self.json()
            .as_array()
            .expect("an array of diagnostics")
            .iter()
            .map(|d| {
                (
                    d["line"].as_u64().unwrap(),
                    d["column"].as_u64().unwrap(),
                    d["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.0.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// Open the history database read-only to inspect it.
pub fn history(state: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(state.join("history.sqlite")).expect("history database")
}

/// Wait for a spawned `pipe` (stdout/stderr piped) and collect its output. The deadline is
/// only a hang guard: past it the child is killed and the test fails.
pub fn wait_with_deadline(mut child: std::process::Child, deadline: std::time::Duration) -> Out {
    use std::io::Read;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let read_err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let until = std::time::Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for pipe") {
            break status;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pipe (pid {}) still running after {deadline:?}", child.id());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Out(Output {
        status,
        stdout: read_out.join().unwrap(),
        stderr: read_err.join().unwrap(),
    })
}

/// Standard base64 (with padding), or URL-safe without padding.
pub fn base64(bytes: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if !url_safe {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encode every byte that is not an ASCII letter or digit.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A step of `pipe run --format json`'s summary, by id.
pub fn step<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {v}"))
}

/// A database created for one test and dropped after it.
pub struct PgDb {
    pub url: String,
    name: String,
}

pub fn admin_url() -> String {
    std::env::var("PIPE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

impl PgDb {
    pub fn new() -> PgDb {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "pipe_cli_{}_{}_{nanos:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin =
            postgres::Client::connect(&admin_url(), postgres::NoTls).unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is needed for this test (PIPE_TEST_POSTGRES_URL={}): {e}",
                    admin_url()
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let mut cfg: postgres::Config = admin_url().parse().unwrap();
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        let host = match &cfg.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        cfg.dbname(&name);
        PgDb {
            url: format!("postgres://{user}@{host}:{port}/{name}"),
            name,
        }
    }

    /// A client of this database.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to the test database")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&admin_url(), postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A long-running `pipe` child (`serve`, `worker`) whose output goes to a file (a full pipe
/// must never block it); killed on drop.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// `pipe serve ARGS` with a lease period of 3 s.
    pub fn start(env: &Env, name: &str, args: &[&str]) -> Daemon {
        Daemon::spawn(env, name, &[&["serve"], args].concat(), &[])
    }

    /// `pipe ARGS` with a lease period of 3 s and `envs`; output in `<name>.log`.
    pub fn spawn(env: &Env, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let log = env.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = env
            .cmd()
            .args(args)
            .env("PIPE_LEASE_SECONDS", "3")
            .envs(envs.iter().copied())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start pipe");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Exited by itself (reaped): its exit code.
    pub fn exited(&mut self) -> Option<i32> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.code().unwrap_or(-1))
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// SIGTERM and wait for the exit; its exit code.
    pub fn stop(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait();
    }

    pub fn wait(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pipe did not exit:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
