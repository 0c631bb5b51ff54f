//! `pipe serve --listen ADDR`: the REST API under `/api/v1/` and the web dashboard.
//!
//! The server reads and writes only the store: it lists integrations and runs, queues
//! triggers, repairs and backfills, asks runs to cancel and workers to drain, and
//! authenticates callers against the store's users and machine tokens. It never runs a
//! step and knows no concrete step type (it is given the registry to validate files and to
//! list the plugins), so it works the same beside embedded workers and beside remote
//! `pipe worker`s, and any number of servers may serve one PostgreSQL store.
//!
//! - [`api`]: the handlers; their own types generate the OpenAPI 3.1 document
//!   (utoipa), served at `/api/v1/schema/` with Swagger UI at `/api/v1/docs/` and Redoc
//!   at `/api/v1/redoc/`, all assets from the binary ([`docs`]).
//! - [`auth`]: passwords, JWTs, machine tokens, roles, the failed-login limit.
//! - [`problem`]: every error is an RFC 9457 problem document; bad input is a 4xx.
//! - [`events`]: one task watches the store for run and step changes and fans them out to
//!   the SSE streams (`/api/v1/events`, a run's live log) and the metrics.
//!
//! The store is synchronous; handlers call it on the blocking pool ([`AppState::db`]).

pub mod api;
pub mod auth;
mod dashboard;
mod docs;
mod events;
mod metrics;
pub mod ops;
mod plans;
pub mod problem;

use crate::problem::{ApiResult, Problem};
use axum::http::{header, HeaderValue};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The most bytes a request body may have.
pub const MAX_BODY: usize = 1 << 20;

/// What the server needs.
pub struct ServerConfig {
    pub store: Arc<dyn store::RunStore>,
    /// The step and connection types (to validate integration files, list plugins).
    pub registry: Arc<engine::step::Registry>,
    /// `pipe`'s version, for `/health` and the OpenAPI document.
    pub version: String,
    /// Plans repairs (the runner's; `None`: repairs answer 409).
    pub repairs: Option<Arc<dyn api::runs::RepairPlanner>>,
    /// Stored credentials (with the master key when one is set).
    pub vault: credentials::Vault,
    /// Every run goes to pipe's local fakes (`pipe serve --sandbox`): the dashboard says so.
    pub sandbox: bool,
}

/// A line on stderr with the time: the server's log (the service's format).
pub fn log(msg: impl std::fmt::Display) {
    eprintln!(
        "{} {msg}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
}

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Arc<dyn store::RunStore>,
    keys: auth::Keys,
    limiter: auth::LoginLimiter,
    plans: plans::Plans,
    events: events::Events,
    metrics: metrics::Metrics,
    version: String,
    repairs: Option<Arc<dyn api::runs::RepairPlanner>>,
    vault: credentials::Vault,
    sandbox: bool,
    shutdown: CancellationToken,
}

impl AppState {
    /// Load the signing key (made on first use) and start watching the store.
    pub async fn new(cfg: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<AppState> {
        let store = cfg.store.clone();
        let keys = tokio::task::spawn_blocking(move || auth::Keys::load(store.as_ref()))
            .await?
            .map_err(|e| anyhow::anyhow!("cannot read the API's signing key: {e}"))?;
        let state = AppState(Arc::new(Inner {
            store: cfg.store,
            keys,
            limiter: auth::LoginLimiter::new(),
            plans: plans::Plans::new(cfg.registry),
            events: events::Events::new(),
            metrics: metrics::Metrics::new(),
            version: cfg.version,
            repairs: cfg.repairs,
            vault: cfg.vault,
            sandbox: cfg.sandbox,
            shutdown,
        }));
        tokio::spawn(events::watch(state.clone()));
        Ok(state)
    }

    pub fn store(&self) -> &Arc<dyn store::RunStore> {
        &self.0.store
    }
    pub(crate) fn keys(&self) -> &auth::Keys {
        &self.0.keys
    }
    pub(crate) fn limiter(&self) -> &auth::LoginLimiter {
        &self.0.limiter
    }
    pub(crate) fn plans(&self) -> &plans::Plans {
        &self.0.plans
    }
    pub(crate) fn events(&self) -> &events::Events {
        &self.0.events
    }
    pub(crate) fn metrics(&self) -> &metrics::Metrics {
        &self.0.metrics
    }
    pub(crate) fn repairs(&self) -> Option<Arc<dyn api::runs::RepairPlanner>> {
        self.0.repairs.clone()
    }
    pub(crate) fn vault(&self) -> &credentials::Vault {
        &self.0.vault
    }
    /// Runs go to the local fakes (`pipe serve --sandbox`).
    pub fn sandbox(&self) -> bool {
        self.0.sandbox
    }
    pub fn version(&self) -> &str {
        &self.0.version
    }
    /// Cancelled when the server stops: long-lived streams end with it.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    /// Run `f` with the store on the blocking pool.
    pub async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn store::RunStore) -> store::Result<T> + Send + 'static,
    ) -> ApiResult<T> {
        let store = self.0.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(r) => r.map_err(Problem::from),
            Err(e) => Err(Problem::unavailable(format!("store call panicked: {e}"))),
        }
    }

    /// Run blocking work that may fail with a problem (validation, hashing).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AppState) -> ApiResult<T> + Send + 'static,
    ) -> ApiResult<T> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(r) => r,
            Err(e) => Err(Problem::unavailable(format!("blocking call panicked: {e}"))),
        }
    }
}

/// The whole application: API, docs, health, metrics (and the dashboard, at `/`).
pub fn app(state: AppState) -> Router {
    let (api, openapi) = api::parts();
    Router::new()
        .merge(api)
        .merge(docs::router(openapi))
        .merge(metrics::router())
        .merge(dashboard::router())
        .fallback(|| async { Problem::not_found("no such page or endpoint (the API is under /api/v1/, its documentation at /api/v1/docs/)") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method (see /api/v1/docs/)",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Headers on every response: no sniffing, no framing, no referrer; a CSP for responses
/// that set none (JSON and problems: nothing may run).
async fn security_headers(mut resp: axum::response::Response) -> axum::response::Response {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'",
        ));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The OpenAPI document, as `/api/v1/schema/` serves it (for the checked-in copy).
pub fn openapi_json() -> String {
    let (_, openapi) = api::parts();
    openapi.to_pretty_json().unwrap_or_default()
}

/// Serve on `listener` until `shutdown` is cancelled (open streams end with it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState::new(cfg, shutdown.clone()).await?;
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
