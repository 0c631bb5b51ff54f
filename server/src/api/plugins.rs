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

/// Split an object schema by its properties' `writeOnly` marks: (public, private).
pub fn split_private(schema: &serde_json::Value) -> (serde_json::Value, serde_json::Value) {
    let resolve = |p: &serde_json::Value| -> bool {
        if p.get("writeOnly").and_then(|w| w.as_bool()) == Some(true) {
            return true;
        }
        // `Option<T>` fields come as `anyOf`/`$ref` wrappers: look one level in.
        p.get("anyOf")
            .or_else(|| p.get("oneOf"))
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.get("writeOnly").and_then(|w| w.as_bool()) == Some(true))
            })
    };
    let mut public = serde_json::Map::new();
    let mut private = serde_json::Map::new();
    let required: Vec<String> = schema
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| {
            r.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (k, p) in props {
            if resolve(p) {
                private.insert(k.clone(), p.clone());
            } else {
                public.insert(k.clone(), p.clone());
            }
        }
    }
    let part = |props: serde_json::Map<String, serde_json::Value>| {
        let req: Vec<&String> = required.iter().filter(|r| props.contains_key(*r)).collect();
        let mut o = serde_json::json!({"type": "object", "properties": props, "required": req});
        if let Some(defs) = schema.get("$defs") {
            o["$defs"] = defs.clone();
        }
        o
    };
    (part(public), part(private))
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
    let credentials = registry
        .connections
        .kinds()
        .map(|k| {
            let schema = standalone(k.schema);
            let (public_schema, private_schema) = split_private(&schema);
            CredentialPlugin {
                name: k.name.to_string(),
                summary: k.summary.to_string(),
                schema,
                public_schema,
                private_schema,
            }
        })
        .collect();
    Ok(Json(Plugins { steps, credentials }))
}
