//! Every `pipe` step type, and the one [`registry`] that lists them.
//!
//! A step type is a config struct (serde with `deny_unknown_fields`, schemars, a doc comment
//! on every field — they become the schema descriptions) implementing
//! [`engine::step::StepConfig`]. The engine never names a concrete type: it looks steps up in
//! the [`engine::step::Registry`] returned here.
//!
//! Adding a step type = one module + one line in [`registry`].

pub mod bigquery;
pub mod carol;
pub mod exec;
pub mod files;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod log;
pub mod sheets;
pub mod sql;
pub mod table;
pub mod tokens;
pub mod transform;

use engine::connection::ConnectionKind;
use engine::step::{Registry, StepKind};

/// Make ring rustls's process-wide crypto provider. Two are compiled in (tiberius's
/// tokio-rustls brings aws-lc-rs), and then rustls will not guess: code that builds a TLS
/// config with the default provider (hyper-rustls under yup-oauth2) would panic. Idempotent.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every step type `pipe` knows.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.table_ops = Some(std::sync::Arc::new(table::FrameOps));
    r.register(StepKind::of::<exec::Exec>());
    r.register(StepKind::of::<log::Log>());
    r.register(StepKind::of::<sheets::SheetsRead>());
    r.register(StepKind::of::<http::HttpRequest>());
    r.register(StepKind::of::<http::HttpExtract>());
    r.register(StepKind::of::<files::FileRead>());
    r.register(StepKind::of::<files::FileWrite>());
    r.register(StepKind::of::<transform::Transform>());
    r.register(StepKind::of::<bigquery::BigQueryLoad>());
    r.register(StepKind::of::<sql::SqlQuery>());
    r.register(StepKind::of::<sql::SqlWrite>());
    r.register(StepKind::of::<http::HttpSend>());
    r.register(StepKind::of::<carol::CarolSchema>());
    r.register(StepKind::of::<carol::CarolSend>());
    r.register(StepKind::of::<carol::CarolDelete>());
    r.register(StepKind::of::<carol::CarolHeartbeat>());
    let c = &mut r.connections;
    // Each kind with its `--sandbox` mapping onto the local fakes (in its own module).
    c.register(
        ConnectionKind::of::<http::client::Connection>(
            "http",
            "An HTTP API: base URL, headers and auth of the http.* steps",
        )
        .with_sandbox(http::client::sandbox),
    );
    c.register(
        ConnectionKind::of::<sheets::GoogleConnection>(
            "google_service_account",
            "A Google service-account key (sheets.read; bigquery's `credentials`)",
        )
        .with_sandbox(sheets::sandbox),
    );
    c.register(
        ConnectionKind::of::<bigquery::Connection>(
            "bigquery",
            "A BigQuery project (bigquery.load)",
        )
        .with_sandbox(bigquery::sandbox),
    );
    c.register(
        ConnectionKind::of::<carol::client::Connection>(
            "carol",
            "A TOTVS Carol tenant and connector (carol.* steps)",
        )
        .with_sandbox(carol::client::sandbox),
    );
    for &name in sql::conn::CONNECTION_TYPES {
        c.register(
            ConnectionKind::of::<sql::conn::Spec>(name, "A SQL database (sql.query, sql.write)")
                .with_sandbox(sql::conn::sandbox),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_connection_type_the_steps_read_is_registered() {
        let r = super::registry();
        let mut expected = vec!["http", "google_service_account", "bigquery", "carol"];
        expected.extend(super::sql::conn::CONNECTION_TYPES);
        assert_eq!(r.connections.names().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn every_connection_type_says_what_it_becomes_under_sandbox() {
        // Else `--sandbox` would run it against the real service.
        for kind in super::registry().connections.kinds() {
            assert!(
                kind.sandbox.is_some(),
                "`{}` has no sandbox hook",
                kind.name
            );
        }
    }

    #[test]
    fn registry_lists_every_step_with_a_described_schema() {
        let r = super::registry();
        assert_eq!(
            r.names().collect::<Vec<_>>(),
            [
                "exec",
                "log",
                "sheets.read",
                "http.request",
                "http.extract",
                "file.read",
                "file.write",
                "transform",
                "bigquery.load",
                "sql.query",
                "sql.write",
                "http.send",
                "carol.schema",
                "carol.send",
                "carol.delete",
                "carol.heartbeat",
            ]
        );
        let mut g = schemars::SchemaGenerator::default();
        for kind in r.kinds() {
            assert!(!kind.summary.is_empty());
            (kind.schema)(&mut g);
        }
        let defs = serde_json::to_value(g.definitions()).unwrap();
        let exec = &defs["Exec"];
        assert_eq!(exec["additionalProperties"], false);
        assert_eq!(exec["required"], serde_json::json!(["command"]));
        for (name, prop) in exec["properties"].as_object().unwrap() {
            assert!(
                prop["description"].is_string(),
                "exec.{name} has no description"
            );
        }
        for (name, prop) in defs["Log"]["properties"].as_object().unwrap() {
            assert!(
                prop["description"].is_string(),
                "log.{name} has no description"
            );
        }
    }
}
