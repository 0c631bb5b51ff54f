//! The step against the sandbox's BigQuery fake (real SQL evaluation of the MERGE, tables
//! persisted as Parquet, jobs that take a few polls, injected job errors).

use super::*;
use engine::events::{Observer, RunEvent};
use engine::secrets::Redactor;
use polars::prelude::*;
use std::sync::Arc;

struct Quiet;
impl Observer for Quiet {
    fn event(&self, _: &RunEvent) {}
}

async fn sandbox(state: &Path, faults: Vec<sandbox::Fault>) -> sandbox::Sandbox {
    sandbox::Sandbox::start(sandbox::Options {
        state_dir: Some(state.to_path_buf()),
        bigquery_job_polls: 2,
        faults,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn ctx(sbx: &sandbox::Sandbox, df: DataFrame) -> StepContext {
    let dir = std::env::temp_dir();
    let mut ctx = StepContext::new(
        "load",
        3,
        Arc::new(Quiet),
        Redactor::new(),
        dir.clone(),
        dir,
    );
    ctx.inputs.insert("clean".into(), crate::table::table(df));
    ctx.connection = Some(json!({
        "type": "bigquery",
        "project": sbx.bigquery_project(),
        "base_url": sbx.bigquery_url(),
        "upload_url": sbx.upload_url(),
        "credentials": {"type": "google_service_account", "key_file": sbx.key_file().display().to_string()},
        "sandbox": "google",
    }));
    ctx
}

fn tickets(ids: &[i64], title: &str) -> DataFrame {
    let at = Column::new(
        "created_at".into(),
        ids.iter()
            .map(|i| 1_700_000_000_000_000 + i)
            .collect::<Vec<_>>(),
    )
    .cast(&DataType::Datetime(
        TimeUnit::Microseconds,
        Some(polars::prelude::TimeZone::UTC),
    ))
    .unwrap();
    DataFrame::new(vec![
        Column::new("numero".into(), ids),
        Column::new(
            "titulo".into(),
            ids.iter()
                .map(|i| format!("{title} {i}"))
                .collect::<Vec<_>>(),
        ),
        at,
    ])
    .unwrap()
}

fn load(write: Write, keys: &[&str]) -> BigQueryLoad {
    BigQueryLoad::try_from(LoadSpec {
        table: "helpdesk.tickets".into(),
        write,
        keys: keys.iter().map(|s| s.to_string()).collect(),
        mode: Mode::Load,
        partition: None,
        cluster: Vec::new(),
        on_new_columns: OnNewColumns::Add,
        create_dataset: true,
        location: None,
    })
    .unwrap()
}

/// The target's rows, read from the fake's Parquet file, and every table it holds.
fn stored(state: &Path) -> (Option<DataFrame>, Vec<String>) {
    let tables = sandbox::list_tables(state).unwrap();
    let names = tables
        .iter()
        .map(|t| format!("{}.{}", t.dataset, t.table))
        .collect();
    let target = tables.iter().find(|t| t.table == "tickets").map(|t| {
        ParquetReader::new(std::fs::File::open(&t.path).unwrap())
            .finish()
            .unwrap()
    });
    (target, names)
}

fn ids(df: &DataFrame) -> Vec<i64> {
    let mut v: Vec<i64> = df
        .column("numero")
        .unwrap()
        .i64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn append_twice_duplicates_merge_twice_does_not() {
    let state = tempfile::tempdir().unwrap();
    let sbx = sandbox(state.path(), Vec::new()).await;
    load(Write::Append, &[])
        .run(ctx(&sbx, tickets(&[1, 2], "a")))
        .await
        .unwrap();
    load(Write::Append, &[])
        .run(ctx(&sbx, tickets(&[1, 2], "a")))
        .await
        .unwrap();
    assert_eq!(ids(&stored(state.path()).0.unwrap()), [1, 1, 2, 2]);
    // Replace, then merge twice: each key once, the newer titles win.
    load(Write::Replace, &[])
        .run(ctx(&sbx, tickets(&[1, 2], "old")))
        .await
        .unwrap();
    let out = load(Write::Merge, &["numero"])
        .run(ctx(&sbx, tickets(&[2, 3], "new")))
        .await
        .unwrap();
    assert!(out.outputs["staging_table"]
        .as_str()
        .unwrap()
        .contains("tickets__pipe_stage_3_"));
    load(Write::Merge, &["numero"])
        .run(ctx(&sbx, tickets(&[2, 3], "new")))
        .await
        .unwrap();
    let (rows, names) = stored(state.path());
    let rows = rows.unwrap();
    assert_eq!(ids(&rows), [1, 2, 3]);
    let two = rows
        .filter(&rows.column("numero").unwrap().i64().unwrap().equal(2))
        .unwrap();
    assert_eq!(
        two.column("titulo").unwrap().str().unwrap().get(0),
        Some("new 2")
    );
    assert_eq!(
        names,
        ["helpdesk.tickets"],
        "a staging table was left behind"
    );
    sbx.shutdown().await;
}

#[tokio::test]
async fn a_failed_merge_job_keeps_the_target() {
    let state = tempfile::tempdir().unwrap();
    let sbx = sandbox(state.path(), Vec::new()).await;
    load(Write::Merge, &["numero"])
        .run(ctx(&sbx, tickets(&[1, 2], "old")))
        .await
        .unwrap();
    sbx.shutdown().await;
    // The next job on /bigquery/v2 (the MERGE; uploads are another endpoint) fails.
    let fault = sandbox::Fault {
        endpoint: "bigquery_jobs".into(),
        kind: sandbox::FaultKind::JobError {
            reason: "invalid".into(),
            message: "Query error: injected".into(),
        },
        rate: 1.0,
        page: None,
        times: Some(1),
    };
    let sbx = sandbox(state.path(), vec![fault]).await;
    let err = load(Write::Merge, &["numero"])
        .run(ctx(&sbx, tickets(&[2, 3], "new")))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{}", err.message);
    assert!(err.message.contains("MERGE into `"), "{}", err.message);
    assert!(
        err.message
            .contains("helpdesk.tickets` failed: Query error: injected"),
        "{}",
        err.message
    );
    assert!(err.message.contains("invalid"), "{}", err.message);
    let (rows, names) = stored(state.path());
    let rows = rows.unwrap();
    assert_eq!(ids(&rows), [1, 2]);
    assert!(rows
        .column("titulo")
        .unwrap()
        .str()
        .unwrap()
        .into_no_null_iter()
        .all(|t| t.starts_with("old")));
    assert_eq!(
        names,
        ["helpdesk.tickets"],
        "the staging table was not dropped"
    );
    sbx.shutdown().await;
}
