//! One endpoint (a pod): its HTTP/2 connection, kept up by a task that reconnects with backoff,
//! and its load (streams outstanding, peak-EWMA latency) for the balancer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::conn_io::ReadPastWriteErrors;
use crate::eject::Ejection;
use crate::health::{Health, Verdict};
use crate::metrics::Metrics;
use fanout_proxy_config::HealthCheck;

/// Latency samples decay with this time constant (as in Finagle and Linkerd).
const EWMA_DECAY: Duration = Duration::from_secs(1);
/// How far one slower sample moves the estimate up. Not all the way (a pure peak): one
/// scheduling hiccup would then push an endpoint out of rotation for a second, skewing load
/// between identical endpoints; three or four slow samples in a row do it.
const RISE_WEIGHT: f64 = 0.3;
/// Faster samples move the estimate down at least this much each.
const FALL_WEIGHT_MIN: f64 = 0.05;
/// A new endpoint's latency before any sample: low, so it is tried soon.
const INITIAL_RTT: Duration = Duration::from_millis(1);
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

/// Peak-EWMA: jumps up to a slower sample at once, decays towards faster ones. Also counts the
/// requests still waiting for their response headers: while some wait, the time since the last
/// news (a response, or the first of them being sent) is a floor under the estimate.
#[derive(Debug)]
struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    awaiting: u32,
    waiting_since: Instant,
}

impl PeakEwma {
    fn decay(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        (-elapsed / EWMA_DECAY.as_secs_f64()).exp()
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate(now);
        let weight = if rtt > current {
            RISE_WEIGHT
        } else {
            1.0 - self.decay(now)
        };
        self.estimate_ns = current + (rtt - current) * weight.max(FALL_WEIGHT_MIN);
        self.stamp = now;
    }

    /// The estimate now: without new samples it decays towards zero, so an endpoint avoided
    /// after a slow spell is tried again (and measured) before long.
    fn estimate(&self, now: Instant) -> f64 {
        self.estimate_ns * self.decay(now)
    }

    /// The estimate with the wait of pending requests as a floor. Without it, the one call that
    /// probes an endpoint whose estimate decayed is followed by more while its answer is still
    /// out: a slow endpoint would get a burst of calls on every probe, not one.
    fn balancing_estimate(&self, now: Instant) -> f64 {
        let waited = if self.awaiting > 0 {
            now.saturating_duration_since(self.waiting_since).as_nanos() as f64
        } else {
            0.0
        };
        self.estimate(now).max(waited)
    }

    fn request_sent(&mut self, now: Instant) {
        if self.awaiting == 0 {
            self.waiting_since = now;
        }
        self.awaiting += 1;
    }

    /// Response headers arrived after `rtt`.
    fn answered(&mut self, rtt: Duration, now: Instant) {
        self.observe(rtt, now);
        self.awaiting = self.awaiting.saturating_sub(1);
        self.waiting_since = now;
    }

