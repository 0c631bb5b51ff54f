//! Errors as RFC 9457 problem documents: `{"type", "title", "status", "detail"}` with
//! `application/problem+json`. Every handler returns [`Problem`] on failure, so no endpoint
//! answers a bare text or an HTML error, and bad input is always a 4xx: a 5xx means the
//! store (or the server) failed, and its detail says so without leaking anything.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A problem document.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The status's reason phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// For a 422: the field (or param) at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For a 429: seconds until trying again may work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, detail)
    }
    /// A 422 naming the field at fault.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail);
        p.field = Some(field.into());
        p
    }
    pub fn too_many(retry_after: u64, detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(StatusCode::TOO_MANY_REQUESTS, detail);
        p.retry_after = Some(retry_after);
        p
    }
    /// The store failed: a 503 (the database may be away), the cause in the server's log
    /// only (it may name hosts or paths).
    pub fn unavailable(cause: impl std::fmt::Display) -> Problem {
        crate::log(format!("store error answering a request: {cause}"));
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store did not answer; try again (the server's log says why)",
        )
    }
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.title, self.detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = retry {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pipe\""),
            );
        }
        resp
    }
}

impl From<store::StoreError> for Problem {
    fn from(e: store::StoreError) -> Problem {
        match e {
            store::StoreError::NotFound(m) => Problem::not_found(m),
            store::StoreError::Conflict(m) => Problem::conflict(m),
            store::StoreError::Fenced(m) => Problem::conflict(m),
            store::StoreError::Invalid(m) => Problem::bad_request(m),
            other => Problem::unavailable(other),
        }
    }
}

/// Handlers' result.
pub type ApiResult<T> = Result<T, Problem>;
