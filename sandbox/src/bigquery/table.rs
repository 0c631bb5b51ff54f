//! BigQuery schemas and values over Polars frames: the type mapping both ways, BigQuery's
//! JSON cell encoding (`{"f":[{"v":"42"}]}`, every scalar a string), parsing JSON rows
//! (insertAll, NEWLINE_DELIMITED_JSON, CSV) with BigQuery's per-field error reports, and
//! the Parquet files tables persist in.
//!
//! A table's frame always has exactly its schema's columns with the Polars types of
//! [`dtype`], so every reader (REST, SQL, `pipe sandbox tables`) sees one representation.

use base64::Engine as _;
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

fn nullable() -> String {
    "NULLABLE".into()
}

/// A schema field as BigQuery's REST API shapes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default = "nullable")]
    pub mode: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<Field>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Field {
    pub fn new(name: &str, ty: &str, mode: &str) -> Field {
        Field {
            name: name.to_string(),
            ty: ty.to_string(),
            mode: mode.to_string(),
            fields: Vec::new(),
            description: None,
        }
    }
    pub fn with_fields(mut self, fields: Vec<Field>) -> Field {
        self.fields = fields;
        self
    }
    pub fn repeated(&self) -> bool {
        self.mode == "REPEATED"
    }
    /// Upper-case type and mode, legacy names (`INTEGER`, `FLOAT`, `BOOLEAN`, `RECORD`).
    pub fn normalized(mut self) -> Result<Field, String> {
        let ty = self.ty.to_ascii_uppercase();
        self.ty = normalize_type(&ty)
            .ok_or_else(|| format!("Invalid field type: {}", self.ty))?
            .to_string();
        self.mode = if self.mode.is_empty() {
            nullable()
        } else {
            self.mode.to_ascii_uppercase()
        };
        if !["NULLABLE", "REQUIRED", "REPEATED"].contains(&self.mode.as_str()) {
            return Err(format!("Invalid field mode: {}", self.mode));
        }
        if self.ty == "RECORD" && self.fields.is_empty() {
            return Err(format!(
                "Field {} is type RECORD but has no schema",
                self.name
            ));
        }
        self.fields = std::mem::take(&mut self.fields)
            .into_iter()
            .map(Field::normalized)
            .collect::<Result<_, _>>()?;
        Ok(self)
    }
}

/// BigQuery's type names as its REST API reports them.
pub(crate) fn normalize_type(t: &str) -> Option<&'static str> {
    Some(match t {
        "INT64" | "INTEGER" | "INT" | "SMALLINT" | "BIGINT" | "TINYINT" | "BYTEINT" => "INTEGER",
        "FLOAT64" | "FLOAT" => "FLOAT",
        "BOOL" | "BOOLEAN" => "BOOLEAN",
        "STRING" => "STRING",
        "BYTES" => "BYTES",
        "NUMERIC" | "DECIMAL" => "NUMERIC",
        "BIGNUMERIC" | "BIGDECIMAL" => "BIGNUMERIC",
        "TIMESTAMP" => "TIMESTAMP",
        "DATE" => "DATE",
        "DATETIME" => "DATETIME",
        "TIME" => "TIME",
        "JSON" => "JSON",
        "GEOGRAPHY" => "GEOGRAPHY",
        "RECORD" | "STRUCT" => "RECORD",
        _ => return None,
    })
}

/// The Polars type a field is stored as. NUMERIC and BIGNUMERIC are approximated by
/// Float64; TIME, JSON and GEOGRAPHY are kept as their string form.
pub(crate) fn dtype(f: &Field) -> DataType {
    let base = match f.ty.as_str() {
        "INTEGER" => DataType::Int64,
        "FLOAT" | "NUMERIC" | "BIGNUMERIC" => DataType::Float64,
        "BOOLEAN" => DataType::Boolean,
        "BYTES" => DataType::Binary,
        "TIMESTAMP" => DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC)),
        "DATE" => DataType::Date,
        "DATETIME" => DataType::Datetime(TimeUnit::Microseconds, None),
        "RECORD" => DataType::Struct(
            f.fields
                .iter()
                .map(|s| polars::prelude::Field::new(s.name.as_str().into(), dtype(s)))
                .collect(),
        ),
        _ => DataType::String,
    };
    if f.repeated() {
        DataType::List(Box::new(base))
    } else {
        base
    }
}

