//! `type: bigquery.load` — load the input table into a BigQuery table: append, replace, or
//! merge on keys, by a load job or by streaming.
//!
//! Why a step of its own: the help-desk loader `pipe` replaces ended in a hand-written
//! `to_gbq` that appended every run's 180 days of tickets again (so the table filled with
//! duplicates), crashed when the API grew a column, and left half-loaded tables when it
//! failed. This step makes the common cases one line
//! (`with: { table: helpdesk.tickets, write: merge, keys: [numero] }`) and safe:
//!
//! * **Creates what is missing.** The dataset (`create_dataset`, default true) and the table,
//!   with a schema derived from the table's column types (tz-aware datetime → TIMESTAMP,
//!   naive datetime → DATETIME, date → DATE, integers → INTEGER, floats → FLOAT, booleans →
//!   BOOLEAN, strings → STRING, binary → BYTES, structs → RECORD, lists → REPEATED), and the
//!   `partition` and `cluster` options (they apply when the step creates the table).
//! * **Writes by a load job.** The table is written to Parquet in memory (zstd, datetimes in
//!   microseconds) and uploaded as a load job — one `multipart/related` request below 5 MiB,
//!   a resumable upload in 8 MiB chunks above (resuming from what the server has after a
//!   failed chunk). `append` is `WRITE_APPEND`, `replace` is `WRITE_TRUNCATE` (atomic in
//!   BigQuery: readers see the old rows or the new ones). Jobs are polled until `DONE`; a
//!   job's `errorResult` fails the step with its message and reason, naming the table —
//!   retryable (`retry:`) for `backendError`/`rateLimitExceeded`/`internalError`, not for
//!   `invalid` and the like. Every job id is chosen by the step, so a retried upload request
//!   that had in fact arrived is followed, not loaded twice.
//! * **Merges without duplicates.** `write: merge` loads into a staging table
//!   (`<table>__pipe_stage_<run_id>_<random>`, same dataset, expiring after a day as a safety
//!   net), runs ONE `MERGE` (ON every key; UPDATE SET every other column; INSERT every
//!   column), then drops the staging table — also when something failed. The target is
//!   touched only by that single statement, so a failure leaves it as it was, and loading
//!   the same rows twice leaves each key once. Keys must be non-null and unique in the
//!   input (checked before anything is uploaded: BigQuery's MERGE would fail or duplicate).
//! * **Streams when asked.** `mode: stream` sends `insertAll` requests of at most 500 rows
//!   and ~9 MB, each row's `insertId` being its key values joined (BigQuery's best-effort
//!   de-duplication), or random when there are no keys (so a retried request does not
//!   double rows). Rows BigQuery refuses are logged one by one, and the step fails listing
//!   the first few. Streaming appends only.
//! * **Schema drift.** Columns of the input that the existing table lacks are added as
//!   NULLABLE columns (`ALLOW_FIELD_ADDITION` on the load job; a `tables.patch` of the
//!   target before a merge or a stream), or the step fails naming them
//!   (`on_new_columns: fail`). Columns the input lacks are left null.
//!
//! The connection has type `bigquery`: `project` (the default project of `table`, and the
//! one jobs run in), `location`, `base_url` and `upload_url` (Google's by default; the
//! sandbox and tests point them at fakes), and credentials — `credentials: <name>` of a
//! `google_service_account` connection (the engine puts that connection's rendered fields
//! here), or `key_file`/`key_json` directly; with none, the service-account key file named
//! by the `GOOGLE_APPLICATION_CREDENTIALS` environment variable (the metadata server of
//! Google's own machines is not consulted). The key's private key is masked everywhere.
//!
//! Every call is plain REST over reqwest with a yup-oauth2 token (scope
//! `https://www.googleapis.com/auth/bigquery`), not `gcp-bigquery-client`: the crate has no
//! media upload (the heart of this step), so reqwest was needed anyway, and one HTTP path
//! gives one retry policy, one error decoder (the reason decides retryability) and one way
//! to point every call at a fake.
//!
//! Outputs: `rows` (rows loaded or streamed), `bytes_uploaded` (file or JSON bytes actually
//! sent, re-sent chunks included), `table` (`project.dataset.table`), `job_id` (the load job,
//! or the MERGE's query job; null when streaming), `staging_table` (merge only, else null).

mod api;
mod schema;

