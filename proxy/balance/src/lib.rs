//! Choosing an endpoint for each new stream: pure logic over what the data path reports of
//! its endpoints (streams outstanding, latency), shared by every data path.
//!
//! # Layout
//! - this file: the picker (P2C over peak-EWMA cost, least-request, round robin).
//! - `latency`: each endpoint's latency estimate, aged in time and in calls.
//! - `budget`: the retry budget, a token bucket counted in calls.
//! - `eject`: passive ejection of endpoints that keep failing.
//! - `split`: a weighted split over Services (a canary), drawn per call.
//! - `retry`: the Service's retry policy: throttling, backoff, pushback, the verdict.
//! - `simulation` (tests): the picker and the estimates over simulated endpoints.
#![forbid(unsafe_code)]

pub mod budget;
pub mod eject;
pub mod latency;
pub mod retry;
pub mod split;

use std::ops::Deref;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use fanout_proxy_config::Balancer;
use tokio::time::Instant;

use crate::latency::{Clock, NOISE_RATIO};

/// What the balancer weighs of an endpoint.
pub trait Candidate {
    fn is_ready(&self) -> bool;
    /// Streams open on it.
    fn outstanding(&self) -> usize;
    /// Its latency estimate in nanoseconds; `None` before it has answered anything.
    fn latency(&self, clock: &Clock) -> Option<f64>;
    /// The pick number it was last chosen at (0: never).
    fn last_pick(&self) -> u64;
    fn set_last_pick(&self, pick: u64);
}

pub struct Picker {
    /// The balancer (a `Balancer` as a number), which a config change may switch.
    kind: AtomicU8,
    next: AtomicUsize,
    /// Picks so far: the call clock latency estimates age by.
    picks: AtomicU64,
    /// The size of the upstream's endpoint set, kept by the upstream.
    endpoints: AtomicUsize,
}

impl Picker {
    pub fn new(kind: Balancer) -> Self {
        Self {
            kind: AtomicU8::new(kind as u8),
            next: AtomicUsize::new(fastrand::usize(..1024)),
            picks: AtomicU64::new(0),
            endpoints: AtomicUsize::new(0),
        }
    }

    pub fn kind(&self) -> Balancer {
        match self.kind.load(Ordering::Relaxed) {
            k if k == Balancer::RoundRobin as u8 => Balancer::RoundRobin,
            k if k == Balancer::LeastRequest as u8 => Balancer::LeastRequest,
            _ => Balancer::PeakEwma,
        }
    }

    /// Picks with `kind` from now on; what the endpoints' estimates learnt stays.
    pub fn set_kind(&self, kind: Balancer) {
        self.kind.store(kind as u8, Ordering::Relaxed);
    }

    pub fn set_endpoint_count(&self, count: usize) {
        self.endpoints.store(count, Ordering::Relaxed);
    }

    /// Where the upstream is now, in time and in calls.
    pub fn clock(&self) -> Clock {
        self.clock_at(Instant::now())
    }

    fn clock_at(&self, now: Instant) -> Clock {
        Clock {
            now,
            picks: self.picks.load(Ordering::Relaxed),
            endpoints: self.endpoints.load(Ordering::Relaxed),
        }
    }

    /// An endpoint among the ready ones, or `None` when none is ready.
    pub fn pick<P, E>(&self, endpoints: &[P]) -> Option<P>
    where
        P: Deref<Target = E> + Clone,
        E: Candidate,
    {
        self.pick_at(endpoints, Instant::now())
    }

    fn pick_at<P, E>(&self, endpoints: &[P], now: Instant) -> Option<P>
    where
        P: Deref<Target = E> + Clone,
        E: Candidate,
    {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let picked = match self.kind() {
            Balancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &endpoints[(start + i) % n])
                    .find(|e| e.is_ready())
                    .cloned()
            }
            Balancer::LeastRequest => p2c(endpoints, |a, b| {
                let (load_a, load_b) = (a.outstanding(), b.outstanding());
                load_b < load_a || (load_b == load_a && b.last_pick() < a.last_pick())
            }),
            Balancer::PeakEwma => {
                let clock = self.clock_at(now);
                p2c(endpoints, |a, b| peak_ewma_prefers_second(a, b, &clock))
            }
        }?;
        let pick = self.picks.fetch_add(1, Ordering::Relaxed) + 1;
        picked.set_last_pick(pick);
        Some(picked)
    }
}

/// Peak-EWMA cost (latency × (outstanding + 1)) where both latencies are known and differ
/// beyond noise; otherwise the endpoint with fewer streams outstanding, and between equals the
/// one chosen longer ago, so identical endpoints take turns even one call at a time. An
/// endpoint with no estimate yet is weighed by its load alone: never slower than a measured one.
fn peak_ewma_prefers_second<E: Candidate>(a: &E, b: &E, clock: &Clock) -> bool {
    let (load_a, load_b) = (a.outstanding() + 1, b.outstanding() + 1);
    match (a.latency(clock), b.latency(clock)) {
        (Some(rtt_a), Some(rtt_b)) if rtt_a.max(rtt_b) > rtt_a.min(rtt_b) * NOISE_RATIO => {
            rtt_b * (load_b as f64) < rtt_a * (load_a as f64)
        }
        _ => load_b < load_a || (load_b == load_a && b.last_pick() < a.last_pick()),
    }
}

/// Power of two choices: two distinct ready endpoints at random; the second wins if
/// preferred. Draws from the whole set first (no allocation on the hot path) and falls back to
/// the list of ready ones when draws keep hitting endpoints that are not.
fn p2c<P, E>(endpoints: &[P], prefers_second: impl Fn(&E, &E) -> bool) -> Option<P>
where
    P: Deref<Target = E> + Clone,
    E: Candidate,
{
    let n = endpoints.len();
    let choose = |a: &P, b: &P| {
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
    let ready: Vec<&P> = endpoints.iter().filter(|e| e.is_ready()).collect();
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

#[cfg(test)]
mod simulation;
