//! Connection kinds: the typed `connections:` of a pipeline, checked like steps.
//!
//! The engine knows no concrete kind. The `steps` crate registers one [`ConnectionKind`] per
//! `type:` (`http`, `postgres`, `bigquery` …) with the config struct its steps read the
//! rendered connection into (serde with `deny_unknown_fields`, schemars). `pipe validate`
//! deserializes each connection into that struct with [`crate::de`], so an unknown type
//! (E006), an unknown key (E003), a wrong type (E004) or a missing required key (E005) is
//! reported at its line and column with a did-you-mean, as for a step's `with:`; templated
//! scalars stand in for any type (they are checked again when the step reads the rendered
//! connection). Rules between keys (`username` and `password`, or `api_key`) are the
//! struct's [`ConnectionConfig::problems`], reported at their keys like a step's.

use crate::de::{self, Mode};
use crate::diag::Diags;
use crate::yaml::Node;
use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;

/// The struct a connection type is read into.
pub trait ConnectionConfig: DeserializeOwned + JsonSchema {
    /// Rules serde cannot express (keys that need each other), as a step's
    /// [`crate::step::StepConfig::problems`]; the steps that read the connection check the
    /// same list at run time.
    fn problems(&self) -> Vec<crate::step::Problem> {
        Vec::new()
    }
}

/// A registered connection type.
#[derive(Clone)]
pub struct ConnectionKind {
    /// The `type:` string.
    pub name: &'static str,
    /// One line for the schema's descriptions.
    pub summary: &'static str,
    /// The JSON Schema of the whole connection (its `type` included).
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    /// Check an unrendered connection node; false when it cannot be read.
    pub check: fn(&Node, &mut Diags) -> bool,
}

impl ConnectionKind {
    /// The kind `name`, read into `C` (the struct the steps read it with at run time).
    pub fn of<C: ConnectionConfig>(name: &'static str, summary: &'static str) -> ConnectionKind {
        ConnectionKind {
            name,
            summary,
            schema: |g| g.subschema_for::<C>(),
            check: |node, diags| match de::from_map_tolerant::<C>(node, Mode::Check, diags) {
                Some(config) => {
                    crate::step::report_problems(&config.problems(), node, diags);
                    true
                }
                None => false,
            },
        }
    }
}

/// Every connection type `pipe` knows, by name.
#[derive(Clone, Default)]
pub struct Connections {
    kinds: IndexMap<&'static str, ConnectionKind>,
}

impl Connections {
    pub fn register(&mut self, kind: ConnectionKind) -> &mut Self {
        self.kinds.insert(kind.name, kind);
        self
    }
    pub fn get(&self, name: &str) -> Option<&ConnectionKind> {
        self.kinds.get(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
    pub fn kinds(&self) -> impl Iterator<Item = &ConnectionKind> {
        self.kinds.values()
    }
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}