use api::{Api, Failure, TableRef};
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use google_sheets4::yup_oauth2;
use polars::prelude::DataFrame;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;

const DEFAULT_BASE_URL: &str = "https://bigquery.googleapis.com/bigquery/v2";
const DEFAULT_UPLOAD_URL: &str = "https://bigquery.googleapis.com/upload/bigquery/v2";
/// Rows per `insertAll` request (Google's recommendation).
const STREAM_ROWS: usize = 500;
/// Bytes per `insertAll` request (the limit is 10 MB; keep a margin for the envelope).
const STREAM_BYTES: usize = 9 * 1024 * 1024;
/// How many refused rows the error message lists.
const SHOWN_ROW_ERRORS: usize = 5;
const OUTPUTS: [&str; 5] = ["rows", "bytes_uploaded", "table", "job_id", "staging_table"];

/// What happens to the rows already in the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Write {
    /// Add the rows (`WRITE_APPEND`).
    #[default]
    Append,
    /// Replace the table's rows with these (`WRITE_TRUNCATE`, atomic).
    Replace,
    /// Update the rows whose `keys` match, insert the others (staging table + one MERGE).
    Merge,
}

/// How the rows travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A load job from a Parquet upload (free, atomic, for batches).
    #[default]
    Load,
    /// Streaming inserts (`insertAll`): rows are queryable at once; billed; append only.
    Stream,
}

/// What to do when the input has columns the table lacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnNewColumns {
    /// Add them to the table as NULLABLE columns.
    #[default]
    Add,
    /// Fail the step, naming them.
    Fail,
}

/// The granularity of time partitioning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionType {
    /// One partition per day (the default).
    #[default]
    Day,
    /// One partition per hour.
    Hour,
    /// One partition per month.
    Month,
    /// One partition per year.
    Year,
}

/// Time partitioning of a table the step creates.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// The DATE, TIMESTAMP or DATETIME column to partition by.
    pub field: String,
    /// `day` (default), `hour`, `month` or `year`.
    #[serde(rename = "type", default)]
    pub kind: PartitionType,
}

/// Load the input table into a BigQuery table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// The destination: `dataset.table` (in the connection's project) or
    /// `project.dataset.table`.
    pub table: String,
    /// `append` (default): add the rows; `replace`: the table holds exactly these rows
    /// afterwards; `merge`: update rows whose `keys` match and insert the rest (needs `keys`).
    #[serde(default)]
    pub write: Write,
    /// The columns that identify a row: what `write: merge` matches on, and the `insertId`
    /// of streamed rows. Required for `merge`; their values must be non-null and unique.
    #[serde(default)]
    pub keys: Vec<String>,
    /// `load` (default): a load job from a Parquet upload; `stream`: streaming inserts (append
    /// only).
    #[serde(default)]
    pub mode: Mode,
    /// Time partitioning of the table, when the step creates it: `{field, type: day|hour|month|year}`.
    #[serde(default)]
    pub partition: Option<Partition>,
    /// Clustering columns (at most 4) of the table, when the step creates it.
    #[serde(default)]
    pub cluster: Vec<String>,
    /// `add` (default): columns the table lacks are added as NULLABLE; `fail`: the step fails
    /// naming them.
    #[serde(default)]
    pub on_new_columns: OnNewColumns,
    /// Create the dataset when it does not exist (default true; in the connection's
    /// `location`).
    #[serde(default = "yes")]
    pub create_dataset: bool,
    /// Where the dataset and jobs live (`US`, `EU`, `southamerica-east1` …); overrides the
    /// connection's `location`.
    #[serde(default)]
    pub location: Option<String>,
}

fn yes() -> bool {
    true
}

/// The `bigquery.load` step: a [`LoadSpec`] whose combinations were checked when it was
/// read (so `pipe validate` reports `write: merge` without `keys`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "LoadSpec")]
pub struct BigQueryLoad {
    /// The checked configuration.
    pub spec: LoadSpec,
}

impl TryFrom<LoadSpec> for BigQueryLoad {
    type Error = String;
    fn try_from(spec: LoadSpec) -> Result<Self, String> {
        spec.check()?;
        Ok(BigQueryLoad { spec })
    }
}

