//! sql.query and sql.write against real servers: PostgreSQL (`PIPE_TEST_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`), MariaDB/MySQL (`PIPE_TEST_MYSQL_URL`,
//! default `mysql://root@127.0.0.1:3306/test`), SQLite temp files, and ODBC through
//! Debian's odbc-postgresql driver to the same PostgreSQL. A missing server fails the test
//! with how to provide it; nothing is skipped.

use super::*;
use crate::table::frame;
use engine::events::{Observer, RunEvent};
use engine::secrets::Redactor;
use polars::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Collect(Mutex<Vec<String>>);
impl Observer for Collect {
    fn event(&self, event: &RunEvent) {
        if let RunEvent::Log(r) = event {
            self.0.lock().unwrap().push(r.message.clone());
        }
    }
}

pub fn pg_url() -> String {
    std::env::var("PIPE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}
pub fn my_url() -> String {
    std::env::var("PIPE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}
fn odbc_string() -> String {
    // The same server as PIPE_TEST_POSTGRES_URL, through the ODBC driver.
    let u = url::Url::parse(&pg_url()).unwrap();
    format!(
        "Driver={{PostgreSQL Unicode}};Server={};Port={};Database={};Uid={};",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(5432),
        u.path().trim_start_matches('/'),
        u.username()
    )
}

/// A table name no other test uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "pipe_{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub struct T {
    pub ctx: StepContext,
    pub logs: Arc<Collect>,
    _dir: tempfile::TempDir,
}

impl T {
    pub fn new(conn: serde_json::Value) -> T {
        let logs = Arc::new(Collect::default());
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = StepContext::new(
            "db",
            1,
            logs.clone(),
            Redactor::new(),
            dir.path().into(),
            dir.path().into(),
        );
        ctx.connection = Some(conn);
        let mut overrides = engine::template::Overrides::default();
        overrides
            .secrets
            .insert("DB_TOKEN".into(), "tok-9f8e7d6c".into());
        let templates = engine::template::Templates::new(engine::template::Runtime {
            redactor: ctx.redactor.clone(),
            tz: chrono_tz::UTC,
            logical_date: chrono::Utc::now(),
            dry_run: false,
            overrides,
        });
        let j = engine::template::json_to_value;
        let scope = engine::template::Scope::new(
            j(&json!({"name": "x'; DROP TABLE t; --", "n": 2, "day": "2024-03-01"})),
            j(&json!({})),
            j(&json!({"id": 1})),
        );
        ctx.set_evaluator(Arc::new(templates), scope);
        T {
            ctx,
            logs,
            _dir: dir,
        }
    }
    pub fn pg() -> T {
        T::new(json!({"type": "postgres", "url": pg_url()}))
    }
    pub fn my() -> T {
        T::new(json!({"type": "mysql", "url": my_url()}))
    }
    pub fn lite() -> T {
        T::new(json!({"type": "sqlite", "path": "test.db"}))
    }
    pub fn odbc() -> T {
        T::new(json!({"type": "odbc", "connection_string": odbc_string()}))
    }

    /// Run statements directly (setup), failing loudly when the server is missing.
    pub async fn exec(&self, sqls: &[&str]) {
        let (mut s, target) = match connect(&self.ctx, "test").await {
            Ok(s) => s,
            Err(e) => panic!(
                "{e}\nThese tests need the database servers: PostgreSQL at PIPE_TEST_POSTGRES_URL \
                 (default postgres://postgres@127.0.0.1:5432/test, trust auth) and MariaDB/MySQL at \
                 PIPE_TEST_MYSQL_URL (default mysql://root@127.0.0.1:3306/test); start them or set \
                 the variables (ODBC also needs `apt-get install unixodbc odbc-postgresql`)."
            ),
        };
        for sql in sqls {
            s.execute(&plain(sql))
                .await
                .unwrap_or_else(|e| panic!("{target}: {sql}: {e}"));
        }
    }

    pub async fn query(
        &self,
        with: serde_json::Value,
    ) -> Result<(DataFrame, StepOutput), StepError> {
        let cfg: SqlQuery =
            serde_json::from_value(with).map_err(|e| StepError::fatal(e.to_string()))?;
        let mut out = cfg.run(self.ctx.clone()).await?;
        let df = frame(out.table.as_ref().unwrap()).unwrap().clone();
        out.table = None;
        Ok((df, out))
    }

    pub async fn write(
        &self,
        df: DataFrame,
        with: serde_json::Value,
    ) -> Result<StepOutput, StepError> {
        let cfg: SqlWrite =
            serde_json::from_value(with).map_err(|e| StepError::fatal(e.to_string()))?;
        let mut ctx = self.ctx.clone();
        ctx.inputs.insert("src".into(), crate::table::table(df));
        cfg.run(ctx).await
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }
}

fn dtypes(df: &DataFrame) -> Vec<String> {
    df.get_columns()
        .iter()
        .map(|c| c.dtype().to_string())
        .collect()
}

fn cell(df: &DataFrame, col: &str, row: usize) -> String {
    df.column(col).unwrap().get(row).unwrap().to_string()
}

#[tokio::test]
async fn postgres_types_round_trip() {
    let t = T::pg();
    let tb = unique("types");
    t.exec(&[
        &format!("CREATE TABLE {tb} (id int4, big int8, small int2, amount numeric(12,2), ratio float8, day date, at timestamp, at_tz timestamptz, flag bool, note text, raw bytea, doc jsonb, u uuid, tm time)"),
        &format!("INSERT INTO {tb} VALUES (1, 9007199254740993, 7, 1234567890.12, 0.5, '2024-02-29', '2024-03-01 10:30:00.123456', '2024-03-01 10:30:00-03', true, 'olá', '\\x00ff', '{{\"a\": 1}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '23:59:58.5'), (2, NULL, NULL, -0.05, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"),
    ])
    .await;
    let (df, out) = t
        .query(json!({"query": format!("SELECT * FROM {tb} ORDER BY id"), "batch_rows": 1}))
        .await
        .unwrap();
    assert_eq!(out.outputs["rows"], json!(2));
    assert_eq!(
        dtypes(&df),
        [
            "i32",
            "i64",
            "i32",
            "decimal[38,2]",
            "f64",
            "date",
            "datetime[μs]",
            "datetime[μs, UTC]",
            "bool",
            "str",
            "binary",
            "str",
            "str",
            "time"
        ]
    );
    assert_eq!(cell(&df, "amount", 0), "1234567890.12");
    assert_eq!(cell(&df, "amount", 1), "-0.05");
    assert_eq!(cell(&df, "big", 0), "9007199254740993");
    assert_eq!(cell(&df, "day", 0), "2024-02-29");
    assert_eq!(cell(&df, "at", 0), "2024-03-01 10:30:00.123456");
    assert_eq!(cell(&df, "at_tz", 0), "2024-03-01 13:30:00 UTC");
    assert_eq!(cell(&df, "note", 0), "\"olá\"");
    assert_eq!(cell(&df, "doc", 0), "\"{\"a\": 1}\"");
    assert_eq!(
        cell(&df, "u", 0),
        "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\""
    );
    assert_eq!(cell(&df, "tm", 0), "23:59:58.500");
    for c in df.get_columns() {
        if c.name() != "id" && c.name() != "amount" {
            assert_eq!(c.null_count(), 1, "{}", c.name());
        }
    }
    // Written back by sql.write and read again: the same table.
    let copy = unique("copy");
    t.write(df.clone(), json!({"table": copy})).await.unwrap();
    let (again, _) = t
        .query(json!({"query": format!("SELECT * FROM {copy} ORDER BY id")}))
        .await
        .unwrap();
    assert!(again.equals_missing(&df), "{again}\n{df}");
}

#[tokio::test]
async fn templates_are_bound_never_pasted() {
    let t = T::pg();
    let tb = unique("inject");
    t.exec(&[
        &format!("CREATE TABLE {tb} (name text, n int, day date)"),
        &format!("INSERT INTO {tb} VALUES ('x''; DROP TABLE t; --', 2, '2024-03-01'), ('other', 3, '2024-03-02')"),
    ])
    .await;
    let (df, _) = t
        .query(json!({"query": format!(
            "SELECT n FROM {tb} WHERE name = {{{{ params.name }}}} AND n = {{{{ params.n }}}} AND day = {{{{ params.day }}}} AND 'tok' <> {{{{ secret('DB_TOKEN') }}}}"
        )}))
        .await
        .unwrap();
    assert_eq!(df.height(), 1);
    let logs = t.logs().join("\n");
    assert!(logs.contains("name = $1 AND n = $2 AND day = $3"), "{logs}");
    assert!(logs.contains("'x''; DROP TABLE t; --'"), "{logs}");
    assert!(!logs.contains("tok-9f8e7d6c"), "secret in logs: {logs}");
    assert!(logs.contains("***"), "{logs}");
    // The table is still there.
    t.exec(&[&format!("SELECT 1 FROM {tb}")]).await;
}

#[tokio::test]
async fn query_text_binds_named_params_on_every_backend() {
    for t in [T::pg(), T::my(), T::lite(), T::odbc()] {
        let (df, _) = t
            .query(json!({
                "query_text": "SELECT CAST(:inicio AS CHAR(10)) AS a, ':fim' AS lit, CAST(:fim AS CHAR(10)) AS b -- :inicio\n",
                "params": {"inicio": "2019-01-01", "fim": "2019-02-01"},
            }))
            .await
            .unwrap();
        assert_eq!(cell(&df, "a", 0), "\"2019-01-01\"");
        assert_eq!(cell(&df, "lit", 0), "\":fim\"");
        assert_eq!(cell(&df, "b", 0), "\"2019-02-01\"");
        let logs = t.logs().join("\n");
        assert!(logs.contains("dynamic SQL (query_text)"), "{logs}");
    }
}

fn people(ids: &[i64], names: &[&str]) -> DataFrame {
    df!("id" => ids, "name" => names, "amount" => ids.iter().map(|i| *i as f64 * 1.5).collect::<Vec<_>>()).unwrap()
}

#[tokio::test]
async fn merge_upserts_on_every_backend() {
    for t in [T::pg(), T::my(), T::lite()] {
        let tb = unique("merge");
        let w = json!({"table": tb, "mode": "merge", "keys": ["id"], "batch_rows": 1});
        let out = t
            .write(people(&[1, 2, 3], &["a", "b", "c"]), w.clone())
            .await
            .unwrap();
        assert_eq!(out.outputs["rows"], json!(3));
        assert_eq!(out.outputs["created"], json!(true));
        t.write(people(&[3, 4], &["C", "d"]), w).await.unwrap();
        let (df, _) = t
            .query(json!({"query": format!("SELECT id, name FROM {tb} ORDER BY id")}))
            .await
            .unwrap();
        let names: Vec<String> = (0..df.height()).map(|r| cell(&df, "name", r)).collect();
        assert_eq!(names, ["\"a\"", "\"b\"", "\"C\"", "\"d\""]);
        let logs = t.logs().join("\n");
        assert!(logs.contains("ran 3 times"), "{logs}");
    }
}

#[tokio::test]
async fn mysql_merge_into_a_table_without_a_unique_key_adds_one() {
    let t = T::my();
    let tb = unique("mymerge");
    t.exec(&[
        &format!("CREATE TABLE {tb} (id bigint, name varchar(20), amount double)"),
        &format!("INSERT INTO {tb} VALUES (1, 'a', 1.5)"),
    ])
    .await;
    let w = json!({"table": tb, "mode": "merge", "keys": ["id"]});
    t.write(people(&[1, 2], &["A", "b"]), w.clone())
        .await
        .unwrap();
    t.write(people(&[2], &["B"]), w).await.unwrap();
    let (df, _) = t
        .query(json!({"query": format!("SELECT name FROM {tb} ORDER BY id")}))
        .await
        .unwrap();
    let names: Vec<String> = (0..df.height()).map(|r| cell(&df, "name", r)).collect();
    assert_eq!(names, ["\"A\"", "\"B\""]);
    assert!(t.logs().join("\n").contains("ADD UNIQUE KEY"));
}

#[tokio::test]
async fn replace_failure_leaves_the_old_table() {
    // PostgreSQL: text cannot hold a NUL byte; the failing row comes after others were
    // inserted, so the drop, create and first inserts are rolled back.
    let t = T::pg();
    let tb = unique("replace");
    t.write(people(&[1], &["old"]), json!({"table": tb}))
        .await
        .unwrap();
    let bad = people(&[1, 2, 3], &["new", "new", "bad\0"]);
    let err = t
        .write(
            bad,
            json!({"table": tb, "mode": "replace", "batch_rows": 1}),
        )
        .await
        .unwrap_err();
    assert!(err.message.contains(&tb), "{err}");
    let (df, _) = t
        .query(json!({"query": format!("SELECT name FROM {tb}")}))
        .await
        .unwrap();
    assert_eq!(df.height(), 1);
    assert_eq!(cell(&df, "name", 0), "\"old\"");
    // A good replace then works.
    t.write(
        people(&[5, 6], &["x", "y"]),
        json!({"table": tb, "mode": "replace"}),
    )
    .await
    .unwrap();
    let (df, _) = t
        .query(json!({"query": format!("SELECT * FROM {tb}")}))
        .await
        .unwrap();
    assert_eq!(df.height(), 2);

    // MySQL: DDL commits there, so replace deletes the rows inside the transaction; a value
    // the existing column refuses fails it, and the old rows stay.
    let t = T::my();
    let tb = unique("replace");
    t.exec(&[
        &format!("CREATE TABLE {tb} (id bigint, name varchar(10))"),
        &format!("INSERT INTO {tb} VALUES (1, 'old')"),
    ])
    .await;
    let bad = df!("id" => ["2", "not a number"], "name" => ["new", "new"]).unwrap();
    t.write(
        bad,
        json!({"table": tb, "mode": "replace", "batch_rows": 1}),
    )
    .await
    .unwrap_err();
    let (df, _) = t
        .query(json!({"query": format!("SELECT name FROM {tb}")}))
        .await
        .unwrap();
    assert_eq!(df.height(), 1);
    assert_eq!(cell(&df, "name", 0), "\"old\"");
}

#[tokio::test]
async fn mysql_and_sqlite_types() {
    let t = T::my();
    let tb = unique("mytypes");
    t.exec(&[
        &format!("CREATE TABLE {tb} (id int, big bigint, amount decimal(12,2), ratio double, day date, at datetime(6), flag tinyint(1), note varchar(20), raw varbinary(4), tm time)"),
        &format!("INSERT INTO {tb} VALUES (1, 9007199254740993, 1234567890.12, 0.5, '2024-02-29', '2024-03-01 10:30:00.123456', 1, 'olá', x'00ff', '23:59:58'), (2, NULL, -0.05, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"),
    ])
    .await;
    let (df, _) = t
        .query(json!({"query": format!("SELECT * FROM {tb} WHERE id >= {{{{ params.n }}}} - 1 ORDER BY id")}))
        .await
        .unwrap();
    assert_eq!(
        dtypes(&df),
        [
            "i32",
            "i64",
            "decimal[38,2]",
            "f64",
            "date",
            "datetime[μs]",
            "bool",
            "str",
            "binary",
            "time"
        ]
    );
    assert_eq!(cell(&df, "amount", 0), "1234567890.12");
    assert_eq!(cell(&df, "amount", 1), "-0.05");
    assert_eq!(cell(&df, "at", 0), "2024-03-01 10:30:00.123456");
    assert_eq!(cell(&df, "note", 0), "\"olá\"");
    assert_eq!(df.column("flag").unwrap().null_count(), 1);

    let t = T::lite();
    let tb = unique("litetypes");
    t.exec(&[
        &format!("CREATE TABLE {tb} (id INTEGER, amount NUMERIC(12,2), ratio REAL, day DATE, at TIMESTAMP, flag BOOLEAN, note TEXT, raw BLOB)"),
        &format!("INSERT INTO {tb} VALUES (1, 1234567890.12, 0.5, '2024-02-29', '2024-03-01 10:30:00', 1, 'olá', x'00ff'), (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"),
    ])
    .await;
    let (df, _) = t
        .query(json!({"query": format!("SELECT *, id * 2 AS twice FROM {tb} ORDER BY id")}))
        .await
        .unwrap();
    assert_eq!(
        dtypes(&df),
        [
            "i64",
            "decimal[38,2]",
            "f64",
            "date",
            "datetime[μs]",
            "bool",
            "str",
            "binary",
            "i64"
        ]
    );
    assert_eq!(cell(&df, "amount", 0), "1234567890.12");
    assert_eq!(cell(&df, "at", 0), "2024-03-01 10:30:00");
}

#[tokio::test]
async fn odbc_reads_postgres_through_the_debian_driver() {
    let t = T::odbc();
    let tb = unique("odbc");
    t.exec(&[
        &format!("CREATE TABLE {tb} (id int8, amount numeric(12,2), day date, at timestamp, note text)"),
        &format!("INSERT INTO {tb} VALUES (1, 12.50, '2024-02-29', '2024-03-01 10:30:00', 'olá'), (2, NULL, NULL, NULL, NULL)"),
    ])
    .await;
    let (df, _) = t
        .query(json!({"query": format!("SELECT * FROM {tb} WHERE id <= {{{{ params.n }}}} ORDER BY id")}))
        .await
        .unwrap();
    assert_eq!(
        dtypes(&df),
        ["i64", "decimal[38,2]", "date", "datetime[μs]", "str"]
    );
    assert_eq!(cell(&df, "amount", 0), "12.50");
    assert_eq!(cell(&df, "note", 0), "\"olá\"");
    let out = t
        .write(
            people(&[1, 2], &["a", "b"]),
            json!({"table": unique("odbcw")}),
        )
        .await
        .unwrap();
    assert_eq!(out.outputs["rows"], json!(2));
}

#[tokio::test]
async fn passwords_never_appear_in_errors() {
    let secret = "Sup3r-S3cret-pw";
    for conn in [
        json!({"type": "postgres", "host": "127.0.0.1", "port": 1, "user": "u", "password": secret}),
        json!({"type": "postgres", "url": format!("postgres://u:{secret}@127.0.0.1:1/db")}),
        json!({"type": "mysql", "url": format!("mysql://u:{secret}@127.0.0.1:1/db")}),
        json!({"type": "sqlserver", "url": format!("server=tcp:127.0.0.1,1;user id=sa;password={secret};TrustServerCertificate=true")}),
        json!({"type": "odbc", "connection_string": format!("Driver={{PostgreSQL Unicode}};Server=127.0.0.1;Port=1;Uid=u;Pwd={secret};")}),
    ] {
        let t = T::new(conn.clone());
        let err = t.query(json!({"query": "SELECT 1"})).await.unwrap_err();
        assert!(!err.message.contains(secret), "{conn}: {err}");
        assert!(err.message.contains("`db`"), "names the step: {err}");
        assert!(err.message.contains("127.0.0.1"), "names the host: {err}");
        assert!(err.retryable);
    }
    // A real server refusing the password.
    let t = T::new(json!({"type": "mysql", "url": my_url(), "user": "root", "password": secret}));
    let err = t.query(json!({"query": "SELECT 1"})).await.unwrap_err();
    assert!(!err.message.contains(secret), "{err}");
}

#[test]
fn sqlserver_connection_strings_and_types() {
    let spec = conn::Spec {
        url: Some("server=tcp:db.example,1444;database=sales;user id=sa;password=x;TrustServerCertificate=true".into()),
        ..conn::Spec::default()
    };
    let c = sqlserver::config(&spec).unwrap();
    assert_eq!(c.get_addr(), "db.example:1444");
    let spec = conn::Spec {
        host: Some("h".into()),
        user: Some("sa".into()),
        password: Some("p".into()),
        ..conn::Spec::default()
    };
    assert_eq!(sqlserver::config(&spec).unwrap().get_addr(), "h:1433");
    use columns::Kind;
    use tiberius::ColumnType as C;
    assert_eq!(sqlserver::kind_of(C::Decimaln), Kind::Decimal);
    assert_eq!(sqlserver::kind_of(C::DatetimeOffsetn), Kind::DatetimeUtc);
    assert_eq!(sqlserver::kind_of(C::Datetime2), Kind::Datetime);
    assert_eq!(sqlserver::kind_of(C::NVarchar), Kind::Text);
    assert_eq!(sqlserver::kind_of(C::Bitn), Kind::Bool);
    // The MERGE sql.write sends.
    let sql = write::insert_sql(
        conn::Backend::SqlServer,
        "dbo.t",
        &["id".into(), "v".into()],
        2,
        Some(&["id".into()]),
    );
    assert_eq!(
        sql,
        "MERGE INTO \"dbo\".\"t\" AS target USING (VALUES (@P1, @P2), (@P3, @P4)) AS source (\"id\", \"v\") ON target.\"id\" = source.\"id\" WHEN MATCHED THEN UPDATE SET target.\"v\" = source.\"v\" WHEN NOT MATCHED THEN INSERT (\"id\", \"v\") VALUES (source.\"id\", source.\"v\");"
    );
}

#[test]
fn lints_and_checks() {
    let q: SqlQuery = serde_json::from_value(
        json!({"query": "select * from t where a = '{{ x }}' and b = {{ y }}"}),
    )
    .unwrap();
    let info = q.static_info();
    assert_eq!(info.deferred, ["query"]);
    assert_eq!(info.lints.len(), 1);
    assert_eq!(info.lints[0].code, "W002");
    let q: SqlQuery = serde_json::from_value(json!({"query_text": "{{ steps.x.sql }}"})).unwrap();
    let info = q.static_info();
    assert!(info.deferred.is_empty());
    assert_eq!(info.lints[0].code, "N001");
    let err = serde_json::from_value::<SqlQuery>(json!({"query": "select {% if x %}1{% endif %}"}))
        .unwrap_err();
    assert!(err.to_string().contains("query_text"), "{err}");
    assert!(serde_json::from_value::<SqlQuery>(json!({})).is_err());
    assert!(serde_json::from_value::<SqlQuery>(json!({"query": "a", "query_text": "b"})).is_err());
    assert!(serde_json::from_value::<SqlWrite>(json!({"table": "t", "mode": "merge"})).is_err());
}
