//! MySQL and MariaDB over mysql_async: prepared statements (binary protocol, typed values),
//! rows read one by one from the stream into the column builders.

use super::columns::{days, parse_decimal, Batcher, Cell, Kind};
use super::conn::{Backend, Spec};
use super::params::{Statement, Val};
use super::Session;
use async_trait::async_trait;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Params, SslOpts, Value};
use polars::prelude::DataFrame;

pub struct My {
    conn: Conn,
}

pub async fn connect(spec: &Spec) -> Result<Box<dyn Session>, String> {
    let mut b = match &spec.url {
        Some(u) => OptsBuilder::from_opts(Opts::from_url(u).map_err(|e| e.to_string())?),
        None => OptsBuilder::default()
            .ip_or_hostname(spec.host.clone().unwrap_or_else(|| "localhost".into()))
            .tcp_port(spec.port.unwrap_or(3306)),
    };
    if let Some(u) = &spec.user {
        b = b.user(Some(u.clone()));
    }
    if let Some(p) = &spec.password {
        b = b.pass(Some(p.clone()));
    }
    if let Some(d) = &spec.database {
        b = b.db_name(Some(d.clone()));
    }
    if spec.wants_tls() {
        b = b.ssl_opts(SslOpts::default());
    }
    let conn = tokio::time::timeout(std::time::Duration::from_secs(30), Conn::new(b))
        .await
        .map_err(|_| "timed out after 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Box::new(My { conn }))
}

fn value(v: &Val) -> Value {
    match v {
        Val::Null => Value::NULL,
        Val::Bool(b) => Value::Int(*b as i64),
        Val::Int(i) => Value::Int(*i),
        Val::Float(f) => Value::Double(*f),
        Val::Bytes(b) => Value::Bytes(b.clone()),
        Val::Date(d) => datetime(d.and_hms_opt(0, 0, 0).unwrap_or_default()),
        Val::Ts(t) => datetime(*t),
        Val::TsUtc(t) => datetime(t.naive_utc()),
        v => Value::Bytes(v.text().unwrap_or_default().into_bytes()),
    }
}

fn datetime(t: chrono::NaiveDateTime) -> Value {
    use chrono::{Datelike, Timelike};
    Value::Date(
        t.year() as u16,
        t.month() as u8,
        t.day() as u8,
        t.hour() as u8,
        t.minute() as u8,
        t.second() as u8,
        t.nanosecond() / 1000,
    )
}

fn params(st: &Statement) -> Params {
    if st.values.is_empty() {
        Params::Empty
    } else {
        Params::Positional(st.values.iter().map(value).collect())
    }
}

/// The table kind of a MySQL column.
pub fn kind_of(t: ColumnType, flags: ColumnFlags, charset: u16, length: u32) -> Kind {
    use ColumnType::*;
    let binary = charset == 63;
    match t {
        MYSQL_TYPE_TINY if length == 1 => Kind::Bool,
        MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_YEAR => Kind::I32,
        MYSQL_TYPE_LONG if !flags.contains(ColumnFlags::UNSIGNED_FLAG) => Kind::I32,
        MYSQL_TYPE_LONG => Kind::I64,
        MYSQL_TYPE_LONGLONG if flags.contains(ColumnFlags::UNSIGNED_FLAG) => Kind::Decimal,
        MYSQL_TYPE_LONGLONG => Kind::I64,
        MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => Kind::F64,
        MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => Kind::Decimal,
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => Kind::Date,
        MYSQL_TYPE_DATETIME
        | MYSQL_TYPE_DATETIME2
        | MYSQL_TYPE_TIMESTAMP
        | MYSQL_TYPE_TIMESTAMP2 => Kind::Datetime,
        MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => Kind::Time,
        MYSQL_TYPE_BIT => Kind::Binary,
        MYSQL_TYPE_TINY_BLOB
        | MYSQL_TYPE_MEDIUM_BLOB
        | MYSQL_TYPE_LONG_BLOB
        | MYSQL_TYPE_BLOB
        | MYSQL_TYPE_VAR_STRING
        | MYSQL_TYPE_STRING
        | MYSQL_TYPE_VARCHAR
            if binary =>
        {
            Kind::Binary
        }
        _ => Kind::Text,
    }
}

fn cell(kind: Kind, v: &Value) -> Result<Cell<'_>, String> {
    Ok(match (kind, v) {
        (_, Value::NULL) => Cell::Null,
        (Kind::Decimal, Value::Bytes(b)) => {
            let s = std::str::from_utf8(b).map_err(|e| e.to_string())?;
            let (m, sc) = parse_decimal(s).ok_or_else(|| format!("`{s}` is not a decimal"))?;
            Cell::Dec(m, sc)
        }
        (Kind::Decimal, Value::UInt(u)) => Cell::Dec(*u as i128, 0),
        (Kind::I32, Value::Int(i)) => Cell::I32(*i as i32),
        (Kind::I32, Value::UInt(u)) => Cell::I32(*u as i32),
        (_, Value::Int(i)) => Cell::I64(*i),
        (Kind::Bool, Value::UInt(u)) => Cell::I64(*u as i64),
        (_, Value::UInt(u)) => {
            Cell::I64(i64::try_from(*u).map_err(|_| "an unsigned value over i64")?)
        }
        (_, Value::Float(f)) => Cell::F64(*f as f64),
        (_, Value::Double(f)) => Cell::F64(*f),
        (Kind::Binary, Value::Bytes(b)) => Cell::Bytes(b),
        (_, Value::Bytes(b)) => Cell::Str(std::str::from_utf8(b).map_err(|e| e.to_string())?),
        (Kind::Date, Value::Date(y, m, d, ..)) => Cell::Date(
            chrono::NaiveDate::from_ymd_opt(*y as i32, *m as u32, *d as u32)
                .map(days)
                .unwrap_or(0),
        ),
        (_, Value::Date(y, mo, d, h, mi, s, us)) => Cell::Ts(
            chrono::NaiveDate::from_ymd_opt(*y as i32, *mo as u32, *d as u32)
                .and_then(|d| d.and_hms_micro_opt(*h as u32, *mi as u32, *s as u32, *us))
                .map(|t| t.and_utc().timestamp_micros())
                .unwrap_or(0),
        ),
        (_, Value::Time(neg, d, h, mi, s, us)) => {
            let secs = *d as i64 * 86_400 + *h as i64 * 3600 + *mi as i64 * 60 + *s as i64;
            let ns = secs * 1_000_000_000 + *us as i64 * 1000;
            Cell::Time(if *neg { -ns } else { ns })
        }
    })
}

