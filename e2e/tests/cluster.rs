//! The cluster suite: the whole product on a real cluster. Ignored unless asked for (`make
//! e2e-kind` on kind, `make e2e-cluster` against `KUBECONFIG`); it needs `KUBECONFIG`, `helm` on
//! the PATH, and the images in the cluster (`make e2e-kind` builds and loads them), named by
//! `FANOUT_IMAGE_REPO` / `FANOUT_IMAGE_TAG` (default `ghcr.io/fanout-dev` / `dev`).
//!
//! It installs the chart, opts a fresh namespace in, deploys 5 backend pods behind a headless
//! Service and a gateway pod naming it, and checks what the API server stored: the gateway
//! injected, opted-out pods not, and the gateway's 1,000 calls over one connection answered by
//! every backend pod.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const RELEASE: &str = "fanout";
const RELEASE_NAMESPACE: &str = "fanout-system";
const BACKENDS: usize = 5;

fn image(name: &str) -> String {
    let repo = std::env::var("FANOUT_IMAGE_REPO").unwrap_or_else(|_| "ghcr.io/fanout-dev".into());
    let tag = std::env::var("FANOUT_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("{repo}/{name}:{tag}")
}

fn helm_install() {
    let (webhook, proxy) = (image("fanout-webhook"), image("fanout-proxy"));
    let (webhook_repo, webhook_tag) = webhook.rsplit_once(':').unwrap();
    let (proxy_repo, proxy_tag) = proxy.rsplit_once(':').unwrap();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/fanout");
    let status = Command::new("helm")
        .args([
            "upgrade",
            "--install",
            RELEASE,
            chart,
            "--namespace",
            RELEASE_NAMESPACE,
        ])
        .args(["--create-namespace", "--wait", "--timeout", "5m"])
        .args(["--set", &format!("image.repository={webhook_repo}")])
        .args(["--set", &format!("image.tag={webhook_tag}")])
        .args(["--set", &format!("proxy.image.repository={proxy_repo}")])
        .args(["--set", &format!("proxy.image.tag={proxy_tag}")])
        .status()
        .expect("helm on the PATH");
    assert!(status.success(), "helm upgrade --install failed");
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if started.elapsed() > timeout => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

fn has_proxy(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == "fanout-proxy")
}

/// Deletes the test namespace however the test ends.
struct NamespaceGuard(Api<Namespace>, String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let (api, name) = (self.0.clone(), self.1.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move { api.delete(&name, &DeleteParams::default()).await })
        })
        .join();
    }
}

fn test_pod(name: &str, annotations: Value, labels: Value, container: Value) -> Pod {
    object(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations, "labels": labels},
        "spec": {"restartPolicy": "Never", "containers": [container],
                 "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}}}
    }))
}

