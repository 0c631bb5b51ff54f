//! `pipe validate`: text → plan, collecting every problem in one pass.
//!
//! Phases (as in `vector validate`): parse YAML; deserialize the document and then each
//! param, connection and step on its own; resolve references (needs, inputs, connections,
//! template variables — statically, nothing is rendered); build the graph and report cycles
//! as whole chains. It needs no secrets and no network.

use crate::de::{from_map_tolerant, from_node, Mode};
use crate::diag::{did_you_mean, Code, Diagnostic, Diags, Pos};
use crate::model::{
    ConnectionSpec, Integration, PipelineDoc, Schedule, ScheduleConfig, ScheduleTrigger, StepSpec,
    BUILTIN_OUTPUTS, RUN_FIELDS,
};
use crate::params::{self, ParamSpec};
use crate::plan::{Plan, PlanStep};
use crate::step::{Registry, StaticInfo};
use crate::template::{self, is_template};
use crate::yaml::{self, Node, Value};
use indexmap::IndexMap;
use petgraph::graph::DiGraph;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Names of connection fields that hold secrets whatever the connection type.
const SECRET_FIELD_WORDS: &[&str] = &[
    "password",
    "secret",
    "token",
    "api_key",
    "apikey",
    "private_key",
    "client_secret",
];

/// Whether a connection field holds a secret (by its name): its value is redacted at run
/// time and a literal value in the file is a warning.
pub fn is_secret_field(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_FIELD_WORDS.iter().any(|w| lower.contains(w))
}

/// Warn (W001) about literal values in secret fields, at any depth (`auth.password`).
fn literal_secrets(node: &Node, prefix: &str, owner: &str, d: &mut Diags) {
    let Some(entries) = node.as_map() else { return };
    for (k, v) in entries {
        let Some(key) = k.key_str() else { continue };
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        match &v.value {
            Value::String(s) if is_secret_field(key) && !s.is_empty() && !is_template(s) => d.push(
                v.pos,
                Code::LiteralSecret,
                format!("`{path}` of {owner} is a literal value; use \"{{{{ secret('NAME') }}}}\" so it never sits in the file"),
            ),
            Value::Map(_) => literal_secrets(v, &path, owner, d),
            _ => {}
        }
    }
}

/// The globals templates may call (not variables).
pub const TEMPLATE_GLOBALS: &[&str] = &["params", "steps", "run", "env", "secret", "now", "today"];

pub struct Outcome {
    pub diagnostics: Vec<Diagnostic>,
    /// Present when there are no errors.
    pub plan: Option<Plan>,
}

/// The largest pipeline file read (E021 beyond): a pipeline is a few kilobytes, and an
/// endless source (a FIFO, `/dev/zero`) must not be read until memory runs out.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// A pipeline file's text: at most [`MAX_FILE_BYTES`], UTF-8. Problems are located: invalid UTF-8 at the line and column of its first byte.
pub fn read_pipeline(path: &Path, d: &mut Diags) -> Option<String> {
    use std::io::Read;
    let start = Pos { line: 1, col: 1 };
    let display = d.file.clone();
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| {
        // A regular file's size sizes the buffer once (Take hides it from read_to_end);
        // a FIFO or device says 0 and grows the buffer up to the cap.
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        bytes.reserve_exact(size.min(MAX_FILE_BYTES) as usize + 1);
        f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        d.push(start, Code::Io, format!("cannot read {display}: {e}"));
        return None;
    }
    if bytes.len() as u64 > MAX_FILE_BYTES {
        d.push(
            start,
            Code::Io,
            format!(
                "{display} is larger than {} MB; a pipeline file is not read beyond that",
                MAX_FILE_BYTES / (1024 * 1024)
            ),
        );
        return None;
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let bytes = e.as_bytes();
            let bad = e.utf8_error().valid_up_to();
            let before = std::str::from_utf8(&bytes[..bad]).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let col = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            d.push(
                Pos { line, col },
                Code::YamlSyntax,
                format!(
                    "invalid UTF-8 (byte 0x{:02x} at offset {bad}); a pipeline file is UTF-8 text",
                    bytes[bad]
                ),
            );
            return None;
        }
    };
    Some(text)
}

/// Validate a file on disk. `display` is the path as the user should see it.
pub fn validate_file(path: &Path, display: &str, registry: &Registry) -> Outcome {
    let mut d = Diags::new(display);
    match read_pipeline(path, &mut d) {
        Some(text) => validate_text(&text, path, display, registry),
        None => Outcome {
            diagnostics: finish(d),
            plan: None,
        },
    }
}

/// [`validate_file`], also returning the text it validated (a run keeps it with its history,
/// so a repair re-validates exactly what ran even when the file changed since).
pub fn validate_file_with_text(
    path: &Path,
    display: &str,
    registry: &Registry,
) -> (Outcome, Option<String>) {
    let mut d = Diags::new(display);
    match read_pipeline(path, &mut d) {
        Some(text) => (validate_text(&text, path, display, registry), Some(text)),
        None => (
            Outcome {
                diagnostics: finish(d),
                plan: None,
            },
            None,
        ),
    }
}

