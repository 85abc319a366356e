//! `fanout-bench proxy`: fanout next to a direct connection, HAProxy and nginx (when installed),
//! all in front of the same 10 backend processes, under the same load, in one run. Our load
//! generator (bare HTTP/2, pre-encoded calls, latency from each call's scheduled start) and
//! h2load when installed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fanout_e2e::bench::{Usage, median, per_100k, percentile, rss_kib, with_cpu, with_usage};
use fanout_e2e::load::{Load, Outcome};

use crate::chart;
use crate::h2load::H2load;
use crate::peers::{Backends, Peer};

/// Calls in flight during the saturation run (also the "100 concurrent streams" of the memory
/// target).
pub const CONCURRENCY: usize = 100;
/// Client connections to a proxy: 4 gateway pods.
pub const CLIENT_CONNECTIONS: usize = 4;
/// h2load at saturation: streams in flight per connection.
pub const H2LOAD_STREAMS: usize = 16;
pub const RATES: [u64; 2] = [1_000, 5_000];
/// Every figure is the median of this many rounds (the peers take turns within each round).
pub const ROUNDS: usize = 3;

/// One round of one peer.
pub struct Round {
    saturation: Outcome,
    /// Proxy CPU seconds during the saturation run (none for direct).
    cpu: Option<f64>,
    fixed: Vec<Outcome>,
    /// What the proxy spent during each fixed-rate run.
    fixed_usage: Vec<Option<Usage>>,
    h2load: Option<(H2load, Option<f64>)>,
    h2load_fixed: Vec<(H2load, Option<Usage>)>,
    /// Calls each backend served during the saturation run.
    shares: Vec<u64>,
}

impl Round {
    fn errors(&self) -> u64 {
        self.saturation.errors
            + self.fixed.iter().map(|f| f.errors).sum::<u64>()
            + self.h2load.iter().map(|(h, _)| h.errors).sum::<u64>()
            + self.h2load_fixed.iter().map(|(h, _)| h.errors).sum::<u64>()
    }
}

/// A peer over all rounds: every accessor is the median over the rounds.
pub struct Measured {
    pub name: String,
    rounds: Vec<Round>,
    /// Idle (before the first round) and peak RSS of the proxy, KiB.
    pub rss: Option<(u64, u64)>,
}

impl Measured {
    fn median(&self, f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
        median(self.rounds.iter().filter_map(f).collect())
    }

    pub fn calls_per_second(&self) -> f64 {
        self.median(|r| Some(r.saturation.calls as f64 / r.saturation.elapsed.as_secs_f64()))
            .unwrap_or(0.0)
    }

    pub fn cpu_per_100k(&self) -> Option<f64> {
        self.median(|r| per_100k(r.cpu, r.saturation.calls))
    }

    /// CPU seconds per 100k calls at the fixed rate `RATES[i]`: the sidecar's usual regime,
    /// and the same work for every proxy (at saturation each runs at its own rate).
    pub fn cpu_per_100k_at(&self, i: usize) -> Option<f64> {
        self.median(|r| per_100k(r.fixed_usage[i].map(|u| u.cpu), r.fixed[i].calls))
    }

    pub fn h2load_calls_per_second(&self) -> Option<f64> {
        self.median(|r| r.h2load.as_ref().map(|(h, _)| h.calls_per_second()))
    }

    pub fn h2load_cpu_per_100k(&self) -> Option<f64> {
        self.median(|r| {
            r.h2load
                .as_ref()
                .and_then(|(h, cpu)| per_100k(*cpu, h.calls))
        })
    }

    pub fn h2load_cpu_per_100k_at(&self, i: usize) -> Option<f64> {
        self.median(|r| {
            r.h2load_fixed
                .get(i)
                .and_then(|(h, usage)| per_100k(usage.map(|u| u.cpu), h.calls))
        })
    }

