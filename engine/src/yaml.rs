//! YAML text → a spanned [`Node`] tree.
//!
//! We keep our own tree instead of deserializing straight from a YAML crate because every
//! later stage needs positions: unknown keys, wrong types and bad references must point at
//! the node that causes them, and duplicate keys (which serde-based loaders silently
//! overwrite) must be reported. Scalars are resolved with the YAML 1.2 core schema; quoted
//! scalars stay strings.
//!
//! Hostile input is bounded here, before any tree exists: collections nest at most
//! [`MAX_DEPTH`] deep (block and flow alike, so no later recursive walk — deserializing,
//! rendering, dropping — can overflow the stack), and anchors and aliases may copy at most
//! [`MAX_ALIAS_NODES`] nodes in all (a "billion laughs" file of a few hundred bytes would
//! otherwise expand to gigabytes). Both are syntax errors (E001) at the offending node.

use crate::diag::{Code, Diags, Pos};
use saphyr_parser::{Event, Parser, ScalarStyle};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn new(pos: Pos, value: Value) -> Self {
        Node { pos, value }
    }
    pub fn null(pos: Pos) -> Self {
        Node {
            pos,
            value: Value::Null,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }
    /// The value under `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }
    /// The key node and value node under `key` in a mapping.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.key_str() == Some(key))
            .map(|(k, v)| (k, v))
    }
    /// A mapping key as text (scalars of any kind are accepted as keys).
    pub fn key_str(&self) -> Option<&str> {
        self.as_str()
    }
    /// Follow a path of map keys and sequence indexes.
    pub fn at(&self, path: &[PathSeg]) -> Option<&Node> {
        let mut node = self;
        for seg in path {
            node = match seg {
                PathSeg::Key(k) => node.get(k)?,
                PathSeg::Index(i) => node.as_seq()?.get(*i)?,
            };
        }
        Some(node)
    }
    pub fn kind(&self) -> &'static str {
        self.value.kind()
    }
    /// The node at a dotted path of map keys (`wait.until`), mutably.
    pub fn get_path_mut(&mut self, dotted: &str) -> Option<&mut Node> {
        let mut node = self;
        for key in dotted.split('.') {
            let Value::Map(entries) = &mut node.value else {
                return None;
            };
            node = entries
                .iter_mut()
                .find(|(k, _)| k.key_str() == Some(key))
                .map(|(_, v)| v)?;
        }
        Some(node)
    }
    /// The node as JSON (for values handed to templates or stored in history).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            Value::String(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.key_str().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
    /// A node built from JSON, every position set to `pos`.
    pub fn from_json(pos: Pos, v: &serde_json::Value) -> Node {
        use serde_json::Value as J;
        let value = match v {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => Value::String(s.clone()),
            J::Array(a) => Value::Seq(a.iter().map(|x| Node::from_json(pos, x)).collect()),
            J::Object(o) => Value::Map(
                o.iter()
                    .map(|(k, x)| {
                        (
                            Node::new(pos, Value::String(k.clone())),
                            Node::from_json(pos, x),
                        )
                    })
                    .collect(),
            ),
        };
        Node { pos, value }
    }
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// Resolve a plain scalar by the YAML 1.2 core schema.
pub fn resolve_plain(s: &str) -> Value {
    resolve_plain_inner(s).unwrap_or_else(|| Value::String(s.to_string()))
}

/// [`resolve_plain`] for anything but a string (`None`: the scalar is the string itself).
fn resolve_plain_inner(s: &str) -> Option<Value> {
    let special = match s {
        "" | "~" | "null" | "Null" | "NULL" => Some(Value::Null),
        "true" | "True" | "TRUE" => Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => Some(Value::Bool(false)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Some(Value::Float(f64::INFINITY)),
        "-.inf" | "-.Inf" | "-.INF" => Some(Value::Float(f64::NEG_INFINITY)),
        ".nan" | ".NaN" | ".NAN" => Some(Value::Float(f64::NAN)),
        _ => None,
    };
    if special.is_some() {
        return special;
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Some(Value::Int(i));
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Some(Value::Int(i));
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return Some(Value::Int(i));
        }
    }
    let looks_float = digits
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits.bytes().any(|b| b.is_ascii_digit());
    if looks_float {
        if let Ok(f) = s.parse::<f64>() {
            return Some(Value::Float(f));
        }
    }
    None
}

