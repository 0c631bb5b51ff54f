//! The executor's observer that records a run's events, over any [`RunStore`]: a
//! background thread, a bounded queue (by bytes: a step producing log rows faster than
//! they are committed waits instead of memory growing), batched transactions (committed
//! once the queue has been empty for 2 ms — at once for the run's end or a flush —, at
//! least every 50 ms, at most 2000 events each), and a
//! per-step cap on stored log text (`PIPE_LOG_LIMIT`; the rest goes to a file in the run's
//! folder and one row says so).
//!
//! A remote worker's writer is fenced ([`HistoryWriter::start_fenced`]): every batch is
//! written only while the run is still its claim's ([`RunStore::write_events_fenced`]).
//! Once one is refused, nothing more is written (the run was taken from this worker when
//! its lease expired), [`HistoryWriter::fenced_out`] says so, so the worker can stop the
//! run, and `finish`/`close` report the [`StoreError::Fenced`].

use crate::{Result, RunStore, StoreError};
use chrono::{DateTime, SecondsFormat, Utc};
use engine::events::{Level, LogRecord, Observer, RunEvent};
use std::fmt;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The writer thread commits at least this often while events keep coming.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// …and never puts more than this many events in one transaction.
const MAX_BATCH: usize = 2000;
/// After an event, how long the writer waits for the next ones before committing when
/// nobody is waiting for the commit: a short run's step started, its log rows, step
/// finished and run finished then take one commit instead of three (the run's end is never
/// held back: a batch ending with it commits at once).
const LINGER: Duration = Duration::from_millis(2);
/// The most event bytes waiting for the writer thread: a step producing log rows faster
/// than they are committed then waits (an exec step stops reading its child's output, and
/// the pipe's buffer makes the child wait in turn) instead of pipe's memory growing.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// What one queued event counts for besides its text.
const EVENT_OVERHEAD: usize = 256;
/// The log text stored in the database per step (and for the run's own rows), unless
/// `PIPE_LOG_LIMIT` (bytes) says otherwise; the rows past it go to a file in the run's folder
/// (`log-<step>.txt`) and one row says so.
pub const DEFAULT_LOG_LIMIT: u64 = 16 << 20;
/// The variable that overrides [`DEFAULT_LOG_LIMIT`].
pub const LOG_LIMIT_VAR: &str = "PIPE_LOG_LIMIT";

/// The run history as steps see it ([`engine::step::HistoryView`]), shareable between
/// tasks. With the running run's writer, a question first waits for the events sent so far
/// to be committed, so the steps that finished earlier in this run count too.
#[derive(Debug, Clone)]
pub struct HistoryReader {
    pub store: Arc<dyn RunStore>,
    pub writer: Option<Arc<HistoryWriter>>,
}

impl engine::step::HistoryView for HistoryReader {
    fn rows_since(
        &self,
        pipeline: &str,
        step_type: &str,
        since: DateTime<Utc>,
    ) -> std::result::Result<u64, String> {
        if let Some(w) = &self.writer {
            w.flush();
        }
        // Steps ask from async tasks; a blocking client (PostgreSQL's) must not run on the
        // runtime's thread, so the question goes to a plain one.
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.store.rows_since(pipeline, step_type, since))
                .join()
        })
        .map_err(|_| "run history: the query panicked".to_string())?
        .map_err(|e| format!("run history: {e}"))
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

enum Msg {
    /// An event and the bytes it holds of the queue's budget.
    Event(Box<RunEvent>, usize),
    Flush(Sender<()>),
}

/// How many bytes of events are queued for the writer thread, with a wait for room.
#[derive(Default)]
struct Budget {
    state: Mutex<BudgetState>,
    freed: std::sync::Condvar,
}

#[derive(Default)]
struct BudgetState {
    queued: usize,
    /// The writer thread has ended: nobody frees room any more, so nobody waits.
    closed: bool,
}

