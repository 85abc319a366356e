//! The balancer and the latency estimates over simulated endpoints in simulated time: calls one
//! at a time or many in flight, endpoints that answer their first calls slowly, join late,
//! hiccup, stay slow or stall. Deterministic (seeded), and fast enough to try thousands of
//! calls at rates no loopback test reaches.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_proxy_config::Balancer;
use tokio::time::Instant;

use super::{Candidate, Picker};
use crate::latency::{Clock, Latency};

struct SimEndpoint {
    latency: Mutex<Latency>,
    outstanding: AtomicUsize,
    last_pick: AtomicU64,
    ready: AtomicBool,
    /// Calls it has been given.
    calls: AtomicU64,
}

impl Candidate for SimEndpoint {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
    fn latency(&self, clock: &Clock) -> Option<f64> {
        self.latency.lock().unwrap().balancing(clock)
    }
    fn last_pick(&self) -> u64 {
        self.last_pick.load(Ordering::Relaxed)
    }
    fn set_last_pick(&self, pick: u64) {
        self.last_pick.store(pick, Ordering::Relaxed);
    }
}

/// How long endpoint `id` takes to answer its `n`-th call.
type Answer = dyn Fn(usize, u64, &mut fastrand::Rng) -> Duration;

struct Scenario<'a> {
    endpoints: usize,
    /// Calls kept in flight: 1 is one call at a time on one connection.
    in_flight: usize,
    calls: usize,
    answer: &'a Answer,
    /// When each endpoint becomes ready (its connection is up).
    ready_at: &'a dyn Fn(usize) -> Duration,
    seed: u64,
}

/// What a run did: the endpoint of every call in the order they were picked, with the time.
struct Run {
    picks: Vec<(usize, Duration)>,
    latencies: Vec<Duration>,
}

/// Time between one call's answer and the next call on that slot: the client and the proxy.
const TURNAROUND: Duration = Duration::from_micros(30);

fn run(scenario: &Scenario<'_>) -> Run {
    fastrand::seed(scenario.seed);
    let mut rng = fastrand::Rng::with_seed(scenario.seed ^ 0x5eed);
    let start = Instant::now();
    let picker = Picker::new(Balancer::PeakEwma);
    picker.set_endpoint_count(scenario.endpoints);
    let endpoints: Vec<Arc<SimEndpoint>> = (0..scenario.endpoints)
        .map(|_| {
            Arc::new(SimEndpoint {
                latency: Mutex::new(Latency::new(start)),
                outstanding: AtomicUsize::new(0),
                last_pick: AtomicU64::new(0),
                ready: AtomicBool::new(false),
                calls: AtomicU64::new(0),
            })
        })
        .collect();
    let mut answers: BinaryHeap<Reverse<(Duration, u64, usize, Duration)>> = BinaryHeap::new();
    let mut run = Run {
        picks: Vec::with_capacity(scenario.calls),
        latencies: Vec::with_capacity(scenario.calls),
    };
    let mut now = Duration::ZERO;
    let mut free_slots = scenario.in_flight;
    let mut seq = 0u64;
    while run.latencies.len() < scenario.calls {
        for (id, endpoint) in endpoints.iter().enumerate() {
            endpoint
                .ready
                .store(now >= (scenario.ready_at)(id), Ordering::Relaxed);
        }
        while free_slots > 0 && run.picks.len() < scenario.calls {
            let Some(endpoint) = picker.pick_at(&endpoints, start + now) else {
                break;
            };
            let id = endpoints
                .iter()
                .position(|e| Arc::ptr_eq(e, &endpoint))
                .unwrap();
            endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
            endpoint
                .latency
                .lock()
                .unwrap()
                .sent(&picker.clock_at(start + now));
            let n = endpoint.calls.fetch_add(1, Ordering::Relaxed);
            let took = (scenario.answer)(id, n, &mut rng);
            answers.push(Reverse((now + took, seq, id, now)));
            seq += 1;
            run.picks.push((id, now));
            free_slots -= 1;
        }
        let Some(Reverse((done, _, id, sent))) = answers.pop() else {
            // Nothing in flight and nothing ready: wait for an endpoint to come up.
            now += Duration::from_millis(1);
            continue;
        };
        now = done;
        let endpoint = &endpoints[id];
        endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
        let clock = picker.clock_at(start + now);
        endpoint
            .latency
            .lock()
            .unwrap()
            .answered(done - sent, &clock);
        run.latencies.push(done - sent);
        now += TURNAROUND;
        free_slots += 1;
    }
    run
}

/// Identical endpoints: 200 µs ± 30 %, and a hiccup of up to `hiccup` on a share `hiccups` of
/// calls (a descheduled thread, a GC pause).
fn identical(rng: &mut fastrand::Rng, hiccups: f64, hiccup: Duration) -> Duration {
    let base = Duration::from_micros(200).mul_f64(0.7 + 0.6 * rng.f64());
    if rng.f64() < hiccups {
        base + hiccup.mul_f64(rng.f64())
    } else {
        base
    }
}

/// The smallest share of its fair share any endpoint got in any window of `window` calls
/// (sliding by a tenth of a window), counting from `from` (a pick index).
fn worst_window(picks: &[(usize, Duration)], endpoints: usize, window: usize, from: usize) -> f64 {
    let fair = window as f64 / endpoints as f64;
    let mut worst = f64::MAX;
    let mut start = from;
    while start + window <= picks.len() {
        let mut counts = vec![0usize; endpoints];
        for (id, _) in &picks[start..start + window] {
            counts[*id] += 1;
        }
        let least = *counts.iter().min().unwrap() as f64;
        worst = worst.min(least / fair);
        start += window / 10;
    }
    worst
}

