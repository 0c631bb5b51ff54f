//! SQLite over rusqlite (the bundled library the run history already links), on the
//! blocking pool. SQLite types values, not columns: a column's kind comes from its declared
//! type (`INTEGER`, `NUMERIC(12,2)`, `DATE`, `TIMESTAMP` …) and, for expressions without
//! one, from the first non-null value; dates and timestamps stored as text are parsed.

use super::columns::{parse_date, parse_decimal, parse_time, parse_timestamp, Batcher, Cell, Kind};
use super::conn::{Backend, Spec};
use super::params::{Statement, Val};
use super::Session;
use async_trait::async_trait;
use engine::step::StepContext;
use polars::prelude::DataFrame;
use rusqlite::types::{Value, ValueRef};
use rusqlite::Connection;
use std::sync::{Arc, Mutex};

pub struct Lite {
    conn: Arc<Mutex<Connection>>,
}

pub async fn connect(spec: &Spec, ctx: &StepContext) -> Result<Box<dyn Session>, String> {
    let raw = spec
        .path
        .clone()
        .or_else(|| spec.database.clone())
        .or_else(|| spec.url.clone())
        .ok_or("a sqlite connection needs `path` (or `url: sqlite:///path`)")?;
    let path = raw
        .strip_prefix("sqlite://")
        .or_else(|| raw.strip_prefix("sqlite:"))
        .unwrap_or(&raw)
        .to_string();
    let path = if path == ":memory:" {
        path
    } else {
        let p = std::path::Path::new(&path);
        if p.is_absolute() {
            path
        } else {
            ctx.pipeline_dir.join(p).to_string_lossy().into_owned()
        }
    };
    let conn = tokio::task::spawn_blocking(move || {
        let c = Connection::open(&path).map_err(|e| e.to_string())?;
        c.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(c)
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Box::new(Lite {
        conn: Arc::new(Mutex::new(conn)),
    }))
}

fn value(v: &Val) -> Value {
    match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Integer(*b as i64),
        Val::Int(i) => Value::Integer(*i),
        Val::Float(f) => Value::Real(*f),
        Val::Bytes(b) => Value::Blob(b.clone()),
        v => Value::Text(v.text().unwrap_or_default()),
    }
}

/// The kind a declared column type implies (SQLite's affinity rules, plus dates).
pub fn kind_of_decl(decl: &str) -> Option<Kind> {
    let d = decl.to_ascii_uppercase();
    Some(if d.contains("INT") {
        Kind::I64
    } else if d.contains("BOOL") {
        Kind::Bool
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") || d.contains("JSON") {
        Kind::Text
    } else if d.contains("BLOB") {
        Kind::Binary
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        Kind::F64
    } else if d.contains("DATETIME") || d.contains("TIMESTAMP") {
        Kind::Datetime
    } else if d.contains("DATE") {
        Kind::Date
    } else if d.contains("TIME") {
        Kind::Time
    } else if d.contains("DEC") || d.contains("NUM") {
        Kind::Decimal
    } else {
        return None;
    })
}

fn kind_of_value(v: ValueRef<'_>) -> Kind {
    match v {
        ValueRef::Integer(_) => Kind::I64,
        ValueRef::Real(_) => Kind::F64,
        ValueRef::Blob(_) => Kind::Binary,
        _ => Kind::Text,
    }
}

fn text(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|e| e.to_string())
}

