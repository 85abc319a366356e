//! What the proxy tells the kubelet and load balancers about itself, and users about failed
//! calls: `/ready/proxy` (the default readiness probe) beside the upstream-aware `/ready`;
//! `/grpc-health` from the app's own `grpc.health.v1`; a log line for each call that failed
//! (no endpoint, a deadline, an endpoint's reset).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::{Backend, Behaviour};
use fanout_e2e::fleet::client;
use fanout_e2e::proxy::{ProxyProcess, free_port, loopback_config, pod_ip};
use fanout_e2e::raw;
use fanout_e2e::resetting::spawn_resetting;
use fanout_proxy_config::{Discovery, DnsDiscovery, GrpcHealth, ProxyConfig, UpstreamConfig};
use fanout_wire::frame as wire_frame;
use serde_json::Value;

/// A config with one upstream discovered through `nameserver` for a name it does not know.
fn ghost_upstream(nameserver: SocketAddr) -> (ProxyConfig, SocketAddr) {
    let mut discovery = DnsDiscovery::new("ghost.shop.svc.cluster.local", 50051);
    discovery.nameservers = vec![nameserver];
    loopback_config(Discovery::Dns(discovery), |u| {
        u.timeouts.connect = Duration::from_millis(100);
    })
}

/// Waits until `path` on the admin port answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_ready_to_serve_once_discovery_has_answered_even_with_no_endpoints() {
    // A nameserver that never answers: discovery's first answer is its timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (config, _) = ghost_upstream(silent.local_addr().unwrap());
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let (status, body) = proxy.admin_get("/ready/proxy").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("app.shop") && body.contains("waiting for a first discovery answer"),
        "{body}"
    );
    proxy
        .wait_ok("/ready/proxy", Duration::from_secs(10))
        .await
        .unwrap();
    // The upstream-aware readiness still says the upstream has nothing.
    let (status, body) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_endpoints_leaves_proxy_readiness_alone() {
    let dns = fanout_e2e::dns::DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (config, _) = ghost_upstream(dns.addr);
    let proxy = ProxyProcess::start(&config).await.unwrap();
    proxy
        .wait_ok("/ready/proxy", Duration::from_secs(10))
        .await
        .unwrap();
    let (status, body) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("no A or AAAA records"), "{body}");
}

/// A proxy that serves only `/grpc-health` for the health server at `port` (no upstreams).
async fn health_proxy(port: u16, service: &str, cache: Duration) -> ProxyProcess {
    let mut config = ProxyConfig::new(Vec::new());
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut health = GrpcHealth::new(port, service);
    health.cache = cache;
    health.timeout = Duration::from_millis(300);
    config.grpc_health = Some(health);
    ProxyProcess::start(&config).await.unwrap()
}

