//! serde over the spanned YAML tree, so typed configs keep their positions.
//!
//! Every error names the node that causes it: a wrong type points at the value, an unknown
//! key at the key, a missing key at the mapping. In [`Mode::Check`] (what `pipe validate`
//! does) unknown keys are all reported (with a did-you-mean) and skipped, so one pass finds
//! every one of them, and a templated scalar (`"{{ params.n }}"`) is accepted wherever a
//! number, boolean or enum belongs: it is checked again after rendering, in [`Mode::Run`].
//!
//! [`Raw`] defers part of a document: a field typed `Raw` keeps its node, to be
//! deserialized later on its own (each step separately, so one bad step does not hide the
//! errors of the others).

use crate::diag::{did_you_mean, Code, Diags, Pos};
use crate::template::is_template;
use crate::yaml::{Node, Value};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use std::cell::RefCell;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Validation: unrendered templates stand in for any scalar type.
    Check,
    /// After rendering: values must have their real types.
    Run,
}

/// A deserialization error with the position of the node that caused it.
#[derive(Debug, Clone)]
pub struct Error {
    pub pos: Option<Pos>,
    pub code: Code,
    pub message: String,
}

impl Error {
    fn at(mut self, pos: Pos) -> Self {
        if self.pos.is_none() {
            self.pos = Some(pos);
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            pos: None,
            code: Code::WrongType,
            message: msg.to_string(),
        }
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let found = match unexp {
            de::Unexpected::Str(s) => format!("the string `{s}`"),
            de::Unexpected::Signed(i) => format!("the integer {i}"),
            de::Unexpected::Unsigned(i) => format!("the integer {i}"),
            de::Unexpected::Float(f) => format!("the number {f}"),
            de::Unexpected::Bool(b) => format!("the boolean {b}"),
            de::Unexpected::Unit => "null".to_string(),
            de::Unexpected::Seq => "a list".to_string(),
            de::Unexpected::Map => "a mapping".to_string(),
            other => other.to_string(),
        };
        let exp = match exp.to_string().as_str() {
            "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)".to_string(),
            "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".to_string(),
            "f32" | "f64" => "a number".to_string(),
            "a boolean" | "bool" => "a boolean (true or false)".to_string(),
            other => other
                .replace("a map", "a mapping")
                .replace("a sequence", "a list"),
        };
        Error {
            pos: None,
            code: Code::WrongType,
            message: format!("expected {exp}, found {found}"),
        }
    }
    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Error {
            pos: None,
            code: Code::InvalidValue,
            message: format!("invalid value {unexp}, expected {exp}"),
        }
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Error {
            pos: None,
            code: Code::UnknownKey,
            message: unknown_key_message(field, expected),
        }
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let hint = did_you_mean(variant, expected.iter().copied())
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        Error {
            pos: None,
            code: Code::InvalidValue,
            message: format!(
                "unknown value `{variant}`{hint}; expected one of: {}",
                expected.join(", ")
            ),
        }
    }
    fn missing_field(field: &'static str) -> Self {
        Error {
            pos: None,
            code: Code::MissingKey,
            message: format!("missing required key `{field}`"),
        }
    }
    fn duplicate_field(field: &'static str) -> Self {
        Error {
            pos: None,
            code: Code::DuplicateKey,
            message: format!("duplicate key `{field}`"),
        }
    }
}

pub fn unknown_key_message(field: &str, expected: &[&str]) -> String {
    let hint = did_you_mean(field, expected.iter().copied())
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    if expected.is_empty() {
        format!("unknown key `{field}`: no keys are allowed here")
    } else {
        format!(
            "unknown key `{field}`{hint} (known keys: {})",
            expected.join(", ")
        )
    }
}

struct Ctx {
    mode: Mode,
    /// Problems that did not stop deserialization (unknown keys in Check mode).
    found: RefCell<Vec<(Pos, Code, String)>>,
}