/// Validate many files on all cores (files are independent); outcomes in input order.
/// Each item is (path to read, path as the user should see it).
pub fn validate_files(files: &[(std::path::PathBuf, String)], registry: &Registry) -> Vec<Outcome> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(files.len().max(1));
    if workers <= 1 {
        return files
            .iter()
            .map(|(p, d)| validate_file(p, d, registry))
            .collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<Outcome>> = Vec::new();
    slots.resize_with(files.len(), || None);
    let results = std::sync::Mutex::new(slots);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((path, display)) = files.get(i) else {
                    break;
                };
                let outcome = validate_file(path, display, registry);
                results.lock().unwrap()[i] = Some(outcome);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|o| o.expect("every file validated"))
        .collect()
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub fn validate_text(text: &str, path: &Path, display: &str, registry: &Registry) -> Outcome {
    let mut d = Diags::new(display);
    // A byte-order mark (editors on Windows write one) is not part of the first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Some(root) = yaml::parse(text, &mut d) else {
        return Outcome {
            diagnostics: finish(d),
            plan: None,
        };
    };
    if root.as_map().is_none() {
        d.push(
            root.pos,
            Code::WrongType,
            format!(
                "a pipeline file is a mapping with `pipeline:` and `steps:`, found {}",
                root.kind()
            ),
        );
        return Outcome {
            diagnostics: finish(d),
            plan: None,
        };
    }
    // The steps are most of the document and `Raw` copies what it keeps: read the document
    // with each step value stood in for by a null at its position, then move the steps in.
    let mut root = root;
    let mut step_values = take_values(&mut root, "steps");
    let Some(mut doc) = from_map_tolerant::<PipelineDoc>(&root, Mode::Check, &mut d) else {
        return Outcome {
            diagnostics: finish(d),
            plan: None,
        };
    };
    let root = root;
    let mut cursor = 0;
    for (id, raw) in doc.steps.iter_mut() {
        let found = (cursor..step_values.len())
            .chain(0..cursor)
            .find(|&i| step_values[i].0 == *id);
        if let Some(i) = found {
            raw.0 = std::mem::replace(&mut step_values[i].1, Node::null(raw.0.pos));
            cursor = i + 1;
        }
    }
    drop(step_values);

    if !doc
        .pipeline
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        || doc.pipeline.is_empty()
    {
        let pos = root.get("pipeline").map(|n| n.pos).unwrap_or(root.pos);
        d.push(
            pos,
            Code::InvalidName,
            format!("pipeline name `{}` must match [a-z0-9_-]+", doc.pipeline),
        );
    }

    // Params.
    let mut param_specs: IndexMap<String, ParamSpec> = IndexMap::new();
    for (name, raw) in &doc.params {
        let key_pos = key_pos(&root, &["params"], name);
        if !is_ident(name) {
            d.push(
                key_pos,
                Code::InvalidName,
                format!("param name `{name}` must be an identifier: [a-z_][a-z0-9_]*"),
            );
        }
        if let Some(spec) = from_node::<ParamSpec>(&raw.0, Mode::Check, &mut d) {
            if spec.kind == params::ParamType::Enum
                && spec.values.as_ref().is_none_or(|v| v.is_empty())
            {
                d.push(
                    raw.0.pos,
                    Code::MissingKey,
                    format!("enum param `{name}` needs `values:`"),
                );
            }
            if let Some(default) = &spec.default {
                let is_tpl = default.as_str().is_some_and(is_template);
                if !is_tpl {
                    if let Err(e) = params::check_value(&spec, default) {
                        let pos = raw.0.get("default").map(|n| n.pos).unwrap_or(raw.0.pos);
                        d.push(
                            pos,
                            Code::InvalidDefault,
                            format!("default of param `{name}`: {e}"),
                        );
                    }
                }
            }
            param_specs.insert(name.clone(), spec);
        }
    }

    // Connections.
    let mut connections: IndexMap<String, ConnectionSpec> = IndexMap::new();
    let mut connection_nodes = IndexMap::new();
    for (name, raw) in &doc.connections {
        if let Some(spec) = from_node::<ConnectionSpec>(&raw.0, Mode::Check, &mut d) {
            check_connection_kind(&spec.kind, &raw.0, registry, &mut d);
            literal_secrets(&raw.0, "", &format!("connection `{name}`"), &mut d);
            // `credentials: <name>` refers to another connection.
            if let Some(Value::String(other)) = raw.0.get("credentials").map(|n| &n.value) {
                if !is_template(other) && !doc.connections.contains_key(other) {
                    let pos = raw.0.get("credentials").map(|n| n.pos).unwrap_or(raw.0.pos);
                    let hint = did_you_mean(other, doc.connections.keys().map(String::as_str))
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    d.push(pos, Code::UnknownConnection, format!("`credentials` of connection `{name}` names an unknown connection `{other}`{hint}"));
                }
            }
            check_templates(&raw.0, &Refs::plain(&param_specs), &mut d);
            connections.insert(name.clone(), spec);
            connection_nodes.insert(name.clone(), raw.0.clone());
        }
    }

    // The sandbox block: templates there see `sandbox` (the fakes' values).
    if let Some(block) = root.get("sandbox") {
        let locals = vec!["sandbox".to_string()];
        let refs = Refs {
            locals: &locals,
            ..Refs::plain(&param_specs)
        };
        check_templates(block, &refs, &mut d);
    }

    // Schedule and integration (typed here, so the service never parses them again).
    let schedule = doc.schedule.as_ref().and_then(|schedule| {
        let node = root.get("schedule").unwrap_or(&root);
        check_schedule(schedule, node, &mut d)
    });
    let integration = match &doc.integration {
        Some(integration) => {
            let node = root.get("integration").unwrap_or(&root);
            check_integration(integration, node, &mut d);
            integration.clone()
        }
        None => Integration::default(),
    };
    if doc.concurrency == Some(0) {
        let pos = root.get("concurrency").map(|n| n.pos).unwrap_or(root.pos);
        d.push(pos, Code::InvalidValue, "concurrency must be at least 1");
    }

    // Steps: envelope, then `with:` by type.
    struct Parsed {
        id: String,
        node: Node,
        key_pos: Pos,
        spec: StepSpec,
        info: StaticInfo,
        config: Node,
    }
    let mut parsed: Vec<Parsed> = Vec::new();
    let mut broken: BTreeSet<String> = BTreeSet::new();
    let step_keys: HashMap<&str, Pos> = root
        .get("steps")
        .and_then(Node::as_map)
        .map(|m| {
            m.iter()
                .filter_map(|(k, _)| Some((k.key_str()?, k.pos)))
                .collect()
        })
        .unwrap_or_default();
    let step_ids: Vec<String> = doc.steps.keys().cloned().collect();
    for (id, raw) in std::mem::take(&mut doc.steps) {
        let key_pos = step_keys.get(id.as_str()).copied().unwrap_or(root.pos);
        if !is_ident(&id) {
            d.push(key_pos, Code::InvalidName, format!("step id `{id}` must be an identifier ([a-z_][a-z0-9_]*) so templates can say steps.{id}"));
        }
        let node = raw.0;
        if node.as_map().is_none() {
            d.push(
                node.pos,
                Code::WrongType,
                format!(
                    "step `{id}` must be a mapping with `type:`, found {}",
                    node.kind()
                ),
            );
            broken.insert(id.clone());
            continue;
        }
        // `with:` is moved out for the same reason, an empty mapping standing in for it (a
        // null would read as no `with:`); nothing below looks at the step's `with` entry.
        let mut node = node;
        let with = take_entry(&mut node, "with");
        let Some(mut spec) = from_map_tolerant::<StepSpec>(&node, Mode::Check, &mut d) else {
            broken.insert(id.clone());
            continue;
        };
        let node = node;
        if let (Some(with), Some(raw)) = (with, spec.config.as_mut()) {
            raw.0 = with;
        }
        let config = spec
            .config
            .take()
            .map(|r| r.0)
            .unwrap_or_else(|| Node::new(node.pos, Value::Map(vec![])));
        let info = match registry.get(&spec.kind) {
            None => {
                unknown_type("step", &spec.kind, &node, registry.names(), &mut d);
                broken.insert(id.clone());
                StaticInfo::default()
            }
            Some(kind) => match (kind.check)(&config, &mut d) {
                Some(info) => info,
                None => {
                    broken.insert(id.clone());
                    StaticInfo::default()
                }
            },
        };
        let info = if spec.foreach.is_some() {
            let mut info = info;
            if let Some(outs) = &mut info.outputs {
                outs.extend(crate::model::FOREACH_OUTPUTS.iter().map(|s| s.to_string()));
            }
            if let Some(crate::model::Foreach::Full(crate::model::ForeachFull {
                concurrency: Some(0),
                ..
            })) = &spec.foreach
            {
                let f = node.get("foreach").unwrap_or(&node);
                d.push(
                    f.get("concurrency").map(|n| n.pos).unwrap_or(f.pos),
                    Code::InvalidValue,
                    "foreach.concurrency must be at least 1",
                );
            }
            info
        } else {
            info
        };
        if let Some(retry) = &spec.retry {
            let rnode = node.get("retry").unwrap_or(&node);
            if retry.attempts == 0 {
                d.push(
                    rnode.get("attempts").map(|n| n.pos).unwrap_or(rnode.pos),
                    Code::InvalidValue,
                    "retry.attempts counts the first try: it must be at least 1",
                );
            }
            for (key, v) in [
                ("backoff", &retry.backoff),
                ("max_backoff", &retry.max_backoff),
            ] {
                if let Some(v) = v {
                    check_duration(v, rnode.get(key).unwrap_or(rnode), &mut d);
                }
            }
        }
        if let Some(t) = &spec.timeout {
            check_duration(t, node.get("timeout").unwrap_or(&node), &mut d);
        }
        if let Some(c) = &spec.connection {
            if !connections.contains_key(c) && !doc.connections.contains_key(c) {
                let pos = node.get("connection").map(|n| n.pos).unwrap_or(node.pos);
                let hint = did_you_mean(c, doc.connections.keys().map(String::as_str))
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                d.push(
                    pos,
                    Code::UnknownConnection,
                    format!("unknown connection `{c}`{hint}"),
                );
            }
        }
        for lint in &info.lints {
            let mut n = Some(&config);
            for p in lint.field.split('.') {
                n = n.and_then(|x| x.get(p));
            }
            let pos = n.map(|n| n.pos).unwrap_or(config.pos);
            let code = Code::parse(lint.code).unwrap_or_else(|| {
                panic!(
                    "step type `{}` reports an unknown code {}",
                    spec.kind, lint.code
                )
            });
            d.push(pos, code, format!("step `{id}`: {}", lint.message));
        }
        for field in &info.secret_fields {
            let path: Vec<&str> = field.split('.').collect();
            let mut n = Some(&config);
            for p in &path {
                n = n.and_then(|x| x.get(p));
            }
            if let Some(Node {
                value: Value::String(s),
                pos,
            }) = n
            {
                if !s.is_empty() && !is_template(s) {
                    d.push(*pos, Code::LiteralSecret, format!("`{field}` of step `{id}` is a secret field with a literal value; use \"{{{{ secret('NAME') }}}}\""));
                }
            }
        }
        parsed.push(Parsed {
            id: id.clone(),
            node,
            key_pos,
            spec,
            info,
            config,
        });
    }

    // References.
    let ids: std::collections::HashSet<&str> = step_ids.iter().map(String::as_str).collect();
    let outputs_of: HashMap<&str, Option<BTreeSet<String>>> = parsed
        .iter()
        .map(|p| {
            let set = p.info.outputs.as_ref().map(|own| {
                own.iter()
                    .cloned()
                    .chain(p.spec.outputs.keys().cloned())
                    .chain(BUILTIN_OUTPUTS.iter().map(|s| s.to_string()))
                    .collect()
            });
            (p.id.as_str(), set)
        })
        .collect();
    let produces: HashMap<&str, bool> = parsed
        .iter()
        .map(|p| (p.id.as_str(), p.info.produces_table))
        .collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); parsed.len()];
    let index: HashMap<&str, usize> = parsed
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.as_str(), i))
        .collect();
    for (i, p) in parsed.iter().enumerate() {
        let dep = |other: &str, edges: &mut Vec<Vec<usize>>| {
            if let Some(&j) = index.get(other) {
                if !edges[i].contains(&j) {
                    edges[i].push(j);
                }
            }
        };
        let unknown_step = |name: &str, pos: Pos, d: &mut Diags| {
            if !ids.contains(&name) {
                let hint = did_you_mean(name, ids.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                d.push(
                    pos,
                    Code::UnknownStep,
                    format!("unknown step `{name}`{hint}"),
                );
                false
            } else {
                true
            }
        };
        for (k, name) in p.spec.needs.iter().enumerate() {
            let pos = p
                .node
                .get("needs")
                .and_then(|n| n.as_seq())
                .and_then(|s| s.get(k))
                .map(|n| n.pos)
                .unwrap_or(p.node.pos);
            if unknown_step(name, pos, &mut d) {
                dep(name, &mut edges);
            }
        }
        let inputs: Vec<(&String, Pos)> = p
            .spec
            .input
            .iter()
            .map(|s| (s, p.node.get("input").map(|n| n.pos).unwrap_or(p.node.pos)))
            .chain(p.spec.inputs.iter().enumerate().map(|(k, s)| {
                (
                    s,
                    p.node
                        .get("inputs")
                        .and_then(|n| n.as_seq())
                        .and_then(|x| x.get(k))
                        .map(|n| n.pos)
                        .unwrap_or(p.node.pos),
                )
            }))
            .collect();
        for (name, pos) in inputs {
            if unknown_step(name, pos, &mut d) {
                if produces.get(name.as_str()) == Some(&false) && !broken.contains(name) {
                    let producers: Vec<&str> = parsed
                        .iter()
                        .filter(|q| q.info.produces_table)
                        .map(|q| q.id.as_str())
                        .collect();
                    let list = if producers.is_empty() {
                        "no step here produces one".to_string()
                    } else {
                        format!("steps that produce one: {}", producers.join(", "))
                    };
                    d.push(
                        pos,
                        Code::NotATable,
                        format!(
                            "step `{name}` produces no table, so it cannot be an input ({list})"
                        ),
                    );
                }
                dep(name, &mut edges);
            }
        }
        // Templates in the envelope and in `with:`. A `foreach` step's templates also see
        // `item` and `item_index`; its list itself does not.
        let mut locals: Vec<String> = p.info.locals.clone();
        let mut found_steps = BTreeSet::new();
        let base = Refs {
            params: &param_specs,
            ids: &ids,
            outputs: &outputs_of,
            locals: &[],
            self_id: &p.id,
        };
        if let Some(f) = p.node.get("foreach") {
            let list = f.get("items").unwrap_or(f);
            found_steps.extend(check_templates(list, &base.with_locals(&locals), &mut d));
            locals.extend(crate::model::ITEM_LOCALS.iter().map(|s| s.to_string()));
            if let Some(key) = f.get("key") {
                found_steps.extend(check_templates(key, &base.with_locals(&locals), &mut d));
            }
        }
        let refs = base.with_locals(&locals);
        if let Some(cond) = p.node.get("if") {
            found_steps.extend(check_templates(cond, &refs, &mut d));
        }
        found_steps.extend(check_templates(&p.config, &refs, &mut d));
        if let Some(outs) = p.node.get("outputs") {
            let mut with_result = locals.clone();
            let kind = registry
                .get(&p.spec.kind)
                .map(|k| k.result_name)
                .unwrap_or("result");
            with_result.push(kind.to_string());
            let refs = Refs {
                locals: &with_result,
                ..refs
            };
            found_steps.extend(check_templates(outs, &refs, &mut d));
        }
        for s in found_steps {
            if s != p.id {
                dep(&s, &mut edges);
            }
        }
    }

    // Cycles.
    let mut graph: DiGraph<String, ()> = DiGraph::new();
    for p in &parsed {
        graph.add_node(p.id.clone());
    }
    for (i, deps) in edges.iter().enumerate() {
        for &j in deps {
            graph.add_edge(
                petgraph::graph::NodeIndex::new(j),
                petgraph::graph::NodeIndex::new(i),
                (),
            );
        }
    }
    for scc in petgraph::algo::tarjan_scc(&graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<usize> = scc.iter().map(|n| n.index()).collect();
        let start = *members.iter().next().unwrap();
        let chain = cycle_chain(start, &members, &edges);
        let names: Vec<&str> = chain.iter().map(|&i| parsed[i].id.as_str()).collect();
        d.push(
            parsed[start].key_pos,
            Code::Cycle,
            format!("steps form a cycle: {}", names.join(" -> ")),
        );
    }

    if d.has_errors() {
        return Outcome {
            diagnostics: finish(d),
            plan: None,
        };
    }

    // Topological order, file order among independent steps.
    let order = topo_order(&edges);
    let position: HashMap<usize, usize> = order
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let mut slots: Vec<Option<Parsed>> = parsed.into_iter().map(Some).collect();
    let mut steps = Vec::with_capacity(order.len());
    for &old in &order {
        let p = slots[old].take().unwrap();
        let mut deps: Vec<usize> = edges[old].iter().map(|j| position[j]).collect();
        deps.sort_unstable();
        let kind = registry.get(&p.spec.kind).unwrap().clone();
        steps.push(PlanStep {
            id: p.id,
            pos: p.key_pos,
            spec: p.spec,
            kind,
            config: p.config,
            info: p.info,
            deps,
        });
    }
    let mut graph: DiGraph<String, ()> = DiGraph::new();
    for s in &steps {
        graph.add_node(s.id.clone());
    }
    for (i, s) in steps.iter().enumerate() {
        for &dp in &s.deps {
            graph.add_edge(
                petgraph::graph::NodeIndex::new(dp),
                petgraph::graph::NodeIndex::new(i),
                (),
            );
        }
    }
    let plan = Plan {
        name: doc.pipeline,
        description: doc.description,
        file: path.to_path_buf(),
        params: param_specs,
        connections,
        connection_nodes,
        schedule,
        integration,
        concurrency: doc.concurrency,
        keep_tables: doc.keep_tables,
        sandbox: doc.sandbox.unwrap_or_default(),
        steps,
        graph,
        table_ops: registry.table_ops.clone(),
    };
    Outcome {
        diagnostics: finish(d),
        plan: Some(plan),
    }
}