async fn grpc_health(proxy: &ProxyProcess) -> (u16, Value) {
    let (status, body) = proxy.admin_get("/grpc-health").await.unwrap();
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_follows_the_apps_own_health_check() {
    let app = raw::spawn_health_server("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = health_proxy(app.addr.port(), "shop.Cart", Duration::ZERO).await;
    let (status, body) = grpc_health(&proxy).await;
    assert_eq!((status, &body["status"]), (200, &Value::from("SERVING")));
    assert_eq!(body["service"], "shop.Cart");
    for (reported, name) in [(2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN"), (0, "UNKNOWN")] {
        app.status.store(reported, Ordering::SeqCst);
        let (status, body) = grpc_health(&proxy).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["status"], name);
        assert!(
            body["reason"].as_str().unwrap().contains(name),
            "the reason says what the app reported: {body}"
        );
    }
    app.status.store(1, Ordering::SeqCst);
    assert_eq!(grpc_health(&proxy).await.0, 200);
    // A proxy without the setting has no such endpoint.
    let (other, _) = ghost_upstream("127.0.0.1:9".parse().unwrap());
    let other = ProxyProcess::start(&other).await.unwrap();
    assert_eq!(other.admin_get("/grpc-health").await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_is_503_within_its_timeout_when_the_app_is_down_or_silent() {
    // Nothing listens: refused at once.
    let port = free_port();
    let down = health_proxy(port, "", Duration::ZERO).await;
    let (status, body) = grpc_health(&down).await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "UNREACHABLE");
    assert!(
        body["reason"].as_str().unwrap().contains("connect"),
        "{body}"
    );
    // Something accepts and never answers: the timeout (300 ms) bounds the check.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = health_proxy(silent.local_addr().unwrap().port(), "", Duration::ZERO).await;
    let started = Instant::now();
    let (status, body) = grpc_health(&proxy).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The app coming up is seen at the next check.
    let _app = raw::spawn_health_server(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    assert_eq!(grpc_health(&down).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_health_checkers_cost_the_app_one_check_per_cache_period() {
    let app = raw::spawn_health_server("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = health_proxy(app.addr.port(), "", Duration::from_secs(60)).await;
    let answers = futures::future::join_all((0..50).map(|_| grpc_health(&proxy))).await;
    assert!(answers.iter().all(|(status, _)| *status == 200));
    assert_eq!(
        app.checks.load(Ordering::SeqCst),
        1,
        "50 probes, concurrent and then cached, asked the app once"
    );
    // Within the cache period a change is not seen yet; that is the price of sparing the app.
    app.status.store(2, Ordering::SeqCst);
    assert_eq!(grpc_health(&proxy).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_proxy_fails_leaves_a_line_saying_why() {
    let dns = fanout_e2e::dns::DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (config, local) = ghost_upstream(dns.addr);
    let log = std::env::temp_dir().join(format!("fanout-failures-{}.log", free_port()));
    let _proxy = ProxyProcess::start_logged(&config, &log).await.unwrap();
    let mut client = client(local).await;
    // 40 at once: each waits up to the connect timeout (100 ms) for an endpoint.
    let calls = (0..40).map(|_| {
        let mut client = client.clone();
        async move { client.unary(EchoRequest::default()).await }
    });
    for result in futures::future::join_all(calls).await {
        assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);
    }
    // The next second's first failure reports the lines left out of this one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _ = client.unary(EchoRequest::default()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let failed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "call failed")
        .collect();
    let first = failed.first().expect("a line for a failed call");
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["upstream"], "app.shop");
    assert_eq!(first["endpoint"], "none");
    assert_eq!(first["client_got"], "grpc-status 14");
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("no A or AAAA records"),
        "{first}"
    );
    // 41 failed calls: at most 10 lines a second, and the rest counted.
    assert!(failed.len() <= 20, "{} lines", failed.len());
    let left_out: u64 = lines.iter().filter_map(|l| l["left_out"].as_u64()).sum();
    assert!(
        left_out as usize + failed.len() >= 41,
        "{left_out} left out, {} logged: {text}",
        failed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_deadline_or_an_endpoint_reset_ended_leave_lines_naming_the_endpoint() {
    let slow = Backend::new("backend-0", Behaviour::default())
        .spawn(SocketAddr::new(pod_ip(0), 0))
        .await
        .unwrap();
    let (resetting, _) =
        spawn_resetting(SocketAddr::new(pod_ip(1), 0), wire_frame::INTERNAL_ERROR).await;
    let (mut config, slow_local) = loopback_config(Discovery::Static(vec![slow]), |_| {});
    let reset_local: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.upstreams.push(UpstreamConfig::new(
        "resetting.shop",
        reset_local,
        Discovery::Static(vec![resetting]),
    ));
    let log = std::env::temp_dir().join(format!("fanout-failures-{}.log", free_port()));
    let proxy = ProxyProcess::start_logged(&config, &log).await.unwrap();
    proxy
        .wait_ok("/ready", Duration::from_secs(5))
        .await
        .unwrap();

    let slow_call = EchoRequest {
        delay_ms: 2_000,
        ..Default::default()
    };
    let path = "/fanout.test.v1.Test/Unary";
    let timeout = [("grpc-timeout", "200m")];
    let answer = raw::unary(slow_local, path, &slow_call, &timeout)
        .await
        .unwrap();
    assert_eq!(answer.grpc_status(), Some(4));
    let reset = raw::unary(reset_local, path, &EchoRequest::default(), &[]).await;
    assert!(
        reset.is_err(),
        "a reset call has no answer: {:?}",
        reset.ok().map(|r| r.headers)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let failed: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "call failed")
        .collect();
    let line_of = |upstream: &str| {
        failed
            .iter()
            .find(|l| l["upstream"] == upstream)
            .unwrap_or_else(|| panic!("no line for {upstream}: {text}"))
    };
    let deadline = line_of("app.shop");
    assert_eq!(deadline["endpoint"], slow.to_string(), "{deadline}");
    assert_eq!(deadline["client_got"], "grpc-status 4", "{deadline}");
    let why = deadline["reason"].as_str().unwrap();
    assert!(why.contains("before the endpoint answered"), "{deadline}");
    let reset = line_of("resetting.shop");
    assert_eq!(reset["endpoint"], resetting.to_string(), "{reset}");
    assert_eq!(reset["client_got"], "RST_STREAM INTERNAL_ERROR", "{reset}");
    let why = reset["reason"].as_str().unwrap();
    assert!(
        why.contains("reset by the endpoint before its answer"),
        "{reset}"
    );
}
