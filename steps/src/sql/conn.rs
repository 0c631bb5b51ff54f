//! The SQL connections: `postgres`, `mysql` (MariaDB too), `sqlite`, `sqlserver`, `odbc`.
//!
//! Each takes either a `url` (or, for SQL Server, an ADO.NET connection string; for ODBC a
//! `connection_string` or a `dsn`) or separate fields. Every password — a field, or the one
//! inside a URL or connection string — is taught to the run's redactor before anything is
//! attempted, so no error, log row or output can show it.

use engine::step::{StepContext, StepError};

/// Every connection `type:` a SQL step accepts (aliases included): the connection registry
/// and `--sandbox` (which points each at the demo database) both read this list.
pub const CONNECTION_TYPES: &[&str] = &[
    "postgres",
    "postgresql",
    "mysql",
    "mariadb",
    "sqlite",
    "sqlserver",
    "mssql",
    "odbc",
];
use serde::Deserialize;
use serde_json::Value;

/// Which database a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Mysql,
    Sqlite,
    SqlServer,
    Odbc,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
            Backend::Sqlite => "sqlite",
            Backend::SqlServer => "sqlserver",
            Backend::Odbc => "odbc",
        }
    }
}

/// A SQL connection's fields, as rendered by the engine.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "SqlConnection")]
pub struct Spec {
    /// `postgres` (or `postgresql`), `mysql` (or `mariadb`), `sqlite`, `sqlserver` (or
    /// `mssql`), `odbc`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `postgres://user:pass@host:5432/db?sslmode=require`, `mysql://…`, `sqlite:///path` or
    /// a path; for `sqlserver` an ADO.NET string (`server=tcp:host,1433;user=…`).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub url: Option<String>,
    /// The server's host name or address.
    #[serde(default)]
    pub host: Option<String>,
    /// The server's port (default: the database's own).
    #[serde(default)]
    pub port: Option<u16>,
    /// The user (also `username`).
    #[serde(default, alias = "username")]
    pub user: Option<String>,
    /// The password (use `{{ secret('NAME') }}`).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub password: Option<String>,
    /// The database to connect to.
    #[serde(default)]
    pub database: Option<String>,
    /// SQLite: the database file (relative to the pipeline's folder).
    #[serde(default)]
    pub path: Option<String>,
    /// ODBC: a full connection string (`Driver={PostgreSQL Unicode};Server=…`).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub connection_string: Option<String>,
    /// ODBC: a data source name from odbc.ini.
    #[serde(default)]
    pub dsn: Option<String>,
    /// `disable` (default), `require`: TLS (rustls, web PKI roots) for postgres/mysql;
    /// for sqlserver `require` encrypts, otherwise the server's choice.
    #[serde(default)]
    pub sslmode: Option<String>,
    /// SQL Server: trust the server's certificate without checking it.
    #[serde(default)]
    pub trust_server_certificate: Option<bool>,
    /// What the connection is, for people.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    /// Ignored by `pipe run --sandbox`, which replaces every SQL connection with the demo
    /// SQLite database.
    #[serde(default)]
    #[allow(dead_code)]
    pub sandbox: Option<Value>,
}

impl engine::connection::ConnectionConfig for Spec {}

/// `--sandbox`: every database connection becomes the fakes' demo SQLite database, whatever
/// its server (its `sandbox:` field is not needed).
pub fn sandbox(
    t: &engine::connection::SandboxTarget,
) -> Result<Option<engine::connection::ConnectionOverride>, String> {
    Ok(Some(engine::connection::ConnectionOverride::Replace(vec![
        ("type".into(), "sqlite".into()),
        ("path".into(), t.fake("demo_db.path")),
    ])))
}

impl Spec {
    /// The step's connection, checked, with every password taught to the redactor.
    pub fn from_ctx(ctx: &StepContext, step: &str) -> Result<(Backend, Spec), StepError> {
        let value = ctx.connection.as_ref().ok_or_else(|| {
            StepError::fatal(format!(
                "{step} needs `connection:` naming a connection of type postgres, mysql, sqlite, sqlserver or odbc"
            ))
        })?;
        let spec: Spec = serde_json::from_value(value.clone())
            .map_err(|e| StepError::fatal(ctx.redactor.redact(&format!("connection: {e}"))))?;
        spec.learn_secrets(ctx);
        let backend = match spec.kind.as_str() {
            "postgres" | "postgresql" => Backend::Postgres,
            "mysql" | "mariadb" => Backend::Mysql,
            "sqlite" => Backend::Sqlite,
            "sqlserver" | "mssql" => Backend::SqlServer,
            "odbc" => Backend::Odbc,
            other => {
                return Err(StepError::fatal(format!(
                    "{step} cannot use a connection of type `{other}`: it needs postgres, mysql, sqlite, sqlserver or odbc"
                )))
            }
        };
        Ok((backend, spec))
    }