/// Deserialize `T` from a node. Problems go to `diags`; `None` when `T` could not be built.
pub fn from_node<T: DeserializeOwned>(node: &Node, mode: Mode, diags: &mut Diags) -> Option<T> {
    let ctx = Ctx {
        mode,
        found: RefCell::new(Vec::new()),
    };
    let result = T::deserialize(De { node, ctx: &ctx });
    for (pos, code, msg) in ctx.found.into_inner() {
        diags.push(pos, code, msg);
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            diags.push(e.pos.unwrap_or(node.pos), e.code, e.message);
            None
        }
    }
}

/// Like [`from_node`] on a mapping, but a value that cannot be read is reported and left
/// out, and the rest is read again, so one wrong value does not hide the problems of its
/// siblings. `None` when the mapping still cannot be read (a required key is missing).
pub fn from_map_tolerant<T: DeserializeOwned>(
    node: &Node,
    mode: Mode,
    diags: &mut Diags,
) -> Option<T> {
    // The common case (it reads) costs no copy.
    let mut local = Diags::new(&diags.file);
    if let Some(v) = from_node::<T>(node, mode, &mut local) {
        diags.items.extend(local.items);
        return Some(v);
    }
    let mut node = node.clone();
    for _ in 0..16 {
        let mut local = Diags::new(&diags.file);
        if let Some(v) = from_node::<T>(&node, mode, &mut local) {
            diags.items.extend(local.items);
            return Some(v);
        }
        let failed = local
            .items
            .iter()
            .find(|d| d.code != Code::UnknownKey)
            .map(|d| Pos {
                line: d.line,
                col: d.column,
            });
        diags.items.extend(local.items);
        let pos = failed?;
        if pos == node.pos {
            return None;
        }
        let Value::Map(entries) = &mut node.value else {
            return None;
        };
        // The entry the failing position lies in: the last one starting at or before it.
        let i = entries.iter().rposition(|(k, _)| k.pos <= pos)?;
        entries.remove(i);
    }
    None
}

/// A part of the document kept as a node, deserialized later on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw(pub Node);

const RAW_TOKEN: &str = "$pipe::Raw";

thread_local! {
    static RAW_SLOT: RefCell<Option<Node>> = const { RefCell::new(None) };
}

impl<'de> de::Deserialize<'de> for Raw {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a YAML node")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
                RAW_SLOT
                    .with(|s| s.borrow_mut().take())
                    .map(Raw)
                    .ok_or_else(|| E::custom("Raw can only be read from a pipe YAML document"))
            }
        }
        d.deserialize_newtype_struct(RAW_TOKEN, V)
    }
}

#[derive(Clone, Copy)]
struct De<'a> {
    node: &'a Node,
    ctx: &'a Ctx,
}

impl<'a> De<'a> {
    fn child(&self, node: &'a Node) -> De<'a> {
        De {
            node,
            ctx: self.ctx,
        }
    }
    fn templated(&self) -> Option<&'a str> {
        match &self.node.value {
            Value::String(s) if is_template(s) => Some(s),
            _ => None,
        }
    }
    fn any<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match &self.node.value {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Int(i) => v.visit_i64(*i),
            Value::Float(f) => v.visit_f64(*f),
            Value::String(s) => v.visit_str(s),
            Value::Seq(items) => v.visit_seq(Seq {
                items: items.iter(),
                de: self,
            }),
            Value::Map(entries) => v.visit_map(Map {
                entries: entries.iter().collect(),
                i: 0,
                de: self,
                value: None,
            }),
        }
    }
    fn number<'de, V: Visitor<'de>>(self, v: V, float: bool) -> Result<V::Value, Error> {
        if let Value::String(s) = &self.node.value {
            if self.templated().is_some() && self.ctx.mode == Mode::Check {
                return if float {
                    v.visit_f64(0.0)
                } else {
                    v.visit_i64(0)
                };
            }
            if self.ctx.mode == Mode::Run {
                if let Ok(i) = s.trim().parse::<i64>() {
                    return v.visit_i64(i);
                }
                if let Ok(f) = s.trim().parse::<f64>() {
                    return v.visit_f64(f);
                }
            }
        }
        self.any(v)
    }
}

