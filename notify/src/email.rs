//! E-mail: a plain-text summary through an `smtp` connection, with lettre (tokio, rustls
//! with ring and the webpki roots: no OpenSSL).
//!
//! One message per entry, to all its recipients; no pool (a run sends a handful). The
//! connection is rendered when the mail is sent, so its password comes from `secret()` and
//! is learnt by the run's redactor (and added to it here, whatever its source).

use crate::{Event, RunSummary};
use engine::model::EmailSpec;
use engine::secrets::Redactor;
use engine::template::{Scope, Templates};
use engine::yaml::Node;
use indexmap::IndexMap;
use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;
use steps::smtp::{SmtpConnection, SmtpTls};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Rendered {
    connection_name: String,
    connection: SmtpConnection,
    to: Vec<Mailbox>,
    from: Mailbox,
    pub(crate) subject: Option<String>,
}

/// How messages name an e-mail entry: its recipients.
pub(crate) fn target(templates: &Templates, scope: &Scope, mail: &EmailSpec) -> String {
    let to: Vec<String> = mail
        .to
        .iter()
        .map(|t| crate::render_text(templates, scope, "to", t).unwrap_or_else(|_| t.clone()))
        .collect();
    format!("email to {}", to.join(", "))
}

pub(crate) fn render(
    templates: &Templates,
    scope: &Scope,
    mail: &EmailSpec,
    connections: &IndexMap<String, Node>,
    redactor: &Redactor,
) -> Result<Rendered, String> {
    let text = |what: &str, src: &str| crate::render_text(templates, scope, what, src);
    let name = text("email.connection", &mail.connection)?;
    let node = connections
        .get(&name)
        .ok_or_else(|| format!("email.connection: no connection `{name}`"))?;
    // What this run's connection overrides make of it (a stored credential's values).
    let overrides = &templates.runtime().overrides.connections;
    let rendered = templates
        .render_node(&overrides.node(&name, node), scope)
        .map_err(|(pos, e)| format!("connection `{name}`, template at line {}: {e}", pos.line))?;
    let mut json = rendered.to_json();
    overrides.fill(&name, &mut json);
    let connection: SmtpConnection =
        serde_json::from_value(json).map_err(|e| format!("connection `{name}`: {e}"))?;
    if let Some(kind) = connection.kind.as_deref().filter(|k| *k != "smtp") {
        return Err(format!(
            "connection `{name}` is of type `{kind}`; e-mail needs an `smtp` connection"
        ));
    }
    if let Some(p) = &connection.password {
        redactor.add(p);
        if let Some(u) = &connection.username {
            redactor.add_basic_auth(u, p);
        }
    }
    let mailbox = |what: &str, src: &str| -> Result<Mailbox, String> {
        let t = text(what, src)?;
        t.trim()
            .parse::<Mailbox>()
            .map_err(|e| format!("{what}: `{t}` is not an e-mail address ({e})"))
    };
    let to = mail
        .to
        .iter()
        .map(|t| mailbox("email.to", t))
        .collect::<Result<Vec<_>, _>>()?;
    if to.is_empty() {
        return Err("email.to lists no recipient".into());
    }
    let from = mailbox("email.from", &mail.from)?;
    let subject = match &mail.subject {
        Some(s) => Some(text("email.subject", s)?),
        None => None,
    };
    Ok(Rendered {
        connection_name: name,
        connection,
        to,
        from,
        subject,
    })
}

/// `[pipe] <pipeline> run <id> <what happened>`.
pub(crate) fn default_subject(event: Event, s: &RunSummary) -> String {
    let what = match event {
        Event::DurationOver(d) => format!("still running after {}", engine::duration::human(d)),
        Event::Paused => "paused: the integration is disabled".to_string(),
        _ => s.status.label().to_string(),
    };
    format!("[pipe] {} run {} {what}", s.pipeline, s.run_id)
}