/// The BigQuery field for a Polars column (Parquet → BigQuery mapping).
pub(crate) fn field_of(name: &str, dt: &DataType) -> Field {
    let ty = match dt {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => "INTEGER",
        DataType::Float32 | DataType::Float64 => "FLOAT",
        DataType::Boolean => "BOOLEAN",
        DataType::Binary | DataType::BinaryOffset => "BYTES",
        DataType::Datetime(_, Some(_)) => "TIMESTAMP",
        DataType::Datetime(_, None) => "DATETIME",
        DataType::Date => "DATE",
        DataType::Struct(fields) => {
            return Field::new(name, "RECORD", "NULLABLE").with_fields(
                fields
                    .iter()
                    .map(|f| field_of(f.name.as_str(), f.dtype()))
                    .collect(),
            )
        }
        DataType::List(inner) => {
            let mut f = field_of(name, inner);
            f.mode = "REPEATED".into();
            return f;
        }
        _ => "STRING",
    };
    Field::new(name, ty, "NULLABLE")
}

pub(crate) fn schema_of(df: &DataFrame) -> Vec<Field> {
    df.get_columns()
        .iter()
        .map(|c| field_of(c.name().as_str(), c.dtype()))
        .collect()
}

/// An empty frame of a schema.
pub(crate) fn empty(schema: &[Field]) -> DataFrame {
    DataFrame::new(
        schema
            .iter()
            .map(|f| Column::new_empty(f.name.as_str().into(), &dtype(f)))
            .collect(),
    )
    .expect("distinct names")
}

/// `df` with exactly `schema`'s columns, in its order and types; absent columns are
/// null. Fails when a value does not convert or a REQUIRED column has nulls.
pub(crate) fn conform(df: &DataFrame, schema: &[Field]) -> Result<DataFrame, String> {
    let n = df.height();
    let mut cols = Vec::with_capacity(schema.len());
    for f in schema {
        let dt = dtype(f);
        let s = match df.column(&f.name) {
            Ok(c) => {
                let s = c.as_materialized_series();
                if s.dtype() == &dt {
                    s.clone()
                } else {
                    s.strict_cast(&dt).map_err(|_| {
                        format!(
                            "Field {} has type {} in the data, which cannot be stored as {}",
                            f.name,
                            s.dtype(),
                            f.ty
                        )
                    })?
                }
            }
            Err(_) => Series::full_null(f.name.as_str().into(), n, &dt),
        };
        if f.mode == "REQUIRED" && s.null_count() > 0 {
            return Err(format!("Required field {} cannot be null", f.name));
        }
        cols.push(s.into_column());
    }
    DataFrame::new(cols).map_err(|e| e.to_string())
}

fn days_to_date(days: i32) -> String {
    (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")
        + chrono::Duration::days(days as i64))
    .format("%Y-%m-%d")
    .to_string()
}

fn micros_to_naive(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|d| d.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string())
        .unwrap_or_default()
}

fn float_cell(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        f.to_string()
    }
}

/// The cells of one column in BigQuery's JSON encoding: a string per scalar, null, a list
/// of `{"v":…}` for REPEATED, `{"f":[{"v":…}]}` for RECORD. TIMESTAMPs are float seconds,
/// or integer microseconds with `int64_timestamp` (`formatOptions.useInt64Timestamp`).
pub(crate) fn cells(s: &Series, f: &Field, int64_timestamp: bool) -> PolarsResult<Vec<Value>> {
    if f.repeated() {
        let item = Field {
            mode: nullable(),
            ..f.clone()
        };
        let list = s.list()?;
        return list
            .into_iter()
            .map(|o| match o {
                None => Ok(json!([])),
                Some(inner) => Ok(Value::Array(
                    cells(&inner, &item, int64_timestamp)?
                        .into_iter()
                        .map(|v| json!({ "v": v }))
                        .collect(),
                )),
            })
            .collect();
    }
    let s = s.cast(&dtype(f))?;
    let strings = |v: Vec<Option<String>>| -> Vec<Value> {
        v.into_iter()
            .map(|o| o.map(Value::String).unwrap_or(Value::Null))
            .collect()
    };
    Ok(match f.ty.as_str() {
        "RECORD" => {
            let st = s.struct_()?;
            let subs = st.fields_as_series();
            let sub_cells = f
                .fields
                .iter()
                .zip(&subs)
                .map(|(sf, ss)| cells(ss, sf, int64_timestamp))
                .collect::<PolarsResult<Vec<_>>>()?;
            let nulls = s.is_null();
            (0..s.len())
                .map(|i| {
                    if nulls.get(i) == Some(true) {
                        Value::Null
                    } else {
                        json!({"f": sub_cells.iter().map(|c| json!({"v": c[i]})).collect::<Vec<_>>()})
                    }
                })
                .collect()
        }
        "INTEGER" => strings(s.i64()?.iter().map(|o| o.map(|v| v.to_string())).collect()),
        "FLOAT" | "NUMERIC" | "BIGNUMERIC" => {
            strings(s.f64()?.iter().map(|o| o.map(float_cell)).collect())
        }
        "BOOLEAN" => strings(s.bool()?.iter().map(|o| o.map(|v| v.to_string())).collect()),
        "BYTES" => strings(
            s.binary()?
                .iter()
                .map(|o| o.map(|b| base64::engine::general_purpose::STANDARD.encode(b)))
                .collect(),
        ),
        "TIMESTAMP" | "DATETIME" => {
            let phys = s.to_physical_repr();
            let micros = phys.i64()?;
            strings(
                micros
                    .iter()
                    .map(|o| {
                        o.map(|us| match f.ty.as_str() {
                            "DATETIME" => micros_to_naive(us),
                            _ if int64_timestamp => us.to_string(),
                            _ => float_cell(us as f64 / 1e6),
                        })
                    })
                    .collect(),
            )
        }
        "DATE" => {
            let phys = s.to_physical_repr();
            strings(phys.i32()?.iter().map(|o| o.map(days_to_date)).collect())
        }
        _ => strings(s.str()?.iter().map(|o| o.map(str::to_string)).collect()),
    })
}

