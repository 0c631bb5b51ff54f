//! Running a parsed statement against the fake's tables with Polars.
//!
//! SELECTs go to Polars SQL as they are (tables registered under generated names). The
//! statements that change a table are evaluated, not pattern-matched: MERGE joins target
//! and source with the statement's own ON condition, evaluates each WHEN clause's
//! condition and expressions in Polars, then applies updates, deletes and inserts to the
//! target in one step, with BigQuery's rules (a target row may match at most one source
//! row; the first WHEN clause that applies to a row wins). Target rows carry a `__rid`
//! (their position), source rows a `__sid`, so the clauses' results map back to rows.

use super::sql::{self, Action, InsertSource, QErr, Source, Stmt, Tok, When};
use super::table::{conform, empty, schema_of};
use super::{Db, Field, TableKey};
use polars::prelude::*;
use polars::sql::SQLContext;
use std::collections::{HashMap, HashSet};

/// What a statement did.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// BigQuery's `statementType`.
    pub kind: &'static str,
    /// A SELECT's rows.
    pub result: Option<(Vec<Field>, DataFrame)>,
    /// DML: rows inserted, updated or deleted.
    pub affected: Option<u64>,
    /// The table a DDL or DML statement targeted.
    pub target: Option<TableKey>,
}

pub(crate) fn display(k: &TableKey) -> String {
    format!("{}:{}.{}", k.0, k.1, k.2)
}

fn polars_err(e: PolarsError) -> QErr {
    QErr::invalid_query(format!("{e}"))
}

/// The table a path names: `p.d.t`, `d.t` (the query's project) or `t` (the default dataset).
pub(crate) fn key_of(
    project: &str,
    default_dataset: Option<&(String, String)>,
    parts: &[String],
) -> Result<TableKey, QErr> {
    match parts {
        [p, d, t] => Ok((p.clone(), d.clone(), t.clone())),
        [d, t] => Ok((project.to_string(), d.clone(), t.clone())),
        [t] => match default_dataset {
            Some((p, d)) => Ok((p.clone(), d.clone(), t.clone())),
            None => Err(QErr::invalid_query(format!(
                "Table \"{t}\" must be qualified with a dataset (e.g. dataset.table)."
            ))),
        },
        _ => Err(QErr::invalid_query(format!(
            "Invalid table name: {}",
            parts.join(".")
        ))),
    }
}

/// One statement's Polars SQL session over the database (read-only while it lives).
struct Sess<'a> {
    db: &'a Db,
    project: &'a str,
    default_dataset: Option<&'a (String, String)>,
    ctx: SQLContext,
    registered: HashMap<TableKey, String>,
}

impl<'a> Sess<'a> {
    fn new(db: &'a Db, project: &'a str, default_dataset: Option<&'a (String, String)>) -> Self {
        let mut ctx = SQLContext::new();
        // A one-row frame for SELECTs without FROM (INSERT … VALUES).
        ctx.register("__one", df!("__one" => [1i32]).expect("one row").lazy());
        Sess {
            db,
            project,
            default_dataset,
            ctx,
            registered: HashMap::new(),
        }
    }

    fn table(&self, key: &TableKey) -> Result<&'a super::TableData, QErr> {
        self.db
            .tables
            .get(key)
            .ok_or_else(|| QErr::not_found(format!("Not found: Table {}", display(key))))
    }

    fn render(&mut self, toks: &[Tok]) -> Result<String, QErr> {
        let (db, project, dd) = (self.db, self.project, self.default_dataset);
        let ctx = &mut self.ctx;
        let registered = &mut self.registered;
        sql::render(toks, &mut |parts: &[String], definite: bool| {
            let key = match key_of(project, dd, parts) {
                Ok(k) => k,
                Err(e) if definite && parts.len() > 1 => return Err(e),
                Err(_) => return Ok(None),
            };
            match db.tables.get(&key) {
                Some(t) => {
                    let n = registered.len();
                    let name = registered
                        .entry(key)
                        .or_insert_with(|| {
                            let name = format!("__bq{n}");
                            ctx.register(&name, t.df.clone().lazy());
                            name
                        })
                        .clone();
                    Ok(Some(name))
                }
                None if definite && parts.len() > 1 => Err(QErr::not_found(format!(
                    "Not found: Table {} was not found in location US",
                    display(&key)
                ))),
                None => Ok(None),
            }
        })
    }

    fn register(&mut self, name: &str, df: &DataFrame) {
        self.ctx.register(name, df.clone().lazy());
    }

    fn run(&mut self, text: &str) -> Result<DataFrame, QErr> {
        self.ctx
            .execute(text)
            .and_then(|lf| lf.collect())
            .map_err(polars_err)
    }

    fn select(&mut self, toks: &[Tok]) -> Result<DataFrame, QErr> {
        let text = self.render(toks)?;
        self.run(&text)
    }
}

