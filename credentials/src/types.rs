//! Credential types: every registered connection kind, its keys split in two by the
//! `writeOnly` marks of its own config struct.
//!
//! Why the split comes from the struct: the struct is what the steps read a connection
//! into and what `pipe schema` describes, so a key is private exactly where its field says
//! so (`#[schemars(extend("writeOnly" = true))]`), next to its doc comment, and a new
//! connection kind is a credential type with no list to keep in step. `writeOnly` is JSON
//! Schema's own word for "sent, never returned": a form built from the schema shows such a
//! field empty, which is what the API and the dashboard do.

use engine::connection::{ConnectionKind, Connections};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// A credential type: a connection kind, with the JSON Schemas of its public part (kept
/// in clear, shown) and of its private part (sealed, write-only).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CredentialType {
    /// The connection `type:` (`carol`, `postgres` …).
    pub name: String,
    /// One line about it.
    pub summary: String,
    /// The public keys: a JSON Schema of an object.
    pub public_schema: Value,
    /// The private keys: a JSON Schema of an object, each property `writeOnly`.
    pub private_schema: Value,
}

impl CredentialType {
    /// The public keys, in the struct's order.
    pub fn public_fields(&self) -> Vec<String> {
        keys(&self.public_schema)
    }
    /// The private keys, in the struct's order.
    pub fn private_fields(&self) -> Vec<String> {
        keys(&self.private_schema)
    }
    /// Keys at any depth of the private part that hold secrets (`writeOnly` anywhere below a
    /// private key: `token` inside `auth`), for the redactor.
    pub(crate) fn secret_keys(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        write_only_names(&self.private_schema, &mut out);
        out
    }
}

fn keys(schema: &Value) -> Vec<String> {
    schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn write_only_names(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            if let Some(props) = o.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    if is_write_only(p) {
                        out.insert(k.clone());
                    }
                }
            }
            o.values().for_each(|x| write_only_names(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| write_only_names(x, out)),
        _ => {}
    }
}

fn is_write_only(schema: &Value) -> bool {
    schema.get("writeOnly").and_then(Value::as_bool) == Some(true)
}

/// Every credential type: one per connection kind of `connections`, in their order.
pub fn types(connections: &Connections) -> Vec<CredentialType> {
    connections.kinds().map(credential_type).collect()
}

/// The credential type of one connection kind.
pub fn credential_type(kind: &ConnectionKind) -> CredentialType {
    let mut g = schemars::SchemaGenerator::default();
    let root = (kind.schema)(&mut g).to_value();
    let defs: Map<String, Value> = g
        .definitions()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The kind's struct, wherever the generator put it.
    let body = root
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| defs.get(name))
        .cloned()
        .unwrap_or(root);
    let required: BTreeSet<&str> = body["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let (mut public, mut private) = (Map::new(), Map::new());
    if let Some(props) = body["properties"].as_object() {
        for (k, p) in props {
            // `type` is the credential's type itself.
            if k == "type" {
                continue;
            }
            if is_write_only(p) {
                private.insert(k.clone(), p.clone());
            } else {
                public.insert(k.clone(), p.clone());
            }
        }
    }
    let part = |props: Map<String, Value>, which: &str| {
        let req: Vec<&str> = props
            .keys()
            .map(String::as_str)
            .filter(|k| required.contains(k))
            .collect();
        let mut s = serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": format!("{} credential ({which})", kind.name),
            "description": kind.summary,
            "type": "object",
            "properties": props,
            "additionalProperties": false,
        });
        if !req.is_empty() {
            s["required"] = serde_json::json!(req);
        }
        // Only the definitions this part refers to.
        let used = used_defs(&s, &defs);
        if !used.is_empty() {
            s["$defs"] = Value::Object(used);
        }
        s
    };
    CredentialType {
        name: kind.name.to_string(),
        summary: kind.summary.to_string(),
        public_schema: part(public, "public"),
        private_schema: part(private, "private"),
    }
}

/// The definitions `schema` refers to, transitively.
fn used_defs(schema: &Value, defs: &Map<String, Value>) -> Map<String, Value> {
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                    if let Some(name) = r.strip_prefix("#/$defs/") {
                        out.push(name.to_string());
                    }
                }
                o.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut todo = Vec::new();
    refs(schema, &mut todo);
    let mut used = Map::new();
    while let Some(name) = todo.pop() {
        if used.contains_key(&name) {
            continue;
        }
        if let Some(d) = defs.get(&name) {
            refs(d, &mut todo);
            used.insert(name, d.clone());
        }
    }
    used
}