impl LoadSpec {
    /// The rules serde cannot express.
    pub fn check(&self) -> Result<(), String> {
        if self.write == Write::Merge && self.keys.is_empty() {
            return Err("`write: merge` needs `keys`: the columns that identify a row".into());
        }
        if self.mode == Mode::Stream && self.write != Write::Append {
            return Err(
                "`mode: stream` appends only: use `mode: load` for `write: replace` or `merge`"
                    .into(),
            );
        }
        if self.cluster.len() > 4 {
            return Err(format!(
                "`cluster` takes at most 4 columns, not {}",
                self.cluster.len()
            ));
        }
        let mut seen = HashSet::new();
        for k in &self.keys {
            if !seen.insert(k.to_ascii_lowercase()) {
                return Err(format!("`keys` names `{k}` twice"));
            }
        }
        Ok(())
    }
}

/// The `bigquery` connection.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "BigQueryConnection")]
pub struct Connection {
    /// Always `bigquery`.
    #[serde(rename = "type")]
    kind: String,
    /// The Google Cloud project (default: the key's `project_id`).
    #[serde(default)]
    project: Option<String>,
    /// The dataset location (`US`, `southamerica-east1`), unless the step gives one.
    #[serde(default)]
    location: Option<String>,
    /// The BigQuery API's base URL (default Google's).
    #[serde(default)]
    base_url: Option<String>,
    /// The upload endpoint of load jobs (default Google's).
    #[serde(default)]
    upload_url: Option<String>,
    /// The name of a `google_service_account` connection whose key to use.
    #[serde(default)]
    credentials: Option<Value>,
    /// A path to the service-account key JSON (relative to the pipeline's folder).
    #[serde(default)]
    key_file: Option<String>,
    /// The service-account key itself (JSON text or a mapping).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    key_json: Option<Value>,
    /// The local fake that `pipe run --sandbox` points this connection at (`bigquery`).
    #[serde(default)]
    #[allow(dead_code)]
    sandbox: Option<Value>,
    /// What the connection is, for people.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

impl engine::connection::ConnectionConfig for Connection {}

/// `--sandbox`: the fake BigQuery's URLs and project; its own key (when it does not borrow
/// one with `credentials:`) is the fake Google's.
pub fn sandbox(
    t: &engine::connection::SandboxTarget,
) -> Result<Option<engine::connection::ConnectionOverride>, String> {
    match t.stand_in() {
        None | Some("google") | Some("bigquery") => {}
        Some(other) => return Err(t.unknown_stand_in(other, &["google", "bigquery"])),
    }
    let project = Some(t.fake("bigquery.project"))
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "pipe-sandbox".to_string());
    let mut set = vec![
        ("base_url".to_string(), t.fake("bigquery.url")),
        ("upload_url".to_string(), t.fake("bigquery.upload_url")),
        ("project".to_string(), project),
    ];
    let mut remove = vec![];
    let borrows_key = t
        .spec
        .fields
        .get("credentials")
        .is_some_and(|c| c.is_string());
    if !borrows_key {
        set.push(("key_file".into(), t.fake("google.key_file")));
        remove.push("key_json".into());
    }
    Ok(Some(engine::connection::ConnectionOverride::Patch {
        set,
        remove,
    }))
}

#[async_trait]
impl StepConfig for BigQueryLoad {
    const TYPE: &'static str = "bigquery.load";
    const SUMMARY: &'static str =
        "Load the input table into BigQuery (append, replace, or merge on keys; load job or streaming), creating the dataset and table when missing";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: false,
            outputs: Some(OUTPUTS.iter().map(|s| s.to_string()).collect()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let redact = |e: StepError| StepError {
            message: ctx.redactor.redact(&e.message),
            retryable: e.retryable,
        };
        self.spec.run(&ctx).await.map_err(redact)
    }
}

