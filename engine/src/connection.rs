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
//!
//! A run may resolve a connection name to something else than the plan's connection —
//! `--sandbox` points it at a local fake, a service may give stored credentials — without
//! rewriting the validated plan, which stays immutable and shared by concurrent runs: the
//! run carries [`ConnectionOverrides`] (on the template runtime's
//! [`crate::template::Overrides`]) and the executor applies them where a step's connection
//! is rendered. Each kind says how it maps onto the fakes in its own module, through the
//! [`SandboxHook`] it registers with [`ConnectionKind::with_sandbox`], so adding a
//! connection type touches its module and one registry line, never the command line.

use crate::de::{self, Mode};
use crate::diag::Diags;
use crate::model::ConnectionSpec;
use crate::yaml::{Node, Value as YValue};
use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use std::sync::Arc;

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
    /// What a connection of this kind becomes under `--sandbox` (`None`: used as it is).
    pub sandbox: Option<SandboxHook>,
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
            sandbox: None,
        }
    }

    /// The kind with its `--sandbox` mapping onto the local fakes.
    pub fn with_sandbox(mut self, hook: SandboxHook) -> ConnectionKind {
        self.sandbox = Some(hook);
        self
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

    /// What each of `connections` (a plan's) stands for under `--sandbox`, asked of its
    /// kind's [`SandboxHook`] with `fakes` (the values the `sandbox:` block sees:
    /// `tiflux.url`, `demo_db.path` …). The first connection a hook refuses is the error.
    pub fn sandbox_overrides(
        &self,
        connections: &IndexMap<String, ConnectionSpec>,
        fakes: &serde_json::Value,
    ) -> Result<ConnectionOverrides, String> {
        let mut out = IndexMap::new();
        for (name, spec) in connections {
            let Some(hook) = self.get(&spec.kind).and_then(|k| k.sandbox) else {
                continue;
            };
            if let Some(o) = hook(&SandboxTarget { name, spec, fakes })? {
                out.insert(name.clone(), o);
            }
        }
        Ok(ConnectionOverrides(Arc::new(out)))
    }
}

/// What a kind's [`SandboxHook`] is given: one connection of the plan and the fakes.
pub struct SandboxTarget<'a> {
    /// The connection's name in the pipeline.
    pub name: &'a str,
    /// The connection as written (unrendered field values).
    pub spec: &'a ConnectionSpec,
    /// The fakes' values, as the `sandbox:` block sees them (`sandbox.tiflux.url` …).
    pub fakes: &'a serde_json::Value,
}

impl SandboxTarget<'_> {
    /// The stand-in the connection names with `sandbox: <service>`, if any.
    pub fn stand_in(&self) -> Option<&str> {
        self.spec.fields.get("sandbox").and_then(|v| v.as_str())
    }

    /// A fake's value by dotted path (`carol.tenant`); empty when the fakes have none.
    pub fn fake(&self, path: &str) -> String {
        let mut v = self.fakes;
        for part in path.split('.') {
            v = &v[part];
        }
        v.as_str().map(str::to_string).unwrap_or_default()
    }

    /// The error for a `sandbox: <other>` this kind has no fake for.
    pub fn unknown_stand_in(&self, other: &str, known: &[&str]) -> String {
        format!(
            "connection `{}` names an unknown stand-in `sandbox: {other}` (known: {})",
            self.name,
            known.join(", ")
        )
    }
}

/// A kind's `--sandbox` mapping: what the connection becomes (`Ok(None)`: unchanged), or
/// why it cannot run offline.
pub type SandboxHook = fn(&SandboxTarget) -> Result<Option<ConnectionOverride>, String>;

/// What a connection name stands for in one run instead of the plan's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionOverride {
    /// A connection of its own, of these literal fields (`type` included): a database
    /// becomes the demo SQLite file whatever its server.
    Replace(Vec<(String, String)>),
    /// The plan's connection with these fields set to literal values and these removed (a
    /// fake's key file replaces an inline key); the other fields render as written.
    Patch {
        set: Vec<(String, String)>,
        remove: Vec<String>,
    },
}

impl ConnectionOverride {
    /// The connection node a run renders instead of `node` (the plan's, unchanged).
    pub fn apply(&self, node: &Node) -> Node {
        let pos = node.pos;
        let s = |t: &str| Node::new(pos, YValue::String(t.to_string()));
        match self {
            ConnectionOverride::Replace(fields) => Node::new(
                pos,
                YValue::Map(fields.iter().map(|(k, v)| (s(k), s(v))).collect()),
            ),
            ConnectionOverride::Patch { set, remove } => {
                let mut node = node.clone();
                if let YValue::Map(entries) = &mut node.value {
                    entries.retain(|(k, _)| {
                        !k.key_str().is_some_and(|k| remove.iter().any(|r| r == k))
                    });
                    for (field, value) in set {
                        match entries.iter_mut().find(|(k, _)| k.key_str() == Some(field)) {
                            Some((_, v)) => *v = s(value),
                            None => entries.push((s(field), s(value))),
                        }
                    }
                }
                node
            }
        }
    }
}

/// The [`ConnectionOverride`]s of one run, by connection name; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ConnectionOverrides(Arc<IndexMap<String, ConnectionOverride>>);

impl ConnectionOverrides {
    pub fn new(map: IndexMap<String, ConnectionOverride>) -> Self {
        ConnectionOverrides(Arc::new(map))
    }
    pub fn get(&self, name: &str) -> Option<&ConnectionOverride> {
        self.0.get(name)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The node a run renders for connection `name`: the override applied, or the plan's.
    pub fn node<'a>(&self, name: &str, plan_node: &'a Node) -> std::borrow::Cow<'a, Node> {
        match self.get(name) {
            Some(o) => std::borrow::Cow::Owned(o.apply(plan_node)),
            None => std::borrow::Cow::Borrowed(plan_node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        crate::yaml::parse(yaml, &mut Diags::default()).expect("yaml")
    }

    #[test]
    fn a_patch_sets_and_removes_fields_and_leaves_the_plans_node_alone() {
        let plan = node("type: bigquery\nkey_json: x\nproject: p\nlocation: EU\n");
        let before = format!("{:?}", plan.value);
        let o = ConnectionOverride::Patch {
            set: vec![
                ("project".into(), "fake".into()),
                ("key_file".into(), "/k.json".into()),
            ],
            remove: vec!["key_json".into()],
        };
        let json = o.apply(&plan).to_json();
        assert_eq!(
            json,
            serde_json::json!({"type": "bigquery", "project": "fake", "location": "EU", "key_file": "/k.json"})
        );
        assert_eq!(format!("{:?}", plan.value), before);
        let replaced = ConnectionOverride::Replace(vec![
            ("type".into(), "sqlite".into()),
            ("path".into(), "/demo.db".into()),
        ])
        .apply(&plan)
        .to_json();
        assert_eq!(
            replaced,
            serde_json::json!({"type": "sqlite", "path": "/demo.db"})
        );
    }
}