/// The message text: the run's facts, then one line per step.
pub(crate) fn text(event: Event, s: &RunSummary) -> String {
    let mut out = String::new();
    let headline = match event {
        Event::DurationOver(d) => format!(
            "Run {} of {} is still running after {}.",
            s.run_id,
            s.pipeline,
            engine::duration::human(d)
        ),
        Event::Paused => format!(
            "The integration {} was paused after run {} ({}); it runs again once enabled \
             (pipe integrations enable {}).",
            s.pipeline,
            s.run_id,
            s.status.label(),
            s.pipeline
        ),
        _ => format!("Run {} of {} {}.", s.run_id, s.pipeline, s.status.label()),
    };
    out.push_str(&headline);
    out.push_str("\n\n");
    let mut fact = |k: &str, v: String| out.push_str(&format!("{k:<13} {v}\n"));
    fact("pipeline:", s.pipeline.clone());
    fact("run:", s.run_id.to_string());
    fact("status:", s.status.label().to_string());
    fact("trigger:", s.trigger.clone());
    if let Some(d) = s.logical_date {
        fact("logical date:", time(d));
    }
    fact("started:", time(s.started_at));
    if let Some(f) = s.finished_at {
        fact("finished:", time(f));
    }
    fact(
        "duration:",
        engine::duration::human(Duration::from_millis(s.duration_ms)),
    );
    if let Some(e) = &s.error {
        fact("error:", e.clone());
    }
    if !s.steps.is_empty() {
        out.push_str("\nsteps:\n");
        for st in &s.steps {
            let rows = st.rows.map(|r| format!(", {r} rows")).unwrap_or_default();
            let err = st
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {} {} ({}{rows}){err}\n",
                st.id,
                st.status.label(),
                engine::duration::human(Duration::from_millis(st.duration_ms))
            ));
        }
    }
    out.push_str(&format!(
        "\nhistory: pipe runs show {}   logs: pipe runs logs {}\n",
        s.run_id, s.run_id
    ));
    out
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Send one message (subject and text already redacted).
pub(crate) async fn send(
    mail: &Rendered,
    subject: &str,
    text: &str,
    event: &str,
    run_id: i64,
) -> Result<(), String> {
    let c = &mail.connection;
    let name = &mail.connection_name;
    let mut message = Message::builder()
        .from(mail.from.clone())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &mail.to {
        message = message.to(to.clone());
    }
    let message = message
        .header(RunHeader(run_id.to_string()))
        .header(EventHeader(event.to_string()))
        .body(text.to_string())
        .map_err(|e| format!("cannot build the message: {e}"))?;
    let timeout = match &c.timeout {
        Some(t) => {
            engine::duration::parse(t).map_err(|e| format!("connection `{name}`: timeout: {e}"))?
        }
        None => DEFAULT_TIMEOUT,
    };
    let builder = match c.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.host),
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&c.host)
            .map_err(|e| format!("connection `{name}`: {}", crate::webhook::chain(&e)))?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&c.host)
            .map_err(|e| format!("connection `{name}`: {}", crate::webhook::chain(&e)))?,
    };
    let mut builder = builder.port(c.port()).timeout(Some(timeout));
    if let (Some(u), Some(p)) = (&c.username, &c.password) {
        builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
    }
    let mailer = builder.build();
    let server = format!("smtp {}:{} (connection `{name}`)", c.host, c.port());
    // lettre's timeout bounds each read and write; this bounds the whole conversation.
    match tokio::time::timeout(timeout * 2, mailer.send(message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("{server}: {}", crate::webhook::chain(&e))),
        Err(_) => Err(format!(
            "{server}: no answer within {}",
            engine::duration::human(timeout * 2)
        )),
    }
}

/// `X-Pipe-Run` and `X-Pipe-Event` on every message, for mail filters.
macro_rules! text_header {
    ($ty:ident, $name:literal) => {
        #[derive(Clone)]
        struct $ty(String);
        impl lettre::message::header::Header for $ty {
            fn name() -> lettre::message::header::HeaderName {
                lettre::message::header::HeaderName::new_from_ascii_str($name)
            }
            fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
                Ok($ty(s.to_string()))
            }
            fn display(&self) -> lettre::message::header::HeaderValue {
                lettre::message::header::HeaderValue::new(Self::name(), self.0.clone())
            }
        }
    };
}
text_header!(RunHeader, "X-Pipe-Run");
text_header!(EventHeader, "X-Pipe-Event");
