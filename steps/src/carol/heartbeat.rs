//! `type: carol.heartbeat` — tell Carol the connector is alive.
//!
//! `PUT /api/v1/heartbeats/{connectorId}` with the host's data (`hostAddress`, `now`,
//! `startTime`, `timezone`, `version`, `encoding`, `databases` when given, free `extra`
//! keys) and `recordCountLastHour` / `recordCountLast24Hours`: the records this pipeline's
//! `carol.send` steps (or `step_type`) sent in its runs of the last hour and day, from the
//! run history. Carol's UI warns after 24 hours without a heartbeat.

use super::client::{Body, Carol};
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use reqwest::Method;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Send a heartbeat for the connection's connector, with record counts from the run history.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CarolHeartbeat {
    /// The databases the connector reads (`[{database: PostgreSQL, version: "16"}]`).
    #[serde(default)]
    pub databases: Option<Vec<Value>>,
    /// When the connector started sending (default: when the run started, as
    /// `{{ run.started_at }}`).
    #[serde(default)]
    pub start_time: Option<String>,
    /// The step type whose rows count as records sent (default `carol.send`).
    #[serde(default)]
    pub step_type: Option<String>,
    /// More keys for `mdmHeartbeatData` (free key/values; Carol shows them).
    #[serde(default)]
    pub extra: IndexMap<String, Value>,
}

/// Outputs of `carol.heartbeat`.
pub const OUTPUTS: [&str; 2] = ["record_count_last_hour", "record_count_last_24_hours"];

/// `GMT-03:00`, as Carol's own connector reports the zone.
fn gmt_offset(seconds_east: i32) -> String {
    let sign = if seconds_east < 0 { '-' } else { '+' };
    let s = seconds_east.abs();
    format!("GMT{sign}{:02}:{:02}", s / 3600, (s % 3600) / 60)
}

/// This host's address on the route to `url`'s host (no packet is sent).
async fn host_address(url: &str) -> String {
    let fallback = "127.0.0.1".to_string();
    let Ok(u) = url::Url::parse(url) else {
        return fallback;
    };
    let Some(host) = u.host_str() else {
        return fallback;
    };
    let port = u.port_or_known_default().unwrap_or(443);
    let Ok(mut addrs) = tokio::net::lookup_host((host, port)).await else {
        return fallback;
    };
    let Some(addr) = addrs.next() else {
        return fallback;
    };
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| s.connect(addr).and_then(|_| s.local_addr()))
        .map(|a| a.ip().to_string())
        .unwrap_or(fallback)
}

#[async_trait]
impl StepConfig for CarolHeartbeat {
    const TYPE: &'static str = "carol.heartbeat";
    const SUMMARY: &'static str =
        "Send the Carol connector's heartbeat (host data, records sent in the last hour and day from the run history)";

    fn static_info(&self) -> StaticInfo {
        super::outputs_info(&OUTPUTS)
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let started: DateTime<Utc> = ctx.run_started_at;
        let carol = Carol::from_ctx(&ctx)?;
        let kind = self.step_type.as_deref().unwrap_or("carol.send");
        let now = Utc::now();
        let mut warnings = Vec::new();
        let (hour, day) = match ctx.history.clone() {
            // SQLite reads (after the writer's flush) block: off the async threads.
            Some(h) => {
                let (pipeline, kind) = (ctx.pipeline.clone(), kind.to_string());
                tokio::task::spawn_blocking(move || -> Result<(u64, u64), String> {
                    let count = |since| h.rows_since(&pipeline, &kind, since);
                    Ok((
                        count(now - chrono::Duration::hours(1))?,
                        count(now - chrono::Duration::hours(24))?,
                    ))
                })
                .await
                .map_err(|e| StepError::fatal(format!("reading the run history: {e}")))?
                .map_err(|e| StepError::retryable(format!("reading the run history: {e}")))?
            }
            None => {
                warnings.push("no run history here: record counts reported as 0".to_string());
                (0, 0)
            }
        };
        let offset = chrono::Local::now().offset().local_minus_utc();
        let mut data = Map::new();
        data.insert("hostAddress".into(), json!(host_address(&carol.base).await));
        data.insert(
            "now".into(),
            json!(now.to_rfc3339_opts(SecondsFormat::Secs, true)),
        );
        data.insert(
            "startTime".into(),
            json!(self
                .start_time
                .clone()
                .unwrap_or_else(|| started.to_rfc3339_opts(SecondsFormat::Secs, true))),
        );
        data.insert("timezone".into(), json!(gmt_offset(offset)));
        data.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        data.insert("encoding".into(), json!("UTF-8"));
        data.insert("tenant".into(), json!(carol.tenant));
        data.insert("recordCountLastHour".into(), json!(hour.to_string()));
        data.insert("recordCountLast24Hours".into(), json!(day.to_string()));
        data.insert("osName".into(), json!(std::env::consts::OS));
        data.insert("osArch".into(), json!(std::env::consts::ARCH));
        if let Some(dbs) = &self.databases {
            data.insert("databases".into(), Value::Array(dbs.clone()));
        }
        for (k, v) in &self.extra {
            data.insert(k.clone(), v.clone());
        }
        let body = json!({
            "mdmConnectorId": carol.connector_id,
            "mdmEntityType": "mdmHeartbeat",
            "mdmHeartbeatData": data,
        });
        let path = format!("/api/v1/heartbeats/{}", carol.connector_id);
        carol
            .call(&ctx, Method::PUT, &path, &[], &Body::json(&body))
            .await?;
        ctx.log(
            Level::Info,
            &format!(
                "Carol heartbeat: {hour} records in the last hour, {day} in the last 24 hours"
            ),
        );
        let result = json!({
            "record_count_last_hour": hour,
            "record_count_last_24_hours": day,
            "heartbeat": body,
        });
        Ok(super::finish(result, &OUTPUTS, warnings))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn offsets() {
        assert_eq!(super::gmt_offset(-3 * 3600), "GMT-03:00");
        assert_eq!(super::gmt_offset(5 * 3600 + 1800), "GMT+05:30");
        assert_eq!(super::gmt_offset(0), "GMT+00:00");
    }
}
