//! ODBC over odbc-api (unixODBC's driver manager), on the blocking pool: any database with
//! an ODBC driver — Oracle, DB2, Snowflake, or PostgreSQL/MariaDB through Debian's drivers.
//!
//! Values are fetched as text in blocks (the driver converts every type to text) and parsed
//! by the column's ODBC type: a portable path that works the same for every driver, at the
//! price of some speed — the native connection types are the fast path. Parameters are
//! bound as text (`SQL_VARCHAR`); the driver converts them to the parameter's type.

use super::columns::{parse_date, parse_decimal, parse_time, parse_timestamp, Batcher, Cell, Kind};
use super::conn::{Backend, Spec};
use super::params::{Statement, Val};
use super::Session;
use async_trait::async_trait;
use odbc_api::buffers::TextRowSet;
use odbc_api::{
    Connection, ConnectionOptions, Cursor, DataType, Environment, IntoParameter, ResultSetMetadata,
};
use polars::prelude::DataFrame;
use std::sync::{Arc, Mutex, OnceLock};

/// Longest text value read (longer ones are cut by the driver).
const MAX_TEXT: usize = 64 * 1024;

fn env() -> Result<&'static Environment, String> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| Environment::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| format!("the ODBC driver manager (unixODBC) is not available: {e}"))
}

pub struct Odbc {
    conn: Arc<Mutex<Connection<'static>>>,
}

/// The connection string a spec describes.
pub fn connection_string(spec: &Spec) -> Result<String, String> {
    let mut s = match (&spec.connection_string, &spec.dsn, &spec.url) {
        (Some(c), _, _) => c.clone(),
        (None, Some(d), _) => format!("DSN={d};"),
        (None, None, Some(u)) => u.clone(),
        _ => return Err("an odbc connection needs `connection_string` or `dsn`".into()),
    };
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            if !s.is_empty() && !s.ends_with(';') {
                s.push(';');
            }
            s.push_str(&format!("{k}={{{v}}};"));
        }
    };
    add("UID", &spec.user);
    add("PWD", &spec.password);
    Ok(s)
}

pub async fn connect(spec: &Spec) -> Result<Box<dyn Session>, String> {
    let cs = connection_string(spec)?;
    let conn = tokio::task::spawn_blocking(move || {
        env()?
            .connect_with_connection_string(&cs, ConnectionOptions::default())
            .map_err(|e| explain_connect_error(&cs, &e.to_string()))
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Box::new(Odbc {
        conn: Arc::new(Mutex::new(conn)),
    }))
}

/// The value of a connection string's `Driver=` (or `DSN=`) attribute, braces removed.
fn attribute<'a>(cs: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = cs;
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let (value, next) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}')?;
                (&braced[..end], braced[end + 1..].trim_start_matches(';'))
            }
            None => match after.split_once(';') {
                Some((v, n)) => (v, n),
                None => (after, ""),
            },
        };
        if k.trim().eq_ignore_ascii_case(key) {
            return Some(value.trim());
        }
        rest = next;
    }
    None
}

/// The Debian package (or vendor download) that provides a well-known ODBC driver.
fn driver_package(driver: &str) -> Option<&'static str> {
    let d = driver.to_ascii_lowercase();
    Some(if d.contains("postgres") {
        "Debian's `odbc-postgresql` (apt-get install odbc-postgresql)"
    } else if d.contains("mariadb") || d.contains("mysql") {
        "Debian's `odbc-mariadb` (apt-get install odbc-mariadb)"
    } else if d.contains("sqlite") {
        "Debian's `libsqliteodbc` (apt-get install libsqliteodbc)"
    } else if d.contains("freetds") {
        "Debian's `tdsodbc` (apt-get install tdsodbc)"
    } else if d.contains("sql server") {
        "Microsoft's `msodbcsql18` package"
    } else if d.contains("oracle") {
        "Oracle Instant Client's ODBC package"
    } else {
        return None;
    })
}

