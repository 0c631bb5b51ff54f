//! SQL read benchmark (`cargo bench --bench sql`, or `just bench`).
//!
//! A 1,000,000-row PostgreSQL table (`id bigint, amount numeric(12,2), created timestamptz,
//! name text, flag bool`) at `PIPE_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), read two ways:
//!
//! * `psql -c "\copy (select * from t) to /dev/null"` — the floor: PostgreSQL's own client
//!   streaming the text COPY format and throwing it away;
//! * `sql.query` of `select * from t` into a typed Polars DataFrame (the step in-process,
//!   as the executor runs it: connect, prepare, stream, decode, stack the batches).
//!
//! Each is run 3 times; the median counts. Goal: sql.query ≥ 0.5 × psql's rows/s.

mod support;
use support::{machine, print_table, row, Row};

use engine::events::{Observer, RunEvent};
use engine::secrets::Redactor;
use engine::step::{StepConfig, StepContext};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROWS: u64 = 1_000_000;
const REPEATS: usize = 3;
const TABLE: &str = "pipe_bench_sql";

struct Quiet;
impl Observer for Quiet {
    fn event(&self, _: &RunEvent) {}
}

fn url() -> String {
    std::env::var("PIPE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn psql(args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("psql")
        .arg(url())
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .args(args)
        .output()
        .expect("run psql (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    println!("{}", machine());
    println!("creating {ROWS} rows in {TABLE} …");
    psql(&["-c", &format!(
        "DROP TABLE IF EXISTS {TABLE}; \
         CREATE TABLE {TABLE} (id bigint, amount numeric(12,2), created timestamptz, name text, flag bool); \
         INSERT INTO {TABLE} SELECT g, (g % 100000) / 100.0, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', \
           'customer ' || g, g % 3 = 0 FROM generate_series(1, {ROWS}) g;"
        ),
        "-c",
        &format!("VACUUM ANALYZE {TABLE}"),
    ]);

    let copy: Vec<Duration> = (0..REPEATS)
        .map(|_| {
            psql(&[
                "-c",
                &format!("\\copy (select * from {TABLE}) to /dev/null"),
            ])
        })
        .collect();
    let copy = median(copy);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ours = Vec::new();
    for _ in 0..REPEATS {
        let mut ctx = StepContext::new(
            "bench",
            1,
            Arc::new(Quiet),
            Redactor::new(),
            std::env::temp_dir(),
            std::env::temp_dir(),
        );
        ctx.connection = Some(serde_json::json!({"type": "postgres", "url": url()}));
        let step: steps::sql::SqlQuery = serde_json::from_value(
            serde_json::json!({"query_text": format!("select * from {TABLE}")}),
        )
        .unwrap();
        let t = Instant::now();
        let out = rt.block_on(step.run(ctx)).expect("sql.query");
        let took = t.elapsed();
        let df = steps::table::frame(out.table.as_ref().unwrap()).unwrap();
        assert_eq!(df.height() as u64, ROWS);
        ours.push(took);
    }
    let ours = median(ours);
    psql(&["-c", &format!("DROP TABLE {TABLE}")]);

    let rate = |d: Duration| ROWS as f64 / d.as_secs_f64();
    let mut rows: Vec<Row> = Vec::new();
    row(
        &mut rows,
        "psql \\copy to /dev/null (1M rows)",
        format!(
            "{:.0} ms, {:.0} rows/s",
            copy.as_secs_f64() * 1e3,
            rate(copy)
        ),
        "floor",
        "1.00",
    );
    let ratio = rate(ours) / rate(copy);
    row(
        &mut rows,
        "sql.query → DataFrame (1M rows)",
        format!(
            "{:.0} ms, {:.0} rows/s",
            ours.as_secs_f64() * 1e3,
            rate(ours)
        ),
        "≥ 0.5 × psql's rows/s",
        format!(
            "{ratio:.2} × psql{}",
            if ratio >= 0.5 { "" } else { " (MISSED)" }
        ),
    );
    print_table(&rows);
}