/// Schedule and integration values are read as written, never rendered: a template there
/// (which `Mode::Check` would let through as a stand-in) is an error at its value.
/// Whether one was found.
fn no_templates(node: &Node, block: &str, d: &mut Diags) -> bool {
    match &node.value {
        Value::String(s) if is_template(s) => {
            d.push(
                node.pos,
                Code::InvalidValue,
                format!(
                    "`{block}:` values are not templates (the scheduler reads them as written)"
                ),
            );
            true
        }
        Value::Map(entries) => {
            // Every template is reported, not only the first.
            let mut found = false;
            for (_, v) in entries {
                found |= no_templates(v, block, d);
            }
            found
        }
        Value::Seq(items) => {
            let mut found = false;
            for v in items {
                found |= no_templates(v, block, d);
            }
            found
        }
        _ => false,
    }
}

/// The position of `key` in a block, else of the block.
fn pos_of(node: &Node, key: &str) -> Pos {
    node.get(key).map(|n| n.pos).unwrap_or(node.pos)
}

/// Check `schedule:` (exactly one of cron/interval, a known timezone, ranges) and return it
/// typed with its defaults, when it has no error.
fn check_schedule(s: &Schedule, node: &Node, d: &mut Diags) -> Option<ScheduleConfig> {
    let mut ok = !no_templates(node, "schedule", d);
    let trigger = match (&s.cron, &s.interval) {
        (Some(_), Some(_)) => {
            d.push(
                pos_of(node, "interval"),
                Code::InvalidValue,
                "a schedule has `cron` or `interval`, not both",
            );
            None
        }
        (None, None) => {
            d.push(
                node.pos,
                Code::MissingKey,
                "a schedule needs `cron` (e.g. \"0 6 * * *\") or `interval` (e.g. 15m)",
            );
            None
        }
        // A template was reported above; it is not a cron too.
        (Some(cron), None) if is_template(cron) => None,
        (None, Some(crate::model::DurationSpec::Text(t))) if is_template(t) => None,
        (Some(cron), None) => match crate::schedule_check::cron(cron) {
            Ok(()) => Some(ScheduleTrigger::Cron(cron.clone())),
            Err(e) => {
                d.push(
                    pos_of(node, "cron"),
                    Code::InvalidCron,
                    format!("invalid cron `{cron}`: {e}"),
                );
                None
            }
        },
        (None, Some(interval)) => {
            let pos = pos_of(node, "interval");
            match interval.parse() {
                Err(e) => {
                    d.push(pos, Code::InvalidDuration, format!("`interval`: {e}"));
                    None
                }
                Ok(i) if i.subsec_nanos() != 0 || i.as_secs() == 0 => {
                    d.push(
                        pos,
                        Code::InvalidDuration,
                        format!(
                            "`interval` must be a whole number of seconds, at least 1s (found {})",
                            crate::duration::human(i)
                        ),
                    );
                    None
                }
                Ok(i) => Some(ScheduleTrigger::Interval(i)),
            }
        }
    };
    let timezone = match &s.timezone {
        None => chrono_tz::UTC,
        Some(tz) => match tz.parse::<chrono_tz::Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                let hint = did_you_mean(tz, chrono_tz::TZ_VARIANTS.iter().map(|t| t.name()))
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                d.push(
                    pos_of(node, "timezone"),
                    Code::InvalidTimezone,
                    format!("unknown timezone `{tz}`{hint}"),
                );
                ok = false;
                chrono_tz::UTC
            }
        },
    };
    let mut range = |key: &str, value: Option<u32>, min: u32, max: u32, what: &str| {
        if let Some(v) = value {
            if v < min || v > max {
                let allowed = if max == u32::MAX {
                    format!("at least {min}")
                } else {
                    format!("from {min} to {max}")
                };
                d.push(
                    pos_of(node, key),
                    Code::InvalidValue,
                    format!("`{key}` must be {allowed}{what} (found {v})"),
                );
                ok = false;
            }
        }
    };
    range(
        "max_concurrent_runs",
        s.max_concurrent_runs,
        1,
        crate::model::MAX_CONCURRENT_RUNS,
        "",
    );
    range(
        "max_catch_up",
        s.max_catch_up,
        1,
        crate::model::MAX_MAX_CATCH_UP,
        "; `catch_up: none` runs no missed tick",
    );
    range(
        "pause_after_failures",
        s.pause_after_failures,
        1,
        u32::MAX,
        "",
    );
    if !ok {
        return None;
    }
    Some(ScheduleConfig {
        trigger: trigger?,
        timezone,
        enabled: s.enabled,
        max_concurrent_runs: s.max_concurrent_runs.unwrap_or(1),
        on_overlap: s.on_overlap,
        catch_up: s.catch_up,
        max_catch_up: s.max_catch_up.unwrap_or(crate::model::DEFAULT_MAX_CATCH_UP),
        pause_after_failures: s.pause_after_failures,
    })
}