impl LoadSpec {
    async fn run(&self, ctx: &StepContext) -> Result<StepOutput, StepError> {
        self.check().map_err(StepError::fatal)?;
        let df = match ctx.inputs.first() {
            Some((id, t)) => crate::table::frame(t)
                .ok_or_else(|| StepError::fatal(format!("input `{id}` is not a table")))?
                .clone(),
            None => {
                return Err(StepError::fatal(
                    "bigquery.load needs a table: name the step that produces it as `input:`",
                ))
            }
        };
        let api = connect(self, ctx).await?;
        let target = TableRef::parse(&self.table, &api.project).map_err(StepError::fatal)?;
        let fields = schema::derive(&df).map_err(|e| StepError::fatal(format!("{target}: {e}")))?;
        self.check_columns(&df, &target)?;
        let rows = df.height() as u64;

        // The dataset and the table.
        let fail = |doing: String| move |f: Failure| f.step(&doing);
        if api
            .get_dataset(ctx, &target.project, &target.dataset)
            .await
            .map_err(fail(format!("looking up dataset `{}`", target.dataset)))?
            .is_none()
        {
            if !self.create_dataset {
                return Err(StepError::fatal(format!(
                    "dataset `{}.{}` does not exist (and `create_dataset: false`)",
                    target.project, target.dataset
                )));
            }
            api.create_dataset(ctx, &target.project, &target.dataset)
                .await
                .map_err(fail(format!("creating dataset `{}`", target.dataset)))?;
            ctx.log(
                Level::Info,
                &format!("created dataset `{}.{}`", target.project, target.dataset),
            );
        }
        let existing = api
            .get_table(ctx, &target)
            .await
            .map_err(fail(format!("looking up table `{target}`")))?;
        let (created, new_fields, table_fields) = match existing {
            None => {
                api.create_table(ctx, &target, self.table_resource(&fields))
                    .await
                    .map_err(fail(format!("creating table `{target}`")))?;
                ctx.log(
                    Level::Info,
                    &format!("created table `{target}` ({} columns)", fields.len()),
                );
                (true, Vec::new(), schema::to_json(&fields))
            }
            Some(t) => {
                let have: HashSet<String> = t["schema"]["fields"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f["name"].as_str())
                    .map(str::to_ascii_lowercase)
                    .collect();
                let new: Vec<schema::Field> = fields
                    .iter()
                    .filter(|f| !have.contains(&f.name.to_ascii_lowercase()))
                    .cloned()
                    .collect();
                (false, new, t["schema"]["fields"].clone())
            }
        };
        let new_names: Vec<String> = new_fields.iter().map(|f| f.name.clone()).collect();
        if !new_fields.is_empty() {
            if self.on_new_columns == OnNewColumns::Fail {
                return Err(StepError::fatal(format!(
                    "the input has columns that `{target}` lacks: {} (`on_new_columns: fail`; set `add` to add them)",
                    new_names.join(", ")
                )));
            }
            ctx.log(
                Level::Info,
                &format!(
                    "adding column{} {} to `{target}`",
                    if new_names.len() == 1 { "" } else { "s" },
                    new_names.join(", ")
                ),
            );
        }
        // Streaming and MERGE need the columns in the target beforehand; a load job adds them
        // itself (ALLOW_FIELD_ADDITION).
        let patch_target =
            !new_fields.is_empty() && (self.mode == Mode::Stream || self.write == Write::Merge);
        if patch_target {
            let mut all = table_fields.as_array().cloned().unwrap_or_default();
            all.extend(new_fields.iter().map(schema::Field::to_json));
            api.patch_schema(ctx, &target, &Value::Array(all))
                .await
                .map_err(fail(format!("adding columns to `{target}`")))?;
        }

        let mut out = Outcome::default();
        match (self.mode, self.write) {
            (Mode::Stream, _) => self.stream(&api, ctx, &df, &target, &mut out).await?,
            (Mode::Load, Write::Merge) => {
                self.merge(&api, ctx, &df, &fields, &target, &mut out)
                    .await?
            }
            (Mode::Load, write) => {
                let data = parquet(&df).await?;
                let mut load = json!({
                    "destinationTable": {"projectId": target.project, "datasetId": target.dataset, "tableId": target.table},
                    "sourceFormat": "PARQUET",
                    "parquetOptions": {"enableListInference": true},
                    "writeDisposition": if write == Write::Replace { "WRITE_TRUNCATE" } else { "WRITE_APPEND" },
                    "createDisposition": "CREATE_NEVER",
                });
                if !new_fields.is_empty() && write == Write::Append {
                    load["schemaUpdateOptions"] = json!(["ALLOW_FIELD_ADDITION"]);
                }
                let (job, bytes) = api.load(ctx, load, &data, &target.to_string()).await?;
                out.bytes = bytes;
                out.job_id = job["jobReference"]["jobId"].as_str().map(str::to_string);
            }
        }
        ctx.progress(&[("rows", rows), ("bytes", out.bytes)]);
        ctx.log(
            Level::Info,
            &format!(
                "{} {rows} row{} {} `{target}` ({} bytes sent{})",
                match (self.mode, self.write) {
                    (Mode::Stream, _) => "streamed",
                    (_, Write::Append) => "appended",
                    (_, Write::Replace) => "replaced the table with",
                    (_, Write::Merge) => "merged",
                },
                if rows == 1 { "" } else { "s" },
                if self.write == Write::Replace {
                    "in"
                } else {
                    "into"
                },
                out.bytes,
                match &out.affected {
                    Some(n) => format!("; {n} rows inserted or updated"),
                    None => String::new(),
                }
            ),
        );
        let outputs = json!({
            "rows": rows,
            "bytes_uploaded": out.bytes,
            "table": target.to_string(),
            "job_id": out.job_id,
            "staging_table": out.staging,
        });
        let mut result = outputs.clone();
        result["created_table"] = json!(created);
        result["added_columns"] = json!(new_names);
        result["affected_rows"] = json!(out.affected);
        Ok(StepOutput {
            outputs: outputs.as_object().cloned().unwrap_or_default(),
            result,
            table: None,
            warnings: out.warnings,
        })
    }

