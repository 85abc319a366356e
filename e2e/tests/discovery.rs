//! The discovery server as the chart runs it (`fanout-webhook serve --discovery-listen`, TLS
//! with the webhook's certificate) against a stand-in Kubernetes API, and real proxies
//! subscribed to it: changes in EndpointSlices reach subscribers, many subscribers share one
//! watch, proxies ride out a server restart, and endpoints change under load without a failed
//! call.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_discovery::v1::{Snapshot, WatchRequest, watch_request};
use fanout_e2e::backend::Behaviour;
use fanout_e2e::discovery_setup::{
    Setup, app_service, subscribed_proxy_config, wait_for_addresses,
};
use fanout_e2e::fleet::client;
use fanout_e2e::kube_api::{Kind, SliceEndpoint, endpoint_slice, service};
use fanout_e2e::open_load::Load;
use fanout_e2e::proxy::{ProxyProcess, loopback_config, pod_ip, spawn_backends, spawn_backends_on};
use fanout_e2e::webhook::WebhookProcess;
use fanout_proxy_config::{Discovery, DnsDiscovery, ProxyConfig};
use serde_json::json;
use tonic::{Code, Streaming};

fn watch_request(namespace: &str, service: &str, port: watch_request::Port) -> WatchRequest {
    WatchRequest {
        namespace: namespace.into(),
        service: service.into(),
        port: Some(port),
        client: "test".into(),
    }
}

fn by_name(name: &str) -> watch_request::Port {
    watch_request::Port::PortName(name.into())
}

async fn next(stream: &mut Streaming<Snapshot>) -> Snapshot {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a snapshot within 10 s")
        .unwrap()
        .expect("the stream stays open")
}