#[tokio::test]
#[ignore = "needs a cluster: make e2e-kind"]
async fn the_chart_injects_opted_in_pods_and_calls_spread_over_every_backend_pod() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "the cluster suite needs KUBECONFIG"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    helm_install();
    let client = Client::try_default()
        .await
        .expect("a cluster from KUBECONFIG");

    // The webhook set its caBundle (auto certificates).
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually("caBundle set", Duration::from_secs(120), || async {
        let configuration = configurations
            .get(RELEASE)
            .await
            .map_err(|e| e.to_string())?;
        let webhooks = configuration.webhooks.unwrap_or_default();
        match webhooks
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone())
        {
            Some(bundle) if !bundle.0.is_empty() => Ok(()),
            _ => Err("no caBundle yet".to_string()),
        }
    })
    .await;

    let namespace = format!("fanout-e2e-{}", fastrand::u32(..));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &object(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": namespace, "labels": {"fanout.dev/inject": "enabled"}}}),
            ),
        )
        .await
        .unwrap();
    let _guard = NamespaceGuard(namespaces.clone(), namespace.clone());

    // Backends: a headless Service over 5 pods; they name no upstream, so they are left alone.
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    services
        .create(
            &PostParams::default(),
            &object(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "backend"},
                "spec": {"clusterIP": "None", "selector": {"app": "backend"},
                         "ports": [{"name": "grpc", "port": 50051, "targetPort": 50051}]}})),
        )
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let create_backends = || async {
        deployments
            .create(
                &PostParams::default(),
                &object(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "backend"},
                    "spec": {"replicas": BACKENDS, "selector": {"matchLabels": {"app": "backend"}},
                        "template": {"metadata": {"labels": {"app": "backend"}},
                            "spec": {"containers": [{"name": "backend",
                                "image": image("fanout-test"),
                                "args": ["--listen", "0.0.0.0:50051", "--id", "$(POD_NAME)"],
                                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                "ports": [{"containerPort": 50051, "name": "grpc"}],
                                "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 2}}]}}}})),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    // With failurePolicy Fail, creates are refused until a webhook replica answers.
    eventually(
        "backend Deployment created",
        Duration::from_secs(60),
        create_backends,
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let backend_pods: Vec<String> =
        eventually("5 backends ready", Duration::from_secs(180), || async {
            let list = pods
                .list(&ListParams::default().labels("app=backend"))
                .await
                .map_err(|e| e.to_string())?;
            let ready: Vec<String> = list
                .items
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .map(|p| p.metadata.name.clone().unwrap())
                .collect();
            for pod in &list.items {
                assert!(!has_proxy(pod), "a backend without upstreams was injected");
            }
            (ready.len() == BACKENDS)
                .then_some(ready)
                .ok_or_else(|| format!("{} of {BACKENDS} ready", list.items.len()))
        })
        .await;

    // The gateway names the upstream; two more pods opt out, by annotation and by label.
    let client_container = json!({"name": "gateway", "image": image("fanout-test"),
        "command": ["/usr/local/bin/fanout-test-client"], "args": ["--calls", "1000"],
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}});
    let upstreams = json!({"fanout.dev/upstreams": "backend:grpc"});
    let created = |pod: Pod| {
        let pods = pods.clone();
        async move {
            eventually("pod created", Duration::from_secs(60), || async {
                pods.create(&PostParams::default(), &pod)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
        }
    };
    let gateway = created(test_pod(
        "gateway",
        upstreams.clone(),
        json!({}),
        client_container.clone(),
    ))
    .await;
    let mut opted_out_annotations = upstreams.clone();
    opted_out_annotations["fanout.dev/inject"] = json!("disabled");
    let by_annotation = created(test_pod(
        "opted-out",
        opted_out_annotations,
        json!({}),
        client_container.clone(),
    ))
    .await;
    let by_label = created(test_pod(
        "opted-out-label",
        upstreams,
        json!({"fanout.dev/inject": "disabled"}),
        client_container,
    ))
    .await;

    // What the API server stored.
    assert!(has_proxy(&gateway), "the gateway was not injected");
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
    assert!(
        !has_proxy(&by_annotation),
        "the annotation opt-out was injected"
    );
    assert!(!has_proxy(&by_label), "the label opt-out was injected");

    // The gateway's calls, from its log once it has finished.
    let report: Value = eventually("gateway finished", Duration::from_secs(180), || async {
        let pod = pods.get("gateway").await.map_err(|e| e.to_string())?;
        let finished = pod
            .status
            .and_then(|s| s.container_statuses)
            .into_iter()
            .flatten()
            .any(|c| c.name == "gateway" && c.state.is_some_and(|s| s.terminated.is_some()));
        if !finished {
            return Err("gateway still running".into());
        }
        let log = pods
            .logs(
                "gateway",
                &LogParams {
                    container: Some("gateway".into()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        log.lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| format!("no report in the log: {log}"))
    })
    .await;
    eprintln!("gateway: {report}");
    let served: BTreeMap<String, u64> = serde_json::from_value(report["backends"].clone()).unwrap();
    assert_eq!(report["failures"], json!({}), "calls failed");
    for pod in &backend_pods {
        let calls = served.get(pod).copied().unwrap_or(0);
        // 1,000 calls over 5 pods: 200 each when even; a ClusterIP connection gives one pod all.
        assert!(calls >= 100, "{pod} answered {calls} of 1,000: {served:?}");
    }
}
