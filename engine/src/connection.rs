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
//!
//! Stored credentials (`credential: NAME` on a connection, any kind): `pipe validate`
//! checks such a connection without asking for the keys the credential will provide (no
//! E005, no rules between keys; unknown keys and wrong values are still errors), since
//! validation touches no store and no key. A run resolves the name into a
//! [`ConnectionOverride::Fill`], whose stored values are set after the connection renders:
//! they are literals (a password holding `{{` is not a template) and keep their JSON types.
//! The same struct is the credential's schema and its check ([`ConnectionKind::verify`]),
//! so what can be saved is exactly what the steps read.

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
    /// Check a connection of literal values (a stored credential, `type` included) as the
    /// steps will read it: every problem, each at the key it is about (`""`: the whole).
    pub verify: fn(&serde_json::Value) -> Vec<crate::step::Problem>,
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
            check: |node, diags| {
                if node.get(CREDENTIAL_KEY).is_some() {
                    return check_with_credential::<C>(node, diags);
                }
                match de::from_map_tolerant::<C>(node, Mode::Check, diags) {
                    Some(config) => {
                        crate::step::report_problems(&config.problems(), node, diags);
                        true
                    }
                    None => false,
                }
            },
            verify: verify::<C>,
            sandbox: None,
        }
    }

    /// The kind with its `--sandbox` mapping onto the local fakes.
    pub fn with_sandbox(mut self, hook: SandboxHook) -> ConnectionKind {
        self.sandbox = Some(hook);
        self
    }
}

/// The key that names a stored credential on a connection of any kind.
pub const CREDENTIAL_KEY: &str = "credential";

/// Whether `name` may name a stored credential: `[a-z0-9][a-z0-9_.-]{0,63}` (it appears in
/// pipeline files, URLs and audit targets as it is).
pub fn is_credential_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c))
}

/// [`ConnectionKind::check`] of a connection with `credential: NAME`: the name must be a
/// literal credential name; the other keys are checked as usual except that none is
/// required and the rules between keys wait for the run (the credential fills them in).
fn check_with_credential<C: ConnectionConfig>(node: &Node, diags: &mut Diags) -> bool {
    let mut rest = node.clone();
    if let YValue::Map(entries) = &mut rest.value {
        entries.retain(|(k, _)| k.key_str() != Some(CREDENTIAL_KEY));
    }
    if let Some(v) = node.get(CREDENTIAL_KEY) {
        let ok = v.as_str().is_some_and(is_credential_name);
        if !ok {
            diags.push(
                v.pos,
                crate::diag::Code::InvalidValue,
                "`credential` names a stored credential (`pipe credentials list`): a name \
                 like `carol-prod` ([a-z0-9][a-z0-9_.-]*), not a template",
            );
        }
    }
    let mut local = Diags::new(&diags.file);
    let read = de::from_map_tolerant::<C>(&rest, Mode::Check, &mut local).is_some();
    for d in local.items {
        // (The tolerant reader may meet an unknown key on each of its tries.)
        if d.code != crate::diag::Code::MissingKey && !diags.items.contains(&d) {
            diags.items.push(d);
        }
    }
    read
}

