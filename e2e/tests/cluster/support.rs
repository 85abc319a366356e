//! What every case of the cluster suite needs: the images, the chart installed, objects from
//! JSON, waiting on the API server, pods' readiness and logs, and a namespace that goes away.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, LogParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

pub const RELEASE: &str = "fanout";
pub const RELEASE_NAMESPACE: &str = "fanout-system";

pub fn image(name: &str) -> String {
    let repo = std::env::var("FANOUT_IMAGE_REPO").unwrap_or_else(|_| "ghcr.io/fanout-dev".into());
    let tag = std::env::var("FANOUT_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("{repo}/{name}:{tag}")
}

pub fn helm_install() {
    let (webhook, proxy) = (image("fanout-webhook"), image("fanout-proxy"));
    let (webhook_repo, webhook_tag) = webhook.rsplit_once(':').unwrap();
    let (proxy_repo, proxy_tag) = proxy.rsplit_once(':').unwrap();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/fanout");
    let status = Command::new("helm")
        .args(["upgrade", "--install", RELEASE, chart])
        .args(["--namespace", RELEASE_NAMESPACE])
        .args(["--create-namespace", "--wait", "--timeout", "5m"])
        .args(["--set", &format!("image.repository={webhook_repo}")])
        .args(["--set", &format!("image.tag={webhook_tag}")])
        .args(["--set", &format!("proxy.image.repository={proxy_repo}")])
        .args(["--set", &format!("proxy.image.tag={proxy_tag}")])
        // Extra values for a run, e.g. FANOUT_E2E_HELM_SET=discovery.enabled=false.
        .args(
            std::env::var("FANOUT_E2E_HELM_SET")
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| vec!["--set".to_string(), v])
                .unwrap_or_default(),
        )
        .status()
        .expect("helm on the PATH");
    assert!(status.success(), "helm upgrade --install failed");
}

/// Retries `check` every second until it succeeds; panics with its last reason after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
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

pub fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

pub fn has_proxy(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == "fanout-proxy")
}

/// The pod's `Ready` condition; `None` before the kubelet set one.
pub fn is_ready(pod: &Pod) -> Option<bool> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

/// A pod that is not injected by accident: restricted, quick to stop.
pub fn test_pod(name: &str, annotations: Value, labels: Value, container: Value) -> Pod {
    object(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations, "labels": labels},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                 "containers": [container],
                 "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}}}
    }))
}

/// Restricted Pod Security for a container.
pub fn restricted() -> Value {
    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
}

/// Creates `pod`, retrying while no webhook replica answers yet (failurePolicy Fail); what the
/// API server stored.
pub async fn create_pod(pods: &Api<Pod>, pod: Pod) -> Pod {
    eventually("pod created", Duration::from_secs(60), || async {
        pods.create(&PostParams::default(), &pod)
            .await
            .map_err(|e| e.to_string())
    })
    .await
}

/// Waits for `container` of pod `name` to end, then returns the last JSON line of its log.
pub async fn finished_report(pods: &Api<Pod>, name: &str, container: &str) -> Value {
    eventually(
        &format!("{name} finished"),
        Duration::from_secs(300),
        || async {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            let finished = pod
                .status
                .and_then(|s| s.container_statuses)
                .into_iter()
                .flatten()
                .any(|c| c.name == container && c.state.is_some_and(|s| s.terminated.is_some()));
            if !finished {
                return Err(format!("{name} still running"));
            }
            let log = container_log(pods, name, container).await?;
            log.lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .ok_or_else(|| format!("no report in the log: {log}"))
        },
    )
    .await
}

pub async fn container_log(pods: &Api<Pod>, name: &str, container: &str) -> Result<String, String> {
    pods.logs(
        name,
        &LogParams {
            container: Some(container.into()),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// A labelled namespace for one run of the suite.
pub async fn create_namespace(client: &Client) -> String {
    let name = format!("fanout-e2e-{}", fastrand::u32(..));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &object(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": name, "labels": {"fanout.dev/inject": "enabled"}}}),
            ),
        )
        .await
        .unwrap();
    name
}

/// Deletes the namespace and waits (up to 2 minutes) until it is gone.
pub async fn delete_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Err(e) = namespaces.delete(name, &DeleteParams::default()).await {
        eprintln!("deleting namespace {name}: {e}");
        return;
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        match namespaces.get_opt(name).await {
            Ok(None) => {
                eprintln!("namespace {name} deleted");
                return;
            }
            Ok(Some(_)) | Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    eprintln!("namespace {name} still terminating after 2 minutes");
}

/// What a failed run leaves for its reader: the pods and the proxies' logs.
pub async fn dump(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = pods.list(&Default::default()).await else {
        return;
    };
    for pod in list.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        eprintln!("--- pod {name}: {phase:?}, ready {:?}", is_ready(&pod));
        if has_proxy(&pod)
            && let Ok(log) = container_log(&pods, &name, "fanout-proxy").await
        {
            for line in log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("  {line}");
            }
        }
    }
}

/// An HTTP/1.1 GET, 2 s at most: the body, or why not.
pub async fn http_get(url: &str) -> Result<String, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(url.parse().unwrap()))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
