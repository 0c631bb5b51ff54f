//! SQL Server over tiberius (pure Rust TDS, rustls), on a tokio TCP stream through
//! tokio-util's compat layer. No SQL Server runs where pipe's tests run: the connection
//! string parsing, the type mapping and the connection errors are tested; queries against a
//! server are not.

use super::columns::{days, nanos, Batcher, Cell, Kind};
use super::conn::{Backend, Spec};
use super::params::{Statement, Val};
use super::Session;
use async_trait::async_trait;
use futures::TryStreamExt;
use polars::prelude::DataFrame;
use tiberius::{AuthMethod, Client, ColumnData, ColumnType, Config, FromSql, Query};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

pub struct Mssql {
    client: Client<Compat<TcpStream>>,
}

/// The tiberius config a spec describes: an ADO.NET string in `url`, or fields.
pub fn config(spec: &Spec) -> Result<Config, String> {
    let mut c = match spec.url.as_deref() {
        Some(u) if u.contains('=') => Config::from_ado_string(u).map_err(|e| e.to_string())?,
        Some(u) => {
            let parsed = url::Url::parse(u).map_err(|e| e.to_string())?;
            let mut c = Config::new();
            c.host(parsed.host_str().unwrap_or("localhost"));
            c.port(parsed.port().unwrap_or(1433));
            let db = parsed.path().trim_start_matches('/');
            if !db.is_empty() {
                c.database(db);
            }
            if !parsed.username().is_empty() {
                c.authentication(AuthMethod::sql_server(
                    parsed.username(),
                    parsed.password().unwrap_or(""),
                ));
            }
            c
        }
        None => {
            let mut c = Config::new();
            c.host(spec.host.as_deref().unwrap_or("localhost"));
            c.port(spec.port.unwrap_or(1433));
            c
        }
    };
    if let Some(d) = &spec.database {
        c.database(d);
    }
    if let Some(u) = &spec.user {
        c.authentication(AuthMethod::sql_server(
            u,
            spec.password.as_deref().unwrap_or(""),
        ));
    }
    if spec.trust_server_certificate == Some(true) {
        c.trust_cert();
    }
    if spec.wants_tls() {
        c.encryption(tiberius::EncryptionLevel::Required);
    }
    Ok(c)
}

pub async fn connect(spec: &Spec) -> Result<Box<dyn Session>, String> {
    let config = config(spec)?;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        TcpStream::connect(config.get_addr()),
    )
    .await
    .map_err(|_| "timed out after 30 s".to_string())?
    .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let client = Client::connect(config, tcp.compat_write())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Box::new(Mssql { client }))
}

/// The table kind of a SQL Server column type.
pub fn kind_of(t: ColumnType) -> Kind {
    use ColumnType::*;
    match t {
        Bit | Bitn => Kind::Bool,
        Int1 | Int2 | Int4 | Int8 | Intn => Kind::I64,
        Float4 | Float8 | Floatn => Kind::F64,
        Money | Money4 | Decimaln | Numericn => Kind::Decimal,
        Datetime4 | Datetime | Datetimen | Datetime2 => Kind::Datetime,
        DatetimeOffsetn => Kind::DatetimeUtc,
        Daten => Kind::Date,
        Timen => Kind::Time,
        BigVarBin | BigBinary | Image => Kind::Binary,
        _ => Kind::Text,
    }
}

fn bind(q: &mut Query<'_>, v: &Val) {
    match v {
        Val::Null => q.bind(Option::<String>::None),
        Val::Bool(b) => q.bind(*b),
        Val::Int(i) => q.bind(*i),
        Val::Float(f) => q.bind(*f),
        Val::Bytes(b) => q.bind(b.clone()),
        Val::Date(d) => q.bind(*d),
        Val::Time(t) => q.bind(*t),
        Val::Ts(t) => q.bind(*t),
        Val::TsUtc(t) => q.bind(*t),
        v => q.bind(v.text().unwrap_or_default()),
    }
}