/// [`ConnectionKind::verify`]: `value` read into `C` as the steps read a rendered
/// connection, then `C`'s own rules.
fn verify<C: ConnectionConfig>(value: &serde_json::Value) -> Vec<crate::step::Problem> {
    use crate::diag::{Code, Pos};
    use crate::step::Problem;
    let Some(fields) = value.as_object() else {
        return vec![Problem::at(
            "",
            "a connection is a mapping of keys to values",
        )];
    };
    // Each top-level entry on a line of its own, so a problem's line says its key.
    let at = |line| Pos { line, col: 1 };
    let keys: Vec<&String> = fields.keys().collect();
    let node = Node::new(
        at(1),
        YValue::Map(
            fields
                .iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    (
                        Node::new(at(i + 2), YValue::String(k.clone())),
                        Node::from_json(at(i + 2), v),
                    )
                })
                .collect(),
        ),
    );
    let mut diags = Diags::new("");
    let config = de::from_node::<C>(&node, Mode::Run, &mut diags);
    let mut out: Vec<Problem> = diags
        .items
        .iter()
        .map(|d| {
            let field = match keys.get(d.line.wrapping_sub(2)) {
                Some(k) => k.to_string(),
                // A missing key is reported at the mapping: its message names it.
                None if d.code == Code::MissingKey => {
                    d.message.split('`').nth(1).unwrap_or_default().to_string()
                }
                None => String::new(),
            };
            Problem::at(&field, d.message.clone())
        })
        .collect();
    if config.is_none() {
        return out;
    }
    // The steps read a rendered connection with serde_json, stricter than the YAML reader
    // (a number is no string there): the key at fault is the one whose absence changes
    // the verdict.
    match serde_json::from_value::<C>(value.clone()) {
        Ok(config) => out.extend(config.problems()),
        Err(e) => {
            let message = e.to_string();
            let field = keys
                .iter()
                .find(|k| {
                    let mut less = fields.clone();
                    less.remove(k.as_str());
                    serde_json::from_value::<C>(serde_json::Value::Object(less))
                        .map_or_else(|e| e.to_string() != message, |_| true)
                })
                .map(|k| k.to_string())
                .unwrap_or_default();
            out.push(Problem::at(&field, message));
        }
    }
    out
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
#[derive(Clone, PartialEq, Eq)]
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
    /// The plan's connection filled in with stored values (a credential's fields): the
    /// fields `remove` names (`credential`) are dropped before it renders, and after it
    /// renders each stored field the plan does not write itself is set, as it is: never read
    /// as a template, its JSON type kept. Its `Debug` shows the fields' names only.
    Fill {
        values: serde_json::Map<String, serde_json::Value>,
        remove: Vec<String>,
    },
}

