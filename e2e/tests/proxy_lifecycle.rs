//! The proxy process: refusing bad configs, `wait`, `/ready`, and draining on SIGTERM.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::StreamRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend::{Backend, Behaviour};
use fanout_e2e::bins;
use fanout_e2e::proxy::{ProxyProcess, admin_request, free_port, pod_ip};
use fanout_proxy_config::{Balancer, Discovery, ProxyConfig, UpstreamConfig};
use tokio_stream::StreamExt;

fn proxy_bin() -> std::path::PathBuf {
    bins::path("fanout-proxy", "fanout-proxy")
}

#[test]
fn a_bad_config_is_refused_at_start_with_one_line_per_fault() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    std::fs::write(
        &file,
        r#"{"version":1,"upstreams":[{"name":"a","listen":"127.0.0.1:0","balancer":"fastest",
            "discovery":{"dns":{"name":"a.b","port":70000}}}],"admin":{"listn":"x"}}"#,
    )
    .unwrap();
    for args in [vec!["run", "--config"], vec!["check"]] {
        let output = Command::new(proxy_bin())
            .args(&args)
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        let lines: Vec<&str> = stderr.lines().collect();
        let path = file.display().to_string();
        assert_eq!(
            lines,
            [
                format!("{path}: admin.listn: unknown field"),
                format!("{path}: upstreams[0].listen: 127.0.0.1:0 needs a fixed port, not 0"),
                format!("{path}: upstreams[0].discovery.dns.port: must be 1..=65535, got 70000"),
                format!(
                    "{path}: upstreams[0].balancer: unknown balancer \"fastest\"; use one of peak_ewma, round_robin, least_request"
                ),
            ],
            "{args:?}"
        );
    }
    let output = Command::new(proxy_bin())
        .args(["run", "--config", "/nonexistent/config.json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("/nonexistent/config.json: cannot read")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
        "a",
        taken.local_addr().unwrap(),
        Discovery::Static(vec!["127.0.0.2:1".parse().unwrap()]),
    )]);
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let err = ProxyProcess::start(&config)
        .await
        .err()
        .expect("must not start");
    assert!(err.to_string().contains("exited at start"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_once_the_proxy_is_live() {
    let admin = free_port();
    let started = Instant::now();
    let output = Command::new(proxy_bin())
        .args([
            "wait",
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--timeout",
            "300ms",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "no proxy: wait gives up");
    assert!(String::from_utf8_lossy(&output.stderr).contains("was not live within"));
    // It gave up at its timeout rather than hanging (the bound leaves a slow runner room to
    // start the process).
    assert!(started.elapsed() < Duration::from_secs(30));

    let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
        "a",
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        Discovery::Static(vec!["127.0.0.2:1".parse().unwrap()]),
    )]);
    config.admin.listen = format!("127.0.0.1:{admin}").parse().unwrap();
    let _proxy = ProxyProcess::start(&config).await.unwrap();
    let status = Command::new(proxy_bin())
        .args([
            "wait",
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--timeout",
            "60s",
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_stream_lets_it_finish_then_exits_0() {
    let backend = Backend::new("backend-0", Behaviour::default());
    let addr = backend.spawn(SocketAddr::new(pod_ip(0), 0)).await.unwrap();
    let local: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
        "app.shop",
        local,
        Discovery::Static(vec![addr]),
    )]);
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.drain.quiet = Duration::from_millis(500);
    config.drain.deadline = Duration::from_secs(20);
    let mut proxy = ProxyProcess::start(&config).await.unwrap();
    proxy
        .wait_ok("/ready", Duration::from_secs(10))
        .await
        .unwrap();

    let mut client = TestClient::connect(format!("http://{local}"))
        .await
        .unwrap();
    // 40 replies, 50 ms apart: two seconds of stream.
    let mut stream = client
        .server_stream(StreamRequest {
            count: 40,
            interval_ms: 50,
            reply_bytes: 8,
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    proxy.terminate();
    let signalled = Instant::now();

    // While draining the proxy still takes new connections and calls.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = TestClient::connect(format!("http://{local}"))
        .await
        .unwrap();
    late.unary(fanout_e2e::backend::proto::EchoRequest::default())
        .await
        .unwrap();

    let mut received = 1;
    while let Some(reply) = stream.next().await {
        reply.expect("the stream completes through the drain");
        received += 1;
    }
    assert_eq!(received, 40);
    assert!(
        signalled.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_accepted_from_loopback_and_ends_the_proxy() {
    let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
        "a",
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        Discovery::Static(vec!["127.0.0.2:1".parse().unwrap()]),
    )]);
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.drain.quiet = Duration::from_millis(100);
    let mut proxy = ProxyProcess::start(&config).await.unwrap();
    let (status, _) = admin_request(proxy.admin, "GET", "/shutdown")
        .await
        .unwrap();
    assert_eq!(status, 403, "only POST");
    let (status, _) = admin_request(proxy.admin, "POST", "/shutdown")
        .await
        .unwrap();
    assert_eq!(status, 202);
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)).await, Some(0));
}