/// Check `integration:`: names people read are not blank, the queue is a name, tags are
/// distinct words.
fn check_integration(i: &Integration, node: &Node, d: &mut Diags) {
    no_templates(node, "integration", d);
    for (key, value) in [
        ("group", &i.group),
        ("external_system", &i.external_system),
        ("owner", &i.owner),
    ] {
        if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
            d.push(
                pos_of(node, key),
                Code::InvalidValue,
                format!("`integration.{key}` is empty; leave it out instead"),
            );
        }
    }
    let name_ok = |q: &str| {
        !q.is_empty()
            && q.len() <= 64
            && q.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !name_ok(&i.queue) {
        d.push(
            pos_of(node, "queue"),
            Code::InvalidName,
            format!("queue name `{}` must match [A-Za-z0-9_-]{{1,64}}", i.queue),
        );
    }
    let tag_nodes = node.get("tags").and_then(|t| match &t.value {
        Value::Seq(items) => Some(items),
        _ => None,
    });
    let mut seen = BTreeSet::new();
    for (k, tag) in i.tags.iter().enumerate() {
        let pos = tag_nodes
            .and_then(|items| items.get(k))
            .map(|n| n.pos)
            .unwrap_or_else(|| pos_of(node, "tags"));
        if tag.trim().is_empty() {
            d.push(pos, Code::InvalidValue, "an empty tag");
        } else if !seen.insert(tag.as_str()) {
            d.push(
                pos,
                Code::InvalidValue,
                format!("tag `{tag}` is given twice"),
            );
        }
    }
}