impl Budget {
    /// Wait until `n` more bytes fit (an event larger than the whole budget waits for an
    /// empty queue), then count them.
    fn take(&self, n: usize) {
        let mut st = lock(&self.state);
        while !st.closed && st.queued > 0 && st.queued + n > MAX_QUEUED_BYTES {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.queued += n;
    }
    fn give(&self, n: usize) {
        let mut st = lock(&self.state);
        st.queued = st.queued.saturating_sub(n);
        self.freed.notify_all();
    }
    fn close(&self) {
        lock(&self.state).closed = true;
        self.freed.notify_all();
    }
}

/// Closes the budget when the writer thread ends, however it ends (a panic included).
struct CloseOnDrop(Arc<Budget>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The bytes an event holds of the queue's budget.
fn event_bytes(e: &RunEvent) -> usize {
    EVENT_OVERHEAD
        + match e {
            RunEvent::Log(rec) => {
                rec.message.len() + rec.description.as_ref().map_or(0, String::len)
            }
            RunEvent::StepFinished(s) => s.error.as_ref().map_or(0, String::len),
            RunEvent::StepRetrying { error, .. } => error.len(),
            RunEvent::RunFinished { error, .. } => error.as_ref().map_or(0, String::len),
            _ => 0,
        }
}

/// The per-step cap on stored log text: rows past it are appended to `log-<step>.txt` in
/// the run's folder, and when the step finishes (or the run, for rows of no step) one row
/// says how many rows and bytes went there, with that file attached.
struct LogCap {
    limit: u64,
    run_dir: PathBuf,
    steps: std::collections::HashMap<Option<String>, StepLog>,
}

#[derive(Default)]
struct StepLog {
    stored: u64,
    spilled_rows: u64,
    spilled_bytes: u64,
    file: Option<std::io::BufWriter<fs::File>>,
    path: PathBuf,
}

impl LogCap {
    fn new(run_dir: PathBuf) -> LogCap {
        let limit = std::env::var(LOG_LIMIT_VAR)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_LOG_LIMIT);
        LogCap {
            limit,
            run_dir,
            steps: Default::default(),
        }
    }

    /// The events to store for `e`: itself, nothing (a row past the cap, now in the file),
    /// or the summary row of a capped step followed by `e`.
    fn admit(&mut self, e: RunEvent, out: &mut Vec<RunEvent>) {
        match &e {
            RunEvent::Log(rec) if rec.file.is_none() => {
                let n =
                    (rec.message.len() + rec.description.as_ref().map_or(0, String::len)) as u64;
                let log = self.steps.entry(rec.step.clone()).or_default();
                if log.spilled_rows == 0 && log.stored + n <= self.limit {
                    log.stored += n;
                    out.push(e);
                    return;
                }
                if log.file.is_none() {
                    let name = format!("log-{}.txt", rec.step.as_deref().unwrap_or("run"));
                    log.path = self.run_dir.join(name);
                    log.file = fs::create_dir_all(&self.run_dir)
                        .and_then(|_| {
                            fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&log.path)
                        })
                        .ok()
                        .map(std::io::BufWriter::new);
                }
                if let Some(f) = log.file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{} {} {}", ts(rec.time), rec.level, rec.message);
                    if let Some(d) = &rec.description {
                        let _ = writeln!(f, "    {d}");
                    }
                }
                log.spilled_rows += 1;
                log.spilled_bytes += n;
            }
            RunEvent::StepFinished(s) => {
                self.summarise(Some(s.step.clone()), out);
                out.push(e);
            }
            RunEvent::RunFinished { .. } => {
                let steps: Vec<Option<String>> = self.steps.keys().cloned().collect();
                for step in steps {
                    self.summarise(step, out);
                }
                out.push(e);
            }
            _ => out.push(e),
        }
    }

    /// Close a capped step's file and add the row that points at it.
    fn summarise(&mut self, step: Option<String>, out: &mut Vec<RunEvent>) {
        let Some(log) = self.steps.get_mut(&step) else {
            return;
        };
        if log.spilled_rows == 0 {
            return;
        }
        let stored = log.file.take().map(|mut f| {
            use std::io::Write;
            f.flush().is_ok()
        });
        let (rows, bytes) = (log.spilled_rows, log.spilled_bytes);
        log.spilled_rows = 0;
        log.spilled_bytes = 0;
        log.stored = self.limit; // later rows of the step go on to a new file
        let whose = if step.is_some() {
            "this step's"
        } else {
            "the run's"
        };
        let message = if stored == Some(true) {
            format!(
                "{rows} more log rows ({bytes} bytes) of {whose} log are not stored here: \
                 the limit is {} bytes a step ({LOG_LIMIT_VAR}); they are in the attached file",
                self.limit
            )
        } else {
            format!(
                "{rows} more log rows ({bytes} bytes) of {whose} log were dropped: the limit \
                 is {} bytes a step ({LOG_LIMIT_VAR}) and {} could not be written",
                self.limit,
                log.path.display()
            )
        };
        out.push(RunEvent::Log(LogRecord {
            time: Utc::now(),
            level: Level::Warning,
            step,
            message,
            description: None,
            file: (stored == Some(true)).then(|| log.path.to_string_lossy().into_owned()),
        }));
    }
}

/// The executor's observer: records a run's events from a background thread, in batched
/// transactions (see the module docs for when they commit).
///
/// Call [`HistoryWriter::finish`] (or [`HistoryWriter::close`] when it is shared behind an
/// `Arc`) before the process exits; dropping it closes it too.
pub struct HistoryWriter {
    run_id: i64,
    fence: Option<i64>,
    /// A fenced batch was refused: the run is no longer this writer's.
    fenced_out: Arc<AtomicBool>,
    tx: Mutex<Option<Sender<Msg>>>,
    budget: Arc<Budget>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HistoryWriter(run {})", self.run_id)
    }
}

impl HistoryWriter {
    /// Start recording run `run_id`'s events into `store`.
    pub fn start(store: Arc<dyn RunStore>, run_id: i64) -> Result<HistoryWriter> {
        Self::spawn(store, run_id, None)
    }