/// A connect failure, explained when the cause is a driver (or DSN) this machine lacks.
///
/// `pipe` carries its own driver manager (unixODBC, built in), but drivers are shared
/// libraries registered in `odbcinst.ini` (`ODBCSYSINI`/`ODBCINSTINI` move it): when the
/// driver a connection names is not registered, or its library is missing, say which one to
/// install instead of unixODBC's "Data source name not found".
fn explain_connect_error(cs: &str, error: &str) -> String {
    let missing = error.contains("IM002")
        || error.contains("Data source name not found")
        || error.contains("Can't open lib")
        || error.contains("file not found");
    if !missing {
        return error.to_string();
    }
    let registry = "not registered in /etc/odbcinst.ini or $ODBCSYSINI/odbcinst.ini";
    match (attribute(cs, "driver"), attribute(cs, "dsn")) {
        (Some(driver), _) => {
            let install = driver_package(driver)
                .map(|p| format!("install {p}"))
                .unwrap_or_else(|| "install the vendor's ODBC driver for Linux".to_string());
            format!(
                "the ODBC driver `{driver}` is not installed on this machine ({registry}, or \
                 its library is missing): {install}; unixODBC said: {error}"
            )
        }
        (None, Some(dsn)) => format!(
            "the ODBC data source `{dsn}` is not defined on this machine (no `[{dsn}]` in \
             /etc/odbc.ini or ~/.odbc.ini), or its driver is not installed; unixODBC said: {error}"
        ),
        (None, None) => error.to_string(),
    }
}

/// The table kind of an ODBC column type.
pub fn kind_of(t: DataType) -> Kind {
    match t {
        DataType::Integer | DataType::SmallInt | DataType::TinyInt | DataType::BigInt => Kind::I64,
        DataType::Real | DataType::Double | DataType::Float { .. } => Kind::F64,
        DataType::Numeric { .. } | DataType::Decimal { .. } => Kind::Decimal,
        DataType::Bit => Kind::Bool,
        DataType::Date => Kind::Date,
        DataType::Time { .. } => Kind::Time,
        DataType::Timestamp { .. } => Kind::Datetime,
        _ => Kind::Text,
    }
}

fn cell(kind: Kind, s: &str) -> Result<Cell<'_>, String> {
    let bad = || format!("`{s}` is not a {kind:?}");
    Ok(match kind {
        Kind::I64 | Kind::I32 => Cell::I64(s.trim().parse().map_err(|_| bad())?),
        Kind::F64 => Cell::F64(s.trim().parse().map_err(|_| bad())?),
        Kind::Decimal => {
            let (m, sc) = parse_decimal(s).ok_or_else(bad)?;
            Cell::Dec(m, sc)
        }
        Kind::Bool => Cell::Bool(matches!(s.trim(), "1" | "t" | "true" | "TRUE" | "T")),
        Kind::Date => Cell::Date(parse_date(s).ok_or_else(bad)?),
        Kind::Time => Cell::Time(parse_time(s).ok_or_else(bad)?),
        Kind::Datetime | Kind::DatetimeUtc => Cell::Ts(parse_timestamp(s).ok_or_else(bad)?),
        Kind::Text | Kind::Binary => Cell::Str(s),
    })
}

type Param = <Option<String> as IntoParameter>::Parameter;

fn params(st: &Statement) -> Vec<Param> {
    st.values
        .iter()
        .map(|v| match v {
            Val::Bool(b) => Some(if *b { "1" } else { "0" }.to_string()),
            v => v.text(),
        })
        .map(IntoParameter::into_parameter)
        .collect()
}

