//! Traffic policy declared once on the Service (`fanout.dev/service-config`), applied by every
//! caller's proxy:
//! - backends answering UNAVAILABLE on 10 % of calls at random: with `maxAttempts: 5`
//!   retrying UNAVAILABLE a gateway's 2,000 calls see no failure; after the owner's edit to
//!   `maxAttempts: 1` about 10 % fail (the policy decides, not a default);
//! - the edit reaches a running proxy within 1 s (measured on its `/endpoints`);
//! - a `timeout` of 200 ms on a method whose backend sleeps 1 s ends those calls with
//!   DEADLINE_EXCEEDED at about 200 ms (the caller proxy's duration histogram);
//! - a canary split declared in `fanout.dev/policy` (`stable` 90, `canary` 10) holds within
//!   ±2 percentage points over 10,000 calls.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::spread::{deploy_with, gateway, paced_gateway};
use crate::support::{create_pod, eventually, finished_report, http_get};

const SERVICE_CONFIG: &str = "fanout.dev/service-config";

fn retry_config(max_attempts: u32) -> String {
    json!({"methodConfig": [{
        "name": [{"service": "fanout.test.v1.Test"}],
        "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.01s",
            "maxBackoff": "0.1s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}
    }]})
    .to_string()
}

fn failures(report: &Value, code: &str) -> u64 {
    report["failures"][code].as_u64().unwrap_or(0)
}

/// The running gateway proxy's view of the upstream's retry policy: its `maxAttempts`.
async fn max_attempts_in_force(admin: &str) -> Result<u64, String> {
    let body = http_get(&format!("http://{admin}/endpoints")).await?;
    let endpoints: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    endpoints["upstreams"][0]["service_config"]["methods"][0]["retry"]["max_attempts"]
        .as_u64()
        .ok_or_else(|| format!("no retry policy in force: {body}"))
}

async fn pod_ip(pods: &Api<Pod>, name: &str) -> String {
    eventually(
        &format!("{name} has an IP"),
        Duration::from_secs(60),
        || async {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            pod.status
                .and_then(|s| s.pod_ip)
                .ok_or_else(|| "no IP yet".to_string())
        },
    )
    .await
}

pub async fn run(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    deploy_with(
        client,
        namespace,
        "flaky",
        false,
        &["--fail-percent", "10"],
        json!({SERVICE_CONFIG: retry_config(5)}),
    )
    .await;
    let upstreams = json!({"fanout.dev/upstreams": "flaky:grpc"});

    create_pod(
        &pods,
        gateway("gateway-retry-5", 2_000, 1, 1, upstreams.clone()),
    )
    .await;
    let report = finished_report(&pods, "gateway-retry-5", "gateway").await;
    eprintln!("gateway-retry-5: {report}");
    assert_eq!(
        report["failures"],
        json!({}),
        "maxAttempts 5: calls failed: {report}"
    );

    // A caller running while the owner edits the policy: how soon its proxy applies the edit.
    let watcher = "gateway-policy-watch";
    create_pod(
        &pods,
        paced_gateway(watcher, 60_000, 1, 1, 200, upstreams.clone()),
    )
    .await;
    let admin = format!("{}:15020", pod_ip(&pods, watcher).await);
    eventually(
        "the watching proxy applies maxAttempts 5",
        Duration::from_secs(90),
        || async {
            match max_attempts_in_force(&admin).await? {
                5 => Ok(()),
                other => Err(format!("maxAttempts {other}")),
            }
        },
    )
    .await;
    let edited = Instant::now();
    services
        .patch(
            "flaky",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {SERVICE_CONFIG: retry_config(1)}}})),
        )
        .await
        .unwrap();
    let applied = loop {
        if max_attempts_in_force(&admin).await == Ok(1) {
            break edited.elapsed();
        }
        assert!(
            edited.elapsed() < Duration::from_secs(10),
            "the edit did not reach the running proxy within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("policy edit → running proxy: {applied:?}");
    assert!(
        applied <= Duration::from_secs(1),
        "the edit took {applied:?} to reach a running proxy"
    );

    create_pod(&pods, gateway("gateway-retry-1", 2_000, 1, 1, upstreams)).await;
    let report = finished_report(&pods, "gateway-retry-1", "gateway").await;
    eprintln!("gateway-retry-1: {report}");
    let failed = failures(&report, "Unavailable");
    assert!(
        (100..=320).contains(&failed),
        "maxAttempts 1: {failed} of 2,000 calls failed, expected about 10 %: {report}"
    );

    // A 200 ms timeout on the method, backends that sleep a second.
    deploy_with(
        client,
        namespace,
        "sleepy",
        false,
        &["--delay-ms", "1000"],
        json!({SERVICE_CONFIG: json!({"methodConfig": [{
            "name": [{"service": "fanout.test.v1.Test", "method": "Unary"}],
            "timeout": "0.2s"}]}).to_string()}),
    )
    .await;
    let calls = 20;
    let upstreams = json!({"fanout.dev/upstreams": "sleepy:grpc"});
    create_pod(&pods, gateway("gateway-timeout", calls, 1, 1, upstreams)).await;
    let report = finished_report(&pods, "gateway-timeout", "gateway").await;
    eprintln!("gateway-timeout: {report}");
    assert_eq!(
        failures(&report, "DeadlineExceeded"),
        u64::from(calls),
        "{report}"
    );
    // How long they took, from the caller's proxy: each ended between 102 and 410 ms.
    let admin = format!("{}:15020", pod_ip(&pods, "gateway-timeout").await);
    let metrics = http_get(&format!("http://{admin}/metrics")).await.unwrap();
    let bucket = |le: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("fanout_proxy_request_duration_seconds_bucket{")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no bucket le={le}: {metrics}"))
    };
    // (The histogram also holds the client's first, quick Stats calls.)
    let (fast, in_time, all) = (bucket("0.1024"), bucket("0.4096"), bucket("+Inf"));
    eprintln!("gateway-timeout: {fast} calls ended by 102 ms, {in_time} by 410 ms, {all} in all");
    assert!(
        in_time - fast >= u64::from(calls),
        "calls ended before the 200 ms timeout"
    );
    assert_eq!(all, in_time, "calls ran past 410 ms");

    // A canary: calls to `stable` split 90 / 10 with the `canary` Service.
    deploy_with(client, namespace, "canary", false, &[], json!({})).await;
    deploy_with(
        client,
        namespace,
        "stable",
        false,
        &[],
        json!({"fanout.dev/policy": json!({"split": [
            {"service": "stable", "weight": 90}, {"service": "canary", "weight": 10}]}).to_string()}),
    )
    .await;
    let calls = 10_000;
    let upstreams = json!({"fanout.dev/upstreams": "stable:grpc"});
    create_pod(&pods, gateway("gateway-split", calls, 4, 8, upstreams)).await;
    let report = finished_report(&pods, "gateway-split", "gateway").await;
    eprintln!("gateway-split: {report}");
    assert_eq!(report["failures"], json!({}), "{report}");
    let backends: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(report["backends"].clone()).unwrap();
    let to_canary: u64 = backends
        .iter()
        .filter(|(pod, _)| pod.starts_with("canary-"))
        .map(|(_, n)| n)
        .sum();
    let percent = to_canary as f64 * 100.0 / f64::from(calls);
    eprintln!("gateway-split: canary {percent:.2} % of {calls} calls");
    assert!(
        (8.0..=12.0).contains(&percent),
        "the canary took {percent:.2} % of {calls} calls: {report}"
    );
}