async fn first_backend(addr: SocketAddr) -> Option<String> {
    let mut client = TestClient::connect(format!("http://{addr}")).await.ok()?;
    let reply = client
        .unary(fanout_e2e::backend::proto::EchoRequest::default())
        .await
        .ok()?;
    Some(reply.into_inner().backend)
}

/// Polls until calls to `addr` are answered by `backend`.
async fn until_answered_by(addr: SocketAddr, backend: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while first_backend(addr).await.as_deref() != Some(backend) {
        assert!(
            Instant::now() < deadline,
            "{addr} never answered by {backend}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_is_applied_without_a_restart() {
    let a = Backend::new("backend-a", Behaviour::default())
        .spawn(SocketAddr::new(pod_ip(0), 0))
        .await
        .unwrap();
    let b = Backend::new("backend-b", Behaviour::default())
        .spawn(SocketAddr::new(pod_ip(1), 0))
        .await
        .unwrap();
    let local: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
        "app.shop",
        local,
        Discovery::Static(vec![a]),
    )]);
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    // Written aside and renamed, as the kubelet swaps downward API files.
    let write = |config: &str| {
        std::fs::write(dir.path().join("next.json"), config).unwrap();
        std::fs::rename(dir.path().join("next.json"), &path).unwrap();
    };
    write(&config.to_json_pretty());
    let proxy = ProxyProcess::start_file(path.clone(), config.admin.listen)
        .await
        .unwrap();
    assert_eq!(first_backend(local).await.as_deref(), Some("backend-a"));

    // The upstream moves to another endpoint, and a second upstream appears.
    let second: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.upstreams[0].discovery = Discovery::Static(vec![b]);
    config.upstreams.push(UpstreamConfig::new(
        "other.shop",
        second,
        Discovery::Static(vec![a]),
    ));
    write(&config.to_json_pretty());
    until_answered_by(local, "backend-b").await;
    until_answered_by(second, "backend-a").await;
    let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
    assert!(endpoints.contains("other.shop"), "{endpoints}");

    // A broken file is refused; the running config stays.
    write("{\"version\": 1, \"upstreams\": [");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(first_backend(local).await.as_deref(), Some("backend-b"));

    // A change that keeps the endpoint (the request timeout, the balancer): the upstream is
    // replaced, the new timeout ends a long stream, and the endpoint is ready and shown so
    // (the engine's connection, which the new upstream finds as it is).
    config.upstreams[0].timeouts.request = Some(Duration::from_millis(300));
    config.upstreams[0].balancer = Balancer::RoundRobin;
    write(&config.to_json_pretty());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = TestClient::connect(format!("http://{local}"))
        .await
        .unwrap();
    loop {
        let two_seconds = StreamRequest {
            count: 40,
            interval_ms: 50,
            reply_bytes: 8,
        };
        let mut stream = client
            .server_stream(two_seconds)
            .await
            .unwrap()
            .into_inner();
        let mut ended = None;
        while let Some(reply) = stream.next().await {
            if let Err(status) = reply {
                ended = Some(status.code());
                break;
            }
        }
        if ended == Some(tonic::Code::DeadlineExceeded) {
            break;
        }
        assert!(Instant::now() < deadline, "the new timeout never applied");
    }
    let (ready, why) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(ready, 200, "{why}");
    let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
    let state: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let endpoint = &state["upstreams"][0]["endpoints"][0];
    assert_eq!(endpoint["state"], "ready", "{endpoints}");
    assert_eq!(
        state["upstreams"][0]["balancer"], "round_robin",
        "{endpoints}"
    );
    assert!(endpoint["started"].as_u64().unwrap() >= 1, "{endpoints}");
    assert_eq!(first_backend(local).await.as_deref(), Some("backend-b"));

    // An upstream dropped from the config stops listening.
    config.upstreams.pop();
    write(&config.to_json_pretty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(second).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "removed upstream still listening"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(first_backend(local).await.as_deref(), Some("backend-b"));
}
