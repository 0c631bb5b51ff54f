//! The API's documentation, served from the binary: the OpenAPI document at
//! `/api/v1/schema/`, Swagger UI at `/api/v1/docs/` (utoipa-swagger-ui's `vendored`
//! feature: its files are in a crate, nothing is fetched at build time) and Redoc at
//! `/api/v1/redoc/` (its standalone bundle vendored from npm under `server/assets/`).

use crate::AppState;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa_swagger_ui::SwaggerUi;

const REDOC_JS: &[u8] = include_bytes!("../assets/redoc.standalone.js");

/// The pages' CSP: their own scripts only; Swagger UI and Redoc style inline and Redoc runs a
/// worker from a blob.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; worker-src 'self' blob:; font-src 'self' data:; connect-src 'self'; \
    frame-ancestors 'none'";

pub fn router(openapi: utoipa::openapi::OpenApi) -> Router<AppState> {
    let swagger: Router<AppState> = SwaggerUi::new("/api/v1/docs")
        .url("/api/v1/schema/", openapi)
        .into();
    Router::new()
        .merge(swagger)
        .route("/api/v1/redoc/", get(redoc))
        .route("/api/v1/redoc/redoc.standalone.js", get(redoc_js))
        .layer(axum::middleware::map_response(docs_csp))
}

async fn docs_csp(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(DOCS_CSP),
    );
    resp
}

async fn redoc() -> Html<&'static str> {
    Html(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pipe API (Redoc)</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="/api/v1/schema/"></redoc>
<script src="/api/v1/redoc/redoc.standalone.js"></script></body></html>"#,
    )
}

async fn redoc_js() -> Response {
    let mut resp = REDOC_JS.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    resp
}