    /// Teach the redactor every password: the field, the one in a URL, the one in a
    /// connection string.
    pub fn learn_secrets(&self, ctx: &StepContext) {
        for s in self.secrets() {
            ctx.redactor.add(&s);
        }
    }

    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.password {
            out.push(p.clone());
        }
        for text in [&self.url, &self.connection_string].into_iter().flatten() {
            if let Ok(u) = url::Url::parse(text) {
                if let Some(p) = u.password() {
                    out.push(p.to_string());
                    if let Ok(d) = percent_decode(p) {
                        out.push(d);
                    }
                }
            }
            out.extend(conn_string_secrets(text));
        }
        out.retain(|s| !s.is_empty());
        out
    }

    /// Where the connection goes, for error messages (never the password).
    pub fn target(&self, backend: Backend) -> String {
        if let Some(u) = self.url.as_deref() {
            if let Ok(mut parsed) = url::Url::parse(u) {
                if parsed.has_host() {
                    let _ = parsed.set_password(None);
                    return format!(
                        "{}:{}",
                        parsed.host_str().unwrap_or(""),
                        parsed.port().map(|p| p.to_string()).unwrap_or_default()
                    )
                    .trim_end_matches(':')
                    .to_string();
                }
            }
        }
        match backend {
            Backend::Sqlite => self
                .path
                .clone()
                .or_else(|| self.url.clone())
                .unwrap_or_default(),
            Backend::Odbc => self
                .dsn
                .clone()
                .map(|d| format!("DSN {d}"))
                .or_else(|| {
                    self.connection_string
                        .as_deref()
                        .and_then(|c| conn_string_get(c, &["server", "servername", "host"]))
                })
                .unwrap_or_else(|| "the ODBC data source".into()),
            Backend::SqlServer => self
                .url
                .as_deref()
                .and_then(|c| conn_string_get(c, &["server", "data source", "address"]))
                .or_else(|| self.host_port(1433))
                .unwrap_or_default(),
            Backend::Postgres => self.host_port(5432).unwrap_or_default(),
            Backend::Mysql => self.host_port(3306).unwrap_or_default(),
        }
    }

    fn host_port(&self, default: u16) -> Option<String> {
        let h = self.host.as_deref().unwrap_or("localhost");
        Some(format!("{h}:{}", self.port.unwrap_or(default)))
    }

    pub fn wants_tls(&self) -> bool {
        let url_mode = self.url.as_deref().and_then(|u| {
            url::Url::parse(u).ok().and_then(|p| {
                p.query_pairs()
                    .find(|(k, _)| k == "sslmode" || k == "ssl-mode")
                    .map(|(_, v)| v.to_ascii_lowercase())
            })
        });
        matches!(
            self.sslmode
                .clone()
                .or(url_mode)
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("require" | "verify-ca" | "verify-full" | "required" | "verify_identity")
        )
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// `key=value;` pairs of an ADO.NET or ODBC connection string (`{…}` braces kept out).
pub fn conn_string_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(';')
            .trim()
            .to_ascii_lowercase();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(inner) = after.trim_start().strip_prefix('{') {
            let end = inner.find('}').unwrap_or(inner.len());
            let next = inner[end..].trim_start_matches('}');
            (
                inner[..end].to_string(),
                next.strip_prefix(';').unwrap_or(next),
            )
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (
                after[..end].trim().to_string(),
                after.get(end + 1..).unwrap_or(""),
            )
        };
        out.push((key, value));
        rest = next;
    }
    out
}

fn conn_string_get(s: &str, keys: &[&str]) -> Option<String> {
    conn_string_pairs(s)
        .into_iter()
        .find(|(k, _)| keys.contains(&k.as_str()))
        .map(|(_, v)| v)
}

fn conn_string_secrets(s: &str) -> Vec<String> {
    if !s.contains('=') || s.contains("://") {
        return Vec::new();
    }
    conn_string_pairs(s)
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "pwd" | "password"))
        .map(|(_, v)| v)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_urls_and_connection_strings() {
        let s = Spec {
            url: Some("postgres://app:s3cr%40t@db:5432/x".into()),
            ..Spec::default()
        };
        let got = s.secrets();
        assert!(got.contains(&"s3cr%40t".to_string()), "{got:?}");
        assert!(got.contains(&"s3cr@t".to_string()), "{got:?}");
        assert_eq!(s.target(Backend::Postgres), "db:5432");
        let s = Spec {
            connection_string: Some(
                "Driver={PostgreSQL Unicode};Server=h1;PWD={p;w=d};Uid=u".into(),
            ),
            ..Spec::default()
        };
        assert_eq!(s.secrets(), vec!["p;w=d".to_string()]);
        assert_eq!(s.target(Backend::Odbc), "h1");
        let s = Spec {
            url: Some("server=tcp:sql1,1433;user id=sa;Password=Hunter22;database=x".into()),
            ..Spec::default()
        };
        assert_eq!(s.secrets(), vec!["Hunter22".to_string()]);
        assert_eq!(s.target(Backend::SqlServer), "tcp:sql1,1433");
    }

    #[test]
    fn tls_mode() {
        let s = Spec {
            url: Some("postgres://h/db?sslmode=require".into()),
            ..Spec::default()
        };
        assert!(s.wants_tls());
        assert!(!Spec::default().wants_tls());
    }
}
