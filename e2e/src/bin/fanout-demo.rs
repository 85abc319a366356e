//! `make demo`: the main job on one machine. Renders the proxy config for an example workload
//! with `fanout-webhook inject --no-lookup` (the webhook's own code path), takes it out of the
//! pod template annotation as the downward API would project it, runs `fanout-proxy` with it in
//! front of 10 backends on 127.0.0.2–11 behind a test DNS server, and drives it like 4 gateway
//! pods: 4 clients, one HTTP/2 connection each. The same load goes once straight to backends
//! (what a ClusterIP Service gives: each connection pinned to one pod) and once through fanout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fanout_e2e::backend::Behaviour;
use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::bench::{ms, percentile};
use fanout_e2e::bins;
use fanout_e2e::dns::DnsServer;
use fanout_e2e::proxy::{ProxyProcess, free_port, pod_ip, spawn_backends_on};
use fanout_proxy_config::{Discovery, ProxyConfig};
use futures::StreamExt;
use serde_json::Value;

const BACKENDS: usize = 10;
const CLIENTS: usize = 4;
const CALLS: usize = 20_000;
const IN_FLIGHT_PER_CLIENT: usize = 8;

fn render(work: &Path) -> anyhow::Result<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.yaml");
    println!(
        "== 1. fanout-webhook inject --no-lookup -f {}",
        manifest.display()
    );
    let output = Command::new(bins::path("fanout-webhook", "fanout-webhook"))
        .args(["inject", "--no-lookup", "-f"])
        .arg(&manifest)
        .output()
        .context("running fanout-webhook")?;
    print!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("fanout-webhook inject failed");
    }
    let injected = String::from_utf8(output.stdout)?;
    std::fs::write(work.join("gateway.injected.yaml"), &injected)?;
    let deployment: Value = serde_norway::Deserializer::from_str(&injected)
        .map(serde::Deserialize::deserialize)
        .next()
        .context("no documents in the output")??;
    let template = &deployment["spec"]["template"];
    let containers: Vec<&str> = template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    println!("   pod template containers: {}", containers.join(", "));
    // The downward API projects the annotation's value, byte for byte, to config.json.
    let config = template["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .context("the template has no fanout.dev/proxy-config annotation")?;
    Ok(config.to_string())
}

