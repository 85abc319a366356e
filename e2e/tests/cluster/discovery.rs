//! Endpoints that keep up with the cluster, through the discovery server:
//! - a headless Service whose port targets the container port by name spreads like the
//!   ClusterIP one of `spread`;
//! - `rollout restart` of the backends under continuous load fails no call, with no preStop
//!   sleep in the backends;
//! - a scale-up's new pods take calls within 1 s of turning Ready;
//! - how long an EndpointSlice change takes to reach a running proxy (printed).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::spread::{BACKENDS, assert_spread, deploy, gateway, paced_gateway};
use crate::support::{create_pod, eventually, finished_report, http_get as get, is_ready};

/// What one round of the sampler saw, at one instant.
struct Sample {
    at: Instant,
    /// Pod IPs the EndpointSlices list as ready.
    slice_ready: BTreeSet<String>,
    /// Pod IPs of Ready pods.
    pods_ready: BTreeSet<String>,
    /// Pod IPs in the gateway proxy's endpoint set.
    proxy: BTreeSet<String>,
    /// Calls the gateway proxy sent to each pod IP.
    calls: BTreeMap<String, u64>,
}

fn ip_of(address: &str) -> String {
    address
        .rsplit_once(':')
        .map(|(ip, _)| ip)
        .unwrap_or(address)
        .to_string()
}

