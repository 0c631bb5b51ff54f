//! Typed pipeline params: `string integer number boolean date month enum list`.
//!
//! A param value arrives as a default in the YAML or as `--param name=value` text; both are
//! checked against the type here, and turned into the value templates see.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
