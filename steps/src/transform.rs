//! `type: transform` — reshape a table with an ordered list of typed operations.
//!
//! Why a list of named operations instead of "write a script": the help-desk loader this
//! replaces renamed columns to the warehouse's Portuguese names, mapped status ids to labels
//! and shifted UTC timestamps to São Paulo time in a dozen lines of pandas that nobody could
//! validate before running them. Here each operation is a small serde struct, so
//! `pipe validate` checks the shape of every one (unknown operations get a did-you-mean, an
//! unknown cast type or time-zone name is an error with its line), and at run time an
//! operation that names a column that is not there says which operation it was and lists the
//! columns that do exist at that point.
//!
//! The operations build one Polars `LazyFrame` (the schema is resolved after each one, so
//! errors name their operation) that is collected once at the end. Row-level expressions
//! (`filter`, `derive`) and whole queries (`sql`) are Polars SQL, so users write
//! `status_id IN (1, 2) AND worked_hours > 0`. Time zones are IANA names, converted with the
//! zone's full history (São Paulo's DST until 2019 included).

use crate::table::{frame, table};
use async_trait::async_trait;
use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, TimeZone as _};
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use polars::prelude::*;
use schemars::JsonSchema;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// The operations of a transform step, applied in order to the step's `input` table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Transform(
    /// The operations, in order; each is a mapping with one key naming the operation.
    pub Vec<Op>,
);

/// One operation: a mapping with a single key, the operation's name.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    rename_all = "snake_case",
    expecting = "an operation: a map with one key such as `rename`, `map` or `filter`"
)]
pub enum Op {
    /// Keep only these columns, in this order.
    Select(Vec<String>),
    /// Remove these columns.
    Drop(Vec<String>),
    /// Rename columns: `{old: new}`.
    Rename(IndexMap<String, String>),
    /// Change column types: `{column: type}` (`string`, `integer`, `float`, `boolean`, `date`,
    /// `datetime`). Values that cannot be converted fail the step.
    Cast(IndexMap<String, CastType>),
    /// Replace a column's values through a lookup table (status ids to labels).
    Map(MapOp),
    /// Replace nulls: `{column: value}` (the value is converted to the column's type).
    FillNull(IndexMap<String, Scalar>),
    /// Keep the rows for which this SQL expression is true
    /// (`status_id IN (1, 2) AND worked_hours > 0`).
    Filter(String),
    /// Add (or replace) columns computed by SQL expressions: `{new_column: "expression"}`;
    /// later entries may use earlier ones.
    Derive(IndexMap<String, String>),
    /// Parse text columns into time-zone-aware datetimes.
    ParseDatetime(ParseDatetime),
    /// Show datetime columns in another time zone: the instant stays, the zone changes
    /// (`2018-01-15T12:00:00Z` → `10:00 -02:00` in America/Sao_Paulo).
    ConvertTimezone(ConvertTimezone),
    /// Declare which zone datetime columns' wall-clock times are in: the wall clock stays,
    /// the instant changes.
    ReplaceTimezone(ReplaceTimezone),
    /// Turn struct columns into one column per field: a list of columns, or
    /// `{columns: [...], separator: "_"}` to name them `parent_field`.
    Unnest(Unnest),
    /// One row per element of these list columns (the other columns repeat).
    Explode(Vec<String>),
    /// Keep one row per key.
    Dedupe(Dedupe),
    /// Order the rows.
    Sort(Sort),
    /// Join another input table (named in the step's `inputs:`).
    Join(Join),
    /// A Polars SQL query over the tables: the main input is `input`, every input table is
    /// also its step id (`SELECT … FROM input JOIN other USING (id)`).
    Sql(String),
}

impl Op {
    /// The operation's name, as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Select(_) => "select",
            Op::Drop(_) => "drop",
            Op::Rename(_) => "rename",
            Op::Cast(_) => "cast",
            Op::Map(_) => "map",
            Op::FillNull(_) => "fill_null",
            Op::Filter(_) => "filter",
            Op::Derive(_) => "derive",
            Op::ParseDatetime(_) => "parse_datetime",
            Op::ConvertTimezone(_) => "convert_timezone",
            Op::ReplaceTimezone(_) => "replace_timezone",
            Op::Unnest(_) => "unnest",
            Op::Explode(_) => "explode",
            Op::Dedupe(_) => "dedupe",
            Op::Sort(_) => "sort",
            Op::Join(_) => "join",
            Op::Sql(_) => "sql",
        }
    }
}

/// A column type for `cast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CastType {
    /// Text.
    #[serde(alias = "str")]
    String,
    /// 64-bit integer (numbers are truncated toward zero; text must be a whole number).
    #[serde(alias = "int64", alias = "int")]
    Integer,
    /// 64-bit floating point.
    #[serde(alias = "float64", alias = "number")]
    Float,
    /// `true`/`false` (text `true`, `false`, `1`, `0`, `yes`, `no` is read too).
    #[serde(alias = "bool")]
    Boolean,
    /// A calendar date.
    Date,
    /// A UTC datetime (text is parsed like `parse_datetime` does).
    Datetime,
}

/// A literal value in a config (a `map` result, a `fill_null` value).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "a value: a string, number or boolean")]
pub enum Scalar {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// Text.
    String(String),
}

impl Scalar {
    fn dtype(&self) -> DataType {
        match self {
            Scalar::Bool(_) => DataType::Boolean,
            Scalar::Int(_) => DataType::Int64,
            Scalar::Float(_) => DataType::Float64,
            Scalar::String(_) => DataType::String,
        }
    }
    fn text(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::String(s) => s.clone(),
        }
    }
    fn lit(&self) -> Expr {
        match self {
            Scalar::Bool(b) => lit(*b),
            Scalar::Int(i) => lit(*i),
            Scalar::Float(f) => lit(*f),
            Scalar::String(s) => lit(s.as_str()),
        }
    }
}

/// The common type of some values: one kind stays that kind, integers with numbers are
/// numbers, anything else mixed is text.
fn common_dtype<'a>(values: impl IntoIterator<Item = &'a Scalar>) -> DataType {
    let mut out: Option<DataType> = None;
    for v in values {
        let t = v.dtype();
        out = Some(match out {
            None => t,
            Some(o) if o == t => o,
            Some(DataType::Int64) | Some(DataType::Float64)
                if matches!(t, DataType::Int64 | DataType::Float64) =>
            {
                DataType::Float64
            }
            Some(_) => DataType::String,
        });
    }
    out.unwrap_or(DataType::String)
}

