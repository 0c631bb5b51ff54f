//! What happens during a run, as a stream of events.
//!
//! The executor emits; observers (the run history writer, the terminal progress display)
//! consume. Nothing here is redacted by the consumer: the executor redacts every string
//! before it emits, so no observer can leak a secret by forgetting to.

use crate::status::Status;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "info" | "0" => Ok(Level::Info),
            "warning" | "warn" | "1" => Ok(Level::Warning),
            "error" | "2" => Ok(Level::Error),
            other => Err(format!(
                "unknown level `{other}` (expected info, warning or error)"
            )),
        }
    }
}

/// One log row: OneVizion's Log trackor (time, type, message, description, file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub time: DateTime<Utc>,
    pub level: Level,
    pub step: Option<String>,
    pub message: String,
    pub description: Option<String>,
    /// A file attached to the row, copied into the run's folder.
    pub file: Option<String>,
}

#[derive(Debug, Clone)]
pub enum RunEvent {
    StepStarted {
        step: String,
        attempt: u32,
        at: DateTime<Utc>,
    },
    StepRetrying {
        step: String,
        attempt: u32,
        error: String,
        delay_ms: u64,
    },
    /// Live counters of a running step (pages, records …), for the progress line only.
    Progress {
        step: String,
        counters: Vec<(String, u64)>,
    },
    StepFinished(StepRecord),
    Log(LogRecord),
    RunFinished {
        status: Status,
        error: Option<String>,
        at: DateTime<Utc>,
    },
}

/// The final record of one step in a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    /// The step's type (`sql.query`), kept so history can be asked per type.
    #[serde(default)]
    pub kind: String,
    pub status: Status,
    pub attempts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    pub rows: Option<u64>,
    pub error: Option<String>,
    /// The step's outputs, already redacted.
    pub outputs: serde_json::Value,
}

/// Something that wants to see a run's events. Called from the executor's task: it must
/// not block (hand the event to a thread or channel when there is real work to do).
pub trait Observer: Send + Sync {
    fn event(&self, event: &RunEvent);
}
