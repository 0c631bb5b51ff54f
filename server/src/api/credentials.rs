//! Stored credentials (admins): list, show (public part and the names of the private
//! fields set), save (validated against the type: 422 naming the field), delete. Private
//! values are write-only: sent in a save, never in any answer; a private field left out of
//! a save keeps its stored value. Every change is audited by the vault.

use super::{Body, Done, Json, Path};
use crate::auth::Caller;
use crate::problem::{ApiResult, Problem};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use credentials::{CredentialError, CredentialInfo};
use serde::{Deserialize, Serialize};
use store::Role;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_credentials))
        .routes(routes!(show_credential, save_credential, delete_credential))
}

/// A credential as anyone may see it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Credential {
    pub name: String,
    /// The credential (connection) type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The public fields.
    #[schema(value_type = Object)]
    pub public: serde_json::Map<String, serde_json::Value>,
    /// The names of the private fields that are set (never their values).
    pub private_fields: Vec<String>,
    /// The id of the master key that sealed them.
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

impl From<CredentialInfo> for Credential {
    fn from(c: CredentialInfo) -> Credential {
        Credential {
            name: c.name,
            kind: c.kind,
            public: c.public,
            private_fields: c.private_fields,
            key_id: c.key_id,
            created_at: c.created_at,
            updated_at: c.updated_at,
            updated_by: c.updated_by,
        }
    }
}

/// A credential error as a problem (never with a value in it: the vault's messages name
/// fields and credentials only).
fn problem(e: CredentialError) -> Problem {
    match e {
        CredentialError::Invalid { field, message } => Problem::invalid(
            if field.is_empty() {
                "private".to_string()
            } else {
                field.clone()
            },
            if field.is_empty() {
                message
            } else {
                format!("`{field}`: {message}")
            },
        ),
        e @ CredentialError::UnknownType { .. } => Problem::invalid("type", e.to_string()),
        e @ CredentialError::InvalidName(_) => Problem::invalid("name", e.to_string()),
        e @ CredentialError::NotFound(_) => Problem::not_found(e.to_string()),
        e @ (CredentialError::NoMasterKey
        | CredentialError::WrongKey { .. }
        | CredentialError::Unreadable(_)
        | CredentialError::BadKey(_)) => Problem::conflict(e.to_string()),
        CredentialError::Store(e) => Problem::from(e),
        other => Problem::unavailable(other),
    }
}

async fn vault<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&credentials::Vault) -> Result<T, CredentialError> + Send + 'static,
) -> ApiResult<T> {
    state
        .blocking(move |st| f(st.vault()).map_err(problem))
        .await
}

/// Every stored credential (public parts only).
#[utoipa::path(get, path = "/api/v1/credentials", tag = "credentials",
    responses((status = 200, body = Vec<Credential>)))]
pub async fn list_credentials(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<Credential>>> {
    caller.require(Role::Admin)?;
    let list = vault(&state, |v| v.list()).await?;
    Ok(Json(list.into_iter().map(Credential::from).collect()))
}

/// A credential's public part and the names of its private fields.
#[utoipa::path(get, path = "/api/v1/credentials/{name}", tag = "credentials",
    params(("name" = String, Path)),
    responses((status = 200, body = Credential), (status = 404, body = Problem)))]
pub async fn show_credential(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Credential>> {
    caller.require(Role::Admin)?;
    let n = name.clone();
    vault(&state, move |v| v.show(&n))
        .await?
        .map(|c| Json(c.into()))
        .ok_or_else(|| Problem::not_found(format!("no credential `{name}`")))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveCredential {
    /// The credential (connection) type: one of `GET /api/v1/plugins`' credentials.
    #[serde(rename = "type")]
    pub kind: String,
    /// The public fields (replace the stored ones).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub public: serde_json::Map<String, serde_json::Value>,
    /// The private fields to set; one left out keeps its stored value, `null` removes it.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub private: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SavedCredential {
    pub created: bool,
    /// The names of the fields that changed.
    pub changed: Vec<String>,
    pub credential: Credential,
}

/// Save a credential (create or replace), validated against its type. Admins.
#[utoipa::path(put, path = "/api/v1/credentials/{name}", tag = "credentials",
    params(("name" = String, Path)), request_body = SaveCredential,
    responses((status = 200, body = SavedCredential), (status = 201, body = SavedCredential),
        (status = 409, body = Problem, description = "No master key, or the stored value does not open with it"),
        (status = 422, body = Problem, description = "A field does not check against the type")))]
pub async fn save_credential(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Body(req): Body<SaveCredential>,
) -> ApiResult<(StatusCode, Json<SavedCredential>)> {
    caller.require(Role::Admin)?;
    let actor = caller.actor();
    let n = name.clone();
    let (saved, info) = vault(&state, move |v| {
        let saved = v.set(&n, &req.kind, req.public, req.private, &actor)?;
        let info = v
            .show(&n)?
            .ok_or_else(|| CredentialError::NotFound(n.clone()))?;
        Ok((saved, info))
    })
    .await?;
    crate::log(format!(
        "{} saved credential {name} ({} field(s) changed)",
        caller.actor(),
        saved.changed.len()
    ));
    Ok((
        if saved.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(SavedCredential {
            created: saved.created,
            changed: saved.changed,
            credential: info.into(),
        }),
    ))
}

/// Delete a credential. Admins.
#[utoipa::path(delete, path = "/api/v1/credentials/{name}", tag = "credentials",
    params(("name" = String, Path)),
    responses((status = 200, body = Done), (status = 404, body = Problem)))]
pub async fn delete_credential(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Done>> {
    caller.require(Role::Admin)?;
    let actor = caller.actor();
    let n = name.clone();
    if !vault(&state, move |v| v.delete(&n, &actor)).await? {
        return Err(Problem::not_found(format!("no credential `{name}`")));
    }
    Ok(Json(Done {
        changed: true,
        message: format!("credential {name} deleted"),
    }))
}
