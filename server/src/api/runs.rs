//! Runs: list (filters, cursor pages), show (steps of every attempt, outputs as recorded:
//! redacted before they reached the store), logs (paged, and live over Server-Sent
//! Events), cancel, repair (queued as the run's next attempt).

use super::integrations::Graph;
use super::{page_size, Done, Json, Page, Path, Query};
use crate::auth::Caller;
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use store::{LogRow, Role, RunDetail, RunFilter, RunRow, Status, Trigger};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_runs))
        .routes(routes!(show_run))
        .routes(routes!(run_graph))
        .routes(routes!(run_logs))
        .routes(routes!(stream_logs))
        .routes(routes!(cancel_run))
        .routes(routes!(repair_run))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// Only this integration's (pipeline's) runs.
    pub integration: Option<String>,
    /// `running`, `success`, `failed`, `cancelled`, `abandoned` …
    pub status: Option<String>,
    /// `cli`, `schedule`, `manual`, `backfill`, `repair` …
    pub trigger: Option<String>,
    /// Only runs started at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only runs started before this time (RFC 3339).
    pub until: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size (default 50, at most 500).
    pub limit: Option<usize>,
}

fn time_param(field: &str, text: &Option<String>) -> ApiResult<Option<DateTime<Utc>>> {
    text.as_deref()
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    Problem::invalid(
                        field,
                        format!(
                            "{field}: expected an RFC 3339 time (2026-01-31T00:00:00Z), got `{t}`"
                        ),
                    )
                })
        })
        .transpose()
}

fn parsed<T: std::str::FromStr<Err = String>>(
    field: &str,
    text: &Option<String>,
) -> ApiResult<Option<T>> {
    text.as_deref()
        .map(|t| t.parse::<T>().map_err(|e| Problem::invalid(field, e)))
        .transpose()
}

/// Runs, newest first, filtered; pages follow `next_cursor`.
#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunsQuery),
    responses((status = 200, body = Page<RunRow>), (status = 422, body = Problem)))]
pub async fn list_runs(
    caller: Caller,
    State(state): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> ApiResult<Json<Page<RunRow>>> {
    caller.require(Role::Viewer)?;
    let limit = page_size(q.limit)?;
    let filter = RunFilter {
        pipeline: q.integration.clone(),
        status: parsed::<Status>("status", &q.status)?,
        trigger: parsed::<Trigger>("trigger", &q.trigger)?,
        before_id: q
            .cursor
            .as_deref()
            .map(|c| {
                c.parse::<i64>()
                    .map_err(|_| Problem::invalid("cursor", "not a cursor of this API"))
            })
            .transpose()?,
        since: time_param("since", &q.since)?,
        until: time_param("until", &q.until)?,
        limit: limit + 1,
    };
    let mut items = state.db(move |s| s.find_runs(&filter)).await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

async fn run(state: &AppState, id: i64) -> ApiResult<RunDetail> {
    state
        .db(move |s| s.get_run(id))
        .await?
        .ok_or_else(|| Problem::not_found(format!("run {id} not found")))
}

/// A run with the steps of every attempt (outputs as recorded, secrets masked).
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = i64, Path, description = "The run id")),
    responses((status = 200, body = RunDetail), (status = 404, body = Problem)))]
pub async fn show_run(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<RunDetail>> {
    caller.require(Role::Viewer)?;
    Ok(Json(run(&state, id).await?))
}

/// The step graph of the pipeline text the run ran (kept with the run at its end).
#[utoipa::path(get, path = "/api/v1/runs/{id}/graph", tag = "runs",
    params(("id" = i64, Path)),
    responses((status = 200, body = Graph), (status = 404, body = Problem)))]
