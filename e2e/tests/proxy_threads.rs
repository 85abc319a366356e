//! `--threads N`: several engine threads per upstream, each accepting on the one listener and
//! keeping its own connections to every endpoint, reporting as one.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend::{Backend, Behaviour};
use fanout_e2e::proxy::{ProxyProcess, loopback_config, pod_ip};
use fanout_proxy_config::Discovery;

const CALLS_PER_CLIENT: usize = 50;
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_threads_share_the_listener_and_report_as_one() {
    let mut stats = Vec::new();
    let mut addrs = Vec::new();
    for n in 0..3 {
        let backend = Backend::new(format!("backend-{n}"), Behaviour::default());
        stats.push(backend.stats());
        addrs.push(backend.spawn(SocketAddr::new(pod_ip(n), 0)).await.unwrap());
    }
    let (config, local) = loopback_config(Discovery::Static(addrs.clone()), |_| {});
    let proxy = ProxyProcess::start_with_env(&config, &[("FANOUT_PROXY_THREADS", "2")])
        .await
        .unwrap();

    // Each thread connects to every endpoint: two connections each, shown as ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        let endpoints = state["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .clone();
        let both = endpoints
            .iter()
            .all(|e| e["state"] == "ready" && e["connections"] == 2);
        if endpoints.len() == 3 && both {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Clients on connections of their own land on either thread; every call is answered.
    let clients = (0..CLIENTS).map(|_| async move {
        let mut client = TestClient::connect(format!("http://{local}"))
            .await
            .unwrap();
        for _ in 0..CALLS_PER_CLIENT {
            client.unary(EchoRequest::default()).await.unwrap();
        }
    });
    futures::future::join_all(clients).await;
    let total = (CLIENTS * CALLS_PER_CLIENT) as u64;
    let answered: Vec<u64> = stats
        .iter()
        .map(|s| s.calls.load(Ordering::Relaxed))
        .collect();
    assert_eq!(answered.iter().sum::<u64>(), total, "{answered:?}");
    assert!(answered.iter().all(|&n| n > 0), "{answered:?}");

    // Both threads' calls are in the one set of metrics and endpoint counts.
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    let counted: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("fanout_proxy_requests_total{") && l.contains("grpc_status=\"0\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, total, "{metrics}");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        let started: u64 = state["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["started"].as_u64().unwrap())
            .sum();
        if started == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "started {started} of {total}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
