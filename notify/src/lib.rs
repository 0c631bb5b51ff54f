//! Run notifications: the `notify:` entries of a pipeline, sent as signed webhooks or as
//! e-mail over SMTP.
//!
//! Why a crate of its own: both `pipe run` and the service's workers notify, and the
//! service also notifies outside any run (`paused`); neither should carry an HTTP signer
//! and a mail client in its own code. It sits above `engine` (templates, redactor, the
//! model) and `steps` (the `smtp` connection struct), below the runner and the service.
//!
//! Rules (docs/decisions/0021-notifications.md):
//! - **Never fail the run.** A notification that cannot be rendered or sent is returned as
//!   a [`Failure`] and logged as a warning row of the run's history ([`RunNotifications`]
//!   does both); the run's status is never touched.
//! - **Nothing secret leaves.** Entries are rendered with the run's templates, so every
//!   `secret()` value is learnt by the run's redactor; the webhook key, the SMTP password
//!   and every rendered header value are learnt too. Bodies, subjects, log rows and errors
//!   pass through the redactor, and a webhook is named in messages by its scheme, host and
//!   port only (a token in its path or query never appears).
//! - **`duration_over` fires once per run**, while the run is going, from a timer started
//!   with the run ([`RunNotifications::start`]); a caller without timers
//!   ([`Notifier::send`] at the end) gets it at the end when the run took longer.
//! - **`paused`** is the service's: [`paused`] (or [`Notifier::send`] with
//!   [`Event::Paused`]) when `pause_after_failures` disables an integration.

mod email;
mod webhook;

pub use webhook::{signature, SIGNATURE_HEADER, TIMESTAMP_HEADER};

use chrono::{DateTime, Utc};
use engine::events::{Level, LogRecord, Observer, RunEvent, StepRecord};
use engine::model::{NotifyEvent, NotifySpec};
use engine::plan::Plan;
use engine::secrets::Redactor;
use engine::status::Status;
use engine::template::{Scope, Templates};
use engine::yaml::Node;
use indexmap::IndexMap;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest one notification may take, retries included; past it, it is a failure.
pub const MAX_DELIVERY_TIME: Duration = Duration::from_secs(300);

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The run failed, was cancelled or was abandoned.
    Failure,
    /// The run succeeded (with or without warnings).
    Success,
    /// The integration was paused by the scheduler.
    Paused,
    /// The run is still going after this long.
    DurationOver(Duration),
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Failure => "failure",
            Event::Success => "success",
            Event::Paused => "paused",
            Event::DurationOver(_) => "duration_over",
        }
    }

    /// The event a finished run's status gives: success or failure.
    pub fn of_status(status: Status) -> Event {
        if status.is_success() {
            Event::Success
        } else {
            Event::Failure
        }
    }
}

/// One step of a [`RunSummary`].
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    pub id: String,
    pub status: Status,
    pub attempts: u32,
    pub duration_ms: u64,
    pub rows: Option<u64>,
    pub error: Option<String>,
}

impl From<&StepRecord> for StepSummary {
    fn from(r: &StepRecord) -> StepSummary {
        StepSummary {
            id: r.step.clone(),
            status: r.status,
            attempts: r.attempts,
            duration_ms: r.duration_ms,
            rows: r.rows,
            error: r.error.clone(),
        }
    }
}

/// What a notification says about a run (the webhook's JSON body, the e-mail's text).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub run_id: i64,
    pub status: Status,
    pub error: Option<String>,
    /// `cli`, `schedule`, `manual`, `backfill` …
    pub trigger: String,
    pub logical_date: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    pub steps: Vec<StepSummary>,
}

impl RunSummary {
    /// A summary of a run that has just started (status `running`, no steps yet).
    pub fn started(
        pipeline: &str,
        run_id: i64,
        trigger: &str,
        logical_date: Option<DateTime<Utc>>,
        started_at: DateTime<Utc>,
    ) -> RunSummary {
        RunSummary {
            pipeline: pipeline.to_string(),
            run_id,
            status: Status::Running,
            error: None,
            trigger: trigger.to_string(),
            logical_date,
            started_at,
            finished_at: None,
            duration_ms: 0,
            steps: Vec::new(),
        }
    }

