//! TOTVS Carol staging: `carol.schema`, `carol.send`, `carol.delete`, `carol.heartbeat`.
//!
//! What the Carol staging connector (`../shared/seeds/003_…`) does by hand — log in, define a
//! staging table's schema with its crosswalk (primary key), send records as gzip JSON
//! arrays, delete by crosswalk, report a heartbeat — as four steps over one `carol`
//! connection:
//!
//! ```yaml
//! connections:
//!   carol:
//!     type: carol
//!     tenant: mytenant                     # https://mytenant.carol.ai
//!     connector_id: "{{ env('CAROL_CONNECTOR_ID') }}"
//!     username: "{{ env('CAROL_USER') }}"
//!     password: "{{ secret('CAROL_PASSWORD') }}"   # or api_key: "{{ secret('CAROL_API_KEY') }}"
//! ```
//!
//! * [`client`] — the connection, OAuth2 (password grant; tokens cached per process,
//!   refreshed 60 s before expiry and once on a 401; `Authorization: <token>` with no
//!   scheme) or the connector API key headers, and one request with Carol's retries;
//! * [`records`] — a dataframe as JSON records, and the gzip chunker that keeps every
//!   request body under the sending limit;
//! * [`schema`], [`send`], [`delete`], [`heartbeat`] — the steps.
//!
//! HTTP goes through the process-wide client of [`crate::http::client`] (pool, rustls,
//! proxies, cancellation); secrets (password, API key, tokens) are taught to the run's
//! redactor before any request leaves.

pub mod client;
pub mod delete;
pub mod heartbeat;
pub mod records;
pub mod schema;
pub mod send;

pub use delete::CarolDelete;
pub use heartbeat::CarolHeartbeat;
pub use schema::CarolSchema;
pub use send::CarolSend;

use engine::step::{StaticInfo, StepContext, StepError, StepOutput};
use polars::prelude::DataFrame;
use serde_json::{Map, Value};

/// What `pipe validate` knows of a Carol step: these outputs, no table.
fn outputs_info(keys: &[&str]) -> StaticInfo {
    StaticInfo {
        outputs: Some(keys.iter().map(|s| s.to_string()).collect()),
        ..StaticInfo::default()
    }
}

/// The step's result, with `keys` of it as its outputs.
fn finish(result: Value, keys: &[&str], warnings: Vec<String>) -> StepOutput {
    let outputs: Map<String, Value> = keys
        .iter()
        .map(|k| (k.to_string(), result[*k].clone()))
        .collect();
    StepOutput {
        outputs,
        result,
        table: None,
        warnings,
    }
}

/// The `input:` table (`what` says what it must hold).
fn input_frame<'a>(ctx: &'a StepContext, what: &str) -> Result<&'a DataFrame, StepError> {
    let (_, input) = ctx
        .inputs
        .first()
        .ok_or_else(|| StepError::fatal(format!("this step needs `input:` ({what})")))?;
    crate::table::frame(input).ok_or_else(|| StepError::fatal("the input is not a table"))
}

#[cfg(test)]
mod sandbox_tests;