    /// Microseconds per call the proxy waited for a CPU at `RATES[i]`: ours, h2load.
    pub fn waited_us_per_call_at(&self, i: usize) -> (Option<f64>, Option<f64>) {
        let per_call =
            |waited: Option<f64>, calls: u64| waited.map(|w| w * 1e6 / calls.max(1) as f64);
        (
            self.median(|r| per_call(r.fixed_usage[i].map(|u| u.waited), r.fixed[i].calls)),
            self.median(|r| {
                r.h2load_fixed
                    .get(i)
                    .and_then(|(h, usage)| per_call(usage.map(|u| u.waited), h.calls))
            }),
        )
    }

    pub fn calls_per_cpu_second(&self) -> Option<f64> {
        self.median(|r| r.cpu.map(|cpu| r.saturation.calls as f64 / cpu.max(0.01)))
    }

    /// Our generator's percentile `p` at `RATES[rate_index]`, median over the rounds.
    pub fn latency(&self, rate_index: usize, p: f64) -> Duration {
        self.median(|r| Some(percentile(&r.fixed[rate_index].latencies, p).as_secs_f64()))
            .map_or(Duration::ZERO, Duration::from_secs_f64)
    }

    /// h2load's percentile `p` at `RATES[rate_index]`, median over the rounds.
    pub fn h2load_latency(&self, rate_index: usize, p: f64) -> Option<Duration> {
        self.median(|r| {
            r.h2load_fixed
                .get(rate_index)
                .map(|(h, _)| percentile(&h.latencies, p).as_secs_f64())
        })
        .map(Duration::from_secs_f64)
    }

    pub fn p99(&self, rate_index: usize) -> Duration {
        self.latency(rate_index, 99.0)
    }

    /// Calls each backend served during the saturation runs, all rounds together.
    pub fn shares(&self) -> Vec<u64> {
        let mut total = vec![0; self.rounds.first().map_or(0, |r| r.shares.len())];
        for round in &self.rounds {
            for (sum, calls) in total.iter_mut().zip(&round.shares) {
                *sum += calls;
            }
        }
        total
    }

    pub fn errors(&self) -> u64 {
        self.rounds.iter().map(Round::errors).sum()
    }
}

/// A peer under measurement: where the load goes, and the process whose CPU is counted.
struct Subject {
    name: String,
    /// Where our generator connects, and how many times over (connected afresh each round:
    /// peers close connections that sat idle while the others were measured).
    targets: Vec<SocketAddr>,
    per_target: usize,
    pid: Option<u32>,
    h2load_target: Option<SocketAddr>,
    idle_rss: Option<u64>,
    rounds: Vec<Round>,
    _peer: Option<Peer>,
}