/// Rows `[offset, offset+len)` of `df` as `[{"f":[{"v":…}]}]`.
pub(crate) fn rows_json(
    df: &DataFrame,
    schema: &[Field],
    int64_timestamp: bool,
) -> PolarsResult<Vec<Value>> {
    let columns = schema
        .iter()
        .map(|f| {
            let c = df.column(&f.name)?;
            cells(c.as_materialized_series(), f, int64_timestamp)
        })
        .collect::<PolarsResult<Vec<_>>>()?;
    Ok((0..df.height())
        .map(|i| json!({"f": columns.iter().map(|c| json!({"v": c[i]})).collect::<Vec<_>>()}))
        .collect())
}

fn parse_timestamp_micros(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(d.timestamp_micros());
    }
    let (body, tz) = match s.strip_suffix(" UTC").or_else(|| s.strip_suffix('Z')) {
        Some(b) => (b, None),
        None => (s, None::<()>),
    };
    let _ = tz;
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(d) = chrono::NaiveDateTime::parse_from_str(body, fmt) {
            return Some(d.and_utc().timestamp_micros());
        }
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f %#z"] {
        if let Ok(d) = chrono::DateTime::parse_from_str(body, fmt) {
            return Some(d.timestamp_micros());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(body, "%Y-%m-%d") {
        return Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros());
    }
    s.parse::<f64>()
        .ok()
        .map(|secs| (secs * 1e6).round() as i64)
}

fn parse_datetime_micros(s: &str) -> Option<i64> {
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(d) = chrono::NaiveDateTime::parse_from_str(s.trim(), fmt) {
            return Some(d.and_utc().timestamp_micros());
        }
    }
    chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .ok()
        .and_then(|d| Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros()))
}

fn parse_date_days(s: &str) -> Option<i32> {
    let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()?;
    Some((d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days() as i32)
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.trim() {
            "Infinity" | "inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            t => t.parse().ok(),
        },
        _ => None,
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().filter(|i| *i == 0 || *i == 1).map(|i| i == 1),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn as_micros(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_f64().map(|secs| (secs * 1e6).round() as i64),
        Value::String(s) => parse_timestamp_micros(s),
        _ => None,
    }
}

/// One scalar of a (non-repeated) field, checked. `Err`: BigQuery's message.
fn check_scalar(f: &Field, v: &Value) -> Result<(), String> {
    let ok = match f.ty.as_str() {
        "INTEGER" => as_i64(v).is_some(),
        "FLOAT" | "NUMERIC" | "BIGNUMERIC" => as_f64(v).is_some(),
        "BOOLEAN" => as_bool(v).is_some(),
        "TIMESTAMP" => as_micros(v).is_some(),
        "DATETIME" => v.as_str().and_then(parse_datetime_micros).is_some(),
        "DATE" => v.as_str().and_then(parse_date_days).is_some(),
        "BYTES" => v
            .as_str()
            .is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok()),
        "JSON" => true,
        "RECORD" => v.is_object(),
        _ => as_string(v).is_some(),
    };
    if ok {
        Ok(())
    } else {
        let shown = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Err(match f.ty.as_str() {
            "RECORD" => format!("This field: {} is not a record.", f.name),
            "INTEGER" => format!("Cannot convert value to integer (bad value): {shown}"),
            "FLOAT" | "NUMERIC" | "BIGNUMERIC" => {
                format!("Cannot convert value to floating point (bad value): {shown}")
            }
            "BOOLEAN" => format!("Cannot convert value to boolean (bad value): {shown}"),
            "TIMESTAMP" => format!("Cannot convert value to timestamp (bad value): {shown}"),
            ty => format!(
                "Cannot convert value to {} (bad value): {shown}",
                ty.to_lowercase()
            ),
        })
    }
}