pub async fn run_graph(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Graph>> {
    caller.require(Role::Viewer)?;
    let detail = run(&state, id).await?;
    let source = state.db(move |s| s.run_source(id)).await?;
    state
        .blocking(move |st| {
            if let Some(src) = source {
                if let Some(plan) = st.plans().of_text(&src.text, &src.path) {
                    return Ok(Graph::of(&plan));
                }
            }
            // A running run keeps its text only at its end: the integration's file now.
            let i = st
                .store()
                .get_integration(&detail.run.pipeline)
                .map_err(Problem::from)?
                .ok_or_else(|| {
                    Problem::not_found(format!("run {id} kept no pipeline text to draw"))
                })?;
            Ok(Graph::of(&*st.plans().of(&i)?))
        })
        .await
        .map(Json)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Only rows with an id above this (the last id of the previous page).
    pub after: Option<i64>,
    /// Page size (default 500, at most 5,000).
    pub limit: Option<usize>,
}

/// A page of log rows, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LogPage {
    pub items: Vec<LogRow>,
    /// Pass as `after` for the next page; absent when this page is the last for now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<i64>,
}

/// A run's log, oldest first, page by page.
#[utoipa::path(get, path = "/api/v1/runs/{id}/logs", tag = "runs",
    params(("id" = i64, Path), LogsQuery),
    responses((status = 200, body = LogPage), (status = 404, body = Problem)))]
pub async fn run_logs(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<LogPage>> {
    caller.require(Role::Viewer)?;
    let limit = match q.limit {
        None => 500,
        Some(n) if (1..=5000).contains(&n) => n,
        Some(_) => return Err(Problem::invalid("limit", "limit is 1 to 5000")),
    };
    let after = q.after.unwrap_or(0);
    let (exists, mut items) = state
        .db(move |s| {
            Ok((
                s.run_status(id)?.is_some(),
                s.logs_page(id, after, limit + 1)?,
            ))
        })
        .await?;
    if !exists {
        return Err(Problem::not_found(format!("run {id} not found")));
    }
    let next_after = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(LogPage { items, next_after }))
}

/// How often a live log looks for new rows.
const LOG_POLL: Duration = Duration::from_millis(300);

/// A run's log live: Server-Sent Events, one `log` event per row (its JSON), from
/// `after` (or the `Last-Event-ID` a reconnecting client sends), then an `end` event with
/// the run's status once it has finished and every row was sent.
#[utoipa::path(get, path = "/api/v1/runs/{id}/logs/stream", tag = "runs",
    params(("id" = i64, Path), LogsQuery),
    responses((status = 200, content_type = "text/event-stream", description = "`log` events (LogRow JSON), then `end`"),
        (status = 404, body = Problem)))]
