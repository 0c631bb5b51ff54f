//! HTTP steps: `http.request` (one call) and `http.extract` (page through an API into a table).
//!
//! The scripts `pipe` replaces each carried their own copy of the same HTTP plumbing — a
//! login, a token header, a `while has_more` loop, a `time.sleep` after a 429 — and each got a
//! different corner wrong (a page skipped after a retry, a token printed in a traceback, a
//! loop that never ended when the API repeated a cursor). These modules do it once:
//!
//! * [`client`] — the `http` connection, the one shared `reqwest::Client`, retries with
//!   backoff and `Retry-After`, cancellation, secrets taught to the redactor;
//! * [`auth`] — basic, bearer, API key and OAuth2 (with a process-wide token cache);
//! * [`request`] — the `http.request` step;
//! * [`send`] — the `http.send` step: a table's rows to an API as JSON, in batches;
//! * [`extract`] — the `http.extract` step: pagination strategies, stop rules, concurrent
//!   fetching of addressable pages reassembled in order, rate limits;
//! * [`records`] — JSON records into typed Polars columns, page by page.

pub mod auth;
pub mod client;
pub mod extract;
pub mod records;
pub mod request;
pub mod send;

pub use extract::HttpExtract;
pub use request::HttpRequest;
pub use send::HttpSend;

#[cfg(test)]
pub(crate) mod testutil;
