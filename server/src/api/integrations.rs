//! Integrations: list, show (with next fire times and typed params), enable, disable,
//! trigger (params checked against the pipeline's declarations: 422 naming the param),
//! ticks, and the step graph.

use super::{check_name, Done, Json, Path, Query};
use crate::auth::Caller;
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use engine::params::ParamSpec;
use serde::{Deserialize, Serialize};
use store::{Enqueue, Integration, Role, TickRow, Trigger};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_integrations))
        .routes(routes!(show_integration))
        .routes(routes!(enable_integration))
        .routes(routes!(disable_integration))
        .routes(routes!(trigger_integration))
        .routes(routes!(list_ticks))
        .routes(routes!(integration_graph))
}

/// The integration, or a 404 naming the known ones.
pub async fn integration(state: &AppState, name: &str) -> ApiResult<Integration> {
    check_name("integration", name)?;
    let n = name.to_string();
    let (found, known) = state
        .db(move |s| {
            Ok(match s.get_integration(&n)? {
                Some(i) => (Some(i), Vec::new()),
                None => (
                    None,
                    s.list_integrations()?.into_iter().map(|i| i.name).collect(),
                ),
            })
        })
        .await?;
    found.ok_or_else(|| {
        let hint = engine::diag::did_you_mean(name, known.iter().map(String::as_str))
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        Problem::not_found(format!("no integration `{name}`{hint}"))
    })
}

/// Every integration `pipe serve` loaded, with its state, last and next run.
#[utoipa::path(get, path = "/api/v1/integrations", tag = "integrations",
    responses((status = 200, body = Vec<Integration>), (status = 401, body = Problem)))]
pub async fn list_integrations(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<Integration>>> {
    caller.require(Role::Viewer)?;
    Ok(Json(state.db(|s| s.list_integrations()).await?))
}

/// A declared param of a pipeline.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ParamInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: engine::params::ParamType,
    pub default: Option<serde_json::Value>,
    pub description: Option<String>,
    /// The allowed values of an `enum` param.
    pub values: Option<Vec<String>>,
    /// No default: a trigger must give it.
    pub required: bool,
}

impl ParamInfo {
    pub fn of(name: &str, spec: &ParamSpec) -> ParamInfo {
        ParamInfo {
            name: name.to_string(),
            kind: spec.kind,
            default: spec.default.clone(),
            description: spec.description.clone(),
            values: spec.values.clone(),
            required: spec.default.is_none(),
        }
    }
}

/// An integration with what its file says now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct IntegrationDetail {
    #[serde(flatten)]
    pub integration: Integration,
    /// The schedule, described (`every day at 06:00 in America/Sao_Paulo`).
    pub schedule: Option<String>,
    /// The next fire times (up to 5), when it is enabled and scheduled.
    pub next_fire_times: Vec<DateTime<Utc>>,
    /// Its typed params, in declaration order (a trigger form is built from them).
    pub params: Vec<ParamInfo>,
    /// Why its file cannot be read or validated here now, if so.
    pub plan_error: Option<String>,
}

/// An integration, with its schedule, next fire times and params.
#[utoipa::path(get, path = "/api/v1/integrations/{name}", tag = "integrations",
    params(("name" = String, Path, description = "The integration (its pipeline name)")),
    responses((status = 200, body = IntegrationDetail), (status = 404, body = Problem)))]
