//! The table `fanout-bench proxy` writes (`target/bench/proxy.md`, copied into the README):
//! every peer's figures, what each proxy adds over direct, and fanout's ratios to HAProxy.

use std::fmt::Write as _;
use std::time::Duration;

use fanout_e2e::bench::ms;

use crate::proxy_bench::{
    CLIENT_CONNECTIONS, CONCURRENCY, H2LOAD_STREAMS, Measured, RATES, ROUNDS,
};

fn latencies(r: &Measured, rate_index: usize) -> String {
    format!(
        "{} / {} / {}",
        ms(r.latency(rate_index, 50.0)),
        ms(r.latency(rate_index, 99.0)),
        ms(r.latency(rate_index, 99.9))
    )
}

fn h2load_latencies(r: &Measured, rate_index: usize) -> String {
    let at = |p| {
        r.h2load_latency(rate_index, p)
            .map_or_else(|| "–".into(), ms)
    };
    format!("{} / {} / {}", at(50.0), at(99.0), at(99.9))
}

fn share_range(shares: &[u64]) -> String {
    let total: u64 = shares.iter().sum();
    let used = shares.iter().filter(|&&c| c > 0).count();
    let pct = |c: u64| 100.0 * c as f64 / total.max(1) as f64;
    let min = shares.iter().copied().min().unwrap_or(0);
    let max = shares.iter().copied().max().unwrap_or(0);
    format!(
        "{used} of {}; {:.1}–{:.1} %",
        shares.len(),
        pct(min),
        pct(max)
    )
}

