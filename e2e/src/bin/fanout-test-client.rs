//! `fanout-test-client [--target ADDR] --calls N [--connections C --in-flight M]`: the gateway of
//! the cluster suite. Waits until a call through `--target` (default: `$FANOUT_UPSTREAM_BACKEND`,
//! what the webhook sets) succeeds (a `Stats` call, which backends answer whatever they are told
//! to do with unary calls), then makes N unary calls over C HTTP/2 connections with M in
//! flight on each, as gRPC client pods do, and prints one JSON line: calls answered per backend
//! id, the fewest each backend answered in any window of `--window` calls and where that window
//! starts, failures and, with `--sample-endpoints`, what the sidecar's `/endpoints` showed
//! while the calls ran (each pod's calls started, outstanding and latency estimate).
//!
//! `fanout-test-client --probe URL --count N --every-ms T`: N HTTP GETs of URL, one JSON line
//! each (status and body), as a cloud load balancer's health checker would send them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fanout_e2e::backend::proto::StatsRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::spread;

#[derive(Parser)]
#[command(name = "fanout-test-client")]
struct Args {
    #[arg(
        long,
        env = "FANOUT_UPSTREAM_BACKEND",
        required_unless_present = "probe"
    )]
    target: Option<String>,
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// HTTP/2 connections, each its own client.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Calls in flight on each connection.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Windows of this many calls (in the order they were answered) for `window_min`.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Start at most this many calls a second in all (0: as fast as they are answered).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// How long to wait for the first successful call.
    #[arg(long, default_value_t = 60)]
    wait_seconds: u64,
    /// Probe this URL over HTTP/1.1 instead of making calls.
    #[arg(long)]
    probe: Option<String>,
    #[arg(long, default_value_t = 60)]
    count: u32,
    #[arg(long, default_value_t = 500)]
    every_ms: u64,
    /// While calling, GET this URL (the sidecar's `/endpoints`) every 50 ms and add what each
    /// endpoint showed (`[started, outstanding, rtt_ms]`) to the report: why the balancer
    /// sent a pod fewer calls, when it did.
    #[arg(long)]
    sample_endpoints: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.probe {
        return probe(url, args.count, Duration::from_millis(args.every_ms)).await;
    }
    let target = args.target.clone().context("--target")?;
    let started = Instant::now();
    let first = loop {
        let attempt = async {
            let mut client = TestClient::connect(format!("http://{target}")).await?;
            // Stats: answered by every backend whatever it is told to do with unary calls
            // (fail some, sleep), so the wait ends when the path works.
            client.stats(StatsRequest {}).await?;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(client) => break client,
            Err(e) if started.elapsed() < Duration::from_secs(args.wait_seconds) => {
                eprintln!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context(format!("no call through {target} succeeded")),
        }
    };
    let mut clients = vec![first];
    for _ in 1..args.connections.max(1) {
        clients.push(TestClient::connect(format!("http://{target}")).await?);
    }
    let calling = spread::paced_timed_answers(&clients, args.calls, args.in_flight, args.rate);
    let (answers, endpoint_samples) = match &args.sample_endpoints {
        Some(url) => with_endpoint_samples(url, calling).await?,
        None => (calling.await, Vec::new()),
    };

    let mut backends: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    let mut order = Vec::with_capacity(answers.len());
    let mut took = Vec::with_capacity(answers.len());
    for (answer, elapsed) in answers {
        match answer {
            Ok(backend) => {
                *backends.entry(backend.clone()).or_default() += 1;
                order.push(backend);
                took.push(elapsed);
            }
            Err(code) => *failures.entry(code).or_default() += 1,
        }
    }
    let worst = spread::worst_windows(&order, backends.keys(), args.window);
    let window_min: BTreeMap<&String, usize> = worst.iter().map(|(b, (n, _))| (b, *n)).collect();
    // Where each worst window starts (answer index): a cold start shows as 0.
    let window_min_at: BTreeMap<&String, usize> =
        worst.iter().map(|(b, (_, at))| (b, *at)).collect();
    // In each backend's worst window, the median time of its own calls and of all calls, ms:
    // tells a backend that was slower then (and rightly avoided) from one avoided for nothing.
    let window_min_p50_ms: BTreeMap<&String, [f64; 2]> = worst
        .iter()
        .map(|(b, (_, at))| {
            let end = (*at + args.window).min(order.len());
            let all: Vec<_> = took[*at..end].to_vec();
            let own: Vec<_> = (*at..end)
                .filter(|&i| &order[i] == b)
                .map(|i| took[i])
                .collect();
            (b, [median_ms(own), median_ms(all)])
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({"target": target, "calls": args.calls,
            "connections": args.connections, "in_flight": args.in_flight,
            "backends": backends, "window": args.window, "window_min": window_min,
            "window_min_at": window_min_at, "window_min_p50_ms": window_min_p50_ms,
            "failures": failures, "endpoint_samples": endpoint_samples})
    );
    Ok(())
}

/// Runs `calling` while sampling `url` (`/endpoints`) every 50 ms; a sample that fails is
/// left out (a pod without the sidecar has none).
async fn with_endpoint_samples<T>(
    url: &str,
    calling: impl std::future::Future<Output = T>,
) -> anyhow::Result<(T, Vec<serde_json::Value>)> {
    let uri: http::Uri = url.parse().context("--sample-endpoints URL")?;
    let authority = uri
        .authority()
        .context("--sample-endpoints URL needs a host")?
        .clone();
    let done = std::cell::Cell::new(false);
    let started = Instant::now();
    let sampling = async {
        let mut samples = Vec::new();
        while !done.get() {
            if let Ok((200, body)) = get(&uri, &authority).await {
                samples.extend(endpoint_sample(&body, started.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        samples
    };
    let calling = async {
        let answers = calling.await;
        done.set(true);
        answers
    };
    Ok(tokio::join!(calling, sampling))
}

/// `{"ms": …, "endpoints": {address: [started, outstanding, rtt_ms]}}` of the first upstream.
fn endpoint_sample(body: &str, at: Duration) -> Option<serde_json::Value> {
    let view: serde_json::Value = serde_json::from_str(body).ok()?;
    let endpoints = view["upstreams"][0]["endpoints"].as_array()?;
    let shown: serde_json::Map<String, serde_json::Value> = endpoints
        .iter()
        .filter_map(|e| {
            let address = e["address"].as_str()?.to_string();
            Some((
                address,
                serde_json::json!([e["started"], e["outstanding"], e["rtt_ms"]]),
            ))
        })
        .collect();
    Some(serde_json::json!({"ms": at.as_millis() as u64, "endpoints": shown}))
}

/// `count` GETs of `url`, `every` apart; one JSON line each.
/// The median of `times` in milliseconds (0 when there are none).
fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times
        .get(times.len() / 2)
        .map_or(0.0, |t| (t.as_secs_f64() * 1e5).round() / 100.0)
}

async fn probe(url: &str, count: u32, every: Duration) -> anyhow::Result<()> {
    let uri: http::Uri = url.parse().context("--probe URL")?;
    let authority = uri.authority().context("--probe URL needs a host")?.clone();
    let started = Instant::now();
    for n in 0..count {
        let line = match get(&uri, &authority).await {
            Ok((status, body)) => serde_json::json!({"probe": n,
                "ms": started.elapsed().as_millis() as u64, "status": status, "body": body}),
            Err(e) => serde_json::json!({"probe": n,
                "ms": started.elapsed().as_millis() as u64, "error": format!("{e:#}")}),
        };
        println!("{line}");
        tokio::time::sleep(every).await;
    }
    Ok(())
}

async fn get(uri: &http::Uri, authority: &http::uri::Authority) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(uri.path())
            .header("host", authority.as_str())
            .body(Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .context("no answer within 3 s")?
}