/// Check a connection against its registered kind: the type (E006), then its keys and
/// values (E003/E004/E005) by the kind's config struct. A registry without connection kinds
/// (the engine's own tests, which have no `steps` crate) checks nothing here.
fn check_connection_kind(kind: &str, node: &Node, registry: &Registry, d: &mut Diags) {
    let kinds = &registry.connections;
    if kinds.is_empty() || is_template(kind) {
        return;
    }
    match kinds.get(kind) {
        Some(k) => {
            (k.check)(node, d);
        }
        None => unknown_type("connection", kind, node, kinds.names(), d),
    }
}

/// E006 at `node`'s `type:`: `kind` names no registered step or connection type.
fn unknown_type<'a>(
    what: &str,
    kind: &str,
    node: &Node,
    known: impl Iterator<Item = &'a str>,
    d: &mut Diags,
) {
    let pos = node.get("type").map(|n| n.pos).unwrap_or(node.pos);
    let known: Vec<&str> = known.collect();
    let hint = did_you_mean(kind, known.iter().copied())
        .map(|s| format!("did you mean `{s}`? "))
        .unwrap_or_default();
    d.push(
        pos,
        Code::UnknownStepType,
        format!(
            "unknown {what} type `{kind}`; {hint}known types: {}",
            known.join(", ")
        ),
    );
}

