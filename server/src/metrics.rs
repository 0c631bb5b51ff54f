//! `/health` (no token: for load balancers and probes) and `/metrics` (Prometheus text,
//! a viewer token: it names integrations).
//!
//! Gauges are read from the store at scrape time (runs by status, queue depth per
//! integration, scheduler lag, workers by state), so every server of one store reports
//! the same numbers. The step-duration histogram and the finished-run counter count what
//! this server's event watcher saw finish since it started (Prometheus counters are per
//! process; sum them across servers only if they serve different stores).

use crate::auth::{bearer, Caller};
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::{FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use store::{Role, Status};

/// The histogram's upper bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

pub(crate) struct Metrics(Mutex<Counts>);

#[derive(Default)]
struct Counts {
    buckets: [u64; BUCKETS.len()],
    step_count: u64,
    step_sum_s: f64,
    finished: BTreeMap<&'static str, u64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics(Mutex::new(Counts::default()))
    }
    pub fn step_finished(&self, ms: u64) {
        let s = ms as f64 / 1000.0;
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                c.buckets[i] += 1;
            }
        }
        c.step_count += 1;
        c.step_sum_s += s;
    }
    pub fn run_finished(&self, status: Status) {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *c.finished.entry(status.as_str()).or_default() += 1;
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
}

/// The store answers: 200 `{"status":"ok",…}`; it does not: 503.
async fn health(State(state): State<AppState>) -> Response {
    let version = state.version().to_string();
    match state.db(|s| s.schema_version()).await {
        Ok(schema) => axum::Json(serde_json::json!({
            "status": "ok", "version": version, "store_schema": schema,
        }))
        .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                serde_json::json!({"status": "unavailable", "version": version,
                "detail": "the store does not answer"}),
            ),
        )
            .into_response(),
    }
}

/// A viewer's token, as `Caller`, but from `/metrics`' own route.
struct MetricsCaller(Caller);

impl FromRequestParts<AppState> for MetricsCaller {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        match bearer(parts)? {
            Some(t) => Ok(MetricsCaller(state.authenticate(t).await?)),
            None => Err(Problem::unauthorized(
                "/metrics needs a token (a viewer's machine token: Prometheus' `authorization: credentials_file`)",
            )),
        }
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(
    MetricsCaller(caller): MetricsCaller,
    State(state): State<AppState>,
) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let now = Utc::now();
    let (counts, per_integration, integrations, workers) = state
        .db(move |s| {
            Ok((
                s.run_counts()?,
                s.integration_counts()?,
                s.list_integrations()?,
                s.list_workers(now)?,
            ))
        })
        .await?;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP pipe_runs Runs in the store by status.");
    let _ = writeln!(out, "# TYPE pipe_runs gauge");
    for (status, n) in &counts {
        let _ = writeln!(out, "pipe_runs{{status=\"{}\"}} {n}", status.as_str());
    }
    let _ = writeln!(
        out,
        "# HELP pipe_queue_depth Queued runs waiting for a worker, by integration."
    );
    let _ = writeln!(out, "# TYPE pipe_queue_depth gauge");
    let _ = writeln!(
        out,
        "# HELP pipe_active_runs Running (or claimed) runs, by integration."
    );
    let _ = writeln!(out, "# TYPE pipe_active_runs gauge");
    for (name, c) in &per_integration {
        let n = escape(name);
        let _ = writeln!(out, "pipe_queue_depth{{integration=\"{n}\"}} {}", c.queued);
        let _ = writeln!(out, "pipe_active_runs{{integration=\"{n}\"}} {}", c.active);
    }
    let lag = integrations
        .iter()
        .filter(|i| i.enabled && !i.removed)
        .filter_map(|i| i.next_run_at)
        .map(|t| (now - t).num_milliseconds().max(0))
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "# HELP pipe_scheduler_lag_seconds How late the most overdue enabled integration's next run is (0: none overdue).");
    let _ = writeln!(out, "# TYPE pipe_scheduler_lag_seconds gauge");
    let _ = writeln!(out, "pipe_scheduler_lag_seconds {}", lag as f64 / 1000.0);
    let _ = writeln!(out, "# HELP pipe_integrations Integrations by state.");
    let _ = writeln!(out, "# TYPE pipe_integrations gauge");
    let enabled = integrations
        .iter()
        .filter(|i| i.enabled && !i.removed)
        .count();
    let disabled = integrations
        .iter()
        .filter(|i| !i.enabled && !i.removed)
        .count();
    let _ = writeln!(out, "pipe_integrations{{state=\"enabled\"}} {enabled}");
    let _ = writeln!(out, "pipe_integrations{{state=\"disabled\"}} {disabled}");
    let _ = writeln!(out, "# HELP pipe_workers Workers by state.");
    let _ = writeln!(out, "# TYPE pipe_workers gauge");
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for w in &workers {
        *by_state.entry(w.state.as_str()).or_default() += 1;
    }
    for (s, n) in by_state {
        let _ = writeln!(out, "pipe_workers{{state=\"{s}\"}} {n}");
    }
    let c = state.metrics().0.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(
        out,
        "# HELP pipe_runs_finished_total Runs this server saw finish, by status."
    );
    let _ = writeln!(out, "# TYPE pipe_runs_finished_total counter");
    for (s, n) in &c.finished {
        let _ = writeln!(out, "pipe_runs_finished_total{{status=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP pipe_step_duration_seconds Durations of the steps this server saw finish."
    );
    let _ = writeln!(out, "# TYPE pipe_step_duration_seconds histogram");
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "pipe_step_duration_seconds_bucket{{le=\"{b}\"}} {}",
            c.buckets[i]
        );
    }
    let _ = writeln!(
        out,
        "pipe_step_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        c.step_count
    );
    let _ = writeln!(out, "pipe_step_duration_seconds_sum {}", c.step_sum_s);
    let _ = writeln!(out, "pipe_step_duration_seconds_count {}", c.step_count);
    drop(c);
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}
