//! A proxy in front of backends named by the test DNS server, as a pod's sidecar sees a
//! headless Service, and what tests ask of it.

use std::net::SocketAddr;
use std::time::Duration;

use fanout_proxy_config::{Discovery, DnsDiscovery, UpstreamConfig};
use tonic::transport::Channel;

use crate::backend::proto::test_client::TestClient;
use crate::backend_process::BackendProcess;
use crate::dns::DnsServer;
use crate::proxy::{ProxyProcess, loopback_config, pod_ip};

/// The name the test DNS server answers for.
pub const NAME: &str = "app.shop.svc.cluster.local";

pub struct Fleet {
    pub proxy: ProxyProcess,
    pub dns: DnsServer,
    /// Where the proxy listens for the upstream.
    pub local: SocketAddr,
    pub port: u16,
}

/// The test DNS server naming `count` pods (127.0.0.2…) listening on `port`, and a proxy over
/// it (the upstream adjusted by `tune`) with every endpoint ready.
pub async fn proxy_over_dns(
    port: u16,
    count: usize,
    tune: impl FnOnce(&mut UpstreamConfig),
) -> Fleet {
    let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    dns.set(NAME, &(0..count).map(pod_ip).collect::<Vec<_>>());
    let mut discovery = DnsDiscovery::new(NAME, port);
    discovery.nameservers = vec![dns.addr];
    let (config, local) = loopback_config(Discovery::Dns(discovery), tune);
    let proxy = ProxyProcess::start(&config).await.unwrap();
    wait_for_endpoints(&proxy, "ready", count).await;
    Fleet {
        proxy,
        dns,
        local,
        port,
    }
}

/// One endpoint as `/endpoints` shows it.
#[derive(Debug, Clone)]
pub struct EndpointView {
    pub address: String,
    pub state: String,
    /// Streams open on it now.
    pub outstanding: u64,
    /// Streams ever started on it.
    pub started: u64,
}

/// The first upstream's endpoints, from `/endpoints`.
pub async fn endpoint_states(proxy: &ProxyProcess) -> Vec<EndpointView> {
    let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    state["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| EndpointView {
            address: e["address"].as_str().unwrap_or_default().to_string(),
            state: e["state"].as_str().unwrap_or_default().to_string(),
            outstanding: e["outstanding"].as_u64().unwrap_or_default(),
            started: e["started"].as_u64().unwrap_or_default(),
        })
        .collect()
}

/// Waits until at least `count` endpoints are in `state`: up to 30 s, which a slow CI runner
/// may need for a reconnect or a few health checks; a fast machine returns in milliseconds.
pub async fn wait_for_endpoints(proxy: &ProxyProcess, state: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let states = endpoint_states(proxy).await;
        if states.iter().filter(|e| e.state == state).count() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "fewer than {count} endpoints {state}: {}",
        proxy.admin_get("/endpoints").await.unwrap().1
    );
}

/// One HTTP/2 connection, as one gateway pod's gRPC client keeps.
pub async fn client(addr: SocketAddr) -> TestClient<Channel> {
    TestClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Each backend in turn stops gracefully (SIGTERM: GOAWAY, its calls in flight finish; it must
/// exit 0 within `stop_within`), comes back on the same address, and is in service again before
/// the next one goes: a rolling restart of a Deployment.
pub async fn rolling_restart(
    backends: &mut [BackendProcess],
    proxy: &ProxyProcess,
    stop_within: Duration,
) {
    let count = backends.len();
    for backend in backends.iter_mut() {
        let code = backend.stop(stop_within).await.unwrap();
        assert_eq!(code, Some(0), "{} did not stop cleanly", backend.id);
        backend.restart().await.unwrap();
        wait_for_endpoints(proxy, "ready", count).await;
    }
}

/// The `fanout_proxy_retries_total` lines of the proxy's metrics.
pub async fn retry_counts(proxy: &ProxyProcess) -> String {
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("fanout_proxy_retries_total"))
        .collect::<Vec<_>>()
        .join("\n")
}
