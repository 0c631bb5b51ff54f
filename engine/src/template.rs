//! Templates: minijinja expressions inside YAML string scalars, rendered at run time.
//!
//! Why this shape:
//! - Rendering happens per string scalar (never on the YAML text), so a template can't break
//!   the document structure and every error points at the scalar that caused it.
//! - `UndefinedBehavior::Strict`: a typo such as `params.dayz` must fail the step, not quietly
//!   render an empty string into a SQL query or a file path.
//! - A scalar that is exactly one `{{ expr }}` yields the expression's native value (an integer
//!   stays an integer, a list stays a list), so `limit: "{{ params.days }}"` is a number.
//! - minijinja has no date type, so dates travel as `YYYY-MM-DD` text and datetimes as
//!   RFC 3339 text with an offset. Two small objects fill the gaps: a *zoned* datetime (from
//!   `now()`, `to_timezone()`, `parse()` of local text) that remembers its IANA zone so that
//!   calendar arithmetic is DST-correct, and a *month* (the `month` param type). Both render
//!   as plain text; compare them as text with `| string`.
//! - [`references`] is a static check (syntax + referenced variable paths) so `pipe validate`
//!   can catch bad references without running anything.

use crate::diag::Pos;
use crate::secrets::Redactor;
use crate::yaml::{Node, Value as YValue};
use chrono::{
    DateTime, Datelike, Days, FixedOffset, Months, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    SecondsFormat, TimeZone, Utc,
};
use chrono_tz::Tz;
use minijinja::value::{Enumerator, Object, ObjectRepr, Rest};
use minijinja::{Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// Names that templates may use without them being variables: our globals and functions, and
/// minijinja's builtins. [`references`] leaves them out.
const NOT_VARIABLES: &[&str] = &[
    // ours
    "env",
    "secret",
    "now",
    "today",
    "add_days",
    "add_months",
    "month_start",
    "month_end",
    "format",
    "parse",
    "isoformat",
    "to_timezone",
    // minijinja builtins and special names
    "range",
    "loop",
    "namespace",
    "dict",
    "debug",
    "lipsum",
    "cycler",
    "joiner",
    "self",
    "super",
    "caller",
    "varargs",
    "kwargs",
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
];

/// Whether `s` contains template syntax.
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// Static check without rendering: syntax + the referenced variable paths.
///
/// Returns the nested undeclared variable paths (e.g. `steps.login.tmp`, `params.days`,
/// `values`) minus globals, functions and builtins, or `Err(message)` on a syntax error.
pub fn references(src: &str) -> Result<BTreeSet<String>, String> {
    // Fast path for the most common shape, `{{ a.b.c }}`: no need to compile a template.
    if let Some(path) = lone_path(src) {
        let first = path.split('.').next().unwrap_or_default();
        let mut set = BTreeSet::new();
        if !NOT_VARIABLES.contains(&first) {
            set.insert(path.to_string());
        }
        return Ok(set);
    }
    // Next most common: text with several simple `{{ … }}` tags (`{{ a.b }}-{{ c }}`,
    // `{{ params.days > 2 }}`). Most such texts are unique (they name their step), so the
    // cache below would not help them.
    if let Some(set) = simple_tags(src) {
        return Ok(set);
    }
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<String, Result<BTreeSet<String>, String>>> =
            Default::default();
    }
    if let Some(hit) = CACHE.with(|c| c.borrow().get(src).cloned()) {
        return hit;
    }
    let result = compile_references(src);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() > 10_000 {
            c.clear();
        }
        c.insert(src.to_string(), result.clone());
    });
    result
}

/// `{{ a.b.c }}` (identifiers and dots only, nothing else in the string) → `a.b.c`.
fn lone_path(src: &str) -> Option<&str> {
    let inner = src.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let ok = !inner.is_empty()
        && inner.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    ok.then_some(inner)
}

/// Words that make a tag more than a path: such tags go to minijinja.
const KEYWORDS: &[&str] = &[
    "and", "or", "not", "in", "is", "if", "else", "for", "true", "false", "none", "True", "False",
    "None",
];

/// A dotted path of identifiers (`a.b.c`), none of them a keyword.
fn simple_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !KEYWORDS.contains(&part)
        })
}

/// The references of a text whose tags are all `{{ path }}` or `{{ path OP integer }}`
/// (OP one of `> < >= <= == != * + / %`), with no `{%`, `{#` or whitespace control;
/// `None` for anything else (minijinja then decides).
fn simple_tags(src: &str) -> Option<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    let mut rest = src;
    let mut tags = 0;
    loop {
        let Some(open) = rest.find("{{") else {
            if rest.contains("{%") || rest.contains("{#") || rest.contains("}}") {
                return None;
            }
            break;
        };
        let text = &rest[..open];
        if text.contains("{%") || text.contains("{#") || text.contains("}}") {
            return None;
        }
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        let inner = &after[..close];
        if inner.contains('{') {
            return None;
        }
        let mut words = inner.split_ascii_whitespace();
        let path = words.next()?;
        if !simple_path(path) {
            return None;
        }
        match (words.next(), words.next(), words.next()) {
            (None, _, _) => {}
            (Some(op), Some(n), None)
                if matches!(
                    op,
                    ">" | "<" | ">=" | "<=" | "==" | "!=" | "*" | "+" | "/" | "%"
                ) && n.bytes().all(|b| b.is_ascii_digit()) =>
            {
                // `{{a>1}}` and friends (no spaces) fall to minijinja: `path` checked above.
            }
            _ => return None,
        }
        let first = path.split('.').next().unwrap_or_default();
        if !NOT_VARIABLES.contains(&first) {
            set.insert(path.to_string());
        }
        tags += 1;
        rest = &after[close + 2..];
    }
    (tags > 0).then_some(set)
}

fn compile_references(src: &str) -> Result<BTreeSet<String>, String> {
    let fixed = fix_unary_minus(src);
    let env = Environment::new();
    let tmpl = env
        .template_from_str(&fixed)
        .map_err(|e| describe(&e, src))?;
    Ok(tmpl
        .undeclared_variables(true)
        .into_iter()
        .filter(|path| {
            let first = path.split('.').next().unwrap_or_default();
            !NOT_VARIABLES.contains(&first)
        })
        .collect())
}

/// The filters a template applies (`{{ x | upper }}`, `{% filter upper %}`), read from its
/// compiled code; `Err` on a syntax error. minijinja looks filters up only when it renders,
/// so without this an unknown filter passes `pipe validate` and fails the run.
pub fn filters(src: &str) -> Result<BTreeSet<String>, String> {
    use minijinja::machinery::{get_compiled_template, Instruction, Instructions};
    let mut found = BTreeSet::new();
    if !src.contains('|') && !src.contains("filter") {
        return Ok(found);
    }
    let fixed = fix_unary_minus(src);
    let env = Environment::new();
    let tmpl = env
        .template_from_str(&fixed)
        .map_err(|e| describe(&e, src))?;
    let compiled = get_compiled_template(&tmpl);
    let mut collect = |code: &Instructions| {
        for i in 0..code.len() as u32 {
            if let Some(Instruction::ApplyFilter(name, ..)) = code.get(i) {
                found.insert(name.to_string());
            }
        }
    };
    collect(&compiled.instructions);
    compiled.blocks.values().for_each(&mut collect);
    Ok(found)
}