    /// The same run, finished now with this status, error and steps.
    pub fn finished(&self, status: Status, error: Option<&str>, steps: &[StepRecord]) -> Self {
        let now = Utc::now();
        RunSummary {
            status,
            error: error.map(str::to_string),
            finished_at: Some(now),
            duration_ms: (now - self.started_at).num_milliseconds().max(0) as u64,
            steps: steps.iter().map(StepSummary::from).collect(),
            ..self.clone()
        }
    }
}

/// A notification that was not sent. Its text is redacted.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `webhook https://hooks.example.com` or `email to ops@example.com` (no path, query or
    /// user: a token there is never shown).
    pub target: String,
    pub event: &'static str,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "notification ({}) not sent: {}: {}",
            self.event, self.target, self.message
        )
    }
}

impl Failure {
    /// The warning row this failure becomes in the run's history.
    pub fn log_record(&self) -> LogRecord {
        LogRecord {
            time: Utc::now(),
            level: Level::Warning,
            step: None,
            message: self.to_string(),
            description: None,
            file: None,
        }
    }
}

/// A notification that was sent, for the info row of the run's history.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub target: String,
    pub event: &'static str,
    /// Attempts it took (1 = first try).
    pub attempts: u32,
}

/// The outcome of sending one event: what went out, what did not.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub sent: Vec<Delivery>,
    pub failed: Vec<Failure>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.sent.extend(other.sent);
        self.failed.extend(other.failed);
    }

    /// Log every delivery (info) and failure (warning) through `observer` (the run's
    /// history writer and progress display).
    pub fn log(&self, observer: &dyn Observer) {
        for d in &self.sent {
            let again = if d.attempts > 1 {
                format!(" after {} attempts", d.attempts)
            } else {
                String::new()
            };
            observer.event(&RunEvent::Log(LogRecord {
                time: Utc::now(),
                level: Level::Info,
                step: None,
                message: format!("notification ({}) sent: {}{again}", d.event, d.target),
                description: None,
                file: None,
            }));
        }
        for f in &self.failed {
            observer.event(&RunEvent::Log(f.log_record()));
        }
    }
}

/// The `notify:` entries of one pipeline, ready to send for one run (or, for `paused`,
/// for an integration).
pub struct Notifier {
    entries: Vec<NotifySpec>,
    connections: IndexMap<String, Node>,
    templates: Arc<Templates>,
    scope: Scope,
    redactor: Redactor,
    /// Per entry: whether its `duration_over` was sent (or is being sent) for this run.
    duration_sent: Vec<AtomicBool>,
}

impl Notifier {
    /// The notifier of a run: `templates` are the run's (their redactor learns every
    /// secret), `params` and `run` the values templates see as `params` and `run`. Every
    /// `secret('NAME')` the entries name is looked up now, so the redactor knows it before
    /// the first step runs (an unset one fails when its entry is sent, not here).
    pub fn new(
        plan: &Plan,
        templates: Arc<Templates>,
        params: minijinja::Value,
        run: minijinja::Value,
    ) -> Notifier {
        let redactor = templates.runtime().redactor.clone();
        let scope = Scope::new(
            params,
            minijinja::Value::UNDEFINED,
            with_pipeline(run, &plan.name),
        );
        let notifier = Notifier {
            entries: plan.notify.clone(),
            connections: plan.connection_nodes.clone(),
            templates,
            scope,
            redactor,
            duration_sent: plan.notify.iter().map(|_| AtomicBool::new(false)).collect(),
        };
        notifier.learn_secrets();
        notifier
    }

