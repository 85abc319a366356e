//! One endpoint (a pod): its HTTP/2 connection, kept up by a task that reconnects with backoff,
//! and its load (streams outstanding, peak-EWMA latency) for the balancer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

use prometheus_client::metrics::counter::Counter;

use crate::balance::Candidate;
use crate::conn_io::ReadPastWriteErrors;
use crate::eject::Ejection;
use crate::health::{Health, Verdict};
use crate::latency::{Clock, Latency};
use crate::metrics::Metrics;
use fanout_proxy_config::HealthCheck;
use fanout_wire::engine::report::EndpointReport;

/// HTTP/2 flow-control windows on both sides of the proxy: fixed and generous, so a stream is
/// not held back on loopback or in-cluster links, without the BDP pings of adaptive windows.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
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
    /// One slot per pooled connection; `None` while that connection is down.
    senders: Mutex<Vec<Option<SendRequest<Bytes>>>>,
    next_sender: AtomicUsize,
    outstanding: AtomicUsize,
    /// Streams ever started on this endpoint (attempts, so a retry counts where it went).
    started: AtomicU64,
    latency: Mutex<Latency>,
    /// The pick number this endpoint was last chosen at, for the balancer's turn-taking.
    last_pick: AtomicU64,
    connect_failures: AtomicU32,
    removed: AtomicBool,
    ejection: Mutex<Ejection>,
    /// Set while an ejection may be running, so ready checks skip the lock otherwise.
    maybe_ejected: AtomicBool,
    /// `fanout_proxy_requests_total` counters of this endpoint by grpc-status, kept at hand.
    counters: Mutex<Vec<(Option<u16>, Counter)>>,
    /// Wakes the connection task when the endpoint is removed or goes idle.
    wake: Notify,
    /// Active health checks (when configured); `healthy` is their verdict at hand, always
    /// true without checks.
    health: Mutex<Health>,
    healthy: AtomicBool,
    /// On the `wire` data path: the engine's connections carry the calls, and its report
    /// says how they are; this endpoint's own connection, if any, serves health checks only.
    engine: Option<Arc<EndpointReport>>,
}

/// Signals from endpoints to their upstream.
pub trait Events: Send + Sync + 'static {
    /// An endpoint became ready or stopped being ready.
    fn changed(&self);
    /// A connection failed or closed: discovery should look again now.
    fn connection_lost(&self);
}

impl Endpoint {
    /// An endpoint that will keep `connections` HTTP/2 connections (see [`Endpoint::run`]);
    /// `health_checked`: it takes calls only once an active health check passed.
    pub fn new(addr: SocketAddr, connections: usize, health_checked: bool) -> Arc<Self> {
        Self::build(addr, connections, health_checked, None)
    }

    /// An endpoint whose calls the `wire` engine carries, as `report` says; its own single
    /// connection (run only with health checks) carries the checks.
    pub fn engine_driven(
        addr: SocketAddr,
        health_checked: bool,
        report: Arc<EndpointReport>,
    ) -> Arc<Self> {
        Self::build(addr, 1, health_checked, Some(report))
    }