fn scalars_series(name: &str, values: &[&Scalar], dtype: &DataType) -> Series {
    let name = PlSmallStr::from(name);
    match dtype {
        DataType::Boolean => Series::new(
            name,
            values
                .iter()
                .map(|v| match v {
                    Scalar::Bool(b) => Some(*b),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        DataType::Int64 => Series::new(
            name,
            values
                .iter()
                .map(|v| match v {
                    Scalar::Int(i) => Some(*i),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        DataType::Float64 => Series::new(
            name,
            values
                .iter()
                .map(|v| match v {
                    Scalar::Int(i) => Some(*i as f64),
                    Scalar::Float(f) => Some(*f),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        _ => Series::new(name, values.iter().map(|v| v.text()).collect::<Vec<_>>()),
    }
}

/// `map`: look values up in a table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapOp {
    /// The column whose values are looked up.
    pub column: String,
    /// The column the results go to (default: replace `column`).
    #[serde(default)]
    pub into: Option<String>,
    /// The lookup table `{from: to}`. Keys are matched against the column's values whatever
    /// their type (key `1` matches the integer 1, key `true` the boolean true).
    pub values: IndexMap<String, Scalar>,
    /// The result for values not in `values`, nulls included (default: null).
    #[serde(default)]
    pub default: Option<Scalar>,
}

/// What to do with a wall-clock time that happens twice (when DST ends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ambiguous {
    /// Fail the step.
    #[default]
    Raise,
    /// The first of the two instants (still on summer time).
    Earliest,
    /// The second of the two instants.
    Latest,
    /// Null.
    Null,
}

impl Ambiguous {
    fn as_str(self) -> &'static str {
        match self {
            Ambiguous::Raise => "raise",
            Ambiguous::Earliest => "earliest",
            Ambiguous::Latest => "latest",
            Ambiguous::Null => "null",
        }
    }
}

/// What to do with a wall-clock time that never happens (skipped when DST starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Nonexistent {
    /// Fail the step.
    #[default]
    Raise,
    /// Null.
    Null,
}

/// A policy value where YAML's unquoted `null` means the `null` policy.
fn null_or<'de, D: Deserializer<'de>, T: Deserialize<'de> + NullPolicy>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_else(T::null))
}

trait NullPolicy {
    fn null() -> Self;
}
impl NullPolicy for Ambiguous {
    fn null() -> Self {
        Ambiguous::Null
    }
}
impl NullPolicy for Nonexistent {
    fn null() -> Self {
        Nonexistent::Null
    }
}

/// An IANA time-zone name (`America/Sao_Paulo`, `UTC`), checked when the pipeline is
/// validated.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[schemars(transparent)]
pub struct Zone(pub String);

impl Default for Zone {
    fn default() -> Self {
        Zone("UTC".into())
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Zone, D::Error> {
        let s = String::deserialize(d)?;
        // A template is checked after rendering (in run mode it has been rendered).
        if engine::template::is_template(&s) || s.parse::<chrono_tz::Tz>().is_ok() {
            return Ok(Zone(s));
        }
        let hint = engine::diag::did_you_mean(&s, chrono_tz::TZ_VARIANTS.iter().map(|t| t.name()))
            .map(|n| format!(" (did you mean `{n}`?)"))
            .unwrap_or_default();
        Err(de::Error::custom(format!(
            "unknown time zone `{s}`{hint}; use an IANA name such as America/Sao_Paulo or UTC"
        )))
    }
}

impl Zone {
    fn tz(&self) -> Result<chrono_tz::Tz, String> {
        self.0
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("unknown time zone `{}`", self.0))
    }
    fn polars(&self) -> Result<polars::prelude::TimeZone, String> {
        let tz = self.tz()?;
        Ok(polars::prelude::TimeZone::from_chrono(&tz))
    }
}

/// `parse_datetime`: text to time-zone-aware datetimes.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParseDatetime {
    /// The text columns to parse (replaced by datetime columns).
    pub columns: Vec<String>,
    /// A strftime format (`%d/%m/%Y %H:%M`). Default: RFC 3339 / ISO 8601, with or without
    /// an offset, `T` or a space between date and time, fractional seconds optional, or a
    /// plain date.
    #[serde(default)]
    pub format: Option<String>,
    /// The zone of values without an offset, which is also the zone of the result
    /// (default `UTC`). Values with an offset keep their instant.
    #[serde(default)]
    pub timezone: Zone,
    /// A wall-clock time that happens twice in `timezone`: `raise` (default), `earliest`,
    /// `latest` or `null`.
    #[serde(default, deserialize_with = "null_or")]
    pub ambiguous: Ambiguous,
    /// A wall-clock time that never happens in `timezone`: `raise` (default) or `null`.
    #[serde(default, deserialize_with = "null_or")]
    pub nonexistent: Nonexistent,
}

/// `convert_timezone`: same instants, shown in another zone.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConvertTimezone {
    /// The datetime columns (they must have a zone; extracted timestamps are UTC).
    pub columns: Vec<String>,
    /// The zone to show them in (`America/Sao_Paulo`).
    pub to: Zone,
}

/// `replace_timezone`: same wall clock, another zone.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceTimezone {
    /// The datetime columns.
    pub columns: Vec<String>,
    /// The zone their wall-clock times are in.
    pub to: Zone,
    /// A wall-clock time that happens twice in `to`: `raise` (default), `earliest`, `latest`
    /// or `null`.
    #[serde(default, deserialize_with = "null_or")]
    pub ambiguous: Ambiguous,
    /// A wall-clock time that never happens in `to`: `raise` (default) or `null`.
    #[serde(default, deserialize_with = "null_or")]
    pub nonexistent: Nonexistent,
}

/// `unnest`: struct columns to one column per field.
#[derive(Debug, Clone, JsonSchema)]
#[schemars(untagged)]
pub enum Unnest {
    /// The struct columns; their fields keep their own names.
    Columns(Vec<String>),
    /// The struct columns and how to name their fields.
    Full(UnnestFull),
}

/// `unnest` with options.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnnestFull {
    /// The struct columns.
    pub columns: Vec<String>,
    /// Name the new columns `parent<separator>field` (default: just the field name).
    #[serde(default)]
    pub separator: Option<String>,
}

impl Unnest {
    fn parts(&self) -> (&[String], Option<&str>) {
        match self {
            Unnest::Columns(c) => (c, None),
            Unnest::Full(f) => (&f.columns, f.separator.as_deref()),
        }
    }
}

impl<'de> Deserialize<'de> for Unnest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unnest, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Unnest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of struct columns, or a map with `columns` and `separator`")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Unnest, A::Error> {
                Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(a))
                    .map(Unnest::Columns)
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Unnest, A::Error> {
                UnnestFull::deserialize(de::value::MapAccessDeserializer::new(a)).map(Unnest::Full)
            }
        }
        d.deserialize_any(V)
    }
}

/// `dedupe`: one row per key.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dedupe {
    /// The columns that identify a row.
    pub keys: Vec<String>,
    /// Keep the row with the greatest value of this column (the latest `updated_at`);
    /// default: the first row. Rows keep their order.
    #[serde(default)]
    pub latest_by: Option<String>,
}

/// `sort`: order the rows (stable: equal rows keep their order).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sort {
    /// The columns to sort by, most significant first.
    pub by: Vec<String>,
    /// Largest first (default: smallest first). Nulls always come last.
    #[serde(default)]
    pub descending: bool,
}

/// How a join combines rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JoinHow {
    /// Only rows with a match on both sides.
    Inner,
    /// Every row of the main table, with the other's columns where they match (default).
    #[default]
    Left,
    /// Every row of both tables.
    #[serde(alias = "outer")]
    Full,
    /// The main table's rows that have a match (no columns added).
    Semi,
    /// The main table's rows that have no match.
    Anti,
}

/// `join`: combine with another input table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Join {
    /// The step id of the other table (it must be in the step's `inputs:`).
    pub with: String,
    /// Key columns with the same name on both sides.
    #[serde(default)]
    pub on: Vec<String>,
    /// Key columns of the main table (with `right_on`, when the names differ).
    #[serde(default)]
    pub left_on: Vec<String>,
    /// Key columns of the other table, in the order of `left_on`.
    #[serde(default)]
    pub right_on: Vec<String>,
    /// `inner`, `left` (default), `full`, `semi` or `anti`.
    #[serde(default)]
    pub how: JoinHow,
    /// Appended to the other table's column names that clash with the main table's
    /// (default `_right`).
    #[serde(default)]
    pub suffix: Option<String>,
}

