//! Typed pipeline params: `string integer number boolean date month enum list`.
//!
//! A param value arrives as a default in the YAML or as `--param name=value` text; both are
//! checked against the type here, and turned into the value templates see.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    /// `YYYY-MM-DD`, or `today` (the run's logical date).
    Date,
    /// `YYYY-MM`, or `MA` (the month before the run's logical date). Templates see the
    /// month as text (`2019-01`) with `.first_day`, `.last_day`, `.year` and `.month`.
    Month,
    /// One of `values`.
    Enum,
    /// A list; from the command line, comma-separated.
    List,
}

/// A declared param.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The param's type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// The value when none is given; without a default the param is required.
    #[serde(default)]
    pub default: Option<serde_json::Value>,
    /// What the param means (shown by `pipe run --help`-style listings).
    #[serde(default)]
    pub description: Option<String>,
    /// The allowed values of an `enum` param.
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

use crate::template::{parse_date, parse_month, MonthValue};
use serde_json::Value as J;

fn show(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn enum_values(spec: &ParamSpec) -> Result<&[String], String> {
    match spec.values.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err("an enum param needs `values`".to_string()),
    }
}

/// Check a default or a given JSON value against the spec; returns the normalised JSON value
/// (`MA` and `today` stay symbolic here; numeric text is accepted for numbers).
pub fn check_value(spec: &ParamSpec, v: &serde_json::Value) -> Result<serde_json::Value, String> {
    match spec.kind {
        ParamType::String => match v {
            J::String(_) => Ok(v.clone()),
            J::Number(_) | J::Bool(_) => Ok(J::String(v.to_string())),
            _ => Err(format!("expected a string, got `{}`", show(v))),
        },
        ParamType::Integer => {
            let bad = || format!("expected an integer, got `{}`", show(v));
            match v {
                J::Number(n) => {
                    if let Some(i) = n.as_i64() {
                        Ok(J::from(i))
                    } else {
                        match n.as_f64() {
                            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                                Ok(J::from(f as i64))
                            }
                            _ => Err(bad()),
                        }
                    }
                }
                J::String(s) => s.trim().parse::<i64>().map(J::from).map_err(|_| bad()),
                _ => Err(bad()),
            }
        }
        ParamType::Number => {
            let bad = || format!("expected a number, got `{}`", show(v));
            match v {
                J::Number(_) => Ok(v.clone()),
                J::String(s) => {
                    let s = s.trim();
                    if let Ok(i) = s.parse::<i64>() {
                        return Ok(J::from(i));
                    }
                    s.parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map(J::Number)
                        .ok_or_else(bad)
                }
                _ => Err(bad()),
            }
        }
        ParamType::Boolean => {
            let bad = || {
                format!(
                    "expected a boolean (true/false/yes/no/1/0), got `{}`",
                    show(v)
                )
            };
            match v {
                J::Bool(_) => Ok(v.clone()),
                J::Number(n) => match n.as_i64() {
                    Some(1) => Ok(J::Bool(true)),
                    Some(0) => Ok(J::Bool(false)),
                    _ => Err(bad()),
                },
                J::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "1" => Ok(J::Bool(true)),
                    "false" | "no" | "0" => Ok(J::Bool(false)),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            }
        }
        ParamType::Date => {
            let bad = || {
                format!(
                    "expected a date like 2019-01-31 or today, got `{}`",
                    show(v)
                )
            };
            let s = v.as_str().ok_or_else(bad)?.trim();
            if s.eq_ignore_ascii_case("today") {
                return Ok(J::String("today".to_string()));
            }
            parse_date(s)
                .map(|d| J::String(d.to_string()))
                .ok_or_else(bad)
        }
        ParamType::Month => {
            let bad = || format!("expected a month like 2019-01 or MA, got `{}`", show(v));
            let s = v.as_str().ok_or_else(bad)?.trim();
            if s.eq_ignore_ascii_case("MA") {
                return Ok(J::String("MA".to_string()));
            }
            parse_month(s)
                .map(|m| J::String(m.to_string()))
                .ok_or_else(bad)
        }
        ParamType::Enum => {
            let values = enum_values(spec)?;
            let s = match v {
                J::String(s) => s.clone(),
                J::Number(_) | J::Bool(_) => v.to_string(),
                _ => String::new(),
            };
            if values.contains(&s) {
                Ok(J::String(s))
            } else {
                Err(format!(
                    "expected one of {}, got `{}`",
                    values.join(", "),
                    show(v)
                ))
            }
        }
        ParamType::List => match v {
            J::Array(_) => Ok(v.clone()),
            J::String(s) => parse_list(s),
            _ => Err(format!("expected a list, got `{}`", show(v))),
        },
    }
}