/// An open collection. Its children wait on a stack shared by all open collections of its
/// kind (from `start` on), so that each collection gets one allocation of its final size
/// when it closes instead of a vector grown step by step.
enum Frame {
    /// Position, start of the items, anchor.
    Seq(Pos, usize, usize),
    /// Position, start of the entries, the key waiting for its value, anchor, and (for large
    /// mappings) an index of the keys seen so far. Small mappings look their keys up in
    /// their entries.
    Map(
        Pos,
        usize,
        Option<Node>,
        usize,
        Option<HashMap<String, Pos>>,
    ),
}

/// How deep collections may nest (a pipeline needs about ten levels).
pub const MAX_DEPTH: usize = 64;

/// How many nodes the anchors and aliases of one file may copy together.
pub const MAX_ALIAS_NODES: usize = 100_000;

fn too_many_copies() -> String {
    format!("anchors and aliases copy more than {MAX_ALIAS_NODES} nodes (an alias bomb?); this file is not read further")
}

/// The number of nodes in a tree (at most [`MAX_DEPTH`] deep, so the recursion is bounded).
fn node_count(node: &Node) -> usize {
    1 + match &node.value {
        Value::Seq(items) => items.iter().map(node_count).sum(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| node_count(k) + node_count(v))
            .sum(),
        _ => 0,
    }
}

/// Mappings with at least this many keys index them in a hash map; smaller ones (almost all
/// of a pipeline) compare against their entries, which costs no allocation.
const KEY_INDEX_FROM: usize = 16;

/// Where a key was first defined in this mapping, if it was.
fn seen_key(
    entries: &[(Node, Node)],
    index: &Option<HashMap<String, Pos>>,
    name: &str,
) -> Option<Pos> {
    match index {
        Some(index) => index.get(name).copied(),
        None => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(k, _)| k.pos),
    }
}

/// A scalar's node value: plain scalars resolved by the core schema, others strings. The
/// text is moved, not copied, when the parser already owns it.
fn scalar_value(s: std::borrow::Cow<'_, str>, style: ScalarStyle) -> Value {
    if style != ScalarStyle::Plain {
        return Value::String(s.into_owned());
    }
    match resolve_plain_inner(&s) {
        Some(v) => v,
        None => Value::String(s.into_owned()),
    }
}