/// `CALLS` unary calls over `CLIENTS` connections, one to each of `targets`; the backend that
/// answered each call and the latencies.
async fn drive(
    targets: &[SocketAddr],
) -> anyhow::Result<(BTreeMap<String, usize>, Vec<Duration>, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for target in targets {
        let client = TestClient::connect(format!("http://{target}")).await?;
        tasks.push(tokio::spawn(async move {
            futures::stream::iter(0..CALLS / CLIENTS)
                .map(|_| {
                    let mut client = client.clone();
                    async move {
                        let sent = Instant::now();
                        let reply = client.unary(EchoRequest::default()).await?.into_inner();
                        Ok::<_, tonic::Status>((reply.backend, sent.elapsed()))
                    }
                })
                .buffer_unordered(IN_FLIGHT_PER_CLIENT)
                .collect::<Vec<_>>()
                .await
        }));
    }
    let mut counts = BTreeMap::new();
    let mut latencies = Vec::with_capacity(CALLS);
    for task in tasks {
        for result in task.await? {
            let (backend, latency) = result?;
            *counts.entry(backend).or_default() += 1;
            latencies.push(latency);
        }
    }
    latencies.sort();
    Ok((counts, latencies, started.elapsed()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let work = PathBuf::from("target/demo");
    std::fs::create_dir_all(&work)?;
    let rendered = render(&work)?;
    let mut config = ProxyConfig::from_json(&rendered).context("the rendered config")?;

    println!(
        "\n== 2. 10 backends on 127.0.0.2-11, a test DNS server for app.shop.svc.cluster.local"
    );
    let Discovery::Dns(dns_config) = &config.upstreams[0].discovery else {
        bail!("expected DNS discovery")
    };
    let (port, _) = spawn_backends_on(BACKENDS, dns_config.port, Behaviour::default()).await;
    let dns = DnsServer::start("127.0.0.1:0".parse()?).await?;
    dns.set(
        &dns_config.name,
        &(0..BACKENDS).map(pod_ip).collect::<Vec<_>>(),
    );
    println!("   backends on port {port}, DNS on {}", dns.addr);

    // In a pod the proxy asks cluster DNS and owns ports 15001/15020; here it asks the test DNS
    // server, and takes other ports if those are busy on this machine.
    if let Discovery::Dns(d) = &mut config.upstreams[0].discovery {
        d.nameservers = vec![dns.addr];
        d.port = port;
    }
    for (addr, what) in [
        (&mut config.upstreams[0].listen, "listener"),
        (&mut config.admin.listen, "admin"),
    ] {
        if std::net::TcpListener::bind(SocketAddr::new([127, 0, 0, 1].into(), addr.port())).is_err()
        {
            let free = free_port();
            println!(
                "   port {} is busy here; the {what} uses {free}",
                addr.port()
            );
            addr.set_port(free);
        }
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
    }
    let config_path = work.join("config.json");
    std::fs::write(&config_path, config.to_json_pretty())?;
    println!(
        "\n== 3. fanout-proxy run --config {}",
        config_path.display()
    );
    let proxy = ProxyProcess::start_file(config_path.canonicalize()?, config.admin.listen).await?;
    let ready_by = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = proxy.admin_get("/endpoints").await?;
        let state: Value = serde_json::from_str(&body)?;
        let ready = state["upstreams"][0]["endpoints"]
            .as_array()
            .map_or(0, |e| e.iter().filter(|e| e["state"] == "ready").count());
        if ready == BACKENDS {
            println!("   {ready} endpoints ready (GET /endpoints)");
            break;
        }
        if Instant::now() > ready_by {
            bail!("only {ready} endpoints ready: {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "\n== 4. {CALLS} unary calls from {CLIENTS} clients (one HTTP/2 connection each, {IN_FLIGHT_PER_CLIENT} calls in flight on each)"
    );
    // A ClusterIP Service picks a pod per connection, at random.
    let direct_targets: Vec<SocketAddr> = (0..CLIENTS)
        .map(|_| SocketAddr::new(pod_ip(fastrand::usize(..BACKENDS)), port))
        .collect();
    let (direct, direct_latency, direct_time) = drive(&direct_targets).await?;
    let fanout_targets = vec![config.upstreams[0].listen; CLIENTS];
    let (through, fanout_latency, fanout_time) = drive(&fanout_targets).await?;

    println!("\n| backend | ClusterIP (4 pinned connections) | through fanout |");
    println!("|---|---:|---:|");
    for n in 0..BACKENDS {
        let name = format!("backend-{n}");
        let share = |counts: &BTreeMap<String, usize>| {
            let c = counts.get(&name).copied().unwrap_or(0);
            format!("{c} ({:.1}%)", 100.0 * c as f64 / CALLS as f64)
        };
        println!(
            "| {name} ({}) | {} | {} |",
            pod_ip(n),
            share(&direct),
            share(&through)
        );
    }
    let busy = |counts: &BTreeMap<String, usize>| counts.values().filter(|c| **c > 0).count();
    println!(
        "| backends serving | {} of {BACKENDS} | {} of {BACKENDS} |",
        busy(&direct),
        busy(&through)
    );
    println!(
        "| latency p50 / p99 (ms) | {} / {} | {} / {} |",
        ms(percentile(&direct_latency, 50.0)),
        ms(percentile(&direct_latency, 99.0)),
        ms(percentile(&fanout_latency, 50.0)),
        ms(percentile(&fanout_latency, 99.0))
    );
    println!(
        "| calls/s | {:.0} | {:.0} |",
        CALLS as f64 / direct_time.as_secs_f64(),
        CALLS as f64 / fanout_time.as_secs_f64()
    );
    let (rss, peak) = proxy.rss_kib();
    println!(
        "\nfanout-proxy RSS {:.1} MiB (peak {:.1} MiB). Admin: http://{}/metrics",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        config.admin.listen
    );
    Ok(())
}
