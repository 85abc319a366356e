//! `fanout-bench curve`: how fanout's cost grows with the work. CPU per call and memory with
//! 10, 100 and 1,000 endpoints (static discovery, loopback addresses: 10 backend processes on
//! 127.0.0.2–11 serving 100 ports each), with 4 and 256 client connections, and with 10,000
//! long-lived server streams open through the proxy. One proxy per case, all running at once;
//! the cases take turns within each round, and every figure is the median of the rounds.
//! HAProxy runs the endpoint and connection cases too (when installed), as the reference for
//! how much of the growth any proxy pays: more endpoints or connections also mean fewer calls
//! per write, and colder sockets.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use fanout_e2e::backend::proto::StreamRequest;
use fanout_e2e::backend_process::BackendProcess;
use fanout_e2e::bench::{median, per_100k, rss_kib, with_cpu};
use fanout_e2e::load::Load;
use fanout_e2e::proxy::pod_ip;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::h2load::H2load;
use crate::peers::{BACKENDS, Peer};
use crate::proxy_bench::ROUNDS;

/// The fixed rate of the CPU-per-call runs: the sidecar's usual regime.
const RATE: u64 = 5_000;
const PORTS_PER_BACKEND: u16 = 100;
const STREAMS: usize = 10_000;

struct Case {
    proxy: Kind,
    name: &'static str,
    endpoints: usize,
    connections: usize,
    streams: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fanout,
    HAProxy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fanout => "fanout",
            Kind::HAProxy => "haproxy",
        }
    }
}

const CASES: [Case; 8] = [
    Case {
        proxy: Kind::Fanout,
        name: "10 endpoints, 4 conns",
        endpoints: 10,
        connections: 4,
        streams: 0,
    },
    Case {
        proxy: Kind::Fanout,
        name: "100 endpoints, 4 conns",
        endpoints: 100,
        connections: 4,
        streams: 0,
    },
    Case {
        proxy: Kind::Fanout,
        name: "1,000 endpoints, 4 conns",
        endpoints: 1_000,
        connections: 4,
        streams: 0,
    },
    Case {
        proxy: Kind::Fanout,
        name: "10 endpoints, 256 conns",
        endpoints: 10,
        connections: 256,
        streams: 0,
    },
    Case {
        proxy: Kind::Fanout,
        name: "10 endpoints, 4 conns, 10,000 streams open",
        endpoints: 10,
        connections: 4,
        streams: STREAMS,
    },
    Case {
        proxy: Kind::HAProxy,
        name: "HAProxy: 10 endpoints, 4 conns",
        endpoints: 10,
        connections: 4,
        streams: 0,
    },
    Case {
        proxy: Kind::HAProxy,
        name: "HAProxy: 1,000 endpoints, 4 conns",
        endpoints: 1_000,
        connections: 4,
        streams: 0,
    },
    Case {
        proxy: Kind::HAProxy,
        name: "HAProxy: 10 endpoints, 256 conns",
        endpoints: 10,
        connections: 256,
        streams: 0,
    },
];

/// One case's proxy and what was measured of it.
struct Subject {
    case: &'static Case,
    proxy: Peer,
    load: Load,
    /// KiB: with its endpoints connected; with its streams open.
    rss_connected: u64,
    rss_streams: u64,
    /// CPU s / 100k calls per round: ours at `RATE`, h2load at `RATE`, ours at saturation.
    fixed: Vec<f64>,
    h2load_fixed: Vec<f64>,
    saturation: Vec<f64>,
    /// Held open for the whole run.
    _streams: Vec<hyper::body::Incoming>,
}

pub async fn run(seconds: Duration, out: PathBuf, peers: &[String]) -> anyhow::Result<()> {
    let (backends, addrs) = start_backends().await?;
    let has_h2load = H2load::installed();
    let mut subjects = Vec::new();
    let wanted = |kind: Kind| peers.iter().any(|p| p.eq_ignore_ascii_case(kind.name()));
    for case in CASES.iter().filter(|c| wanted(c.proxy)) {
        eprintln!("starting: {}", case.name);
        if let Some(subject) = start(case, &addrs).await? {
            subjects.push(subject);
        }
    }
    for round in 1..=ROUNDS {
        for subject in &mut subjects {
            eprintln!("round {round}/{ROUNDS}: {}", subject.case.name);
            measure(subject, has_h2load, seconds).await?;
        }
    }
    let report = report(&subjects, has_h2load)?;
    fanout_e2e::bench::publish(&report, &out)?;
    drop(subjects);
    drop(backends);
    Ok(())
}