    /// Whether the pipeline has no `notify:` entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn learn_secrets(&self) {
        let mut names = std::collections::BTreeSet::new();
        for entry in &self.entries {
            for t in entry_strings(entry) {
                names.extend(engine::secrets::literal_secret_names(t));
            }
        }
        for name in names {
            let call = format!("{{{{ secret({}) }}}}", serde_json::Value::String(name));
            let _ = self.templates.render_str(&call, &self.scope);
        }
    }

    /// Send `event` to every entry that lists it (for [`Event::DurationOver`]: every entry
    /// whose `duration_over` the run has passed and that has not sent it yet), all at
    /// once. Never fails: what could not be sent is in the report's `failed`.
    pub async fn send(&self, event: Event, summary: &RunSummary) -> Report {
        let picked: Vec<usize> = (0..self.entries.len())
            .filter(|&i| match event {
                Event::DurationOver(elapsed) => self.threshold(i).is_some_and(|t| {
                    elapsed >= t && !self.duration_sent[i].swap(true, Ordering::SeqCst)
                }),
                _ => self.entries[i]
                    .on
                    .0
                    .iter()
                    .any(|e| e.name() == event.name()),
            })
            .collect();
        self.send_to(picked, event, summary).await
    }

    /// Send `event` to the entries `picked`, all at once.
    async fn send_to(&self, picked: Vec<usize>, event: Event, summary: &RunSummary) -> Report {
        let sends = picked.into_iter().map(|i| {
            let event = match event {
                Event::DurationOver(_) => {
                    Event::DurationOver(self.threshold(i).unwrap_or_default())
                }
                e => e,
            };
            self.send_entry(i, event, summary)
        });
        let mut report = Report::default();
        for r in futures::future::join_all(sends).await {
            report.merge(r);
        }
        report
    }

    /// The `duration_over` of entry `i`, when it has one that parses.
    fn threshold(&self, i: usize) -> Option<Duration> {
        self.entries[i].on.0.iter().find_map(|e| match e {
            NotifyEvent::DurationOver(d) => d.parse().ok(),
            _ => None,
        })
    }

    /// The `duration_over` thresholds, by entry.
    fn thresholds(&self) -> Vec<(usize, Duration)> {
        (0..self.entries.len())
            .filter_map(|i| Some((i, self.threshold(i)?)))
            .collect()
    }

    async fn send_entry(&self, i: usize, event: Event, summary: &RunSummary) -> Report {
        let entry = &self.entries[i];
        let scope = self.scope.with_notification(event, summary);
        let (target, result) = if let Some(hook) = &entry.webhook {
            let target = webhook::target(&self.redactor, &self.templates, &scope, hook);
            let sent = async {
                let rendered = webhook::render(&self.templates, &scope, hook, &self.redactor)?;
                let body = self.body(event, summary);
                let delivery = format!("{}.{}.{}", summary.run_id, i + 1, event.name());
                webhook::send(&rendered, &body, event.name(), &delivery, &self.redactor).await
            };
            (target, bounded(sent).await)
        } else if let Some(mail) = &entry.email {
            let target = email::target(&self.templates, &scope, mail);
            let sent = async {
                let rendered = email::render(
                    &self.templates,
                    &scope,
                    mail,
                    &self.connections,
                    &self.redactor,
                )?;
                let text = email::text(event, summary);
                let subject = rendered
                    .subject
                    .clone()
                    .unwrap_or_else(|| email::default_subject(event, summary));
                email::send(
                    &rendered,
                    &self.redactor.redact(&subject),
                    &self.redactor.redact(&text),
                    event.name(),
                    summary.run_id,
                )
                .await
                .map(|()| 1)
            };
            (target, bounded(sent).await)
        } else {
            return Report::default();
        };
        let target = self.redactor.redact(&target);
        match result {
            Ok(attempts) => Report {
                sent: vec![Delivery {
                    target,
                    event: event.name(),
                    attempts,
                }],
                failed: Vec::new(),
            },
            Err(message) => Report {
                sent: Vec::new(),
                failed: vec![Failure {
                    target,
                    event: event.name(),
                    message: self.redactor.redact(&message),
                }],
            },
        }
    }

    /// The webhook's JSON body: the summary with `event` first (and the threshold of a
    /// `duration_over`), redacted.
    fn body(&self, event: Event, summary: &RunSummary) -> Vec<u8> {
        let mut v = serde_json::json!({ "event": event.name() });
        if let Event::DurationOver(d) = event {
            v["duration_over_ms"] = serde_json::json!(d.as_millis() as u64);
        }
        if let (Some(obj), Ok(serde_json::Value::Object(rest))) =
            (v.as_object_mut(), serde_json::to_value(summary))
        {
            obj.extend(rest);
        }
        let v = self.redactor.redact_json(&v);
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// [`MAX_DELIVERY_TIME`] around one notification.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(MAX_DELIVERY_TIME, f).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "gave up after {}",
            engine::duration::human(MAX_DELIVERY_TIME)
        )),
    }
}

