//! Readiness that does not cascade: with its upstream scaled to 0, a caller whose proxy has the
//! default readiness stays Ready; one that asked for `upstreams` readiness turns NotReady, and
//! Ready again once a backend is back.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::support::{create_pod, eventually, image, is_ready, restricted, test_pod};

/// A long-running caller of the backends (a gRPC server of its own) with `annotations`.
fn caller(name: &str, readiness: Option<&str>) -> Pod {
    let mut annotations = json!({"fanout.dev/upstreams": "backend:grpc"});
    if let Some(readiness) = readiness {
        annotations["fanout.dev/readiness"] = json!(readiness);
    }
    let container = json!({"name": "app", "image": image("fanout-test"),
        "args": ["--listen", "0.0.0.0:8080", "--id", name],
        "securityContext": restricted()});
    test_pod(name, annotations, json!({}), container)
}

fn readiness_path(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "fanout-proxy")?;
    proxy
        .readiness_probe
        .as_ref()?
        .http_get
        .as_ref()?
        .path
        .clone()
}

async fn ready(pods: &Api<Pod>, name: &str) -> Result<bool, String> {
    let pod = pods.get(name).await.map_err(|e| e.to_string())?;
    Ok(is_ready(&pod) == Some(true))
}

/// Waits until pod `name` is Ready (`want` true) or NotReady (false).
async fn becomes(pods: &Api<Pod>, name: &str, want: bool, timeout: Duration) {
    let what = if want { "Ready" } else { "NotReady" };
    eventually(&format!("{name} {what}"), timeout, || async {
        if ready(pods, name).await? == want {
            Ok(())
        } else {
            Err(format!("not {what} yet"))
        }
    })
    .await;
}

async fn scale(deployments: &Api<Deployment>, replicas: i32) {
    deployments
        .patch(
            "backend",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap();
}

pub async fn run(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let by_proxy = create_pod(&pods, caller("caller-proxy", None)).await;
    let by_upstreams = create_pod(&pods, caller("caller-upstreams", Some("upstreams"))).await;
    assert_eq!(readiness_path(&by_proxy).as_deref(), Some("/ready/proxy"));
    assert_eq!(readiness_path(&by_upstreams).as_deref(), Some("/ready"));
    for name in ["caller-proxy", "caller-upstreams"] {
        becomes(&pods, name, true, Duration::from_secs(120)).await;
    }

    // The upstream goes away entirely.
    scale(&deployments, 0).await;
    eventually("backends gone", Duration::from_secs(120), || async {
        let left = pods
            .list(&ListParams::default().labels("app=backend"))
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} backend pods left"))
        }
    })
    .await;
    let gone = Instant::now();
    becomes(&pods, "caller-upstreams", false, Duration::from_secs(120)).await;
    let not_ready_after = gone.elapsed();
    // The default readiness holds: the caller can still serve its own clients.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(15) {
        assert!(
            ready(&pods, "caller-proxy").await.unwrap(),
            "caller-proxy turned NotReady when its upstream went away"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // A backend comes back: the upstreams-aware caller is Ready again.
    scale(&deployments, 1).await;
    let back = Instant::now();
    becomes(&pods, "caller-upstreams", true, Duration::from_secs(180)).await;
    eprintln!(
        "readiness: ok (with 0 backends: caller-upstreams NotReady after {:.0} s, caller-proxy \
         Ready throughout; caller-upstreams Ready {:.0} s after scaling to 1)",
        not_ready_after.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
}
