//! The seed scenario: four gateway connections, ten backends behind DNS. Without fanout a
//! ClusterIP Service would pin each connection to one backend; through fanout every call is
//! balanced on its own.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use fanout_e2e::backend::Behaviour;
use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend_process;
use fanout_e2e::dns::DnsServer;
use fanout_e2e::fleet::{Fleet, NAME, client, proxy_over_dns, wait_for_endpoints};
use fanout_e2e::proxy::{ProxyProcess, free_port, loopback_config, pod_ip, spawn_backends};
use fanout_e2e::spread;
use fanout_proxy_config::{Discovery, DnsDiscovery, ProxyConfig, UpstreamConfig};
use futures::StreamExt;

async fn fleet(backends: usize, refresh: Duration) -> Fleet {
    let (port, _) = spawn_backends(backends, Behaviour::default()).await;
    proxy_over_dns(port, backends, |u| {
        if let Discovery::Dns(dns) = &mut u.discovery {
            dns.refresh = refresh;
        }
    })
    .await
}

/// `calls` unary calls spread over `clients` connections, `concurrency` in flight on each;
/// how many each backend answered.
async fn drive(
    addr: SocketAddr,
    clients: usize,
    calls: usize,
    concurrency: usize,
) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = client(addr).await;
        tasks.push(tokio::spawn(async move {
            futures::stream::iter(0..calls / clients)
                .map(|_| {
                    let mut client = client.clone();
                    async move {
                        client
                            .unary(EchoRequest::default())
                            .await
                            .unwrap()
                            .into_inner()
                            .backend
                    }
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<String>>()
                .await
        }));
    }
    let mut counts = HashMap::new();
    for task in tasks {
        for backend in task.await.unwrap() {
            *counts.entry(backend).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_connections_spread_over_all_ten_backends() {
    let fleet = fleet(10, Duration::from_secs(1)).await;
    let counts = drive(fleet.local, 4, 10_000, 8).await;
    let total: usize = counts.values().sum();
    assert_eq!(total, 10_000);
    assert_eq!(counts.len(), 10, "every backend serves: {counts:?}");
    let max = *counts.values().max().unwrap() as f64;
    let min = *counts.values().min().unwrap() as f64;
    assert!(
        max <= 1.2 * min,
        "busiest {max} vs least busy {min}: {counts:?}"
    );
    let (_, metrics) = fleet.proxy.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("fanout_proxy_requests_total{upstream=\"app.shop\""),
        "{metrics}"
    );
    assert!(metrics.contains("grpc_status=\"0\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_to_dns_get_calls_within_one_refresh() {
    let refresh = Duration::from_millis(500);
    let fleet = fleet(3, refresh).await;
    let (port, _) = (fleet.port, ());
    // Three more pods come up on the same port: the Deployment scaled from 3 to 6.
    let listeners: Vec<_> =
        futures::future::join_all((3..6).map(|n| tokio::net::TcpListener::bind((pod_ip(n), port))))
            .await
            .into_iter()
            .map(|l| l.expect("backend port free on the new address"))
            .collect();
    for (n, listener) in listeners.into_iter().enumerate() {
        let backend =
            fanout_e2e::backend::Backend::new(format!("backend-{}", n + 3), Behaviour::default());
        tokio::spawn(backend.serve(listener, std::future::pending()));
    }
    let before = drive(fleet.local, 4, 400, 4).await;
    assert_eq!(before.len(), 3, "{before:?}");
    fleet.dns.set(NAME, &(0..6).map(pod_ip).collect::<Vec<_>>());
    // Within one refresh interval (plus connect time) the new backends take calls.
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    let after = drive(fleet.local, 4, 1200, 4).await;
    assert_eq!(
        after.len(),
        6,
        "new backends serve after one refresh: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_is_unavailable_naming_the_upstream() {
    let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let local: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut discovery = DnsDiscovery::new("ghost.shop.svc.cluster.local", 50051);
    discovery.nameservers = vec![dns.addr];
    let mut upstream = UpstreamConfig::new("ghost.shop", local, Discovery::Dns(discovery));
    upstream.timeouts.connect = Duration::from_millis(200);
    let mut config = ProxyConfig::new(vec![upstream]);
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut client = client(local).await;
    let started = std::time::Instant::now();
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("upstream ghost.shop"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (code, body) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(code, 503);
    assert!(
        body.contains("ghost.shop") && body.contains("no A or AAAA records"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_keeps_the_last_endpoints_and_removed_pods_leave() {
    let fleet = fleet(4, Duration::from_millis(200)).await;
    fleet.dns.set_failing(true);
    let queries = fleet.dns.queries();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(fleet.dns.queries() > queries, "the proxy keeps asking");
    let during = drive(fleet.local, 4, 400, 4).await;
    assert_eq!(
        during.len(),
        4,
        "SERVFAIL keeps the last good set: {during:?}"
    );
    let (code, _) = fleet.proxy.admin_get("/ready").await.unwrap();
    assert_eq!(code, 200);

    // DNS answers again, without two of the pods: they get no more calls.
    fleet.dns.set(NAME, &[pod_ip(0), pod_ip(1)]);
    fleet.dns.set_failing(false);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = drive(fleet.local, 4, 400, 4).await;
    let mut backends: Vec<_> = after.keys().cloned().collect();
    backends.sort();
    assert_eq!(backends, ["backend-0", "backend-1"]);
}

/// The fewest calls each of `count` backends answered in any window of 1,000 calls, of `calls`
/// made through `local` over `connections` connections with `in_flight` on each.
async fn least_in_any_window(
    local: SocketAddr,
    count: usize,
    calls: usize,
    connections: usize,
    in_flight: usize,
) -> (Vec<String>, BTreeMap<String, usize>) {
    let clients = futures::future::join_all((0..connections).map(|_| client(local))).await;
    let order: Vec<String> = spread::answers(&clients, calls, in_flight)
        .await
        .into_iter()
        .map(|answer| answer.expect("no call fails"))
        .collect();
    let names: Vec<String> = (0..count).map(|n| format!("backend-{n}")).collect();
    let least = spread::window_minimum(&order, &names, 1_000);
    (order, least)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_proxy_gives_a_cold_backend_half_its_share_in_every_window() {
    // A cold pod: backend-0's first three calls take 20 ms more. Each run has fresh backends
    // and a fresh proxy, whose calls start the moment every endpoint is connected; every
    // backend answers at least half of its fair share (100 of 1,000) in every window.
    for (connections, in_flight) in [(1, 1), (4, 8)] {
        let (port, _backends) = backend_process::on_pod_ips(5, |n| {
            if n == 0 {
                vec!["--slow-first-calls", "3", "--slow-first-delay-ms", "20"]
            } else {
                vec![]
            }
        })
        .await;
        let fleet = proxy_over_dns(port, 5, |_| {}).await;
        let (_, least) = least_in_any_window(fleet.local, 5, 3_000, connections, in_flight).await;
        eprintln!("cold backend-0, {connections}x{in_flight}: fewest per window {least:?}");
        for (backend, fewest) in &least {
            assert!(
                *fewest >= 100,
                "{connections} connections x {in_flight} in flight: {backend} answered \
                 {fewest} of a window of 1,000 calls (fair: 200): {least:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_connects_later_gets_half_its_share_once_up() {
    for (connections, in_flight) in [(1, 1), (4, 8)] {
        let (port, mut backends) = backend_process::on_pod_ips(5, |_| vec![]).await;
        // backend-4 is in DNS but down when the proxy starts; it comes up while calls flow.
        backends[4].kill().await.unwrap();
        let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        dns.set(NAME, &(0..5).map(pod_ip).collect::<Vec<_>>());
        let mut discovery = DnsDiscovery::new(NAME, port);
        discovery.nameservers = vec![dns.addr];
        let (config, local) = loopback_config(Discovery::Dns(discovery), |_| {});
        let proxy = ProxyProcess::start(&config).await.unwrap();
        wait_for_endpoints(&proxy, "ready", 4).await;
        let calls = tokio::spawn(least_in_any_window(local, 5, 3_000, connections, in_flight));
        tokio::time::sleep(Duration::from_millis(300)).await;
        backends[4].restart().await.unwrap();
        let (order, _) = calls.await.unwrap();
        let joined = order
            .iter()
            .position(|b| b == "backend-4")
            .expect("backend-4 answered once up");
        let names: Vec<String> = (0..5).map(|n| format!("backend-{n}")).collect();
        let least = spread::window_minimum(&order[joined..], &names, 1_000);
        eprintln!(
            "backend-4 up after {joined} calls, {connections}x{in_flight}: fewest per window \
             {least:?}"
        );
        assert!(
            !least.is_empty(),
            "a window of calls after backend-4 came up"
        );
        for (backend, fewest) in &least {
            assert!(
                *fewest >= 100,
                "{connections}x{in_flight}: {backend} answered {fewest} of 1,000: {least:?}"
            );
        }
    }
}