/// 10 backend processes, each on `PORTS_PER_BACKEND` consecutive ports; every endpoint
/// address, ordered so that the first `n` spread evenly over the processes.
async fn start_backends() -> anyhow::Result<(Vec<BackendProcess>, Vec<SocketAddr>)> {
    let base = free_port_range(PORTS_PER_BACKEND)?;
    let ports = PORTS_PER_BACKEND.to_string();
    let mut processes = Vec::new();
    for n in 0..BACKENDS {
        let addr = SocketAddr::new(pod_ip(n), base);
        processes.push(
            BackendProcess::start(addr, &format!("backend-{n}"), &["--ports", &ports]).await?,
        );
    }
    let addrs = (0..PORTS_PER_BACKEND)
        .flat_map(|port| (0..BACKENDS).map(move |n| SocketAddr::new(pod_ip(n), base + port)))
        .collect();
    Ok((processes, addrs))
}

/// A first port from which `count` ports are free on every backend address.
fn free_port_range(count: u16) -> anyhow::Result<u16> {
    'search: for _ in 0..50 {
        let base = fastrand::u16(20_000..60_000);
        for n in 0..BACKENDS {
            for port in base..base + count {
                if std::net::TcpListener::bind((pod_ip(n), port)).is_err() {
                    continue 'search;
                }
            }
        }
        return Ok(base);
    }
    anyhow::bail!("no range of {count} free ports on the backend addresses")
}

/// The case's proxy, ready; `None` when it is HAProxy and HAProxy is not installed.
async fn start(case: &'static Case, addrs: &[SocketAddr]) -> anyhow::Result<Option<Subject>> {
    let endpoints = &addrs[..case.endpoints];
    let proxy = match case.proxy {
        Kind::Fanout => Peer::fanout(endpoints).await?,
        Kind::HAProxy => match Peer::haproxy(endpoints).await? {
            Some(peer) => peer,
            None => return Ok(None),
        },
    };
    let (listen, pid) = (proxy.listen, proxy.pid);
    let load = Load::connect(&[listen], case.connections).await?;
    // A first call on every connection, so that memory counts connections in use.
    load.saturate(case.connections, Duration::from_millis(500))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_connected = rss_kib(pid).0;
    let streams = open_streams(listen, case.streams).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_streams = rss_kib(pid).0;
    Ok(Some(Subject {
        case,
        proxy,
        load,
        rss_connected,
        rss_streams,
        fixed: Vec::new(),
        h2load_fixed: Vec::new(),
        saturation: Vec::new(),
        _streams: streams,
    }))
}

/// `count` server streams through the proxy that stay open (one message each, ten minutes
/// away), over 4 client connections; returns once every stream has its response headers.
async fn open_streams(
    listen: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<hyper::body::Incoming>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let body = fanout_e2e::raw::frame(&StreamRequest {
        count: 1,
        interval_ms: 600_000,
        reply_bytes: 8,
    });
    let mut senders = Vec::new();
    for _ in 0..4 {
        let stream = tokio::net::TcpStream::connect(listen).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await?;
        tokio::spawn(connection);
        senders.push(sender);
    }
    let uri: http::Uri = format!("http://{listen}/fanout.test.v1.Test/ServerStream").parse()?;
    let mut opening = tokio::task::JoinSet::new();
    for n in 0..count {
        let mut sender = senders[n % senders.len()].clone();
        let request = http::Request::post(uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(body.clone()))?;
        opening.spawn(async move { sender.send_request(request).await });
    }
    let mut streams = Vec::with_capacity(count);
    while let Some(opened) = opening.join_next().await {
        let response = opened??;
        anyhow::ensure!(
            response.status() == 200 && response.headers().get("grpc-status").is_none(),
            "a long-lived stream was answered at once: {:?}",
            response.headers()
        );
        streams.push(response.into_body());
    }
    Ok(streams)
}

