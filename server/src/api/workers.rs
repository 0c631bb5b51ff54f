//! Workers: the `pipe worker` processes (and their state), and draining one.

use super::{check_name, Done, Json, Path};
use crate::auth::Caller;
use crate::problem::ApiResult;
use crate::AppState;
use axum::extract::State;
use chrono::Utc;
use store::{Role, WorkerRow};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_workers))
        .routes(routes!(drain_worker))
}

/// Every worker, newest first, with its state (active, draining, stopped, lost).
#[utoipa::path(get, path = "/api/v1/workers", tag = "workers",
    responses((status = 200, body = Vec<WorkerRow>)))]
pub async fn list_workers(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<WorkerRow>>> {
    caller.require(Role::Viewer)?;
    Ok(Json(state.db(|s| s.list_workers(Utc::now())).await?))
}

/// Ask a worker to finish its current runs and take no more. Operators.
#[utoipa::path(post, path = "/api/v1/workers/{id}/drain", tag = "workers",
    params(("id" = String, Path)),
    responses((status = 200, body = Done), (status = 404, body = crate::problem::Problem)))]
pub async fn drain_worker(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Done>> {
    caller.require(Role::Operator)?;
    check_name("worker", &id)?;
    let w = id.clone();
    let changed = state.db(move |s| s.request_drain(&w, Utc::now())).await?;
    crate::log(format!("{} asked worker {id} to drain", caller.actor()));
    Ok(Json(Done {
        changed,
        message: if changed {
            format!("worker {id} finishes its current runs and takes no more")
        } else {
            format!("worker {id} was already draining or has stopped")
        },
    }))
}
