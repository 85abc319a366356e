//! One endpoint (a pod) as the proxy sees it: found by discovery, let through by active health
//! checks, and as the engine reports it (its connections, load and ejection). With health
//! checks it keeps an HTTP/2 connection of its own for them, made again with backoff.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::PingPong;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::health::{Health, Verdict};
use fanout_proxy_config::HealthCheck;
use fanout_wire::engine::report::{EndpointReport, View};

/// Keepalive: a PING after this long, and the connection is dropped if no PONG comes back in
/// time (a pod that vanished without a FIN or RST is otherwise found only by TCP timeouts).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why an endpoint is not taking calls, for `/endpoints` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    Connecting,
    /// Connecting failed; retrying after a backoff.
    Failing,
    /// Gone from discovery; finishing its streams.
    Removed,
    /// Failing calls; out of balancing for a while.
    Ejected,
    /// Failing active health checks, or not checked yet.
    Unhealthy,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Connecting => "connecting",
            State::Failing => "failing",
            State::Removed => "removed",
            State::Ejected => "ejected",
            State::Unhealthy => "unhealthy",
        }
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Stable text of `addr` for metric labels.
    pub label: String,
    /// How the engine's connections to it are, which carry its calls.
    report: Arc<EndpointReport>,
    /// Its own connection, which carries active health checks only; `None` while down.
    sender: Mutex<Option<SendRequest<Bytes>>>,
    connect_failures: AtomicU32,
    removed: AtomicBool,
    /// Wakes the connection task when the endpoint is removed.
    wake: Notify,
    /// Active health checks (when configured); `healthy` is their verdict at hand, always
    /// true without checks.
    health: Mutex<Health>,
    healthy: AtomicBool,
}

/// Signals from endpoints to their upstream.
pub trait Events: Send + Sync + 'static {
    /// An endpoint's health verdict changed.
    fn changed(&self);
    /// A connection failed or closed: discovery should look again now.
    fn connection_lost(&self);
}

impl Endpoint {
    /// An endpoint whose calls the engine carries, as `report` says; `health_checked`: it
    /// takes calls only once an active health check passed.
    pub fn new(addr: SocketAddr, health_checked: bool, report: Arc<EndpointReport>) -> Arc<Self> {
        Arc::new(Self {
            addr,
            label: addr.to_string(),
            report,
            sender: Mutex::new(None),
            connect_failures: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            wake: Notify::new(),
            health: Mutex::new(Health::default()),
            healthy: AtomicBool::new(!health_checked),
        })
    }

