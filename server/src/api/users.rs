//! Users, machine tokens and the audit trail: admins only. A machine token is shown once,
//! in the answer that creates it, and stored as its SHA-256.

use super::{check_name, Body, Done, Json, Path, Query};
use crate::auth::{self, Caller};
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use store::{ApiTokenRow, AuditRow, Role, UserRow};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, add_user))
        .routes(routes!(show_user, update_user, delete_user))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(list_audit))
}

/// A user name: letters, digits, `._-@`, at most 64.
pub fn check_user_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Problem::invalid(
            "name",
            "a user name is 1 to 64 letters, digits and . _ - @",
        ))
    }
}

fn role_of(field: &str, text: &str) -> ApiResult<Role> {
    text.parse().map_err(|e: String| Problem::invalid(field, e))
}

/// Every user.
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = Vec<UserRow>), (status = 403, body = Problem)))]
pub async fn list_users(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<UserRow>>> {
    caller.require(Role::Admin)?;
    Ok(Json(state.db(|s| s.accounts().list_users()).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// At least 8 characters.
    #[schema(format = Password)]
    pub password: String,
}

/// Add a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = UserRow), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn add_user(
    caller: Caller,
    State(state): State<AppState>,
    Body(req): Body<NewUser>,
) -> ApiResult<(StatusCode, Json<UserRow>)> {
    caller.require(Role::Admin)?;
    check_user_name(&req.name)?;
    let role = role_of("role", &req.role)?;
    auth::check_password(&req.password)?;
    let actor = caller.actor();
    let name = req.name.clone();
    let user = state
        .blocking(move |st| {
            let hash = auth::hash_password(&req.password)
                .map_err(|e| Problem::invalid("password", e.to_string()))?;
            st.store()
                .accounts()
                .add_user(&req.name, &hash, role, &actor, Utc::now())?;
            st.store()
                .accounts()
                .get_user(&req.name)?
                .map(|u| u.user)
                .ok_or_else(|| Problem::unavailable("the new user vanished"))
        })
        .await?;
    crate::log(format!("{} added user {name} ({role})", caller.actor()));
    Ok((StatusCode::CREATED, Json(user)))
}

/// A user.
#[utoipa::path(get, path = "/api/v1/users/{name}", tag = "users", params(("name" = String, Path)),
    responses((status = 200, body = UserRow), (status = 404, body = Problem)))]