pub async fn stream_logs(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<LogsQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>> {
    caller.require(Role::Viewer)?;
    if state.db(move |s| s.run_status(id)).await?.is_none() {
        return Err(Problem::not_found(format!("run {id} not found")));
    }
    let last_event = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let start = last_event.or(q.after).unwrap_or(0);
    let stop = state.shutdown().clone();
    let stream = async_stream(state, id, start, stop);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn async_stream(
    state: AppState,
    id: i64,
    after: i64,
    stop: tokio_util::sync::CancellationToken,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> {
    // Everything that changes between events is in the state (the closure's captures are
    // copied into each future).
    futures_util::stream::unfold(
        (state, Vec::<Event>::new(), false, after),
        move |(state, mut pending, mut ended, mut after)| {
            let stop = stop.clone();
            async move {
                loop {
                    if let Some(e) = pending.pop() {
                        return Some((Ok(e), (state, pending, ended, after)));
                    }
                    if ended || stop.is_cancelled() {
                        return None;
                    }
                    let from = after;
                    let polled = state
                        .db(move |s| Ok((s.run_status(id)?, s.logs_page(id, from, 500)?)))
                        .await;
                    let Ok((status, rows)) = polled else {
                        // The store did not answer: try again, the stream stays open.
                        tokio::select! {
                            _ = tokio::time::sleep(LOG_POLL) => {}
                            _ = stop.cancelled() => return None,
                        }
                        continue;
                    };
                    let mut batch: Vec<Event> = Vec::new();
                    for row in &rows {
                        after = row.id;
                        if let Ok(e) = Event::default()
                            .event("log")
                            .id(row.id.to_string())
                            .json_data(row)
                        {
                            batch.push(e);
                        }
                    }
                    if rows.is_empty() {
                        match status {
                            Some(s) if s.is_finished() => {
                                ended = true;
                                batch.push(Event::default().event("end").data(s.as_str()));
                            }
                            None => {
                                ended = true;
                                batch.push(Event::default().event("end").data("gone"));
                            }
                            _ => {
                                tokio::select! {
                                    _ = tokio::time::sleep(LOG_POLL) => {}
                                    _ = stop.cancelled() => return None,
                                }
                            }
                        }
                    }
                    batch.reverse();
                    pending = batch;
                }
            }
        },
    )
}

/// Ask a running run to cancel (running steps stop; `always` steps still run). Operators.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = i64, Path)),
    responses((status = 202, body = Done), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel_run(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<Done>)> {
    caller.require(Role::Operator)?;
    let status = state
        .db(move |s| s.run_status(id))
        .await?
        .ok_or_else(|| Problem::not_found(format!("run {id} not found")))?;
    if status.is_finished() {
        return Err(Problem::conflict(format!(
            "run {id} is already {}",
            status.as_str()
        )));
    }
    let asked = state.db(move |s| s.request_cancel(id, Utc::now())).await?;
    crate::log(format!("{} asked run {id} to cancel", caller.actor()));
    Ok((
        StatusCode::ACCEPTED,
        Json(Done {
            changed: asked,
            message: if asked {
                format!("run {id} was asked to cancel; its worker stops it within a second")
            } else {
                format!("run {id} was already asked to cancel")
            },
        }),
    ))
}

/// What a queued repair will do.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RepairQueued {
    pub item: i64,
    /// The repair was already queued.
    pub merged: bool,
    /// The attempt the repair will be.
    pub attempt: u32,
    /// The steps that run again, each with why.
    pub rerun: Vec<RerunStep>,
    /// The steps whose results are reused.
    pub reuse: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema, Clone)]
pub struct RerunStep {
    pub step: String,
    pub why: String,
}

/// Queue the repair of a finished run: its failed, cancelled and skipped steps (and what
/// depends on them) run again as the run's next attempt on a worker, with the run's
/// recorded params. Operators.
#[utoipa::path(post, path = "/api/v1/runs/{id}/repair", tag = "runs",
    params(("id" = i64, Path)),
    responses((status = 202, body = RepairQueued), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "Still running, nothing to repair, or the integration is disabled")))]
pub async fn repair_run(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<RepairQueued>)> {
    caller.require(Role::Operator)?;
    let detail = run(&state, id).await?;
    let planner = state.repairs().ok_or_else(|| {
        Problem::conflict("this server cannot plan repairs (it was started without the runner)")
    })?;
    let plan = state
        .blocking(move |st| planner.plan(st.store().as_ref(), id))
        .await?;
    let pipeline = detail.run.pipeline.clone();
    let integration = {
        let p = pipeline.clone();
        state.db(move |s| s.get_integration(&p)).await?
    };
    if integration.as_ref().is_some_and(|i| !i.enabled) {
        return Err(Problem::conflict(format!(
            "integration `{pipeline}` is disabled; nothing is queued (enable it first)"
        )));
    }
    let e = crate::ops::repair_item(&detail.run, integration.as_ref());
    let q = state.db(move |s| s.enqueue(&e, Utc::now())).await?;
    crate::log(format!(
        "{} queued the repair of run {id} (queue item {})",
        caller.actor(),
        q.id
    ));
    Ok((
        StatusCode::ACCEPTED,
        Json(RepairQueued {
            item: q.id,
            merged: q.merged,
            attempt: detail.run.attempt + 1,
            rerun: plan.rerun,
            reuse: plan.reuse,
        }),
    ))
}

/// What the runner says a repair would do.
pub struct RepairPlan {
    pub rerun: Vec<RerunStep>,
    pub reuse: Vec<String>,
}

/// Plans repairs: the runner's, given by the binary (the server runs no step itself).
pub trait RepairPlanner: Send + Sync {
    /// What repairing run `id` would run again; a 409 or 404 when it cannot be repaired.
    fn plan(&self, store: &dyn store::RunStore, id: i64) -> ApiResult<RepairPlan>;
}
