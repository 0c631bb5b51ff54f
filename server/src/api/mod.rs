//! The REST API under `/api/v1/`. Each handler carries its `#[utoipa::path]`, and the
//! router is built with utoipa-axum's `routes!`, so the OpenAPI document is made from the
//! handlers and their types and cannot list an endpoint that is not routed (or miss one).
//!
//! Roles: viewer reads; operator also triggers, cancels, repairs, enables and disables,
//! backfills and drains; admin also manages users, machine tokens and credentials. Every
//! handler states its role as its first line (`caller.require(Role::…)`), and the test
//! `api::every_endpoint_by_role` walks them all.

pub mod backfills;
pub mod integrations;
pub mod plugins;
pub mod runs;
pub mod tokens;
pub mod users;
pub mod workers;

use crate::problem::Problem;
use crate::AppState;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pipe",
        description = "The REST API of `pipe serve`: integrations, runs and their logs, schedules and backfills, workers, plugins, credentials, users. Authenticate with `Authorization: Bearer <token>`: a JWT from `POST /api/v1/token/` or a machine token. Errors are RFC 9457 problem documents.",
        license(name = "MIT")
    ),
    modifiers(&BearerAuth),
    components(schemas(crate::events::Change)),
    security(("bearer" = [])),
    tags(
        (name = "auth", description = "Tokens"),
        (name = "integrations", description = "The pipelines `pipe serve` loaded"),
        (name = "runs", description = "Runs, their steps and logs"),
        (name = "schedules", description = "Ticks and backfills"),
        (name = "workers", description = "Worker processes"),
        (name = "plugins", description = "Step and credential types"),
        (name = "users", description = "Users, machine tokens, the audit trail (admins)"),
        (name = "events", description = "Live run and step changes"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or pipe_ machine token")
                    .build(),
            ),
        );
    }
}

/// The API's routes with their OpenAPI document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(tokens::router())
        .merge(integrations::router())
        .merge(runs::router())
        .merge(backfills::router())
        .merge(workers::router())
        .merge(plugins::router())
        .merge(users::router())
        .merge(crate::events::router())
}

/// A JSON body whose rejection is a problem document.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(Problem))]
pub struct Body<T>(pub T);

/// Query parameters whose rejection is a problem document.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Problem))]
pub struct Query<T>(pub T);

/// Path parameters whose rejection is a problem document.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Problem))]
pub struct Path<T>(pub T);

impl From<JsonRejection> for Problem {
    fn from(r: JsonRejection) -> Problem {
        let status = r.status();
        let status = if status.is_client_error() {
            status
        } else {
            axum::http::StatusCode::BAD_REQUEST
        };
        Problem::new(status, r.body_text())
    }
}

impl From<QueryRejection> for Problem {
    fn from(r: QueryRejection) -> Problem {
        Problem::bad_request(r.body_text())
    }
}

impl From<PathRejection> for Problem {
    fn from(r: PathRejection) -> Problem {
        Problem::bad_request(r.body_text())
    }
}

/// A JSON response.
pub use axum::Json;

/// One page of a list, newest first; `next_cursor` asks for the next page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T: utoipa::ToSchema> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The default and the largest page size.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;

/// A page size from a query (`limit`), checked.
pub fn page_size(limit: Option<usize>) -> Result<usize, Problem> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(0) => Err(Problem::invalid("limit", "limit must be at least 1")),
        Some(n) if n > MAX_LIMIT => Err(Problem::invalid(
            "limit",
            format!("limit may be at most {MAX_LIMIT}"),
        )),
        Some(n) => Ok(n),
    }
}

/// A short confirmation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Done {
    /// Whether anything changed (false: it was so already).
    pub changed: bool,
    pub message: String,
}

/// A name from a path, checked to be one (no control characters, bounded).
pub fn check_name(what: &str, name: &str) -> Result<(), Problem> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(Problem::bad_request(format!("not a valid {what} name")));
    }
    Ok(())
}
