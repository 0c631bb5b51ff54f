//! `type: sql.query` and `type: sql.write` — read a SQL result into a table, write a table
//! into a SQL table.
//!
//! Why steps of their own: the scripts `pipe` replaces pasted values into SQL strings
//! (`f"... WHERE dt >= '{inicio}'"`), which breaks on a quote and is an injection waiting to
//! happen, fetched whole results into lists of tuples, and wrote with one INSERT per row
//! outside any transaction, so a failure left half a table. Here:
//!
//! * **`query:` binds every template.** The field is deferred (the executor leaves it
//!   unrendered); the step splits it into SQL text and `{{ … }}` pieces, evaluates each
//!   piece (a lone expression keeps its JSON type) and binds it with the backend's
//!   placeholder (`$1`, `?`, `@P1`). A template can never become SQL text, so
//!   `x'; DROP TABLE t; --` stays data. `{% … %}` blocks are refused (they would build SQL
//!   text: use `query_text`). `pipe validate` warns (W002) about a template inside a string
//!   literal (`'{{ x }}'`), which cannot be bound.
//! * **`query_text:` is dynamic SQL on purpose.** A whole statement produced at run time (the
//!   QOCKPIT platform sends each integration's SQL), rendered like any field and run as
//!   given, always logged in full; validate notes it (N001). Its `:name` parameters are bound
//!   from `params:` (the scanner skips `::casts`, literals, quoted names and comments).
//! * **Results stream in batches into typed columns** ([`columns`]): integers, floats,
//!   booleans, text, exact decimals (Polars Decimal, never floats), dates, times,
//!   timestamps (with time zone → UTC-aware), binary; JSON as text; NULLs kept.
//! * **`sql.write` is one transaction.** `append`, `replace` (the old table is dropped and
//!   re-created inside the transaction — on MySQL, whose DDL commits, its rows are deleted
//!   instead — so a failure leaves it intact) or `merge` on `keys` (an upsert: `ON CONFLICT`
//!   on PostgreSQL and SQLite, `ON DUPLICATE KEY UPDATE` on MySQL, `MERGE` on SQL Server),
//!   with multi-row `INSERT`s of bound values, creating the table (types from the frame's
//!   columns, a primary key on `keys`) when missing.
//! * **Every statement is logged** with its placeholders and bound values (secrets masked);
//!   a write logs each statement shape once, with how many times it ran.
//!
//! Connections and drivers: [`conn`] and docs/decisions/0010-sql-drivers.md.

pub mod columns;
pub mod conn;
mod mysql;
mod odbc;
pub mod params;
mod postgres;
mod sqlite;
mod sqlserver;
mod write;

#[cfg(test)]
mod tests;

