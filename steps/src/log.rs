//! `type: log` — write one row to the run's log, optionally setting outputs.
//!
//! The OneVizion wrapper let a running integration add rows to its Log trackor from outside
//! (`IntegrationWrapperAddingLog.py`); in a pipeline that is a step of its own. The level
//! decides what the row does to the step:
//!
//! * `info` — just the row;
//! * `warning` — the row, and the step ends with status `warning` (the message is the
//!   step's warning);
//! * `error` — the row, and the step **fails** with the message as its error (useful after a
//!   `when:` to stop a pipeline on a condition); no outputs are set then.
//!
//! `outputs` computes values once (usually templates) and publishes them as
//! `steps.<id>.<name>`, so later steps need not repeat the expression.

use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;

/// The level of the row a `log` step writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// An informational row.
    #[default]
    Info,
    /// A warning row; the step ends with status `warning`.
    #[serde(alias = "warn")]
    Warning,
    /// An error row; the step fails with the message as its error.
    Error,
}

impl From<LogLevel> for Level {
    fn from(l: LogLevel) -> Level {
        match l {
            LogLevel::Info => Level::Info,
            LogLevel::Warning => Level::Warning,
            LogLevel::Error => Level::Error,
        }
    }
}

/// Write one log row (and optionally set outputs).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// The row's message (short; templates allowed).
    pub message: String,
    /// The row's level: `info` (default), `warning` (the step ends with status `warning`) or
    /// `error` (the row is written, then the step fails with the message as its error).
    #[serde(default)]
    pub level: LogLevel,
    /// A longer description stored with the row.
    #[serde(default)]
    pub description: Option<String>,
    /// Values set as the step's outputs (`steps.<id>.<name>`), to compute a value once and
    /// reuse it in later steps. Not set when `level` is `error`.
    #[serde(default)]
    pub outputs: IndexMap<String, serde_json::Value>,
}

#[async_trait]
impl StepConfig for Log {
    const TYPE: &'static str = "log";
    const SUMMARY: &'static str =
        "Write one log row (info, warning or error — error fails the step); optionally set outputs";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: false,
            outputs: Some(self.outputs.keys().cloned().collect()),
            secret_fields: Vec::new(),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let level = Level::from(self.level);
        ctx.log_full(level, &self.message, self.description.as_deref(), None);
        match self.level {
            LogLevel::Error => Err(StepError::fatal(ctx.redactor.redact(&self.message))),
            _ => Ok(StepOutput {
                result: serde_json::json!({ "message": self.message, "level": level.as_str() }),
                outputs: self.outputs.into_iter().collect(),
                table: None,
                warnings: if self.level == LogLevel::Warning {
                    vec![self.message]
                } else {
                    Vec::new()
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::events::{Observer, RunEvent};
    use engine::secrets::Redactor;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Collect(Mutex<Vec<RunEvent>>);
    impl Observer for Collect {
        fn event(&self, event: &RunEvent) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    fn ctx(obs: &Arc<Collect>) -> StepContext {
        StepContext::new(
            "note",
            1,
            obs.clone(),
            Redactor::new(),
            "/tmp".into(),
            "/tmp".into(),
        )
    }

    fn rows(obs: &Collect) -> Vec<(Level, String, Option<String>)> {
        obs.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                RunEvent::Log(r) => Some((r.level, r.message.clone(), r.description.clone())),
                _ => None,
            })
            .collect()
    }

    fn log(message: &str, level: LogLevel) -> Log {
        Log {
            message: message.into(),
            level,
            description: None,
            outputs: IndexMap::new(),
        }
    }

    #[tokio::test]
    async fn info_row_and_outputs() {
        let obs = Arc::new(Collect::default());
        let mut cfg = log("hello", LogLevel::Info);
        cfg.description = Some("longer".into());
        cfg.outputs.insert("n".into(), serde_json::json!(3));
        cfg.outputs.insert("s".into(), serde_json::json!("x"));
        assert_eq!(
            cfg.static_info().outputs,
            Some(vec!["n".to_string(), "s".to_string()])
        );
        let out = cfg.run(ctx(&obs)).await.unwrap();
        assert_eq!(
            rows(&obs),
            vec![(Level::Info, "hello".into(), Some("longer".into()))]
        );
        assert_eq!(out.outputs["n"], serde_json::json!(3));
        assert_eq!(out.outputs["s"], serde_json::json!("x"));
        assert!(out.warnings.is_empty());
    }

    #[tokio::test]
    async fn warning_adds_step_warning() {
        let obs = Arc::new(Collect::default());
        let out = log("careful", LogLevel::Warning)
            .run(ctx(&obs))
            .await
            .unwrap();
        assert_eq!(out.warnings, vec!["careful".to_string()]);
        assert_eq!(rows(&obs)[0].0, Level::Warning);
    }

    #[tokio::test]
    async fn error_writes_row_and_fails() {
        let obs = Arc::new(Collect::default());
        let err = log("stop here", LogLevel::Error)
            .run(ctx(&obs))
            .await
            .unwrap_err();
        assert_eq!(err.message, "stop here");
        assert!(!err.retryable);
        assert_eq!(rows(&obs), vec![(Level::Error, "stop here".into(), None)]);
    }
}
