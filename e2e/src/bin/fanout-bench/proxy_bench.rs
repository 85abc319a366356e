//! `fanout-bench proxy`: fanout next to a direct connection, HAProxy and nginx (when installed),
//! all in front of the same 10 backend processes, under the same load, in one run. Our load
//! generator (bare HTTP/2, pre-encoded calls, latency from each call's scheduled start) and
//! h2load when installed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fanout_e2e::bench::{cpu_seconds, ms, percentile, rss_kib};
use fanout_e2e::load::{Load, Outcome};

use crate::chart;
use crate::peers::{Backends, Peer};

/// Calls in flight during the saturation run (also the "100 concurrent streams" of the memory
/// target).
const CONCURRENCY: usize = 100;
/// Client connections to a proxy: 4 gateway pods.
const CLIENT_CONNECTIONS: usize = 4;
pub const RATES: [u64; 2] = [1_000, 5_000];

pub struct Measured {
    pub name: String,
    pub saturation: Outcome,
    /// Proxy CPU seconds during the saturation run (none for direct).
    pub cpu: Option<f64>,
    pub fixed: Vec<Outcome>,
    /// Proxy CPU seconds during each fixed-rate run.
    pub fixed_cpu: Vec<Option<f64>>,
    pub h2load: Option<f64>,
    /// Calls each backend served during the saturation run.
    pub shares: Vec<u64>,
    /// Idle and peak RSS of the proxy, KiB.
    pub rss: Option<(u64, u64)>,
}

impl Measured {
    pub fn calls_per_second(&self) -> f64 {
        self.saturation.calls as f64 / self.saturation.elapsed.as_secs_f64()
    }

    pub fn cpu_per_100k(&self) -> Option<f64> {
        self.cpu
            .map(|cpu| cpu * 100_000.0 / self.saturation.calls.max(1) as f64)
    }

    /// CPU seconds per 100k calls at the fixed rate `RATES[i]`: the sidecar's usual regime,
    /// and the same work for every proxy (at saturation each runs at its own rate).
    pub fn cpu_per_100k_at(&self, i: usize) -> Option<f64> {
        self.fixed_cpu[i].map(|cpu| cpu * 100_000.0 / self.fixed[i].calls.max(1) as f64)
    }

    pub fn calls_per_cpu_second(&self) -> Option<f64> {
        self.cpu
            .map(|cpu| self.saturation.calls as f64 / cpu.max(0.01))
    }

    pub fn p99(&self, rate_index: usize) -> Duration {
        percentile(&self.fixed[rate_index].latencies, 99.0)
    }
}

pub async fn run(seconds: Duration, out: PathBuf) -> anyhow::Result<()> {
    let backends = Backends::start().await?;
    let has_h2load = Command::new("h2load").arg("--version").output().is_ok();
    let mut results = Vec::new();

    // Direct: the client balances itself over one connection per backend (the best case, and
    // the latency baseline).
    let load = Load::connect(&backends.addrs, 1).await?;
    let h2 = has_h2load.then_some(backends.addrs[0]);
    results.push(
        measure(
            "direct (client-side, 10 conns)",
            &load,
            None,
            h2,
            &backends,
            seconds,
        )
        .await?,
    );

    let mut missing = Vec::new();
    for kind in ["fanout", "HAProxy", "nginx"] {
        let peer = match kind {
            "fanout" => Some(Peer::fanout(&backends.addrs).await?),
            "HAProxy" => Peer::haproxy(&backends.addrs).await?,
            _ => Peer::nginx(&backends.addrs).await?,
        };
        let Some(peer) = peer else {
            missing.push(kind);
            continue;
        };
        let load = Load::connect(&[peer.listen], CLIENT_CONNECTIONS).await?;
        let h2 = has_h2load.then_some(peer.listen);
        let name = format!("{} ({CLIENT_CONNECTIONS} conns)", peer.name);
        results.push(measure(&name, &load, Some(peer.pid), h2, &backends, seconds).await?);
    }

    let report = report(&results, &missing, has_h2load)?;
    fanout_e2e::bench::publish(&report, &out)?;
    let png = out.with_extension("png");
    chart::draw(&results, &png)?;
    eprintln!("wrote {}", png.display());
    for result in &results {
        let errors = result.saturation.errors + result.fixed.iter().map(|f| f.errors).sum::<u64>();
        anyhow::ensure!(errors == 0, "{}: {errors} calls failed", result.name);
    }
    Ok(())
}