#[async_trait]
impl StepConfig for Transform {
    const TYPE: &'static str = "transform";
    const SUMMARY: &'static str = "Reshape the input table with typed operations (select, rename, cast, map, filter, derive, time zones, dedupe, join, SQL …)";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: true,
            outputs: Some(vec!["rows".into(), "columns".into()]),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let mut inputs = IndexMap::new();
        for (id, t) in &ctx.inputs {
            let df =
                frame(t).ok_or_else(|| StepError::fatal(format!("input `{id}` is not a table")))?;
            inputs.insert(id.clone(), df.clone());
        }
        if inputs.is_empty() {
            return Err(StepError::fatal(
                "transform needs an input table: name a step in `input:`",
            ));
        }
        let rows_in = inputs[0].height();
        let ops = self.0;
        let n_ops = ops.len();
        let df = tokio::task::spawn_blocking(move || apply(&ops, &inputs))
            .await
            .map_err(|e| StepError::fatal(format!("transform panicked: {e}")))?
            .map_err(StepError::fatal)?;
        let columns: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        ctx.log(
            Level::Info,
            &format!(
                "{n_ops} operations: {rows_in} rows in, {} rows out, {} columns",
                df.height(),
                columns.len()
            ),
        );
        let result = serde_json::json!({ "rows": df.height(), "columns": columns });
        Ok(StepOutput {
            outputs: result.as_object().cloned().unwrap_or_default(),
            result,
            table: Some(table(df)),
            warnings: Vec::new(),
        })
    }
}

/// Apply the operations to the first input (the others are there for `join` and `sql`).
pub fn apply(ops: &[Op], inputs: &IndexMap<String, DataFrame>) -> Result<DataFrame, String> {
    let main = inputs
        .get_index(0)
        .map(|(_, df)| df.clone())
        .ok_or("transform needs an input table")?;
    let mut lf = main.clone().lazy();
    for (i, op) in ops.iter().enumerate() {
        lf = plan(i, op, lf, inputs)?;
    }
    match lf.collect() {
        Ok(df) => Ok(df),
        Err(e) => {
            // Find the operation that fails: run them again one at a time.
            let mut df = main;
            for (i, op) in ops.iter().enumerate() {
                let lf = plan(i, op, df.lazy(), inputs)?;
                df = lf
                    .collect()
                    .map_err(|e| op_error(i, op, polars_message(&e)))?;
            }
            Err(format!(
                "running the operations failed: {}",
                polars_message(&e)
            ))
        }
    }
}

fn op_error(i: usize, op: &Op, message: impl fmt::Display) -> String {
    format!("operation {} (`{}`): {message}", i + 1, op.kind())
}

/// A Polars error without the query plan it may append.
fn polars_message(e: &PolarsError) -> String {
    let s = e.to_string();
    let s = s.split("\n\n").next().unwrap_or(&s).trim();
    s.to_string()
}

fn column_list(schema: &Schema) -> String {
    schema
        .iter_names()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn missing(schema: &Schema, name: &str) -> String {
    let hint = engine::diag::did_you_mean(name, schema.iter_names().map(|n| n.as_str()))
        .map(|n| format!(" (did you mean `{n}`?)"))
        .unwrap_or_default();
    format!(
        "column `{name}` not found{hint}; the columns here are: {}",
        column_list(schema)
    )
}

/// The type of `name`, or the "not found" error listing the columns.
fn dtype_of<'a>(schema: &'a Schema, name: &str) -> Result<&'a DataType, String> {
    schema.get(name).ok_or_else(|| missing(schema, name))
}

fn need<'a>(schema: &Schema, names: impl IntoIterator<Item = &'a String>) -> Result<(), String> {
    for n in names {
        dtype_of(schema, n)?;
    }
    Ok(())
}

fn parse_sql_expr(text: &str, schema: &Schema) -> Result<Expr, String> {
    let expr = polars::sql::sql_expr(text)
        .map_err(|e| format!("invalid SQL expression `{text}`: {}", polars_message(&e)))?;
    for name in expr.clone().meta().root_names() {
        if !schema.contains(name.as_str()) {
            return Err(format!("in `{text}`: {}", missing(schema, &name)));
        }
    }
    Ok(expr)
}

/// Add operation `i` to the plan; the resulting schema is resolved so that errors name the
/// operation.
fn plan(
    i: usize,
    op: &Op,
    mut lf: LazyFrame,
    inputs: &IndexMap<String, DataFrame>,
) -> Result<LazyFrame, String> {
    let fail = |m: String| op_error(i, op, m);
    let schema = lf.collect_schema().map_err(|e| fail(polars_message(&e)))?;
    let mut out = plan_op(op, lf, &schema, inputs).map_err(fail)?;
    out.collect_schema()
        .map_err(|e| op_error(i, op, polars_message(&e)))?;
    Ok(out)
}

