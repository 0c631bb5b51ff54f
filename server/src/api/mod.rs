//! The REST API under `/api/v1/`. Each handler carries its `#[utoipa::path]`, and the
//! router is built with utoipa-axum's `routes!`, so the OpenAPI document is made from the
//! handlers and their types and cannot list an endpoint that is not routed (or miss one).
//!
//! Roles: viewer reads; operator also triggers, cancels, repairs, enables and disables,
//! backfills and drains; admin also manages users, machine tokens and credentials. Every
//! handler states its role as its first line (`caller.require(Role::…)`), and the test
//! `api::every_endpoint_by_role` walks them all.

pub mod backfills;
pub mod credentials;
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
        (name = "credentials", description = "Stored credentials (admins); private values are write-only"),
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

/// Every operation answers problem documents as `application/problem+json`, and may answer
/// the statuses any request can meet (bad syntax, no or a too-small token, a body too large,
/// bad values, too many logins, the store away): documented once here, not per handler.
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let problem = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build()
        };
        let common: [(&str, &str); 7] = [
            ("400", "The request is malformed"),
            ("401", "No token, or not a valid one"),
            ("403", "The token's role is too small"),
            ("413", "The body is too large"),
            ("422", "A value is not acceptable (`field` names it)"),
            ("429", "Too many failed logins"),
            ("503", "The store did not answer"),
        ];
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                let responses = &mut op.responses.responses;
                for resp in responses.values_mut() {
                    if let RefOr::T(r) = resp {
                        if let Some(c) = r.content.shift_remove("application/json") {
                            let is_problem = serde_json::to_string(&c.schema)
                                .is_ok_and(|s| s.contains("#/components/schemas/Problem"));
                            let key = if is_problem {
                                "application/problem+json"
                            } else {
                                "application/json"
                            };
                            r.content.insert(key.to_string(), c);
                        }
                    }
                }
                if op.request_body.is_some() {
                    responses.entry("415".to_string()).or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description("The body is not `application/json`")
                                .content("application/problem+json", problem())
                                .build(),
                        )
                    });
                }
                for (status, why) in common {
                    responses.entry(status.to_string()).or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(why)
                                .content("application/problem+json", problem())
                                .build(),
                        )
                    });
                }
            }
        }
    }
}

/// The API's routes and its finished OpenAPI document.
pub fn parts() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (routes, mut openapi) = router().split_for_parts();
    // After the routes are in: a modifier of `ApiDoc` would run before they are.
    ProblemResponses.modify(&mut openapi);
    (routes, openapi)
}

/// The API's routes with their OpenAPI document (as the handlers declare it).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(tokens::router())
        .merge(integrations::router())
        .merge(runs::router())
        .merge(backfills::router())
        .merge(workers::router())
        .merge(plugins::router())
        .merge(users::router())
        .merge(credentials::router())
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