/// Parse one YAML document. Syntax errors end parsing (reported with their position);
/// duplicate keys are reported and the first value is kept so that checking can go on.
pub fn parse(text: &str, diags: &mut Diags) -> Option<Node> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut items: Vec<Node> = Vec::new();
    let mut entries: Vec<(Node, Node)> = Vec::new();
    // Each anchor's node and its node count (what one alias to it copies).
    let mut anchors: HashMap<usize, (Node, usize)> = HashMap::new();
    let mut alias_budget = MAX_ALIAS_NODES;
    let mut root: Option<Node> = None;
    let mut docs = 0;
    for item in Parser::new_from_str(text) {
        let (event, span) = match item {
            Ok(x) => x,
            Err(e) => {
                let m = e.marker();
                diags.push(
                    Pos {
                        line: m.line(),
                        col: m.col() + 1,
                    },
                    Code::YamlSyntax,
                    format!("invalid YAML: {}", e.info()),
                );
                return None;
            }
        };
        let pos = Pos {
            line: span.start.line(),
            col: span.start.col() + 1,
        };
        let finished: Option<(Node, usize)> = match event {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    diags.push(
                        pos,
                        Code::YamlSyntax,
                        "a pipeline file holds one YAML document; found a second `---`",
                    );
                    return root;
                }
                None
            }
            Event::Scalar(s, style, anchor, _tag) => {
                Some((Node::new(pos, scalar_value(s, style)), anchor))
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((_, size)) if *size > alias_budget => {
                    diags.push(pos, Code::YamlSyntax, too_many_copies());
                    return None;
                }
                Some((n, size)) => {
                    alias_budget -= size;
                    Some((
                        Node {
                            pos,
                            value: n.value.clone(),
                        },
                        0,
                    ))
                }
                None => {
                    diags.push(pos, Code::YamlSyntax, "unknown alias");
                    Some((Node::null(pos), 0))
                }
            },
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                diags.push(
                    pos,
                    Code::YamlSyntax,
                    format!("lists and mappings nest more than {MAX_DEPTH} deep here; this file is not read further"),
                );
                return None;
            }
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq(pos, items.len(), anchor));
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map(pos, entries.len(), None, anchor, None));
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(p, start, anchor)) => Some((
                    Node::new(p, Value::Seq(items.drain(start..).collect())),
                    anchor,
                )),
                _ => None,
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(p, start, _, anchor, _)) => {
                    let own: Vec<(Node, Node)> = entries.drain(start..).collect();
                    Some((Node::new(p, Value::Map(merge_keys(own))), anchor))
                }
                _ => None,
            },
            _ => None,
        };
        if let Some((node, anchor)) = finished {
            if anchor != 0 {
                // The anchor keeps a copy too: nested anchors copy what lies beneath each.
                let size = node_count(&node);
                if size > alias_budget {
                    diags.push(node.pos, Code::YamlSyntax, too_many_copies());
                    return None;
                }
                alias_budget -= size;
                anchors.insert(anchor, (node.clone(), size));
            }
            match stack.last_mut() {
                None => root = Some(node),
                Some(Frame::Seq(..)) => items.push(node),
                Some(Frame::Map(_, start, pending, _, index)) => match pending.take() {
                    None => *pending = Some(node),
                    Some(key) => {
                        let key_pos = key.pos;
                        // Keys are strings in this format: `1: x` is the key "1".
                        let name = match key.value {
                            Value::String(s) => Ok(s),
                            Value::Int(i) => Ok(i.to_string()),
                            Value::Bool(b) => Ok(b.to_string()),
                            Value::Float(f) => Ok(f.to_string()),
                            Value::Null => Ok("null".to_string()),
                            other => Err(other),
                        };
                        let key = match name {
                            Ok(name) => {
                                if let Some(first) = seen_key(&entries[*start..], index, &name) {
                                    diags.push(
                                        key_pos,
                                        Code::DuplicateKey,
                                        format!(
                                            "duplicate key `{name}` (first defined at line {}; this one is ignored)",
                                            first.line
                                        ),
                                    );
                                    continue;
                                }
                                if let Some(index) = index {
                                    index.insert(name.clone(), key_pos);
                                } else if entries.len() - *start + 1 >= KEY_INDEX_FROM {
                                    let mut built: HashMap<String, Pos> = entries[*start..]
                                        .iter()
                                        .filter_map(|(k, _)| Some((k.as_str()?.to_string(), k.pos)))
                                        .collect();
                                    built.insert(name.clone(), key_pos);
                                    *index = Some(built);
                                }
                                Node::new(key_pos, Value::String(name))
                            }
                            Err(other) => Node::new(key_pos, other),
                        };
                        entries.push((key, node));
                    }
                },
            }
        }
    }
    if root.is_none() && !diags.has_errors() {
        return Some(Node::null(Pos { line: 1, col: 1 }));
    }
    root
}

