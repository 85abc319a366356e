//! Backends behind a ClusterIP Service (port targeting the container port by name), gateways
//! whose proxies have just started, and how their calls spread; what the API server stored for
//! injected and opted-out pods.

use std::collections::BTreeMap;
use std::time::Duration;

use fanout_proxy_config::ADMIN_PORT;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support::{
    create_pod, eventually, finished_report, has_proxy, image, is_ready, object, restricted,
    test_pod,
};

pub const BACKENDS: usize = 5;
/// Calls are counted in windows of this many; fair is `WINDOW / BACKENDS` per backend.
const WINDOW: u64 = 1_000;

/// The `backend` Deployment behind a ClusterIP Service whose port targets the container port
/// by name, as most charts write it; returns once every backend pod is Ready.
pub async fn deploy_backends(client: &Client, namespace: &str) -> Vec<String> {
    deploy(client, namespace, "backend", false).await
}

/// `name`: a Deployment of `BACKENDS` test backends listening on container port `grpc`
/// (50051), and a Service of that name whose port `grpc` (9000) targets it by name: headless or
/// ClusterIP. Returns once every pod is Ready.
pub async fn deploy(client: &Client, namespace: &str, name: &str, headless: bool) -> Vec<String> {
    deploy_with(client, namespace, name, headless, &[], json!({})).await
}