pub async fn show_integration(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<IntegrationDetail>> {
    caller.require(Role::Viewer)?;
    let integration = integration(&state, &name).await?;
    let i = integration.clone();
    let plan = state.blocking(move |st| st.plans().of(&i)).await;
    let mut detail = IntegrationDetail {
        integration,
        schedule: None,
        next_fire_times: Vec::new(),
        params: Vec::new(),
        plan_error: None,
    };
    match plan {
        Ok(plan) => {
            detail.params = plan
                .params
                .iter()
                .map(|(n, spec)| ParamInfo::of(n, spec))
                .collect();
            if let Some(cfg) = &plan.schedule {
                match scheduler::ScheduleSpec::from_config(cfg) {
                    Ok(spec) => {
                        detail.schedule = Some(spec.describe());
                        if detail.integration.enabled && !detail.integration.removed {
                            detail.next_fire_times = scheduler::upcoming(&spec, Utc::now(), 5);
                        }
                    }
                    Err(e) => detail.plan_error = Some(e.to_string()),
                }
            }
        }
        Err(p) => detail.plan_error = Some(p.detail),
    }
    Ok(Json(detail))
}

async fn set_enabled(
    caller: Caller,
    state: AppState,
    name: String,
    enabled: bool,
) -> ApiResult<Json<Done>> {
    caller.require(Role::Operator)?;
    integration(&state, &name).await?;
    let n = name.clone();
    let changed = state
        .db(move |s| s.set_enabled(&n, enabled, Utc::now()))
        .await?;
    crate::log(format!(
        "{} {} integration {name}",
        caller.actor(),
        if enabled { "enabled" } else { "disabled" }
    ));
    Ok(Json(Done {
        changed,
        message: match (enabled, changed) {
            (true, true) => format!("integration {name} enabled; its schedule resumes from now"),
            (false, true) => format!(
                "integration {name} disabled: it is neither scheduled nor triggered (running runs finish)"
            ),
            (true, false) => format!("integration {name} was already enabled"),
            (false, false) => format!("integration {name} was already disabled"),
        },
    }))
}

/// Enable an integration (its schedule resumes from now). Operators.
#[utoipa::path(post, path = "/api/v1/integrations/{name}/enable", tag = "integrations",
    params(("name" = String, Path)),
    responses((status = 200, body = Done), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn enable_integration(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Done>> {
    set_enabled(caller, state, name, true).await
}

/// Disable an integration: neither scheduled nor triggered; running runs finish. Operators.
#[utoipa::path(post, path = "/api/v1/integrations/{name}/disable", tag = "integrations",
    params(("name" = String, Path)),
    responses((status = 200, body = Done), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn disable_integration(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Done>> {
    set_enabled(caller, state, name, false).await
}

#[derive(Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// Param values by name, checked against the pipeline's typed params (text is
    /// accepted for any type, as on the command line).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The run's priority in its queue (default: the integration's).
    #[serde(default)]
    pub priority: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Triggered {
    /// The queue item; its run appears in `/api/v1/runs` once a worker starts it.
    pub item: i64,
    /// An identical run was already queued, and this trigger joined it.
    pub merged: bool,
    pub integration: String,
    pub priority: i64,
}

/// Queue a run now, with params. Operators.
#[utoipa::path(post, path = "/api/v1/integrations/{name}/trigger", tag = "integrations",
    params(("name" = String, Path)),
    request_body = TriggerRequest,
    responses(
        (status = 202, body = Triggered),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "Disabled, removed, or its file does not validate"),
        (status = 422, body = Problem, description = "A param is unknown, missing or of the wrong type"),
    ))]
pub async fn trigger_integration(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Triggered>)> {
    caller.require(Role::Operator)?;
    // No body is a trigger without params.
    let req: TriggerRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TriggerRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the body is not a trigger request: {e}"),
            )
        })?
    };
    let i = integration(&state, &name).await?;
    if i.removed {
        return Err(Problem::conflict(format!(
            "integration `{name}`: its file is gone from the served folder; nothing is queued"
        )));
    }
    if !i.enabled {
        return Err(Problem::conflict(format!(
            "integration `{name}` is disabled; nothing is queued (enable it first)"
        )));
    }
    let for_plan = i.clone();
    let plan = state.blocking(move |st| st.plans().of(&for_plan)).await?;
    let params =
        crate::ops::typed_params(&plan, req.params.iter().map(|(k, v)| (k.as_str(), v)), true)
            .map_err(|e| Problem::invalid(format!("params.{}", e.param), e.message))?;
    let mut e = Enqueue::new(&i.name, Trigger::Manual);
    e.queue = i.queue.clone();
    e.priority = req.priority.unwrap_or(i.priority);
    e.params = serde_json::Value::Object(params);
    let priority = e.priority;
    let q = state.db(move |s| s.enqueue(&e, Utc::now())).await?;
    crate::log(format!(
        "{} triggered {} (queue item {})",
        caller.actor(),
        i.name,
        q.id
    ));
    Ok((
        StatusCode::ACCEPTED,
        Json(Triggered {
            item: q.id,
            merged: q.merged,
            integration: i.name,
            priority,
        }),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TicksQuery {
    /// At most this many (default 50, at most 500), newest first.
    pub limit: Option<usize>,
}

/// The schedule's recorded ticks (planned, queued or skipped), newest first.
#[utoipa::path(get, path = "/api/v1/integrations/{name}/ticks", tag = "schedules",
    params(("name" = String, Path), TicksQuery),
    responses((status = 200, body = Vec<TickRow>), (status = 404, body = Problem)))]
pub async fn list_ticks(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<TicksQuery>,
) -> ApiResult<Json<Vec<TickRow>>> {
    caller.require(Role::Viewer)?;
    let limit = super::page_size(q.limit)?;
    integration(&state, &name).await?;
    Ok(Json(state.db(move |s| s.list_ticks(&name, limit)).await?))
}

/// A pipeline's steps and the edges between them (`from` runs before `to`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Graph {
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct GraphNode {
    pub id: String,
    /// The step type (`http.extract`).
    #[serde(rename = "type")]
    pub kind: String,
    /// An `always: true` step (teardown): runs whatever happened before.
    pub always: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
}

impl Graph {
    pub fn of(plan: &engine::plan::Plan) -> Graph {
        Graph {
            nodes: plan
                .steps
                .iter()
                .map(|s| GraphNode {
                    id: s.id.clone(),
                    kind: s.kind.name.to_string(),
                    always: s.spec.always,
                })
                .collect(),
            edges: plan
                .steps
                .iter()
                .flat_map(|s| {
                    s.deps.iter().map(move |&d| GraphEdge {
                        from: plan.steps[d].id.clone(),
                        to: s.id.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// The integration's step graph (of its file as it is now).
#[utoipa::path(get, path = "/api/v1/integrations/{name}/graph", tag = "integrations",
    params(("name" = String, Path)),
    responses((status = 200, body = Graph), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn integration_graph(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Graph>> {
    caller.require(Role::Viewer)?;
    let i = integration(&state, &name).await?;
    let plan = state.blocking(move |st| st.plans().of(&i)).await?;
    Ok(Json(Graph::of(&plan)))
}
