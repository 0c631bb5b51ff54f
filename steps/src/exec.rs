//! `type: exec` — run a program or shell script, the way OneVizion's Integration Wrapper did.
//!
//! * Every stdout line becomes an `info` row and every stderr line an `error` row, in real
//!   time (both pipes are drained continuously, lines are decoded as lossy UTF-8; a line
//!   longer than 1 MiB is split into several rows, never through a secret: the split moves
//!   to the secret's start, so each row is masked whole).
//! * Workflow commands on stdout (as in GitHub Actions) talk to `pipe`:
//!   - `::set-output name=NAME::VALUE` sets output `NAME` (the row says only
//!     `set output NAME`: the value may be secret and is never logged);
//!   - `::set-secret name=NAME::VALUE` does the same and masks VALUE everywhere from now on;
//!   - `::add-mask::VALUE` masks VALUE in every later row, output and error (as in GitHub
//!     Actions: print it before the value itself appears);
//!   - `::warning::MESSAGE` writes a warning row and gives the step a warning;
//!   - `::error::MESSAGE` writes an error row (the step does not fail because of it);
//!   - `::file::PATH` copies the file (relative to the working dir) into the run's folder
//!     and writes a row `file NAME` with the copy attached.
//!
//!   Properties after the command name (`::warning file=a.py,line=3::msg`) are accepted and
//!   ignored; `%25`, `%0A` and `%0D` in values and messages decode to `%`, LF and CR.
//!   Workflow-command lines are left out of the `stdout` result field.
//! * Exit code 0 → success. Non-zero → `on_nonzero: warn` (default) ends the step with a
//!   warning ("executed with warnings", as the wrapper did); `fail` fails it (retryable, so
//!   `retry:` may run the script again). Killed by a signal → the step fails.
//! * The child runs in its own process group. On cancel (Ctrl-C, timeout) the group gets
//!   SIGTERM, then SIGKILL 3 s later; when the step's future is dropped, SIGKILL at once.
//!   Processes left in the group after the program exits (`cmd &` without `wait`) are killed
//!   too — a daemon meant to outlive the step must leave the group (`setsid`). If `pipe`
//!   itself dies (even by `kill -9`), the child gets SIGKILL (Linux's parent-death signal).

use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Longest line kept as one row; longer lines are split.
const MAX_LINE: usize = 1 << 20;
/// How far past [`MAX_LINE`] a long line is read before it is split, so that a secret
/// (in any of its masked forms) up to this long that straddles the split is seen whole.
const SPLIT_LOOKAHEAD: usize = 64 * 1024;
/// Where `::file::` never copies from: the kernel's views of processes (their environment),
/// of the system and of devices.
const UNATTACHABLE: &[&str] = &["/proc", "/sys", "/dev"];
/// How much of stdout and stderr the result object keeps (the end).
const TAIL: usize = 64 * 1024;
/// How often the progress counters are reported, at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Between SIGTERM and SIGKILL on cancel.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// After the program exits, how long processes it left behind may keep stdout/stderr open.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// What a non-zero exit code does to the step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnNonzero {
    /// The step succeeds with a warning ("executed with warnings").
    #[default]
    Warn,
    /// The step fails (retryable: `retry:` decides whether to run it again).
    Fail,
}

/// Run a program or shell script.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The program to run: looked up in `PATH`, or, when it contains a `/`, a path relative
    /// to `working_dir` (or the pipeline's folder). With `shell: true`, a script for `sh -c`.
    pub command: String,
    /// Arguments passed to the program as they are (no shell splitting or globbing). With
    /// `shell: true` they are the script's `$1`, `$2` ….
    #[serde(default)]
    pub args: Vec<String>,
    /// Run `command` as a script with `sh -c` (pipes, redirections, `&&` …).
    #[serde(default)]
    pub shell: bool,
    /// The directory the program runs in, relative to the pipeline's folder (default: the
    /// pipeline's folder).
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Environment variables added to the ones `pipe` was started with.
    #[serde(default)]
    pub env: IndexMap<String, String>,
    /// What a non-zero exit code does: `warn` (default; the step ends with status
    /// `warning`) or `fail` (the step fails).
    #[serde(default)]
    pub on_nonzero: OnNonzero,
    /// Text written to the program's standard input, which is then closed (default: no
    /// input; stdin is `/dev/null`).
    #[serde(default)]
    pub stdin: Option<String>,
}

#[async_trait]
impl StepConfig for Exec {
    const TYPE: &'static str = "exec";
    const SUMMARY: &'static str =
        "Run a program or shell script; stdout/stderr become log rows, `::set-output name=X::V` sets outputs";
    const RESULT_NAME: &'static str = "result";

