//! `type: sql.write` — the input table into a SQL table, in one transaction.

use super::columns::format_decimal;
use super::conn::Backend;
use super::params::{Statement, Val};
use super::{connect, plain, Session};
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use polars::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use std::time::Instant;

/// What happens to the rows already in the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Add the rows.
    #[default]
    Append,
    /// The table holds exactly these rows afterwards (dropped and re-created inside the
    /// transaction; on MySQL, whose DDL commits, its rows are deleted instead).
    Replace,
    /// Update the rows whose `keys` match, insert the others (an upsert).
    Merge,
}

/// Write the input table into a SQL table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteSpec {
    /// The destination table (`name` or `schema.name`).
    pub table: String,
    /// `append` (default), `replace` or `merge` (upsert on `keys`).
    #[serde(default)]
    pub mode: WriteMode,
    /// The columns that identify a row (required for `merge`; non-null and unique in the
    /// input). A table the step creates gets them as its primary key.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Create the table when it does not exist, with column types from the input (default
    /// true).
    #[serde(default = "yes")]
    pub create: bool,
    /// Rows per `INSERT` statement (default 1000; fewer when the backend's parameter limit
    /// requires).
    #[serde(default = "default_rows")]
    pub batch_rows: usize,
}

fn yes() -> bool {
    true
}
fn default_rows() -> usize {
    1000
}

/// The `sql.write` step: a [`WriteSpec`] checked when it was read.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "WriteSpec")]
pub struct SqlWrite {
    /// The checked configuration.
    pub spec: WriteSpec,
}

impl TryFrom<WriteSpec> for SqlWrite {
    type Error = String;
    fn try_from(spec: WriteSpec) -> Result<Self, String> {
        if spec.mode == WriteMode::Merge && spec.keys.is_empty() {
            return Err("`mode: merge` needs `keys`: the columns that identify a row".into());
        }
        if spec.batch_rows == 0 {
            return Err("`batch_rows` must be at least 1".into());
        }
        Ok(SqlWrite { spec })
    }
}

const OUTPUTS: [&str; 4] = ["rows", "table", "created", "elapsed_ms"];