async fn measure(
    name: &str,
    load: &Load,
    pid: Option<u32>,
    h2load_target: Option<SocketAddr>,
    backends: &Backends,
    seconds: Duration,
) -> anyhow::Result<Measured> {
    eprintln!("measuring {name}");
    let idle_rss = pid.map(|pid| rss_kib(pid).0);
    load.saturate(CONCURRENCY, Duration::from_secs(1)).await; // warm-up
    let calls_before = backends.calls().await?;
    let cpu_before = pid.map(cpu_seconds);
    let saturation = load.saturate(CONCURRENCY, seconds).await;
    let cpu = pid
        .zip(cpu_before)
        .map(|(pid, before)| cpu_seconds(pid) - before);
    let shares = backends
        .calls()
        .await?
        .iter()
        .zip(&calls_before)
        .map(|(after, before)| after - before)
        .collect();
    let mut fixed = Vec::new();
    let mut fixed_cpu = Vec::new();
    for rate in RATES {
        let before = pid.map(cpu_seconds);
        fixed.push(load.fixed_rate(rate, seconds).await);
        fixed_cpu.push(
            pid.zip(before)
                .map(|(pid, before)| cpu_seconds(pid) - before),
        );
    }
    let h2load = h2load_target.and_then(|target| h2load(target, seconds.as_secs()));
    let rss = pid.zip(idle_rss).map(|(pid, idle)| (idle, rss_kib(pid).1));
    Ok(Measured {
        name: name.to_string(),
        saturation,
        cpu,
        fixed,
        fixed_cpu,
        h2load,
        shares,
        rss,
    })
}

fn h2load(target: SocketAddr, seconds: u64) -> Option<f64> {
    let body = std::env::temp_dir().join(format!("fanout-bench-body-{}", std::process::id()));
    let message = fanout_e2e::raw::frame(&fanout_e2e::backend::proto::EchoRequest {
        payload: vec![b'x'; 64],
        ..Default::default()
    });
    std::fs::write(&body, &message).ok()?;
    let output = Command::new("h2load")
        .args(["-c", "4", "-m", "16", "-D", &seconds.to_string()])
        .arg("-d")
        .arg(&body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://{target}/fanout.test.v1.Test/Unary"))
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&body);
    let text = String::from_utf8_lossy(&output.stdout);
    // "finished in 5.00s, 12345.67 req/s, ..."
    let line = text.lines().find(|l| l.starts_with("finished in"))?;
    line.split(", ").nth(1)?.split(' ').next()?.parse().ok()
}

fn latencies(outcome: &Outcome) -> String {
    let lat = &outcome.latencies;
    format!(
        "{} / {} / {}",
        ms(percentile(lat, 50.0)),
        ms(percentile(lat, 99.0)),
        ms(percentile(lat, 99.9))
    )
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

fn report(results: &[Measured], missing: &[&str], has_h2load: bool) -> anyhow::Result<String> {
    let mut t = String::new();
    writeln!(
        t,
        "Unary gRPC, 64-byte messages, 10 backend processes on 127.0.0.2–11, every proxy on one \
         thread, {} cores ({}).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    )?;
    writeln!(
        t,
        "| | calls/s at saturation ({CONCURRENCY} in flight) | proxy CPU s / 100k calls at saturation | at 5k calls/s | calls per proxy CPU-second (saturation) | p50 / p99 / p99.9 ms at 1k/s | p50 / p99 / p99.9 ms at 5k/s | h2load calls/s (4×16) | RSS idle / peak MiB | backends used; share min–max |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
    let dash = || "–".to_string();
    for r in results {
        writeln!(
            t,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.calls_per_second(),
            r.cpu_per_100k().map_or_else(dash, |c| format!("{c:.2}")),
            r.cpu_per_100k_at(1)
                .map_or_else(dash, |c| format!("{c:.2}")),
            r.calls_per_cpu_second()
                .map_or_else(dash, |c| format!("{c:.0}")),
            latencies(&r.fixed[0]),
            latencies(&r.fixed[1]),
            r.h2load.map_or_else(dash, |c| format!("{c:.0}")),
            r.rss.map_or_else(dash, |(idle, peak)| format!(
                "{:.1} / {:.1}",
                idle as f64 / 1024.0,
                peak as f64 / 1024.0
            )),
            share_range(&r.shares),
        )?;
    }
    writeln!(t)?;
    if let Some(direct) = results.first() {
        for r in &results[1..] {
            writeln!(
                t,
                "p99 added by {} over direct: {} ms at 1k/s, {} ms at 5k/s.",
                r.name,
                signed_ms(r.p99(0), direct.p99(0)),
                signed_ms(r.p99(1), direct.p99(1)),
            )?;
        }
    }
    let find = |prefix: &str| results.iter().find(|r| r.name.starts_with(prefix));
    if let (Some(f), Some(h)) = (find("fanout"), find("HAProxy")) {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        writeln!(
            t,
            "fanout ÷ HAProxy: calls per CPU-second {} at saturation, {} at 5k/s; p99 at 1k/s {}, p99 at 5k/s {}, peak RSS {}.",
            ratio(f.calls_per_cpu_second(), h.calls_per_cpu_second()),
            ratio(h.cpu_per_100k_at(1), f.cpu_per_100k_at(1)),
            ratio(Some(f.p99(0).as_secs_f64()), Some(h.p99(0).as_secs_f64())),
            ratio(Some(f.p99(1).as_secs_f64()), Some(h.p99(1).as_secs_f64())),
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