    fn static_info(&self) -> StaticInfo {
        // Outputs come from `::set-output` at run time.
        StaticInfo {
            produces_table: false,
            outputs: None,
            secret_fields: Vec::new(),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        run(self, ctx).await
    }
}

/// Sends SIGKILL to the process group when dropped while armed: the step's future was
/// dropped (the run was torn down) while the child was still running.
struct GroupGuard {
    pgid: libc::pid_t,
    armed: bool,
}

impl GroupGuard {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: killpg has no memory-safety preconditions; a stale group only yields ESRCH.
        unsafe {
            libc::killpg(self.pgid, sig);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Make the child get SIGKILL when `pipe` dies, even by `kill -9` (which runs no cleanup),
/// instead of running on as an orphan. Linux sends the signal when the *thread* that
/// spawned the child ends; steps run on tokio's worker threads, which live as long as the
/// run. Only the direct child is covered: processes it starts itself leave with it only if
/// they watch their parent (a shell that `exec`s its last command has none).
fn die_with_pipe(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // pipe died between the fork and the prctl: the signal will not come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("pipe exited"));
                }
                Ok(())
            });
        }
    }
}

/// What the output readers collect.
#[derive(Default)]
struct Collected {
    outputs: Map<String, Value>,
    warnings: Vec<String>,
    stdout_tail: String,
    stderr_tail: String,
    stdout_last_line: Option<String>,
    stderr_last_line: Option<String>,
}

#[derive(Default)]
struct Shared {
    lines_stdout: AtomicU64,
    lines_stderr: AtomicU64,
    collected: Mutex<Collected>,
}

impl Shared {
    fn lines(&self) -> u64 {
        self.lines_stdout.load(Ordering::Relaxed) + self.lines_stderr.load(Ordering::Relaxed)
    }
}