/// Quote an identifier (each part of `schema.table`).
pub fn quote(backend: Backend, name: &str) -> String {
    name.split('.')
        .map(|p| match backend {
            Backend::Mysql => format!("`{}`", p.replace('`', "``")),
            _ => format!("\"{}\"", p.replace('"', "\"\"")),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The column type a table the step creates gets for a frame column.
pub fn ddl_type(backend: Backend, dt: &DataType, key: bool) -> String {
    use Backend::*;
    let s = match (backend, dt) {
        (Postgres, DataType::Boolean) => "boolean",
        (Mysql, DataType::Boolean) => "boolean",
        (Sqlite, DataType::Boolean) => "BOOLEAN",
        (SqlServer, DataType::Boolean) => "bit",
        (Odbc, DataType::Boolean) => "BOOLEAN",
        (Sqlite, DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64) => "INTEGER",
        (_, DataType::Int8 | DataType::Int16 | DataType::UInt8) => "smallint",
        (_, DataType::Int32 | DataType::UInt16) => "integer",
        (_, DataType::Int64 | DataType::UInt32) => "bigint",
        (Sqlite, DataType::UInt64) => "INTEGER",
        (_, DataType::UInt64) => "decimal(20,0)",
        (Postgres | Odbc, DataType::Float32 | DataType::Float64) => "double precision",
        (Mysql, DataType::Float32 | DataType::Float64) => "double",
        (Sqlite, DataType::Float32 | DataType::Float64) => "REAL",
        (SqlServer, DataType::Float32 | DataType::Float64) => "float",
        (Postgres, DataType::Binary) => "bytea",
        (Mysql, DataType::Binary) => "longblob",
        (Sqlite, DataType::Binary) => "BLOB",
        (SqlServer | Odbc, DataType::Binary) => "varbinary(max)",
        (Sqlite, DataType::Date) => "DATE",
        (_, DataType::Date) => "date",
        (Postgres, DataType::Time) => "time",
        (Mysql, DataType::Time) => "time(6)",
        (_, DataType::Time) => "time",
        (Postgres, DataType::Datetime(_, Some(_))) => "timestamptz",
        (Postgres, DataType::Datetime(_, None)) => "timestamp",
        (Mysql, DataType::Datetime(..)) => "datetime(6)",
        (Sqlite, DataType::Datetime(..)) => "TIMESTAMP",
        (SqlServer, DataType::Datetime(_, Some(_))) => "datetimeoffset",
        (SqlServer, DataType::Datetime(_, None)) => "datetime2",
        (Odbc, DataType::Datetime(..)) => "timestamp",
        (_, DataType::Decimal(p, s)) => {
            return format!(
                "{}({},{})",
                if backend == Sqlite {
                    "NUMERIC"
                } else {
                    "decimal"
                },
                p.unwrap_or(38).min(if backend == Mysql { 65 } else { 38 }),
                s.unwrap_or(0)
            )
        }
        (Postgres, _) => "text",
        (Mysql, _) if key => "varchar(255)",
        (Mysql, _) => "longtext",
        (Sqlite, _) => "TEXT",
        (SqlServer, _) if key => "nvarchar(450)",
        (SqlServer, _) => "nvarchar(max)",
        (Odbc, _) if key => "varchar(255)",
        (Odbc, _) => "varchar(4000)",
    };
    s.to_string()
}

/// A frame cell as a value to bind.
pub fn val(v: AnyValue<'_>) -> Val {
    let ts = |v: i64, unit: &TimeUnit| match unit {
        TimeUnit::Nanoseconds => v.div_euclid(1000),
        TimeUnit::Microseconds => v,
        TimeUnit::Milliseconds => v * 1000,
    };
    match v {
        AnyValue::Null => Val::Null,
        AnyValue::Boolean(b) => Val::Bool(b),
        AnyValue::Int8(x) => Val::Int(x as i64),
        AnyValue::Int16(x) => Val::Int(x as i64),
        AnyValue::Int32(x) => Val::Int(x as i64),
        AnyValue::Int64(x) => Val::Int(x),
        AnyValue::UInt8(x) => Val::Int(x as i64),
        AnyValue::UInt16(x) => Val::Int(x as i64),
        AnyValue::UInt32(x) => Val::Int(x as i64),
        AnyValue::UInt64(x) => match i64::try_from(x) {
            Ok(i) => Val::Int(i),
            Err(_) => Val::Dec(x.to_string()),
        },
        AnyValue::Float32(x) => Val::Float(x as f64),
        AnyValue::Float64(x) => Val::Float(x),
        AnyValue::String(s) => Val::Text(s.to_string()),
        AnyValue::StringOwned(s) => Val::Text(s.to_string()),
        AnyValue::Binary(b) => Val::Bytes(b.to_vec()),
        AnyValue::BinaryOwned(b) => Val::Bytes(b),
        AnyValue::Date(d) => Val::Date(
            chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(d as i64),
        ),
        AnyValue::Time(ns) => Val::Time(
            chrono::NaiveTime::from_num_seconds_from_midnight_opt(
                (ns / 1_000_000_000) as u32,
                (ns % 1_000_000_000) as u32,
            )
            .unwrap_or_default(),
        ),
        AnyValue::Datetime(v, unit, tz) => {
            let t = chrono::DateTime::from_timestamp_micros(ts(v, &unit)).unwrap_or_default();
            if tz.is_some() {
                Val::TsUtc(t)
            } else {
                Val::Ts(t.naive_utc())
            }
        }
        AnyValue::DatetimeOwned(v, unit, tz) => {
            let t = chrono::DateTime::from_timestamp_micros(ts(v, &unit)).unwrap_or_default();
            if tz.is_some() {
                Val::TsUtc(t)
            } else {
                Val::Ts(t.naive_utc())
            }
        }
        AnyValue::Decimal(m, s) => Val::Dec(format_decimal(m, s as u32)),
        other => Val::Text(other.to_string()),
    }
}

/// The most parameters one statement may bind.
fn max_params(backend: Backend) -> usize {
    match backend {
        Backend::Postgres | Backend::Mysql => 65_535,
        Backend::Sqlite => 32_766,
        Backend::SqlServer => 2_000,
        Backend::Odbc => 2_000,
    }
}

/// The SQL that asks whether `table` exists (one row, one truthy value).
fn exists_query(backend: Backend, table: &str) -> Statement {
    let (schema, name) = match table.rsplit_once('.') {
        Some((s, n)) => (Some(s.to_string()), n.to_string()),
        None => (None, table.to_string()),
    };
    let sql = match backend {
        Backend::Postgres => "SELECT to_regclass($1) IS NOT NULL".to_string(),
        Backend::Mysql => format!(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {} AND table_name = ?",
            if schema.is_some() { "?" } else { "DATABASE()" }
        ),
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?".to_string()
        }
        Backend::SqlServer => {
            "SELECT CASE WHEN OBJECT_ID(@P1, 'U') IS NULL THEN 0 ELSE 1 END".to_string()
        }
        Backend::Odbc => format!("SELECT 1 FROM {} WHERE 1 = 0", quote(backend, table)),
    };
    let values = match backend {
        Backend::Postgres | Backend::SqlServer => vec![Val::Text(quote(backend, table))],
        Backend::Mysql => schema
            .into_iter()
            .chain(Some(name.clone()))
            .map(Val::Text)
            .collect(),
        Backend::Sqlite => vec![Val::Text(name)],
        Backend::Odbc => Vec::new(),
    };
    Statement { sql, values }
}

async fn table_exists(s: &mut dyn Session, table: &str) -> Result<bool, String> {
    let q = exists_query(s.backend(), table);
    if s.backend() == Backend::Odbc {
        return Ok(s.query(&q, 1).await.is_ok());
    }
    let df = s.query(&q, 1).await?;
    let v = df.get_columns()[0].get(0).map_err(|e| e.to_string())?;
    Ok(matches!(v, AnyValue::Boolean(true)) || v.extract::<i64>().unwrap_or(0) > 0)
}

/// `CREATE TABLE` for the frame (a primary key on `keys`).
pub fn create_sql(backend: Backend, table: &str, df: &DataFrame, keys: &[String]) -> String {
    let mut cols: Vec<String> = df
        .get_columns()
        .iter()
        .map(|c| {
            let key = keys.iter().any(|k| k == c.name().as_str());
            format!(
                "{} {}{}",
                quote(backend, c.name()),
                ddl_type(backend, c.dtype(), key),
                if key { " NOT NULL" } else { "" }
            )
        })
        .collect();
    if !keys.is_empty() {
        cols.push(format!(
            "PRIMARY KEY ({})",
            keys.iter()
                .map(|k| quote(backend, k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    format!(
        "CREATE TABLE {} ({})",
        quote(backend, table),
        cols.join(", ")
    )
}

/// The multi-row INSERT (or MERGE) of `rows` rows.
pub fn insert_sql(
    backend: Backend,
    table: &str,
    columns: &[String],
    rows: usize,
    merge_keys: Option<&[String]>,
) -> String {
    let style = match backend {
        Backend::Postgres => super::params::Style::Dollar,
        Backend::SqlServer => super::params::Style::AtP,
        _ => super::params::Style::Question,
    };
    let q = |c: &str| quote(backend, c);
    let cols = columns.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
    let mut values = String::new();
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            values.push_str(", ");
        }
        values.push('(');
        for c in 0..columns.len() {
            if c > 0 {
                values.push_str(", ");
            }
            n += 1;
            values.push_str(&style.placeholder(n));
        }
        values.push(')');
    }
    let t = q(table);
    let Some(keys) = merge_keys else {
        return format!("INSERT INTO {t} ({cols}) VALUES {values}");
    };
    let others: Vec<&String> = columns.iter().filter(|c| !keys.contains(c)).collect();
    let key_list = keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
    match backend {
        Backend::Postgres | Backend::Sqlite | Backend::Odbc => {
            let set = others
                .iter()
                .map(|c| format!("{} = excluded.{}", q(c), q(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let action = if set.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {set}")
            };
            format!("INSERT INTO {t} ({cols}) VALUES {values} ON CONFLICT ({key_list}) {action}")
        }
        Backend::Mysql => {
            let set = if others.is_empty() {
                format!("{0} = {0}", q(&keys[0]))
            } else {
                others
                    .iter()
                    .map(|c| format!("{} = VALUES({})", q(c), q(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("INSERT INTO {t} ({cols}) VALUES {values} ON DUPLICATE KEY UPDATE {set}")
        }
        Backend::SqlServer => {
            let on = keys
                .iter()
                .map(|k| format!("target.{0} = source.{0}", q(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let set = others
                .iter()
                .map(|c| format!("target.{0} = source.{0}", q(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let src = columns
                .iter()
                .map(|c| format!("source.{}", q(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let matched = if set.is_empty() {
                String::new()
            } else {
                format!(" WHEN MATCHED THEN UPDATE SET {set}")
            };
            format!(
                "MERGE INTO {t} AS target USING (VALUES {values}) AS source ({cols}) ON {on}{matched} WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({src});"
            )
        }
    }
}

#[async_trait]
impl StepConfig for SqlWrite {
    const TYPE: &'static str = "sql.write";
    const SUMMARY: &'static str =
        "Write the input table into a SQL table (append, replace, or merge on keys) in one transaction, creating it when missing";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: false,
            outputs: Some(OUTPUTS.iter().map(|s| s.to_string()).collect()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let started = Instant::now();
        let spec = &self.spec;
        let df = match ctx.inputs.first() {
            Some((id, t)) => crate::table::frame(t)
                .ok_or_else(|| StepError::fatal(format!("input `{id}` is not a table")))?
                .clone(),
            None => {
                return Err(StepError::fatal(
                    "sql.write needs a table: name the step that produces it as `input:`",
                ))
            }
        };
        check_keys(spec, &df)?;
        let (mut session, target) = connect(&ctx, Self::TYPE).await?;
        let fail = |e: String| {
            StepError::fatal(
                ctx.redactor
                    .redact(&format!("writing `{}` on {target}: {e}", spec.table)),
            )
        };
        let exists = table_exists(session.as_mut(), &spec.table)
            .await
            .map_err(fail)?;
        if !exists && !spec.create {
            return Err(fail(
                "the table does not exist (and `create: false`)".into(),
            ));
        }
        let backend = session.backend();
        if backend == Backend::Odbc && spec.mode == WriteMode::Merge {
            return Err(fail("`mode: merge` is not available over ODBC: use the database's own connection type (postgres, mysql, sqlite, sqlserver)".into()));
        }
        let mut log = Log::default();
        // MySQL commits DDL implicitly: create before the transaction (nothing to lose).
        let ddl_in_tx = backend != Backend::Mysql;
        let keys = if spec.mode == WriteMode::Merge {
            &spec.keys[..]
        } else {
            &[]
        };
        let create = create_sql(backend, &spec.table, &df, keys);
        if !ddl_in_tx && !exists {
            run(session.as_mut(), &ctx, &mut log, &plain(&create))
                .await
                .map_err(fail)?;
        }
        if !ddl_in_tx && exists && spec.mode == WriteMode::Merge {
            mysql_unique_key(session.as_mut(), &ctx, &mut log, spec)
                .await
                .map_err(fail)?;
        }
        session.begin().await.map_err(fail)?;
        let body = write_rows(
            session.as_mut(),
            &ctx,
            &mut log,
            spec,
            &df,
            exists,
            ddl_in_tx,
            &create,
        )
        .await;
        match body {
            Ok(()) => session.commit().await.map_err(fail)?,
            Err(e) => {
                let _ = session.rollback().await;
                return Err(fail(e));
            }
        }
        let rows = df.height() as u64;
        for (shape, n) in &log.shapes {
            if *n > 1 {
                ctx.log(Level::Info, &format!("ran {n} times: {shape}"));
            }
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        ctx.progress(&[("rows", rows)]);
        ctx.log(
            Level::Info,
            &format!(
                "{} {rows} row{} {} `{}` on {target} in {elapsed_ms} ms (one transaction)",
                match spec.mode {
                    WriteMode::Append => "appended",
                    WriteMode::Replace => "replaced the table with",
                    WriteMode::Merge => "merged",
                },
                if rows == 1 { "" } else { "s" },
                if spec.mode == WriteMode::Replace {
                    "in"
                } else {
                    "into"
                },
                spec.table
            ),
        );
        let created = !exists || (spec.mode == WriteMode::Replace && ddl_in_tx);
        let outputs = json!({ "rows": rows, "table": spec.table, "created": created, "elapsed_ms": elapsed_ms });
        Ok(StepOutput {
            outputs: outputs.as_object().cloned().unwrap_or_default(),
            result: outputs,
            table: None,
            warnings: Vec::new(),
        })
    }
}

fn check_keys(spec: &WriteSpec, df: &DataFrame) -> Result<(), StepError> {
    for k in &spec.keys {
        let c = df.column(k).map_err(|_| {
            StepError::fatal(format!(
                "`keys` names `{k}`, which the input table lacks (its columns: {})",
                df.get_column_names()
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if spec.mode == WriteMode::Merge && c.null_count() > 0 {
            return Err(StepError::fatal(format!(
                "key column `{k}` has null values: a merge cannot match them"
            )));
        }
    }
    if spec.mode == WriteMode::Merge {
        let dup = df
            .select(spec.keys.iter().map(String::as_str))
            .and_then(|k| k.is_duplicated())
            .map_err(|e| StepError::fatal(e.to_string()))?
            .sum()
            .unwrap_or(0);
        if dup > 0 {
            return Err(StepError::fatal(format!(
                "{dup} input rows repeat a key ({}): a merge needs each key once",
                spec.keys.join(", ")
            )));
        }
    }
    Ok(())
}

/// MySQL's upsert needs a unique key on `keys`: add one when the existing table has none
/// (before the transaction: MySQL's DDL commits).
async fn mysql_unique_key(
    s: &mut dyn Session,
    ctx: &StepContext,
    log: &mut Log,
    spec: &WriteSpec,
) -> Result<(), String> {
    let (schema, name) = match spec.table.rsplit_once('.') {
        Some((sc, n)) => (Val::Text(sc.to_string()), n.to_string()),
        None => (Val::Null, spec.table.clone()),
    };
    let q = Statement {
        sql: "SELECT index_name, GROUP_CONCAT(column_name ORDER BY seq_in_index SEPARATOR ',') AS cols \
              FROM information_schema.statistics WHERE table_schema = COALESCE(?, DATABASE()) \
              AND table_name = ? AND non_unique = 0 GROUP BY index_name"
            .into(),
        values: vec![schema, Val::Text(name.clone())],
    };
    let df = s.query(&q, 1000).await?;
    let mut want: Vec<String> = spec.keys.iter().map(|k| k.to_ascii_lowercase()).collect();
    want.sort();
    let cols = df.column("cols").map_err(|e| e.to_string())?;
    for r in 0..df.height() {
        let text = match cols.get(r).map_err(|e| e.to_string())? {
            AnyValue::String(c) => c.to_string(),
            AnyValue::StringOwned(c) => c.to_string(),
            AnyValue::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            AnyValue::BinaryOwned(b) => String::from_utf8_lossy(&b).into_owned(),
            _ => continue,
        };
        let mut have: Vec<String> = text.split(',').map(|x| x.to_ascii_lowercase()).collect();
        have.sort();
        if have == want {
            return Ok(());
        }
    }
    let keys = spec
        .keys
        .iter()
        .map(|k| quote(Backend::Mysql, k))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "ALTER TABLE {} ADD UNIQUE KEY {} ({keys})",
        quote(Backend::Mysql, &spec.table),
        quote(Backend::Mysql, &format!("{name}__pipe_keys"))
    );
    run(s, ctx, log, &plain(&sql)).await.map(|_| ())
}

/// Statement shapes run, for the log.
#[derive(Default)]
struct Log {
    shapes: IndexMap<String, u64>,
}

async fn run(
    s: &mut dyn Session,
    ctx: &StepContext,
    log: &mut Log,
    st: &Statement,
) -> Result<u64, String> {
    let n = log.shapes.entry(st.sql.clone()).or_insert(0);
    *n += 1;
    if *n == 1 {
        let shown = if st.values.is_empty() {
            st.sql.clone()
        } else {
            format!("{} [{} values]", st.sql, st.values.len())
        };
        ctx.log(Level::Info, &shown);
    }
    s.execute(st).await
}

#[allow(clippy::too_many_arguments)]
async fn write_rows(
    s: &mut dyn Session,
    ctx: &StepContext,
    log: &mut Log,
    spec: &WriteSpec,
    df: &DataFrame,
    exists: bool,
    ddl_in_tx: bool,
    create: &str,
) -> Result<(), String> {
    let backend = s.backend();
    let t = quote(backend, &spec.table);
    match (spec.mode, exists, ddl_in_tx) {
        (WriteMode::Replace, true, true) => {
            run(s, ctx, log, &plain(&format!("DROP TABLE {t}"))).await?;
            run(s, ctx, log, &plain(create)).await?;
        }
        (WriteMode::Replace, true, false) => {
            run(s, ctx, log, &plain(&format!("DELETE FROM {t}"))).await?;
        }
        (_, false, true) => {
            run(s, ctx, log, &plain(create)).await?;
        }
        (WriteMode::Merge, true, true) if backend != Backend::SqlServer => {
            // ON CONFLICT needs a unique index on the keys.
            let name = spec.table.rsplit('.').next().unwrap_or(&spec.table);
            let idx = quote(backend, &format!("{name}__pipe_keys"));
            let keys = spec
                .keys
                .iter()
                .map(|k| quote(backend, k))
                .collect::<Vec<_>>()
                .join(", ");
            run(
                s,
                ctx,
                log,
                &plain(&format!(
                    "CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {t} ({keys})"
                )),
            )
            .await?;
        }
        _ => {}
    }
    let columns: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    if columns.is_empty() || df.height() == 0 {
        return Ok(());
    }
    let per = (max_params(backend) / columns.len()).clamp(
        1,
        spec.batch_rows.min(if backend == Backend::SqlServer {
            1000
        } else {
            usize::MAX
        }),
    );
    let merge = (spec.mode == WriteMode::Merge).then_some(&spec.keys[..]);
    let df = df.clone().rechunk_mut_and_return();
    let cols = df.get_columns();
    let mut start = 0;
    let mut full_sql: Option<String> = None;
    while start < df.height() {
        let n = per.min(df.height() - start);
        let sql = if n == per {
            full_sql
                .get_or_insert_with(|| insert_sql(backend, &spec.table, &columns, per, merge))
                .clone()
        } else {
            insert_sql(backend, &spec.table, &columns, n, merge)
        };
        let mut values = Vec::with_capacity(n * columns.len());
        for r in start..start + n {
            for c in cols {
                values.push(val(c.get(r).map_err(|e| e.to_string())?));
            }
        }
        run(s, ctx, log, &Statement { sql, values }).await?;
        ctx.progress(&[("rows", (start + n) as u64)]);
        start += n;
    }
    Ok(())
}

trait RechunkOwned {
    fn rechunk_mut_and_return(self) -> Self;
}

impl RechunkOwned for DataFrame {
    fn rechunk_mut_and_return(mut self) -> Self {
        self.rechunk_mut();
        self
    }
}
