//! Turning `query:` and `query_text:` into a statement with placeholders and bound values.
//!
//! Why a scanner and not string replacement: a template's value must never become SQL text
//! (`x'; DROP TABLE t; --` has to stay data), and `:name` must not be mistaken inside
//! `'it''s: fine'`, `"col:x"`, `-- note: x`, `/* :x */`, `$$ :x $$` or a `::date` cast. The
//! scanner walks the SQL once, knowing literals, quoted identifiers and comments, and
//! yields literal SQL, templates (`{{ … }}`) and named parameters (`:name`) in order; the
//! caller then writes each backend's placeholder (`$1`, `?`, `@P1`) where a value goes.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use engine::secrets::Redactor;
use indexmap::IndexMap;
use serde_json::Value;

/// A value bound to a placeholder (or written by `sql.write`).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// An exact decimal in text form (`12.50`).
    Dec(String),
    Date(NaiveDate),
    Time(NaiveTime),
    Ts(NaiveDateTime),
    TsUtc(DateTime<Utc>),
}

impl Val {
    /// A template's or a param's JSON value: numbers stay numbers, lists and objects become
    /// their JSON text (for `json`/`jsonb` parameters).
    pub fn from_json(v: &Value) -> Val {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Val::Int(i),
                None => Val::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Val::Text(s.clone()),
            other => Val::Text(other.to_string()),
        }
    }

    /// The value as SQL text (what a database would parse for a parameter of any type).
    pub fn text(&self) -> Option<String> {
        Some(match self {
            Val::Null => return None,
            Val::Bool(b) => b.to_string(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Text(s) | Val::Dec(s) => s.clone(),
            Val::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            Val::Date(d) => d.to_string(),
            Val::Time(t) => t.format("%H:%M:%S%.f").to_string(),
            Val::Ts(t) => t.format("%Y-%m-%d %H:%M:%S%.f").to_string(),
            Val::TsUtc(t) => t.format("%Y-%m-%d %H:%M:%S%.f+00:00").to_string(),
        })
    }

    /// For the log: strings masked, then cut at 200 characters and quoted — in that order,
    /// so neither the quoting (`it''s`) nor the cut can hide a secret from the redactor.
    pub fn shown(&self, redactor: &Redactor) -> String {
        match self {
            Val::Null => "NULL".into(),
            Val::Bytes(b) => format!("<{} bytes>", b.len()),
            Val::Text(s) => {
                let s = redactor.redact(s);
                let cut: String = s.chars().take(200).collect();
                let more = if cut.len() < s.len() { "…" } else { "" };
                format!("'{}{more}'", cut.replace('\'', "''"))
            }
            v => redactor.redact(&v.text().unwrap_or_default()),
        }
    }
}

/// How a backend writes placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// PostgreSQL: `$1`, `$2` — a repeated name reuses its number.
    Dollar,
    /// MySQL, SQLite, ODBC: `?`, one value per occurrence.
    Question,
    /// SQL Server (tiberius): `@P1` — a repeated name reuses its number.
    AtP,
}

impl Style {
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Style::Dollar => format!("${n}"),
            Style::Question => "?".into(),
            Style::AtP => format!("@P{n}"),
        }
    }
}

/// A piece of the scanned text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Sql(String),
    /// A whole `{{ … }}` template (braces included).
    Template(String),
    /// `:name`.
    Named(String),
}

/// A problem found while scanning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A template inside a string literal (it would not be bound).
    TemplateInLiteral(String),
    /// `{% … %}`: control flow cannot be bound.
    Block,
}