/// An identifier for Polars: bare when it can be (Polars matches a quoted alias only
/// with quoted references, and the statement's own references are mostly bare).
fn quote(alias: &str) -> String {
    let bare = alias
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if bare {
        alias.to_string()
    } else {
        format!("\"{}\"", alias.replace('"', "\"\""))
    }
}

/// An id column as numbers.
fn ids(df: &DataFrame, name: &str) -> Result<Vec<u64>, QErr> {
    let s = df
        .column(name)
        .map_err(polars_err)?
        .as_materialized_series()
        .cast(&DataType::UInt64)
        .map_err(polars_err)?;
    Ok(s.u64().map_err(polars_err)?.into_no_null_iter().collect())
}

/// Rows of `df` whose id column is (`keep_in`) or is not in `set`.
fn filter_ids(
    df: &DataFrame,
    id: &str,
    set: &HashSet<u64>,
    keep_in: bool,
) -> Result<DataFrame, QErr> {
    let mask: BooleanChunked = ids(df, id)?
        .into_iter()
        .map(|r| Some(set.contains(&r) == keep_in))
        .collect();
    df.filter(&mask).map_err(polars_err)
}

/// Column assignments to apply: target rows (by position) and their new values.
struct Update {
    rows: Vec<u64>,
    cols: Vec<(String, Series)>,
}

/// The target after updates, deletes and inserts.
fn apply(
    base: &DataFrame,
    schema: &[Field],
    updates: Vec<Update>,
    deletes: &HashSet<u64>,
    inserts: Vec<DataFrame>,
) -> Result<DataFrame, QErr> {
    let n = base.height();
    let mut columns: Vec<Column> = Vec::new();
    for f in schema {
        let old = base
            .column(&f.name)
            .map_err(polars_err)?
            .as_materialized_series()
            .clone();
        let mut combined = old.clone();
        let mut index: Vec<IdxSize> = (0..n as IdxSize).collect();
        for u in &updates {
            for (col, vals) in &u.cols {
                if col != &f.name {
                    continue;
                }
                let vals = vals.strict_cast(old.dtype()).map_err(|_| {
                    QErr::invalid_query(format!(
                        "Value of type {} cannot be assigned to {}, which has type {}",
                        vals.dtype(),
                        f.name,
                        f.ty
                    ))
                })?;
                let offset = combined.len() as IdxSize;
                combined.append(&vals).map_err(polars_err)?;
                for (j, r) in u.rows.iter().enumerate() {
                    index[*r as usize] = offset + j as IdxSize;
                }
            }
        }
        let idx = IdxCa::from_vec("idx".into(), index);
        columns.push(combined.take(&idx).map_err(polars_err)?.into_column());
    }
    let mut out = if columns.is_empty() {
        DataFrame::empty_with_height(n)
    } else {
        DataFrame::new(columns).map_err(polars_err)?
    };
    if !deletes.is_empty() {
        let mask: BooleanChunked = (0..n as u64).map(|r| Some(!deletes.contains(&r))).collect();
        out = out.filter(&mask).map_err(polars_err)?;
    }
    for ins in inserts {
        let ins = conform(&ins, schema).map_err(QErr::invalid_query)?;
        out.vstack_mut(&ins).map_err(polars_err)?;
    }
    conform(&out, schema).map_err(QErr::invalid_query)
}

/// `SELECT <rid>, e0 AS "__v0", … FROM …` and the assignments' results.
fn assigned(
    df: &DataFrame,
    id: &str,
    sets: &[(String, Vec<Tok>)],
    schema: &[Field],
) -> Result<Update, QErr> {
    let rows = ids(df, id)?;
    let mut cols = Vec::new();
    for (i, (col, _)) in sets.iter().enumerate() {
        if !schema.iter().any(|f| &f.name == col) {
            return Err(QErr::invalid_query(format!("Unrecognized name: {col}")));
        }
        let s = df
            .column(&format!("__v{i}"))
            .map_err(polars_err)?
            .as_materialized_series()
            .clone();
        cols.push((col.clone(), s));
    }
    Ok(Update { rows, cols })
}

