//! `POST /api/v1/token/` (user name and password → access and refresh JWTs),
//! `POST /api/v1/token/refresh/`, `GET /api/v1/me`.

use super::{Body, Json};
use crate::auth::{self, Caller, Principal, TokenKind};
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use store::Role;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(me))
}

/// The client's address, when the server knows it.
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<ClientAddr> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    #[schema(format = Password)]
    pub password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    /// For `Authorization: Bearer …`.
    pub access: String,
    /// For `POST /api/v1/token/refresh/`.
    pub refresh: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds the access token is good for.
    pub expires_in: u64,
    pub refresh_expires_in: u64,
    pub role: Role,
}

/// Log in: a user name and password for an access and a refresh token.
///
/// Failed logins are limited per user name and per client address; past the limit the
/// answer is 429 with `Retry-After`, even for the right password.
#[utoipa::path(post, path = "/api/v1/token/", tag = "auth", security(()),
    request_body = Login,
    responses(
        (status = 200, body = TokenPair),
        (status = 401, body = Problem, description = "Wrong user name or password"),
        (status = 429, body = Problem, description = "Too many failed logins"),
    ))]
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Body(body): Body<Login>,
) -> ApiResult<Json<TokenPair>> {
    let name_key = format!("name:{}", body.username.to_lowercase());
    let mut keys = vec![(name_key.clone(), auth::NAME_LIMIT)];
    if let Some(a) = addr {
        keys.push((format!("addr:{a}"), auth::ADDR_LIMIT));
    }
    if let Some(wait) = state.limiter().blocked(&keys) {
        return Err(Problem::too_many(
            wait,
            format!("too many failed logins; try again in {wait} s"),
        ));
    }
    if body.username.len() > 200 || body.password.len() > auth::MAX_PASSWORD {
        state.limiter().failed(&keys);
        return Err(Problem::unauthorized("wrong user name or password"));
    }
    let name = body.username.clone();
    let user = state.db(move |s| s.accounts().get_user(&name)).await?;
    let password = body.password;
    let ok = state
        .blocking(move |_| {
            Ok(match &user {
                Some(u) if u.user.disabled_at.is_none() => {
                    auth::verify_password(&password, &u.password_hash).then_some(u.user.role)
                }
                // The same work for an unknown or disabled user: no enumeration by timing.
                _ => {
                    auth::verify_password(&password, auth::dummy_hash());
                    None
                }
            })
        })
        .await?;
    let Some(role) = ok else {
        state.limiter().failed(&keys);
        crate::log(format!(
            "refused a login as `{}`{}",
            body.username.escape_debug(),
            addr.map(|a| format!(" from {a}")).unwrap_or_default()
        ));
        return Err(Problem::unauthorized("wrong user name or password"));
    };
    state.limiter().succeeded(&name_key);
    let (access, expires_in) = state.keys().issue(&body.username, TokenKind::Access)?;
    let (refresh, refresh_expires_in) = state.keys().issue(&body.username, TokenKind::Refresh)?;
    Ok(Json(TokenPair {
        access,
        refresh,
        token_type: "Bearer",
        expires_in,
        refresh_expires_in,
        role,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    pub refresh: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AccessToken {
    pub access: String,
    pub token_type: &'static str,
    pub expires_in: u64,
}

/// A new access token for a refresh token (the user must still exist and be enabled).
#[utoipa::path(post, path = "/api/v1/token/refresh/", tag = "auth", security(()),
    request_body = Refresh,
    responses((status = 200, body = AccessToken), (status = 401, body = Problem)))]
pub async fn refresh(
    State(state): State<AppState>,
    Body(body): Body<Refresh>,
) -> ApiResult<Json<AccessToken>> {
    let claims = state.keys().verify(&body.refresh, TokenKind::Refresh)?;
    let caller = state.user_caller(claims.sub, claims.iat).await?;
    let name = caller.user_name().unwrap_or_default().to_string();
    let (access, expires_in) = state.keys().issue(&name, TokenKind::Access)?;
    Ok(Json(AccessToken {
        access,
        token_type: "Bearer",
        expires_in,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Me {
    /// `user` or `token`.
    pub kind: &'static str,
    pub name: String,
    pub role: Role,
}

/// Who the token belongs to.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth",
    responses((status = 200, body = Me), (status = 401, body = Problem)))]
pub async fn me(caller: Caller) -> ApiResult<Json<Me>> {
    caller.require(Role::Viewer)?;
    let (kind, name) = match &caller.who {
        Principal::User(n) => ("user", n.clone()),
        Principal::Token { name, .. } => ("token", name.clone()),
    };
    Ok(Json(Me {
        kind,
        name,
        role: caller.role,
    }))
}
