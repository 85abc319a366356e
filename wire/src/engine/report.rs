//! What the engine tells whoever runs it (fanout-proxy): calls as they start and end (the
//! drain waits on them; their durations and outcomes are metrics), retries and the retries
//! held back, and each endpoint's state for `/endpoints` and `/ready`.
//!
//! The engine's state lives on its threads (`Rc`, `Cell`); what leaves them goes through an
//! [`Observer`] (calls, counters: `Send + Sync` already) or is copied into an
//! [`EndpointReport`] a few times a second, so the per-call path takes no lock for it.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_balance::Candidate;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Forwarder;

/// How often each thread copies its endpoints' state into their reports.
pub const REPORT_PERIOD: Duration = Duration::from_millis(100);

/// Receives what the engine reports. Called from the engine's threads.
pub trait Observer: Send + Sync + 'static {
    /// A call arrived (it ends with [`Observer::call_ended`], however it ends).
    fn call_started(&self) {}
    fn call_ended(&self) {}
    /// The histogram of call durations, arrival to end.
    fn duration(&self) -> Histogram;
    /// The counter of calls that ended on `endpoint` (`None`: answered by the proxy itself)
    /// with `status` (`None`: without one, reset); kept by the engine, asked once per pair.
    fn requests(&self, endpoint: Option<SocketAddr>, status: Option<u16>) -> Counter;
    /// A call went again to an endpoint, for `reason` (as `fanout_proxy_retries_total`).
    fn retried(&self, _reason: &str) {}
    /// A retry was not made: the retry budget was spent.
    fn retry_budget_exhausted(&self) {}
    /// A retry was not made: the Service's retry throttling held it back.
    fn retry_throttled(&self) {}
    /// The proxy answers a call `code` itself, no endpoint being ready: the `grpc-message`
    /// for its client (percent-encoded), saying why. The observer may say it elsewhere too.
    fn no_endpoint(&self, _code: u16) -> String {
        "fanout: no endpoint is ready".into()
    }
    /// A call failed at the proxy or was reset: on `endpoint` (`None`: none took it), what
    /// its client got, and why (a rate-limited log line, in fanout-proxy).
    fn call_failed(&self, _endpoint: Option<SocketAddr>, _got: ClientGot, _reason: &str) {}
    /// Where the state of the endpoint at `addr` is to be reported.
    fn endpoint(&self, _addr: SocketAddr) -> Arc<EndpointReport> {
        Arc::default()
    }
}

/// What a client got when its call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientGot {
    /// A grpc-status the proxy answered itself.
    Status(u16),
    /// RST_STREAM with this HTTP/2 error code.
    Reset(u32),
}

/// Nobody listens: the engine on its own (tests, the benchmark binary).
pub struct Unobserved {
    duration: Histogram,
}

impl Default for Unobserved {
    fn default() -> Self {
        Unobserved {
            duration: super::account::duration_histogram(),
        }
    }
}

impl Observer for Unobserved {
    fn duration(&self) -> Histogram {
        self.duration.clone()
    }
    fn requests(&self, _: Option<SocketAddr>, _: Option<u16>) -> Counter {
        Counter::default()
    }
}

/// One endpoint as one engine thread sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct View {
    /// A connection of it takes calls.
    pub ready: bool,
    /// Its connections taking calls.
    pub connections: usize,
    /// A connection of it failed or never became ready (and none is ready now).
    pub failing: bool,
    /// Out of balancing for failing calls.
    pub ejected: bool,
    pub outstanding: usize,
    /// Attempts ever started on it.
    pub started: u64,
    /// The balancer's latency estimate.
    pub rtt: Option<Duration>,
}

/// One endpoint's state over every engine thread, as last copied.
#[derive(Default)]
pub struct EndpointReport {
    /// By engine thread.
    views: Mutex<Vec<(usize, View)>>,
}

impl EndpointReport {
    fn set(&self, thread: usize, view: View) {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        match views.iter_mut().find(|(t, _)| *t == thread) {
            Some((_, slot)) => *slot = view,
            None => views.push((thread, view)),
        }
    }

    /// A thread no longer has the endpoint (it left the set).
    pub(super) fn forget(&self, thread: usize) {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views.retain(|(t, _)| *t != thread);
    }

