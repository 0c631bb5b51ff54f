//! A DataFrame as BigQuery sees it: the table schema derived from the Polars types, the
//! frame prepared for a Parquet load, and rows as `insertAll` JSON.

use polars::prelude::*;
use serde_json::{json, Map, Value};

/// One BigQuery schema field (`{name, type, mode, fields?}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    /// The legacy type names, the ones `tables.get` returns (`INTEGER`, not `INT64`).
    pub kind: &'static str,
    /// `NULLABLE` or `REPEATED` (a derived field is never `REQUIRED`).
    pub mode: &'static str,
    /// The sub-fields of a `RECORD`.
    pub fields: Vec<Field>,
}

impl Field {
    pub fn to_json(&self) -> Value {
        let mut v = json!({"name": self.name, "type": self.kind, "mode": self.mode});
        if !self.fields.is_empty() {
            v["fields"] = Value::Array(self.fields.iter().map(Field::to_json).collect());
        }
        v
    }
}

/// The BigQuery schema of a frame: one field per column, in order.
pub fn derive(df: &DataFrame) -> Result<Vec<Field>, String> {
    df.get_columns()
        .iter()
        .map(|c| field(c.name().as_str(), c.dtype()))
        .collect()
}

/// The schema as the REST API's `schema.fields`.
pub fn to_json(fields: &[Field]) -> Value {
    Value::Array(fields.iter().map(Field::to_json).collect())
}

fn field(name: &str, dtype: &DataType) -> Result<Field, String> {
    check_name(name)?;
    let plain = |kind| Field {
        name: name.to_string(),
        kind,
        mode: "NULLABLE",
        fields: Vec::new(),
    };
    Ok(match dtype {
        DataType::Boolean => plain("BOOLEAN"),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => plain("INTEGER"),
        DataType::Float32 | DataType::Float64 => plain("FLOAT"),
        DataType::String | DataType::Null => plain("STRING"),
        DataType::Binary | DataType::BinaryOffset => plain("BYTES"),
        DataType::Date => plain("DATE"),
        DataType::Datetime(_, Some(_)) => plain("TIMESTAMP"),
        DataType::Datetime(_, None) => plain("DATETIME"),
        DataType::Struct(fields) => Field {
            fields: fields
                .iter()
                .map(|f| field(f.name().as_str(), f.dtype()))
                .collect::<Result<_, _>>()?,
            ..plain("RECORD")
        },
        DataType::List(inner) => {
            let mut f = field(name, inner)?;
            if f.mode == "REPEATED" {
                return Err(format!(
                    "column `{name}` is a list of lists, which BigQuery cannot store (wrap the inner list in a struct)"
                ));
            }
            f.mode = "REPEATED";
            f
        }
        other => {
            return Err(format!(
                "column `{name}` has type {other}, which has no BigQuery equivalent here: cast it (to a string, a number or a datetime) in a transform first"
            ))
        }
    })
}

/// BigQuery column names are letters, digits and underscores (flexible names allow more, but
/// never a backtick, which would break the quoting of the MERGE statement).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['`', '\\']) || name.chars().any(char::is_control) {
        return Err(format!(
            "column name `{name}` cannot be a BigQuery column name (rename it in a transform)"
        ));
    }
    Ok(())
}

