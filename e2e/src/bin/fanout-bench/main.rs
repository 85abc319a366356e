//! `fanout-bench webhook`: admission latency, throughput and memory of `fanout-webhook serve`
//! over loopback TLS with keep-alive, replaying the recorded AdmissionReviews.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use fanout_e2e::bench::{cpu_seconds, ms, percentile};
use fanout_e2e::fixtures;
use fanout_e2e::https::Connection;
use fanout_e2e::webhook::WebhookProcess;

#[derive(Parser)]
#[command(name = "fanout-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark the admission webhook.
    Webhook {
        /// Reviews for the latency run (one connection, one review at a time).
        #[arg(long, default_value_t = 10_000)]
        reviews: usize,
        /// Reviews for the throughput run.
        #[arg(long, default_value_t = 20_000)]
        throughput_reviews: usize,
        /// Keep-alive connections for the throughput run.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Where the Markdown table is written.
        #[arg(long, default_value = "target/bench/webhook.md")]
        out: PathBuf,
    },
    /// Benchmark the proxy against a direct connection, HAProxy and nginx, with the same
    /// backends and load. Also writes a PNG chart beside the table.
    Proxy {
        /// Seconds of each saturation and fixed-rate run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value = "target/bench/proxy.md")]
        out: PathBuf,
        /// Which to measure, comma-separated: direct, fanout, wire-spike (its engine alone,
        /// without the proxy around it), haproxy, nginx.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "direct,fanout,haproxy,nginx"
        )]
        peers: Vec<String>,
    },
    /// fanout's cost as the work grows: 10, 100 and 1,000 endpoints, 4 and 256 client
    /// connections, 10,000 long-lived streams.
    Curve {
        /// Seconds of each run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value = "target/bench/curve.md")]
        out: PathBuf,
        /// Whose cases run, comma-separated: fanout, haproxy.
        #[arg(long, value_delimiter = ',', default_value = "fanout,haproxy")]
        peers: Vec<String>,
    },
}

const SERVER_NAME: &str = "fanout-webhook.fanout-system.svc";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Webhook {
            reviews,
            throughput_reviews,
            connections,
            out,
        } => webhook(reviews, throughput_reviews, connections, out).await,
        Command::Proxy {
            seconds,
            out,
            peers,
        } => proxy_bench::run(Duration::from_secs(seconds), out, &peers).await,
        Command::Curve {
            seconds,
            out,
            peers,
        } => curve::run(Duration::from_secs(seconds), out, &peers).await,
    }
}

mod chart;
mod curve;
mod h2load;
mod peers;
mod proxy_bench;
mod proxy_report;

async fn webhook(
    reviews: usize,
    throughput_reviews: usize,
    connections: usize,
    out: PathBuf,
) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let ca = fanout_certs::Ca::generate("bench CA", Duration::from_secs(3600))?;
    let names = fanout_certs::service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
    let ip: IpAddr = "127.0.0.1".parse()?;
    let serving = ca.issue_serving(&names, &[ip], Duration::from_secs(3600))?;
    fanout_certs::write_bundle(&dir, &ca, &serving)?;
    let ca_pem = ca.cert_pem().as_bytes().to_vec();

    let server = WebhookProcess::start(
        &dir,
        &["--no-lookup"],
        &[("FANOUT_LOG", "warn,fanout_webhook::cli=info")],
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (idle_rss, _) = server.rss_kib();
    let bodies: Vec<Vec<u8>> = fixtures::reviews()
        .into_iter()
        .map(|(_, body)| body)
        .collect();

    // Latency: one connection, one review at a time, as a quiet API server sends them.
    let mut conn = Connection::open(server.addr, SERVER_NAME, &ca_pem).await?;
    for body in bodies.iter().cycle().take(500) {
        conn.post("/mutate?timeout=5s", body.clone()).await?;
    }
    let cpu_before = cpu_seconds(server.pid());
    let mut samples = Vec::with_capacity(reviews);
    for body in bodies.iter().cycle().take(reviews) {
        let started = Instant::now();
        let (status, _) = conn.post("/mutate?timeout=5s", body.clone()).await?;
        samples.push(started.elapsed());
        anyhow::ensure!(status == 200, "review answered {status}");
    }
    let cpu_latency_run = cpu_seconds(server.pid()) - cpu_before;
    samples.sort();

    // Throughput: several keep-alive connections as fast as they are answered.
    let per_connection = throughput_reviews.div_ceil(connections);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let ca_pem = ca_pem.clone();
        let bodies = bodies.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(addr, SERVER_NAME, &ca_pem).await?;
            for body in bodies.iter().cycle().skip(c).take(per_connection) {
                let (status, _) = conn.post("/mutate?timeout=5s", body.clone()).await?;
                anyhow::ensure!(status == 200, "review answered {status}");
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let throughput = (per_connection * connections) as f64 / elapsed.as_secs_f64();
    let (rss, peak_rss) = server.rss_kib();

    let mut table = String::new();
    writeln!(
        table,
        "| fanout-webhook, loopback TLS, keep-alive, {} recorded reviews round-robin | value |",
        bodies.len()
    )?;
    writeln!(table, "|---|---|")?;
    writeln!(
        table,
        "| reviews in latency run (1 connection, sequential) | {reviews} |"
    )?;
    writeln!(
        table,
        "| admission latency p50 (ms) | {} |",
        ms(percentile(&samples, 50.0))
    )?;
    writeln!(
        table,
        "| admission latency p99 (ms) | {} |",
        ms(percentile(&samples, 99.0))
    )?;
    writeln!(
        table,
        "| admission latency p99.9 (ms) | {} |",
        ms(percentile(&samples, 99.9))
    )?;
    writeln!(
        table,
        "| server CPU per review, latency run (µs) | {:.1} |",
        cpu_latency_run * 1e6 / reviews as f64
    )?;
    writeln!(
        table,
        "| throughput ({connections} connections, {} reviews) (reviews/s) | {throughput:.0} |",
        per_connection * connections
    )?;
    writeln!(
        table,
        "| RSS idle after start (MiB) | {:.1} |",
        idle_rss as f64 / 1024.0
    )?;
    writeln!(
        table,
        "| RSS after load (MiB) | {:.1} |",
        rss as f64 / 1024.0
    )?;
    writeln!(
        table,
        "| peak RSS (MiB) | {:.1} |",
        peak_rss as f64 / 1024.0
    )?;
    fanout_e2e::bench::publish(&table, &out)?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fanout-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