/// Whether templates of a run know the filter `name` (minijinja's built-ins and pipe's own;
/// asked of the very environment runs use, so the answer cannot drift from it).
pub fn is_filter(name: &str) -> bool {
    static TEMPLATES: std::sync::OnceLock<Templates> = std::sync::OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        Templates::new(Runtime {
            redactor: Redactor::new(),
            tz: Tz::UTC,
            logical_date: Utc::now(),
            dry_run: true,
            overrides: Overrides::default(),
        })
    });
    thread_local! {
        // Each name is probed once per thread: validate asks for every filter of every file.
        static KNOWN: std::cell::RefCell<std::collections::HashMap<String, bool>> = Default::default();
    }
    if let Some(known) = KNOWN.with(|k| k.borrow().get(name).copied()) {
        return known;
    }
    let probe = format!("{{{{ none | {name} }}}}");
    let known = match templates.env.render_str(&probe, ()) {
        Ok(_) => true,
        Err(e) => e.kind() != ErrorKind::UnknownFilter && e.kind() != ErrorKind::SyntaxError,
    };
    KNOWN.with(|k| k.borrow_mut().insert(name.to_string(), known));
    known
}

/// Filter names for "did you mean" hints (the check itself is [`is_filter`]).
pub const FILTER_NAMES: &[&str] = &[
    "abs",
    "attr",
    "batch",
    "bool",
    "capitalize",
    "chain",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "first",
    "float",
    "format",
    "groupby",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "lines",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "pprint",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "slice",
    "sort",
    "split",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "urlencode",
    "zip",
    "add_days",
    "add_months",
    "month_start",
    "month_end",
    "parse",
    "isoformat",
    "to_timezone",
];

/// JSON -> template value (for params/steps maps).
pub fn json_to_value(v: &serde_json::Value) -> Value {
    Value::from_serialize(v)
}

/// How names resolve in one run, instead of the process defaults: values that `env()` and
/// `secret()` return before anything else (under `--sandbox`, the pipeline's `sandbox:`
/// block points them at the local fakes), where `secret()` looks next (the environment by
/// default; a service gives its stored credentials), and what a connection name stands for
/// (under `--sandbox`, the fakes). The validated plan is never rewritten for a run.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub env: std::collections::HashMap<String, String>,
    pub secrets: std::collections::HashMap<String, String>,
    /// Where `secret()` reads a name that `secrets` does not hold.
    pub secret_source: crate::secrets::Secrets,
    /// Connections that stand in for the plan's, by name (see [`crate::connection`]).
    pub connections: crate::connection::ConnectionOverrides,
}

/// Settings of one run that templates need.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Learns every value `secret()` returns.
    pub redactor: Redactor,
    /// The pipeline's time zone (default for `now()`, `today()`, naive datetimes).
    pub tz: Tz,
    /// The run's logical date (what `today()` means).
    pub logical_date: DateTime<Utc>,
    /// In a dry run `secret()` returns `***` without looking anything up.
    pub dry_run: bool,
    /// Values that stand in for environment variables and secrets (`--sandbox`).
    pub overrides: Overrides,
}

/// The variables a template sees: `params`, `steps`, `run` and extra locals.
#[derive(Debug, Clone)]
pub struct Scope {
    vars: Arc<BTreeMap<String, Value>>,
}

impl Scope {
    pub fn new(params: Value, steps: Value, run: Value) -> Scope {
        let mut vars = BTreeMap::new();
        vars.insert("params".to_string(), params);
        vars.insert("steps".to_string(), steps);
        vars.insert("run".to_string(), run);
        Scope {
            vars: Arc::new(vars),
        }
    }

    /// A copy of the scope with one local added or overridden.
    pub fn with(&self, name: &str, value: Value) -> Scope {
        let mut vars = (*self.vars).clone();
        vars.insert(name.to_string(), value);
        Scope {
            vars: Arc::new(vars),
        }
    }

    /// The value of a top-level variable.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.vars.get(name)
    }

    fn context(&self) -> Value {
        Value::from_object(ScopeObj(self.vars.clone()))
    }
}

#[derive(Debug)]
struct ScopeObj(Arc<BTreeMap<String, Value>>);

impl Object for ScopeObj {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_str()?).cloned()
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.keys().map(|k| Value::from(k.as_str())).collect())
    }
}

/// The template environment of one run: functions and filters, built once.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    rt: Runtime,
}

impl Templates {
    pub fn new(rt: Runtime) -> Templates {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Block scalars (`|`) end with a newline; keep it.
        env.set_keep_trailing_newline(true);
        // Pipelines speak YAML and JSON: booleans render as `true`/`false`, not Python's `True`.
        env.set_formatter(|out, state, value| {
            if value.kind() == minijinja::value::ValueKind::Bool {
                out.write_str(if value.is_true() { "true" } else { "false" })?;
                return Ok(());
            }
            minijinja::escape_formatter(out, state, value)
        });
        register(&mut env, &rt);
        Templates { env, rt }
    }

    /// The run settings these templates were built with.
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// Render one string. A string that is a single `{{ expr }}` yields the expression's native
    /// value as JSON; other templates render to a JSON string; plain text is returned as is.
    pub fn render_str(&self, src: &str, scope: &Scope) -> Result<serde_json::Value, String> {
        if !is_template(src) {
            return Ok(serde_json::Value::String(src.to_string()));
        }
        let fixed = fix_unary_minus(src);
        if let Some(expr) = single_expression(&fixed) {
            if let Ok(compiled) = self.env.compile_expression_owned(expr.to_string()) {
                let v = compiled
                    .eval(scope.context())
                    .map_err(|e| self.explain(&e, src, scope))?;
                if v.is_undefined() {
                    return Err(self.undefined_message(src, scope));
                }
                return serde_json::to_value(&v)
                    .map_err(|e| format!("cannot use the value of `{}`: {e}", src.trim()));
            }
            // Not a valid lone expression: let the template compiler report it.
        }
        self.env
            .render_str(&fixed, scope.context())
            .map(serde_json::Value::String)
            .map_err(|e| self.explain(&e, src, scope))
    }