/// Push one SQLite value into a column of `kind`, converting what SQLite stored.
fn push(batcher: &mut Batcher, i: usize, kind: Kind, v: ValueRef<'_>) -> Result<(), String> {
    let bad = |what: &str| format!("`{what}` is not a {kind:?}");
    let cell = match (kind, v) {
        (_, ValueRef::Null) => Cell::Null,
        (Kind::Decimal, ValueRef::Real(f)) => {
            let s = f.to_string();
            let (m, s) = parse_decimal(&s).ok_or_else(|| bad(&s))?;
            Cell::Dec(m, s)
        }
        (Kind::Decimal, ValueRef::Text(t)) => {
            let s = text(t)?;
            let (m, sc) = parse_decimal(s).ok_or_else(|| bad(s))?;
            Cell::Dec(m, sc)
        }
        (Kind::Date, ValueRef::Text(t)) => {
            let s = text(t)?;
            Cell::Date(parse_date(s).ok_or_else(|| bad(s))?)
        }
        (Kind::Datetime, ValueRef::Text(t)) => {
            let s = text(t)?;
            Cell::Ts(parse_timestamp(s).ok_or_else(|| bad(s))?)
        }
        (Kind::Datetime, ValueRef::Integer(secs)) => Cell::Ts(secs * 1_000_000),
        (Kind::Time, ValueRef::Text(t)) => {
            let s = text(t)?;
            Cell::Time(parse_time(s).ok_or_else(|| bad(s))?)
        }
        (Kind::I64 | Kind::Bool, ValueRef::Text(t)) => {
            let s = text(t)?;
            Cell::I64(s.trim().parse().map_err(|_| bad(s))?)
        }
        (Kind::F64, ValueRef::Text(t)) => {
            let s = text(t)?;
            Cell::F64(s.trim().parse().map_err(|_| bad(s))?)
        }
        (Kind::I64, ValueRef::Real(f)) if f.fract() == 0.0 => Cell::I64(f as i64),
        (_, ValueRef::Integer(x)) => Cell::I64(x),
        (_, ValueRef::Real(f)) => Cell::F64(f),
        (_, ValueRef::Text(t)) => Cell::Str(text(t)?),
        (_, ValueRef::Blob(b)) => Cell::Bytes(b),
    };
    batcher.push(i, cell)
}

fn run_query(conn: &Connection, st: &Statement, batch_rows: usize) -> Result<DataFrame, String> {
    let mut stmt = conn.prepare(&st.sql).map_err(|e| e.to_string())?;
    let cols: Vec<(String, Option<Kind>)> = stmt
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.decl_type().and_then(kind_of_decl)))
        .collect();
    let params: Vec<Value> = st.values.iter().map(value).collect();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(params))
        .map_err(|e| e.to_string())?;
    let mut batcher: Option<Batcher> = None;
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        let b = match &mut batcher {
            Some(b) => b,
            None => {
                // Columns without a declared type take the kind of the first row's value.
                let kinds = cols
                    .iter()
                    .enumerate()
                    .map(|(i, (n, k))| {
                        let k = k.unwrap_or_else(|| {
                            row.get_ref(i).map(kind_of_value).unwrap_or(Kind::Text)
                        });
                        (n.clone(), k)
                    })
                    .collect();
                batcher.insert(Batcher::new(kinds, batch_rows))
            }
        };
        for (i, (name, _)) in cols.iter().enumerate() {
            let v = row.get_ref(i).map_err(|e| e.to_string())?;
            let kind = b.kinds()[i];
            push(b, i, kind, v).map_err(|e| format!("column `{name}`: {e}"))?;
        }
        b.end_row()?;
    }
    let b = batcher.unwrap_or_else(|| {
        Batcher::new(
            cols.iter()
                .map(|(n, k)| (n.clone(), k.unwrap_or(Kind::Text)))
                .collect(),
            batch_rows,
        )
    });
    b.finish()
}

#[async_trait]
impl Session for Lite {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn query(&mut self, st: &Statement, batch_rows: usize) -> Result<DataFrame, String> {
        let st = st.clone();
        super::on_blocking_pool(&self.conn, move |c| run_query(c, &st, batch_rows)).await
    }

    async fn execute(&mut self, st: &Statement) -> Result<u64, String> {
        let st = st.clone();
        super::on_blocking_pool(&self.conn, move |c| {
            if st.values.is_empty() {
                c.execute_batch(&st.sql).map_err(|e| e.to_string())?;
                return Ok(c.changes());
            }
            let mut stmt = c.prepare_cached(&st.sql).map_err(|e| e.to_string())?;
            let params: Vec<Value> = st.values.iter().map(value).collect();
            stmt.execute(rusqlite::params_from_iter(params))
                .map(|n| n as u64)
                .map_err(|e| e.to_string())
        })
        .await
    }
}
