//! Backfills: one run per scheduled tick of a past range, below the integration's
//! priority, at most `max_parallel` at once; list and cancel.

use super::integrations::integration;
use super::{Body, Json, Path};
use crate::auth::Caller;
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use store::{Backfill, Role};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_backfills, create_backfill))
        .routes(routes!(cancel_backfill))
}

/// Every backfill with its items' counts.
#[utoipa::path(get, path = "/api/v1/backfills", tag = "schedules",
    responses((status = 200, body = Vec<Backfill>)))]
pub async fn list_backfills(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<Backfill>>> {
    caller.require(Role::Viewer)?;
    Ok(Json(state.db(|s| s.list_backfills(None)).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBackfillRequest {
    pub integration: String,
    /// The first instant (RFC 3339): ticks at or after it.
    pub from: DateTime<Utc>,
    /// The last instant (RFC 3339): ticks at or before it.
    pub to: DateTime<Utc>,
    /// Runs of the backfill at once (default 1).
    #[serde(default)]
    pub max_parallel: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BackfillQueued {
    pub id: i64,
    pub integration: String,
    pub runs: usize,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub max_parallel: u32,
}

/// Queue a backfill of a scheduled integration. Operators.
#[utoipa::path(post, path = "/api/v1/backfills", tag = "schedules",
    request_body = NewBackfillRequest,
    responses((status = 201, body = BackfillQueued), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_backfill(
    caller: Caller,
    State(state): State<AppState>,
    Body(req): Body<NewBackfillRequest>,
) -> ApiResult<(StatusCode, Json<BackfillQueued>)> {
    caller.require(Role::Operator)?;
    let max_parallel = req.max_parallel.unwrap_or(1);
    if max_parallel == 0 {
        return Err(Problem::invalid(
            "max_parallel",
            "max_parallel must be at least 1",
        ));
    }
    let i = integration(&state, &req.integration).await?;
    if i.removed || !i.enabled {
        return Err(Problem::conflict(format!(
            "integration `{}` is {}; nothing is queued",
            i.name,
            if i.removed { "removed" } else { "disabled" }
        )));
    }
    let for_plan = i.clone();
    let plan = state.blocking(move |st| st.plans().of(&for_plan)).await?;
    let Some(config) = plan.schedule.as_ref() else {
        return Err(Problem::conflict(format!(
            "integration `{}` has no schedule: a backfill queues one run per scheduled tick (trigger it for a single run)",
            i.name
        )));
    };
    let spec = scheduler::ScheduleSpec::from_config(config)
        .map_err(|e| Problem::conflict(format!("integration `{}`: {e}", i.name)))?;
    let ticks = crate::ops::backfill_ticks(&i.name, &spec, req.from, req.to)
        .map_err(|e| Problem::invalid("to", e))?;
    let (from, to) = (req.from, req.to);
    let name = i.name.clone();
    let queued = ticks.clone();
    let id = state
        .db(move |s| crate::ops::queue_backfill(s, &i, from, to, &queued, max_parallel))
        .await?;
    crate::log(format!(
        "{} queued backfill {id} of {name} ({} runs)",
        caller.actor(),
        ticks.len()
    ));
    Ok((
        StatusCode::CREATED,
        Json(BackfillQueued {
            id,
            integration: name,
            runs: ticks.len(),
            first: ticks[0],
            last: ticks[ticks.len() - 1],
            max_parallel,
        }),
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BackfillCancelled {
    /// Queued runs removed.
    pub removed: u64,
    /// Running runs asked to cancel.
    pub cancelled: u64,
}

/// Cancel a backfill: its queued runs are removed, its running runs asked to cancel. Operators.
#[utoipa::path(post, path = "/api/v1/backfills/{id}/cancel", tag = "schedules",
    params(("id" = i64, Path)),
    responses((status = 200, body = BackfillCancelled), (status = 404, body = Problem)))]
pub async fn cancel_backfill(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<BackfillCancelled>> {
    caller.require(Role::Operator)?;
    let (removed, cancelled) = state
        .db(move |s| crate::ops::cancel_backfill(s, id))
        .await?;
    let out = BackfillCancelled { removed, cancelled };
    Ok(Json(out))
}