    fn build(
        addr: SocketAddr,
        connections: usize,
        health_checked: bool,
        engine: Option<Arc<EndpointReport>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr,
            label: addr.to_string(),
            senders: Mutex::new(vec![None; connections.max(1)]),
            next_sender: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            latency: Mutex::new(Latency::new(Instant::now())),
            last_pick: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            ejection: Mutex::new(Ejection::default()),
            maybe_ejected: AtomicBool::new(false),
            counters: Mutex::new(Vec::new()),
            wake: Notify::new(),
            health: Mutex::new(Health::default()),
            healthy: AtomicBool::new(!health_checked),
            engine,
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

    /// A sender for a new stream on the next connection that is up and not going away.
    pub fn sender(&self) -> Option<SendRequest<Bytes>> {
        let mut senders = self.senders.lock().ok()?;
        let n = senders.len();
        let start = self.next_sender.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let sender = senders[(start + i) % n].as_mut()?;
            usable(sender).then(|| sender.clone())
        })
    }

    pub fn is_ejected(&self) -> bool {
        if !self.maybe_ejected.load(Ordering::Relaxed) {
            return false;
        }
        // The flag changes only under the lock, so an ejection cannot be lost in between.
        let Ok(ejection) = self.ejection.lock() else {
            return false;
        };
        let ejected = ejection.is_ejected(Instant::now());
        if !ejected {
            self.maybe_ejected.store(false, Ordering::Relaxed);
        }
        ejected
    }

    /// Records a call's outcome; `true` when the endpoint has failed enough to be ejected.
    pub fn record_outcome(&self, failed: bool, threshold: u32) -> bool {
        self.ejection
            .lock()
            .is_ok_and(|mut e| e.record(failed, threshold, Instant::now()))
    }

    /// Takes the endpoint out of balancing for a while; how long.
    pub fn eject(&self, base: Duration, max: Duration) -> Duration {
        let Ok(mut ejection) = self.ejection.lock() else {
            return Duration::ZERO;
        };
        self.maybe_ejected.store(true, Ordering::Relaxed);
        ejection.eject(base, max, Instant::now())
    }

    /// Connections up and taking streams.
    pub fn connections(&self) -> usize {
        if let Some(report) = &self.engine {
            return report.view().connections;
        }
        self.senders
            .lock()
            .map(|mut s| s.iter_mut().flatten().map(|s| usize::from(usable(s))).sum())
            .unwrap_or(0)
    }

    /// How many connections this endpoint keeps.
    pub fn pool_size(&self) -> usize {
        self.senders.lock().map(|s| s.len()).unwrap_or(1)
    }

    pub fn is_ready(&self) -> bool {
        if let Some(report) = &self.engine {
            let view = report.view();
            return !self.removed.load(Ordering::Relaxed)
                && self.is_healthy()
                && view.ready
                && !view.ejected;
        }
        !self.removed.load(Ordering::Relaxed)
            && self.is_healthy()
            && !self.is_ejected()
            && self
                .senders
                .lock()
                .map(|mut s| s.iter_mut().flatten().any(usable))
                .unwrap_or(false)
    }

    pub fn state(&self) -> State {
        if let Some(report) = &self.engine {
            let view = report.view();
            return if self.removed.load(Ordering::Relaxed) {
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
            };
        }
        if self.removed.load(Ordering::Relaxed) {
            State::Removed
        } else if self.is_ejected() {
            State::Ejected
        } else if !self.is_healthy() {
            State::Unhealthy
        } else if self.is_ready() {
            State::Ready
        } else if self.connect_failures.load(Ordering::Relaxed) > 0 {
            State::Failing
        } else {
            State::Connecting
        }
    }

    pub fn outstanding(&self) -> usize {
        match &self.engine {
            Some(report) => report.view().outstanding,
            None => self.outstanding.load(Ordering::Relaxed),
        }
    }

    /// Streams started on this endpoint so far.
    pub fn started(&self) -> u64 {
        match &self.engine {
            Some(report) => report.view().started,
            None => self.started.load(Ordering::Relaxed),
        }
    }

    /// The engine carries its calls (the `wire` data path).
    pub fn is_engine_driven(&self) -> bool {
        self.engine.is_some()
    }

    pub fn stream_started(&self) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_ended(&self) {
        if self.outstanding.fetch_sub(1, Ordering::Relaxed) == 1
            && self.removed.load(Ordering::Relaxed)
        {
            self.wake.notify_one();
        }
    }

    /// Counts a finished call in `fanout_proxy_requests_total`.
    pub fn count_request(&self, status: Option<u16>, metrics: &Metrics, upstream: &str) {
        let Ok(mut counters) = self.counters.lock() else {
            return;
        };
        if let Some((_, counter)) = counters.iter().find(|(s, _)| *s == status) {
            counter.inc();
            return;
        }
        let counter = metrics.requests_counter(upstream, &self.label, status);
        counter.inc();
        counters.push((status, counter));
    }

    /// A request went out and waits for its response headers.
    pub fn request_sent(&self, clock: &Clock) {
        if let Ok(mut latency) = self.latency.lock() {
            latency.sent(clock);
        }
    }

    /// Its response headers came after `rtt`: a latency sample, aged by `clock`.
    pub fn request_answered(&self, rtt: Duration, clock: &Clock) {
        if let Ok(mut latency) = self.latency.lock() {
            latency.answered(rtt, clock);
        }
    }

    /// It ended without response headers.
    pub fn request_abandoned(&self) {
        if let Ok(mut latency) = self.latency.lock() {
            latency.abandoned();
        }
    }

    /// The latency estimate as of `clock`; `None` before the endpoint answered anything.
    pub fn rtt_estimate(&self, clock: &Clock) -> Option<Duration> {
        if let Some(report) = &self.engine {
            return report.view().rtt;
        }
        self.latency
            .lock()
            .ok()?
            .estimate(clock)
            .map(|ns| Duration::from_nanos(ns as u64))
    }

    /// Takes the endpoint out of balancing; its connection closes once its streams are done.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        self.wake.notify_waiters();
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Drives one connection until it ends, the endpoint is removed and idle, or a keepalive
    /// PING goes unanswered.
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
                // Woken when removed or idle.
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
            if self.is_removed() && self.outstanding() == 0 {
                return;
            }
        }
    }

    /// Keeps connection `slot` up until the endpoint is removed and idle.
    pub async fn run(
        self: Arc<Self>,
        slot: usize,
        connect_timeout: Duration,
        events: Arc<dyn Events>,
    ) {
        let mut backoff = BACKOFF_MIN;
        while !self.is_removed() {
            match connect(self.addr, connect_timeout).await {
                Ok((sender, connection, ping_pong)) => {
                    backoff = BACKOFF_MIN;
                    self.connect_failures.store(0, Ordering::Relaxed);
                    if let Ok(mut senders) = self.senders.lock() {
                        senders[slot] = Some(sender);
                    }
                    events.changed();
                    self.serve_connection(connection, ping_pong).await;
                    if let Ok(mut senders) = self.senders.lock() {
                        senders[slot] = None;
                    }
                    events.changed();
                    if !self.is_removed() {
                        events.connection_lost();
                    }
                }
                Err(e) => {
                    let failures = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if failures == 1 {
                        tracing::info!(endpoint = %self.addr, error = %e, "cannot connect");
                        events.changed();
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

type Connection = h2::client::Connection<ReadPastWriteErrors<TcpStream>, Bytes>;

/// A connection, and its PING handle for keepalives, once the endpoint has answered a first
/// PING: it has then accepted the connection and read its preface and settings, so the first
/// call's answer measures the call and not the connection's setup (a latency sample that
/// included it would make a new endpoint look slow).
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(SendRequest<Bytes>, Connection, Option<PingPong>), ConnectError> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(ReadPastWriteErrors::new(stream))
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

impl Candidate for Endpoint {
    fn is_ready(&self) -> bool {
        Endpoint::is_ready(self)
    }

    fn outstanding(&self) -> usize {
        Endpoint::outstanding(self)
    }

    fn latency(&self, clock: &Clock) -> Option<f64> {
        self.latency.lock().ok()?.balancing(clock)
    }

    fn last_pick(&self) -> u64 {
        self.last_pick.load(Ordering::Relaxed)
    }

    fn set_last_pick(&self, pick: u64) {
        self.last_pick.store(pick, Ordering::Relaxed);
    }
}