/// `run` with `run.pipeline` (validate lets templates use it; `run_value` lacks it).
fn with_pipeline(run: minijinja::Value, pipeline: &str) -> minijinja::Value {
    let mut m = std::collections::BTreeMap::new();
    if let Ok(keys) = run.try_iter() {
        for k in keys {
            if let Ok(v) = run.get_item(&k) {
                m.insert(k.to_string(), v);
            }
        }
    }
    m.entry("pipeline".to_string())
        .or_insert_with(|| minijinja::Value::from(pipeline));
    minijinja::Value::from(m)
}

/// Every template-bearing string of an entry.
fn entry_strings(entry: &NotifySpec) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(h) = &entry.webhook {
        out.push(h.url.as_str());
        out.extend(h.secret.as_deref());
        out.extend(h.headers.values().map(String::as_str));
    }
    if let Some(m) = &entry.email {
        out.push(m.connection.as_str());
        out.push(m.from.as_str());
        out.extend(m.to.iter().map(String::as_str));
        out.extend(m.subject.as_deref());
    }
    out
}

trait ScopeExt {
    fn with_notification(&self, event: Event, summary: &RunSummary) -> Scope;
}

impl ScopeExt for Scope {
    /// The locals of [`engine::model::NOTIFY_LOCALS`].
    fn with_notification(&self, event: Event, summary: &RunSummary) -> Scope {
        self.with("event", minijinja::Value::from(event.name()))
            .with("status", minijinja::Value::from(summary.status.as_str()))
            .with(
                "error",
                summary
                    .error
                    .as_deref()
                    .map(minijinja::Value::from)
                    .unwrap_or(minijinja::Value::from(())),
            )
    }
}