/// The values of the mapping under `key` (by key), each replaced by a null at its position.
fn take_values(root: &mut Node, key: &str) -> Vec<(String, Node)> {
    let Some(Node {
        value: Value::Map(entries),
        ..
    }) = root.get_path_mut(key)
    else {
        return Vec::new();
    };
    entries
        .iter_mut()
        .filter_map(|(k, v)| {
            let name = k.key_str()?.to_string();
            let pos = v.pos;
            Some((name, std::mem::replace(v, Node::null(pos))))
        })
        .collect()
}

/// The value under `key` of a mapping, replaced by an empty mapping at its position; `None`
/// (and nothing replaced) when there is no such key or its value is null.
fn take_entry(node: &mut Node, key: &str) -> Option<Node> {
    let Value::Map(entries) = &mut node.value else {
        return None;
    };
    let (_, v) = entries.iter_mut().find(|(k, _)| k.key_str() == Some(key))?;
    if matches!(v.value, Value::Null) {
        return None;
    }
    let pos = v.pos;
    Some(std::mem::replace(v, Node::new(pos, Value::Map(vec![]))))
}

fn finish(d: Diags) -> Vec<Diagnostic> {
    let mut items = d.items;
    items.sort();
    items.dedup();
    items
}

fn key_pos(root: &Node, path: &[&str], key: &str) -> Pos {
    let mut n = root;
    for p in path {
        match n.get(p) {
            Some(x) => n = x,
            None => return root.pos,
        }
    }
    n.entry(key).map(|(k, _)| k.pos).unwrap_or(n.pos)
}