/// As [`deploy`], the backends given `args` and the Service `annotations`.
pub async fn deploy_with(
    client: &Client,
    namespace: &str,
    name: &str,
    headless: bool,
    args: &[&str],
    annotations: Value,
) -> Vec<String> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let mut spec = json!({"selector": {"app": name},
        "ports": [{"name": "grpc", "port": 9000, "targetPort": "grpc"}]});
    if headless {
        spec["clusterIP"] = json!("None");
    }
    services
        .create(
            &PostParams::default(),
            &object(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "annotations": annotations}, "spec": spec})),
        )
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let mut backend_args = vec!["--listen", "0.0.0.0:50051", "--id", "$(POD_NAME)"];
    backend_args.extend_from_slice(args);
    let deployment: Deployment = object(json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": BACKENDS, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 5,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "backend",
                    "image": image("fanout-test"),
                    "args": backend_args,
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "ports": [{"containerPort": 50051, "name": "grpc"}],
                    "securityContext": restricted(),
                    "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 2}}]}}}}));
    // With failurePolicy Fail, creates are refused until a webhook replica answers.
    eventually(
        &format!("{name} Deployment created"),
        Duration::from_secs(60),
        || async {
            deployments
                .create(&PostParams::default(), &deployment)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    eventually(
        &format!("5 {name} pods ready"),
        Duration::from_secs(180),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={name}")))
                .await
                .map_err(|e| e.to_string())?;
            for pod in &list.items {
                assert!(!has_proxy(pod), "a backend without upstreams was injected");
            }
            let ready: Vec<String> = list
                .items
                .iter()
                .filter(|p| is_ready(p) == Some(true))
                .map(|p| p.metadata.name.clone().unwrap())
                .collect();
            (ready.len() == BACKENDS)
                .then_some(ready)
                .ok_or_else(|| format!("{} of {BACKENDS} ready", list.items.len()))
        },
    )
    .await
}

/// A gateway pod naming the backends, whose client makes `calls` calls over `connections`
/// connections with `in_flight` on each.
pub fn gateway(
    name: &str,
    calls: u32,
    connections: u32,
    in_flight: u32,
    annotations: Value,
) -> Pod {
    paced_gateway(name, calls, connections, in_flight, 0, annotations)
}

/// As [`gateway`], starting at most `rate` calls a second (0: no limit).
pub fn paced_gateway(
    name: &str,
    calls: u32,
    connections: u32,
    in_flight: u32,
    rate: u32,
    annotations: Value,
) -> Pod {
    let container = json!({"name": "gateway", "image": image("fanout-test"),
        "command": ["/usr/local/bin/fanout-test-client"],
        // The first upstream's local port, whatever the Service is called.
        "args": ["--target", "127.0.0.1:15001",
                 "--calls", calls.to_string(), "--connections", connections.to_string(),
                 "--in-flight", in_flight.to_string(), "--window", WINDOW.to_string(),
                 "--rate", rate.to_string(),
                 // What the sidecar's balancer saw, in the report a failed spread prints.
                 "--sample-endpoints", format!("http://127.0.0.1:{ADMIN_PORT}/endpoints")],
        "securityContext": restricted()});
    test_pod(name, annotations, json!({}), container)
}

/// Every backend pod answered at least half of its fair share in every window, and no call
/// failed. A pod under that in a window passes only if it was slower there than the balancer
/// counts as noise (its own median call time more than `NOISE_RATIO` times that of all the
/// window's calls) and still got calls: on this one-node cluster pods share two cores, and a
/// pod starved of CPU for a while is one a latency-aware balancer is right to send less. The
/// loopback suites (`proxy_balance.rs`) hold the share without that exception, on equal pods.
pub fn assert_spread(name: &str, report: &Value, backend_pods: &[String]) {
    assert_eq!(
        report["failures"],
        json!({}),
        "{name}: calls failed: {report}"
    );
    let least: BTreeMap<String, u64> =
        serde_json::from_value(report["window_min"].clone()).unwrap();
    // Per pod, in its worst window: [its own median ms, the median ms of all calls].
    let medians: BTreeMap<String, [f64; 2]> =
        serde_json::from_value(report["window_min_p50_ms"].clone()).unwrap_or_default();
    let half_fair = WINDOW / BACKENDS as u64 / 2;
    for pod in backend_pods {
        let fewest = least.get(pod).copied().unwrap_or(0);
        if fewest >= half_fair {
            continue;
        }
        let slower = medians
            .get(pod)
            .is_some_and(|[own, all]| *own > all * fanout_balance::latency::NOISE_RATIO);
        assert!(
            slower && fewest > 0,
            "{name}: {pod} answered {fewest} of a window of {WINDOW} calls, less than half of its \
             fair share, and was not slower there than the balancer's noise band: {report}"
        );
        eprintln!(
            "{name}: {pod} answered {fewest} of a window of {WINDOW} calls, but was more than \
             {}x slower than the others there: {:?}",
            fanout_balance::latency::NOISE_RATIO,
            medians.get(pod)
        );
    }
}

/// The spread case; returns the one-at-a-time gateway's report.
pub async fn run(client: &Client, namespace: &str) -> Value {
    let backend_pods = deploy_backends(client, namespace).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let upstreams = json!({"fanout.dev/upstreams": "backend:grpc"});
    // Two fresh proxies: calls one at a time on one connection, and 4 connections x 8.
    let sequential = create_pod(&pods, gateway("gateway", 2_000, 1, 1, upstreams.clone())).await;
    let concurrent = create_pod(
        &pods,
        gateway("gateway-concurrent", 4_000, 4, 8, upstreams.clone()),
    )
    .await;
    let mut opted_out_annotations = upstreams.clone();
    opted_out_annotations["fanout.dev/inject"] = json!("disabled");
    let by_annotation =
        create_pod(&pods, gateway("opted-out", 1, 1, 1, opted_out_annotations)).await;
    let mut by_label = gateway("opted-out-label", 1, 1, 1, upstreams);
    by_label.metadata.labels = Some([("fanout.dev/inject".into(), "disabled".into())].into());
    let by_label = create_pod(&pods, by_label).await;

    // What the API server stored.
    for gateway in [&sequential, &concurrent] {
        assert!(has_proxy(gateway), "the gateway was not injected");
        let annotations = gateway.metadata.annotations.clone().unwrap_or_default();
        assert!(annotations.contains_key("fanout.dev/injected"));
        assert!(annotations.contains_key("fanout.dev/proxy-config"));
        let app = gateway
            .spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .find(|c| c.name == "gateway")
            .unwrap();
        assert!(
            app.env
                .iter()
                .flatten()
                .any(|e| e.name == "FANOUT_UPSTREAM_BACKEND"
                    && e.value.as_deref() == Some("127.0.0.1:15001")),
            "{:?}",
            app.env
        );
    }
    assert!(
        !has_proxy(&by_annotation),
        "the annotation opt-out was injected"
    );
    assert!(!has_proxy(&by_label), "the label opt-out was injected");

    let report = finished_report(&pods, "gateway", "gateway").await;
    let concurrent_report = finished_report(&pods, "gateway-concurrent", "gateway").await;
    eprintln!("gateway-sequential (1x1): {report}");
    eprintln!("gateway-concurrent (4x8): {concurrent_report}");
    assert_spread("gateway", &report, &backend_pods);
    assert_spread("gateway-concurrent", &concurrent_report, &backend_pods);
    eprintln!("spread: ok");
    report
}