    /// Render every string scalar in a YAML tree (map keys are not rendered).
    pub fn render_node(&self, node: &Node, scope: &Scope) -> Result<Node, (Pos, String)> {
        let value = match &node.value {
            YValue::String(s) if is_template(s) => {
                let v = self.render_str(s, scope).map_err(|m| (node.pos, m))?;
                return Ok(Node::from_json(node.pos, &v));
            }
            YValue::Seq(items) => YValue::Seq(
                items
                    .iter()
                    .map(|n| self.render_node(n, scope))
                    .collect::<Result<_, _>>()?,
            ),
            YValue::Map(entries) => YValue::Map(
                entries
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.render_node(v, scope)?)))
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        };
        Ok(Node::new(node.pos, value))
    }

    /// Render and take truthiness (for `if:`). Plain text must be `true` or `false`.
    pub fn truthy(&self, src: &str, scope: &Scope) -> Result<bool, String> {
        let literal = |s: &str| match s.trim() {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" | "" => Ok(false),
            other => Err(format!(
                "expected a condition (`true`, `false` or a template), got `{other}`"
            )),
        };
        if !is_template(src) {
            return literal(src);
        }
        let fixed = fix_unary_minus(src);
        if let Some(expr) = single_expression(&fixed) {
            if let Ok(compiled) = self.env.compile_expression_owned(expr.to_string()) {
                let v = compiled
                    .eval(scope.context())
                    .map_err(|e| self.explain(&e, src, scope))?;
                if v.is_undefined() {
                    return Err(self.undefined_message(src, scope));
                }
                return Ok(v.is_true());
            }
        }
        let text = self
            .env
            .render_str(&fixed, scope.context())
            .map_err(|e| self.explain(&e, src, scope))?;
        literal(&text)
    }

    fn explain(&self, e: &Error, src: &str, scope: &Scope) -> String {
        if e.kind() == ErrorKind::UndefinedError {
            if let Some(path) = undefined_path(src, scope) {
                return path;
            }
        }
        describe(e, src)
    }

    fn undefined_message(&self, src: &str, scope: &Scope) -> String {
        undefined_path(src, scope).unwrap_or_else(|| format!("`{}` is undefined", src.trim()))
    }
}

/// minijinja parses `-a.b` as `(-a).b` (unary minus binds tighter than attribute access), so
/// `add_days(-params.days)` would negate the `params` map. Rewrite a unary minus in front of
/// a variable's postfix chain (`.x`, `[i]`, `(args)`) to `-(a.b)`, inside tags only.
fn fix_unary_minus(src: &str) -> Cow<'_, str> {
    if !src.contains('-') || !is_template(src) {
        return Cow::Borrowed(src);
    }
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len() + 8);
    let mut i = 0;
    let mut last = 0; // bytes before `last` are already copied
    let mut changed = false;
    // Ends of the chains opened with `(` and not closed yet (innermost last).
    let mut closes: Vec<usize> = Vec::new();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        close_chains(&mut closes, i, src, &mut out, &mut last);
        // Find the next tag.
        let close: &[u8] = match (b[i], b.get(i + 1)) {
            (b'{', Some(b'{')) => b"}}",
            (b'{', Some(b'%')) => b"%}",
            (b'{', Some(b'#')) => {
                i = find(b, i + 2, b"#}").map_or(b.len(), |e| e + 2);
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        i += 2;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1; // whitespace control
        }
        // `prev` is the last significant byte (0 at the start of the tag), `word` the last word.
        let mut prev = 0u8;
        let mut word = "";
        while i < b.len() && !b[i..].starts_with(close) {
            close_chains(&mut closes, i, src, &mut out, &mut last);
            let c = b[i];
            if c == b'\'' || c == b'"' {
                i = skip_string(b, i);
                prev = b'"';
                continue;
            }
            if c.is_ascii_whitespace() {
                i += 1;
                continue;
            }
            if ident(c) {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                word = &src[start..i];
                prev = b'a';
                continue;
            }
            let after_value = match prev {
                b'a' => !matches!(
                    word,
                    "and" | "or" | "not" | "in" | "is" | "if" | "else" | "elif" | "return"
                ),
                b'"' | b')' | b']' | b'}' => true,
                _ => false,
            };
            let unary = c == b'-' && !after_value;
            if unary {
                let mut j = i + 1;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                if j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_') {
                    let start = j;
                    while j < b.len() && ident(b[j]) {
                        j += 1;
                    }
                    let mut postfix = false;
                    loop {
                        match b.get(j) {
                            Some(b'.') if b.get(j + 1).is_some_and(|&c| ident(c)) => {
                                j += 1;
                                while j < b.len() && ident(b[j]) {
                                    j += 1;
                                }
                            }
                            Some(b'[') => j = skip_brackets(b, j, b'[', b']'),
                            Some(b'(') => j = skip_brackets(b, j, b'(', b')'),
                            _ => break,
                        }
                        postfix = true;
                    }
                    if postfix {
                        // Open here; close at the chain's end, once the scan inside it (which
                        // may open nested chains: `-f(-a.b)`) has passed it. An inner chain
                        // never closes after its outer one, even in unbalanced text.
                        let end = closes.last().map_or(j, |&outer: &usize| j.min(outer));
                        out.push_str(&src[last..start]);
                        out.push('(');
                        last = start;
                        closes.push(end);
                        changed = true;
                    }
                    // Continue scanning inside the chain (nested minus in subscripts/args).
                    i = start;
                    prev = c;
                    continue;
                }
            }
            prev = c;
            i += 1;
        }
        i += close.len();
    }
    if !changed {
        return Cow::Borrowed(src);
    }
    close_chains(&mut closes, usize::MAX, src, &mut out, &mut last);
    out.push_str(&src[last..]);
    Cow::Owned(out)
}

/// Close every pending chain that ends at or before `at`: copy the text up to its end, then
/// `)`.
fn close_chains(closes: &mut Vec<usize>, at: usize, src: &str, out: &mut String, last: &mut usize) {
    while let Some(&end) = closes.last() {
        if end > at {
            break;
        }
        let end = end.min(src.len()).max(*last);
        out.push_str(&src[*last..end]);
        out.push(')');
        *last = end;
        closes.pop();
    }
}

fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    (from..b.len()).find(|&k| b[k..].starts_with(needle))
}

/// Index after the string literal starting at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut k = i + 1;
    while k < b.len() && b[k] != q {
        k += if b[k] == b'\\' { 2 } else { 1 };
    }
    (k + 1).min(b.len())
}

/// Index after the bracket group starting at `i` (strings inside are skipped).
fn skip_brackets(b: &[u8], i: usize, open: u8, close: u8) -> usize {
    let mut depth = 0;
    let mut k = i;
    while k < b.len() {
        let c = b[k];
        if c == b'\'' || c == b'"' {
            k = skip_string(b, k);
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return k + 1;
            }
        }
        k += 1;
    }
    b.len()
}

/// `{{ expr }}` alone (whitespace around allowed) -> `expr`.
fn single_expression(src: &str) -> Option<&str> {
    let t = src.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    if ["{{", "}}", "{%", "%}", "{#", "#}"]
        .iter()
        .any(|m| inner.contains(m))
    {
        return None;
    }
    let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner);
    Some(inner.trim())
}

/// A short message for a minijinja error, without the template name.
fn describe(e: &Error, src: &str) -> String {
    let mut msg = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    if src.contains('\n') {
        if let Some(line) = e.line() {
            msg.push_str(&format!(" (line {line})"));
        }
    }
    msg
}

