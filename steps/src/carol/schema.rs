//! `type: carol.schema` — create or update a staging table's schema from a dataframe.
//!
//! The schema's fields are the input's columns with Carol types derived from the Polars
//! types (integers → `integer`, floats → `double`, booleans → `boolean`, dates and
//! datetimes → `date`, text → `string`, structs and lists → `object`), `overrides` replacing
//! any of them; `crosswalk` names the identifier (primary key) columns. The step reads the
//! current schema first: none → `POST`, a different one → `PUT`, the same → nothing.

use super::client::{check_table, Body, Carol};
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use polars::prelude::{DataFrame, DataType};
use reqwest::Method;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A Carol staging field type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CarolType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// A long whole number.
    Long,
    /// A floating-point number.
    Double,
    /// true or false.
    Boolean,
    /// A date or a date and time (ISO 8601 text).
    Date,
    /// A JSON object or array.
    Object,
}

impl CarolType {
    pub fn as_str(self) -> &'static str {
        match self {
            CarolType::String => "string",
            CarolType::Integer => "integer",
            CarolType::Long => "long",
            CarolType::Double => "double",
            CarolType::Boolean => "boolean",
            CarolType::Date => "date",
            CarolType::Object => "object",
        }
    }

    /// The Carol type of a Polars type.
    pub fn of(dtype: &DataType) -> CarolType {
        match dtype {
            DataType::Boolean => CarolType::Boolean,
            DataType::Float32 | DataType::Float64 => CarolType::Double,
            d if d.is_integer() => CarolType::Integer,
            DataType::Date | DataType::Datetime(_, _) => CarolType::Date,
            DataType::Struct(_) | DataType::List(_) => CarolType::Object,
            _ => CarolType::String,
        }
    }
}

/// Create or update a Carol staging table's schema from the `input:` table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CarolSchema {
    /// The staging table (letters and digits, starting with a letter).
    pub table: String,
    /// The identifier (crosswalk) columns: records with the same values replace each other.
    pub crosswalk: Vec<String>,
    /// Field types that replace the derived ones (`{cod_emitente: string}`).
    #[serde(default)]
    pub overrides: IndexMap<String, CarolType>,
    /// Let Carol accept fields the schema does not list (`mdmFlexible`).
    #[serde(default)]
    pub flexible: bool,
}

/// Outputs of `carol.schema`.
pub const OUTPUTS: [&str; 3] = ["table", "action", "fields"];

/// The schema body Carol takes.
pub fn schema_body(
    table: &str,
    df: &DataFrame,
    crosswalk: &[String],
    overrides: &IndexMap<String, CarolType>,
    flexible: bool,
) -> Result<Value, String> {
    let mut props = Map::new();
    for c in df.get_columns() {
        let name = c.name().to_string();
        let ty = overrides
            .get(&name)
            .copied()
            .unwrap_or_else(|| CarolType::of(c.dtype()));
        props.insert(name, json!({"type": ty.as_str()}));
    }
    if let Some(o) = overrides.keys().find(|k| !props.contains_key(*k)) {
        return Err(format!(
            "`overrides` names `{o}`, which is not a column of the input"
        ));
    }
    if crosswalk.is_empty() {
        return Err("`crosswalk` must name at least one column".into());
    }
    if let Some(c) = crosswalk.iter().find(|k| !props.contains_key(*k)) {
        return Err(format!(
            "the crosswalk column `{c}` is not a column of the input"
        ));
    }
    Ok(json!({
        "mdmStagingType": table,
        "mdmFlexible": if flexible { "true" } else { "false" },
        "mdmExportData": "false",
        "mdmStagingMapping": {"properties": props},
        "mdmCrosswalkTemplate": {"mdmCrossreference": {table: crosswalk}},
    }))
}

/// Whether the stored schema already says what `wanted` says.
fn same(stored: &Value, wanted: &Value) -> bool {
    let props = |v: &Value| v["mdmStagingMapping"]["properties"].clone();
    let xref = |v: &Value| v["mdmCrosswalkTemplate"]["mdmCrossreference"].clone();
    let flex = |v: &Value| v["mdmFlexible"].to_string().contains("true");
    props(stored) == props(wanted) && xref(stored) == xref(wanted) && flex(stored) == flex(wanted)
}

#[async_trait]
impl StepConfig for CarolSchema {
    const TYPE: &'static str = "carol.schema";
    const SUMMARY: &'static str =
        "Create or update a Carol staging table's schema (types from the input table, crosswalk keys)";

    fn static_info(&self) -> StaticInfo {
        super::outputs_info(&OUTPUTS)
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        check_table(&self.table)?;
        let carol = Carol::from_ctx(&ctx)?;
        let df = super::input_frame(&ctx, "a table whose columns become the fields")?;
        let wanted = schema_body(
            &self.table,
            df,
            &self.crosswalk,
            &self.overrides,
            self.flexible,
        )
        .map_err(StepError::fatal)?;
        let path = format!("/api/v2/staging/tables/{}/schema", self.table);
        let query = [("connectorId", carol.connector_id.clone())];
        let current = carol
            .request(
                &ctx,
                Method::GET,
                &path,
                &query,
                &Body::None,
                Default::default(),
            )
            .await?;
        let action = if current.status.is_success() {
            if same(&current.json(), &wanted) {
                "unchanged"
            } else {
                "updated"
            }
        } else if current.status.as_u16() == 404 {
            "created"
        } else {
            super::client::check(&ctx, &Method::GET, &path, &current)?;
            unreachable!("check fails on a non-2xx answer")
        };
        let method = match action {
            "created" => Some(Method::POST),
            "updated" => Some(Method::PUT),
            _ => None,
        };
        if let Some(m) = method {
            carol
                .call(&ctx, m, &path, &query, &Body::json(&wanted))
                .await?;
        }
        let fields = df.width();
        ctx.log(
            Level::Info,
            &format!(
                "Carol staging table {}: schema {action} ({fields} fields, crosswalk {})",
                self.table,
                self.crosswalk.join(", ")
            ),
        );
        let result =
            json!({"table": self.table, "action": action, "fields": fields, "schema": wanted});
        Ok(super::finish(result, &OUTPUTS, Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn types_from_the_frame_with_overrides() {
        let df = DataFrame::new(vec![
            Column::new("id".into(), [1i64, 2]),
            Column::new("price".into(), [1.5f64, 2.0]),
            Column::new("ok".into(), [true, false]),
            Column::new("name".into(), ["a", "b"]),
            Column::new("day".into(), [19000i32, 19001])
                .cast(&DataType::Date)
                .unwrap(),
        ])
        .unwrap();
        let mut o = IndexMap::new();
        o.insert("name".to_string(), CarolType::Object);
        let s = schema_body("t1", &df, &["id".into()], &o, false).unwrap();
        assert_eq!(
            s["mdmStagingMapping"]["properties"],
            json!({"id": {"type": "integer"}, "price": {"type": "double"}, "ok": {"type": "boolean"},
                   "name": {"type": "object"}, "day": {"type": "date"}})
        );
        assert_eq!(
            s["mdmCrosswalkTemplate"]["mdmCrossreference"],
            json!({"t1": ["id"]})
        );
        assert!(schema_body("t1", &df, &["nope".into()], &IndexMap::new(), false).is_err());
        assert!(schema_body("t1", &df, &[], &IndexMap::new(), false).is_err());
        o.insert("ghost".to_string(), CarolType::Long);
        assert!(schema_body("t1", &df, &["id".into()], &o, false).is_err());
    }
}
