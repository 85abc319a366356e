//! What fanout does for every call besides moving its frames, done here too so the spike's
//! cost per call includes it: the endpoint is chosen by fanout's own balancer (P2C over
//! peak-EWMA cost, `fanout-balance`), its streams outstanding and latency estimate are kept,
//! and when the call ends it is counted by endpoint and grpc-status and its duration observed,
//! with the same Prometheus types as `fanout_proxy_requests_total` and
//! `fanout_proxy_request_duration_seconds`.

use std::rc::Rc;

use fanout_balance::latency::Clock;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::time::Instant;

use super::endpoint::Endpoint;

/// The upstream's duration histogram, with fanout's buckets.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// One call's bookkeeping, kept on its endpoint-side stream; settled when the stream is
/// forgotten, however it ended.
pub struct CallAccount {
    endpoint: Rc<Endpoint>,
    sent: Instant,
    answered: bool,
    status: Option<u16>,
}

impl CallAccount {
    pub fn start(endpoint: Rc<Endpoint>, clock: &Clock) -> CallAccount {
        endpoint.outstanding.set(endpoint.outstanding.get() + 1);
        endpoint.started.set(endpoint.started.get() + 1);
        endpoint.latency.borrow_mut().sent(clock);
        CallAccount {
            endpoint,
            sent: clock.now,
            answered: false,
            status: None,
        }
    }

    /// The endpoint the attempt went to.
    pub fn endpoint_addr(&self) -> std::net::SocketAddr {
        self.endpoint.addr
    }

    /// The response headers came: a latency sample.
    pub fn answered(&mut self, clock: &Clock) {
        if !self.answered {
            self.answered = true;
            let rtt = clock.now.saturating_duration_since(self.sent);
            self.endpoint.latency.borrow_mut().answered(rtt, clock);
        }
    }

    /// The client gave up on the call before it ended: CANCELLED, unless a status came.
    pub fn cancelled_by_client(&mut self) {
        self.status.get_or_insert(1);
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
        endpoint.record_outcome(self.status, Instant::now());
    }
}

/// `grpc-status` as a number, if it is one.
pub fn grpc_status(value: &[u8]) -> Option<u16> {
    std::str::from_utf8(value).ok()?.parse().ok()
}