/// Problems of one JSON row against a schema: `(location, message)` pairs, as
/// insertAll reports them. `ignore_unknown`: fields not in the schema are dropped.
pub(crate) fn check_row(
    schema: &[Field],
    row: &serde_json::Map<String, Value>,
    ignore_unknown: bool,
    prefix: &str,
    out: &mut Vec<(String, String)>,
) {
    if !ignore_unknown {
        for k in row.keys() {
            if !schema.iter().any(|f| &f.name == k) {
                out.push((
                    format!("{prefix}{k}"),
                    format!("no such field: {prefix}{k}."),
                ));
            }
        }
    }
    for f in schema {
        let loc = format!("{prefix}{}", f.name);
        match row.get(&f.name) {
            None | Some(Value::Null) => {
                if f.mode == "REQUIRED" {
                    out.push((loc.clone(), format!("Missing required field: {loc}.")));
                }
            }
            Some(v) if f.repeated() => match v {
                Value::Array(items) => {
                    for item in items {
                        check_value(f, item, ignore_unknown, &loc, out);
                    }
                }
                _ => out.push((
                    loc.clone(),
                    format!("Array specified for non-repeated field: {loc}."),
                )),
            },
            Some(v) => check_value(f, v, ignore_unknown, &loc, out),
        }
    }
}

fn check_value(
    f: &Field,
    v: &Value,
    ignore_unknown: bool,
    loc: &str,
    out: &mut Vec<(String, String)>,
) {
    if v.is_null() {
        return;
    }
    if let Err(m) = check_scalar(f, v) {
        out.push((loc.to_string(), m));
        return;
    }
    if let (true, Some(obj)) = (f.ty == "RECORD", v.as_object()) {
        check_row(&f.fields, obj, ignore_unknown, &format!("{loc}."), out);
    }
}

/// A column from JSON values already checked with [`check_row`] (a value that does not
/// convert becomes null).
pub(crate) fn build_series(f: &Field, vals: &[&Value]) -> PolarsResult<Series> {
    let name: PlSmallStr = f.name.as_str().into();
    if f.repeated() {
        let item = Field {
            mode: nullable(),
            ..f.clone()
        };
        let mut lists = Vec::with_capacity(vals.len());
        for v in vals {
            let items: Vec<&Value> = v.as_array().map(|a| a.iter().collect()).unwrap_or_default();
            lists.push(build_series(&item, &items)?);
        }
        let s = if lists.is_empty() {
            Series::new_empty(name, &dtype(f))
        } else {
            Series::new(name, lists)
        };
        return s.cast(&dtype(f));
    }
    let s = match f.ty.as_str() {
        "INTEGER" => Series::new(name, vals.iter().map(|v| as_i64(v)).collect::<Vec<_>>()),
        "FLOAT" | "NUMERIC" | "BIGNUMERIC" => {
            Series::new(name, vals.iter().map(|v| as_f64(v)).collect::<Vec<_>>())
        }
        "BOOLEAN" => Series::new(name, vals.iter().map(|v| as_bool(v)).collect::<Vec<_>>()),
        "TIMESTAMP" => Series::new(name, vals.iter().map(|v| as_micros(v)).collect::<Vec<_>>()),
        "DATETIME" => Series::new(
            name,
            vals.iter()
                .map(|v| v.as_str().and_then(parse_datetime_micros))
                .collect::<Vec<_>>(),
        ),
        "DATE" => Series::new(
            name,
            vals.iter()
                .map(|v| v.as_str().and_then(parse_date_days))
                .collect::<Vec<_>>(),
        ),
        "BYTES" => {
            let decoded: Vec<Option<Vec<u8>>> = vals
                .iter()
                .map(|v| {
                    v.as_str()
                        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                })
                .collect();
            let refs: Vec<Option<&[u8]>> = decoded.iter().map(|o| o.as_deref()).collect();
            Series::new(name, refs)
        }
        "RECORD" => {
            let null = Value::Null;
            let children = f
                .fields
                .iter()
                .map(|sf| {
                    let sub: Vec<&Value> = vals
                        .iter()
                        .map(|v| v.get(&sf.name).unwrap_or(&null))
                        .collect();
                    build_series(sf, &sub)
                })
                .collect::<PolarsResult<Vec<_>>>()?;
            let st = StructChunked::from_series(name.clone(), vals.len(), children.iter())?
                .into_series();
            if vals.iter().any(|v| v.is_null()) {
                let valid: BooleanChunked = vals.iter().map(|v| Some(!v.is_null())).collect();
                st.zip_with(&valid, &Series::full_null(name, vals.len(), st.dtype()))?
            } else {
                st
            }
        }
        "JSON" => Series::new(
            name,
            vals.iter()
                .map(|v| match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                })
                .collect::<Vec<_>>(),
        ),
        _ => Series::new(name, vals.iter().map(|v| as_string(v)).collect::<Vec<_>>()),
    };
    s.cast(&dtype(f))
}

