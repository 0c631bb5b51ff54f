//! The store's error: a caller can tell "no such thing" and "not in a state for that" from
//! a database failure (the REST API maps them to 404, 409 and 500), and every variant's
//! message is complete on its own (`{e}` and `{e:#}` both read well).

use std::fmt;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug)]
pub enum StoreError {
    /// "run 7 not found".
    NotFound(String),
    /// The thing exists but is not in a state for the request ("run 7 is already failed").
    Conflict(String),
    /// A fenced write of a run that is no longer its claim's (the run was marked abandoned,
    /// or claimed again, after its worker's lease expired): nothing was written, and the
    /// writer should stop working on the run. A kind of conflict (the API's 409).
    Fenced(String),
    /// A bad request or configuration (an unknown `--db` scheme, a status that does not
    /// finish a run).
    Invalid(String),
    /// The database or the file system failed; the chain says what and where.
    Backend(anyhow::Error),
}

impl StoreError {
    pub fn not_found(msg: impl Into<String>) -> Self {
        StoreError::NotFound(msg.into())
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        StoreError::Conflict(msg.into())
    }
    pub fn fenced(msg: impl Into<String>) -> Self {
        StoreError::Fenced(msg.into())
    }
    /// `Conflict` or `Fenced`: not in a state for the request.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_) | StoreError::Fenced(_))
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        StoreError::Invalid(msg.into())
    }
    /// Add context to a backend error (other variants are left as they are).
    pub fn context(self, what: impl fmt::Display) -> Self {
        match self {
            StoreError::Backend(e) => StoreError::Backend(e.context(what.to_string())),
            other => other,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotFound(m)
            | StoreError::Conflict(m)
            | StoreError::Fenced(m)
            | StoreError::Invalid(m) => f.write_str(m),
            // `{:#}` writes the whole chain: the database's own message included.
            StoreError::Backend(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<anyhow::Error> for StoreError {
    fn from(e: anyhow::Error) -> Self {
        // An anyhow error that wraps a StoreError keeps its kind.
        match e.downcast::<StoreError>() {
            Ok(s) => s,
            Err(e) => StoreError::Backend(e),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.into())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Backend(e.into())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Backend(e.into())
    }
}

/// `.with_context(..)` on any result whose error converts into a store error.
pub(crate) trait Context<T> {
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<StoreError>> Context<T> for std::result::Result<T, E> {
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}
