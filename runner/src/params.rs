//! A run's params: the values given (text typed by each param's declaration, or JSON
//! checked against it) and the declared defaults; every problem is the run's
//! [`crate::PrepareError::Param`], with the wording `pipe run` has always printed.

use engine::plan::Plan;
use indexmap::IndexMap;

/// One param value given to a run.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// Text, as on the command line (`--param days=7`): parsed by the param's type.
    Text(String),
    /// A JSON value (a queued run's stored params): checked against the param's type.
    Json(serde_json::Value),
}

/// Params from the given values and the defaults, typed, in the order given then declared.
pub fn resolve(
    plan: &Plan,
    given: &[(String, ParamValue)],
) -> Result<IndexMap<String, serde_json::Value>, String> {
    let mut values = IndexMap::new();
    for (name, value) in given {
        let Some(spec) = plan.params.get(name) else {
            let known: Vec<&str> = plan.params.keys().map(String::as_str).collect();
            let hint = engine::diag::did_you_mean(name, known.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(format!(
                "unknown param `{name}`{hint} (this pipeline declares: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        let v = match value {
            ParamValue::Text(text) => engine::params::parse_cli(spec, text),
            ParamValue::Json(v) => engine::params::check_value(spec, v),
        }
        .map_err(|e| format!("param `{name}`: {e}"))?;
        values.insert(name.to_string(), v);
    }
    for (name, spec) in &plan.params {
        if values.contains_key(name) {
            continue;
        }
        match &spec.default {
            Some(d) => {
                let v = engine::params::check_value(spec, d)
                    .map_err(|e| format!("default of param `{name}`: {e}"))?;
                values.insert(name.clone(), v);
            }
            None => {
                return Err(format!(
                    "param `{name}` is required: pass --param {name}=VALUE"
                ))
            }
        }
    }
    Ok(values)
}
