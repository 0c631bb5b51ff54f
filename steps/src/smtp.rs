//! The `smtp` connection: the mail server `notify:` e-mails go through.
//!
//! No step reads it; it lives here with the other connection types so `pipe validate`
//! checks it like them (keys, types, the `username`/`password` pair) through the one
//! registry. The `notify` crate reads the rendered connection into [`SmtpConnection`].

use serde::Deserialize;

/// The rendered `smtp` connection.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SmtpConnection {
    /// Always `smtp`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The server's host name or address.
    pub host: String,
    /// The port (default 25 with `tls: none`, 587 with `starttls`, 465 with `tls`).
    #[serde(default)]
    pub port: Option<u16>,
    /// The login user (with `password`; none = send without logging in).
    #[serde(default)]
    pub username: Option<String>,
    /// The login password (use `"{{ secret('NAME') }}"`).
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    pub password: Option<String>,
    /// `starttls` (default: plain connection upgraded to TLS, required), `tls` (TLS from
    /// the first byte) or `none` (no encryption: a local relay only).
    #[serde(default)]
    pub tls: SmtpTls,
    /// The longest one send may take (`30s`, default 30s).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// How the connection to the mail server is encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// No encryption (a relay on localhost or a trusted network).
    None,
    /// STARTTLS on a plain connection; refused when the server does not offer it.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

impl SmtpConnection {
    /// The port, or the default of the TLS mode.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        })
    }
}

impl engine::connection::ConnectionConfig for SmtpConnection {
    fn problems(&self) -> Vec<engine::step::Problem> {
        use engine::step::Problem;
        let mut out = Vec::new();
        match (&self.username, &self.password) {
            (Some(_), None) => out.push(
                Problem::at(
                    "username",
                    "the smtp connection has `username` but no `password`",
                )
                .given(&["password"]),
            ),
            (None, Some(_)) => out.push(
                Problem::at(
                    "password",
                    "the smtp connection has `password` but no `username`",
                )
                .given(&["username"]),
            ),
            _ => {}
        }
        if let Some(t) = &self.timeout {
            if let Err(e) = engine::duration::parse(t) {
                out.push(Problem::at("timeout", format!("timeout: {e}")));
            }
        }
        out
    }
}

/// `--sandbox`: a mail server is left as it is; nothing is sent under `--sandbox` (the
/// notify crate sends no notification there), so the connection is never used offline.
pub fn sandbox(
    _: &engine::connection::SandboxTarget,
) -> Result<Option<engine::connection::ConnectionOverride>, String> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports_follow_the_tls_mode() {
        let c = |tls| SmtpConnection {
            kind: None,
            host: "mail".into(),
            port: None,
            username: None,
            password: None,
            tls,
            timeout: None,
        };
        assert_eq!(c(SmtpTls::None).port(), 25);
        assert_eq!(c(SmtpTls::Starttls).port(), 587);
        assert_eq!(c(SmtpTls::Tls).port(), 465);
    }
}