fn exprs(sess: &mut Sess, sets: &[(String, Vec<Tok>)]) -> Result<String, QErr> {
    let mut out = String::new();
    for (i, (_, e)) in sets.iter().enumerate() {
        out.push_str(&format!(", ({}) AS \"__v{i}\"", sess.render(e)?));
    }
    Ok(out)
}

fn filter_rows(df: DataFrame, id: &str, handled: &mut HashSet<u64>) -> Result<DataFrame, QErr> {
    let fresh: HashSet<u64> = ids(&df, id)?
        .into_iter()
        .filter(|r| !handled.contains(r))
        .collect();
    let df = filter_ids(&df, id, &fresh, true)?;
    handled.extend(fresh);
    Ok(df)
}

/// Run one statement. `project`: the query job's project (for `dataset.table` paths).
pub(crate) fn execute(
    db: &mut Db,
    project: &str,
    default_dataset: Option<&(String, String)>,
    text: &str,
) -> Result<Outcome, QErr> {
    let stmt = sql::parse(text)?;
    let kind = stmt.kind();
    let key = |parts: &[String]| key_of(project, default_dataset, parts);
    let dataset_must_exist = |db: &Db, k: &TableKey| {
        if db.datasets.contains_key(&(k.0.clone(), k.1.clone())) {
            Ok(())
        } else {
            Err(QErr::not_found(format!(
                "Not found: Dataset {}:{}",
                k.0, k.1
            )))
        }
    };
    let outcome = |target: Option<TableKey>, affected: Option<u64>| Outcome {
        kind,
        result: None,
        affected,
        target,
    };
    match stmt {
        Stmt::Select(toks) => {
            let df = Sess::new(db, project, default_dataset).select(&toks)?;
            let schema = schema_of(&df);
            Ok(Outcome {
                kind,
                result: Some((schema, df)),
                affected: None,
                target: None,
            })
        }
        Stmt::CreateTable {
            name,
            or_replace,
            if_not_exists,
            columns,
            as_select,
        } => {
            let k = key(&name)?;
            dataset_must_exist(db, &k)?;
            if db.tables.contains_key(&k) && !or_replace {
                if if_not_exists {
                    return Ok(outcome(Some(k), None));
                }
                return Err(QErr::duplicate(format!(
                    "Already Exists: Table {}",
                    display(&k)
                )));
            }
            let (schema, df) = match as_select {
                Some(toks) => {
                    let df = Sess::new(db, project, default_dataset).select(&toks)?;
                    let mut schema = schema_of(&df);
                    if !columns.is_empty() {
                        schema = columns;
                    }
                    let df = conform(&df, &schema).map_err(QErr::invalid_query)?;
                    (schema, df)
                }
                None => {
                    let mut seen = HashSet::new();
                    for c in &columns {
                        if !seen.insert(c.name.to_ascii_lowercase()) {
                            return Err(QErr::invalid_query(format!(
                                "Duplicate column name {} in CREATE TABLE",
                                c.name
                            )));
                        }
                    }
                    let df = empty(&columns);
                    (columns, df)
                }
            };
            let rows = df.height() as u64;
            db.put_table(&k, schema, df, true).map_err(QErr::invalid)?;
            Ok(outcome(Some(k), (rows > 0).then_some(rows)))
        }
        Stmt::DropTable { name, if_exists } => {
            let k = key(&name)?;
            if !db.drop_table(&k) && !if_exists {
                return Err(QErr::not_found(format!("Not found: Table {}", display(&k))));
            }
            Ok(outcome(Some(k), None))
        }
        Stmt::Truncate(name) => {
            let k = key(&name)?;
            let t = Sess::new(db, project, default_dataset).table(&k)?;
            let (schema, rows) = (t.schema.clone(), t.df.height() as u64);
            let df = empty(&schema);
            db.put_table(&k, schema, df, false).map_err(QErr::invalid)?;
            Ok(outcome(Some(k), Some(rows)))
        }
        Stmt::Delete { name, alias, cond } => {
            let k = key(&name)?;
            let mut sess = Sess::new(db, project, default_dataset);
            let t = sess.table(&k)?;
            let base =
                t.df.with_row_index("__rid".into(), None)
                    .map_err(polars_err)?;
            sess.register("__t", &base);
            let cond = sess.render(&cond)?;
            let a = quote(&alias);
            let hit = sess.run(&format!(
                "SELECT {a}.__rid AS __rid FROM __t AS {a} WHERE {cond}"
            ))?;
            let deletes: HashSet<u64> = ids(&hit, "__rid")?.into_iter().collect();
            let schema = t.schema.clone();
            let df = apply(&base, &schema, Vec::new(), &deletes, Vec::new())?;
            drop(sess);
            db.put_table(&k, schema, df, false).map_err(QErr::invalid)?;
            Ok(outcome(Some(k), Some(deletes.len() as u64)))
        }
        Stmt::Update {
            name,
            alias,
            sets,
            cond,
        } => {
            let k = key(&name)?;
            let mut sess = Sess::new(db, project, default_dataset);
            let t = sess.table(&k)?;
            let base =
                t.df.with_row_index("__rid".into(), None)
                    .map_err(polars_err)?;
            sess.register("__t", &base);
            let cond = sess.render(&cond)?;
            let values = exprs(&mut sess, &sets)?;
            let a = quote(&alias);
            let hit = sess.run(&format!(
                "SELECT {a}.__rid AS __rid{values} FROM __t AS {a} WHERE {cond}"
            ))?;
            let schema = t.schema.clone();
            let update = assigned(&hit, "__rid", &sets, &schema)?;
            let n = update.rows.len() as u64;
            let df = apply(&base, &schema, vec![update], &HashSet::new(), Vec::new())?;
            drop(sess);
            db.put_table(&k, schema, df, false).map_err(QErr::invalid)?;
            Ok(outcome(Some(k), Some(n)))
        }
        Stmt::Insert { name, cols, source } => {
            let k = key(&name)?;
            let mut sess = Sess::new(db, project, default_dataset);
            let t = sess.table(&k)?;
            let schema = t.schema.clone();
            let cols = cols.unwrap_or_else(|| schema.iter().map(|f| f.name.clone()).collect());
            for c in &cols {
                if !schema.iter().any(|f| &f.name == c) {
                    return Err(QErr::invalid_query(format!(
                        "Column {c} is not present in table {}",
                        display(&k)
                    )));
                }
            }
            let mut frames = Vec::new();
            match source {
                InsertSource::Values(rows) => {
                    for row in rows {
                        if row.len() != cols.len() {
                            return Err(QErr::invalid_query(format!(
                                "Inserted row has wrong column count; Has {}, expected {}",
                                row.len(),
                                cols.len()
                            )));
                        }
                        let mut select = Vec::new();
                        for (e, c) in row.iter().zip(&cols) {
                            select.push(format!("({}) AS {}", sess.render(e)?, quote(c)));
                        }
                        frames.push(sess.run(&format!("SELECT {} FROM __one", select.join(", ")))?);
                    }
                }
                InsertSource::Query(toks) => {
                    let mut df = sess.select(&toks)?;
                    if df.width() != cols.len() {
                        return Err(QErr::invalid_query(format!(
                            "Query column count {} does not match the INSERT column count {}",
                            df.width(),
                            cols.len()
                        )));
                    }
                    df.set_column_names(cols.iter().map(String::as_str))
                        .map_err(polars_err)?;
                    frames.push(df);
                }
            }
            let n: usize = frames.iter().map(DataFrame::height).sum();
            let base = t.df.clone();
            let df = apply(&base, &schema, Vec::new(), &HashSet::new(), frames)?;
            drop(sess);
            db.put_table(&k, schema, df, false).map_err(QErr::invalid)?;
            Ok(outcome(Some(k), Some(n as u64)))
        }
        Stmt::Merge(m) => {
            let k = key(&m.target)?;
            let mut sess = Sess::new(db, project, default_dataset);
            let t = sess.table(&k)?;
            let schema = t.schema.clone();
            let tgt =
                t.df.with_row_index("__rid".into(), None)
                    .map_err(polars_err)?;
            let src = match &m.source {
                Source::Table(n) => {
                    let sk = key(n)?;
                    sess.table(&sk)?.df.clone()
                }
                Source::Query(toks) => sess.select(toks)?,
            };
            let src = src
                .with_row_index("__sid".into(), None)
                .map_err(polars_err)?;
            sess.register("__tgt", &tgt);
            sess.register("__src", &src);
            let (ta, sa) = (quote(&m.target_alias), quote(&m.source_alias));
            let on = sess.render(&m.on)?;
            let join = format!("__tgt AS {ta} INNER JOIN __src AS {sa} ON {on}");
            let pairs = sess.run(&format!(
                "SELECT {ta}.__rid AS __rid, {sa}.__sid AS __sid FROM {join}"
            ))?;
            let matched_t: Vec<u64> = ids(&pairs, "__rid")?;
            let matched_s: HashSet<u64> = ids(&pairs, "__sid")?.into_iter().collect();
            let matched_t_set: HashSet<u64> = matched_t.iter().copied().collect();
            if matched_t_set.len() != matched_t.len()
                && m.clauses.iter().any(|c| c.when == When::Matched)
            {
                return Err(QErr::invalid_query(
                    "UPDATE/MERGE must match at most one source row for each target row",
                ));
            }
            let (mut handled_t, mut handled_s) = (HashSet::new(), HashSet::new());
            let (mut updates, mut deletes, mut inserts) = (Vec::new(), HashSet::new(), Vec::new());
            for clause in &m.clauses {
                let cond = match &clause.cond {
                    Some(c) => format!(" WHERE {}", sess.render(c)?),
                    None => String::new(),
                };
                match (&clause.when, &clause.action) {
                    (When::NotMatched, Action::Insert { cols, values }) => {
                        let unmatched: HashSet<u64> = (0..src.height() as u64)
                            .filter(|s| !matched_s.contains(s) && !handled_s.contains(s))
                            .collect();
                        let srcu = filter_ids(&src, "__sid", &unmatched, true)?;
                        sess.register("__srcu", &srcu);
                        let (cols, values): (Vec<String>, Vec<String>) = match values {
                            None => {
                                let names: Vec<String> = src
                                    .get_column_names()
                                    .into_iter()
                                    .filter(|n| n.as_str() != "__sid")
                                    .map(|n| n.to_string())
                                    .collect();
                                if names.len() != schema.len() {
                                    return Err(QErr::invalid_query(format!(
                                        "INSERT ROW: the source has {} columns, the target {}",
                                        names.len(),
                                        schema.len()
                                    )));
                                }
                                (
                                    schema.iter().map(|f| f.name.clone()).collect(),
                                    names.iter().map(|n| format!("{sa}.{}", quote(n))).collect(),
                                )
                            }
                            Some(values) => {
                                let cols = cols.clone().unwrap_or_else(|| {
                                    schema.iter().map(|f| f.name.clone()).collect()
                                });
                                if cols.len() != values.len() {
                                    return Err(QErr::invalid_query(
                                        "The number of INSERT columns does not match the number of VALUES",
                                    ));
                                }
                                let rendered = values
                                    .iter()
                                    .map(|v| sess.render(v))
                                    .collect::<Result<Vec<_>, _>>()?;
                                (cols, rendered)
                            }
                        };
                        for c in &cols {
                            if !schema.iter().any(|f| &f.name == c) {
                                return Err(QErr::invalid_query(format!(
                                    "Column {c} is not present in table {}",
                                    display(&k)
                                )));
                            }
                        }
                        let select: Vec<String> = values
                            .iter()
                            .zip(&cols)
                            .map(|(v, c)| format!("({v}) AS {}", quote(c)))
                            .collect();
                        let df = sess.run(&format!(
                            "SELECT {sa}.__sid AS __sid, {} FROM __srcu AS {sa}{cond}",
                            select.join(", ")
                        ))?;
                        let df = filter_rows(df, "__sid", &mut handled_s)?;
                        inserts.push(df.drop("__sid").map_err(polars_err)?);
                    }
                    (When::Matched | When::NotMatchedBySource, action) => {
                        let sets = match action {
                            Action::Update(sets) => sets.as_slice(),
                            _ => &[],
                        };
                        let values = exprs(&mut sess, sets)?;
                        let from = if clause.when == When::Matched {
                            join.clone()
                        } else {
                            let unmatched: HashSet<u64> = (0..tgt.height() as u64)
                                .filter(|r| !matched_t_set.contains(r))
                                .collect();
                            let tgtu = filter_ids(&tgt, "__rid", &unmatched, true)?;
                            sess.register("__tgtu", &tgtu);
                            format!("__tgtu AS {ta}")
                        };
                        let df = sess.run(&format!(
                            "SELECT {ta}.__rid AS __rid{values} FROM {from}{cond}"
                        ))?;
                        let df = filter_rows(df, "__rid", &mut handled_t)?;
                        match action {
                            Action::Delete => deletes.extend(ids(&df, "__rid")?),
                            _ => updates.push(assigned(&df, "__rid", sets, &schema)?),
                        }
                    }
                    (When::NotMatched, _) => unreachable!("rejected by the parser"),
                }
            }
            let affected = updates.iter().map(|u| u.rows.len()).sum::<usize>()
                + deletes.len()
                + inserts.iter().map(DataFrame::height).sum::<usize>();
            let df = apply(&tgt, &schema, updates, &deletes, inserts)?;
            drop(sess);
            db.put_table(&k, schema, df, false).map_err(QErr::invalid)?;
            Ok(outcome(Some(k), Some(affected as u64)))
        }
    }
}