fn kinds(cols: &[mysql_async::Column]) -> Vec<(String, Kind)> {
    cols.iter()
        .map(|c| {
            let k = kind_of(
                c.column_type(),
                c.flags(),
                c.character_set(),
                c.column_length(),
            );
            (c.name_str().to_string(), k)
        })
        .collect()
}

#[async_trait]
impl Session for My {
    fn backend(&self) -> Backend {
        Backend::Mysql
    }

    async fn query(&mut self, st: &Statement, batch_rows: usize) -> Result<DataFrame, String> {
        let mut result = self
            .conn
            .exec_iter(st.sql.as_str(), params(st))
            .await
            .map_err(|e| e.to_string())?;
        let cols = result.columns().map(|c| kinds(&c)).unwrap_or_default();
        let mut batcher = Batcher::new(cols.clone(), batch_rows);
        while let Some(row) = result.next().await.map_err(|e| e.to_string())? {
            for (i, (name, kind)) in cols.iter().enumerate() {
                let v = row.as_ref(i).unwrap_or(&Value::NULL);
                let c = cell(*kind, v).map_err(|e| format!("column `{name}`: {e}"))?;
                batcher.push(i, c)?;
            }
            batcher.end_row()?;
        }
        result.drop_result().await.map_err(|e| e.to_string())?;
        batcher.finish()
    }

    async fn execute(&mut self, st: &Statement) -> Result<u64, String> {
        if st.values.is_empty() {
            self.conn
                .query_drop(st.sql.as_str())
                .await
                .map_err(|e| e.to_string())?;
        } else {
            self.conn
                .exec_drop(st.sql.as_str(), params(st))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(self.conn.affected_rows())
    }

    async fn begin(&mut self) -> Result<(), String> {
        self.execute(&super::plain("START TRANSACTION"))
            .await
            .map(|_| ())
    }
}
