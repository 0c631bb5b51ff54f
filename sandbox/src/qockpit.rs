//! The QOCKPIT-like KPI platform (`api-contracts.md`, "Sandbox QOCKPIT platform"), on its
//! own port so that its base URL can end in `/api` like the real `https://qockpit.io/api`.
//!
//! The platform is what tells the customer's script which indicators to compute: it lists
//! the registered integrations, each with the SQL to run on the customer's database for a
//! month (`:inicio` and `:fim` are the first day of the month and of the next), and takes the
//! rows back. The SQL here runs on the sandbox's [demo database](crate::demo_db), so
//! `pipelines/qockpit-kpi.yaml` runs end to end offline.
//!
//! What a run sent is kept per integration and period (a re-sent period replaces the
//! earlier rows, as the contract says) and shown by [`crate::Sandbox::qockpit_results`] and
//! `GET /__sandbox/qockpit`. Requests count in the stats as `qockpit_ping`,
//! `qockpit_integrations` and `qockpit_results`; a fault rule for `qockpit` hits all three.

use crate::{faults, hash, Shared};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// The path prefix of every endpoint (the real `BASE_ENDPOINT` ends in `/api` too).
pub(crate) const BASE_PATH: &str = "/api";

/// One registered KPI integration.
pub(crate) struct Integration {
    pub id: u64,
    pub name: &'static str,
    pub indicator: &'static str,
    pub sql: &'static str,
}

/// The integrations the platform lists (all `type=kpi`, `source: "default"`).
pub(crate) const INTEGRATIONS: [Integration; 3] = [
    Integration {
        id: 1,
        name: "Faturamento mensal por filial",
        indicator: "faturamento",
        sql: "SELECT filial, COUNT(*) AS qtd_vendas, ROUND(SUM(valor), 2) AS faturamento \
              FROM vendas WHERE dt >= :inicio AND dt < :fim GROUP BY filial ORDER BY filial",
    },
    Integration {
        id: 2,
        name: "Chamados abertos no mês por canal",
        indicator: "chamados_abertos",
        sql: "SELECT canal, COUNT(*) AS chamados FROM atendimentos \
              WHERE aberto_em >= :inicio AND aberto_em < :fim GROUP BY canal ORDER BY canal",
    },
    Integration {
        id: 3,
        name: "Tempo médio de atendimento (horas)",
        indicator: "tma_horas",
        sql: "SELECT COUNT(*) AS chamados_fechados, \
              ROUND(AVG((julianday(fechado_em) - julianday(aberto_em)) * 24), 2) AS tma_horas \
              FROM atendimentos \
              WHERE fechado_em IS NOT NULL AND aberto_em >= :inicio AND aberto_em < :fim",
    },
];

/// The rows last sent for one integration and period, and how often it was sent.
#[derive(Default)]
struct Received {
    rows: Vec<Value>,
    posts: u64,
}

/// The platform's credentials (from the seed) and what it received.
pub(crate) struct Platform {
    pub domain: String,
    pub api_token: String,
    /// integration id → period → what was received.
    results: Mutex<BTreeMap<u64, BTreeMap<String, Received>>>,
}

impl Platform {
    pub(crate) fn new(seed: u64) -> Platform {
        Platform {
            domain: format!("empresa{:04x}", hash(seed, &[0x716f_636b, 1]) & 0xffff),
            api_token: format!(
                "{:016x}{:016x}",
                hash(seed, &[0x716f_636b, 2]),
                hash(seed, &[0x716f_636b, 3])
            ),
            results: Mutex::new(BTreeMap::new()),
        }
    }

    /// `{"<id>": {"<period>": {"rows": [...], "received": N, "posts": P}}}`.
    pub(crate) fn results(&self) -> Value {
        let r = self.results.lock().unwrap();
        let mut out = Map::new();
        for (id, periods) in r.iter() {
            let mut p = Map::new();
            for (period, r) in periods {
                p.insert(
                    period.clone(),
                    json!({"rows": r.rows, "received": r.rows.len(), "posts": r.posts}),
                );
            }
            out.insert(id.to_string(), Value::Object(p));
        }
        Value::Object(out)
    }
}

/// The stats/fault endpoint of a request to this port.
pub(crate) fn endpoint_of(path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix(BASE_PATH)?.strip_prefix('/')?;
    let (_domain, tail) = rest.split_once('/')?;
    if tail == "ping" {
        Some("qockpit_ping")
    } else if tail == "integrations" {
        Some("qockpit_integrations")
    } else if tail.starts_with("integrations/") {
        Some("qockpit_results")
    } else {
        None
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(&format!("{BASE_PATH}/{{domain}}/ping"), get(ping))
        .route(
            &format!("{BASE_PATH}/{{domain}}/integrations"),
            get(integrations),
        )
        .route(
            &format!("{BASE_PATH}/{{domain}}/integrations/{{id}}/results"),
            post(results),
        )
        .route("/__sandbox/qockpit", get(sandbox_results))
        .route("/__sandbox/stats", get(stats))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn_with_state(shared.clone(), faults::gate))
        .with_state(shared)
}

