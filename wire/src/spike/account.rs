//! What fanout does for every call besides moving its frames, done here too so the spike's
//! cost per call includes it: the endpoint is chosen by fanout's own balancer (P2C over
//! peak-EWMA cost, `fanout-balance`), its streams outstanding and latency estimate are kept,
//! and when the call ends it is counted by endpoint and grpc-status and its duration observed,
//! with the same Prometheus types as `fanout_proxy_requests_total` and
//! `fanout_proxy_request_duration_seconds`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use fanout_balance::Candidate;
use fanout_balance::latency::{Clock, Latency};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::time::Instant;

use super::Conn;

/// One endpoint as the balancer sees it.
pub struct Endpoint {
    pub conn: Rc<Conn>,
    outstanding: Cell<usize>,
    latency: RefCell<Latency>,
    last_pick: Cell<u64>,
    /// Calls ended here, by grpc-status (`None`: no status, the stream was reset).
    counters: RefCell<Vec<(Option<u16>, Counter)>>,
    duration: Histogram,
}

impl Endpoint {
    pub fn new(conn: Rc<Conn>, duration: Histogram) -> Rc<Endpoint> {
        Rc::new(Endpoint {
            conn,
            outstanding: Cell::new(0),
            latency: RefCell::new(Latency::new(Instant::now())),
            last_pick: Cell::new(0),
            counters: RefCell::new(Vec::new()),
            duration,
        })
    }

    fn count(&self, status: Option<u16>) {
        let mut counters = self.counters.borrow_mut();
        match counters.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let counter = Counter::default();
                counter.inc();
                counters.push((status, counter));
            }
        }
    }
}

/// The upstream's duration histogram, with fanout's buckets.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Candidate for Endpoint {
    fn is_ready(&self) -> bool {
        !self.conn.closed.get() && !self.conn.leaving.get()
    }
    fn outstanding(&self) -> usize {
        self.outstanding.get()
    }
    fn latency(&self, clock: &Clock) -> Option<f64> {
        self.latency.borrow().balancing(clock)
    }
    fn last_pick(&self) -> u64 {
        self.last_pick.get()
    }
    fn set_last_pick(&self, pick: u64) {
        self.last_pick.set(pick);
    }
}

/// One call's bookkeeping, kept on its endpoint-side stream; settled when the stream is
/// forgotten, however it ended.
pub struct CallAccount {
    endpoint: Rc<Endpoint>,
    arrived: Instant,
    sent: Instant,
    answered: bool,
    status: Option<u16>,
}

impl CallAccount {
    pub fn start(endpoint: Rc<Endpoint>, arrived: Instant, clock: &Clock) -> CallAccount {
        endpoint.outstanding.set(endpoint.outstanding.get() + 1);
        endpoint.latency.borrow_mut().sent(clock);
        CallAccount {
            endpoint,
            arrived,
            sent: clock.now,
            answered: false,
            status: None,
        }
    }

    /// The response headers came: a latency sample.
    pub fn answered(&mut self, clock: &Clock) {
        if !self.answered {
            self.answered = true;
            let rtt = clock.now.saturating_duration_since(self.sent);
            self.endpoint.latency.borrow_mut().answered(rtt, clock);
        }
    }

    pub fn set_status(&mut self, status: Option<u16>) {
        if status.is_some() {
            self.status = status;
        }
    }
}

impl Drop for CallAccount {
    fn drop(&mut self) {
        let endpoint = &self.endpoint;
        endpoint
            .outstanding
            .set(endpoint.outstanding.get().saturating_sub(1));
        if !self.answered {
            endpoint.latency.borrow_mut().abandoned();
        }
        endpoint.count(self.status);
        endpoint
            .duration
            .observe(self.arrived.elapsed().as_secs_f64());
    }
}

/// `grpc-status` as a number, if it is one.
pub fn grpc_status(value: &[u8]) -> Option<u16> {
    std::str::from_utf8(value).ok()?.parse().ok()
}