async fn run(cfg: Exec, ctx: StepContext) -> Result<StepOutput, StepError> {
    let workdir = match &cfg.working_dir {
        Some(d) => ctx.pipeline_dir.join(d),
        None => ctx.pipeline_dir.clone(),
    };
    if !workdir.is_dir() {
        return Err(StepError::fatal(format!(
            "working_dir {} is not a directory",
            workdir.display()
        )));
    }
    let program = if cfg.shell {
        PathBuf::from("sh")
    } else if cfg.command.contains('/') {
        workdir.join(&cfg.command)
    } else {
        PathBuf::from(&cfg.command)
    };
    let mut cmd = Command::new(&program);
    if cfg.shell {
        cmd.arg("-c").arg(&cfg.command).arg("sh");
    }
    cmd.args(&cfg.args)
        .envs(&cfg.env)
        .current_dir(&workdir)
        .stdin(if cfg.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    die_with_pipe(&mut cmd);

    let mut child = cmd.spawn().map_err(|e| {
        StepError::fatal(format!(
            "cannot run `{}` (working dir {}): {e}",
            if cfg.shell { "sh" } else { &cfg.command },
            workdir.display()
        ))
    })?;
    // Never 0 right after spawning (and killpg(0) would signal pipe's own group).
    let pid = child
        .id()
        .filter(|&p| p > 0)
        .ok_or_else(|| StepError::fatal("the child process has no pid"))?;
    let mut guard = GroupGuard {
        pgid: pid as libc::pid_t,
        armed: true,
    };

    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let shared = Shared::default();

    let feed_stdin = async {
        if let (Some(mut pipe), Some(text)) = (stdin, cfg.stdin.as_deref()) {
            // The program may exit without reading everything (EPIPE): not an error.
            let _ = pipe.write_all(text.as_bytes()).await;
            let _ = pipe.shutdown().await;
        }
    };
    let read_stdout = async {
        let mut lines = Lines::new(BufReader::with_capacity(64 * 1024, stdout), &ctx.redactor);
        while let Some(line) = lines.next().await {
            shared.lines_stdout.fetch_add(1, Ordering::Relaxed);
            on_stdout_line(&ctx, &workdir, &shared, line).await;
        }
    };
    let read_stderr = async {
        let mut lines = Lines::new(BufReader::with_capacity(64 * 1024, stderr), &ctx.redactor);
        while let Some(line) = lines.next().await {
            shared.lines_stderr.fetch_add(1, Ordering::Relaxed);
            ctx.log(Level::Error, &line);
            let mut c = shared.collected.lock().unwrap();
            push_tail(&mut c.stderr_tail, &line, &ctx.redactor);
            if !line.trim().is_empty() {
                c.stderr_last_line = Some(line);
            }
        }
    };
    let io = async {
        tokio::join!(feed_stdin, read_stdout, read_stderr);
    };
    tokio::pin!(io);

    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = 0;
    let mut io_done = false;
    let mut status = None;
    let orphan_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(orphan_deadline);
    let mut orphans_killed = false;

    while status.is_none() || !io_done {
        tokio::select! {
            _ = ctx.cancel.cancelled() => {
                guard.signal(libc::SIGTERM);
                // Keep draining the pipes while the program shuts down, so it cannot block
                // writing its last words.
                let wait = async {
                    if status.is_some() {
                        if !io_done {
                            (&mut io).await;
                        }
                        return;
                    }
                    let drain = async {
                        if !io_done {
                            (&mut io).await;
                        }
                        std::future::pending::<()>().await
                    };
                    tokio::select! {
                        _ = child.wait() => {}
                        _ = drain => {}
                    }
                };
                let _ = tokio::time::timeout(TERM_GRACE, wait).await;
                guard.signal(libc::SIGKILL);
                guard.armed = false;
                return Err(StepError::fatal("cancelled"));
            }
            r = child.wait(), if status.is_none() => {
                let r = r.map_err(|e| StepError::fatal(format!("waiting for `{}` (pid {pid}): {e}", cfg.command)))?;
                status = Some(r);
                if !io_done {
                    orphan_deadline.as_mut().reset(tokio::time::Instant::now() + ORPHAN_GRACE);
                }
            }
            _ = &mut io, if !io_done => {
                io_done = true;
            }
            _ = &mut orphan_deadline, if status.is_some() && !io_done && !orphans_killed => {
                orphans_killed = true;
                ctx.log(Level::Info, "processes left running in the background hold stdout/stderr open; killing them");
                guard.signal(libc::SIGKILL);
            }
            _ = ticker.tick() => {
                let n = shared.lines();
                if n != reported {
                    reported = n;
                    ctx.progress(&[("lines", n)]);
                }
            }
        }
    }
    // Whatever the program left in its group goes with it.
    guard.signal(libc::SIGKILL);
    guard.armed = false;

    let status = status.expect("loop ends after the child exits");
    let lines_stdout = shared.lines_stdout.load(Ordering::Relaxed);
    let lines_stderr = shared.lines_stderr.load(Ordering::Relaxed);
    let mut c = std::mem::take(&mut *shared.collected.lock().unwrap());
    trim_tail(&mut c.stdout_tail, &ctx.redactor);
    trim_tail(&mut c.stderr_tail, &ctx.redactor);
    let last_stderr = || match &c.stderr_last_line {
        Some(l) => format!("; last stderr: {}", ctx.redactor.redact(l)),
        None => String::new(),
    };

    let Some(code) = status.code() else {
        let sig = status.signal().unwrap_or(0);
        return Err(StepError::retryable(format!(
            "`{}` was killed by signal {sig}{}",
            cfg.command,
            last_stderr()
        )));
    };
    let mut warnings = c.warnings.clone();
    if code != 0 {
        match cfg.on_nonzero {
            OnNonzero::Warn => warnings.push(format!("exited with code {code}")),
            OnNonzero::Fail => {
                return Err(StepError::retryable(format!(
                    "exited with code {code}{}",
                    last_stderr()
                )));
            }
        }
    }
    let mut outputs = c.outputs;
    outputs.insert("exit_code".into(), json!(code));
    let result = json!({
        "exit_code": code,
        "stdout_last_line": c.stdout_last_line,
        "stdout": c.stdout_tail,
        "stderr": c.stderr_tail,
        "lines_stdout": lines_stdout,
        "lines_stderr": lines_stderr,
        "pid": pid,
    });
    Ok(StepOutput {
        outputs,
        result,
        table: None,
        warnings,
    })
}

/// A workflow command on stdout: `::name props::value`.
fn parse_command(line: &str) -> Option<(&str, &str, &str)> {
    let rest = line.strip_prefix("::")?;
    let (head, value) = rest.split_once("::")?;
    let (name, props) = head.split_once(' ').unwrap_or((head, ""));
    match name {
        "set-output" | "set-secret" | "add-mask" | "warning" | "error" | "file" => {
            Some((name, props.trim(), value))
        }
        _ => None,
    }
}

/// Undo GitHub's escaping of workflow-command values.
fn unescape(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    s.replace("%0A", "\n")
        .replace("%0D", "\r")
        .replace("%25", "%")
}

fn prop<'a>(props: &'a str, key: &str) -> Option<&'a str> {
    props
        .split(',')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn on_stdout_line(ctx: &StepContext, workdir: &Path, shared: &Shared, line: String) {
    let Some((name, props, value)) = parse_command(&line) else {
        ctx.log(Level::Info, &line);
        let mut c = shared.collected.lock().unwrap();
        push_tail(&mut c.stdout_tail, &line, &ctx.redactor);
        c.stdout_last_line = Some(line);
        return;
    };
    match name {
        "add-mask" => {
            ctx.redactor.add(&unescape(value));
            ctx.log(Level::Info, "masked a value");
        }
        "set-output" | "set-secret" => match prop(props, "name").filter(|n| !n.is_empty()) {
            Some(key) => {
                if name == "set-secret" {
                    ctx.redactor.add(&unescape(value));
                }
                ctx.log(Level::Info, &format!("set output {key}"));
                shared
                    .collected
                    .lock()
                    .unwrap()
                    .outputs
                    .insert(key.to_string(), Value::String(unescape(value)));
            }
            None => {
                let msg = "`::set-output` without `name=`; ignored";
                ctx.log(Level::Warning, msg);
                shared
                    .collected
                    .lock()
                    .unwrap()
                    .warnings
                    .push(msg.to_string());
            }
        },
        "warning" => {
            let msg = unescape(value);
            ctx.log(Level::Warning, &msg);
            shared.collected.lock().unwrap().warnings.push(msg);
        }
        "error" => ctx.log(Level::Error, &unescape(value)),
        "file" => {
            let path = unescape(value.trim());
            match attach(&workdir.join(&path), &ctx.run_dir).await {
                Ok((name, copy)) => ctx.log_full(
                    Level::Info,
                    &format!("file {name}"),
                    None,
                    Some(&copy.to_string_lossy()),
                ),
                Err(e) => {
                    let msg = format!("file {path}: cannot attach: {e}");
                    ctx.log(Level::Warning, &msg);
                    shared.collected.lock().unwrap().warnings.push(msg);
                }
            }
        }
        _ => unreachable!("parse_command returns known names only"),
    }
}