/// The frame as it is written to Parquet for a load: datetimes in microseconds (BigQuery's
/// precision; Polars' default is nanoseconds), unsigned integers as `Int64` (BigQuery has no
/// unsigned type), all-null columns as strings.
pub fn for_parquet(df: &DataFrame) -> Result<DataFrame, String> {
    let mut out = df.clone();
    for c in df.get_columns() {
        let target = match c.dtype() {
            DataType::Datetime(tu, tz) if *tu != TimeUnit::Microseconds => {
                DataType::Datetime(TimeUnit::Microseconds, tz.clone())
            }
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
                DataType::Int64
            }
            DataType::Null => DataType::String,
            _ => continue,
        };
        let cast = c.strict_cast(&target).map_err(|e| {
            format!(
                "column `{}` cannot be converted to {target} for BigQuery: {e}",
                c.name()
            )
        })?;
        out.with_column(cast).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Write a frame to Parquet in memory (zstd).
pub fn parquet_bytes(df: &DataFrame) -> Result<Vec<u8>, String> {
    let mut df = for_parquet(df)?;
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(&mut df)
        .map_err(|e| format!("cannot write the table as Parquet: {e}"))?;
    Ok(buf)
}

/// Row `i` as the `json` object of an `insertAll` row.
pub fn row_json(df: &DataFrame, i: usize) -> Result<Map<String, Value>, String> {
    let mut row = Map::new();
    for c in df.get_columns() {
        let v = c
            .get(i)
            .map_err(|e| format!("column `{}`, row {i}: {e}", c.name()))?;
        row.insert(c.name().to_string(), value_json(&v));
    }
    Ok(row)
}

/// One cell as BigQuery's JSON: integers and floats as numbers (NaN and infinities as
/// null), DATE as `YYYY-MM-DD`, TIMESTAMP as RFC 3339 UTC with microseconds, DATETIME
/// without the zone, BYTES as base64, lists as arrays, structs as objects.
pub fn value_json(v: &AnyValue) -> Value {
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => json!(b),
        AnyValue::Int8(n) => json!(n),
        AnyValue::Int16(n) => json!(n),
        AnyValue::Int32(n) => json!(n),
        AnyValue::Int64(n) => json!(n),
        AnyValue::UInt8(n) => json!(n),
        AnyValue::UInt16(n) => json!(n),
        AnyValue::UInt32(n) => json!(n),
        AnyValue::UInt64(n) => json!(n),
        AnyValue::Float32(f) if f.is_finite() => json!(f),
        AnyValue::Float64(f) if f.is_finite() => json!(f),
        AnyValue::Float32(_) | AnyValue::Float64(_) => Value::Null,
        AnyValue::String(s) => json!(s),
        AnyValue::StringOwned(s) => json!(s.as_str()),
        AnyValue::Binary(b) => json!(base64(b)),
        AnyValue::BinaryOwned(b) => json!(base64(b)),
        AnyValue::Date(days) => chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|d| d.checked_add_signed(chrono::Duration::days(*days as i64)))
            .map(|d| json!(d.format("%Y-%m-%d").to_string()))
            .unwrap_or(Value::Null),
        AnyValue::Datetime(n, tu, tz) => datetime_json(*n, *tu, tz.is_some()),
        AnyValue::DatetimeOwned(n, tu, tz) => datetime_json(*n, *tu, tz.is_some()),
        AnyValue::List(s) => Value::Array(s.iter().map(|v| value_json(&v)).collect()),
        AnyValue::Struct(_, _, fields) => {
            let mut m = Map::new();
            for (f, v) in fields.iter().zip(v._iter_struct_av()) {
                m.insert(f.name().to_string(), value_json(&v));
            }
            Value::Object(m)
        }
        AnyValue::StructOwned(payload) => {
            let mut m = Map::new();
            for (v, f) in payload.0.iter().zip(payload.1.iter()) {
                m.insert(f.name().to_string(), value_json(v));
            }
            Value::Object(m)
        }
        other => json!(other.to_string()),
    }
}