    /// Records an active health check; `true` when the endpoint's verdict changed.
    pub fn record_health(&self, passed: bool, config: &HealthCheck) -> bool {
        let Ok(mut health) = self.health.lock() else {
            return false;
        };
        let changed = health.record(passed, config);
        self.healthy
            .store(health.verdict == Verdict::Healthy, Ordering::Relaxed);
        changed
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A sender for a health check on the endpoint's own connection, when it is up.
    pub fn sender(&self) -> Option<SendRequest<Bytes>> {
        let mut sender = self.sender.lock().ok()?;
        let sender = sender.as_mut()?;
        usable(sender).then(|| sender.clone())
    }

    /// How the engine's threads see it, as last reported (connections, load, latency).
    pub fn view(&self) -> View {
        self.report.view()
    }

    pub fn is_ready(&self) -> bool {
        let view = self.view();
        !self.is_removed() && self.is_healthy() && view.ready && !view.ejected
    }

    /// Its state, given its `view`.
    pub fn state(&self, view: &View) -> State {
        if self.is_removed() {
            State::Removed
        } else if view.ejected {
            State::Ejected
        } else if !self.is_healthy() {
            State::Unhealthy
        } else if view.ready {
            State::Ready
        } else if view.failing {
            State::Failing
        } else {
            State::Connecting
        }
    }

    /// Takes the endpoint out of balancing; its own connection closes.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        self.wake.notify_waiters();
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Drives the connection until it ends, the endpoint is removed, or a keepalive PING goes
    /// unanswered.
    async fn serve_connection(&self, connection: Connection, mut ping_pong: Option<PingPong>) {
        enum Event {
            Ended,
            Pong(bool),
            Timer,
            Woken,
        }
        tokio::pin!(connection);
        let timer = tokio::time::sleep(KEEPALIVE_INTERVAL);
        tokio::pin!(timer);
        let mut awaiting_pong = false;
        loop {
            let keepalive = std::future::poll_fn(|cx| {
                if awaiting_pong
                    && let Some(ping_pong) = ping_pong.as_mut()
                    && let Poll::Ready(result) = ping_pong.poll_pong(cx)
                {
                    return Poll::Ready(Event::Pong(result.is_ok()));
                }
                timer.as_mut().poll(cx).map(|()| Event::Timer)
            });
            let event = tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %self.addr, error = %e, "connection ended");
                    }
                    Event::Ended
                }
                event = keepalive => event,
                () = self.wake.notified() => Event::Woken,
            };
            match event {
                Event::Ended | Event::Pong(false) => return,
                Event::Pong(true) => {
                    awaiting_pong = false;
                    timer.as_mut().reset(Instant::now() + KEEPALIVE_INTERVAL);
                }
                Event::Timer if awaiting_pong => {
                    tracing::info!(endpoint = %self.addr, "no answer to a keepalive PING; reconnecting");
                    return;
                }
                Event::Timer => {
                    let sent = ping_pong
                        .as_mut()
                        .is_some_and(|p| p.send_ping(h2::Ping::opaque()).is_ok());
                    awaiting_pong = sent;
                    let wait = if sent {
                        KEEPALIVE_TIMEOUT
                    } else {
                        KEEPALIVE_INTERVAL
                    };
                    timer.as_mut().reset(Instant::now() + wait);
                }
                Event::Woken => {}
            }
            if self.is_removed() {
                return;
            }
        }
    }

    /// Keeps the endpoint's own connection (for health checks) up until it is removed.
    pub async fn run(self: Arc<Self>, connect_timeout: Duration, events: Arc<dyn Events>) {
        let mut backoff = BACKOFF_MIN;
        while !self.is_removed() {
            match connect(self.addr, connect_timeout).await {
                Ok((sender, connection, ping_pong)) => {
                    backoff = BACKOFF_MIN;
                    self.connect_failures.store(0, Ordering::Relaxed);
                    if let Ok(mut slot) = self.sender.lock() {
                        *slot = Some(sender);
                    }
                    self.serve_connection(connection, ping_pong).await;
                    if let Ok(mut slot) = self.sender.lock() {
                        *slot = None;
                    }
                    if !self.is_removed() {
                        events.connection_lost();
                    }
                }
                Err(e) => {
                    let failures = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if failures == 1 {
                        tracing::info!(endpoint = %self.addr, error = %e,
                            "cannot connect for health checks");
                    }
                    events.connection_lost();
                    let jitter =
                        Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
                    tokio::select! {
                        () = tokio::time::sleep(backoff + jitter) => {}
                        () = self.wake.notified() => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Io(#[source] std::io::Error),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
    #[error("closed before answering a first PING")]
    ClosedBeforePong,
}

type Connection = h2::client::Connection<TcpStream, Bytes>;

/// A connection, and its PING handle for keepalives, once the endpoint has answered a first
/// PING: it has then accepted the connection and read its preface and settings, so a first
/// check's timeout measures the check and not the connection's setup.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(SendRequest<Bytes>, Connection, Option<PingPong>), ConnectError> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        let (sender, mut connection) = h2::client::Builder::new()
            .handshake(stream)
            .await
            .map_err(ConnectError::Handshake)?;
        let mut ping_pong = connection.ping_pong();
        if let Some(ping_pong) = ping_pong.as_mut() {
            ping_pong
                .send_ping(h2::Ping::opaque())
                .map_err(ConnectError::Handshake)?;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = ping_pong.poll_pong(cx) {
                    return Poll::Ready(result.map(|_| ()).map_err(ConnectError::Handshake));
                }
                match Pin::new(&mut connection).poll(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Err(ConnectError::ClosedBeforePong)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(ConnectError::Handshake(e))),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
        }
        Ok((sender, connection, ping_pong))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// A connection takes new streams unless it is closed or the endpoint sent GOAWAY. A sender
/// that has not queued a stream of its own answers at once, so a no-op waker is enough.
pub(crate) fn usable(sender: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
}
