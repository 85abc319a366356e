//! `fanout-bench proxy`: fanout next to a direct connection, same 10 backend processes, same
//! load, one run. Our load generator (bare HTTP/2, pre-encoded calls) and h2load when installed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fanout_e2e::bench::{cpu_seconds, ms, percentile};
use fanout_e2e::bins;
use fanout_e2e::load::{Load, Outcome};
use fanout_e2e::proxy::{ProxyProcess, free_port, pod_ip};
use fanout_proxy_config::{Discovery, ProxyConfig, UpstreamConfig};

const BACKENDS: usize = 10;
const CONCURRENCY: usize = 64;

struct Backends(Vec<Child>);

impl Drop for Backends {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn start_backends() -> anyhow::Result<(Backends, Vec<SocketAddr>)> {
    let port = std::net::TcpListener::bind((pod_ip(0), 0))?
        .local_addr()?
        .port();
    let binary = bins::path("fanout-e2e", "fanout-test-backend");
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for n in 0..BACKENDS {
        let addr = SocketAddr::new(pod_ip(n), port);
        children.push(
            Command::new(&binary)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--id",
                    &format!("backend-{n}"),
                ])
                .stderr(Stdio::null())
                .spawn()?,
        );
        addrs.push(addr);
    }
    let backends = Backends(children);
    for addr in &addrs {
        let mut tries = 0;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tries += 1;
            anyhow::ensure!(tries < 200, "backend {addr} did not start");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    Ok((backends, addrs))
}

struct Row {
    name: &'static str,
    saturation: Outcome,
    fixed_1k: Outcome,
    proxy_cpu_per_100k: Option<f64>,
    h2load: Option<f64>,
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
    let text = String::from_utf8_lossy(&output.stdout);
    // "finished in 5.00s, 12345.67 req/s, ..."
    let line = text.lines().find(|l| l.starts_with("finished in"))?;
    line.split(", ").nth(1)?.split(' ').next()?.parse().ok()
}

pub async fn run(seconds: Duration, out: PathBuf) -> anyhow::Result<()> {
    let (_backends, addrs) = start_backends().await?;
    let local: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
        "app.bench",
        local,
        Discovery::Static(addrs.clone()),
    )]);
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse()?;
    let proxy = ProxyProcess::start(&config).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = proxy.rss_kib();
    let has_h2load = Command::new("h2load").arg("--version").output().is_ok();

    let mut rows = Vec::new();
    // Direct: the client balances itself over one connection per backend (the best case).
    // Through fanout: 4 connections to the proxy, as 4 gateway pods would hold.
    for (name, load) in [
        (
            "direct (client-side, 10 connections)",
            Load::connect(&addrs, 1).await?,
        ),
        ("fanout (4 connections)", Load::connect(&[local], 4).await?),
    ] {
        let through_proxy = name.starts_with("fanout");
        load.saturate(CONCURRENCY, Duration::from_secs(1)).await; // warm-up
        let cpu_before = cpu_seconds(proxy.pid());
        let saturation = load.saturate(CONCURRENCY, seconds).await;
        let cpu = cpu_seconds(proxy.pid()) - cpu_before;
        let fixed_1k = load.fixed_rate(1000, seconds).await;
        let proxy_cpu_per_100k =
            through_proxy.then(|| cpu * 100_000.0 / saturation.calls.max(1) as f64);
        let target = if through_proxy { local } else { addrs[0] };
        let h2load = if has_h2load {
            h2load(target, seconds.as_secs())
        } else {
            None
        };
        rows.push(Row {
            name,
            saturation,
            fixed_1k,
            proxy_cpu_per_100k,
            h2load,
        });
    }
    // Memory at 2,000 calls/s with 100 streams in flight at once at most.
    let load = Load::connect(&[local], 4).await?;
    load.fixed_rate(2000, seconds).await;
    let (rss_after, peak_rss) = proxy.rss_kib();

    let mut table = String::new();
    writeln!(
        table,
        "| unary gRPC, 64 B messages, 10 backends on loopback | calls/s at saturation ({CONCURRENCY} in flight) | p50 / p99 / p99.9 at 1,000 calls/s (ms) | proxy CPU s per 100k calls | h2load calls/s (4 conns × 16 streams) |"
    )?;
    writeln!(table, "|---|---:|---:|---:|---:|")?;
    for row in &rows {
        let lat = &row.fixed_1k.latencies;
        writeln!(
            table,
            "| {} | {:.0} | {} / {} / {} | {} | {} |",
            row.name,
            row.saturation.calls as f64 / row.saturation.elapsed.as_secs_f64(),
            ms(percentile(lat, 50.0)),
            ms(percentile(lat, 99.0)),
            ms(percentile(lat, 99.9)),
            row.proxy_cpu_per_100k
                .map_or("–".into(), |c| format!("{c:.2}")),
            row.h2load.map_or("–".into(), |r| format!("{r:.0}")),
        )?;
        anyhow::ensure!(
            row.saturation.errors == 0 && row.fixed_1k.errors == 0,
            "{}: {} + {} calls failed",
            row.name,
            row.saturation.errors,
            row.fixed_1k.errors
        );
    }
    writeln!(table)?;
    writeln!(
        table,
        "fanout-proxy RSS: {:.1} MiB idle, {:.1} MiB after 2,000 calls/s, peak {:.1} MiB.",
        idle_rss as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    )?;
    if !has_h2load {
        writeln!(
            table,
            "h2load not installed (Debian: apt-get install nghttp2-client)."
        )?;
    }
    let added_p99 = percentile(&rows[1].fixed_1k.latencies, 99.0)
        .saturating_sub(percentile(&rows[0].fixed_1k.latencies, 99.0));
    writeln!(
        table,
        "p99 added by fanout at 1,000 calls/s: {} ms.",
        ms(added_p99)
    )?;
    fanout_e2e::bench::publish(&table, &out)?;
    Ok(())
}