use async_trait::async_trait;
use conn::{Backend, Spec};
use engine::events::Level;
use engine::step::{Lint, StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use params::{Problem, Statement, Style};
use polars::prelude::DataFrame;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

pub use write::{SqlWrite, WriteMode};

const DEFAULT_BATCH_ROWS: usize = 50_000;

/// One open connection, whatever the backend.
#[async_trait]
pub(crate) trait Session: Send {
    fn backend(&self) -> Backend;
    fn style(&self) -> Style {
        match self.backend() {
            Backend::Postgres => Style::Dollar,
            Backend::SqlServer => Style::AtP,
            _ => Style::Question,
        }
    }
    /// Run a statement that returns rows; the rows arrive in batches of `batch_rows`.
    async fn query(&mut self, st: &Statement, batch_rows: usize) -> Result<DataFrame, String>;
    /// Run a statement; the number of rows it affected.
    async fn execute(&mut self, st: &Statement) -> Result<u64, String>;
    async fn begin(&mut self) -> Result<(), String> {
        self.execute(&plain("BEGIN")).await.map(|_| ())
    }
    async fn commit(&mut self) -> Result<(), String> {
        self.execute(&plain("COMMIT")).await.map(|_| ())
    }
    async fn rollback(&mut self) -> Result<(), String> {
        self.execute(&plain("ROLLBACK")).await.map(|_| ())
    }
}

/// A statement without parameters.
pub(crate) fn plain(sql: &str) -> Statement {
    Statement {
        sql: sql.to_string(),
        values: Vec::new(),
    }
}

/// Run `f` on a blocking connection (SQLite, ODBC) on tokio's blocking pool.
pub(crate) async fn on_blocking_pool<C: Send + 'static, T: Send + 'static>(
    conn: &std::sync::Arc<std::sync::Mutex<C>>,
    f: impl FnOnce(&C) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let c = conn.lock().map_err(|_| "the connection was poisoned")?;
        f(&c)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Open the connection the step names.
pub(crate) async fn connect(
    ctx: &StepContext,
    step: &str,
) -> Result<(Box<dyn Session>, String), StepError> {
    let (backend, spec) = Spec::from_ctx(ctx, step)?;
    let target = spec.target(backend);
    let session: Result<Box<dyn Session>, String> = match backend {
        Backend::Postgres => postgres::connect(&spec, ctx).await,
        Backend::Mysql => mysql::connect(&spec).await,
        Backend::Sqlite => sqlite::connect(&spec, ctx).await,
        Backend::SqlServer => sqlserver::connect(&spec).await,
        Backend::Odbc => odbc::connect(&spec).await,
    };
    let session = session.map_err(|e| {
        StepError::retryable(ctx.redactor.redact(&format!(
            "{step} `{}`: cannot connect to {} at {target}: {e}",
            ctx.step_id,
            backend.name()
        )))
    })?;
    Ok((session, format!("{} at {target}", backend.name())))
}

/// Read the result of a SQL statement into a table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    /// The SQL statement. Every template in it (`WHERE id = {{ params.id }}`) becomes a bound
    /// parameter, never SQL text; do not quote it (`= {{ x }}`, not `= '{{ x }}'`). `{% %}`
    /// blocks are refused: build dynamic SQL with `query_text`. Exactly one of `query` and
    /// `query_text`.
    #[serde(default)]
    pub query: Option<String>,
    /// A whole statement produced at run time (templates render into SQL text), run as
    /// given and logged in full. Its `:name` parameters are bound from `params`.
    #[serde(default)]
    pub query_text: Option<String>,
    /// Values bound to `:name` parameters in the statement (`WHERE dt >= :inicio`); every one
    /// must be used.
    #[serde(default)]
    pub params: IndexMap<String, Value>,
    /// Rows per batch while reading (default 50000): the memory held besides the table.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

fn default_batch_rows() -> usize {
    DEFAULT_BATCH_ROWS
}

/// The `sql.query` step: a [`QuerySpec`] whose combinations were checked when it was read.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "QuerySpec")]
pub struct SqlQuery {
    /// The checked configuration.
    pub spec: QuerySpec,
}

impl TryFrom<QuerySpec> for SqlQuery {
    type Error = String;
    fn try_from(spec: QuerySpec) -> Result<Self, String> {
        match (&spec.query, &spec.query_text) {
            (Some(_), Some(_)) => return Err("set either `query` or `query_text`, not both".into()),
            (None, None) => return Err("`query` (SQL with bound templates) or `query_text` (a whole statement made at run time) is required".into()),
            _ => {}
        }
        if let Some(q) = &spec.query {
            let (_, problems) = params::scan(q, true, &[]);
            if problems.contains(&Problem::Block) {
                return Err(BLOCK_MESSAGE.into());
            }
        }
        if spec.batch_rows == 0 {
            return Err("`batch_rows` must be at least 1".into());
        }
        Ok(SqlQuery { spec })
    }
}

const BLOCK_MESSAGE: &str = "`{% %}` blocks cannot be bound as parameters in `query`: build the statement in `query_text` (dynamic SQL, logged in full) or compute values in templates";

const OUTPUTS: [&str; 3] = ["rows", "columns", "elapsed_ms"];

/// The lints of a `query`/`query_text` pair (W002, N001).
pub fn lints(spec: &QuerySpec) -> Vec<Lint> {
    let mut out = Vec::new();
    if let Some(q) = &spec.query {
        let (_, problems) = params::scan(q, true, &[]);
        for p in problems {
            if let Problem::TemplateInLiteral(lit) = p {
                out.push(Lint {
                    field: "query".into(),
                    code: "W002",
                    message: format!(
                        "template inside a SQL string literal in `query` ({lit}): it is bound as a parameter, so write `= {{{{ x }}}}` not `= '{{{{ x }}}}'`"
                    ),
                });
            }
        }
    }
    if spec.query_text.is_some() {
        out.push(Lint {
            field: "query_text".into(),
            code: "N001",
            message: "`query_text` runs dynamic SQL as given (logged in full); prefer `query`, whose templates are bound as parameters".into(),
        });
    }
    out
}

#[async_trait]
impl StepConfig for SqlQuery {
    const TYPE: &'static str = "sql.query";
    const SUMMARY: &'static str =
        "Run a SQL query (PostgreSQL, MySQL/MariaDB, SQLite, SQL Server, ODBC) into a typed table; every template in `query` is a bound parameter";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: true,
            outputs: Some(OUTPUTS.iter().map(|s| s.to_string()).collect()),
            deferred: if self.spec.query.is_some() {
                vec!["query".into()]
            } else {
                Vec::new()
            },
            lints: lints(&self.spec),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let started = Instant::now();
        let (mut session, target) = connect(&ctx, Self::TYPE).await?;
        let style = session.style();
        let spec = &self.spec;
        let names: Vec<&str> = spec.params.keys().map(String::as_str).collect();
        let (pieces, problems) = match (&spec.query, &spec.query_text) {
            (Some(q), _) => params::scan(q, true, &names),
            (_, Some(t)) => params::scan(t, false, &names),
            _ => unreachable!("checked when read"),
        };
        if let Some(p) = problems.first() {
            match p {
                Problem::Block => return Err(StepError::fatal(BLOCK_MESSAGE)),
                Problem::TemplateInLiteral(lit) => {
                    return Err(StepError::fatal(format!(
                        "a template inside a SQL string literal in `query` ({lit}) cannot be bound: write `= {{{{ x }}}}` instead of `= '{{{{ x }}}}'` (pipe validate warns W002)"
                    )))
                }
            }
        }
        let st = params::compile(&pieces, style, &spec.params, |t| ctx.evaluate(t, &[]))
            .map_err(StepError::fatal)?;
        let shown = st.shown(style, &ctx.redactor);
        if spec.query_text.is_some() {
            ctx.log(
                Level::Info,
                &format!("dynamic SQL (query_text) on {target}: {shown}"),
            );
        } else {
            ctx.log(Level::Info, &format!("query on {target}: {shown}"));
        }
        let df = session.query(&st, spec.batch_rows).await.map_err(|e| {
            StepError::fatal(
                ctx.redactor
                    .redact(&format!("query on {target} failed: {e}")),
            )
        })?;
        let rows = df.height() as u64;
        let columns: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        ctx.progress(&[("rows", rows)]);
        ctx.log(
            Level::Info,
            &format!(
                "read {rows} row{} ({} columns) in {elapsed_ms} ms",
                if rows == 1 { "" } else { "s" },
                columns.len()
            ),
        );
        let outputs = json!({ "rows": rows, "columns": columns, "elapsed_ms": elapsed_ms });
        Ok(StepOutput {
            outputs: outputs.as_object().cloned().unwrap_or_default(),
            result: outputs,
            table: Some(crate::table::table(df)),
            warnings: Vec::new(),
        })
    }
}