impl std::fmt::Debug for ConnectionOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionOverride::Replace(fields) => f.debug_tuple("Replace").field(fields).finish(),
            ConnectionOverride::Patch { set, remove } => f
                .debug_struct("Patch")
                .field("set", set)
                .field("remove", remove)
                .finish(),
            ConnectionOverride::Fill { values, remove } => f
                .debug_struct("Fill")
                .field("values", &values.keys().collect::<Vec<_>>())
                .field("remove", remove)
                .finish(),
        }
    }
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
            ConnectionOverride::Fill { remove, .. } => {
                let mut node = node.clone();
                if let YValue::Map(entries) = &mut node.value {
                    entries.retain(|(k, _)| {
                        !k.key_str().is_some_and(|k| remove.iter().any(|r| r == k))
                    });
                }
                node
            }
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
    /// Every override, by connection name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &ConnectionOverride)> {
        self.0.iter()
    }
    /// After connection `name` rendered (from [`ConnectionOverrides::node`]): set the stored
    /// values of its [`ConnectionOverride::Fill`] that the plan's connection does not set.
    pub fn fill(&self, name: &str, rendered: &mut serde_json::Value) {
        if let (Some(ConnectionOverride::Fill { values, .. }), Some(fields)) =
            (self.get(name), rendered.as_object_mut())
        {
            for (k, v) in values {
                if !fields.contains_key(k) {
                    fields.insert(k.clone(), v.clone());
                }
            }
        }
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

    /// A connection type of the tests: `host` required, a rule between `password` and `user`.
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        #[serde(rename = "type")]
        kind: String,
        host: String,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        password: Option<String>,
    }

    impl ConnectionConfig for Demo {
        fn problems(&self) -> Vec<crate::step::Problem> {
            match (&self.user, &self.password) {
                (None, Some(_)) => {
                    vec![crate::step::Problem::at("user", "a password needs a user")]
                }
                _ => Vec::new(),
            }
        }
    }

    fn fields(problems: Vec<crate::step::Problem>) -> Vec<String> {
        problems.into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn verify_names_the_key_of_every_problem() {
        let kind = ConnectionKind::of::<Demo>("demo", "");
        let ok = serde_json::json!({"type": "demo", "host": "h", "port": 5432, "user": "u", "password": "p"});
        assert!((kind.verify)(&ok).is_empty());
        let missing = (kind.verify)(&serde_json::json!({"type": "demo", "port": 1}));
        assert_eq!(fields(missing), ["host"]);
        let wrong =
            (kind.verify)(&serde_json::json!({"type": "demo", "host": "h", "port": "many"}));
        assert_eq!(fields(wrong), ["port"]);
        let unknown = (kind.verify)(&serde_json::json!({"type": "demo", "host": "h", "hots": "x"}));
        assert_eq!(fields(unknown.clone()), ["hots"], "{}", unknown[0].message);
        let rule =
            (kind.verify)(&serde_json::json!({"type": "demo", "host": "h", "password": "p"}));
        assert_eq!(fields(rule), ["user"]);
        // The steps' own reader is stricter than YAML's: a number is no string.
        let number = (kind.verify)(
            &serde_json::json!({"type": "demo", "host": "h", "user": "u", "password": 1234}),
        );
        assert_eq!(fields(number), ["password"]);
    }

    #[test]
    fn a_connection_with_a_credential_needs_none_of_its_keys_but_knows_them() {
        let kind = ConnectionKind::of::<Demo>("demo", "");
        let check = |yaml: &str| {
            let mut d = Diags::new("p.yaml");
            (kind.check)(&node(yaml), &mut d);
            d.items
                .iter()
                .map(|d| (d.line, d.code, d.message.clone()))
                .collect::<Vec<_>>()
        };
        // Without one, `host` is missing and the rule applies.
        assert_eq!(check("type: demo\npassword: p\n").len(), 1);
        assert!(check("type: demo\ncredential: db-prod\n").is_empty());
        assert!(check("type: demo\ncredential: db-prod\npassword: p\nport: 5433\n").is_empty());
        let bad = check("type: demo\ncredential: db-prod\nhots: x\nport: many\n");
        let codes: Vec<_> = bad.iter().map(|d| (d.0, d.1)).collect();
        assert_eq!(
            codes,
            [
                (3, crate::diag::Code::UnknownKey),
                (4, crate::diag::Code::WrongType)
            ],
            "{bad:?}"
        );
        for name in ["\"{{ env('C') }}\"", "Prod", "a/b", "\"\""] {
            let d = check(&format!("type: demo\ncredential: {name}\n"));
            assert_eq!(d.len(), 1, "{name}: {d:?}");
            assert_eq!((d[0].0, d[0].1), (2, crate::diag::Code::InvalidValue));
        }
    }

    #[test]
    fn a_fill_sets_stored_values_after_rendering_and_the_plan_wins() {
        let plan = node("type: demo\ncredential: db\nport: 7\n");
        let mut values = serde_json::Map::new();
        values.insert("host".into(), "db.local".into());
        values.insert("port".into(), 5432.into());
        values.insert("password".into(), "{{ not a template }}".into());
        let o = ConnectionOverride::Fill {
            values,
            remove: vec![CREDENTIAL_KEY.into()],
        };
        assert!(!format!("{o:?}").contains("not a template"), "{o:?}");
        let overrides = ConnectionOverrides::new([("c".to_string(), o)].into_iter().collect());
        let mut json = overrides.node("c", &plan).to_json();
        assert_eq!(json, serde_json::json!({"type": "demo", "port": 7}));
        overrides.fill("c", &mut json);
        assert_eq!(
            json,
            serde_json::json!({"type": "demo", "port": 7, "host": "db.local", "password": "{{ not a template }}"})
        );
        // Another connection is left alone.
        let mut other = serde_json::json!({"type": "demo"});
        overrides.fill("d", &mut other);
        assert_eq!(other, serde_json::json!({"type": "demo"}));
        assert!(is_credential_name("carol-prod.v2_x"));
        assert!(!is_credential_name("-x") && !is_credential_name(&"a".repeat(65)));
    }
}