fn check_duration(v: &crate::model::DurationSpec, node: &Node, d: &mut Diags) {
    if let crate::model::DurationSpec::Text(t) = v {
        if is_template(t) {
            return;
        }
    }
    if let Err(e) = v.parse() {
        d.push(node.pos, Code::InvalidDuration, e);
    }
}

/// The first cycle through `start` inside one strongly connected component, as
/// `[a, b, c, a]` in execution order (a before b).
fn cycle_chain(start: usize, members: &BTreeSet<usize>, edges: &[Vec<usize>]) -> Vec<usize> {
    // edges[i] = what i depends on; walk "is needed by" so the chain reads in run order.
    let mut forward: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, deps) in edges.iter().enumerate() {
        for &j in deps {
            if members.contains(&i) && members.contains(&j) {
                forward.entry(j).or_default().push(i);
            }
        }
    }
    for v in forward.values_mut() {
        v.sort_unstable();
    }
    // BFS for the shortest path back to start.
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for &m in forward.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            if m == start {
                // chain is start, ..., start in forward order
                let mut fixed = vec![start];
                let mut path = Vec::new();
                let mut c = n;
                while c != start {
                    path.push(c);
                    c = prev[&c];
                }
                path.reverse();
                fixed.extend(path);
                fixed.push(start);
                return fixed;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(m) {
                e.insert(n);
                queue.push_back(m);
            }
        }
    }
    vec![start, start]
}

fn topo_order(edges: &[Vec<usize>]) -> Vec<usize> {
    let n = edges.len();
    let mut indegree: Vec<usize> = edges.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, deps) in edges.iter().enumerate() {
        for &j in deps {
            dependents[j].push(i);
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
        .filter(|&i| indegree[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &k in &dependents[i] {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                ready.push(std::cmp::Reverse(k));
            }
        }
    }
    order
}

/// What a template in a given place may reference.
#[derive(Clone, Copy)]
struct Refs<'a> {
    params: &'a IndexMap<String, ParamSpec>,
    ids: &'a std::collections::HashSet<&'a str>,
    outputs: &'a HashMap<&'a str, Option<BTreeSet<String>>>,
    locals: &'a [String],
    self_id: &'a str,
}