/// Samples slices, pods and the gateway proxy (reached at its pod IP's admin port) every
/// 25 ms until `stop`.
async fn sample(
    client: &Client,
    namespace: &str,
    service: &str,
    admin: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sample> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let by_service = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let by_app = ListParams::default().labels(&format!("app={service}"));
    let (endpoints_url, metrics_url) = (
        format!("http://{admin}/endpoints"),
        format!("http://{admin}/metrics"),
    );
    let mut samples = Vec::new();
    while !*stop.borrow() {
        let (slice_list, pod_list, endpoints, metrics) = tokio::join!(
            slices.list(&by_service),
            pods.list(&by_app),
            get(&endpoints_url),
            get(&metrics_url),
        );
        let at = Instant::now();
        let (Ok(slice_list), Ok(pod_list), Ok(endpoints), Ok(metrics)) =
            (slice_list, pod_list, endpoints, metrics)
        else {
            tokio::time::sleep(Duration::from_millis(25)).await;
            continue;
        };
        let slice_ready = slice_list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        let pods_ready = pod_list
            .items
            .iter()
            .filter(|p| is_ready(p) == Some(true) && p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        let state: Value = serde_json::from_str(&endpoints).unwrap_or_default();
        let proxy = state["upstreams"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["address"].as_str().map(ip_of))
            .collect();
        let mut calls = BTreeMap::new();
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("fanout_proxy_requests_total{"))
        {
            let Some(endpoint) = line
                .split("endpoint=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            let n: u64 = line
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            *calls.entry(ip_of(endpoint)).or_default() += n;
        }
        samples.push(Sample {
            at,
            slice_ready,
            pods_ready,
            proxy,
            calls,
        });
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    samples
}

/// For every IP that `change` finds between two samples of the set `first`, how long until
/// `done` held for it; `None` when it never did.
fn follow_delays(
    samples: &[Sample],
    first: impl Fn(&Sample) -> &BTreeSet<String>,
    change: impl Fn(&BTreeSet<String>, &BTreeSet<String>) -> Vec<String>,
    done: impl Fn(&Sample, &str) -> bool,
) -> Vec<(String, Option<Duration>)> {
    let mut delays = Vec::new();
    for pair in samples.windows(2) {
        for ip in change(first(&pair[0]), first(&pair[1])) {
            let start = pair[1].at;
            let followed = samples
                .iter()
                .filter(|s| s.at >= pair[0].at)
                .find(|s| done(s, &ip))
                .map(|s| s.at.saturating_duration_since(start));
            delays.push((ip, followed));
        }
    }
    delays
}

fn added(before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    after.difference(before).cloned().collect()
}

fn removed(before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    before.difference(after).cloned().collect()
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    values.sort();
    if values.is_empty() {
        return Duration::ZERO;
    }
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn describe(name: &str, delays: &[(String, Option<Duration>)]) -> String {
    let seen: Vec<Duration> = delays.iter().filter_map(|(_, d)| *d).collect();
    format!(
        "{name}: {} changes, p50 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        percentile(seen.clone(), 0.5),
        percentile(seen.clone(), 0.99),
        seen.iter().max().copied().unwrap_or_default()
    )
}

pub async fn run(client: &Client, namespace: &str) {
    // A headless Service whose port targets the container port by name.
    let headless_pods = deploy(client, namespace, "backend-headless", true).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let upstreams = json!({"fanout.dev/upstreams": "backend-headless:grpc"});
    create_pod(&pods, gateway("gateway-headless", 2_000, 1, 1, upstreams)).await;
    let report = finished_report(&pods, "gateway-headless", "gateway").await;
    eprintln!("gateway-headless (1x1): {report}");
    assert_spread("gateway-headless", &report, &headless_pods);

    // Continuous load on the ClusterIP Service while its Deployment restarts, then scales up.
    let upstreams = json!({"fanout.dev/upstreams": "backend:grpc"});
    let load = create_pod(
        &pods,
        paced_gateway("gateway-rollout", 24_000, 2, 2, 300, upstreams),
    )
    .await;
    let name = load.metadata.name.clone().unwrap();
    let ip = eventually(
        "gateway-rollout has an IP",
        Duration::from_secs(60),
        || async {
            let pod = pods.get(&name).await.map_err(|e| e.to_string())?;
            pod.status
                .and_then(|s| s.pod_ip)
                .ok_or_else(|| "no IP yet".to_string())
        },
    )
    .await;
    let admin = format!("{ip}:15020");
    eventually(
        "gateway-rollout calling",
        Duration::from_secs(60),
        || async {
            let metrics = get(&format!("http://{admin}/metrics")).await?;
            metrics
                .contains("fanout_proxy_requests_total{")
                .then_some(())
                .ok_or_else(|| "no calls yet".to_string())
        },
    )
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let (client, namespace, admin) = (client.clone(), namespace.to_string(), admin.clone());
        tokio::spawn(async move { sample(&client, &namespace, "backend", &admin, stopped).await })
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let restarted_at = format!("{:?}", std::time::SystemTime::now());
    deployments
        .patch(
            "backend",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations":
                {"kubectl.kubernetes.io/restartedAt": restarted_at}}}}})),
        )
        .await
        .unwrap();
    let rolled = |want: usize| {
        let deployments = deployments.clone();
        async move {
            let d = deployments
                .get("backend")
                .await
                .map_err(|e| e.to_string())?;
            let status = d.status.unwrap_or_default();
            let done = status.updated_replicas == Some(want as i32)
                && status.ready_replicas == Some(want as i32)
                && status.replicas == Some(want as i32)
                && status.observed_generation == d.metadata.generation;
            done.then_some(()).ok_or_else(|| format!("{status:?}"))
        }
    };
    eventually("rollout restart done", Duration::from_secs(180), || {
        rolled(BACKENDS)
    })
    .await;
    deployments
        .patch(
            "backend",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": BACKENDS + 2}})),
        )
        .await
        .unwrap();
    eventually("scaled up", Duration::from_secs(120), || {
        rolled(BACKENDS + 2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send_replace(true);
    let samples = sampler.await.unwrap();
    let report = finished_report(&pods, "gateway-rollout", "gateway").await;
    eprintln!("gateway-rollout (2x2 at 300/s): {report}");

    let proxy_has = |s: &Sample, ip: &str| s.proxy.contains(ip);
    let proxy_lacks = |s: &Sample, ip: &str| !s.proxy.contains(ip);
    let called = |s: &Sample, ip: &str| s.calls.get(ip).copied().unwrap_or(0) > 0;
    let joined = follow_delays(&samples, |s| &s.slice_ready, added, proxy_has);
    let left = follow_delays(&samples, |s| &s.slice_ready, removed, proxy_lacks);
    let first_calls = follow_delays(&samples, |s| &s.pods_ready, added, called);
    eprintln!(
        "discovery ({} samples, 25 ms apart): {}; {}; {}",
        samples.len(),
        describe("slice ready -> in the proxy's set", &joined),
        describe("slice not ready -> out of the proxy's set", &left),
        describe("pod Ready -> first call", &first_calls),
    );
    assert_eq!(
        report["failures"],
        json!({}),
        "calls failed during the rollout: {report}"
    );
    assert!(
        first_calls.len() >= BACKENDS + 2,
        "too few new pods seen turning Ready: {}",
        first_calls.len()
    );
    for (ip, delay) in &first_calls {
        assert!(
            delay.is_some_and(|d| d <= Duration::from_secs(1)),
            "new pod {ip} took its first call {delay:?} after turning Ready"
        );
    }
    eprintln!("discovery: ok");
}