    /// Every thread's view as one: ready on any, ejected on any, counts summed, the mean
    /// of the latency estimates.
    pub fn view(&self) -> View {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = View::default();
        let (mut rtt_sum, mut rtts) = (Duration::ZERO, 0u32);
        for (_, view) in views.iter() {
            all.ready |= view.ready;
            all.failing |= view.failing;
            all.ejected |= view.ejected;
            all.connections += view.connections;
            all.outstanding += view.outstanding;
            all.started += view.started;
            if let Some(rtt) = view.rtt {
                rtt_sum += rtt;
                rtts += 1;
            }
        }
        all.failing &= !all.ready;
        all.rtt = (rtts > 0).then(|| rtt_sum / rtts);
        all
    }
}

/// The calls of one engine thread: counted for the observer, and here, so that a stopped
/// engine knows when its last call ended.
pub struct Calls {
    pub observer: Arc<dyn Observer>,
    duration: Histogram,
    active: Cell<usize>,
    idle: Notify,
    /// Self-answered calls by status, at hand.
    answered: RefCell<Vec<(u16, Counter)>>,
}

impl Calls {
    pub fn new(observer: Arc<dyn Observer>) -> Rc<Calls> {
        Rc::new(Calls {
            duration: observer.duration(),
            observer,
            active: Cell::new(0),
            idle: Notify::new(),
            answered: Default::default(),
        })
    }

    /// Until no call is in flight on this thread.
    pub async fn idle(&self) {
        loop {
            let woken = self.idle.notified();
            if self.active.get() == 0 {
                return;
            }
            woken.await;
        }
    }

    /// A call the proxy answers itself with `code`, no endpoint being ready: counted, and
    /// the message for its client.
    pub fn no_endpoint(&self, code: &[u8]) -> Vec<u8> {
        let Some(code) = super::account::grpc_status(code) else {
            return Vec::new();
        };
        self.count_answered(code);
        self.observer.no_endpoint(code).into_bytes()
    }

    fn count_answered(&self, code: u16) {
        count_in(&self.answered, code, || {
            Some(self.observer.requests(None, Some(code)))
        });
    }
}

/// One call from its arrival to its end, however it ends: dropped with it.
pub struct CallGuard {
    calls: Rc<Calls>,
    arrived: Instant,
}

impl CallGuard {
    pub fn start(calls: &Rc<Calls>, arrived: Instant) -> CallGuard {
        calls.active.set(calls.active.get() + 1);
        calls.observer.call_started();
        CallGuard {
            calls: calls.clone(),
            arrived,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let calls = &self.calls;
        calls.duration.observe(self.arrived.elapsed().as_secs_f64());
        let active = calls.active.get().saturating_sub(1);
        calls.active.set(active);
        if active == 0 {
            calls.idle.notify_waiters();
        }
        calls.observer.call_ended();
    }
}

/// Copies each endpoint's state into its report every [`REPORT_PERIOD`], and at once when a
/// connection became ready or ended, a first connect failed or an endpoint was ejected, while
/// the thread runs.
pub async fn publish(fwd: Rc<Forwarder>) {
    let mut tick = tokio::time::interval(REPORT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = fwd.report_now.notified() => {}
        }
        let clock = fwd.picker.clock();
        for endpoint in fwd.endpoints.borrow().iter() {
            let connections = endpoint.ready_connections();
            let ready = connections > 0;
            let (outstanding, started) = (endpoint.outstanding(), endpoint.started.get());
            let last = endpoint.published.get();
            // An endpoint no call came to or left since keeps the estimate shown (as of its
            // last call): with many endpoints most are quiet in a period, and this loop runs
            // ten times a second.
            let quiet = last.filter(|v| (v.outstanding, v.started) == (outstanding, started));
            let rtt = match quiet {
                Some(last) => last.rtt,
                None => endpoint
                    .latency
                    .borrow()
                    .estimate(&clock)
                    .map(|ns| Duration::from_nanos(ns as u64)),
            };
            let view = View {
                ready,
                connections,
                failing: !ready && endpoint.has_failed(),
                ejected: endpoint.is_ejected(),
                outstanding,
                started,
                rtt,
            };
            if last != Some(view) {
                endpoint.report.set(fwd.thread, view);
                endpoint.published.set(Some(view));
            }
        }
    }
}

/// Counts one in the counter kept for `key` in `kept`, made by `make` the first time (`None`:
/// none to be had, nothing counted).
pub(super) fn count_in<K: PartialEq>(
    kept: &RefCell<Vec<(K, Counter)>>,
    key: K,
    make: impl FnOnce() -> Option<Counter>,
) {
    let mut kept = kept.borrow_mut();
    if let Some((_, counter)) = kept.iter().find(|(k, _)| *k == key) {
        counter.inc();
    } else if let Some(counter) = make() {
        counter.inc();
        kept.push((key, counter));
    }
}