/// Scan SQL text. With `templates`, `{{ … }}` are pieces of their own; `names` are the
/// `:name` parameters to recognise (others stay SQL text).
pub fn scan(text: &str, templates: bool, names: &[&str]) -> (Vec<Piece>, Vec<Problem>) {
    let b = text.as_bytes();
    let mut pieces = Vec::new();
    let mut problems = Vec::new();
    let mut sql = String::new();
    let mut i = 0;
    let starts = |i: usize, p: &str| b[i..].starts_with(p.as_bytes());
    while i < b.len() {
        let c = b[i];
        if templates && starts(i, "{{") {
            let end = text[i..].find("}}").map(|e| i + e + 2).unwrap_or(b.len());
            if !sql.is_empty() {
                pieces.push(Piece::Sql(std::mem::take(&mut sql)));
            }
            pieces.push(Piece::Template(text[i..end].to_string()));
            i = end;
            continue;
        }
        if templates && starts(i, "{%") {
            problems.push(Problem::Block);
            let end = text[i..].find("%}").map(|e| i + e + 2).unwrap_or(b.len());
            i = end;
            continue;
        }
        if templates && starts(i, "{#") {
            i = text[i..].find("#}").map(|e| i + e + 2).unwrap_or(b.len());
            continue;
        }
        let (end, literal) = match c {
            b'\'' | b'"' | b'`' => (close_quote(b, i, c), c == b'\''),
            b'-' if starts(i, "--") => (
                text[i..].find('\n').map(|e| i + e).unwrap_or(b.len()),
                false,
            ),
            b'/' if starts(i, "/*") => (
                text[i + 2..]
                    .find("*/")
                    .map(|e| i + e + 4)
                    .unwrap_or(b.len()),
                false,
            ),
            b'$' if i == 0 || !is_ident(b[i - 1]) => match dollar_tag(text, i) {
                Some(tag) => {
                    let body = i + tag.len();
                    let end = text[body..]
                        .find(tag)
                        .map(|e| body + e + tag.len())
                        .unwrap_or(b.len());
                    (end, true)
                }
                None => (i + 1, false),
            },
            b':' if starts(i, "::") => (i + 2, false),
            b':' if i + 1 < b.len()
                && (b[i + 1].is_ascii_alphabetic() || b[i + 1] == b'_')
                && (i == 0 || b[i - 1] != b':') =>
            {
                let mut e = i + 1;
                while e < b.len() && is_ident(b[e]) {
                    e += 1;
                }
                let name = &text[i + 1..e];
                if names.contains(&name) {
                    if !sql.is_empty() {
                        pieces.push(Piece::Sql(std::mem::take(&mut sql)));
                    }
                    pieces.push(Piece::Named(name.to_string()));
                    i = e;
                    continue;
                }
                (e, false)
            }
            _ => {
                // One UTF-8 character.
                let len = text[i..].chars().next().map(char::len_utf8).unwrap_or(1);
                (i + len, false)
            }
        };
        if literal && templates && text[i..end].contains("{{") {
            let lit = &text[i..end];
            problems.push(Problem::TemplateInLiteral(lit.chars().take(60).collect()));
        }
        sql.push_str(&text[i..end]);
        i = end;
    }
    if !sql.is_empty() {
        pieces.push(Piece::Sql(sql));
    }
    (pieces, problems)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// The end of a quoted run starting at `i` (a doubled quote continues it).
fn close_quote(b: &[u8], i: usize, q: u8) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if b[j] == q {
            if j + 1 < b.len() && b[j + 1] == q {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

/// `$tag$` or `$$` at `i` (PostgreSQL dollar quoting).
fn dollar_tag(text: &str, i: usize) -> Option<&str> {
    let rest = &text[i + 1..];
    let end = rest.find('$')?;
    let tag = &rest[..end];
    if tag.bytes().all(|c| c.is_ascii_alphabetic() || c == b'_') {
        Some(&text[i..i + end + 2])
    } else {
        None
    }
}

/// A statement ready to run: the SQL with placeholders and the values in binding order.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub values: Vec<Val>,
}

impl Statement {
    /// `SQL [$1 = 'x', $2 = 3]` for the log, every value masked before it is quoted.
    pub fn shown(&self, style: Style, redactor: &Redactor) -> String {
        if self.values.is_empty() {
            return self.sql.clone();
        }
        let vals: Vec<String> = self
            .values
            .iter()
            .enumerate()
            .map(|(k, v)| match style {
                Style::Question => v.shown(redactor),
                _ => format!("{} = {}", style.placeholder(k + 1), v.shown(redactor)),
            })
            .collect();
        format!("{} [{}]", self.sql, vals.join(", "))
    }
}

/// Build the statement: templates are evaluated by `eval` and bound, `:name` takes
/// `params[name]`. Every param must be used.
pub fn compile(
    pieces: &[Piece],
    style: Style,
    params: &IndexMap<String, Value>,
    mut eval: impl FnMut(&str) -> Result<Value, String>,
) -> Result<Statement, String> {
    let mut sql = String::new();
    let mut values = Vec::new();
    let mut numbered: IndexMap<&str, usize> = IndexMap::new();
    for p in pieces {
        match p {
            Piece::Sql(s) => sql.push_str(s),
            Piece::Template(t) => {
                let v = eval(t)?;
                values.push(Val::from_json(&v));
                sql.push_str(&style.placeholder(values.len()));
            }
            Piece::Named(name) => {
                let v = &params[name.as_str()];
                match (style, numbered.get(name.as_str())) {
                    (Style::Dollar | Style::AtP, Some(&n)) => sql.push_str(&style.placeholder(n)),
                    _ => {
                        values.push(Val::from_json(v));
                        numbered.insert(name, values.len());
                        sql.push_str(&style.placeholder(values.len()));
                    }
                }
            }
        }
    }
    let unused: Vec<&str> = params
        .keys()
        .map(String::as_str)
        .filter(|k| !numbered.contains_key(k))
        .collect();
    if !unused.is_empty() {
        return Err(format!(
            "`params` names {} that the statement does not use (write `:{}` where the value goes)",
            unused
                .iter()
                .map(|u| format!("`{u}`"))
                .collect::<Vec<_>>()
                .join(", "),
            unused[0]
        ));
    }
    Ok(Statement { sql, values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(p: &IndexMap<String, Value>) -> Vec<&str> {
        p.keys().map(String::as_str).collect()
    }

    #[test]
    fn templates_become_placeholders() {
        let (pieces, problems) = scan(
            "select * from t where a = {{ x }} and b = {{ y }}",
            true,
            &[],
        );
        assert!(problems.is_empty());
        let st = compile(&pieces, Style::Dollar, &IndexMap::new(), |t| {
            Ok(if t.contains('x') {
                json!("x'; DROP TABLE t; --")
            } else {
                json!(3)
            })
        })
        .unwrap();
        assert_eq!(st.sql, "select * from t where a = $1 and b = $2");
        assert_eq!(
            st.values,
            vec![Val::Text("x'; DROP TABLE t; --".into()), Val::Int(3)]
        );
        let st = compile(&pieces, Style::Question, &IndexMap::new(), |_| Ok(json!(1))).unwrap();
        assert_eq!(st.sql, "select * from t where a = ? and b = ?");
        let st = compile(&pieces, Style::AtP, &IndexMap::new(), |_| Ok(json!(1))).unwrap();
        assert_eq!(st.sql, "select * from t where a = @P1 and b = @P2");
    }

    #[test]
    fn named_params_skip_casts_literals_and_comments() {
        let params: IndexMap<String, Value> = [
            ("inicio".to_string(), json!("2019-01-01")),
            ("fim".to_string(), json!("2019-02-01")),
        ]
        .into_iter()
        .collect();
        let text = "select ':fim', \"a:fim\", x::date -- :inicio\n/* :fim */ from t \
                    where dt >= :inicio and dt < :fim and y = $$ :fim $$ and z = :fim";
        let (pieces, problems) = scan(text, false, &names(&params));
        assert!(problems.is_empty());
        let st = compile(&pieces, Style::Dollar, &params, |_| unreachable!()).unwrap();
        assert_eq!(
            st.sql,
            "select ':fim', \"a:fim\", x::date -- :inicio\n/* :fim */ from t \
             where dt >= $1 and dt < $2 and y = $$ :fim $$ and z = $2"
        );
        assert_eq!(st.values.len(), 2);
        let st = compile(&pieces, Style::Question, &params, |_| unreachable!()).unwrap();
        assert_eq!(st.values.len(), 3);
        assert!(st
            .sql
            .ends_with("dt >= ? and dt < ? and y = $$ :fim $$ and z = ?"));
    }

    #[test]
    fn unused_param_is_an_error() {
        let params: IndexMap<String, Value> = [("x".to_string(), json!(1))].into_iter().collect();
        let (pieces, _) = scan("select 1", false, &names(&params));
        let err = compile(&pieces, Style::Dollar, &params, |_| unreachable!()).unwrap_err();
        assert!(err.contains("`x`"), "{err}");
    }

    #[test]
    fn problems_found() {
        let (_, p) = scan("select * from t where a = '{{ x }}'", true, &[]);
        assert!(matches!(p[..], [Problem::TemplateInLiteral(_)]), "{p:?}");
        let (_, p) = scan("select {% if x %}1{% endif %}", true, &[]);
        assert!(p.contains(&Problem::Block));
        // Quotes inside a template's expression are not SQL literals.
        let (pieces, p) = scan("select {{ env('A', 'b') }} as x", true, &[]);
        assert!(p.is_empty());
        assert_eq!(pieces[1], Piece::Template("{{ env('A', 'b') }}".into()));
    }

    #[test]
    fn logged_values_are_masked_before_they_are_quoted_or_cut() {
        let r = Redactor::new();
        r.add("it's-a-secret");
        let long = format!("{}it's-a-secret", "x".repeat(195));
        let st = Statement {
            sql: "SELECT $1, $2".into(),
            values: vec![Val::Text("it's-a-secret".into()), Val::Text(long)],
        };
        let shown = st.shown(Style::Dollar, &r);
        assert_eq!(
            shown,
            format!("SELECT $1, $2 [$1 = '***', $2 = '{}***']", "x".repeat(195))
        );
    }
}