macro_rules! at_pos {
    ($self:ident, $e:expr) => {{
        let pos = $self.node.pos;
        $e.map_err(|e: Error| e.at(pos))
    }};
}

macro_rules! numbers {
    ($($m:ident $float:expr),*) => {$(
        fn $m<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            at_pos!(self, self.number(v, $float))
        }
    )*};
}

impl<'de, 'a> de::Deserializer<'de> for De<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        at_pos!(self, self.any(v))
    }

    numbers!(deserialize_i8 false, deserialize_i16 false, deserialize_i32 false, deserialize_i64 false,
        deserialize_u8 false, deserialize_u16 false, deserialize_u32 false, deserialize_u64 false,
        deserialize_i128 false, deserialize_u128 false, deserialize_f32 true, deserialize_f64 true);

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            Value::String(_) if self.templated().is_some() && self.ctx.mode == Mode::Check => {
                v.visit_bool(false)
            }
            Value::String(s) if self.ctx.mode == Mode::Run && (s == "true" || s == "false") => {
                v.visit_bool(s == "true")
            }
            _ => self.any(v),
        };
        at_pos!(self, r)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            Value::String(s) => v.visit_str(s),
            // `args: [1, true]` means the strings "1" and "true".
            Value::Int(i) => v.visit_string(i.to_string()),
            Value::Float(f) => v.visit_string(f.to_string()),
            Value::Bool(b) => v.visit_string(b.to_string()),
            _ => self.any(v),
        };
        at_pos!(self, r)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.node.value {
            Value::Null => at_pos!(self, v.visit_none()),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        if name == RAW_TOKEN {
            RAW_SLOT.with(|s| *s.borrow_mut() = Some(self.node.clone()));
            return at_pos!(self, v.visit_unit());
        }
        at_pos!(self, v.visit_newtype_struct(self))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_any(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            Value::Map(entries) => {
                let mut kept = Vec::with_capacity(entries.len());
                for entry in entries {
                    let key = entry.0.key_str().unwrap_or_default();
                    if self.ctx.mode == Mode::Check && !fields.contains(&key) {
                        self.ctx.found.borrow_mut().push((
                            entry.0.pos,
                            Code::UnknownKey,
                            unknown_key_message(key, fields),
                        ));
                    } else {
                        kept.push(entry);
                    }
                }
                v.visit_map(Map {
                    entries: kept,
                    i: 0,
                    de: self,
                    value: None,
                })
            }
            _ => self.any(v),
        };
        at_pos!(self, r)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            Value::String(s) => {
                let name = if self.templated().is_some() && self.ctx.mode == Mode::Check {
                    variants.first().copied().unwrap_or_default()
                } else {
                    s.as_str()
                };
                let d: de::value::StrDeserializer<'_, Error> = name.into_deserializer();
                v.visit_enum(d)
            }
            Value::Int(i) => v.visit_enum(i.to_string().into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => v.visit_enum(Enum {
                key: &entries[0].0,
                value: &entries[0].1,
                de: self,
            }),
            _ => self.any(v),
        };
        at_pos!(self, r)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

impl<'de> IntoDeserializer<'de, Error> for De<'_> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

struct Seq<'a> {
    items: std::slice::Iter<'a, Node>,
    de: De<'a>,
}

impl<'de, 'a> de::SeqAccess<'de> for Seq<'a> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.items.next() {
            Some(node) => seed
                .deserialize(self.de.child(node))
                .map(Some)
                .map_err(|e| e.at(node.pos)),
            None => Ok(None),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Map<'a> {
    entries: Vec<&'a (Node, Node)>,
    i: usize,
    de: De<'a>,
    value: Option<&'a Node>,
}