fn always(_: usize) -> Duration {
    Duration::ZERO
}

#[test]
fn an_endpoint_whose_first_calls_are_slow_gets_half_its_share_in_every_window() {
    // A cold pod: its first three answers take 5 ms or 20 ms, where every answer after (and
    // every answer of the others) takes about 0.2 ms.
    for slow in [Duration::from_millis(5), Duration::from_millis(20)] {
        let answer = move |id: usize, n: u64, rng: &mut fastrand::Rng| {
            if id == 0 && n < 3 {
                slow
            } else {
                identical(rng, 0.005, Duration::from_millis(2))
            }
        };
        for in_flight in [1, 32] {
            for seed in 0..5 {
                let run = run(&Scenario {
                    endpoints: 5,
                    in_flight,
                    calls: 6_000,
                    answer: &answer,
                    ready_at: &always,
                    seed,
                });
                let worst = worst_window(&run.picks, 5, 1_000, 0);
                eprintln!("cold {slow:?} {in_flight} {seed}: {worst:.2}");
                assert!(
                    worst >= 0.5,
                    "first answers {slow:?}, {in_flight} in flight, seed {seed}: an endpoint \
                     got {:.0}% of its fair share in a window of 1,000 calls",
                    worst * 100.0
                );
            }
        }
    }
}

#[test]
fn an_endpoint_that_connects_later_gets_half_its_share_at_once() {
    let answer =
        |_: usize, _: u64, rng: &mut fastrand::Rng| identical(rng, 0.005, Duration::from_millis(2));
    let late = Duration::from_millis(50);
    let ready_at = move |id: usize| if id == 4 { late } else { Duration::ZERO };
    for in_flight in [1, 32] {
        for seed in 0..5 {
            let run = run(&Scenario {
                endpoints: 5,
                in_flight,
                calls: 8_000,
                answer: &answer,
                ready_at: &ready_at,
                seed,
            });
            let joined = run.picks.iter().position(|(_, at)| *at >= late).unwrap();
            let worst = worst_window(&run.picks, 5, 1_000, joined);
            eprintln!("late {in_flight} {seed}: {worst:.2}");
            assert!(
                worst >= 0.5,
                "{in_flight} in flight, seed {seed}: {:.0}% of a fair share after joining",
                worst * 100.0
            );
        }
    }
}

#[test]
fn identical_endpoints_share_evenly_through_hiccups() {
    // 1 % of answers take up to 5 ms longer (25 times the usual), on every endpoint.
    let answer =
        |_: usize, _: u64, rng: &mut fastrand::Rng| identical(rng, 0.01, Duration::from_millis(5));
    for in_flight in [1, 32] {
        for seed in 0..3 {
            let run = run(&Scenario {
                endpoints: 10,
                in_flight,
                calls: 10_000,
                answer: &answer,
                ready_at: &always,
                seed,
            });
            let mut counts = [0usize; 10];
            for (id, _) in &run.picks {
                counts[*id] += 1;
            }
            let (most, least) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
            assert!(
                *most as f64 <= 1.2 * *least as f64,
                "{in_flight} in flight, seed {seed}: {counts:?}"
            );
            let worst = worst_window(&run.picks, 10, 1_000, 0);
            eprintln!("hiccups {in_flight} seed {seed}: {counts:?} worst {worst:.2}");
            assert!(
                worst >= 0.5,
                "{in_flight} in flight, seed {seed}: {:.0}% of a fair share",
                worst * 100.0
            );
        }
    }
}

#[test]
fn a_ten_times_slower_endpoint_gets_few_calls_and_the_tail_holds() {
    let answer = |id: usize, _: u64, rng: &mut fastrand::Rng| {
        let base = if id == 9 { 100 } else { 10 };
        Duration::from_millis(base).mul_f64(0.95 + 0.1 * rng.f64())
    };
    for seed in 0..5 {
        let run = run(&Scenario {
            endpoints: 10,
            in_flight: 8,
            calls: 4_000,
            answer: &answer,
            ready_at: &always,
            seed,
        });
        let slow = run.picks.iter().filter(|(id, _)| *id == 9).count();
        let share = slow as f64 / run.picks.len() as f64;
        eprintln!("slow {seed}: {:.2}%", share * 100.0);
        assert!(
            share < 0.006,
            "seed {seed}: the slow endpoint took {:.2}%",
            share * 100.0
        );
        let mut latencies = run.latencies.clone();
        latencies.sort();
        let p99 = latencies[latencies.len() * 99 / 100];
        assert!(p99 < Duration::from_millis(15), "seed {seed}: p99 {p99:?}");
    }
}

#[test]
fn an_endpoint_that_stops_answering_gets_few_calls() {
    // Endpoint 3 hangs after its 100th call (each later call waits 10 s); the others answer.
    let answer = |id: usize, n: u64, rng: &mut fastrand::Rng| {
        if id == 3 && n >= 100 {
            Duration::from_secs(10)
        } else {
            identical(rng, 0.0, Duration::ZERO)
        }
    };
    for in_flight in [4, 32] {
        let run = run(&Scenario {
            endpoints: 5,
            in_flight,
            calls: 5_000,
            answer: &answer,
            ready_at: &always,
            seed: 1,
        });
        let stuck = run.picks.iter().filter(|(id, _)| *id == 3).count();
        eprintln!("stuck {in_flight}: {stuck}");
        assert!(
            stuck <= 100 + in_flight + 10,
            "{in_flight} in flight: {stuck} calls went to the endpoint that stopped answering"
        );
    }
}
