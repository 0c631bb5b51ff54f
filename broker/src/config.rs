//! Where the broker is and how patient to be with it.
//!
//! The URL is a secret-bearing string (`amqp://user:password@host/vhost`): it is kept only here
//! and in the lapin connection; everything that reaches a log or an error goes through
//! [`redact_url`], which keeps user, host, port and vhost and replaces the password.

use std::time::Duration;

/// The default URL: the local RabbitMQ with its stock account and the default vhost (`/`).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default queue name prefix: queue `high` is the RabbitMQ queue `pipe.high`.
pub const DEFAULT_QUEUE_PREFIX: &str = "pipe.";
/// The default `x-max-priority`: RabbitMQ advises at most 10 levels (each one costs a
/// sub-queue in the broker).
pub const DEFAULT_MAX_PRIORITY: u8 = 10;

/// How to reach RabbitMQ and how the queues are named and bounded.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:port/vhost` (vhost URL-encoded: `%2f` is `/`).
    pub url: String,
    /// Prepended to every queue name (`pipe.` + `default`).
    pub queue_prefix: String,
    /// The queues' `x-max-priority`; AMQP priorities are `0..=max_priority`.
    pub max_priority: u8,
    /// How long one connection attempt (TCP + AMQP handshake) may take.
    pub connect_timeout: Duration,
    /// The bound on one [`publish`](crate::Broker::publish) call, reconnects and the wait for
    /// the broker's confirm included: past it the call fails and the caller keeps the run
    /// queued in its store, to republish later.
    pub publish_timeout: Duration,
    /// The bound on every other operation with the broker (declare, depth, delete, qos,
    /// consume, ack, reject): a connection that dies mid-call can leave lapin's reply
    /// pending forever, and no caller may wait forever.
    pub op_timeout: Duration,
    /// Reconnect backoff: the first delay (doubled on each failure, jittered).
    pub backoff_min: Duration,
    /// Reconnect backoff: the cap.
    pub backoff_max: Duration,
}

impl BrokerConfig {
    /// The defaults with `url`.
    pub fn new(url: impl Into<String>) -> Self {
        BrokerConfig {
            url: url.into(),
            ..BrokerConfig::default()
        }
    }

    /// The URL as it may be shown: the password replaced by `***`.
    pub fn shown_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The full RabbitMQ name of pipe's queue `queue`.
    pub fn queue_name(&self, queue: &str) -> String {
        format!("{}{}", self.queue_prefix, queue)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: DEFAULT_URL.to_string(),
            queue_prefix: DEFAULT_QUEUE_PREFIX.to_string(),
            max_priority: DEFAULT_MAX_PRIORITY,
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Debug shows the redacted URL, so a config printed with `{:?}` leaks nothing.
impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &self.shown_url())
            .field("queue_prefix", &self.queue_prefix)
            .field("max_priority", &self.max_priority)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("op_timeout", &self.op_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// `url` with the password of its user info replaced by `***`
/// (`amqp://pipe:s3cret@mq:5672/%2f` → `amqp://pipe:***@mq:5672/%2f`). A URL without a
/// password is returned as it is; the query string is kept (it holds no credentials in
/// RabbitMQ's URI spec).
pub fn redact_url(url: &str) -> String {
    match userinfo_split(url) {
        Some((before, _password, after)) => format!("{before}***{after}"),
        None if url.contains("://") => url.to_string(),
        // Not a URL we can parse: show nothing of it but its length, it may be all secret.
        None => format!("<unparsable URL, {} chars>", url.len()),
    }
}

/// The password of `url`'s user info, if any (to scrub it from texts we did not write).
pub(crate) fn url_password(url: &str) -> Option<&str> {
    userinfo_split(url)
        .map(|(_, password, _)| password)
        .filter(|p| !p.is_empty())
}

/// `url` cut around its password: (`scheme://user:`, `password`, `@host…`). The user info
/// ends at the last `@` before the query, so a password holding a raw `/` or `@` is still
/// cut whole (at worst a vhost with a raw `@` is hidden too: more than needed, never less).
fn userinfo_split(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let body_end = rest.find(['?', '#']).unwrap_or(rest.len());
    let at = rest[..body_end].rfind('@')?;
    let colon = rest[..at].find(':')?;
    Some((
        &url[..start + colon + 1],
        &rest[colon + 1..at],
        &url[start + at..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://pipe:p@ss:w0rd@mq.example:5671/prod?heartbeat=10"),
            "amqps://pipe:***@mq.example:5671/prod?heartbeat=10"
        );
        assert_eq!(redact_url("amqp://pipe@mq/%2f"), "amqp://pipe@mq/%2f");
        assert_eq!(redact_url("amqp://mq:5672"), "amqp://mq:5672");
        assert_eq!(redact_url("amqp://u:a/b@mq/%2f"), "amqp://u:***@mq/%2f");
        assert_eq!(redact_url("guest:guest"), "<unparsable URL, 11 chars>");
        assert!(
            !format!("{:?}", BrokerConfig::new("amqp://u:topsecret@h/%2f")).contains("topsecret")
        );
    }

    #[test]
    fn finds_the_password() {
        assert_eq!(url_password("amqp://u:p@ss@h/%2f"), Some("p@ss"));
        assert_eq!(url_password("amqp://u@h/%2f"), None);
        assert_eq!(url_password("amqp://u:@h/%2f"), None);
        assert_eq!(url_password("nonsense"), None);
    }
}