impl<'de, 'a> de::MapAccess<'de> for Map<'a> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(entry) = self.entries.get(self.i) else {
            return Ok(None);
        };
        self.i += 1;
        self.value = Some(&entry.1);
        seed.deserialize(self.de.child(&entry.0))
            .map(Some)
            .map_err(|e| e.at(entry.0.pos))
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self.value.take().expect("value after key");
        seed.deserialize(self.de.child(node))
            .map_err(|e| e.at(node.pos))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len() - self.i)
    }
}

struct Enum<'a> {
    key: &'a Node,
    value: &'a Node,
    de: De<'a>,
}

impl<'de, 'a> de::EnumAccess<'de> for Enum<'a> {
    type Error = Error;
    type Variant = De<'a>;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, De<'a>), Error> {
        let v = seed
            .deserialize(self.de.child(self.key))
            .map_err(|e| e.at(self.key.pos))?;
        Ok((v, self.de.child(self.value)))
    }
}

impl<'de, 'a> de::VariantAccess<'de> for De<'a> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_any(self, v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_struct(self, "", fields, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        command: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        timeout: Option<u32>,
        #[serde(default)]
        mode: Option<Kind>,
        #[serde(default)]
        rest: Option<Raw>,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        Warn,
        Fail,
    }

    fn load(text: &str, mode: Mode) -> (Option<Cfg>, Diags) {
        let mut d = Diags::new("t.yaml");
        let node = crate::yaml::parse(text, &mut d).unwrap();
        let c = from_node::<Cfg>(&node, mode, &mut d);
        (c, d)
    }

    #[test]
    fn unknown_keys_all_reported_with_hint() {
        let (c, d) = load("command: x\ncomand: y\nargz: []\n", Mode::Check);
        assert!(c.is_some());
        assert_eq!(d.items.len(), 2, "{:?}", d.items);
        assert_eq!((d.items[0].line, d.items[0].column), (2, 1));
        assert!(
            d.items[0].message.contains("did you mean `command`"),
            "{}",
            d.items[0].message
        );
    }

    #[test]
    fn wrong_type_points_at_value() {
        let (c, d) = load("command: x\ntimeout: soon\n", Mode::Check);
        assert!(c.is_none());
        assert_eq!((d.items[0].line, d.items[0].column), (2, 10));
        assert_eq!(d.items[0].code, Code::WrongType);
        assert!(
            d.items[0].message.contains("found the string `soon`"),
            "{}",
            d.items[0].message
        );
    }

    #[test]
    fn templates_stand_in_for_scalars_in_check_mode() {
        let (c, d) = load(
            "command: x\ntimeout: '{{ params.t }}'\nmode: '{{ params.m }}'\n",
            Mode::Check,
        );
        assert!(c.is_some(), "{:?}", d.items);
        let (c, _) = load("command: x\ntimeout: '{{ params.t }}'\n", Mode::Run);
        assert!(c.is_none());
    }

    #[test]
    fn missing_key_points_at_mapping_and_bad_variant_lists_values() {
        let (_, d) = load("args: [a]\n", Mode::Check);
        assert_eq!(d.items[0].code, Code::MissingKey);
        let (_, d) = load("command: x\nmode: wran\n", Mode::Check);
        assert_eq!((d.items[0].line, d.items[0].column), (2, 7));
        assert!(
            d.items[0].message.contains("did you mean `warn`"),
            "{}",
            d.items[0].message
        );
    }

    #[test]
    fn raw_keeps_the_node() {
        let (c, _) = load(
            "command: x\nrest: {a: [1, 2]}\nargs: [1, true]\n",
            Mode::Check,
        );
        let c = c.unwrap();
        assert_eq!(c.args, vec!["1", "true"]);
        let raw = c.rest.unwrap().0;
        assert_eq!(raw.pos.line, 2);
        assert!(raw.get("a").is_some());
    }
}