/// `ip:port ready/terminating` of every endpoint.
fn summary(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .endpoints
        .iter()
        .map(|e| {
            let state = match (e.ready, e.terminating) {
                (true, false) => "ready",
                (_, true) => "terminating",
                (false, false) => "not-ready",
            };
            format!("{}:{} {state}", e.ip, e.port)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_a_subscriber_and_bad_requests_are_refused() {
    let setup = Setup::new().await;
    setup.api.apply(app_service());
    let slice = |endpoints: &[SliceEndpoint], port: u16| {
        endpoint_slice("shop", "app-1", "app", ("grpc", port), endpoints)
    };
    setup.api.apply(slice(
        &[
            SliceEndpoint::ready("10.0.0.1"),
            SliceEndpoint::ready("10.0.0.2"),
        ],
        8080,
    ));
    let _server = setup.start_server(&["--discovery-max-watches-per-connection", "3"]);
    let mut grpc = setup.connect().await;
    let mut stream = match grpc
        .watch(watch_request("shop", "app", by_name("grpc")))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let logs: Vec<String> = _server.logs.try_iter().collect();
            panic!("{e:?}\n{}", logs.join("\n"));
        }
    };
    let first = next(&mut stream).await;
    assert!(first.service_found);
    assert_eq!(first.version, 1);
    assert_eq!(
        summary(&first),
        ["10.0.0.1:8080 ready", "10.0.0.2:8080 ready"]
    );

    let steps: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        (
            "an endpoint added",
            slice(
                &[
                    SliceEndpoint::ready("10.0.0.1"),
                    SliceEndpoint::ready("10.0.0.2"),
                    SliceEndpoint::ready("10.0.0.3"),
                ],
                8080,
            ),
            vec![
                "10.0.0.1:8080 ready",
                "10.0.0.2:8080 ready",
                "10.0.0.3:8080 ready",
            ],
        ),
        (
            "an endpoint not ready",
            slice(
                &[
                    SliceEndpoint::ready("10.0.0.1"),
                    SliceEndpoint {
                        ready: false,
                        ..SliceEndpoint::ready("10.0.0.2")
                    },
                    SliceEndpoint::ready("10.0.0.3"),
                ],
                8080,
            ),
            vec![
                "10.0.0.1:8080 ready",
                "10.0.0.2:8080 not-ready",
                "10.0.0.3:8080 ready",
            ],
        ),
        (
            "an endpoint terminating",
            slice(
                &[
                    SliceEndpoint {
                        ready: false,
                        terminating: true,
                        ..SliceEndpoint::ready("10.0.0.1")
                    },
                    SliceEndpoint::ready("10.0.0.3"),
                ],
                8080,
            ),
            vec!["10.0.0.1:8080 terminating", "10.0.0.3:8080 ready"],
        ),
        (
            "the named container port moved to 9090",
            slice(&[SliceEndpoint::ready("10.0.0.3")], 9090),
            vec!["10.0.0.3:9090 ready"],
        ),
    ];
    for (step, object, expected) in steps {
        setup.api.apply(object);
        let snapshot = next(&mut stream).await;
        assert_eq!(summary(&snapshot), expected, "{step}");
    }
    setup.api.delete(Kind::EndpointSlice, "shop", "app-1");
    let snapshot = next(&mut stream).await;
    assert!(snapshot.endpoints.is_empty());
    assert_eq!(snapshot.reason, "Service shop/app has no endpoints");
    setup.api.delete(Kind::Service, "shop", "app");
    let snapshot = next(&mut stream).await;
    assert!(!snapshot.service_found);
    assert_eq!(snapshot.reason, "Service shop/app not found");

    // Refusals, each with its own status and a message that says why.
    let refused = |result: Result<tonic::Response<Streaming<Snapshot>>, tonic::Status>| match result
    {
        Ok(_) => panic!("not refused"),
        Err(status) => status,
    };
    let status = refused(
        grpc.watch(watch_request("kube-system", "dns", by_name("dns")))
            .await,
    );
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("namespace kube-system is excluded"),
        "{status:?}"
    );
    let status = refused(
        grpc.watch(watch_request("shop", "App_1", by_name("grpc")))
            .await,
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("\"App_1\" is not a Service name"),
        "{status:?}"
    );
    let mut no_port = watch_request("shop", "app", by_name("grpc"));
    no_port.port = None;
    assert_eq!(
        refused(grpc.watch(no_port).await).code(),
        Code::InvalidArgument
    );
    // At most three watches on one connection: the first is open, two more fit.
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(
            grpc.watch(watch_request("shop", "app", by_name("grpc")))
                .await
                .unwrap(),
        );
    }
    let status = refused(
        grpc.watch(watch_request("shop", "app", by_name("grpc")))
            .await,
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Another connection has its own allowance.
    let mut other = setup.connect().await;
    let _fourth = other
        .watch(watch_request("shop", "app", by_name("grpc")))
        .await
        .unwrap();

    // What the replica's metrics say (on the admission port, as Prometheus scrapes it).
    let mut https = fanout_e2e::https::Connection::open(
        _server.addr,
        "fanout-webhook.fanout-system.svc",
        setup.ca_pem.as_bytes(),
    )
    .await
    .unwrap();
    let (_, metrics) = https.request("GET", "/metrics", Vec::new()).await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "fanout_webhook_discovery_synced 1",
        "fanout_webhook_discovery_watches 4",
        "fanout_webhook_discovery_refused_total{code=\"permission_denied\"} 1",
        "fanout_webhook_discovery_refused_total{code=\"invalid_argument\"} 2",
        "fanout_webhook_discovery_refused_total{code=\"resource_exhausted\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

/// Resident memory (KiB) and CPU time (s) of a process.
fn usage(pid: u32) -> (u64, f64) {
    let (rss, _) = fanout_e2e::bench::rss_kib(pid);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (rss, (ticks(11) + ticks(12)) / 100.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_share_one_watch() {
    let setup = Setup::new().await;
    setup.api.apply(app_service());
    let ips: Vec<SliceEndpoint> = (1..=20)
        .map(|i| SliceEndpoint::ready(format!("10.0.1.{i}")))
        .collect();
    setup
        .api
        .apply(endpoint_slice("shop", "app-1", "app", ("grpc", 8080), &ips));
    let server = setup.start_server(&[]);
    let (rss_idle, _) = usage(server.pid());
    // 100 proxies with 10 upstreams each: 100 connections, 1,000 watches.
    let mut streams = Vec::new();
    for _ in 0..100 {
        let grpc = setup.connect().await;
        for _ in 0..10 {
            let mut grpc = grpc.clone();
            streams.push(
                grpc.watch(watch_request("shop", "app", by_name("grpc")))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
    }
    for stream in &mut streams {
        assert_eq!(next(stream).await.endpoints.len(), 20);
    }
    let (_, cpu_before) = usage(server.pid());
    let changed_at = Instant::now();
    let mut more = ips.clone();
    more.push(SliceEndpoint::ready("10.0.1.99"));
    setup.api.apply(endpoint_slice(
        "shop",
        "app-1",
        "app",
        ("grpc", 8080),
        &more,
    ));
    let mut latencies = Vec::new();
    for stream in &mut streams {
        assert_eq!(next(stream).await.endpoints.len(), 21);
        latencies.push(changed_at.elapsed());
    }
    let (rss, cpu_after) = usage(server.pid());
    let watches: Vec<String> = setup
        .api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("WATCH"))
        .collect();
    assert_eq!(
        watches.len(),
        2,
        "one watch per resource for 1,000 subscribers: {watches:?}"
    );
    assert!(
        watches.contains(&"WATCH services".to_string()),
        "{watches:?}"
    );
    assert!(
        watches.contains(&"WATCH endpointslices".to_string()),
        "{watches:?}"
    );
    println!(
        "discovery server: 1,000 watches on 100 connections; RSS {rss_idle} KiB idle, {rss} KiB \
         with them; one change reached the last subscriber after {:?}, costing {:.3} s CPU",
        latencies.last().unwrap(),
        cpu_after - cpu_before
    );
}

/// The test DNS server answering `app.<namespace>.svc.cluster.local` with `count` backends on
/// 127.0.0.2…, and their port.
async fn backends_in_dns(namespace: &str, count: usize) -> (fanout_e2e::dns::DnsServer, u16) {
    let dns = fanout_e2e::dns::DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (port, _) = spawn_backends(count, Behaviour::default()).await;
    let ips: Vec<_> = (0..count).map(pod_ip).collect();
    dns.set(&format!("app.{namespace}.svc.cluster.local"), &ips);
    (dns, port)
}

/// A proxy subscribed to `<namespace>/app` whose fallback asks the test DNS server at
/// `nameserver` for `app.<namespace>.svc.cluster.local`, dialled on `port`. The server keeps
/// its default bounds: 3 s at start, 60 s away.
fn proxy_with_dns_fallback(
    setup: &Setup,
    namespace: &str,
    nameserver: SocketAddr,
    port: u16,
) -> (ProxyConfig, SocketAddr) {
    let (mut config, local) = subscribed_proxy_config(setup);
    if let Discovery::Endpoints(endpoints) = &mut config.upstreams[0].discovery {
        endpoints.namespace = namespace.into();
        *endpoints.fallback = Discovery::Dns(DnsDiscovery {
            nameservers: vec![nameserver],
            ..DnsDiscovery::new(format!("app.{namespace}.svc.cluster.local"), port)
        });
    }
    (config, local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_their_endpoints_while_the_server_restarts_and_then_resynchronise() {
    let setup = Setup::new().await;
    let (port, stats) = spawn_backends(4, Behaviour::default()).await;
    setup.api.apply(app_service());
    let slice = |n: std::ops::Range<usize>| {
        let endpoints: Vec<SliceEndpoint> = n.map(|i| SliceEndpoint::ready(pod_ip(i))).collect();
        endpoint_slice("shop", "app-1", "app", ("grpc", port), &endpoints)
    };
    let addresses = |n: std::ops::Range<usize>| -> Vec<String> {
        let mut a: Vec<String> = n.map(|i| format!("{}:{port}", pod_ip(i))).collect();
        a.sort();
        a
    };
    setup.api.apply(slice(0..3));
    let server = setup.start_server(&[]);
    let (config, local) = subscribed_proxy_config(&setup);
    let proxy = ProxyProcess::start(&config).await.unwrap();
    wait_for_addresses(&proxy, &addresses(0..3)).await;
    let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        state["upstreams"][0]["discovery"]["source"], "endpoints",
        "{state}"
    );
    assert_eq!(
        state["upstreams"][0]["discovery"]["server_connected"], true,
        "{state}"
    );

    // The server goes away: the proxy keeps its endpoints and every call still succeeds.
    drop(server);
    let mut app = client(local).await;
    for _ in 0..300 {
        app.unary(fanout_e2e::backend::proto::EchoRequest::default())
            .await
            .unwrap();
    }
    wait_for_addresses(&proxy, &addresses(0..3)).await;
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains(
            "fanout_proxy_discovery_source{upstream=\"app.shop\",source=\"endpoints\"} 1"
        ),
        "{metrics}"
    );

    // While it is away the cluster changes; once back, the proxy catches up.
    setup.api.apply(slice(1..4));
    let _server = setup.start_server(&[]);
    let back = Instant::now();
    wait_for_addresses(&proxy, &addresses(1..4)).await;
    println!(
        "resynchronised {:?} after the server restarted",
        back.elapsed()
    );
    let before: Vec<u64> = stats
        .iter()
        .map(|s| s.calls.load(Ordering::SeqCst))
        .collect();
    for _ in 0..300 {
        app.unary(fanout_e2e::backend::proto::EchoRequest::default())
            .await
            .unwrap();
    }
    let after: Vec<u64> = stats
        .iter()
        .map(|s| s.calls.load(Ordering::SeqCst))
        .collect();
    assert_eq!(
        after[0], before[0],
        "the removed endpoint got calls: {before:?} -> {after:?}"
    );
    assert!(
        after[3] > before[3] + 50,
        "the added endpoint got too few: {before:?} -> {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_server_falls_back_to_dns_within_its_bound() {
    let setup = Setup::new().await;
    let (dns, port) = backends_in_dns("shop", 2).await;
    let (config, local) = proxy_with_dns_fallback(&setup, "shop", dns.addr, port);
    // No discovery server is listening at all.
    let started = Instant::now();
    let proxy = ProxyProcess::start(&config).await.unwrap();
    wait_for_addresses(
        &proxy,
        &[
            format!("{}:{port}", pod_ip(0)),
            format!("{}:{port}", pod_ip(1)),
        ],
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "fell back before its 3 s bound: {waited:?}"
    );
    let mut app = client(local).await;
    app.unary(fanout_e2e::backend::proto::EchoRequest::default())
        .await
        .unwrap();
    let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        state["upstreams"][0]["discovery"]["configured"],
        "endpoints"
    );
    assert_eq!(
        state["upstreams"][0]["discovery"]["source"], "dns",
        "{state}"
    );
}

/// The proxy config the webhook renders for a recorded pod, as the downward API projects it,
/// with the fallback DNS pointed at a dead loopback port (no test asks a real nameserver).
async fn rendered_config(setup: &Setup, webhook: &WebhookProcess, fixture: &str) -> ProxyConfig {
    let pod = fanout_e2e::webhook::admitted_pod(webhook.addr, &setup.ca_pem, fixture).await;
    let mut config = ProxyConfig::from_json(
        pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    for upstream in &mut config.upstreams {
        let Discovery::Endpoints(endpoints) = &mut upstream.discovery else {
            panic!("the webhook rendered {:?}", upstream.discovery);
        };
        match &mut *endpoints.fallback {
            Discovery::Dns(dns) => dns.nameservers = vec!["127.0.0.1:9".parse().unwrap()],
            Discovery::Srv(srv) => srv.nameservers = vec!["127.0.0.1:9".parse().unwrap()],
            _ => {}
        }
    }
    config
}

/// The pipeline with the discovery server: the webhook renders the pod's config (discovery
/// server and CA included), the proxy subscribes, 10 backends answer, and the stand-in API
/// changes endpoints under load. Fixed ports as in the pipeline suite (15001, 15020, 50051).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_change_under_load_without_a_failed_call() {
    let setup = Setup::new().await;
    let (port, stats) = spawn_backends_on(10, 50051, Behaviour::default()).await;
    assert_eq!(port, 50051, "port 50051 is taken on 127.0.0.2-11");
    setup.api.apply(service(
        "shop",
        "app",
        true,
        &[("grpc", 50051, json!("rpc"))],
    ));
    let endpoints = |states: &dyn Fn(usize) -> Option<SliceEndpoint>| {
        let list: Vec<SliceEndpoint> = (0..10).filter_map(states).collect();
        endpoint_slice("shop", "app-1", "app", ("grpc", port), &list)
    };
    setup
        .api
        .apply(endpoints(&|i| Some(SliceEndpoint::ready(pod_ip(i)))));
    let webhook = setup.start_server(&[]);
    let config = rendered_config(&setup, &webhook, "pod-native-sidecar-two-upstreams").await;
    assert_eq!(config.discovery_server, Some(setup.discovery_server()));
    let local = config.upstreams[0].listen;
    let proxy = ProxyProcess::start(&config).await.unwrap();
    fanout_e2e::fleet::wait_for_endpoints(&proxy, "ready", 10).await;

    let load = Load::start(local, 4, 500, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = |i: usize| stats[i].calls.load(Ordering::SeqCst);

    // Backend 3 terminates: after 100 ms it gets no new call (its streams in flight finish).
    setup.api.apply(endpoints(&|i| {
        Some(if i == 3 {
            SliceEndpoint {
                ready: false,
                terminating: true,
                ..SliceEndpoint::ready(pod_ip(i))
            }
        } else {
            SliceEndpoint::ready(pod_ip(i))
        })
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_100ms = calls(3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        calls(3),
        at_100ms,
        "calls reached a terminating endpoint after 100 ms"
    );

    // It goes, another is not ready, then both come back.
    setup.api.apply(endpoints(&|i| {
        (i != 3).then(|| SliceEndpoint {
            ready: i != 5,
            ..SliceEndpoint::ready(pod_ip(i))
        })
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let five = calls(5);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(calls(5), five, "a not-ready endpoint got calls");
    setup
        .api
        .apply(endpoints(&|i| Some(SliceEndpoint::ready(pod_ip(i)))));
    let (three, five) = (calls(3), calls(5));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let result = load.stop().await;
    assert!(
        calls(3) > three && calls(5) > five,
        "endpoints back in the set got no calls: {three}->{} {five}->{}",
        calls(3),
        calls(5)
    );
    assert!(result.ok > 1000, "too few calls made: {}", result.ok);
    assert!(
        result.failures.is_empty(),
        "{} of {} calls failed, first: {:?}",
        result.failures.len(),
        result.offered,
        result.failures.first().map(|f| &f.status)
    );
}

/// Without the discovery server a port name is an SRV lookup: each pod on its own port, whether
/// or not the answer carries the targets' addresses; and a name with no records yet is asked
/// again within a fraction of the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_discovery_dials_each_pod_on_its_own_port_and_retries_quickly_while_empty() {
    let dns = fanout_e2e::dns::DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut stats = Vec::new();
    let mut targets = Vec::new();
    for i in 0..3 {
        let backend =
            fanout_e2e::backend::Backend::new(format!("backend-{i}"), Behaviour::default());
        stats.push(backend.stats());
        // Pods that name their container port alike can still listen on different numbers.
        let addr = backend.spawn(SocketAddr::new(pod_ip(i), 0)).await.unwrap();
        let target = format!("pod-{i}.app.shop.svc.cluster.local");
        dns.set(&target, &[pod_ip(i)]);
        targets.push((target, addr.port()));
    }
    let srv_name = "_grpc._tcp.app.shop.svc.cluster.local";
    let (config, local) = loopback_config(
        Discovery::Srv(fanout_proxy_config::SrvDiscovery {
            nameservers: vec![dns.addr],
            ..fanout_proxy_config::SrvDiscovery::for_port("grpc", "app", "shop", "cluster.local")
        }),
        |_| {},
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    // No records yet: the refresh is 5 s, the proxy asks again much sooner.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let targets_ref: Vec<(&str, u16)> = targets.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    dns.set_srv(srv_name, &targets_ref, false);
    let set_at = Instant::now();
    let mut expected: Vec<String> = (0..3)
        .map(|i| format!("{}:{}", pod_ip(i), targets[i].1))
        .collect();
    expected.sort();
    wait_for_addresses(&proxy, &expected).await;
    let found_after = set_at.elapsed();
    assert!(
        found_after < Duration::from_secs(3),
        "records found {found_after:?} after they appeared; the refresh is 5 s"
    );
    let mut app = client(local).await;
    for _ in 0..300 {
        app.unary(fanout_e2e::backend::proto::EchoRequest::default())
            .await
            .unwrap();
    }
    let calls: Vec<u64> = stats
        .iter()
        .map(|s| s.calls.load(Ordering::SeqCst))
        .collect();
    assert!(calls.iter().all(|&n| n >= 50), "spread: {calls:?}");
    // With the addresses in the answer, one pod gone.
    dns.set_srv(srv_name, &targets_ref[..2], true);
    wait_for_addresses(&proxy, &expected[..2]).await;
    let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        state["upstreams"][0]["discovery"]["source"], "srv",
        "{state}"
    );
}

/// With the server away, the kept set is worth keeping only while some of it answers: once
/// none does (the pods were replaced meanwhile), DNS takes over at the next reconnect attempt,
/// not after `stale_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranded_proxy_turns_to_dns_without_waiting_for_stale_after() {
    let setup = Setup::new().await;
    let (dns, port) = backends_in_dns("shop", 2).await;
    setup.api.apply(app_service());
    // The server lists pods that are already gone: nothing listens on 127.0.0.9-10.
    let gone: Vec<SliceEndpoint> = (7..9).map(|i| SliceEndpoint::ready(pod_ip(i))).collect();
    setup.api.apply(endpoint_slice(
        "shop",
        "app-1",
        "app",
        ("grpc", port),
        &gone,
    ));
    let server = setup.start_server(&[]);
    let (config, local) = proxy_with_dns_fallback(&setup, "shop", dns.addr, port);
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut gone_addresses: Vec<String> = (7..9).map(|i| format!("{}:{port}", pod_ip(i))).collect();
    gone_addresses.sort();
    wait_for_addresses(&proxy, &gone_addresses).await;
    drop(server);
    let away = Instant::now();
    wait_for_addresses(
        &proxy,
        &[
            format!("{}:{port}", pod_ip(0)),
            format!("{}:{port}", pod_ip(1)),
        ],
    )
    .await;
    let took = away.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "DNS took over after {took:?}"
    );
    let mut app = client(local).await;
    app.unary(fanout_e2e::backend::proto::EchoRequest::default())
        .await
        .unwrap();
    println!("a stranded proxy turned to DNS {took:?} after the server went away");
}

/// A subscription the server refuses for good (an excluded namespace) is served by DNS at once,
/// not after the 3 s bound, and the refusal is said in the proxy's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_turns_to_dns_at_once() {
    let setup = Setup::new().await;
    let (dns, port) = backends_in_dns("kube-system", 1).await;
    let _server = setup.start_server(&[]);
    let (config, local) = proxy_with_dns_fallback(&setup, "kube-system", dns.addr, port);
    let started = Instant::now();
    let proxy = ProxyProcess::start(&config).await.unwrap();
    wait_for_addresses(&proxy, &[format!("{}:{port}", pod_ip(0))]).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "DNS served it after {took:?}"
    );
    let mut app = client(local).await;
    app.unary(fanout_e2e::backend::proto::EchoRequest::default())
        .await
        .unwrap();
}
