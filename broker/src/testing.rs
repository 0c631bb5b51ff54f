//! Test utilities: a TCP proxy whose connections can be cut, and raw queue access.
//!
//! [`CutProxy`] stands between a client and the broker (point the client's URL at
//! [`CutProxy::addr`]) so a test can sever every connection at a moment of its choosing
//! ([`CutProxy::cut`]) or hold the broker unreachable for a while ([`CutProxy::set_down`]):
//! the real failure a network blip or a broker restart causes, with the real broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lapin::options::BasicGetOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Broker, BrokerError};

/// A local TCP proxy in front of `upstream` whose connections can be cut.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    cuts: watch::Sender<u64>,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    down: AtomicBool,
    accepted: AtomicU64,
}

impl CutProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cuts, _) = watch::channel(0u64);
        let state = Arc::new(State::default());
        let accept = tokio::spawn(accept_loop(listener, upstream, cuts.clone(), state.clone()));
        Ok(CutProxy {
            addr,
            cuts,
            state,
            accept,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (`amqp://…`, `postgres://…`: any `scheme://[user@]host:port/…`) with its host
    /// and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let start = url.find("://").map(|i| i + 3).unwrap_or(0);
        let rest = &url[start..];
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let host_start = rest[..end].rfind('@').map(|i| i + 1).unwrap_or(0);
        format!(
            "{}{}{}{}",
            &url[..start],
            &rest[..host_start],
            self.addr,
            &rest[end..]
        )
    }

    /// Drops every connection open now (both sides see the socket close). New connections
    /// are accepted as before.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// While `down`, cuts everything and closes each new connection at once: the broker is
    /// unreachable. `set_down(false)` brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// How many connections the proxy has accepted (and forwarded or refused) so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cuts: watch::Sender<u64>,
    state: Arc<State>,
) {
    while let Ok((client, _)) = listener.accept().await {
        state.accepted.fetch_add(1, Ordering::SeqCst);
        if state.down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mut cut = cuts.subscribe();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let mut client = client;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
            // Dropping both streams closes both sockets.
        });
    }
}

/// A message as it sits in the queue, read by [`take_raw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// The AMQP priority.
    pub priority: Option<u8>,
    /// The AMQP delivery mode (2: persistent).
    pub delivery_mode: Option<u8>,
    /// The content type.
    pub content_type: Option<String>,
    /// All header names (none expected).
    pub headers: Vec<String>,
}

/// Takes one message from pipe queue `queue` with `basic.get` (auto-ack: it is removed), to
/// see exactly what travels through the broker. `None` when the queue is empty.
pub async fn take_raw(broker: &Broker, queue: &str) -> Result<Option<RawMessage>, BrokerError> {
    let full = broker.config().queue_name(queue);
    let q = &full;
    let got = broker
        .admin("basic.get", &full, |chan| async move {
            chan.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .map_err(|e| BrokerError::Declare {
                    queue: q.clone(),
                    broker: broker.shown_url().to_string(),
                    detail: e.to_string(),
                })
        })
        .await?;
    Ok(got.map(|m| {
        let p = &m.delivery.properties;
        RawMessage {
            body: m.delivery.data.clone(),
            priority: *p.priority(),
            delivery_mode: *p.delivery_mode(),
            content_type: p.content_type().as_ref().map(|c| c.to_string()),
            headers: p
                .headers()
                .as_ref()
                .map(|h| h.inner().keys().map(|k| k.to_string()).collect())
                .unwrap_or_default(),
        }
    }))
}

/// Publishes an arbitrary `body` (persistent, confirmed) to pipe queue `queue`: what a
/// foreign or broken producer would send.
pub async fn publish_raw(
    broker: &Broker,
    queue: &str,
    body: &[u8],
    priority: u8,
) -> Result<(), BrokerError> {
    let full = broker.config().queue_name(queue);
    broker.publish_body(&full, body, priority).await
}

/// A queue name unique to this process and call (tests share one broker).
pub fn unique_queue(label: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "test.{label}.{}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}
