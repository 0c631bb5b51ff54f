//! `GET /api/v1/plugins`: every step type and every connection (credential) type with its
//! JSON Schema, from the registry `pipe` runs with. Registering a step or a connection
//! type adds it here with no other change (Hopen's auto-registered providers).

use super::Json;
use crate::auth::Caller;
use crate::problem::ApiResult;
use crate::AppState;
use axum::extract::State;
use schemars::generate::SchemaSettings;
use serde::Serialize;
use store::Role;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_plugins))
}

/// A step type.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StepPlugin {
    /// Its `type:`.
    pub name: String,
    pub summary: String,
    /// The JSON Schema (2020-12) of its `with:`.
    #[schema(value_type = Object)]
    pub schema: serde_json::Value,
}

/// A connection type, which is also a credential type.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CredentialPlugin {
    /// Its `type:`.
    pub name: String,
    pub summary: String,
    /// The JSON Schema (2020-12) of the whole connection; its private fields are marked
    /// `writeOnly`.
    #[schema(value_type = Object)]
    pub schema: serde_json::Value,
    /// The fields of the connection that are not private (stored and shown in clear).
    #[schema(value_type = Object)]
    pub public_schema: serde_json::Value,
    /// The private fields (stored encrypted, never shown again).
    #[schema(value_type = Object)]
    pub private_schema: serde_json::Value,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Plugins {
    pub steps: Vec<StepPlugin>,
    pub credentials: Vec<CredentialPlugin>,
}

/// One schema with the definitions it refers to.
fn standalone(
    make: impl FnOnce(&mut schemars::SchemaGenerator) -> schemars::Schema,
) -> serde_json::Value {
    let mut g = SchemaSettings::draft2020_12().into_generator();
    let mut v = make(&mut g).to_value();
    let defs = g.take_definitions(true);
    if !defs.is_empty() {
        if let Some(o) = v.as_object_mut() {
            o.insert("$defs".into(), serde_json::Value::Object(defs));
        }
    }
    v
}

/// Every step type and credential type with its schemas.
#[utoipa::path(get, path = "/api/v1/plugins", tag = "plugins",
    responses((status = 200, body = Plugins)))]
pub async fn list_plugins(
    caller: Caller,
    State(state): State<AppState>,
) -> ApiResult<Json<Plugins>> {
    caller.require(Role::Viewer)?;
    let registry = state.plans().registry();
    let steps = registry
        .kinds()
        .map(|k| StepPlugin {
            name: k.name.to_string(),
            summary: k.summary.to_string(),
            schema: standalone(k.schema),
        })
        .collect();
    // The split into public and private fields is the vault's (its `writeOnly` marks).
    let credentials = registry
        .connections
        .kinds()
        .map(|k| {
            let t = credentials::credential_type(k);
            CredentialPlugin {
                name: t.name,
                summary: t.summary,
                schema: standalone(k.schema),
                public_schema: t.public_schema,
                private_schema: t.private_schema,
            }
        })
        .collect();
    Ok(Json(Plugins { steps, credentials }))
}