/// Find the first referenced path that is undefined in `scope`, as a message.
fn undefined_path(src: &str, scope: &Scope) -> Option<String> {
    for path in references(src).ok()? {
        let mut parts = path.split('.');
        let first = parts.next()?;
        let Some(mut v) = scope.get(first).cloned() else {
            let known: Vec<&str> = scope.vars.keys().map(String::as_str).collect();
            return Some(format!(
                "`{first}` is undefined (known: {})",
                known.join(", ")
            ));
        };
        let mut prefix = first.to_string();
        for part in parts {
            let next = v.get_attr(part).unwrap_or(Value::UNDEFINED);
            if next.is_undefined() {
                let mut msg = format!("`{prefix}.{part}` is undefined");
                if let Ok(keys) = v.try_iter() {
                    if matches!(v.as_object().map(|o| o.repr()), Some(ObjectRepr::Map))
                        || v.kind() == minijinja::value::ValueKind::Map
                    {
                        let keys: Vec<String> = keys.take(20).map(|k| k.to_string()).collect();
                        if !keys.is_empty() {
                            msg.push_str(&format!(" ({prefix} has: {})", keys.join(", ")));
                        }
                    }
                }
                return Some(msg);
            }
            prefix.push('.');
            prefix.push_str(part);
            v = next;
        }
    }
    None
}

/// The `run` variable: `run.id`, `run.started_at`, `run.logical_date` (RFC 3339 in UTC),
/// `run.today` (`YYYY-MM-DD` in `tz`) and `run.tz`.
pub fn run_value(id: i64, started_at: DateTime<Utc>, logical_date: DateTime<Utc>, tz: Tz) -> Value {
    let mut m = BTreeMap::new();
    m.insert("id", Value::from(id));
    m.insert("started_at", Value::from(rfc3339(&started_at)));
    m.insert("logical_date", Value::from(rfc3339(&logical_date)));
    m.insert(
        "today",
        Value::from(logical_date.with_timezone(&tz).date_naive().to_string()),
    );
    m.insert("tz", Value::from(tz.name()));
    Value::from(m)
}

/// For dry runs: `steps` where `steps.<id>.<anything>` renders as `<steps.<id>.<anything>>`.
pub fn placeholder_steps(step_ids: &[String]) -> Value {
    Value::from_object(PlaceholderSteps(step_ids.to_vec()))
}

#[derive(Debug)]
struct PlaceholderSteps(Vec<String>);

impl Object for PlaceholderSteps {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let id = key.as_str()?;
        self.0
            .iter()
            .any(|s| s == id)
            .then(|| Value::from_object(Placeholder(format!("steps.{id}"))))
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|k| Value::from(k.as_str())).collect())
    }
}

/// A placeholder for a value not known before the run (`item` of a `foreach` step in a
/// dry run): renders as `<name>`, and `name.x` as `<name.x>`.
pub fn placeholder(name: &str) -> Value {
    Value::from_object(Placeholder(name.to_string()))
}

/// A value not known before the run; renders as `<path>`, any attribute is a deeper placeholder.
#[derive(Debug)]
struct Placeholder(String);

impl Object for Placeholder {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        Some(Value::from_object(Placeholder(format!(
            "{}.{}",
            self.0, key
        ))))
    }
    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Dates

/// A calendar month (the `month` param type): renders as `YYYY-MM`, with `first_day`,
/// `last_day` (`YYYY-MM-DD`), `year` and `month`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthValue {
    pub year: i32,
    pub month: u32,
}

impl MonthValue {
    /// `None` unless `month` is 1..=12.
    pub fn new(year: i32, month: u32) -> Option<MonthValue> {
        NaiveDate::from_ymd_opt(year, month, 1).map(|_| MonthValue { year, month })
    }
    pub fn first_day(&self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).expect("valid month")
    }
    pub fn last_day(&self) -> NaiveDate {
        month_end(self.first_day())
    }
    /// The month containing `d`.
    pub fn of(d: NaiveDate) -> MonthValue {
        MonthValue {
            year: d.year(),
            month: d.month(),
        }
    }
    /// The month `n` months later (earlier if negative); `None` past the calendar's range
    /// (chrono's years ±262,142).
    pub fn add(&self, n: i64) -> Option<MonthValue> {
        let idx = (i64::from(self.year) * 12 + (i64::from(self.month) - 1)).checked_add(n)?;
        let year = i32::try_from(idx.div_euclid(12)).ok()?;
        MonthValue::new(year, idx.rem_euclid(12) as u32 + 1)
    }
    /// As a template value.
    pub fn to_value(self) -> Value {
        Value::from_object(self)
    }
}

impl fmt::Display for MonthValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl Object for MonthValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        Some(match key.as_str()? {
            "first_day" => Value::from(self.first_day().to_string()),
            "last_day" => Value::from(self.last_day().to_string()),
            "year" => Value::from(self.year),
            "month" => Value::from(self.month),
            _ => return None,
        })
    }
    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

/// A datetime that remembers its IANA zone; renders as RFC 3339.
#[derive(Debug, Clone, Copy)]
struct Zoned(DateTime<Tz>);

impl Object for Zoned {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let d = self.0;
        Some(match key.as_str()? {
            "year" => Value::from(d.year()),
            "month" => Value::from(d.month()),
            "day" => Value::from(d.day()),
            "hour" => Value::from(chrono::Timelike::hour(&d)),
            "minute" => Value::from(chrono::Timelike::minute(&d)),
            "second" => Value::from(chrono::Timelike::second(&d)),
            "date" => Value::from(d.date_naive().to_string()),
            "tz" => Value::from(d.timezone().name()),
            "timestamp" => Value::from(d.timestamp()),
            _ => return None,
        })
    }
    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&rfc3339(&self.0))
    }
}

/// A date-ish template value.
#[derive(Debug, Clone, Copy)]
enum When {
    Date(NaiveDate),
    Fixed(DateTime<FixedOffset>),
    Zoned(DateTime<Tz>),
    Month(MonthValue),
}