fn run_query(
    conn: &Connection<'static>,
    st: &Statement,
    batch_rows: usize,
) -> Result<DataFrame, String> {
    let p = params(st);
    let cursor = conn
        .execute(&st.sql, p.as_slice(), None)
        .map_err(|e| e.to_string())?;
    let Some(mut cursor) = cursor else {
        return Batcher::new(Vec::new(), 1).finish();
    };
    let n = cursor.num_result_cols().map_err(|e| e.to_string())? as u16;
    let mut cols = Vec::new();
    for i in 1..=n {
        let name = cursor.col_name(i).map_err(|e| e.to_string())?;
        let t = cursor.col_data_type(i).map_err(|e| e.to_string())?;
        cols.push((name, kind_of(t)));
    }
    let mut batcher = Batcher::new(cols.clone(), batch_rows);
    let fetch = batch_rows.clamp(1, 10_000);
    let buffer =
        TextRowSet::for_cursor(fetch, &mut cursor, Some(MAX_TEXT)).map_err(|e| e.to_string())?;
    let mut block = cursor.bind_buffer(buffer).map_err(|e| e.to_string())?;
    while let Some(batch) = block.fetch().map_err(|e| e.to_string())? {
        for r in 0..batch.num_rows() {
            for (i, (name, kind)) in cols.iter().enumerate() {
                let v = batch.at_as_str(i, r).map_err(|e| e.to_string())?;
                let c = match v {
                    None => Cell::Null,
                    Some(s) => cell(*kind, s).map_err(|e| format!("column `{name}`: {e}"))?,
                };
                batcher.push(i, c)?;
            }
            batcher.end_row()?;
        }
    }
    batcher.finish()
}

#[async_trait]
impl Session for Odbc {
    fn backend(&self) -> Backend {
        Backend::Odbc
    }

    async fn query(&mut self, st: &Statement, batch_rows: usize) -> Result<DataFrame, String> {
        let st = st.clone();
        super::on_blocking_pool(&self.conn, move |c| run_query(c, &st, batch_rows)).await
    }

    async fn execute(&mut self, st: &Statement) -> Result<u64, String> {
        let st = st.clone();
        super::on_blocking_pool(&self.conn, move |c| {
            let mut pre = c.preallocate().map_err(|e| e.to_string())?;
            let p = params(&st);
            pre.execute(&st.sql, p.as_slice())
                .map_err(|e| e.to_string())?;
            Ok(pre.row_count().map_err(|e| e.to_string())?.unwrap_or(0) as u64)
        })
        .await
    }

    async fn begin(&mut self) -> Result<(), String> {
        super::on_blocking_pool(&self.conn, |c| {
            c.set_autocommit(false).map_err(|e| e.to_string())
        })
        .await
    }

    async fn commit(&mut self) -> Result<(), String> {
        super::on_blocking_pool(&self.conn, |c| {
            c.commit().map_err(|e| e.to_string())?;
            c.set_autocommit(true).map_err(|e| e.to_string())
        })
        .await
    }

    async fn rollback(&mut self) -> Result<(), String> {
        super::on_blocking_pool(&self.conn, |c| {
            c.rollback().map_err(|e| e.to_string())?;
            c.set_autocommit(true).map_err(|e| e.to_string())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_read_braced_or_plain_in_any_case() {
        let cs = "driver={PostgreSQL Unicode};Server=h;PWD={a;b};DSN=x";
        assert_eq!(attribute(cs, "Driver"), Some("PostgreSQL Unicode"));
        assert_eq!(attribute(cs, "server"), Some("h"));
        assert_eq!(attribute(cs, "pwd"), Some("a;b"));
        assert_eq!(attribute(cs, "dsn"), Some("x"));
        assert_eq!(attribute(cs, "uid"), None);
    }

    #[test]
    fn a_missing_driver_names_the_package_to_install() {
        let e = explain_connect_error(
            "Driver={MariaDB Unicode};Server=h;",
            "State: IM002, Native error: 0, Message: [unixODBC][Driver Manager]Data source name not found and no default driver specified",
        );
        assert!(e.contains("`MariaDB Unicode` is not installed"), "{e}");
        assert!(e.contains("apt-get install odbc-mariadb"), "{e}");
        let other = explain_connect_error("Driver={X};", "State: 08001, could not connect");
        assert_eq!(other, "State: 08001, could not connect");
    }
}
