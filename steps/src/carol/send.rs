//! `type: carol.send` — the input table's records to a Carol staging table.
//!
//! Records go as gzip JSON arrays to `POST /api/v2/staging/tables/{table}` (asynchronous:
//! Carol answers before the data is visible) or to its `/sync` variant (`sync: true`: Carol
//! answers once the data is in). Each request body stays under the sending limit Carol
//! reports (`GET /api/v3/staging/sendingLimit`, never above 80 MB), measured on the
//! compressed bytes actually sent, and holds as many records as fit — pycarol cuts by record
//! count (500) only, which makes many small requests and can still pass the limit. A cap on
//! records per request (`max_records`) is available, off by default.
//!
//! Encoding (JSON + gzip) runs on a blocking thread one chunk ahead of the sends, so the
//! CPU work overlaps the network. Sends are sequential: when the same crosswalk appears
//! twice in the input, the later row wins, as it would in one request.

use super::client::{check, check_table, Body, Carol, Retries};
use super::records::{prepare, Chunk, Chunker};
use async_trait::async_trait;
use engine::events::Level;
use engine::step::{Problem, StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use reqwest::Method;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

/// Send the `input:` table's rows to a Carol staging table as records.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CarolSend {
    /// The staging table (its schema must exist: see `carol.schema`).
    pub table: String,
    /// Use the synchronous endpoint (`/sync`): each request returns once Carol stored the
    /// records. For small batches; default false (asynchronous).
    #[serde(default)]
    pub sync: bool,
    /// At most this many records per request (default: no cap; requests are bounded by
    /// the sending limit alone).
    #[serde(default)]
    pub max_records: Option<u64>,
    /// Retries of one request on a connection error or HTTP 408, 409, 429, 500, 502, 503,
    /// 504, 520, 524 or 598, with exponential backoff from 0.5 s (default 10, as pycarol).
    #[serde(default)]
    pub retries: Option<u32>,
    /// gzip level, 1 (fastest) to 9 (smallest); default 6.
    #[serde(default)]
    pub gzip_level: Option<u32>,
}

/// Outputs of `carol.send` (`rows` = `records`: the run history counts it, and
/// `carol.heartbeat` reports it).
pub const OUTPUTS: [&str; 7] = [
    "records",
    "rows",
    "requests",
    "bytes_sent",
    "bytes_raw",
    "elapsed_ms",
    "limit_bytes",
];

#[async_trait]
impl StepConfig for CarolSend {
    const TYPE: &'static str = "carol.send";
    const SUMMARY: &'static str =
        "Send the input table to a Carol staging table: gzip JSON requests kept under Carol's sending limit, retried as pycarol does";

    fn static_info(&self) -> StaticInfo {
        super::outputs_info(&OUTPUTS)
    }

    fn problems(&self) -> Vec<Problem> {
        match self.gzip_level {
            Some(l) if !(1..=9).contains(&l) => {
                vec![Problem::at("gzip_level", "`gzip_level` must be 1 to 9")]
            }
            _ => Vec::new(),
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let started = Instant::now();
        check_table(&self.table)?;
        let carol = Carol::from_ctx(&ctx)?;
        let input = ctx
            .inputs
            .first()
            .ok_or_else(|| StepError::fatal("carol.send needs `input:` (a table)"))?
            .1
            .clone();
        let limit = carol.sending_limit(&ctx).await?;
        let total = input.rows();
        ctx.log(
            Level::Info,
            &format!(
                "Carol: sending {total} records to {} ({}; requests up to {limit} bytes)",
                self.table,
                if self.sync { "sync" } else { "async" }
            ),
        );

        // The encoder, one chunk ahead of the sends.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Chunk, String>>(1);
        let max_records = self.max_records.unwrap_or(0) as usize;
        let level = self.gzip_level.unwrap_or(6);
        let encoder = tokio::task::spawn_blocking(move || {
            let df = match crate::table::frame(&input)
                .ok_or_else(|| "the input is not a table".to_string())
                .and_then(prepare)
            {
                Ok(df) => df,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            let mut chunker = Chunker::new(df, limit as usize, max_records, level);
            loop {
                match chunker.next_chunk() {
                    Ok(Some(c)) => {
                        if tx.blocking_send(Ok(c)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });

        let path = if self.sync {
            format!("/api/v2/staging/tables/{}/sync", self.table)
        } else {
            format!("/api/v2/staging/tables/{}", self.table)
        };
        let mut query = vec![
            ("returnData", "false".to_string()),
            ("connectorId", carol.connector_id.clone()),
        ];
        if self.sync {
            query.push(("processMerge", "true".to_string()));
        }
        let policy = Retries {
            retries: self.retries.unwrap_or(super::client::DEFAULT_RETRIES),
            ..Retries::default()
        };
        let (mut records, mut requests, mut sent, mut raw, mut retries, mut largest) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        let outcome: Result<(), StepError> = async {
            while let Some(chunk) = crate::http::client::cancellable(&ctx, rx.recv()).await? {
                let chunk = chunk.map_err(|e| StepError::fatal(format!("encoding records: {e}")))?;
                let size = chunk.body.len() as u64;
                let n = chunk.records as u64;
                let body = Body::Gzip(bytes::Bytes::from(chunk.body));
                let reply = carol
                    .request(&ctx, Method::POST, &path, &query, &body, policy)
                    .await?;
                check(&ctx, &Method::POST, &path, &reply).map_err(|e| StepError {
                    message: format!(
                        "{} (request {} of rows {}..{}; {} records sent before it)",
                        e.message,
                        requests + 1,
                        chunk.first_row + 1,
                        chunk.first_row + chunk.records,
                        records
                    ),
                    retryable: e.retryable,
                })?;
                requests += 1;
                records += n;
                sent += size;
                raw += chunk.raw_bytes as u64;
                retries += reply.retries as u64;
                largest = largest.max(size);
                ctx.log(
                    Level::Info,
                    &format!(
                        "Carol request {requests}: {n} records, {size} bytes gzip ({} raw), HTTP {} in {} ms",
                        chunk.raw_bytes,
                        reply.status.as_u16(),
                        reply.elapsed.as_millis()
                    ),
                );
                ctx.progress(&[("records", records), ("requests", requests), ("bytes", sent)]);
            }
            Ok(())
        }
        .await;
        drop(rx);
        let _ = encoder.await;
        outcome?;

        let elapsed = started.elapsed();
        let minimum = sent.div_ceil(limit.max(1));
        let result = json!({
            "table": self.table,
            "records": records,
            "rows": records,
            "requests": requests,
            "bytes_sent": sent,
            "bytes_raw": raw,
            "elapsed_ms": elapsed.as_millis() as u64,
            "limit_bytes": limit,
            "largest_request_bytes": largest,
            "retries": retries,
        });
        ctx.log(
            Level::Info,
            &format!(
                "Carol: {records} records to {} in {requests} requests (minimum {minimum}), {sent} bytes gzip of {raw}, largest {largest} of limit {limit}, {retries} retries, {}",
                self.table,
                engine::duration::human(Duration::from_millis(elapsed.as_millis() as u64))
            ),
        );
        Ok(super::finish(result, &OUTPUTS, Vec::new()))
    }
}
