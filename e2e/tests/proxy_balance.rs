//! The seed scenario: four gateway connections, ten backends behind DNS. Without fanout a
//! ClusterIP Service would pin each connection to one backend; through fanout every call is
//! balanced on its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use fanout_e2e::backend::Behaviour;
use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::dns::DnsServer;
use fanout_e2e::proxy::{ProxyProcess, free_port, loopback_config, pod_ip, spawn_backends};
use fanout_proxy_config::{Discovery, DnsDiscovery, ProxyConfig, UpstreamConfig};
use futures::StreamExt;
use tonic::transport::Channel;

const NAME: &str = "app.shop.svc.cluster.local";

struct Fleet {
    proxy: ProxyProcess,
    dns: DnsServer,
    local: SocketAddr,
    port: u16,
}

async fn fleet(backends: usize, refresh: Duration) -> Fleet {
    let (port, _) = spawn_backends(backends, Behaviour::default()).await;
    proxy_over_dns(port, backends, |u| {
        if let Discovery::Dns(dns) = &mut u.discovery {
            dns.refresh = refresh;
        }
    })
    .await
}

/// The test DNS server naming `count` pods (127.0.0.2…) listening on `port`, and a proxy over
/// it (the upstream adjusted by `tune`) with every endpoint ready.
async fn proxy_over_dns(port: u16, count: usize, tune: impl FnOnce(&mut UpstreamConfig)) -> Fleet {
    let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    dns.set(NAME, &(0..count).map(pod_ip).collect::<Vec<_>>());
    let mut discovery = DnsDiscovery::new(NAME, port);
    discovery.nameservers = vec![dns.addr];
    let (config, local) = loopback_config(Discovery::Dns(discovery), tune);
    let proxy = ProxyProcess::start(&config).await.unwrap();
    wait_for_ready_endpoints(&proxy, count).await;
    Fleet {
        proxy,
        dns,
        local,
        port,
    }
}

async fn wait_for_ready_endpoints(proxy: &ProxyProcess, count: usize) {
    for _ in 0..200 {
        let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ready = state["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] == "ready")
            .count();
        if ready >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "fewer than {count} endpoints ready: {}",
        proxy.admin_get("/endpoints").await.unwrap().1
    );
}

/// One HTTP/2 connection, as one gateway pod's gRPC client keeps.
async fn client(addr: SocketAddr) -> TestClient<Channel> {
    TestClient::connect(format!("http://{addr}")).await.unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_stopping_gracefully_under_load_fails_no_calls() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (port, _) = spawn_backends(3, Behaviour::default()).await;
    // A fourth backend that will stop gracefully (GOAWAY) while calls flow.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind((pod_ip(3), port))
        .await
        .unwrap();
    let leaving = fanout_e2e::backend::Backend::new("backend-3", Behaviour::default());
    let server = tokio::spawn(leaving.serve(listener, async {
        let _ = stop_rx.await;
    }));
    // Kept whole: dropping the fleet would stop the proxy.
    let fleet = proxy_over_dns(port, 4, |_| {}).await;
    let local = fleet.local;

    let running = Arc::new(AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = client(local).await;
        let (running, ok, failed) = (running.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                match client
                    .unary(EchoRequest {
                        delay_ms: 2,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        eprintln!("failed: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed while a backend stopped gracefully"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_half_its_calls_is_ejected() {
    let (port, _) = spawn_backends(3, Behaviour::default()).await;
    let listener = tokio::net::TcpListener::bind((pod_ip(3), port))
        .await
        .unwrap();
    let failing = fanout_e2e::backend::Backend::new(
        "backend-3",
        Behaviour {
            fail_percent: 50,
            ..Behaviour::default()
        },
    );
    tokio::spawn(failing.serve(listener, std::future::pending()));
    let Fleet { proxy, local, .. } = proxy_over_dns(port, 4, |u| {
        u.ejection.consecutive_failures = 2;
        u.ejection.base_time = Duration::from_secs(30);
    })
    .await;

    // Every call's answerer: a reply names its backend; a failure is backend-3's.
    let mut answered_by_failing = 0;
    let mut failures = 0;
    let mut client = client(local).await;
    for _ in 0..2000 {
        match client.unary(EchoRequest::default()).await {
            Ok(reply) if reply.get_ref().backend == "backend-3" => answered_by_failing += 1,
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                assert!(status.message().contains("backend-3"), "{status:?}");
                failures += 1;
            }
        }
    }
    let share = (answered_by_failing + failures) as f64 / 2000.0;
    assert!(
        share < 0.05,
        "backend-3 took {:.1}% of calls ({failures} failed)",
        share * 100.0
    );
    let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
    assert!(endpoints.contains("\"ejected\""), "{endpoints}");
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("fanout_proxy_endpoints{upstream=\"app.shop\",state=\"ejected\"} 1"),
        "{metrics}"
    );
}
