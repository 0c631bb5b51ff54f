//! PostgreSQL over tokio-postgres: binary result format decoded straight into column
//! builders; parameters sent in text format with the server's inferred types, so any value
//! binds to any parameter type the server can parse (a date string to a `date`, `12.50` to
//! a `numeric`) without a table of Rust types per SQL type.

use super::columns::{Batcher, Cell, Kind};
use super::conn::{Backend, Spec};
use super::params::{Statement, Val};
use super::Session;
use async_trait::async_trait;
use bytes::BufMut;
use engine::step::StepContext;
use futures::{pin_mut, TryStreamExt};
use polars::prelude::DataFrame;
use std::collections::HashMap;
use std::error::Error as _;
use tokio_postgres::types::{Format, FromSql, IsNull, Kind as PgKind, ToSql, Type};
use tokio_postgres::{Client, Config, NoTls};

pub struct Pg {
    client: Client,
    prepared: HashMap<String, tokio_postgres::Statement>,
}

/// The full error text: tokio-postgres puts the server's message in `source()`.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            s
        }
        None => match e.source() {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

pub async fn connect(spec: &Spec, _ctx: &StepContext) -> Result<Box<dyn Session>, String> {
    let mut cfg: Config = match &spec.url {
        Some(u) => u.parse().map_err(|e: tokio_postgres::Error| describe(&e))?,
        None => Config::new(),
    };
    if spec.url.is_none() {
        cfg.host(spec.host.as_deref().unwrap_or("localhost"));
        cfg.port(spec.port.unwrap_or(5432));
    }
    if let Some(u) = &spec.user {
        cfg.user(u);
    }
    if let Some(p) = &spec.password {
        cfg.password(p);
    }
    if let Some(d) = &spec.database {
        cfg.dbname(d);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(std::time::Duration::from_secs(30));
    }
    cfg.application_name("pipe");
    let client = if spec.wants_tls() {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config());
        let (client, conn) = cfg.connect(tls).await.map_err(|e| describe(&e))?;
        tokio::spawn(conn);
        client
    } else {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, conn) = cfg.connect(NoTls).await.map_err(|e| describe(&e))?;
        tokio::spawn(conn);
        client
    };
    Ok(Box::new(Pg {
        client,
        prepared: HashMap::new(),
    }))
}

/// rustls with the web PKI roots and the ring provider (both providers are in the tree,
/// so the default one cannot be guessed).
pub fn rustls_config() -> rustls::ClientConfig {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// A parameter sent as text: the server parses it as the type it inferred.
#[derive(Debug)]
struct TextParam(Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.put_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }
    tokio_postgres::types::to_sql_checked!();
}

fn text_param(v: &Val) -> TextParam {
    TextParam(match v {
        Val::Bytes(b) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for x in b {
                s.push_str(&format!("{x:02x}"));
            }
            Some(s)
        }
        v => v.text(),
    })
}

/// A column's raw bytes, whatever its type.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The table kind of a PostgreSQL type (None: not readable yet; cast it to text).
pub fn kind_of(t: &Type) -> Option<Kind> {
    Some(match *t {
        Type::BOOL => Kind::Bool,
        Type::INT2 | Type::INT4 => Kind::I32,
        Type::INT8 | Type::OID => Kind::I64,
        Type::FLOAT4 | Type::FLOAT8 => Kind::F64,
        Type::NUMERIC => Kind::Decimal,
        Type::TEXT
        | Type::VARCHAR
        | Type::BPCHAR
        | Type::NAME
        | Type::UNKNOWN
        | Type::CHAR
        | Type::JSON
        | Type::JSONB
        | Type::UUID => Kind::Text,
        Type::BYTEA => Kind::Binary,
        Type::DATE => Kind::Date,
        Type::TIME => Kind::Time,
        Type::TIMESTAMP => Kind::Datetime,
        Type::TIMESTAMPTZ => Kind::DatetimeUtc,
        _ => match t.kind() {
            PgKind::Enum(_) => Kind::Text,
            _ => return None,
        },
    })
}