    /// Keys, partition and cluster columns exist; keys are non-null and unique.
    fn check_columns(&self, df: &DataFrame, target: &TableRef) -> Result<(), StepError> {
        let has = |c: &str| df.column(c).is_ok();
        let names = || {
            df.get_column_names()
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (what, cols) in [("keys", &self.keys), ("cluster", &self.cluster)] {
            for c in cols {
                if !has(c) {
                    return Err(StepError::fatal(format!(
                        "`{what}` names `{c}`, which the input table lacks (its columns: {})",
                        names()
                    )));
                }
            }
        }
        if let Some(p) = &self.partition {
            if !has(&p.field) {
                return Err(StepError::fatal(format!(
                    "`partition.field` names `{}`, which the input table lacks (its columns: {})",
                    p.field,
                    names()
                )));
            }
        }
        if self.keys.is_empty() {
            return Ok(());
        }
        for k in &self.keys {
            let nulls = df.column(k).map(|c| c.null_count()).unwrap_or(0);
            if nulls > 0 && self.write == Write::Merge {
                return Err(StepError::fatal(format!(
                    "key column `{k}` has {nulls} null value{}: a MERGE cannot match them (into `{target}`)",
                    if nulls == 1 { "" } else { "s" }
                )));
            }
        }
        if self.write == Write::Merge {
            let repeated = df
                .select(self.keys.iter().map(String::as_str))
                .and_then(|k| k.is_duplicated())
                .map_err(|e| StepError::fatal(format!("checking the keys: {e}")))?
                .sum()
                .unwrap_or(0);
            if repeated > 0 {
                return Err(StepError::fatal(format!(
                    "the input has {repeated} rows sharing keys ({}): a MERGE into `{target}` needs one row per key",
                    self.keys.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The Table resource of a table the step creates.
    fn table_resource(&self, fields: &[schema::Field]) -> Value {
        let mut t = json!({"schema": {"fields": schema::to_json(fields)}});
        if let Some(p) = &self.partition {
            t["timePartitioning"] = json!({
                "type": match p.kind {
                    PartitionType::Day => "DAY",
                    PartitionType::Hour => "HOUR",
                    PartitionType::Month => "MONTH",
                    PartitionType::Year => "YEAR",
                },
                "field": p.field,
            });
        }
        if !self.cluster.is_empty() {
            t["clustering"] = json!({"fields": self.cluster});
        }
        t
    }

    /// Staging table, one MERGE, drop the staging table (whatever happened).
    async fn merge(
        &self,
        api: &Api,
        ctx: &StepContext,
        df: &DataFrame,
        fields: &[schema::Field],
        target: &TableRef,
        out: &mut Outcome,
    ) -> Result<(), StepError> {
        let stage = TableRef {
            table: format!(
                "{}__pipe_stage_{}_{}",
                target.table,
                ctx.run_id,
                &api::random_suffix()[..8]
            ),
            ..target.clone()
        };
        out.staging = Some(stage.to_string());
        let result = self
            .merge_through(api, ctx, df, fields, target, &stage, out)
            .await;
        // Best effort, even after a failure or cancellation: a fresh token so the drop is
        // not cancelled with the step; the table expires in a day anyway.
        let mut quiet = ctx.clone();
        quiet.cancel = tokio_util::sync::CancellationToken::new();
        let dropped = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            api.delete_table(&quiet, &stage),
        )
        .await;
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(f)) => {
                let msg = format!(
                    "could not drop the staging table `{stage}` (it expires in a day): {}",
                    f.message
                );
                ctx.log(Level::Warning, &msg);
                out.warnings.push(msg);
            }
            Err(_) => {
                let msg =
                    format!("dropping the staging table `{stage}` timed out (it expires in a day)");
                ctx.log(Level::Warning, &msg);
                out.warnings.push(msg);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn merge_through(
        &self,
        api: &Api,
        ctx: &StepContext,
        df: &DataFrame,
        fields: &[schema::Field],
        target: &TableRef,
        stage: &TableRef,
        out: &mut Outcome,
    ) -> Result<(), StepError> {
        let expires = chrono::Utc::now().timestamp_millis() + 24 * 3600 * 1000;
        let mut resource = json!({"schema": {"fields": schema::to_json(fields)}});
        resource["expirationTime"] = json!(expires.to_string());
        api.create_table(ctx, stage, resource)
            .await
            .map_err(|f| f.step(&format!("creating the staging table `{stage}`")))?;
        let data = parquet(df).await?;
        let load = json!({
            "destinationTable": {"projectId": stage.project, "datasetId": stage.dataset, "tableId": stage.table},
            "sourceFormat": "PARQUET",
            "parquetOptions": {"enableListInference": true},
            "writeDisposition": "WRITE_TRUNCATE",
            "createDisposition": "CREATE_NEVER",
        });
        let (_, bytes) = api
            .load(ctx, load, &data, &format!("{stage} (staging for {target})"))
            .await?;
        out.bytes = bytes;
        let columns: Vec<String> = fields.iter().map(|f| f.name.clone()).collect();
        let sql = merge_sql(target, stage, &columns, &self.keys);
        let job = api
            .query(ctx, &sql, &format!("MERGE into `{target}`"))
            .await?;
        out.job_id = job["jobReference"]["jobId"].as_str().map(str::to_string);
        out.affected = job["statistics"]["query"]["numDmlAffectedRows"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| job["statistics"]["query"]["numDmlAffectedRows"].as_u64());
        Ok(())
    }

    /// `insertAll` in batches of ≤ 500 rows and ≤ ~9 MB.
    async fn stream(
        &self,
        api: &Api,
        ctx: &StepContext,
        df: &DataFrame,
        target: &TableRef,
        out: &mut Outcome,
    ) -> Result<(), StepError> {
        let mut errors: Vec<String> = Vec::new();
        let mut failed_rows = 0usize;
        let mut i = 0;
        let mut sent_rows = 0u64;
        while i < df.height() {
            let start = i;
            let mut batch: Vec<u8> =
                b"{\"skipInvalidRows\":false,\"ignoreUnknownValues\":false,\"rows\":[".to_vec();
            let mut n = 0;
            while i < df.height() && n < STREAM_ROWS {
                let row = schema::row_json(df, i).map_err(StepError::fatal)?;
                let insert_id = if self.keys.is_empty() {
                    api::random_suffix()
                } else {
                    self.keys
                        .iter()
                        .map(|k| match &row.get(k) {
                            Some(Value::String(s)) => s.clone(),
                            Some(v) => v.to_string(),
                            None => String::new(),
                        })
                        .collect::<Vec<_>>()
                        .join("|")
                };
                let item = serde_json::to_vec(&json!({"insertId": insert_id, "json": row}))
                    .map_err(|e| StepError::fatal(e.to_string()))?;
                if n > 0 && batch.len() + item.len() + 2 > STREAM_BYTES {
                    break;
                }
                if n == 0 && item.len() + batch.len() + 2 > STREAM_BYTES {
                    return Err(StepError::fatal(format!(
                        "row {i} is {} bytes as JSON, more than a streaming insert takes; use `mode: load`",
                        item.len()
                    )));
                }
                if n > 0 {
                    batch.push(b',');
                }
                batch.extend_from_slice(&item);
                n += 1;
                i += 1;
            }
            batch.extend_from_slice(b"]}");
            let resp = api.insert_all(ctx, target, &batch).await.map_err(|f| {
                f.step(&format!("streaming rows {start}–{} into `{target}`", i - 1))
            })?;
            out.bytes += batch.len() as u64;
            sent_rows += n as u64;
            for e in resp["insertErrors"].as_array().into_iter().flatten() {
                let index = e["index"].as_u64().unwrap_or(0) as usize + start;
                let what: Vec<String> = e["errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|x| x["reason"] != "stopped")
                    .map(|x| {
                        let loc = x["location"].as_str().unwrap_or("");
                        format!(
                            "{}{}: {}",
                            x["reason"].as_str().unwrap_or("error"),
                            if loc.is_empty() {
                                String::new()
                            } else {
                                format!(" at `{loc}`")
                            },
                            x["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                if what.is_empty() {
                    // Only `stopped`: refused because another row of the request failed.
                    continue;
                }
                failed_rows += 1;
                let line = format!("row {index}: {}", what.join("; "));
                ctx.log(Level::Error, &format!("`{target}` refused {line}"));
                errors.push(line);
            }
            ctx.progress(&[("rows", sent_rows), ("bytes", out.bytes)]);
        }
        if !errors.is_empty() {
            let shown: Vec<&str> = errors
                .iter()
                .take(SHOWN_ROW_ERRORS)
                .map(String::as_str)
                .collect();
            return Err(StepError::fatal(format!(
                "streaming into `{target}`: BigQuery refused {failed_rows} row{} ({}{})",
                if failed_rows == 1 { "" } else { "s" },
                shown.join("; "),
                if errors.len() > SHOWN_ROW_ERRORS {
                    "; …"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }
}

/// What the write did, for the outputs.
#[derive(Debug, Default)]
struct Outcome {
    bytes: u64,
    job_id: Option<String>,
    staging: Option<String>,
    affected: Option<u64>,
    warnings: Vec<String>,
}

/// The frame as Parquet bytes, off the async threads.
async fn parquet(df: &DataFrame) -> Result<Vec<u8>, StepError> {
    let df = df.clone();
    tokio::task::spawn_blocking(move || schema::parquet_bytes(&df))
        .await
        .map_err(|e| StepError::fatal(format!("writing Parquet panicked: {e}")))?
        .map_err(StepError::fatal)
}

/// The one statement that touches the target of a merge.
fn merge_sql(target: &TableRef, stage: &TableRef, columns: &[String], keys: &[String]) -> String {
    let q = |c: &str| format!("`{c}`");
    let is_key = |c: &str| keys.iter().any(|k| k.eq_ignore_ascii_case(c));
    let on: Vec<String> = keys
        .iter()
        .map(|k| format!("T.{} = S.{}", q(k), q(k)))
        .collect();
    let set: Vec<String> = columns
        .iter()
        .filter(|c| !is_key(c))
        .map(|c| format!("{} = S.{}", q(c), q(c)))
        .collect();
    let cols: Vec<String> = columns.iter().map(|c| q(c)).collect();
    let vals: Vec<String> = columns.iter().map(|c| format!("S.{}", q(c))).collect();
    let mut sql = format!(
        "MERGE {} T USING {} S ON {}",
        target.sql(),
        stage.sql(),
        on.join(" AND ")
    );
    if !set.is_empty() {
        sql.push_str(&format!(" WHEN MATCHED THEN UPDATE SET {}", set.join(", ")));
    }
    sql.push_str(&format!(
        " WHEN NOT MATCHED THEN INSERT ({}) VALUES ({})",
        cols.join(", "),
        vals.join(", ")
    ));
    sql
}

/// Sign in with the connection's credentials.
async fn connect(spec: &LoadSpec, ctx: &StepContext) -> Result<Api, StepError> {
    let conn = ctx.connection.as_ref().ok_or_else(|| {
        StepError::fatal(
            "bigquery.load needs a connection of type `bigquery` (`connection: <name>` on the step)",
        )
    })?;
    let conn: Connection = serde_json::from_value(conn.clone()).map_err(|e| {
        StepError::fatal(format!(
            "the step's connection is not a valid `bigquery` connection: {e}"
        ))
    })?;
    if conn.kind != "bigquery" {
        return Err(StepError::fatal(format!(
            "bigquery.load needs a connection of type `bigquery`, not `{}`",
            conn.kind
        )));
    }
    let key = credentials(&conn, ctx)?;
    ctx.redactor.add(&key.private_key);
    let project = conn
        .project
        .clone()
        .filter(|p| !p.trim().is_empty())
        .or_else(|| key.project_id.clone())
        .ok_or_else(|| {
            StepError::fatal("the bigquery connection needs `project` (the key names none)")
        })?;
    let location = spec
        .location
        .clone()
        .or(conn.location.clone())
        .filter(|l| !l.trim().is_empty());
    let nonempty = |s: &Option<String>, d: &str| {
        s.clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| d.to_string())
    };
    Api::connect(
        key,
        project,
        location,
        &nonempty(&conn.base_url, DEFAULT_BASE_URL),
        &nonempty(&conn.upload_url, DEFAULT_UPLOAD_URL),
    )
    .await
}

/// The service-account key: `credentials` (an embedded `google_service_account`
/// connection), else `key_file`/`key_json`, else `GOOGLE_APPLICATION_CREDENTIALS`.
fn credentials(
    conn: &Connection,
    ctx: &StepContext,
) -> Result<yup_oauth2::ServiceAccountKey, StepError> {
    let (file, inline, origin) = match &conn.credentials {
        Some(Value::Object(c)) => {
            if let Some(kind) = c.get("type").and_then(Value::as_str) {
                if kind != "google_service_account" {
                    return Err(StepError::fatal(format!(
                        "the bigquery connection's `credentials` must be a `google_service_account` connection, not `{kind}`"
                    )));
                }
            }
            (
                c.get("key_file").and_then(Value::as_str).map(str::to_string),
                c.get("key_json").cloned(),
                "`credentials`",
            )
        }
        Some(Value::String(name)) => {
            return Err(StepError::fatal(format!(
                "the bigquery connection's `credentials: {name}` names no connection of the pipeline"
            )))
        }
        Some(Value::Null) | None => (
            conn.key_file.clone(),
            conn.key_json.clone(),
            "the bigquery connection",
        ),
        Some(_) => {
            return Err(StepError::fatal(
                "the bigquery connection's `credentials` must name a `google_service_account` connection",
            ))
        }
    };
    let file = file.filter(|s| !s.trim().is_empty());
    let inline = inline.filter(|v| match v {
        Value::Null => false,
        Value::String(s) => !s.trim().is_empty(),
        _ => true,
    });
    let (text, shown) = match (file, inline) {
        (Some(_), Some(_)) => {
            return Err(StepError::fatal(format!(
                "{origin} has both `key_file` and `key_json`: give exactly one"
            )))
        }
        (Some(path), None) => read_key(&ctx.pipeline_dir.join(path))?,
        (None, Some(Value::String(s))) => (s, "`key_json`".to_string()),
        (None, Some(v)) => (v.to_string(), "`key_json`".to_string()),
        (None, None) => match std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
            Ok(p) if !p.trim().is_empty() => read_key(Path::new(&p))?,
            _ => {
                return Err(StepError::fatal(
                    "the bigquery connection has no credentials: set `credentials: <a google_service_account connection>`, `key_file` or `key_json`, or the GOOGLE_APPLICATION_CREDENTIALS environment variable",
                ))
            }
        },
    };
    // Not `parse_service_account_key`: its error quotes serde's message, which could echo
    // part of the key.
    let value: Value = serde_json::from_str(&text)
        .map_err(|_| StepError::fatal(format!("the service-account {shown} is not valid JSON")))?;
    if let Some(k) = value["private_key"].as_str() {
        ctx.redactor.add(k);
    }
    for field in ["client_email", "private_key", "token_uri"] {
        if !value[field].is_string() {
            return Err(StepError::fatal(format!(
                "the service-account {shown} has no `{field}` (is it a service-account key?)"
            )));
        }
    }
    serde_json::from_value(value).map_err(|_| {
        StepError::fatal(format!(
            "the service-account {shown} is not a valid service-account key"
        ))
    })
}

fn read_key(path: &Path) -> Result<(String, String), StepError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StepError::fatal(format!(
            "cannot read the service-account key file {}: {e}",
            path.display()
        ))
    })?;
    Ok((text, format!("key file {}", path.display())))
}

#[cfg(test)]
mod sandbox_tests;
#[cfg(test)]
mod tests;