/// Copy `src` into `run_dir` (created when missing) without overwriting an earlier file of
/// the same name: `report.csv`, `report-2.csv` …. Returns the file name and the copy's path.
/// A file under [`UNATTACHABLE`] (after symlinks are resolved) is refused.
async fn attach(src: &Path, run_dir: &Path) -> std::io::Result<(String, PathBuf)> {
    let name = src
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?
        .to_string_lossy()
        .into_owned();
    // Copy the resolved path, so a symlink swapped after the check cannot point elsewhere.
    let src = &tokio::fs::canonicalize(src).await?;
    if let Some(root) = UNATTACHABLE.iter().find(|r| src.starts_with(r)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is under {root}, which is never attached (it may hold the environment or device data)",
                src.display()
            ),
        ));
    }
    if !tokio::fs::metadata(src).await?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    tokio::fs::create_dir_all(run_dir).await?;
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    let mut dest = run_dir.join(&name);
    let mut n = 2;
    while tokio::fs::try_exists(&dest).await.unwrap_or(false) {
        dest = run_dir.join(format!("{stem}-{n}{ext}"));
        n += 1;
    }
    tokio::fs::copy(src, &dest).await?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(name);
    Ok((name, dest))
}

/// How many bytes at the end of `b` are the start of a UTF-8 character cut off (0-3).
fn incomplete_utf8_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let byte = b[b.len() - back];
        if byte & 0xC0 != 0x80 {
            let width = match byte {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if width > back { back } else { 0 };
        }
    }
    0
}

/// Append a line to a tail buffer that keeps the last [`TAIL`] bytes (amortized: trimmed
/// when it reaches twice that, on a char boundary).
fn push_tail(tail: &mut String, line: &str, redactor: &engine::secrets::Redactor) {
    tail.push_str(line);
    tail.push('\n');
    if tail.len() > 2 * TAIL {
        trim_tail(tail, redactor);
    }
}

/// Keep the last [`TAIL`] bytes, or a little more: the cut never falls inside a secret
/// (its tail end alone would no longer be masked when the result is redacted).
fn trim_tail(tail: &mut String, redactor: &engine::secrets::Redactor) {
    if tail.len() > TAIL {
        let mut cut = tail.len() - TAIL;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        let cut = redactor.safe_split(tail, cut);
        tail.drain(..cut);
    }
}

/// Lines of a pipe, as lossy UTF-8 without the line ending, split at [`MAX_LINE`] bytes
/// (earlier when a secret straddles that point: see [`Lines::split_long`]).
struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    eof: bool,
    /// `buf` holds the rest of a long line whose newline was already read.
    line_ended: bool,
    redactor: engine::secrets::Redactor,
}

