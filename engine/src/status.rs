//! One status vocabulary for steps and runs (as in GitHub Actions, plus `warning`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Running,
    Succeeded,
    /// Succeeded with warnings ("executed with warnings" in OneVizion's words).
    Warning,
    Failed,
    /// Not run: its `if` was false, or something it needs failed or was skipped.
    Skipped,
    Cancelled,
    /// Its owning process died while it was running.
    Abandoned,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Warning => "warning",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Cancelled => "cancelled",
            Status::Abandoned => "abandoned",
        }
    }
    /// How a person reads it.
    pub fn label(self) -> &'static str {
        match self {
            Status::Warning => "succeeded with warnings",
            s => s.as_str(),
        }
    }
    pub fn is_success(self) -> bool {
        matches!(self, Status::Succeeded | Status::Warning)
    }
    pub fn is_finished(self) -> bool {
        !matches!(self, Status::Pending | Status::Running)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => Status::Pending,
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "warning" => Status::Warning,
            "failed" => Status::Failed,
            "skipped" => Status::Skipped,
            "cancelled" => Status::Cancelled,
            "abandoned" => Status::Abandoned,
            other => return Err(format!("unknown status `{other}`")),
        })
    }
}
