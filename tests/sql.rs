//! sql.query and sql.write through the real `pipe` binary: SQLite → PostgreSQL, validate's
//! SQL warnings, and a password that never shows. PostgreSQL at `PIPE_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`); a missing server fails the test.

use crate::util::Env;
use std::process::Command;

fn pg_url() -> String {
    std::env::var("PIPE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn psql(sql: &str) -> String {
    let out = Command::new("psql")
        .args([&pg_url(), "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql failed: {}\nThis test needs PostgreSQL at PIPE_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test).",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn sqlite_to_postgres_merge_through_the_binary() {
    let env = Env::new();
    let db = env.path().join("src.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "CREATE TABLE sales (id INTEGER, amount NUMERIC(12,2), day DATE, note TEXT);
         INSERT INTO sales VALUES (1, 10.50, '2024-01-01', 'a'), (2, 20.25, '2024-01-02', 'b''q'),
                                  (3, 30.00, '2024-01-03', NULL), (4, 1.00, '2024-02-01', 'late');",
    )
    .unwrap();
    drop(c);
    let table = format!("pipe_it_sales_{}", std::process::id());
    let p = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: copy
params:
  month: {{ type: string, default: "2024-01" }}
connections:
  src: {{ type: sqlite, path: src.db }}
  dst: {{ type: postgres, url: "{url}" }}
steps:
  read:
    type: sql.query
    connection: src
    with:
      query: "SELECT id, amount, day, note FROM sales WHERE strftime('%Y-%m', day) = {{{{ params.month }}}} ORDER BY id"
  load:
    type: sql.write
    connection: dst
    input: read
    with: {{ table: {table}, mode: merge, keys: [id] }}
"#,
            url = pg_url()
        ),
    );
    for _ in 0..2 {
        let out = env.run(&["run", p.to_str().unwrap(), "--format", "json"]);
        out.expect_code(0);
    }
    assert_eq!(
        psql(&format!(
            "SELECT count(*), sum(amount), min(day), string_agg(coalesce(note, '-'), ',' ORDER BY id) FROM {table}"
        )),
        "3|60.75|2024-01-01|a,b'q,-"
    );
    assert_eq!(
        psql(&format!(
            "SELECT data_type FROM information_schema.columns WHERE table_name = '{table}' AND column_name = 'amount'"
        )),
        "numeric"
    );
    psql(&format!("DROP TABLE {table}"));
}

#[test]
fn validate_warns_about_quoted_templates_and_dynamic_sql() {
    let env = Env::new();
    let p = env.write(
        "v.yaml",
        r#"pipeline: v
connections:
  db: { type: sqlite, path: x.db }
steps:
  a:
    type: sql.query
    connection: db
    with:
      query: "SELECT * FROM t WHERE name = '{{ run.id }}'"
  b:
    type: sql.query
    connection: db
    with:
      query_text: "SELECT * FROM t WHERE dt >= :inicio"
      params: { inicio: "2024-01-01" }
"#,
    );
    let out = env.run(&["validate", "--format", "github", p.to_str().unwrap()]);
    out.expect_code(0);
    let text = out.stdout();
    assert!(text.contains("title=W002::"), "{text}");
    assert!(text.contains("line=9,"), "W002 at the query's line: {text}");
    assert!(text.contains("title=N001::"), "{text}");
}

#[test]
fn a_password_never_shows_in_the_output() {
    let env = Env::new();
    let p = env.write(
        "s.yaml",
        r#"pipeline: s
connections:
  db: { type: postgres, host: 127.0.0.1, port: 1, user: app, password: "{{ secret('DB_PASSWORD') }}" }
steps:
  q:
    type: sql.query
    connection: db
    with: { query: "SELECT 1" }
"#,
    );
    let out = env.run_with(
        &["run", p.to_str().unwrap(), "--format", "json"],
        "Pw-s3cr3t-0xC0FFEE",
    );
    out.expect_code(1);
    let all = format!("{}{}", out.stdout(), out.stderr());
    assert!(!all.contains("Pw-s3cr3t-0xC0FFEE"), "{all}");
    let err = out.json()["steps"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("127.0.0.1:1") && err.contains("`q`"), "{err}");
}

trait RunWith {
    fn run_with(&self, args: &[&str], password: &str) -> crate::util::Out;
}

impl RunWith for Env {
    fn run_with(&self, args: &[&str], password: &str) -> crate::util::Out {
        crate::util::Out(
            self.cmd()
                .args(args)
                .env("DB_PASSWORD", password)
                .output()
                .expect("run pipe"),
        )
    }
}

/// `--sandbox` points every SQL connection type at the demo database, aliases included
/// (`postgresql`, `mariadb`, `mssql`): none of these servers exists, so without it the
/// run fails to connect.
#[test]
fn sandbox_points_every_sql_connection_alias_at_the_demo_database() {
    let env = Env::new();
    let p = env.write(
        "aliases.yaml",
        r#"pipeline: aliases
connections:
  a: { type: postgresql, host: 127.0.0.1, port: 1, user: u, database: d }
  b: { type: mariadb, host: 127.0.0.1, port: 1, user: u, database: d }
  c: { type: mssql, host: 127.0.0.1, port: 1, user: u, database: d }
steps:
  pg: { type: sql.query, connection: a, with: { query: "SELECT count(*) AS n FROM clientes" } }
  my: { type: sql.query, connection: b, with: { query: "SELECT count(*) AS n FROM clientes" } }
  ms: { type: sql.query, connection: c, with: { query: "SELECT count(*) AS n FROM clientes" } }
"#,
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--sandbox"]);
    out.expect_code(0);
}
