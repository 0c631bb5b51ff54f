//! The GoogleSQL the BigQuery fake understands: a tokenizer, a parser for the statements
//! that change tables (DDL, MERGE, INSERT, UPDATE, DELETE, TRUNCATE), and the rewriting of
//! query text for Polars SQL.
//!
//! Why a hand-written parser instead of `sqlparser`'s BigQuery dialect: Polars evaluates
//! the expressions (it parses them itself), so this layer only needs the *shape* of a
//! statement: which table, which clauses, which token ranges are expressions. Keeping
//! expressions as token slices lets them pass through to Polars untouched, with two
//! dialect fixes on the way: BigQuery's double-quoted strings become single-quoted, and
//! backticked identifiers become double-quoted; table paths (`p.d.t`, `` `p.d.t` ``,
//! `d.t`) become the names the tables are registered under.

use super::Field;

/// A query that cannot run: `reason` is BigQuery's error reason.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QErr {
    pub reason: &'static str,
    pub message: String,
}

impl QErr {
    pub fn invalid_query(message: impl Into<String>) -> QErr {
        QErr {
            reason: "invalidQuery",
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> QErr {
        QErr {
            reason: "notFound",
            message: message.into(),
        }
    }
    pub fn duplicate(message: impl Into<String>) -> QErr {
        QErr {
            reason: "duplicate",
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> QErr {
        QErr {
            reason: "invalid",
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Keyword or bare identifier.
    Word,
    /// A backticked identifier (text without the backticks).
    Quoted,
    /// A string literal (text unescaped).
    Str,
    Num,
    Punct,
}

#[derive(Clone, Debug)]
pub(crate) struct Tok {
    pub kind: Kind,
    pub text: String,
    pub start: usize,
    pub end: usize,
}

impl Tok {
    fn is_kw(&self, k: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(k)
    }
    fn is_punct(&self, p: &str) -> bool {
        self.kind == Kind::Punct && self.text == p
    }
}

pub(crate) fn tokenize(sql: &str) -> Result<Vec<Tok>, QErr> {
    let b = sql.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'#' || (c == b'-' && b.get(i + 1) == Some(&b'-')) {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = sql[i + 2..]
                .find("*/")
                .ok_or_else(|| QErr::invalid_query("Syntax error: Unclosed comment"))?;
            i += 2 + end + 2;
        } else if c == b'\'' || c == b'"' {
            let start = i;
            let triple = b.get(i + 1) == Some(&c) && b.get(i + 2) == Some(&c);
            i += if triple { 3 } else { 1 };
            let mut text = String::new();
            loop {
                let Some(&d) = b.get(i) else {
                    return Err(QErr::invalid_query(format!(
                        "Syntax error: Unclosed string literal at [1:{}]",
                        start + 1
                    )));
                };
                if d == b'\\' {
                    let e = *b.get(i + 1).unwrap_or(&b'\\');
                    text.push(match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        other => other as char,
                    });
                    i += 2;
                } else if d == c
                    && (!triple || (b.get(i + 1) == Some(&c) && b.get(i + 2) == Some(&c)))
                {
                    i += if triple { 3 } else { 1 };
                    break;
                } else {
                    let ch = sql[i..].chars().next().expect("char");
                    text.push(ch);
                    i += ch.len_utf8();
                }
            }
            toks.push(Tok {
                kind: Kind::Str,
                text,
                start,
                end: i,
            });
        } else if c == b'`' {
            let end = sql[i + 1..]
                .find('`')
                .ok_or_else(|| QErr::invalid_query("Syntax error: Unclosed identifier literal"))?;
            toks.push(Tok {
                kind: Kind::Quoted,
                text: sql[i + 1..i + 1 + end].to_string(),
                start: i,
                end: i + end + 2,
            });
            i += end + 2;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                let mut j = i + 1;
                if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                    j += 1;
                }
                if j < b.len() && b[j].is_ascii_digit() {
                    i = j;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            // `1abc` (a project like `123-abc`) continues as a word.
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            toks.push(Tok {
                kind: Kind::Num,
                text: sql[start..i].to_string(),
                start,
                end: i,
            });
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            toks.push(Tok {
                kind: Kind::Word,
                text: sql[start..i].to_string(),
                start,
                end: i,
            });
        } else {
            let two = sql.get(i..i + 2).unwrap_or("");
            let len = if ["<=", ">=", "<>", "!=", "||"].contains(&two) {
                2
            } else {
                sql[i..].chars().next().expect("char").len_utf8()
            };
            toks.push(Tok {
                kind: Kind::Punct,
                text: sql[i..i + len].to_string(),
                start: i,
                end: i + len,
            });
            i += len;
        }
    }
    while toks.last().is_some_and(|t| t.is_punct(";")) {
        toks.pop();
    }
    Ok(toks)
}

/// A table path as written: `["p","d","t"]`, `["d","t"]` or `["t"]`.
pub(crate) type Name = Vec<String>;

/// Read a table path at `i`: backticked (`` `p.d.t` ``, `` `p`.`d`.`t` ``) or bare, where
/// a bare project may contain dashes (`my-project.d.t`). Returns the parts, the index
/// after it and whether any part was backticked.
fn read_name(toks: &[Tok], mut i: usize) -> Option<(Name, usize, bool)> {
    let mut parts: Vec<String> = Vec::new();
    let mut quoted = false;
    loop {
        let t = toks.get(i)?;
        match t.kind {
            Kind::Quoted => {
                parts.extend(t.text.split('.').map(str::to_string));
                quoted = true;
                i += 1;
            }
            Kind::Word | Kind::Num if parts.is_empty() || t.kind == Kind::Word => {
                let mut s = t.text.clone();
                let mut end = t.end;
                i += 1;
                while let (Some(dash), Some(next)) = (toks.get(i), toks.get(i + 1)) {
                    if dash.is_punct("-")
                        && dash.start == end
                        && next.start == dash.end
                        && matches!(next.kind, Kind::Word | Kind::Num)
                    {
                        s.push('-');
                        s.push_str(&next.text);
                        end = next.end;
                        i += 2;
                    } else {
                        break;
                    }
                }
                parts.push(s);
            }
            _ => return None,
        }
        match toks.get(i) {
            Some(dot)
                if dot.is_punct(".") && toks.get(i + 1).is_some_and(|n| n.kind != Kind::Punct) =>
            {
                i += 1
            }
            _ => break,
        }
    }
    Some((parts, i, quoted))
}

/// Resolves a table path met in query text to the name it is registered under in Polars
/// (`None`: not a table, e.g. a CTE name or a struct field; leave it as written). The flag
/// says the path stands where only a table can (after FROM or JOIN).
pub(crate) type Resolver<'a> = dyn FnMut(&[String], bool) -> Result<Option<String>, QErr> + 'a;

fn render_tok(t: &Tok) -> String {
    match t.kind {
        Kind::Quoted => format!("\"{}\"", t.text.replace('"', "\"\"")),
        Kind::Str => format!("'{}'", t.text.replace('\'', "''")),
        _ => t.text.clone(),
    }
}

/// Query text for Polars: table paths after FROM/JOIN (and any backticked or three-part
/// path) resolved, literals and identifiers in Polars' quoting.
pub(crate) fn render(toks: &[Tok], resolve: &mut Resolver) -> Result<String, QErr> {
    let mut out = String::new();
    let mut prev_end: Option<usize> = None;
    let mut push = |out: &mut String, text: &str, start: usize, end: usize| {
        if prev_end.is_some_and(|p| p != start) {
            out.push(' ');
        }
        out.push_str(text);
        prev_end = Some(end);
    };
    let mut i = 0;
    let mut after_from = false;
    while i < toks.len() {
        let t = &toks[i];
        let prev_dot = i > 0 && toks[i - 1].is_punct(".");
        if !prev_dot && matches!(t.kind, Kind::Word | Kind::Quoted) {
            if let Some((name, next, _)) = read_name(toks, i) {
                let is_call = toks.get(next).is_some_and(|n| n.is_punct("("));
                if !is_call && (after_from || name.len() >= 3) {
                    if let Some(reg) = resolve(&name, after_from)? {
                        push(&mut out, &reg, t.start, toks[next - 1].end);
                        i = next;
                        after_from = false;
                        continue;
                    }
                }
            }
        }
        after_from = t.is_kw("FROM") || t.is_kw("JOIN");
        push(&mut out, &render_tok(t), t.start, t.end);
        i += 1;
    }
    Ok(out)
}

/// `col = expr` of UPDATE SET.
pub(crate) type Assignment = (String, Vec<Tok>);

#[derive(Debug)]
pub(crate) enum Source {
    Table(Name),
    Query(Vec<Tok>),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum When {
    Matched,
    NotMatched,
    NotMatchedBySource,
}

#[derive(Debug)]
pub(crate) enum Action {
    Update(Vec<Assignment>),
    Delete,
    /// `INSERT (cols) VALUES (exprs)`; `values: None` is `INSERT ROW`.
    Insert {
        cols: Option<Vec<String>>,
        values: Option<Vec<Vec<Tok>>>,
    },
}

#[derive(Debug)]
pub(crate) struct Clause {
    pub when: When,
    pub cond: Option<Vec<Tok>>,
    pub action: Action,
}

#[derive(Debug)]
pub(crate) struct Merge {
    pub target: Name,
    pub target_alias: String,
    pub source: Source,
    pub source_alias: String,
    pub on: Vec<Tok>,
    pub clauses: Vec<Clause>,
}

#[derive(Debug)]
pub(crate) enum InsertSource {
    Values(Vec<Vec<Vec<Tok>>>),
    Query(Vec<Tok>),
}

#[derive(Debug)]
pub(crate) enum Stmt {
    Select(Vec<Tok>),
    CreateTable {
        name: Name,
        or_replace: bool,
        if_not_exists: bool,
        columns: Vec<Field>,
        as_select: Option<Vec<Tok>>,
    },
    DropTable {
        name: Name,
        if_exists: bool,
    },
    Truncate(Name),
    Delete {
        name: Name,
        alias: String,
        cond: Vec<Tok>,
    },
    Update {
        name: Name,
        alias: String,
        sets: Vec<Assignment>,
        cond: Vec<Tok>,
    },
    Insert {
        name: Name,
        cols: Option<Vec<String>>,
        source: InsertSource,
    },
    Merge(Merge),
}

impl Stmt {
    /// BigQuery's `statementType`.
    pub fn kind(&self) -> &'static str {
        match self {
            Stmt::Select(_) => "SELECT",
            Stmt::CreateTable {
                as_select: Some(_), ..
            } => "CREATE_TABLE_AS_SELECT",
            Stmt::CreateTable { .. } => "CREATE_TABLE",
            Stmt::DropTable { .. } => "DROP_TABLE",
            Stmt::Truncate(_) => "TRUNCATE_TABLE",
            Stmt::Delete { .. } => "DELETE",
            Stmt::Update { .. } => "UPDATE",
            Stmt::Insert { .. } => "INSERT",
            Stmt::Merge(_) => "MERGE",
        }
    }
}

/// A cursor over the tokens of one statement.
struct P<'a> {
    toks: &'a [Tok],
    i: usize,
}

fn syntax(what: &str, t: Option<&Tok>) -> QErr {
    match t {
        Some(t) => QErr::invalid_query(format!(
            "Syntax error: Expected {what} but got \"{}\" at [1:{}]",
            t.text,
            t.start + 1
        )),
        None => QErr::invalid_query(format!(
            "Syntax error: Expected {what} but got end of input"
        )),
    }
}

const RESERVED: &[&str] = &[
    "USING", "ON", "WHEN", "SET", "WHERE", "AS", "THEN", "VALUES", "SELECT", "WITH", "FROM",
];

impl<'a> P<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.i)
    }
    fn eat_kw(&mut self, k: &str) -> bool {
        if self.peek().is_some_and(|t| t.is_kw(k)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect_kw(&mut self, k: &str) -> Result<(), QErr> {
        if self.eat_kw(k) {
            Ok(())
        } else {
            Err(syntax(&format!("keyword {k}"), self.peek()))
        }
    }
    fn eat_punct(&mut self, p: &str) -> bool {
        if self.peek().is_some_and(|t| t.is_punct(p)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect_punct(&mut self, p: &str) -> Result<(), QErr> {
        if self.eat_punct(p) {
            Ok(())
        } else {
            Err(syntax(&format!("\"{p}\""), self.peek()))
        }
    }
    fn name(&mut self) -> Result<Name, QErr> {
        let (name, next, _) =
            read_name(self.toks, self.i).ok_or_else(|| syntax("table name", self.peek()))?;
        self.i = next;
        Ok(name)
    }
    fn ident(&mut self) -> Result<String, QErr> {
        match self.peek() {
            Some(t) if matches!(t.kind, Kind::Word | Kind::Quoted) => {
                self.i += 1;
                Ok(t.text.clone())
            }
            t => Err(syntax("identifier", t)),
        }
    }
    /// `[AS] alias`, unless the next word is a clause keyword.
    fn alias(&mut self) -> Option<String> {
        let explicit = self.eat_kw("AS");
        match self.peek() {
            Some(t)
                if t.kind == Kind::Quoted
                    || t.kind == Kind::Word
                        && (explicit || !RESERVED.iter().any(|k| t.is_kw(k))) =>
            {
                self.i += 1;
                Some(t.text.clone())
            }
            _ => None,
        }
    }
    /// Tokens up to (not including) the first of `stops` at parenthesis depth 0.
    fn until(&mut self, stops: &[&str]) -> Vec<Tok> {
        let start = self.i;
        let mut depth = 0i32;
        while let Some(t) = self.peek() {
            if t.is_punct("(") || t.is_punct("[") {
                depth += 1;
            } else if t.is_punct(")") || t.is_punct("]") {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            } else if depth == 0 && stops.iter().any(|s| t.is_kw(s) || t.is_punct(s)) {
                break;
            }
            self.i += 1;
        }
        self.toks[start..self.i].to_vec()
    }
    /// `( … )` with balanced contents; returns the contents.
    fn parenthesized(&mut self) -> Result<Vec<Tok>, QErr> {
        self.expect_punct("(")?;
        let inner = self.until(&[]);
        self.expect_punct(")")?;
        Ok(inner)
    }
    fn done(&self) -> Result<(), QErr> {
        match self.peek() {
            None => Ok(()),
            t => Err(syntax("end of input", t)),
        }
    }
    fn ident_list(&mut self) -> Result<Vec<String>, QErr> {
        let inner = self.parenthesized()?;
        split_commas(&inner)
            .into_iter()
            .map(|part| match part {
                [t] if matches!(t.kind, Kind::Word | Kind::Quoted) => Ok(t.text.clone()),
                other => Err(syntax("column name", other.first())),
            })
            .collect()
    }
    fn assignments(&mut self, stops: &[&str]) -> Result<Vec<Assignment>, QErr> {
        let toks = self.until(stops);
        split_commas(&toks)
            .into_iter()
            .map(|part| {
                let eq = part
                    .iter()
                    .position(|t| t.is_punct("="))
                    .ok_or_else(|| syntax("\"=\"", part.first()))?;
                let col = part[..eq]
                    .iter()
                    .rev()
                    .find(|t| matches!(t.kind, Kind::Word | Kind::Quoted))
                    .ok_or_else(|| syntax("column name", part.first()))?;
                if part.len() == eq + 1 {
                    return Err(syntax("expression", None));
                }
                Ok((col.text.clone(), part[eq + 1..].to_vec()))
            })
            .collect()
    }
}

/// Split at commas of parenthesis depth 0.
pub(crate) fn split_commas(toks: &[Tok]) -> Vec<&[Tok]> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, t) in toks.iter().enumerate() {
        if t.is_punct("(") || t.is_punct("[") {
            depth += 1;
        } else if t.is_punct(")") || t.is_punct("]") {
            depth -= 1;
        } else if depth == 0 && t.is_punct(",") {
            parts.push(&toks[start..i]);
            start = i + 1;
        }
    }
    if start < toks.len() {
        parts.push(&toks[start..]);
    }
    parts
}

fn last(name: &Name) -> String {
    name.last().cloned().unwrap_or_default()
}

/// A column type: `INT64`, `ARRAY<STRING>`, `STRUCT<a INT64, b STRING>`, `NUMERIC(10, 2)`…
fn parse_type(p: &mut P, name: String) -> Result<Field, QErr> {
    let t = p.ident()?.to_ascii_uppercase();
    if t == "ARRAY" {
        p.expect_punct("<")?;
        let mut inner = parse_type(p, name)?;
        p.expect_punct(">")?;
        if inner.mode == "REPEATED" {
            return Err(QErr::invalid_query("Arrays of arrays are not supported"));
        }
        inner.mode = "REPEATED".into();
        return Ok(inner);
    }
    if t == "STRUCT" {
        p.expect_punct("<")?;
        let mut fields = Vec::new();
        loop {
            let sub = p.ident()?;
            fields.push(parse_type(p, sub)?);
            if !p.eat_punct(",") {
                break;
            }
        }
        p.expect_punct(">")?;
        return Ok(Field::new(&name, "RECORD", "NULLABLE").with_fields(fields));
    }
    let ty = super::normalize_type(&t)
        .ok_or_else(|| QErr::invalid_query(format!("Type not found: {t}")))?;
    if p.peek().is_some_and(|t| t.is_punct("(")) {
        p.parenthesized()?;
    }
    Ok(Field::new(&name, ty, "NULLABLE"))
}

/// Parse one statement.
pub(crate) fn parse(sql: &str) -> Result<Stmt, QErr> {
    let toks = tokenize(sql)?;
    let mut p = P { toks: &toks, i: 0 };
    let Some(first) = p.peek() else {
        return Err(QErr::invalid_query(
            "Syntax error: Unexpected end of script",
        ));
    };
    if first.is_kw("SELECT") || first.is_kw("WITH") || first.is_punct("(") {
        return Ok(Stmt::Select(toks.clone()));
    }
    if p.eat_kw("CREATE") {
        let or_replace = p.eat_kw("OR") && {
            p.expect_kw("REPLACE")?;
            true
        };
        p.expect_kw("TABLE")?;
        let if_not_exists = p.eat_kw("IF") && {
            p.expect_kw("NOT")?;
            p.expect_kw("EXISTS")?;
            true
        };
        let name = p.name()?;
        let mut columns = Vec::new();
        if p.eat_punct("(") {
            loop {
                let col = p.ident()?;
                let mut f = parse_type(&mut p, col)?;
                // Column options: NOT NULL, OPTIONS(...), DEFAULT expr.
                loop {
                    if p.eat_kw("NOT") {
                        p.expect_kw("NULL")?;
                        if f.mode != "REPEATED" {
                            f.mode = "REQUIRED".into();
                        }
                    } else if p.eat_kw("OPTIONS") {
                        let opts = p.parenthesized()?;
                        for opt in split_commas(&opts) {
                            if let [k, eq, v] = opt {
                                if k.is_kw("description") && eq.is_punct("=") && v.kind == Kind::Str
                                {
                                    f.description = Some(v.text.clone());
                                }
                            }
                        }
                    } else if p.eat_kw("DEFAULT") {
                        p.until(&[","]);
                    } else {
                        break;
                    }
                }
                columns.push(f);
                if !p.eat_punct(",") {
                    break;
                }
            }
            p.expect_punct(")")?;
        }
        // Table options, partitioning and clustering do not change what the fake stores.
        while p.eat_kw("PARTITION") || p.eat_kw("CLUSTER") || p.eat_kw("OPTIONS") {
            p.until(&["AS", "OPTIONS", "CLUSTER"]);
        }
        let as_select = if p.eat_kw("AS") {
            let rest = p.toks[p.i..].to_vec();
            p.i = p.toks.len();
            Some(rest)
        } else {
            None
        };
        p.done()?;
        if columns.is_empty() && as_select.is_none() {
            return Err(QErr::invalid_query(
                "Syntax error: CREATE TABLE needs a column list or AS SELECT",
            ));
        }
        return Ok(Stmt::CreateTable {
            name,
            or_replace,
            if_not_exists,
            columns,
            as_select,
        });
    }
    if p.eat_kw("DROP") {
        p.expect_kw("TABLE")?;
        let if_exists = p.eat_kw("IF") && {
            p.expect_kw("EXISTS")?;
            true
        };
        let name = p.name()?;
        p.done()?;
        return Ok(Stmt::DropTable { name, if_exists });
    }
    if p.eat_kw("TRUNCATE") {
        p.expect_kw("TABLE")?;
        let name = p.name()?;
        p.done()?;
        return Ok(Stmt::Truncate(name));
    }
    if p.eat_kw("DELETE") {
        p.eat_kw("FROM");
        let name = p.name()?;
        let alias = p.alias().unwrap_or_else(|| last(&name));
        p.expect_kw("WHERE")?;
        let cond = p.until(&[]);
        p.done()?;
        if cond.is_empty() {
            return Err(syntax("expression", None));
        }
        return Ok(Stmt::Delete { name, alias, cond });
    }
    if p.eat_kw("UPDATE") {
        let name = p.name()?;
        let alias = p.alias().unwrap_or_else(|| last(&name));
        p.expect_kw("SET")?;
        let sets = p.assignments(&["WHERE"])?;
        p.expect_kw("WHERE")?;
        let cond = p.until(&[]);
        p.done()?;
        return Ok(Stmt::Update {
            name,
            alias,
            sets,
            cond,
        });
    }
    if p.eat_kw("INSERT") {
        p.eat_kw("INTO");
        let name = p.name()?;
        let cols = if p.peek().is_some_and(|t| t.is_punct("("))
            && !p
                .toks
                .get(p.i + 1)
                .is_some_and(|t| t.is_kw("SELECT") || t.is_kw("WITH"))
        {
            Some(p.ident_list()?)
        } else {
            None
        };
        let source = if p.eat_kw("VALUES") {
            let mut rows = Vec::new();
            loop {
                let row = p.parenthesized()?;
                rows.push(
                    split_commas(&row)
                        .into_iter()
                        .map(<[Tok]>::to_vec)
                        .collect(),
                );
                if !p.eat_punct(",") {
                    break;
                }
            }
            InsertSource::Values(rows)
        } else {
            let rest = p.toks[p.i..].to_vec();
            p.i = p.toks.len();
            if rest.is_empty() {
                return Err(syntax("VALUES or SELECT", None));
            }
            InsertSource::Query(rest)
        };
        p.done()?;
        return Ok(Stmt::Insert { name, cols, source });
    }
    if p.eat_kw("MERGE") {
        return parse_merge(&mut p).map(Stmt::Merge);
    }
    Err(QErr::invalid_query(format!(
        "Syntax error: Unexpected keyword {} at [1:{}] (the BigQuery sandbox runs SELECT, CREATE TABLE, DROP TABLE, TRUNCATE TABLE, INSERT, UPDATE, DELETE and MERGE)",
        first.text.to_ascii_uppercase(),
        first.start + 1
    )))
}

fn parse_merge(p: &mut P) -> Result<Merge, QErr> {
    p.eat_kw("INTO");
    let target = p.name()?;
    let target_alias = p.alias().unwrap_or_else(|| last(&target));
    p.expect_kw("USING")?;
    let source = if p.peek().is_some_and(|t| t.is_punct("(")) {
        Source::Query(p.parenthesized()?)
    } else {
        Source::Table(p.name()?)
    };
    let source_alias = p.alias().unwrap_or_else(|| match &source {
        Source::Table(n) => last(n),
        Source::Query(_) => "__source".into(),
    });
    p.expect_kw("ON")?;
    let on = p.until(&["WHEN"]);
    if on.is_empty() {
        return Err(syntax("expression", p.peek()));
    }
    let mut clauses = Vec::new();
    while p.eat_kw("WHEN") {
        let when = if p.eat_kw("MATCHED") {
            When::Matched
        } else {
            p.expect_kw("NOT")?;
            p.expect_kw("MATCHED")?;
            if p.eat_kw("BY") {
                if p.eat_kw("SOURCE") {
                    When::NotMatchedBySource
                } else {
                    p.expect_kw("TARGET")?;
                    When::NotMatched
                }
            } else {
                When::NotMatched
            }
        };
        let cond = if p.eat_kw("AND") {
            Some(p.until(&["THEN"]))
        } else {
            None
        };
        p.expect_kw("THEN")?;
        let action = if p.eat_kw("UPDATE") {
            p.expect_kw("SET")?;
            Action::Update(p.assignments(&["WHEN"])?)
        } else if p.eat_kw("DELETE") {
            Action::Delete
        } else if p.eat_kw("INSERT") {
            if when != When::NotMatched {
                return Err(QErr::invalid_query(
                    "INSERT is only allowed in WHEN NOT MATCHED [BY TARGET] clauses",
                ));
            }
            if p.eat_kw("ROW") {
                Action::Insert {
                    cols: None,
                    values: None,
                }
            } else {
                let cols = if p.peek().is_some_and(|t| t.is_punct("(")) {
                    Some(p.ident_list()?)
                } else {
                    None
                };
                p.expect_kw("VALUES")?;
                let values = p.parenthesized()?;
                let values: Vec<Vec<Tok>> = split_commas(&values)
                    .into_iter()
                    .map(<[Tok]>::to_vec)
                    .collect();
                if cols.as_ref().is_some_and(|c| c.len() != values.len()) {
                    return Err(QErr::invalid_query(
                        "The number of INSERT columns does not match the number of VALUES",
                    ));
                }
                Action::Insert {
                    cols,
                    values: Some(values),
                }
            }
        } else {
            return Err(syntax("UPDATE, DELETE or INSERT", p.peek()));
        };
        if matches!(action, Action::Update(_) | Action::Delete) && when == When::NotMatched {
            return Err(QErr::invalid_query(
                "WHEN NOT MATCHED [BY TARGET] clauses only allow INSERT",
            ));
        }
        clauses.push(Clause { when, cond, action });
    }
    p.done()?;
    if clauses.is_empty() {
        return Err(syntax("keyword WHEN", p.peek()));
    }
    Ok(Merge {
        target,
        target_alias,
        source,
        source_alias,
        on,
        clauses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> (String, Vec<Vec<String>>) {
        let toks = tokenize(sql).unwrap();
        let mut seen = Vec::new();
        let text = render(&toks, &mut |n: &[String], _q| {
            seen.push(n.to_vec());
            Ok(Some(format!("__t{}", seen.len() - 1)))
        })
        .unwrap();
        (text, seen)
    }

    #[test]
    fn table_paths_are_rewritten() {
        let (text, seen) = names(
            "SELECT COUNT(*) AS n, \"x\" FROM `my-proj.ds.t` AS a JOIN ds.u b ON a.id = b.id",
        );
        assert_eq!(
            text,
            "SELECT COUNT(*) AS n, 'x' FROM __t0 AS a JOIN __t1 b ON a.id = b.id"
        );
        assert_eq!(seen, vec![vec!["my-proj", "ds", "t"], vec!["ds", "u"]]);
        let (text, seen) = names("select * from my-proj.ds.t where `col` = 1");
        assert_eq!(text, "select * from __t0 where \"col\" = 1");
        assert_eq!(seen, vec![vec!["my-proj", "ds", "t"]]);
        let (_, seen) = names("SELECT * FROM `p`.`d`.`t`");
        assert_eq!(seen, vec![vec!["p", "d", "t"]]);
    }

    #[test]
    fn statements() {
        let s = parse("create table if not exists ds.t (id INT64 NOT NULL, tags ARRAY<STRING>, s STRUCT<a INT64, b STRING>, n NUMERIC(10,2));").unwrap();
        let Stmt::CreateTable {
            name,
            if_not_exists,
            columns,
            ..
        } = s
        else {
            panic!()
        };
        assert_eq!(name, vec!["ds", "t"]);
        assert!(if_not_exists);
        assert_eq!(columns[0].mode, "REQUIRED");
        assert_eq!(columns[0].ty, "INTEGER");
        assert_eq!(columns[1].mode, "REPEATED");
        assert_eq!(columns[2].fields.len(), 2);
        assert_eq!(columns[3].ty, "NUMERIC");
        let Stmt::Merge(m) = parse(
            "MERGE ds.t T USING (SELECT * FROM ds.s) S ON T.a = S.a AND T.b = S.b \
             WHEN MATCHED AND S.x > 1 THEN UPDATE SET x = S.x, T.y = S.y \
             WHEN NOT MATCHED THEN INSERT (a, b, x) VALUES (S.a, S.b, S.x) \
             WHEN NOT MATCHED BY SOURCE THEN DELETE",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.target_alias.as_str(), m.source_alias.as_str()),
            ("T", "S")
        );
        assert_eq!(m.on.len(), 15);
        assert_eq!(m.clauses.len(), 3);
        assert!(matches!(&m.clauses[0].action, Action::Update(s) if s.len() == 2 && s[1].0 == "y"));
        assert!(m.clauses[0].cond.is_some());
        assert!(matches!(
            parse("GRANT SELECT ON x TO y"),
            Err(QErr {
                reason: "invalidQuery",
                ..
            })
        ));
        assert!(matches!(
            parse("DROP TABLE IF EXISTS ds.t"),
            Ok(Stmt::DropTable {
                if_exists: true,
                ..
            })
        ));
        assert!(parse("SELECT 'unclosed").is_err());
    }
}