/// An error in the platform's (Django REST framework) shape.
pub(crate) fn detail(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"detail": message}))).into_response()
}

/// Check the token and the domain; `None` when the request may go on.
fn refuse(shared: &Shared, headers: &HeaderMap, domain: &str) -> Option<Response> {
    let p = &shared.qockpit;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("token"))
        .map(|(_, t)| t.trim());
    if token != Some(p.api_token.as_str()) {
        return Some(detail(StatusCode::UNAUTHORIZED, "invalid token"));
    }
    (domain != p.domain).then(|| detail(StatusCode::NOT_FOUND, "not found"))
}

async fn ping(
    State(shared): State<Arc<Shared>>,
    Path(domain): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refuse(&shared, &headers, &domain) {
        return r;
    }
    Json(json!({"ok": true, "domain": domain})).into_response()
}

async fn integrations(
    State(shared): State<Arc<Shared>>,
    Path(domain): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(r) = refuse(&shared, &headers, &domain) {
        return r;
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let kind = pairs.iter().find(|(k, _)| k == "type").map(|(_, v)| v);
    let list: Vec<Value> = if kind.is_some_and(|k| k != "kpi") {
        Vec::new()
    } else {
        INTEGRATIONS
            .iter()
            .map(|i| {
                json!({"id": i.id, "name": i.name, "indicator": i.indicator,
                    "type": "kpi", "source": "default", "sql": i.sql})
            })
            .collect()
    };
    Json(list).into_response()
}

/// `YYYY-MM` with a month from 01 to 12.
fn valid_period(p: &str) -> bool {
    let b = p.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
        && matches!(p[5..].parse::<u8>(), Ok(1..=12))
}

async fn results(
    State(shared): State<Arc<Shared>>,
    Path((domain, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refuse(&shared, &headers, &domain) {
        return r;
    }
    let Some(id) = id
        .parse::<u64>()
        .ok()
        .filter(|id| INTEGRATIONS.iter().any(|i| i.id == *id))
    else {
        return detail(StatusCode::NOT_FOUND, "not found");
    };
    let gzipped = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let body = if gzipped {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return detail(StatusCode::BAD_REQUEST, "invalid gzip body");
        }
        Bytes::from(out)
    } else {
        body
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return detail(StatusCode::BAD_REQUEST, "expected a JSON object"),
        Err(e) => return detail(StatusCode::BAD_REQUEST, &format!("JSON parse error - {e}")),
    };
    let period = match v.get("period") {
        Some(Value::String(p)) if valid_period(p) => p.clone(),
        Some(_) => {
            return detail(
                StatusCode::BAD_REQUEST,
                "period: enter a month as YYYY-MM (e.g. 2019-01)",
            )
        }
        None => return detail(StatusCode::BAD_REQUEST, "period: this field is required"),
    };
    let rows = match v.get("rows") {
        Some(Value::Array(rows)) if rows.iter().all(Value::is_object) => rows.clone(),
        Some(_) => {
            return detail(
                StatusCode::BAD_REQUEST,
                "rows: expected a list of objects (one per result row)",
            )
        }
        None => return detail(StatusCode::BAD_REQUEST, "rows: this field is required"),
    };
    let received = rows.len();
    {
        let mut r = shared.qockpit.results.lock().unwrap();
        let slot = r.entry(id).or_default().entry(period).or_default();
        slot.rows = rows;
        slot.posts += 1;
    }
    (StatusCode::CREATED, Json(json!({"received": received}))).into_response()
}

async fn sandbox_results(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.qockpit.results()).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.stats()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_endpoints() {
        assert!(valid_period("2019-01"));
        assert!(valid_period("2025-12"));
        for bad in [
            "2019-13", "2019-00", "2019-1", "19-01-01", "abcd-01", "2019/01",
        ] {
            assert!(!valid_period(bad), "{bad}");
        }
        assert_eq!(endpoint_of("/api/empresa/ping"), Some("qockpit_ping"));
        assert_eq!(
            endpoint_of("/api/empresa/integrations"),
            Some("qockpit_integrations")
        );
        assert_eq!(
            endpoint_of("/api/empresa/integrations/2/results"),
            Some("qockpit_results")
        );
        assert_eq!(endpoint_of("/__sandbox/qockpit"), None);
    }
}
