//! `type: carol.delete` — delete staging records by their crosswalk values.
//!
//! The input table's columns are the crosswalk fields (`cod-emitente`); each row becomes
//! one item of the body Carol takes, `[{"<crosswalk name>": {"cod-emitente": "33"}}, …]`
//! (values as text, as in Carol's documentation), sent as
//! `DELETE /api/v2/staging/tables/{table}?connectorId=…&propagateCleanup=…` in requests of
//! `batch_size` items. `propagate_cleanup` also removes the golden records and rejected
//! records that came from them. (The source document shows this endpoint only as an
//! image: the path is the one its parameter list implies; see docs/decisions/0011.)

use super::client::{check_table, Body, Carol};
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use polars::prelude::AnyValue;
use reqwest::Method;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Delete records of a Carol staging table by crosswalk values (the `input:` table's rows).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CarolDelete {
    /// The staging table.
    pub table: String,
    /// Also remove the golden records (and rejected records) made from the deleted ones.
    #[serde(default)]
    pub propagate_cleanup: bool,
    /// The crosswalk's name in the body (default: the table name, which is what
    /// `carol.schema` creates).
    #[serde(default)]
    pub crosswalk_name: Option<String>,
    /// Items per request (default 1000).
    #[serde(default)]
    pub batch_size: Option<u64>,
}

/// Outputs of `carol.delete`.
pub const OUTPUTS: [&str; 2] = ["records", "requests"];

fn text(v: &AnyValue) -> Option<String> {
    match v {
        AnyValue::Null => None,
        AnyValue::String(s) => Some(s.to_string()),
        AnyValue::StringOwned(s) => Some(s.to_string()),
        other => Some(other.to_string().trim_matches('"').to_string()),
    }
}

#[async_trait]
impl StepConfig for CarolDelete {
    const TYPE: &'static str = "carol.delete";
    const SUMMARY: &'static str =
        "Delete Carol staging records by crosswalk values (the input table's rows), optionally propagating to golden records";

    fn static_info(&self) -> StaticInfo {
        super::outputs_info(&OUTPUTS)
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        check_table(&self.table)?;
        let carol = Carol::from_ctx(&ctx)?;
        let df = super::input_frame(&ctx, "a table of crosswalk values")?;
        let name = self
            .crosswalk_name
            .clone()
            .unwrap_or_else(|| self.table.clone());
        let cols = df.get_columns();
        let mut items = Vec::with_capacity(df.height());
        for i in 0..df.height() {
            let mut keys = Map::new();
            for c in cols {
                let v = c.get(i).map_err(|e| StepError::fatal(e.to_string()))?;
                let t = text(&v).ok_or_else(|| {
                    StepError::fatal(format!(
                        "row {}: the crosswalk column `{}` is empty",
                        i + 1,
                        c.name()
                    ))
                })?;
                keys.insert(c.name().to_string(), Value::String(t));
            }
            items.push(json!({ name.clone(): keys }));
        }
        let path = format!("/api/v2/staging/tables/{}", self.table);
        let query = [
            ("connectorId", carol.connector_id.clone()),
            ("propagateCleanup", self.propagate_cleanup.to_string()),
        ];
        let size = self.batch_size.unwrap_or(1000).max(1) as usize;
        let mut requests = 0u64;
        for batch in items.chunks(size) {
            carol
                .call(
                    &ctx,
                    Method::DELETE,
                    &path,
                    &query,
                    &Body::json(&Value::Array(batch.to_vec())),
                )
                .await?;
            requests += 1;
        }
        ctx.log(
            Level::Info,
            &format!(
                "Carol: asked to delete {} records of {} in {requests} requests (propagateCleanup={})",
                items.len(),
                self.table,
                self.propagate_cleanup
            ),
        );
        let result = json!({"records": items.len(), "requests": requests, "table": self.table});
        Ok(super::finish(result, &OUTPUTS, Vec::new()))
    }
}