fn parse_list(text: &str) -> Result<serde_json::Value, String> {
    let t = text.trim();
    if t.starts_with('[') {
        return match serde_json::from_str::<J>(t) {
            Ok(J::Array(a)) => Ok(J::Array(a)),
            _ => Err(format!(
                "expected a list (a,b,c or a JSON array), got `{text}`"
            )),
        };
    }
    if t.is_empty() {
        return Ok(J::Array(Vec::new()));
    }
    Ok(J::Array(
        t.split(',')
            .map(|x| J::String(x.trim().to_string()))
            .collect(),
    ))
}

/// Parse command-line text (`--param name=value`) into a typed JSON value by the spec.
pub fn parse_cli(spec: &ParamSpec, text: &str) -> Result<serde_json::Value, String> {
    match spec.kind {
        ParamType::List => parse_list(text),
        _ => check_value(spec, &J::String(text.to_string())),
    }
}

/// The value templates see. A month becomes an object rendering as `YYYY-MM` (`MA` resolved to
/// the month before `logical_date` in `tz`) with `first_day`, `last_day`, `year`, `month`; a date
/// `today` becomes the logical date; everything else is the plain value.
pub fn template_value(
    spec: &ParamSpec,
    v: &serde_json::Value,
    logical_date: chrono::DateTime<chrono::Utc>,
    tz: chrono_tz::Tz,
) -> Result<minijinja::Value, String> {
    let v = check_value(spec, v)?;
    let today = logical_date.with_timezone(&tz).date_naive();
    Ok(match (spec.kind, v.as_str()) {
        (ParamType::Month, Some("MA")) => MonthValue::of(today)
            .add(-1)
            .ok_or("the month before the logical date is out of range")?
            .to_value(),
        (ParamType::Month, Some(s)) => parse_month(s)
            .ok_or_else(|| format!("bad month `{s}`"))?
            .to_value(),
        (ParamType::Date, Some("today")) => minijinja::Value::from(today.to_string()),
        _ => minijinja::Value::from_serialize(&v),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(kind: ParamType) -> ParamSpec {
        ParamSpec {
            kind,
            default: None,
            description: None,
            values: None,
        }
    }

    #[test]
    fn cli_parsing() {
        assert_eq!(
            parse_cli(&spec(ParamType::Integer), "12").unwrap(),
            json!(12)
        );
        assert!(parse_cli(&spec(ParamType::Integer), "1.5")
            .unwrap_err()
            .contains("expected an integer"));
        assert_eq!(
            parse_cli(&spec(ParamType::Number), "1.5").unwrap(),
            json!(1.5)
        );
        assert_eq!(
            parse_cli(&spec(ParamType::String), "12").unwrap(),
            json!("12")
        );
        for (t, b) in [
            ("true", true),
            ("YES", true),
            ("1", true),
            ("false", false),
            ("no", false),
            ("0", false),
        ] {
            assert_eq!(parse_cli(&spec(ParamType::Boolean), t).unwrap(), json!(b));
        }
        assert!(parse_cli(&spec(ParamType::Boolean), "maybe").is_err());
        assert_eq!(
            parse_cli(&spec(ParamType::Date), "2024-02-29").unwrap(),
            json!("2024-02-29")
        );
        assert_eq!(
            parse_cli(&spec(ParamType::Date), "today").unwrap(),
            json!("today")
        );
        assert!(parse_cli(&spec(ParamType::Date), "2023-02-29").is_err());
        assert_eq!(
            parse_cli(&spec(ParamType::Month), "2019-01").unwrap(),
            json!("2019-01")
        );
        assert_eq!(
            parse_cli(&spec(ParamType::Month), "MA").unwrap(),
            json!("MA")
        );
        assert_eq!(
            parse_cli(&spec(ParamType::Month), "2019-13").unwrap_err(),
            "expected a month like 2019-01 or MA, got `2019-13`"
        );
        assert!(parse_cli(&spec(ParamType::Month), "2019-1").is_err());
        assert_eq!(
            parse_cli(&spec(ParamType::List), "a, b,c").unwrap(),
            json!(["a", "b", "c"])
        );
        assert_eq!(
            parse_cli(&spec(ParamType::List), "[1, \"x\"]").unwrap(),
            json!([1, "x"])
        );
        assert_eq!(parse_cli(&spec(ParamType::List), "").unwrap(), json!([]));
        let e = ParamSpec {
            values: Some(vec!["full".into(), "delta".into()]),
            ..spec(ParamType::Enum)
        };
        assert_eq!(parse_cli(&e, "delta").unwrap(), json!("delta"));
        assert_eq!(
            parse_cli(&e, "x").unwrap_err(),
            "expected one of full, delta, got `x`"
        );
        assert!(parse_cli(&spec(ParamType::Enum), "x").is_err());
    }

    #[test]
    fn check_defaults() {
        assert_eq!(
            check_value(&spec(ParamType::Integer), &json!(180)).unwrap(),
            json!(180)
        );
        assert_eq!(
            check_value(&spec(ParamType::Integer), &json!("12")).unwrap(),
            json!(12)
        );
        assert!(check_value(&spec(ParamType::Integer), &json!([1])).is_err());
        assert_eq!(
            check_value(&spec(ParamType::Number), &json!(2)).unwrap(),
            json!(2)
        );
        assert_eq!(
            check_value(&spec(ParamType::Boolean), &json!(true)).unwrap(),
            json!(true)
        );
        assert_eq!(
            check_value(&spec(ParamType::Month), &json!("ma")).unwrap(),
            json!("MA")
        );
        assert!(check_value(&spec(ParamType::Month), &json!(201901)).is_err());
        assert_eq!(
            check_value(&spec(ParamType::List), &json!([1, 2])).unwrap(),
            json!([1, 2])
        );
        assert!(check_value(&spec(ParamType::List), &json!({"a": 1})).is_err());
        assert!(check_value(&spec(ParamType::Date), &json!("2019-1-1")).is_err());
    }

    #[test]
    fn template_values() {
        let logical: chrono::DateTime<chrono::Utc> = "2026-01-15T12:00:00Z".parse().unwrap();
        let tz: chrono_tz::Tz = "America/Sao_Paulo".parse().unwrap();
        let m = template_value(&spec(ParamType::Month), &json!("MA"), logical, tz).unwrap();
        assert_eq!(m.to_string(), "2025-12");
        assert_eq!(m.get_attr("last_day").unwrap().to_string(), "2025-12-31");
        assert_eq!(m.get_attr("first_day").unwrap().to_string(), "2025-12-01");
        assert_eq!(m.get_attr("year").unwrap(), minijinja::Value::from(2025));
        assert_eq!(m.get_attr("month").unwrap(), minijinja::Value::from(12));
        assert_eq!(serde_json::to_value(&m).unwrap(), json!("2025-12"));
        let m = template_value(&spec(ParamType::Month), &json!("2024-02"), logical, tz).unwrap();
        assert_eq!(m.get_attr("last_day").unwrap().to_string(), "2024-02-29");
        // The logical date is read in the pipeline's zone: 02:00 UTC on Jan 1 is still Dec 31
        // in Sao Paulo, so MA is November.
        let early: chrono::DateTime<chrono::Utc> = "2026-01-01T02:00:00Z".parse().unwrap();
        let m = template_value(&spec(ParamType::Month), &json!("MA"), early, tz).unwrap();
        assert_eq!(m.to_string(), "2025-11");
        let d = template_value(&spec(ParamType::Date), &json!("today"), logical, tz).unwrap();
        assert_eq!(d.to_string(), "2026-01-15");
        let n = template_value(&spec(ParamType::Integer), &json!(180), logical, tz).unwrap();
        assert_eq!(n, minijinja::Value::from(180));
        // Month values work with the date filters.
        let rt = crate::template::Runtime {
            redactor: Default::default(),
            tz,
            logical_date: logical,
            dry_run: false,
            overrides: Default::default(),
        };
        let t = crate::template::Templates::new(rt);
        let params = minijinja::Value::from_iter([("month", m_of("MA", logical, tz))]);
        let s = crate::template::Scope::new(
            params,
            minijinja::Value::from(()),
            minijinja::Value::from(()),
        );
        assert_eq!(
            t.render_str("{{ params.month | add_months(1) }}", &s)
                .unwrap(),
            json!("2026-01")
        );
        assert_eq!(
            t.render_str("{{ params.month | month_end }}", &s).unwrap(),
            json!("2025-12-31")
        );
        assert_eq!(
            t.render_str("{{ params.month.first_day | add_days(1) }}", &s)
                .unwrap(),
            json!("2025-12-02")
        );
    }

    fn m_of(
        s: &str,
        logical: chrono::DateTime<chrono::Utc>,
        tz: chrono_tz::Tz,
    ) -> minijinja::Value {
        template_value(&spec(ParamType::Month), &json!(s), logical, tz).unwrap()
    }
}