pub async fn run(seconds: Duration, out: PathBuf, peers: &[String]) -> anyhow::Result<()> {
    let wanted = |name: &str| peers.iter().any(|p| p.eq_ignore_ascii_case(name));
    let backends = Backends::start().await?;
    let has_h2load = H2load::installed();
    let mut subjects = Vec::new();

    // Direct: the client balances itself over one connection per backend (the best case, and
    // the latency baseline). h2load cannot balance: it drives one backend.
    let direct = wanted("direct").then(|| Subject {
        name: "direct (client-side, 10 conns)".into(),
        targets: backends.addrs.clone(),
        per_target: 1,
        pid: None,
        h2load_target: has_h2load.then_some(backends.addrs[0]),
        idle_rss: None,
        rounds: Vec::new(),
        _peer: None,
    });
    subjects.extend(direct);
    let mut missing = Vec::new();
    for kind in ["fanout", "wire-spike", "HAProxy", "nginx"] {
        if !wanted(kind) {
            continue;
        }
        let peer = match kind {
            "fanout" => Some(Peer::fanout(&backends.addrs).await?),
            "wire-spike" => Some(Peer::wire_spike(&backends.addrs).await?),
            "HAProxy" => Peer::haproxy(&backends.addrs).await?,
            _ => Peer::nginx(&backends.addrs).await?,
        };
        let Some(peer) = peer else {
            missing.push(kind);
            continue;
        };
        subjects.push(Subject {
            name: format!("{} ({CLIENT_CONNECTIONS} conns)", peer.name),
            targets: vec![peer.listen],
            per_target: CLIENT_CONNECTIONS,
            pid: Some(peer.pid),
            h2load_target: has_h2load.then_some(peer.listen),
            idle_rss: Some(rss_kib(peer.pid).0),
            rounds: Vec::new(),
            _peer: Some(peer),
        });
    }

    // Rounds, the peers taking turns within each: a noisy minute hurts one round of everyone
    // rather than all of one peer's figures.
    for round in 1..=ROUNDS {
        for subject in &mut subjects {
            eprintln!("round {round}/{ROUNDS}: {}", subject.name);
            let measured = measure(subject, &backends, seconds).await?;
            subject.rounds.push(measured);
        }
    }
    let results: Vec<Measured> = subjects
        .into_iter()
        .map(|s| Measured {
            rss: s
                .pid
                .zip(s.idle_rss)
                .map(|(pid, idle)| (idle, rss_kib(pid).1)),
            name: s.name,
            rounds: s.rounds,
        })
        .collect();

    let report = crate::proxy_report::report(&results, &missing, has_h2load)?;
    fanout_e2e::bench::publish(&report, &out)?;
    let png = out.with_extension("png");
    chart::draw(&results, &png)?;
    eprintln!("wrote {}", png.display());
    for result in results.iter().filter(|r| must_not_fail(&r.name)) {
        let errors = result.errors();
        anyhow::ensure!(errors == 0, "{}: {errors} calls failed", result.name);
    }
    Ok(())
}

async fn measure(
    subject: &Subject,
    backends: &Backends,
    seconds: Duration,
) -> anyhow::Result<Round> {
    let load = Load::connect(&subject.targets, subject.per_target).await?;
    let pid = subject.pid;
    load.saturate(CONCURRENCY, Duration::from_secs(1)).await; // warm-up
    let calls_before = backends.calls().await?;
    let (saturation, cpu) = with_cpu(pid, load.saturate(CONCURRENCY, seconds)).await;
    let shares = backends
        .calls()
        .await?
        .iter()
        .zip(&calls_before)
        .map(|(after, before)| after - before)
        .collect();
    let mut fixed = Vec::new();
    let mut fixed_usage = Vec::new();
    for rate in RATES {
        let (outcome, usage) = with_usage(pid, load.fixed_rate(rate, seconds)).await;
        fixed.push(outcome);
        fixed_usage.push(usage);
    }
    let mut h2load = None;
    let mut h2load_fixed = Vec::new();
    if let Some(target) = subject.h2load_target {
        let secs = seconds.as_secs().max(1);
        // h2load is a blocking child process: run it off the runtime so the CPU reading and
        // everything else here stay responsive.
        let saturate = tokio::task::spawn_blocking(move || {
            H2load::saturate(target, CLIENT_CONNECTIONS, H2LOAD_STREAMS, secs)
        });
        let (run, cpu) = with_cpu(pid, saturate).await;
        h2load = Some((run??, cpu));
        for rate in RATES {
            let fixed = tokio::task::spawn_blocking(move || {
                H2load::fixed_rate(target, CLIENT_CONNECTIONS, rate, secs)
            });
            let (run, usage) = with_usage(pid, fixed).await;
            h2load_fixed.push((run??, usage));
        }
    }
    Ok(Round {
        saturation,
        cpu,
        fixed,
        fixed_usage,
        h2load,
        h2load_fixed,
        shares,
    })
}

/// Whether failed calls through `name` fail the run: fanout's, and the direct baseline's (the
/// backends'). A peer that cannot keep up fails calls; the report says so, and the run goes on.
fn must_not_fail(name: &str) -> bool {
    name.starts_with("fanout") || name.starts_with("wire spike") || name.starts_with("direct")
}