    /// A request ended without response headers (reset, error, deadline): no news.
    fn abandoned(&mut self) {
        self.awaiting = self.awaiting.saturating_sub(1);
    }
}

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
    ewma: Mutex<PeakEwma>,
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
        Arc::new(Self {
            addr,
            label: addr.to_string(),
            senders: Mutex::new(vec![None; connections.max(1)]),
            next_sender: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma {
                estimate_ns: INITIAL_RTT.as_nanos() as f64,
                stamp: Instant::now(),
                awaiting: 0,
                waiting_since: Instant::now(),
            }),
            connect_failures: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            ejection: Mutex::new(Ejection::default()),
            maybe_ejected: AtomicBool::new(false),
            counters: Mutex::new(Vec::new()),
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
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Streams started on this endpoint so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
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
    pub fn request_sent(&self) {
        if let Ok(mut ewma) = self.ewma.lock() {
            ewma.request_sent(Instant::now());
        }
    }

    /// Its response headers came after `rtt`: a latency sample.
    pub fn request_answered(&self, rtt: Duration) {
        if let Ok(mut ewma) = self.ewma.lock() {
            ewma.answered(rtt, Instant::now());
        }
    }

    /// It ended without response headers.
    pub fn request_abandoned(&self) {
        if let Ok(mut ewma) = self.ewma.lock() {
            ewma.abandoned();
        }
    }

    /// The latency estimate now (see [`Endpoint::rtt_estimate_ns`]).
    pub fn rtt_estimate(&self) -> Duration {
        Duration::from_nanos(self.rtt_estimate_ns() as u64)
    }

    /// The latency the balancer weighs, in nanoseconds: the peak-EWMA estimate decayed for the
    /// time since the last sample, but no less than requests have been waiting for an answer.
    pub fn rtt_estimate_ns(&self) -> f64 {
        self.ewma
            .lock()
            .map(|e| e.balancing_estimate(Instant::now()))
            .unwrap_or(0.0)
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
    async fn serve_connection(&self, connection: Connection) {
        enum Event {
            Ended,
            Pong(bool),
            Timer,
            Woken,
        }
        let mut connection = connection;
        let mut ping_pong = connection.ping_pong();
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
                Ok((sender, connection)) => {
                    backoff = BACKOFF_MIN;
                    self.connect_failures.store(0, Ordering::Relaxed);
                    if let Ok(mut senders) = self.senders.lock() {
                        senders[slot] = Some(sender);
                    }
                    events.changed();
                    self.serve_connection(connection).await;
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
}

type Connection = h2::client::Connection<ReadPastWriteErrors<TcpStream>, Bytes>;

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(SendRequest<Bytes>, Connection), ConnectError> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(ReadPastWriteErrors::new(stream))
            .await
            .map_err(ConnectError::Handshake)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// A connection takes new streams unless it is closed or the endpoint sent GOAWAY. A sender
/// that has not queued a stream of its own answers at once, so a no-op waker is enough.
fn usable(sender: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_samples_raise_the_estimate_and_it_decays_back() {
        let start = Instant::now();
        let mut ewma = PeakEwma {
            estimate_ns: 1e6,
            stamp: start,
            awaiting: 0,
            waiting_since: start,
        };
        ewma.observe(Duration::from_millis(10), start);
        assert!((ewma.estimate(start) - (1e6 + 9e6 * RISE_WEIGHT)).abs() < 1.0);
        for _ in 0..5 {
            ewma.observe(Duration::from_millis(10), start);
        }
        assert!(
            ewma.estimate(start) > 8e6,
            "a run of slow samples shows: {}",
            ewma.estimate(start)
        );
        // Unsampled, the estimate decays (so the endpoint is tried again).
        let later = start + EWMA_DECAY;
        assert!((ewma.estimate(later) - ewma.estimate(start) * (-1f64).exp()).abs() < 1.0);
        // Fast samples bring it down.
        for i in 0..50 {
            ewma.observe(Duration::from_millis(1), later + Duration::from_millis(i));
        }
        assert!(ewma.estimate(later + Duration::from_millis(50)) < 1.5e6);
    }

    #[test]
    fn requests_waiting_for_an_answer_hold_the_estimate_up() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut ewma = PeakEwma {
            estimate_ns: 100e6,
            stamp: start,
            awaiting: 0,
            waiting_since: start,
        };
        // Decayed over 3 s of silence, the slow endpoint looks fast: it is probed.
        let probe = start + Duration::from_secs(3);
        assert!(ewma.balancing_estimate(probe) < 10e6);
        ewma.request_sent(probe);
        // While the probe waits, its wait is the floor: 40 ms in, it looks 40 ms slow.
        assert!(ewma.balancing_estimate(probe + ms(40)) >= 40e6);
        // A second request sent meanwhile does not reset the wait.
        ewma.request_sent(probe + ms(40));
        assert!(ewma.balancing_estimate(probe + ms(60)) >= 60e6);
        // The answer (100 ms) is a sample; the other request's wait counts from then.
        ewma.answered(ms(100), probe + ms(100));
        assert_eq!(ewma.awaiting, 1);
        assert!(
            ewma.estimate(probe + ms(100)) > 10e6,
            "the sample raised it"
        );
        assert!(ewma.balancing_estimate(probe + ms(180)) >= 80e6);
        // Abandoned without an answer: nothing waits, only the estimate remains.
        ewma.abandoned();
        let estimate = ewma.estimate(probe + ms(500));
        assert_eq!(ewma.balancing_estimate(probe + ms(500)), estimate);
    }
}