fn push(b: &mut Batcher, i: usize, d: &ColumnData<'static>) -> Result<(), String> {
    let te = |e: tiberius::error::Error| e.to_string();
    let cell = match d {
        ColumnData::U8(v) => v.map(|x| Cell::I64(x as i64)),
        ColumnData::I16(v) => v.map(|x| Cell::I64(x as i64)),
        ColumnData::I32(v) => v.map(|x| Cell::I64(x as i64)),
        ColumnData::I64(v) => v.map(Cell::I64),
        ColumnData::F32(v) => v.map(|x| Cell::F64(x as f64)),
        ColumnData::F64(v) => v.map(Cell::F64),
        ColumnData::Bit(v) => v.map(Cell::Bool),
        ColumnData::String(v) => v.as_deref().map(Cell::Str),
        ColumnData::Binary(v) => v.as_deref().map(Cell::Bytes),
        ColumnData::Numeric(v) => v.map(|n| Cell::Dec(n.value(), n.scale() as u32)),
        ColumnData::Guid(v) => {
            let s = v.map(|g| g.to_string());
            return b.push(i, s.as_deref().map(Cell::Str).unwrap_or(Cell::Null));
        }
        ColumnData::Xml(v) => {
            let s = v.as_ref().map(|x| x.to_string());
            return b.push(i, s.as_deref().map(Cell::Str).unwrap_or(Cell::Null));
        }
        ColumnData::Date(_) => chrono::NaiveDate::from_sql(d)
            .map_err(te)?
            .map(|x| Cell::Date(days(x))),
        ColumnData::Time(_) => chrono::NaiveTime::from_sql(d)
            .map_err(te)?
            .map(|x| Cell::Time(nanos(x))),
        ColumnData::DateTimeOffset(_) => chrono::DateTime::<chrono::Utc>::from_sql(d)
            .map_err(te)?
            .map(|x| Cell::Ts(x.timestamp_micros())),
        _ => chrono::NaiveDateTime::from_sql(d)
            .map_err(te)?
            .map(|x| Cell::Ts(x.and_utc().timestamp_micros())),
    };
    b.push(i, cell.unwrap_or(Cell::Null))
}

#[async_trait]
impl Session for Mssql {
    fn backend(&self) -> Backend {
        Backend::SqlServer
    }

    async fn query(&mut self, st: &Statement, batch_rows: usize) -> Result<DataFrame, String> {
        let mut q = Query::new(st.sql.clone());
        for v in &st.values {
            bind(&mut q, v);
        }
        let mut stream = q.query(&mut self.client).await.map_err(|e| e.to_string())?;
        let cols: Vec<(String, Kind)> = stream
            .columns()
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(&[])
            .iter()
            .map(|c| (c.name().to_string(), kind_of(c.column_type())))
            .collect();
        let mut batcher = Batcher::new(cols.clone(), batch_rows);
        let mut rows = stream.into_row_stream();
        while let Some(row) = rows.try_next().await.map_err(|e| e.to_string())? {
            for (i, (_, data)) in row.cells().enumerate() {
                push(&mut batcher, i, data).map_err(|e| format!("column `{}`: {e}", cols[i].0))?;
            }
            batcher.end_row()?;
        }
        batcher.finish()
    }

    async fn execute(&mut self, st: &Statement) -> Result<u64, String> {
        let mut q = Query::new(st.sql.clone());
        for v in &st.values {
            bind(&mut q, v);
        }
        let r = q
            .execute(&mut self.client)
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.total())
    }

    async fn begin(&mut self) -> Result<(), String> {
        self.execute(&super::plain("BEGIN TRANSACTION"))
            .await
            .map(|_| ())
    }
    async fn commit(&mut self) -> Result<(), String> {
        self.execute(&super::plain("COMMIT TRANSACTION"))
            .await
            .map(|_| ())
    }
    async fn rollback(&mut self) -> Result<(), String> {
        self.execute(&super::plain("ROLLBACK TRANSACTION"))
            .await
            .map(|_| ())
    }
}