    /// Start recording the events of run `run_id`, created by the claim with `fence`
    /// ([`crate::NewRun::fence`]): each batch is written only while the run is still that
    /// claim's, and once one is refused nothing more is ([`HistoryWriter::fenced_out`]).
    pub fn start_fenced(
        store: Arc<dyn RunStore>,
        run_id: i64,
        fence: i64,
    ) -> Result<HistoryWriter> {
        Self::spawn(store, run_id, Some(fence))
    }

    fn spawn(store: Arc<dyn RunStore>, run_id: i64, fence: Option<i64>) -> Result<HistoryWriter> {
        let (tx, rx) = mpsc::channel();
        let budget = Arc::new(Budget::default());
        let closer = CloseOnDrop(budget.clone());
        let fenced_out = Arc::new(AtomicBool::new(false));
        let out = fenced_out.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pipe-history-{run_id}"))
            .spawn(move || {
                let _closer = closer;
                writer_loop(store, run_id, fence, &out, rx, &_closer.0)
            })
            .map_err(|e| {
                StoreError::Backend(
                    anyhow::Error::new(e).context("cannot start the run history writer"),
                )
            })?;
        Ok(HistoryWriter {
            run_id,
            fence,
            fenced_out,
            tx: Mutex::new(Some(tx)),
            budget,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// The fence it writes under ([`HistoryWriter::start_fenced`]), if any.
    pub fn fence(&self) -> Option<i64> {
        self.fence
    }

    /// Whether a fenced batch was refused: the run was taken from this writer's claim
    /// (marked abandoned after its lease expired); the caller should stop running it.
    pub fn fenced_out(&self) -> bool {
        self.fenced_out.load(Ordering::SeqCst)
    }

    /// Wait until every event sent so far is committed.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        let sent = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Flush(ack)).is_ok());
        if sent {
            let _ = done.recv();
        }
    }

    /// Drain every event, stop the thread and report the first write error, if any.
    pub fn finish(self) -> Result<()> {
        self.close()
    }

    /// Like [`HistoryWriter::finish`], through a shared reference. Events sent afterwards
    /// are dropped; closing twice is harmless.
    pub fn close(&self) -> Result<()> {
        drop(lock(&self.tx).take());
        let Some(thread) = lock(&self.thread).take() else {
            return Ok(());
        };
        match thread.join() {
            Ok(result) => result.map_err(|e| e.context("cannot record run history")),
            Err(_) => Err(StoreError::Backend(anyhow::anyhow!(
                "the run history writer panicked"
            ))),
        }
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Observer for HistoryWriter {
    fn event(&self, event: &RunEvent) {
        if matches!(event, RunEvent::Progress { .. }) {
            return;
        }
        let n = event_bytes(event);
        // Outside the sender's lock: waiting for room must not hold up `flush` or `close`.
        self.budget.take(n);
        let sent = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Event(Box::new(event.clone()), n)).is_ok());
        if !sent {
            self.budget.give(n);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn writer_loop(
    store: Arc<dyn RunStore>,
    run_id: i64,
    fence: Option<i64>,
    fenced_out: &AtomicBool,
    rx: Receiver<Msg>,
    budget: &Budget,
) -> Result<()> {
    let mut first_error: Option<StoreError> = None;
    let mut batch: Vec<RunEvent> = Vec::new();
    let mut acks: Vec<Sender<()>> = Vec::new();
    let mut cap = LogCap::new(store.run_dir(run_id));
    // The budget bytes of the events taken since the last commit.
    let held = std::cell::Cell::new(0);
    let mut take = |msg: Msg, batch: &mut Vec<RunEvent>, acks: &mut Vec<Sender<()>>| match msg {
        Msg::Event(e, n) => {
            held.set(held.get() + n);
            cap.admit(*e, batch);
        }
        Msg::Flush(ack) => acks.push(ack),
    };
    while let Ok(msg) = rx.recv() {
        let since = Instant::now();
        let mut disconnected = false;
        take(msg, &mut batch, &mut acks);
        let linger_until = since + LINGER;
        while batch.len() < MAX_BATCH && since.elapsed() < FLUSH_EVERY {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut batch, &mut acks),
                Err(TryRecvError::Empty) => {
                    // Nobody waits for this batch and the run goes on: the events that
                    // follow within a moment share its commit.
                    let now = Instant::now();
                    let waited_for = !acks.is_empty()
                        || matches!(batch.last(), Some(RunEvent::RunFinished { .. }));
                    if waited_for || now >= linger_until {
                        break;
                    }
                    match rx.recv_timeout(linger_until - now) {
                        Ok(msg) => take(msg, &mut batch, &mut acks),
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if !batch.is_empty() && !fenced_out.load(Ordering::SeqCst) {
            let written = match fence {
                Some(f) => store.write_events_fenced(run_id, f, &batch),
                None => store.write_events(run_id, &batch),
            };
            if let Err(e) = written {
                if matches!(e, StoreError::Fenced(_)) {
                    // Later batches would be refused too: drop them without asking.
                    fenced_out.store(true, Ordering::SeqCst);
                }
                first_error.get_or_insert(e);
            }
        }
        batch.clear();
        budget.give(held.replace(0));
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if disconnected {
            break;
        }
    }
    first_error.map_or(Ok(()), Err)
}
