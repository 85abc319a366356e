//! Choosing an endpoint for each new stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fanout_proxy_config::Balancer;

use crate::endpoint::Endpoint;

pub struct Picker {
    kind: Balancer,
    next: AtomicUsize,
}

impl Picker {
    pub fn new(kind: Balancer) -> Self {
        Self {
            kind,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// An endpoint among the ready ones, or `None` when none is ready.
    pub fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        match self.kind {
            Balancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &endpoints[(start + i) % n])
                    .find(|e| e.is_ready())
                    .cloned()
            }
            Balancer::LeastRequest => p2c(endpoints, |a, b| b.outstanding() < a.outstanding()),
            Balancer::PeakEwma => p2c(endpoints, peak_ewma_prefers_second),
        }
    }
}

/// Latency estimates closer than this ratio are treated as equal: on a quiet network their
/// difference is scheduling noise, and chasing it skews load between identical endpoints.
const LATENCY_NOISE_RATIO: f64 = 2.0;

/// Peak-EWMA cost (latency × (outstanding + 1)) where latencies differ beyond noise; otherwise
/// the endpoint with fewer streams outstanding.
fn peak_ewma_prefers_second(a: &Endpoint, b: &Endpoint) -> bool {
    let (rtt_a, rtt_b) = (a.rtt_estimate_ns(), b.rtt_estimate_ns());
    let (load_a, load_b) = ((a.outstanding() + 1) as f64, (b.outstanding() + 1) as f64);
    if rtt_a.max(rtt_b) <= rtt_a.min(rtt_b) * LATENCY_NOISE_RATIO {
        load_b < load_a
    } else {
        rtt_b * load_b < rtt_a * load_a
    }
}

/// Power of two choices: two distinct ready endpoints at random; the second wins if
/// preferred. Draws from the whole set first (no allocation on the hot path) and falls back to
/// the list of ready ones when draws keep hitting endpoints that are not.
fn p2c(
    endpoints: &[Arc<Endpoint>],
    prefers_second: impl Fn(&Endpoint, &Endpoint) -> bool,
) -> Option<Arc<Endpoint>> {
    let n = endpoints.len();
    let choose = |a: &Arc<Endpoint>, b: &Arc<Endpoint>| {
        Some(if prefers_second(a, b) {
            b.clone()
        } else {
            a.clone()
        })
    };
    if n == 1 {
        return endpoints[0].is_ready().then(|| endpoints[0].clone());
    }
    for _ in 0..4 {
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        if endpoints[a].is_ready() && endpoints[b].is_ready() {
            return choose(&endpoints[a], &endpoints[b]);
        }
    }
    let ready: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| e.is_ready()).collect();
    match ready.len() {
        0 => None,
        1 => Some(ready[0].clone()),
        m => {
            let a = fastrand::usize(..m);
            let b = (a + 1 + fastrand::usize(..m - 1)) % m;
            choose(ready[a], ready[b])
        }
    }
}
