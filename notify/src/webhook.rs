//! Webhooks: a JSON POST, signed, retried.
//!
//! The signature follows the scheme of Stripe's and Slack's webhooks, so receivers know
//! it: `X-Pipe-Timestamp: <unix seconds>` and `X-Pipe-Signature: sha256=<lowercase hex of
//! HMAC-SHA256(secret, timestamp + "." + body)>`. The timestamp is signed with the body so
//! a receiver can refuse old deliveries (replays); each attempt is signed afresh.
//! `X-Pipe-Delivery` (`<run id>.<entry>.<event>`) is the same on every attempt, so a
//! receiver can drop a duplicate when a response was lost.
//!
//! Retries: on a 5xx, a 429, a timeout or a connection error, up to `retries` more times
//! after waits of 1s, 2s, 4s … (at most [`MAX_BACKOFF`]); a `Retry-After` (seconds or an
//! HTTP date) replaces the wait, up to [`MAX_RETRY_AFTER`]. Other statuses (4xx, 3xx:
//! redirects are not followed, so a signed body never goes elsewhere) fail at once.
//! At most [`MAX_RESPONSE_BYTES`] of a response are read.

use engine::model::WebhookSpec;
use engine::secrets::Redactor;
use engine::template::{Scope, Templates};
use hmac::{KeyInit, Mac};
use std::time::Duration;

pub const SIGNATURE_HEADER: &str = "X-Pipe-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Pipe-Timestamp";
const EVENT_HEADER: &str = "X-Pipe-Event";
const DELIVERY_HEADER: &str = "X-Pipe-Delivery";

pub const DEFAULT_RETRIES: u32 = 3;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How much of a response body is read (for the error message); the rest is dropped.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024;
/// How much of a response body an error message quotes.
const QUOTED_BYTES: usize = 300;

/// `sha256=<hex>`: the signature of `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in bytes.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A webhook entry rendered for one send.
pub(crate) struct Rendered {
    url: url::Url,
    secret: Option<String>,
    headers: Vec<(String, String)>,
    retries: u32,
    timeout: Duration,
}

/// How messages name a webhook: scheme, host and port, never its path, query or user.
pub(crate) fn target(
    redactor: &Redactor,
    templates: &Templates,
    scope: &Scope,
    hook: &WebhookSpec,
) -> String {
    let shown = crate::render_text(templates, scope, "url", &hook.url)
        .ok()
        .and_then(|u| url::Url::parse(&u).ok())
        .map(|u| origin(&u))
        .unwrap_or_else(|| "(url not rendered)".to_string());
    redactor.redact(&format!("webhook {shown}"))
}

fn origin(u: &url::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
        (Some(h), None) => format!("{}://{h}", u.scheme()),
        _ => format!("{}://", u.scheme()),
    }
}

pub(crate) fn render(
    templates: &Templates,
    scope: &Scope,
    hook: &WebhookSpec,
    redactor: &Redactor,
) -> Result<Rendered, String> {
    let text = |what: &str, src: &str| crate::render_text(templates, scope, what, src);
    let url = text("webhook.url", &hook.url)?;
    let url = url::Url::parse(&url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| "webhook.url is not an http:// or https:// URL".to_string())?;
    // A token in the URL (Slack's hooks carry one in the path) stays out of messages.
    if let Some(q) = url.query() {
        redactor.add(q);
    }
    if !url.username().is_empty() {
        redactor.add(url.username());
    }
    if let Some(p) = url.password() {
        redactor.add(p);
    }
    let secret = match &hook.secret {
        Some(s) => {
            let key = text("webhook.secret", s)?;
            redactor.add(&key);
            Some(key)
        }
        None => None,
    };
    let mut headers = Vec::new();
    for (name, value) in &hook.headers {
        let value = text(&format!("webhook.headers.{name}"), value)?;
        if engine::secrets::is_secret_header(name) {
            redactor.add(&value);
            // `Bearer <token>`: the token on its own too.
            if let Some((_, credential)) = value.split_once(' ') {
                redactor.add(credential.trim());
            }
        }
        headers.push((name.clone(), value));
    }
    let timeout = match &hook.timeout {
        Some(t) => t.parse().map_err(|e| format!("webhook.timeout: {e}"))?,
        None => DEFAULT_TIMEOUT,
    };
    Ok(Rendered {
        url,
        secret,
        headers,
        retries: hook.retries.unwrap_or(DEFAULT_RETRIES),
        timeout,
    })
}

/// POST `body`; the number of attempts it took, or why it failed (unredacted: the caller
/// redacts).
pub(crate) async fn send(
    hook: &Rendered,
    body: &[u8],
    event: &str,
    delivery: &str,
    redactor: &Redactor,
) -> Result<u32, String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(hook.timeout)
        .user_agent(concat!("pipe/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &hook.headers {
        let n = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("webhook.headers: `{name}` is not a header name"))?;
        let v = reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| format!("webhook.headers.{name}: not a valid header value"))?;
        headers.insert(n, v);
    }
    let attempts = hook.retries + 1;
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let timestamp = chrono::Utc::now().timestamp();
        let mut req = client
            .post(hook.url.clone())
            .headers(headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(EVENT_HEADER, event)
            .header(DELIVERY_HEADER, delivery)
            .body(body.to_vec());
        if let Some(key) = &hook.secret {
            req = req.header(SIGNATURE_HEADER, signature(key.as_bytes(), timestamp, body));
        }
        let (problem, retry_after) = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = retry_after(resp.headers());
                let text = read_bounded(resp).await;
                if status.is_success() {
                    return Ok(attempt);
                }
                let quoted = quote(&redactor.redact(&text));
                let problem = format!("HTTP {}{quoted}", status.as_u16());
                if !(status.is_server_error() || status.as_u16() == 429) {
                    return Err(format!("{problem} (not retried)"));
                }
                (problem, retry_after)
            }
            Err(e) => (chain(&e.without_url()), None),
        };
        if attempt >= attempts {
            let tries = if attempts == 1 {
                "1 attempt".to_string()
            } else {
                format!("{attempts} attempts")
            };
            return Err(format!("{problem} (after {tries})"));
        }
        let wait = match retry_after {
            Some(w) => w.min(MAX_RETRY_AFTER),
            None => backoff,
        };
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `Retry-After` as a wait: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// At most [`MAX_RESPONSE_BYTES`] of the body, as text.
async fn read_bounded(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_RESPONSE_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_RESPONSE_BYTES - buf.len();
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `: <first line of the body, cut>` or nothing.
fn quote(text: &str) -> String {
    let line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(QUOTED_BYTES)
        .collect();
    if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    }
}

/// An error with its sources, one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: python3 -c 'import hmac, hashlib;
        // print(hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature(b"key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            reqwest::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let w = retry_after(&h).unwrap();
        assert!(w > Duration::from_secs(100) && w <= Duration::from_secs(120));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn quotes_are_one_line_and_short() {
        assert_eq!(quote(""), "");
        assert_eq!(quote("a\n b"), ": a b");
        assert_eq!(quote(&"x".repeat(1000)).len(), 2 + QUOTED_BYTES);
    }
}