fn plan_op(
    op: &Op,
    lf: LazyFrame,
    schema: &Schema,
    inputs: &IndexMap<String, DataFrame>,
) -> Result<LazyFrame, String> {
    Ok(match op {
        Op::Select(columns) => {
            need(schema, columns)?;
            lf.select(columns.iter().map(|c| col(c.as_str())).collect::<Vec<_>>())
        }
        Op::Drop(columns) => {
            need(schema, columns)?;
            lf.drop(cols(columns.iter().map(String::as_str)))
        }
        Op::Rename(map) => {
            need(schema, map.keys())?;
            lf.rename(map.keys(), map.values(), true)
        }
        Op::Cast(map) => {
            let mut exprs = Vec::new();
            for (c, t) in map {
                let dtype = dtype_of(schema, c)?;
                exprs.push(cast_expr(c, dtype, *t)?.alias(c.as_str()));
            }
            lf.with_columns(exprs)
        }
        Op::Map(m) => {
            let dtype = dtype_of(schema, &m.column)?;
            let into = m.into.as_deref().unwrap_or(&m.column);
            lf.with_column(map_expr(m, dtype)?.alias(into))
        }
        Op::FillNull(map) => {
            let mut exprs = Vec::new();
            for (c, v) in map {
                let dtype = dtype_of(schema, c)?;
                exprs.push(
                    col(c.as_str())
                        .fill_null(v.lit().strict_cast(dtype.clone()))
                        .alias(c.as_str()),
                );
            }
            lf.with_columns(exprs)
        }
        Op::Filter(text) => lf.filter(parse_sql_expr(text, schema)?),
        Op::Derive(map) => {
            let mut lf = lf;
            let mut schema = schema.clone();
            for (name, text) in map {
                let expr = parse_sql_expr(text, &schema)?;
                lf = lf.with_column(expr.alias(name.as_str()));
                schema = (*lf
                    .collect_schema()
                    .map_err(|e| format!("in `{text}`: {}", polars_message(&e)))?)
                .clone();
            }
            lf
        }
        Op::ParseDatetime(p) => {
            let tz = p.timezone.polars()?;
            let chrono_tz = p.timezone.tz()?;
            let mut exprs = Vec::new();
            for c in &p.columns {
                let e = match dtype_of(schema, c)? {
                    DataType::String => parse_datetime_expr(c, p, chrono_tz, tz.clone()),
                    DataType::Datetime(_, Some(_)) => col(c.as_str()),
                    DataType::Datetime(_, None) => col(c.as_str()).dt().replace_time_zone(
                        Some(tz.clone()),
                        lit(p.ambiguous.as_str()),
                        non_existent(p.nonexistent),
                    ),
                    DataType::Date => col(c.as_str())
                        .cast(DataType::Datetime(TimeUnit::Microseconds, None))
                        .dt()
                        .replace_time_zone(
                            Some(tz.clone()),
                            lit(p.ambiguous.as_str()),
                            non_existent(p.nonexistent),
                        ),
                    other => return Err(format!("column `{c}` is {other}, not text to parse")),
                };
                exprs.push(e.alias(c.as_str()));
            }
            lf.with_columns(exprs)
        }
        Op::ConvertTimezone(z) => {
            let tz = z.to.polars()?;
            let mut exprs = Vec::new();
            for c in &z.columns {
                match dtype_of(schema, c)? {
                    DataType::Datetime(_, Some(_)) => {}
                    DataType::Datetime(_, None) => {
                        return Err(format!(
                            "column `{c}` has no time zone, so its instants are unknown; use \
                             `replace_timezone` to say which zone its wall-clock times are in"
                        ))
                    }
                    DataType::String => {
                        return Err(format!("column `{c}` is text; use `parse_datetime` first"))
                    }
                    other => return Err(format!("column `{c}` is {other}, not a datetime")),
                }
                exprs.push(
                    col(c.as_str())
                        .dt()
                        .convert_time_zone(tz.clone())
                        .alias(c.as_str()),
                );
            }
            lf.with_columns(exprs)
        }
        Op::ReplaceTimezone(z) => {
            let tz = z.to.polars()?;
            let mut exprs = Vec::new();
            for c in &z.columns {
                match dtype_of(schema, c)? {
                    DataType::Datetime(_, _) => {}
                    DataType::String => {
                        return Err(format!(
                            "column `{c}` is text; use `parse_datetime` with `timezone`"
                        ))
                    }
                    other => return Err(format!("column `{c}` is {other}, not a datetime")),
                }
                exprs.push(
                    col(c.as_str())
                        .dt()
                        .replace_time_zone(
                            Some(tz.clone()),
                            lit(z.ambiguous.as_str()),
                            non_existent(z.nonexistent),
                        )
                        .alias(c.as_str()),
                );
            }
            lf.with_columns(exprs)
        }
        Op::Unnest(u) => {
            let (columns, separator) = u.parts();
            let mut fields = IndexMap::new();
            for c in columns {
                match dtype_of(schema, c)? {
                    DataType::Struct(f) => {
                        fields.insert(c.as_str(), f.clone());
                    }
                    other => return Err(format!("column `{c}` is {other}, not a struct")),
                }
            }
            let mut exprs = Vec::new();
            for name in schema.iter_names() {
                match fields.get(name.as_str()) {
                    Some(fs) => {
                        for f in fs {
                            let new = match separator {
                                Some(sep) => format!("{name}{sep}{}", f.name()),
                                None => f.name().to_string(),
                            };
                            exprs.push(
                                col(name.clone())
                                    .struct_()
                                    .field_by_name(f.name())
                                    .alias(new),
                            );
                        }
                    }
                    None => exprs.push(col(name.clone())),
                }
            }
            lf.select(exprs)
        }
        Op::Explode(columns) => {
            for c in columns {
                match dtype_of(schema, c)? {
                    DataType::List(_) => {}
                    DataType::String => {
                        return Err(format!(
                            "column `{c}` is text, not a list (http.extract stores arrays as \
                             JSON text)"
                        ))
                    }
                    other => return Err(format!("column `{c}` is {other}, not a list")),
                }
            }
            lf.explode(cols(columns.iter().map(String::as_str)))
        }
        Op::Dedupe(d) => {
            need(schema, &d.keys)?;
            const ROW: &str = "__pipe_row";
            let keys = cols(d.keys.iter().map(String::as_str));
            match &d.latest_by {
                None => lf.unique_stable(Some(keys), UniqueKeepStrategy::First),
                Some(by) => {
                    dtype_of(schema, by)?;
                    lf.with_row_index(ROW, None)
                        .sort(
                            [by.as_str()],
                            SortMultipleOptions {
                                descending: vec![true],
                                nulls_last: vec![true],
                                maintain_order: true,
                                ..Default::default()
                            },
                        )
                        .unique_stable(Some(keys), UniqueKeepStrategy::First)
                        .sort([ROW], SortMultipleOptions::default())
                        .drop(cols([ROW]))
                }
            }
        }
        Op::Sort(s) => {
            need(schema, &s.by)?;
            let n = s.by.len();
            lf.sort(
                s.by.iter().map(String::as_str).collect::<Vec<_>>(),
                SortMultipleOptions {
                    descending: vec![s.descending; n],
                    nulls_last: vec![true; n],
                    maintain_order: true,
                    ..Default::default()
                },
            )
        }
        Op::Join(j) => {
            let other = inputs.get(&j.with).ok_or_else(|| {
                format!(
                    "no input table `{}`; the inputs are: {} (name the step in `inputs:`)",
                    j.with,
                    inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            let (left_on, right_on) =
                match (j.on.is_empty(), j.left_on.is_empty(), j.right_on.is_empty()) {
                    (false, true, true) => (&j.on, &j.on),
                    (true, false, false) if j.left_on.len() == j.right_on.len() => {
                        (&j.left_on, &j.right_on)
                    }
                    (true, false, false) => {
                        return Err(
                            "`left_on` and `right_on` need the same number of columns".into()
                        )
                    }
                    _ => {
                        return Err(
                            "give the key columns as `on`, or as both `left_on` and `right_on`"
                                .into(),
                        )
                    }
                };
            need(schema, left_on)?;
            let other_schema = other.schema();
            for c in right_on {
                if !other_schema.contains(c) {
                    return Err(format!("in `{}`: {}", j.with, missing(other_schema, c)));
                }
            }
            let how = match j.how {
                JoinHow::Inner => JoinType::Inner,
                JoinHow::Left => JoinType::Left,
                JoinHow::Full => JoinType::Full,
                JoinHow::Semi => JoinType::Semi,
                JoinHow::Anti => JoinType::Anti,
            };
            let mut args = JoinArgs::new(how);
            args.maintain_order = match j.how {
                JoinHow::Full => MaintainOrderJoin::LeftRight,
                _ => MaintainOrderJoin::Left,
            };
            if j.how == JoinHow::Full && !j.on.is_empty() {
                args.coalesce = JoinCoalesce::CoalesceColumns;
            }
            args.suffix = Some(j.suffix.as_deref().unwrap_or("_right").into());
            let l: Vec<Expr> = left_on.iter().map(|c| col(c.as_str())).collect();
            let r: Vec<Expr> = right_on.iter().map(|c| col(c.as_str())).collect();
            lf.join(other.clone().lazy(), l, r, args)
        }
        Op::Sql(query) => {
            let mut ctx = polars::sql::SQLContext::new();
            ctx.register("input", lf);
            for (id, df) in inputs {
                ctx.register(id, df.clone().lazy());
            }
            ctx.execute(query).map_err(|e| {
                format!(
                    "{} (the tables are: input, {}; the columns of `input` are: {})",
                    polars_message(&e),
                    inputs.keys().cloned().collect::<Vec<_>>().join(", "),
                    column_list(schema)
                )
            })?
        }
    })
}

fn non_existent(n: Nonexistent) -> NonExistent {
    match n {
        Nonexistent::Raise => NonExistent::Raise,
        Nonexistent::Null => NonExistent::Null,
    }
}

fn cast_expr(c: &str, from: &DataType, to: CastType) -> Result<Expr, String> {
    let e = col(c);
    Ok(match (to, from) {
        (CastType::String, _) => e.strict_cast(DataType::String),
        (CastType::Integer, _) => e.strict_cast(DataType::Int64),
        (CastType::Float, _) => e.strict_cast(DataType::Float64),
        (CastType::Boolean, DataType::String) => {
            let words = Series::new(
                "from".into(),
                ["true", "false", "1", "0", "yes", "no", "t", "f", "y", "n"],
            );
            let values = Series::new(
                "to".into(),
                [
                    true, false, true, false, true, false, true, false, true, false,
                ],
            );
            e.str()
                .to_lowercase()
                .str()
                .strip_chars(lit(NULL))
                .replace_strict(lit(words), lit(values), None, Some(DataType::Boolean))
        }
        (CastType::Boolean, _) => e.strict_cast(DataType::Boolean),
        (CastType::Date, DataType::String) => e.str().to_date(StrptimeOptions::default()),
        (CastType::Date, _) => e.strict_cast(DataType::Date),
        (CastType::Datetime, DataType::String) => {
            let p = ParseDatetime {
                columns: vec![c.to_string()],
                format: None,
                timezone: Zone::default(),
                ambiguous: Ambiguous::Raise,
                nonexistent: Nonexistent::Raise,
            };
            parse_datetime_expr(c, &p, chrono_tz::UTC, polars::prelude::TimeZone::UTC)
        }
        (CastType::Datetime, DataType::Datetime(_, Some(_))) => e
            .strict_cast(DataType::Datetime(TimeUnit::Microseconds, None))
            .dt()
            .replace_time_zone(
                Some(polars::prelude::TimeZone::UTC),
                lit("raise"),
                NonExistent::Raise,
            ),
        (CastType::Datetime, DataType::Date | DataType::Datetime(_, None)) => e
            .strict_cast(DataType::Datetime(TimeUnit::Microseconds, None))
            .dt()
            .replace_time_zone(
                Some(polars::prelude::TimeZone::UTC),
                lit("raise"),
                NonExistent::Raise,
            ),
        (CastType::Datetime, _) => e.strict_cast(DataType::Datetime(
            TimeUnit::Microseconds,
            Some(polars::prelude::TimeZone::UTC),
        )),
    })
}

/// The `map` lookup as an expression: keys are converted to the column's type (numbers,
/// booleans) or compared as text.
fn map_expr(m: &MapOp, dtype: &DataType) -> Result<Expr, String> {
    let keys: Vec<&String> = m.values.keys().collect();
    let (column, old) = if dtype.is_integer() {
        let k = keys
            .iter()
            .map(|k| {
                k.trim().parse::<i64>().map_err(|_| {
                    format!(
                        "key `{k}` of `values` is not an integer, but `{}` is {dtype}",
                        m.column
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        (
            col(m.column.as_str()).strict_cast(DataType::Int64),
            Series::new("from".into(), k),
        )
    } else if dtype.is_float() {
        let k = keys
            .iter()
            .map(|k| {
                k.trim().parse::<f64>().map_err(|_| {
                    format!(
                        "key `{k}` of `values` is not a number, but `{}` is {dtype}",
                        m.column
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        (
            col(m.column.as_str()).strict_cast(DataType::Float64),
            Series::new("from".into(), k),
        )
    } else if dtype.is_bool() {
        let k = keys
            .iter()
            .map(|k| match k.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!(
                    "key `{k}` of `values` is not `true` or `false`, but `{}` is boolean",
                    m.column
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        (col(m.column.as_str()), Series::new("from".into(), k))
    } else {
        let k: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        (
            col(m.column.as_str()).cast(DataType::String),
            Series::new("from".into(), k),
        )
    };
    let all: Vec<&Scalar> = m.values.values().chain(m.default.as_ref()).collect();
    let out = common_dtype(all.iter().copied());
    let values: Vec<&Scalar> = m.values.values().collect();
    let new = scalars_series("to", &values, &out);
    let default = match &m.default {
        Some(d) => lit(scalars_series("default", &[d], &out)).first(),
        None => lit(NULL).cast(out.clone()),
    };
    // Nulls are not in the table: they take the default too.
    Ok(when(column.clone().is_null())
        .then(default.clone())
        .otherwise(column.replace_strict(lit(old), lit(new), Some(default), Some(out))))
}

/// Parse a text column with chrono: values with an offset keep their instant, the others
/// are wall-clock times in `tz` (DST-aware, with the ambiguous/nonexistent policy).
fn parse_datetime_expr(
    c: &str,
    p: &ParseDatetime,
    tz: chrono_tz::Tz,
    ptz: polars::prelude::TimeZone,
) -> Expr {
    let format = p.format.clone();
    let ambiguous = p.ambiguous;
    let nonexistent = p.nonexistent;
    let name = c.to_string();
    let out = DataType::Datetime(TimeUnit::Microseconds, Some(ptz.clone()));
    col(c).map(
        move |column: Column| {
            let ca = column.str()?;
            let mut micros: Vec<Option<i64>> = Vec::with_capacity(ca.len());
            for v in ca.into_iter() {
                micros.push(match v {
                    None => None,
                    Some(s) => {
                        parse_one(s.trim(), format.as_deref(), tz, ambiguous, nonexistent)
                            .map_err(|m| polars_err!(ComputeError: "column `{}`: {}", name, m))?
                    }
                });
            }
            Ok(Int64Chunked::new(column.name().clone(), micros)
                .into_datetime(TimeUnit::Microseconds, Some(ptz.clone()))
                .into_column())
        },
        move |_, f| Ok(Field::new(f.name().clone(), out.clone())),
    )
}

const NAIVE_FORMATS: &[&str] = &[
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
];

/// One value to UTC microseconds (`None` when it is null by policy).
fn parse_one(
    s: &str,
    format: Option<&str>,
    tz: chrono_tz::Tz,
    ambiguous: Ambiguous,
    nonexistent: Nonexistent,
) -> Result<Option<i64>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let naive = match format {
        Some(f) => {
            if let Ok(dt) = DateTime::parse_from_str(s, f) {
                return Ok(Some(dt.timestamp_micros()));
            }
            NaiveDateTime::parse_from_str(s, f)
                .ok()
                .or_else(|| {
                    NaiveDate::parse_from_str(s, f)
                        .ok()
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                })
                .ok_or_else(|| format!("cannot read `{s}` with format `{f}`"))?
        }
        None => {
            if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                return Ok(Some(dt.timestamp_micros()));
            }
            for f in [
                "%Y-%m-%d %H:%M:%S%.f%:z",
                "%Y-%m-%d %H:%M:%S%.f%z",
                "%Y-%m-%dT%H:%M:%S%.f%z",
            ] {
                if let Ok(dt) = DateTime::parse_from_str(s, f) {
                    return Ok(Some(dt.timestamp_micros()));
                }
            }
            NAIVE_FORMATS
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
                .or_else(|| {
                    NaiveDate::parse_from_str(s, "%Y-%m-%d")
                        .ok()
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                })
                .ok_or_else(|| {
                    format!("cannot read `{s}` as an RFC 3339 / ISO 8601 datetime or date")
                })?
        }
    };
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(dt) => Ok(Some(dt.timestamp_micros())),
        LocalResult::Ambiguous(a, b) => match ambiguous {
            Ambiguous::Raise => Err(format!(
                "`{s}` happens twice in {} (DST ends); set `ambiguous` to earliest, latest or null",
                tz.name()
            )),
            Ambiguous::Earliest => Ok(Some(a.timestamp_micros())),
            Ambiguous::Latest => Ok(Some(b.timestamp_micros())),
            Ambiguous::Null => Ok(None),
        },
        LocalResult::None => match nonexistent {
            Nonexistent::Raise => Err(format!(
                "`{s}` does not exist in {} (skipped when DST starts); set `nonexistent: null`",
                tz.name()
            )),
            Nonexistent::Null => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::de::{from_node, Mode};
    use engine::diag::Diags;
    use engine::events::{Observer, RunEvent};
    use engine::secrets::Redactor;
    use std::sync::Arc;

    struct Quiet;
    impl Observer for Quiet {
        fn event(&self, _: &RunEvent) {}
    }

    /// Parse a `with:` list the way the executor does after rendering.
    fn cfg(yaml: &str) -> Transform {
        let mut d = Diags::new("t.yaml");
        let node = engine::yaml::parse(yaml, &mut d).unwrap();
        let c = from_node::<Transform>(&node, Mode::Run, &mut d);
        assert!(
            d.items.is_empty(),
            "{:?}",
            d.items.iter().map(|i| &i.message).collect::<Vec<_>>()
        );
        c.unwrap()
    }

    /// Check-mode problems (what `pipe validate` reports).
    fn check(yaml: &str) -> (Option<Transform>, Vec<String>) {
        let mut d = Diags::new("t.yaml");
        let node = engine::yaml::parse(yaml, &mut d).unwrap();
        let c = from_node::<Transform>(&node, Mode::Check, &mut d);
        (c, d.items.iter().map(|i| i.message.clone()).collect())
    }

    async fn run_with(
        yaml: &str,
        inputs: &[(&str, DataFrame)],
    ) -> Result<(DataFrame, StepOutput), String> {
        let mut ctx = StepContext::new(
            "clean",
            1,
            Arc::new(Quiet),
            Redactor::new(),
            "/tmp".into(),
            "/tmp".into(),
        );
        for (id, df) in inputs {
            ctx.inputs.insert(id.to_string(), table(df.clone()));
        }
        let mut out = cfg(yaml).run(ctx).await.map_err(|e| e.message)?;
        let df = frame(out.table.as_ref().unwrap()).unwrap().clone();
        out.table = None;
        Ok((df, out))
    }

    async fn run(yaml: &str, df: DataFrame) -> Result<DataFrame, String> {
        run_with(yaml, &[("tickets", df)]).await.map(|(df, _)| df)
    }

    fn micros(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros()
    }

    fn utc(name: &str, values: &[Option<&str>]) -> Column {
        Int64Chunked::new(
            name.into(),
            values.iter().map(|v| v.map(micros)).collect::<Vec<_>>(),
        )
        .into_datetime(TimeUnit::Microseconds, Some(polars::prelude::TimeZone::UTC))
        .into_column()
    }

    /// A table shaped like http.extract's tickets.
    fn tickets() -> DataFrame {
        DataFrame::new(vec![
            Column::new("ticket_number".into(), [101i64, 102, 103, 104, 105]),
            Column::new(
                "title".into(),
                ["Printer", "VPN", "Email", "Laptop", "Chair"],
            ),
            Column::new(
                "status_id".into(),
                [Some(1i64), Some(2), Some(3), Some(4), Some(9)],
            ),
            Column::new(
                "status_name".into(),
                ["open", "working", "done", "cancelled", "odd"],
            ),
            Column::new(
                "worked_hours".into(),
                [Some(1.5f64), None, Some(0.0), Some(3.0), Some(2.0)],
            ),
            utc(
                "created_at",
                &[
                    Some("2018-01-15T12:00:00Z"),
                    Some("2018-06-15T12:00:00Z"),
                    Some("2018-11-04T03:30:00Z"),
                    Some("2018-11-04T02:30:00Z"),
                    Some("2024-05-01T12:30:00Z"),
                ],
            ),
            utc(
                "updated_at",
                &[
                    Some("2018-01-16T12:00:00Z"),
                    Some("2018-06-16T12:00:00Z"),
                    Some("2018-11-05T12:00:00Z"),
                    Some("2018-11-05T12:00:00Z"),
                    Some("2024-05-02T12:00:00Z"),
                ],
            ),
            utc(
                "closed_at",
                &[
                    None,
                    None,
                    Some("2018-11-06T12:00:00Z"),
                    Some("2018-11-06T12:00:00Z"),
                    None,
                ],
            ),
        ])
        .unwrap()
    }

    fn strs(df: &DataFrame, c: &str) -> Vec<Option<String>> {
        df.column(c)
            .unwrap()
            .cast(&DataType::String)
            .unwrap()
            .str()
            .unwrap()
            .into_iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    fn ints(df: &DataFrame, c: &str) -> Vec<Option<i64>> {
        df.column(c).unwrap().i64().unwrap().into_iter().collect()
    }

    fn names(df: &DataFrame) -> Vec<String> {
        df.get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    /// Datetimes formatted in their own zone, with the offset.
    fn local(df: &DataFrame, c: &str) -> Vec<Option<String>> {
        let out = df
            .clone()
            .lazy()
            .select([col(c).dt().strftime("%Y-%m-%dT%H:%M:%S%:z")])
            .collect()
            .unwrap();
        strs(&out, c)
    }

    fn some(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some(s.to_string())).collect()
    }

    #[tokio::test]
    async fn the_sketch_clean_step() {
        let yaml = r#"
- rename: { ticket_number: numero, title: titulo, created_at: criado_em, updated_at: atualizado_em, closed_at: fechado_em }
- map: { column: status_id, into: situacao, values: { 1: Aberto, 2: Em atendimento, 3: Resolvido, 4: Cancelado }, default: Outro }
- convert_timezone: { columns: [criado_em, atualizado_em, fechado_em], to: America/Sao_Paulo }
"#;
        let (df, out) = run_with(yaml, &[("tickets", tickets())]).await.unwrap();
        assert_eq!(
            names(&df),
            [
                "numero",
                "titulo",
                "status_id",
                "status_name",
                "worked_hours",
                "criado_em",
                "atualizado_em",
                "fechado_em",
                "situacao"
            ]
        );
        assert_eq!(
            strs(&df, "situacao"),
            some(&[
                "Aberto",
                "Em atendimento",
                "Resolvido",
                "Cancelado",
                "Outro"
            ])
        );
        assert_eq!(
            ints(&df, "status_id"),
            [Some(1), Some(2), Some(3), Some(4), Some(9)]
        );
        for c in ["criado_em", "atualizado_em", "fechado_em"] {
            assert_eq!(
                df.column(c).unwrap().dtype(),
                &DataType::Datetime(
                    TimeUnit::Microseconds,
                    Some(polars::prelude::TimeZone::from_chrono(
                        &chrono_tz::America::Sao_Paulo
                    ))
                )
            );
        }
        // The instants are unchanged, only the zone.
        assert_eq!(
            df.column("criado_em")
                .unwrap()
                .datetime()
                .unwrap()
                .physical()
                .get(0),
            Some(micros("2018-01-15T12:00:00Z"))
        );
        assert_eq!(local(&df, "fechado_em")[0], None);
        assert_eq!(out.outputs["rows"], serde_json::json!(5));
        assert_eq!(out.outputs["columns"][0], serde_json::json!("numero"));
    }

    #[tokio::test]
    async fn sao_paulo_historical_dst() {
        let df = run(
            "- convert_timezone: { columns: [created_at], to: America/Sao_Paulo }\n",
            tickets(),
        )
        .await
        .unwrap();
        assert_eq!(
            local(&df, "created_at"),
            some(&[
                "2018-01-15T10:00:00-02:00", // summer time (DST)
                "2018-06-15T09:00:00-03:00", // winter
                "2018-11-04T01:30:00-02:00", // DST began at 03:00Z: 00:00 became 01:00
                "2018-11-03T23:30:00-03:00", // just before it
                "2024-05-01T09:30:00-03:00", // no DST since 2019
            ])
        );
        // The wall clock 2018-11-04 00:30 never happened in São Paulo.
        let naive = DataFrame::new(vec![Column::new(
            "t".into(),
            ["2018-11-04 00:30:00", "2018-01-15 10:00:00"],
        )])
        .unwrap();
        let err = run(
            "- parse_datetime: { columns: [t], timezone: America/Sao_Paulo }\n",
            naive.clone(),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("operation 1 (`parse_datetime`)") && err.contains("does not exist"),
            "{err}"
        );
        let df = run(
            "- parse_datetime: { columns: [t], timezone: America/Sao_Paulo, nonexistent: null }\n",
            naive.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            local(&df, "t"),
            [None, Some("2018-01-15T10:00:00-02:00".into())]
        );
        // Same through replace_timezone on a naive datetime column.
        let df = run("- parse_datetime: { columns: [t], nonexistent: null }\n- replace_timezone: { columns: [t], to: America/Sao_Paulo }\n", naive.clone()).await;
        assert!(df.unwrap_err().contains("operation 2 (`replace_timezone`)"));
        // DST ended 2018-02-18 00:00 -02 → 2018-02-17 23:00 -03: 23:30 happened twice.
        let amb = DataFrame::new(vec![Column::new("t".into(), ["2018-02-17T23:30:00"])]).unwrap();
        let err = run(
            "- parse_datetime: { columns: [t], timezone: America/Sao_Paulo }\n",
            amb.clone(),
        )
        .await
        .unwrap_err();
        assert!(err.contains("happens twice"), "{err}");
        let df = run("- parse_datetime: { columns: [t], timezone: America/Sao_Paulo, ambiguous: earliest }\n", amb.clone()).await.unwrap();
        assert_eq!(local(&df, "t"), some(&["2018-02-17T23:30:00-02:00"]));
        let df = run(
            "- parse_datetime: { columns: [t], timezone: America/Sao_Paulo, ambiguous: latest }\n",
            amb,
        )
        .await
        .unwrap();
        assert_eq!(local(&df, "t"), some(&["2018-02-17T23:30:00-03:00"]));
    }

    #[tokio::test]
    async fn parse_datetime_formats_and_replace_timezone() {
        let df = DataFrame::new(vec![
            Column::new(
                "a".into(),
                [
                    Some("2024-05-01T09:30:00-03:00"),
                    Some("2024-05-01 12:30:00.250Z"),
                    Some("2024-05-01"),
                    None,
                ],
            ),
            Column::new(
                "b".into(),
                [
                    Some("01/05/2024 09:30"),
                    Some("15/01/2018 10:00"),
                    None,
                    None,
                ],
            ),
        ])
        .unwrap();
        let out = run(
            "- parse_datetime: { columns: [a] }\n- parse_datetime: { columns: [b], format: '%d/%m/%Y %H:%M', timezone: America/Sao_Paulo }\n- convert_timezone: { columns: [b], to: UTC }\n",
            df,
        )
        .await
        .unwrap();
        assert_eq!(
            local(&out, "a"),
            [
                Some("2024-05-01T12:30:00+00:00".into()),
                Some("2024-05-01T12:30:00+00:00".into()),
                Some("2024-05-01T00:00:00+00:00".into()),
                None
            ]
        );
        assert_eq!(
            local(&out, "b")[..2],
            some(&["2024-05-01T12:30:00+00:00", "2018-01-15T12:00:00+00:00"])
        );
        let bad = DataFrame::new(vec![Column::new("a".into(), ["yesterday"])]).unwrap();
        let err = run("- select: [a]\n- parse_datetime: { columns: [a] }\n", bad)
            .await
            .unwrap_err();
        assert!(
            err.contains("operation 2 (`parse_datetime`)") && err.contains("yesterday"),
            "{err}"
        );
        // replace_timezone keeps the wall clock.
        let out = run(
            "- replace_timezone: { columns: [created_at], to: America/Sao_Paulo }\n",
            tickets(),
        )
        .await
        .unwrap();
        assert_eq!(
            local(&out, "created_at")[1],
            Some("2018-06-15T12:00:00-03:00".into())
        );
        // convert_timezone refuses text.
        let err = run(
            "- convert_timezone: { columns: [title], to: UTC }\n",
            tickets(),
        )
        .await
        .unwrap_err();
        assert!(err.contains("parse_datetime"), "{err}");
    }

    #[tokio::test]
    async fn select_drop_rename_cast() {
        // Text that is not a number fails the cast, which names its operation.
        let err = run("- select: [title]\n- cast: { title: integer }\n", tickets())
            .await
            .unwrap_err();
        assert!(err.starts_with("operation 2 (`cast`)"), "{err}");
        let df = run("- select: [title, ticket_number]\n- drop: [title]\n- rename: { ticket_number: id }\n- cast: { id: string }\n", tickets()).await.unwrap();
        assert_eq!(names(&df), ["id"]);
        assert_eq!(df.column("id").unwrap().dtype(), &DataType::String);
        let text = DataFrame::new(vec![
            Column::new("n".into(), ["1", "2"]),
            Column::new("x".into(), ["1.5", "2"]),
            Column::new("b".into(), ["yes", "False"]),
            Column::new("d".into(), ["2024-01-31", "2024-02-01"]),
            Column::new(
                "t".into(),
                ["2024-01-31T10:00:00-03:00", "2024-02-01 00:00:00"],
            ),
        ])
        .unwrap();
        let df = run(
            "- cast: { n: int64, x: float, b: boolean, d: date, t: datetime }\n",
            text,
        )
        .await
        .unwrap();
        assert_eq!(ints(&df, "n"), [Some(1), Some(2)]);
        assert_eq!(df.column("x").unwrap().f64().unwrap().get(0), Some(1.5));
        assert_eq!(
            df.column("b")
                .unwrap()
                .bool()
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [Some(true), Some(false)]
        );
        assert_eq!(df.column("d").unwrap().dtype(), &DataType::Date);
        assert_eq!(
            local(&df, "t"),
            some(&["2024-01-31T13:00:00+00:00", "2024-02-01T00:00:00+00:00"])
        );
    }

    #[tokio::test]
    async fn map_matches_keys_whatever_the_type() {
        let df = DataFrame::new(vec![
            Column::new("i".into(), [Some(1i64), Some(2), None, Some(7)]),
            Column::new("f".into(), [Some(1.0f64), Some(2.5), None, Some(3.0)]),
            Column::new("s".into(), [Some("a"), Some("b"), None, Some("z")]),
            Column::new("b".into(), [Some(true), Some(false), None, Some(true)]),
        ])
        .unwrap();
        let yaml = r#"
- map: { column: i, values: { 1: one, 2: two } }
- map: { column: f, into: f2, values: { 1: 10, "2.5": 25 }, default: 0 }
- map: { column: s, values: { a: 1.5, b: 2 }, default: -1 }
- map: { column: b, into: yes, values: { true: Y, false: N }, default: "?" }
"#;
        let out = run(yaml, df).await.unwrap();
        assert_eq!(
            strs(&out, "i"),
            [Some("one".into()), Some("two".into()), None, None]
        );
        assert_eq!(ints(&out, "f2"), [Some(10), Some(25), Some(0), Some(0)]);
        assert_eq!(out.column("f").unwrap().dtype(), &DataType::Float64);
        assert_eq!(
            out.column("s")
                .unwrap()
                .f64()
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [Some(1.5), Some(2.0), Some(-1.0), Some(-1.0)]
        );
        assert_eq!(strs(&out, "yes"), some(&["Y", "N", "?", "Y"]));
        let err = run(
            "- map: { column: status_id, values: { open: 1 } }\n",
            tickets(),
        )
        .await
        .unwrap_err();
        assert!(err.contains("not an integer"), "{err}");
    }

    #[tokio::test]
    async fn fill_null_filter_derive() {
        let yaml = r#"
- fill_null: { worked_hours: 0, status_name: none }
- derive: { minutes: "worked_hours * 60", long: "minutes > 100" }
- filter: "status_id IN (1, 2, 4) AND worked_hours >= 0 AND title <> 'VPN'"
"#;
        let df = run(yaml, tickets()).await.unwrap();
        assert_eq!(ints(&df, "ticket_number"), [Some(101), Some(104)]);
        assert_eq!(
            df.column("minutes")
                .unwrap()
                .f64()
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [Some(90.0), Some(180.0)]
        );
        assert_eq!(
            df.column("long")
                .unwrap()
                .bool()
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [Some(false), Some(true)]
        );
        assert_eq!(
            df.column("worked_hours").unwrap().dtype(),
            &DataType::Float64
        );
        let err = run("- filter: \"status_id IN (1, 2\"\n", tickets())
            .await
            .unwrap_err();
        assert!(
            err.starts_with("operation 1 (`filter`): invalid SQL expression"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unknown_column_names_the_operation_and_lists_the_columns() {
        let err = run(
            "- rename: { title: titulo }\n- filter: \"title = 'VPN'\"\n",
            tickets(),
        )
        .await
        .unwrap_err();
        assert!(err.starts_with("operation 2 (`filter`)"), "{err}");
        assert!(
            err.contains("column `title` not found (did you mean `titulo`?)"),
            "{err}"
        );
        assert!(
            err.contains("the columns here are: ticket_number, titulo, status_id, status_name, worked_hours, created_at, updated_at, closed_at"),
            "{err}"
        );
        let err = run(
            "- select: [ticket_number]\n- sort: { by: [created_at] }\n",
            tickets(),
        )
        .await
        .unwrap_err();
        assert_eq!(err, "operation 2 (`sort`): column `created_at` not found; the columns here are: ticket_number");
        let err = run("- map: { column: status, values: { 1: a } }\n", tickets())
            .await
            .unwrap_err();
        assert!(
            err.contains("operation 1 (`map`): column `status` not found"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn dedupe_keeps_the_latest_and_sort() {
        let df = DataFrame::new(vec![
            Column::new("id".into(), [1i64, 2, 1, 3, 2]),
            Column::new("v".into(), ["a1", "b1", "a2", "c1", "b0"]),
            utc(
                "updated_at",
                &[
                    Some("2024-01-01T00:00:00Z"),
                    Some("2024-01-02T00:00:00Z"),
                    Some("2024-01-03T00:00:00Z"),
                    Some("2024-01-01T00:00:00Z"),
                    None,
                ],
            ),
        ])
        .unwrap();
        let out = run(
            "- dedupe: { keys: [id], latest_by: updated_at }\n",
            df.clone(),
        )
        .await
        .unwrap();
        assert_eq!(names(&out), ["id", "v", "updated_at"]);
        assert_eq!(strs(&out, "v"), some(&["b1", "a2", "c1"]));
        let out = run(
            "- dedupe: { keys: [id] }\n- sort: { by: [id], descending: true }\n",
            df,
        )
        .await
        .unwrap();
        assert_eq!(strs(&out, "v"), some(&["c1", "b1", "a1"]));
    }

    #[tokio::test]
    async fn join_and_sql_over_two_inputs() {
        let statuses = DataFrame::new(vec![
            Column::new("id".into(), [1i64, 2, 3]),
            Column::new("label".into(), ["Aberto", "Em atendimento", "Resolvido"]),
        ])
        .unwrap();
        let inputs = [("tickets", tickets()), ("statuses", statuses)];
        let (df, _) = run_with(
            "- join: { with: statuses, left_on: [status_id], right_on: [id] }\n",
            &inputs,
        )
        .await
        .unwrap();
        assert_eq!(
            strs(&df, "label"),
            [
                Some("Aberto".into()),
                Some("Em atendimento".into()),
                Some("Resolvido".into()),
                None,
                None
            ]
        );
        assert_eq!(
            ints(&df, "ticket_number"),
            [Some(101), Some(102), Some(103), Some(104), Some(105)]
        );
        let (df, _) = run_with("- rename: { status_id: id }\n- join: { with: statuses, on: [id], how: inner }\n- select: [ticket_number, label]\n", &inputs).await.unwrap();
        assert_eq!(
            ints(&df, "ticket_number"),
            [Some(101), Some(102), Some(103)]
        );
        let (df, _) = run_with(
            "- join: { with: statuses, left_on: [status_id], right_on: [id], how: anti }\n",
            &inputs,
        )
        .await
        .unwrap();
        assert_eq!(ints(&df, "ticket_number"), [Some(104), Some(105)]);
        let err = run_with("- join: { with: status, on: [id] }\n", &inputs)
            .await
            .unwrap_err();
        assert!(
            err.contains("no input table `status`; the inputs are: tickets, statuses"),
            "{err}"
        );
        let err = run_with("- join: { with: statuses, on: [status_id] }\n", &inputs)
            .await
            .unwrap_err();
        assert!(
            err.contains("in `statuses`: column `status_id` not found")
                && err.contains("id, label"),
            "{err}"
        );

        let sql = "- sql: |\n    SELECT t.ticket_number, s.label FROM input AS t JOIN statuses AS s ON t.status_id = s.id\n    WHERE t.worked_hours IS NOT NULL ORDER BY t.ticket_number DESC\n";
        let (df, out) = run_with(sql, &inputs).await.unwrap();
        assert_eq!(ints(&df, "ticket_number"), [Some(103), Some(101)]);
        assert_eq!(strs(&df, "label"), some(&["Resolvido", "Aberto"]));
        assert_eq!(
            out.outputs["columns"],
            serde_json::json!(["ticket_number", "label"])
        );
        let err = run_with("- sql: SELECT nope FROM input\n", &inputs)
            .await
            .unwrap_err();
        assert!(
            err.starts_with("operation 1 (`sql`)")
                && err.contains("the columns of `input` are: ticket_number"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unnest_and_explode() {
        let s = StructChunked::from_series(
            "status".into(),
            2,
            [
                Series::new("id".into(), [1i64, 2]),
                Series::new("name".into(), ["open", "done"]),
            ]
            .iter(),
        )
        .unwrap()
        .into_series();
        let tags = Series::new(
            "tags".into(),
            [
                Series::new("".into(), ["a", "b"]),
                Series::new("".into(), ["c"]),
            ],
        );
        let df = DataFrame::new(vec![
            Column::new("n".into(), [1i64, 2]),
            s.into_column(),
            tags.into_column(),
        ])
        .unwrap();
        let out = run("- unnest: [status]\n", df.clone()).await.unwrap();
        assert_eq!(names(&out), ["n", "id", "name", "tags"]);
        let out = run(
            "- unnest: { columns: [status], separator: _ }\n- explode: [tags]\n",
            df,
        )
        .await
        .unwrap();
        assert_eq!(names(&out), ["n", "status_id", "status_name", "tags"]);
        assert_eq!(strs(&out, "tags"), some(&["a", "b", "c"]));
        assert_eq!(ints(&out, "status_id"), [Some(1), Some(1), Some(2)]);
        let err = run("- explode: [title]\n", tickets()).await.unwrap_err();
        assert!(err.contains("not a list"), "{err}");
    }

    #[test]
    fn validate_checks_the_shape() {
        let yaml = r#"
- rename: { ticket_number: numero }
- map: { column: status_id, into: "{{ params.col }}", values: { 1: Aberto }, default: "{{ params.other }}" }
- convert_timezone: { columns: [criado_em], to: "{{ params.tz }}" }
- cast: { numero: "{{ params.type }}" }
- sort: { by: [numero], descending: "{{ params.desc }}" }
- filter: "status_id = {{ params.status }}"
- unnest: { columns: [status], separator: "." }
- join: { with: other, on: [id], how: full }
- sql: SELECT * FROM input
"#;
        let (c, problems) = check(yaml);
        assert!(problems.is_empty(), "{problems:?}");
        let c = c.unwrap();
        assert_eq!(c.0.len(), 9);
        assert_eq!(c.0[6].kind(), "unnest");
        let info = c.static_info();
        assert!(info.produces_table);
        assert_eq!(
            info.outputs,
            Some(vec!["rows".to_string(), "columns".to_string()])
        );

        let (_, p) = check("- renam: { a: b }\n");
        assert!(p[0].contains("did you mean `rename`"), "{p:?}");
        let (_, p) = check("- convert_timezone: { columns: [a], to: America/Sao_Pablo }\n");
        assert!(
            p[0].contains(
                "unknown time zone `America/Sao_Pablo` (did you mean `America/Sao_Paulo`?)"
            ),
            "{p:?}"
        );
        let (_, p) = check("- cast: { a: integr }\n");
        assert!(p[0].contains("did you mean `integer`"), "{p:?}");
        let (_, p) = check("- map: { column: a, value: { 1: x } }\n");
        assert!(p.iter().any(|m| m.contains("unknown key `value`")), "{p:?}");
        let (_, p) = check("- dedupe: { keys: a }\n");
        assert!(p[0].contains("expected a list"), "{p:?}");
        let (_, p) = check("- { select: [a], drop: [b] }\n");
        assert!(
            p[0].contains("an operation: a mapping with one key"),
            "{p:?}"
        );
        let (_, p) = check("rename: { a: b }\n");
        assert!(p[0].contains("expected a list"), "{p:?}");
    }
}
