//! Live run and step changes: one task per server watches the store and fans the changes
//! out to every `GET /api/v1/events` stream (and to the metrics).
//!
//! Why poll the store rather than hook the runs: with remote workers the runs happen on
//! other machines, and several servers may serve one store; the store is the one place
//! that sees every change. Two statements every [`POLL`] (the newest runs, then the steps
//! of the runs that are running or just changed) cost the same with one viewer or a
//! thousand, and nothing when the store is idle beyond those two reads. A burst of more
//! than [`WINDOW`] new runs within one poll shows the newest ones; a client that falls
//! behind the channel gets a `lagged` event and reloads instead of the server buffering
//! without bound.

use crate::api::Query;
use crate::auth::Caller;
use crate::problem::ApiResult;
use crate::AppState;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;
use store::{Role, RunFilter, Status, Trigger};
use tokio::sync::broadcast;
use utoipa_axum::{router::OpenApiRouter, routes};

/// How often the store is looked at.
const POLL: Duration = Duration::from_millis(500);
/// The newest runs looked at each time.
const WINDOW: usize = 200;
/// Changes a slow client may be behind before it is told to reload.
const CHANNEL: usize = 4096;

/// One change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Change {
    /// A run appeared or changed status (or attempt: a repair started).
    Run {
        run: i64,
        integration: String,
        status: Status,
        trigger: Trigger,
        attempt: u32,
        started_at: DateTime<Utc>,
        finished_at: Option<DateTime<Utc>>,
    },
    /// A step of a run started or finished.
    Step {
        run: i64,
        step: String,
        status: Status,
        /// The run attempt the step row belongs to.
        run_attempt: u32,
        /// Its tries within the attempt.
        attempts: u32,
        rows: Option<u64>,
        duration_ms: Option<u64>,
    },
}

impl Change {
    fn run_id(&self) -> i64 {
        match self {
            Change::Run { run, .. } | Change::Step { run, .. } => *run,
        }
    }
}

pub(crate) struct Events {
    tx: broadcast::Sender<Change>,
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(CHANNEL).0,
        }
    }
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }
}

/// The watcher: until the server stops.
pub(crate) async fn watch(state: AppState) {
    let mut runs: HashMap<i64, (Status, u32)> = HashMap::new();
    let mut steps: HashMap<(i64, u32, String), Status> = HashMap::new();
    let mut seeded = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = state.shutdown().cancelled() => return,
        }
        let Ok(latest) = state
            .db(|s| {
                s.find_runs(&RunFilter {
                    limit: WINDOW,
                    ..Default::default()
                })
            })
            .await
        else {
            continue;
        };
        let mut changed: Vec<Change> = Vec::new();
        let mut look_at: Vec<i64> = Vec::new();
        for r in &latest {
            let now = (r.status, r.attempt);
            let before = runs.insert(r.id, now);
            if before != Some(now) {
                look_at.push(r.id);
                if seeded {
                    changed.push(Change::Run {
                        run: r.id,
                        integration: r.pipeline.clone(),
                        status: r.status,
                        trigger: r.trigger,
                        attempt: r.attempt,
                        started_at: r.started_at,
                        finished_at: r.finished_at,
                    });
                    if r.status.is_finished() {
                        state.metrics().run_finished(r.status);
                    }
                }
            } else if !r.status.is_finished() {
                look_at.push(r.id);
            }
        }
        if latest.len() >= WINDOW {
            let oldest = latest.last().map(|r| r.id).unwrap_or(0);
            runs.retain(|id, _| *id >= oldest);
            steps.retain(|(id, _, _), _| *id >= oldest);
        }
        if !look_at.is_empty() {
            let ids = look_at.clone();
            if let Ok(rows) = state.db(move |s| s.steps_of_runs(&ids)).await {
                for (run, row) in rows {
                    let key = (run, row.run_attempt, row.step.clone());
                    if steps.insert(key, row.status) == Some(row.status) {
                        continue;
                    }
                    if !seeded {
                        continue;
                    }
                    if row.status.is_finished() {
                        if let Some(ms) = row.duration_ms {
                            state.metrics().step_finished(ms);
                        }
                    }
                    changed.push(Change::Step {
                        run,
                        step: row.step,
                        status: row.status,
                        run_attempt: row.run_attempt,
                        attempts: row.attempts,
                        rows: row.rows,
                        duration_ms: row.duration_ms,
                    });
                }
            }
        }
        seeded = true;
        for c in changed {
            // No receivers is fine: nobody is watching.
            let _ = state.events().tx.send(c);
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only this run's changes.
    pub run: Option<i64>,
    /// Only this integration's runs' changes.
    pub integration: Option<String>,
}

/// Run and step changes, live (Server-Sent Events): `run` and `step` events (their JSON is
/// `Change`), `lagged` when the client fell behind (reload, then listen again).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, content_type = "text/event-stream", description = "`run`, `step` and `lagged` events")))]
pub async fn events(
    caller: Caller,
    State(state): State<AppState>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>> {
    caller.require(Role::Viewer)?;
    let rx = state.events().subscribe();
    let stop = state.shutdown().clone();
    // A run's integration, remembered from its run events (step events do not carry it).
    let stream = futures_util::stream::unfold(
        (rx, HashMap::<i64, bool>::new()),
        move |(mut rx, mut of_integration)| {
            let stop = stop.clone();
            let run = q.run;
            let integration = q.integration.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        n = rx.recv() => n,
                        _ = stop.cancelled() => return None,
                    };
                    let c = match next {
                        Ok(c) => c,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let e = Event::default().event("lagged").data(n.to_string());
                            return Some((Ok(e), (rx, of_integration)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    };
                    if run.is_some_and(|r| r != c.run_id()) {
                        continue;
                    }
                    if let Some(want) = &integration {
                        let keep = match &c {
                            Change::Run {
                                run, integration, ..
                            } => {
                                let k = integration == want;
                                of_integration.insert(*run, k);
                                if of_integration.len() > 100_000 {
                                    of_integration.clear();
                                }
                                k
                            }
                            Change::Step { run, .. } => {
                                of_integration.get(run).copied().unwrap_or(false)
                            }
                        };
                        if !keep {
                            continue;
                        }
                    }
                    let name = match c {
                        Change::Run { .. } => "run",
                        Change::Step { .. } => "step",
                    };
                    if let Ok(e) = Event::default().event(name).json_data(&c) {
                        return Some((Ok(e), (rx, of_integration)));
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