fn datetime_json(n: i64, tu: TimeUnit, aware: bool) -> Value {
    let micros = match tu {
        TimeUnit::Nanoseconds => n.div_euclid(1000),
        TimeUnit::Microseconds => n,
        TimeUnit::Milliseconds => n.saturating_mul(1000),
    };
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) if aware => json!(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        Some(t) => json!(t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()),
        None => Value::Null,
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(A[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with every type the step maps.
    pub fn every_type() -> DataFrame {
        let ts = Column::new("at".into(), [1_700_000_000_123_456i64, 0])
            .cast(&DataType::Datetime(
                TimeUnit::Microseconds,
                Some(TimeZone::UTC),
            ))
            .unwrap();
        let naive = Column::new("local".into(), [1_700_000_000_000_000_000i64, 0])
            .cast(&DataType::Datetime(TimeUnit::Nanoseconds, None))
            .unwrap();
        let day = Column::new("day".into(), [19_000i32, 0])
            .cast(&DataType::Date)
            .unwrap();
        let inner = StructChunked::from_series(
            "who".into(),
            2,
            [
                Series::new("name".into(), ["Ana", "Bia"]),
                Series::new("age".into(), [31i64, 28]),
            ]
            .iter(),
        )
        .unwrap()
        .into_series()
        .into_column();
        let tags = Series::new(
            "tags".into(),
            [
                Series::new("".into(), ["a", "b"]),
                Series::new("".into(), ["c"]),
            ],
        )
        .into_column();
        DataFrame::new(vec![
            Column::new("id".into(), [1i64, 2]),
            Column::new("small".into(), [1i32, 2]),
            Column::new("unsigned".into(), [1u32, 2]),
            Column::new("score".into(), [1.5f64, f64::NAN]),
            Column::new("ok".into(), [true, false]),
            Column::new("title".into(), [Some("x"), None]),
            Column::new("raw".into(), [b"hi".as_slice(), b"".as_slice()]),
            ts,
            naive,
            day,
            inner,
            tags,
        ])
        .unwrap()
    }

    #[test]
    fn schema_from_every_type() {
        let fields = derive(&every_type()).unwrap();
        let got: Vec<(String, &str, &str)> = fields
            .iter()
            .map(|f| (f.name.clone(), f.kind, f.mode))
            .collect();
        let n = |s: &str| s.to_string();
        assert_eq!(
            got,
            [
                (n("id"), "INTEGER", "NULLABLE"),
                (n("small"), "INTEGER", "NULLABLE"),
                (n("unsigned"), "INTEGER", "NULLABLE"),
                (n("score"), "FLOAT", "NULLABLE"),
                (n("ok"), "BOOLEAN", "NULLABLE"),
                (n("title"), "STRING", "NULLABLE"),
                (n("raw"), "BYTES", "NULLABLE"),
                (n("at"), "TIMESTAMP", "NULLABLE"),
                (n("local"), "DATETIME", "NULLABLE"),
                (n("day"), "DATE", "NULLABLE"),
                (n("who"), "RECORD", "NULLABLE"),
                (n("tags"), "STRING", "REPEATED"),
            ]
        );
        assert_eq!(
            fields[10].to_json(),
            json!({"name": "who", "type": "RECORD", "mode": "NULLABLE", "fields": [
                {"name": "name", "type": "STRING", "mode": "NULLABLE"},
                {"name": "age", "type": "INTEGER", "mode": "NULLABLE"},
            ]})
        );
        // Lists of lists and odd names are refused with the column's name.
        let nested = Series::new(
            "deep".into(),
            [Series::new("".into(), [Series::new("".into(), [1i64])])],
        );
        let err = derive(&DataFrame::new(vec![nested.into_column()]).unwrap()).unwrap_err();
        assert!(err.contains("`deep` is a list of lists"), "{err}");
        let err = derive(&df!("a`b" => [1i64]).unwrap()).unwrap_err();
        assert!(err.contains("`a`b`"), "{err}");
    }

    #[test]
    fn rows_as_insert_all_json() {
        let df = every_type();
        let row = Value::Object(row_json(&df, 0).unwrap());
        assert_eq!(
            row,
            json!({
                "id": 1, "small": 1, "unsigned": 1, "score": 1.5, "ok": true, "title": "x",
                "raw": "aGk=", "at": "2023-11-14T22:13:20.123456Z",
                "local": "2023-11-14T22:13:20.000000", "day": "2022-01-08",
                "who": {"name": "Ana", "age": 31}, "tags": ["a", "b"],
            })
        );
        let row = row_json(&df, 1).unwrap();
        assert_eq!(row["score"], Value::Null);
        assert_eq!(row["title"], Value::Null);
        assert_eq!(row["at"], json!("1970-01-01T00:00:00.000000Z"));
        assert_eq!(base64(b"abcd"), "YWJjZA==");
        assert_eq!(base64(b"abcde"), "YWJjZGU=");
    }

    #[test]
    fn parquet_in_microseconds_round_trips() {
        let df = every_type();
        let bytes = parquet_bytes(&df).unwrap();
        let back = ParquetReader::new(std::io::Cursor::new(bytes))
            .finish()
            .unwrap();
        assert_eq!(back.height(), 2);
        assert_eq!(
            back.column("local").unwrap().dtype(),
            &DataType::Datetime(TimeUnit::Microseconds, None)
        );
        assert_eq!(back.column("unsigned").unwrap().dtype(), &DataType::Int64);
        assert!(matches!(
            back.column("at").unwrap().dtype(),
            DataType::Datetime(TimeUnit::Microseconds, Some(_))
        ));
    }
}