/// YAML merge keys (`<<: *defaults`): entries of the merged mapping(s) that the mapping does not set itself.
fn merge_keys(entries: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
    if !entries.iter().any(|(k, _)| k.as_str() == Some("<<")) {
        return entries;
    }
    let mut own = Vec::new();
    let mut merged = Vec::new();
    for (k, v) in entries {
        if k.as_str() == Some("<<") {
            let sources: Vec<Node> = match v.value {
                Value::Seq(items) => items,
                _ => vec![v],
            };
            for s in sources {
                if let Value::Map(m) = s.value {
                    merged.extend(m);
                }
            }
        } else {
            own.push((k, v));
        }
    }
    for (k, v) in merged {
        if !own.iter().any(|(o, _)| o.as_str() == k.as_str()) {
            own.push((k, v));
        }
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_point_at_the_node() {
        let mut d = Diags::new("x.yaml");
        let n = parse("a: 1\nb:\n  c: [x, 'y']\n", &mut d).unwrap();
        assert_eq!(n.get("a").unwrap().pos, Pos { line: 1, col: 4 });
        let c = n.get("b").unwrap().get("c").unwrap();
        assert_eq!(c.as_seq().unwrap()[1].pos, Pos { line: 3, col: 10 });
        assert_eq!(c.as_seq().unwrap()[1].value, Value::String("y".into()));
        assert!(d.items.is_empty());
    }

    #[test]
    fn duplicate_keys_are_reported_at_the_second_key() {
        let mut d = Diags::new("x.yaml");
        parse("a: 1\nb: 2\na: 3\n", &mut d).unwrap();
        assert_eq!(d.items.len(), 1);
        assert_eq!((d.items[0].line, d.items[0].column), (3, 1));
        assert_eq!(d.items[0].code, Code::DuplicateKey);
        let n = parse("a: 1\na: 3\n", &mut Diags::new("x")).unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Int(1));
    }

    #[test]
    fn duplicate_keys_in_a_large_mapping_are_reported_too() {
        let mut text: String = (0..40).map(|i| format!("k{i}: {i}\n")).collect();
        text.push_str("k3: x\nk39: y\n1: a\n\"1\": b\n");
        let mut d = Diags::new("x.yaml");
        let n = parse(&text, &mut d).unwrap();
        let lines: Vec<usize> = d.items.iter().map(|i| i.line).collect();
        assert_eq!(lines, [41, 42, 44]);
        assert!(d.items[0].message.contains("first defined at line 4"));
        assert_eq!(n.get("k3").unwrap().value, Value::Int(3));
        assert_eq!(n.get("1").unwrap().value, Value::String("a".into()));
        assert_eq!(n.as_map().unwrap().len(), 41);
    }

    #[test]
    fn syntax_error_has_a_position() {
        let mut d = Diags::new("x.yaml");
        assert!(parse("a: [1, 2\nb: 3\n", &mut d).is_none());
        assert_eq!(d.items[0].code, Code::YamlSyntax);
    }

    #[test]
    fn core_schema() {
        assert_eq!(resolve_plain("180"), Value::Int(180));
        assert_eq!(resolve_plain("1.5"), Value::Float(1.5));
        assert_eq!(resolve_plain("true"), Value::Bool(true));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("30s"), Value::String("30s".into()));
        assert_eq!(resolve_plain("2019-01"), Value::String("2019-01".into()));
        assert_eq!(resolve_plain("1e3"), Value::Float(1000.0));
    }

    #[test]
    fn an_alias_bomb_stops_at_the_alias_that_exceeds_the_budget() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, name) in ["b", "c", "d", "e", "f", "g", "h", "i"].iter().enumerate() {
            let prev = ["a", "b", "c", "d", "e", "f", "g", "h"][i];
            let list = vec![format!("*{prev}"); 10].join(", ");
            text.push_str(&format!("{name}: &{name} [{list}]\n"));
        }
        let mut d = Diags::new("x.yaml");
        assert!(parse(&text, &mut d).is_none());
        assert_eq!(d.items.len(), 1, "{:?}", d.items);
        assert_eq!(d.items[0].code, Code::YamlSyntax);
        assert!(
            d.items[0].message.contains("alias"),
            "{}",
            d.items[0].message
        );
        // Up to the budget, aliases are copies as before.
        let mut d = Diags::new("x.yaml");
        let n = parse("a: &a [1, 2]\nb: [*a, *a]\n", &mut d).unwrap();
        assert_eq!(n.get("b").unwrap().as_seq().unwrap().len(), 2);
        assert!(d.items.is_empty());
    }

    #[test]
    fn nested_anchors_count_their_copies_too() {
        // Each anchor copies everything beneath it: 64 levels over a large list.
        let big = vec!["x"; 5_000].join(", ");
        let text = format!(
            "{}[{big}]{}",
            (0..60).map(|i| format!("&a{i} [")).collect::<String>(),
            "]".repeat(60)
        );
        let mut d = Diags::new("x.yaml");
        assert!(parse(&text, &mut d).is_none());
        assert!(d.items[0].message.contains("alias bomb"), "{:?}", d.items);
    }

    #[test]
    fn nesting_is_limited_for_block_and_flow_collections() {
        for text in [
            "- ".repeat(100_000) + "x\n",
            "[".repeat(100_000),
            (0..MAX_DEPTH + 1)
                .map(|i| format!("{}k:\n", "  ".repeat(i)))
                .collect::<String>(),
        ] {
            let mut d = Diags::new("x.yaml");
            assert!(parse(&text, &mut d).is_none());
            assert_eq!(d.items[0].code, Code::YamlSyntax, "{:?}", d.items);
        }
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        let mut d = Diags::new("x.yaml");
        assert!(parse(&ok, &mut d).is_some(), "{:?}", d.items);
    }

    #[test]
    fn anchors_and_merge_keys() {
        let mut d = Diags::new("x.yaml");
        let n = parse("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", &mut d).unwrap();
        let o = n.get("other").unwrap();
        assert_eq!(o.get("x").unwrap().value, Value::Int(1));
        assert_eq!(o.get("y").unwrap().value, Value::Int(3));
    }
}