pub async fn show_user(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<UserRow>> {
    caller.require(Role::Admin)?;
    check_name("user", &name)?;
    let n = name.clone();
    state
        .db(move |s| s.accounts().get_user(&n))
        .await?
        .map(|u| Json(u.user))
        .ok_or_else(|| Problem::not_found(format!("no user `{name}`")))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    pub role: Option<String>,
    #[schema(format = Password)]
    pub password: Option<String>,
    pub disabled: Option<bool>,
}

/// Change a user's role, password or disabled flag. An admin cannot take away their own
/// admin role or disable themselves (someone must be left to manage users).
#[utoipa::path(patch, path = "/api/v1/users/{name}", tag = "users", params(("name" = String, Path)),
    request_body = UserChange,
    responses((status = 200, body = UserRow), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn update_user(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Body(req): Body<UserChange>,
) -> ApiResult<Json<UserRow>> {
    caller.require(Role::Admin)?;
    check_name("user", &name)?;
    let role = req
        .role
        .as_deref()
        .map(|r| role_of("role", r))
        .transpose()?;
    if let Some(p) = &req.password {
        auth::check_password(p)?;
    }
    let myself = caller.user_name() == Some(name.as_str());
    if myself && (role.is_some_and(|r| r < Role::Admin) || req.disabled == Some(true)) {
        return Err(Problem::conflict(
            "you cannot take away your own admin role or disable yourself; another admin can",
        ));
    }
    let actor = caller.actor();
    let user = state
        .blocking(move |st| {
            let a = st.store().accounts();
            if a.get_user(&name)?.is_none() {
                return Err(Problem::not_found(format!("no user `{name}`")));
            }
            let now = Utc::now();
            if let Some(r) = role {
                a.set_role(&name, r, &actor, now)?;
            }
            if let Some(p) = &req.password {
                let hash = auth::hash_password(p)
                    .map_err(|e| Problem::invalid("password", e.to_string()))?;
                a.set_password(&name, &hash, &actor, now)?;
            }
            if let Some(d) = req.disabled {
                a.set_user_disabled(&name, d, &actor, now)?;
            }
            a.get_user(&name)?
                .map(|u| u.user)
                .ok_or_else(|| Problem::not_found(format!("no user `{name}`")))
        })
        .await?;
    Ok(Json(user))
}

/// Remove a user (not yourself).
#[utoipa::path(delete, path = "/api/v1/users/{name}", tag = "users", params(("name" = String, Path)),
    responses((status = 200, body = Done), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_user(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Done>> {
    caller.require(Role::Admin)?;
    check_name("user", &name)?;
    if caller.user_name() == Some(name.as_str()) {
        return Err(Problem::conflict(
            "you cannot delete yourself; another admin can",
        ));
    }
    let actor = caller.actor();
    let n = name.clone();
    let changed = state
        .db(move |s| s.accounts().delete_user(&n, &actor, Utc::now()))
        .await?;
    if !changed {
        return Err(Problem::not_found(format!("no user `{name}`")));
    }
    Ok(Json(Done {
        changed,
        message: format!("user {name} deleted"),
    }))
}

/// Every machine token (never the token itself).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "users",
    responses((status = 200, body = Vec<ApiTokenRow>)))]
pub async fn list_tokens(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<ApiTokenRow>>> {
    caller.require(Role::Admin)?;
    Ok(Json(state.db(|s| s.accounts().list_api_tokens()).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// What it is for (`ci`, `grafana`).
    pub name: String,
    pub role: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The token: shown this once, stored only as its hash.
    pub token: String,
}

/// Create a machine token; the answer is the only time it is shown.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "users", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 422, body = Problem)))]
pub async fn create_token(
    caller: Caller,
    State(state): State<AppState>,
    Body(req): Body<NewToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    caller.require(Role::Admin)?;
    if req.name.trim().is_empty() || req.name.len() > 100 || req.name.chars().any(char::is_control)
    {
        return Err(Problem::invalid(
            "name",
            "a token's name is 1 to 100 characters",
        ));
    }
    let role = role_of("role", &req.role)?;
    let (token, hash) = auth::new_api_token();
    let actor = caller.actor();
    let name = req.name.clone();
    let id = state
        .db(move |s| {
            s.accounts()
                .add_api_token(&name, &hash, role, &actor, Utc::now())
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            name: req.name,
            role,
            token,
        }),
    ))
}

/// Revoke a machine token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "users", params(("id" = i64, Path)),
    responses((status = 200, body = Done), (status = 404, body = Problem)))]
pub async fn revoke_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Done>> {
    caller.require(Role::Admin)?;
    let actor = caller.actor();
    let changed = state
        .db(move |s| s.accounts().revoke_api_token(id, &actor, Utc::now()))
        .await?;
    if !changed {
        return Err(Problem::not_found(format!("no live machine token {id}")));
    }
    Ok(Json(Done {
        changed,
        message: format!("machine token {id} revoked"),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub cursor: Option<i64>,
    pub limit: Option<usize>,
}

/// The audit trail, newest first: who changed which user, token or credential, and when.
#[utoipa::path(get, path = "/api/v1/audit", tag = "users", params(AuditQuery),
    responses((status = 200, body = super::Page<AuditRow>)))]
pub async fn list_audit(
    caller: Caller,
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<super::Page<AuditRow>>> {
    caller.require(Role::Admin)?;
    let limit = super::page_size(q.limit)?;
    let mut items = state
        .db(move |s| s.accounts().list_audit(q.cursor, limit + 1))
        .await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(super::Page { items, next_cursor }))
}
