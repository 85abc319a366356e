//! The whole product as one pipeline, no cluster: `fanout-webhook serve` over TLS answers a
//! recorded AdmissionReview; its patch is applied as the API server would; the proxy config is
//! read out of the patched pod's annotation as the downward API projects it (only the DNS
//! servers pointed at the test DNS server); a real `fanout-proxy` runs with it; backends on
//! 127.0.0.2–11 answer calls of every kind, spread over all of them.
//!
//! The rendered config fixes the ports (15001, 15002, admin 15020; Services on 50051 and 9000):
//! they must be free on loopback while this runs (not alongside `make demo`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fanout_certs::{Ca, service_dns_names, write_bundle};
use fanout_e2e::backend::Behaviour;
use fanout_e2e::backend::proto::{EchoRequest, StreamRequest};
use fanout_e2e::dns::DnsServer;
use fanout_e2e::fleet::{client, wait_for_endpoints};
use fanout_e2e::proxy::{ProxyProcess, pod_ip, spawn_backends_on};
use fanout_e2e::webhook::WebhookProcess;
use serde_json::Value;

/// The fixture's pod as the API server would store it after our patch.
async fn admitted_pod(fixture: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("pipeline CA", Duration::from_secs(3600)).unwrap();
    let names = service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let serving = ca
        .issue_serving(&names, &[ip], Duration::from_secs(3600))
        .unwrap();
    write_bundle(dir.path(), &ca, &serving).unwrap();
    let webhook = WebhookProcess::start(
        dir.path(),
        &["--no-lookup", "--proxy-image", "fanout/fanout-proxy:e2e"],
        &[],
    )
    .unwrap();
    fanout_e2e::webhook::admitted_pod(webhook.addr, ca.cert_pem(), fixture).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_patch_config_and_proxy_work_as_one() {
    let pod = admitted_pod("pod-native-sidecar-two-upstreams").await;

    // What the kubelet would run: the injected container's command, config from the volume.
    let proxy_container = pod["spec"]["initContainers"][0].clone();
    assert_eq!(proxy_container["name"], "fanout-proxy");
    assert!(
        proxy_container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "/etc/fanout/config.json"),
        "{proxy_container}"
    );
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "fanout-config")
        .unwrap();
    assert_eq!(
        volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.annotations['fanout.dev/proxy-config']"
    );
    // The downward API writes the annotation's value as the file's content, byte for byte.
    let projected = pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .unwrap()
        .to_string();

    // The cluster's DNS, played by the test DNS server: two headless Services.
    let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (app_port, app_stats) = spawn_backends_on(10, 50051, Behaviour::default()).await;
    assert_eq!(app_port, 50051, "port 50051 is taken on 127.0.0.2-11");
    dns.set(
        "app.shop.svc.cluster.local",
        &(0..10).map(pod_ip).collect::<Vec<_>>(),
    );
    let billing_ips = [pod_ip(10), pod_ip(11)];
    let mut billing_stats = Vec::new();
    for (n, ip) in billing_ips.iter().enumerate() {
        let backend =
            fanout_e2e::backend::Backend::new(format!("billing-{n}"), Behaviour::default());
        billing_stats.push(backend.stats());
        backend.spawn(SocketAddr::new(*ip, 9000)).await.unwrap();
    }
    dns.set("billing.payments.svc.cluster.local", &billing_ips);

    let mut config: Value = serde_json::from_str(&projected).unwrap();
    for upstream in config["upstreams"].as_array_mut().unwrap() {
        upstream["discovery"]["dns"]["nameservers"] = serde_json::json!([dns.addr.to_string()]);
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&config).unwrap()).unwrap();
    let admin: SocketAddr = "127.0.0.1:15020".parse().unwrap();
    let proxy = ProxyProcess::start_file(file.path().to_path_buf(), admin)
        .await
        .unwrap();
    wait_for_endpoints(&proxy, "ready", 10).await;

    // The app's env names the local ports.
    let app_env: HashMap<String, String> = pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let app_addr: SocketAddr = app_env["FANOUT_UPSTREAM_APP"].parse().unwrap();
    let billing_addr: SocketAddr = app_env["FANOUT_UPSTREAM_BILLING_PAYMENTS"].parse().unwrap();

    // Every kind of call flows; unary calls spread over all ten backends.
    let clients = futures::future::join_all((0..4).map(|_| client(app_addr))).await;
    for mut client in clients.clone() {
        for _ in 0..250 {
            client.unary(EchoRequest::default()).await.unwrap();
        }
    }
    let served: Vec<u64> = app_stats
        .iter()
        .map(|s| s.calls.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert!(served.iter().all(|&n| n >= 40), "spread: {served:?}");
    let mut c = clients[0].clone();
    let mut stream = c
        .server_stream(StreamRequest {
            count: 20,
            interval_ms: 0,
            reply_bytes: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    while stream.message().await.unwrap().is_some() {
        messages += 1;
    }
    assert_eq!(messages, 20);
    let uploads = futures::stream::iter((0..50).map(|_| EchoRequest {
        payload: vec![7; 1000],
        ..Default::default()
    }));
    let summary = c.client_stream(uploads).await.unwrap().into_inner();
    assert_eq!((summary.count, summary.bytes), (50, 50_000));
    let echoes = futures::stream::iter((0..30).map(|_| EchoRequest::default()));
    let mut replies = c.bidi(echoes).await.unwrap().into_inner();
    let mut echoed = 0;
    while replies.message().await.unwrap().is_some() {
        echoed += 1;
    }
    assert_eq!(echoed, 30);

    let mut billing = client(billing_addr).await;
    let reply = billing.unary(EchoRequest::default()).await.unwrap();
    assert!(reply.get_ref().backend.starts_with("billing-"));

    // The admin port answers as the probes and Prometheus expect.
    let (status, _) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 200);
    let (status, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    for series in [
        "fanout_proxy_requests_total{upstream=\"app.shop\",endpoint=\"127.0.0.2:50051\",grpc_status=\"0\"}",
        "fanout_proxy_endpoints{upstream=\"app.shop\",state=\"ready\"} 10",
        "fanout_proxy_endpoints{upstream=\"billing.payments\",state=\"ready\"} 2",
        "fanout_proxy_request_duration_seconds_count{upstream=\"app.shop\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}