impl<R: AsyncBufRead + Unpin> Lines<R> {
    fn new(reader: R, redactor: &engine::secrets::Redactor) -> Self {
        Lines {
            reader,
            buf: Vec::new(),
            eof: false,
            line_ended: false,
            redactor: redactor.clone(),
        }
    }

    /// The first row of a line longer than [`MAX_LINE`] (the buffer holds
    /// [`SPLIT_LOOKAHEAD`] more bytes): cut at `MAX_LINE`, or before a secret that would
    /// straddle the cut, so each row holds the secret whole and is masked. The rest stays
    /// in the buffer.
    fn split_long(&mut self) -> String {
        let incomplete = incomplete_utf8_tail(&self.buf);
        let tail = self.buf.split_off(self.buf.len() - incomplete);
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        let mut cut = self.redactor.safe_split(&text, MAX_LINE);
        if cut == 0 {
            cut = text.len().min(MAX_LINE);
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
        }
        self.buf = text.as_bytes()[cut..].to_vec();
        self.buf.extend_from_slice(&tail);
        let mut row = text;
        row.truncate(cut);
        row
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if self.line_ended || (self.eof && !self.buf.is_empty()) {
                if self.buf.len() > MAX_LINE {
                    return Some(self.split_long());
                }
                let row = self.take();
                if row.len() > MAX_LINE {
                    // Invalid UTF-8, decoded lossily, grew past the limit: split the text.
                    self.buf = row.into_bytes();
                    return Some(self.split_long());
                }
                self.line_ended = false;
                return Some(row);
            }
            if self.eof {
                return None;
            }
            let avail = match self.reader.fill_buf().await {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.eof = true;
                    continue;
                }
            };
            if avail.is_empty() {
                self.eof = true;
                continue;
            }
            let newline = avail.iter().position(|&b| b == b'\n');
            let end = newline.unwrap_or(avail.len());
            // (Saturating: invalid UTF-8 decoded lossily can leave more than that after a split.)
            let n = end.min((MAX_LINE + SPLIT_LOOKAHEAD).saturating_sub(self.buf.len()));
            self.buf.extend_from_slice(&avail[..n]);
            if newline == Some(n) {
                self.reader.consume(n + 1);
                self.line_ended = true;
                continue;
            }
            self.reader.consume(n);
            if self.buf.len() >= MAX_LINE + SPLIT_LOOKAHEAD {
                return Some(self.split_long());
            }
        }
    }

    fn take(&mut self) -> String {
        let mut bytes = std::mem::take(&mut self.buf);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::events::{Observer, RunEvent};
    use engine::secrets::Redactor;
    use std::sync::Arc;
    use std::time::Instant;

    #[derive(Default)]
    struct Collect(Mutex<Vec<RunEvent>>);
    impl Observer for Collect {
        fn event(&self, event: &RunEvent) {
            self.0.lock().unwrap().push(event.clone());
        }
    }
    impl Collect {
        fn rows(&self) -> Vec<(Level, String, Option<String>)> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter_map(|e| match e {
                    RunEvent::Log(r) => Some((r.level, r.message.clone(), r.file.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    fn ctx(obs: &Arc<Collect>, dir: &Path) -> StepContext {
        StepContext::new(
            "ex",
            1,
            obs.clone(),
            Redactor::new(),
            dir.join("run"),
            dir.to_path_buf(),
        )
    }

    fn sh(script: &str) -> Exec {
        Exec {
            command: script.into(),
            args: Vec::new(),
            shell: true,
            working_dir: None,
            env: IndexMap::new(),
            on_nonzero: OnNonzero::Warn,
            stdin: None,
        }
    }

    #[tokio::test]
    async fn stdout_info_stderr_error() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let out = sh("echo hello; echo oops >&2; printf 'no newline'")
            .run(ctx(&obs, dir.path()))
            .await
            .unwrap();
        let rows = obs.rows();
        assert!(rows.contains(&(Level::Info, "hello".into(), None)));
        assert!(rows.contains(&(Level::Error, "oops".into(), None)));
        assert!(rows.contains(&(Level::Info, "no newline".into(), None)));
        assert_eq!(out.result["exit_code"], 0);
        assert_eq!(out.result["stdout"], "hello\nno newline\n");
        assert_eq!(out.result["stderr"], "oops\n");
        assert_eq!(out.result["stdout_last_line"], "no newline");
        assert_eq!(out.result["lines_stdout"], 2);
        assert_eq!(out.result["lines_stderr"], 1);
        assert_eq!(out.outputs["exit_code"], 0);
        assert!(out.warnings.is_empty());
    }

    #[tokio::test]
    async fn program_args_env_stdin_and_working_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/tool.sh"),
            "#!/bin/sh\necho \"$1-$2-$GREETING-$(pwd)\"\ncat\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("sub/tool.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let obs = Arc::new(Collect::default());
        let mut cfg = sh("./tool.sh");
        cfg.shell = false;
        cfg.args = vec!["a b".into(), "*".into()];
        cfg.working_dir = Some("sub".into());
        cfg.env.insert("GREETING".into(), "hi".into());
        cfg.stdin = Some("from stdin\n".into());
        cfg.run(ctx(&obs, dir.path())).await.unwrap();
        let sub = dir.path().join("sub").canonicalize().unwrap();
        let rows = obs.rows();
        assert!(
            rows.contains(&(Level::Info, format!("a b-*-hi-{}", sub.display()), None)),
            "{rows:?}"
        );
        assert!(
            rows.contains(&(Level::Info, "from stdin".into(), None)),
            "{rows:?}"
        );

        // Shell mode passes args as $1 ….
        let mut cfg = sh("echo \"[$1][$2]\"");
        cfg.args = vec!["x y".into(), "z".into()];
        cfg.run(ctx(&obs, dir.path())).await.unwrap();
        assert!(obs.rows().contains(&(Level::Info, "[x y][z]".into(), None)));
    }

    #[tokio::test]
    async fn workflow_commands() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let script = "echo '::set-output name=token::s3cret'; echo '::set-output name=multi::a%0Ab'; \
                      echo '::warning::disk almost full'; echo '::warning file=x.py,line=3::with props'; \
                      echo '::error::bad row 7'; echo '::notice::not a command here'; echo done";
        let out = sh(script).run(ctx(&obs, dir.path())).await.unwrap();
        assert_eq!(out.outputs["token"], "s3cret");
        assert_eq!(out.outputs["multi"], "a\nb");
        assert_eq!(out.outputs["exit_code"], 0);
        assert_eq!(
            out.warnings,
            vec!["disk almost full".to_string(), "with props".to_string()]
        );
        let rows = obs.rows();
        assert!(rows.contains(&(Level::Info, "set output token".into(), None)));
        assert!(rows.contains(&(Level::Warning, "disk almost full".into(), None)));
        assert!(rows.contains(&(Level::Error, "bad row 7".into(), None)));
        assert!(rows.contains(&(Level::Info, "::notice::not a command here".into(), None)));
        // The secret value never appears in a row or in the result.
        assert!(
            rows.iter().all(|(_, m, _)| !m.contains("s3cret")),
            "{rows:?}"
        );
        assert!(!out.result.to_string().contains("s3cret"));
        assert_eq!(out.result["stdout_last_line"], "done");
    }

    #[tokio::test]
    async fn nonzero_warn_and_fail() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let out = sh("echo '::set-output name=a::1'; echo broken >&2; exit 3")
            .run(ctx(&obs, dir.path()))
            .await
            .unwrap();
        assert_eq!(out.warnings, vec!["exited with code 3".to_string()]);
        assert_eq!(out.outputs["exit_code"], 3);
        assert_eq!(out.outputs["a"], "1");
        assert_eq!(out.result["exit_code"], 3);

        let mut cfg = sh("echo first >&2; echo 'the real reason' >&2; exit 4");
        cfg.on_nonzero = OnNonzero::Fail;
        let err = cfg.run(ctx(&obs, dir.path())).await.unwrap_err();
        assert_eq!(
            err.message,
            "exited with code 4; last stderr: the real reason"
        );
        assert!(err.retryable);

        let err = sh("kill -9 $$")
            .run(ctx(&obs, dir.path()))
            .await
            .unwrap_err();
        assert!(
            err.message.contains("killed by signal 9"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn spawn_failure_names_command_and_dir() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let mut cfg = sh("no-such-program-xyz");
        cfg.shell = false;
        let err = cfg.run(ctx(&obs, dir.path())).await.unwrap_err();
        assert!(
            err.message.contains("no-such-program-xyz"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains(&dir.path().display().to_string()),
            "{}",
            err.message
        );
        assert!(!err.retryable);

        let mut cfg = sh("true");
        cfg.working_dir = Some("missing".into());
        let err = cfg.run(ctx(&obs, dir.path())).await.unwrap_err();
        assert!(err.message.contains("missing"), "{}", err.message);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn megabytes_on_both_pipes_do_not_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        // 5 MB of base64 on each pipe (76-char lines), written in interleaved chunks.
        let script = "i=0; while [ $i -lt 10 ]; do \
                        head -c 393216 /dev/zero | base64; head -c 393216 /dev/zero | base64 >&2; i=$((i+1)); \
                      done";
        let started = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            sh(script).run(ctx(&obs, dir.path())),
        )
        .await
        .expect("no deadlock")
        .unwrap();
        // 393216 bytes → 524288 base64 chars → 6899 lines of 76 (+1 short) per chunk.
        let per_chunk = 524288u64.div_ceil(76);
        assert_eq!(out.result["lines_stdout"], per_chunk * 10);
        assert_eq!(out.result["lines_stderr"], per_chunk * 10);
        let rows = obs.rows();
        assert_eq!(
            rows.iter().filter(|r| r.0 == Level::Info).count() as u64,
            per_chunk * 10
        );
        assert_eq!(
            rows.iter().filter(|r| r.0 == Level::Error).count() as u64,
            per_chunk * 10
        );
        let tail = out.result["stdout"].as_str().unwrap();
        assert!(
            tail.len() <= TAIL && tail.len() > TAIL - 100,
            "{}",
            tail.len()
        );
        assert!(started.elapsed() < Duration::from_secs(120));
        let progress = obs
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, RunEvent::Progress { .. }))
            .count();
        // At most one report per 200 ms.
        assert!(progress as u128 <= started.elapsed().as_millis() / 200 + 1);
    }

    #[test]
    fn long_lines_are_split_and_decoded_lossily() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut data = vec![b'x'; MAX_LINE + 10];
            data.extend_from_slice(b"\nok\r\n\xffz");
            let mut lines = Lines::new(BufReader::with_capacity(4096, &data[..]), &Redactor::new());
            assert_eq!(lines.next().await.unwrap().len(), MAX_LINE);
            assert_eq!(lines.next().await.unwrap(), "x".repeat(10));
            assert_eq!(lines.next().await.unwrap(), "ok");
            assert_eq!(lines.next().await.unwrap(), "\u{fffd}z");
            assert_eq!(lines.next().await, None);
        });
    }

    #[test]
    fn a_long_line_is_never_split_through_a_secret() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = Redactor::new();
            r.add("s3cret-token-value");
            // The secret starts 5 bytes before the split; a 3-byte char straddles a later one.
            let mut data = vec![b'x'; MAX_LINE - 5];
            data.extend_from_slice(b"s3cret-token-value");
            data.extend(vec![b'y'; MAX_LINE - 14]);
            data.extend_from_slice("\u{20ac}z\nok".as_bytes());
            let mut lines = Lines::new(BufReader::with_capacity(4096, &data[..]), &r);
            let mut rows = Vec::new();
            while let Some(row) = lines.next().await {
                rows.push(row);
            }
            assert_eq!(
                rows.len(),
                4,
                "{:?}",
                rows.iter().map(|r| r.len()).collect::<Vec<_>>()
            );
            assert_eq!(rows[0], "x".repeat(MAX_LINE - 5));
            assert!(rows[1].starts_with("s3cret-token-value"));
            assert_eq!(r.redact(&rows[1])[..4], *"***y");
            assert!(rows[1].len() <= MAX_LINE && rows[1].is_char_boundary(rows[1].len()));
            assert_eq!(
                rows[1..3].concat(),
                format!("s3cret-token-value{}\u{20ac}z", "y".repeat(MAX_LINE - 14))
            );
            assert_eq!(rows[3], "ok");
        });
    }

    #[test]
    fn long_invalid_utf8_lines_split_into_bounded_rows() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut data = vec![0xff; 2 * MAX_LINE];
            data.extend_from_slice(b"\nok");
            let mut lines = Lines::new(BufReader::with_capacity(4096, &data[..]), &Redactor::new());
            let mut rows = Vec::new();
            while let Some(row) = lines.next().await {
                rows.push(row);
            }
            assert_eq!(rows.last().map(String::as_str), Some("ok"));
            assert!(rows.iter().all(|r| r.len() <= MAX_LINE));
            let replaced: usize = rows
                .iter()
                .map(|r| r.chars().filter(|c| *c == '\u{fffd}').count())
                .sum();
            assert_eq!(replaced, 2 * MAX_LINE);
        });
    }

    #[tokio::test]
    async fn file_command_refuses_proc_sys_and_dev() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        std::os::unix::fs::symlink("/proc/self/environ", dir.path().join("env")).unwrap();
        for src in [
            "/proc/self/environ",
            "/proc/self/status",
            "/dev/null",
            "/sys/kernel",
        ] {
            let e = attach(Path::new(src), &run_dir).await.unwrap_err();
            assert!(
                e.to_string().contains("never attached")
                    || e.kind() == std::io::ErrorKind::NotFound,
                "{src}: {e}"
            );
        }
        let e = attach(&dir.path().join("env"), &run_dir).await.unwrap_err();
        assert!(e.to_string().contains("is under /proc"), "{e}");
        assert!(!run_dir.exists());
    }

    fn gone_or_zombie(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // "pid (comm) S …": the state follows the last ')'.
            Ok(stat) => stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
                .unwrap_or(false),
        }
    }

    async fn wait_for_pid(obs: &Collect) -> u32 {
        for _ in 0..500 {
            if let Some(pid) = obs
                .rows()
                .iter()
                .find_map(|(_, m, _)| m.strip_prefix("grandchild ")?.parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the script never printed its grandchild's pid");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let ctx = ctx(&obs, dir.path());
        let cancel = ctx.cancel.clone();
        let task = tokio::spawn(sh("sleep 30 & echo grandchild $!; sleep 30; wait").run(ctx));
        let grandchild = wait_for_pid(&obs).await;
        assert!(!gone_or_zombie(grandchild));
        let started = Instant::now();
        cancel.cancel();
        let err = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("returns promptly")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.message, "cancelled");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        for _ in 0..100 {
            if gone_or_zombie(grandchild) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("grandchild {grandchild} still running");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_escalates_to_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let ctx = ctx(&obs, dir.path());
        let cancel = ctx.cancel.clone();
        let script =
            "trap '' TERM; sh -c 'trap \"\" TERM; sleep 30' & echo grandchild $!; sleep 30; wait";
        let task = tokio::spawn(sh(script).run(ctx));
        let grandchild = wait_for_pid(&obs).await;
        let started = Instant::now();
        cancel.cancel();
        let err = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("returns")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.message, "cancelled");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
            "{took:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(gone_or_zombie(grandchild));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_future_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let task = tokio::spawn(
            sh("sleep 30 & echo grandchild $!; sleep 30; wait").run(ctx(&obs, dir.path())),
        );
        let grandchild = wait_for_pid(&obs).await;
        task.abort();
        let _ = task.await;
        for _ in 0..100 {
            if gone_or_zombie(grandchild) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("grandchild {grandchild} still running");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_leftovers_do_not_hang_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let obs = Arc::new(Collect::default());
        let started = Instant::now();
        let out = sh("sleep 30 & echo grandchild $!")
            .run(ctx(&obs, dir.path()))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(out.result["exit_code"], 0);
        let grandchild = wait_for_pid(&obs).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(gone_or_zombie(grandchild));
    }

    #[tokio::test]
    async fn file_command_copies_into_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("work")).unwrap();
        let obs = Arc::new(Collect::default());
        let mut cfg = sh("echo 'a,b' > report.csv; echo '::file::report.csv'; echo '::file::report.csv'; echo '::file::nope.txt'");
        cfg.working_dir = Some("work".into());
        let out = cfg.run(ctx(&obs, dir.path())).await.unwrap();
        let run = dir.path().join("run");
        assert_eq!(
            std::fs::read_to_string(run.join("report.csv")).unwrap(),
            "a,b\n"
        );
        assert_eq!(
            std::fs::read_to_string(run.join("report-2.csv")).unwrap(),
            "a,b\n"
        );
        let rows = obs.rows();
        let file = run.join("report.csv").to_string_lossy().into_owned();
        assert!(
            rows.contains(&(Level::Info, "file report.csv".into(), Some(file))),
            "{rows:?}"
        );
        assert!(rows
            .iter()
            .any(|(l, m, _)| *l == Level::Info && m == "file report-2.csv"));
        assert!(
            rows.iter()
                .any(|(l, m, _)| *l == Level::Warning
                    && m.starts_with("file nope.txt: cannot attach"))
        );
        assert_eq!(out.warnings.len(), 1);
    }

    #[test]
    fn parses_workflow_commands() {
        assert_eq!(
            parse_command("::set-output name=x::v::w"),
            Some(("set-output", "name=x", "v::w"))
        );
        assert_eq!(parse_command("::warning::m"), Some(("warning", "", "m")));
        assert_eq!(parse_command("::debug::m"), None);
        assert_eq!(parse_command(":: warning::m"), None);
        assert_eq!(prop("file=a,name=b", "name"), Some("b"));
        assert_eq!(unescape("100%25%0Anext"), "100%\nnext");
        let mut t = "é".repeat(TAIL);
        trim_tail(&mut t, &Redactor::new());
        assert!(t.len() <= TAIL && t.chars().all(|c| c == 'é'));
        // A secret across the cut stays whole in the tail, so it is masked later.
        let r = Redactor::new();
        r.add("s3cr3t-value");
        let mut t = format!("{}s3cr3t-value{}", "x".repeat(10), "y".repeat(TAIL - 5));
        trim_tail(&mut t, &r);
        assert!(t.starts_with("s3cr3t-value"), "{}", &t[..20]);
    }
}