/// Days between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

fn be<const N: usize>(b: &[u8]) -> Result<[u8; N], String> {
    b.try_into()
        .map_err(|_| "a value of unexpected length".to_string())
}

/// Decode a binary `numeric` into (mantissa, scale); NaN and infinities are None.
pub fn numeric(b: &[u8]) -> Result<Option<(i128, u32)>, String> {
    if b.len() < 8 {
        return Err("a numeric value too short".into());
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    let weight = i16::from_be_bytes([b[2], b[3]]) as i32;
    let sign = u16::from_be_bytes([b[4], b[5]]);
    let dscale = u16::from_be_bytes([b[6], b[7]]) as i32;
    if sign != 0x0000 && sign != 0x4000 {
        return Ok(None);
    }
    if b.len() < 8 + 2 * n {
        return Err("a numeric value too short".into());
    }
    let overflow = || "a numeric value does not fit 38 digits".to_string();
    let mut m: i128 = 0;
    for k in 0..n {
        let d = i16::from_be_bytes([b[8 + 2 * k], b[9 + 2 * k]]) as i128;
        m = m
            .checked_mul(10_000)
            .and_then(|x| x.checked_add(d))
            .ok_or_else(overflow)?;
    }
    // m = value × 10^(4·(n−1−weight)); we want value × 10^dscale.
    let e = 4 * (n as i32 - 1 - weight);
    let shift = dscale - e;
    if shift >= 0 {
        m = m
            .checked_mul(10i128.checked_pow(shift as u32).ok_or_else(overflow)?)
            .ok_or_else(overflow)?;
    } else {
        m /= 10i128.checked_pow((-shift) as u32).ok_or_else(overflow)?;
    }
    Ok(Some((if sign == 0x4000 { -m } else { m }, dscale as u32)))
}

fn cell<'a>(kind: Kind, t: &Type, b: &'a [u8]) -> Result<Cell<'a>, String> {
    Ok(match kind {
        Kind::Bool => Cell::Bool(b.first().copied().unwrap_or(0) != 0),
        Kind::I32 if *t == Type::INT2 => Cell::I32(i16::from_be_bytes(be(b)?) as i32),
        Kind::I32 => Cell::I32(i32::from_be_bytes(be(b)?)),
        Kind::I64 if *t == Type::OID => Cell::I64(u32::from_be_bytes(be(b)?) as i64),
        Kind::I64 => Cell::I64(i64::from_be_bytes(be(b)?)),
        Kind::F64 if *t == Type::FLOAT4 => Cell::F64(f32::from_be_bytes(be(b)?) as f64),
        Kind::F64 => Cell::F64(f64::from_be_bytes(be(b)?)),
        Kind::Decimal => match numeric(b)? {
            Some((m, s)) => Cell::Dec(m, s),
            None => Cell::Null,
        },
        Kind::Text if *t == Type::JSONB => {
            Cell::Str(std::str::from_utf8(b.get(1..).unwrap_or(b)).map_err(|e| e.to_string())?)
        }
        Kind::Text if *t == Type::UUID => return Err("uuid".into()),
        Kind::Text => Cell::Str(std::str::from_utf8(b).map_err(|e| e.to_string())?),
        Kind::Binary => Cell::Bytes(b),
        Kind::Date => Cell::Date(i32::from_be_bytes(be(b)?).saturating_add(PG_EPOCH_DAYS)),
        Kind::Time => Cell::Time(i64::from_be_bytes(be(b)?) * 1000),
        Kind::Datetime | Kind::DatetimeUtc => {
            Cell::Ts(i64::from_be_bytes(be(b)?).saturating_add(PG_EPOCH_MICROS))
        }
    })
}