impl<'a> Refs<'a> {
    /// The same references with other local names.
    fn with_locals<'b>(&self, locals: &'b [String]) -> Refs<'b>
    where
        'a: 'b,
    {
        Refs {
            params: self.params,
            ids: self.ids,
            outputs: self.outputs,
            locals,
            self_id: self.self_id,
        }
    }

    fn plain(params: &'a IndexMap<String, ParamSpec>) -> Refs<'a> {
        static EMPTY_IDS: std::sync::OnceLock<std::collections::HashSet<&'static str>> =
            std::sync::OnceLock::new();
        static EMPTY: std::sync::OnceLock<HashMap<&'static str, Option<BTreeSet<String>>>> =
            std::sync::OnceLock::new();
        Refs {
            params,
            ids: EMPTY_IDS.get_or_init(Default::default),
            outputs: EMPTY.get_or_init(HashMap::new),
            locals: &[],
            self_id: "",
        }
    }
}

/// Check every template under `node`; returns the step ids referenced.
fn check_templates(node: &Node, refs: &Refs, d: &mut Diags) -> BTreeSet<String> {
    let mut steps = BTreeSet::new();
    walk_strings(node, &mut |s, pos| {
        if !is_template(s) {
            return;
        }
        match template::references(s) {
            Err(e) => d.push(
                pos,
                Code::TemplateSyntax,
                format!("template syntax error: {e}"),
            ),
            Ok(paths) => {
                for path in paths {
                    check_reference(&path, pos, refs, d, &mut steps);
                }
                for name in template::filters(s).unwrap_or_default() {
                    if !template::is_filter(&name) {
                        let hint = did_you_mean(&name, template::FILTER_NAMES.iter().copied())
                            .map(|s| format!("; did you mean `{s}`?"))
                            .unwrap_or_default();
                        d.push(
                            pos,
                            Code::UnknownFilter,
                            format!("unknown filter `{name}`{hint}"),
                        );
                    }
                }
            }
        }
    });
    steps
}

fn check_reference(path: &str, pos: Pos, refs: &Refs, d: &mut Diags, steps: &mut BTreeSet<String>) {
    let mut parts = path.split('.');
    let head = parts.next().unwrap_or_default();
    let second = parts.next();
    let third = parts.next();
    match head {
        "params" => {
            if let Some(p) = second {
                if !refs.params.contains_key(p) {
                    let hint = did_you_mean(p, refs.params.keys().map(String::as_str))
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    d.push(
                        pos,
                        Code::UnknownParam,
                        format!("unknown param `{p}`{hint}"),
                    );
                }
            }
        }
        "run" => {
            if let Some(f) = second {
                if !RUN_FIELDS.contains(&f) {
                    d.push(
                        pos,
                        Code::UnknownVariable,
                        format!(
                            "`run.{f}` does not exist; run has: {}",
                            RUN_FIELDS.join(", ")
                        ),
                    );
                }
            }
        }
        "steps" => {
            let Some(id) = second else { return };
            if !refs.ids.contains(&id) {
                let hint = did_you_mean(id, refs.ids.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                d.push(
                    pos,
                    Code::UnknownStep,
                    format!("unknown step `{id}` in `{path}`{hint}"),
                );
                return;
            }
            if id == refs.self_id {
                d.push(pos, Code::UnknownStep, format!("step `{id}` refers to its own outputs in `{path}`; use the result object instead"));
                return;
            }
            steps.insert(id.to_string());
            if let (Some(out), Some(Some(known))) = (third, refs.outputs.get(id)) {
                if !known.contains(out) {
                    let hint = did_you_mean(out, known.iter().map(String::as_str))
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    d.push(
                        pos,
                        Code::UnknownOutput,
                        format!("step `{id}` has no output `{out}`{hint}"),
                    );
                }
            }
        }
        other => {
            if refs.locals.iter().any(|l| l == other) {
                return;
            }
            let candidates: Vec<&str> = TEMPLATE_GLOBALS
                .iter()
                .copied()
                .chain(refs.locals.iter().map(String::as_str))
                .collect();
            let hint = did_you_mean(other, candidates.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            let available = if refs.locals.is_empty() {
                String::new()
            } else {
                format!(" (here also: {})", refs.locals.join(", "))
            };
            d.push(
                pos,
                Code::UnknownVariable,
                format!(
                    "unknown variable `{other}`{hint}; templates see params, steps, run{available}"
                ),
            );
        }
    }
}

/// Call `f` on every string scalar (not keys) under `node`.
pub fn walk_strings(node: &Node, f: &mut dyn FnMut(&str, Pos)) {
    match &node.value {
        Value::String(s) => f(s, node.pos),
        Value::Seq(items) => items.iter().for_each(|n| walk_strings(n, f)),
        Value::Map(entries) => entries.iter().for_each(|(_, v)| walk_strings(v, f)),
        _ => {}
    }
}