async fn measure(subject: &mut Subject, has_h2load: bool, seconds: Duration) -> anyhow::Result<()> {
    let pid = Some(subject.proxy.pid);
    let name = subject.case.name;

    let (outcome, cpu) = with_cpu(pid, subject.load.fixed_rate(RATE, seconds)).await;
    subject.fixed.extend(per_100k(cpu, outcome.calls));
    anyhow::ensure!(
        outcome.errors == 0,
        "{name}: {} calls failed",
        outcome.errors
    );

    if has_h2load {
        let (target, connections) = (subject.proxy.listen, subject.case.connections);
        let secs = seconds.as_secs().max(1);
        let fixed = tokio::task::spawn_blocking(move || {
            H2load::fixed_rate(target, connections, RATE, secs)
        });
        let (run, cpu) = with_cpu(pid, fixed).await;
        let run = run??;
        subject.h2load_fixed.extend(per_100k(cpu, run.calls));
        anyhow::ensure!(
            run.errors == 0,
            "{name}: h2load: {} calls failed",
            run.errors
        );
    }

    let concurrency = subject.case.connections.max(100);
    let (outcome, cpu) = with_cpu(pid, subject.load.saturate(concurrency, seconds)).await;
    subject.saturation.extend(per_100k(cpu, outcome.calls));
    anyhow::ensure!(
        outcome.errors == 0,
        "{name}: {} calls failed",
        outcome.errors
    );
    Ok(())
}

fn report(subjects: &[Subject], has_h2load: bool) -> anyhow::Result<String> {
    let mut t = String::new();
    writeln!(
        t,
        "fanout's cost as the work grows: one proxy per case (one thread), all in front of the same \
         10 backend processes (100 ports each: up to 1,000 endpoints), unary calls with 64-byte \
         messages at {RATE} calls/s (ours and h2load over the case's connections) and at \
         saturation (ours, 100 in flight or one per connection); medians of {ROUNDS} rounds.\n"
    )?;
    writeln!(
        t,
        "| case | proxy CPU s / 100k calls at {RATE}/s: ours / h2load | at saturation (ours) | growth over the first case (ours at {RATE}/s / h2load / saturation) | RSS MiB connected / streams open / peak |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|")?;
    let dash = || "–".to_string();
    // Growth is over the first case of the same proxy.
    let base_of = |s: &Subject| subjects.iter().find(|b| b.case.proxy == s.case.proxy);
    let growth = |value: Option<f64>, base: Option<f64>| match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:+.0} %", (v / b - 1.0) * 100.0),
        _ => dash(),
    };
    for s in subjects {
        let base = base_of(s);
        let (fixed, h2, saturation) = (
            median(s.fixed.clone()),
            median(s.h2load_fixed.clone()),
            median(s.saturation.clone()),
        );
        let two = |v: Option<f64>| v.map_or_else(dash, |v| format!("{v:.2}"));
        writeln!(
            t,
            "| {} | {} / {} | {} | {} / {} / {} | {:.1} / {:.1} / {:.1} |",
            s.case.name,
            two(fixed),
            two(h2),
            two(saturation),
            growth(fixed, base.and_then(|b| median(b.fixed.clone()))),
            growth(h2, base.and_then(|b| median(b.h2load_fixed.clone()))),
            growth(saturation, base.and_then(|b| median(b.saturation.clone()))),
            s.rss_connected as f64 / 1024.0,
            s.rss_streams as f64 / 1024.0,
            rss_kib(s.proxy.pid).1 as f64 / 1024.0,
        )?;
    }
    writeln!(t)?;
    let find = |endpoints: usize, connections: usize, streams: usize| {
        subjects.iter().find(|s| {
            s.case.proxy == Kind::Fanout
                && (s.case.endpoints, s.case.connections, s.case.streams)
                    == (endpoints, connections, streams)
        })
    };
    let who = Kind::Fanout.name();
    if let (Some(small), Some(large)) = (find(10, 4, 0), find(1_000, 4, 0)) {
        let bytes = (large.rss_connected as f64 - small.rss_connected as f64) * 1024.0 / 990.0;
        writeln!(
            t,
            "{who}: memory per endpoint (one HTTP/2 connection each): {bytes:.0} bytes (RSS with 1,000 endpoints less with 10, ÷ 990)."
        )?;
    }
    if let Some(streams) = find(10, 4, STREAMS) {
        let bytes =
            (streams.rss_streams as f64 - streams.rss_connected as f64) * 1024.0 / STREAMS as f64;
        writeln!(
            t,
            "{who}: memory per open stream (client side and upstream side): {bytes:.0} bytes (RSS with {STREAMS} server streams open less before, ÷ {STREAMS})."
        )?;
    }
    if let (Some(small), Some(large)) = (find(10, 4, 0), find(10, 256, 0)) {
        let bytes = (large.rss_connected as f64 - small.rss_connected as f64) * 1024.0 / 252.0;
        writeln!(
            t,
            "{who}: memory per client connection: {bytes:.0} bytes (RSS with 256 less with 4, ÷ 252)."
        )?;
    }
    if !has_h2load {
        writeln!(
            t,
            "h2load not installed (Debian: apt-get install nghttp2-client)."
        )?;
    }
    Ok(t)
}