fn rfc3339<T: TimeZone>(d: &DateTime<T>) -> String
where
    T::Offset: fmt::Display,
{
    d.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

fn month_end(d: NaiveDate) -> NaiveDate {
    let first = d.with_day(1).expect("day 1 exists");
    // Only the calendar's last month has no next one: its end is the last day there is.
    first
        .checked_add_months(Months::new(1))
        .and_then(|next| next.pred_opt())
        .unwrap_or(NaiveDate::MAX)
}

fn err(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

fn parse_tz(func: &str, name: &str) -> Result<Tz, Error> {
    name.parse::<Tz>().map_err(|_| {
        err(format!(
            "{func}: unknown time zone `{name}` (expected an IANA name like Europe/Berlin)"
        ))
    })
}

/// Strict `YYYY-MM-DD`.
pub(crate) fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// Strict `YYYY-MM`.
pub(crate) fn parse_month(s: &str) -> Option<MonthValue> {
    let b = s.as_bytes();
    let shape = b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    MonthValue::new(s[..4].parse().ok()?, s[5..].parse().ok()?)
}

/// Interpret local wall time in `tz`: ambiguous times take the earlier instant, times in a gap
/// move forward by the gap (as the clock would). `None` at the edges of the calendar, where
/// the instant is out of chrono's range.
fn localize(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Tz>> {
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(d) => Some(d),
        chrono::LocalResult::Ambiguous(a, _) => Some(a),
        chrono::LocalResult::None => {
            let day_before = naive.checked_sub_signed(chrono::TimeDelta::hours(24))?;
            let before = tz.offset_from_utc_datetime(&day_before).fix();
            let utc = naive.checked_sub_offset(before)?;
            Some(tz.from_utc_datetime(&utc))
        }
    }
}

fn out_of_range(func: &str) -> Error {
    err(format!("{func}: date out of range"))
}

impl When {
    fn of(func: &str, v: &Value, default_tz: Tz) -> Result<When, Error> {
        if let Some(z) = v.downcast_object_ref::<Zoned>() {
            return Ok(When::Zoned(z.0));
        }
        if let Some(m) = v.downcast_object_ref::<MonthValue>() {
            return Ok(When::Month(*m));
        }
        let bad = || {
            err(format!(
                "{func}: expected a date (YYYY-MM-DD), a datetime (RFC 3339) or a month (YYYY-MM), got `{v}`"
            ))
        };
        let s = v.as_str().ok_or_else(bad)?.trim();
        if let Some(d) = parse_date(s) {
            return Ok(When::Date(d));
        }
        if let Some(m) = parse_month(s) {
            return Ok(When::Month(m));
        }
        if let Ok(d) = DateTime::parse_from_rfc3339(s) {
            return Ok(When::Fixed(d));
        }
        for fmt in [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M",
            "%Y-%m-%d %H:%M",
        ] {
            if let Ok(n) = NaiveDateTime::parse_from_str(s, fmt) {
                if let Some(d) = localize(default_tz, n) {
                    return Ok(When::Zoned(d));
                }
            }
        }
        Err(bad())
    }

    fn into_value(self) -> Value {
        match self {
            When::Date(d) => Value::from(d.to_string()),
            When::Fixed(d) => Value::from(rfc3339(&d)),
            When::Zoned(d) => Value::from_object(Zoned(d)),
            When::Month(m) => m.to_value(),
        }
    }

    fn date(&self) -> NaiveDate {
        match self {
            When::Date(d) => *d,
            When::Fixed(d) => d.date_naive(),
            When::Zoned(d) => d.date_naive(),
            When::Month(m) => m.first_day(),
        }
    }

    /// Apply a calendar change to the local wall time, keeping the kind.
    fn map_local(
        self,
        func: &str,
        f: impl Fn(NaiveDateTime) -> Option<NaiveDateTime>,
    ) -> Result<When, Error> {
        let overflow = || err(format!("{func}: date out of range"));
        Ok(match self {
            When::Date(d) => When::Date(f(d.and_time(NaiveTime::MIN)).ok_or_else(overflow)?.date()),
            When::Month(m) => When::Date(
                f(m.first_day().and_time(NaiveTime::MIN))
                    .ok_or_else(overflow)?
                    .date(),
            ),
            When::Fixed(d) => {
                let n = f(d.naive_local()).ok_or_else(overflow)?;
                When::Fixed(
                    d.offset()
                        .from_local_datetime(&n)
                        .single()
                        .ok_or_else(overflow)?,
                )
            }
            When::Zoned(d) => When::Zoned(
                localize(d.timezone(), f(d.naive_local()).ok_or_else(overflow)?)
                    .ok_or_else(overflow)?,
            ),
        })
    }
}

fn add_days(v: Value, n: i64, tz: Tz) -> Result<Value, Error> {
    let w = When::of("add_days", &v, tz)?;
    let step = Days::new(n.unsigned_abs());
    w.map_local("add_days", |d| {
        if n >= 0 {
            d.checked_add_days(step)
        } else {
            d.checked_sub_days(step)
        }
    })
    .map(When::into_value)
}

fn add_months(v: Value, n: i64, tz: Tz) -> Result<Value, Error> {
    let w = When::of("add_months", &v, tz)?;
    if let When::Month(m) = w {
        return m
            .add(n)
            .map(MonthValue::to_value)
            .ok_or_else(|| out_of_range("add_months"));
    }
    let step = Months::new(
        u32::try_from(n.unsigned_abs())
            .map_err(|_| err(format!("add_months: {n} is too large")))?,
    );
    w.map_local("add_months", |d| {
        if n >= 0 {
            d.checked_add_months(step)
        } else {
            d.checked_sub_months(step)
        }
    })
    .map(When::into_value)
}

fn strftime(func: &str, w: When, fmt_str: &str) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    let r = match w {
        When::Date(d) => write!(out, "{}", d.and_time(NaiveTime::MIN).format(fmt_str)),
        When::Month(m) => write!(
            out,
            "{}",
            m.first_day().and_time(NaiveTime::MIN).format(fmt_str)
        ),
        When::Fixed(d) => write!(out, "{}", d.format(fmt_str)),
        When::Zoned(d) => write!(out, "{}", d.format(fmt_str)),
    };
    r.map_err(|_| {
        err(format!(
            "{func}: invalid format `{fmt_str}` for this value (a date has no time zone)"
        ))
    })?;
    Ok(out)
}

fn parse_with(
    v: Value,
    fmt_str: String,
    tz: Option<String>,
    default_tz: Tz,
) -> Result<Value, Error> {
    let s = v
        .as_str()
        .ok_or_else(|| err(format!("parse: expected text, got `{v}`")))?;
    if let Ok(d) = DateTime::parse_from_str(s, &fmt_str) {
        return Ok(match tz {
            Some(name) => Value::from_object(Zoned(d.with_timezone(&parse_tz("parse", &name)?))),
            None => Value::from(rfc3339(&d)),
        });
    }
    if let Ok(n) = NaiveDateTime::parse_from_str(s, &fmt_str) {
        let tz = match tz {
            Some(name) => parse_tz("parse", &name)?,
            None => default_tz,
        };
        let d = localize(tz, n).ok_or_else(|| out_of_range("parse"))?;
        return Ok(Value::from_object(Zoned(d)));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, &fmt_str) {
        return Ok(Value::from(d.to_string()));
    }
    Err(err(format!(
        "parse: `{s}` does not match the format `{fmt_str}`"
    )))
}

fn register(env: &mut Environment<'static>, rt: &Runtime) {
    let tz = rt.tz;
    let logical = rt.logical_date;

    let env_overrides = rt.overrides.env.clone();
    env.add_function("env", move |name: String, default: Option<Value>| {
        if let Some(v) = env_overrides.get(&name) {
            return Ok(Value::from(v.clone()));
        }
        match std::env::var(&name) {
            Ok(v) => Ok(Value::from(v)),
            Err(_) => default.ok_or_else(|| err(format!("environment variable {name} is not set"))),
        }
    });

    let redactor = rt.redactor.clone();
    let dry_run = rt.dry_run;
    let secret_overrides = rt.overrides.secrets.clone();
    let source = rt.overrides.secret_source.clone();
    env.add_function("secret", move |name: String| {
        if dry_run {
            return Ok(Value::from(crate::secrets::MASK));
        }
        match secret_overrides
            .get(&name)
            .cloned()
            .or_else(|| source.0.lookup(&name))
        {
            Some(v) => {
                redactor.add(&v);
                Ok(Value::from(v))
            }
            None => Err(err(source.0.missing(&name))),
        }
    });

    env.add_function("now", move |zone: Option<String>| {
        let tz = match zone {
            Some(z) => parse_tz("now", &z)?,
            None => tz,
        };
        Ok::<_, Error>(Value::from_object(Zoned(Utc::now().with_timezone(&tz))))
    });
    env.add_function("today", move |zone: Option<String>| {
        let tz = match zone {
            Some(z) => parse_tz("today", &z)?,
            None => tz,
        };
        Ok::<_, Error>(Value::from(
            logical.with_timezone(&tz).date_naive().to_string(),
        ))
    });

    let f = move |v: Value, n: i64| add_days(v, n, tz);
    env.add_filter("add_days", f);
    env.add_function("add_days", f);

    let f = move |v: Value, n: i64| add_months(v, n, tz);
    env.add_filter("add_months", f);
    env.add_function("add_months", f);

    let f = move |v: Value| {
        Ok::<_, Error>(Value::from(
            When::of("month_start", &v, tz)?
                .date()
                .with_day(1)
                .unwrap()
                .to_string(),
        ))
    };
    env.add_filter("month_start", f);
    env.add_function("month_start", f);

    let f = move |v: Value| {
        Ok::<_, Error>(Value::from(
            month_end(When::of("month_end", &v, tz)?.date()).to_string(),
        ))
    };
    env.add_filter("month_end", f);
    env.add_function("month_end", f);

    // `format`: strftime when the input is a date/datetime/month and one text argument is
    // given; otherwise minijinja's builtin python-style formatting (`"%s-%s" | format(a, b)`).
    let f = move |state: &State, v: Value, args: Rest<Value>| {
        if let ([fmt_arg], Ok(w)) = (&args[..], When::of("format", &v, tz)) {
            if let Some(fmt_str) = fmt_arg.as_str() {
                return strftime("format", w, fmt_str).map(Value::from);
            }
        }
        minijinja::filters::format(state, &v, args)
    };
    env.add_filter("format", f);
    env.add_function("format", f);

    let f = move |v: Value, fmt_str: String, zone: Option<String>| parse_with(v, fmt_str, zone, tz);
    env.add_filter("parse", f);
    env.add_function("parse", f);

    let f = move |v: Value| {
        Ok::<_, Error>(Value::from(match When::of("isoformat", &v, tz)? {
            When::Date(d) => d.to_string(),
            When::Month(m) => m.first_day().to_string(),
            When::Fixed(d) => rfc3339(&d),
            When::Zoned(d) => rfc3339(&d),
        }))
    };
    env.add_filter("isoformat", f);
    env.add_function("isoformat", f);

    let f = move |v: Value, zone: String| {
        let target = parse_tz("to_timezone", &zone)?;
        let d = match When::of("to_timezone", &v, tz)? {
            When::Date(d) => localize(target, d.and_time(NaiveTime::MIN))
                .ok_or_else(|| out_of_range("to_timezone"))?,
            When::Month(m) => localize(target, m.first_day().and_time(NaiveTime::MIN))
                .ok_or_else(|| out_of_range("to_timezone"))?,
            When::Fixed(d) => d.with_timezone(&target),
            When::Zoned(d) => d.with_timezone(&target),
        };
        Ok::<_, Error>(Value::from_object(Zoned(d)))
    };
    env.add_filter("to_timezone", f);
    env.add_function("to_timezone", f);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn simple_tags_agree_with_minijinja() {
        let taken = [
            "s1: {{ params.days }} days of {{ params.region }} ({{ params.period.first_day }} to {{ params.period.last_day }}); prev {{ steps.s0.total }}",
            "{{ params.days > 3 }}",
            "{{ params.days * 12 }}",
            "{{ params.region }}-{{ run.id }}",
            "x {{ now }} {{ loop.index }} {{ item_index % 2 }}",
            "{{a.b}}{{ c }}",
            "{ {{ x }} }",
            "{{ x }}}",
        ];
        for src in taken {
            let fast = simple_tags(src).unwrap_or_else(|| panic!("not simple: {src}"));
            assert_eq!(Ok(fast), compile_references(src), "{src}");
        }
        let left = [
            "{{ x - 1 }}",
            "{{- x }}",
            "{{ x -}}",
            "{{ x | upper }}",
            "{{ not x }}",
            "{{ x and y }}",
            "{{ x in y }}",
            "{{ x }} {% if y %}z{% endif %}",
            "{# c #}{{ x }}",
            "{{ x }} }} y",
            "{{ x",
            "{{ x > 'a' }}",
            "{{ {'a': 1} }}",
            "{{{ x }}",
            "{{ x > 1 > 2 }}",
            "{{ }}",
            "no tags",
        ];
        for src in left {
            assert_eq!(simple_tags(src), None, "{src}");
        }
    }

    fn rt() -> Runtime {
        Runtime {
            redactor: Redactor::new(),
            tz: "America/Sao_Paulo".parse().unwrap(),
            logical_date: "2026-01-15T03:00:00Z".parse().unwrap(),
            dry_run: false,
            overrides: Default::default(),
        }
    }

    fn scope() -> Scope {
        let params =
            json_to_value(&json!({"days": 180, "list": [{"a": 1}, {"a": 2}], "name": "x"}));
        let steps = json_to_value(
            &json!({"login": {"tmp": "/tmp/a", "finished_at": "2026-01-01T00:00:00+00:00"}}),
        );
        let run = run_value(
            7,
            "2026-01-15T10:00:00Z".parse().unwrap(),
            rt().logical_date,
            rt().tz,
        );
        Scope::new(params, steps, run)
    }

    fn render(src: &str) -> Result<serde_json::Value, String> {
        Templates::new(rt()).render_str(src, &scope())
    }

    #[test]
    fn filters_are_read_from_the_compiled_template() {
        assert_eq!(
            filters("{{ x | upper | urlencode }}{% filter lower %}a{% endfilter %}").unwrap(),
            set(&["lower", "upper", "urlencode"])
        );
        assert_eq!(filters("{{ a or b }}").unwrap(), set(&[]));
        for name in FILTER_NAMES {
            assert!(is_filter(name), "{name} is listed but unknown");
        }
        assert!(!is_filter("urlencod"));
        assert!(!is_filter("no_such_filter"));
        assert_eq!(
            render("{{ 'a b&c' | urlencode }}").unwrap(),
            json!("a%20b%26c")
        );
        assert_eq!(
            render("{{ params.list | tojson }}").unwrap(),
            json!("[{\"a\":1},{\"a\":2}]")
        );
    }

    #[test]
    fn references_paths() {
        assert_eq!(
            references("{{ steps.login.tmp }}").unwrap(),
            set(&["steps.login.tmp"])
        );
        assert_eq!(
            references("{{steps.login.tmp}}").unwrap(),
            compile_references("{{steps.login.tmp}}").unwrap()
        );
        assert_eq!(
            references("{{ true }}").unwrap(),
            compile_references("{{ true }}").unwrap()
        );
        assert_eq!(references("{{ loop.index }}").unwrap(), set(&[]));
        assert_eq!(
            references("{{ params.days > 0 }}").unwrap(),
            set(&["params.days"])
        );
        assert_eq!(
            references("{{ values and values[0][1] >= steps.login.finished_at }}").unwrap(),
            set(&["values", "steps.login.finished_at"])
        );
        assert_eq!(
            references("{{ run.logical_date | add_days(-params.days) | isoformat }}").unwrap(),
            set(&["run.logical_date", "params.days"])
        );
        assert_eq!(
            references("{% for x in params.list %}{{ x.a }}{% endfor %}").unwrap(),
            set(&["params.list"])
        );
        assert_eq!(references("{{ secret('X') }}").unwrap(), set(&[]));
        assert_eq!(
            references("{{ range(3) | list }}{{ now() }}{{ true }}").unwrap(),
            set(&[])
        );
        let e = references("{{ a + }}").unwrap_err();
        assert!(e.contains("syntax error"), "{e}");
        assert!(!e.contains("<string>"), "{e}");
    }

    #[test]
    fn native_values_and_strings() {
        assert_eq!(render("{{ params.days }}").unwrap(), json!(180));
        assert_eq!(render("  {{- params.days -}} ").unwrap(), json!(180));
        assert_eq!(render("n={{ params.days }}").unwrap(), json!("n=180"));
        assert_eq!(
            render("{{ params.list }}").unwrap(),
            json!([{"a": 1}, {"a": 2}])
        );
        assert_eq!(render("{{ params.days > 0 }}").unwrap(), json!(true));
        assert_eq!(render("plain {text}").unwrap(), json!("plain {text}"));
        assert_eq!(render("{{ 1 }}-{{ 2 }}").unwrap(), json!("1-2"));
        assert_eq!(
            render("{% for x in params.list %}{{ x.a }}{% endfor %}\n").unwrap(),
            json!("12\n")
        );
        assert_eq!(
            render("{{ run.today }} {{ run.id }}").unwrap(),
            json!("2026-01-15 7")
        );
        assert_eq!(
            render("{{ run.logical_date }}").unwrap(),
            json!("2026-01-15T03:00:00+00:00")
        );
    }

    #[test]
    fn strict_undefined() {
        let e = render("{{ params.dayz }}").unwrap_err();
        assert!(e.contains("params.dayz"), "{e}");
        let e = render("n={{ params.dayz }}").unwrap_err();
        assert!(e.contains("`params.dayz` is undefined"), "{e}");
        assert!(e.contains("days"), "{e}");
        let e = render("{{ nope }}").unwrap_err();
        assert!(e.contains("nope"), "{e}");
        assert!(render("{% for x in params.missing %}{% endfor %}").is_err());
        let t = Templates::new(rt());
        assert!(t.truthy("{{ params.missing }}", &scope()).is_err());
    }

    #[test]
    fn locals_and_truthy() {
        let t = Templates::new(rt());
        let s = scope().with(
            "values",
            json_to_value(&json!([["a", "2026-02-01T00:00:00+00:00"]])),
        );
        assert!(t
            .truthy(
                "{{ values and values[0][1] >= steps.login.finished_at }}",
                &s
            )
            .unwrap());
        let s = s.with("values", json_to_value(&json!([])));
        assert!(!t
            .truthy(
                "{{ values and values[0][1] >= steps.login.finished_at }}",
                &s
            )
            .unwrap());
        assert!(t.truthy("true", &s).unwrap());
        assert!(!t.truthy("false", &s).unwrap());
        assert!(t.truthy("maybe", &s).is_err());
        assert!(t
            .truthy("{% if params.days > 0 %}true{% else %}false{% endif %}", &s)
            .unwrap());
    }

    #[test]
    fn render_node_keeps_pos() {
        let mut diags = crate::diag::Diags::default();
        let node = crate::yaml::parse(
            "a: \"{{ params.days }}\"\nb:\n  - x{{ params.name }}\n  - 3\n",
            &mut diags,
        )
        .unwrap();
        let t = Templates::new(rt());
        let out = t.render_node(&node, &scope()).unwrap();
        assert_eq!(out.to_json(), json!({"a": 180, "b": ["xx", 3]}));
        assert_eq!(out.get("a").unwrap().pos, node.get("a").unwrap().pos);
        let bad = crate::yaml::parse("a: ok\nb: \"{{ nope }}\"\n", &mut diags).unwrap();
        let (pos, _) = t.render_node(&bad, &scope()).unwrap_err();
        assert_eq!(pos, bad.get("b").unwrap().pos);
    }

    #[test]
    fn dates() {
        assert_eq!(
            render("{{ '2024-01-31' | add_months(1) }}").unwrap(),
            json!("2024-02-29")
        );
        assert_eq!(
            render("{{ add_months('2024-03-31', -1) }}").unwrap(),
            json!("2024-02-29")
        );
        assert_eq!(
            render("{{ '2024-01-31' | add_days(1) }}").unwrap(),
            json!("2024-02-01")
        );
        assert_eq!(
            render("{{ run.logical_date | add_days(-params.days) | isoformat }}").unwrap(),
            json!("2025-07-19T03:00:00+00:00")
        );
        // Fixed offset: calendar arithmetic keeps the offset.
        assert_eq!(
            render("{{ '2018-11-03T12:00:00-03:00' | add_days(1) }}").unwrap(),
            json!("2018-11-04T12:00:00-03:00")
        );
        // Named zone: DST-correct.
        assert_eq!(
            render("{{ '2018-11-03T12:00:00-03:00' | to_timezone('America/Sao_Paulo') | add_days(1) }}").unwrap(),
            json!("2018-11-04T12:00:00-02:00")
        );
        // Midnight doesn't exist on 2018-11-04 in Sao Paulo: moves to 01:00.
        assert_eq!(
            render("{{ '2018-11-03T00:00:00-03:00' | to_timezone('America/Sao_Paulo') | add_days(1) }}").unwrap(),
            json!("2018-11-04T01:00:00-02:00")
        );
        assert_eq!(
            render("{{ '2024-02-10' | month_start }}").unwrap(),
            json!("2024-02-01")
        );
        assert_eq!(
            render("{{ '2024-02-10T05:00:00+01:00' | month_end }}").unwrap(),
            json!("2024-02-29")
        );
        assert_eq!(
            render("{{ '2024-02-10' | format('%d/%m/%Y') }}").unwrap(),
            json!("10/02/2024")
        );
        assert_eq!(
            render("{{ '2024-02-10T05:06:00+01:00' | format('%H:%M %z') }}").unwrap(),
            json!("05:06 +0100")
        );
        assert_eq!(
            render("{{ '%s-%s' | format('a', 'b') }}").unwrap(),
            json!("a-b")
        );
        assert_eq!(
            render("{{ '10/02/2024 05:06' | parse('%d/%m/%Y %H:%M', 'Europe/Berlin') }}").unwrap(),
            json!("2024-02-10T05:06:00+01:00")
        );
        assert_eq!(
            render("{{ '10/02/2024' | parse('%d/%m/%Y') }}").unwrap(),
            json!("2024-02-10")
        );
        assert_eq!(
            render("{{ '2024-02-10T05:06:00Z' | isoformat }}").unwrap(),
            json!("2024-02-10T05:06:00+00:00")
        );
        assert_eq!(render("{{ today() }}").unwrap(), json!("2026-01-15"));
        assert_eq!(
            render("{{ today('Asia/Tokyo') }}").unwrap(),
            json!("2026-01-15")
        );
        assert_eq!(render("{{ now('UTC').tz }}").unwrap(), json!("UTC"));
        let e = render("{{ 'soon' | add_days(1) }}").unwrap_err();
        assert!(e.contains("add_days") && e.contains("`soon`"), "{e}");
        let e = render("{{ now('Mars/Base') }}").unwrap_err();
        assert!(e.contains("Mars/Base"), "{e}");
    }

    #[test]
    fn calendar_arithmetic_out_of_range_is_an_error_not_a_panic() {
        let t = Templates::new(rt());
        let s = scope().with("m", MonthValue::new(2025, 12).unwrap().to_value());
        for src in [
            "{{ m | add_months(100000000) }}",
            "{{ m | add_months(-100000000) }}",
            "{{ m | add_months(9223372036854775807) }}",
            "{{ '2024-01-31' | add_months(100000000) }}",
            "{{ '2024-01-31' | add_days(9223372036854775807) }}",
            "{{ '2024-01-31' | add_days(-9223372036854775807) }}",
            "{{ '2018-11-03T12:00:00-03:00' | to_timezone('America/Sao_Paulo') | add_days(100000000) }}",
            "{{ '2018-11-03T12:00:00-03:00' | add_months(-4000000) }}",
        ] {
            let e = t.render_str(src, &s).unwrap_err();
            assert!(e.contains("out of range") || e.contains("too large"), "{src}: {e}");
        }
        // The calendar's last month has an end.
        assert_eq!(
            t.render_str("{{ '+262142-12-05' | month_end }}", &s).ok(),
            None,
            "not a YYYY-MM-DD date"
        );
        assert_eq!(month_end(NaiveDate::MAX), NaiveDate::MAX);
        assert_eq!(MonthValue::new(262142, 12).unwrap().add(1), None);
        assert_eq!(MonthValue::new(2025, 12).unwrap().add(i64::MAX), None);
        assert!(localize(Tz::UTC, NaiveDateTime::MAX).is_some());
        let gap_at_min = localize("America/Sao_Paulo".parse().unwrap(), NaiveDateTime::MIN);
        let _ = gap_at_min; // no panic either way
    }

    #[test]
    fn month_values() {
        let t = Templates::new(rt());
        let s = scope().with("m", MonthValue::new(2025, 12).unwrap().to_value());
        let r = |src: &str| t.render_str(src, &s).unwrap();
        assert_eq!(r("{{ m }}"), json!("2025-12"));
        assert_eq!(r("m={{ m }}"), json!("m=2025-12"));
        assert_eq!(r("{{ m.last_day }}"), json!("2025-12-31"));
        assert_eq!(r("{{ m.year * 100 + m.month }}"), json!(202512));
        assert_eq!(r("{{ m | add_months(2) }}"), json!("2026-02"));
        assert_eq!(
            r("{{ m | add_months(2) | month_end }}"),
            json!("2026-02-28")
        );
        assert_eq!(r("{{ m | format('%Y%m') }}"), json!("202512"));
        assert_eq!(r("{{ m | string == '2025-12' }}"), json!(true));
    }

    #[test]
    fn env_and_secrets() {
        std::env::set_var("PIPE_TPL_TEST_SECRET", "hunter22");
        std::env::set_var("PIPE_TPL_TEST_ENV", "v1");
        let r = rt();
        let t = Templates::new(r.clone());
        let s = scope();
        assert_eq!(
            t.render_str("{{ env('PIPE_TPL_TEST_ENV') }}", &s).unwrap(),
            json!("v1")
        );
        assert_eq!(
            t.render_str("{{ env('PIPE_TPL_TEST_NOPE', 'd') }}", &s)
                .unwrap(),
            json!("d")
        );
        let e = t
            .render_str("{{ env('PIPE_TPL_TEST_NOPE') }}", &s)
            .unwrap_err();
        assert_eq!(e, "environment variable PIPE_TPL_TEST_NOPE is not set");
        let v = t
            .render_str("Bearer {{ secret('PIPE_TPL_TEST_SECRET') }}", &s)
            .unwrap();
        assert_eq!(v, json!("Bearer hunter22"));
        assert_eq!(r.redactor.redact(v.as_str().unwrap()), "Bearer ***");
        let e = t
            .render_str("{{ secret('PIPE_TPL_TEST_NOPE') }}", &s)
            .unwrap_err();
        assert!(e.contains("secret PIPE_TPL_TEST_NOPE is not set"), "{e}");
        let dry = Templates::new(Runtime {
            dry_run: true,
            overrides: Default::default(),
            ..rt()
        });
        assert_eq!(
            dry.render_str("{{ secret('PIPE_TPL_TEST_NOPE') }}", &s)
                .unwrap(),
            json!("***")
        );
    }

    #[test]
    fn placeholders() {
        let t = Templates::new(rt());
        let s = Scope::new(
            json_to_value(&json!({})),
            placeholder_steps(&["login".to_string()]),
            Value::from(()),
        );
        assert_eq!(
            t.render_str("{{ steps.login.tmp }}", &s).unwrap(),
            json!("<steps.login.tmp>")
        );
        assert_eq!(
            t.render_str("f={{ steps.login.succeeded }}", &s).unwrap(),
            json!("f=<steps.login.succeeded>")
        );
        assert_eq!(
            t.render_str("{{ steps.login.result.rows }}", &s).unwrap(),
            json!("<steps.login.result.rows>")
        );
        assert!(t.render_str("{{ steps.other.tmp }}", &s).is_err());
    }
}

#[cfg(test)]
mod unary_tests {
    use super::*;

    #[test]
    fn unary_minus_rewrite() {
        let f = |s: &str| fix_unary_minus(s).into_owned();
        // Nested chains (found by the fuzzer: this sliced backwards and panicked).
        assert_eq!(
            f("{{ x |- add_days(-params.days) }}"),
            "{{ x |- (add_days(-(params.days))) }}"
        );
        assert_eq!(f("{{ -f(-a.b, -c[0]) }}"), "{{ -(f(-(a.b), -(c[0]))) }}");
        // Unbalanced text is left for minijinja to report; the rewrite only must not panic.
        assert!(f("{{ -f(-a.b }}").starts_with("{{ -(f(-(a.b"));
        assert_eq!(
            f("{{ x | add_days(-params.days) }}"),
            "{{ x | add_days(-(params.days)) }}"
        );
        assert_eq!(f("{{ -a.b[0](1) + 1 }}"), "{{ -(a.b[0](1)) + 1 }}");
        assert_eq!(f("{{ a.b - c.d }}"), "{{ a.b - c.d }}");
        assert_eq!(f("{{ 3 -c.d }}"), "{{ 3 -c.d }}");
        assert_eq!(f("{{ x if y else -c.d }}"), "{{ x if y else -(c.d) }}");
        assert_eq!(
            f("{{ -x }} -a.b {{ '-a.b' }}"),
            "{{ -x }} -a.b {{ '-a.b' }}"
        );
        assert_eq!(
            f("{%- set n = -p.n -%}{# -a.b #}"),
            "{%- set n = -(p.n) -%}{# -a.b #}"
        );
        assert_eq!(f("{{ f(-a.b, [-c.d]) }}"), "{{ f(-(a.b), [-(c.d)]) }}");
        assert_eq!(f("{{ -1.5 }}"), "{{ -1.5 }}");
    }
}