/// A frame from JSON rows (already checked).
pub(crate) fn frame_from_rows(schema: &[Field], rows: &[&Value]) -> PolarsResult<DataFrame> {
    let null = Value::Null;
    let cols = schema
        .iter()
        .map(|f| {
            let vals: Vec<&Value> = rows
                .iter()
                .map(|r| r.get(&f.name).unwrap_or(&null))
                .collect();
            build_series(f, &vals).map(Series::into_column)
        })
        .collect::<PolarsResult<Vec<_>>>()?;
    if cols.is_empty() {
        return Ok(DataFrame::empty_with_height(rows.len()));
    }
    DataFrame::new(cols)
}

/// A schema guessed from JSON rows (NEWLINE_DELIMITED_JSON with `autodetect`).
pub(crate) fn detect_schema(rows: &[&Value]) -> Vec<Field> {
    fn guess(name: &str, vals: &[&Value]) -> Field {
        let first = vals.iter().find(|v| !v.is_null());
        match first {
            Some(Value::Array(_)) => {
                let items: Vec<&Value> =
                    vals.iter().filter_map(|v| v.as_array()).flatten().collect();
                let mut f = guess(name, &items);
                f.mode = "REPEATED".into();
                f
            }
            Some(Value::Object(_)) => {
                let mut keys: Vec<String> = Vec::new();
                for v in vals {
                    for k in v.as_object().into_iter().flat_map(|o| o.keys()) {
                        if !keys.contains(k) {
                            keys.push(k.clone());
                        }
                    }
                }
                let null = Value::Null;
                Field::new(name, "RECORD", "NULLABLE").with_fields(
                    keys.iter()
                        .map(|k| {
                            let sub: Vec<&Value> =
                                vals.iter().map(|v| v.get(k).unwrap_or(&null)).collect();
                            guess(k, &sub)
                        })
                        .collect(),
                )
            }
            Some(Value::Bool(_)) => Field::new(name, "BOOLEAN", "NULLABLE"),
            Some(Value::Number(_)) => {
                let all_int = vals.iter().all(|v| v.is_null() || v.as_i64().is_some());
                Field::new(name, if all_int { "INTEGER" } else { "FLOAT" }, "NULLABLE")
            }
            _ => Field::new(name, "STRING", "NULLABLE"),
        }
    }
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        for k in r.as_object().into_iter().flat_map(|o| o.keys()) {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let null = Value::Null;
    keys.iter()
        .map(|k| {
            let vals: Vec<&Value> = rows.iter().map(|r| r.get(k).unwrap_or(&null)).collect();
            guess(k, &vals)
        })
        .collect()
}

/// Read a Parquet file's bytes.
pub(crate) fn read_parquet(bytes: &[u8]) -> PolarsResult<DataFrame> {
    ParquetReader::new(std::io::Cursor::new(bytes)).finish()
}

/// Write `df` to `path` atomically (a temp file in the same directory, then rename), so a
/// reader never sees half a table.
pub(crate) fn write_parquet(path: &Path, df: &DataFrame) -> anyhow::Result<()> {
    let dir = path.parent().expect("a table path has a parent");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut df = df.clone();
    ParquetWriter::new(tmp.as_file_mut()).finish(&mut df)?;
    tmp.persist(path)?;
    Ok(())
}

/// Write small JSON atomically.
pub(crate) fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let dir = path.parent().expect("a path with a parent");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(
        tmp.as_file_mut(),
        serde_json::to_string_pretty(v)?.as_bytes(),
    )?;
    tmp.persist(path)?;
    Ok(())
}