fn uuid_text(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if h.len() != 32 {
        return h;
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Pg {
    async fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement, String> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await.map_err(|e| describe(&e))?;
        if self.prepared.len() > 16 {
            self.prepared.clear();
        }
        self.prepared.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

#[async_trait]
impl Session for Pg {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn query(&mut self, st: &Statement, batch_rows: usize) -> Result<DataFrame, String> {
        let stmt = self
            .client
            .prepare(&st.sql)
            .await
            .map_err(|e| describe(&e))?;
        let mut kinds = Vec::new();
        let mut types = Vec::new();
        for c in stmt.columns() {
            let kind = kind_of(c.type_()).ok_or_else(|| {
                format!(
                    "column `{}` has type {}, which sql.query cannot read: cast it in the query (`{}::text`)",
                    c.name(),
                    c.type_(),
                    c.name()
                )
            })?;
            kinds.push((c.name().to_string(), kind));
            types.push(c.type_().clone());
        }
        let mut batcher = Batcher::new(kinds.clone(), batch_rows);
        let params: Vec<TextParam> = st.values.iter().map(text_param).collect();
        let stream = self
            .client
            .query_raw(&stmt, params)
            .await
            .map_err(|e| describe(&e))?;
        pin_mut!(stream);
        let n = kinds.len();
        while let Some(row) = stream.try_next().await.map_err(|e| describe(&e))? {
            for i in 0..n {
                let raw: Raw = row.try_get(i).map_err(|e| describe(&e))?;
                match raw.0 {
                    None => batcher.push(i, Cell::Null)?,
                    Some(b) if types[i] == Type::UUID => {
                        let s = uuid_text(b);
                        batcher.push(i, Cell::Str(&s))?
                    }
                    Some(b) => batcher.push(
                        i,
                        cell(kinds[i].1, &types[i], b)
                            .map_err(|e| format!("column `{}`: {e}", kinds[i].0))?,
                    )?,
                }
            }
            batcher.end_row()?;
        }
        batcher.finish()
    }

    async fn execute(&mut self, st: &Statement) -> Result<u64, String> {
        if st.values.is_empty() {
            // Simple protocol: BEGIN/COMMIT, DDL, several statements.
            let rows = self
                .client
                .simple_query(&st.sql)
                .await
                .map_err(|e| describe(&e))?;
            return Ok(rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                    _ => None,
                })
                .sum());
        }
        let stmt = self.statement(&st.sql).await?;
        let params: Vec<TextParam> = st.values.iter().map(text_param).collect();
        self.client
            .execute_raw(&stmt, params)
            .await
            .map_err(|e| describe(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_decoding() {
        // 12.50: ndigits 2, weight 0, sign +, dscale 2, digits [12, 5000].
        let b = [0, 2, 0, 0, 0, 0, 0, 2, 0, 12, 0x13, 0x88];
        assert_eq!(numeric(&b).unwrap(), Some((1250, 2)));
        // -0.0001: ndigits 1, weight -1, dscale 4, digits [1].
        let b = [0, 1, 0xff, 0xff, 0x40, 0, 0, 4, 0, 1];
        assert_eq!(numeric(&b).unwrap(), Some((-1, 4)));
        // 10000 with dscale 0: ndigits 1, weight 1, digits [1].
        let b = [0, 1, 0, 1, 0, 0, 0, 0, 0, 1];
        assert_eq!(numeric(&b).unwrap(), Some((10000, 0)));
        // NaN.
        assert_eq!(numeric(&[0, 0, 0, 0, 0xc0, 0, 0, 0]).unwrap(), None);
    }

    #[test]
    fn type_mapping() {
        assert_eq!(kind_of(&Type::TIMESTAMPTZ), Some(Kind::DatetimeUtc));
        assert_eq!(kind_of(&Type::NUMERIC), Some(Kind::Decimal));
        assert_eq!(kind_of(&Type::INTERVAL), None);
    }
}
