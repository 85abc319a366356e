//! An HTTP health check for cloud load balancers: a gRPC server pod with only
//! `fanout.dev/grpc-health` gets a proxy that answers `GET :15020/grpc-health` from the pod's
//! own `grpc.health.v1`, and another pod's GETs follow the server from NOT_SERVING to SERVING.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support::{
    container_log, create_pod, eventually, finished_report, has_proxy, image, restricted, test_pod,
};

/// How long the server reports NOT_SERVING after it starts.
const NOT_SERVING_MS: u64 = 20_000;

pub async fn run(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let server = json!({"name": "server", "image": image("fanout-test"),
        "args": ["--listen", "0.0.0.0:50051", "--id", "health-server",
                 "--not-serving-for-ms", NOT_SERVING_MS.to_string()],
        "ports": [{"containerPort": 50051, "name": "grpc"}],
        "securityContext": restricted()});
    let stored = create_pod(
        &pods,
        test_pod(
            "health-server",
            json!({"fanout.dev/grpc-health": "50051"}),
            json!({}),
            server,
        ),
    )
    .await;
    assert!(
        has_proxy(&stored),
        "a pod with only fanout.dev/grpc-health was not injected"
    );
    let config: Value = serde_json::from_str(
        &stored.metadata.annotations.clone().unwrap_or_default()["fanout.dev/proxy-config"],
    )
    .unwrap();
    assert_eq!(config["upstreams"], json!([]), "{config}");
    assert_eq!(config["grpc_health"]["port"], json!(50051), "{config}");

    let ip = eventually(
        "health-server running",
        Duration::from_secs(120),
        || async {
            let pod = pods.get("health-server").await.map_err(|e| e.to_string())?;
            let status = pod.status.unwrap_or_default();
            match (status.phase.as_deref(), status.pod_ip) {
                (Some("Running"), Some(ip)) => Ok(ip),
                (phase, _) => Err(format!("phase {phase:?}")),
            }
        },
    )
    .await;

    // A load balancer's health checker: GETs every 500 ms for longer than NOT_SERVING lasts.
    let prober = json!({"name": "prober", "image": image("fanout-test"),
        "command": ["/usr/local/bin/fanout-test-client"],
        "args": ["--probe", format!("http://{ip}:15020/grpc-health"), "--count",
                 (NOT_SERVING_MS / 500 + 20).to_string(), "--every-ms", "500"],
        "securityContext": restricted()});
    create_pod(&pods, test_pod("lb-prober", json!({}), json!({}), prober)).await;
    finished_report(&pods, "lb-prober", "prober").await;
    let log = container_log(&pods, "lb-prober", "prober").await.unwrap();
    let probes: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let statuses: Vec<u64> = probes
        .iter()
        .map(|p| p["status"].as_u64().unwrap_or(0))
        .collect();
    let first_ok = statuses
        .iter()
        .position(|s| *s == 200)
        .unwrap_or_else(|| panic!("never 200: {log}"));
    assert!(
        first_ok >= 2,
        "the server was NOT_SERVING when the probes began: {log}"
    );
    for probe in &probes[..first_ok] {
        assert_eq!(probe["status"], json!(503), "{log}");
        assert!(
            probe["body"].as_str().unwrap_or("").contains("NOT_SERVING"),
            "a 503 names the reason: {probe}"
        );
    }
    assert!(
        statuses[first_ok..].iter().all(|s| *s == 200),
        "200 once SERVING: {statuses:?}"
    );
    assert!(statuses.len() - first_ok >= 3, "{statuses:?}");
    eprintln!(
        "grpc-health: ok ({first_ok} probes 503 NOT_SERVING, then {} probes 200)",
        statuses.len() - first_ok
    );
}