/// Render one template string to text.
fn render_text(
    templates: &Templates,
    scope: &Scope,
    what: &str,
    src: &str,
) -> Result<String, String> {
    match templates.render_str(src, scope) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(serde_json::Value::Null) => Ok(String::new()),
        Ok(other) => Ok(other.to_string()),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The notifications of one run: [`RunNotifications::start`] with the run (it starts the
/// `duration_over` timers), [`RunNotifications::finish`] when it has finished (it sends
/// `success` or `failure`). Every delivery and failure is logged through the observer;
/// nothing here can fail the run.
pub struct RunNotifications {
    notifier: Arc<Notifier>,
    base: RunSummary,
    observer: Arc<dyn Observer>,
    timers: Vec<Timer>,
    clock: std::time::Instant,
}

/// A `duration_over` timer task, aborted when dropped: a run dropped without
/// [`RunNotifications::finish`] (its task cancelled) leaves no timer behind to fire later.
struct Timer(Option<tokio::task::JoinHandle<()>>);

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl RunNotifications {
    /// Start watching a run; `None` when the pipeline has no `notify:`. Call inside a
    /// tokio runtime (the timers are tasks).
    pub fn start(
        notifier: Notifier,
        base: RunSummary,
        observer: Arc<dyn Observer>,
    ) -> Option<RunNotifications> {
        if notifier.is_empty() {
            return None;
        }
        let notifier = Arc::new(notifier);
        let clock = std::time::Instant::now();
        let timers = notifier
            .thresholds()
            .into_iter()
            .map(|(i, after)| {
                let notifier = notifier.clone();
                let observer = observer.clone();
                let base = base.clone();
                // Each timer sends its own entry, once: whoever sets the entry's flag first
                // (this timer, or `finish`) sends it.
                Timer(Some(tokio::spawn(async move {
                    tokio::time::sleep_until((clock + after).into()).await;
                    if notifier.duration_sent[i].swap(true, Ordering::SeqCst) {
                        return;
                    }
                    let mut now = base.clone();
                    now.duration_ms = clock.elapsed().as_millis() as u64;
                    notifier
                        .send_to(vec![i], Event::DurationOver(after), &now)
                        .await
                        .log(observer.as_ref());
                })))
            })
            .collect();
        Some(RunNotifications {
            notifier,
            base,
            observer,
            timers,
            clock,
        })
    }

    /// The run has finished: stop the timers that have not fired (one that is sending
    /// finishes first), send `success` or `failure`, log what happened, and return it.
    pub async fn finish(self, status: Status, error: Option<&str>, steps: &[StepRecord]) -> Report {
        let summary = self.base.finished(status, error, steps);
        let elapsed = self.clock.elapsed();
        let mut due = Vec::new();
        for (mut timer, (i, after)) in self.timers.into_iter().zip(self.notifier.thresholds()) {
            if self.notifier.duration_sent[i].swap(true, Ordering::SeqCst) {
                // Its timer is sending: let it finish.
                if let Some(h) = timer.0.take() {
                    let _ = h.await;
                }
            } else if elapsed >= after {
                // Passed, but the run ended before its timer could send: send it now.
                due.push(i);
            }
            // Claimed here: the timer, dropped, is aborted and can no longer send.
        }
        let mut report = Report::default();
        report.merge(
            self.notifier
                .send_to(due, Event::DurationOver(elapsed), &summary)
                .await,
        );
        report.merge(self.notifier.send(Event::of_status(status), &summary).await);
        report.log(self.observer.as_ref());
        report
    }
}

/// Send `paused` for an integration the scheduler has just paused: `summary` is its last
/// run. Templates see the params' defaults and that run as `run`. For the service.
pub async fn paused(plan: &Plan, summary: &RunSummary, redactor: &Redactor) -> Report {
    let tz = plan.timezone();
    let logical_date = summary.logical_date.unwrap_or(summary.started_at);
    let templates = Arc::new(Templates::new(engine::template::Runtime {
        redactor: redactor.clone(),
        tz,
        logical_date,
        dry_run: false,
        overrides: Default::default(),
    }));
    let mut params = std::collections::BTreeMap::new();
    for (name, spec) in &plan.params {
        if let Some(Ok(v)) = spec
            .default
            .as_ref()
            .map(|d| engine::params::check_value(spec, d))
        {
            params.insert(name.clone(), engine::template::json_to_value(&v));
        }
    }
    let run = engine::template::run_value(summary.run_id, summary.started_at, logical_date, tz);
    let notifier = Notifier::new(plan, templates, minijinja::Value::from(params), run);
    notifier.send(Event::Paused, summary).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accept one HTTP request, answer 200, hand back its head and body.
    async fn receive_one(listener: tokio::net::TcpListener) -> (String, Vec<u8>) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                return (head, body);
            }
        }
    }

    #[tokio::test]
    async fn paused_is_sent_to_the_entries_that_list_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = format!(
            "pipeline: paused_one\nparams:\n  team: {{ type: string, default: ops }}\n\
             steps:\n  a: {{ type: log, with: {{ message: hi }} }}\nnotify:\n  \
             - on: failure\n    webhook: {{ url: \"http://127.0.0.1:{port}/failure\" }}\n  \
             - on: paused\n    webhook: {{ url: \"http://127.0.0.1:{port}/p/{{{{ params.team }}}}\", \
             secret: k3y-for-paused }}\n"
        );
        let outcome = engine::validate::validate_text(
            &text,
            std::path::Path::new("p.yaml"),
            "p.yaml",
            &steps::registry(),
        );
        let plan = outcome
            .plan
            .unwrap_or_else(|| panic!("{:?}", outcome.diagnostics));
        let mut summary = RunSummary::started("paused_one", 7, "schedule", None, Utc::now());
        summary = summary.finished(Status::Failed, Some("boom"), &[]);
        let redactor = Redactor::new();
        let (report, (head, body)) =
            tokio::join!(paused(&plan, &summary, &redactor), receive_one(listener));
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(report.sent.len(), 1);
        assert!(head.starts_with("POST /p/ops "), "{head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event"], "paused");
        assert_eq!(v["run_id"], 7);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["trigger"], "schedule");
        let ts = head
            .lines()
            .find_map(|l| l.strip_prefix("x-pipe-timestamp: "))
            .expect("timestamp header");
        let sig = head
            .lines()
            .find_map(|l| l.strip_prefix("x-pipe-signature: "))
            .expect("signature header");
        assert_eq!(
            sig,
            signature(b"k3y-for-paused", ts.parse().unwrap(), &body)
        );
        // The key was learnt: it is masked wherever it could surface.
        assert_eq!(redactor.redact("k3y-for-paused"), "***");
    }
}
