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
        let ready: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| e.is_ready()).collect();
        match ready.len() {
            0 => None,
            1 => Some(ready[0].clone()),
            n => Some(
                match self.kind {
                    Balancer::RoundRobin => ready[self.next.fetch_add(1, Ordering::Relaxed) % n],
                    Balancer::LeastRequest => p2c(&ready, |a, b| b.outstanding() < a.outstanding()),
                    Balancer::PeakEwma => p2c(&ready, peak_ewma_prefers_second),
                }
                .clone(),
            ),
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

/// Power of two choices: two distinct endpoints at random; the second wins if preferred.
fn p2c<'a>(
    ready: &[&'a Arc<Endpoint>],
    prefers_second: impl Fn(&Endpoint, &Endpoint) -> bool,
) -> &'a Arc<Endpoint> {
    let n = ready.len();
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    if prefers_second(ready[a], ready[b]) {
        ready[b]
    } else {
        ready[a]
    }
}