pub fn report(results: &[Measured], missing: &[&str], has_h2load: bool) -> anyhow::Result<String> {
    let mut t = String::new();
    let [low, high] = RATES;
    writeln!(
        t,
        "Unary gRPC, 64-byte messages, 10 backend processes on 127.0.0.2–11, every proxy on one \
         thread, {} cores ({}). Every figure is the median of {ROUNDS} rounds; \"ours\" is our \
         load generator ({CLIENT_CONNECTIONS} connections, latency from each call's scheduled \
         start), h2load is nghttp2's ({CLIENT_CONNECTIONS} connections; at a fixed rate `--rps` \
         with up to 8 calls in flight each, latency per call from `--log-file`).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    )?;
    writeln!(
        t,
        "| | calls/s at saturation: ours ({CONCURRENCY} in flight) / h2load ({CLIENT_CONNECTIONS}×{H2LOAD_STREAMS}) | proxy CPU s / 100k calls at saturation: ours / h2load | at {high} calls/s: ours / h2load | RSS idle / peak MiB | backends used; share min–max |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|---|")?;
    let dash = || "–".to_string();
    let two = |v: Option<f64>| v.map_or_else(dash, |c| format!("{c:.2}"));
    for r in results {
        writeln!(
            t,
            "| {} | {:.0} / {} | {} / {} | {} / {} | {} | {} |",
            r.name,
            r.calls_per_second(),
            r.h2load_calls_per_second()
                .map_or_else(dash, |c| format!("{c:.0}")),
            two(r.cpu_per_100k()),
            two(r.h2load_cpu_per_100k()),
            two(r.cpu_per_100k_at(1)),
            two(r.h2load_cpu_per_100k_at(1)),
            r.rss.map_or_else(dash, |(idle, peak)| format!(
                "{:.1} / {:.1}",
                idle as f64 / 1024.0,
                peak as f64 / 1024.0
            )),
            share_range(&r.shares()),
        )?;
    }
    writeln!(t)?;
    writeln!(
        t,
        "| p50 / p99 / p99.9 ms | {low}/s ours | {high}/s ours | {low}/s h2load | {high}/s h2load |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|")?;
    for r in results {
        writeln!(
            t,
            "| {} | {} | {} | {} | {} |",
            r.name,
            latencies(r, 0),
            latencies(r, 1),
            h2load_latencies(r, 0),
            h2load_latencies(r, 1),
        )?;
    }
    writeln!(t)?;
    if let Some(direct) = results.iter().find(|r| r.name.starts_with("direct")) {
        for r in results.iter().filter(|r| !r.name.starts_with("direct")) {
            let h2 = |i: usize| match (r.h2load_latency(i, 99.0), direct.h2load_latency(i, 99.0)) {
                (Some(a), Some(b)) => signed_ms(a, b),
                _ => dash(),
            };
            writeln!(
                t,
                "p99 added by {} over direct: ours {} ms at {low}/s, {} ms at {high}/s; h2load {} ms at {low}/s, {} ms at {high}/s.",
                r.name,
                signed_ms(r.p99(0), direct.p99(0)),
                signed_ms(r.p99(1), direct.p99(1)),
                h2(0),
                h2(1),
            )?;
        }
    }
    for r in results.iter().filter(|r| !r.name.starts_with("direct")) {
        let us = |v: Option<f64>| v.map_or_else(dash, |v| format!("{v:.0}"));
        let (ours_low, h2_low) = r.waited_us_per_call_at(0);
        let (ours_high, h2_high) = r.waited_us_per_call_at(1);
        writeln!(
            t,
            "{} waited for a CPU (runnable, not running: /proc schedstat) {} µs per call at \
             {low}/s and {} at {high}/s with ours; {} and {} with h2load.",
            r.name,
            us(ours_low),
            us(ours_high),
            us(h2_low),
            us(h2_high),
        )?;
    }
    let find = |prefix: &str| results.iter().find(|r| r.name.starts_with(prefix));
    let compared = ["fanout (", "wire spike"].into_iter().filter_map(find);
    for f in compared {
        let Some(h) = find("HAProxy") else { break };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        let secs = |d: Duration| Some(d.as_secs_f64());
        let h2 = |r: &Measured, i: usize, p: f64| r.h2load_latency(i, p).map(|d| d.as_secs_f64());
        writeln!(
            t,
            "{} ÷ HAProxy, CPU per call: at saturation {} (ours) / {} (h2load), at {high}/s {} / {}; \
             p99 at {low}/s {} / {}, at {high}/s {} / {}; p99.9 at {low}/s {} / {}, at {high}/s {} / {}; peak RSS {}.",
            f.name.split(" (").next().unwrap_or_default(),
            ratio(f.cpu_per_100k(), h.cpu_per_100k()),
            ratio(f.h2load_cpu_per_100k(), h.h2load_cpu_per_100k()),
            ratio(f.cpu_per_100k_at(1), h.cpu_per_100k_at(1)),
            ratio(f.h2load_cpu_per_100k_at(1), h.h2load_cpu_per_100k_at(1)),
            ratio(secs(f.p99(0)), secs(h.p99(0))),
            ratio(h2(f, 0, 99.0), h2(h, 0, 99.0)),
            ratio(secs(f.p99(1)), secs(h.p99(1))),
            ratio(h2(f, 1, 99.0), h2(h, 1, 99.0)),
            ratio(secs(f.latency(0, 99.9)), secs(h.latency(0, 99.9))),
            ratio(h2(f, 0, 99.9), h2(h, 0, 99.9)),
            ratio(secs(f.latency(1, 99.9)), secs(h.latency(1, 99.9))),
            ratio(h2(f, 1, 99.9), h2(h, 1, 99.9)),
            ratio(f.rss.map(|r| r.1 as f64), h.rss.map(|r| r.1 as f64)),
        )?;
    }
    for name in missing {
        writeln!(
            t,
            "{name} not installed (Debian: apt-get install haproxy nginx-light)."
        )?;
    }
    if !has_h2load {
        writeln!(
            t,
            "h2load not installed (Debian: apt-get install nghttp2-client)."
        )?;
    }
    writeln!(
        t,
        "h2load on the direct row drives one backend (it cannot balance over 10)."
    )?;
    for r in results.iter().filter(|r| r.errors() > 0) {
        writeln!(
            t,
            "{}: {} calls failed over the rounds (overloaded: its latencies at that rate include them).",
            r.name,
            r.errors()
        )?;
    }
    Ok(t)
}

fn signed_ms(a: Duration, b: Duration) -> String {
    format!("{:+.3}", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
